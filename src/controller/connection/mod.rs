//! `MedplumConnection` and `ClusterMedplumConnection`: read the credential, obtain a token, check who
//! the credential is (`/auth/me`) and report it. Verified connections are kept in a registry with their
//! Medplum client, so its token cache outlives a reconcile.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::secret::CaSource;
use super::status::{ConditionState, READY, apply_status, is_ready, set_condition};
use super::tenancy::Admission;
use super::view::MedplumView;
use super::{Context, Error, ReconcileStream};
use crate::crd::{
    ClusterMedplumConnection, ConnectionKind, ConnectionLimits, ConnectionStatus, CredentialRotationSpec, KeySelector,
    MedplumConnection, ROTATE_CLIENTS_ANNOTATION,
};
use crate::failure::Failure;
use crate::medplum::MedplumClient;

mod identity;
mod registry;
mod rotate_clients;
mod rotation;
mod usable;

pub use identity::{ConnectionError, Verified, desired_status, identify, read_credentials};
pub use registry::ConnectionRegistry;
use registry::fingerprint;
pub use usable::{UsableConnection, UseError, namespace_labels, usable_cluster_connection, usable_connection};

/// Label that opts a connection's credentials Secret into a metadata-only watch, so that edits to it
/// are picked up at once instead of at the next periodic verification.
pub const CREDENTIALS_LABEL: &str = "medplum.com/connection-credentials";

/// Identifies a connection object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub kind: ConnectionKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl ConnectionKey {
    /// The connection a resource in `namespace` refers to.
    pub fn of(namespace: &str, reference: &crate::crd::ConnectionRef) -> Self {
        let namespace = match reference.kind {
            ConnectionKind::MedplumConnection => Some(namespace.to_string()),
            ConnectionKind::ClusterMedplumConnection => None,
        };
        Self { kind: reference.kind, namespace, name: reference.name.clone() }
    }

    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind)
    }
}

/// Where a connection's inputs live, with every reference resolved to a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionTarget {
    pub base_url: String,
    pub project_id: Option<String>,
    pub super_admin_credential: bool,
    pub credentials_namespace: String,
    pub credentials_name: String,
    pub client_id_key: String,
    pub client_secret_key: String,
    pub ca: Option<CaSource>,
}

/// What both connection kinds offer the controller.
pub trait ConnectionObject:
    Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    const KIND: ConnectionKind;
    /// The API for objects of this kind in `namespace` (ignored for cluster-scoped kinds).
    fn api(client: kube::Client, namespace: Option<&str>) -> Api<Self>;
    fn target(&self) -> ConnectionTarget;
    fn connection_status(&self) -> Option<&ConnectionStatus>;
    fn limits(&self) -> &ConnectionLimits;
    /// Which namespaces' resources may use it.
    fn admission(&self) -> Admission;
    /// The rotation of its own credential, if it opted in.
    fn credential_rotation(&self) -> Option<&CredentialRotationSpec>;

    fn key(&self) -> ConnectionKey {
        ConnectionKey { kind: Self::KIND, namespace: self.namespace(), name: self.name_any() }
    }
}

/// Where a CA bundle is read from: a Secret's key if named, else a ConfigMap's.
fn ca_source(namespace: &str, secret: &Option<KeySelector>, config_map: &Option<KeySelector>) -> Option<CaSource> {
    let namespace = namespace.to_string();
    match (secret, config_map) {
        (Some(s), _) => Some(CaSource::Secret { namespace, name: s.name.clone(), key: s.key.clone() }),
        (None, Some(c)) => Some(CaSource::ConfigMap { namespace, name: c.name.clone(), key: c.key.clone() }),
        (None, None) => None,
    }
}

impl ConnectionObject for MedplumConnection {
    const KIND: ConnectionKind = ConnectionKind::MedplumConnection;

