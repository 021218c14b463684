//! Every rule for every kind, and the admission of namespaces.

use serde_json::json;

use super::*;

fn limits(value: serde_json::Value) -> ConnectionLimits {
    serde_json::from_value(value).unwrap()
}

fn policy_spec(spec: serde_json::Value) -> AccessPolicySpec {
    serde_json::from_value(spec).unwrap()
}

#[test]
fn the_ceiling_limits_resource_types_and_interactions() {
    let policy = policy_spec(serde_json::json!({"resources": [
        {"resourceType": "Observation", "readonly": true},
        {"resourceType": "Patient", "interactions": ["read", "search"]}]}));
    let limits = |ceiling: serde_json::Value| -> ConnectionLimits {
        serde_json::from_value(serde_json::json!({"allowedResources": ceiling})).unwrap()
    };
    assert!(access_policy(&ConnectionLimits::default(), &policy).is_ok());
    let reads =
        limits(serde_json::json!([{"resourceType": "*", "interactions": ["read", "vread", "history", "search"]}]));
    assert!(access_policy(&reads, &policy).is_ok());
    let no_patients = limits(serde_json::json!([{"resourceType": "Observation"}]));
    let message = access_policy(&no_patients, &policy).unwrap_err().to_string();
    assert!(message.contains("grants Patient, which the connection does not allow"), "{message}");
    let writes = policy_spec(serde_json::json!({"resources": [{"resourceType": "Observation"}]}));
    let message = access_policy(&reads, &writes).unwrap_err().to_string();
    assert!(message.contains("grants create, update, delete on Observation"), "{message}");
}

#[test]
fn project_administration_needs_a_connection_that_allows_admin() {
    let admin = ConnectionLimits { allow_admin: true, ..Default::default() };
    for resource_type in ["*", "ClientApplication", "AccessPolicy", "Bot"] {
        let policy = policy_spec(serde_json::json!({"resources": [{"resourceType": resource_type, "readonly": true}]}));
        let message = access_policy(&ConnectionLimits::default(), &policy).unwrap_err().to_string();
        assert!(message.contains("administers the project"), "{resource_type}: {message}");
        assert!(access_policy(&admin, &policy).is_ok(), "{resource_type}");
    }
}

fn stored_policy(resources: serde_json::Value) -> AccessPolicyResource {
    serde_json::from_value(json!({"resourceType": "AccessPolicy", "resource": resources})).unwrap()
}

/// A rule as a kind asks it: refused under `refused_by` with `reason`, allowed under `allowed_by`
/// (None: no limits allow it).
type Check = Box<dyn Fn(&ConnectionLimits) -> Result<(), Denied>>;

struct Row {
    kinds: &'static str,
    rule: &'static str,
    check: Check,
    refused_by: ConnectionLimits,
    reason: &'static str,
    allowed_by: Option<ConnectionLimits>,
}

