#!/usr/bin/env bash
# bench/tls.sh: what serving clients over TLS costs (`make bench-tls`).
#
# costrouter and nginx (worker_processes 1: costrouter runs one loop),
# each once as a plain listener and once as a TLS one with the same
# certificate (a throwaway test CA's, P-256), all in front of one mockllm
# on loopback, side by side in one run:
#   - wrk (bench/chat.lua, bench/chat-stream.lua) over keep-alive
#     connections, https for the TLS listeners, non-streamed and streamed,
#     at each of BENCH_CONNS connections, BENCH_ROUNDS rounds taking turns;
#     the best round of each counts. Measured as in bench/run.sh:
#     requests/s, p50/p99 latency, peak RSS and CPU time per request;
#   - time to first streamed token on one keep-alive connection
#     (bench/probe.c ttfb, over TLS for the TLS listeners);
#   - BENCH_IDLE_CONNS idle keep-alive connections on each listener, each
#     having carried one request (bench/probe.c idle), and the RSS they add.
# Prints the results and writes them to bench/RESULTS-tls.md with the
# commands, versions and machine. Every server is stopped by pid on exit.
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
RESULTS=${BENCH_RESULTS:-bench/RESULTS-tls.md}
MOCK=$BUILD/mockllm
PROBE=$BUILD/bench/probe
BODY=bench/chat.json
OUT=$BUILD/bench-tls
RUN=$OUT/run
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

for f in "$BIN" "$MOCK" "$PROBE" "$NGINX"; do
    [ -e "$f" ] || { echo "bench/tls.sh: $f is missing (run: make bench-tls)" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "bench/tls.sh: wrk is missing (run: make bench-tls)" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$RUN"
ABS_OUT=$(cd "$OUT" && pwd)
CMDS=$RUN/commands.txt
# shellcheck source=bench/lib.sh
. bench/lib.sh

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_CONNS + 1000)) ]; then
    IDLE_CONNS=$(( $(ulimit -n) - 1000 ))
    log "bench/tls.sh: open-file limit $(ulimit -n): idle check reduced to $IDLE_CONNS connections"
fi
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- servers ----
CA=$ABS_OUT/ca
note_cmd "tests/support/make-test-ca.sh $CA"
tests/support/make-test-ca.sh "$CA"

log "starting mockllm, costrouter and nginx, each plain and TLS"
note_cmd "$MOCK --listen 127.0.0.1:0 --tokens 16 --token-delay-ms 0"
"$MOCK" --listen 127.0.0.1:0 --tokens 16 --token-delay-ms 0 > "$RUN/mockllm.log" 2>&1 &
PIDS+=($!)
UPSTREAM=127.0.0.1:$(wait_listening "$RUN/mockllm.log")

start_costrouter() { # name [extra_yaml]
    local name=$1 v
    v=$(echo "$name" | tr - _)
    costrouter_conf "$ABS_OUT/run/cost-$name.jsonl" "${2:-}" > "$OUT/$name.yaml"
    note_cmd "$BIN -q -c $OUT/$name.yaml"
    "$BIN" -q -c "$OUT/$name.yaml" > "$RUN/$name.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$v=$!; PORT_$v=$(wait_listening "$RUN/$name.log")"
}
start_costrouter costrouter
start_costrouter costrouter-tls "tls: { cert_file: $CA/server.crt, key_file: $CA/server.key }"
start_nginx nginx-1 1
start_nginx nginx-1-tls 1 "$CA"

SERVERS="costrouter costrouter-tls nginx-1 nginx-1-tls"
is_tls() { case $1 in *-tls) return 0 ;; *) return 1 ;; esac; }
url() { if is_tls "$1"; then echo "https://127.0.0.1:$(var PORT "$1")"; else echo "http://127.0.0.1:$(var PORT "$1")"; fi; }

