//! Least privilege shown with real credentials: for each capability an AccessPolicy resource offers, a
//! ClientApplication made by the operator takes its own credentials from its Secret, gets a token and
//! uses it, and what the policy allows answers 200/201 while the rest is refused (403), not found (404)
//! or hidden. ProjectUser memberships are checked the same way through on-behalf-of
//! (`X-Medplum-On-Behalf-Of`), which lets a project admin act with exactly a member's access.
//!
//! Resource types, `readonly`, `interactions`, IP rules and on-behalf-of run against both Medplum
//! targets; criteria, `%variables`, compartments, hidden and read-only fields and write constraints are
//! evaluated by a real Medplum only (the test server does not model FHIR search criteria or FHIRPath).

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::fixtures::Setup;
use crate::support::{Operator, skip};

/// A policy `name` with `spec`, and a ClientApplication `name` granting it with `parameters`; once
/// Ready, a token from the credentials in its Secret.
async fn client_token(s: &Setup, name: &str, spec: Value, parameters: Value) -> String {
    s.create_policy(name, spec).await;
    s.wait_policy(name, "True", None).await;
    s.create_client(name, json!({"access": [{"policyRef": {"name": name}, "parameters": parameters}]})).await;
    let client_id = s.wait_ready(name).await.status.unwrap().client_id.unwrap();
    let secret = s.secret(name).await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    s.http().token(&client_id, &secret).await
}

/// Creates a resource with the test's project-admin token; its id.
async fn seed(s: &Setup, resource: Value) -> String {
    let path = format!("fhir/R4/{}", resource["resourceType"].as_str().unwrap());
    s.http().post(&path, &s.token, &resource).await.expect(201).json()["id"].as_str().unwrap().to_string()
}

fn code(answer: &crate::support::medplum::Answer) -> u16 {
    answer.status.as_u16()
}

#[tokio::test]
async fn resource_types_readonly_and_interactions_bound_a_client_token() {
    let s = Setup::new("lp-types", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    let observation = seed(&s, json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})).await;
    let patient = seed(&s, json!({"resourceType": "Patient", "gender": "female"})).await;
    let token = client_token(
        &s,
        "typed",
        json!({"resources": [{"resourceType": "Patient", "readonly": true},
                             {"resourceType": "Observation", "interactions": ["create", "read"]}]}),
        json!([]),
    )
    .await;
    let http = s.http();
    let observation_path = format!("fhir/R4/Observation/{observation}");
    let current = http.get(&observation_path, &s.token).await.json();
    let checks = [
        // readonly: the read-only interactions, no writes.
        ("Patient search", code(&http.get("fhir/R4/Patient?_count=1", &token).await), 200),
        ("Patient read", code(&http.get(&format!("fhir/R4/Patient/{patient}"), &token).await), 200),
        ("Patient create", code(&http.post("fhir/R4/Patient", &token, &json!({"resourceType": "Patient"})).await), 403),
        // interactions: exactly the listed ones.
        (
            "Observation create",
            code(
                &http
                    .post(
                        "fhir/R4/Observation",
                        &token,
                        &json!({"resourceType": "Observation", "status": "final", "code": {"text": "y"}}),
                    )
                    .await,
            ),
            201,
        ),
        ("Observation read", code(&http.get(&observation_path, &token).await), 200),
        ("Observation search", code(&http.get("fhir/R4/Observation", &token).await), 403),
        ("Observation update", code(&http.put(&observation_path, &token, &current).await), 403),
        ("Observation delete", code(&http.delete(&observation_path, &token).await), 403),
        // resource types: nothing unlisted.
        ("Practitioner search", code(&http.get("fhir/R4/Practitioner", &token).await), 403),
        ("AccessPolicy search", code(&http.get("fhir/R4/AccessPolicy", &token).await), 403),
    ];
    for (what, got, expected) in checks {
        println!("least privilege: {what}: {got}");
        assert_eq!(got, expected, "{what}");
    }
}

