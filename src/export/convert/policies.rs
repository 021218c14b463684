//! AccessPolicies, as AccessPolicy resources.

use std::collections::HashMap;

use serde_json::Value;

use super::{Export, Names, Snapshot, Target, metadata, skip, sorted, str_of, strings, unknown_keys};
use crate::controller::access_policy::validate;
use crate::controller::tenancy::{self, Adoptee};
use crate::crd::{
    AccessPolicy, AccessPolicySpec, AdoptPolicy, CompartmentRef, Interaction, IpAccessRule, IpAction,
    PolicyDeletionPolicy, PolicyResource,
};

const POLICY_FIELDS: [&str; 7] = ["resourceType", "id", "meta", "name", "compartment", "resource", "ipAccessRule"];
const POLICY_RESOURCE_FIELDS: [&str; 7] =
    ["resourceType", "criteria", "readonly", "interaction", "hiddenFields", "readonlyFields", "writeConstraint"];

/// The policy resources; returns the resource name of every exported policy by Medplum id.
pub(super) fn export_policies(snapshot: &Snapshot, target: &Target, out: &mut Export) -> HashMap<String, String> {
    let mut names = Names::new(target, "AccessPolicy");
    names.reserve(&snapshot.policies);
    let mut exported = HashMap::new();
    for v in sorted(&snapshot.policies) {
        let id = str_of(v, "id").unwrap_or_default().to_string();
        let what = format!("AccessPolicy/{id} ({})", str_of(v, "name").unwrap_or("no name"));
        let name = names.name(v, str_of(v, "name"), "policy");
        let admitted = tenancy::adoption(&target.limits, &Adoptee::Policy { id: &id }, &what);
        let refusal = names.refusal(v, &name, admitted);
        match (policy_spec(v, target), refusal) {
            (Err(why), _) | (Ok(_), Some(why)) => skip(out, what, why),
            (Ok(spec), None) => {
                exported.insert(id, name.clone());
                out.policies.push(AccessPolicy { metadata: metadata(&name, &target.namespace), spec, status: None });
            }
        }
    }
    exported
}

fn policy_spec(v: &Value, target: &Target) -> Result<AccessPolicySpec, String> {
    let unknown = unknown_keys(v, &POLICY_FIELDS);
    if unknown.iter().any(|k| k == "basedOn") && v["basedOn"].as_array().is_some_and(|a| !a.is_empty()) {
        return Err(
            "basedOn (policies built on other policies) cannot be declared; the operator would remove it".into()
        );
    }
    let unknown: Vec<String> = unknown.into_iter().filter(|k| k != "basedOn").collect();
    if !unknown.is_empty() {
        return Err(format!("fields an AccessPolicy resource cannot declare: {}", unknown.join(", ")));
    }
    if v.pointer("/compartment").is_some_and(|c| !unknown_keys(c, &["reference", "display"]).is_empty()) {
        return Err("compartment has fields other than reference".into());
    }
    let mut resources = Vec::new();
    for (index, r) in v.get("resource").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let unknown = unknown_keys(r, &POLICY_RESOURCE_FIELDS);
        if !unknown.is_empty() {
            return Err(format!("resource[{index}] has fields a resource cannot declare: {}", unknown.join(", ")));
        }
        let mut interactions = Vec::new();
        for i in strings(r, "interaction") {
            let parsed: Interaction = serde_json::from_value(Value::String(i.clone()))
                .map_err(|_| format!("resource[{index}] grants interaction {i:?}, which a resource cannot declare"))?;
            interactions.push(parsed);
        }
        let mut write_constraints = Vec::new();
        for e in r.get("writeConstraint").and_then(Value::as_array).into_iter().flatten() {
            match (str_of(e, "language"), str_of(e, "expression")) {
                (Some("text/fhirpath"), Some(expression))
                    if unknown_keys(e, &["language", "expression"]).is_empty() =>
                {
                    write_constraints.push(expression.to_string())
                }
                _ => return Err(format!("resource[{index}] has a writeConstraint that is not plain FHIRPath")),
            }
        }
        resources.push(PolicyResource {
            resource_type: str_of(r, "resourceType").unwrap_or_default().to_string(),
            criteria: str_of(r, "criteria").map(String::from),
            readonly: r.get("readonly").and_then(Value::as_bool),
            interactions,
            hidden_fields: strings(r, "hiddenFields"),
            readonly_fields: strings(r, "readonlyFields"),
            write_constraints,
        });
    }
    let mut ip_access_rules = Vec::new();
    for (index, rule) in v.get("ipAccessRule").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let action = match str_of(rule, "action") {
            Some("allow") => IpAction::Allow,
            Some("block") => IpAction::Block,
            other => return Err(format!("ipAccessRule[{index}] has action {other:?}")),
        };
        let value = str_of(rule, "value").unwrap_or_default().to_string();
        ip_access_rules.push(IpAccessRule { name: str_of(rule, "name").map(String::from), value, action });
    }
    let spec = AccessPolicySpec {
        connection_ref: target.connection_ref.clone(),
        display_name: str_of(v, "name").map(String::from),
        compartment: v
            .pointer("/compartment/reference")
            .and_then(Value::as_str)
            .map(|r| CompartmentRef { reference: r.into() }),
        resources,
        ip_access_rules,
        deletion_policy: PolicyDeletionPolicy::Orphan,
        adopt: str_of(v, "id").map(|id| AdoptPolicy { policy_id: id.into() }),
    };
    validate(&spec).map_err(|e| e.to_string())?;
    let policy: crate::medplum::AccessPolicyResource =
        serde_json::from_value(v.clone()).map_err(|e| format!("unreadable: {e}"))?;
    tenancy::adopted_policy(&target.limits, &policy, "the policy", "its").map_err(|denied| denied.to_string())?;
    Ok(spec)
}
