//! The controllers, one file per kind, and what they share: the context, the error type, backoff,
//! conditions and status writes, and reading Secrets.

pub(crate) mod access_policy;
pub(crate) mod adoption;
mod cached;
mod cleanup;
pub(crate) mod client_application;
pub(crate) mod connection;
mod domain_configuration;
mod events;
mod foreign_secret;
mod medplum_project;
mod own_writes;
mod packed;
pub(crate) mod project_user;
mod secret;
mod status;
mod view;
mod workload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::time::Instant;
use tracing::{debug, warn};

pub use cached::Cached;
pub use cleanup::{CLEANUP_FINALIZER, RELEASE_ANNOTATION, finalized};
use cleanup::{CleanupVia, cleanup_through, cleanup_via, connection_users, reconcile_with_cleanup};
pub use connection::{CREDENTIALS_LABEL, ConnectionRegistry};
pub use own_writes::{OwnWrites, meta_fingerprint};
pub use status::FIELD_MANAGER;

use crate::config::Settings;
use crate::crd::{
    AccessPolicy, ClientApplication, ClusterMedplumConnection, ConnectionKind, ConnectionRef, MedplumConnection,
    MedplumProject, ProjectUser,
};
use crate::metrics::Metrics;
use crate::server::Readiness;

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

const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

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
    async fn report_ready<K: Resource<DynamicType = ()>>(
        &self,
        kind: &'static str,
        obj: &K,
        before: &[Condition],
        after: &[Condition],
    ) {
        let Some(ready) = after.iter().find(|c| c.type_ == status::READY) else { return };
        let (name, namespace) = (obj.name_any(), obj.namespace().unwrap_or_default());
        self.metrics.set_object_ready(kind, &namespace, &name, Some(ready.status == "True"));
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
    fn retry(
        &self,
        kind: &'static str,
        obj: &impl Resource,
        reason: &str,
        message: &str,
        transient: bool,
        rate_limited: bool,
    ) -> Action {
        let (name, namespace) = (obj.name_any(), obj.namespace().unwrap_or_default());
        let floor = if rate_limited { Duration::from_secs(60) } else { Duration::ZERO };
        let delay = self.backoff.next_delay(&format!("{kind}/{namespace}/{name}"), floor);
        let delay = if transient { delay } else { delay.min(self.settings.resync_interval.max(floor)) };
        if transient {
            warn!(kind, %name, %namespace, reason, error = message, retry_in = ?delay, "not ready");
        } else {
            tracing::info!(kind, %name, %namespace, reason, error = message, retry_in = ?delay, "refused");
        }
        Action::requeue(delay)
    }

    fn succeeded(&self, kind: &'static str, obj: &impl Resource) {
        self.backoff.reset(&format!("{kind}/{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()));
    }

    fn error_policy<K: Resource>(&self, kind: &'static str, obj: &K, error: &Error) -> Action {
        let key = format!("{kind}/{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
        let delay = self.backoff.next_delay(&key, Duration::ZERO);
        warn!(kind, name = %obj.name_any(), namespace = ?obj.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }
}

type ReconcileStream = BoxStream<'static, ()>;

/// Runs `controller` with `reconcile`, timing every reconcile into the metrics and retrying failures
/// with backoff.
fn drive<K, R, Fut>(controller: Controller<K>, kind: &'static str, ctx: Arc<Context>, reconcile: R) -> ReconcileStream
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    R: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let stream = controller.shutdown_on_signal().run(
        move |obj, ctx: Arc<Context>| {
            let started = Instant::now();
            let reconciled = reconcile(obj, ctx.clone());
            async move {
                let result = reconciled.await;
                ctx.metrics.record_reconcile(kind, result.is_ok(), started.elapsed());
                result
            }
        },
        move |obj: Arc<K>, error: &Error, ctx: Arc<Context>| ctx.error_policy(kind, &*obj, error),
        ctx,
    );
    boxed(stream)
}

/// The controller of a namespaced kind in one scope (`namespace` None: all), reconciling at most
/// `concurrency` objects at a time. It reconciles on changes of the spec (generation, which also
/// moves when a deletion starts), annotations and finalizers, not on status writes (its own, above
/// all), on changes in Medplum of the objects a resource owns, and once every resync interval
/// ([`resyncs`]; a reconcile that succeeded waits for that with [`Action::await_change`]). Its cache
/// keeps objects trimmed ([`trim_cached`]) and compact ([`Cached`]).
/// `taken_in` learns of each object its cache took in (changed, made or deleted).
fn new_controller<K: UsesConnection>(
    ctx: &Context,
    namespace: Option<&str>,
    concurrency: u16,
    taken_in: impl Fn(&Cached<K>) + Send + 'static,
) -> Controller<Cached<K>> {
    use futures::TryStreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (reader, writer) = reflector::store();
    let own = ctx.own_writes.clone();
    let last_seen = Arc::new(LastSeen::default());
    let deleted = last_seen.clone();
    let changes = watcher(scoped::<Cached<K>>(&ctx.client, namespace), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(trim_cached)
        .reflect(writer)
        .inspect_ok(move |event| {
            if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) = event {
                taken_in(o);
            }
            if let watcher::Event::Delete(o) = event {
                deleted.forget(o.meta());
            }
        })
        .applied_objects()
        .try_filter(move |o| {
            let meta = o.meta();
            let fingerprint = meta_fingerprint(
                meta.generation,
                meta.labels.as_ref(),
                meta.annotations.as_ref(),
                meta.finalizers.as_deref().unwrap_or_default(),
            );
            // Recorded whoever wrote it, so that an own write's finalizer is not news afterwards.
            let changed = last_seen.changed(meta, fingerprint);
            let (namespace, name) = (o.namespace().unwrap_or_default(), o.name_any());
            let version = o.resource_version();
            let own = own.is_own(&K::kind(&()), &namespace, &name, version.as_deref(), Some(fingerprint));
            std::future::ready(changed && !own)
        });
    Controller::for_stream(changes, reader.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .reconcile_on(owners_changed::<K>(ctx, namespace.map(str::to_string)))
        .reconcile_on(resyncs(reader, ctx.settings.resync_interval))
}

/// The metadata fingerprint ([`meta_fingerprint`]: generation, labels, annotations, finalizers) each
/// cached object showed last, by a hash of its namespace, name and uid: a watch event reconciles only
/// when it changed, not on status writes. kube's predicate filter kept copies of the name, namespace
/// and uid of every object for this, about 230 bytes an object; this keeps 16.
#[derive(Default)]
struct LastSeen(Mutex<HashMap<u64, u64>>);

impl LastSeen {
    fn identity(meta: &ObjectMeta) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (&meta.namespace, &meta.name, &meta.uid).hash(&mut hasher);
        hasher.finish()
    }

    /// Records the object's `fingerprint`; whether it differs from the one recorded before (or
    /// none was).
    fn changed(&self, meta: &ObjectMeta, fingerprint: u64) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(Self::identity(meta), fingerprint) != Some(fingerprint)
    }

    fn forget(&self, meta: &ObjectMeta) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&Self::identity(meta));
    }
}

/// How old an object must be before [`resyncs`] takes it in.
const RESYNC_SETTLE: Duration = Duration::from_secs(10);

/// How many parts the cached objects are split into for [`resyncs`].
const RESYNC_SLOTS: u32 = 60;

/// Every object of `cache`, once every `interval`: a part of them (by a hash of the name) at each
/// of [`RESYNC_SLOTS`] ticks, so that resyncs are spread over the interval. One ticker per
/// controller instead of a timer per object (kube's requeue), which held about 700 bytes an object.
/// An object younger than [`RESYNC_SETTLE`] (or `interval`, if shorter) was reconciled when it was
/// made and is left to a later round, so that a new object is not reconciled a second time at once.
fn resyncs<K>(cache: Store<K>, interval: Duration) -> impl futures::Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let tick = (interval / RESYNC_SLOTS).max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold((ticks, 0u32), move |(mut ticks, slot)| {
        let cache = cache.clone();
        async move {
            ticks.tick().await;
            let settle = jiff::SignedDuration::try_from(interval.min(RESYNC_SETTLE)).unwrap_or_default();
            let settled = jiff::Timestamp::now() - settle;
            let due: Vec<ObjectRef<K>> = cache
                .state()
                .iter()
                .filter(|o| o.meta().creation_timestamp.as_ref().is_none_or(|t| t.0 <= settled))
                .map(|o| ObjectRef::from_obj(&**o))
                .filter(|r| resync_slot(r.namespace.as_deref().unwrap_or_default(), &r.name) == slot)
                .collect();
            Some((futures::stream::iter(due), (ticks, (slot + 1) % RESYNC_SLOTS)))
        }
    })
    .flatten()
}

