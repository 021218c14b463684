//! What is there, and the next step: pure functions of what was observed and what should exist.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};

use super::{Desired, ISSUED_AT, MANAGED_BY, PENDING_KEY, ROTATE_CLIENTS_HANDLED, ROTATION_HANDLED};
use crate::controller::secret::{CLIENT_LABEL, SecretContent, WrittenSecret};
use crate::controller::workload::{Stall, TargetState};
use crate::crd::AdoptSecret;
use crate::medplum::{
    ClientApplicationResource, Coding, CredentialProof, Identifier, MembershipAccess, MembershipResource,
};

pub(super) fn secret_eq(a: Option<&SecretString>, b: Option<&SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        (None, None) => true,
        _ => false,
    }
}

/// The names of managed fields where Medplum differs from `desired` (never their values).
pub(crate) fn client_drift(
    desired: &ClientApplicationResource,
    actual: &ClientApplicationResource,
) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            fields.push(name);
        }
    };
    check("meta.tag", desired.meta.tag.iter().all(|t| actual.meta.has_tag(t)));
    check("status", actual.status.as_deref().is_none_or(|s| s == "active"));
    check("name", desired.name == actual.name);
    check("description", desired.description == actual.description);
    check("accessTokenLifetime", desired.access_token_lifetime == actual.access_token_lifetime);
    check("refreshTokenLifetime", desired.refresh_token_lifetime == actual.refresh_token_lifetime);
    check("redirectUris", desired.redirect_uris == actual.redirect_uris);
    check("pkceOptional", desired.pkce_optional == actual.pkce_optional);
    check("jwksUri", desired.jwks_uri == actual.jwks_uri);
    check("launchUri", desired.launch_uri == actual.launch_uri);
    check("allowedOrigin", desired.allowed_origin == actual.allowed_origin);
    check("defaultScope", desired.default_scope == actual.default_scope);
    let idp_same = match (&desired.identity_provider, &actual.identity_provider) {
        (None, None) => true,
        (Some(d), Some(a)) => d.same_as(a),
        _ => false,
    };
    check("identityProvider", idp_same);
    fields
}

/// The full ClientApplication to write: the managed fields, our tag added to the tags others set,
/// and the secrets Medplum should hold.
pub(super) fn client_body(
    desired: &ClientApplicationResource,
    actual: Option<&ClientApplicationResource>,
    secret: Option<&SecretString>,
    retiring: Option<&SecretString>,
) -> ClientApplicationResource {
    let mut body = desired.clone();
    if let Some(actual) = actual {
        body.id = actual.id.clone();
        body.meta.tag = actual.meta.tags_with(&desired.meta.tag);
    }
    body.secret = secret.cloned();
    body.retiring_secret = retiring.cloned();
    body
}

/// The names of membership fields that differ from what the spec grants.
pub(crate) fn membership_drift(
    desired_access: &[MembershipAccess],
    desired_admin: bool,
    identifier: &Identifier,
    actual: &MembershipResource,
) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if actual.access != desired_access {
        fields.push("access");
    }
    if actual.access_policy.is_some() {
        fields.push("accessPolicy");
    }
    if actual.admin.unwrap_or(false) != desired_admin {
        fields.push("admin");
    }
    if actual.active == Some(false) {
        fields.push("active");
    }
    if !actual.identifier.contains(identifier) {
        fields.push("identifier");
    }
    fields
}

pub(super) fn identifier_of(tag: &Coding) -> Identifier {
    Identifier { system: tag.system.clone(), value: tag.code.clone() }
}

