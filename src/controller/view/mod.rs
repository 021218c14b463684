//! What the operator knows of the Medplum objects it manages through one connection.
//!
//! Reconciles read Medplum only when something may have changed there. The view holds the last
//! version the operator saw of each object it manages (clients, memberships, policies), keyed by the
//! code of its ownership tag or identifier (`<Kind>/<namespace>/<name>`). It is kept current by the
//! operator's own reads and writes, by a sweep of every managed object every resync interval (one
//! paged search per type, which also finds objects deleted in Medplum), and in between by what
//! changed in the project (see [`super::changes`]). Each object found changed or gone triggers a
//! reconcile of the resource that owns it, which puts back what a console edit changed. The view
//! answers "unknown" (ask Medplum) before its first sweep, for an object whose last write may or may
//! not have happened, and when sweeps failed for longer than it can vouch for.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::packed::Packed;

use crate::medplum::{
    AccessPolicyResource, ClientApplicationResource, FhirResource, MedplumClient, MedplumError, MembershipResource,
};

/// What the view says of one object.
#[derive(Debug)]
pub enum Seen<T> {
    /// Its last version known to the operator.
    Known(T),
    /// A sweep found no such object and none was made since.
    Absent,
    /// The view cannot say: ask Medplum.
    Unknown,
}

/// An object the operator manages, with the codes of its owners.
pub trait Owned: FhirResource + DeserializeOwned + Clone + Send + 'static {
    /// The search parameter that finds every object of a system: `_tag` or `identifier`.
    const BY_SYSTEM: &'static str;
    /// The codes under the operator's `system` (tags, or identifiers for memberships).
    fn codes(&self, system: &str) -> Vec<String>;
    fn table(view: &MedplumView) -> &Mutex<Table<Self>>;
    /// What the objects of this type in one project share, as JSON: the dictionary their view packs
    /// them with (never anything secret: the dictionary is not wiped).
    fn skeleton(system: &str, project_id: &str) -> serde_json::Value;
}

impl Owned for ClientApplicationResource {
    const BY_SYSTEM: &'static str = "_tag";
    fn codes(&self, system: &str) -> Vec<String> {
        self.meta.tag.iter().filter(|t| t.system == system).map(|t| t.code.clone()).collect()
    }
    fn table(view: &MedplumView) -> &Mutex<Table<Self>> {
        &view.clients
    }
    fn skeleton(system: &str, _project_id: &str) -> serde_json::Value {
        let tag = |system: String| json!({"system": system, "code": "ClientApplication/"});
        json!({"resourceType": "ClientApplication", "meta": {"tag": [tag(system.into()), tag(format!("{system}:adopted"))]},
               "status": "active", "name": "", "description": "", "redirectUris": ["https://"], "launchUri": "https://",
               "accessTokenLifetime": "", "refreshTokenLifetime": "", "pkceOptional": true})
    }
}

impl Owned for AccessPolicyResource {
    const BY_SYSTEM: &'static str = "_tag";
    fn codes(&self, system: &str) -> Vec<String> {
        self.meta.tag.iter().filter(|t| t.system == system).map(|t| t.code.clone()).collect()
    }
    fn table(view: &MedplumView) -> &Mutex<Table<Self>> {
        &view.policies
    }
    fn skeleton(system: &str, _project_id: &str) -> serde_json::Value {
        json!({"resourceType": "AccessPolicy", "meta": {"tag": [{"system": system, "code": "AccessPolicy/"}]}, "name": "",
               "resource": [{"resourceType": "Patient", "criteria": "", "readonly": true, "hiddenFields": [], "readonlyFields": []}],
               "ipAccessRule": [{"name": "", "value": "", "action": "allow"}]})
    }
}

