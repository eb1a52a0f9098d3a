/*
 * bench/mockllm/api.c: what mockllm answers.
 *
 * Endpoints: POST /v1/chat/completions, POST /v1/completions,
 * POST /v1/embeddings, POST /v1/responses, POST /v1/messages (Anthropic),
 * POST /v1/messages/count_tokens (Anthropic), GET /v1/models, and for tests
 * GET /mock/stats and GET /mock/last-request. Bodies are parsed with cJSON; answers are built
 * with printf into reusable buffers.
 *
 * prompt_tokens (deterministic, so tests can predict usage):
 *   words(s) = number of maximal runs of non-whitespace bytes in s
 *              (whitespace: space, \t, \n, \r, \f, \v).
 *   chat:        3 + sum over messages of (4 + words(content)); content is
 *                a string, or an array of parts whose "text" strings count.
 *   completions: words of "prompt" (a string, or the sum over an array of
 *                strings); a token-id array counts its length, an array of
 *                token-id arrays the sum of their lengths.
 *   embeddings:  the same rule over "input".
 *   responses:   the chat rule with each message that the request carries
 *                counted as a chat message: 3 + (4 + words(instructions))
 *                when given + for "input" as a string 4 + words(input),
 *                as an array, per item 4 + words of its text (a message's
 *                content string or its parts' "text", a function_call's
 *                "arguments", a function_call_output's "output").
 *   messages:    (Anthropic's) the chat rule over "system" (when given, a
 *                message of 4 + words of its string or its blocks' "text")
 *                and "messages" (content a string or blocks, by "text").
 *                Reported as Anthropic does: input_tokens is that count
 *                less x-mock-cached-tokens (cache_read_input_tokens) and
 *                x-mock-cache-write-tokens (cache_creation_input_tokens), of which
 *                x-mock-cache-write-1h-tokens are for an hour (cache_creation's
 *                ephemeral_1h_input_tokens, the rest ephemeral_5m_input_tokens).
 *                x-mock-web-searches: N adds "server_tool_use":
 *                {"web_search_requests": N} to the usage (message_start's: 0).
 *                Requires x-api-key (the --require-key value when given;
 *                401 authentication_error without) and anthropic-version
 *                (400 without, or empty), as Anthropic's API does.
 *   count_tokens: (Anthropic's) the messages rule, answered as
 *                {"input_tokens": N} after ttft, with the same
 *                requirements; faults and x-mock-status apply.
 * completion_tokens = the token count (--tokens / x-mock-tokens, default 16),
 * capped by max_completion_tokens or max_tokens (messages: max_tokens,
 * stop_reason "max_tokens" when capped, else "end_turn"), or for responses
 * max_output_tokens (finish_reason "length", or status "incomplete", when
 * capped, else "stop"). Responses report x-mock-cached-tokens (capped by
 * the prompt) as input_tokens_details.cached_tokens; with x-mock-web-searches: N
 * their output has N web_search_call items before the message (a stream: an
 * output_item.added and .done event for each, after response.created), and
 * with x-mock-file-searches: M, M file_search_call items after those.
 * x-mock-cost-micro: N adds what a host that reports its cost says to the
 * usage of chat, completions and responses: "cost": N / 1e6 (OpenRouter's),
 * or with x-mock-cost-shape: object "cost": {..., "total_cost": N / 1e6}
 * (Perplexity's).
 * Token i is the word WORDS[i % 16]; the text is the tokens joined by single
 * spaces, so a stream's deltas are "The", " quick".
 *
 * Timing: a streamed token i goes out at ttft + i * token_delay; the SSE
 * headers go with token 0 (at once with x-mock-head-first: 1, as vLLM and
 * TGI send them), the end (usage chunk, [DONE]) with the last token, or
 * done_delay after it. A non-streamed completion goes out whole
 * when its last token would have: ttft + (completion_tokens - 1) *
 * token_delay. Embeddings and models wait ttft only. Errors and faults are
 * immediate.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bench/mockllm/internal.h"
#include "common/http_status.h"
#include "common/log.h"

enum endpoint {
    EP_CHAT,
    EP_COMPLETIONS,
    EP_EMBEDDINGS,
    EP_RESPONSES,
    EP_MESSAGES,
    EP_COUNT_TOKENS,
    EP_MODELS
};

#define EMBEDDING_DIM 8
#define MAX_DELAY_MS 600000
#define MAX_TOKENS 1000000
/* x-mock-cost-micro: up to $1,000. */
#define MAX_COST_MICRO 1000000000
#define MAX_EVENT_PAD (64 << 20)

static const char *const WORDS[16] = {"The",   "quick",  "brown",  "fox",  "jumps", "over",
                                      "the",   "lazy",   "dog",    "while", "mock",  "tokens",
                                      "stream", "past",  "the",    "router"};

static struct buf scratch; /* body or event being built; reused */

/* Out of memory in a test double: fail loudly rather than send a truncated
 * answer that a test could mistake for a router bug. */
static void put(struct buf *b, const void *p, size_t n)
{
    if (buf_append(b, p, n) != 0) {
        log_error("out of memory");
        abort();
    }
}

static void puts_(struct buf *b, const char *s)
{
    put(b, s, strlen(s));
}

static void putf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(struct buf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(tmp)) {
        log_error("putf: formatted piece too long");
        abort();
    }
    put(b, tmp, (size_t)n);
}

/* Append s as the inside of a JSON string (no quotes). */
static void put_escaped(struct buf *b, const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            char e[2] = {'\\', (char)ch};
            put(b, e, 2);
        } else if (ch < 0x20) {
            putf(b, "\\u%04x", ch);
        } else {
            put(b, s, 1);
        }
    }
}

static int words(const char *s)
{
    int n = 0, in_word = 0;

    for (; *s; s++) {
        int space = *s == ' ' || (*s >= '\t' && *s <= '\r');
        if (!space && !in_word)
            n++;
        in_word = !space;
    }
    return n;
}

/* Extra header lines for the connection's reuse: HTTP/1.1 defaults to
 * keep-alive, HTTP/1.0 must be told. */
static const char *connection_header(const struct mockllm_conn *c)
{
    if (!c->keep_alive)
        return "Connection: close\r\n";
    if (c->parser.http_major == 1 && c->parser.http_minor == 0)
        return "Connection: keep-alive\r\n";
    return "";
}

/* A 429's Retry-After and retry-after-ms lines: x-mock-retry-after(-ms)
 * over --retry-after. */
static void put_retry_after(struct mockllm_conn *c, struct buf *b)
{
    const char *secs = mockllm__header(&c->req, "x-mock-retry-after");
    const char *ms = mockllm__header(&c->req, "x-mock-retry-after-ms");

    if (secs == NULL)
        secs = c->srv->opts.retry_after;
    /* The ms one first: a client must prefer it wherever it comes. */
    if (ms != NULL)
        putf(b, "retry-after-ms: %s\r\n", ms);
    if (secs != NULL)
        putf(b, "Retry-After: %s\r\n", secs);
}

/* Append a whole response with a JSON body (taken from scratch) to b. */
static void put_response(struct mockllm_conn *c, struct buf *b, int status)
{
    putf(b, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n", status,
         http_status_text(status), scratch.len);
    if (status == 429)
        put_retry_after(c, b);
    puts_(b, c->srv->pad_header);
    putf(b, "%s\r\n", connection_header(c));
    put(b, scratch.data, scratch.len);
}

