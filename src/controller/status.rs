//! kstatus conditions and status writes.
//!
//! Conditions keep their `lastTransitionTime` unless their status changes, and a status is written only
//! when it differs from what is stored, so a steady state makes no writes (and causes no reconcile loops).
//!
//! Beside `Ready`, every kind carries kstatus' abnormal-true conditions, which Flux (kstatus) and the
//! Argo CD health script (`charts/medplum-operator/files/argocd-health.lua`) read: `Reconciling` while
//! a failure is one that waiting cures, `Stalled` for one that only a change cures; neither once Ready.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::failure::Failure;

/// The one field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "medplum-operator";

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// What a condition should say now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionState {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
    /// For Ready=False: only a change (of the spec, a Secret, the platform's limits) cures it.
    pub stalled: bool,
}

impl ConditionState {
    pub fn new(type_: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status, reason: reason.into(), message: message.into(), stalled: false }
    }

    /// Ready=False for `failure`; stalled unless retrying or waiting for another resource cures it.
    pub fn not_ready(failure: &impl Failure) -> Self {
        let stalled = !failure.is_transient() && !is_waiting(failure.reason());
        Self { stalled, ..Self::new(READY, false, failure.reason(), failure.to_string()) }
    }
}

/// `conditions` with `state` set: the transition time is kept when the status did not change. Setting
/// Ready also sets or removes `Reconciling` and `Stalled`.
pub fn set_condition(
    conditions: &[Condition],
    state: ConditionState,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    if state.type_ == READY {
        let companion = (!state.status).then_some(if state.stalled { STALLED } else { RECONCILING });
        let mut out = set_one(conditions, state.clone(), generation, now);
        out.retain(|c| !matches!(c.type_.as_str(), RECONCILING | STALLED) || Some(c.type_.as_str()) == companion);
        if let Some(type_) = companion {
            let said = ConditionState::new(type_, true, state.reason, state.message);
            out = set_one(&out, said, generation, now);
        }
        return out;
    }
    set_one(conditions, state, generation, now)
}

fn set_one(conditions: &[Condition], state: ConditionState, generation: Option<i64>, now: Timestamp) -> Vec<Condition> {
    let status = if state.status { "True" } else { "False" };
    let previous = conditions.iter().find(|c| c.type_ == state.type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    let updated = Condition {
        type_: state.type_.to_string(),
        status: status.to_string(),
        reason: state.reason,
        message: truncate(state.message, 1024),
        observed_generation: generation,
        last_transition_time,
    };
    let mut out: Vec<Condition> = conditions.iter().filter(|c| c.type_ != updated.type_).cloned().collect();
    out.push(updated);
    out.sort_by(|a, b| condition_order(&a.type_).cmp(&condition_order(&b.type_)).then(a.type_.cmp(&b.type_)));
    out
}

/// Ready first, then the others by name, so the list order is stable.
fn condition_order(type_: &str) -> u8 {
    u8::from(type_ != READY)
}

fn truncate(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut end = max;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

/// Reasons that only say a resource waits for another one to become Ready; no Warning Event is
/// published for them (they pass on their own, typically right after a start).
pub fn is_waiting(reason: &str) -> bool {
    matches!(reason, "ConnectionNotReady" | "PolicyNotReady")
}

/// Whether the Ready condition says True.
pub fn is_ready(conditions: &[Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == READY && c.status == "True")
}

/// Writes `status` with server-side apply if it differs from `current`.
/// Returns whether a write was made.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, current: Option<&S>, desired: &S) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
    S: Serialize + PartialEq,
{
    if current == Some(desired) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&Default::default()),
        "kind": K::kind(&Default::default()),
        "status": desired,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn keeps_transition_time_while_status_is_unchanged() {
        let first = set_condition(&[], ConditionState::new(READY, false, "Connecting", "a"), Some(1), at(100));
        let again =
            set_condition(&first, ConditionState::new(READY, false, "MedplumUnreachable", "b"), Some(2), at(200));
        assert_eq!(again[0].last_transition_time, Time(at(100)));
        assert_eq!((again[0].reason.as_str(), again[0].observed_generation), ("MedplumUnreachable", Some(2)));
        let flipped = set_condition(&again, ConditionState::new(READY, true, "Connected", "c"), Some(2), at(300));
        assert_eq!(flipped[0].last_transition_time, Time(at(300)));
        assert!(is_ready(&flipped));
    }

    #[test]
    fn identical_state_gives_identical_conditions() {
        let state = ConditionState::new(READY, true, "Connected", "ok");
        let once = set_condition(&[], state.clone(), Some(3), at(100));
        assert_eq!(set_condition(&once, state, Some(3), at(500)), once);
    }

    #[test]
    fn ready_comes_first_and_others_are_sorted() {
        let c = set_condition(&[], ConditionState::new("Rotating", false, "Idle", ""), None, at(1));
        let c = set_condition(&c, ConditionState::new("CredentialVerified", true, "Verified", ""), None, at(1));
        let c = set_condition(&c, ConditionState::new(READY, true, "Ready", ""), None, at(1));
        let types: Vec<&str> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "CredentialVerified", "Rotating"]);
    }

    #[test]
    fn ready_carries_kstatus_companions() {
        let types = |c: &[Condition]| c.iter().map(|c| (c.type_.clone(), c.status.clone())).collect::<Vec<_>>();
        let pair = |t: &str, s: &str| (t.to_string(), s.to_string());
        let waiting = set_condition(&[], ConditionState::new(READY, false, "MedplumUnreachable", "a"), Some(1), at(1));
        assert_eq!(types(&waiting), [pair(READY, "False"), pair(RECONCILING, "True")]);
        let stalled = ConditionState { stalled: true, ..ConditionState::new(READY, false, "LimitExceeded", "b") };
        let refused = set_condition(&waiting, stalled, Some(2), at(2));
        assert_eq!(types(&refused), [pair(READY, "False"), pair(STALLED, "True")]);
        assert_eq!((refused[1].reason.as_str(), refused[1].message.as_str()), ("LimitExceeded", "b"));
        let ready = set_condition(&refused, ConditionState::new(READY, true, "Ready", "ok"), Some(3), at(3));
        assert_eq!(types(&ready), [pair(READY, "True")]);
        // Unchanged while the same failure repeats: no status write, no reconcile loop.
        let again =
            set_condition(&waiting, ConditionState::new(READY, false, "MedplumUnreachable", "a"), Some(1), at(9));
        assert_eq!(again, waiting);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let c = set_condition(&[], ConditionState::new(READY, false, "X", "é".repeat(600)), None, at(1));
        assert!(c[0].message.len() <= 1024);
    }
}
