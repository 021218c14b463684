//! Observing the Secret, the restart targets and the Medplum client and membership, with the
//! refusals (foreign Secrets, workloads that do not use it, adoption) that come before any write.

use kube::api::Api;
use secrecy::{ExposeSecret, SecretString};

use super::execute::{proof_of_reason, secret_keys};
use super::plan::{Observed, credentials_data};
use super::{CREDENTIAL_VERIFIED, Desired, ISSUED_AT, ROTATE_CLIENTS_HANDLED, ROTATION_HANDLED};
use crate::controller::Context;
use crate::controller::adoption;
use crate::controller::connection::{CREDENTIALS_LABEL, UsableConnection};
use crate::controller::failure::ResourceError;
use crate::controller::foreign_secret::{self, Merge, Refusal};
use crate::controller::secret::{CLIENT_LABEL, WrittenSecret, fingerprint, read_written};
use crate::controller::tenancy::{self, Adoptee};
use crate::controller::view::Seen;
use crate::controller::workload::{self};
use crate::crd::{AdoptSecret, ClientApplication, ClientApplicationStatus, MedplumConnection};
use crate::medplum::{ClientApplicationResource, MedplumClient, MembershipResource};

/// Finds the Medplum client: by the id in status, else by the ownership tag, else the one to adopt,
/// once adoption checks found nothing against it.
pub(super) async fn find_client(
    ctx: &Context,
    usable: &UsableConnection,
    ca: &ClientApplication,
    d: &Desired,
    secret: &WrittenSecret,
) -> Result<Option<ClientApplicationResource>, ResourceError> {
    let medplum = &usable.client;
    // The id in status, else the one in the Secret (status may be lost); either only if still ours.
    let recorded = ca
        .status
        .as_ref()
        .and_then(|s| s.client_id.clone())
        .or_else(|| secret.values.get(&d.keys.client_id).map(|id| id.expose_secret().to_string()));
    // With none of ours, adoption looks for the one to adopt.
    let (system, code) = (&d.tag.system, &d.tag.code);
    if let Some(client) = usable.find_managed(system, code, recorded.as_deref(), d.adopt.is_some()).await? {
        return Ok(Some(client));
    }
    let Some(adopt) = &d.adopt else { return Ok(None) };
    let what = format!("ClientApplication/{}", adopt.client_id);
    let client_id = adopt.client_id.as_str();
    let adoptee = Adoptee::Client { id: client_id, keep_secret: adopt.secret == AdoptSecret::Keep };
    tenancy::adoption(&usable.limits, &adoptee, &what)?;
    let credentials = adoption::connection_credentials(usable, ctx.connections.credentials());
    tenancy::not_a_connection_credential(client_id, credentials.iter().map(|(i, c)| (i.as_str(), c.as_str())), &what)?;
    // Searched within the project: a super-admin connection could otherwise read any project's clients.
    let project = usable.project_id.as_str();
    let found =
        medplum.search::<ClientApplicationResource>(&[("_id", &adopt.client_id), ("_project", project)]).await?;
    let client = found.into_iter().next().ok_or_else(|| ResourceError::AdoptTargetNotFound { what: what.clone() })?;
    let marks = client.meta.tag.iter().map(|t| (t.system.as_str(), t.code.as_str()));
    adoption::check_unmanaged(marks, (&d.tag.system, &d.tag.code), &what)?;
    let membership = find_membership(medplum, Some(&client)).await?;
    adoption::check_access(medplum, &usable.limits, membership.as_ref(), &what).await?;
    Ok(Some(client))
}

/// Why the operator may not write its keys into the existing Secret, if it may not: one that is not
/// its own only with `merge`, and then as [`foreign_secret::refusal`] allows.
pub(super) fn secret_refusal(
    secret: &WrittenSecret,
    d: &Desired,
    status: Option<&ClientApplicationStatus>,
    used_by_connection: bool,
) -> Option<Refusal> {
    if !secret.exists || secret.owner_uids.contains(&d.owner.uid) {
        return None;
    }
    if !d.merge {
        return Some(Refusal::NotMerged);
    }
    let keys = merge_keys(d, status);
    let labels: Vec<(&str, Option<&str>)> = d
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_str())))
        .chain([(CLIENT_LABEL, Some(d.name.as_str()))])
        .collect();
    let annotations: Vec<(&str, Option<&str>)> = d
        .annotations
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_str())))
        .chain([(ISSUED_AT, None), (ROTATION_HANDLED, None), (ROTATE_CLIENTS_HANDLED, None)])
        .collect();
    let merge =
        Merge { client: &d.name, client_label: CLIENT_LABEL, keys: &keys, labels: &labels, annotations: &annotations };
    foreign_secret::refusal(secret, used_by_connection, &merge)
}