impl Owned for MembershipResource {
    const BY_SYSTEM: &'static str = "identifier";
    fn codes(&self, system: &str) -> Vec<String> {
        self.identifier.iter().filter(|i| i.system == system).map(|i| i.value.clone()).collect()
    }
    fn table(view: &MedplumView) -> &Mutex<Table<Self>> {
        &view.memberships
    }
    fn skeleton(system: &str, project_id: &str) -> serde_json::Value {
        json!({"resourceType": "ProjectMembership", "project": {"reference": format!("Project/{project_id}")},
               "user": {"reference": "ClientApplication/"}, "profile": {"reference": "ClientApplication/"},
               "access": [{"policy": {"reference": "AccessPolicy/"}, "parameter": [{"name": "", "valueString": ""}]}],
               "identifier": [{"system": system, "value": "ClientApplication/"}, {"system": system, "value": "ProjectUser/"}],
               "others": [{"reference": "User/"}, {"reference": "Practitioner/"}, {"reference": "Patient/"}],
               "admin": false, "active": true})
    }
}

/// One object as the view keeps it: its [`Packed`] JSON, wiped when dropped (a client's holds its
/// secret), beside what the view compares without reading it. Typed, an object took about three
/// times the memory of its JSON (an allocation per string, a slot per field it lacks).
struct Entry {
    json: Packed,
    id: Option<Box<str>>,
    version: Option<Box<str>>,
    last_updated: Option<Box<str>>,
    /// When the operator recorded it: a sweep that started later and did not find it means it is gone.
    recorded: Instant,
}

impl Entry {
    fn of<T: Owned>(resource: &T, recorded: Instant, dictionary: &[u8]) -> Self {
        let json = SecretString::from(serde_json::to_string(resource).expect("Medplum resources serialize"));
        let meta = resource.meta();
        Self {
            json: Packed::pack(json.expose_secret(), dictionary),
            id: resource.id().map(Box::from),
            version: meta.version_id.as_deref().map(Box::from),
            last_updated: meta.last_updated.as_deref().map(Box::from),
            recorded,
        }
    }

    fn resource<T: Owned>(&self, dictionary: &[u8]) -> T {
        let json = self.json.unpack(dictionary);
        let mut resource: T = serde_json::from_str(json.expose_secret()).expect("the view reads back what it wrote");
        // Not serialized (the operator never sends them); kept beside the JSON.
        let meta = resource.meta_mut();
        meta.version_id = self.version.as_deref().map(str::to_string);
        meta.last_updated = self.last_updated.as_deref().map(str::to_string);
        resource
    }
}

/// The known objects of one type.
pub struct Table<T> {
    entries: HashMap<Box<str>, Entry>,
    /// The code of each known object by its Medplum id, to recognise an object whose code was
    /// removed in Medplum.
    codes_by_id: HashMap<Box<str>, Box<str>>,
    /// Codes whose object may have changed in a way the view did not see (a write that failed
    /// midway), with when that happened: unknown until read again or swept after that.
    doubts: HashMap<String, Instant>,
    /// When the last complete sweep started.
    swept: Option<Instant>,
    /// The newest `meta.lastUpdated` (Medplum's clock) of the objects taken in.
    newest: Option<Box<str>>,
    /// What the entries are packed with ([`Owned::skeleton`]).
    dictionary: Box<[u8]>,
    kind: std::marker::PhantomData<T>,
}

impl<T: Owned> Table<T> {
    fn new(system: &str, project_id: &str) -> Self {
        Self {
            entries: HashMap::new(),
            codes_by_id: HashMap::new(),
            doubts: HashMap::new(),
            swept: None,
            newest: None,
            dictionary: T::skeleton(system, project_id).to_string().into_bytes().into(),
            kind: std::marker::PhantomData,
        }
    }

    fn seen(&self, code: &str, trust: Duration, now: Instant) -> Seen<T> {
        if self.doubts.contains_key(code) || self.swept.is_none_or(|s| now.duration_since(s) > trust) {
            return Seen::Unknown;
        }
        match self.entries.get(code) {
            Some(entry) => Seen::Known(entry.resource(&self.dictionary)),
            None => Seen::Absent,
        }
    }

