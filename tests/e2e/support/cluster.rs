//! The local control plane: started once per test run by `hack/controlplane/start.sh` (which reuses a
//! running one), or the cluster named by `KUBECONFIG` when the caller set it. CRDs are applied once.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::sync::OnceCell;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Refuses a `KUBECONFIG` whose current cluster is not on this machine: the suite installs CRDs and
/// creates namespaces, which must never happen in a shared cluster by accident.
fn check_local(path: &std::path::Path) {
    if std::env::var_os("MEDPLUM_OPERATOR_TEST_ANY_CLUSTER").is_some() {
        return;
    }
    let kubeconfig = Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let context = kubeconfig.current_context.clone().unwrap_or_default();
    let cluster_name = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone());
    let server = kubeconfig
        .clusters
        .iter()
        .find(|c| Some(&c.name) == cluster_name.as_ref())
        .and_then(|c| c.cluster.as_ref()?.server.clone())
        .unwrap_or_default();
    let host = url::Url::parse(&server).ok().and_then(|u| u.host_str().map(str::to_string)).unwrap_or_default();
    assert!(
        matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]"),
        "KUBECONFIG points at {server}, not at a local control plane; unset KUBECONFIG to use hack/controlplane, \
         or set MEDPLUM_OPERATOR_TEST_ANY_CLUSTER=1 to run the suite there anyway"
    );
}

/// The kubeconfig of the cluster under test.
pub fn kubeconfig() -> &'static PathBuf {
    static KUBECONFIG: OnceLock<PathBuf> = OnceLock::new();
    KUBECONFIG.get_or_init(|| {
        if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            check_local(&path);
            return path;
        }
        let output = std::process::Command::new("bash")
            .arg(repo_root().join("hack/controlplane/start.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running hack/controlplane/start.sh");
        assert!(output.status.success(), "hack/controlplane/start.sh failed");
        PathBuf::from(String::from_utf8(output.stdout).expect("path is UTF-8").trim())
    })
}

/// A client for this test's runtime (a kube Client must not outlive the runtime it was made on).
pub async fn cluster_client() -> Client {
    super::init();
    let kubeconfig = Kubeconfig::read_from(kubeconfig()).expect("reading kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig");
    let client = Client::try_from(config).expect("kube client");
    install_crds(&client).await;
    client
}

/// A client of the test cluster that acts as `user` (impersonation by the admin): what that user's
/// RBAC allows, and nothing else.
pub async fn client_as(user: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig()).expect("reading kubeconfig");
    let mut config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig");
    config.auth_info.impersonate = Some(user.to_string());
    Client::try_from(config).expect("kube client")
}

async fn install_crds(client: &Client) {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            for crd in medplum_operator::crd::all() {
                let name = crd.metadata.name.clone().expect("CRDs are named");
                api.patch(&name, &PatchParams::apply("medplum-operator-tests").force(), &Patch::Apply(&crd))
                    .await
                    .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
                super::eventually(Duration::from_secs(30), &format!("CRD {name} established"), || {
                    let api = api.clone();
                    let name = name.clone();
                    async move {
                        let crd = api.get(&name).await.ok()?;
                        let established =
                            crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
                        established.then_some(())
                    }
                })
                .await;
            }
        })
        .await;
}

/// A namespace of one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    pub uid: String,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = format!("t-{prefix}-{}", super::suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"medplum-operator-test": "true"}}
        }))
        .expect("namespace");
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating namespace");
        Self { name, uid: created.metadata.uid.expect("created namespaces have a uid") }
    }

    /// An owner reference to this namespace, so cluster-scoped test objects are garbage collected with it.
    pub fn owner_reference(&self) -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "name": self.name, "uid": self.uid})
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot await; delete from a short-lived runtime on another thread.
        let (name, uid) = (self.name.clone(), self.uid.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let kubeconfig = Kubeconfig::read_from(kubeconfig()).ok()?;
                let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.ok()?;
                let client = Client::try_from(config).ok()?;
                Api::<Namespace>::all(client.clone()).delete(&name, &DeleteParams::background()).await.ok()?;
                release_finalizers(&client, &name, &uid).await;
                Some(())
            })
        })
        .join();
    }
}

/// Drops the finalizers of a deleted test namespace's resources (and of cluster connections it owns).
/// Its operator has stopped by now, so nothing else would: the namespace would stay Terminating, and
/// the namespace controller would go on retrying to empty it, loading the API server under every
/// later test and benchmark.
async fn release_finalizers(client: &Client, namespace: &str, namespace_uid: &str) {
    use medplum_operator::crd::{
        AccessPolicy, ClientApplication, ClusterMedplumConnection, MedplumConnection, ProjectUser,
    };
    release(Api::<ClientApplication>::namespaced(client.clone(), namespace), |_| true).await;
    release(Api::<AccessPolicy>::namespaced(client.clone(), namespace), |_| true).await;
    release(Api::<ProjectUser>::namespaced(client.clone(), namespace), |_| true).await;
    release(Api::<MedplumConnection>::namespaced(client.clone(), namespace), |_| true).await;
    let owned =
        |c: &ClusterMedplumConnection| c.metadata.owner_references.iter().flatten().any(|o| o.uid == namespace_uid);
    release(Api::<ClusterMedplumConnection>::all(client.clone()), owned).await;
}

async fn release<K>(api: Api<K>, pick: impl Fn(&K) -> bool)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use futures::StreamExt;
    let Ok(list) = api.list(&Default::default()).await else { return };
    let names: Vec<String> = list
        .items
        .iter()
        .filter(|o| !o.meta().finalizers.as_ref().is_none_or(Vec::is_empty) && pick(o))
        .filter_map(|o| o.meta().name.clone())
        .collect();
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    futures::stream::iter(names)
        .for_each_concurrent(16, |name| {
            let (api, patch) = (&api, &patch);
            async move {
                let _ = api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await;
            }
        })
        .await;
}
