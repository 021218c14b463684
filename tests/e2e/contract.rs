//! Contract tests: the Medplum behaviour recorded in `../shared/medplum-api/` (step ids in comments),
//! checked against the target. By default that is the test server, which proves it faithful; with
//! `MEDPLUM_TEST_*` set, the same assertions run against a real Medplum.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::medplum::{Answer, Http};
use crate::support::{MedplumTarget, ProjectAdmin};

/// A project admin's view: the HTTP client and a token.
struct Admin {
    http: Http,
    token: String,
    project: ProjectAdmin,
}

impl Admin {
    async fn new(medplum: &MedplumTarget, name: &str) -> Self {
        let project = medplum.new_project(name).await;
        let token = medplum.http.token(&project.client_id, &project.client_secret).await;
        Self { http: medplum.http.clone(), token, project }
    }

    async fn admin_post(&self, path: &str, body: &Value) -> Answer {
        let url = format!("admin/projects/{}/{path}", self.project.project_id);
        self.http.send(self.http.request(Method::POST, &url, Some(&self.token)).json(body)).await
    }

    /// A client made through the admin endpoint: (id, secret).
    async fn new_client(&self, body: Value) -> (String, String) {
        let client = self.admin_post("client", &body).await.expect(201).json();
        (client["id"].as_str().unwrap().to_string(), client["secret"].as_str().unwrap().to_string())
    }

    async fn membership_of(&self, client_id: &str) -> Value {
        let search = self
            .http
            .get(&format!("fhir/R4/ProjectMembership?user=ClientApplication/{client_id}"), &self.token)
            .await
            .expect(200)
            .json();
        search["entry"][0]["resource"].clone()
    }
}

fn outcome_text(answer: &Answer) -> String {
    answer.json()["issue"][0]["details"]["text"].as_str().unwrap_or_default().to_string()
}

fn token_error(answer: &Answer) -> String {
    assert_eq!(answer.status.as_u16(), 400, "token errors are always 400: {}", answer.text);
    let body = answer.json();
    assert_eq!(body["error"], "invalid_request");
    body["error_description"].as_str().unwrap_or_default().to_string()
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn token_endpoint_auth_me_and_health() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-token").await;
    let http = &medplum.http;
    let (id, secret) = (&admin.project.client_id, &admin.project.client_secret);

    // c1: form fields; the answer's shape.
    let token = http.token_request(id, secret).await.expect(200);
    assert!(token.header("content-type").unwrap().starts_with("application/json"));
    let body = token.json();
    assert_eq!((body["token_type"].as_str(), body["expires_in"].as_u64()), (Some("Bearer"), Some(3600)));
    assert_eq!(body["project"]["reference"], format!("Project/{}", admin.project.project_id));
    assert_eq!(body["profile"]["reference"], format!("ClientApplication/{id}"));
    assert!(body.get("refresh_token").is_none());
    // c2: HTTP Basic.
    let basic = http
        .send(
            http.request(Method::POST, "oauth2/token", None)
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", "client_credentials")]),
        )
        .await;
    basic.expect(200);
    // h7, h8, h9 and a wrong secret.
    let json_body = http
        .send(http.request(Method::POST, "oauth2/token", None).json(&json!({"grant_type": "client_credentials"})))
        .await
        .expect(400);
    assert!(json_body.header("content-type").unwrap().starts_with("text/html"));
    assert_eq!(json_body.text, "Unsupported content type");
    assert_eq!(token_error(&http.token_request("00000000-0000-0000-0000-000000000000", "x").await), "Invalid client");
    assert_eq!(token_error(&http.token_request(id, "not-the-secret").await), "Invalid secret");
    let missing = http.send(http.request(Method::POST, "oauth2/token", None).form(&[("client_id", "x")])).await;
    assert_eq!(token_error(&missing), "Missing grant_type");
    // Lifetime from accessTokenLifetime.
    let (short_id, short_secret) = admin.new_client(json!({"name": "short-lived", "accessTokenLifetime": "15m"})).await;
    assert_eq!(http.token_request(&short_id, &short_secret).await.expect(200).json()["expires_in"], 900);

    // j3: /auth/me names the project and says admin.
    let me = http.get("auth/me", &admin.token).await.expect(200).json();
    assert_eq!(me["project"]["id"], admin.project.project_id.as_str());
    assert_eq!(me["membership"]["id"], admin.project.membership_id.as_str());
    assert_eq!(me["membership"]["admin"], true);
    assert_eq!(me["profile"]["resourceType"], "ClientApplication");
    // h1, h2.
    let none = http.send(http.request(Method::GET, "fhir/R4/ClientApplication", None)).await.expect(401);
    assert!(none.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(none.json()["id"], "unauthorized");
    http.get("fhir/R4/ClientApplication", "not-a-jwt").await.expect(401);
    // j4, j6.
    let health = http.send(http.request(Method::GET, "healthcheck", None)).await.expect(200).json();
    assert_eq!(health["ok"], true);
    assert!(health["version"].as_str().is_some_and(|v| !v.is_empty()));
    let metadata = http.send(http.request(Method::GET, "fhir/R4/metadata", None)).await.expect(200).json();
    assert_eq!(
        (metadata["resourceType"].as_str(), metadata["fhirVersion"].as_str()),
        (Some("CapabilityStatement"), Some("4.0.1"))
    );
    assert_eq!(metadata["software"]["version"], health["version"]);
}

#[tokio::test]
async fn client_creation_through_admin_endpoint_and_fhir() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-clients").await;
    let http = &medplum.http;

    // b2/b6: generated secret (64 hex), application/json, membership created but not returned.
    let created = admin.admin_post("client", &json!({"name": "generated"})).await.expect(201);
    assert!(created.header("content-type").unwrap().starts_with("application/json"));
    assert!(created.header("location").is_none());
    let body = created.json();
    let secret = body["secret"].as_str().unwrap();
    assert!(secret.len() == 64 && secret.chars().all(|c| c.is_ascii_hexdigit()), "64 hex chars");
    assert_eq!(body["meta"]["project"], admin.project.project_id.as_str());
    let membership = admin.membership_of(body["id"].as_str().unwrap()).await;
    assert_eq!(membership["profile"]["reference"], format!("ClientApplication/{}", body["id"].as_str().unwrap()));
    assert!(membership.get("admin").is_none() && membership.get("accessPolicy").is_none(), "no policy: full access");
    // Caller-chosen secret.
    let (chosen_id, _) =
        admin.new_client(json!({"name": "chosen", "secret": "my-chosen-secret-0123456789abcdef"})).await;
    http.token_request(&chosen_id, "my-chosen-secret-0123456789abcdef").await.expect(200);
    // h5: name required.
    let nameless = admin.admin_post("client", &json!({})).await.expect(400);
    assert_eq!(outcome_text(&nameless), "Client name is required");
    // b2-b5, c3: meta in the body replaces meta.project: invisible to the project admin, yet it authenticates.
    let orphan = admin
        .admin_post("client", &json!({"name": "orphan", "meta": {"tag": [{"system": "https://example.com/operator", "code": "managed"}]}}))
        .await
        .expect(201)
        .json();
    let orphan_id = orphan["id"].as_str().unwrap();
    http.get(&format!("fhir/R4/ClientApplication/{orphan_id}"), &admin.token).await.expect(404);
    http.token_request(orphan_id, orphan["secret"].as_str().unwrap()).await.expect(200);

    // b7, b8, b10, b11, c1: a FHIR-created client has no membership until one is created.
    let fhir_client = http
        .post("fhir/R4/ClientApplication", &admin.token, &json!({"resourceType": "ClientApplication", "name": "fhir", "secret": "fhir-chosen-secret-abcdef0123456789"}))
        .await
        .expect(201);
    assert!(fhir_client.header("location").is_some() && fhir_client.header("etag").unwrap().starts_with("W/\""));
    let fhir_id = fhir_client.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        token_error(&http.token_request(&fhir_id, "fhir-chosen-secret-abcdef0123456789").await),
        "Invalid client"
    );
    let client_ref = format!("ClientApplication/{fhir_id}");
    http.post(
        "fhir/R4/ProjectMembership",
        &admin.token,
        &json!({"resourceType": "ProjectMembership", "project": {"reference": format!("Project/{}", admin.project.project_id)},
                "user": {"reference": client_ref}, "profile": {"reference": client_ref}}),
    )
    .await
    .expect(201);
    http.token_request(&fhir_id, "fhir-chosen-secret-abcdef0123456789").await.expect(200);
    // No secret is generated by a FHIR create (b7).
    let bare = http
        .post("fhir/R4/ClientApplication", &admin.token, &json!({"resourceType": "ClientApplication", "name": "bare"}))
        .await
        .expect(201)
        .json();
    assert!(bare.get("secret").is_none());

    // g1, g3: ClientApplication has no identifier.
    let with_identifier = http
        .post(
            "fhir/R4/ClientApplication",
            &admin.token,
            &json!({"resourceType": "ClientApplication", "name": "x", "identifier": [{"system": "s", "value": "v"}]}),
        )
        .await
        .expect(400);
    assert_eq!(outcome_text(&with_identifier), "Invalid additional property \"identifier\"");
    assert_eq!(with_identifier.json()["issue"][0]["code"], "structure");
    let search = http.get("fhir/R4/ClientApplication?identifier=s|v", &admin.token).await.expect(400);
    assert_eq!(outcome_text(&search), "Unknown search parameter: identifier");
}

