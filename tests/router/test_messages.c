/*
 * tests/router/test_messages.c: POST /v1/messages (Anthropic's Messages
 * API) through the real router in front of real mockllms: the settled
 * cost of plain and streamed answers (head, SSE comment and trailer, cost
 * log line) with cache reads and writes priced at their rates; the
 * tenant's key from x-api-key, never forwarded, and the backend's sent as
 * x-api-key with anthropic-version; Anthropic-shaped errors with the
 * router's statuses; a route mixing an OpenAI and an Anthropic backend
 * sending each API only to its kind; the hold of max_tokens against a
 * budget; a broken stream, and one without final usage, charged for the
 * deltas that passed; the response cache keyed by endpoint.
 * The count_tokens suite: POST /v1/messages/count_tokens, the upstream's
 * count passed through, free, never cached, past budgets and tpm (not
 * rpm), with fallback and the refusals of /v1/messages.
 * The web_search suite: the web searches an answer reports
 * (usage.server_tool_use.web_search_requests, x-mock-web-searches for
 * mockllm) charged at the backend's web_search_usd_per_1k in the head,
 * the stream's comment and trailer, the cost log and the spend; the hold
 * of a web search tool's max_uses; none without the price.
 *
 * mockllm counts a Messages prompt by its chat rule: 3, plus 4 + the
 * words of "system" when given, plus 4 + the words of each message's
 * content (a string, or its blocks' "text"). It answers x-mock-tokens
 * output tokens (capped by max_tokens) and reports x-mock-cached-tokens as
 * cache_read_input_tokens and x-mock-cache-write-tokens as
 * cache_creation_input_tokens, with input_tokens the rest, as Anthropic
 * does. With --require-key it answers 401 (Anthropic-shaped) unless
 * x-api-key is that key, and 400 without anthropic-version.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/support/http.h"
#include "tests/support/proc.h"
#include "tests/support/record.h"

#define TIMEOUT_MS 5000
#define KEY "sk-messages-tenant"
#define XKEY "x-api-key: " KEY "\r\n"
#define UPSTREAM_KEY "sk-ant-upstream-key"
#define ADMIN_KEY "adm-messages"
/* Prices of the Anthropic backend, USD per million tokens. */
#define IN_USD 100
#define CACHED_USD 10
#define WRITE_USD 125
#define WRITE_1H_USD 200
#define OUT_USD 300
/* "hello there" as the one message: 3 + 4 + 2 = 9 prompt tokens. */
#define MSGS "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]"
#define PROMPT_TOKENS 9

static struct support_proc router, mock, oai;
/* More keys of backend `a` (", KEY: VALUE"), for a test to set before it
 * starts the router. */
static const char *a_extra = "";
/* The tenant's key as a mapping with these keys (", name: ci, ..."), for a
 * test to set before it starts the router; "" keeps it a plain hash. */
static const char *key_extra = "";
static struct support_http_response resp;
static struct buf req;
static cJSON *json;
static char conf_path[64], log_path[64];

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    support_proc_stop(&oai);
    support_http_response_free(&resp);
    buf_free(&req);
    cJSON_Delete(json);
    json = NULL;
    if (conf_path[0])
        unlink(conf_path);
    if (log_path[0])
        unlink(log_path);
}

TestSuite(messages, .fini = teardown, .timeout = 60);

/* An Anthropic mockllm (`mock`, wanting UPSTREAM_KEY) and an OpenAI one
 * (`oai`), and the router: backend `a` (Anthropic) and `o` (OpenAI,
 * priced at `o_in` and `o_out`), both serving model claude-x (an
 * OpenAI-compatible gateway in front of the same model), and `down`
 * (Anthropic, on a port nobody listens on); routes "claude" [a], "mix"
 * [o, a], "gpt" [o] and "two" [down, a]; tenant acme with `tenant_extra`
 * (config lines, or ""), and `root_extra` at the top level (with the
 * admin key ADMIN_KEY); `a` has the keys of a_extra too. */
static void start_with(const char *root_extra, const char *tenant_extra, int o_in, int o_out)
{
    char hex[65];
    FILE *f;

    cr_assert_eq(support_mockllm_start(&mock, "--require-key", UPSTREAM_KEY, NULL), 0);
    cr_assert_eq(support_mockllm_start(&oai, NULL), 0);
    support_key_sha256_hex(KEY, hex);
    strcpy(log_path, "/tmp/costrouter-msg-log-XXXXXX");
    close(mkstemp(log_path));
    strcpy(conf_path, "/tmp/costrouter-msg-XXXXXX");
    f = fdopen(mkstemp(conf_path), "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\nadmin_key: " ADMIN_KEY "\ncost_log: %s\n%s"
            "backends:\n"
            "  - {name: a, kind: api, api: anthropic, url: \"http://127.0.0.1:%d/v1\",\n"
            "     api_key: %s, model: claude-x, quality: 1, context_window: 100000,\n"
            "     input_usd_per_mtok: %d, cached_input_usd_per_mtok: %d,\n"
            "     cache_write_usd_per_mtok: %d, cache_write_1h_usd_per_mtok: %d,\n"
            "     output_usd_per_mtok: %d, tokenizer: o200k_base%s}\n"
            "  - {name: o, kind: api, url: \"http://127.0.0.1:%d/v1\", model: claude-x, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: %d, output_usd_per_mtok: %d,\n"
            "     tokenizer: o200k_base}\n"
            "  - {name: down, kind: api, api: anthropic, url: \"http://127.0.0.1:1/v1\",\n"
            "     api_key: %s, model: claude-x, quality: 1, context_window: 100000,\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 1, tokenizer: o200k_base}\n"
            "routes:\n  - {model: claude, candidates: [a]}\n"
            "  - {model: mix, candidates: [o, a]}\n"
            "  - {model: gpt, candidates: [o]}\n"
            "  - {model: two, candidates: [down, a]}\n"
            "tenants:\n  - id: acme\n    api_keys: [{hash: \"sha256:%s\"%s}]\n%s",
            log_path, root_extra, mock.port, UPSTREAM_KEY, IN_USD, CACHED_USD, WRITE_USD,
            WRITE_1H_USD, OUT_USD, a_extra, oai.port, o_in, o_out, UPSTREAM_KEY, hex, key_extra,
            tenant_extra);
    fclose(f);
    char *argv[] = {getenv("COSTROUTER_BIN"), "-q", "-c", conf_path, NULL};
    cr_assert_eq(support_proc_start(&router, argv), 0);
}

static void start(const char *tenant_extra)
{
    start_with("", tenant_extra, 1000, 1000); /* o dearer than a */
}

static int call(int port, const char *method, const char *path, const char *headers,
                const char *body)
{
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    return support_http_request(port, req.data, req.len, TIMEOUT_MS, &resp);
}

/* POST /v1/messages to the router with the tenant's x-api-key and `extra`
 * header lines. */
static int messages(const char *extra, const char *body)
{
    char headers[512];

    snprintf(headers, sizeof(headers), XKEY "%s", extra ? extra : "");
    return call(router.port, "POST", "/v1/messages", headers, body);
}

static cJSON *body_json(void)
{
    cJSON_Delete(json);
    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    cr_assert_not_null(json, "not JSON: %.*s", (int)resp.body.len, resp.body.data);
    return json;
}