# ---- load: wrk ----
ALL_TSV=$RUN/rounds.tsv
TSV=$RUN/results.tsv
: > "$ALL_TSV"
run_wrk() { # round mode conns server
    local r=$1 mode=$2 c=$3 name=$4 script=bench/chat.lua pid cmd line out cpu_used
    [ "$mode" = stream ] && script=bench/chat-stream.lua
    pid=$(var PID "$name")
    cmd="wrk -t$THREADS -c$c -d${DURATION}s --timeout 10s --latency -s $script $(url "$name")"
    wrk -t"$THREADS" -c"$c" -d"${WARMUP}s" --timeout 10s -s "$script" "$(url "$name")" > /dev/null
    reset_peak_rss "$pid"
    [ "$r" = 1 ] && note_cmd "$cmd"
    out=$RUN/wrk-$mode-$c-$name-$r.txt
    cpu_used=$(cpu_ticks "$pid")
    $cmd > "$out"
    cpu_used=$(( $(cpu_ticks "$pid") - cpu_used ))
    line=$(grep '^BENCH ' "$out" || true)
    [ -n "$line" ] || { log "no result from: $cmd"; cat "$out" >&2; return 1; }
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
best_rounds "$ALL_TSV" > "$TSV"

# ---- time to first streamed token ----
TTFB_TSV=$RUN/ttfb.tsv
: > "$TTFB_TSV"
probe_env() { if is_tls "$1"; then echo "PROBE_TLS_CA=$CA/ca.crt"; fi; }
# A probe command line as the results show it.
probe_cmd() { # server ttfb|idle n
    local e
    e=$(probe_env "$1")
    echo "${e:+$e }$PROBE $2 127.0.0.1 $(var PORT "$1") $BODY $3"
}
for s in $SERVERS; do
    note_cmd "$(probe_cmd "$s" ttfb "$TTFB_N")"
    # shellcheck disable=SC2046
    if line=$(env $(probe_env "$s") "$PROBE" ttfb 127.0.0.1 "$(var PORT "$s")" "$BODY" "$TTFB_N" \
              2> "$RUN/ttfb-$s.err"); then
        echo "$line" | ttfb_tsv "$s" >> "$TTFB_TSV"
    else
        echo "$s failed: $(head -c 200 "$RUN/ttfb-$s.err" | tr '\n' ' ')" >> "$TTFB_TSV"
    fi
    log "ttfb $(tail -n 1 "$TTFB_TSV")"
done

# ---- idle keep-alive connections ----
IDLE_TSV=$RUN/idle.tsv
: > "$IDLE_TSV"
for s in $SERVERS; do
    pid=$(var PID "$s")
    before=$(rss_kb "$pid" VmRSS)
    note_cmd "$(probe_cmd "$s" idle "$IDLE_CONNS")"
    # shellcheck disable=SC2046
    env $(probe_env "$s") "$PROBE" idle 127.0.0.1 "$(var PORT "$s")" "$BODY" "$IDLE_CONNS" \
        > "$RUN/idle-$s.log" 2>&1 &
    PIDS+=($!); idle_pid=$!
    for _ in $(seq 1200); do
        grep -q '^OPEN' "$RUN/idle-$s.log" && break
        kill -0 "$idle_pid" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q '^OPEN' "$RUN/idle-$s.log"; then
        sleep 1
        echo "$s $IDLE_CONNS $before $(rss_kb "$pid" VmRSS)" >> "$IDLE_TSV"
    else
        echo "$s failed: $(head -c 200 "$RUN/idle-$s.log" | tr '\n' ' ')" >> "$IDLE_TSV"
    fi
    kill -TERM "$idle_pid" 2>/dev/null || true
    wait "$idle_pid" 2>/dev/null || true
    log "idle $(tail -n 1 "$IDLE_TSV")"
    sleep 1 # the server closes those connections
done

# ---- report ----
ver() { "$@" 2>&1 | head -n 1 || true; }
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- . ':(exclude)bench/RESULTS*.md' 2>/dev/null ||
    GIT_REV="$GIT_REV (with uncommitted changes)"
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)

# "costrouter-tls / nginx-1-tls" and "TLS / plain" ratios for one load.
ratio() { # mode conns field(4=rps,12=cpu) a b
    awk -v m="$1" -v c="$2" -v f="$3" -v a="$4" -v b="$5" '
        $1 == m && $2 == c { x = (f == 4 ? $4 / $5 : $f); v[$3] = x }
        END { if (v[a] > 0 && v[b] > 0) printf "%.2fx", v[a] / v[b]; else printf "-" }' "$TSV"
}

