//! Cleanup in Medplum behind a finalizer: adding it, running a kind's cleanup once the resource is
//! being deleted, and choosing the connection the cleanup goes through.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{Cached, Context, Error, FIELD_MANAGER, UsesConnection, connection, event, meta_fingerprint};
use crate::crd::{AccessPolicy, ClientApplication, ConnectionKind, ConnectionRef, MedplumProject, ProjectUser};

/// Held on every resource that owns objects in Medplum until its cleanup there is done.
pub const CLEANUP_FINALIZER: &str = "medplum.com/cleanup";

/// One reconcile behind [`CLEANUP_FINALIZER`]: `apply` while the resource exists, `cleanup` once it
/// is being deleted (the finalizer goes when `cleanup` succeeds).
pub(super) async fn reconcile_with_cleanup<K: UsesConnection>(
    cached: Arc<Cached<K>>,
    ctx: Arc<Context>,
    apply: impl AsyncFn(&K, &Context) -> Result<Action, Error>,
    cleanup: impl AsyncFn(&K, &Context) -> Result<Action, Error>,
) -> Result<Action, Error> {
    let obj = Arc::new(cached.resource());
    let namespace = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let deleted = obj.meta().deletion_timestamp.is_some();
    let connection = connection::ConnectionKey::of(&namespace, obj.connection_ref());
    // A grantee deleted or given another spec may have stopped granting a policy that waits to be
    // deleted until nothing grants it: such policies look again after this reconcile.
    let grants_may_change = obj.granted().is_some() && (deleted || obj.meta().generation != obj.observed_generation());
    let action = finalized(
        &ctx,
        &api,
        CLEANUP_FINALIZER,
        obj,
        async |o| apply(&o, &ctx).await,
        async |o| cleanup(&o, &ctx).await,
    )
    .await;
    if grants_may_change {
        let _ = ctx.grants_changed.send(namespace);
    }
    let action = action?;
    if deleted {
        // The finalizer is gone: a connection waiting for its users to go may be released now.
        let _ = ctx.users_gone.send(connection);
    }
    Ok(action)
}

/// A reconcile under `finalizer`: `apply` while the object exists, `cleanup` once it is being deleted,
/// and the finalizer removed only after `cleanup` succeeded. A missing finalizer is added first and
/// the same reconcile goes on to `apply` (kube's `finalizer()` stops there and waits for the patch's
/// watch event: a second reconcile for every new object, and a first pass over a backlog that writes
/// nothing but finalizers while Medplum waits). The watch event of that patch is the operator's own
/// and reconciles nothing.
pub async fn finalized<K>(
    ctx: &Context,
    api: &Api<K>,
    finalizer: &str,
    obj: Arc<K>,
    apply: impl AsyncFnOnce(Arc<K>) -> Result<Action, Error>,
    cleanup: impl AsyncFnOnce(Arc<K>) -> Result<Action, Error>,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    use json_patch::{AddOperation, PatchOperation, RemoveOperation, TestOperation, jsonptr::PointerBuf};
    let pointer = |path: &str| PointerBuf::parse(path).expect("finalizer paths are valid JSON pointers");
    let params = kube::api::PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let name = obj.name_any();
    let index = obj.finalizers().iter().position(|f| f == finalizer);
    let deleting = obj.meta().deletion_timestamp.is_some();
    match (index, deleting) {
        (Some(_), false) => apply(obj).await,
        (None, false) => {
            // `test` makes the patch fail, rather than duplicate or drop a finalizer, when someone
            // else changed the list meanwhile (the reconcile is then retried).
            let current = obj.finalizers();
            let (test, add_at) = if current.is_empty() {
                (serde_json::Value::Null, "/metadata/finalizers")
            } else {
                (current.into(), "/metadata/finalizers/-")
            };
            let value = if current.is_empty() { vec![finalizer].into() } else { finalizer.into() };
            let patch = json_patch::Patch(vec![
                PatchOperation::Test(TestOperation { path: pointer("/metadata/finalizers"), value: test }),
                PatchOperation::Add(AddOperation { path: pointer(add_at), value }),
            ]);
            // The patch's watch event may come before its answer: expected by what it will show.
            let (kind, namespace) = (K::kind(&()), obj.namespace().unwrap_or_default());
            let mut finalizers = current.to_vec();
            finalizers.push(finalizer.to_string());
            let meta = obj.meta();
            let fingerprint =
                meta_fingerprint(meta.generation, meta.labels.as_ref(), meta.annotations.as_ref(), &finalizers);
            ctx.own_writes.expect(&kind, &namespace, &name, fingerprint);
            let patched = api.patch(&name, &params, &kube::api::Patch::Json::<()>(patch)).await;
            let version = patched.as_ref().ok().and_then(|p| p.resource_version());
            ctx.own_writes.answered(&kind, &namespace, &name, version.as_deref());
            apply(Arc::new(patched.map_err(Error::Kube)?)).await
        }
        (Some(i), true) => {
            let action = cleanup(obj).await?;
            let path = pointer(&format!("/metadata/finalizers/{i}"));
            let patch = json_patch::Patch(vec![
                PatchOperation::Test(TestOperation { path: path.clone(), value: finalizer.into() }),
                PatchOperation::Remove(RemoveOperation { path }),
            ]);
            api.patch::<K>(&name, &params, &kube::api::Patch::Json(patch)).await.map_err(Error::Kube)?;
            Ok(action)
        }
        (None, true) => Ok(Action::await_change()),
    }
}

