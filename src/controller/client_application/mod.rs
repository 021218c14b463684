//! `ClientApplication`: a Medplum ClientApplication and its membership, with working credentials in a
//! Kubernetes Secret, rotated without downtime.
//!
//! Every reconcile observes the Secret, the Medplum client and membership and the restart targets, then
//! repeatedly asks [`plan`] (pure) for the one next step and carries it out, until nothing is left to do.
//! Progress lives only in what is observed, so a reconcile killed at any line resumes where it stopped:
//! - a new client is created in Medplum with its secret, then the Secret is written from what Medplum
//!   holds (a restart finds the client by its tag);
//! - to rotate, a new secret is written to the Secret (key [`PENDING_KEY`]) before Medplum sees it;
//! - Medplum then holds it as `secret` and the old one as `retiringSecret`, both working;
//! - the Secret switches to it (annotation [`ISSUED_AT`]) and the restart targets are restarted;
//! - once they rolled out and the grace period passed, the old secret is retired.
//!
//! Medplum objects are found again through an ownership tag (ClientApplication has no identifier).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use secrecy::SecretString;

use super::adoption;
use super::connection::{UsableConnection, usable_connection};
use super::failure::ResourceError;
use super::grants::resolve_grants;
use super::secret::{CLIENT_LABEL, fingerprint, read_secret_string};
use super::status::{ConditionState, READY, apply_status, set_condition};
use super::tenancy::{self};
use super::workload::Stall;
use super::{Context, Error, ReconcileStream, event};
use crate::crd::{ClientApplication, ClientApplicationStatus, ROTATE_ANNOTATION, RestartTarget};
use crate::medplum::{ClientApplicationResource, Coding, CredentialProof, MembershipAccess};

mod cleanup;
mod execute;
mod observe;
mod plan;

use cleanup::cleanup;
use execute::{Outcome, Reconciler, converge, reason_of_proof};
use observe::observe;
use plan::{Observed, Step};

pub(crate) use plan::{client_drift, membership_drift as client_membership_drift};

pub const KIND: &str = "ClientApplication";
/// Secret key holding a new secret that Medplum may not know yet.
pub const PENDING_KEY: &str = "medplum-operator.next-client-secret";
/// Secret annotation: when the current credentials were written (RFC 3339).
pub const ISSUED_AT: &str = "medplum.com/issued-at";
/// Secret annotation: the last `medplum.com/rotate` value acted on.
pub const ROTATION_HANDLED: &str = "medplum.com/rotation-handled";
/// Secret annotation: the last `medplum.com/rotate-clients` value of the connection acted on.
pub const ROTATE_CLIENTS_HANDLED: &str = "medplum.com/rotate-clients-handled";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "medplum-operator");
/// Condition: Medplum proved the Secret's current credentials right; its reason says how.
const CREDENTIAL_VERIFIED: &str = "CredentialVerified";
/// Rotating reasons of a rollout that does not progress: a Warning Event says so when they begin.
const ROLLOUT_STUCK: &str = "RolloutStuck";
const ROLLOUT_PAUSED: &str = "RolloutPaused";
/// How often a rollout in progress is looked at again.
const ROLLOUT_POLL: Duration = Duration::from_secs(5);
/// A reconcile carries out at most this many steps; a correct plan needs far fewer.
const MAX_STEPS: usize = 24;

// ---------------------------------------------------------------------------------------------------
// What should exist (pure)

/// Everything the spec and its references say should exist.
pub struct Desired {
    pub name: String,
    pub namespace: String,
    pub tag: Coding,
    /// The managed fields of the Medplum ClientApplication (no id, no secrets).
    pub client: ClientApplicationResource,
    pub access: Vec<MembershipAccess>,
    /// The membership is a project administrator (for on-behalf-of).
    pub admin: bool,
    pub project_id: String,
    pub base_url: String,
    pub secret_name: String,
    pub keys: crate::crd::SecretKeys,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub owner: OwnerReference,
    pub merge: bool,
    pub rotation_interval: Option<Duration>,
    pub grace_period: Duration,
    pub restart_targets: Vec<RestartTarget>,
    pub rotation_request: Option<String>,
    /// The connection's `medplum.com/rotate-clients` request.
    pub rotate_clients_request: Option<String>,
    pub adopt: Option<crate::crd::Adopt>,
}

fn parse_duration(field: &str, text: &str) -> Result<Duration, ResourceError> {
    crate::config::parse_duration(text).map_err(|e| ResourceError::InvalidSpec(format!("{field}: {e}")))
}

