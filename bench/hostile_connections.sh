#!/usr/bin/env bash
# Connections that hold their slots, and /healthz latency meanwhile.
#
#   bench/hostile_connections.sh MODE [N] [SECONDS]
#
# MODE (see bench/hostile_connections.py):
#   tls-keepalive      N (default 300) stalled kept-alive HTTPS connections to the API
#                      (a self-signed certificate made with openssl), max_connections 300
#   trickle            N (default 320) connections from one address, each completing a
#                      trickled request every ~14 s, max_connections 300
#   metrics            N (default 1000) stalled kept-alive connections to the metrics
#                      listener, the server under `ulimit -n 1024`
# Starts target/debug/wxauth (or $WXAUTH) with the built-in mock and a temporary data
# directory, runs the attack for SECONDS (default 40), then stops it. Not part of CI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WXAUTH=${WXAUTH:-$ROOT/target/debug/wxauth}
[[ -x $WXAUTH ]] || { echo "no binary at $WXAUTH: cargo build first" >&2; exit 1; }
MODE=${1:?usage: bench/hostile_connections.sh tls-keepalive|trickle|metrics [N] [SECONDS]}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-hostile.XXXXXX")
: >"$WORK/empty.toml"
PID=""
cleanup() {
    [[ -n $PID ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ENV=(WXAUTH_SERVER__BIND=127.0.0.1:0 WXAUTH_STORAGE__PATH="$WORK/data" WXAUTH_WECHAT__MOCK=true
    WXAUTH_METRICS__BIND= RUST_LOG=warn,wxauth::startup=info)
ULIMIT=8192 TLS=0
case $MODE in
tls-keepalive)
    N=${2:-300}
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    ENV+=(WXAUTH_SERVER__TLS__CERT="$WORK/cert.pem" WXAUTH_SERVER__TLS__KEY="$WORK/key.pem"
        WXAUTH_SERVER__MAX_CONNECTIONS=300)
    TLS=1 ;;
trickle)
    N=${2:-320}
    ENV+=(WXAUTH_SERVER__MAX_CONNECTIONS=300) ;;
metrics)
    N=${2:-1000}
    ENV+=(WXAUTH_METRICS__BIND=127.0.0.1:0)
    ULIMIT=1024 ;;
*) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
(cd "$WORK" && exec env "${ENV[@]}" \
    bash -c 'ulimit -n "$2"; exec "$0" --config "$1" serve' "$WXAUTH" "$WORK/empty.toml" "$ULIMIT") \
    >"$WORK/server.log" 2>&1 &
PID=$!
until line=$(grep -m1 'listening address=' "$WORK/server.log" 2>/dev/null); do
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.05
done
API=$(sed -n 's/.*address=\(127\.0\.0\.1:[0-9]*\).*/\1/p' <<<"$line")
TARGET=$API
if [[ $MODE == metrics ]]; then
    until m=$(grep -m1 'serving metrics address=' "$WORK/server.log" 2>/dev/null); do sleep 0.05; done
    TARGET=$(sed -n 's/.*address=\(127\.0\.0\.1:[0-9]*\).*/\1/p' <<<"$m")
fi
PYMODE=stalled-keepalive
[[ $MODE == trickle ]] && PYMODE=trickle
python3 "$ROOT/bench/hostile_connections.py" "$PYMODE" "$API" "$TARGET" "$N" "${3:-40}" "$TLS"
