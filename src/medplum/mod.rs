//! Medplum's HTTP API as the operator uses it: an authenticated client with a token cache, the model
//! types it reads and writes, and its error type.

mod client;
mod error;
mod model;
mod pacing;
mod token;

pub use client::{ClientCredentials, CredentialProof, MedplumClient, RotateSecret};
pub use error::MedplumError;
pub use model::{
    AccessPolicyResource, ClientApplicationResource, Coding, DomainConfigurationResource, Expression, FhirResource,
    Health, HumanName, Identifier, IdentityProviderResource, InviteMembership, InviteRequest, IpAccessRuleEntry, Me,
    MeProfile, MembershipAccess, MembershipParameter, MembershipResource, Meta, NamedEntry, PolicyResourceEntry,
    ProfileResource, ProjectResource, ProjectSummary, Ref, SUBSETTED,
};
pub use pacing::{Limit, Pacing};
