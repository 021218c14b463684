//! Benchmarks, not pass/fail tests: they print figures and assert nothing about time. Run them with
//! `hack/bench.sh` (every target), or one at a time:
//! `OPERATOR_RUST_LOG=info cargo test --release --test e2e -- --ignored --nocapture bench_`.
//!
//! `bench_converge_against_the_floor` declares `BENCH_CLIENTS` (default 1,000) ClientApplications, each
//! with an AccessPolicy of its own, in one namespace, then starts the operator with
//! `--client-concurrency 4`. In the same run, against the same Medplum, the floor is a minimal client
//! making the same Medplum calls at the same concurrency: POST AccessPolicy, POST ClientApplication
//! (caller-chosen secret, tag), POST ProjectMembership, and one token request with the new
//! credentials. Then: steady state over one resync, drift-detection latency, and an operator
//! restarted on a backlog of as many new clients. With `BENCH_RATE_LIMITS=on` (a Medplum started with
//! its production limits) it also prints the minimum time those limits impose.
//!
//! `bench_memory_at_ten_thousand_objects` measures the operator's RSS with `BENCH_OBJECTS` (default
//! 10,000) ClientApplications, a tenth as many AccessPolicies and a tenth as many ProjectUsers.
//!
//! `bench_rotate_everything` converges `BENCH_CLIENTS` clients (grace period 10 s), then sets
//! `medplum.com/rotate-clients` on their connection and measures until every client's old secret is
//! retired, while `BENCH_CONSUMERS` (default 20) polling consumers keep using their Secrets. With rate
//! limits on, the minimum is what the limits impose on the rotation's own calls plus the last
//! client's grace period.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams, PostParams};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::fixtures::{Setup, TAG_SYSTEM};
use crate::support::medplum::Http;
use crate::support::{MedplumTarget, Operator, ProjectAdmin, eventually};
use medplum_operator::crd::{AccessPolicy, ProjectUser};

/// Medplum's limits with `rateLimitsEnabled`: 160 auth requests a minute per IP, 50,000 FHIR units a
/// minute per membership (write 100, search 20, read 1).
const AUTH_PER_MINUTE: f64 = 160.0;
const FHIR_UNITS_PER_MINUTE: f64 = 50_000.0;
const CONCURRENCY: usize = 4;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rate_limits_on() -> bool {
    std::env::var("BENCH_RATE_LIMITS").is_ok_and(|v| v == "on")
}

/// Test-server flags: no limits unless the run is about limits (then Medplum's own).
fn test_server_args() -> Vec<&'static str> {
    if rate_limits_on() {
        vec!["--auth-rate-limit", "160", "--fhir-quota", "50000"]
    } else {
        vec!["--rate-limits-enabled", "false"]
    }
}

fn target_name(medplum: &MedplumTarget) -> String {
    let server = if medplum.is_test_server() { "Medplum test server" } else { "real Medplum 5.1.29" };
    format!("{server}, rate limits {}", if rate_limits_on() { "on" } else { "off" })
}

/// What one kind of run did.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// The Kubernetes writes any operator makes for a declared ClientApplication and its AccessPolicy once
/// their objects exist in Medplum, made directly the way the operator makes them: a finalizer on each
/// (JSON patch), the client's Secret and each one's Ready status (server-side apply), and a `Created`
/// Event for each. `namespace` holds the declared resources; nothing reconciles it.
struct KubeWrites<'a> {
    namespace: &'a Setup,
    tally: AtomicU64,
}

