//! `MedplumConnection` and `ClusterMedplumConnection`: read the credential, obtain a token, check who
//! the credential is (`/auth/me`) and report it. Verified connections are kept in a registry with their
//! Medplum client, so its token cache outlives a reconcile.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::secret::{CaSource, SourceError, read_ca_bundle, read_secret_strings};
use super::status::{ConditionState, READY, apply_status, is_ready, set_condition};
use super::tenancy::Admission;
use super::view::{MedplumView, Owned};
use super::{Context, Error, ReconcileStream};
use crate::crd::{ClusterMedplumConnection, ConnectionKind, ConnectionLimits, ConnectionStatus, MedplumConnection};
use crate::failure::Failure;
use crate::medplum::{ClientCredentials, FhirResource, Me, MedplumClient, MedplumError};

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

/// Why a resource cannot use the connection it refers to.
#[derive(Debug, thiserror::Error)]
pub enum UseError {
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} is not Ready{}", cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default())]
    NotReady { kind: &'static str, name: String, cause: Option<String> },
    #[error("ClusterMedplumConnection {name} does not admit namespace {namespace} (spec.allowedNamespaces)")]
    NotAllowed { name: String, namespace: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Failure for UseError {
    fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "ConnectionNotFound",
            Self::NotReady { .. } => "ConnectionNotReady",
            Self::NotAllowed { .. } => "ConnectionNotAllowed",
            Self::Kube(_) => "KubernetesApiError",
        }
    }

    fn is_transient(&self) -> bool {
        matches!(self, Self::NotReady { .. } | Self::Kube(_))
    }
}

/// A namespace's labels, and whether it is being deleted.
pub async fn namespace_labels(ctx: &Context, namespace: &str) -> Result<(BTreeMap<String, String>, bool), kube::Error> {
    let ns = Api::<k8s_openapi::api::core::v1::Namespace>::all(ctx.client.clone()).get_opt(namespace).await?;
    let terminating = ns.as_ref().is_some_and(|n| n.metadata.deletion_timestamp.is_some());
    Ok((ns.and_then(|n| n.metadata.labels).unwrap_or_default(), terminating))
}

/// The connection a resource in `namespace` refers to, if it exists, is Ready and admits the namespace.
pub async fn usable_connection(
    ctx: &Context,
    namespace: &str,
    reference: &crate::crd::ConnectionRef,
) -> Result<UsableConnection, UseError> {
    let key = ConnectionKey::of(namespace, reference);
    let usable = registered(ctx, key.clone(), namespace).await?;
    let admitted = match usable.admission.admits_by_name(namespace) {
        Some(admitted) => admitted,
        None => usable.admission.admits(namespace, &namespace_labels(ctx, namespace).await?.0),
    };
    if !admitted {
        return Err(UseError::NotAllowed { name: key.name, namespace: namespace.to_string() });
    }
    Ok(usable)
}

/// The ClusterMedplumConnection `name` a cluster-scoped resource refers to, if it exists and is Ready
/// (namespaces are not admitted or refused: only cluster administrators make cluster-scoped resources).
pub async fn usable_cluster_connection(ctx: &Context, name: &str) -> Result<UsableConnection, UseError> {
    let key = ConnectionKey { kind: ConnectionKind::ClusterMedplumConnection, namespace: None, name: name.to_string() };
    registered(ctx, key, "").await
}

