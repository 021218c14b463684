//! The chart's Deployment on a real node: the kubelet built from the Go module proxy with Debian's
//! containerd and runc (hack/node/start.sh; hack/test.sh starts it). The kubelet pulls the image from
//! containerd's store (imported from hack/image.sh's archive), projects the ServiceAccount token, runs
//! the probes, restarts a killed container and stops the pod with SIGTERM on deletion.
//!
//! Two changes to the rendered pod, both for this machine's networking: host networking (there is no
//! CNI plugin, and Medplum listens on 127.0.0.1), and `KUBERNETES_SERVICE_HOST`/`PORT` naming the API
//! server's address (it listens on 127.0.0.1 only, so the `kubernetes` Service has no endpoint and
//! there is no kube-proxy). Host networking puts both replicas on one port of one node, so the node
//! runs one replica; leader election and failover between two pods are proven in image.rs.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

use crate::chart::{release_leftovers, scenario, service_account_kubeconfig};
use crate::support::cluster::kubeconfig;
use crate::support::container::status_kib;
use crate::support::tools::{self, helm_template};
use crate::support::{MedplumTarget, TestNamespace, cluster_client, eventually, suffix};

/// The node of hack/node/start.sh, labelled and tainted `medplum-operator-test/node=real`.
const NODE: &str = "medplum-operator-node";

