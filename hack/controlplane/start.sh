#!/usr/bin/env bash
# Starts etcd, kube-apiserver (RBAC on), kube-controller-manager, kube-scheduler and kwok on 127.0.0.1
# only, with a fresh CA, serving cert, admin client cert and service-account signing key, and two fake
# nodes that kwok runs pods on (kwok-stages.yaml: pods turn Ready after a delay), so workloads roll out
# as in a real cluster. Writes a kubeconfig and waits for /readyz and Ready nodes. If the control plane
# in the state folder already answers, it is reused.
#
#   CONTROLPLANE_DIR  state folder (default: .cache/cluster); kubeconfig at $CONTROLPLANE_DIR/kubeconfig
# Prints the kubeconfig path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${CONTROLPLANE_DIR:-$root/.cache/cluster}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
kubeconfig="$dir/kubeconfig"
bin=$("$here/build.sh")

ready() {
  [[ -f $dir/api.port ]] || return 1
  curl -sf --max-time 2 --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
    "https://127.0.0.1:$(cat "$dir/api.port")/readyz" >/dev/null 2>&1
}

exec 9>"$dir/.lock"
flock 9
if ready; then
  echo "$kubeconfig"
  exit 0
fi
"$here/stop.sh" >/dev/null 2>&1 || true
rm -rf "$dir/etcd" "$dir/pki" "$dir"/*.log "$dir"/*.pid "$dir"/*.port
mkdir -p "$dir/pki"
started=$EPOCHREALTIME

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
etcd_port=$(free_port); etcd_peer_port=$(free_port); api_port=$(free_port)

pki="$dir/pki"
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=medplum-operator-local-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
sign() { # name subject [extfile-content]
  openssl_quiet req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr"
  printf '%s\n' "${3:-extendedKeyUsage=clientAuth}" > "$pki/$1.ext"
  openssl_quiet x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/$1.ext" -out "$pki/$1.crt"
}
sign apiserver "/CN=kube-apiserver" "$(printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth')"
sign admin "/O=system:masters/CN=admin"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

cat > "$kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
KUBECONFIG

launch() { # name args...
  local name=$1; shift
  # 9>&-: the servers must not inherit the lock, or the next start.sh would wait for them forever.
  nohup setsid "$@" >"$dir/$name.log" 2>&1 9>&- &
  echo $! > "$dir/$name.pid"
}

launch etcd "$bin/etcd" --data-dir "$dir/etcd" --name local \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "local=http://127.0.0.1:$etcd_peer_port" --unsafe-no-fsync --quota-backend-bytes 4294967296

apiserver=("$bin/kube-apiserver"
  --etcd-servers "http://127.0.0.1:$etcd_port"
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port"
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key"
  --client-ca-file "$pki/ca.crt"
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key"
  --service-account-issuer https://kubernetes.default.svc.cluster.local
  --api-audiences https://kubernetes.default.svc.cluster.local
  --service-cluster-ip-range 10.0.0.0/24
  --authorization-mode RBAC --endpoint-reconciler-type none
  --enable-admission-plugins OwnerReferencesPermissionEnforcement
  --enable-priority-and-fairness=false)
# restart-apiserver.sh starts it again with the same arguments.
printf '%s\n' "${apiserver[@]}" > "$dir/kube-apiserver.args"
launch kube-apiserver "${apiserver[@]}"

launch kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$kubeconfig" --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  --controllers '*,-node-ipam-controller,-node-lifecycle-controller,-persistentvolume-attach-detach-controller'

launch kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig "$kubeconfig" --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
  --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false

launch kwok "$bin/kwok" --kubeconfig "$kubeconfig" --config "$here/kwok-stages.yaml" \
  --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake

echo "$etcd_port" > "$dir/etcd.port"
echo "$api_port" > "$dir/api.port"

nodes_ready() {
  local ready_nodes
  ready_nodes=$("$bin/kubectl" --kubeconfig "$kubeconfig" get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)
  ((ready_nodes == 2))
}

# Two fake nodes that kwok plays the kubelet of. The API server gives a new node the not-ready taint,
# which the node lifecycle controller (not run here) would lift once it is Ready: lift it here.
add_nodes() {
  for node in kwok-node-0 kwok-node-1; do
    printf '{"apiVersion":"v1","kind":"Node","metadata":{"name":"%s","annotations":{"kwok.x-k8s.io/node":"fake","node.alpha.kubernetes.io/ttl":"0"},"labels":{"kubernetes.io/hostname":"%s","type":"kwok"}}}' \
      "$node" "$node" | "$bin/kubectl" --kubeconfig "$kubeconfig" apply -f - >/dev/null
    "$bin/kubectl" --kubeconfig "$kubeconfig" taint node "$node" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
  done
}

nodes_added=false
for _ in $(seq 1 600); do
  if ready && ! $nodes_added; then
    add_nodes && nodes_added=true
  fi
  if $nodes_added && nodes_ready; then
    awk -v a="$started" -v b="$EPOCHREALTIME" -v p="$api_port" \
      'BEGIN { printf "start.sh: control plane ready at https://127.0.0.1:%s in %.1fs\n", p, b - a }' >&2
    echo "$kubeconfig"
    exit 0
  fi
  for p in etcd kube-apiserver kube-scheduler kwok; do
    if ! kill -0 "$(cat "$dir/$p.pid")" 2>/dev/null; then
      echo "start.sh: $p exited; last lines of $dir/$p.log:" >&2
      tail -20 "$dir/$p.log" >&2
      exit 1
    fi
  done
  sleep 0.1
done
echo "start.sh: control plane (or its fake nodes) not ready after 60s; see $dir/*.log" >&2
exit 1