    fn api(client: kube::Client, namespace: Option<&str>) -> Api<Self> {
        match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        }
    }

    fn target(&self) -> ConnectionTarget {
        let namespace = self.namespace().unwrap_or_default();
        let creds = &self.spec.credentials_secret_ref;
        let ca = self.spec.ca_bundle.as_ref().and_then(|ca| ca_source(&namespace, &ca.secret_ref, &ca.config_map_ref));
        ConnectionTarget {
            base_url: self.spec.base_url.clone(),
            project_id: self.spec.project_id.clone(),
            super_admin_credential: self.spec.super_admin_credential,
            credentials_namespace: namespace,
            credentials_name: creds.name.clone(),
            client_id_key: creds.client_id_key.clone(),
            client_secret_key: creds.client_secret_key.clone(),
            ca,
        }
    }

    fn connection_status(&self) -> Option<&ConnectionStatus> {
        self.status.as_ref()
    }

    fn limits(&self) -> &ConnectionLimits {
        &self.spec.limits
    }

    fn admission(&self) -> Admission {
        Admission::Namespace(self.namespace().unwrap_or_default())
    }

    fn credential_rotation(&self) -> Option<&CredentialRotationSpec> {
        self.spec.credential_rotation.as_ref()
    }
}

impl ConnectionObject for ClusterMedplumConnection {
    const KIND: ConnectionKind = ConnectionKind::ClusterMedplumConnection;

    fn api(client: kube::Client, _namespace: Option<&str>) -> Api<Self> {
        Api::all(client)
    }

    fn target(&self) -> ConnectionTarget {
        let creds = &self.spec.credentials_secret_ref;
        let ca =
            self.spec.ca_bundle.as_ref().and_then(|ca| ca_source(&ca.namespace, &ca.secret_ref, &ca.config_map_ref));
        ConnectionTarget {
            base_url: self.spec.base_url.clone(),
            project_id: self.spec.project_id.clone(),
            super_admin_credential: self.spec.super_admin_credential,
            credentials_namespace: creds.namespace.clone(),
            credentials_name: creds.name.clone(),
            client_id_key: creds.client_id_key.clone(),
            client_secret_key: creds.client_secret_key.clone(),
            ca,
        }
    }

    fn connection_status(&self) -> Option<&ConnectionStatus> {
        self.status.as_ref()
    }

    fn limits(&self) -> &ConnectionLimits {
        &self.spec.limits
    }

    fn admission(&self) -> Admission {
        Admission::Namespaces(self.spec.allowed_namespaces.clone())
    }

    fn credential_rotation(&self) -> Option<&CredentialRotationSpec> {
        self.spec.credential_rotation.as_ref()
    }
}

async fn verify(ctx: &Context, key: &ConnectionKey, target: &ConnectionTarget) -> Result<Verified, ConnectionError> {
    let (credentials, ca) = read_credentials(&ctx.client, target).await?;
    let print = fingerprint(target, &credentials, ca.as_deref());
    let client = ctx.connections.client(key, print, || {
        MedplumClient::new(
            &target.base_url,
            credentials,
            ca.as_deref(),
            ctx.settings.medplum_timeout,
            &ctx.pacing,
            ctx.metrics.clone(),
        )
    })?;
    identify(client, target).await
}

fn kind_name(kind: ConnectionKind) -> &'static str {
    match kind {
        ConnectionKind::MedplumConnection => "MedplumConnection",
        ConnectionKind::ClusterMedplumConnection => "ClusterMedplumConnection",
    }
}

/// A new view of the verified project, and the task that keeps it current.
fn start_view(ctx: &Context, verified: &Verified) -> (Arc<MedplumView>, tokio::task::AbortHandle) {
    let settings = &ctx.settings;
    let system = super::ownership_tag(&settings.cluster_id, "", "", "").system;
    // Twice the resync interval: one missed sweep is forgiven, two are not.
    let view = Arc::new(MedplumView::new(system, verified.project_id.clone(), settings.resync_interval * 2));
    let task = tokio::spawn(super::view::keep_current(
        view.clone(),
        verified.client.clone(),
        ctx.medplum_changed.clone(),
        settings.resync_interval,
        settings.drift_poll_interval,
    ));
    (view, task.abort_handle())
}

/// Held on every connection while resources still use it, so their own cleanups can reach Medplum.
pub const FINALIZER: &str = "medplum.com/connection-in-use";

