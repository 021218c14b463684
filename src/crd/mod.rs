//! The custom resources of `medplum.com/v1alpha1`, one file per kind, and the types they share.

// Several `printcolumn(type_ = "string", …)` attributes are distinct columns, not duplicates.
#![allow(clippy::duplicated_attributes)]

mod access_policy;
mod client_application;
mod cluster_medplum_connection;
mod domain_configuration;
mod medplum_connection;
mod medplum_project;
mod project_user;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{CustomResourceDefinition, JSON};
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Set to any new value on a ClientApplication, MedplumConnection or ClusterMedplumConnection to
/// rotate its secret (a connection: its own credential's) now.
pub const ROTATE_ANNOTATION: &str = "medplum.com/rotate";
/// Set to any new value on a MedplumConnection or ClusterMedplumConnection to rotate, now, the secret
/// of every ClientApplication it serves (for an incident); progress is in `status.clientRotation`.
pub const ROTATE_CLIENTS_ANNOTATION: &str = "medplum.com/rotate-clients";

pub use access_policy::{
    AccessPolicy, AccessPolicySpec, AccessPolicyStatus, AdoptPolicy, CompartmentRef, Interaction, IpAccessRule,
    IpAction, PolicyDeletionPolicy, PolicyResource,
};
pub use client_application::{
    AccessGrant, Adopt, AdoptSecret, ClientApplication, ClientApplicationSpec, ClientApplicationStatus, DeletionPolicy,
    IdentityProvider, LocalObjectRef, PolicyParameter, RestartTarget, RotationSpec, SecretKeyRef, SecretKeys,
    SecretSpec, TokenAuthMethod, WorkloadKind,
};
pub use cluster_medplum_connection::{
    AllowedNamespaces, ClusterCaBundleRef, ClusterCredentialsSecretRef, ClusterMedplumConnection,
    ClusterMedplumConnectionSpec,
};
pub use domain_configuration::{
    ClusterConnectionRef, DomainConfiguration, DomainConfigurationSpec, DomainConfigurationStatus,
    DomainDeletionPolicy, NamespacedSecretKeyRef,
};
pub use medplum_connection::{
    AdoptionLimits, CaBundleRef, ClientRotationStatus, ConnectionLimits, ConnectionStatus, CredentialRotationSpec,
    CredentialRotationStatus, CredentialsSecretRef, KeySelector, MedplumConnection, MedplumConnectionSpec,
    ResourceCeiling,
};
pub use medplum_project::{
    MedplumProject, MedplumProjectSpec, MedplumProjectStatus, OriginalRegistration, PatientRegistration,
    ProjectDeletionPolicy, ProjectSecret, ProjectSecretType, Site,
};
pub use project_user::{ProfileType, ProjectUser, ProjectUserSpec, ProjectUserStatus, UserDeletionPolicy, UserScope};

/// API group of every kind this operator serves.
pub const GROUP: &str = "medplum.com";

/// Every CustomResourceDefinition this operator serves, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        MedplumConnection::crd(),
        ClusterMedplumConnection::crd(),
        ClientApplication::crd(),
        AccessPolicy::crd(),
        ProjectUser::crd(),
        DomainConfiguration::crd(),
        MedplumProject::crd(),
    ]
    .into_iter()
    .map(unobserved_until_reconciled)
    .collect()
}

/// An object the operator has not reconciled yet reads as `status.observedGeneration: 0` (the API
/// server applies schema defaults when it reads from etcd), so kstatus, which Flux uses, says
/// InProgress for it rather than Current: otherwise a new object is Current until its first status.
fn unobserved_until_reconciled(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        if let Some(status) = status {
            status.default = Some(JSON(serde_json::json!({"observedGeneration": 0})));
        }
    }
    crd
}

/// Renders one CRD as the YAML document committed under `crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    serde_yaml::to_string(crd).expect("a CRD always serializes to YAML")
}

/// The file name of a CRD under `crds/`: `<plural>.<group>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default())
}

/// Writes every CRD into `dir`, one file each.
pub fn write_files(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for crd in all() {
        std::fs::write(dir.join(file_name(&crd)), to_yaml(&crd))?;
    }
    Ok(())
}

/// The kind of connection object a resource uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConnectionKind {
    /// A `MedplumConnection` in the resource's own namespace.
    #[default]
    MedplumConnection,
    /// A cluster-wide `ClusterMedplumConnection` whose `allowedNamespaces` admits the resource's namespace.
    ClusterMedplumConnection,
}

/// Which connection (Medplum server, project and credential) a resource is reconciled through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRef {
    /// `MedplumConnection` (same namespace) or `ClusterMedplumConnection`.
    #[serde(default)]
    pub kind: ConnectionKind,
    /// Name of the connection object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl Default for ConnectionRef {
    fn default() -> Self {
        Self { kind: ConnectionKind::MedplumConnection, name: "default".into() }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// The paths under `schema` where a string has no `maxLength` (and no `enum`), a list no
    /// `maxItems`, or a map no `maxProperties`.
    fn unbounded(schema: &Value, path: &str, found: &mut Vec<String>) {
        match schema.get("type").and_then(Value::as_str) {
            Some("string") if schema.get("maxLength").is_none() && schema.get("enum").is_none() => {
                found.push(format!("{path}: string without maxLength"))
            }
            Some("array") => {
                if schema.get("maxItems").is_none() {
                    found.push(format!("{path}: list without maxItems"));
                }
                unbounded(&schema["items"], &format!("{path}[]"), found);
            }
            Some("object") => {
                if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                    if schema.get("maxProperties").is_none() {
                        found.push(format!("{path}: map without maxProperties"));
                    }
                    unbounded(values, &format!("{path}{{}}"), found);
                }
                for (name, property) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
                    unbounded(property, &format!("{path}.{name}"), found);
                }
            }
            _ => {}
        }
        for alternative in ["anyOf", "oneOf", "allOf"].iter().filter_map(|k| schema.get(*k)?.as_array()).flatten() {
            unbounded(alternative, path, found);
        }
    }

    /// Every string, list and map a user writes is bounded at apply time, so an object too large for
    /// Medplum, or for a worker to converge quickly, never gets in.
    #[test]
    fn every_string_list_and_map_of_every_spec_is_bounded() {
        let mut found = Vec::new();
        for crd in super::all() {
            let kind = &crd.spec.names.kind;
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            unbounded(&schema["openAPIV3Schema"]["properties"]["spec"], &format!("{kind}.spec"), &mut found);
        }
        assert!(found.is_empty(), "unbounded:\n{}", found.join("\n"));
    }
}
