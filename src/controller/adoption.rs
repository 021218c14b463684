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

use super::connection::UsableConnection;
use super::failure::ResourceError;
use super::tenancy;
use crate::crd::ConnectionLimits;
use crate::medplum::{AccessPolicyResource, Coding, Identifier, MedplumClient, MembershipResource};

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

/// Refuses `what` when another resource or cluster manages it (see `managed_elsewhere`).
pub fn check_unmanaged<'a>(
    marks: impl IntoIterator<Item = (&'a str, &'a str)>,
    own: (&str, &str),
    what: &str,
) -> Result<(), ResourceError> {
    match managed_elsewhere(marks, own) {
        Some(owner) => Err(ResourceError::AlreadyManaged { what: what.to_string(), owner }),
        None => Ok(()),
    }
}

/// Checks a membership's current access, and every policy it has, against the connection's limits
/// (`tenancy::adopted_membership`, `tenancy::adopted_policy`).
pub async fn check_access(
    medplum: &MedplumClient,
    limits: &ConnectionLimits,
    membership: Option<&MembershipResource>,
    what: &str,
) -> Result<(), ResourceError> {
    let Some(membership) = membership else { return Ok(()) };
    let policies: Vec<&str> = membership
        .access_policy
        .iter()
        .chain(membership.access.iter().map(|a| &a.policy))
        .map(|r| r.reference.as_str())
        .collect();
    tenancy::adopted_membership(limits, membership.admin == Some(true), !policies.is_empty(), what)?;
    for reference in policies {
        let Some(policy) = medplum.read_reference::<AccessPolicyResource>(reference).await? else { continue };
        tenancy::adopted_policy(limits, &policy, what, &format!("its {reference}"))?;
    }
    Ok(())
}

/// Every connection's own credential as `(client id, connection)`, this resource's connection first.
pub fn connection_credentials(usable: &UsableConnection, known: Vec<(String, String)>) -> Vec<(String, String)> {
    let own = (usable.client.client_id().to_string(), "the connection this resource uses".to_string());
    std::iter::once(own).chain(known).collect()
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
