//! The FHIR REST API: read, search, create (also conditional), update (also conditional, If-Match),
//! patch, delete, `$rotate-secret` and `Project/$init`, with Medplum's validation and project scoping.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::App;
use crate::auth::Caller;
use crate::outcome::{self, Outcome, Result};
use crate::search;
use crate::store::{Lookup, Store, generate_secret, present, project_of};

const BASE_ELEMENTS: [&str; 9] =
    ["resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension", "modifierExtension"];

/// Elements Medplum's strict mode accepts on the types whose shape the operator depends on.
fn allowed_elements(path: &str) -> Option<&'static [&'static str]> {
    Some(match path {
        "ClientApplication" => &[
            "status",
            "name",
            "description",
            "signInForm",
            "secret",
            "retiringSecret",
            "jwksUri",
            "redirectUri",
            "redirectUris",
            "launchUri",
            "pkceOptional",
            "identityProvider",
            "accessTokenLifetime",
            "refreshTokenLifetime",
            "allowedOrigin",
            "defaultScope",
            "grantType",
        ],
        "AccessPolicy" => &["name", "basedOn", "compartment", "resource", "ipAccessRule"],
        "AccessPolicy.resource" => &[
            "id",
            "extension",
            "modifierExtension",
            "resourceType",
            "compartment",
            "criteria",
            "readonly",
            "interaction",
            "hiddenFields",
            "readonlyFields",
            "writeConstraint",
        ],
        "AccessPolicy.ipAccessRule" => &["id", "extension", "modifierExtension", "name", "value", "action"],
        "ProjectMembership" => &[
            "project",
            "invitedBy",
            "user",
            "profile",
            "userName",
            "externalId",
            "accessPolicy",
            "access",
            "userConfiguration",
            "admin",
            "active",
            "identifier",
        ],
        "ProjectMembership.access" => &["id", "extension", "modifierExtension", "policy", "parameter"],
        _ => return None,
    })
}

/// Checks `value` against the elements of `schema`; `path` is its FHIRPath for error messages.
fn check_elements(value: &Value, schema: &str, path: &str, base: bool) -> Result<()> {
    let Some(allowed) = allowed_elements(schema) else { return Ok(()) };
    let Some(map) = value.as_object() else { return Ok(()) };
    for key in map.keys() {
        let known = allowed.contains(&key.as_str()) || (base && BASE_ELEMENTS.contains(&key.as_str()));
        if !known {
            return Err(Outcome::structure(format!("Invalid additional property \"{key}\""), format!("{path}.{key}")));
        }
    }
    Ok(())
}

