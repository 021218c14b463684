//! `DomainConfiguration`: every user of an email domain signs in with an enterprise identity provider.
//!
//! Cluster-scoped, reconciled through a ClusterMedplumConnection that holds a super admin's credential
//! (Medplum lets only super admins manage domain configurations). A domain has at most one
//! DomainConfiguration in Medplum: the operator finds its own by the recorded id or its ownership tag,
//! and refuses to touch one it did not make unless `spec.adopt` says so.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::adoption;
use super::connection::{ConnectionKey, usable_cluster_connection};
use super::failure::ResourceError;
use super::secret::{SOURCE_LABEL, read_secret_string};
use super::status::{ConditionState, READY, apply_status, set_condition};
use super::tenancy;
use super::{CLEANUP_FINALIZER, CleanupVia, Context, Error, ReconcileStream, cleanup_through, event};
use crate::crd::{ClusterMedplumConnection, ConnectionKind, DomainConfiguration, DomainDeletionPolicy};
use crate::medplum::{Coding, DomainConfigurationResource, MedplumError, SUBSETTED};

pub const KIND: &str = "DomainConfiguration";

/// The ownership tag of a cluster-scoped resource: `<Kind>/<name>`.
fn tag(ctx: &Context, dc: &DomainConfiguration) -> Coding {
    Coding {
        system: format!("urn:medplum-operator:{}", ctx.settings.cluster_id),
        code: format!("{KIND}/{}", dc.name_any()),
    }
}

/// What Medplum should hold for `dc`.
fn desired(
    dc: &DomainConfiguration,
    tag: &Coding,
    client_secret: secrecy::SecretString,
) -> DomainConfigurationResource {
    let marker = dc.spec.adopt.then(|| adoption::adopted_marker(tag));
    DomainConfigurationResource {
        resource_type: KIND.into(),
        meta: crate::medplum::Meta { tag: std::iter::once(tag.clone()).chain(marker).collect(), ..Default::default() },
        domain: dc.spec.domain.to_lowercase(),
        identity_provider: Some(super::identity_provider(&dc.spec.identity_provider, client_secret)),
        ..Default::default()
    }
}

/// The names of the fields where Medplum differs from `desired` (never their values).
fn drift(desired: &DomainConfigurationResource, actual: &DomainConfigurationResource) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if !desired.meta.tag.iter().all(|t| actual.meta.has_tag(t)) {
        fields.push("meta.tag");
    }
    if !desired.domain.eq_ignore_ascii_case(&actual.domain) {
        fields.push("domain");
    }
    let same_idp = match (&desired.identity_provider, &actual.identity_provider) {
        (Some(d), Some(a)) => d.same_as(a),
        (None, None) => true,
        _ => false,
    };
    if !same_idp {
        fields.push("identityProvider");
    }
    fields
}

/// The operator's DomainConfiguration of `dc`: by the recorded id, else by the ownership tag.
async fn find_own(
    medplum: &crate::medplum::MedplumClient,
    dc: &DomainConfiguration,
    tag: &Coding,
) -> Result<Option<DomainConfigurationResource>, MedplumError> {
    let recorded = dc.status.as_ref().and_then(|s| s.domain_configuration_id.as_deref());
    let token = format!("{}|{}", tag.system, tag.code);
    medplum.find_owned(recorded, |r: &DomainConfigurationResource| r.meta.has_tag(tag), "_tag", &token).await
}

/// What is known in Medplum of the domain: the operator's configuration of it, else one someone else
/// made for it.
#[derive(Debug, Default)]
pub struct Observed {
    pub own: Option<DomainConfigurationResource>,
    pub existing: Option<DomainConfigurationResource>,
}

/// The next thing to do for a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create,
    /// Take over the existing configuration `id`, written as the spec says.
    Adopt {
        id: String,
    },
    Update {
        id: String,
        fields: Vec<&'static str>,
    },
    Done {
        id: String,
    },
}

