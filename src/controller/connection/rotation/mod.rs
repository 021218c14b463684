//! Rotation of a connection's own credential (`spec.credentialRotation`), the most powerful secret
//! the operator holds.
//!
//! Medplum is the authority on which secret is current and which is retiring (`/auth/me`, which the
//! verification calls anyway, shows both), the Secret on what the operator holds. No step leaves the
//! Secret without a working credential:
//! 1. `$rotate-secret` with the Secret's secret: Medplum issues a new one and keeps the given one as
//!    retiring, which still obtains tokens. A crash before step 2 loses nothing: the next reconcile
//!    finds the Secret's secret retiring and stores Medplum's current one, read from `/auth/me`.
//! 2. The new secret is checked against Medplum, then written into the Secret (its two credential keys
//!    and two annotations, by server-side apply with the operator's field manager).
//! 3. After the grace period, `$rotate-secret` with the retiring secret ends it; only once the Secret
//!    holds the current one, so the Secret never ends up holding a retired secret.
//!
//! Medplum compares the secret given to `$rotate-secret` with the client's, so a step planned from a
//! stale reading (two connections on one Secret, an operator restarted mid-step) fails with 400 and
//! changes nothing; a lock per Secret keeps one process's steps in sequence.

mod execute;
mod plan;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::{ConnectionObject, Verified};
use crate::controller::status::{ConditionState, set_condition};
use crate::controller::{Context, event};
use crate::crd::{ConnectionStatus, CredentialRotationStatus, ROTATE_ANNOTATION};
use crate::failure::Failure;
use crate::medplum::MedplumError;
use execute::{Outcome, execute, observe, read_stored};
use plan::{Schedule, Step, plan};

/// Secret annotation: when the operator stored the Secret's current secret (RFC 3339).
pub const STORED_AT_ANNOTATION: &str = "medplum.com/credential-stored-at";
/// Secret annotation: the connection that stored it.
pub const STORED_BY_ANNOTATION: &str = "medplum.com/credential-stored-by";
/// The condition that reports the rotation.
pub const CONDITION: &str = "CredentialRotation";

/// Why a rotation step could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error(
        "the credentials Secret is also used by {0}, which does not set spec.credentialRotation; every connection using it must opt in"
    )]
    Shared(String),
    #[error("the operator may not write the credentials Secret {secret}: {source}")]
    NotWritable { secret: String, source: kube::Error },
    #[error(
        "the operator may not list the connections in namespace {namespace}, so it cannot tell whether another one uses the credentials Secret: {source}"
    )]
    SharingUnknown { namespace: String, source: kube::Error },
    #[error("reading or writing the credentials Secret: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Medplum(#[from] MedplumError),
    #[error("Medplum does not show the credential's own secrets in /auth/me, which rotation needs")]
    SecretsNotShown,
    #[error("Medplum refused the new secret it just issued: {0}")]
    NewSecretRefused(MedplumError),
}

impl Failure for RotationError {
    fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::Shared(_) => "CredentialsSecretShared",
            Self::NotWritable { .. } => "CredentialsSecretNotWritable",
            Self::SharingUnknown { .. } => "CredentialsSecretSharingUnknown",
            Self::Kube(_) => "KubernetesError",
            Self::Medplum(e) => e.reason(),
            Self::SecretsNotShown => "SecretsNotShown",
            Self::NewSecretRefused(_) => "NewSecretRefused",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Kube(_) | Self::NewSecretRefused(_) => true,
            Self::Medplum(e) => e.is_transient(),
            _ => false,
        }
    }

    fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Medplum(e) if e.is_rate_limited())
    }
}

/// The rotation part of a connection's reconcile, after a successful verification: takes the next
/// step, if one is due, and sets `status.credentialRotation` and its condition. Returns when to look
/// again, if sooner than the resync.
pub async fn rotate<K: ConnectionObject>(
    ctx: &Context,
    obj: &K,
    verified: &Verified,
    status: &mut ConnectionStatus,
    now: Timestamp,
) -> Option<Duration> {
    let generation = obj.meta().generation;
    let Some(spec) = obj.credential_rotation() else {
        status.credential_rotation = None;
        status.conditions.retain(|c| c.type_ != CONDITION);
        return None;
    };
    let previous = status.conditions.iter().find(|c| c.type_ == CONDITION).map(|c| c.reason.clone());
    let handled = status.credential_rotation.as_ref().and_then(|r| r.handled_request.clone());
    let (report, delay) = match step(ctx, obj, verified, Schedule::of(spec), handled, now).await {
        Ok(progress) => {
            let delay = progress.delay(now);
            (progress, delay)
        }
        Err(e) => {
            let delay = ctx.backoff.next_delay(&backoff_key(obj), Duration::ZERO);
            let (name, namespace) = (obj.name_any(), obj.namespace().unwrap_or_default());
            if e.is_transient() {
                warn!(name, namespace, reason = e.reason(), error = %e, retry_in = ?delay, "credential rotation failed");
            } else {
                info!(name, namespace, reason = e.reason(), error = %e, "credential rotation refused");
            }
            let condition = ConditionState::new(CONDITION, false, e.reason(), e.to_string());
            if previous.as_deref() != Some(e.reason()) {
                publish(ctx, obj, EventType::Warning, e.reason(), e.to_string()).await;
            }
            status.conditions = set_condition(&status.conditions, condition, generation, now);
            return Some(delay);
        }
    };
    if let Some((reason, note)) = report.event() {
        publish(ctx, obj, EventType::Normal, reason, note).await;
    }
    status.conditions = set_condition(&status.conditions, report.condition(), generation, now);
    status.credential_rotation = Some(report.status);
    delay
}

