#!/usr/bin/env bash
# Login latency while the expired-token purge runs.
#
#   bench/purge_p99.sh
#
# Builds release (wxauth and examples/fill_expired.rs), fills a temporary data
# directory with PURGE_RECORDS expired family records (one per login, expired a
# day ago), then measures new-user logins on the built-in
# mock twice with wrk on that same directory:
#   1. no purge (jwt.purge_interval = 1h): the baseline;
#   2. jwt.purge_interval = PURGE_AFTER: the purge starts PURGE_AFTER after the
#      server starts, and the measured run begins then.
# It prints p50/p99/max and req/s of each run, and how long the purge took and how
# many records it removed (from its log line); the purge must outlast the measured
# run, else the script says the run was not fully covered.
#
# Knobs (environment):
#   PURGE_RECORDS=1000000   expired records to purge
#   PURGE_DURATION=10s      measured run
#   PURGE_WARMUP=2s         unmeasured run before each measured one
#   PURGE_AFTER=5s          jwt.purge_interval of the second server
#   PURGE_CONNECTIONS=16    wrk connections (2 threads)
#   PURGE_KEEP=1            keep the temporary directory (logs, wrk outputs)
#   PURGE_NO_BUILD=1        use the release binaries already built
#
# Not part of CI: it needs the whole machine for a few minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RECORDS=${PURGE_RECORDS:-1000000}
DURATION=${PURGE_DURATION:-10s}
WARMUP=${PURGE_WARMUP:-2s}
PURGE_AFTER=${PURGE_AFTER:-5s}
CONNS=${PURGE_CONNECTIONS:-16}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

log() { echo "purge_p99: $*" >&2; }
die() {
    echo "purge_p99: error: $*" >&2
    exit 1
}
secs() { sed 's/s$//' <<<"$1"; }

command -v wrk >/dev/null || die "wrk is required (apt-get install wrk)"
if [[ -z ${PURGE_NO_BUILD:-} ]]; then
    log "building release (cargo build --release --bin wxauth --example fill_expired)"
    (cd "$ROOT" && cargo build --release --bin wxauth --example fill_expired >&2) || die "build failed"
