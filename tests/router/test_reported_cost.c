/*
 * tests/router/test_reported_cost.c: a backend whose answers say what
 * they cost (OpenRouter's usage.cost, Perplexity's usage.cost.total_cost),
 * through the real router in front of a real mockllm (x-mock-cost-micro,
 * x-mock-cost-shape). With `cost_from_usage: true` the charge is that
 * figure, in the head, the stream's SSE comment and trailer, the cost log
 * and the tenant's spend (a budget refuses by it); without it the tokens
 * are charged at the backend's prices and the figure is only logged
 * (`reported_cost_usd`); an answer that reports none, or an amount no
 * request costs, is charged its tokens.
 *
 * mockllm counts a chat prompt of "hello there" as 3 + 4 + 2 = 9 tokens;
 * the backend's prices make that and 7 output tokens $0.003, far from
 * the costs the mock reports, so each charge shows where it came from.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/support/http.h"
#include "tests/support/proc.h"
#include "tests/support/record.h"

#define TIMEOUT_MS 5000
#define KEY "sk-reported-tenant"
#define AUTH "Authorization: Bearer " KEY "\r\n"
/* Prices of the backend, USD per million tokens. */
#define IN_USD 100
#define OUT_USD 300
#define CHAT "{\"model\":\"chat\",\"max_tokens\":10,\"messages\":[{\"role\":\"user\",\"content\":" \
             "\"hello there\"}]}"
#define PROMPT_TOKENS 9
/* 9 x 100 + 7 x 300 micro-USD */
#define TOKENS_USD 0.003

static struct support_proc router, mock;
static struct support_http_response resp;
static struct buf req;
static char conf_path[64], log_path[64];

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    support_http_response_free(&resp);
    buf_free(&req);
    if (conf_path[0])
        unlink(conf_path);
    if (log_path[0])
        unlink(log_path);
}

TestSuite(reported_cost, .fini = teardown, .timeout = 60);

/* mockllm and the router in front of it: backend a with `backend_extra`
 * (", key: value" fragments, or ""), the tenant with `tenant_extra`
 * (config lines, or ""). */
static void start(const char *backend_extra, const char *tenant_extra)
{
    char hex[65];
    FILE *f;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    support_key_sha256_hex(KEY, hex);
    strcpy(log_path, "/tmp/costrouter-rep-log-XXXXXX");
    close(mkstemp(log_path));
    strcpy(conf_path, "/tmp/costrouter-rep-XXXXXX");
    f = fdopen(mkstemp(conf_path), "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\ncost_log: %s\n"
            "backends:\n"
            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: %d, output_usd_per_mtok: %d,\n"
            "     tokenizer: o200k_base%s}\n"
            "routes:\n  - {model: chat, candidates: [a]}\n"
            "tenants:\n  - id: acme\n    api_keys: [\"sha256:%s\"]\n%s",
            log_path, mock.port, IN_USD, OUT_USD, backend_extra, hex, tenant_extra);
    fclose(f);
    char *argv[] = {getenv("COSTROUTER_BIN"), "-q", "-c", conf_path, NULL};
    cr_assert_eq(support_proc_start(&router, argv), 0);
}

/* POST `path` to the router with x-mock-tokens: 7 and `extra` header lines. */
static int post(const char *path, const char *extra, const char *body)
{
    char headers[512];

    snprintf(headers, sizeof(headers), AUTH "x-mock-tokens: 7\r\n%s", extra ? extra : "");
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, "POST", path, headers, body), 0);
    return support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp);
}

static double header_usd(void)
{
    const char *v = support_http_header(&resp, "x-costrouter-cost-usd");

    cr_assert_not_null(v, "no x-costrouter-cost-usd header");
    return strtod(v, NULL);
}

/* The last line charged `cost` for the 7 tokens answered, and logged
 * `reported` (NAN: null) as the backend's own figure. */
static void assert_logged(double cost, double reported)
{
    cJSON *rec = record_last(&router, log_path);
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(rec, "reported_cost_usd");

    cr_assert_float_eq(record_num(rec, "cost_usd"), cost, 1e-9);
    cr_assert_eq(record_num(rec, "billed_prompt_tokens"), PROMPT_TOKENS);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 7);
    if (isnan(reported))
        cr_assert(cJSON_IsNull(r), "reported_cost_usd is not null");
    else
        cr_assert_float_eq(record_num(rec, "reported_cost_usd"), reported, 1e-12);
    cJSON_Delete(rec);
}

/* OpenRouter's shape: the head and the line say the reported $0.012345,
 * not the tokens' $0.003. */