/// The chart rendered for `release` in namespace mode, onto the node, with the two changes above.
fn manifest(release: &str, namespace: &str, credentials: &str, port: u16) -> String {
    let api = url::Url::parse(
        serde_yaml::from_str::<serde_yaml::Value>(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap()["clusters"]
            [0]["cluster"]["server"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let sets = [
        format!("watchNamespaces={{{namespace}}}"),
        format!("credentialNamespaces={{{credentials}}}"),
        format!("clusterConnectionSelector=medplum-operator-test={namespace}"),
        "replicaCount=1".into(),
        format!("service.port={port}"),
        "nodeSelector.medplum-operator-test/node=real".into(),
        "tolerations[0].key=medplum-operator-test/node".into(),
        "tolerations[0].operator=Exists".into(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let rendered = helm_template(release, namespace, &sets, None);
    let mut documents: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &Value| !d.is_null())
        .collect();
    for document in &mut documents {
        if document["kind"] == "Deployment" {
            let pod = &mut document["spec"]["template"]["spec"];
            pod["hostNetwork"] = json!(true);
            pod["dnsPolicy"] = json!("ClusterFirstWithHostNet");
            let env = pod["containers"][0]["env"].as_array_mut().unwrap();
            env.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": api.host_str().unwrap()}));
            env.push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": api.port().unwrap().to_string()}));
        }
    }
    documents.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap())).collect()
}

async fn ready_pod(pods: &Api<Pod>, release: &str, what: &str, not: Option<&str>) -> Pod {
    eventually(Duration::from_secs(120), what, || async {
        let selector = format!("app.kubernetes.io/instance={release}");
        let list = pods.list(&ListParams::default().labels(&selector)).await.ok()?;
        list.items.into_iter().find(|pod| {
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            ready && pod.metadata.deletion_timestamp.is_none() && pod.metadata.name.as_deref() != not
        })
    })
    .await
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).map_or(0, |c| c[0].restart_count)
}

/// The node's state folder, beside the control plane's kubeconfig.
fn node_dir() -> std::path::PathBuf {
    kubeconfig().parent().unwrap().join("node")
}

/// The end of the operator container's log, as the kubelet wrote it (hack/node/start.sh's podLogsDir).
fn container_log(pod: &Pod) -> String {
    let meta = &pod.metadata;
    let pod_dir = format!(
        "{}_{}_{}",
        meta.namespace.as_deref().unwrap(),
        meta.name.as_deref().unwrap(),
        meta.uid.as_deref().unwrap()
    );
    let dir = node_dir().join("pod-logs").join(pod_dir).join("operator");
    let text: String = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// The host PID of the pod's operator container, from containerd.
fn container_pid(pod: &Pod) -> u32 {
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).unwrap();
    let id = statuses[0].container_id.as_deref().unwrap().trim_start_matches("containerd://").to_string();
    let socket = node_dir().join("containerd.sock").display().to_string();
    let output = Command::new("ctr")
        .args(["--address", &socket, "--namespace", "k8s.io", "tasks", "ls"])
        .output()
        .expect("ctr (apt-get install containerd)");
    let tasks = String::from_utf8(output.stdout).unwrap();
    let line = tasks.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("task {id} in {tasks}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_charts_deployment_runs_on_a_real_kubelet() {
    let client = cluster_client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(NODE).await.unwrap_or_else(|e| panic!("node {NODE} ({e}): start it with hack/node/start.sh"));
    let runtime = node.status.and_then(|s| s.node_info).map(|i| (i.kubelet_version, i.container_runtime_version));
    println!("figure: node {NODE}: kubelet and runtime {runtime:?}");
    let ns = TestNamespace::create(&client, "node").await;
    let credentials = TestNamespace::create(&client, "node-creds").await;
    let (medplum, ca) = MedplumTarget::start_tls().await;
    let ca = ca.unwrap_or_else(crate::support::medplum::unused_ca_pem);
    let release = format!("n{}", suffix());
    // The chart's RBAC as the chart tests apply it; then the whole rendered chart.
    service_account_kubeconfig(&release, &ns.name, &credentials.name, None).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let applied = Instant::now();
    tools::ok("kubectl", &["apply", "-f", "-"], Some(&manifest(&release, &ns.name, &credentials.name, port)));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = ready_pod(&pods, &release, "the operator's pod Ready (the kubelet's readiness probe)", None).await;
    println!("figure: kubectl apply to the pod Ready on the real node in {:?}", applied.elapsed());
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE));

    let (took, _admin) = match scenario(&client, &ns.name, &credentials.name, &medplum, &ca).await {
        Ok(done) => done,
        Err(what) => panic!("on the real node, this did not happen: {what}\n{}", container_log(&pod)),
    };
    println!("figure: the chart scenario converged from the pod on the real node in {took:?}");
    let pid = container_pid(&pod);
    println!("figure: the pod's operator RSS after the scenario: {} KiB", status_kib(pid, "VmRSS"));

    // kill -9 of the container: the kubelet restarts it and it is Ready again.
    let killed = Instant::now();
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let name = pod.metadata.name.clone().unwrap();
    let restarted = eventually(Duration::from_secs(120), "the kubelet restarted the container, Ready", || async {
        let pod = pods.get(&name).await.ok()?;
        let ready = pod.status.as_ref()?.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (restart_count(&pod) == 1 && ready).then_some(pod)
    })
    .await;
    println!("figure: kill -9 to the restarted container Ready in {:?}", killed.elapsed());

    // Deletion: the kubelet sends SIGTERM; the container exits 0 within the grace period.
    let grace = restarted.spec.as_ref().unwrap().termination_grace_period_seconds.unwrap_or(30);
    let mut watch =
        pods.watch(&WatchParams::default().fields(&format!("metadata.name={name}")), "0").await.unwrap().boxed();
    let deleting = Instant::now();
    pods.delete(&name, &Default::default()).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(grace as u64 + 30), async {
        while let Some(event) = watch.try_next().await.unwrap() {
            if let WatchEvent::Modified(pod) | WatchEvent::Deleted(pod) = event {
                let statuses = pod.status.and_then(|s| s.container_statuses).unwrap_or_default();
                if let Some(done) = statuses.first().and_then(|s| s.state.as_ref()?.terminated.clone()) {
                    return (done.exit_code, deleting.elapsed());
                }
            }
        }
        panic!("the watch ended before the container stopped");
    })
    .await
    .expect("the container stops within the grace period");
    println!("figure: pod deletion to the container's exit ({}) in {:?} (grace {grace} s)", exit.0, exit.1);
    assert_eq!(exit.0, 0, "a clean exit on SIGTERM");
    assert!(exit.1 < Duration::from_secs(grace as u64));
    // The Deployment's replacement pod comes up on the node.
    ready_pod(&pods, &release, "the replacement pod Ready", Some(&name)).await;
    tools::ok(
        "kubectl",
        &["delete", "deployment", "-n", &ns.name, "-l", &format!("app.kubernetes.io/instance={release}")],
        None,
    );
    release_leftovers(&ns.name, &release);
}
