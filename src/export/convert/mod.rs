//! What a Medplum project holds, as the custom resources that declare it (pure).
//!
//! Every object is checked the way the operator will check it when the resources are applied: an
//! object the connection may not adopt, or one with fields a resource cannot express (which the
//! operator would then drop), is skipped and named with the reason, so that applying the export
//! never changes Medplum beyond the ownership tags (and, with `adopt.secret: Rotate`, the secrets).

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use crate::controller::adoption::managed_elsewhere;
use crate::controller::ownership_tag;
use crate::controller::tenancy::{self, Denied};
use crate::crd::{
    AccessGrant, AccessPolicy, AdoptSecret, ClientApplication, ConnectionLimits, ConnectionRef, LocalObjectRef,
    MedplumProject, PolicyParameter, ProjectUser,
};

mod clients;
mod policies;
mod project;
mod users;

use clients::export_clients;
use policies::export_policies;
use project::export_project;
use users::export_users;

/// What was read from Medplum, as JSON, so that fields the operator does not know are seen.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub project: Value,
    pub policies: Vec<Value>,
    pub clients: Vec<Value>,
    pub memberships: Vec<Value>,
    /// Profiles (`Practitioner/<id>` …) and Users (`User/<id>`) of the memberships, by reference;
    /// a User the credential may not read is missing.
    pub references: HashMap<String, Value>,
}

/// Where the resources go, and what the connection allows.
#[derive(Clone, Debug)]
pub struct Target {
    pub namespace: String,
    pub connection_ref: ConnectionRef,
    pub cluster_id: String,
    /// The connection's own credential, never exported.
    pub credential_client_id: String,
    pub limits: ConnectionLimits,
    pub adopt_secret: AdoptSecret,
}

/// The resources, and what was left out.
#[derive(Debug, Default)]
pub struct Export {
    pub policies: Vec<AccessPolicy>,
    pub clients: Vec<ClientApplication>,
    pub users: Vec<ProjectUser>,
    pub project: Option<MedplumProject>,
    /// `(what, why)`: objects not exported, and parts of exported ones left as they are in Medplum.
    pub notes: Vec<(String, String)>,
    /// Secrets to create before applying: `(name, key, what its value is)`; never a value.
    pub secrets_needed: Vec<(String, String, String)>,
}

/// A Kubernetes name for a Medplum object's name: lower case letters, digits and `-`, at most 63.
pub fn kube_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Keys of `v` outside `known`.
fn unknown_keys(v: &Value, known: &[&str]) -> Vec<String> {
    v.as_object().map(|o| o.keys().filter(|k| !known.contains(&k.as_str())).cloned().collect()).unwrap_or_default()
}

/// The operator marks (tags or identifiers) on an object: `(system, code)`.
fn marks(v: &Value) -> Vec<(String, String)> {
    let tags = v.pointer("/meta/tag").and_then(Value::as_array).into_iter().flatten();
    let tags = tags.filter_map(|t| Some((str_of(t, "system")?.to_string(), str_of(t, "code")?.to_string())));
    let identifiers = v.get("identifier").and_then(Value::as_array).into_iter().flatten();
    let identifiers =
        identifiers.filter_map(|i| Some((str_of(i, "system")?.to_string(), str_of(i, "value")?.to_string())));
    tags.chain(identifiers).collect()
}

/// Names resources of one kind: the name an object's own mark gives (it was exported and applied
/// before), else one made from its Medplum name, made unique with the start of its id.
struct Names {
    system: String,
    kind: &'static str,
    namespace: String,
    taken: BTreeSet<String>,
}

impl Names {
    fn new(target: &Target, kind: &'static str) -> Self {
        let system = ownership_tag(&target.cluster_id, "", "", "").system;
        Self { system, kind, namespace: target.namespace.clone(), taken: BTreeSet::new() }
    }

    /// The name this namespace's mark on the object gives it.
    fn marked(&self, v: &Value) -> Option<String> {
        let prefix = format!("{}/{}/", self.kind, self.namespace);
        let adopted = format!("{}:adopted", self.system);
        marks(v)
            .into_iter()
            .filter(|(system, _)| *system == self.system || *system == adopted)
            .find_map(|(_, code)| code.strip_prefix(&prefix).map(String::from))
    }

    /// Reserves the marked names of `objects` first, so that derived names never take them.
    fn reserve(&mut self, objects: &[Value]) {
        let marked: Vec<String> = objects.iter().filter_map(|v| self.marked(v)).collect();
        self.taken.extend(marked);
    }

