/*
 * tests/fuzz/fuzz_http.c: black-box fuzzing of the whole request path
 * (`make fuzz-http`): HTTP head, body validation, tenant, token count,
 * routing, budget, the upstream exchange and the answer, on a real router
 * built with ASan and UBSan, in front of two real mockllm processes.
 *
 * The libFuzzer targets cover pieces (llhttp is its own project's; the
 * tokenizer, the usage scan and the cost log have targets here); this one
 * sends whole requests over a socket, so the pieces are also tried
 * together and in sequence on kept-alive connections. It generates
 * requests from valid seeds: JSON bodies mutated as trees (values swapped
 * for edge cases, members dropped, repeated or renamed) and sometimes as
 * bytes; header sets drawn from a list (keys, the mock's fault headers,
 * chunked bodies, Expect, Connection: close, oversized heads, browsers'
 * Origin, CORS preflights); now and then
 * a head mutated as bytes, or two requests pipelined.
 *
 * It fails (exit 1), keeping its work folder in /tmp (config, router log,
 * cost log, and the last requests sent in requests.txt), when:
 * - an answer does not parse as HTTP, or a request with intact framing gets
 *   no answer within 15 s (a hang), or the router stops answering;
 * - an error status (>= 400) comes without an OpenAI-style JSON body
 *   ({"error":{"message":"...","type":"..."}}) in valid UTF-8;
 * - an answer carries an Access-Control-Allow-Origin other than the one
 *   origin allowed, or two;
 * - an upstream, tenant or admin key shows in an answer (a tenant or admin
 *   key only counts when the request held it in its Authorization header
 *   and nowhere else), or in the router's log;
 * - a reload (POST /admin/reload, every RELOAD_EVERY_S, while a request is
 *   in flight or on a connection accepted but not yet used) is refused,
 *   or that request gets no answer;
 * - at the end: the router is not healthy, still holds a reservation, its
 *   month spend per tenant differs from the sum of its cost log by more
 *   than the half micro-dollar a tenant may carry (the store is charged
 *   whole ones), it does not exit 0 on SIGTERM, or its log has a
 *   sanitizer report; with the in-process store, the spend file it saved
 *   at the stop does not hold that month spend for each subject.
 *
 * With --redis the store is a redis-server of its own (on_failure:
 * fail_open), frozen with SIGSTOP for FREEZE_S every FREEZE_EVERY_S, so
 * requests also take the journal's way and the write-back after it.
 * With --tls the router serves TLS (a test CA's certificate) and every
 * connection, the admin API's included, is verified TLS.
 *
 * Usage: fuzz_http [--redis] [--tls] ROUTER MOCKLLM SECONDS [SEED]. The seed fixes
 * the requests generated (not the timing); it is printed at the start.
 * Blocking and single-threaded: a test program, not part of the router.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"
#include "tests/support/redis.h"
#include "tests/support/utf8check.h"

#define UPSTREAM_KEY "sk-fuzz-upstream-4f1c"
#define ADMIN_KEY "adm-fuzz-93d2"
#define KEY_RICH "sk-fuzz-rich-a7e0"
#define KEY_POOR "sk-fuzz-poor-5b38"
#define KEY_CI "sk-fuzz-ci-91d2" /* rich's key "ci", with a budget of its own */
#define CORS_ORIGIN "https://app.example.com" /* cors.allow_origins */
#define SURE_TIMEOUT_MS 15000  /* framing intact: an answer must come */
#define UNSURE_TIMEOUT_MS 2500 /* head mutated: the router may wait for more */
#define HISTORY 16             /* requests kept for the failure report */
#define RELOAD_EVERY_S 2.0
#define FREEZE_EVERY_S 6.0 /* --redis: Redis frozen this often... */
#define FREEZE_S 1.5       /* ...this long (over command_timeout_ms: Redis down) */
#define SETTLE_S 2.0       /* after the last freeze: the journal's write-back */

/* ---- randomness (xorshift64*: reproducible from the seed) ---- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static unsigned below(unsigned n) { return (unsigned)(rnd() % n); }
static int percent(unsigned p) { return below(100) < p; }
#define PICK(a) ((a)[below(sizeof(a) / sizeof((a)[0]))])

/* ---- state ---- */

static struct support_proc router, mock_pool, mock_api;
static char workdir[] = "/tmp/costrouter-fuzz-http-XXXXXX";
static char conf_path[256], log_path[256], stderr_path[256], spend_path[256];
static char fail_path[256];
static struct buf history[HISTORY];
static unsigned long nsent;
static unsigned long nstatus[600]; /* answers by status; [0]: none */
static int use_redis;
static int use_tls;
static char ca_dir[256]; /* --tls: the test CA's folder */
static char ca_file[300]; /* --tls: its ca.crt, which clients verify against */
static struct test_redis redis;
static unsigned long nreloads, nfreezes;
static double reload_max_s; /* the slowest reload's answer */
static double next_reload, next_freeze; /* monotonic seconds */

static void put(struct buf *b, const void *p, size_t n)
{
    if (buf_append(b, p, n) != 0)
        abort();
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void stop_all(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock_pool);
    support_proc_stop(&mock_api);
    if (use_redis)
        test_redis_stop(&redis);
}

/* Write the last requests (oldest first) where they can be replayed. */
static void write_history(void)
{
    FILE *f = fopen(fail_path, "w");
    unsigned long first = nsent > HISTORY ? nsent - HISTORY : 0;

    if (f == NULL)
        return;
    for (unsigned long i = first; i < nsent; i++) {
        struct buf *h = &history[i % HISTORY];
        fprintf(f, "---- request %lu (%zu bytes) ----\n", i + 1, h->len);
        fwrite(h->data, 1, h->len, f);
        fputc('\n', f);
    }
    fclose(f);
}

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "fuzz-http: FAIL after %lu requests: ", nsent);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    write_history();
    fprintf(stderr, "fuzz-http: the last requests are in %s, the router's log in %s\n", fail_path,
            stderr_path);
    stop_all();
    exit(1);
}

/* ---- processes ---- */

