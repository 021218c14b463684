//! `AccessPolicy`: a Medplum AccessPolicy kept as the spec says, refused up front when Medplum would
//! reject it or misread it, and kept while memberships still use it (deleting a policy in use makes
//! Medplum refuse every token of those memberships).

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::adoption;
use super::connection::{UsableConnection, usable_connection};
use super::failure::ResourceError;
use super::status::{ConditionState, READY, apply_status, set_condition};
use super::tenancy::{self, Adoptee};
use super::{CleanupVia, Context, Error, ReconcileStream, UsesConnection, cleanup_via, event};
use crate::crd::{
    AccessPolicy, AccessPolicySpec, ClientApplication, IpAction, MedplumProject, PolicyDeletionPolicy, ProjectUser,
};
use crate::medplum::{
    AccessPolicyResource, Coding, Expression, IpAccessRuleEntry, MedplumError, MembershipResource, PolicyResourceEntry,
    Ref, SUBSETTED,
};

pub const KIND: &str = "AccessPolicy";

// ---------------------------------------------------------------------------------------------------
// Validation (pure)

/// Checks one `criteria` the way Medplum evaluates it: `<resourceType>?<params>` with plain parameters,
/// `:not` and `:missing` only, and no chained parameters (Medplum ignores or rejects the rest).
pub fn check_criteria(resource_type: &str, criteria: &str) -> Result<(), String> {
    let Some((target, query)) = criteria.split_once('?') else {
        return Err(format!("{criteria:?} has no '?': write {resource_type}?<parameters>"));
    };
    if resource_type == "*" {
        return Err("criteria cannot apply to resourceType \"*\"".into());
    }
    if target != resource_type {
        return Err(format!("{criteria:?} searches {target}, but resourceType is {resource_type}"));
    }
    if query.is_empty() {
        return Err(format!("{criteria:?} has no parameters"));
    }
    for param in query.split('&') {
        let Some((key, _value)) = param.split_once('=') else {
            return Err(format!("parameter {param:?} has no '='"));
        };
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key, None),
        };
        if name.starts_with("_has") || name.contains('.') {
            return Err(format!("chained parameter {key:?} is not supported in access policy criteria"));
        }
        if let Some(m) = modifier.filter(|m| !matches!(*m, "not" | "missing")) {
            return Err(format!(
                "modifier :{m} in {key:?} is not supported in access policy criteria; only :not and :missing are"
            ));
        }
    }
    Ok(())
}

