#!/usr/bin/env bash
# Runs every test: unit tests, then the integration suite against the local control plane (built and
# started if needed, stopped afterwards if this script started it) and the Medplum test server.
#
#   hack/test.sh [cargo test args]                 unit tests + integration suite, Medplum test server
#   hack/test.sh --real-medplum [cargo test args]  the integration suite against a real Medplum: the one
#                                                  named by MEDPLUM_TEST_* if set, else the kit in
#                                                  ../shared/medplum-server (MEDPLUM_KIT), started into
#                                                  $MEDPLUM_STATE_DIR (default /var/tmp/medplum-operator-medplum)
#
# Tests that cannot check anything on the target (fault injection, test-server settings, policy
# enforcement the test server does not model) say SKIPPED and why; the run ends with their count.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

real=false
if [[ ${1:-} == --real-medplum ]]; then
  real=true
  shift
fi

export CONTROLPLANE_DIR=${CONTROLPLANE_DIR:-$root/.cache/test-cluster}
started_here=false
if [[ ! -f $CONTROLPLANE_DIR/api.port ]]; then
  started_here=true
fi
medplum_started_here=false
skips=$(mktemp)
output=$(mktemp)
cleanup() {
  rm -f "$skips" "$output"
  if $started_here; then bash hack/controlplane/stop.sh; fi
  if $medplum_started_here; then bash hack/real-medplum.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
KUBECONFIG=$(bash hack/controlplane/start.sh)
export KUBECONFIG

if $real; then
  if [[ -z ${MEDPLUM_TEST_BASE_URL:-} ]]; then
    bash hack/real-medplum.sh status || medplum_started_here=true
    medplum_started=$EPOCHREALTIME
    environment=$(bash hack/real-medplum.sh start)
    while IFS='=' read -r key value; do export "$key=$value"; done <<<"$environment"
    awk -v a="$medplum_started" -v b="$EPOCHREALTIME" 'BEGIN { printf "test.sh: real Medplum ready in %.0fs\n", b - a }' >&2
  fi
  target="real Medplum at $MEDPLUM_TEST_BASE_URL"
  selection=(--test e2e)
else
  # The Medplum test server is the target unless MEDPLUM_TEST_* is set by the caller.
  target=${MEDPLUM_TEST_BASE_URL:+real Medplum at $MEDPLUM_TEST_BASE_URL}
  target=${target:-Medplum test server}
  selection=(--all-targets)
fi

export MEDPLUM_OPERATOR_SKIP_LOG=$skips

started=$EPOCHREALTIME
set +e
cargo test "${selection[@]}" "$@" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}
set -e
seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')

# Totals over every test binary of the run ("test result: ok. 41 passed; 0 failed; 1 ignored; ...").
read -r passed failed ignored < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i }
  } END { print p + 0, f + 0, g + 0 }' "$output")
skipped=$(grep -c . "$skips" || true)
{
  echo "test.sh: against the $target: $passed passed (of which $skipped skipped their checks), $failed failed, $ignored ignored (benchmarks); ${seconds}s"
  if ((skipped)); then
    echo "test.sh: skipped on this target:"
    sort "$skips" | sed 's/^/  /'
  fi
} >&2
exit "$status"
