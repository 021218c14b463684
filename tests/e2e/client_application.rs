//! ClientApplication against the real control plane and the Medplum target: creation, drift, rotation
//! without a failed token request, kill -9 at every step, deletion policies, failures and refusals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::fixtures::{Setup, WAIT};
use crate::support::{Operator, eventually};
use medplum_operator::crd::MedplumConnection;

async fn wait_connection(s: &Setup) {
    let api: Api<MedplumConnection> = Api::namespaced(s.client.clone(), &s.ns.name);
    eventually(WAIT, "connection Ready", || async {
        let c = api.get("default").await.ok()?;
        c.status?.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
}

fn access(policy: &str) -> Value {
    json!([{"policyRef": {"name": policy}, "parameters": [{"name": "organization", "valueReference": "Organization/123"}]}])
}

fn kube_writes(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("medplum_operator_kubernetes_requests_total{"))
        .filter(|l| {
            ["\"patch\"", "\"create\"", "\"update\"", "\"delete\""].iter().any(|v| l.contains(&format!("verb={v}")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn kube_requests(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("medplum_operator_kubernetes_requests_total{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            Some((
                labels.trim_start_matches("medplum_operator_kubernetes_requests_total").to_string(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

fn delta(after: &[(String, f64)], before: &[(String, f64)]) -> Vec<(String, f64)> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.iter().find(|(b, _)| b == k).map(|(_, v)| *v).unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

#[tokio::test]
async fn lifecycle_creates_working_credentials_keeps_them_and_cleans_up() {
    let s = Setup::new("ca-life", &[], json!({})).await;
    let operator = Operator::start(&s.ns.name, &["--resync-interval", "3s"]).await;
    let policy_id = s.ready_policy("lab-reader", json!([{"resourceType": "Observation", "readonly": true}])).await;
    s.deployment("lab-sync").await;
    wait_connection(&s).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let medplum_before = if s.medplum.is_test_server() { s.medplum.stats().await } else { Default::default() };
    let kube_before = kube_requests(&operator.metrics().await);
    let reconciles_before =
        operator.metric("medplum_operator_reconciliations_total{kind=\"ClientApplication\",outcome=\"success\"}").await;

    let started = Instant::now();
    s.create_client(
        "lab-sync",
        json!({"displayName": "Lab sync service", "description": "Pushes lab results", "accessTokenLifetime": "15m",
               "redirectUris": ["https://lab.example.org/cb"], "access": access("lab-reader"),
               "rotation": {"restartTargets": [{"kind": "Deployment", "name": "lab-sync"}]}}),
    )
    .await;
    let ready = s.wait_ready("lab-sync").await;
    let elapsed = started.elapsed();
    println!("figure: ClientApplication Ready {elapsed:?} after it was applied");
    if s.medplum.is_test_server() {
        let after = s.medplum.stats().await;
        let used: Vec<(&String, u64)> = after
            .iter()
            .map(|(k, v)| (k, v - medplum_before.get(k).copied().unwrap_or(0)))
            .filter(|(_, d)| *d > 0)
            .collect();
        let total: u64 = used.iter().map(|(_, d)| d).sum();
        println!("figure: Medplum requests to create one client: {total} {used:?}");
        let count = |route: &str| used.iter().find(|(k, _)| k.as_str() == route).map(|(_, d)| *d).unwrap_or(0);
        assert_eq!(count("POST /fhir/R4/ClientApplication"), 1, "{used:?}");
        assert_eq!(count("POST /fhir/R4/ProjectMembership"), 1, "{used:?}");
        // The written credentials are checked with HTTP Basic on /auth/me, outside the auth rate limit.
        assert_eq!(count("POST /oauth2/token"), 0, "no token request: {used:?}");
        assert!(count("GET /auth/me") >= 1, "{used:?}");
    }
    let kube_used = delta(&kube_requests(&operator.metrics().await), &kube_before);
    println!(
        "figure: Kubernetes requests to create one client: {} {kube_used:?}",
        kube_used.iter().map(|(_, d)| d).sum::<f64>()
    );
    // One reconcile adds the finalizer and goes on to create; its own writes (finalizer, status,
    // Secret) trigger no second one.
    let used = |labels: &str| kube_used.iter().find(|(k, _)| k == labels).map(|(_, d)| *d).unwrap_or(0.0);
    assert_eq!(used("{verb=\"patch\",resource=\"clientapplications\"}"), 1.0, "one finalizer patch: {kube_used:?}");
    // Given a moment, so that a second reconcile (none is expected) would show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reconciles =
        operator.metric("medplum_operator_reconciliations_total{kind=\"ClientApplication\",outcome=\"success\"}").await;
    assert_eq!(reconciles, reconciles_before + 1.0, "one reconcile made the client whole");

    // Status, Secret and Medplum agree, and the credentials work.
    let status = ready.status.clone().unwrap();
    let client_id = status.client_id.clone().expect("client id in status");
    assert_eq!(status.secret_name.as_deref(), Some("lab-sync"));
    assert!(status.secret_fingerprint.as_deref().is_some_and(|f| f.starts_with("sha256:")));
    assert!(status.last_rotation_time.is_some() && status.next_rotation_time.is_none());
    let condition =
        |t: &str| status.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone()));
    assert_eq!(condition("CredentialVerified"), Some(("True".into(), "SecretAccepted".into())));
    assert_eq!(condition("Rotating"), Some(("False".into(), "Idle".into())));
    let data = s.secret("lab-sync").await.expect("Secret written");
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["MEDPLUM_BASE_URL", "MEDPLUM_CLIENT_ID", "MEDPLUM_CLIENT_SECRET", "MEDPLUM_PROJECT_ID", "MEDPLUM_TOKEN_URL"]
    );
    assert_eq!(data["MEDPLUM_CLIENT_ID"], client_id);
    assert_eq!(data["MEDPLUM_BASE_URL"], s.medplum.base_url());
    assert_eq!(data["MEDPLUM_TOKEN_URL"], format!("{}oauth2/token", s.medplum.base_url()));
    assert_eq!(data["MEDPLUM_PROJECT_ID"], s.admin.project_id);
    let secret = data["MEDPLUM_CLIENT_SECRET"].clone();
    let token = s.http().token_request(&client_id, &secret).await.expect(200).json();
    assert_eq!(token["expires_in"], 900, "accessTokenLifetime applied");
    let object = s.secret_object("lab-sync").await.unwrap();
    let owner = &object.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.controller), ("ClientApplication", Some(true)));
    assert_eq!(object.labels().get("medplum.com/client-application").map(String::as_str), Some("lab-sync"));

    let tagged = s.tagged_clients("lab-sync").await;
    assert_eq!(tagged.len(), 1, "exactly one Medplum client");
    assert_eq!(tagged[0]["name"], "Lab sync service");
    assert_eq!(tagged[0]["redirectUris"], json!(["https://lab.example.org/cb"]));
    let memberships = s.memberships_of(&client_id).await;
    assert_eq!(memberships.len(), 1);
    assert_eq!(
        memberships[0]["access"],
        json!([{"policy": {"reference": format!("AccessPolicy/{policy_id}")},
                "parameter": [{"name": "organization", "valueReference": {"reference": "Organization/123"}}]}]),
        "the membership carries exactly the declared access"
    );
    assert!(memberships[0].get("accessPolicy").is_none() && memberships[0].get("admin").is_none());
    let issued = object.annotations().get("medplum.com/issued-at").cloned();
    assert_eq!(s.restarted_for("lab-sync").await, issued, "restart target restarted for these credentials");

    // Steady state: resyncs every 3 s read, and write nothing.
    let (ca_version, secret_version) = (ready.resource_version(), object.resource_version());
    let medplum_before = if s.medplum.is_test_server() { s.medplum.stats().await } else { Default::default() };
    let writes_before = kube_writes(&operator.metrics().await);
    let requests_before = kube_requests(&operator.metrics().await);
    tokio::time::sleep(Duration::from_secs(7)).await;
    println!(
        "figure: Kubernetes requests in 7 s of steady state: {:?}",
        delta(&kube_requests(&operator.metrics().await), &requests_before)
    );
    assert_eq!(s.clients().get("lab-sync").await.unwrap().resource_version(), ca_version);
    assert_eq!(s.secret_object("lab-sync").await.unwrap().resource_version(), secret_version);
    assert_eq!(kube_writes(&operator.metrics().await), writes_before, "no Kubernetes writes in steady state");
    if s.medplum.is_test_server() {
        let after = s.medplum.stats().await;
        let grown: Vec<(&String, u64)> = after
            .iter()
            .map(|(k, v)| (k, v - medplum_before.get(k).copied().unwrap_or(0)))
            .filter(|(_, d)| *d > 0)
            .collect();
        println!("figure: Medplum requests in 7 s of steady state (3 s resync, one client, one connection): {grown:?}");
        assert!(grown.iter().all(|(k, _)| k.starts_with("GET ")), "steady state only reads Medplum: {grown:?}");
    }

    // A spec change applies within seconds.
    let changed = Instant::now();
    let patch = json!({"spec": {"displayName": "Lab sync v2"}});
    s.clients().patch("lab-sync", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually(Duration::from_secs(20), "name updated in Medplum", || async {
        (s.read_client(&client_id).await.1["name"] == "Lab sync v2").then_some(())
    })
    .await;
    println!("figure: spec change applied in Medplum after {:?}", changed.elapsed());
    s.wait_ready("lab-sync").await;
    s.expect_events("lab-sync", &["Created", "Restarted", "Updated"]).await;

    // Nothing secret in logs (debug level), Events, status or metrics.
    let public = format!("{}\n{}\n{}", operator.logs(), s.public_text().await, operator.metrics().await);
    for value in [&secret, &s.admin.client_secret] {
        assert!(!public.contains(value.as_str()), "a secret value leaked");
    }

    // Delete: membership and client gone from Medplum, Secret garbage collected.
    s.delete_client_resource("lab-sync").await;
    assert_eq!(s.read_client(&client_id).await.0, 410);
    assert!(s.memberships_of(&client_id).await.is_empty());
    assert!(!s.token_works(&client_id, &secret).await);
    eventually(WAIT, "Secret garbage collected", || async { s.secret("lab-sync").await.is_none().then_some(()) }).await;
    s.expect_events("lab-sync", &["Deleted"]).await;
}

/// A workload that requests tokens with the Secret's credentials until told to stop. With `reload`
/// it reads the Secret before every request (a mounted Secret); without, it reads it at start and again
/// only when its Deployment is restarted (environment variables).
fn workload(
    s: &Setup,
    client_id: String,
    reload: bool,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Timestamp, bool)>> {
    let (client, namespace, http) = (s.client.clone(), s.ns.name.clone(), s.http().clone());
    tokio::spawn(async move {
        let mut answers = Vec::new();
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &namespace);
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client, &namespace);
        let read_secret = || async {
            let data = secrets.get("rotating").await.unwrap().data.unwrap();
            String::from_utf8(data["MEDPLUM_CLIENT_SECRET"].0.clone()).unwrap()
        };
        let restarted = || async {
            deployments
                .get("rotating")
                .await
                .unwrap()
                .spec
                .unwrap()
                .template
                .metadata
                .and_then(|m| m.annotations)
                .unwrap_or_default()
        };
        let mut secret = read_secret().await;
        let mut generation = restarted().await;
        while !stop.load(Ordering::SeqCst) {
            if reload {
                secret = read_secret().await;
            } else {
                let now = restarted().await;
                if now != generation {
                    generation = now;
                    secret = read_secret().await;
                }
            }
            let answer = http.token_request(&client_id, &secret).await;
            answers.push((Timestamp::now(), answer.status == 200));
            tokio::time::sleep(every).await;
        }
        answers
    })
}

#[tokio::test]
async fn rotation_keeps_every_token_request_working() {
    let s = Setup::new("ca-rotate", &["--auth-rate-limit", "100000"], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &["--resync-interval", "30s"]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    s.deployment("rotating").await;
    s.create_client(
        "rotating",
        json!({"access": access("reader"),
               "rotation": {"gracePeriod": "3s", "restartTargets": [{"kind": "Deployment", "name": "rotating"}]}}),
    )
    .await;
    let ready = s.wait_ready("rotating").await;
    let status = ready.status.unwrap();
    let client_id = status.client_id.clone().unwrap();
    let old_secret = s.secret("rotating").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    let old_fingerprint = status.secret_fingerprint.clone().unwrap();

    // Both workloads ask for a token every 100 ms, whatever the server; the checks below count
    // requests per phase of the rotation, so they hold however fast the server answers.
    let every = Duration::from_millis(100);
    let stop = Arc::new(AtomicBool::new(false));
    let mounted = workload(&s, client_id.clone(), true, every, stop.clone());
    let environment = workload(&s, client_id.clone(), false, every, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let requested = Instant::now();
    s.annotate("rotating", "medplum.com/rotate", "now").await;
    let done = eventually(Duration::from_secs(60), "rotation finished", || async {
        let ca = s.clients().get("rotating").await.ok()?;
        let st = ca.status?;
        let idle = st.conditions.iter().any(|c| c.type_ == "Rotating" && c.reason == "Idle");
        let retired = s.read_client(&client_id).await.1.get("retiringSecret").is_none();
        (idle && retired && st.secret_fingerprint.as_deref() != Some(old_fingerprint.as_str()))
            .then(|| requested.elapsed())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mounted = mounted.await.unwrap();
    let environment = environment.await.unwrap();
    println!("figure: rotation requested → old secret retired in {done:?}");
    let new_secret = s.secret("rotating").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    assert_ne!(new_secret, old_secret);
    assert!(s.token_works(&client_id, &new_secret).await);
    assert!(!s.token_works(&client_id, &old_secret).await, "the old secret is retired");
    assert_eq!(s.tagged_clients("rotating").await.len(), 1);

    // The timeline, from the Events' times.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(s.client.clone(), &s.ns.name)
        .list(&Default::default())
        .await
        .unwrap();
    let mut timeline: Vec<(String, Timestamp)> = events
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rotating"))
        .filter(|e| matches!(e.reason.as_deref(), Some("Rotated" | "Restarted" | "SecretRetired")))
        // A repeated Event is one series; its last occurrence is the one of this rotation.
        .filter_map(|e| {
            Some((
                e.reason.clone()?,
                e.series.as_ref().map(|s| s.last_observed_time.0).or(e.event_time.clone().map(|t| t.0))?,
            ))
        })
        .collect();
    timeline.sort_by_key(|(_, t)| *t);
    let first = timeline.first().map(|(_, t)| *t).unwrap();
    let steps: Vec<String> =
        timeline.iter().map(|(r, t)| format!("{r} +{:.2}s", t.duration_since(first).as_secs_f64())).collect();
    println!("figure: rotation timeline: {steps:?}");
    let reasons: Vec<&str> = timeline.iter().map(|(r, _)| r.as_str()).collect();
    let last_restart = reasons.iter().rposition(|r| *r == "Restarted").unwrap();
    assert!(reasons.iter().rposition(|r| *r == "Rotated").unwrap() < last_restart);
    assert_eq!(reasons.last(), Some(&"SecretRetired"), "retired last: {reasons:?}");
    let retired_at = timeline.last().unwrap().1;
    let rotated_at = timeline.iter().rev().find(|(r, _)| r == "Rotated").unwrap().1;
    assert!(
        retired_at.duration_since(rotated_at).as_secs_f64() >= 2.9,
        "the old secret worked through the 3 s grace period"
    );

    // Every token request of both workloads succeeded, in each phase: on the old secret before the
    // switch, across the switch and the grace period, and on the new secret after the retirement.
    for (name, answers) in [("mounted", &mounted), ("env", &environment)] {
        let phase = |from: Option<Timestamp>, to: Option<Timestamp>| {
            answers.iter().filter(|(t, _)| from.is_none_or(|f| *t >= f) && to.is_none_or(|u| *t < u)).count()
        };
        let (before, during, after) =
            (phase(None, Some(rotated_at)), phase(Some(rotated_at), Some(retired_at)), phase(Some(retired_at), None));
        let failed = answers.iter().filter(|(_, ok)| !ok).count();
        println!(
            "figure: {name} workload: {} token requests, {failed} failed; {before} before the switch, {during} through \
             the grace period, {after} after the retirement",
            answers.len()
        );
        assert_eq!(failed, 0, "{name}: no failed token request through the rotation");
        assert!(before >= 3 && during >= 3 && after >= 3, "{name} asked in every phase: {before}/{during}/{after}");
    }
}

const CREATE_STEPS: [&str; 3] = ["create-client", "create-membership", "write-secret"];
const ROTATION_STEPS: [&str; 5] =
    ["store-new-secret", "push-secret", "write-secret", "restart-targets", "retire-secret"];

#[tokio::test]
async fn kill_at_every_creation_and_rotation_step_resumes_without_duplicates() {
    let s = Setup::new("ca-crash", &["--auth-rate-limit", "100000"], json!({})).await;
    s.deployment("rotating").await;
    let args = ["--resync-interval", "2s"];
    {
        let _operator = Operator::start(&s.ns.name, &args).await;
        s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    }
    for (i, point) in CREATE_STEPS.iter().enumerate() {
        let name = format!("create-{i}");
        let mut crashing = Operator::spawn(&s.ns.name, &args, &[("MEDPLUM_OPERATOR_CRASH_AT", point)]).await;
        s.create_client(&name, json!({"access": access("reader")})).await;
        let exit = crashing.wait_exit(WAIT).await;
        assert!(!exit.success(), "{point}: the operator was killed there");
        let _operator = Operator::start(&s.ns.name, &args).await;
        let ready = s.wait_ready(&name).await;
        let client_id = ready.status.unwrap().client_id.unwrap();
        assert_eq!(s.tagged_clients(&name).await.len(), 1, "{point}: one client");
        assert_eq!(s.memberships_of(&client_id).await.len(), 1, "{point}: one membership");
        let secret = s.secret(&name).await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
        assert!(s.token_works(&client_id, &secret).await, "{point}: the Secret's credentials work");
        println!("killed at creation step {point}: resumed, one client, one membership, working Secret");
    }

    let spec = json!({"access": access("reader"),
                      "rotation": {"gracePeriod": "1s", "restartTargets": [{"kind": "Deployment", "name": "rotating"}]}});
    s.create_client("rotating", spec).await;
    {
        let _operator = Operator::start(&s.ns.name, &args).await;
        s.wait_ready("rotating").await;
    }
    for point in ROTATION_STEPS {
        let before = s.secret("rotating").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
        let mut crashing = Operator::spawn(&s.ns.name, &args, &[("MEDPLUM_OPERATOR_CRASH_AT", point)]).await;
        s.annotate("rotating", "medplum.com/rotate", point).await;
        assert!(!crashing.wait_exit(WAIT).await.success(), "{point}: killed there");
        let _operator = Operator::start(&s.ns.name, &args).await;
        let client_id = s.clients().get("rotating").await.unwrap().status.unwrap().client_id.unwrap();
        eventually(WAIT, &format!("rotation resumed after a kill at {point}"), || async {
            let secret = s.secret("rotating").await?["MEDPLUM_CLIENT_SECRET"].clone();
            let medplum = s.read_client(&client_id).await.1;
            let done =
                secret != before && medplum["secret"] == secret.as_str() && medplum.get("retiringSecret").is_none();
            done.then_some(())
        })
        .await;
        let after = s.secret("rotating").await.unwrap();
        assert!(!after.contains_key("medplum-operator.next-client-secret"), "{point}: no pending secret left");
        assert!(s.token_works(&client_id, &after["MEDPLUM_CLIENT_SECRET"]).await);
        assert!(!s.token_works(&client_id, &before).await, "{point}: the old secret was retired");
        assert_eq!(s.tagged_clients("rotating").await.len(), 1);
        println!("killed at rotation step {point}: resumed and finished the rotation");
    }
}

#[tokio::test]
async fn drift_in_medplum_and_in_the_secret_is_put_back() {
    let s = Setup::new("ca-drift", &[], json!({})).await;
    let mut operator = Operator::start(&s.ns.name, &["--resync-interval", "10m"]).await;
    let policy_id = s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    s.create_client(
        "drifty",
        json!({"displayName": "Drifty", "accessTokenLifetime": "15m", "access": access("reader")}),
    )
    .await;
    // A long resync: what is restored here comes through the Secret watch.
    let ready = s.wait_ready("drifty").await;
    let client_id = ready.status.unwrap().client_id.unwrap();
    let good = s.secret("drifty").await.unwrap();

    let started = Instant::now();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(s.client.clone(), &s.ns.name)
        .delete("drifty", &Default::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "deleted Secret recreated", || async {
        (s.secret("drifty").await? == good).then_some(())
    })
    .await;
    println!("figure: deleted Secret restored in {:?}", started.elapsed());
    let edit = json!({"stringData": {"MEDPLUM_CLIENT_SECRET": "typed-over-by-hand"}});
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(s.client.clone(), &s.ns.name)
        .patch("drifty", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "edited Secret restored", || async {
        (s.secret("drifty").await?["MEDPLUM_CLIENT_SECRET"] == good["MEDPLUM_CLIENT_SECRET"]).then_some(())
    })
    .await;
    s.expect_events("drifty", &["SecretRestored"]).await;
    operator.kill().await;

    // Medplum console edits are put back on the periodic resync.
    let _operator = Operator::start(&s.ns.name, &["--resync-interval", "2s"]).await;
    s.edit_client(&client_id, |c| {
        c["name"] = json!("renamed in the console");
        c["accessTokenLifetime"] = json!("1d");
        c["redirectUris"] = json!(["https://evil.example.org/cb"]);
    })
    .await;
    let membership = s.memberships_of(&client_id).await.remove(0);
    let mut widened = membership.clone();
    widened.as_object_mut().unwrap().remove("access");
    s.http()
        .put(&format!("fhir/R4/ProjectMembership/{}", membership["id"].as_str().unwrap()), &s.token, &widened)
        .await
        .expect(200);
    eventually(Duration::from_secs(30), "console edits put back", || async {
        let c = s.read_client(&client_id).await.1;
        let m = s.memberships_of(&client_id).await.pop()?;
        let restored = c["name"] == "Drifty" && c["accessTokenLifetime"] == "15m" && c.get("redirectUris").is_none();
        let access_back = m["access"][0]["policy"]["reference"] == format!("AccessPolicy/{policy_id}");
        (restored && access_back).then_some(())
    })
    .await;
    assert_eq!(s.read_client(&client_id).await.1["secret"], good["MEDPLUM_CLIENT_SECRET"].as_str(), "secret kept");
    s.expect_events("drifty", &["DriftCorrected"]).await;
}

#[tokio::test]
async fn a_foreign_secret_is_left_alone_unless_merging_is_asked_for() {
    let s = Setup::new("ca-foreign", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let theirs: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        json!({"metadata": {"name": "shared"}, "stringData": {"DATABASE_URL": "postgres://db"}}),
    )
    .unwrap();
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(s.client.clone(), &s.ns.name);
    secrets.create(&Default::default(), &theirs).await.unwrap();
    let version = s.secret_object("shared").await.unwrap().resource_version();
    s.create_client("app", json!({"access": access("reader"), "secret": {"name": "shared"}})).await;
    let refused = s.wait_condition("app", "Ready", "False", Some("SecretConflict")).await;
    let message = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
    println!("refusal foreign Secret: {message:?}");
    assert!(s.tagged_clients("app").await.is_empty(), "nothing written to Medplum");
    assert_eq!(s.secret_object("shared").await.unwrap().resource_version(), version, "the Secret was not touched");

    let patch = json!({"spec": {"secret": {"name": "shared", "merge": true}}});
    s.clients().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // Merging needs the consent of the Secret's owner too.
    let refused = s.wait_condition("app", "Ready", "False", Some("SecretMergeNotAllowed")).await;
    let message = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
    assert!(message.contains("medplum.com/allow-merge: app"), "{message}");
    assert_eq!(s.secret_object("shared").await.unwrap().resource_version(), version, "the Secret was not touched");
    let consent = json!({"metadata": {"annotations": {"medplum.com/allow-merge": "app"}}});
    secrets.patch("shared", &PatchParams::default(), &Patch::Merge(&consent)).await.unwrap();
    s.wait_ready("app").await;
    let merged = s.secret("shared").await.unwrap();
    assert_eq!(merged["DATABASE_URL"], "postgres://db");
    assert!(merged.contains_key("MEDPLUM_CLIENT_SECRET"));
    assert!(s.secret_object("shared").await.unwrap().metadata.owner_references.is_none(), "not owned");

    s.delete_client_resource("app").await;
    let left = s.secret("shared").await.expect("their Secret stays");
    assert_eq!(left.keys().collect::<Vec<_>>(), ["DATABASE_URL"], "only the operator's keys were removed");
}

#[tokio::test]
async fn deletion_policies_orphan_and_disable() {
    let s = Setup::new("ca-delete", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    s.create_client("kept", json!({"access": access("reader"), "deletionPolicy": "Orphan"})).await;
    s.create_client("disabled", json!({"access": access("reader"), "deletionPolicy": "Disable"})).await;
    let kept_id = s.wait_ready("kept").await.status.unwrap().client_id.unwrap();
    let disabled_id = s.wait_ready("disabled").await.status.unwrap().client_id.unwrap();
    let kept_secret = s.secret("kept").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    let disabled_secret = s.secret("disabled").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();

    s.delete_client_resource("kept").await;
    let (status, kept) = s.read_client(&kept_id).await;
    assert_eq!(status, 200, "Orphan leaves the client");
    assert!(kept["meta"].get("tag").is_none_or(|t| !t.to_string().contains("urn:medplum-operator")), "untagged");
    assert_eq!(s.memberships_of(&kept_id).await.len(), 1, "and its membership");
    assert!(s.token_works(&kept_id, &kept_secret).await, "which still works");
    let left = s.secret("kept").await.expect("Orphan leaves the Secret");
    assert_eq!(left["MEDPLUM_CLIENT_SECRET"], kept_secret);

    s.delete_client_resource("disabled").await;
    let (status, disabled) = s.read_client(&disabled_id).await;
    assert_eq!((status, disabled["status"].as_str()), (200, Some("off")), "Disable sets status off");
    assert!(!s.token_works(&disabled_id, &disabled_secret).await, "no new tokens");
    s.expect_events("kept", &["Orphaned"]).await;
    s.expect_events("disabled", &["Disabled"]).await;
}

#[tokio::test]
async fn medplum_outage_keeps_the_secret_and_recovers() {
    let s = Setup::new("ca-outage", &[], json!({})).await;
    if !s.medplum.is_test_server() {
        crate::support::skip("fault injection needs the Medplum test server");
        return;
    }
    let _operator = Operator::start(&s.ns.name, &["--resync-interval", "1s", "--medplum-timeout", "2s"]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    s.create_client("app", json!({"access": access("reader")})).await;
    s.wait_ready("app").await;
    let before = s.secret("app").await.unwrap();

    s.medplum.set_faults(json!({"outage": true})).await;
    s.annotate("app", "example.org/poke", "1").await;
    // The connection finds Medplum unreachable; its users say so and wait for it.
    let down = s.wait_condition("app", "Ready", "False", Some("ConnectionNotReady")).await;
    let message = down.status.unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().message.clone();
    println!("outage: {message:?}");
    assert!(message.contains("is unreachable"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.secret("app").await.unwrap(), before, "the Secret is never blanked during an outage");
    // Each change is announced by touching the resource, so the next try does not wait for the backoff.
    s.medplum.set_faults(json!({"errorRate": 1.0, "pathPrefix": "/fhir/"})).await;
    s.annotate("app", "example.org/poke", "2").await;
    s.wait_condition("app", "Ready", "False", Some("MedplumServerError")).await;
    s.medplum.set_faults(json!({"tooManyRequestsRate": 1.0, "pathPrefix": "/fhir/"})).await;
    s.annotate("app", "example.org/poke", "3").await;
    s.wait_condition("app", "Ready", "False", Some("MedplumRateLimited")).await;
    s.medplum.set_faults(json!({})).await;
    s.annotate("app", "example.org/poke", "4").await;
    eventually(Duration::from_secs(120), "Ready again after the outage", || async {
        let ca = s.clients().get("app").await.ok()?;
        ca.status?.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    assert_eq!(s.secret("app").await.unwrap(), before);
    assert_eq!(s.tagged_clients("app").await.len(), 1);
}

#[tokio::test]
async fn least_privilege_refusals() {
    let s = Setup::new("ca-refuse", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    // No access at all: refused by the CRD's CEL rule.
    let object: medplum_operator::crd::ClientApplication = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "ClientApplication", "metadata": {"name": "nothing"}, "spec": {}
    }))
    .unwrap();
    let error = s.clients().create(&Default::default(), &object).await.unwrap_err().to_string();
    assert!(error.contains("set spec.access"), "{error}");
    println!("refusal no access: {error:?}");

    s.create_client("everything", json!({"unrestrictedAccess": true})).await;
    let refused = s.wait_condition("everything", "Ready", "False", Some("UnrestrictedAccessNotAllowed")).await;
    println!(
        "refusal unrestricted: {:?}",
        refused.status.unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().message
    );
    s.create_client("missing-policy", json!({"access": access("nope")})).await;
    s.wait_condition("missing-policy", "Ready", "False", Some("PolicyNotFound")).await;
    assert!(s.tagged_clients("everything").await.is_empty() && s.tagged_clients("missing-policy").await.is_empty());
    assert!(s.secret("everything").await.is_none());

    // The connection's ceiling allows it: a membership without any policy.
    let patch = json!({"spec": {"limits": {"allowUnrestrictedAccess": true}}});
    Api::<MedplumConnection>::namespaced(s.client.clone(), &s.ns.name)
        .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let ready = s.wait_ready("everything").await;
    let membership = s.memberships_of(&ready.status.unwrap().client_id.unwrap()).await.remove(0);
    assert!(membership.get("access").is_none() && membership.get("accessPolicy").is_none());
}

#[tokio::test]
async fn adoption_keeps_or_rotates_the_existing_secret() {
    let s = Setup::new("ca-adopt", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    let policy_id = s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let broad = s.ready_policy("broad", json!([{"resourceType": "Patient"}, {"resourceType": "Observation"}])).await;
    let (keep_id, keep_secret) = s.legacy_client("legacy-keep", Some(&broad)).await;
    let (rotate_id, rotate_secret) = s.legacy_client("legacy-rotate", Some(&broad)).await;
    s.create_client("keep", json!({"access": access("reader"), "adopt": {"clientId": keep_id, "secret": "Keep"}}))
        .await;
    s.create_client(
        "rotate",
        json!({"access": access("reader"), "adopt": {"clientId": rotate_id, "secret": "Rotate"}, "rotation": {"gracePeriod": "2s"}}),
    )
    .await;
    // Adoption is the connection's to grant: by default nothing is adopted.
    s.wait_condition("rotate", "Ready", "False", Some("AdoptionNotAllowed")).await;
    s.set_limits(json!({"adoption": {"clientIds": [keep_id, rotate_id]}})).await;
    // Keeping the current secret hands it to the namespace: that needs its own permission.
    s.wait_condition("keep", "Ready", "False", Some("KeepSecretNotAllowed")).await;
    assert!(s.secret("keep").await.is_none(), "nothing written for a refused adoption");
    s.set_limits(json!({"adoption": {"clientIds": [keep_id, rotate_id], "allowKeepSecret": true}})).await;
    let kept = s.wait_ready("keep").await;
    assert_eq!(kept.status.unwrap().client_id.as_deref(), Some(keep_id.as_str()), "no new client");
    assert_eq!(s.secret("keep").await.unwrap()["MEDPLUM_CLIENT_SECRET"], keep_secret, "Keep: the existing secret");
    assert_eq!(s.tagged_clients("keep").await.len(), 1, "tagged");
    let membership = s.memberships_of(&keep_id).await.remove(0);
    assert_eq!(
        membership["access"][0]["policy"]["reference"],
        format!("AccessPolicy/{policy_id}"),
        "broad access narrowed to the declared policy"
    );

    s.wait_ready("rotate").await;
    let rotated = s.secret("rotate").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    assert_ne!(rotated, rotate_secret, "Rotate: a new secret");
    assert!(s.token_works(&rotate_id, &rotated).await);
    eventually(Duration::from_secs(30), "the legacy secret retired after the grace period", || async {
        (!s.token_works(&rotate_id, &rotate_secret).await).then_some(())
    })
    .await;
    s.expect_events("rotate", &["Adopted"]).await;
}

#[tokio::test]
async fn connection_and_namespace_deletion_clean_up_without_hanging() {
    let s = Setup::new("ca-ns", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    s.create_client("first", json!({"access": access("reader")})).await;
    s.create_client("second", json!({"access": access("reader")})).await;
    let first_id = s.wait_ready("first").await.status.unwrap().client_id.unwrap();
    let second_id = s.wait_ready("second").await.status.unwrap().client_id.unwrap();

    // The connection stays while resources use it, and says so.
    let connections: Api<MedplumConnection> = Api::namespaced(s.client.clone(), &s.ns.name);
    connections.delete("default", &Default::default()).await.unwrap();
    let in_use = eventually(WAIT, "connection InUse", || async {
        let c = connections.get("default").await.ok()?;
        let ready = c.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "InUse").then_some(ready.message)
    })
    .await;
    println!("connection deletion: {in_use:?}");
    assert!(in_use.contains("ClientApplication"));
    s.delete_client_resource("first").await;
    assert_eq!(s.read_client(&first_id).await.0, 410, "cleaned up through the connection being deleted");

    // Deleting the namespace: the ClientApplication is cleaned up in Medplum, then everything goes.
    let started = Instant::now();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(s.client.clone());
    namespaces.delete(&s.ns.name, &Default::default()).await.unwrap();
    eventually(Duration::from_secs(90), "namespace deleted", || async {
        namespaces.get_opt(&s.ns.name).await.unwrap().is_none().then_some(())
    })
    .await;
    println!("figure: namespace with a ClientApplication and its connection deleted in {:?}", started.elapsed());
    assert_eq!(s.read_client(&second_id).await.0, 410, "the last client was deleted from Medplum too");
}