/// Checks the spec for what the CRD schema cannot say: criteria, and IP rules (repeated from the
/// schema, so that a stored object that predates a rule is refused too).
pub fn validate(spec: &AccessPolicySpec) -> Result<(), ResourceError> {
    for (index, resource) in spec.resources.iter().enumerate() {
        if let Some(criteria) = &resource.criteria {
            check_criteria(&resource.resource_type, criteria)
                .map_err(|message| ResourceError::InvalidCriteria { index, message })?;
        }
    }
    for (index, rule) in spec.ip_access_rules.iter().enumerate() {
        if rule.value.contains('/') {
            let message = format!("{:?} is a CIDR range; Medplum matches address prefixes, e.g. \"10.2.\"", rule.value);
            return Err(ResourceError::InvalidIpRule { index, message });
        }
    }
    if let Some(last) = spec.ip_access_rules.last().filter(|r| r.action != IpAction::Block) {
        let index = spec.ip_access_rules.len() - 1;
        let message = format!(
            "the last rule ({:?}) allows; Medplum allows any address no rule matches, so end with a block rule",
            last.value
        );
        return Err(ResourceError::InvalidIpRule { index, message });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// What should exist (pure)

/// The Medplum AccessPolicy for a spec.
pub fn desired_policy(ap: &AccessPolicy, tag: &Coding) -> AccessPolicyResource {
    let spec = &ap.spec;
    AccessPolicyResource {
        resource_type: KIND.into(),
        // A resource that adopts marks the policy as adopted, so that its deletion knows.
        meta: crate::medplum::Meta {
            tag: std::iter::once(tag.clone())
                .chain(spec.adopt.as_ref().map(|_| adoption::adopted_marker(tag)))
                .collect(),
            ..Default::default()
        },
        name: Some(
            spec.display_name
                .clone()
                .unwrap_or_else(|| format!("{}/{}", ap.namespace().unwrap_or_default(), ap.name_any())),
        ),
        compartment: spec.compartment.as_ref().map(|c| Ref::to(c.reference.clone())),
        resource: spec
            .resources
            .iter()
            .map(|r| PolicyResourceEntry {
                resource_type: r.resource_type.clone(),
                criteria: r.criteria.clone(),
                readonly: r.readonly,
                interaction: r.interactions.iter().map(|i| i.as_str().to_string()).collect(),
                hidden_fields: r.hidden_fields.clone(),
                readonly_fields: r.readonly_fields.clone(),
                write_constraint: r
                    .write_constraints
                    .iter()
                    .map(|e| Expression { language: "text/fhirpath".into(), expression: e.clone() })
                    .collect(),
            })
            .collect(),
        ip_access_rule: spec
            .ip_access_rules
            .iter()
            .map(|r| IpAccessRuleEntry {
                name: r.name.clone(),
                value: r.value.clone(),
                action: match r.action {
                    IpAction::Allow => "allow".into(),
                    IpAction::Block => "block".into(),
                },
            })
            .collect(),
        ..Default::default()
    }
}

/// The names of fields where Medplum differs from `desired`.
pub fn policy_drift(desired: &AccessPolicyResource, actual: &AccessPolicyResource) -> Vec<&'static str> {
    let checks = [
        ("meta.tag", desired.meta.tag.iter().all(|t| actual.meta.has_tag(t))),
        ("name", desired.name == actual.name),
        ("compartment", desired.compartment == actual.compartment),
        ("resource", desired.resource == actual.resource),
        ("ipAccessRule", desired.ip_access_rule == actual.ip_access_rule),
        ("basedOn", actual.based_on.is_empty()),
    ];
    checks.into_iter().filter(|(_, same)| !same).map(|(name, _)| name).collect()
}

/// `desired` with the id of `actual` and the tags others put on it.
fn policy_body(desired: &AccessPolicyResource, actual: &AccessPolicyResource) -> AccessPolicyResource {
    let mut body = desired.clone();
    body.id = actual.id.clone();
    body.meta.tag = actual.meta.tags_with(&desired.meta.tag);
    body
}

/// The next thing to do for a policy, decided from what is observed of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Medplum holds no policy of this resource and none is to be adopted.
    Create,
    /// Take `id` over; it is checked against the limits before anything is written.
    Adopt {
        id: String,
    },
    /// Medplum's policy differs from the spec in these fields.
    Update {
        fields: Vec<&'static str>,
    },
    Done,
}

/// What follows from `observed` (the policy of this resource in Medplum, if any) for `desired`.
pub fn plan(desired: &AccessPolicyResource, observed: Option<&AccessPolicyResource>, adopt: Option<&str>) -> Step {
    match (observed, adopt) {
        (None, Some(id)) => Step::Adopt { id: id.to_string() },
        (None, None) => Step::Create,
        (Some(actual), _) => match policy_drift(desired, actual) {
            fields if fields.is_empty() => Step::Done,
            fields => Step::Update { fields },
        },
    }
}

// ---------------------------------------------------------------------------------------------------
// Reconcile

/// The Medplum policy of `ap`, by the id in status or the ownership tag; `fresh`: from Medplum itself,
/// whatever the view holds.
async fn find_policy(
    usable: &UsableConnection,
    ap: &AccessPolicy,
    tag: &Coding,
    fresh: bool,
) -> Result<Option<AccessPolicyResource>, MedplumError> {
    let recorded = ap.status.as_ref().and_then(|s| s.policy_id.as_deref());
    match fresh {
        true => usable.read_managed(&tag.system, &tag.code, recorded).await,
        false => usable.find_managed(&tag.system, &tag.code, recorded, false).await,
    }
}