/// Set to `true` on a resource being deleted to drop its finalizer without touching Medplum (for when
/// its connection is gone for good).
pub const RELEASE_ANNOTATION: &str = "medplum.com/release-finalizer";

/// How a deletion reaches Medplum.
pub enum CleanupVia {
    /// Through this connection (as last verified: it may be failing or deleted by now).
    Connection(Box<connection::UsableConnection>),
    /// Not at all: the finalizer is released, and an Event says why.
    Released,
}

/// The connection a deletion goes through. Without one, the deletion waits, unless a person released
/// the finalizer (annotation) or the namespace is being deleted, where waiting could last forever:
/// then the Medplum objects are left, and a Warning Event says so.
pub(super) async fn cleanup_via<K: UsesConnection>(ctx: &Context, obj: &K) -> Result<CleanupVia, Error> {
    let key = connection::ConnectionKey::of(&obj.namespace().unwrap_or_default(), obj.connection_ref());
    cleanup_through(ctx, obj, key).await
}

/// [`cleanup_via`] for any resource, through the connection `key`; a cluster-scoped one has no
/// namespace to be deleted, so its cleanup waits for the connection or the annotation.
pub(super) async fn cleanup_through<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    key: connection::ConnectionKey,
) -> Result<CleanupVia, Error> {
    let reference = obj.object_ref(&());
    if obj.annotations().get(RELEASE_ANNOTATION).is_some_and(|v| v == "true") {
        let note = format!("{RELEASE_ANNOTATION} is set: left Medplum as it is");
        ctx.publish(&reference, &event(EventType::Warning, "FinalizerReleased", "Delete", note)).await;
        return Ok(CleanupVia::Released);
    }
    if let Some(usable) = ctx.connections.last_usable(&key) {
        return Ok(CleanupVia::Connection(Box::new(usable)));
    }
    if let Some(namespace) = obj.namespace() {
        let (_, terminating) = connection::namespace_labels(ctx, &namespace).await.map_err(Error::Kube)?;
        if terminating {
            let note = format!(
                "namespace {namespace} is being deleted and {} {} cannot be used; left its objects in Medplum",
                key.kind_name(),
                key.name
            );
            ctx.publish(&reference, &event(EventType::Warning, "Orphaned", "Delete", note)).await;
            return Ok(CleanupVia::Released);
        }
    }
    Err(Error::Blocked(format!(
        "{} {} is not usable; the cleanup waits for it (or set {RELEASE_ANNOTATION}: \"true\" to skip it)",
        key.kind_name(),
        key.name
    )))
}

/// Where the resources that may use the connection of `key` live: its namespace, else every watched one.
fn scopes<'a>(ctx: &'a Context, key: &'a connection::ConnectionKey) -> Vec<Option<&'a str>> {
    match (&key.namespace, ctx.settings.watch_namespaces.is_empty()) {
        (Some(ns), _) => vec![Some(ns.as_str())],
        (None, true) => vec![None],
        (None, false) => ctx.settings.watch_namespaces.iter().map(|ns| Some(ns.as_str())).collect(),
    }
}

/// The resources (`Kind namespace/name`) whose `spec.connectionRef` points at `key`.
pub(super) async fn connection_users(
    ctx: &Context,
    key: &connection::ConnectionKey,
) -> Result<Vec<String>, kube::Error> {
    fn names<K: Resource<DynamicType = ()>>(objects: Vec<K>) -> impl Iterator<Item = String> {
        objects.into_iter().map(|o| format!("{} {}/{}", K::kind(&()), o.namespace().unwrap_or_default(), o.name_any()))
    }
    let mut users = Vec::new();
    for scope in scopes(ctx, key) {
        users.extend(names(using::<ClientApplication>(ctx, scope, key, |o| &o.spec.connection_ref).await?));
        users.extend(names(using::<AccessPolicy>(ctx, scope, key, |o| &o.spec.connection_ref).await?));
        users.extend(names(using::<ProjectUser>(ctx, scope, key, |o| &o.spec.connection_ref).await?));
        users.extend(names(using::<MedplumProject>(ctx, scope, key, |o| &o.spec.connection_ref).await?));
    }
    if key.kind == ConnectionKind::ClusterMedplumConnection {
        let domains = Api::<crate::crd::DomainConfiguration>::all(ctx.client.clone()).list(&Default::default()).await?;
        users.extend(
            domains
                .items
                .iter()
                .filter(|d| d.spec.connection_ref.name == key.name)
                .map(|d| format!("DomainConfiguration {}", d.name_any())),
        );
    }
    Ok(users)
}

/// The ClientApplications whose `spec.connectionRef` points at `key`.
pub(crate) async fn client_applications_using(
    ctx: &Context,
    key: &connection::ConnectionKey,
) -> Result<Vec<ClientApplication>, kube::Error> {
    let mut clients = Vec::new();
    for scope in scopes(ctx, key) {
        clients.extend(using::<ClientApplication>(ctx, scope, key, |o| &o.spec.connection_ref).await?);
    }
    Ok(clients)
}

async fn using<K>(
    ctx: &Context,
    namespace: Option<&str>,
    key: &connection::ConnectionKey,
    reference: impl Fn(&K) -> &ConnectionRef,
) -> Result<Vec<K>, kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let list = api.list(&kube::api::ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|o| {
            let r = reference(o);
            r.kind == key.kind && r.name == key.name && (key.namespace.is_none() || o.namespace() == key.namespace)
        })
        .collect())
}
