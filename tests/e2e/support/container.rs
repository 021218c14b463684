//! The chart's operator container run with podman as a kubelet would run it: the pod's user, read-only
//! root filesystem, dropped capabilities, no new privileges and the runtime's default seccomp profile.
//! Host networking reaches the local control plane and Medplum. image.rs runs the chart's pods this way,
//! and `OPERATOR_IMAGE` makes every [`super::Operator`] a container (the benchmarks measure it so).

use std::process::{Command, Output};

use serde_json::{Value, json};

use super::tools::helm_template;

/// podman, or a panic that names the package: the image's tests never skip.
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("podman is needed to run the operator's image (apt-get install podman): {e}"))
}

pub fn podman_ok(args: &[&str]) -> String {
    let output = podman(args);
    assert!(output.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A soft limit of this process (`Max open files`, `Max processes`): podman may not raise one.
fn limit(name: &str) -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..].split_whitespace().next().unwrap().parse().unwrap_or(4096)
}

/// The chart's operator container rendered for `release` in `namespace` with `--set` values, with the
/// pod's `securityContext` as `podSecurityContext` and its `terminationGracePeriodSeconds`.
pub fn chart_container(release: &str, namespace: &str, sets: &[&str]) -> Value {
    let yaml = helm_template(release, namespace, sets, Some("templates/deployment.yaml"));
    let deployment: Value = serde_yaml::from_str(&yaml).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let mut container = pod["containers"][0].clone();
    container["podSecurityContext"] = pod["securityContext"].clone();
    container["terminationGracePeriodSeconds"] = pod.get("terminationGracePeriodSeconds").cloned().unwrap_or(json!(30));
    container
}

/// `podman run` up to its environment: the container `name`, runc, host networking, and the
/// container's security settings and this process's limits.
pub fn run_args(container: &Value, name: &str) -> Vec<String> {
    let security = &container["securityContext"];
    let pod_security = &container["podSecurityContext"];
    let user = format!("{}:{}", pod_security["runAsUser"], pod_security["runAsGroup"]);
    let mut args: Vec<String> =
        ["run", "--name", name, "--runtime", "/usr/sbin/runc", "--network", "host", "--user", &user]
            .map(String::from)
            .into();
    if security["readOnlyRootFilesystem"] == json!(true) {
        args.push("--read-only".into());
    }
    for capability in security["capabilities"]["drop"].as_array().into_iter().flatten() {
        args.extend(["--cap-drop".into(), capability.as_str().unwrap().into()]);
    }
    if security["allowPrivilegeEscalation"] == json!(false) {
        args.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    // RuntimeDefault: the runtime's default seccomp profile, which podman applies unless told otherwise.
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    // runc refuses an nproc limit above kernel.pid_max (measured: 32,768 runs, 32,769 does not).
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let (files, processes) = (limit("Max open files"), limit("Max processes").min(pid_max));
    args.extend(["--ulimit".into(), format!("nofile={files}:{files}")]);
    args.extend(["--ulimit".into(), format!("nproc={processes}:{processes}")]);
    args
}

/// The host's PID of a running container's process.
pub fn pid(name: &str) -> u32 {
    podman_ok(&["inspect", "--format", "{{.State.Pid}}", name]).parse().expect("a running container's PID")
}

/// A process's memory field from /proc (`VmRSS`, `RssAnon`, `RssFile`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}
