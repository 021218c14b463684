//! `ProjectUser`: a person's membership of the project. Created with Medplum's invite (which makes the
//! User and the profile), found again through an identifier the operator puts on the membership, and
//! kept as the spec says by updating the membership itself (never through the invite's `upsert`, which
//! clears fields it is not sent).

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::adoption;
use super::connection::{UsableConnection, usable_connection};
use super::failure::ResourceError;
use super::grants::resolve_grants;
use super::status::{ConditionState, READY, apply_status, set_condition};
use super::tenancy::{self, Adoptee};
use super::{CleanupVia, Context, Error, ReconcileStream, cleanup_via, event};
use crate::crd::{ProjectUser, ProjectUserSpec, ProjectUserStatus, UserDeletionPolicy, UserScope};
use crate::medplum::{
    Identifier, InviteMembership, InviteRequest, MedplumClient, MedplumError, MembershipAccess, MembershipResource,
    ProfileResource,
};

pub const KIND: &str = "ProjectUser";

// ---------------------------------------------------------------------------------------------------
// What should exist (pure)

/// The identifier the operator puts on the membership to find it again.
pub fn identifier(cluster_id: &str, namespace: &str, name: &str) -> Identifier {
    let tag = super::ownership_tag(cluster_id, KIND, namespace, name);
    Identifier { system: tag.system, value: tag.code }
}

/// The invite that creates the membership.
pub fn invite_request(user: &ProjectUser, access: &[MembershipAccess], identifier: &Identifier) -> InviteRequest {
    let spec = &user.spec;
    InviteRequest {
        resource_type: spec.resource_type.as_str().into(),
        first_name: spec.first_name.clone(),
        last_name: spec.last_name.clone(),
        email: spec.email.clone(),
        external_id: spec.external_id.clone(),
        scope: spec.scope.map(|s| match s {
            UserScope::Project => "project".into(),
            UserScope::Server => "server".into(),
        }),
        send_email: spec.send_email,
        admin: spec.admin,
        access: access.to_vec(),
        membership: InviteMembership { identifier: vec![identifier.clone()] },
    }
}

/// The names of membership fields that differ from the spec. Without any access the project's
/// default policy would apply, so `accessPolicy` must be absent too.
pub fn membership_drift(
    access: &[MembershipAccess],
    admin: bool,
    identifiers: &[Identifier],
    actual: &MembershipResource,
) -> Vec<&'static str> {
    let checks = [
        ("access", actual.access == access),
        ("accessPolicy", actual.access_policy.is_none()),
        ("admin", actual.admin.unwrap_or(false) == admin),
        ("active", actual.active != Some(false)),
        ("identifier", identifiers.iter().all(|i| actual.identifier.contains(i))),
    ];
    checks.into_iter().filter(|(_, same)| !same).map(|(name, _)| name).collect()
}

/// The membership with the spec's access, admin flag and identifiers; its other fields are kept.
fn membership_body(
    actual: &MembershipResource,
    access: &[MembershipAccess],
    admin: bool,
    identifiers: &[Identifier],
) -> MembershipResource {
    let mut body = actual.clone();
    body.access = access.to_vec();
    body.access_policy = None;
    body.admin = Some(admin);
    body.active = None;
    for identifier in identifiers {
        if !body.identifier.contains(identifier) {
            body.identifier.push(identifier.clone());
        }
    }
    body
}

/// Whether the profile's name is the spec's.
pub(crate) fn name_matches(profile: &ProfileResource, first: &str, last: &str) -> bool {
    profile
        .name
        .first()
        .is_some_and(|n| n.given.first().map(String::as_str) == Some(first) && n.family.as_deref() == Some(last))
}

/// What is known of the person in Medplum, as the reconcile goes.
#[derive(Debug, Default)]
pub struct Observed {
    pub membership: Option<MembershipResource>,
    /// An invite answered 409: the person is a member already, through a membership not ours.
    pub already_member: bool,
    /// The membership was adopted: it carries the adopted marker beside the operator's identifier.
    pub adopted: bool,
    /// The name on the profile is to be checked in this reconcile (see `profile_due`).
    pub name_due: bool,
    /// The profile, once read (`Some(None)`: there is none).
    pub profile: Option<Option<ProfileResource>>,
}