/// Strict-mode validation of the resource types the operator writes.
pub fn validate(rtype: &str, resource: &Value) -> Result<()> {
    check_elements(resource, rtype, rtype, true)?;
    let each = |field: &str| resource[field].as_array().into_iter().flatten().enumerate();
    match rtype {
        "AccessPolicy" => {
            for (i, rule) in each("resource") {
                check_elements(rule, "AccessPolicy.resource", &format!("AccessPolicy.resource[{i}]"), false)?;
                if rule["resourceType"].as_str().is_none_or(str::is_empty) {
                    return Err(Outcome::structure(
                        "Missing required property",
                        format!("AccessPolicy.resource[{i}].resourceType"),
                    ));
                }
            }
            for (i, rule) in each("ipAccessRule") {
                let path = format!("AccessPolicy.ipAccessRule[{i}]");
                check_elements(rule, "AccessPolicy.ipAccessRule", &path, false)?;
                for field in ["value", "action"] {
                    if rule[field].as_str().is_none_or(str::is_empty) {
                        return Err(Outcome::structure("Missing required property", format!("{path}.{field}")));
                    }
                }
            }
        }
        "ClientApplication" | "DomainConfiguration" if resource["identityProvider"].is_object() => {
            let idp = &resource["identityProvider"];
            for field in ["authorizeUrl", "tokenUrl", "userInfoUrl", "clientId", "clientSecret"] {
                if idp[field].as_str().is_none_or(str::is_empty) {
                    return Err(Outcome::structure(
                        "Missing required property",
                        format!("{rtype}.identityProvider.{field}"),
                    ));
                }
            }
        }
        "ProjectMembership" => {
            for field in ["project", "user", "profile"] {
                if resource[field]["reference"].as_str().is_none() {
                    return Err(Outcome::structure("Missing required property", format!("ProjectMembership.{field}")));
                }
            }
            for (i, access) in each("access") {
                check_elements(access, "ProjectMembership.access", &format!("ProjectMembership.access[{i}]"), false)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn etag_version(value: &str) -> &str {
    value.trim().trim_start_matches("W/").trim_matches('"')
}

fn written(status: StatusCode, app: &App, resource: &Value, extended: bool, location: bool) -> Response {
    let mut response = outcome::with_version_headers(outcome::fhir(status, &present(resource, extended)), resource);
    if location {
        let url = format!(
            "{}fhir/R4/{}/{}",
            app.base_url,
            resource["resourceType"].as_str().unwrap_or_default(),
            resource["id"].as_str().unwrap_or_default()
        );
        if let Ok(value) = HeaderValue::from_str(&url) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    response
}

/// The live resource the caller may see, or the 404/410 Medplum gives.
fn visible<'a>(store: &'a Store, caller: &Caller, rtype: &str, id: &str) -> Result<&'a Value> {
    match store.get(rtype, id) {
        Lookup::Found(resource) if caller.sees_project(project_of(resource)) => Ok(resource),
        Lookup::Deleted => Err(Outcome::gone()),
        _ => Err(Outcome::not_found()),
    }
}

fn require(caller: &Caller, store: &Store, rtype: &str, interaction: &str) -> Result<()> {
    if caller.may(store, rtype, interaction) { Ok(()) } else { Err(Outcome::forbidden()) }
}

/// Resources of `rtype` the caller may see that match a search query.
fn matching(store: &Store, caller: &Caller, rtype: &str, query: &str) -> Result<Vec<Value>> {
    let params = search::parse(query);
    search::validate(rtype, &params)?;
    let mut found: Vec<Value> = store
        .all(rtype)
        .filter(|r| caller.sees_project(project_of(r)))
        .filter(|r| visible_user(caller, rtype, r))
        .filter(|r| search::matches(r, &params, &|reference| store.resolve(reference).cloned()))
        .cloned()
        .collect();
    found.sort_by(|a, b| a["meta"]["lastUpdated"].as_str().cmp(&b["meta"]["lastUpdated"].as_str()));
    Ok(found)
}

/// Project admins see only project-scoped Users (records f6, f7).
fn visible_user(caller: &Caller, rtype: &str, resource: &Value) -> bool {
    rtype != "User"
        || caller.super_admin
        || resource["project"]["reference"] == format!("Project/{}", caller.project_id)
}

fn stored_project(caller: &Caller, body: &Value) -> String {
    // A super admin may place a resource in any project through meta.project (record b14).
    match body["meta"]["project"].as_str() {
        Some(pid) if caller.super_admin => pid.to_string(),
        _ => caller.project_id.clone(),
    }
}

fn check_type(rtype: &str, body: &Value) -> Result<()> {
    if body["resourceType"] != rtype {
        return Err(Outcome::invalid("Incorrect resource type"));
    }
    Ok(())
}

pub async fn metadata(State(app): State<Arc<App>>) -> Response {
    outcome::fhir(
        StatusCode::OK,
        &json!({
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
            "format": ["json"], "software": {"name": "medplum", "version": app.config.version},
            "implementation": {"description": "medplum", "url": format!("{}fhir/R4/", app.base_url)},
        }),
    )
}

pub async fn not_found_route() -> Response {
    Outcome::not_found().into_response()
}

pub async fn read(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((rtype, id)): Path<(String, String)>,
) -> Result<Response> {
    let store = app.store();
    require(&caller, &store, &rtype, "read")?;
    let resource = visible(&store, &caller, &rtype, &id)?;
    if !visible_user(&caller, &rtype, resource) {
        return Err(Outcome::not_found());
    }
    Ok(written(StatusCode::OK, &app, resource, caller.extended, false))
}

pub async fn search(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let query = query.unwrap_or_default();
    let store = app.store();
    require(&caller, &store, &rtype, "search")?;
    let found = matching(&store, &caller, &rtype, &query)?;
    drop(store);
    Ok(search_bundle(&app, &format!("fhir/R4/{rtype}"), &query, found, caller.extended))
}

/// A system-level search (`GET /fhir/R4?_type=A,B`): the types' matches together, oldest first.
pub async fn search_system(State(app): State<Arc<App>>, caller: Caller, RawQuery(query): RawQuery) -> Result<Response> {
    let query = query.unwrap_or_default();
    let params = search::parse(&query);
    let Some(types) = search::control(&params, "_type") else {
        return Err(Outcome::invalid("No types specified"));
    };
    let filters: String = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k != "_type")
        .fold(url::form_urlencoded::Serializer::new(String::new()), |mut s, (k, v)| {
            s.append_pair(&k, &v);
            s
        })
        .finish();
    let store = app.store();
    let mut found = Vec::new();
    for rtype in types.split(',') {
        require(&caller, &store, rtype, "search")?;
        found.extend(matching(&store, &caller, rtype, &filters)?);
    }
    drop(store);
    found.sort_by(|a, b| a["meta"]["lastUpdated"].as_str().cmp(&b["meta"]["lastUpdated"].as_str()));
    Ok(search_bundle(&app, "fhir/R4", &query, found, caller.extended))
}

/// A searchset Bundle of one page of `found` (`_count`, `_offset`, `_elements`, `_sort=-_lastUpdated`).
fn search_bundle(app: &App, path: &str, query: &str, mut found: Vec<Value>, extended: bool) -> Response {
    let params = search::parse(query);
    if search::control(&params, "_sort") == Some("-_lastUpdated") {
        found.reverse();
    }
    let count: usize = search::control(&params, "_count").and_then(|c| c.parse().ok()).unwrap_or(20).min(1000);
    let offset: usize = search::control(&params, "_offset").and_then(|c| c.parse().ok()).unwrap_or(0);
    let elements = search::control(&params, "_elements");
    let self_url = format!("{}{path}?{query}", app.base_url);
    let entries: Vec<Value> = found
        .iter()
        .skip(offset)
        .take(count)
        .map(|r| {
            let shown = present(r, extended);
            let shown = match elements {
                Some(e) => search::subset(shown, e),
                None => shown,
            };
            let rtype = r["resourceType"].as_str().unwrap_or_default();
            json!({
                "fullUrl": format!("{}fhir/R4/{rtype}/{}", app.base_url, r["id"].as_str().unwrap_or_default()),
                "search": {"mode": "match"},
                "resource": shown,
            })
        })
        .collect();
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if offset + count < found.len() {
        let rest: String = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k != "_offset")
            .fold(url::form_urlencoded::Serializer::new(String::new()), |mut s, (k, v)| {
                s.append_pair(&k, &v);
                s
            })
            .append_pair("_offset", &(offset + count).to_string())
            .finish();
        links.push(json!({"relation": "next", "url": format!("{}{path}?{rest}", app.base_url)}));
    }
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "link": links});
    if !entries.is_empty() {
        bundle["entry"] = json!(entries);
    }
    if search::control(&params, "_total").is_some() || search::control(&params, "_summary") == Some("count") {
        bundle["total"] = json!(found.len());
    }
    outcome::fhir(StatusCode::OK, &bundle)
}

