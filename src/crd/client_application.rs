use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConnectionRef;

/// A Medplum ClientApplication whose credentials the operator keeps in a Kubernetes Secret.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "ClientApplication",
    namespaced,
    status = "ClientApplicationStatus",
    shortname = "mpclient",
    category = "medplum",
    doc = "A Medplum ClientApplication (client credentials) managed by the operator.",
    printcolumn(name = "Client ID", type_ = "string", json_path = ".status.clientId"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName"),
    printcolumn(name = "Last Rotation", type_ = "date", json_path = ".status.lastRotationTime"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Next Rotation", type_ = "string", json_path = ".status.nextRotationTime", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.access) && size(self.access) > 0) != (has(self.unrestrictedAccess) && self.unrestrictedAccess)",
    "message": "set spec.access (the policies the client's membership gets), or spec.unrestrictedAccess: true for a membership without any policy; exactly one of them"
}]))]
pub struct ClientApplicationSpec {
    /// The connection to reconcile through; default: the `MedplumConnection` named `default` in this namespace.
    #[serde(default)]
    pub connection_ref: ConnectionRef,
    /// Medplum `ClientApplication.name`; default `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub display_name: Option<String>,
    /// Medplum `ClientApplication.description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Lifetime of access tokens, in Medplum's format (`30s`, `15m`, `1h`, `1d`); Medplum's default is 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[smhdw]$"))]
    #[schemars(length(max = 16))]
    pub access_token_lifetime: Option<String>,
    /// Lifetime of refresh tokens, in the same format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[smhdw]$"))]
    #[schemars(length(max = 16))]
    pub refresh_token_lifetime: Option<String>,
    /// Redirect URIs for the authorization code flow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 2048)))]
    pub redirect_uris: Vec<String>,
    /// Make PKCE optional for the authorization code flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkce_optional: Option<bool>,
    /// JWKS URI for `private_key_jwt` client authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub jwks_uri: Option<String>,
    /// Launch URI for the SMART EHR launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub launch_uri: Option<String>,
    /// CORS origins allowed to use the client (Medplum `allowedOrigin`); empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 2048)))]
    pub allowed_origins: Vec<String>,
    /// Scopes used when a request names none (Medplum `defaultScope`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 256)))]
    pub default_scopes: Vec<String>,
    /// An external identity provider for the client's sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<IdentityProvider>,
    /// What the client's ProjectMembership may do: AccessPolicy resources of this namespace, with parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub access: Vec<AccessGrant>,
    /// A membership without any policy, which Medplum treats as full access to the project. Only when
    /// the connection allows it (`spec.limits.allowUnrestrictedAccess`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unrestricted_access: bool,
    /// The client may act for the project's users with the `X-Medplum-On-Behalf-Of` header (a
    /// back-end "proxy API"): each such request then has exactly the rights of the user named.
    /// Medplum allows it only to a project administrator, so the client's membership gets `admin:
    /// true` (its own requests keep its `access` policies); only when the connection allows project
    /// administration (`spec.limits.allowAdmin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_behalf_of: bool,
    /// The Secret the credentials are written to.
    #[serde(default)]
    pub secret: SecretSpec,
    /// Secret rotation.
    #[serde(default)]
    pub rotation: RotationSpec,
    /// What happens in Medplum when this resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Take over an existing Medplum ClientApplication instead of creating one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<Adopt>,
}

/// An AccessPolicy resource and the parameters its `%variables` take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessGrant {
    /// The AccessPolicy resource, in the same namespace.
    pub policy_ref: LocalObjectRef,
    /// Values for the policy's `%name` variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub parameters: Vec<PolicyParameter>,
}

/// A resource in the same namespace, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LocalObjectRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A policy variable: a string, or a reference such as `Organization/123`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.valueString) != has(self.valueReference)",
    "message": "set exactly one of valueString and valueReference"
}]))]
pub struct PolicyParameter {
    /// The variable name, without `%`.
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_-]*$"), length(max = 64))]
    pub name: String,
    /// Medplum puts it into the policy's JSON text as it is, so it may not hold `"`, `\` or control
    /// characters (they would change the policy itself, not only the value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r#"^[^"\\\x00-\x1f]*$"#), length(max = 1024))]
    pub value_string: Option<String>,
    /// A FHIR reference, `<ResourceType>/<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$"), length(max = 130))]
    pub value_reference: Option<String>,
}

/// Medplum's IdentityProvider; the client secret comes from a Secret (`R`: in this namespace, or,
/// for cluster-scoped kinds, in a namespace it names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityProvider<R = SecretKeyRef> {
    #[schemars(length(min = 1, max = 2048))]
    pub authorize_url: String,
    #[schemars(length(min = 1, max = 2048))]
    pub token_url: String,
    #[schemars(length(min = 1, max = 2048))]
    pub user_info_url: String,
    #[schemars(length(min = 1, max = 256))]
    pub client_id: String,
    /// Where the identity provider's client secret is (Medplum requires one).
    pub client_secret_ref: R,
    /// `client_secret_basic` or `client_secret_post`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_auth_method: Option<TokenAuthMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_pkce: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_subject: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenAuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
}

