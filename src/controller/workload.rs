//! Restart targets: workloads restarted when a Secret's credentials change, and whether they rolled out.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::status::FIELD_MANAGER;
use crate::crd::{RestartTarget, WorkloadKind};

/// Pod template annotation whose change restarts a workload, as `kubectl rollout restart` does with
/// its own annotation. Its value is the time the credentials were issued.
pub const RESTART_ANNOTATION: &str = "medplum.com/credentials-issued-at";

/// What the operator knows of one restart target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetState {
    pub target: RestartTarget,
    /// The value of [`RESTART_ANNOTATION`] on its pod template; `None` when the workload does not exist.
    pub restarted_for: Option<String>,
    pub exists: bool,
    /// Whether its latest pod template is fully rolled out (the test `kubectl rollout status` makes).
    pub rolled_out: bool,
    /// Whether its pod template refers to the credentials Secret (volume, env or envFrom).
    pub uses_secret: bool,
    /// Why its rollout does not progress, when Kubernetes says so.
    pub stalled: Option<Stall>,
}

/// Why a workload's rollout does not progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stall {
    /// `spec.paused`: the Deployment controller rolls nothing out until it is resumed.
    Paused,
    /// The Deployment's `Progressing` condition says `ProgressDeadlineExceeded` (since `since`).
    DeadlineExceeded { since: String },
}

/// Why a Deployment's rollout does not progress: paused, or past its `progressDeadlineSeconds`.
pub fn deployment_stall(d: &Deployment) -> Option<Stall> {
    if d.spec.as_ref().and_then(|s| s.paused) == Some(true) {
        return Some(Stall::Paused);
    }
    let conditions = d.status.as_ref()?.conditions.as_ref()?;
    let progressing = conditions.iter().find(|c| c.type_ == "Progressing")?;
    (progressing.status == "False" && progressing.reason.as_deref() == Some("ProgressDeadlineExceeded")).then(|| {
        let since = progressing.last_transition_time.as_ref().or(progressing.last_update_time.as_ref());
        Stall::DeadlineExceeded { since: since.map(|t| t.0.to_string()).unwrap_or_default() }
    })
}

/// Whether a pod template refers to Secret `name`: a secret volume, a projected volume source, or a
/// container's (or init container's) `env[].valueFrom.secretKeyRef` or `envFrom[].secretRef`.
pub fn template_uses_secret(template: &PodTemplateSpec, name: &str) -> bool {
    let Some(spec) = &template.spec else { return false };
    let volumes = spec.volumes.iter().flatten().any(|v| {
        v.secret.as_ref().is_some_and(|s| s.secret_name.as_deref() == Some(name))
            || v.projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
                .any(|source| source.secret.as_ref().is_some_and(|s| s.name == name))
    });
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| {
        c.env
            .iter()
            .flatten()
            .any(|e| e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).is_some_and(|r| r.name == name))
            || c.env_from.iter().flatten().any(|e| e.secret_ref.as_ref().is_some_and(|r| r.name == name))
    });
    volumes || containers
}

fn template_annotation(template: Option<&PodTemplateSpec>) -> Option<String> {
    template?.metadata.as_ref()?.annotations.as_ref()?.get(RESTART_ANNOTATION).cloned()
}

/// A Deployment is rolled out when the controller saw its latest spec and every replica is updated and available.
pub fn deployment_rolled_out(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else { return false };
    let wanted = spec.replicas.unwrap_or(1);
    status.observed_generation >= d.metadata.generation
        && status.updated_replicas.unwrap_or(0) >= wanted
        && status.replicas.unwrap_or(0) <= status.updated_replicas.unwrap_or(0)
        && status.available_replicas.unwrap_or(0) >= wanted
}

/// A StatefulSet is rolled out when every replica runs the update revision and is ready.
pub fn statefulset_rolled_out(s: &StatefulSet) -> bool {
    let (Some(spec), Some(status)) = (&s.spec, &s.status) else { return false };
    let wanted = spec.replicas.unwrap_or(1);
    status.observed_generation >= s.metadata.generation
        && status.updated_replicas.unwrap_or(0) >= wanted
        && status.ready_replicas.unwrap_or(0) >= wanted
        && (wanted == 0 || status.current_revision == status.update_revision)
}

/// A DaemonSet is rolled out when every scheduled pod is updated and available.
pub fn daemonset_rolled_out(d: &DaemonSet) -> bool {
    let Some(status) = &d.status else { return false };
    status.observed_generation >= d.metadata.generation
        && status.updated_number_scheduled.unwrap_or(0) >= status.desired_number_scheduled
        && status.number_available.unwrap_or(0) >= status.desired_number_scheduled
}