    fn name(&mut self, v: &Value, display: Option<&str>, fallback: &str) -> String {
        if let Some(name) = self.marked(v) {
            return name;
        }
        let id = str_of(v, "id").unwrap_or_default();
        let base =
            Some(kube_name(display.unwrap_or_default())).filter(|n| !n.is_empty()).unwrap_or_else(|| fallback.into());
        let mut name = base.clone();
        if self.taken.contains(&name) {
            let short: String =
                id.chars().filter(char::is_ascii_alphanumeric).take(8).collect::<String>().to_lowercase();
            name = format!("{}-{short}", &base[..base.len().min(54)]);
        }
        self.taken.insert(name.clone());
        name
    }

    /// Why the operator would not adopt the object as `name`, as it checks on apply: the connection
    /// does not list it (`unlisted`, the message; an object this namespace already manages needs no
    /// listing), or another resource or cluster's operator manages it.
    /// Why `v` is not exported: the connection does not let it be adopted (`admitted`) and the
    /// namespace did not adopt it before, or another resource or cluster manages it.
    fn refusal(&self, v: &Value, name: &str, admitted: Result<(), Denied>) -> Option<String> {
        if let Err(denied) = admitted.as_ref()
            && self.marked(v).is_none()
        {
            return Some(denied.to_string());
        }
        let code = format!("{}/{}/{name}", self.kind, self.namespace);
        let marks = marks(v);
        managed_elsewhere(marks.iter().map(|(s, c)| (s.as_str(), c.as_str())), (&self.system, &code))
            .map(|owner| format!("managed by a medplum-operator as {owner}"))
    }
}

fn metadata(name: &str, namespace: &str) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() }
}

/// Converts what Medplum holds into resources.
pub fn export(snapshot: &Snapshot, target: &Target) -> Export {
    let mut out = Export::default();
    let policy_names = export_policies(snapshot, target, &mut out);
    let memberships_by_user: HashMap<&str, &Value> =
        snapshot.memberships.iter().filter_map(|m| Some((m.pointer("/user/reference")?.as_str()?, m))).collect();
    export_clients(snapshot, target, &policy_names, &memberships_by_user, &mut out);
    export_users(snapshot, target, &policy_names, &mut out);
    export_project(snapshot, target, &policy_names, &mut out);
    out
}

fn skip(out: &mut Export, what: String, why: impl Into<String>) {
    out.notes.push((what, why.into()));
}

fn sorted(objects: &[Value]) -> Vec<&Value> {
    let mut sorted: Vec<&Value> = objects.iter().collect();
    sorted.sort_by_key(|v| (str_of(v, "name").map(str::to_lowercase), str_of(v, "id").map(String::from)));
    sorted
}

// ---------------------------------------------------------------------------------------------------
// Memberships: what a membership grants, as `access` of a resource

/// What a membership grants as a resource says it: `(access, unrestricted, admin)`.
fn membership_grants(
    m: &Value,
    policy_names: &HashMap<String, String>,
    limits: &ConnectionLimits,
) -> Result<(Vec<AccessGrant>, bool, bool), String> {
    if m.get("active").and_then(Value::as_bool) == Some(false) {
        return Err("its membership is inactive (active: false), which a resource cannot declare".into());
    }
    let policy = |reference: &str| -> Result<LocalObjectRef, String> {
        let id = reference.strip_prefix("AccessPolicy/").unwrap_or(reference);
        policy_names
            .get(id)
            .map(|name| LocalObjectRef { name: name.clone() })
            .ok_or_else(|| format!("its membership has {reference}, which is not exported (see above)"))
    };
    let mut access = Vec::new();
    if let Some(reference) = m.pointer("/accessPolicy/reference").and_then(Value::as_str) {
        access.push(AccessGrant { policy_ref: policy(reference)?, parameters: Vec::new() });
    }
    for a in m.get("access").and_then(Value::as_array).into_iter().flatten() {
        let reference = a.pointer("/policy/reference").and_then(Value::as_str).unwrap_or_default();
        let mut parameters = Vec::new();
        for p in a.get("parameter").and_then(Value::as_array).into_iter().flatten() {
            let name = str_of(p, "name").unwrap_or_default().to_string();
            let value_string = str_of(p, "valueString").map(String::from);
            let value_reference = p.pointer("/valueReference/reference").and_then(Value::as_str).map(String::from);
            if value_string.is_some() == value_reference.is_some() {
                return Err(format!("parameter {name:?} of its membership is neither a string nor a reference"));
            }
            parameters.push(PolicyParameter { name, value_string, value_reference });
        }
        access.push(AccessGrant { policy_ref: policy(reference)?, parameters });
    }
    let admin = m.get("admin").and_then(Value::as_bool).unwrap_or(false);
    let unrestricted = access.is_empty();
    tenancy::adopted_membership(limits, admin, !unrestricted, "its membership").map_err(|denied| denied.to_string())?;
    Ok((access, unrestricted, admin))
}

#[cfg(test)]
mod tests;