/// Creates or updates the policy; returns it and the Events to publish.
async fn converge(ctx: &Context, ap: &AccessPolicy) -> Result<(AccessPolicyResource, Vec<Event>), ResourceError> {
    let namespace = ap.namespace().unwrap_or_default();
    let usable = usable_connection(ctx, &namespace, &ap.spec.connection_ref).await?;
    validate(&ap.spec)?;
    tenancy::access_policy(&usable.limits, &ap.spec)?;
    let tag = super::ownership_tag(&ctx.settings.cluster_id, KIND, &namespace, &ap.name_any());
    let result = converge_policy(&usable, ap, &tag).await;
    if let Err(ResourceError::Medplum(e)) = &result
        && e.leaves_object_uncertain()
    {
        usable.view.doubt::<AccessPolicyResource>(&tag.code);
    }
    result
}

/// Observes the policy, then carries out the plan's steps until it is done (at most adopt, update).
async fn converge_policy(
    usable: &UsableConnection,
    ap: &AccessPolicy,
    tag: &Coding,
) -> Result<(AccessPolicyResource, Vec<Event>), ResourceError> {
    let desired = desired_policy(ap, tag);
    let adopt = ap.spec.adopt.as_ref().map(|a| a.policy_id.as_str());
    let mut observed = find_policy(usable, ap, tag, false).await?;
    let mut events = Vec::new();
    let mut updated = false;
    loop {
        let actual = match plan(&desired, observed.as_ref(), adopt) {
            Step::Done => return Ok((observed.expect("planned done with a policy"), events)),
            Step::Update { fields } if updated => return Err(ResourceError::NotConverging(fields.join(", "))),
            Step::Create => {
                let condition = format!("_tag={}|{}", tag.system, tag.code);
                let created = usable.create_owned(&desired, &tag.code, &condition).await?;
                let note = format!("created Medplum AccessPolicy/{}", created.id.as_deref().unwrap_or_default());
                events.push(event(EventType::Normal, "Created", "Create", note));
                created
            }
            Step::Adopt { id } => {
                let adopted = adoptable_policy(usable, &id, tag).await?;
                events.push(event(
                    EventType::Normal,
                    "Adopted",
                    "Adopt",
                    format!("took over Medplum AccessPolicy/{id}"),
                ));
                adopted
            }
            Step::Update { fields } => {
                let actual = observed.as_ref().expect("planned an update with a policy");
                let id = actual.id.clone().unwrap_or_default();
                let version = actual.meta.version_id.clone().unwrap_or_default();
                let written = usable.client.update(&id, &policy_body(&desired, actual), &version).await?;
                usable.view.record(&written);
                if events.is_empty() {
                    let observed_generation = ap.status.as_ref().and_then(|s| s.observed_generation);
                    let target = format!("AccessPolicy/{id}");
                    events.push(super::update_event(
                        observed_generation,
                        ap.metadata.generation,
                        &target,
                        &fields.join(", "),
                    ));
                }
                updated = true;
                written
            }
        };
        observed = Some(actual);
    }
}

/// The AccessPolicy `id` of the connection's project, once the connection's adoption limits and the
/// policy itself allow taking it over. Nothing is written before this returns.
async fn adoptable_policy(
    usable: &UsableConnection,
    id: &str,
    own: &Coding,
) -> Result<AccessPolicyResource, ResourceError> {
    let what = format!("AccessPolicy/{id}");
    tenancy::adoption(&usable.limits, &Adoptee::Policy { id }, &what)?;
    let found = usable.client.search::<AccessPolicyResource>(&[("_id", id), ("_project", &usable.project_id)]).await?;
    let policy = found.into_iter().next().ok_or_else(|| ResourceError::AdoptTargetNotFound { what: what.clone() })?;
    let marks = policy.meta.tag.iter().map(|t| (t.system.as_str(), t.code.as_str()));
    adoption::check_unmanaged(marks, (&own.system, &own.code), &what)?;
    tenancy::adopted_policy(&usable.limits, &policy, &what, "its")?;
    Ok(policy)
}

