//! Medplum's `/admin/projects/{projectId}/…` endpoints: client creation, invites and memberships.
//!
//! The URL's project id is honoured only for super admins (records b12, b13, f22); project admins
//! always act on their own project. The members endpoints act on the caller's project (f15).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::App;
use crate::auth::Caller;
use crate::fhir::validate;
use crate::outcome::{self, Outcome, Result};
use crate::store::{Store, generate_secret, project_of};

fn require_admin(caller: &Caller) -> Result<()> {
    if caller.admin() { Ok(()) } else { Err(Outcome::forbidden()) }
}

/// The project an admin request acts on.
fn target_project(caller: &Caller, url_project: &str) -> String {
    if caller.super_admin { url_project.to_string() } else { caller.project_id.clone() }
}

fn project_ref(store: &Store, pid: &str) -> Value {
    let mut reference = json!({"reference": format!("Project/{pid}")});
    if let Some(name) = store.find("Project", pid).and_then(|p| p["name"].as_str()) {
        reference["display"] = json!(name);
    }
    reference
}

pub async fn get_project(State(app): State<Arc<App>>, caller: Caller) -> Result<Response> {
    require_admin(&caller)?;
    let store = app.store();
    let project = store.find("Project", &caller.project_id).ok_or_else(Outcome::not_found)?;
    Ok(outcome::json(StatusCode::OK, &json!({"project": {"id": project["id"], "name": project["name"]}})))
}

/// `POST /admin/projects/{pid}/client`: creates a ClientApplication (secret generated unless given)
/// and its membership, which carries `accessPolicy` if given. Sending `meta` replaces the meta the
/// server would set, so the client ends up in no project (records b2-b5): reproduced.
pub async fn create_client(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(pid): Path<String>,
    Json(mut body): Json<Value>,
) -> Result<Response> {
    require_admin(&caller)?;
    if body["name"].as_str().is_none_or(str::is_empty) {
        return Err(Outcome::invalid("Client name is required").with_expression("name"));
    }
    let pid = target_project(&caller, &pid);
    let access_policy = body.as_object_mut().and_then(|m| m.remove("accessPolicy"));
    body["resourceType"] = json!("ClientApplication");
    if body["secret"].as_str().is_none_or(str::is_empty) {
        body["secret"] = json!(generate_secret());
    }
    validate("ClientApplication", &body)?;
    let mut store = app.store();
    let scope = if body["meta"].is_object() { None } else { Some(pid.as_str()) };
    let client = store.create("ClientApplication", body, scope, Some("system"));
    let client_ref = format!("ClientApplication/{}", client["id"].as_str().unwrap_or_default());
    let mut membership = json!({"resourceType": "ProjectMembership", "project": project_ref(&store, &pid),
        "user": {"reference": client_ref, "display": client["name"]},
        "profile": {"reference": client_ref, "display": client["name"]}});
    if let Some(policy) = access_policy {
        membership["accessPolicy"] = policy;
    }
    store.create("ProjectMembership", membership, Some(&pid), Some("system"));
    Ok(outcome::json(StatusCode::CREATED, &client))
}

fn default_policy(store: &Store, pid: &str, profile_type: &str) -> Option<Value> {
    let project = store.find("Project", pid)?;
    project["defaultAccessPolicies"]
        .as_array()?
        .iter()
        .find(|d| d["profileType"] == profile_type)
        .map(|d| d["accessPolicy"].clone())
}

/// Who an invite names, read from its body.
struct Invitee {
    resource_type: String,
    email: Option<String>,
    external_id: Option<String>,
    /// Patients and anyone with an externalId are project-scoped users; `scope` overrides.
    project_scoped: bool,
}

impl Invitee {
    fn parse(body: &Value) -> Result<Self> {
        let resource_type = body["resourceType"].as_str().unwrap_or_default();
        if !matches!(resource_type, "Patient" | "Practitioner" | "RelatedPerson") {
            return Err(Outcome::invalid("Invalid resourceType").with_expression("resourceType"));
        }
        for field in ["firstName", "lastName"] {
            if body[field].as_str().is_none_or(str::is_empty) {
                return Err(Outcome::invalid(format!("{field} is required")).with_expression(field));
            }
        }
        let email = body["email"].as_str().filter(|e| !e.is_empty()).map(str::to_lowercase);
        let external_id = body["externalId"].as_str().filter(|e| !e.is_empty()).map(str::to_string);
        if email.is_none() && external_id.is_none() {
            return Err(Outcome::invalid("Either email or externalId is required").with_expression("email"));
        }
        let project_scoped = match body["scope"].as_str() {
            Some("project") => true,
            Some("server") => false,
            _ => resource_type == "Patient" || external_id.is_some(),
        };
        Ok(Self { resource_type: resource_type.to_string(), email, external_id, project_scoped })
    }