static const cJSON *get(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

static double header_usd(void)
{
    const char *v = support_http_header(&resp, "x-costrouter-cost-usd");

    cr_assert_not_null(v, "no x-costrouter-cost-usd header");
    return strtod(v, NULL);
}

/* USD of a prompt of `input` plain, `read` cached and `written` tokens
 * and `output` tokens, rounded to the micro-dollar as settled. */
static double usd(double input, double read, double written, double output)
{
    return round(input * IN_USD + read * CACHED_USD + written * WRITE_USD + output * OUT_USD) /
           1e6;
}

/* The request `m` last received (in `json`): {method, path, headers, body}. */
static const cJSON *last_request(struct support_proc *m)
{
    cr_assert_eq(call(m->port, "GET", "/mock/last-request", NULL, NULL), 0);
    return body_json();
}

static double requests_of(struct support_proc *m)
{
    cr_assert_eq(call(m->port, "GET", "/mock/stats", NULL, NULL), 0);
    return record_num(body_json(), "requests");
}

/* The Anthropic error in the last answer: its status, and its
 * error.type. */
static void assert_anthropic_error(int status, const char *type)
{
    const cJSON *err;

    cr_assert_eq(resp.status, status, "%d: %.*s", resp.status, (int)resp.body.len,
                 resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "content-type"), "application/json");
    cr_assert_str_eq(get(body_json(), "type")->valuestring, "error", "%.*s", (int)resp.body.len,
                     resp.body.data);
    err = get(json, "error");
    cr_assert_str_eq(get(err, "type")->valuestring, type, "%.*s", (int)resp.body.len,
                     resp.body.data);
    cr_assert(cJSON_IsString(get(err, "message")));
    cr_assert_null(get(err, "code"), "an OpenAI member in an Anthropic error");
    /* Anthropic's API sends its request-id on every answer (its SDKs show
     * it as error.request_id); the router's errors carry the router's id
     * there, as in x-request-id. */
    cr_assert_not_null(support_http_header(&resp, "request-id"), "no request-id");
    cr_assert_str_eq(support_http_header(&resp, "request-id"),
                     support_http_header(&resp, "x-request-id"));
}

Test(messages, plain_cost_is_usage_times_price_and_the_backend_gets_its_own_headers)
{
    start("");
    cr_assert_eq(messages("x-mock-tokens: 7\r\n",
                          "{\"model\":\"claude\",\"max_tokens\":100," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(get(body_json(), "type")->valuestring, "message");
    cr_assert_eq(record_num(get(json, "usage"), "input_tokens"), PROMPT_TOKENS);
    double want = usd(PROMPT_TOKENS, 0, 0, 7);
    cr_assert_float_eq(header_usd(), want, 1e-9);
    /* mockllm answered (it wants UPSTREAM_KEY as x-api-key and an
     * anthropic-version); the tenant's key went nowhere. */
    const cJSON *r = last_request(&mock), *h = get(r, "headers");
    cr_assert_str_eq(get(r, "path")->valuestring, "/v1/messages");
    cr_assert_str_eq(get(h, "x-api-key")->valuestring, UPSTREAM_KEY);
    cr_assert_str_eq(get(h, "anthropic-version")->valuestring, "2023-06-01");
    cr_assert_null(get(h, "authorization"));
    char *seen = cJSON_PrintUnformatted(r);
    cr_assert_null(strstr(seen, KEY), "the tenant key went upstream");
    cJSON_free(seen);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "prompt_tokens"), PROMPT_TOKENS);
    cr_assert_eq(record_num(rec, "completion_tokens"), 7);
    cr_assert_eq(record_num(rec, "billed_cache_write_tokens"), 0);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_str_eq(get(rec, "backend")->valuestring, "a");
    cJSON_Delete(rec);
}

/* Anthropic's SDK's beta client calls /v1/messages?beta=true (and its
 * count_tokens so): the query goes on to the backend as sent. */
