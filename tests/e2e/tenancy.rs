//! Per-namespace least privilege: two tenants with their own connections cannot see or touch each
//! other's Medplum objects, references never cross namespaces, and cluster connections admit only
//! the namespaces they name.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::fixtures::Setup;
use crate::support::{Operator, eventually};
use medplum_operator::crd::ClusterMedplumConnection;

#[tokio::test]
async fn two_tenants_are_isolated_and_cluster_connections_admit_only_their_namespaces() {
    let a = Setup::new("tenant-a", &[], json!({})).await;
    let b = Setup::new("tenant-b", &[], json!({})).await;
    let _operator = Operator::start(&a.ns.name, &["--watch-namespaces", &b.ns.name, "--resync-interval", "2s"]).await;
    let policy_a = a.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let policy_b = b.ready_policy("reader", json!([{"resourceType": "Observation", "readonly": true}])).await;
    b.ready_policy("only-in-b", json!([{"resourceType": "Observation", "readonly": true}])).await;
    for s in [&a, &b] {
        s.create_client("app", json!({"access": [{"policyRef": {"name": "reader"}}]})).await;
    }
    let id_a = a.wait_ready("app").await.status.unwrap().client_id.unwrap();
    let id_b = b.wait_ready("app").await.status.unwrap().client_id.unwrap();

    // Each tenant's objects are in its own project, out of the other's sight.
    assert_eq!(a.read_client(&id_a).await.0, 200);
    assert_eq!(a.read_client(&id_b).await.0, 404, "tenant A cannot see tenant B's client");
    assert_eq!(b.read_client(&id_a).await.0, 404, "and the other way round");
    assert_eq!(a.http().get(&format!("fhir/R4/AccessPolicy/{policy_b}"), &a.token).await.status, 404);
    assert_eq!(b.memberships_of(&id_a).await.len(), 0);
    assert_eq!(
        a.memberships_of(&id_a).await[0]["access"][0]["policy"]["reference"],
        format!("AccessPolicy/{policy_a}")
    );
    assert!(a.secret("app").await.is_some() && b.secret("app").await.is_some(), "each Secret in its own namespace");

    // A policy of the other namespace cannot be granted: references have no namespace.
    a.create_client("borrower", json!({"access": [{"policyRef": {"name": "only-in-b"}}]})).await;
    let refused = a.wait_condition("borrower", "Ready", "False", Some("PolicyNotFound")).await;
    println!(
        "refusal cross-namespace policy: {:?}",
        refused.status.unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().message
    );
    assert!(a.tagged_clients("borrower").await.is_empty());

    // A ClusterMedplumConnection (tenant A's credential) offered to namespace A only.
    let cluster: Api<ClusterMedplumConnection> = Api::all(a.client.clone());
    let shared: ClusterMedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "ClusterMedplumConnection",
        "metadata": {"name": format!("shared-{}", a.ns.name), "labels": {"medplum-operator-test": a.ns.name},
                     "ownerReferences": [a.ns.owner_reference()]},
        "spec": {"baseUrl": a.medplum.base_url(), "projectId": a.admin.project_id,
                 "credentialsSecretRef": {"namespace": a.ns.name, "name": "medplum-admin"},
                 "allowedNamespaces": {"names": [a.ns.name], "selector": {"matchLabels": {"medplum.com/tenant-of": a.ns.name}}}},
    }))
    .unwrap();
    cluster.create(&PostParams::default(), &shared).await.unwrap();
    let reference = json!({"kind": "ClusterMedplumConnection", "name": format!("shared-{}", a.ns.name)});
    for s in [&a, &b] {
        s.create_policy(
            "shared-reader",
            json!({"connectionRef": reference, "resources": [{"resourceType": "Patient", "readonly": true}]}),
        )
        .await;
    }
    a.wait_policy("shared-reader", "True", None).await;
    let refused = b.wait_policy("shared-reader", "False", Some("ConnectionNotAllowed")).await;
    let message = refused.status.unwrap().conditions[0].message.clone();
    println!("refusal disallowed connection: {message:?}");
    let tag =
        format!("fhir/R4/AccessPolicy?_tag=urn:medplum-operator:default|AccessPolicy/{}/shared-reader", b.ns.name);
    assert!(a.http().get(&tag, &a.token).await.json().get("entry").is_none(), "nothing written for tenant B");

    // Labelling namespace B into the selector admits it (seen at the next resync).
    let namespaces: Api<Namespace> = Api::all(a.client.clone());
    let label = json!({"metadata": {"labels": {"medplum.com/tenant-of": a.ns.name}}});
    namespaces.patch(&b.ns.name, &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    eventually(Duration::from_secs(30), "namespace B admitted by the selector", || async {
        let p = b.policies().get("shared-reader").await.ok()?;
        p.status?.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
}
