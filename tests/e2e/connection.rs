//! MedplumConnection and ClusterMedplumConnection against the real control plane: Ready with good
//! credentials, a clear reason with bad ones, no secret anywhere, no writes in steady state.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::fixtures::apply_secret;
use crate::support::{MedplumTarget, Operator, ProjectAdmin, TestNamespace, cluster_client, eventually};
use medplum_operator::crd::{ClusterMedplumConnection, ConnectionStatus, MedplumConnection};

const WAIT: Duration = Duration::from_secs(60);

async fn create_connection(client: &Client, namespace: &str, name: &str, spec: Value) {
    let object: MedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "MedplumConnection", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    Api::<MedplumConnection>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

fn ready_of(status: Option<&ConnectionStatus>) -> Option<(String, String, String)> {
    let ready = status?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((ready.status.clone(), ready.reason.clone(), ready.message.clone()))
}

/// Waits until the connection's Ready condition has `status` and `reason`; returns the object.
async fn wait_ready(api: &Api<MedplumConnection>, name: &str, status: &str, reason: &str) -> MedplumConnection {
    eventually(WAIT, &format!("{name}: Ready={status} reason={reason}"), || async {
        let object = api.get(name).await.ok()?;
        let (s, r, _) = ready_of(object.status.as_ref())?;
        (s == status && r == reason).then_some(object)
    })
    .await
}

/// Fails if any secret value appears in the operator's logs, the namespace's Events or its objects.
async fn assert_no_secret_leaks(client: &Client, namespace: &str, operator: &Operator, secrets: &[&str]) {
    let events = Api::<Event>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.unwrap();
    let connections =
        Api::<MedplumConnection>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.unwrap();
    let places = [
        ("operator logs", operator.logs()),
        ("events", serde_json::to_string(&events.items).unwrap()),
        ("connections", serde_json::to_string(&connections.items).unwrap()),
        ("metrics", operator.metrics().await),
    ];
    for secret in secrets {
        assert!(secret.len() >= 8, "secret values to look for are long enough to be meaningful");
        for (place, text) in &places {
            assert!(!text.contains(secret), "a secret value leaked into the {place}");
        }
    }
    assert!(operator.logs().lines().count() > 20, "debug logs were captured");
}

async fn creds_secret(client: &Client, ns: &str, name: &str, admin: &ProjectAdmin, labelled: bool) {
    let labels = if labelled { json!({"medplum.com/connection-credentials": "true"}) } else { json!({}) };
    apply_secret(
        client,
        ns,
        name,
        &[("MEDPLUM_CLIENT_ID", &admin.client_id), ("MEDPLUM_CLIENT_SECRET", &admin.client_secret)],
        labels,
    )
    .await;
}

#[tokio::test]
async fn connection_becomes_ready_and_steady_state_makes_no_writes() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "conn-ready").await;
    let medplum = MedplumTarget::start().await;
    let admin = medplum.new_project("conn-ready").await;
    creds_secret(&client, &ns.name, "medplum-admin", &admin, false).await;
    create_connection(
        &client,
        &ns.name,
        "default",
        json!({"baseUrl": medplum.base_url(), "projectId": admin.project_id, "credentialsSecretRef": {"name": "medplum-admin"}}),
    )
    .await;
    let started = std::time::Instant::now();
    let operator = Operator::start(&ns.name, &["--resync-interval", "1s"]).await;
    let api: Api<MedplumConnection> = Api::namespaced(client.clone(), &ns.name);
    let ready = wait_ready(&api, "default", "True", "Connected").await;
    println!("figure: connection Ready {:?} after the operator started", started.elapsed());
    let status = ready.status.clone().unwrap();
    assert_eq!(status.project_id.as_deref(), Some(admin.project_id.as_str()));
    assert_eq!(status.client_id.as_deref(), Some(admin.client_id.as_str()));
    assert!(status.server_version.as_deref().is_some_and(|v| !v.is_empty()), "server version reported");
    assert_eq!(status.observed_generation, ready.metadata.generation);
    let (_, _, message) = ready_of(Some(&status)).unwrap();
    assert!(message.contains(&admin.project_id), "message names the project: {message}");

    // Steady state: several resyncs later, no status write, and one token served every verification.
    let version = ready.resource_version();
    let before = if medplum.is_test_server() { medplum.stats().await } else { Default::default() };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = api.get("default").await.unwrap();
    assert_eq!(later.resource_version(), version, "no writes to Kubernetes in steady state");
    let verifications = operator.metric("medplum_operator_medplum_requests_total{operation=\"auth_me\"").await;
    assert!(verifications >= 4.0, "the connection was verified again on every resync ({verifications})");
    assert_eq!(
        operator.metric("medplum_operator_token_refreshes_total").await,
        1.0,
        "one token for every verification"
    );
    if medplum.is_test_server() {
        let after = medplum.stats().await;
        let grown: Vec<(&String, u64)> =
            after.iter().map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0))).filter(|(_, d)| *d > 0).collect();
        println!("figure: Medplum requests in 5 s of steady state with a 1 s resync: {grown:?}");
        // The connection's checks, and the searches that keep its view of the project current.
        for (route, _) in &grown {
            let read = matches!(route.as_str(), "GET /auth/me" | "GET /healthcheck" | "GET /fhir/R4")
                || route.starts_with("GET /fhir/R4/");
            assert!(read, "steady state only reads: {route}");
        }
    }

    let events = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.unwrap();
    assert!(
        events.items.iter().any(|e| e.reason.as_deref() == Some("Connected")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("default")),
        "a Connected event was published"
    );
    assert_no_secret_leaks(&client, &ns.name, &operator, &[&admin.client_secret]).await;
}

