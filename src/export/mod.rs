//! `medplum-operator export`: an existing Medplum project as the custom resources that declare it,
//! and `medplum-operator diff`: what the operator would change in Medplum for resources (applied, or
//! about to be).
//!
//! Both read Medplum through a connection of the cluster (its credential Secret, CA bundle and
//! limits), never write to Medplum or Kubernetes, and never print a secret value.

pub mod convert;
pub mod diff;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::api::Api;
use serde_json::Value;

use crate::config::{DiffArgs, ExportArgs, SecretOnAdoption};
use crate::controller::connection::{ConnectionError, ConnectionObject, Verified, identify, read_credentials};
use crate::crd::{
    AdoptSecret, ClusterMedplumConnection, ConnectionKind, ConnectionLimits, ConnectionRef, MedplumConnection,
};
use crate::medplum::{MedplumClient, MedplumError, Pacing};
use crate::metrics::Metrics;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{kind} {name}: {source}")]
    Connection { kind: &'static str, name: String, source: Box<ConnectionError> },
    #[error("Medplum: {0}")]
    Medplum(#[from] MedplumError),
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error("cannot write {path}: {source}")]
    Output { path: String, source: std::io::Error },
}

/// A Kubernetes client for the kubeconfig context (or the environment's default).
pub async fn kube_client(context: Option<&str>) -> Result<kube::Client, CommandError> {
    let config = match context {
        Some(context) => {
            let options = kube::config::KubeConfigOptions { context: Some(context.into()), ..Default::default() };
            kube::Config::from_kubeconfig(&options).await.map_err(|e| CommandError::Kubeconfig(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| CommandError::Kubeconfig(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// A connection opened from the cluster: its verified Medplum client and its limits.
pub struct Opened {
    pub verified: Verified,
    pub limits: ConnectionLimits,
}

/// Opens the connection `reference` of `namespace` as the operator would (same checks of the credential).
pub async fn open(kube: &kube::Client, namespace: &str, reference: &ConnectionRef) -> Result<Opened, CommandError> {
    async fn of<K: ConnectionObject>(kube: &kube::Client, namespace: &str, name: &str) -> Result<Opened, CommandError> {
        let kind = match K::KIND {
            ConnectionKind::MedplumConnection => "MedplumConnection",
            ConnectionKind::ClusterMedplumConnection => "ClusterMedplumConnection",
        };
        let failed = |source| CommandError::Connection { kind, name: name.to_string(), source: Box::new(source) };
        let connection = K::api(kube.clone(), Some(namespace)).get(name).await?;
        let target = connection.target();
        let (credentials, ca) = read_credentials(kube, &target).await.map_err(failed)?;
        let timeout = std::time::Duration::from_secs(30);
        let client = MedplumClient::new(
            &target.base_url,
            credentials,
            ca.as_deref(),
            timeout,
            &Pacing::default(),
            Arc::new(Metrics::default()),
        )
        .map_err(|e| failed(e.into()))?;
        let verified = identify(Arc::new(client), &target).await.map_err(failed)?;
        Ok(Opened { verified, limits: connection.limits().clone() })
    }
    match reference.kind {
        ConnectionKind::MedplumConnection => of::<MedplumConnection>(kube, namespace, &reference.name).await,
        ConnectionKind::ClusterMedplumConnection => {
            of::<ClusterMedplumConnection>(kube, namespace, &reference.name).await
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// export

/// Reads what the connection's project holds.
async fn snapshot(medplum: &MedplumClient, project_id: &str) -> Result<convert::Snapshot, MedplumError> {
    let project = medplum.read_reference::<Value>(&format!("Project/{project_id}")).await?.unwrap_or_default();
    let in_project = [("_project", project_id)];
    let policies = medplum.search_types(&["AccessPolicy"], &in_project).await?;
    let clients = medplum.search_types(&["ClientApplication"], &in_project).await?;
    let project_ref = format!("Project/{project_id}");
    let memberships = medplum.search_types(&["ProjectMembership"], &[("project", project_ref.as_str())]).await?;
    let mut references = std::collections::HashMap::new();
    for m in &memberships {
        let user = m.pointer("/user/reference").and_then(Value::as_str).unwrap_or_default();
        if !user.starts_with("User/") {
            continue;
        }
        let profile = m.pointer("/profile/reference").and_then(Value::as_str).unwrap_or_default();
        for reference in [profile, user] {
            // A User the credential may not read (a server-scoped one, for a project admin) stays unknown.
            if let Ok(Some(found)) = medplum.read_reference::<Value>(reference).await {
                references.insert(reference.to_string(), found);
            }
        }
    }
    Ok(convert::Snapshot { project, policies, clients, memberships, references })
}

/// `medplum-operator export`: prints the resources (or writes them under `--output-dir`), and on
/// stderr what was left out and why.
pub async fn run_export(args: ExportArgs) -> Result<(), CommandError> {
    let kube = kube_client(args.context.as_deref()).await?;
    let connection_ref = match &args.cluster_connection {
        Some(name) => ConnectionRef { kind: ConnectionKind::ClusterMedplumConnection, name: name.clone() },
        None => ConnectionRef { kind: ConnectionKind::MedplumConnection, name: args.connection.clone() },
    };
    let opened = open(&kube, &args.namespace, &connection_ref).await?;
    let verified = &opened.verified;
    let snapshot = snapshot(&verified.client, &verified.project_id).await?;
    let target = convert::Target {
        namespace: args.namespace.clone(),
        connection_ref,
        cluster_id: args.cluster_id.clone(),
        credential_client_id: verified.client_id.clone(),
        limits: opened.limits.clone(),
        adopt_secret: match args.adopt_secret {
            SecretOnAdoption::Keep => AdoptSecret::Keep,
            SecretOnAdoption::Rotate => AdoptSecret::Rotate,
        },
    };
    let export = convert::export(&snapshot, &target);
    let documents = documents(&export);
    match &args.output_dir {
        None => print!("{}", documents.iter().map(|(_, _, yaml)| format!("---\n{yaml}")).collect::<String>()),
        Some(dir) => write_folders(dir, &documents)?,
    }
    for (what, why) in &export.notes {
        eprintln!("not exported: {what}: {why}");
    }
    for (name, key, about) in &export.secrets_needed {
        eprintln!(
            "create Secret {name} (key {key}) in {} with {about} before applying; its value is not exported",
            args.namespace
        );
    }
    eprintln!(
        "exported {} AccessPolicies, {} ClientApplications, {} ProjectUsers, {} MedplumProject from project {} ({} left out)",
        export.policies.len(),
        export.clients.len(),
        export.users.len(),
        usize::from(export.project.is_some()),
        verified.project_id,
        export.notes.len()
    );
    Ok(())
}

/// Each resource as `(folder, name, YAML)`, in a stable order, without the fields that only repeat
/// a default.
fn documents(export: &convert::Export) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let mut push = |folder: &'static str, name: Option<&String>, value: Value| {
        out.push((folder, name.cloned().unwrap_or_default(), to_yaml(value)));
    };
    for p in &export.policies {
        push("access-policies", p.metadata.name.as_ref(), serde_json::to_value(p).expect("resources serialize"));
    }
    for c in &export.clients {
        push("client-applications", c.metadata.name.as_ref(), serde_json::to_value(c).expect("resources serialize"));
    }
    for u in &export.users {
        push("project-users", u.metadata.name.as_ref(), serde_json::to_value(u).expect("resources serialize"));
    }
    if let Some(p) = &export.project {
        push("medplum-projects", p.metadata.name.as_ref(), serde_json::to_value(p).expect("resources serialize"));
    }
    out
}

/// YAML of a resource without the spec fields that hold their defaults.
fn to_yaml(mut value: Value) -> String {
    let defaults = [
        ("connectionRef", serde_json::to_value(ConnectionRef::default())),
        ("secret", serde_json::to_value(crate::crd::SecretSpec::default())),
        ("rotation", serde_json::to_value(crate::crd::RotationSpec::default())),
    ];
    if let Some(spec) = value.get_mut("spec").and_then(Value::as_object_mut) {
        for (key, default) in defaults {
            if spec.get(key).is_some_and(|v| Some(v) == default.as_ref().ok()) {
                spec.remove(key);
            }
        }
    }
    serde_yaml::to_string(&value).expect("JSON values serialize as YAML")
}

fn write_folders(dir: &Path, documents: &[(&'static str, String, String)]) -> Result<(), CommandError> {
    for (folder, name, yaml) in documents {
        let folder = dir.join(folder);
        let path: PathBuf = folder.join(format!("{name}.yaml"));
        let failed = |source| CommandError::Output { path: path.display().to_string(), source };
        std::fs::create_dir_all(&folder).map_err(failed)?;
        std::fs::write(&path, yaml).map_err(failed)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// diff

/// `medplum-operator diff`; `Ok(true)` when the operator would change something.
pub async fn run_diff(args: DiffArgs) -> Result<bool, CommandError> {
    let kube = kube_client(args.context.as_deref()).await?;
    let resources = match &args.filename {
        Some(path) => diff::Resources::from_path(path, &args.namespace)?,
        None => diff::Resources::from_cluster(&kube, &args.namespace).await?,
    };
    let mut changes = false;
    for report in diff::reports(&kube, &args.namespace, &args.cluster_id, &resources).await? {
        changes |= report.changes();
        print!("{report}");
    }
    Ok(changes)
}

/// The ids of AccessPolicy resources of `namespace` as their status records them.
pub async fn recorded_policy_ids(kube: &kube::Client, namespace: &str) -> Result<Vec<(String, String)>, kube::Error> {
    let list = Api::<crate::crd::AccessPolicy>::namespaced(kube.clone(), namespace).list(&Default::default()).await?;
    Ok(list.items.into_iter().filter_map(|p| Some((p.metadata.name.clone()?, p.status?.policy_id?))).collect())
}
