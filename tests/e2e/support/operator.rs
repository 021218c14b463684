//! The operator binary as a child process (or the image as a container), watching one test namespace,
//! with its logs captured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use super::cluster::kubeconfig;
use super::container::{self, podman, podman_ok};

pub struct Operator {
    child: Child,
    logs: Arc<Mutex<String>>,
    pub address: SocketAddr,
    /// The podman container it runs in, with `OPERATOR_IMAGE`.
    container: Option<String>,
}

fn capture(stream: impl AsyncRead + Unpin + Send + 'static, logs: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var_os("OPERATOR_LOGS").is_some() {
                eprintln!("operator: {line}");
            }
            let mut logs = logs.lock().unwrap();
            logs.push_str(&line);
            logs.push('\n');
        }
    });
}

impl Operator {
    /// Starts `medplum-operator run` for `namespace` (and the ClusterMedplumConnections labelled
    /// `medplum-operator-test=<namespace>`) with debug logging in JSON, and waits until it is ready.
    pub async fn start(namespace: &str, extra_args: &[&str]) -> Self {
        let operator = Self::spawn(namespace, extra_args, &[]).await;
        operator.wait_ready().await;
        operator
    }

    /// Starts the operator without waiting for readiness, with extra environment variables (a
    /// `KUBECONFIG` among them replaces the admin one). `OPERATOR_BINARY` runs another build of it (the
    /// benchmarks measure the static binary the image ships); `OPERATOR_IMAGE` runs it from that image
    /// as the chart's container, under podman (`hack/bench.sh` with `BENCH_IMAGE=1`).
    pub async fn spawn(namespace: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let selector = format!("medplum-operator-test={namespace}");
        let mut args: Vec<String> =
            ["run", "--watch-namespaces", namespace, "--cluster-connection-selector", &selector]
                .map(String::from)
                .into();
        args.extend(["--http-address", "127.0.0.1:0", "--log-format", "json"].map(String::from));
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let log_level = std::env::var("OPERATOR_RUST_LOG").unwrap_or_else(|_| "debug".into());
        let mut vars: Vec<(String, String)> = vec![
            ("KUBECONFIG".into(), kubeconfig().display().to_string()),
            ("RUST_LOG".into(), log_level),
            ("POD_NAME".into(), format!("operator-{namespace}")),
        ];
        for (key, value) in env {
            vars.retain(|(k, _)| k != key);
            vars.push((key.to_string(), value.to_string()));
        }
        let (mut command, container) = match std::env::var("OPERATOR_IMAGE") {
            Ok(image) => {
                let name = format!("operator-{namespace}-{}", super::suffix());
                (in_container(&image, &name, &args, &vars), Some(name))
            }
            Err(_) => {
                let binary = std::env::var_os("OPERATOR_BINARY")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| env!("CARGO_BIN_EXE_medplum-operator").into());
                let mut command = Command::new(binary);
                command.args(&args).envs(vars);
                (command, None)
            }
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting medplum-operator");
        let logs = Arc::new(Mutex::new(String::new()));
        capture(child.stdout.take().expect("stdout"), logs.clone());
        capture(child.stderr.take().expect("stderr"), logs.clone());
        let address = super::eventually(Duration::from_secs(30), "operator HTTP address in its logs", || {
            let logs = logs.clone();
            async move {
                let text = logs.lock().unwrap().clone();
                text.lines()
                    .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                    .find(|entry| entry["message"] == "serving /healthz, /readyz and /metrics")
                    .and_then(|entry| entry["address"].as_str()?.parse().ok())
            }
        })
        .await;
        Self { child, logs, address, container }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://{}{path}", self.address)).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    pub async fn wait_ready(&self) {
        super::eventually(Duration::from_secs(30), "operator /readyz", || async {
            self.get("/readyz").await.filter(|(status, _)| *status == 200).map(|_| ())
        })
        .await;
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.expect("metrics endpoint answers").1
    }

