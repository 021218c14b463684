//! What the operator would change in Medplum for resources: the same desired objects and drift
//! checks its controllers use, against what Medplum holds now. Read only; no secret value is
//! compared or printed (the Secret-held values, such as an identity provider's client secret, are
//! the controllers' to check).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use kube::ResourceExt;
use kube::api::Api;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{CommandError, Opened, open, recorded_policy_ids};
use crate::controller::access_policy::{desired_policy, policy_drift};
use crate::controller::adoption::adopted_identifier;
use crate::controller::client_application::{client_drift, client_membership_drift, desired_client};
use crate::controller::grants::membership_access;
use crate::controller::ownership_tag;
use crate::controller::project_user::{self, name_matches};
use crate::crd::{AccessGrant, AccessPolicy, AdoptSecret, ClientApplication, ConnectionRef, ProjectUser};
use crate::medplum::{
    AccessPolicyResource, ClientApplicationResource, Identifier, MedplumClient, MembershipAccess, MembershipResource,
    ProfileResource,
};

/// The resources to compare.
#[derive(Default)]
pub struct Resources {
    pub policies: Vec<AccessPolicy>,
    pub clients: Vec<ClientApplication>,
    pub users: Vec<ProjectUser>,
}

impl Resources {
    /// The resources of a YAML file, or of every `.yaml`/`.yml` file under a folder; objects of
    /// other kinds are ignored, and those without a namespace get `namespace`.
    pub fn from_path(path: &Path, namespace: &str) -> Result<Self, CommandError> {
        let mut resources = Self::default();
        let mut files = Vec::new();
        collect_files(path, &mut files).map_err(|e| input(path, e.to_string()))?;
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| input(&file, e.to_string()))?;
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value = Value::deserialize(document).map_err(|e| input(&file, e.to_string()))?;
                resources.take(value, namespace).map_err(|e| input(&file, e))?;
            }
        }
        Ok(resources)
    }

    fn take(&mut self, mut value: Value, namespace: &str) -> Result<(), String> {
        if value.get("apiVersion").and_then(Value::as_str) != Some("medplum.com/v1alpha1") {
            return Ok(());
        }
        if value.pointer("/metadata/namespace").is_none()
            && let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut)
        {
            metadata.insert("namespace".into(), json!(namespace));
        }
        fn typed<T: DeserializeOwned>(value: Value) -> Result<T, String> {
            serde_json::from_value(value).map_err(|e| e.to_string())
        }
        match value.get("kind").and_then(Value::as_str) {
            Some("AccessPolicy") => self.policies.push(typed(value)?),
            Some("ClientApplication") => self.clients.push(typed(value)?),
            Some("ProjectUser") => self.users.push(typed(value)?),
            _ => {}
        }
        Ok(())
    }

    /// The resources applied in `namespace`.
    pub async fn from_cluster(kube: &kube::Client, namespace: &str) -> Result<Self, CommandError> {
        let params = Default::default();
        Ok(Self {
            policies: Api::namespaced(kube.clone(), namespace).list(&params).await?.items,
            clients: Api::namespaced(kube.clone(), namespace).list(&params).await?.items,
            users: Api::namespaced(kube.clone(), namespace).list(&params).await?.items,
        })
    }
}

fn collect_files(path: &Path, files: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            collect_files(&entry?.path(), files)?;
        }
    } else if path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
        files.push(path.to_path_buf());
    }
    Ok(())
}

fn input(path: &Path, message: String) -> CommandError {
    CommandError::Input { path: path.display().to_string(), message }
}

/// What the operator would do for one resource.
pub struct Report {
    resource: String,
    lines: Vec<String>,
}

impl Report {
    fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self { resource: format!("{kind} {namespace}/{name}"), lines: Vec::new() }
    }

    fn line(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// A field Medplum holds differently, with both values (never a secret: callers pass only
    /// non-secret fields).
    fn field(&mut self, name: &str, medplum: &Value, declared: &Value) {
        self.lines.push(format!("  {name}: {} -> {}", compact(medplum), compact(declared)));
    }

    pub fn changes(&self) -> bool {
        !self.lines.is_empty()
    }
}