/// The connection of `key` as last verified, if it exists and is Ready (`namespace`: where a
/// MedplumConnection of that key lives).
async fn registered(ctx: &Context, key: ConnectionKey, namespace: &str) -> Result<UsableConnection, UseError> {
    let kind = key.kind_name();
    // A connection the registry holds exists: it leaves the registry when its deletion completes.
    let usable = match ctx.connections.state(&key) {
        Some(Ok(usable)) => usable,
        Some(Err(cause)) => return Err(UseError::NotReady { kind, name: key.name, cause }),
        None => {
            let exists = match key.kind {
                ConnectionKind::MedplumConnection => {
                    Api::<MedplumConnection>::namespaced(ctx.client.clone(), namespace)
                        .get_opt(&key.name)
                        .await?
                        .is_some()
                }
                ConnectionKind::ClusterMedplumConnection => {
                    Api::<ClusterMedplumConnection>::all(ctx.client.clone()).get_opt(&key.name).await?.is_some()
                }
            };
            return Err(if exists {
                UseError::NotReady { kind, name: key.name, cause: None }
            } else {
                UseError::NotFound { kind, name: key.name }
            });
        }
    };
    Ok(usable)
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

    fn key(&self) -> ConnectionKey {
        ConnectionKey { kind: Self::KIND, namespace: self.namespace(), name: self.name_any() }
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
        let ca = self.spec.ca_bundle.as_ref().and_then(|ca| match (&ca.secret_ref, &ca.config_map_ref) {
            (Some(s), _) => {
                Some(CaSource::Secret { namespace: namespace.clone(), name: s.name.clone(), key: s.key.clone() })
            }
            (None, Some(c)) => {
                Some(CaSource::ConfigMap { namespace: namespace.clone(), name: c.name.clone(), key: c.key.clone() })
            }
            (None, None) => None,
        });
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
}

impl ConnectionObject for ClusterMedplumConnection {
    const KIND: ConnectionKind = ConnectionKind::ClusterMedplumConnection;

    fn api(client: kube::Client, _namespace: Option<&str>) -> Api<Self> {
        Api::all(client)
    }

    fn target(&self) -> ConnectionTarget {
        let creds = &self.spec.credentials_secret_ref;
        let ca = self.spec.ca_bundle.as_ref().and_then(|ca| match (&ca.secret_ref, &ca.config_map_ref) {
            (Some(s), _) => {
                Some(CaSource::Secret { namespace: ca.namespace.clone(), name: s.name.clone(), key: s.key.clone() })
            }
            (None, Some(c)) => {
                Some(CaSource::ConfigMap { namespace: ca.namespace.clone(), name: c.name.clone(), key: c.key.clone() })
            }
            (None, None) => None,
        });
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
}

/// A verified connection, as dependents use it.
#[derive(Clone)]
pub struct UsableConnection {
    pub client: Arc<MedplumClient>,
    /// What the operator knows of its objects in the project.
    pub view: Arc<MedplumView>,
    pub project_id: String,
    /// The credential is a super admin's: writes name the project, and memberships are deleted through FHIR.
    pub super_admin: bool,
    pub limits: ConnectionLimits,
    pub admission: Admission,
}

impl UsableConnection {
    /// Creates a resource in the connection's project; with `if_none_exist`, finds the one match instead.
    pub async fn create<T: FhirResource + Clone>(
        &self,
        resource: &T,
        if_none_exist: Option<&str>,
    ) -> Result<T, MedplumError> {
        if !self.super_admin {
            return self.client.create(resource, if_none_exist).await;
        }
        // A super admin's writes land in its own project unless they name another one.
        let mut scoped = resource.clone();
        scoped.meta_mut().project = Some(self.project_id.clone());
        self.client.create(&scoped, if_none_exist).await
    }

    /// Creates an object the operator manages for the resource of `code`, and records it in the view.
    /// When the view vouches that no such object exists, a plain create does; otherwise the create is
    /// conditional on `condition` (which finds an existing one instead). Medplum runs a conditional
    /// create as a serializable transaction: it takes about twice as long, and under concurrent load
    /// some fail with 409 "could not serialize access".
    pub async fn create_owned<T: Owned>(&self, resource: &T, code: &str, condition: &str) -> Result<T, MedplumError> {
        let condition = (!self.view.vouches_absent::<T>(code)).then_some(condition);
        match self.create(resource, condition).await {
            Ok(created) => {
                self.view.record(&created);
                Ok(created)
            }
            Err(e) => {
                if e.leaves_object_uncertain() {
                    self.view.doubt::<T>(code);
                }
                Err(e)
            }
        }
    }

    /// Removes a membership (its live tokens end at once).
    pub async fn delete_membership(&self, membership_id: &str) -> Result<(), MedplumError> {
        if self.super_admin {
            // The admin API acts on the caller's own project for super admins (record f15).
            self.client.delete::<crate::medplum::MembershipResource>(membership_id).await
        } else {
            self.client.delete_membership(&self.project_id, membership_id).await
        }
    }
}

/// What a successful verification found.
#[derive(Clone, Debug)]
pub struct Verified {
    pub project_id: String,
    pub project_name: Option<String>,
    pub server_version: Option<String>,
    pub client_id: String,
    pub super_admin: bool,
    pub client: Arc<MedplumClient>,
}

/// Why a connection is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Medplum(#[from] MedplumError),
    #[error("the credential belongs to project {actual}, but spec.projectId is {expected}")]
    ProjectMismatch { expected: String, actual: String },
    #[error(
        "the credential is a member of project {project} but not a project admin; the operator needs a ClientApplication whose membership has admin: true"
    )]
    NotProjectAdmin { project: String },
    #[error(
        "the credential is a super-admin client; refusing it, use a project-admin ClientApplication of the project instead (or set spec.superAdminCredential and spec.projectId if that is meant)"
    )]
    SuperAdminCredential,
    #[error("project {0} does not exist")]
    ProjectNotFound(String),
}

