#!/usr/bin/env bash
# Two wxauth nodes on one local PostgreSQL against one sled node, in one run, side
# by side: login-new (http), refresh and data, each node behind the same
# mock_wechat as bench/run.sh's http scenarios. pgbench -N on the same cluster in
# the same run anchors the database's share: the table gives wxauth's durable
# logins/s as a fraction of pgbench's transactions/s.
#
#   bench/postgres.sh
#
# Knobs as bench/run.sh (docs/BENCHMARKS.md): BENCH_DURATION, BENCH_WARMUP,
# BENCH_CONNECTIONS, BENCH_THREADS, BENCH_KEEP. The two nodes share the
# connections (half each, one wrk per node, run at once). Needs wrk and PostgreSQL's
# server binaries (Debian: postgresql); as root the cluster runs as the postgres
# user. Not part of CI: it needs the whole machine for a few minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_USERS=1000
LOG_NAME=bench-pg
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

bench_tools
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -n $PGBIN && -x $PGBIN/initdb ]] || die "PostgreSQL is not installed (apt-get install postgresql)"
bench_build
bench_describe
bench_workdir

# ---- the cluster: a throw-away one in WORK, fsync on (the default)
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PGDIR=$WORK/pg
mkdir -p "$PGDIR"
if [[ $(id -u) == 0 ]]; then
    chmod 755 "$WORK"
    chown postgres: "$PGDIR"
fi
PGPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$PGBIN/initdb" -D "$PGDIR/data" -U postgres --auth=trust >"$WORK/initdb.log" 2>&1 ||
    die "initdb failed: $(tail -3 "$WORK/initdb.log")"
as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w start \
    -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_preload_libraries=pg_stat_statements" >/dev/null ||
    die "PostgreSQL did not start: $(tail -3 "$PGDIR/server.log")"