/// The next thing to do for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Invite,
    /// Take over the person's existing membership; checked against the limits before any write.
    Adopt,
    UpdateMembership {
        fields: Vec<&'static str>,
    },
    ReadProfile,
    UpdateName,
    Done,
}

/// The identifiers the membership carries: the operator's, and the adopted marker once adopted.
fn identifiers(own: &Identifier, adopted: bool) -> Vec<Identifier> {
    std::iter::once(own.clone()).chain(adopted.then(|| adoption::adopted_identifier(own))).collect()
}

/// What follows from `o` for the person `spec` declares with `access`.
pub fn plan(
    spec: &ProjectUserSpec,
    access: &[MembershipAccess],
    own: &Identifier,
    o: &Observed,
) -> Result<Step, ResourceError> {
    let Some(membership) = &o.membership else {
        return match (o.already_member, spec.adopt) {
            (false, _) => Ok(Step::Invite),
            (true, true) => Ok(Step::Adopt),
            (true, false) => Err(ResourceError::AlreadyMember),
        };
    };
    let fields = membership_drift(access, spec.admin, &identifiers(own, o.adopted), membership);
    if !fields.is_empty() {
        return Ok(Step::UpdateMembership { fields });
    }
    Ok(match &o.profile {
        None if o.name_due => Step::ReadProfile,
        Some(Some(profile)) if !name_matches(profile, &spec.first_name, &spec.last_name) => Step::UpdateName,
        _ => Step::Done,
    })
}

// ---------------------------------------------------------------------------------------------------
// Reconcile

/// The membership of `user`, by the id in status or the operator's identifier; `fresh`: from Medplum
/// itself, whatever the view holds. (An invite of someone already a member answers 409, so the view's
/// word that there is none needs no search first.)
async fn find_membership(
    usable: &UsableConnection,
    user: &ProjectUser,
    identifier: &Identifier,
    fresh: bool,
) -> Result<Option<MembershipResource>, MedplumError> {
    let recorded = user.status.as_ref().and_then(|s| s.membership_id.as_deref());
    let (system, code) = (&identifier.system, &identifier.value);
    match fresh {
        true => usable.read_managed(system, code, recorded).await,
        false => usable.find_managed(system, code, recorded, false).await,
    }
}

/// Whether to read the profile for its name now: after a change of the spec or of the membership,
/// and otherwise for each user in one resync of every [`PROFILE_CHECK_EVERY`], spread by name, so
/// that names are kept without a read per user per resync.
fn profile_due(user: &ProjectUser, membership_changed: bool, resync: std::time::Duration) -> bool {
    use std::hash::{Hash, Hasher};
    let spec_changed = user.status.as_ref().and_then(|s| s.observed_generation) != user.metadata.generation;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (user.namespace(), user.name_any()).hash(&mut hasher);
    let round = Timestamp::now().as_second() / resync.as_secs().max(1) as i64;
    let turn = round.rem_euclid(PROFILE_CHECK_EVERY) == (hasher.finish() % PROFILE_CHECK_EVERY as u64) as i64;
    spec_changed || membership_changed || turn
}

/// A profile's name is compared with the spec at least once in this many resyncs.
const PROFILE_CHECK_EVERY: i64 = 12;

/// The existing membership in the project of the person the spec names (for adoption after a 409).
pub(crate) async fn existing_membership(
    medplum: &MedplumClient,
    user: &ProjectUser,
    project_id: &str,
) -> Result<Option<MembershipResource>, MedplumError> {
    // Searched within the project: a super-admin connection could otherwise see every project's members.
    let project = format!("Project/{project_id}");
    let found = match (&user.spec.external_id, &user.spec.email) {
        (Some(external), _) => {
            medplum.search::<MembershipResource>(&[("external-id", external), ("project", &project)]).await?
        }
        (None, Some(email)) => {
            let email = email.to_lowercase();
            medplum.search::<MembershipResource>(&[("user:User.email", &email), ("project", &project)]).await?
        }
        (None, None) => Vec::new(),
    };
    Ok(found.into_iter().next())
}

