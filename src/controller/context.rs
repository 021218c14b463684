//! What every controller shares: the context (client, settings, metrics, backoff), the error type,
//! the ownership tag and Event helpers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use super::cached::Cached;
use super::connection::ConnectionRegistry;
use super::own_writes::OwnWrites;
use super::status::FIELD_MANAGER;
use super::{connection, events, medplum_project, status, view};
use crate::config::Settings;
use crate::crd::AccessPolicy;
use crate::failure::Failure;
use crate::metrics::Metrics;

/// Failures that end a reconcile early; they are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("still used by {count} resource(s)")]
    InUse { count: usize },
    #[error("cleanup blocked: {0}")]
    Blocked(String),
    #[error("cleanup in Medplum failed: {0}")]
    Cleanup(String),
}

/// The tag that marks a Medplum object as made by this operator for one resource: the system names
/// the cluster, the code `<Kind>/<namespace>/<name>`. Objects are found again through it after a crash.
pub fn ownership_tag(cluster_id: &str, kind: &str, namespace: &str, name: &str) -> crate::medplum::Coding {
    crate::medplum::Coding {
        system: format!("urn:medplum-operator:{cluster_id}"),
        code: format!("{kind}/{namespace}/{name}"),
    }
}

/// Medplum's IdentityProvider for one declared in a resource, with its client secret as read.
pub fn identity_provider<R>(
    idp: &crate::crd::IdentityProvider<R>,
    client_secret: secrecy::SecretString,
) -> crate::medplum::IdentityProviderResource {
    crate::medplum::IdentityProviderResource {
        authorize_url: idp.authorize_url.clone(),
        token_url: idp.token_url.clone(),
        user_info_url: idp.user_info_url.clone(),
        client_id: idp.client_id.clone(),
        client_secret: Some(client_secret),
        token_auth_method: idp
            .token_auth_method
            .map(|m| serde_json::to_value(m).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()),
        use_pkce: idp.use_pkce,
        use_subject: idp.use_subject,
    }
}

