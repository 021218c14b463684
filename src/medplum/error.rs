use std::time::Duration;

use crate::failure::Failure;

/// What went wrong talking to Medplum. Messages never contain credentials or tokens: request
/// bodies are never quoted, and server messages are taken from OperationOutcome text only.
#[derive(Debug, thiserror::Error)]
pub enum MedplumError {
    #[error("Medplum at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("Medplum rate limit reached (HTTP 429){}", retry_hint(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error("Medplum answered HTTP {status}: {message}")]
    ServerError { status: u16, message: String },
    #[error("Medplum refused the client credentials: {description}")]
    InvalidCredentials { description: String },
    #[error("Medplum refused the access token (HTTP 401)")]
    Unauthorized,
    #[error("forbidden by Medplum (HTTP 403): {message}")]
    Forbidden { message: String },
    #[error("not found in Medplum (HTTP 404)")]
    NotFound,
    #[error("deleted in Medplum (HTTP 410)")]
    Gone,
    #[error("conflict in Medplum (HTTP 409): {message}")]
    Conflict { message: String },
    #[error("Medplum precondition failed (HTTP 412): {message}")]
    PreconditionFailed { message: String },
    #[error("Medplum rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("unexpected answer from Medplum: {detail}")]
    Protocol { detail: String },
    #[error("invalid Medplum connection settings: {detail}")]
    Settings { detail: String },
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default()
}

impl Failure for MedplumError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "MedplumUnreachable",
            Self::RateLimited { .. } => "MedplumRateLimited",
            Self::ServerError { .. } => "MedplumServerError",
            Self::InvalidCredentials { .. } => "InvalidCredentials",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::NotFound => "NotFound",
            Self::Gone => "Gone",
            Self::Conflict { .. } => "Conflict",
            Self::PreconditionFailed { .. } => "PreconditionFailed",
            Self::Rejected { .. } => "MedplumRejected",
            Self::Protocol { .. } => "MedplumProtocolError",
            Self::Settings { .. } => "InvalidSettings",
        }
    }

    /// The same request may succeed later without any change.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. } | Self::RateLimited { .. } | Self::ServerError { .. } | Self::Protocol { .. }
        )
    }

    fn is_rate_limited(&self) -> bool {
        matches!(self, Self::RateLimited { .. })
    }
}

impl MedplumError {
    /// After this answer to a write, what the operator last saw of the object may no longer be
    /// what Medplum holds: the write may have happened without an answer (network, 5xx, a broken
    /// body), someone else wrote since (412), or the object went (404, 410), and also a 409, which
    /// Medplum gives for a write that lost a race with another transaction.
    pub fn leaves_object_uncertain(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::ServerError { .. }
                | Self::Protocol { .. }
                | Self::PreconditionFailed { .. }
                | Self::NotFound
                | Self::Gone
                | Self::Conflict { .. }
        )
    }

    /// Short label for metrics.
    pub fn status_label(&self) -> String {
        match self {
            Self::Unreachable { .. } => "unreachable".into(),
            Self::RateLimited { .. } => "429".into(),
            Self::ServerError { status, .. } | Self::Rejected { status, .. } => status.to_string(),
            Self::InvalidCredentials { .. } => "400".into(),
            Self::Unauthorized => "401".into(),
            Self::Forbidden { .. } => "403".into(),
            Self::NotFound => "404".into(),
            Self::Gone => "410".into(),
            Self::Conflict { .. } => "409".into(),
            Self::PreconditionFailed { .. } => "412".into(),
            Self::Protocol { .. } => "protocol".into(),
            Self::Settings { .. } => "settings".into(),
        }
    }
}