Test(messages, the_query_string_goes_on_to_the_backend)
{
    start("");
    cr_assert_eq(call(router.port, "POST", "/v1/messages?beta=true", XKEY,
                      "{\"model\":\"claude\",\"max_tokens\":5," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(get(last_request(&mock), "path")->valuestring, "/v1/messages?beta=true");
    cr_assert_eq(call(router.port, "POST", "/v1/messages/count_tokens?beta=true", XKEY,
                      "{\"model\":\"claude\"," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(get(last_request(&mock), "path")->valuestring,
                     "/v1/messages/count_tokens?beta=true");
}

/* The client's own anthropic-version and anthropic-beta go on as sent. */
Test(messages, a_clients_anthropic_version_and_beta_are_forwarded)
{
    start("");
    cr_assert_eq(messages("anthropic-version: 2099-01-01\r\nanthropic-beta: some-beta\r\n",
                          "{\"model\":\"claude\",\"max_tokens\":5," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    const cJSON *h = get(last_request(&mock), "headers");
    cr_assert_str_eq(get(h, "anthropic-version")->valuestring, "2099-01-01");
    cr_assert_str_eq(get(h, "anthropic-beta")->valuestring, "some-beta");
}

/* An empty (or blank) anthropic-version names no version: Anthropic's API
 * answers it 400 as it does none. The router sends its own in its place,
 * and the request is the cache entry of one without the header. */
Test(messages, an_empty_anthropic_version_is_none)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":5,\"temperature\":0," MSGS "}";
    static const char *const rounds[] = {
        NULL,
        "anthropic-version: 2023-06-01\r\n",
        "anthropic-version:  \t \r\n",
    };

    start("");
    cr_assert_eq(messages("anthropic-version:\r\n", body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    const cJSON *h = get(last_request(&mock), "headers");
    cr_assert_str_eq(get(h, "anthropic-version")->valuestring, "2023-06-01");
    for (size_t i = 0; i < sizeof(rounds) / sizeof(rounds[0]); i++) {
        cr_assert_eq(messages(rounds[i], body), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache", "%s",
                         rounds[i] ? rounds[i] : "none");
    }
    cr_assert_eq(requests_of(&mock), 1);
}

/* input_tokens excludes both cache counts: the prompt is their sum, the
 * reads at the cached rate, the writes at the cache write rate. */
Test(messages, cache_reads_and_writes_are_priced_at_their_rates)
{
    start("");
    /* system (2 words) and one message of 5: 3 + 6 + 9 = 18 tokens, 4
     * read from the cache and 6 written to it. */
    cr_assert_eq(messages("x-mock-tokens: 3\r\nx-mock-cached-tokens: 4\r\n"
                          "x-mock-cache-write-tokens: 6\r\n",
                          "{\"model\":\"claude\",\"max_tokens\":50,\"system\":[{\"type\":\"text\","
                          "\"text\":\"be brief\"}],\"messages\":[{\"role\":\"user\",\"content\":"
                          "[{\"type\":\"text\",\"text\":\"one two three four five\"}]}]}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    const cJSON *u = get(body_json(), "usage");
    cr_assert_eq(record_num(u, "input_tokens"), 8);
    cr_assert_eq(record_num(u, "cache_read_input_tokens"), 4);
    cr_assert_eq(record_num(u, "cache_creation_input_tokens"), 6);
    double want = usd(8, 4, 6, 3); /* 800 + 40 + 750 + 900 micro */
    cr_assert_float_eq(header_usd(), want, 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "prompt_tokens"), 18);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), 18);
    cr_assert_eq(record_num(rec, "billed_cached_tokens"), 4);
    cr_assert_eq(record_num(rec, "billed_cache_write_tokens"), 6);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cJSON_Delete(rec);
}

/* Read a stream of "hello there" with the header lines `extra` to its
 * end; returns the number of events, and sets *clean when it ended
 * cleanly. */
static int read_stream(struct support_sse *s, const char *extra, int *clean)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":64,\"stream\":true," MSGS "}";
    struct support_sse_event ev;
    char headers[512];
    int n = 0, rc;

    snprintf(headers, sizeof(headers), XKEY "%s", extra);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/messages", headers, body), 0);
    cr_assert_eq(support_sse_open(s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    cr_assert_eq(s->resp.status, 200);
    while ((rc = support_sse_next(s, &ev, TIMEOUT_MS)) == 1)
        n++;
    *clean = rc == 0;
    return n;
}

/* The stream's cost, from its SSE comment, which its trailer repeats. */
static double stream_usd(const struct support_sse *s)
{
    double comment, trailer;

    cr_assert_eq(support_sse_cost(s, &comment, &trailer), 0, "no cost comment or trailer");
    cr_assert_float_eq(comment, trailer, 1e-12);
    return comment;
}

/* message_start has the input counts (and output_tokens 1), the last
 * message_delta the output count: 5 tokens, not 1 and not 6. */
Test(messages, streamed_cost_comes_from_message_start_and_message_delta)
{
    struct support_sse s = {0};
    int clean;

    start("");
    /* message_start, content_block_start, ping, 5 deltas,
     * content_block_stop, message_delta, message_stop */
    cr_assert_eq(read_stream(&s, "x-mock-tokens: 5\r\nx-mock-cache-write-tokens: 2\r\n", &clean),
                 11);
    cr_assert(clean, "the stream did not end cleanly");
    cr_assert_str_eq(support_http_header(&s.resp, "content-type"), "text/event-stream");
    cr_assert_str_eq(support_http_header(&s.resp, "trailer"), "x-costrouter-cost-usd");
    cr_assert_null(memmem(s.resp.raw.data, s.resp.raw.len, "[DONE]", 6));
    double want = usd(PROMPT_TOKENS - 2, 0, 2, 5);
    cr_assert_float_eq(stream_usd(&s), want, 1e-9);
    support_sse_close(&s);
    /* No stream_options went to Anthropic (it has none). */
    cJSON *up = cJSON_Parse(get(last_request(&mock), "body")->valuestring);
    cr_assert_null(get(up, "stream_options"));
    cJSON_Delete(up);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "prompt_tokens"), PROMPT_TOKENS);
    cr_assert_eq(record_num(rec, "completion_tokens"), 5);
    cr_assert_eq(record_num(rec, "billed_cache_write_tokens"), 2);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cJSON_Delete(rec);
}

/* No usage in message_delta: the input counts of message_start, and one
 * token per text delta (not per message_start, ping, block start or
 * stop). */
Test(messages, a_stream_without_final_usage_is_charged_for_its_text_deltas)
{
    struct support_sse s = {0};
    int clean;

    start("");
    read_stream(&s, "x-mock-tokens: 5\r\nx-mock-usage: omit\r\n", &clean);
    cr_assert(clean);
    cr_assert_float_eq(stream_usd(&s), usd(PROMPT_TOKENS, 0, 0, 5), 1e-9);
    support_sse_close(&s);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), PROMPT_TOKENS);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 5);
    cr_assert(cJSON_IsNull(get(rec, "completion_tokens")));
    cJSON_Delete(rec);
}

/* A stream that breaks mid-way: an Anthropic error event, no clean end,
 * and the three deltas that passed charged with the prompt. */
Test(messages, a_broken_stream_is_charged_for_the_deltas_that_passed)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    char headers[256];
    int rc, error_event = 0;

    start("");
    snprintf(headers, sizeof(headers), XKEY "x-mock-tokens: 8\r\nx-mock-fault: close-midstream\r\n");
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/messages", headers,
                                     "{\"model\":\"claude\",\"max_tokens\":64,\"stream\":true," MSGS
                                     "}"),
                 0);
    cr_assert_eq(support_sse_open(&s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        error_event |= strstr(ev.data, "{\"type\":\"error\",\"error\":{\"type\":\"api_error\"") !=
                       NULL;
    cr_assert_eq(rc, -ECONNRESET, "a broken stream ended cleanly");
    cr_assert(error_event, "no Anthropic error event");
    support_sse_close(&s);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), PROMPT_TOKENS);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 3);
    cr_assert_float_eq(record_num(rec, "cost_usd"), usd(PROMPT_TOKENS, 0, 0, 3), 1e-9);
    cJSON_Delete(rec);
}

/* The tenant's key from x-api-key or Authorization: Bearer, both when
 * they name the same key; two different keys are refused. */
Test(messages, the_tenant_key_comes_from_x_api_key_or_bearer)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":5," MSGS "}";

    start("");
    cr_assert_eq(messages(NULL, body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call(router.port, "POST", "/v1/messages", "Authorization: Bearer " KEY "\r\n",
                      body),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(messages("Authorization: Bearer " KEY "\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    /* and on the OpenAI endpoints too */
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY,
                      "{\"model\":\"gpt\"," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(messages("x-api-key: sk-someone-else\r\n", body), 0);
    assert_anthropic_error(400, "invalid_request_error");
    cr_assert_eq(messages("Authorization: Bearer sk-someone-else\r\n", body), 0);
    assert_anthropic_error(400, "invalid_request_error");
    cr_assert_eq(call(router.port, "POST", "/v1/messages", "x-api-key: sk-wrong\r\n", body), 0);
    assert_anthropic_error(401, "authentication_error");
    cr_assert_eq(call(router.port, "POST", "/v1/messages", NULL, body), 0);
    assert_anthropic_error(401, "authentication_error");
    cr_assert_eq(requests_of(&mock), 3);
}

/* Anthropic's Python SDK sends "X-Api-Key:" empty beside its Bearer token
 * when ANTHROPIC_API_KEY is set to "" (as gateways tell Claude Code users
 * to do) and ANTHROPIC_AUTH_TOKEN holds the key; and "Authorization:
 * Bearer " when the token is the empty one. A header that names no key
 * is no second key: the other one authenticates. */
Test(messages, an_empty_key_header_beside_the_key_is_no_second_key)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":5," MSGS "}";
    static const char *const ok[] = {
        "X-Api-Key: \r\nAuthorization: Bearer " KEY "\r\n",
        "Authorization: Bearer " KEY "\r\nx-api-key:\r\n",
        "Authorization: Bearer \r\n" XKEY,
        XKEY "Authorization: Bearer\r\n",
    };
    static const char *const refused[] = {
        "X-Api-Key: \r\n",
        "X-Api-Key: \r\nAuthorization: Bearer \r\n",
    };

    start("");
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        cr_assert_eq(call(router.port, "POST", "/v1/messages", ok[i], body), 0);
        cr_assert_eq(resp.status, 200, "%s: %d %.*s", ok[i], resp.status, (int)resp.body.len,
                     resp.body.data);
    }
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        cr_assert_eq(call(router.port, "POST", "/v1/messages", refused[i], body), 0);
        assert_anthropic_error(401, "authentication_error");
    }
    /* A scheme other than Bearer is still a key, and another one. */
    cr_assert_eq(messages("Authorization: Basic xyz\r\n", body), 0);
    assert_anthropic_error(400, "invalid_request_error");
    cr_assert_eq(requests_of(&mock), 4);
}

/* A body the router refuses itself, and how. */
struct refusal {
    const char *body;
    int status;       /* the router's status */
    const char *type; /* Anthropic's error.type */
};

/* POST each of `cases` to `path` with the tenant's key, then a body over
 * the 4096 bytes of max_body_bytes: each is refused in Anthropic's shape. */
