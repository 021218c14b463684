//! A benchmark, not a pass/fail test: memory and request counts with many ClientApplications.
//! Run with `cargo test --test e2e -- --ignored --nocapture scale`; it prints figures.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::ListParams;
use serde_json::json;

use crate::support::fixtures::Setup;
use crate::support::{Operator, eventually};

fn requests(metrics: &str, prefix: &str) -> f64 {
    metrics.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test]
#[ignore = "benchmark: run explicitly"]
async fn scale_one_thousand_clients() {
    let count: usize = std::env::var("SCALE_CLIENTS").ok().and_then(|c| c.parse().ok()).unwrap_or(1000);
    let s = Setup::new(
        "scale",
        &["--auth-rate-limit", "1000000", "--fhir-quota", "1000000000", "--default-rate-limit", "1000000"],
        json!({}),
    )
    .await;
    let resync = Duration::from_secs(60);
    let operator = Operator::start(&s.ns.name, &["--resync-interval", "60s"]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = operator.rss_kib();
    println!("figure: operator RSS at idle (one connection, one policy): {} MiB", idle / 1024);

    let started = Instant::now();
    futures::stream::iter(0..count)
        .for_each_concurrent(16, |i| {
            let s = &s;
            async move {
                s.create_client(&format!("client-{i:04}"), json!({"access": [{"policyRef": {"name": "reader"}}]}))
                    .await;
            }
        })
        .await;
    let api = s.clients();
    eventually(Duration::from_secs(1800), "all clients Ready", || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|c| {
                c.status
                    .as_ref()
                    .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        (ready == count).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    println!("figure: {count} ClientApplications Ready in {elapsed:?} ({:.1}/s)", count as f64 / elapsed.as_secs_f64());
    println!("figure: operator RSS with {count} clients: {} MiB", operator.rss_kib() / 1024);

    // One full resync in steady state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (metrics_before, stats_before) = (operator.metrics().await, s.medplum.stats().await);
    tokio::time::sleep(resync).await;
    let (metrics_after, stats_after) = (operator.metrics().await, s.medplum.stats().await);
    let medplum: u64 = stats_after.iter().map(|(k, v)| v - stats_before.get(k).copied().unwrap_or(0)).sum();
    let writes: u64 = stats_after
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(k, v)| v - stats_before.get(k).copied().unwrap_or(0))
        .sum();
    let kube = requests(&metrics_after, "medplum_operator_kubernetes_requests_total")
        - requests(&metrics_before, "medplum_operator_kubernetes_requests_total");
    println!(
        "figure: one {resync:?} resync with {count} clients: {medplum} Medplum requests ({writes} writes), {kube} Kubernetes requests"
    );
    println!("figure: operator RSS after a resync: {} MiB", operator.rss_kib() / 1024);
}
