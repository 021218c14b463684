//! Why a resource is not (yet) as its spec says: one error type for every kind that writes to
//! Medplum, read by the status condition, the Event and the backoff.

use super::connection::UseError;
use super::foreign_secret::Refusal;
use super::grants::GrantError;
use super::secret::SourceError;
use super::tenancy::Denied;
use crate::failure::Failure;
use crate::medplum::MedplumError;

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    // What the resource refers to.
    #[error(transparent)]
    Connection(#[from] UseError),
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error(transparent)]
    Source(#[from] SourceError),

    // What the namespace may not have, or take over.
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(
        "{what} is managed by a medplum-operator as {owner}; an object another resource or cluster manages is never adopted"
    )]
    AlreadyManaged { what: String, owner: String },
    #[error("Medplum found no {what} to adopt in the project")]
    AdoptTargetNotFound { what: String },
    #[error("Secret {name} {refusal}; refusing to write into it")]
    SecretConflict { name: String, refusal: Refusal },

    // The spec itself.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("spec.resources[{index}].criteria: {message}")]
    InvalidCriteria { index: usize, message: String },
    #[error("spec.ipAccessRules[{index}]: {message}")]
    InvalidIpRule { index: usize, message: String },
    #[error("project secret {name}: Secret key {secret}/{key} does not hold {kind}")]
    InvalidSecretValue { name: String, secret: String, key: String, kind: &'static str },
    #[error(
        "restart target {target} does not use Secret {secret} (no volume, env or envFrom of its pod template refers to it); only workloads that use the credentials are restarted"
    )]
    RestartTargetNotUsingSecret { target: String, secret: String },

    // What Medplum or another resource already holds.
    #[error("this person is already a member of the project; set spec.adopt: true to take that membership over")]
    AlreadyMember,
    #[error("MedplumProject {0} already declares this project's settings; a project has one MedplumProject")]
    ProjectAlreadyDeclared(String),
    #[error(
        "Medplum's project already holds {} that the operator did not write, with another value; nothing of it is overwritten (remove it there, or declare another name)",
        .0.join(", ")
    )]
    ProjectEntryConflict(Vec<String>),
    #[error(
        "Medplum has DomainConfiguration/{id} for {domain}, which the operator does not manage; set spec.adopt to take it over"
    )]
    DomainAlreadyExists { domain: String, id: String },
    #[error("Medplum refused the credentials in the Secret: {0}")]
    CredentialRejected(String),
    #[error("Medplum keeps {0} different from the spec after an update")]
    NotConverging(String),

    // Talking to the servers.
    #[error(transparent)]
    Medplum(#[from] MedplumError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Failure for ResourceError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Connection(e) => e.reason(),
            Self::Grant(e) => e.reason(),
            Self::Source(e) => e.reason(),
            Self::Denied(e) => e.reason(),
            Self::AlreadyManaged { .. } => "AlreadyManaged",
            Self::AdoptTargetNotFound { .. } => "AdoptTargetNotFound",
            Self::SecretConflict { refusal, .. } => refusal.reason(),
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::InvalidCriteria { .. } => "InvalidCriteria",
            Self::InvalidIpRule { .. } => "InvalidIpRule",
            Self::InvalidSecretValue { .. } => "InvalidSecretValue",
            Self::RestartTargetNotUsingSecret { .. } => "RestartTargetNotAllowed",
            Self::AlreadyMember => "AlreadyMember",
            Self::ProjectAlreadyDeclared(_) => "ProjectAlreadyDeclared",
            Self::ProjectEntryConflict(_) => "ProjectEntryConflict",
            Self::DomainAlreadyExists { .. } => "AlreadyExists",
            Self::CredentialRejected(_) => "CredentialRejected",
            Self::NotConverging(_) => "NotConverging",
            Self::Medplum(e) => e.reason(),
            Self::Kube(e) => e.reason(),
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Connection(e) => e.is_transient(),
            Self::Grant(e) => e.is_transient(),
            Self::Source(e) => e.is_transient(),
            // A 412 means someone wrote since the read: the next attempt reads again.
            Self::Medplum(e) => e.is_transient() || matches!(e, MedplumError::PreconditionFailed { .. }),
            Self::Kube(e) => e.is_transient(),
            _ => false,
        }
    }

    fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Medplum(e) if e.is_rate_limited())
    }
}