impl Failure for ConnectionError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Source(e) => e.reason(),
            Self::Medplum(e) => e.reason(),
            Self::ProjectMismatch { .. } => "ProjectMismatch",
            Self::NotProjectAdmin { .. } => "NotProjectAdmin",
            Self::SuperAdminCredential => "SuperAdminCredential",
            Self::ProjectNotFound(_) => "ProjectNotFound",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Source(e) => e.is_transient(),
            Self::Medplum(e) => e.is_transient(),
            _ => false,
        }
    }

    fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Medplum(e) if e.is_rate_limited())
    }
}

/// Checks that `/auth/me` describes a project admin of the expected project, or (when the connection
/// says so) a super admin, who then manages `expected_project`.
pub fn check_identity(
    me: &Me,
    expected_project: Option<&str>,
    super_admin_allowed: bool,
) -> Result<(), ConnectionError> {
    if me.project.super_admin {
        return match (super_admin_allowed, expected_project) {
            (true, Some(_)) => Ok(()),
            _ => Err(ConnectionError::SuperAdminCredential),
        };
    }
    if let Some(expected) = expected_project.filter(|e| *e != me.project.id) {
        return Err(ConnectionError::ProjectMismatch { expected: expected.to_string(), actual: me.project.id.clone() });
    }
    if !me.membership.admin {
        return Err(ConnectionError::NotProjectAdmin { project: me.project.id.clone() });
    }
    Ok(())
}

/// The status a connection should have after a verification.
pub fn desired_status(
    current: Option<&ConnectionStatus>,
    result: &Result<Verified, ConnectionError>,
    generation: Option<i64>,
    now: Timestamp,
) -> ConnectionStatus {
    let mut status = current.cloned().unwrap_or_default();
    let condition = match result {
        Ok(v) => {
            status.project_id = Some(v.project_id.clone());
            status.project_name = v.project_name.clone();
            status.server_version = v.server_version.clone();
            status.client_id = Some(v.client_id.clone());
            let project = match &v.project_name {
                Some(name) => format!("{name} ({})", v.project_id),
                None => v.project_id.clone(),
            };
            ConditionState::new(
                READY,
                true,
                "Connected",
                format!("authenticated as ClientApplication/{}, project admin of {project}", v.client_id),
            )
        }
        Err(e) => ConditionState::not_ready(e),
    };
    status.conditions = set_condition(&status.conditions, condition, generation, now);
    status.observed_generation = generation;
    status
}