/* An OpenAI-style error body into scratch. */
static void put_error_body(const char *type, const char *code, const char *message)
{
    buf_reset(&scratch);
    puts_(&scratch, "{\"error\":{\"message\":\"");
    put_escaped(&scratch, message);
    putf(&scratch, "\",\"type\":\"%s\",\"param\":null,\"code\":", type);
    if (code != NULL)
        putf(&scratch, "\"%s\"}}", code);
    else
        puts_(&scratch, "null}}");
}

/* Answer now with an OpenAI-style error and finish the request. */
static void answer_error(struct mockllm_conn *c, int status, const char *type, const char *code,
                         const char *message)
{
    put_error_body(type, code, message);
    put_response(c, &c->out, status);
    mockllm__conn_done(c);
}

/* A 204 or 304: the head alone. A 304 says the Content-Length its 200
 * would have had (RFC 9110 allows it), which a client must not wait for. */
static void answer_bodyless(struct mockllm_conn *c, int status)
{
    putf(&c->out, "HTTP/1.1 %d %s\r\n", status, http_status_text(status));
    if (status == 304)
        puts_(&c->out, "Content-Length: 1234\r\n");
    putf(&c->out, "%s\r\n", connection_header(c));
    mockllm__conn_done(c);
}

int mockllm__fault_parse(const char *s)
{
    if (strcmp(s, "none") == 0)
        return MOCKLLM_FAULT_NONE;
    if (strcmp(s, "stall") == 0)
        return MOCKLLM_FAULT_STALL;
    if (strcmp(s, "close-midstream") == 0)
        return MOCKLLM_FAULT_CLOSE_MIDSTREAM;
    if (strcmp(s, "stall-midstream") == 0)
        return MOCKLLM_FAULT_STALL_MIDSTREAM;
    if (strcmp(s, "close-before-response") == 0)
        return MOCKLLM_FAULT_CLOSE_BEFORE;
    if (strcmp(s, "500") == 0)
        return MOCKLLM_FAULT_500;
    if (strcmp(s, "429") == 0)
        return MOCKLLM_FAULT_429;
    return -1;
}

/* Read an integer header in [0, max]. Returns 0 if absent, 1 if stored,
 * -1 if malformed. */
static int header_int(const struct mockllm_request *r, const char *name, int max, int *out)
{
    const char *v = mockllm__header(r, name);
    char *end;
    long n;

    if (v == NULL)
        return 0;
    errno = 0;
    n = strtol(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || n < 0 || n > max)
        return -1;
    *out = (int)n;
    return 1;
}