    /// The existing user this invite names: same scope, same email (else same externalId).
    fn existing_user(&self, store: &Store, pid: &str) -> Option<Value> {
        store
            .all("User")
            .find(|u| {
                let same_scope = if self.project_scoped {
                    u["project"]["reference"] == format!("Project/{pid}")
                } else {
                    u["project"].is_null()
                };
                same_scope
                    && match (&self.email, &self.external_id) {
                        (Some(e), _) => u["email"] == e.as_str(),
                        (None, Some(x)) => u["externalId"] == x.as_str(),
                        (None, None) => false,
                    }
            })
            .cloned()
    }

    /// Creates the user, with the request behind the set-password link of the invite email (sent or
    /// not); both belong to the user's project (none for a server-scoped user).
    fn create_user(&self, store: &mut Store, pid: &str, body: &Value) -> Value {
        let mut user = json!({"resourceType": "User", "firstName": body["firstName"], "lastName": body["lastName"]});
        if let Some(e) = &self.email {
            user["email"] = json!(e);
        }
        if let Some(x) = &self.external_id {
            user["externalId"] = json!(x);
        }
        if self.project_scoped {
            user["project"] = project_ref(store, pid);
        }
        let scope = self.project_scoped.then_some(pid);
        let user = store.create("User", user, scope, Some("system"));
        let request = json!({"resourceType": "UserSecurityRequest", "type": "invite",
                             "user": {"reference": format!("User/{}", user["id"].as_str().unwrap_or_default())},
                             "secret": crate::store::generate_secret()[..32]});
        store.create("UserSecurityRequest", request, scope, Some("system"));
        user
    }

    fn create_profile(&self, store: &mut Store, pid: &str, body: &Value) -> Value {
        let mut profile = json!({"resourceType": self.resource_type,
            "name": [{"given": [body["firstName"]], "family": body["lastName"]}]});
        if let Some(e) = &self.email {
            profile["telecom"] = json!([{"system": "email", "use": "work", "value": e}]);
        }
        store.create(&self.resource_type, profile, Some(pid), Some("system"))
    }
}

/// `POST /admin/projects/{pid}/invite`.
pub async fn invite(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(pid): Path<String>,
    Json(body): Json<Value>,
) -> Result<Response> {
    require_admin(&caller)?;
    let pid = target_project(&caller, &pid);
    let invitee = Invitee::parse(&body)?;
    let mut store = app.store();
    let existing_user = invitee.existing_user(&store, &pid);
    let existing_membership = existing_user.as_ref().and_then(|u| {
        let user_ref = format!("User/{}", u["id"].as_str().unwrap_or_default());
        store
            .all("ProjectMembership")
            .find(|m| m["user"]["reference"] == user_ref && project_of(m) == Some(pid.as_str()))
            .cloned()
    });
    check_invite_policies(&store, &pid, &body)?;
    let fields = invite_membership_fields(&store, &pid, &body, &invitee.resource_type, &caller);
    if let Some(membership) = existing_membership {
        if body["upsert"] != true {
            return Err(Outcome::conflict("User is already a member of this project"));
        }
        let updated = upsert_membership(&mut store, membership, fields);
        return Ok(outcome::with_version_headers(outcome::fhir(StatusCode::OK, &updated), &updated));
    }
    let user = match existing_user {
        Some(user) => user,
        None => invitee.create_user(&mut store, &pid, &body),
    };
    let profile = invitee.create_profile(&mut store, &pid, &body);
    let display =
        format!("{} {}", body["firstName"].as_str().unwrap_or_default(), body["lastName"].as_str().unwrap_or_default());
    let mut membership = json!({
        "resourceType": "ProjectMembership",
        "project": project_ref(&store, &pid),
        "user": {"reference": format!("User/{}", user["id"].as_str().unwrap_or_default()),
                 "display": invitee.email.clone().or(invitee.external_id.clone()).unwrap_or_default()},
        "profile": {"reference": format!("{}/{}", invitee.resource_type, profile["id"].as_str().unwrap_or_default()),
                    "display": display},
    });
    membership.as_object_mut().expect("object").extend(fields);
    validate("ProjectMembership", &membership)?;
    let created = store.create("ProjectMembership", membership, Some(&pid), Some("system"));
    Ok(outcome::with_version_headers(outcome::fhir(StatusCode::OK, &created), &created))
}

/// An upsert writes the invite's membership fields over the existing ones, absent ones included, so a
/// missing policy becomes the project default again and `admin` is cleared (record f3, re-checked on
/// the real server).
fn upsert_membership(store: &mut Store, mut membership: Value, fields: serde_json::Map<String, Value>) -> Value {
    let object = membership.as_object_mut().expect("object");
    for field in ["accessPolicy", "access", "admin", "externalId", "invitedBy"] {
        object.remove(field);
    }
    object.extend(fields);
    let id = membership["id"].as_str().unwrap_or_default().to_string();
    store.replace("ProjectMembership", &id, membership)
}

