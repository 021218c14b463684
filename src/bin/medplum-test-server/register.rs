//! Open patient registration as Medplum 5.1.29 does it: `POST /auth/newuser` makes the User (checking
//! reCAPTCHA when the sign-up page names a project site's key), `POST /auth/newpatient` makes the
//! Patient and a membership with the project's `defaultPatientAccessPolicy` (none: registration is
//! closed), and the authorization code grant with PKCE gives the patient a token. `POST
//! /auth/setpassword` answers the link of an invite or reset email.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::Digest;

use crate::App;
use crate::outcome::{self, Outcome};
use crate::store::{Login, Registration, Store, new_id, now};

type Result<T> = std::result::Result<T, Outcome>;

/// The reCAPTCHA check of a sign-up from a project's site. The test server cannot ask Google, so a
/// token never passes; everything before that is checked as Medplum does.
fn check_recaptcha(app: &App, body: &Value) -> Result<()> {
    let Some(site_key) = body["recaptchaSiteKey"].as_str() else { return Ok(()) };
    let store = app.store();
    let project = store.all("Project").find(|p| {
        body["projectId"].as_str().is_none_or(|id| p["id"] == id)
            && p["site"].as_array().is_some_and(|sites| sites.iter().any(|s| s["recaptchaSiteKey"] == site_key))
    });
    let project = project.ok_or_else(|| Outcome::invalid("Invalid recaptchaSiteKey"))?;
    let site = project["site"].as_array().into_iter().flatten().find(|s| s["recaptchaSiteKey"] == site_key);
    if site.and_then(|s| s["recaptchaSecretKey"].as_str()).is_none_or(str::is_empty) {
        return Err(Outcome::invalid("Invalid recaptchaSecretKey"));
    }
    if body["recaptchaToken"].as_str().is_none_or(str::is_empty) {
        return Err(Outcome::invalid("Recaptcha token is required"));
    }
    Err(Outcome::invalid("Recaptcha failed"))
}

/// `POST /auth/newuser`: a User of the project, and a login waiting for the patient's membership.
pub async fn new_user(State(app): State<Arc<App>>, Json(body): Json<Value>) -> Result<Response> {
    check_recaptcha(&app, &body)?;
    let text = |key: &str| body[key].as_str().unwrap_or_default().to_string();
    let (email, project_id) = (text("email").to_lowercase(), text("projectId"));
    if email.is_empty() || text("password").len() < 8 || text("firstName").is_empty() || text("lastName").is_empty() {
        return Err(Outcome::invalid("Invalid registration"));
    }
    let mut store = app.store();
    if store.find("Project", &project_id).is_none() {
        return Err(Outcome::not_found());
    }
    let project_ref = format!("Project/{project_id}");
    if store.all("User").any(|u| u["email"] == email.as_str() && u["project"]["reference"] == project_ref.as_str()) {
        return Err(Outcome::invalid("Email already registered").with_expression("email"));
    }
    let user = store.create(
        "User",
        json!({"resourceType": "User", "firstName": text("firstName"), "lastName": text("lastName"), "email": email,
               "project": {"reference": project_ref}}),
        Some(&project_id),
        None,
    );
    let login = new_id();
    let registration = Registration {
        user_id: user["id"].as_str().unwrap_or_default().to_string(),
        project_id,
        code_challenge: text("codeChallenge"),
        code_challenge_method: text("codeChallengeMethod"),
        membership_id: None,
        code: None,
    };
    store.registrations.insert(login.clone(), registration);
    Ok(outcome::json(StatusCode::OK, &json!({"login": login, "emailVerificationRequired": false})))
}

