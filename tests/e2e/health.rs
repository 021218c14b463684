//! Health as GitOps tools read it. Every kind is driven through the states a user meets (new, Ready,
//! refused, rotating, Medplum unreachable, deleting, an unobserved generation); each object is
//! captured as the API server returns it and judged by the Argo CD health script in Argo CD's own
//! interpreter (gopher-lua, as for a script from `argocd-cm`) and by kstatus (`sigs.k8s.io/cli-utils`,
//! which Flux uses), both in `hack/health`.
//!
//! With `MEDPLUM_HEALTH_UPDATE=1` the captures and Argo CD's answers become the committed testdata
//! and `health_test.yaml` files under `health/`, in the layout of Argo CD's
//! `resource_customizations`; `hack/health/build.sh`'s `health-check test` re-runs those in CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};

use crate::project::{create_project, wait_project};
use crate::support::fixtures::{Setup, WAIT};
use crate::support::{Operator, eventually, suffix, tools};
use medplum_operator::crd::{
    AccessPolicy, ClientApplication, ClusterMedplumConnection, DomainConfiguration, MedplumConnection, MedplumProject,
    ProjectUser,
};

/// What each tool must say about a kind in a state: (kind, state, Argo CD, kstatus).
const EXPECTED: &[(&str, &str, &str, &str)] = &[
    ("MedplumConnection", "new", "Progressing", "InProgress"),
    ("MedplumConnection", "ready", "Healthy", "Current"),
    ("MedplumConnection", "rotating", "Healthy", "Current"),
    ("MedplumConnection", "refused", "Degraded", "Failed"),
    ("MedplumConnection", "unreachable", "Progressing", "InProgress"),
    ("MedplumConnection", "deleting", "Progressing", "Terminating"),
    ("ClusterMedplumConnection", "new", "Progressing", "InProgress"),
    ("ClusterMedplumConnection", "ready", "Healthy", "Current"),
    ("ClusterMedplumConnection", "refused", "Degraded", "Failed"),
    ("ClusterMedplumConnection", "unreachable", "Progressing", "InProgress"),
    ("ClusterMedplumConnection", "rate-limited", "Progressing", "InProgress"),
    ("ClientApplication", "new", "Progressing", "InProgress"),
    ("ClientApplication", "ready", "Healthy", "Current"),
    ("ClientApplication", "rotating", "Healthy", "Current"),
    ("ClientApplication", "refused", "Degraded", "Failed"),
    ("ClientApplication", "connection-not-ready", "Progressing", "InProgress"),
    ("ClientApplication", "policy-not-ready", "Progressing", "InProgress"),
    ("ClientApplication", "deleting", "Progressing", "Terminating"),
    ("ClientApplication", "older-generation", "Progressing", "InProgress"),
    ("AccessPolicy", "new", "Progressing", "InProgress"),
    ("AccessPolicy", "ready", "Healthy", "Current"),
    ("AccessPolicy", "refused", "Degraded", "Failed"),
    ("AccessPolicy", "connection-not-ready", "Progressing", "InProgress"),
    ("ProjectUser", "new", "Progressing", "InProgress"),
    ("ProjectUser", "ready", "Healthy", "Current"),
    ("ProjectUser", "refused", "Degraded", "Failed"),
    ("ProjectUser", "connection-not-ready", "Progressing", "InProgress"),
    ("MedplumProject", "new", "Progressing", "InProgress"),
    ("MedplumProject", "ready", "Healthy", "Current"),
    ("MedplumProject", "refused", "Degraded", "Failed"),
    ("MedplumProject", "connection-not-ready", "Progressing", "InProgress"),
    ("DomainConfiguration", "new", "Progressing", "InProgress"),
    ("DomainConfiguration", "ready", "Healthy", "Current"),
    ("DomainConfiguration", "refused", "Degraded", "Failed"),
    ("DomainConfiguration", "connection-not-ready", "Progressing", "InProgress"),
];

/// The states only a Medplum that can be switched off reaches.
const OUTAGE_STATES: &[&str] = &["unreachable", "rate-limited", "connection-not-ready", "deleting"];

