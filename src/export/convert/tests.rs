//! The export of a project snapshot, end to end and without a server.

use super::*;
use serde_json::json;

use crate::crd::{Adopt, DeletionPolicy, UserScope};

fn target(limits: Value) -> Target {
    Target {
        namespace: "team-a".into(),
        connection_ref: ConnectionRef::default(),
        cluster_id: "default".into(),
        credential_client_id: "operator".into(),
        limits: serde_json::from_value(limits).unwrap(),
        adopt_secret: AdoptSecret::Rotate,
    }
}

fn policy(id: &str, name: &str) -> Value {
    json!({"resourceType": "AccessPolicy", "id": id, "name": name, "meta": {"versionId": "1"},
           "resource": [{"resourceType": "Patient", "readonly": true}]})
}

#[test]
fn kubernetes_names_come_from_medplum_names() {
    assert_eq!(kube_name("Billing Service (prod)"), "billing-service-prod");
    assert_eq!(kube_name("  ~~ "), "");
    assert_eq!(kube_name(&"x".repeat(80)).len(), 63);
}

#[test]
fn names_are_unique_and_an_applied_object_keeps_its_own() {
    let snapshot = Snapshot {
        policies: vec![policy("p2", "Reader"), policy("p1", "Reader"), {
            let mut applied = policy("p3", "Renamed In Console");
            applied["meta"]["tag"] =
                json!([{"system": "urn:medplum-operator:default", "code": "AccessPolicy/team-a/reader"}]);
            applied
        }],
        ..Default::default()
    };
    let export = export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1", "p2"]}})));
    let names: Vec<_> = export.policies.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["reader-p1", "reader-p2", "reader"]);
    assert_eq!(export.policies[2].spec.display_name.as_deref(), Some("Renamed In Console"));
}

#[test]
fn what_a_resource_cannot_say_or_the_connection_may_not_adopt_is_left_out_with_the_reason() {
    let mut based = policy("p1", "Based");
    based["basedOn"] = json!([{"reference": "AccessPolicy/p0"}]);
    let mut admin = policy("p2", "Admin");
    admin["resource"] = json!([{"resourceType": "ClientApplication"}]);
    let mut other = policy("p3", "Other Cluster");
    other["meta"]["tag"] = json!([{"system": "urn:medplum-operator:east", "code": "AccessPolicy/x/y"}]);
    let snapshot = Snapshot {
        policies: vec![based, admin, other, policy("p4", "Unlisted")],
        clients: vec![json!({"resourceType": "ClientApplication", "id": "operator", "name": "Operator"})],
        ..Default::default()
    };
    let export = export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1", "p2", "p3"]}})));
    assert!(export.policies.is_empty());
    let why = |what: &str| export.notes.iter().find(|(w, _)| w.starts_with(what)).map(|(_, why)| why.clone()).unwrap();
    assert!(why("AccessPolicy/p1").contains("basedOn"));
    assert!(why("AccessPolicy/p2").contains("allowAdmin"));
    assert!(why("AccessPolicy/p3").contains("urn:medplum-operator:east"));
    assert!(why("AccessPolicy/p4").contains("policyIds"));
    assert!(why("ClientApplication/operator").contains("own credential"));
}

#[test]
fn a_client_takes_its_membership_access_and_an_admin_membership_acts_on_behalf_of_users() {
    let client = json!({"resourceType": "ClientApplication", "id": "c1", "name": "Proxy", "secret": "s3cr3t",
                        "accessTokenLifetime": "15m", "redirectUris": ["https://app/cb"]});
    let membership = json!({"resourceType": "ProjectMembership", "id": "m1", "admin": true,
        "user": {"reference": "ClientApplication/c1"}, "profile": {"reference": "ClientApplication/c1"},
        "accessPolicy": {"reference": "AccessPolicy/p1"},
        "access": [{"policy": {"reference": "AccessPolicy/p1"},
                    "parameter": [{"name": "org", "valueReference": {"reference": "Organization/9"}}]}]});
    let snapshot = Snapshot {
        policies: vec![policy("p1", "Reader")],
        clients: vec![client],
        memberships: vec![membership],
        ..Default::default()
    };
    let limits = json!({"allowAdmin": true, "adoption": {"policyIds": ["p1"], "clientIds": ["c1"]}});
    let export = export(&snapshot, &target(limits));
    let spec = &export.clients[0].spec;
    assert!(spec.on_behalf_of && !spec.unrestricted_access);
    assert_eq!(spec.access.len(), 2, "the legacy accessPolicy and access[] both grant");
    assert_eq!(spec.access[1].parameters[0].value_reference.as_deref(), Some("Organization/9"));
    assert_eq!(spec.adopt, Some(Adopt { client_id: "c1".into(), secret: AdoptSecret::Rotate }));
    assert_eq!(spec.deletion_policy, DeletionPolicy::Orphan, "deleting an exported resource never deletes");
    let yaml = serde_json::to_string(&export.clients).unwrap();
    assert!(!yaml.contains("s3cr3t"), "no secret value");

    let without_admin =
        super::export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1"], "clientIds": ["c1"]}})));
    assert!(without_admin.clients.is_empty());
    assert!(without_admin.notes.iter().any(|(_, why)| why.contains("project admin")));
}

#[test]
fn a_person_needs_one_given_name_a_family_name_and_an_email_or_external_id() {
    let membership = |id: &str, profile: &str| {
        json!({"resourceType": "ProjectMembership", "id": id, "user": {"reference": format!("User/{id}"), "display": format!("{id}@example.org")},
               "profile": {"reference": profile}, "access": [{"policy": {"reference": "AccessPolicy/p1"}}]})
    };
    let references = HashMap::from([
        ("Practitioner/ada".to_string(), json!({"name": [{"given": ["Ada"], "family": "Lovelace"}]})),
        ("Practitioner/mary".to_string(), json!({"name": [{"given": ["Mary", "Ann"], "family": "Lee"}]})),
        ("User/ada".to_string(), json!({"email": "Ada@Example.org", "project": {"reference": "Project/x"}})),
    ]);
    let snapshot = Snapshot {
        policies: vec![policy("p1", "Reader")],
        memberships: vec![
            membership("ada", "Practitioner/ada"),
            membership("mary", "Practitioner/mary"),
            membership("bot", "Bot/b"),
        ],
        references,
        ..Default::default()
    };
    let export = export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1"], "userEmails": ["@example.org"]}})));
    assert_eq!(export.users.len(), 1);
    let ada = &export.users[0].spec;
    assert_eq!((ada.email.as_deref(), ada.scope, ada.adopt), (Some("ada@example.org"), Some(UserScope::Project), true));
    assert!(export.notes.iter().any(|(what, why)| what.contains("mary") && why.contains("one given name")));
    assert!(export.notes.iter().any(|(what, why)| what.contains("bot") && why.contains("Bot")));
}
