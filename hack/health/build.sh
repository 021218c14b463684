#!/usr/bin/env bash
# Builds health-check (Argo CD's Lua interpreter and Flux's kstatus, from the Go module proxy) into
# .cache/tools and prints its path. Rebuilt only when its sources change.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
sum=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)
bin="$root/.cache/tools/health-check-$sum"
if [[ ! -x $bin ]]; then
  echo "health/build.sh: building health-check" >&2
  mkdir -p "$root/.cache/tools"
  (cd "$here" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$bin" .)
fi
echo "$bin"