static void refuse_each(const char *path, const struct refusal *cases, size_t n)
{
    char big[6000];

    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(call(router.port, "POST", path, XKEY, cases[i].body), 0);
        assert_anthropic_error(cases[i].status, cases[i].type);
    }
    memset(big, ' ', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    memcpy(big, "{\"model\":\"claude\"", 17);
    big[sizeof(big) - 2] = '}';
    cr_assert_eq(call(router.port, "POST", path, XKEY, big), 0);
    assert_anthropic_error(413, "request_too_large");
}

/* Every error the router makes itself on /v1/messages is Anthropic's
 * shape, with the status the router gives it elsewhere. */
Test(messages, router_errors_are_anthropic_shaped_with_their_status)
{
    static const struct refusal cases[] = {
        {"{\"model\":", 400, "invalid_request_error"},
        {"{\"max_tokens\":5," MSGS "}", 400, "invalid_request_error"},
        {"{\"model\":\"nope\",\"max_tokens\":5," MSGS "}", 404, "not_found_error"},
        {"{\"model\":\"gpt\",\"max_tokens\":5," MSGS "}", 404, "not_found_error"},
        {"{\"model\":\"claude\"," MSGS "}", 400, "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":\"5\"," MSGS "}", 400, "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":5,\"messages\":{}}", 400, "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":5,\"messages\":[\"hi\"]}", 400,
         "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\","
         "\"content\":5}]}",
         400, "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\","
         "\"content\":[\"hi\"]}]}",
         400, "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":5,\"system\":5," MSGS "}", 400,
         "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":5,\"tools\":{}," MSGS "}", 400,
         "invalid_request_error"},
        {"{\"model\":\"claude\",\"max_tokens\":5,\"stream\":\"true\"," MSGS "}", 400,
         "invalid_request_error"},
        /* past the 0.01 budget */
        {"{\"model\":\"claude\",\"max_tokens\":50000," MSGS "}", 429, "rate_limit_error"},
    };

    start_with("limits: {max_body_bytes: 4096}\n",
               "    budget: {daily_usd: 0.01, on_exhausted: reject}\n", 1000, 1000);
    refuse_each("/v1/messages", cases, sizeof(cases) / sizeof(cases[0]));
    cr_assert_eq(requests_of(&mock), 0);
    /* The same router's OpenAI endpoints keep OpenAI's shape. */
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY, "{\"model\":\"nope\"}"),
                 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_str_eq(get(get(body_json(), "error"), "code")->valuestring, "model_not_found");
    cr_assert_null(get(json, "type"));
}

/* An upstream that is down: 502 api_error; the client's SDK sees the
 * API's own kind of error. */
Test(messages, an_upstream_down_is_a_502_api_error)
{
    start("");
    support_proc_stop(&mock);
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":5," MSGS "}"), 0);
    cr_assert(resp.status == 502 || resp.status == 503, "%d", resp.status);
    assert_anthropic_error(resp.status, resp.status == 502 ? "api_error" : "overloaded_error");
}

/* A route with an OpenAI backend and an Anthropic one: each API goes to
 * its own kind alone, whichever is cheaper. */
Test(messages, a_mixed_route_sends_each_api_only_to_its_kind)
{
    static const char chat[] = "{\"model\":\"mix\"," MSGS "}";
    static const char msg[] = "{\"model\":\"mix\",\"max_tokens\":5," MSGS "}";

    start_with("", "", 1, 1); /* o far cheaper than a */
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(messages(NULL, msg), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
        cr_assert_str_eq(get(body_json(), "type")->valuestring, "message");
    }
    support_proc_stop(&router);
    support_proc_stop(&mock);
    support_proc_stop(&oai);
    start_with("", "", 1000, 1000); /* now a is the cheaper one */
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY, chat), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "o");
    }
    cr_assert_eq(requests_of(&mock), 0);
    cr_assert_eq(requests_of(&oai), 3);
    cr_assert_str_eq(get(last_request(&oai), "path")->valuestring, "/v1/chat/completions");
}

