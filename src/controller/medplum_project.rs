//! `MedplumProject`: the project-level settings of a connection's project. Open patient registration
//! (`Project.defaultPatientAccessPolicy`), the sites that offer it with their reCAPTCHA keys
//! (`Project.site`) and the project secrets Bots read (`Project.secret`), the secret values from
//! Kubernetes Secrets. Medplum keeps `site` and `secret` as whole lists: the operator rewrites them with
//! one versioned JSON Patch, its own entries (by name, recorded in status) as the spec says and every
//! other entry exactly as it was. A project has one MedplumProject.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::connection::{UsableConnection, usable_connection};
use super::failure::ResourceError;
use super::grants::resolve_grants;
use super::secret::{SOURCE_LABEL, read_secret_string};
use super::status::{ConditionState, READY, apply_status, set_condition};
use super::tenancy;
use super::{Cached, CleanupVia, Context, Error, ReconcileStream, cleanup_via, event};
use crate::crd::{
    AccessGrant, MedplumProject, MedplumProjectStatus, OriginalRegistration, ProjectDeletionPolicy, ProjectSecretType,
};
use crate::medplum::{MedplumError, NamedEntry, ProjectResource};

pub const KIND: &str = "MedplumProject";

/// Which MedplumProject declares each project (`<base URL> <project id>`): the oldest one.
#[derive(Default)]
pub struct ProjectClaims(Mutex<HashMap<String, Claim>>);

#[derive(Clone, Debug, PartialEq)]
struct Claim {
    uid: String,
    created: Option<Time>,
    name: String,
}

impl ProjectClaims {
    /// Claims `project` for `me`, unless an older MedplumProject holds it: then its name.
    fn claim(&self, project: &str, me: Claim) -> Result<(), String> {
        let mut claims = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match claims.get(project) {
            Some(held) if held.uid != me.uid && (&held.created, &held.name) <= (&me.created, &me.name) => {
                Err(held.name.clone())
            }
            _ => {
                claims.insert(project.to_string(), me);
                Ok(())
            }
        }
    }

    fn release(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, held| held.uid != uid);
    }
}

/// What the spec asks Medplum's project to hold, values read from their Secrets.
#[derive(Debug, Default)]
pub struct Desired {
    /// `None`: registration is left as it is; `Some(None)`: closed; `Some(Some(reference))`: open,
    /// with that AccessPolicy.
    pub registration: Option<Option<String>>,
    pub sites: Vec<NamedEntry>,
    pub secrets: Vec<NamedEntry>,
}

/// The names of the entries the operator wrote, as its status records them.
#[derive(Debug, Default)]
pub struct Owned<'a> {
    pub sites: &'a [String],
    pub secrets: &'a [String],
}

/// What to write: the new lists and registration (`None`: unchanged), and what changed, by name.
#[derive(Debug, Default)]
pub struct ProjectChange {
    pub sites: Option<Vec<NamedEntry>>,
    pub secrets: Option<Vec<NamedEntry>>,
    pub registration: Option<Option<String>>,
    pub changed: Vec<String>,
    /// Entries made by someone else that the change would overwrite: nothing may be written then.
    pub conflicts: Vec<String>,
}

impl ProjectChange {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }

    /// The JSON Patch that makes it so (`add` replaces a member that exists).
    pub fn operations(&self, actual: &ProjectResource) -> Value {
        let mut operations = Vec::new();
        let list = |entries: &[NamedEntry]| Value::Array(entries.iter().map(NamedEntry::value).collect());
        if let Some(sites) = &self.sites {
            operations.push(json!({"op": "add", "path": "/site", "value": list(sites)}));
        }
        if let Some(secrets) = &self.secrets {
            operations.push(json!({"op": "add", "path": "/secret", "value": list(secrets)}));
        }
        match &self.registration {
            Some(Some(reference)) => operations
                .push(json!({"op": "add", "path": "/defaultPatientAccessPolicy", "value": {"reference": reference}})),
            Some(None) if actual.default_patient_access_policy.is_some() => {
                operations.push(json!({"op": "remove", "path": "/defaultPatientAccessPolicy"}))
            }
            _ => {}
        }
        Value::Array(operations)
    }
}

