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
        Command::Export(args) => {
            rustls::crypto::ring::default_provider().install_default().expect("no other crypto provider was installed");
            return match medplum_operator::export::run_export(args).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("export: {e}");
                    std::process::ExitCode::from(2)
                }
            };
        }
        Command::Diff(args) => {
            rustls::crypto::ring::default_provider().install_default().expect("no other crypto provider was installed");
            return match medplum_operator::export::run_diff(args).await {
                Ok(false) => std::process::ExitCode::SUCCESS,
                Ok(true) => std::process::ExitCode::from(1),
                Err(e) => {
                    eprintln!("diff: {e}");
                    std::process::ExitCode::from(2)
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
    let leader = LeaderElection::from_settings(client.clone(), &settings);
    // A standby is healthy and ready: it only waits.
    readiness.set_ready();
    match leader.run(controller::run(client, settings, metrics, readiness)).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(()) => std::process::ExitCode::FAILURE,
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
