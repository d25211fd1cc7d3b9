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
# shellcheck source=bench/local_server.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_server.sh"
MODE=${1:?usage: bench/hostile_connections.sh tls-keepalive|trickle|metrics [N] [SECONDS]}
ENV=() ULIMIT=8192 TLS=0 CERTS=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-certs.XXXXXX")
case $MODE in
tls-keepalive)
    N=${2:-300}
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=localhost -keyout "$CERTS/key.pem" -out "$CERTS/cert.pem" 2>/dev/null
    ENV+=(WXAUTH_SERVER__TLS__CERT="$CERTS/cert.pem" WXAUTH_SERVER__TLS__KEY="$CERTS/key.pem"
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
local_server hostile "$ULIMIT" "${ENV[@]}"
rm -rf "$CERTS" # read at start
API=$ADDR TARGET=$ADDR
if [[ $MODE == metrics ]]; then
    until m=$(grep -m1 'serving metrics address=' "$WORK/server.log" 2>/dev/null); do sleep 0.05; done
    TARGET=$(sed -n 's/.*address=\(127\.0\.0\.1:[0-9]*\).*/\1/p' <<<"$m")
fi
PYMODE=stalled-keepalive
[[ $MODE == trickle ]] && PYMODE=trickle
python3 "$ROOT/bench/hostile_connections.py" "$PYMODE" "$API" "$TARGET" "$N" "${3:-40}" "$TLS"
