#!/usr/bin/env bash
# Runs every test: unit tests, then the integration suite against the local control plane (built and
# started if needed, stopped afterwards if this script started it) and the Medplum test server.
# Set MEDPLUM_TEST_BASE_URL, MEDPLUM_TEST_CLIENT_ID and MEDPLUM_TEST_CLIENT_SECRET (a super-admin
# client) to run the same suite against a real Medplum. Extra arguments go to `cargo test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

export CONTROLPLANE_DIR=${CONTROLPLANE_DIR:-$root/.cache/test-cluster}
started_here=false
if [[ ! -f $CONTROLPLANE_DIR/api.port ]]; then
  started_here=true
fi
kubeconfig=$(bash hack/controlplane/start.sh)
if $started_here; then
  trap 'bash hack/controlplane/stop.sh' EXIT
fi
export KUBECONFIG=$kubeconfig

started=$EPOCHREALTIME
cargo test --all-targets "$@"
awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "test.sh: tests took %.0fs\n", b - a }' >&2