#[test]
fn every_rule_for_every_kind() {
    let none = ConnectionLimits::default();
    let client = |spec: serde_json::Value| -> ClientApplicationSpec { serde_json::from_value(spec).unwrap() };
    let user = |spec: serde_json::Value| -> ProjectUserSpec { serde_json::from_value(spec).unwrap() };
    let patients = json!([{"resourceType": "Patient", "interaction": ["read", "search"]}]);
    let reads_patients =
        limits(json!({"allowedResources": [{"resourceType": "Patient", "interactions": ["read", "search"]}]}));
    let listed = limits(
        json!({"adoption": {"clientIds": ["c1"], "policyIds": ["p1"], "userEmails": ["@example.org"], "userExternalIds": ["x1"]}}),
    );
    let keep = limits(json!({"adoption": {"clientIds": ["c1"], "allowKeepSecret": true}}));
    let row =
        |kinds, rule, check: Check, refused_by: &ConnectionLimits, reason, allowed_by: Option<ConnectionLimits>| Row {
            kinds,
            rule,
            check,
            refused_by: refused_by.clone(),
            reason,
            allowed_by,
        };
    let rows = [
        row(
            "ClientApplication",
            "full access (unrestrictedAccess)",
            Box::new(move |l| client_application(l, &client(json!({"unrestrictedAccess": true})))),
            &none,
            "UnrestrictedAccessNotAllowed",
            Some(limits(json!({"allowUnrestrictedAccess": true}))),
        ),
        row(
            "ClientApplication",
            "on-behalf-of makes a project admin",
            Box::new(move |l| {
                client_application(l, &client(json!({"onBehalfOf": true, "access": [{"policyRef": {"name": "p"}}]})))
            }),
            &none,
            "AdminNotAllowed",
            Some(limits(json!({"allowAdmin": true}))),
        ),
        row(
            "ProjectUser",
            "a project admin (spec.admin)",
            Box::new(move |l| {
                project_user(
                    l,
                    &user(json!({"firstName": "Ada", "lastName": "L", "email": "ada@example.org", "admin": true})),
                )
            }),
            &none,
            "AdminNotAllowed",
            Some(limits(json!({"allowAdmin": true}))),
        ),
        row(
            "ProjectUser",
            "full access (unrestrictedAccess)",
            Box::new(move |l| {
                project_user(
                    l,
                    &user(
                        json!({"firstName": "Ada", "lastName": "L", "email": "ada@example.org", "unrestrictedAccess": true}),
                    ),
                )
            }),
            &none,
            "UnrestrictedAccessNotAllowed",
            Some(limits(json!({"allowUnrestrictedAccess": true}))),
        ),
        row(
            "AccessPolicy",
            "a grant that administers the project",
            Box::new(move |l| {
                access_policy(l, &policy_spec(json!({"resources": [{"resourceType": "ClientApplication"}]})))
            }),
            &none,
            "ExceedsConnectionLimits",
            Some(limits(json!({"allowAdmin": true}))),
        ),
        row(
            "AccessPolicy",
            "a grant beyond allowedResources",
            Box::new(move |l| access_policy(l, &policy_spec(json!({"resources": [{"resourceType": "Observation"}]})))),
            &reads_patients,
            "ExceedsConnectionLimits",
            Some(none.clone()),
        ),
        row(
            "AccessPolicy",
            "interactions beyond allowedResources",
            Box::new(move |l| {
                access_policy(
                    l,
                    &policy_spec(json!({"resources": [{"resourceType": "Patient", "interaction": ["update"]}]})),
                )
            }),
            &reads_patients,
            "ExceedsConnectionLimits",
            Some(limits(json!({"allowedResources": [{"resourceType": "*"}]}))),
        ),
        row(
            "MedplumProject, export",
            "project settings",
            Box::new(project_settings),
            &none,
            "ProjectSettingsNotAllowed",
            Some(limits(json!({"allowProjectSettings": true}))),
        ),
        row(
            "ClientApplication, export",
            "adopting an unlisted client",
            Box::new(|l| adoption(l, &Adoptee::Client { id: "c1", keep_secret: false }, "ClientApplication/c1")),
            &none,
            "AdoptionNotAllowed",
            Some(listed.clone()),
        ),
        row(
            "ClientApplication",
            "keeping an adopted client's secret",
            Box::new(|l| adoption(l, &Adoptee::Client { id: "c1", keep_secret: true }, "ClientApplication/c1")),
            &listed,
            "KeepSecretNotAllowed",
            Some(keep),
        ),
        row(
            "AccessPolicy, export",
            "adopting an unlisted policy",
            Box::new(|l| adoption(l, &Adoptee::Policy { id: "p1" }, "AccessPolicy/p1")),
            &none,
            "AdoptionNotAllowed",
            Some(listed.clone()),
        ),
        row(
            "ProjectUser, export",
            "adopting an unlisted member (email, by domain)",
            Box::new(|l| adoption(l, &Adoptee::Member { email: Some("Ada@Example.org"), external_id: None }, "ada")),
            &none,
            "AdoptionNotAllowed",
            Some(listed.clone()),
        ),
        row(
            "ProjectUser, export",
            "adopting an unlisted member (external id)",
            Box::new(|l| adoption(l, &Adoptee::Member { email: None, external_id: Some("x1") }, "x1")),
            &none,
            "AdoptionNotAllowed",
            Some(listed.clone()),
        ),
        row(
            "ClientApplication, export",
            "adopting a connection's credential",
            Box::new(|_| {
                not_a_connection_credential("c1", [("c0", "a"), ("c1", "b")].into_iter(), "ClientApplication/c1")
            }),
            &listed,
            "AdoptTargetIsConnectionCredential",
            None,
        ),
        row(
            "ClientApplication, ProjectUser, export",
            "adopting a project admin's membership",
            Box::new(|l| adopted_membership(l, true, true, "it")),
            &none,
            "AdoptTargetBeyondLimits",
            Some(limits(json!({"allowAdmin": true}))),
        ),
        row(
            "ClientApplication, ProjectUser, export",
            "adopting a membership without any policy",
            Box::new(|l| adopted_membership(l, false, false, "it")),
            &none,
            "AdoptTargetBeyondLimits",
            Some(limits(json!({"allowUnrestrictedAccess": true}))),
        ),
        row(
            "AccessPolicy, ClientApplication, ProjectUser, export",
            "adopting a policy beyond the ceiling",
            Box::new(move |l| adopted_policy(l, &stored_policy(patients.clone()), "it", "its")),
            &limits(json!({"allowedResources": [{"resourceType": "Patient", "interactions": ["read"]}]})),
            "AdoptTargetBeyondLimits",
            Some(reads_patients.clone()),
        ),
        row(
            "DomainConfiguration",
            "a domain without a super admin's credential",
            Box::new(|_| domain_configuration("platform", false)),
            &none,
            "SuperAdminRequired",
            None,
        ),
    ];
    for r in &rows {
        let what = format!("{} / {}", r.kinds, r.rule);
        match (r.check)(&r.refused_by) {
            Err(denied) => assert_eq!(denied.reason(), r.reason, "{what}: {denied}"),
            Ok(()) => panic!("{what}: allowed, expected {}", r.reason),
        }
        if let Some(allowed_by) = &r.allowed_by {
            assert_eq!((r.check)(allowed_by), Ok(()), "{what}");
        }
    }
    assert!(domain_configuration("platform", true).is_ok());
    assert!(not_a_connection_credential("c2", [("c1", "b")].into_iter(), "x").is_ok());
}

