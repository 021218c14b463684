//! A hostile tenant: a namespace that may create the operator's resources (and read its own Secrets)
//! tries every path we know of to reach past the limits of the connection it was given. For each one
//! the refusal shows in status, and nothing changed in Medplum or in another namespace.
//!
//! The arena: a platform namespace holds the credential of a ClusterMedplumConnection (and has a
//! MedplumConnection of its own); the connection admits the tenant and a neighbour namespace. Unless a
//! test says otherwise the connection lists every adoption target, so that the refusals seen come from
//! the rules no listing can lift.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::fixtures::Setup;
use crate::support::{Operator, ProjectAdmin, eventually, suffix};
use medplum_operator::crd::{ClientApplication, ClusterMedplumConnection, MedplumConnection};

pub(crate) struct Arena {
    pub(crate) platform: Setup,
    pub(crate) tenant: Setup,
    pub(crate) neighbour: Setup,
    /// The ClusterMedplumConnection's name and its credential (a project-admin client).
    connection: String,
    credential: ProjectAdmin,
    _operator: Operator,
}

impl Arena {
    pub(crate) async fn new(prefix: &str, limits: Value) -> Self {
        let platform = Setup::new(&format!("{prefix}-platform"), &[], json!({})).await;
        let tenant = platform.sharing(&format!("{prefix}-tenant")).await;
        let neighbour = platform.sharing(&format!("{prefix}-neighbour")).await;
        let credential = platform.medplum.new_admin_client(&platform.admin.project_id, "platform credential").await;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "cluster-admin"},
            "stringData": {"MEDPLUM_CLIENT_ID": credential.client_id, "MEDPLUM_CLIENT_SECRET": credential.client_secret},
        }))
        .unwrap();
        Api::<Secret>::namespaced(platform.client.clone(), &platform.ns.name)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let connection = format!("shared-{}", platform.ns.name);
        let object: ClusterMedplumConnection = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "ClusterMedplumConnection",
            "metadata": {"name": connection, "labels": {"medplum-operator-test": platform.ns.name},
                         "ownerReferences": [platform.ns.owner_reference()]},
            "spec": {"baseUrl": platform.medplum.base_url(), "projectId": platform.admin.project_id,
                     "credentialsSecretRef": {"namespace": platform.ns.name, "name": "cluster-admin"},
                     "allowedNamespaces": {"names": [tenant.ns.name, neighbour.ns.name]}, "limits": limits},
        }))
        .unwrap();
        Api::<ClusterMedplumConnection>::all(platform.client.clone())
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
        let operator = Operator::start(
            &platform.ns.name,
            &["--watch-namespaces", &tenant.ns.name, "--watch-namespaces", &neighbour.ns.name],
        )
        .await;
        let arena = Self { platform, tenant, neighbour, connection, credential, _operator: operator };
        arena.wait_connection_ready().await;
        arena
    }

    /// `spec` with `connectionRef` set to the cluster connection.
    pub(crate) fn via(&self, mut spec: Value) -> Value {
        spec["connectionRef"] = json!({"kind": "ClusterMedplumConnection", "name": self.connection});
        spec
    }

    async fn wait_connection_ready(&self) {
        let api: Api<ClusterMedplumConnection> = Api::all(self.platform.client.clone());
        eventually(Duration::from_secs(60), "cluster connection Ready", || async {
            let c = api.get(&self.connection).await.ok()?;
            c.status?.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
        })
        .await;
    }

    pub(crate) async fn set_limits(&self, limits: Value) {
        let patch = json!({"spec": {"limits": limits}});
        Api::<ClusterMedplumConnection>::all(self.platform.client.clone())
            .patch(&self.connection, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// A policy in `s` through the cluster connection, once Ready; its Medplum id.
    pub(crate) async fn policy(&self, s: &Setup, name: &str, resources: Value) -> String {
        s.create_policy(name, self.via(json!({"resources": resources}))).await;
        s.wait_policy(name, "True", None).await.status.unwrap().policy_id.unwrap()
    }

    /// A Medplum object as the project admin sees it (its `meta.versionId` tells whether it changed).
    pub(crate) async fn medplum(&self, path: &str) -> Value {
        self.platform.http().get(path, &self.platform.token).await.expect(200).json()
    }
}

/// The Ready condition's reason and message of a ClientApplication, once its status says False.
pub(crate) async fn refused(s: &Setup, name: &str, reason: &str) -> String {
    let ca = s.wait_condition(name, "Ready", "False", Some(reason)).await;
    let message = ca.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
    println!("hostile path refused: {name}: {reason}: {message}");
    message
}

async fn refused_user(s: &Setup, name: &str, reason: &str) -> String {
    let user = s.wait_user(name, "False", Some(reason)).await;
    let message = user.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
    println!("hostile path refused: {name}: {reason}: {message}");
    message
}

fn version(resource: &Value) -> String {
    resource["meta"]["versionId"].as_str().unwrap().to_string()
}

/// A client made in the console, with `policy` (a Medplum id) or full access; its id and membership.
async fn console_client(s: &Setup, name: &str, policy: Option<&str>) -> (String, Value) {
    let (id, _) = s.legacy_client(name, policy).await;
    (id.clone(), s.memberships_of(&id).await.remove(0))
}

#[tokio::test]
async fn a_connections_own_credential_is_never_adopted() {
    let arena = Arena::new("hx-cred", json!({})).await;
    let (t, p) = (&arena.tenant, &arena.platform);
    // Even listed, with Keep and admin allowed, neither the cluster connection's credential (from a
    // namespace the tenant cannot read) nor another connection's is adopted.
    let everything = json!({"allowAdmin": true, "allowUnrestrictedAccess": true, "adoption": {
        "clientIds": [arena.credential.client_id, p.admin.client_id], "allowKeepSecret": true, "allowDelete": true}});
    arena.set_limits(everything).await;
    let membership_path = format!("fhir/R4/ProjectMembership/{}", arena.credential.membership_id);
    let before = arena.medplum(&membership_path).await;
    for (name, id) in [("steal-cluster", &arena.credential.client_id), ("steal-local", &p.admin.client_id)] {
        t.create_client(
            name,
            arena.via(json!({"access": [], "unrestrictedAccess": true, "adopt": {"clientId": id, "secret": "Keep"}})),
        )
        .await;
        let message = refused(t, name, "AdoptTargetIsConnectionCredential").await;
        assert!(message.contains("never adopted"), "{message}");
        assert!(t.secret(name).await.is_none(), "{name}: no Secret with the credential");
        assert!(!t.public_text().await.contains(&arena.credential.client_secret));
    }
    let after = arena.medplum(&membership_path).await;
    assert_eq!((version(&after), after["admin"].as_bool()), (version(&before), Some(true)), "credential untouched");
    let client = arena.medplum(&format!("fhir/R4/ClientApplication/{}", arena.credential.client_id)).await;
    assert!(client["meta"].get("tag").is_none(), "not tagged");
    arena.wait_connection_ready().await;
}

#[tokio::test]
async fn objects_beyond_the_limits_or_managed_elsewhere_are_never_adopted() {
    let arena = Arena::new("hx-beyond", json!({})).await;
    let (t, n, p) = (&arena.tenant, &arena.neighbour, &arena.platform);
    arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    // Targets: another admin client, the project's default client (no policy: full access), a client
    // whose policy reads every client's secret, one the neighbour manages, one another cluster manages.
    let other_admin = p.medplum.new_admin_client(&p.admin.project_id, "some team's admin").await;
    let defaults =
        p.http().get("fhir/R4/ClientApplication?name:exact=hx-beyond-platform Default Client", &p.token).await;
    let default_client = defaults.expect(200).json()["entry"][0]["resource"]["id"].as_str().unwrap().to_string();
    let secrets_reader = json!({"resourceType": "AccessPolicy", "name": "reads secrets",
                                "resource": [{"resourceType": "ClientApplication", "readonly": true}]});
    let secrets_reader = p.http().post("fhir/R4/AccessPolicy", &p.token, &secrets_reader).await.expect(201).json();
    let (reading_client, _) = console_client(p, "reads-secrets", secrets_reader["id"].as_str()).await;
    let neighbour_reader = arena.policy(n, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    n.create_client("app", arena.via(json!({"access": [{"policyRef": {"name": "reader"}}]}))).await;
    let neighbours = n.wait_ready("app").await.status.unwrap().client_id.unwrap();
    let (east, _) = console_client(p, "east-managed", Some(&neighbour_reader)).await;
    p.edit_client(&east, |c| {
        c["meta"]["tag"] = json!([{"system": "urn:medplum-operator:east", "code": "ClientApplication/apps/sync"}]);
    })
    .await;
    let targets = [
        ("admin", other_admin.client_id.clone(), "AdoptTargetBeyondLimits", "is a project admin"),
        ("default", default_client, "AdoptTargetBeyondLimits", "has no access policy"),
        ("secrets", reading_client, "AdoptTargetBeyondLimits", "administers the project"),
        ("neighbours", neighbours, "AlreadyManaged", &format!("ClientApplication/{}/app", n.ns.name) as &str),
        ("east", east, "AlreadyManaged", "urn:medplum-operator:east"),
    ];
    let ids: Vec<&str> = targets.iter().map(|(_, id, _, _)| id.as_str()).collect();
    arena.set_limits(json!({"adoption": {"clientIds": ids, "allowKeepSecret": true, "allowDelete": true}})).await;
    let mut before = Vec::new();
    for (_, id, _, _) in &targets {
        let client = arena.medplum(&format!("fhir/R4/ClientApplication/{id}")).await;
        let membership = p.memberships_of(id).await.remove(0);
        before.push((version(&client), version(&membership)));
    }
    for (name, id, reason, why) in &targets {
        let spec = json!({"access": [{"policyRef": {"name": "reader"}}], "adopt": {"clientId": id, "secret": "Keep"}});
        t.create_client(name, arena.via(spec)).await;
        let message = refused(t, name, reason).await;
        assert!(message.contains(why), "{name}: {message}");
        assert!(t.secret(name).await.is_none(), "{name}: no Secret");
    }
    for ((name, id, _, _), (client_version, membership_version)) in targets.iter().zip(before) {
        let client = arena.medplum(&format!("fhir/R4/ClientApplication/{id}")).await;
        let membership = p.memberships_of(id).await.remove(0);
        assert_eq!((version(&client), version(&membership)), (client_version, membership_version), "{name} untouched");
    }
    assert_eq!(t.memberships_of(&other_admin.client_id).await[0]["admin"], true);
}

#[tokio::test]
async fn policies_beyond_the_limits_or_managed_elsewhere_are_never_adopted() {
    let arena = Arena::new("hx-policies", json!({})).await;
    let (t, n, p) = (&arena.tenant, &arena.neighbour, &arena.platform);
    // Targets: a policy that reads every client's secret, one the neighbour manages, one another
    // cluster manages, and one the connection does not list.
    let console = |name: &'static str, resource: Value| async move {
        let body = json!({"resourceType": "AccessPolicy", "name": name, "resource": resource});
        p.http().post("fhir/R4/AccessPolicy", &p.token, &body).await.expect(201).json()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let secrets = console("reads secrets", json!([{"resourceType": "ClientApplication", "readonly": true}])).await;
    let neighbours = arena.policy(n, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let east = console("east", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let east_path = format!("fhir/R4/AccessPolicy/{east}");
    let mut tagged = arena.medplum(&east_path).await;
    tagged["meta"]["tag"] = json!([{"system": "urn:medplum-operator:east", "code": "AccessPolicy/apps/reader"}]);
    p.http().put(&east_path, &p.token, &tagged).await.expect(200);
    let unlisted = console("unlisted", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let targets = [
        ("secrets", secrets.clone(), "AdoptTargetBeyondLimits", "administers the project"),
        ("neighbours", neighbours.clone(), "AlreadyManaged", &format!("AccessPolicy/{}/reader", n.ns.name) as &str),
        ("east", east.clone(), "AlreadyManaged", "urn:medplum-operator:east"),
        ("unlisted", unlisted, "AdoptionNotAllowed", "does not allow adopting"),
    ];
    arena.set_limits(json!({"adoption": {"policyIds": [secrets, neighbours, east], "allowDelete": true}})).await;
    let mut before = Vec::new();
    for (_, id, _, _) in &targets {
        before.push(version(&arena.medplum(&format!("fhir/R4/AccessPolicy/{id}")).await));
    }
    for (name, id, reason, why) in &targets {
        let spec = json!({"adopt": {"policyId": id}, "resources": [{"resourceType": "Patient", "readonly": true}]});
        t.create_policy(name, arena.via(spec)).await;
        let refused = t.wait_policy(name, "False", Some(reason)).await;
        let message = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
        println!("hostile path refused: policy {name}: {reason}: {message}");
        assert!(message.contains(why), "{name}: {message}");
    }
    for ((name, id, _, _), was) in targets.iter().zip(before) {
        assert_eq!(version(&arena.medplum(&format!("fhir/R4/AccessPolicy/{id}")).await), was, "{name} untouched");
    }
}

#[tokio::test]
async fn adoption_and_keeping_a_secret_are_the_connections_to_grant() {
    let arena = Arena::new("hx-grant", json!({})).await;
    let (t, p) = (&arena.tenant, &arena.platform);
    let reader = arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let (legacy, membership) = console_client(p, "legacy", Some(&reader)).await;
    let spec = |secret: &str| {
        arena.via(
            json!({"access": [{"policyRef": {"name": "reader"}}], "adopt": {"clientId": legacy, "secret": secret}}),
        )
    };
    t.create_client("unlisted", spec("Rotate")).await;
    refused(t, "unlisted", "AdoptionNotAllowed").await;
    t.delete_client_resource("unlisted").await;
    arena.set_limits(json!({"adoption": {"clientIds": [legacy]}})).await;
    t.create_client("keeper", spec("Keep")).await;
    refused(t, "keeper", "KeepSecretNotAllowed").await;
    assert!(t.secret("keeper").await.is_none());
    let after = p.memberships_of(&legacy).await.remove(0);
    assert_eq!(version(&after), version(&membership), "nothing written");
    assert!(arena.medplum(&format!("fhir/R4/ClientApplication/{legacy}")).await["meta"].get("tag").is_none());

    // Granted, adoption rotates; deleting the resource releases what the namespace did not create.
    t.delete_client_resource("keeper").await;
    t.create_client("adopter", spec("Rotate")).await;
    t.wait_ready("adopter").await;
    t.delete_client_resource("adopter").await;
    t.expect_events("adopter", &["Adopted", "Released"]).await;
    let left = arena.medplum(&format!("fhir/R4/ClientApplication/{legacy}")).await;
    assert!(!left.to_string().contains("urn:medplum-operator"), "released, untagged: {left}");
    assert_eq!(p.memberships_of(&legacy).await.len(), 1, "its membership stays");
}

#[tokio::test]
async fn a_tenant_cannot_demote_or_remove_a_human_admin() {
    let arena = Arena::new("hx-admin", json!({})).await;
    let (t, p) = (&arena.tenant, &arena.platform);
    arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let email = format!("boss-{}@example.org", suffix());
    let url = format!("admin/projects/{}/invite", p.admin.project_id);
    let body = json!({"resourceType": "Practitioner", "firstName": "Bo", "lastName": "Ss", "email": email,
                      "sendEmail": false, "admin": true});
    let admin = p.http().send(p.http().request(reqwest::Method::POST, &url, Some(&p.token)).json(&body));
    let admin = admin.await.expect(200).json();
    let path = format!("fhir/R4/ProjectMembership/{}", admin["id"].as_str().unwrap());
    arena.set_limits(json!({"adoption": {"userEmails": ["@example.org"], "allowDelete": false}})).await;
    let spec = arena.via(json!({"firstName": "Bo", "lastName": "Ss", "email": email, "adopt": true,
                                "access": [{"policyRef": {"name": "reader"}}]}));
    t.create_user("boss", spec).await;
    let message = refused_user(t, "boss", "AdoptTargetBeyondLimits").await;
    assert!(message.contains("is a project admin"), "{message}");
    let after = arena.medplum(&path).await;
    assert_eq!((version(&after), after["admin"].as_bool()), (version(&admin), Some(true)), "not demoted");

    // A platform team that allows admin lets the adoption happen; deleting the resource still only
    // releases the person unless the connection allows deleting adopted objects.
    arena.set_limits(json!({"allowAdmin": true})).await;
    t.wait_user("boss", "True", None).await;
    t.users().delete("boss", &Default::default()).await.unwrap();
    t.expect_events("boss", &["Adopted", "Released"]).await;
    let kept = arena.medplum(&path).await;
    assert!(!kept.to_string().contains("urn:medplum-operator"), "released: {kept}");
}

#[tokio::test]
async fn a_member_another_namespace_manages_is_not_adopted() {
    let arena = Arena::new("hx-member", json!({})).await;
    let (t, n) = (&arena.tenant, &arena.neighbour);
    for s in [t, n] {
        arena.policy(s, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    }
    arena
        .set_limits(json!({"allowAdmin": true, "adoption": {"userEmails": ["@example.org"], "allowDelete": true}}))
        .await;
    let email = format!("lee-{}@example.org", suffix());
    let spec = arena.via(json!({"firstName": "Ada", "lastName": "Lee", "email": email, "adopt": true,
                                "access": [{"policyRef": {"name": "reader"}}]}));
    n.create_user("lee", spec.clone()).await;
    let membership = n.wait_user("lee", "True", None).await.status.unwrap().membership_id.unwrap();
    let path = format!("fhir/R4/ProjectMembership/{membership}");
    let before = arena.medplum(&path).await;
    t.create_user("lee", spec).await;
    let message = refused_user(t, "lee", "AlreadyManaged").await;
    assert!(message.contains(&format!("ProjectUser/{}/lee", n.ns.name)), "{message}");
    assert_eq!(version(&arena.medplum(&path).await), version(&before), "the neighbour's member untouched");
    // Deleting the tenant's refused resource does nothing to the neighbour's member.
    t.users().delete("lee", &Default::default()).await.unwrap();
    eventually(Duration::from_secs(30), "refused user gone", || async {
        t.users().get_opt("lee").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(version(&arena.medplum(&path).await), version(&before));
}

#[tokio::test]
async fn policies_that_administer_the_project_or_read_secrets_are_refused() {
    let arena = Arena::new("hx-policy", json!({})).await;
    let t = &arena.tenant;
    for (name, resource) in [
        ("client-secrets", json!({"resourceType": "ClientApplication", "readonly": true})),
        ("other-policies", json!({"resourceType": "AccessPolicy"})),
        ("bots", json!({"resourceType": "Bot"})),
        ("everything-read", json!({"resourceType": "*", "readonly": true})),
    ] {
        t.create_policy(name, arena.via(json!({"resources": [resource]}))).await;
        let policy = t.wait_policy(name, "False", Some("ExceedsConnectionLimits")).await;
        let message = policy.status.unwrap().conditions[0].message.clone();
        println!("hostile path refused: {name}: ExceedsConnectionLimits: {message}");
        assert!(message.contains("administers the project"), "{message}");
        let tagged =
            format!("fhir/R4/AccessPolicy?_tag=urn:medplum-operator:default|AccessPolicy/{}/{name}", t.ns.name);
        assert!(
            t.http().get(&tagged, &t.token).await.expect(200).json().get("entry").is_none(),
            "{name}: not in Medplum"
        );
    }
    // Criteria Medplum would misread are refused too (a chained search could reach other types).
    t.create_policy(
        "chained",
        arena.via(json!({"resources": [{"resourceType": "Observation", "criteria": "Observation?subject.name=Lee"}]})),
    )
    .await;
    t.wait_policy("chained", "False", Some("InvalidCriteria")).await;
}

#[tokio::test]
async fn parameter_values_cannot_rewrite_a_policy_and_reserved_labels_are_refused() {
    let arena = Arena::new("hx-text", json!({})).await;
    let t = &arena.tenant;
    arena.policy(t, "status", json!([{"resourceType": "Observation", "criteria": "Observation?status=%status"}])).await;
    // On the real Medplum this value grants Patient, which the policy never named (see README).
    let injected = arena.via(json!({"access": [{"policyRef": {"name": "status"},
        "parameters": [{"name": "status", "valueString": "final\"},{\"resourceType\":\"Patient"}]}]}));
    let object: ClientApplication = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "ClientApplication", "metadata": {"name": "injector"}, "spec": injected}))
    .unwrap();
    let error = t.clients().create(&PostParams::default(), &object).await.unwrap_err().to_string();
    println!("hostile path refused: injector: API server: {error}");
    assert!(error.contains("valueString"), "{error}");
    // Labels and annotations the operator sets and watches stay its own.
    for metadata in [
        json!({"labels": {"medplum.com/client-application": "app"}}),
        json!({"annotations": {"medplum.com/issued-at": "2030-01-01T00:00:00Z"}}),
    ] {
        let object: ClientApplication = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "ClientApplication", "metadata": {"name": "labeller"},
            "spec": arena.via(json!({"access": [{"policyRef": {"name": "status"}}], "secret": metadata}))}))
        .unwrap();
        let error = t.clients().create(&PostParams::default(), &object).await.unwrap_err().to_string();
        println!("hostile path refused: labeller: API server: {error}");
        assert!(error.contains("are the operator's"), "{error}");
    }
}

#[tokio::test]
async fn secrets_and_workloads_the_tenant_names_are_written_only_when_they_are_the_clients() {
    let arena = Arena::new("hx-secret", json!({})).await;
    let (t, n) = (&arena.tenant, &arena.neighbour);
    arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    let access = || json!([{"policyRef": {"name": "reader"}}]);
    t.create_client("app", arena.via(json!({"access": access()}))).await;
    t.wait_ready("app").await;
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns.name);
    let decoy = |name: &str, type_: &str, labels: Value| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "type": type_,
                                      "stringData": {"username": "u", "password": "p"}}))
        .unwrap()
    };
    secrets.create(&PostParams::default(), &decoy("basic", "kubernetes.io/basic-auth", json!({}))).await.unwrap();
    secrets
        .create(
            &PostParams::default(),
            &decoy("creds", "Opaque", json!({"medplum.com/connection-credentials": "true"})),
        )
        .await
        .unwrap();
    for (name, target, why) in [
        ("overwriter", "app", "holds the credentials of ClientApplication app"),
        ("typed", "basic", "is of type kubernetes.io/basic-auth"),
        ("credentials", "creds", "holds a connection's credentials"),
    ] {
        let before = secrets.get(target).await.unwrap().metadata.resource_version;
        t.create_client(name, arena.via(json!({"access": access(), "secret": {"name": target, "merge": true}}))).await;
        let message = refused(t, name, "SecretConflict").await;
        assert!(message.contains(why), "{name}: {message}");
        assert_eq!(secrets.get(target).await.unwrap().metadata.resource_version, before, "{target} unchanged");
        assert!(t.tagged_clients(name).await.is_empty(), "{name}: nothing in Medplum");
    }
    // A restart target must use the client's Secret: the operator does not restart other workloads.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(t.client.clone(), &t.ns.name);
    let unrelated: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "unrelated"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "unrelated"}},
                 "template": {"metadata": {"labels": {"app": "unrelated"}},
                              "spec": {"containers": [{"name": "db", "image": "example.org/db:1"}]}}}}))
    .unwrap();
    deployments.create(&PostParams::default(), &unrelated).await.unwrap();
    // Its generation moves with every change of its spec (not with the controller's status updates).
    let before = deployments.get("unrelated").await.unwrap().metadata.generation;
    t.create_client(
        "restarter",
        arena.via(
            json!({"access": access(), "rotation": {"restartTargets": [{"kind": "Deployment", "name": "unrelated"}]}}),
        ),
    )
    .await;
    let message = refused(t, "restarter", "RestartTargetNotAllowed").await;
    assert!(message.contains("does not use Secret restarter"), "{message}");
    assert_eq!(deployments.get("unrelated").await.unwrap().metadata.generation, before, "not restarted");
    // A Secret of the tenant labelled with a neighbour's client name touches nothing of the neighbour.
    arena.policy(n, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    n.create_client("victim", arena.via(json!({"access": access()}))).await;
    n.wait_ready("victim").await;
    let theirs: Api<Secret> = Api::namespaced(n.client.clone(), &n.ns.name);
    let before = theirs.get("victim").await.unwrap().metadata.resource_version;
    secrets
        .create(&PostParams::default(), &decoy("lure", "Opaque", json!({"medplum.com/client-application": "victim"})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(theirs.get("victim").await.unwrap().metadata.resource_version, before, "the neighbour's Secret");
    assert!(t.secret("victim").await.is_none(), "nothing of the neighbour's written here");
}

#[tokio::test]
async fn references_never_leave_what_admits_the_namespace() {
    let arena = Arena::new("hx-refs", json!({})).await;
    let (t, n, p) = (&arena.tenant, &arena.neighbour, &arena.platform);
    arena.policy(n, "only-in-neighbour", json!([{"resourceType": "Patient", "readonly": true}])).await;
    arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    // A cluster connection that admits only the neighbour.
    let closed: ClusterMedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "ClusterMedplumConnection",
        "metadata": {"name": format!("closed-{}", p.ns.name), "labels": {"medplum-operator-test": p.ns.name},
                     "ownerReferences": [p.ns.owner_reference()]},
        "spec": {"baseUrl": p.medplum.base_url(), "projectId": p.admin.project_id,
                 "credentialsSecretRef": {"namespace": p.ns.name, "name": "cluster-admin"},
                 "allowedNamespaces": {"names": [n.ns.name]}},
    }))
    .unwrap();
    Api::<ClusterMedplumConnection>::all(p.client.clone()).create(&PostParams::default(), &closed).await.unwrap();
    let attempts = [
        (
            "closed",
            json!({"connectionRef": {"kind": "ClusterMedplumConnection", "name": format!("closed-{}", p.ns.name)},
                          "access": [{"policyRef": {"name": "reader"}}]}),
            "ConnectionNotAllowed",
        ),
        // The platform namespace's MedplumConnection is called "default"; a reference never leaves the namespace.
        (
            "local",
            json!({"connectionRef": {"kind": "MedplumConnection", "name": "default"},
                         "access": [{"policyRef": {"name": "reader"}}]}),
            "ConnectionNotFound",
        ),
        ("borrower", arena.via(json!({"access": [{"policyRef": {"name": "only-in-neighbour"}}]})), "PolicyNotFound"),
    ];
    for (name, spec, reason) in attempts {
        t.create_client(name, spec).await;
        refused(t, name, reason).await;
        assert!(t.tagged_clients(name).await.is_empty(), "{name}: nothing in Medplum");
        assert!(t.secret(name).await.is_none());
    }
    // A policy of the namespace made through another connection cannot be granted through this one.
    t.create_policy(
        "elsewhere",
        json!({"connectionRef": {"kind": "ClusterMedplumConnection", "name": format!("closed-{}", p.ns.name)},
                                        "resources": [{"resourceType": "Patient", "readonly": true}]}),
    )
    .await;
    t.create_client("mixer", arena.via(json!({"access": [{"policyRef": {"name": "elsewhere"}}]}))).await;
    refused(t, "mixer", "PolicyConnectionMismatch").await;
}

