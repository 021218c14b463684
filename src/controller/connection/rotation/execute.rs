//! The I/O of a credential rotation: the Secret, the other connections using it, and Medplum.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use secrecy::{ExposeSecret, SecretString};

use super::plan::{Held, Observed, Step};
use super::{RotationError, STORED_AT_ANNOTATION, STORED_BY_ANNOTATION};
use crate::controller::connection::{ConnectionObject, ConnectionTarget, Verified, kind_name};
use crate::controller::context::crash_point;
use crate::controller::status::FIELD_MANAGER;
use crate::crd::{ClusterMedplumConnection, MedplumConnection};
use crate::medplum::{ClientCredentials, MedplumError, RotateSecret};

/// What the credentials Secret holds, as far as rotation is concerned.
pub struct StoredCredential {
    pub secret: SecretString,
    pub stored_at: Option<Timestamp>,
}

/// Reads the Secret's secret and its stored-at annotation.
pub async fn read_stored(kube: &kube::Client, target: &ConnectionTarget) -> Result<StoredCredential, kube::Error> {
    let secret =
        Api::<Secret>::namespaced(kube.clone(), &target.credentials_namespace).get(&target.credentials_name).await?;
    let stored_at = secret.annotations().get(STORED_AT_ANNOTATION).and_then(|t| t.parse().ok());
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&target.client_secret_key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default();
    Ok(StoredCredential { secret: SecretString::from(value), stored_at })
}

/// What the plan sees, from the verification's `/auth/me` and the Secret.
pub fn observe(
    verified: &Verified,
    stored: &StoredCredential,
    request: Option<String>,
    handled: Option<String>,
) -> Result<Observed, RotationError> {
    let current = verified.own_secrets.secret.as_ref().ok_or(RotationError::SecretsNotShown)?;
    let retiring = verified.own_secrets.retiring_secret.as_ref();
    let held_value = stored.secret.expose_secret();
    let held = if current.expose_secret() == held_value {
        Held::Current
    } else if retiring.is_some_and(|r| r.expose_secret() == held_value) {
        Held::Retiring
    } else {
        Held::Unknown
    };
    Ok(Observed { held, retiring: retiring.is_some(), stored_at: stored.stored_at, request, handled })
}

/// Every other connection whose credentials are this Secret and that did not opt in.
async fn not_opted_in<K: ConnectionObject>(kube: &kube::Client, obj: &K) -> Result<Vec<String>, RotationError> {
    let target = obj.target();
    let uses = |t: ConnectionTarget| {
        t.credentials_namespace == target.credentials_namespace && t.credentials_name == target.credentials_name
    };
    let namespaced = Api::<MedplumConnection>::namespaced(kube.clone(), &target.credentials_namespace);
    let listed = namespaced.list(&ListParams::default()).await.map_err(|e| match e {
        kube::Error::Api(a) if a.code == 403 => RotationError::SharingUnknown {
            namespace: target.credentials_namespace.clone(),
            source: kube::Error::Api(a),
        },
        e => e.into(),
    })?;
    let mut refusing: Vec<String> = listed
        .items
        .into_iter()
        .filter(|c| c.spec.credential_rotation.is_none() && uses(c.target()))
        .map(|c| format!("MedplumConnection {}/{}", c.namespace().unwrap_or_default(), c.name_any()))
        .collect();
    let cluster = Api::<ClusterMedplumConnection>::all(kube.clone()).list(&ListParams::default()).await?;
    refusing.extend(
        cluster
            .items
            .into_iter()
            .filter(|c| c.spec.credential_rotation.is_none() && uses(c.target()))
            .map(|c| format!("ClusterMedplumConnection {}", c.name_any())),
    );
    Ok(refusing)
}