/// The tick of [`resyncs`] that resyncs an object: stable for its name, spread evenly.
fn resync_slot(namespace: &str, name: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (namespace, name).hash(&mut hasher);
    (hasher.finish() % u64::from(RESYNC_SLOTS)) as u32
}

/// What the operator never reads is not kept in its caches: `managedFields`, and the copy of the
/// whole object that client-side `kubectl apply` (and tools built on it) keep in an annotation.
fn trim_cached<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The resources of kind `K` (in `namespace`, if given) whose objects changed or went in Medplum.
fn owners_changed<K: UsesConnection>(
    ctx: &Context,
    namespace: Option<String>,
) -> impl futures::Stream<Item = ObjectRef<Cached<K>>> + Send + 'static {
    triggers(&ctx.medplum_changed, move |owner: view::Owner| {
        let ours = owner.kind == K::kind(&()) && namespace.as_ref().is_none_or(|ns| *ns == owner.namespace);
        ours.then(|| ObjectRef::new(&owner.name).within(&owner.namespace))
    })
}

/// The objects `pick` chooses for each item `sender` broadcasts, as reconcile triggers. A receiver
/// that fell behind skips what it missed: those objects are reconciled at their next resync anyway.
fn triggers<T, K, I>(
    sender: &tokio::sync::broadcast::Sender<T>,
    pick: impl Fn(T) -> I + Send + 'static,
) -> impl futures::Stream<Item = ObjectRef<K>> + Send + 'static
where
    T: Clone + Send + 'static,
    K: kube::runtime::reflector::Lookup + Send + 'static,
    K::DynamicType: Send,
    I: IntoIterator<Item = ObjectRef<K>>,
    I::IntoIter: Send + 'static,
{
    let received = futures::stream::unfold(sender.subscribe(), |mut received| async move {
        loop {
            match received.recv().await {
                Ok(item) => return Some((item, received)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    received.flat_map(move |item| futures::stream::iter(pick(item)))
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

/// A namespaced resource reconciled through a connection.
pub trait UsesConnection:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn connection_ref(&self) -> &ConnectionRef;
    /// The names of the AccessPolicies of its namespace the resource grants (`spec.access[].policyRef`,
    /// a project's registration policy); `None` for kinds that grant none.
    fn granted(&self) -> Option<Vec<&str>>;
    fn observed_generation(&self) -> Option<i64>;
}

impl UsesConnection for ClientApplication {
    fn connection_ref(&self) -> &ConnectionRef {
        &self.spec.connection_ref
    }
    fn granted(&self) -> Option<Vec<&str>> {
        Some(self.spec.access.iter().map(|g| g.policy_ref.name.as_str()).collect())
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref()?.observed_generation
    }
}

impl UsesConnection for AccessPolicy {
    fn connection_ref(&self) -> &ConnectionRef {
        &self.spec.connection_ref
    }
    fn granted(&self) -> Option<Vec<&str>> {
        None
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref()?.observed_generation
    }
}

impl UsesConnection for MedplumProject {
    fn connection_ref(&self) -> &ConnectionRef {
        &self.spec.connection_ref
    }
    fn granted(&self) -> Option<Vec<&str>> {
        let registration = self.spec.patient_registration.as_ref();
        Some(registration.and_then(|r| r.access_policy_ref.as_ref()).map(|p| p.name.as_str()).into_iter().collect())
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref()?.observed_generation
    }
}

impl UsesConnection for ProjectUser {
    fn connection_ref(&self) -> &ConnectionRef {
        &self.spec.connection_ref
    }
    fn granted(&self) -> Option<Vec<&str>> {
        Some(self.spec.access.iter().map(|g| g.policy_ref.name.as_str()).collect())
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref()?.observed_generation
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
    taken_in: tokio::sync::broadcast::Sender<ObjectRef<Cached<AccessPolicy>>>,
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
    fn register(&self, scope: Option<&str>, store: Store<Cached<AccessPolicy>>) {
        self.stores.lock().unwrap_or_else(|p| p.into_inner()).insert(scope.map(str::to_string), store);
    }

    /// Called by the AccessPolicy controller's watch once its cache took in `policy`.
    fn took_in(&self, policy: &Cached<AccessPolicy>) {
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

/// Reconciles the resources that grant a policy whenever the AccessPolicy controller's cache took in
/// a change of it (a policy appearing in Medplum above all).
fn on_policy_changes<K: UsesConnection>(controller: Controller<Cached<K>>, ctx: &Context) -> Controller<Cached<K>> {
    let store = controller.store();
    controller.reconcile_on(triggers(&ctx.policies.taken_in, move |policy: ObjectRef<Cached<AccessPolicy>>| {
        store
            .state()
            .iter()
            .filter(|o| o.namespace() == policy.namespace && o.grants(&policy.name))
            .map(|o| ObjectRef::from_obj(&**o))
            .collect::<Vec<_>>()
    }))
}

/// Watches both connection kinds, so that a connection's change (becoming Ready, above all)
/// reconciles at once the resources that use it.
fn watch_connections<K: UsesConnection>(
    controller: Controller<Cached<K>>,
    ctx: &Context,
    namespace: Option<&str>,
) -> Controller<Cached<K>> {
    fn users<K: UsesConnection>(
        store: &Store<Cached<K>>,
        key: &connection::ConnectionKey,
    ) -> Vec<ObjectRef<Cached<K>>> {
        store
            .state()
            .iter()
            .filter(|o| connection::ConnectionKey::of(&o.namespace().unwrap_or_default(), o.connection_ref()) == *key)
            .map(|o| ObjectRef::from_obj(&**o))
            .collect()
    }
    let (local, cluster) = (controller.store(), controller.store());
    controller
        .watches(
            scoped::<MedplumConnection>(&ctx.client, namespace),
            kube::runtime::watcher::Config::default(),
            move |c| {
                users(
                    &local,
                    &connection::ConnectionKey {
                        kind: ConnectionKind::MedplumConnection,
                        namespace: c.namespace(),
                        name: c.name_any(),
                    },
                )
            },
        )
        .watches(
            Api::<ClusterMedplumConnection>::all(ctx.client.clone()),
            cluster_connection_config(&ctx.settings.cluster_connection_selector),
            move |c| {
                users(
                    &cluster,
                    &connection::ConnectionKey {
                        kind: ConnectionKind::ClusterMedplumConnection,
                        namespace: None,
                        name: c.name_any(),
                    },
                )
            },
        )
}

/// The API for a namespaced kind in one scope (`namespace` None: all namespaces).
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Watch settings for ClusterMedplumConnections: those this instance serves.
fn cluster_connection_config(selector: &str) -> kube::runtime::watcher::Config {
    let config = kube::runtime::watcher::Config::default();
    if selector.is_empty() { config } else { config.labels(selector) }
}

/// Resolves once `store` holds the first full list from the API server.
async fn cache_synced<K>(store: kube::runtime::reflector::Store<K>)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    // kube's readiness signal wakes only the last of several concurrent waiters (the controller's own
    // runner waits too), so ask again every 100 ms; a finished signal answers at once.
    while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await.is_err() {}
}

fn boxed<S, T, E>(stream: S) -> ReconcileStream
where
    S: futures::Stream<Item = Result<T, E>> + Send + 'static,
    T: std::fmt::Debug,
    E: std::fmt::Display,
{
    stream
        .map(|result| match result {
            Ok(done) => debug!(?done, "reconciled"),
            Err(e) => debug!(error = %e, "controller event"),
        })
        .boxed()
}

/// Runs every controller until SIGTERM/SIGINT; marks `readiness` once all caches are filled.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>, readiness: Arc<Readiness>) {
    let ctx = Arc::new(Context::new(client.clone(), settings.clone(), metrics));
    let mut streams = Vec::new();
    let mut ready = Vec::new();
    let namespaced = !settings.watch_namespaces.is_empty();
    let scopes: Vec<Option<&str>> =
        if namespaced { settings.watch_namespaces.iter().map(|ns| Some(ns.as_str())).collect() } else { vec![None] };
    for scope in scopes {
        let (connections, secrets) = match scope {
            Some(ns) => (Api::<MedplumConnection>::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let (stream, synced) = connection::controller(ctx.clone(), connections, "", Some(secrets));
        streams.push(stream);
        ready.push(futures::FutureExt::boxed(synced));
        let (stream, synced) = client_application::controller(ctx.clone(), scope);
        streams.push(stream);
        ready.push(futures::FutureExt::boxed(synced));
        let (stream, synced) = access_policy::controller(ctx.clone(), scope);
        streams.push(stream);
        ready.push(futures::FutureExt::boxed(synced));
        let (stream, synced) = project_user::controller(ctx.clone(), scope);
        streams.push(stream);
        ready.push(futures::FutureExt::boxed(synced));
        let (stream, synced) = medplum_project::controller(ctx.clone(), scope);
        streams.push(stream);
        ready.push(futures::FutureExt::boxed(synced));
    }
    // Credentials of cluster connections live in namespaces of the platform team's choosing, which a
    // namespace-restricted install cannot watch; there they are re-read at every resync.
    let cluster_secrets = (!namespaced).then(|| Api::all(client.clone()));
    let (stream, synced) = domain_configuration::controller(ctx.clone());
    streams.push(stream);
    ready.push(futures::FutureExt::boxed(synced));
    let (stream, synced) = connection::controller(
        ctx.clone(),
        Api::<ClusterMedplumConnection>::all(client.clone()),
        &settings.cluster_connection_selector,
        cluster_secrets,
    );
    streams.push(stream);
    ready.push(futures::FutureExt::boxed(synced));

    tokio::spawn(async move {
        futures::future::join_all(ready).await;
        readiness.set_ready();
        tracing::info!("caches synced, ready");
    });
    futures::stream::select_all(streams).for_each(|()| async {}).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_slots_are_stable_and_spread_evenly() {
        let mut per_slot = vec![0u32; RESYNC_SLOTS as usize];
        for i in 0..6_000 {
            let slot = resync_slot("team-a", &format!("client-{i:05}"));
            assert_eq!(slot, resync_slot("team-a", &format!("client-{i:05}")));
            per_slot[slot as usize] += 1;
        }
        // 100 an interval on average; a fair hash keeps every slot well within half of that.
        assert!(per_slot.iter().all(|n| (50..150).contains(n)), "{per_slot:?}");
    }

    #[test]
    fn only_a_changed_fingerprint_is_news() {
        let seen = LastSeen::default();
        let meta = |uid: &str| ObjectMeta {
            name: Some("x".into()),
            namespace: Some("team-a".into()),
            uid: Some(uid.into()),
            ..Default::default()
        };
        assert!(seen.changed(&meta("u1"), 1), "first seen");
        assert!(!seen.changed(&meta("u1"), 1), "a status write shows the same metadata");
        assert!(seen.changed(&meta("u1"), 2));
        assert!(seen.changed(&meta("u2"), 2), "made again under the same name");
        seen.forget(&meta("u2"));
        assert!(seen.changed(&meta("u2"), 2), "forgotten when deleted");
    }
}
