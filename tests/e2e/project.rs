//! MedplumProject: the project's own settings, declared. Patients register themselves through
//! Medplum's own endpoints and get exactly the declared policy; a site's reCAPTCHA keys reach Medplum's
//! registration check; project secrets come from Kubernetes Secrets, follow them at once, are put back
//! after a console edit and leave Medplum with the resource, and entries made by hand stay untouched.

use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::fixtures::{Setup, WAIT, apply_secret};
use crate::support::{Operator, eventually};
use medplum_operator::crd::MedplumProject;

pub(crate) fn projects(s: &Setup) -> Api<MedplumProject> {
    Api::namespaced(s.client.clone(), &s.ns.name)
}

pub(crate) async fn create_project(s: &Setup, name: &str, spec: Value) {
    let object: MedplumProject = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "MedplumProject", "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    projects(s).create(&PostParams::default(), &object).await.unwrap();
}

pub(crate) async fn wait_project(s: &Setup, name: &str, status: &str, reason: Option<&str>) -> MedplumProject {
    eventually(WAIT, &format!("MedplumProject {name}: Ready={status} {reason:?}"), || async {
        let object = projects(s).get(name).await.ok()?;
        let ready = object.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
        let current = object.status.as_ref()?.observed_generation == object.metadata.generation;
        (current && ready.status == status && reason.is_none_or(|r| ready.reason == r)).then_some(object)
    })
    .await
}

/// The Project as its admin reads it.
pub(crate) async fn read_project(s: &Setup) -> Value {
    s.http().get(&format!("fhir/R4/Project/{}", s.admin.project_id), &s.token).await.expect(200).json()
}

/// A project secret's value, whatever its type; `None` without the entry.
pub(crate) fn secret_value(project: &Value, name: &str) -> Option<Value> {
    let entry = project["secret"].as_array()?.iter().find(|e| e["name"] == name)?;
    ["valueString", "valueInteger", "valueBoolean", "valueDecimal"].iter().find_map(|k| entry.get(*k).cloned())
}