async fn reconcile<K: ConnectionObject>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api = K::api(ctx.client.clone(), obj.namespace().as_deref());
    super::finalized(
        &ctx,
        &api,
        FINALIZER,
        obj,
        async |o| apply(&*o, &ctx, &api).await,
        async |o| release(&*o, &ctx, &api).await,
    )
    .await
}

async fn apply<K: ConnectionObject>(cached: &K, ctx: &Context, api: &Api<K>) -> Result<Action, Error> {
    // The cache can trail this controller's own last status write (a rotation step is looked at
    // again 1 s later), and rotation state read from a stale status (the request answered, when the
    // rotation of every client began) would be acted on twice. One read per connection reconcile.
    let Some(fresh) = api.get_opt(&cached.name_any()).await.map_err(Error::Kube)? else {
        return Ok(Action::await_change());
    };
    let obj = &fresh;
    let kind = kind_name(K::KIND);
    let key = obj.key();
    let result = verify(ctx, &key, &obj.target()).await;
    let usable = match &result {
        Ok(v) => ctx
            .connections
            .view(&key, &v.project_id, || start_view(ctx, v))
            .map(|view| UsableConnection {
                client: v.client.clone(),
                view,
                project_id: v.project_id.clone(),
                super_admin: v.super_admin,
                limits: obj.limits().clone(),
                admission: obj.admission(),
                rotate_clients_request: obj.annotations().get(ROTATE_CLIENTS_ANNOTATION).cloned(),
            })
            .ok_or_else(|| "its Medplum client was replaced meanwhile".to_string()),
        Err(e) => Err(e.to_string()),
    };
    ctx.connections.set_usable(&key, usable);
    let current = obj.connection_status();
    let now = Timestamp::now();
    let mut desired = desired_status(current, &result, obj.meta().generation, now);
    let (rotation_due, clients_due) = match &result {
        Ok(verified) => (
            rotation::rotate(ctx, obj, verified, &mut desired, now).await,
            rotate_clients::report(ctx, obj, &mut desired).await,
        ),
        Err(_) => (None, None),
    };
    write_status(ctx, obj, api, &desired, "Verify").await?;
    ctx.metrics.set_connection_ready(kind, key.namespace.as_deref().unwrap_or_default(), &key.name, result.is_ok());
    let state = result.as_ref().map(|_| ()).map_err(|e| e.reason());
    ctx.metrics.set_object_ready(kind, key.namespace.as_deref().unwrap_or_default(), &key.name, Some(state));
    let backoff_key = format!("{kind}/{}/{}", key.namespace.as_deref().unwrap_or_default(), key.name);
    match result {
        Ok(_) => {
            ctx.backoff.reset(&backoff_key);
            let next = [rotation_due, clients_due].into_iter().flatten().fold(ctx.settings.resync_interval, Ord::min);
            Ok(Action::requeue(next))
        }
        Err(e) => {
            // A rate limit window is 60 s in Medplum; retrying sooner only burns the budget. Unlike
            // other resources, transient failures are capped at the resync interval too: everything
            // using the connection waits for it to recover.
            let floor = if e.is_rate_limited() { std::time::Duration::from_secs(60) } else { Default::default() };
            let delay = ctx.backoff.next_delay(&backoff_key, floor).min(ctx.settings.resync_interval.max(floor));
            let namespace = key.namespace.as_deref().unwrap_or_default();
            if e.is_transient() {
                warn!(kind, name = %key.name, namespace, reason = e.reason(), error = %e, retry_in = ?delay, "connection not ready");
            } else {
                info!(kind, name = %key.name, namespace, reason = e.reason(), error = %e, retry_in = ?delay, "connection refused");
            }
            Ok(Action::requeue(delay))
        }
    }
}