stop_pg() { as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null 2>&1 || true; }
trap 'stop_pg; cleanup' EXIT
PG_PID=$(head -1 "$PGDIR/data/postmaster.pid")
pg_ticks() { # the cluster's CPU: the postmaster, every process it runs, and those that ended (pgbench's)
    local total pid
    total=$(sed 's/^.*) //' "/proc/$PG_PID/stat" | awk '{print $12 + $13 + $14 + $15}')
    for pid in $(pgrep -P "$PG_PID"); do total=$((total + $(cpu_ticks "$pid"))); done
    echo "$total"
}
psql_() { "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres "$@"; }
psql_ -c "CREATE DATABASE wxauth" -c "CREATE DATABASE pgbench"
psql_ -d wxauth -c "CREATE EXTENSION pg_stat_statements"
# statements_per NAME: the statements wxauth ran (pg_stat_statements, BEGIN and COMMIT
# included: each one round trip) per request of scenario NAME, since the last reset.
declare -A STMTS
stmts_reset() { psql_ -d wxauth -c "SELECT pg_stat_statements_reset()" >/dev/null; }
statements_per() {
    local calls
    calls=$(psql_ -d wxauth -A -t -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s \
        JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'wxauth' \
        AND s.query NOT LIKE '%pg_stat_statements%'")
    STMTS[$1]=$(awk -v c="$calls" -v r="$2" 'BEGIN {printf "%.2f", (r > 0 ? c / r : 0)}')
    (($2 > 0)) || return 0
    log "$1: statements per request, by statement:"
    psql_ -d wxauth -A -t -F ' ' -c "SELECT round(calls::numeric / $2, 2), left(regexp_replace(query, '\s+', ' ', 'g'), 90) \
        FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'wxauth' \
        AND s.query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC LIMIT 8" >&2
}
PGURL="postgres://postgres@127.0.0.1:$PGPORT/wxauth?sslmode=disable"

post_json() { # PORT PATH JSON
    curl -sS --max-time 10 -X POST "http://127.0.0.1:$1$2" \
        -H 'Content-Type: application/json' -d "$3"
}
json_str() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
WRK=(--latency --timeout 5s)
LOGIN=/api/weixin/login/

(exec "$MOCK_WECHAT" 127.0.0.1:0 wxbench benchsecret 1) >"$WORK/mock_wechat.log" 2>&1 &
MOCK_PID=$!
STARTED+=("$MOCK_PID")
wait_listening mock_wechat "$MOCK_PID" "$WORK/mock_wechat.log"
HTTP_ENV=(WXAUTH_WECHAT__MOCK=false WXAUTH_WECHAT__APPID=wxbench WXAUTH_WECHAT__SECRET=benchsecret
    WXAUTH_WECHAT__API_BASE="http://127.0.0.1:$LISTEN_PORT")

# seed FILE PORT N TAG: N refresh tokens from fresh logins on PORT.
seed() {
    local file=$1 port=$2 n=$3 tag=$4 i token
    : >"$file"
    for ((i = 0; i < n; i++)); do
        token=$(post_json "$port" $LOGIN "{\"code\":\"$tag$i.seed\"}" | json_str refresh)
        echo "$token" >>"$file"
    done
    [[ $(grep -c . "$file") == "$n" ]] || die "could not seed $n refresh tokens on $port"
}

# ---- 1. one sled node
"$POPULATE" "$WORK/data-sled" "$BASE_USERS" wxbench o- 2>>"$WORK/populate.log"
start_server sled "$WORK/data-sled" "${HTTP_ENV[@]}"
PID=$SERVER_PID
URL=http://127.0.0.1:$SERVER_PORT
ACCESS=$(post_json "$SERVER_PORT" $LOGIN '{"code":"s0.data"}' | json_str access)
[[ -n $ACCESS ]] || die "could not log in on the sled node"
scenario "sled: login-new (http)" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" \
    -s "$(lua login)" "$URL$LOGIN" -- new @TAG@
# Fresh tokens for the measured run (the warm-up's are rotated out by then).
seed "$WORK/sled_tokens.txt" "$SERVER_PORT" "$CONNS" sr
run_wrk "sled: refresh (warm-up)" "$PID" "${WRK[@]}" -d "$WARMUP" -t "$CONNS" -c "$CONNS" \
    -s "$(lua refresh)" "$URL/api/token/refresh/" -- "$WORK/sled_tokens.txt" 0
seed "$WORK/sled_tokens.txt" "$SERVER_PORT" "$CONNS" sm
run_wrk "sled: refresh" "$PID" "${WRK[@]}" -d "$DURATION" -t "$CONNS" -c "$CONNS" \
    -s "$(lua refresh)" "$URL/api/token/refresh/" -- "$WORK/sled_tokens.txt" 0
ORDER+=("sled: refresh")
scenario "sled: data" "$PID" "${WRK[@]}" -t "$THREADS" -c "$CONNS" -s "$(lua report)" \
    -H "Authorization: Bearer $ACCESS" "$URL/api/weixin/data/"
stop_pid "$PID"

# ---- 2. two nodes on PostgreSQL
PG_ENV=(WXAUTH_STORAGE__BACKEND=postgres WXAUTH_STORAGE__POSTGRES_URL="$PGURL")
start_server node-a "$WORK/node-a" "${HTTP_ENV[@]}" "${PG_ENV[@]}"
A_PID=$SERVER_PID A_PORT=$SERVER_PORT
start_server node-b "$WORK/node-b" "${HTTP_ENV[@]}" "${PG_ENV[@]}"
B_PID=$SERVER_PID B_PORT=$SERVER_PORT
HALF=$((CONNS / 2)) HALF_T=$(((THREADS + 1) / 2))

declare -A PGCPU
# pair NAME THREADS CONNS SCRIPT PATH [WRK ARGS...] [-- LUA ARGS with @FILE@]: one wrk
# per node at once; req/s summed, p99 the worse of the two, server CPU both nodes'.
pair() {
    local name=$1 t=$2 c=$3 script=$4 path=$5
    shift 5
    local outa=$WORK/${name//[^a-zA-Z0-9_.@-]/_}.a.out outb=$WORK/${name//[^a-zA-Z0-9_.@-]/_}.b.out
    local s0 p0 s1 p1 ra rb
    s0=$(($(cpu_ticks "$A_PID") + $(cpu_ticks "$B_PID")))
    p0=$(pg_ticks)
    stmts_reset
    # Each node its own tokens (@FILE@) and its own login codes (@TAG@).
    local args_a=("${@//@FILE@/$WORK/tokens_a.txt}") args_b=("${@//@FILE@/$WORK/tokens_b.txt}")
    args_a=("${args_a[@]//@TAG@/a$RANDOM}")
    args_b=("${args_b[@]//@TAG@/b$RANDOM}")
    wrk "${WRK[@]}" -d "$DURATION" -t "$t" -c "$c" -s "$script" "http://127.0.0.1:$A_PORT$path" \
        "${args_a[@]}" >"$outa" 2>&1 &
    ra=$!
    wrk "${WRK[@]}" -d "$DURATION" -t "$t" -c "$c" -s "$script" "http://127.0.0.1:$B_PORT$path" \
        "${args_b[@]}" >"$outb" 2>&1 &
    rb=$!
    wait "$ra" || die "wrk failed for $name (node a): $(tail -3 "$outa")"
    wait "$rb" || die "wrk failed for $name (node b): $(tail -3 "$outb")"
    s1=$(($(cpu_ticks "$A_PID") + $(cpu_ticks "$B_PID")))
    p1=$(pg_ticks)
    local nreq=0 l
    for l in "$outa" "$outb"; do
        nreq=$((nreq + $(sed -n 's/^WRK_RESULT .*requests=\([0-9]*\).*/\1/p' "$l")))
    done
    statements_per "$name" "$nreq"
    local la lb
    la=$(grep -m1 '^WRK_RESULT ' "$outa") || die "no result for $name (a)"
    lb=$(grep -m1 '^WRK_RESULT ' "$outb") || die "no result for $name (b)"
    local req=0 dur=0 p99=0 errs=0 rps=0 line
    for line in "$la" "$lb"; do
        eval "local ${line#WRK_RESULT }"
        rps=$(awk -v a="$rps" -v r="$requests" -v d="$duration_us" 'BEGIN {printf "%.1f", a + r / (d / 1e6)}')
        req=$((req + requests))
        ((p99_us > p99)) && p99=$p99_us
        errs=$((errs + status_errors + socket_errors))
        dur=$duration_us
    done
    local wall
    wall=$(awk -v d="$dur" 'BEGIN {print d / 1e6}')
    RPS[$name]=$(awk -v r="$rps" 'BEGIN {printf "%.0f", r}')
    P99[$name]=$p99
    ERRS[$name]=$errs
    SUS[$name]=$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" -v r="$req" 'BEGIN {printf "%.3f", (r > 0 ? (b - a) / hz / r * 1e6 : 0)}')
    PGCPU[$name]=$(awk -v a="$p0" -v b="$p1" -v hz="$HZ" -v r="$req" 'BEGIN {printf "%.3f", (r > 0 ? (b - a) / hz / r * 1e6 : 0)}')
    SCPU[$name]=$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" -v w="$wall" 'BEGIN {printf "%.2f", (b - a) / hz / w}')
    ORDER+=("$name")
    log "$name: ${RPS[$name]} req/s, p99 ${P99[$name]} us, errors ${ERRS[$name]}"
}

ACCESS_A=$(post_json "$A_PORT" $LOGIN '{"code":"p0.data"}' | json_str access)
[[ -n $ACCESS_A ]] || die "could not log in on node a"
log "two nodes: login-new (http): $DURATION"
pair "2 nodes: login-new (http)" "$HALF_T" "$HALF" "$(lua login)" $LOGIN -- new @TAG@
seed "$WORK/tokens_a.txt" "$A_PORT" "$HALF" ar
seed "$WORK/tokens_b.txt" "$B_PORT" "$HALF" br
log "two nodes: refresh: $DURATION"
pair "2 nodes: refresh" "$HALF" "$HALF" "$(lua refresh)" /api/token/refresh/ -- @FILE@ 0
log "two nodes: data (cached users): $DURATION"
pair "2 nodes: data" "$HALF_T" "$HALF" "$(lua report)" /api/weixin/data/ \
    -H "Authorization: Bearer $ACCESS_A"
stop_pid "$A_PID"
stop_pid "$B_PID"

# ---- 3. the anchor: pgbench -N (no contended branch updates) on the same cluster
"$PGBIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$PGPORT" -U postgres pgbench >"$WORK/pgbench-init.log" 2>&1 ||
    die "pgbench -i failed: $(tail -3 "$WORK/pgbench-init.log")"
SECS=${DURATION%s}
P0=$(pg_ticks)
"$PGBIN/pgbench" -N -c "$CONNS" -j "$THREADS" -T "$SECS" -h 127.0.0.1 -p "$PGPORT" -U postgres pgbench \
    >"$WORK/pgbench.log" 2>&1 || die "pgbench failed: $(tail -3 "$WORK/pgbench.log")"
P1=$(pg_ticks)
PGBENCH_TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/pgbench.log" | head -1)
PGBENCH_TX=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/pgbench.log" | head -1)
PGBENCH_CPU=$(awk -v a="$P0" -v b="$P1" -v hz="$HZ" -v r="${PGBENCH_TX:-0}" 'BEGIN {printf "%.3f", (r > 0 ? (b - a) / hz / r * 1e6 : 0)}')
log "pgbench -N: $PGBENCH_TPS tps"

# ---- the table
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }
echo
echo "wxauth $COMMIT, $(date -u +%Y-%m-%d), load at start $LOAD_AT_START; $CONNS connections, $DURATION per scenario"
echo
echo "| scenario | req/s | p99 | server CPU/req (µs, wxauth) | PostgreSQL CPU/req (µs) | statements/req | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for name in "${ORDER[@]}"; do
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$name" "${RPS[$name]}" "$(ms "${P99[$name]}")" \
        "$(us1 "${SUS[$name]}")" "${PGCPU[$name]:-}" "${STMTS[$name]:-}" "${ERRS[$name]}"
done
echo "| pgbench -N ($CONNS clients, scale 10) | $PGBENCH_TPS tps | | | $PGBENCH_CPU | 5 | |"
echo
echo "- durable logins/s on two nodes ÷ pgbench -N tps: $(ratio "${RPS["2 nodes: login-new (http)"]}" "$PGBENCH_TPS") (target ≥ 0.5)"
echo "- data on cached users, two nodes ÷ one sled node: $(ratio "${RPS["2 nodes: data"]}" "${RPS["sled: data"]}") (target ≥ 0.8)"