static void write_conf(void)
{
    char rich[65], poor[65], ci[65], store[384] = "", tls[700] = "";
    FILE *f = fopen(conf_path, "w");

    if (f == NULL)
        fail("cannot write %s: %s", conf_path, strerror(errno));
    support_key_sha256_hex(KEY_RICH, rich);
    support_key_sha256_hex(KEY_POOR, poor);
    support_key_sha256_hex(KEY_CI, ci);
    if (use_redis)
        snprintf(store, sizeof(store), "store: { redis: \"%s/0\", on_failure: fail_open }\n",
                 redis.url);
    else
        snprintf(store, sizeof(store), "store: { spend_file: %s }\n", spend_path);
    if (use_tls)
        snprintf(tls, sizeof(tls), "tls: { cert_file: %s/server.crt, key_file: %s/server.key }\n",
                 ca_dir, ca_dir);
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "admin_key: %s\n"
            "cost_log: %s\n"
            "%s%s"
            "cache: { enabled: true, ttl_s: 60 }\n"
            "cors: { allow_origins: [\"" CORS_ORIGIN "\"] }\n"
            "limits: { max_header_bytes: 8192, max_body_bytes: 262144, header_timeout_ms: 1000,\n"
            "          body_timeout_ms: 1000, max_retries: 1 }\n"
            "backends:\n"
            "  - { name: pool, kind: self_hosted, url: \"http://127.0.0.1:%d/v1\", model: m-pool,\n"
            "      tokenizer: llama3, quality: 2, context_window: 8192, gpu_hourly_usd: 2.5,\n"
            "      replicas: 1, max_concurrency: 4, tokens_per_second: 1500,\n"
            "      first_byte_timeout_ms: 300, total_timeout_ms: 2000 }\n"
            "  - { name: api, kind: api, url: \"http://127.0.0.1:%d/v1\", api_key: %s,\n"
            "      model: gpt-4o-mini, tokenizer: o200k_base, quality: 3, context_window: 128000,\n"
            "      long_context: { above_prompt_tokens: 300, input_usd_per_mtok: 0.3,\n"
            "                      output_usd_per_mtok: 1.2 },\n"
            "      flex: { input_usd_per_mtok: 0.075, output_usd_per_mtok: 0.3 },\n"
            "      first_byte_timeout_ms: 300, total_timeout_ms: 2000 }\n"
            "  - { name: claude, kind: api, api: anthropic, url: \"http://127.0.0.1:%d/v1\",\n"
            "      api_key: %s, model: claude-sonnet-4-5, tokenizer: cl100k_base, quality: 3,\n"
            "      context_window: 200000, first_byte_timeout_ms: 300, total_timeout_ms: 2000 }\n"
            "  - { name: embed, kind: api, url: \"http://127.0.0.1:%d/v1\", api_key: %s,\n"
            "      model: text-embedding-3-small, tokenizer: cl100k_base, quality: 3,\n"
            "      context_window: 8191, input_usd_per_mtok: 0.02, output_usd_per_mtok: 0,\n"
            "      first_byte_timeout_ms: 300, total_timeout_ms: 2000 }\n"
            "routes:\n"
            "  - { model: chat, candidates: [pool, api, claude] }\n"
            "  - { model: gpt-4o-mini, candidates: [api] }\n"
            "  - { model: claude, candidates: [claude] }\n"
            "  - { model: text-embedding-3-small, candidates: [embed] }\n"
            "tenants:\n"
            "  - id: rich\n"
            "    api_keys: [\"sha256:%s\", { name: ci, hash: \"sha256:%s\",\n"
            "                budget: { daily_usd: 0.001 } }]\n"
            "    budget: { daily_usd: 1000, monthly_usd: 10000 }\n"
            "    slo: { min_quality: 2 }\n"
            "    tags: { team: fuzz }\n"
            "  - id: poor\n"
            "    api_keys: [\"sha256:%s\"]\n"
            "    budget: { daily_usd: 0.002, on_exhausted: downgrade }\n"
            "    rate_limits: { rpm: 100000, tpm: 20000000 }\n"
            "include: %s/conf/prices.yaml\n"
            "experiments:\n"
            "  - name: ab\n"
            "    route: chat\n"
            "    tenants: [rich]\n"
            "    user_header: x-user-id\n"
            "    arms:\n"
            "      - { name: a, weight: 50, backends: [pool] }\n"
            "      - { name: b, weight: 50, backends: [api] }\n",
            ADMIN_KEY, log_path, store, tls, mock_pool.port, mock_api.port, UPSTREAM_KEY,
            mock_api.port, UPSTREAM_KEY, mock_api.port, UPSTREAM_KEY, rich, ci, poor, getenv("PWD") ? getenv("PWD") : ".");
    fclose(f);
}

static void start_all(const char *router_bin)
{
    if (mkdtemp(workdir) == NULL)
        fail("mkdtemp: %s", strerror(errno));
    snprintf(conf_path, sizeof(conf_path), "%s/costrouter.yaml", workdir);
    snprintf(log_path, sizeof(log_path), "%s/cost.jsonl", workdir);
    snprintf(spend_path, sizeof(spend_path), "%s/spend.jsonl", workdir);
    snprintf(stderr_path, sizeof(stderr_path), "%s/router.log", workdir);
    snprintf(fail_path, sizeof(fail_path), "%s/requests.txt", workdir);
    if (support_mockllm_start(&mock_pool, "--tokens", "12", NULL) != 0 ||
        support_mockllm_start(&mock_api, "--require-key", UPSTREAM_KEY, NULL) != 0)
        fail("mockllm did not start");
    if (use_redis && test_redis_start(&redis, 0) != 0)
        fail("redis-server did not start");
    if (use_tls && support_make_test_ca(ca_dir, sizeof(ca_dir)) != 0)
        fail("no test CA");
    snprintf(ca_file, sizeof(ca_file), "%s/ca.crt", ca_dir);
    write_conf();
    /* ASan's and UBSan's reports go to the log, which is scanned at the end. */
    if (support_router_start(&router, router_bin, conf_path, stderr_path) != 0)
        fail("the router did not start (config %s)", conf_path);
}

/* ---- request generation ---- */

