//! Reading values the operator needs from Secrets and ConfigMaps. Secret values go straight into
//! redacting types; errors name the object and key, never a value.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::status::FIELD_MANAGER;
use crate::failure::Failure;

/// Why a referenced value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{kind} {namespace}/{name} not found")]
    NotFound { kind: &'static str, namespace: String, name: String },
    #[error("{kind} {namespace}/{name} has no key {key:?}")]
    KeyMissing { kind: &'static str, namespace: String, name: String, key: String },
    #[error("{kind} {namespace}/{name} key {key:?} is not UTF-8 text")]
    NotText { kind: &'static str, namespace: String, name: String, key: String },
    #[error("cannot read {kind} {namespace}/{name}: {source}")]
    Api { kind: &'static str, namespace: String, name: String, source: Box<kube::Error> },
}

impl Failure for SourceError {
    fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { kind: "Secret", .. } => "SecretNotFound",
            Self::NotFound { .. } => "ConfigMapNotFound",
            Self::KeyMissing { kind: "Secret", .. } | Self::NotText { .. } => "SecretKeyMissing",
            Self::KeyMissing { .. } => "ConfigMapKeyMissing",
            Self::Api { .. } => "KubernetesApiError",
        }
    }

    /// Kubernetes API failures other than "forbidden" may pass on their own.
    fn is_transient(&self) -> bool {
        match self {
            Self::Api { source, .. } => match &**source {
                kube::Error::Api(status) => status.code >= 500 || status.code == 429,
                _ => true,
            },
            _ => false,
        }
    }
}

/// The label of Secrets whose values the operator pushes to Medplum (a MedplumProject's sources, a
/// DomainConfiguration's client secret): they are watched, so a change reaches Medplum at once; other
/// Secrets are read again at the next resync.
pub const SOURCE_LABEL: &str = "medplum.com/source-secret";

/// Reads text values of a Secret, trimmed of surrounding whitespace (a stray newline from
/// `echo` is a common mistake, and Medplum ids and secrets never contain whitespace).
pub async fn read_secret_strings(
    client: &Client,
    namespace: &str,
    name: &str,
    keys: &[&str],
) -> Result<Vec<SecretString>, SourceError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get_opt(name).await.map_err(|source| SourceError::Api {
        kind: "Secret",
        namespace: namespace.into(),
        name: name.into(),
        source: Box::new(source),
    })?;
    let secret = secret.ok_or_else(|| SourceError::NotFound {
        kind: "Secret",
        namespace: namespace.into(),
        name: name.into(),
    })?;
    let data = secret.data.unwrap_or_default();
    keys.iter()
        .map(|key| {
            let missing = || SourceError::KeyMissing {
                kind: "Secret",
                namespace: namespace.into(),
                name: name.into(),
                key: (*key).into(),
            };
            let bytes = data.get(*key).ok_or_else(missing)?;
            let text = std::str::from_utf8(&bytes.0).map_err(|_| SourceError::NotText {
                kind: "Secret",
                namespace: namespace.into(),
                name: name.into(),
                key: (*key).into(),
            })?;
            let trimmed = text.trim();
            if trimmed.is_empty() { Err(missing()) } else { Ok(SecretString::from(trimmed.to_string())) }
        })
        .collect()
}

/// One text value of a Secret, as [`read_secret_strings`] reads it.
pub async fn read_secret_string(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<SecretString, SourceError> {
    let mut values = read_secret_strings(client, namespace, name, &[key]).await?;
    Ok(values.pop().expect("one value for the one key asked for"))
}

/// Where a PEM CA bundle lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CaSource {
    Secret { namespace: String, name: String, key: String },
    ConfigMap { namespace: String, name: String, key: String },
}