#[tokio::test]
async fn connection_says_why_it_is_not_ready_without_printing_secrets() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "conn-bad").await;
    let medplum = MedplumTarget::start().await;
    let admin = medplum.new_project("conn-bad").await;
    let other = medplum.new_project("conn-bad-other").await;
    let pa_token = medplum.http.token(&admin.client_id, &admin.client_secret).await;
    let member = medplum
        .http
        .send(
            medplum
                .http
                .request(Method::POST, &format!("admin/projects/{}/client", admin.project_id), Some(&pa_token))
                .json(&json!({"name": "plain member"})),
        )
        .await
        .expect(201)
        .json();
    let member_secret = member["secret"].as_str().unwrap().to_string();
    let wrong_secret = format!("wrong-{}", uuid::Uuid::new_v4().simple());

    creds_secret(&client, &ns.name, "good", &admin, false).await;
    apply_secret(
        &client,
        &ns.name,
        "wrong-secret",
        &[("MEDPLUM_CLIENT_ID", &admin.client_id), ("MEDPLUM_CLIENT_SECRET", &wrong_secret)],
        json!({"medplum.com/connection-credentials": "true"}),
    )
    .await;
    apply_secret(&client, &ns.name, "no-secret-key", &[("MEDPLUM_CLIENT_ID", &admin.client_id)], json!({})).await;
    apply_secret(
        &client,
        &ns.name,
        "member",
        &[("MEDPLUM_CLIENT_ID", member["id"].as_str().unwrap()), ("MEDPLUM_CLIENT_SECRET", &member_secret)],
        json!({}),
    )
    .await;
    let connection = |secret: &str, project: &str, base_url: &str| json!({"baseUrl": base_url, "projectId": project, "credentialsSecretRef": {"name": secret}});
    let url = medplum.base_url().to_string();
    let cases = [
        ("wrong-secret", connection("wrong-secret", &admin.project_id, &url), "InvalidCredentials", "Invalid secret"),
        ("wrong-project", connection("good", &other.project_id, &url), "ProjectMismatch", &other.project_id as &str),
        (
            "unreachable",
            connection("good", &admin.project_id, "http://127.0.0.1:1/"),
            "MedplumUnreachable",
            "unreachable",
        ),
        (
            "missing-key",
            connection("no-secret-key", &admin.project_id, &url),
            "SecretKeyMissing",
            "MEDPLUM_CLIENT_SECRET",
        ),
        ("missing-secret", connection("absent", &admin.project_id, &url), "SecretNotFound", "absent"),
        ("not-admin", connection("member", &admin.project_id, &url), "NotProjectAdmin", "admin: true"),
    ];
    for (name, spec, _, _) in &cases {
        create_connection(&client, &ns.name, name, spec.clone()).await;
    }
    // A long resync: the labelled Secret's edit below must be picked up by the watch, not by a resync.
    let operator = Operator::start(&ns.name, &["--resync-interval", "10m"]).await;
    let api: Api<MedplumConnection> = Api::namespaced(client.clone(), &ns.name);
    for (name, _, reason, hint) in &cases {
        let object = wait_ready(&api, name, "False", reason).await;
        let (_, _, message) = ready_of(object.status.as_ref()).unwrap();
        assert!(message.contains(hint), "{name}: message {message:?} should mention {hint:?}");
        println!("refusal {name}: reason={reason} message={message:?}");
    }

    // Fixing the labelled credentials Secret makes the connection Ready without waiting for a resync.
    let fixed = json!({"stringData": {"MEDPLUM_CLIENT_SECRET": admin.client_secret}});
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .patch("wrong-secret", &PatchParams::default(), &Patch::Merge(&fixed))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    wait_ready(&api, "wrong-secret", "True", "Connected").await;
    assert!(started.elapsed() < Duration::from_secs(30), "picked up through the Secret watch");
    println!("figure: fixed credentials picked up in {:?}", started.elapsed());

    let events = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidCredentials") && e.type_.as_deref() == Some("Warning"))
    );
    assert_no_secret_leaks(
        &client,
        &ns.name,
        &operator,
        &[&admin.client_secret, &wrong_secret, &member_secret, &other.client_secret],
    )
    .await;
}

