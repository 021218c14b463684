#!/usr/bin/env bash
# Restarts the kube-apiserver of a control plane started by start.sh (same CONTROLPLANE_DIR), with the
# same arguments and the same etcd, as a control-plane upgrade or crash would: its clients' watches
# break and must recover. Waits for /readyz again and prints how long the API was away.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${CONTROLPLANE_DIR:-$root/.cache/cluster}
dir=$(cd "$dir" && pwd)
[[ -f $dir/kube-apiserver.args ]] || { echo "restart-apiserver.sh: no control plane in $dir" >&2; exit 1; }
exec 9>"$dir/.lock"
flock 9
started=$EPOCHREALTIME
pid=$(cat "$dir/kube-apiserver.pid")
kill "$pid" 2>/dev/null || true
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -9 "$pid" 2>/dev/null || true
mapfile -t args < "$dir/kube-apiserver.args"
nohup setsid "${args[@]}" >>"$dir/kube-apiserver.log" 2>&1 9>&- &
echo $! > "$dir/kube-apiserver.pid"
port=$(cat "$dir/api.port")
for _ in $(seq 1 600); do
  if curl -sf --max-time 2 --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
    "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
    awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "restart-apiserver.sh: API back after %.1fs\n", b - a }' >&2
    exit 0
  fi
  sleep 0.1
done
echo "restart-apiserver.sh: kube-apiserver not ready 60s after its restart; see $dir/kube-apiserver.log" >&2
exit 1
