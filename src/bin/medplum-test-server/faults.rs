//! Fault injection switched at run time (`PUT /__test/faults`) and request counts
//! (`GET /__test/stats`), for tests of the operator's behaviour under failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::App;
use crate::outcome::Outcome;

/// What to inject. Rates are shares of matching requests in [0, 1].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultConfig {
    /// Added to every matching request.
    pub latency_ms: u64,
    /// Share answered 500.
    pub error_rate: f64,
    /// Share answered 429 (Medplum's shape, no Retry-After).
    pub too_many_requests_rate: f64,
    /// Share whose connection is dropped before a response.
    pub drop_rate: f64,
    /// Every request dropped and new connections refused.
    pub outage: bool,
    /// Only requests whose path starts with this are affected (default: all).
    pub path_prefix: Option<String>,
}

#[derive(Default)]
pub struct Faults {
    config: Mutex<FaultConfig>,
    outage: AtomicBool,
    stats: Mutex<BTreeMap<String, u64>>,
}

impl Faults {
    fn config(&self) -> FaultConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub async fn get_faults(State(app): State<Arc<App>>) -> Json<FaultConfig> {
    Json(app.faults.config())
}

pub async fn put_faults(State(app): State<Arc<App>>, Json(config): Json<FaultConfig>) -> Json<FaultConfig> {
    app.faults.outage.store(config.outage && config.path_prefix.is_none(), Ordering::SeqCst);
    *app.faults.config.lock().unwrap_or_else(|p| p.into_inner()) = config.clone();
    Json(config)
}

/// Request counts by `METHOD /path` with ids replaced by `{id}`.
pub async fn get_stats(State(app): State<Arc<App>>) -> Json<BTreeMap<String, u64>> {
    Json(app.faults.stats.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

pub async fn reset_stats(State(app): State<Arc<App>>) -> StatusCode {
    app.faults.stats.lock().unwrap_or_else(|p| p.into_inner()).clear();
    StatusCode::NO_CONTENT
}

/// `/fhir/R4/ClientApplication/0c1…/$rotate-secret` → `/fhir/R4/ClientApplication/{id}/$rotate-secret`.
fn route_key(method: &str, path: &str) -> String {
    let normalized: Vec<&str> =
        path.split('/').map(|segment| if uuid::Uuid::parse_str(segment).is_ok() { "{id}" } else { segment }).collect();
    format!("{method} {}", normalized.join("/"))
}

/// A response whose body fails at once: the client sees the connection end without a response.
fn dropped() -> Response {
    let body = Body::from_stream(futures::stream::once(async {
        Err::<axum::body::Bytes, std::io::Error>(std::io::Error::other("connection dropped by fault injection"))
    }));
    Response::new(body)
}

pub async fn inject(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if path.starts_with("/__test/") {
        return next.run(request).await;
    }
    *app.faults
        .stats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(route_key(request.method().as_str(), &path))
        .or_default() += 1;

    let config = app.faults.config();
    if config.path_prefix.as_deref().is_some_and(|prefix| !path.starts_with(prefix)) {
        return next.run(request).await;
    }
    if config.outage {
        return dropped();
    }
    if config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.latency_ms)).await;
    }
    let roll: f64 = rand::random();
    if roll < config.drop_rate {
        return dropped();
    }
    if roll < config.drop_rate + config.error_rate {
        return Outcome::server_error().into_response();
    }
    if roll < config.drop_rate + config.error_rate + config.too_many_requests_rate {
        return Outcome::too_many_requests(60_000, 1, 0).into_response();
    }
    next.run(request).await
}

/// A TLS acceptor for a PEM certificate chain and key.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

type Connection =
    tokio_util::either::Either<tokio::net::TcpStream, tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// A listener, plain or TLS, that refuses (accepts and closes) new connections during an outage.
pub struct FaultyListener {
    inner: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    faults: Arc<Faults>,
}

impl FaultyListener {
    pub fn new(inner: tokio::net::TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, faults: Arc<Faults>) -> Self {
        Self { inner, tls, faults }
    }
}

impl axum::serve::Listener for FaultyListener {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if self.faults.outage.load(Ordering::SeqCst) {
                continue;
            }
            match &self.tls {
                None => return (Connection::Left(stream), peer),
                // A failed handshake (e.g. a client that does not trust the CA) just ends that connection.
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => return (Connection::Right(tls), peer),
                    Err(_) => continue,
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The peer address of a connection accepted by [`FaultyListener`] (rate limits are per IP).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, FaultyListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, FaultyListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}
