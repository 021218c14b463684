//! In-memory resource store with Medplum's versioning, project scoping and soft deletes.

use std::collections::HashMap;

use serde_json::{Value, json};

/// Where a resource stands.
pub enum Lookup<'a> {
    Found(&'a Value),
    /// Deleted: reads give 410.
    Deleted,
    Missing,
}

/// An issued access token and the login behind it.
#[derive(Clone)]
pub struct Login {
    pub id: String,
    pub client_id: String,
    pub membership_id: String,
    pub project_id: String,
    pub scope: String,
    pub issued_at: i64,
    pub expires_at: i64,
}

/// A sign-up in progress (`/auth/newuser`, then `/auth/newpatient`), by login id.
#[derive(Clone)]
pub struct Registration {
    pub user_id: String,
    pub project_id: String,
    pub code_challenge: String,
    pub code_challenge_method: String,
    /// Once the patient's membership is made: it, and the code the token request exchanges.
    pub membership_id: Option<String>,
    pub code: Option<String>,
}

pub struct Store {
    /// resourceType → id → current version (`None` once deleted).
    resources: HashMap<String, HashMap<String, Option<Value>>>,
    pub tokens: HashMap<String, Login>,
    pub registrations: HashMap<String, Registration>,
    pub super_admin_project: String,
}

/// Meta elements the server owns; a client cannot set them through FHIR writes.
const SERVER_META: [&str; 5] = ["versionId", "lastUpdated", "project", "author", "compartment"];

pub fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A 64-hex-character secret, as Medplum generates them.
pub fn generate_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// A store with the Super Admin project and its super-admin ClientApplication.
    pub fn seeded(super_admin_client_id: &str, super_admin_client_secret: &str) -> Self {
        let mut store = Self {
            resources: HashMap::new(),
            tokens: HashMap::new(),
            registrations: HashMap::new(),
            super_admin_project: String::new(),
        };
        let pid = new_id();
        store.create(
            "Project",
            json!({"resourceType": "Project", "id": pid, "name": "Super Admin", "superAdmin": true, "strictMode": true}),
            Some(&pid),
            None,
        );
        store.super_admin_project = pid.clone();
        store.create(
            "ClientApplication",
            json!({"resourceType": "ClientApplication", "id": super_admin_client_id,
                   "name": "Default Super Admin Client", "secret": super_admin_client_secret}),
            Some(&pid),
            None,
        );
        store.create(
            "ProjectMembership",
            json!({"resourceType": "ProjectMembership",
                   "project": {"reference": format!("Project/{pid}"), "display": "Super Admin"},
                   "user": {"reference": format!("ClientApplication/{super_admin_client_id}")},
                   "profile": {"reference": format!("ClientApplication/{super_admin_client_id}"),
                               "display": "Default Super Admin Client"},
                   "admin": true}),
            Some(&pid),
            None,
        );
        store
    }

    pub fn get(&self, rtype: &str, id: &str) -> Lookup<'_> {
        match self.resources.get(rtype).and_then(|by_id| by_id.get(id)) {
            Some(Some(resource)) => Lookup::Found(resource),
            Some(None) => Lookup::Deleted,
            None => Lookup::Missing,
        }
    }

    /// The live resource, if any.
    pub fn find(&self, rtype: &str, id: &str) -> Option<&Value> {
        match self.get(rtype, id) {
            Lookup::Found(resource) => Some(resource),
            _ => None,
        }
    }

    /// Follows a `Type/id` reference to a live resource.
    pub fn resolve(&self, reference: &str) -> Option<&Value> {
        let (rtype, id) = reference.split_once('/')?;
        self.find(rtype, id)
    }

    /// Every live resource of a type.
    pub fn all(&self, rtype: &str) -> impl Iterator<Item = &Value> {
        self.resources.get(rtype).into_iter().flat_map(|by_id| by_id.values().flatten())
    }

    /// Stores a new resource. `project` scopes it (None: no project, as Medplum does when a caller
    /// replaces `meta` on the admin client endpoint); `author` is the caller's profile reference.
    pub fn create(&mut self, rtype: &str, mut resource: Value, project: Option<&str>, author: Option<&str>) -> Value {
        let id = resource["id"].as_str().map(str::to_string).unwrap_or_else(new_id);
        resource["id"] = json!(id);
        resource["resourceType"] = json!(rtype);
        let meta = meta_mut(&mut resource);
        for key in SERVER_META {
            meta.remove(key);
        }
        if let Some(pid) = project {
            meta.insert("project".into(), json!(pid));
            meta.insert("compartment".into(), json!([{"reference": format!("Project/{pid}")}]));
        }
        meta.insert("author".into(), json!({"reference": author.unwrap_or("system")}));
        stamp(&mut resource);
        self.resources.entry(rtype.to_string()).or_default().insert(id, Some(resource.clone()));
        resource
    }

    /// Stores `resource` (a full replacement) over the live resource `id`, keeping the server-owned
    /// meta elements. An identical body makes no new version (Medplum behaves the same).
    pub fn replace(&mut self, rtype: &str, id: &str, mut resource: Value) -> Value {
        let previous = self.find(rtype, id).cloned().unwrap_or(Value::Null);
        resource["id"] = json!(id);
        resource["resourceType"] = json!(rtype);
        let kept: Vec<(String, Value)> = SERVER_META
            .iter()
            .filter_map(|key| previous["meta"].get(*key).map(|v| ((*key).to_string(), v.clone())))
            .collect();
        let meta = meta_mut(&mut resource);
        for key in SERVER_META {
            meta.remove(key);
        }
        meta.extend(kept);
        if meta.get("tag").is_some_and(|tags| tags.as_array().is_some_and(Vec::is_empty)) {
            meta.remove("tag");
        }
        if content_equal(&previous, &resource) {
            return previous;
        }
        stamp(&mut resource);
        self.resources.entry(rtype.to_string()).or_default().insert(id.to_string(), Some(resource.clone()));
        resource
    }

    /// Marks a resource deleted; later reads give 410.
    pub fn delete(&mut self, rtype: &str, id: &str) {
        if let Some(slot) = self.resources.get_mut(rtype).and_then(|by_id| by_id.get_mut(id)) {
            *slot = None;
        }
    }

    /// The live ProjectMembership whose `user` is `user_ref` (a client's own membership).
    pub fn membership_of_user(&self, user_ref: &str) -> Option<&Value> {
        self.all("ProjectMembership").find(|m| m["user"]["reference"] == user_ref)
    }
}

fn meta_mut(resource: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !resource["meta"].is_object() {
        resource["meta"] = json!({});
    }
    resource["meta"].as_object_mut().expect("meta was just made an object")
}

fn stamp(resource: &mut Value) {
    let meta = meta_mut(resource);
    meta.insert("versionId".into(), json!(new_id()));
    meta.insert("lastUpdated".into(), json!(now().strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()));
}

fn content_equal(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
        }
        v
    };
    strip(a) == strip(b)
}

/// The project a stored resource belongs to.
pub fn project_of(resource: &Value) -> Option<&str> {
    resource["meta"]["project"].as_str()
}

/// The resource as a FHIR read shows it: without the server-internal meta elements, unless the
/// caller asked for `X-Medplum: extended`.
pub fn present(resource: &Value, extended: bool) -> Value {
    let mut out = resource.clone();
    if !extended && let Some(meta) = out.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("project");
        meta.remove("author");
        meta.remove("compartment");
    }
    out
}
