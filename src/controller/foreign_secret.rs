//! What the operator may write into a Secret it did not make (`spec.secret.merge`): one rule for every
//! path that writes into, or removes from, such a Secret (credentials, rotation, labels, annotations,
//! cleanup).
//!
//! - **Consent of the Secret's owner.** The Secret must carry the annotation [`ALLOW_MERGE`] naming the
//!   ClientApplication. A tenant who may create ClientApplications but not write Secrets cannot give it,
//!   and the CRD refuses `medplum.com/` annotations in `spec.secret.annotations`, so the operator cannot be
//!   made to give it either.
//! - **Never overwrite what the operator did not write.** A key, label or annotation the merge would set
//!   that is already there, was not written by the operator and holds another value is a conflict: nothing
//!   is written. What the operator wrote is what its field manager holds in the Secret's `managedFields`
//!   (server-side apply records it on every write, and the operator has always written Secrets so). A
//!   value equal to what the operator would write destroys nothing when written; server-side apply then
//!   shares the field, so a cleanup leaves it to its other owner.
//! - **Never remove what the operator did not write.** Cleanup applies an empty part: the API server
//!   removes only the fields the operator's field manager holds alone. Writes into a foreign Secret are
//!   never forced, so the API server refuses any field another manager holds with another value, even one
//!   changed between the check here and the write.

use std::collections::{BTreeMap, BTreeSet};

use super::secret::{WrittenSecret, fingerprint};
use crate::failure::Failure;

/// Annotation by which a Secret's owner lets one ClientApplication (its name, same namespace) merge into
/// the Secret.
pub const ALLOW_MERGE: &str = "medplum.com/allow-merge";

/// What a merge would write.
pub struct Merge<'a> {
    /// The ClientApplication's name.
    pub client: &'a str,
    /// The label naming the ClientApplication whose credentials a Secret holds.
    pub client_label: &'a str,
    /// The data keys it writes, each with the fingerprint of the value it would hold, when known: a key
    /// already holding that value is the client's own (written before its record was reset).
    pub keys: &'a [(&'a str, Option<String>)],
    /// Labels and annotations with their values; `None`: a value decided later (issue time, say).
    pub labels: &'a [(&'a str, Option<&'a str>)],
    pub annotations: &'a [(&'a str, Option<&'a str>)],
}

/// Why the merge may not be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("exists and was not made by the operator (set spec.secret.merge to write into it)")]
    NotMerged,
    #[error("is of type {0}; the operator writes only into Opaque Secrets")]
    NotOpaque(String),
    #[error("holds the credentials of ClientApplication {0}")]
    OtherClient(String),
    #[error("holds a connection's credentials or CA bundle")]
    ConnectionCredentials,
    #[error(
        "is not the operator's and its owner has not allowed ClientApplication {client} to merge into it (annotation {ALLOW_MERGE}: {client} on the Secret)"
    )]
    NoConsent { client: String },
    #[error("already holds {} that the operator did not write; nothing of it is overwritten", .0.join(", "))]
    KeyConflict(Vec<String>),
}

impl Failure for Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Self::NoConsent { .. } => "SecretMergeNotAllowed",
            Self::KeyConflict(_) => "SecretKeyConflict",
            _ => "SecretConflict",
        }
    }
    fn is_transient(&self) -> bool {
        false
    }
}

/// Why `merge` may not be written into `secret`, if it may not.
pub fn refusal(secret: &WrittenSecret, used_by_connection: bool, merge: &Merge) -> Option<Refusal> {
    if let Some(type_) = secret.type_.as_deref().filter(|t| *t != "Opaque") {
        return Some(Refusal::NotOpaque(type_.into()));
    }
    if let Some(other) = secret.labels.get(merge.client_label).filter(|owner| **owner != merge.client) {
        return Some(Refusal::OtherClient(other.clone()));
    }
    if used_by_connection {
        return Some(Refusal::ConnectionCredentials);
    }
    if !consented(secret, merge) {
        return Some(Refusal::NoConsent { client: merge.client.into() });
    }
    let conflicts = conflicts(secret, merge);
    (!conflicts.is_empty()).then_some(Refusal::KeyConflict(conflicts))
}

/// The owner's annotation names the client; or the operator already wrote this client's credentials
/// there before consent was asked for (an upgrade), which the label and the held keys show.
fn consented(secret: &WrittenSecret, merge: &Merge) -> bool {
    let named = secret.annotations.get(ALLOW_MERGE).is_some_and(|c| c.trim() == merge.client);
    let written_before = secret.labels.get(merge.client_label).is_some_and(|c| c == merge.client)
        && merge.keys.iter().any(|(key, _)| secret.held.data.contains(*key));
    named || written_before
}