#[test]
fn deleting_an_adopted_object_needs_allow_delete() {
    let none = ConnectionLimits::default();
    assert!(may_delete(&none, false), "what the operator made");
    assert!(!may_delete(&none, true), "adopted: released only");
    assert!(may_delete(&limits(json!({"adoption": {"allowDelete": true}})), true));
}

#[test]
fn a_connection_admits_its_namespace_or_those_its_names_and_selector_list() {
    let own = Admission::Namespace("team-a".into());
    assert_eq!(own.admits_by_name("team-a"), Some(true));
    assert_eq!(own.admits_by_name("team-b"), Some(false));
    let allowed = |value: serde_json::Value| Admission::Namespaces(serde_json::from_value(value).unwrap());
    let by_name = allowed(json!({"names": ["team-a"]}));
    assert_eq!(by_name.admits_by_name("team-a"), Some(true));
    assert_eq!(by_name.admits_by_name("team-b"), Some(false), "no selector: the name decides");
    let by_label = allowed(json!({"selector": {"matchLabels": {"tenant": "yes"},
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["sandbox"]}]}}));
    assert_eq!(by_label.admits_by_name("team-a"), None, "labels decide");
    let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert!(by_label.admits("team-a", &labels(&[("tenant", "yes")])));
    assert!(!by_label.admits("team-a", &labels(&[("tenant", "yes"), ("tier", "sandbox")])));
    assert!(!by_label.admits("team-a", &labels(&[("tenant", "no")])));
    let everyone = allowed(json!({"selector": {}}));
    assert!(everyone.admits("any", &labels(&[])), "an empty selector selects every namespace, as in Kubernetes");
    let broken = allowed(json!({"selector": {"matchExpressions": [{"key": "tenant", "operator": "Like"}]}}));
    assert!(!broken.admits("team-a", &labels(&[("tenant", "yes")])), "a selector Kubernetes refuses admits nothing");
}

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
