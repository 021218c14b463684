#!/usr/bin/env bash
# Benchmarks: they print figures (lines starting with "figure:") and assert nothing about time. Each
# converge run measures, in the same run and against the same Medplum, a floor (a minimal client making
# the same Medplum calls at the same concurrency) and the operator; see tests/e2e/bench.rs.
#
#   hack/bench.sh [TARGET...]   TARGET is one of
#     test-server   converge on the Medplum test server, rate limits off
#     real          converge on a real Medplum 5.1.29 (the kit in ../shared/medplum-server), limits off
#     real-limits   the same with Medplum's production rate limits on (the server is restarted for it,
#                   and restarted with limits off afterwards)
#     memory        operator RSS with BENCH_OBJECTS objects on the test server
#     rotate        rotate-everything (medplum.com/rotate-clients) over BENCH_CLIENTS clients on a real
#                   Medplum with its production rate limits on, with BENCH_CONSUMERS (default 20)
#                   polling consumers
#   default: test-server real real-limits memory rotate
#
# BENCH_CLIENTS (default 1000) clients per converge run, BENCH_RESYNC_SECONDS (default 60) the resync
# interval of the steady-state window, BENCH_OBJECTS (default 10000) for memory. BENCH_IMAGE=1 runs the
# operator from its container image (hack/image.sh), as the chart's container under podman. Output also goes to
# .cache/bench/<target>.log. The real Medplum's state is $MEDPLUM_STATE_DIR (see hack/real-medplum.sh).
# OPERATOR_BINARY=<path> measures that operator binary instead of this tree's (before/after a change).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

targets=("$@")
((${#targets[@]})) || targets=(test-server real real-limits memory rotate)
for target in "${targets[@]}"; do
  case $target in
    test-server | real | real-limits | memory | rotate) ;;
    *) echo "usage: hack/bench.sh [test-server|real|real-limits|memory|rotate]..." >&2; exit 2 ;;
  esac
done

export CONTROLPLANE_DIR=${CONTROLPLANE_DIR:-$root/.cache/test-cluster}
started_here=false
[[ -f $CONTROLPLANE_DIR/api.port ]] || started_here=true
limits_changed=false
cleanup() {
  if $limits_changed; then
    MEDPLUM_RATE_LIMITS=off bash hack/real-medplum.sh start >/dev/null 2>&1 || true
  fi
  if $started_here; then bash hack/controlplane/stop.sh; fi
}
trap cleanup EXIT
KUBECONFIG=$(bash hack/controlplane/start.sh)
export KUBECONFIG OPERATOR_RUST_LOG=${OPERATOR_RUST_LOG:-info}
mkdir -p .cache/bench

# Starts the real Medplum with its rate limits on or off (restarted if it runs with the other).
real_medplum() {
  MEDPLUM_RATE_LIMITS=$1 bash hack/real-medplum.sh start 2>/dev/null
}

# The operator measured is the static musl binary the container image ships (its allocator, above
# all, differs from glibc's); the harness and the test server are ordinary release builds.
rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || true
cargo build --release --tests --bins --quiet
# OPERATOR_BINARY, when set, measures that binary instead (another revision's, to compare before/after).
if [[ -z ${OPERATOR_BINARY:-} ]]; then
  cargo build --profile dist --quiet --target x86_64-unknown-linux-musl --bin medplum-operator
  export OPERATOR_BINARY=$root/target/x86_64-unknown-linux-musl/dist/medplum-operator
fi
if [[ ${BENCH_IMAGE:-} == 1 ]]; then
  OPERATOR_IMAGE=$(bash hack/image.sh | awk '{print $1}')
  export OPERATOR_IMAGE
  echo "bench.sh: the operator runs from the image $OPERATOR_IMAGE" >&2
fi
for target in "${targets[@]}"; do
  [[ $target == real-limits || $target == rotate ]] && limits_changed=true
  echo "bench.sh: $target (BENCH_CLIENTS=${BENCH_CLIENTS:-1000})" >&2
  (
    unset MEDPLUM_TEST_BASE_URL MEDPLUM_TEST_CLIENT_ID MEDPLUM_TEST_CLIENT_SECRET BENCH_RATE_LIMITS
    test=bench_converge_against_the_floor
    case $target in
      real | real-limits)
        limits=off
        [[ $target == real-limits ]] && limits=on && export BENCH_RATE_LIMITS=on
        while IFS='=' read -r key value; do export "$key=$value"; done < <(real_medplum "$limits")
        ;;
      memory) test=bench_memory_at_ten_thousand_objects ;;
      rotate)
        test=bench_rotate_everything
        export BENCH_RATE_LIMITS=on
        while IFS='=' read -r key value; do export "$key=$value"; done < <(real_medplum on)
        ;;
    esac
    cargo test --release --test e2e --quiet -- --ignored --nocapture --exact "bench::$test"
  ) 2>&1 | tee ".cache/bench/$target.log"
done
for target in "${targets[@]}"; do
  echo "bench.sh: $target"
  grep '^figure:' ".cache/bench/$target.log" | sed 's/^figure: /  /' || true
done