Test(reported_cost, a_cost_from_usage_backend_charges_the_reported_cost)
{
    start(", cost_from_usage: true", "");
    cr_assert_eq(post("/v1/chat/completions", "x-mock-cost-micro: 12345\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), 0.012345, 1e-9);
    assert_logged(0.012345, 0.012345);
}

/* The spend counts the reported cost: with $0.02 a day, two answers that
 * report $0.012345 each (holds of the tokens' price, $0.004) pass, and
 * the third is refused, the day being spent. */
Test(reported_cost, a_budget_holds_by_the_reported_costs)
{
    start(", cost_from_usage: true", "    budget: {daily_usd: 0.02, on_exhausted: reject}\n");
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(post("/v1/chat/completions", "x-mock-cost-micro: 12345\r\n", CHAT), 0);
        cr_assert_eq(resp.status, 200, "request %d: %.*s", i, (int)resp.body.len, resp.body.data);
    }
    cr_assert_eq(post("/v1/chat/completions", "x-mock-cost-micro: 12345\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 429, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "budget", 6), "%.*s",
                       (int)resp.body.len, resp.body.data);
}

/* Perplexity's shape, on the Responses API: usage.cost.total_cost. */
Test(reported_cost, a_cost_object_charges_its_total_cost)
{
    start(", cost_from_usage: true", "");
    cr_assert_eq(post("/v1/responses", "x-mock-cost-micro: 2500\r\nx-mock-cost-shape: object\r\n",
                      "{\"model\":\"chat\",\"max_output_tokens\":10,\"input\":\"hello there\"}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), 0.0025, 1e-9);
    assert_logged(0.0025, 0.0025);
}

/* A stream's usage comes in its last chunk (the router asks for it):
 * the SSE comment and the trailer say the reported cost. */
Test(reported_cost, a_stream_is_charged_the_cost_its_last_chunk_reports)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    double comment, trailer;
    int rc;

    start(", cost_from_usage: true", "");
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-tokens: 7\r\nx-mock-cost-micro: 4321\r\n",
                                     "{\"model\":\"chat\",\"stream\":true,\"max_tokens\":10,"
                                     "\"messages\":[{\"role\":\"user\",\"content\":"
                                     "\"hello there\"}]}"),
                 0);
    cr_assert_eq(support_sse_open(&s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    cr_assert_eq(s.resp.status, 200);
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        ;
    cr_assert_eq(rc, 0, "the stream did not end cleanly: %d", rc);
    cr_assert_eq(support_sse_cost(&s, &comment, &trailer), 0, "no cost comment or trailer");
    cr_assert_float_eq(comment, 0.004321, 1e-9);
    cr_assert_float_eq(trailer, 0.004321, 1e-9);
    support_sse_close(&s);
    assert_logged(0.004321, 0.004321);
}

/* Without cost_from_usage the router's prices stand: the tokens are
 * charged, and the backend's figure is logged beside them (to compare). */
Test(reported_cost, a_backend_without_the_flag_charges_its_tokens_and_logs_the_report)
{
    start("", "");
    cr_assert_eq(post("/v1/chat/completions", "x-mock-cost-micro: 12345\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), TOKENS_USD, 1e-9);
    assert_logged(TOKENS_USD, 0.012345);
}

/* An answer that reports no cost is charged its tokens, with a null
 * reported_cost_usd. */
Test(reported_cost, an_answer_without_a_reported_cost_is_charged_its_tokens)
{
    start(", cost_from_usage: true", "");
    cr_assert_eq(post("/v1/chat/completions", NULL, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), TOKENS_USD, 1e-9);
    assert_logged(TOKENS_USD, NAN);
}

/* A cache hit is charged nothing, whatever the cached answer's usage
 * said it cost: its line has cost 0 and no reported cost. */
Test(reported_cost, a_cache_hit_is_charged_nothing)
{
    static const char body[] = "{\"model\":\"chat\",\"temperature\":0,\"max_tokens\":10,"
                               "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]}";

    start(", cost_from_usage: true", "");
    cr_assert_eq(post("/v1/chat/completions", "x-mock-cost-micro: 12345\r\n", body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd(), 0.012345, 1e-9);
    cr_assert_eq(post("/v1/chat/completions", "x-mock-cost-micro: 12345\r\n", body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    cr_assert_float_eq(header_usd(), 0, 1e-12);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_float_eq(record_num(rec, "cost_usd"), 0, 1e-12);
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(rec, "cache_hit")));
    cr_assert(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(rec, "reported_cost_usd")));
    cJSON_Delete(rec);
}
