//! What every error says about itself: the reason its condition and Event carry, and whether waiting
//! may cure it. Each error type answers once, here or beside its definition; wrappers delegate.

/// An error that ends up in a status condition.
pub trait Failure: std::error::Error {
    /// CamelCase reason for conditions and Events.
    fn reason(&self) -> &'static str;

    /// Worth retrying with exponential backoff: the same reconcile may succeed later without any
    /// change. The others wait for a change or the next resync.
    fn is_transient(&self) -> bool;

    /// Medplum answered 429: the next attempt waits at least a minute.
    fn is_rate_limited(&self) -> bool {
        false
    }
}

impl Failure for kube::Error {
    fn reason(&self) -> &'static str {
        "KubernetesApiError"
    }

    fn is_transient(&self) -> bool {
        true
    }
}
