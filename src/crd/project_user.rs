use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConnectionRef;
use super::client_application::AccessGrant;

/// A person's membership of the Medplum project, created by Medplum's invite and managed by the operator.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "ProjectUser",
    namespaced,
    status = "ProjectUserStatus",
    shortname = "mpuser",
    category = "medplum",
    doc = "A user's membership of the Medplum project, managed by the operator.",
    printcolumn(name = "Membership", type_ = "string", json_path = ".status.membershipId"),
    printcolumn(name = "Profile", type_ = "string", json_path = ".status.profile"),
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
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.email) || has(self.externalId)", "message": "set spec.email or spec.externalId"},
    {"rule": "(has(self.access) && size(self.access) > 0) != (has(self.unrestrictedAccess) && self.unrestrictedAccess)",
     "message": "set spec.access (the policies the membership gets), or spec.unrestrictedAccess: true for a membership without any policy; exactly one of them"},
    {"rule": "(has(self.email) ? has(oldSelf.email) && self.email == oldSelf.email : !has(oldSelf.email)) && (has(self.externalId) ? has(oldSelf.externalId) && self.externalId == oldSelf.externalId : !has(oldSelf.externalId)) && self.resourceType == oldSelf.resourceType",
     "message": "email, externalId and resourceType identify the user and cannot change; create another ProjectUser"}
]))]
pub struct ProjectUserSpec {
    /// The connection to reconcile through; default: the `MedplumConnection` named `default` in this namespace.
    #[serde(default)]
    pub connection_ref: ConnectionRef,
    /// The kind of profile the user gets.
    #[serde(default)]
    pub resource_type: ProfileType,
    #[schemars(length(min = 1, max = 128))]
    pub first_name: String,
    #[schemars(length(min = 1, max = 128))]
    pub last_name: String,
    /// The user's email (Medplum lower-cases it). One of email and externalId is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^@\s]+@[^@\s]+$"), length(max = 254))]
    pub email: Option<String>,
    /// An external identity (makes the user project-scoped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub external_id: Option<String>,
    /// Where the User lives: `project` (only this project) or `server` (can join other projects). Unset:
    /// as Medplum decides (Patients and external ids project, others server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<UserScope>,
    /// A project administrator; only when the connection allows it (`spec.limits.allowAdmin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    /// AccessPolicy resources of this namespace the membership gets, with parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub access: Vec<AccessGrant>,
    /// A membership without any policy (full access); only when the connection allows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unrestricted_access: bool,
    /// Let Medplum send its invitation email.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send_email: bool,
    /// What deletion of the resource does in Medplum.
    #[serde(default)]
    pub deletion_policy: UserDeletionPolicy,
    /// Take over a membership of this user that already exists in the project (Medplum answers the
    /// invite with 409); without it, that is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ProfileType {
    #[default]
    Practitioner,
    Patient,
    RelatedPerson,
}

impl ProfileType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Practitioner => "Practitioner",
            Self::Patient => "Patient",
            Self::RelatedPerson => "RelatedPerson",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserScope {
    Project,
    Server,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UserDeletionPolicy {
    /// Remove the membership (a project-scoped User goes with it).
    #[default]
    Delete,
    /// Leave the membership, no longer managed.
    Orphan,
    /// Keep the membership with `active: false`: the user can no longer use the project.
    Deactivate,
}

/// Observed state of a ProjectUser.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectUserStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The ProjectMembership id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership_id: Option<String>,
    /// The User id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The profile, e.g. `Practitioner/<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}
