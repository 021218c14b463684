//! Reading values the operator needs from Secrets and ConfigMaps. Secret values go straight into
//! redacting types; errors name the object and key, never a value.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use secrecy::SecretString;

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

impl SourceError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { kind: "Secret", .. } => "SecretNotFound",
            Self::NotFound { .. } => "ConfigMapNotFound",
            Self::KeyMissing { kind: "Secret", .. } | Self::NotText { .. } => "SecretKeyMissing",
            Self::KeyMissing { .. } => "ConfigMapKeyMissing",
            Self::Api { .. } => "KubernetesApiError",
        }
    }

    /// Kubernetes API failures other than "forbidden" may pass on their own.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api { source, .. } => match &**source {
                kube::Error::Api(status) => status.code >= 500 || status.code == 429,
                _ => true,
            },
            _ => false,
        }
    }
}

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
            let values = read_secret_strings(client, namespace, name, &[key]).await?;
            Ok(secrecy::ExposeSecret::expose_secret(&values[0]).as_bytes().to_vec())
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
