/*
 * tests/router/test_responses.c: POST /v1/responses (OpenAI's Responses
 * API) through the real router in front of a real mockllm: the settled
 * cost of plain and streamed answers in the head, the stream's SSE
 * comment and trailer and the cost log; cached input tokens at the cached
 * rate; no stream_options sent upstream; an answer without usage charged
 * for its output text, a stream without usage, or broken, for its text
 * deltas alone; the hold of max_output_tokens against a
 * budget; a wrongly typed input refused; the response cache only for an
 * unstored, unchained answer.
 *
 * mockllm counts a Responses prompt by its chat rule: 3, plus 4 + the
 * words of "instructions" when given, plus for "input" as a string 4 +
 * its words, or as an array 4 + the words of each item's text (a
 * message's content or its parts' "text", a function call's "arguments",
 * a function_call_output's "output"); a word is a run of non-whitespace
 * bytes. It answers x-mock-tokens output tokens (capped by
 * max_output_tokens) and reports x-mock-cached-tokens as
 * input_tokens_details.cached_tokens, so every cost below is computed by
 * hand from the configured prices. It answers 400 to a body with
 * stream_options.include_usage, as the Responses API has no such option.
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
#define KEY "sk-responses-tenant"
#define AUTH "Authorization: Bearer " KEY "\r\n"
/* Prices of the backend, USD per million tokens. */
#define IN_USD 100
#define CACHED_USD 10
/* Backend a's cached rate (CACHED_USD unless a test says otherwise). */
static int cached_usd = CACHED_USD;
#define OUT_USD 300
/* "hello there" as the input string: 3 + 4 + 2 = 9 prompt tokens. */
#define INPUT "\"input\":\"hello there\""
#define PROMPT_TOKENS 9

static struct support_proc router, mock;
static struct support_http_response resp;
static struct buf req;
static cJSON *json;
static char conf_path[64], log_path[64];
/* More keys of backend a (", key: value" fragments), "" for none. */
static const char *a_extra = "";

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    support_http_response_free(&resp);
    buf_free(&req);
    cJSON_Delete(json);
    json = NULL;
    if (conf_path[0])
        unlink(conf_path);
    if (log_path[0])
        unlink(log_path);
    a_extra = "";
    cached_usd = CACHED_USD;
}

TestSuite(responses, .fini = teardown, .timeout = 60);

/* mockllm and the router in front of it, the tenant with `tenant_extra`
 * (config lines, or ""). */
static void start(const char *tenant_extra)
{
    char hex[65];
    FILE *f;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    support_key_sha256_hex(KEY, hex);
    strcpy(log_path, "/tmp/costrouter-resp-log-XXXXXX");
    close(mkstemp(log_path));
    strcpy(conf_path, "/tmp/costrouter-resp-XXXXXX");
    f = fdopen(mkstemp(conf_path), "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\ncost_log: %s\n"
            "backends:\n"
            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: %d, cached_input_usd_per_mtok: %d,\n"
            "     output_usd_per_mtok: %d, tokenizer: o200k_base%s}\n"
            "routes:\n  - {model: chat, candidates: [a]}\n"
            "tenants:\n  - id: acme\n    api_keys: [\"sha256:%s\"]\n%s",
            log_path, mock.port, IN_USD, cached_usd, OUT_USD, a_extra, hex, tenant_extra);
    fclose(f);
    char *argv[] = {getenv("COSTROUTER_BIN"), "-q", "-c", conf_path, NULL};
    cr_assert_eq(support_proc_start(&router, argv), 0);
}

static int call(int port, const char *method, const char *path, const char *headers,
                const char *body)
{
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    return support_http_request(port, req.data, req.len, TIMEOUT_MS, &resp);
}

/* POST /v1/responses to the router with `extra` header lines. */
static int responses(const char *extra, const char *body)
{
    char headers[512];

    snprintf(headers, sizeof(headers), AUTH "%s", extra ? extra : "");
    return call(router.port, "POST", "/v1/responses", headers, body);
}