static const char *const seed_bodies[] = {
    "{\"model\":\"chat\",\"messages\":[{\"role\":\"system\",\"content\":\"You are terse.\"},"
    "{\"role\":\"user\",\"content\":\"Hello there, how are you?\"}],\"max_tokens\":32,"
    "\"service_tier\":\"priority\"}",
    "{\"model\":\"chat\",\"stream\":true,\"stream_options\":{\"include_usage\":true},"
    "\"messages\":[{\"role\":\"user\",\"content\":\"Count to five.\"}],\"temperature\":0.2}",
    "{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
    "\"text\":\"What is in this image?\"},{\"type\":\"image_url\",\"image_url\":{\"url\":"
    "\"data:image/png;base64,iVBORw0KGgo=\",\"detail\":\"low\"}}]}],\"tools\":[{\"type\":"
    "\"function\",\"function\":{\"name\":\"lookup\",\"description\":\"Find a thing\","
    "\"parameters\":{\"type\":\"object\",\"properties\":{\"q\":{\"type\":\"string\"}}}}}],"
    "\"max_completion_tokens\":64}",
    "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":"
    "\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\","
    "\"function\":{\"name\":\"lookup\",\"arguments\":\"{\\\"q\\\":\\\"x\\\"}\"}}]},{\"role\":"
    "\"tool\",\"tool_call_id\":\"c1\",\"content\":\"found\"}],\"n\":1,\"user\":\"u-1\"}",
    "{\"model\":\"text-embedding-3-small\",\"input\":[\"first text\",\"second, longer text\"]}",
    "{\"model\":\"chat\",\"prompt\":\"Once upon a time\",\"max_tokens\":16,\"stream\":false}",
    "{\"model\":\"chat\",\"instructions\":\"Be terse.\",\"input\":\"Hello there\","
    "\"max_output_tokens\":32,\"temperature\":0,\"service_tier\":\"flex\",\"store\":false,"
    "\"tools\":[{\"type\":\"web_search\"}],\"max_tool_calls\":2}",
    "{\"model\":\"gpt-4o-mini\",\"stream\":true,\"previous_response_id\":\"resp_1\",\"input\":["
    "{\"role\":\"user\",\"content\":[{\"type\":\"input_text\",\"text\":\"What is this?\"},"
    "{\"type\":\"input_image\",\"image_url\":\"data:image/png;base64,iVBORw0KGgo=\","
    "\"detail\":\"low\"}]},{\"type\":\"function_call\",\"call_id\":\"c1\",\"name\":\"lookup\","
    "\"arguments\":\"{}\"},{\"type\":\"function_call_output\",\"call_id\":\"c1\","
    "\"output\":\"found\"}],\"tools\":[{\"type\":\"function\",\"name\":\"lookup\","
    "\"parameters\":{\"type\":\"object\",\"properties\":{\"q\":{\"type\":\"string\"}}}}]}",
    "{\"model\":\"claude\",\"max_tokens\":64,\"system\":\"Be terse.\",\"temperature\":0,"
    "\"messages\":[{\"role\":\"user\",\"content\":\"Hello there\"}],\"tools\":[{\"type\":"
    "\"web_search_20250305\",\"name\":\"web_search\",\"max_uses\":3}]}",
    "{\"model\":\"chat\",\"max_tokens\":32,\"stream\":true,\"system\":[{\"type\":\"text\","
    "\"text\":\"Be terse.\",\"cache_control\":{\"type\":\"ephemeral\"}}],\"messages\":["
    "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"What is this?\"},"
    "{\"type\":\"image\",\"source\":{\"type\":\"base64\",\"media_type\":\"image/png\","
    "\"data\":\"iVBORw0KGgoAAAANSUhEUgAAA+gAAAH0CAYAAAA=\"}}]},{\"role\":\"assistant\","
    "\"content\":[{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"lookup\",\"input\":"
    "{\"q\":\"x\"}}]},{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\","
    "\"tool_use_id\":\"t1\",\"content\":[{\"type\":\"text\",\"text\":\"found\"}]}]}],"
    "\"tools\":[{\"name\":\"lookup\",\"description\":\"Look up\",\"input_schema\":"
    "{\"type\":\"object\",\"properties\":{\"q\":{\"type\":\"string\"}}}}]}",
    "{\"model\":\"claude\",\"system\":\"Be terse.\",\"messages\":[{\"role\":\"user\","
    "\"content\":[{\"type\":\"text\",\"text\":\"Count me\"}]}],\"tools\":[{\"name\":"
    "\"lookup\",\"input_schema\":{\"type\":\"object\"}}]}",
};

static const char *const seed_paths[] = {
    "/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions",
    "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses",
    "/v1/responses", "/v1/messages", "/v1/messages", "/v1/messages/count_tokens",
};

/* Paths without a body: GET, some needing the admin key. */
static const char *const get_paths[] = {
    "/healthz", "/v1/models", "/metrics", "/admin/tenants", "/admin/tenants/rich/spend",
    "/admin/tenants/p%6f%6Fr/spend", "/admin/tenants/%ff/spend", "/admin/backends",
    "/dashboard", "/admin/tenants/", "/v1/models?x=1", "/v1/../admin/tenants",
};

static const char *const names[] = {
    "model", "messages", "role", "content", "stream", "max_tokens", "max_completion_tokens",
    "n", "tools", "stream_options", "include_usage", "input", "prompt", "user", "type", "text",
    "image_url", "name", "tool_calls", "functions", "response_format", "logprobs", "top_logprobs",
    "seed", "stop", "temperature", "detail", "url", "parameters", "tool_choice",
    "instructions", "max_output_tokens", "previous_response_id", "arguments", "output",
    "call_id", "service_tier", "flex", "priority", "store", "conversation", "system", "source",
    "data", "media_type", "tool_use_id", "input_schema", "cache_control", "max_tool_calls",
};

static const char *const models[] = {
    "chat", "gpt-4o-mini", "text-embedding-3-small", "", "nope", "CHAT", "chat\xc3\xa9",
    "chat\xff", "\xed\xa0\x80",
};

static const char *const strings[] = {
    "", " ", "\xc3\xa9t\xc3\xa9 \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x99\x82", "<|endoftext|>",
    "<|im_start|>system", "\t\n\r", "\\u0000", "data:image/png;base64,", "user", "system",
    "assistant", "tool", "function", "image_url", "text", "auto", "none", "input_text",
    "input_image", "function_call", "function_call_output", "message", "tool_use",
    "tool_result", "image", "base64", "ephemeral",
};

