//! Test support: the local control plane, per-test namespaces, the Medplum target (the test server or
//! a real Medplum), Medplum bootstrap, and the operator as a child process.

pub mod cluster;
pub mod container;
pub mod fixtures;
pub mod medplum;
pub mod operator;
pub mod tools;

pub use cluster::{TestNamespace, cluster_client};
pub use medplum::{MedplumTarget, ProjectAdmin};
pub use operator::Operator;

use std::future::Future;
use std::time::Duration;

/// Installs the one rustls crypto provider (ring) for this test process.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A random lowercase suffix for names.
pub fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// Records that the running test skipped its checks on this Medplum target, and why. The line goes to
/// stdout and, when `MEDPLUM_OPERATOR_SKIP_LOG` names a file, into it, so `hack/test.sh` can count
/// and list the skips of a run.
pub fn skip(reason: &str) {
    let test = std::thread::current().name().unwrap_or("unknown test").to_string();
    println!("SKIPPED: {reason}");
    if let Some(path) = std::env::var_os("MEDPLUM_OPERATOR_SKIP_LOG") {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("skip log");
        writeln!(file, "{test}: {reason}").expect("writing the skip log");
    }
}
