use super::*;
use crate::medplum::{Coding, Meta};

const SYSTEM: &str = "urn:medplum-operator:default";

/// A complete sweep that started at `started` and found `found`, in one page.
fn sweep(
    table: &mut Table<ClientApplicationResource>,
    found: Vec<ClientApplicationResource>,
    started: Instant,
) -> Vec<String> {
    let mut present = HashSet::new();
    let mut changed = table.take_in(SYSTEM, found, started, Some(&mut present));
    changed.extend(table.end_sweep(&present, started));
    changed
}

fn client(code: &str, version: &str) -> ClientApplicationResource {
    ClientApplicationResource {
        id: Some(format!("id-{code}")),
        meta: Meta {
            version_id: Some(version.into()),
            tag: vec![
                Coding { system: SYSTEM.into(), code: code.into() },
                Coding { system: format!("{SYSTEM}:adopted"), code: code.into() },
            ],
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn nothing_is_vouched_for_before_a_sweep_or_long_after_one() {
    let mut table = Table::new(SYSTEM, "p-1");
    let now = Instant::now();
    table.record(SYSTEM, &client("ClientApplication/a/x", "1"), now);
    assert!(matches!(table.seen("ClientApplication/a/x", Duration::from_secs(60), now), Seen::Unknown));
    sweep(&mut table, vec![], now);
    assert!(matches!(table.seen("ClientApplication/a/x", Duration::from_secs(60), now), Seen::Known(_)));
    assert!(matches!(table.seen("ClientApplication/a/y", Duration::from_secs(60), now), Seen::Absent));
    let later = now + Duration::from_secs(61);
    assert!(matches!(table.seen("ClientApplication/a/x", Duration::from_secs(60), later), Seen::Unknown));
}

#[test]
fn sweeps_and_change_searches_report_what_changed_or_went() {
    let mut table = Table::new(SYSTEM, "p-1");
    let t0 = Instant::now();
    let first = vec![client("C/a/x", "1"), client("C/a/y", "1")];
    assert!(sweep(&mut table, first, t0).is_empty(), "the first sweep fills the table");
    // Our own write, recorded: a change search finds it again and it is not news.
    let ours = client("C/a/x", "2");
    table.record(SYSTEM, &ours, t0 + Duration::from_secs(1));
    assert!(table.take_in(SYSTEM, vec![ours], Instant::now(), None).is_empty());
    // A console edit is.
    let edited = client("C/a/y", "2");
    assert_eq!(table.take_in(SYSTEM, vec![edited.clone()], Instant::now(), None), ["C/a/y"]);
    // A sweep that no longer finds x reports it gone, but not an object made after it started.
    let t1 = t0 + Duration::from_secs(10);
    table.record(SYSTEM, &client("C/a/new", "1"), t1 + Duration::from_millis(5));
    assert_eq!(sweep(&mut table, vec![edited], t1), ["C/a/x"]);
    assert!(table.entries.contains_key("C/a/new"));
    assert!(!table.entries.contains_key("C/a/x"));
}

#[test]
fn a_search_that_started_before_our_write_does_not_take_back_the_version_it_replaced() {
    let mut table = Table::new(SYSTEM, "p-1");
    let t0 = Instant::now();
    let stamped = |version: &str, at: &str| {
        let mut c = client("C/a/x", version);
        c.meta.last_updated = Some(format!("2026-12-07T10:00:{at}Z"));
        c
    };
    sweep(&mut table, vec![stamped("1", "00.000")], t0);
    table.record(SYSTEM, &stamped("2", "05.000"), t0 + Duration::from_secs(5));
    // The change search began before the write and answers with version 1.
    assert!(table.take_in(SYSTEM, vec![stamped("1", "00.000")], Instant::now(), None).is_empty());
    let Seen::Known(held) = table.seen("C/a/x", Duration::from_secs(60), t0) else { panic!("known") };
    assert_eq!(held.meta.version_id.as_deref(), Some("2"));
    // A later version (a console edit) is still news.
    assert_eq!(table.take_in(SYSTEM, vec![stamped("3", "09.000")], Instant::now(), None), ["C/a/x"]);
}

#[test]
fn a_doubt_lasts_until_the_object_is_read_or_swept_after_it() {
    let mut table = Table::new(SYSTEM, "p-1");
    let t0 = Instant::now();
    let trust = Duration::from_secs(600);
    sweep(&mut table, vec![client("C/a/x", "1")], t0);
    table.doubts.insert("C/a/x".into(), t0 + Duration::from_secs(1));
    table.doubts.insert("C/a/y".into(), t0 + Duration::from_secs(1));
    assert!(matches!(table.seen("C/a/x", trust, t0 + Duration::from_secs(2)), Seen::Unknown));
    // A sweep that started before the doubt settles nothing.
    sweep(&mut table, vec![client("C/a/x", "1")], t0 + Duration::from_millis(500));
    assert!(matches!(table.seen("C/a/y", trust, t0 + Duration::from_secs(2)), Seen::Unknown));
    // Reading it settles its doubt; a later sweep settles the rest.
    table.record(SYSTEM, &client("C/a/x", "2"), t0 + Duration::from_secs(2));
    assert!(matches!(table.seen("C/a/x", trust, t0 + Duration::from_secs(2)), Seen::Known(_)));
    sweep(&mut table, vec![client("C/a/x", "2")], t0 + Duration::from_secs(3));
    assert!(matches!(table.seen("C/a/y", trust, t0 + Duration::from_secs(4)), Seen::Absent));
}

#[test]
fn an_object_comes_back_as_it_was_recorded() {
    let mut table = Table::new(SYSTEM, "p-1");
    let t0 = Instant::now();
    sweep(&mut table, vec![], t0);
    let mut recorded = client("C/a/x", "7");
    recorded.meta.last_updated = Some("2026-12-04T10:00:00.123Z".into());
    recorded.name = Some("x".into());
    recorded.secret = Some(SecretString::from("s".repeat(64)));
    recorded.redirect_uris = vec!["https://x.example.org/cb".into()];
    table.record(SYSTEM, &recorded, t0);
    let Seen::Known(back) = table.seen("C/a/x", Duration::from_secs(60), t0) else { panic!("known") };
    assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&recorded).unwrap());
    assert_eq!(back.meta, recorded.meta, "version and lastUpdated too");
    assert_eq!(back.secret.as_ref().map(|s| s.expose_secret().len()), Some(64));
    assert_eq!(table.newest(), Some("2026-12-04T10:00:00.123Z"));
}

#[test]
fn owners_are_read_from_codes() {
    let owner = Owner::of("ProjectUser/team-a/dr-lee").unwrap();
    assert_eq!(
        (owner.kind.as_str(), owner.namespace.as_str(), owner.name.as_str()),
        ("ProjectUser", "team-a", "dr-lee")
    );
    assert_eq!(Owner::of("nonsense"), None);
}