impl KubeWrites<'_> {
    async fn finalizer<K>(&self, api: kube::Api<K>, name: &str)
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let patch = json_patch::Patch(vec![json_patch::PatchOperation::Add(json_patch::AddOperation {
            path: "/metadata/finalizers".parse().unwrap(),
            value: json!(["medplum.com/cleanup"]),
        })]);
        let params = PatchParams { field_manager: Some("medplum-operator".into()), ..Default::default() };
        api.patch(name, &params, &Patch::Json::<()>(patch)).await.unwrap();
        self.tally.fetch_add(1, Ordering::Relaxed);
    }

    async fn ready<K>(&self, api: kube::Api<K>, name: &str)
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let status = json!({"apiVersion": "medplum.com/v1alpha1", "kind": K::kind(&()),
            "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True",
            "reason": "Reconciled", "message": "in Medplum as declared", "lastTransitionTime": now,
            "observedGeneration": 1}]}});
        api.patch_status(name, &PatchParams::apply("medplum-operator").force(), &Patch::Apply(&status)).await.unwrap();
        self.tally.fetch_add(1, Ordering::Relaxed);
    }

    async fn secret(&self, name: &str, client_id: &str, client_secret: &str) {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
            "stringData": {"MEDPLUM_CLIENT_ID": client_id, "MEDPLUM_CLIENT_SECRET": client_secret}});
        let api: kube::Api<Secret> = kube::Api::namespaced(self.namespace.client.clone(), &self.namespace.ns.name);
        api.patch(name, &PatchParams::apply("medplum-operator").force(), &Patch::Apply(&secret)).await.unwrap();
        self.tally.fetch_add(1, Ordering::Relaxed);
    }

    async fn created(&self, kind: &str, name: &str) {
        let namespace = &self.namespace.ns.name;
        let event: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}.{:016x}", rand::random::<u64>())},
            "eventTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "reportingController": "medplum-operator", "reportingInstance": "medplum-operator",
            "action": "Create", "reason": "Created", "type": "Normal", "note": format!("created {kind} in Medplum"),
            "regarding": {"apiVersion": "medplum.com/v1alpha1", "kind": kind, "name": name, "namespace": namespace}}))
        .unwrap();
        kube::Api::namespaced(self.namespace.client.clone(), namespace)
            .create(&PostParams::default(), &event)
            .await
            .unwrap();
        self.tally.fetch_add(1, Ordering::Relaxed);
    }
}

/// The floor: the Medplum calls that `n` clients need, made directly at `CONCURRENCY`, with one
/// token request per new client. A 429 ends that client's calls (it is counted, not retried). With
/// `kube`, each client's Kubernetes writes are made too, in the order an operator makes them.
async fn floor(
    http: &Http,
    admin: &ProjectAdmin,
    n: usize,
    prefix: &str,
    kube: Option<&KubeWrites<'_>>,
) -> (Duration, Tally) {
    let token = http.token(&admin.client_id, &admin.client_secret).await;
    let tally = Tally::default();
    let started = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (token, tally) = (&token, &tally);
            async move {
                let code = format!("ClientApplication/{prefix}/client-{i:05}");
                let tag = json!([{"system": TAG_SYSTEM, "code": code}]);
                let count = |answer: &crate::support::medplum::Answer| {
                    tally.requests.fetch_add(1, Ordering::Relaxed);
                    match answer.status.as_u16() {
                        200 | 201 => true,
                        429 => {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            false
                        }
                        _ => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            false
                        }
                    }
                };
                let (policy_name, client_name) = (format!("policy-{i:05}"), format!("client-{i:05}"));
                if let Some(kube) = kube {
                    kube.finalizer(kube.namespace.policies(), &policy_name).await;
                }
                let policy = json!({"resourceType": "AccessPolicy", "name": format!("{prefix}/policy-{i:05}"),
                    "meta": {"tag": [{"system": TAG_SYSTEM, "code": format!("AccessPolicy/{prefix}/policy-{i:05}")}]},
                    "resource": [{"resourceType": "Patient", "readonly": true}]});
                let answer = http.post("fhir/R4/AccessPolicy", token, &policy).await;
                if !count(&answer) {
                    return;
                }
                let policy_id = answer.json()["id"].as_str().unwrap().to_string();
                if let Some(kube) = kube {
                    kube.ready(kube.namespace.policies(), &policy_name).await;
                    kube.created("AccessPolicy", &policy_name).await;
                    kube.finalizer(kube.namespace.clients(), &client_name).await;
                }
                let secret = format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>());
                let client = json!({"resourceType": "ClientApplication", "name": code, "secret": secret,
                    "meta": {"tag": tag}});
                let answer = http.post("fhir/R4/ClientApplication", token, &client).await;
                if !count(&answer) {
                    return;
                }
                let client_id = answer.json()["id"].as_str().unwrap().to_string();
                let reference = format!("ClientApplication/{client_id}");
                let membership = json!({"resourceType": "ProjectMembership",
                    "project": {"reference": format!("Project/{}", admin.project_id)},
                    "user": {"reference": reference}, "profile": {"reference": reference},
                    "access": [{"policy": {"reference": format!("AccessPolicy/{policy_id}")}}],
                    "identifier": [{"system": TAG_SYSTEM, "value": code}]});
                if !count(&http.post("fhir/R4/ProjectMembership", token, &membership).await) {
                    return;
                }
                if let Some(kube) = kube {
                    kube.secret(&client_name, &client_id, &secret).await;
                }
                count(&http.token_request(&client_id, &secret).await);
                if let Some(kube) = kube {
                    kube.ready(kube.namespace.clients(), &client_name).await;
                    kube.created("ClientApplication", &client_name).await;
                }
            }
        })
        .await;
    (started.elapsed(), tally)
}