async fn write_status(
    ctx: &Context,
    ap: &AccessPolicy,
    policy_id: Option<String>,
    ready: ConditionState,
) -> Result<(), Error> {
    let api: Api<AccessPolicy> = Api::namespaced(ctx.client.clone(), &ap.namespace().unwrap_or_default());
    let mut status = ap.status.clone().unwrap_or_default();
    if policy_id.is_some() {
        status.policy_id = policy_id;
    }
    status.conditions = set_condition(&status.conditions, ready, ap.metadata.generation, Timestamp::now());
    status.observed_generation = ap.metadata.generation;
    apply_status(&api, &ap.name_any(), ap.status.as_ref(), &status).await.map_err(Error::Status)?;
    let before = ap.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.report_ready(KIND, ap, before, &status.conditions).await;
    Ok(())
}

async fn apply(ap: &AccessPolicy, ctx: &Context) -> Result<Action, Error> {
    let result = converge(ctx, ap).await;
    match result {
        Ok((policy, events)) => {
            let id = policy.id.clone().unwrap_or_default();
            let ready =
                ConditionState::new(READY, true, "Ready", format!("Medplum AccessPolicy/{id} matches the spec"));
            write_status(ctx, ap, Some(id), ready).await?;
            for e in &events {
                ctx.publish(&ap.object_ref(&()), e).await;
            }
            ctx.succeeded(KIND, ap);
            Ok(Action::await_change())
        }
        Err(e) => {
            write_status(ctx, ap, None, ConditionState::not_ready(&e)).await?;
            Ok(ctx.retry(KIND, ap, &e))
        }
    }
}

/// The resources of the namespace that grant this policy (`Kind/name`): grantees, and a project whose
/// patients get it.
async fn referrers(ctx: &Context, namespace: &str, policy: &str) -> Result<Vec<String>, kube::Error> {
    async fn granting<K: UsesConnection>(
        ctx: &Context,
        namespace: &str,
        policy: &str,
    ) -> Result<Vec<String>, kube::Error> {
        let list = Api::<K>::namespaced(ctx.client.clone(), namespace).list(&Default::default()).await?;
        Ok(list
            .items
            .iter()
            .filter(|o| o.granted().is_some_and(|names| names.contains(&policy)))
            .map(|o| format!("{}/{}", K::kind(&()), o.name_any()))
            .collect())
    }
    let mut users = granting::<ClientApplication>(ctx, namespace, policy).await?;
    users.extend(granting::<ProjectUser>(ctx, namespace, policy).await?);
    users.extend(granting::<MedplumProject>(ctx, namespace, policy).await?);
    Ok(users)
}

