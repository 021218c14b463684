//! Real outages of the real Medplum: its server, its PostgreSQL or its Redis stopped for two minutes
//! while 50 clients are being created, and while every client of the connection (after
//! `medplum.com/rotate-clients`) and the connection's own credential have pushed a new secret but not
//! retired the old one. During the outage no Secret is blanked or
//! changed, statuses say why, and requests back off; after it everything converges with no duplicate
//! Medplum object, every Secret's credentials work and the old secret is retired exactly once.
//!
//! Also: kube-apiserver restarted (same etcd) in the middle of a batch of creates and of a rotation.
//!
//! They stop what other tests share, so they are ignored in the main run: `hack/test.sh` runs them
//! alone afterwards (`--ignored --test-threads 1 outage::`); the Medplum ones need the real Medplum.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::support::fixtures::Setup;
use crate::support::{Operator, eventually, skip};
use medplum_operator::crd::{ClientApplication, MedplumConnection};

const OUTAGE: Duration = Duration::from_secs(120);
const CREATING: usize = 50;
const STEADY: usize = 5;

fn real_medplum(args: &[&str]) {
    let status = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/real-medplum.sh"))
        .args(args)
        .env("MEDPLUM_RATE_LIMITS", "off")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running hack/real-medplum.sh");
    assert!(status.success(), "hack/real-medplum.sh {args:?} failed");
}