#[tokio::test]
async fn ip_rules_decide_where_a_clients_tokens_can_be_had() {
    let s = Setup::new("lp-ip", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    // The operator and this test both call from 127.0.0.1.
    let patients = [json!({"resourceType": "Patient", "readonly": true})];
    for (name, rules, expected) in [
        ("loopback-only", json!([{"value": "127.0.0.1", "action": "allow"}, {"value": "*", "action": "block"}]), None),
        ("office-only", json!([{"value": "10.2.", "action": "allow"}, {"value": "*", "action": "block"}]), Some(())),
    ] {
        s.create_policy(name, json!({"resources": patients, "ipAccessRules": rules})).await;
        s.wait_policy(name, "True", None).await;
        s.create_client(name, json!({"access": [{"policyRef": {"name": name}}]})).await;
        let status = s.wait_ready(name).await.status.unwrap();
        let client_id = status.client_id.unwrap();
        let secret = s.secret(name).await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
        let answer = s.http().token_request(&client_id, &secret).await;
        let verified = status.conditions.iter().find(|c| c.type_ == "CredentialVerified").unwrap();
        println!("least privilege: {name}: token {} ({}), verified as {}", answer.status, answer.text, verified.reason);
        match expected {
            None => {
                answer.expect(200);
                assert_eq!(verified.reason, "SecretAccepted");
            }
            Some(()) => {
                assert_eq!(answer.expect(400).json()["error_description"], "IP address not allowed");
                assert_eq!(verified.reason, "SecretAcceptedAddressBlocked");
            }
        }
    }
}

#[tokio::test]
async fn criteria_parameters_and_compartments_bound_a_client_token() {
    let s = Setup::new("lp-criteria", &[], json!({})).await;
    if s.medplum.is_test_server() {
        skip("criteria, %variables and compartments are evaluated by a real Medplum only");
        return;
    }
    let _operator = Operator::start(&s.ns.name, &[]).await;
    let ours = seed(&s, json!({"resourceType": "Organization", "name": "ours"})).await;
    let theirs = seed(&s, json!({"resourceType": "Organization", "name": "theirs"})).await;
    let our_patient = seed(
        &s,
        json!({"resourceType": "Patient", "managingOrganization": {"reference": format!("Organization/{ours}")}}),
    )
    .await;
    let their_patient = seed(
        &s,
        json!({"resourceType": "Patient", "managingOrganization": {"reference": format!("Organization/{theirs}")}}),
    )
    .await;
    let final_observation =
        seed(&s, json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})).await;
    let preliminary =
        seed(&s, json!({"resourceType": "Observation", "status": "preliminary", "code": {"text": "x"}})).await;
    let token = client_token(
        &s,
        "scoped",
        json!({"compartment": {"reference": "%organization"},
               "resources": [{"resourceType": "Patient", "criteria": "Patient?organization=%organization"},
                             {"resourceType": "Observation", "criteria": "Observation?status=final"}]}),
        json!([{"name": "organization", "valueReference": format!("Organization/{ours}")}]),
    )
    .await;
    let http = s.http();
    // %organization is the grant's parameter: only that organization's patients.
    let found = http.get("fhir/R4/Patient", &token).await.expect(200).json();
    let ids: Vec<&str> =
        found["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["id"].as_str()).collect();
    assert_eq!(ids, [our_patient.as_str()], "search sees only %organization's patients");
    http.get(&format!("fhir/R4/Patient/{our_patient}"), &token).await.expect(200);
    http.get(&format!("fhir/R4/Patient/{their_patient}"), &token).await.expect(404);
    // Criteria: final Observations only, for reads and for writes.
    http.get(&format!("fhir/R4/Observation/{final_observation}"), &token).await.expect(200);
    http.get(&format!("fhir/R4/Observation/{preliminary}"), &token).await.expect(404);
    let draft = json!({"resourceType": "Observation", "status": "preliminary", "code": {"text": "y"}});
    http.post("fhir/R4/Observation", &token, &draft).await.expect(403);
    // The compartment: what the client creates joins %organization's compartment.
    let created = http
        .post(
            "fhir/R4/Patient",
            &token,
            &json!({"resourceType": "Patient", "managingOrganization": {"reference": format!("Organization/{ours}")}}),
        )
        .await
        .expect(201)
        .json();
    let extended = http.send(
        http.request(Method::GET, &format!("fhir/R4/Patient/{}", created["id"].as_str().unwrap()), Some(&s.token))
            .header("x-medplum", "extended"),
    );
    let compartments = extended.await.expect(200).json()["meta"]["compartment"].clone();
    assert!(
        compartments.as_array().unwrap().iter().any(|c| c["reference"] == format!("Organization/{ours}")),
        "{compartments}"
    );
}

