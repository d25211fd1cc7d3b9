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
#
# Not part of CI: it needs the whole machine for a few minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
CONNS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
SCALE_USERS=${BENCH_SCALE_USERS:-1000000}
read -r -a SERVER_ENV <<<"${BENCH_SERVER_ENV:-}"
BASE_USERS=1000
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
HZ=$(getconf CLK_TCK)

log() { echo "bench: $*" >&2; }
die() {
    echo "bench: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- tools
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]} (Debian packages)"
    [[ $(id -u) == 0 ]] || die "${need_apt[*]} missing: run as root, or apt-get install ${need_apt[*]}"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2 ||
        die "cannot install ${need_apt[*]}"
fi
command -v cargo >/dev/null || die "cargo is required"

log "building release (cargo build --release --bin wxauth --examples)"
(cd "$ROOT" && cargo build --release --bin wxauth --examples >&2) || die "build failed"
WXAUTH=$TARGET_DIR/release/wxauth
POPULATE=$TARGET_DIR/release/examples/populate
MOCK_WECHAT=$TARGET_DIR/release/examples/mock_wechat
for bin in "$WXAUTH" "$POPULATE" "$MOCK_WECHAT"; do
    [[ -x $bin ]] || die "$bin was not built"
done

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml 2>/dev/null) ]]; then
    COMMIT="$COMMIT+changes"
fi
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- processes
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-bench.XXXXXX")
: >"$WORK/empty.toml"
STARTED=()