#[tokio::test]
async fn secret_rotation_keeps_two_secrets_working() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-rotation").await;
    let http = &medplum.http;
    let (id, first) = admin.new_client(json!({"name": "rotating"})).await;
    let rotate = |parameter: &str, value: &str| json!({"resourceType": "Parameters", "parameter": [{"name": parameter, "valueString": value}]});
    let path = format!("fhir/R4/ClientApplication/{id}/$rotate-secret");
    // d1-d5: server-chosen new secret, old one retiring; both get tokens; Basic only with the new one.
    let rotated = http.post(&path, &admin.token, &rotate("secret", &first)).await.expect(200).json();
    assert_eq!(rotated["resourceType"], "ClientApplication");
    let second = rotated["secret"].as_str().unwrap().to_string();
    assert_eq!(rotated["retiringSecret"], first.as_str());
    http.token_request(&id, &first).await.expect(200);
    http.token_request(&id, &second).await.expect(200);
    let basic = |secret: &str| {
        http.request(Method::GET, "fhir/R4/Patient?_count=1", None).basic_auth(&id, Some(secret.to_string()))
    };
    http.send(basic(&first)).await.expect(401);
    // d6, d7: retiring ends the old secret.
    http.post(&path, &admin.token, &rotate("retiringSecret", &first)).await.expect(200);
    assert_eq!(token_error(&http.token_request(&id, &first).await), "Invalid secret");
    // Mismatch.
    let mismatch = http.post(&path, &admin.token, &rotate("secret", "not-current")).await.expect(400);
    assert_eq!(outcome_text(&mismatch), "Provided secret does not match client");

    // d10-d12: caller-chosen rotation with PUT and If-Match.
    let current = http.get(&format!("fhir/R4/ClientApplication/{id}"), &admin.token).await.expect(200);
    let etag = current.header("etag").unwrap();
    let mut body = current.json();
    body["secret"] = json!("operator-chosen-v3-secret-000000000000");
    body["retiringSecret"] = json!(second);
    let put = http
        .send(
            http.request(Method::PUT, &format!("fhir/R4/ClientApplication/{id}"), Some(&admin.token))
                .header("if-match", etag)
                .json(&body),
        )
        .await;
    put.expect(200);
    http.token_request(&id, "operator-chosen-v3-secret-000000000000").await.expect(200);
    http.token_request(&id, &second).await.expect(200);
    // A project member cannot rotate (k5): a client without admin in the project.
    let (member_id, member_secret) = admin.new_client(json!({"name": "member"})).await;
    let member_token = http.token(&member_id, &member_secret).await;
    http.post(&path, &member_token, &rotate("secret", "operator-chosen-v3-secret-000000000000")).await.expect(403);
}