/// Reads a PEM bundle from a Secret or ConfigMap key.
pub async fn read_ca_bundle(client: &Client, source: &CaSource) -> Result<Vec<u8>, SourceError> {
    match source {
        CaSource::Secret { namespace, name, key } => {
            let value = read_secret_string(client, namespace, name, key).await?;
            Ok(value.expose_secret().as_bytes().to_vec())
        }
        CaSource::ConfigMap { namespace, name, key } => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let map = api.get_opt(name).await.map_err(|source| SourceError::Api {
                kind: "ConfigMap",
                namespace: namespace.clone(),
                name: name.clone(),
                source: Box::new(source),
            })?;
            let map = map.ok_or_else(|| SourceError::NotFound {
                kind: "ConfigMap",
                namespace: namespace.clone(),
                name: name.clone(),
            })?;
            map.data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|text| text.as_bytes().to_vec())
                .or_else(|| map.binary_data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone()))
                .ok_or_else(|| SourceError::KeyMissing {
                    kind: "ConfigMap",
                    namespace: namespace.clone(),
                    name: name.clone(),
                    key: key.clone(),
                })
        }
    }
}

/// Label on every Secret the operator writes credentials to; its value names the ClientApplication.
/// Only Secrets with this label are watched (metadata only).
pub const CLIENT_LABEL: &str = "medplum.com/client-application";

/// The fields of a Secret that one field manager holds through server-side apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldFields {
    pub data: BTreeSet<String>,
    pub labels: BTreeSet<String>,
    pub annotations: BTreeSet<String>,
}

impl HeldFields {
    /// What `manager` holds by its Apply operations, read from `managedFields`.
    pub fn of(entries: &[ManagedFieldsEntry], manager: &str) -> Self {
        let mut held = Self::default();
        let ours =
            entries.iter().filter(|e| e.manager.as_deref() == Some(manager) && e.operation.as_deref() == Some("Apply"));
        for fields in ours.filter_map(|e| e.fields_v1.as_ref()) {
            let names = |path: &[&str]| -> Vec<String> {
                let node = path.iter().try_fold(&fields.0, |node, step| node.get(step));
                let Some(map) = node.and_then(|n| n.as_object()) else { return Vec::new() };
                map.keys().filter_map(|k| k.strip_prefix("f:")).map(str::to_string).collect()
            };
            held.data.extend(names(&["f:data"]));
            held.labels.extend(names(&["f:metadata", "f:labels"]));
            held.annotations.extend(names(&["f:metadata", "f:annotations"]));
        }
        held
    }
}

/// `sha256:` and the first 16 hex digits of the SHA-256 of a value: tells values apart, cannot reveal one.
pub fn fingerprint(value: &SecretString) -> String {
    let digest = Sha256::digest(value.expose_secret().as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A Secret the operator writes credentials to, as read: only the operator's keys are kept.
#[derive(Default)]
pub struct WrittenSecret {
    pub exists: bool,
    /// Its `type` (`Opaque` for the ones the operator makes).
    pub type_: Option<String>,
    pub owner_uids: Vec<String>,
    /// Every key of its data.
    pub present: BTreeSet<String>,
    /// The values of the operator's keys.
    pub values: BTreeMap<String, SecretString>,
    /// What the operator's field manager holds in it.
    pub held: HeldFields,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub resource_version: Option<String>,
}

/// What the operator's part of a Secret should be. Applied with server-side apply, so fields the
/// operator no longer sets are removed and fields of other managers are left alone.
pub struct SecretContent {
    pub data: BTreeMap<String, SecretString>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub owner: Option<OwnerReference>,
}

impl SecretContent {
    /// Whether `written` already holds this content (so no write is needed).
    pub fn is_in(&self, written: &WrittenSecret) -> bool {
        let same_data = self.data.len() == written.values.len()
            && self
                .data
                .iter()
                .all(|(k, v)| written.values.get(k).is_some_and(|w| w.expose_secret() == v.expose_secret()));
        let has = |wanted: &BTreeMap<String, String>, actual: &BTreeMap<String, String>| {
            wanted.iter().all(|(k, v)| actual.get(k) == Some(v))
        };
        let owner_ok = self.owner.as_ref().is_none_or(|o| written.owner_uids.contains(&o.uid));
        written.exists
            && same_data
            && has(&self.labels, &written.labels)
            && has(&self.annotations, &written.annotations)
            && owner_ok
    }
}

/// Reads a Secret, keeping the values of `keys` only.
pub async fn read_written(
    client: &Client,
    namespace: &str,
    name: &str,
    keys: &[&str],
) -> Result<WrittenSecret, kube::Error> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace).get_opt(name).await?;
    Ok(secret.map(|s| written(s, keys)).unwrap_or_default())
}

