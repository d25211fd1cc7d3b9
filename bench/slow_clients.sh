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
# shellcheck source=bench/local_server.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_server.sh"
local_server slow "${SLOW_ULIMIT:-1024}" WXAUTH_SERVER__MAX_CONNECTIONS_PER_IP="${SLOW_PER_IP:-1000000}"
grep -E 'open-file|max_connections|connection limits' "$WORK/server.log" | sed 's/^/server log: /' || true
status=0
python3 "$ROOT/bench/slow_clients.py" "$ADDR" "${1:-2000}" "${2:-30}" "$PID" || status=$?
exit $status