/// Test hook of debug builds: with `MEDPLUM_OPERATOR_CRASH_AT=<point>`, the process aborts at that
/// point, as a SIGKILL there would, so tests can restart it and check the sequence resumes.
/// Release builds have no hook.
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if AT.get_or_init(|| std::env::var("MEDPLUM_OPERATOR_CRASH_AT").ok()).as_deref() == Some(point) {
            eprintln!("crash point {point}: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// Consecutive failures per object, for exponential backoff with jitter.
#[derive(Default)]
pub struct FailureBackoff {
    failures: Mutex<HashMap<String, u32>>,
}

pub(crate) const BACKOFF_BASE: Duration = Duration::from_secs(2);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl FailureBackoff {
    /// The delay before the next attempt: 2 s doubling to 5 min, ±20% jitter, at least `floor`.
    pub fn next_delay(&self, key: &str, floor: Duration) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(key.to_string()).or_default();
        let exponential = BACKOFF_BASE.saturating_mul(1u32 << (*count).min(16)).min(BACKOFF_MAX);
        *count = count.saturating_add(1);
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        exponential.mul_f64(jitter).max(floor)
    }

    pub fn reset(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub connections: ConnectionRegistry,
    pub backoff: FailureBackoff,
    /// Connections one of whose users was just deleted: a connection being deleted waits for its
    /// users, and looks again at once instead of at its next backoff.
    pub users_gone: tokio::sync::broadcast::Sender<connection::ConnectionKey>,
    /// Resources whose objects changed or went in Medplum (found by a connection's view).
    pub medplum_changed: tokio::sync::broadcast::Sender<view::Owner>,
    pub own_writes: Arc<OwnWrites>,
    pub policies: PolicyStores,
    /// Namespaces where a resource granting policies was deleted or changed its spec.
    pub grants_changed: tokio::sync::broadcast::Sender<String>,
    /// What Medplum's rate limits allow, per server and per credential, shared by all connections.
    pub pacing: crate::medplum::Pacing,
    /// Which MedplumProject declares each project.
    pub project_claims: medplum_project::ProjectClaims,
    recorder: events::EventRecorder,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder: events::EventRecorder::new(client.clone(), FIELD_MANAGER, std::env::var("POD_NAME").ok()),
            client,
            settings,
            metrics,
            connections: ConnectionRegistry::default(),
            backoff: FailureBackoff::default(),
            users_gone: tokio::sync::broadcast::channel(1024).0,
            medplum_changed: tokio::sync::broadcast::channel(4096).0,
            own_writes: Arc::default(),
            policies: PolicyStores::default(),
            grants_changed: tokio::sync::broadcast::channel(1024).0,
            pacing: Default::default(),
            project_claims: Default::default(),
        }
    }

    /// Publishes a Kubernetes Event; failing to do so is logged, not fatal.
    pub async fn publish(&self, regarding: &ObjectReference, event: &Event) {
        if let Err(e) = self.recorder.publish(event, regarding).await {
            warn!(reason = %event.reason, error = %e, "could not publish event");
        }
    }

    /// After a status write: the readiness metric, and a Warning Event when Ready newly says False for a
    /// reason other than waiting (a failure that lasts stays in the status; it is not repeated as Events).
    pub(crate) async fn report_ready<K: Resource<DynamicType = ()>>(
        &self,
        kind: &'static str,
        obj: &K,
        before: &[Condition],
        after: &[Condition],
    ) {
        let Some(ready) = after.iter().find(|c| c.type_ == status::READY) else { return };
        let (name, namespace) = (obj.name_any(), obj.namespace().unwrap_or_default());
        let state = if ready.status == "True" { Ok(()) } else { Err(ready.reason.as_str()) };
        self.metrics.set_object_ready(kind, &namespace, &name, Some(state));
        let was = before.iter().find(|c| c.type_ == status::READY).map(|c| (&c.status, &c.reason));
        if ready.status == "False" && !status::is_waiting(&ready.reason) && was != Some((&ready.status, &ready.reason))
        {
            let warning = event(EventType::Warning, &ready.reason, "Reconcile", ready.message.clone());
            self.publish(&obj.object_ref(&()), &warning).await;
        }
    }

    /// When to try again after a reconcile that ended in a not-Ready status: exponential backoff (at
    /// least 60 s after a 429, Medplum's window), capped at the resync interval for what only a change
    /// can fix. Logged at warn for transient failures, info for refusals.
    pub(crate) fn retry(&self, kind: &'static str, obj: &impl Resource, failure: &impl Failure) -> Action {
        let (name, namespace) = (obj.name_any(), obj.namespace().unwrap_or_default());
        let (reason, message, transient) = (failure.reason(), failure.to_string(), failure.is_transient());
        let floor = if failure.is_rate_limited() { Duration::from_secs(60) } else { Duration::ZERO };
        let delay = self.backoff.next_delay(&format!("{kind}/{namespace}/{name}"), floor);
        let delay = if transient { delay } else { delay.min(self.settings.resync_interval.max(floor)) };
        if transient {
            warn!(kind, %name, %namespace, reason, error = message, retry_in = ?delay, "not ready");
        } else {
            tracing::info!(kind, %name, %namespace, reason, error = message, retry_in = ?delay, "refused");
        }
        Action::requeue(delay)
    }

    pub(crate) fn succeeded(&self, kind: &'static str, obj: &impl Resource) {
        self.backoff.reset(&format!("{kind}/{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()));
    }

    pub(crate) fn error_policy<K: Resource>(&self, kind: &'static str, obj: &K, error: &Error) -> Action {
        let key = format!("{kind}/{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
        let delay = self.backoff.next_delay(&key, Duration::ZERO);
        warn!(kind, name = %obj.name_any(), namespace = ?obj.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }
}

/// A Kubernetes Event about the resource being reconciled.
pub fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None }
}

/// The Event for an update made in Medplum: `Updated` when the spec changed since the last reconcile
/// (`observed_generation` behind `generation`), otherwise someone changed `target` in Medplum and the
/// update put it back: a Warning `DriftCorrected`.
pub fn update_event(observed_generation: Option<i64>, generation: Option<i64>, target: &str, what: &str) -> Event {
    if observed_generation != generation {
        event(EventType::Normal, "Updated", "Update", format!("updated {what} of {target}"))
    } else {
        event(
            EventType::Warning,
            "DriftCorrected",
            "Update",
            format!("{target} was changed in Medplum; put back {what}"),
        )
    }
}

/// The AccessPolicy controller's cache of each scope (`None`: all namespaces), which the resources
/// granting policies read, and the news of what it took in. A policy's change reconciles its grantees
/// only after the cache took it in, so a grantee never reads an older version than the one that
/// triggered it.
pub struct PolicyStores {
    stores: Mutex<HashMap<Option<String>, Store<Cached<AccessPolicy>>>>,
    /// Counts the policy events taken in, to wake grantees waiting for a policy.
    changed: tokio::sync::watch::Sender<u64>,
    /// Each policy taken in (changed, made or deleted), to reconcile its grantees.
    pub(crate) taken_in: tokio::sync::broadcast::Sender<ObjectRef<Cached<AccessPolicy>>>,
}

impl Default for PolicyStores {
    fn default() -> Self {
        Self {
            stores: Mutex::default(),
            changed: tokio::sync::watch::channel(0).0,
            taken_in: tokio::sync::broadcast::channel(4096).0,
        }
    }
}

impl PolicyStores {
    pub(crate) fn register(&self, scope: Option<&str>, store: Store<Cached<AccessPolicy>>) {
        self.stores.lock().unwrap_or_else(|p| p.into_inner()).insert(scope.map(str::to_string), store);
    }

    /// Called by the AccessPolicy controller's watch once its cache took in `policy`.
    pub(crate) fn took_in(&self, policy: &Cached<AccessPolicy>) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        let _ = self.taken_in.send(ObjectRef::from_obj(policy));
    }

    /// A receiver that wakes after the next policy event the cache took in.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The policy as the AccessPolicy controller's watch last saw it; `None` when it does not hold it
    /// (yet): then ask the API server.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<AccessPolicy>> {
        let stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        let store = stores.get(&Some(namespace.to_string())).or_else(|| stores.get(&None))?;
        store.get(&ObjectRef::new(name).within(namespace)).map(|p| Arc::new(p.resource()))
    }
}
