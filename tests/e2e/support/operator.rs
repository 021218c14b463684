//! The operator binary as a child process, watching one test namespace, with its logs captured.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use super::cluster::kubeconfig;

pub struct Operator {
    child: Child,
    logs: Arc<Mutex<String>>,
    pub address: SocketAddr,
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
    /// `KUBECONFIG` among them replaces the admin one).
    pub async fn spawn(namespace: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let selector = format!("medplum-operator-test={namespace}");
        // `OPERATOR_BINARY` runs another build of the operator (the benchmarks measure the static
        // release binary the container image ships).
        let binary = std::env::var_os("OPERATOR_BINARY")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_medplum-operator").into());
        let mut child = Command::new(binary)
            .args(["run", "--watch-namespaces", namespace, "--cluster-connection-selector", &selector])
            .args(["--http-address", "127.0.0.1:0", "--log-format", "json"])
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig())
            .env("RUST_LOG", std::env::var("OPERATOR_RUST_LOG").unwrap_or_else(|_| "debug".into()))
            .env("POD_NAME", format!("operator-{namespace}"))
            .envs(env.iter().copied())
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
        Self { child, logs, address }
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
        let _ = self.child.kill().await;
    }

    /// SIGTERM: a graceful stop; returns the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(status.success());
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
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    }
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
    }
}