fn compact(value: &Value) -> String {
    if value.is_null() { "(none)".into() } else { value.to_string() }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lines.is_empty() {
            return writeln!(f, "{}: no change", self.resource);
        }
        writeln!(f, "{}:", self.resource)?;
        for line in &self.lines {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// The open connections, by reference.
struct Connections<'a> {
    kube: &'a kube::Client,
    namespace: &'a str,
    opened: HashMap<String, Opened>,
}

impl Connections<'_> {
    async fn get(&mut self, reference: &ConnectionRef) -> Result<&Opened, CommandError> {
        let key = format!("{:?}/{}", reference.kind, reference.name);
        if !self.opened.contains_key(&key) {
            let opened = open(self.kube, self.namespace, reference).await?;
            self.opened.insert(key.clone(), opened);
        }
        Ok(&self.opened[&key])
    }
}

/// A report for every resource: policies first (their ids resolve the others' grants).
pub async fn reports(
    kube: &kube::Client,
    namespace: &str,
    cluster_id: &str,
    resources: &Resources,
) -> Result<Vec<Report>, CommandError> {
    let mut connections = Connections { kube, namespace, opened: HashMap::new() };
    let mut policy_ids: HashMap<String, String> = recorded_policy_ids(kube, namespace).await?.into_iter().collect();
    let mut reports = Vec::new();
    for ap in &resources.policies {
        let opened = connections.get(&ap.spec.connection_ref).await?;
        let (report, id) = policy_report(&opened.verified.client, &opened.verified.project_id, cluster_id, ap).await?;
        if let Some(id) = id {
            policy_ids.insert(ap.name_any(), id);
        }
        reports.push(report);
    }
    for ca in &resources.clients {
        let opened = connections.get(&ca.spec.connection_ref).await?;
        reports.push(
            client_report(&opened.verified.client, &opened.verified.project_id, cluster_id, ca, &policy_ids).await?,
        );
    }
    for user in &resources.users {
        let opened = connections.get(&user.spec.connection_ref).await?;
        reports.push(
            user_report(&opened.verified.client, &opened.verified.project_id, cluster_id, user, &policy_ids).await?,
        );
    }
    Ok(reports)
}

/// The first object of type `T` in the project matching `params`.
async fn first<T: crate::medplum::FhirResource>(
    medplum: &MedplumClient,
    project_id: &str,
    params: &[(&str, &str)],
) -> Result<Option<T>, CommandError> {
    let mut params = params.to_vec();
    params.push(("_project", project_id));
    Ok(medplum.search::<T>(&params).await?.into_iter().next())
}

async fn policy_report(
    medplum: &MedplumClient,
    project_id: &str,
    cluster_id: &str,
    ap: &AccessPolicy,
) -> Result<(Report, Option<String>), CommandError> {
    let namespace = ap.namespace().unwrap_or_default();
    let mut report = Report::new("AccessPolicy", &namespace, &ap.name_any());
    let tag = ownership_tag(cluster_id, "AccessPolicy", &namespace, &ap.name_any());
    let desired = desired_policy(ap, &tag);
    let by_tag = format!("{}|{}", tag.system, tag.code);
    let mut actual = first::<AccessPolicyResource>(medplum, project_id, &[("_tag", &by_tag)]).await?;
    if actual.is_none()
        && let Some(adopt) = &ap.spec.adopt
    {
        actual = first(medplum, project_id, &[("_id", &adopt.policy_id)]).await?;
        match &actual {
            Some(_) => report.line(format!("adopt Medplum AccessPolicy/{} (tag it as managed)", adopt.policy_id)),
            None => report.line(format!("cannot adopt AccessPolicy/{}: not in the project", adopt.policy_id)),
        }
    }
    let Some(actual) = actual else {
        if ap.spec.adopt.is_none() {
            report.line(format!("create a Medplum AccessPolicy {:?}", desired.name.as_deref().unwrap_or_default()));
        }
        return Ok((report, None));
    };
    let id = actual.id.clone();
    let drift = policy_drift(&desired, &actual);
    if !drift.is_empty() {
        report.line(format!("update Medplum AccessPolicy/{}", id.as_deref().unwrap_or_default()));
    }
    let (medplum_json, declared_json) = (json!(actual), json!(desired));
    for field in drift.iter().filter(|f| **f != "meta.tag") {
        report.field(field, &medplum_json[field], &declared_json[field]);
    }
    Ok((report, id))
}