/// What follows from `o` for `desired` (`tag`: the operator's ownership tag of the resource).
pub fn plan(
    desired: &DomainConfigurationResource,
    o: &Observed,
    adopt: bool,
    tag: &Coding,
) -> Result<Step, ResourceError> {
    let id_of = |r: &DomainConfigurationResource| r.id.clone().unwrap_or_default();
    if let Some(own) = &o.own {
        return Ok(match drift(desired, own) {
            fields if fields.is_empty() => Step::Done { id: id_of(own) },
            fields => Step::Update { id: id_of(own), fields },
        });
    }
    let Some(existing) = &o.existing else { return Ok(Step::Create) };
    let what = format!("DomainConfiguration/{}", id_of(existing));
    let marks = existing.meta.tag.iter().map(|t| (t.system.as_str(), t.code.as_str()));
    adoption::check_unmanaged(marks, (&tag.system, &tag.code), &what)?;
    if !adopt {
        return Err(ResourceError::DomainAlreadyExists { domain: desired.domain.clone(), id: id_of(existing) });
    }
    Ok(Step::Adopt { id: id_of(existing) })
}

/// Makes Medplum hold what `dc` says: observes, plans, carries the step out; returns the id.
async fn converge(ctx: &Context, dc: &DomainConfiguration, events: &mut Vec<Event>) -> Result<String, ResourceError> {
    let connection = &dc.spec.connection_ref.name;
    let usable = usable_cluster_connection(ctx, connection).await?;
    tenancy::domain_configuration(connection, usable.super_admin)?;
    let r = &dc.spec.identity_provider.client_secret_ref;
    let client_secret = read_secret_string(&ctx.client, &r.namespace, &r.name, &r.key).await?;
    let tag = tag(ctx, dc);
    let desired = desired(dc, &tag, client_secret);
    let medplum = &usable.client;
    let mut o = Observed { own: find_own(medplum, dc, &tag).await?, existing: None };
    if o.own.is_none() {
        let found = medplum.search::<DomainConfigurationResource>(&[("domain", &desired.domain)]).await?;
        o.existing = found.into_iter().next();
    }
    let (id, fields) = match plan(&desired, &o, dc.spec.adopt, &tag)? {
        Step::Done { id } => return Ok(id),
        Step::Create => {
            let created = medplum.create(&desired, None).await?;
            let id = created.id.unwrap_or_default();
            let note = format!("created Medplum DomainConfiguration/{id} for {}", desired.domain);
            events.push(event(EventType::Normal, "Created", "Create", note));
            return Ok(id);
        }
        Step::Adopt { id } => (id, None),
        Step::Update { id, fields } => (id, Some(fields)),
    };
    let actual = o.own.as_ref().or(o.existing.as_ref()).expect("planned with a configuration");
    let mut body = desired.clone();
    body.id = Some(id.clone());
    body.meta.tag = actual.meta.tags_with(&desired.meta.tag);
    medplum.update(&id, &body, actual.meta.version_id.as_deref().unwrap_or_default()).await?;
    let target = format!("DomainConfiguration/{id}");
    events.push(match fields {
        None => event(EventType::Normal, "Adopted", "Adopt", format!("took over Medplum {target}")),
        Some(fields) => {
            let observed = dc.status.as_ref().and_then(|s| s.observed_generation);
            super::update_event(observed, dc.metadata.generation, &target, &fields.join(", "))
        }
    });
    Ok(id)
}

async fn write_status(
    ctx: &Context,
    dc: &DomainConfiguration,
    id: Option<String>,
    ready: ConditionState,
) -> Result<(), Error> {
    let api: Api<DomainConfiguration> = Api::all(ctx.client.clone());
    let mut status = dc.status.clone().unwrap_or_default();
    if id.is_some() {
        status.domain_configuration_id = id;
    }
    status.conditions = set_condition(&status.conditions, ready, dc.metadata.generation, Timestamp::now());
    status.observed_generation = dc.metadata.generation;
    apply_status(&api, &dc.name_any(), dc.status.as_ref(), &status).await.map_err(Error::Status)?;
    let before = dc.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.report_ready(KIND, dc, before, &status.conditions).await;
    Ok(())
}

async fn apply(dc: &DomainConfiguration, ctx: &Context) -> Result<Action, Error> {
    let mut events = Vec::new();
    let result = converge(ctx, dc, &mut events).await;
    let reference = dc.object_ref(&());
    match result {
        Ok(id) => {
            let message = format!(
                "Medplum sends users of {} to the identity provider (DomainConfiguration/{id})",
                dc.spec.domain
            );
            write_status(ctx, dc, Some(id), ConditionState::new(READY, true, "Ready", message)).await?;
            for e in &events {
                ctx.publish(&reference, e).await;
            }
            ctx.succeeded(KIND, dc);
            Ok(Action::requeue(ctx.settings.resync_interval))
        }
        Err(e) => {
            write_status(ctx, dc, None, ConditionState::not_ready(&e)).await?;
            Ok(ctx.retry(KIND, dc, &e))
        }
    }
}