/// `actual` with the `desired` entries in place (matched by name), the `owned` ones no longer desired
/// left out when `remove` says so, and every other entry kept as it is; `None` when nothing changes.
/// An entry the operator did not write is never overwritten: one of a desired name holding another
/// value goes to `conflicts` (one holding the desired value is taken over: writing it destroys nothing).
fn merge(
    actual: &[NamedEntry],
    desired: &[NamedEntry],
    owned: &[String],
    remove: bool,
    what: &str,
    changed: &mut Vec<String>,
    conflicts: &mut Vec<String>,
) -> Option<Vec<NamedEntry>> {
    let before = changed.len();
    let mut merged = Vec::new();
    for entry in actual {
        match desired.iter().find(|d| d.name == entry.name) {
            Some(wanted) => {
                if wanted.value() != entry.value() {
                    if !owned.contains(&entry.name) {
                        conflicts.push(format!("{what} {}", entry.name));
                    }
                    changed.push(format!("{what} {}", entry.name));
                }
                merged.push(wanted.clone());
            }
            None if remove && owned.contains(&entry.name) => changed.push(format!("{what} {} removed", entry.name)),
            None => merged.push(entry.clone()),
        }
    }
    for wanted in desired.iter().filter(|d| !actual.iter().any(|a| a.name == d.name)) {
        changed.push(format!("{what} {} added", wanted.name));
        merged.push(wanted.clone());
    }
    (changed.len() > before).then_some(merged)
}

/// What to change in `actual` for `desired`. `remove`: entries the operator wrote that the spec no
/// longer lists go (deletion policy `Delete`).
pub fn plan(actual: &ProjectResource, desired: &Desired, owned: &Owned, remove: bool) -> ProjectChange {
    let (mut changed, mut conflicts) = (Vec::new(), Vec::new());
    let sites = merge(&actual.site, &desired.sites, owned.sites, remove, "site", &mut changed, &mut conflicts);
    let secrets =
        merge(&actual.secret, &desired.secrets, owned.secrets, remove, "secret", &mut changed, &mut conflicts);
    let current = actual.default_patient_access_policy.as_ref().map(|r| r.reference.clone());
    let registration = desired.registration.clone().filter(|wanted| *wanted != current);
    if registration.is_some() {
        changed.push("defaultPatientAccessPolicy".into());
    }
    ProjectChange { sites, secrets, registration, changed, conflicts }
}

/// A project secret's entry: its value as the FHIR type the spec names.
fn secret_entry(name: &str, kind: ProjectSecretType, value: &SecretString) -> Option<NamedEntry> {
    let text = value.expose_secret().trim();
    let value = match kind {
        ProjectSecretType::String => json!({"name": name, "valueString": value.expose_secret()}),
        ProjectSecretType::Integer => json!({"name": name, "valueInteger": text.parse::<i64>().ok()?}),
        ProjectSecretType::Boolean => json!({"name": name, "valueBoolean": text.parse::<bool>().ok()?}),
    };
    Some(NamedEntry::new(&value))
}