static cJSON *body_json(void)
{
    cJSON_Delete(json);
    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    cr_assert_not_null(json, "not JSON: %.*s", (int)resp.body.len, resp.body.data);
    return json;
}

static double header_usd(void)
{
    const char *v = support_http_header(&resp, "x-costrouter-cost-usd");

    cr_assert_not_null(v, "no x-costrouter-cost-usd header");
    return strtod(v, NULL);
}

/* USD of `prompt` input tokens (of which `cached` from the cache) and
 * `output` tokens, rounded to the micro-dollar as settled. */
static double usd(double prompt, double cached, double output)
{
    return round((prompt - cached) * IN_USD + cached * CACHED_USD + output * OUT_USD) / 1e6;
}

/* The cost log's line has these tokens and this cost. */
static void assert_logged(double prompt, double completion, double cost)
{
    cJSON *rec = record_last(&router, log_path);

    cr_assert_eq(record_num(rec, "prompt_tokens"), prompt);
    cr_assert_eq(record_num(rec, "completion_tokens"), completion);
    cr_assert_float_eq(record_num(rec, "cost_usd"), cost, 1e-9);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(rec, "route")->valuestring, "chat");
    cJSON_Delete(rec);
}

/* The body mockllm last received, as JSON (in `json`). */
static cJSON *upstream_body(void)
{
    const cJSON *body;
    cJSON *inner;

    cr_assert_eq(call(mock.port, "GET", "/mock/last-request", NULL, NULL), 0);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(body_json(), "path")->valuestring,
                     "/v1/responses");
    body = cJSON_GetObjectItemCaseSensitive(json, "body");
    cr_assert(cJSON_IsString(body));
    inner = cJSON_Parse(body->valuestring);
    cr_assert_not_null(inner);
    cJSON_Delete(json);
    json = inner;
    return json;
}

static double mock_requests(void)
{
    cr_assert_eq(call(mock.port, "GET", "/mock/stats", NULL, NULL), 0);
    return record_num(body_json(), "requests");
}

Test(responses, plain_cost_is_usage_times_price_in_header_and_log)
{
    start("");
    cr_assert_eq(responses("x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," INPUT "}"), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(body_json(), "object")->valuestring,
                     "response");
    double want = usd(PROMPT_TOKENS, 0, 7); /* 900 + 2100 micro */
    cr_assert_float_eq(header_usd(), want, 1e-9);
    /* Sent to the backend's /responses with its own model name. */
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(upstream_body(), "model")->valuestring,
                     "m-a");
    assert_logged(PROMPT_TOKENS, 7, want);
}

/* A whole answer without usage is charged the estimated prompt and its
 * output text counted with the backend's tokenizer: "The quick brown
 * fox" is 4 tokens in o200k_base. */
Test(responses, a_plain_answer_without_usage_is_charged_for_its_output_text)
{
    start("");
    cr_assert_eq(responses("x-mock-tokens: 4\r\nx-mock-usage: omit\r\n",
                           "{\"model\":\"chat\"," INPUT "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(body_json(), "usage"));
    /* "hello there" as a user message, by the chat framing: 3 + 1 + 2 + 3. */
    cr_assert_float_eq(header_usd(), usd(9, 0, 4), 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), 9);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 4);
    cJSON_Delete(rec);
}

/* Start the router (backend a's cached rate: cached_usd), ask for 17
 * prompt tokens of which mockllm says 5 were cached and 4 output tokens,
 * and check that the head and the cost log charge them at those rates. */
