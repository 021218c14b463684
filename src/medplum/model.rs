//! The parts of Medplum's answers the operator reads. Unknown fields are ignored on purpose. `/auth/me`
//! returns the caller's own ClientApplication, secrets included: only those two are read, into
//! redacting types, for the rotation of a connection's credential.

use secrecy::SecretString;
use serde::Deserialize;

/// `GET /healthcheck`.
#[derive(Clone, Debug, Deserialize)]
pub struct Health {
    #[serde(default)]
    pub ok: bool,
    #[serde(default)]
    pub version: Option<String>,
}

/// `GET /auth/me`: who the credential is.
#[derive(Clone, Debug, Deserialize)]
pub struct Me {
    pub project: MeProject,
    pub membership: MeMembership,
    #[serde(default)]
    pub profile: MeProfile,
}

/// The caller's own ClientApplication, as `/auth/me` shows it: its current and retiring secret.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeProfile {
    #[serde(default, with = "exposed")]
    pub secret: Option<SecretString>,
    #[serde(default, with = "exposed")]
    pub retiring_secret: Option<SecretString>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeProject {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub super_admin: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MeMembership {
    pub id: String,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub profile: Option<Reference>,
}

/// A FHIR Reference.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Reference {
    pub reference: String,
}

/// `/oauth2/token` success. Holds the token only long enough to move it into a redacting type.
#[derive(Deserialize)]
pub(super) struct TokenResponse {
    pub access_token: String,
    pub expires_in: u64,
}

/// `/oauth2/token` failure: always HTTP 400 `invalid_request` with a description.
#[derive(Deserialize)]
pub(super) struct TokenError {
    #[serde(default)]
    pub error_description: Option<String>,
}

/// The text of an OperationOutcome, for error messages.
#[derive(Deserialize)]
pub(super) struct OperationOutcome {
    #[serde(default)]
    issue: Vec<Issue>,
}

#[derive(Deserialize)]
struct Issue {
    #[serde(default)]
    details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    text: Option<String>,
}

impl OperationOutcome {
    pub fn text(&self) -> Option<String> {
        let texts: Vec<&str> = self.issue.iter().filter_map(|i| i.details.as_ref()?.text.as_deref()).collect();
        (!texts.is_empty()).then(|| texts.join("; "))
    }
}

/// A FHIR resource type the operator reads and writes.
pub trait FhirResource: serde::Serialize + serde::de::DeserializeOwned + Send + Sync {
    const TYPE: &'static str;
    fn meta_mut(&mut self) -> &mut Meta;
    fn meta(&self) -> &Meta;
    fn id(&self) -> Option<&str>;
}

/// Implements [`FhirResource`] for a struct with `id` and `meta` fields.
macro_rules! fhir_resource {
    ($type:ty, $name:literal) => {
        impl FhirResource for $type {
            const TYPE: &'static str = $name;
            fn meta_mut(&mut self) -> &mut Meta {
                &mut self.meta
            }
            fn meta(&self) -> &Meta {
                &self.meta
            }
            fn id(&self) -> Option<&str> {
                self.id.as_deref()
            }
        }
    };
}

/// A FHIR Coding, as used in `meta.tag`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Coding {
    pub system: String,
    pub code: String,
}

/// The part of `meta` the operator sets and reads; the server keeps the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default, skip_serializing)]
    pub version_id: Option<String>,
    /// When Medplum last wrote it (its own clock, RFC 3339 with milliseconds).
    #[serde(default, skip_serializing)]
    pub last_updated: Option<String>,
    /// Set only on creates by a super admin, to name the project the resource belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag: Vec<Coding>,
}

/// The system of the tag Medplum adds to the results of `_elements` searches; never written back.
pub const SUBSETTED: &str = "http://hl7.org/fhir/v3/ObservationValue";

impl Meta {
    pub fn has_tag(&self, tag: &Coding) -> bool {
        self.tag.contains(tag)
    }

    /// The tags to write back over this version: those it has (others' included, Medplum's
    /// [`SUBSETTED`] marker not), with `ours` added.
    pub fn tags_with(&self, ours: &[Coding]) -> Vec<Coding> {
        let mut tags: Vec<Coding> = self.tag.iter().filter(|t| t.system != SUBSETTED).cloned().collect();
        for tag in ours {
            if !tags.contains(tag) {
                tags.push(tag.clone());
            }
        }
        tags
    }
}

/// Serializes a secret into a request body, the one place its value leaves the redacting type.
mod exposed {
    use secrecy::{ExposeSecret, SecretString};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<SecretString>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(secret) => serializer.serialize_some(secret.expose_secret()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SecretString>, D::Error> {
        Ok(Option::<String>::deserialize(deserializer)?.map(SecretString::from))
    }
}

fn client_application_type() -> String {
    "ClientApplication".into()
}

/// Medplum's ClientApplication, with the fields the operator manages. Secrets stay redacted in Debug.
#[derive(Clone, Debug, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientApplicationResource {
    #[serde(default = "client_application_type")]
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub meta: Meta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "exposed")]
    pub secret: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "exposed")]
    pub retiring_secret: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_uris: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkce_optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<IdentityProviderResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_lifetime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_lifetime: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origin: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_scope: Vec<String>,
}

fhir_resource!(ClientApplicationResource, "ClientApplication");

/// Medplum's IdentityProvider; its client secret stays redacted in Debug.
#[derive(Clone, Debug, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityProviderResource {
    pub authorize_url: String,
    pub token_url: String,
    pub user_info_url: String,
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "exposed")]
    pub client_secret: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_auth_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_pkce: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_subject: Option<bool>,
}