pub async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response> {
    check_type(&rtype, &body)?;
    validate(&rtype, &body)?;
    let mut store = app.store();
    require(&caller, &store, &rtype, "create")?;
    if let Some(condition) = headers.get("if-none-exist").and_then(|v| v.to_str().ok()) {
        let found = matching(&store, &caller, &rtype, condition)?;
        match found.as_slice() {
            [] => {}
            [existing] => return Ok(written(StatusCode::OK, &app, existing, caller.extended, false)),
            _ => return Err(Outcome::multiple_matches()),
        }
    }
    let project = stored_project(&caller, &body);
    let created = store.create(&rtype, body, Some(&project), Some(&caller.profile_ref()));
    Ok(written(StatusCode::CREATED, &app, &created, caller.extended, true))
}

fn check_if_match(headers: &HeaderMap, current: &Value) -> Result<()> {
    if let Some(expected) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok())
        && current["meta"]["versionId"].as_str() != Some(etag_version(expected))
    {
        return Err(Outcome::precondition_failed());
    }
    Ok(())
}

pub async fn update(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response> {
    check_type(&rtype, &body)?;
    if body["id"].as_str().is_some_and(|body_id| body_id != id) {
        return Err(Outcome::invalid("Incorrect ID"));
    }
    validate(&rtype, &body)?;
    let mut store = app.store();
    require(&caller, &store, &rtype, "update")?;
    let current = visible(&store, &caller, &rtype, &id)?.clone();
    check_if_match(&headers, &current)?;
    let updated = store.replace(&rtype, &id, body);
    Ok(written(StatusCode::OK, &app, &updated, caller.extended, false))
}

/// `PUT /fhir/R4/{type}?search`: one match is updated, none creates, several give 412 (records g6-g8).
pub async fn conditional_update(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    Json(body): Json<Value>,
) -> Result<Response> {
    check_type(&rtype, &body)?;
    validate(&rtype, &body)?;
    let query = query.filter(|q| !q.is_empty()).ok_or_else(|| Outcome::invalid("Missing search criteria"))?;
    let mut store = app.store();
    require(&caller, &store, &rtype, "update")?;
    let found = matching(&store, &caller, &rtype, &query)?;
    match found.as_slice() {
        [] => {
            let project = stored_project(&caller, &body);
            let created = store.create(&rtype, body, Some(&project), Some(&caller.profile_ref()));
            Ok(written(StatusCode::CREATED, &app, &created, caller.extended, true))
        }
        [existing] => {
            let id = existing["id"].as_str().unwrap_or_default().to_string();
            let updated = store.replace(&rtype, &id, body);
            Ok(written(StatusCode::OK, &app, &updated, caller.extended, false))
        }
        _ => Err(Outcome::multiple_matches()),
    }
}

pub async fn patch(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let operations: json_patch::Patch =
        serde_json::from_slice(&body).map_err(|e| Outcome::invalid(format!("Invalid JSON Patch: {e}")))?;
    let mut store = app.store();
    require(&caller, &store, &rtype, "update")?;
    let current = visible(&store, &caller, &rtype, &id)?.clone();
    check_if_match(&headers, &current)?;
    let mut patched = current;
    json_patch::patch(&mut patched, &operations).map_err(|e| Outcome::invalid(format!("Patch failed: {e}")))?;
    validate(&rtype, &patched)?;
    let updated = store.replace(&rtype, &id, patched);
    Ok(written(StatusCode::OK, &app, &updated, caller.extended, false))
}

pub async fn delete(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((rtype, id)): Path<(String, String)>,
) -> Result<Response> {
    let mut store = app.store();
    require(&caller, &store, &rtype, "delete")?;
    visible(&store, &caller, &rtype, &id)?;
    // Medplum leaves a deleted client's membership behind (record c10) and lets a policy in use be
    // deleted (record e10); both are reproduced.
    store.delete(&rtype, &id);
    Ok(outcome::all_ok())
}

fn parameter<'a>(parameters: &'a Value, name: &str) -> Option<&'a str> {
    parameters["parameter"].as_array()?.iter().find(|p| p["name"] == name)?["valueString"].as_str()
}

