use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ConnectionRef, ResourceStatus};

/// A person's membership of the Medplum project, created by invite and managed by the operator.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "ProjectUser",
    namespaced,
    status = "ResourceStatus",
    shortname = "mpuser",
    category = "medplum",
    doc = "A user's membership of the Medplum project, managed by the operator.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProjectUserSpec {
    /// The connection to reconcile through; default: the `MedplumConnection` named `default` in this namespace.
    #[serde(default)]
    pub connection_ref: ConnectionRef,
}
