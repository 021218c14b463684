//! The Helm chart on the real control plane: lint, schema, install under the restricted pod security
//! profile, CRDs in step with the code, and its RBAC: enough to run the operator with a ServiceAccount
//! token, and no rule spare (each one removed in turn breaks something).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::support::cluster::kubeconfig;
use crate::support::tools::{self, chart, helm_template};
use crate::support::{MedplumTarget, Operator, ProjectAdmin, TestNamespace, cluster_client, eventually, suffix};
use medplum_operator::crd::{
    self, AccessPolicy, ClientApplication, ClusterMedplumConnection, DomainConfiguration, MedplumConnection,
};

#[test]
fn chart_crds_match_the_generated_ones() {
    let dir = chart().join("crds");
    for definition in crd::all() {
        let path = dir.join(crd::file_name(&definition));
        let shipped = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            shipped == crd::to_yaml(&definition),
            "{} is stale: run `cargo run -- crds --dir charts/medplum-operator/crds`",
            path.display()
        );
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), crd::all().len());
}

#[tokio::test]
async fn chart_lints_rejects_wrong_values_and_installs_under_restricted_pod_security() {
    let client = cluster_client().await;
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let lint = tools::ok("helm", &["lint", chart, "--kube-version", "1.37.2"], None);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    for (wrong, expected) in [
        ("replicaCount=two", "/replicaCount"),
        ("leaderElection.enabled=maybe", "/leaderElection/enabled"),
        ("resyncInterval=soon", "/resyncInterval"),
        ("watchNamespaces=team-a", "/watchNamespaces"),
        ("unknownSetting=1", "unknownSetting"),
    ] {
        let output = tools::run("helm", &["template", "x", chart, "--kube-version", "1.37.2", "--set", wrong], None);
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && error.contains(expected), "{wrong}: {error}");
    }
    let output = tools::run(
        "helm",
        &["template", "x", chart, "--kube-version", "1.37.2", "--set", "networkPolicy.enabled=true"],
        None,
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("an egress rule without addresses would allow everything")
    );

    // Install into a namespace that enforces the restricted pod security profile.
    let ns = TestNamespace::create(&client, "chart").await;
    let labels = json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}}});
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.patch(&ns.name, &PatchParams::default(), &Patch::Merge(&labels)).await.unwrap();
    let release = format!("mo-{}", suffix());
    let install = tools::run(
        "helm",
        &[
            "install",
            &release,
            chart,
            "--namespace",
            &ns.name,
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
            "--set",
            "networkPolicy.medplum.cidrs={203.0.113.0/24}",
            "--set",
            &format!("watchNamespaces={{{}}}", ns.name),
        ],
        None,
    );
    let (out, err) = (String::from_utf8_lossy(&install.stdout), String::from_utf8_lossy(&install.stderr));
    assert!(install.status.success(), "helm install failed: {err}");
    assert!(!err.contains("would violate PodSecurity"), "restricted profile warnings: {err}");
    println!("helm install: {}", out.lines().take(6).collect::<Vec<_>>().join(" | "));
    // The pods are created (they are never scheduled: there is no kubelet): the restricted profile admitted them.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let created = eventually(Duration::from_secs(60), "operator pods created", || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        (list.items.len() == 2).then_some(list.items)
    })
    .await;
    let container = &created[0].spec.as_ref().unwrap().containers[0];
    let security = container.security_context.as_ref().unwrap();
    assert_eq!((security.read_only_root_filesystem, security.allow_privilege_escalation), (Some(true), Some(false)));
    let env: Vec<&str> = container.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"));
    let kinds = tools::ok(
        "kubectl",
        &[
            "get",
            "deployment,serviceaccount,service,poddisruptionbudget,networkpolicy,role,rolebinding",
            "-n",
            &ns.name,
            "-o",
            "name",
        ],
        None,
    );
    for kind in [
        "deployment.apps/",
        "serviceaccount/",
        "service/",
        "poddisruptionbudget.policy/",
        "networkpolicy.networking.k8s.io/",
        "role.rbac",
        "rolebinding.rbac",
    ] {
        assert!(kinds.contains(kind), "{kind} missing in {kinds}");
    }
    tools::ok("helm", &["uninstall", &release, "--namespace", &ns.name], None);
}

