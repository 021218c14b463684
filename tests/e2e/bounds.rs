//! Bounded input: every list and string of every kind has a bound in its CRD schema (the unit test
//! `every_string_list_and_map_of_every_spec_is_bounded` checks that none lacks one). Here the API server
//! refuses objects beyond them at apply time, and objects at every bound converge against Medplum
//! (whose JSON body limit, 1 MB, the bounds keep them under) while other resources keep converging.

use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::support::fixtures::Setup;
use crate::support::{Operator, TestNamespace, cluster_client};

fn api(client: &kube::Client, kind: &str, plural: &str, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("medplum.com", "v1alpha1", kind), plural);
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

fn many(n: usize, item: impl Fn(usize) -> Value) -> Value {
    Value::Array((0..n).map(item).collect())
}

#[tokio::test]
async fn objects_beyond_their_bounds_are_refused_at_apply_time() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "bounds").await;
    let grant = |_| json!({"policyRef": {"name": "p"}});
    let idp = |client_id: Value| {
        json!({"authorizeUrl": "https://idp.example.org/a", "tokenUrl": "https://idp.example.org/t",
               "userInfoUrl": "https://idp.example.org/u", "clientId": client_id,
               "clientSecretRef": {"namespace": "n", "name": "s", "key": "k"}})
    };
    let cases = [
        ("ClientApplication", "clientapplications", json!({"access": many(5000, grant)}), "spec.access: Too many"),
        (
            "ClientApplication",
            "clientapplications",
            json!({"unrestrictedAccess": true, "redirectUris": many(3000, |i| json!(format!("https://a.example.org/{i}")))}),
            "spec.redirectUris: Too many",
        ),
        (
            "ClientApplication",
            "clientapplications",
            json!({"unrestrictedAccess": true, "redirectUris": ["https://a.example.org/".to_string() + &"x".repeat(3000)]}),
            "spec.redirectUris[0]: Too long",
        ),
        (
            "ClientApplication",
            "clientapplications",
            json!({"unrestrictedAccess": true, "secret": {"annotations": (0..33).map(|i| (format!("a{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}}),
            "spec.secret.annotations: Too many",
        ),
        (
            "ClientApplication",
            "clientapplications",
            json!({"access": [{"policyRef": {"name": "p"}, "parameters": many(17, |i| json!({"name": format!("p{i}"), "valueString": "v"}))}]}),
            "spec.access[0].parameters: Too many",
        ),
        (
            "AccessPolicy",
            "accesspolicies",
            json!({"resources": [{"resourceType": "Patient", "hiddenFields": many(17, |i| json!(format!("f{i}")))}]}),
            "spec.resources[0].hiddenFields: Too many",
        ),
        (
            "AccessPolicy",
            "accesspolicies",
            json!({"resources": [{"resourceType": "Patient", "criteria": format!("Patient?name={}", "a".repeat(1100))}]}),
            "spec.resources[0].criteria: Too long",
        ),
        (
            "ProjectUser",
            "projectusers",
            json!({"email": "a@example.org", "access": many(33, grant)}),
            "spec.access: Too many",
        ),
        (
            "MedplumProject",
            "medplumprojects",
            json!({"secrets": many(101, |i| json!({"name": format!("S{i}"), "secretKeyRef": {"name": "s", "key": "k"}}))}),
            "spec.secrets: Too many",
        ),
        (
            "MedplumConnection",
            "medplumconnections",
            json!({"baseUrl": "https://m.example.org/", "credentialsSecretRef": {"name": "c"},
                   "limits": {"adoption": {"clientIds": ["x".repeat(65)]}}}),
            "spec.limits.adoption.clientIds[0]: Too long",
        ),
    ];
    for (kind, plural, spec, expected) in cases {
        let object =
            json!({"apiVersion": "medplum.com/v1alpha1", "kind": kind, "metadata": {"name": "big"}, "spec": spec});
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        let refused = api(&client, kind, plural, Some(&ns.name)).create(&PostParams::default(), &object).await;
        let message = refused.expect_err(expected).to_string();
        println!("refused at apply time: {kind}: {}", message.chars().take(200).collect::<String>());
        assert!(message.contains(expected), "{kind}: {expected}: {message}");
    }
    // Cluster-scoped kinds too.
    let cluster = [
        (
            "ClusterMedplumConnection",
            "clustermedplumconnections",
            json!({"baseUrl": "https://m.example.org/", "credentialsSecretRef": {"namespace": "n", "name": "c"},
                   "allowedNamespaces": {"names": many(1001, |i| json!(format!("ns-{i}")))}}),
            "spec.allowedNamespaces.names: Too many",
        ),
        (
            "DomainConfiguration",
            "domainconfigurations",
            json!({"connectionRef": {"name": "c"}, "domain": "example.org", "identityProvider": idp(json!("x".repeat(257)))}),
            "spec.identityProvider.clientId: Too long",
        ),
    ];
    for (kind, plural, spec, expected) in cluster {
        let name = format!("big-{}", ns.name);
        let object =
            json!({"apiVersion": "medplum.com/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        let refused = api(&client, kind, plural, None).create(&PostParams::default(), &object).await;
        let message = refused.expect_err(expected).to_string();
        assert!(message.contains(expected), "{kind}: {expected}: {message}");
    }
}

/// A policy at every bound: 200 resources, each with the longest criteria, the most hidden and
/// read-only fields and write constraints, and 100 IP rules.
fn policy_at_its_bounds() -> Value {
    let types = ["Patient", "Observation", "Encounter", "Condition", "Practitioner", "Organization", "Task"];
    let resource = |i: usize| {
        let t = types[i % types.len()];
        let prefix = format!("{t}?_id:not=x{i}&name=");
        json!({"resourceType": t, "criteria": format!("{prefix}{}", "a".repeat(1024 - prefix.len())),
               "interactions": ["read", "vread", "history", "search", "create", "update", "delete"],
               "hiddenFields": many(16, |f| json!(format!("hidden{f}{}", "h".repeat(56)))),
               "readonlyFields": many(16, |f| json!(format!("readonly{f}{}", "r".repeat(54)))),
               "writeConstraints": many(4, |c| json!(format!("%after.id.exists() or {c} = {c}{}", " ".repeat(220))))})
    };
    let rule = |i: usize| match i {
        0 => json!({"name": "n".repeat(256), "value": "127.", "action": "allow"}),
        99 => json!({"name": "the rest", "value": "*", "action": "block"}),
        _ => json!({"name": format!("rule {i}"), "value": format!("10.{i}."), "action": "allow"}),
    };
    json!({"displayName": "p".repeat(256), "resources": many(200, resource), "ipAccessRules": many(100, rule)})
}

/// A client at every bound, its 32 grants of `policy` with 16 parameters each of the longest value.
fn client_at_its_bounds(policy: &str) -> Value {
    let grant = |g: usize| {
        json!({"policyRef": {"name": policy}, "parameters": many(16, |p| json!({
            "name": format!("p{g}x{p}{}", "n".repeat(56)), "valueString": "v".repeat(1024)}))})
    };
    let url = |i: usize| json!(format!("https://app{i}.example.org/{}", "u".repeat(2048 - 26)));
    let map = |n: usize, value: usize| -> serde_json::Map<String, Value> {
        (0..n).map(|i| (format!("example.org/key-{i}"), json!("v".repeat(value)))).collect()
    };
    json!({"displayName": "c".repeat(256), "description": "d".repeat(1024),
           "accessTokenLifetime": "1h", "refreshTokenLifetime": "1d",
           "redirectUris": many(64, url), "allowedOrigins": many(64, url),
           "defaultScopes": many(64, |i| json!(format!("scope{i}{}", "s".repeat(248)))),
           "jwksUri": url(0), "launchUri": url(1), "access": many(32, grant),
           "secret": {"labels": map(32, 63), "annotations": map(32, 4096)},
           "rotation": {"interval": "720h", "gracePeriod": "1h",
                        "restartTargets": many(16, |i| json!({"kind": "Deployment", "name": format!("absent-{i}")}))}})
}

#[tokio::test]
async fn objects_at_their_bounds_converge_while_others_keep_converging() {
    let s = Setup::new("bounds-max", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let started = Instant::now();
    s.create_policy("widest", policy_at_its_bounds()).await;
    s.create_client("largest", client_at_its_bounds("widest")).await;
    for i in 0..10 {
        s.create_client(&format!("small-{i}"), json!({"access": [{"policyRef": {"name": "reader"}}]})).await;
    }
    let mut small = Vec::new();
    for i in 0..10 {
        s.wait_ready(&format!("small-{i}")).await;
        small.push(started.elapsed());
    }
    s.wait_policy("widest", "True", None).await;
    let policy_ready = started.elapsed();
    let largest = s.wait_ready("largest").await;
    let largest_ready = started.elapsed();
    println!(
        "figure: at its bounds, the AccessPolicy was Ready after {policy_ready:?} and the ClientApplication after \
         {largest_ready:?}; 10 small clients created beside them were Ready after {:?} (first) to {:?} (last)",
        small[0], small[9]
    );
    // Medplum holds all of it.
    let id = largest.status.unwrap().client_id.unwrap();
    let client = s.read_client(&id).await.1;
    assert_eq!(client["redirectUris"].as_array().map(Vec::len), Some(64));
    let membership = s.memberships_of(&id).await.remove(0);
    assert_eq!(membership["access"].as_array().map(Vec::len), Some(32));
    assert_eq!(membership["access"][31]["parameter"].as_array().map(Vec::len), Some(16));
    let secret = s.secret("largest").await.unwrap();
    assert!(s.token_works(&id, &secret["MEDPLUM_CLIENT_SECRET"]).await, "its credentials work");
    // Steady state: once settled, no further write for it (its status and Secret stay as they are).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let versions = || async {
        let ca = s.clients().get("largest").await.unwrap().metadata.resource_version;
        (ca, s.secret_object("largest").await.unwrap().metadata.resource_version)
    };
    let settled = versions().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(versions().await, settled, "no writes in steady state");
}