/* The ids of GET /v1/models with `headers`, comma-joined in order. */
static const char *model_ids(const char *headers, char *out, size_t size)
{
    const cJSON *m;
    size_t n = 0;

    cr_assert_eq(call(router.port, "GET", "/v1/models", headers, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    out[0] = '\0';
    cJSON_ArrayForEach(m, get(body_json(), "data"))
        n += (size_t)snprintf(out + n, size - n, "%s%s", n ? "," : "",
                              get(m, "id")->valuestring);
    return out;
}

/* GET /v1/models lists the routes the client's API can use: an OpenAI
 * client (no anthropic-version) is not offered "claude" or "two", which
 * its chat requests would get 404 for, nor an Anthropic client (whose
 * SDKs send anthropic-version on every request) "gpt". */
Test(messages, the_models_list_holds_the_routes_of_the_clients_api)
{
    char ids[256];

    start("");
    cr_assert_str_eq(model_ids(XKEY, ids, sizeof(ids)), "mix,gpt");
    cr_assert_str_eq(model_ids("Authorization: Bearer " KEY "\r\n", ids, sizeof(ids)), "mix,gpt");
    cr_assert_str_eq(model_ids(XKEY "anthropic-version: 2023-06-01\r\n", ids, sizeof(ids)),
                     "claude,mix,two");
    /* Anthropic's page fields, which its SDKs read to page on. */
    cr_assert(cJSON_IsFalse(get(json, "has_more")));
    cr_assert_str_eq(get(json, "first_id")->valuestring, "claude");
    cr_assert_str_eq(get(json, "last_id")->valuestring, "two");
    cr_assert_str_eq(get(cJSON_GetArrayItem(get(json, "data"), 0), "type")->valuestring, "model");
    /* What the list offers is served. */
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY,
                      "{\"model\":\"claude\"," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 404);
}

/* GET /v1/models/{id} (the SDKs' models.retrieve) answers one model as
 * the list does, for a route the list holds: in the client's API's
 * shape; a route it does not hold, or none, is a 404 in its language; the
 * id may be percent-encoded; any other method is a 405. */
Test(messages, a_model_is_retrieved_as_the_list_shows_it)
{
    static const char av[] = "anthropic-version: 2023-06-01\r\n";

    start("");
    cr_assert_eq(call(router.port, "GET", "/v1/models/claude", XKEY "anthropic-version: 1\r\n", NULL),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(get(body_json(), "type")->valuestring, "model");
    cr_assert_str_eq(get(json, "id")->valuestring, "claude");
    cr_assert_eq(call(router.port, "GET", "/v1/models/gpt", XKEY, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(get(body_json(), "object")->valuestring, "model");
    cr_assert_str_eq(get(json, "id")->valuestring, "gpt");
    cr_assert_eq(call(router.port, "GET", "/v1/models/%6dix", XKEY, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(get(body_json(), "id")->valuestring, "mix");
    /* not in the client's list: OpenAI's client has no Anthropic-only route */
    cr_assert_eq(call(router.port, "GET", "/v1/models/claude", XKEY, NULL), 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_str_eq(get(get(body_json(), "error"), "code")->valuestring, "model_not_found");
    cr_assert_eq(call(router.port, "GET", "/v1/models/gpt", XKEY "anthropic-version: 1\r\n", NULL),
                 0);
    assert_anthropic_error(404, "not_found_error");
    cr_assert_eq(call(router.port, "GET", "/v1/models/nope", XKEY, NULL), 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_eq(call(router.port, "GET", "/v1/models/%zzmix", XKEY, NULL), 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_eq(call(router.port, "GET", "/v1/models/gp%00t", XKEY, NULL), 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_eq(call(router.port, "GET", "/v1/models/gpt", "x-api-key: sk-wrong\r\n", NULL), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_eq(call(router.port, "DELETE", "/v1/models/claude", av, NULL), 0);
    assert_anthropic_error(405, "invalid_request_error");
    cr_assert_str_eq(support_http_header(&resp, "allow"), "GET, HEAD");
}

/* Off the endpoints of one API, the router's errors speak the client's:
 * Anthropic's to one that sends anthropic-version (its SDKs always do),
 * OpenAI's to any other. */
Test(messages, errors_off_the_api_paths_speak_the_clients_api)
{
    static const char av[] = "anthropic-version: 2023-06-01\r\n";

    start("");
    cr_assert_eq(call(router.port, "POST", "/v1/messages/batches", XKEY "anthropic-version: x\r\n",
                      "{}"),
                 0);
    assert_anthropic_error(404, "not_found_error");
    cr_assert_eq(call(router.port, "GET", "/v1/models", "x-api-key: sk-wrong\r\n"
                      "anthropic-version: 2023-06-01\r\n", NULL),
                 0);
    assert_anthropic_error(401, "authentication_error");
    cr_assert_eq(call(router.port, "DELETE", "/v1/models", av, NULL), 0);
    assert_anthropic_error(405, "invalid_request_error");
    /* Without it, OpenAI's; and an OpenAI endpoint keeps its own. */
    cr_assert_eq(call(router.port, "POST", "/v1/messages/batches", XKEY, "{}"), 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_str_eq(get(get(body_json(), "error"), "code")->valuestring, "unknown_url");
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", av, "{}"), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_str_eq(get(get(body_json(), "error"), "code")->valuestring, "invalid_api_key");
}

Test(messages, a_budget_refuses_a_hold_of_max_tokens_that_does_not_fit)
{
    /* $0.01 a day: 1000 output tokens at $300/M hold $0.30, 10 hold
     * $0.003 and the prompt. */
    start("    budget: {daily_usd: 0.01, on_exhausted: reject}\n");
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":1000," MSGS "}"), 0);
    assert_anthropic_error(429, "rate_limit_error");
    cr_assert_eq(requests_of(&mock), 0);
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":10," MSGS "}"), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(get(body_json(), "stop_reason")->valuestring, "max_tokens");
    cr_assert_float_eq(header_usd(), usd(PROMPT_TOKENS, 0, 0, 10), 1e-9);
}

/* An answer the router makes itself (a cache hit, an error) carries the
 * request's id in request-id, as Anthropic's API does on every answer,
 * and the id a client quotes from it is the one its cost log line holds. */
Test(messages, the_routers_own_answers_carry_a_request_id)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":5,\"temperature\":0," MSGS "}";
    char id[64];

    start("    budget: {daily_usd: 0.01, on_exhausted: reject}\n");
    for (int i = 0; i < 2; i++)
        cr_assert_eq(messages(NULL, body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    cr_assert_not_null(support_http_header(&resp, "request-id"), "no request-id on a cache hit");
    cr_assert_str_eq(support_http_header(&resp, "request-id"),
                     support_http_header(&resp, "x-request-id"));
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":1000," MSGS "}"), 0);
    assert_anthropic_error(429, "rate_limit_error"); /* request-id == x-request-id */
    snprintf(id, sizeof(id), "%s", support_http_header(&resp, "request-id"));
    cJSON *rec = record_last(&router, log_path);
    cr_assert_str_eq(get(rec, "request_id")->valuestring, id);
    cJSON_Delete(rec);
}

/* Deterministic requests are cached on chat's rules, keyed by endpoint
 * too: the same body on /v1/messages is a hit, an OpenAI request of the
 * same route, body and upstream model name is not. */
Test(messages, the_response_cache_keys_the_endpoint)
{
    static const char body[] = "{\"model\":\"mix\",\"max_tokens\":5,\"temperature\":0," MSGS "}";
    char first_id[64];

    start("");
    cr_assert_eq(messages(NULL, body), 0);
    cr_assert_eq(resp.status, 200);
    snprintf(first_id, sizeof(first_id), "%s", get(body_json(), "id")->valuestring);
    cr_assert_eq(messages(NULL, body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    cr_assert_str_eq(get(body_json(), "id")->valuestring, first_id);
    cr_assert_eq(requests_of(&mock), 1);
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY, body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "o");
    cr_assert_str_eq(get(body_json(), "object")->valuestring, "chat.completion");
}

/* anthropic-beta and anthropic-version change the answer (a beta turns
 * on interleaved thinking, longer outputs, a new tool; a version changes
 * the answer's shape): a request with other values is no hit on an
 * answer made for the first ones, which replayed it. The same values
 * again are. */
Test(messages, the_response_cache_keys_the_anthropic_headers)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":5,\"temperature\":0," MSGS "}";
    static const char *const headers[] = {
        "anthropic-version: 2023-06-01\r\n",
        "anthropic-version: 2023-06-01\r\nanthropic-beta: interleaved-thinking-2025-05-14\r\n",
        "anthropic-version: 2023-01-01\r\n",
    };

    start("");
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < 3; i++) {
            cr_assert_eq(messages(headers[i], body), 0);
            cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
            cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"),
                             round ? "cache" : "a", "%s, round %d", headers[i], round);
        }
    cr_assert_eq(requests_of(&mock), 3);
    /* Without anthropic-version the router sends its own, 2023-06-01: the
     * same request as the first. */
    cr_assert_eq(messages(NULL, body), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
}

/* A client may send several betas, as one comma-separated anthropic-beta
 * or as several headers (the SDKs' betas: [...] send one, a proxy may add
 * its own): every one is in the key, not only the first header's. One
 * header "a,b", two headers "a" and "b" and "a, b" ask the same. */
Test(messages, the_response_cache_keys_every_anthropic_beta)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":5,\"temperature\":0," MSGS "}";
    static const struct {
        const char *headers;
        const char *backend;
    } rounds[] = {
        {"anthropic-beta: interleaved-thinking-2025-05-14\r\n", "a"},
        {"anthropic-beta: interleaved-thinking-2025-05-14\r\n"
         "anthropic-beta: context-1m-2025-08-07\r\n", "a"},
        {"anthropic-beta: interleaved-thinking-2025-05-14\r\n", "cache"},
        {"anthropic-beta: interleaved-thinking-2025-05-14,context-1m-2025-08-07\r\n", "cache"},
        {"anthropic-beta: interleaved-thinking-2025-05-14 , context-1m-2025-08-07\r\n", "cache"},
        {"anthropic-beta: interleaved-thinking-2025-05-14,output-128k-2025-02-19\r\n", "a"},
    };

    start("");
    for (size_t i = 0; i < sizeof(rounds) / sizeof(rounds[0]); i++) {
        cr_assert_eq(messages(rounds[i].headers, body), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), rounds[i].backend,
                         "round %zu: %s", i, rounds[i].headers);
    }
    cr_assert_eq(requests_of(&mock), 3);
}

/* An anthropic-beta that names no beta (empty, or only commas and
 * blanks) asks for none: the same entry as no header at all. */
Test(messages, an_empty_anthropic_beta_is_the_entry_of_none)
{
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":5,\"temperature\":0," MSGS "}";
    static const char *const headers[] = {
        "anthropic-beta:\r\n",
        "anthropic-beta: , ,\r\n",
        "anthropic-beta: ,\r\nanthropic-beta:\r\n",
    };

    start("");
    cr_assert_eq(messages(NULL, body), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        cr_assert_eq(messages(headers[i], body), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache", "%s",
                         headers[i]);
    }
    cr_assert_eq(requests_of(&mock), 1);
}

/* Anthropic's MCP connector gives the model the tools of remote servers
 * (`mcp_servers`, beside `tools`): its answers depend on what they return
 * when called, so, as requests with tools, they are not cached unless
 * cache.cache_tools says so. */
Test(messages, a_request_with_mcp_servers_is_not_cached)
{
    static const char body[] =
        "{\"model\":\"claude\",\"max_tokens\":5,\"temperature\":0,\"mcp_servers\":[{\"type\":"
        "\"url\",\"url\":\"https://mcp.example.com/sse\",\"name\":\"ex\"}]," MSGS "}";

    start("");
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(messages("anthropic-beta: mcp-client-2025-04-04\r\n", body), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a", "request %d", i);
    }
}

/* A whole answer without usage is charged the estimated prompt and its
 * content's text counted with the backend's tokenizer: "The quick brown
 * fox" is 4 tokens in o200k_base; "hello there" as a user message, by the
 * chat framing, 3 + 1 + 2 + 3. */
Test(messages, a_plain_answer_without_usage_is_charged_for_its_content_text)
{
    start("");
    cr_assert_eq(messages("x-mock-tokens: 4\r\nx-mock-usage: omit\r\n",
                          "{\"model\":\"claude\",\"max_tokens\":100," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_null(get(body_json(), "usage"));
    cr_assert_float_eq(header_usd(), usd(9, 0, 0, 4), 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), 9);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 4);
    cJSON_Delete(rec);
}

/* Of the cache writes, those to the 1-hour cache (usage.cache_creation.
 * ephemeral_1h_input_tokens) at the 1-hour rate, the rest at the 5-minute
 * one. */
Test(messages, one_hour_cache_writes_are_priced_at_their_own_rate)
{
    start("");
    /* 3 + 4 + 5 = 12 prompt tokens: 6 written, 4 of them for an hour */
    cr_assert_eq(messages("x-mock-tokens: 2\r\nx-mock-cache-write-tokens: 6\r\n"
                          "x-mock-cache-write-1h-tokens: 4\r\n",
                          "{\"model\":\"claude\",\"max_tokens\":50,\"messages\":[{\"role\":"
                          "\"user\",\"content\":\"one two three four five\"}]}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    /* 6 x 100 + 2 x 125 + 4 x 200 + 2 x 300 micro */
    double want = round(6 * IN_USD + 2 * WRITE_USD + 4 * WRITE_1H_USD + 2 * OUT_USD) / 1e6;
    cr_assert_float_eq(header_usd(), want, 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), 12);
    cr_assert_eq(record_num(rec, "billed_cache_write_tokens"), 6);
    cr_assert_eq(record_num(rec, "billed_cache_write_1h_tokens"), 4);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cJSON_Delete(rec);
}

/* ---- POST /v1/messages/count_tokens ---- */

TestSuite(count_tokens, .fini = teardown, .timeout = 60);

/* mockllm counts a count_tokens body as a Messages prompt, by words:
 * "hello, there!!!" is 2 of them (9 in all), which o200k_base, the
 * router's estimate, makes more tokens of; so a 9 is the upstream's
 * number, not the router's. */
#define CMSGS "\"messages\":[{\"role\":\"user\",\"content\":\"hello, there!!!\"}]"
#define COUNT "{\"model\":\"claude\"," CMSGS "}"
#define UPSTREAM_COUNT 9

/* POST /v1/messages/count_tokens with the tenant's x-api-key and `extra`
 * header lines. */
static int count(const char *extra, const char *body)
{
    char headers[512];

    snprintf(headers, sizeof(headers), XKEY "%s", extra ? extra : "");
    return call(router.port, "POST", "/v1/messages/count_tokens", headers, body);
}

/* The answer is a count of `n`, {"input_tokens": n} and nothing else. */
static void assert_count(int n)
{
    cr_assert_eq(resp.status, 200, "%d: %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_eq(record_num(body_json(), "input_tokens"), n);
    cr_assert_eq(cJSON_GetArraySize(json), 1, "%.*s", (int)resp.body.len, resp.body.data);
}

/* The tenant's spend today, as the admin API reads it from the store. */
static double day_spend(void)
{
    cr_assert_eq(call(router.port, "GET", "/admin/tenants/acme/spend",
                      "Authorization: Bearer " ADMIN_KEY "\r\n", NULL),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    return record_num(body_json(), "day_usd");
}

/* The upstream's count goes to the client as it came; the backend got the
 * request at its count_tokens path with its own key and the model's
 * upstream name; nothing is charged, the cost log has a line at $0 that
 * names the endpoint and the upstream's count. */
Test(count_tokens, the_upstreams_count_passes_through_and_costs_nothing)
{
    start("");
    cr_assert_eq(count(NULL, COUNT), 0);
    assert_count(UPSTREAM_COUNT);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-cost-usd"), "0.000000");
    const cJSON *r = last_request(&mock), *h = get(r, "headers");
    cr_assert_str_eq(get(r, "path")->valuestring, "/v1/messages/count_tokens");
    cr_assert_str_eq(get(h, "x-api-key")->valuestring, UPSTREAM_KEY);
    cr_assert_str_eq(get(h, "anthropic-version")->valuestring, "2023-06-01");
    cr_assert_null(get(h, "authorization"));
    cr_assert_not_null(strstr(get(r, "body")->valuestring, "\"model\":\"claude-x\""), "%s",
                       get(r, "body")->valuestring);
    char *seen = cJSON_PrintUnformatted(r);
    cr_assert_null(strstr(seen, KEY), "the tenant key went upstream");
    cJSON_free(seen);
    cr_assert_eq(day_spend(), 0);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_str_eq(get(rec, "endpoint")->valuestring, "/v1/messages/count_tokens");
    cr_assert_str_eq(get(rec, "backend")->valuestring, "a");
    cr_assert_eq(record_num(rec, "status"), 200);
    cr_assert_eq(record_num(rec, "cost_usd"), 0);
    cr_assert_eq(record_num(rec, "cost_usd_est"), 0);
    cr_assert_eq(record_num(rec, "prompt_tokens"), UPSTREAM_COUNT);
    cr_assert_neq(record_num(rec, "prompt_tokens_est"), UPSTREAM_COUNT, "the router's estimate differs");
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), 0);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 0);
    cJSON_Delete(rec);
}

/* The client's anthropic-version and anthropic-beta go on as sent, as on
 * /v1/messages; a count is never cached, even a deterministic body's. */
Test(count_tokens, client_headers_go_on_and_counts_are_not_cached)
{
    static const char body[] = "{\"model\":\"claude\",\"temperature\":0," CMSGS "}";

    start("");
    cr_assert_eq(count("anthropic-version: 2099-01-01\r\nanthropic-beta: some-beta\r\n", body),
                 0);
    assert_count(UPSTREAM_COUNT);
    const cJSON *h = get(last_request(&mock), "headers");
    cr_assert_str_eq(get(h, "anthropic-version")->valuestring, "2099-01-01");
    cr_assert_str_eq(get(h, "anthropic-beta")->valuestring, "some-beta");
    cr_assert_eq(count(NULL, body), 0);
    assert_count(UPSTREAM_COUNT);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_eq(requests_of(&mock), 2);
}

/* Refusals are Anthropic's shape with the router's statuses, and none
 * reaches the backend. No max_tokens is needed (the API has none here). */
Test(count_tokens, router_errors_are_anthropic_shaped)
{
    static const struct refusal cases[] = {
        {"{\"model\":", 400, "invalid_request_error"},
        {"{" CMSGS "}", 400, "invalid_request_error"},
        {"{\"model\":\"claude\",\"messages\":{}}", 400, "invalid_request_error"},
        {"{\"model\":\"claude\",\"system\":5," CMSGS "}", 400, "invalid_request_error"},
        {"{\"model\":\"nope\"," CMSGS "}", 404, "not_found_error"},
        {"{\"model\":\"gpt\"," CMSGS "}", 404, "not_found_error"}, /* no Anthropic backend */
        {"{\"model\":\"two\"," CMSGS "}", 403, "permission_error"}, /* not in models: */
    };

    start_with("limits: {max_body_bytes: 4096}\n", "    models: [claude, gpt]\n", 1000, 1000);
    refuse_each("/v1/messages/count_tokens", cases, sizeof(cases) / sizeof(cases[0]));
    cr_assert_eq(call(router.port, "POST", "/v1/messages/count_tokens", NULL, COUNT), 0);
    assert_anthropic_error(401, "authentication_error");
    cr_assert_eq(call(router.port, "GET", "/v1/messages/count_tokens", XKEY, NULL), 0);
    assert_anthropic_error(405, "invalid_request_error");
    cr_assert_eq(call(router.port, "GET", "/v1/messages", XKEY, NULL), 0);
    assert_anthropic_error(405, "invalid_request_error");
    cr_assert_eq(requests_of(&mock), 0);
    /* Batches are not served. */
    cr_assert_eq(call(router.port, "POST", "/v1/messages/batches", XKEY, COUNT), 0);
    cr_assert_eq(resp.status, 404);
    /* and the count itself is served without max_tokens */
    cr_assert_eq(count(NULL, COUNT), 0);
    assert_count(UPSTREAM_COUNT);
}

/* A backend that is down is passed for the next, as for a message; with
 * none left the answer is the router's error, not an estimate. */
Test(count_tokens, a_backend_down_falls_back_to_the_next_and_none_left_is_an_error)
{
    static const char two[] = "{\"model\":\"two\"," CMSGS "}";

    start("");
    cr_assert_eq(count(NULL, two), 0);
    assert_count(UPSTREAM_COUNT);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    support_proc_stop(&mock);
    cr_assert_eq(count(NULL, two), 0);
    cr_assert(resp.status == 502 || resp.status == 503, "%d", resp.status);
    assert_anthropic_error(resp.status, resp.status == 502 ? "api_error" : "overloaded_error");
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "fallbacks"), 1);
    cr_assert_str_eq(get(rec, "endpoint")->valuestring, "/v1/messages/count_tokens");
    cr_assert_eq(record_num(rec, "cost_usd"), 0);
    cJSON_Delete(rec);
}

/* A budget that is spent does not refuse a count: it costs nothing, and
 * a client counts to decide whether to send. A chat answer of 1000
 * tokens, held for the 256 predicted, spends the $0.0005 and more. */
Test(count_tokens, a_spent_budget_does_not_refuse_a_count)
{
    double spent;

    start_with("", "    budget: {daily_usd: 0.0005, on_exhausted: reject}\n", 1, 1);
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY "x-mock-tokens: 1000\r\n",
                      "{\"model\":\"gpt\"," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    spent = day_spend();
    cr_assert_gt(spent, 0.0005);
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":5," CMSGS "}"), 0);
    assert_anthropic_error(429, "rate_limit_error");
    cr_assert_not_null(strstr(get(get(json, "error"), "message")->valuestring, "budget"));
    cr_assert_eq(count(NULL, COUNT), 0);
    assert_count(UPSTREAM_COUNT);
    cr_assert_eq(requests_of(&mock), 1);
    cr_assert_eq(day_spend(), spent);
}

/* The same with the key's own budget spent, the tenant having none: the
 * policy routes by the smaller of the two, and a count must be free of
 * both. A key overdrawn by a long answer refused every count 429. */
Test(count_tokens, a_keys_spent_budget_does_not_refuse_a_count)
{
    key_extra = ", name: ci, budget: {daily_usd: 0.0005}";
    start_with("", "", 1, 1);
    key_extra = "";
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY "x-mock-tokens: 1000\r\n",
                      "{\"model\":\"gpt\"," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":5," CMSGS "}"), 0);
    assert_anthropic_error(429, "rate_limit_error");
    cr_assert_eq(count(NULL, COUNT), 0);
    assert_count(UPSTREAM_COUNT);
    cr_assert_eq(requests_of(&mock), 1);
}

