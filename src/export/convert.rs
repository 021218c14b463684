//! What a Medplum project holds, as the custom resources that declare it (pure).
//!
//! Every object is checked the way the operator will check it when the resources are applied: an
//! object the connection may not adopt, or one with fields a resource cannot express (which the
//! operator would then drop), is skipped and named with the reason, so that applying the export
//! never changes Medplum beyond the ownership tags (and, with `adopt.secret: Rotate`, the secrets).

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use crate::controller::access_policy::validate;
use crate::controller::adoption::managed_elsewhere;
use crate::controller::ownership_tag;
use crate::controller::tenancy::{self, Adoptee, Denied};
use crate::crd::{
    AccessGrant, AccessPolicy, AccessPolicySpec, Adopt, AdoptPolicy, AdoptSecret, ClientApplication,
    ClientApplicationSpec, CompartmentRef, ConnectionLimits, ConnectionRef, DeletionPolicy, IdentityProvider,
    Interaction, IpAccessRule, IpAction, LocalObjectRef, MedplumProject, MedplumProjectSpec, PatientRegistration,
    PolicyDeletionPolicy, PolicyParameter, PolicyResource, ProfileType, ProjectDeletionPolicy, ProjectUser,
    ProjectUserSpec, SecretKeyRef, Site, TokenAuthMethod, UserDeletionPolicy, UserScope,
};

/// What was read from Medplum, as JSON, so that fields the operator does not know are seen.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub project: Value,
    pub policies: Vec<Value>,
    pub clients: Vec<Value>,
    pub memberships: Vec<Value>,
    /// Profiles (`Practitioner/<id>` …) and Users (`User/<id>`) of the memberships, by reference;
    /// a User the credential may not read is missing.
    pub references: HashMap<String, Value>,
}

/// Where the resources go, and what the connection allows.
#[derive(Clone, Debug)]
pub struct Target {
    pub namespace: String,
    pub connection_ref: ConnectionRef,
    pub cluster_id: String,
    /// The connection's own credential, never exported.
    pub credential_client_id: String,
    pub limits: ConnectionLimits,
    pub adopt_secret: AdoptSecret,
}

/// The resources, and what was left out.
#[derive(Debug, Default)]
pub struct Export {
    pub policies: Vec<AccessPolicy>,
    pub clients: Vec<ClientApplication>,
    pub users: Vec<ProjectUser>,
    pub project: Option<MedplumProject>,
    /// `(what, why)`: objects not exported, and parts of exported ones left as they are in Medplum.
    pub notes: Vec<(String, String)>,
    /// Secrets to create before applying: `(name, key, what its value is)`; never a value.
    pub secrets_needed: Vec<(String, String, String)>,
}

/// A Kubernetes name for a Medplum object's name: lower case letters, digits and `-`, at most 63.
pub fn kube_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Keys of `v` outside `known`.
fn unknown_keys(v: &Value, known: &[&str]) -> Vec<String> {
    v.as_object().map(|o| o.keys().filter(|k| !known.contains(&k.as_str())).cloned().collect()).unwrap_or_default()
}

/// The operator marks (tags or identifiers) on an object: `(system, code)`.
fn marks(v: &Value) -> Vec<(String, String)> {
    let tags = v.pointer("/meta/tag").and_then(Value::as_array).into_iter().flatten();
    let tags = tags.filter_map(|t| Some((str_of(t, "system")?.to_string(), str_of(t, "code")?.to_string())));
    let identifiers = v.get("identifier").and_then(Value::as_array).into_iter().flatten();
    let identifiers =
        identifiers.filter_map(|i| Some((str_of(i, "system")?.to_string(), str_of(i, "value")?.to_string())));
    tags.chain(identifiers).collect()
}

/// Names resources of one kind: the name an object's own mark gives (it was exported and applied
/// before), else one made from its Medplum name, made unique with the start of its id.
struct Names {
    system: String,
    kind: &'static str,
    namespace: String,
    taken: BTreeSet<String>,
}

impl Names {
    fn new(target: &Target, kind: &'static str) -> Self {
        let system = ownership_tag(&target.cluster_id, "", "", "").system;
        Self { system, kind, namespace: target.namespace.clone(), taken: BTreeSet::new() }
    }

