//! Watch plumbing: the controllers' streams, resyncs, the triggers between kinds (connections,
//! policies, Secrets) and which connection each kind uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::time::Instant;
use tracing::debug;

use super::cached::Cached;
use super::context::{Context, Error};
use super::own_writes::meta_fingerprint;
use super::{connection, view};
use crate::crd::{
    AccessPolicy, ClientApplication, ClusterMedplumConnection, ConnectionKind, ConnectionRef, ConnectionStatus,
    MedplumConnection, MedplumProject, ProjectUser,
};

pub(crate) type ReconcileStream = BoxStream<'static, ()>;

/// Runs `controller` with `reconcile`, timing every reconcile into the metrics and retrying failures
/// with backoff.
pub(crate) fn drive<K, R, Fut>(
    controller: Controller<K>,
    kind: &'static str,
    ctx: Arc<Context>,
    reconcile: R,
) -> ReconcileStream
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
pub(crate) fn new_controller<K: UsesConnection>(
    ctx: &Context,
    namespace: Option<&str>,
    concurrency: u16,
    taken_in: impl Fn(&Cached<K>) + Send + 'static,
) -> Controller<Cached<K>> {
    use futures::TryStreamExt;
    use kube::runtime::reflector;
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
pub(crate) struct LastSeen(Mutex<HashMap<u64, u64>>);

impl LastSeen {
    pub(crate) fn identity(meta: &ObjectMeta) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (&meta.namespace, &meta.name, &meta.uid).hash(&mut hasher);
        hasher.finish()
    }

    /// Records the object's `fingerprint`; whether it differs from the one recorded before (or
    /// none was).
    pub(crate) fn changed(&self, meta: &ObjectMeta, fingerprint: u64) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(Self::identity(meta), fingerprint) != Some(fingerprint)
    }

    pub(crate) fn forget(&self, meta: &ObjectMeta) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&Self::identity(meta));
    }
}

/// How old an object must be before [`resyncs`] takes it in.
pub(crate) const RESYNC_SETTLE: Duration = Duration::from_secs(10);

/// How many parts the cached objects are split into for [`resyncs`].
pub(crate) const RESYNC_SLOTS: u32 = 60;

/// Every object of `cache`, once every `interval`: a part of them (by a hash of the name) at each
/// of [`RESYNC_SLOTS`] ticks, so that resyncs are spread over the interval. One ticker per
/// controller instead of a timer per object (kube's requeue), which held about 700 bytes an object.
/// An object younger than [`RESYNC_SETTLE`] (or `interval`, if shorter) was reconciled when it was
/// made and is left to a later round, so that a new object is not reconciled a second time at once.
pub(crate) fn resyncs<K>(
    cache: Store<K>,
    interval: Duration,
) -> impl futures::Stream<Item = ObjectRef<K>> + Send + 'static
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
pub(crate) fn resync_slot(namespace: &str, name: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (namespace, name).hash(&mut hasher);
    (hasher.finish() % u64::from(RESYNC_SLOTS)) as u32
}

/// What the operator never reads is not kept in its caches: `managedFields`, and the copy of the
/// whole object that client-side `kubectl apply` (and tools built on it) keep in an annotation.
pub(crate) fn trim_cached<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The resources of kind `K` (in `namespace`, if given) whose objects changed or went in Medplum.
pub(crate) fn owners_changed<K: UsesConnection>(
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
pub(crate) fn triggers<T, K, I>(
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
    /// The dictionary the controller's cache packs objects of this kind with (see `Cached`).
    fn dictionary() -> &'static [u8];
}

/// `UsesConnection` for a kind whose spec has `connectionRef` and whose status `observedGeneration`;
/// `$granted` reads the policies it grants from `$spec`. Its cache's dictionary is made once, from
/// the kind's skeleton.
macro_rules! uses_connection {
    ($kind:ty, |$spec:ident| $granted:expr) => {
        impl UsesConnection for $kind {
            fn dictionary() -> &'static [u8] {
                static DICTIONARY: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
                DICTIONARY.get_or_init(super::cached::dictionary::<$kind>)
            }
            fn connection_ref(&self) -> &ConnectionRef {
                &self.spec.connection_ref
            }
            fn granted(&self) -> Option<Vec<&str>> {
                let $spec = &self.spec;
                $granted
            }
            fn observed_generation(&self) -> Option<i64> {
                self.status.as_ref()?.observed_generation
            }
        }
    };
}

