//! Leader election on a `coordination.k8s.io` Lease, so that of several replicas exactly one writes to
//! Medplum and to Secrets. The holder renews the lease every retry period; a standby takes it over
//! once it has not been renewed for the lease duration. A holder that cannot renew within the renew
//! deadline stops (the process exits), so two instances never act at once for longer than that.
//!
//! Home-made rather than kube-lease-manager (0.13.1, on kube 5), for a figure measured here: with the
//! API server paused (SIGSTOP: connections open, no answers), kube-lease-manager still reported
//! leadership 40 s later, 25 s past its 15 s lease, because its renewal waits on a request kube's
//! client never times out; this one exits after 3.9 s (renew deadline 4 s, lease 6 s; before its
//! renewals were bounded it too was still leading after 60 s: tests/e2e/outage.rs). It makes more
//! requests: a GET and a PUT per retry period (2 s), as client-go does, where kube-lease-manager
//! patches once per 10 s.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// What to do with the lease now.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Another holder let it expire (or released it): take it.
    TakeOver,
    /// Another holder has it.
    Wait { holder: String },
}

/// Decides from the current lease (pure).
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp, default_duration: Duration) -> Decision {
    let Some(spec) = lease else { return Decision::Create };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
        .unwrap_or(default_duration);
    let renewed = spec.renew_time.as_ref().map(|t| t.0).unwrap_or(Timestamp::UNIX_EPOCH);
    let expires =
        renewed.checked_add(SignedDuration::try_from(duration).unwrap_or(SignedDuration::ZERO)).unwrap_or(renewed);
    if now >= expires { Decision::TakeOver } else { Decision::Wait { holder } }
}

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
}

impl LeaderElection {
    /// The election the settings describe; the identity is the pod's name (POD_NAME).
    pub fn from_settings(client: kube::Client, settings: &crate::config::Settings) -> Self {
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("medplum-operator-{}", uuid::Uuid::new_v4().simple()));
        let namespace = settings
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        Self::new(
            client,
            &namespace,
            &settings.leader_election_lease_name,
            &identity,
            settings.leader_election_lease_duration,
            settings.leader_election_renew_deadline,
            settings.leader_election_retry_period,
        )
    }

    /// Waits for the lease, then runs `work` while holding it. `work` ending (a graceful shutdown)
    /// releases the lease; losing the lease is an error, after which the process must exit at once.
    pub async fn run(&self, work: impl Future<Output = ()>) -> Result<(), ()> {
        tokio::select! {
            () = self.acquire() => {}
            () = shutdown_signal() => return Ok(()),
        }
        tokio::select! {
            () = work => {
                self.release().await;
                info!("stopped");
                Ok(())
            }
            () = self.hold() => {
                // Another instance may act from now on: stop without finishing anything.
                tracing::error!("lost leadership; exiting");
                Err(())
            }
        }
    }

    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            renew_deadline,
            retry_period,
        }
    }

    /// One attempt to hold the lease; `Ok(true)` if we hold it afterwards. A conflict (someone else wrote
    /// the lease in between) counts as not holding it.
    async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now, self.lease_duration);
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let result = match (decision, current) {
            (Decision::Wait { .. }, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(MicroTime(now));
                // The resourceVersion makes this a compare-and-swap.
                self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this instance holds the lease.
    pub async fn acquire(&self) {
        let mut waiting_logged = false;
        loop {
            match tokio::time::timeout(self.lease_duration, self.try_hold()).await.unwrap_or(Ok(false)) {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "acquired leadership");
                    return;
                }
                Ok(false) if !waiting_logged => {
                    info!(lease = %self.name, "standing by: another instance leads");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(e) => warn!(lease = %self.name, error = %e, "leader election"),
            }
            tokio::time::sleep(self.retry_period).await;
        }
    }

    /// Renews the lease until it is lost; returns then. The lease is lost when another instance holds it,
    /// or when no renewal succeeded for the renew deadline.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period).await;
            // An API server that stops answering (a partition, a paused process) must not hold the
            // deadline off: kube's client has no read timeout, so a renewal could wait forever while a
            // standby that reaches the API server takes the lease over (tests/e2e/outage.rs).
            let left = self.renew_deadline.saturating_sub(last_renewal.elapsed());
            match tokio::time::timeout(left, self.try_hold()).await {
                Ok(Ok(true)) => last_renewal = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, "another instance took the lease");
                    return;
                }
                Ok(Err(e)) => warn!(lease = %self.name, error = %e, "renewing the lease failed"),
                Err(_) => warn!(lease = %self.name, "the API server did not answer the renewal"),
            }
            if last_renewal.elapsed() > self.renew_deadline {
                warn!(lease = %self.name, deadline = ?self.renew_deadline, "could not renew the lease in time");
                return;
            }
        }
    }

    /// Gives the lease up (on shutdown), so that a standby takes over without waiting for it to expire.
    pub async fn release(&self) {
        // Bounded, so that shutdown never waits on an API server that does not answer.
        let current = tokio::time::timeout(self.retry_period, self.api.get_opt(&self.name)).await;
        let Ok(Ok(Some(mut lease))) = current else { return };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        let params = PostParams::default();
        let replaced = tokio::time::timeout(self.retry_period, self.api.replace(&self.name, &params, &lease));
        match replaced.await {
            Ok(Ok(_)) => info!(lease = %self.name, "released leadership"),
            Ok(Err(e)) => warn!(lease = %self.name, error = %e, "releasing the lease failed"),
            Err(_) => warn!(lease = %self.name, "the API server did not answer the release"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_or_expired() {
        let now = Timestamp::from_second(1_000).unwrap();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "me", now, d), Decision::Create);
        assert_eq!(decide(Some(&spec("me", 990, 15)), "me", now, d), Decision::Renew);
        assert_eq!(decide(Some(&spec("other", 990, 15)), "me", now, d), Decision::Wait { holder: "other".into() });
        assert_eq!(decide(Some(&spec("other", 985, 15)), "me", now, d), Decision::TakeOver, "expired at 1000");
        assert_eq!(decide(Some(&spec("", 999, 15)), "me", now, d), Decision::TakeOver, "released");
    }
}