    /// The name this namespace's mark on the object gives it.
    fn marked(&self, v: &Value) -> Option<String> {
        let prefix = format!("{}/{}/", self.kind, self.namespace);
        let adopted = format!("{}:adopted", self.system);
        marks(v)
            .into_iter()
            .filter(|(system, _)| *system == self.system || *system == adopted)
            .find_map(|(_, code)| code.strip_prefix(&prefix).map(String::from))
    }

    /// Reserves the marked names of `objects` first, so that derived names never take them.
    fn reserve(&mut self, objects: &[Value]) {
        let marked: Vec<String> = objects.iter().filter_map(|v| self.marked(v)).collect();
        self.taken.extend(marked);
    }

    fn name(&mut self, v: &Value, display: Option<&str>, fallback: &str) -> String {
        if let Some(name) = self.marked(v) {
            return name;
        }
        let id = str_of(v, "id").unwrap_or_default();
        let base =
            Some(kube_name(display.unwrap_or_default())).filter(|n| !n.is_empty()).unwrap_or_else(|| fallback.into());
        let mut name = base.clone();
        if self.taken.contains(&name) {
            let short: String =
                id.chars().filter(char::is_ascii_alphanumeric).take(8).collect::<String>().to_lowercase();
            name = format!("{}-{short}", &base[..base.len().min(54)]);
        }
        self.taken.insert(name.clone());
        name
    }

    /// Why the operator would not adopt the object as `name`, as it checks on apply: the connection
    /// does not list it (`unlisted`, the message; an object this namespace already manages needs no
    /// listing), or another resource or cluster's operator manages it.
    /// Why `v` is not exported: the connection does not let it be adopted (`admitted`) and the
    /// namespace did not adopt it before, or another resource or cluster manages it.
    fn refusal(&self, v: &Value, name: &str, admitted: Result<(), Denied>) -> Option<String> {
        if let Err(denied) = admitted.as_ref()
            && self.marked(v).is_none()
        {
            return Some(denied.to_string());
        }
        let code = format!("{}/{}/{name}", self.kind, self.namespace);
        let marks = marks(v);
        managed_elsewhere(marks.iter().map(|(s, c)| (s.as_str(), c.as_str())), (&self.system, &code))
            .map(|owner| format!("managed by a medplum-operator as {owner}"))
    }
}

fn metadata(name: &str, namespace: &str) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() }
}

/// Converts what Medplum holds into resources.
pub fn export(snapshot: &Snapshot, target: &Target) -> Export {
    let mut out = Export::default();
    let policy_names = export_policies(snapshot, target, &mut out);
    let memberships_by_user: HashMap<&str, &Value> =
        snapshot.memberships.iter().filter_map(|m| Some((m.pointer("/user/reference")?.as_str()?, m))).collect();
    export_clients(snapshot, target, &policy_names, &memberships_by_user, &mut out);
    export_users(snapshot, target, &policy_names, &mut out);
    export_project(snapshot, target, &policy_names, &mut out);
    out
}

fn skip(out: &mut Export, what: String, why: impl Into<String>) {
    out.notes.push((what, why.into()));
}

// ---------------------------------------------------------------------------------------------------
// AccessPolicies

const POLICY_FIELDS: [&str; 7] = ["resourceType", "id", "meta", "name", "compartment", "resource", "ipAccessRule"];
const POLICY_RESOURCE_FIELDS: [&str; 7] =
    ["resourceType", "criteria", "readonly", "interaction", "hiddenFields", "readonlyFields", "writeConstraint"];

/// The policy resources; returns the resource name of every exported policy by Medplum id.
fn export_policies(snapshot: &Snapshot, target: &Target, out: &mut Export) -> HashMap<String, String> {
    let mut names = Names::new(target, "AccessPolicy");
    names.reserve(&snapshot.policies);
    let mut exported = HashMap::new();
    for v in sorted(&snapshot.policies) {
        let id = str_of(v, "id").unwrap_or_default().to_string();
        let what = format!("AccessPolicy/{id} ({})", str_of(v, "name").unwrap_or("no name"));
        let name = names.name(v, str_of(v, "name"), "policy");
        let admitted = tenancy::adoption(&target.limits, &Adoptee::Policy { id: &id }, &what);
        let refusal = names.refusal(v, &name, admitted);
        match (policy_spec(v, target), refusal) {
            (Err(why), _) | (Ok(_), Some(why)) => skip(out, what, why),
            (Ok(spec), None) => {
                exported.insert(id, name.clone());
                out.policies.push(AccessPolicy { metadata: metadata(&name, &target.namespace), spec, status: None });
            }
        }
    }
    exported
}

