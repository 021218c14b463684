//! AccessPolicy against the real control plane: what Medplum gets, drift, refusals, the ceiling, and the
//! in-use guard on deletion.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::fixtures::Setup;
use crate::support::{Operator, eventually};
use medplum_operator::crd::MedplumConnection;

async fn tagged_policies(s: &Setup, name: &str) -> Vec<Value> {
    let query = format!("fhir/R4/AccessPolicy?_tag=urn:medplum-operator:default|AccessPolicy/{}/{name}", s.ns.name);
    let bundle = s.http().get(&query, &s.token).await.expect(200).json();
    bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"].clone()).collect()
}

fn ready_message(policy: &medplum_operator::crd::AccessPolicy) -> String {
    policy.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().message.clone()
}

#[tokio::test]
async fn policy_lifecycle_with_drift_and_the_in_use_guard() {
    let s = Setup::new("ap-life", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &["--resync-interval", "2s"]).await;
    s.create_policy(
        "lab-reader",
        json!({"displayName": "Lab reader", "compartment": {"reference": "%organization"},
               "resources": [{"resourceType": "Observation", "criteria": "Observation?status=final&subject:missing=false",
                              "readonly": true, "interactions": ["read", "search"], "hiddenFields": ["performer"],
                              "writeConstraints": ["%after.status = 'final'"]},
                             {"resourceType": "Organization", "criteria": "Organization?_id=%organization.id", "readonly": true}],
               "ipAccessRules": [{"name": "office", "value": "10.2.", "action": "allow"}, {"name": "rest", "value": "0", "action": "block"},
                                 {"value": "1", "action": "block"}]}),
    )
    .await;
    let ready = s.wait_policy("lab-reader", "True", None).await;
    let policy_id = ready.status.unwrap().policy_id.unwrap();
    let stored = s.http().get(&format!("fhir/R4/AccessPolicy/{policy_id}"), &s.token).await.expect(200).json();
    assert_eq!(stored["name"], "Lab reader");
    assert_eq!(stored["compartment"], json!({"reference": "%organization"}), "%variables kept as text");
    assert_eq!(
        stored["resource"][0],
        json!({"resourceType": "Observation", "criteria": "Observation?status=final&subject:missing=false", "readonly": true,
               "interaction": ["read", "search"], "hiddenFields": ["performer"],
               "writeConstraint": [{"language": "text/fhirpath", "expression": "%after.status = 'final'"}]})
    );
    assert_eq!(stored["ipAccessRule"][0], json!({"name": "office", "value": "10.2.", "action": "allow"}));
    assert_eq!(tagged_policies(&s, "lab-reader").await.len(), 1);

    // Console edits are put back; spec changes apply within seconds.
    let mut edited = stored.clone();
    edited["resource"][0]["readonly"] = json!(false);
    edited["name"] = json!("edited");
    s.http().put(&format!("fhir/R4/AccessPolicy/{policy_id}"), &s.token, &edited).await.expect(200);
    eventually(Duration::from_secs(20), "policy drift put back", || async {
        let now = s.http().get(&format!("fhir/R4/AccessPolicy/{policy_id}"), &s.token).await.json();
        (now["name"] == "Lab reader" && now["resource"][0]["readonly"] == true).then_some(())
    })
    .await;
    let patch = json!({"spec": {"displayName": "Lab reader v2"}});
    s.policies().patch("lab-reader", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually(Duration::from_secs(20), "spec change applied", || async {
        (s.http().get(&format!("fhir/R4/AccessPolicy/{policy_id}"), &s.token).await.json()["name"] == "Lab reader v2")
            .then_some(())
    })
    .await;
    s.expect_events("lab-reader", &["Created", "DriftCorrected", "Updated"]).await;

    // A ClientApplication grants it: its membership carries exactly the declared access.
    s.create_client(
        "lab-sync",
        json!({"access": [{"policyRef": {"name": "lab-reader"}, "parameters": [{"name": "organization", "valueReference": "Organization/123"}]}]}),
    )
    .await;
    let ready = s.wait_ready("lab-sync").await.status.unwrap();
    let client_id = ready.client_id.unwrap();
    // The policy's IP rules block 127.0.0.1, where the operator runs: Medplum accepted the secret and
    // refused only the address, and the status says that is how the credentials were proven.
    let verified = ready.conditions.iter().find(|c| c.type_ == "CredentialVerified").unwrap();
    assert_eq!((verified.status.as_str(), verified.reason.as_str()), ("True", "SecretAcceptedAddressBlocked"));
    assert!(verified.message.contains("IP rules block the operator's address"), "{}", verified.message);
    let membership = s.memberships_of(&client_id).await.remove(0);
    assert_eq!(
        membership["access"],
        json!([{"policy": {"reference": format!("AccessPolicy/{policy_id}")},
                "parameter": [{"name": "organization", "valueReference": {"reference": "Organization/123"}}]}])
    );

    // Deleting the policy while it is granted waits, and says who uses it.
    s.policies().delete("lab-reader", &Default::default()).await.unwrap();
    let waiting = s.wait_policy("lab-reader", "False", Some("InUse")).await;
    let message = ready_message(&waiting);
    println!("in-use guard: {message:?}");
    assert!(message.contains("ClientApplication/lab-sync"), "{message}");
    assert_eq!(
        s.http().get(&format!("fhir/R4/AccessPolicy/{policy_id}"), &s.token).await.status,
        200,
        "still in Medplum"
    );
    let data = s.secret("lab-sync").await.unwrap();
    let answer = s.http().token_request(&client_id, &data["MEDPLUM_CLIENT_SECRET"]).await.expect(400);
    assert_eq!(
        answer.json()["error_description"],
        "IP address not allowed",
        "the client keeps working (from allowed addresses)"
    );
    s.delete_client_resource("lab-sync").await;
    let api = s.policies();
    // The grantee's deletion wakes the waiting policy at once; its backoff alone (after the retries
    // above) would take far longer.
    let released = std::time::Instant::now();
    eventually(Duration::from_secs(20), "policy deleted once unused", || async {
        api.get_opt("lab-reader").await.unwrap().is_none().then_some(())
    })
    .await;
    println!("figure: policy deleted {:?} after its last grantee went", released.elapsed());
    assert_eq!(s.http().get(&format!("fhir/R4/AccessPolicy/{policy_id}"), &s.token).await.status, 410);
}

#[tokio::test]
async fn a_membership_made_in_medplum_also_keeps_the_policy_and_orphan_leaves_it() {
    let s = Setup::new("ap-member", &[], json!({})).await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    let policy_id = s.ready_policy("shared", json!([{"resourceType": "Patient", "readonly": true}])).await;
    // Someone grants the policy in the console to a client the operator does not manage.
    let (legacy, _) = s.legacy_client("console-made", None).await;
    let mut membership = s.memberships_of(&legacy).await.remove(0);
    membership["accessPolicy"] = json!({"reference": format!("AccessPolicy/{policy_id}")});
    let id = membership["id"].as_str().unwrap().to_string();
    s.http().put(&format!("fhir/R4/ProjectMembership/{id}"), &s.token, &membership).await.expect(200);
    s.policies().delete("shared", &Default::default()).await.unwrap();
    let waiting = s.wait_policy("shared", "False", Some("InUse")).await;
    assert!(ready_message(&waiting).contains("memberships in Medplum still use it"));
    membership["accessPolicy"] = Value::Null;
    membership.as_object_mut().unwrap().remove("accessPolicy");
    let current = s.http().get(&format!("fhir/R4/ProjectMembership/{id}"), &s.token).await.json();
    membership["meta"] = current["meta"].clone();
    s.http().put(&format!("fhir/R4/ProjectMembership/{id}"), &s.token, &membership).await.expect(200);
    let api = s.policies();
    eventually(Duration::from_secs(60), "deleted once the membership let go", || async {
        api.get_opt("shared").await.unwrap().is_none().then_some(())
    })
    .await;

    s.create_policy(
        "kept",
        json!({"resources": [{"resourceType": "Patient", "readonly": true}], "deletionPolicy": "Orphan"}),
    )
    .await;
    let kept_id = s.wait_policy("kept", "True", None).await.status.unwrap().policy_id.unwrap();
    s.policies().delete("kept", &Default::default()).await.unwrap();
    eventually(Duration::from_secs(60), "orphaned", || async {
        api.get_opt("kept").await.unwrap().is_none().then_some(())
    })
    .await;
    let left = s.http().get(&format!("fhir/R4/AccessPolicy/{kept_id}"), &s.token).await.expect(200).json();
    assert!(!left["meta"].to_string().contains("urn:medplum-operator"), "left untagged");
}

#[tokio::test]
async fn policies_medplum_would_reject_or_misread_are_refused_up_front() {
    let s = Setup::new(
        "ap-refuse",
        &[],
        json!({"allowedResources": [{"resourceType": "Patient", "interactions": ["read", "search"]},
                                    {"resourceType": "Observation"}]}),
    )
    .await;
    let _operator = Operator::start(&s.ns.name, &[]).await;
    // Refused by the CRD schema, at apply time.
    let schema_cases = [
        ("cidr", json!({"ipAccessRules": [{"value": "10.0.0.0/8", "action": "block"}]}), "spec.ipAccessRules[0].value"),
        (
            "open-end",
            json!({"ipAccessRules": [{"value": "10.", "action": "allow"}]}),
            "the last IP rule must be a block rule",
        ),
        (
            "other-type",
            json!({"resources": [{"resourceType": "Observation", "criteria": "Patient?name=x"}]}),
            "criteria must start with the resourceType",
        ),
    ];
    for (name, spec, expected) in schema_cases {
        let policy: medplum_operator::crd::AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        let error = s.policies().create(&Default::default(), &policy).await.unwrap_err().to_string();
        assert!(error.contains(expected), "{name}: {error}");
        println!("refusal {name} (CRD): {error:?}");
    }
    // Refused by the operator, with a condition; nothing written to Medplum.
    let operator_cases = [
        (
            "modifier",
            json!({"resources": [{"resourceType": "Observation", "criteria": "Observation?code:exact=1234"}]}),
            "InvalidCriteria",
        ),
        (
            "chained",
            json!({"resources": [{"resourceType": "Observation", "criteria": "Observation?subject.name=Lee"}]}),
            "InvalidCriteria",
        ),
        (
            "not-allowed-type",
            json!({"resources": [{"resourceType": "Practitioner", "readonly": true}]}),
            "ExceedsConnectionLimits",
        ),
        ("too-much", json!({"resources": [{"resourceType": "Patient"}]}), "ExceedsConnectionLimits"),
    ];
    for (name, spec, _) in &operator_cases {
        s.create_policy(name, spec.clone()).await;
    }
    for (name, _, reason) in operator_cases {
        let refused = s.wait_policy(name, "False", Some(reason)).await;
        println!("refusal {name}: reason={reason} message={:?}", ready_message(&refused));
        assert!(tagged_policies(&s, name).await.is_empty(), "{name}: nothing in Medplum");
    }
    s.create_policy(
        "within",
        json!({"resources": [{"resourceType": "Patient", "readonly": true, "interactions": ["read"]}]}),
    )
    .await;
    s.wait_policy("within", "True", None).await;

    // Raising the ceiling lets a refused policy through.
    let patch = json!({"spec": {"limits": {"allowedResources": null}}});
    Api::<MedplumConnection>::namespaced(s.client.clone(), &s.ns.name)
        .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    s.wait_policy("too-much", "True", None).await;
}
