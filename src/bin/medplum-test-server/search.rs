//! FHIR search: the parameters Medplum offers on the types the operator touches.

use serde_json::Value;

use crate::outcome::Outcome;

/// One parsed `name[:modifier]=value` search parameter.
pub struct Param {
    pub name: String,
    pub modifier: Option<String>,
    pub value: String,
}

/// Result-shaping parameters that are not filters.
const CONTROL: [&str; 6] = ["_count", "_offset", "_elements", "_sort", "_total", "_summary"];

pub fn parse(query: &str) -> Vec<Param> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(key, value)| {
            let (name, modifier) = match key.split_once(':') {
                Some((n, m)) => (n.to_string(), Some(m.to_string())),
                None => (key.to_string(), None),
            };
            Param { name, modifier, value: value.to_string() }
        })
        .collect()
}

pub fn control<'a>(params: &'a [Param], name: &str) -> Option<&'a str> {
    params.iter().find(|p| p.name == name).map(|p| p.value.as_str())
}

/// Checks every filter is known for the type (Medplum: 400 "Unknown search parameter: x").
pub fn validate(rtype: &str, params: &[Param]) -> Result<(), Outcome> {
    for p in params.iter().filter(|p| !CONTROL.contains(&p.name.as_str())) {
        if !known(rtype, &p.name) {
            return Err(Outcome::invalid(format!("Unknown search parameter: {}", p.name)));
        }
    }
    Ok(())
}

fn known(rtype: &str, name: &str) -> bool {
    if matches!(name, "_id" | "_tag" | "_lastUpdated" | "_project" | "_compartment") {
        return true;
    }
    match rtype {
        "ClientApplication" | "AccessPolicy" | "Project" => name == "name",
        "ProjectMembership" => matches!(
            name,
            "profile"
                | "user"
                | "external-id"
                | "identifier"
                | "user-name"
                | "profile-type"
                | "admin"
                | "active"
                | "access-policy"
                | "project"
        ),
        "User" => matches!(name, "email" | "identifier" | "external-id" | "project"),
        "Practitioner" | "Patient" | "RelatedPerson" => matches!(name, "identifier" | "name" | "email"),
        "DomainConfiguration" => name == "domain",
        "UserSecurityRequest" => name == "user",
        _ => false,
    }
}

/// Whether a resource matches every filter; `resolve` follows references for chained parameters.
pub fn matches(resource: &Value, params: &[Param], resolve: &dyn Fn(&str) -> Option<Value>) -> bool {
    params.iter().filter(|p| !CONTROL.contains(&p.name.as_str())).all(|p| matches_one(resource, p, resolve))
}

fn token_matches(system: &Value, code: &Value, wanted: &str) -> bool {
    match wanted.split_once('|') {
        Some(("", c)) => system.is_null() && code == c,
        Some((s, "")) => system == s,
        Some((s, c)) => system == s && code == c,
        None => code == wanted,
    }
}

/// A date parameter with its FHIR prefix (`ge2026-01-01T00:00:00.000Z`; none means `eq`).
fn date_matches(actual: jiff::Timestamp, wanted: &str) -> bool {
    let (prefix, text) = match wanted.get(..2) {
        Some(p @ ("eq" | "ne" | "gt" | "lt" | "ge" | "le")) => (p, &wanted[2..]),
        _ => ("eq", wanted),
    };
    let Ok(bound) = text.parse::<jiff::Timestamp>() else { return false };
    match prefix {
        "gt" => actual > bound,
        "lt" => actual < bound,
        "ge" => actual >= bound,
        "le" => actual <= bound,
        "ne" => actual != bound,
        _ => actual == bound,
    }
}

fn reference_matches(reference: &Value, wanted: &str) -> bool {
    reference["reference"].as_str().is_some_and(|r| r == wanted || r.ends_with(&format!("/{wanted}")))
}

fn bool_param(value: &Value, wanted: &str) -> bool {
    let actual = value.as_bool().unwrap_or(false);
    wanted.parse::<bool>().is_ok_and(|w| w == actual)
}