    fn record(&mut self, system: &str, resource: &T, now: Instant) {
        for code in self.codes_of(system, resource) {
            self.doubts.remove(&code);
            self.insert(code, Entry::of(resource, now, &self.dictionary));
        }
    }

    /// The codes `resource` belongs to: its own, or, when someone removed them in Medplum, the one
    /// the view knew it by.
    fn codes_of(&self, system: &str, resource: &T) -> Vec<String> {
        let codes = resource.codes(system);
        if !codes.is_empty() {
            return codes;
        }
        resource.id().and_then(|id| self.codes_by_id.get(id)).map(|c| c.to_string()).into_iter().collect()
    }

    fn insert(&mut self, code: String, entry: Entry) {
        if let Some(id) = &entry.id {
            self.codes_by_id.insert(id.clone(), code.as_str().into());
        }
        if entry.last_updated > self.newest {
            self.newest.clone_from(&entry.last_updated);
        }
        self.entries.insert(code.into(), entry);
    }

    fn remove(&mut self, code: &str) {
        if let Some(entry) = self.entries.remove(code)
            && let Some(id) = entry.id
        {
            self.codes_by_id.remove(&id);
        }
    }

    /// The newest `meta.lastUpdated` (Medplum's clock) of the objects taken in.
    fn newest(&self) -> Option<&str> {
        self.newest.as_deref()
    }

    /// Takes in what a search found (as of `recorded`: when the search started), adding the codes
    /// found to `present` (a sweep's). Returns the codes of objects that changed, once a first
    /// sweep filled the table (before that, everything is new).
    fn take_in(
        &mut self,
        system: &str,
        found: Vec<T>,
        recorded: Instant,
        mut present: Option<&mut HashSet<String>>,
    ) -> Vec<String> {
        let filled = self.swept.is_some();
        let mut changed = Vec::new();
        for resource in found {
            for code in self.codes_of(system, &resource) {
                if let Some(present) = present.as_deref_mut() {
                    present.insert(code.clone());
                }
                let (version, updated) =
                    (resource.meta().version_id.as_deref(), resource.meta().last_updated.as_deref());
                let held = self.entries.get(code.as_str());
                let same = held.is_some_and(|e| e.version.as_deref() == version);
                // A search that started before one of our writes can return the version that write
                // replaced; taking it would undo what the view knows (a rotation seen as not pushed
                // yet puts the previous secret back into the Secret). One object's versions are
                // stamped in order, so an older stamp is an older version.
                let older = held.is_some_and(|e| e.last_updated.as_deref() > updated);
                if !same && !older {
                    if filled {
                        changed.push(code.clone());
                    }
                    self.insert(code, Entry::of(&resource, recorded, &self.dictionary));
                }
            }
        }
        changed
    }

    /// Ends a complete sweep that started at `started` and found `present`: drops what it did not
    /// find among the objects recorded before it started, and settles doubts raised before it.
    /// Returns the codes of the objects that went (none on a first sweep).
    fn end_sweep(&mut self, present: &HashSet<String>, started: Instant) -> Vec<String> {
        let filled = self.swept.is_some();
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(code, e)| !present.contains(&***code) && e.recorded < started)
            .map(|(code, _)| code.to_string())
            .collect();
        for code in &gone {
            self.remove(code);
        }
        self.doubts.retain(|_, raised| *raised >= started);
        self.swept = Some(started);
        if filled { gone } else { Vec::new() }
    }
}

/// Whether the first sweep of a view is still to come, done, or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Pending,
    Done,
    Failed,
}

/// Reconciles wait at most this long for a view's first sweep; after that they read Medplum.
const FIRST_SWEEP_WAIT: Duration = Duration::from_secs(30);

/// The view of one connection's project.
pub struct MedplumView {
    /// The operator's ownership system, `urn:medplum-operator:<cluster id>`.
    system: String,
    project_id: String,
    /// How long after a sweep the view vouches for what it holds.
    trust: Duration,
    clients: Mutex<Table<ClientApplicationResource>>,
    memberships: Mutex<Table<MembershipResource>>,
    policies: Mutex<Table<AccessPolicyResource>>,
    fill: tokio::sync::watch::Sender<Fill>,
}

