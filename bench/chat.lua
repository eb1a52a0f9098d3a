-- bench/chat.lua: wrk script for bench/run.sh. Every request is a POST
-- /v1/chat/completions with the ~1 KB chat body of bench/chat.json and a
-- Bearer tenant key. bench/chat-stream.lua sets BENCH_STREAM first.
--
-- Environment: BENCH_BODY (default bench/chat.json), BENCH_KEY (default
-- sk-demo-tenant), BENCH_STREAM=1 for "stream": true, BENCH_PORTKEY_HOST
-- (Portkey only: the upstream base URL, sent as x-portkey-custom-host).
-- done() prints one machine-readable line: "BENCH key=value ...".

local f = assert(io.open(os.getenv("BENCH_BODY") or "bench/chat.json", "rb"))
local body = f:read("*a"):gsub("%s+$", "")
f:close()
if BENCH_STREAM or os.getenv("BENCH_STREAM") == "1" then
    local n
    body, n = body:gsub('"stream": false', '"stream": true')
    assert(n == 1, "chat.json must hold \"stream\": false")
end

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-demo-tenant")
local custom_host = os.getenv("BENCH_PORTKEY_HOST")
if custom_host and custom_host ~= "" then
    wrk.headers["x-portkey-provider"] = "openai"
    wrk.headers["x-portkey-custom-host"] = custom_host
end

-- The last message differs on every request (" #THREAD-N" appended),
-- as the newest turn of a real conversation does, while the system prompt
-- and the earlier turns repeat: a server cannot answer from a cache of
-- whole bodies, and counts tokens of new text on every request.
local cut = body:find('"}]}$')
assert(cut, "chat.json must end with the last message's content")
local head, tail = body:sub(1, cut - 1), body:sub(cut)
local threads, n = 0, 0
thread_id = 0 -- a global: setup() sets it in each thread's Lua state
function setup(thread)
    threads = threads + 1
    thread:set("thread_id", threads)
end
function request()
    n = n + 1
    return wrk.format(nil, nil, nil, head .. " #" .. thread_id .. "-" .. n .. tail)
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d " ..
        "connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, summary.duration, latency:percentile(50),
        latency:percentile(99), e.status, e.connect, e.read, e.write, e.timeout))
end
