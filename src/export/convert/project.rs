//! The project's settings, as a MedplumProject.

use std::collections::HashMap;

use serde_json::Value;

use super::{Export, Snapshot, Target, kube_name, metadata, skip, str_of, strings, unknown_keys};
use crate::controller::tenancy;
use crate::crd::{
    LocalObjectRef, MedplumProject, MedplumProjectSpec, PatientRegistration, ProjectDeletionPolicy, Site,
};

pub(super) fn export_project(
    snapshot: &Snapshot,
    target: &Target,
    policy_names: &HashMap<String, String>,
    out: &mut Export,
) {
    let project = &snapshot.project;
    let what = format!("Project/{}", str_of(project, "id").unwrap_or_default());
    let mut spec = MedplumProjectSpec {
        connection_ref: target.connection_ref.clone(),
        patient_registration: None,
        sites: Vec::new(),
        secrets: Vec::new(),
        deletion_policy: ProjectDeletionPolicy::Orphan,
    };
    if let Some(reference) = project.pointer("/defaultPatientAccessPolicy/reference").and_then(Value::as_str) {
        let id = reference.trim_start_matches("AccessPolicy/");
        match policy_names.get(id) {
            Some(name) => {
                let policy = Some(LocalObjectRef { name: name.clone() });
                spec.patient_registration = Some(PatientRegistration { open: true, access_policy_ref: policy });
            }
            None => skip(
                out,
                format!("{what} defaultPatientAccessPolicy"),
                format!("{reference} is not exported; left as it is"),
            ),
        }
    }
    for site in project.get("site").and_then(Value::as_array).into_iter().flatten() {
        let site_name = str_of(site, "name").unwrap_or_default().to_string();
        let unknown = unknown_keys(site, &["name", "domain", "recaptchaSiteKey"]);
        if !unknown.is_empty() {
            let why = format!(
                "has {}, which the export leaves in Medplum (a secret, or not declarable); left as it is",
                unknown.join(", ")
            );
            skip(out, format!("{what} site {site_name:?}"), why);
            continue;
        }
        spec.sites.push(Site {
            name: site_name,
            domains: strings(site, "domain"),
            recaptcha_site_key: str_of(site, "recaptchaSiteKey").map(String::from),
            recaptcha_secret_key_ref: None,
        });
    }
    for secret in project.get("secret").and_then(Value::as_array).into_iter().flatten() {
        let why = "a project secret's value is never exported; left as it is (declare it in spec.secrets from a Secret to manage it)";
        skip(out, format!("{what} secret {:?}", str_of(secret, "name").unwrap_or_default()), why);
    }
    if spec.patient_registration.is_none() && spec.sites.is_empty() {
        return;
    }
    if let Err(denied) = tenancy::project_settings(&target.limits) {
        skip(out, what, denied.to_string());
        return;
    }
    let name = Some(kube_name(str_of(project, "name").unwrap_or_default())).filter(|n| !n.is_empty());
    let name = name.unwrap_or_else(|| "project".into());
    out.project = Some(MedplumProject { metadata: metadata(&name, &target.namespace), spec, status: None });
}
