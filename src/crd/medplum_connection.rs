use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which Medplum server and project to use, and the project-admin credential to use it with.
/// Resources in the same namespace refer to it by name (`spec.connectionRef`).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "MedplumConnection",
    namespaced,
    status = "ConnectionStatus",
    shortname = "mpconn",
    category = "medplum",
    doc = "A Medplum server, project and project-admin credential that resources in this namespace are reconciled through.",
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
pub struct MedplumConnectionSpec {
    /// Base URL of the Medplum server, for example `https://api.medplum.com/`.
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"), length(max = 2048))]
    pub base_url: String,
    /// The Medplum project the credential must belong to. When set, the connection is Ready only if the
    /// credential is a member of exactly this project; when empty, the credential's project is used and
    /// reported in `status.projectId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub project_id: Option<String>,
    /// Secret in this namespace holding the client id and secret of a project-admin ClientApplication.
    pub credentials_secret_ref: CredentialsSecretRef,
    /// PEM CA bundle to trust for the Medplum server, in addition to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundleRef>,
    /// The credential is meant to be a super-admin client (of Medplum's Super Admin project); it then
    /// manages the project named in `spec.projectId`. Without this, a super-admin credential is refused:
    /// a project-admin ClientApplication of the project is the least privilege that works.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub super_admin_credential: bool,
    /// The most that resources reconciled through this connection may ask for.
    #[serde(default)]
    pub limits: ConnectionLimits,
    /// Rotation of the credential itself (opt-in): the operator then writes the credentials Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_rotation: Option<CredentialRotationSpec>,
}

/// When the connection's own credential is rotated. Setting this lets the operator write the two
/// credential keys of the credentials Secret (and nothing else there); every connection using that
/// Secret must set it. A rotation can also be asked for at any time by setting the annotation
/// `medplum.com/rotate` on the connection to a new value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRotationSpec {
    /// Rotate this long after the current secret was stored (`2160h`); unset: only on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"), length(max = 32))]
    pub interval: Option<String>,
    /// How long the previous secret keeps working after the new one was stored, for anything else
    /// that reads the Secret (another installation, a pod that has not reloaded it yet).
    #[serde(default = "default_credential_grace_period")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"), length(max = 32))]
    pub grace_period: String,
}

fn default_credential_grace_period() -> String {
    "10m".into()
}

/// The ceiling of what resources using a connection may grant in Medplum.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimits {
    /// Allow memberships without any access policy (`unrestrictedAccess`), which Medplum treats as full
    /// access to the project. Default: not allowed.
    #[serde(default)]
    pub allow_unrestricted_access: bool,
    /// Allow project administration: ProjectUsers with `admin: true`, and AccessPolicies that grant
    /// `ClientApplication`, `AccessPolicy` or `Bot` (or `*`, which includes them), whose holders can read
    /// every client's secret, rewrite the policies of others, or change code that runs with other
    /// memberships' rights. Default: not allowed.
    #[serde(default)]
    pub allow_admin: bool,
    /// Project-level settings through a MedplumProject: open patient registration and its policy,
    /// sites with reCAPTCHA keys, and project secrets (which every Bot of the project reads). They
    /// concern the whole project, beyond any namespace. Default: not allowed.
    #[serde(default)]
    pub allow_project_settings: bool,
    /// The resource types and interactions that AccessPolicies made through this connection may grant.
    /// Unset: any but the project administration types above. A policy granting anything else is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub allowed_resources: Option<Vec<ResourceCeiling>>,
    /// Which existing Medplum objects resources may take over (`spec.adopt`). Default: none.
    #[serde(default, skip_serializing_if = "AdoptionLimits::is_none")]
    pub adoption: AdoptionLimits,
}

/// The existing Medplum objects a connection's namespaces may adopt. Whatever is listed, the operator
/// never adopts a connection's own credential, an object another medplum-operator manages (any cluster
/// id), or one whose current access is beyond these limits (admin, no policy, resources not allowed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdoptionLimits {
    /// ClientApplications that may be adopted, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 64)))]
    pub client_ids: Vec<String>,
    /// AccessPolicies that may be adopted, by id. An adopted policy is rewritten as its resource says,
    /// for every membership that has it, so list only policies the namespace may decide for all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 64)))]
    pub policy_ids: Vec<String>,
    /// Members ProjectUsers may adopt, by email: `ada@example.org`, or `@example.org` for a whole domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 320)))]
    pub user_emails: Vec<String>,
    /// Members ProjectUsers may adopt, by external id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 256)))]
    pub user_external_ids: Vec<String>,
    /// An adopted ClientApplication may keep its current secret (`spec.adopt.secret: Keep`), which hands
    /// a secret someone else already holds to the namespace. Default: adoption always rotates the secret.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_keep_secret: bool,
    /// Deleting the resource of an adopted object may delete, disable or deactivate it in Medplum as its
    /// `deletionPolicy` says. Default: an adopted object is only released (left in Medplum as it is, no
    /// longer managed), since the namespace did not create it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_delete: bool,
}