/// The operator's part of the credentials Secret: the two credential keys and two annotations. Applied
/// with force, since a person or tool made the Secret and holds its keys; `dry_run` checks that the
/// write would be allowed (RBAC, admission) without making it.
async fn apply_credential<K: ConnectionObject>(
    kube: &kube::Client,
    obj: &K,
    credentials: &ClientCredentials,
    stored_at: Timestamp,
    dry_run: bool,
) -> Result<(), RotationError> {
    use base64::Engine;
    let target = obj.target();
    let encode = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    let data = BTreeMap::from([
        (target.client_id_key.clone(), encode(&credentials.client_id)),
        (target.client_secret_key.clone(), encode(credentials.client_secret.expose_secret())),
    ]);
    let by = match obj.namespace() {
        Some(ns) => format!("{}/{ns}/{}", kind_name(K::KIND), obj.name_any()),
        None => format!("{}/{}", kind_name(K::KIND), obj.name_any()),
    };
    // Whole seconds: the annotation is compared after a round trip through text.
    let stored_at = Timestamp::from_second(stored_at.as_second()).expect("a valid time");
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": target.credentials_name, "annotations": {
            STORED_AT_ANNOTATION: stored_at.to_string(), STORED_BY_ANNOTATION: by}},
        "data": data,
    });
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    params.dry_run = dry_run;
    let api = Api::<Secret>::namespaced(kube.clone(), &target.credentials_namespace);
    match api.patch(&target.credentials_name, &params, &Patch::Apply(&body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if matches!(e.code, 403 | 422) => Err(RotationError::NotWritable {
            secret: format!("{}/{}", target.credentials_namespace, target.credentials_name),
            source: kube::Error::Api(e),
        }),
        Err(e) => Err(e.into()),
    }
}

/// What a step did, for the status and the Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new secret is in the Secret (after a rotation, or recovering one).
    Stored {
        at: Timestamp,
    },
    Retired,
    /// Medplum no longer held the secret the step was planned from (another connection on the same
    /// Secret, or another process, took the step first): nothing changed, look again.
    Overtaken,
}

/// `$rotate-secret`; `None` when Medplum answers 400, which it does for a secret it no longer holds.
async fn rotate_secret(verified: &Verified, which: RotateSecret<'_>) -> Result<Option<SecretString>, RotationError> {
    match verified.client.rotate_secret(&verified.client_id, which).await {
        Ok(client) => Ok(Some(client.secret.ok_or(RotationError::SecretsNotShown)?)),
        Err(MedplumError::Rejected { status: 400, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Takes `step` (a `Store`, `Rotate` or `Retire`); the others need no I/O.
pub async fn execute<K: ConnectionObject>(
    kube: &kube::Client,
    obj: &K,
    verified: &Verified,
    stored: &StoredCredential,
    step: &Step,
    now: Timestamp,
) -> Result<Option<Outcome>, RotationError> {
    let id = verified.client_id.as_str();
    let new_secret = match step {
        Step::Store => verified.own_secrets.secret.clone().ok_or(RotationError::SecretsNotShown)?,
        Step::Rotate { .. } => {
            // Before Medplum issues a secret, proof that it can be stored, and may be.
            let current = ClientCredentials { client_id: id.to_string(), client_secret: stored.secret.clone() };
            apply_credential(kube, obj, &current, stored.stored_at.unwrap_or(now), true).await?;
            let others = not_opted_in(kube, obj).await?;
            if !others.is_empty() {
                return Err(RotationError::Shared(others.join(", ")));
            }
            let Some(rotated) = rotate_secret(verified, RotateSecret::Current(&stored.secret)).await? else {
                return Ok(Some(Outcome::Overtaken));
            };
            crash_point("connection-rotated");
            rotated
        }
        Step::Retire => {
            let retiring = verified.own_secrets.retiring_secret.as_ref().ok_or(RotationError::SecretsNotShown)?;
            let Some(_) = rotate_secret(verified, RotateSecret::Retiring(retiring)).await? else {
                return Ok(Some(Outcome::Overtaken));
            };
            crash_point("connection-retired");
            return Ok(Some(Outcome::Retired));
        }
        Step::WaitForGrace { .. } | Step::Idle { .. } => return Ok(None),
    };
    let credentials = ClientCredentials { client_id: id.to_string(), client_secret: new_secret };
    verified.client.check_credentials(&credentials).await.map_err(RotationError::NewSecretRefused)?;
    apply_credential(kube, obj, &credentials, now, false).await?;
    crash_point("connection-stored");
    Ok(Some(Outcome::Stored { at: Timestamp::from_second(now.as_second()).expect("a valid time") }))
}
