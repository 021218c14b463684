#!/usr/bin/env bash
# Stops the node of hack/node/start.sh (same CONTROLPLANE_DIR): its pods' containers, the kubelet and
# containerd, unmounts what the kubelet mounted and removes the node's state and Node object.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${CONTROLPLANE_DIR:-$root/.cache/cluster}
state=$dir/node
[[ -d $state ]] || exit 0
stop() {
  [[ -f $state/$1.pid ]] || return 0
  local pid
  pid=$(cat "$state/$1.pid")
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$state/$1.pid"
}
stop kubelet
if [[ -S $state/containerd.sock ]]; then
  ctr=(ctr --address "$state/containerd.sock" --namespace k8s.io)
  for task in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks kill --signal SIGKILL "$task" >/dev/null 2>&1; done
  sleep 0.5
  for task in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks delete --force "$task" >/dev/null 2>&1; done
  for container in $("${ctr[@]}" containers ls -q 2>/dev/null); do "${ctr[@]}" containers delete "$container" >/dev/null 2>&1; done
fi
stop containerd
# The kubelet's volume mounts and containerd's shm and rootfs mounts, deepest first.
grep -F " $state/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r mount; do umount -l "$mount"; done
if [[ -f $dir/api.port ]]; then
  bin=$(bash "$root/hack/controlplane/build.sh")
  "$bin/kubectl" --kubeconfig "$dir/kubeconfig" delete node medplum-operator-node --ignore-not-found >/dev/null 2>&1
fi
rm -rf "$state"