/// Deletion: the deletion policy, through the connection as last verified. Without one, the deletion
/// waits, unless someone released the finalizer with the annotation.
async fn cleanup(dc: &DomainConfiguration, ctx: &Context) -> Result<Action, Error> {
    let reference = dc.object_ref(&());
    let key = ConnectionKey {
        kind: ConnectionKind::ClusterMedplumConnection,
        namespace: None,
        name: dc.spec.connection_ref.name.clone(),
    };
    let usable = match cleanup_through(ctx, dc, key).await? {
        CleanupVia::Connection(usable) => usable,
        CleanupVia::Released => return Ok(Action::await_change()),
    };
    let tag = tag(ctx, dc);
    let medplum = &usable.client;
    let outcome: Result<String, MedplumError> = async {
        let Some(own) = find_own(medplum, dc, &tag).await? else { return Ok("nothing left in Medplum".into()) };
        let id = own.id.clone().unwrap_or_default();
        match dc.spec.deletion_policy {
            DomainDeletionPolicy::Delete => {
                medplum.delete::<DomainConfigurationResource>(&id).await?;
                Ok(format!("deleted DomainConfiguration/{id} from Medplum"))
            }
            DomainDeletionPolicy::Orphan => {
                let mut untagged = own.clone();
                let marker = adoption::adopted_marker(&tag);
                untagged.meta.tag.retain(|t| *t != tag && *t != marker && t.system != SUBSETTED);
                medplum.update(&id, &untagged, own.meta.version_id.as_deref().unwrap_or_default()).await?;
                Ok(format!("left DomainConfiguration/{id} in Medplum, no longer managed"))
            }
        }
    }
    .await;
    let note = outcome.map_err(|e| Error::Cleanup(e.to_string()))?;
    let reason = match dc.spec.deletion_policy {
        DomainDeletionPolicy::Delete => "Deleted",
        DomainDeletionPolicy::Orphan => "Orphaned",
    };
    ctx.publish(&reference, &event(EventType::Normal, reason, "Delete", note)).await;
    ctx.metrics.set_object_ready(KIND, "", &dc.name_any(), None);
    Ok(Action::await_change())
}

