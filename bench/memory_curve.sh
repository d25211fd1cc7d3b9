#!/usr/bin/env bash
# Memory against storage.cache_capacity at scale: one command, one table.
#
#   bench/memory_curve.sh
#
# Builds release (like bench/run.sh), populates MEMCURVE_USERS users once
# (examples/populate.rs), then for each capacity runs a wxauth (built-in mock)
# with that storage.cache_capacity on a fresh copy of that data directory, so
# every capacity sees the same data, and the two @scale scenarios of run.sh:
# login-returning over all users, then login-new. It records the resident memory
# after start-up and its peak (VmHWM) after the runs, req/s, p50/p99 and server CPU
# per request of each scenario, and prints one markdown table.
#
# Knobs (environment):
#   MEMCURVE_USERS=1000000   users in the data directory
#   MEMCURVE_CAPACITIES="8MiB 16MiB 32MiB 48MiB 64MiB"
#                            storage.cache_capacity of each row
#   MEMCURVE_SERVER_ENV="MALLOC_ARENA_MAX=2 ..."
#                            extra VAR=VALUE settings for every wxauth started
#   BENCH_DURATION, BENCH_WARMUP, BENCH_CONNECTIONS, BENCH_THREADS, BENCH_KEEP
#                            as in bench/run.sh
#
# Not part of CI: it needs the whole machine for a few minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USERS=${MEMCURVE_USERS:-1000000}
read -r -a CAPACITIES <<<"${MEMCURVE_CAPACITIES:-8MiB 16MiB 32MiB 48MiB 64MiB}"
read -r -a SERVER_ENV <<<"${MEMCURVE_SERVER_ENV:-}"
((${#CAPACITIES[@]})) || { echo "memcurve: error: MEMCURVE_CAPACITIES is empty" >&2; exit 1; }

LOG_NAME=memcurve
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

bench_tools
bench_build

bench_describe

bench_workdir

WRK=(--latency --timeout 5s)
LOGIN=/api/weixin/login/

log "populating $USERS users (built-in mock; takes a while)"
t0=$SECONDS
"$POPULATE" "$WORK/data-populated" "$USERS" 2>>"$WORK/populate.log"
POPULATE_S=$((SECONDS - t0))
DU_POPULATED=$(du -sb "$WORK/data-populated" | cut -f1)

declare -A STARTUP RSS_START RSS_END HWM THREADS_END
for cap in "${CAPACITIES[@]}"; do
    dir=$WORK/data-$cap
    rm -rf "$dir"
    cp -a "$WORK/data-populated" "$dir"
    start_server "scale-$cap" "$dir" WXAUTH_WECHAT__MOCK=true WXAUTH_STORAGE__CACHE_CAPACITY="$cap"
    PID=$SERVER_PID
    URL=http://127.0.0.1:$SERVER_PORT
    STARTUP[$cap]=$SERVER_STARTUP_MS
    RSS_START[$cap]=$(rss_kib "$PID" VmRSS)
    scenario "login-returning $cap" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
        -s "$(lua login)" "$URL$LOGIN" -- returning @TAG@ "$USERS"
    scenario "login-new $cap" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
        -s "$(lua login)" "$URL$LOGIN" -- new @TAG@
    RSS_END[$cap]=$(rss_kib "$PID" VmRSS)
    HWM[$cap]=$(rss_kib "$PID" VmHWM)
    THREADS_END[$cap]=$(rss_kib "$PID" Threads)
    [[ ${BENCH_KEEP:-0} != 1 ]] || cp "/proc/$PID/smaps_rollup" "$WORK/smaps_rollup-$cap.txt"
    stop_pid "$PID"
    log "$cap: resident $(mib "${RSS_START[$cap]}") after start-up, peak $(mib "${HWM[$cap]}")"
    [[ ${BENCH_KEEP:-0} == 1 ]] || rm -rf "$dir"
done

# ---------------------------------------------------------------- the table
TOTAL_ERRORS=0
{
    echo
    echo "wxauth memory curve  $(date -u +%Y-%m-%dT%H:%MZ)  commit $COMMIT  $(nproc) cores," \
        "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load average at start $LOAD_AT_START"
    echo "$USERS users (populated in ${POPULATE_S} s, $(mib $((DU_POPULATED / 1024))) on disk), a fresh copy per row;" \
        "${DURATION} per scenario after a ${WARMUP} warm-up, $CONNS connections ($THREADS wrk threads)"
    [[ -z ${MEMCURVE_SERVER_ENV:-} ]] || echo "server settings: $MEMCURVE_SERVER_ENV"
    echo
    # The µ headers are written out: printf pads by bytes, and µ takes two.
    printf '| %-14s | %8s | %9s | %9s | %7s | %8s | %9s | %9s | returning µs/req | %8s | %9s | %9s | new µs/req | %6s |\n' \
        cache_capacity start-up "RSS start" "peak RSS" threads \
        "ret. r/s" "ret. p50" "ret. p99" "new r/s" "new p50" "new p99" errors
    printf '|%s|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|\n' \
        "$(printf -- '-%.0s' {1..16})" "$(printf -- '-%.0s' {1..9})" \
        "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..8})" "$(printf -- '-%.0s' {1..9})" \
        "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..17})" "$(printf -- '-%.0s' {1..9})" \
        "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..7})"
    for cap in "${CAPACITIES[@]}"; do
        ret="login-returning $cap" new="login-new $cap"
        errors_ret=${ERRS[$ret]} errors_new=${ERRS[$new]}
        errors=$((errors_ret + errors_new))
        TOTAL_ERRORS=$((TOTAL_ERRORS + errors))
        printf '| %-14s | %8s | %9s | %9s | %7s | %8s | %9s | %9s | %16s | %8s | %9s | %9s | %10s | %6s |\n' \
            "$cap" "${STARTUP[$cap]} ms" "$(mib "${RSS_START[$cap]}")" "$(mib "${HWM[$cap]}")" \
            "${THREADS_END[$cap]}" \
            "${RPS[$ret]}" "$(ms "${P50[$ret]}")" "$(ms "${P99[$ret]}")" "$(us1 "${SUS[$ret]}")" \
            "${RPS[$new]}" "$(ms "${P50[$new]}")" "$(ms "${P99[$new]}")" "$(us1 "${SUS[$new]}")" \
            "$errors"
    done
    echo
    echo "start-up: exec → the listening log line; RSS start: VmRSS after start-up; peak RSS: VmHWM after both"
    echo "scenarios; threads: the server's after the runs; µs/req: server CPU (user + system) per request."
}
if ((TOTAL_ERRORS > 0)); then
    log "$TOTAL_ERRORS requests failed: these numbers are not valid (see the .out files with BENCH_KEEP=1)"
    exit 1
fi