#[tokio::test]
async fn super_admin_credentials_are_refused() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "conn-sa").await;
    let medplum = MedplumTarget::start().await;
    let (id, secret) = medplum.super_admin_credentials();
    apply_secret(&client, &ns.name, "sa", &[("MEDPLUM_CLIENT_ID", &id), ("MEDPLUM_CLIENT_SECRET", &secret)], json!({}))
        .await;
    create_connection(
        &client,
        &ns.name,
        "sa",
        json!({"baseUrl": medplum.base_url(), "credentialsSecretRef": {"name": "sa"}}),
    )
    .await;
    let operator = Operator::start(&ns.name, &[]).await;
    let api: Api<MedplumConnection> = Api::namespaced(client.clone(), &ns.name);
    wait_ready(&api, "sa", "False", "SuperAdminCredential").await;
    assert_no_secret_leaks(&client, &ns.name, &operator, &[&secret]).await;
}

#[tokio::test]
async fn connection_trusts_a_custom_ca_bundle() {
    let (medplum, ca) = MedplumTarget::start_tls().await;
    let Some(ca) = ca else {
        crate::support::skip("a custom CA needs the Medplum test server");
        return;
    };
    assert!(medplum.base_url().starts_with("https://"));
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "conn-ca").await;
    let admin = medplum.new_project("conn-ca").await;
    creds_secret(&client, &ns.name, "admin", &admin, false).await;
    apply_secret(&client, &ns.name, "ca", &[("ca.crt", &ca)], json!({})).await;
    let map: k8s_openapi::api::core::v1::ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "ca"}, "data": {"bundle.pem": ca}})).unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &map)
        .await
        .unwrap();
    let spec = |ca_bundle: Value| {
        let mut spec = json!({"baseUrl": medplum.base_url(), "credentialsSecretRef": {"name": "admin"}});
        if !ca_bundle.is_null() {
            spec["caBundle"] = ca_bundle;
        }
        spec
    };
    create_connection(&client, &ns.name, "system-roots", spec(Value::Null)).await;
    create_connection(
        &client,
        &ns.name,
        "from-configmap",
        spec(json!({"configMapRef": {"name": "ca", "key": "bundle.pem"}})),
    )
    .await;
    create_connection(&client, &ns.name, "from-secret", spec(json!({"secretRef": {"name": "ca", "key": "ca.crt"}})))
        .await;
    create_connection(&client, &ns.name, "wrong-key", spec(json!({"configMapRef": {"name": "ca", "key": "nope"}})))
        .await;
    let _operator = Operator::start(&ns.name, &[]).await;
    let api: Api<MedplumConnection> = Api::namespaced(client.clone(), &ns.name);
    let untrusted = wait_ready(&api, "system-roots", "False", "MedplumUnreachable").await;
    let message = ready_of(untrusted.status.as_ref()).unwrap().2;
    assert!(message.contains("certificate"), "the message says the certificate is not trusted: {message}");
    println!("refusal system-roots: {message:?}");
    wait_ready(&api, "from-configmap", "True", "Connected").await;
    wait_ready(&api, "from-secret", "True", "Connected").await;
    wait_ready(&api, "wrong-key", "False", "ConfigMapKeyMissing").await;
}