/// The membership of the person the spec names, once the connection's adoption limits and the
/// membership itself allow taking it over. Nothing is written before this returns.
async fn adoptable_membership(
    usable: &UsableConnection,
    user: &ProjectUser,
    own: &Identifier,
) -> Result<MembershipResource, ResourceError> {
    let spec = &user.spec;
    let who = spec.email.clone().or_else(|| spec.external_id.clone()).unwrap_or_default();
    let member = Adoptee::Member { email: spec.email.as_deref(), external_id: spec.external_id.as_deref() };
    tenancy::adoption(&usable.limits, &member, &format!("the membership of {who}"))?;
    let medplum = &usable.client;
    let membership = existing_membership(medplum, user, &usable.project_id)
        .await?
        .ok_or_else(|| ResourceError::AdoptTargetNotFound { what: format!("membership of {who}") })?;
    let what = format!("ProjectMembership/{} of {who}", membership.id.as_deref().unwrap_or_default());
    let marks = membership.identifier.iter().map(|i| (i.system.as_str(), i.value.as_str()));
    adoption::check_unmanaged(marks, (&own.system, &own.value), &what)?;
    adoption::check_access(medplum, &usable.limits, Some(&membership), &what).await?;
    Ok(membership)
}

/// Observes the membership, then carries out the plan's steps until it is done.
async fn converge(
    ctx: &Context,
    user: &ProjectUser,
    usable: &UsableConnection,
) -> Result<(MembershipResource, Vec<Event>), ResourceError> {
    let namespace = user.namespace().unwrap_or_default();
    tenancy::project_user(&usable.limits, &user.spec)?;
    let access = resolve_grants(ctx, &namespace, &user.spec.connection_ref, &user.spec.access).await?;
    let own = identifier(&ctx.settings.cluster_id, &namespace, &user.name_any());
    let mut o = Observed { membership: find_membership(usable, user, &own, false).await?, ..Default::default() };
    let mut events = Vec::new();
    let (mut membership_changed, mut updated) = (false, false);
    loop {
        o.name_due = profile_due(user, membership_changed, ctx.settings.resync_interval);
        let step = plan(&user.spec, &access, &own, &o)?;
        match step {
            Step::Done => return Ok((o.membership.expect("planned done with a membership"), events)),
            Step::UpdateMembership { fields } if updated => {
                return Err(ResourceError::NotConverging(fields.join(", ")));
            }
            Step::Invite => {
                match usable.client.invite(&usable.project_id, &invite_request(user, &access, &own)).await {
                    Ok(m) => {
                        usable.view.record(&m);
                        let id = m.id.as_deref().unwrap_or_default();
                        let note = format!("invited {} as ProjectMembership/{id}", m.profile.reference);
                        events.push(event(EventType::Normal, "Created", "Create", note));
                        (o.membership, membership_changed) = (Some(m), true);
                    }
                    Err(MedplumError::Conflict { .. }) => o.already_member = true,
                    Err(e) => return Err(e.into()),
                }
            }
            Step::Adopt => {
                let m = adoptable_membership(usable, user, &own).await?;
                let note = format!("took over ProjectMembership/{}", m.id.as_deref().unwrap_or_default());
                events.push(event(EventType::Normal, "Adopted", "Adopt", note));
                (o.membership, o.adopted, membership_changed) = (Some(m), true, true);
            }
            Step::UpdateMembership { fields } => {
                let m = o.membership.as_ref().expect("planned an update with a membership");
                let (id, version) = (m.id.clone().unwrap_or_default(), m.meta.version_id.clone().unwrap_or_default());
                let body = membership_body(m, &access, user.spec.admin, &identifiers(&own, o.adopted));
                let written = usable.client.update(&id, &body, &version).await?;
                usable.view.record(&written);
                if events.is_empty() {
                    let observed = user.status.as_ref().and_then(|s| s.observed_generation);
                    let target = format!("ProjectMembership/{id}");
                    events.push(super::update_event(observed, user.metadata.generation, &target, &fields.join(", ")));
                }
                (o.membership, membership_changed, updated) = (Some(written), true, true);
            }
            Step::ReadProfile => {
                let reference = &o.membership.as_ref().expect("a membership").profile.reference;
                o.profile = Some(usable.client.read_reference::<ProfileResource>(reference).await?);
            }
            Step::UpdateName => {
                let reference = o.membership.as_ref().expect("a membership").profile.reference.clone();
                let profile = o.profile.as_mut().and_then(Option::as_mut).expect("planned with a profile");
                let version = profile.meta.version_id.clone().unwrap_or_default();
                let mut name = profile.name.first().cloned().unwrap_or_default();
                name.given = vec![user.spec.first_name.clone()];
                name.family = Some(user.spec.last_name.clone());
                profile.name = std::iter::once(name).chain(profile.name.iter().skip(1).cloned()).collect();
                usable.client.update_reference(&reference, &*profile, &version).await?;
                events.push(event(EventType::Normal, "Updated", "Update", format!("updated the name on {reference}")));
            }
        }
    }
}