stop_pid() { # SIGTERM, then SIGKILL after 30 s; reaps the child.
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    local pid
    for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (60 s at most) for "listening address=127.0.0.1:PORT" in LOG from PID.
# Sets LISTEN_PORT and LISTEN_TS (the log line's timestamp, if it has one).
wait_listening() {
    local name=$1 pid=$2 logf=$3 deadline=$((SECONDS + 60)) line
    until line=$(grep -m1 'listening address=' "$logf" 2>/dev/null); do
        kill -0 "$pid" 2>/dev/null || {
            cat "$logf" >&2
            die "$name exited during start-up"
        }
        ((SECONDS < deadline)) || die "$name did not listen within 60 s (log: $logf)"
        sleep 0.01
    done
    LISTEN_PORT=$(sed -n 's/.*address=127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' <<<"$line")
    [[ -n $LISTEN_PORT ]] || die "$name: cannot read the port from: $line"
    LISTEN_TS=${line%% *}
}

# start_server NAME DATA_DIR [VAR=VALUE...]: wxauth on a free loopback port.
# Sets SERVER_PID, SERVER_PORT, SERVER_STARTUP_MS (exec → the "listening" line).
start_server() {
    local name=$1 dir=$2
    shift 2
    local logf=$WORK/$name.log t0 t1
    t0=$(date +%s%N)
    (cd "$WORK" && exec env \
        WXAUTH_SERVER__BIND=127.0.0.1:0 \
        WXAUTH_STORAGE__PATH="$dir" \
        WXAUTH_LIMITS__LOGIN_PER_MINUTE=0 \
        WXAUTH_METRICS__BIND=off \
        WXAUTH_LOG__LEVEL=warn \
        WXAUTH_JWT__ACCESS_TTL=1h \
        RUST_LOG=warn,wxauth::startup=info \
        "$@" ${SERVER_ENV[@]+"${SERVER_ENV[@]}"} \
        "$WXAUTH" --config "$WORK/empty.toml" serve) >"$logf" 2>&1 &
    SERVER_PID=$!
    STARTED+=("$SERVER_PID")
    wait_listening "$name" "$SERVER_PID" "$logf"
    SERVER_PORT=$LISTEN_PORT
    # The log line's own timestamp: independent of how often we polled.
    if t1=$(date -d "$LISTEN_TS" +%s%N 2>/dev/null); then :; else t1=$(date +%s%N); fi
    SERVER_STARTUP_MS=$(((t1 - t0) / 1000000))
    log "$name listening on 127.0.0.1:$SERVER_PORT (pid $SERVER_PID, start-up ${SERVER_STARTUP_MS} ms)"
}

cpu_ticks() { # user+system clock ticks of a process (all its threads)
    [[ -n ${1:-} && -r /proc/$1/stat ]] || {
        echo 0
        return
    }
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

rss_kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

post_json() { # PORT PATH JSON
    curl -sS --max-time 10 -X POST "http://127.0.0.1:$1$2" \
        -H 'Content-Type: application/json' -d "$3"
}
json_str() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

lua() { # concatenated scenario script + the shared report
    local out=$WORK/$1.lua
    if [[ $1 == report ]]; then cp "$ROOT/bench/lua/report.lua" "$out"; else
        cat "$ROOT/bench/lua/$1.lua" "$ROOT/bench/lua/report.lua" >"$out"
    fi
    echo "$out"
}

# ---------------------------------------------------------------- scenarios
declare -A RPS P50 P99 ERRS SCPU WCPU MCPU
ORDER=()
MOCK_PID=""

# run_wrk NAME SERVER_PID WRK_ARGS...: one wrk run; sets the result arrays.
run_wrk() {
    local name=$1 spid=$2
    shift 2
    local out=$WORK/${name//[^a-zA-Z0-9_.@-]/_}.out
    local s0 m0 s1 m1 line wall
    s0=$(cpu_ticks "$spid")
    m0=$(cpu_ticks "$MOCK_PID")
    # `times` in the inner shell reports its children's CPU: wrk's alone.
    bash -c 'wrk "$@" || exit $?; times' wrk "$@" >"$out" 2>&1 ||
        die "wrk failed for $name: $(tail -5 "$out")"
    s1=$(cpu_ticks "$spid")
    m1=$(cpu_ticks "$MOCK_PID")
    line=$(grep -m1 '^WRK_RESULT ' "$out") || die "no result from wrk for $name: $(tail -5 "$out")"
    eval "local ${line#WRK_RESULT }" # requests= duration_us= p50_us= ...
    wall=$(awk -v d="$duration_us" 'BEGIN {print d / 1e6}')
    RPS[$name]=$(awk -v r="$requests" -v w="$wall" 'BEGIN {printf "%.0f", r / w}')
    P50[$name]=$p50_us
    P99[$name]=$p99_us
    ERRS[$name]=$((status_errors + socket_errors))
    SCPU[$name]=$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" -v w="$wall" 'BEGIN {printf "%.2f", (b - a) / hz / w}')
    MCPU[$name]=$(awk -v a="$m0" -v b="$m1" -v hz="$HZ" -v w="$wall" 'BEGIN {printf "%.2f", (b - a) / hz / w}')
    WCPU[$name]=$(tail -1 "$out" | awk -v w="$wall" '{
        split($1, u, /[ms]/); split($2, s, /[ms]/);
        printf "%.2f", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) / w }')
}

# scenario NAME SERVER_PID WRK_ARGS...: warm-up (results dropped), then the measured run.
scenario() {
    local name=$1 spid=$2
    shift 2
    if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
        log "$name: warm-up $WARMUP"
        run_wrk "$name (warm-up)" "$spid" -d "$WARMUP" "${@//@TAG@/w$RANDOM}"
    fi
    log "$name: $DURATION"
    run_wrk "$name" "$spid" -d "$DURATION" "${@//@TAG@/m$RANDOM}"
    ORDER+=("$name")
    log "$name: ${RPS[$name]} req/s, p50 ${P50[$name]} us, p99 ${P99[$name]} us, errors ${ERRS[$name]}"
}

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
ms() { awk -v u="$1" 'BEGIN {printf "%.2f ms", u / 1000}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f MiB", k / 1024}'; }
HEALTHZ=${RPS[healthz]}
TOTAL_ERRORS=0
{
    echo
    echo "wxauth benchmark  $(date -u +%Y-%m-%dT%H:%MZ)  commit $COMMIT  $(nproc) cores," \
        "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load average at start $LOAD_AT_START"
    echo "${DURATION} per scenario after a ${WARMUP} warm-up, $CONNS connections ($THREADS wrk threads; refresh: $CONNS)"
    [[ -z ${BENCH_SERVER_ENV:-} ]] || echo "server settings: $BENCH_SERVER_ENV"
    echo
    printf '| %-24s | %8s | %9s | %9s | %6s | %9s | %10s | %8s | %9s |\n' \
        scenario "req/s" p50 p99 errors "/healthz" "server CPU" "wrk CPU" "mock CPU"
    printf '|%s|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|\n' \
        "$(printf -- '-%.0s' {1..26})" "$(printf -- '-%.0s' {1..9})" \
        "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..7})" "$(printf -- '-%.0s' {1..10})" \
        "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..9})" \
        "$(printf -- '-%.0s' {1..10})"
    for name in "${ORDER[@]}"; do
        ratio=$(awk -v a="${RPS[$name]}" -v b="$HEALTHZ" 'BEGIN {printf "%.2f", a / b}')
        mock=${MCPU[$name]}
        [[ $name == *"(http)"* ]] || mock="-"
        printf '| %-24s | %8s | %9s | %9s | %6s | %9s | %10s | %8s | %9s |\n' \
            "$name" "${RPS[$name]}" "$(ms "${P50[$name]}")" "$(ms "${P99[$name]}")" \
            "${ERRS[$name]}" "$ratio" "${SCPU[$name]}" "${WCPU[$name]}" "$mock"
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
        ok=$(awk -v v="$2" -v l="$4" -v op="$3" 'BEGIN {print (op == ">=" ? v >= l : v < l) ? "met" : "MISSED"}')
        printf '  %-50s %10s  (%s %s)  %s\n' "$1" "$2" "$3" "$4" "$ok"
    }
    check "data / healthz (same run)" "$(awk -v a="${RPS[data]}" -v b="$HEALTHZ" 'BEGIN {printf "%.2f", a / b}')" ">=" 0.75
    check "login-new (http) req/s, every creation fsync'd" "${RPS[login-new (http)]}" ">=" 10000
    check "login-returning (http) > login-new (http)" "${RPS[login-returning (http)]}" ">=" "${RPS[login-new (http)]}"
    check "refresh req/s, durable rotation" "${RPS[refresh]}" ">=" 8000
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