#[tokio::test]
async fn a_super_admin_connection_adopts_nothing_outside_its_project() {
    let arena = Arena::new("hx-super", json!({})).await;
    let (t, p) = (&arena.tenant, &arena.platform);
    // The platform switches the cluster connection to a super-admin credential managing its project.
    let (sa_id, sa_secret) = p.medplum.super_admin_credentials();
    let secret = json!({"stringData": {"MEDPLUM_CLIENT_ID": sa_id, "MEDPLUM_CLIENT_SECRET": sa_secret}});
    Api::<Secret>::namespaced(p.client.clone(), &p.ns.name)
        .patch("cluster-admin", &PatchParams::default(), &Patch::Merge(&secret))
        .await
        .unwrap();
    arena.set_limits(json!({})).await;
    let patch = json!({"spec": {"superAdminCredential": true}});
    Api::<ClusterMedplumConnection>::all(p.client.clone())
        .patch(&arena.connection, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    arena.wait_connection_ready().await;
    // A client of another project, listed for adoption all the same.
    let elsewhere = p.medplum.new_project("hx-super-elsewhere").await;
    let foreign_token = p.http().token(&elsewhere.client_id, &elsewhere.client_secret).await;
    let url = format!("admin/projects/{}/client", elsewhere.project_id);
    let request = p.http().request(reqwest::Method::POST, &url, Some(&foreign_token)).json(&json!({"name": "theirs"}));
    let theirs = p.http().send(request).await.expect(201).json()["id"].as_str().unwrap().to_string();
    arena
        .set_limits(
            json!({"allowUnrestrictedAccess": true, "adoption": {"clientIds": [theirs], "allowKeepSecret": true}}),
        )
        .await;
    arena.policy(t, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
    t.create_client(
        "reacher",
        arena.via(
            json!({"access": [{"policyRef": {"name": "reader"}}], "adopt": {"clientId": theirs, "secret": "Keep"}}),
        ),
    )
    .await;
    refused(t, "reacher", "AdoptTargetNotFound").await;
    let untouched =
        p.http().get(&format!("fhir/R4/ClientApplication/{theirs}"), &foreign_token).await.expect(200).json();
    assert!(untouched["meta"].get("tag").is_none(), "the other project's client untouched");
    assert!(t.secret("reacher").await.is_none());
}

#[tokio::test]
async fn a_tenant_cannot_rotate_the_cluster_connections_credential() {
    let arena = Arena::new("hx-rotate", json!({})).await;
    let (t, p) = (&arena.tenant, &arena.platform);
    // The platform team opts in to rotation on request; only an annotation on the cluster-scoped
    // connection asks for one, and no tenant can write it.
    let opt_in = json!({"spec": {"credentialRotation": {"gracePeriod": "1s"}}});
    Api::<ClusterMedplumConnection>::all(p.client.clone())
        .patch(&arena.connection, &PatchParams::default(), &Patch::Merge(&opt_in))
        .await
        .unwrap();
    // The tenant's own connection, opted in with a schedule due at once, naming the cluster
    // credential's client id with a guessed secret: it never verifies, so nothing is rotated.
    t.create_secret(
        "borrowed",
        &[("MEDPLUM_CLIENT_ID", &arena.credential.client_id), ("MEDPLUM_CLIENT_SECRET", "guessed-secret-value")],
    )
    .await;
    let connection: MedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "MedplumConnection", "metadata": {"name": "borrowed"},
        "spec": {"baseUrl": p.medplum.base_url(), "projectId": p.admin.project_id,
                 "credentialsSecretRef": {"name": "borrowed"}, "credentialRotation": {"interval": "1s", "gracePeriod": "1s"}},
    }))
    .unwrap();
    let connections = Api::<MedplumConnection>::namespaced(t.client.clone(), &t.ns.name);
    connections.create(&PostParams::default(), &connection).await.unwrap();
    let borrowed = eventually(Duration::from_secs(60), "the borrowed connection refused", || async {
        let c = connections.get("borrowed").await.ok()?;
        let conditions = c.status?.conditions;
        conditions.iter().any(|c| c.type_ == "Ready" && c.status == "False").then_some(conditions)
    })
    .await;
    assert!(borrowed.iter().all(|c| c.type_ != "CredentialRotation"), "no rotation without a verified credential");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let client = arena.medplum(&format!("fhir/R4/ClientApplication/{}", arena.credential.client_id)).await;
    assert_eq!(client["secret"].as_str(), Some(arena.credential.client_secret.as_str()), "the credential is unchanged");
    assert!(client.get("retiringSecret").is_none(), "and nothing retires");
    let api: Api<ClusterMedplumConnection> = Api::all(p.client.clone());
    let status = api.get(&arena.connection).await.unwrap().status.unwrap();
    let rotation = status.conditions.iter().find(|c| c.type_ == "CredentialRotation").map(|c| c.reason.as_str());
    assert_eq!(rotation, Some("OnRequest"), "the cluster connection waits for its platform team's request");
    assert!(status.credential_rotation.and_then(|r| r.last_rotation_time).is_none(), "never rotated");
}

