//! A Medplum-compatible HTTP server for the operator's tests and local runs.
//!
//! It follows the behaviour of a real Medplum 5.1.29 as recorded in `../shared/medplum-api/`
//! (auth, ClientApplication, `$rotate-secret`, AccessPolicy, invites, memberships, tags, conditional
//! writes, ETags, errors, rate limits). It is not part of the operator binary. State lives in memory.
//! Test-only endpoints under `/__test/` switch fault injection at run time and report request counts.

// Handlers reject with whole HTTP responses, as axum extractors do.
#![allow(clippy::result_large_err)]

mod admin;
mod auth;
mod faults;
mod fhir;
mod limits;
mod outcome;
mod register;
mod search;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;

/// Command line of the test server; every flag has an environment fallback.
#[derive(Parser, Debug, Clone)]
#[command(name = "medplum-test-server", about = "Medplum-compatible test server (in memory)")]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (the chosen URL is printed on stdout).
    #[arg(long, env = "MEDPLUM_TEST_SERVER_LISTEN", default_value = "127.0.0.1:8103")]
    pub listen: SocketAddr,
    /// Client id of the seeded super-admin ClientApplication.
    #[arg(
        long,
        env = "MEDPLUM_TEST_SERVER_SUPER_ADMIN_CLIENT_ID",
        default_value = "5e9c7a2b-4c6f-4b1e-9f3a-6b8d2c1e0a01"
    )]
    pub super_admin_client_id: String,
    /// Secret of the seeded super-admin ClientApplication.
    #[arg(long, env = "MEDPLUM_TEST_SERVER_SUPER_ADMIN_CLIENT_SECRET", hide_env_values = true)]
    pub super_admin_client_secret: String,
    /// Apply the rate limits and FHIR quotas below (Medplum's production default).
    #[arg(long, env = "MEDPLUM_TEST_SERVER_RATE_LIMITS_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub rate_limits_enabled: bool,
    /// Requests a minute per IP to /oauth2/* and /auth/* (except /auth/me).
    #[arg(long, env = "MEDPLUM_TEST_SERVER_AUTH_RATE_LIMIT", default_value_t = 160)]
    pub auth_rate_limit: u32,
    /// Requests a minute per IP to every other path.
    #[arg(long, env = "MEDPLUM_TEST_SERVER_DEFAULT_RATE_LIMIT", default_value_t = 60_000)]
    pub default_rate_limit: u32,
    /// FHIR quota units a minute per membership (read 1, history 10, search 20, write 100).
    #[arg(long, env = "MEDPLUM_TEST_SERVER_FHIR_QUOTA", default_value_t = 50_000)]
    pub fhir_quota: u32,
    /// PEM certificate chain to serve HTTPS with (with --tls-key); default plain HTTP.
    #[arg(long, env = "MEDPLUM_TEST_SERVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MEDPLUM_TEST_SERVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Version string reported by /healthcheck and /fhir/R4/metadata.
    #[arg(long, env = "MEDPLUM_TEST_SERVER_VERSION", default_value = "5.1.29-testserver")]
    pub version: String,
}

#[tokio::main]
async fn main() {
    let config = Config::parse();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap_or_else(|e| {
        eprintln!("medplum-test-server: cannot listen on {}: {e}", config.listen);
        std::process::exit(1);
    });
    let local = listener.local_addr().expect("bound listener has an address");
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(faults::tls_acceptor(cert, key).unwrap_or_else(|e| {
            eprintln!("medplum-test-server: TLS: {e}");
            std::process::exit(1);
        })),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = format!("{scheme}://{local}/");
    let app = Arc::new(App::new(config, base_url.clone()));
    // The first stdout line is the contract with test harnesses and scripts.
    println!("listening on {base_url}");
    let router = routes(app.clone());
    let listener = faults::FaultyListener::new(listener, tls, app.faults.clone());
    axum::serve(listener, router.into_make_service_with_connect_info::<faults::Peer>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .expect("server runs until shut down");
}

/// Shared state of the server.
pub struct App {
    pub config: Config,
    pub base_url: String,
    pub store: std::sync::Mutex<store::Store>,
    pub limits: limits::Limits,
    pub faults: Arc<faults::Faults>,
}

impl App {
    fn new(config: Config, base_url: String) -> Self {
        let store = store::Store::seeded(&config.super_admin_client_id, &config.super_admin_client_secret);
        let limits = limits::Limits::new(&config);
        Self { config, base_url, store: std::sync::Mutex::new(store), limits, faults: Arc::default() }
    }

    /// The store, usable even if a handler panicked while holding it (state stays consistent
    /// because every mutation is a single insert).
    pub fn store(&self) -> std::sync::MutexGuard<'_, store::Store> {
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn routes(app: Arc<App>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/healthcheck", get(auth::healthcheck))
        .route("/oauth2/token", post(auth::token))
        .route("/oauth2/introspect", post(auth::introspect))
        .route("/auth/me", get(auth::me))
        .route("/auth/method", post(auth::method))
        .route("/auth/newuser", post(register::new_user))
        .route("/auth/newpatient", post(register::new_patient))
        .route("/auth/setpassword", post(register::set_password))
        .route("/.well-known/openid-configuration", get(auth::openid_configuration))
        .route("/admin/projects/{pid}", get(admin::get_project))
        .route("/admin/projects/{pid}/client", post(admin::create_client))
        .route("/admin/projects/{pid}/invite", post(admin::invite))
        .route(
            "/admin/projects/{pid}/members/{mid}",
            get(admin::get_member).post(admin::update_member).delete(admin::delete_member),
        )
        .route("/fhir/R4/metadata", get(fhir::metadata))
        .route("/fhir/R4/Project/$init", post(fhir::project_init))
        .route("/fhir/R4", get(fhir::search_system))
        .route("/fhir/R4/{rtype}", get(fhir::search).post(fhir::create).put(fhir::conditional_update))
        .route("/fhir/R4/{rtype}/{id}", get(fhir::read).put(fhir::update).patch(fhir::patch).delete(fhir::delete))
        .route("/fhir/R4/{rtype}/{id}/{operation}", post(fhir::instance_operation))
        .route("/__test/faults", get(faults::get_faults).put(faults::put_faults))
        .route("/__test/stats", get(faults::get_stats).delete(faults::reset_stats))
        .fallback(fhir::not_found_route)
        .layer(axum::middleware::from_fn_with_state(app.clone(), limits::rate_limit))
        .layer(axum::middleware::from_fn_with_state(app.clone(), faults::inject))
        .with_state(app)
}
