#!/usr/bin/env bash
# wxauth benchmark suite: one command, one table.
#
#   bench/run.sh
#
# Builds release, starts wxauth (and a mock WeChat server) on free loopback ports
# with temporary data directories, runs each scenario with wrk, stops everything
# it started, and prints one table (plus the scale figures and the targets).
# See docs/BENCHMARKS.md for what each scenario measures and what limits it.
#
# Knobs (environment):
#   BENCH_DURATION=10s      measured run per scenario
#   BENCH_WARMUP=2s         unmeasured run before each scenario (0 to skip)
#   BENCH_CONNECTIONS=64    connections per scenario
#   BENCH_THREADS=2         wrk threads (refresh uses one thread per connection)
#   BENCH_SCALE_USERS=1000000  users in the data directory of the scale runs (0 skips)
#   BENCH_SERVER_ENV="WXAUTH_STORAGE__CACHE_CAPACITY=32MiB ..."
#                           extra VAR=VALUE settings for every wxauth started
#   BENCH_KEEP=1            keep the temporary directory (logs, wrk outputs)
#   BENCH_WXAUTH=PATH       measure that wxauth binary (e.g. an older commit's release
#                           build) instead of this tree's; the examples are still built
#
# Not part of CI: it needs the whole machine for a few minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE_USERS=${BENCH_SCALE_USERS:-1000000}
read -r -a SERVER_ENV <<<"${BENCH_SERVER_ENV:-}"
BASE_USERS=1000

LOG_NAME=bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

bench_tools
bench_build

bench_describe

bench_workdir

post_json() { # PORT PATH JSON
    curl -sS --max-time 10 -X POST "http://127.0.0.1:$1$2" \
        -H 'Content-Type: application/json' -d "$3"
}
json_str() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

WRK=(--latency --timeout 5s)
LOGIN=/api/weixin/login/

# ---- 1. the built-in mock: server cost only. 1,000 users to start with.
log "populating $BASE_USERS users (built-in mock)"
"$POPULATE" "$WORK/data-mock" "$BASE_USERS" 2>>"$WORK/populate.log"
start_server mock "$WORK/data-mock" WXAUTH_WECHAT__MOCK=true
PID=$SERVER_PID
URL=http://127.0.0.1:$SERVER_PORT
STARTUP_BASE_MS=$SERVER_STARTUP_MS

ACCESS=$(post_json "$SERVER_PORT" $LOGIN '{"code":"s0.data"}' | json_str access)
[[ -n $ACCESS ]] || die "could not log in to get an access token"

scenario healthz "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" -s "$(lua report)" "$URL/healthz"
scenario data "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" -s "$(lua report)" \
    -H "Authorization: Bearer $ACCESS" "$URL/api/weixin/data/"
scenario "login-returning (mock)" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
    -s "$(lua login)" "$URL$LOGIN" -- returning @TAG@ "$BASE_USERS"
scenario "login-new (mock)" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
    -s "$(lua login)" "$URL$LOGIN" -- new @TAG@

# refresh: every connection chains its own tokens, seeded by fresh logins
# (one set for the warm-up, one for the measured run).
TOKENS=$WORK/refresh_tokens.txt
: >"$TOKENS"
for ((i = 0; i < 2 * CONNS; i++)); do
    token=$(post_json "$SERVER_PORT" $LOGIN "{\"code\":\"r$i.seed\"}" | json_str refresh)
    echo "$token" >>"$TOKENS"
done
[[ $(grep -c . "$TOKENS") == $((2 * CONNS)) ]] || die "could not seed $((2 * CONNS)) refresh tokens"
if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
    log "refresh: warm-up $WARMUP"
    run_wrk "refresh (warm-up)" "$PID" "${WRK[@]}" -d "$WARMUP" -t "$CONNS" -c "$CONNS" \
        -s "$(lua refresh)" "$URL/api/token/refresh/" -- "$TOKENS" 0
fi
log "refresh: $DURATION"
run_wrk refresh "$PID" "${WRK[@]}" -d "$DURATION" -t "$CONNS" -c "$CONNS" \
    -s "$(lua refresh)" "$URL/api/token/refresh/" -- "$TOKENS" "$CONNS"
ORDER+=(refresh)
log "refresh: ${RPS[refresh]} req/s, p99 ${P99[refresh]} us, errors ${ERRS[refresh]}"

RSS_BASE_KIB=$(rss_kib "$PID" VmRSS)
stop_pid "$PID"