static void ask_with_5_cached(void)
{
    start("");
    /* instructions (2 words) and an input item with two text parts:
     * 3 + (4 + 2) + (4 + 3 + 1) = 17 prompt tokens, 5 of them cached. */
    cr_assert_eq(responses("x-mock-tokens: 4\r\nx-mock-cached-tokens: 5\r\n",
                           "{\"model\":\"chat\",\"instructions\":\"be brief\",\"input\":[{\"role\":"
                           "\"user\",\"content\":[{\"type\":\"input_text\",\"text\":\"one two "
                           "three\"},{\"type\":\"input_text\",\"text\":\"four\"}]}]}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    double want = (12.0 * IN_USD + 5.0 * cached_usd + 4.0 * OUT_USD) / 1e6;
    cr_assert_float_eq(header_usd(), want, 1e-9);
    assert_logged(17, 4, want);
}

Test(responses, cached_input_tokens_are_priced_at_the_cached_rate)
{
    ask_with_5_cached(); /* 1200 + 50 + 1200 micro */
}

/* A cached rate of 0 (cache reads the host does not bill) bills them
 * nothing, as the cost formula says (C x cached_input): the cost
 * function took a rate of 0 for none and billed them at the input rate,
 * so the head, the cost log and the budget said more than was spent. */
Test(responses, a_cached_rate_of_0_bills_cached_tokens_nothing)
{
    cached_usd = 0;
    ask_with_5_cached(); /* 1200 + 0 + 1200 micro */
}

/* Read the stream of "hello there" with x-mock-tokens: 5 and the header
 * lines `extra` whole: `events` events in all. */
static void read_stream_of(struct support_sse *s, const char *extra, int events)
{
    static const char body[] = "{\"model\":\"chat\",\"stream\":true," INPUT "}";
    struct support_sse_event ev;
    char headers[512];
    int n = 0, rc;

    snprintf(headers, sizeof(headers), AUTH "x-mock-tokens: 5\r\n%s", extra);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/responses", headers, body), 0);
    cr_assert_eq(support_sse_open(s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    cr_assert_eq(s->resp.status, 200);
    while ((rc = support_sse_next(s, &ev, TIMEOUT_MS)) == 1)
        n++;
    cr_assert_eq(rc, 0, "the stream did not end cleanly: %d", rc);
    cr_assert_eq(n, events, "%d events", n);
}

/* The same without web searches: response.created, 5 deltas,
 * response.completed. */
static void read_stream(struct support_sse *s, const char *extra)
{
    read_stream_of(s, extra, 7);
}

/* The stream's cost, from its SSE comment, which its trailer repeats. */
static double stream_usd(const struct support_sse *s)
{
    double comment, trailer;

    cr_assert_eq(support_sse_cost(s, &comment, &trailer), 0, "no cost comment or trailer");
    cr_assert_float_eq(comment, trailer, 1e-12);
    return comment;
}

Test(responses, streamed_cost_comes_from_response_completed_without_stream_options)
{
    struct support_sse s = {0};

    start("");
    read_stream(&s, "");
    cr_assert_str_eq(support_http_header(&s.resp, "trailer"), "x-costrouter-cost-usd");
    cr_assert_null(memmem(s.resp.raw.data, s.resp.raw.len, "[DONE]", 6));
    double want = usd(PROMPT_TOKENS, 0, 5);
    cr_assert_float_eq(stream_usd(&s), want, 1e-9);
    support_sse_close(&s);
    /* mockllm refuses stream_options.include_usage on /v1/responses (the
     * stream above would have been a 400): the router added none. */
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(upstream_body(), "stream_options"));
    assert_logged(PROMPT_TOKENS, 5, want);
}

Test(responses, a_stream_without_usage_is_charged_for_its_text_deltas_alone)
{
    struct support_sse s = {0};

    start("");
    read_stream(&s, "x-mock-usage: omit\r\n");
    /* The prompt as the router estimated it, and one token per delta:
     * not the created and completed events. */
    cJSON *rec = record_last(&router, log_path);
    double prompt = record_num(rec, "billed_prompt_tokens");
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 5);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(rec, "completion_tokens")));
    cr_assert_float_eq(record_num(rec, "cost_usd"), usd(prompt, 0, 5), 1e-9);
    cJSON_Delete(rec);
    cr_assert_float_eq(stream_usd(&s), usd(prompt, 0, 5), 1e-9);
    support_sse_close(&s);
}

