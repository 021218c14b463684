//! Adoption: taking over a Medplum object the namespace did not create (`spec.adopt`).
//!
//! It is a privilege the connection grants (`spec.limits.adoption`: which clients and members, whether
//! a client's current secret may be kept, whether deletion may remove what was adopted). Whatever it
//! grants, three kinds of object are never adopted: a connection's own credential, an object that any
//! medplum-operator manages (of any cluster id), and one whose current access is beyond the
//! connection's limits. Every check here runs before anything is written, in Kubernetes or Medplum.
//!
//! An adopted object is marked as such in Medplum (a tag on a client, an identifier on a membership),
//! so that its deletion, however much later, knows the namespace did not create it.

use crate::crd::ConnectionLimits;
use crate::medplum::{AccessPolicyResource, Coding, Identifier, MedplumClient, MedplumError, MembershipResource};

use super::connection::UsableConnection;
use super::tenancy::{check_limits, medplum_grants};
use crate::failure::Failure;

/// The start of the system of every tag and identifier a medplum-operator writes, whatever its cluster id.
const OPERATOR_SYSTEM: &str = "urn:medplum-operator:";

/// The marker an adopted object carries beside its ownership tag: same code, system
/// `urn:medplum-operator:<cluster id>:adopted`.
pub fn adopted_marker(ownership: &Coding) -> Coding {
    Coding { system: format!("{}:adopted", ownership.system), code: ownership.code.clone() }
}

/// The marker as a membership identifier.
pub fn adopted_identifier(ownership: &Identifier) -> Identifier {
    Identifier { system: format!("{}:adopted", ownership.system), value: ownership.value.clone() }
}

/// Why an object is not adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptionError {
    #[error("the connection does not allow adopting {what} (spec.limits.adoption)")]
    NotAllowed { what: String },
    #[error(
        "spec.adopt.secret: Keep would hand the client's current secret to this namespace, which the connection does not allow (spec.limits.adoption.allowKeepSecret); adopt with secret: Rotate"
    )]
    KeepSecretNotAllowed,
    #[error("{what} is the credential of {connection}; a connection's own credential is never adopted")]
    ConnectionCredential { what: String, connection: String },
    #[error(
        "{what} is managed by a medplum-operator as {owner}; an object another resource or cluster manages is never adopted"
    )]
    ManagedElsewhere { what: String, owner: String },
    #[error("{what} {why}; the connection's limits do not allow that, so it is not adopted")]
    BeyondLimits { what: String, why: String },
    #[error("Medplum found no {what} to adopt in the project")]
    NotFound { what: String },
    #[error(transparent)]
    Medplum(#[from] MedplumError),
}

impl Failure for AdoptionError {
    fn reason(&self) -> &'static str {
        match self {
            Self::NotAllowed { .. } => "AdoptionNotAllowed",
            Self::KeepSecretNotAllowed => "KeepSecretNotAllowed",
            Self::ConnectionCredential { .. } => "AdoptTargetIsConnectionCredential",
            Self::ManagedElsewhere { .. } => "AlreadyManaged",
            Self::BeyondLimits { .. } => "AdoptTargetBeyondLimits",
            Self::NotFound { .. } => "AdoptTargetNotFound",
            Self::Medplum(e) => e.reason(),
        }
    }

    fn is_transient(&self) -> bool {
        matches!(self, Self::Medplum(e) if e.is_transient())
    }
}

/// The operator tag or identifier (`system`, `code`) on an object that is not `own` nor the marker
/// of `own`: the object is managed by another resource or another cluster's operator.
pub fn managed_elsewhere<'a>(marks: impl IntoIterator<Item = (&'a str, &'a str)>, own: (&str, &str)) -> Option<String> {
    let own_marker = format!("{}:adopted", own.0);
    marks
        .into_iter()
        .filter(|(system, _)| system.starts_with(OPERATOR_SYSTEM))
        .find(|(system, code)| !(*code == own.1 && (*system == own.0 || *system == own_marker)))
        .map(|(system, code)| format!("{code} ({system})"))
}

/// Checks a membership's current access against the connection's limits: a project admin needs
/// `allowAdmin`, a membership without any policy (full access) `allowUnrestrictedAccess`, and every
/// policy it has must be within the limits as a policy made through the connection would be.
pub async fn check_access(
    medplum: &MedplumClient,
    limits: &ConnectionLimits,
    membership: Option<&MembershipResource>,
    what: &str,
) -> Result<(), AdoptionError> {
    let Some(membership) = membership else { return Ok(()) };
    let beyond = |why: String| AdoptionError::BeyondLimits { what: what.to_string(), why };
    if membership.admin == Some(true) && !limits.allow_admin {
        return Err(beyond("is a project admin (spec.limits.allowAdmin)".into()));
    }
    let policies: Vec<&str> = membership
        .access_policy
        .iter()
        .chain(membership.access.iter().map(|a| &a.policy))
        .map(|r| r.reference.as_str())
        .collect();
    if policies.is_empty() && !limits.allow_unrestricted_access {
        return Err(beyond("has no access policy, which is full access (spec.limits.allowUnrestrictedAccess)".into()));
    }
    for reference in policies {
        let Some(policy) = medplum.read_reference::<AccessPolicyResource>(reference).await? else { continue };
        check_limits(&medplum_grants(&policy), limits, |i| format!("its {reference} resource[{i}]")).map_err(beyond)?;
    }
    Ok(())
}

/// The connection whose own credential is the ClientApplication `client_id`, if any this operator knows.
pub fn credential_of(usable: &UsableConnection, known: &[(String, String)], client_id: &str) -> Option<String> {
    if usable.client.client_id() == client_id {
        return Some("the connection this resource uses".into());
    }
    known.iter().find(|(id, _)| id == client_id).map(|(_, connection)| connection.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_other_owners_count_as_managed_elsewhere() {
        let own = ("urn:medplum-operator:default", "ClientApplication/team-a/app");
        let ours = [own, ("urn:medplum-operator:default:adopted", own.1), ("https://example.com/tags", "x")];
        assert_eq!(managed_elsewhere(ours, own), None);
        let other_resource = [("urn:medplum-operator:default", "ClientApplication/team-b/app")];
        assert_eq!(
            managed_elsewhere(other_resource, own).as_deref(),
            Some("ClientApplication/team-b/app (urn:medplum-operator:default)")
        );
        let other_cluster = [("urn:medplum-operator:east", own.1)];
        assert!(managed_elsewhere(other_cluster, own).is_some(), "another cluster's operator");
    }

    #[test]
    fn the_adopted_marker_shares_the_code() {
        let tag = Coding { system: "urn:medplum-operator:default".into(), code: "ProjectUser/a/b".into() };
        assert_eq!(adopted_marker(&tag).system, "urn:medplum-operator:default:adopted");
        assert_eq!(adopted_marker(&tag).code, tag.code);
    }
}