/// A new client secret: 256 random bits as 64 hex digits (no `:`, which Basic auth cannot carry).
pub(super) fn generate_secret() -> SecretString {
    let bytes: [u8; 32] = rand::random();
    SecretString::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// What a reconcile observed; updated as steps are carried out.
pub(super) struct Observed {
    pub secret: WrittenSecret,
    /// The Secret exists but is not the operator's, and merging was not asked for.
    pub client: Option<ClientApplicationResource>,
    pub membership: Option<MembershipResource>,
    pub targets: Vec<TargetState>,
    /// How Medplum proved the Secret's current credentials right, if it did.
    pub verified: Option<CredentialProof>,
    /// This reconcile created the Medplum client, with a secret issued after every request it saw.
    pub created: bool,
}

impl Observed {
    pub(super) fn value(&self, key: &str) -> Option<&SecretString> {
        self.secret.values.get(key)
    }
    pub(super) fn pending(&self) -> Option<&SecretString> {
        self.value(PENDING_KEY)
    }
    pub(super) fn issued_at(&self) -> Option<Timestamp> {
        self.secret.annotations.get(ISSUED_AT)?.parse().ok()
    }
}

/// The one next thing to do.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Step {
    /// Write a new secret under [`PENDING_KEY`] before Medplum sees it (to rotate, or to replace an
    /// adopted client's secret), recording the rotation requests it answers.
    StoreNewSecret,
    /// Create the Medplum client with a new secret (or the pending one a previous operator left),
    /// idempotent through the ownership tag.
    CreateClient,
    /// Write the managed fields (and the tag, when adopting) to Medplum.
    UpdateClient {
        fields: Vec<&'static str>,
    },
    CreateMembership,
    UpdateMembership {
        fields: Vec<&'static str>,
    },
    /// Medplum: the pending secret becomes `secret`, the current one `retiringSecret`.
    PushSecret,
    /// Secret: write Medplum's current credentials (after a switch, or to restore an edited Secret).
    WriteSecret {
        switched: bool,
    },
    RestartTargets,
    WaitForRollout {
        target: String,
        /// Why its rollout does not progress, when Kubernetes says so.
        stalled: Option<Stall>,
    },
    WaitForGrace {
        until: Timestamp,
    },
    /// Medplum: drop `retiringSecret`.
    RetireSecret,
    /// Get a token with the Secret's credentials.
    Verify,
    Done,
}

/// The credential keys of the Secret for Medplum's current credentials.
pub(super) fn credentials_data(d: &Desired, client_id: &str, secret: &SecretString) -> BTreeMap<String, SecretString> {
    let token_url = format!("{}oauth2/token", d.base_url);
    [
        (&d.keys.base_url, d.base_url.as_str()),
        (&d.keys.client_id, client_id),
        (&d.keys.token_url, token_url.as_str()),
        (&d.keys.project_id, d.project_id.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.clone(), SecretString::from(v.to_string())))
    .chain([(d.keys.client_secret.clone(), secret.clone())])
    .collect()
}

/// The operator's part of the Secret with `data` and the given annotations.
pub(super) fn secret_content(
    d: &Desired,
    o: &Observed,
    data: BTreeMap<String, SecretString>,
    issued_at: Option<String>,
    answered: &Answered,
) -> SecretContent {
    let mut labels = d.labels.clone();
    labels.insert(CLIENT_LABEL.into(), d.name.clone());
    let mut annotations = d.annotations.clone();
    if let Some(issued_at) = issued_at {
        annotations.insert(ISSUED_AT.into(), issued_at);
    }
    answered.annotate(&mut annotations);
    let foreign = o.secret.exists && !o.secret.owner_uids.contains(&d.owner.uid);
    if !foreign {
        labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    }
    SecretContent { data, labels, annotations, owner: (!foreign).then(|| d.owner.clone()) }
}

/// What the Secret should hold now that Medplum's client is known.
pub(super) fn settled_content(
    d: &Desired,
    o: &Observed,
    client_id: &str,
    secret: &SecretString,
    now: Timestamp,
) -> SecretContent {
    let mut data = credentials_data(d, client_id, secret);
    if let Some(pending) = o.pending() {
        data.insert(PENDING_KEY.into(), pending.clone());
    }
    let unchanged = o.value(&d.keys.client_id).is_some_and(|v| v.expose_secret() == client_id)
        && secret_eq(o.value(&d.keys.client_secret), Some(secret));
    // Whole seconds, rounded up: status times have second precision and must compare equal later,
    // and a grace period counted from here must not come out shorter than asked for.
    let issued_at = match (unchanged, o.secret.annotations.get(ISSUED_AT)) {
        (true, Some(issued)) => issued.clone(),
        _ => {
            let second = now.as_second() + i64::from(now.subsec_nanosecond() > 0);
            Timestamp::from_second(second).expect("now is a valid time").to_string()
        }
    };
    // A client created in this reconcile has a secret issued after every request seen.
    let answered = if o.created { Answered::now(d, o) } else { Answered::of(o) };
    secret_content(d, o, data, Some(issued_at), &answered)
}

/// The rotation requests the Secret's secret answers: `medplum.com/rotate` on the client and
/// `medplum.com/rotate-clients` on its connection, as last recorded in the Secret's annotations.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Answered {
    pub own: Option<String>,
    pub clients: Option<String>,
}

impl Answered {
    pub(super) fn of(o: &Observed) -> Self {
        let get = |key: &str| o.secret.annotations.get(key).cloned();
        Self { own: get(ROTATION_HANDLED), clients: get(ROTATE_CLIENTS_HANDLED) }
    }

