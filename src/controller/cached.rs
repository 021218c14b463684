//! How the controllers' caches keep the resources they watch.

use std::borrow::Cow;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use secrecy::ExposeSecret;
use serde::{Deserialize, Deserializer};
use serde_json::json;

use super::UsesConnection;
use super::packed::Packed;
use crate::crd::ConnectionRef;

/// A resource as a controller's cache keeps it: its metadata typed (what watches, predicates and
/// resyncs read), what triggers look up across the whole cache (its connection and the policies it
/// grants), and the rest, spec and status, as [`Packed`] JSON. A reconcile gets the whole resource
/// from [`Cached::resource`]. Typed, a ClientApplication took about 2.6 KB of the cache, most of it
/// slots for fields it leaves unset and an allocation per string; packed, a client like the first
/// one takes under 100 bytes (1.2 KB as JSON).
#[derive(Clone, Debug)]
pub struct Cached<K> {
    metadata: ObjectMeta,
    connection: ConnectionRef,
    granted: Option<Box<[Box<str>]>>,
    rest: Packed,
    kind: PhantomData<fn() -> K>,
}

/// What every object of a kind shares, as a resource: the dictionary its cache packs with is this
/// serialized (keys in the order serde writes them, the defaults every object carries, the condition
/// types, reasons and messages the operator writes), so that it is the same in every process and
/// holds nothing of any tenant's objects. The dictionary before it, the first object taken in, packed
/// better only by what that object shared with the rest beyond their shape (the project id, the
/// day): 1,000 settled clients (1,387 KB of JSON) take 251 KB against the skeleton, 190 KB against
/// the first client, so 61 bytes more per client, 0.6 MB per 10,000 (1% of the operator's RSS with
/// 10,000 clients).
pub(crate) fn skeleton(kind: &str) -> serde_json::Value {
    let condition = |type_: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": "True", "reason": reason, "message": message,
               "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1})
    };
    let ready = condition("Ready", "Ready", "");
    let (spec, status) = match kind {
        "ClientApplication" => (
            json!({"access": [{"policyRef": {"name": "-"}}], "secret": {"name": "-"}}),
            json!({"conditions": [
                      condition("CredentialVerified", "TokenIssued", "Medplum issued a token for the credentials in Secret - (sha256:)"),
                      condition("Rotating", "Idle", "no rotation in progress"),
                      condition("Ready", "Ready", "Secret - holds working credentials of ClientApplication/")],
                   "observedGeneration": 1, "clientId": "-", "membershipId": "-", "projectId": "-", "secretName": "-",
                   "secretFingerprint": "sha256:", "lastRotationTime": "2026-01-01T00:00:00Z"}),
        ),
        "AccessPolicy" => (
            json!({"resources": [{"resourceType": "Patient", "readonly": true}]}),
            json!({"conditions": [condition("Ready", "Ready", "Medplum AccessPolicy/ matches the spec")],
                   "observedGeneration": 1, "policyId": "-"}),
        ),
        "ProjectUser" => (
            json!({"firstName": "-", "lastName": "-", "email": "@", "access": [{"policyRef": {"name": "-"}}]}),
            json!({"conditions": [condition("Ready", "Ready", "Practitioner/ is a member as ProjectMembership/")],
                   "observedGeneration": 1, "membershipId": "-", "userId": "-", "profile": "Practitioner/"}),
        ),
        _ => (json!({}), json!({"conditions": [ready], "observedGeneration": 1})),
    };
    json!({"apiVersion": "medplum.com/v1alpha1", "kind": kind, "metadata": {}, "spec": spec, "status": status})
}

/// The dictionary of `K`'s cache: its skeleton, as `K` serializes it.
pub(crate) fn dictionary<K: UsesConnection>() -> Box<[u8]> {
    let resource: K = serde_json::from_value(skeleton(&K::kind(&()))).expect("a skeleton is an object of its kind");
    serde_json::to_string(&resource).expect("resources serialize").into_bytes().into()
}

