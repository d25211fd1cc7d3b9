# Shared by bench/run.sh and bench/memory_curve.sh (sourced, not run).
#
# The caller sets, before calling these functions:
#   ROOT      the repository
#   LOG_NAME  prefix of log lines (default "bench")
#   SERVER_ENV (array)          extra VAR=VALUE settings for every wxauth started
# and calls bench_tools, bench_build and bench_workdir, which set the rest
# (WXAUTH, POPULATE, MOCK_WECHAT, WORK) and install the cleanup trap.
# The knobs both scripts take (see docs/BENCHMARKS.md) are read here; BENCH_KEEP=1
# keeps the temporary directory.

DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
CONNS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
HZ=$(getconf CLK_TCK)
STARTED=()   # pids stopped by cleanup
MOCK_PID=""  # mock_wechat, whose CPU run_wrk measures when set
# Results of run_wrk, by scenario name; ORDER lists the measured ones.
declare -A RPS P50 P99 ERRS SCPU SUS WCPU MCPU
ORDER=()

log() { echo "${LOG_NAME:-bench}: $*" >&2; }
die() {
    echo "${LOG_NAME:-bench}: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- tools
bench_tools() { # wrk and curl (Debian packages when missing), cargo
    local need_apt=()
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
}

bench_build() { # release wxauth and the examples; sets WXAUTH, POPULATE, MOCK_WECHAT
    log "building release (cargo build --release --bin wxauth --examples)"
    (cd "$ROOT" && cargo build --release --bin wxauth --examples >&2) || die "build failed"
    WXAUTH=$TARGET_DIR/release/wxauth
    # BENCH_WXAUTH: measure that binary (another commit's release build) instead.
    [[ -z ${BENCH_WXAUTH:-} ]] || WXAUTH=$(realpath "$BENCH_WXAUTH")
    POPULATE=$TARGET_DIR/release/examples/populate
    MOCK_WECHAT=$TARGET_DIR/release/examples/mock_wechat
    local bin
    for bin in "$WXAUTH" "$POPULATE" "$MOCK_WECHAT"; do
        [[ -x $bin ]] || die "$bin was not built"
    done
}

# ---------------------------------------------------------------- processes
bench_workdir() { # the temporary directory WORK, removed (and every STARTED pid stopped) on exit
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-bench.XXXXXX")
    : >"$WORK/empty.toml"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

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
        WXAUTH_LIMITS__REFRESH_PER_MINUTE=0 \
        WXAUTH_LIMITS__REFRESH_PER_FAMILY_PER_MINUTE=0 \
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

lua() { # concatenated scenario script + the shared report
    local out=$WORK/$1.lua
    if [[ $1 == report ]]; then cp "$ROOT/bench/lua/report.lua" "$out"; else
        cat "$ROOT/bench/lua/$1.lua" "$ROOT/bench/lua/report.lua" >"$out"
    fi
    echo "$out"
}

# ---------------------------------------------------------------- scenarios
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
    # Server CPU per request in µs (cores ÷ req/s), from the unrounded figures;
    # three decimals so that ratios of two of them stay exact (print with us1).
    SUS[$name]=$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" -v r="$requests" \
        'BEGIN {printf "%.3f", (r > 0 ? (b - a) / hz / r * 1e6 : 0)}')
    MCPU[$name]=$(awk -v a="$m0" -v b="$m1" -v hz="$HZ" -v w="$wall" 'BEGIN {printf "%.2f", (b - a) / hz / w}')
    WCPU[$name]=$(tail -1 "$out" | awk -v w="$wall" '{
        split($1, u, /[ms]/); split($2, s, /[ms]/);
        printf "%.2f", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) / w }')
}

# scenario NAME SERVER_PID WRK_ARGS...: warm-up (results dropped), then the measured run.
# @TAG@ in the arguments becomes a tag unique to the run (login codes never reused).
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

ms() { awk -v u="$1" 'BEGIN {printf "%.2f ms", u / 1000}'; }
us1() { awk -v v="$1" 'BEGIN {printf "%.1f", v}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f MiB", k / 1024}'; }

# Sets COMMIT (the short hash, "+changes" when src/ or Cargo.toml differ from it)
# and LOAD_AT_START (the load averages as the run begins), for the table's header.
bench_describe() {
    COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml 2>/dev/null) ]]; then
        COMMIT="$COMMIT+changes"
    fi
    [[ -z ${BENCH_WXAUTH:-} ]] || COMMIT="$BENCH_WXAUTH ($("$BENCH_WXAUTH" --version 2>/dev/null || echo '?'))"
    LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
}