/// Sum of every sample of the metric families starting with `prefix` whose labels contain all of `with`.
fn sum(metrics: &str, prefix: &str, with: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |total, v| total + v)
}

/// Waits (at most two minutes) until the machine's cores are mostly idle, so that one measurement
/// does not pay for the cleanup of the one before it (a deleted namespace of thousands of objects).
async fn wait_until_quiet() {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let (busy, total) = busy_and_total();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (busy_after, total_after) = busy_and_total();
        if (busy_after - busy) / (total_after - total).max(1.0) < 0.15 {
            return;
        }
    }
}

/// The samples of a counter family, `labels=value` per line, largest first: where requests went.
fn breakdown(metrics: &str, family: &str) -> String {
    let mut samples: Vec<(f64, String)> = metrics
        .lines()
        .filter(|l| l.starts_with(family))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            let labels = labels.split_once('{')?.1.trim_end_matches('}');
            Some((value.parse().ok()?, labels.to_string()))
        })
        .filter(|(v, _)| *v > 0.0)
        .collect();
    samples.sort_by(|a, b| b.0.total_cmp(&a.0));
    samples.iter().map(|(v, l)| format!("{l}={v}")).collect::<Vec<_>>().join(", ")
}

/// The busy and the total time of all the machine's cores so far, in clock ticks (`/proc/stat`).
fn busy_and_total() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let idle = cpu.get(3).copied().unwrap_or(0.0) + cpu.get(4).copied().unwrap_or(0.0);
    let total: f64 = cpu.iter().sum();
    (total - idle, total)
}

/// What the machine's cores did during a run: the commands' CPU seconds and the cores' busy time.
struct CpuReading {
    by_command: std::collections::BTreeMap<String, f64>,
    busy_and_total: (f64, f64),
}

fn cpu_reading() -> CpuReading {
    CpuReading { by_command: cpu_seconds_by_command(), busy_and_total: busy_and_total() }
}

/// Since `before`: how busy the cores were (a run that kept them busy all along was bound by CPU: no
/// client of the same servers could have been faster on this machine than busy time / cores), and
/// the commands that used the most.
fn cpu_used(before: &CpuReading) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
    let (busy, total) = busy_and_total();
    let (busy, total) = (busy - before.busy_and_total.0, total - before.busy_and_total.1);
    let busy_core_seconds = busy / clock_ticks_per_second();
    let mut used: Vec<(String, f64)> = cpu_seconds_by_command()
        .into_iter()
        .map(|(command, seconds)| {
            let spent = seconds - before.by_command.get(&command).copied().unwrap_or(0.0);
            (command, spent)
        })
        .filter(|(_, spent)| *spent >= 0.5)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top = used.iter().take(6).map(|(c, s)| format!("{c} {s:.1} s")).collect::<Vec<_>>().join(", ");
    format!(
        "cores busy {:.0}% ({busy_core_seconds:.1} core-seconds: at least {:.1} s on {cores} cores); {top}",
        100.0 * busy / total.max(1.0),
        busy_core_seconds / cores
    )
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// CPU seconds each command on this machine has used so far (from `/proc`), to show where a run's
/// time went when the machine's cores are shared by Medplum, the API server and the operator.
fn cpu_seconds_by_command() -> std::collections::BTreeMap<String, f64> {
    let ticks_per_second = clock_ticks_per_second();
    let mut by_command = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ... utime stime ...": comm may hold spaces, so split at its ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let command = head.split_once('(').map(|(_, c)| c.to_string()).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are the 14th and 15th fields of the line, the 12th and 13th after comm.
        *by_command.entry(command).or_insert(0.0) += (ticks(11) + ticks(12)) / ticks_per_second;
    }
    by_command
}

/// Request counts from the operator's metrics.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    medplum: f64,
    medplum_429: f64,
    medplum_writes: f64,
    auth: f64,
    fhir_units: f64,
    kube: f64,
    kube_writes: f64,
}

