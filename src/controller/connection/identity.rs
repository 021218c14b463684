//! Who a connection's credential is: read it, obtain a token, check `/auth/me`, and report it.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use secrecy::ExposeSecret;

use super::ConnectionTarget;
use crate::controller::secret::{SourceError, read_ca_bundle, read_secret_strings};
use crate::controller::status::{ConditionState, READY, set_condition};
use crate::crd::ConnectionStatus;
use crate::failure::Failure;
use crate::medplum::{ClientCredentials, Me, MeProfile, MedplumClient, MedplumError};

/// What a successful verification found.
#[derive(Clone, Debug)]
pub struct Verified {
    pub project_id: String,
    pub project_name: Option<String>,
    pub server_version: Option<String>,
    pub client_id: String,
    pub super_admin: bool,
    pub client: Arc<MedplumClient>,
    /// The credential's current and retiring secret, as Medplum shows them to it.
    pub own_secrets: MeProfile,
}

/// Why a connection is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Medplum(#[from] MedplumError),
    #[error("the credential belongs to project {actual}, but spec.projectId is {expected}")]
    ProjectMismatch { expected: String, actual: String },
    #[error(
        "the credential is a member of project {project} but not a project admin; the operator needs a ClientApplication whose membership has admin: true"
    )]
    NotProjectAdmin { project: String },
    #[error(
        "the credential is a super-admin client; refusing it, use a project-admin ClientApplication of the project instead (or set spec.superAdminCredential and spec.projectId if that is meant)"
    )]
    SuperAdminCredential,
    #[error("project {0} does not exist")]
    ProjectNotFound(String),
}

impl Failure for ConnectionError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Source(e) => e.reason(),
            Self::Medplum(e) => e.reason(),
            Self::ProjectMismatch { .. } => "ProjectMismatch",
            Self::NotProjectAdmin { .. } => "NotProjectAdmin",
            Self::SuperAdminCredential => "SuperAdminCredential",
            Self::ProjectNotFound(_) => "ProjectNotFound",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Source(e) => e.is_transient(),
            Self::Medplum(e) => e.is_transient(),
            _ => false,
        }
    }

    fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Medplum(e) if e.is_rate_limited())
    }
}

/// Checks that `/auth/me` describes a project admin of the expected project, or (when the connection
/// says so) a super admin, who then manages `expected_project`.
pub fn check_identity(
    me: &Me,
    expected_project: Option<&str>,
    super_admin_allowed: bool,
) -> Result<(), ConnectionError> {
    if me.project.super_admin {
        return match (super_admin_allowed, expected_project) {
            (true, Some(_)) => Ok(()),
            _ => Err(ConnectionError::SuperAdminCredential),
        };
    }
    if let Some(expected) = expected_project.filter(|e| *e != me.project.id) {
        return Err(ConnectionError::ProjectMismatch { expected: expected.to_string(), actual: me.project.id.clone() });
    }
    if !me.membership.admin {
        return Err(ConnectionError::NotProjectAdmin { project: me.project.id.clone() });
    }
    Ok(())
}

/// The status a connection should have after a verification.
pub fn desired_status(
    current: Option<&ConnectionStatus>,
    result: &Result<Verified, ConnectionError>,
    generation: Option<i64>,
    now: Timestamp,
) -> ConnectionStatus {
    let mut status = current.cloned().unwrap_or_default();
    let condition = match result {
        Ok(v) => {
            status.project_id = Some(v.project_id.clone());
            status.project_name = v.project_name.clone();
            status.server_version = v.server_version.clone();
            status.client_id = Some(v.client_id.clone());
            let project = match &v.project_name {
                Some(name) => format!("{name} ({})", v.project_id),
                None => v.project_id.clone(),
            };
            ConditionState::new(
                READY,
                true,
                "Connected",
                format!("authenticated as ClientApplication/{}, project admin of {project}", v.client_id),
            )
        }
        Err(e) => ConditionState::not_ready(e),
    };
    status.conditions = set_condition(&status.conditions, condition, generation, now);
    status.observed_generation = generation;
    status
}

