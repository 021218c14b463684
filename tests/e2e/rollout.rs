//! Rotation against real rollouts: the local control plane schedules pods onto kwok's fake nodes,
//! where they turn Ready after a delay (`hack/controlplane/kwok-stages.yaml`), and the real
//! Deployment, StatefulSet and DaemonSet controllers replace them. The previous secret must keep
//! working until every pod of the new template is Ready and the grace period has passed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::fixtures::{Setup, WAIT};
use crate::support::{Operator, eventually};
use medplum_operator::crd::ClientApplication;

const ISSUED: &str = "medplum.com/credentials-issued-at";

/// Applies a workload of `kind` whose pods read the Secret `secret` and turn Ready `ready_after` after
/// they are scheduled; `spec` is merged into its spec (the whole of it, each time: server-side apply
/// drops what an apply no longer names).
async fn workload(s: &Setup, kind: &str, name: &str, secret: &str, ready_after: &str, spec: Value) {
    let template = json!({
        "metadata": {"labels": {"app": name}, "annotations": {"medplum.test/ready-after": ready_after}},
        "spec": {"containers": [{"name": "app", "image": "example.org/app:1", "envFrom": [{"secretRef": {"name": secret}}]}]},
    });
    let mut body = json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name},
                          "spec": {"selector": {"matchLabels": {"app": name}}, "template": template}});
    merge(&mut body["spec"], spec);
    let params = PatchParams::apply("tests").force();
    let patch = Patch::Apply(&body);
    match kind {
        "Deployment" => drop(
            Api::<Deployment>::namespaced(s.client.clone(), &s.ns.name).patch(name, &params, &patch).await.unwrap(),
        ),
        "StatefulSet" => drop(
            Api::<StatefulSet>::namespaced(s.client.clone(), &s.ns.name).patch(name, &params, &patch).await.unwrap(),
        ),
        _ => {
            drop(Api::<DaemonSet>::namespaced(s.client.clone(), &s.ns.name).patch(name, &params, &patch).await.unwrap())
        }
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// The pods of workload `app`: `(issued-at of their template, Ready)`.
async fn pods(s: &Setup, app: &str) -> Vec<(Option<String>, bool)> {
    let list = Api::<Pod>::namespaced(s.client.clone(), &s.ns.name)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap();
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let issued = p.metadata.annotations.as_ref().and_then(|a| a.get(ISSUED).cloned());
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            (issued, ready)
        })
        .collect()
}

/// `(Ready, all)` pods of the template for the credentials issued at `issued`, and pods of other templates.
fn count(pods: &[(Option<String>, bool)], issued: &str) -> (usize, usize, usize) {
    let new: Vec<_> = pods.iter().filter(|(i, _)| i.as_deref() == Some(issued)).collect();
    (new.iter().filter(|(_, ready)| *ready).count(), new.len(), pods.len() - new.len())
}

async fn rollout(s: &Setup, app: &str, issued: &str) -> (usize, usize, usize) {
    count(&pods(s, app).await, issued)
}

/// The Secret's current client secret and when it was issued.
async fn credentials(s: &Setup, name: &str) -> (String, String) {
    let secret = s.secret_object(name).await.unwrap();
    let issued = secret.metadata.annotations.unwrap()["medplum.com/issued-at"].clone();
    let value = s.secret(name).await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    (value, issued)
}

fn rotating(ca: &ClientApplication) -> (String, String) {
    let c = ca.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Rotating").unwrap();
    (c.reason.clone(), c.message.clone())
}

async fn wait_rotating(s: &Setup, name: &str, reason: &str, within: Duration) -> ClientApplication {
    let status = if reason == "Idle" { "False" } else { "True" };
    s.wait_condition_within(within, name, "Rotating", status, Some(reason)).await
}