static double interesting_number(void)
{
    static const double nums[] = {
        0, -1, 1, 2, 255, 65536, 2147483647.0, 2147483648.0, 4294967296.0, 9.2e18, 1.9e19,
        1e12, 1e13, 1e300, -1e300, 0.5, -0.0, 1e-300, 131072, 8192, 128000,
    };
    return PICK(nums);
}

/* A string of n copies of a short piece: long prompts, many tokens. */
static cJSON *long_string(void)
{
    static const char *const pieces[] = {"a", "ab ", "\xe4\xb8\x96", " 1234", "\xf0\x9f\x99\x82",
                                         "<|endoftext|>", "\\"};
    const char *p = PICK(pieces);
    size_t n = 1 + below(below(4) == 0 ? 120000 : 2000), plen = strlen(p);
    char *s = malloc(n * plen + 1);
    cJSON *j;

    if (s == NULL)
        abort();
    for (size_t i = 0; i < n; i++)
        memcpy(s + i * plen, p, plen);
    s[n * plen] = '\0';
    j = cJSON_CreateString(s);
    free(s);
    return j;
}

static cJSON *deep_value(void)
{
    cJSON *root = cJSON_CreateArray(), *cur = root;
    unsigned depth = 1 + below(400);

    for (unsigned i = 0; i < depth; i++) {
        cJSON *next = below(2) ? cJSON_CreateArray() : cJSON_CreateObject();
        if (cJSON_IsArray(cur))
            cJSON_AddItemToArray(cur, next);
        else
            cJSON_AddItemToObject(cur, PICK(names), next);
        cur = next;
    }
    return root;
}

static cJSON *random_value(void)
{
    switch (below(10)) {
    case 0: return cJSON_CreateNumber(interesting_number());
    case 1: return cJSON_CreateString(PICK(strings));
    case 2: return cJSON_CreateString(PICK(models));
    case 3: return below(2) ? cJSON_CreateTrue() : cJSON_CreateFalse();
    case 4: return cJSON_CreateNull();
    case 5: return cJSON_CreateObject();
    case 6: return cJSON_CreateArray();
    case 7: return long_string();
    case 8: return deep_value();
    default: {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", PICK(strings));
        cJSON_AddItemToObject(m, "content", below(2) ? long_string() : random_value());
        return m;
    }
    }
}

/* Every node of the tree but the root, in document order. */
static size_t collect(cJSON *node, cJSON **out, size_t max, size_t n)
{
    for (cJSON *c = node->child; c != NULL && n < max; c = c->next) {
        out[n++] = c;
        n = collect(c, out, max, n);
    }
    return n;
}

static cJSON *parent_of(cJSON *root, cJSON *node)
{
    for (cJSON *c = root->child; c != NULL; c = c->next) {
        cJSON *p;
        if (c == node)
            return root;
        if ((p = parent_of(c, node)) != NULL)
            return p;
    }
    return NULL;
}

/* Put `with` in the place of `node`, under the same name. */
static void replace(cJSON *parent, cJSON *node, cJSON *with)
{
    if (node->string != NULL && (with->string = strdup(node->string)) == NULL)
        abort();
    cJSON_ReplaceItemViaPointer(parent, node, with);
}

/* One change to the tree: a value replaced, a member removed, repeated
 * (the router must refuse a name given twice) or renamed. */
static void mutate_tree(cJSON *root)
{
    cJSON *nodes[512], *node, *parent;
    size_t n = collect(root, nodes, 512, 0);

    if (n == 0)
        return;
    node = nodes[below((unsigned)n)];
    parent = parent_of(root, node);
    switch (below(8)) {
    case 0:
        cJSON_DetachItemViaPointer(parent, node);
        cJSON_Delete(node);
        break;
    case 1:
        if (cJSON_IsObject(parent))
            cJSON_AddItemToObject(parent, node->string, random_value());
        else
            cJSON_AddItemToArray(parent, cJSON_Duplicate(node, 1));
        break;
    case 2:
        if (node->string != NULL) {
            char *s = strdup(PICK(names));
            if (s == NULL)
                abort();
            if (!(node->type & cJSON_StringIsConst))
                free(node->string);
            node->type &= ~cJSON_StringIsConst;
            node->string = s;
        }
        break;
    case 3:
        replace(parent, node, cJSON_CreateString(PICK(models)));
        break;
    default:
        replace(parent, node, random_value());
        break;
    }
}

static const char *const tokens[] = {
    "\"", "\\", "\\u", "\\ud800", "\\udc00", "\\ud83d\\ude42", "{", "}", "[", "]", ",", ":",
    "null", "1e999", "-", "\"model\":\"chat\",", "\xff", "\xc3", "\xed\xa0\x80", "\x00", " ",
};

/* A few byte-level changes to a text: it may stop being valid JSON. */
static void mutate_bytes(struct buf *b)
{
    unsigned k = 1 + below(4);

    for (unsigned i = 0; i < k && b->len > 0; i++) {
        size_t at = below((unsigned)b->len);
        switch (below(4)) {
        case 0: b->data[at] ^= (char)(1u << below(8)); break;
        case 1: b->len = at; break; /* truncated */
        case 2: {
            size_t n = 1 + below(8);
            if (n > b->len - at)
                n = b->len - at;
            memmove(b->data + at, b->data + at + n, b->len - at - n);
            b->len -= n;
            break;
        }
        default: {
            const char *t = PICK(tokens);
            size_t n = t[0] ? strlen(t) : 1;
            if (buf_reserve(b, n) != 0)
                abort();
            memmove(b->data + at + n, b->data + at, b->len - at);
            memcpy(b->data + at, t, n);
            b->len += n;
            break;
        }
        }
    }
}

/* A request being built. */
struct request {
    struct buf bytes;
    int framing_sure;   /* head not mutated: the router knows where it ends */
    int closes;         /* Connection: close sent */
    int expect;         /* Expect: 100-continue sent */
    const char *key;    /* tenant or admin key in Authorization, or NULL */
};

