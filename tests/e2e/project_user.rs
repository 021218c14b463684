//! ProjectUser against the real control plane: invite, identifier, updates through the membership,
//! deletion policies, adoption and refusals.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::fixtures::{Setup, WAIT};
use crate::support::{Operator, eventually, suffix};

async fn membership(s: &Setup, id: &str) -> (u16, Value) {
    let answer = s.http().get(&format!("fhir/R4/ProjectMembership/{id}"), &s.token).await;
    let status = answer.status.as_u16();
    (status, if status == 200 { answer.json() } else { Value::Null })
}

async fn delete_user(s: &Setup, name: &str) {
    let api = s.users();
    api.delete(name, &Default::default()).await.unwrap();
    eventually(WAIT, &format!("{name} deleted"), || async { api.get_opt(name).await.unwrap().is_none().then_some(()) })
        .await;
}

#[tokio::test]
async fn user_lifecycle_invite_updates_and_deletion() {
    let s = Setup::new("pu-life", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &["--resync-interval", "2s"]).await;
    let policy_id = s.ready_policy("lab-reader", json!([{"resourceType": "Observation", "readonly": true}])).await;
    let email = format!("Ada.Lee-{}@Example.org", suffix());
    s.create_user("dr-lee",
        json!({"resourceType": "Practitioner", "firstName": "Ada", "lastName": "Lee", "email": email, "scope": "project",
               "access": [{"policyRef": {"name": "lab-reader"}, "parameters": [{"name": "organization", "valueReference": "Organization/123"}]}]}),
    )
    .await;
    let ready = s.wait_user("dr-lee", "True", None).await;
    let status = ready.status.unwrap();
    let membership_id = status.membership_id.clone().unwrap();
    assert!(status.user_id.is_some());
    let profile = status.profile.clone().unwrap();
    assert!(profile.starts_with("Practitioner/"));
    let (_, m) = membership(&s, &membership_id).await;
    assert_eq!(
        m["access"],
        json!([{"policy": {"reference": format!("AccessPolicy/{policy_id}")},
                "parameter": [{"name": "organization", "valueReference": {"reference": "Organization/123"}}]}])
    );
    assert!(m.get("accessPolicy").is_none(), "no project default policy on top");
    assert_eq!(m["identifier"][0]["value"], format!("ProjectUser/{}/dr-lee", s.ns.name));
    assert_eq!(m["user"]["display"], email.to_lowercase());

    // Console edit to the membership: put back through the membership (not through an invite).
    let mut widened = m.clone();
    widened["admin"] = json!(true);
    widened.as_object_mut().unwrap().remove("access");
    s.http().put(&format!("fhir/R4/ProjectMembership/{membership_id}"), &s.token, &widened).await.expect(200);
    eventually(Duration::from_secs(20), "membership drift put back", || async {
        let (_, now) = membership(&s, &membership_id).await;
        (now["admin"] == false && now["access"][0]["policy"]["reference"] == format!("AccessPolicy/{policy_id}"))
            .then_some(())
    })
    .await;
    // A renamed person: the profile follows.
    let patch = json!({"spec": {"lastName": "Lee-Smith"}});
    s.users().patch("dr-lee", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually(Duration::from_secs(20), "profile renamed", || async {
        let p = s.http().get(&format!("fhir/R4/{profile}"), &s.token).await.json();
        (p["name"][0]["family"] == "Lee-Smith").then_some(())
    })
    .await;
    s.expect_events("dr-lee", &["Created", "DriftCorrected", "Updated"]).await;

    delete_user(&s, "dr-lee").await;
    assert_eq!(membership(&s, &membership_id).await.0, 410, "membership removed");
    let left = s.http().get(&format!("fhir/R4/User?email={}", email.to_lowercase()), &s.token).await.json();
    assert!(left.get("entry").is_none(), "the project-scoped User went with it");
}

#[tokio::test]
async fn user_deletion_policies_and_external_ids() {
    let s = Setup::new("pu-delete", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("patient-self", json!([{"resourceType": "Patient", "criteria": "Patient?_id=%patient.id"}])).await;
    let access = json!([{"policyRef": {"name": "patient-self"}}]);
    s.create_user("carl", json!({"resourceType": "Patient", "firstName": "Carl", "lastName": "Ext", "externalId": format!("ext-{}", suffix()),
                                   "access": access, "deletionPolicy": "Deactivate"}))
    .await;
    s.create_user(
        "dora",
        json!({"firstName": "Dora", "lastName": "Kept", "email": format!("dora-{}@example.org", suffix()),
                                   "access": access, "deletionPolicy": "Orphan"}),
    )
    .await;
    let carl = s.wait_user("carl", "True", None).await.status.unwrap();
    assert!(carl.profile.as_deref().unwrap().starts_with("Patient/"));
    let dora = s.wait_user("dora", "True", None).await.status.unwrap();

    delete_user(&s, "carl").await;
    let (status, m) = membership(&s, &carl.membership_id.unwrap()).await;
    assert_eq!((status, m["active"].clone()), (200, json!(false)), "Deactivate keeps it with active: false");
    delete_user(&s, "dora").await;
    let (status, m) = membership(&s, &dora.membership_id.unwrap()).await;
    assert_eq!(status, 200, "Orphan leaves it");
    assert!(!m.to_string().contains("ProjectUser/"), "without the operator's identifier");
    s.expect_events("carl", &["Deactivated"]).await;
}

#[tokio::test]
async fn existing_members_admins_and_unrestricted_access_need_permission() {
    let s = Setup::new("pu-refuse", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    // Someone already invited this person in the console.
    let email = format!("existing-{}@example.org", suffix());
    let url = format!("admin/projects/{}/invite", s.admin.project_id);
    let reader = s.policies().get("reader").await.unwrap().status.unwrap().policy_id.unwrap();
    let body = json!({"resourceType": "Practitioner", "firstName": "Eve", "lastName": "Existing", "email": email,
                      "sendEmail": false, "accessPolicy": {"reference": format!("AccessPolicy/{reader}")}});
    let existing = s
        .http()
        .send(s.http().request(reqwest::Method::POST, &url, Some(&s.token)).json(&body))
        .await
        .expect(200)
        .json();
    let access = json!([{"policyRef": {"name": "reader"}}]);
    s.create_user("eve", json!({"firstName": "Eve", "lastName": "Existing", "email": email, "access": access})).await;
    let refused = s.wait_user("eve", "False", Some("AlreadyMember")).await;
    println!("refusal existing member: {:?}", refused.status.unwrap().conditions[0].message);
    s.users().patch("eve", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"adopt": true}}))).await.unwrap();
    // Adoption is the connection's to grant, by email (or domain) or external id.
    s.wait_user("eve", "False", Some("AdoptionNotAllowed")).await;
    s.set_limits(json!({"adoption": {"userEmails": [email.to_uppercase()]}})).await;
    let adopted = s.wait_user("eve", "True", None).await;
    assert_eq!(
        adopted.status.unwrap().membership_id.as_deref(),
        existing["id"].as_str(),
        "took over the existing membership"
    );
    let (_, m) = membership(&s, existing["id"].as_str().unwrap()).await;
    assert!(m.get("accessPolicy").is_none(), "the policy given in the console was replaced by the declared access");

    s.create_user("boss", json!({"firstName": "Bo", "lastName": "Ss", "email": format!("boss-{}@example.org", suffix()), "admin": true, "access": access}))
        .await;
    let refused = s.wait_user("boss", "False", Some("AdminNotAllowed")).await;
    println!("refusal admin: {:?}", refused.status.unwrap().conditions[0].message);
    s.create_user("everything", json!({"firstName": "Al", "lastName": "L", "email": format!("all-{}@example.org", suffix()), "unrestrictedAccess": true}))
        .await;
    s.wait_user("everything", "False", Some("UnrestrictedAccessNotAllowed")).await;
    let found = s
        .http()
        .get(
            &format!(
                "fhir/R4/ProjectMembership?identifier=urn:medplum-operator:default|ProjectUser/{}/boss",
                s.ns.name
            ),
            &s.token,
        )
        .await;
    assert!(found.json().get("entry").is_none(), "nothing was written to Medplum for a refused user");

    s.set_limits(json!({"allowAdmin": true, "allowUnrestrictedAccess": true})).await;
    let boss = s.wait_user("boss", "True", None).await;
    assert_eq!(membership(&s, &boss.status.unwrap().membership_id.unwrap()).await.1["admin"], true);
    let all = s.wait_user("everything", "True", None).await;
    let (_, m) = membership(&s, &all.status.unwrap().membership_id.unwrap()).await;
    assert!(m.get("access").is_none() && m.get("accessPolicy").is_none(), "no policy at all, as asked");
}

