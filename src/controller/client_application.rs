//! `ClientApplication`: a Medplum ClientApplication and its membership, with working credentials in a
//! Kubernetes Secret, rotated without downtime.
//!
//! Every reconcile observes the Secret, the Medplum client and membership and the restart targets, then
//! repeatedly asks [`plan`] (pure) for the one next step and carries it out, until nothing is left to do.
//! Progress lives only in what is observed, so a reconcile killed at any line resumes where it stopped:
//! - a new secret is written to the Secret (key [`PENDING_KEY`]) before Medplum sees it;
//! - Medplum then holds it as `secret` and the old one as `retiringSecret`, both working;
//! - the Secret switches to it (annotation [`ISSUED_AT`]) and the restart targets are restarted;
//! - once they rolled out and the grace period passed, the old secret is retired.
//!
//! Medplum objects are found again through an ownership tag (ClientApplication has no identifier).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::access_policy::{GrantError, resolve_grants};
use super::adoption::{self, AdoptionError};
use super::connection::{CREDENTIALS_LABEL, UsableConnection, UseError, usable_connection};
use super::secret::{
    CLIENT_LABEL, SecretContent, SourceError, WrittenSecret, apply_written, read_secret_strings, read_written,
};
use super::status::{ConditionState, READY, apply_status, set_condition};
use super::workload::{self, TargetState};
use super::{CleanupVia, Context, Error, ReconcileStream, cleanup_via, crash_point, event};
use crate::crd::{
    AdoptSecret, ClientApplication, ClientApplicationStatus, DeletionPolicy, MedplumConnection, RestartTarget,
};
use crate::medplum::{
    ClientApplicationResource, ClientCredentials, Coding, CredentialProof, Identifier, IdentityProviderResource,
    MedplumClient, MedplumError, MembershipAccess, MembershipResource, Ref,
};

pub const KIND: &str = "ClientApplication";
/// Set to any new value on a ClientApplication to rotate its secret now.
pub const ROTATE_ANNOTATION: &str = "medplum.com/rotate";
/// Secret key holding a new secret that Medplum may not know yet.
pub const PENDING_KEY: &str = "medplum-operator.next-client-secret";
/// Secret annotation: when the current credentials were written (RFC 3339).
pub const ISSUED_AT: &str = "medplum.com/issued-at";
/// Secret annotation: the last `medplum.com/rotate` value acted on.
pub const ROTATION_HANDLED: &str = "medplum.com/rotation-handled";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "medplum-operator");
/// Condition: Medplum proved the Secret's current credentials right; its reason says how.
const CREDENTIAL_VERIFIED: &str = "CredentialVerified";
/// How often a rollout in progress is looked at again.
const ROLLOUT_POLL: Duration = Duration::from_secs(5);
/// A reconcile carries out at most this many steps; a correct plan needs far fewer.
const MAX_STEPS: usize = 24;

/// Why a ClientApplication cannot be reconciled now.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connection(#[from] UseError),
    #[error(
        "spec.unrestrictedAccess asks for a membership without any policy (full access), which the connection does not allow (spec.limits.allowUnrestrictedAccess)"
    )]
    UnrestrictedAccessNotAllowed,
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("Secret {name} {why}; refusing to write into it")]
    SecretConflict { name: String, why: String },
    #[error(transparent)]
    Adoption(#[from] AdoptionError),
    #[error(
        "restart target {target} does not use Secret {secret} (no volume, env or envFrom of its pod template refers to it); only workloads that use the credentials are restarted"
    )]
    RestartTargetNotUsingSecret { target: String, secret: String },
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("Medplum refused the credentials in the Secret: {0}")]
    CredentialRejected(String),
    #[error("Medplum keeps {0} different from the spec after an update")]
    NotConverging(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Medplum(#[from] MedplumError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl ClientError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connection(e) => e.reason(),
            Self::UnrestrictedAccessNotAllowed => "UnrestrictedAccessNotAllowed",
            Self::Grant(e) => e.reason(),
            Self::SecretConflict { .. } => "SecretConflict",
            Self::Adoption(e) => e.reason(),
            Self::RestartTargetNotUsingSecret { .. } => "RestartTargetNotAllowed",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::CredentialRejected(_) => "CredentialRejected",
            Self::NotConverging(_) => "NotConverging",
            Self::Source(e) => e.reason(),
            Self::Medplum(e) => e.reason(),
            Self::Kube(_) => "KubernetesApiError",
        }
    }

    /// Retried with exponential backoff; the others wait for a change (or the resync).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Medplum(e) => e.is_transient() || matches!(e, MedplumError::PreconditionFailed { .. }),
            Self::Source(e) => e.is_transient(),
            Self::Connection(e) => e.is_transient(),
            Self::Grant(e) => e.is_transient(),
            Self::Adoption(e) => e.is_transient(),
            Self::Kube(_) => true,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// What should exist (pure)

/// Everything the spec and its references say should exist.
pub struct Desired {
    pub name: String,
    pub namespace: String,
    pub tag: Coding,
    /// The managed fields of the Medplum ClientApplication (no id, no secrets).
    pub client: ClientApplicationResource,
    pub access: Vec<MembershipAccess>,
    pub project_id: String,
    pub base_url: String,
    pub secret_name: String,
    pub keys: crate::crd::SecretKeys,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub owner: OwnerReference,
    pub merge: bool,
    pub rotation_interval: Option<Duration>,
    pub grace_period: Duration,
    pub restart_targets: Vec<RestartTarget>,
    pub rotation_request: Option<String>,
    pub adopt: Option<crate::crd::Adopt>,
}

fn parse_duration(field: &str, text: &str) -> Result<Duration, ClientError> {
    crate::config::parse_duration(text).map_err(|e| ClientError::InvalidSpec(format!("{field}: {e}")))
}

