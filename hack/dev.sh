#!/usr/bin/env bash
# Starts everything locally: the control plane, the Medplum test server, the CRDs, the operator and the
# manifests in examples/. `hack/dev.sh stop` stops it all. State and logs: .cache/dev/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
state="$root/.cache/dev"
export CONTROLPLANE_DIR="$root/.cache/cluster"
medplum_port=${MEDPLUM_PORT:-8103}
operator_address=${OPERATOR_ADDRESS:-127.0.0.1:8080}

stop_pid() { [[ -f $1 ]] && kill "$(cat "$1")" 2>/dev/null; rm -f "$1"; }
if [[ ${1:-} == stop ]]; then
  stop_pid "$state/operator.pid"
  stop_pid "$state/medplum.pid"
  bash hack/controlplane/stop.sh
  echo "stopped"
  exit 0
fi
mkdir -p "$state"
stop_pid "$state/operator.pid"
stop_pid "$state/medplum.pid"

echo "==> control plane (the first run builds it from the Go module proxy: several minutes)"
bin=$(bash hack/controlplane/build.sh)
export KUBECONFIG=$(bash hack/controlplane/start.sh)
export PATH="$bin:$PATH"

echo "==> building the operator and the Medplum test server"
cargo build --quiet --bins

echo "==> Medplum test server on 127.0.0.1:$medplum_port"
sa_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
sa_secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
nohup target/debug/medplum-test-server --listen "127.0.0.1:$medplum_port" \
  --super-admin-client-id "$sa_id" --super-admin-client-secret "$sa_secret" >"$state/medplum.log" 2>&1 &
echo $! >"$state/medplum.pid"
medplum="http://127.0.0.1:$medplum_port"
for _ in $(seq 1 50); do curl -sf "$medplum/healthcheck" >/dev/null && break; sleep 0.1; done
curl -sf "$medplum/healthcheck" >/dev/null || { echo "Medplum test server did not start; see $state/medplum.log"; exit 1; }

echo "==> a Medplum project and its project-admin client (Project/\$init, admin client, admin: true)"
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
token=$(curl -sf "$medplum/oauth2/token" -d grant_type=client_credentials -d "client_id=$sa_id" --data-urlencode "client_secret=$sa_secret" | json '["access_token"]')
project=$(curl -sf "$medplum/fhir/R4/Project/\$init" -H "authorization: Bearer $token" -H 'content-type: application/fhir+json' \
  -d '{"resourceType":"Parameters","parameter":[{"name":"name","valueString":"Demo"}]}' | json '["id"]')
client=$(curl -sf "$medplum/admin/projects/$project/client" -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"name":"medplum-operator"}')
client_id=$(echo "$client" | json '["id"]')
client_secret=$(echo "$client" | json '["secret"]')
membership=$(curl -sf "$medplum/fhir/R4/ProjectMembership?user=ClientApplication/$client_id" -H "authorization: Bearer $token" | json '["entry"][0]["resource"]["id"]')
curl -sf -X PATCH "$medplum/fhir/R4/ProjectMembership/$membership" -H "authorization: Bearer $token" \
  -H 'content-type: application/json-patch+json' -d '[{"op":"add","path":"/admin","value":true}]' >/dev/null

echo "==> CRDs, the credentials Secret and examples/"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd --all --timeout 30s >/dev/null
kubectl apply -f examples/namespace.yaml >/dev/null
kubectl -n medplum-demo create secret generic medplum-admin --dry-run=client -o yaml \
  --from-literal "MEDPLUM_CLIENT_ID=$client_id" --from-literal "MEDPLUM_CLIENT_SECRET=$client_secret" \
  | kubectl label --local -f - medplum.com/connection-credentials=true -o yaml | kubectl apply -f - >/dev/null
kubectl apply -f examples/ >/dev/null

echo "==> operator (HTTP on $operator_address)"
nohup target/debug/medplum-operator run --http-address "$operator_address" >"$state/operator.log" 2>&1 &
echo $! >"$state/operator.pid"
kubectl -n medplum-demo wait --for condition=Ready medplumconnection/default --timeout 60s >/dev/null
kubectl -n medplum-demo wait --for condition=Ready accesspolicy/lab-reader clientapplication/lab-sync projectuser/dr-lee --timeout 60s >/dev/null

cat <<MSG

Everything is running. Look at:
  export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH
  kubectl get medplumconnections -A          # Ready, project and Medplum version
  kubectl get clustermedplumconnections
  kubectl get -n medplum-demo accesspolicies,clientapplications,projectusers
  kubectl get -n medplum-demo secret lab-sync-medplum -o yaml   # the client's working credentials
  kubectl annotate -n medplum-demo clientapplication lab-sync medplum.com/rotate=\$(date +%s)   # rotate now
  kubectl -n medplum-demo describe medplumconnection default
  kubectl -n medplum-demo get events
  curl -s http://$operator_address/metrics | grep medplum_operator
  tail -f $state/operator.log                 # the operator's log
Medplum test server: $medplum (project $project)
Stop everything: hack/dev.sh stop
MSG