/// `POST /auth/newpatient`: the Patient and its membership with the project's default patient policy.
pub async fn new_patient(State(app): State<Arc<App>>, Json(body): Json<Value>) -> Result<Response> {
    let mut store = app.store();
    let login = body["login"].as_str().unwrap_or_default().to_string();
    let mut registration = store.registrations.get(&login).cloned().ok_or_else(Outcome::not_found)?;
    let project_id = registration.project_id.clone();
    let project = store.find("Project", &project_id).cloned().ok_or_else(Outcome::not_found)?;
    let Some(policy) = project["defaultPatientAccessPolicy"]["reference"].as_str() else {
        return Err(Outcome::invalid("Project does not allow open registration"));
    };
    let user = store.find("User", &registration.user_id).cloned().unwrap_or_default();
    let patient = store.create(
        "Patient",
        json!({"resourceType": "Patient", "name": [{"given": [user["firstName"]], "family": user["lastName"]}],
               "telecom": [{"system": "email", "use": "home", "value": user["email"]}]}),
        Some(&project_id),
        None,
    );
    let membership = store.create(
        "ProjectMembership",
        json!({"resourceType": "ProjectMembership", "project": {"reference": format!("Project/{project_id}")},
               "user": {"reference": format!("User/{}", registration.user_id)},
               "profile": {"reference": format!("Patient/{}", patient["id"].as_str().unwrap_or_default())},
               "accessPolicy": {"reference": policy}}),
        Some(&project_id),
        Some("system"),
    );
    let code = new_id();
    registration.membership_id = membership["id"].as_str().map(str::to_string);
    registration.code = Some(code.clone());
    store.registrations.insert(login.clone(), registration);
    Ok(outcome::json(StatusCode::OK, &json!({"login": login, "code": code})))
}

/// The authorization code grant: the code of a finished registration, with its PKCE verifier, redeemed
/// for the login its token is issued for (by auth.rs, with the membership's profile), or the error.
pub fn redeem_code(
    store: &mut Store,
    form: &std::collections::HashMap<String, String>,
) -> std::result::Result<(Login, Value), Response> {
    let code = form.get("code").map(String::as_str).unwrap_or_default();
    let found = store.registrations.iter().find(|(_, r)| !code.is_empty() && r.code.as_deref() == Some(code));
    let Some((login_id, registration)) = found.map(|(id, r)| (id.clone(), r.clone())) else {
        return Err(outcome::token_error("Invalid code"));
    };
    let verifier = form.get("code_verifier").map(String::as_str).unwrap_or_default();
    let expected = match registration.code_challenge_method.as_str() {
        "S256" => URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes())),
        _ => verifier.to_string(),
    };
    if registration.code_challenge.is_empty() || expected != registration.code_challenge {
        return Err(outcome::token_error("Invalid code verifier"));
    }
    let Some(membership_id) = registration.membership_id.clone() else {
        return Err(outcome::token_error("Invalid code"));
    };
    // A code is good for one token.
    store.registrations.remove(&login_id);
    let profile = store.find("ProjectMembership", &membership_id).map(|m| m["profile"].clone()).unwrap_or_default();
    let issued_at = now().as_second();
    let login = Login {
        id: login_id,
        client_id: String::new(),
        membership_id,
        project_id: registration.project_id.clone(),
        scope: "openid".into(),
        issued_at,
        expires_at: issued_at + 3600,
    };
    Ok((login, profile))
}

/// `POST /auth/setpassword`: the user of a security request sets a password, once.
pub async fn set_password(State(app): State<Arc<App>>, Json(body): Json<Value>) -> Result<Response> {
    let mut store = app.store();
    let id = body["id"].as_str().unwrap_or_default();
    if body["password"].as_str().is_none_or(|p| p.len() < 8) {
        return Err(Outcome::invalid("Password must be at least 8 characters").with_expression("password"));
    }
    let mut request = store.find("UserSecurityRequest", id).cloned().ok_or_else(Outcome::not_found)?;
    if request["used"] == true {
        return Err(Outcome::invalid("Already used"));
    }
    if request["type"] == "verify-email" {
        return Err(Outcome::invalid("Invalid request type"));
    }
    if body["secret"].as_str().is_none_or(|s| request["secret"] != s) {
        return Err(Outcome::invalid("Incorrect secret"));
    }
    request["used"] = json!(true);
    store.replace("UserSecurityRequest", id, request);
    Ok(outcome::all_ok())
}
