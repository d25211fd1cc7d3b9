#!/usr/bin/env bash
# Two wxauth binaries, one scenario, alternating: what one change is worth.
#
#   bench/ab.sh SCENARIO BINARY_A BINARY_B [ROUNDS]
#
# SCENARIO: login-new, login-returning, refresh or data. Each round starts each
# binary in turn on a fresh data directory (1,000 users from examples/populate)
# with the real WeChat client against examples/mock_wechat on loopback, the server
# settings of bench/run.sh, and runs the scenario (bench/run.sh's Lua scripts and
# wrk arguments; BENCH_DURATION, BENCH_WARMUP, BENCH_CONNECTIONS, BENCH_THREADS),
# then prints one line per run: req/s, p99 and server CPU per request. ROUNDS
# defaults to 2. Build the binaries first (e.g. `cargo build --release` at each
# commit, copying target/release/wxauth aside).
#
# Not part of CI: it needs the whole machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
(($# >= 3)) || { echo "usage: bench/ab.sh SCENARIO BINARY_A BINARY_B [ROUNDS]" >&2; exit 2; }
SCENARIO=$1
BINARIES=("$(realpath "$2")" "$(realpath "$3")")
ROUNDS=${4:-2}
SERVER_ENV=()

LOG_NAME=ab
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

bench_tools
bench_build # populate and mock_wechat; the binaries under test are the arguments
for bin in "${BINARIES[@]}"; do [[ -x $bin ]] || die "$bin is not an executable"; done
bench_workdir

declare -A RPS P50 P99 ERRS SCPU SUS WCPU MCPU
LABELS=(A B)
(exec "$MOCK_WECHAT" 127.0.0.1:0 wxbench benchsecret 1) >"$WORK/mock_wechat.log" 2>&1 &
MOCK_PID=$!
STARTED+=("$MOCK_PID")
wait_listening mock_wechat "$MOCK_PID" "$WORK/mock_wechat.log"
MOCK_PORT=$LISTEN_PORT

WRK=(--latency --timeout 5s)
LOGIN=/api/weixin/login/
post_json() { # PORT PATH JSON
    curl -sS --max-time 10 -X POST "http://127.0.0.1:$1$2" \
        -H 'Content-Type: application/json' -d "$3"
}
json_str() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

for ((round = 1; round <= ROUNDS; round++)); do
    for side in 0 1; do
        name="$SCENARIO r$round ${LABELS[$side]}"
        dir=$WORK/data-$round-$side
        "$POPULATE" "$dir" 1000 wxbench o- 2>>"$WORK/populate.log"
        WXAUTH=${BINARIES[$side]}
        start_server "run-$round-$side" "$dir" WXAUTH_WECHAT__MOCK=false \
            WXAUTH_WECHAT__APPID=wxbench WXAUTH_WECHAT__SECRET=benchsecret \
            WXAUTH_WECHAT__API_BASE="http://127.0.0.1:$MOCK_PORT"
        URL=http://127.0.0.1:$SERVER_PORT
        case $SCENARIO in
        login-new)
            scenario "$name" "$SERVER_PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
                -s "$(lua login)" "$URL$LOGIN" -- new @TAG@
            ;;
        login-returning)
            scenario "$name" "$SERVER_PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
                -s "$(lua login)" "$URL$LOGIN" -- returning @TAG@ 1000
            ;;
        data)
            access=$(post_json "$SERVER_PORT" $LOGIN '{"code":"s0.data"}' | json_str access)
            [[ -n $access ]] || die "could not log in"
            scenario "$name" "$SERVER_PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
                -s "$(lua report)" -H "Authorization: Bearer $access" "$URL/api/weixin/data/"
            ;;
        refresh) # as in bench/run.sh: one chain of tokens per connection
            tokens=$WORK/tokens-$round-$side.txt
            for ((i = 0; i < CONNS; i++)); do
                post_json "$SERVER_PORT" $LOGIN "{\"code\":\"r$i.seed\"}" | json_str refresh
                echo
            done >"$tokens"
            run_wrk "$name" "$SERVER_PID" "${WRK[@]}" -d "$DURATION" -t "$CONNS" -c "$CONNS" \
                -s "$(lua refresh)" "$URL/api/token/refresh/" -- "$tokens" 0
            ;;
        *) die "unknown scenario $SCENARIO (login-new, login-returning, refresh, data)" ;;
        esac
        stop_pid "$SERVER_PID"
        printf '%-28s %8s req/s  p99 %9s  errors %s  server %s us/req  (%s)\n' "$name" \
            "${RPS[$name]}" "$(ms "${P99[$name]}")" "${ERRS[$name]}" "${SUS[$name]}" \
            "${BINARIES[$side]}"
    done
done
