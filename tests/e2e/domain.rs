//! DomainConfiguration: every user of an email domain signs in with an enterprise identity provider.
//! Medplum's login method lookup (`POST /auth/method`) is how a sign-in page learns where to send a
//! person, so that is what the tests ask.

use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use crate::support::fixtures::{Setup, WAIT, apply_secret};
use crate::support::{Operator, eventually};
use medplum_operator::crd::{ClusterMedplumConnection, DomainConfiguration};

/// A ClusterMedplumConnection `name` owned by the test's namespace, with the target's super-admin
/// credential (or, with `super_admin` false, the project admin's).
async fn cluster_connection(s: &Setup, name: &str, super_admin: bool) {
    let (id, secret) = if super_admin {
        s.medplum.super_admin_credentials()
    } else {
        (s.admin.client_id.clone(), s.admin.client_secret.clone())
    };
    s.create_secret(name, &[("MEDPLUM_CLIENT_ID", &id), ("MEDPLUM_CLIENT_SECRET", &secret)]).await;
    let object: ClusterMedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "ClusterMedplumConnection",
        "metadata": {"name": name, "labels": {"medplum-operator-test": s.ns.name}, "ownerReferences": [s.ns.owner_reference()]},
        "spec": {"baseUrl": s.medplum.base_url(), "projectId": s.admin.project_id, "superAdminCredential": super_admin,
                 "credentialsSecretRef": {"namespace": s.ns.name, "name": name}}
    }))
    .unwrap();
    Api::<ClusterMedplumConnection>::all(s.client.clone()).create(&PostParams::default(), &object).await.unwrap();
}

async fn create_domain(s: &Setup, name: &str, connection: &str, domain: &str, extra: Value) {
    let mut spec = json!({
        "connectionRef": {"name": connection}, "domain": domain,
        "identityProvider": {"authorizeUrl": "https://idp.example.org/authorize", "tokenUrl": "https://idp.example.org/token",
                             "userInfoUrl": "https://idp.example.org/userinfo", "clientId": "medplum",
                             "clientSecretRef": {"namespace": s.ns.name, "name": "idp", "key": "client-secret"}}
    });
    spec.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    let object: DomainConfiguration = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "DomainConfiguration",
        "metadata": {"name": name, "labels": {"medplum-operator-test": s.ns.name}, "ownerReferences": [s.ns.owner_reference()]},
        "spec": spec
    }))
    .unwrap();
    Api::<DomainConfiguration>::all(s.client.clone()).create(&PostParams::default(), &object).await.unwrap();
}

async fn wait_domain(s: &Setup, name: &str, status: &str, reason: Option<&str>) -> DomainConfiguration {
    let api = Api::<DomainConfiguration>::all(s.client.clone());
    eventually(WAIT, &format!("DomainConfiguration {name}: Ready={status} {reason:?}"), || async {
        let object = api.get(name).await.ok()?;
        let ready = object.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
        let current = object.status.as_ref()?.observed_generation == object.metadata.generation;
        (current && ready.status == status && reason.is_none_or(|r| ready.reason == r)).then_some(object)
    })
    .await
}

/// What Medplum's login method lookup answers for an address.
async fn login_method(s: &Setup, email: &str) -> Value {
    let request = s.http().request(reqwest::Method::POST, "auth/method", None).json(&json!({"email": email}));
    s.http().send(request).await.expect(200).json()
}