/// Where a rotation stands after this reconcile's step.
struct Progress {
    status: CredentialRotationStatus,
    outcome: Option<Outcome>,
    /// The plan's step, before it was taken.
    step: Step,
    client_id: String,
}

impl Progress {
    fn delay(&self, now: Timestamp) -> Option<Duration> {
        let until = |t: Timestamp| Duration::try_from(t.duration_since(now)).unwrap_or_default();
        match (&self.outcome, &self.step) {
            // Look again at once: the next verification uses (and so proves) the new state.
            (Some(_), _) => Some(Duration::from_secs(1)),
            (None, Step::WaitForGrace { until: t }) => Some(until(*t)),
            (None, Step::Idle { next: Some(t) }) => Some(until(*t)),
            (None, _) => None,
        }
    }

    fn condition(&self) -> ConditionState {
        let time = |t: &Option<Time>| t.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| "never".into());
        let last = time(&self.status.last_rotation_time);
        let (reason, message) = match (&self.outcome, &self.status.retire_time, &self.status.next_rotation_time) {
            (Some(Outcome::Retired), ..) => ("Retired", format!("the previous secret was retired; rotated {last}")),
            (_, Some(retire), _) => {
                ("GracePeriod", format!("a new secret was stored {last}; the previous one works until {}", retire.0))
            }
            (_, None, Some(next)) => ("Scheduled", format!("rotated {last}; the next rotation is due {}", next.0)),
            (_, None, None) => ("OnRequest", format!("rotated {last}; rotates when medplum.com/rotate changes")),
        };
        ConditionState::new(CONDITION, true, reason, message)
    }

    fn event(&self) -> Option<(&'static str, String)> {
        let id = &self.client_id;
        match &self.outcome {
            Some(Outcome::Stored { .. }) => {
                let until = self.status.retire_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
                let note =
                    format!("stored a new secret of ClientApplication/{id}; the previous one works until {until}");
                Some(("CredentialRotated", note))
            }
            Some(Outcome::Retired) => {
                Some(("CredentialRetired", format!("retired the previous secret of ClientApplication/{id}")))
            }
            Some(Outcome::Overtaken) | None => None,
        }
    }
}

/// Observes (the Secret; Medplum's side came with the verification), plans and takes one step, under
/// the lock of the credentials Secret.
async fn step<K: ConnectionObject>(
    ctx: &Context,
    obj: &K,
    verified: &Verified,
    schedule: Result<Schedule, RotationError>,
    handled: Option<String>,
    now: Timestamp,
) -> Result<Progress, RotationError> {
    let schedule = schedule?;
    let target = obj.target();
    let lock = ctx.connections.rotation_lock(&target.credentials_namespace, &target.credentials_name);
    let _held = lock.lock().await;
    let stored = read_stored(&ctx.client, &target).await?;
    let request = obj.annotations().get(ROTATE_ANNOTATION).cloned();
    let observed = observe(verified, &stored, request, handled.clone())?;
    let step = plan(&schedule, &observed, now);
    let outcome = execute(&ctx.client, obj, verified, &stored, &step, now).await?;
    let stored_at = match &outcome {
        Some(Outcome::Stored { at }) => Some(*at),
        _ => stored.stored_at,
    };
    let retire_time = match (&outcome, &step) {
        (Some(Outcome::Stored { at }), _) => Some(plan::after(*at, schedule.grace)),
        (None, Step::WaitForGrace { until }) => Some(*until),
        _ => None,
    };
    let next_rotation_time = match (retire_time, schedule.interval) {
        (None, Some(interval)) => Some(stored_at.map_or(now, |t| plan::after(t, interval))),
        _ => None,
    };
    let handled_request = match &step {
        Step::Rotate { request: Some(r) } => Some(r.clone()),
        _ => handled,
    };
    if let Some(outcome) = &outcome {
        ctx.backoff.reset(&backoff_key(obj));
        info!(
            name = obj.name_any(),
            namespace = obj.namespace().unwrap_or_default(),
            ?outcome,
            "credential rotation step"
        );
    }
    let status = CredentialRotationStatus {
        last_rotation_time: stored_at.map(Time),
        next_rotation_time: next_rotation_time.map(Time),
        retire_time: retire_time.map(Time),
        handled_request,
    };
    Ok(Progress { status, outcome, step, client_id: verified.client_id.clone() })
}

/// The backoff of a connection's rotation, apart from its verification's.
fn backoff_key<K: ConnectionObject>(obj: &K) -> String {
    format!("rotation/{}/{}/{}", super::kind_name(K::KIND), obj.namespace().unwrap_or_default(), obj.name_any())
}

async fn publish<K: ConnectionObject>(ctx: &Context, obj: &K, type_: EventType, reason: &str, note: String) {
    ctx.publish(&obj.object_ref(&()), &event(type_, reason, "RotateCredential", note)).await;
}