/* Read a stream of the input that its backend breaks after 3 of its 8
 * tokens, with the header lines `extra`, to its unclean end; whether an
 * error event came. */
static int read_broken_stream(const char *extra)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    char headers[256];
    int rc, error_event = 0;

    snprintf(headers, sizeof(headers),
             AUTH "x-mock-tokens: 8\r\nx-mock-fault: close-midstream\r\n%s", extra);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/responses", headers,
                                     "{\"model\":\"chat\",\"stream\":true," INPUT "}"),
                 0);
    cr_assert_eq(support_sse_open(&s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        error_event |= strstr(ev.data, "\"error\"") != NULL;
    cr_assert_eq(rc, -ECONNRESET, "a broken stream ended cleanly");
    support_sse_close(&s);
    return error_event;
}

/* A stream that breaks before response.completed: the client sees an
 * error event and no clean end; the tenant pays the estimated prompt and
 * the three deltas that passed, not the response.created before them. */
Test(responses, a_broken_stream_is_charged_for_the_deltas_that_passed)
{
    start("");
    cr_assert(read_broken_stream(""), "no error event");
    cJSON *rec = record_last(&router, log_path);
    double prompt = record_num(rec, "billed_prompt_tokens");
    cr_assert_gt(prompt, 0);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 3);
    cr_assert_float_eq(record_num(rec, "cost_usd"), usd(prompt, 0, 3), 1e-9);
    cJSON_Delete(rec);
}

Test(responses, a_budget_refuses_a_hold_of_max_output_tokens_that_does_not_fit)
{
    /* $0.01 a day: 1000 output tokens at $300/M hold $0.30, 10 hold
     * $0.003 and the prompt. */
    start("    budget: {daily_usd: 0.01, on_exhausted: reject}\n");
    cr_assert_eq(responses(NULL, "{\"model\":\"chat\",\"max_output_tokens\":1000," INPUT "}"), 0);
    cr_assert_eq(resp.status, 429, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(
                         cJSON_GetObjectItemCaseSensitive(body_json(), "error"), "code")
                         ->valuestring,
                     "budget_exhausted");
    cr_assert_eq(mock_requests(), 0);
    cr_assert_eq(responses(NULL, "{\"model\":\"chat\",\"max_output_tokens\":10," INPUT "}"), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    /* mockllm stopped at the cap, and the cost says so. */
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(body_json(), "status")->valuestring,
                     "incomplete");
    cr_assert_float_eq(header_usd(), usd(PROMPT_TOKENS, 0, 10), 1e-9);
}

Test(responses, a_wrongly_typed_input_is_a_400_openai_error)
{
    static const char *const bodies[] = {
        "{\"model\":\"chat\",\"input\":5}",
        "{\"model\":\"chat\",\"input\":{\"role\":\"user\",\"content\":\"hi\"}}",
        "{\"model\":\"chat\",\"input\":[\"hi\"]}",
        "{\"model\":\"chat\",\"input\":[{\"role\":\"user\",\"content\":5}]}",
        "{\"model\":\"chat\",\"instructions\":[1]," INPUT "}",
        "{\"model\":\"chat\",\"max_output_tokens\":\"10\"," INPUT "}",
    };

    start("");
    for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        cr_assert_eq(responses(NULL, bodies[i]), 0);
        cr_assert_eq(resp.status, 400, "%s: %d", bodies[i], resp.status);
        cr_assert_str_eq(support_http_header(&resp, "content-type"), "application/json");
        const cJSON *err = cJSON_GetObjectItemCaseSensitive(body_json(), "error");
        cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(err, "type")->valuestring,
                         "invalid_request_error");
        cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(err, "code")->valuestring,
                         "invalid_type", "%s", bodies[i]);
        cr_assert(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(err, "message")));
    }
    cr_assert_eq(mock_requests(), 0);
}

