//! A namespace with a Ready connection to a fresh Medplum project, and helpers around ClientApplications.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use reqwest::Method;
use serde_json::{Value, json};

use super::medplum::Http;
use super::{MedplumTarget, ProjectAdmin, TestNamespace, cluster_client, eventually};
use medplum_operator::crd::{AccessPolicy, ClientApplication, MedplumConnection, ProjectUser};

pub const WAIT: Duration = Duration::from_secs(60);
/// The ownership tag system the operator writes with the default cluster id.
pub const TAG_SYSTEM: &str = "urn:medplum-operator:default";

/// Creates or updates (server-side apply) the Secret `name` with `data` and `labels`.
pub async fn apply_secret(client: &Client, namespace: &str, name: &str, data: &[(&str, &str)], labels: Value) {
    let string_data: serde_json::Map<String, Value> = data.iter().map(|(k, v)| ((*k).to_string(), json!(v))).collect();
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels},
                        "stringData": string_data});
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply("medplum-operator-tests").force(), &Patch::Apply(&secret))
        .await
        .unwrap();
}

pub struct Setup {
    pub client: Client,
    pub ns: TestNamespace,
    pub medplum: Arc<MedplumTarget>,
    pub admin: ProjectAdmin,
    /// A project-admin token of the test (not the operator's), to look at and edit Medplum.
    pub token: String,
}