/* A count makes no store call: with the store unreachable under
 * fail_closed, a message is refused 503 and a count is served. */
Test(count_tokens, a_store_that_is_down_does_not_refuse_a_count)
{
    start_with("store: {redis: \"redis://127.0.0.1:1\", on_failure: fail_closed}\n", "", 1000,
               1000);
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":5," CMSGS "}"), 0);
    assert_anthropic_error(503, "overloaded_error");
    cr_assert_eq(count(NULL, COUNT), 0);
    assert_count(UPSTREAM_COUNT);
}

/* A client that leaves once its count went whole to an API backend is
 * charged nothing (a message's prompt would be, as the provider bills
 * it): logged 499 at $0. */
Test(count_tokens, a_client_that_leaves_is_charged_nothing)
{
    start("");
    cr_assert_eq(support_http_format(&req, "POST", "/v1/messages/count_tokens",
                                     XKEY "x-mock-ttft-ms: 2000\r\n", COUNT),
                 0);
    cr_assert_eq(support_http_send_and_leave(router.port, req.data, req.len, 300), 0);
    usleep(200 * 1000);
    cr_assert_eq(day_spend(), 0);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "status"), 499);
    cr_assert_eq(record_num(rec, "cost_usd"), 0);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), 0);
    cJSON_Delete(rec);
}