/// The spec, with the values of its Secrets and the id of its registration policy.
async fn desired(ctx: &Context, project: &MedplumProject) -> Result<Desired, ResourceError> {
    let namespace = project.namespace().unwrap_or_default();
    let spec = &project.spec;
    let registration = match &spec.patient_registration {
        None => None,
        Some(r) => match (&r.access_policy_ref, r.open) {
            (Some(policy), true) => {
                let grant = AccessGrant { policy_ref: policy.clone(), parameters: Vec::new() };
                let access = resolve_grants(ctx, &namespace, &spec.connection_ref, &[grant]).await?;
                Some(access.into_iter().next().map(|a| a.policy.reference))
            }
            _ => Some(None),
        },
    };
    let mut sites = Vec::new();
    for site in &spec.sites {
        let mut value = json!({"name": site.name});
        if !site.domains.is_empty() {
            value["domain"] = json!(site.domains);
        }
        if let Some(key) = &site.recaptcha_site_key {
            value["recaptchaSiteKey"] = json!(key);
        }
        if let Some(r) = &site.recaptcha_secret_key_ref {
            let secret = read_secret_string(&ctx.client, &namespace, &r.name, &r.key).await?;
            value["recaptchaSecretKey"] = json!(secret.expose_secret());
        }
        sites.push(NamedEntry::new(&value));
    }
    let mut secrets = Vec::new();
    for s in &spec.secrets {
        let r = &s.secret_key_ref;
        let value = read_secret_string(&ctx.client, &namespace, &r.name, &r.key).await?;
        let entry = secret_entry(&s.name, s.r#type, &value).ok_or_else(|| ResourceError::InvalidSecretValue {
            name: s.name.clone(),
            secret: r.name.clone(),
            key: r.key.clone(),
            kind: if s.r#type == ProjectSecretType::Integer { "an integer" } else { "true or false" },
        })?;
        secrets.push(entry);
    }
    Ok(Desired { registration, sites, secrets })
}

fn claim_of(project: &MedplumProject) -> Claim {
    Claim {
        uid: project.uid().unwrap_or_default(),
        created: project.metadata.creation_timestamp.clone(),
        name: format!("{}/{}", project.namespace().unwrap_or_default(), project.name_any()),
    }
}

fn claim_key(usable: &UsableConnection) -> String {
    format!("{} {}", usable.client.base_url(), usable.project_id)
}

async fn read_project(usable: &UsableConnection) -> Result<ProjectResource, MedplumError> {
    let reference = format!("Project/{}", usable.project_id);
    usable.client.read_reference::<ProjectResource>(&reference).await?.ok_or(MedplumError::NotFound)
}

/// Writes `change` over `actual`, only if Medplum's project is still that version.
async fn write(
    usable: &UsableConnection,
    actual: &ProjectResource,
    change: &ProjectChange,
) -> Result<(), MedplumError> {
    let reference = format!("Project/{}", usable.project_id);
    let version = actual.meta.version_id.as_deref().unwrap_or_default();
    usable.client.patch_reference::<serde::de::IgnoredAny>(&reference, &change.operations(actual), version).await?;
    Ok(())
}

/// Makes Medplum's project hold what `project` says. `status` takes in what the operator owns, recorded
/// before each write (a crash after the write still knows what it wrote).
async fn converge(
    ctx: &Context,
    project: &MedplumProject,
    status: &mut MedplumProjectStatus,
    events: &mut Vec<Event>,
) -> Result<(), ResourceError> {
    let namespace = project.namespace().unwrap_or_default();
    let usable = usable_connection(ctx, &namespace, &project.spec.connection_ref).await?;
    tenancy::project_settings(&usable.limits)?;
    ctx.project_claims.claim(&claim_key(&usable), claim_of(project)).map_err(ResourceError::ProjectAlreadyDeclared)?;
    status.project_id = Some(usable.project_id.clone());
    let desired = desired(ctx, project).await?;
    let actual = read_project(&usable).await?;
    let owned = (status.sites.clone(), status.secrets.clone());
    let remove = project.spec.deletion_policy == ProjectDeletionPolicy::Delete;
    let change = plan(&actual, &desired, &Owned { sites: &owned.0, secrets: &owned.1 }, remove);
    if !change.conflicts.is_empty() {
        return Err(ResourceError::ProjectEntryConflict(change.conflicts));
    }
    let names = |entries: &[NamedEntry]| entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
    if !change.is_empty() {
        let mut intent = status.clone();
        for (list, wanted) in
            [(&mut intent.sites, names(&desired.sites)), (&mut intent.secrets, names(&desired.secrets))]
        {
            list.extend(wanted.into_iter().filter(|n| !list.contains(n)).collect::<Vec<_>>());
        }
        if change.registration.is_some() && intent.original_registration.is_none() {
            let current = actual.default_patient_access_policy.as_ref().map(|r| r.reference.clone());
            intent.original_registration = Some(OriginalRegistration { default_patient_access_policy: current });
        }
        let api: Api<MedplumProject> = Api::namespaced(ctx.client.clone(), &namespace);
        apply_status(&api, &project.name_any(), Some(&*status), &intent).await?;
        *status = intent;
        write(&usable, &actual, &change).await?;
        let target = format!("Project/{}", usable.project_id);
        let observed = project.status.as_ref().and_then(|s| s.observed_generation);
        events.push(super::update_event(observed, project.metadata.generation, &target, &change.changed.join(", ")));
    }
    status.sites = names(&desired.sites);
    status.secrets = names(&desired.secrets);
    Ok(())
}