/// The managed fields of the Medplum ClientApplication for a spec.
pub fn desired_client(
    ca: &ClientApplication,
    tag: &Coding,
    identity_provider_secret: Option<SecretString>,
) -> ClientApplicationResource {
    let spec = &ca.spec;
    let namespace = ca.namespace().unwrap_or_default();
    // A resource that adopts marks the client as adopted, so that its deletion knows.
    let marker = spec.adopt.as_ref().map(|_| adoption::adopted_marker(tag));
    ClientApplicationResource {
        resource_type: "ClientApplication".into(),
        meta: crate::medplum::Meta { tag: std::iter::once(tag.clone()).chain(marker).collect(), ..Default::default() },
        name: Some(spec.display_name.clone().unwrap_or_else(|| format!("{namespace}/{}", ca.name_any()))),
        description: spec.description.clone(),
        access_token_lifetime: spec.access_token_lifetime.clone(),
        refresh_token_lifetime: spec.refresh_token_lifetime.clone(),
        redirect_uris: spec.redirect_uris.clone(),
        pkce_optional: spec.pkce_optional,
        jwks_uri: spec.jwks_uri.clone(),
        launch_uri: spec.launch_uri.clone(),
        allowed_origin: spec.allowed_origins.clone(),
        default_scope: spec.default_scopes.clone(),
        identity_provider: spec.identity_provider.as_ref().map(|idp| IdentityProviderResource {
            authorize_url: idp.authorize_url.clone(),
            token_url: idp.token_url.clone(),
            user_info_url: idp.user_info_url.clone(),
            client_id: idp.client_id.clone(),
            client_secret: identity_provider_secret,
            token_auth_method: idp
                .token_auth_method
                .map(|m| serde_json::to_value(m).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()),
            use_pkce: idp.use_pkce,
            use_subject: idp.use_subject,
        }),
        ..Default::default()
    }
}

fn secret_eq(a: Option<&SecretString>, b: Option<&SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        (None, None) => true,
        _ => false,
    }
}

/// The names of managed fields where Medplum differs from `desired` (never their values).
pub fn client_drift(desired: &ClientApplicationResource, actual: &ClientApplicationResource) -> Vec<&'static str> {
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
        (Some(d), Some(a)) => {
            d.authorize_url == a.authorize_url
                && d.token_url == a.token_url
                && d.user_info_url == a.user_info_url
                && d.client_id == a.client_id
                && secret_eq(d.client_secret.as_ref(), a.client_secret.as_ref())
                && d.token_auth_method == a.token_auth_method
                && d.use_pkce == a.use_pkce
                && d.use_subject == a.use_subject
        }
        _ => false,
    };
    check("identityProvider", idp_same);
    fields
}

/// The full ClientApplication to write: the managed fields, our tag added to the tags others set,
/// and the secrets Medplum should hold.
fn client_body(
    desired: &ClientApplicationResource,
    actual: Option<&ClientApplicationResource>,
    secret: Option<&SecretString>,
    retiring: Option<&SecretString>,
) -> ClientApplicationResource {
    let mut body = desired.clone();
    if let Some(actual) = actual {
        body.id = actual.id.clone();
        let mut tags = actual.meta.tag.clone();
        tags.retain(|t| t.system != "http://hl7.org/fhir/v3/ObservationValue");
        for tag in &desired.meta.tag {
            if !tags.contains(tag) {
                tags.push(tag.clone());
            }
        }
        body.meta.tag = tags;
    }
    body.secret = secret.cloned();
    body.retiring_secret = retiring.cloned();
    body
}