#[tokio::test]
async fn conditional_writes_etags_and_full_replace() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-conditional").await;
    let http = &medplum.http;
    let tag = format!("ns.app-{}", crate::support::suffix());
    let key = format!("https://example.com/operator/key|{tag}");
    let client = json!({"resourceType": "ClientApplication", "name": "cond",
        "meta": {"tag": [{"system": "https://example.com/operator/key", "code": tag}]}, "secret": "cond-create-secret-0000000000000001"});
    let create = |condition: String, body: Value| {
        let request = http
            .request(Method::POST, "fhir/R4/ClientApplication", Some(&admin.token))
            .header("if-none-exist", condition)
            .json(&body);
        http.send(request)
    };
    // g4, g5: conditional create, then the same again finds it.
    let first = create(format!("_tag={key}"), client.clone()).await.expect(201);
    assert!(first.header("location").is_some());
    let id = first.json()["id"].as_str().unwrap().to_string();
    let again = create(format!("_tag={key}"), client.clone()).await.expect(200);
    assert!(again.header("location").is_none());
    assert_eq!(again.json()["id"], id.as_str());
    // g6, g7, g8: conditional update.
    let mut updated = client.clone();
    updated["description"] = json!("updated via conditional PUT");
    let by_tag = |tag_query: String, body: Value| {
        http.send(
            http.request(Method::PUT, &format!("fhir/R4/ClientApplication?_tag={tag_query}"), Some(&admin.token))
                .json(&body),
        )
    };
    let one = by_tag(key.clone(), updated.clone()).await.expect(200).json();
    assert_eq!(
        (one["id"].as_str(), one["description"].as_str()),
        (Some(id.as_str()), Some("updated via conditional PUT"))
    );
    let other_tag = format!("{tag}-2");
    let mut second = client.clone();
    second["meta"]["tag"][0]["code"] = json!(other_tag);
    by_tag(format!("https://example.com/operator/key|{other_tag}"), second).await.expect(201);
    let mut shared = client.clone();
    shared["meta"]["tag"] = json!([{"system": "urn:shared", "code": tag}]);
    for _ in 0..2 {
        http.post("fhir/R4/ClientApplication", &admin.token, &shared).await.expect(201);
    }
    let many = by_tag(format!("urn:shared|{tag}"), shared.clone()).await.expect(412);
    assert_eq!(many.json()["id"], "multiple-matches");
    // g21
    create(format!("_tag=urn:shared|{tag}"), shared).await.expect(412);

    // g9-g11c: If-Match in all three spellings; stale gives 412.
    let path = format!("fhir/R4/ClientApplication/{id}");
    let current = http.get(&path, &admin.token).await.expect(200);
    let version = current.json()["meta"]["versionId"].as_str().unwrap().to_string();
    assert_eq!(current.header("etag").unwrap(), format!("W/\"{version}\""));
    let put_if = |if_match: String, body: Value| {
        http.send(http.request(Method::PUT, &path, Some(&admin.token)).header("if-match", if_match).json(&body))
    };
    let mut body = current.json();
    body["description"] = json!("v2");
    let v2 = put_if(format!("W/\"{version}\""), body.clone()).await.expect(200).json();
    let stale = put_if(format!("W/\"{version}\""), body.clone()).await.expect(412);
    assert_eq!(stale.json()["id"], "precondition-failed");
    let v2_version = v2["meta"]["versionId"].as_str().unwrap().to_string();
    put_if(format!("\"{v2_version}\""), v2.clone()).await.expect(200);
    // An identical PUT creates no new version (g11c).
    let same = put_if(v2_version.clone(), v2.clone()).await.expect(200).json();
    assert_eq!(same["meta"]["versionId"], v2_version.as_str());
    // g12: PATCH with a stale If-Match.
    let stale_patch = http.send(
        http.request(Method::PATCH, &path, Some(&admin.token))
            .header("content-type", "application/json-patch+json")
            .header("if-match", format!("W/\"{version}\""))
            .body(json!([{"op": "replace", "path": "/description", "value": "p"}]).to_string()),
    );
    stale_patch.await.expect(412);
    // g13, g14: PUT is a full replace: no secret, no tags.
    let bare = http
        .put(&path, &admin.token, &json!({"resourceType": "ClientApplication", "id": id, "name": "cond"}))
        .await
        .expect(200)
        .json();
    assert!(bare.get("secret").is_none(), "leaving out secret deletes it");
    assert!(bare["meta"].get("tag").is_none(), "leaving out meta.tag deletes the tags");
    // h10: 410 after delete, h6: 404 for unknown ids.
    http.delete(&path, &admin.token).await.expect(200);
    http.get(&path, &admin.token).await.expect(410);
    http.get("fhir/R4/AccessPolicy/00000000-0000-0000-0000-000000000000", &admin.token).await.expect(404);
}

