#!/usr/bin/env bash
# Starts everything locally: the control plane, a Medplum, the CRDs, the operator and the manifests in
# examples/, then shows that the example client's credentials work and its policy holds.
#
#   hack/dev.sh                  with the Medplum test server, on a free port
#   hack/dev.sh --real-medplum   with a real Medplum 5.1.29: the one MEDPLUM_TEST_BASE_URL,
#                                MEDPLUM_TEST_CLIENT_ID and MEDPLUM_TEST_CLIENT_SECRET (a super-admin
#                                client) name, else the kit in ../shared/medplum-server (hack/real-medplum.sh)
#   hack/dev.sh stop             stops everything it started
#
# MEDPLUM_PORT (the test server's port) and OPERATOR_ADDRESS (the operator's /healthz, /readyz and
# /metrics) pick fixed ones; a port in use is then an error. A rerun stops what a previous run left,
# whatever state it ended in. State and logs: DEV_STATE_DIR (default .cache/dev); the control plane:
# CONTROLPLANE_DIR (default .cache/cluster).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
state=${DEV_STATE_DIR:-$root/.cache/dev}
export CONTROLPLANE_DIR=${CONTROLPLANE_DIR:-$root/.cache/cluster}

fail() { echo "hack/dev.sh: $*" >&2; exit 1; }

# Stops the process in a PID file, only if it still runs the program this script started (a stale
# file may name a process that is now something else).
stop_pid() {
  local file=$1 program=$2 pid
  pid=$(cat "$file" 2>/dev/null) || return 0
  if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "$program"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$file"
}

stop_all() {
  stop_pid "$state/operator.pid" medplum-operator
  stop_pid "$state/medplum.pid" medplum-test-server
  if [[ -f $state/real-medplum-started ]]; then
    bash hack/real-medplum.sh stop >/dev/null 2>&1 || true
    rm -f "$state/real-medplum-started"
  fi
  bash hack/controlplane/stop.sh >/dev/null 2>&1 || true
}

real=false
case ${1:-} in
  stop)
    stop_all
    echo "stopped"
    exit 0
    ;;
  --real-medplum) real=true ;;
  "") ;;
  *) fail "usage: hack/dev.sh [--real-medplum] | stop" ;;
esac

mkdir -p "$state"
started=$EPOCHREALTIME
# A rerun starts clean: what an earlier run left (running or half-started) is stopped first. The
# control plane is kept: starting it reuses a healthy one.
stop_pid "$state/operator.pid" medplum-operator
stop_pid "$state/medplum.pid" medplum-test-server

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
port_taken() { python3 -c 'import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(("127.0.0.1",int(sys.argv[1])))!=0)' "$1"; }

if [[ -n ${OPERATOR_ADDRESS:-} ]]; then
  port_taken "${OPERATOR_ADDRESS##*:}" &&
    fail "OPERATOR_ADDRESS $OPERATOR_ADDRESS is in use; choose another, or leave OPERATOR_ADDRESS unset for a free port"
  operator_address=$OPERATOR_ADDRESS
else
  operator_address=127.0.0.1:$(free_port)
fi

if ! $real; then
  if [[ -n ${MEDPLUM_PORT:-} ]]; then
    port_taken "$MEDPLUM_PORT" &&
      fail "port $MEDPLUM_PORT is in use (another Medplum?); choose another MEDPLUM_PORT, or leave it unset for a free port"
    medplum_port=$MEDPLUM_PORT
  else
    medplum_port=$(free_port)
  fi
fi

echo "==> control plane (the first run builds it from the Go module proxy: several minutes)"
bin=$(bash hack/controlplane/build.sh)
KUBECONFIG=$(bash hack/controlplane/start.sh)
export KUBECONFIG PATH="$bin:$PATH"

echo "==> building the operator$($real || echo ' and the Medplum test server')"
cargo build --quiet --bins

json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
# A super-admin token, which proves that the server answering is the one meant: only it knows the
# credentials.
super_admin_token() {
  curl -s --max-time 10 "$medplum/oauth2/token" -d grant_type=client_credentials -d "client_id=$sa_id" \
    --data-urlencode "client_secret=$sa_secret" | json '["access_token"]' 2>/dev/null
}