/// `POST /fhir/R4/{type}/{id}/{operation}`: `ClientApplication/{id}/$rotate-secret`.
pub async fn instance_operation(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((rtype, id, operation)): Path<(String, String, String)>,
    Json(parameters): Json<Value>,
) -> Result<Response> {
    if rtype != "ClientApplication" || operation != "$rotate-secret" {
        return Err(Outcome::not_found());
    }
    if !caller.admin() {
        return Err(Outcome::forbidden());
    }
    let mut store = app.store();
    let mut client = visible(&store, &caller, &rtype, &id)?.clone();
    match (parameter(&parameters, "secret"), parameter(&parameters, "retiringSecret")) {
        (Some(secret), None) => {
            if client["secret"].as_str() != Some(secret) {
                return Err(Outcome::invalid("Provided secret does not match client"));
            }
            client["retiringSecret"] = json!(secret);
            client["secret"] = json!(generate_secret());
        }
        (None, Some(retiring)) => {
            if client["retiringSecret"].as_str() != Some(retiring) {
                return Err(Outcome::invalid("Provided secret does not match client"));
            }
            client.as_object_mut().expect("resources are objects").remove("retiringSecret");
        }
        _ => return Err(Outcome::invalid("Must provide either secret or retiringSecret")),
    }
    let updated = store.replace(&rtype, &id, client);
    Ok(written(StatusCode::OK, &app, &updated, true, false))
}