static void add_auth(struct buf *h, struct request *r, int admin_path)
{
    static const char *const odd[] = {"Bearer", "Bearer ", "Basic Zm9vOmJhcg==", "bearer x",
                                      "Bearer sk-fuzz-rich", "Bearer \xff\xfe"};
    unsigned k = below(20);

    if (k < 17) {
        r->key = admin_path && k >= 5 ? ADMIN_KEY
                 : k % 3 == 0          ? KEY_POOR
                 : k % 4 == 1          ? KEY_CI
                                       : KEY_RICH;
        /* as Anthropic's SDKs send it, now and then */
        puts_(h, percent(25) ? "x-api-key: " : "Authorization: Bearer ");
        puts_(h, r->key);
        puts_(h, "\r\n");
    } else if (k < 19) {
        puts_(h, "Authorization: ");
        puts_(h, PICK(odd));
        puts_(h, "\r\n");
    } /* else: none */
}

static void add_headers(struct buf *h, struct request *r)
{
    static const char *const mock[] = {
        "x-mock-fault: close-midstream\r\n", "x-mock-fault: close-before-response\r\n",
        "x-mock-fault: 500\r\n", "x-mock-fault: 429\r\n", "x-mock-status: 400\r\n",
        "x-mock-status: 503\r\n", "x-mock-status: 204\r\n", "x-mock-usage: omit\r\n",
        "x-mock-tokens: 0\r\n", "x-mock-tokens: 400\r\n", "x-mock-ttft-ms: 30\r\n",
        "x-mock-retry-after: 0\r\n", "x-mock-token-delay-ms: 1\r\n",
        "x-mock-service-tier: flex\r\n", "x-mock-service-tier: default\r\n",
        "x-mock-cached-tokens: 3\r\n", "x-mock-cache-write-tokens: 5\r\n",
        "x-mock-cache-write-1h-tokens: 2\r\n", "x-mock-web-searches: 2\r\n",
        "anthropic-version: 2023-06-01\r\n", "anthropic-beta: fuzz-1\r\n",
    };
    static const char *const other[] = {
        "Accept: text/event-stream\r\n", "Accept-Encoding: gzip\r\n",
        "x-costrouter-tags: feature=fuzz, app=a.b-c\r\n", "x-costrouter-tags: team=x\r\n",
        "x-costrouter-tags: ,=,\r\n", "X-Costrouter-Tags: k=\xc3\xa9\r\n",
        "X-User-Id: user-7\r\n", "X-User-Id: \r\n", "Content-Type: text/plain\r\n",
        "Cookie: a=b\r\n", "X-Request-Id: r-\"1\"\r\n", "Upgrade: websocket\r\n",
        "Transfer-Encoding: gzip\r\n", "Host: other.example\r\n",
        "Origin: " CORS_ORIGIN "\r\n", "Origin: https://evil.example\r\n", "Origin: null\r\n",
        "Access-Control-Request-Method: POST\r\n",
    };

    if (percent(15))
        puts_(h, below(30) == 0 ? "x-mock-fault: stall\r\n" : PICK(mock));
    if (percent(20))
        puts_(h, PICK(other));
    if (percent(5)) {
        r->closes = 1;
        puts_(h, "Connection: close\r\n");
    }
    if (percent(4)) {
        r->expect = 1;
        puts_(h, "Expect: 100-continue\r\n");
    }
    if (percent(2)) { /* over max_header_bytes: 431 */
        puts_(h, "X-Big: ");
        for (unsigned i = 0, n = 6000 + below(6000); i < n; i++)
            put(h, "b", 1);
        puts_(h, "\r\n");
    }
}

/* The body sent chunked, in random cuts. */
static void put_chunked(struct buf *out, const struct buf *body)
{
    size_t off = 0;

    while (off < body->len) {
        size_t n = 1 + below(body->len - off < 4096 ? (unsigned)(body->len - off) : 4096);
        char size[32];
        snprintf(size, sizeof(size), "%zx\r\n", n);
        puts_(out, size);
        put(out, body->data + off, n);
        puts_(out, "\r\n");
        off += n;
    }
    puts_(out, "0\r\n\r\n");
}

static void make_body(struct buf *body, unsigned seed)
{
    cJSON *root = cJSON_Parse(seed_bodies[seed]);
    char *text;

    for (unsigned i = 0, n = below(4); i < n; i++)
        mutate_tree(root);
    if (percent(5)) /* the same long string in many messages: the count cache */
        cJSON_AddItemToObject(root, "metadata", long_string());
    text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (text == NULL)
        abort();
    puts_(body, text);
    free(text);
    if (percent(12))
        mutate_bytes(body);
}

static void make_request(struct request *r)
{
    struct buf head = {0}, body = {0}, chunked = {0}, *after_head = &body;
    int post = percent(85), admin = 0, preflight;
    const char *path;

    buf_reset(&r->bytes);
    r->framing_sure = 1;
    r->closes = r->expect = 0;
    r->key = NULL;
    if (post) {
        unsigned seed = below(sizeof(seed_bodies) / sizeof(seed_bodies[0]));
        path = below(40) == 0 ? PICK(get_paths) : seed_paths[seed];
        make_body(&body, seed);
    } else {
        path = PICK(get_paths);
        admin = strncmp(path, "/admin", 6) == 0 || strcmp(path, "/metrics") == 0;
    }
    preflight = !post && below(10) == 0;
    puts_(&head, post ? (below(50) == 0 ? "PUT " : "POST ") : preflight ? "OPTIONS " : "GET ");
    puts_(&head, path);
    puts_(&head, " HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if (preflight && percent(70)) /* a browser's, from the allowed origin or not */
        buf_printf(&head, "Origin: %s\r\nAccess-Control-Request-Method: POST\r\n"
                          "Access-Control-Request-Headers: authorization, content-type\r\n",
                   percent(70) ? CORS_ORIGIN : "https://evil.example");
    add_auth(&head, r, admin);
    add_headers(&head, r);
    if (post && percent(15)) {
        puts_(&head, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
        put_chunked(&chunked, &body);
        after_head = &chunked;
    } else {
        if (post)
            buf_printf(&head, "Content-Type: application/json\r\nContent-Length: %zu\r\n",
                       body.len);
        puts_(&head, "\r\n");
    }
    if (percent(3)) { /* anything can happen to the head: framing unsure */
        mutate_bytes(&head);
        r->framing_sure = 0;
        r->closes = 1; /* the connection's state is unknown after it */
    }
    put(&r->bytes, head.data, head.len);
    put(&r->bytes, after_head->data, after_head->len);
    buf_free(&head);
    buf_free(&body);
    buf_free(&chunked);
}

/* ---- checks on an answer ---- */

static int contains(const struct buf *b, const char *s)
{
    return b->len > 0 && memmem(b->data, b->len, s, strlen(s)) != NULL;
}

static size_t count(const struct buf *b, const char *s)
{
    size_t n = 0, len = strlen(s);
    const char *p = b->data, *end = b->data + b->len;

    while (p && (p = memmem(p, (size_t)(end - p), s, len)) != NULL) {
        n++;
        p += len;
    }
    return n;
}

static void check_error_body(const struct support_http_response *a)
{
    cJSON *j = cJSON_ParseWithLength(a->body.data ? a->body.data : "", a->body.len);
    cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    const char *ct = support_http_header(a, "content-type");

    if (ct == NULL || strncmp(ct, "application/json", 16) != 0)
        fail("status %d with content-type %s", a->status, ct ? ct : "(none)");
    if (!support_utf8_valid((const unsigned char *)a->body.data, a->body.len))
        fail("status %d with an error body that is not UTF-8", a->status);
    if (!cJSON_IsObject(e) || !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "message")) ||
        !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "type")))
        fail("status %d without an OpenAI-style error body: %.*s", a->status,
             (int)(a->body.len > 300 ? 300 : a->body.len), a->body.data ? a->body.data : "");
    cJSON_Delete(j);
}