impl Counts {
    fn of(metrics: &str) -> Self {
        let family = "medplum_operator_medplum_requests_total{";
        let by_operation =
            |ops: &[&str]| -> f64 { ops.iter().map(|op| sum(metrics, family, &[&format!("operation=\"{op}")])).sum() };
        let writes = by_operation(&["create ", "update ", "delete ", "invite", "delete membership"]);
        let searches = by_operation(&["search "]);
        let reads = by_operation(&["read "]);
        let kube = "medplum_operator_kubernetes_requests_total{";
        Self {
            medplum: sum(metrics, family, &[]),
            medplum_429: sum(metrics, family, &["status=\"429\""]),
            medplum_writes: writes,
            auth: by_operation(&["token", "check credentials"]),
            fhir_units: writes * 100.0 + searches * 20.0 + reads,
            kube: sum(metrics, kube, &[]),
            kube_writes: ["create", "patch", "update", "delete"]
                .iter()
                .map(|v| sum(metrics, kube, &[&format!("verb=\"{v}\"")]))
                .sum(),
        }
    }

    fn minus(self, before: Self) -> Self {
        Self {
            medplum: self.medplum - before.medplum,
            medplum_429: self.medplum_429 - before.medplum_429,
            medplum_writes: self.medplum_writes - before.medplum_writes,
            auth: self.auth - before.auth,
            fhir_units: self.fhir_units - before.fhir_units,
            kube: self.kube - before.kube,
            kube_writes: self.kube_writes - before.kube_writes,
        }
    }
}

/// The least time in which Medplum's limits let `demand` units through at `per_minute` a window of
/// 60 s (fixed windows from the first request): every full window but the last is waited out. A
/// lower bound: the last window's requests take some time too.
fn minimum_under_limit(demand: f64, per_minute: f64) -> Duration {
    let windows = (demand / per_minute).ceil().max(1.0);
    Duration::from_secs_f64((windows - 1.0) * 60.0)
}

fn print_limits_minimum(what: &str, auth: f64, fhir_units: f64) -> Duration {
    let by_auth = minimum_under_limit(auth, AUTH_PER_MINUTE);
    let by_fhir = minimum_under_limit(fhir_units, FHIR_UNITS_PER_MINUTE);
    let minimum = by_auth.max(by_fhir);
    println!(
        "figure: minimum the limits impose for {what}: {:.0} s ({auth:.0} auth requests at 160/min: {:.0} s; \
         {fhir_units:.0} FHIR units at 50,000/min: {:.0} s)",
        minimum.as_secs_f64(),
        by_auth.as_secs_f64(),
        by_fhir.as_secs_f64()
    );
    minimum
}

/// Declares `n` AccessPolicies and `n` ClientApplications granting them, named from `first`.
async fn declare(s: &Setup, first: usize, n: usize) {
    declare_with(s, first, n, json!({})).await;
}

/// The same, with `extra` merged into each ClientApplication's spec.
async fn declare_with(s: &Setup, first: usize, n: usize, extra: Value) {
    let extra = &extra;
    futures::stream::iter(first..first + n)
        .for_each_concurrent(16, |i| async move {
            let policy: AccessPolicy = serde_json::from_value(json!({"apiVersion": "medplum.com/v1alpha1",
                "kind": "AccessPolicy", "metadata": {"name": format!("policy-{i:05}")},
                "spec": {"resources": [{"resourceType": "Patient", "readonly": true}]}}))
            .unwrap();
            s.policies().create(&PostParams::default(), &policy).await.unwrap();
            let mut spec = json!({"access": [{"policyRef": {"name": format!("policy-{i:05}")}}]});
            for (key, value) in extra.as_object().into_iter().flatten() {
                spec[key] = value.clone();
            }
            s.create_client(&format!("client-{i:05}"), spec).await;
        })
        .await;
}