/* rpm counts a count; tpm does not (it generates no token), even with the
 * tokens bucket in debt: a chat answer of 9 + 16 tokens, admitted at the
 * 20 of the limit, left it 5 short. */
Test(count_tokens, rpm_counts_a_count_and_tpm_does_not)
{
    start("    rate_limits: {rpm: 2, tpm: 20}\n");
    cr_assert_eq(call(router.port, "POST", "/v1/chat/completions", XKEY,
                      "{\"model\":\"gpt\"," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(count(NULL, COUNT), 0);
    assert_count(UPSTREAM_COUNT);
    cr_assert_eq(count(NULL, COUNT), 0);
    assert_anthropic_error(429, "rate_limit_error");
    cr_assert_not_null(support_http_header(&resp, "retry-after"));
    cr_assert_eq(requests_of(&mock), 1);
}

/* ---- web searches ---- */

TestSuite(web_search, .fini = teardown, .timeout = 60);

/* Backend a's price of web searches: $10 per 1,000, 10000 micro-USD each. */
#define SEARCH_PRICE ", web_search_usd_per_1k: 10"
#define SEARCH_USD 0.01
/* The tool-use system prompt Anthropic adds to a request with tools (346
 * tokens with tool_choice auto), held at backend a's input price. */
#define TOOL_PROMPT_USD (346 * IN_USD / 1e6)
/* A Messages request with Anthropic's web search tool allowed `max_uses`
 * (a JSON fragment, or "" for none) and max_tokens 10. */
#define SEARCH_BODY(max_uses)                                                                  \
    "{\"model\":\"claude\",\"max_tokens\":10,\"tools\":[{\"type\":\"web_search_20250305\","    \
    "\"name\":\"web_search\"" max_uses "}]," MSGS "}"

/* A whole answer of 7 tokens that made 3 searches costs `want`: its head
 * and the tenant's spend say so. */
static void assert_three_searches_cost(double want)
{
    cr_assert_eq(messages("x-mock-tokens: 7\r\nx-mock-web-searches: 3\r\n",
                          "{\"model\":\"claude\",\"max_tokens\":10," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), want, 1e-9);
    cr_assert_float_eq(day_spend(), want, 1e-9);
}

/* A whole answer that made 3 searches is charged its tokens and 3 x
 * $0.01: in its head, its cost log line (which counts them) and the
 * tenant's spend. */
Test(web_search, a_whole_answer_is_charged_its_searches)
{
    double want = usd(PROMPT_TOKENS, 0, 0, 7) + 3 * SEARCH_USD;

    a_extra = SEARCH_PRICE;
    start("");
    assert_three_searches_cost(want);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 3);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 7);
    cJSON_Delete(rec);
}