impl Setup {
    /// A namespace with the MedplumConnection `default` to a new project; `limits` goes to its spec.
    pub async fn new(prefix: &str, test_server_args: &[&str], limits: Value) -> Self {
        let client = cluster_client().await;
        let ns = TestNamespace::create(&client, prefix).await;
        let medplum = MedplumTarget::start_with(test_server_args).await;
        let admin = medplum.new_project(prefix).await;
        let token = medplum.http.token(&admin.client_id, &admin.client_secret).await;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "medplum-admin", "labels": {"medplum.com/connection-credentials": "true"}},
            "stringData": {"MEDPLUM_CLIENT_ID": admin.client_id, "MEDPLUM_CLIENT_SECRET": admin.client_secret},
        }))
        .unwrap();
        Api::<Secret>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &secret).await.unwrap();
        let connection: MedplumConnection = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "MedplumConnection", "metadata": {"name": "default"},
            "spec": {"baseUrl": medplum.base_url(), "projectId": admin.project_id,
                     "credentialsSecretRef": {"name": "medplum-admin"}, "limits": limits},
        }))
        .unwrap();
        Api::<MedplumConnection>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &connection)
            .await
            .unwrap();
        Self { client, ns, medplum: Arc::new(medplum), admin, token }
    }

    /// Another namespace on the same Medplum project, with no connection of its own.
    pub async fn sharing(&self, prefix: &str) -> Self {
        let ns = TestNamespace::create(&self.client, prefix).await;
        Self {
            client: self.client.clone(),
            ns,
            medplum: self.medplum.clone(),
            admin: self.admin.clone(),
            token: self.token.clone(),
        }
    }

    /// Merges `limits` into the connection's `spec.limits`.
    pub async fn set_limits(&self, limits: Value) {
        self.patch_connection(json!({"spec": {"limits": limits}})).await;
    }

    /// Merge-patches the connection `default` (metadata or spec).
    pub async fn patch_connection(&self, patch: Value) {
        Api::<MedplumConnection>::namespaced(self.client.clone(), &self.ns.name)
            .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// The connection `default`.
    pub async fn connection(&self) -> MedplumConnection {
        Api::<MedplumConnection>::namespaced(self.client.clone(), &self.ns.name).get("default").await.unwrap()
    }

    /// The client secret the connection's credentials Secret holds.
    pub async fn connection_secret(&self) -> String {
        let secret = self.secret_object("medplum-admin").await.expect("the credentials Secret");
        String::from_utf8(secret.data.unwrap()["MEDPLUM_CLIENT_SECRET"].0.clone()).unwrap()
    }

    /// Creates or updates the Secret `name` of the test's namespace.
    pub async fn create_secret(&self, name: &str, data: &[(&str, &str)]) {
        apply_secret(&self.client, &self.ns.name, name, data, json!({})).await;
    }

    pub fn http(&self) -> &Http {
        &self.medplum.http
    }

    pub fn clients(&self) -> Api<ClientApplication> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    pub fn policies(&self) -> Api<AccessPolicy> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Creates an AccessPolicy resource with `spec`.
    pub async fn create_policy(&self, name: &str, spec: Value) {
        let policy: AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        self.policies().create(&PostParams::default(), &policy).await.unwrap();
    }

    /// Waits until the AccessPolicy's Ready condition has `status` and (if given) `reason`.
    pub async fn wait_policy(&self, name: &str, status: &str, reason: Option<&str>) -> AccessPolicy {
        let api = self.policies();
        eventually(WAIT, &format!("AccessPolicy {name}: Ready={status} {reason:?}"), || async {
            let object = api.get(name).await.ok()?;
            let st = object.status.as_ref()?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            let current = st.observed_generation == object.metadata.generation;
            (current && c.status == status && reason.is_none_or(|r| c.reason == r)).then_some(object)
        })
        .await
    }

    /// An AccessPolicy resource granting `resources`, once Ready (an operator must be running); its Medplum id.
    pub async fn ready_policy(&self, name: &str, resources: Value) -> String {
        self.create_policy(name, json!({"resources": resources})).await;
        self.wait_policy(name, "True", None).await.status.unwrap().policy_id.unwrap()
    }

    pub fn users(&self) -> Api<ProjectUser> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    pub async fn create_user(&self, name: &str, spec: Value) {
        let object: ProjectUser = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "ProjectUser", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        self.users().create(&PostParams::default(), &object).await.unwrap();
    }

    /// Waits until the ProjectUser's Ready condition has `status` and (if given) `reason`.
    pub async fn wait_user(&self, name: &str, status: &str, reason: Option<&str>) -> ProjectUser {
        let api = self.users();
        eventually(WAIT, &format!("ProjectUser {name}: Ready={status} {reason:?}"), || async {
            let u = api.get(name).await.ok()?;
            let st = u.status.as_ref()?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            let current = st.observed_generation == u.metadata.generation;
            (current && c.status == status && reason.is_none_or(|r| c.reason == r)).then_some(u)
        })
        .await
    }

    pub async fn create_client(&self, name: &str, spec: Value) -> ClientApplication {
        self.create_client_with(name, json!({}), spec).await
    }

    pub async fn create_client_with(&self, name: &str, metadata: Value, spec: Value) -> ClientApplication {
        let mut meta = metadata;
        meta["name"] = json!(name);
        let object: ClientApplication = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "ClientApplication", "metadata": meta, "spec": spec
        }))
        .unwrap();
        self.clients().create(&PostParams::default(), &object).await.unwrap()
    }

    /// Waits until the ClientApplication's condition `type_` has `status` and (if given) `reason`.
    pub async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: Option<&str>,
    ) -> ClientApplication {
        self.wait_condition_within(WAIT, name, type_, status, reason).await
    }

    /// [`wait_condition`](Self::wait_condition), for at most `within`.
    pub async fn wait_condition_within(
        &self,
        within: Duration,
        name: &str,
        type_: &str,
        status: &str,
        reason: Option<&str>,
    ) -> ClientApplication {
        let api = self.clients();
        let what = format!("{name}: {type_}={status} {reason:?}");
        eventually(within, &what, || async {
            let object = api.get(name).await.ok()?;
            let c = object.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?.clone();
            let generation_seen = object.status.as_ref()?.observed_generation == object.metadata.generation;
            (c.status == status && reason.is_none_or(|r| c.reason == r) && generation_seen).then_some(object)
        })
        .await
    }

    pub async fn wait_ready(&self, name: &str) -> ClientApplication {
        self.wait_condition(name, "Ready", "True", None).await
    }

    /// The decoded data of a Secret, or None if it does not exist.
    pub async fn secret(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.ns.name).get_opt(name).await.unwrap()?;
        Some(secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, String::from_utf8(v.0).unwrap())).collect())
    }

    pub async fn secret_object(&self, name: &str) -> Option<Secret> {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns.name).get_opt(name).await.unwrap()
    }

    /// The Medplum clients tagged as this namespace's ClientApplication `name`.
    pub async fn tagged_clients(&self, name: &str) -> Vec<Value> {
        let query = format!("fhir/R4/ClientApplication?_tag={TAG_SYSTEM}|ClientApplication/{}/{name}", self.ns.name);
        let bundle = self.http().get(&query, &self.token).await.expect(200).json();
        bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"].clone()).collect()
    }

    pub async fn memberships_of(&self, client_id: &str) -> Vec<Value> {
        let query = format!("fhir/R4/ProjectMembership?user=ClientApplication/{client_id}");
        let bundle = self.http().get(&query, &self.token).await.expect(200).json();
        bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"].clone()).collect()
    }

    pub async fn read_client(&self, id: &str) -> (u16, Value) {
        let answer = self.http().get(&format!("fhir/R4/ClientApplication/{id}"), &self.token).await;
        let status = answer.status.as_u16();
        (status, if status == 200 { answer.json() } else { Value::Null })
    }

    /// Whether Medplum issues a token for these credentials.
    pub async fn token_works(&self, client_id: &str, secret: &str) -> bool {
        self.http().token_request(client_id, secret).await.status == 200
    }

    /// Waits until the Events about `name` include each of `reasons`. An Event is published after
    /// the change it reports, so it can trail what a test saw by a moment.
    pub async fn expect_events(&self, name: &str, reasons: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.event_reasons(name).await;
            if reasons.iter().all(|r| seen.iter().any(|s| s == r)) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "Events {reasons:?} about {name}; saw {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The reasons of the Events about `name`, oldest first.
    async fn event_reasons(&self, name: &str) -> Vec<String> {
        let events =
            Api::<Event>::namespaced(self.client.clone(), &self.ns.name).list(&ListParams::default()).await.unwrap();
        let mut about: Vec<&Event> = events
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        about.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
        about.iter().filter_map(|e| e.reason.clone()).collect()
    }

    /// Everything a secret must never appear in: Events, the namespace's custom resources, and their status.
    pub async fn public_text(&self) -> String {
        let events =
            Api::<Event>::namespaced(self.client.clone(), &self.ns.name).list(&ListParams::default()).await.unwrap();
        let clients = self.clients().list(&ListParams::default()).await.unwrap();
        let connections = Api::<MedplumConnection>::namespaced(self.client.clone(), &self.ns.name)
            .list(&ListParams::default())
            .await
            .unwrap();
        format!(
            "{}\n{}\n{}",
            serde_json::to_string(&events.items).unwrap(),
            serde_json::to_string(&clients.items).unwrap(),
            serde_json::to_string(&connections.items).unwrap()
        )
    }

    /// Sets an annotation on a ClientApplication (merge patch).
    pub async fn annotate(&self, name: &str, key: &str, value: &str) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.clients().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    /// A Deployment with no replicas: its rollouts finish as soon as the deployment controller has
    /// seen them (tests/e2e/rollout.rs has real ones). Its container takes the Secret `name` as
    /// environment.
    pub async fn deployment(&self, name: &str) {
        let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "app", "image": "example.org/app:1",
                                                           "envFrom": [{"secretRef": {"name": name}}]}]}}},
        }))
        .unwrap();
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(self.client.clone(), &self.ns.name)
            .create(&PostParams::default(), &deployment)
            .await
            .unwrap();
    }

    /// The restart annotation on a Deployment's pod template.
    pub async fn restarted_for(&self, name: &str) -> Option<String> {
        let d = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(self.client.clone(), &self.ns.name)
            .get(name)
            .await
            .unwrap();
        d.spec?.template.metadata?.annotations?.get("medplum.com/credentials-issued-at").cloned()
    }

    /// Edits a Medplum client as someone in the console would (PUT with the test's token).
    pub async fn edit_client(&self, id: &str, edit: impl FnOnce(&mut Value)) {
        let mut client = self.read_client(id).await.1;
        edit(&mut client);
        self.http().put(&format!("fhir/R4/ClientApplication/{id}"), &self.token, &client).await.expect(200);
    }

    pub async fn delete_client_resource(&self, name: &str) {
        self.clients().delete(name, &Default::default()).await.unwrap();
        let api = self.clients();
        eventually(WAIT, &format!("{name} deleted"), || async {
            api.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }

    /// Creates a client in Medplum directly (admin endpoint), as a team did before the operator; with
    /// `policy` (a Medplum AccessPolicy id) on its membership, else with full access.
    pub async fn legacy_client(&self, name: &str, policy: Option<&str>) -> (String, String) {
        let url = format!("admin/projects/{}/client", self.admin.project_id);
        let mut body = json!({"name": name});
        if let Some(id) = policy {
            body["accessPolicy"] = json!({"reference": format!("AccessPolicy/{id}")});
        }
        let request = self.http().request(Method::POST, &url, Some(&self.token)).json(&body);
        let client = self.http().send(request).await.expect(201).json();
        (client["id"].as_str().unwrap().to_string(), client["secret"].as_str().unwrap().to_string())
    }
}