fn policy_spec(v: &Value, target: &Target) -> Result<AccessPolicySpec, String> {
    let unknown = unknown_keys(v, &POLICY_FIELDS);
    if unknown.iter().any(|k| k == "basedOn") && v["basedOn"].as_array().is_some_and(|a| !a.is_empty()) {
        return Err(
            "basedOn (policies built on other policies) cannot be declared; the operator would remove it".into()
        );
    }
    let unknown: Vec<String> = unknown.into_iter().filter(|k| k != "basedOn").collect();
    if !unknown.is_empty() {
        return Err(format!("fields an AccessPolicy resource cannot declare: {}", unknown.join(", ")));
    }
    if v.pointer("/compartment").is_some_and(|c| !unknown_keys(c, &["reference", "display"]).is_empty()) {
        return Err("compartment has fields other than reference".into());
    }
    let mut resources = Vec::new();
    for (index, r) in v.get("resource").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let unknown = unknown_keys(r, &POLICY_RESOURCE_FIELDS);
        if !unknown.is_empty() {
            return Err(format!("resource[{index}] has fields a resource cannot declare: {}", unknown.join(", ")));
        }
        let mut interactions = Vec::new();
        for i in strings(r, "interaction") {
            let parsed: Interaction = serde_json::from_value(Value::String(i.clone()))
                .map_err(|_| format!("resource[{index}] grants interaction {i:?}, which a resource cannot declare"))?;
            interactions.push(parsed);
        }
        let mut write_constraints = Vec::new();
        for e in r.get("writeConstraint").and_then(Value::as_array).into_iter().flatten() {
            match (str_of(e, "language"), str_of(e, "expression")) {
                (Some("text/fhirpath"), Some(expression))
                    if unknown_keys(e, &["language", "expression"]).is_empty() =>
                {
                    write_constraints.push(expression.to_string())
                }
                _ => return Err(format!("resource[{index}] has a writeConstraint that is not plain FHIRPath")),
            }
        }
        resources.push(PolicyResource {
            resource_type: str_of(r, "resourceType").unwrap_or_default().to_string(),
            criteria: str_of(r, "criteria").map(String::from),
            readonly: r.get("readonly").and_then(Value::as_bool),
            interactions,
            hidden_fields: strings(r, "hiddenFields"),
            readonly_fields: strings(r, "readonlyFields"),
            write_constraints,
        });
    }
    let mut ip_access_rules = Vec::new();
    for (index, rule) in v.get("ipAccessRule").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let action = match str_of(rule, "action") {
            Some("allow") => IpAction::Allow,
            Some("block") => IpAction::Block,
            other => return Err(format!("ipAccessRule[{index}] has action {other:?}")),
        };
        let value = str_of(rule, "value").unwrap_or_default().to_string();
        ip_access_rules.push(IpAccessRule { name: str_of(rule, "name").map(String::from), value, action });
    }
    let spec = AccessPolicySpec {
        connection_ref: target.connection_ref.clone(),
        display_name: str_of(v, "name").map(String::from),
        compartment: v
            .pointer("/compartment/reference")
            .and_then(Value::as_str)
            .map(|r| CompartmentRef { reference: r.into() }),
        resources,
        ip_access_rules,
        deletion_policy: PolicyDeletionPolicy::Orphan,
        adopt: str_of(v, "id").map(|id| AdoptPolicy { policy_id: id.into() }),
    };
    validate(&spec).map_err(|e| e.to_string())?;
    let policy: crate::medplum::AccessPolicyResource =
        serde_json::from_value(v.clone()).map_err(|e| format!("unreadable: {e}"))?;
    tenancy::adopted_policy(&target.limits, &policy, "the policy", "its").map_err(|denied| denied.to_string())?;
    Ok(spec)
}

fn sorted(objects: &[Value]) -> Vec<&Value> {
    let mut sorted: Vec<&Value> = objects.iter().collect();
    sorted.sort_by_key(|v| (str_of(v, "name").map(str::to_lowercase), str_of(v, "id").map(String::from)));
    sorted
}

// ---------------------------------------------------------------------------------------------------
// Memberships: what a membership grants, as `access` of a resource