#[tokio::test]
async fn cluster_connection_becomes_ready() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "cconn").await;
    let medplum = MedplumTarget::start().await;
    let admin = medplum.new_project("cconn").await;
    creds_secret(&client, &ns.name, "platform-admin", &admin, false).await;
    let name = format!("platform-{}", ns.name);
    let object: ClusterMedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "ClusterMedplumConnection",
        "metadata": {"name": name, "labels": {"medplum-operator-test": ns.name}, "ownerReferences": [ns.owner_reference()]},
        "spec": {"baseUrl": medplum.base_url(), "projectId": admin.project_id,
                 "credentialsSecretRef": {"namespace": ns.name, "name": "platform-admin"},
                 "allowedNamespaces": {"names": [ns.name]}}
    }))
    .unwrap();
    let api: Api<ClusterMedplumConnection> = Api::all(client.clone());
    api.create(&PostParams::default(), &object).await.unwrap();
    let _operator = Operator::start(&ns.name, &[]).await;
    let ready = eventually(WAIT, "cluster connection Ready", || async {
        let object = api.get(&name).await.ok()?;
        let (status, _, _) = ready_of(object.status.as_ref())?;
        (status == "True").then_some(object)
    })
    .await;
    assert_eq!(ready.status.unwrap().project_id.as_deref(), Some(admin.project_id.as_str()));
}

