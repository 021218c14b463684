//! Deletion: the deletion policy in Medplum, then the Secret.

use std::collections::BTreeMap;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::KIND;
use super::observe::find_membership;
use super::plan::identifier_of;
use crate::controller::adoption;
use crate::controller::failure::ResourceError;
use crate::controller::secret::{SecretContent, apply_written, read_written};
use crate::controller::tenancy::{self};
use crate::controller::{CleanupVia, Context, Error, cleanup_via, event};
use crate::crd::{ClientApplication, DeletionPolicy};
use crate::medplum::{ClientApplicationResource, MembershipResource};

pub(super) async fn cleanup(ca: &ClientApplication, ctx: &Context) -> Result<Action, Error> {
    let reference = ca.object_ref(&());
    let namespace = ca.namespace().unwrap_or_default();
    let usable = match cleanup_via(ctx, ca).await? {
        CleanupVia::Connection(usable) => usable,
        CleanupVia::Released => return Ok(Action::await_change()),
    };
    let tag = crate::controller::ownership_tag(&ctx.settings.cluster_id, KIND, &namespace, &ca.name_any());
    let medplum = &usable.client;
    let result: Result<(String, &str), ResourceError> = async {
        let tag_query = format!("{}|{}", tag.system, tag.code);
        let mut clients = medplum.search::<ClientApplicationResource>(&[("_tag", &tag_query)]).await?;
        let Some(client) = clients.pop() else {
            return Ok(("nothing left in Medplum".into(), deletion_reason(ca.spec.deletion_policy)));
        };
        let id = client.id.clone().unwrap_or_default();
        let membership = find_membership(medplum, Some(&client)).await?;
        let marker = adoption::adopted_marker(&tag);
        let untagged = |mut c: ClientApplicationResource| {
            c.meta.tag.retain(|t| *t != tag && *t != marker && t.system != "http://hl7.org/fhir/v3/ObservationValue");
            c
        };
        let version = client.meta.version_id.clone().unwrap_or_default();
        // An adopted client was not made by the namespace: unless the connection allows it, deleting the
        // resource only releases it (left as it is, no longer managed), whatever its deletionPolicy.
        let adopted = client.meta.has_tag(&marker);
        let ending = match ca.spec.deletion_policy {
            DeletionPolicy::Orphan => Ending::Untag { released: false },
            _ if !tenancy::may_delete(&usable.limits, adopted) => Ending::Untag { released: true },
            DeletionPolicy::Delete => Ending::Delete,
            DeletionPolicy::Disable => Ending::Disable,
        };
        Ok(match ending {
            Ending::Delete => {
                // The membership first: deleting it ends the client's live tokens at once.
                if let Some(m) = &membership {
                    usable.delete_membership(m.id.as_deref().unwrap_or_default()).await?;
                }
                medplum.delete::<ClientApplicationResource>(&id).await?;
                (format!("deleted ClientApplication/{id} and its membership from Medplum"), "Deleted")
            }
            Ending::Disable => {
                let mut off = untagged(client);
                off.status = Some("off".into());
                medplum.update(&id, &off, &version).await?;
                (format!("set ClientApplication/{id} to status off: no new tokens"), "Disabled")
            }
            Ending::Untag { released } => {
                medplum.update(&id, &untagged(client), &version).await?;
                if let Some(mut m) = membership {
                    let identifier = identifier_of(&tag);
                    m.identifier.retain(|i| *i != identifier);
                    let (mid, mversion) =
                        (m.id.clone().unwrap_or_default(), m.meta.version_id.clone().unwrap_or_default());
                    medplum.update(&mid, &m, &mversion).await?;
                }
                if released {
                    let note = format!(
                        "left adopted ClientApplication/{id} and its membership in Medplum as they are, no longer \
                         managed: the connection does not allow deleting adopted objects (spec.limits.adoption.allowDelete)"
                    );
                    (note, "Released")
                } else {
                    (format!("left ClientApplication/{id} and its membership in Medplum, no longer managed"), "Orphaned")
                }
            }
        })
    }
    .await;
    usable.view.forget::<ClientApplicationResource>(&tag.code);
    usable.view.forget::<MembershipResource>(&tag.code);
    let (note, reason) = result.map_err(|e| Error::Cleanup(e.to_string()))?;
    release_secret(ctx, ca).await.map_err(Error::Kube)?;
    ctx.metrics.set_object_ready(KIND, &namespace, &ca.name_any(), None);
    ctx.metrics.set_next_rotation(&namespace, &ca.name_any(), None);
    ctx.metrics.set_rotation_progress(&namespace, &ca.name_any(), None, None);
    ctx.publish(&reference, &event(EventType::Normal, reason, "Delete", note)).await;
    Ok(Action::await_change())
}

/// What a deletion does to the Medplum client.
pub(super) enum Ending {
    Delete,
    Disable,
    /// Left as it is, without the operator's tags: orphaned as asked, or released because it was adopted.
    Untag {
        released: bool,
    },
}

pub(super) fn deletion_reason(policy: DeletionPolicy) -> &'static str {
    match policy {
        DeletionPolicy::Delete => "Deleted",
        DeletionPolicy::Orphan => "Orphaned",
        DeletionPolicy::Disable => "Disabled",
    }
}

/// The Secret after deletion: with `Orphan`, the credentials stay where they are (an owned Secret is
/// released from its owner so garbage collection leaves it); otherwise an owned Secret goes with the
/// resource (garbage collection) and the operator's keys are removed from a merged one.
pub(super) async fn release_secret(ctx: &Context, ca: &ClientApplication) -> Result<(), kube::Error> {
    let namespace = ca.namespace().unwrap_or_default();
    let name = ca.spec.secret.name.clone().unwrap_or_else(|| ca.name_any());
    let keys = &ca.spec.secret.keys;
    let all =
        [&keys.base_url, &keys.client_id, &keys.client_secret, &keys.token_url, &keys.project_id].map(String::as_str);
    let written = read_written(&ctx.client, &namespace, &name, &all).await?;
    let owned = written.owner_uids.contains(&ca.uid().unwrap_or_default());
    let content = match (ca.spec.deletion_policy, owned) {
        (DeletionPolicy::Orphan, true) => {
            SecretContent { data: written.values, labels: BTreeMap::new(), annotations: BTreeMap::new(), owner: None }
        }
        (DeletionPolicy::Orphan, false) | (_, true) => return Ok(()),
        (_, false) if written.exists => {
            SecretContent { data: BTreeMap::new(), labels: BTreeMap::new(), annotations: BTreeMap::new(), owner: None }
        }
        (_, false) => return Ok(()),
    };
    apply_written(&ctx.client, &namespace, &name, &content, &all).await.map(|_| ())
}
