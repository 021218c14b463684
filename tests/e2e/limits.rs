//! Medplum's rate limits, on whichever target enforces them: the test server always, a real Medplum
//! when it runs with `rateLimitsEnabled` (`hack/test.sh --real-medplum` restarts the kit's server so
//! for these tests after the main suite). A project's FHIR quota is lowered the way a Medplum admin
//! would, with its `userFhirQuota` system setting, so that windows fill within seconds.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::support::fixtures::{Setup, TAG_SYSTEM};
use crate::support::medplum::Answer;
use crate::support::{MedplumTarget, Operator, ProjectAdmin, eventually, skip};

/// Lowers `project`'s FHIR quota per member to `units` a minute; false when the target does not
/// enforce quotas at all (a real Medplum with its rate limits off), which then says so.
async fn lower_quota(medplum: &MedplumTarget, admin: &ProjectAdmin, units: u32) -> bool {
    let sa = medplum.super_admin_token().await;
    let setting = json!([{"op": "add", "path": "/systemSetting",
                          "value": [{"name": "userFhirQuota", "valueInteger": units}]}]);
    medplum.http.patch(&format!("fhir/R4/Project/{}", admin.project_id), &sa, &setting).await.expect(200);
    let token = medplum.http.token(&admin.client_id, &admin.client_secret).await;
    let probe = medplum.http.get("fhir/R4/AccessPolicy?_count=1", &token).await.expect(200);
    if quota_left(&probe).is_none() {
        skip(
            "this Medplum enforces no FHIR quota (rate limits off); hack/test.sh --real-medplum runs these tests again with them on",
        );
        return false;
    }
    true
}

/// What the answer's `RateLimit` header says is left of the caller's FHIR quota.
fn quota_left(answer: &Answer) -> Option<i64> {
    answer.headers.get_all("ratelimit").iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        let rest = v.strip_prefix("\"fhirInteractions\";r=")?;
        rest.split(';').next()?.parse().ok()
    })
}

/// The seconds to the window's end that the answer's FHIR quota header names.
fn window_seconds(answer: &Answer) -> Option<u64> {
    answer
        .headers
        .get_all("ratelimit")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.starts_with("\"fhirInteractions\"").then(|| v.rsplit_once(";t=")?.1.parse().ok()).flatten())
}

/// What each interaction the operator makes costs, as its pacing counts it (`Cost::of`): read 1,
/// search 20 (system-level too), write 100, a conditional create 120; the admin API none.
#[tokio::test]
async fn quota_units_are_charged_as_the_operator_counts_them() {
    let medplum = MedplumTarget::start().await;
    let admin = medplum.new_project("limits-costs").await;
    if !lower_quota(&medplum, &admin, 10_000).await {
        return;
    }
    let http = &medplum.http;
    let token = http.token(&admin.client_id, &admin.client_secret).await;
    let mut left = quota_left(&http.get("fhir/R4/AccessPolicy?_count=1", &token).await.expect(200)).unwrap();
    let mut charged = Vec::new();
    let mut cost_of = |what: &str, answer: Answer| {
        let now = quota_left(&answer).unwrap_or_else(|| panic!("{what}: no FHIR quota header"));
        let seconds = window_seconds(&answer).unwrap();
        assert!((1..=60).contains(&seconds), "{what}: t={seconds}");
        charged.push((what.to_string(), left - now));
        left = now;
        answer
    };
    let policy = json!({"resourceType": "AccessPolicy", "name": "costs", "resource": [{"resourceType": "Patient"}]});
    let created = cost_of("create", http.post("fhir/R4/AccessPolicy", &token, &policy).await.expect(201)).json();
    let id = created["id"].as_str().unwrap();
    cost_of("read", http.get(&format!("fhir/R4/AccessPolicy/{id}"), &token).await.expect(200));
    cost_of("search", http.get("fhir/R4/AccessPolicy?name=costs", &token).await.expect(200));
    let project = format!("_project={}", admin.project_id);
    let system = format!("fhir/R4?_type=ClientApplication,ProjectMembership,AccessPolicy&{project}");
    cost_of("system-level search", http.get(&system, &token).await.expect(200));
    let mut renamed = created.clone();
    renamed["name"] = json!("costs, renamed");
    let update = http
        .request(reqwest::Method::PUT, &format!("fhir/R4/AccessPolicy/{id}"), Some(&token))
        .header("content-type", "application/fhir+json")
        .header("if-match", format!("W/\"{}\"", created["meta"]["versionId"].as_str().unwrap()))
        .json(&renamed);
    cost_of("update", http.send(update).await.expect(200));
    let tag = json!([{"system": TAG_SYSTEM, "code": "AccessPolicy/limits/conditional"}]);
    let conditional = http
        .request(reqwest::Method::POST, "fhir/R4/AccessPolicy", Some(&token))
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", format!("_tag={TAG_SYSTEM}|AccessPolicy/limits/conditional"))
        .json(&json!({"resourceType": "AccessPolicy", "name": "c", "meta": {"tag": tag},
                      "resource": [{"resourceType": "Patient"}]}));
    cost_of("conditional create", http.send(conditional).await.expect(201));
    let invite = json!({"resourceType": "Practitioner", "firstName": "Quota", "lastName": "Probe",
                        "email": format!("quota-{}@example.org", crate::support::suffix()), "sendEmail": false});
    let invited = http
        .send(
            http.request(reqwest::Method::POST, &format!("admin/projects/{}/invite", admin.project_id), Some(&token))
                .json(&invite),
        )
        .await
        .expect(200);
    assert_eq!(quota_left(&invited), None, "the admin API is outside the FHIR quota");
    cost_of("read after the invite", http.get(&format!("fhir/R4/AccessPolicy/{id}"), &token).await.expect(200));
    println!("figure: FHIR quota units charged: {charged:?}");
    let expected = [
        ("create", 100),
        ("read", 1),
        ("search", 20),
        ("system-level search", 20),
        ("update", 100),
        ("conditional create", 120),
        ("read after the invite", 1),
    ];
    let expected: Vec<(String, i64)> = expected.iter().map(|(w, c)| (w.to_string(), *c)).collect();
    assert_eq!(charged, expected);
}