fn matches_one(resource: &Value, p: &Param, resolve: &dyn Fn(&str) -> Option<Value>) -> bool {
    let value = p.value.as_str();
    // The one chained search the operator uses: ProjectMembership?user:User.email=<email>.
    if p.name == "user" && p.modifier.as_deref() == Some("User.email") {
        let user = resource["user"]["reference"].as_str().and_then(resolve);
        return user.is_some_and(|u| u["email"].as_str().is_some_and(|e| e.eq_ignore_ascii_case(value)));
    }
    if p.modifier.as_deref() == Some("missing") {
        let missing = field_for(resource, &p.name).is_null_or_empty();
        return value.parse::<bool>().is_ok_and(|w| w == missing);
    }
    let any_of = |f: &dyn Fn(&str) -> bool| value.split(',').any(f);
    match p.name.as_str() {
        "_id" => any_of(&|v| resource["id"] == v),
        "_lastUpdated" => resource["meta"]["lastUpdated"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_some_and(|updated| date_matches(updated, value)),
        "_tag" => any_of(&|v| {
            resource["meta"]["tag"].as_array().into_iter().flatten().any(|t| token_matches(&t["system"], &t["code"], v))
        }),
        "_project" | "project" => any_of(&|v| {
            resource["meta"]["project"] == v.trim_start_matches("Project/")
                || reference_matches(&resource["project"], v)
        }),
        "_compartment" => any_of(&|v| {
            resource["meta"]["compartment"].as_array().into_iter().flatten().any(|c| reference_matches(c, v))
        }),
        "name" => {
            let name = resource["name"].as_str().unwrap_or_default();
            match p.modifier.as_deref() {
                Some("exact") => any_of(&|v| name == v),
                _ => any_of(&|v| name.to_lowercase().starts_with(&v.to_lowercase())),
            }
        }
        "profile" => any_of(&|v| reference_matches(&resource["profile"], v)),
        "user" => any_of(&|v| reference_matches(&resource["user"], v)),
        "profile-type" => {
            any_of(&|v| resource["profile"]["reference"].as_str().is_some_and(|r| r.starts_with(&format!("{v}/"))))
        }
        "external-id" => any_of(&|v| resource["externalId"] == v),
        "domain" => any_of(&|v| resource["domain"].as_str().is_some_and(|d| d.eq_ignore_ascii_case(v))),
        "user-name" => any_of(&|v| resource["userName"] == v),
        "admin" => bool_param(&resource["admin"], value),
        "active" => {
            // Medplum stores no `active` until it is set; unset counts as active.
            let active = resource["active"].as_bool().unwrap_or(true);
            value.parse::<bool>().is_ok_and(|w| w == active)
        }
        "access-policy" => any_of(&|v| {
            reference_matches(&resource["accessPolicy"], v)
                || resource["access"].as_array().into_iter().flatten().any(|a| reference_matches(&a["policy"], v))
        }),
        "identifier" => any_of(&|v| {
            resource["identifier"].as_array().into_iter().flatten().any(|i| token_matches(&i["system"], &i["value"], v))
        }),
        "email" => any_of(&|v| {
            resource["email"].as_str().is_some_and(|e| e.eq_ignore_ascii_case(v))
                || resource["telecom"].as_array().into_iter().flatten().any(|t| t["value"] == v)
        }),
        _ => false,
    }
}

fn field_for<'a>(resource: &'a Value, name: &str) -> &'a Value {
    match name {
        "active" => &resource["active"],
        "admin" => &resource["admin"],
        "external-id" => &resource["externalId"],
        "access-policy" => &resource["accessPolicy"],
        other => &resource[other],
    }
}

trait NullOrEmpty {
    fn is_null_or_empty(&self) -> bool;
}

impl NullOrEmpty for Value {
    fn is_null_or_empty(&self) -> bool {
        self.is_null() || self.as_array().is_some_and(Vec::is_empty)
    }
}

/// Keeps the listed top-level elements (and id, meta, resourceType) and marks the result SUBSETTED,
/// as Medplum does for `_elements`.
pub fn subset(mut resource: Value, elements: &str) -> Value {
    let keep: Vec<&str> = elements.split(',').map(str::trim).collect();
    if let Some(map) = resource.as_object_mut() {
        map.retain(|k, _| keep.contains(&k.as_str()) || matches!(k.as_str(), "id" | "meta" | "resourceType"));
        let meta = map.entry("meta").or_insert_with(|| serde_json::json!({}));
        let tags =
            meta.as_object_mut().expect("meta is an object").entry("tag").or_insert_with(|| serde_json::json!([]));
        if let Some(tags) = tags.as_array_mut() {
            tags.push(serde_json::json!({"system": "http://hl7.org/fhir/v3/ObservationValue", "code": "SUBSETTED"}));
        }
    }
    resource
}