# ---- 2. the real HTTP client (ureq) against mock_wechat on loopback.
(exec "$MOCK_WECHAT" 127.0.0.1:0 wxbench benchsecret 1) >"$WORK/mock_wechat.log" 2>&1 &
MOCK_PID=$!
STARTED+=("$MOCK_PID")
wait_listening mock_wechat "$MOCK_PID" "$WORK/mock_wechat.log"
MOCK_PORT=$LISTEN_PORT
log "mock_wechat listening on 127.0.0.1:$MOCK_PORT (pid $MOCK_PID)"

log "populating $BASE_USERS users (mock_wechat)"
"$POPULATE" "$WORK/data-http" "$BASE_USERS" wxbench o- 2>>"$WORK/populate.log"
start_server http "$WORK/data-http" WXAUTH_WECHAT__MOCK=false \
    WXAUTH_WECHAT__APPID=wxbench WXAUTH_WECHAT__SECRET=benchsecret \
    WXAUTH_WECHAT__API_BASE="http://127.0.0.1:$MOCK_PORT"
PID=$SERVER_PID
URL=http://127.0.0.1:$SERVER_PORT
scenario "login-returning (http)" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
    -s "$(lua login)" "$URL$LOGIN" -- returning @TAG@ "$BASE_USERS"
scenario "login-new (http)" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
    -s "$(lua login)" "$URL$LOGIN" -- new @TAG@
stop_pid "$PID"
stop_pid "$MOCK_PID"
MOCK_PID=""

# ---- 3. scale: a data directory with SCALE_USERS users, built-in mock.
if ((SCALE_USERS > 0)); then
    log "populating $SCALE_USERS users (takes a while)"
    t0=$SECONDS
    "$POPULATE" "$WORK/data-scale" "$SCALE_USERS" 2>>"$WORK/populate.log"
    POPULATE_S=$((SECONDS - t0))
    DU_BEFORE=$(du -sb "$WORK/data-scale" | cut -f1)
    start_server scale "$WORK/data-scale" WXAUTH_WECHAT__MOCK=true
    PID=$SERVER_PID
    URL=http://127.0.0.1:$SERVER_PORT
    STARTUP_SCALE_MS=$SERVER_STARTUP_MS
    RSS_START_KIB=$(rss_kib "$PID" VmRSS)
    scenario "login-returning @scale" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
        -s "$(lua login)" "$URL$LOGIN" -- returning @TAG@ "$SCALE_USERS"
    scenario "login-new @scale" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
        -s "$(lua login)" "$URL$LOGIN" -- new @TAG@
    RSS_SCALE_KIB=$(rss_kib "$PID" VmRSS)
    HWM_SCALE_KIB=$(rss_kib "$PID" VmHWM)
    stop_pid "$PID"
    DU_AFTER=$(du -sb "$WORK/data-scale" | cut -f1)
fi

