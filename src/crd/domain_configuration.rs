use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::IdentityProvider;

/// Every user of an email domain signs in with an enterprise identity provider: Medplum's
/// DomainConfiguration. Medplum lets only super admins manage these, so the connection is a
/// ClusterMedplumConnection with `spec.superAdminCredential`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "DomainConfiguration",
    status = "DomainConfigurationStatus",
    shortname = "mpdomain",
    category = "medplum",
    doc = "An email domain whose users sign in with an enterprise identity provider (Medplum's DomainConfiguration).",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct DomainConfigurationSpec {
    /// The ClusterMedplumConnection to reconcile through; its credential must be a super admin's.
    pub connection_ref: ClusterConnectionRef,
    /// The email domain, e.g. `example.org`: Medplum sends everyone whose address ends in `@<domain>`
    /// to the identity provider. Immutable.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$"),
        length(max = 253)
    )]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "domain is immutable"}]))]
    pub domain: String,
    /// The identity provider; its client secret comes from a Secret in the namespace named.
    pub identity_provider: IdentityProvider<NamespacedSecretKeyRef>,
    /// Take over the domain's DomainConfiguration if one exists already (made by hand), instead of
    /// refusing with reason `AlreadyExists`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
    /// What deletion of the resource does in Medplum.
    #[serde(default)]
    pub deletion_policy: DomainDeletionPolicy,
}

/// A ClusterMedplumConnection, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterConnectionRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NamespacedSecretKeyRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DomainDeletionPolicy {
    /// Delete it from Medplum: the domain's users sign in with passwords again.
    #[default]
    Delete,
    /// Leave it in Medplum, without the operator's tag.
    Orphan,
}

/// Observed state of a DomainConfiguration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainConfigurationStatus {
    /// kstatus conditions; `Ready` means Medplum sends the domain's users to the identity provider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Medplum DomainConfiguration id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_configuration_id: Option<String>,
}