/// A patient signs up through Medplum's registration endpoints (as the patient app's sign-up page
/// does) and exchanges the code for a token.
async fn register_patient(s: &Setup, email: &str) -> String {
    let verifier = format!("verifier-{}-{}", crate::support::suffix(), crate::support::suffix());
    let body = json!({"firstName": "Pat", "lastName": "Ient", "email": email, "password": "a-long-patient-password-1",
                      "projectId": s.admin.project_id, "codeChallenge": verifier, "codeChallengeMethod": "plain"});
    let request = s.http().request(Method::POST, "auth/newuser", None).json(&body);
    let login = s.http().send(request).await.expect(200).json()["login"].clone();
    let request = s
        .http()
        .request(Method::POST, "auth/newpatient", None)
        .json(&json!({"login": login, "projectId": s.admin.project_id}));
    let code = s.http().send(request).await.expect(200).json()["code"].as_str().unwrap().to_string();
    let form = [("grant_type", "authorization_code"), ("code", &code), ("code_verifier", &verifier)];
    let request = s.http().request(Method::POST, "oauth2/token", None).form(&form);
    s.http().send(request).await.expect(200).json()["access_token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_project_declares_registration_sites_and_secrets() {
    let s = Setup::new("project", &[], json!({})).await;
    let suffix = crate::support::suffix();
    let operator = Operator::start(&s.ns.name, &["--resync-interval", "20s"]).await;
    let label = json!({"medplum.com/source-secret": "true"});
    apply_secret(&s.client, &s.ns.name, "smtp", &[("password", "smtp-pass-1"), ("port", "587")], label.clone()).await;
    apply_secret(&s.client, &s.ns.name, "recaptcha", &[("secret-key", "recaptcha-secret-1")], label.clone()).await;
    let policy_id = s
        .ready_policy(
            "patient-self",
            json!([{"resourceType": "Observation", "readonly": true}, {"resourceType": "Patient", "readonly": true}]),
        )
        .await;
    // What the project holds before: Medplum's default patient policy, and a secret made by hand.
    let before = read_project(&s).await;
    let original = before["defaultPatientAccessPolicy"]["reference"].clone();
    let by_hand = json!([{"op": "add", "path": "/secret", "value": [{"name": "BY_HAND", "valueString": "kept"}]}]);
    s.http().patch(&format!("fhir/R4/Project/{}", s.admin.project_id), &s.token, &by_hand).await.expect(200);

    let site_key = format!("site-key-{suffix}");
    create_project(
        &s,
        "project",
        json!({
            "patientRegistration": {"open": true, "accessPolicyRef": {"name": "patient-self"}},
            "sites": [{"name": "portal", "domains": [format!("portal-{suffix}.example.org")], "recaptchaSiteKey": site_key,
                       "recaptchaSecretKeyRef": {"name": "recaptcha", "key": "secret-key"}}],
            "secrets": [{"name": "SMTP_PASSWORD", "secretKeyRef": {"name": "smtp", "key": "password"}},
                        {"name": "smtpPort", "secretKeyRef": {"name": "smtp", "key": "port"}, "type": "Integer"}]
        }),
    )
    .await;
    // Refused up front where the connection does not allow project settings, with Medplum untouched.
    wait_project(&s, "project", "False", Some("ProjectSettingsNotAllowed")).await;
    assert_eq!(read_project(&s).await["secret"], json!([{"name": "BY_HAND", "valueString": "kept"}]));

    s.set_limits(json!({"allowProjectSettings": true})).await;
    let ready = wait_project(&s, "project", "True", None).await;
    let status = ready.status.unwrap();
    assert_eq!(status.project_id.as_deref(), Some(s.admin.project_id.as_str()));
    assert_eq!(status.secrets, ["SMTP_PASSWORD", "smtpPort"]);
    let project = read_project(&s).await;
    assert_eq!(project["defaultPatientAccessPolicy"]["reference"], format!("AccessPolicy/{policy_id}"));
    assert_eq!(secret_value(&project, "SMTP_PASSWORD"), Some(json!("smtp-pass-1")));
    assert_eq!(secret_value(&project, "smtpPort"), Some(json!(587)));
    assert_eq!(secret_value(&project, "BY_HAND"), Some(json!("kept")), "an entry made by hand stays");
    let site = project["site"].as_array().unwrap().iter().find(|s| s["name"] == "portal").unwrap().clone();
    assert_eq!(site["recaptchaSiteKey"], site_key.as_str());
    assert_eq!(site["recaptchaSecretKey"], "recaptcha-secret-1");

    // A patient who signs up gets exactly the declared policy.
    let patient = register_patient(&s, &format!("pat-{suffix}@example.org")).await;
    let http = s.http();
    let status = |method: Method, path: &str, body: Option<Value>| {
        let mut request = http.request(method, path, Some(&patient));
        if let Some(body) = body {
            request = request.header("content-type", "application/fhir+json").json(&body);
        }
        async move { http.send(request).await.status }
    };
    assert_eq!(status(Method::GET, "fhir/R4/Observation", None).await, 200, "the policy allows reading");
    let observation = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
    assert_eq!(status(Method::POST, "fhir/R4/Observation", Some(observation)).await, 403, "read-only");
    assert_eq!(status(Method::GET, "fhir/R4/Practitioner", None).await, 403, "not granted");
    // Medplum finds the site by its key and checks registrations from it with the secret key.
    let body = json!({"firstName": "Bo", "lastName": "T", "email": format!("bot-{suffix}@example.org"),
                      "password": "a-long-patient-password-1", "projectId": s.admin.project_id, "recaptchaSiteKey": site_key});
    let request = s.http().request(Method::POST, "auth/newuser", None).json(&body);
    let answer = s.http().send(request).await.expect(400).json();
    assert_eq!(answer["issue"][0]["details"]["text"], "Recaptcha token is required", "{answer}");

    // Closed registration: Medplum refuses patients.
    let patch = json!({"spec": {"patientRegistration": {"open": false}}});
    projects(&s).patch("project", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_project(&s, "project", "True", None).await;
    assert!(read_project(&s).await.get("defaultPatientAccessPolicy").is_none());
    let body = json!({"firstName": "Cy", "lastName": "Closed", "email": format!("closed-{suffix}@example.org"),
                      "password": "a-long-patient-password-1", "projectId": s.admin.project_id,
                      "codeChallenge": "a-code-challenge", "codeChallengeMethod": "plain"});
    let request = s.http().request(Method::POST, "auth/newuser", None).json(&body);
    let login = s.http().send(request).await.expect(200).json()["login"].clone();
    let request = s
        .http()
        .request(Method::POST, "auth/newpatient", None)
        .json(&json!({"login": login, "projectId": s.admin.project_id}));
    let answer = s.http().send(request).await.expect(400).json();
    assert_eq!(answer["issue"][0]["details"]["text"], "Project does not allow open registration", "{answer}");

    // The registration policy is not deleted while the project's patients get it.
    s.policies().delete("patient-self", &Default::default()).await.unwrap();
    let held = s.wait_policy("patient-self", "False", Some("InUse")).await;
    let message = held.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
    assert!(message.contains("MedplumProject/project"), "{message}");

    // A change of the Secret reaches Medplum at once (well within the 20 s resync).
    let changed = Instant::now();
    apply_secret(&s.client, &s.ns.name, "smtp", &[("password", "smtp-pass-2"), ("port", "2525")], label).await;
    eventually(Duration::from_secs(15), "the new Secret value in Medplum", || async {
        let project = read_project(&s).await;
        (secret_value(&project, "SMTP_PASSWORD") == Some(json!("smtp-pass-2"))
            && secret_value(&project, "smtpPort") == Some(json!(2525)))
        .then_some(())
    })
    .await;
    println!("figure: a Secret change reached Medplum's project after {:?}", changed.elapsed());

    // A console edit is put back, the hand-made entry untouched.
    let project = read_project(&s).await;
    let mut secrets = project["secret"].clone();
    for entry in secrets.as_array_mut().unwrap() {
        if entry["name"] == "SMTP_PASSWORD" {
            entry["valueString"] = json!("edited-in-console");
        }
    }
    let edit = json!([{"op": "add", "path": "/secret", "value": secrets}]);
    s.http().patch(&format!("fhir/R4/Project/{}", s.admin.project_id), &s.token, &edit).await.expect(200);
    let edited = Instant::now();
    eventually(Duration::from_secs(40), "the console edit put back", || async {
        (secret_value(&read_project(&s).await, "SMTP_PASSWORD") == Some(json!("smtp-pass-2"))).then_some(())
    })
    .await;
    println!("figure: a console edit of a project secret was put back after {:?} (resync 20 s)", edited.elapsed());

    // An entry taken out of the spec leaves Medplum (deletionPolicy Delete).
    let patch =
        json!({"spec": {"secrets": [{"name": "SMTP_PASSWORD", "secretKeyRef": {"name": "smtp", "key": "password"}}]}});
    projects(&s).patch("project", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually(Duration::from_secs(20), "smtpPort removed", || async {
        secret_value(&read_project(&s).await, "smtpPort").is_none().then_some(())
    })
    .await;

    // A project has one MedplumProject.
    create_project(&s, "second", json!({})).await;
    wait_project(&s, "second", "False", Some("ProjectAlreadyDeclared")).await;
    projects(&s).delete("second", &Default::default()).await.unwrap();

    // Nothing secret in logs (debug level), Events, status or metrics.
    let declared = projects(&s).list(&ListParams::default()).await.unwrap();
    let public = format!(
        "{}\n{}\n{}\n{}",
        operator.logs(),
        s.public_text().await,
        serde_json::to_string(&declared.items).unwrap(),
        operator.metrics().await
    );
    for value in ["smtp-pass-1", "smtp-pass-2", "recaptcha-secret-1", "edited-in-console"] {
        assert!(!public.contains(value), "{value} shows up in logs, Events, status or metrics");
    }

    // Deletion gives the project back: the operator's entries go, registration gets its old policy.
    projects(&s).delete("project", &Default::default()).await.unwrap();
    eventually(WAIT, "MedplumProject gone", || async {
        projects(&s).get_opt("project").await.unwrap().is_none().then_some(())
    })
    .await;
    let after = read_project(&s).await;
    assert_eq!(after["defaultPatientAccessPolicy"]["reference"], original);
    assert_eq!(secret_value(&after, "SMTP_PASSWORD"), None);
    assert_eq!(secret_value(&after, "BY_HAND"), Some(json!("kept")));
    assert!(after["site"].as_array().is_none_or(|sites| sites.iter().all(|s| s["name"] != "portal")));
}
