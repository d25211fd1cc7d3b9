#!/usr/bin/env bash
# Login latency with a webhook receiver that never answers.
#
#   bench/webhook_dead_receiver.sh
#
# Builds release wxauth, then measures new-user logins on the built-in mock twice
# with wrk, each on a fresh data directory:
#   1. no events.webhook_url: the baseline;
#   2. events.webhook_url pointing at a receiver that accepts connections and never
#      answers (every delivery runs into events.timeout), so every login writes a
#      user.created event that stays pending.
# It prints p50/p99/max and req/s of each run, and the events pending at the end
# (`wxauth events list`): the second run must have as many as it made users.
#
# Knobs (environment):
#   HOOK_DURATION=10s       measured run
#   HOOK_WARMUP=2s          unmeasured run before each measured one
#   HOOK_CONNECTIONS=16     wrk connections (2 threads)
#   HOOK_KEEP=1             keep the temporary directory (logs, wrk outputs)
#   HOOK_NO_BUILD=1         use the release binary already built
#
# Not part of CI: it needs the whole machine for a minute.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${HOOK_DURATION:-10s}
WARMUP=${HOOK_WARMUP:-2s}
CONNS=${HOOK_CONNECTIONS:-16}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

log() { echo "webhook_dead_receiver: $*" >&2; }
die() {
    echo "webhook_dead_receiver: error: $*" >&2
    exit 1
}

command -v wrk >/dev/null || die "wrk is required (apt-get install wrk)"
command -v python3 >/dev/null || die "python3 is required (the dead receiver)"
if [[ -z ${HOOK_NO_BUILD:-} ]]; then
    log "building release (cargo build --release --bin wxauth)"
    (cd "$ROOT" && cargo build --release --bin wxauth >&2) || die "build failed"
fi
WXAUTH=$TARGET_DIR/release/wxauth
[[ -x $WXAUTH ]] || die "$WXAUTH was not built"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wxauth-hook.XXXXXX")
cat "$ROOT/bench/lua/login.lua" "$ROOT/bench/lua/report.lua" >"$WORK/login.lua"
echo "whsec_$(head -c 32 /dev/urandom | base64)" >"$WORK/webhook.secret"
chmod 600 "$WORK/webhook.secret"
SERVER_PID=""
RECEIVER_PID=""
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
    [[ -z $RECEIVER_PID ]] || kill "$RECEIVER_PID" 2>/dev/null || true
    if [[ -n ${HOOK_KEEP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The receiver that never answers: accepts, reads, holds every connection open.
python3 - "$WORK/receiver.port" <<'PY' &
import socket, sys, threading
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1024)
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
held = []
while True:
    c, _ = s.accept()
    held.append(c)
PY
RECEIVER_PID=$!
for ((i = 0; i < 100; i++)); do [[ -s $WORK/receiver.port ]] && break; sleep 0.05; done
RECEIVER_PORT=$(cat "$WORK/receiver.port") || die "the receiver did not start"

# start_server NAME CONFIG_TOML: sets SERVER_PID, PORT.
start_server() {
    local name=$1 logf=$WORK/$1.log line deadline=$((SECONDS + 120))
    mkdir -p "$WORK/$name"
    printf '%s\n' "$2" >"$WORK/$name/config.toml"
    (cd "$WORK/$name" && exec env \
        WXAUTH_SERVER__BIND=127.0.0.1:0 \
        WXAUTH_STORAGE__PATH="$WORK/$name/data" \
        WXAUTH_WECHAT__MOCK=true \
        WXAUTH_LIMITS__LOGIN_PER_MINUTE=0 \
        WXAUTH_METRICS__BIND= \
        RUST_LOG=warn,wxauth::startup=info \
        "$WXAUTH" --config "$WORK/$name/config.toml" serve) >"$logf" 2>&1 &
    SERVER_PID=$!
    until line=$(grep -m1 'listening address=' "$logf" 2>/dev/null); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "$name exited during start-up: $(tail -5 "$logf")"
        ((SECONDS < deadline)) || die "$name did not listen within 120 s"
        sleep 0.01
    done
    PORT=$(sed -n 's/.*address=127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' <<<"$line")
    log "$name listening on 127.0.0.1:$PORT (pid $SERVER_PID)"
}

declare -A RESULT
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

log "1/2 baseline: no events, $DURATION of new-user logins"
start_server baseline ""
warm_up
measure baseline
stop_server

log "2/2 the same logins, each with an event for a receiver that never answers"
start_server dead "[events]
webhook_url = \"http://127.0.0.1:$RECEIVER_PORT/hooks\"
secret_file = \"$WORK/webhook.secret\"
timeout = \"10s\""
warm_up
measure dead
# The CLI needs the server's environment too (its data directory, the mock): it
# asks the running server over the admin socket in that directory.
(cd "$WORK/dead" && env WXAUTH_STORAGE__PATH="$WORK/dead/data" WXAUTH_WECHAT__MOCK=true \
    "$WXAUTH" --config "$WORK/dead/config.toml" events list) >"$WORK/pending.jsonl" 2>"$WORK/pending.err" ||
    die "wxauth events list failed: $(tail -5 "$WORK/pending.err")"
pending=$(wc -l <"$WORK/pending.jsonl")
stop_server

row() {
    local name=$1 requests duration_us p50_us p99_us max_us status_errors socket_errors
    eval "${RESULT[$name]}"
    printf '%-26s %8.0f %9.2f %9.2f %9.2f %7d\n' "$2" \
        "$(awk -v r="$requests" -v d="$duration_us" 'BEGIN {print r / (d / 1e6)}')" \
        "$(awk -v v="$p50_us" 'BEGIN {print v / 1000}')" \
        "$(awk -v v="$p99_us" 'BEGIN {print v / 1000}')" \
        "$(awk -v v="$max_us" 'BEGIN {print v / 1000}')" \
        $((status_errors + socket_errors))
}
echo "wxauth webhook benchmark  $(date -u +%FT%RZ)  commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)  $(nproc) cores"
echo "new-user logins (built-in mock), wrk -t 2 -c $CONNS, $DURATION each after a $WARMUP warm-up"
printf '%-26s %8s %9s %9s %9s %7s\n' run "req/s" "p50 ms" "p99 ms" "max ms" errors
row baseline "no events"
row dead "receiver never answers"
echo "events pending at the end of the second run: $pending"