fn locked<T>(table: &Mutex<Table<T>>) -> std::sync::MutexGuard<'_, Table<T>> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

impl MedplumView {
    pub fn new(system: String, project_id: String, trust: Duration) -> Self {
        Self {
            clients: Mutex::new(Table::new(&system, &project_id)),
            memberships: Mutex::new(Table::new(&system, &project_id)),
            policies: Mutex::new(Table::new(&system, &project_id)),
            system,
            project_id,
            trust,
            fill: tokio::sync::watch::channel(Fill::Pending).0,
        }
    }

    pub fn system(&self) -> &str {
        &self.system
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// What the view knows of the object owned by `code`. Before the first sweep of the project
    /// ended, waits for it (a backlog of reconciles then costs one search per type, not one per
    /// object).
    pub async fn seen<T: Owned>(&self, code: &str) -> Seen<T> {
        let mut fill = self.fill.subscribe();
        let _ = tokio::time::timeout(FIRST_SWEEP_WAIT, fill.wait_for(|f| *f != Fill::Pending)).await;
        locked(T::table(self)).seen(code, self.trust, Instant::now())
    }

    /// Whether the view is sure that no object of `code` exists (now, without waiting).
    pub fn vouches_absent<T: Owned>(&self, code: &str) -> bool {
        matches!(locked(T::table(self)).seen(code, self.trust, Instant::now()), Seen::Absent)
    }

    /// Records a version of an object the operator just read or wrote.
    pub fn record<T: Owned>(&self, resource: &T) {
        locked(T::table(self)).record(&self.system, resource, Instant::now());
    }

    /// Forgets an object the operator deleted.
    pub fn forget<T: Owned>(&self, code: &str) {
        locked(T::table(self)).remove(code);
    }

    /// Marks an object as unknown until it is read again: a write to it may or may not have
    /// happened, or happened on a version the view did not hold.
    pub fn doubt<T: Owned>(&self, code: &str) {
        locked(T::table(self)).doubts.insert(code.to_string(), Instant::now());
    }

    /// Searches every managed object of each type; returns the codes of those that changed or went.
    pub async fn sweep(&self, medplum: &MedplumClient) -> Result<Vec<String>, MedplumError> {
        let result = async {
            let mut changed = self.sweep_type::<ClientApplicationResource>(medplum).await?;
            changed.extend(self.sweep_type::<MembershipResource>(medplum).await?);
            changed.extend(self.sweep_type::<AccessPolicyResource>(medplum).await?);
            Ok(changed)
        }
        .await;
        let fill = if result.is_ok() { Fill::Done } else { Fill::Failed };
        self.fill.send_if_modified(|f| {
            let first = *f == Fill::Pending || (*f == Fill::Failed && fill == Fill::Done);
            if first {
                *f = fill;
            }
            first
        });
        result
    }

    async fn sweep_type<T: Owned>(&self, medplum: &MedplumClient) -> Result<Vec<String>, MedplumError> {
        let started = Instant::now();
        let system = format!("{}|", self.system);
        let params = [(T::BY_SYSTEM, system.as_str()), ("_project", self.project_id.as_str())];
        let (mut present, mut changed) = (HashSet::new(), Vec::new());
        medplum
            .search_pages::<T>(&params, |page| {
                changed.extend(locked(T::table(self)).take_in(&self.system, page, started, Some(&mut present)));
            })
            .await?;
        changed.extend(locked(T::table(self)).end_sweep(&present, started));
        Ok(changed)
    }

    /// Takes in objects found changed (of any of the three types); returns the codes of those that
    /// differ from what the view held.
    pub fn merge_changes(&self, found: Vec<serde_json::Value>) -> Vec<String> {
        fn of<T: Owned>(view: &MedplumView, found: &[serde_json::Value]) -> Vec<String> {
            let typed: Vec<T> = found
                .iter()
                .filter(|r| r["resourceType"] == T::TYPE)
                .filter_map(|r| serde_json::from_value(r.clone()).ok())
                .collect();
            if typed.is_empty() {
                return Vec::new();
            }
            locked(T::table(view)).take_in(&view.system, typed, Instant::now(), None)
        }
        let mut changed = of::<ClientApplicationResource>(self, &found);
        changed.extend(of::<MembershipResource>(self, &found));
        changed.extend(of::<AccessPolicyResource>(self, &found));
        changed
    }

    /// The newest `meta.lastUpdated` among the objects the view holds, where a search for changes
    /// starts (none: there is nothing that could have drifted).
    fn newest(&self) -> Option<String> {
        let newest = [
            locked(&self.clients).newest().map(str::to_string),
            locked(&self.memberships).newest().map(str::to_string),
            locked(&self.policies).newest().map(str::to_string),
        ];
        newest.into_iter().flatten().max()
    }

    /// Searches the project for what changed since shortly before the newest version the view
    /// holds (one system-level search over the three types, whatever their tags: a console edit may
    /// have removed them); returns the codes of the managed objects that changed.
    pub async fn changes(&self, medplum: &MedplumClient) -> Result<Vec<String>, MedplumError> {
        let Some(newest) = self.newest() else { return Ok(Vec::new()) };
        let since = jiff::Timestamp::from_str(&newest)
            .ok()
            .and_then(|t| t.checked_sub(CHANGE_OVERLAP).ok())
            .map(|t| format!("ge{}", t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")))
            .unwrap_or_else(|| format!("ge{newest}"));
        let params = [("_project", self.project_id.as_str()), ("_lastUpdated", since.as_str())];
        let found = medplum.search_types(&TYPES, &params).await?;
        Ok(self.merge_changes(found))
    }
}

/// Medplum stamps `lastUpdated` before its transaction commits, so commits can land out of that
/// order: a search for changes looks this far behind the newest version seen.
const CHANGE_OVERLAP: jiff::SignedDuration = jiff::SignedDuration::from_secs(2);

/// Keeps `view` current until aborted: a sweep every `resync`, and in between, every `poll` (zero:
/// never), a search for what changed. The owners of what changed or went go to `changed`.
pub async fn keep_current(
    view: std::sync::Arc<MedplumView>,
    medplum: std::sync::Arc<MedplumClient>,
    changed: tokio::sync::broadcast::Sender<Owner>,
    resync: Duration,
    poll: Duration,
) {
    let tell = |codes: Vec<String>| {
        for owner in codes.iter().filter_map(|c| Owner::of(c)) {
            let _ = changed.send(owner);
        }
    };
    loop {
        let started = Instant::now();
        match view.sweep(&medplum).await {
            Ok(codes) => tell(codes),
            Err(e) => {
                tracing::warn!(error = %e, "sweeping the managed objects in Medplum failed; reconciles read Medplum meanwhile")
            }
        }
        while !poll.is_zero() && started.elapsed() + poll < resync {
            tokio::time::sleep(poll).await;
            match view.changes(&medplum).await {
                Ok(codes) => tell(codes),
                Err(e) => tracing::debug!(error = %e, "looking for changes in Medplum failed"),
            }
        }
        tokio::time::sleep(resync.saturating_sub(started.elapsed())).await;
    }
}

/// The types a view holds, for searches that look at all of them at once.
pub const TYPES: [&str; 3] = ["ClientApplication", "ProjectMembership", "AccessPolicy"];

/// The resource a code names: `<Kind>/<namespace>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Owner {
    pub fn of(code: &str) -> Option<Self> {
        let mut parts = code.splitn(3, '/');
        let (kind, namespace, name) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Self { kind: kind.into(), namespace: namespace.into(), name: name.into() })
    }
}

#[cfg(test)]
mod tests;
