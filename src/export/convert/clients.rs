//! ClientApplications, with their memberships, as ClientApplication resources.

use std::collections::HashMap;

use serde_json::Value;

use super::{
    Export, Names, Snapshot, Target, membership_grants, metadata, skip, sorted, str_of, strings, unknown_keys,
};
use crate::controller::tenancy::{self, Adoptee};
use crate::crd::{
    Adopt, ClientApplication, ClientApplicationSpec, DeletionPolicy, IdentityProvider, SecretKeyRef, TokenAuthMethod,
};

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

pub(super) fn export_clients(
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