/// Writes the status if it changed, with an Event when readiness changed.
async fn write_status<K: ConnectionObject>(
    ctx: &Context,
    obj: &K,
    api: &Api<K>,
    desired: &ConnectionStatus,
    action: &str,
) -> Result<(), Error> {
    let current = obj.connection_status();
    let was = current
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .map(|c| (c.status.clone(), c.reason.clone()));
    if apply_status(api, &obj.name_any(), current, desired).await.map_err(Error::Status)? {
        let ready = desired.conditions.iter().find(|c| c.type_ == READY).expect("Ready is always set");
        if was.as_ref() != Some(&(ready.status.clone(), ready.reason.clone())) {
            let event = Event {
                type_: if is_ready(&desired.conditions) { EventType::Normal } else { EventType::Warning },
                reason: ready.reason.clone(),
                note: Some(ready.message.clone()),
                action: action.into(),
                secondary: None,
            };
            ctx.publish(&obj.object_ref(&()), &event).await;
        }
    }
    Ok(())
}

/// Deletion: the finalizer stays while resources still use the connection.
async fn release<K: ConnectionObject>(obj: &K, ctx: &Context, api: &Api<K>) -> Result<Action, Error> {
    let key = obj.key();
    let users = super::connection_users(ctx, &key).await.map_err(Error::Kube)?;
    if users.is_empty() {
        ctx.connections.remove(&key);
        let namespace = key.namespace.as_deref().unwrap_or_default();
        ctx.metrics.forget_connection(kind_name(K::KIND), namespace, &key.name);
        ctx.metrics.set_object_ready(kind_name(K::KIND), namespace, &key.name, None);
        return Ok(Action::await_change());
    }
    let shown: Vec<&str> = users.iter().take(5).map(String::as_str).collect();
    let more = users.len().saturating_sub(shown.len());
    let message = format!(
        "waiting for {} resource(s) using this connection to be deleted: {}{}",
        users.len(),
        shown.join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    );
    let mut desired = obj.connection_status().cloned().unwrap_or_default();
    desired.conditions = set_condition(
        &desired.conditions,
        ConditionState::new(READY, false, "InUse", message),
        obj.meta().generation,
        Timestamp::now(),
    );
    write_status(ctx, obj, api, &desired, "Delete").await?;
    Err(Error::InUse { count: users.len() })
}

/// Connections whose credentials Secret (or CA Secret) is `secret`.
fn connections_using<K: ConnectionObject>(store: &Store<K>, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<K>> {
    let (namespace, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
    store
        .state()
        .iter()
        .filter(|c| {
            let t = c.target();
            let ca_uses =
                matches!(&t.ca, Some(CaSource::Secret { namespace: n, name: s, .. }) if *n == namespace && *s == name);
            (t.credentials_namespace == namespace && t.credentials_name == name) || ca_uses
        })
        .map(|c| ObjectRef::from_obj(&**c))
        .collect()
}

/// A controller for one connection kind over `objects`, and a future that resolves once its cache is
/// filled. Labelled credentials Secrets are watched (metadata only) through `secrets`, if given.
pub fn controller<K: ConnectionObject>(
    ctx: Arc<Context>,
    objects: Api<K>,
    label_selector: &str,
    secrets: Option<Api<PartialObjectMeta<Secret>>>,
) -> (ReconcileStream, impl Future<Output = ()> + Send + 'static) {
    let mut config = watcher::Config::default().any_semantic();
    if !label_selector.is_empty() {
        config = config.labels(label_selector);
    }
    let controller = Controller::new(objects, config)
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.settings.connection_concurrency));
    let store = controller.store();
    let ready = super::cache_synced(store.clone());
    let controller = match secrets {
        Some(secrets) => {
            let mapper_store = store.clone();
            let labelled = watcher::Config::default().labels(CREDENTIALS_LABEL);
            controller.watches(secrets, labelled, move |secret| connections_using(&mapper_store, &secret))
        }
        None => controller,
    };
    let released = super::triggers(&ctx.users_gone, |key: ConnectionKey| {
        (key.kind == K::KIND).then(|| {
            let reference = ObjectRef::<K>::new(&key.name);
            match &key.namespace {
                Some(ns) => reference.within(ns),
                None => reference,
            }
        })
    });
    let controller = controller.reconcile_on(released);
    let stream = super::drive(controller, kind_name(K::KIND), ctx, reconcile::<K>);
    (stream, ready)
}
