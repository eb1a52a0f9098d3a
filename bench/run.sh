#!/usr/bin/env bash
# bench/run.sh: costrouter side by side with a plain nginx reverse proxy and
# the Portkey AI gateway, all in front of one mockllm, on loopback (issue 7).
# Run by `make bench` (mk/bench.mk installs wrk, nginx and Portkey first).
#
# One run, ~10 minutes with the defaults:
#   - wrk (bench/chat.lua, bench/chat-stream.lua: a ~1 KB chat request with
#     a Bearer key) against: the mock directly, costrouter, nginx with
#     worker_processes 1 (costrouter runs one loop) and `auto`, and Portkey;
#     non-streamed and streamed, at each of BENCH_CONNS connections; each
#     run BENCH_DURATION seconds after a BENCH_WARMUP-second warm-up. The
#     whole set runs BENCH_ROUNDS times, one round after the other, and the
#     round with the most requests/s counts for each server and load: this
#     damps what other work on a shared machine does to one run.
#     Measured: requests/s, p50/p99 latency, the latency added over direct,
#     peak RSS of the server's processes (VmHWM, reset before each run),
#     and the CPU time (user + system, from /proc/PID/stat) the server's
#     processes spent per request served: unlike requests/s, that figure
#     hardly depends on what else the shared CPUs are doing.
#   - time to first streamed token, direct vs through each proxy (bench/probe.c).
#   - BENCH_IDLE_CONNS idle keep-alive connections held open on costrouter,
#     and its RSS then.
#   - costrouter twice: with the in-process store (`costrouter`) and with a
#     redis-server of its own on loopback (`costrouter-redis`).
#   - allocations per request of costrouter (bench/alloc_count.c preloaded).
#   - the tokenizer's and the store's own benchmarks (bench/tokenize.c,
#     bench/store.c), whose output is copied into the results.
# Prints the results and writes them to bench/RESULTS.md with the commands,
# versions and machine. Work files (configs, logs, raw wrk output) go to
# $BUILD/bench. Every server is started here and stopped by its pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
BIN=${BIN:-./costrouter}
case $BIN in */*) ;; *) BIN=./$BIN ;; esac
DURATION=${BENCH_DURATION:-5}
WARMUP=${BENCH_WARMUP:-1}
ROUNDS=${BENCH_ROUNDS:-3}
CONNS=${BENCH_CONNS:-50 256}
THREADS=${BENCH_THREADS:-2}
TTFB_N=${BENCH_TTFB_N:-2000}
IDLE_CONNS=${BENCH_IDLE_CONNS:-10000}
RESULTS=${BENCH_RESULTS:-bench/RESULTS.md}
PORTKEY_DIR=${PORTKEY_DIR:-build/npm-portkey}
PORTKEY_JS=$PORTKEY_DIR/node_modules/@portkey-ai/gateway/build/start-server.js
MOCK=$BUILD/mockllm
PROBE=$BUILD/bench/probe
BODY=bench/chat.json
OUT=$BUILD/bench
RUN=$OUT/run
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

TOKENIZE=$BUILD/bench/tokenize
STORE_BENCH=$BUILD/bench/store
TOKENS_CORPUS=${TOKENS_CORPUS:-$BUILD/tokens-test/corpus.bin}
TOKENS_NPM=${TOKENS_NPM:-build/npm}
REDIS=$(command -v redis-server || echo /usr/bin/redis-server)
REDIS_CLI=$(command -v redis-cli || echo /usr/bin/redis-cli)

for f in "$BIN" "$MOCK" "$PROBE" "$PORTKEY_JS" "$NGINX" "$REDIS" "$REDIS_CLI" "$TOKENIZE" "$STORE_BENCH" "$TOKENS_CORPUS" "$TOKENS_NPM/node_modules/tiktoken"; do
    [ -e "$f" ] || { echo "bench/run.sh: $f is missing (run: make bench)" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "bench/run.sh: wrk is missing (run: make bench)" >&2; exit 1; }

rm -rf "$RUN" "$OUT/nginx-1" "$OUT/nginx-auto"
mkdir -p "$RUN"
ABS_OUT=$(cd "$OUT" && pwd)
CMDS=$RUN/commands.txt
# shellcheck source=bench/lib.sh
. bench/lib.sh

# Open files: the idle-connection check needs more than IDLE_CONNS.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_CONNS + 1000)) ]; then
    IDLE_CONNS=$(( $(ulimit -n) - 1000 ))
    log "bench/run.sh: open-file limit $(ulimit -n): idle check reduced to $IDLE_CONNS connections"
fi
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- servers ----
log "starting mockllm, costrouter, nginx (1 worker, auto), Portkey"
note_cmd "$MOCK --listen 127.0.0.1:0 --tokens 16 --token-delay-ms 0"
"$MOCK" --listen 127.0.0.1:0 --tokens 16 --token-delay-ms 0 > "$RUN/mockllm.log" 2>&1 &
PIDS+=($!); export PID_direct=$!  # read through var()
PORT_direct=$(wait_listening "$RUN/mockllm.log")
UPSTREAM=127.0.0.1:$PORT_direct

# costrouter with the in-process store (bench/lib.sh has the config).
costrouter_conf "$ABS_OUT/run/cost.jsonl" > "$OUT/costrouter.yaml"
note_cmd "$BIN -q -c $OUT/costrouter.yaml"
"$BIN" -q -c "$OUT/costrouter.yaml" > "$RUN/costrouter.log" 2>&1 &
PIDS+=($!); PID_costrouter=$!
PORT_costrouter=$(wait_listening "$RUN/costrouter.log")

# costrouter-redis: the same, with a redis-server of its own as the store
# (no persistence: the figure is the router's round trips, not the disk).
PORT_redis=$(free_port)
note_cmd "$REDIS --bind 127.0.0.1 --port $PORT_redis --save '' --appendonly no"
"$REDIS" --bind 127.0.0.1 --port "$PORT_redis" --save '' --appendonly no \
    > "$RUN/redis.log" 2>&1 &
PIDS+=($!); PID_redis_server=$!
wait_port "$PORT_redis" "$RUN/redis.log"
costrouter_conf "$ABS_OUT/run/cost-redis.jsonl" \
    "store: { redis: \"redis://127.0.0.1:$PORT_redis/0\", on_failure: fail_open }" \
    > "$OUT/costrouter-redis.yaml"
note_cmd "$BIN -q -c $OUT/costrouter-redis.yaml"
"$BIN" -q -c "$OUT/costrouter-redis.yaml" > "$RUN/costrouter-redis.log" 2>&1 &
PIDS+=($!); PID_costrouter_redis=$!
PORT_costrouter_redis=$(wait_listening "$RUN/costrouter-redis.log")

start_nginx nginx-1 1
start_nginx nginx-auto auto

# Portkey: its server listens on every interface unless told a host, which
# its CLI cannot: bench/loopback.cjs makes it bind 127.0.0.1.
PORT_portkey=$(free_port)
note_cmd "NODE_ENV=production node --require bench/loopback.cjs $PORTKEY_JS --port=$PORT_portkey --headless"
NODE_ENV=production node --require ./bench/loopback.cjs "$PORTKEY_JS" --port="$PORT_portkey" --headless \
    > "$RUN/portkey.log" 2>&1 &
PIDS+=($!); export PID_portkey=$!  # read through var()
wait_port "$PORT_portkey" "$RUN/portkey.log"
PORTKEY_HOST=http://$UPSTREAM/v1

SERVERS="direct costrouter costrouter-redis nginx-1 nginx-auto portkey"

# ---- load: wrk ----
ALL_TSV=$RUN/rounds.tsv
TSV=$RUN/results.tsv
: > "$ALL_TSV"
: > "$RUN/redis-calls.txt"
COST_LINES=
run_wrk() { # round mode conns server
    local r=$1 mode=$2 c=$3 name=$4 script=bench/chat.lua envs="" port pid cmd line out cpu_pids cpu_used
    [ "$mode" = stream ] && script=bench/chat-stream.lua
    [ "$name" = portkey ] && envs="BENCH_PORTKEY_HOST=$PORTKEY_HOST "
    port=$(var PORT "$name"); pid=$(var PID "$name")
    cmd="wrk -t$THREADS -c$c -d${DURATION}s --timeout 10s --latency -s $script http://127.0.0.1:$port"
    env $envs wrk -t"$THREADS" -c"$c" -d"${WARMUP}s" --timeout 10s -s "$script" \
        "http://127.0.0.1:$port" > /dev/null
    reset_peak_rss "$pid"
    [ "$name" = costrouter ] && : > "$RUN/cost.jsonl"
    [ "$name" = costrouter-redis ] && : > "$RUN/cost-redis.jsonl"
    [ "$r" = 1 ] && note_cmd "$envs$cmd"
    [ "$name" = costrouter-redis ] && "$REDIS_CLI" -p "$PORT_redis" config resetstat > /dev/null
    out=$RUN/wrk-$mode-$c-$name-$r.txt
    # costrouter-redis's CPU is its own and its redis-server's.
    cpu_pids=$pid
    [ "$name" = costrouter-redis ] && cpu_pids="$pid $PID_redis_server"
    # shellcheck disable=SC2086
    cpu_used=$(cpu_ticks $cpu_pids)
    env $envs $cmd > "$out"
    # shellcheck disable=SC2086
    cpu_used=$(( $(cpu_ticks $cpu_pids) - cpu_used ))
    line=$(grep '^BENCH ' "$out" || true)
    [ -n "$line" ] || { log "no result from: $cmd"; cat "$out" >&2; return 1; }
    # Script calls Redis ran during the run: 0 would mean the router fell
    # back to its local counters and the figure is not Redis's.
    [ "$name" = costrouter-redis ] && echo "$mode $c $r ${line#BENCH } $("$REDIS_CLI" -p "$PORT_redis" info commandstats |
        awk -F'[=,:]' '/^cmdstat_eval(sha)?:/ { n += $3 } END { print "calls=" n + 0 }')" >> "$RUN/redis-calls.txt"
    [ "$name" = costrouter ] && COST_LINES="$COST_LINES $mode/$c/round$r:$(wc -l < "$RUN/cost.jsonl")"
    echo "$line" | wrk_tsv "$mode" "$c" "$name" "$r" "$(rss_kb "$pid" VmHWM)" "$cpu_used" >> "$ALL_TSV"
    log "round $r: $(tail -n 1 "$ALL_TSV")"
}

for r in $(seq "$ROUNDS"); do
    for mode in plain stream; do
        for c in $CONNS; do
            for s in $SERVERS; do run_wrk "$r" "$mode" "$c" "$s"; done
        done
    done
done
# The best round of each server and load, in first-run order.
best_rounds "$ALL_TSV" > "$TSV"

# ---- time to first streamed token ----
TTFB_TSV=$RUN/ttfb.tsv
: > "$TTFB_TSV"
for s in direct costrouter nginx-1 portkey; do
    n=$TTFB_N extra=""
    # Portkey waits 25 ms before passing on a stream's first chunk: fewer samples.
    [ "$s" = portkey ] && { n=$((TTFB_N / 20 > 20 ? TTFB_N / 20 : 20)); extra=$PORTKEY_HOST; }
    note_cmd "$PROBE ttfb 127.0.0.1 $(var PORT "$s") $BODY $n $extra"
    # shellcheck disable=SC2086
    if line=$("$PROBE" ttfb 127.0.0.1 "$(var PORT "$s")" "$BODY" "$n" $extra 2> "$RUN/ttfb-$s.err"); then
        echo "$line" | ttfb_tsv "$s" >> "$TTFB_TSV"
    else
        echo "$s failed: $(head -c 200 "$RUN/ttfb-$s.err" | tr '\n' ' ')" >> "$TTFB_TSV"
    fi
    log "ttfb $(tail -n 1 "$TTFB_TSV")"
done

# ---- idle keep-alive connections on costrouter ----
RSS_BEFORE=$(rss_kb "$PID_costrouter" VmRSS)
reset_peak_rss "$PID_costrouter"
note_cmd "$PROBE idle 127.0.0.1 $PORT_costrouter $BODY $IDLE_CONNS"
"$PROBE" idle 127.0.0.1 "$PORT_costrouter" "$BODY" "$IDLE_CONNS" > "$RUN/idle.log" 2>&1 &
PIDS+=($!); PID_idle=$!
for _ in $(seq 600); do
    grep -q '^OPEN' "$RUN/idle.log" && break
    kill -0 "$PID_idle" 2>/dev/null || break
    sleep 0.1
done
if grep -q '^OPEN' "$RUN/idle.log"; then
    sleep 1
    IDLE_RSS=$(rss_kb "$PID_costrouter" VmRSS)
    IDLE_HWM=$(rss_kb "$PID_costrouter" VmHWM)
    IDLE_OK=1
else
    log "idle check failed:"; cat "$RUN/idle.log" >&2
    IDLE_OK=0
fi
kill -TERM "$PID_idle" 2>/dev/null || true

# ---- allocations per request ----
# A costrouter of each kind with bench/alloc_count.c preloaded: SIGUSR1
# zeroes its counts after a warm-up, SIGUSR2 writes them to a file.
ALLOC_COUNT=$BUILD/bench/alloc_count.so
: > "$RUN/allocs.txt"
count_allocs() { # name conf mode
    local name=$1 conf=$2 mode=$3 script=bench/chat.lua log counts pid port out req
    [ "$mode" = stream ] && script=bench/chat-stream.lua
    log=$RUN/allocs-$name-$mode.log; counts=$RUN/allocs-$name-$mode.txt
    ALLOC_COUNT_OUT=$counts LD_PRELOAD=$ALLOC_COUNT "$BIN" -q -c "$conf" > "$log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    port=$(wait_listening "$log")
    wrk -t"$THREADS" -c50 -d"${WARMUP}s" -s "$script" "http://127.0.0.1:$port" > /dev/null
    kill -USR1 "$pid"
    out=$(wrk -t"$THREADS" -c50 -d3s -s "$script" "http://127.0.0.1:$port")
    kill -USR2 "$pid"
    for _ in $(seq 50); do [ -s "$counts" ] && break; sleep 0.05; done
    kill -TERM "$pid" 2>/dev/null || true
    req=$(echo "$out" | sed -n 's/^BENCH requests=\([0-9]*\).*/\1/p')
    echo "$name $mode ${req:-0} $(cat "$counts" 2>/dev/null)" >> "$RUN/allocs.txt"
}
if [ -f "$ALLOC_COUNT" ]; then
    log "allocations per request"
    costrouter_conf "$ABS_OUT/run/cost-allocs.jsonl" > "$OUT/costrouter-allocs.yaml"
    costrouter_conf "$ABS_OUT/run/cost-allocs-redis.jsonl" \
        "store: { redis: \"redis://127.0.0.1:$PORT_redis/0\", on_failure: fail_open }" \
        > "$OUT/costrouter-redis-allocs.yaml"
    note_cmd "ALLOC_COUNT_OUT=FILE LD_PRELOAD=$ALLOC_COUNT $BIN -q -c $OUT/costrouter-allocs.yaml (and -redis-allocs.yaml); wrk -t$THREADS -c50 -d3s between SIGUSR1 and SIGUSR2"
    for mode in plain stream; do
        count_allocs costrouter "$OUT/costrouter-allocs.yaml" "$mode"
        count_allocs costrouter-redis "$OUT/costrouter-redis-allocs.yaml" "$mode"
    done
