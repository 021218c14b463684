#!/usr/bin/env bash
# Stops the control plane started by start.sh (same CONTROLPLANE_DIR) and removes its state.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${CONTROLPLANE_DIR:-$root/.cache/cluster}
[[ -d $dir ]] || exit 0
for p in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  if [[ -f $dir/$p.pid ]]; then
    pid=$(cat "$dir/$p.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$dir/$p.pid"
  fi
done
rm -f "$dir/api.port" "$dir/etcd.port"