fi
WXAUTH=$TARGET_DIR/release/wxauth
FILL=$TARGET_DIR/release/examples/fill_expired
for bin in "$WXAUTH" "$FILL"; do [[ -x $bin ]] || die "$bin was not built"; done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-purge.XXXXXX")
: >"$WORK/empty.toml"
cat "$ROOT/bench/lua/login.lua" "$ROOT/bench/lua/report.lua" >"$WORK/login.lua"
SERVER_PID=""
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
cleanup() {
    stop_server
    if [[ -n ${PURGE_KEEP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "filling $WORK/data with $RECORDS expired records"
"$FILL" "$WORK/data" "$RECORDS" 2>&1 | tail -1 >&2

# start_server NAME PURGE_INTERVAL: sets SERVER_PID, PORT, LISTENED_AT (epoch ns).
start_server() {
    local name=$1 interval=$2 logf=$WORK/$1.log line deadline=$((SECONDS + 120))
    (cd "$WORK" && exec env \
        WXAUTH_SERVER__BIND=127.0.0.1:0 \
        WXAUTH_STORAGE__PATH="$WORK/data" \
        WXAUTH_WECHAT__MOCK=true \
        WXAUTH_LIMITS__LOGIN_PER_MINUTE=0 \
        WXAUTH_LIMITS__REFRESH_PER_MINUTE=0 \
        WXAUTH_LIMITS__REFRESH_PER_FAMILY_PER_MINUTE=0 \
        WXAUTH_METRICS__BIND= \
        WXAUTH_JWT__ACCESS_TTL=1h \
        WXAUTH_JWT__PURGE_INTERVAL="$interval" \
        RUST_LOG=warn,wxauth::startup=info,wxauth::actors::issuer=info \
        "$WXAUTH" --config "$WORK/empty.toml" serve) >"$logf" 2>&1 &
    SERVER_PID=$!
    until line=$(grep -m1 'listening address=' "$logf" 2>/dev/null); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "$name exited during start-up: $(tail -5 "$logf")"
        ((SECONDS < deadline)) || die "$name did not listen within 120 s"
        sleep 0.01
    done
    LISTENED_AT=$(date +%s%N)
    PORT=$(sed -n 's/.*address=127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' <<<"$line")
    log "$name listening on 127.0.0.1:$PORT (pid $SERVER_PID)"
}

declare -A RESULT
# measure NAME: one wrk run of DURATION; RESULT[NAME] = its WRK_RESULT fields.
measure() {
    local name=$1 out=$WORK/$1.out
    wrk --latency --timeout 5s -t 2 -c "$CONNS" -d "$DURATION" -s "$WORK/login.lua" \
        "http://127.0.0.1:$PORT/api/weixin/login/" -- new "$name$RANDOM" >"$out" 2>&1 ||
        die "wrk failed: $(tail -5 "$out")"
    RESULT[$name]=$(grep -m1 '^WRK_RESULT ' "$out" | sed 's/^WRK_RESULT //') ||
        die "no result from wrk: $(tail -5 "$out")"
}
warm_up() {
    [[ $WARMUP == 0 || $WARMUP == 0s ]] && return 0
    wrk -t 2 -c "$CONNS" -d "$WARMUP" -s "$WORK/login.lua" \
        "http://127.0.0.1:$PORT/api/weixin/login/" -- new "w$RANDOM" >/dev/null 2>&1 || die "warm-up failed"
}

log "1/2 baseline: no purge, $DURATION of logins"
start_server baseline 1h
warm_up
measure baseline
stop_server

log "2/2 the same logins while the purge runs (it starts $PURGE_AFTER after start)"
start_server purge "$PURGE_AFTER"
warm_up
# The purge's first run starts PURGE_AFTER after the issuer started (just before
# the listening line): begin measuring then.
start_at=$((LISTENED_AT + $(secs "$PURGE_AFTER") * 1000000000))
now=$(date +%s%N)
((now < start_at)) && sleep "$(awk -v d=$((start_at - now)) 'BEGIN {print d / 1e9}')"
measure purge
purge_line=""
deadline=$((SECONDS + 600))
until purge_line=$(grep -m1 'purged expired token records' "$WORK/purge.log"); do
    ((SECONDS < deadline)) || die "the purge did not finish within 600 s"
    sleep 0.5
done
stop_server
purged=$(sed -n 's/.*records=\([0-9]*\).*/\1/p' <<<"$purge_line")
took_ms=$(sed -n 's/.*took_ms=\([0-9]*\).*/\1/p' <<<"$purge_line")
covered=yes
(($(awk -v t="$took_ms" -v d="$(secs "$DURATION")" 'BEGIN {print (t >= d * 1000)}'))) || covered=no

row() {
    local name=$1 requests duration_us p50_us p99_us max_us status_errors socket_errors
    eval "${RESULT[$name]}"
    printf '%-22s %8.0f %9.2f %9.2f %9.2f %7d\n' "$2" \
        "$(awk -v r="$requests" -v d="$duration_us" 'BEGIN {print r / (d / 1e6)}')" \
        "$(awk -v v="$p50_us" 'BEGIN {print v / 1000}')" \
        "$(awk -v v="$p99_us" 'BEGIN {print v / 1000}')" \
        "$(awk -v v="$max_us" 'BEGIN {print v / 1000}')" \
        $((status_errors + socket_errors))
}
echo "wxauth purge benchmark  $(date -u +%FT%RZ)  commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)  $(nproc) cores"
echo "new-user logins (built-in mock), wrk -t 2 -c $CONNS, $DURATION each after a $WARMUP warm-up"
printf '%-22s %8s %9s %9s %9s %7s\n' run "req/s" "p50 ms" "p99 ms" "max ms" errors
row baseline "no purge"
row purge "purge running"
echo "purge: $purged expired records removed in $took_ms ms (of $RECORDS filled); measured run inside the purge: $covered"