static void check_answer(const struct request *r, const struct support_http_response *a)
{
    if (a->status < 100 || a->status > 599)
        fail("status %d", a->status);
    nstatus[a->status]++;
    if (contains(&a->raw, UPSTREAM_KEY))
        fail("the upstream key is in an answer");
    if (r->key && r->framing_sure && count(&r->bytes, r->key) == 1 && contains(&a->raw, r->key))
        fail("the client's key is in the answer");
    if (a->status >= 400)
        check_error_body(a);
    /* The one origin allowed, once: never a backend's, nor an echo of
     * another origin (the mock sends none; a request's "evil" one). */
    if (count(&a->raw, "\r\nAccess-Control-Allow-Origin: ") > 1 ||
        (contains(&a->raw, "Access-Control-Allow-Origin: ") &&
         !contains(&a->raw, "Access-Control-Allow-Origin: " CORS_ORIGIN "\r\n")))
        fail("an answer's Access-Control-Allow-Origin is not the allowed origin, once");
}

/* ---- the loop ---- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A new connection to the router: TLS, verified, with --tls. */
static int connect_router(struct support_http_conn *c)
{
    if (use_tls)
        return support_https_connect(c, router.port, ca_file, 5000);
    return support_http_connect(c, router.port);
}

/* One request on a new connection, closed after its answer. */
static int request_once(const char *req, size_t len, struct support_http_response *a)
{
    if (use_tls)
        return support_https_request(router.port, ca_file, req, len, 5000, a);
    return support_http_request(router.port, req, len, 5000, a);
}

/* One admin API call on a new connection (a POST has an empty body). */
static int admin_request(const char *method, const char *path, struct support_http_response *a)
{
    struct buf req = {0};
    int rc;

    if (support_http_format(&req, method, path, "Authorization: Bearer " ADMIN_KEY "\r\n",
                            strcmp(method, "POST") == 0 ? "" : NULL))
        abort();
    rc = request_once(req.data, req.len, a);
    buf_free(&req);
    return rc;
}

/* Reload the config (unchanged) through the admin API; it answers once the
 * new config is in place. */
static void admin_reload(void)
{
    struct support_http_response a = {0};
    double start = now_s();
    int rc = admin_request("POST", "/admin/reload", &a);

    if (rc != 0 || a.status != 200 || !contains(&a.body, "\"reloaded\""))
        fail("POST /admin/reload: %s, status %d: %.*s", rc ? strerror(-rc) : "answered",
             a.status, (int)(a.body.len > 200 ? 200 : a.body.len), a.body.data ? a.body.data : "");
    support_http_response_free(&a);
    nreloads++;
    if (now_s() - start > reload_max_s)
        reload_max_s = now_s() - start;
}

/* How a reload meets the request (RELOAD_EVERY_S). */
enum reload { NO_RELOAD, RELOAD_IN_FLIGHT, RELOAD_BEFORE_SENDING };

/* Send the request (pipelined with the next when both have intact
 * framing) and check the answers. With RELOAD_IN_FLIGHT, reload once it is
 * sent: its answer must still come, and the connection closes after it
 * (the old config's). Returns 1 when the connection can carry another
 * request. */
static int exchange(struct support_http_conn *c, struct request *r, int nreq, enum reload reload)
{
    struct buf all = {0};

    for (int i = 0; i < nreq; i++) {
        struct buf *h = &history[nsent % HISTORY];
        buf_reset(h);
        put(h, r[i].bytes.data, r[i].bytes.len);
        put(&all, r[i].bytes.data, r[i].bytes.len);
        nsent++;
    }
    if (support_http_send(c, all.data, all.len) != 0) {
        buf_free(&all);
        if (reload == RELOAD_BEFORE_SENDING)
            fail("a connection accepted before a reload closed before its first request");
        return 0; /* the router closed first (after a refusal): fine */
    }
    buf_free(&all);
    if (reload == RELOAD_IN_FLIGHT)
        admin_reload();
    for (int i = 0; i < nreq; i++) {
        struct support_http_response a = {0};
        int timeout = r[i].framing_sure ? SURE_TIMEOUT_MS : UNSURE_TIMEOUT_MS;
        int rc = support_http_read(c, &a, timeout);

        if (rc == 0 && a.status == 100) /* Expect: 100-continue, then the answer */
            rc = support_http_read(c, &a, timeout);
        if (rc == -EPROTO)
            fail("an answer that is not HTTP: %.*s", (int)(a.raw.len > 200 ? 200 : a.raw.len),
                 a.raw.data ? a.raw.data : "");
        if (rc == -ETIMEDOUT && r[i].framing_sure)
            fail("no answer in %d ms (%zu bytes of it came)", timeout, a.raw.len);
        if (rc == -ECONNRESET && r[i].framing_sure && a.raw.len == 0)
            fail("the router closed the connection without answering%s",
                 reload ? " (reloaded meanwhile)" : "");
        if (rc != 0) {
            if (a.status == 0)
                nstatus[0]++;
            support_http_response_free(&a);
            return 0;
        }
        check_answer(&r[i], &a);
        if (!r[i].framing_sure || r[i].closes) {
            support_http_response_free(&a);
            return 0;
        }
        const char *conn = support_http_header(&a, "connection");
        int closing = conn && strcasecmp(conn, "close") == 0;
        support_http_response_free(&a);
        if (closing)
            return 0;
    }
    return reload == NO_RELOAD;
}

