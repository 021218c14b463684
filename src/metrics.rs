//! Prometheus metrics. Label values are bounded: kinds, outcomes, operation names, HTTP status codes,
//! and the names of connection objects. Nothing secret and nothing per request goes into a label.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

pub struct Metrics {
    registry: Registry,
    reconciliations: Family<ReconcileLabels, Counter>,
    reconcile_duration: HistogramFamily<KindLabels>,
    medplum_requests: Family<RequestLabels, Counter>,
    medplum_request_duration: HistogramFamily<OperationLabels>,
    token_cache_hits: Counter,
    token_refreshes: Counter,
    connection_ready: Family<ObjectLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("medplum_operator");
        let reconciliations = Family::default();
        registry.register("reconciliations", "Reconciliations by kind and outcome", reconciliations.clone());
        let reconcile_duration = HistogramFamily::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register("reconcile_duration_seconds", "Duration of reconciliations", reconcile_duration.clone());
        let medplum_requests = Family::default();
        registry.register(
            "medplum_requests",
            "Requests to Medplum by operation and HTTP status",
            medplum_requests.clone(),
        );
        let medplum_request_duration = HistogramFamily::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "medplum_request_duration_seconds",
            "Latency of requests to Medplum",
            medplum_request_duration.clone(),
        );
        let token_cache_hits = Counter::default();
        registry.register("token_cache_hits", "Medplum access tokens served from the cache", token_cache_hits.clone());
        let token_refreshes = Counter::default();
        registry.register(
            "token_refreshes",
            "Medplum access tokens requested from /oauth2/token",
            token_refreshes.clone(),
        );
        let connection_ready = Family::default();
        registry.register("connection_ready", "1 when a connection is Ready, else 0", connection_ready.clone());
        Self {
            registry,
            reconciliations,
            reconcile_duration,
            medplum_requests,
            medplum_request_duration,
            token_cache_hits,
            token_refreshes,
            connection_ready,
        }
    }
}

impl Metrics {
    pub fn record_reconcile(&self, kind: &'static str, success: bool, elapsed: Duration) {
        let outcome = if success { "success" } else { "error" };
        self.reconciliations.get_or_create(&ReconcileLabels { kind, outcome }).inc();
        self.reconcile_duration.get_or_create(&KindLabels { kind }).observe(elapsed.as_secs_f64());
    }

    pub fn record_medplum_request(&self, operation: &'static str, status: &str, elapsed: Duration) {
        self.medplum_requests.get_or_create(&RequestLabels { operation, status: status.to_string() }).inc();
        self.medplum_request_duration.get_or_create(&OperationLabels { operation }).observe(elapsed.as_secs_f64());
    }

    pub fn record_token(&self, from_cache: bool) {
        if from_cache {
            self.token_cache_hits.inc()
        } else {
            self.token_refreshes.inc()
        };
    }

    pub fn set_connection_ready(&self, kind: &'static str, namespace: &str, name: &str, ready: bool) {
        let labels = ObjectLabels { kind, namespace: namespace.to_string(), name: name.to_string() };
        self.connection_ready.get_or_create(&labels).set(i64::from(ready));
    }

    pub fn forget_connection(&self, kind: &'static str, namespace: &str, name: &str) {
        self.connection_ready.remove(&ObjectLabels { kind, namespace: namespace.to_string(), name: name.to_string() });
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
