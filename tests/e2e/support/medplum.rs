//! The Medplum the suite talks to: by default a fresh `medplum-test-server` per test (so fault injection
//! and rate limits stay within one test); a real Medplum when `MEDPLUM_TEST_BASE_URL`,
//! `MEDPLUM_TEST_CLIENT_ID` and `MEDPLUM_TEST_CLIENT_SECRET` (a super-admin client) are set.
//! Each test bootstraps its own project and project-admin client, so tests never share Medplum state.

use std::collections::BTreeMap;
use std::process::Stdio;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A minimal HTTP client for tests, independent of the operator's Medplum client.
#[derive(Clone)]
pub struct Http {
    pub base_url: String,
    client: reqwest::Client,
}

/// One HTTP exchange, kept whole so tests can assert on status, headers and body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(self.status.as_u16(), status, "unexpected status; body: {}", self.text);
        self
    }
}

impl Http {
    pub fn new(base_url: &str) -> Self {
        Self::trusting(base_url, None)
    }

    /// A client that also trusts the PEM certificates in `ca`.
    pub fn trusting(base_url: &str, ca: Option<&str>) -> Self {
        super::init();
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca {
            builder = builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem.as_bytes()).expect("CA PEM"));
        }
        let client = builder.build().expect("HTTP client");
        Self { base_url: base_url.trim_end_matches('/').to_string() + "/", client }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("request reached the server");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        Answer { status, headers, text }
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{}", self.base_url, path.trim_start_matches('/')));
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    /// A client credentials token request with form fields.
    pub async fn token_request(&self, client_id: &str, secret: &str) -> Answer {
        let form = [("grant_type", "client_credentials"), ("client_id", client_id), ("client_secret", secret)];
        self.send(self.request(Method::POST, "oauth2/token", None).form(&form)).await
    }

    /// An access token, or a panic.
    pub async fn token(&self, client_id: &str, secret: &str) -> String {
        let answer = self.token_request(client_id, secret).await.expect(200);
        answer.json()["access_token"].as_str().expect("access_token").to_string()
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.send(self.request(Method::GET, path, Some(token))).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Answer {
        self.send(
            self.request(Method::POST, path, Some(token)).header("content-type", "application/fhir+json").json(body),
        )
        .await
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Answer {
        self.send(
            self.request(Method::PUT, path, Some(token)).header("content-type", "application/fhir+json").json(body),
        )
        .await
    }

    pub async fn patch(&self, path: &str, token: &str, operations: &Value) -> Answer {
        self.send(
            self.request(Method::PATCH, path, Some(token))
                .header("content-type", "application/json-patch+json")
                .body(operations.to_string()),
        )
        .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Answer {
        self.send(self.request(Method::DELETE, path, Some(token))).await
    }
}

/// A new CA (`ca.crt`, `ca.key`) in a new temporary folder, and a runner of `openssl` in that folder.
fn new_ca() -> (std::path::PathBuf, impl Fn(&[&str])) {
    let dir = std::env::temp_dir().join(format!("medplum-test-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let folder = dir.clone();
    let openssl = move |args: &[&str]| {
        let status =
            std::process::Command::new("openssl").args(args).current_dir(&folder).stderr(Stdio::null()).status();
        assert!(status.expect("running openssl").success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=medplum-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    (dir, openssl)
}

/// The PEM of a new CA that signs nothing: a CA bundle a connection can carry to a server that does
/// not need it (a real Medplum on plain HTTP), so that reading the bundle is still exercised.
pub fn unused_ca_pem() -> String {
    let (dir, _) = new_ca();
    let pem = std::fs::read_to_string(dir.join("ca.crt")).expect("CA");
    let _ = std::fs::remove_dir_all(&dir);
    pem
}

/// A running `medplum-test-server` child process.
struct TestServer {
    child: Child,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A project created for one test, with its project-admin ClientApplication.
#[derive(Clone)]
pub struct ProjectAdmin {
    pub project_id: String,
    pub client_id: String,
    pub client_secret: String,
    pub membership_id: String,
}

pub struct MedplumTarget {
    pub http: Http,
    super_admin: (String, String),
    server: Option<TestServer>,
}

impl MedplumTarget {
    /// A real Medplum if configured, else a new test server with default settings.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A test server that serves HTTPS with a certificate from a new CA; returns the CA's PEM too.
    /// With a real Medplum configured, returns that (its own certificates) and no CA.
    pub async fn start_tls() -> (Self, Option<String>) {
        if let Some(real) = Self::real() {
            return (real, None);
        }
        let (dir, openssl) = new_ca();
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "tls.key",
            "-out",
            "tls.csr",
        ]);
        std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
            .expect("ext file");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext",
            "-out",
            "tls.crt",
        ]);
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let target =
            Self::start_with(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]).await;
        let ca = std::fs::read_to_string(dir.join("ca.crt")).expect("CA");
        let _ = std::fs::remove_dir_all(&dir);
        let http = Http::trusting(target.base_url(), Some(&ca));
        (Self { http, ..target }, Some(ca))
    }

    /// The real Medplum named by `MEDPLUM_TEST_*`, if set.
    fn real() -> Option<Self> {
        let real = ["MEDPLUM_TEST_BASE_URL", "MEDPLUM_TEST_CLIENT_ID", "MEDPLUM_TEST_CLIENT_SECRET"]
            .map(|key| std::env::var(key).ok().filter(|v| !v.is_empty()));
        let [Some(url), Some(id), Some(secret)] = real else { return None };
        Some(Self { http: Http::new(&url), super_admin: (id, secret), server: None })
    }

    /// Like [`start`](Self::start), passing extra flags to the test server.
    pub async fn start_with(test_server_args: &[&str]) -> Self {
        if let Some(real) = Self::real() {
            return real;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let secret = format!("sa-{}", uuid::Uuid::new_v4().simple());
        let mut child = Command::new(env!("CARGO_BIN_EXE_medplum-test-server"))
            .args(["--listen", "127.0.0.1:0", "--super-admin-client-id", &id, "--super-admin-client-secret", &secret])
            .args(test_server_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting medplum-test-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next_line().await.expect("reading test server output").expect("test server printed its URL");
        let url = first.strip_prefix("listening on ").expect("first line names the URL").to_string();
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { http: Http::new(&url), super_admin: (id, secret), server: Some(TestServer { child }) }
    }

    pub fn base_url(&self) -> &str {
        &self.http.base_url
    }

    /// Whether this is the test server (fault injection and request counts are available).
    pub fn is_test_server(&self) -> bool {
        self.server.is_some()
    }

    /// The super-admin client id and secret.
    pub fn super_admin_credentials(&self) -> (String, String) {
        self.super_admin.clone()
    }

    /// A super-admin access token.
    pub async fn super_admin_token(&self) -> String {
        self.http.token(&self.super_admin.0, &self.super_admin.1).await
    }

    /// Creates a project (`Project/$init`) and a project-admin client in it (admin client endpoint,
    /// then membership `admin: true`), as API-FACTS.md section 7 recommends.
    pub async fn new_project(&self, name: &str) -> ProjectAdmin {
        let sa = self.super_admin_token().await;
        let init = json!({"resourceType": "Parameters", "parameter": [{"name": "name", "valueString": name}]});
        let project = self.http.post("fhir/R4/Project/$init", &sa, &init).await.expect(201).json();
        let project_id = project["id"].as_str().expect("project id").to_string();
        self.admin_client_with(&sa, &project_id, &format!("{name} operator admin")).await
    }

    /// Another project-admin client of the project.
    pub async fn new_admin_client(&self, project_id: &str, name: &str) -> ProjectAdmin {
        self.admin_client_with(&self.super_admin_token().await, project_id, name).await
    }

    /// A project-admin client made with the super-admin token `sa` (one token request per project
    /// matters to the rate limit tests).
    async fn admin_client_with(&self, sa: &str, project_id: &str, name: &str) -> ProjectAdmin {
        let client = self
            .http
            .send(
                self.http
                    .request(Method::POST, &format!("admin/projects/{project_id}/client"), Some(sa))
                    .json(&json!({"name": name})),
            )
            .await
            .expect(201)
            .json();
        let client_id = client["id"].as_str().expect("client id").to_string();
        let client_secret = client["secret"].as_str().expect("client secret").to_string();
        let search = self
            .http
            .get(&format!("fhir/R4/ProjectMembership?user=ClientApplication/{client_id}"), sa)
            .await
            .expect(200)
            .json();
        let membership_id = search["entry"][0]["resource"]["id"].as_str().expect("membership").to_string();
        self.http
            .patch(
                &format!("fhir/R4/ProjectMembership/{membership_id}"),
                sa,
                &json!([{"op": "add", "path": "/admin", "value": true}]),
            )
            .await
            .expect(200);
        ProjectAdmin { project_id: project_id.to_string(), client_id, client_secret, membership_id }
    }

    /// Switches fault injection on the test server (see `/__test/faults`).
    pub async fn set_faults(&self, faults: Value) {
        assert!(self.is_test_server(), "fault injection needs the test server");
        let request = self.http.request(Method::PUT, "__test/faults", None).json(&faults);
        self.http.send(request).await.expect(200);
    }

    /// Request counts of the test server, by `METHOD /path` with ids as `{id}`.
    pub async fn stats(&self) -> BTreeMap<String, u64> {
        assert!(self.is_test_server(), "request counts need the test server");
        let answer = self.http.send(self.http.request(Method::GET, "__test/stats", None)).await.expect(200);
        serde_json::from_str(&answer.text).expect("stats JSON")
    }
}