#[tokio::test]
async fn a_tenant_cannot_rotate_every_client_of_the_cluster_connection() {
    let arena = Arena::new("hx-rotate-all", json!({})).await;
    let (t, n, p) = (&arena.tenant, &arena.neighbour, &arena.platform);
    for (s, name) in [(t, "mine"), (n, "theirs")] {
        arena.policy(s, "reader", json!([{"resourceType": "Patient", "readonly": true}])).await;
        let access = json!([{"policyRef": {"name": "reader"}}]);
        s.create_client(name, arena.via(json!({"access": access, "rotation": {"gracePeriod": "2s"}}))).await;
    }
    let secret_of = |s: &Setup, name: &'static str| {
        let s = s.ns.name.clone();
        let client = p.client.clone();
        async move {
            let secret = Api::<Secret>::namespaced(client, &s).get(name).await.unwrap();
            String::from_utf8(secret.data.unwrap()["MEDPLUM_CLIENT_SECRET"].0.clone()).unwrap()
        }
    };
    t.wait_ready("mine").await;
    n.wait_ready("theirs").await;
    let (mine, theirs) = (secret_of(t, "mine").await, secret_of(n, "theirs").await);

    // The tenant as a user with every right on the operator's kinds and Secrets in its namespace.
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "tenant"},
        "rules": [{"apiGroups": ["medplum.com"], "resources": ["*"], "verbs": ["*"]},
                  {"apiGroups": [""], "resources": ["secrets"], "verbs": ["*"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "tenant"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "tenant-user"}]});
    let apply = PatchParams::apply("medplum-operator-tests");
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(p.client.clone(), &t.ns.name)
        .patch("tenant", &apply, &Patch::Apply(&role))
        .await
        .unwrap();
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(p.client.clone(), &t.ns.name)
        .patch("tenant", &apply, &Patch::Apply(&binding))
        .await
        .unwrap();
    let tenant = crate::support::cluster::client_as("tenant-user").await;
    let request = json!({"metadata": {"annotations": {"medplum.com/rotate-clients": "tenant-asks"}}});
    let cluster = Api::<ClusterMedplumConnection>::all(tenant.clone());
    for attempt in [
        cluster.patch(&arena.connection, &PatchParams::default(), &Patch::Merge(&request)).await,
        cluster
            .patch_status(
                &arena.connection,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"clientRotation": {"request": "tenant-asks", "clients": 0, "rotated": 0, "progress": "0/0"}}})),
            )
            .await,
    ] {
        match attempt {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
            other => panic!("the tenant wrote the cluster connection: {other:?}"),
        }
    }
    // What it may write: the request on its own client, and on a connection of its own.
    let clients = Api::<ClientApplication>::namespaced(tenant.clone(), &t.ns.name);
    clients.patch("mine", &PatchParams::default(), &Patch::Merge(&request)).await.unwrap();
    let own: MedplumConnection = serde_json::from_value(json!({
        "apiVersion": "medplum.com/v1alpha1", "kind": "MedplumConnection",
        "metadata": {"name": "own", "annotations": {"medplum.com/rotate-clients": "tenant-asks"}},
        "spec": {"baseUrl": p.medplum.base_url(), "projectId": p.admin.project_id, "credentialsSecretRef": {"name": "guessed"}},
    }))
    .unwrap();
    Api::<MedplumConnection>::namespaced(tenant, &t.ns.name).create(&PostParams::default(), &own).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(secret_of(t, "mine").await, mine, "the tenant's own client did not rotate");
    assert_eq!(secret_of(n, "theirs").await, theirs, "nor its neighbour's");
    let api: Api<ClusterMedplumConnection> = Api::all(p.client.clone());
    assert!(api.get(&arena.connection).await.unwrap().status.unwrap().client_rotation.is_none());

    // The platform team can: both rotate, once.
    let asked = json!({"metadata": {"annotations": {"medplum.com/rotate-clients": "platform-asks"}}});
    api.patch(&arena.connection, &PatchParams::default(), &Patch::Merge(&asked)).await.unwrap();
    let done = eventually(Duration::from_secs(90), "both clients rotated", || async {
        let r = api.get(&arena.connection).await.ok()?.status?.client_rotation?;
        (r.request == "platform-asks" && r.completion_time.is_some()).then_some(r)
    })
    .await;
    assert_eq!(done.progress, "2/2");
    assert_ne!(secret_of(t, "mine").await, mine);
    assert_ne!(secret_of(n, "theirs").await, theirs);
}