    /// The value of one metric sample, e.g. `medplum_operator_token_refreshes_total`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|line| line.starts_with(sample))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits for the process to end by itself (a crash point aborting it); panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("the operator should have stopped by itself")
            .expect("waiting for the operator")
    }

    /// SIGKILL: no cleanup at all, as a crash or an OOM kill would do.
    pub async fn kill(&mut self) {
        match &self.container {
            Some(name) => drop(podman(&["kill", "--signal", "KILL", name])),
            None => drop(self.child.kill().await),
        }
    }

    /// SIGTERM: a graceful stop; returns the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match &self.container {
            Some(name) => drop(podman_ok(&["kill", "--signal", "TERM", name])),
            None => {
                let pid = self.child.id().expect("running").to_string();
                let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
                assert!(status.success());
            }
        }
        self.wait_exit(timeout).await
    }

    /// Resident memory of the process, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// The operator's memory as one line: RSS, and of it the heap and other private memory
    /// (`RssAnon`) and the binary's own pages (`RssFile`), in MiB.
    pub fn memory(&self) -> String {
        let mib = |field| self.status_kib(field) as f64 / 1024.0;
        format!("{:.1} MiB ({:.1} MiB private, {:.1} MiB of the binary)", mib("VmRSS"), mib("RssAnon"), mib("RssFile"))
    }

    fn status_kib(&self, field: &str) -> u64 {
        let pid = match &self.container {
            Some(name) => container::pid(name),
            None => self.child.id().expect("running"),
        };
        container::status_kib(pid, field)
    }
}

/// `podman run` of `image` as the chart's container (its user, read-only root filesystem, no
/// capabilities, no new privileges; host networking), with `args` and `vars`. A kubeconfig in `vars`
/// is mounted into it, made self-contained (certificates inline) and readable by the pod's user only.
fn in_container(image: &str, name: &str, args: &[String], vars: &[(String, String)]) -> Command {
    static CHART: OnceLock<serde_json::Value> = OnceLock::new();
    let chart = CHART.get_or_init(|| container::chart_container("operator", "default", &[]));
    let mut run = container::run_args(chart, name);
    run.push("--rm".into());
    for (key, value) in vars {
        let value = if key == "KUBECONFIG" {
            let inside = format!("/var/run/medplum-operator-test/{name}.kubeconfig");
            let file = self_contained_kubeconfig(Path::new(value), name);
            run.extend(["--volume".into(), format!("{}:{inside}:ro", file.display())]);
            inside
        } else {
            value.clone()
        };
        run.extend(["--env".into(), format!("{key}={value}")]);
    }
    run.push(image.into());
    run.extend(args.iter().cloned());
    let mut command = Command::new("podman");
    command.args(run);
    command
}

/// A copy of a kubeconfig with the files it names inlined, owned by the pod's user (65532), mode 0400.
fn self_contained_kubeconfig(path: &Path, name: &str) -> PathBuf {
    use base64::Engine;
    let mut config: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let inline = |section: &mut serde_yaml::Value, key: &str| {
        if let Some(file) = section.get(key).and_then(|v| v.as_str()).map(String::from) {
            let data = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&file).unwrap());
            let map = section.as_mapping_mut().unwrap();
            map.remove(key);
            map.insert(format!("{key}-data").into(), data.into());
        }
    };
    for entry in config["clusters"].as_sequence_mut().into_iter().flatten() {
        inline(&mut entry["cluster"], "certificate-authority");
    }
    for entry in config["users"].as_sequence_mut().into_iter().flatten() {
        inline(&mut entry["user"], "client-certificate");
        inline(&mut entry["user"], "client-key");
    }
    let file = std::env::temp_dir().join(format!("medplum-operator-{name}.kubeconfig"));
    std::fs::write(&file, serde_yaml::to_string(&config).unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
    std::os::unix::fs::chown(&file, Some(65532), Some(65532)).expect("chown to the pod's user");
    file
}

/// A test that fails shows the end of its operators' logs (debug level, secret-free: the tests check
/// that), so that a failure in CI says what the operator was doing.
impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("OPERATOR_LOGS").is_none() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!("the last {} lines of the operator's log:\n{}", tail.len(), tail.join("\n"));
        }
        if let Some(name) = &self.container {
            let _ = podman(&["rm", "--force", "--time", "0", name]);
            let _ = std::fs::remove_file(std::env::temp_dir().join(format!("medplum-operator-{name}.kubeconfig")));
        }
    }
}

/// Leader election on the Lease `lease` of `namespace` with the short timings the failover tests use:
/// lease 6 s, renew deadline 4 s, retry period 1 s.
pub fn fast_leader_election<'a>(namespace: &'a str, lease: &'a str) -> [&'a str; 11] {
    [
        "--leader-election",
        "--leader-election-namespace",
        namespace,
        "--leader-election-lease-name",
        lease,
        "--leader-election-lease-duration",
        "6s",
        "--leader-election-renew-deadline",
        "4s",
        "--leader-election-retry-period",
        "1s",
    ]
}
