//! Pacing requests by what Medplum's `RateLimit` headers say, so that the operator stays inside
//! Medplum's limits by design instead of retrying into 429s.
//!
//! Medplum counts in fixed 60 s windows and reports, on every answer, what is left and when the
//! window ends: `"requests";r=<left>;t=<seconds>` for the limit of the caller's IP in the request's
//! category (`auth`: `/oauth2/*` and `/auth/*` but `/auth/me`, 160 a minute; `default`: the rest,
//! 60,000), and `"fhirInteractions";r=..;t=..` for the FHIR quota of the calling membership (read 1,
//! history 10, search 20, write 100 units, a conditional create 120; 50,000 a minute). The IP budgets
//! of one server are shared by every connection to it (the operator has one address); the FHIR budget
//! belongs to one credential. A request waits while what is left, less what requests in flight may
//! spend, would not cover it, until the window ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Which of Medplum's limits a budget tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Requests per IP to `/oauth2/*` and `/auth/*` except `/auth/me`.
    Auth,
    /// Requests per IP to everything else.
    Default,
    /// FHIR quota units of the calling membership.
    FhirQuota,
}

impl Limit {
    pub const ALL: [Limit; 3] = [Self::Auth, Self::Default, Self::FhirQuota];

    pub fn label(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Default => "requests",
            Self::FhirQuota => "fhir_quota",
        }
    }
}

/// What one request will spend, budget by budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// `Auth` or `Default`: one request of the IP's category.
    pub category: Limit,
    /// FHIR quota units, for requests charged to the membership.
    pub fhir_units: u32,
}

impl Cost {
    /// The cost of `method path` (relative to the base URL), as Medplum charges it; a `conditional`
    /// create (`If-None-Exist`) is charged its search too.
    pub fn of(method: &reqwest::Method, path: &str, conditional: bool) -> Self {
        let category = if path != "auth/me" && (path.starts_with("oauth2/") || path.starts_with("auth/")) {
            Limit::Auth
        } else {
            Limit::Default
        };
        let fhir_units = match path.strip_prefix("fhir/R4") {
            Some(rest) => {
                let segments = rest.split('/').filter(|s| !s.is_empty()).count();
                match *method {
                    reqwest::Method::GET if rest.contains("/_history") => 10,
                    reqwest::Method::GET if segments >= 2 => 1,
                    reqwest::Method::GET => 20,
                    _ if conditional => 120,
                    _ => 100,
                }
            }
            None => 0,
        };
        Self { category, fhir_units }
    }
}

