//! The container image, run as the chart runs it. `hack/image.sh` builds it (hack/test.sh does so
//! before the suite); here its build is reproducible, and the chart's rendered Deployment runs with it
//! under podman as a kubelet would run the pod: the container's command, args and environment, user
//! 65532, read-only root filesystem, no capabilities, no new privileges, the runtime's default seccomp
//! profile, a TokenRequest token of the chart's ServiceAccount and the cluster CA at the in-cluster path,
//! `KUBERNETES_SERVICE_HOST`/`PORT`. Host networking reaches the local control plane and Medplum; so
//! that two pods can share the host, `HTTP_ADDRESS` gets a free port (the one change to the pod spec).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::{Value, json};

use medplum_operator::config::parse_duration;
use medplum_operator::crd::ClientApplication;

use crate::chart::{release_leftovers, scenario, service_account_kubeconfig};
use crate::support::cluster::kubeconfig;
use crate::support::container::{chart_container, pid, podman, podman_ok, run_args, status_kib};
use crate::support::fixtures::TAG_SYSTEM;
use crate::support::{MedplumTarget, TestNamespace, cluster_client, eventually, suffix, tools};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The chart's operator container, rendered for `release` in namespace mode.
fn rendered_container(release: &str, namespace: &str, credentials: &str) -> Value {
    let selector = format!("clusterConnectionSelector=medplum-operator-test={namespace}");
    let sets =
        [format!("watchNamespaces={{{namespace}}}"), format!("credentialNamespaces={{{credentials}}}"), selector];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    chart_container(release, namespace, &sets)
}

