//! The control plane's command line tools (kubectl, helm), built by hack/controlplane/build.sh.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use super::cluster::kubeconfig;

fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| built_by("hack/controlplane/build.sh"))
}

/// A file of the repository.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs one of the repository's build scripts, which print the path of what they built.
pub fn built_by(script: &str) -> PathBuf {
    let output = Command::new("bash").arg(repo(script)).stderr(Stdio::inherit()).output().expect("running bash");
    assert!(output.status.success(), "{script} failed");
    PathBuf::from(String::from_utf8(output.stdout).expect("UTF-8").trim())
}

/// The chart's folder.
pub fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/medplum-operator")
}

/// `helm template` of the chart for `release` in `namespace` with `--set` values, or one template of it.
pub fn helm_template(release: &str, namespace: &str, sets: &[&str], only: Option<&str>) -> String {
    let chart = chart();
    let mut args =
        vec!["template", release, chart.to_str().unwrap(), "--namespace", namespace, "--kube-version", "1.37.2"];
    for set in sets {
        args.extend(["--set", set]);
    }
    if let Some(template) = only {
        args.extend(["--show-only", template]);
    }
    ok("helm", &args, None)
}

/// Runs a tool of the control plane with the admin kubeconfig, feeding `stdin`.
pub fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join(tool))
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("medplum-operator-helm/cache"))
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("medplum-operator-helm/config"))
        .env("HELM_DATA_HOME", std::env::temp_dir().join("medplum-operator-helm/data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("writing stdin");
    }
    drop(input);
    child.wait_with_output().expect("waiting for the tool")
}

/// Runs a tool and returns its stdout, or panics with its stderr.
pub fn ok(tool: &str, args: &[&str], stdin: Option<&str>) -> String {
    let output = run(tool, args, stdin);
    assert!(output.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// Runs a bash `script` as a user types it, with the control plane's tools first on the PATH and the
/// admin kubeconfig; returns its stdout, or panics with its stderr.
pub fn shell(script: &str) -> String {
    let path = format!("{}:{}", bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .env("PATH", path)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .expect("running bash");
    assert!(output.status.success(), "{script}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("UTF-8")
}