async fn cleanup(ap: &AccessPolicy, ctx: &Context) -> Result<Action, Error> {
    let reference = ap.object_ref(&());
    let namespace = ap.namespace().unwrap_or_default();
    let usable = match cleanup_via(ctx, ap).await? {
        CleanupVia::Connection(usable) => usable,
        CleanupVia::Released => return Ok(Action::await_change()),
    };
    let users = referrers(ctx, &namespace, &ap.name_any()).await.map_err(Error::Kube)?;
    if !users.is_empty() {
        let message =
            format!("still granted by {}; deleting it now would break their tokens in Medplum", users.join(", "));
        write_status(ctx, ap, None, ConditionState::new(READY, false, "InUse", message)).await?;
        return Err(Error::InUse { count: users.len() });
    }
    let tag = super::ownership_tag(&ctx.settings.cluster_id, KIND, &namespace, &ap.name_any());
    let medplum = &usable.client;
    // `(reason, note)` once the policy is gone or let go; None while memberships in Medplum still use it.
    let outcome: Result<Option<(&str, String)>, MedplumError> = async {
        // Deletion asks Medplum itself, whatever the view holds.
        let Some(policy) = find_policy(&usable, ap, &tag, true).await? else {
            return Ok(Some(("Deleted", "nothing left in Medplum".into())));
        };
        let id = policy.id.clone().unwrap_or_default();
        let policy_ref = format!("AccessPolicy/{id}");
        // An adopted policy was not made by the namespace: unless the connection allows it, deleting the
        // resource only releases it.
        let marker = adoption::adopted_marker(&tag);
        let released = !tenancy::may_delete(&usable.limits, policy.meta.has_tag(&marker));
        if ap.spec.deletion_policy == PolicyDeletionPolicy::Delete && !released {
            let members = medplum.search::<MembershipResource>(&[("access-policy", &policy_ref)]).await?;
            if !members.is_empty() {
                return Ok(None);
            }
            medplum.delete::<AccessPolicyResource>(&id).await?;
            return Ok(Some(("Deleted", format!("deleted {policy_ref} from Medplum"))));
        }
        let mut untagged = policy.clone();
        untagged.meta.tag.retain(|t| *t != tag && *t != marker && t.system != SUBSETTED);
        medplum.update(&id, &untagged, policy.meta.version_id.as_deref().unwrap_or_default()).await?;
        Ok(Some(if released {
            let note = format!(
                "left adopted {policy_ref} in Medplum as it is, no longer managed: the connection does not allow \
                 deleting adopted objects (spec.limits.adoption.allowDelete)"
            );
            ("Released", note)
        } else {
            ("Orphaned", format!("left {policy_ref} in Medplum, no longer managed"))
        }))
    }
    .await;
    if matches!(outcome, Ok(Some(_))) {
        usable.view.forget::<AccessPolicyResource>(&tag.code);
    }
    match outcome.map_err(|e| Error::Cleanup(e.to_string()))? {
        Some((reason, note)) => {
            ctx.publish(&reference, &event(EventType::Normal, reason, "Delete", note)).await;
            ctx.metrics.set_object_ready(KIND, &namespace, &ap.name_any(), None);
            Ok(Action::await_change())
        }
        None => {
            let message = "memberships in Medplum still use it (ProjectMembership?access-policy=...); deleting it would break their tokens".to_string();
            write_status(ctx, ap, None, ConditionState::new(READY, false, "InUse", message)).await?;
            Err(Error::InUse { count: 1 })
        }
    }
}