/// What a membership grants as a resource says it: `(access, unrestricted, admin)`.
fn membership_grants(
    m: &Value,
    policy_names: &HashMap<String, String>,
    limits: &ConnectionLimits,
) -> Result<(Vec<AccessGrant>, bool, bool), String> {
    if m.get("active").and_then(Value::as_bool) == Some(false) {
        return Err("its membership is inactive (active: false), which a resource cannot declare".into());
    }
    let policy = |reference: &str| -> Result<LocalObjectRef, String> {
        let id = reference.strip_prefix("AccessPolicy/").unwrap_or(reference);
        policy_names
            .get(id)
            .map(|name| LocalObjectRef { name: name.clone() })
            .ok_or_else(|| format!("its membership has {reference}, which is not exported (see above)"))
    };
    let mut access = Vec::new();
    if let Some(reference) = m.pointer("/accessPolicy/reference").and_then(Value::as_str) {
        access.push(AccessGrant { policy_ref: policy(reference)?, parameters: Vec::new() });
    }
    for a in m.get("access").and_then(Value::as_array).into_iter().flatten() {
        let reference = a.pointer("/policy/reference").and_then(Value::as_str).unwrap_or_default();
        let mut parameters = Vec::new();
        for p in a.get("parameter").and_then(Value::as_array).into_iter().flatten() {
            let name = str_of(p, "name").unwrap_or_default().to_string();
            let value_string = str_of(p, "valueString").map(String::from);
            let value_reference = p.pointer("/valueReference/reference").and_then(Value::as_str).map(String::from);
            if value_string.is_some() == value_reference.is_some() {
                return Err(format!("parameter {name:?} of its membership is neither a string nor a reference"));
            }
            parameters.push(PolicyParameter { name, value_string, value_reference });
        }
        access.push(AccessGrant { policy_ref: policy(reference)?, parameters });
    }
    let admin = m.get("admin").and_then(Value::as_bool).unwrap_or(false);
    let unrestricted = access.is_empty();
    tenancy::adopted_membership(limits, admin, !unrestricted, "its membership").map_err(|denied| denied.to_string())?;
    Ok((access, unrestricted, admin))
}

// ---------------------------------------------------------------------------------------------------
// ClientApplications

const CLIENT_FIELDS: [&str; 17] = [
    "resourceType",
    "id",
    "meta",
    "status",
    "name",
    "description",
    "secret",
    "retiringSecret",
    "jwksUri",
    "redirectUris",
    "launchUri",
    "pkceOptional",
    "identityProvider",
    "accessTokenLifetime",
    "refreshTokenLifetime",
    "allowedOrigin",
    "defaultScope",
];
const IDENTITY_PROVIDER_FIELDS: [&str; 8] =
    ["authorizeUrl", "tokenUrl", "userInfoUrl", "clientId", "clientSecret", "tokenAuthMethod", "usePkce", "useSubject"];

fn export_clients(
    snapshot: &Snapshot,
    target: &Target,
    policy_names: &HashMap<String, String>,
    memberships: &HashMap<&str, &Value>,
    out: &mut Export,
) {
    let mut names = Names::new(target, "ClientApplication");
    names.reserve(&snapshot.clients);
    for v in sorted(&snapshot.clients) {
        let id = str_of(v, "id").unwrap_or_default().to_string();
        let what = format!("ClientApplication/{id} ({})", str_of(v, "name").unwrap_or("no name"));
        let credential = std::iter::once((target.credential_client_id.as_str(), "the connection"));
        if let Err(denied) = tenancy::not_a_connection_credential(&id, credential, &what) {
            skip(out, what, denied.to_string());
            continue;
        }
        let name = names.name(v, str_of(v, "name"), "client");
        let membership = memberships.get(format!("ClientApplication/{id}").as_str()).copied();
        let admitted = tenancy::adoption(&target.limits, &Adoptee::Client { id: &id, keep_secret: false }, &what);
        let refusal = names.refusal(v, &name, admitted);
        match (client_spec(v, membership, target, policy_names, &name), refusal) {
            (Err(why), _) | (Ok(_), Some(why)) => skip(out, what, why),
            (Ok(spec), None) => {
                if let Some(idp) = &spec.identity_provider {
                    let secret = &idp.client_secret_ref;
                    let about = format!("the client secret of the identity provider of ClientApplication {name}");
                    out.secrets_needed.push((secret.name.clone(), secret.key.clone(), about));
                }
                out.clients.push(ClientApplication {
                    metadata: metadata(&name, &target.namespace),
                    spec,
                    status: None,
                });
            }
        }
    }
}