#[tokio::test]
async fn hidden_and_readonly_fields_and_write_constraints_bound_a_client_token() {
    let s = Setup::new("lp-fields", &[], json!({})).await;
    if s.medplum.is_test_server() {
        skip("hidden and read-only fields and FHIRPath write constraints are evaluated by a real Medplum only");
        return;
    }
    let _operator = Operator::start(&s.ns.name, &[]).await;
    let patient = seed(&s, json!({"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01"})).await;
    let token = client_token(
        &s,
        "fields",
        json!({"resources": [
            {"resourceType": "Patient", "hiddenFields": ["birthDate"], "readonlyFields": ["gender"]},
            {"resourceType": "Observation", "writeConstraints": ["%after.status = 'final'"]}]}),
        json!([]),
    )
    .await;
    let http = s.http();
    let path = format!("fhir/R4/Patient/{patient}");
    let read = http.get(&path, &token).await.expect(200).json();
    assert!(read.get("birthDate").is_none(), "birthDate is hidden: {read}");
    assert_eq!(read["gender"], "female");
    // A read-only field keeps its value whatever the client writes.
    let mut edited = read.clone();
    edited["gender"] = json!("male");
    edited["active"] = json!(true);
    let updated = http.put(&path, &token, &edited).await.expect(200).json();
    assert_eq!((updated["gender"].as_str(), updated["active"].as_bool()), (Some("female"), Some(true)));
    let stored = http.get(&path, &s.token).await.expect(200).json();
    assert_eq!((stored["gender"].as_str(), stored["birthDate"].as_str()), (Some("female"), Some("1970-01-01")));
    // The write constraint: only final Observations may be written.
    let observation = |status: &str| json!({"resourceType": "Observation", "status": status, "code": {"text": "x"}});
    http.post("fhir/R4/Observation", &token, &observation("final")).await.expect(201);
    http.post("fhir/R4/Observation", &token, &observation("preliminary")).await.expect(403);
}

