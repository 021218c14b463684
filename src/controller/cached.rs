//! How the controllers' caches keep the resources they watch.

use std::any::TypeId;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use secrecy::ExposeSecret;
use serde::{Deserialize, Deserializer};

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

/// The dictionary the cache of `K` packs with: the first object of that kind the process took in
/// (the objects of a kind share their keys, defaults and most values). Fixed once chosen, since every
/// packed object needs it, and kept for the life of the process.
fn dictionary<K: 'static>(first: &str) -> &'static [u8] {
    static DICTIONARIES: Mutex<BTreeMap<TypeId, &'static [u8]>> = Mutex::new(BTreeMap::new());
    let mut dictionaries = DICTIONARIES.lock().unwrap_or_else(|p| p.into_inner());
    dictionaries.entry(TypeId::of::<K>()).or_insert_with(|| Box::leak(first.as_bytes().into()))
}

impl<K: UsesConnection> Cached<K> {
    pub fn of(mut resource: K) -> Self {
        let metadata = std::mem::take(resource.meta_mut());
        let connection = resource.connection_ref().clone();
        let granted = resource.granted().map(|names| names.into_iter().map(Box::from).collect());
        let json = serde_json::to_string(&resource).expect("resources serialize");
        let rest = Packed::pack(&json, dictionary::<K>(&json));
        Self { metadata, connection, granted, rest, kind: PhantomData }
    }

    /// The whole resource, as it was taken in.
    pub fn resource(&self) -> K {
        // `of` made this, so the kind's dictionary is already chosen.
        let json = self.rest.unpack(dictionary::<K>(""));
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
        // The first client taken in is the dictionary: another one like it packs to a fraction.
        let mut other = client.resource();
        other.metadata.name = Some("billing-service".into());
        let observed = other.status.as_mut().unwrap();
        observed.client_id = Some("5ea9f487-ab48-4d3d-80ae-7ac170b43f2d".into());
        observed.secret_fingerprint = Some("sha256:fedcba9876543210".into());
        let json = serde_json::to_string(&other).unwrap();
        let packed = Cached::of(other).rest.packed_len();
        assert!(packed * 5 < json.len(), "{packed} bytes packed of {} of JSON", json.len());
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
}
