//! `hack/dev.sh` as a newcomer runs it, on a machine where another Medplum already answers on
//! Medplum's default port 8103: a first run, a run that fails (a taken `MEDPLUM_PORT`), a rerun after
//! it, and `stop`, twice. Against a real Medplum (`MEDPLUM_TEST_*` set) the demo runs with
//! `--real-medplum`. The script gets a state folder and a control plane of its own.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::MedplumTarget;

fn script(state: &Path, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let output = std::process::Command::new("bash")
        .arg(root.join("hack/dev.sh"))
        .args(args)
        .env("DEV_STATE_DIR", state.join("dev"))
        .env("CONTROLPLANE_DIR", state.join("cluster"))
        .env_remove("KUBECONFIG")
        .env_remove("MEDPLUM_PORT")
        .env_remove("OPERATOR_ADDRESS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running hack/dev.sh");
    (output, started.elapsed())
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// The processes a PID file of the script names, if they still run.
fn running(state: &Path, file: &str) -> bool {
    let pid = std::fs::read_to_string(state.join("dev").join(file)).unwrap_or_default();
    !pid.trim().is_empty() && Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[tokio::test]
async fn the_dev_script_just_works_beside_another_medplum() {
    crate::support::init();
    // Another Medplum on 8103, answering health checks like any Medplum (unless something listens
    // there already, which serves the test as well).
    let squatter = std::net::TcpListener::bind("127.0.0.1:8103").map(drop).is_ok().then(|| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_medplum-test-server"))
            .args(["--listen", "127.0.0.1:8103", "--super-admin-client-id", "someone-else"])
            .args(["--super-admin-client-secret", "not-ours"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("a Medplum on 8103")
    });
    crate::support::eventually(Duration::from_secs(10), "something answers on 8103", || async {
        reqwest::get("http://127.0.0.1:8103/healthcheck").await.ok().map(|_| ())
    })
    .await;
    let real = !MedplumTarget::start().await.is_test_server();
    let state = std::env::temp_dir().join(format!("medplum-dev-{}", crate::support::suffix()));
    let demo: &[&str] = if real { &["--real-medplum"] } else { &[] };

    let (first, first_took) = script(&state, demo, &[]);
    assert!(first.status.success(), "{}", text(&first));
    let said = text(&first);
    for line in [
        "allowed: GET  /fhir/R4/Observation  -> 200",
        "refused: POST /fhir/R4/Observation  -> 403",
        "refused: GET  /fhir/R4/Patient      -> 403",
        "and Medplum sends ada@acme.example to the identity provider of DomainConfiguration acme:\n  https://login.acme.example/oauth2/authorize",
    ] {
        assert!(said.contains(line), "the summary shows {line:?}:\n{said}");
    }
    // The chosen Medplum reached every manifest the script applied.
    let medplum = said.lines().find_map(|l| l.strip_prefix("Medplum: ")).expect("the summary names Medplum");
    let medplum = medplum.split_whitespace().next().unwrap();
    assert!(!medplum.ends_with(":8103"), "the demo used the other Medplum: {medplum}");
    for manifest in ["medplum-connection.yaml", "cluster-medplum-connection.yaml"] {
        let applied = std::fs::read_to_string(state.join("dev/manifests").join(manifest)).unwrap();
        assert!(applied.contains(&format!("baseUrl: {medplum}/")), "{manifest}:\n{applied}");
    }

    if !real {
        // A port in use is one clear line naming the fix, and nothing is started.
        let (taken, _) = script(&state, &[], &[("MEDPLUM_PORT", "8103")]);
        assert!(!taken.status.success());
        let said = String::from_utf8_lossy(&taken.stderr);
        let last = said.lines().last().unwrap_or_default();
        assert!(last.contains("port 8103 is in use") && last.contains("MEDPLUM_PORT"), "{said}");
    }
    // A rerun after a run that died just works, whatever PID files it left: one naming a process
    // long gone, one naming a live process that is not the script's (this test's own).
    for file in ["operator.pid", "medplum.pid"] {
        if let Ok(pid) = std::fs::read_to_string(state.join("dev").join(file)) {
            let _ = std::process::Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
    std::fs::write(state.join("dev/medplum.pid"), "4194303").unwrap();
    std::fs::write(state.join("dev/operator.pid"), std::process::id().to_string()).unwrap();
    let (again, again_took) = script(&state, demo, &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(running(&state, "operator.pid"));
    println!(
        "figure: hack/dev.sh{}: first run {:.1} s, rerun {:.1} s (control plane already built)",
        if real { " --real-medplum" } else { "" },
        first_took.as_secs_f64(),
        again_took.as_secs_f64()
    );

    for _ in 0..2 {
        let (stopped, _) = script(&state, &["stop"], &[]);
        assert!(stopped.status.success(), "{}", text(&stopped));
        assert!(!running(&state, "operator.pid") && !running(&state, "medplum.pid"));
        assert!(!state.join("cluster/api.port").exists(), "the control plane stopped");
    }
    drop(squatter);
    let _ = std::fs::remove_dir_all(&state);
}
