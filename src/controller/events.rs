//! Publishing Kubernetes Events (`events.k8s.io/v1`).
//!
//! As with kube's `Recorder`, an Event that repeats one published about the same object (same type,
//! reason and action) within a few minutes bumps that Event's `series` instead of making another.
//! Unlike it, what is remembered for that is bounded: kube's keeps every Event it published until the
//! next one is published, so a first sync of thousands of resources (a `Created` Event each) left
//! thousands of Events in memory for good.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};

/// A repeat within this time joins the series of the Event before it.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// At most this many published Events are remembered for series; beyond, the oldest are forgotten
/// (a repeat of one of those then makes a new Event, which is all that forgetting costs).
const REMEMBERED: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    uid: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    warning: bool,
    reason: String,
    action: String,
}

struct Published {
    namespace: String,
    name: String,
    count: i32,
    at: Instant,
}

pub struct EventRecorder {
    client: kube::Client,
    controller: String,
    instance: String,
    recent: Mutex<HashMap<Key, Published>>,
}

impl EventRecorder {
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        let instance = instance.unwrap_or_else(|| controller.to_string());
        Self { client, controller: controller.into(), instance, recent: Mutex::default() }
    }

    /// Publishes `event` about `regarding` (in its namespace; cluster-scoped objects' Events go to
    /// `default`).
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let key = Key {
            uid: regarding.uid.clone(),
            kind: regarding.kind.clone(),
            namespace: regarding.namespace.clone(),
            name: regarding.name.clone(),
            warning: event.type_ == EventType::Warning,
            reason: event.reason.clone(),
            action: event.action.clone(),
        };
        let repeat = self
            .recent()
            .get(&key)
            .filter(|p| p.at.elapsed() < SERIES_WINDOW)
            .map(|p| (p.namespace.clone(), p.name.clone(), p.count + 1));
        let now = Timestamp::now();
        let published = match repeat {
            Some((namespace, name, count)) => {
                let series = EventSeries { count, last_observed_time: MicroTime(now) };
                let patch = serde_json::json!({"series": series});
                let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                Published { namespace, name, count, at: Instant::now() }
            }
            None => {
                let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
                let name =
                    format!("{}.{:x}", regarding.name.as_deref().unwrap_or(&self.controller), now.as_nanosecond());
                let object = K8sEvent {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    event_time: Some(MicroTime(now)),
                    action: Some(event.action.clone()),
                    reason: Some(event.reason.clone()),
                    note: event.note.clone(),
                    regarding: Some(regarding.clone()),
                    related: event.secondary.clone(),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    type_: Some(if key.warning { "Warning" } else { "Normal" }.into()),
                    ..Default::default()
                };
                let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                api.create(&PostParams::default(), &object).await?;
                Published { namespace, name, count: 1, at: Instant::now() }
            }
        };
        remember(&mut self.recent(), key, published);
        Ok(())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Published>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps `published` under `key`, forgetting first what is too old to join a series and then, while
/// still full, the oldest.
fn remember(recent: &mut HashMap<Key, Published>, key: Key, published: Published) {
    if recent.len() >= REMEMBERED && !recent.contains_key(&key) {
        recent.retain(|_, p| p.at.elapsed() < SERIES_WINDOW);
        while recent.len() >= REMEMBERED {
            let oldest = recent.iter().min_by_key(|(_, p)| p.at).map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            recent.remove(&oldest);
        }
    }
    recent.insert(key, published);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key {
            uid: Some(format!("uid-{name}")),
            kind: Some("ClientApplication".into()),
            namespace: Some("team-a".into()),
            name: Some(name.into()),
            warning: false,
            reason: "Created".into(),
            action: "Create".into(),
        }
    }

    fn published(at: Instant) -> Published {
        Published { namespace: "team-a".into(), name: "e".into(), count: 1, at }
    }

    #[test]
    fn what_is_remembered_stays_bounded_and_the_newest_stay() {
        let mut recent = HashMap::new();
        let start = Instant::now();
        for i in 0..REMEMBERED + 500 {
            remember(&mut recent, key(&format!("c{i}")), published(start + Duration::from_millis(i as u64)));
        }
        assert_eq!(recent.len(), REMEMBERED);
        assert!(recent.contains_key(&key(&format!("c{}", REMEMBERED + 499))), "the newest is kept");
        assert!(!recent.contains_key(&key("c0")), "the oldest went first");
    }

    #[test]
    fn a_repeat_replaces_its_own_entry() {
        let mut recent = HashMap::new();
        remember(&mut recent, key("c"), published(Instant::now()));
        remember(&mut recent, key("c"), Published { count: 2, ..published(Instant::now()) });
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[&key("c")].count, 2);
    }
}
