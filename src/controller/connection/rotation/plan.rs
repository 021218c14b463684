//! The pure part of a credential rotation: what the next step is.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::RotationError;
use crate::crd::CredentialRotationSpec;

/// The parsed `spec.credentialRotation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub interval: Option<Duration>,
    pub grace: Duration,
}

impl Schedule {
    pub fn of(spec: &CredentialRotationSpec) -> Result<Self, RotationError> {
        let parse = |field: &str, text: &str| {
            crate::config::parse_duration(text).map_err(|e| RotationError::InvalidSpec(format!("{field}: {e}")))
        };
        let interval = spec.interval.as_deref().map(|i| parse("credentialRotation.interval", i)).transpose()?;
        Ok(Self { interval, grace: parse("credentialRotation.gracePeriod", &spec.grace_period)? })
    }
}

/// Where the Secret's secret stands in Medplum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    Current,
    Retiring,
    /// Neither: Medplum changed since the verification; the next one reports it.
    Unknown,
}

/// What the plan looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub held: Held,
    /// Medplum keeps a retiring secret.
    pub retiring: bool,
    /// When the operator stored the Secret's secret, if it did.
    pub stored_at: Option<Timestamp>,
    /// The connection's `medplum.com/rotate` annotation.
    pub request: Option<String>,
    /// The last request acted on (`status.credentialRotation.handledRequest`).
    pub handled: Option<String>,
}

/// The one next thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Medplum's current secret is not in the Secret, whose secret is retiring: a rotation whose write
    /// did not happen. Store it.
    Store,
    /// Ask Medplum for a new secret (answering `request`, if one asked).
    Rotate { request: Option<String> },
    /// The previous secret works until then.
    WaitForGrace { until: Timestamp },
    /// End the previous secret.
    Retire,
    /// Nothing to do until `next` (a scheduled rotation), or a request.
    Idle { next: Option<Timestamp> },
}

pub fn after(time: Timestamp, span: Duration) -> Timestamp {
    time.checked_add(span).unwrap_or(Timestamp::MAX)
}

/// The next step of the rotation, given what Medplum and the Secret say.
pub fn plan(schedule: &Schedule, o: &Observed, now: Timestamp) -> Step {
    match o.held {
        Held::Retiring => return Step::Store,
        Held::Unknown => return Step::Idle { next: None },
        Held::Current => {}
    }
    // A retiring secret the operator did not leave (no stored-at) is not waited for: a rotation
    // replaces it, as `$rotate-secret` keeps one retiring secret at most.
    if o.retiring
        && let Some(stored) = o.stored_at
    {
        let until = after(stored, schedule.grace);
        return if now < until { Step::WaitForGrace { until } } else { Step::Retire };
    }
    if let Some(request) = o.request.as_ref().filter(|r| o.handled.as_ref() != Some(*r)) {
        return Step::Rotate { request: Some(request.clone()) };
    }
    // Never stored by the operator: its age is unknown, so the first scheduled rotation is now.
    match schedule.interval.map(|i| o.stored_at.map_or(now, |stored| after(stored, i))) {
        Some(due) if due <= now => Step::Rotate { request: None },
        next => Step::Idle { next },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Failure;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + second).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn observed(held: Held) -> Observed {
        Observed { held, retiring: false, stored_at: Some(at(0)), request: None, handled: None }
    }

    #[test]
    fn plan_table() {
        let scheduled = Schedule { interval: Some(HOUR * 24), grace: HOUR };
        let on_request = Schedule { interval: None, grace: HOUR };
        let in_grace = Observed { retiring: true, ..observed(Held::Current) };
        let asked = Observed { request: Some("r1".into()), ..observed(Held::Current) };
        let never_stored = Observed { stored_at: None, ..observed(Held::Current) };
        let rows: Vec<(&str, &Schedule, Observed, Timestamp, Step)> = vec![
            ("settled, not due", &scheduled, observed(Held::Current), at(60), Step::Idle { next: Some(at(86_400)) }),
            ("settled, due", &scheduled, observed(Held::Current), at(86_400), Step::Rotate { request: None }),
            ("on request only", &on_request, observed(Held::Current), at(10 * 86_400), Step::Idle { next: None }),
            ("never stored: due at once", &scheduled, never_stored.clone(), at(5), Step::Rotate { request: None }),
            ("never stored, on request only", &on_request, never_stored, at(5), Step::Idle { next: None }),
            ("asked", &on_request, asked.clone(), at(5), Step::Rotate { request: Some("r1".into()) }),
            (
                "asked and handled",
                &on_request,
                Observed { handled: Some("r1".into()), ..asked.clone() },
                at(5),
                Step::Idle { next: None },
            ),
            (
                "asked again",
                &on_request,
                Observed { handled: Some("r0".into()), ..asked },
                at(5),
                Step::Rotate { request: Some("r1".into()) },
            ),
            ("crashed before the Secret write", &scheduled, observed(Held::Retiring), at(5), Step::Store),
            ("grace running", &scheduled, in_grace.clone(), at(60), Step::WaitForGrace { until: at(3600) }),
            ("grace over", &scheduled, in_grace.clone(), at(3600), Step::Retire),
            (
                "a request waits for the grace period",
                &scheduled,
                Observed { request: Some("r2".into()), ..in_grace },
                at(60),
                Step::WaitForGrace { until: at(3600) },
            ),
            (
                "a retiring secret the operator did not leave is not waited for",
                &on_request,
                Observed { retiring: true, stored_at: None, request: Some("r".into()), ..observed(Held::Current) },
                at(5),
                Step::Rotate { request: Some("r".into()) },
            ),
            ("Medplum changed meanwhile", &scheduled, observed(Held::Unknown), at(86_400), Step::Idle { next: None }),
        ];
        for (name, schedule, o, now, expected) in rows {
            assert_eq!(plan(schedule, &o, now), expected, "{name}");
        }
    }

    #[test]
    fn schedule_parses_the_spec() {
        let spec = CredentialRotationSpec { interval: Some("720h".into()), grace_period: "10m".into() };
        assert_eq!(
            Schedule::of(&spec).unwrap(),
            Schedule { interval: Some(HOUR * 720), grace: Duration::from_secs(600) }
        );
        let bad = CredentialRotationSpec { interval: None, grace_period: "soon".into() };
        assert_eq!(Schedule::of(&bad).unwrap_err().reason(), "InvalidSpec");
    }
}
