//! Grants: how ClientApplications and ProjectUsers refer to AccessPolicies (`spec.access[]`), and the
//! membership access Medplum gets for them.

use std::sync::Arc;

use kube::api::Api;

use super::Context;
use crate::crd::{AccessGrant, AccessPolicy};
use crate::failure::Failure;
use crate::medplum::{MembershipAccess, MembershipParameter, Ref};

/// Why a grant (`spec.access[].policyRef`) cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("AccessPolicy {name} not found in this namespace")]
    NotFound { name: String },
    #[error("AccessPolicy {name} does not exist in Medplum yet")]
    NotReady { name: String },
    #[error("AccessPolicy {name} uses another connection")]
    ConnectionMismatch { name: String },
    #[error(
        "parameter {parameter} of AccessPolicy {name}: a valueString may not hold '\"', '\\' or control characters (Medplum puts it into the policy's JSON text as it is)"
    )]
    InvalidParameter { name: String, parameter: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Failure for GrantError {
    fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "PolicyNotFound",
            Self::NotReady { .. } => "PolicyNotReady",
            Self::ConnectionMismatch { .. } => "PolicyConnectionMismatch",
            Self::InvalidParameter { .. } => "InvalidParameter",
            Self::Kube(_) => "KubernetesApiError",
        }
    }

    fn is_transient(&self) -> bool {
        matches!(self, Self::NotReady { .. } | Self::Kube(_))
    }
}

/// The membership's `access[]` for resolved grants: `(policy id, grant)`.
pub fn membership_access(grants: &[(String, &AccessGrant)]) -> Vec<MembershipAccess> {
    grants
        .iter()
        .map(|(policy_id, grant)| MembershipAccess {
            policy: Ref::to(format!("AccessPolicy/{policy_id}")),
            parameter: grant
                .parameters
                .iter()
                .map(|p| MembershipParameter {
                    name: p.name.clone(),
                    value_string: p.value_string.clone(),
                    value_reference: p.value_reference.clone().map(Ref::to),
                })
                .collect(),
        })
        .collect()
}

/// Whether a parameter value would change the JSON text Medplum substitutes it into.
pub fn breaks_json_text(value: &str) -> bool {
    value.chars().any(|c| c == '"' || c == '\\' || c.is_control())
}

/// Resolves the grants of a resource of `kind` to Medplum policy ids through the AccessPolicy
/// resources of the namespace, which must use the same connection (the same Medplum project). They
/// are read from the watch of `kind`'s controller, or from the API server when it does not hold them.
pub async fn resolve_grants(
    ctx: &Context,
    namespace: &str,
    connection: &crate::crd::ConnectionRef,
    grants: &[AccessGrant],
) -> Result<Vec<MembershipAccess>, GrantError> {
    let api: Api<AccessPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let mut resolved = Vec::new();
    for grant in grants {
        let name = grant.policy_ref.name.clone();
        // Repeated from the schema, for objects stored before it said so: a quote or backslash in a
        // value would rewrite the policy Medplum evaluates, beyond anything the connection checked.
        if let Some(p) = grant.parameters.iter().find(|p| p.value_string.as_deref().is_some_and(breaks_json_text)) {
            return Err(GrantError::InvalidParameter { name, parameter: p.name.clone() });
        }
        let mut changes = ctx.policies.changes();
        let deadline = tokio::time::Instant::now() + NEW_POLICY_WAIT;
        let id = loop {
            let policy = match ctx.policies.get(namespace, &name) {
                Some(policy) => policy,
                None => Arc::new(api.get_opt(&name).await?.ok_or_else(|| GrantError::NotFound { name: name.clone() })?),
            };
            if policy.spec.connection_ref != *connection {
                return Err(GrantError::ConnectionMismatch { name });
            }
            // A policy with an id exists in Medplum; whether its latest spec was applied is its own status.
            if let Some(id) = policy.status.as_ref().and_then(|s| s.policy_id.clone()) {
                break id;
            }
            // A policy declared with its grantees (a first sync) is being made: wait for it here,
            // rather than report it missing and be reconciled again once it is there.
            // A policy that was reconciled and has no id is failing: its status says why, no wait.
            let new = policy.status.as_ref().is_none_or(|s| s.conditions.is_empty());
            if !new || !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
                return Err(GrantError::NotReady { name });
            }
        };
        resolved.push((id, grant));
    }
    Ok(membership_access(&resolved))
}

/// How long a grantee waits, within its reconcile, for a policy that has never been reconciled yet.
const NEW_POLICY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_values_that_would_rewrite_the_policy_text_are_refused() {
        assert!(!breaks_json_text("Organization/123"));
        assert!(!breaks_json_text("final or prelim, 50% (ok)"));
        for injected in [r#"final"},{"resourceType":"Patient"#, r"a\u0022b", "line\nbreak"] {
            assert!(breaks_json_text(injected), "{injected}");
        }
    }
}