if $real; then
  if [[ -z ${MEDPLUM_TEST_BASE_URL:-} ]]; then
    echo "==> real Medplum 5.1.29 from the kit (a cold start takes a few minutes)"
    hack/real-medplum.sh status || touch "$state/real-medplum-started"
    environment=$(MEDPLUM_RATE_LIMITS=off bash hack/real-medplum.sh start) || fail "the real Medplum did not start"
    while IFS='=' read -r key value; do export "$key=$value"; done <<<"$environment"
  else
    echo "==> real Medplum at $MEDPLUM_TEST_BASE_URL"
  fi
  medplum=${MEDPLUM_TEST_BASE_URL%/}
  sa_id=$MEDPLUM_TEST_CLIENT_ID
  sa_secret=$MEDPLUM_TEST_CLIENT_SECRET
  token=$(super_admin_token) || fail "no token from $medplum with MEDPLUM_TEST_CLIENT_ID and MEDPLUM_TEST_CLIENT_SECRET"
else
  echo "==> Medplum test server on 127.0.0.1:$medplum_port"
  sa_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
  sa_secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
  nohup target/debug/medplum-test-server --listen "127.0.0.1:$medplum_port" \
    --super-admin-client-id "$sa_id" --super-admin-client-secret "$sa_secret" >"$state/medplum.log" 2>&1 &
  echo $! >"$state/medplum.pid"
  medplum="http://127.0.0.1:$medplum_port"
  token=
  for _ in $(seq 1 100); do
    token=$(super_admin_token) && break
    kill -0 "$(cat "$state/medplum.pid")" 2>/dev/null || fail "the Medplum test server exited: $(tail -1 "$state/medplum.log")"
    sleep 0.1
  done
  [[ -n $token ]] || fail "the Medplum test server on port $medplum_port did not answer; see $state/medplum.log"
fi

