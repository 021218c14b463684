//! What a namespace may get through a connection, every rule in one place: which namespaces a
//! connection admits, the admin and unrestricted memberships it allows, the ceiling on what policies
//! grant, what may be adopted from Medplum and deleted there afterwards, project settings and domain
//! configuration. Pure: every kind and the export call it, and one table test covers every rule for
//! every kind. (Which Secret a client may write into is the Secret owner's rule: `foreign_secret.rs`.)

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Selector, SelectorExt};

use crate::crd::{
    AccessPolicySpec, AllowedNamespaces, ClientApplicationSpec, ConnectionLimits, Interaction, PolicyResource,
    ProjectUserSpec,
};
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
    /// What, and the list of `spec.limits.adoption` that would name it.
    #[error("the connection does not allow adopting {what} (spec.limits.adoption.{list} does not list it)")]
    AdoptionNotAllowed { what: String, list: &'static str },
    #[error(
        "spec.adopt.secret: Keep would hand the client's current secret to this namespace, which the connection does not allow (spec.limits.adoption.allowKeepSecret); adopt with secret: Rotate"
    )]
    KeepSecretNotAllowed,
    #[error("{what} is the credential of {connection}; a connection's own credential is never adopted")]
    ConnectionCredential { what: String, connection: String },
    #[error("{what} {why}; the connection's limits do not allow that, so it is not adopted")]
    AdoptBeyondLimits { what: String, why: String },
}

impl Failure for Denied {
    fn reason(&self) -> &'static str {
        match self {
            Self::Admin(_) => "AdminNotAllowed",
            Self::UnrestrictedAccess => "UnrestrictedAccessNotAllowed",
            Self::ExceedsLimits(_) => "ExceedsConnectionLimits",
            Self::ProjectSettings => "ProjectSettingsNotAllowed",
            Self::SuperAdminRequired(_) => "SuperAdminRequired",
            Self::AdoptionNotAllowed { .. } => "AdoptionNotAllowed",
            Self::KeepSecretNotAllowed => "KeepSecretNotAllowed",
            Self::ConnectionCredential { .. } => "AdoptTargetIsConnectionCredential",
            Self::AdoptBeyondLimits { .. } => "AdoptTargetBeyondLimits",
        }
    }

    /// A rule waits for a change of the resource or of the connection.
    fn is_transient(&self) -> bool {
        false
    }
}

/// Which namespaces may use a connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// A MedplumConnection: its own namespace only.
    Namespace(String),
    /// A ClusterMedplumConnection: its `allowedNamespaces`, by name or by label selector.
    Namespaces(AllowedNamespaces),
}

impl Admission {
    /// Whether resources in `namespace` may use the connection, when its name alone decides; `None`
    /// when its labels must be read.
    pub fn admits_by_name(&self, namespace: &str) -> Option<bool> {
        match self {
            Self::Namespace(own) => Some(own == namespace),
            Self::Namespaces(allowed) if allowed.names.iter().any(|n| n == namespace) => Some(true),
            Self::Namespaces(allowed) => allowed.selector.is_none().then_some(false),
        }
    }

    /// Whether resources in `namespace` (with these labels) may use the connection. A selector
    /// Kubernetes would not accept admits nothing.
    pub fn admits(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Namespace(own) => own == namespace,
            Self::Namespaces(allowed) => {
                allowed.names.iter().any(|n| n == namespace)
                    || allowed
                        .selector
                        .clone()
                        .and_then(|s| Selector::try_from(s).ok())
                        .is_some_and(|s| s.matches(labels))
            }
        }
    }
}

/// What a ClientApplication's spec asks of the connection: full access, and on-behalf-of (Medplum
/// allows `X-Medplum-On-Behalf-Of` only to project administrators).
pub fn client_application(limits: &ConnectionLimits, spec: &ClientApplicationSpec) -> Result<(), Denied> {
    unrestricted_access(limits, spec.unrestricted_access)?;
    let on_behalf_of = "spec.onBehalfOf makes the client's membership a project administrator (Medplum allows X-Medplum-On-Behalf-Of only to them)";
    admin(limits, spec.on_behalf_of.then_some(on_behalf_of))
}

/// What a ProjectUser's spec asks of the connection: a project administrator, and full access.
pub fn project_user(limits: &ConnectionLimits, spec: &ProjectUserSpec) -> Result<(), Denied> {
    admin(limits, spec.admin.then_some("spec.admin asks for a project administrator"))?;
    unrestricted_access(limits, spec.unrestricted_access)
}

