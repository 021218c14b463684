//! What a namespace may get through a connection: the grants a policy makes, held against the
//! connection's limits (no project administration without `allowAdmin`, nothing beyond
//! `allowedResources`). Pure; AccessPolicy, adoption and the export call it.

use std::collections::BTreeSet;

use crate::crd::{AccessPolicySpec, ConnectionLimits, Interaction, PolicyResource};
use crate::medplum::AccessPolicyResource;

/// Resource types whose holders administer the project: with them a member can read every client's
/// secret (`ClientApplication`), rewrite the policies of others (`AccessPolicy`), or change code that runs
/// with other memberships' rights (`Bot`). `*` includes them. Medplum itself keeps Project,
/// ProjectMembership and User to project admins.
pub const PROJECT_ADMINISTRATION: [&str; 3] = ["ClientApplication", "AccessPolicy", "Bot"];

/// What one entry of a policy grants: a resource type and interactions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub resource_type: String,
    pub interactions: BTreeSet<Interaction>,
}

/// The interactions an entry grants: those listed (all when none are), the read-only ones of them with
/// `readonly`, as Medplum reads them.
fn granted_interactions(listed: BTreeSet<Interaction>, readonly: bool) -> BTreeSet<Interaction> {
    let base: BTreeSet<Interaction> = if listed.is_empty() { Interaction::ALL.into_iter().collect() } else { listed };
    if readonly { base.into_iter().filter(|i| Interaction::READ_ONLY.contains(i)).collect() } else { base }
}

/// The interactions a policy resource of a spec grants.
pub fn granted(resource: &PolicyResource) -> BTreeSet<Interaction> {
    granted_interactions(resource.interactions.iter().copied().collect(), resource.readonly == Some(true))
}

/// What a spec's resources grant.
pub fn spec_grants(spec: &AccessPolicySpec) -> Vec<Grant> {
    spec.resources.iter().map(|r| Grant { resource_type: r.resource_type.clone(), interactions: granted(r) }).collect()
}

/// What a policy stored in Medplum grants. An interaction the operator does not know counts as all of
/// them, so that nothing is underestimated.
pub fn medplum_grants(policy: &AccessPolicyResource) -> Vec<Grant> {
    policy
        .resource
        .iter()
        .map(|entry| {
            let parsed: Option<BTreeSet<Interaction>> =
                entry.interaction.iter().map(|i| serde_json::from_value(serde_json::json!(i)).ok()).collect();
            Grant {
                resource_type: entry.resource_type.clone(),
                interactions: granted_interactions(parsed.unwrap_or_default(), entry.readonly == Some(true)),
            }
        })
        .collect()
}

/// Checks grants against the connection's limits: no project administration (nor `*`) unless it
/// allows admin, and nothing beyond `allowedResources`. `entry` names the i-th grant in the message.
pub fn check_limits(
    grants: &[Grant],
    limits: &ConnectionLimits,
    entry: impl Fn(usize) -> String,
) -> Result<(), String> {
    for (index, grant) in grants.iter().enumerate() {
        let administration =
            grant.resource_type == "*" || PROJECT_ADMINISTRATION.contains(&grant.resource_type.as_str());
        if administration && !limits.allow_admin {
            return Err(format!(
                "{} grants {}, which administers the project (its holder can read every client's secret and \
                 rewrite other policies); only a connection with spec.limits.allowAdmin allows that",
                entry(index),
                grant.resource_type
            ));
        }
        let Some(ceiling) = limits.allowed_resources.as_deref() else { continue };
        let allowed: BTreeSet<Interaction> = ceiling
            .iter()
            .filter(|c| c.resource_type == "*" || c.resource_type == grant.resource_type)
            .flat_map(|c| if c.interactions.is_empty() { Interaction::ALL.to_vec() } else { c.interactions.clone() })
            .collect();
        if allowed.is_empty() {
            return Err(format!(
                "{} grants {}, which the connection does not allow",
                entry(index),
                grant.resource_type
            ));
        }
        let excess: Vec<&str> = grant.interactions.difference(&allowed).map(|i| i.as_str()).collect();
        if !excess.is_empty() {
            return Err(format!(
                "{} grants {} on {}, beyond the allowed {}",
                entry(index),
                excess.join(", "),
                grant.resource_type,
                allowed.iter().map(|i| i.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_of_a_stored_policy_are_read_as_medplum_reads_them() {
        let policy: AccessPolicyResource = serde_json::from_value(serde_json::json!({
            "resourceType": "AccessPolicy", "resource": [
                {"resourceType": "Patient", "readonly": true},
                {"resourceType": "Observation", "interaction": ["read", "search"]},
                {"resourceType": "Task", "interaction": ["read", "$something-new"]}]
        }))
        .unwrap();
        let grants = medplum_grants(&policy);
        assert_eq!(grants[0].interactions, Interaction::READ_ONLY.into_iter().collect());
        assert_eq!(grants[1].interactions, [Interaction::Read, Interaction::Search].into_iter().collect());
        assert_eq!(grants[2].interactions, Interaction::ALL.into_iter().collect(), "unknown counts as all");
    }
}