fn client_spec(
    v: &Value,
    membership: Option<&Value>,
    target: &Target,
    policy_names: &HashMap<String, String>,
    name: &str,
) -> Result<ClientApplicationSpec, String> {
    let unknown = unknown_keys(v, &CLIENT_FIELDS);
    if !unknown.is_empty() {
        return Err(format!("fields a ClientApplication resource cannot declare: {}", unknown.join(", ")));
    }
    if let Some(status) = str_of(v, "status").filter(|s| *s != "active") {
        return Err(format!("its status is {status:?}; a resource keeps clients active"));
    }
    for field in ["accessTokenLifetime", "refreshTokenLifetime"] {
        if let Some(text) = str_of(v, field).filter(|t| !is_medplum_lifetime(t)) {
            return Err(format!("{field} {text:?} is not in the form a resource takes (e.g. 1h)"));
        }
    }
    let identity_provider = match v.get("identityProvider") {
        None => None,
        Some(idp) => {
            let unknown = unknown_keys(idp, &IDENTITY_PROVIDER_FIELDS);
            if !unknown.is_empty() {
                return Err(format!("identityProvider has fields a resource cannot declare: {}", unknown.join(", ")));
            }
            let token_auth_method = match str_of(idp, "tokenAuthMethod") {
                None => None,
                Some("client_secret_basic") => Some(TokenAuthMethod::ClientSecretBasic),
                Some("client_secret_post") => Some(TokenAuthMethod::ClientSecretPost),
                Some(other) => return Err(format!("identityProvider.tokenAuthMethod {other:?}")),
            };
            Some(IdentityProvider {
                authorize_url: str_of(idp, "authorizeUrl").unwrap_or_default().into(),
                token_url: str_of(idp, "tokenUrl").unwrap_or_default().into(),
                user_info_url: str_of(idp, "userInfoUrl").unwrap_or_default().into(),
                client_id: str_of(idp, "clientId").unwrap_or_default().into(),
                client_secret_ref: SecretKeyRef {
                    name: format!("{name}-identity-provider"),
                    key: "clientSecret".into(),
                },
                token_auth_method,
                use_pkce: idp.get("usePkce").and_then(Value::as_bool),
                use_subject: idp.get("useSubject").and_then(Value::as_bool),
            })
        }
    };
    let membership = membership.ok_or("it has no membership in the project, so it cannot sign in")?;
    let (access, unrestricted_access, on_behalf_of) = membership_grants(membership, policy_names, &target.limits)?;
    Ok(ClientApplicationSpec {
        connection_ref: target.connection_ref.clone(),
        display_name: str_of(v, "name").map(String::from),
        description: str_of(v, "description").map(String::from),
        access_token_lifetime: str_of(v, "accessTokenLifetime").map(String::from),
        refresh_token_lifetime: str_of(v, "refreshTokenLifetime").map(String::from),
        redirect_uris: strings(v, "redirectUris"),
        pkce_optional: v.get("pkceOptional").and_then(Value::as_bool),
        jwks_uri: str_of(v, "jwksUri").map(String::from),
        launch_uri: str_of(v, "launchUri").map(String::from),
        allowed_origins: strings(v, "allowedOrigin"),
        default_scopes: strings(v, "defaultScope"),
        identity_provider,
        access,
        unrestricted_access,
        // Medplum's only use of an admin client membership the operator offers: acting for users.
        on_behalf_of,
        secret: Default::default(),
        rotation: Default::default(),
        deletion_policy: DeletionPolicy::Orphan,
        adopt: str_of(v, "id").map(|id| Adopt { client_id: id.into(), secret: target.adopt_secret }),
    })
}

