use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

use super::MedplumError;
use super::model::{
    Bundle, ClientApplicationResource, FhirResource, Health, InviteRequest, Me, MembershipResource, OperationOutcome,
    TokenError, TokenResponse,
};
use super::pacing::{Budgets, Cost, Limit, Pacing, parse_header};
use super::token::{Source, TokenCache};
use crate::metrics::Metrics;

/// Which secret of a ClientApplication `$rotate-secret` is given.
#[derive(Clone, Copy)]
pub enum RotateSecret<'a> {
    Current(&'a SecretString),
    Retiring(&'a SecretString),
}

/// The id and secret of a ClientApplication. The secret is redacted in Debug output.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: SecretString,
}

/// How Medplum showed that client credentials are right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialProof {
    /// It authenticated a request made with them (HTTP Basic on `/auth/me`).
    Authenticated,
    /// It issued a token.
    TokenIssued,
    /// It refused a token to the caller's address under the client's IP rules, which it checks only
    /// after the secret matched.
    AddressNotAllowed,
}

/// `/oauth2/token`'s answer to a right secret from an address the client's IP rules block.
const ADDRESS_NOT_ALLOWED: &str = "IP address not allowed";

/// An HTTP client for one Medplum server, authenticated as one ClientApplication, with a token cache,
/// pacing its requests by the server's rate limits.
pub struct MedplumClient {
    http: reqwest::Client,
    base_url: Url,
    credentials: ClientCredentials,
    tokens: TokenCache,
    /// The IP budgets of the server, shared with every client of it.
    server_budgets: Arc<Budgets>,
    /// The FHIR quota of the credential's membership.
    quota: Arc<Budgets>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for MedplumClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MedplumClient")
            .field("base_url", &self.base_url.as_str())
            .field("client_id", &self.credentials.client_id)
            .finish_non_exhaustive()
    }
}

/// The base URL with exactly one trailing slash, so that joining relative paths keeps its path.
fn normalized_base(base_url: &str) -> Result<Url, MedplumError> {
    let with_slash = format!("{}/", base_url.trim_end_matches('/'));
    let url = Url::parse(&with_slash).map_err(|e| MedplumError::Settings { detail: format!("base URL: {e}") })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(MedplumError::Settings { detail: "base URL must be an http(s) URL with a host".into() });
    }
    Ok(url)
}

