use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ConnectionRef, ResourceStatus};

/// A Medplum ClientApplication whose credentials the operator keeps in a Kubernetes Secret.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "medplum.com",
    version = "v1alpha1",
    kind = "ClientApplication",
    namespaced,
    status = "ResourceStatus",
    shortname = "mpclient",
    category = "medplum",
    doc = "A Medplum ClientApplication (client credentials) managed by the operator.",
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
pub struct ClientApplicationSpec {
    /// The connection to reconcile through; default: the `MedplumConnection` named `default` in this namespace.
    #[serde(default)]
    pub connection_ref: ConnectionRef,
}