/// One `RateLimit` header value: the budget it names, what is left, and seconds to the window's end.
pub fn parse_header(value: &str) -> Option<(Limit, u64, u64)> {
    let mut parts = value.split(';').map(str::trim);
    let limit = match parts.next()?.trim_matches('"') {
        "requests" => None,
        "fhirInteractions" => Some(Limit::FhirQuota),
        _ => return None,
    };
    let (mut remaining, mut reset) = (None, None);
    for part in parts {
        match part.split_once('=') {
            Some(("r", v)) => remaining = v.parse::<i64>().ok().map(|r| r.max(0) as u64),
            Some(("t", v)) => reset = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    // `requests` is the IP budget of the request's own category; the caller knows which.
    Some((limit.unwrap_or(Limit::Default), remaining?, reset?))
}

#[derive(Debug)]
struct Budget {
    /// What the last answer said is left in the window, and when the window ends.
    remaining: u64,
    ends: Instant,
    /// Spent by requests sent since that answer and not answered yet.
    in_flight: u64,
}

impl Budget {
    /// How long a request costing `cost` must wait now (zero: it may go).
    fn wait(&self, cost: u64, now: Instant) -> Duration {
        if now >= self.ends || self.remaining >= self.in_flight + cost { Duration::ZERO } else { self.ends - now }
    }
}

/// The budgets of one server (its IP budgets) or one credential (its FHIR quota).
#[derive(Debug, Default)]
pub struct Budgets(Mutex<HashMap<Limit, Budget>>);

/// Two answers whose windows end this close together speak of the same window (Medplum rounds the
/// seconds left up, so one window's end can be read up to a second apart).
const SAME_WINDOW: Duration = Duration::from_secs(2);

/// Medplum answers a window's end in whole seconds, rounded up; this much more is waited so that
/// the next request does not land in the last moment of the old window.
const WINDOW_MARGIN: Duration = Duration::from_millis(250);

impl Budgets {
    /// Reserves `cost` of `limit` once the budget allows it; returns how long it waited for that
    /// (zero when it did not have to).
    pub async fn acquire(&self, limit: Limit, cost: u64) -> Duration {
        let started = Instant::now();
        let mut waited = false;
        loop {
            let wait = {
                let mut budgets = self.0.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let took = if waited { started.elapsed() } else { Duration::ZERO };
                match budgets.get_mut(&limit) {
                    None => return took,
                    Some(budget) => {
                        let wait = budget.wait(cost, now);
                        if wait.is_zero() {
                            if now >= budget.ends {
                                // A new window: its budget is unknown until the next answer says it.
                                budgets.remove(&limit);
                            } else {
                                budget.in_flight += cost;
                            }
                            return took;
                        }
                        wait
                    }
                }
            };
            tokio::time::sleep(wait + WINDOW_MARGIN).await;
            waited = true;
        }
    }

    /// Takes in what an answer said of `limit`, and ends the reservation of `cost`.
    pub fn update(&self, limit: Limit, cost: u64, said: Option<(u64, u64)>) {
        let mut budgets = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let in_flight = budgets.get(&limit).map(|b| b.in_flight.saturating_sub(cost)).unwrap_or(0);
        match said {
            Some((remaining, reset)) => {
                let ends = now + Duration::from_secs(reset);
                // Answers to concurrent requests can arrive in another order than Medplum counted
                // them: within one window, what is left is the least that any answer said.
                let remaining = match budgets.get(&limit) {
                    Some(known) if now < known.ends && ends <= known.ends + SAME_WINDOW => {
                        remaining.min(known.remaining)
                    }
                    _ => remaining,
                };
                budgets.insert(limit, Budget { remaining, ends, in_flight });
            }
            None => {
                if let Some(budget) = budgets.get_mut(&limit) {
                    budget.in_flight = in_flight;
                }
            }
        }
    }
}

/// The budgets of every server and credential the operator talks to, shared by all connections.
#[derive(Debug, Default)]
pub struct Pacing {
    servers: Mutex<HashMap<String, Arc<Budgets>>>,
    credentials: Mutex<HashMap<(String, String), Arc<Budgets>>>,
}

impl Pacing {
    /// The IP budgets of the server at `authority` (host and port).
    pub fn server(&self, authority: &str) -> Arc<Budgets> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner()).entry(authority.to_string()).or_default().clone()
    }

    /// The FHIR quota of the credential `client_id` on the server at `authority`.
    pub fn credential(&self, authority: &str, client_id: &str) -> Arc<Budgets> {
        let key = (authority.to_string(), client_id.to_string());
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::Method;

    #[test]
    fn costs_follow_medplum_s_categories_and_quota_units() {
        let cost = |m: Method, p: &str| Cost::of(&m, p, false);
        assert_eq!(cost(Method::POST, "oauth2/token"), Cost { category: Limit::Auth, fhir_units: 0 });
        assert_eq!(cost(Method::GET, "auth/me"), Cost { category: Limit::Default, fhir_units: 0 });
        assert_eq!(cost(Method::GET, "fhir/R4/ClientApplication"), Cost { category: Limit::Default, fhir_units: 20 });
        assert_eq!(cost(Method::GET, "fhir/R4"), Cost { category: Limit::Default, fhir_units: 20 });
        assert_eq!(cost(Method::GET, "fhir/R4/ClientApplication/x").fhir_units, 1);
        assert_eq!(cost(Method::GET, "fhir/R4/ClientApplication/x/_history").fhir_units, 10);
        assert_eq!(cost(Method::PUT, "fhir/R4/ClientApplication/x").fhir_units, 100);
        assert_eq!(Cost::of(&Method::POST, "fhir/R4/ClientApplication", true).fhir_units, 120);
        assert_eq!(cost(Method::POST, "admin/projects/p/invite"), Cost { category: Limit::Default, fhir_units: 0 });
    }

    #[test]
    fn headers_are_read_as_medplum_writes_them() {
        assert_eq!(parse_header("\"requests\";r=159;t=60"), Some((Limit::Default, 159, 60)));
        assert_eq!(parse_header("\"fhirInteractions\";r=49880;t=58"), Some((Limit::FhirQuota, 49880, 58)));
        assert_eq!(parse_header("\"fhirInteractions\";r=-20;t=3"), Some((Limit::FhirQuota, 0, 3)));
        assert_eq!(parse_header("\"other\";r=1;t=1"), None);
        assert_eq!(parse_header("garbage"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_the_window_its_cost_fits_in() {
        let budgets = Budgets::default();
        // Nothing known yet: go.
        assert_eq!(budgets.acquire(Limit::FhirQuota, 100).await, Duration::ZERO);
        budgets.update(Limit::FhirQuota, 100, Some((150, 30)));
        // 150 left: one write goes at once, a second one would not fit beside it.
        assert_eq!(budgets.acquire(Limit::FhirQuota, 100).await, Duration::ZERO);
        let waited = budgets.acquire(Limit::FhirQuota, 100).await;
        assert!(waited >= Duration::from_secs(30) && waited < Duration::from_secs(31), "{waited:?}");
        // After the window the budget is unknown again until an answer says it.
        assert_eq!(budgets.acquire(Limit::FhirQuota, 100).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_arrives_late_does_not_raise_what_is_left() {
        let budgets = Budgets::default();
        budgets.update(Limit::FhirQuota, 0, Some((1000, 30)));
        for _ in 0..3 {
            budgets.acquire(Limit::FhirQuota, 100).await;
        }
        // Medplum counted them in this order: 900, 800, 700 left; the answers come 700, 900, 800.
        budgets.update(Limit::FhirQuota, 100, Some((700, 30)));
        budgets.update(Limit::FhirQuota, 100, Some((900, 30)));
        budgets.update(Limit::FhirQuota, 100, Some((800, 29)));
        let left = budgets.0.lock().unwrap()[&Limit::FhirQuota].remaining;
        assert_eq!(left, 700);
        // A new window's first answer is taken as it is.
        tokio::time::advance(Duration::from_secs(31)).await;
        budgets.update(Limit::FhirQuota, 0, Some((49_900, 60)));
        assert_eq!(budgets.0.lock().unwrap()[&Limit::FhirQuota].remaining, 49_900);
    }

    /// On a real clock, too: a request that did not wait does not count as a wait in the metrics.
    #[tokio::test]
    async fn a_request_that_fits_reports_no_wait() {
        let budgets = Budgets::default();
        assert_eq!(budgets.acquire(Limit::Default, 1).await, Duration::ZERO);
        budgets.update(Limit::Default, 1, Some((100, 60)));
        for _ in 0..10 {
            assert_eq!(budgets.acquire(Limit::Default, 1).await, Duration::ZERO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_release_what_was_reserved() {
        let budgets = Budgets::default();
        budgets.update(Limit::Auth, 0, Some((2, 60)));
        assert_eq!(budgets.acquire(Limit::Auth, 1).await, Duration::ZERO);
        assert_eq!(budgets.acquire(Limit::Auth, 1).await, Duration::ZERO);
        // Both answered: one left.
        budgets.update(Limit::Auth, 1, Some((1, 59)));
        budgets.update(Limit::Auth, 1, Some((1, 59)));
        assert_eq!(budgets.acquire(Limit::Auth, 1).await, Duration::ZERO);
    }
}