fn is_ready(conditions: &[Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Waits until `count` objects of `api` are Ready, from a watch: polling a list of thousands would
/// load the API server, which shares the machine's cores with Medplum, and skew what is measured.
async fn all_ready<K>(api: kube::Api<K>, count: usize, conditions: fn(&K) -> Option<&[Condition]>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    all_match(api, count, move |o| conditions(o).is_some_and(is_ready)).await;
}

/// Waits, from a watch, until `count` objects of `api` match.
async fn all_match<K>(api: kube::Api<K>, count: usize, matches: impl Fn(&K) -> bool)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    use kube::runtime::{WatchStreamExt, watcher};
    let mut ready = std::collections::HashSet::new();
    let changes = watcher(api, watcher::Config::default()).default_backoff().applied_objects();
    let mut changes = std::pin::pin!(changes);
    let wait = async {
        while ready.len() < count {
            let Some(object) = changes.next().await else { break };
            let Ok(object) = object else { continue };
            let name = object.meta().name.clone().unwrap_or_default();
            if matches(&object) {
                ready.insert(name);
            } else {
                ready.remove(&name);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3600), wait).await.expect("all Ready within an hour");
    assert!(ready.len() >= count, "the watch ended");
}

async fn all_clients_ready(s: &Setup, count: usize) {
    all_ready(s.clients(), count, |c| c.status.as_ref().map(|s| s.conditions.as_slice())).await;
}

async fn medplum_client(s: &Setup, name: &str) -> Value {
    let id = s.clients().get(name).await.unwrap().status.unwrap().client_id.unwrap();
    s.read_client(&id).await.1
}

#[tokio::test]
#[ignore = "benchmark: run explicitly (hack/bench.sh)"]
async fn bench_converge_against_the_floor() {
    let n = env_number("BENCH_CLIENTS", 1000);
    let args = test_server_args();
    let resync = Duration::from_secs(env_number("BENCH_RESYNC_SECONDS", 60) as u64);
    let s = Setup::new("bench", &args, json!({})).await;
    let target = target_name(&s.medplum);
    println!("figure: target {target}; {n} clients, concurrency {CONCURRENCY}");

    // The floor, in a project of its own on the same server.
    let floor_project = s.medplum.new_project("bench-floor").await;
    wait_until_quiet().await;
    let cpu = cpu_reading();
    let (floor_time, floor_tally) = floor(s.http(), &floor_project, n, "floor", None).await;
    println!("figure: floor: CPU used on this machine: {}", cpu_used(&cpu));
    let floor_requests = floor_tally.requests.load(Ordering::Relaxed);
    println!(
        "figure: floor: {n} clients in {:.1} s, {} Medplum requests ({:.2} per client), {} refused with 429, {} failed",
        floor_time.as_secs_f64(),
        floor_requests,
        floor_requests as f64 / n as f64,
        floor_tally.refused.load(Ordering::Relaxed),
        floor_tally.failed.load(Ordering::Relaxed),
    );
    let floor_minimum = rate_limits_on().then(|| print_limits_minimum("the floor's calls", n as f64, n as f64 * 300.0));
    if rate_limits_on() {
        // The floor spent this minute's auth and FHIR budgets: start the operator on fresh windows.
        tokio::time::sleep(Duration::from_secs(61)).await;
    }

    // The floor with the Kubernetes writes any operator makes, where the API server shares the cores
    // with Medplum: the same calls in a third project, and the writes for resources declared in a
    // namespace nothing reconciles. Only with limits off: with them on, the limits bound everything.
    let kube_floor_time = if rate_limits_on() {
        None
    } else {
        let project = s.medplum.new_project("bench-floor-kube").await;
        let unwatched = s.sharing("bench-floor-kube").await;
        declare(&unwatched, 0, n).await;
        wait_until_quiet().await;
        let cpu = cpu_reading();
        let writes = KubeWrites { namespace: &unwatched, tally: AtomicU64::new(0) };
        let (time, tally) = floor(s.http(), &project, n, "floor-kube", Some(&writes)).await;
        println!("figure: floor with Kubernetes writes: CPU used on this machine: {}", cpu_used(&cpu));
        let writes = writes.tally.load(Ordering::Relaxed);
        println!(
            "figure: floor with Kubernetes writes: {n} clients in {:.1} s, {:.2} Medplum requests and {:.2} Kubernetes \
             writes per client, {} refused with 429, {} failed",
            time.as_secs_f64(),
            tally.requests.load(Ordering::Relaxed) as f64 / n as f64,
            writes as f64 / n as f64,
            tally.refused.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
        );
        Some(time)
    };

    // The operator: everything declared first, then it starts.
    declare(&s, 0, n).await;
    wait_until_quiet().await;
    let cpu = cpu_reading();
    let started = Instant::now();
    let operator = Operator::start(
        &s.ns.name,
        &["--client-concurrency", &CONCURRENCY.to_string(), "--resync-interval", &format!("{}s", resync.as_secs())],
    )
    .await;
    all_clients_ready(&s, n).await;
    let converged = started.elapsed();
    let first = Counts::of(&operator.metrics().await);
    println!(
        "figure: operator: {n} clients Ready in {:.1} s = {:.2}x the floor; {:.2} Medplum requests per client \
         ({:.0} answered 429), {:.2} Kubernetes requests per client ({:.2} writes)",
        converged.as_secs_f64(),
        converged.as_secs_f64() / floor_time.as_secs_f64(),
        first.medplum / n as f64,
        first.medplum_429,
        first.kube / n as f64,
        first.kube_writes / n as f64,
    );
    if rate_limits_on() {
        let minimum = print_limits_minimum("the operator's calls", first.auth, first.fhir_units);
        println!(
            "figure: operator with rate limits on: {:.1} s = {:.2}x its minimum ({:.2}x the floor's minimum), {:.0} answered 429",
            converged.as_secs_f64(),
            converged.as_secs_f64() / minimum.as_secs_f64().max(1.0),
            converged.as_secs_f64() / floor_minimum.unwrap().as_secs_f64().max(1.0),
            first.medplum_429
        );
    }
    if let Some(kube_floor) = kube_floor_time {
        println!(
            "figure: operator: {:.2}x the floor with Kubernetes writes",
            converged.as_secs_f64() / kube_floor.as_secs_f64()
        );
    }
    println!("figure: operator: CPU used on this machine: {}", cpu_used(&cpu));
    let metrics = operator.metrics().await;
    println!("figure: reconciles: {}", breakdown(&metrics, "medplum_operator_reconciliations_total{"));
    println!("figure: Kubernetes requests: {}", breakdown(&metrics, "medplum_operator_kubernetes_requests_total{"));
    println!("figure: Medplum requests: {}", breakdown(&metrics, "medplum_operator_medplum_requests_total{"));
    println!("figure: operator RSS with {n} clients and {n} policies: {} MiB", operator.rss_kib() / 1024);

    // Steady state: one whole resync interval.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = Counts::of(&operator.metrics().await);
    tokio::time::sleep(resync).await;
    let steady = Counts::of(&operator.metrics().await).minus(before);
    let objects = 2 * n;
    println!(
        "figure: steady state over one {}s resync with {objects} objects: {:.0} Medplum requests ({:.4} per object, \
         {:.0} writes), {:.0} Kubernetes requests ({:.0} writes)",
        resync.as_secs(),
        steady.medplum,
        steady.medplum / objects as f64,
        steady.medplum_writes,
        steady.kube,
        steady.kube_writes
    );

    // Drift: a console edit to a managed client is put back.
    let mut latencies = Vec::new();
    for i in [1, n / 2, n - 1] {
        let name = format!("client-{i:05}");
        let mut client = medplum_client(&s, &name).await;
        let id = client["id"].as_str().unwrap().to_string();
        let expected = client["name"].clone();
        client["name"] = json!("edited in the console");
        s.http().put(&format!("fhir/R4/ClientApplication/{id}"), &s.token, &client).await.expect(200);
        let edited = Instant::now();
        eventually(resync * 3, &format!("{name} put back"), || async {
            (s.read_client(&id).await.1["name"] == expected).then_some(())
        })
        .await;
        latencies.push(edited.elapsed());
    }
    println!("figure: drift put back after a console edit in {latencies:?}");

    // A restart on a backlog: as many new clients declared while the operator is down.
    drop(operator);
    declare(&s, n, n).await;
    wait_until_quiet().await;
    let started = Instant::now();
    let operator = Operator::start(
        &s.ns.name,
        &["--client-concurrency", &CONCURRENCY.to_string(), "--resync-interval", &format!("{}s", resync.as_secs())],
    )
    .await;
    all_clients_ready(&s, 2 * n).await;
    let converged = started.elapsed();
    let backlog = Counts::of(&operator.metrics().await);
    println!(
        "figure: operator restarted on a backlog of {n} new clients (and {n} Ready): all Ready in {:.1} s = {:.2}x the \
         floor; {:.2} Medplum requests per new client ({:.0} answered 429), {:.2} Kubernetes requests per new client",
        converged.as_secs_f64(),
        converged.as_secs_f64() / floor_time.as_secs_f64(),
        backlog.medplum / n as f64,
        backlog.medplum_429,
        backlog.kube / n as f64,
    );
    println!("figure: operator RSS with {} clients and {} policies: {} MiB", 2 * n, 2 * n, operator.rss_kib() / 1024);
}

#[tokio::test]
#[ignore = "benchmark: run explicitly (hack/bench.sh)"]
async fn bench_memory_at_ten_thousand_objects() {
    let clients = env_number("BENCH_OBJECTS", 10_000);
    let (policies, users) = ((clients / 10).max(1), (clients / 10).max(1));
    let s = Setup::new("memory", &test_server_args(), json!({})).await;
    let operator = Operator::start(&s.ns.name, &["--resync-interval", "60s"]).await;
    println!("figure: target {}", target_name(&s.medplum));
    println!("figure: operator RSS at idle: {}", operator.memory());
    let s = &s;
    futures::stream::iter(0..policies)
        .for_each_concurrent(16, |i| async move {
            let policy: AccessPolicy = serde_json::from_value(json!({"apiVersion": "medplum.com/v1alpha1",
                "kind": "AccessPolicy", "metadata": {"name": format!("policy-{i:05}")},
                "spec": {"resources": [{"resourceType": "Patient", "readonly": true}]}}))
            .unwrap();
            s.policies().create(&PostParams::default(), &policy).await.unwrap();
        })
        .await;
    let started = Instant::now();
    futures::stream::iter(0..clients)
        .for_each_concurrent(16, |i| async move {
            let policy = format!("policy-{:05}", i % policies);
            s.create_client(&format!("client-{i:05}"), json!({"access": [{"policyRef": {"name": policy}}]})).await;
        })
        .await;
    futures::stream::iter(0..users)
        .for_each_concurrent(16, |i| async move {
            let user: ProjectUser = serde_json::from_value(json!({"apiVersion": "medplum.com/v1alpha1",
                "kind": "ProjectUser", "metadata": {"name": format!("user-{i:05}")},
                "spec": {"email": format!("user-{i:05}@example.org"), "firstName": "Bench", "lastName": format!("User{i}"),
                         "access": [{"policyRef": {"name": format!("policy-{:05}", i % policies)}}]}}))
            .unwrap();
            s.users().create(&PostParams::default(), &user).await.unwrap();
        })
        .await;
    all_clients_ready(s, clients).await;
    all_ready(s.users(), users, |u| u.status.as_ref().map(|s| s.conditions.as_slice())).await;
    let total = clients + policies + users;
    println!(
        "figure: {clients} ClientApplications, {policies} AccessPolicies, {users} ProjectUsers Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("figure: operator RSS with {total} objects: {}", operator.memory());
    tokio::time::sleep(Duration::from_secs(65)).await;
    println!("figure: operator RSS with {total} objects after a resync: {}", operator.memory());
}

/// A workload using a client's Secret the way a pod does, from an address of its own (as Medplum
/// sees pods behind its load balancer: `X-Forwarded-For`, which it trusts one hop of): every second
/// it reads the Secret, obtains a new token when the secret there differs from its token's, and
/// searches Patients with its token. Every answer other than 200 counts as failed.
struct PollingConsumer {
    requests: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PollingConsumer {
    fn start(s: &Setup, name: String, address: String) -> Self {
        let (requests, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let secrets: kube::Api<Secret> = kube::Api::namespaced(s.client.clone(), &s.ns.name);
        let medplum = s.medplum.clone();
        let (counted, refused, done) = (requests.clone(), failed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let http = &medplum.http;
            let mut token: Option<(String, String)> = None;
            while !done.load(Ordering::Relaxed) {
                let data = secrets.get(&name).await.expect("the Secret stays").data.unwrap_or_default();
                let text = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
                let (id, secret) = (text("MEDPLUM_CLIENT_ID"), text("MEDPLUM_CLIENT_SECRET"));
                if token.as_ref().is_none_or(|(for_secret, _)| *for_secret != secret) {
                    let form = [("grant_type", "client_credentials"), ("client_id", &id), ("client_secret", &secret)];
                    let request = http.request(Method::POST, "oauth2/token", None).header("x-forwarded-for", &address);
                    let answer = http.send(request.form(&form)).await;
                    counted.fetch_add(1, Ordering::Relaxed);
                    if answer.status != 200 {
                        refused.fetch_add(1, Ordering::Relaxed);
                        println!("consumer {name}: token request answered {}", answer.status);
                    } else {
                        token = Some((secret, answer.json()["access_token"].as_str().unwrap().to_string()));
                    }
                }
                if let Some((_, access)) = &token {
                    let request = http.request(Method::GET, "fhir/R4/Patient?_count=1", Some(access));
                    let answer = http.send(request.header("x-forwarded-for", &address)).await;
                    counted.fetch_add(1, Ordering::Relaxed);
                    if answer.status != 200 {
                        refused.fetch_add(1, Ordering::Relaxed);
                        println!("consumer {name}: search answered {}", answer.status);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Self { requests, failed, stop, task }
    }

    /// Stops it; returns (requests, failed).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (self.requests.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

#[tokio::test]
#[ignore = "benchmark: run explicitly (hack/bench.sh rotate)"]
async fn bench_rotate_everything() {
    let n = env_number("BENCH_CLIENTS", 1000);
    let sampled = env_number("BENCH_CONSUMERS", 20).min(n);
    let grace = Duration::from_secs(10);
    let s = Setup::new("bench-rotate", &test_server_args(), json!({})).await;
    println!(
        "figure: target {}; {n} clients, concurrency {CONCURRENCY}, grace period {grace:?}",
        target_name(&s.medplum)
    );
    declare_with(&s, 0, n, json!({"rotation": {"gracePeriod": format!("{}s", grace.as_secs())}})).await;
    let operator =
        Operator::start(&s.ns.name, &["--client-concurrency", &CONCURRENCY.to_string(), "--resync-interval", "60s"])
            .await;
    let started = Instant::now();
    all_clients_ready(&s, n).await;
    println!("figure: {n} clients Ready in {:.1} s before the rotation", started.elapsed().as_secs_f64());
    if rate_limits_on() {
        // Start the rotation on fresh limit windows.
        tokio::time::sleep(Duration::from_secs(61)).await;
    }
    let consumers: Vec<PollingConsumer> = (0..sampled)
        .map(|i| PollingConsumer::start(&s, format!("client-{:05}", i * n / sampled), format!("10.77.0.{}", i + 1)))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let before = Counts::of(&operator.metrics().await);
    let cpu = cpu_reading();
    let asked = Instant::now();
    s.patch_connection(json!({"metadata": {"annotations": {"medplum.com/rotate-clients": "bench"}}})).await;
    all_match(s.clients(), n, |c: &medplum_operator::crd::ClientApplication| {
        c.status.as_ref().and_then(|s| s.rotate_clients_handled.as_deref()) == Some("bench")
    })
    .await;
    let rotated = asked.elapsed();
    let during = Counts::of(&operator.metrics().await).minus(before);
    println!("figure: rotate-everything: CPU used on this machine: {}", cpu_used(&cpu));
    let reported = eventually(Duration::from_secs(60), "the connection reports the end", || async {
        s.connection().await.status?.client_rotation.filter(|r| r.completion_time.is_some())
    })
    .await;
    let reported_after = asked.elapsed();
    let mut totals = (0, 0);
    for consumer in consumers {
        let (requests, failed) = consumer.finish().await;
        totals = (totals.0 + requests, totals.1 + failed);
    }
    println!(
        "figure: rotate-everything: {n} clients rotated (old secrets retired) in {:.1} s; the connection reported {} \
         after {:.1} s; {:.2} Medplum requests per client ({:.0} answered 429; {:.2} auth, {:.0} FHIR units), {:.2} \
         Kubernetes requests per client ({:.2} writes)",
        rotated.as_secs_f64(),
        reported.progress,
        reported_after.as_secs_f64(),
        during.medplum / n as f64,
        during.medplum_429,
        during.auth / n as f64,
        during.fhir_units / n as f64,
        during.kube / n as f64,
        during.kube_writes / n as f64,
    );
    println!("figure: rotate-everything: {sampled} polling consumers made {} requests, {} failed", totals.0, totals.1);
    if rate_limits_on() {
        let minimum = print_limits_minimum("the rotation's calls", during.auth, during.fhir_units) + grace;
        println!(
            "figure: rotate-everything with rate limits on: {:.1} s = {:.2}x its minimum ({:.0} s: the limits' \
             minimum and the last client's grace period)",
            rotated.as_secs_f64(),
            rotated.as_secs_f64() / minimum.as_secs_f64(),
            minimum.as_secs_f64()
        );
    }
}
