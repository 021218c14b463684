//! Medplum's rate limits: requests per IP and category in a 60 s window, and the FHIR quota per
//! membership (read 1, history 10, search 20, write 100 units). A 429 carries no `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::outcome::Outcome;
use crate::{App, Config};

const WINDOW: Duration = Duration::from_secs(60);

struct Window {
    started: Instant,
    consumed: u32,
}

/// Fixed 60 s windows keyed by (bucket, key).
#[derive(Default)]
struct Counters(Mutex<HashMap<(&'static str, String), Window>>);

struct Consumption {
    allowed: bool,
    remaining: u32,
    consumed: u32,
    reset: Duration,
}

impl Counters {
    fn consume(&self, bucket: &'static str, key: String, points: u32, limit: u32) -> Consumption {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let window = map.entry((bucket, key)).or_insert(Window { started: now, consumed: 0 });
        if now.duration_since(window.started) >= WINDOW {
            *window = Window { started: now, consumed: 0 };
        }
        window.consumed = window.consumed.saturating_add(points);
        let reset = WINDOW.saturating_sub(now.duration_since(window.started));
        Consumption {
            allowed: window.consumed <= limit,
            remaining: limit.saturating_sub(window.consumed),
            consumed: window.consumed,
            reset,
        }
    }
}

pub struct Limits {
    enabled: bool,
    auth: u32,
    default: u32,
    fhir_quota: u32,
    counters: Counters,
}

impl Limits {
    pub fn new(config: &Config) -> Self {
        Self {
            enabled: config.rate_limits_enabled,
            auth: config.auth_rate_limit,
            default: config.default_rate_limit,
            fhir_quota: config.fhir_quota,
            counters: Counters::default(),
        }
    }
}

/// The limiter category of a path, as Medplum splits them.
fn category(path: &str) -> &'static str {
    if path == "/auth/me" {
        "default"
    } else if path.starts_with("/oauth2/") || path.starts_with("/auth/") {
        "auth"
    } else {
        "default"
    }
}

/// Quota units of a FHIR interaction; a conditional create (`If-None-Exist`) is charged its search too.
fn fhir_cost(method: &Method, path: &str, conditional: bool) -> u32 {
    let segments = path.trim_start_matches("/fhir/R4").split('/').filter(|s| !s.is_empty()).count();
    match *method {
        Method::GET if path.contains("/_history") => 10,
        Method::GET if segments >= 2 => 1,
        Method::GET => 20,
        _ if conditional => 120,
        _ => 100,
    }
}

/// `t` is the seconds to the window's end rounded up, as Medplum writes it.
fn header_value(name: &str, c: &Consumption) -> HeaderValue {
    let seconds = c.reset.as_millis().div_ceil(1000).max(1);
    HeaderValue::from_str(&format!("\"{name}\";r={};t={seconds}", c.remaining)).expect("rate limit header is ASCII")
}

fn too_many(c: &Consumption, limit: u32) -> Response {
    Outcome::too_many_requests(c.reset.as_millis() as u64, c.consumed, limit).into_response()
}

pub async fn rate_limit(
    State(app): State<Arc<App>>,
    ConnectInfo(crate::faults::Peer(peer)): ConnectInfo<crate::faults::Peer>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    if !app.limits.enabled || path.starts_with("/__test/") {
        return next.run(request).await;
    }
    let limits = &app.limits;
    let ip: IpAddr = peer.ip();
    let bucket = category(&path);
    let limit = if bucket == "auth" { limits.auth } else { limits.default };
    let requests = limits.counters.consume(bucket, ip.to_string(), 1, limit);
    if !requests.allowed {
        let mut response = too_many(&requests, limit);
        response.headers_mut().append("ratelimit", header_value("requests", &requests));
        return response;
    }

    // The FHIR quota is charged to the calling membership; super admins are not charged.
    // `/fhir/R4` itself is the system-level search.
    let fhir = path == "/fhir/R4" || path.starts_with("/fhir/R4/");
    let quota = if fhir && path != "/fhir/R4/metadata" {
        let conditional = request.headers().contains_key("if-none-exist");
        let cost = fhir_cost(request.method(), &path, conditional);
        bearer_member(&app, &request).map(|(membership, quota)| {
            let quota = quota.unwrap_or(limits.fhir_quota);
            (limits.counters.consume("fhir", membership, cost, quota), quota)
        })
    } else {
        None
    };
    if let Some((q, limit)) = quota.as_ref().filter(|(q, _)| !q.allowed) {
        let mut response = too_many(q, *limit);
        response.headers_mut().append("ratelimit", header_value("requests", &requests));
        response.headers_mut().append("ratelimit", header_value("fhirInteractions", q));
        return response;
    }
    let mut response = next.run(request).await;
    response.headers_mut().append("ratelimit", header_value("requests", &requests));
    if let Some((q, _)) = &quota {
        response.headers_mut().append("ratelimit", header_value("fhirInteractions", q));
    }
    response
}

/// The membership behind a bearer token, unless it is a super admin's, and its project's quota per
/// member when the project sets one (`Project.systemSetting` `userFhirQuota`, as in Medplum).
fn bearer_member(app: &App, request: &Request) -> Option<(String, Option<u32>)> {
    let token = request.headers().get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?;
    let store = app.store();
    let login = store.tokens.get(token.trim())?;
    if login.project_id == store.super_admin_project {
        return None;
    }
    let settings = store.find("Project", &login.project_id).and_then(|p| p["systemSetting"].as_array().cloned());
    let quota = settings
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "userFhirQuota")
        .and_then(|s| s["valueInteger"].as_u64())
        .and_then(|q| u32::try_from(q).ok());
    Some((login.membership_id.clone(), quota))
}