# ---------------------------------------------------------------- the table
HEALTHZ=${RPS[healthz]}
TOTAL_ERRORS=0
x_healthz() { # SCENARIO: its server CPU per request as a multiple of /healthz's
    awk -v a="${SUS[$1]}" -v b="${SUS[healthz]}" 'BEGIN {printf "%.1f", (b > 0 ? a / b : 0)}'
}
{
    echo
    echo "wxauth benchmark  $(date -u +%Y-%m-%dT%H:%MZ)  commit $COMMIT  $(nproc) cores," \
        "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load average at start $LOAD_AT_START"
    echo "${DURATION} per scenario after a ${WARMUP} warm-up, $CONNS connections ($THREADS wrk threads; refresh: $CONNS)"
    [[ -z ${BENCH_SERVER_ENV:-} ]] || echo "server settings: $BENCH_SERVER_ENV"
    echo
    # "server µs/req" is written out: printf pads by bytes, and µ takes two.
    # "× healthz": the scenario's server CPU per request over /healthz's, same run: a
    # figure that stays put while the machine's speed moves from day to day.
    printf '| %-24s | %8s | %9s | %9s | %6s | %9s | %10s | server µs/req | × healthz | %8s | %9s |\n' \
        scenario "req/s" p50 p99 errors "/healthz" "server CPU" "wrk CPU" "mock CPU"
    printf '|%s|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|\n' \
        "$(printf -- '-%.0s' {1..26})" "$(printf -- '-%.0s' {1..9})" \
        "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..7})" "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..14})" \
        "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..9})" "$(printf -- '-%.0s' {1..10})"
    for name in "${ORDER[@]}"; do
        ratio=$(awk -v a="${RPS[$name]}" -v b="$HEALTHZ" 'BEGIN {printf "%.2f", a / b}')
        mock=${MCPU[$name]}
        [[ $name == *"(http)"* ]] || mock="-"
        printf '| %-24s | %8s | %9s | %9s | %6s | %9s | %10s | %13s | %9s | %8s | %9s |\n' \
            "$name" "${RPS[$name]}" "$(ms "${P50[$name]}")" "$(ms "${P99[$name]}")" \
            "${ERRS[$name]}" "$ratio" "${SCPU[$name]}" "$(us1 "${SUS[$name]}")" \
            "$(x_healthz "$name")×" "${WCPU[$name]}" "$mock"
        errors=${ERRS[$name]}
        TOTAL_ERRORS=$((TOTAL_ERRORS + errors))
    done
    echo
    echo "CPU columns are cores busy (of $(nproc)); @scale = $SCALE_USERS users in the data directory."
    echo "start-up with $BASE_USERS users: ${STARTUP_BASE_MS} ms; resident memory after its runs: $(mib "$RSS_BASE_KIB")"
    if ((SCALE_USERS > 0)); then
        echo "scale, $SCALE_USERS users: populate ${POPULATE_S} s; data directory $(mib $((DU_BEFORE / 1024))) (after the runs $(mib $((DU_AFTER / 1024))));" \
            "start-up ${STARTUP_SCALE_MS} ms; resident memory $(mib "$RSS_START_KIB") after start-up," \
            "$(mib "$RSS_SCALE_KIB") after the runs (peak $(mib "$HWM_SCALE_KIB"))"
    fi
    echo
    echo "targets:"
    check() { # LABEL VALUE OP LIMIT
        local ok
        ok=$(awk -v v="$2" -v l="$4" -v op="$3" 'BEGIN {
            print (op == ">=" ? v >= l : op == "<=" ? v <= l : v < l) ? "met" : "MISSED" }')
        printf '  %-50s %10s  (%s %s)  %s\n' "$1" "$2" "$3" "$4" "$ok"
    }
    check "data / healthz (same run)" "$(awk -v a="${RPS[data]}" -v b="$HEALTHZ" 'BEGIN {printf "%.2f", a / b}')" ">=" 0.75
    check "login-new (http) req/s, every creation fsync'd" "${RPS[login-new (http)]}" ">=" 10000
    check "login-returning (http) > login-new (http)" "${RPS[login-returning (http)]}" ">=" "${RPS[login-new (http)]}"
    check "refresh req/s, durable rotation" "${RPS[refresh]}" ">=" 8000
    # Server CPU per request: steadier than req/s on a shared machine.
    check "login-new (http) server CPU us/req" "$(us1 "${SUS[login-new (http)]}")" "<=" 120
    check "login-returning (http) server CPU us/req" "$(us1 "${SUS[login-returning (http)]}")" "<=" 90
    check "refresh server CPU us/req, durable rotation" "$(us1 "${SUS[refresh]}")" "<=" 60
    check "data server CPU us/req" "$(us1 "${SUS[data]}")" "<=" 9
    # The same, as multiples of /healthz's server CPU per request in this run.
    check "refresh server CPU × healthz, durable rotation" "$(x_healthz refresh)" "<=" 4
    check "login-returning (http) server CPU × healthz" "$(x_healthz "login-returning (http)")" "<=" 8
    check "login-new (http) server CPU × healthz" "$(x_healthz "login-new (http)")" "<=" 10
    check "data / healthz server CPU us/req (same run)" \
        "$(awk -v a="${SUS[data]}" -v b="${SUS[healthz]}" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}')" "<=" 1.5
    worst=0
    for name in "${ORDER[@]}"; do
        p99=${P99[$name]}
        ((p99 > worst)) && worst=$p99
    done
    check "worst p99 of any scenario (ms)" "$(awk -v u="$worst" 'BEGIN {printf "%.2f", u / 1000}')" "<" 10
    if ((SCALE_USERS > 0)); then
        check "login-returning p99 @scale / @$BASE_USERS users" \
            "$(awk -v a="${P99[login-returning @scale]}" -v b="${P99[login-returning (mock)]}" 'BEGIN {printf "%.2f", a / b}')" "<" 1.5
        check "login-new p99 @scale / @$BASE_USERS users" \
            "$(awk -v a="${P99[login-new @scale]}" -v b="${P99[login-new (mock)]}" 'BEGIN {printf "%.2f", a / b}')" "<" 1.5
        check "peak resident memory @scale (MiB)" "$(awk -v k="$HWM_SCALE_KIB" 'BEGIN {printf "%.0f", k / 1024}')" "<" 256
        check "start-up @scale (ms)" "$STARTUP_SCALE_MS" "<" 1000
    fi
}
if ((TOTAL_ERRORS > 0)); then
    log "$TOTAL_ERRORS requests failed: these numbers are not valid (see the .out files with BENCH_KEEP=1)"
    exit 1
fi
