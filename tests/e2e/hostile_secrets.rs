//! A hostile tenant and the data of others: the operator writes into a Secret it did not make only
//! with its owner's consent, never overwrites or removes a key, label or annotation it did not write
//! (not when merging, rotating or cleaning up), restarts no workload through a Secret it may not write,
//! and overwrites no project entry it did not write. Both Medplum targets.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::hostile::{Arena, refused};
use crate::project::{create_project, projects, read_project, secret_value, wait_project};
use crate::support::eventually;

/// Another application's Secret, as its owner made it: their keys, a label and an annotation.
fn app_db() -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": "app-db", "labels": {"team": "db"}, "annotations": {"owner": "db-team"}},
        "stringData": {"password": "their-password", "user": "their-user"},
    }))
    .unwrap()
}

fn owners_part(secret: &Secret) -> (BTreeMap<String, String>, Option<String>, Option<String>) {
    let data = secret.data.clone().unwrap_or_default();
    let text = |k: &str| data.get(k).map(|v| String::from_utf8(v.0.clone()).unwrap());
    let keys = ["password", "user"].iter().filter_map(|k| Some((k.to_string(), text(k)?))).collect();
    let label = secret.metadata.labels.as_ref().and_then(|l| l.get("team").cloned());
    let annotation = secret.metadata.annotations.as_ref().and_then(|a| a.get("owner").cloned());
    (keys, label, annotation)
}

#[tokio::test]
async fn a_merge_needs_the_owners_consent_and_never_overwrites_or_removes_what_is_not_the_operators() {
    let arena = Arena::new("hx-merge", json!({})).await;
    let t = &arena.tenant;
    arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns.name);
    secrets.create(&PostParams::default(), &app_db()).await.unwrap();
    let theirs = owners_part(&secrets.get("app-db").await.unwrap());
    let version = || async { secrets.get("app-db").await.unwrap().metadata.resource_version };

    // The attack as reported: the client secret into the owner's `password`. Without consent: refused.
    let attack = json!({"access": [{"policyRef": {"name": "reader"}}], "rotation": {"gracePeriod": "1s"},
                        "secret": {"name": "app-db", "merge": true, "keys": {"clientSecret": "password"}}});
    let before = version().await;
    t.create_client("thief", arena.via(attack)).await;
    let message = refused(t, "thief", "SecretMergeNotAllowed").await;
    assert!(message.contains("medplum.com/allow-merge: thief"), "{message}");
    assert_eq!(version().await, before, "app-db untouched");
    assert!(t.tagged_clients("thief").await.is_empty(), "nothing in Medplum");

    // With the owner's consent, still no key, label or annotation of the owner's is overwritten.
    let consent = json!({"metadata": {"annotations": {"medplum.com/allow-merge": "thief"}}});
    secrets.patch("app-db", &PatchParams::default(), &Patch::Merge(&consent)).await.unwrap();
    let before = version().await;
    let message = refused(t, "thief", "SecretKeyConflict").await;
    assert!(message.contains("key password") && !message.contains("their-password"), "{message}");
    let relabel = json!({"spec": {"secret": {"keys": {"clientSecret": "MEDPLUM_CLIENT_SECRET"},
                                             "labels": {"team": "hijacked"}, "annotations": {"owner": "tenant"}}}});
    t.clients().patch("thief", &PatchParams::default(), &Patch::Merge(&relabel)).await.unwrap();
    eventually(Duration::from_secs(60), "labels and annotations refused", || async {
        let ca = t.clients().get("thief").await.ok()?;
        let ready = ca.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "SecretKeyConflict"
            && ready.message.contains("label team")
            && ready.message.contains("annotation owner"))
        .then_some(())
    })
    .await;
    assert_eq!(version().await, before, "app-db untouched");
    assert!(t.tagged_clients("thief").await.is_empty(), "nothing in Medplum");

    // Keys of its own, and the owner's label with the owner's value (which destroys nothing): merged.
    let fair = json!({"spec": {"secret": {"labels": {"team": "db"}, "annotations": null}}});
    t.clients().patch("thief", &PatchParams::default(), &Patch::Merge(&fair)).await.unwrap();
    t.wait_ready("thief").await;
    let merged = secrets.get("app-db").await.unwrap();
    assert_eq!(owners_part(&merged), theirs, "the owner's part as it was");
    let first = t.secret("app-db").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();

    // A rotation changes the operator's keys only.
    t.annotate("thief", "medplum.com/rotate", "1").await;
    eventually(Duration::from_secs(90), "rotated", || async {
        let ca = t.clients().get("thief").await.ok()?;
        let idle = ca.status?.conditions.iter().any(|c| c.type_ == "Rotating" && c.reason == "Idle");
        let now = t.secret("app-db").await?["MEDPLUM_CLIENT_SECRET"].clone();
        (idle && now != first).then_some(())
    })
    .await;
    assert_eq!(owners_part(&secrets.get("app-db").await.unwrap()), theirs, "rotation kept the owner's part");

    // The owner takes a key over (kubectl edit): the operator no longer writes it, not even to rotate.
    let edit = json!({"stringData": {"MEDPLUM_CLIENT_SECRET": "the-owners-now"}});
    secrets.patch("app-db", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    t.annotate("thief", "medplum.com/rotate", "2").await;
    let message = refused(t, "thief", "SecretKeyConflict").await;
    assert!(message.contains("key MEDPLUM_CLIENT_SECRET"), "{message}");
    assert_eq!(t.secret("app-db").await.unwrap()["MEDPLUM_CLIENT_SECRET"], "the-owners-now");

    // Deletion removes what the operator wrote, and nothing else.
    t.delete_client_resource("thief").await;
    let left = secrets.get("app-db").await.unwrap();
    assert_eq!(owners_part(&left), theirs, "the owner's keys, label and annotation stay");
    let keys: Vec<String> = left.data.unwrap_or_default().into_keys().collect();
    assert_eq!(keys, ["MEDPLUM_CLIENT_SECRET", "password", "user"], "only the operator's keys went");
    let annotations = left.metadata.annotations.unwrap_or_default();
    assert!(annotations.contains_key("medplum.com/allow-merge") && !annotations.contains_key("medplum.com/issued-at"));
    assert!(!left.metadata.labels.unwrap_or_default().contains_key("medplum.com/client-application"));
}

