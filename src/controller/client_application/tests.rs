//! The plan is a function of what is observed: each state of a creation or a rotation, however it was
//! reached (a crash included), leads to the same next step.

use std::collections::BTreeSet;

use super::observe::secret_refusal;
use super::plan::{
    Answered, Observed, Step, client_body, credentials_data, generate_secret, identifier_of, plan, settled_content,
};
use secrecy::ExposeSecret;

use super::*;
use crate::controller::foreign_secret::{self, Refusal};
use crate::controller::secret::WrittenSecret;
use crate::controller::workload::TargetState;
use crate::crd::{Adopt, AdoptSecret, SecretKeys, WorkloadKind};
use crate::medplum::{CredentialProof, MembershipResource, Ref};

const T0: i64 = 1_800_000_000;

fn at(offset: i64) -> Timestamp {
    Timestamp::from_second(T0 + offset).unwrap()
}

fn s(value: &str) -> SecretString {
    SecretString::from(value.to_string())
}

fn desired() -> Desired {
    let tag = crate::controller::ownership_tag("default", KIND, "team-a", "lab-sync");
    Desired {
        name: "lab-sync".into(),
        namespace: "team-a".into(),
        client: ClientApplicationResource {
            meta: crate::medplum::Meta { tag: vec![tag.clone()], ..Default::default() },
            name: Some("team-a/lab-sync".into()),
            access_token_lifetime: Some("15m".into()),
            ..Default::default()
        },
        tag,
        access: Vec::new(),
        admin: false,
        project_id: "p1".into(),
        base_url: "https://medplum.example.org/".into(),
        secret_name: "lab-sync".into(),
        keys: SecretKeys::default(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        owner: OwnerReference { uid: "uid-1".into(), ..Default::default() },
        merge: false,
        rotation_interval: Some(Duration::from_secs(3600)),
        grace_period: Duration::from_secs(600),
        restart_targets: vec![RestartTarget { kind: WorkloadKind::Deployment, name: "app".into() }],
        rotation_request: None,
        rotate_clients_request: None,
        adopt: None,
    }
}

/// The Secret as the operator writes it: `pending` and/or current credentials, issued at `issued`.
fn secret(d: &Desired, current: Option<&str>, pending: Option<&str>, issued: Option<i64>) -> WrittenSecret {
    let mut values = BTreeMap::new();
    if let Some(current) = current {
        values = credentials_data(d, "c1", &s(current));
    }
    if let Some(pending) = pending {
        values.insert(PENDING_KEY.to_string(), s(pending));
    }
    let mut annotations = BTreeMap::new();
    if let Some(issued) = issued {
        annotations.insert(ISSUED_AT.to_string(), at(issued).to_string());
    }
    let mut labels = BTreeMap::from([(CLIENT_LABEL.to_string(), d.name.clone())]);
    labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    WrittenSecret {
        exists: true,
        type_: Some("Opaque".into()),
        owner_uids: vec!["uid-1".into()],
        present: values.keys().cloned().collect(),
        values,
        labels,
        annotations,
        resource_version: Some("1".into()),
        ..Default::default()
    }
}

fn client(d: &Desired, secret: Option<&str>, retiring: Option<&str>) -> ClientApplicationResource {
    let mut c = client_body(&d.client, None, secret.map(s).as_ref(), retiring.map(s).as_ref());
    c.id = Some("c1".into());
    c
}

fn membership(d: &Desired) -> MembershipResource {
    MembershipResource {
        id: Some("m1".into()),
        project: Ref::to("Project/p1"),
        user: Ref::to("ClientApplication/c1"),
        profile: Ref::to("ClientApplication/c1"),
        access: d.access.clone(),
        admin: d.admin.then_some(true),
        identifier: vec![identifier_of(&d.tag)],
        ..Default::default()
    }
}

fn target(restarted_for: Option<i64>, rolled_out: bool) -> TargetState {
    TargetState {
        target: RestartTarget { kind: WorkloadKind::Deployment, name: "app".into() },
        restarted_for: restarted_for.map(|t| at(t).to_string()),
        exists: true,
        rolled_out,
        uses_secret: true,
        stalled: None,
    }
}

fn observed(
    secret: WrittenSecret,
    client: Option<ClientApplicationResource>,
    membership: Option<MembershipResource>,
) -> Observed {
    Observed {
        secret,
        client,
        membership,
        targets: vec![target(Some(0), true)],
        verified: Some(CredentialProof::TokenIssued),
        created: false,
    }
}

#[test]
fn creation_makes_the_client_first_and_writes_the_secret_medplum_holds() {
    let d = desired();
    let nothing = Observed { targets: vec![], verified: None, ..observed(WrittenSecret::default(), None, None) };
    assert_eq!(plan(&d, &nothing, at(0)), Step::CreateClient);
    // A pending secret left by an older operator is used, not replaced.
    let stored = observed(secret(&d, None, Some("new"), None), None, None);
    assert_eq!(plan(&d, &stored, at(0)), Step::CreateClient);
    // Killed after the create: the client is found by its tag, and the Secret is written from it.
    let created = observed(WrittenSecret::default(), Some(client(&d, Some("new"), None)), None);
    assert_eq!(plan(&d, &created, at(0)), Step::CreateMembership);
    let member = observed(WrittenSecret::default(), Some(client(&d, Some("new"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &member, at(0)), Step::WriteSecret { switched: false });
    let left_pending =
        observed(secret(&d, None, Some("new"), None), Some(client(&d, Some("new"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &left_pending, at(0)), Step::WriteSecret { switched: true });
}

#[test]
fn after_the_secret_is_written_targets_restart_and_credentials_are_verified() {
    let d = desired();
    let mut o =
        observed(secret(&d, Some("new"), None, Some(5)), Some(client(&d, Some("new"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &o, at(6)), Step::RestartTargets, "a workload still runs the credentials of t=0");
    o.targets = vec![target(Some(5), false)];
    o.verified = None;
    assert_eq!(plan(&d, &o, at(6)), Step::Verify, "no rollout wait outside a rotation");
    o.verified = Some(CredentialProof::TokenIssued);
    assert_eq!(plan(&d, &o, at(6)), Step::Done);
}

#[test]
fn a_rotation_runs_store_push_switch_restart_wait_and_retire() {
    let d = desired();
    let steady =
        observed(secret(&d, Some("old"), None, Some(0)), Some(client(&d, Some("old"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &steady, at(3599)), Step::Done);
    assert_eq!(plan(&d, &steady, at(3600)), Step::StoreNewSecret, "interval passed");

    let stored = observed(
        secret(&d, Some("old"), Some("new"), Some(0)),
        Some(client(&d, Some("old"), None)),
        Some(membership(&d)),
    );
    assert_eq!(plan(&d, &stored, at(3601)), Step::PushSecret);

    let pushed = observed(
        secret(&d, Some("old"), Some("new"), Some(0)),
        Some(client(&d, Some("new"), Some("old"))),
        Some(membership(&d)),
    );
    assert_eq!(plan(&d, &pushed, at(3602)), Step::WriteSecret { switched: true });

    let mut switched = observed(
        secret(&d, Some("new"), None, Some(3603)),
        Some(client(&d, Some("new"), Some("old"))),
        Some(membership(&d)),
    );
    assert_eq!(plan(&d, &switched, at(3603)), Step::RestartTargets);
    switched.targets = vec![target(Some(3603), false)];
    assert_eq!(plan(&d, &switched, at(3604)), Step::WaitForRollout { target: "Deployment/app".into(), stalled: None });
    // A rollout that does not progress keeps the previous secret working, however long it takes.
    let stuck = Stall::DeadlineExceeded { since: at(3700).to_string() };
    switched.targets = vec![TargetState { stalled: Some(stuck.clone()), ..target(Some(3603), false) }];
    assert_eq!(
        plan(&d, &switched, at(3603 + 30 * 86_400)),
        Step::WaitForRollout { target: "Deployment/app".into(), stalled: Some(stuck) }
    );
    switched.targets = vec![target(Some(3603), true)];
    assert_eq!(plan(&d, &switched, at(3700)), Step::WaitForGrace { until: at(3603 + 600) });
    assert_eq!(plan(&d, &switched, at(3603 + 600)), Step::RetireSecret);

    let retired =
        observed(secret(&d, Some("new"), None, Some(3603)), Some(client(&d, Some("new"), None)), Some(membership(&d)));
    let retired = Observed { targets: vec![target(Some(3603), true)], ..retired };
    assert_eq!(plan(&d, &retired, at(4300)), Step::Done);
}

#[test]
fn a_requested_rotation_is_recorded_and_waits_for_a_retirement_in_progress() {
    let mut d = desired();
    d.rotation_request = Some("2026-11-29".into());
    let steady =
        observed(secret(&d, Some("old"), None, Some(0)), Some(client(&d, Some("old"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &steady, at(10)), Step::StoreNewSecret);
    let mut handled = steady;
    handled.secret.annotations.insert(ROTATION_HANDLED.into(), "2026-11-29".into());
    assert_eq!(plan(&d, &handled, at(10)), Step::Done, "the same request is not handled twice");

    let retiring = observed(
        secret(&d, Some("new"), None, Some(0)),
        Some(client(&d, Some("new"), Some("old"))),
        Some(membership(&d)),
    );
    assert_eq!(plan(&d, &retiring, at(10)), Step::WaitForGrace { until: at(600) }, "Medplum holds two secrets at most");
}

#[test]
fn a_connections_rotate_clients_request_is_answered_once_by_a_secret_issued_after_it() {
    let mut d = desired();
    d.rotation_interval = None;
    d.rotate_clients_request = Some("incident-7".into());
    let steady =
        observed(secret(&d, Some("old"), None, Some(0)), Some(client(&d, Some("old"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &steady, at(10)), Step::StoreNewSecret);
    let stored = Answered::now(&d, &steady);
    assert_eq!(stored, Answered { own: None, clients: Some("incident-7".into()) }, "the new secret answers it");

    let mut answered = steady;
    answered.secret.annotations.insert(ROTATE_CLIENTS_HANDLED.into(), "incident-7".into());
    assert_eq!(plan(&d, &answered, at(10)), Step::Done, "the same request is not answered twice");
    d.rotate_clients_request = Some("incident-8".into());
    assert_eq!(plan(&d, &answered, at(10)), Step::StoreNewSecret, "a new value rotates again");

    // A client created after the request has a secret issued after it: it does not rotate again.
    let mut created = observed(WrittenSecret::default(), Some(client(&d, Some("new"), None)), Some(membership(&d)));
    created.created = true;
    let content = settled_content(&d, &created, "c1", &s("new"), at(10));
    assert_eq!(content.annotations.get(ROTATE_CLIENTS_HANDLED).map(String::as_str), Some("incident-8"));
    // Found again after a restart, it cannot tell: it rotates once more rather than keep an old secret.
    created.created = false;
    let content = settled_content(&d, &created, "c1", &s("new"), at(10));
    assert_eq!(content.annotations.get(ROTATE_CLIENTS_HANDLED), None);
}

#[test]
fn drift_in_medplum_and_in_the_secret_is_put_back() {
    let d = desired();
    let mut edited = client(&d, Some("cur"), None);
    edited.name = Some("renamed in the console".into());
    edited.access_token_lifetime = Some("1d".into());
    let o = observed(secret(&d, Some("cur"), None, Some(0)), Some(edited), Some(membership(&d)));
    assert_eq!(plan(&d, &o, at(1)), Step::UpdateClient { fields: vec!["name", "accessTokenLifetime"] });

    let mut widened = membership(&d);
    widened.access_policy = None;
    widened.admin = Some(true);
    let o = observed(secret(&d, Some("cur"), None, Some(0)), Some(client(&d, Some("cur"), None)), Some(widened));
    assert_eq!(plan(&d, &o, at(1)), Step::UpdateMembership { fields: vec!["admin"] });

    // A client acting on behalf of users needs its membership to be an admin, and keeps it so.
    let proxy = Desired { admin: true, ..desired() };
    let o = observed(
        secret(&proxy, Some("cur"), None, Some(0)),
        Some(client(&proxy, Some("cur"), None)),
        Some(membership(&d)),
    );
    assert_eq!(plan(&proxy, &o, at(1)), Step::UpdateMembership { fields: vec!["admin"] });
    let o = observed(
        secret(&proxy, Some("cur"), None, Some(0)),
        Some(client(&proxy, Some("cur"), None)),
        Some(membership(&proxy)),
    );
    assert_eq!(plan(&proxy, &o, at(1)), Step::Done);

    let tampered =
        observed(secret(&d, Some("typo"), None, Some(0)), Some(client(&d, Some("cur"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &tampered, at(1)), Step::WriteSecret { switched: false });
    let deleted = observed(WrittenSecret::default(), Some(client(&d, Some("cur"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &deleted, at(1)), Step::WriteSecret { switched: false });
}

#[test]
fn an_edited_secret_is_restored_with_its_issue_time_renewed() {
    let d = desired();
    let tampered =
        observed(secret(&d, Some("typo"), None, Some(0)), Some(client(&d, Some("cur"), None)), Some(membership(&d)));
    let content = settled_content(&d, &tampered, "c1", &s("cur"), at(50));
    assert_eq!(
        content.annotations.get(ISSUED_AT),
        Some(&at(50).to_string()),
        "workloads restart for the restored secret"
    );
    let same =
        observed(secret(&d, Some("cur"), None, Some(0)), Some(client(&d, Some("cur"), None)), Some(membership(&d)));
    let content = settled_content(&d, &same, "c1", &s("cur"), at(50));
    assert_eq!(content.annotations.get(ISSUED_AT), Some(&at(0).to_string()));
    assert!(content.is_in(&same.secret), "nothing to write in steady state");
}

#[test]
fn adoption_tags_the_client_then_keeps_or_replaces_its_secret() {
    let mut d = desired();
    d.adopt = Some(Adopt { client_id: "c1".into(), secret: AdoptSecret::Rotate });
    let mut theirs = client(&d, Some("legacy"), None);
    theirs.meta.tag.clear();
    let o = observed(WrittenSecret::default(), Some(theirs), None);
    assert_eq!(plan(&d, &o, at(0)), Step::UpdateClient { fields: vec!["meta.tag"] });
    let tagged = observed(WrittenSecret::default(), Some(client(&d, Some("legacy"), None)), Some(membership(&d)));
    assert_eq!(plan(&d, &tagged, at(0)), Step::StoreNewSecret, "Rotate: a new secret first");
    d.adopt = Some(Adopt { client_id: "c1".into(), secret: AdoptSecret::Keep });
    assert_eq!(plan(&d, &tagged, at(0)), Step::WriteSecret { switched: false }, "Keep: the legacy secret is written");
}

#[test]
fn a_secret_removed_in_medplum_is_replaced() {
    let d = desired();
    let o = observed(secret(&d, Some("cur"), None, Some(0)), Some(client(&d, None, None)), Some(membership(&d)));
    assert_eq!(plan(&d, &o, at(1)), Step::StoreNewSecret);
    let o = observed(secret(&d, Some("cur"), Some("new"), Some(0)), Some(client(&d, None, None)), Some(membership(&d)));
    assert_eq!(plan(&d, &o, at(1)), Step::PushSecret);
}

#[test]
fn client_bodies_keep_foreign_tags_and_secrets_stay_redacted() {
    let d = desired();
    let mut actual = client(&d, Some("cur"), None);
    actual.meta.tag.push(Coding { system: "urn:other".into(), code: "x".into() });
    let body = client_body(&d.client, Some(&actual), Some(&s("cur")), None);
    assert_eq!(body.meta.tag.len(), 2);
    let debug = format!("{body:?}");
    assert!(!debug.contains("cur\""), "Debug output redacts secrets: {debug}");
    let json = serde_json::to_value(&body).unwrap();
    assert_eq!(json["secret"], "cur", "the request body carries it");
}

#[test]
fn fingerprints_tell_secrets_apart_without_revealing_them() {
    let a = generate_secret();
    let b = generate_secret();
    assert_eq!(a.expose_secret().len(), 64);
    assert!(!a.expose_secret().contains(':'));
    assert_ne!(fingerprint(&a), fingerprint(&b));
    assert!(fingerprint(&a).starts_with("sha256:") && fingerprint(&a).len() == 23);
    assert!(!fingerprint(&a).contains(&a.expose_secret()[..16]));
}

#[test]
fn a_foreign_secret_is_merged_into_only_with_merge_and_as_the_foreign_secret_rule_allows() {
    let mut d = desired();
    let mut theirs = WrittenSecret {
        exists: true,
        type_: Some("Opaque".into()),
        owner_uids: vec!["someone-else".into()],
        annotations: BTreeMap::from([(foreign_secret::ALLOW_MERGE.to_string(), d.name.clone())]),
        ..Default::default()
    };
    assert_eq!(secret_refusal(&theirs, &d, None, false), Some(Refusal::NotMerged));
    d.merge = true;
    assert_eq!(secret_refusal(&theirs, &d, None, false), None);
    assert_eq!(secret_refusal(&theirs, &d, None, true), Some(Refusal::ConnectionCredentials));
    // The keys it would write are checked against what is there, the client's own values recognised.
    let status = ClientApplicationStatus { client_id: Some("c1".into()), ..Default::default() };
    for (key, value, conflict) in [
        ("MEDPLUM_CLIENT_ID", "c1", false),
        ("MEDPLUM_CLIENT_ID", "c0", true),
        ("MEDPLUM_BASE_URL", "https://medplum.example.org/", false),
        ("MEDPLUM_TOKEN_URL", "https://medplum.example.org/oauth2/token", false),
        ("MEDPLUM_PROJECT_ID", "p2", true),
        ("MEDPLUM_CLIENT_SECRET", "theirs", true),
    ] {
        theirs.present = BTreeSet::from([key.to_string()]);
        theirs.values = BTreeMap::from([(key.to_string(), s(value))]);
        let refusal = secret_refusal(&theirs, &d, Some(&status), false);
        assert_eq!(matches!(refusal, Some(Refusal::KeyConflict(_))), conflict, "{key}={value}: {refusal:?}");
    }
    let mut own = theirs;
    own.owner_uids = vec![d.owner.uid.clone()];
    assert_eq!(secret_refusal(&own, &d, None, true), None, "its own Secret");
}

#[test]
fn a_warning_says_when_a_rollout_stops_progressing_once() {
    let with = |reason: &str| ClientApplicationStatus {
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Rotating".into(),
            status: "True".into(),
            reason: reason.into(),
            message: format!("{reason} message"),
            last_transition_time: Time(at(0)),
            observed_generation: None,
        }],
        ..Default::default()
    };
    let warning = stall_warning(Some(&with("WaitingForRollout")), &with(ROLLOUT_STUCK)).expect("a warning");
    assert_eq!((warning.type_, warning.reason.as_str()), (EventType::Warning, ROLLOUT_STUCK));
    assert!(stall_warning(Some(&with(ROLLOUT_STUCK)), &with(ROLLOUT_STUCK)).is_none(), "once");
    assert!(stall_warning(None, &with(ROLLOUT_PAUSED)).is_some());
    assert!(stall_warning(Some(&with(ROLLOUT_STUCK)), &with("GracePeriod")).is_none());
}
