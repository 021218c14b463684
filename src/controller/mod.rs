//! The controllers, one file per kind, and what they share: the context, the error type, backoff,
//! conditions and status writes, and reading Secrets.

mod connection;
mod secret;
mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, warn};

pub use connection::{CREDENTIALS_LABEL, ConnectionRegistry};
pub use status::FIELD_MANAGER;

use crate::config::Settings;
use crate::crd::{ClusterMedplumConnection, MedplumConnection};
use crate::metrics::Metrics;
use crate::server::Readiness;

/// Failures that end a reconcile early; they are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
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
    recorder: Recorder,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            connections: ConnectionRegistry::default(),
            backoff: FailureBackoff::default(),
        }
    }

    /// Publishes a Kubernetes Event; failing to do so is logged, not fatal.
    pub async fn publish(&self, regarding: &ObjectReference, event: &Event) {
        if let Err(e) = self.recorder.publish(event, regarding).await {
            warn!(reason = %event.reason, error = %e, "could not publish event");
        }
    }

    fn error_policy<K: Resource>(&self, kind: &'static str, obj: &K, error: &Error) -> Action {
        let key = format!("{kind}/{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
        let delay = self.backoff.next_delay(&key, Duration::ZERO);
        warn!(kind, name = %obj.name_any(), namespace = ?obj.namespace(), error = %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }
}

type ReconcileStream = BoxStream<'static, ()>;

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
    }
    // Credentials of cluster connections live in namespaces of the platform team's choosing, which a
    // namespace-restricted install cannot watch; there they are re-read at every resync.
    let cluster_secrets = (!namespaced).then(|| Api::all(client.clone()));
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