#[tokio::test]
async fn ending_credentials() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-ending").await;
    let http = &medplum.http;

    // c4-c6: status off refuses new tokens, tokens already issued keep working.
    let (id, secret) = admin.new_client(json!({"name": "to-disable"})).await;
    let token = http.token(&id, &secret).await;
    http.patch(
        &format!("fhir/R4/ClientApplication/{id}"),
        &admin.token,
        &json!([{"op": "add", "path": "/status", "value": "off"}]),
    )
    .await
    .expect(200);
    assert_eq!(token_error(&http.token_request(&id, &secret).await), "Invalid client");
    http.get("fhir/R4/Patient?_count=1", &token).await.expect(200);

    // f11-f13: inactive membership: a token is issued but cannot be used.
    let (id, secret) = admin.new_client(json!({"name": "inactive"})).await;
    let membership = admin.membership_of(&id).await;
    let mid = membership["id"].as_str().unwrap();
    http.patch(
        &format!("fhir/R4/ProjectMembership/{mid}"),
        &admin.token,
        &json!([{"op": "add", "path": "/active", "value": false}]),
    )
    .await
    .expect(200);
    let inactive_token = http.token(&id, &secret).await;
    http.get("fhir/R4/Patient?_count=1", &inactive_token).await.expect(401);

    // c7-c10: deleting the client ends its tokens and leaves the membership behind.
    let (id, secret) = admin.new_client(json!({"name": "to-delete"})).await;
    let token = http.token(&id, &secret).await;
    let membership = admin.membership_of(&id).await;
    http.delete(&format!("fhir/R4/ClientApplication/{id}"), &admin.token).await.expect(200);
    assert_eq!(token_error(&http.token_request(&id, &secret).await), "Invalid client");
    let used = http.get("fhir/R4/Patient?_count=1", &token).await.expect(400);
    assert_eq!(outcome_text(&used), "Authentication error");
    http.get(&format!("fhir/R4/ProjectMembership/{}", membership["id"].as_str().unwrap()), &admin.token)
        .await
        .expect(200);

    // m1-m4: deleting the membership (admin endpoint) ends live tokens.
    let (id, secret) = admin.new_client(json!({"name": "to-remove"})).await;
    let token = http.token(&id, &secret).await;
    let mid = admin.membership_of(&id).await["id"].as_str().unwrap().to_string();
    let url = format!("admin/projects/{}/members/{mid}", admin.project.project_id);
    http.send(http.request(Method::DELETE, &url, Some(&admin.token))).await.expect(200);
    assert_eq!(outcome_text(&http.get("fhir/R4/Patient?_count=1", &token).await.expect(400)), "Authentication error");
    assert_eq!(token_error(&http.token_request(&id, &secret).await), "Invalid client");

    // e10-e13: a policy in use can be deleted, and then its clients fail to authenticate.
    let policy = http
        .post("fhir/R4/AccessPolicy", &admin.token, &json!({"resourceType": "AccessPolicy", "name": "in-use", "resource": [{"resourceType": "Patient", "readonly": true}]}))
        .await
        .expect(201)
        .json();
    let policy_ref = format!("AccessPolicy/{}", policy["id"].as_str().unwrap());
    let (id, secret) =
        admin.new_client(json!({"name": "policy-user", "accessPolicy": {"reference": policy_ref}})).await;
    let users = http
        .get(&format!("fhir/R4/ProjectMembership?access-policy={policy_ref}"), &admin.token)
        .await
        .expect(200)
        .json();
    assert_eq!(ids(&users).len(), 1);
    let token = http.token(&id, &secret).await;
    http.delete(&format!("fhir/R4/{policy_ref}"), &admin.token).await.expect(200);
    assert_eq!(token_error(&http.token_request(&id, &secret).await), INVALID_POLICY);
    let used = http.get("fhir/R4/Patient?_count=1", &token).await.expect(400);
    assert_eq!(outcome_text(&used), "Authentication error");
    assert_eq!(used.json()["issue"][0]["diagnostics"], format!("OperationOutcomeError: {INVALID_POLICY}"));
}

const INVALID_POLICY: &str = "Cannot authenticate: Invalid access policy configuration. Please contact your administrator to update your project membership.";

#[tokio::test]
async fn ip_rules_apply_to_the_token_request_after_the_secret() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-ip-rules").await;
    let http = &medplum.http;
    // The suite calls from 127.0.0.1, which every rule below is written against.
    let admin = &admin;
    let client_with = |rules: Vec<Value>| async move {
        let policy = json!({"resourceType": "AccessPolicy", "name": "ip", "ipAccessRule": rules,
                            "resource": [{"resourceType": "Patient", "readonly": true}]});
        let policy = http.post("fhir/R4/AccessPolicy", &admin.token, &policy).await.expect(201).json();
        let reference = format!("AccessPolicy/{}", policy["id"].as_str().unwrap());
        admin.new_client(json!({"name": "ip", "accessPolicy": {"reference": reference}})).await
    };
    let rule = |value: &str, action: &str| json!({"name": value, "value": value, "action": action});
    // Blocked: only a right secret learns so; a wrong one is refused first.
    let (id, secret) = client_with(vec![rule("10.2.", "allow"), rule("1", "block")]).await;
    assert_eq!(token_error(&http.token_request(&id, "not-the-secret").await), "Invalid secret");
    assert_eq!(token_error(&http.token_request(&id, &secret).await), "IP address not allowed");
    // The first matching rule decides; `*` matches every address; no match allows.
    let (id, secret) = client_with(vec![rule("127.0.0.1", "allow"), rule("*", "block")]).await;
    http.token_request(&id, &secret).await.expect(200);
    let (id, secret) = client_with(vec![rule("*", "block"), rule("127.", "allow")]).await;
    assert_eq!(token_error(&http.token_request(&id, &secret).await), "IP address not allowed");
    let (id, secret) = client_with(vec![rule("10.", "block")]).await;
    http.token_request(&id, &secret).await.expect(200);
    // The rules of all of a membership's policies form one list, in the order of its policies.
    let second = json!({"resourceType": "AccessPolicy", "name": "ip-2", "ipAccessRule": [rule("127.", "block")]});
    let second = http.post("fhir/R4/AccessPolicy", &admin.token, &second).await.expect(201).json();
    let mut membership = admin.membership_of(&id).await;
    membership["access"] = json!([{"policy": membership["accessPolicy"]}, {"policy": {"reference": format!("AccessPolicy/{}", second["id"].as_str().unwrap())}}]);
    membership.as_object_mut().unwrap().remove("accessPolicy");
    let path = format!("fhir/R4/ProjectMembership/{}", membership["id"].as_str().unwrap());
    http.put(&path, &admin.token, &membership).await.expect(200);
    assert_eq!(token_error(&http.token_request(&id, &secret).await), "IP address not allowed");
    // A rule needs a value and an action.
    for (broken, field) in [(json!({"value": "", "action": "block"}), "value"), (json!({"value": "1"}), "action")] {
        let policy = json!({"resourceType": "AccessPolicy", "name": "broken", "ipAccessRule": [broken]});
        let refused = http.post("fhir/R4/AccessPolicy", &admin.token, &policy).await.expect(400);
        assert_eq!(outcome_text(&refused), "Missing required property");
        assert_eq!(refused.json()["issue"][0]["expression"][0], format!("AccessPolicy.ipAccessRule[0].{field}"));
    }
}

