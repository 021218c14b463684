//! Prometheus metrics. Label values are bounded: kinds, outcomes, operation names, HTTP status codes,
//! and the names of connection objects. Nothing secret and nothing per request goes into a label.

use std::collections::HashMap;
use std::sync::Mutex;
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
pub struct ReasonLabels {
    pub kind: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequestLabels {
    pub verb: &'static str,
    pub resource: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

pub struct Metrics {
    registry: Registry,
    objects: ObjectMetrics,
    requests: RequestMetrics,
    rotation: RotationMetrics,
}

/// Ready, or the reason of a Ready condition that is False.
type Readiness = Result<(), String>;

/// Reconciles and the state of managed objects.
struct ObjectMetrics {
    reconciliations: Family<ReconcileLabels, Counter>,
    reconcile_duration: HistogramFamily<KindLabels>,
    connection_ready: Family<ObjectLabels, Gauge>,
    managed_objects: Family<KindLabels, Gauge>,
    ready_objects: Family<KindLabels, Gauge>,
    not_ready_objects: Family<ReasonLabels, Gauge>,
    /// Readiness of every managed object (the reason when not Ready), by kind and `namespace/name`.
    census: Mutex<HashMap<(&'static str, String), Readiness>>,
    /// 1 on the replica whose controllers run (it holds the leader lease, or runs without election).
    leader: Gauge,
}

impl ObjectMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            reconciliations: registered(r, "reconciliations", "Reconciliations by kind and outcome", Family::default()),
            reconcile_duration: registered(
                r,
                "reconcile_duration_seconds",
                "Duration of reconciliations",
                duration_family(),
            ),
            connection_ready: registered(
                r,
                "connection_ready",
                "1 when a connection is Ready, else 0",
                Family::default(),
            ),
            managed_objects: registered(
                r,
                "managed_objects",
                "Objects the operator manages, by kind",
                Family::default(),
            ),
            ready_objects: registered(r, "ready_objects", "Managed objects that are Ready, by kind", Family::default()),
            not_ready_objects: registered(
                r,
                "not_ready_objects",
                "Managed objects that are not Ready, by kind and the reason of their Ready condition",
                Family::default(),
            ),
            census: Mutex::default(),
            leader: registered(r, "leader", "1 on the replica that runs the controllers, else 0", Gauge::default()),
        }
    }
}

/// Requests to Medplum and to Kubernetes, and Medplum's rate limits.
struct RequestMetrics {
    medplum_requests: Family<RequestLabels, Counter>,
    medplum_request_duration: HistogramFamily<OperationLabels>,
    token_cache_hits: Counter,
    token_refreshes: Counter,
    kubernetes_requests: Family<KubeRequestLabels, Counter>,
    rate_limit_waits: Family<LimitLabels, Counter>,
    rate_limit_wait_seconds: Family<LimitLabels, Counter<f64>>,
}

impl RequestMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            medplum_requests: registered(
                r,
                "medplum_requests",
                "Requests to Medplum by operation and HTTP status",
                Family::default(),
            ),
            medplum_request_duration: registered(
                r,
                "medplum_request_duration_seconds",
                "Latency of requests to Medplum",
                duration_family(),
            ),
            token_cache_hits: registered(
                r,
                "token_cache_hits",
                "Medplum access tokens served from the cache",
                Counter::default(),
            ),
            token_refreshes: registered(
                r,
                "token_refreshes",
                "Medplum access tokens requested from /oauth2/token",
                Counter::default(),
            ),
            kubernetes_requests: registered(
                r,
                "kubernetes_requests",
                "Requests to the Kubernetes API by verb and resource",
                Family::default(),
            ),
            rate_limit_waits: registered(
                r,
                "rate_limit_waits",
                "Requests to Medplum held back until its rate limit window allowed them, by limit",
                Family::default(),
            ),
            rate_limit_wait_seconds: registered(
                r,
                "rate_limit_wait_seconds",
                "Time requests to Medplum were held back for its rate limits, by limit",
                Family::default(),
            ),
        }
    }
}

/// Client secret rotations.
struct RotationMetrics {
    rotations: Counter,
    rotation_failures: Counter,
    seconds_until_rotation: Family<ClientLabels, Gauge>,
    /// When each client's next rotation is due (Unix seconds); turned into seconds-until at scrape time.
    next_rotations: Mutex<HashMap<ClientLabels, i64>>,
    rollout_waiting_since: Family<ClientLabels, Gauge>,
    grace_ends: Family<ClientLabels, Gauge>,
}

impl RotationMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            rotations: registered(
                r,
                "rotations",
                "Client secret rotations completed (previous secret retired)",
                Counter::default(),
            ),
            rotation_failures: registered(
                r,
                "rotation_failures",
                "Reconciles that failed while a rotation was in progress",
                Counter::default(),
            ),
            seconds_until_rotation: registered(
                r,
                "seconds_until_rotation",
                "Seconds until a client's next scheduled rotation (negative: overdue)",
                Family::default(),
            ),
            next_rotations: Mutex::default(),
            rollout_waiting_since: registered(
                r,
                "rollout_waiting_since_seconds",
                "Unix time since which a client's rotation waits for its restart targets to roll out (only while it waits)",
                Family::default(),
            ),
            grace_ends: registered(
                r,
                "rotation_grace_ends_seconds",
                "Unix time at which the grace period of a client's previous secret ends (only while it still works)",
                Family::default(),
            ),
        }
    }
}

