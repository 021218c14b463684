use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::medplum_connection::{
    ConnectionLimits, ConnectionStatus, CredentialRotationSpec, KeySelector, default_client_id_key,
    default_client_secret_key,
};

/// A cluster-wide Medplum connection that a platform team offers to the namespaces it names.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "ClusterMedplumConnection",
    status = "ConnectionStatus",
    shortname = "cmpconn",
    category = "medplum",
    doc = "A Medplum server, project and project-admin credential that the namespaces in allowedNamespaces may use.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.baseUrl"),
    printcolumn(name = "Project", type_ = "string", json_path = ".status.projectId"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.serverVersion"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Rotated",
        type_ = "date",
        json_path = ".status.credentialRotation.lastRotationTime",
        priority = 1
    ),
    printcolumn(
        name = "Clients Rotated",
        type_ = "string",
        json_path = ".status.clientRotation.progress",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.superAdminCredential) || !self.superAdminCredential || has(self.projectId)",
    "message": "a super-admin credential needs spec.projectId: the project it manages"
}]))]
pub struct ClusterMedplumConnectionSpec {
    /// Base URL of the Medplum server, for example `https://api.medplum.com/`.
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"), length(max = 2048))]
    pub base_url: String,
    /// The Medplum project the credential must belong to (see `MedplumConnection`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub project_id: Option<String>,
    /// Secret holding the client id and secret of a project-admin ClientApplication.
    pub credentials_secret_ref: ClusterCredentialsSecretRef,
    /// PEM CA bundle to trust for the Medplum server, in addition to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<ClusterCaBundleRef>,
    /// The credential is meant to be a super-admin client (of Medplum's Super Admin project); it then
    /// manages the project named in `spec.projectId`. Without this, a super-admin credential is refused:
    /// a project-admin ClientApplication of the project is the least privilege that works.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub super_admin_credential: bool,
    /// The most that resources reconciled through this connection may ask for.
    #[serde(default)]
    pub limits: ConnectionLimits,
    /// Rotation of the credential itself (opt-in): the operator then writes the credentials Secret.
    /// Only annotations on this cluster-scoped object ask for a rotation, which no tenant can write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_rotation: Option<CredentialRotationSpec>,
    /// Namespaces whose resources may use this connection. Empty admits none.
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,
}

/// A Secret, in a namespace of the platform team's choosing, with the project-admin client credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterCredentialsSecretRef {
    /// Namespace of the Secret.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key that holds the ClientApplication id.
    #[serde(default = "default_client_id_key")]
    #[schemars(length(min = 1, max = 253))]
    pub client_id_key: String,
    /// Key that holds the ClientApplication secret.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub client_secret_key: String,
}

/// A key of a Secret or a ConfigMap (exactly one) in the given namespace that holds PEM certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretRef) != has(self.configMapRef)",
    "message": "set exactly one of secretRef and configMapRef"
}]))]
pub struct ClusterCaBundleRef {
    /// Namespace of the Secret or ConfigMap.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// A Secret key holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeySelector>,
    /// A ConfigMap key holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeySelector>,
}

/// Namespaces admitted by exact name or by labels; a namespace matching either is admitted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Exact namespace names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 63)))]
    pub names: Vec<String>,
    /// Namespaces whose labels match this selector. An empty selector (`{}`) matches every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_label_selector")]
    pub selector: Option<LabelSelector>,
}

/// A Kubernetes label selector, with the bounds Kubernetes gives labels (a key of at most 317
/// characters: a 253-character prefix, `/` and a 63-character name; values of at most 63).
fn bounded_label_selector(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A label selector: matchLabels and matchExpressions, ANDed.",
        "properties": {
            "matchLabels": {"type": "object", "maxProperties": 64,
                            "additionalProperties": {"type": "string", "maxLength": 63}},
            "matchExpressions": {"type": "array", "maxItems": 32, "items": {
                "type": "object", "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string", "maxLength": 317},
                    "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 63}}
                }
            }}
        }
    })
}
