//! Response builders: FHIR JSON and OperationOutcome errors shaped like Medplum's.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
pub const JSON: &str = "application/json; charset=utf-8";

/// A FHIR JSON response.
pub fn fhir(status: StatusCode, body: &Value) -> Response {
    with_type(status, FHIR_JSON, body)
}

/// A plain JSON response (the admin and auth endpoints use `application/json`).
pub fn json(status: StatusCode, body: &Value) -> Response {
    with_type(status, JSON, body)
}

fn with_type(status: StatusCode, content_type: &'static str, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Adds the `ETag` and `Last-Modified` headers a read of a versioned resource carries.
pub fn with_version_headers(mut response: Response, resource: &Value) -> Response {
    let meta = &resource["meta"];
    if let Some(version) = meta["versionId"].as_str()
        && let Ok(value) = HeaderValue::from_str(&format!("W/\"{version}\""))
    {
        response.headers_mut().insert(header::ETAG, value);
    }
    if let Some(updated) = meta["lastUpdated"].as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        let http_date = updated.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string();
        if let Ok(value) = HeaderValue::from_str(&http_date) {
            response.headers_mut().insert(header::LAST_MODIFIED, value);
        }
    }
    response
}

/// An OperationOutcome error, the shape of every Medplum error outside `/oauth2/token`.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: StatusCode,
    id: Option<&'static str>,
    code: &'static str,
    text: String,
    diagnostics: Option<String>,
    expression: Option<String>,
}

impl Outcome {
    fn new(status: StatusCode, id: Option<&'static str>, code: &'static str, text: impl Into<String>) -> Self {
        Self { status, id, code, text: text.into(), diagnostics: None, expression: None }
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, Some("unauthorized"), "login", "Unauthorized")
    }
    pub fn forbidden() -> Self {
        Self::new(StatusCode::FORBIDDEN, Some("forbidden"), "forbidden", "Forbidden")
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, Some("not-found"), "not-found", "Not found")
    }
    pub fn gone() -> Self {
        Self::new(StatusCode::GONE, Some("gone"), "deleted", "Gone")
    }
    pub fn conflict(text: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, Some("conflict"), "conflict", text)
    }
    pub fn precondition_failed() -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, Some("precondition-failed"), "processing", "Precondition Failed")
    }
    pub fn multiple_matches() -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            Some("multiple-matches"),
            "multiple-matches",
            "Multiple resources found matching condition",
        )
    }
    /// 400 `invalid` (bad request parameters, admin-endpoint validation, business rules).
    pub fn invalid(text: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, None, "invalid", text)
    }
    /// 400 `structure` (resource validation), with the FHIRPath of the offending element.
    pub fn structure(text: impl Into<String>, expression: impl Into<String>) -> Self {
        let mut outcome = Self::new(StatusCode::BAD_REQUEST, None, "structure", text);
        outcome.expression = Some(expression.into());
        outcome
    }
    /// 400 "Authentication error": Medplum's answer for credentials whose login is no longer valid.
    pub fn authentication_error(diagnostics: &str) -> Self {
        let mut outcome = Self::new(StatusCode::BAD_REQUEST, None, "invalid", "Authentication error");
        outcome.diagnostics = Some(format!("OperationOutcomeError: {diagnostics}"));
        outcome
    }
    /// 429 with the rate limiter's state as diagnostics and, like Medplum, no `Retry-After`.
    pub fn too_many_requests(ms_before_next: u64, consumed: u32, limit: u32) -> Self {
        let mut outcome =
            Self::new(StatusCode::TOO_MANY_REQUESTS, Some("too-many-requests"), "throttled", "Too Many Requests");
        outcome.diagnostics = Some(
            json!({"_remainingPoints": 0, "_msBeforeNext": ms_before_next, "_consumedPoints": consumed,
                   "_isFirstInDuration": false, "limit": limit})
            .to_string(),
        );
        outcome
    }
    pub fn server_error() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, None, "exception", "Internal server error")
    }
    pub fn with_expression(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }

    pub fn body(&self) -> Value {
        let mut issue = json!({"severity": "error", "code": self.code, "details": {"text": self.text}});
        if let Some(d) = &self.diagnostics {
            issue["diagnostics"] = json!(d);
        }
        if let Some(e) = &self.expression {
            issue["expression"] = json!([e]);
        }
        let mut body = json!({
            "resourceType": "OperationOutcome",
            "issue": [issue],
            "extension": [{
                "url": "https://medplum.com/fhir/StructureDefinition/tracing",
                "extension": [
                    {"url": "requestId", "valueId": uuid::Uuid::new_v4().to_string()},
                    {"url": "traceId", "valueId": uuid::Uuid::new_v4().to_string()},
                ],
            }],
        });
        if let Some(id) = self.id {
            body["id"] = json!(id);
        }
        body
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let mut response = fhir(self.status, &self.body());
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The 200 "All OK" outcome of a delete.
pub fn all_ok() -> Response {
    let body = json!({
        "resourceType": "OperationOutcome",
        "id": "ok",
        "issue": [{"severity": "information", "code": "informational", "details": {"text": "All OK"}}],
    });
    fhir(StatusCode::OK, &body)
}

/// A `/oauth2/token` error: always 400 `invalid_request` with a description.
pub fn token_error(description: &str) -> Response {
    json(StatusCode::BAD_REQUEST, &json!({"error": "invalid_request", "error_description": description}))
}

pub type Result<T, E = Outcome> = std::result::Result<T, E>;