/// Every workload's pods are of the template for `issued`, all Ready.
async fn all_rolled_out(s: &Setup, apps: &[(&str, usize)], issued: &str) -> bool {
    for (app, replicas) in apps {
        let (ready, new, old) = rollout(s, app, issued).await;
        if (ready, new, old) != (*replicas, *replicas, 0) {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn rotation_waits_for_real_rollouts_of_deployments_statefulsets_and_daemonsets() {
    let s = Setup::new("rollout", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    workload(&s, "Deployment", "web", "app", "3s", json!({"replicas": 3})).await;
    workload(
        &s,
        "StatefulSet",
        "db",
        "app",
        "2s",
        json!({"replicas": 2, "serviceName": "db", "podManagementPolicy": "Parallel"}),
    )
    .await;
    workload(&s, "DaemonSet", "agent", "app", "2s", json!({})).await;
    let apps = [("web", 3), ("db", 2), ("agent", 2)];
    s.create_client("app", json!({"access": [{"policyRef": {"name": "reader"}}],
        "rotation": {"gracePeriod": "5s", "restartTargets": [
            {"kind": "Deployment", "name": "web"}, {"kind": "StatefulSet", "name": "db"}, {"kind": "DaemonSet", "name": "agent"}]}}))
    .await;
    let id = s.wait_ready("app").await.status.unwrap().client_id.unwrap();
    let (old, first_issue) = credentials(&s, "app").await;
    eventually(Duration::from_secs(90), "first rollout onto the Secret", || async {
        all_rolled_out(&s, &apps, &first_issue).await.then_some(())
    })
    .await;
    wait_rotating(&s, "app", "Idle", WAIT).await;

    s.annotate("app", "medplum.com/rotate", "now").await;
    let started = Instant::now();
    let mut timeline: Vec<String> = Vec::new();
    let (mut rolled_out_at, mut retired_at, mut issued) = (None, None, None);
    while started.elapsed() < Duration::from_secs(150) {
        let t = started.elapsed().as_secs_f64();
        // Pods first, then the Secret: a pod's template is never newer than the Secret read after it.
        let mut listed = BTreeMap::new();
        for (app, _) in apps {
            listed.insert(app, pods(&s, app).await);
        }
        let old_works = s.token_works(&id, &old).await;
        let (current, issued_now) = credentials(&s, "app").await;
        let switched = current != old;
        if switched {
            issued.get_or_insert(issued_now.clone());
        }
        let progress: BTreeMap<_, _> = listed.iter().map(|(app, pods)| (*app, count(pods, &issued_now))).collect();
        let done = switched && apps.iter().all(|(app, replicas)| progress[app] == (*replicas, *replicas, 0));
        if done && rolled_out_at.is_none() {
            rolled_out_at = Some(t);
        }
        let line = format!(
            "Secret {}, previous secret {}, {}",
            if switched { "has the new secret" } else { "has the previous secret" },
            if old_works { "works" } else { "refused" },
            progress
                .iter()
                .map(|(app, (r, n, o))| format!("{app} {r}/{n} new Ready, {o} old"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if timeline.last().is_none_or(|l| !l.ends_with(&line)) {
            timeline.push(format!("{t:6.1} s  {line}"));
        }
        if !old_works {
            assert!(
                switched && done,
                "the previous secret stopped working before every pod of the new template was Ready:\n{}",
                timeline.join("\n")
            );
            retired_at.get_or_insert((t, jiff::Timestamp::now()));
        } else {
            assert!(retired_at.is_none(), "a retired secret works again:\n{}", timeline.join("\n"));
        }
        if retired_at.is_some() && rotating(&s.clients().get("app").await.unwrap()).0 == "Idle" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    println!("rotation timeline (grace period 5 s):\n{}", timeline.join("\n"));
    let rolled_out_at = rolled_out_at.expect("rolled out");
    let (retired_at, retired_wall) = retired_at.expect("previous secret retired");
    println!(
        "figure: rollout of 3 workloads (7 pods) done {rolled_out_at:.1} s after the rotation request; previous secret refused at {retired_at:.1} s"
    );
    // Retired only once the grace period, counted from when the new secret was issued, had passed.
    let issued: jiff::Timestamp = issued.unwrap().parse().unwrap();
    let since_issue = retired_wall.duration_since(issued).as_secs_f64();
    assert!(
        since_issue >= 5.0 - 1.0,
        "retired {since_issue:.1} s after the new secret was issued, before the 5 s grace"
    );
    let (new, _) = credentials(&s, "app").await;
    assert!(s.token_works(&id, &new).await);
}

#[tokio::test]
async fn a_stuck_rollout_keeps_the_previous_secret_working_and_says_why() {
    let s = Setup::new("stuck", &[], json!({})).await;
    let operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    workload(&s, "Deployment", "web", "app", "1s", json!({"replicas": 2, "progressDeadlineSeconds": 6})).await;
    s.create_client(
        "app",
        json!({"access": [{"policyRef": {"name": "reader"}}],
        "rotation": {"gracePeriod": "1s", "restartTargets": [{"kind": "Deployment", "name": "web"}]}}),
    )
    .await;
    let id = s.wait_ready("app").await.status.unwrap().client_id.unwrap();
    let (old, first_issue) = credentials(&s, "app").await;
    eventually(Duration::from_secs(60), "first rollout", || async {
        all_rolled_out(&s, &[("web", 2)], &first_issue).await.then_some(())
    })
    .await;
    wait_rotating(&s, "app", "Idle", WAIT).await;

    // A bad release: pods of the next template never become Ready. Then a rotation.
    let bad = json!({"replicas": 2, "progressDeadlineSeconds": 6,
                     "template": {"metadata": {"annotations": {"medplum.test/never-ready": "true"}}}});
    workload(&s, "Deployment", "web", "app", "1s", bad).await;
    s.annotate("app", "medplum.com/rotate", "now").await;
    let started = Instant::now();
    let stuck = wait_rotating(&s, "app", "RolloutStuck", Duration::from_secs(60)).await;
    let (_, message) = rotating(&stuck);
    println!("stuck after {:.1} s: Rotating RolloutStuck: {message}", started.elapsed().as_secs_f64());
    assert!(message.contains("Deployment/web") && message.contains("keeps working"), "{message}");
    s.expect_events("app", &["RolloutStuck"]).await;
    let metric = format!("medplum_operator_rollout_waiting_since_seconds{{namespace=\"{}\",name=\"app\"}}", s.ns.name);
    assert!(operator.metric(&metric).await > 0.0, "the metric says since when it waits");
    // Long past the grace period and the deadline, the consumers still running on it keep working.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, issued) = credentials(&s, "app").await;
    let (ready, new, running_old) = rollout(&s, "web", &issued).await;
    println!(
        "after {:.1} s: {ready}/{new} new pods Ready, {running_old} old pods running",
        started.elapsed().as_secs_f64()
    );
    assert!(running_old >= 1 && ready == 0);
    assert!(s.token_works(&id, &old).await, "the previous secret still works while the rollout is stuck");
    assert_eq!(rotating(&s.clients().get("app").await.unwrap()).0, "RolloutStuck");

    // The release is fixed: the rollout finishes, and after it the previous secret is retired.
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    let fix = json!([{"op": "remove", "path": "/spec/template/metadata/annotations/medplum.test~1never-ready"}]);
    deployments
        .patch("web", &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value(fix).unwrap()))
        .await
        .unwrap();
    let fixed = Instant::now();
    wait_rotating(&s, "app", "Idle", Duration::from_secs(90)).await;
    assert!(!s.token_works(&id, &old).await, "retired once the rollout finished");
    println!(
        "figure: previous secret retired {:.1} s after the fix (rollout of 2 pods, 1 s grace)",
        fixed.elapsed().as_secs_f64()
    );
    assert_eq!(operator.metric(&metric).await, 0.0, "no longer waiting");
}

#[tokio::test]
async fn targets_deleted_scaled_to_zero_or_paused_mid_rotation() {
    let s = Setup::new("targets", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    for name in ["gone", "zero", "paused"] {
        workload(&s, "Deployment", name, "app", "6s", json!({"replicas": 1})).await;
    }
    s.create_client("app", json!({"access": [{"policyRef": {"name": "reader"}}],
        "rotation": {"gracePeriod": "1s", "restartTargets": [
            {"kind": "Deployment", "name": "gone"}, {"kind": "Deployment", "name": "zero"}, {"kind": "Deployment", "name": "paused"}]}}))
    .await;
    let id = s.wait_ready("app").await.status.unwrap().client_id.unwrap();
    let (_, first_issue) = credentials(&s, "app").await;
    eventually(Duration::from_secs(60), "first rollout", || async {
        all_rolled_out(&s, &[("gone", 1), ("zero", 1), ("paused", 1)], &first_issue).await.then_some(())
    })
    .await;
    wait_rotating(&s, "app", "Idle", WAIT).await;
    let (old, _) = credentials(&s, "app").await;

    s.annotate("app", "medplum.com/rotate", "now").await;
    wait_rotating(&s, "app", "WaitingForRollout", WAIT).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns.name);
    deployments.delete("gone", &DeleteParams::default()).await.unwrap();
    deployments.patch("zero", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}}))).await.unwrap();
    deployments
        .patch("paused", &PatchParams::default(), &Patch::Merge(json!({"spec": {"paused": true}})))
        .await
        .unwrap();
    let paused = wait_rotating(&s, "app", "RolloutPaused", Duration::from_secs(30)).await;
    println!("paused target: Rotating RolloutPaused: {}", rotating(&paused).1);
    s.expect_events("app", &["RolloutPaused"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.token_works(&id, &old).await, "a paused target keeps the previous secret working");

    deployments
        .patch("paused", &PatchParams::default(), &Patch::Merge(json!({"spec": {"paused": false}})))
        .await
        .unwrap();
    let resumed = Instant::now();
    wait_rotating(&s, "app", "Idle", Duration::from_secs(60)).await;
    println!(
        "figure: previous secret retired {:.1} s after the paused target was resumed",
        resumed.elapsed().as_secs_f64()
    );
    assert!(!s.token_works(&id, &old).await);
    let ca = s.clients().get("app").await.unwrap();
    assert!(ca.status.unwrap().conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
}