    /// What a secret issued now answers: every request present now.
    pub(super) fn now(d: &Desired, o: &Observed) -> Self {
        let before = Self::of(o);
        Self {
            own: d.rotation_request.clone().or(before.own),
            clients: d.rotate_clients_request.clone().or(before.clients),
        }
    }

    fn annotate(&self, annotations: &mut BTreeMap<String, String>) {
        for (key, value) in [(ROTATION_HANDLED, &self.own), (ROTATE_CLIENTS_HANDLED, &self.clients)] {
            if let Some(value) = value {
                annotations.insert(key.into(), value.clone());
            }
        }
    }
}

/// Whether a rotation should start: a request not answered yet, or the interval passed.
pub(super) fn rotation_due(d: &Desired, o: &Observed, now: Timestamp) -> bool {
    let answered = Answered::of(o);
    let unanswered = |request: &Option<String>, answer: &Option<String>| {
        request.as_ref().is_some_and(|r| answer.as_ref() != Some(r))
    };
    if unanswered(&d.rotation_request, &answered.own) || unanswered(&d.rotate_clients_request, &answered.clients) {
        return true;
    }
    let due = d.rotation_interval.zip(o.issued_at()).and_then(|(interval, issued)| issued.checked_add(interval).ok());
    due.is_some_and(|due| now >= due)
}

/// The next step towards what `d` says should exist, given what `o` observed.
pub(super) fn plan(d: &Desired, o: &Observed, now: Timestamp) -> Step {
    let pending = o.pending();
    // A new client gets its secret in Medplum first: once created, Medplum holds it (and a restart
    // finds the client by its tag and writes the Secret from it), so no pending copy is needed.
    let Some(client) = &o.client else { return Step::CreateClient };
    let drift = client_drift(&d.client, client);
    if !drift.is_empty() {
        return Step::UpdateClient { fields: drift };
    }
    let identifier = identifier_of(&d.tag);
    match &o.membership {
        None => return Step::CreateMembership,
        Some(m) => {
            let fields = membership_drift(&d.access, d.admin, &identifier, m);
            if !fields.is_empty() {
                return Step::UpdateMembership { fields };
            }
        }
    }
    let client_id = client.id.as_deref().unwrap_or_default();
    let retiring = client.retiring_secret.is_some();
    if let Some(pending) = pending {
        if secret_eq(client.secret.as_ref(), Some(pending)) {
            return Step::WriteSecret { switched: true };
        }
        if !retiring {
            return Step::PushSecret;
        }
        // A previous secret is still retiring; Medplum holds two at most, so that ends first.
    }
    // An adopted client whose secret is to be replaced: a new one before anything is written.
    let adopting_with_rotation = d.adopt.as_ref().is_some_and(|a| a.secret == AdoptSecret::Rotate)
        && !o.secret.annotations.contains_key(ISSUED_AT);
    if adopting_with_rotation && pending.is_none() && !retiring {
        return Step::StoreNewSecret;
    }
    let Some(secret) = client.secret.as_ref() else {
        // Someone removed the secret in Medplum: issue a new one.
        return if pending.is_some() { Step::PushSecret } else { Step::StoreNewSecret };
    };
    if !settled_content(d, o, client_id, secret, now).is_in(&o.secret) {
        return Step::WriteSecret { switched: false };
    }
    let issued = o.secret.annotations.get(ISSUED_AT).cloned().unwrap_or_default();
    let stale_targets = o.targets.iter().any(|t| t.exists && t.restarted_for.as_deref() != Some(issued.as_str()));
    if retiring {
        if stale_targets {
            return Step::RestartTargets;
        }
        if o.verified.is_none() {
            return Step::Verify;
        }
        if let Some(t) = o.targets.iter().find(|t| t.exists && !t.rolled_out) {
            let target = format!("{:?}/{}", t.target.kind, t.target.name);
            return Step::WaitForRollout { target, stalled: t.stalled.clone() };
        }
        let until = o.issued_at().and_then(|i| i.checked_add(d.grace_period).ok()).unwrap_or(now);
        if now < until {
            return Step::WaitForGrace { until };
        }
        return Step::RetireSecret;
    }
    if stale_targets {
        return Step::RestartTargets;
    }
    if rotation_due(d, o, now) {
        return Step::StoreNewSecret;
    }
    if o.verified.is_none() {
        return Step::Verify;
    }
    Step::Done
}