fn is_medplum_lifetime(text: &str) -> bool {
    let digits = text.trim_end_matches(['s', 'm', 'h', 'd', 'w']);
    text.len() == digits.len() + 1 && !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

// ---------------------------------------------------------------------------------------------------
// ProjectUsers

fn export_users(snapshot: &Snapshot, target: &Target, policy_names: &HashMap<String, String>, out: &mut Export) {
    let mut names = Names::new(target, "ProjectUser");
    names.reserve(&snapshot.memberships);
    let people = snapshot
        .memberships
        .iter()
        .filter(|m| m.pointer("/user/reference").and_then(Value::as_str).is_some_and(|r| r.starts_with("User/")));
    let mut people: Vec<&Value> = people.collect();
    people.sort_by_key(|m| {
        (m.pointer("/user/display").and_then(Value::as_str).map(str::to_lowercase), str_of(m, "id").map(String::from))
    });
    for m in people {
        let id = str_of(m, "id").unwrap_or_default();
        let who = m.pointer("/user/display").and_then(Value::as_str).unwrap_or("unknown user");
        let what = format!("ProjectMembership/{id} ({who})");
        let spec = match user_spec(m, snapshot, target, policy_names) {
            Ok(spec) => spec,
            Err(why) => {
                skip(out, what, why);
                continue;
            }
        };
        let display = spec.email.clone().or_else(|| spec.external_id.clone());
        let display = display.as_deref().map(|d| d.split('@').next().unwrap_or(d));
        let name = names.name(m, display, "user");
        let member = Adoptee::Member { email: spec.email.as_deref(), external_id: spec.external_id.as_deref() };
        let refusal = names.refusal(m, &name, tenancy::adoption(&target.limits, &member, &what));
        match refusal {
            Some(why) => skip(out, what, why),
            None => out.users.push(ProjectUser { metadata: metadata(&name, &target.namespace), spec, status: None }),
        }
    }
}

fn user_spec(
    m: &Value,
    snapshot: &Snapshot,
    target: &Target,
    policy_names: &HashMap<String, String>,
) -> Result<ProjectUserSpec, String> {
    let profile_ref = m.pointer("/profile/reference").and_then(Value::as_str).unwrap_or_default();
    let resource_type = match profile_ref.split('/').next() {
        Some("Practitioner") => ProfileType::Practitioner,
        Some("Patient") => ProfileType::Patient,
        Some("RelatedPerson") => ProfileType::RelatedPerson,
        other => {
            return Err(format!("its profile is a {}, which a ProjectUser cannot declare", other.unwrap_or("nothing")));
        }
    };
    let profile =
        snapshot.references.get(profile_ref).ok_or_else(|| format!("its profile {profile_ref} cannot be read"))?;
    let human = profile.pointer("/name/0").ok_or_else(|| format!("its profile {profile_ref} has no name"))?;
    let given = strings(human, "given");
    let (first_name, last_name) = match (given.as_slice(), str_of(human, "family")) {
        ([first], Some(last)) => (first.clone(), last.to_string()),
        _ => return Err(format!("the name on {profile_ref} is not one given name and a family name")),
    };
    let user_ref = m.pointer("/user/reference").and_then(Value::as_str).unwrap_or_default();
    let user = snapshot.references.get(user_ref);
    let external_id = str_of(m, "externalId").or_else(|| user.and_then(|u| str_of(u, "externalId"))).map(String::from);
    let email = user
        .and_then(|u| str_of(u, "email"))
        .or_else(|| m.pointer("/user/display").and_then(Value::as_str).filter(|d| d.contains('@')))
        .map(str::to_lowercase)
        .filter(|_| external_id.is_none());
    if email.is_none() && external_id.is_none() {
        return Err("neither the email nor the external id of its user can be read".into());
    }
    let scope = user.map(|u| if u.get("project").is_some() { UserScope::Project } else { UserScope::Server });
    let (access, unrestricted_access, admin) = membership_grants(m, policy_names, &target.limits)?;
    Ok(ProjectUserSpec {
        connection_ref: target.connection_ref.clone(),
        resource_type,
        first_name,
        last_name,
        email,
        external_id,
        scope,
        admin,
        access,
        unrestricted_access,
        send_email: false,
        deletion_policy: UserDeletionPolicy::Orphan,
        adopt: true,
    })
}

// ---------------------------------------------------------------------------------------------------
// The project

fn export_project(snapshot: &Snapshot, target: &Target, policy_names: &HashMap<String, String>, out: &mut Export) {
    let project = &snapshot.project;
    let what = format!("Project/{}", str_of(project, "id").unwrap_or_default());
    let mut spec = MedplumProjectSpec {
        connection_ref: target.connection_ref.clone(),
        patient_registration: None,
        sites: Vec::new(),
        secrets: Vec::new(),
        deletion_policy: ProjectDeletionPolicy::Orphan,
    };
    if let Some(reference) = project.pointer("/defaultPatientAccessPolicy/reference").and_then(Value::as_str) {
        let id = reference.trim_start_matches("AccessPolicy/");
        match policy_names.get(id) {
            Some(name) => {
                let policy = Some(LocalObjectRef { name: name.clone() });
                spec.patient_registration = Some(PatientRegistration { open: true, access_policy_ref: policy });
            }
            None => skip(
                out,
                format!("{what} defaultPatientAccessPolicy"),
                format!("{reference} is not exported; left as it is"),
            ),
        }
    }
    for site in project.get("site").and_then(Value::as_array).into_iter().flatten() {
        let site_name = str_of(site, "name").unwrap_or_default().to_string();
        let unknown = unknown_keys(site, &["name", "domain", "recaptchaSiteKey"]);
        if !unknown.is_empty() {
            let why = format!(
                "has {}, which the export leaves in Medplum (a secret, or not declarable); left as it is",
                unknown.join(", ")
            );
            skip(out, format!("{what} site {site_name:?}"), why);
            continue;
        }
        spec.sites.push(Site {
            name: site_name,
            domains: strings(site, "domain"),
            recaptcha_site_key: str_of(site, "recaptchaSiteKey").map(String::from),
            recaptcha_secret_key_ref: None,
        });
    }
    for secret in project.get("secret").and_then(Value::as_array).into_iter().flatten() {
        let why = "a project secret's value is never exported; left as it is (declare it in spec.secrets from a Secret to manage it)";
        skip(out, format!("{what} secret {:?}", str_of(secret, "name").unwrap_or_default()), why);
    }
    if spec.patient_registration.is_none() && spec.sites.is_empty() {
        return;
    }
    if let Err(denied) = tenancy::project_settings(&target.limits) {
        skip(out, what, denied.to_string());
        return;
    }
    let name = Some(kube_name(str_of(project, "name").unwrap_or_default())).filter(|n| !n.is_empty());
    let name = name.unwrap_or_else(|| "project".into());
    out.project = Some(MedplumProject { metadata: metadata(&name, &target.namespace), spec, status: None });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(limits: Value) -> Target {
        Target {
            namespace: "team-a".into(),
            connection_ref: ConnectionRef::default(),
            cluster_id: "default".into(),
            credential_client_id: "operator".into(),
            limits: serde_json::from_value(limits).unwrap(),
            adopt_secret: AdoptSecret::Rotate,
        }
    }

    fn policy(id: &str, name: &str) -> Value {
        json!({"resourceType": "AccessPolicy", "id": id, "name": name, "meta": {"versionId": "1"},
               "resource": [{"resourceType": "Patient", "readonly": true}]})
    }

    #[test]
    fn kubernetes_names_come_from_medplum_names() {
        assert_eq!(kube_name("Billing Service (prod)"), "billing-service-prod");
        assert_eq!(kube_name("  ~~ "), "");
        assert_eq!(kube_name(&"x".repeat(80)).len(), 63);
    }

    #[test]
    fn names_are_unique_and_an_applied_object_keeps_its_own() {
        let snapshot = Snapshot {
            policies: vec![policy("p2", "Reader"), policy("p1", "Reader"), {
                let mut applied = policy("p3", "Renamed In Console");
                applied["meta"]["tag"] =
                    json!([{"system": "urn:medplum-operator:default", "code": "AccessPolicy/team-a/reader"}]);
                applied
            }],
            ..Default::default()
        };
        let export = export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1", "p2"]}})));
        let names: Vec<_> = export.policies.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["reader-p1", "reader-p2", "reader"]);
        assert_eq!(export.policies[2].spec.display_name.as_deref(), Some("Renamed In Console"));
    }

    #[test]
    fn what_a_resource_cannot_say_or_the_connection_may_not_adopt_is_left_out_with_the_reason() {
        let mut based = policy("p1", "Based");
        based["basedOn"] = json!([{"reference": "AccessPolicy/p0"}]);
        let mut admin = policy("p2", "Admin");
        admin["resource"] = json!([{"resourceType": "ClientApplication"}]);
        let mut other = policy("p3", "Other Cluster");
        other["meta"]["tag"] = json!([{"system": "urn:medplum-operator:east", "code": "AccessPolicy/x/y"}]);
        let snapshot = Snapshot {
            policies: vec![based, admin, other, policy("p4", "Unlisted")],
            clients: vec![json!({"resourceType": "ClientApplication", "id": "operator", "name": "Operator"})],
            ..Default::default()
        };
        let export = export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1", "p2", "p3"]}})));
        assert!(export.policies.is_empty());
        let why =
            |what: &str| export.notes.iter().find(|(w, _)| w.starts_with(what)).map(|(_, why)| why.clone()).unwrap();
        assert!(why("AccessPolicy/p1").contains("basedOn"));
        assert!(why("AccessPolicy/p2").contains("allowAdmin"));
        assert!(why("AccessPolicy/p3").contains("urn:medplum-operator:east"));
        assert!(why("AccessPolicy/p4").contains("policyIds"));
        assert!(why("ClientApplication/operator").contains("own credential"));
    }

    #[test]
    fn a_client_takes_its_membership_access_and_an_admin_membership_acts_on_behalf_of_users() {
        let client = json!({"resourceType": "ClientApplication", "id": "c1", "name": "Proxy", "secret": "s3cr3t",
                            "accessTokenLifetime": "15m", "redirectUris": ["https://app/cb"]});
        let membership = json!({"resourceType": "ProjectMembership", "id": "m1", "admin": true,
            "user": {"reference": "ClientApplication/c1"}, "profile": {"reference": "ClientApplication/c1"},
            "accessPolicy": {"reference": "AccessPolicy/p1"},
            "access": [{"policy": {"reference": "AccessPolicy/p1"},
                        "parameter": [{"name": "org", "valueReference": {"reference": "Organization/9"}}]}]});
        let snapshot = Snapshot {
            policies: vec![policy("p1", "Reader")],
            clients: vec![client],
            memberships: vec![membership],
            ..Default::default()
        };
        let limits = json!({"allowAdmin": true, "adoption": {"policyIds": ["p1"], "clientIds": ["c1"]}});
        let export = export(&snapshot, &target(limits));
        let spec = &export.clients[0].spec;
        assert!(spec.on_behalf_of && !spec.unrestricted_access);
        assert_eq!(spec.access.len(), 2, "the legacy accessPolicy and access[] both grant");
        assert_eq!(spec.access[1].parameters[0].value_reference.as_deref(), Some("Organization/9"));
        assert_eq!(spec.adopt, Some(Adopt { client_id: "c1".into(), secret: AdoptSecret::Rotate }));
        assert_eq!(spec.deletion_policy, DeletionPolicy::Orphan, "deleting an exported resource never deletes");
        let yaml = serde_json::to_string(&export.clients).unwrap();
        assert!(!yaml.contains("s3cr3t"), "no secret value");

        let without_admin =
            super::export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1"], "clientIds": ["c1"]}})));
        assert!(without_admin.clients.is_empty());
        assert!(without_admin.notes.iter().any(|(_, why)| why.contains("project admin")));
    }

    #[test]
    fn a_person_needs_one_given_name_a_family_name_and_an_email_or_external_id() {
        let membership = |id: &str, profile: &str| {
            json!({"resourceType": "ProjectMembership", "id": id, "user": {"reference": format!("User/{id}"), "display": format!("{id}@example.org")},
                   "profile": {"reference": profile}, "access": [{"policy": {"reference": "AccessPolicy/p1"}}]})
        };
        let references = HashMap::from([
            ("Practitioner/ada".to_string(), json!({"name": [{"given": ["Ada"], "family": "Lovelace"}]})),
            ("Practitioner/mary".to_string(), json!({"name": [{"given": ["Mary", "Ann"], "family": "Lee"}]})),
            ("User/ada".to_string(), json!({"email": "Ada@Example.org", "project": {"reference": "Project/x"}})),
        ]);
        let snapshot = Snapshot {
            policies: vec![policy("p1", "Reader")],
            memberships: vec![
                membership("ada", "Practitioner/ada"),
                membership("mary", "Practitioner/mary"),
                membership("bot", "Bot/b"),
            ],
            references,
            ..Default::default()
        };
        let export =
            export(&snapshot, &target(json!({"adoption": {"policyIds": ["p1"], "userEmails": ["@example.org"]}})));
        assert_eq!(export.users.len(), 1);
        let ada = &export.users[0].spec;
        assert_eq!(
            (ada.email.as_deref(), ada.scope, ada.adopt),
            (Some("ada@example.org"), Some(UserScope::Project), true)
        );
        assert!(export.notes.iter().any(|(what, why)| what.contains("mary") && why.contains("one given name")));
        assert!(export.notes.iter().any(|(what, why)| what.contains("bot") && why.contains("Bot")));
    }
}