/// The credential and the CA bundle (PEM) a connection names.
pub async fn read_credentials(
    kube: &kube::Client,
    target: &ConnectionTarget,
) -> Result<(ClientCredentials, Option<Vec<u8>>), ConnectionError> {
    let values = read_secret_strings(
        kube,
        &target.credentials_namespace,
        &target.credentials_name,
        &[&target.client_id_key, &target.client_secret_key],
    )
    .await?;
    let [client_id, client_secret]: [_; 2] = values.try_into().expect("two keys were asked for");
    let credentials = ClientCredentials { client_id: client_id.expose_secret().to_string(), client_secret };
    let ca = match &target.ca {
        Some(source) => Some(read_ca_bundle(kube, source).await?),
        None => None,
    };
    Ok((credentials, ca))
}

/// Checks that the credential of `client` is what the connection says it is, and finds its project.
pub async fn identify(client: Arc<MedplumClient>, target: &ConnectionTarget) -> Result<Verified, ConnectionError> {
    let health = client.health().await?;
    let mut me = client.me().await?;
    check_identity(&me, target.project_id.as_deref(), target.super_admin_credential)?;
    let own_secrets = std::mem::take(&mut me.profile);
    let (project_id, project_name) = match target.project_id.as_deref().filter(|_| me.project.super_admin) {
        Some(managed) => {
            let project =
                client.read_reference::<crate::medplum::ProjectSummary>(&format!("Project/{managed}")).await?;
            let project = project.ok_or_else(|| ConnectionError::ProjectNotFound(managed.to_string()))?;
            (project.id, project.name)
        }
        None => (me.project.id, me.project.name),
    };
    Ok(Verified {
        project_id,
        project_name,
        server_version: health.version,
        client_id: client.client_id().to_string(),
        super_admin: me.project.super_admin,
        client,
        own_secrets,
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::status::is_ready;
    use crate::medplum::Me;
    use std::time::Duration;

    fn me(project: &str, admin: bool, super_admin: bool) -> Me {
        serde_json::from_value(serde_json::json!({
            "project": {"id": project, "name": "P", "superAdmin": super_admin},
            "membership": {"id": "m", "admin": admin, "profile": {"reference": "ClientApplication/c"}},
            "profile": {"resourceType": "ClientApplication", "secret": "never-read"},
        }))
        .unwrap()
    }

    #[test]
    fn identity_must_be_a_project_admin_of_the_expected_project() {
        assert!(check_identity(&me("p1", true, false), Some("p1"), false).is_ok());
        assert!(check_identity(&me("p1", true, false), None, false).is_ok());
        assert_eq!(check_identity(&me("p1", true, false), Some("p2"), false).unwrap_err().reason(), "ProjectMismatch");
        assert_eq!(check_identity(&me("p1", false, false), None, false).unwrap_err().reason(), "NotProjectAdmin");
        assert_eq!(check_identity(&me("sa", true, true), None, false).unwrap_err().reason(), "SuperAdminCredential");
        assert_eq!(
            check_identity(&me("sa", true, true), Some("p1"), false).unwrap_err().reason(),
            "SuperAdminCredential"
        );
        assert_eq!(check_identity(&me("sa", true, true), None, true).unwrap_err().reason(), "SuperAdminCredential");
        assert!(check_identity(&me("sa", true, true), Some("p1"), true).is_ok(), "meant to be one, for project p1");
    }

    #[test]
    fn status_reports_what_was_found_and_keeps_it_through_failures() {
        let now = Timestamp::from_second(1_000).unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let credentials = ClientCredentials { client_id: "c1".into(), client_secret: "s".to_string().into() };
        let client = MedplumClient::new(
            "https://m.example.org",
            credentials,
            None,
            Duration::from_secs(1),
            &Default::default(),
            Default::default(),
        );
        let verified = Verified {
            project_id: "p1".into(),
            project_name: Some("Lab".into()),
            server_version: Some("5.1.29".into()),
            client_id: "c1".into(),
            super_admin: false,
            client: Arc::new(client.unwrap()),
            own_secrets: Default::default(),
        };
        let ok = desired_status(None, &Ok(verified), Some(4), now);
        assert_eq!((ok.project_id.as_deref(), ok.observed_generation), (Some("p1"), Some(4)));
        assert!(is_ready(&ok.conditions));
        assert_eq!(ok.conditions[0].message, "authenticated as ClientApplication/c1, project admin of Lab (p1)");

        let failed =
            desired_status(Some(&ok), &Err(ConnectionError::NotProjectAdmin { project: "p1".into() }), Some(4), now);
        assert!(!is_ready(&failed.conditions));
        assert_eq!(failed.conditions[0].reason, "NotProjectAdmin");
        assert_eq!(failed.project_id.as_deref(), Some("p1"));
    }
}