/* A stream's count is message_delta's (message_start says 0), and each
 * search shows as it starts (a server_tool_use block): charged once each,
 * in the SSE comment and trailer, the cost log and the spend. */
Test(web_search, a_stream_is_charged_the_searches_of_its_message_delta)
{
    struct support_sse s = {0};
    double want = usd(PROMPT_TOKENS, 0, 0, 5) + 4 * SEARCH_USD;
    int clean;

    a_extra = SEARCH_PRICE;
    start("");
    /* message_start, 4 x (block start, stop), the text's start, ping, 5
     * deltas, its stop, message_delta, message_stop */
    cr_assert_eq(read_stream(&s, "x-mock-tokens: 5\r\nx-mock-web-searches: 4\r\n", &clean), 19);
    cr_assert(clean, "the stream did not end cleanly");
    cr_assert_float_eq(stream_usd(&s), want, 1e-9);
    support_sse_close(&s);
    cr_assert_float_eq(day_spend(), want, 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 4);
    cJSON_Delete(rec);
}

/* A stream that breaks after its searches started, before the
 * message_delta that counts them: the searches that started are charged
 * with the deltas that passed (Claude ran them; the answer's count never
 * came). */
Test(web_search, a_broken_stream_is_charged_the_searches_that_started)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int rc;

    a_extra = SEARCH_PRICE;
    start("");
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/messages",
                                     XKEY "x-mock-tokens: 8\r\nx-mock-fault: close-midstream\r\n"
                                          "x-mock-web-searches: 2\r\n",
                                     "{\"model\":\"claude\",\"max_tokens\":64,\"stream\":true," MSGS
                                     "}"),
                 0);
    cr_assert_eq(support_sse_open(&s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        ;
    cr_assert_eq(rc, -ECONNRESET, "a broken stream ended cleanly");
    support_sse_close(&s);
    cJSON *rec = record_last(&router, log_path);
    double completion = record_num(rec, "billed_completion_tokens");
    cr_assert_eq(record_num(rec, "billed_web_searches"), 2);
    cr_assert_float_eq(record_num(rec, "cost_usd"),
                       usd(PROMPT_TOKENS, 0, 0, completion) + 2 * SEARCH_USD, 1e-9);
    cJSON_Delete(rec);
}

/* The hold counts the web search tool's max_uses: with $0.04 a day (and
 * the tool prompt's $0.0346), 10 output tokens and the prompt (about
 * $0.006) fit, and so does one search, but not five ($0.05); a tool
 * without max_uses holds for none (the charge is exact), nor does another
 * tool's max_uses. */
Test(web_search, the_hold_counts_the_tools_max_uses)
{
    char budget[96];

    a_extra = SEARCH_PRICE;
    snprintf(budget, sizeof(budget), "    budget: {daily_usd: %g, on_exhausted: reject}\n",
             0.04 + TOOL_PROMPT_USD);
    start(budget);
    cr_assert_eq(messages(NULL, SEARCH_BODY(",\"max_uses\":5")), 0);
    assert_anthropic_error(429, "rate_limit_error");
    cr_assert_not_null(strstr(get(get(json, "error"), "message")->valuestring, "budget"), "%s",
                       get(get(json, "error"), "message")->valuestring);
    cr_assert_eq(requests_of(&mock), 0);
    cr_assert_eq(messages("x-mock-web-searches: 1\r\n", SEARCH_BODY(",\"max_uses\":1")), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    double first = header_usd();
    cr_assert_gt(first, SEARCH_USD, "the search is charged");
    cr_assert_eq(messages(NULL, SEARCH_BODY("")), 0);
    cr_assert_eq(resp.status, 200, "no max_uses: no search held, %.*s", (int)resp.body.len,
                 resp.body.data);
    cr_assert_eq(messages(NULL, "{\"model\":\"claude\",\"max_tokens\":10,\"tools\":[{\"type\":"
                                "\"bash_20250124\",\"name\":\"bash\",\"max_uses\":5}]," MSGS "}"),
                 0);
    cr_assert_eq(resp.status, 200, "another tool's max_uses: no search held, %.*s",
                 (int)resp.body.len, resp.body.data);
    cJSON *rec = record_last(&router, log_path);
    /* its estimate is the tokens' alone, below one search's price; it made none */
    cr_assert_lt(record_num(rec, "cost_usd_est"), TOOL_PROMPT_USD + SEARCH_USD);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 0);
    cJSON_Delete(rec);
}

/* The estimate of a request with max_uses 5 is its tokens' and 5
 * searches'; a budget that fits both admits it. */
Test(web_search, the_estimate_is_tokens_and_max_uses_searches)
{
    char budget[96];

    a_extra = SEARCH_PRICE;
    snprintf(budget, sizeof(budget), "    budget: {daily_usd: %g, on_exhausted: reject}\n",
             0.06 + TOOL_PROMPT_USD);
    start(budget);
    cr_assert_eq(messages("x-mock-web-searches: 2\r\n", SEARCH_BODY(",\"max_uses\":5")), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    double charged = header_usd();
    cJSON *rec = record_last(&router, log_path);
    double est = record_num(rec, "cost_usd_est");
    /* held for 10 output tokens and 5 searches, charged 2 and the usage */
    cr_assert_gt(est, 5 * SEARCH_USD + 10 * OUT_USD / 1e6, "estimate %.6f", est);
    cr_assert_lt(est, 5 * SEARCH_USD + TOOL_PROMPT_USD + 0.01, "estimate %.6f", est);
    cr_assert_float_eq(charged, usd(record_num(rec, "prompt_tokens"), 0, 0, 10) + 2 * SEARCH_USD,
                       1e-9);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 2);
    cJSON_Delete(rec);
}

/* A backend without the price charges nor holds anything for searches:
 * its line counts them, at $0. */
Test(web_search, a_backend_without_the_price_charges_none)
{
    double want = usd(PROMPT_TOKENS, 0, 0, 7);
    char budget[96];

    snprintf(budget, sizeof(budget), "    budget: {daily_usd: %g, on_exhausted: reject}\n",
             0.02 + TOOL_PROMPT_USD);
    start(budget);
    assert_three_searches_cost(want);
    cr_assert_eq(messages("x-mock-web-searches: 3\r\n", SEARCH_BODY(",\"max_uses\":5")), 0);
    cr_assert_eq(resp.status, 200, "nothing held for the searches: %.*s", (int)resp.body.len,
                 resp.body.data);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), usd(record_num(rec, "prompt_tokens"), 0, 0, 10),
                       1e-9);
    cr_assert_lt(record_num(rec, "cost_usd_est"), TOOL_PROMPT_USD + SEARCH_USD);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 3);
    cJSON_Delete(rec);
}