{
cat <<EOF
# TLS benchmark: costrouter and nginx, plain and TLS listeners

Written by \`make bench-tls\` (bench/tls.sh) on $(date -u '+%Y-%m-%d %H:%M UTC'). Do not edit by hand.

- Machine: $(nproc) CPUs ($CPU), $(uname -sr); load average before the run $LOAD_BEFORE,
  after it $(cut -d' ' -f1-3 /proc/loadavg). wrk, mockllm and the server share these CPUs.
- costrouter: $(ver "$BIN" --version), commit $GIT_REV; the config of bench/run.sh (exact
  token counting, budget, cost log, in-process store), with \`tls:\` for \`costrouter-tls\`.
- nginx: $(ver "$NGINX" -v | sed 's/^nginx version: //'), worker_processes 1, the reverse proxy
  of bench/run.sh, with \`listen ... ssl\` for \`nginx-1-tls\` (its defaults otherwise).
- Certificate: P-256 ECDSA from tests/support/make-test-ca.sh, the same for both. The load,
  $(ver wrk -v | sed 's/ Copyright.*//'), negotiates TLS 1.3 on keep-alive connections, so
  handshakes are a small part of it; the idle check makes one handshake per connection.
- Each figure: the best of $ROUNDS rounds of ${DURATION} s (after ${WARMUP} s of warm-up), the
  servers taking turns in each round; CPU is the server's own (user + system) per request.

## Load (wrk -t$THREADS, keep-alive)

| mode | conns | server | req/s | p50 ms | p99 ms | CPU us/req | peak RSS MB | non-2xx | socket errors |
|---|---:|---|---:|---:|---:|---:|---:|---:|---:|
EOF
awk '{ printf "| %s | %s | %s | %.0f | %.2f | %.2f | %s | %.1f | %s | %s |\n",
       $1, $2, $3, $4 / ($5 / 1e6), $6 / 1000, $7 / 1000, $12, $10 / 1024, $8, $9 }' "$TSV"
cat <<EOF

Ratios (requests/s, and CPU per request):

| mode | conns | costrouter-tls / nginx-1-tls req/s | CPU | costrouter-tls / costrouter req/s | CPU | nginx-1-tls / nginx-1 req/s | CPU |
|---|---:|---:|---:|---:|---:|---:|---:|
EOF
for mode in plain stream; do
    for c in $CONNS; do
        echo "| $mode | $c | $(ratio "$mode" "$c" 4 costrouter-tls nginx-1-tls) | $(ratio "$mode" "$c" 12 costrouter-tls nginx-1-tls) | $(ratio "$mode" "$c" 4 costrouter-tls costrouter) | $(ratio "$mode" "$c" 12 costrouter-tls costrouter) | $(ratio "$mode" "$c" 4 nginx-1-tls nginx-1) | $(ratio "$mode" "$c" 12 nginx-1-tls nginx-1) |"
    done
done
cat <<EOF

## Time to first streamed token (one keep-alive connection, $TTFB_N requests)

| server | p50 us | p90 us | p99 us |
|---|---:|---:|---:|
EOF
awk 'NF == 5 { printf "| %s | %s | %s | %s |\n", $1, $3, $4, $5; next } { print "| " $0 " | | | |" }' "$TTFB_TSV"
cat <<EOF

## Idle keep-alive connections

Each connection carried one request, then stayed open and idle; RSS of the server's
processes before and with them.

| server | connections | RSS before MB | RSS with them MB | KiB per connection |
|---|---:|---:|---:|---:|
EOF
awk 'NF == 4 { printf "| %s | %d | %.1f | %.1f | %.1f |\n", $1, $2, $3 / 1024, $4 / 1024, ($4 - $3) / $2; next }
     { print "| " $0 " | | | | |" }' "$IDLE_TSV"
cat <<EOF

## Commands

\`\`\`
$(cat "$CMDS")
\`\`\`
EOF
} > "$RUN/RESULTS.md"
cp "$RUN/RESULTS.md" "$RESULTS"
cat "$RESULTS"