#[tokio::test]
async fn invites_and_memberships() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-invites").await;
    let http = &medplum.http;
    let policy = http
        .post("fhir/R4/AccessPolicy", &admin.token, &json!({"resourceType": "AccessPolicy", "name": "readers", "resource": [{"resourceType": "Patient", "readonly": true}]}))
        .await
        .expect(201)
        .json();
    let policy_ref = json!({"reference": format!("AccessPolicy/{}", policy["id"].as_str().unwrap())});
    let email = format!("Alice.{}@Example.com", crate::support::suffix());
    let key = format!("ns.alice-{}", crate::support::suffix());
    // f1: invite answers 200 fhir+json with the membership; email lower-cased; membership.* kept.
    let admin = &admin;
    let invite = |body: Value| async move { admin.admin_post("invite", &body).await };
    let invited =
        invite(json!({"resourceType": "Practitioner", "firstName": "Alice", "lastName": "Op", "email": email,
        "sendEmail": false, "accessPolicy": policy_ref, "admin": false,
        "membership": {"identifier": [{"system": "https://example.com/operator/key", "value": key}]}}))
        .await
        .expect(200);
    assert!(invited.header("content-type").unwrap().starts_with("application/fhir+json"));
    let membership = invited.json();
    assert_eq!(membership["resourceType"], "ProjectMembership");
    assert_eq!(membership["accessPolicy"], policy_ref);
    assert_eq!(membership["user"]["display"], email.to_lowercase().as_str());
    let mid = membership["id"].as_str().unwrap().to_string();
    let found = http
        .get(&format!("fhir/R4/ProjectMembership?identifier=https://example.com/operator/key|{key}"), &admin.token)
        .await
        .expect(200)
        .json();
    assert_eq!(ids(&found), std::slice::from_ref(&mid));
    // f2: same email again → 409.
    let again = invite(json!({"resourceType": "Practitioner", "firstName": "Alice", "lastName": "Op", "email": email, "sendEmail": false})).await.expect(409);
    assert_eq!(outcome_text(&again), "User is already a member of this project");
    // f3: upsert overwrites accessPolicy and admin even when absent: without a policy the membership
    // gets the project default for its role again (access silently widens), and admin is cleared;
    // membership.identifier, not sent, is kept.
    let upserted = invite(json!({"resourceType": "Practitioner", "firstName": "Alice", "lastName": "Op", "email": email, "sendEmail": false, "upsert": true}))
        .await
        .expect(200)
        .json();
    assert_eq!(upserted["accessPolicy"]["display"], "Default Practitioner Access Policy", "{upserted}");
    assert!(upserted.get("admin").is_none(), "upsert cleared admin: {upserted}");
    assert_eq!(upserted["identifier"][0]["value"], key.as_str());
    // An invite naming a policy that does not exist is refused.
    let missing_policy = invite(json!({"resourceType": "Practitioner", "firstName": "Dan", "lastName": "Op",
        "email": format!("dan-{}@example.com", crate::support::suffix()), "sendEmail": false,
        "accessPolicy": {"reference": "AccessPolicy/00000000-0000-0000-0000-000000000000"}}))
    .await
    .expect(400);
    assert_eq!(
        outcome_text(&missing_policy),
        "Access policy AccessPolicy/00000000-0000-0000-0000-000000000000 does not exist"
    );
    // f4: no policy given → the project default for Practitioners; f7/f6 visibility of users.
    let bob_email = format!("bob-{}@example.com", crate::support::suffix());
    let bob = invite(json!({"resourceType": "Practitioner", "firstName": "Bob", "lastName": "Proj", "email": bob_email, "sendEmail": false, "scope": "project"}))
        .await
        .expect(200)
        .json();
    assert_eq!(bob["accessPolicy"]["display"], "Default Practitioner Access Policy");
    let chained = http
        .get(&format!("fhir/R4/ProjectMembership?user:User.email={bob_email}"), &admin.token)
        .await
        .expect(200)
        .json();
    assert_eq!(
        ids(&chained),
        std::slice::from_ref(&bob["id"].as_str().unwrap().to_string()),
        "chained user:User.email"
    );
    let users = http.get(&format!("fhir/R4/User?email={bob_email}"), &admin.token).await.expect(200).json();
    assert_eq!(ids(&users).len(), 1, "project-scoped users are visible to the project admin");
    let alice_users =
        http.get(&format!("fhir/R4/User?email={}", email.to_lowercase()), &admin.token).await.expect(200).json();
    assert!(ids(&alice_users).is_empty(), "server-scoped users are not");
    // f5: Patient by externalId only, project-scoped.
    let external = format!("ext-{}", crate::support::suffix());
    let carl = invite(json!({"resourceType": "Patient", "firstName": "Carl", "lastName": "Ext", "externalId": external, "sendEmail": false})).await.expect(200).json();
    assert_eq!(carl["externalId"], external.as_str());
    assert_eq!(carl["accessPolicy"]["display"], "Default Patient Access Policy");

    // f9: toggling admin swaps the default Practitioner policy for the default Admin policy.
    let bob_id = bob["id"].as_str().unwrap();
    let members_url = format!("admin/projects/{}/members/{bob_id}", admin.project.project_id);
    let mut bob_admin = bob.clone();
    bob_admin["admin"] = json!(true);
    let swapped = http
        .send(http.request(Method::POST, &members_url, Some(&admin.token)).json(&bob_admin))
        .await
        .expect(200)
        .json();
    assert_eq!(swapped["accessPolicy"]["display"], "Default Admin Access Policy");
    // f10: body id must match the URL.
    let wrong = http.send(
        http.request(Method::POST, &members_url, Some(&admin.token))
            .json(&json!({"resourceType": "ProjectMembership", "id": "00000000-0000-0000-0000-000000000000"})),
    );
    wrong.await.expect(403);
    // GET member; f17: DELETE removes a project-scoped user with its only membership.
    http.send(http.request(Method::GET, &members_url, Some(&admin.token))).await.expect(200);
    http.send(http.request(Method::DELETE, &members_url, Some(&admin.token))).await.expect(200);
    let after = http.get(&format!("fhir/R4/User?email={bob_email}"), &admin.token).await.expect(200).json();
    assert!(ids(&after).is_empty(), "project-scoped user deleted with its last membership");
    // e6: FHIR PUT of a membership.
    let mut alice = http.get(&format!("fhir/R4/ProjectMembership/{mid}"), &admin.token).await.expect(200).json();
    alice["active"] = json!(false);
    let put = http.put(&format!("fhir/R4/ProjectMembership/{mid}"), &admin.token, &alice).await.expect(200).json();
    assert_eq!(put["active"], false);
    let inactive = http.get("fhir/R4/ProjectMembership?active=false", &admin.token).await.expect(200).json();
    assert!(ids(&inactive).contains(&mid));
}