async fn write_status(
    ctx: &Context,
    user: &ProjectUser,
    membership: Option<&MembershipResource>,
    ready: ConditionState,
) -> Result<(), Error> {
    let api: Api<ProjectUser> = Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default());
    let mut status: ProjectUserStatus = user.status.clone().unwrap_or_default();
    if let Some(m) = membership {
        status.membership_id = m.id.clone();
        status.user_id = m.user.reference.strip_prefix("User/").map(str::to_string);
        status.profile = Some(m.profile.reference.clone());
    }
    status.conditions = set_condition(&status.conditions, ready, user.metadata.generation, Timestamp::now());
    status.observed_generation = user.metadata.generation;
    apply_status(&api, &user.name_any(), user.status.as_ref(), &status).await.map_err(Error::Status)?;
    let before = user.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.report_ready(KIND, user, before, &status.conditions).await;
    Ok(())
}

async fn apply(user: &ProjectUser, ctx: &Context) -> Result<Action, Error> {
    let namespace = user.namespace().unwrap_or_default();
    let result = match usable_connection(ctx, &namespace, &user.spec.connection_ref).await {
        Ok(usable) => {
            let result = converge(ctx, user, &usable).await;
            if let Err(ResourceError::Medplum(e)) = &result
                && e.leaves_object_uncertain()
            {
                let identifier = identifier(&ctx.settings.cluster_id, &namespace, &user.name_any());
                usable.view.doubt::<MembershipResource>(&identifier.value);
            }
            result
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok((membership, events)) => {
            let message = format!(
                "{} is a member as ProjectMembership/{}",
                membership.profile.reference,
                membership.id.as_deref().unwrap_or_default()
            );
            write_status(ctx, user, Some(&membership), ConditionState::new(READY, true, "Ready", message)).await?;
            for e in &events {
                ctx.publish(&user.object_ref(&()), e).await;
            }
            ctx.succeeded(KIND, user);
            Ok(Action::await_change())
        }
        Err(e) => {
            write_status(ctx, user, None, ConditionState::not_ready(&e)).await?;
            Ok(ctx.retry(KIND, user, &e))
        }
    }
}

async fn cleanup(user: &ProjectUser, ctx: &Context) -> Result<Action, Error> {
    let reference = user.object_ref(&());
    let namespace = user.namespace().unwrap_or_default();
    let usable = match cleanup_via(ctx, user).await? {
        CleanupVia::Connection(usable) => usable,
        CleanupVia::Released => return Ok(Action::await_change()),
    };
    let identifier = identifier(&ctx.settings.cluster_id, &namespace, &user.name_any());
    let medplum = &usable.client;
    let outcome: Result<(String, &str), MedplumError> = async {
        // Deletion asks Medplum itself, whatever the view holds.
        let Some(mut m) = find_membership(&usable, user, &identifier, true).await? else {
            return Ok(("nothing left in Medplum".into(), "Deleted"));
        };
        let id = m.id.clone().unwrap_or_default();
        let version = m.meta.version_id.clone().unwrap_or_default();
        let marker = adoption::adopted_identifier(&identifier);
        // A person adopted into management was not invited by the namespace: unless the connection
        // allows it, deleting the resource only releases the membership, whatever its deletionPolicy.
        let adopted = m.identifier.contains(&marker);
        m.identifier.retain(|i| *i != identifier && *i != marker);
        Ok(match user.spec.deletion_policy {
            UserDeletionPolicy::Orphan => {
                medplum.update(&id, &m, &version).await?;
                (format!("left ProjectMembership/{id} in Medplum, no longer managed"), "Orphaned")
            }
            _ if !tenancy::may_delete(&usable.limits, adopted) => {
                medplum.update(&id, &m, &version).await?;
                let note = format!(
                    "left adopted ProjectMembership/{id} of {} as it is, no longer managed: the connection does not \
                     allow deleting adopted objects (spec.limits.adoption.allowDelete)",
                    m.profile.reference
                );
                (note, "Released")
            }
            UserDeletionPolicy::Delete => {
                usable.delete_membership(&id).await?;
                (format!("removed ProjectMembership/{id} of {}", m.profile.reference), "Deleted")
            }
            UserDeletionPolicy::Deactivate => {
                m.active = Some(false);
                medplum.update(&id, &m, &version).await?;
                let note = format!(
                    "deactivated ProjectMembership/{id}: {} can no longer use the project",
                    m.profile.reference
                );
                (note, "Deactivated")
            }
        })
    }
    .await;
    usable.view.forget::<MembershipResource>(&identifier.value);
    let (note, reason) = outcome.map_err(|e| Error::Cleanup(e.to_string()))?;
    ctx.publish(&reference, &event(EventType::Normal, reason, "Delete", note)).await;
    ctx.metrics.set_object_ready(KIND, &namespace, &user.name_any(), None);
    Ok(Action::await_change())
}

/// The controller for one scope (`namespace` None: all), and a future that resolves once its cache is filled.
pub fn controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
) -> (ReconcileStream, impl Future<Output = ()> + Send + 'static) {
    let _client = ctx.client.clone();
    let controller = super::new_controller::<ProjectUser>(&ctx, namespace, ctx.settings.user_concurrency, |_| {});
    let store = controller.store();
    let ready = super::cache_synced(store.clone());
    let controller = super::watch_connections(super::on_policy_changes(controller, &ctx), &ctx, namespace);
    let reconcile = |obj, ctx| super::reconcile_with_cleanup(obj, ctx, apply, cleanup);
    (super::drive(controller, KIND, ctx, reconcile), ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Failure;
    use crate::medplum::{HumanName, Ref};

    fn user(spec: serde_json::Value) -> ProjectUser {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "ProjectUser",
            "metadata": {"name": "dr-lee", "namespace": "team-a"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn the_invite_carries_the_identifier_and_never_upserts() {
        let u = user(
            serde_json::json!({"firstName": "Ada", "lastName": "Lee", "email": "ada.lee@example.org", "scope": "project",
                                        "access": [{"policyRef": {"name": "lab-reader"}}]}),
        );
        let id = identifier("default", "team-a", "dr-lee");
        let invite = serde_json::to_value(invite_request(&u, &[], &id)).unwrap();
        assert_eq!(invite["resourceType"], "Practitioner");
        assert_eq!(invite["scope"], "project");
        assert_eq!(invite["sendEmail"], false);
        assert_eq!(invite["membership"]["identifier"][0]["value"], "ProjectUser/team-a/dr-lee");
        assert!(invite.get("upsert").is_none());
    }

    #[test]
    fn the_plan_follows_from_what_medplum_holds() {
        let spec = |adopt: bool| {
            user(serde_json::json!({"firstName": "Ada", "lastName": "Lee", "email": "ada@example.org", "adopt": adopt}))
                .spec
        };
        let own = identifier("default", "team-a", "dr-lee");
        let access = [MembershipAccess { policy: Ref::to("AccessPolicy/p1"), parameter: vec![] }];
        let ours = |adopted: bool| MembershipResource {
            id: Some("m1".into()),
            profile: Ref::to("Practitioner/1"),
            access: access.to_vec(),
            identifier: identifiers(&own, adopted),
            ..Default::default()
        };
        let named = |given: &str| ProfileResource {
            name: vec![HumanName { given: vec![given.into()], family: Some("Lee".into()), ..Default::default() }],
            ..Default::default()
        };
        let seen = |membership: Option<MembershipResource>| Observed { membership, ..Default::default() };
        let update = |fields: &[&'static str]| Ok(Step::UpdateMembership { fields: fields.to_vec() });
        let rows: Vec<(&str, bool, Observed, Result<Step, &str>)> = vec![
            ("nobody yet", false, seen(None), Ok(Step::Invite)),
            (
                "a member already, not to adopt",
                false,
                Observed { already_member: true, ..seen(None) },
                Err("AlreadyMember"),
            ),
            ("a member already, to adopt", true, Observed { already_member: true, ..seen(None) }, Ok(Step::Adopt)),
            ("ours, as declared", false, seen(Some(ours(false))), Ok(Step::Done)),
            (
                "adopted, without the marker yet",
                true,
                Observed { adopted: true, ..seen(Some(ours(false))) },
                update(&["identifier"]),
            ),
            (
                "made admin in the console",
                false,
                seen(Some(MembershipResource { admin: Some(true), ..ours(false) })),
                update(&["admin"]),
            ),
            (
                "deactivated in the console",
                false,
                seen(Some(MembershipResource { active: Some(false), ..ours(false) })),
                update(&["active"]),
            ),
            (
                "as declared, the name is due",
                false,
                Observed { name_due: true, ..seen(Some(ours(false))) },
                Ok(Step::ReadProfile),
            ),
            (
                "the name was changed",
                false,
                Observed { profile: Some(Some(named("Eve"))), ..seen(Some(ours(false))) },
                Ok(Step::UpdateName),
            ),
            (
                "the name is the spec's",
                false,
                Observed { profile: Some(Some(named("Ada"))), ..seen(Some(ours(false))) },
                Ok(Step::Done),
            ),
            (
                "no profile to name",
                false,
                Observed { profile: Some(None), name_due: true, ..seen(Some(ours(false))) },
                Ok(Step::Done),
            ),
        ];
        for (case, adopt, observed, expected) in rows {
            let step = plan(&spec(adopt), &access, &own, &observed).map_err(|e| e.reason());
            assert_eq!(step, expected, "{case}");
        }
    }

    #[test]
    fn drift_covers_access_admin_active_and_the_default_policy() {
        let id = identifier("default", "team-a", "dr-lee");
        let access = vec![MembershipAccess { policy: Ref::to("AccessPolicy/p1"), parameter: vec![] }];
        let mut m = MembershipResource { access: access.clone(), identifier: vec![id.clone()], ..Default::default() };
        let ids = std::slice::from_ref(&id);
        assert!(membership_drift(&access, false, ids, &m).is_empty());
        m.access_policy = Some(Ref::to("AccessPolicy/default-practitioner"));
        m.admin = Some(true);
        m.active = Some(false);
        assert_eq!(membership_drift(&access, false, ids, &m), ["accessPolicy", "admin", "active"]);
        let fixed = membership_body(&m, &access, false, ids);
        assert!(membership_drift(&access, false, ids, &fixed).is_empty());
    }
}