/// One rule of the rendered RBAC: (document index, rule index) and a description.
pub(crate) struct Rule {
    document: usize,
    index: usize,
    what: String,
}

fn rbac_documents(release: &str, namespace: &str, credentials: &str) -> Vec<serde_yaml::Value> {
    let rendered = helm_template(
        release,
        namespace,
        &[&format!("watchNamespaces={{{namespace}}}"), &format!("credentialNamespaces={{{credentials}}}")],
        Some("templates/rbac.yaml"),
    );
    serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

fn rules_of(documents: &[serde_yaml::Value]) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (document, doc) in documents.iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        for (index, rule) in doc["rules"].as_sequence().into_iter().flatten().enumerate() {
            let resources: Vec<&str> =
                rule["resources"].as_sequence().into_iter().flatten().filter_map(|r| r.as_str()).collect();
            let verbs: Vec<&str> =
                rule["verbs"].as_sequence().into_iter().flatten().filter_map(|r| r.as_str()).collect();
            rules.push(Rule {
                document,
                index,
                what: format!("{kind} {name}: {} [{}]", resources.join(","), verbs.join(",")),
            });
        }
    }
    rules
}

/// Applies the RBAC (without `removed`), a ServiceAccount, and returns a kubeconfig with its token.
pub(crate) async fn service_account_kubeconfig(
    release: &str,
    namespace: &str,
    credentials: &str,
    removed: Option<&Rule>,
) -> std::path::PathBuf {
    let mut documents = rbac_documents(release, namespace, credentials);
    if let Some(rule) = removed {
        documents[rule.document]["rules"].as_sequence_mut().unwrap().remove(rule.index);
    }
    let sa_name = format!("{release}-medplum-operator");
    let sa = serde_yaml::to_value(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa_name, "namespace": namespace}}),
    )
    .unwrap();
    let manifest: String = std::iter::once(&sa)
        .chain(documents.iter())
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect();
    tools::ok("kubectl", &["apply", "-f", "-"], Some(&manifest));
    let token = tools::ok("kubectl", &["create", "token", &sa_name, "-n", namespace, "--duration", "1h"], None);
    let admin: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": {"server": cluster["server"].as_str(), "certificate-authority": cluster["certificate-authority"].as_str()}}],
        "users": [{"name": "sa", "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
    });
    let path = std::env::temp_dir().join(format!("medplum-operator-{release}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

const CHECKS: [&str; 9] = [
    "connection Ready",
    "cluster connection Ready",
    "DomainConfiguration Ready",
    "policies Ready",
    "ClientApplication Ready",
    "restart target restarted",
    "Events recorded",
    "cluster connection Event recorded",
    "cluster connection rotation refused",
];

fn is_ready(conditions: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>) -> bool {
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether one of [`CHECKS`] holds now.
async fn happened(client: &Client, namespace: &str, cluster_name: &str, what: &str) -> bool {
    match what {
        "connection Ready" => Api::<MedplumConnection>::namespaced(client.clone(), namespace)
            .get("default")
            .await
            .is_ok_and(|c| is_ready(c.status.as_ref().map(|s| &s.conditions))),
        "cluster connection Ready" => Api::<ClusterMedplumConnection>::all(client.clone())
            .get(cluster_name)
            .await
            .is_ok_and(|c| is_ready(c.status.as_ref().map(|s| &s.conditions))),
        "DomainConfiguration Ready" => Api::<DomainConfiguration>::all(client.clone())
            .get(cluster_name)
            .await
            .is_ok_and(|d| is_ready(d.status.as_ref().map(|s| &s.conditions))),
        "policies Ready" => {
            Api::<AccessPolicy>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.is_ok_and(
                |l| l.items.len() == 2 && l.items.iter().all(|p| is_ready(p.status.as_ref().map(|s| &s.conditions))),
            )
        }
        "ClientApplication Ready" => Api::<ClientApplication>::namespaced(client.clone(), namespace)
            .get("app")
            .await
            .is_ok_and(|c| is_ready(c.status.as_ref().map(|s| &s.conditions))),
        "restart target restarted" => {
            Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), namespace)
                .get("app")
                .await
                .is_ok_and(|d| {
                    let annotations = d.spec.and_then(|s| s.template.metadata).and_then(|m| m.annotations);
                    annotations.is_some_and(|a| a.contains_key("medplum.com/credentials-issued-at"))
                })
        }
        "Events recorded" => Api::<Event>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .is_ok_and(|e| e.items.iter().any(|e| e.reason.as_deref() == Some("Created"))),
        "cluster connection Event recorded" => {
            Api::<Event>::namespaced(client.clone(), "default").list(&ListParams::default()).await.is_ok_and(|e| {
                e.items.iter().any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(cluster_name))
            })
        }
        // Namespace mode grants only `get` on Secrets in credentialNamespaces: a rotation of the
        // cluster connection's credential is refused before Medplum issues anything.
        "cluster connection rotation refused" => {
            Api::<ClusterMedplumConnection>::all(client.clone()).get(cluster_name).await.is_ok_and(|c| {
                let conditions = c.status.map(|s| s.conditions).unwrap_or_default();
                conditions.iter().any(|c| c.type_ == "CredentialRotation" && c.reason == "CredentialsSecretNotWritable")
            })
        }
        other => unreachable!("unknown check {other}"),
    }
}

