#!/usr/bin/env bash
# A real Medplum 5.1.29 for the integration suite and hack/dev.sh, from the kit in
# ../shared/medplum-server (or $MEDPLUM_KIT), with its own PostgreSQL and Redis.
#
#   hack/real-medplum.sh start   starts it (or finds it running) and prints MEDPLUM_TEST_BASE_URL,
#                                MEDPLUM_TEST_CLIENT_ID and MEDPLUM_TEST_CLIENT_SECRET (a super-admin client)
#   hack/real-medplum.sh stop    stops it; the data stays for the next start
#   hack/real-medplum.sh status  exit 0 if it is running and healthy
#   hack/real-medplum.sh outage server|postgres|redis
#                                stops that one part (by its PID file), as an outage would; `start`
#                                brings it back
#
# State (database, Node, npm install, logs) lives in $MEDPLUM_STATE_DIR, default
# /var/tmp/medplum-operator-medplum: outside the checkout, so a fresh clone reuses a warm install
# (about 20 s) instead of a cold one (about 3 minutes), and short enough for PostgreSQL's socket path.
# MEDPLUM_RATE_LIMITS=on starts it with Medplum's production rate limits (see the kit's README); a
# server running with the other setting is restarted.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

kit=${MEDPLUM_KIT:-}
if [[ -z $kit ]]; then
  for candidate in "$root/../shared/medplum-server" /work/shared/medplum-server; do
    if [[ -x $candidate/start.sh ]]; then
      kit=$(cd "$candidate" && pwd)
      break
    fi
  done
fi
[[ -n $kit && -x $kit/start.sh ]] || {
  echo "real-medplum.sh: no Medplum kit found; set MEDPLUM_KIT to the folder of its start.sh" >&2
  exit 1
}
export MEDPLUM_STATE_DIR=${MEDPLUM_STATE_DIR:-/var/tmp/medplum-operator-medplum}
# Keep npm's download cache beside the state, so that a cold install after `rm -rf` of the state
# does not download everything again.
export npm_config_cache=${npm_config_cache:-${MEDPLUM_STATE_DIR}-npm-cache}

# Whether the server in the state folder was configured with rate limits (the kit applies
# MEDPLUM_RATE_LIMITS only when it starts the server).
limits_configured() {
  python3 -c 'import json, sys; print("on" if json.load(open(sys.argv[1])).get("rateLimitsEnabled") else "off")' \
    "$MEDPLUM_STATE_DIR/medplum.config.json" 2>/dev/null || echo none
}

case ${1:-} in
  start)
    # A server running with the other rate limit setting is restarted with the one asked for.
    wanted=off
    [[ ${MEDPLUM_RATE_LIMITS:-off} =~ ^(on|true|1|yes)$ ]] && wanted=on
    configured=$(limits_configured)
    if [[ $configured != none && $configured != "$wanted" ]]; then
      echo "real-medplum.sh: restarting Medplum with its rate limits $wanted" >&2
      bash "$kit/stop.sh" >/dev/null 2>&1 || true
    fi
    MEDPLUM_RATE_LIMITS=$wanted exec bash "$kit/start.sh"
    ;;
  stop) exec bash "$kit/stop.sh" ;;
  outage)
    case ${2:-} in
      server) pid=$(cat "$MEDPLUM_STATE_DIR/run/medplum-server.pid") signal=TERM ;;
      postgres) pid=$(head -1 "$MEDPLUM_STATE_DIR/pg/data/postmaster.pid") signal=INT ;; # fast shutdown
      redis) pid=$(cat "$MEDPLUM_STATE_DIR/redis/redis.pid") signal=TERM ;;
      *) echo "usage: hack/real-medplum.sh outage server|postgres|redis" >&2; exit 2 ;;
    esac
    kill "-$signal" "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
    echo "real-medplum.sh: $2 (pid $pid) did not stop within 30 s" >&2
    exit 1
    ;;
  status)
    base=$(sed -n 's/^MEDPLUM_TEST_BASE_URL=//p' "$MEDPLUM_STATE_DIR/env" 2>/dev/null)
    [[ -n $base ]] && curl -sf --max-time 5 "$base/healthcheck" >/dev/null
    ;;
  *) echo "usage: hack/real-medplum.sh start|stop|status|outage PART" >&2; exit 2 ;;
esac