/// A fingerprint of everything a Medplum client is built from; a new client (and token cache) is made
/// only when it changes. The secret enters only as part of a SHA-256 input, kept in memory.
fn fingerprint(target: &ConnectionTarget, credentials: &ClientCredentials, ca: Option<&[u8]>) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [
        target.base_url.as_bytes(),
        credentials.client_id.as_bytes(),
        credentials.client_secret.expose_secret().as_bytes(),
        ca.unwrap_or_default(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

struct RegistryEntry {
    fingerprint: [u8; 32],
    client: Arc<MedplumClient>,
    /// The last successful verification; kept while later ones fail, for cleanups.
    last_usable: Option<UsableConnection>,
    /// Whether the last verification succeeded, and why not.
    ready: Result<(), Option<String>>,
    /// The view of the project, and the task keeping it current (stopped with the entry).
    view: Option<(String, Arc<MedplumView>, AbortOnDrop)>,
}

/// A background task that ends when this is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Medplum clients of the connections, by connection, and their state for dependents.
#[derive(Default)]
pub struct ConnectionRegistry {
    entries: RwLock<HashMap<ConnectionKey, RegistryEntry>>,
}

impl ConnectionRegistry {
    /// The client for `key`, reused while its inputs are unchanged.
    fn client(
        &self,
        key: &ConnectionKey,
        fingerprint: [u8; 32],
        make: impl FnOnce() -> Result<MedplumClient, MedplumError>,
    ) -> Result<Arc<MedplumClient>, MedplumError> {
        if let Some(entry) =
            self.entries.read().expect("registry lock").get(key).filter(|e| e.fingerprint == fingerprint)
        {
            return Ok(entry.client.clone());
        }
        let client = Arc::new(make()?);
        let mut entries = self.entries.write().expect("registry lock");
        let last_usable = entries.remove(key).and_then(|e| e.last_usable);
        let entry = RegistryEntry { fingerprint, client: client.clone(), last_usable, ready: Err(None), view: None };
        entries.insert(key.clone(), entry);
        Ok(client)
    }

    /// The view of `project_id` through the connection's current client, started by `start` (which
    /// returns the view and the task keeping it current) the first time, or when the project changed.
    fn view(
        &self,
        key: &ConnectionKey,
        project_id: &str,
        start: impl FnOnce() -> (Arc<MedplumView>, tokio::task::AbortHandle),
    ) -> Option<Arc<MedplumView>> {
        let mut entries = self.entries.write().expect("registry lock");
        let entry = entries.get_mut(key)?;
        if let Some((project, view, _)) = &entry.view
            && project == project_id
        {
            return Some(view.clone());
        }
        let (view, task) = start();
        entry.view = Some((project_id.to_string(), view.clone(), AbortOnDrop(task)));
        Some(view)
    }

    fn set_usable(&self, key: &ConnectionKey, usable: Result<UsableConnection, String>) {
        if let Some(entry) = self.entries.write().expect("registry lock").get_mut(key) {
            match usable {
                Ok(usable) => {
                    entry.ready = Ok(());
                    entry.last_usable = Some(usable);
                }
                Err(failure) => entry.ready = Err(Some(failure)),
            }
        }
    }

    /// The ClientApplication ids of every connection's credential, with the connection they belong to.
    pub fn credentials(&self) -> Vec<(String, String)> {
        let entries = self.entries.read().expect("registry lock");
        entries
            .iter()
            .map(|(key, entry)| {
                let namespace = key.namespace.as_deref().map(|ns| format!("{ns}/")).unwrap_or_default();
                (entry.client.client_id().to_string(), format!("{} {namespace}{}", key.kind_name(), key.name))
            })
            .collect()
    }

    /// Whether the registry holds the connection (`None`: not seen yet, or deleted), and if so, the
    /// connection when its last verification succeeded, else why it failed (if it was verified).
    pub fn state(&self, key: &ConnectionKey) -> Option<Result<UsableConnection, Option<String>>> {
        let entries = self.entries.read().expect("registry lock");
        entries.get(key).map(|e| match (&e.ready, &e.last_usable) {
            (Ok(()), Some(usable)) => Ok(usable.clone()),
            (Ok(()), None) => Err(None),
            (Err(cause), _) => Err(cause.clone()),
        })
    }

    /// Forgets a connection whose deletion completed (stopping its view's task).
    pub fn remove(&self, key: &ConnectionKey) {
        self.entries.write().expect("registry lock").remove(key);
    }

    /// The connection as last verified, even if it is failing now or was deleted: cleanups use it so
    /// that a namespace being deleted (credentials Secret first) can still be cleaned up in Medplum.
    pub fn last_usable(&self, key: &ConnectionKey) -> Option<UsableConnection> {
        self.entries.read().expect("registry lock").get(key).and_then(|e| e.last_usable.clone())
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

/// The credential and the CA bundle (PEM) a connection names.
pub async fn read_credentials(
    kube: &kube::Client,
    target: &ConnectionTarget,
) -> Result<(ClientCredentials, Option<Vec<u8>>), ConnectionError> {
    let values = read_secret_strings(
        kube,
        &target.credentials_namespace,
        &target.credentials_name,
        &[&target.client_id_key, &target.client_secret_key],
    )
    .await?;
    let [client_id, client_secret]: [_; 2] = values.try_into().expect("two keys were asked for");
    let credentials = ClientCredentials { client_id: client_id.expose_secret().to_string(), client_secret };
    let ca = match &target.ca {
        Some(source) => Some(read_ca_bundle(kube, source).await?),
        None => None,
    };
    Ok((credentials, ca))
}

/// Checks that the credential of `client` is what the connection says it is, and finds its project.
pub async fn identify(client: Arc<MedplumClient>, target: &ConnectionTarget) -> Result<Verified, ConnectionError> {
    let health = client.health().await?;
    let me = client.me().await?;
    check_identity(&me, target.project_id.as_deref(), target.super_admin_credential)?;
    let (project_id, project_name) = match target.project_id.as_deref().filter(|_| me.project.super_admin) {
        Some(managed) => {
            let project =
                client.read_reference::<crate::medplum::ProjectSummary>(&format!("Project/{managed}")).await?;
            let project = project.ok_or_else(|| ConnectionError::ProjectNotFound(managed.to_string()))?;
            (project.id, project.name)
        }
        None => (me.project.id, me.project.name),
    };
    Ok(Verified {
        project_id,
        project_name,
        server_version: health.version,
        client_id: client.client_id().to_string(),
        super_admin: me.project.super_admin,
        client,
    })
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

async fn apply<K: ConnectionObject>(obj: &K, ctx: &Context, api: &Api<K>) -> Result<Action, Error> {
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
            })
            .ok_or_else(|| "its Medplum client was replaced meanwhile".to_string()),
        Err(e) => Err(e.to_string()),
    };
    ctx.connections.set_usable(&key, usable);
    let current = obj.connection_status();
    let desired = desired_status(current, &result, obj.meta().generation, Timestamp::now());
    write_status(ctx, obj, api, &desired, "Verify").await?;
    ctx.metrics.set_connection_ready(kind, key.namespace.as_deref().unwrap_or_default(), &key.name, result.is_ok());
    ctx.metrics.set_object_ready(kind, key.namespace.as_deref().unwrap_or_default(), &key.name, Some(result.is_ok()));
    let backoff_key = format!("{kind}/{}/{}", key.namespace.as_deref().unwrap_or_default(), key.name);
    match result {
        Ok(_) => {
            ctx.backoff.reset(&backoff_key);
            Ok(Action::requeue(ctx.settings.resync_interval))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::medplum::Me;
    use std::time::Duration;

    fn me(project: &str, admin: bool, super_admin: bool) -> Me {
        serde_json::from_value(serde_json::json!({
            "project": {"id": project, "name": "P", "superAdmin": super_admin},
            "membership": {"id": "m", "admin": admin, "profile": {"reference": "ClientApplication/c"}},
            "profile": {"resourceType": "ClientApplication", "secret": "never-read"},
        }))
        .unwrap()
    }

    #[test]
    fn identity_must_be_a_project_admin_of_the_expected_project() {
        assert!(check_identity(&me("p1", true, false), Some("p1"), false).is_ok());
        assert!(check_identity(&me("p1", true, false), None, false).is_ok());
        assert_eq!(check_identity(&me("p1", true, false), Some("p2"), false).unwrap_err().reason(), "ProjectMismatch");
        assert_eq!(check_identity(&me("p1", false, false), None, false).unwrap_err().reason(), "NotProjectAdmin");
        assert_eq!(check_identity(&me("sa", true, true), None, false).unwrap_err().reason(), "SuperAdminCredential");
        assert_eq!(
            check_identity(&me("sa", true, true), Some("p1"), false).unwrap_err().reason(),
            "SuperAdminCredential"
        );
        assert_eq!(check_identity(&me("sa", true, true), None, true).unwrap_err().reason(), "SuperAdminCredential");
        assert!(check_identity(&me("sa", true, true), Some("p1"), true).is_ok(), "meant to be one, for project p1");
    }

    #[test]
    fn status_reports_what_was_found_and_keeps_it_through_failures() {
        let now = Timestamp::from_second(1_000).unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let credentials = ClientCredentials { client_id: "c1".into(), client_secret: "s".to_string().into() };
        let client = MedplumClient::new(
            "https://m.example.org",
            credentials,
            None,
            Duration::from_secs(1),
            &Default::default(),
            Default::default(),
        );
        let verified = Verified {
            project_id: "p1".into(),
            project_name: Some("Lab".into()),
            server_version: Some("5.1.29".into()),
            client_id: "c1".into(),
            super_admin: false,
            client: Arc::new(client.unwrap()),
        };
        let ok = desired_status(None, &Ok(verified), Some(4), now);
        assert_eq!((ok.project_id.as_deref(), ok.observed_generation), (Some("p1"), Some(4)));
        assert!(is_ready(&ok.conditions));
        assert_eq!(ok.conditions[0].message, "authenticated as ClientApplication/c1, project admin of Lab (p1)");

        let failed =
            desired_status(Some(&ok), &Err(ConnectionError::NotProjectAdmin { project: "p1".into() }), Some(4), now);
        assert!(!is_ready(&failed.conditions));
        assert_eq!(failed.conditions[0].reason, "NotProjectAdmin");
        assert_eq!(failed.project_id.as_deref(), Some("p1"));
    }

    #[test]
    fn fingerprint_changes_with_every_input() {
        let target = ConnectionTarget {
            base_url: "https://m".into(),
            project_id: None,
            super_admin_credential: false,
            credentials_namespace: "ns".into(),
            credentials_name: "s".into(),
            client_id_key: "id".into(),
            client_secret_key: "secret".into(),
            ca: None,
        };
        let creds =
            |secret: &str| ClientCredentials { client_id: "c".into(), client_secret: secret.to_string().into() };
        let base = fingerprint(&target, &creds("a"), None);
        assert_eq!(base, fingerprint(&target, &creds("a"), None));
        assert_ne!(base, fingerprint(&target, &creds("b"), None));
        assert_ne!(base, fingerprint(&target, &creds("a"), Some(b"pem")));
        let other = ConnectionTarget { base_url: "https://n".into(), ..target.clone() };
        assert_ne!(base, fingerprint(&other, &creds("a"), None));
    }
}