#[tokio::test]
async fn no_workload_is_restarted_and_no_project_entry_overwritten_without_the_owners_say() {
    let arena = Arena::new("hx-owners", json!({"allowProjectSettings": true})).await;
    let t = &arena.tenant;
    arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    // A workload of another application, using its Secret: a client may not reach it through that Secret.
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns.name);
    secrets.create(&PostParams::default(), &app_db()).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(t.client.clone(), &t.ns.name);
    let theirs: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "db-app"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "db-app"}},
                 "template": {"metadata": {"labels": {"app": "db-app"}},
                              "spec": {"containers": [{"name": "db", "image": "example.org/db:1",
                                                       "envFrom": [{"secretRef": {"name": "app-db"}}]}]}}}}))
    .unwrap();
    deployments.create(&PostParams::default(), &theirs).await.unwrap();
    let generation = deployments.get("db-app").await.unwrap().metadata.generation;
    let spec = json!({"access": [{"policyRef": {"name": "reader"}}], "secret": {"name": "app-db", "merge": true},
                      "rotation": {"restartTargets": [{"kind": "Deployment", "name": "db-app"}]}});
    t.create_client("restarter", arena.via(spec)).await;
    refused(t, "restarter", "SecretMergeNotAllowed").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(deployments.get("db-app").await.unwrap().metadata.generation, generation, "not restarted");
    assert!(t.tagged_clients("restarter").await.is_empty(), "nothing in Medplum");

    // A project secret the platform team set in the console is not the tenant's to overwrite or remove.
    let project = read_project(t).await;
    let mut entries = project["secret"].as_array().cloned().unwrap_or_default();
    entries.push(json!({"name": "SMTP_PASSWORD", "valueString": "platform-pass"}));
    let by_hand = json!([{"op": "add", "path": "/secret", "value": entries}]);
    t.http().patch(&format!("fhir/R4/Project/{}", t.admin.project_id), &t.token, &by_hand).await.expect(200);
    t.create_secret("smtp", &[("password", "tenant-pass")]).await;
    let spec = json!({"secrets": [{"name": "SMTP_PASSWORD", "secretKeyRef": {"name": "smtp", "key": "password"}}]});
    create_project(t, "project", arena.via(spec)).await;
    let refused = wait_project(t, "project", "False", Some("ProjectEntryConflict")).await;
    let message = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
    println!("hostile path refused: project: ProjectEntryConflict: {message}");
    assert!(message.contains("secret SMTP_PASSWORD") && !message.contains("platform-pass"), "{message}");
    assert_eq!(secret_value(&read_project(t).await, "SMTP_PASSWORD"), Some(json!("platform-pass")));
    projects(t).delete("project", &Default::default()).await.unwrap();
    eventually(Duration::from_secs(60), "MedplumProject deleted", || async {
        projects(t).get_opt("project").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(secret_value(&read_project(t).await, "SMTP_PASSWORD"), Some(json!("platform-pass")), "kept");
}
