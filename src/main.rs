use std::sync::Arc;

use clap::Parser;
use medplum_operator::config::{Cli, Command};
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

    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client");
            return std::process::ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::default());
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
    controller::run(client, settings, metrics, readiness).await;
    tracing::info!("stopped");
    std::process::ExitCode::SUCCESS
}