impl<K: UsesConnection> Cached<K> {
    pub fn of(mut resource: K) -> Self {
        let metadata = std::mem::take(resource.meta_mut());
        let connection = resource.connection_ref().clone();
        let granted = resource.granted().map(|names| names.into_iter().map(Box::from).collect());
        let json = serde_json::to_string(&resource).expect("resources serialize");
        let rest = Packed::pack(&json, K::dictionary());
        Self { metadata, connection, granted, rest, kind: PhantomData }
    }

    /// The whole resource, as it was taken in.
    pub fn resource(&self) -> K {
        let json = self.rest.unpack(K::dictionary());
        let mut resource: K = serde_json::from_str(json.expose_secret()).expect("the cache reads back what it wrote");
        *resource.meta_mut() = self.metadata.clone();
        resource
    }

    pub fn connection_ref(&self) -> &ConnectionRef {
        &self.connection
    }

    /// Whether the resource grants the policy `name` of its namespace.
    pub fn grants(&self, name: &str) -> bool {
        self.granted.as_deref().is_some_and(|names| names.iter().any(|n| **n == *name))
    }
}

impl<'de, K: UsesConnection> Deserialize<'de> for Cached<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        K::deserialize(deserializer).map(Self::of)
    }
}

impl<K: UsesConnection> Resource for Cached<K> {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AccessPolicy, ClientApplication, MedplumProject, ProjectUser};
    use serde_json::json;

    fn round_trip<K: UsesConnection>(value: serde_json::Value) -> Cached<K> {
        let resource: K = serde_json::from_value(value).unwrap();
        let cached: Cached<K> = serde_json::from_value(serde_json::to_value(&resource).unwrap()).unwrap();
        assert_eq!(serde_json::to_value(cached.resource()).unwrap(), serde_json::to_value(&resource).unwrap());
        assert_eq!(cached.meta(), resource.meta());
        cached
    }

    fn metadata() -> serde_json::Value {
        json!({"name": "x", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7", "generation": 3,
               "labels": {"app": "x"}, "finalizers": ["medplum.com/cleanup"]})
    }

    #[test]
    fn every_kind_comes_back_as_it_was_taken_in() {
        let status = json!({"observedGeneration": 3, "conditions": [{"type": "Ready", "status": "True",
            "reason": "Reconciled", "message": "m", "lastTransitionTime": "2026-12-05T01:02:03Z", "observedGeneration": 3}]});
        let client = round_trip::<ClientApplication>(json!({"apiVersion": "medplum.com/v1alpha1",
            "kind": "ClientApplication", "metadata": metadata(),
            "spec": {"connectionRef": {"kind": "ClusterMedplumConnection", "name": "shared"},
                     "description": "d", "redirectUris": ["https://x.example.org/cb"], "pkceOptional": true,
                     "access": [{"policyRef": {"name": "lab-reader"},
                                 "parameters": [{"name": "org", "valueReference": "Organization/acme"}]}],
                     "secret": {"name": "s", "labels": {"a": "b"}},
                     "rotation": {"interval": "720h", "restartTargets": [{"kind": "Deployment", "name": "web"}]},
                     "deletionPolicy": "Orphan", "adopt": {"clientId": "c-1", "secret": "Keep"}},
            "status": {"clientId": "c-1", "secretFingerprint": "sha256:0123456789abcdef",
                       "lastRotationTime": "2026-12-05T01:02:03Z", "observedGeneration": 3,
                       "conditions": status["conditions"]}}));
        assert_eq!(client.connection_ref().name, "shared");
        assert!(client.grants("lab-reader") && !client.grants("lab"));
        // Another client like it packs to a fraction of its JSON.
        let mut other = client.resource();
        other.metadata.name = Some("billing-service".into());
        let observed = other.status.as_mut().unwrap();
        observed.client_id = Some("5ea9f487-ab48-4d3d-80ae-7ac170b43f2d".into());
        observed.secret_fingerprint = Some("sha256:fedcba9876543210".into());
        let json = serde_json::to_string(&other).unwrap();
        let packed = Cached::of(other).rest.packed_len();
        assert!(packed * 2 < json.len(), "{packed} bytes packed of {} of JSON", json.len());
        round_trip::<AccessPolicy>(json!({"apiVersion": "medplum.com/v1alpha1", "kind": "AccessPolicy",
            "metadata": metadata(), "spec": {"resources": [{"resourceType": "Patient", "readonly": true,
            "hiddenFields": ["note"]}], "ipAccessRules": [{"name": "office", "value": "10.0.0.0/8", "action": "allow"}]},
            "status": status}));
        let user = round_trip::<ProjectUser>(json!({"apiVersion": "medplum.com/v1alpha1", "kind": "ProjectUser",
            "metadata": metadata(), "spec": {"email": "a@example.org", "firstName": "A", "lastName": "B",
            "access": [{"policyRef": {"name": "p"}}]}, "status": status}));
        assert!(user.grants("p"));
        let project = round_trip::<MedplumProject>(json!({"apiVersion": "medplum.com/v1alpha1",
            "kind": "MedplumProject", "metadata": metadata(),
            "spec": {"patientRegistration": {"open": true, "accessPolicyRef": {"name": "patients"}}}}));
        assert!(project.grants("patients"));
    }

    /// A client as the operator leaves it once Ready, as in the benchmark (`client-00042` granting
    /// `policy-00042`, its Secret named after it).
    fn settled_client(i: usize) -> ClientApplication {
        let condition = |type_: &str, reason: &str, message: String| {
            json!({"type": type_, "status": "True", "reason": reason, "message": message,
                   "lastTransitionTime": format!("2026-12-07T09:{:02}:{:02}Z", i / 60 % 60, i % 60), "observedGeneration": 1})
        };
        // Medplum's ids are random UUIDs, fingerprints random hex.
        let hex = |salt: &str, n: usize| {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(format!("{salt}{i}"));
            digest.iter().map(|b| format!("{b:02x}")).collect::<String>()[..n].to_string()
        };
        let uuid = |salt: &str| {
            let h = hex(salt, 32);
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        };
        let (name, id, print) = (format!("client-{i:05}"), uuid("client"), format!("sha256:{}", hex("print", 16)));
        serde_json::from_value(json!({"apiVersion": "medplum.com/v1alpha1", "kind": "ClientApplication",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"access": [{"policyRef": {"name": format!("policy-{i:05}")}}]},
            "status": {"conditions": [
                condition("CredentialVerified", "TokenIssued", format!("Medplum issued a token for the credentials in Secret {name} ({print})")),
                condition("Rotating", "Idle", "no rotation in progress".into()),
                condition("Ready", "Ready", format!("Secret {name} holds working credentials of ClientApplication/{id}"))],
                "observedGeneration": 1, "clientId": id, "membershipId": uuid("membership"),
                "projectId": "6f1b7c2e-1111-4a4a-9b9b-000000000001", "secretName": name,
                "secretFingerprint": print, "lastRotationTime": "2026-12-07T09:00:00Z"}}))
        .unwrap()
    }

    #[test]
    fn the_skeleton_packs_settled_clients_as_small_as_the_first_client_did() {
        let json = |c: &ClientApplication| {
            let mut c = c.clone();
            c.metadata = Default::default();
            serde_json::to_string(&c).unwrap()
        };
        let clients: Vec<String> = (0..1000).map(|i| json(&settled_client(i))).collect();
        let skeleton_dictionary = ClientApplication::dictionary();
        let first = clients[0].as_bytes();
        let total = |dictionary: &[u8]| clients.iter().map(|c| Packed::pack(c, dictionary).packed_len()).sum::<usize>();
        let (with_skeleton, with_first) = (total(skeleton_dictionary), total(first));
        let json_bytes: usize = clients.iter().map(String::len).sum();
        println!(
            "figure: 1,000 settled clients, {json_bytes} bytes of JSON: packed {with_skeleton} bytes against the skeleton, {with_first} against the first client"
        );
        assert!(with_skeleton * 4 < json_bytes, "{with_skeleton} of {json_bytes}");
        for kind in ["AccessPolicy", "ProjectUser", "MedplumProject"] {
            assert!(!skeleton(kind)["spec"].is_null(), "{kind}");
        }
        assert!(!AccessPolicy::dictionary().is_empty() && !ProjectUser::dictionary().is_empty());
        assert!(!MedplumProject::dictionary().is_empty());
    }
}
