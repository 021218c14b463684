use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConnectionRef;

/// A Medplum AccessPolicy managed by the operator. ClientApplications and ProjectUsers of the same
/// namespace grant it through `spec.access[].policyRef`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    status = "AccessPolicyStatus",
    shortname = "mppolicy",
    category = "medplum",
    doc = "A Medplum AccessPolicy managed by the operator.",
    printcolumn(name = "Policy ID", type_ = "string", json_path = ".status.policyId"),
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
pub struct AccessPolicySpec {
    /// The connection to reconcile through; default: the `MedplumConnection` named `default` in this namespace.
    #[serde(default)]
    pub connection_ref: ConnectionRef,
    /// Medplum `AccessPolicy.name`; default `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub display_name: Option<String>,
    /// Compartment that resources created under this policy are put in, e.g. `%organization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compartment: Option<CompartmentRef>,
    /// What may be done, per resource type. Nothing listed: nothing allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub resources: Vec<PolicyResource>,
    /// IP address rules, checked in order when a token is requested; the first whose value is `*` or a
    /// prefix of the caller's address decides. Medplum matches prefixes (`10.2.`), not CIDR ranges, and
    /// allows an address no rule matches, so a list must end with a `block` rule (`{value: "*", action:
    /// block}` blocks the rest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "size(self) == 0 || self[size(self) - 1].action == 'block'",
        "message": "the last IP rule must be a block rule: Medplum allows any address that no rule matches"
    }]))]
    pub ip_access_rules: Vec<IpAccessRule>,
    /// What deletion of the resource does in Medplum.
    #[serde(default)]
    pub deletion_policy: PolicyDeletionPolicy,
    /// Take over an existing Medplum AccessPolicy instead of creating one; only one the connection
    /// lists in `spec.limits.adoption.policyIds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<AdoptPolicy>,
}

/// The existing AccessPolicy to take over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdoptPolicy {
    /// Its id.
    #[schemars(length(min = 1, max = 64))]
    pub policy_id: String,
}

/// A FHIR reference, or a `%variable` standing for one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CompartmentRef {
    #[schemars(length(min = 1, max = 256))]
    pub reference: String,
}

/// The rights on one resource type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.criteria) || self.criteria.startsWith(self.resourceType + '?')",
    "message": "criteria must start with the resourceType and '?', e.g. Observation?status=final"
}]))]
pub struct PolicyResource {
    /// A FHIR resource type, or `*` for all.
    #[schemars(regex(pattern = r"^(\*|[A-Z][A-Za-z]+)$"), length(max = 64))]
    pub resource_type: String,
    /// FHIR search criteria the resources must match, e.g. `Observation?status=final`; `%variables` are
    /// replaced by the membership's parameters. Only plain parameters and the `:not` and `:missing`
    /// modifiers, no chained parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub criteria: Option<String>,
    /// Read only (read, search, history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// The interactions allowed; empty: all (or the read-only ones with `readonly`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub interactions: Vec<Interaction>,
    /// Fields neither readable nor writable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    pub hidden_fields: Vec<String>,
    /// Fields readable but not writable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    pub readonly_fields: Vec<String>,
    /// FHIRPath invariants a written resource must satisfy (`%before`, `%after` available).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), inner(length(max = 256)))]
    pub write_constraints: Vec<String>,
}

/// A FHIR interaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interaction {
    Read,
    Vread,
    History,
    Search,
    Create,
    Update,
    Delete,
}

impl Interaction {
    pub const ALL: [Interaction; 7] = [
        Interaction::Read,
        Interaction::Vread,
        Interaction::History,
        Interaction::Search,
        Interaction::Create,
        Interaction::Update,
        Interaction::Delete,
    ];
    pub const READ_ONLY: [Interaction; 4] =
        [Interaction::Read, Interaction::Vread, Interaction::History, Interaction::Search];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Vread => "vread",
            Self::History => "history",
            Self::Search => "search",
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

/// An IP address rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IpAccessRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub name: Option<String>,
    /// An address prefix such as `10.2.` or `192.168.1.7` (Medplum compares prefixes; no `/` ranges), or
    /// `*` for every address.
    #[schemars(regex(pattern = r"^(\*|[0-9A-Fa-f.:]+)$"), length(min = 1, max = 64))]
    pub value: String,
    pub action: IpAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpAction {
    Allow,
    Block,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyDeletionPolicy {
    /// Delete the policy from Medplum, once no membership uses it.
    #[default]
    Delete,
    /// Leave it in Medplum, without the operator's tag.
    Orphan,
}

/// Observed state of an AccessPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyStatus {
    /// kstatus conditions; `Ready` means the policy exists in Medplum as specified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Medplum AccessPolicy id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
}