/// What `asks_admin` names asks for a project administrator: only with `allowAdmin`.
fn admin(limits: &ConnectionLimits, asks_admin: Option<&'static str>) -> Result<(), Denied> {
    match asks_admin {
        Some(what) if !limits.allow_admin => Err(Denied::Admin(what)),
        _ => Ok(()),
    }
}

/// A membership without any policy is full access: only with `allowUnrestrictedAccess`.
fn unrestricted_access(limits: &ConnectionLimits, unrestricted: bool) -> Result<(), Denied> {
    if unrestricted && !limits.allow_unrestricted_access { Err(Denied::UnrestrictedAccess) } else { Ok(()) }
}

/// An AccessPolicy grants nothing beyond the connection's limits.
pub fn access_policy(limits: &ConnectionLimits, spec: &AccessPolicySpec) -> Result<(), Denied> {
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

/// What a resource asks to take over from Medplum.
pub enum Adoptee<'a> {
    Client { id: &'a str, keep_secret: bool },
    Policy { id: &'a str },
    Member { email: Option<&'a str>, external_id: Option<&'a str> },
}

/// Adoption is a grant of the connection (`spec.limits.adoption`): only what it lists, a client's
/// current secret only with `allowKeepSecret`. `what` names the object in the refusal.
pub fn adoption(limits: &ConnectionLimits, adoptee: &Adoptee, what: &str) -> Result<(), Denied> {
    let adoption = &limits.adoption;
    let (listed, list) = match *adoptee {
        Adoptee::Client { id, .. } => (adoption.admits_client(id), "clientIds"),
        Adoptee::Policy { id } => (adoption.admits_policy(id), "policyIds"),
        Adoptee::Member { email, external_id } => {
            let list = if external_id.is_some() { "userExternalIds" } else { "userEmails" };
            (adoption.admits_user(email, external_id), list)
        }
    };
    if !listed {
        return Err(Denied::AdoptionNotAllowed { what: what.to_string(), list });
    }
    if matches!(adoptee, Adoptee::Client { keep_secret: true, .. }) && !adoption.allow_keep_secret {
        return Err(Denied::KeepSecretNotAllowed);
    }
    Ok(())
}

/// A connection's own credential is never adopted, whatever the limits: its holder would get the
/// connection's rights. `credentials` pairs every known connection's client id with its name.
pub fn not_a_connection_credential<'a>(
    client_id: &str,
    mut credentials: impl Iterator<Item = (&'a str, &'a str)>,
    what: &str,
) -> Result<(), Denied> {
    match credentials.find(|(id, _)| *id == client_id) {
        Some((_, connection)) => {
            Err(Denied::ConnectionCredential { what: what.to_string(), connection: connection.to_string() })
        }
        None => Ok(()),
    }
}

/// The membership an adopted object brings along stays within the limits: a project admin needs
/// `allowAdmin`, one without any policy (full access) `allowUnrestrictedAccess`. Its policies are held
/// against the ceiling with `check_limits` (`adopted_policy`) once read.
pub fn adopted_membership(limits: &ConnectionLimits, admin: bool, has_policy: bool, what: &str) -> Result<(), Denied> {
    let beyond = |why: &str| Err(Denied::AdoptBeyondLimits { what: what.to_string(), why: why.to_string() });
    if admin && !limits.allow_admin {
        return beyond("is a project admin (spec.limits.allowAdmin)");
    }
    if !has_policy && !limits.allow_unrestricted_access {
        return beyond("has no access policy, which is full access (spec.limits.allowUnrestrictedAccess)");
    }
    Ok(())
}

/// A policy that is adopted, or that an adopted membership has, grants nothing beyond the ceiling;
/// `its` names the policy in the message ("its", "its AccessPolicy/<id>").
pub fn adopted_policy(
    limits: &ConnectionLimits,
    policy: &AccessPolicyResource,
    what: &str,
    its: &str,
) -> Result<(), Denied> {
    check_limits(&medplum_grants(policy), limits, |i| format!("{its} resource[{i}]"))
        .map_err(|why| Denied::AdoptBeyondLimits { what: what.to_string(), why })
}

/// Whether deleting the resource may delete its Medplum object: what the operator made, yes; what it
/// adopted only with `spec.limits.adoption.allowDelete` (otherwise the object is released).
pub fn may_delete(limits: &ConnectionLimits, adopted: bool) -> bool {
    !adopted || limits.adoption.allow_delete
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
mod tests;
