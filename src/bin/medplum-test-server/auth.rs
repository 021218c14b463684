//! OAuth2 client credentials, bearer/basic authentication of API calls, `/auth/me`, health.

use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use crate::App;
use crate::faults::Peer;
use crate::outcome::{self, Outcome};
use crate::store::{Login, Store, new_id, now, project_of};

/// Who is calling, resolved from a bearer token or HTTP Basic client credentials.
#[derive(Clone)]
pub struct Caller {
    pub client_id: String,
    pub membership: Value,
    pub project_id: String,
    pub super_admin: bool,
    pub extended: bool,
}

impl Caller {
    pub fn admin(&self) -> bool {
        self.super_admin || self.membership["admin"] == true
    }

    /// The caller's profile: its client, or the person a user's membership is for.
    pub fn profile_ref(&self) -> String {
        match self.membership["profile"]["reference"].as_str() {
            Some(profile) => profile.to_string(),
            None => format!("ClientApplication/{}", self.client_id),
        }
    }

    /// Whether the caller may see a resource of this project at all.
    pub fn sees_project(&self, project: Option<&str>) -> bool {
        self.super_admin || project == Some(self.project_id.as_str())
    }

    /// Whether the caller's access policy lets it do `interaction` (`read`, `vread`, `history`,
    /// `search`, `create`, `update`, `delete`) on `rtype`. Super admins may use every type. The
    /// project administration types are for project admins only, whatever their policies say;
    /// everything else follows the union of the membership's policies, for admins too (Medplum's
    /// applyProjectAdminAccessPolicy), the way Medplum reads `resource[].resourceType`, `readonly`
    /// and `interaction` (criteria are not evaluated here). No policy at all: full access.
    pub fn may(&self, store: &Store, rtype: &str, interaction: &str) -> bool {
        if self.super_admin {
            return true;
        }
        // Medplum's protected types: super admins only.
        if matches!(rtype, "Login" | "DomainConfiguration" | "JsonWebKey") {
            return false;
        }
        if matches!(rtype, "Project" | "ProjectMembership" | "User" | "UserSecurityRequest") {
            return self.admin();
        }
        let policies = membership_policies(&self.membership);
        if policies.is_empty() {
            return true; // a membership without any policy has full access
        }
        policies.iter().filter_map(|reference| store.resolve(reference)).any(|policy| {
            policy["resource"].as_array().into_iter().flatten().any(|rule| {
                let type_matches = rule["resourceType"] == rtype || rule["resourceType"] == "*";
                let listed: Vec<&str> =
                    rule["interaction"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                // `readonly` without interactions means the read-only ones (Medplum's buildAccessPolicy).
                let allowed = match (listed.is_empty(), rule["readonly"] == true) {
                    (false, _) => listed.contains(&interaction),
                    (true, true) => matches!(interaction, "search" | "read" | "history" | "vread"),
                    (true, false) => true,
                };
                type_matches && allowed
            })
        })
    }
}

/// The policy references of a membership: `accessPolicy` and every `access[].policy`.
pub fn membership_policies(membership: &Value) -> Vec<String> {
    let mut refs: Vec<String> =
        membership["accessPolicy"]["reference"].as_str().map(str::to_string).into_iter().collect();
    refs.extend(
        membership["access"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["policy"]["reference"].as_str())
            .map(str::to_string),
    );
    refs
}

const INVALID_POLICY: &str = "Cannot authenticate: Invalid access policy configuration. Please contact your administrator to update your project membership.";

/// Whether the IP rules of a membership's policies let `address` in. Medplum puts the rules of all its
/// policies in one list, in order; the first rule whose value is `*`, the address or a prefix of it
/// decides, and an address no rule matches is allowed.
fn ip_allowed(store: &Store, membership: &Value, address: &std::net::IpAddr) -> bool {
    let address = address.to_string();
    let rules: Vec<Value> = membership_policies(membership)
        .iter()
        .filter_map(|reference| store.resolve(reference))
        .flat_map(|policy| policy["ipAccessRule"].as_array().cloned().unwrap_or_default())
        .collect();
    for rule in rules {
        let value = rule["value"].as_str().unwrap_or_default();
        if value == "*" || address.starts_with(value) {
            return rule["action"] != "block";
        }
    }
    true
}

/// Checks that a membership can still act: its policies all exist.
fn check_policies(store: &Store, membership: &Value) -> Result<(), Outcome> {
    if membership_policies(membership).iter().all(|r| store.resolve(r).is_some()) {
        Ok(())
    } else {
        Err(Outcome::authentication_error(INVALID_POLICY))
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        let extended = parts.headers.get("x-medplum").is_some_and(|v| v.as_bytes() == b"extended");
        let auth = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let store = app.store();
        let caller = if let Some(token) = auth.strip_prefix("Bearer ") {
            caller_from_token(&store, token.trim())
        } else if let Some(basic) = auth.strip_prefix("Basic ") {
            let peer = parts.extensions.get::<axum::extract::ConnectInfo<crate::faults::Peer>>().map(|c| c.0.0.ip());
            caller_from_basic(&store, basic.trim(), &app.base_url, peer)
        } else {
            Err(unauthorized("Bearer", &app.base_url))
        }?;
        let on_behalf_of = parts.headers.get("x-medplum-on-behalf-of").and_then(|v| v.to_str().ok());
        let caller = match on_behalf_of {
            Some(target) => acting_for(&store, caller, target).map_err(IntoResponse::into_response)?,
            None => caller,
        };
        Ok(Caller { extended, ..caller })
    }
}

/// `X-Medplum-On-Behalf-Of: ProjectMembership/<id>` or `<Profile>/<id>`: a project admin (or super
/// admin) whose own rights let it read the member's profile acts with the access of that membership
/// of its project (record i3); anyone else gets 400 "Authentication error" (diagnostics "Forbidden").
fn acting_for(store: &Store, caller: Caller, target: &str) -> Result<Caller, Outcome> {
    if !caller.admin() {
        return Err(Outcome::authentication_error("Forbidden"));
    }
    let membership = match target.strip_prefix("ProjectMembership/") {
        Some(id) => store.find("ProjectMembership", id).filter(|m| caller.sees_project(project_of(m))),
        None => store
            .all("ProjectMembership")
            .find(|m| m["profile"]["reference"] == target && project_of(m) == Some(caller.project_id.as_str())),
    };
    let membership = membership.ok_or_else(|| Outcome::authentication_error("Forbidden"))?;
    // Medplum reads the member's profile with the caller's own rights.
    let profile_type = membership["profile"]["reference"].as_str().and_then(|r| r.split('/').next()).unwrap_or("");
    if !caller.may(store, profile_type, "read") {
        return Err(Outcome::authentication_error("Forbidden"));
    }
    check_policies(store, membership)?;
    let project_id = project_of(membership).unwrap_or_default().to_string();
    Ok(Caller { membership: membership.clone(), project_id, super_admin: false, ..caller })
}

fn unauthorized(scheme: &str, realm: &str) -> Response {
    let mut response = Outcome::unauthorized().into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("{scheme} realm=\"{realm}\"")) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn caller_from_token(store: &Store, token: &str) -> Result<Caller, Response> {
    let login = store.tokens.get(token).ok_or_else(|| Outcome::unauthorized().into_response())?;
    if login.expires_at <= now().as_second() {
        return Err(Outcome::unauthorized().into_response());
    }
    // Tokens are bound to the login, not to the secret or the client's status (records c6, d14); a
    // deleted client or membership ends them with "Authentication error" (c8, m2).
    let membership = store
        .find("ProjectMembership", &login.membership_id)
        .ok_or_else(|| Outcome::authentication_error("Gone").into_response())?;
    // A user's login (authorization code) has no client.
    if !login.client_id.is_empty() && store.find("ClientApplication", &login.client_id).is_none() {
        return Err(Outcome::authentication_error("Gone").into_response());
    }
    if membership["active"] == false {
        return Err(Outcome::unauthorized().into_response());
    }
    check_policies(store, membership).map_err(IntoResponse::into_response)?;
    Ok(caller_for(store, &login.client_id, membership))
}

fn caller_from_basic(
    store: &Store,
    encoded: &str,
    realm: &str,
    peer: Option<std::net::IpAddr>,
) -> Result<Caller, Response> {
    let (id, secret) = decode_basic(encoded).ok_or_else(|| unauthorized("Basic", realm))?;
    let client = store.find("ClientApplication", &id).ok_or_else(|| unauthorized("Basic", realm))?;
    // Only the current secret works for Basic auth on the API (record d4), and only for active clients.
    let active = client["status"].as_str().is_none_or(|s| s == "active");
    if !active || client["secret"].as_str() != Some(secret.as_str()) || secret.is_empty() {
        return Err(unauthorized("Basic", realm));
    }
    let membership =
        store.membership_of_user(&format!("ClientApplication/{id}")).ok_or_else(|| unauthorized("Basic", realm))?;
    if membership["active"] == false {
        return Err(unauthorized("Basic", realm));
    }
    check_policies(store, membership).map_err(IntoResponse::into_response)?;
    // Basic auth is a login of its own: the client's IP rules apply to it, and refuse it as 401.
    if peer.is_some_and(|address| !ip_allowed(store, membership, &address)) {
        return Err(unauthorized("Basic", realm));
    }
    Ok(caller_for(store, &id, membership))
}

fn caller_for(store: &Store, client_id: &str, membership: &Value) -> Caller {
    let project_id =
        membership["project"]["reference"].as_str().and_then(|r| r.strip_prefix("Project/")).unwrap_or_default();
    let super_admin = store.find("Project", project_id).is_some_and(|p| p["superAdmin"] == true);
    Caller {
        client_id: client_id.to_string(),
        membership: membership.clone(),
        project_id: project_id.to_string(),
        super_admin,
        extended: false,
    }
}

/// Basic credentials: base64 → text → split at the first `:`, with no URL-decoding (record c1).
fn decode_basic(encoded: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(STANDARD.decode(encoded).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

/// Parses Medplum's lifetime strings ("15m", "1h", "3600s", "2d"); default one hour.
pub fn lifetime_seconds(lifetime: Option<&str>) -> i64 {
    let Some(text) = lifetime.map(str::trim).filter(|t| !t.is_empty()) else { return 3600 };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let Ok(n) = number.parse::<i64>() else { return 3600 };
    match unit.trim() {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        "w" => n * 604_800,
        _ => 3600,
    }
}

/// `POST /oauth2/token`: the client credentials grant.
pub async fn token(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form_encoded = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if !form_encoded {
        let mut response = (StatusCode::BAD_REQUEST, "Unsupported content type").into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        return response;
    }
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let Some(grant_type) = form.get("grant_type").filter(|g| !g.is_empty()) else {
        return outcome::token_error("Missing grant_type");
    };
    if grant_type == "authorization_code" {
        let mut store = app.store();
        return match crate::register::redeem_code(&mut store, &form) {
            Ok((login, profile)) => {
                let project_ref = format!("Project/{}", login.project_id);
                issue_token(&app, store, login, &project_ref, profile, 3600)
            }
            Err(refused) => refused,
        };
    }
    if grant_type != "client_credentials" {
        return outcome::token_error("Unsupported grant type");
    }
    let (client_id, client_secret) = match client_credentials(&headers, &form) {
        Ok(pair) => pair,
        Err(refused) => return refused,
    };
    let scope = form.get("scope").filter(|s| !s.is_empty()).cloned().unwrap_or_else(|| "openid".into());
    client_credentials_token(&app, &peer, &client_id, &client_secret, scope)
}

/// The client's id and secret: from Basic auth, else from the form.
fn client_credentials(
    headers: &HeaderMap,
    form: &std::collections::HashMap<String, String>,
) -> Result<(String, String), Response> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| decode_basic(b.trim()));
    if let Some(pair) = basic {
        return Ok(pair);
    }
    let Some(id) = form.get("client_id").filter(|s| !s.is_empty()) else {
        return Err(outcome::token_error("Missing client_id"));
    };
    let Some(secret) = form.get("client_secret").filter(|s| !s.is_empty()) else {
        return Err(outcome::token_error("Missing client_secret"));
    };
    Ok((id.clone(), secret.clone()))
}

/// The client credentials grant, once the request named a client and a secret.
fn client_credentials_token(
    app: &Arc<App>,
    peer: &Peer,
    client_id: &str,
    client_secret: &str,
    scope: String,
) -> Response {
    let store = app.store();
    let Some(client) = store.find("ClientApplication", client_id).cloned() else {
        return outcome::token_error("Invalid client");
    };
    if client["status"].as_str().is_some_and(|s| s != "active") {
        return outcome::token_error("Invalid client");
    }
    let matches = |field: &str| client[field].as_str().is_some_and(|s| !s.is_empty() && s == client_secret);
    if !matches("secret") && !matches("retiringSecret") {
        return outcome::token_error("Invalid secret");
    }
    let Some(membership) = store.membership_of_user(&format!("ClientApplication/{client_id}")).cloned() else {
        return outcome::token_error("Invalid client");
    };
    // The token endpoint answers a missing policy in its own error shape (re-checked on the real server).
    if check_policies(&store, &membership).is_err() {
        return outcome::token_error(INVALID_POLICY);
    }
    // IP rules apply to the token request itself, only once the secret matched.
    if !ip_allowed(&store, &membership, &peer.0.ip()) {
        return outcome::token_error("IP address not allowed");
    }
    // An inactive membership still gets a token, which then cannot be used (records f12, f13).
    let project_ref = membership["project"]["reference"].as_str().unwrap_or_default().to_string();
    let project_id = project_ref.trim_start_matches("Project/").to_string();
    let lifetime = lifetime_seconds(client["accessTokenLifetime"].as_str());
    let issued_at = now().as_second();
    let login = Login {
        id: new_id(),
        client_id: client_id.to_string(),
        membership_id: membership["id"].as_str().unwrap_or_default().to_string(),
        project_id,
        scope,
        issued_at,
        expires_at: issued_at + lifetime,
    };
    let mut profile = json!({"reference": format!("ClientApplication/{client_id}")});
    if let Some(name) = client["name"].as_str() {
        profile["display"] = json!(name);
    }
    issue_token(app, store, login, &project_ref, profile, lifetime)
}

/// Issues a token for `login` and answers the token request with it.
pub fn issue_token(
    app: &App,
    mut store: std::sync::MutexGuard<'_, Store>,
    login: Login,
    project_ref: &str,
    profile: Value,
    lifetime: i64,
) -> Response {
    let project_id = project_ref.trim_start_matches("Project/");
    let project_name = store.find("Project", project_id).and_then(|p| p["name"].as_str()).map(str::to_string);
    let access_token = jwt(&app.base_url, &login);
    let id_token = jwt(&app.base_url, &login);
    let scope = login.scope.clone();
    let issued_at = login.issued_at;
    store.tokens.retain(|_, l| l.expires_at > issued_at);
    store.tokens.insert(access_token.clone(), login);
    drop(store);

    let mut project = json!({"reference": project_ref});
    if let Some(name) = project_name {
        project["display"] = json!(name);
    }
    outcome::json(
        StatusCode::OK,
        &json!({
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
            "id_token": id_token,
            "access_token": access_token,
            "project": project,
            "profile": profile,
            "smart_style_url": format!("{}fhir/R4/.well-known/smart-styles.json", app.base_url),
            "need_patient_banner": false,
        }),
    )
}

/// A JWT-shaped token. Its signature is random: the server recognises its own tokens by lookup.
fn jwt(issuer: &str, login: &Login) -> String {
    use rand::RngCore;
    let header = json!({"alg": "ES384", "kid": "medplum-test-server", "typ": "JWT"});
    let claims = json!({
        "client_id": login.client_id, "login_id": login.id, "sub": login.client_id,
        "username": login.client_id, "scope": login.scope,
        "profile": format!("ClientApplication/{}", login.client_id), "jti": new_id(),
        "iat": login.issued_at, "nbf": login.issued_at, "exp": login.expires_at, "iss": issuer, "aud": issuer,
    });
    let mut signature = [0u8; 96];
    rand::rng().fill_bytes(&mut signature);
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// `POST /oauth2/introspect`: no client authentication needed (record j1).
pub async fn introspect(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let store = app.store();
    let login = form.get("token").and_then(|t| store.tokens.get(t)).filter(|l| l.expires_at > now().as_second());
    let body = match login {
        Some(l) => json!({"active": true, "iat": l.issued_at, "exp": l.expires_at, "iss": app.base_url,
                          "sub": l.client_id, "client_id": l.client_id, "scope": l.scope}),
        None => json!({"active": false}),
    };
    outcome::json(StatusCode::OK, &body)
}

/// `GET /auth/me`: project, membership and profile of the caller (the profile includes a client's own
/// secret, as in record j3).
pub async fn me(State(app): State<Arc<App>>, caller: Caller) -> Response {
    let store = app.store();
    let project = store.find("Project", &caller.project_id).cloned().unwrap_or(Value::Null);
    let profile = store.find("ClientApplication", &caller.client_id).cloned().unwrap_or(Value::Null);
    let m = &caller.membership;
    let mut membership =
        json!({"resourceType": "ProjectMembership", "id": m["id"], "user": m["user"], "profile": m["profile"]});
    for key in ["identifier", "admin"] {
        if !m[key].is_null() {
            membership[key] = m[key].clone();
        }
    }
    let mut project_summary = json!({"resourceType": "Project", "id": project["id"], "name": project["name"]});
    for key in ["description", "strictMode", "superAdmin"] {
        if !project[key].is_null() {
            project_summary[key] = project[key].clone();
        }
    }
    outcome::json(
        StatusCode::OK,
        &json!({
            "project": project_summary,
            "membership": membership,
            "profile": profile,
            "config": {"resourceType": "UserConfiguration", "menu": []},
        }),
    )
}

/// `GET /healthcheck` (no auth).
/// `POST /auth/method` `{email}`: where a person of that email's domain signs in. With a
/// DomainConfiguration for the domain that names an identity provider, its authorize URL (with the
/// client id, Medplum's own callback, `response_type=code` and `scope=openid profile email`);
/// otherwise `{}` (password sign-in).
pub async fn method(State(app): State<Arc<App>>, Json(body): Json<Value>) -> Response {
    let email = body["email"].as_str().unwrap_or_default();
    let domain = email.rsplit_once('@').map(|(_, d)| d.to_lowercase()).unwrap_or_default();
    let store = app.store();
    let provider = store
        .all("DomainConfiguration")
        .find(|c| c["domain"].as_str().is_some_and(|d| d.eq_ignore_ascii_case(&domain)))
        .map(|c| c["identityProvider"].clone())
        .filter(|idp| idp.is_object());
    let Some(idp) = provider else { return outcome::json(StatusCode::OK, &json!({})) };
    let Ok(mut url) = url::Url::parse(idp["authorizeUrl"].as_str().unwrap_or_default()) else {
        return Outcome::invalid("Failed to construct URL for the domain").into_response();
    };
    url.query_pairs_mut()
        .append_pair("client_id", idp["clientId"].as_str().unwrap_or_default())
        .append_pair("redirect_uri", &format!("{}auth/external", app.base_url))
        .append_pair("response_type", "code")
        .append_pair("scope", "openid profile email");
    outcome::json(StatusCode::OK, &json!({"domain": domain, "authorizeUrl": url.to_string()}))
}

pub async fn healthcheck(State(app): State<Arc<App>>) -> Response {
    outcome::json(
        StatusCode::OK,
        &json!({"ok": true, "version": app.config.version, "platform": std::env::consts::OS,
                "runtime": "medplum-test-server", "postgres": true, "redis": true,
                "redisInstances": {"default": true}}),
    )
}

/// `GET /.well-known/openid-configuration` (no auth).
pub async fn openid_configuration(State(app): State<Arc<App>>) -> Response {
    let base = &app.base_url;
    outcome::json(
        StatusCode::OK,
        &json!({
            "issuer": base,
            "token_endpoint": format!("{base}oauth2/token"),
            "introspection_endpoint": format!("{base}oauth2/introspect"),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        }),
    )
}