#[tokio::test]
async fn a_domain_sends_its_users_to_the_identity_provider() {
    let s = Setup::new("domain", &[], json!({})).await;
    let suffix = crate::support::suffix();
    let (connection, domain) = (format!("super-admin-{suffix}"), format!("acme-{suffix}.example.org"));
    cluster_connection(&s, &connection, true).await;
    let label = json!({"medplum.com/source-secret": "true"});
    apply_secret(&s.client, &s.ns.name, "idp", &[("client-secret", "idp-secret-1")], label.clone()).await;
    let _operator = Operator::start(&s.ns.name, &["--resync-interval", "15s"]).await;
    let name = format!("acme-{suffix}");
    create_domain(&s, &name, &connection, &domain, json!({})).await;
    let ready = wait_domain(&s, &name, "True", None).await;
    let id = ready.status.unwrap().domain_configuration_id.expect("id in status");

    // Medplum now sends everyone at the domain to the identity provider, and no one else.
    let method = login_method(&s, &format!("ada@{domain}")).await;
    assert_eq!(method["domain"], domain.as_str());
    let authorize = method["authorizeUrl"].as_str().unwrap();
    assert!(
        authorize.starts_with("https://idp.example.org/authorize?") && authorize.contains("client_id=medplum"),
        "{authorize}"
    );
    assert_eq!(login_method(&s, &format!("ada@other-{suffix}.example.org")).await, json!({}));
    let sa = s.medplum.super_admin_token().await;
    let stored = s.http().get(&format!("fhir/R4/DomainConfiguration/{id}"), &sa).await.expect(200).json();
    assert_eq!(stored["identityProvider"]["clientSecret"], "idp-secret-1", "the secret comes from the Secret");

    // A new client secret in the (labelled) Secret reaches Medplum at once, well within the resync.
    let read = || async { s.http().get(&format!("fhir/R4/DomainConfiguration/{id}"), &sa).await.json() };
    let changed = std::time::Instant::now();
    apply_secret(&s.client, &s.ns.name, "idp", &[("client-secret", "idp-secret-2")], label).await;
    eventually(Duration::from_secs(8), "the new secret pushed", || async {
        (read().await["identityProvider"]["clientSecret"] == "idp-secret-2").then_some(())
    })
    .await;
    println!("figure: a DomainConfiguration's new client secret reached Medplum after {:?}", changed.elapsed());
    // A console edit is put back at the resync.
    let mut edited = read().await;
    edited["identityProvider"]["clientId"] = json!("someone-else");
    s.http().put(&format!("fhir/R4/DomainConfiguration/{id}"), &sa, &edited).await.expect(200);
    eventually(Duration::from_secs(40), "drift put back", || async {
        (read().await["identityProvider"]["clientId"] == "medplum").then_some(())
    })
    .await;
    assert!(!s.public_text().await.contains("idp-secret"), "no client secret in Events or status");

    // One made by hand is left alone unless adopted.
    let other = format!("beta-{suffix}.example.org");
    let by_hand = json!({"resourceType": "DomainConfiguration", "domain": other,
                         "identityProvider": {"authorizeUrl": "https://old.example.org/authorize", "tokenUrl": "https://old.example.org/token",
                                              "userInfoUrl": "https://old.example.org/userinfo", "clientId": "old", "clientSecret": "old"}});
    let by_hand_id = s.http().post("fhir/R4/DomainConfiguration", &sa, &by_hand).await.expect(201).json()["id"].clone();
    let beta = format!("beta-{suffix}");
    create_domain(&s, &beta, &connection, &other, json!({})).await;
    let refused = wait_domain(&s, &beta, "False", Some("AlreadyExists")).await;
    assert!(refused.status.unwrap().domain_configuration_id.is_none());
    let api = Api::<DomainConfiguration>::all(s.client.clone());
    let adopt = json!({"spec": {"adopt": true}});
    api.patch(&beta, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&adopt)).await.unwrap();
    let adopted = wait_domain(&s, &beta, "True", None).await;
    assert_eq!(adopted.status.unwrap().domain_configuration_id.map(Value::from), Some(by_hand_id));
    assert!(
        login_method(&s, &format!("bo@{other}")).await["authorizeUrl"].as_str().unwrap().contains("client_id=medplum")
    );

    // Only a super admin may: a project admin's connection is refused before anything reaches Medplum.
    let admin_connection = format!("project-admin-{suffix}");
    cluster_connection(&s, &admin_connection, false).await;
    let gamma = format!("gamma-{suffix}");
    create_domain(&s, &gamma, &admin_connection, &format!("gamma-{suffix}.example.org"), json!({})).await;
    wait_domain(&s, &gamma, "False", Some("SuperAdminRequired")).await;

    // Deleting it deletes the DomainConfiguration: the domain's users sign in with passwords again.
    api.delete(&name, &Default::default()).await.unwrap();
    eventually(WAIT, "DomainConfiguration deleted", || async {
        api.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(login_method(&s, &format!("ada@{domain}")).await, json!({}));
    assert!(matches!(s.http().get(&format!("fhir/R4/DomainConfiguration/{id}"), &sa).await.status.as_u16(), 404 | 410));
}
