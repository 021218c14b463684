#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, etcd, kwok and helm from the
# Go module proxy into
# .cache/controlplane/<versions>/bin and prints that folder. Binaries already there are not rebuilt,
# so a warm run returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

case "$(go env GOVERSION)" in
  go1.26*) ;;
  *) echo "build.sh: need Go 1.26 (Go 1.27's jsonv2 breaks kube-openapi's /openapi/v2); found $(go env GOVERSION)" >&2; exit 1 ;;
esac

out="$root/.cache/controlplane/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION-r$BUILD_REVISION"
bin="$out/bin"
mod="$out/module"
mkdir -p "$mod" "$bin"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
# Stamp the version the way Kubernetes' own build does, so clients see v1.37.x and not v0.0.0-master.
version_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
ldflags="-s -w$version_flags"

write_module() {
  [[ -f $mod/go.sum ]] && return 0
  # Staging modules are pinned at v0.0.0 in k8s.io/kubernetes and replaced by ./staging there; a
  # consumer does not inherit those replaces, so map each to its published tag, read from its go.mod.
  local kmod staging_version
  kmod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')
  staging_version="v0.${KUBERNETES_VERSION#v1.}"
  {
    printf 'module local/controlplane\n\ngo 1.26.0\n\n'
    printf 'tool (\n\tk8s.io/kubernetes/cmd/kube-apiserver\n\tk8s.io/kubernetes/cmd/kube-controller-manager\n'
    printf '\tk8s.io/kubernetes/cmd/kube-scheduler\n\tk8s.io/kubernetes/cmd/kubelet\n'
    printf '\tk8s.io/kubernetes/cmd/kubectl\n\tgo.etcd.io/etcd/server/v3\n)\n\n'
    printf 'require (\n\tk8s.io/kubernetes %s\n\tgo.etcd.io/etcd/server/v3 %s\n)\n\n' "$KUBERNETES_VERSION" "$ETCD_VERSION"
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$kmod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > "$mod/go.mod"
  echo "build.sh: resolving modules for Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION" >&2
  (cd "$mod" && go mod tidy >&2)
}

build() { # name package
  [[ -x $bin/$1 ]] && return 0
  write_module
  echo "build.sh: building $1 (a cold build of everything takes several minutes)" >&2
  (cd "$mod" && go build -trimpath -ldflags="$ldflags" -o "$bin/$1" "$2")
}

build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build kubectl k8s.io/kubernetes/cmd/kubectl
build kubelet k8s.io/kubernetes/cmd/kubelet
build etcd go.etcd.io/etcd/server/v3
# kwok (fake nodes whose pods turn Running and Ready) and helm have module graphs of their own, so
# their dependencies never move Kubernetes'.
if [[ ! -x $bin/kwok ]]; then
  echo "build.sh: building kwok $KWOK_VERSION" >&2
  GOBIN="$bin" go install -trimpath -ldflags='-s -w' "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if [[ ! -x $bin/helm ]]; then
  echo "build.sh: building helm $HELM_VERSION" >&2
  GOBIN="$bin" go install -trimpath -ldflags='-s -w' "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
echo "$bin"