/// The set-password requests of `user` that `token` may read.
async fn security_requests(s: &Setup, token: &str, user: &str) -> Vec<Value> {
    let bundle = s.http().get(&format!("fhir/R4/UserSecurityRequest?user={user}"), token).await.expect(200).json();
    bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"].clone()).collect()
}

async fn set_password(s: &Setup, body: &Value) -> (u16, Value) {
    let answer = s.http().send(s.http().request(reqwest::Method::POST, "auth/setpassword", None).json(body)).await;
    (answer.status.as_u16(), answer.json())
}

/// The path to invite emails of one's own (README, ProjectUser): with `sendEmail: false` Medplum mails
/// nothing but still makes the new user's set-password request, which a project admin reads for a
/// project-scoped user (and only a super admin for a server-scoped one) and answers with
/// `/auth/setpassword`, once.
#[tokio::test]
async fn a_custom_invite_email_finds_the_set_password_request() {
    let s = Setup::new("pu-email", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    s.ready_policy("reader", json!([{"resourceType": "Observation", "readonly": true}])).await;
    let super_admin = s.medplum.super_admin_token().await;
    for scope in ["project", "server"] {
        s.create_user(
            scope,
            json!({"firstName": "Ada", "lastName": "Lee", "email": format!("ada-{scope}-{}@example.org", suffix()),
                   "scope": scope, "access": [{"policyRef": {"name": "reader"}}]}),
        )
        .await;
        let user = format!("User/{}", s.wait_user(scope, "True", None).await.status.unwrap().user_id.unwrap());
        let seen_by_super_admin = security_requests(&s, &super_admin, &user).await;
        assert_eq!(seen_by_super_admin.len(), 1, "one set-password request for {user}");
        assert_eq!(seen_by_super_admin[0]["type"], "invite");
        let seen_by_admin = security_requests(&s, &s.token, &user).await;
        if scope == "server" {
            assert!(seen_by_admin.is_empty(), "a server-scoped user's request belongs to no project");
            continue;
        }
        assert_eq!(seen_by_admin.len(), 1, "the project admin reads a project-scoped user's request");
        let request = &seen_by_admin[0];
        let body = json!({"id": request["id"], "secret": request["secret"], "password": "a-long-new-password-1"});
        assert_eq!(set_password(&s, &body).await.0, 200, "the link of a custom email sets the password");
        let (status, again) = set_password(&s, &body).await;
        assert_eq!((status, again["issue"][0]["details"]["text"].clone()), (400, json!("Already used")));
    }
}
