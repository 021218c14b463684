//! The verified connections, with their Medplum clients: a client (and its token cache) outlives a
//! reconcile, and is made again only when what it is built from changes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::{ConnectionKey, ConnectionTarget, UsableConnection};
use crate::controller::view::MedplumView;
use crate::medplum::{ClientCredentials, MedplumClient, MedplumError};

/// A fingerprint of everything a Medplum client is built from; a new client (and token cache) is made
/// only when it changes. The secret enters only as part of a SHA-256 input, kept in memory.
pub(super) fn fingerprint(target: &ConnectionTarget, credentials: &ClientCredentials, ca: Option<&[u8]>) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [
        target.base_url.as_bytes(),
        credentials.client_id.as_bytes(),
        credentials.client_secret.expose_secret().as_bytes(),
        ca.unwrap_or_default(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

/// A Secret's namespace and name.
type SecretName = (String, String);

struct RegistryEntry {
    fingerprint: [u8; 32],
    client: Arc<MedplumClient>,
    /// The last successful verification; kept while later ones fail, for cleanups.
    last_usable: Option<UsableConnection>,
    /// Whether the last verification succeeded, and why not.
    ready: Result<(), Option<String>>,
    /// The view of the project, and the task keeping it current (stopped with the entry).
    view: Option<(String, Arc<MedplumView>, AbortOnDrop)>,
}

/// A background task that ends when this is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Medplum clients of the connections, by connection, and their state for dependents.
#[derive(Default)]
pub struct ConnectionRegistry {
    entries: RwLock<HashMap<ConnectionKey, RegistryEntry>>,
    /// One lock per credentials Secret (namespace, name): its rotation steps run one at a time.
    rotation_locks: std::sync::Mutex<HashMap<SecretName, Arc<tokio::sync::Mutex<()>>>>,
}

impl ConnectionRegistry {
    /// The client for `key`, reused while its inputs are unchanged.
    pub(super) fn client(
        &self,
        key: &ConnectionKey,
        fingerprint: [u8; 32],
        make: impl FnOnce() -> Result<MedplumClient, MedplumError>,
    ) -> Result<Arc<MedplumClient>, MedplumError> {
        if let Some(entry) =
            self.entries.read().expect("registry lock").get(key).filter(|e| e.fingerprint == fingerprint)
        {
            return Ok(entry.client.clone());
        }
        let client = Arc::new(make()?);
        let mut entries = self.entries.write().expect("registry lock");
        let last_usable = entries.remove(key).and_then(|e| e.last_usable);
        let entry = RegistryEntry { fingerprint, client: client.clone(), last_usable, ready: Err(None), view: None };
        entries.insert(key.clone(), entry);
        Ok(client)
    }

    /// The view of `project_id` through the connection's current client, started by `start` (which
    /// returns the view and the task keeping it current) the first time, or when the project changed.
    pub(super) fn view(
        &self,
        key: &ConnectionKey,
        project_id: &str,
        start: impl FnOnce() -> (Arc<MedplumView>, tokio::task::AbortHandle),
    ) -> Option<Arc<MedplumView>> {
        let mut entries = self.entries.write().expect("registry lock");
        let entry = entries.get_mut(key)?;
        if let Some((project, view, _)) = &entry.view
            && project == project_id
        {
            return Some(view.clone());
        }
        let (view, task) = start();
        entry.view = Some((project_id.to_string(), view.clone(), AbortOnDrop(task)));
        Some(view)
    }

    pub(super) fn set_usable(&self, key: &ConnectionKey, usable: Result<UsableConnection, String>) {
        if let Some(entry) = self.entries.write().expect("registry lock").get_mut(key) {
            match usable {
                Ok(usable) => {
                    entry.ready = Ok(());
                    entry.last_usable = Some(usable);
                }
                Err(failure) => entry.ready = Err(Some(failure)),
            }
        }
    }

    /// The lock for rotating the credential in the Secret `namespace/name`.
    pub(super) fn rotation_lock(&self, namespace: &str, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.rotation_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry((namespace.to_string(), name.to_string())).or_default().clone()
    }

    /// The ClientApplication ids of every connection's credential, with the connection they belong to.
    pub fn credentials(&self) -> Vec<(String, String)> {
        let entries = self.entries.read().expect("registry lock");
        entries
            .iter()
            .map(|(key, entry)| {
                let namespace = key.namespace.as_deref().map(|ns| format!("{ns}/")).unwrap_or_default();
                (entry.client.client_id().to_string(), format!("{} {namespace}{}", key.kind_name(), key.name))
            })
            .collect()
    }

    /// Whether the registry holds the connection (`None`: not seen yet, or deleted), and if so, the
    /// connection when its last verification succeeded, else why it failed (if it was verified).
    pub fn state(&self, key: &ConnectionKey) -> Option<Result<UsableConnection, Option<String>>> {
        let entries = self.entries.read().expect("registry lock");
        entries.get(key).map(|e| match (&e.ready, &e.last_usable) {
            (Ok(()), Some(usable)) => Ok(usable.clone()),
            (Ok(()), None) => Err(None),
            (Err(cause), _) => Err(cause.clone()),
        })
    }

    /// Forgets a connection whose deletion completed (stopping its view's task).
    pub fn remove(&self, key: &ConnectionKey) {
        self.entries.write().expect("registry lock").remove(key);
    }

    /// The connection as last verified, even if it is failing now or was deleted: cleanups use it so
    /// that a namespace being deleted (credentials Secret first) can still be cleaned up in Medplum.
    pub fn last_usable(&self, key: &ConnectionKey) -> Option<UsableConnection> {
        self.entries.read().expect("registry lock").get(key).and_then(|e| e.last_usable.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_every_input() {
        let target = ConnectionTarget {
            base_url: "https://m".into(),
            project_id: None,
            super_admin_credential: false,
            credentials_namespace: "ns".into(),
            credentials_name: "s".into(),
            client_id_key: "id".into(),
            client_secret_key: "secret".into(),
            ca: None,
        };
        let creds =
            |secret: &str| ClientCredentials { client_id: "c".into(), client_secret: secret.to_string().into() };
        let base = fingerprint(&target, &creds("a"), None);
        assert_eq!(base, fingerprint(&target, &creds("a"), None));
        assert_ne!(base, fingerprint(&target, &creds("b"), None));
        assert_ne!(base, fingerprint(&target, &creds("a"), Some(b"pem")));
        let other = ConnectionTarget { base_url: "https://n".into(), ..target.clone() };
        assert_ne!(base, fingerprint(&other, &creds("a"), None));
    }
}
