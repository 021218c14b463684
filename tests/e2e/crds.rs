//! The committed CRDs are what the code generates, and the API server accepts them.

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::support::{TestNamespace, cluster_client};
use medplum_operator::crd::{self, MedplumConnection};

#[test]
fn committed_crds_match_the_generated_ones() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected: Vec<String> = crd::all().iter().map(crd::file_name).collect();
    for definition in crd::all() {
        let path = dir.join(crd::file_name(&definition));
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == crd::to_yaml(&definition),
            "{} is stale: run `cargo run -- crds --dir crds`",
            path.display()
        );
    }
    let mut present: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    present.sort();
    expected.sort();
    assert_eq!(present, expected, "crds/ holds exactly one file per kind");
}

/// The API server accepted the CRDs (cluster_client applies them and waits for Established); here it
/// also enforces their validation: defaults, the URL pattern and the CEL rule on caBundle.
#[tokio::test]
async fn api_server_accepts_the_crds_and_enforces_their_schema() {
    let client = cluster_client().await;
    let ns = TestNamespace::create(&client, "crds").await;
    let api: Api<MedplumConnection> = Api::namespaced(client.clone(), &ns.name);
    let apply = |name: &str, spec: serde_json::Value| {
        let api = api.clone();
        let object = json!({"apiVersion": "medplum.com/v1alpha1", "kind": "MedplumConnection", "metadata": {"name": name}, "spec": spec});
        async move {
            api.patch(object["metadata"]["name"].as_str().unwrap(), &PatchParams::apply("test"), &Patch::Apply(&object))
                .await
        }
    };
    let created =
        apply("ok", json!({"baseUrl": "https://medplum.example.org/", "credentialsSecretRef": {"name": "creds"}}))
            .await
            .expect("a valid connection is accepted");
    assert_eq!(created.spec.credentials_secret_ref.client_id_key, "MEDPLUM_CLIENT_ID", "schema default applied");

    let bad_url =
        apply("bad-url", json!({"baseUrl": "medplum.example.org", "credentialsSecretRef": {"name": "c"}})).await;
    assert!(bad_url.unwrap_err().to_string().contains("spec.baseUrl"), "URL pattern enforced");

    let both_cas = apply(
        "two-cas",
        json!({"baseUrl": "https://m.example.org", "credentialsSecretRef": {"name": "c"},
               "caBundle": {"secretRef": {"name": "a", "key": "ca.crt"}, "configMapRef": {"name": "b", "key": "ca.crt"}}}),
    )
    .await;
    let message = both_cas.unwrap_err().to_string();
    assert!(message.contains("set exactly one of secretRef and configMapRef"), "CEL rule enforced: {message}");

    // Open patient registration names the policy patients get.
    let projects: Api<medplum_operator::crd::MedplumProject> = Api::namespaced(client.clone(), &ns.name);
    let object = json!({"apiVersion": "medplum.com/v1alpha1", "kind": "MedplumProject", "metadata": {"name": "p"},
                        "spec": {"patientRegistration": {"open": true}}});
    let refused = projects.patch("p", &PatchParams::apply("test"), &Patch::Apply(&object)).await;
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("open registration needs accessPolicyRef"), "CEL rule enforced: {message}");

    let short_names = client_short_names(&client).await;
    for name in ["mpconn", "cmpconn", "mpclient", "mppolicy", "mpuser", "mpproject", "mpdomain"] {
        assert!(short_names.contains(&name.to_string()), "short name {name} served");
    }
}

async fn client_short_names(client: &kube::Client) -> Vec<String> {
    let resources = client.list_api_group_resources("medplum.com/v1alpha1").await.expect("discovery");
    resources.resources.into_iter().flat_map(|r| r.short_names.unwrap_or_default()).collect()
}
