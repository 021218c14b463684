//! The parts of Medplum's answers the operator reads. Unknown fields are ignored on purpose: `/auth/me`
//! returns the caller's own ClientApplication, secret included, and that part is never deserialized.

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