/// The objects captured so far, written in the layout of Argo CD's `resource_customizations`.
struct Captures {
    dir: PathBuf,
    files: BTreeMap<(String, String), PathBuf>,
}

impl Captures {
    fn new() -> Self {
        let update = std::env::var_os("MEDPLUM_HEALTH_UPDATE").is_some();
        let dir =
            if update { tools::repo("health") } else { std::env::temp_dir().join(format!("health-{}", suffix())) };
        Self { dir, files: BTreeMap::new() }
    }

    /// Reads the object and writes it as testdata, without what only this run's API server knows.
    async fn take(&mut self, s: &Setup, kind: &str, name: &str, state: &str) {
        let mut object = get(s, kind, name).await;
        let metadata = object["metadata"].as_object_mut().unwrap();
        for field in ["managedFields", "uid", "resourceVersion", "creationTimestamp", "ownerReferences", "labels"] {
            metadata.remove(field);
        }
        let folder = self.dir.join("medplum.com").join(kind).join("testdata");
        std::fs::create_dir_all(&folder).unwrap();
        let file = folder.join(format!("{state}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(&object).unwrap()).unwrap();
        self.files.insert((kind.to_string(), state.to_string()), file);
    }
}

fn api_resource(kind: &str) -> (ApiResource, bool) {
    let (resource, cluster) = match kind {
        "MedplumConnection" => (ApiResource::erase::<MedplumConnection>(&()), false),
        "ClusterMedplumConnection" => (ApiResource::erase::<ClusterMedplumConnection>(&()), true),
        "ClientApplication" => (ApiResource::erase::<ClientApplication>(&()), false),
        "AccessPolicy" => (ApiResource::erase::<AccessPolicy>(&()), false),
        "ProjectUser" => (ApiResource::erase::<ProjectUser>(&()), false),
        "MedplumProject" => (ApiResource::erase::<MedplumProject>(&()), false),
        "DomainConfiguration" => (ApiResource::erase::<DomainConfiguration>(&()), true),
        other => panic!("unknown kind {other}"),
    };
    (resource, cluster)
}

fn dynamic(s: &Setup, kind: &str) -> Api<DynamicObject> {
    let (resource, cluster) = api_resource(kind);
    if cluster {
        Api::all_with(s.client.clone(), &resource)
    } else {
        Api::namespaced_with(s.client.clone(), &s.ns.name, &resource)
    }
}

async fn get(s: &Setup, kind: &str, name: &str) -> Value {
    serde_json::to_value(dynamic(s, kind).get(name).await.unwrap()).unwrap()
}

async fn create(s: &Setup, kind: &str, name: &str, spec: Value) {
    let (resource, cluster) = api_resource(kind);
    let mut metadata = json!({"name": name});
    if cluster {
        metadata["labels"] = json!({"medplum-operator-test": s.ns.name});
        metadata["ownerReferences"] = json!([s.ns.owner_reference()]);
    }
    let object = json!({"apiVersion": resource.api_version, "kind": kind, "metadata": metadata, "spec": spec});
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    dynamic(s, kind).create(&PostParams::default(), &object).await.unwrap();
}

/// Waits until `kind/name` reports Ready=`status` (with `reason`) for its current generation.
async fn wait(s: &Setup, kind: &str, name: &str, status: &str, reason: Option<&str>) {
    let start = std::time::Instant::now();
    loop {
        let object = get(s, kind, name).await;
        let current = object["status"]["observedGeneration"] == object["metadata"]["generation"];
        let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let ready = conditions.iter().find(|c| c["type"] == "Ready");
        if current && ready.is_some_and(|r| r["status"] == status && reason.is_none_or(|want| r["reason"] == want)) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{kind} {name}: no Ready={status} {reason:?} within {WAIT:?}: {}",
            object["status"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn wait_condition(s: &Setup, kind: &str, name: &str, type_: &str, reason: &str) {
    eventually(WAIT, &format!("{kind} {name}: {type_} {reason}"), || async {
        let object = get(s, kind, name).await;
        let conditions = object["status"]["conditions"].as_array()?.clone();
        conditions.iter().any(|c| c["type"] == type_ && c["reason"] == reason).then_some(())
    })
    .await
}

/// One object of every kind, each with what it needs (Secrets, an identity provider's secret).
async fn declare_every_kind(s: &Setup, cluster: &str, domain: &str) {
    let (id, secret) = s.medplum.super_admin_credentials();
    s.create_secret(cluster, &[("MEDPLUM_CLIENT_ID", &id), ("MEDPLUM_CLIENT_SECRET", &secret)]).await;
    s.create_secret("idp", &[("client-secret", "idp-secret-1")]).await;
    let spec = json!({"baseUrl": s.medplum.base_url(), "projectId": s.admin.project_id, "superAdminCredential": true,
                      "credentialsSecretRef": {"namespace": s.ns.name, "name": cluster}});
    create(s, "ClusterMedplumConnection", cluster, spec).await;
    create(s, "AccessPolicy", "reader", json!({"resources": [{"resourceType": "Patient", "readonly": true}]})).await;
    let access = json!([{"policyRef": {"name": "reader"}}]);
    create(s, "ClientApplication", "app", json!({"access": access})).await;
    let email = format!("dr-{}@example.org", suffix());
    create(s, "ProjectUser", "dr", json!({"firstName": "Dana", "lastName": "Reyes", "email": email, "access": access}))
        .await;
    create_project(s, "project", json!({})).await;
    let idp = json!({"authorizeUrl": "https://idp.example.org/authorize", "tokenUrl": "https://idp.example.org/token",
                     "userInfoUrl": "https://idp.example.org/userinfo", "clientId": "medplum",
                     "clientSecretRef": {"namespace": s.ns.name, "name": "idp", "key": "client-secret"}});
    let spec = json!({"connectionRef": {"name": cluster}, "domain": domain, "identityProvider": idp});
    create(s, "DomainConfiguration", domain, spec).await;
}

/// Refusals that only a change cures, one per kind.
async fn declare_refused(s: &Setup, cluster: &str, domain: &str) {
    let spec = json!({"baseUrl": s.medplum.base_url(), "projectId": s.admin.project_id,
                      "credentialsSecretRef": {"name": "wrong-credentials"}});
    s.create_secret(
        "wrong-credentials",
        &[("MEDPLUM_CLIENT_ID", &s.admin.client_id), ("MEDPLUM_CLIENT_SECRET", "0123")],
    )
    .await;
    create(s, "MedplumConnection", "refused", spec).await;
    let refused_cluster = format!("{cluster}-refused");
    let spec = json!({"baseUrl": s.medplum.base_url(), "projectId": s.admin.project_id, "superAdminCredential": true,
                      "credentialsSecretRef": {"namespace": s.ns.name, "name": "wrong-credentials"}});
    create(s, "ClusterMedplumConnection", &refused_cluster, spec).await;
    s.create_secret("someone-elses", &[("token", "theirs")]).await;
    create(
        s,
        "ClientApplication",
        "refused",
        json!({"secret": {"name": "someone-elses"}, "access": [{"policyRef": {"name": "reader"}}]}),
    )
    .await;
    create(
        s,
        "AccessPolicy",
        "refused",
        json!({"resources": [{"resourceType": "Observation", "criteria": "Observation?subject.name=Lee"}]}),
    )
    .await;
    let email = format!("boss-{}@example.org", suffix());
    let spec = json!({"firstName": "Bo", "lastName": "Ss", "email": email, "admin": true,
                      "access": [{"policyRef": {"name": "reader"}}]});
    create(s, "ProjectUser", "refused", spec).await;
    create_project(s, "refused", json!({})).await;
    create(s, "ClientApplication", "waiting", json!({"access": [{"policyRef": {"name": "refused"}}]})).await;
    let domain_spec = get(s, "DomainConfiguration", domain).await["spec"].clone();
    create(s, "DomainConfiguration", &format!("{domain}-refused"), domain_spec).await;
}

#[tokio::test]
async fn every_kind_in_every_state_reads_right_to_argo_cd_and_kstatus() {
    let s = Setup::new("health", &[], json!({"allowProjectSettings": true})).await;
    let outage = s.medplum.is_test_server();
    let mut captures = Captures::new();
    let tag = suffix();
    let (cluster, domain) = (format!("health-{tag}"), format!("health-{tag}.example.org"));
    let names: BTreeMap<&str, String> = [
        ("MedplumConnection", "default".to_string()),
        ("ClusterMedplumConnection", cluster.clone()),
        ("ClientApplication", "app".into()),
        ("AccessPolicy", "reader".into()),
        ("ProjectUser", "dr".into()),
        ("MedplumProject", "project".into()),
        ("DomainConfiguration", domain.clone()),
    ]
    .into();

    // New: declared, not reconciled yet (no operator runs).
    declare_every_kind(&s, &cluster, &domain).await;
    for (kind, name) in &names {
        captures.take(&s, kind, name, "new").await;
    }
    let args = ["--resync-interval", "10s"];
    let operator = Operator::start(&s.ns.name, &args).await;
    for (kind, name) in &names {
        wait(&s, kind, name, "True", None).await;
        captures.take(&s, kind, name, "ready").await;
    }
    wait_project(&s, "project", "True", None).await;

    // Rotating: a ClientApplication in its grace period, and the connection's own credential.
    s.patch_connection(json!({"metadata": {"annotations": {"medplum.com/rotate": "health"}},
                              "spec": {"credentialRotation": {"gracePeriod": "60s"}}}))
        .await;
    wait_condition(&s, "MedplumConnection", "default", "CredentialRotation", "GracePeriod").await;
    captures.take(&s, "MedplumConnection", "default", "rotating").await;
    let rotation = json!({"spec": {"rotation": {"gracePeriod": "60s"}}});
    dynamic(&s, "ClientApplication")
        .patch("app", &Default::default(), &kube::api::Patch::Merge(&rotation))
        .await
        .unwrap();
    wait(&s, "ClientApplication", "app", "True", None).await;
    s.annotate("app", "medplum.com/rotate", "health").await;
    wait_condition(&s, "ClientApplication", "app", "Rotating", "GracePeriod").await;
    captures.take(&s, "ClientApplication", "app", "rotating").await;

    // Refused: each kind's refusal that only a change cures.
    declare_refused(&s, &cluster, &domain).await;
    let refused: Vec<(&str, String, &str)> = vec![
        ("MedplumConnection", "refused".into(), "InvalidCredentials"),
        ("ClusterMedplumConnection", format!("{cluster}-refused"), "InvalidCredentials"),
        ("ClientApplication", "refused".into(), "SecretConflict"),
        ("AccessPolicy", "refused".into(), "InvalidCriteria"),
        ("ProjectUser", "refused".into(), "AdminNotAllowed"),
        ("MedplumProject", "refused".into(), "ProjectAlreadyDeclared"),
        ("DomainConfiguration", format!("{domain}-refused"), "AlreadyManaged"),
    ];
    for (kind, name, reason) in &refused {
        wait(&s, kind, name, "False", Some(reason)).await;
        captures.take(&s, kind, name, "refused").await;
    }
    // Waiting for a policy that is not Ready: waiting (for the policy to change) cures it.
    wait(&s, "ClientApplication", "waiting", "False", Some("PolicyNotReady")).await;
    captures.take(&s, "ClientApplication", "waiting", "policy-not-ready").await;

    // Medplum unreachable: the connections wait for it, everything else for its connection; a
    // ClientApplication deleted meanwhile waits to remove its Medplum client.
    if outage {
        s.medplum.set_faults(json!({"outage": true})).await;
        wait(&s, "MedplumConnection", "default", "False", Some("MedplumUnreachable")).await;
        wait(&s, "ClusterMedplumConnection", &cluster, "False", Some("MedplumUnreachable")).await;
        captures.take(&s, "MedplumConnection", "default", "unreachable").await;
        captures.take(&s, "ClusterMedplumConnection", &cluster, "unreachable").await;
        for (kind, name) in names.iter().filter(|(k, _)| !k.ends_with("MedplumConnection")) {
            wait(&s, kind, name, "False", Some("ConnectionNotReady")).await;
            captures.take(&s, kind, name, "connection-not-ready").await;
        }
        dynamic(&s, "ClientApplication").delete("app", &DeleteParams::default()).await.unwrap();
        captures.take(&s, "ClientApplication", "app", "deleting").await;
        let deleting = dynamic(&s, "MedplumConnection");
        deleting.delete("default", &DeleteParams::default()).await.unwrap();
        captures.take(&s, "MedplumConnection", "default", "deleting").await;
        s.medplum.set_faults(json!({})).await;
        eventually(WAIT, "the deleted ClientApplication gone", || async {
            dynamic(&s, "ClientApplication").get_opt("app").await.unwrap().is_none().then_some(())
        })
        .await;
        // Rate-limited: Medplum answers 429 to the connection's checks (last: the operator then holds
        // its requests to Medplum back for the rest of the minute).
        s.medplum.set_faults(json!({"tooManyRequestsRate": 1.0, "pathPrefix": "/auth/me"})).await;
        wait(&s, "ClusterMedplumConnection", &cluster, "False", Some("MedplumRateLimited")).await;
        captures.take(&s, "ClusterMedplumConnection", &cluster, "rate-limited").await;
        s.medplum.set_faults(json!({})).await;
    }

    // An unobserved generation: the spec changed while no operator runs.
    drop(operator);
    let client = if outage { "refused" } else { "app" };
    let older = json!({"spec": {"displayName": "changed"}});
    dynamic(&s, "ClientApplication")
        .patch(client, &Default::default(), &kube::api::Patch::Merge(&older))
        .await
        .unwrap();
    captures.take(&s, "ClientApplication", client, "older-generation").await;

    judge(&captures, outage);
}

/// Runs both tools on every capture and checks each against [`EXPECTED`]; in update mode writes
/// each kind's `health.lua` and `health_test.yaml` beside its testdata.
fn judge(captures: &Captures, outage: bool) {
    let tool = tools::built_by("hack/health/build.sh");
    let files: Vec<&PathBuf> = captures.files.values().collect();
    let script = tools::repo("charts/medplum-operator/files/argocd-health.lua");
    let kinds: std::collections::BTreeSet<&str> = EXPECTED.iter().map(|e| e.0).collect();
    for kind in &kinds {
        std::fs::create_dir_all(captures.dir.join("medplum.com").join(kind)).unwrap();
        std::fs::copy(&script, captures.dir.join("medplum.com").join(kind).join("health.lua")).unwrap();
    }
    let output = Command::new(&tool).arg("assess").arg(&captures.dir).args(&files).output().unwrap();
    assert!(output.status.success(), "health-check assess: {}", String::from_utf8_lossy(&output.stderr));
    let verdicts: BTreeMap<PathBuf, Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (PathBuf::from(v["file"].as_str().unwrap()), v))
        .collect();
    let mut wrong = Vec::new();
    let mut tests: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for (kind, state, argocd, kstatus) in EXPECTED {
        let Some(file) = captures.files.get(&(kind.to_string(), state.to_string())) else {
            assert!(!outage && OUTAGE_STATES.contains(state), "{kind} {state} was not captured");
            continue;
        };
        let verdict = &verdicts[file];
        println!(
            "health: {kind:<24} {state:<21} Argo CD {:<11} kstatus {:<11} {}",
            verdict["argocd"]["status"], verdict["kstatus"]["status"], verdict["argocd"]["message"]
        );
        if verdict["argocd"]["status"] != *argocd || verdict["kstatus"]["status"] != *kstatus {
            wrong.push(format!("{kind} {state}: want Argo CD {argocd}, kstatus {kstatus}; got {verdict}"));
        }
        let input = format!("testdata/{state}.yaml");
        tests.entry(kind).or_default().push(json!({"healthStatus": verdict["argocd"].clone(), "inputPath": input}));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    if std::env::var_os("MEDPLUM_HEALTH_UPDATE").is_some() {
        for (kind, tests) in tests {
            let text = serde_yaml::to_string(&json!({"tests": tests})).unwrap();
            std::fs::write(captures.dir.join("medplum.com").join(kind).join("health_test.yaml"), text).unwrap();
        }
        check_committed(&tool, &captures.dir);
    }
}

/// `health-check test`: the committed health_test.yaml files, as Argo CD's own test runs them.
fn check_committed(tool: &Path, dir: &Path) {
    let output = Command::new(tool).arg("test").arg(dir).output().unwrap();
    println!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "health-check test: {}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn the_committed_argo_cd_health_tests_pass_and_every_kind_has_the_charts_script() {
    let dir = tools::repo("health");
    let script = std::fs::read_to_string(tools::repo("charts/medplum-operator/files/argocd-health.lua")).unwrap();
    for crd in medplum_operator::crd::all() {
        let kind = &crd.spec.names.kind;
        let committed = std::fs::read_to_string(dir.join("medplum.com").join(kind).join("health.lua"))
            .unwrap_or_else(|e| panic!("health/medplum.com/{kind}/health.lua: {e}"));
        assert_eq!(committed, script, "{kind}: the chart's script (MEDPLUM_HEALTH_UPDATE=1 rewrites it)");
    }
    check_committed(&tools::built_by("hack/health/build.sh"), &dir);
}

/// The README's way in: the chart's ConfigMap merged into an existing `argocd-cm` with one kubectl
/// command keeps Argo CD's own keys and adds the script for every kind.
#[tokio::test]
async fn the_charts_health_checks_merge_into_argocd_cm() {
    let client = crate::support::cluster::cluster_client().await;
    let (argocd, operator) = (
        crate::support::cluster::TestNamespace::create(&client, "argocd").await,
        crate::support::cluster::TestNamespace::create(&client, "medplum-system").await,
    );
    let rendered = tools::helm_template(
        "medplum-operator",
        &operator.name,
        &["argocd.healthChecks.enabled=true"],
        Some("templates/argocd-health.yaml"),
    );
    tools::ok("kubectl", &["apply", "-n", &operator.name, "-f", "-"], Some(&rendered));
    let existing = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "argocd-cm"},
                          "data": {"url": "https://argocd.example.org", "resource.customizations.health.apps_Deployment": "return {}"}});
    tools::ok("kubectl", &["apply", "-n", &argocd.name, "-f", "-"], Some(&existing.to_string()));
    // The README's command, verbatim but for the namespaces.
    let readme = std::fs::read_to_string(tools::repo("README.md")).unwrap();
    let command = readme
        .lines()
        .find(|l| l.starts_with("kubectl -n argocd patch configmap argocd-cm"))
        .expect("the README's command");
    let command = command
        .replace("-n argocd ", &format!("-n {} ", argocd.name))
        .replace("-n medplum-system ", &format!("-n {} ", operator.name));
    tools::shell(&command);
    let merged: Value = serde_json::from_str(&tools::ok(
        "kubectl",
        &["get", "-n", &argocd.name, "configmap", "argocd-cm", "-o", "json"],
        None,
    ))
    .unwrap();
    let data = merged["data"].as_object().unwrap();
    assert_eq!(data["url"], "https://argocd.example.org", "Argo CD's own settings stay");
    assert_eq!(data["resource.customizations.health.apps_Deployment"], "return {}");
    let script = std::fs::read_to_string(tools::repo("charts/medplum-operator/files/argocd-health.lua")).unwrap();
    for crd in medplum_operator::crd::all() {
        let key = format!("resource.customizations.health.medplum.com_{}", crd.spec.names.kind);
        assert_eq!(data.get(&key).and_then(Value::as_str), Some(script.as_str()), "{key}");
    }
}