/// Everything the operator does, through connections of both kinds (TLS with CA bundles from
/// ConfigMaps, credentials of the cluster connection in another namespace), a restart target, Events
/// and a deletion. Ok with the time it took, or what did not happen.
pub(crate) async fn scenario(
    client: &Client,
    namespace: &str,
    credentials: &str,
    medplum: &MedplumTarget,
    ca: &str,
) -> Result<(Duration, ProjectAdmin), String> {
    let started = Instant::now();
    let admin = medplum.new_project(&format!("rbac-{namespace}")).await;
    for ns in [namespace, credentials] {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "medplum-admin", "labels": {"medplum.com/connection-credentials": "true"}},
            "stringData": {"MEDPLUM_CLIENT_ID": admin.client_id, "MEDPLUM_CLIENT_SECRET": admin.client_secret}}))
        .unwrap();
        Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.unwrap();
        let map: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "medplum-ca"}, "data": {"ca.crt": ca}})).unwrap();
        Api::<ConfigMap>::namespaced(client.clone(), ns).create(&PostParams::default(), &map).await.unwrap();
    }
    let apply = |api_version: &str, kind: &str, ns: Option<&str>, name: &str, spec: Value| {
        let mut object = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec});
        if let Some(ns) = ns {
            object["metadata"]["namespace"] = json!(ns);
        }
        object
    };
    let connection = apply(
        "medplum.com/v1alpha1",
        "MedplumConnection",
        Some(namespace),
        "default",
        json!({
        "baseUrl": medplum.base_url(), "credentialsSecretRef": {"name": "medplum-admin"},
        "caBundle": {"configMapRef": {"name": "medplum-ca", "key": "ca.crt"}}}),
    );
    Api::<MedplumConnection>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &serde_json::from_value(connection).unwrap())
        .await
        .unwrap();
    // Cluster-scoped objects carry the label the operator's selector picks and go with the namespace.
    let owner = Api::<Namespace>::all(client.clone()).get(namespace).await.unwrap();
    let of_namespace = |mut object: Value| {
        object["metadata"]["labels"] = json!({"medplum-operator-test": namespace});
        object["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Namespace", "name": namespace, "uid": owner.uid()}]);
        object
    };
    let cluster_name = format!("shared-{namespace}");
    let cluster = apply(
        "medplum.com/v1alpha1",
        "ClusterMedplumConnection",
        None,
        &cluster_name,
        json!({
        "baseUrl": medplum.base_url(), "credentialsSecretRef": {"namespace": credentials, "name": "medplum-admin"},
        "caBundle": {"namespace": credentials, "configMapRef": {"name": "medplum-ca", "key": "ca.crt"}},
        // A selector, which only the namespace's labels can answer.
        "allowedNamespaces": {"selector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        // Asked to rotate its credential, which the chart's RBAC does not let it write.
        "credentialRotation": {"gracePeriod": "1m"}}),
    );
    let mut cluster = of_namespace(cluster);
    cluster["metadata"]["annotations"] = json!({"medplum.com/rotate": "rbac"});
    Api::<ClusterMedplumConnection>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(cluster).unwrap())
        .await
        .unwrap();
    // A domain's identity provider, through a super admin's cluster connection; both are named like
    // the shared connection and go with the namespace.
    let (sa_id, sa_secret) = medplum.super_admin_credentials();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "medplum-super-admin", "labels": {"medplum.com/connection-credentials": "true"}},
        "stringData": {"MEDPLUM_CLIENT_ID": sa_id, "MEDPLUM_CLIENT_SECRET": sa_secret, "idp-secret": "idp"}}))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), credentials).create(&PostParams::default(), &secret).await.unwrap();
    let super_admin = format!("super-{cluster_name}");
    let cluster = apply(
        "medplum.com/v1alpha1",
        "ClusterMedplumConnection",
        None,
        &super_admin,
        json!({
        "baseUrl": medplum.base_url(), "superAdminCredential": true, "projectId": admin.project_id,
        "credentialsSecretRef": {"namespace": credentials, "name": "medplum-super-admin"},
        "caBundle": {"namespace": credentials, "configMapRef": {"name": "medplum-ca", "key": "ca.crt"}}}),
    );
    Api::<ClusterMedplumConnection>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(of_namespace(cluster)).unwrap())
        .await
        .unwrap();
    let domain = apply(
        "medplum.com/v1alpha1",
        "DomainConfiguration",
        None,
        &cluster_name,
        json!({
        "connectionRef": {"name": super_admin}, "domain": format!("{cluster_name}.example.org"),
        "identityProvider": {"authorizeUrl": "https://idp.example.org/authorize", "tokenUrl": "https://idp.example.org/token",
                             "userInfoUrl": "https://idp.example.org/userinfo", "clientId": "medplum",
                             "clientSecretRef": {"namespace": credentials, "name": "medplum-super-admin", "key": "idp-secret"}}}),
    );
    Api::<DomainConfiguration>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(of_namespace(domain)).unwrap())
        .await
        .unwrap();
    let policies: Api<AccessPolicy> = Api::namespaced(client.clone(), namespace);
    for (name, connection_ref) in [
        ("reader", json!({"name": "default"})),
        ("shared", json!({"kind": "ClusterMedplumConnection", "name": cluster_name})),
    ] {
        let policy = apply(
            "medplum.com/v1alpha1",
            "AccessPolicy",
            Some(namespace),
            name,
            json!({"connectionRef": connection_ref, "resources": [{"resourceType": "Patient", "readonly": true}]}),
        );
        policies.create(&PostParams::default(), &serde_json::from_value(policy).unwrap()).await.unwrap();
    }
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "app"}},
                 "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{"name": "app", "image": "example.org/app:1", "envFrom": [{"secretRef": {"name": "app"}}]}]}}}}))
    .unwrap();
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let app = apply(
        "medplum.com/v1alpha1",
        "ClientApplication",
        Some(namespace),
        "app",
        json!({
        "access": [{"policyRef": {"name": "reader"}}], "rotation": {"restartTargets": [{"kind": "Deployment", "name": "app"}]}}),
    );
    Api::<ClientApplication>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &serde_json::from_value(app).unwrap())
        .await
        .unwrap();

    let deadline = Duration::from_secs(40);
    for what in CHECKS {
        let remaining = deadline.saturating_sub(started.elapsed());
        let met = async {
            while !happened(client, namespace, &cluster_name, what).await {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        if tokio::time::timeout(remaining, met).await.is_err() {
            return Err(what.to_string());
        }
    }
    let clients: Api<ClientApplication> = Api::namespaced(client.clone(), namespace);
    clients.delete("app", &Default::default()).await.unwrap();
    let remaining = deadline.saturating_sub(started.elapsed()).max(Duration::from_secs(10));
    let gone = tokio::time::timeout(remaining, async {
        while clients.get_opt("app").await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if gone.is_err() {
        return Err("ClientApplication deletion (finalizer)".into());
    }
    let domains: Api<DomainConfiguration> = Api::all(client.clone());
    domains.delete(&cluster_name, &Default::default()).await.unwrap();
    let remaining = deadline.saturating_sub(started.elapsed()).max(Duration::from_secs(10));
    let gone = tokio::time::timeout(remaining, async {
        while domains.get_opt(&cluster_name).await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if gone.is_err() {
        return Err("DomainConfiguration deletion (finalizer)".into());
    }
    Ok((started.elapsed(), admin))
}

/// Runs the scenario with the chart's RBAC minus `removed`, in fresh namespaces.
async fn run_with_rbac(removed: Option<&Rule>) -> Result<Duration, String> {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "rbac").await;
    let credentials = TestNamespace::create(&client, "rbac-creds").await;
    let (medplum, ca) = MedplumTarget::start_tls().await;
    // A real Medplum brings its own certificates (plain HTTP in CI): the connections still carry a
    // CA bundle, so the operator still reads it through the ConfigMap rule under test.
    let ca = ca.unwrap_or_else(crate::support::medplum::unused_ca_pem);
    let release = format!("r{}", suffix());
    let config = service_account_kubeconfig(&release, &ns.name, &credentials.name, removed).await;
    let config = config.to_str().unwrap().to_string();
    let lease = format!("{release}-medplum-operator");
    let args = ["--leader-election", "--leader-election-namespace", &ns.name, "--leader-election-lease-name", &lease];
    let operator = Operator::spawn(&ns.name, &args, &[("KUBECONFIG", &config)]).await;
    let result = scenario(&client, &ns.name, &credentials.name, &medplum, &ca).await.map(|(took, _)| took);
    if result.is_err() && std::env::var_os("OPERATOR_LOGS").is_some() {
        eprintln!("{}", operator.logs());
    }
    // Cleanups may be blocked without the rule: drop finalizers so the namespaces can go.
    release_leftovers(&ns.name, &release);
    result
}

/// What a scenario leaves that its namespaces do not take with them: finalizers its cleanup may not
/// have released, and the release's cluster-wide RBAC.
pub(crate) fn release_leftovers(namespace: &str, release: &str) {
    for kind in ["clientapplications", "accesspolicies", "medplumconnections"] {
        let _ = tools::run(
            "kubectl",
            &["patch", kind, "--all", "-n", namespace, "--type", "merge", "-p", r#"{"metadata":{"finalizers":null}}"#],
            None,
        );
    }
    let _ = tools::run(
        "kubectl",
        &[
            "patch",
            "domainconfiguration",
            &format!("shared-{namespace}"),
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    let _ = tools::run(
        "kubectl",
        &["delete", "clusterrole,clusterrolebinding", "-l", &format!("app.kubernetes.io/instance={release}")],
        None,
    );
}

#[tokio::test]
async fn chart_rbac_runs_the_operator_with_its_service_account_and_no_rule_is_spare() {
    let started = Instant::now();
    let full = run_with_rbac(None).await;
    let took = full.unwrap_or_else(|what| panic!("with the chart's RBAC, this did not happen: {what}"));
    println!("figure: full scenario with the chart's RBAC (ServiceAccount token) took {took:?}");

    let documents = rbac_documents("count", "ns", "creds");
    let rules = rules_of(&documents);
    println!("figure: the chart's RBAC (namespace mode) has {} rules", rules.len());
    let outcomes =
        futures::future::join_all(rules.iter().map(|rule| async move { (rule, run_with_rbac(Some(rule)).await) }))
            .await;
    let mut spare = Vec::new();
    for (rule, outcome) in outcomes {
        match outcome {
            Ok(_) => spare.push(rule.what.clone()),
            Err(what) => println!("without {}: {what} failed", rule.what),
        }
    }
    assert!(spare.is_empty(), "rules nothing needed: {spare:?}");
    println!("figure: RBAC minimality check over {} rules took {:?}", rules.len(), started.elapsed());
}