/* --redis: freeze Redis now and then, never in the last seconds, so that
 * the journal is written back before the end checks. */
static void freeze_or_thaw(double now, double end)
{
    static double thaw_at;

    if (!use_redis)
        return;
    if (thaw_at > 0 && now >= thaw_at) {
        test_redis_kill(&redis, SIGCONT);
        thaw_at = 0;
    } else if (thaw_at == 0 && now >= next_freeze && now + FREEZE_S + SETTLE_S < end) {
        test_redis_kill(&redis, SIGSTOP);
        nfreezes++;
        thaw_at = now + FREEZE_S;
        next_freeze = now + FREEZE_EVERY_S;
    }
}

static void fuzz(double seconds)
{
    struct support_http_conn c = {.fd = -1};
    struct request r[2];

    memset(r, 0, sizeof(r));
    double end = now_s() + seconds;

    next_reload = now_s() + RELOAD_EVERY_S / 2;
    next_freeze = now_s() + FREEZE_EVERY_S / 2;
    for (double now; (now = now_s()) < end;) {
        int nreq = 1;

        freeze_or_thaw(now, end);
        make_request(&r[0]);
        if (r[0].framing_sure && !r[0].closes && !r[0].expect && percent(8)) {
            make_request(&r[1]);
            nreq = r[1].framing_sure && !r[1].expect ? 2 : 1;
        }
        enum reload reload = NO_RELOAD;
        if (nreq == 1 && r[0].framing_sure && now >= next_reload) {
            reload = percent(50) ? RELOAD_IN_FLIGHT : RELOAD_BEFORE_SENDING;
            next_reload = now + RELOAD_EVERY_S;
        }
        if (reload == RELOAD_BEFORE_SENDING)
            support_http_close(&c); /* a fresh connection... */
        if (c.fd < 0 && connect_router(&c) != 0)
            fail("cannot connect to the router: is it still running?");
        if (reload == RELOAD_BEFORE_SENDING) {
            usleep(20000); /* ...accepted by the old config, idle at the reload */
            admin_reload();
        }
        if (!exchange(&c, r, nreq, reload))
            support_http_close(&c);
    }
    support_http_close(&c);
    buf_free(&r[0].bytes);
    buf_free(&r[1].bytes);
    if (use_redis) {
        test_redis_kill(&redis, SIGCONT); /* in case */
        usleep((useconds_t)(SETTLE_S * 1e6));
    }
}

/* ---- end checks ---- */

static cJSON *admin_get(const char *path)
{
    struct support_http_response a = {0};
    cJSON *j = NULL;

    if (admin_request("GET", path, &a) == 0 && a.status == 200)
        j = cJSON_ParseWithLength(a.body.data, a.body.len);
    support_http_response_free(&a);
    return j;
}

static int64_t micro(double usd) { return llround(usd * 1e6); }

/* What the store counts: a tenant's spend, or (key not NULL) that of
 * its key with a budget of its own. */
struct subject {
    const char *tenant; /* its id */
    const char *key;    /* the key's name, or NULL: the tenant */
};

/* The object of `s` in a tenant's spend `j` (the admin API's). */
static cJSON *subject_of(cJSON *j, const struct subject *s)
{
    cJSON *k;

    if (s->key == NULL)
        return j;
    cJSON_ArrayForEach(k, cJSON_GetObjectItemCaseSensitive(j, "keys"))
        if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(k, "name")) &&
            strcmp(cJSON_GetObjectItemCaseSensitive(k, "name")->valuestring, s->key) == 0)
            return k;
    return NULL;
}

/* Month spend and what is still reserved, from the admin API. Waits for
 * requests the fuzzer gave up on (mutated heads) to settle. */
static void read_spend(const struct subject *s, int64_t *month)
{
    char path[128];
    snprintf(path, sizeof(path), "/admin/tenants/%s/spend", s->tenant);
    for (int tries = 0;; tries++) {
        cJSON *j = admin_get(path);
        cJSON *m = cJSON_GetObjectItemCaseSensitive(subject_of(j, s), "month_usd");
        cJSON *res = cJSON_GetObjectItemCaseSensitive(subject_of(j, s), "reserved_usd");
        if (!cJSON_IsNumber(m) || !cJSON_IsNumber(res))
            fail("GET %s did not answer its JSON", path);
        *month = micro(m->valuedouble);
        if (res->valuedouble == 0) {
            cJSON_Delete(j);
            return;
        }
        if (tries == 50)
            fail("%s %s still has %.6f USD reserved", s->tenant, s->key ? s->key : "",
                 res->valuedouble);
        cJSON_Delete(j);
        usleep(100000);
    }
}

/* Sum of cost_usd in the cost log for one subject, in micro-USD: the
 * exact costs, which the store charges in whole micro-USD, carrying the
 * remainder. */
static double logged_spend(const struct subject *s, unsigned long *lines)
{
    FILE *f = fopen(log_path, "r");
    char *line = NULL;
    size_t cap = 0;
    double sum = 0;

    if (f == NULL)
        fail("no cost log at %s", log_path);
    while (getline(&line, &cap, f) > 0) {
        cJSON *j = cJSON_Parse(line), *t, *k, *cost;
        if (j == NULL)
            fail("a cost log line is not JSON: %.200s", line);
        t = cJSON_GetObjectItemCaseSensitive(j, "tenant");
        k = cJSON_GetObjectItemCaseSensitive(j, "key");
        cost = cJSON_GetObjectItemCaseSensitive(j, "cost_usd");
        if (cJSON_IsString(t) && strcmp(t->valuestring, s->tenant) == 0 &&
            (s->key == NULL || (cJSON_IsString(k) && strcmp(k->valuestring, s->key) == 0))) {
            (*lines)++;
            if (cJSON_IsNumber(cost))
                sum += cost->valuedouble * 1e6;
        }
        cJSON_Delete(j);
    }
    free(line);
    fclose(f);
    return sum;
}

