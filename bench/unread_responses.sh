#!/usr/bin/env bash
# Clients that pipeline requests and never read the answers: the server's resident
# memory before, during and after.
#
#   bench/unread_responses.sh [N] [PIPELINED] [AFTER]   (defaults: 1000, 200, 60 s)
#
# ROUNDS=n repeats the attack n times against the same server (whether memory is
# reused); BENCH_ENV="VAR=value ..." is added to the server's environment.
#
# Starts target/debug/wxauth (or $WXAUTH) with the built-in mock, a temporary data
# directory and `ulimit -n 8192`, runs bench/unread_responses.py against it, then
# stops it. Not part of CI.
set -euo pipefail
# shellcheck source=bench/local_server.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_server.sh"
# shellcheck disable=SC2086 # BENCH_ENV is a list of VAR=value words
local_server unread 8192 ${BENCH_ENV:-}
for round in $(seq "${ROUNDS:-1}"); do
    [[ ${ROUNDS:-1} -gt 1 ]] && echo "round $round"
    python3 "$ROOT/bench/unread_responses.py" "$ADDR" "$PID" "${1:-1000}" "${2:-200}" "${3:-60}"
done
