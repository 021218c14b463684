//! What a namespace may get through a connection: the grants a policy makes, held against the
//! connection's limits (no project administration without `allowAdmin`, nothing beyond
//! `allowedResources`). Pure; AccessPolicy, adoption and the export call it.

use std::collections::BTreeSet;

use crate::crd::{AccessPolicySpec, ConnectionLimits, Interaction, PolicyResource};
use crate::failure::Failure;
use crate::medplum::AccessPolicyResource;

/// A rule of this module that a resource breaks: what the connection does not let its namespace have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Names what asks for a project administrator.
    #[error("{0}, which the connection does not allow (spec.limits.allowAdmin)")]
    Admin(&'static str),
    #[error(
        "spec.unrestrictedAccess asks for a membership without any policy (full access), which the connection does not allow (spec.limits.allowUnrestrictedAccess)"
    )]
    UnrestrictedAccess,
    #[error("exceeds the connection's limits: {0}")]
    ExceedsLimits(String),
    #[error(
        "project-level settings concern the whole project, which the connection does not allow (spec.limits.allowProjectSettings)"
    )]
    ProjectSettings,
    #[error(
        "ClusterMedplumConnection {0} does not hold a super admin's credential (spec.superAdminCredential); Medplum lets only super admins manage domain configurations"
    )]
    SuperAdminRequired(String),
}

impl Failure for Denied {
    fn reason(&self) -> &'static str {
        match self {
            Self::Admin(_) => "AdminNotAllowed",
            Self::UnrestrictedAccess => "UnrestrictedAccessNotAllowed",
            Self::ExceedsLimits(_) => "ExceedsConnectionLimits",
            Self::ProjectSettings => "ProjectSettingsNotAllowed",
            Self::SuperAdminRequired(_) => "SuperAdminRequired",
        }
    }

    /// A rule waits for a change of the resource or of the connection.
    fn is_transient(&self) -> bool {
        false
    }
}

/// What `asks_admin` names asks for a project administrator: only with `allowAdmin`.
pub fn admin(limits: &ConnectionLimits, asks_admin: Option<&'static str>) -> Result<(), Denied> {
    match asks_admin {
        Some(what) if !limits.allow_admin => Err(Denied::Admin(what)),
        _ => Ok(()),
    }
}

/// A membership without any policy is full access: only with `allowUnrestrictedAccess`.
pub fn unrestricted_access(limits: &ConnectionLimits, unrestricted: bool) -> Result<(), Denied> {
    if unrestricted && !limits.allow_unrestricted_access { Err(Denied::UnrestrictedAccess) } else { Ok(()) }
}

/// An AccessPolicy grants nothing beyond the connection's limits.
pub fn policy(spec: &AccessPolicySpec, limits: &ConnectionLimits) -> Result<(), Denied> {
    check_limits(&spec_grants(spec), limits, |index| format!("spec.resources[{index}]")).map_err(Denied::ExceedsLimits)
}

/// Project-level settings (MedplumProject) concern every namespace of the project.
pub fn project_settings(limits: &ConnectionLimits) -> Result<(), Denied> {
    if limits.allow_project_settings { Ok(()) } else { Err(Denied::ProjectSettings) }
}

/// Domain configurations are server-wide: only through a cluster connection with a super admin's
/// credential, which no namespace can write.
pub fn domain_configuration(connection: &str, super_admin: bool) -> Result<(), Denied> {
    if super_admin { Ok(()) } else { Err(Denied::SuperAdminRequired(connection.to_string())) }
}

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
