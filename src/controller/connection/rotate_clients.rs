//! Rotate everything for an incident: the annotation `medplum.com/rotate-clients` on a connection
//! rotates, now, the secret of every ClientApplication it serves.
//!
//! The connection only carries the request: each ClientApplication sees it through the connection it
//! uses, rotates as its own rotation would (a new secret stored before Medplum sees it, restart targets
//! rolled out and the grace period passed before the old one is retired), and records the request it
//! answered in its Secret and, once the old secret is retired, in `status.rotateClientsHandled`. The
//! connection counts those and reports `n/m` in `status.clientRotation`, with an Event at the start and
//! at the end.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::warn;

use super::ConnectionObject;
use crate::controller::cleanup::client_applications_using;
use crate::controller::{Context, event};
use crate::crd::{ClientRotationStatus, ConnectionStatus, ROTATE_CLIENTS_ANNOTATION};

/// How often a rotation in progress is counted again: one list of the connection's clients.
/// Each count is a connection reconcile (its verification: 2 Medplum requests) and one list.
const POLL: Duration = Duration::from_secs(10);

/// The rotation's status after counting, and the Events (reason, note) it begins or ends with.
/// `answered` holds, per ClientApplication using the connection, the request it last rotated for.
pub fn progress(
    request: &str,
    previous: Option<&ClientRotationStatus>,
    answered: &[Option<&str>],
    now: Timestamp,
) -> (ClientRotationStatus, Vec<(&'static str, String)>) {
    let same = previous.filter(|p| p.request == request);
    let clients = u32::try_from(answered.len()).unwrap_or(u32::MAX);
    let rotated = u32::try_from(answered.iter().filter(|a| **a == Some(request)).count()).unwrap_or(u32::MAX);
    let start = same.and_then(|p| p.start_time.clone()).unwrap_or(Time(now));
    let mut events = Vec::new();
    if same.is_none() {
        events.push((
            "ClientRotationStarted",
            format!(
                "rotating the secrets of the {clients} ClientApplication(s) using this connection (request {request})"
            ),
        ));
    }
    let completion = match same.and_then(|p| p.completion_time.clone()) {
        Some(done) => Some(done),
        None if rotated == clients => {
            let took = now.duration_since(start.0).unsigned_abs();
            events.push((
                "ClientRotationCompleted",
                format!(
                    "the {clients} ClientApplication(s) using this connection rotated their secrets (request \
                     {request}) in {:.0} s; every previous secret is retired",
                    took.as_secs_f64()
                ),
            ));
            Some(Time(now))
        }
        None => None,
    };
    let status = ClientRotationStatus {
        request: request.to_string(),
        start_time: Some(start),
        completion_time: completion,
        clients,
        rotated,
        progress: format!("{rotated}/{clients}"),
    };
    (status, events)
}

/// The rotate-clients part of a connection's reconcile: counts where the request stands, sets
/// `status.clientRotation` and publishes its Events. Returns when to count again, while it runs.
pub async fn report<K: ConnectionObject>(ctx: &Context, obj: &K, status: &mut ConnectionStatus) -> Option<Duration> {
    let Some(request) = obj.annotations().get(ROTATE_CLIENTS_ANNOTATION) else {
        status.client_rotation = None;
        return None;
    };
    let clients = match client_applications_using(ctx, &obj.key()).await {
        Ok(clients) => clients,
        Err(e) => {
            warn!(name = obj.name_any(), namespace = obj.namespace().unwrap_or_default(), error = %e, "counting the clients to rotate");
            return Some(POLL);
        }
    };
    let answered: Vec<Option<&str>> =
        clients.iter().map(|c| c.status.as_ref().and_then(|s| s.rotate_clients_handled.as_deref())).collect();
    let (progress, events) = progress(request, status.client_rotation.as_ref(), &answered, Timestamp::now());
    // Once complete, a client that comes later is counted at the next resync.
    let done = progress.completion_time.is_some();
    status.client_rotation = Some(progress);
    for (reason, note) in events {
        ctx.publish(&obj.object_ref(&()), &event(EventType::Normal, reason, "RotateClients", note)).await;
    }
    (!done).then_some(POLL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    #[test]
    fn a_request_starts_counts_and_completes_once() {
        let (started, events) = progress("incident-7", None, &[None, Some("incident-6"), None], at(0));
        assert_eq!((started.rotated, started.clients, started.progress.as_str()), (0, 3, "0/3"));
        assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), ["ClientRotationStarted"]);

        let (midway, events) = progress("incident-7", Some(&started), &[Some("incident-7"), None, None], at(5));
        assert_eq!(midway.progress, "1/3");
        assert_eq!(midway.start_time, Some(Time(at(0))), "the start is kept");
        assert!(events.is_empty());

        let all = [Some("incident-7"); 3];
        let (done, events) = progress("incident-7", Some(&midway), &all, at(40));
        assert_eq!((done.progress.as_str(), done.completion_time.clone()), ("3/3", Some(Time(at(40)))));
        assert_eq!(events.len(), 1);
        assert!(events[0].1.contains("in 40 s"), "{}", events[0].1);

        let (again, events) = progress("incident-7", Some(&done), &all, at(60));
        assert_eq!(again, done, "a finished request is not reported again");
        assert!(events.is_empty());
    }

    #[test]
    fn a_new_value_starts_over_and_no_clients_complete_at_once() {
        let (done, _) = progress("incident-7", None, &[Some("incident-7")], at(0));
        let (next, events) = progress("incident-8", Some(&done), &[Some("incident-7")], at(10));
        assert_eq!(
            (next.progress.as_str(), next.start_time.clone(), next.completion_time.clone()),
            ("0/1", Some(Time(at(10))), None)
        );
        assert_eq!(events.len(), 1);

        let (empty, events) = progress("incident-9", None, &[], at(0));
        assert_eq!((empty.progress.as_str(), empty.completion_time.is_some()), ("0/0", true));
        assert_eq!(
            events.iter().map(|e| e.0).collect::<Vec<_>>(),
            ["ClientRotationStarted", "ClientRotationCompleted"]
        );
    }
}
