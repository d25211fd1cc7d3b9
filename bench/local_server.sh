# shellcheck shell=bash
# Sourced by the attack scripts (slow_clients.sh, unread_responses.sh,
# hostile_connections.sh): one wxauth on loopback for them.
#
#   local_server NAME ULIMIT [VAR=value ...]
#
# Starts $WXAUTH (default target/debug/wxauth) with `ulimit -n ULIMIT` (soft and hard,
# so wxauth cannot raise it), the built-in mock, a temporary data directory ($WORK,
# removed on exit), no metrics listener and the given extra environment; waits until
# it listens. Sets PID, WORK and ADDR (the API's host:port); the server log is
# $WORK/server.log. The server is stopped on exit.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WXAUTH=${WXAUTH:-$ROOT/target/debug/wxauth}
PID=""
WORK=""

local_server_cleanup() {
    [[ -n $PID ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    [[ -n $WORK ]] && rm -rf "$WORK"
}

local_server() {
    local name=$1 nofile=$2 line
    shift 2
    [[ -x $WXAUTH ]] || { echo "no binary at $WXAUTH: cargo build first" >&2; exit 1; }
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-$name.XXXXXX")
    trap local_server_cleanup EXIT
    : >"$WORK/empty.toml"
    (cd "$WORK" && exec env WXAUTH_SERVER__BIND=127.0.0.1:0 WXAUTH_STORAGE__PATH="$WORK/data" \
        WXAUTH_WECHAT__MOCK=true WXAUTH_METRICS__BIND=off RUST_LOG=warn,wxauth::startup=debug "$@" \
        bash -c 'ulimit -n "$2"; exec "$0" --config "$1" serve' "$WXAUTH" "$WORK/empty.toml" "$nofile") \
        >"$WORK/server.log" 2>&1 &
    PID=$!
    until line=$(grep -m1 'listening address=' "$WORK/server.log" 2>/dev/null); do
        kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
        sleep 0.05
    done
    ADDR=$(sed -n 's/.*address=\(127\.0\.0\.1:[0-9]*\).*/\1/p' <<<"$line")
}