/// The keys a merge writes, each with the fingerprint of the value this client's credentials give it
/// (known from the spec and the status; none for the pending key, which only the operator writes).
fn merge_keys<'a>(d: &'a Desired, status: Option<&ClientApplicationStatus>) -> Vec<(&'a str, Option<String>)> {
    let client_id = status.and_then(|s| s.client_id.as_deref());
    let values = credentials_data(d, client_id.unwrap_or_default(), &SecretString::from(String::new()));
    secret_keys(d)
        .into_iter()
        .map(|key| {
            let known = match key {
                k if k == d.keys.client_secret => status.and_then(|s| s.secret_fingerprint.clone()),
                k if k == d.keys.client_id && client_id.is_none() => None,
                k => values.get(k).map(fingerprint),
            };
            (key, known)
        })
        .collect()
}

/// The Secrets the namespace's MedplumConnections read (credentials and CA bundles).
pub(super) async fn connection_secrets(ctx: &Context, namespace: &str) -> Result<Vec<String>, kube::Error> {
    let connections =
        Api::<MedplumConnection>::namespaced(ctx.client.clone(), namespace).list(&Default::default()).await?;
    Ok(connections
        .items
        .iter()
        .flat_map(|c| {
            let ca = c.spec.ca_bundle.as_ref().and_then(|ca| ca.secret_ref.as_ref()).map(|r| r.name.clone());
            std::iter::once(c.spec.credentials_secret_ref.name.clone()).chain(ca)
        })
        .collect())
}

/// The membership of the operator's client: from the view, else searched by its user.
async fn owned_membership(
    usable: &UsableConnection,
    d: &Desired,
    client: Option<&ClientApplicationResource>,
) -> Result<Option<MembershipResource>, ResourceError> {
    match usable.view.seen::<MembershipResource>(&d.tag.code).await {
        Seen::Known(membership)
            if membership.user.reference
                == format!("ClientApplication/{}", client.and_then(|c| c.id.as_deref()).unwrap_or_default()) =>
        {
            Ok(Some(membership))
        }
        // None of ours; an adopted client may still have a membership of its own, found by its user.
        Seen::Absent if d.adopt.is_none() => Ok(None),
        _ => {
            let found = find_membership(&usable.client, client).await?;
            if let Some(m) = &found {
                usable.view.record(m);
            }
            Ok(found)
        }
    }
}

pub(super) async fn find_membership(
    medplum: &MedplumClient,
    client: Option<&ClientApplicationResource>,
) -> Result<Option<MembershipResource>, ResourceError> {
    let Some(id) = client.and_then(|c| c.id.as_deref()) else { return Ok(None) };
    let user = format!("ClientApplication/{id}");
    Ok(medplum.search::<MembershipResource>(&[("user", &user)]).await?.pop())
}

pub(super) async fn observe(
    ctx: &Context,
    ca: &ClientApplication,
    d: &Desired,
    usable: &UsableConnection,
) -> Result<Observed, ResourceError> {
    let secret = read_written(&ctx.client, &d.namespace, &d.secret_name, &secret_keys(d)).await?;
    let foreign = secret.exists && !secret.owner_uids.contains(&d.owner.uid);
    let used_by_connection = foreign && d.merge && {
        secret.labels.contains_key(CREDENTIALS_LABEL)
            || connection_secrets(ctx, &d.namespace).await?.contains(&d.secret_name)
    };
    if let Some(refusal) = secret_refusal(&secret, d, ca.status.as_ref(), used_by_connection) {
        return Err(ResourceError::SecretConflict { name: d.secret_name.clone(), refusal });
    }
    let mut targets = Vec::new();
    for target in &d.restart_targets {
        let state = workload::observe(&ctx.client, &d.namespace, target, &d.secret_name).await?;
        if state.exists && !state.uses_secret {
            let target = format!("{:?}/{}", target.kind, target.name);
            return Err(ResourceError::RestartTargetNotUsingSecret { target, secret: d.secret_name.clone() });
        }
        targets.push(state);
    }
    let client = find_client(ctx, usable, ca, d, &secret).await?;
    let membership = owned_membership(usable, d, client.as_ref()).await?;
    let current = secret.values.get(&d.keys.client_secret);
    let status = ca.status.as_ref();
    let same_secret =
        current.is_some_and(|c| status.and_then(|s| s.secret_fingerprint.clone()) == Some(fingerprint(c)));
    let verified = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CREDENTIAL_VERIFIED && c.status == "True"))
        .and_then(|c| proof_of_reason(&c.reason))
        .filter(|_| same_secret);
    Ok(Observed { secret, client, membership, targets, verified, created: false })
}