#[tokio::test]
async fn medplum_outage_and_rate_limits_show_in_status_and_recover() {
    let medplum = MedplumTarget::start().await;
    if !medplum.is_test_server() {
        crate::support::skip("fault injection needs the Medplum test server");
        return;
    }
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "conn-outage").await;
    let admin = medplum.new_project("conn-outage").await;
    creds_secret(&client, &ns.name, "admin", &admin, false).await;
    create_connection(
        &client,
        &ns.name,
        "default",
        json!({"baseUrl": medplum.base_url(), "credentialsSecretRef": {"name": "admin"}}),
    )
    .await;
    let _operator = Operator::start(&ns.name, &["--resync-interval", "1s", "--medplum-timeout", "2s"]).await;
    let api: Api<MedplumConnection> = Api::namespaced(client.clone(), &ns.name);
    wait_ready(&api, "default", "True", "Connected").await;

    medplum.set_faults(json!({"outage": true})).await;
    let down = wait_ready(&api, "default", "False", "MedplumUnreachable").await;
    assert_eq!(
        down.status.as_ref().unwrap().project_id.as_deref(),
        Some(admin.project_id.as_str()),
        "last known project kept"
    );
    medplum.set_faults(json!({})).await;
    wait_ready(&api, "default", "True", "Connected").await;

    medplum.set_faults(json!({"tooManyRequestsRate": 1.0, "pathPrefix": "/auth/me"})).await;
    wait_ready(&api, "default", "False", "MedplumRateLimited").await;
    medplum.set_faults(json!({"errorRate": 1.0, "pathPrefix": "/auth/me"})).await;
    // After a 429 the next try waits for Medplum's 60 s window.
    let server_error = eventually(Duration::from_secs(120), "Ready=False reason MedplumServerError", || async {
        let object = api.get("default").await.ok()?;
        (ready_of(object.status.as_ref())?.1 == "MedplumServerError").then_some(object)
    })
    .await;
    assert!(ready_of(server_error.status.as_ref()).unwrap().2.contains("500"));
    medplum.set_faults(json!({})).await;
    eventually(Duration::from_secs(120), "Ready again", || async {
        let object = api.get("default").await.ok()?;
        (ready_of(object.status.as_ref())?.0 == "True").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_super_admin_credential_manages_the_named_project_when_meant_to() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "conn-sa-ok").await;
    let medplum = MedplumTarget::start().await;
    let admin = medplum.new_project("conn-sa-ok").await;
    let (id, secret) = medplum.super_admin_credentials();
    apply_secret(&client, &ns.name, "sa", &[("MEDPLUM_CLIENT_ID", &id), ("MEDPLUM_CLIENT_SECRET", &secret)], json!({}))
        .await;
    let connections: Api<MedplumConnection> = Api::namespaced(client.clone(), &ns.name);
    let without_project: MedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "MedplumConnection", "metadata": {"name": "no-project"},
        "spec": {"baseUrl": medplum.base_url(), "superAdminCredential": true, "credentialsSecretRef": {"name": "sa"}}
    }))
    .unwrap();
    let error = connections.create(&PostParams::default(), &without_project).await.unwrap_err().to_string();
    assert!(error.contains("a super-admin credential needs spec.projectId"), "{error}");
    create_connection(
        &client,
        &ns.name,
        "default",
        json!({"baseUrl": medplum.base_url(), "superAdminCredential": true, "projectId": admin.project_id,
               "credentialsSecretRef": {"name": "sa"}}),
    )
    .await;
    let _operator = Operator::start(&ns.name, &[]).await;
    let ready = wait_ready(&connections, "default", "True", "Connected").await;
    assert_eq!(ready.status.unwrap().project_id.as_deref(), Some(admin.project_id.as_str()), "the managed project");

    // Objects made through it land in that project.
    let policies: Api<medplum_operator::crd::AccessPolicy> = Api::namespaced(client.clone(), &ns.name);
    let policy: medplum_operator::crd::AccessPolicy = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "reader"},
        "spec": {"resources": [{"resourceType": "Patient", "readonly": true}]}
    }))
    .unwrap();
    policies.create(&PostParams::default(), &policy).await.unwrap();
    let clients: Api<medplum_operator::crd::ClientApplication> = Api::namespaced(client.clone(), &ns.name);
    let app: medplum_operator::crd::ClientApplication = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "ClientApplication", "metadata": {"name": "app"},
        "spec": {"access": [{"policyRef": {"name": "reader"}}]}
    }))
    .unwrap();
    clients.create(&PostParams::default(), &app).await.unwrap();
    let client_id = eventually(WAIT, "ClientApplication Ready", || async {
        let app = clients.get("app").await.ok()?;
        let status = app.status?;
        status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(status.client_id?)
    })
    .await;
    let token = medplum.http.token(&admin.client_id, &admin.client_secret).await;
    medplum.http.get(&format!("fhir/R4/ClientApplication/{client_id}"), &token).await.expect(200);
    let members =
        medplum.http.get(&format!("fhir/R4/ProjectMembership?user=ClientApplication/{client_id}"), &token).await.json();
    assert_eq!(members["entry"].as_array().map(Vec::len), Some(1), "its membership is in the project too");
    clients.delete("app", &Default::default()).await.unwrap();
    eventually(WAIT, "client deleted through the super-admin connection", || async {
        (medplum.http.get(&format!("fhir/R4/ClientApplication/{client_id}"), &token).await.status == 410).then_some(())
    })
    .await;
}
