//! Integration suite: the operator against a real kube-apiserver (RBAC on) and a Medplum target
//! (the Medplum test server by default, a real Medplum when `MEDPLUM_TEST_*` is set).

mod support;

mod access_policy;
mod bench;
mod bounds;
mod chart;
mod client_application;
mod connection;
mod connection_rotation;
mod contract;
mod crds;
mod dev;
mod domain;
mod export;
mod health;
mod hostile;
mod hostile_secrets;
mod image;
mod least_privilege;
mod limits;
mod monitoring;
mod node;
mod operations;
mod outage;
mod project;
mod project_user;
mod rollout;
mod rotate_clients;
mod tenancy;
