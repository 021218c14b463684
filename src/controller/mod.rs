//! The controllers, one file per kind, and what they share: `context` (the context, the error type,
//! backoff), `watch` (streams, resyncs, triggers between kinds), `tenancy` (what a namespace may get
//! through a connection), conditions and status writes, and reading Secrets. `run` starts them all.

pub(crate) mod access_policy;
pub(crate) mod adoption;
mod cached;
mod cleanup;
pub(crate) mod client_application;
pub(crate) mod connection;
mod context;
mod domain_configuration;
mod events;
mod failure;
mod foreign_secret;
pub(crate) mod grants;
mod medplum_project;
mod own_writes;
mod packed;
pub(crate) mod project_user;
mod secret;
mod status;
pub(crate) mod tenancy;
mod view;
mod watch;
mod workload;

use std::sync::Arc;

use futures::stream::StreamExt;
use kube::Client;
use kube::api::Api;

pub use cached::Cached;
pub use cleanup::{CLEANUP_FINALIZER, RELEASE_ANNOTATION, finalized};
use cleanup::{CleanupVia, cleanup_through, cleanup_via, connection_users, reconcile_with_cleanup};
pub use connection::{CREDENTIALS_LABEL, ConnectionRegistry};
pub use own_writes::{OwnWrites, meta_fingerprint};
pub use status::FIELD_MANAGER;

use crate::config::Settings;
use crate::crd::{ClusterMedplumConnection, MedplumConnection};
use crate::medplum::Limit;
use crate::metrics::Metrics;
use crate::server::Readiness;

pub use context::{
    Context, Error, FailureBackoff, PolicyStores, crash_point, event, identity_provider, ownership_tag, update_event,
};
pub(crate) use watch::{
    ReconcileStream, UsesConnection, cache_synced, cluster_connection_config, drive, new_controller, on_policy_changes,
    scoped, triggers, watch_connections,
};

/// Runs every controller until SIGTERM/SIGINT; marks `readiness` once all caches are filled.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>, readiness: Arc<Readiness>) {
    metrics.set_leader();
    metrics.declare_rate_limits(Limit::ALL.map(Limit::label));
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