/// Reads a target's state; `secret` is the Secret it should use.
pub async fn observe(
    client: &Client,
    namespace: &str,
    target: &RestartTarget,
    secret: &str,
) -> Result<TargetState, kube::Error> {
    let found = match target.kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client.clone(), namespace)
            .get_opt(&target.name)
            .await?
            .map(|d| (deployment_rolled_out(&d), deployment_stall(&d), d.spec.map(|s| s.template))),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), namespace)
            .get_opt(&target.name)
            .await?
            .map(|s| (statefulset_rolled_out(&s), None, s.spec.map(|s| s.template))),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), namespace)
            .get_opt(&target.name)
            .await?
            .map(|d| (daemonset_rolled_out(&d), None, d.spec.map(|s| s.template))),
    };
    Ok(match found {
        Some((rolled_out, stalled, template)) => TargetState {
            target: target.clone(),
            restarted_for: template_annotation(template.as_ref()),
            exists: true,
            rolled_out,
            uses_secret: template.as_ref().is_some_and(|t| template_uses_secret(t, secret)),
            stalled: stalled.filter(|_| !rolled_out),
        },
        None => TargetState {
            target: target.clone(),
            restarted_for: None,
            exists: false,
            rolled_out: true,
            uses_secret: false,
            stalled: None,
        },
    })
}

/// Restarts a workload by setting [`RESTART_ANNOTATION`] on its pod template (server-side apply of that
/// one field, so nothing else of the workload is touched or owned).
pub async fn restart(
    client: &Client,
    namespace: &str,
    target: &RestartTarget,
    issued_at: &str,
) -> Result<(), kube::Error> {
    let (api_version, kind) = match target.kind {
        WorkloadKind::Deployment => ("apps/v1", "Deployment"),
        WorkloadKind::StatefulSet => ("apps/v1", "StatefulSet"),
        WorkloadKind::DaemonSet => ("apps/v1", "DaemonSet"),
    };
    let patch = json!({
        "apiVersion": api_version, "kind": kind, "metadata": {"name": target.name},
        "spec": {"template": {"metadata": {"annotations": {RESTART_ANNOTATION: issued_at}}}},
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match target.kind {
        WorkloadKind::Deployment => {
            Api::<Deployment>::namespaced(client.clone(), namespace)
                .patch(&target.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        WorkloadKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(client.clone(), namespace)
                .patch(&target.name, &params, &Patch::Apply(&patch))
                .await?;
        }
        WorkloadKind::DaemonSet => {
            Api::<DaemonSet>::namespaced(client.clone(), namespace)
                .patch(&target.name, &params, &Patch::Apply(&patch))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(
        generation: i64,
        observed: i64,
        replicas: i32,
        updated: i32,
        available: i32,
        total: i32,
    ) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d", "generation": generation},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"observedGeneration": observed, "updatedReplicas": updated, "availableReplicas": available, "replicas": total},
        }))
        .unwrap()
    }

    #[test]
    fn deployment_rollout_needs_the_new_generation_updated_and_available() {
        assert!(deployment_rolled_out(&deployment(2, 2, 3, 3, 3, 3)));
        assert!(!deployment_rolled_out(&deployment(2, 1, 3, 3, 3, 3)), "controller has not seen the restart");
        assert!(!deployment_rolled_out(&deployment(2, 2, 3, 2, 3, 4)), "old pods still running");
        assert!(!deployment_rolled_out(&deployment(2, 2, 3, 3, 2, 3)), "a new pod not available yet");
        assert!(deployment_rolled_out(&deployment(5, 5, 0, 0, 0, 0)), "scaled to zero");
    }

    #[test]
    fn a_paused_deployment_or_one_past_its_progress_deadline_is_stalled() {
        let mut d = deployment(2, 2, 3, 1, 3, 4);
        assert_eq!(deployment_stall(&d), None, "progressing");
        d.spec.as_mut().unwrap().paused = Some(true);
        assert_eq!(deployment_stall(&d), Some(Stall::Paused));
        d.spec.as_mut().unwrap().paused = None;
        d.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(json!({
            "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "lastTransitionTime": "2026-12-04T10:00:00Z"}))
            .unwrap(),
        ]);
        assert_eq!(deployment_stall(&d), Some(Stall::DeadlineExceeded { since: "2026-12-04T10:00:00Z".into() }));
    }

    #[test]
    fn a_template_uses_a_secret_through_volumes_env_or_env_from() {
        let template =
            |spec: serde_json::Value| -> PodTemplateSpec { serde_json::from_value(json!({"spec": spec})).unwrap() };
        let uses = [
            json!({"containers": [{"name": "a"}], "volumes": [{"name": "v", "secret": {"secretName": "creds"}}]}),
            json!({"containers": [{"name": "a"}], "volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "creds"}}]}}]}),
            json!({"containers": [{"name": "a", "envFrom": [{"secretRef": {"name": "creds"}}]}]}),
            json!({"containers": [{"name": "a"}], "initContainers": [{"name": "i", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}}]}]}),
        ];
        for spec in uses {
            assert!(template_uses_secret(&template(spec.clone()), "creds"), "{spec}");
            assert!(!template_uses_secret(&template(spec.clone()), "other"), "{spec}");
        }
        assert!(!template_uses_secret(&template(json!({"containers": [{"name": "a"}]})), "creds"));
    }

    #[test]
    fn statefulset_rollout_needs_the_update_revision() {
        let set = |current: &str, update: &str| -> StatefulSet {
            serde_json::from_value(json!({
                "metadata": {"name": "s", "generation": 3},
                "spec": {"replicas": 2, "selector": {}, "serviceName": "s", "template": {}},
                "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
                           "currentRevision": current, "updateRevision": update},
            }))
            .unwrap()
        };
        assert!(statefulset_rolled_out(&set("r2", "r2")));
        assert!(!statefulset_rolled_out(&set("r1", "r2")));
    }
}
