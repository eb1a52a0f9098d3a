-- bench/chat-stream.lua: the streaming variant of bench/chat.lua
-- ("stream": true; wrk's latency is then the time to the last chunk).
BENCH_STREAM = true
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "chat.lua")