/// Declares more clients than a quota window allows and lets the operator make them: it waits for
/// the next window where the quota runs out, and Medplum never answers 429.
#[tokio::test]
async fn the_operator_stays_within_a_small_quota() {
    const CLIENTS: usize = 6;
    // Each client and its policy take three writes (300 units); the sweep and the change searches
    // add a few hundred a minute: the whole takes two windows at least.
    const QUOTA: u32 = 1_500;
    let s = Setup::new("limits-pacing", &[], json!({})).await;
    if !lower_quota(&s.medplum, &s.admin, QUOTA).await {
        return;
    }
    let s = &s;
    futures::stream::iter(0..CLIENTS)
        .for_each_concurrent(4, |i| async move {
            s.create_policy(
                &format!("policy-{i}"),
                json!({"resources": [{"resourceType": "Patient", "readonly": true}]}),
            )
            .await;
            s.create_client(
                &format!("client-{i}"),
                json!({"access": [{"policyRef": {"name": format!("policy-{i}")}}]}),
            )
            .await;
        })
        .await;
    let started = Instant::now();
    let operator = Operator::start(&s.ns.name, &[]).await;
    for i in 0..CLIENTS {
        eventually(Duration::from_secs(240), &format!("client-{i} Ready"), || async {
            let client = s.clients().get(&format!("client-{i}")).await.ok()?;
            let ready = client.status?.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        })
        .await;
    }
    let metrics = operator.metrics().await;
    let sum = |prefix: &str, with: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(with))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let refused = sum("medplum_operator_medplum_requests_total{", "status=\"429\"") as u64;
    let waits = sum("medplum_operator_rate_limit_waits_total{", "limit=\"fhir_quota\"") as u64;
    let waited = sum("medplum_operator_rate_limit_wait_seconds_total{", "limit=\"fhir_quota\"");
    println!(
        "figure: {CLIENTS} clients with their policies under a quota of {QUOTA} units a minute: all Ready in {:.1} s, \
         {waits} requests held back ({waited:.1} s in all), {refused} answered 429",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(refused, 0, "Medplum refused requests: {metrics}");
    assert!(waits >= 1, "the quota ran out within the first window, so a request waited for the next");
    assert!(!s.public_text().await.contains("MedplumRateLimited"), "no resource reported a rate limit");
}