#[tokio::test]
async fn search_tags_names_and_policies() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-search").await;
    let http = &medplum.http;
    let run = crate::support::suffix();
    for name in [format!("op-{run}-1"), format!("op-{run}-10"), format!("op-{run}-2")] {
        let tag = json!([{"system": "https://example.com/operator", "code": run}]);
        http.post(
            "fhir/R4/ClientApplication",
            &admin.token,
            &json!({"resourceType": "ClientApplication", "name": name, "meta": {"tag": tag}}),
        )
        .await
        .expect(201);
    }
    let names = |bundle: Value| -> Vec<String> {
        let mut names: Vec<String> = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["resource"]["name"].as_str())
            .map(str::to_string)
            .collect();
        names.sort();
        names
    };
    // name= is a prefix match; name:exact is exact (g18).
    let prefix = http.get(&format!("fhir/R4/ClientApplication?name=op-{run}-1"), &admin.token).await.expect(200).json();
    assert_eq!(names(prefix), [format!("op-{run}-1"), format!("op-{run}-10")]);
    let exact =
        http.get(&format!("fhir/R4/ClientApplication?name:exact=op-{run}-1"), &admin.token).await.expect(200).json();
    assert_eq!(names(exact), [format!("op-{run}-1")]);
    let tagged = http
        .get(&format!("fhir/R4/ClientApplication?_tag=https://example.com/operator|{run}"), &admin.token)
        .await
        .expect(200)
        .json();
    assert_eq!(tagged["resourceType"], "Bundle");
    assert_eq!(tagged["type"], "searchset");
    assert_eq!(names(tagged).len(), 3);
    // _elements marks results SUBSETTED (e14).
    let subset = http
        .get(&format!("fhir/R4/ClientApplication?_tag=https://example.com/operator|{run}&_elements=name"), &admin.token)
        .await
        .expect(200)
        .json();
    let tags = &subset["entry"][0]["resource"]["meta"]["tag"];
    assert!(tags.as_array().unwrap().iter().any(|t| t["code"] == "SUBSETTED"));
    // Memberships by profile and by profile type.
    let clients =
        http.get("fhir/R4/ProjectMembership?profile-type=ClientApplication", &admin.token).await.expect(200).json();
    assert!(ids(&clients).contains(&admin.project.membership_id));
    let admins = http.get("fhir/R4/ProjectMembership?admin=true", &admin.token).await.expect(200).json();
    assert_eq!(ids(&admins), std::slice::from_ref(&admin.project.membership_id));
    // h3, h4: strict validation of AccessPolicy.
    let bogus = http
        .post("fhir/R4/AccessPolicy", &admin.token, &json!({"resourceType": "AccessPolicy", "name": "bad", "resource": [{"resourceType": "Patient", "bogus": 1}]}))
        .await
        .expect(400);
    assert_eq!(outcome_text(&bogus), "Invalid additional property \"bogus\"");
    assert_eq!(bogus.json()["issue"][0]["expression"][0], "AccessPolicy.resource[0].bogus");
    let missing = http
        .post(
            "fhir/R4/AccessPolicy",
            &admin.token,
            &json!({"resourceType": "AccessPolicy", "name": "bad", "resource": [{"readonly": true}]}),
        )
        .await
        .expect(400);
    assert_eq!(outcome_text(&missing), "Missing required property");
}

#[tokio::test]
async fn project_init_creates_the_defaults() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-init").await;
    let http = &medplum.http;
    // a12: four default policies; a11: a default client besides ours.
    let policies = http.get("fhir/R4/AccessPolicy", &admin.token).await.expect(200).json();
    let mut names: Vec<&str> =
        policies["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["name"].as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "Default Admin Access Policy",
            "Default Patient Access Policy",
            "Default Practitioner Access Policy",
            "Default RelatedPerson Access Policy"
        ]
    );
    let clients = http.get("fhir/R4/ClientApplication?name=contract-init", &admin.token).await.expect(200).json();
    let client_names: Vec<&str> =
        clients["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["name"].as_str()).collect();
    assert!(client_names.contains(&"contract-init Default Client"), "{client_names:?}");
    // b1: the project admin reads its project.
    let project = http
        .send(http.request(Method::GET, &format!("admin/projects/{}", admin.project.project_id), Some(&admin.token)))
        .await
        .expect(200)
        .json();
    assert_eq!(project["project"]["id"], admin.project.project_id.as_str());
    // a13: a plain member of a project may create a project.
    let (member_id, member_secret) = admin.new_client(json!({"name": "member"})).await;
    let member_token = http.token(&member_id, &member_secret).await;
    let init =
        json!({"resourceType": "Parameters", "parameter": [{"name": "name", "valueString": "member's project"}]});
    http.post("fhir/R4/Project/$init", &member_token, &init).await.expect(201);
    // k2, k3: members cannot read memberships or use admin endpoints.
    http.get("fhir/R4/ProjectMembership", &member_token).await.expect(403);
    let url = format!("admin/projects/{}/client", admin.project.project_id);
    http.send(http.request(Method::POST, &url, Some(&member_token)).json(&json!({"name": "x"}))).await.expect(403);
}

/// HTTP Basic on `/auth/me` with client credentials: how the operator checks credentials without
/// spending the auth rate limit (d5).
#[tokio::test]
async fn basic_auth_on_auth_me_checks_the_current_secret_and_the_ip_rules() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-basic").await;
    let http = &medplum.http;
    let basic = |id: &str, secret: &str| {
        let request = http.request(Method::GET, "auth/me", None).basic_auth(id, Some(secret));
        async move { http.send(request).await }
    };
    let (id, secret) = admin.new_client(json!({"name": "basic"})).await;
    let me = basic(&id, &secret).await.expect(200).json();
    let profile = (me["profile"]["resourceType"].as_str(), me["profile"]["id"].as_str());
    assert_eq!(profile, (Some("ClientApplication"), Some(id.as_str())), "the client itself");
    assert_eq!(basic(&id, "not-the-secret").await.status.as_u16(), 401);
    // Only the current secret: a retiring one is refused (d4).
    let mut client = http.get(&format!("fhir/R4/ClientApplication/{id}"), &admin.token).await.expect(200).json();
    client["retiringSecret"] = json!(secret);
    client["secret"] = json!("b".repeat(64));
    http.put(&format!("fhir/R4/ClientApplication/{id}"), &admin.token, &client).await.expect(200);
    assert_eq!(basic(&id, &secret).await.status.as_u16(), 401);
    basic(&id, &"b".repeat(64)).await.expect(200);
    // IP rules refuse Basic auth as 401, whatever the secret; the token endpoint then says why.
    let rule = |value: &str, action: &str| json!({"name": value, "value": value, "action": action});
    let policy = json!({"resourceType": "AccessPolicy", "name": "office", "ipAccessRule": [rule("10.2.", "allow"), rule("*", "block")],
                        "resource": [{"resourceType": "Patient", "readonly": true}]});
    let policy = http.post("fhir/R4/AccessPolicy", &admin.token, &policy).await.expect(201).json();
    let reference = format!("AccessPolicy/{}", policy["id"].as_str().unwrap());
    let (id, secret) = admin.new_client(json!({"name": "office", "accessPolicy": {"reference": reference}})).await;
    assert_eq!(basic(&id, &secret).await.status.as_u16(), 401);
    assert_eq!(token_error(&http.token_request(&id, &secret).await), "IP address not allowed");
    // An inactive client is refused too.
    let (id, secret) = admin.new_client(json!({"name": "off"})).await;
    let mut client = http.get(&format!("fhir/R4/ClientApplication/{id}"), &admin.token).await.expect(200).json();
    client["status"] = json!("off");
    http.put(&format!("fhir/R4/ClientApplication/{id}"), &admin.token, &client).await.expect(200);
    assert_eq!(basic(&id, &secret).await.status.as_u16(), 401);
}

