#!/usr/bin/env bash
# Login latency with a webhook receiver that never answers.
#
#   bench/webhook_dead_receiver.sh
#
# Measures new-user logins on the built-in mock twice with wrk, each on a fresh
# data directory:
#   1. no events.webhook_url: the baseline;
#   2. events.webhook_url pointing at a receiver that accepts connections and never
#      answers (every delivery runs into events.timeout), so every login writes a
#      user.created event that stays pending.
# It prints req/s, p50/p99 and server CPU per request of each run, and the events
# pending at the end (`wxauth events list`): the second run must have as many as it
# made users.
#
# Knobs as bench/run.sh (docs/BENCHMARKS.md): BENCH_DURATION, BENCH_WARMUP,
# BENCH_CONNECTIONS (16 here by default), BENCH_THREADS, BENCH_KEEP, BENCH_WXAUTH.
# Not part of CI: it needs the whole machine for a minute.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-16}
LOG_NAME=webhook_dead_receiver
SERVER_ENV=(WXAUTH_WECHAT__MOCK=true)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
command -v python3 >/dev/null || die "python3 is required (the dead receiver)"

bench_tools
bench_build
bench_workdir
bench_describe
echo "whsec_$(head -c 32 /dev/urandom | base64)" >"$WORK/webhook.secret"
chmod 600 "$WORK/webhook.secret"

# The receiver that never answers: accepts, reads, holds every connection open.
python3 - "$WORK/receiver.port" <<'PY' &
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1024)
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
held = []
while True:
    c, _ = s.accept()
    held.append(c)
PY
STARTED+=($!)
for ((i = 0; i < 100; i++)); do [[ -s $WORK/receiver.port ]] && break; sleep 0.05; done
RECEIVER_PORT=$(cat "$WORK/receiver.port") || die "the receiver did not start"
LOGIN=$(lua login)

log "1/2 baseline: no events"
start_server baseline "$WORK/baseline"
scenario "no events" "$SERVER_PID" --latency --timeout 5s -t "$THREADS" -c "$CONNS" \
    -s "$LOGIN" "http://127.0.0.1:$SERVER_PORT/api/weixin/login/" -- new @TAG@
stop_pid "$SERVER_PID"

log "2/2 the same logins, each with an event for a receiver that never answers"
DEAD_ENV=(WXAUTH_STORAGE__PATH="$WORK/dead"
    WXAUTH_EVENTS__WEBHOOK_URL="http://127.0.0.1:$RECEIVER_PORT/hooks"
    WXAUTH_EVENTS__SECRET_FILE="$WORK/webhook.secret"
    WXAUTH_EVENTS__TIMEOUT=10s)
start_server dead "$WORK/dead" "${DEAD_ENV[@]}"
scenario "receiver never answers" "$SERVER_PID" --latency --timeout 5s -t "$THREADS" -c "$CONNS" \
    -s "$LOGIN" "http://127.0.0.1:$SERVER_PORT/api/weixin/login/" -- new @TAG@
# The CLI asks the running server over the admin socket in its data directory.
env "${SERVER_ENV[@]}" "${DEAD_ENV[@]}" "$WXAUTH" --config "$WORK/empty.toml" events list \
    >"$WORK/pending.jsonl" 2>"$WORK/pending.err" ||
    die "wxauth events list failed: $(tail -5 "$WORK/pending.err")"
pending=$(wc -l <"$WORK/pending.jsonl")
stop_pid "$SERVER_PID"

echo "wxauth $COMMIT, $(date -u +%F), load at start $LOAD_AT_START; new-user logins (built-in mock), wrk -t $THREADS -c $CONNS, $DURATION each after a $WARMUP warm-up"
echo
echo "| run | req/s | p50 | p99 | server CPU/req (µs) | errors |"
echo "|---|---:|---:|---:|---:|---:|"
for name in "${ORDER[@]}"; do
    echo "| $name | ${RPS[$name]} | $(ms "${P50[$name]}") | $(ms "${P99[$name]}") | $(us1 "${SUS[$name]}") | ${ERRS[$name]} |"
done
echo
echo "events pending at the end of the second run: $pending"
