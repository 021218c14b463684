use std::sync::Arc;

use clap::Parser;
use medplum_operator::config::{Cli, Command};
use medplum_operator::leader::LeaderElection;
use medplum_operator::{controller, crd, metrics::Metrics, server, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match cli.command {
        Command::Crds { dir: None } => {
            for definition in crd::all() {
                print!("---\n{}", crd::to_yaml(&definition));
            }
            return std::process::ExitCode::SUCCESS;
        }
        Command::Crds { dir: Some(dir) } => {
            return match crd::write_files(&dir) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cannot write CRDs to {}: {e}", dir.display());
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Run(settings) => *settings,
    };
    rustls::crypto::ring::default_provider().install_default().expect("no other crypto provider was installed");
    telemetry::init(settings.log_format);

    let metrics = Arc::new(Metrics::default());
    let client = match kube_client(metrics.clone()).await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client");
            return std::process::ExitCode::FAILURE;
        }
    };
    let readiness = Arc::new(server::Readiness::default());
    let (address, serve) = match server::bind(settings.http_address, metrics.clone(), readiness.clone()).await {
        Ok(bound) => bound,
        Err(e) => {
            tracing::error!(address = %settings.http_address, error = %e, "cannot listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(%address, version = env!("CARGO_PKG_VERSION"), "serving /healthz, /readyz and /metrics");
    tokio::spawn(serve);
    if !settings.leader_election {
        controller::run(client, settings, metrics, readiness).await;
        tracing::info!("stopped");
        return std::process::ExitCode::SUCCESS;
    }
    let identity =
        std::env::var("POD_NAME").unwrap_or_else(|_| format!("medplum-operator-{}", uuid::Uuid::new_v4().simple()));
    let namespace = settings
        .leader_election_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".into());
    let leader = LeaderElection::new(
        client.clone(),
        &namespace,
        &settings.leader_election_lease_name,
        &identity,
        settings.leader_election_lease_duration,
        settings.leader_election_renew_deadline,
        settings.leader_election_retry_period,
    );
    // A standby is healthy and ready: it only waits.
    readiness.set_ready();
    tokio::select! {
        () = leader.acquire() => {}
        () = shutdown_signal() => return std::process::ExitCode::SUCCESS,
    }
    tokio::select! {
        () = controller::run(client, settings, metrics, readiness) => {
            leader.release().await;
            tracing::info!("stopped");
            std::process::ExitCode::SUCCESS
        }
        () = leader.hold() => {
            // Another instance may act from now on: stop at once, without finishing anything.
            tracing::error!("lost leadership; exiting");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A Kubernetes client from the environment (in-cluster or kubeconfig) that counts its requests.
async fn kube_client(metrics: Arc<Metrics>) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    let counting = tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
        metrics.record_kube_request(request.method(), request.uri());
        request
    });
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&counting).build())
}
