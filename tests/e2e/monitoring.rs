//! The chart's alerts and dashboard, proven with the tools that consume them: promtool checks and
//! unit-tests the rules (`hack/alerts/alerts_test.yaml`) and lints a live operator's `/metrics`, and
//! every metric the alerts and the dashboard name must exist on that operator.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use crate::support::fixtures::{Setup, WAIT};
use crate::support::{Operator, eventually, tools};

fn run_promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(tools::built_by("hack/alerts/build.sh"))
        .args(args)
        .current_dir(tools::repo(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn alerts_file() -> String {
    std::fs::read_to_string(tools::repo("charts/medplum-operator/files/alerts.yaml")).unwrap()
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(tools::repo("charts/medplum-operator/files/dashboard.json")).unwrap())
        .unwrap()
}

/// The operator's metric names in a PromQL text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("medplum_operator_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn the_alerts_pass_promtools_checks_and_unit_tests() {
    let (ok, output) = run_promtool(&["check", "rules", "charts/medplum-operator/files/alerts.yaml"], None);
    assert!(ok, "{output}");
    let (ok, output) = run_promtool(&["test", "rules", "hack/alerts/alerts_test.yaml"], None);
    assert!(ok, "{output}");
    let rules: serde_yaml::Value = serde_yaml::from_str(&alerts_file()).unwrap();
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let alert = rule["alert"].as_str().unwrap();
        for annotation in ["summary", "description", "runbook"] {
            assert!(rule["annotations"][annotation].as_str().is_some_and(|t| !t.is_empty()), "{alert}: {annotation}");
        }
        let tests = std::fs::read_to_string(tools::repo("hack/alerts/alerts_test.yaml")).unwrap();
        assert!(tests.contains(&format!("alertname: {alert}\n        exp_alerts:")), "{alert}: a test that it fires");
    }
}

#[test]
fn the_chart_carries_the_alerts_and_the_dashboard_unchanged() {
    let sets = ["metrics.prometheusRule.enabled=true", "metrics.dashboard.enabled=true"];
    let rule = tools::helm_template("ci", "monitoring", &sets, Some("templates/prometheusrule.yaml"));
    let rule: serde_yaml::Value = serde_yaml::from_str(&rule).unwrap();
    let file: serde_yaml::Value = serde_yaml::from_str(&alerts_file()).unwrap();
    assert_eq!(rule["spec"], file, "the PrometheusRule's spec is files/alerts.yaml");
    let map = tools::helm_template("ci", "monitoring", &sets, Some("templates/dashboard.yaml"));
    let map: serde_yaml::Value = serde_yaml::from_str(&map).unwrap();
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1", "the sidecar's label");
    let rendered: Value = serde_json::from_str(map["data"]["medplum-operator.json"].as_str().unwrap()).unwrap();
    assert_eq!(rendered, dashboard());
    // Panels Grafana can lay out and query: unique ids, a place on the grid, a query each.
    let panels = dashboard()["panels"].as_array().unwrap().clone();
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "unique panel ids");
    for panel in &panels {
        let title = panel["title"].as_str().unwrap();
        assert!(panel["gridPos"]["w"].as_i64().is_some_and(|w| (1..=24).contains(&w)), "{title}: gridPos");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()), "{title}: queries");
    }
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_name_exists_on_a_live_operator() {
    let s = Setup::new("monitoring", &[], json!({})).await;
    let operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    // A restart target whose rollout cannot finish (its pod fits no node): the rotation waits for it.
    let stuck: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "stuck"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "stuck"}},
                 "template": {"metadata": {"labels": {"app": "stuck"}},
                              "spec": {"nodeSelector": {"medplum-operator-test/nowhere": "true"},
                                       "containers": [{"name": "app", "image": "example.org/app:1",
                                                       "envFrom": [{"secretRef": {"name": "app"}}]}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns.name).create(&PostParams::default(), &stuck).await.unwrap();
    let rotation =
        json!({"interval": "720h", "gracePeriod": "30s", "restartTargets": [{"kind": "Deployment", "name": "stuck"}]});
    s.create_client("app", json!({"access": [{"policyRef": {"name": "reader"}}], "rotation": rotation})).await;
    s.wait_ready("app").await;
    // Not Ready for a reason, and a rotation in progress, so that their series exist too.
    s.create_secret("someone-elses", &[("token", "theirs")]).await;
    s.create_client(
        "refused",
        json!({"access": [{"policyRef": {"name": "reader"}}], "secret": {"name": "someone-elses"}}),
    )
    .await;
    s.annotate("app", "medplum.com/rotate", "1").await;
    s.wait_condition("app", "Rotating", "True", Some("WaitingForRollout")).await;
    let text = eventually(WAIT, "a refusal and a rotation in progress on /metrics", || async {
        let text = operator.metrics().await;
        let series = ["medplum_operator_rollout_waiting_since_seconds{", "medplum_operator_not_ready_objects{"];
        series.iter().all(|s| text.contains(s)).then_some(text)
    })
    .await;
    // promtool lints the classic text format; in OpenMetrics a counter's HELP names its family,
    // without `_total`, which promtool reports as missing help text.
    let (_, lint) = run_promtool(&["check", "metrics"], Some(&text));
    let problems: Vec<&str> = lint
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let family = l.strip_suffix("_total no help text");
            family.is_none_or(|f| !text.contains(&format!("# HELP {f} ")))
        })
        .collect();
    assert!(problems.is_empty(), "promtool check metrics: {problems:?}");

    // A name exists when a sample or a family of the exposition carries it.
    let exposed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ").or(Some(l)))
        .filter_map(|l| l.split([' ', '{']).next())
        .map(str::to_string)
        .collect();
    let exists = |name: &str| {
        exposed.contains(name)
            || ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| exposed.contains(base)))
    };
    let dashboard_text = dashboard().to_string();
    let mut named = metric_names(&alerts_file());
    named.extend(metric_names(&dashboard_text));
    let missing: Vec<&String> = named.iter().filter(|n| !exists(n)).collect();
    assert!(missing.is_empty(), "named by the alerts or the dashboard, not on /metrics: {missing:?}");
    assert!(named.len() >= 15, "{named:?}");
    assert_eq!(operator.metric("medplum_operator_leader").await, 1.0, "the operator that runs the controllers leads");
    println!("figure: {} metrics named by the alerts and the dashboard, all on a live /metrics", named.len());
}