/* The API stores a response under its id unless told "store": false, and
 * a client may chain it (previous_response_id): such an answer is never
 * replayed to another request, which would get an id that names a
 * response not made for it. An unstored, unchained one is cached as a
 * chat answer is (temperature 0), streamed or not. */
Test(responses, only_an_unstored_unchained_answer_is_served_from_the_cache)
{
    static const char stored[] = "{\"model\":\"chat\",\"temperature\":0," INPUT "}";
    static const char unstored[] = "{\"model\":\"chat\",\"temperature\":0,\"store\":false," INPUT "}";
    static const char chained[] = "{\"model\":\"chat\",\"temperature\":0,\"store\":false,"
                                  "\"previous_response_id\":\"resp_1\"," INPUT "}";
    static const char streamed[] =
        "{\"model\":\"chat\",\"temperature\":0,\"store\":false,\"stream\":true," INPUT "}";
    char first_id[64];
    struct buf first = {0};

    start("");
    cr_assert_eq(responses(NULL, stored), 0);
    cr_assert_eq(resp.status, 200);
    snprintf(first_id, sizeof(first_id), "%s",
             cJSON_GetObjectItemCaseSensitive(body_json(), "id")->valuestring);
    cr_assert_eq(responses(NULL, stored), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    /* A response of its own, with an id a client may chain. */
    cr_assert_str_neq(cJSON_GetObjectItemCaseSensitive(body_json(), "id")->valuestring, first_id);
    cr_assert_eq(mock_requests(), 2);

    cr_assert_eq(responses(NULL, unstored), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_eq(buf_append(&first, resp.body.data, resp.body.len), 0);
    cr_assert_eq(responses(NULL, unstored), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    cr_assert(resp.body.len == first.len && memcmp(resp.body.data, first.data, first.len) == 0,
              "the replay differs");
    cr_assert_eq(mock_requests(), 3);

    for (int round = 0; round < 2; round++) {
        cr_assert_eq(responses(NULL, chained), 0);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a", "chained");
    }
    for (int round = 0; round < 2; round++) {
        cr_assert_eq(responses(NULL, streamed), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), round ? "cache" : "a",
                         "streamed, round %d", round);
    }
    cr_assert_eq(mock_requests(), 6);
    buf_free(&first);
}

/* One body may mean two requests: sent to /v1/completions (its prompt)
 * and to /v1/responses (its input), each answer is cached for its own
 * endpoint and never replayed for the other. */
Test(responses, the_cache_keeps_endpoints_apart)
{
    static const char body[] = "{\"model\":\"chat\",\"temperature\":0,\"store\":false,"
                               "\"prompt\":\"hello there\"," INPUT "}";
    static const char *const paths[] = {"/v1/completions", "/v1/responses"};

    start("");
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < 2; i++) {
            cr_assert_eq(call(router.port, "POST", paths[i], AUTH, body), 0);
            cr_assert_eq(resp.status, 200, "%s", paths[i]);
            cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"),
                             round ? "cache" : "a", "%s, round %d", paths[i], round);
        }
    cr_assert_eq(mock_requests(), 2);
}

/* ---- web searches ---- */

TestSuite(web_search, .fini = teardown, .timeout = 60);

/* Backend a's price of web search calls: $10 per 1,000, 10000 micro-USD
 * each (OpenAI's web_search tool). */
#define SEARCH_PRICE ", web_search_usd_per_1k: 10"
#define SEARCH_USD 0.01
/* A request with the web search tool, at most 10 output tokens, and
 * `cap` (a JSON fragment, or "") beside them. */
#define SEARCH_BODY(cap)                                                                       \
    "{\"model\":\"chat\",\"max_output_tokens\":10,\"tools\":[{\"type\":\"web_search\"}]" cap   \
    "," INPUT "}"