/// The names of membership fields that differ from what the spec grants.
pub fn membership_drift(
    desired_access: &[MembershipAccess],
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
    if actual.admin == Some(true) {
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

fn identifier_of(tag: &Coding) -> Identifier {
    Identifier { system: tag.system.clone(), value: tag.code.clone() }
}

/// `sha256:` and 16 hex digits: tells secrets apart without revealing one (they are 256-bit random).
pub fn fingerprint(secret: &SecretString) -> String {
    let digest = Sha256::digest(secret.expose_secret().as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A new client secret: 256 random bits as 64 hex digits (no `:`, which Basic auth cannot carry).
pub fn generate_secret() -> SecretString {
    let bytes: [u8; 32] = rand::random();
    SecretString::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

// ---------------------------------------------------------------------------------------------------
// What is there, and the next step (pure)

/// What a reconcile observed; updated as steps are carried out.
pub struct Observed {
    pub secret: WrittenSecret,
    /// The Secret exists but is not the operator's, and merging was not asked for.
    pub client: Option<ClientApplicationResource>,
    pub membership: Option<MembershipResource>,
    pub targets: Vec<TargetState>,
    /// How Medplum proved the Secret's current credentials right, if it did.
    pub verified: Option<CredentialProof>,
}

impl Observed {
    fn value(&self, key: &str) -> Option<&SecretString> {
        self.secret.values.get(key)
    }
    fn pending(&self) -> Option<&SecretString> {
        self.value(PENDING_KEY)
    }
    fn issued_at(&self) -> Option<Timestamp> {
        self.secret.annotations.get(ISSUED_AT)?.parse().ok()
    }
}

/// The one next thing to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Write a new secret under [`PENDING_KEY`] (for a new client, or to rotate); `handled` records a
    /// rotation request.
    StoreNewSecret {
        handled: Option<String>,
    },
    /// Create the Medplum client with the pending secret (idempotent through the ownership tag).
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
fn credentials_data(d: &Desired, client_id: &str, secret: &SecretString) -> BTreeMap<String, SecretString> {
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
fn secret_content(
    d: &Desired,
    o: &Observed,
    data: BTreeMap<String, SecretString>,
    issued_at: Option<String>,
    handled: Option<String>,
) -> SecretContent {
    let mut labels = d.labels.clone();
    labels.insert(CLIENT_LABEL.into(), d.name.clone());
    let mut annotations = d.annotations.clone();
    if let Some(issued_at) = issued_at {
        annotations.insert(ISSUED_AT.into(), issued_at);
    }
    if let Some(handled) = handled {
        annotations.insert(ROTATION_HANDLED.into(), handled);
    }
    let foreign = o.secret.exists && !o.secret.owner_uids.contains(&d.owner.uid);
    if !foreign {
        labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    }
    SecretContent { data, labels, annotations, owner: (!foreign).then(|| d.owner.clone()) }
}

/// What the Secret should hold now that Medplum's client is known.
fn settled_content(d: &Desired, o: &Observed, client_id: &str, secret: &SecretString, now: Timestamp) -> SecretContent {
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
    let handled = o.secret.annotations.get(ROTATION_HANDLED).cloned();
    secret_content(d, o, data, Some(issued_at), handled)
}

/// Whether a rotation should start, and the rotation request it answers.
fn rotation_due(d: &Desired, o: &Observed, now: Timestamp) -> Option<Option<String>> {
    let handled = o.secret.annotations.get(ROTATION_HANDLED);
    if let Some(request) = d.rotation_request.as_ref().filter(|r| handled != Some(*r)) {
        return Some(Some(request.clone()));
    }
    let interval = d.rotation_interval?;
    let issued = o.issued_at()?;
    let due = issued.checked_add(interval).ok()?;
    (now >= due).then_some(None)
}

/// The next step towards what `d` says should exist, given what `o` observed.
pub fn plan(d: &Desired, o: &Observed, now: Timestamp) -> Step {
    let pending = o.pending();
    let Some(client) = &o.client else {
        return if pending.is_some() { Step::CreateClient } else { Step::StoreNewSecret { handled: None } };
    };
    let drift = client_drift(&d.client, client);
    if !drift.is_empty() {
        return Step::UpdateClient { fields: drift };
    }
    let identifier = identifier_of(&d.tag);
    match &o.membership {
        None => return Step::CreateMembership,
        Some(m) => {
            let fields = membership_drift(&d.access, &identifier, m);
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
        return Step::StoreNewSecret { handled: None };
    }
    let Some(secret) = client.secret.as_ref() else {
        // Someone removed the secret in Medplum: issue a new one.
        return if pending.is_some() { Step::PushSecret } else { Step::StoreNewSecret { handled: None } };
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
            return Step::WaitForRollout { target: format!("{:?}/{}", t.target.kind, t.target.name) };
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
    if let Some(handled) = rotation_due(d, o, now) {
        return Step::StoreNewSecret { handled };
    }
    if o.verified.is_none() {
        return Step::Verify;
    }
    Step::Done
}

// ---------------------------------------------------------------------------------------------------
// Carrying steps out

struct Reconciler<'a> {
    ctx: &'a Context,
    ca: &'a ClientApplication,
    d: Desired,
    usable: UsableConnection,
    events: Vec<Event>,
}

impl Reconciler<'_> {
    fn normal(&mut self, reason: &str, action: &str, note: String) {
        self.events.push(event(EventType::Normal, reason, action, note));
    }

    fn updated(&mut self, target: &str, fields: &[&str]) {
        let observed = self.ca.status.as_ref().and_then(|s| s.observed_generation);
        self.events.push(super::update_event(observed, self.ca.metadata.generation, target, &fields.join(", ")));
    }

    async fn write_secret(&self, content: &SecretContent) -> Result<(), ClientError> {
        apply_written(&self.ctx.client, &self.d.namespace, &self.d.secret_name, content).await?;
        Ok(())
    }

    async fn reread_secret(&self, o: &mut Observed) -> Result<(), ClientError> {
        o.secret =
            read_written(&self.ctx.client, &self.d.namespace, &self.d.secret_name, &secret_keys(&self.d)).await?;
        Ok(())
    }

    /// Carries out one step; returns how long to wait when the step is a wait.
    async fn execute(
        &mut self,
        step: &Step,
        o: &mut Observed,
        now: Timestamp,
    ) -> Result<Option<Duration>, ClientError> {
        let d = &self.d;
        match step {
            Step::StoreNewSecret { handled } => {
                let mut data: BTreeMap<String, SecretString> = o
                    .secret
                    .values
                    .iter()
                    .filter(|(k, _)| k.as_str() != PENDING_KEY)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                data.insert(PENDING_KEY.into(), generate_secret());
                let handled = handled.clone().or_else(|| o.secret.annotations.get(ROTATION_HANDLED).cloned());
                let issued = o.secret.annotations.get(ISSUED_AT).cloned();
                let content = secret_content(d, o, data, issued, handled);
                self.write_secret(&content).await?;
                crash_point("store-new-secret");
                self.reread_secret(o).await?;
            }
            Step::CreateClient => {
                let body = client_body(&d.client, None, o.pending(), None);
                let condition = format!("_tag={}|{}", d.tag.system, d.tag.code);
                let created = self.usable.create(&body, Some(&condition)).await?;
                crash_point("create-client");
                self.normal(
                    "Created",
                    "Create",
                    format!("created Medplum ClientApplication/{}", created.id.as_deref().unwrap_or_default()),
                );
                o.client = Some(created);
            }
            Step::UpdateClient { fields } => {
                let actual = o.client.as_ref().expect("planned with a client");
                let body =
                    client_body(&d.client, Some(actual), actual.secret.as_ref(), actual.retiring_secret.as_ref());
                let id = actual.id.clone().unwrap_or_default();
                let updated = self
                    .usable
                    .client
                    .update(&id, &body, actual.meta.version_id.as_deref().unwrap_or_default())
                    .await?;
                if fields.contains(&"meta.tag") && d.adopt.as_ref().is_some_and(|a| a.client_id == id) {
                    self.normal("Adopted", "Adopt", format!("took over Medplum ClientApplication/{id}"));
                } else {
                    self.updated(&format!("ClientApplication/{id}"), fields);
                }
                o.client = Some(updated);
            }
            Step::CreateMembership => {
                let client_id = o.client.as_ref().and_then(|c| c.id.clone()).unwrap_or_default();
                let client_ref = format!("ClientApplication/{client_id}");
                let body = MembershipResource {
                    resource_type: "ProjectMembership".into(),
                    project: Ref::to(format!("Project/{}", d.project_id)),
                    user: Ref::to(client_ref.clone()),
                    profile: Ref::to(client_ref.clone()),
                    access: d.access.clone(),
                    identifier: vec![identifier_of(&d.tag)],
                    ..Default::default()
                };
                let created = self.usable.create(&body, Some(&format!("user={client_ref}"))).await?;
                crash_point("create-membership");
                self.normal(
                    "Created",
                    "Create",
                    format!(
                        "created Medplum ProjectMembership/{} for {client_ref}",
                        created.id.as_deref().unwrap_or_default()
                    ),
                );
                o.membership = Some(created);
            }
            Step::UpdateMembership { fields } => {
                let actual = o.membership.clone().expect("planned with a membership");
                let mut body = actual.clone();
                body.access = d.access.clone();
                body.access_policy = None;
                body.admin = None;
                body.active = None;
                let identifier = identifier_of(&d.tag);
                if !body.identifier.contains(&identifier) {
                    body.identifier.push(identifier);
                }
                let id = actual.id.clone().unwrap_or_default();
                let updated = self
                    .usable
                    .client
                    .update(&id, &body, actual.meta.version_id.as_deref().unwrap_or_default())
                    .await?;
                self.updated(&format!("ProjectMembership/{id}"), fields);
                o.membership = Some(updated);
            }
            Step::PushSecret => {
                let actual = o.client.as_ref().expect("planned with a client");
                let body = client_body(&d.client, Some(actual), o.pending(), actual.secret.as_ref());
                let id = actual.id.clone().unwrap_or_default();
                let updated = self
                    .usable
                    .client
                    .update(&id, &body, actual.meta.version_id.as_deref().unwrap_or_default())
                    .await?;
                crash_point("push-secret");
                o.client = Some(updated);
            }
            Step::WriteSecret { switched } => {
                let client = o.client.as_ref().expect("planned with a client");
                let client_id = client.id.clone().unwrap_or_default();
                let secret = client.secret.clone().expect("planned with a secret");
                let mut content = settled_content(d, o, &client_id, &secret, now);
                if *switched {
                    content.data.remove(PENDING_KEY);
                }
                let credentials_changed = o.value(&d.keys.client_id).is_none_or(|v| v.expose_secret() != client_id)
                    || !secret_eq(o.value(&d.keys.client_secret), Some(&secret));
                self.write_secret(&content).await?;
                crash_point("write-secret");
                if *switched && o.value(&d.keys.client_secret).is_some() {
                    self.normal(
                        "Rotated",
                        "Rotate",
                        format!("Secret {} switched to the new secret {}", d.secret_name, fingerprint(&secret)),
                    );
                } else if credentials_changed && o.secret.exists && o.value(&d.keys.client_secret).is_some() {
                    self.events.push(event(
                        EventType::Warning,
                        "SecretRestored",
                        "Update",
                        format!("Secret {} did not hold the client's credentials; restored them", d.secret_name),
                    ));
                } else if !o.secret.exists && !*switched {
                    self.events.push(event(
                        EventType::Warning,
                        "SecretRestored",
                        "Create",
                        format!("Secret {} was missing; recreated it", d.secret_name),
                    ));
                }
                self.reread_secret(o).await?;
            }
            Step::RestartTargets => {
                let issued = o.secret.annotations.get(ISSUED_AT).cloned().unwrap_or_default();
                let mut restarted = Vec::new();
                for target in
                    o.targets.iter_mut().filter(|t| t.exists && t.restarted_for.as_deref() != Some(issued.as_str()))
                {
                    workload::restart(&self.ctx.client, &d.namespace, &target.target, &issued).await?;
                    restarted.push(format!("{:?}/{}", target.target.kind, target.target.name));
                    *target = workload::observe(&self.ctx.client, &d.namespace, &target.target, &d.secret_name).await?;
                }
                crash_point("restart-targets");
                self.normal(
                    "Restarted",
                    "Restart",
                    format!("restarted {} for the credentials issued at {issued}", restarted.join(", ")),
                );
            }
            Step::WaitForRollout { .. } => return Ok(Some(ROLLOUT_POLL)),
            Step::WaitForGrace { until } => {
                let left = until.duration_since(now).unsigned_abs();
                return Ok(Some(left.max(Duration::from_secs(1))));
            }
            Step::RetireSecret => {
                let actual = o.client.as_ref().expect("planned with a client");
                let body = client_body(&d.client, Some(actual), actual.secret.as_ref(), None);
                let id = actual.id.clone().unwrap_or_default();
                let updated = self
                    .usable
                    .client
                    .update(&id, &body, actual.meta.version_id.as_deref().unwrap_or_default())
                    .await?;
                crash_point("retire-secret");
                self.ctx.metrics.record_rotation();
                self.normal(
                    "SecretRetired",
                    "Rotate",
                    format!("the previous secret of ClientApplication/{id} no longer works"),
                );
                o.client = Some(updated);
            }
            Step::Verify => {
                let client_id = o.client.as_ref().and_then(|c| c.id.clone()).unwrap_or_default();
                let secret = o.value(&d.keys.client_secret).cloned().expect("verified after the Secret was written");
                match self
                    .usable
                    .client
                    .check_credentials(&ClientCredentials { client_id, client_secret: secret })
                    .await
                {
                    Ok(proof) => o.verified = Some(proof),
                    Err(MedplumError::InvalidCredentials { description }) => {
                        return Err(ClientError::CredentialRejected(description));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Step::Done => {}
        }
        Ok(None)
    }
}

fn secret_keys(d: &Desired) -> Vec<&str> {
    vec![&d.keys.base_url, &d.keys.client_id, &d.keys.client_secret, &d.keys.token_url, &d.keys.project_id, PENDING_KEY]
}

/// The `CredentialVerified` reason for each kind of proof.
fn reason_of_proof(proof: CredentialProof) -> &'static str {
    match proof {
        CredentialProof::TokenIssued => "TokenIssued",
        CredentialProof::AddressNotAllowed => "SecretAcceptedAddressBlocked",
    }
}

fn proof_of_reason(reason: &str) -> Option<CredentialProof> {
    [CredentialProof::TokenIssued, CredentialProof::AddressNotAllowed]
        .into_iter()
        .find(|p| reason_of_proof(*p) == reason)
}

// ---------------------------------------------------------------------------------------------------
// Reconcile

async fn desired(ctx: &Context, ca: &ClientApplication, usable: &UsableConnection) -> Result<Desired, ClientError> {
    if ca.spec.unrestricted_access && !usable.limits.allow_unrestricted_access {
        return Err(ClientError::UnrestrictedAccessNotAllowed);
    }
    let namespace = ca.namespace().unwrap_or_default();
    let name = ca.name_any();
    let access = resolve_grants(ctx, &namespace, &ca.spec.connection_ref, &ca.spec.access).await?;
    let idp_secret = match ca.spec.identity_provider.as_ref().and_then(|idp| idp.client_secret_ref.as_ref()) {
        Some(r) => read_secret_strings(&ctx.client, &namespace, &r.name, &[&r.key]).await?.pop(),
        None => None,
    };
    let tag = super::ownership_tag(&ctx.settings.cluster_id, KIND, &namespace, &name);
    let rotation = &ca.spec.rotation;
    Ok(Desired {
        client: desired_client(ca, &tag, idp_secret),
        tag,
        access,
        project_id: usable.project_id.clone(),
        base_url: usable.client.base_url().to_string(),
        secret_name: ca.spec.secret.name.clone().unwrap_or_else(|| name.clone()),
        keys: ca.spec.secret.keys.clone(),
        labels: ca.spec.secret.labels.clone(),
        annotations: ca.spec.secret.annotations.clone(),
        owner: ca.controller_owner_ref(&()).expect("stored objects have a uid"),
        merge: ca.spec.secret.merge,
        rotation_interval: rotation
            .interval
            .as_deref()
            .map(|i| parse_duration("spec.rotation.interval", i))
            .transpose()?,
        grace_period: parse_duration("spec.rotation.gracePeriod", &rotation.grace_period)?,
        restart_targets: rotation.restart_targets.clone(),
        rotation_request: ca.annotations().get(ROTATE_ANNOTATION).cloned(),
        adopt: ca.spec.adopt.clone(),
        name,
        namespace,
    })
}

/// Finds the Medplum client: by the id in status, else by the ownership tag, else the one to adopt,
/// once adoption checks found nothing against it.
async fn find_client(
    ctx: &Context,
    usable: &UsableConnection,
    ca: &ClientApplication,
    d: &Desired,
) -> Result<Option<ClientApplicationResource>, ClientError> {
    let medplum = &usable.client;
    let recorded = ca.status.as_ref().and_then(|s| s.client_id.as_deref());
    let tag = format!("{}|{}", d.tag.system, d.tag.code);
    let owned = |c: &ClientApplicationResource| c.meta.has_tag(&d.tag);
    if let Some(client) = medplum.find_owned(recorded, owned, "_tag", &tag).await? {
        return Ok(Some(client));
    }
    let Some(adopt) = &d.adopt else { return Ok(None) };
    let what = format!("ClientApplication/{}", adopt.client_id);
    let limits = &usable.limits.adoption;
    if !limits.admits_client(&adopt.client_id) {
        return Err(AdoptionError::NotAllowed { what }.into());
    }
    if adopt.secret == AdoptSecret::Keep && !limits.allow_keep_secret {
        return Err(AdoptionError::KeepSecretNotAllowed.into());
    }
    if let Some(connection) = adoption::credential_of(usable, &ctx.connections.credentials(), &adopt.client_id) {
        return Err(AdoptionError::ConnectionCredential { what, connection }.into());
    }
    // Searched within the project: a super-admin connection could otherwise read any project's clients.
    let project = usable.project_id.as_str();
    let found =
        medplum.search::<ClientApplicationResource>(&[("_id", &adopt.client_id), ("_project", project)]).await?;
    let client = found.into_iter().next().ok_or_else(|| AdoptionError::NotFound { what: what.clone() })?;
    let marks = client.meta.tag.iter().map(|t| (t.system.as_str(), t.code.as_str()));
    if let Some(owner) = adoption::managed_elsewhere(marks, (&d.tag.system, &d.tag.code)) {
        return Err(AdoptionError::ManagedElsewhere { what, owner }.into());
    }
    let membership = find_membership(medplum, Some(&client)).await?;
    adoption::check_access(medplum, &usable.limits, membership.as_ref(), &what).await?;
    Ok(Some(client))
}

/// Why the operator may not write its keys into the existing Secret, if it may not.
fn secret_refusal(secret: &WrittenSecret, d: &Desired, connection_secrets: &[String]) -> Option<String> {
    if !secret.exists || secret.owner_uids.contains(&d.owner.uid) {
        return None;
    }
    if !d.merge {
        return Some("exists and was not made by the operator (set spec.secret.merge to write into it)".into());
    }
    if let Some(type_) = secret.type_.as_deref().filter(|t| *t != "Opaque") {
        return Some(format!("is of type {type_}; the operator writes only into Opaque Secrets"));
    }
    if let Some(other) = secret.labels.get(CLIENT_LABEL).filter(|owner| **owner != d.name) {
        return Some(format!("holds the credentials of ClientApplication {other}"));
    }
    if secret.labels.contains_key(CREDENTIALS_LABEL) || connection_secrets.contains(&d.secret_name) {
        return Some("holds a connection's credentials or CA bundle".into());
    }
    None
}

/// The Secrets the namespace's MedplumConnections read (credentials and CA bundles).
async fn connection_secrets(ctx: &Context, namespace: &str) -> Result<Vec<String>, kube::Error> {
    let connections =
        Api::<MedplumConnection>::namespaced(ctx.client.clone(), namespace).list(&Default::default()).await?;
    Ok(connections
        .items
        .iter()
        .flat_map(|c| {
            let ca = c.spec.ca_bundle.as_ref().and_then(|ca| ca.secret_ref.as_ref()).map(|r| r.name.clone());
            std::iter::once(c.spec.credentials_secret_ref.name.clone()).chain(ca)
        })
        .collect())
}

async fn find_membership(
    medplum: &MedplumClient,
    client: Option<&ClientApplicationResource>,
) -> Result<Option<MembershipResource>, ClientError> {
    let Some(id) = client.and_then(|c| c.id.as_deref()) else { return Ok(None) };
    let user = format!("ClientApplication/{id}");
    Ok(medplum.search::<MembershipResource>(&[("user", &user)]).await?.pop())
}

async fn observe(
    ctx: &Context,
    ca: &ClientApplication,
    d: &Desired,
    usable: &UsableConnection,
) -> Result<Observed, ClientError> {
    let secret = read_written(&ctx.client, &d.namespace, &d.secret_name, &secret_keys(d)).await?;
    let foreign = secret.exists && !secret.owner_uids.contains(&d.owner.uid);
    let used_by_connections =
        if foreign && d.merge { connection_secrets(ctx, &d.namespace).await? } else { Vec::new() };
    if let Some(why) = secret_refusal(&secret, d, &used_by_connections) {
        return Err(ClientError::SecretConflict { name: d.secret_name.clone(), why });
    }
    let mut targets = Vec::new();
    for target in &d.restart_targets {
        let state = workload::observe(&ctx.client, &d.namespace, target, &d.secret_name).await?;
        if state.exists && !state.uses_secret {
            let target = format!("{:?}/{}", target.kind, target.name);
            return Err(ClientError::RestartTargetNotUsingSecret { target, secret: d.secret_name.clone() });
        }
        targets.push(state);
    }
    let client = find_client(ctx, usable, ca, d).await?;
    let membership = find_membership(&usable.client, client.as_ref()).await?;
    let current = secret.values.get(&d.keys.client_secret);
    let status = ca.status.as_ref();
    let same_secret =
        current.is_some_and(|c| status.and_then(|s| s.secret_fingerprint.clone()) == Some(fingerprint(c)));
    let verified = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CREDENTIAL_VERIFIED && c.status == "True"))
        .and_then(|c| proof_of_reason(&c.reason))
        .filter(|_| same_secret);
    Ok(Observed { secret, client, membership, targets, verified })
}

/// How a reconcile ended.
enum Outcome {
    Done,
    Waiting(Step, Duration),
}

async fn converge(r: &mut Reconciler<'_>, o: &mut Observed) -> Result<Outcome, ClientError> {
    let mut updates: Vec<Step> = Vec::new();
    for _ in 0..MAX_STEPS {
        let now = Timestamp::now();
        let step = plan(&r.d, o, now);
        if matches!(step, Step::UpdateClient { .. } | Step::UpdateMembership { .. }) {
            if updates.contains(&step) {
                let fields = match &step {
                    Step::UpdateClient { fields } | Step::UpdateMembership { fields } => fields.join(", "),
                    _ => unreachable!(),
                };
                return Err(ClientError::NotConverging(fields));
            }
            updates.push(step.clone());
        }
        if step == Step::Done {
            return Ok(Outcome::Done);
        }
        if let Some(wait) = r.execute(&step, o, now).await? {
            return Ok(Outcome::Waiting(step, wait));
        }
    }
    Err(ClientError::NotConverging("the reconcile (too many steps)".into()))
}

/// The status after a reconcile.
fn desired_status(
    ca: &ClientApplication,
    d: Option<&Desired>,
    o: Option<&Observed>,
    result: &Result<Outcome, ClientError>,
    now: Timestamp,
) -> ClientApplicationStatus {
    let mut status = ca.status.clone().unwrap_or_default();
    let generation = ca.metadata.generation;
    if let Some(d) = d {
        status.secret_name = Some(d.secret_name.clone());
        status.project_id = Some(d.project_id.clone());
    }
    if let (Some(d), Some(o)) = (d, o) {
        status.client_id = o.client.as_ref().and_then(|c| c.id.clone()).or(status.client_id);
        status.membership_id = o.membership.as_ref().and_then(|m| m.id.clone()).or(status.membership_id);
        let current = o.value(&d.keys.client_secret);
        if o.verified.is_some() {
            status.secret_fingerprint = current.map(fingerprint);
        }
        let issued = o.issued_at();
        status.last_rotation_time = issued.map(Time);
        status.next_rotation_time = match (issued, d.rotation_interval) {
            (Some(i), Some(interval)) => i.checked_add(interval).ok().map(Time),
            _ => None,
        };
        let print = status.secret_fingerprint.clone().unwrap_or_default();
        let verified = match o.verified {
            Some(proof) => ConditionState::new(
                CREDENTIAL_VERIFIED,
                true,
                reason_of_proof(proof),
                match proof {
                    CredentialProof::TokenIssued => {
                        format!("Medplum issued a token for the credentials in Secret {} ({print})", d.secret_name)
                    }
                    CredentialProof::AddressNotAllowed => format!(
                        "Medplum accepted the secret in Secret {} ({print}) and refused a token only because the \
                         client's IP rules block the operator's address; tokens work from the addresses they allow",
                        d.secret_name
                    ),
                },
            ),
            None => ConditionState::new(
                CREDENTIAL_VERIFIED,
                false,
                "NotVerified",
                "the credentials in the Secret were not verified yet",
            ),
        };
        status.conditions = set_condition(&status.conditions, verified, generation, now);
        let retiring = o.client.as_ref().is_some_and(|c| c.retiring_secret.is_some());
        let rotating = match result {
            Ok(Outcome::Waiting(Step::WaitForRollout { target }, _)) => ConditionState::new(
                "Rotating",
                true,
                "WaitingForRollout",
                format!("the previous secret is retired once {target} rolled out and the grace period passed"),
            ),
            Ok(Outcome::Waiting(Step::WaitForGrace { until }, _)) => ConditionState::new(
                "Rotating",
                true,
                "GracePeriod",
                format!("the previous secret keeps working until {until}"),
            ),
            _ if o.pending().is_some() => ConditionState::new(
                "Rotating",
                true,
                "NewSecretStored",
                "a new secret is stored and being handed to Medplum",
            ),
            _ if retiring => ConditionState::new(
                "Rotating",
                true,
                "RetiringPreviousSecret",
                "the previous secret still works until it is retired",
            ),
            _ => ConditionState::new("Rotating", false, "Idle", "no rotation in progress"),
        };
        status.conditions = set_condition(&status.conditions, rotating, generation, now);
    }
    let ready = match result {
        Ok(_) => ConditionState::new(
            READY,
            true,
            "Ready",
            format!(
                "Secret {} holds working credentials of ClientApplication/{}",
                status.secret_name.clone().unwrap_or_default(),
                status.client_id.clone().unwrap_or_default()
            ),
        ),
        Err(e) => ConditionState::new(READY, false, e.reason(), e.to_string()),
    };
    status.conditions = set_condition(&status.conditions, ready, generation, now);
    status.observed_generation = generation;
    status
}

async fn apply(ca: &ClientApplication, ctx: &Context) -> Result<Action, Error> {
    let api: Api<ClientApplication> = Api::namespaced(ctx.client.clone(), &ca.namespace().unwrap_or_default());
    let mut desired_state = None;
    let mut observed = None;
    let mut events = Vec::new();
    let result: Result<Outcome, ClientError> = async {
        let usable = usable_connection(ctx, &ca.namespace().unwrap_or_default(), &ca.spec.connection_ref).await?;
        let d = desired(ctx, ca, &usable).await?;
        let o = observe(ctx, ca, &d, &usable).await?;
        let mut r = Reconciler { ctx, ca, d, usable, events: Vec::new() };
        let mut o = o;
        let outcome = converge(&mut r, &mut o).await;
        events = std::mem::take(&mut r.events);
        desired_state = Some(r.d);
        observed = Some(o);
        outcome
    }
    .await;
    let now = Timestamp::now();
    let status = desired_status(ca, desired_state.as_ref(), observed.as_ref(), &result, now);
    apply_status(&api, &ca.name_any(), ca.status.as_ref(), &status).await.map_err(Error::Status)?;
    let reference = ca.object_ref(&());
    for event in &events {
        ctx.publish(&reference, event).await;
    }
    let before = ca.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.report_ready(KIND, ca, before, &status.conditions).await;
    let (name, namespace) = (ca.name_any(), ca.namespace().unwrap_or_default());
    ctx.metrics.set_next_rotation(&namespace, &name, status.next_rotation_time.as_ref().map(|t| t.0.as_second()));
    let rotating = observed
        .as_ref()
        .is_some_and(|o| o.pending().is_some() || o.client.as_ref().is_some_and(|c| c.retiring_secret.is_some()));
    if result.is_err() && rotating {
        ctx.metrics.record_rotation_failure();
    }
    match result {
        Ok(outcome) => {
            ctx.succeeded(KIND, ca);
            let resync = ctx.settings.resync_interval;
            let next = match (outcome, status.next_rotation_time.as_ref()) {
                (Outcome::Waiting(_, wait), _) => wait.min(resync),
                (Outcome::Done, Some(Time(at))) => {
                    at.duration_since(now).unsigned_abs().max(Duration::from_secs(1)).min(resync)
                }
                (Outcome::Done, None) => resync,
            };
            Ok(Action::requeue(next))
        }
        Err(e) => {
            let rate_limited = matches!(e, ClientError::Medplum(MedplumError::RateLimited { .. }));
            Ok(ctx.retry(KIND, ca, e.reason(), &e.to_string(), e.is_transient(), rate_limited))
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Deletion

async fn cleanup(ca: &ClientApplication, ctx: &Context) -> Result<Action, Error> {
    let reference = ca.object_ref(&());
    let namespace = ca.namespace().unwrap_or_default();
    let usable = match cleanup_via(ctx, ca).await? {
        CleanupVia::Connection(usable) => usable,
        CleanupVia::Released => return Ok(Action::await_change()),
    };
    let tag = super::ownership_tag(&ctx.settings.cluster_id, KIND, &namespace, &ca.name_any());
    let medplum = &usable.client;
    let result: Result<(String, &str), ClientError> = async {
        let tag_query = format!("{}|{}", tag.system, tag.code);
        let mut clients = medplum.search::<ClientApplicationResource>(&[("_tag", &tag_query)]).await?;
        let Some(client) = clients.pop() else {
            return Ok(("nothing left in Medplum".into(), deletion_reason(ca.spec.deletion_policy)));
        };
        let id = client.id.clone().unwrap_or_default();
        let membership = find_membership(medplum, Some(&client)).await?;
        let marker = adoption::adopted_marker(&tag);
        let untagged = |mut c: ClientApplicationResource| {
            c.meta.tag.retain(|t| *t != tag && *t != marker && t.system != "http://hl7.org/fhir/v3/ObservationValue");
            c
        };
        let version = client.meta.version_id.clone().unwrap_or_default();
        // An adopted client was not made by the namespace: unless the connection allows it, deleting the
        // resource only releases it (left as it is, no longer managed), whatever its deletionPolicy.
        let adopted = client.meta.has_tag(&marker);
        let ending = match ca.spec.deletion_policy {
            DeletionPolicy::Orphan => Ending::Untag { released: false },
            _ if adopted && !usable.limits.adoption.allow_delete => Ending::Untag { released: true },
            DeletionPolicy::Delete => Ending::Delete,
            DeletionPolicy::Disable => Ending::Disable,
        };
        Ok(match ending {
            Ending::Delete => {
                // The membership first: deleting it ends the client's live tokens at once.
                if let Some(m) = &membership {
                    usable.delete_membership(m.id.as_deref().unwrap_or_default()).await?;
                }
                medplum.delete::<ClientApplicationResource>(&id).await?;
                (format!("deleted ClientApplication/{id} and its membership from Medplum"), "Deleted")
            }
            Ending::Disable => {
                let mut off = untagged(client);
                off.status = Some("off".into());
                medplum.update(&id, &off, &version).await?;
                (format!("set ClientApplication/{id} to status off: no new tokens"), "Disabled")
            }
            Ending::Untag { released } => {
                medplum.update(&id, &untagged(client), &version).await?;
                if let Some(mut m) = membership {
                    let identifier = identifier_of(&tag);
                    m.identifier.retain(|i| *i != identifier);
                    let (mid, mversion) =
                        (m.id.clone().unwrap_or_default(), m.meta.version_id.clone().unwrap_or_default());
                    medplum.update(&mid, &m, &mversion).await?;
                }
                if released {
                    let note = format!(
                        "left adopted ClientApplication/{id} and its membership in Medplum as they are, no longer \
                         managed: the connection does not allow deleting adopted objects (spec.limits.adoption.allowDelete)"
                    );
                    (note, "Released")
                } else {
                    (format!("left ClientApplication/{id} and its membership in Medplum, no longer managed"), "Orphaned")
                }
            }
        })
    }
    .await;
    let (note, reason) = result.map_err(|e| Error::Cleanup(e.to_string()))?;
    release_secret(ctx, ca).await.map_err(Error::Kube)?;
    ctx.metrics.set_object_ready(KIND, &namespace, &ca.name_any(), None);
    ctx.metrics.set_next_rotation(&namespace, &ca.name_any(), None);
    ctx.publish(&reference, &event(EventType::Normal, reason, "Delete", note)).await;
    Ok(Action::await_change())
}

/// What a deletion does to the Medplum client.
enum Ending {
    Delete,
    Disable,
    /// Left as it is, without the operator's tags: orphaned as asked, or released because it was adopted.
    Untag {
        released: bool,
    },
}

fn deletion_reason(policy: DeletionPolicy) -> &'static str {
    match policy {
        DeletionPolicy::Delete => "Deleted",
        DeletionPolicy::Orphan => "Orphaned",
        DeletionPolicy::Disable => "Disabled",
    }
}

/// The Secret after deletion: with `Orphan`, the credentials stay where they are (an owned Secret is
/// released from its owner so garbage collection leaves it); otherwise an owned Secret goes with the
/// resource (garbage collection) and the operator's keys are removed from a merged one.
async fn release_secret(ctx: &Context, ca: &ClientApplication) -> Result<(), kube::Error> {
    let namespace = ca.namespace().unwrap_or_default();
    let name = ca.spec.secret.name.clone().unwrap_or_else(|| ca.name_any());
    let keys = &ca.spec.secret.keys;
    let all =
        [&keys.base_url, &keys.client_id, &keys.client_secret, &keys.token_url, &keys.project_id].map(String::as_str);
    let written = read_written(&ctx.client, &namespace, &name, &all).await?;
    let owned = written.owner_uids.contains(&ca.uid().unwrap_or_default());
    let content = match (ca.spec.deletion_policy, owned) {
        (DeletionPolicy::Orphan, true) => {
            SecretContent { data: written.values, labels: BTreeMap::new(), annotations: BTreeMap::new(), owner: None }
        }
        (DeletionPolicy::Orphan, false) | (_, true) => return Ok(()),
        (_, false) if written.exists => {
            SecretContent { data: BTreeMap::new(), labels: BTreeMap::new(), annotations: BTreeMap::new(), owner: None }
        }
        (_, false) => return Ok(()),
    };
    apply_written(&ctx.client, &namespace, &name, &content).await
}

// ---------------------------------------------------------------------------------------------------
// Watches

/// The controller for one scope (`namespace` None: all), and a future that resolves once its cache is filled.
pub fn controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
) -> (ReconcileStream, impl Future<Output = ()> + Send + 'static) {
    let client = ctx.client.clone();
    let controller = super::new_controller::<ClientApplication>(&ctx, namespace, ctx.settings.client_concurrency);
    let ready = super::cache_synced(controller.store());
    let secrets: Api<PartialObjectMeta<Secret>> = super::scoped(&client, namespace);
    let by_label = |secret: PartialObjectMeta<Secret>| {
        let name = secret.labels().get(CLIENT_LABEL).cloned();
        name.map(|n| ObjectRef::new(&n).within(&secret.namespace().unwrap_or_default()))
    };
    let controller = controller.watches(secrets, watcher::Config::default().labels(CLIENT_LABEL), by_label);
    let controller = super::watch_connections(super::watch_policies(controller, &ctx, namespace), &ctx, namespace);
    let reconcile = |obj, ctx| super::reconcile_with_cleanup(obj, ctx, apply, cleanup);
    (super::drive(controller, KIND, ctx, reconcile), ready)
}

#[cfg(test)]
mod tests;