async fn apply(project: &MedplumProject, ctx: &Context) -> Result<Action, Error> {
    let api: Api<MedplumProject> = Api::namespaced(ctx.client.clone(), &project.namespace().unwrap_or_default());
    let mut status = project.status.clone().unwrap_or_default();
    let mut events = Vec::new();
    let result = converge(ctx, project, &mut status, &mut events).await;
    let ready = match &result {
        Ok(()) => ConditionState::new(READY, true, "Ready", "Medplum's project holds the declared settings"),
        Err(e) => ConditionState::not_ready(e),
    };
    status.conditions = set_condition(&status.conditions, ready, project.metadata.generation, Timestamp::now());
    status.observed_generation = project.metadata.generation;
    apply_status(&api, &project.name_any(), project.status.as_ref(), &status).await.map_err(Error::Status)?;
    let before = project.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.report_ready(KIND, project, before, &status.conditions).await;
    for e in &events {
        ctx.publish(&project.object_ref(&()), e).await;
    }
    match result {
        Ok(()) => {
            ctx.succeeded(KIND, project);
            Ok(Action::await_change())
        }
        Err(e) => Ok(ctx.retry(KIND, project, &e)),
    }
}

/// Deletion: with `Delete`, the sites and secrets the operator wrote go and registration gets back the
/// setting it had before; with `Orphan`, Medplum keeps everything.
async fn cleanup(project: &MedplumProject, ctx: &Context) -> Result<Action, Error> {
    ctx.project_claims.release(&project.uid().unwrap_or_default());
    let status = project.status.clone().unwrap_or_default();
    let declared_here = status.project_id.is_some();
    if project.spec.deletion_policy == ProjectDeletionPolicy::Orphan || !declared_here {
        return Ok(Action::await_change());
    }
    let usable = match cleanup_via(ctx, project).await? {
        CleanupVia::Connection(usable) => usable,
        CleanupVia::Released => return Ok(Action::await_change()),
    };
    let outcome: Result<Vec<String>, MedplumError> = async {
        let actual = read_project(&usable).await?;
        let desired = Desired {
            registration: status.original_registration.as_ref().map(|o| o.default_patient_access_policy.clone()),
            ..Default::default()
        };
        let change = plan(&actual, &desired, &Owned { sites: &status.sites, secrets: &status.secrets }, true);
        if !change.is_empty() {
            write(&usable, &actual, &change).await?;
        }
        Ok(change.changed)
    }
    .await;
    let changed = outcome.map_err(|e| Error::Cleanup(e.to_string()))?;
    if !changed.is_empty() {
        let note = format!("gave Project/{} back: {}", usable.project_id, changed.join(", "));
        ctx.publish(&project.object_ref(&()), &event(EventType::Normal, "Deleted", "Delete", note)).await;
    }
    let namespace = project.namespace().unwrap_or_default();
    ctx.metrics.set_object_ready(KIND, &namespace, &project.name_any(), None);
    Ok(Action::await_change())
}