/// A key of a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The Secret the workloads mount.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretSpec {
    /// Name of the Secret; default `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Key names; the defaults are the ones the Medplum CLI and SDK read.
    #[serde(default)]
    pub keys: SecretKeys,
    /// Extra labels on the Secret (not `medplum.com/` ones, nor `app.kubernetes.io/managed-by`: the
    /// operator sets and watches those).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(k, !k.startsWith('medplum.com/') && k != 'app.kubernetes.io/managed-by')",
        "message": "medplum.com/ labels and app.kubernetes.io/managed-by are the operator's"
    }], "maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Secret (not `medplum.com/` ones: the operator keeps its state there).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(k, !k.startsWith('medplum.com/'))",
        "message": "medplum.com/ annotations are the operator's"
    }], "maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 4096}))]
    pub annotations: BTreeMap<String, String>,
    /// Write the keys into an existing Secret that the operator does not own, leaving its other keys alone.
    /// Without it, an existing Secret not made by the operator is never touched. Even with it, only an
    /// `Opaque` Secret that no connection uses and no other ClientApplication writes is written into.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
}

/// Names of the keys written to the Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeys {
    #[serde(default = "key_base_url")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub base_url: String,
    #[serde(default = "key_client_id")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub client_id: String,
    #[serde(default = "key_client_secret")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub client_secret: String,
    #[serde(default = "key_token_url")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub token_url: String,
    #[serde(default = "key_project_id")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(max = 253))]
    pub project_id: String,
}

fn key_base_url() -> String {
    "MEDPLUM_BASE_URL".into()
}
fn key_client_id() -> String {
    "MEDPLUM_CLIENT_ID".into()
}
fn key_client_secret() -> String {
    "MEDPLUM_CLIENT_SECRET".into()
}
fn key_token_url() -> String {
    "MEDPLUM_TOKEN_URL".into()
}
fn key_project_id() -> String {
    "MEDPLUM_PROJECT_ID".into()
}

impl Default for SecretKeys {
    fn default() -> Self {
        Self {
            base_url: key_base_url(),
            client_id: key_client_id(),
            client_secret: key_client_secret(),
            token_url: key_token_url(),
            project_id: key_project_id(),
        }
    }
}

/// When and how the client secret is rotated. A rotation can also be asked for at any time by setting
/// the annotation `medplum.com/rotate` to a new value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Rotate this long after the current secret was issued (`720h`); unset: only on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"), length(max = 32))]
    pub interval: Option<String>,
    /// How long the previous secret keeps working after the Secret switched to the new one; in any
    /// case it works until every restart target rolled out.
    #[serde(default = "default_grace_period")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"), length(max = 32))]
    pub grace_period: String,
    /// Workloads restarted (pod template annotation, as `kubectl rollout restart` does) whenever the
    /// Secret's credentials change; the previous secret is retired only after they rolled out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub restart_targets: Vec<RestartTarget>,
}

fn default_grace_period() -> String {
    "1h".into()
}

impl Default for RotationSpec {
    fn default() -> Self {
        Self { interval: None, grace_period: default_grace_period(), restart_targets: Vec::new() }
    }
}

/// A workload in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RestartTarget {
    pub kind: WorkloadKind,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// What deletion of the resource does in Medplum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the membership (ending live tokens), then the ClientApplication.
    #[default]
    Delete,
    /// Leave both in Medplum, without the operator's tag, and leave the Secret in place.
    Orphan,
    /// Set the ClientApplication's status to `off`: no new tokens.
    Disable,
}

/// Take over an existing ClientApplication of the connection's project; only one the connection lists
/// in `spec.limits.adoption.clientIds`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Adopt {
    /// Its id.
    #[schemars(length(min = 1, max = 64))]
    pub client_id: String,
    /// Keep its current secret (written to the Secret as is; only if the connection allows it,
    /// `spec.limits.adoption.allowKeepSecret`), or rotate it at once (the default; the current one keeps
    /// working through the grace period).
    #[serde(default)]
    pub secret: AdoptSecret,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AdoptSecret {
    Keep,
    #[default]
    Rotate,
}

/// Observed state of a ClientApplication.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientApplicationStatus {
    /// `Ready` (credentials in the Secret work and Medplum matches the spec), `CredentialVerified`
    /// (Medplum accepted the Secret's credentials: reason `SecretAccepted` when it authenticated a
    /// request made with them, `TokenIssued` when it issued a token for them, or
    /// `SecretAcceptedAddressBlocked` when the client's IP rules refuse the operator's own address,
    /// which Medplum checks only after the secret matched) and `Rotating` (a rotation is in progress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Medplum ClientApplication id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Its ProjectMembership id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership_id: Option<String>,
    /// The Medplum project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// The Secret holding the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// `sha256:` and the first 16 hex digits of the SHA-256 of the current secret: tells secrets apart,
    /// cannot reveal one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_fingerprint: Option<String>,
    /// When the current secret was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
    /// When the next scheduled rotation starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,
    /// The connection's last `medplum.com/rotate-clients` request this client rotated for: its
    /// current secret was issued after the request, and the previous one is retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_clients_handled: Option<String>,
}