/// The controller, and a future that resolves once its cache is filled. A change of a cluster
/// connection (becoming Ready, above all) reconciles the domain configurations that use it, and so does
/// a change of a labelled ([`SOURCE_LABEL`]) client secret Secret.
pub fn controller(ctx: Arc<Context>) -> (ReconcileStream, impl Future<Output = ()> + Send + 'static) {
    let api: Api<DomainConfiguration> = Api::all(ctx.client.clone());
    // The instance serves the domain configurations its cluster connection selector picks, as it does
    // cluster connections.
    let config = super::cluster_connection_config(&ctx.settings.cluster_connection_selector).any_semantic();
    let controller = Controller::new(api, config)
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.settings.connection_concurrency));
    let store = controller.store();
    let ready = super::cache_synced(store.clone());
    let controller = controller.watches(
        Api::<ClusterMedplumConnection>::all(ctx.client.clone()),
        super::cluster_connection_config(&ctx.settings.cluster_connection_selector),
        move |connection| {
            let name = connection.name_any();
            store
                .state()
                .iter()
                .filter(|d| d.spec.connection_ref.name == name)
                .map(|d| ObjectRef::from_obj(&**d))
                .collect::<Vec<_>>()
        },
    );
    // Labelled Secrets, where the instance watches Secrets (all namespaces, or the watched ones; a
    // client secret elsewhere is read again at every resync).
    let scopes: Vec<Option<&str>> = if ctx.settings.watch_namespaces.is_empty() {
        vec![None]
    } else {
        ctx.settings.watch_namespaces.iter().map(|ns| Some(ns.as_str())).collect()
    };
    let mut controller = controller;
    for scope in scopes {
        let secrets = super::scoped::<PartialObjectMeta<Secret>>(&ctx.client, scope);
        let store = controller.store();
        controller = controller.watches(secrets, watcher::Config::default().labels(SOURCE_LABEL), move |secret| {
            let (namespace, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
            store
                .state()
                .iter()
                .filter(|d| {
                    let r = &d.spec.identity_provider.client_secret_ref;
                    r.namespace == namespace && r.name == name
                })
                .map(|d| ObjectRef::from_obj(&**d))
                .collect::<Vec<_>>()
        });
    }
    let reconcile = |dc: Arc<DomainConfiguration>, ctx: Arc<Context>| async move {
        let api: Api<DomainConfiguration> = Api::all(ctx.client.clone());
        super::finalized(
            &ctx,
            &api,
            CLEANUP_FINALIZER,
            dc,
            async |d| apply(&d, &ctx).await,
            async |d| cleanup(&d, &ctx).await,
        )
        .await
    };
    (super::drive(controller, KIND, ctx, reconcile), ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Failure;
    use crate::medplum::IdentityProviderResource;
    use secrecy::SecretString;

    fn resource(domain: &str, client_id: &str, secret: &str, tags: Vec<Coding>) -> DomainConfigurationResource {
        DomainConfigurationResource {
            resource_type: KIND.into(),
            meta: crate::medplum::Meta { tag: tags, ..Default::default() },
            domain: domain.into(),
            identity_provider: Some(IdentityProviderResource {
                authorize_url: "https://idp.example.org/authorize".into(),
                token_url: "https://idp.example.org/token".into(),
                user_info_url: "https://idp.example.org/userinfo".into(),
                client_id: client_id.into(),
                client_secret: Some(SecretString::from(secret.to_string())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_plan_follows_from_what_medplum_holds() {
        let ours = Coding { system: "urn:medplum-operator:default".into(), code: "DomainConfiguration/acme".into() };
        let desired = resource("acme.example", "medplum", "s3cret", vec![ours.clone()]);
        let with_id = |mut r: DomainConfigurationResource| {
            r.id = Some("d1".into());
            r
        };
        let someone = Coding { system: "https://example.org/tags".into(), code: "x".into() };
        let operator =
            Coding { system: "urn:medplum-operator:other-cluster".into(), code: "DomainConfiguration/acme".into() };
        let own = |r| Observed { own: Some(with_id(r)), existing: None };
        let existing = |r| Observed { own: None, existing: Some(with_id(r)) };
        let id = || "d1".to_string();
        let rows: Vec<(&str, Observed, bool, Result<Step, &str>)> = vec![
            ("nothing for the domain", Observed::default(), false, Ok(Step::Create)),
            ("ours, as declared", own(desired.clone()), false, Ok(Step::Done { id: id() })),
            (
                "ours, secret changed",
                own(resource("acme.example", "medplum", "new", vec![ours.clone()])),
                false,
                Ok(Step::Update { id: id(), fields: vec!["identityProvider"] }),
            ),
            (
                "someone's, not to adopt",
                existing(resource("acme.example", "x", "y", vec![someone.clone()])),
                false,
                Err("AlreadyExists"),
            ),
            (
                "someone's, to adopt",
                existing(resource("acme.example", "x", "y", vec![someone])),
                true,
                Ok(Step::Adopt { id: id() }),
            ),
            (
                "another operator's, to adopt",
                existing(resource("acme.example", "x", "y", vec![operator])),
                true,
                Err("AlreadyManaged"),
            ),
        ];
        for (case, observed, adopt, expected) in rows {
            let step = plan(&desired, &observed, adopt, &ours).map_err(|e| e.reason());
            assert_eq!(step, expected, "{case}");
        }
    }

    #[test]
    fn drift_names_the_fields_that_differ_and_never_a_value() {
        let ours = Coding { system: "urn:medplum-operator:default".into(), code: "DomainConfiguration/acme".into() };
        let desired = resource("acme.example", "medplum", "s3cret", vec![ours.clone()]);
        let other = Coding { system: "urn:someone".into(), code: "x".into() };
        assert!(
            drift(&desired, &resource("ACME.example", "medplum", "s3cret", vec![other.clone(), ours.clone()]))
                .is_empty()
        );
        assert_eq!(
            drift(&desired, &resource("acme.example", "medplum", "changed", vec![ours.clone()])),
            ["identityProvider"]
        );
        assert_eq!(
            drift(&desired, &resource("acme.example", "other", "s3cret", vec![other])),
            ["meta.tag", "identityProvider"]
        );
    }
}
