//! Running it like a production operator: two replicas with leader election, failover after a kill,
//! graceful shutdown, metrics.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::Api;
use serde_json::json;

use crate::support::fixtures::{Setup, WAIT};
use crate::support::{Operator, eventually};

async fn holder(s: &Setup, lease: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(s.client.clone(), &s.ns.name).get_opt(lease).await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

#[tokio::test]
async fn a_standby_takes_over_within_the_lease_duration_and_nothing_is_written_twice() {
    let s = Setup::new("ha", &[], json!({})).await;
    let ns = s.ns.name.clone();
    let args = crate::support::operator::fast_leader_election(&ns, "ha");
    let mut first = Operator::spawn(&ns, &args, &[("POD_NAME", "replica-a")]).await;
    first.wait_ready().await;
    eventually(WAIT, "replica-a leads", || async {
        (holder(&s, "ha").await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let mut second = Operator::spawn(&ns, &args, &[("POD_NAME", "replica-b")]).await;
    second.wait_ready().await;

    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    s.create_client("first", json!({"access": [{"policyRef": {"name": "reader"}}]})).await;
    s.wait_ready("first").await;
    assert_eq!(second.metric("medplum_operator_reconciliations_total").await, 0.0, "the standby does nothing");
    assert!(second.logs().contains("standing by"));
    let secret_version = s.secret_object("first").await.unwrap().resource_version();
    let stats_before = if s.medplum.is_test_server() { s.medplum.stats().await } else { Default::default() };

    first.kill().await;
    let killed = Instant::now();
    eventually(Duration::from_secs(30), "replica-b takes over", || async {
        (holder(&s, "ha").await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    println!("figure: leader killed → standby leads after {takeover:?} (lease duration 6 s, retry period 1 s)");
    assert!(takeover <= Duration::from_secs(8), "within the lease duration and a retry period: {takeover:?}");

    s.create_client("second", json!({"access": [{"policyRef": {"name": "reader"}}]})).await;
    s.wait_ready("second").await;
    assert_eq!(s.tagged_clients("first").await.len(), 1);
    assert_eq!(s.tagged_clients("second").await.len(), 1);
    assert_eq!(
        s.secret_object("first").await.unwrap().resource_version(),
        secret_version,
        "the first Secret was not written again"
    );
    if s.medplum.is_test_server() {
        let after = s.medplum.stats().await;
        let grown =
            |route: &str| after.get(route).copied().unwrap_or(0) - stats_before.get(route).copied().unwrap_or(0);
        assert_eq!(grown("POST /fhir/R4/ClientApplication"), 1, "only the second client was created");
        assert_eq!(grown("POST /fhir/R4/ProjectMembership"), 1);
        assert_eq!(grown("PUT /fhir/R4/ClientApplication/{id}"), 0, "nothing was rewritten");
    }

    // A graceful stop finishes, releases the lease at once, and exits 0.
    let stopping = Instant::now();
    let status = second.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "graceful stop: {status:?}");
    println!("figure: SIGTERM → exit in {:?}", stopping.elapsed());
    assert_eq!(holder(&s, "ha").await, None, "the lease was released");
    assert!(second.logs().contains("released leadership"));
}

#[tokio::test]
async fn metrics_follow_prometheus_conventions_and_carry_no_secret() {
    let s = Setup::new("metrics", &[], json!({})).await;
    let operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    s.create_client(
        "app",
        json!({"access": [{"policyRef": {"name": "reader"}}], "rotation": {"interval": "720h", "gracePeriod": "1s"}}),
    )
    .await;
    s.wait_ready("app").await;
    s.annotate("app", "medplum.com/rotate", "1").await;
    eventually(WAIT, "a rotation completed", || async {
        (operator.metric("medplum_operator_rotations_total").await >= 1.0).then_some(())
    })
    .await;
    let text = operator.metrics().await;
    for family in [
        "medplum_operator_reconciliations_total{kind=\"ClientApplication\",outcome=\"success\"}",
        "medplum_operator_reconcile_duration_seconds_bucket{le=",
        "medplum_operator_medplum_requests_total{operation=\"create ClientApplication\",status=\"201\"}",
        "medplum_operator_medplum_request_duration_seconds_count{operation=",
        "medplum_operator_token_cache_hits_total",
        "medplum_operator_token_refreshes_total",
        "medplum_operator_rotations_total",
        "medplum_operator_rotation_failures_total",
        &format!("medplum_operator_seconds_until_rotation{{namespace=\"{}\",name=\"app\"}}", s.ns.name),
        "medplum_operator_managed_objects{kind=\"ClientApplication\"} 1",
        "medplum_operator_ready_objects{kind=\"AccessPolicy\"} 1",
        &format!(
            "medplum_operator_connection_ready{{kind=\"MedplumConnection\",namespace=\"{}\",name=\"default\"}} 1",
            s.ns.name
        ),
        "medplum_operator_kubernetes_requests_total{verb=\"patch\",resource=\"secrets\"}",
    ] {
        assert!(text.contains(family), "{family} missing from /metrics");
    }
    let until: f64 = text
        .lines()
        .find(|l| l.starts_with("medplum_operator_seconds_until_rotation"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!((719.0 * 3600.0..=720.0 * 3600.0).contains(&until), "about 720h to go: {until}");
    let secret = s.secret("app").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    assert!(!text.contains(&secret) && !text.contains(&s.admin.client_secret));
    // Label values are bounded: kinds, outcomes, operations, status codes, object names; no ids, no URLs.
    let client_id = s.clients().get("app").await.unwrap().status.unwrap().client_id.unwrap();
    assert!(!text.contains(&client_id) && !text.contains(s.medplum.base_url()));
}