/// The membership access for grants, by the policy ids known; a policy without one is named.
fn access_of(grants: &[AccessGrant], policy_ids: &HashMap<String, String>) -> Result<Vec<MembershipAccess>, String> {
    let mut resolved = Vec::new();
    for grant in grants {
        let name = &grant.policy_ref.name;
        let id = policy_ids.get(name).ok_or_else(|| format!("AccessPolicy {name} does not exist in Medplum yet"))?;
        resolved.push((id.clone(), grant));
    }
    Ok(membership_access(&resolved))
}

async fn client_report(
    medplum: &MedplumClient,
    project_id: &str,
    cluster_id: &str,
    ca: &ClientApplication,
    policy_ids: &HashMap<String, String>,
) -> Result<Report, CommandError> {
    let namespace = ca.namespace().unwrap_or_default();
    let mut report = Report::new("ClientApplication", &namespace, &ca.name_any());
    let tag = ownership_tag(cluster_id, "ClientApplication", &namespace, &ca.name_any());
    let by_tag = format!("{}|{}", tag.system, tag.code);
    let mut actual = first::<ClientApplicationResource>(medplum, project_id, &[("_tag", &by_tag)]).await?;
    if actual.is_none()
        && let Some(adopt) = &ca.spec.adopt
    {
        actual = first(medplum, project_id, &[("_id", &adopt.client_id)]).await?;
        match (&actual, adopt.secret) {
            (Some(_), AdoptSecret::Rotate) => report.line(format!(
                "adopt Medplum ClientApplication/{} and rotate its secret (the current one keeps working for {})",
                adopt.client_id, ca.spec.rotation.grace_period
            )),
            (Some(_), AdoptSecret::Keep) => {
                report.line(format!("adopt Medplum ClientApplication/{} and keep its secret", adopt.client_id))
            }
            (None, _) => report.line(format!("cannot adopt ClientApplication/{}: not in the project", adopt.client_id)),
        }
    }
    let access = access_of(&ca.spec.access, policy_ids);
    let Some(actual) = actual else {
        if ca.spec.adopt.is_none() {
            report.line("create a Medplum ClientApplication and its membership, and write the Secret");
        }
        if let Err(missing) = &access {
            report.line(format!("  waits until {missing}"));
        }
        return Ok(report);
    };
    let id = actual.id.clone().unwrap_or_default();
    // The identity provider's client secret comes from a Secret: compared by the controller, not here.
    let idp_secret = actual.identity_provider.as_ref().and_then(|i| i.client_secret.clone());
    let desired = desired_client(ca, &tag, idp_secret);
    let drift = client_drift(&desired, &actual);
    if !drift.is_empty() {
        report.line(format!("update Medplum ClientApplication/{id}"));
    }
    for field in drift.iter().filter(|f| **f != "meta.tag") {
        let (was, will) = client_field(field, &actual, &desired);
        report.field(field, &was, &will);
    }
    let identifier = Identifier { system: tag.system.clone(), value: tag.code.clone() };
    let by_identifier = format!("{}|{}", identifier.system, identifier.value);
    let mut membership = first::<MembershipResource>(medplum, project_id, &[("identifier", &by_identifier)]).await?;
    if membership.is_none() {
        let user = format!("ClientApplication/{id}");
        membership = first(medplum, project_id, &[("user", &user)]).await?;
    }
    match (membership, access) {
        (_, Err(missing)) => report.line(format!("update its membership once {missing}")),
        (None, Ok(_)) => report.line("create its membership"),
        (Some(m), Ok(access)) => {
            let drift = client_membership_drift(&access, ca.spec.on_behalf_of, &identifier, &m);
            membership_lines(&mut report, &m, &drift, &access, ca.spec.on_behalf_of);
        }
    }
    Ok(report)
}