fi

# ---- the tokenizer's and the store's own benchmarks ----
log "tokenizer benchmark (one core), then the store's"
note_cmd "taskset -c 0 $TOKENIZE $TOKENS_CORPUS"
taskset -c 0 "$TOKENIZE" "$TOKENS_CORPUS" > "$RUN/tokenize.txt" 2>&1 || echo "failed" >> "$RUN/tokenize.txt"
note_cmd "taskset -c 0 node bench/tokenize_tiktoken.mjs $TOKENS_NPM $TOKENS_CORPUS"
taskset -c 0 node bench/tokenize_tiktoken.mjs "$TOKENS_NPM" "$TOKENS_CORPUS" >> "$RUN/tokenize.txt" 2>&1 \
    || echo "tiktoken failed" >> "$RUN/tokenize.txt"
note_cmd "$STORE_BENCH"
"$STORE_BENCH" > "$RUN/store.txt" 2>&1 || echo "failed" >> "$RUN/store.txt"

# ---- report ----
ver() { "$@" 2>&1 | head -n 1 || true; }
V_COSTROUTER=$(ver "$BIN" --version)
V_NGINX=$(ver "$NGINX" -v)
V_WRK=$(ver wrk -v | sed 's/ Copyright.*//')
V_NODE=$(ver node --version)
V_PORTKEY=$(node -p "require('./$PORTKEY_DIR/node_modules/@portkey-ai/gateway/package.json').version")
V_HONO=$(node -p "require('./$PORTKEY_DIR/node_modules/@hono/node-server/package.json').version")
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# The results files themselves do not count: the last run left them changed.
git diff --quiet HEAD -- . ':(exclude)bench/RESULTS*.md' 2>/dev/null ||
    GIT_REV="$GIT_REV (with uncommitted changes)"
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
MEM=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)