/* xorshift64*, uniform in [0, 1). */
static double next_random(struct mockllm_server *s)
{
    uint64_t x = s->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    return (double)((x * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

/* FNV-1a, to derive an input's embedding. */
static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

/* One input of "prompt" / "input": its token count and a hash of it. */
typedef void input_fn(void *ctx, int tokens, uint64_t hash);

/* Call fn for each input of a prompt/input field (see the rule above).
 * Returns 0, or -1 if the value has none of the accepted shapes. */
static int each_input(const cJSON *in, input_fn *fn, void *ctx)
{
    const uint64_t basis = 14695981039346656037ULL;
    const cJSON *e;

    if (cJSON_IsString(in)) {
        fn(ctx, words(in->valuestring), hash_bytes(basis, in->valuestring,
                                                   strlen(in->valuestring)));
        return 0;
    }
    if (!cJSON_IsArray(in))
        return -1;
    if (cJSON_IsNumber(cJSON_GetArrayItem(in, 0))) {
        uint64_t h = basis;
        int n = 0;
        cJSON_ArrayForEach(e, in) {
            h = hash_bytes(h, &e->valuedouble, sizeof(e->valuedouble));
            n++;
        }
        fn(ctx, n, h);
        return 0;
    }
    cJSON_ArrayForEach(e, in) {
        if (cJSON_IsString(e)) {
            fn(ctx, words(e->valuestring), hash_bytes(basis, e->valuestring,
                                                      strlen(e->valuestring)));
        } else if (cJSON_IsArray(e)) {
            const cJSON *t;
            uint64_t h = basis;
            int n = 0;
            cJSON_ArrayForEach(t, e) {
                h = hash_bytes(h, &t->valuedouble, sizeof(t->valuedouble));
                n++;
            }
            fn(ctx, n, h);
        } else {
            return -1;
        }
    }
    return 0;
}

static void sum_tokens(void *ctx, int tokens, uint64_t hash)
{
    *(int *)ctx += tokens;
}

/* State for building the embeddings "data" array. */
struct embed_ctx {
    int index;  /* next input's index */
    int tokens; /* prompt tokens so far */
};

static void put_embedding(void *ctx, int tokens, uint64_t hash)
{
    struct embed_ctx *e = ctx;

    putf(&scratch, "%s{\"object\":\"embedding\",\"index\":%d,\"embedding\":[",
         e->index ? "," : "", e->index);
    for (int d = 0; d < EMBEDDING_DIM; d++) {
        double v = (double)((hash >> (d * 8)) & 0xff) / 127.5 - 1.0;
        putf(&scratch, "%s%.4f", d ? "," : "", v);
    }
    puts_(&scratch, "]}");
    e->index++;
    e->tokens += tokens;
}

/* Words of a message's content: a string, or the "text" of its parts. */
static int content_words(const cJSON *content)
{
    const cJSON *part;
    int n = 0;

    if (cJSON_IsString(content))
        return words(content->valuestring);
    cJSON_ArrayForEach(part, content) {
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (cJSON_IsString(text))
            n += words(text->valuestring);
    }
    return n;
}

static int chat_prompt_tokens(const cJSON *messages)
{
    const cJSON *m;
    int n = 3;

    cJSON_ArrayForEach(m, messages)
        n += 4 + content_words(cJSON_GetObjectItemCaseSensitive(m, "content"));
    return n;
}

/* The chat rule over what a Responses request carries (see the top). */
static int responses_prompt_tokens(const cJSON *body)
{
    static const char *const texts[] = {"content", "arguments", "output"};
    const cJSON *instructions = cJSON_GetObjectItemCaseSensitive(body, "instructions");
    const cJSON *input = cJSON_GetObjectItemCaseSensitive(body, "input"), *item;
    int n = 3;

    if (cJSON_IsString(instructions))
        n += 4 + words(instructions->valuestring);
    if (cJSON_IsString(input))
        return n + 4 + words(input->valuestring);
    cJSON_ArrayForEach(item, input) {
        n += 4;
        for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
            n += content_words(cJSON_GetObjectItemCaseSensitive(item, texts[i]));
    }
    return n;
}

/* The chat rule over an Anthropic request's system prompt and messages. */
static int messages_prompt_tokens(const cJSON *body)
{
    const cJSON *system = cJSON_GetObjectItemCaseSensitive(body, "system");
    int n = chat_prompt_tokens(cJSON_GetObjectItemCaseSensitive(body, "messages"));

    if (system != NULL)
        n += 4 + content_words(system);
    return n;
}

void mockllm__plan_reset(struct mockllm_plan *p)
{
    p->endpoint = EP_CHAT;
    p->stream = 0;
    p->include_usage = 0;
    p->omit_usage = 0;
    p->started = 0;
    p->fault = MOCKLLM_FAULT_NONE;
    p->end_waited = 0;
    p->token_delay_ms = 0;
    p->event_pad = 0;
    p->done_delay_ms = 0;
    p->tokens = 0;
    p->sent = 0;
    p->prompt_tokens = 0;
    p->cached_tokens = 0;
    p->cache_write_tokens = p->cache_write_1h_tokens = 0;
    p->web_searches = -1;
    p->file_searches = 0;
    p->cost_micro = -1;
    p->cost_object = 0;
    p->finish = "stop";
    p->service_tier = NULL;
    p->id = 0;
    p->created = 0;
    buf_reset(&p->model);
    buf_reset(&p->deferred);
}

/* The answer is out: end abruptly for close-midstream, send nothing
 * more for stall-midstream (busy until the client leaves), else go on. */
static void finish(struct mockllm_conn *c)
{
    if (c->plan.fault == MOCKLLM_FAULT_STALL_MIDSTREAM)
        return;
    if (c->plan.fault == MOCKLLM_FAULT_CLOSE_MIDSTREAM)
        mockllm__conn_end(c, 1);
    else
        mockllm__conn_done(c);
}

/* Append `"id":...,"object":...,"created":...,"model":...,` to b. */
static void put_head(struct buf *b, const struct mockllm_plan *p, const char *object)
{
    putf(b, "{\"id\":\"%s-mock-%llu\",\"object\":\"%s\",\"created\":%lld,\"model\":\"",
         p->endpoint == EP_CHAT ? "chatcmpl" : "cmpl", (unsigned long long)p->id, object,
         p->created);
    put(b, p->model.data, p->model.len);
    puts_(b, "\",");
}

/* Append `,"cost":...` when the request asked for a reported cost: a
 * number in USD (OpenRouter's usage.cost), or an object whose total_cost
 * it is (Perplexity's). */
static void put_cost(struct buf *b, const struct mockllm_plan *p)
{
    int whole = p->cost_micro / 1000000, frac = p->cost_micro % 1000000;

    if (p->cost_micro < 0)
        return;
    if (p->cost_object)
        putf(b, ",\"cost\":{\"input_tokens_cost\":0,\"output_tokens_cost\":0,"
                "\"request_cost\":0,\"total_cost\":%d.%06d}", whole, frac);
    else
        putf(b, ",\"cost\":%d.%06d", whole, frac);
}

static void put_usage(struct buf *b, const struct mockllm_plan *p)
{
    putf(b, "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d",
         p->prompt_tokens, p->tokens, p->prompt_tokens + p->tokens);
    put_cost(b, p);
    puts_(b, "}");
}

/* Append `"service_tier":"...",` when the answer names one: OpenAI puts
 * it after "model" in a stream's chunks, after "usage" in a whole answer
 * (put_tier_last). */
static void put_tier(struct buf *b, const struct mockllm_plan *p)
{
    if (p->service_tier != NULL)
        putf(b, "\"service_tier\":\"%s\",", p->service_tier);
}

static void put_tier_last(struct buf *b, const struct mockllm_plan *p)
{
    if (p->service_tier != NULL)
        putf(b, ",\"service_tier\":\"%s\"", p->service_tier);
}

/* Append token i as JSON string content, with its leading space. */
static void put_token(struct buf *b, int i)
{
    if (i > 0)
        put(b, " ", 1);
    puts_(b, WORDS[i % 16]);
}

/* Append `"x_mock_pad":"xx...",` with n filler bytes (x-mock-event-pad):
 * events as large as long tool-call arguments or logprobs make, so tests
 * can push megabytes through the router in a few events. */
static void put_pad(struct buf *b, int n)
{
    puts_(b, "\"x_mock_pad\":\"");
    if (buf_reserve(b, (size_t)n) != 0) {
        log_error("out of memory");
        abort();
    }
    memset(b->data + b->len, 'x', (size_t)n);
    b->len += (size_t)n;
    puts_(b, "\",");
}

/* Web search calls before a Responses answer's message. */
static int web_searches_of(const struct mockllm_plan *p)
{
    return p->web_searches > 0 ? p->web_searches : 0;
}

/* Append hosted tool call i of a Responses answer to b (its web searches,
 * then its file searches): in progress (as output_item.added shows it)
 * or done (as .done and the whole answer do). */
static void put_search_item(struct buf *b, const struct mockllm_plan *p, int i, int done)
{
    const char *status = done ? "completed" : "in_progress";

    if (i >= web_searches_of(p)) {
        putf(b, "{\"type\":\"file_search_call\",\"id\":\"fs_mock-%llu-%d\",\"status\":\"%s\","
                "\"queries\":[\"the quick brown fox\"],\"results\":null}",
             (unsigned long long)p->id, i, status);
        return;
    }
    putf(b, "{\"type\":\"web_search_call\",\"id\":\"ws_mock-%llu-%d\",\"status\":\"%s\"",
         (unsigned long long)p->id, i, status);
    if (done)
        puts_(b, ",\"action\":{\"type\":\"search\",\"query\":\"the quick brown fox\"}");
    puts_(b, "}");
}

/* Hosted tool calls before a Responses answer's message: its output index. */
static int searches_before(const struct mockllm_plan *p)
{
    return web_searches_of(p) + p->file_searches;
}

/* Append a Responses API response object to b: in progress (no output
 * yet, usage null), or done: "completed", or "incomplete" when
 * max_output_tokens cut it, with its one message and its usage (left
 * out under x-mock-usage: omit). */
static void put_response_object(struct buf *b, const struct mockllm_plan *p, int done)
{
    int cut = p->finish[0] == 'l'; /* "length" */

    putf(b, "{\"id\":\"resp_mock-%llu\",\"object\":\"response\",\"created_at\":%lld,"
            "\"status\":\"%s\",\"model\":\"",
         (unsigned long long)p->id, p->created,
         !done ? "in_progress" : cut ? "incomplete" : "completed");
    put(b, p->model.data, p->model.len);
    puts_(b, "\",\"output\":[");
    if (done) {
        for (int i = 0; i < searches_before(p); i++) {
            put_search_item(b, p, i, 1);
            put(b, ",", 1);
        }
        putf(b, "{\"type\":\"message\",\"id\":\"msg_mock-%llu\",\"status\":\"%s\","
                "\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"",
             (unsigned long long)p->id, cut ? "incomplete" : "completed");
        for (int i = 0; i < p->tokens; i++)
            put_token(b, i);
        puts_(b, "\",\"annotations\":[]}]}");
    }
    putf(b, "],\"incomplete_details\":%s",
         done && cut ? "{\"reason\":\"max_output_tokens\"}" : "null");
    put_tier_last(b, p);
    if (!done)
        puts_(b, ",\"usage\":null");
    else if (!p->omit_usage) {
        putf(b, ",\"usage\":{\"input_tokens\":%d,\"input_tokens_details\":{\"cached_tokens\":%d},"
                "\"output_tokens\":%d,\"output_tokens_details\":{\"reasoning_tokens\":0},"
                "\"total_tokens\":%d",
             p->prompt_tokens, p->cached_tokens, p->tokens, p->prompt_tokens + p->tokens);
        put_cost(b, p);
        puts_(b, "}");
    }
    puts_(b, "}");
}

static void put_event(struct mockllm_conn *c);

/* Anthropic's usage object: input_tokens counts neither the cached nor
 * the cache-written tokens. With x-mock-web-searches, server_tool_use
 * says how many web searches the answer made (`searches`: message_start
 * says 0, as Anthropic's does, the whole answer and message_delta all). */
static void put_messages_usage(struct buf *b, const struct mockllm_plan *p, int output_tokens,
                               int searches)
{
    putf(b, "{\"input_tokens\":%d,\"cache_creation_input_tokens\":%d,"
            "\"cache_read_input_tokens\":%d,\"cache_creation\":{\"ephemeral_5m_input_tokens\":%d,"
            "\"ephemeral_1h_input_tokens\":%d},\"output_tokens\":%d",
         p->prompt_tokens - p->cached_tokens - p->cache_write_tokens, p->cache_write_tokens,
         p->cached_tokens, p->cache_write_tokens - p->cache_write_1h_tokens,
         p->cache_write_1h_tokens, output_tokens);
    if (p->web_searches >= 0)
        putf(b, ",\"server_tool_use\":{\"web_search_requests\":%d}", searches);
    puts_(b, "}");
}

/* Append an Anthropic message object to b: whole (`done`: its text and
 * stop_reason) or as message_start has it (no content yet). */
static void put_message_object(struct buf *b, const struct mockllm_plan *p, int done)
{
    putf(b, "{\"id\":\"msg_mock-%llu\",\"type\":\"message\",\"role\":\"assistant\","
            "\"model\":\"",
         (unsigned long long)p->id);
    put(b, p->model.data, p->model.len);
    puts_(b, "\",\"content\":[");
    if (done) {
        puts_(b, "{\"type\":\"text\",\"text\":\"");
        for (int i = 0; i < p->tokens; i++)
            put_token(b, i);
        puts_(b, "\"}");
    }
    puts_(b, "],\"stop_reason\":");
    if (done)
        putf(b, "\"%s\"", p->finish[0] == 'l' ? "max_tokens" : "end_turn");
    else
        puts_(b, "null");
    puts_(b, ",\"stop_sequence\":null");
    if (!done || !p->omit_usage) {
        puts_(b, ",\"usage\":");
        put_messages_usage(b, p, done ? p->tokens : 1, done ? p->web_searches : 0);
    }
    puts_(b, "}");
}

/* One event of an Anthropic stream: `event: TYPE` and its data, whose
 * members after "type" are `rest` (printf). */
static void put_messages_event(struct mockllm_conn *c, const char *type, const char *rest, ...)
    __attribute__((format(printf, 3, 4)));
static void put_messages_event(struct mockllm_conn *c, const char *type, const char *rest, ...)
{
    va_list ap;
    char more[256];

    va_start(ap, rest);
    vsnprintf(more, sizeof(more), rest, ap);
    va_end(ap);
    buf_reset(&scratch);
    putf(&scratch, "event: %s\ndata: {\"type\":\"%s\"%s}\n\n", type, type, more);
    put_event(c);
}

/* The index of an Anthropic stream's text block: after its web searches'
 * blocks. */
static int text_block_index(const struct mockllm_plan *p)
{
    return p->web_searches > 0 ? p->web_searches : 0;
}

/* The start of an Anthropic stream: message_start (with the input
 * counts), a server_tool_use block (started and stopped) for each web
 * search under x-mock-web-searches, the text's content_block_start,
 * ping. */
static void put_messages_start(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;

    buf_reset(&scratch);
    puts_(&scratch, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":");
    put_message_object(&scratch, p, 0);
    puts_(&scratch, "}\n\n");
    put_event(c);
    for (int i = 0; i < text_block_index(p); i++) {
        put_messages_event(c, "content_block_start",
                           ",\"index\":%d,\"content_block\":{\"type\":\"server_tool_use\","
                           "\"id\":\"srvtoolu_mock-%llu-%d\",\"name\":\"web_search\",\"input\":{}}",
                           i, (unsigned long long)p->id, i);
        put_messages_event(c, "content_block_stop", ",\"index\":%d", i);
    }
    put_messages_event(c, "content_block_start",
                       ",\"index\":%d,\"content_block\":{\"type\":\"text\",\"text\":\"\"}",
                       text_block_index(p));
    put_messages_event(c, "ping", "%s", "");
}

/* Token p->sent as a content_block_delta (text_delta) event. */
static void put_messages_delta(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;

    buf_reset(&scratch);
    puts_(&scratch, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",");
    if (p->event_pad > 0)
        put_pad(&scratch, p->event_pad);
    putf(&scratch, "\"index\":%d,\"delta\":{\"type\":\"text_delta\",\"text\":\"",
         text_block_index(p));
    put_token(&scratch, p->sent);
    puts_(&scratch, "\"}}\n\n");
    put_event(c);
    p->sent++;
}

/* The end of an Anthropic stream: content_block_stop, message_delta with
 * the stop reason and the output count (and, as newer API versions do,
 * the input counts again; no usage under x-mock-usage: omit), then
 * message_stop. */
static void put_messages_end(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;

    put_messages_event(c, "content_block_stop", ",\"index\":%d", text_block_index(p));
    buf_reset(&scratch);
    putf(&scratch, "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":"
                   "{\"stop_reason\":\"%s\",\"stop_sequence\":null}",
         p->finish[0] == 'l' ? "max_tokens" : "end_turn");
    if (!p->omit_usage) {
        puts_(&scratch, ",\"usage\":");
        put_messages_usage(&scratch, p, p->tokens, p->web_searches);
    }
    puts_(&scratch, "}\n\n");
    put_event(c);
    put_messages_event(c, "message_stop", "%s", "");
}

/* Start a Responses stream event of `type` in scratch: its event line
 * and the data's first members. */
static void start_responses_event(const char *type, int seq)
{
    buf_reset(&scratch);
    putf(&scratch, "event: %s\ndata: {\"type\":\"%s\",\"sequence_number\":%d,", type, type, seq);
}

/* Frame the event in scratch as one HTTP chunk on the connection. */
static void put_event(struct mockllm_conn *c)
{
    putf(&c->out, "%zx\r\n", scratch.len);
    put(&c->out, scratch.data, scratch.len);
    put(&c->out, "\r\n", 2);
}

/* A Responses stream's hosted tool calls, after response.created: each
 * added, then done (sequence numbers 1 to 2N). */
static void put_responses_searches(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;

    for (int i = 0; i < searches_before(p); i++) {
        for (int done = 0; done <= 1; done++) {
            const char *type = done ? "response.output_item.done" : "response.output_item.added";

            start_responses_event(type, 2 * i + 1 + done);
            putf(&scratch, "\"output_index\":%d,\"item\":", i);
            put_search_item(&scratch, p, i, done);
            puts_(&scratch, "}\n\n");
            put_event(c);
        }
    }
}

/* The lifecycle event a Responses stream begins or ends with (`done`):
 * response.created, then response.completed (or .incomplete) with the
 * whole response and its usage. */
static void put_responses_edge(struct mockllm_conn *c, int done)
{
    struct mockllm_plan *p = &c->plan;
    const char *type = !done ? "response.created"
                       : p->finish[0] == 'l' ? "response.incomplete" : "response.completed";

    start_responses_event(type, done ? 2 * searches_before(p) + p->tokens + 1 : 0);
    puts_(&scratch, "\"response\":");
    put_response_object(&scratch, p, done);
    puts_(&scratch, "}\n\n");
    put_event(c);
    if (!done)
        put_responses_searches(c);
}

/* Token p->sent as a response.output_text.delta event. */
static void put_responses_delta(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;

    start_responses_event("response.output_text.delta", 2 * searches_before(p) + p->sent + 1);
    if (p->event_pad > 0)
        put_pad(&scratch, p->event_pad);
    putf(&scratch, "\"item_id\":\"msg_mock-%llu\",\"output_index\":%d,\"content_index\":0,"
                   "\"delta\":\"", (unsigned long long)p->id, searches_before(p));
    put_token(&scratch, p->sent);
    puts_(&scratch, "\"}\n\n");
    put_event(c);
    p->sent++;
}

static void put_token_event(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;
    int last = p->sent + 1 == p->tokens;

    if (p->endpoint == EP_RESPONSES) {
        put_responses_delta(c);
        return;
    }
    if (p->endpoint == EP_MESSAGES) {
        put_messages_delta(c);
        return;
    }
    buf_reset(&scratch);
    puts_(&scratch, "data: ");
    if (p->endpoint == EP_CHAT) {
        put_head(&scratch, p, "chat.completion.chunk");
        put_tier(&scratch, p);
        if (p->event_pad > 0)
            put_pad(&scratch, p->event_pad);
        puts_(&scratch, "\"choices\":[{\"index\":0,\"delta\":{");
        if (p->sent == 0)
            puts_(&scratch, "\"role\":\"assistant\",");
        puts_(&scratch, "\"content\":\"");
    } else {
        put_head(&scratch, p, "text_completion");
        put_tier(&scratch, p);
        if (p->event_pad > 0)
            put_pad(&scratch, p->event_pad);
        puts_(&scratch, "\"choices\":[{\"index\":0,\"text\":\"");
    }
    put_token(&scratch, p->sent);
    puts_(&scratch, p->endpoint == EP_CHAT ? "\"}" : "\"");
    putf(&scratch, ",\"logprobs\":null,\"finish_reason\":%s%s%s}]", last ? "\"" : "",
         last ? p->finish : "null", last ? "\"" : "");
    if (p->include_usage)
        puts_(&scratch, ",\"usage\":null");
    puts_(&scratch, "}\n\n");
    put_event(c);
    p->sent++;
}

/* The stream's status and headers (and its opening events), once. */
static void stream_head(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;

    if (!p->started) {
        putf(&c->out,
             "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             "Transfer-Encoding: chunked\r\n");
        puts_(&c->out, c->srv->pad_header);
        putf(&c->out, "%s\r\n", connection_header(c));
        p->started = 1;
        if (p->endpoint == EP_RESPONSES)
            put_responses_edge(c, 0);
        if (p->endpoint == EP_MESSAGES)
            put_messages_start(c);
    }
}

/* Send what is due now of a streamed answer, then arm the timer for the
 * next token or finish. */
static void stream_tick(struct mockllm_conn *c)
{
    struct mockllm_plan *p = &c->plan;
    int cut = p->tokens < 3 ? p->tokens : 3;

    stream_head(c);
    for (;;) {
        if (p->fault == MOCKLLM_FAULT_CLOSE_MIDSTREAM && p->sent >= cut) {
            mockllm__conn_end(c, 1);
            return;
        }
        if (p->fault == MOCKLLM_FAULT_STALL_MIDSTREAM && p->sent >= cut)
            return; /* no timer: nothing more until the client leaves */
        if (p->sent >= p->tokens)
            break;
        put_token_event(c);
        if (p->token_delay_ms > 0 && p->sent < p->tokens) {
            uv_timer_start(&c->timer, mockllm__on_timer, (uint64_t)p->token_delay_ms, 0);
            return;
        }
    }
    /* The end as its own write, after a pause: what a server sends once
     * generation is over (usage, [DONE]) arrives in a read of its own. */
    if (p->done_delay_ms > 0 && !p->end_waited) {
        p->end_waited = 1;
        uv_timer_start(&c->timer, mockllm__on_timer, (uint64_t)p->done_delay_ms, 0);
        return;
    }
    if (p->endpoint == EP_RESPONSES || p->endpoint == EP_MESSAGES) {
        /* Its usage always comes, in the last events; no [DONE]. */
        if (p->endpoint == EP_MESSAGES)
            put_messages_end(c);
        else
            put_responses_edge(c, 1);
        puts_(&c->out, "0\r\n\r\n");
        finish(c);
        return;
    }
    if (p->include_usage) {
        buf_reset(&scratch);
        puts_(&scratch, "data: ");
        put_head(&scratch, p, p->endpoint == EP_CHAT ? "chat.completion.chunk"
                                                     : "text_completion");
        put_tier(&scratch, p);
        puts_(&scratch, "\"choices\":[],");
        put_usage(&scratch, p);
        puts_(&scratch, "}\n\n");
        put_event(c);
    }
    puts_(&c->out, "e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n");
    finish(c);
}

void mockllm__on_timer(uv_timer_t *t)
{
    struct mockllm_conn *c = t->data;

    if (c->plan.stream) {
        stream_tick(c);
    } else {
        put(&c->out, c->plan.deferred.data, c->plan.deferred.len);
        finish(c);
    }
    mockllm__conn_flush(c);
}

/* Build the whole non-streamed body of a completion into scratch. */
static void build_completion(struct mockllm_plan *p)
{
    buf_reset(&scratch);
    if (p->endpoint == EP_RESPONSES) {
        put_response_object(&scratch, p, 1);
        return;
    }
    if (p->endpoint == EP_MESSAGES) {
        put_message_object(&scratch, p, 1);
        return;
    }
    if (p->endpoint == EP_CHAT) {
        put_head(&scratch, p, "chat.completion");
        puts_(&scratch, "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                        "\"content\":\"");
    } else {
        put_head(&scratch, p, "text_completion");
        puts_(&scratch, "\"choices\":[{\"index\":0,\"text\":\"");
    }
    for (int i = 0; i < p->tokens; i++)
        put_token(&scratch, i);
    puts_(&scratch, p->endpoint == EP_CHAT ? "\"}" : "\"");
    putf(&scratch, ",\"logprobs\":null,\"finish_reason\":\"%s\"}]", p->finish);
    if (!p->omit_usage) {
        puts_(&scratch, ",");
        put_usage(&scratch, p);
    }
    put_tier_last(&scratch, p);
    puts_(&scratch, "}");
}

/* Send the response in plan.deferred after delay_ms (now if 0). For
 * close-midstream and stall-midstream only the headers and half the body
 * go out. */
static void send_deferred(struct mockllm_conn *c, int delay_ms)
{
    struct mockllm_plan *p = &c->plan;

    if (p->fault == MOCKLLM_FAULT_CLOSE_MIDSTREAM || p->fault == MOCKLLM_FAULT_STALL_MIDSTREAM)
        p->deferred.len -= scratch.len - scratch.len / 2;
    if (delay_ms > 0) {
        uv_timer_start(&c->timer, mockllm__on_timer, (uint64_t)delay_ms, 0);
        return;
    }
    put(&c->out, p->deferred.data, p->deferred.len);
    finish(c);
}

/* The error x-mock-status asked for, after `delay_ms` (the request's
 * TTFT): a server that works a while before it fails, which on a pool is
 * GPU time spent. The status is the answer, whatever else was asked. */
static void answer_status_after(struct mockllm_conn *c, int status, int delay_ms)
{
    struct mockllm_plan *p = &c->plan;
    const char *type = status == 429 ? "rate_limit_exceeded" : "server_error";
    static const char message[] = "mockllm: status requested by x-mock-status";

    if (delay_ms <= 0) {
        answer_error(c, status, type, "mock_status", message);
        return;
    }
    p->stream = 0;
    p->fault = MOCKLLM_FAULT_NONE;
    put_error_body(type, "mock_status", message);
    put_response(c, &p->deferred, status);
    send_deferred(c, delay_ms);
}

/* Per-request settings from x-mock-* headers over the process defaults. */
struct overrides {
    int ttft_ms;        /* x-mock-ttft-ms */
    int token_delay_ms; /* x-mock-token-delay-ms */
    int tokens;         /* x-mock-tokens */
    int status;         /* x-mock-status, 0 if absent */
    int fault;          /* x-mock-fault */
    int omit_usage;     /* x-mock-usage: omit */
    int event_pad;      /* x-mock-event-pad */
    int done_delay_ms;  /* x-mock-done-delay-ms */
    int head_first;     /* x-mock-head-first: 1 sends a stream's headers at once, its
                           first token after ttft (as vLLM and TGI do) */
    int cached_tokens;  /* x-mock-cached-tokens (responses, messages) */
    int cache_write_tokens; /* x-mock-cache-write-tokens (messages) */
    int cache_write_1h_tokens; /* x-mock-cache-write-1h-tokens (messages) */
    int web_searches;   /* x-mock-web-searches (messages, responses), -1 if absent */
    int file_searches;  /* x-mock-file-searches (responses), 0 if absent */
    int cost_micro;     /* x-mock-cost-micro, -1 if absent */
    int cost_object;    /* x-mock-cost-shape: object */
    const char *service_tier; /* x-mock-service-tier, or NULL */
};

/* The tier an answer names: x-mock-service-tier's if given (default,
 * flex, priority or scale: what was "billed", say a priority request run
 * at default), else the one the body asks for, as OpenAI answers ("auto"
 * and "default" run at default), else none. */
static const char *const TIERS[] = {"default", "flex", "priority", "scale"};

static const char *tier_named(const char *name)
{
    for (size_t i = 0; name != NULL && i < sizeof(TIERS) / sizeof(TIERS[0]); i++)
        if (strcmp(name, TIERS[i]) == 0)
            return TIERS[i];
    return NULL;
}

static const char *answered_tier(const cJSON *body, const struct overrides *o)
{
    const cJSON *asked = cJSON_GetObjectItemCaseSensitive(body, "service_tier");

    if (o->service_tier != NULL)
        return o->service_tier;
    if (!cJSON_IsString(asked))
        return NULL;
    return strcmp(asked->valuestring, "auto") == 0 ? TIERS[0] : tier_named(asked->valuestring);
}

/* Returns the name of the malformed header, or NULL. */
static const char *read_overrides(struct mockllm_conn *c, struct overrides *o)
{
    const struct mockllm_opts *opts = &c->srv->opts;
    const char *fault = mockllm__header(&c->req, "x-mock-fault");
    const char *usage = mockllm__header(&c->req, "x-mock-usage");
    const char *tier = mockllm__header(&c->req, "x-mock-service-tier");
    const char *cost_shape = mockllm__header(&c->req, "x-mock-cost-shape");

    o->ttft_ms = opts->ttft_ms;
    o->token_delay_ms = opts->token_delay_ms;
    o->tokens = opts->tokens;
    o->status = 0;
    o->fault = opts->fault;
    o->event_pad = 0;
    o->done_delay_ms = 0;
    o->head_first = 0;
    o->cached_tokens = o->cache_write_tokens = o->cache_write_1h_tokens = 0;
    o->web_searches = -1;
    o->file_searches = 0;
    o->service_tier = NULL;
    if (tier != NULL && (o->service_tier = tier_named(tier)) == NULL)
        return "x-mock-service-tier";
    if (header_int(&c->req, "x-mock-cached-tokens", MAX_TOKENS, &o->cached_tokens) < 0)
        return "x-mock-cached-tokens";
    if (header_int(&c->req, "x-mock-cache-write-tokens", MAX_TOKENS, &o->cache_write_tokens) < 0)
        return "x-mock-cache-write-tokens";
    if (header_int(&c->req, "x-mock-cache-write-1h-tokens", MAX_TOKENS,
                   &o->cache_write_1h_tokens) < 0)
        return "x-mock-cache-write-1h-tokens";
    if (header_int(&c->req, "x-mock-web-searches", MAX_TOKENS, &o->web_searches) < 0)
        return "x-mock-web-searches";
    if (header_int(&c->req, "x-mock-file-searches", MAX_TOKENS, &o->file_searches) < 0)
        return "x-mock-file-searches";
    if (header_int(&c->req, "x-mock-ttft-ms", MAX_DELAY_MS, &o->ttft_ms) < 0)
        return "x-mock-ttft-ms";
    if (header_int(&c->req, "x-mock-head-first", 1, &o->head_first) < 0)
        return "x-mock-head-first";
    if (header_int(&c->req, "x-mock-token-delay-ms", MAX_DELAY_MS, &o->token_delay_ms) < 0)
        return "x-mock-token-delay-ms";
    if (header_int(&c->req, "x-mock-tokens", MAX_TOKENS, &o->tokens) < 0)
        return "x-mock-tokens";
    if (header_int(&c->req, "x-mock-event-pad", MAX_EVENT_PAD, &o->event_pad) < 0)
        return "x-mock-event-pad";
    if (header_int(&c->req, "x-mock-done-delay-ms", MAX_DELAY_MS, &o->done_delay_ms) < 0)
        return "x-mock-done-delay-ms";
    if (header_int(&c->req, "x-mock-status", 599, &o->status) < 0 ||
        (o->status != 0 && o->status < 400 && o->status != 204 && o->status != 304))
        return "x-mock-status";
    if (fault != NULL && (o->fault = mockllm__fault_parse(fault)) < 0)
        return "x-mock-fault";
    o->omit_usage = usage != NULL && strcmp(usage, "omit") == 0;
    if (usage != NULL && !o->omit_usage)
        return "x-mock-usage";
    o->cost_micro = -1;
    if (header_int(&c->req, "x-mock-cost-micro", MAX_COST_MICRO, &o->cost_micro) < 0)
        return "x-mock-cost-micro";
    o->cost_object = cost_shape != NULL && strcmp(cost_shape, "object") == 0;
    if (cost_shape != NULL && !o->cost_object)
        return "x-mock-cost-shape";
    return NULL;
}

/* Fill the plan from a parsed body: model, stream flags, token counts. */
static int plan_from_body(struct mockllm_conn *c, const cJSON *body, const struct overrides *o)
{
    struct mockllm_plan *p = &c->plan;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(body, "model");
    const cJSON *stream_options = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
    const cJSON *max = cJSON_GetObjectItemCaseSensitive(body, "max_completion_tokens");

    if (c->srv->opts.model != NULL)
        put_escaped(&p->model, c->srv->opts.model);
    else if (cJSON_IsString(model))
        put_escaped(&p->model, model->valuestring);
    else
        puts_(&p->model, "mock-model");
    p->stream = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(body, "stream"));
    p->omit_usage = o->omit_usage ? 1 : 0;
    p->cost_micro = o->cost_micro;
    p->cost_object = o->cost_object ? 1 : 0;
    p->include_usage = p->stream && !p->omit_usage &&
                       cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(stream_options,
                                                                     "include_usage"));
    p->tokens = o->tokens;
    if (p->endpoint == EP_RESPONSES)
        max = cJSON_GetObjectItemCaseSensitive(body, "max_output_tokens");
    if (!cJSON_IsNumber(max))
        max = cJSON_GetObjectItemCaseSensitive(body, "max_tokens");
    if (cJSON_IsNumber(max) && max->valuedouble >= 0 && max->valuedouble < p->tokens) {
        p->tokens = (int)max->valuedouble;
        p->finish = "length";
    }
    p->token_delay_ms = o->token_delay_ms;
    p->event_pad = o->event_pad;
    p->done_delay_ms = o->done_delay_ms;
    p->service_tier = answered_tier(body, o);
    p->id = ++c->srv->next_id;
    p->created = (long long)time(NULL);
    if (p->endpoint == EP_CHAT) {
        p->prompt_tokens = chat_prompt_tokens(cJSON_GetObjectItemCaseSensitive(body, "messages"));
        return 0;
    }
    if (p->endpoint == EP_RESPONSES) {
        p->include_usage = 0; /* refused before this: see answer_v1 */
        p->prompt_tokens = responses_prompt_tokens(body);
        p->cached_tokens = o->cached_tokens < p->prompt_tokens ? o->cached_tokens
                                                               : p->prompt_tokens;
        p->web_searches = o->web_searches;
        p->file_searches = o->file_searches;
        return 0;
    }
    if (p->endpoint == EP_COUNT_TOKENS) {
        p->prompt_tokens = messages_prompt_tokens(body);
        return 0;
    }
    if (p->endpoint == EP_MESSAGES) {
        p->prompt_tokens = messages_prompt_tokens(body);
        p->cached_tokens = o->cached_tokens < p->prompt_tokens ? o->cached_tokens
                                                               : p->prompt_tokens;
        p->cache_write_tokens = o->cache_write_tokens < p->prompt_tokens - p->cached_tokens
                                    ? o->cache_write_tokens
                                    : p->prompt_tokens - p->cached_tokens;
        p->cache_write_1h_tokens = o->cache_write_1h_tokens < p->cache_write_tokens
                                       ? o->cache_write_1h_tokens
                                       : p->cache_write_tokens;
        p->web_searches = o->web_searches;
        return 0;
    }
    if (p->endpoint == EP_COMPLETIONS)
        return each_input(cJSON_GetObjectItemCaseSensitive(body, "prompt"), sum_tokens,
                          &p->prompt_tokens);
    return 0;
}

/* Embeddings: the body goes to scratch, then the whole response to deferred. */
static int build_embeddings(struct mockllm_conn *c, const cJSON *body)
{
    struct embed_ctx e = {0};

    buf_reset(&scratch);
    puts_(&scratch, "{\"object\":\"list\",\"data\":[");
    if (each_input(cJSON_GetObjectItemCaseSensitive(body, "input"), put_embedding, &e) != 0)
        return -1;
    puts_(&scratch, "],\"model\":\"");
    put(&scratch, c->plan.model.data, c->plan.model.len);
    putf(&scratch, "\",\"usage\":{\"prompt_tokens\":%d,\"total_tokens\":%d}}", e.tokens,
         e.tokens);
    return 0;
}

static void answer_models(struct mockllm_conn *c, int ttft_ms)
{
    const char *model = c->srv->opts.model ? c->srv->opts.model : "mock-model";

    buf_reset(&scratch);
    puts_(&scratch, "{\"object\":\"list\",\"data\":[{\"id\":\"");
    put_escaped(&scratch, model);
    puts_(&scratch, "\",\"object\":\"model\",\"created\":0,\"owned_by\":\"mockllm\"}]}");
    put_response(c, &c->plan.deferred, 200);
    send_deferred(c, ttft_ms);
}

/* Which endpoint a path names; -1 if none. Sets *post when it wants POST. */
static int route(const char *path, size_t len, int *post)
{
    static const struct {
        const char *path; /* exact path */
        int endpoint;     /* enum endpoint */
        int post;         /* method: POST (1) or GET (0) */
    } table[] = {
        {"/v1/chat/completions", EP_CHAT, 1},
        {"/v1/completions", EP_COMPLETIONS, 1},
        {"/v1/embeddings", EP_EMBEDDINGS, 1},
        {"/v1/responses", EP_RESPONSES, 1},
        {"/v1/messages", EP_MESSAGES, 1},
        {"/v1/messages/count_tokens", EP_COUNT_TOKENS, 1},
        {"/v1/models", EP_MODELS, 0},
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        if (strlen(table[i].path) == len && memcmp(table[i].path, path, len) == 0) {
            *post = table[i].post;
            return table[i].endpoint;
        }
    }
    return -1;
}

/* Answer now with an Anthropic-style error and finish the request. */
static void answer_anthropic_error(struct mockllm_conn *c, int status, const char *type,
                                   const char *message)
{
    buf_reset(&scratch);
    putf(&scratch, "{\"type\":\"error\",\"error\":{\"type\":\"%s\",\"message\":\"", type);
    put_escaped(&scratch, message);
    puts_(&scratch, "\"}}");
    put_response(c, &c->out, status);
    mockllm__conn_done(c);
}

/* Anthropic's API wants x-api-key (the --require-key value when one is
 * set, else any) and anthropic-version: answers as it would without
 * them, so a router that forgets them is caught. Returns 1 if it did. */
static int messages_auth(struct mockllm_conn *c)
{
    const char *key = mockllm__header(&c->req, "x-api-key");
    const char *want = c->srv->opts.require_key;

    if (key == NULL || *key == '\0' || (want != NULL && strcmp(key, want) != 0)) {
        answer_anthropic_error(c, 401, "authentication_error", "invalid x-api-key");
        return 1;
    }
    const char *version = mockllm__header(&c->req, "anthropic-version");

    if (version == NULL || *version == '\0') { /* an empty one is none to Anthropic */
        answer_anthropic_error(c, 400, "invalid_request_error",
                               "anthropic-version: header is required");
        return 1;
    }
    return 0;
}

/* Answer a /v1 request: auth, overrides, routing, faults, then the answer. */
static void answer_v1(struct mockllm_conn *c, const char *path, size_t path_len)
{
    struct mockllm_server *srv = c->srv;
    struct mockllm_plan *p = &c->plan;
    const char *auth = mockllm__header(&c->req, "authorization");
    const char *bad;
    struct overrides o;
    cJSON *body = NULL;
    int post = 0, delay;

    p->endpoint = route(path, path_len, &post);
    if (p->endpoint == EP_MESSAGES || p->endpoint == EP_COUNT_TOKENS) {
        if (messages_auth(c))
            return;
    } else if (srv->opts.require_key != NULL &&
        (auth == NULL || strncasecmp(auth, "Bearer ", 7) != 0 ||
         strcmp(auth + 7, srv->opts.require_key) != 0)) {
        answer_error(c, 401, "invalid_request_error", "invalid_api_key",
                     "Incorrect API key provided.");
        return;
    }
    if ((bad = read_overrides(c, &o)) != NULL) {
        char msg[96];
        snprintf(msg, sizeof(msg), "mockllm: malformed %s header", bad);
        answer_error(c, 400, "invalid_request_error", NULL, msg);
        return;
    }
    if (p->endpoint < 0) {
        answer_error(c, 404, "invalid_request_error", "unknown_url", "Unknown request URL.");
        return;
    }
    if (post != (strcmp(c->req.method, "POST") == 0)) {
        answer_error(c, 405, "invalid_request_error", NULL, "Method not allowed.");
        return;
    }
    if (post) {
        body = cJSON_ParseWithLength(c->req.body.data ? c->req.body.data : "", c->req.body.len);
        if (p->endpoint == EP_RESPONSES && cJSON_IsObject(body) &&
            cJSON_HasObjectItem(cJSON_GetObjectItemCaseSensitive(body, "stream_options"),
                                "include_usage")) {
            /* The Responses API has no such option: a router that adds
             * it, as it must for chat streams, breaks every request. */
            cJSON_Delete(body);
            answer_error(c, 400, "invalid_request_error", "unknown_parameter",
                         "Unknown parameter: 'stream_options.include_usage'.");
            return;
        }
        if (!cJSON_IsObject(body) || plan_from_body(c, body, &o) != 0 ||
            (p->endpoint == EP_EMBEDDINGS && build_embeddings(c, body) != 0)) {
            cJSON_Delete(body);
            answer_error(c, 400, "invalid_request_error", NULL,
                         "We could not parse the JSON body of your request.");
            return;
        }
        cJSON_Delete(body);
    }
    p->fault = o.fault;
    /* An x-mock-fault header, even "none", takes the request out of the
     * random --error-rate draw. */
    if (mockllm__header(&c->req, "x-mock-fault") == NULL && srv->opts.error_rate > 0 &&
        next_random(srv) < srv->opts.error_rate)
        p->fault = MOCKLLM_FAULT_500;
    if (o.status == 204 || o.status == 304) {
        answer_bodyless(c, o.status);
        return;
    }
    if (o.status != 0) {
        answer_status_after(c, o.status, o.ttft_ms);
        return;
    }
    switch (p->fault) {
    case MOCKLLM_FAULT_STALL:
        return; /* busy forever; the connection goes when the client does */
    case MOCKLLM_FAULT_CLOSE_BEFORE:
        mockllm__conn_close(c);
        return;
    case MOCKLLM_FAULT_500:
        answer_error(c, 500, "server_error", "mock_fault", "mockllm: injected failure");
        return;
    case MOCKLLM_FAULT_429:
        answer_error(c, 429, "rate_limit_exceeded", "mock_fault", "mockllm: rate limited");
        return;
    default:
        break;
    }
    if (p->endpoint == EP_MODELS) {
        answer_models(c, o.ttft_ms);
        return;
    }
    if (p->endpoint == EP_COUNT_TOKENS) {
        buf_reset(&scratch);
        putf(&scratch, "{\"input_tokens\":%d}", p->prompt_tokens);
        put_response(c, &p->deferred, 200);
        send_deferred(c, o.ttft_ms);
        return;
    }
    if (p->endpoint == EP_EMBEDDINGS) {
        put_response(c, &p->deferred, 200);
        send_deferred(c, o.ttft_ms);
        return;
    }
    if (p->stream) {
        if (o.head_first && o.ttft_ms > 0) {
            stream_head(c);
            mockllm__conn_flush(c);
        }
        if (o.ttft_ms > 0)
            uv_timer_start(&c->timer, mockllm__on_timer, (uint64_t)o.ttft_ms, 0);
        else
            stream_tick(c);
        return;
    }
    build_completion(p);
    put_response(c, &p->deferred, 200);
    delay = o.ttft_ms + (p->tokens > 1 ? (p->tokens - 1) * p->token_delay_ms : 0);
    send_deferred(c, delay);
}

static void answer_stats(struct mockllm_conn *c)
{
    buf_reset(&scratch);
    putf(&scratch, "{\"requests\":%llu,\"connections\":%llu}",
         (unsigned long long)c->srv->requests, (unsigned long long)c->srv->connections);
    put_response(c, &c->out, 200);
    mockllm__conn_done(c);
}

/* NUL-terminated copy of a buffer's bytes for cJSON (which needs C strings). */
static char *cstr(const struct buf *b)
{
    char *s = malloc(b->len + 1);
    if (s == NULL) {
        log_error("out of memory");
        abort();
    }
    if (b->len > 0)
        memcpy(s, b->data, b->len);
    s[b->len] = '\0';
    return s;
}

static void answer_last_request(struct mockllm_conn *c)
{
    const struct mockllm_request *last = &c->srv->last;
    cJSON *root = cJSON_CreateObject(), *headers = cJSON_CreateObject();
    const char *h = last->headers.data, *end = h + last->headers.len;
    char *url = cstr(&last->url), *body = cstr(&last->body), *text;

    cJSON_AddStringToObject(root, "method", last->method ? last->method : "");
    cJSON_AddStringToObject(root, "path", url);
    cJSON_AddItemToObject(root, "headers", headers);
    cJSON_AddStringToObject(root, "body", body);
    while (h < end) {
        const char *value = h + strlen(h) + 1;
        if (value >= end)
            break;
        /* A repeated header keeps its last value. */
        cJSON_DeleteItemFromObjectCaseSensitive(headers, h);
        cJSON_AddStringToObject(headers, h, value);
        h = value + strlen(value) + 1;
    }
    text = cJSON_PrintUnformatted(root);
    buf_reset(&scratch);
    puts_(&scratch, text ? text : "{}");
    put_response(c, &c->out, 200);
    cJSON_free(text);
    cJSON_Delete(root);
    free(url);
    free(body);
    mockllm__conn_done(c);
}

/* Keep this request as the last one (swapping buffers, no copy). */
static void remember(struct mockllm_conn *c)
{
    struct mockllm_request tmp = c->srv->last;
    c->srv->last = c->req;
    c->req = tmp;
}

/* Does the query ("?a=1&b", or NULL) hold an api-version=...? */
static int has_api_version(const char *q, size_t len)
{
    static const char name[] = "api-version=";
    const size_t n = sizeof(name) - 1;

    for (size_t i = 0; q != NULL && i < len; i++)
        if ((q[i] == '?' || q[i] == '&') && len - i - 1 >= n && memcmp(q + i + 1, name, n) == 0)
            return 1;
    return 0;
}

/* Azure OpenAI's paths as the /v1 path they serve: /openai/v1/X (its v1
 * API) and /openai/deployments/NAME/X (the classic one) are /v1/X, into
 * out[cap] with *len set. The classic API wants an api-version: without
 * one it is answered 404, as Azure does (returns NULL then). `path` itself
 * when it is no Azure path. */
static const char *azure_path(struct mockllm_conn *c, const char *path, size_t *len,
                              const char *query, size_t query_len, char *out, size_t cap)
{
    static const char v1[] = "/openai/v1/", deployments[] = "/openai/deployments/";
    const char *rest;
    size_t n;

    if (*len > sizeof(v1) - 1 && memcmp(path, v1, sizeof(v1) - 1) == 0) {
        rest = path + sizeof(v1) - 2;
    } else if (*len > sizeof(deployments) - 1 &&
               memcmp(path, deployments, sizeof(deployments) - 1) == 0) {
        const char *name = path + sizeof(deployments) - 1;
        rest = memchr(name, '/', *len - (size_t)(name - path));
        if (rest == NULL || rest == name)
            return path;
        if (!has_api_version(query, query_len)) {
            answer_error(c, 404, "invalid_request_error", "404", "Resource not found");
            return NULL;
        }
    } else {
        return path;
    }
    n = *len - (size_t)(rest - path);
    if (n + 3 >= cap)
        return path;
    memcpy(out, "/v1", 3);
    memcpy(out + 3, rest, n);
    *len = n + 3;
    return out;
}

void mockllm__dispatch(struct mockllm_conn *c)
{
    const char *url = c->req.url.data ? c->req.url.data : "";
    const char *q = memchr(url, '?', c->req.url.len);
    size_t len = q ? (size_t)(q - url) : c->req.url.len;
    int get = c->req.method && strcmp(c->req.method, "GET") == 0;
    char mapped[256];

    mockllm__plan_reset(&c->plan);
    if (len == 11 && memcmp(url, "/mock/stats", 11) == 0 && get) {
        answer_stats(c);
        return;
    }
    if (len == 18 && memcmp(url, "/mock/last-request", 18) == 0 && get) {
        answer_last_request(c);
        return;
    }
    url = azure_path(c, url, &len, q, q ? c->req.url.len - (size_t)(q - url) : 0, mapped,
                     sizeof(mapped));
    if (url == NULL) {
        remember(c); /* what an Azure path got without its api-version */
        return;
    }
    if (len < 4 || memcmp(url, "/v1/", 4) != 0) {
        answer_error(c, 404, "invalid_request_error", "unknown_url", "Unknown request URL.");
        return;
    }
    c->srv->requests++;
    answer_v1(c, url, len);
    remember(c);
}

void mockllm__api_cleanup(void)
{
    buf_free(&scratch);
}