/* A whole answer whose output has 3 web search calls is charged its
 * tokens and 3 x $0.01: in its head, its cost log line (which counts
 * them) and the tenant's spend. OpenAI's usage says nothing of them. */
Test(web_search, a_whole_answer_is_charged_its_web_search_calls)
{
    double want = usd(PROMPT_TOKENS, 0, 7) + 3 * SEARCH_USD;

    a_extra = SEARCH_PRICE;
    start("");
    cr_assert_eq(responses("x-mock-tokens: 7\r\nx-mock-web-searches: 3\r\n", SEARCH_BODY("")), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), want, 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 3);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 7);
    cJSON_Delete(rec);
}

/* A stream shows each call in an output_item.done event and all of them
 * in response.completed: charged once each, in the SSE comment and
 * trailer and the cost log. */
Test(web_search, a_stream_is_charged_its_web_search_calls_once)
{
    struct support_sse s = {0};
    double want = usd(PROMPT_TOKENS, 0, 5) + 2 * SEARCH_USD;

    a_extra = SEARCH_PRICE;
    start("");
    /* created, 2 x (added, done), 5 deltas, completed */
    read_stream_of(&s, "x-mock-web-searches: 2\r\n", 11);
    cr_assert_float_eq(stream_usd(&s), want, 1e-9);
    support_sse_close(&s);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 2);
    cJSON_Delete(rec);
}

/* A stream that breaks after its searches, before response.completed:
 * the calls that were done are charged with the deltas that passed. */
Test(web_search, a_broken_stream_is_charged_the_calls_done_before_it_broke)
{
    a_extra = SEARCH_PRICE;
    start("");
    read_broken_stream("x-mock-web-searches: 2\r\n");
    cJSON *rec = record_last(&router, log_path);
    double prompt = record_num(rec, "billed_prompt_tokens");
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 3);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 2);
    cr_assert_float_eq(record_num(rec, "cost_usd"), usd(prompt, 0, 3) + 2 * SEARCH_USD, 1e-9);
    cJSON_Delete(rec);
}

/* The hold counts max_tool_calls searches when the request has a web
 * search tool: with $0.04 a day, 10 output tokens and the prompt (about
 * $0.004) fit, and so does one search, but not five ($0.05). Without
 * max_tool_calls it holds for none (the charge is exact), nor does
 * max_tool_calls without a web search tool. */
Test(web_search, the_hold_counts_max_tool_calls_with_a_web_search_tool)
{
    a_extra = SEARCH_PRICE;
    start("    budget: {daily_usd: 0.04, on_exhausted: reject}\n");
    cr_assert_eq(responses(NULL, SEARCH_BODY(",\"max_tool_calls\":5")), 0);
    cr_assert_eq(resp.status, 429, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(
                         cJSON_GetObjectItemCaseSensitive(body_json(), "error"), "code")
                         ->valuestring,
                     "budget_exhausted");
    cr_assert_eq(mock_requests(), 0);
    cr_assert_eq(responses("x-mock-web-searches: 1\r\n", SEARCH_BODY(",\"max_tool_calls\":1")),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_gt(header_usd(), SEARCH_USD, "the search is charged");
    cr_assert_eq(responses(NULL, SEARCH_BODY("")), 0);
    cr_assert_eq(resp.status, 200, "no max_tool_calls: no search held, %.*s", (int)resp.body.len,
                 resp.body.data);
    cr_assert_eq(responses(NULL, "{\"model\":\"chat\",\"max_output_tokens\":10,\"tools\":[{\"type\":"
                                 "\"function\",\"name\":\"f\",\"parameters\":{}}],"
                                 "\"max_tool_calls\":5," INPUT "}"),
                 0);
    cr_assert_eq(resp.status, 200, "no web search tool: no search held, %.*s",
                 (int)resp.body.len, resp.body.data);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_lt(record_num(rec, "cost_usd_est"), SEARCH_USD);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 0);
    cJSON_Delete(rec);
}