/// The ServiceAccount volume a kubelet projects: a TokenRequest token, the cluster CA, the namespace.
fn service_account_volume(service_account: &str, namespace: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("medplum-operator-sa-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = tools::ok("kubectl", &["create", "token", service_account, "-n", namespace, "--duration", "1h"], None);
    let admin: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap();
    let ca = admin["clusters"][0]["cluster"]["certificate-authority"].as_str().unwrap();
    std::fs::write(dir.join("token"), token.trim()).unwrap();
    std::fs::copy(ca, dir.join("ca.crt")).unwrap();
    std::fs::write(dir.join("namespace"), namespace).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for file in ["token", "ca.crt", "namespace"] {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// One pod of the chart's Deployment, as a podman container.
struct Pod {
    name: String,
    port: u16,
}

impl Pod {
    fn start(container: &Value, name: &str, namespace: &str, volume: &Path) -> Self {
        let port = free_port();
        let server = url::Url::parse(
            serde_yaml::from_str::<serde_yaml::Value>(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap()
                ["clusters"][0]["cluster"]["server"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        let mut args = run_args(container, name);
        args.push("--detach".into());
        let mount = format!("{}:/var/run/secrets/kubernetes.io/serviceaccount:ro", volume.display());
        args.extend(["--volume".into(), mount]);
        let mut env = vec![
            ("KUBERNETES_SERVICE_HOST".to_string(), server.host_str().unwrap().to_string()),
            ("KUBERNETES_SERVICE_PORT".to_string(), server.port().unwrap().to_string()),
        ];
        for var in container["env"].as_array().unwrap() {
            let key = var["name"].as_str().unwrap().to_string();
            let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => name.to_string(),
                Some("metadata.namespace") => namespace.to_string(),
                Some(other) => panic!("a field the test does not project: {other}"),
                None if key == "HTTP_ADDRESS" => format!("127.0.0.1:{port}"),
                None => var["value"].as_str().unwrap_or_default().to_string(),
            };
            env.push((key, value));
        }
        for (key, value) in env {
            args.extend(["--env".into(), format!("{key}={value}")]);
        }
        args.push(container["image"].as_str().unwrap().into());
        args.extend(container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&args);
        Self { name: name.into(), port }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port)).await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    }

    fn logs(&self) -> String {
        let output = podman(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    }

    /// The resident set of the container's process, as the kernel counts it.
    fn rss_kib(&self) -> u64 {
        status_kib(pid(&self.name), "VmRSS")
    }

    fn exit_code(&self) -> String {
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// The image the chart names by default is in podman's storage (hack/image.sh puts it there).
fn chart_image(container: &Value) -> String {
    let image = container["image"].as_str().unwrap().to_string();
    let present = podman(&["image", "exists", &image]).status.success();
    assert!(present, "image {image} is not in podman's storage: build it with hack/image.sh");
    image
}

/// The static binary hack/image.sh packs: hack/test.sh builds it before the suite, since a cargo build
/// from inside `cargo test` would see other features and rebuild the dist profile (6 minutes here).
fn dist_binary() -> PathBuf {
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/x86_64-unknown-linux-musl/dist/medplum-operator");
    assert!(binary.is_file(), "{} is missing: build the image with hack/image.sh", binary.display());
    binary
}

#[test]
fn two_builds_of_one_commit_give_one_image_digest() {
    let root = env!("CARGO_MANIFEST_DIR");
    let binary = dist_binary();
    let build = |tag: &str| {
        let archive = std::env::temp_dir().join(format!("medplum-operator-image-{tag}-{}.oci.tar", suffix()));
        let started = Instant::now();
        let output = Command::new("bash")
            .arg(format!("{root}/hack/image.sh"))
            .env("IMAGE", format!("localhost/medplum-operator-reproducible:{tag}"))
            .env("OCI_ARCHIVE", &archive)
            .env("OPERATOR_BINARY", &binary)
            .output()
            .expect("hack/image.sh");
        assert!(output.status.success(), "hack/image.sh: {}", String::from_utf8_lossy(&output.stderr));
        let printed = String::from_utf8(output.stdout).unwrap();
        let digest = printed.split_whitespace().nth(1).expect("name and digest").to_string();
        let size = std::fs::metadata(&archive).unwrap().len();
        let _ = std::fs::remove_file(&archive);
        (digest, started.elapsed(), size)
    };
    let (first, took, size) = build("a");
    let (second, again, _) = build("b");
    println!(
        "figure: image built in {took:?} and again in {again:?}; OCI archive {size} bytes; digests {first} {second}"
    );
    assert_eq!(first, second, "two builds of one commit give one digest");
    let config: Value = serde_json::from_str(&podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        "localhost/medplum-operator-reproducible:a",
    ]))
    .unwrap();
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], json!(["/medplum-operator"]));
    let labels = &config["Labels"];
    for label in ["source", "version", "revision", "licenses", "created"] {
        assert!(labels[format!("org.opencontainers.image.{label}")].is_string(), "label {label}: {labels}");
    }
    for tag in ["a", "b"] {
        let _ = podman(&["rmi", &format!("localhost/medplum-operator-reproducible:{tag}")]);
    }
}

#[tokio::test]
async fn the_charts_pods_run_from_the_image_elect_a_leader_fail_over_and_stop_on_sigterm() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "image").await;
    let credentials = TestNamespace::create(&client, "image-creds").await;
    let (medplum, ca) = MedplumTarget::start_tls().await;
    let ca = ca.unwrap_or_else(crate::support::medplum::unused_ca_pem);
    let release = format!("r{}", suffix());
    let service_account = format!("{release}-medplum-operator");
    service_account_kubeconfig(&release, &ns.name, &credentials.name, None).await;
    let container = rendered_container(&release, &ns.name, &credentials.name);
    chart_image(&container);
    let volume = service_account_volume(&service_account, &ns.name);

    let started = Instant::now();
    let pods = [0, 1].map(|i| Pod::start(&container, &format!("{release}-{i}"), &ns.name, &volume));
    for pod in &pods {
        eventually(Duration::from_secs(60), "the container's /readyz", || async {
            (pod.get("/readyz").await?.0 == 200).then_some(())
        })
        .await;
    }
    println!("figure: two containers from start to /readyz 200 in {:?}", started.elapsed());
    for pod in &pods {
        assert_eq!(pod.get("/healthz").await.map(|r| r.0), Some(200), "{}: /healthz", pod.name);
        let metrics = pod.get("/metrics").await.expect("/metrics");
        assert!(metrics.0 == 200 && metrics.1.contains("medplum_operator_"), "{}: /metrics", pod.name);
    }

    // The chart's own scenario (connections with the CA bundle, a DomainConfiguration, policies, a
    // client and its restart target, Events), served by the containers.
    let (took, admin) = match scenario(&client, &ns.name, &credentials.name, &medplum, &ca).await {
        Ok(done) => done,
        Err(what) => {
            for pod in &pods {
                eprintln!("{}:\n{}", pod.name, pod.logs());
            }
            panic!("from the containers, this did not happen: {what}");
        }
    };
    println!("figure: the chart scenario converged from the containers in {took:?}");
    for pod in &pods {
        println!("figure: {} RSS after the scenario: {} KiB", pod.name, pod.rss_kib());
    }

    // kill -9 of the leader: the other takes the Lease within its duration and acts.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = || async { leases.get(&service_account).await.ok()?.spec?.holder_identity };
    let leader = holder().await.expect("a leader");
    let (gone, standby) = if leader == pods[0].name { (&pods[0], &pods[1]) } else { (&pods[1], &pods[0]) };
    podman_ok(&["kill", "--signal", "KILL", &gone.name]);
    let killed = Instant::now();
    eventually(Duration::from_secs(40), "the standby holds the Lease", || async {
        (holder().await? == standby.name).then_some(())
    })
    .await;
    let failover = killed.elapsed();
    let duration = parse_duration(container_env(&container, "LEADER_ELECTION_LEASE_DURATION")).unwrap();
    let retry = parse_duration(container_env(&container, "LEADER_ELECTION_RETRY_PERIOD")).unwrap();
    println!("figure: failover in containers (kill -9 of the leader to the standby holding the Lease): {failover:?}");
    assert!(failover <= duration + retry, "took over in {failover:?}, lease duration {duration:?}");
    // It acts: a client declared after the kill becomes Ready, made once in Medplum.
    let clients: Api<ClientApplication> = Api::namespaced(client.clone(), &ns.name);
    let object = json!({"apiVersion": "medplum.com/v1alpha1", "kind": "ClientApplication",
                        "metadata": {"name": "after-failover"}, "spec": {"access": [{"policyRef": {"name": "reader"}}]}});
    clients.create(&Default::default(), &serde_json::from_value(object).unwrap()).await.unwrap();
    eventually(Duration::from_secs(60), "a client declared after the kill Ready", || async {
        let ready = clients.get("after-failover").await.ok()?.status?.conditions;
        ready.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    println!("figure: a client declared after the kill was Ready {:?} after it", killed.elapsed());
    let token = medplum.http.token(&admin.client_id, &admin.client_secret).await;
    let query = format!("fhir/R4/ClientApplication?_tag={TAG_SYSTEM}|ClientApplication/{}/after-failover", ns.name);
    let found = medplum.http.get(&query, &token).await.expect(200).json();
    assert_eq!(found["entry"].as_array().map(Vec::len), Some(1), "no duplicate in Medplum");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let data = secrets.get("after-failover").await.expect("its Secret").data.expect("data");
    let value = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
    // The Secret's credentials get a token from Medplum (or the request panics with its answer).
    medplum.http.token(&value("MEDPLUM_CLIENT_ID"), &value("MEDPLUM_CLIENT_SECRET")).await;

    // SIGTERM, as a kubelet stops a pod: a clean exit within terminationGracePeriodSeconds.
    let grace = container["terminationGracePeriodSeconds"].as_u64().unwrap();
    let stopping = Instant::now();
    podman_ok(&["stop", "--time", &grace.to_string(), &standby.name]);
    let stopped = stopping.elapsed();
    println!("figure: SIGTERM to exit in {stopped:?} (grace period {grace} s)");
    assert_eq!(standby.exit_code(), "0", "a clean exit:\n{}", standby.logs());
    assert!(stopped < Duration::from_secs(grace), "stopped within the grace period");
    let _ = std::fs::remove_dir_all(&volume);
    release_leftovers(&ns.name, &release);
}

fn container_env<'a>(container: &'a Value, name: &str) -> &'a str {
    let vars = container["env"].as_array().unwrap();
    vars.iter().find(|v| v["name"] == name).and_then(|v| v["value"].as_str()).unwrap()
}