/// The managed fields of the Medplum ClientApplication for a spec.
pub fn desired_client(
    ca: &ClientApplication,
    tag: &Coding,
    identity_provider_secret: Option<SecretString>,
) -> ClientApplicationResource {
    let spec = &ca.spec;
    let namespace = ca.namespace().unwrap_or_default();
    // A resource that adopts marks the client as adopted, so that its deletion knows.
    let marker = spec.adopt.as_ref().map(|_| adoption::adopted_marker(tag));
    ClientApplicationResource {
        resource_type: "ClientApplication".into(),
        meta: crate::medplum::Meta { tag: std::iter::once(tag.clone()).chain(marker).collect(), ..Default::default() },
        name: Some(spec.display_name.clone().unwrap_or_else(|| format!("{namespace}/{}", ca.name_any()))),
        description: spec.description.clone(),
        access_token_lifetime: spec.access_token_lifetime.clone(),
        refresh_token_lifetime: spec.refresh_token_lifetime.clone(),
        redirect_uris: spec.redirect_uris.clone(),
        pkce_optional: spec.pkce_optional,
        jwks_uri: spec.jwks_uri.clone(),
        launch_uri: spec.launch_uri.clone(),
        allowed_origin: spec.allowed_origins.clone(),
        default_scope: spec.default_scopes.clone(),
        identity_provider: spec
            .identity_provider
            .as_ref()
            .zip(identity_provider_secret)
            .map(|(idp, secret)| super::identity_provider(idp, secret)),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Reconcile

async fn desired(ctx: &Context, ca: &ClientApplication, usable: &UsableConnection) -> Result<Desired, ResourceError> {
    tenancy::client_application(&usable.limits, &ca.spec)?;
    let namespace = ca.namespace().unwrap_or_default();
    let name = ca.name_any();
    let access = resolve_grants(ctx, &namespace, &ca.spec.connection_ref, &ca.spec.access).await?;
    let idp_secret = match ca.spec.identity_provider.as_ref().map(|idp| &idp.client_secret_ref) {
        Some(r) => Some(read_secret_string(&ctx.client, &namespace, &r.name, &r.key).await?),
        None => None,
    };
    let tag = crate::controller::ownership_tag(&ctx.settings.cluster_id, KIND, &namespace, &name);
    let rotation = &ca.spec.rotation;
    Ok(Desired {
        client: desired_client(ca, &tag, idp_secret),
        tag,
        access,
        admin: ca.spec.on_behalf_of,
        project_id: usable.project_id.clone(),
        base_url: usable.client.base_url().to_string(),
        secret_name: ca.spec.secret.name.clone().unwrap_or_else(|| name.clone()),
        keys: ca.spec.secret.keys.clone(),
        labels: ca.spec.secret.labels.clone(),
        annotations: ca.spec.secret.annotations.clone(),
        owner: ca.controller_owner_ref(&()).expect("stored objects have a uid"),
        merge: ca.spec.secret.merge,
        rotation_interval: rotation
            .interval
            .as_deref()
            .map(|i| parse_duration("spec.rotation.interval", i))
            .transpose()?,
        grace_period: parse_duration("spec.rotation.gracePeriod", &rotation.grace_period)?,
        restart_targets: rotation.restart_targets.clone(),
        rotation_request: ca.annotations().get(ROTATE_ANNOTATION).cloned(),
        rotate_clients_request: usable.rotate_clients_request.clone(),
        adopt: ca.spec.adopt.clone(),
        name,
        namespace,
    })
}

/// A Warning Event when the Rotating condition begins to say that a rollout does not progress.
fn stall_warning(before: Option<&ClientApplicationStatus>, after: &ClientApplicationStatus) -> Option<Event> {
    let rotating = |s: Option<&ClientApplicationStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Rotating"))
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (reason, message) = rotating(Some(after))?;
    let stalled = reason == ROLLOUT_STUCK || reason == ROLLOUT_PAUSED;
    let began = rotating(before).is_none_or(|(was, _)| was != reason);
    (stalled && began).then(|| event(EventType::Warning, &reason, "Rotate", message))
}

/// The status after a reconcile.
fn desired_status(
    ca: &ClientApplication,
    d: Option<&Desired>,
    o: Option<&Observed>,
    result: &Result<Outcome, ResourceError>,
    now: Timestamp,
) -> ClientApplicationStatus {
    let mut status = ca.status.clone().unwrap_or_default();
    let generation = ca.metadata.generation;
    if let Some(d) = d {
        status.secret_name = Some(d.secret_name.clone());
        status.project_id = Some(d.project_id.clone());
    }
    if let (Some(d), Some(o)) = (d, o) {
        status.client_id = o.client.as_ref().and_then(|c| c.id.clone()).or(status.client_id);
        status.membership_id = o.membership.as_ref().and_then(|m| m.id.clone()).or(status.membership_id);
        let current = o.value(&d.keys.client_secret);
        if o.verified.is_some() {
            status.secret_fingerprint = current.map(fingerprint);
        }
        let issued = o.issued_at();
        status.last_rotation_time = issued.map(Time);
        status.next_rotation_time = match (issued, d.rotation_interval) {
            (Some(i), Some(interval)) => i.checked_add(interval).ok().map(Time),
            _ => None,
        };
        let print = status.secret_fingerprint.clone().unwrap_or_default();
        let verified = verified_condition(d, o, &print);
        status.conditions = set_condition(&status.conditions, verified, generation, now);
        let rotating = rotating_condition(o, result);
        if !rotating.status {
            status.rotate_clients_handled = plan::Answered::of(o).clients.or(status.rotate_clients_handled);
        }
        status.conditions = set_condition(&status.conditions, rotating, generation, now);
    }
    let ready = match result {
        Ok(_) => ConditionState::new(
            READY,
            true,
            "Ready",
            format!(
                "Secret {} holds working credentials of ClientApplication/{}",
                status.secret_name.clone().unwrap_or_default(),
                status.client_id.clone().unwrap_or_default()
            ),
        ),
        Err(e) => ConditionState::not_ready(e),
    };
    status.conditions = set_condition(&status.conditions, ready, generation, now);
    status.observed_generation = generation;
    status
}

/// `CredentialVerified`: what Medplum proved about the credentials in the Secret (`print`: their
/// fingerprint).
fn verified_condition(d: &Desired, o: &Observed, print: &str) -> ConditionState {
    match o.verified {
        Some(proof) => ConditionState::new(
            CREDENTIAL_VERIFIED,
            true,
            reason_of_proof(proof),
            match proof {
                CredentialProof::Authenticated => format!(
                    "Medplum authenticated a request made with the credentials in Secret {} ({print})",
                    d.secret_name
                ),
                CredentialProof::TokenIssued => {
                    format!("Medplum issued a token for the credentials in Secret {} ({print})", d.secret_name)
                }
                CredentialProof::AddressNotAllowed => format!(
                    "Medplum accepted the secret in Secret {} ({print}) and refused a token only because the \
                     client's IP rules block the operator's address; tokens work from the addresses they allow",
                    d.secret_name
                ),
            },
        ),
        None => ConditionState::new(
            CREDENTIAL_VERIFIED,
            false,
            "NotVerified",
            "the credentials in the Secret were not verified yet",
        ),
    }
}

/// `Rotating`: where a rotation stands, and why it waits.
fn rotating_condition(o: &Observed, result: &Result<Outcome, ResourceError>) -> ConditionState {
    let retiring = o.client.as_ref().is_some_and(|c| c.retiring_secret.is_some());
    match result {
        Ok(Outcome::Waiting(Step::WaitForRollout { target, stalled: None }, _)) => ConditionState::new(
            "Rotating",
            true,
            "WaitingForRollout",
            format!("the previous secret is retired once {target} rolled out and the grace period passed"),
        ),
        // Never cut off a consumer that still runs on the previous secret: a stalled rollout keeps
        // it working, for as long as it takes, and says so.
        Ok(Outcome::Waiting(Step::WaitForRollout { target, stalled: Some(Stall::Paused) }, _)) => ConditionState::new(
            "Rotating",
            true,
            ROLLOUT_PAUSED,
            format!(
                "{target} is paused, so its pods still use the previous secret, which keeps working until \
                     it is resumed and rolled out"
            ),
        ),
        Ok(Outcome::Waiting(Step::WaitForRollout { target, stalled: Some(Stall::DeadlineExceeded { since }) }, _)) => {
            ConditionState::new(
                "Rotating",
                true,
                ROLLOUT_STUCK,
                format!(
                    "{target} has exceeded its progress deadline (since {since}): pods of its new template are \
                     not Ready. The previous secret keeps working until it rolls out; fix or roll back the \
                     workload"
                ),
            )
        }
        Ok(Outcome::Waiting(Step::WaitForGrace { until }, _)) => ConditionState::new(
            "Rotating",
            true,
            "GracePeriod",
            format!("the previous secret keeps working until {until}"),
        ),
        _ if o.pending().is_some() => ConditionState::new(
            "Rotating",
            true,
            "NewSecretStored",
            "a new secret is stored and being handed to Medplum",
        ),
        _ if retiring => ConditionState::new(
            "Rotating",
            true,
            "RetiringPreviousSecret",
            "the previous secret still works until it is retired",
        ),
        _ => ConditionState::new("Rotating", false, "Idle", "no rotation in progress"),
    }
}

async fn apply(ca: &ClientApplication, ctx: &Context) -> Result<Action, Error> {
    let api: Api<ClientApplication> = Api::namespaced(ctx.client.clone(), &ca.namespace().unwrap_or_default());
    let mut desired_state = None;
    let mut observed = None;
    let mut events = Vec::new();
    let result: Result<Outcome, ResourceError> = async {
        let usable = usable_connection(ctx, &ca.namespace().unwrap_or_default(), &ca.spec.connection_ref).await?;
        let d = desired(ctx, ca, &usable).await?;
        let o = observe(ctx, ca, &d, &usable).await?;
        let mut r = Reconciler { ctx, ca, d, usable, events: Vec::new() };
        let mut o = o;
        let outcome = converge(&mut r, &mut o).await;
        events = std::mem::take(&mut r.events);
        desired_state = Some(r.d);
        observed = Some(o);
        outcome
    }
    .await;
    let now = Timestamp::now();
    let status = desired_status(ca, desired_state.as_ref(), observed.as_ref(), &result, now);
    apply_status(&api, &ca.name_any(), ca.status.as_ref(), &status).await.map_err(Error::Status)?;
    let reference = ca.object_ref(&());
    for event in events.iter().chain(&stall_warning(ca.status.as_ref(), &status)) {
        ctx.publish(&reference, event).await;
    }
    let before = ca.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.report_ready(KIND, ca, before, &status.conditions).await;
    let (name, namespace) = (ca.name_any(), ca.namespace().unwrap_or_default());
    ctx.metrics.set_next_rotation(&namespace, &name, status.next_rotation_time.as_ref().map(|t| t.0.as_second()));
    let waiting = matches!(result, Ok(Outcome::Waiting(Step::WaitForRollout { .. }, _)));
    let waiting_since = observed.as_ref().and_then(|o| o.issued_at()).filter(|_| waiting);
    let retiring = observed.as_ref().filter(|o| o.client.as_ref().is_some_and(|c| c.retiring_secret.is_some()));
    let grace_ends =
        retiring.zip(desired_state.as_ref()).and_then(|(o, d)| o.issued_at()?.checked_add(d.grace_period).ok());
    let seconds = |t: Option<Timestamp>| t.map(|t| t.as_second());
    ctx.metrics.set_rotation_progress(&namespace, &name, seconds(waiting_since), seconds(grace_ends));
    let rotating = retiring.is_some() || observed.as_ref().is_some_and(|o| o.pending().is_some());
    if result.is_err() && rotating {
        ctx.metrics.record_rotation_failure();
    }
    match result {
        Ok(outcome) => {
            ctx.succeeded(KIND, ca);
            let next = match (outcome, status.next_rotation_time.as_ref()) {
                (Outcome::Waiting(_, wait), _) => Some(wait),
                (Outcome::Done, Some(Time(at))) => {
                    Some(at.duration_since(now).unsigned_abs().max(Duration::from_secs(1)))
                }
                (Outcome::Done, None) => None,
            };
            // Anything due after the next resync is left to it.
            Ok(match next {
                Some(next) if next < ctx.settings.resync_interval => Action::requeue(next),
                _ => Action::await_change(),
            })
        }
        Err(e) => Ok(ctx.retry(KIND, ca, &e)),
    }
}

// ---------------------------------------------------------------------------------------------------
// Watches

/// The controller for one scope (`namespace` None: all), and a future that resolves once its cache is filled.
pub fn controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
) -> (ReconcileStream, impl Future<Output = ()> + Send + 'static) {
    let client = ctx.client.clone();
    let controller =
        super::new_controller::<ClientApplication>(&ctx, namespace, ctx.settings.client_concurrency, |_| {});
    let ready = super::cache_synced(controller.store());
    let own = ctx.clone();
    let by_label = move |secret: PartialObjectMeta<Secret>| {
        let namespace = secret.namespace().unwrap_or_default();
        let fingerprint = super::meta_fingerprint(None, Some(secret.labels()), Some(secret.annotations()), &[]);
        let version = secret.resource_version();
        if own.own_writes.is_own("Secret", &namespace, &secret.name_any(), version.as_deref(), Some(fingerprint)) {
            return None;
        }
        let name = secret.labels().get(CLIENT_LABEL).cloned();
        name.map(|n| ObjectRef::new(&n).within(&namespace))
    };
    let secrets: Api<PartialObjectMeta<Secret>> = super::scoped(&client, namespace);
    let controller = controller.watches(secrets, watcher::Config::default().labels(CLIENT_LABEL), by_label);
    let controller = super::watch_connections(super::on_policy_changes(controller, &ctx), &ctx, namespace);
    let reconcile = |obj, ctx| super::reconcile_with_cleanup(obj, ctx, apply, cleanup);
    (super::drive(controller, KIND, ctx, reconcile), ready)
}

#[cfg(test)]
mod tests;