/// Registers `metric` under `name` and hands it back: one expression both registers and keeps it.
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

fn duration_family<L>() -> HistogramFamily<L>
where
    L: Clone + std::hash::Hash + Eq,
{
    HistogramFamily::new_with_constructor(duration_histogram as fn() -> Histogram)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("medplum_operator");
        let objects = ObjectMetrics::register(&mut registry);
        let requests = RequestMetrics::register(&mut registry);
        let rotation = RotationMetrics::register(&mut registry);
        Self { registry, objects, requests, rotation }
    }
}

impl Metrics {
    pub fn record_reconcile(&self, kind: &'static str, success: bool, elapsed: Duration) {
        let outcome = if success { "success" } else { "error" };
        self.objects.reconciliations.get_or_create(&ReconcileLabels { kind, outcome }).inc();
        self.objects.reconcile_duration.get_or_create(&KindLabels { kind }).observe(elapsed.as_secs_f64());
    }

    /// `operation` is one of a fixed set of names (`token`, `auth_me`, `read ClientApplication`, …).
    pub fn record_medplum_request(&self, operation: &str, status: &str, elapsed: Duration) {
        let operation = operation.to_string();
        self.requests
            .medplum_requests
            .get_or_create(&RequestLabels { operation: operation.clone(), status: status.to_string() })
            .inc();
        self.requests
            .medplum_request_duration
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    pub fn record_token(&self, from_cache: bool) {
        if from_cache {
            self.requests.token_cache_hits.inc()
        } else {
            self.requests.token_refreshes.inc()
        };
    }

    pub fn set_connection_ready(&self, kind: &'static str, namespace: &str, name: &str, ready: bool) {
        let labels = ObjectLabels { kind, namespace: namespace.to_string(), name: name.to_string() };
        self.objects.connection_ready.get_or_create(&labels).set(i64::from(ready));
    }

    pub fn forget_connection(&self, kind: &'static str, namespace: &str, name: &str) {
        self.objects.connection_ready.remove(&ObjectLabels {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
    }

    /// Counts a request to the Kubernetes API.
    pub fn record_kube_request(&self, method: &http::Method, uri: &http::Uri) {
        let (verb, resource) = kube_request_kind(method, uri);
        self.requests.kubernetes_requests.get_or_create(&KubeRequestLabels { verb, resource }).inc();
    }

    /// Starts the rate-limit counters of each limit at zero, so that they exist (and `rate()` over them
    /// works) before the first wait.
    pub fn declare_rate_limits(&self, limits: impl IntoIterator<Item = &'static str>) {
        for limit in limits {
            let labels = LimitLabels { limit };
            self.requests.rate_limit_waits.get_or_create(&labels).inc_by(0);
            self.requests.rate_limit_wait_seconds.get_or_create(&labels).inc_by(0.0);
        }
    }

    /// A request to Medplum held back for `waited` by the rate limit `limit`.
    pub fn record_rate_limit_wait(&self, limit: &'static str, waited: Duration) {
        let labels = LimitLabels { limit };
        self.requests.rate_limit_waits.get_or_create(&labels).inc();
        self.requests.rate_limit_wait_seconds.get_or_create(&labels).inc_by(waited.as_secs_f64());
    }

    pub fn record_rotation(&self) {
        self.rotation.rotations.inc();
    }

    pub fn record_rotation_failure(&self) {
        self.rotation.rotation_failures.inc();
    }

    /// Sets (or with `None`, forgets) when a client's next rotation is due, as Unix seconds.
    pub fn set_next_rotation(&self, namespace: &str, name: &str, due: Option<i64>) {
        let labels = ClientLabels { namespace: namespace.into(), name: name.into() };
        let mut next = self.rotation.next_rotations.lock().unwrap_or_else(|p| p.into_inner());
        match due {
            Some(at) => {
                next.insert(labels, at);
            }
            None => {
                next.remove(&labels);
                self.rotation.seconds_until_rotation.remove(&labels);
            }
        }
    }

    /// Records a client's rotation in progress: since when it waits for rollouts, and when the grace
    /// period of its previous secret ends (`None`: it does not wait, it has no previous secret).
    pub fn set_rotation_progress(
        &self,
        namespace: &str,
        name: &str,
        waiting_since: Option<i64>,
        grace_ends: Option<i64>,
    ) {
        let labels = ClientLabels { namespace: namespace.into(), name: name.into() };
        for (family, value) in
            [(&self.rotation.rollout_waiting_since, waiting_since), (&self.rotation.grace_ends, grace_ends)]
        {
            match value {
                Some(value) => {
                    family.get_or_create(&labels).set(value);
                }
                None => {
                    family.remove(&labels);
                }
            }
        }
    }

    /// Records whether an object is Ready, or the reason it is not (`None`: it is no longer managed).
    pub fn set_object_ready(&self, kind: &'static str, namespace: &str, name: &str, state: Option<Result<(), &str>>) {
        let mut census = self.objects.census.lock().unwrap_or_else(|p| p.into_inner());
        let key = (kind, format!("{namespace}/{name}"));
        let state = state.map(|s| s.map_err(str::to_string));
        let before = match &state {
            Some(state) => census.insert(key, state.clone()),
            None => census.remove(&key),
        };
        // Counted from the change alone: recounting every object on each reconcile costs O(objects).
        for (state, by) in [(before, -1), (state, 1)] {
            let Some(state) = state else { continue };
            self.objects.managed_objects.get_or_create(&KindLabels { kind }).inc_by(by);
            match state {
                Ok(()) => self.objects.ready_objects.get_or_create(&KindLabels { kind }).inc_by(by),
                Err(reason) => self.objects.not_ready_objects.get_or_create(&ReasonLabels { kind, reason }).inc_by(by),
            };
        }
    }

    /// This replica's controllers run from now on.
    pub fn set_leader(&self) {
        self.objects.leader.set(1);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        for (labels, due) in self.rotation.next_rotations.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            self.rotation.seconds_until_rotation.get_or_create(labels).set(due - now);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The verb and resource of a Kubernetes API request, e.g. (`patch`, `clientapplications/status`).
pub fn kube_request_kind(method: &http::Method, uri: &http::Uri) -> (&'static str, String) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..).unwrap_or_default(),
        Some(&"apis") => segments.get(3..).unwrap_or_default(),
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [] => ("other".to_string(), false),
        [resource] => ((*resource).to_string(), false),
        [resource, _name] => ((*resource).to_string(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
    };
    let watch = uri.query().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    (verb, resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: http::Method, uri: &str) -> (&'static str, String) {
        kube_request_kind(&method, &uri.parse().unwrap())
    }

    #[test]
    fn managed_and_ready_counts_follow_each_object_s_changes() {
        let metrics = Metrics::default();
        let counts = |m: &Metrics| {
            let text = m.encode();
            let value = |family: &str| {
                text.lines()
                    .find(|l| l.starts_with(&format!("medplum_operator_{family}{{kind=\"ClientApplication\"}}")))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            };
            (value("managed_objects"), value("ready_objects"))
        };
        let not_ready = |m: &Metrics, reason: &str| {
            let series =
                format!("medplum_operator_not_ready_objects{{kind=\"ClientApplication\",reason=\"{reason}\"}} ");
            m.encode().lines().find_map(|l| l.strip_prefix(&series)?.parse::<i64>().ok())
        };
        metrics.set_object_ready("ClientApplication", "a", "x", Some(Err("ConnectionNotReady")));
        metrics.set_object_ready("ClientApplication", "a", "y", Some(Ok(())));
        metrics.set_object_ready("ClientApplication", "a", "y", Some(Ok(())));
        assert_eq!(counts(&metrics), (Some(2), Some(1)));
        assert_eq!(not_ready(&metrics, "ConnectionNotReady"), Some(1));
        metrics.set_object_ready("ClientApplication", "a", "x", Some(Err("CredentialRejected")));
        assert_eq!(
            (not_ready(&metrics, "ConnectionNotReady"), not_ready(&metrics, "CredentialRejected")),
            (Some(0), Some(1))
        );
        metrics.set_object_ready("ClientApplication", "a", "x", Some(Ok(())));
        assert_eq!(counts(&metrics), (Some(2), Some(2)));
        assert_eq!(not_ready(&metrics, "CredentialRejected"), Some(0));
        metrics.set_object_ready("ClientApplication", "a", "y", None);
        metrics.set_object_ready("ClientApplication", "a", "never-seen", None);
        assert_eq!(counts(&metrics), (Some(1), Some(1)));
    }

    #[test]
    fn kubernetes_requests_are_labelled_by_verb_and_resource() {
        assert_eq!(kind(http::Method::GET, "/api/v1/namespaces/a/secrets/s"), ("get", "secrets".into()));
        assert_eq!(kind(http::Method::GET, "/api/v1/namespaces/a/secrets?labelSelector=x"), ("list", "secrets".into()));
        assert_eq!(
            kind(
                http::Method::GET,
                "/apis/medplum.com/v1alpha1/namespaces/a/clientapplications?watch=true&resourceVersion=1"
            ),
            ("watch", "clientapplications".into())
        );
        assert_eq!(
            kind(http::Method::PATCH, "/apis/medplum.com/v1alpha1/namespaces/a/clientapplications/c/status"),
            ("patch", "clientapplications/status".into())
        );
        assert_eq!(kind(http::Method::GET, "/api/v1/namespaces/a"), ("get", "namespaces".into()));
        assert_eq!(kind(http::Method::POST, "/apis/events.k8s.io/v1/namespaces/a/events"), ("create", "events".into()));
        assert_eq!(
            kind(http::Method::GET, "/apis/medplum.com/v1alpha1/clustermedplumconnections/x"),
            ("get", "clustermedplumconnections".into())
        );
    }
}