/// The two sides of one drifted ClientApplication field; the identity provider without its secret.
fn client_field(
    field: &str,
    actual: &ClientApplicationResource,
    desired: &ClientApplicationResource,
) -> (Value, Value) {
    let idp = |c: &ClientApplicationResource| {
        c.identity_provider.as_ref().map(|i| {
            json!({"authorizeUrl": i.authorize_url, "tokenUrl": i.token_url, "userInfoUrl": i.user_info_url,
                   "clientId": i.client_id, "tokenAuthMethod": i.token_auth_method, "usePkce": i.use_pkce,
                   "useSubject": i.use_subject})
        })
    };
    let value = |c: &ClientApplicationResource| match field {
        "status" => json!(c.status.as_deref().unwrap_or("active")),
        "name" => json!(c.name),
        "description" => json!(c.description),
        "accessTokenLifetime" => json!(c.access_token_lifetime),
        "refreshTokenLifetime" => json!(c.refresh_token_lifetime),
        "redirectUris" => json!(c.redirect_uris),
        "pkceOptional" => json!(c.pkce_optional),
        "jwksUri" => json!(c.jwks_uri),
        "launchUri" => json!(c.launch_uri),
        "allowedOrigin" => json!(c.allowed_origin),
        "defaultScope" => json!(c.default_scope),
        "identityProvider" => json!(idp(c)),
        _ => Value::Null,
    };
    (value(actual), value(desired))
}

fn membership_lines(
    report: &mut Report,
    m: &MembershipResource,
    drift: &[&str],
    access: &[MembershipAccess],
    admin: bool,
) {
    let drift: Vec<&&str> = drift.iter().filter(|f| **f != "identifier").collect();
    if drift.is_empty() {
        return;
    }
    report.line(format!("update its ProjectMembership/{}", m.id.as_deref().unwrap_or_default()));
    for field in drift {
        match *field {
            "access" => report.field("access", &json!(m.access), &json!(access)),
            "accessPolicy" => report.field("accessPolicy", &json!(m.access_policy), &Value::Null),
            "admin" => report.field("admin", &json!(m.admin.unwrap_or(false)), &json!(admin)),
            "active" => report.field("active", &json!(false), &json!(true)),
            other => report.line(format!("  {other}")),
        }
    }
}

async fn user_report(
    medplum: &MedplumClient,
    project_id: &str,
    cluster_id: &str,
    user: &ProjectUser,
    policy_ids: &HashMap<String, String>,
) -> Result<Report, CommandError> {
    let namespace = user.namespace().unwrap_or_default();
    let mut report = Report::new("ProjectUser", &namespace, &user.name_any());
    let identifier = project_user::identifier(cluster_id, &namespace, &user.name_any());
    let by_identifier = format!("{}|{}", identifier.system, identifier.value);
    let mut membership = first::<MembershipResource>(medplum, project_id, &[("identifier", &by_identifier)]).await?;
    let mut identifiers = vec![identifier.clone()];
    let marker = adopted_identifier(&identifier);
    let who = user.spec.email.clone().or_else(|| user.spec.external_id.clone()).unwrap_or_default();
    if membership.is_none() && user.spec.adopt {
        membership = project_user::existing_membership(medplum, user, project_id).await?;
        if let Some(m) = &membership {
            report.line(format!("adopt ProjectMembership/{} of {who}", m.id.as_deref().unwrap_or_default()));
        }
    }
    let access = access_of(&user.spec.access, policy_ids);
    let Some(m) = membership else {
        report.line(format!("invite {who} as a {}", user.spec.resource_type.as_str()));
        if let Err(missing) = &access {
            report.line(format!("  waits until {missing}"));
        }
        return Ok(report);
    };
    if m.identifier.contains(&marker) || !m.identifier.contains(&identifier) && user.spec.adopt {
        identifiers.push(marker);
    }
    match access {
        Err(missing) => report.line(format!("update its membership once {missing}")),
        Ok(access) => {
            let drift = project_user::membership_drift(&access, user.spec.admin, &identifiers, &m);
            membership_lines(&mut report, &m, &drift, &access, user.spec.admin);
        }
    }
    if let Some(profile) = medplum.read_reference::<ProfileResource>(&m.profile.reference).await?
        && !name_matches(&profile, &user.spec.first_name, &user.spec.last_name)
    {
        let name = profile.name.first();
        let was = name.map(|n| format!("{} {}", n.given.join(" "), n.family.clone().unwrap_or_default()));
        let will = format!("{} {}", user.spec.first_name, user.spec.last_name);
        report.line(format!("update the name on {}", m.profile.reference));
        report.field("name", &json!(was), &json!(will));
    }
    Ok(report)
}
