#!/usr/bin/env bash
# Slow-body clients against wxauth started under a 1,024-descriptor limit.
#
#   bench/slow_clients.sh [N] [SECONDS]     (defaults: 2000 connections, 30 s)
#
# Starts target/debug/wxauth (or $WXAUTH) with `ulimit -n ${SLOW_ULIMIT:-1024}` (soft and hard, so
# wxauth cannot raise it), the built-in mock, a temporary data directory, and the
# default server.request_timeout (10s) unless WXAUTH_SERVER__REQUEST_TIMEOUT is set;
# runs bench/slow_clients.py against it, then stops it. Every client is 127.0.0.1,
# so server.max_connections_per_ip is lifted (SLOW_PER_IP sets it). Not part of CI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WXAUTH=${WXAUTH:-$ROOT/target/debug/wxauth}
[[ -x $WXAUTH ]] || { echo "no binary at $WXAUTH: cargo build first" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-slow.XXXXXX")
: >"$WORK/empty.toml"
PID=""
cleanup() {
    [[ -n $PID ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
(cd "$WORK" && exec env WXAUTH_SERVER__BIND=127.0.0.1:0 WXAUTH_STORAGE__PATH="$WORK/data" \
    WXAUTH_WECHAT__MOCK=true WXAUTH_METRICS__BIND= RUST_LOG=warn,wxauth::startup=debug \
    WXAUTH_SERVER__MAX_CONNECTIONS_PER_IP=${SLOW_PER_IP:-1000000} \
    bash -c 'ulimit -n "$2"; exec "$0" --config "$1" serve' "$WXAUTH" "$WORK/empty.toml" "${SLOW_ULIMIT:-1024}") \
    >"$WORK/server.log" 2>&1 &
PID=$!
until line=$(grep -m1 'listening address=' "$WORK/server.log" 2>/dev/null); do
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.05
done
ADDR=$(sed -n 's/.*address=\(127\.0\.0\.1:[0-9]*\).*/\1/p' <<<"$line")
grep -E 'open-file|max_connections|connection limits' "$WORK/server.log" | sed 's/^/server log: /' || true
status=0
python3 "$ROOT/bench/slow_clients.py" "$ADDR" "${1:-2000}" "${2:-30}" "$PID" || status=$?
exit $status
