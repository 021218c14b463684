//! medplum-operator: Medplum ClientApplications, AccessPolicies and project users as Kubernetes resources.

pub mod config;
pub mod controller;
pub mod crd;
pub mod export;
pub mod failure;
pub mod leader;
pub mod medplum;
pub mod metrics;
pub mod server;
pub mod telemetry;
