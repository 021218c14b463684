#!/usr/bin/env bash
# Starts one real node for the control plane of hack/controlplane/start.sh (same CONTROLPLANE_DIR): the
# kubelet built from the Go module proxy, Debian's containerd 1.6 and runc, with the images the tests
# need imported into containerd (no registry here): the operator's image (target/, from hack/image.sh)
# and a pause image built from Kubernetes' own pause.c. The node is tainted and labelled so that only
# pods that ask for it run there (tests/e2e/node.rs); kwok's fake nodes keep the rest. Prints the node's
# name. Pod networking is the host's (no CNI plugin, no kube-proxy; see tests/e2e/node.rs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${CONTROLPLANE_DIR:-$root/.cache/cluster}
node=medplum-operator-node
state=$dir/node
kubeconfig=$dir/kubeconfig
[[ -f $dir/api.port ]] || { echo "node/start.sh: start the control plane first (hack/controlplane/start.sh)" >&2; exit 1; }
for tool in containerd ctr /usr/sbin/runc musl-gcc podman; do
  command -v "$tool" >/dev/null || { echo "node/start.sh: $tool is needed: apt-get install containerd runc musl-tools podman" >&2; exit 1; }
done
bin=$(bash "$root/hack/controlplane/build.sh")
image_archive=$root/target/medplum-operator-image.oci.tar
[[ -f $image_archive ]] || { echo "node/start.sh: $image_archive is missing: run hack/image.sh" >&2; exit 1; }
mkdir -p "$state"
socket=$state/containerd.sock

running() { [[ -f $state/$1.pid ]] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }
launch() { # name args...
  local name=$1; shift
  nohup setsid "$@" >"$state/$name.log" 2>&1 9>&- &
  echo $! > "$state/$name.pid"
}

# runc is Debian's (crun refuses this machine's hybrid cgroups). Without CAP_SYS_RESOURCE no process here
# may lower its OOM score, as the kubelet asks for a pod sandbox (-998): containerd keeps it at its own.
if ! running containerd; then
  containerd config default | sed \
    -e "s#^root = .*#root = \"$state/containerd\"#" \
    -e "s#^state = .*#state = \"$state/containerd-state\"#" \
    -e "/^\[grpc\]/,/^\[/ s#^  address = .*#  address = \"$socket\"#" \
    -e 's#sandbox_image = .*#sandbox_image = "localhost/medplum-operator-test/pause:3.10"#' \
    -e 's#BinaryName = ""#BinaryName = "/usr/sbin/runc"#' \
    -e 's#restrict_oom_score_adj = false#restrict_oom_score_adj = true#' >"$state/containerd.toml"
  launch containerd containerd --config "$state/containerd.toml"
  for _ in $(seq 1 100); do [[ -S $socket ]] && break; sleep 0.1; done
fi
ctr=(ctr --address "$socket" --namespace k8s.io)

# The pause image: Kubernetes' pause.c from the module the control plane was built from, static.
if ! "${ctr[@]}" images ls -q | grep -qx localhost/medplum-operator-test/pause:3.10; then
  source "$root/hack/controlplane/versions.env"
  module=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')
  context=$(mktemp -d)
  musl-gcc -Os -static -DVERSION=3.10 -o "$context/pause" "$module/build/pause/linux/pause.c"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$context/Containerfile"
  podman build --quiet --tag localhost/medplum-operator-test/pause:3.10 "$context" >/dev/null
  podman save --quiet --format oci-archive --output "$context/pause.tar" localhost/medplum-operator-test/pause:3.10
  "${ctr[@]}" images import "$context/pause.tar" >/dev/null
  rm -rf "$context"
fi
# The operator's image, as hack/image.sh left it (imported again each start: it changes per commit).
"${ctr[@]}" images import "$image_archive" >/dev/null

if ! running kubelet; then
  if other=$(pgrep -x kubelet); then
    echo "node/start.sh: a kubelet already runs here (pid $other); two would share the cgroupfs hierarchy" >&2
    exit 1
  fi
  cat >"$state/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 (hybrid) only, which Kubernetes 1.35+ refuses unless told otherwise.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$socket
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
readOnlyPort: 0
# A free port on 127.0.0.1, not 10250: nothing but this machine's tests talks to it. (One such node at
# a time per machine: two kubelets would share the cgroupfs hierarchy.)
port: $(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
address: 127.0.0.1
healthzPort: 0
enforceNodeAllocatable: []
# Container logs go here (the API server has no client certificate for the kubelet: no kubectl logs).
podLogsDir: $state/pod-logs
# The images come from hack/image.sh, not from a registry: the kubelet must not collect them, nor
# evict the test's pods, when the development disk runs full.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 1Mi}
registerWithTaints:
- {key: medplum-operator-test/node, value: real, effect: NoSchedule}
YAML
  # The admin kubeconfig: a test node, not a node identity of its own (no NodeRestriction here).
  launch kubelet "$bin/kubelet" --config "$state/kubelet.yaml" --kubeconfig "$kubeconfig" \
    --root-dir "$state/kubelet" --hostname-override "$node" --node-labels medplum-operator-test/node=real
fi
for _ in $(seq 1 600); do
  if [[ $("$bin/kubectl" --kubeconfig "$kubeconfig" get node "$node" \
      -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]; then
    # The API server gives a new node the not-ready taint, which the node lifecycle controller (not
    # run here) lifts once the node is Ready.
    "$bin/kubectl" --kubeconfig "$kubeconfig" taint node "$node" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
    echo "$node"
    exit 0
  fi
  sleep 0.1
done
echo "node/start.sh: node $node not Ready after 60 s; see $state/kubelet.log" >&2
exit 1
