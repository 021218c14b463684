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
node_started_here=false
skips=$(mktemp)
output=$(mktemp)
cleanup() {
  rm -f "$skips" "$output"
  if $node_started_here; then bash hack/node/stop.sh; fi
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
    environment=$(MEDPLUM_RATE_LIMITS=off bash hack/real-medplum.sh start)
    kit_environment=$environment
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

# The image the chart runs: tests/e2e/image.rs checks its build and runs the chart's pods from it
# under podman; tests/e2e/node.rs runs the chart's Deployment on a real kubelet with containerd.
bash hack/image.sh >&2
[[ -f $CONTROLPLANE_DIR/node/kubelet.pid ]] || node_started_here=true
bash hack/node/start.sh >/dev/null

started=$EPOCHREALTIME
set +e
cargo test "${selection[@]}" "$@" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}
set -e

# The outage tests stop what the suite shares (kube-apiserver; with the real Medplum, its server,
# PostgreSQL and Redis, 2 minutes each), so they run after it, one at a time.
filtered=false
for arg in "$@"; do [[ $arg == -* ]] || filtered=true; done
if ! $filtered && { ! $real || [[ -n ${kit_environment:-} ]]; }; then
  echo "test.sh: the outage tests, one at a time" >&2
  set +e
  cargo test --test e2e "$@" outage:: -- --ignored --test-threads 1 2>&1 | tee -a "$output"
  outage_status=${PIPESTATUS[0]}
  set -e
  ((outage_status == 0)) || status=$outage_status
  if $real; then MEDPLUM_RATE_LIMITS=off bash hack/real-medplum.sh start >/dev/null; fi
fi

# The suite runs against a real Medplum with its rate limits off, as its tests need; Medplum enforces
# no FHIR quota then, so the rate limit tests (tests/e2e/limits.rs) skip. The kit's server is restarted
# with its production limits for them, then restarted as it was. Not when a test filter was given.
if $real && [[ -n ${kit_environment:-} ]] && ! $filtered; then
  echo "test.sh: the rate limit tests again, against the real Medplum restarted with its rate limits on" >&2
  environment=$(MEDPLUM_RATE_LIMITS=on bash hack/real-medplum.sh start)
  while IFS='=' read -r key value; do export "$key=$value"; done <<<"$environment"
  set +e
  MEDPLUM_OPERATOR_SKIP_LOG=/dev/null cargo test "${selection[@]}" "$@" limits:: 2>&1 | tee -a "$output"
  limits_status=${PIPESTATUS[0]}
  set -e
  ((limits_status == 0)) || status=$limits_status
  if $medplum_started_here; then
    bash hack/real-medplum.sh stop >/dev/null 2>&1 || true
    medplum_started_here=false
  else
    MEDPLUM_RATE_LIMITS=off bash hack/real-medplum.sh start >/dev/null
  fi
  # The main run's skips of these tests are answered by this run.
  sed -i '/^limits::/d' "$skips"
fi
seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')

# Totals over every test binary of the run ("test result: ok. 41 passed; 0 failed; 1 ignored; ...").
read -r passed failed ignored < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i }
  } END { print p + 0, f + 0, g + 0 }' "$output")
skipped=$(grep -c . "$skips" || true)
{
  echo "test.sh: against the $target: $passed passed (of which $skipped skipped their checks), $failed failed, $ignored ignored (benchmarks; the outage tests run alone after the suite); ${seconds}s"
  if ((skipped)); then
    echo "test.sh: skipped on this target:"
    sort "$skips" | sed 's/^/  /'
  fi
} >&2
exit "$status"
