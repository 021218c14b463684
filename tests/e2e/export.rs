//! `medplum-operator export` and `diff`: a project filled by hand through Medplum's API, exported,
//! applied and taken over by the operator, with Medplum's objects semantically unchanged and every
//! existing credential still working; a second export gives the same YAML, and `diff` shows what a
//! change in git or in the console would make the operator do.

use std::collections::BTreeMap;
use std::path::Path;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::cluster::kubeconfig;
use crate::support::fixtures::{Setup, TAG_SYSTEM, WAIT};
use crate::support::{Operator, eventually};
use medplum_operator::crd::{MedplumProject, ProjectUser};

/// Runs the operator binary's `args`; returns exit code, stdout and stderr.
fn command(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_medplum-operator"))
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .expect("running medplum-operator");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

/// Every file under `dir`, by path relative to it.
fn files(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for folder in std::fs::read_dir(dir).unwrap() {
        let folder = folder.unwrap().path();
        for file in std::fs::read_dir(&folder).unwrap() {
            let file = file.unwrap().path();
            let key = file.strip_prefix(dir).unwrap().display().to_string();
            out.insert(key, std::fs::read_to_string(&file).unwrap());
        }
    }
    out
}

/// Applies every resource of the export (server-side apply, as `kubectl apply --server-side` does).
async fn apply_all(s: &Setup, exported: &BTreeMap<String, String>) {
    for text in exported.values() {
        let value: Value = serde_yaml::from_str(text).unwrap();
        let kind = value["kind"].as_str().unwrap();
        let resource = ApiResource {
            group: "medplum.com".into(),
            version: "v1alpha1".into(),
            api_version: "medplum.com/v1alpha1".into(),
            kind: kind.into(),
            plural: format!("{}s", kind.to_lowercase()).replace("policys", "policies"),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(s.client.clone(), &s.ns.name, &resource);
        let name = value["metadata"]["name"].as_str().unwrap();
        api.patch(name, &PatchParams::apply("gitops").force(), &Patch::Apply(&value)).await.unwrap();
    }
}

/// What a Medplum object means, without what changes on every write (meta) and, for clients, the
/// secrets (compared through the credentials instead).
fn meaning(mut object: Value) -> Value {
    let o = object.as_object_mut().unwrap();
    for key in ["meta", "secret", "retiringSecret"] {
        o.remove(key);
    }
    // A membership's grants: the legacy `accessPolicy` and `access` say the same thing.
    if let Some(policy) = o.remove("accessPolicy") {
        let mut access = vec![json!({"policy": {"reference": policy["reference"]}})];
        access.extend(o.remove("access").and_then(|a| a.as_array().cloned()).unwrap_or_default());
        o.insert("access".into(), json!(access));
    }
    if let Some(access) = o.get_mut("access").and_then(Value::as_array_mut) {
        for grant in access {
            if let Some(policy) = grant.get_mut("policy").and_then(Value::as_object_mut) {
                policy.remove("display");
            }
        }
    }
    let ours = |i: &Value| i["system"].as_str().is_some_and(|s| s.starts_with("urn:medplum-operator:"));
    if let Some(list) = o.get_mut("identifier").and_then(Value::as_array_mut) {
        list.retain(|i| !ours(i));
    }
    if o.get("identifier").and_then(Value::as_array).is_some_and(Vec::is_empty) {
        o.remove("identifier");
    }
    if o.get("admin") == Some(&json!(false)) {
        o.remove("admin");
    }
    object
}

fn tags(object: &Value) -> Vec<String> {
    let tags = object["meta"]["tag"].as_array().cloned().unwrap_or_default();
    let mut tags: Vec<String> =
        tags.iter().map(|t| format!("{}|{}", t["system"].as_str().unwrap(), t["code"].as_str().unwrap())).collect();
    tags.sort();
    tags
}

#[tokio::test]
async fn an_exported_project_is_taken_over_without_change() {
    let setup = Setup::new("export", &[], json!({})).await;
    let s = &setup;
    let (http, token, project) = (s.http(), s.token.as_str(), s.admin.project_id.as_str());
    let post = |kind: &'static str, body: Value| async move {
        http.post(&format!("fhir/R4/{kind}"), token, &body).await.expect(201).json()["id"].as_str().unwrap().to_string()
    };
    let post = &post;

    // A project filled by hand, as a console user would.
    let lab = post("AccessPolicy", json!({"resourceType": "AccessPolicy", "name": "Lab Reader",
        "compartment": {"reference": "%organization"},
        "resource": [{"resourceType": "Observation", "criteria": "Observation?performer=%organization", "readonly": true,
                      "hiddenFields": ["note"]},
                     {"resourceType": "Patient", "interaction": ["read", "search"], "readonlyFields": ["birthDate"]}]}))
    .await;
    let desk = post("AccessPolicy", json!({"resourceType": "AccessPolicy", "name": "Front Desk",
        "resource": [{"resourceType": "Patient", "writeConstraint": [{"language": "text/fhirpath", "expression": "%after.active = true"}]},
                     {"resourceType": "Appointment"}],
        "ipAccessRule": [{"name": "local", "value": "127.0.", "action": "allow"}, {"value": "*", "action": "block"}]}))
    .await;
    let open_ip = post(
        "AccessPolicy",
        json!({"resourceType": "AccessPolicy", "name": "Open IP",
        "resource": [{"resourceType": "Patient", "readonly": true}],
        "ipAccessRule": [{"value": "10.", "action": "allow"}]}),
    )
    .await;
    let unlisted_policy = post(
        "AccessPolicy",
        json!({"resourceType": "AccessPolicy", "name": "Not Listed",
        "resource": [{"resourceType": "Task", "readonly": true}]}),
    )
    .await;

    let (billing, billing_secret) = s.legacy_client("Billing Service", Some(&lab)).await;
    let (portal, portal_secret) = s.legacy_client("Patient Portal", Some(&desk)).await;
    let (proxy, proxy_secret) = s.legacy_client("Proxy API", Some(&desk)).await;
    let (unlisted, unlisted_secret) = s.legacy_client("Unlisted", Some(&desk)).await;
    s.edit_client(&billing, |c| {
        c["description"] = json!("posts claims");
        c["accessTokenLifetime"] = json!("15m");
    })
    .await;
    s.edit_client(&portal, |c| {
        c["redirectUris"] = json!(["https://portal.example.org/callback"]);
        c["allowedOrigin"] = json!(["https://portal.example.org"]);
        c["defaultScope"] = json!(["openid", "patient/*.read"]);
        c["launchUri"] = json!("https://portal.example.org/launch");
        c["pkceOptional"] = json!(true);
    })
    .await;
    // Parameters for the billing client's policy, and admin (on-behalf-of) for the proxy.
    let membership_of = |client: String| async move { s.memberships_of(&client).await[0].clone() };
    let membership_of = &membership_of;
    let mut m = membership_of(billing.clone()).await;
    m.as_object_mut().unwrap().remove("accessPolicy");
    m["access"] = json!([{"policy": {"reference": format!("AccessPolicy/{lab}")},
                          "parameter": [{"name": "organization", "valueReference": {"reference": "Organization/acme"}}]}]);
    http.put(&format!("fhir/R4/ProjectMembership/{}", m["id"].as_str().unwrap()), token, &m).await.expect(200);
    let mut m = membership_of(proxy.clone()).await;
    m["admin"] = json!(true);
    http.put(&format!("fhir/R4/ProjectMembership/{}", m["id"].as_str().unwrap()), token, &m).await.expect(200);

    let invite = |body: Value| async move {
        let request = http.request(Method::POST, &format!("admin/projects/{project}/invite"), Some(token)).json(&body);
        http.send(request).await.expect(200).json()
    };
    let invite = &invite;
    let ada = invite(json!({"resourceType": "Practitioner", "firstName": "Ada", "lastName": "Lovelace",
        "email": "ada@example.org", "sendEmail": false,
        "access": [{"policy": {"reference": format!("AccessPolicy/{desk}")}}]}))
    .await;
    let pat = invite(json!({"resourceType": "Patient", "firstName": "Pat", "lastName": "Smith",
        "email": "pat@example.org", "sendEmail": false, "scope": "project",
        "access": [{"policy": {"reference": format!("AccessPolicy/{lab}")},
                    "parameter": [{"name": "organization", "valueReference": {"reference": "Organization/acme"}}]}]}))
    .await;
    let grace = invite(json!({"resourceType": "Practitioner", "firstName": "Grace", "lastName": "Hopper",
        "email": "grace@example.org", "sendEmail": false,
        "access": [{"policy": {"reference": format!("AccessPolicy/{desk}")}}]}))
    .await;
    let project_patch = json!([
        {"op": "add", "path": "/defaultPatientAccessPolicy", "value": {"reference": format!("AccessPolicy/{lab}")}},
        {"op": "add", "path": "/site", "value": [{"name": "portal", "domain": ["portal.example.org"]}]},
        {"op": "add", "path": "/secret", "value": [{"name": "SMTP_PASSWORD", "valueString": "smtp-value-not-exported"}]}]);
    http.patch(&format!("fhir/R4/Project/{project}"), token, &project_patch).await.expect(200);

    let read = |path: String| async move { http.get(&path, token).await.expect(200).json() };
    let read = &read;
    let objects: Vec<String> = [&lab, &desk, &open_ip, &unlisted_policy]
        .iter()
        .map(|id| format!("fhir/R4/AccessPolicy/{id}"))
        .chain([&billing, &portal, &proxy, &unlisted].iter().map(|id| format!("fhir/R4/ClientApplication/{id}")))
        .chain(
            [&billing, &portal, &proxy]
                .iter()
                .map(|id| format!("fhir/R4/ProjectMembership?user=ClientApplication/{id}")),
        )
        .chain([&ada, &pat, &grace].iter().map(|m| format!("fhir/R4/ProjectMembership/{}", m["id"].as_str().unwrap())))
        .collect();
    let mut before = Vec::new();
    for path in &objects {
        let mut object = read(path.clone()).await;
        if object["resourceType"] == "Bundle" {
            object = object["entry"][0]["resource"].clone();
        }
        before.push(object);
    }
    let project_before = read(format!("fhir/R4/Project/{project}")).await;

    // The connection lists what it may adopt (the platform team's decision).
    s.set_limits(json!({"allowAdmin": true, "allowProjectSettings": true,
        "adoption": {"clientIds": [billing, portal, proxy], "policyIds": [lab, desk, open_ip],
                     "userEmails": ["ada@example.org", "pat@example.org"], "allowKeepSecret": true}}))
        .await;

    let dir = std::env::temp_dir().join(format!("export-{}", s.ns.name));
    let second = std::env::temp_dir().join(format!("export-again-{}", s.ns.name));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&second);
    let (code, _, stderr) = command(&["export", "-n", &s.ns.name, "--output-dir", dir.to_str().unwrap()]);
    println!("export stderr:\n{stderr}");
    assert_eq!(code, 0, "{stderr}");
    let exported = files(&dir);
    for (path, text) in &exported {
        println!("--- {path}\n{text}");
    }
    let keys: Vec<&str> = exported.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "access-policies/front-desk.yaml",
            "access-policies/lab-reader.yaml",
            "client-applications/billing-service.yaml",
            "client-applications/patient-portal.yaml",
            "client-applications/proxy-api.yaml",
            "medplum-projects/export.yaml",
            "project-users/ada.yaml",
            "project-users/pat.yaml",
        ]
    );
    // What was left out, and why.
    for (object, why) in [
        (format!("AccessPolicy/{open_ip}"), "the last rule"),
        (format!("AccessPolicy/{unlisted_policy}"), "spec.limits.adoption.policyIds"),
        (format!("ClientApplication/{unlisted}"), "spec.limits.adoption.clientIds"),
        (format!("ClientApplication/{}", s.admin.client_id), "a connection's own credential is never adopted"),
        ("grace@example.org".to_string(), "spec.limits.adoption.userEmails"),
        ("secret \"SMTP_PASSWORD\"".to_string(), "never exported"),
    ] {
        assert!(stderr.lines().any(|l| l.contains(&object) && l.contains(why)), "{object}: {why}");
    }
    let billing_yaml: Value = serde_yaml::from_str(&exported["client-applications/billing-service.yaml"]).unwrap();
    assert_eq!(billing_yaml["spec"]["adopt"], json!({"clientId": billing, "secret": "Rotate"}));
    assert_eq!(billing_yaml["spec"]["access"][0]["parameters"][0]["valueReference"], "Organization/acme");
    let proxy_yaml: Value = serde_yaml::from_str(&exported["client-applications/proxy-api.yaml"]).unwrap();
    assert_eq!(proxy_yaml["spec"]["onBehalfOf"], true);
    for secret in [&billing_secret, &portal_secret, &proxy_secret, &unlisted_secret, &s.admin.client_secret] {
        assert!(!exported.values().any(|t| t.contains(secret.as_str())) && !stderr.contains(secret.as_str()));
    }
    assert!(!stderr.contains("smtp-value-not-exported") && !exported.values().any(|t| t.contains("smtp-value")));

    // The portal keeps its secret (its consumers are not ready to switch); the others rotate.
    let mut edited = exported.clone();
    let portal_file = "client-applications/patient-portal.yaml";
    edited.insert(portal_file.into(), edited[portal_file].replace("secret: Rotate", "secret: Keep"));
    let operator = Operator::start(&s.ns.name, &["--resync-interval", "20s"]).await;
    apply_all(s, &edited).await;
    for name in ["billing-service", "patient-portal", "proxy-api"] {
        s.wait_ready(name).await;
    }
    for name in ["ada", "pat"] {
        s.wait_user(name, "True", None).await;
    }
    for name in ["front-desk", "lab-reader"] {
        s.wait_policy(name, "True", None).await;
    }
    let projects: Api<MedplumProject> = Api::namespaced(s.client.clone(), &s.ns.name);
    eventually(WAIT, "MedplumProject export Ready", || async {
        let p = projects.get("export").await.ok()?;
        p.status?.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;

    // Medplum's objects mean what they meant, with the operator's tags (and identifiers) added.
    for (path, was) in objects.iter().zip(&before) {
        let mut now = read(path.clone()).await;
        if now["resourceType"] == "Bundle" {
            now = now["entry"][0]["resource"].clone();
        }
        assert_eq!(meaning(now.clone()), meaning(was.clone()), "{path}");
        let managed = !path.contains(&unlisted)
            && !path.contains(&open_ip)
            && !path.contains(&unlisted_policy)
            && !path.contains(grace["id"].as_str().unwrap());
        let ours = tags(&now).into_iter().filter(|t| t.starts_with(TAG_SYSTEM)).count()
            + now["identifier"]
                .as_array()
                .map_or(0, |i| i.iter().filter(|i| i["system"].as_str().unwrap().starts_with(TAG_SYSTEM)).count());
        assert_eq!(ours > 0, managed, "{path}: managed and adopted marks");
    }
    let project_after = read(format!("fhir/R4/Project/{project}")).await;
    for field in ["defaultPatientAccessPolicy", "site", "secret"] {
        assert_eq!(project_after[field], project_before[field], "Project.{field}");
    }

    // Every credential still works: the kept one is in its Secret, the rotated ones keep working
    // through the grace period beside the new ones in their Secrets.
    for (name, id, old) in [
        ("billing-service", &billing, &billing_secret),
        ("patient-portal", &portal, &portal_secret),
        ("proxy-api", &proxy, &proxy_secret),
    ] {
        assert!(s.token_works(id, old).await, "{name}: the existing secret still works");
        let secret = s.secret(name).await.unwrap();
        assert_eq!(&secret["MEDPLUM_CLIENT_ID"], id);
        assert!(s.token_works(id, &secret["MEDPLUM_CLIENT_SECRET"]).await, "{name}: the Secret's works");
        assert_eq!(secret["MEDPLUM_CLIENT_SECRET"] == *old, name == "patient-portal", "{name}: kept or rotated");
    }
    assert!(s.token_works(&unlisted, &unlisted_secret).await);

    // A policy the connection does not list is not adopted; once listed it is, and deleting its
    // resource releases it (the connection does not allow deleting adopted objects).
    s.create_policy(
        "task-reader",
        json!({"adopt": {"policyId": unlisted_policy}, "displayName": "Not Listed",
        "resources": [{"resourceType": "Task", "readonly": true}]}),
    )
    .await;
    let refused = s.wait_policy("task-reader", "False", Some("AdoptionNotAllowed")).await;
    println!("refusal unlisted policy: {:?}", refused.status.unwrap().conditions[0].message);
    let unlisted_path = format!("fhir/R4/AccessPolicy/{unlisted_policy}");
    assert!(tags(&read(unlisted_path.clone()).await).is_empty(), "nothing written before adoption is allowed");
    s.set_limits(json!({"adoption": {"policyIds": [lab, desk, open_ip, unlisted_policy]}})).await;
    s.wait_policy("task-reader", "True", None).await;
    assert_eq!(
        tags(&read(unlisted_path.clone()).await),
        [
            format!("{TAG_SYSTEM}:adopted|AccessPolicy/{}/task-reader", s.ns.name),
            format!("{TAG_SYSTEM}|AccessPolicy/{}/task-reader", s.ns.name)
        ]
    );
    s.policies().delete("task-reader", &Default::default()).await.unwrap();
    eventually(WAIT, "task-reader released", || async {
        s.policies().get_opt("task-reader").await.unwrap().is_none().then_some(())
    })
    .await;
    let released = read(unlisted_path).await;
    assert!(tags(&released).is_empty(), "released: the operator's tags are gone");
    assert_eq!(meaning(released), meaning(before[3].clone()), "and the policy is as it was");
    s.set_limits(json!({"adoption": {"policyIds": [lab, desk, open_ip]}})).await;

    // Exported again, after the takeover: the same YAML.
    let (code, _, stderr) = command(&["export", "-n", &s.ns.name, "--output-dir", second.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(files(&second), exported, "a second export gives the same YAML");

    // diff: nothing to do for what is applied; a change in git, and one in the console, are shown.
    let (code, stdout, stderr) = command(&["diff", "-n", &s.ns.name]);
    println!("diff of the applied resources:\n{stdout}{stderr}");
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.ends_with(": no change")).count(), 7, "{stdout}");
    drop(operator);
    let lab_file = dir.join("access-policies/lab-reader.yaml");
    let text = std::fs::read_to_string(&lab_file).unwrap().replace("- note", "- note\n    - interpretation");
    std::fs::write(&lab_file, text).unwrap();
    s.edit_client(&portal, |c| c["description"] = json!("edited in the console")).await;
    let (code, stdout, stderr) = command(&["diff", "-n", &s.ns.name, "-f", dir.to_str().unwrap()]);
    println!("diff after a change in git and one in the console:\n{stdout}{stderr}");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("update Medplum AccessPolicy/{lab}")) && stdout.contains("interpretation"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("update Medplum ClientApplication/{portal}")), "{stdout}");
    assert!(stdout.contains("description: \"edited in the console\" -> (none)"), "{stdout}");
    for secret in [&billing_secret, &portal_secret, &proxy_secret] {
        assert!(!stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()));
    }
    let users: Api<ProjectUser> = Api::namespaced(s.client.clone(), &s.ns.name);
    assert_eq!(users.list(&Default::default()).await.unwrap().items.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&second);
}