impl MedplumClient {
    /// A client for `base_url`, trusting `ca_pem` (PEM certificates) besides the system roots.
    pub fn new(
        base_url: &str,
        credentials: ClientCredentials,
        ca_pem: Option<&[u8]>,
        timeout: Duration,
        pacing: &Pacing,
        metrics: Arc<Metrics>,
    ) -> Result<Self, MedplumError> {
        let base_url = normalized_base(base_url)?;
        let authority =
            format!("{}:{}", base_url.host_str().unwrap_or_default(), base_url.port_or_known_default().unwrap_or(0));
        let server_budgets = pacing.server(&authority);
        let quota = pacing.credential(&authority, &credentials.client_id);
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("medplum-operator/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| MedplumError::Settings { detail: format!("CA bundle: {e}") })?;
            if certs.is_empty() {
                return Err(MedplumError::Settings { detail: "CA bundle holds no PEM certificate".into() });
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| MedplumError::Settings { detail: format!("HTTP client: {e}") })?;
        Ok(Self { http, base_url, credentials, tokens: TokenCache::default(), server_budgets, quota, metrics })
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    pub fn client_id(&self) -> &str {
        &self.credentials.client_id
    }

    fn url(&self, path: &str) -> Url {
        self.base_url.join(path).expect("operator paths are valid relative URLs")
    }

    /// `GET /healthcheck` (no authentication): is the server up, and which version is it.
    pub async fn health(&self) -> Result<Health, MedplumError> {
        let request = self.http.get(self.url("healthcheck"));
        let response = self.send("healthcheck", request).await?;
        json(response).await
    }

    /// `GET /auth/me`: the project and membership of the credential.
    pub async fn me(&self) -> Result<Me, MedplumError> {
        self.authed("auth_me", Method::GET, "auth/me", |r| r).await
    }

    /// Reads a resource; `None` if it does not exist or was deleted.
    pub async fn read<T: FhirResource>(&self, id: &str) -> Result<Option<T>, MedplumError> {
        let path = format!("fhir/R4/{}/{id}", T::TYPE);
        match self.authed(&format!("read {}", T::TYPE), Method::GET, &path, |r| r).await {
            Ok(resource) => Ok(Some(resource)),
            Err(MedplumError::NotFound | MedplumError::Gone) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Searches resources of a type (first page; the operator's searches match at most a handful).
    pub async fn search<T: FhirResource>(&self, params: &[(&str, &str)]) -> Result<Vec<T>, MedplumError> {
        let path = format!("fhir/R4/{}", T::TYPE);
        let bundle: Bundle<T> =
            self.authed(&format!("search {}", T::TYPE), Method::GET, &path, |r| r.query(params)).await?;
        Ok(bundle.entry.into_iter().map(|e| e.resource).collect())
    }

    /// Every resource of a type matching `params`, handed to `take` a page at a time (a sweep of
    /// thousands of objects never holds more than one page of them).
    pub async fn search_pages<T: FhirResource>(
        &self,
        params: &[(&str, &str)],
        take: impl FnMut(Vec<T>),
    ) -> Result<(), MedplumError> {
        paged(
            params,
            |paged| async move {
                let paged: Vec<(&str, &str)> = paged.iter().map(|(k, v)| (*k, v.as_str())).collect();
                self.search::<T>(&paged).await
            },
            take,
        )
        .await
    }

    /// Every resource of the listed types matching `params` (one system-level search, page by page),
    /// as JSON: callers sort them out by `resourceType`.
    pub async fn search_types(
        &self,
        types: &[&str],
        params: &[(&str, &str)],
    ) -> Result<Vec<serde_json::Value>, MedplumError> {
        let types = types.join(",");
        let mut with_types = vec![("_type", types.as_str())];
        with_types.extend_from_slice(params);
        let mut found = Vec::new();
        paged(
            &with_types,
            |paged| async move {
                let bundle: Bundle<serde_json::Value> =
                    self.authed("search changes", Method::GET, "fhir/R4", |r| r.query(&paged)).await?;
                Ok(bundle.entry.into_iter().map(|e| e.resource).collect())
            },
            |page| found.extend(page),
        )
        .await?;
        Ok(found)
    }

    /// An object this operator made: read by the id it recorded when that still `is_ours` (the fast
    /// path), otherwise found by searching `param=token`, since the record may be stale or lost (a crash
    /// between the create and the status write).
    pub async fn find_owned<T: FhirResource>(
        &self,
        recorded_id: Option<&str>,
        is_ours: impl Fn(&T) -> bool,
        param: &str,
        token: &str,
    ) -> Result<Option<T>, MedplumError> {
        if let Some(id) = recorded_id
            && let Some(known) = self.read::<T>(id).await?.filter(&is_ours)
        {
            return Ok(Some(known));
        }
        Ok(self.search::<T>(&[(param, token)]).await?.pop())
    }

    /// Creates a resource; with `if_none_exist`, Medplum returns the one match instead (or 412 if several).
    pub async fn create<T: FhirResource>(&self, resource: &T, if_none_exist: Option<&str>) -> Result<T, MedplumError> {
        let path = format!("fhir/R4/{}", T::TYPE);
        self.authed(&format!("create {}", T::TYPE), Method::POST, &path, |r| {
            let r = r.header("content-type", "application/fhir+json").json(resource);
            match if_none_exist {
                Some(condition) => r.header("if-none-exist", condition),
                None => r,
            }
        })
        .await
    }

    /// Replaces a resource (PUT is a full replace in Medplum), only if it is still at `version`.
    pub async fn update<T: FhirResource>(&self, id: &str, resource: &T, version: &str) -> Result<T, MedplumError> {
        let path = format!("fhir/R4/{}/{id}", T::TYPE);
        let if_match = format!("W/\"{version}\"");
        self.authed(&format!("update {}", T::TYPE), Method::PUT, &path, |r| {
            r.header("content-type", "application/fhir+json").header("if-match", &if_match).json(resource)
        })
        .await
    }

    /// Deletes a resource; a 404 or 410 counts as done.
    pub async fn delete<T: FhirResource>(&self, id: &str) -> Result<(), MedplumError> {
        let path = format!("fhir/R4/{}/{id}", T::TYPE);
        ignore_missing(
            self.authed::<serde::de::IgnoredAny>(&format!("delete {}", T::TYPE), Method::DELETE, &path, |r| r).await,
        )
    }

    /// Invites a person to the project (`POST /admin/projects/{id}/invite`); a person who is already a
    /// member gives [`MedplumError::Conflict`].
    pub async fn invite(&self, project_id: &str, invite: &InviteRequest) -> Result<MembershipResource, MedplumError> {
        let path = format!("admin/projects/{project_id}/invite");
        self.authed("invite", Method::POST, &path, |r| r.json(invite)).await
    }

    /// Reads the resource a reference (`Practitioner/<id>`) points at; `None` if it is gone.
    pub async fn read_reference<T: DeserializeOwned>(&self, reference: &str) -> Result<Option<T>, MedplumError> {
        let operation = format!("read {}", reference.split('/').next().unwrap_or_default());
        match self.authed(&operation, Method::GET, &format!("fhir/R4/{reference}"), |r| r).await {
            Ok(resource) => Ok(Some(resource)),
            Err(MedplumError::NotFound | MedplumError::Gone) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the resource a reference points at, only if it is still at `version`.
    pub async fn update_reference<T: Serialize + DeserializeOwned>(
        &self,
        reference: &str,
        resource: &T,
        version: &str,
    ) -> Result<T, MedplumError> {
        let operation = format!("update {}", reference.split('/').next().unwrap_or_default());
        let if_match = format!("W/\"{version}\"");
        self.authed(&operation, Method::PUT, &format!("fhir/R4/{reference}"), |r| {
            r.header("content-type", "application/fhir+json").header("if-match", &if_match).json(resource)
        })
        .await
    }

    /// Applies a JSON Patch to the resource a reference points at, only if it is still at `version`.
    pub async fn patch_reference<T: DeserializeOwned>(
        &self,
        reference: &str,
        operations: &serde_json::Value,
        version: &str,
    ) -> Result<T, MedplumError> {
        let operation = format!("patch {}", reference.split('/').next().unwrap_or_default());
        let if_match = format!("W/\"{version}\"");
        self.authed(&operation, Method::PATCH, &format!("fhir/R4/{reference}"), |r| {
            r.header("content-type", "application/json-patch+json").header("if-match", &if_match).json(operations)
        })
        .await
    }

    /// Deletes a membership through the admin API, which ends the member's live tokens at once.
    pub async fn delete_membership(&self, project_id: &str, membership_id: &str) -> Result<(), MedplumError> {
        let path = format!("admin/projects/{project_id}/members/{membership_id}");
        ignore_missing(self.authed::<serde::de::IgnoredAny>("delete membership", Method::DELETE, &path, |r| r).await)
    }

    /// `ClientApplication/{id}/$rotate-secret`. Medplum compares the value given with the client's
    /// current secret ([`RotateSecret::Current`]: it then issues a new one and keeps the given one as
    /// retiring) or its retiring one ([`RotateSecret::Retiring`]: it then ends it), and answers 400 when
    /// it does not match: a rotation planned from a stale reading changes nothing.
    pub async fn rotate_secret(
        &self,
        id: &str,
        which: RotateSecret<'_>,
    ) -> Result<ClientApplicationResource, MedplumError> {
        let (name, value) = match which {
            RotateSecret::Current(value) => ("secret", value),
            RotateSecret::Retiring(value) => ("retiringSecret", value),
        };
        let body = serde_json::json!({"resourceType": "Parameters",
                                      "parameter": [{"name": name, "valueString": value.expose_secret()}]});
        let path = format!("fhir/R4/ClientApplication/{id}/$rotate-secret");
        self.authed("rotate-secret ClientApplication", Method::POST, &path, |r| r.json(&body)).await
    }

    /// Whether Medplum accepts these client credentials, and how that showed (not cached: this checks
    /// them). First with HTTP Basic on `/auth/me`, which is outside the auth rate limit (160 token
    /// requests a minute per IP, shared by everything on it). Medplum answers 401 there alike for a
    /// wrong secret, an inactive client and IP rules that block the caller, so only then a token
    /// request tells which: Medplum checks a client's IP rules only after its secret matched, so "IP
    /// address not allowed" proves the credentials as well as a token does (the operator merely runs
    /// outside the client's allowed network).
    pub async fn check_credentials(&self, credentials: &ClientCredentials) -> Result<CredentialProof, MedplumError> {
        let secret = credentials.client_secret.expose_secret();
        let request = self.http.get(self.url("auth/me")).basic_auth(&credentials.client_id, Some(secret));
        // The body is dropped unread: it holds the client's own secret.
        match self.send("verify credentials", request).await {
            Ok(_) => return Ok(CredentialProof::Authenticated),
            Err(MedplumError::Unauthorized) => {}
            Err(e) => return Err(e),
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", credentials.client_id.as_str()),
            ("client_secret", credentials.client_secret.expose_secret()),
        ];
        let request = self.http.post(self.url("oauth2/token")).form(&form);
        let response = self.send("check credentials", request).await?;
        if response.status() == StatusCode::BAD_REQUEST {
            return match refusal(&self.base_url, response).await {
                MedplumError::InvalidCredentials { description } if description == ADDRESS_NOT_ALLOWED => {
                    Ok(CredentialProof::AddressNotAllowed)
                }
                refused => Err(refused),
            };
        }
        json::<serde::de::IgnoredAny>(response).await.map(|_| CredentialProof::TokenIssued)
    }

    /// Sends an authenticated request, built from a fresh token. A 401 drops the cached token and the
    /// request is tried once more with a new one (the token may have been revoked early).
    async fn authed<T: DeserializeOwned>(
        &self,
        operation: &str,
        method: Method,
        path: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<T, MedplumError> {
        let url = self.url(path);
        for attempt in 0..2 {
            let token = self.token().await?;
            let request = build(self.http.request(method.clone(), url.clone()).bearer_auth(token.expose_secret()));
            match self.send(operation, request).await {
                Err(MedplumError::Unauthorized) if attempt == 0 => self.tokens.invalidate(&token).await,
                Err(e) => return Err(e),
                Ok(response) => return json(response).await,
            }
        }
        Err(MedplumError::Unauthorized)
    }

    /// An access token for the credential, from the cache when possible.
    async fn token(&self) -> Result<SecretString, MedplumError> {
        let (token, source) = self.tokens.get(|| self.fetch_token()).await?;
        self.metrics.record_token(source == Source::Cache);
        Ok(token)
    }

    async fn fetch_token(&self) -> Result<(SecretString, Duration), MedplumError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.credentials.client_id.as_str()),
            ("client_secret", self.credentials.client_secret.expose_secret()),
        ];
        let request = self.http.post(self.url("oauth2/token")).form(&form);
        let response = self.send("token", request).await?;
        if response.status() == StatusCode::BAD_REQUEST {
            return Err(refusal(&self.base_url, response).await);
        }
        let token: TokenResponse = json(response).await?;
        Ok((SecretString::from(token.access_token), Duration::from_secs(token.expires_in.max(1))))
    }

    /// Sends a request once the rate limits allow it, takes in what the answer says of them, and maps
    /// Medplum's error statuses. 400 on `/oauth2/token` is returned as a response, since its body says
    /// why the credentials were refused.
    async fn send(&self, operation: &str, request: RequestBuilder) -> Result<Response, MedplumError> {
        let request = request.build().map_err(|e| transport_error(&self.base_url, &e))?;
        let path = request.url().path().strip_prefix(self.base_url.path()).unwrap_or_default().to_string();
        let cost = Cost::of(request.method(), &path, request.headers().contains_key("if-none-exist"));
        let units = u64::from(cost.fhir_units);
        self.paced(cost.category, 1).await;
        if units > 0 {
            self.paced(Limit::FhirQuota, units).await;
        }
        let started = Instant::now();
        let sent = self.http.execute(request).await;
        let said = |wanted: Limit| {
            let response = sent.as_ref().ok()?;
            response.headers().get_all("ratelimit").iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
                parse_header(v).filter(|(limit, _, _)| *limit == wanted).map(|(_, left, reset)| (left, reset))
            })
        };
        self.server_budgets.update(cost.category, 1, said(Limit::Default));
        if units > 0 {
            self.quota.update(Limit::FhirQuota, units, said(Limit::FhirQuota));
        }
        let result = match sent {
            Err(e) => Err(transport_error(&self.base_url, &e)),
            Ok(response) if response.status().is_success() => Ok(response),
            Ok(response) if is_token_request(operation) && response.status() == StatusCode::BAD_REQUEST => Ok(response),
            Ok(response) => Err(status_error(response).await),
        };
        let status = match &result {
            Ok(response) => response.status().as_u16().to_string(),
            Err(e) => e.status_label(),
        };
        self.metrics.record_medplum_request(operation, &status, started.elapsed());
        result
    }
}

/// Runs `search` page by page (`_count` 1000, `_offset`) until a page comes back short, handing each
/// page to `take`.
async fn paged<'a, T, F, Fut>(
    params: &[(&'a str, &'a str)],
    search: F,
    mut take: impl FnMut(Vec<T>),
) -> Result<(), MedplumError>
where
    F: Fn(Vec<(&'a str, String)>) -> Fut,
    Fut: Future<Output = Result<Vec<T>, MedplumError>>,
{
    const PAGE: usize = 1000;
    let mut offset = 0;
    loop {
        let mut paged: Vec<(&str, String)> = params.iter().map(|(k, v)| (*k, v.to_string())).collect();
        paged.extend([("_count", PAGE.to_string()), ("_offset", offset.to_string())]);
        let page = search(paged).await?;
        let last = page.len() < PAGE;
        offset += page.len();
        take(page);
        if last {
            return Ok(());
        }
    }
}

impl MedplumClient {
    /// Waits until the budget of `limit` has room for `cost`.
    async fn paced(&self, limit: Limit, cost: u64) {
        let budgets = if limit == Limit::FhirQuota { &self.quota } else { &self.server_budgets };
        let waited = budgets.acquire(limit, cost).await;
        if !waited.is_zero() {
            tracing::debug!(limit = limit.label(), ?waited, "held a request back for Medplum's rate limit");
            self.metrics.record_rate_limit_wait(limit.label(), waited);
        }
    }
}

fn is_token_request(operation: &str) -> bool {
    matches!(operation, "token" | "check credentials")
}

/// Medplum answers every refused credential on `/oauth2/token` with 400 `invalid_request` (never 401).
async fn refusal(base_url: &Url, response: Response) -> MedplumError {
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => return transport_error(base_url, &e),
    };
    let description = serde_json::from_slice::<TokenError>(&body)
        .ok()
        .and_then(|e| e.error_description)
        .or_else(|| serde_json::from_slice::<OperationOutcome>(&body).ok().and_then(|o| o.text()))
        .unwrap_or_else(|| "HTTP 400".into());
    MedplumError::InvalidCredentials { description }
}

fn ignore_missing<T>(result: Result<T, MedplumError>) -> Result<(), MedplumError> {
    match result {
        Ok(_) | Err(MedplumError::NotFound | MedplumError::Gone) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A transport failure, described by its root cause (e.g. "invalid peer certificate: UnknownIssuer").
fn transport_error(base_url: &Url, error: &reqwest::Error) -> MedplumError {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_decode() || error.is_body() {
        "connection closed while reading the response"
    } else {
        "request failed"
    };
    let mut root: &dyn std::error::Error = error;
    while let Some(source) = root.source() {
        root = source;
    }
    let detail = if std::ptr::addr_eq(root, error as &dyn std::error::Error) {
        kind.to_string()
    } else {
        format!("{kind}: {root}")
    };
    MedplumError::Unreachable { url: base_url.to_string(), detail }
}

async fn status_error(response: Response) -> MedplumError {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let message = serde_json::from_slice::<OperationOutcome>(&body)
        .ok()
        .and_then(|o| o.text())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    match status.as_u16() {
        401 => MedplumError::Unauthorized,
        403 => MedplumError::Forbidden { message },
        404 => MedplumError::NotFound,
        409 => MedplumError::Conflict { message },
        410 => MedplumError::Gone,
        412 => MedplumError::PreconditionFailed { message },
        // Medplum sends no Retry-After with 429; the window is 60 s.
        429 => MedplumError::RateLimited { retry_after: None },
        s if s >= 500 => MedplumError::ServerError { status: s, message },
        s => MedplumError::Rejected { status: s, message },
    }
}

async fn json<T: DeserializeOwned>(response: Response) -> Result<T, MedplumError> {
    let body = response.bytes().await.map_err(|e| MedplumError::Protocol { detail: format!("reading body: {e}") })?;
    serde_json::from_slice(&body).map_err(|e| MedplumError::Protocol { detail: format!("decoding JSON: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_keeps_its_path_and_gets_one_slash() {
        assert_eq!(normalized_base("https://m.example.org").unwrap().as_str(), "https://m.example.org/");
        assert_eq!(
            normalized_base("https://m.example.org/medplum//").unwrap().as_str(),
            "https://m.example.org/medplum/"
        );
        assert_eq!(
            normalized_base("https://m.example.org/medplum").unwrap().join("auth/me").unwrap().as_str(),
            "https://m.example.org/medplum/auth/me"
        );
        assert!(normalized_base("ftp://m.example.org").is_err());
        assert!(normalized_base("not a url").is_err());
    }
}
