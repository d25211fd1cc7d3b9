#!/usr/bin/env bash
# Clients that pipeline requests and never read the answers: the server's resident
# memory before, during and after.
#
#   bench/unread_responses.sh [N] [PIPELINED] [AFTER]   (defaults: 1000, 200, 60 s)
#
# ROUNDS=n repeats the attack n times against the same server (whether memory is
# reused); BENCH_ENV="VAR=value ..." is added to the server's environment.
# Starts target/debug/wxauth (or $WXAUTH) with the built-in mock, a temporary data
# directory and `ulimit -n 8192`, runs bench/unread_responses.py against it, then
# stops it. Not part of CI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WXAUTH=${WXAUTH:-$ROOT/target/debug/wxauth}
[[ -x $WXAUTH ]] || { echo "no binary at $WXAUTH: cargo build first" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-unread.XXXXXX")
: >"$WORK/empty.toml"
PID=""
cleanup() {
    [[ -n $PID ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
(cd "$WORK" && exec env ${BENCH_ENV:-} WXAUTH_SERVER__BIND=127.0.0.1:0 WXAUTH_STORAGE__PATH="$WORK/data" \
    WXAUTH_WECHAT__MOCK=true WXAUTH_METRICS__BIND= RUST_LOG=warn,wxauth::startup=debug \
    bash -c 'ulimit -n 8192; exec "$0" --config "$1" serve' "$WXAUTH" "$WORK/empty.toml") \
    >"$WORK/server.log" 2>&1 &
PID=$!
until line=$(grep -m1 'listening address=' "$WORK/server.log" 2>/dev/null); do
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.05
done
ADDR=$(sed -n 's/.*address=\(127\.0\.0\.1:[0-9]*\).*/\1/p' <<<"$line")
for round in $(seq "${ROUNDS:-1}"); do
    [[ ${ROUNDS:-1} -gt 1 ]] && echo "round $round"
    python3 "$ROOT/bench/unread_responses.py" "$ADDR" "$PID" "${1:-1000}" "${2:-200}" "${3:-60}"
done