/// The MedplumProjects of `store` that read `secret`.
fn reading(
    store: &Store<Cached<MedplumProject>>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<Cached<MedplumProject>>> {
    let (namespace, name) = (secret.namespace(), secret.name_any());
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == namespace)
        .filter(|p| {
            let p = p.resource();
            let sites = p.spec.sites.iter().filter_map(|s| s.recaptcha_secret_key_ref.as_ref());
            sites.chain(p.spec.secrets.iter().map(|s| &s.secret_key_ref)).any(|r| r.name == name)
        })
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// The controller for one scope (`namespace` None: all), and a future that resolves once its cache is
/// filled. A change of a labelled Secret it reads ([`SOURCE_LABEL`]) reconciles it at once.
pub fn controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
) -> (ReconcileStream, impl Future<Output = ()> + Send + 'static) {
    let controller =
        super::new_controller::<MedplumProject>(&ctx, namespace, ctx.settings.connection_concurrency, |_| {});
    let store = controller.store();
    let ready = super::cache_synced(store.clone());
    let controller = super::watch_connections(super::on_policy_changes(controller, &ctx), &ctx, namespace);
    let secrets = super::scoped::<PartialObjectMeta<Secret>>(&ctx.client, namespace);
    let controller = controller
        .watches(secrets, watcher::Config::default().labels(SOURCE_LABEL), move |secret| reading(&store, &secret));
    let reconcile = |obj, ctx| super::reconcile_with_cleanup(obj, ctx, apply, cleanup);
    (super::drive(controller, KIND, ctx, reconcile), ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::medplum::Ref;

    fn entry(value: Value) -> NamedEntry {
        NamedEntry::new(&value)
    }

    fn project(sites: Vec<Value>, secrets: Vec<Value>, registration: Option<&str>) -> ProjectResource {
        ProjectResource {
            site: sites.into_iter().map(entry).collect(),
            secret: secrets.into_iter().map(entry).collect(),
            default_patient_access_policy: registration.map(Ref::to),
            ..Default::default()
        }
    }

    #[test]
    fn own_entries_follow_the_spec_and_others_stay_as_they_are() {
        let actual = project(
            vec![],
            vec![
                json!({"name": "BY_HAND", "valueDecimal": 1.5, "extension": [{"url": "x"}]}),
                json!({"name": "SMTP_PASSWORD", "valueString": "old"}),
                json!({"name": "GONE", "valueString": "g"}),
            ],
            None,
        );
        let desired = Desired {
            secrets: vec![
                entry(json!({"name": "SMTP_PASSWORD", "valueString": "new"})),
                entry(json!({"name": "smtpPort", "valueInteger": 587})),
            ],
            ..Default::default()
        };
        let owned = vec!["SMTP_PASSWORD".to_string(), "GONE".to_string()];
        let change = plan(&actual, &desired, &Owned { sites: &[], secrets: &owned }, true);
        assert_eq!(change.changed, ["secret SMTP_PASSWORD", "secret GONE removed", "secret smtpPort added"]);
        assert!(change.sites.is_none() && change.registration.is_none());
        let operations = change.operations(&actual);
        assert_eq!(
            operations,
            json!([{"op": "add", "path": "/secret", "value": [
                {"name": "BY_HAND", "valueDecimal": 1.5, "extension": [{"url": "x"}]},
                {"name": "SMTP_PASSWORD", "valueString": "new"},
                {"name": "smtpPort", "valueInteger": 587}]}])
        );
        // Orphan: what the spec no longer lists stays.
        let kept = plan(&actual, &desired, &Owned { sites: &[], secrets: &owned }, false);
        assert_eq!(kept.changed, ["secret SMTP_PASSWORD", "secret smtpPort added"]);
        assert!(change.conflicts.is_empty() && kept.conflicts.is_empty());
    }

    #[test]
    fn an_entry_made_by_hand_is_taken_over_only_when_it_holds_the_declared_value() {
        let actual = project(
            vec![json!({"name": "portal", "recaptchaSiteKey": "theirs"})],
            vec![json!({"name": "SAME", "valueString": "v"}), json!({"name": "OTHER", "valueString": "theirs"})],
            None,
        );
        let desired = Desired {
            sites: vec![entry(json!({"name": "portal", "recaptchaSiteKey": "ours"}))],
            secrets: vec![
                entry(json!({"name": "SAME", "valueString": "v"})),
                entry(json!({"name": "OTHER", "valueString": "ours"})),
            ],
            ..Default::default()
        };
        let change = plan(&actual, &desired, &Owned::default(), true);
        assert_eq!(change.conflicts, ["site portal", "secret OTHER"]);
        let owned = (vec!["portal".to_string()], vec!["OTHER".to_string()]);
        let ours = plan(&actual, &desired, &Owned { sites: &owned.0, secrets: &owned.1 }, true);
        assert!(ours.conflicts.is_empty(), "entries it wrote are its own to change: {:?}", ours.conflicts);
    }

    #[test]
    fn nothing_changes_when_medplum_holds_the_spec() {
        let actual = project(
            vec![
                json!({"name": "portal", "domain": ["portal.example.org"], "recaptchaSiteKey": "k", "recaptchaSecretKey": "s"}),
            ],
            vec![json!({"valueString": "v", "name": "A"})],
            Some("AccessPolicy/p1"),
        );
        let desired = Desired {
            registration: Some(Some("AccessPolicy/p1".into())),
            sites: vec![entry(
                json!({"name": "portal", "recaptchaSiteKey": "k", "recaptchaSecretKey": "s", "domain": ["portal.example.org"]}),
            )],
            secrets: vec![entry(json!({"name": "A", "valueString": "v"}))],
        };
        let owned = (vec!["portal".to_string()], vec!["A".to_string()]);
        assert!(plan(&actual, &desired, &Owned { sites: &owned.0, secrets: &owned.1 }, true).is_empty());
    }

    #[test]
    fn registration_opens_closes_or_is_left_alone() {
        let open = project(vec![], vec![], Some("AccessPolicy/default"));
        let mut desired = Desired { registration: Some(Some("AccessPolicy/p1".into())), ..Default::default() };
        let change = plan(&open, &desired, &Owned::default(), true);
        assert_eq!(change.changed, ["defaultPatientAccessPolicy"]);
        assert_eq!(
            change.operations(&open),
            json!([{"op": "add", "path": "/defaultPatientAccessPolicy", "value": {"reference": "AccessPolicy/p1"}}])
        );
        desired.registration = Some(None);
        let closed = plan(&open, &desired, &Owned::default(), true);
        assert_eq!(closed.operations(&open), json!([{"op": "remove", "path": "/defaultPatientAccessPolicy"}]));
        let already_closed = project(vec![], vec![], None);
        assert!(plan(&already_closed, &desired, &Owned::default(), true).is_empty());
        desired.registration = None;
        assert!(plan(&open, &desired, &Owned::default(), true).is_empty());
    }

    #[test]
    fn values_take_the_declared_type_and_debug_shows_none() {
        let port = secret_entry("smtpPort", ProjectSecretType::Integer, &SecretString::from(" 587\n")).unwrap();
        assert_eq!(port.value(), json!({"name": "smtpPort", "valueInteger": 587}));
        assert!(secret_entry("smtpPort", ProjectSecretType::Integer, &SecretString::from("x")).is_none());
        let secure = secret_entry("smtpSecure", ProjectSecretType::Boolean, &SecretString::from("true")).unwrap();
        assert_eq!(secure.value(), json!({"name": "smtpSecure", "valueBoolean": true}));
        let password =
            secret_entry("SMTP_PASSWORD", ProjectSecretType::String, &SecretString::from("hunter2")).unwrap();
        assert!(!format!("{password:?}").contains("hunter2"));
        assert!(!format!("{:?}", project(vec![], vec![password.value()], None)).contains("hunter2"));
    }

    #[test]
    fn the_oldest_declaration_of_a_project_holds_it() {
        let claims = ProjectClaims::default();
        let at = |s: i64| Some(Time(Timestamp::from_second(s).unwrap()));
        let older = Claim { uid: "a".into(), created: at(10), name: "team-a/project".into() };
        let newer = Claim { uid: "b".into(), created: at(20), name: "team-b/project".into() };
        assert_eq!(claims.claim("p", newer.clone()), Ok(()));
        assert_eq!(claims.claim("p", older.clone()), Ok(()));
        assert_eq!(claims.claim("p", newer.clone()), Err("team-a/project".into()));
        assert_eq!(claims.claim("p", older.clone()), Ok(()));
        claims.release("a");
        assert_eq!(claims.claim("p", newer), Ok(()));
    }
}