/// The controller for one scope (`namespace` None: all), and a future that resolves once its cache is filled.
pub fn controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
) -> (ReconcileStream, impl Future<Output = ()> + Send + 'static) {
    let policies = ctx.clone();
    let controller =
        super::new_controller::<AccessPolicy>(&ctx, namespace, ctx.settings.policy_concurrency, move |p| {
            policies.policies.took_in(p)
        });
    let store = controller.store();
    ctx.policies.register(namespace, store.clone());
    let ready = super::cache_synced(store.clone());
    // A grant removed or a grantee deleted can only matter to a policy waiting to be deleted.
    let controller = controller.reconcile_on(super::triggers(&ctx.grants_changed, move |namespace: String| {
        store
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()) && p.meta().deletion_timestamp.is_some())
            .map(|p| ObjectRef::from_obj(&**p))
            .collect::<Vec<_>>()
    }));
    let controller = super::watch_connections(controller, &ctx, namespace);
    let reconcile = |obj, ctx| super::reconcile_with_cleanup(obj, ctx, apply, cleanup);
    (super::drive(controller, KIND, ctx, reconcile), ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::IpAccessRule;
    use crate::failure::Failure;

    fn spec(value: serde_json::Value) -> AccessPolicySpec {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn criteria_medplum_would_reject_or_misread_are_refused() {
        assert!(check_criteria("Observation", "Observation?status=final&subject=%patient").is_ok());
        assert!(check_criteria("Patient", "Patient?_id=%patient.id").is_ok());
        assert!(check_criteria("Observation", "Observation?code:not=1234&value:missing=true").is_ok());
        let refused = [
            ("Observation", "Observation?code:exact=1234", "modifier :exact"),
            ("Observation", "Observation?subject.name=Lee", "chained parameter"),
            ("Observation", "Observation?_has:Encounter:subject:status=done", "chained parameter"),
            ("Observation", "Patient?name=Lee", "searches Patient, but resourceType is Observation"),
            ("Observation", "status=final", "no '?'"),
            ("*", "Patient?name=x", "resourceType \"*\""),
        ];
        for (resource_type, criteria, expected) in refused {
            let message = check_criteria(resource_type, criteria).unwrap_err();
            assert!(message.contains(expected), "{criteria}: {message}");
        }
    }

    #[test]
    fn ip_rules_must_be_prefixes_and_end_in_a_block() {
        let ok = spec(serde_json::json!({"ipAccessRules": [
            {"name": "office", "value": "10.2.", "action": "allow"}, {"value": "*", "action": "block"}]}));
        assert!(validate(&ok).is_ok());
        let mut cidr = ok.clone();
        cidr.ip_access_rules[0] = IpAccessRule { name: None, value: "10.0.0.0/8".into(), action: IpAction::Allow };
        assert!(validate(&cidr).unwrap_err().to_string().contains("CIDR"));
        let mut open = ok.clone();
        open.ip_access_rules.pop();
        assert_eq!(validate(&open).unwrap_err().reason(), "InvalidIpRule");
    }

    #[test]
    fn the_plan_follows_from_what_medplum_holds() {
        let ap: AccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "reader", "namespace": "team-a"},
            "spec": {"resources": [{"resourceType": "Patient", "readonly": true}]}
        }))
        .unwrap();
        let tag = crate::controller::ownership_tag("default", KIND, "team-a", "reader");
        let desired = desired_policy(&ap, &tag);
        let stored = |edit: &dyn Fn(&mut AccessPolicyResource)| {
            let mut p = policy_body(&desired, &desired);
            p.id = Some("p1".into());
            edit(&mut p);
            p
        };
        let other_tag = Coding { system: "https://example.org/tags".into(), code: "x".into() };
        let update = |fields: &[&'static str]| Step::Update { fields: fields.to_vec() };
        let rows: [(&str, Option<AccessPolicyResource>, Option<&str>, Step); 7] = [
            ("nothing in Medplum", None, None, Step::Create),
            ("nothing of ours, adopt one", None, Some("p9"), Step::Adopt { id: "p9".into() }),
            ("ours, as declared", Some(stored(&|_| ())), None, Step::Done),
            ("ours, adopted before", Some(stored(&|_| ())), Some("p1"), Step::Done),
            ("someone else's tag beside ours", Some(stored(&|p| p.meta.tag.push(other_tag.clone()))), None, Step::Done),
            ("edited in the console", Some(stored(&|p| p.resource[0].readonly = None)), None, update(&["resource"])),
            (
                "made a copy of another",
                Some(stored(&|p| p.based_on.push(Ref::to("AccessPolicy/x")))),
                None,
                update(&["basedOn"]),
            ),
        ];
        for (case, observed, adopt, step) in rows {
            assert_eq!(plan(&desired, observed.as_ref(), adopt), step, "{case}");
        }
    }

    #[test]
    fn drift_names_the_fields_medplum_changed() {
        let ap: AccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "lab-reader", "namespace": "team-a"},
            "spec": {"compartment": {"reference": "%organization"},
                     "resources": [{"resourceType": "Observation", "criteria": "Observation?status=final", "readonly": true,
                                    "hiddenFields": ["performer"], "writeConstraints": ["%after.status = 'final'"]}]}
        }))
        .unwrap();
        let tag = crate::controller::ownership_tag("default", KIND, "team-a", "lab-reader");
        let desired = desired_policy(&ap, &tag);
        assert_eq!(desired.name.as_deref(), Some("team-a/lab-reader"));
        assert_eq!(desired.resource[0].write_constraint[0].language, "text/fhirpath");
        let mut actual = policy_body(&desired, &desired);
        assert!(policy_drift(&desired, &actual).is_empty());
        actual.resource[0].hidden_fields.clear();
        actual.name = Some("edited".into());
        actual.meta.tag.clear();
        assert_eq!(policy_drift(&desired, &actual), ["meta.tag", "name", "resource"]);
    }
}
