//! Restart targets: workloads restarted when a Secret's credentials change, and whether they rolled out.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
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
}

fn template_annotation(template: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>) -> Option<String> {
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

/// Reads a target's state.
pub async fn observe(client: &Client, namespace: &str, target: &RestartTarget) -> Result<TargetState, kube::Error> {
    let (exists, restarted_for, rolled_out) = match target.kind {
        WorkloadKind::Deployment => {
            match Api::<Deployment>::namespaced(client.clone(), namespace).get_opt(&target.name).await? {
                Some(d) => (true, template_annotation(d.spec.as_ref().map(|s| &s.template)), deployment_rolled_out(&d)),
                None => (false, None, true),
            }
        }
        WorkloadKind::StatefulSet => match Api::<StatefulSet>::namespaced(client.clone(), namespace)
            .get_opt(&target.name)
            .await?
        {
            Some(s) => (true, template_annotation(s.spec.as_ref().map(|s| &s.template)), statefulset_rolled_out(&s)),
            None => (false, None, true),
        },
        WorkloadKind::DaemonSet => {
            match Api::<DaemonSet>::namespaced(client.clone(), namespace).get_opt(&target.name).await? {
                Some(d) => (true, template_annotation(d.spec.as_ref().map(|s| &s.template)), daemonset_rolled_out(&d)),
                None => (false, None, true),
            }
        }
    };
    Ok(TargetState { target: target.clone(), restarted_for, exists, rolled_out })
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