/// The keys, labels and annotations the merge would overwrite that the operator did not write.
fn conflicts(secret: &WrittenSecret, merge: &Merge) -> Vec<String> {
    let keys = merge.keys.iter().filter(|(key, known)| {
        secret.present.contains(*key)
            && !secret.held.data.contains(*key)
            && known.as_ref().is_none_or(|k| secret.values.get(*key).map(fingerprint).as_ref() != Some(k))
    });
    let meta = |wanted: &[(&str, Option<&str>)], actual: &BTreeMap<String, String>, held: &BTreeSet<String>, what| {
        wanted
            .iter()
            .filter(|(k, v)| actual.get(*k).is_some_and(|a| Some(a.as_str()) != *v) && !held.contains(*k))
            .map(|(k, _)| format!("{what} {k}"))
            .collect::<Vec<_>>()
    };
    keys.map(|(k, _)| format!("key {k}"))
        .chain(meta(merge.labels, &secret.labels, &secret.held.labels, "label"))
        .chain(meta(merge.annotations, &secret.annotations, &secret.held.annotations, "annotation"))
        .collect()
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::super::secret::HeldFields;
    use super::*;

    const LABEL: &str = "medplum.com/client-application";

    fn s(v: &str) -> SecretString {
        SecretString::from(v.to_string())
    }

    /// One row: the Secret's keys with values, its annotations and labels, what the operator holds;
    /// the refusal's reason (None: written).
    struct Row {
        case: &'static str,
        data: &'static [(&'static str, &'static str)],
        annotations: &'static [(&'static str, &'static str)],
        labels: &'static [(&'static str, &'static str)],
        held: &'static [&'static str],
        type_: &'static str,
        connection: bool,
        refused: Option<&'static str>,
    }

    const CONSENT: (&str, &str) = (ALLOW_MERGE, "app");
    const ROW: Row = Row {
        case: "",
        data: &[("password", "p"), ("user", "u")],
        annotations: &[CONSENT],
        labels: &[],
        held: &[],
        type_: "Opaque",
        connection: false,
        refused: None,
    };

    #[test]
    fn a_merge_needs_consent_and_never_overwrites_what_the_operator_did_not_write() {
        let rows = [
            Row { case: "consented, no key in common", ..ROW },
            Row { case: "no consent", annotations: &[], refused: Some("SecretMergeNotAllowed"), ..ROW },
            Row {
                case: "consent for another client",
                annotations: &[(ALLOW_MERGE, "other")],
                refused: Some("SecretMergeNotAllowed"),
                ..ROW
            },
            Row {
                case: "written before consent existed: label and held keys",
                annotations: &[],
                labels: &[(LABEL, "app")],
                data: &[("ID", "c1"), ("password", "p")],
                held: &["ID"],
                ..ROW
            },
            Row {
                case: "the label alone is no consent",
                annotations: &[],
                labels: &[(LABEL, "app")],
                refused: Some("SecretMergeNotAllowed"),
                ..ROW
            },
            Row {
                case: "a key of the owner's",
                data: &[("SECRET", "theirs")],
                refused: Some("SecretKeyConflict"),
                ..ROW
            },
            Row { case: "a key the operator holds", data: &[("SECRET", "old")], held: &["SECRET"], ..ROW },
            Row { case: "a key with the client's own value", data: &[("ID", "c1")], ..ROW },
            Row { case: "a key with another value", data: &[("ID", "c0")], refused: Some("SecretKeyConflict"), ..ROW },
            Row {
                case: "the pending key of the owner's",
                data: &[("medplum-operator.next-client-secret", "x")],
                refused: Some("SecretKeyConflict"),
                ..ROW
            },
            Row { case: "a label of the owner's", labels: &[("team", "b")], refused: Some("SecretKeyConflict"), ..ROW },
            Row { case: "a label with the same value", labels: &[("team", "a")], ..ROW },
            Row {
                case: "an annotation of the owner's",
                annotations: &[CONSENT, ("note", "theirs")],
                refused: Some("SecretKeyConflict"),
                ..ROW
            },
            Row {
                case: "the issue time set by someone else",
                annotations: &[CONSENT, ("medplum.com/issued-at", "2020-01-01T00:00:00Z")],
                refused: Some("SecretKeyConflict"),
                ..ROW
            },
            Row { case: "another client's", labels: &[(LABEL, "other")], refused: Some("SecretConflict"), ..ROW },
            Row { case: "a connection's", connection: true, refused: Some("SecretConflict"), ..ROW },
            Row { case: "not Opaque", type_: "kubernetes.io/basic-auth", refused: Some("SecretConflict"), ..ROW },
        ];
        let keys =
            [("ID", Some(fingerprint(&s("c1")))), ("SECRET", None), ("medplum-operator.next-client-secret", None)];
        let merge = Merge {
            client: "app",
            client_label: LABEL,
            keys: &keys.iter().map(|(k, f)| (*k, f.clone())).collect::<Vec<_>>(),
            labels: &[(LABEL, Some("app")), ("team", Some("a"))],
            annotations: &[("note", Some("ours")), ("medplum.com/issued-at", None)],
        };
        for row in rows {
            let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
                pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
            };
            let data = map(row.data);
            let values = data.iter().map(|(k, v)| (k.clone(), s(v))).collect();
            let held = HeldFields { data: row.held.iter().map(|k| k.to_string()).collect(), ..Default::default() };
            let secret = WrittenSecret {
                exists: true,
                type_: Some(row.type_.into()),
                present: data.keys().cloned().collect(),
                values,
                labels: map(row.labels),
                annotations: map(row.annotations),
                held,
                ..Default::default()
            };
            let refusal = refusal(&secret, row.connection, &merge);
            assert_eq!(refusal.as_ref().map(Refusal::reason), row.refused, "{}: {refusal:?}", row.case);
            if let Some(Refusal::KeyConflict(what)) = &refusal {
                let message = Refusal::KeyConflict(what.clone()).to_string();
                assert!(!message.contains("theirs") && !message.contains("c0"), "names keys, never values: {message}");
            }
        }
    }
}