echo "==> a Medplum project and its project-admin client (Project/\$init, admin client, admin: true)"
call() { # method path [body] [content type]: the body of a successful answer, or a one-line error
  local answer
  answer=$(curl -s -w '\n%{http_code}' -X "$1" "$medplum/$2" -H "authorization: Bearer $token" \
    -H "content-type: ${4:-application/fhir+json}" ${3:+-d "$3"}) || fail "$1 /$2: no answer from $medplum"
  [[ ${answer##*$'\n'} == 2* ]] || fail "$1 /$2 answered ${answer##*$'\n'}: ${answer%$'\n'*}"
  echo "${answer%$'\n'*}"
}
project=$(call POST 'fhir/R4/Project/$init' \
  '{"resourceType":"Parameters","parameter":[{"name":"name","valueString":"medplum-operator demo"}]}' | json '["id"]')
client=$(call POST "admin/projects/$project/client" '{"name":"medplum-operator"}' application/json)
client_id=$(echo "$client" | json '["id"]')
client_secret=$(echo "$client" | json '["secret"]')
membership=$(call GET "fhir/R4/ProjectMembership?user=ClientApplication/$client_id" | json '["entry"][0]["resource"]["id"]')
call PATCH "fhir/R4/ProjectMembership/$membership" '[{"op":"add","path":"/admin","value":true}]' \
  application/json-patch+json >/dev/null

echo "==> CRDs, the credentials Secret and examples/ (pointed at $medplum)"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd --all --timeout 30s >/dev/null
# A demo from an earlier run is removed first. Its operator is stopped and its project is gone with
# its Medplum (or left behind), so its objects are deleted without their cleanup finalizers.
forget() { # namespace ('' for cluster-scoped) kind [name...]
  local scope=() name
  [[ -n $1 ]] && scope=(-n "$1")
  shift
  for name in $(kubectl "${scope[@]}" get "$@" -o name --ignore-not-found 2>/dev/null || true); do
    kubectl "${scope[@]}" patch "$name" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
    kubectl "${scope[@]}" delete "$name" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  done
}
forget '' domainconfigurations acme
forget '' clustermedplumconnections shared medplum-super-admin
if kubectl get namespace medplum-demo >/dev/null 2>&1; then
  forget medplum-demo clientapplications,accesspolicies,projectusers,medplumprojects,medplumconnections
  kubectl delete namespace medplum-demo --timeout 60s >/dev/null
fi
manifests="$state/manifests"
rm -rf "$manifests" && mkdir -p "$manifests"
for file in examples/*.yaml; do
  sed "s|http://127.0.0.1:8103/|$medplum/|; s|your-project-id|$project|" "$file" >"$manifests/$(basename "$file")"
done
kubectl apply -f "$manifests/namespace.yaml" >/dev/null
secret() { # name key=value...: a labelled credentials Secret of the demo namespace
  local name=$1; shift
  kubectl -n medplum-demo create secret generic "$name" --dry-run=client -o yaml "${@/#/--from-literal=}" |
    kubectl label --local -f - medplum.com/connection-credentials=true -o yaml | kubectl apply -f - >/dev/null
}
secret medplum-admin "MEDPLUM_CLIENT_ID=$client_id" "MEDPLUM_CLIENT_SECRET=$client_secret"
# The domain example needs a super admin (Medplum's rule), and its identity provider a client secret.
secret medplum-super-admin "MEDPLUM_CLIENT_ID=$sa_id" "MEDPLUM_CLIENT_SECRET=$sa_secret"
secret acme-idp "client-secret=$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
# The project's reCAPTCHA secret key (Google's published test key) and a secret for its Bots; the label
# makes a change of these and of acme-idp reach Medplum at once.
secret portal-recaptcha "secret-key=6LeIxAcTAAAAAGG-vFI1TnRWxMZNFuojJ4WifJWe"
secret bot-secrets "lab-api-key=$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
kubectl -n medplum-demo label secret portal-recaptcha bot-secrets acme-idp medplum.com/source-secret=true --overwrite >/dev/null
kubectl apply -f "$manifests/" >/dev/null

echo "==> operator (HTTP on $operator_address)"
nohup target/debug/medplum-operator run --http-address "$operator_address" >"$state/operator.log" 2>&1 &
echo $! >"$state/operator.pid"
wait_ready() { # kind/name...
  kubectl -n medplum-demo wait --for condition=Ready "$@" --timeout 90s >/dev/null 2>&1 && return 0
  kubectl -n medplum-demo get "$@" -o custom-columns='NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].reason,MESSAGE:.status.conditions[?(@.type=="Ready")].message' >&2
  fail "not Ready within 90 s; the operator's log: $state/operator.log"
}
wait_ready medplumconnection/default
wait_ready accesspolicy/lab-reader clientapplication/lab-sync projectuser/dr-lee medplumproject/project
kubectl wait --for condition=Ready domainconfiguration/acme --timeout 90s >/dev/null ||
  fail "DomainConfiguration acme is not Ready; kubectl describe domainconfiguration acme"

echo "==> the example client's credentials, from its Secret, against its policy"
secret() { kubectl -n medplum-demo get secret lab-sync-medplum -o "jsonpath={.data.$1}" | base64 -d; }
lab_token=$(curl -s "$(secret MEDPLUM_TOKEN_URL)" -d grant_type=client_credentials \
  -d "client_id=$(secret MEDPLUM_CLIENT_ID)" --data-urlencode "client_secret=$(secret MEDPLUM_CLIENT_SECRET)" |
  json '["access_token"]') || fail "the credentials in Secret lab-sync-medplum got no token"
as_lab_sync() { curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $lab_token" "$@"; }
searched=$(as_lab_sync "$medplum/fhir/R4/Observation")
written=$(as_lab_sync -X POST -H 'content-type: application/fhir+json' "$medplum/fhir/R4/Observation" \
  -d '{"resourceType":"Observation","status":"final","code":{"text":"demo"}}')
patients=$(as_lab_sync "$medplum/fhir/R4/Patient")
[[ $searched == 200 && $written == 403 && $patients == 403 ]] ||
  fail "lab-reader does not hold as declared: search Observation $searched, create Observation $written, search Patient $patients"
signin=$(curl -s "$medplum/auth/method" -H 'content-type: application/json' -d '{"email":"ada@acme.example"}' |
  json '.get("authorizeUrl", "password sign-in")')
[[ $signin == https://login.acme.example/* ]] || fail "Medplum does not send @acme.example to its identity provider: $signin"
seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')

cat <<MSG

Everything runs ($seconds s). Secret lab-sync-medplum holds working credentials of the example client,
and its policy lab-reader holds in Medplum:
  allowed: GET  /fhir/R4/Observation  -> $searched (lab-reader grants read and search)
  refused: POST /fhir/R4/Observation  -> $written (lab-reader is read-only)
  refused: GET  /fhir/R4/Patient      -> $patients (lab-reader grants no Patient access)
and Medplum sends ada@acme.example to the identity provider of DomainConfiguration acme:
  ${signin%%\?*}

Look at:
  export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH
  kubectl get medplumconnections -A          # Ready, project and Medplum version
  kubectl get clustermedplumconnections
  kubectl get -n medplum-demo accesspolicies,clientapplications,projectusers,medplumprojects
  kubectl get domainconfigurations
  kubectl get -n medplum-demo secret lab-sync-medplum -o yaml   # the client's working credentials
  kubectl annotate -n medplum-demo clientapplication lab-sync medplum.com/rotate=\$(date +%s)   # rotate now
  kubectl -n medplum-demo get pods -w           # ... and watch lab-sync's pods roll onto the new secret
  kubectl -n medplum-demo describe medplumconnection default
  kubectl -n medplum-demo get events
  curl -s http://$operator_address/metrics | grep medplum_operator
  tail -f $state/operator.log                 # the operator's log
Medplum: $medplum (project $project)
Stop everything: hack/dev.sh stop
MSG
