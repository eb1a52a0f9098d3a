#!/bin/bash
# bench/instructions.sh: user-space instructions per request, counted by
# callgrind, for one or more router binaries (bench/PROFILE.md, fifth and
# sixth passes). Unlike timings, the count does not depend on how busy the
# machine is, so two builds can be compared on a shared machine.
#
# usage: bench/instructions.sh [BIN...]      (default: ./costrouter)
# env:   SCRIPT=bench/chat-stream.lua for streamed requests (default
#        bench/chat.lua); CONF= a router config (default
#        build/bench/costrouter.yaml, written by `make bench`).
# Needs valgrind and wrk; the backend is build/mockllm (16 tokens).
# Prints "BIN requests=N instructions/request=M" per binary.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=${SCRIPT:-bench/chat.lua}
CONF=${CONF:-build/bench/costrouter.yaml}
W=$(mktemp -d /tmp/costrouter-instr.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
[ $# -gt 0 ] || set -- ./costrouter

# The first line a server prints is "listening on HOST:PORT".
port_of() {
    for _ in $(seq 300); do
        grep -q listening "$1" 2>/dev/null && break
        sleep 0.1
    done
    grep -m1 -o 'listening on [0-9.]*:[0-9]*' "$1" | sed 's/.*://'
}

build/mockllm --listen 127.0.0.1:0 --tokens 16 > "$W/mock.log" 2>&1 &
PIDS+=($!)
mock_port=$(port_of "$W/mock.log")
sed -e "s#127.0.0.1:[0-9]*/v1#127.0.0.1:$mock_port/v1#" -e "s#cost_log: .*#cost_log: $W/cost.jsonl#" \
    "$CONF" > "$W/router.yaml"
for bin in "$@"; do
    out="$W/callgrind.out"
    rm -f "$out"*
    # Instrumentation starts off: loading the token table is not a request.
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$bin" -q -c "$W/router.yaml" > "$W/router.log" 2>&1 &
    pid=$!
    PIDS+=($pid)
    port=$(port_of "$W/router.log")
    wrk -t1 -c4 -d2s -s "$SCRIPT" "http://127.0.0.1:$port" > /dev/null # warm-up
    callgrind_control -i on "$pid" > /dev/null 2>&1
    wrk -t1 -c4 -d5s -s "$SCRIPT" "http://127.0.0.1:$port" > "$W/wrk.txt"
    callgrind_control -i off "$pid" > /dev/null 2>&1
    callgrind_control -d "$pid" > /dev/null 2>&1
    requests=$(grep -o 'requests=[0-9]*' "$W/wrk.txt" | cut -d= -f2)
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    instructions=$(cat "$out"* | grep -a '^totals:' | awk '{s += $2} END {print s}')
    echo "$bin requests=$requests instructions/request=$((instructions / requests))"
done
