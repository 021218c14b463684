//! Rotation of a connection's own credential (`spec.credentialRotation`): on request, with the
//! previous secret kept through the grace period, a kill at every step, and a Secret shared with a
//! connection that did not opt in.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::support::fixtures::apply_secret;
use crate::support::{MedplumTarget, Operator, ProjectAdmin, TestNamespace, cluster_client, eventually};
use medplum_operator::crd::MedplumConnection;

const WAIT: Duration = Duration::from_secs(60);
const SECRET_KEY: &str = "MEDPLUM_CLIENT_SECRET";

struct Rig {
    client: Client,
    ns: TestNamespace,
    medplum: MedplumTarget,
    admin: ProjectAdmin,
}

impl Rig {
    async fn new(name: &str) -> Self {
        let client = cluster_client().await;
        let ns = TestNamespace::create(&client, name).await;
        let medplum = MedplumTarget::start().await;
        let admin = medplum.new_project(name).await;
        let data = [("MEDPLUM_CLIENT_ID", admin.client_id.as_str()), (SECRET_KEY, admin.client_secret.as_str())];
        apply_secret(&client, &ns.name, "medplum-admin", &data, json!({})).await;
        Self { client, ns, medplum, admin }
    }

    fn connections(&self) -> Api<MedplumConnection> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    async fn connect(&self, name: &str, rotation: Option<Value>) {
        let mut spec = json!({"baseUrl": self.medplum.base_url(), "projectId": self.admin.project_id,
                              "credentialsSecretRef": {"name": "medplum-admin"}});
        if let Some(rotation) = rotation {
            spec["credentialRotation"] = rotation;
        }
        let object: MedplumConnection = serde_json::from_value(json!({
            "apiVersion": "medplum.com/v1alpha1", "kind": "MedplumConnection", "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        self.connections().create(&PostParams::default(), &object).await.unwrap();
    }

    async fn annotate(&self, name: &str, value: &str) {
        let patch = json!({"metadata": {"annotations": {"medplum.com/rotate": value}}});
        self.connections().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    async fn secret(&self) -> Secret {
        Api::<Secret>::namespaced(self.client.clone(), &self.ns.name).get("medplum-admin").await.unwrap()
    }

    async fn stored_secret(&self) -> String {
        let secret = self.secret().await;
        String::from_utf8(secret.data.unwrap()[SECRET_KEY].0.clone()).unwrap()
    }

    async fn token_works(&self, secret: &str) -> bool {
        self.medplum.http.token_request(&self.admin.client_id, secret).await.status == 200
    }

    /// Medplum's (secret, retiringSecret) of the connection's client, read as the super admin.
    async fn medplum_secrets(&self) -> (Option<String>, Option<String>) {
        let sa = self.medplum.super_admin_token().await;
        let client = self.medplum.http.get(&format!("fhir/R4/ClientApplication/{}", self.admin.client_id), &sa).await;
        let client = client.expect(200).json();
        let text = |v: &Value| v.as_str().map(str::to_string);
        (text(&client["secret"]), text(&client["retiringSecret"]))
    }

    /// The connection's (Ready, CredentialRotation) condition reasons.
    async fn reasons(&self, name: &str) -> (Option<String>, Option<String>) {
        let object = self.connections().get(name).await.unwrap();
        let conditions = object.status.map(|s| s.conditions).unwrap_or_default();
        let reason = |t: &str| conditions.iter().find(|c| c.type_ == t).map(|c| format!("{}/{}", c.status, c.reason));
        (reason("Ready"), reason("CredentialRotation"))
    }

    async fn wait_reasons(&self, name: &str, ready: &str, rotation: &str) {
        eventually(WAIT, &format!("{name}: Ready {ready}, CredentialRotation {rotation}"), || async {
            let (r, c) = self.reasons(name).await;
            (r.as_deref() == Some(ready) && c.as_deref() == Some(rotation)).then_some(())
        })
        .await;
    }

    /// Waits until Medplum and the Secret agree on one secret, with none retiring; returns it.
    async fn wait_settled_after(&self, previous: &str) -> String {
        eventually(WAIT, "the rotation finished: one new secret, nothing retiring", || async {
            let stored = self.stored_secret().await;
            let (current, retiring) = self.medplum_secrets().await;
            (stored != previous && current.as_deref() == Some(stored.as_str()) && retiring.is_none()).then_some(stored)
        })
        .await
    }

    async fn event_reasons(&self) -> Vec<String> {
        let events = Api::<Event>::namespaced(self.client.clone(), &self.ns.name);
        events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect()
    }
}

#[tokio::test]
async fn a_connection_rotates_its_own_credential_on_request_keeping_the_old_one_through_the_grace_period() {
    let rig = Rig::new("conn-rotate").await;
    rig.connect("default", Some(json!({"gracePeriod": "4s"}))).await;
    let operator = Operator::start(&rig.ns.name, &["--resync-interval", "2s"]).await;
    rig.wait_reasons("default", "True/Connected", "True/OnRequest").await;
    assert_eq!(rig.stored_secret().await, rig.admin.client_secret, "no rotation without a request or an interval");

    let original = rig.admin.client_secret.clone();
    rig.annotate("default", "incident-1").await;
    let rotated = eventually(WAIT, "a new secret in the Secret", || async {
        let stored = rig.stored_secret().await;
        (stored != original).then_some(stored)
    })
    .await;
    assert_eq!(rig.medplum_secrets().await, (Some(rotated.clone()), Some(original.clone())), "old one retiring");
    assert!(rig.token_works(&original).await, "the previous secret works through the grace period");
    assert!(rig.token_works(&rotated).await, "the new secret works");
    let secret = rig.secret().await;
    let annotations = secret.annotations();
    assert!(annotations.contains_key("medplum.com/credential-stored-at"), "stored-at recorded: {annotations:?}");
    assert_eq!(
        annotations.get("medplum.com/credential-stored-by").map(String::as_str),
        Some(format!("MedplumConnection/{}/default", rig.ns.name).as_str())
    );
    let owned: Vec<String> = secret
        .managed_fields()
        .iter()
        .filter(|m| m.manager.as_deref() == Some("medplum-operator"))
        .filter_map(|m| m.fields_v1.as_ref().map(|f| f.0["f:data"].to_string()))
        .collect();
    assert!(owned.iter().any(|d| d.contains(SECRET_KEY)), "the operator's field manager holds the key: {owned:?}");

    let settled = rig.wait_settled_after(&original).await;
    assert_eq!(settled, rotated, "one rotation for one request");
    assert!(!rig.token_works(&original).await, "the previous secret was retired after the grace period");
    rig.wait_reasons("default", "True/Connected", "True/OnRequest").await;
    let status = rig.connections().get("default").await.unwrap().status.unwrap();
    let rotation = status.credential_rotation.unwrap();
    assert_eq!(rotation.handled_request.as_deref(), Some("incident-1"));
    assert!(rotation.last_rotation_time.is_some() && rotation.retire_time.is_none());
    let reasons = rig.event_reasons().await;
    for reason in ["CredentialRotated", "CredentialRetired"] {
        assert!(reasons.iter().any(|r| r == reason), "a {reason} Event: {reasons:?}");
    }

    // Steady state after the rotation: no further writes.
    let version = rig.connections().get("default").await.unwrap().resource_version();
    let secret_version = rig.secret().await.resource_version();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rig.connections().get("default").await.unwrap().resource_version(), version, "no status writes");
    assert_eq!(rig.secret().await.resource_version(), secret_version, "no Secret writes");

    let places = [
        ("operator logs", operator.logs()),
        (
            "events",
            format!(
                "{:?}",
                Api::<Event>::namespaced(rig.client.clone(), &rig.ns.name)
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
            ),
        ),
        (
            "connections",
            serde_json::to_string(&rig.connections().list(&ListParams::default()).await.unwrap().items).unwrap(),
        ),
        ("metrics", operator.metrics().await),
    ];
    for (place, text) in &places {
        for secret in [&original, &rotated] {
            assert!(!text.contains(secret.as_str()), "a secret value leaked into the {place}");
        }
    }
}

const STEPS: [&str; 3] = ["connection-rotated", "connection-stored", "connection-retired"];

#[tokio::test]
async fn kill_at_every_step_of_a_connection_credential_rotation_never_locks_the_operator_out() {
    let rig = Rig::new("conn-rotate-crash").await;
    rig.connect("default", Some(json!({"gracePeriod": "2s"}))).await;
    let args = ["--resync-interval", "2s"];
    {
        let _operator = Operator::start(&rig.ns.name, &args).await;
        rig.wait_reasons("default", "True/Connected", "True/OnRequest").await;
    }
    for point in STEPS {
        let before = rig.stored_secret().await;
        let mut crashing = Operator::spawn(&rig.ns.name, &args, &[("MEDPLUM_OPERATOR_CRASH_AT", point)]).await;
        rig.annotate("default", point).await;
        assert!(!crashing.wait_exit(WAIT).await.success(), "{point}: the operator was killed there");
        let (current, retiring) = rig.medplum_secrets().await;
        let stored = rig.stored_secret().await;
        let works = stored == current.clone().unwrap_or_default() || Some(&stored) == retiring.as_ref();
        assert!(works, "{point}: the Secret holds a secret Medplum accepts, right after the kill");
        assert!(rig.token_works(&stored).await, "{point}: and it obtains a token");

        let _operator = Operator::start(&rig.ns.name, &args).await;
        let after = rig.wait_settled_after(&before).await;
        assert!(rig.token_works(&after).await, "{point}: the new secret works");
        assert!(!rig.token_works(&before).await, "{point}: the previous one was retired");
        rig.wait_reasons("default", "True/Connected", "True/OnRequest").await;
        println!("killed at {point}: the rotation resumed and finished; the Secret always held a working secret");
    }
}

#[tokio::test]
async fn a_shared_credentials_secret_rotates_once_and_only_when_every_connection_opted_in() {
    let rig = Rig::new("conn-rotate-shared").await;
    rig.connect("rotating", Some(json!({"gracePeriod": "2s"}))).await;
    rig.connect("plain", None).await;
    let operator = Operator::start(&rig.ns.name, &["--resync-interval", "2s"]).await;
    rig.wait_reasons("rotating", "True/Connected", "True/OnRequest").await;
    rig.annotate("rotating", "1").await;
    rig.wait_reasons("rotating", "True/Connected", "False/CredentialsSecretShared").await;
    let object = rig.connections().get("rotating").await.unwrap();
    let condition = object.status.unwrap().conditions.into_iter().find(|c| c.type_ == "CredentialRotation").unwrap();
    assert!(
        condition.message.contains("MedplumConnection") && condition.message.contains("plain"),
        "{}",
        condition.message
    );
    assert_eq!(rig.stored_secret().await, rig.admin.client_secret, "nothing was rotated");
    assert_eq!(rig.medplum_secrets().await, (Some(rig.admin.client_secret.clone()), None), "nor in Medplum");
    assert!(rig.event_reasons().await.iter().any(|r| r == "CredentialsSecretShared"), "a Warning Event says why");

    // Both opt in with a schedule (and no request): both are due at once, the Secret rotates once.
    let drop_request = json!({"metadata": {"annotations": {"medplum.com/rotate": null}}});
    rig.connections().patch("rotating", &PatchParams::default(), &Patch::Merge(&drop_request)).await.unwrap();
    let scheduled = json!({"spec": {"credentialRotation": {"interval": "1h", "gracePeriod": "2s"}}});
    for name in ["rotating", "plain"] {
        rig.connections().patch(name, &PatchParams::default(), &Patch::Merge(&scheduled)).await.unwrap();
    }
    let after = rig.wait_settled_after(&rig.admin.client_secret).await;
    for name in ["rotating", "plain"] {
        rig.wait_reasons(name, "True/Connected", "True/Scheduled").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored =
        operator.logs().lines().filter(|l| l.contains("credential rotation step") && l.contains("Stored")).count();
    assert_eq!(stored, 1, "one rotation for two connections on one Secret");
    let times: Vec<_> = rig
        .connections()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| c.status.and_then(|s| s.credential_rotation).map(|r| (r.last_rotation_time, r.next_rotation_time)))
        .collect();
    assert!(times[0].is_some() && times[0] == times[1], "both report the one rotation and the next: {times:?}");
    assert!(rig.token_works(&after).await);
    assert_eq!(rig.medplum_secrets().await, (Some(after), None), "Medplum and the Secret agree");
}