/* The estimate of a request with max_tool_calls 4 is its tokens' and 4
 * searches'; it is charged the 2 its answer made. web_search_preview is a
 * web search tool too. */
Test(web_search, the_estimate_is_tokens_and_max_tool_calls_searches)
{
    a_extra = SEARCH_PRICE;
    start("");
    cr_assert_eq(responses("x-mock-web-searches: 2\r\n",
                           "{\"model\":\"chat\",\"max_output_tokens\":10,\"tools\":[{\"type\":"
                           "\"web_search_preview\"}],\"max_tool_calls\":4," INPUT "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    double charged = header_usd();
    cJSON *rec = record_last(&router, log_path);
    double est = record_num(rec, "cost_usd_est");
    cr_assert_gt(est, 4 * SEARCH_USD + 10 * OUT_USD / 1e6, "estimate %.6f", est);
    cr_assert_lt(est, 4 * SEARCH_USD + 0.01, "estimate %.6f", est);
    cr_assert_float_eq(charged, usd(PROMPT_TOKENS, 0, 10) + 2 * SEARCH_USD, 1e-9);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 2);
    cJSON_Delete(rec);
}

/* A backend without the price charges nothing for the calls: its line
 * counts them, at $0. */
Test(web_search, a_backend_without_the_price_charges_none)
{
    double want = usd(PROMPT_TOKENS, 0, 7);

    start("");
    cr_assert_eq(responses("x-mock-tokens: 7\r\nx-mock-web-searches: 3\r\n", SEARCH_BODY("")), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), want, 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 3);
    cJSON_Delete(rec);
}

/* ---- file searches ---- */

TestSuite(file_search, .fini = teardown, .timeout = 60);

/* Backend a's prices of hosted tool calls: file search calls at $2.50 per
 * 1,000 (OpenAI's file_search tool), web search calls at $10. */
#define FILE_PRICE ", file_search_usd_per_1k: 2.5" SEARCH_PRICE
#define FILE_USD 0.0025
#define FILE_TOOL "{\"type\":\"file_search\",\"vector_store_ids\":[\"vs_1\"]}"
#define WEB_TOOL "{\"type\":\"web_search\"}"
/* A request with `tools` (JSON objects), at most 10 output tokens, and
 * `cap` (a JSON fragment, or "") beside them. */
#define TOOLS_BODY(tools, cap)                                                                 \
    "{\"model\":\"chat\",\"max_output_tokens\":10,\"tools\":[" tools "]" cap "," INPUT "}"

/* The cost_usd_est of the cost log's first `n` lines (the router must
 * have stopped). */
static void logged_estimates(double *est, size_t n)
{
    FILE *f = fopen(log_path, "r");
    char *line = NULL;
    size_t cap = 0, i = 0;

    cr_assert_not_null(f);
    while (i < n && getline(&line, &cap, f) > 0) {
        cJSON *rec = cJSON_Parse(line);

        cr_assert_not_null(rec, "not JSON: %s", line);
        est[i++] = record_num(rec, "cost_usd_est");
        cJSON_Delete(rec);
    }
    free(line);
    fclose(f);
    cr_assert_eq(i, n, "%zu lines in the cost log, want %zu", i, n);
}

/* A whole answer whose output has 3 file search calls and a web search
 * call is charged its tokens, 3 x $0.0025 and $0.01: in its head and its
 * cost log line, which counts each kind. */
Test(file_search, a_whole_answer_is_charged_its_file_search_calls_beside_its_web_searches)
{
    double want = usd(PROMPT_TOKENS, 0, 7) + 3 * FILE_USD + SEARCH_USD;

    a_extra = FILE_PRICE;
    start("");
    cr_assert_eq(responses("x-mock-tokens: 7\r\nx-mock-web-searches: 1\r\n"
                           "x-mock-file-searches: 3\r\n",
                           TOOLS_BODY(FILE_TOOL "," WEB_TOOL, "")),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), want, 1e-9);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_eq(record_num(rec, "billed_file_searches"), 3);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 1);
    cJSON_Delete(rec);
}

