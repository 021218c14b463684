#!/usr/bin/env bash
# Builds promtool (Prometheus' own rule checker and unit tester, from the Go module proxy) into
# .cache/tools and prints its path. A warm run returns at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
version=v0.316.0
bin="$root/.cache/tools/promtool-$version"
if [[ ! -x $bin/promtool ]]; then
  echo "alerts/build.sh: building promtool $version (a cold build takes minutes)" >&2
  mkdir -p "$bin"
  GOBIN="$bin" GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod \
    go install -trimpath -ldflags='-s -w' "github.com/prometheus/prometheus/cmd/promtool@$version"
fi
echo "$bin/promtool"