/// A Secret as the operator sees it: the values of `keys` only.
fn written(secret: Secret, keys: &[&str]) -> WrittenSecret {
    let data = secret.data.unwrap_or_default();
    let values = keys
        .iter()
        .filter_map(|key| {
            let text = String::from_utf8(data.get(*key)?.0.clone()).ok()?;
            Some(((*key).to_string(), SecretString::from(text)))
        })
        .collect();
    WrittenSecret {
        exists: true,
        resource_version: secret.metadata.resource_version,
        type_: secret.type_,
        owner_uids: secret.metadata.owner_references.unwrap_or_default().into_iter().map(|o| o.uid).collect(),
        present: data.keys().cloned().collect(),
        held: HeldFields::of(secret.metadata.managed_fields.as_deref().unwrap_or_default(), FIELD_MANAGER),
        values,
        labels: secret.metadata.labels.unwrap_or_default(),
        annotations: secret.metadata.annotations.unwrap_or_default(),
    }
}

/// Writes the operator's part of a Secret; returns the Secret as written (the values of `keys`). Only
/// the operator's own Secrets (`content.owner`) are written with force: into another's, the API server
/// refuses to change a field that another manager holds (see [`super::foreign_secret`]).
pub async fn apply_written(
    client: &Client,
    namespace: &str,
    name: &str,
    content: &SecretContent,
    keys: &[&str],
) -> Result<WrittenSecret, kube::Error> {
    use base64::Engine;
    let data: serde_json::Map<String, serde_json::Value> = content
        .data
        .iter()
        .map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.encode(v.expose_secret()).into()))
        .collect();
    let mut metadata = serde_json::json!({"name": name, "labels": content.labels, "annotations": content.annotations});
    if let Some(owner) = &content.owner {
        metadata["ownerReferences"] = serde_json::json!([owner]);
    }
    let body =
        serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "data": data});
    let params = PatchParams::apply(FIELD_MANAGER);
    let params = if content.owner.is_some() { params.force() } else { params };
    let applied =
        Api::<Secret>::namespaced(client.clone(), namespace).patch(name, &params, &Patch::Apply(&body)).await?;
    Ok(written(applied, keys))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
    use serde_json::json;

    use super::*;

    #[test]
    fn held_fields_are_those_of_the_managers_apply_operations() {
        let entry = |manager: &str, operation: &str, fields: serde_json::Value| ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        };
        let entries = [
            entry(
                "medplum-operator",
                "Apply",
                json!({"f:data": {"f:ID": {}, "f:SECRET": {}}, "f:metadata": {"f:labels": {"f:team": {}}, "f:annotations": {"f:note": {}}}}),
            ),
            entry("kubectl-create", "Update", json!({"f:data": {"f:password": {}}})),
            entry("medplum-operator", "Update", json!({"f:data": {"f:other": {}}})),
        ];
        let held = HeldFields::of(&entries, "medplum-operator");
        assert_eq!(held.data, BTreeSet::from(["ID".to_string(), "SECRET".to_string()]));
        assert_eq!(held.labels, BTreeSet::from(["team".to_string()]));
        assert_eq!(held.annotations, BTreeSet::from(["note".to_string()]));
    }
}