/* A stream shows each file search call in an output_item.done event and
 * all of them in response.completed: charged once each. */
Test(file_search, a_stream_is_charged_its_file_search_calls_once)
{
    struct support_sse s = {0};
    double want = usd(PROMPT_TOKENS, 0, 5) + 2 * FILE_USD;

    a_extra = FILE_PRICE;
    start("");
    /* created, 2 x (added, done), 5 deltas, completed */
    read_stream_of(&s, "x-mock-file-searches: 2\r\n", 11);
    cr_assert_float_eq(stream_usd(&s), want, 1e-9);
    support_sse_close(&s);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), want, 1e-9);
    cr_assert_eq(record_num(rec, "billed_file_searches"), 2);
    cr_assert_eq(record_num(rec, "billed_web_searches"), 0);
    cJSON_Delete(rec);
}

/* A stream that breaks after its file searches, before
 * response.completed: the calls that were done are charged. */
Test(file_search, a_broken_stream_is_charged_the_calls_done_before_it_broke)
{
    a_extra = FILE_PRICE;
    start("");
    read_broken_stream("x-mock-file-searches: 2\r\n");
    cJSON *rec = record_last(&router, log_path);
    double prompt = record_num(rec, "billed_prompt_tokens");
    cr_assert_eq(record_num(rec, "billed_file_searches"), 2);
    cr_assert_float_eq(record_num(rec, "cost_usd"), usd(prompt, 0, 3) + 2 * FILE_USD, 1e-9);
    cJSON_Delete(rec);
}

/* max_tool_calls caps a request's built-in tool calls, whatever their
 * kind: with a file search tool alone, 4 calls add 4 x $0.0025 to the
 * estimate (and the hold); with both tools they are 4 calls of either
 * kind, held as the dearer (4 x $0.01), not as 4 of each. */
Test(file_search, max_tool_calls_holds_once_at_the_dearer_fee)
{
    double est[4];

    a_extra = FILE_PRICE;
    start("");
    const char *bodies[] = {
        TOOLS_BODY(FILE_TOOL, ""),
        TOOLS_BODY(FILE_TOOL, ",\"max_tool_calls\":4"),
        TOOLS_BODY(FILE_TOOL "," WEB_TOOL, ""),
        TOOLS_BODY(FILE_TOOL "," WEB_TOOL, ",\"max_tool_calls\":4"),
    };
    for (size_t i = 0; i < 4; i++) {
        cr_assert_eq(responses(NULL, bodies[i]), 0);
        cr_assert_eq(resp.status, 200, "%zu: %.*s", i, (int)resp.body.len, resp.body.data);
    }
    support_proc_stop(&router);
    logged_estimates(est, 4);
    cr_assert_float_eq(est[1] - est[0], 4 * FILE_USD, 2e-6, "%.6f %.6f", est[1], est[0]);
    cr_assert_float_eq(est[3] - est[2], 4 * SEARCH_USD, 2e-6, "%.6f %.6f", est[3], est[2]);
}

/* The hold refuses what the file searches' cap would pass the budget by:
 * with $0.02 a day, the prompt and 10 output tokens (about $0.004) and 4
 * calls ($0.01) fit, 8 ($0.02) do not. */
Test(file_search, a_budget_refuses_a_hold_of_max_tool_calls_file_searches)
{
    a_extra = FILE_PRICE;
    start("    budget: {daily_usd: 0.02, on_exhausted: reject}\n");
    cr_assert_eq(responses(NULL, TOOLS_BODY(FILE_TOOL, ",\"max_tool_calls\":8")), 0);
    cr_assert_eq(resp.status, 429, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(mock_requests(), 0);
    cr_assert_eq(responses(NULL, TOOLS_BODY(FILE_TOOL, ",\"max_tool_calls\":4")), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}
