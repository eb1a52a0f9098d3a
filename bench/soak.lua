-- bench/soak.lua: wrk script for bench/soak.sh. A mix of what a router
-- meets: plain and streamed chat requests from a tenant with room and one
-- whose budget runs out, various max_tokens, repeats the response cache
-- answers, malformed JSON, upstreams that break mid-stream or answer 429.
-- Each wrk thread numbers its own requests; the mix follows that number.
local f = assert(io.open(os.getenv("SOAK_BODY") or "bench/chat.json", "rb"))
local body = f:read("*a"):gsub("%s+$", "")
f:close()
local cut = body:find('"}]}$')
assert(cut, "bench/chat.json must end with its last message")
local head, tail = body:sub(1, cut - 1), body:sub(cut)
local n = 0

function request()
    n = n + 1
    local key = (n % 3 == 0) and "sk-soak-poor" or "sk-soak-rich"
    local b = head .. " #" .. n .. tail
    local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
    if n % 2 == 0 then b = b:gsub('"stream": false', '"stream": true') end
    if n % 5 == 0 then b = b:gsub('"max_tokens": [0-9]+', '"max_tokens": ' .. (n % 50)) end
    if n % 23 == 0 then b = (head .. tail):gsub('"temperature": [0-9.]+', '"temperature": 0') end
    if n % 17 == 0 then b = b:sub(1, #b - 3) end
    if n % 29 == 0 then headers["x-mock-fault"] = "close-midstream" end
    if n % 31 == 0 then
        headers["x-mock-status"] = "429"
        headers["x-mock-retry-after"] = "0.5"
    end
    return wrk.format("POST", "/v1/chat/completions", headers, b)
end