uses_connection!(ClientApplication, |spec| Some(spec.access.iter().map(|g| g.policy_ref.name.as_str()).collect()));
uses_connection!(ProjectUser, |spec| Some(spec.access.iter().map(|g| g.policy_ref.name.as_str()).collect()));
uses_connection!(AccessPolicy, |_spec| None);
uses_connection!(MedplumProject, |spec| {
    let registration = spec.patient_registration.as_ref();
    Some(registration.and_then(|r| r.access_policy_ref.as_ref()).map(|p| p.name.as_str()).into_iter().collect())
});

/// Reconciles the resources that grant a policy whenever the AccessPolicy controller's cache took in
/// a change of it (a policy appearing in Medplum above all).
pub(crate) fn on_policy_changes<K: UsesConnection>(
    controller: Controller<Cached<K>>,
    ctx: &Context,
) -> Controller<Cached<K>> {
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
pub(crate) fn watch_connections<K: UsesConnection>(
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
    let locals = watcher(scoped::<MedplumConnection>(&ctx.client, namespace), Default::default())
        .touched_objects()
        .predicate_filter(|c: &MedplumConnection| dependents_key(c, c.status.as_ref()), Default::default());
    let clusters = watcher(
        Api::<ClusterMedplumConnection>::all(ctx.client.clone()),
        cluster_connection_config(&ctx.settings.cluster_connection_selector),
    )
    .touched_objects()
    .predicate_filter(|c: &ClusterMedplumConnection| dependents_key(c, c.status.as_ref()), Default::default());
    controller
        .watches_stream(locals, move |c| {
            let kind = ConnectionKind::MedplumConnection;
            users(&local, &connection::ConnectionKey { kind, namespace: c.namespace(), name: c.name_any() })
        })
        .watches_stream(clusters, move |c| {
            let kind = ConnectionKind::ClusterMedplumConnection;
            users(&cluster, &connection::ConnectionKey { kind, namespace: None, name: c.name_any() })
        })
}

/// What the resources using a connection act on: its spec, deletion, readiness, project and
/// credential, and the rotate-clients request it took in (set in the registry before the status
/// says so). Status writes about anything else, such as a rotation's progress, reconcile none of them:
/// each would reconcile every ClientApplication of the connection.
fn dependents_key(c: &impl Resource, status: Option<&ConnectionStatus>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let meta = c.meta();
    (meta.generation, meta.deletion_timestamp.is_some()).hash(&mut hasher);
    if let Some(s) = status {
        let ready = s.conditions.iter().find(|c| c.type_ == super::status::READY);
        ready.map(|c| (&c.status, &c.reason, c.observed_generation)).hash(&mut hasher);
        (&s.project_id, &s.client_id).hash(&mut hasher);
        s.client_rotation.as_ref().map(|r| &r.request).hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// The API for a namespaced kind in one scope (`namespace` None: all namespaces).
pub(crate) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Watch settings for ClusterMedplumConnections: those this instance serves.
pub(crate) fn cluster_connection_config(selector: &str) -> kube::runtime::watcher::Config {
    let config = kube::runtime::watcher::Config::default();
    if selector.is_empty() { config } else { config.labels(selector) }
}

/// Resolves once `store` holds the first full list from the API server.
pub(crate) async fn cache_synced<K>(store: kube::runtime::reflector::Store<K>)
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    // kube's readiness signal wakes only the last of several concurrent waiters (the controller's own
    // runner waits too), so ask again every 100 ms; a finished signal answers at once.
    while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await.is_err() {}
}

pub(crate) fn boxed<S, T, E>(stream: S) -> ReconcileStream
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
