use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ConnectionRef;
use super::client_application::{LocalObjectRef, SecretKeyRef};

/// The project-level settings of the connection's Medplum project: open patient registration, the
/// sites that offer it (with reCAPTCHA), and the project secrets Bots read. One per project: a second
/// one for the same connection or project is refused (reason `ProjectAlreadyDeclared`).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "MedplumProject",
    namespaced,
    status = "MedplumProjectStatus",
    shortname = "mpproject",
    category = "medplum",
    doc = "The project-level settings of a Medplum project: patient registration, sites and project secrets.",
    printcolumn(name = "Project", type_ = "string", json_path = ".status.projectId"),
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
pub struct MedplumProjectSpec {
    /// The connection whose project this declares; its `spec.limits.allowProjectSettings` must allow it.
    #[serde(default)]
    pub connection_ref: ConnectionRef,
    /// Open patient registration (Medplum's `Project.defaultPatientAccessPolicy`). Unset: left as the
    /// project has it (a new project is open, with Medplum's default patient policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_registration: Option<PatientRegistration>,
    /// Sites that offer sign-in and registration (`Project.site`), matched by name; sites not listed
    /// here and never written by the operator are left alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[schemars(length(max = 20))]
    pub sites: Vec<Site>,
    /// Project secrets (`Project.secret`, what Bots read as `event.secrets`), each from a key of a
    /// Secret of this namespace, matched by name; entries not listed here and never written by the
    /// operator are left alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[schemars(length(max = 100))]
    pub secrets: Vec<ProjectSecret>,
    /// What deletion of the resource (or of an entry from `sites` or `secrets`) does in Medplum.
    #[serde(default)]
    pub deletion_policy: ProjectDeletionPolicy,
}

/// Whether patients may sign themselves up, and the AccessPolicy they then get.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!self.open || has(self.accessPolicyRef)", "message": "open registration needs accessPolicyRef"}]))]
pub struct PatientRegistration {
    /// `true`: anyone may register as a patient of the project and gets the policy; `false`: Medplum
    /// refuses registration ("Project does not allow open registration").
    pub open: bool,
    /// The AccessPolicy resource of this namespace that self-registered patients get. It should be
    /// limited to the patient's own compartment (e.g. `compartment.reference: "%patient"` and
    /// criteria with `_compartment=%patient`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_policy_ref: Option<LocalObjectRef>,
}

/// A site of the project: the domains of an app, and the reCAPTCHA keys Medplum checks registrations
/// from it with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Site {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Host names of the app, e.g. `portal.example.org`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(length(max = 253)))]
    pub domains: Vec<String>,
    /// The public reCAPTCHA site key the app's sign-up page uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub recaptcha_site_key: Option<String>,
    /// Where the reCAPTCHA secret key is (a key of a Secret of this namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recaptcha_secret_key_ref: Option<SecretKeyRef>,
}

/// One project secret, from a key of a Secret of this namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSecret {
    /// The name Bots read it by, e.g. `SMTP_PASSWORD`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    pub secret_key_ref: SecretKeyRef,
    /// The FHIR type of the value: `String` (default), `Integer` or `Boolean` (Medplum's own project
    /// SMTP settings read `smtpPort` as an integer and `smtpSecure` as a boolean).
    #[serde(default)]
    pub r#type: ProjectSecretType,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ProjectSecretType {
    #[default]
    String,
    Integer,
    Boolean,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ProjectDeletionPolicy {
    /// Remove the sites and secrets the operator wrote, and give patient registration back the
    /// setting it had before the operator changed it.
    #[default]
    Delete,
    /// Leave everything in Medplum as it is.
    Orphan,
}

/// Observed state of a MedplumProject.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MedplumProjectStatus {
    /// kstatus conditions; `Ready` means Medplum's project holds what the spec says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// The names of the sites the operator wrote (names only, never a value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// The names of the project secrets the operator wrote (names only, never a value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Patient registration's setting before the operator first changed it, given back on deletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_registration: Option<OriginalRegistration>,
}

/// Medplum's `defaultPatientAccessPolicy` as it was: a reference, or none (registration closed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OriginalRegistration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_patient_access_policy: Option<String>,
}