/// The four policies every new project gets, by `defaultAccessPolicies` profile type.
fn default_policies(project_name: &str) -> [(&'static str, Value); 4] {
    let everything = json!([{"resourceType": "*"}]);
    [
        (
            "Patient",
            json!({"name": "Default Patient Access Policy", "resource": [
            {"resourceType": "Patient", "criteria": "Patient?_id=%patient.id"},
            {"resourceType": "Observation", "criteria": "Observation?subject=%patient", "readonly": true}]}),
        ),
        (
            "RelatedPerson",
            json!({"name": "Default RelatedPerson Access Policy", "resource": [
            {"resourceType": "Patient", "criteria": "Patient?_id=%patient.id", "readonly": true}]}),
        ),
        ("Admin", json!({"name": "Default Admin Access Policy", "resource": everything})),
        (
            "Practitioner",
            json!({"name": "Default Practitioner Access Policy", "resource": everything,
                                "description": format!("Practitioners of {project_name}")}),
        ),
    ]
}

/// `POST /fhir/R4/Project/$init`: any authenticated caller may create a project (record a13).
pub async fn project_init(
    State(app): State<Arc<App>>,
    caller: Caller,
    Json(parameters): Json<Value>,
) -> Result<Response> {
    let name = parameter(&parameters, "name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Outcome::invalid("Project name is required").with_expression("name"))?;
    let owner = parameters["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "owner")
        .map(|p| p["valueReference"].clone());
    let mut store = app.store();
    let author = caller.profile_ref();
    // A project belongs to itself, so its admins can read it.
    let pid = crate::store::new_id();
    let mut project = store.create(
        "Project",
        json!({"resourceType": "Project", "id": pid, "name": name, "strictMode": true}),
        Some(&pid),
        Some(&author),
    );
    let mut defaults = Vec::new();
    for (profile_type, mut policy) in default_policies(name) {
        policy["resourceType"] = json!("AccessPolicy");
        if let Some(map) = policy.as_object_mut() {
            map.remove("description");
        }
        let created = store.create("AccessPolicy", policy, Some(&pid), Some(&author));
        defaults.push(json!({"profileType": profile_type, "accessPolicy": {
            "reference": format!("AccessPolicy/{}", created["id"].as_str().unwrap_or_default()),
            "display": created["name"]}}));
    }
    project["defaultPatientAccessPolicy"] = defaults[0]["accessPolicy"].clone();
    project["defaultAccessPolicies"] = json!(defaults);
    if let Some(owner) = owner.filter(|o| o.is_object()) {
        project["owner"] = owner;
    }
    let project = store.replace("Project", &pid, project);
    let client = store.create(
        "ClientApplication",
        json!({"resourceType": "ClientApplication", "name": format!("{name} Default Client"), "secret": generate_secret()}),
        Some(&pid),
        Some(&author),
    );
    let client_ref = format!("ClientApplication/{}", client["id"].as_str().unwrap_or_default());
    store.create(
        "ProjectMembership",
        json!({"resourceType": "ProjectMembership", "project": {"reference": format!("Project/{pid}"), "display": name},
               "user": {"reference": client_ref, "display": client["name"]}, "profile": {"reference": client_ref, "display": client["name"]}}),
        Some(&pid),
        Some(&author),
    );
    Ok(written(StatusCode::CREATED, &app, &project, caller.extended, true))
}