static void check_log_file(void)
{
    FILE *f = fopen(stderr_path, "r");
    char *line = NULL;
    size_t cap = 0;
    unsigned long journaled = 0;

    if (f == NULL)
        fail("no router log at %s", stderr_path);
    while (getline(&line, &cap, f) > 0) {
        journaled += strstr(line, "charges are journaled") != NULL;
        if (strstr(line, "Sanitizer") || strstr(line, "runtime error:"))
            fail("sanitizer report in the router's log: %s", line);
        if (strstr(line, UPSTREAM_KEY) || strstr(line, KEY_RICH) || strstr(line, KEY_POOR) ||
            strstr(line, KEY_CI) || strstr(line, ADMIN_KEY))
            fail("a key in the router's log: %s", line);
    }
    free(line);
    fclose(f);
    /* Else the freezes missed every request, and the journal went untried. */
    if (nfreezes > 0 && journaled == 0)
        fail("Redis was frozen %lu times, yet no charge was journaled", nfreezes);
}

/* The month spend the spend file holds for `subject` ("TENANT" or
 * "TENANT#KEY"), 0 when it names none. */
static int64_t saved_spend(const char *subject)
{
    FILE *f = fopen(spend_path, "r");
    char *line = NULL;
    size_t cap = 0;
    int64_t month = 0;

    if (f == NULL)
        fail("no spend file at %s", spend_path);
    while (getline(&line, &cap, f) > 0) {
        cJSON *j = cJSON_Parse(line);
        cJSON *s = cJSON_GetObjectItemCaseSensitive(j, "subject");
        cJSON *m = cJSON_GetObjectItemCaseSensitive(j, "month_micro_usd");

        if (j == NULL)
            fail("a spend file line is not JSON: %.200s", line);
        if (cJSON_IsString(s) && strcmp(s->valuestring, subject) == 0 && cJSON_IsNumber(m))
            month = (int64_t)m->valuedouble;
        cJSON_Delete(j);
    }
    free(line);
    fclose(f);
    return month;
}

static void finish(void)
{
    static const struct subject subjects[] = {{"rich", NULL}, {"poor", NULL}, {"rich", "ci"}};
    enum { N = sizeof(subjects) / sizeof(subjects[0]) };
    struct support_http_response a = {0};
    int64_t month[N];
    unsigned long lines[N] = {0};
    static const char health[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

    if (request_once(health, sizeof(health) - 1, &a) != 0 || a.status != 200)
        fail("GET /healthz after the run: status %d", a.status);
    support_http_response_free(&a);
    for (int i = 0; i < N; i++)
        read_spend(&subjects[i], &month[i]);
    support_proc_stop(&router);
    if (!support_proc_exited_cleanly(&router))
        fail("the router did not exit 0 on SIGTERM (wait status %d)", router.status);
    check_log_file();
    for (int i = 0; i < N; i++) {
        const char *key = subjects[i].key ? subjects[i].key : "";
        double logged = logged_spend(&subjects[i], &lines[i]);
        printf("fuzz-http: %s%s%s: spent %.6f USD, cost log %.9f USD over %lu lines\n",
               subjects[i].tenant, *key ? " key " : "", key, month[i] / 1e6, logged / 1e6,
               lines[i]);
        /* One router: what a subject carries is at most half a micro-USD. */
        if (fabs(logged - (double)month[i]) > 0.5 + 1e-6)
            fail("%s%s%s: the store holds %.6f USD, the cost log sums to %.9f USD",
                 subjects[i].tenant, *key ? " key " : "", key, month[i] / 1e6, logged / 1e6);
        if (!use_redis) {
            char subject[64];
            int64_t saved;

            snprintf(subject, sizeof(subject), "%s%s%s", subjects[i].tenant, *key ? "#" : "",
                     key);
            saved = saved_spend(subject);
            if (saved != month[i])
                fail("%s: the spend file saved at the stop holds %lld micro-USD, the store %lld",
                     subject, (long long)saved, (long long)month[i]);
        }
    }
}

static void print_summary(void)
{
    printf("fuzz-http: %lu requests, %lu reloads (slowest %.0f ms), %lu Redis freezes; "
           "answers by status:",
           nsent, nreloads, reload_max_s * 1e3, nfreezes);
    for (int s = 0; s < 600; s++) {
        if (nstatus[s] == 0)
            continue;
        if (s == 0)
            printf(" none %lu", nstatus[s]);
        else
            printf(" %d %lu", s, nstatus[s]);
    }
    printf("; clean\n");
}

int main(int argc, char **argv)
{
    double seconds;

    static const char usage[] =
        "usage: fuzz_http [--redis] [--tls] ROUTER MOCKLLM SECONDS [SEED]\n";

    for (; argc > 1 && strncmp(argv[1], "--", 2) == 0; argc--, argv++) {
        if (strcmp(argv[1], "--redis") == 0) {
            use_redis = 1;
        } else if (strcmp(argv[1], "--tls") == 0) {
            use_tls = 1;
        } else {
            fputs(usage, stderr);
            return 2;
        }
    }
    if (argc < 4) {
        fputs(usage, stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    setenv("MOCKLLM_BIN", argv[2], 1);
    seconds = atof(argv[3]);
    rng_state = argc > 4 ? strtoull(argv[4], NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)getpid();
    if (rng_state == 0)
        rng_state = 1;
    printf("fuzz-http: seed %llu, %.0f s, router %s, %s store, %s\n",
           (unsigned long long)rng_state, seconds, argv[1], use_redis ? "Redis" : "in-process",
           use_tls ? "TLS" : "plain HTTP");
    fflush(stdout);
    start_all(argv[1]);
    fuzz(seconds);
    finish();
    print_summary();
    stop_all();
    for (int i = 0; i < HISTORY; i++)
        buf_free(&history[i]);
    unlink(conf_path);
    unlink(log_path);
    unlink(stderr_path);
    rmdir(workdir);
    if (ca_dir[0])
        support_remove_tree(ca_dir);
    return 0;
}