{
cat <<EOF
# Proxy benchmark: costrouter vs nginx vs Portkey

Written by \`make bench\` (bench/run.sh) on $(date -u '+%Y-%m-%d %H:%M UTC'). Do not edit by hand.

- Machine: $(nproc) CPUs ($CPU), $MEM, $(uname -sr); load average before the run
  $LOAD_BEFORE, after it $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine shows here).
  Everything (wrk, mockllm, the proxy under test) shares these CPUs on loopback.
- costrouter: $V_COSTROUTER, commit $GIT_REV. Config: one API backend (the mock), one
  route, one tenant with a budget, exact token counting (o200k_base), cost log on (a JSON
  line per request); \`costrouter\`: in-process store, \`costrouter-redis\`: Redis ($(ver "$REDIS" --version | cut -d' ' -f3))
  on loopback: a reservation before each request and a settlement after it, each tenant's
  of one loop turn in one script call.
- nginx: ${V_NGINX#nginx version: }; plain reverse proxy, upstream keepalive 64, HTTP/1.1,
  proxy_buffering off, access_log off; \`nginx-1\` = worker_processes 1 (costrouter runs one
  event loop), \`nginx-auto\` = worker_processes auto.
- Portkey AI gateway: @portkey-ai/gateway $V_PORTKEY (@hono/node-server $V_HONO pinned, see
  mk/bench.mk) on node $V_NODE, headers x-portkey-provider: openai and
  x-portkey-custom-host: the mock.
- Backend: mockllm, one process, 16 completion tokens, no delays (\`direct\` = wrk straight to it).
- Load: $V_WRK; $THREADS threads, ${DURATION} s per run after a ${WARMUP} s warm-up, best of
  $ROUNDS rounds by req/s (the whole set of runs once per round, rounds one after the other),
  POST /v1/chat/completions with the $(wc -c < "$BODY")-byte body of bench/chat.json and a Bearer key;
  the last message ends differently on every request (bench/chat.lua).
  Streamed latency is to the last chunk.
- Peak RSS: VmHWM summed over the server's processes (nginx: master + workers), reset before
  each run. Added latency: the server's p50/p99 minus direct's at the same load.
- CPU us/req: user + system CPU time of the server's processes during the run (from
  /proc/PID/stat; costrouter-redis: the router and its redis-server; direct: mockllm), divided
  by the requests served. Requests/s depends on how the two CPUs are shared between wrk,
  mockllm and the server; CPU per request is what the server itself costs.

## Load (wrk)

| mode | conns | server | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | peak RSS MB | CPU us/req | errors | round |
|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
awk '
    { key = $1 " " $2
      rps = $4 / ($5 / 1e6); p50 = $6 / 1000; p99 = $7 / 1000
      if ($3 == "direct") { d50[key] = p50; d99[key] = p99 }
      printf "| %s | %s | %s | %.0f | %.3f | %.3f | %s | %s | %.1f | %s | %s | %s |\n", $1, $2, $3, rps, p50, p99,
             $3 == "direct" ? "-" : sprintf("%+.3f", p50 - d50[key]),
             $3 == "direct" ? "-" : sprintf("%+.3f", p99 - d99[key]),
             $10 / 1024, $12, ($8 + $9 == 0) ? "0" : sprintf("%d non-2xx, %d socket", $8, $9), $11 }' "$TSV"
cat <<EOF

errors: non-2xx answers and socket errors (connect/read/write/timeout) wrk counted; round: the
round shown. Every round's figures: $RUN/rounds.tsv.

## Ratios

| mode | conns | costrouter / nginx-1 req/s | costrouter / nginx-auto req/s | costrouter / portkey req/s | costrouter-redis / nginx-1 req/s | costrouter-redis / costrouter req/s | costrouter +p99 ms | costrouter-redis +p99 ms | nginx-1 +p99 ms |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
awk '
    { key = $1 " " $2; rps[key, $3] = $4 / ($5 / 1e6); p99[key, $3] = $7 / 1000
      if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
    END { for (i = 1; i <= n; i++) { k = order[i]; split(k, mc, " ")
            printf "| %s | %s | %.2fx | %.2fx | %.1fx | %.2fx | %.2fx | %+.3f | %+.3f | %+.3f |\n", mc[1], mc[2],
                   rps[k, "costrouter"] / rps[k, "nginx-1"], rps[k, "costrouter"] / rps[k, "nginx-auto"],
                   rps[k, "costrouter"] / rps[k, "portkey"],
                   rps[k, "costrouter-redis"] / rps[k, "nginx-1"], rps[k, "costrouter-redis"] / rps[k, "costrouter"],
                   p99[k, "costrouter"] - p99[k, "direct"], p99[k, "costrouter-redis"] - p99[k, "direct"],
                   p99[k, "nginx-1"] - p99[k, "direct"] } }' "$TSV"
cat <<EOF

The same ratios round by round (the runs of one round are seconds apart, so drift on the
machine touches both sides alike), and their median: the best rounds above can come from
different rounds for each server. Then the CPU time per request of costrouter over nginx-1's,
round by round (below 1: costrouter did its work, token counting, routing, budget and cost
log included, on less CPU than nginx spent passing the request on).

| mode | conns | costrouter / nginx-1, each round | median | costrouter-redis / nginx-1, each round | median | CPU per request, costrouter / nginx-1, each round | median |
|---|---:|---|---:|---|---:|---|---:|
EOF
awk '
    function median(list,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { key = $1 " " $2; r = $11; rps[key, $3, r] = $4 / ($5 / 1e6); cpu[key, $3, r] = $12
      if (!(key in seen)) { seen[key] = 1; order[++n] = key }
      if (r > rounds) rounds = r }
    END { for (i = 1; i <= n; i++) { k = order[i]; split(k, mc, " "); a = b = c = ""
            for (r = 1; r <= rounds; r++) {
                a = a sprintf(" %.2f", rps[k, "costrouter", r] / rps[k, "nginx-1", r])
                b = b sprintf(" %.2f", rps[k, "costrouter-redis", r] / rps[k, "nginx-1", r])
                c = c sprintf(" %.2f", cpu[k, "nginx-1", r] > 0 ? cpu[k, "costrouter", r] / cpu[k, "nginx-1", r] : 0) }
            printf "| %s | %s |%s | %.2fx |%s | %.2fx |%s | %.2fx |\n", mc[1], mc[2], a, median(a), b, median(b),
                   c, median(c) } }' "$ALL_TSV"
cat <<EOF

costrouter-redis, Redis script calls per run (EVALSHA and EVAL, from \`INFO commandstats\`
reset before each run; each call carries one tenant's settlements and reservations of one
loop turn):

| mode | conns | round | requests | script calls | requests per call |
|---|---:|---:|---:|---:|---:|
EOF
awk '{ for (i = 4; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
       printf "| %s | %s | %s | %d | %d | %s |\n", $1, $2, $3, v["requests"], v["calls"],
              (v["calls"] > 0 ? sprintf("%.1f", v["requests"] / v["calls"]) : "Redis not used") }' \
    "$RUN/redis-calls.txt"
cat <<EOF

## Time to first streamed token (one connection, sequential requests)

| server | requests | p50 us | p90 us | p99 us | +p50 us over direct |
|---|---:|---:|---:|---:|---:|
EOF
awk '$2 == "failed:" { print "| " $0 " |||||"; next }
     $1 == "direct" { d = $3 }
     { printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $1 == "direct" ? "-" : sprintf("%+d", $3 - d) }' \
    "$TTFB_TSV"
cat <<EOF

Portkey holds a stream's first chunk for 25 ms before passing it on (a setTimeout in its
stream reader), hence its figure.

## Idle keep-alive connections (costrouter)

EOF
if [ "$IDLE_OK" = 1 ]; then
    awk -v n="$IDLE_CONNS" -v b="$RSS_BEFORE" -v r="$IDLE_RSS" -v h="$IDLE_HWM" 'BEGIN {
        printf "%d connections, each after one chat request, held open and idle: RSS %.1f MB", n, r / 1024
        printf " (%.1f MB before them, peak %.1f MB while opening): %.2f KB per connection.\n",
               b / 1024, h / 1024, (r - b) / n }'
else
    echo "The idle check failed (see $RUN/idle.log)."
fi
cat <<EOF

Cost log lines written during the measured costrouter runs (each run's requests, plus the
warm-up's last answers):${COST_LINES}.

## Allocations per request (costrouter, 50 connections)

malloc, calloc and realloc calls the whole process made during a 3 s wrk run, counted by
bench/alloc_count.c (preloaded) after a warm-up, divided by the requests served. What is left
with the in-process store is OpenSSL's (one context per SHA-256 of the tenant key); with Redis,
hiredis's reply objects and the batch, shared by the requests of one script call.

| server | mode | requests | malloc | calloc | realloc | per request |
|---|---|---:|---:|---:|---:|---:|
$(awk '{ for (i = 4; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
         t = v["malloc"] + v["calloc"] + v["realloc"]
         printf "| %s | %s | %d | %d | %d | %d | %.2f |\n", $1, $2, $3, v["malloc"], v["calloc"],
                v["realloc"], ($3 > 0 ? t / $3 : 0) }' "$RUN/allocs.txt")

## Tokenizer (bench/tokenize.c, one core)

Exact counts with the three encodings: the whole test corpus (English, code, JSON, CJK, emoji,
long runs, invalid UTF-8), a 1 KB chat prompt, and 1 MB random bytes; then npm \`tiktoken\`
(OpenAI's Rust tokenizer as WASM, \`tiktoken_*\` lines) on the same texts. Uncached: the
router also remembers the counts of recent long strings (system prompts, earlier turns), which
this does not use. \`make bench-tokenize\` adds 1 MB runs of one repeated character.

\`\`\`
$(grep -v '^run_1mb_' "$RUN/tokenize.txt")
\`\`\`

## Store (bench/store.c)

cache_begin + cache_settle (one request's budget reservation and settlement) with the
in-process store and with Redis (a redis-server the benchmark starts), same loop, same run.

\`\`\`
$(grep -v ' INFO ' "$RUN/store.txt")
\`\`\`

## Commands

\`\`\`
$(cat "$CMDS")
\`\`\`

Configs: $OUT/costrouter.yaml, $OUT/costrouter-redis.yaml, $OUT/nginx-1/nginx.conf, $OUT/nginx-auto/nginx.conf (generated
by bench/run.sh); raw wrk output in $RUN/ (wrk-MODE-CONNS-SERVER-ROUND.txt).
EOF
} > "$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"
sed -n '/^## Load/,/^## Commands/p' "$RESULTS" | sed '$d'
log "written: $RESULTS"