/// Every policy an invite names must exist in the project.
fn check_invite_policies(store: &Store, pid: &str, body: &Value) -> Result<()> {
    let granted = |access: &Value| -> Vec<Value> {
        access.as_array().into_iter().flatten().map(|a| a["policy"].clone()).collect()
    };
    let references = std::iter::once(body["accessPolicy"].clone())
        .chain(granted(&body["access"]))
        .chain(granted(&body["membership"]["access"]));
    for reference in references.filter_map(|r| r["reference"].as_str().map(str::to_string)) {
        match store.resolve(&reference) {
            None => return Err(Outcome::invalid(format!("Access policy {reference} does not exist"))),
            Some(policy) if project_of(policy).is_some_and(|p| p != pid) => {
                return Err(Outcome::invalid(format!("Access policy {reference} does not belong to this project")));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The membership fields an invite sets: its top-level `externalId`, `accessPolicy`, `access` and
/// `admin`, then every `membership.*` field over them, and, when no policy is left, the project's
/// default for the profile type (Practitioners: Admin or Practitioner by `admin`).
fn invite_membership_fields(
    store: &Store,
    pid: &str,
    body: &Value,
    resource_type: &str,
    caller: &Caller,
) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    for field in ["externalId", "accessPolicy", "access", "admin"] {
        if !body[field].is_null() {
            fields.insert(field.into(), body[field].clone());
        }
    }
    fields.insert("invitedBy".into(), json!({"reference": caller.profile_ref()}));
    for (key, value) in body["membership"].as_object().into_iter().flatten() {
        if !matches!(key.as_str(), "project" | "user" | "resourceType" | "id" | "meta") {
            fields.insert(key.clone(), value.clone());
        }
    }
    let has_policy = fields.get("accessPolicy").is_some_and(|p| !p.is_null())
        || fields.get("access").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
    let default_type = match resource_type {
        "Practitioner" if fields.get("admin") == Some(&json!(true)) => Some("Admin"),
        "Practitioner" | "Patient" => Some(resource_type),
        _ => None,
    };
    if !has_policy && let Some(policy) = default_type.and_then(|t| default_policy(store, pid, t)) {
        fields.insert("accessPolicy".into(), policy);
    }
    fields
}

/// A membership of the caller's own project.
fn own_membership(store: &Store, caller: &Caller, mid: &str) -> Result<Value> {
    let membership = store.find("ProjectMembership", mid).ok_or_else(Outcome::not_found)?;
    if project_of(membership) != Some(caller.project_id.as_str()) {
        return Err(Outcome::forbidden());
    }
    Ok(membership.clone())
}

pub async fn get_member(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((_pid, mid)): Path<(String, String)>,
) -> Result<Response> {
    require_admin(&caller)?;
    let store = app.store();
    Ok(outcome::json(StatusCode::OK, &own_membership(&store, &caller, &mid)?))
}

/// `POST /admin/projects/{pid}/members/{mid}`: replaces the membership; `project` and `user` stay.
/// Toggling `admin` swaps the project's default Practitioner and Admin policies (record f9).
pub async fn update_member(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((_pid, mid)): Path<(String, String)>,
    Json(mut body): Json<Value>,
) -> Result<Response> {
    require_admin(&caller)?;
    if body["id"] != mid.as_str() {
        return Err(Outcome::forbidden());
    }
    let mut store = app.store();
    let current = own_membership(&store, &caller, &mid)?;
    body["resourceType"] = json!("ProjectMembership");
    body["project"] = current["project"].clone();
    body["user"] = current["user"].clone();
    if body["profile"].is_null() {
        body["profile"] = current["profile"].clone();
    }
    if body["admin"] != current["admin"] {
        let (from, to) = if body["admin"] == true { ("Practitioner", "Admin") } else { ("Admin", "Practitioner") };
        let pid = caller.project_id.clone();
        if let (Some(from_policy), Some(to_policy)) =
            (default_policy(&store, &pid, from), default_policy(&store, &pid, to))
            && body["accessPolicy"]["reference"] == from_policy["reference"]
        {
            body["accessPolicy"] = to_policy;
        }
    }
    validate("ProjectMembership", &body)?;
    let updated = store.replace("ProjectMembership", &mid, body);
    Ok(outcome::json(StatusCode::OK, &updated))
}

/// `DELETE /admin/projects/{pid}/members/{mid}`: a project-scoped User goes with its last membership.
pub async fn delete_member(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((_pid, mid)): Path<(String, String)>,
) -> Result<Response> {
    require_admin(&caller)?;
    let mut store = app.store();
    let membership = own_membership(&store, &caller, &mid)?;
    let owner =
        store.find("Project", &caller.project_id).map(|p| p["owner"]["reference"].clone()).unwrap_or(Value::Null);
    if !owner.is_null() && membership["user"]["reference"] == owner {
        return Err(Outcome::invalid("Cannot delete the owner of the project"));
    }
    store.delete("ProjectMembership", &mid);
    let user_ref = membership["user"]["reference"].as_str().unwrap_or_default().to_string();
    if let Some(user_id) = user_ref.strip_prefix("User/") {
        let project_scoped = store.find("User", user_id).is_some_and(|u| !u["project"].is_null());
        let other_memberships = store.all("ProjectMembership").any(|m| m["user"]["reference"] == user_ref.as_str());
        if project_scoped && !other_memberships {
            store.delete("User", user_id);
        }
    }
    Ok(outcome::all_ok().into_response())
}
