//! What dependents get from a connection: whether they may use it, and the verified connection.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::Api;

use super::ConnectionKey;
use crate::controller::Context;
use crate::controller::tenancy::Admission;
use crate::controller::view::{MedplumView, Owned, Seen};
use crate::crd::{ClusterMedplumConnection, ConnectionKind, ConnectionLimits, MedplumConnection};
use crate::failure::Failure;
use crate::medplum::{FhirResource, MedplumClient, MedplumError};

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
    /// The connection's `medplum.com/rotate-clients` request: every ClientApplication it serves
    /// rotates once for each new value.
    pub rotate_clients_request: Option<String>,
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

    /// The object the operator manages under `system|code`: from the view when it knows, else from
    /// Medplum. `look_if_absent`: ask Medplum even when the view vouches there is none.
    pub async fn find_managed<T: Owned>(
        &self,
        system: &str,
        code: &str,
        recorded: Option<&str>,
        look_if_absent: bool,
    ) -> Result<Option<T>, MedplumError> {
        match self.view.seen::<T>(code).await {
            Seen::Known(object) => Ok(Some(object)),
            Seen::Absent if !look_if_absent => Ok(None),
            Seen::Absent | Seen::Unknown => self.read_managed(system, code, recorded).await,
        }
    }

    /// The object the operator manages under `system|code`, as Medplum holds it: by the `recorded`
    /// id if it still carries the mark, else by a search for the mark. Recorded in the view.
    pub async fn read_managed<T: Owned>(
        &self,
        system: &str,
        code: &str,
        recorded: Option<&str>,
    ) -> Result<Option<T>, MedplumError> {
        let ours = |object: &T| object.codes(system).iter().any(|c| c == code);
        let found = self.client.find_owned(recorded, ours, T::BY_SYSTEM, &format!("{system}|{code}")).await?;
        if let Some(object) = &found {
            self.view.record(object);
        }
        Ok(found)
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