/// The searches that keep the operator's view of a project current: every object of its ownership
/// system (`_tag=<system>|`, `identifier=<system>|`), and one system-level search over the three
/// types for what changed since a time (`_type`, `_lastUpdated=ge`), whatever the tags.
#[tokio::test]
async fn searches_for_everything_managed_and_for_what_changed() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-sweep").await;
    let http = &medplum.http;
    let system = format!("urn:medplum-operator:contract-{}", crate::support::suffix());
    let tag = |code: &str| json!([{"system": system, "code": code}]);
    let mut clients = Vec::new();
    for code in ["ClientApplication/a/x", "ClientApplication/a/y"] {
        let body = json!({"resourceType": "ClientApplication", "name": code, "meta": {"tag": tag(code)}});
        clients.push(http.post("fhir/R4/ClientApplication", &admin.token, &body).await.expect(201).json());
    }
    let untagged = json!({"resourceType": "ClientApplication", "name": "not ours"});
    http.post("fhir/R4/ClientApplication", &admin.token, &untagged).await.expect(201);
    let client_id = clients[0]["id"].as_str().unwrap();
    let reference = format!("ClientApplication/{client_id}");
    let membership = json!({"resourceType": "ProjectMembership",
        "project": {"reference": format!("Project/{}", admin.project.project_id)},
        "user": {"reference": reference}, "profile": {"reference": reference},
        "identifier": [{"system": system, "value": "ClientApplication/a/x"}]});
    let membership = http.post("fhir/R4/ProjectMembership", &admin.token, &membership).await.expect(201).json();
    let project = format!("_project={}", admin.project.project_id);

    let swept = http
        .get(&format!("fhir/R4/ClientApplication?_tag={system}|&{project}&_count=1000&_offset=0"), &admin.token)
        .await
        .expect(200)
        .json();
    let mut found = ids(&swept);
    found.sort();
    let mut expected: Vec<String> = clients.iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    expected.sort();
    assert_eq!(found, expected, "every client of the system, and only those");
    let swept = http
        .get(&format!("fhir/R4/ProjectMembership?identifier={system}|&{project}&_count=1000&_offset=0"), &admin.token)
        .await
        .expect(200)
        .json();
    assert_eq!(ids(&swept), [membership["id"].as_str().unwrap()]);

    // What changed since the newest version: an edit that removed the tag is found all the same.
    let newest = clients[1]["meta"]["lastUpdated"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut edited = clients[0].clone();
    edited["meta"]["tag"] = json!([]);
    edited["name"] = json!("edited in the console");
    let edited =
        http.put(&format!("fhir/R4/ClientApplication/{client_id}"), &admin.token, &edited).await.expect(200).json();
    let since = format!("ge{}", edited["meta"]["lastUpdated"].as_str().unwrap());
    let changes = http
        .get(&format!("fhir/R4?_type=ClientApplication,ProjectMembership,AccessPolicy&{project}&_lastUpdated={since}&_count=1000&_offset=0"), &admin.token)
        .await
        .expect(200)
        .json();
    let changed: Vec<(String, String)> = changes["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["resource"]["resourceType"].as_str().unwrap().to_string(),
                e["resource"]["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(changed, [("ClientApplication".to_string(), client_id.to_string())], "only what changed since");
    assert!(newest.as_str() < &since[2..]);
    // Without `_type`, a system-level search is refused.
    let refused = http.get(&format!("fhir/R4?{project}&_lastUpdated={since}"), &admin.token).await;
    assert_eq!(refused.status.as_u16(), 400, "{}", refused.text);
}

#[tokio::test]
async fn rate_limits_and_fault_injection() {
    let medplum = MedplumTarget::start_with(&["--auth-rate-limit", "5", "--fhir-quota", "250"]).await;
    if !medplum.is_test_server() {
        crate::support::skip("rate limit settings and fault injection need the Medplum test server");
        return;
    }
    let admin = medplum.new_project("contract-limits").await; // one token request
    let http = &medplum.http;
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(http.token_request(&admin.client_id, &admin.client_secret).await);
    }
    let limited = answers.pop().unwrap();
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(limited.status.as_u16(), 429);
    assert!(limited.header("retry-after").is_none(), "Medplum sends no Retry-After");
    let body = limited.json();
    assert_eq!(
        (body["id"].as_str(), body["issue"][0]["code"].as_str()),
        (Some("too-many-requests"), Some("throttled"))
    );
    let diagnostics: Value = serde_json::from_str(body["issue"][0]["diagnostics"].as_str().unwrap()).unwrap();
    assert_eq!(diagnostics["limit"], 5);
    assert!(limited.header("ratelimit").unwrap().starts_with("\"requests\";r=0;t="));
    // /auth/me is outside the auth limiter.
    let token = answers[0].json()["access_token"].as_str().unwrap().to_string();
    http.get("auth/me", &token).await.expect(200);
    // h13: the FHIR quota per membership (writes cost 100 units; 250 allow two).
    let policy = json!({"resourceType": "AccessPolicy", "name": "quota", "resource": [{"resourceType": "Patient"}]});
    http.post("fhir/R4/AccessPolicy", &token, &policy).await.expect(201);
    let second = http.post("fhir/R4/AccessPolicy", &token, &policy).await.expect(201);
    assert!(
        second
            .headers
            .get_all("ratelimit")
            .iter()
            .any(|v| v.to_str().unwrap().starts_with("\"fhirInteractions\";r=50;"))
    );
    let over = http.post("fhir/R4/AccessPolicy", &token, &policy).await.expect(429);
    assert_eq!(over.json()["id"], "too-many-requests");

    medplum.set_faults(json!({"errorRate": 1.0})).await;
    http.get("auth/me", &token).await.expect(500);
    medplum.set_faults(json!({"tooManyRequestsRate": 1.0, "pathPrefix": "/fhir/"})).await;
    http.get("fhir/R4/ClientApplication", &token).await.expect(429);
    http.get("auth/me", &token).await.expect(200);
    medplum.set_faults(json!({"latencyMs": 300})).await;
    let started = std::time::Instant::now();
    http.get("auth/me", &token).await.expect(200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    medplum.set_faults(json!({"dropRate": 1.0})).await;
    let dropped = reqwest::Client::new().get(format!("{}auth/me", http.base_url)).bearer_auth(&token).send().await;
    assert!(dropped.is_err() || dropped.unwrap().bytes().await.is_err(), "connection dropped");
    medplum.set_faults(json!({"outage": true})).await;
    let fresh = reqwest::Client::new().get(format!("{}healthcheck", http.base_url)).send().await;
    assert!(fresh.is_err(), "new connections are refused during an outage");
    medplum.set_faults(json!({})).await;
    http.send(http.request(Method::GET, "healthcheck", None)).await.expect(200);
    let stats = medplum.stats().await;
    assert!(stats.get("POST /oauth2/token").copied().unwrap_or(0) >= 6, "{stats:?}");
}

#[tokio::test]
async fn the_writes_and_searches_the_operator_makes() {
    let medplum = MedplumTarget::start().await;
    let admin = Admin::new(&medplum, "contract-operator").await;
    let http = &medplum.http;
    let project = format!("Project/{}", admin.project.project_id);

    // A membership created with If-None-Exist on its user: 201, then the same one again with 200.
    let client = http
        .post(
            "fhir/R4/ClientApplication",
            &admin.token,
            &json!({"resourceType": "ClientApplication", "name": "cond-member"}),
        )
        .await
        .expect(201)
        .json();
    let client_ref = format!("ClientApplication/{}", client["id"].as_str().unwrap());
    let membership = json!({"resourceType": "ProjectMembership", "project": {"reference": project},
        "user": {"reference": client_ref}, "profile": {"reference": client_ref},
        "identifier": [{"system": "https://example.com/operator", "value": "ns/cond-member"}]});
    let create = || {
        http.send(
            http.request(Method::POST, "fhir/R4/ProjectMembership", Some(&admin.token))
                .header("if-none-exist", format!("user={client_ref}"))
                .json(&membership),
        )
    };
    let first = create().await.expect(201).json();
    let again = create().await.expect(200).json();
    assert_eq!(again["id"], first["id"]);
    let mid = first["id"].as_str().unwrap().to_string();

    // access-policy= matches access[].policy as well as accessPolicy.
    let policy = http
        .post(
            "fhir/R4/AccessPolicy",
            &admin.token,
            &json!({"resourceType": "AccessPolicy", "name": "granted", "resource": [{"resourceType": "Patient"}]}),
        )
        .await
        .expect(201)
        .json();
    let policy_ref = format!("AccessPolicy/{}", policy["id"].as_str().unwrap());
    let mut granted = first.clone();
    granted["access"] = json!([{"policy": {"reference": policy_ref},
                                "parameter": [{"name": "organization", "valueReference": {"reference": "Organization/1"}}]}]);
    let version = first["meta"]["versionId"].as_str().unwrap();
    let path = format!("fhir/R4/ProjectMembership/{mid}");
    let put = http.send(
        http.request(Method::PUT, &path, Some(&admin.token))
            .header("if-match", format!("W/\"{version}\""))
            .json(&granted),
    );
    let updated = put.await.expect(200).json();
    assert_eq!(updated["access"], granted["access"]);
    let users = http.get(&format!("fhir/R4/ProjectMembership?access-policy={policy_ref}"), &admin.token).await;
    assert_eq!(ids(&users.expect(200).json()), std::slice::from_ref(&mid));

    // external-id= finds a membership by its external id.
    let external = format!("ext-{}", crate::support::suffix());
    let invited = admin
        .admin_post("invite", &json!({"resourceType": "Patient", "firstName": "Eve", "lastName": "Ext", "externalId": external, "sendEmail": false}))
        .await
        .expect(200)
        .json();
    let by_external = http.get(&format!("fhir/R4/ProjectMembership?external-id={external}"), &admin.token).await;
    assert_eq!(ids(&by_external.expect(200).json()), [invited["id"].as_str().unwrap().to_string()]);

    // The profile an invite made is a FHIR resource of the project: its name is updated with If-Match.
    let profile_path = format!("fhir/R4/{}", invited["profile"]["reference"].as_str().unwrap());
    let profile = http.get(&profile_path, &admin.token).await.expect(200);
    let etag = profile.header("etag").unwrap();
    let mut renamed = profile.json();
    assert_eq!(renamed["name"][0], json!({"given": ["Eve"], "family": "Ext"}));
    renamed["name"][0]["family"] = json!("Renamed");
    let put =
        http.send(http.request(Method::PUT, &profile_path, Some(&admin.token)).header("if-match", etag).json(&renamed));
    assert_eq!(put.await.expect(200).json()["name"][0]["family"], "Renamed");

    // A super admin's writes land in the project named in meta.project (b14), where the project admin
    // sees them; it deletes memberships there through FHIR.
    let sa = medplum.super_admin_token().await;
    let placed = http
        .post(
            "fhir/R4/AccessPolicy",
            &sa,
            &json!({"resourceType": "AccessPolicy", "name": "placed", "meta": {"project": admin.project.project_id}}),
        )
        .await
        .expect(201)
        .json();
    http.get(&format!("fhir/R4/AccessPolicy/{}", placed["id"].as_str().unwrap()), &admin.token).await.expect(200);
    http.delete(&path, &sa).await.expect(200);
    http.get(&path, &admin.token).await.expect(410);
}