impl AdoptionLimits {
    fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the ClientApplication `id` is listed.
    pub fn admits_client(&self, id: &str) -> bool {
        self.client_ids.iter().any(|listed| listed == id)
    }

    /// Whether the AccessPolicy `id` is listed.
    pub fn admits_policy(&self, id: &str) -> bool {
        self.policy_ids.iter().any(|listed| listed == id)
    }
    /// Whether a member with this email (Medplum lower-cases it) or external id is listed.
    pub fn admits_user(&self, email: Option<&str>, external_id: Option<&str>) -> bool {
        let email = email.map(str::to_lowercase);
        let by_email = email.as_deref().is_some_and(|email| {
            self.user_emails.iter().map(|e| e.to_lowercase()).any(|listed| match listed.strip_prefix('@') {
                Some(domain) => email.rsplit_once('@').is_some_and(|(_, d)| d == domain),
                None => listed == email,
            })
        });
        let by_external_id = external_id.is_some_and(|x| self.user_external_ids.iter().any(|listed| listed == x));
        by_email || by_external_id
    }
}

/// What policies may grant on one resource type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceCeiling {
    /// A resource type, or `*` for every type.
    #[serde(rename = "resourceType")]
    #[schemars(regex(pattern = r"^(\*|[A-Z][A-Za-z]+)$"), length(max = 64))]
    pub resource_type: String,
    /// The interactions that may be granted; empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub interactions: Vec<super::access_policy::Interaction>,
}

/// A Secret in the connection's namespace with the project-admin client credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
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

pub(crate) fn default_client_id_key() -> String {
    "MEDPLUM_CLIENT_ID".into()
}

pub(crate) fn default_client_secret_key() -> String {
    "MEDPLUM_CLIENT_SECRET".into()
}

/// A key of a Secret or a ConfigMap (exactly one) that holds PEM certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretRef) != has(self.configMapRef)",
    "message": "set exactly one of secretRef and configMapRef"
}]))]
pub struct CaBundleRef {
    /// A Secret key holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeySelector>,
    /// A ConfigMap key holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeySelector>,
}

/// One key of a named Secret or ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeySelector {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within it.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Observed state of a connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// `Ready` is True once a token was obtained with the credential and the credential was verified to be
    /// a project admin of the expected project.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Medplum project the credential belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// The name of that project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_name: Option<String>,
    /// The Medplum server version reported by `/healthcheck`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// The ClientApplication the credential authenticates as (an id, never its secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The rotation of the credential, when `spec.credentialRotation` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_rotation: Option<CredentialRotationStatus>,
    /// The rotation of every ClientApplication the connection serves, asked for with the annotation
    /// `medplum.com/rotate-clients`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_rotation: Option<ClientRotationStatus>,
}

/// Where the rotation of every ClientApplication the connection serves stands. Each client rotates as
/// its own rotation would (grace period, restart targets rolled out first); it counts as rotated once
/// its previous secret is retired, which its `status.rotateClientsHandled` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientRotationStatus {
    /// The `medplum.com/rotate-clients` value being acted on.
    pub request: String,
    /// When the operator first saw the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When every client had rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The ClientApplications that use the connection.
    pub clients: u32,
    /// Those of them that rotated for this request.
    pub rotated: u32,
    /// `rotated/clients`, for the printer column.
    pub progress: String,
}

/// Where the rotation of a connection's credential stands. The authority is Medplum (which secret is
/// current, which retiring) and the Secret (its value, and the time it was stored, in its annotation
/// `medplum.com/credential-stored-at`); this reports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRotationStatus {
    /// When the operator last stored a new secret of the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
    /// When the next scheduled rotation starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,
    /// When the previous secret is retired, while it still works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_time: Option<Time>,
    /// The last `medplum.com/rotate` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_request: Option<String>,
}