fn ready_reason(ca: &ClientApplication) -> Option<(String, String)> {
    let c = ca.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

/// The client secret of every Secret of the namespace that holds one.
async fn secrets(s: &Setup) -> BTreeMap<String, String> {
    let list = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(s.client.clone(), &s.ns.name)
        .list(&ListParams::default().labels("medplum.com/client-application"))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter_map(|secret| {
            let value = secret.data?.get("MEDPLUM_CLIENT_SECRET")?.0.clone();
            Some((secret.metadata.name?, String::from_utf8(value).ok()?))
        })
        .collect()
}

/// Brings the stopped part back when dropped, so that a failed check never leaves the real Medplum
/// broken for the tests after it.
struct Restore(bool);

impl Restore {
    fn now(&mut self) {
        real_medplum(&["start"]);
        self.0 = true;
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if !self.0 {
            real_medplum(&["start"]);
        }
    }
}

/// Waits until `count` ClientApplications of the namespace are Ready.
async fn all_ready(s: &Setup, count: usize, within: Duration) {
    eventually(within, &format!("{count} clients Ready"), || async {
        let list = s.clients().list(&ListParams::default()).await.ok()?;
        let ready = list.items.iter().filter(|ca| ready_reason(ca).is_some_and(|(st, _)| st == "True")).count();
        (ready == count).then_some(())
    })
    .await;
}

/// No value of `secrets` in the operator's logs, Events, statuses.
pub(crate) async fn nowhere_public(s: &Setup, operator: &Operator, secrets: impl IntoIterator<Item = &String>) {
    let public = s.public_text().await + &operator.logs();
    for value in secrets {
        assert!(!public.contains(value.as_str()), "a secret value in logs, Events or status");
    }
}

async fn requests(operator: &Operator) -> f64 {
    operator.metric("medplum_operator_medplum_requests_total").await
}

async fn outage(part: &str) {
    let mut setup = Setup::new(&format!("outage-{part}"), &[], json!({})).await;
    let s = &setup;
    if s.medplum.is_test_server() {
        skip("stops the real Medplum's parts; the test server's faults are tested elsewhere");
        return;
    }
    let operator = Operator::start(&s.ns.name, &["--resync-interval", "30s"]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let access = json!([{"policyRef": {"name": "reader"}}]);
    let rotation = json!({"gracePeriod": "60s"});
    for i in 0..STEADY {
        s.create_client(&format!("steady-{i}"), json!({"access": access, "rotation": rotation})).await;
    }
    // Rotations caught between their push and their retirement, which falls due during the outage:
    // every client's (asked for on the connection, one of them with a restart target) and the
    // connection's own credential's.
    s.deployment("rotating").await;
    s.create_client(
        "rotating",
        json!({"access": access,
        "rotation": {"gracePeriod": "60s", "restartTargets": [{"kind": "Deployment", "name": "rotating"}]}}),
    )
    .await;
    for i in 0..STEADY {
        s.wait_ready(&format!("steady-{i}")).await;
    }
    let rotating_id = s.wait_ready("rotating").await.status.unwrap().client_id.unwrap();
    let old = s.secret("rotating").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    let old_steady = secrets(s).await;
    s.patch_connection(json!({
        "metadata": {"annotations": {"medplum.com/rotate": "before-the-outage", "medplum.com/rotate-clients": "before-the-outage"}},
        "spec": {"credentialRotation": {"gracePeriod": "60s"}},
    }))
    .await;
    s.wait_condition("rotating", "Rotating", "True", Some("GracePeriod")).await;
    for i in 0..STEADY {
        s.wait_condition(&format!("steady-{i}"), "Rotating", "True", Some("GracePeriod")).await;
    }
    let connection_secret =
        eventually(Duration::from_secs(60), "the connection's credential in its grace period", || async {
            let status = s.connection().await.status?;
            let c = status.conditions.iter().find(|c| c.type_ == "CredentialRotation")?;
            (c.reason == "GracePeriod").then_some(())?;
            Some(s.connection_secret().await)
        })
        .await;
    assert_ne!(connection_secret, s.admin.client_secret);
    for i in 0..CREATING {
        s.create_client(&format!("new-{i:02}"), json!({"access": access, "rotation": rotation})).await;
    }

    let before = secrets(s).await;
    let requests_before = requests(&operator).await;
    real_medplum(&["outage", part]);
    let mut restore = Restore(false);
    let stopped = Instant::now();
    println!("{part} stopped with {} Secrets written", before.len());
    let mut reasons = BTreeSet::new();
    let mut connection_reasons = BTreeSet::new();
    while stopped.elapsed() < OUTAGE {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = secrets(s).await;
        for (name, value) in &before {
            assert_eq!(now.get(name), Some(value), "Secret {name} changed or went during the outage");
        }
        assert_eq!(s.connection_secret().await, connection_secret, "the connection's Secret changed");
        for ca in s.clients().list(&ListParams::default()).await.unwrap().items {
            if let Some((status, reason)) = ready_reason(&ca)
                && status == "False"
            {
                reasons.insert(reason);
            }
        }
        let connection =
            Api::<MedplumConnection>::namespaced(s.client.clone(), &s.ns.name).get("default").await.unwrap();
        if let Some(c) = connection.status.and_then(|st| st.conditions.into_iter().find(|c| c.type_ == "Ready")) {
            connection_reasons.insert(format!("{} {}", c.status, c.reason));
        }
    }
    let during = requests(&operator).await - requests_before;
    println!(
        "figure: {part} outage of {} s: {during} Medplum requests during it ({:.1} a minute, {} objects)",
        OUTAGE.as_secs(),
        during / OUTAGE.as_secs_f64() * 60.0,
        STEADY + CREATING + 2
    );
    println!("figure: {part} outage: Ready=False reasons seen {reasons:?}; connection {connection_reasons:?}");
    // Statuses say why: the connection that Medplum is unreachable or failing, and the clients that
    // needed it either that or that their connection is not Ready. (Without Redis, Medplum forgets its
    // logins and refuses tokens it issued: MedplumRejected until the operator gets a new one.)
    assert!(
        connection_reasons.iter().any(|r| r == "False MedplumUnreachable" || r == "False MedplumServerError"),
        "the connection said why: {connection_reasons:?}"
    );
    let expected = ["ConnectionNotReady", "MedplumUnreachable", "MedplumServerError", "MedplumRejected"];
    assert!(!reasons.is_empty() && reasons.iter().all(|r| expected.contains(&r.as_str())), "{reasons:?}");
    // Backoff: fewer than half of what one retry per object every 5 s would make.
    assert!(during < ((STEADY + CREATING + 2) * 24) as f64 / 2.0, "{during} requests: no backoff");

    restore.now();
    let recovered = Instant::now();
    let all = CREATING + STEADY + 1;
    all_ready(s, all, Duration::from_secs(300)).await;
    let all_ready = recovered.elapsed().as_secs_f64();
    s.wait_condition_within(Duration::from_secs(300), "rotating", "Rotating", "False", Some("Idle")).await;
    let rotated = crate::rotate_clients::wait_rotated(s, "before-the-outage", Duration::from_secs(300)).await;
    assert_eq!(rotated.progress, format!("{all}/{all}"));
    println!(
        "figure: {part} outage: all {all} clients Ready {all_ready:.1} s after recovery; every rotation finished {:.1} s after it",
        recovered.elapsed().as_secs_f64()
    );

    // No duplicates, every credential works, the old secret retired exactly once. (Redis holds
    // Medplum's logins: tokens from before its restart are refused, the test's own too.)
    // The test's project-admin client is the connection's credential, rotated meanwhile.
    let current = setup.connection_secret().await;
    setup.token = setup.http().token(&setup.admin.client_id, &current).await;
    let s = &setup;
    let written = secrets(s).await;
    assert_eq!(written.len(), all);
    for ca in s.clients().list(&ListParams::default()).await.unwrap().items {
        let name = ca.metadata.name.clone().unwrap();
        let tagged = s.tagged_clients(&name).await;
        assert_eq!(tagged.len(), 1, "{name}: one Medplum client");
        let id = ca.status.unwrap().client_id.unwrap();
        assert_eq!(s.memberships_of(&id).await.len(), 1, "{name}: one membership");
        assert!(s.token_works(&id, &written[&name]).await, "{name}: the Secret's credentials work");
    }
    assert!(!s.token_works(&rotating_id, &old).await, "the old secret is retired");
    for ca in s.clients().list(&ListParams::default()).await.unwrap().items {
        let name = ca.metadata.name.clone().unwrap();
        if let Some(previous) = old_steady.get(&name) {
            assert!(
                !s.token_works(&ca.status.unwrap().client_id.unwrap(), previous).await,
                "{name}: old secret retired"
            );
        }
    }
    // The connection kept a working credential throughout, and retired the old one after.
    let credential = &setup.admin.client_id;
    eventually(Duration::from_secs(60), "the connection's previous secret retired", || async {
        (!s.token_works(credential, &setup.admin.client_secret).await).then_some(())
    })
    .await;
    assert_eq!(s.connection_secret().await, connection_secret, "the Secret keeps the new secret");
    assert!(s.token_works(credential, &connection_secret).await, "which works");
    let events = Api::<Event>::namespaced(s.client.clone(), &s.ns.name).list(&ListParams::default()).await.unwrap();
    let retired: Vec<_> = events
        .items
        .iter()
        .filter(|e| {
            e.reason.as_deref() == Some("SecretRetired")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rotating")
        })
        .collect();
    assert_eq!(retired.len(), 1, "retired once");
    assert!(retired[0].series.is_none(), "and not again");
    let old = old_steady.values().chain([&old, &connection_secret, &setup.admin.client_secret]);
    nowhere_public(s, &operator, written.values().chain(old)).await;
}

#[tokio::test]
#[ignore = "stops the real Medplum's server: hack/test.sh --real-medplum runs it alone"]
async fn the_medplum_server_stops_for_two_minutes() {
    outage("server").await;
}

#[tokio::test]
#[ignore = "stops the real Medplum's PostgreSQL: hack/test.sh --real-medplum runs it alone"]
async fn postgres_stops_for_two_minutes() {
    outage("postgres").await;
}

#[tokio::test]
#[ignore = "stops the real Medplum's Redis: hack/test.sh --real-medplum runs it alone"]
async fn redis_stops_for_two_minutes() {
    outage("redis").await;
}

/// Restarts the test cluster's kube-apiserver (same etcd, same arguments).
fn restart_apiserver() -> f64 {
    let dir = crate::support::cluster::kubeconfig().parent().expect("the kubeconfig's folder").to_path_buf();
    let started = Instant::now();
    let status = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/controlplane/restart-apiserver.sh"))
        .env("CONTROLPLANE_DIR", dir)
        .status()
        .expect("running restart-apiserver.sh");
    assert!(status.success(), "restart-apiserver.sh failed");
    started.elapsed().as_secs_f64()
}

#[tokio::test]
#[ignore = "restarts the shared kube-apiserver: hack/test.sh runs it alone"]
async fn the_api_server_restarts_during_creates_and_a_rotation() {
    const BATCH: usize = 30;
    let s = Setup::new("apiserver", &[], json!({})).await;
    let operator = Operator::start(&s.ns.name, &["--resync-interval", "30s"]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let access = json!([{"policyRef": {"name": "reader"}}]);
    s.deployment("rotating").await;
    s.create_client(
        "rotating",
        json!({"access": access,
        "rotation": {"gracePeriod": "5s", "restartTargets": [{"kind": "Deployment", "name": "rotating"}]}}),
    )
    .await;
    let rotating_id = s.wait_ready("rotating").await.status.unwrap().client_id.unwrap();
    let old = s.secret("rotating").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    let creates_before = if s.medplum.is_test_server() {
        s.medplum.stats().await.get("POST /fhir/R4/ClientApplication").copied()
    } else {
        None
    };

    for i in 0..BATCH {
        s.create_client(&format!("batch-{i:02}"), json!({"access": access})).await;
    }
    s.annotate("rotating", "medplum.com/rotate", "during-the-restart").await;
    let away = restart_apiserver();
    let restarted = Instant::now();
    println!("figure: kube-apiserver restarted in the middle of {BATCH} creates and a rotation; API away {away:.1} s");

    let all = BATCH + 1;
    all_ready(&s, all, Duration::from_secs(180)).await;
    s.wait_condition_within(Duration::from_secs(120), "rotating", "Rotating", "False", Some("Idle")).await;
    println!(
        "figure: all {all} clients Ready and the rotation done {:.1} s after the API came back",
        restarted.elapsed().as_secs_f64()
    );
    // The watches recovered: a client made now is seen and made at once.
    s.create_client("after", json!({"access": access})).await;
    let seen = Instant::now();
    s.wait_ready("after").await;
    println!("figure: a client created after the restart Ready in {:.1} s", seen.elapsed().as_secs_f64());

    // Nothing done twice, nothing lost.
    let written = secrets(&s).await;
    assert_eq!(written.len(), all + 1);
    let events = Api::<Event>::namespaced(s.client.clone(), &s.ns.name).list(&ListParams::default()).await.unwrap();
    let of = |reason: &str, name: &str| {
        events
            .items
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum::<i32>()
    };
    for ca in s.clients().list(&ListParams::default()).await.unwrap().items {
        let name = ca.metadata.name.clone().unwrap();
        assert_eq!(s.tagged_clients(&name).await.len(), 1, "{name}: one Medplum client");
        let id = ca.status.unwrap().client_id.unwrap();
        assert_eq!(s.memberships_of(&id).await.len(), 1, "{name}: one membership");
        assert!(s.token_works(&id, &written[&name]).await, "{name}: the Secret's credentials work");
        // An Event the operator publishes while the API is away is lost (Events are best effort);
        // none is published twice.
        if name.starts_with("batch-") {
            assert!(of("Created", &name) <= 1, "{name}: created once");
        }
    }
    // The retirement may happen while the API is away, and its Event with it; the old secret is
    // refused either way.
    assert!(of("SecretRetired", "rotating") <= 1, "the old secret retired once");
    assert!(!s.token_works(&rotating_id, &old).await, "the old secret is retired");
    if let Some(before) = creates_before {
        let after = s.medplum.stats().await.get("POST /fhir/R4/ClientApplication").copied().unwrap_or(0);
        assert_eq!(after - before, (BATCH + 1) as u64, "one Medplum create per client");
    }
    nowhere_public(&s, &operator, written.values().chain([&old])).await;
}

/// Pauses the test cluster's kube-apiserver (SIGSTOP) until dropped: it keeps its connections and
/// answers nothing, as behind a network partition that drops packets.
struct PausedApiServer(String);

impl PausedApiServer {
    fn pause() -> Self {
        let dir = crate::support::cluster::kubeconfig().parent().expect("the kubeconfig's folder").to_path_buf();
        let pid = std::fs::read_to_string(dir.join("kube-apiserver.pid")).expect("kube-apiserver.pid");
        let pid = pid.trim().to_string();
        assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
        Self(pid)
    }
}

impl Drop for PausedApiServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

#[tokio::test]
#[ignore = "pauses the shared kube-apiserver: hack/test.sh runs it alone"]
async fn a_leader_whose_api_server_stops_answering_stops_within_the_renew_deadline() {
    let s = Setup::new("paused", &[], json!({})).await;
    let ns = s.ns.name.clone();
    let args = crate::support::operator::fast_leader_election(&ns, "paused");
    let mut operator = Operator::spawn(&ns, &args, &[("POD_NAME", "replica-a")]).await;
    operator.wait_ready().await;
    eventually(Duration::from_secs(30), "replica-a leads", || async {
        operator.logs().contains("acquired leadership").then_some(())
    })
    .await;
    let paused = PausedApiServer::pause();
    let stopped = Instant::now();
    // A standby that reaches the API server would take the lease 6 s after the last renewal: the
    // leader must have stopped acting by then, so within the renew deadline (4 s) and a retry period.
    let status = operator.wait_exit(Duration::from_secs(60)).await;
    let took = stopped.elapsed();
    drop(paused);
    println!("figure: kube-apiserver paused → the leader exited after {took:?} (renew deadline 4 s, lease 6 s)");
    assert!(!status.success(), "losing the lease is a failure exit");
    assert!(took < Duration::from_secs(6), "before the lease could expire: {took:?}");
    assert!(operator.logs().contains("could not renew the lease in time"));
    // The API server answers again for the tests after this one.
    eventually(Duration::from_secs(30), "kube-apiserver answers", || async {
        s.clients().list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
}
