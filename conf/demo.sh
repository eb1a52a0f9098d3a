#!/usr/bin/env bash
# `make run`: two simulated LLM servers (a GPU pool on :9101 and an API tier
# on :9102) and the router on conf/demo.yaml (:8080), in the foreground.
# Ctrl-C stops all three.
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
pids=()
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
}
trap stop EXIT INT TERM

"$BUILD/mockllm" --listen 127.0.0.1:9101 --ttft-ms 40 --token-delay-ms 15 >/dev/null &
pids+=($!)
"$BUILD/mockllm" --listen 127.0.0.1:9102 --ttft-ms 150 --token-delay-ms 5 \
    --require-key sk-mock-upstream >/dev/null &
pids+=($!)

cat <<'MSG'
costrouter demo: router on http://127.0.0.1:8080, tenant key sk-demo-tenant
  backends: gpu-llama-8b (simulated GPU pool, :9101), api-gpt-4o-mini (simulated API, :9102)
try, in another terminal:
  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Authorization: Bearer sk-demo-tenant' \
       -H 'Content-Type: application/json' \
       -d '{"model":"chat","messages":[{"role":"user","content":"Hello there"}]}' -i
cost log: build/demo-cost.jsonl     spend kept in: build/demo-spend.jsonl     stop: Ctrl-C
MSG
./costrouter -c conf/demo.yaml &
pids+=($!)
wait "${pids[2]}"