impl IdentityProviderResource {
    /// Whether Medplum holds what `self` says, the client secret included.
    pub fn same_as(&self, actual: &Self) -> bool {
        use secrecy::ExposeSecret;
        let secret = |s: &Option<SecretString>| s.as_ref().map(|s| s.expose_secret().to_string());
        self.authorize_url == actual.authorize_url
            && self.token_url == actual.token_url
            && self.user_info_url == actual.user_info_url
            && self.client_id == actual.client_id
            && secret(&self.client_secret) == secret(&actual.client_secret)
            && self.token_auth_method == actual.token_auth_method
            && self.use_pkce == actual.use_pkce
            && self.use_subject == actual.use_subject
    }
}

fn domain_configuration_type() -> String {
    "DomainConfiguration".into()
}

/// Medplum's DomainConfiguration: the identity provider of an email domain. The client secret stays
/// redacted in Debug.
#[derive(Clone, Debug, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainConfigurationResource {
    #[serde(default = "domain_configuration_type")]
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub meta: Meta,
    #[serde(default)]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<IdentityProviderResource>,
}

fhir_resource!(DomainConfigurationResource, "DomainConfiguration");

/// Medplum's Project, as far as a MedplumProject manages it. Each `secret` and `site` entry is kept
/// whole, as its JSON in a redacting string: the operator rewrites these lists, and the entries it does
/// not manage go back exactly as they were.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectResource {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub meta: Meta,
    #[serde(default)]
    pub default_patient_access_policy: Option<Ref>,
    #[serde(default)]
    pub secret: Vec<NamedEntry>,
    #[serde(default)]
    pub site: Vec<NamedEntry>,
}

/// One entry of a Project's `secret` or `site` list: its name, and all of it as JSON (redacted in Debug).
#[derive(Clone, Debug)]
pub struct NamedEntry {
    pub name: String,
    pub json: SecretString,
}

impl NamedEntry {
    pub fn new(value: &serde_json::Value) -> Self {
        Self {
            name: value["name"].as_str().unwrap_or_default().to_string(),
            json: SecretString::from(value.to_string()),
        }
    }

    /// The entry as JSON, for a comparison or a write.
    pub fn value(&self) -> serde_json::Value {
        use secrecy::ExposeSecret;
        serde_json::from_str(self.json.expose_secret()).unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for NamedEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self::new(&serde_json::Value::deserialize(deserializer)?))
    }
}

/// A FHIR Reference with an optional display (which the operator never compares).
#[derive(Clone, Debug, Default, serde::Serialize, Deserialize)]
pub struct Ref {
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Ref {
    pub fn to(reference: impl Into<String>) -> Self {
        Self { reference: reference.into(), display: None }
    }
}

impl PartialEq for Ref {
    fn eq(&self, other: &Self) -> bool {
        self.reference == other.reference
    }
}

/// A FHIR Identifier.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Identifier {
    pub system: String,
    pub value: String,
}

/// One `ProjectMembership.access[]` entry.
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct MembershipAccess {
    pub policy: Ref,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameter: Vec<MembershipParameter>,
}

/// A policy parameter: `valueString` or `valueReference`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipParameter {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_reference: Option<Ref>,
}

fn membership_type() -> String {
    "ProjectMembership".into()
}

/// Medplum's ProjectMembership. Fields the operator does not manage are kept as they are.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipResource {
    #[serde(default = "membership_type")]
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub meta: Meta,
    pub project: Ref,
    pub user: Ref,
    pub profile: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_policy: Option<Ref>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<MembershipAccess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

fhir_resource!(MembershipResource, "ProjectMembership");

/// A search result page.
#[derive(Deserialize)]
pub(super) struct Bundle<T> {
    #[serde(default = "Vec::new")]
    pub entry: Vec<BundleEntry<T>>,
}

#[derive(Deserialize)]
pub(super) struct BundleEntry<T> {
    pub resource: T,
}

fn access_policy_type() -> String {
    "AccessPolicy".into()
}

/// Medplum's AccessPolicy, with every field the operator manages (`basedOn` is not offered: Medplum does
/// not follow it on stored policies).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyResource {
    #[serde(default = "access_policy_type")]
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub meta: Meta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compartment: Option<Ref>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource: Vec<PolicyResourceEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_access_rule: Vec<IpAccessRuleEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub based_on: Vec<Ref>,
}

fhir_resource!(AccessPolicyResource, "AccessPolicy");

/// `AccessPolicy.resource[]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyResourceEntry {
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criteria: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interaction: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readonly_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_constraint: Vec<Expression>,
}

/// A FHIR Expression (`writeConstraint` entries are FHIRPath).
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct Expression {
    pub language: String,
    pub expression: String,
}

/// `AccessPolicy.ipAccessRule[]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct IpAccessRuleEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub value: String,
    pub action: String,
}

/// `POST /admin/projects/{id}/invite`.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InviteRequest {
    pub resource_type: String,
    pub first_name: String,
    pub last_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub send_email: bool,
    pub admin: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<MembershipAccess>,
    pub membership: InviteMembership,
}

/// Fields of the membership an invite creates.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InviteMembership {
    pub identifier: Vec<Identifier>,
}

/// A person's profile (Practitioner, Patient or RelatedPerson); only its name is managed.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileResource {
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub meta: Meta,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name: Vec<HumanName>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// A FHIR HumanName, the parts the operator sets.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, Deserialize)]
pub struct HumanName {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub given: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// A Project, as far as the operator reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct ProjectSummary {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}