#[tokio::test]
async fn a_project_users_membership_grants_exactly_its_policies() {
    let s = Setup::new("lp-user", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.create_policy("patient-reader", json!({"resources": [{"resourceType": "Patient", "readonly": true}]})).await;
    s.wait_policy("patient-reader", "True", None).await;
    let email = format!("lee-{}@example.org", crate::support::suffix());
    s.create_user(
        "dr-lee",
        json!({"firstName": "Ada", "lastName": "Lee", "email": email, "access": [{"policyRef": {"name": "patient-reader"}}]}),
    )
    .await;
    let status = s.wait_user("dr-lee", "True", None).await.status.unwrap();
    let http = s.http();
    // The project admin acts on behalf of the membership, and of its profile: both have its access only.
    for target in [format!("ProjectMembership/{}", status.membership_id.unwrap()), status.profile.unwrap()] {
        let as_user = |method: Method, path: &str| {
            http.request(method, path, Some(&s.token)).header("x-medplum-on-behalf-of", target.clone())
        };
        let search = http.send(as_user(Method::GET, "fhir/R4/Patient?_count=1")).await;
        let create = http
            .send(
                as_user(Method::POST, "fhir/R4/Patient")
                    .header("content-type", "application/fhir+json")
                    .json(&json!({"resourceType": "Patient"})),
            )
            .await;
        let other = http.send(as_user(Method::GET, "fhir/R4/Observation?_count=1")).await;
        println!("least privilege: on behalf of {target}: {} {} {}", search.status, create.status, other.status);
        assert_eq!((code(&search), code(&create), code(&other)), (200, 403, 403), "on behalf of {target}");
    }
    // Without on-behalf-of the admin itself may do all of that.
    http.post("fhir/R4/Patient", &s.token, &json!({"resourceType": "Patient"})).await.expect(201);
    // Only a project admin may act on behalf of someone: the user's own policy does not allow it.
    s.create_client("member", json!({"access": [{"policyRef": {"name": "patient-reader"}}]})).await;
    let client_id = s.wait_ready("member").await.status.unwrap().client_id.unwrap();
    let member = s.http().token(&client_id, &s.secret("member").await.unwrap()["MEDPLUM_CLIENT_SECRET"]).await;
    let refused = http
        .send(
            http.request(Method::GET, "fhir/R4/Patient?_count=1", Some(&member))
                .header("x-medplum-on-behalf-of", format!("ProjectMembership/{}", s.admin.membership_id)),
        )
        .await
        .expect(400);
    assert_eq!(refused.json()["issue"][0]["details"]["text"], "Authentication error");
}

/// A back-end "proxy API": a ClientApplication with `onBehalfOf` acts for a ProjectUser, both made by
/// the operator, and each request on the user's behalf has exactly the user's policy, while the
/// client's own requests keep the client's. Only where the connection allows project administration.
#[tokio::test]
async fn a_proxy_client_acts_with_exactly_the_users_rights() {
    let s = Setup::new("lp-proxy", &[], json!({"allowAdmin": true})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.create_policy("patient-reader", json!({"resources": [{"resourceType": "Patient", "readonly": true}]})).await;
    // The client's own policy. Medplum reads the profile of whom the client acts for with the
    // client's own rights, so it must allow reading Practitioners (the users' profiles).
    s.create_policy(
        "lab-reader",
        json!({"resources": [{"resourceType": "Observation", "readonly": true},
                             {"resourceType": "Practitioner", "readonly": true}]}),
    )
    .await;
    let email = format!("lee-{}@example.org", crate::support::suffix());
    s.create_user(
        "dr-lee",
        json!({"firstName": "Ada", "lastName": "Lee", "email": email, "access": [{"policyRef": {"name": "patient-reader"}}]}),
    )
    .await;
    let user = s.wait_user("dr-lee", "True", None).await.status.unwrap();
    s.create_client("portal-api", json!({"onBehalfOf": true, "access": [{"policyRef": {"name": "lab-reader"}}]})).await;
    let client_id = s.wait_ready("portal-api").await.status.unwrap().client_id.unwrap();
    let memberships = s.memberships_of(&client_id).await;
    assert_eq!(memberships[0]["admin"], true, "Medplum lets only admins act on behalf of others");
    let secret = s.secret("portal-api").await.unwrap()["MEDPLUM_CLIENT_SECRET"].clone();
    let token = s.http().token(&client_id, &secret).await;
    let http = s.http();
    let user_membership = format!("ProjectMembership/{}", user.membership_id.unwrap());
    let request = |method: Method, path: &str, on_behalf_of: Option<&str>| {
        let request = http.request(method, path, Some(&token));
        let request = match on_behalf_of {
            Some(target) => request.header("x-medplum-on-behalf-of", target),
            None => request,
        };
        request.header("content-type", "application/fhir+json")
    };
    for target in [Some(user_membership.as_str()), None] {
        let patients = http.send(request(Method::GET, "fhir/R4/Patient?_count=1", target)).await;
        let create =
            http.send(request(Method::POST, "fhir/R4/Patient", target).json(&json!({"resourceType": "Patient"}))).await;
        let labs = http.send(request(Method::GET, "fhir/R4/Observation?_count=1", target)).await;
        let seen = (code(&patients), code(&create), code(&labs));
        println!("least privilege: portal-api on behalf of {target:?}: {seen:?}");
        match target {
            // The user's policy: Patient read-only, nothing else.
            Some(_) => assert_eq!(seen, (200, 403, 403), "on behalf of the user"),
            // The client's own: Observation read-only.
            None => assert_eq!(seen, (403, 403, 200), "the client itself"),
        }
    }

    // Refused by default: a connection that does not allow administration.
    s.set_limits(json!({"allowAdmin": false})).await;
    let connections: kube::Api<medplum_operator::crd::MedplumConnection> =
        kube::Api::namespaced(s.client.clone(), &s.ns.name);
    crate::support::eventually(crate::support::fixtures::WAIT, "the operator took in the new limits", || async {
        let connection = connections.get("default").await.ok()?;
        (connection.status?.observed_generation == connection.metadata.generation).then_some(())
    })
    .await;
    s.create_client("another-proxy", json!({"onBehalfOf": true, "access": [{"policyRef": {"name": "lab-reader"}}]}))
        .await;
    let refused = s.wait_condition("another-proxy", "Ready", "False", Some("AdminNotAllowed")).await;
    assert!(refused.status.unwrap().client_id.is_none(), "nothing was made in Medplum");
}
