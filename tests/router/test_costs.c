/*
 * tests/router/test_costs.c: cost-aware routing through the real router
 * in front of real mockllm processes: settled costs in headers and the
 * cost log, budgets (reject, downgrade) under a real store, the response
 * cache, the admin API, and several routers sharing one real Redis.
 *
 * mockllm counts prompt tokens as 3 + sum(4 + words) over the messages
 * and streams exactly x-mock-tokens completion tokens, so every cost
 * below is computed by hand from the configured prices.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "conf/conf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"
#include "tests/support/record.h"
#include "tests/support/browser.h"
#include "tests/support/canned.h"
#include "tests/support/redis.h"
#include "tests/policy/tokens_fixture.h"

#define TIMEOUT_MS 5000
#define KEY "sk-cost-tenant"
#define AUTH "Authorization: Bearer " KEY "\r\n"
#define ADMIN "Authorization: Bearer adm-secret\r\n"
/* 1 message of 2 words: 3 + 4 + 2 = 9 prompt tokens. */
#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]"
#define PROMPT_TOKENS 9

#define NROUTERS 3
static struct support_proc routers[NROUTERS], mock_a, mock_b;
static struct support_canned *canned; /* a raw upstream, when the test needs one */
static struct test_redis redis;
static struct support_http_response resp;
static struct buf req, yaml;
static cJSON *json;
static char conf_path[64], log_path[64];
static const char *tenant_id = "acme";  /* the tenant's id in the config */
static const char *key_prefix;          /* store.key_prefix, NULL: the default */
static const char *top_extra = "";      /* more top-level config lines */
static const char *listen_at = "127.0.0.1:0"; /* the config's listen */
static const char *stderr_path;         /* routers log there, at full level; NULL: -q */
static const char *more_keys = "";      /* more api_keys entries of the tenant, each ", {...}" */
static const char *run_under;           /* shell words the routers run under, e.g. a
                                         * faketime command; NULL: none */

/* The cost log as a FIFO whose reader is stuck until released: a disk
 * that stops answering, made to order (use_fifo_log). */
static struct {
    int wanted;       /* start_routers makes the cost log a FIFO */
    int started;      /* the reader runs: fifo_finish joins it */
    pthread_t thread; /* the reader */
    sem_t go;         /* posted to let it read */
    int in;           /* its end of the FIFO */
    char out[64];     /* what it read */
} fifo;
static void fifo_finish(void);

static void teardown(void)
{
    for (int i = 0; i < NROUTERS; i++)
        support_proc_stop(&routers[i]);
    fifo_finish();
    support_proc_stop(&mock_a);
    support_proc_stop(&mock_b);
    support_canned_stop(canned);
    canned = NULL;
    if (redis.pid)
        test_redis_stop(&redis);
    support_http_response_free(&resp);
    buf_free(&req);
    buf_free(&yaml);
    cJSON_Delete(json);
    json = NULL;
    if (conf_path[0])
        unlink(conf_path);
    if (log_path[0])
        unlink(log_path);
}

TestSuite(costs, .fini = teardown, .timeout = 60);

/* Append an api backend to the YAML being built, counting its tokens
 * with `tokenizer` (NULL: byte estimates), with `more` keys (", key: value"
 * pairs, or ""). */
static void add_backend_with(const char *name, int port, int quality, double in, double out,
                             const char *tokenizer, const char *more)
{
    cr_assert_eq(buf_printf(&yaml,
                            "  - {name: %s, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-%s,\n"
                            "     quality: %d, context_window: 100000, input_usd_per_mtok: %g,\n"
                            "     output_usd_per_mtok: %g, tokenizer: %s%s}\n",
                            name, port, name, quality, in, out, tokenizer ? tokenizer : "estimate",
                            more),
                 0);
}

static void add_backend_counted(const char *name, int port, int quality, double in, double out,
                                const char *tokenizer)
{
    add_backend_with(name, port, quality, in, out, tokenizer, "");
}

static void add_backend(const char *name, int port, int quality, double in, double out)
{
    add_backend_with(name, port, quality, in, out, NULL, "");
}

/* Write the config: the backends in `yaml`, one route, the tenant. */
static void write_conf(const char *route_candidates, const char *tenant_extra)
{
    char hex[65];
    FILE *f;

    support_key_sha256_hex(KEY, hex);
    if (conf_path[0] == '\0') {
        strcpy(conf_path, "/tmp/costrouter-costs-XXXXXX");
        close(mkstemp(conf_path));
    }
    f = fopen(conf_path, "w");
    cr_assert_not_null(f);
    fprintf(f, "listen: %s\nadmin_key: adm-secret\ncost_log: %s\n%s", listen_at, log_path,
            top_extra);
    if (redis.pid)
        fprintf(f, "store: {redis: \"%s\", key_prefix: \"%s\"}\n", redis.url,
                key_prefix ? key_prefix : "costrouter:");
    fprintf(f,
            "backends:\n%.*s"
            "routes:\n  - {model: chat, candidates: [%s]}\n"
            "tenants:\n  - id: %s\n    api_keys: [\"sha256:%s\"%s]\n"
            "    tags: {team: search, cost_center: cc-1}\n%s",
            (int)yaml.len, yaml.data, route_candidates, tenant_id, hex, more_keys,
            tenant_extra ? tenant_extra : "");
    fclose(f);
}

/* Wait until router `i` has its Redis connection (scripts loaded): before
 * that it serves from memory and writes back later, which a test that
 * reads Redis right after a request would see as missing spend. */
static void wait_store_up(int i)
{
    cr_assert_eq(support_router_store_up(routers[i].port, ADMIN), 1,
                 "router %d: the store did not come up", i);
}

/* The FIFO's reader: reads nothing until released, then copies all to
 * fifo.out until the router closes its end. */
static void *fifo_read(void *arg)
{
    int out = open(fifo.out, O_WRONLY | O_TRUNC);
    char data[4096];
    ssize_t n;

    (void)arg;
    sem_wait(&fifo.go);
    while ((n = read(fifo.in, data, sizeof(data))) > 0)
        if (write(out, data, (size_t)n) != n)
            break;
    close(fifo.in);
    close(out);
    return NULL;
}

/* Replace the cost log file by a FIFO, open its reading end (the router's
 * open waits for one) with a pipe of one page, the least Linux allows,
 * before the router can write, and start its reader. */
static void use_fifo_log(void)
{
    strcpy(fifo.out, "/tmp/costrouter-fifo-out-XXXXXX");
    close(mkstemp(fifo.out));
    cr_assert_eq(unlink(log_path), 0);
    cr_assert_eq(mkfifo(log_path, 0600), 0);
    fifo.in = open(log_path, O_RDONLY | O_NONBLOCK);
    cr_assert_geq(fifo.in, 0);
    cr_assert_eq(fcntl(fifo.in, F_SETPIPE_SZ, 4096), 4096);
    cr_assert_eq(fcntl(fifo.in, F_SETFL, 0), 0); /* the reader's reads wait */
    cr_assert_eq(sem_init(&fifo.go, 0, 0), 0);
    cr_assert_eq(pthread_create(&fifo.thread, NULL, fifo_read, NULL), 0);
    fifo.started = 1;
}

/* Let the reader read. */
static void fifo_release(void)
{
    sem_post(&fifo.go);
}

/* Release the reader and wait for it to see the end (the router stopped). */
static void fifo_join(void)
{
    if (!fifo.started)
        return;
    fifo_release();
    pthread_join(fifo.thread, NULL);
    fifo.started = 0;
}

static void fifo_finish(void)
{
    fifo_join();
    if (fifo.out[0]) {
        sem_destroy(&fifo.go);
        unlink(fifo.out);
    }
    memset(&fifo, 0, sizeof(fifo));
}

/* Finish the config (routes and tenant lines given) and start `n` routers
 * (with their store up, when it is Redis). */
static void start_routers(int n, const char *route_candidates, const char *tenant_extra)
{
    strcpy(log_path, "/tmp/costrouter-costlog-XXXXXX");
    close(mkstemp(log_path));
    if (fifo.wanted)
        use_fifo_log();
    write_conf(route_candidates, tenant_extra);
    for (int i = 0; i < n; i++) {
        char *argv[] = {getenv("COSTROUTER_BIN"), "-q", "-c", conf_path, NULL};
        char cmd[512], *logged[] = {"/bin/sh", "-c", cmd, NULL};

        snprintf(cmd, sizeof(cmd), "exec %s '%s' -c '%s' %s%s%s", run_under ? run_under : "",
                 argv[0], conf_path, stderr_path ? "2>>'" : "-q", stderr_path ? stderr_path : "",
                 stderr_path ? "'" : "");
        cr_assert_eq(support_proc_start(&routers[i], stderr_path || run_under ? logged : argv), 0,
                     "router %d did not start", i);
        if (redis.pid)
            wait_store_up(i);
    }
}

static int call_port(int port, const char *method, const char *path, const char *headers,
                     const char *body)
{
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    return support_http_request(port, req.data, req.len, TIMEOUT_MS, &resp);
}

static int chat(int router, const char *extra_headers, const char *body)
{
    char headers[512];

    snprintf(headers, sizeof(headers), AUTH "%s", extra_headers ? extra_headers : "");
    return call_port(routers[router].port, "POST", "/v1/chat/completions", headers, body);
}

/* Send a chat request to router 0 on `conn` (connected here) without
 * reading its answer: a request kept in flight while others run. */
static void send_unanswered(struct support_http_conn *conn, struct buf *out, const char *headers,
                            const char *body)
{
    cr_assert_eq(support_http_format(out, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(support_http_connect(conn, routers[0].port), 0);
    cr_assert_eq(support_http_send(conn, out->data, out->len), 0);
}

/* Send a chat request with `headers` (the Authorization included) and
 * `body` to router 0 and read the stream's head into s. */
static void open_chat_stream(struct support_sse *s, const char *headers, const char *body)
{
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(support_sse_open(s, routers[0].port, req.data, req.len, TIMEOUT_MS), 0);
}

static cJSON *body_json(void)
{
    cJSON_Delete(json);
    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    cr_assert_not_null(json, "not JSON: %.*s", (int)resp.body.len, resp.body.data);
    return json;
}

static double header_usd(const char *name)
{
    const char *v = support_http_header(&resp, name);

    cr_assert_not_null(v, "no %s header", name);
    return strtod(v, NULL);
}

/* USD for tokens at $/Mtok prices, rounded to the micro-dollar as settled. */
static double usd(double prompt, double completion, double in, double out)
{
    return round(prompt * in + completion * out) / 1e6;
}

Test(costs, settled_cost_is_usage_times_price_in_header_and_log)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    double want = usd(PROMPT_TOKENS, 7, 100, 300); /* 900 + 2100 micro = $0.003 */
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), want, 1e-9);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "only-candidate");

    /* The cost log has the same number once the router has stopped. */
    support_proc_stop(&routers[0]);
    FILE *f = fopen(log_path, "r");
    char line[4096];
    cr_assert_not_null(f);
    cr_assert_not_null(fgets(line, sizeof(line), f), "cost log is empty");
    fclose(f);
    cJSON *rec = cJSON_Parse(line);
    cr_assert_not_null(rec, "%s", line);
    static const char *const keys[] = {
        "ts", "request_id", "tenant", "tags", "route", "backend", "arm", "reason", "candidates",
        "prompt_tokens_est", "prompt_tokens", "completion_tokens_est", "completion_tokens",
        "cost_usd_est", "cost_usd", "cache_hit", "saved_usd", "ttft_ms", "latency_ms", "status",
        "fallbacks"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        cr_assert(cJSON_HasObjectItem(rec, keys[i]), "cost log lacks %s", keys[i]);
    cr_assert_float_eq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, want, 1e-9);
    cr_assert_eq(cJSON_GetObjectItem(rec, "prompt_tokens")->valuedouble, PROMPT_TOKENS);
    cr_assert_eq(cJSON_GetObjectItem(rec, "completion_tokens")->valuedouble, 7);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(rec, "tags"), "team")->valuestring,
                     "search");
    cJSON_Delete(rec);
}

/* Backend "a" at its own `in` and `out` USD per million over the price
 * entry "listed" (`entry`, its YAML mapping): the cost of a Responses
 * answer of 10 tokens with 5 of its prompt cached (mockllm reports them
 * there, not in chat's); *prompt gets its prompt tokens. */
static double cost_over_entry(const char *entry, int in, int out, double *prompt)
{
    char prices[512];

    snprintf(prices, sizeof(prices), "prices:\n  listed: %s\n", entry);
    top_extra = prices;
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with("a", mock_a.port, 1, in, out, NULL, ", price: listed");
    start_routers(1, "a", NULL);
    top_extra = "";
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/responses",
                           AUTH "x-mock-tokens: 10\r\nx-mock-cached-tokens: 5\r\n",
                           "{\"model\":\"chat\",\"store\":false,\"input\":\"hello there, "
                           "how are you doing today\"}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cJSON *usage = cJSON_GetObjectItem(body_json(), "usage");
    *prompt = cJSON_GetObjectItem(usage, "input_tokens")->valuedouble;
    cr_assert_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(usage, "input_tokens_details"),
                                     "cached_tokens")
                     ->valuedouble,
                 5, "%.*s", (int)resp.body.len, resp.body.data);
    return header_usd("x-costrouter-cost-usd");
}

/* A backend that sets its own input price (a negotiated discount) over a
 * price entry pays its cached tokens at the entry's cached-to-input
 * ratio of that price: half off the input is half off the cached tokens,
 * not the entry's list price for them. */
Test(costs, an_own_input_price_scales_the_entrys_cached_price)
{
    double prompt, cost = cost_over_entry("{input_usd_per_mtok: 400, output_usd_per_mtok: 800, "
                                          "cached_input_usd_per_mtok: 100}",
                                          200, 800, &prompt);
    /* fresh at $200, cached at $50 (not the entry's $100), output at $800 */
    double want = ((prompt - 5) * 200 + 5 * 50 + 10 * 800) / 1e6;

    cr_assert_float_eq(cost, want, 1e-9, "cost %.6f want %.6f (%g prompt tokens)", cost, want,
                       prompt);
}

/* So do its own input and output prices scale its entry's long-prompt
 * rates, in the entry's long-to-standard ratio: half off the standard
 * rates is half off a long prompt's too, cached tokens included, not the
 * entry's list price for them. */
Test(costs, own_prices_scale_the_entrys_long_context_rates)
{
    double prompt,
        cost = cost_over_entry("{input_usd_per_mtok: 400, output_usd_per_mtok: 800, "
                               "cached_input_usd_per_mtok: 100, long_context: "
                               "{above_prompt_tokens: 5, input_usd_per_mtok: 800, "
                               "output_usd_per_mtok: 1200, cached_input_usd_per_mtok: 400}}",
                               200, 400, &prompt);
    /* fresh at $400 (not the entry's $800), cached at $200, output at $600 */
    double want = ((prompt - 5) * 400 + 5 * 200 + 10 * 600) / 1e6;

    cr_assert_gt(prompt, 5, "a long prompt");
    cr_assert_float_eq(cost, want, 1e-9, "cost %.6f want %.6f (%g prompt tokens)", cost, want,
                       prompt);
}

Test(costs, streamed_cost_arrives_as_sse_comment_and_trailer)
{
    struct support_sse s = {0};
    struct support_sse_event ev;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    open_chat_stream(&s, AUTH "x-mock-tokens: 5\r\n",
                     "{\"model\":\"chat\",\"stream\":true," MSG "}");
    cr_assert_str_eq(support_http_header(&s.resp, "trailer"), "x-costrouter-cost-usd");
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
        ;
    /* The raw stream ends with the comment and the trailer. */
    char want[64], *p;
    snprintf(want, sizeof(want), "%.6f", usd(PROMPT_TOKENS, 5, 100, 300));
    p = memmem(s.resp.raw.data, s.resp.raw.len, ": x-costrouter-cost-usd=", 24);
    cr_assert_not_null(p, "no cost comment in the stream");
    cr_assert_eq(strncmp(p + 24, want, strlen(want)), 0, "comment says %.20s want %s", p + 24, want);
    p = memmem(s.resp.raw.data, s.resp.raw.len, "x-costrouter-cost-usd: ", 23);
    cr_assert_not_null(p, "no cost trailer");
    cr_assert_eq(strncmp(p + 23, want, strlen(want)), 0);
    support_sse_close(&s);
}

Test(costs, budget_reject_answers_429_with_remaining)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 100);
    /* Each request: 9 + 10 tokens at $100/Mtok = $0.0019; reserve with
     * max_tokens 10 is the same. $0.005 fits two, not three. */
    start_routers(1, "a", "    budget: {daily_usd: 0.005, on_exhausted: reject}\n");
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}";
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 429, "third request: %d", resp.status);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")->valuestring,
                     "budget_exhausted");
    cr_assert_float_eq(header_usd("x-costrouter-budget-remaining-usd"), 0.005 - 2 * 0.0019, 1e-9);
    /* Spent, not held: a retry cannot pass, so the SDKs are told not to. */
    cr_assert_str_eq(support_http_header(&resp, "x-should-retry"), "false");
    cr_assert_null(support_http_header(&resp, "retry-after"));
}

/* Today's budget overspent (a request without max_tokens ran long) and
 * this month's not: what is left is today's, nothing; not the month's. */
Test(costs, an_overspent_day_leaves_nothing_though_the_month_has_money)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    budget: {daily_usd: 0.005, monthly_usd: 100, on_exhausted: reject}\n");
    /* Admitted at 9 + 256 predicted tokens ($0.000265); it makes 6000:
     * $0.006009 settled, past the day's $0.005. */
    cr_assert_eq(chat(0, "x-mock-tokens: 6000\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 6000, 1, 1), 1e-9);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":10," MSG "}"), 0);
    cr_assert_eq(resp.status, 429);
    cr_assert_float_eq(header_usd("x-costrouter-budget-remaining-usd"), 0, 1e-9);
    cr_assert_str_eq(support_http_header(&resp, "x-should-retry"), "false");
    /* Without max_tokens, the message says what the hold was for. */
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 429);
    const char *msg = cJSON_GetStringValue(
        cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "message"));
    cr_assert_not_null(strstr(msg, "without max_tokens, was estimated at 256 tokens"), "%s", msg);
}

/* A budget of $0.001001 is 1001 micro-USD, though 0.001001 x 1e6 is
 * 1000.9999999999999 in doubles: a request that costs exactly that much
 * fits, and spends it all. At $1/Mtok both ways, 9 prompt tokens (counted
 * exactly, as the mock does) and
 * max_tokens 992 hold 9 + 992 = 1001 micro-USD and, the mock making all
 * 992, settle at as much. */
Test(costs, a_request_costing_exactly_the_budget_fits_and_spends_it_all)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_counted("a", mock_a.port, 1, 1, 1, "cl100k_base");
    start_routers(1, "a", "    budget: {daily_usd: 0.001001, on_exhausted: reject}\n");
    cr_assert_eq(chat(0, "x-mock-tokens: 992\r\n", "{\"model\":\"chat\",\"max_tokens\":992," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), 0.001001, 1e-9);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":1," MSG "}"), 0);
    cr_assert_eq(resp.status, 429);
    cr_assert_float_eq(header_usd("x-costrouter-budget-remaining-usd"), 0, 1e-9);
}

/* A budget of $0.0000004 is less than a micro-dollar, but a budget: to
 * the nearest micro-USD it was 0, which the policy and the store both
 * read as no budget at all, and the tenant spent without limit. It is 1
 * micro-USD, which no request fits in. */
Test(costs, a_budget_under_half_a_micro_dollar_is_not_unlimited)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    budget: {daily_usd: 0.0000004, on_exhausted: reject}\n");
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":1," MSG "}"), 0);
    cr_assert_eq(resp.status, 429, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(
                         cJSON_GetObjectItem(body_json(), "error"), "code")),
                     "budget_exhausted");
}

/* The admin API shows a budget as the router enforces it, in micro-USD
 * like the spend beside it: one under half a micro-dollar as the least
 * budget there is (1 micro-dollar, see the test above), one with digits
 * past the micro-dollar rounded to it. */
Test(costs, the_admin_api_shows_budgets_to_the_micro_dollar)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    budget: {daily_usd: 0.0000004, monthly_usd: 2.0000017}\n");
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cJSON *j = body_json();
    cr_assert_eq(cJSON_GetObjectItem(j, "day_budget_usd")->valuedouble, 1e-6, "%.*s",
                 (int)resp.body.len, resp.body.data);
    cr_assert_eq(cJSON_GetObjectItem(j, "month_budget_usd")->valuedouble, 2.000002, "%.*s",
                 (int)resp.body.len, resp.body.data);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants", ADMIN, NULL), 0);
    j = cJSON_GetArrayItem(body_json(), 0);
    cr_assert_eq(cJSON_GetObjectItem(j, "day_budget_usd")->valuedouble, 1e-6);
    cr_assert_eq(cJSON_GetObjectItem(j, "month_budget_usd")->valuedouble, 2.000002);
}

#define KEY_CI "sk-cost-ci"
#define KEY_WEB "sk-cost-web"

/* The tenant gets two named keys beside KEY: ci, with `ci_budget` (the
 * inside of its budget: mapping), and web, with none. */
static void key_ci_budget(const char *ci_budget)
{
    static char keys[512];
    char ci[65], web[65];

    support_key_sha256_hex(KEY_CI, ci);
    support_key_sha256_hex(KEY_WEB, web);
    snprintf(keys, sizeof(keys),
             ", {name: ci, hash: \"sha256:%s\", budget: {%s}}, {name: web, hash: \"sha256:%s\"}",
             ci, ci_budget, web);
    more_keys = keys;
}

/* Send `body` with `key` (NULL: KEY), the mock making 10 tokens; the status. */
static int key_chat(const char *key, const char *body)
{
    char headers[128];

    snprintf(headers, sizeof(headers), "Authorization: Bearer %s\r\nx-mock-tokens: 10\r\n",
             key ? key : KEY);
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions", headers, body), 0);
    return resp.status;
}

#define KEY_BODY "{\"model\":\"chat\",\"max_tokens\":10," MSG "}"

/* Wait until Redis holds nothing for the tenant: the answer reaches the
 * client before the settle that follows it reaches Redis. */
static void wait_settled_in_redis(void)
{
    for (int tries = 0; tries < 250; tries++) {
        if (test_redis_int(&redis, "HGET %s{%s}:open #", key_prefix ? key_prefix : "costrouter:",
                           tenant_id) <= 0)
            return;
        usleep(20000);
    }
    cr_assert_fail("the first request's hold is still in Redis");
}

/* A request held by router 0 for a second keeps the next, sent to router
 * `other`, under the budget: 429 with Retry-After, no x-should-retry:
 * false. Once the first has settled below what it held, the retry passes,
 * though `other` refused it from the store's numbers of an instant ago.
 * `period` is the budget's: "daily" or "monthly"; `key_ci` (when not
 * NULL: the key ci, see key_ci_budget) has it, and its tenant $10. */
static void budget_held_then_freed(int other, const char *period, const char *key_ci)
{
    struct support_http_conn slow = {.fd = -1};
    struct support_http_response slow_resp = {0};
    struct buf slow_req = {0};
    char budget[128], headers[160];
    const char *auth = key_ci ? "Authorization: Bearer " KEY_CI "\r\n" : AUTH;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 100);
    /* Reserving 9 + 10 tokens at $100/Mtok = $0.0019: one fits $0.003, two
     * do not. The first request settles at 9 + 1 tokens ($0.001). */
    snprintf(budget, sizeof(budget), "%s_usd: 0.003", period);
    if (key_ci)
        key_ci_budget(budget);
    snprintf(budget, sizeof(budget), "    budget: {%s_usd: %s, on_exhausted: reject}\n", period,
             key_ci ? "10" : "0.003");
    start_routers(other + 1, "a", budget);
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}";
    snprintf(headers, sizeof(headers), "%sx-mock-tokens: 1\r\nx-mock-ttft-ms: 1000\r\n", auth);
    send_unanswered(&slow, &slow_req, headers, body);
    usleep(300 * 1000); /* reserved and sent upstream by now */

    snprintf(headers, sizeof(headers), "%sx-mock-tokens: 1\r\n", auth);
    cr_assert_eq(call_port(routers[other].port, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(resp.status, 429, "while the first is in flight: %d", resp.status);
    cr_assert_str_eq(support_http_header(&resp, "retry-after"), "1");
    cr_assert_null(support_http_header(&resp, "x-should-retry"));
    /* No backend took it: refused in Redis after its choice, it was
     * counted (and timed) as backend a's 429, in the cost log too. */
    cr_assert_eq(call_port(routers[other].port, "GET", "/metrics", ADMIN, NULL), 0);
    static const char refused[] = "costrouter_requests_total{tenant=\"acme\",backend=\"none\","
                                  "route=\"chat\",status=\"429\"} 1";
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, refused, sizeof(refused) - 1), "%.*s",
                       (int)resp.body.len, resp.body.data);
    static const char as_a[] = "backend=\"a\",route=\"chat\",status=\"429\"";
    cr_assert_null(memmem(resp.body.data, resp.body.len, as_a, sizeof(as_a) - 1), "%.*s",
                   (int)resp.body.len, resp.body.data);

    cr_assert_eq(support_http_read(&slow, &slow_resp, TIMEOUT_MS), 0);
    cr_assert_eq(slow_resp.status, 200);
    if (redis.pid)
        wait_settled_in_redis();
    cr_assert_eq(call_port(routers[other].port, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(resp.status, 200, "the retry after the first settled: %d %.*s", resp.status,
                 (int)resp.body.len, resp.body.data);
    support_http_close(&slow);
    support_http_response_free(&slow_resp);
    buf_free(&slow_req);
}

Test(costs, budget_held_by_a_request_in_flight_answers_429_worth_a_retry)
{
    budget_held_then_freed(0, "daily", NULL);
}

Test(costs, budget_held_on_another_instance_is_checked_in_redis_before_a_429)
{
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    budget_held_then_freed(1, "daily", NULL);
}

/* The same with a monthly budget alone: the store checks the month's. */
Test(costs, a_monthly_budget_held_on_another_instance_is_checked_in_redis)
{
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    budget_held_then_freed(1, "monthly", NULL);
}

/* The same with the key's own budget: its numbers too are read again
 * before a 429. */
Test(costs, a_keys_budget_held_on_another_instance_is_checked_in_redis)
{
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    budget_held_then_freed(1, "daily", "ci");
}

/* The first request holds $0.10 and settles at a hundredth of a cent: the
 * second, though the numbers from the first's reservation say $0.05 is
 * left, finds the money in the store and is not downgraded. */
Test(costs, a_settled_hold_does_not_downgrade_the_next_request)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("good", mock_a.port, 3, 1, 100); /* max_tokens 1000: $0.10 held */
    add_backend("cheap", mock_b.port, 1, 1, 1);
    start_routers(1, "good, cheap",
                  "    budget: {daily_usd: 0.15, on_exhausted: downgrade}\n"
                  "    slo: {min_quality: 2}\n");
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":1000," MSG "}";
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(chat(0, "x-mock-tokens: 1\r\n", body), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good",
                         "request %d: %s", i, support_http_header(&resp, "x-costrouter-reason"));
    }
}

/* A good backend at $0.019 a request and a cheap one at $0.00019 below
 * the tenant's quality floor, with `budget` for the tenant (downgrade),
 * and `n` routers. */
static void start_good_and_cheap(int n, const char *budget)
{
    char tenant[128];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("good", mock_a.port, 3, 1000, 1000);
    add_backend("cheap", mock_b.port, 1, 10, 10);
    snprintf(tenant, sizeof(tenant),
             "    budget: {%s, on_exhausted: downgrade}\n    slo: {min_quality: 2}\n", budget);
    start_routers(n, "good, cheap", tenant);
}

Test(costs, exhausted_budget_downgrades_below_the_quality_floor)
{
    start_good_and_cheap(1, "daily_usd: 0.03");
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}";
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good");
    /* $0.011 left: "good" no longer fits, "cheap" does. */
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "downgraded-budget");
}

/* Good at $1000/Mtok each way, cheap at $10 below the floor of 2, one
 * router, the tenant's `budget` mapping. */
static void start_good_and_cheap_floor(const char *budget)
{
    char tenant[128];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("good", mock_a.port, 3, 1000, 1000);
    add_backend("cheap", mock_b.port, 1, 10, 10);
    snprintf(tenant, sizeof(tenant), "    budget: {%s}\n    slo: {min_quality: 2}\n", budget);
    start_routers(1, "good, cheap", tenant);
}

/* Three requests by ci at $0.019 to good, then, past half of its $0.1,
 * the fourth goes to cheap; the key web, without a budget, to good. */
static void soft_limit_of_key_ci(void)
{
    /* 9 + 10 tokens at $1000/Mtok: $0.019 each, $0.057 of the key's $0.1
     * after three (57%), and $0.043 left: good still fits. */
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good");
    }
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "downgraded-soft-limit");
    cr_assert_eq(key_chat(KEY_WEB, KEY_BODY), 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "cheapest-qualifying");
    more_keys = "";
}

/* A key past its tenant's soft limit of its own budget is downgraded
 * below the floor (README: "one at its soft limit earlier"), while the
 * tenant's other keys, far from the tenant's, are not. */
Test(costs, a_key_at_the_soft_limit_of_its_own_budget_is_downgraded)
{
    key_ci_budget("daily_usd: 0.1");
    start_good_and_cheap_floor("daily_usd: 100, soft_limit_pct: 50");
    soft_limit_of_key_ci();
}

/* The same for a tenant with no budget of its own: its soft_limit_pct
 * is for its keys' budgets (README: "Its tenant's on_exhausted,
 * soft_limit_pct and on_overrun apply to it"). The config was refused:
 * "soft_limit_pct: needs a budget". */
Test(costs, a_tenant_without_a_budget_gives_its_keys_a_soft_limit)
{
    key_ci_budget("daily_usd: 0.1");
    start_good_and_cheap_floor("soft_limit_pct: 50");
    soft_limit_of_key_ci();
}

/* A burst with Redis as the store: the holds asked and not answered yet
 * count, so the soft limit holds as it does with the in-process store.
 * Good costs $0.019 a request; past 20% of $1, after 11 of them, the rest
 * go to cheap. Each request chose by the store's answer to the one before
 * alone, and 40 at once sent as many to good as a round trip let through. */
Test(costs, a_burst_keeps_to_the_soft_limit_with_redis)
{
    struct support_http_conn conn[40];
    struct support_http_response r[40] = {0};
    struct buf out[40] = {0};
    int good = 0;

    cr_assert_eq(test_redis_start(&redis, 0), 0);
    start_good_and_cheap_floor("daily_usd: 1, soft_limit_pct: 20");
    for (int i = 0; i < 40; i++) {
        conn[i].fd = -1;
        send_unanswered(&conn[i], &out[i], AUTH "x-mock-tokens: 10\r\n",
                        "{\"model\":\"chat\",\"max_tokens\":10," MSG "}");
    }
    for (int i = 0; i < 40; i++) {
        cr_assert_eq(support_http_read(&conn[i], &r[i], TIMEOUT_MS), 0);
        cr_assert_eq(r[i].status, 200);
        good += strcmp(support_http_header(&r[i], "x-costrouter-backend"), "good") == 0;
        support_http_close(&conn[i]);
        support_http_response_free(&r[i]);
        buf_free(&out[i]);
    }
    cr_assert(good <= 11, "%d requests to good, past the soft limit", good);
}

/* 1 message of 30 words: 3 + 4 + 30 = 37 prompt tokens, past the long
 * tiers of 20 below. */
#define LONG_MSG                                                                             \
    "\"messages\":[{\"role\":\"user\",\"content\":\"a b c d e f g h i j k l m n o p q r s t u " \
    "v w x y z a b c d\"}]"
#define LONG_PROMPT_TOKENS 37
#define LONG_TIER ", long_context: {above_prompt_tokens: 20, input_usd_per_mtok: 10, " \
                  "output_usd_per_mtok: 20}"

/* A prompt past a backend's long_context size is billed, every token of
 * it, at the tier's rates, and held at them: the budget that fits a
 * long request at the base rates many times over holds only one. */
Test(costs, a_long_prompt_is_billed_and_held_at_the_long_context_rates)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with("a", mock_a.port, 1, 1, 2, "cl100k_base", LONG_TIER);
    start_routers(1, "a", "    budget: {daily_usd: 0.001, on_exhausted: reject}\n");
    const char short_body[] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}";
    const char long_body[] = "{\"model\":\"chat\",\"max_tokens\":10," LONG_MSG "}";

    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", short_body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 10, 1, 2), 1e-9,
                       "9 tokens: the base rates");
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", long_body), 0);
    cr_assert_eq(resp.status, 200);
    /* 37 x 10 + 10 x 20 = 570 micro-USD, where the base rates give 57 */
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(LONG_PROMPT_TOKENS, 10, 10, 20),
                       1e-9);
    /* $0.001 - 29 - 570 micro left: less than a long request's hold (570
     * or more), more than ten of them at the base rates */
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", long_body), 0);
    cr_assert_eq(resp.status, 429, "a second long request: %d", resp.status);
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", short_body), 0);
    cr_assert_eq(resp.status, 200, "a short one still fits");
}

/* Routing ranks candidates by what the prompt would cost on each: a long
 * prompt leaves the backend that is cheaper only for short ones. */
Test(costs, a_long_prompt_goes_where_it_costs_least_at_its_size)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend_with("tiered", mock_a.port, 1, 1, 2, "cl100k_base", LONG_TIER);
    add_backend_counted("flat", mock_b.port, 1, 5, 5, "cl100k_base");
    start_routers(1, "tiered, flat", NULL);

    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", "{\"model\":\"chat\",\"max_tokens\":10," MSG "}"),
                 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "tiered");
    cr_assert_eq(
        chat(0, "x-mock-tokens: 10\r\n", "{\"model\":\"chat\",\"max_tokens\":10," LONG_MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "flat");
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(LONG_PROMPT_TOKENS, 10, 5, 5),
                       1e-9);
}

/* Service tiers: a backend's standard rates 2 / 4, flex 1 / 2, priority
 * 6 / 12 (USD per 1M tokens). 9 prompt and 10 completion tokens cost 58
 * micro-USD standard, 29 flex, 174 priority. */
#define TIERS ", flex: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}, " \
              "priority: {input_usd_per_mtok: 6, output_usd_per_mtok: 12}"
#define TIER_BODY(tier, more) \
    "{\"model\":\"chat\",\"max_tokens\":10,\"service_tier\":\"" tier "\"" more "," MSG "}"

static double trailer_usd(void);

/* The cost log's "service_tier" of its last line ("-" when absent); the
 * routers must have stopped. */
static const char *logged_tier(void)
{
    static char tier[16];
    cJSON *rec = record_last(NULL, log_path);
    const cJSON *t = cJSON_GetObjectItem(rec, "service_tier");

    snprintf(tier, sizeof(tier), "%s", cJSON_IsString(t) ? t->valuestring : "-");
    cJSON_Delete(rec);
    return tier;
}

/* A request asking for a tier is held at the tier's rates: a budget that
 * fits a standard request refuses a priority one before it is sent, and
 * a flex one is billed at the flex rates, which the cost log names. */
Test(costs, a_request_for_a_service_tier_is_held_and_billed_at_its_rates)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with("a", mock_a.port, 1, 2, 4, "cl100k_base", TIERS);
    start_routers(1, "a", "    budget: {daily_usd: 0.0001, on_exhausted: reject}\n");

    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", TIER_BODY("priority", "")), 0);
    cr_assert_eq(resp.status, 429, "174 micro-USD held where 100 are left: %d", resp.status);
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", TIER_BODY("flex", "")), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 10, 1, 2), 1e-9);
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", "{\"model\":\"chat\",\"max_tokens\":10," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200, "58 micro-USD held where 71 are left: %d", resp.status);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 10, 2, 4), 1e-9);
    support_proc_stop(&routers[0]);
    cr_assert_str_eq(logged_tier(), "-", "the standard rates are not named");
}

/* What the answer says it was billed at decides: a priority request run
 * at default costs the standard rates, an "auto" one run at flex the
 * flex rates; the same read from a stream's chunks and from Responses
 * answers, whole and streamed. */
Test(costs, the_answers_service_tier_decides_the_bill)
{
    static const char responses_body[] =
        "{\"model\":\"chat\",\"input\":\"hello there\",\"stream\":%s}";
    char body[128];
    const cJSON *usage;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with("a", mock_a.port, 1, 2, 4, "cl100k_base", TIERS);
    start_routers(1, "a", NULL);

    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\nx-mock-service-tier: default\r\n",
                      TIER_BODY("priority", "")),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 10, 2, 4), 1e-9,
                       "run at default: the standard rates");
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\nx-mock-service-tier: flex\r\n",
                      TIER_BODY("auto", "")),
                 0);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 10, 1, 2), 1e-9);
    /* streamed: every chunk names the tier, the usage comes last */
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\nx-mock-service-tier: priority\r\n",
                      "{\"model\":\"chat\",\"stream\":true," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_float_eq(trailer_usd(), usd(PROMPT_TOKENS, 10, 6, 12), 1e-9);
    /* the Responses API: the tier in the response object */
    for (int stream = 0; stream < 2; stream++) {
        snprintf(body, sizeof(body), responses_body, stream ? "true" : "false");
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/responses",
                               AUTH "x-mock-tokens: 10\r\nx-mock-service-tier: flex\r\n", body),
                     0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        if (stream) {
            cr_assert_float_eq(trailer_usd(), usd(PROMPT_TOKENS, 10, 1, 2), 1e-9, "streamed: 3 + 4 + 2 tokens");
            continue;
        }
        usage = cJSON_GetObjectItem(body_json(), "usage");
        cr_assert_float_eq(header_usd("x-costrouter-cost-usd"),
                           usd(cJSON_GetObjectItem(usage, "input_tokens")->valuedouble,
                               cJSON_GetObjectItem(usage, "output_tokens")->valuedouble, 1, 2),
                           1e-9, "whole");
    }
    support_proc_stop(&routers[0]);
    cr_assert_str_eq(logged_tier(), "flex");
}

/* Routing prices each candidate at the tier asked for: the backend that
 * is dearer at the standard rates wins a flex request with its flex
 * rates; one without flex rates is priced at its standard ones. */
Test(costs, a_flex_request_goes_where_flex_costs_least)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend_with("tiered", mock_a.port, 1, 2, 4, "cl100k_base", TIERS);
    add_backend_counted("flat", mock_b.port, 1, 1.5, 3, "cl100k_base");
    start_routers(1, "tiered, flat", NULL);

    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", "{\"model\":\"chat\",\"max_tokens\":10," MSG "}"),
                 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "flat");
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", TIER_BODY("flex", "")), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "tiered");
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 10, 1, 2), 1e-9);
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", TIER_BODY("priority", "")), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "flat",
                     "no priority rates: its standard ones");
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), usd(PROMPT_TOKENS, 10, 1.5, 3), 1e-9);
    support_proc_stop(&routers[0]);
    cr_assert_str_eq(logged_tier(), "-", "billed at flat's standard rates");
}

/* A client that leaves mid-stream: 499 in the cost log and the metrics
 * (not the upstream's 200), charged for what was streamed. */
Test(costs, a_client_leaving_mid_stream_is_logged_499)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    char line[4096];
    FILE *f;
    cJSON *rec;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    open_chat_stream(&s, AUTH "x-mock-tokens: 50\r\nx-mock-token-delay-ms: 20\r\n",
                     "{\"model\":\"chat\",\"stream\":true," MSG "}");
    for (int i = 0; i < 3; i++)
        cr_assert_eq(support_sse_next(&s, &ev, TIMEOUT_MS), 1);
    support_sse_close(&s);
    usleep(300 * 1000);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    static const char series[] =
        "costrouter_requests_total{tenant=\"acme\",backend=\"a\",route=\"chat\",status=\"499\"} 1";
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, series, sizeof(series) - 1), "%.*s",
                       (int)resp.body.len, resp.body.data);
    support_proc_stop(&routers[0]);
    f = fopen(log_path, "r");
    cr_assert_not_null(f);
    cr_assert_not_null(fgets(line, sizeof(line), f), "cost log is empty");
    fclose(f);
    rec = cJSON_Parse(line);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 499, "%s", line);
    cr_assert_gt(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, usd(PROMPT_TOKENS, 0, 100, 300));
    cJSON_Delete(rec);
}

/* With a cache per tenant (the default), a request identical to another
 * tenant's in flight is not joined to it: it goes upstream and is charged
 * to its own tenant, who learns nothing of the other's prompt. */
Test(costs, single_flight_does_not_join_two_tenants)
{
    struct support_http_conn slow = {.fd = -1};
    struct support_http_response slow_resp = {0};
    struct buf slow_req = {0};
    char tenants[256], hex[65];
    const char body[] = "{\"model\":\"chat\",\"temperature\":0," MSG "}";

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    support_key_sha256_hex("sk-other-tenant", hex);
    snprintf(tenants, sizeof(tenants), "  - id: other\n    api_keys: [\"sha256:%s\"]\n", hex);
    start_routers(1, "a", tenants);
    send_unanswered(&slow, &slow_req, AUTH "x-mock-ttft-ms: 1000\r\n", body);
    usleep(300 * 1000); /* the first is upstream, the flight's leader */
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions",
                           "Authorization: Bearer sk-other-tenant\r\n", body),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a",
                     "joined the other tenant's request");
    cr_assert_gt(header_usd("x-costrouter-cost-usd"), 0);
    cr_assert_eq(support_http_read(&slow, &slow_resp, TIMEOUT_MS), 0);
    cr_assert_eq(slow_resp.status, 200);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 2);
    support_http_close(&slow);
    support_http_response_free(&slow_resp);
    buf_free(&slow_req);
}

/* The store is made once, at start: a reload that moves it (here from
 * in-process to Redis) is refused, saying which key, never its value (a
 * Redis URL may hold a password); other changes still reload. */
Test(costs, a_reload_that_changes_the_store_is_refused)
{
    const char *msg;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    top_extra = "store: {redis: \"redis://:pw-in-url@127.0.0.1:1\"}\n";
    write_conf("a", NULL);
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 400, "%.*s", (int)resp.body.len, resp.body.data);
    msg = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "message"));
    cr_assert_not_null(strstr(msg, "store.redis cannot change without a restart"), "%s", msg);
    /* OpenAI-style, as every error: message, type, param (null), code. */
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetObjectItem(json, "error"), "param")),
              "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(json, "error"),
                                                              "code")),
                     "invalid_config");
    cr_assert_null(memmem(resp.body.data, resp.body.len, "pw-in-url", 9));
    top_extra = "";
    write_conf("a", "    budget: {daily_usd: 0.000001, on_exhausted: reject}\n");
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":10," MSG "}"), 0);
    cr_assert_eq(resp.status, 429, "the new budget applies");
}

Test(costs, deterministic_requests_are_served_from_the_cache)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int events[2] = {0, 0};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    const char body[] = "{\"model\":\"chat\",\"temperature\":0," MSG "}";
    cr_assert_eq(chat(0, "x-mock-tokens: 4\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    double paid = header_usd("x-costrouter-cost-usd");
    struct buf first = {0};
    cr_assert_eq(buf_append(&first, resp.body.data, resp.body.len), 0);
    cr_assert_eq(chat(0, "x-mock-tokens: 4\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), 0, 1e-12);
    cr_assert_float_eq(header_usd("x-costrouter-saved-usd"), paid, 1e-9);
    cr_assert_eq(resp.body.len, first.len);
    cr_assert_eq(memcmp(resp.body.data, first.data, first.len), 0, "replay differs");
    buf_free(&first);
    /* The metrics say so too, as the cost log does. */
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    static const char hit[] =
        "costrouter_requests_total{tenant=\"acme\",backend=\"cache\",route=\"chat\",status=\"200\"} 1\n";
    static const char miss[] =
        "costrouter_requests_total{tenant=\"acme\",backend=\"a\",route=\"chat\",status=\"200\"} 1\n";
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, hit, sizeof(hit) - 1), "%.*s",
                       (int)resp.body.len, resp.body.data);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, miss, sizeof(miss) - 1));

    /* Streams are cached apart and replayed as SSE. */
    const char sbody[] = "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}";
    for (int round = 0; round < 2; round++) {
        open_chat_stream(&s, AUTH, sbody);
        if (round == 1) {
            cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), "cache");
            cr_assert_str_eq(support_http_header(&s.resp, "content-type"), "text/event-stream");
        }
        while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
            events[round]++;
        /* Its cost at its end, as every stream's: the client that reads
         * it there reads the hit's (nothing) too. */
        if (round == 1)
            cr_assert_not_null(memmem(s.resp.raw.data, s.resp.raw.len,
                                      "\n: x-costrouter-cost-usd=0.000000\n\n", 35),
                               "no cost comment in the replay: %.*s", (int)s.resp.raw.len,
                               s.resp.raw.data);
        support_sse_close(&s);
    }
    cr_assert_eq(events[0], events[1]);
    cr_assert_gt(events[0], 2);
    /* A client asking for the usage event gets it: its streams are cached
     * apart from those of clients that did not ask. */
    const char ubody[] = "{\"model\":\"chat\",\"temperature\":0,\"stream\":true,"
                         "\"stream_options\":{\"include_usage\":true}," MSG "}";
    for (int round = 0; round < 2; round++) {
        int usage = 0;

        open_chat_stream(&s, AUTH, ubody);
        cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), round ? "cache" : "a");
        while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
            usage |= strstr(ev.data, "\"usage\":{") != NULL;
        support_sse_close(&s);
        cr_assert(usage, "round %d: no usage event", round);
    }
    /* The upstream saw three requests: plain, stream, stream with usage. */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 3);
}

/* The other members of stream_options change the events too: OpenAI's
 * include_obfuscation: false drops the `obfuscation` padding of every
 * chunk (a client that did not say it wants the padding that hides its
 * tokens' lengths), vLLM's continuous_usage_stats puts the usage in each
 * chunk. A stream that asked for one is no replay for one that did not.
 * Members at their default (include_usage: false, include_obfuscation:
 * true) ask nothing: the same entry as none. */
Test(costs, stream_options_are_in_the_cache_key)
{
    static const struct {
        const char *opts; /* the stream_options member, or "" */
        const char *backend; /* who answers */
    } rounds[] = {
        {"\"stream_options\":{\"include_obfuscation\":false},", "a"},
        {"", "a"},
        {"\"stream_options\":{\"continuous_usage_stats\":true},", "a"},
        {"\"stream_options\":{\"include_obfuscation\":false},", "cache"},
        {"\"stream_options\":{\"include_usage\":false,\"include_obfuscation\":true},", "cache"},
        {"\"stream_options\":{},", "cache"},
        {"\"stream_options\":null,", "cache"},
    };
    struct support_sse s = {0};
    struct support_sse_event ev;
    char body[512];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    for (size_t i = 0; i < sizeof(rounds) / sizeof(rounds[0]); i++) {
        snprintf(body, sizeof(body),
                 "{\"model\":\"chat\",\"temperature\":0,\"stream\":true,%s" MSG "}",
                 rounds[i].opts);
        open_chat_stream(&s, AUTH, body);
        cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), rounds[i].backend,
                         "round %zu: %s", i, rounds[i].opts);
        while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
            ;
        support_sse_close(&s);
    }
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 3);
}

/* A tenant past its budget is refused every request, one whose answer
 * is in the cache too (it would cost nothing): the budget is checked
 * before the lookup, as LiteLLM and Portkey refuse an exhausted key's
 * requests, and the budget_exhausted answer (x-should-retry: false) is
 * the same whatever the cache holds. Before that, hits are served. */
Test(costs, a_tenant_past_its_budget_is_refused_a_cached_answer_too)
{
    /* Each request: 9 + 10 tokens at $100/Mtok = $0.0019: two fit. */
    static const char cached[] = "{\"model\":\"chat\",\"max_tokens\":10,\"temperature\":0," MSG "}";
    static const char other[] = "{\"model\":\"chat\",\"max_tokens\":10,\"seed\":1," MSG "}";
    static const struct {
        const char *body;
        int status;
        const char *backend;
    } rounds[] = {
        {cached, 200, "a"}, {cached, 200, "cache"}, {other, 200, "a"}, {cached, 429, NULL},
    };

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 100);
    start_routers(1, "a", "    budget: {daily_usd: 0.005, on_exhausted: reject}\n");
    for (size_t i = 0; i < sizeof(rounds) / sizeof(rounds[0]); i++) {
        cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", rounds[i].body), 0);
        cr_assert_eq(resp.status, rounds[i].status, "round %zu: %d", i, resp.status);
        if (rounds[i].backend)
            cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"),
                             rounds[i].backend, "round %zu", i);
    }
    cr_assert_str_eq(
        cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")->valuestring,
        "budget_exhausted");
}

/* Value of the unlabelled metric `name` in resp's /metrics body, or -1. */
static double metric_value(const char *name)
{
    char want[128];
    const char *p;

    snprintf(want, sizeof(want), "\n%s ", name);
    p = memmem(resp.body.data, resp.body.len, want, strlen(want));
    return p ? strtod(p + strlen(want), NULL) : -1;
}

/* A stream's ttft_ms is to its first token (README): a stream whose head
 * came at once (vLLM's) and whose client left before any token, having
 * seen nothing (the head is held until the first event), has none. It
 * was logged with the head's arrival (~2 ms) and observed so in
 * costrouter_ttft_seconds: a backend stuck before its first token looked
 * the fastest there. Unknown, as the README says such values are: null,
 * and no sample. */
Test(costs, a_stream_left_before_its_first_token_has_no_ttft)
{
    struct support_http_conn conn = {.fd = -1};
    struct buf out = {0};
    cJSON *rec;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    send_unanswered(&conn, &out, AUTH "x-mock-head-first: 1\r\nx-mock-ttft-ms: 3000\r\n",
                    "{\"model\":\"chat\",\"stream\":true," MSG "}");
    usleep(400 * 1000); /* the head came; the first token is 2.6 s away */
    support_http_close(&conn);
    usleep(300 * 1000);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    double samples = metric_value("costrouter_ttft_seconds_count{backend=\"a\"}");
    cr_assert(samples <= 0, "a TTFT sample of a stream without a token: %.*s", (int)resp.body.len,
              resp.body.data);
    support_proc_stop(&routers[0]);
    rec = support_last_json_line(log_path);
    cr_assert_not_null(rec);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 499);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(rec, "ttft_ms")), "ttft_ms %g",
              cJSON_GetObjectItem(rec, "ttft_ms")->valuedouble);
    cJSON_Delete(rec);
    buf_free(&out);
}

Test(costs, inflight_gauge_counts_requests_until_answered)
{
    struct support_http_conn slow = {.fd = -1};
    struct support_http_response slow_resp = {0};
    struct buf slow_req = {0};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", NULL);
    send_unanswered(&slow, &slow_req, AUTH "x-mock-ttft-ms: 1000\r\n", "{\"model\":\"chat\"," MSG "}");
    usleep(300 * 1000);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value("costrouter_inflight_requests"), 1, "%.*s", (int)resp.body.len,
                 resp.body.data);
    cr_assert_eq(support_http_read(&slow, &slow_resp, TIMEOUT_MS), 0);
    cr_assert_eq(slow_resp.status, 200);
    /* A refused one (unknown model) and an answered one leave it at 0. */
    cr_assert_eq(chat(0, NULL, "{\"model\":\"nope\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value("costrouter_inflight_requests"), 0);
    support_http_close(&slow);
    support_http_response_free(&slow_resp);
    buf_free(&slow_req);
}

/* The remaining-budget gauges count from the budget as enforced, as the
 * admin API shows it (see the_admin_api_shows_budgets_to_the_micro_dollar). */
Test(costs, the_budget_gauges_count_from_the_budget_to_the_micro_dollar)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    budget: {daily_usd: 0.0000004, monthly_usd: 2.0000017}\n");
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(
        metric_value("costrouter_budget_remaining_usd{tenant=\"acme\",period=\"day\"}"), 1e-6,
        "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(
        metric_value("costrouter_budget_remaining_usd{tenant=\"acme\",period=\"month\"}"),
        2.000002, "%.*s", (int)resp.body.len, resp.body.data);
}

/* The spend gauges count every settled request, the last one too. */
Test(costs, spend_gauges_count_the_last_request)
{
    double paid = 0;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert_eq(resp.status, 200);
        paid += header_usd("x-costrouter-cost-usd");
    }
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_float_eq(metric_value("costrouter_budget_spent_usd{tenant=\"acme\",period=\"day\"}"),
                       paid, 1e-9, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(
        metric_value("costrouter_budget_remaining_usd{tenant=\"acme\",period=\"day\"}"),
        10 - paid, 1e-9);
}

/* Start one router before backend "a" ($100/$300 per Mtok) with the
 * tenant's `budget` line, send it one chat; returns what it cost. */
static double one_paid_chat(const char *budget)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", budget);
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    return header_usd("x-costrouter-cost-usd");
}

/* A reload keeps what the spend gauges say: the tenant's spend is the
 * same before and after it, not 0 until its next request. */
Test(costs, spend_gauges_survive_a_reload)
{
    static const char spent[] = "costrouter_budget_spent_usd{tenant=\"acme\",period=\"month\"}";
    static const char left[] = "costrouter_budget_remaining_usd{tenant=\"acme\",period=\"day\"}";

    double paid = one_paid_chat("    budget: {daily_usd: 10}\n");

    cr_assert_gt(paid, 0);
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_float_eq(metric_value(spent), paid, 1e-9, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(metric_value(left), 10 - paid, 1e-9);
}

/* A reload that drops the tenant's monthly budget drops its monthly
 * remaining gauge, and one that drops a tenant drops its gauges: not
 * left at their last value. */
Test(costs, a_reload_drops_the_gauges_of_what_it_removed)
{
    static const char month_left[] = "costrouter_budget_remaining_usd{tenant=\"acme\",period=\"month\"}";
    static const char acme[] = "{tenant=\"acme\"";
    static const char acme_spent[] = "budget_spent_usd{tenant=\"acme\"";

    one_paid_chat("    budget: {daily_usd: 10, monthly_usd: 100}\n");
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_gt(metric_value(month_left), 99);
    write_conf("a", "    budget: {daily_usd: 10}\n");
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value(month_left), -1, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_gt(metric_value("costrouter_budget_remaining_usd{tenant=\"acme\",period=\"day\"}"), 9);

    tenant_id = "other";
    write_conf("a", NULL);
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_null(memmem(resp.body.data, resp.body.len, acme_spent, sizeof(acme_spent) - 1),
                   "%.*s", (int)resp.body.len, resp.body.data);
    /* Its counters stay: they are what it cost. */
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, acme, sizeof(acme) - 1));
}

/* A /metrics asked on a connection accepted before a reload is answered
 * by the config it came in on; the gauges it sets must still be the
 * current config's: one that drops a tenant drops its gauges for good,
 * not until the first scrape that an old connection answers. */
Test(costs, a_scrape_on_a_connection_from_before_a_reload_brings_no_dropped_gauge_back)
{
    static const char acme_spent[] = "budget_spent_usd{tenant=\"acme\"";
    struct support_http_conn old = {0};
    struct support_http_response old_resp = {0};
    struct buf scrape = {0};

    one_paid_chat("    budget: {daily_usd: 10}\n");
    cr_assert_eq(support_http_connect(&old, routers[0].port), 0);
    usleep(200000); /* accepted by the router on the config of now */
    tenant_id = "other";
    write_conf("a", NULL);
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(support_http_format(&scrape, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(support_http_send(&old, scrape.data, scrape.len), 0);
    cr_assert_eq(support_http_read(&old, &old_resp, TIMEOUT_MS), 0);
    cr_assert_eq(old_resp.status, 200);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_null(memmem(resp.body.data, resp.body.len, acme_spent, sizeof(acme_spent) - 1),
                   "the dropped tenant's gauges are back: %.*s", (int)resp.body.len,
                   resp.body.data);
    support_http_close(&old);
    support_http_response_free(&old_resp);
    buf_free(&scrape);
}

static void reload_router(void);

/* Scrape router 0 until `series` is gone from /metrics, for up to 2 s (a
 * reload's old generation closes its idle backend connections on the
 * loop, a little after the reload's answer). Returns 1 if it went. */
static int metric_goes(const char *series)
{
    for (int i = 0; i < 40; i++) {
        cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
        if (memmem(resp.body.data, resp.body.len, series, strlen(series)) == NULL)
            return 1;
        usleep(50000);
    }
    return 0;
}

/* A reload that removes a backend drops its open-connections and
 * estimate-ratio gauges once its connections are closed (they stayed at
 * their last value for ever); a backend the reload keeps keeps its
 * estimate ratio, not gone until its next request. */
Test(costs, a_reload_drops_the_gauges_of_a_removed_backend)
{
    static const char b_conns[] = "costrouter_upstream_connections{backend=\"b\"}";
    static const char b_ratio[] = "costrouter_token_estimate_ratio{backend=\"b\"}";
    static const char a_conns[] = "costrouter_upstream_connections{backend=\"a\"}";
    static const char a_ratio[] = "costrouter_token_estimate_ratio{backend=\"a\"}";
    static const char b_counted[] = "{tenant=\"acme\",backend=\"b\"";

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    add_backend("b", mock_a.port, 1, 100, 300);
    start_routers(1, "b", NULL);
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    write_conf("a", NULL);
    reload_router();
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_neq(metric_value(b_ratio), -1, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(metric_value(a_conns), 1);
    double ratio = metric_value(a_ratio);
    cr_assert_gt(ratio, 0);

    buf_reset(&yaml);
    add_backend("a", mock_a.port, 1, 100, 300);
    write_conf("a", NULL);
    reload_router();
    cr_assert(metric_goes(b_conns), "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_null(memmem(resp.body.data, resp.body.len, b_ratio, sizeof(b_ratio) - 1));
    cr_assert_eq(metric_value(a_ratio), ratio, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_neq(metric_value(a_conns), -1);
    /* Its counters stay: they are what it did. */
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, b_counted, sizeof(b_counted) - 1));
}

/* Have the routers run with their wall clock started at `when` (UTC),
 * their loop's monotonic clock left alone. libfaketime is preloaded, not
 * run through the faketime command, which forks: its child would outlive
 * the stop. ASan wants its runtime first in the list; the loader expands
 * $LIB. */
static void run_from(const char *when)
{
    static char words[512];

    snprintf(words, sizeof(words),
             "env ASAN_OPTIONS=\"${ASAN_OPTIONS:+$ASAN_OPTIONS:}verify_asan_link_order=0\" "
             "LD_PRELOAD='/usr/$LIB/faketime/libfaketimeMT.so.1' "
             "FAKETIME='@%s' FAKETIME_DONT_FAKE_MONOTONIC=1",
             when);
    run_under = words;
}

/* One paid chat to a router whose clock starts at `when`, two seconds
 * before a midnight, then the tenant idle past it: `period` ("day" or
 * "month") has its spend gauge at the chat's cost before and at 0 after,
 * in the admin answer (the store's numbers) too. Returns the cost; the
 * last /metrics answer stays in resp. */
static double paid_then_idle_past_midnight(const char *when, const char *period)
{
    char gauge[128], field[16];

    run_from(when);
    double paid = one_paid_chat("    budget: {daily_usd: 10, monthly_usd: 100}\n");

    cr_assert_gt(paid, 0);
    snprintf(gauge, sizeof(gauge), "costrouter_budget_spent_usd{tenant=\"acme\",period=\"%s\"}",
             period);
    snprintf(field, sizeof(field), "%s_usd", period);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_float_eq(metric_value(gauge), paid, 1e-9, "before midnight");
    usleep(2500 * 1000);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), field)->valuedouble, 0, "not past midnight");
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value(gauge), 0, "%.*s", (int)resp.body.len, resp.body.data);
    return paid;
}

/* Past UTC midnight, a tenant idle since yesterday has spent nothing
 * today: the day's spend gauge says 0 and the day's budget is whole
 * again, while the month's spend stays (a midnight that is no month's
 * end). */
Test(costs, spend_gauges_start_a_new_day_at_midnight)
{
    double paid = paid_then_idle_past_midnight("2026-12-06 23:59:58", "day");

    cr_assert_float_eq(
        metric_value("costrouter_budget_remaining_usd{tenant=\"acme\",period=\"day\"}"), 10, 1e-9);
    cr_assert_float_eq(
        metric_value("costrouter_budget_spent_usd{tenant=\"acme\",period=\"month\"}"), paid, 1e-9);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "month_usd")->valuedouble, paid, 1e-9,
                       "the store kept the month's spend");
}

/* Past the midnight that ends a month, the month's spend is 0 too and
 * its budget whole again. */
Test(costs, spend_gauges_start_a_new_month_at_its_first_midnight)
{
    paid_then_idle_past_midnight("2026-11-30 23:59:58", "month");
    cr_assert_float_eq(
        metric_value("costrouter_budget_remaining_usd{tenant=\"acme\",period=\"month\"}"), 100,
        1e-9);
}

/* A request reserved before midnight and settled after it is the new
 * day's spend, in the store and in the gauges alike (its cost: 9 x $100
 * + 7 x $300 per Mtok = $0.003); yesterday's is gone from both. */
Test(costs, a_request_settled_past_midnight_is_spent_on_the_new_day)
{
    static const char spent[] = "costrouter_budget_spent_usd{tenant=\"acme\",period=\"day\"}";

    run_from("2026-12-06 23:59:58");
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\nx-mock-ttft-ms: 3000\r\n",
                      "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200);
    double paid = header_usd("x-costrouter-cost-usd");
    cr_assert_float_eq(paid, usd(PROMPT_TOKENS, 7, 100, 300), 1e-9);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble, paid, 1e-9);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_float_eq(metric_value(spent), paid, 1e-9, "%.*s", (int)resp.body.len,
                       resp.body.data);
}

Test(costs, admin_api_reports_spend_backends_and_metrics)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", "    budget: {daily_usd: 10, monthly_usd: 100}\n");
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    double paid = header_usd("x-costrouter-cost-usd");
    int port = routers[0].port;

    cr_assert_eq(call_port(port, "GET", "/admin/tenants/acme/spend", NULL, NULL), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_eq(call_port(port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cJSON *j = body_json();
    cr_assert_str_eq(cJSON_GetObjectItem(j, "tenant")->valuestring, "acme");
    cr_assert_float_eq(cJSON_GetObjectItem(j, "day_usd")->valuedouble, paid, 1e-9);
    cr_assert_float_eq(cJSON_GetObjectItem(j, "month_usd")->valuedouble, paid, 1e-9);
    cr_assert_float_eq(cJSON_GetObjectItem(j, "day_budget_usd")->valuedouble, 10, 1e-9);
    cr_assert_float_eq(cJSON_GetObjectItem(j, "month_budget_usd")->valuedouble, 100, 1e-9);
    cr_assert_eq(call_port(port, "GET", "/admin/tenants", ADMIN, NULL), 0);
    cr_assert_eq(cJSON_GetArraySize(body_json()), 1);
    cr_assert_eq(call_port(port, "GET", "/admin/backends", ADMIN, NULL), 0);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(body_json(), 0), "circuit")->valuestring,
                     "closed");
    cr_assert_eq(call_port(port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    static const char series[] =
        "costrouter_cost_usd_total{tenant=\"acme\",backend=\"a\",route=\"chat\"}";
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, series, sizeof(series) - 1), "%.*s",
                       (int)resp.body.len, resp.body.data);
    cr_assert_null(memmem(resp.body.data, resp.body.len, KEY, strlen(KEY)), "a key in /metrics");
    cr_assert_eq(call_port(port, "GET", "/metrics", NULL, NULL), 0);
    cr_assert_eq(resp.status, 401);
    /* The admin key is read as a tenant's is: the scheme in any case,
     * blanks after it skipped; nothing else is the key. */
    cr_assert_eq(call_port(port, "GET", "/metrics", "Authorization: bearer \t adm-secret\r\n",
                           NULL), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call_port(port, "GET", "/metrics", "Authorization: Bearer adm-secre\r\n", NULL), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_eq(call_port(port, "GET", "/metrics", "Authorization: Bearer  \r\n", NULL), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_eq(call_port(port, "GET", "/dashboard", NULL, NULL), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_not_null(strstr(support_http_header(&resp, "content-type"), "text/html"));
}

/* Tenant ids may hold '/', ':', '@' and '+': such an id is found written
 * as it is or percent-encoded (as URL builders write a path segment). */
Test(costs, admin_spend_finds_an_id_raw_or_percent_encoded)
{
    static const char *const found[] = {
        "/admin/tenants/team/search@eu+1/spend",
        "/admin/tenants/team%2Fsearch%40eu%2B1/spend",
        "/admin/tenants/%74eam%2fsearch@eu+1/spend",
    };
    static const char *const not_found[] = {
        "/admin/tenants/spend", "/admin/tenants//spend", "/admin/tenants/%/spend",
        "/admin/tenants/team%2/spend", "/admin/tenants/%zzteam/spend",
        "/admin/tenants/team%00/spend", "/admin/tenants/team/search@eu+1/spend/",
        "/admin/tenants/team/search/spend",
    };

    tenant_id = "team/search@eu+1";
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    double paid = header_usd("x-costrouter-cost-usd");
    for (size_t i = 0; i < sizeof(found) / sizeof(found[0]); i++) {
        cr_assert_eq(call_port(routers[0].port, "GET", found[i], ADMIN, NULL), 0);
        cr_assert_eq(resp.status, 200, "%s: %.*s", found[i], (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(cJSON_GetObjectItem(body_json(), "tenant")->valuestring, tenant_id);
        cr_assert_float_eq(cJSON_GetObjectItem(json, "day_usd")->valuedouble, paid, 1e-9);
    }
    for (size_t i = 0; i < sizeof(not_found) / sizeof(not_found[0]); i++) {
        cr_assert_eq(call_port(routers[0].port, "GET", not_found[i], ADMIN, NULL), 0);
        cr_assert_eq(resp.status, 404, "%s: %d", not_found[i], resp.status);
        cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")
                             ->valuestring,
                         "unknown_url");
    }
}

/* Children hammer the routers with `auth`; each counts its 200s into a pipe. */
static void hammer(int port, const char *auth, int n, int fd)
{
    int ok = 0;
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}";
    char headers[128];

    snprintf(headers, sizeof(headers), "%sx-mock-tokens: 10\r\n", auth);
    for (int i = 0; i < n; i++) {
        struct support_http_response r = {0};
        struct buf q = {0};
        if (support_http_format(&q, "POST", "/v1/chat/completions", headers, body) == 0 &&
            support_http_request(port, q.data, q.len, TIMEOUT_MS, &r) == 0 && r.status == 200)
            ok++;
        support_http_response_free(&r);
        buf_free(&q);
    }
    if (write(fd, &ok, sizeof(ok)) != sizeof(ok))
        _exit(1);
    _exit(0);
}

/* `workers` children send `each` requests with `auth` to the first
 * `nrouters` routers, round robin; the 200s they got. */
static int hammer_all(int nrouters, const char *auth, int workers, int each)
{
    int fds[2], granted = 0;
    pid_t pids[8];

    cr_assert_leq(workers, 8);
    cr_assert_eq(pipe(fds), 0);
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0)
            hammer(routers[w % nrouters].port, auth, each, fds[1]);
        pids[w] = pid;
    }
    for (int w = 0; w < workers; w++) {
        int ok = 0;
        cr_assert_eq(read(fds[0], &ok, sizeof(ok)), (ssize_t)sizeof(ok));
        granted += ok;
    }
    for (int w = 0; w < workers; w++)
        waitpid(pids[w], NULL, 0); /* only the workers: servers are children too */
    close(fds[0]);
    close(fds[1]);
    return granted;
}

/* Stop the routers (flushing the cost log) and read it: one line per
 * request, `lines` of them; the largest amount a 200 was charged beyond
 * its estimate. */
static double largest_excess(int lines_wanted)
{
    for (int i = 0; i < NROUTERS; i++)
        support_proc_stop(&routers[i]);
    FILE *f = fopen(log_path, "r");
    char line[4096];
    double excess = 0;
    int lines = 0;
    cr_assert_not_null(f);
    while (fgets(line, sizeof(line), f)) {
        cJSON *rec = cJSON_Parse(line);
        cr_assert_not_null(rec, "bad cost log line: %s", line);
        lines++;
        if (cJSON_GetObjectItem(rec, "status")->valuedouble == 200) {
            double d = cJSON_GetObjectItem(rec, "cost_usd")->valuedouble -
                       cJSON_GetObjectItem(rec, "cost_usd_est")->valuedouble;
            if (d > excess)
                excess = d;
        }
        cJSON_Delete(rec);
    }
    fclose(f);
    cr_assert_eq(lines, lines_wanted, "one cost log line per request");
    return excess;
}

Test(costs, routers_sharing_redis_never_overspend_a_budget)
{
    const int workers = 6, each = 15;
    int granted;

    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock_a, "--token-delay-ms", "1", NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 100);
    /* $0.0019 a request; $0.05 covers 26 of the 90 attempted. */
    start_routers(NROUTERS, "a", "    budget: {daily_usd: 0.05, on_exhausted: reject}\n");
    granted = hammer_all(NROUTERS, AUTH, workers, each);
    cr_assert_eq(call_port(routers[1].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    double spent = cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble;
    cr_assert_float_eq(spent, granted * 0.0019, 1e-9, "spend %f for %d answers", spent, granted);

    /* The bound of issue 5: spend may pass the budget only by what the
     * requests in flight (at most `workers`) cost beyond their
     * reservation. The largest such excess comes from the cost log. */
    double excess = largest_excess(workers * each);
    cr_assert_leq(spent, 0.05 + workers * excess + 1e-9, "overspent: $%f (excess %f)", spent,
                  excess);
    /* And the budget was used, not refused early: less than one more
     * request's worth stays unspent. */
    cr_assert_gt(spent, 0.05 - 0.0019 - workers * excess, "spent only $%f", spent);
    cr_assert_lt(granted, workers * each, "nothing was refused");
}

/* Lines of the log at `path` that hold `needle`. */
static int count_log_lines(const char *path, const char *needle)
{
    int n = support_log_count(path, needle);

    cr_assert_geq(n, 0, "%s cannot be read", path);
    return n;
}

/* A down backend answers every request alike (502, then 503 once its
 * circuit is open): the log says so once a second per kind of error, with
 * the count, not once a request. Each request is in the cost log. */
Test(costs, error_answers_are_logged_once_a_second_per_kind)
{
    char log[64] = "/tmp/costrouter-stderr-XXXXXX";
    int lines;

    close(mkstemp(log));
    stderr_path = log;
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    support_proc_stop(&mock_a);
    for (int i = 0; i < 40; i++) {
        cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert(resp.status == 502 || resp.status == 503, "status %d", resp.status);
    }
    support_proc_stop(&routers[0]);
    lines = count_log_lines(log, ": 50");
    unlink(log);
    cr_assert_geq(lines, 2, "a 502 and a 503 line at least");
    cr_assert_leq(lines, 4, "%d lines for 40 error answers", lines);
}

/* Write the config with the route's candidates again (listen_at as it is
 * now) and reload router 0, which takes it. */
static void reload_listen_at(const char *route_candidates)
{
    write_conf(route_candidates, NULL);
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}

/* `listen` cannot move on a reload: the warning names where the router
 * listens, and a later reload is compared with that, not with the address
 * the refused move named: going back to it is no change, and the warning
 * never claims an address the router does not listen on. */
Test(costs, a_reload_that_moves_listen_warns_with_the_address_kept)
{
    char log[64] = "/tmp/costrouter-stderr-XXXXXX", kept[96];
    int warned, false_claim;

    close(mkstemp(log));
    stderr_path = log;
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    listen_at = "127.0.0.2:0";
    reload_listen_at("a");
    listen_at = "127.0.0.1:0";
    reload_listen_at("a");
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200, "still serving where it listened");
    support_proc_stop(&routers[0]);
    snprintf(kept, sizeof(kept), "listen cannot change without a restart; still on 127.0.0.1:%d\n",
             routers[0].port);
    warned = count_log_lines(log, kept);
    false_claim = count_log_lines(log, "127.0.0.2");
    unlink(log);
    cr_assert_eq(warned, 1, "the move is not warned of once, with the address kept");
    cr_assert_eq(false_claim, 0, "the log claims the address the router never moved to");
}

/* While the store is down every settlement fails alike: the log says so
 * about once a second, not once a request (it was thousands of lines a
 * second under load). Stopped before Redis is back, the router says at
 * error level that the journaled charges never reached Redis. */
Test(costs, a_store_outage_is_logged_once_a_second_not_per_request)
{
    char log[64] = "/tmp/costrouter-stderr-XXXXXX";
    int journaled, lost;

    close(mkstemp(log));
    stderr_path = log;
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    test_redis_kill(&redis, SIGKILL);
    for (int i = 0; i < 40; i++) {
        cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert_eq(resp.status, 200, "fail_open serves while Redis is down");
    }
    support_proc_stop(&routers[0]);
    journaled = count_log_lines(log, "journaled");
    lost = count_log_lines(log, " ERROR cache/journal.c:");
    unlink(log);
    cr_assert_geq(journaled, 1, "the outage is not in the log");
    cr_assert_leq(journaled, 3, "%d lines for 40 failed settlements", journaled);
    cr_assert_eq(lost, 1, "the charges lost at the stop are not logged as an error");
}

/* Redis answers but refuses writes (too few replicas; MISCONF and OOM
 * under noeviction alike): fail_open keeps serving, costrouter_store_up
 * says 0 although the connection stays, and once Redis takes writes again
 * every charge reaches it without a reconnect, the tenant's and those of
 * the key ci, with a budget of its own, that made the requests. The
 * refusal is logged once, not again at each renewal of the router's live
 * mark (every second). */
Test(costs, a_redis_refusing_writes_is_reported_down_and_charged_after)
{
    const char *ci = "Authorization: Bearer " KEY_CI "\r\nx-mock-tokens: 7\r\n";
    const char *body = "{\"model\":\"chat\"," MSG "}";
    static const char down[] = "\ncostrouter_store_up{store=\"redis\"} 0\n";
    char path[256], day[16], log[64] = "/tmp/costrouter-stderr-XXXXXX";
    time_t now = time(NULL);
    struct tm tm;
    long long want = 4 * llround(usd(PROMPT_TOKENS, 7, 100, 300) * 1e6);
    int refusals;

    close(mkstemp(log));
    stderr_path = log;
    key_ci_budget("daily_usd: 10");
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions", ci, body), 0);
    test_redis_int(&redis, "CONFIG SET min-replicas-to-write 1");
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions", ci, body), 0);
        cr_assert_eq(resp.status, 200, "fail_open serves while Redis refuses writes");
    }
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert(memmem(resp.body.data, resp.body.len, down, sizeof(down) - 1),
              "the store is reported up while Redis refuses every write");
    usleep(2500 * 1000); /* two renewals of the live mark, refused */
    test_redis_int(&redis, "CONFIG SET min-replicas-to-write 0");
    wait_store_up(0);
    gmtime_r(&now, &tm);
    strftime(day, sizeof(day), "%Y%m%d", &tm);
    snprintf(path, sizeof(path), "costrouter:{%s}:d:%s", tenant_id, day);
    for (int tries = 0; tries < 100 && test_redis_int(&redis, "GET %s", path) != want; tries++)
        usleep(20000);
    cr_assert_eq(test_redis_int(&redis, "GET %s", path), want, "charges missing in Redis");
    snprintf(path, sizeof(path), "costrouter:{%s#ci}:d:%s", tenant_id, day);
    for (int tries = 0; tries < 100 && test_redis_int(&redis, "GET %s", path) != want; tries++)
        usleep(20000);
    cr_assert_eq(test_redis_int(&redis, "GET %s", path), want, "the key's charges missing");
    support_proc_stop(&routers[0]);
    refusals = count_log_lines(log, "NOREPLICAS");
    unlink(log);
    cr_assert_eq(refusals, 1, "%d log lines for one refusal", refusals);
}

/* While Redis refuses writes but answers reads, what the admin API and
 * the spend gauge show of a tenant is what this router enforces: Redis's
 * figure and the charges it journaled, which Redis has not confirmed (it
 * showed Redis's figure alone, $0 after a paid request). The next request
 * then no longer fits "good" and is downgraded to "cheap". */
Test(costs, spend_shown_while_redis_refuses_writes_counts_the_journaled_charges)
{
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}";
    static const char gauge[] = "costrouter_budget_spent_usd{tenant=\"acme\",period=\"day\"}";
    double paid;

    cr_assert_eq(test_redis_start(&redis, 0), 0);
    start_good_and_cheap(1, "daily_usd: 0.03");
    test_redis_int(&redis, "CONFIG SET min-replicas-to-write 1");
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good");
    paid = header_usd("x-costrouter-cost-usd");
    cr_assert_float_eq(paid, 0.019, 1e-9);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble, paid, 1e-9,
                       "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_float_eq(metric_value(gauge), paid, 1e-9, "the spend gauge");
    cr_assert_eq(metric_value("costrouter_store_journal_entries{store=\"redis\"}"), 1,
                 "the journaled charge");
    cr_assert_eq(metric_value("costrouter_store_journal_dropped_total{store=\"redis\"}"), 0);
    /* $0.011 left: "good" no longer fits, "cheap" does. */
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "downgraded-budget");
    test_redis_int(&redis, "CONFIG SET min-replicas-to-write 0");
}

/* The longest tenant id and key prefix the config takes (conf.h) reach
 * Redis whole: the day's spend is under the full key; so does the spend
 * of a key with the longest name and a budget of its own, counted under
 * both (TENANT#NAME). Longer ones are config errors (tests/conf). */
Test(costs, longest_tenant_id_and_key_prefix_are_charged_in_redis)
{
    char id[CONF_NAME_MAX + 1], prefix[CONF_KEY_PREFIX_MAX + 1], path[1024], day[16];
    char name[CONF_NAME_MAX + 1], keys[512], hex[65];
    time_t now = time(NULL);
    struct tm tm;

    memset(name, 'k', CONF_NAME_MAX);
    name[CONF_NAME_MAX] = '\0';
    support_key_sha256_hex(KEY_CI, hex);
    snprintf(keys, sizeof(keys), ", {name: %s, hash: \"sha256:%s\", budget: {daily_usd: 10}}",
             name, hex);
    more_keys = keys;
    memset(id, 't', CONF_NAME_MAX);
    id[CONF_NAME_MAX] = '\0';
    memset(prefix, 'p', CONF_KEY_PREFIX_MAX);
    prefix[CONF_KEY_PREFIX_MAX] = '\0';
    tenant_id = id;
    key_prefix = prefix;
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", "    budget: {daily_usd: 10, on_exhausted: reject}\n");
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(key_chat(i ? KEY_CI : NULL, KEY_BODY), 200, "%.*s", (int)resp.body.len,
                     resp.body.data);
    }
    /* A spend read goes to Redis after the settlements before it. */
    snprintf(path, sizeof(path), "/admin/tenants/%s/spend", id);
    cr_assert_eq(call_port(routers[0].port, "GET", path, ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble,
                       3 * usd(PROMPT_TOKENS, 10, 100, 300), 1e-9);
    gmtime_r(&now, &tm);
    strftime(day, sizeof(day), "%Y%m%d", &tm);
    cr_assert_eq(test_redis_int(&redis, "GET %s{%s}:d:%s", prefix, id, day),
                 3 * llround(usd(PROMPT_TOKENS, 10, 100, 300) * 1e6));
    cr_assert_eq(test_redis_int(&redis, "GET %s{%s#%s}:d:%s", prefix, id, name, day),
                 2 * llround(usd(PROMPT_TOKENS, 10, 100, 300) * 1e6));
}

Test(costs, rate_limits_answer_429_with_retry_after)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    rate_limits: {rpm: 2}\n");
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 429);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")->valuestring,
                     "rate_limit_exceeded");
    /* It says which limit (it said "rate limit exceeded" alone). */
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(json, "error"), "message")->valuestring,
                     "rate limit exceeded: requests per minute of tenant acme (2)");
    long retry = strtol(support_http_header(&resp, "retry-after"), NULL, 10);
    cr_assert(retry >= 1 && retry <= 60, "retry-after %ld", retry);
}

/* The status of a chat through key `key` (NULL: the tenant's first). */
static int chat_status_with(const char *key, const char *body)
{
    char headers[128];

    snprintf(headers, sizeof(headers), "Authorization: Bearer %s\r\n", key);
    cr_assert_eq(key ? call_port(routers[0].port, "POST", "/v1/chat/completions", headers, body)
                     : chat(0, NULL, body),
                 0);
    return resp.status;
}

static void reload_router(void)
{
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}

/* A reload keeps what the tenant and each key used of their limits:
 * fresh buckets let every reload grant another minute's worth. */
Test(costs, a_reload_keeps_what_the_rate_limits_have_used)
{
    char hex[65], keys[160];
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";

#define KEY_ONE_RPM "sk-cost-one-rpm"
    support_key_sha256_hex(KEY_ONE_RPM, hex);
    snprintf(keys, sizeof(keys), ", {name: one, rpm: 1, hash: \"sha256:%s\"}", hex);
    more_keys = keys;
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    rate_limits: {rpm: 3}\n");
    cr_assert_eq(chat_status_with(KEY_ONE_RPM, body), 200);
    cr_assert_eq(chat_status_with(KEY_ONE_RPM, body), 429);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "message")->valuestring,
                     "rate limit exceeded: requests per minute of key \"one\" of acme (1)");
    reload_router();
    /* The tenant has two requests left: only the key's limit refuses. */
    cr_assert_eq(chat_status_with(KEY_ONE_RPM, body), 429, "the key's minute came back");
    cr_assert_eq(chat_status_with(NULL, body), 200);
    cr_assert_eq(chat_status_with(NULL, body), 200);
    cr_assert_eq(chat_status_with(NULL, body), 429);
    reload_router();
    cr_assert_eq(chat_status_with(NULL, body), 429, "the tenant's minute came back");
    more_keys = "";
}

/* A stream in flight across a reload settles its real token count into
 * the buckets the new config uses: it was admitted for 265 tokens (9 and
 * the first guess, 256) and made 900. Its correction went to the old
 * generation's buckets, which no request reads again: the new one, copied
 * at the reload, let a request of 509 tokens through a tpm of 1000 right
 * after 1174 had gone. */
Test(costs, a_stream_across_a_reload_settles_into_the_tpm_the_next_requests_use)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    char body[128];
    int n = 0;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_counted("a", mock_a.port, 1, 1, 1, "cl100k_base");
    start_routers(1, "a", "    rate_limits: {tpm: 1000}\n");
    snprintf(body, sizeof(body), "{\"model\":\"chat\",\"stream\":true," MSG "}");
    open_chat_stream(&s, AUTH "x-mock-tokens: 900\r\nx-mock-token-delay-ms: 2\r\n", body);
    reload_router();
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
        n++;
    support_sse_close(&s);
    cr_assert_geq(n, 900);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":500," MSG "}"), 0);
    cr_assert_eq(resp.status, 429, "%d: the stream's 900 tokens were not counted", resp.status);
}

/* The one value of header `name` in the last answer (it fails on two). */
static const char *only_header(const char *name)
{
    const char *v = support_http_header(&resp, name), *at;
    char line[96];

    cr_assert_not_null(v, "no %s", name);
    snprintf(line, sizeof(line), "\r\n%s:", name);
    at = memmem(resp.raw.data, resp.raw.len, line, strlen(line));
    cr_assert(at && !memmem(at + 1, resp.raw.len - (size_t)(at + 1 - resp.raw.data), line,
                            strlen(line)),
              "%s twice", name);
    return v;
}

/* The router's x-ratelimit-* tell a client its own limits, as OpenAI's
 * do: of the tenant's and the key's, the one with less left. The
 * backend's, which speak of the router's account with it (shared by all
 * tenants), went to the client as if they were its own: 9999 left of
 * 10000 while its key allowed 2 a minute. */
Test(costs, x_ratelimit_headers_tell_the_tenants_and_keys_limits)
{
    static const char body[] = "{\"id\":\"c\",\"object\":\"chat.completion\",\"choices\":[{"
                               "\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":"
                               "\"hi\"},\"finish_reason\":\"stop\"}],\"usage\":{"
                               "\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}";
    const char chat_body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    char hex[65], keys[160], answer[1024];
    int len;

    len = snprintf(answer, sizeof(answer),
                   "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   "x-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999\r\n"
                   "x-ratelimit-remaining-tokens: 29999990\r\nContent-Length: %zu\r\n\r\n%s",
                   strlen(body), body);
    canned = support_canned_start(answer, (size_t)len);
    cr_assert_not_null(canned);
    support_key_sha256_hex(KEY_ONE_RPM, hex);
    snprintf(keys, sizeof(keys), ", {name: one, rpm: 2, hash: \"sha256:%s\"}", hex);
    more_keys = keys;
    add_backend("a", support_canned_port(canned), 1, 1, 1);
    start_routers(1, "a", "    rate_limits: {rpm: 3, tpm: 1000}\n");
    cr_assert_eq(chat_status_with(NULL, chat_body), 200);
    cr_assert_str_eq(only_header("x-ratelimit-limit-requests"), "3");
    cr_assert_str_eq(only_header("x-ratelimit-remaining-requests"), "2");
    cr_assert_str_eq(only_header("x-ratelimit-reset-requests"), "20s");
    cr_assert_str_eq(only_header("x-ratelimit-limit-tokens"), "1000");
    cr_assert_lt(atoi(only_header("x-ratelimit-remaining-tokens")), 1000);
    cr_assert_gt(atoi(only_header("x-ratelimit-remaining-tokens")), 900);
    /* The key has 1 left of its 2, the tenant 1 of its 3: the key's, the
     * smaller limit, is shown. */
    cr_assert_eq(chat_status_with(KEY_ONE_RPM, chat_body), 200);
    cr_assert_str_eq(only_header("x-ratelimit-limit-requests"), "2");
    cr_assert_str_eq(only_header("x-ratelimit-remaining-requests"), "1");
    /* The 429 says none is left and when the minute is whole again. */
    cr_assert_eq(chat_status_with(NULL, chat_body), 200);
    cr_assert_eq(chat_status_with(NULL, chat_body), 429);
    cr_assert_str_eq(only_header("x-ratelimit-limit-requests"), "3");
    cr_assert_str_eq(only_header("x-ratelimit-remaining-requests"), "0");
    cr_assert_str_eq(only_header("x-ratelimit-reset-requests"), "1m0s");
    more_keys = "";
}

/* A backend `a` on mock_a with a context window of `window` tokens. */
static void add_backend_with_window(int window)
{
    cr_assert_eq(buf_printf(&yaml,
                            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a,\n"
                            "     quality: 1, context_window: %d, input_usd_per_mtok: 1,\n"
                            "     output_usd_per_mtok: 1}\n",
                            mock_a.port, window),
                 0);
}

/* A chat body without max_tokens whose one message is `words` words. */
static const char *chat_of_words(struct buf *out, int words)
{
    buf_reset(out);
    cr_assert_eq(buf_printf(out, "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\""), 0);
    for (int i = 0; i < words; i++)
        cr_assert_eq(buf_append(out, "w ", 2), 0);
    cr_assert_eq(buf_printf(out, "\"}]}%c", '\0'), 0);
    return out->data;
}

/*
 * A request without max_tokens is predicted at the P95 of the tenant's
 * recent completions on the route: after one long answer among few, that
 * long answer. A refusal made by that guess alone would last: refused
 * requests teach the prediction nothing. So the guess is capped by what
 * the window leaves after the prompt (the backend stops there), and by a
 * minute of the smallest tokens-per-minute limit.
 */
Test(costs, one_long_answer_does_not_shut_out_requests_without_max_tokens)
{
    char hex[65], keys[160];
    struct buf body = {0};
    const char *msg;

#define KEY_SMALL "sk-cost-small"
    support_key_sha256_hex(KEY_SMALL, hex);
    snprintf(keys, sizeof(keys), ", {name: small, tpm: 800, hash: \"sha256:%s\"}", hex);
    more_keys = keys;
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with_window(1000);
    start_routers(1, "a", NULL);
    /* Eight answers, the least the prediction learns from; one is 900
     * tokens long, so requests without max_tokens are predicted at 900. */
    for (int i = 0; i < 8; i++) {
        cr_assert_eq(chat(0, i == 3 ? "x-mock-tokens: 900\r\n" : "x-mock-tokens: 10\r\n",
                          "{\"model\":\"chat\"," MSG "}"),
                     0);
        cr_assert_eq(resp.status, 200, "answer %d: %d %.*s", i, resp.status, (int)resp.body.len,
                     resp.body.data);
    }
    /* A prompt of some 300 tokens fits the window; 300 + 900 does not. */
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", chat_of_words(&body, 1200)), 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    /* A prompt too long by itself is still refused, and told so. */
    cr_assert_eq(chat(0, NULL, chat_of_words(&body, 6000)), 0);
    cr_assert_eq(resp.status, 400, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    msg = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "message"));
    cr_assert_not_null(strstr(msg, " prompt tokens, and the largest window is 1000 tokens"), "%s", msg);
    /* The key `small` allows 800 tokens a minute: 9 + 900 predicted is
     * more, but a guess does not make a request "larger than the limit". */
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions",
                           "Authorization: Bearer " KEY_SMALL "\r\nx-mock-tokens: 10\r\n",
                           "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    buf_free(&body);
    more_keys = "";
}

/* A request whose prompt and max_tokens pass a whole minute of a
 * tokens-per-minute limit never passes as it is: its 429 says so and
 * tells the client not to retry (x-should-retry: false, no Retry-After),
 * where a request over what is left of the minute gets Retry-After. */
Test(costs, a_request_larger_than_a_minutes_tokens_is_told_not_to_retry)
{
    const char *msg;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    rate_limits: {tpm: 800}\n");
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":900," MSG "}"), 0);
    cr_assert_eq(resp.status, 429, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    msg = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "message"));
    cr_assert_not_null(strstr(msg, "rate limit exceeded: request larger than the limit of tokens "
                                   "per minute of tenant acme (800): "),
                       "%s", msg);
    cr_assert_not_null(strstr(msg, " tokens with its prompt and max_tokens; a smaller max_tokens "
                                   "may fit"),
                       "%s", msg);
    cr_assert_str_eq(support_http_header(&resp, "x-should-retry"), "false");
    cr_assert_null(support_http_header(&resp, "retry-after"));
    /* 9 + 700 fits a minute; then 9 + 700 again is over what is left. */
    cr_assert_eq(chat(0, "x-mock-tokens: 700\r\n", "{\"model\":\"chat\",\"max_tokens\":700," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":700," MSG "}"), 0);
    cr_assert_eq(resp.status, 429, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_not_null(support_http_header(&resp, "retry-after"));
    cr_assert_null(support_http_header(&resp, "x-should-retry"));
}

/* A max_tokens that caps nothing (-1, LM Studio's and llama.cpp's "no
 * limit", which their clients send; 0; a fraction) leaves the completion
 * a guess, as no max_tokens does: a guess is no size the request asked
 * for, so it is neither refused for ever as larger than a minute's tokens
 * ("a smaller max_tokens may fit", x-should-retry: false) nor as too long
 * for the window. Each case has a key of its own with a tpm of 100, and
 * the guess (256 until 8 answers were seen) is over that and the window. */
Test(costs, a_max_tokens_that_caps_nothing_is_no_max_tokens)
{
    static const char *const caps[] = {"", "\"max_tokens\":-1,", "\"max_tokens\":0,",
                                       "\"max_completion_tokens\":0.5,"};
    enum { NCAPS = sizeof(caps) / sizeof(caps[0]) };
    char keys[NCAPS * 160], hex[65], body[256], auth[96];
    size_t n = 0;

    for (size_t i = 0; i < NCAPS; i++) {
        snprintf(auth, sizeof(auth), "sk-cost-cap-%zu", i);
        support_key_sha256_hex(auth, hex);
        n += (size_t)snprintf(keys + n, sizeof(keys) - n,
                              ", {name: cap%zu, tpm: 100, hash: \"sha256:%s\"}", i, hex);
    }
    more_keys = keys;
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with_window(200);
    start_routers(1, "a", NULL);
    for (size_t i = 0; i < NCAPS; i++) {
        snprintf(body, sizeof(body), "{\"model\":\"chat\",%s" MSG "}", caps[i]);
        snprintf(auth, sizeof(auth), "Authorization: Bearer sk-cost-cap-%zu\r\n", i);
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions", auth, body), 0);
        cr_assert_eq(resp.status, 200, "%s: %d %.*s", caps[i], resp.status, (int)resp.body.len,
                     resp.body.data);
    }
    more_keys = "";
}

/* Tokens a request took from the tokens-per-minute limit at admission go
 * back when it is refused after (here: too long for the window). */
Test(costs, a_refused_request_gives_its_tokens_back_to_the_tpm_limit)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with_window(500);
    start_routers(1, "a", "    rate_limits: {tpm: 1000}\n");
    /* 9 + 600 tokens: admitted by the limit, too long for the window. */
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":600," MSG "}"), 0);
    cr_assert_eq(resp.status, 400, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    /* 9 + 450: fits the window, and the minute's 1000 tokens only if the
     * 609 came back. */
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":450," MSG "}"), 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
}

/* A context window bounds each choice: with n, every choice is its own
 * completion of the same prompt, so 9 + 300 tokens fit a 500-token window
 * at n = 2 as at n = 1 (the API takes it). The router added the choices
 * up (9 + 600) and refused it as too long. */
Test(costs, each_of_n_choices_must_fit_the_window_not_their_sum)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with_window(500);
    start_routers(1, "a", NULL);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":300,\"n\":2," MSG "}"), 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    /* One choice past the window is still refused. */
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":600,\"n\":2," MSG "}"), 0);
    cr_assert_eq(resp.status, 400, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_not_null(strstr(resp.body.data, "600 for the completion"), "%.*s",
                       (int)resp.body.len, resp.body.data);
}

/* A body for `path` ("/v1/embeddings": input, else prompt) of `k` texts
 * of `words` words each, as an array (a string when k is 0). */
static const char *texts_of_words(struct buf *out, const char *path, int k, int words)
{
    int embed = strcmp(path, "/v1/embeddings") == 0;

    buf_reset(out);
    cr_assert_eq(buf_printf(out, "{\"model\":\"chat\",%s\"%s\":%s", embed ? "" : "\"max_tokens\":10,",
                            embed ? "input" : "prompt", k ? "[" : ""),
                 0);
    for (int i = 0; i < (k ? k : 1); i++) {
        cr_assert_eq(buf_printf(out, "%s\"", i ? "," : ""), 0);
        for (int w = 0; w < words; w++)
            cr_assert_eq(buf_append(out, "w ", 2), 0);
        cr_assert_eq(buf_append(out, "\"", 1), 0);
    }
    cr_assert_eq(buf_printf(out, "%s}%c", k ? "]" : "", '\0'), 0);
    return out->data;
}

/* Each input of an embeddings batch, and each prompt of a legacy
 * completions array, is read in a window of its own (OpenAI: 8192 tokens
 * an input, a batch up to 300,000): the window bounds the largest, not
 * their sum. Three inputs of some 600 tokens each were refused 400
 * context_length_exceeded by a 1000-token window (a batch of document
 * chunks, as LangChain embeds them, could not pass); one input of 1800
 * tokens is rightly refused. */
Test(costs, each_text_of_a_batch_must_fit_the_window_not_their_sum)
{
    static const char *const paths[] = {"/v1/embeddings", "/v1/completions"};
    struct buf body = {0};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    /* Counted with o200k_base ("w" a token each): no calibration moves
     * the estimate between requests. */
    cr_assert_eq(buf_printf(&yaml,
                            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a,\n"
                            "     quality: 1, context_window: 1000, input_usd_per_mtok: 1,\n"
                            "     output_usd_per_mtok: 1, tokenizer: o200k_base}\n",
                            mock_a.port),
                 0);
    start_routers(1, "a", NULL);
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        cr_assert_eq(call_port(routers[0].port, "POST", paths[i], AUTH,
                               texts_of_words(&body, paths[i], 3, 600)),
                     0);
        cr_assert_eq(resp.status, 200, "%s: %d %.*s", paths[i], resp.status, (int)resp.body.len,
                     resp.body.data);
        cr_assert_eq(call_port(routers[0].port, "POST", paths[i], AUTH,
                               texts_of_words(&body, paths[i], 0, 1800)),
                     0);
        cr_assert_eq(resp.status, 400, "%s: %d %.*s", paths[i], resp.status, (int)resp.body.len,
                     resp.body.data);
        cr_assert_not_null(strstr(resp.body.data, "context_length_exceeded"), "%.*s",
                           (int)resp.body.len, resp.body.data);
    }
    buf_free(&body);
}

/* A legacy completion answers each prompt of an array, and best_of
 * completions of each (n of which are returned): up to prompts x
 * max(n, best_of) x max_tokens completion tokens are billed. The router
 * held max_tokens x n, so such a request passed limits and budgets that
 * its cost breaks. Here three prompts of max_tokens 300 (900 tokens and
 * more) and best_of 3 (the same) are larger than a tpm of 800. */
Test(costs, a_completions_request_holds_for_every_prompt_and_best_of)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", "    rate_limits: {tpm: 800}\n");
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/completions", AUTH,
                           "{\"model\":\"chat\",\"max_tokens\":300,"
                           "\"prompt\":[\"one\",\"two\",\"three\"]}"),
                 0);
    cr_assert_eq(resp.status, 429, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-should-retry"), "false");
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/completions", AUTH,
                           "{\"model\":\"chat\",\"max_tokens\":300,\"best_of\":3,\"n\":2,"
                           "\"prompt\":\"one\"}"),
                 0);
    cr_assert_eq(resp.status, 429, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-should-retry"), "false");
    /* One prompt given as token ids is one prompt: 300 fits. */
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/completions", AUTH,
                           "{\"model\":\"chat\",\"max_tokens\":300,\"prompt\":[1,2,3]}"),
                 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
}

/* OpenAI prices an image by its model: gpt-4o-mini counts 2833 + 5667 per
 * tile where gpt-4o counts 85 + 170 (the same price at its 33 times lower
 * rate). The rule was chosen by the client's "model", the route's name,
 * so a route "chat" to gpt-4o-mini held an image of unknown size (taken
 * as 1024 x 1024: 4 tiles) for 765 tokens instead of 25,501. The route's
 * first candidate's model decides, as its tokenizer does. */
Test(costs, an_image_is_counted_by_the_rule_of_the_backends_model)
{
    cJSON *rec;
    double est;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(buf_printf(&yaml,
                            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", "
                            "model: gpt-4o-mini,\n     quality: 1, context_window: 128000, "
                            "input_usd_per_mtok: 1, output_usd_per_mtok: 1, tokenizer: o200k_base}\n",
                            mock_a.port),
                 0);
    start_routers(1, "a", NULL);
    cr_assert_eq(chat(0, NULL,
                      "{\"model\":\"chat\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\","
                      "\"content\":[{\"type\":\"image_url\",\"image_url\":{\"url\":"
                      "\"https://example.com/cat.jpg\"}}]}]}"),
                 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    est = cJSON_GetObjectItem(rec, "prompt_tokens_est")->valuedouble;
    cJSON_Delete(rec);
    cr_assert(est >= 2833 + 4 * 5667 && est < 2833 + 4 * 5667 + 20, "estimated %g", est);
}

Test(costs, ab_split_follows_weights_and_sticks_to_a_user)
{
    int on_a = 0;
    const int n = 400;
    char hdr[64];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    add_backend("b", mock_b.port, 1, 1, 1);
    cr_assert_eq(buf_printf(&yaml, "experiments:\n  - name: exp\n    route: chat\n    arms:\n"
                                   "      - {name: control, weight: 70, backends: [a]}\n"
                                   "      - {name: treat, weight: 30, backends: [b]}\n"),
                 0);
    start_routers(1, "a, b", NULL);
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    for (int u = 0; u < n; u++) {
        snprintf(hdr, sizeof(hdr), "x-user-id: user-%d\r\n", u);
        cr_assert_eq(chat(0, hdr, body), 0);
        cr_assert_eq(resp.status, 200);
        const char *b = support_http_header(&resp, "x-costrouter-backend");
        const char *reason = support_http_header(&resp, "x-costrouter-reason");
        cr_assert_str_eq(reason, strcmp(b, "a") == 0 ? "ab:exp/control" : "ab:exp/treat");
        on_a += strcmp(b, "a") == 0;
    }
    /* 70% of 400 = 280, sd = sqrt(400 x 0.7 x 0.3) = 9.2: within 4 sd. */
    cr_assert(on_a > 280 - 37 && on_a < 280 + 37, "arm a got %d of %d", on_a, n);
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(chat(0, "x-user-id: user-7\r\n", body), 0);
        const char *b = support_http_header(&resp, "x-costrouter-backend");
        static char first[8];
        if (i == 0)
            snprintf(first, sizeof(first), "%s", b);
        cr_assert_str_eq(b, first, "user-7 changed arm");
    }
}

/* The experiment that applies to the tenant keys it by its own user
 * header, not by that of the route's first experiment (here for another
 * tenant): keyed by a header the clients do not send, every user fell back
 * to the tenant id and so into one arm. */
Test(costs, ab_split_keys_by_the_user_header_of_the_experiment_that_applies)
{
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    char hdr[64], first[8] = "";
    int on_a = 0;
    const int n = 40;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    add_backend("b", mock_b.port, 1, 1, 1);
    cr_assert_eq(buf_printf(&yaml,
                            "experiments:\n"
                            "  - {name: theirs, route: chat, tenants: [other], arms: [{name: x}]}\n"
                            "  - name: ours\n    route: chat\n    tenants: [%s]\n"
                            "    user_header: x-end-user\n    arms:\n"
                            "      - {name: on-a, backends: [a]}\n"
                            "      - {name: on-b, backends: [b]}\n",
                            tenant_id),
                 0);
    start_routers(1, "a, b",
                  "  - id: other\n    api_keys: [\"sha256:"
                  "b1bb78df5125918b38d2067043ec3dbd73dcca0ceb554bd9083b80beafdf1dd1\"]\n");
    for (int u = 0; u < n; u++) {
        snprintf(hdr, sizeof(hdr), "x-end-user: user-%d\r\n", u);
        cr_assert_eq(chat(0, hdr, body), 0);
        cr_assert_eq(resp.status, 200);
        on_a += strcmp(support_http_header(&resp, "x-costrouter-backend"), "a") == 0;
    }
    /* 50/50 over 40 users: all in one arm has a chance of 2^-39. */
    cr_assert(on_a > 0 && on_a < n, "arm on-a got %d of %d users", on_a, n);
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(chat(0, "x-end-user: user-7\r\n", body), 0);
        if (i == 0)
            snprintf(first, sizeof(first), "%s", support_http_header(&resp, "x-costrouter-backend"));
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), first,
                         "user-7 changed arm");
    }
}

/* Backends a (on mock_a, at `a_usd` a Mtok in and out) and b, whose port
 * was mockllm's and now has no one: every request sent there fails. */
static void add_a_up_and_b_down(double a_usd)
{
    int port_b;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    port_b = mock_b.port;
    support_proc_stop(&mock_b);
    add_backend("a", mock_a.port, 1, a_usd, a_usd);
    add_backend("b", port_b, 1, 1, 1);
}

/* An arm whose backends are all down: its users get 503 with when the
 * soonest circuit opens again, not another arm's backend, and the cost
 * log names their arm. */
Test(costs, an_arm_whose_backends_are_all_down_answers_503_with_retry_after)
{
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    cJSON *rec;

    add_a_up_and_b_down(1);
    cr_assert_eq(buf_printf(&yaml, "experiments:\n  - name: exp\n    route: chat\n    arms:\n"
                                   "      - {name: down, weight: 1, backends: [b]}\n"),
                 0);
    start_routers(1, "a, b", NULL);
    for (int i = 0; i < 3; i++) { /* three failures open b's circuit */
        cr_assert_eq(chat(0, NULL, body), 0);
        cr_assert_geq(resp.status, 500, "attempt %d: %d", i, resp.status);
    }
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 503);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")->valuestring,
                     "no_backend_available");
    cr_assert_not_null(support_http_header(&resp, "retry-after"));
    support_proc_stop(&routers[0]);
    rec = support_last_json_line(log_path);
    cr_assert_not_null(rec);
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "arm")->valuestring, "down");
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "reason")->valuestring, "no-qualifying-candidate");
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(rec, "candidates"), 0),
                                         "rejected")->valuestring,
                     "arm");
    cJSON_Delete(rec);
}

/* The A/B reason header names the arm: "ab:EXP/ARM". */
static const char *arm_of_answer(void)
{
    const char *reason = support_http_header(&resp, "x-costrouter-reason");

    cr_assert_not_null(reason);
    return reason;
}

/* An empty or blank user header is no user: keyed as the tenant, as when
 * the header is missing. It was hashed as the user "", so every such
 * request of every tenant fell in one arm. (Ten arms: the tenant's arm
 * and the arm of "" differ for this experiment, as the test needs.) */
Test(costs, an_empty_user_header_is_keyed_by_the_tenant_as_a_missing_one)
{
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    static const char *const blank[] = {"x-user-id:\r\n", "x-user-id:    \r\n",
                                        "x-user-id: \t \r\n"};
    char missing[64];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    cr_assert_eq(buf_printf(&yaml, "experiments:\n  - name: exp\n    route: chat\n    arms:\n"),
                 0);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(buf_printf(&yaml, "      - {name: arm%d}\n", i), 0);
    start_routers(1, "a", NULL);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 200);
    snprintf(missing, sizeof(missing), "%s", arm_of_answer());
    for (size_t i = 0; i < sizeof(blank) / sizeof(blank[0]); i++) {
        cr_assert_eq(chat(0, blank[i], body), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(arm_of_answer(), missing, "header %zu: %s, not %s as without it", i,
                         arm_of_answer(), missing);
    }
}

/* A request a rate limit refuses is of its arm too: the cost log named
 * none (the limit came before the arm), and `report --by arm` counted
 * the arm's refusals nowhere. */
Test(costs, a_rate_limited_request_names_its_arm_in_the_cost_log)
{
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    cJSON *rec;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    cr_assert_eq(buf_printf(&yaml, "experiments:\n  - name: exp\n    route: chat\n    arms:\n"
                                   "      - {name: only, backends: [a]}\n"),
                 0);
    start_routers(1, "a", "    rate_limits: {rpm: 1}\n");
    cr_assert_eq(chat(0, "x-user-id: u1\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(chat(0, "x-user-id: u1\r\n", body), 0);
    cr_assert_eq(resp.status, 429);
    support_proc_stop(&routers[0]);
    rec = support_last_json_line(log_path);
    cr_assert_not_null(rec);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valueint, 429);
    cr_assert(cJSON_IsString(cJSON_GetObjectItem(rec, "arm")), "no arm");
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "arm")->valuestring, "only");
    cr_assert(cJSON_IsString(cJSON_GetObjectItem(rec, "experiment")), "no experiment");
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "experiment")->valuestring, "exp");
    cJSON_Delete(rec);
}

/* An arm with no backend for the request's API is, to that API's
 * clients in the arm, what a route with none is: 404 model_not_found,
 * not a 503 their SDKs retry forever. */
Test(costs, an_arm_with_no_backend_for_the_api_answers_as_a_route_with_none)
{
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":5," MSG "}";
    const char *code;
    cJSON *rec;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    add_backend_with("b", mock_b.port, 1, 1, 1, NULL, ", api: anthropic, api_key: k-b");
    cr_assert_eq(buf_printf(&yaml, "experiments:\n  - name: exp\n    route: chat\n    arms:\n"
                                   "      - {name: claude, backends: [b]}\n"),
                 0);
    start_routers(1, "a, b", NULL);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 404, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    code = cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")->valuestring;
    cr_assert_str_eq(code, "model_not_found");
    cr_assert_null(support_http_header(&resp, "retry-after"));
    /* Its clients of the Messages API are served in the arm. */
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/messages",
                           "x-api-key: " KEY "\r\nanthropic-version: 2023-06-01\r\n", body),
                 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    support_proc_stop(&routers[0]);
    rec = support_last_json_line(log_path);
    cr_assert_not_null(rec);
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "arm")->valuestring, "claude");
    cJSON_Delete(rec);
}

/* Every answer to a request of a tenant with rpm/tpm says where its
 * limits stand, the router's own refusals too: the budget's 429 and the
 * 503 of no backend had no x-ratelimit-* (a proxied answer and the rate
 * limit's 429 had). */
Test(costs, the_routers_own_refusals_carry_the_rate_limit_headers)
{
    const char body[] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}";

    add_a_up_and_b_down(100);
    /* $0.0019 a request on a: one fits in $0.003, not two. */
    start_routers(1, "a", "    budget: {daily_usd: 0.003, on_exhausted: reject}\n"
                          "    rate_limits: {rpm: 100, tpm: 100000}\n");
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(only_header("x-ratelimit-limit-requests"), "100");
    cr_assert_eq(chat(0, "x-mock-tokens: 10\r\n", body), 0);
    cr_assert_eq(resp.status, 429);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")->valuestring,
                     "budget_exhausted");
    cr_assert_str_eq(only_header("x-ratelimit-limit-requests"), "100");
    cr_assert_str_eq(only_header("x-ratelimit-remaining-requests"), "98");
    cr_assert_str_eq(only_header("x-ratelimit-limit-tokens"), "100000");
    support_proc_stop(&routers[0]);
    /* A 503: the one backend down. */
    start_routers(1, "b", "    rate_limits: {rpm: 100}\n");
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_geq(resp.status, 500);
    cr_assert_str_eq(only_header("x-ratelimit-limit-requests"), "100");
    cr_assert_str_eq(only_header("x-ratelimit-remaining-requests"), "99");
}

#define SLO_STREAM "{\"model\":\"chat\",\"stream\":true,\"max_tokens\":8," MSG "}"

/* Put a chat with `body` and KEY in `req`, for burst_served_by. */
static void chat_in_req(const char *body)
{
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", AUTH, body), 0);
}

/* The pool: one replica, 2 concurrent, 800 ms a request (8 tokens x
 * 100 ms). Cheap while it has headroom; the API tier is dear. A tenant
 * with a 600 ms SLO. Then three streams one at a time, to their end:
 * always the pool (they teach the router its 800 ms). */
static void start_pool_and_api_tier(void)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--tokens", "8", "--token-delay-ms", "100", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    cr_assert_eq(buf_printf(&yaml,
                            "  - {name: gpu, kind: self_hosted, url: \"http://127.0.0.1:%d/v1\",\n"
                            "     quality: 1, context_window: 100000, gpu_hourly_usd: 1, replicas: 1,\n"
                            "     max_concurrency: 2, tokens_per_second: 1000}\n",
                            mock_a.port),
                 0);
    add_backend("api", mock_b.port, 1, 1000, 1000);
    start_routers(1, "gpu, api", "    slo: {max_ttft_ms: 600}\n");
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(chat(0, NULL, SLO_STREAM), 0);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "gpu");
    }
    chat_in_req(SLO_STREAM);
}

/* Six streams at once. Predicted TTFT with n in flight is
 * ttft + max(0, n - 2 + 1) x 800 / 2: n = 0, 1, 2 give ttft + <= 400 ms,
 * within the 600 ms SLO (ttft is a few ms, more under sanitizers); from
 * n = 3 it is >= 800 ms, so those go to the API. */
static void six_streams_three_on_the_pool(void)
{
    struct support_sse s[6];
    char got[6][16];

    for (int i = 0; i < 6; i++) {
        memset(&s[i], 0, sizeof(s[i]));
        int rc = support_sse_open(&s[i], routers[0].port, req.data, req.len, TIMEOUT_MS);
        const char *b = rc == 0 ? support_http_header(&s[i].resp, "x-costrouter-backend") : NULL;
        snprintf(got[i], sizeof(got[i]), "%s", b ? b : "(none)");
    }
    for (int i = 0; i < 6; i++)
        support_sse_close(&s[i]);
    for (int i = 0; i < 6; i++)
        cr_assert_str_eq(got[i], i < 3 ? "gpu" : "api", "stream %d went to %s", i, got[i]);
}

/* Six copies of the request in `req` that reach router 0 together: how
 * many the backend `name` served. */
static int burst_served_by(const char *name)
{
    struct support_http_conn conns[6];
    struct support_http_response got[6];
    int on = 0;

    for (int i = 0; i < 6; i++)
        cr_assert_eq(support_http_connect(&conns[i], routers[0].port), 0);
    usleep(100 * 1000); /* all accepted: the requests below arrive together */
    for (int i = 0; i < 6; i++)
        cr_assert_eq(support_http_send(&conns[i], req.data, req.len), 0);
    for (int i = 0; i < 6; i++) {
        memset(&got[i], 0, sizeof(got[i]));
        cr_assert_eq(support_http_read(&conns[i], &got[i], TIMEOUT_MS), 0);
        cr_assert_eq(got[i].status, 200);
        on += strcmp(support_http_header(&got[i], "x-costrouter-backend"), name) == 0;
        support_http_close(&conns[i]);
        support_http_response_free(&got[i]);
    }
    return on;
}

/* A burst: six requests reach the router together, so each is chosen
 * before any of the others has begun on the pool (the reservation comes
 * first). Those chosen and not begun yet are the pool's load as much as
 * those begun: without them, the prediction saw an idle pool for all six,
 * and all six queued there past the SLO. As one by one, three go to the
 * pool and the rest spill. */
Test(costs, a_burst_spills_from_the_gpu_pool_as_requests_one_by_one_do)
{
    start_pool_and_api_tier();
    int on_gpu = burst_served_by("gpu");
    cr_assert_eq(on_gpu, 3, "%d of the 6 went to the pool", on_gpu);
    /* All answered: none still counts as load (two would add 400 ms). */
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/backends", ADMIN, NULL), 0);
    double predicted = cJSON_GetObjectItem(cJSON_GetArrayItem(body_json(), 0),
                                           "stream_predicted_ttft_ms")->valuedouble;
    cr_assert(predicted < 400, "predicted TTFT %g ms on an idle pool", predicted);
}

/* A route may have 64 candidates, and the cost log gives each its
 * verdict: it stopped at the 16th, so a request served by a later one was
 * logged without the backend it went to among its candidates, nor why
 * the others were passed over. */
Test(costs, the_cost_log_gives_every_candidate_of_a_long_route)
{
    char names[20 * 8] = "", name[8];
    cJSON *rec, *cands, *last;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    for (int i = 0; i < 20; i++) {
        snprintf(name, sizeof(name), "b%d", i);
        add_backend(name, mock_a.port, 1, i == 19 ? 1 : 100, 100); /* the last is cheapest */
        strcat(names, i ? ", " : "");
        strcat(names, name);
    }
    start_routers(1, names, NULL);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"max_tokens\":5," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b19");
    support_proc_stop(&routers[0]);
    rec = support_last_json_line(log_path);
    cr_assert_not_null(rec);
    cands = cJSON_GetObjectItem(rec, "candidates");
    cr_assert_eq(cJSON_GetArraySize(cands), 20, "%d candidates logged", cJSON_GetArraySize(cands));
    last = cJSON_GetArrayItem(cands, 19);
    cr_assert_str_eq(cJSON_GetObjectItem(last, "backend")->valuestring, "b19");
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(last, "rejected")));
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(cands, 0), "rejected")->valuestring,
                     "costlier");
    cJSON_Delete(rec);
}

Test(costs, gpu_pool_spills_to_the_api_tier_only_when_the_slo_would_break)
{
    start_pool_and_api_tier();
    six_streams_three_on_the_pool();
}

/* A request's duration teaches the pool's queue only when it ran to its
 * end: one whose client left after its first token says nothing of how
 * long the pool takes. Taken as samples, five such brought the 800 ms
 * average to about 330 ms, and streams that the SLO should have sent to
 * the API tier queued on the pool. */
Test(costs, a_stream_cut_short_is_no_duration_sample)
{
    struct support_sse s = {0};
    struct support_sse_event ev;

    start_pool_and_api_tier();
    for (int i = 0; i < 5; i++) { /* one at a time, each client leaving after a token */
        memset(&s, 0, sizeof(s));
        cr_assert_eq(support_sse_open(&s, routers[0].port, req.data, req.len, TIMEOUT_MS), 0);
        cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), "gpu");
        cr_assert_eq(support_sse_next(&s, &ev, TIMEOUT_MS), 1);
        support_sse_close(&s);
        usleep(50 * 1000); /* the router sees it leave */
    }
    six_streams_three_on_the_pool();
}

/* A chat on router 0 with `headers` (after AUTH): the backend that served. */
static const char *served_by(const char *headers)
{
    cr_assert_eq(chat(0, headers, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    return support_http_header(&resp, "x-costrouter-backend");
}

/* Send a chat to router 0 that its backend answers after `ttft_ms`, and
 * wait until the router has sent it on. */
static void start_slow(struct support_http_conn *conn, struct buf *out, int ttft_ms)
{
    char headers[128];

    snprintf(headers, sizeof(headers), AUTH "x-mock-ttft-ms: %d\r\n", ttft_ms);
    buf_reset(out);
    send_unanswered(conn, out, headers, "{\"model\":\"chat\"," MSG "}");
    usleep(200 * 1000);
}

/* The cheap backend had a slow spell: its TTFT average broke the tenant's
 * 300 ms SLO and the dear one served. Nothing goes to the cheap one then,
 * so without a re-check its average would never learn that it is fast
 * again. Once the average is older than ttft_stale_ms (1 s here), one
 * request at a time re-measures it (the others keep to the dear one
 * meanwhile): a slow probe keeps it out another interval, a probe whose
 * client left lets the next request probe, a fast probe brings it back. */
Test(costs, a_backend_shut_out_by_a_stale_ttft_average_is_re_checked)
{
    struct support_http_conn probe = {.fd = -1};
    struct support_http_response probe_resp = {0};
    struct buf probe_req = {0};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend_with("cheap", mock_a.port, 1, 1, 1, NULL, ", ttft_stale_ms: 1000");
    add_backend("dear", mock_b.port, 1, 100, 100);
    start_routers(1, "cheap, dear", "    slo: {max_ttft_ms: 300}\n");
    cr_assert_str_eq(served_by("x-mock-ttft-ms: 600\r\n"), "cheap"); /* the slow spell */
    cr_assert_str_eq(served_by(NULL), "dear");

    usleep(1100 * 1000);
    /* The admin API says why cheap's prediction has dropped. */
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/backends", ADMIN, NULL), 0);
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetArrayItem(body_json(), 0), "ttft_probe_due")),
              "%.*s", (int)resp.body.len, resp.body.data);
    start_slow(&probe, &probe_req, 600); /* the probe: still slow */
    cr_assert_str_eq(served_by(NULL), "dear", "a second probe while the first is out");
    cr_assert_eq(support_http_read(&probe, &probe_resp, TIMEOUT_MS), 0);
    cr_assert_str_eq(support_http_header(&probe_resp, "x-costrouter-backend"), "cheap");
    support_http_close(&probe);
    cr_assert_str_eq(served_by(NULL), "dear", "600 ms, fresh from the probe");

    usleep(1100 * 1000);
    start_slow(&probe, &probe_req, 3000);
    support_http_close(&probe); /* the probe's client gives up */
    usleep(200 * 1000);
    cr_assert_str_eq(served_by(NULL), "cheap", "the next request probes");
    cr_assert_str_eq(served_by(NULL), "cheap", "fast again: chosen again");
    support_http_response_free(&probe_resp);
    buf_free(&probe_req);
}

/* A refusal (here a 400) answers fast whatever the backend's speed: it
 * is no time to a first token. Taken as one, a latency probe refused so
 * replaced a slow backend's stale average with a few ms, and SLO traffic
 * went back to a backend still four times too slow until the average
 * climbed back (four requests). The refused probe tells nothing, as one
 * whose client left: the next request probes, and its sample counts. */
Test(costs, a_refusal_is_no_latency_sample)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--ttft-ms", "600", NULL), 0); /* always slow */
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend_with("cheap", mock_a.port, 1, 1, 1, NULL, ", ttft_stale_ms: 1000");
    add_backend("dear", mock_b.port, 1, 100, 100);
    start_routers(1, "cheap, dear", "    slo: {max_ttft_ms: 300}\n");
    cr_assert_str_eq(served_by(NULL), "cheap"); /* unknown yet: measured at 600 ms */
    cr_assert_str_eq(served_by(NULL), "dear");
    usleep(1100 * 1000);
    cr_assert_eq(chat(0, "x-mock-status: 400\r\nx-mock-ttft-ms: 20\r\n",
                      "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap", "the probe");
    cr_assert_str_eq(served_by(NULL), "cheap", "the refused probe told nothing: probe again");
    cr_assert_str_eq(served_by(NULL), "dear", "600 ms, fresh from the probe");
}

/* vLLM and TGI send a stream's head at once and its first token when
 * it comes: the head is no first token. Timed at the head, a backend 600
 * ms from its first token measured ~0 ms and kept SLO traffic whose SLO
 * it broke; timed at its first event, it is 600 ms and passed over. */
Test(costs, a_streams_ttft_is_its_first_events_not_its_heads)
{
    const char body[] = "{\"model\":\"chat\",\"stream\":true," MSG "}";

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("cheap", mock_a.port, 1, 1, 1);
    add_backend("dear", mock_b.port, 1, 100, 100);
    start_routers(1, "cheap, dear", "    slo: {max_ttft_ms: 300}\n");
    cr_assert_eq(chat(0, "x-mock-head-first: 1\r\nx-mock-ttft-ms: 600\r\n", body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear",
                     "600 ms to the first token, 300 ms SLO");
    support_proc_stop(&routers[0]);
    cJSON *rec = support_last_json_line(log_path);
    cr_assert_not_null(rec);
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "backend")->valuestring, "dear");
    cJSON_Delete(rec);
    FILE *f = fopen(log_path, "r");
    char line[4096];
    cr_assert_not_null(f);
    cr_assert_not_null(fgets(line, sizeof(line), f));
    fclose(f);
    rec = cJSON_Parse(line);
    cr_assert_not_null(rec);
    cr_assert_geq(cJSON_GetObjectItem(rec, "ttft_ms")->valuedouble, 600, "the cost log's ttft_ms");
    cJSON_Delete(rec);
}

/* A tenant "warm" (key KEY_WARM) whose quality floor keeps it off the
 * cheap backend: its requests teach the router the dear one's TTFT
 * without touching the cheap one's. */
#define KEY_WARM "sk-cost-warm"

static const char *warm_tenant(const char *slo)
{
    static char extra[512];
    char hex[65];

    support_key_sha256_hex(KEY_WARM, hex);
    snprintf(extra, sizeof(extra),
             "    slo: {%s}\n  - id: warm\n    api_keys: [\"sha256:%s\"]\n"
             "    slo: {min_quality: 2}\n",
             slo, hex);
    return extra;
}

/* A backend with no TTFT sample yet (new, or new to this config) was
 * predicted at 0 ms: a burst of SLO traffic all went to the cheap one,
 * 600 ms from its first token against a 300 ms SLO, though the dear one
 * was measured fast. Unmeasured, it is measured by one request (a latency
 * probe, as a stale average is); while that one is out, the others keep
 * to candidates known to meet the SLO. */
Test(costs, a_burst_does_not_all_go_to_a_backend_never_measured)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--ttft-ms", "600", NULL), 0); /* slow */
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("cheap", mock_a.port, 1, 1, 1);
    add_backend("dear", mock_b.port, 2, 100, 100);
    start_routers(1, "cheap, dear", warm_tenant("max_ttft_ms: 300"));
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(key_chat(KEY_WARM, "{\"model\":\"chat\"," MSG "}"), 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear");
    }
    chat_in_req("{\"model\":\"chat\"," MSG "}");
    int on_cheap = burst_served_by("cheap");
    cr_assert_eq(on_cheap, 1, "%d of the 6 went to the backend never measured", on_cheap);
    /* Measured now at 600 ms: none of the next. */
    cr_assert_eq(burst_served_by("cheap"), 0);
    /* A reload that keeps both as they were keeps what was measured:
     * started afresh, both were never measured again, and after a probe
     * on each the burst went to the slow one, the cheapest. */
    reload_router();
    chat_in_req("{\"model\":\"chat\"," MSG "}");
    on_cheap = burst_served_by("cheap");
    cr_assert_eq(on_cheap, 0, "%d of the 6 went to the slow one after a reload", on_cheap);
}

#define PLAIN_CHAT "{\"model\":\"chat\"," MSG "}"
#define STREAM_CHAT "{\"model\":\"chat\",\"stream\":true," MSG "}"

static const cJSON *report_chat_route(void);

/* The record of request `id` in the cost log (the routers stopped;
 * caller frees), or a failed test. */
static cJSON *record_of(const char *id)
{
    FILE *f = fopen(log_path, "r");
    char line[16384];
    cJSON *rec = NULL;

    cr_assert_not_null(f);
    while (rec == NULL && fgets(line, sizeof(line), f) != NULL) {
        const char *its;

        rec = cJSON_Parse(line);
        its = cJSON_GetStringValue(cJSON_GetObjectItem(rec, "request_id"));
        if (its == NULL || strcmp(its, id) != 0) {
            cJSON_Delete(rec);
            rec = NULL;
        }
    }
    fclose(f);
    cr_assert_not_null(rec, "no record of request %s", id);
    return rec;
}

/* The verdict logged for candidate `i` of `rec`, NULL when none (chosen). */
static const char *verdict_of(const cJSON *rec, int i)
{
    const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItem(rec, "candidates"), i);

    return cJSON_GetStringValue(cJSON_GetObjectItem(c, "rejected"));
}

/* "cheap" never measured, "dear" measured (plain and stream) by the warm
 * tenant; the tenant's SLO: 300 ms. */
static void start_cheap_unmeasured(void)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("cheap", mock_a.port, 1, 1, 1);
    add_backend("dear", mock_b.port, 2, 100, 100);
    start_routers(1, "cheap, dear", warm_tenant("max_ttft_ms: 300"));
    cr_assert_eq(key_chat(KEY_WARM, PLAIN_CHAT), 200);
    cr_assert_eq(key_chat(KEY_WARM, STREAM_CHAT), 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear");
}

/* The field `name` of the route's first backend (cheap) in the admin API. */
static const cJSON *first_backend_admin(const char *name)
{
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/backends", ADMIN, NULL), 0);
    return cJSON_GetObjectItem(cJSON_GetArrayItem(body_json(), 0), name);
}

/* A backend has a latency probe for each kind of answer. cheap's stream
 * probe is out (its first token 3 s away) when its plain probe fails (a
 * 500): that failure ended both probes, and the next SLO stream went to
 * cheap as a second stream probe, on a prediction of 0 ms nobody had
 * measured. A failure ends only the failed attempt's own probe. */
Test(costs, a_failed_plain_probe_leaves_the_stream_probe_out)
{
    struct support_http_conn probe = {.fd = -1};
    struct buf probe_req = {0};

    start_cheap_unmeasured();
    send_unanswered(&probe, &probe_req, AUTH "x-mock-ttft-ms: 3000\r\n", STREAM_CHAT);
    usleep(200 * 1000); /* the stream probe is out on cheap */
    cr_assert(cJSON_IsFalse(first_backend_admin("stream_ttft_probe_due")));
    cr_assert_eq(chat(0, "x-mock-status: 500\r\n", PLAIN_CHAT), 0); /* the plain probe fails */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 2,
                 "the plain probe did not go to cheap");
    cr_assert(cJSON_IsTrue(first_backend_admin("ttft_probe_due")),
              "the failed plain probe is over");
    cr_assert(cJSON_IsFalse(first_backend_admin("stream_ttft_probe_due")),
              "the stream probe is still out: %.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(chat(0, NULL, STREAM_CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear",
                     "a second stream probe on cheap");
    support_http_close(&probe);
    buf_free(&probe_req);
}

/* While cheap's first latency probe is out, SLO traffic passes it over:
 * its prediction, 0 ms, is a guess. The cost log said "slo", which reads
 * as a predicted TTFT above the SLO, while the admin API showed 0 ms
 * below it. It says "unmeasured", and `costrouter report` reads it. */
Test(costs, a_backend_being_measured_is_logged_unmeasured)
{
    struct support_http_conn probe = {.fd = -1};
    struct support_http_response probe_resp = {0};
    struct buf probe_req = {0};
    char id[64];
    cJSON *rec;

    start_cheap_unmeasured();
    send_unanswered(&probe, &probe_req, AUTH "x-mock-ttft-ms: 1000\r\n", PLAIN_CHAT);
    usleep(200 * 1000); /* the plain probe is out on cheap */
    cr_assert_eq(chat(0, NULL, PLAIN_CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear");
    snprintf(id, sizeof(id), "%s", support_http_header(&resp, "x-request-id"));
    cr_assert_eq(support_http_read(&probe, &probe_resp, TIMEOUT_MS), 0);
    cr_assert_str_eq(support_http_header(&probe_resp, "x-costrouter-backend"), "cheap");
    support_proc_stop(&routers[0]);
    rec = record_of(id);
    cr_assert_str_eq(verdict_of(rec, 0), "unmeasured");
    cr_assert_null(verdict_of(rec, 1));
    cJSON_Delete(rec);
    report_chat_route();
    cr_assert_eq(cJSON_GetObjectItem(json, "lines")->valuedouble, 4);
    cr_assert_eq(cJSON_GetObjectItem(json, "bad_lines")->valuedouble, 0);
    support_http_close(&probe);
    support_http_response_free(&probe_resp);
    buf_free(&probe_req);
}

/* "cheap" sends a stream's first token at once and a plain answer whole
 * when its 8th token is made, 1050 ms later (as servers do); "dear" is
 * fast and dear. The tenant's SLO: 300 ms. The first stream measures
 * cheap's first token. */
static void start_fast_first_token_slow_answer(void)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--tokens", "8", "--token-delay-ms", "150", NULL),
                 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("cheap", mock_a.port, 2, 1, 1);
    add_backend("dear", mock_b.port, 2, 100, 100);
    start_routers(1, "cheap, dear", warm_tenant("max_ttft_ms: 300"));
    cr_assert_eq(chat(0, NULL, STREAM_CHAT), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
}

/* A plain answer's sample is its head, which comes with its last token;
 * a stream's is its first token. In one average, another tenant's long
 * plain answers (three of 1050 ms) took cheap's TTFT past the SLO, and
 * streams, whose first token it sends at once, went to the dear one.
 * Each kind is predicted from its own samples. */
Test(costs, long_plain_answers_do_not_keep_streams_from_a_fast_first_token)
{
    start_fast_first_token_slow_answer();
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(key_chat(KEY_WARM, PLAIN_CHAT), 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
    }
    cr_assert_eq(chat(0, NULL, STREAM_CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap",
                     "its first token comes at once");
    cr_assert_eq(chat(0, NULL, PLAIN_CHAT), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear",
                     "a plain answer there comes after 1050 ms");
}

/* The other way: fast first tokens of streams predicted a plain answer,
 * which its client gets only whole, at a few ms, and the tenant's plain
 * requests kept going to a backend that answers them in 1050 ms. */
Test(costs, fast_first_tokens_do_not_send_plain_requests_to_slow_answers)
{
    start_fast_first_token_slow_answer();
    cr_assert_eq(chat(0, NULL, PLAIN_CHAT), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap",
                     "no plain answer measured yet");
    cr_assert_eq(chat(0, NULL, PLAIN_CHAT), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear",
                     "a plain answer there comes after 1050 ms");
    cr_assert_eq(chat(0, NULL, STREAM_CHAT), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
}

/* POST `path` (a Messages endpoint) to router 0 with KEY as x-api-key
 * and `body`; the status. */
static int messages_call(const char *path, const char *body)
{
    cr_assert_eq(call_port(routers[0].port, "POST", path,
                           "x-api-key: " KEY "\r\nanthropic-version: 2023-06-01\r\n", body),
                 0);
    return resp.status;
}

#define MESSAGES_BODY "{\"model\":\"chat\",\"max_tokens\":10," MSG "}"

/* A count (/v1/messages/count_tokens) is answered as soon as the
 * backend has counted, however long its messages take: its answer is no
 * time to a message's first token. Taken as one, the count sent to
 * "cheap" (never measured: its latency probe) measured it at a few ms,
 * though its plain messages come whole after 1050 ms, and the burst of
 * SLO messages that followed all went there, each past the 300 ms SLO.
 * The count tells nothing: cheap is still to be measured, by one of the
 * burst, and the rest go to "dear", measured within the SLO. */
Test(costs, a_token_count_is_no_latency_sample)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--tokens", "8", "--token-delay-ms", "150", NULL),
                 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend_with("cheap", mock_a.port, 1, 1, 1, NULL, ", api: anthropic, api_key: k-a");
    add_backend_with("dear", mock_b.port, 2, 100, 100, NULL, ", api: anthropic, api_key: k-b");
    start_routers(1, "cheap, dear", warm_tenant("max_ttft_ms: 300"));
    for (int i = 0; i < 2; i++) { /* warm: dear is fast */
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/messages",
                               "x-api-key: " KEY_WARM "\r\nanthropic-version: 2023-06-01\r\n",
                               MESSAGES_BODY),
                     0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "dear");
    }
    cr_assert_eq(messages_call("/v1/messages/count_tokens", "{\"model\":\"chat\"," MSG "}"), 200,
                 "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap",
                     "predicted first (0 ms, never measured)");
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/backends", ADMIN, NULL), 0);
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetArrayItem(body_json(), 0),
                                               "ttft_probe_due")),
              "cheap measured by a count: %.*s", (int)resp.body.len, resp.body.data);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/messages",
                                     "x-api-key: " KEY "\r\nanthropic-version: 2023-06-01\r\n",
                                     MESSAGES_BODY),
                 0);
    int on_cheap = burst_served_by("cheap");
    cr_assert_eq(on_cheap, 1, "%d of the 6 went to cheap, 1050 ms a message", on_cheap);
}

static const char *cut_auth = AUTH; /* the key tokens_before_the_cut_cost streams with */
static const char *cut_cap = "";     /* members before its body's messages (a max_tokens) */
static char cut_error[512];          /* the data of the last cut's error event */

/* Stream 1000 tokens from router 0 with `headers` (after cut_auth, each
 * line ending in CRLF): the events before a budget_exhausted error event,
 * which must come. */
static int tokens_before_the_cut_cost(const char *headers, double *cost)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    char all[256], body[256];
    const char *trailer;
    int n = 0, saw_error = 0;

    snprintf(all, sizeof(all), "%sx-mock-tokens: 1000\r\n%s", cut_auth, headers);
    snprintf(body, sizeof(body), "{\"model\":\"chat\",\"stream\":true,%s" MSG "}", cut_cap);
    open_chat_stream(&s, all, body);
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1) {
        if (strstr(ev.data, "budget_exhausted")) {
            saw_error = 1;
            snprintf(cut_error, sizeof(cut_error), "%s", ev.data);
        } else {
            n++;
        }
    }
    cr_assert(saw_error, "no budget error event");
    /* The cut stream ends as any other: with what it cost. */
    trailer = support_http_header(&s.resp, "x-costrouter-cost-usd");
    cr_assert_not_null(trailer, "no cost trailer after the cut");
    *cost = strtod(trailer, NULL);
    support_sse_close(&s);
    return n;
}

static int tokens_before_the_cut(const char *headers)
{
    double cost;

    return tokens_before_the_cut_cost(headers, &cost);
}

/* A stream without max_tokens at $0.01 a completion token, with `budget`
 * for the tenant (on_overrun: cut), is cut at about 300 tokens: its hold
 * assumes 256 ($2.56 + prompt) and $3 is what binds. What was streamed is
 * charged, not the event the cut held back: the tokens the client got,
 * and the prompt's (under $0.0001 here). Returns the admin API's spend
 * object of the tenant. */
static cJSON *cut_at_three_dollars(const char *budget)
{
    char tenant[128];
    double cost;
    int n;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 10000);
    snprintf(tenant, sizeof(tenant),
             "    budget: {%s, on_exhausted: reject, on_overrun: cut}\n", budget);
    start_routers(1, "a", tenant);
    n = tokens_before_the_cut_cost("", &cost);
    cr_assert(n >= 290 && n <= 310, "%d tokens streamed before the cut", n);
    cr_assert(cost - n * 0.01 >= 0 && cost - n * 0.01 < 0.0001, "charged $%f for %d tokens",
              cost, n);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble, cost, 1e-9);
    return json;
}

Test(costs, on_overrun_cut_ends_a_stream_when_the_budget_is_gone)
{
    double spent = cJSON_GetObjectItem(cut_at_three_dollars("daily_usd: 3"), "day_usd")->valuedouble;

    cr_assert(spent <= 3, "spent $%f, over the budget", spent);
}

/* The same for a stream whose max_tokens caps nothing: -1, which LM
 * Studio and llama.cpp (and mockllm) read as no limit. It was taken for a
 * cap, so the stream was never cut and spent what it liked. */
Test(costs, on_overrun_cut_ends_a_stream_whose_max_tokens_caps_nothing)
{
    double spent;

    cut_cap = "\"max_tokens\":-1,";
    spent = cJSON_GetObjectItem(cut_at_three_dollars("daily_usd: 3"), "day_usd")->valuedouble;
    cut_cap = "";
    cr_assert(spent <= 3, "spent $%f, over the budget", spent);
}

/* The same when it is the key's own budget that is $3, in a tenant's $100. */
Test(costs, on_overrun_cut_ends_a_stream_when_its_keys_budget_is_gone)
{
    const cJSON *ci;

    key_ci_budget("daily_usd: 3");
    cut_auth = "Authorization: Bearer " KEY_CI "\r\n";
    ci = cJSON_GetArrayItem(cJSON_GetObjectItem(cut_at_three_dollars("daily_usd: 100"), "keys"), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "day_usd")->valuedouble,
                       cJSON_GetObjectItem(json, "day_usd")->valuedouble, 1e-9);
    cr_assert(cJSON_GetObjectItem(ci, "day_usd")->valuedouble <= 3, "over the key's budget");
    /* Named as a refusal by the key's budget is (it said "budget
     * exhausted: budget exhausted mid-stream (the key's own budget)"). */
    cr_assert(strstr(cut_error, "\"budget exhausted: key \\\"ci\\\" of acme (the key's own "
                                "budget), mid-stream\"") != NULL,
              "%s", cut_error);
}

/* A stream cut by on_overrun at its first token: at $0.01 a token, each
 * way, eight answers of no token have the next hold the prompt alone
 * ($0.09), and $0.095 is left, less than its first token would bring it
 * to. The client got no token (the event that would pass the budget is
 * neither sent nor charged): no ttft_ms in the cost log, no
 * costrouter_ttft_seconds sample. It was logged with the cut token's
 * time. The backend did send that token, its real time to it: that stays
 * its latency sample. */
#define TTFT_SAMPLES_A "costrouter_ttft_seconds_count{backend=\"a\"}"

Test(costs, a_stream_cut_at_its_first_token_has_no_ttft)
{
    double cost, samples;
    cJSON *rec;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_counted("a", mock_a.port, 1, 10000, 10000, "cl100k_base");
    start_routers(1, "a", "    budget: {daily_usd: 0.815, on_exhausted: reject, on_overrun: cut}\n");
    for (int i = 0; i < 8; i++) { /* $0.09 each */
        cr_assert_eq(chat(0, "x-mock-tokens: 0\r\n", "{\"model\":\"chat\",\"max_tokens\":1," MSG "}"),
                     0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    }
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    samples = metric_value(TTFT_SAMPLES_A);
    cr_assert_eq(tokens_before_the_cut_cost("x-mock-ttft-ms: 100\r\n", &cost), 0,
                 "cut at its first token");
    cr_assert_float_eq(cost, 0.09, 1e-9, "its prompt alone");
    cr_assert_geq(first_backend_admin("stream_ttft_ewma_ms")->valuedouble, 100,
                  "the backend's first token is its sample");
    cr_assert(cJSON_IsFalse(first_backend_admin("stream_ttft_probe_due")));
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value(TTFT_SAMPLES_A), samples,
                 "a TTFT sample of a stream whose client got no token");
    rec = record_last(&routers[0], log_path);
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "reason")->valuestring, "budget-cut");
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(rec, "ttft_ms")), "ttft_ms %g",
              cJSON_GetObjectItem(rec, "ttft_ms")->valuedouble);
    cJSON_Delete(rec);
}

/* The stream's own reservation answer counted another request's hold,
 * which then settled at a fraction of it: the cut waits for the money
 * really left, checked in the store, not for what the hold had left. */
Test(costs, on_overrun_cut_checks_the_store_before_cutting)
{
    struct support_http_conn hold = {.fd = -1};
    struct support_http_response hold_resp = {0};
    struct buf hold_req = {0};
    int n;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 10000); /* $0.01 per completion token */
    /* The hold reserves 250 tokens ($2.50) for half a second and settles
     * at 1 ($0.01). The stream reserves 256 ($2.56): with the hold counted
     * it could run to about 350 tokens of the $6; without, to about 600. */
    start_routers(1, "a", "    budget: {daily_usd: 6, on_exhausted: reject, on_overrun: cut}\n");
    send_unanswered(&hold, &hold_req, AUTH "x-mock-tokens: 1\r\nx-mock-ttft-ms: 500\r\n",
                    "{\"model\":\"chat\",\"max_tokens\":250," MSG "}");
    usleep(200 * 1000); /* reserved by now */

    n = tokens_before_the_cut("x-mock-token-delay-ms: 2\r\n");
    cr_assert_eq(support_http_read(&hold, &hold_resp, TIMEOUT_MS), 0);
    cr_assert_eq(hold_resp.status, 200);
    cr_assert(n >= 580 && n <= 620, "%d tokens streamed before the cut", n);
    support_http_close(&hold);
    support_http_response_free(&hold_resp);
    buf_free(&hold_req);
}

/* Three streams at once: what is left past their holds is one budget's
 * rest, not each stream's. With $9 at $0.01 a token, each holds 256
 * tokens ($2.56) and $1.32 is left: each ran to $3.88 and the three
 * spent $11.64 of the $9. */
Test(costs, on_overrun_cut_shares_the_rest_among_streams)
{
    struct support_sse s[3] = {0};
    struct support_sse_event ev;
    char body[256];
    double spent;
    int cut = 0;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 10000);
    start_routers(1, "a", "    budget: {daily_usd: 9, on_exhausted: reject, on_overrun: cut}\n");
    snprintf(body, sizeof(body), "{\"model\":\"chat\",\"stream\":true," MSG "}");
    for (int i = 0; i < 3; i++)
        open_chat_stream(&s[i], AUTH "x-mock-tokens: 1000\r\nx-mock-token-delay-ms: 2\r\n",
                         body);
    for (int i = 0; i < 3; i++) {
        while (support_sse_next(&s[i], &ev, TIMEOUT_MS) == 1)
            cut += strstr(ev.data, "budget_exhausted") != NULL;
        support_sse_close(&s[i]);
    }
    cr_assert_eq(cut, 3, "%d of the 3 streams cut", cut);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    spent = cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble;
    cr_assert(spent <= 9 && spent > 8.9, "spent $%f of the $9", spent);
}

/* A stream that ran past its hold spent part of the rest: a request that
 * comes meanwhile may not hold it again. Of $5, the stream holds $2.56;
 * 400 tokens in it has run $1.44 past that, and $1 is left, too little
 * for 150 tokens ($1.50). Admitted, it spent $1.50 the stream had, and the
 * two came to $5.50. */
Test(costs, a_hold_does_not_take_what_a_stream_ran_past_its_own)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    char body[256];
    double spent;
    int n = 0, r;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 10000);
    start_routers(1, "a", "    budget: {daily_usd: 5, on_exhausted: reject, on_overrun: cut}\n");
    snprintf(body, sizeof(body), "{\"model\":\"chat\",\"stream\":true," MSG "}");
    open_chat_stream(&s, AUTH "x-mock-tokens: 1000\r\nx-mock-token-delay-ms: 10\r\n", body);
    while (n < 400 && (r = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        n++;
    cr_assert_eq(n, 400);
    cr_assert_eq(chat(0, "x-mock-tokens: 150\r\n", "{\"model\":\"chat\",\"max_tokens\":150," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 429, "%d: %.*s", resp.status, (int)resp.body.len, resp.body.data);
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
        ;
    support_sse_close(&s);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    spent = cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble;
    cr_assert(spent <= 5, "spent $%f of the $5", spent);
}

Test(costs, reload_applies_a_valid_config_and_keeps_the_old_on_errors)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int rc, n = 0;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    add_backend("b", mock_b.port, 1, 100, 300);
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    int port = routers[0].port;
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    double paid = header_usd("x-costrouter-cost-usd");

    /* A stream in flight across the reload finishes on the old config. */
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-tokens: 10\r\nx-mock-token-delay-ms: 50\r\n",
                                     "{\"model\":\"chat\",\"stream\":true," MSG "}"),
                 0);
    cr_assert_eq(support_sse_open(&s, port, req.data, req.len, TIMEOUT_MS), 0);
    cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), "a");

    write_conf("b", "    budget: {daily_usd: 10}\n");
    cr_assert_eq(call_port(port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        n++;
    support_sse_close(&s);
    cr_assert_eq(rc, 0, "the stream in flight was cut by the reload");
    cr_assert_eq(n, 11, "10 tokens and [DONE], got %d", n);

    /* Spend carries over (same in-process store). */
    cr_assert_eq(call_port(port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_gt(cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble, paid);

    /* A broken config is refused with its errors; the running one stays. */
    FILE *f = fopen(conf_path, "a");
    fprintf(f, "bogus_key: 1\n");
    fclose(f);
    cr_assert_eq(call_port(port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 400);
    const char *msg = cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "message")->valuestring;
    cr_assert_not_null(strstr(msg, "bogus_key"), "%s", msg);
    cr_assert_not_null(strstr(msg, conf_path), "errors name the file: %s", msg);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");

    /* SIGHUP does the same as the endpoint. */
    write_conf("a", "    budget: {daily_usd: 10}\n");
    kill(routers[0].pid, SIGHUP);
    for (int i = 0; i < 50; i++) {
        usleep(20000);
        cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
        if (strcmp(support_http_header(&resp, "x-costrouter-backend"), "a") == 0)
            break;
    }
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_eq(call_port(port, "GET", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 405);
    support_proc_stop(&routers[0]);
    cr_assert(support_proc_exited_cleanly(&routers[0]), "exit status %d", routers[0].status);
}

/* A response the old config's upstream is still sending when a reload
 * comes is read to its end (the parsers of both generations share their
 * callbacks, which the reload must not reset), with no other request to
 * paper over it. */
Test(costs, a_reload_lets_answers_in_flight_arrive)
{
    struct support_http_conn slow;
    struct support_http_response r = {0};
    struct buf chat_req = {0};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    send_unanswered(&slow, &chat_req, AUTH "x-mock-ttft-ms: 400\r\n",
                    "{\"model\":\"chat\"," MSG "}");
    usleep(100 * 1000); /* the request is with the backend */
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(support_http_read(&slow, &r, 3000), 0, "the answer in flight never came");
    cr_assert_eq(r.status, 200);
    support_http_response_free(&r);
    support_http_close(&slow);
    buf_free(&chat_req);
}

/* A reload closes idle keep-alive connections, but not one accepted a
 * moment before it that has not had its request yet: that request is
 * answered (on the config it arrived under), then the connection closes.
 * An idle keep-alive one is closed by the reload. */
Test(costs, a_reload_answers_a_connection_that_had_no_request_yet)
{
    struct support_http_conn fresh, kept;
    struct support_http_response r = {0};
    struct buf chat_req = {0};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    cr_assert_eq(support_http_format(&chat_req, "POST", "/v1/chat/completions", AUTH,
                                     "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(support_http_connect(&kept, routers[0].port), 0);
    cr_assert_eq(support_http_send(&kept, chat_req.data, chat_req.len), 0);
    cr_assert_eq(support_http_read(&kept, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    support_http_response_free(&r);
    cr_assert_eq(support_http_connect(&fresh, routers[0].port), 0);

    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(support_http_send(&fresh, chat_req.data, chat_req.len), 0);
    cr_assert_eq(support_http_read(&fresh, &r, TIMEOUT_MS), 0, "the fresh connection was dropped");
    cr_assert_eq(r.status, 200);
    cr_assert_str_eq(support_http_header(&r, "connection"), "close");
    support_http_response_free(&r);
    cr_assert_lt(support_http_read(&fresh, &r, TIMEOUT_MS), 0, "closed after its answer");
    support_http_response_free(&r);
    (void)!support_http_send(&kept, chat_req.data, chat_req.len); /* may fail: closed */
    cr_assert_lt(support_http_read(&kept, &r, TIMEOUT_MS), 0, "the idle keep-alive one is closed");
    support_http_response_free(&r);
    support_http_close(&fresh);
    support_http_close(&kept);
    buf_free(&chat_req);
    support_proc_stop(&routers[0]);
    cr_assert(support_proc_exited_cleanly(&routers[0]), "exit status %d", routers[0].status);
}


/* A tenant whose quality floor no backend of the route reaches is never
 * served there however long it waits: a 403 naming the model and the
 * qualities (a 503 would have the SDKs retry in vain), nothing upstream,
 * and the reason in the cost log. */
Test(costs, a_route_below_the_tenants_quality_floor_is_a_403)
{
    cJSON *rec;
    const char *msg;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("good", mock_a.port, 3, 1, 1);
    add_backend("cheap", mock_b.port, 1, 1, 1);
    add_backend("great", mock_b.port, 9, 1, 1);
    /* Route "chat" below the floor; a second route, "premium", above it
     * (a floor above every route's candidates is a config error). */
    start_routers(1, "good, cheap]}\n  - {model: premium, candidates: [great",
                  "    slo: {min_quality: 5}\n");
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 403, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_null(support_http_header(&resp, "retry-after"));
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")
                         ->valuestring,
                     "below_quality_floor");
    msg = cJSON_GetObjectItem(cJSON_GetObjectItem(json, "error"), "message")->valuestring;
    cr_assert_not_null(strstr(msg, "model \"chat\": the best backend it may use has quality 3, "
                                   "the floor is 5"),
                       "%s", msg);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 0);
    cr_assert_eq(call_port(mock_b.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 0);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    cr_assert_str_eq(cJSON_GetObjectItem(rec, "reason")->valuestring, "below-quality-floor");
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 403);
    cJSON_Delete(rec);
}

/* A backend that sends no usage is charged for the text it answered,
 * counted with its tokenizer, not as if the answer were empty. */
Test(costs, an_answer_without_usage_is_charged_for_its_text)
{
    struct policy_tokens *t = NULL;
    char dir[4096];
    const char *text;
    int64_t completion;
    cJSON *rec;

    snprintf(dir, sizeof(dir), "%s/data/tokens", fixture_src());
    cr_assert_eq(policy_tokens_load_some(&t, dir, 1u << CONF_TOK_LLAMA3), 0);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_counted("a", mock_a.port, 1, 100, 300, "llama3");
    start_routers(1, "a", NULL);
    cr_assert_eq(chat(0, "x-mock-tokens: 12\r\nx-mock-usage: omit\r\n",
                      "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_null(cJSON_GetObjectItem(body_json(), "usage"), "the mock sent usage");
    text = cJSON_GetObjectItem(
               cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(json, "choices"), 0),
                                   "message"),
               "content")
               ->valuestring;
    completion = policy_tokens_count(t, CONF_TOK_LLAMA3, text, strlen(text));
    policy_tokens_free(t);
    cr_assert_gt(completion, 0);
    double paid = header_usd("x-costrouter-cost-usd");
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    double prompt = cJSON_GetObjectItem(rec, "prompt_tokens_est")->valuedouble;
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(rec, "completion_tokens")), "none was reported");
    cr_assert_float_eq(paid, usd(prompt, (double)completion, 100, 300), 1e-9,
                       "charged %f for %g prompt + %lld completion tokens", paid, prompt,
                       (long long)completion);
    cr_assert_float_eq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, paid, 1e-9);
    cJSON_Delete(rec);
}

/* ---- a plain answer too big to hold (over 8 MiB) ---- */

/* The bill of the big answers below: 234 prompt tokens at $100/Mtok,
 * 1000 cached at $10 and 56789 completion tokens at $300. */
#define BIG_USAGE                                                                              \
    "\"usage\":{\"prompt_tokens\":1234,\"completion_tokens\":56789,"                            \
    "\"prompt_tokens_details\":{\"cached_tokens\":1000}}"
#define BIG_USD ((234 * 100 + 1000 * 10 + 56789 * 300) / 1e6)
#define BIG_BACKEND_MORE ", cached_input_usd_per_mtok: 10"

/* The message content of the big answers below, and its arguments. */
#define BIG_TEXT "The answer is long, and every word of it is paid for. "
#define BIG_ARGS "{\"city\":\"Paris\"}"

/* The raw answer of a 200 with `body` (freed here) as its body, whose
 * head declares `missing` bytes more than follow: the upstream breaks off
 * unless it is 0. */
static char *answer_with_body(struct buf *body, size_t missing, size_t *len)
{
    struct buf out = {0};

    cr_assert_eq(buf_printf(&out,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                            body->len + missing),
                 0);
    cr_assert_eq(buf_append(&out, body->data, body->len), 0);
    buf_free(body);
    *len = out.len;
    return out.data;
}

/* Logprobs (small tokens, as a real answer's) into `body` until it is
 * `size` bytes or a little more. */
static void logprobs_until(struct buf *body, size_t size)
{
    for (int i = 0; body->len < size; i++)
        cr_assert_eq(buf_printf(body,
                                "%s{\"token\":\"ab\",\"logprob\":-0.%d,\"bytes\":[97,98],"
                                "\"top_logprobs\":[]}",
                                i ? "," : "", i),
                     0);
}

/* A raw answer of a 200 whose body is a chat completion of over 9 MiB,
 * most of it logprobs (small tokens, as a real one): `first` opens the
 * root object's members, `last` (with its comma) closes them; the
 * message's content is BIG_TEXT 200 times, with a tool call whose
 * arguments are BIG_ARGS. The head declares `missing` bytes more than
 * follow: the upstream breaks off. */
static char *big_answer(const char *first, const char *last, size_t missing, size_t *len)
{
    struct buf body = {0};

    cr_assert_eq(buf_printf(&body,
                            "{\"id\":\"chatcmpl-big\",\"object\":\"chat.completion\",%s"
                            "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                            "\"content\":\"",
                            first),
                 0);
    for (int i = 0; i < 200; i++)
        cr_assert_eq(buf_append_lit(&body, BIG_TEXT), 0);
    cr_assert_eq(buf_append_lit(&body, "\",\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\","
                                       "\"function\":{\"name\":\"weather\",\"arguments\":"
                                       "\"{\\\"city\\\":\\\"Paris\\\"}\"}}]},"
                                       "\"logprobs\":{\"content\":["),
                 0);
    logprobs_until(&body, 9u << 20);
    cr_assert_eq(buf_printf(&body, "]},\"finish_reason\":\"stop\"}]%s}", last), 0);
    return answer_with_body(&body, missing, len);
}

/* A router in front of a canned upstream (backend "a") that answers
 * `answer`, freed here. */
static void start_big(char *answer, size_t len)
{
    canned = support_canned_start(answer, len);
    free(answer);
    cr_assert_not_null(canned);
    add_backend_with("a", support_canned_port(canned), 1, 100, 300, NULL, BIG_BACKEND_MORE);
    start_routers(1, "a", NULL);
}

/* The settled cost in the chunked trailer of the last answer. */
static double trailer_usd(void)
{
    static const char name[] = "\r\nx-costrouter-cost-usd: ";
    const char *p = memmem(resp.raw.data, resp.raw.len, name, sizeof(name) - 1);

    cr_assert_not_null(p, "no cost trailer");
    return strtod(p + sizeof(name) - 1, NULL);
}

/* The cost log's tokens and cost for the big answers' usage. */
static void assert_big_usage_billed(const cJSON *rec)
{
    cr_assert_eq(cJSON_GetObjectItem(rec, "prompt_tokens")->valuedouble, 1234);
    cr_assert_eq(cJSON_GetObjectItem(rec, "completion_tokens")->valuedouble, 56789);
    cr_assert_eq(cJSON_GetObjectItem(rec, "billed_prompt_tokens")->valuedouble, 1234);
    cr_assert_eq(cJSON_GetObjectItem(rec, "billed_completion_tokens")->valuedouble, 56789);
    cr_assert_float_eq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, BIG_USD, 1e-9);
}

/* A router in front of an upstream answering `answer` (freed here),
 * asked once: the big answers' usage is charged, in the trailer and the
 * cost log. */
static void assert_big_answer_charged_its_usage(char *answer, size_t len)
{
    cJSON *rec;

    start_big(answer, len);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_float_eq(trailer_usd(), BIG_USD, 1e-9);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    assert_big_usage_billed(rec);
    cJSON_Delete(rec);
}

/* An answer too big to hold goes out as it comes, and is charged the
 * usage at its end (cached tokens at their price): in the trailer, the
 * cost log and the token statistics, as a held answer would be. */
Test(costs, an_answer_over_8_mib_is_charged_its_usage)
{
    static const char completion_series[] =
        "costrouter_tokens_total{tenant=\"acme\",backend=\"a\",route=\"chat\",kind=\"completion\"} "
        "56789\n";
    size_t len;
    char *answer = big_answer("", "," BIG_USAGE, 0, &len);
    cJSON *rec;

    start_big(answer, len);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_gt(resp.body.len, 9u << 20);
    const char *head_end = memmem(resp.raw.data, resp.raw.len, "\r\n\r\n", 4);
    cr_assert_not_null(head_end);
    cr_assert_null(memmem(resp.raw.data, (size_t)(head_end - resp.raw.data),
                          "\r\nx-costrouter-cost-usd:", 24),
                   "the head was held");
    cr_assert_str_eq(support_http_header(&resp, "trailer"), "x-costrouter-cost-usd",
                     "the head announces the trailer");
    cr_assert_float_eq(trailer_usd(), BIG_USD, 1e-9);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, completion_series,
                              sizeof(completion_series) - 1),
                       "%.*s", (int)resp.body.len, resp.body.data);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    assert_big_usage_billed(rec);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 200);
    cJSON_Delete(rec);
}

static double day_spend(void);

/* An answer too big to hold, to an HTTP/1.0 client: it has neither
 * chunks nor trailers, so the answer goes out unframed, ended by the
 * close, and carries its cost nowhere the client sees (README, step 7).
 * The charge is what matters, and it is the same as for an HTTP/1.1
 * client: the usage at the answer's end, in the tenant's spend and the
 * cost log (status 200, not a client that left). */
Test(costs, an_answer_over_8_mib_to_an_http10_client_is_charged_its_usage)
{
    static const char body[] = "{\"model\":\"chat\"," MSG "}";
    struct support_http_conn c;
    struct timeval tv = {.tv_sec = TIMEOUT_MS / 1000};
    struct buf out = {0};
    char chunk[65536];
    const char *head_end;
    ssize_t n;
    size_t len;
    char *answer = big_answer("", "," BIG_USAGE, 0, &len);
    cJSON *rec;

    start_big(answer, len);
    buf_reset(&req);
    cr_assert_eq(buf_printf(&req,
                            "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n" AUTH
                            "Content-Length: %zu\r\n\r\n%s",
                            sizeof(body) - 1, body),
                 0);
    cr_assert_eq(support_http_connect(&c, routers[0].port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    cr_assert_eq(setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
    while ((n = recv(c.fd, chunk, sizeof(chunk), 0)) > 0)
        cr_assert_eq(buf_append(&out, chunk, (size_t)n), 0);
    cr_assert_eq(n, 0, "the router did not close the connection: %s", strerror(errno));
    support_http_close(&c);
    head_end = memmem(out.data, out.len, "\r\n\r\n", 4);
    cr_assert_not_null(head_end);
    cr_assert_eq(strncmp(out.data, "HTTP/1.1 200 ", 13), 0, "%.64s", out.data);
    cr_assert_null(memmem(out.data, (size_t)(head_end - out.data), "chunked", 7), "%.*s",
                   (int)(head_end - out.data), out.data);
    cr_assert_gt(out.len - (size_t)(head_end + 4 - out.data), 9u << 20);
    cr_assert_eq(memcmp(out.data + out.len - 3, "}}}", 3), 0, "the body ends whole");
    cr_assert_float_eq(day_spend(), BIG_USD, 1e-9, "the tenant's spend");
    buf_free(&out);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    assert_big_usage_billed(rec);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 200);
    cJSON_Delete(rec);
}

/* Only the root object's own usage is the bill: a "usage" in a choice's
 * message, in another object, and written inside a string, all before
 * it and all smaller, are passed over. */
Test(costs, an_answer_over_8_mib_is_charged_its_root_usage_only)
{
    size_t len;
    char *answer = big_answer(
        "\"note\":\"\\\"usage\\\":{\\\"prompt_tokens\\\":1,\\\"completion_tokens\\\":1}\","
        "\"meta\":{\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":2}},"
        "\"extra\":[{\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":3}}],",
        "," BIG_USAGE, 0, &len);

    assert_big_answer_charged_its_usage(answer, len);
}

/* The completion tokens of the big answers' text, counted as the router
 * counts an answer without usage (a backend with tokenizer: estimate). */
static int64_t big_text_tokens(void)
{
    struct buf text = {0};
    int64_t n;

    for (int i = 0; i < 200; i++)
        cr_assert_eq(buf_append_lit(&text, BIG_TEXT), 0);
    n = policy_tokens_estimate(text.data, text.len) +
        policy_tokens_estimate(BIG_ARGS, strlen(BIG_ARGS));
    buf_free(&text);
    return n;
}

/* The cost log's charge for an answer without usage: the prompt estimate
 * and `completion` tokens counted. */
static void assert_counted_billed(const cJSON *rec, int64_t completion)
{
    double prompt = cJSON_GetObjectItem(rec, "prompt_tokens_est")->valuedouble;

    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(rec, "completion_tokens")), "none was reported");
    cr_assert_eq(cJSON_GetObjectItem(rec, "billed_prompt_tokens")->valuedouble, prompt);
    cr_assert_eq(cJSON_GetObjectItem(rec, "billed_completion_tokens")->valuedouble,
                 (double)completion);
    cr_assert_float_eq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble,
                       usd(prompt, (double)completion, 100, 300), 1e-9);
}

/* Without usage, an answer too big to hold is charged as a held one is:
 * the prompt estimate and its text counted with the backend's tokenizer
 * (here the byte estimate), its logprobs not counted. */
Test(costs, an_answer_over_8_mib_without_usage_is_charged_for_its_text)
{
    size_t len;
    char *answer = big_answer("", "", 0, &len);
    int64_t completion = big_text_tokens();
    cJSON *rec;

    start_big(answer, len);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    double paid = trailer_usd();
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    assert_counted_billed(rec, completion);
    cr_assert_float_eq(paid, cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, 1e-9);
    cJSON_Delete(rec);
}

/* An answer too big to hold that breaks off after 9 MiB reached the
 * client: its usage, read before the break, is what is charged... */
Test(costs, an_answer_over_8_mib_cut_after_its_usage_is_charged_its_usage)
{
    size_t len;
    char *answer = big_answer(BIG_USAGE ",", "", 1u << 20, &len);
    cJSON *rec;

    start_big(answer, len);
    chat(0, NULL, "{\"model\":\"chat\"," MSG "}"); /* an error: the answer is cut */
    cr_assert_eq(resp.status, 200);
    cr_assert_null(memmem(resp.raw.data, resp.raw.len, "\r\nx-costrouter-cost-usd:", 24),
                   "a cut answer ended cleanly");
    support_proc_stop(&routers[0]);
    cr_assert(support_proc_exited_cleanly(&routers[0]), "exit status %d", routers[0].status);
    rec = record_last(NULL, log_path);
    assert_big_usage_billed(rec);
    cJSON_Delete(rec);
}

/* ... and without usage, the text that passed, counted. */
Test(costs, an_answer_over_8_mib_cut_without_usage_is_charged_for_its_text)
{
    size_t len;
    char *answer = big_answer("", "", 1u << 20, &len);
    int64_t completion = big_text_tokens();
    cJSON *rec;

    start_big(answer, len);
    chat(0, NULL, "{\"model\":\"chat\"," MSG "}");
    cr_assert_eq(resp.status, 200);
    support_proc_stop(&routers[0]);
    cr_assert(support_proc_exited_cleanly(&routers[0]), "exit status %d", routers[0].status);
    rec = record_last(NULL, log_path);
    assert_counted_billed(rec, completion);
    cJSON_Delete(rec);
}

/* A client that leaves while an answer too big to hold passes to it: 499,
 * charged the prompt estimate and the text that had passed (the reader
 * it had is freed: `make asan` finds no leak). */
Test(costs, a_client_leaving_an_answer_over_8_mib_pays_for_the_text_that_passed)
{
    struct support_http_conn conn;
    size_t len;
    char *answer = big_answer("", "," BIG_USAGE, 0, &len), got[65536];
    ssize_t n;
    cJSON *rec;

    signal(SIGPIPE, SIG_IGN); /* the canned upstream writes on after the router closes */
    start_big(answer, len);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", AUTH,
                                     "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(support_http_connect_rcvbuf(&conn, routers[0].port, 4096), 0);
    cr_assert_eq(support_http_send(&conn, req.data, req.len), 0);
    n = recv(conn.fd, got, sizeof(got) - 1, MSG_WAITALL);
    cr_assert_gt(n, 12);
    cr_assert_eq(strncmp(got, "HTTP/1.1 200", 12), 0, "%.*s", (int)n, got);
    support_http_close(&conn);
    usleep(300 * 1000);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 499);
    assert_counted_billed(rec, big_text_tokens());
    cJSON_Delete(rec);
}

/* A Responses answer over 8 MiB that breaks off before its usage: the web
 * search calls that had passed (two web_search_call items) were made, and
 * are charged at the backend's price, as a stream's that breaks are. */
Test(costs, an_answer_over_8_mib_cut_pays_for_the_web_searches_that_passed)
{
    struct buf body = {0};
    size_t len;
    char *answer;
    cJSON *rec;

    cr_assert_eq(buf_append_lit(&body,
                                "{\"id\":\"resp_big\",\"object\":\"response\",\"output\":["
                                "{\"type\":\"web_search_call\",\"id\":\"ws_1\",\"status\":\"completed\"},"
                                "{\"type\":\"web_search_call\",\"id\":\"ws_2\",\"status\":\"completed\"},"
                                "{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":"
                                "\"output_text\",\"text\":\"hello\",\"logprobs\":["),
                 0);
    logprobs_until(&body, 9u << 20);
    answer = answer_with_body(&body, 1u << 20, &len);
    canned = support_canned_start(answer, len);
    free(answer);
    cr_assert_not_null(canned);
    add_backend_with("a", support_canned_port(canned), 1, 100, 300, NULL,
                     ", web_search_usd_per_1k: 10");
    start_routers(1, "a", NULL);
    call_port(routers[0].port, "POST", "/v1/responses", AUTH,
              "{\"model\":\"chat\",\"input\":\"hello there\","
              "\"tools\":[{\"type\":\"web_search\"}]}"); /* broken off: not whole */
    cr_assert_eq(resp.status, 200);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    cr_assert_eq(cJSON_GetObjectItem(rec, "billed_web_searches")->valuedouble, 2);
    cr_assert_geq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, 0.02);
    cJSON_Delete(rec);
}

/* A charge past what a micro-dollar int64 holds (an upstream reporting
 * 1e12 web searches, at $10 a search a config allows) is charged at the
 * ceiling the cost header gives, as every other conversion of money is:
 * not rounded out of range into a negative charge the store refuses
 * (nothing charged, the hold left) while the header says $4.6e12. */
Test(costs, a_charge_past_the_micro_dollar_range_is_charged_its_ceiling)
{
    static const char body[] =
        "{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":"
        "[{\"type\":\"text\",\"text\":\"hi\"}],\"stop_reason\":\"end_turn\",\"usage\":"
        "{\"input_tokens\":10,\"output_tokens\":1,\"server_tool_use\":"
        "{\"web_search_requests\":1000000000000}}}";
    struct buf b = {0};
    size_t len;
    char *answer;
    double paid;

    cr_assert_eq(buf_append(&b, body, sizeof(body) - 1), 0);
    answer = answer_with_body(&b, 0, &len);
    canned = support_canned_start(answer, len);
    free(answer);
    cr_assert_not_null(canned);
    add_backend_with("a", support_canned_port(canned), 1, 100, 300, NULL,
                     ", api: anthropic, web_search_usd_per_1k: 10000");
    start_routers(1, "a", NULL);
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/messages", AUTH,
                           "{\"model\":\"chat\",\"max_tokens\":5," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    paid = header_usd("x-costrouter-cost-usd");
    cr_assert_gt(paid, 4e12);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble, paid, 1,
                       "%.*s", (int)resp.body.len, resp.body.data);
}

/* The cache key names the upstream model (README): an answer that a
 * fallback got from a backend of another model is not kept under the key
 * of the model first chosen, where the next identical request, choosing
 * that model again, would be answered with it (and told it saved that
 * backend's price). */
Test(costs, a_fallbacks_answer_is_not_cached_under_the_first_choices_model)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("down", 1, 1, 1, 1); /* cheapest, nobody listens */
    add_backend("b", mock_a.port, 1, 100, 300);
    start_routers(1, "down, b", NULL);
    const char body[] = "{\"model\":\"chat\",\"temperature\":0," MSG "}";
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(chat(0, NULL, body), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b",
                         "request %d: %.*s", i, (int)resp.body.len, resp.body.data);
    }
}

/* The read that takes an answer past 8 MiB is read for its usage too,
 * not only forwarded: a usage across the 8 MiB mark is the bill. The
 * answer is spaced out so that byte 8 MiB is inside the usage, in the
 * read that crosses the mark whatever the reads are. */
Test(costs, an_answer_with_its_usage_across_the_8_mib_mark_is_charged_it)
{
    const size_t mark = 8u << 20;
    struct buf body = {0};
    size_t len;
    char *answer;

    cr_assert_eq(buf_append_lit(&body, "{\"id\":\"chatcmpl-big\",\"object\":\"chat.completion\","
                                       "\"choices\":[{\"index\":0,\"message\":{\"role\":"
                                       "\"assistant\",\"content\":\"" BIG_TEXT "\"},"
                                       "\"logprobs\":{\"content\":["),
                 0);
    logprobs_until(&body, mark - 200);
    cr_assert_eq(buf_append_lit(&body, "]},\"finish_reason\":\"stop\"}]"), 0);
    while (body.len < mark - 20)
        cr_assert_eq(buf_append_lit(&body, " "), 0);
    cr_assert_eq(buf_append_lit(&body, "," BIG_USAGE ",\"system_fingerprint\":\"fp\",\"pad\":["), 0);
    logprobs_until(&body, mark + (1u << 20));
    cr_assert_eq(buf_append_lit(&body, "]}"), 0);
    answer = answer_with_body(&body, 0, &len);
    assert_big_answer_charged_its_usage(answer, len);
}

/* A usage without token counts (only the cached ones) is no usage, as
 * in a held answer: the text is charged, and no prompt token at the
 * cached price. */
Test(costs, an_answer_over_8_mib_whose_usage_has_no_token_counts_is_charged_for_its_text)
{
    size_t len;
    char *answer =
        big_answer("", ",\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":1000}}", 0, &len);
    cJSON *rec;

    start_big(answer, len);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    assert_counted_billed(rec, big_text_tokens());
    cJSON_Delete(rec);
}

/* A completion (/v1/completions) too big to hold and without usage is
 * charged for its choices' text as a held one is: a string counted, an
 * array of token ids one token each. */
Test(costs, a_completion_over_8_mib_without_usage_is_charged_for_its_text)
{
    struct buf body = {0}, text = {0};
    size_t len;
    char *answer;
    int64_t completion;
    cJSON *rec;

    for (int i = 0; i < 200; i++)
        cr_assert_eq(buf_append_lit(&text, BIG_TEXT), 0);
    completion = policy_tokens_estimate(text.data, text.len) + 3;
    cr_assert_eq(buf_printf(&body,
                            "{\"id\":\"cmpl-big\",\"object\":\"text_completion\",\"choices\":["
                            "{\"index\":0,\"text\":\"%.*s\",\"logprobs\":{\"tokens\":[",
                            (int)text.len, text.data),
                 0);
    buf_free(&text);
    for (int i = 0; body.len < (9u << 20); i++)
        cr_assert_eq(buf_printf(&body, "%s\"t%d\"", i ? "," : "", i), 0);
    cr_assert_eq(buf_append_lit(&body, "]},\"finish_reason\":\"stop\"},"
                                       "{\"index\":1,\"text\":[101,102,103]}]}"),
                 0);
    answer = answer_with_body(&body, 0, &len);
    start_big(answer, len);
    cr_assert_eq(call_port(routers[0].port, "POST", "/v1/completions", AUTH,
                           "{\"model\":\"chat\",\"prompt\":\"hello there\"}"),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_gt(resp.body.len, 9u << 20);
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    assert_counted_billed(rec, completion);
    cJSON_Delete(rec);
}

/* Bytes refused before they made a whole request are still a /v1
 * request in the cost log and the metrics, under the tenant whose key
 * came before the refusal. */
Test(costs, refused_requests_are_logged_and_counted)
{
    char line[4096];
    int lines = 0, saw413 = 0, saw400 = 0;
    FILE *f;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    top_extra = "limits: {max_body_bytes: 1024}\n";
    start_routers(1, "a", NULL);
    /* Over max_body_bytes, said by Content-Length: refused at the head. */
    static const char big[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" AUTH
                              "Content-Length: 5000\r\n\r\n";
    cr_assert_eq(support_http_request(routers[0].port, big, sizeof(big) - 1, TIMEOUT_MS, &resp),
                 0);
    cr_assert_eq(resp.status, 413);
    /* Malformed after the path: no key read, no tenant. */
    static const char bad[] = "POST /v1/chat/completions HTTP/1.1\r\nHost x\r\n\r\n";
    cr_assert_eq(support_http_request(routers[0].port, bad, sizeof(bad) - 1, TIMEOUT_MS, &resp),
                 0);
    cr_assert_eq(resp.status, 400, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    static const char series[] = "costrouter_requests_total{tenant=\"acme\",backend=\"none\","
                                 "route=\"unknown\",status=\"413\"} 1";
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, series, sizeof(series) - 1), "%.*s",
                       (int)resp.body.len, resp.body.data);
    support_proc_stop(&routers[0]);
    f = fopen(log_path, "r");
    cr_assert_not_null(f);
    while (fgets(line, sizeof(line), f)) {
        cJSON *rec = cJSON_Parse(line);
        const cJSON *tenant = cJSON_GetObjectItem(rec, "tenant");
        int status = (int)cJSON_GetObjectItem(rec, "status")->valuedouble;

        cr_assert_not_null(rec, "%s", line);
        lines++;
        cr_assert_float_eq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, 0, 1e-12);
        if (status == 413)
            saw413 = cJSON_IsString(tenant) && strcmp(tenant->valuestring, "acme") == 0;
        if (status == 400)
            saw400 = cJSON_IsNull(tenant);
        cJSON_Delete(rec);
    }
    fclose(f);
    cr_assert_eq(lines, 2);
    cr_assert(saw413, "the 413 is logged under its tenant");
    cr_assert(saw400, "the 400 is logged without one");
}

/* A backend's own refusal (a 4xx, or a 429/5xx with no candidate left)
 * costs the tenant nothing: APIs do not bill what they refuse. */
Test(costs, a_backend_error_is_not_charged)
{
    static const char *const refusals[] = {"400", "429", "503"};
    char extra[64];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    for (size_t i = 0; i < sizeof(refusals) / sizeof(refusals[0]); i++) {
        snprintf(extra, sizeof(extra), "x-mock-status: %s\r\n", refusals[i]);
        cr_assert_eq(chat(0, extra, "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert_eq(resp.status, atoi(refusals[i]));
        cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), 0, 1e-12, "%s", refusals[i]);
    }
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    double paid = header_usd("x-costrouter-cost-usd");
    cr_assert_gt(paid, 0);
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble, paid, 1e-9,
                       "only the answered request is charged");
}

/* Append a GPU pool backend: one replica at $36/h, 10 micro-USD per
 * GPU-ms, so that a few hundred ms are plain to see; `more` as in
 * add_backend_with. */
static void add_pool(const char *name, int port, const char *more)
{
    cr_assert_eq(buf_printf(&yaml,
                            "  - {name: %s, kind: self_hosted, url: \"http://127.0.0.1:%d/v1\",\n"
                            "     quality: 1, context_window: 100000, gpu_hourly_usd: 36,\n"
                            "     replicas: 1, max_concurrency: 4, tokens_per_second: 1000%s}\n",
                            name, port, more),
                 0);
}

/* The tenant's spend today, USD (admin API). */
static double day_spend(void)
{
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    return cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble;
}

/* What backend `index`'s pool cost since the router started less its
 * idle (unattributed) cost, both read at one instant of the router's
 * clock: the USD its requests must have been charged, to the identity
 * attributed + idle = R x h x period. */
static double pool_attributed_usd(int index)
{
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/backends", ADMIN, NULL), 0);
    cJSON *b = cJSON_GetArrayItem(body_json(), index);
    return cJSON_GetObjectItem(b, "pool_cost_usd")->valuedouble -
           cJSON_GetObjectItem(b, "idle_cost_usd")->valuedouble;
}

/* How far the router's loop clock (uv_now) may read behind support_mono_ms() at
 * one instant: it is whole ms (up to 1 lost), of libuv's fast clock,
 * which is CLOCK_MONOTONIC_COARSE (up to 1 ms behind) where that ticks at
 * least every ms. It never reads ahead. */
#define LOOP_CLOCK_LAG_MS 2

/* `name` on /metrics, with support_mono_ms() when the scrape was sent and when
 * its answer came: the router read its clock for it in between, however
 * late either side ran on a loaded machine. */
static double timed_metric(const char *name, double *sent, double *answered)
{
    *sent = support_mono_ms();
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    *answered = support_mono_ms();
    return metric_value(name);
}

/* An idle pool's cost counter gains what it cost between two scrapes
 * with a reload between them: the replaced generation's idle time up to
 * the reload counts, then the new one's, so the gain is 10 micro-USD for
 * each ms of the router's clock between the scrapes. The router reads
 * that clock for a scrape somewhere between its sending and its answer,
 * later or sooner as the machine is loaded: so the span is bounded by the
 * test's times around the scrapes, not by the 400 ms slept plus a
 * constant (which a loaded loop outran by a few ms). */
Test(costs, a_reload_keeps_the_idle_cost_of_a_gpu_pool)
{
    static const char idle[] = "costrouter_gpu_pool_idle_cost_usd_total{backend=\"gpu\"}";
    double sent0, answered0, sent1, answered1, before, after, least_ms, most_ms;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_pool("gpu", mock_a.port, "");
    start_routers(1, "gpu", NULL);
    before = timed_metric(idle, &sent0, &answered0);
    cr_assert_geq(before, 0, "%.*s", (int)resp.body.len, resp.body.data);
    usleep(400 * 1000);
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    after = timed_metric(idle, &sent1, &answered1);
    least_ms = sent1 - answered0 - LOOP_CLOCK_LAG_MS;
    most_ms = answered1 - sent0 + LOOP_CLOCK_LAG_MS;
    /* Dropping the old generation's idle time would leave about the
     * second scrape's few ms, far under least_ms (> 398). */
    cr_assert_geq(after - before, least_ms * 10e-6, "%f USD, %.1f ms at least", after - before,
                  least_ms);
    cr_assert_leq(after - before, most_ms * 10e-6, "%f USD, %.1f ms at most", after - before,
                  most_ms);
}

/* Times (support_mono_ms) around the scrapes and the reloads of
 * pool_request_across_reloads, and what it read. */
struct across {
    double sent0, answered0;           /* the first scrape */
    double reload_sent, reload_answered;
    double sent1, answered1;           /* the second scrape */
    double idle_gain;                  /* the pool's idle cost between the scrapes, USD */
    double charged;                    /* the request's charge, USD */
};

/* A metric's value, 0 when the series is not there (yet) or `name` is
 * NULL. */
static double metric_or_0(const char *name)
{
    double v = name != NULL ? metric_value(name) : -1;

    return v < 0 ? 0 : v;
}

/* One config a reload goes to: the pool named `name` at mockllm's url, one
 * replica at `hourly` USD an hour, or (`name` NULL) an API backend "a"
 * there in its place. */
struct pool_step {
    const char *name;
    int hourly;
};

static void write_pool_conf(const struct pool_step *st, int port)
{
    buf_reset(&yaml);
    if (st->name == NULL)
        add_backend("a", port, 1, 100, 300);
    else
        cr_assert_eq(buf_printf(&yaml,
                                "  - {name: %s, kind: self_hosted, url: \"http://127.0.0.1:%d/v1\",\n"
                                "     quality: 1, context_window: 100000, gpu_hourly_usd: %d,\n"
                                "     replicas: 1, max_concurrency: 4, tokens_per_second: 1000}\n",
                                st->name, port, st->hourly),
                     0);
    write_conf(st->name != NULL ? st->name : "a", NULL);
}

/* The pool "gpu" (one replica at $36/h, add_pool) serves a request for
 * 1 s; `delay_ms` into it, the config is reloaded to each of `steps` in
 * turn. Scraped before the request and after its answer: `a` has the
 * idle gain of the series of "gpu" and of `other` (the pool's new name,
 * or NULL), and what the request was charged. */
static void pool_request_across_reloads(const struct pool_step *steps, size_t n, int delay_ms,
                                        const char *other, struct across *a)
{
    static const char idle[] = "costrouter_gpu_pool_idle_cost_usd_total{backend=\"%s\"}";
    static const char cost[] =
        "costrouter_cost_usd_total{tenant=\"acme\",backend=\"gpu\",route=\"chat\"}";
    struct support_http_conn slow = {.fd = -1};
    struct support_http_response slow_resp = {0};
    struct buf slow_req = {0};
    char idle_gpu[128], idle_other[128];
    double before;

    snprintf(idle_gpu, sizeof(idle_gpu), idle, "gpu");
    if (other != NULL)
        snprintf(idle_other, sizeof(idle_other), idle, other);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_pool("gpu", mock_a.port, "");
    start_routers(1, "gpu", NULL);
    before = timed_metric(idle_gpu, &a->sent0, &a->answered0);
    cr_assert_geq(before, 0, "%.*s", (int)resp.body.len, resp.body.data);
    before += metric_or_0(other != NULL ? idle_other : NULL);
    send_unanswered(&slow, &slow_req, AUTH "x-mock-ttft-ms: 1000\r\n", "{\"model\":\"chat\"," MSG "}");
    usleep((useconds_t)delay_ms * 1000);
    a->reload_sent = support_mono_ms();
    for (size_t i = 0; i < n; i++) {
        write_pool_conf(&steps[i], mock_a.port);
        reload_router();
    }
    a->reload_answered = support_mono_ms();
    cr_assert_eq(support_http_read(&slow, &slow_resp, TIMEOUT_MS), 0);
    cr_assert_eq(slow_resp.status, 200, "%.*s", (int)slow_resp.body.len, slow_resp.body.data);
    a->idle_gain = timed_metric(idle_gpu, &a->sent1, &a->answered1);
    a->idle_gain += metric_or_0(other != NULL ? idle_other : NULL) - before;
    a->charged = metric_value(cost);
    support_http_close(&slow);
    support_http_response_free(&slow_resp);
    buf_free(&slow_req);
}

/* A pool of one replica at $36/h (add_pool) serves a request for 1 s; a
 * reload 300 ms into it, to a config whose pool costs `hourly_after` USD
 * an hour. Scraped before the request and after its answer. */
static void pool_request_across_a_reload(int hourly_after, struct across *a)
{
    const struct pool_step step = {"gpu", hourly_after};

    pool_request_across_reloads(&step, 1, 300, NULL, a);
}

/* The same with a request in flight across the reload: it runs 1 s on
 * the pool's one replica, the reload 300 ms into it. Over the scrapes the
 * pool's idle gain plus what the request was charged must be the pool's
 * cost over the router's clock between them (attributed + idle = R x h x
 * period). A new generation's pool that started with nothing in flight
 * counted the replica idle while the old one's request still ran on it
 * and was charged for it: the replica was paid twice for ~700 ms (idle
 * 0.007020 + charged 0.010020 USD for 1006.8 ms, 0.010068 USD). The pool
 * now keeps its accounting clock across the reload. */
Test(costs, a_reload_with_a_pool_request_in_flight_pays_the_replica_once)
{
    struct across a;
    double most_ms;

    pool_request_across_a_reload(36, &a);
    cr_assert_gt(a.charged, 900 * 10e-6, "the request ran about 1 s: %f USD", a.charged);
    most_ms = a.answered1 - a.sent0 + LOOP_CLOCK_LAG_MS;
    cr_assert_leq(a.idle_gain + a.charged, most_ms * 10e-6,
                  "idle %f + charged %f USD, for %.1f ms at most (%f USD)", a.idle_gain, a.charged,
                  most_ms, most_ms * 10e-6);
}

/* The same with a reload that doubles the pool's price ($36/h, 10
 * micro-USD per ms, to $72/h, 20) while the request runs. The pool was
 * the old config's until the reload and the new one's after: the new one
 * started an accounting of its own, which booked the replica idle while
 * the old config's request ran on it and was charged for it, so the
 * replica was paid twice for ~700 ms (idle 0.014000 + charged 0.010030
 * USD, at most 0.017189). The pool keeps its accounting across the reload
 * by its name, each stretch at the price of its time: idle + charged is
 * the pool's cost between the scrapes, 10 micro-USD a ms before the
 * reload and 20 after. */
Test(costs, a_reload_that_changes_a_pools_price_pays_the_replica_once)
{
    struct across a;
    double least, most;

    pool_request_across_a_reload(72, &a);
    least = (a.reload_sent - a.answered0) * 10e-6 + (a.sent1 - a.reload_answered) * 20e-6 -
            LOOP_CLOCK_LAG_MS * 20e-6;
    most = (a.reload_answered - a.sent0) * 10e-6 + (a.answered1 - a.reload_sent) * 20e-6 +
           LOOP_CLOCK_LAG_MS * 20e-6;
    cr_assert_leq(a.idle_gain + a.charged, most, "idle %f + charged %f USD, at most %f",
                  a.idle_gain, a.charged, most);
    cr_assert_geq(a.idle_gain + a.charged, least, "idle %f + charged %f USD, at least %f",
                  a.idle_gain, a.charged, least);
}

/* attributed + idle of pool_request_across_reloads is the pool's cost
 * over the router's clock between the scrapes, the replica paid once. */
static void assert_paid_once(const struct across *a)
{
    double most_ms = a->answered1 - a->sent0 + LOOP_CLOCK_LAG_MS;

    cr_assert_gt(a->charged, 900 * 10e-6, "the request ran about 1 s: %f USD", a->charged);
    cr_assert_leq(a->idle_gain + a->charged, most_ms * 10e-6,
                  "idle %f + charged %f USD, for %.1f ms at most (%f USD)", a->idle_gain,
                  a->charged, most_ms, most_ms * 10e-6);
}

/* A pool removed by a reload and added again by the next one, while a
 * request of the first config still runs on it: the config that added it
 * again started an accounting of its own, which booked the replica idle
 * while that request ran on it and was charged for it. */
Test(costs, a_pool_removed_and_added_again_pays_the_replica_once)
{
    static const struct pool_step steps[] = {{NULL, 0}, {"gpu", 36}};
    struct across a;

    pool_request_across_reloads(steps, 2, 200, NULL, &a);
    assert_paid_once(&a);
}

/* A pool renamed by a reload (same url, the same hardware: see README),
 * while a request of the old config runs on it. */
Test(costs, a_pool_renamed_at_the_same_url_pays_the_replica_once)
{
    static const struct pool_step steps[] = {{"gpu2", 36}};
    struct across a;

    pool_request_across_reloads(steps, 1, 200, "gpu2", &a);
    assert_paid_once(&a);
}

/* A pool renamed by a reload at its url (the same servers, as its clock
 * says) keeps what was measured of its latency, as one reloaded under its
 * own name does: else SLO traffic went by guesses until it was measured
 * again. One at another url starts afresh. */
Test(costs, a_pool_renamed_at_the_same_url_keeps_its_latency)
{
    static const struct pool_step renamed = {"gpu2", 36}, moved = {"gpu3", 36};
    double ttft;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_pool("gpu", mock_a.port, "");
    start_routers(1, "gpu", NULL);
    cr_assert_eq(chat(0, "x-mock-ttft-ms: 200\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    ttft = first_backend_admin("ttft_ewma_ms")->valuedouble;
    cr_assert_geq(ttft, 200);
    write_pool_conf(&renamed, mock_a.port);
    reload_router();
    cr_assert_float_eq(first_backend_admin("ttft_ewma_ms")->valuedouble, ttft, 1e-9,
                       "renamed at its url");
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(json, 0), "backend")->valuestring,
                     "gpu2");
    /* another port is other servers */
    write_pool_conf(&moved, mock_a.port + 1);
    reload_router();
    cr_assert_float_eq(first_backend_admin("ttft_ewma_ms")->valuedouble, 0, 1e-9,
                       "renamed at another url");
}

/* A pool that works 300 ms and then refuses (the error goes to the
 * client) is not charged for it, as an API would not be; that time is
 * the pool's idle cost, so the pool's cost is still what its one served
 * request was charged plus its idle cost. */
Test(costs, a_gpu_pool_error_answer_is_not_charged_and_its_time_is_idle)
{
    static const char *const refusals[] = {"400", "500", "503", "429"};
    char extra[96];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_pool("gpu", mock_a.port, "");
    start_routers(1, "gpu", "    budget: {daily_usd: 10}\n");
    cr_assert_eq(chat(0, "x-mock-ttft-ms: 200\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    double paid = header_usd("x-costrouter-cost-usd");
    cr_assert_geq(paid, 0.002, "200 ms of the pool at 10 micro-USD a ms: %f", paid);
    for (size_t i = 0; i < sizeof(refusals) / sizeof(refusals[0]); i++) {
        snprintf(extra, sizeof(extra), "x-mock-status: %s\r\nx-mock-ttft-ms: 300\r\n",
                 refusals[i]);
        cr_assert_eq(chat(0, extra, "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert_eq(resp.status, atoi(refusals[i]));
        cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), 0, 1e-12, "%s", refusals[i]);
    }
    cr_assert_float_eq(day_spend(), paid, 1e-9, "only the answered request is charged");
    /* Settled costs are rounded to the micro-USD: half of one each. */
    cr_assert_float_eq(pool_attributed_usd(0), paid, 0.6e-6);
}

/* A pool attempt that fails (here: no first byte within its 500 ms) and
 * whose request another candidate serves is charged to nobody; its time
 * is the pool's idle cost, so attributed + idle is still the pool's
 * whole cost. */
Test(costs, a_failed_gpu_attempt_is_idle_time_of_the_pool)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "stall", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_pool("gpu", mock_a.port, ", first_byte_timeout_ms: 500");
    add_backend("api", mock_b.port, 1, 100, 300);
    start_routers(1, "gpu, api", "    budget: {daily_usd: 10}\n");
    cr_assert_eq(chat(0, "x-mock-fault: none\r\nx-mock-ttft-ms: 100\r\n",
                      "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "gpu");
    double on_pool = header_usd("x-costrouter-cost-usd");
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "api");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "fallback");
    double on_api = header_usd("x-costrouter-cost-usd");
    cr_assert_float_eq(on_api, usd(PROMPT_TOKENS, 16, 100, 300), 1e-9, "the API's price alone");
    cr_assert_float_eq(day_spend(), on_pool + on_api, 1e-9);
    cr_assert_float_eq(pool_attributed_usd(0), on_pool, 1.1e-6,
                       "the failed attempt's 500 ms (0.005 USD) went unaccounted");
}

/* `costrouter report --format json --by route` over the cost log: the
 * group of route "chat", parsed into `json`. */
static const cJSON *report_chat_route(void)
{
    char cmd[512], chunk[4096];
    struct buf out = {0};
    const cJSON *g;
    size_t n;
    FILE *p;

    snprintf(cmd, sizeof(cmd), "'%s' report --format json --by route '%s' 2>/dev/null",
             getenv("COSTROUTER_BIN"), log_path);
    p = popen(cmd, "r");
    cr_assert_not_null(p);
    while ((n = fread(chunk, 1, sizeof(chunk), p)) > 0)
        cr_assert_eq(buf_append(&out, chunk, n), 0);
    cr_assert_eq(pclose(p), 0, "%s", cmd);
    cJSON_Delete(json);
    json = cJSON_ParseWithLength(out.data, out.len);
    cr_assert_not_null(json, "not JSON: %.*s", (int)out.len, out.data);
    buf_free(&out);
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(json, "groups"))
        if (cJSON_IsString(cJSON_GetObjectItem(g, "value")) &&
            strcmp(cJSON_GetObjectItem(g, "value")->valuestring, "chat") == 0)
            return g;
    cr_assert_fail("no route group in the report");
    return NULL;
}

/* The tokens the cost log, `costrouter report` and costrouter_tokens_total
 * give are those the charge was computed from, not the estimates: a
 * stream from a backend that sends no usage (stream_usage: false) is
 * billed on the prompt estimate and one token per event, 16; an upstream
 * 400 without usage is billed nothing. */
Test(costs, the_tokens_reported_are_the_tokens_billed)
{
    static const char completion_series[] =
        "costrouter_tokens_total{tenant=\"acme\",backend=\"nu\",route=\"chat\",kind=\"completion\"} 16\n";
    char line[4096], prompt_series[160];
    double prompt_est = -1;
    int lines = 0;
    FILE *f;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_with("nu", mock_a.port, 1, 100, 300, "o200k_base", ", stream_usage: false");
    start_routers(1, "nu", NULL);
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"stream\":true," MSG "}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(chat(0, "x-mock-status: 400\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    char *metrics = strndup(resp.body.data, resp.body.len);
    support_proc_stop(&routers[0]);

    f = fopen(log_path, "r");
    cr_assert_not_null(f);
    while (fgets(line, sizeof(line), f)) {
        cJSON *rec = cJSON_Parse(line);
        double billed_p, billed_c, cost;

        cr_assert_not_null(rec, "%s", line);
        billed_p = cJSON_GetObjectItem(rec, "billed_prompt_tokens")->valuedouble;
        billed_c = cJSON_GetObjectItem(rec, "billed_completion_tokens")->valuedouble;
        cost = cJSON_GetObjectItem(rec, "cost_usd")->valuedouble;
        cr_assert(cJSON_IsNull(cJSON_GetObjectItem(rec, "completion_tokens")), "no usage: %s", line);
        cr_assert_float_eq(cost, usd(billed_p, billed_c, 100, 300), 1e-9, "%s", line);
        if (lines++ == 0) {
            prompt_est = cJSON_GetObjectItem(rec, "prompt_tokens_est")->valuedouble;
            cr_assert_eq(billed_p, prompt_est, "%s", line);
            cr_assert_eq(billed_c, 16, "one token per event: %s", line);
        } else {
            cr_assert_eq(billed_p + billed_c, 0, "the 400 billed nothing: %s", line);
        }
        cJSON_Delete(rec);
    }
    fclose(f);
    cr_assert_eq(lines, 2);
    cr_assert_gt(prompt_est, 0);

    const cJSON *g = report_chat_route();
    cr_assert_eq(cJSON_GetObjectItem(g, "prompt_tokens")->valuedouble, prompt_est);
    cr_assert_eq(cJSON_GetObjectItem(g, "completion_tokens")->valuedouble, 16);
    snprintf(prompt_series, sizeof(prompt_series),
             "costrouter_tokens_total{tenant=\"acme\",backend=\"nu\",route=\"chat\","
             "kind=\"prompt\"} %g\n",
             prompt_est);
    cr_assert_not_null(strstr(metrics, prompt_series), "%s", metrics);
    cr_assert_not_null(strstr(metrics, completion_series), "%s", metrics);
    free(metrics);
}

/* /v1 requests mockllm `m` has answered. */
static int mock_requests(struct support_proc *m)
{
    cr_assert_eq(call_port(m->port, "GET", "/mock/stats", NULL, NULL), 0);
    return (int)cJSON_GetObjectItem(body_json(), "requests")->valuedouble;
}

/* Cooldown left on backend `index`, from the admin API. */
static double admin_rate_limited_ms(int index)
{
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/backends", ADMIN, NULL), 0);
    return cJSON_GetObjectItem(cJSON_GetArrayItem(body_json(), index), "rate_limited_ms")
        ->valuedouble;
}

static void expect_served_by_b(const char *reason)
{
    cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), reason);
}

/* A backend that answers 429 is passed over, while another candidate can
 * serve, for as long as its Retry-After says (retry-after-ms first), then
 * tried again; each 429 is counted, the cooldown shows in the admin API
 * and the passed-over candidate in the cost log. */
Test(costs, a_rate_limited_backend_is_passed_over_until_its_retry_after)
{
    static const char series[] = "costrouter_backend_rate_limited_total{backend=\"a\"} 3";

    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "429", "--retry-after", "1", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300); /* the cheaper */
    add_backend("b", mock_b.port, 1, 200, 600);
    start_routers(1, "a, b", NULL);

    expect_served_by_b("fallback"); /* a answered 429 first */
    cr_assert_eq(mock_requests(&mock_a), 1);
    double left = admin_rate_limited_ms(0);
    cr_assert(left > 0 && left <= 1000, "cooling for %.0f ms, Retry-After said 1 s", left);
    expect_served_by_b("cheapest-qualifying");
    cr_assert_eq(mock_requests(&mock_a), 1, "a is not asked while it cools down");

    usleep(1100 * 1000);
    cr_assert_eq(admin_rate_limited_ms(0), 0);
    expect_served_by_b("fallback");
    cr_assert_eq(mock_requests(&mock_a), 2, "asked again once the second has passed");

    /* retry-after-ms wins over Retry-After: 2.5 s, not 1 s. */
    usleep(1100 * 1000);
    cr_assert_eq(chat(0, "x-mock-retry-after-ms: 2500\r\n", "{\"model\":\"chat\"," MSG "}"), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_eq(mock_requests(&mock_a), 3);
    left = admin_rate_limited_ms(0);
    cr_assert(left > 1500 && left <= 2500, "cooling for %.0f ms, retry-after-ms said 2500", left);

    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, series, sizeof(series) - 1), "%.*s",
                       (int)resp.body.len, resp.body.data);
    support_proc_stop(&routers[0]);
    /* Every request names a "rate-limited": the second passed it over,
     * the others tried it and got its 429, which is not a failure. */
    cr_assert_eq(count_log_lines(log_path, "\"rejected\":\"rate-limited\""), 4);
    cr_assert_eq(count_log_lines(log_path, "\"rejected\":\"failed\""), 0);
}

/* The only candidate of a route is asked even while it cools down: the
 * client gets the upstream's own 429 and Retry-After, not one made up. */
Test(costs, a_rate_limited_only_candidate_answers_its_own_429)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "429", "--retry-after", "30", NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    for (int i = 1; i <= 2; i++) {
        cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert_eq(resp.status, 429);
        cr_assert_str_eq(support_http_header(&resp, "retry-after"), "30");
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
        cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")
                             ->valuestring,
                         "mock_fault", "the upstream's own error body");
        cr_assert_eq(mock_requests(&mock_a), i);
    }
    cr_assert_gt(admin_rate_limited_ms(0), 25000);
}

/* The router loads only the token tables its backends name; a reload
 * that names another loads it, and prompts are then counted with it. */
Test(costs, reload_loads_a_newly_named_token_table)
{
    static const char body[] = "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\","
                               "\"content\":\"Tally the GPU-hours per team, then euros.\"}]}";
    struct policy_tokens *t = NULL;
    char dir[4096];
    cJSON *parsed = cJSON_Parse(body), *rec;
    int64_t exact;

    snprintf(dir, sizeof(dir), "%s/data/tokens", fixture_src());
    cr_assert_eq(policy_tokens_load_some(&t, dir, 1u << CONF_TOK_LLAMA3), 0);
    exact = policy_tokens_chat(t, CONF_TOK_LLAMA3, parsed);
    policy_tokens_free(t);
    cJSON_Delete(parsed);
    cr_assert_gt(exact, 0);

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300); /* no tokenizer: byte estimates */
    start_routers(1, "a", NULL);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 200);

    buf_reset(&yaml);
    add_backend_counted("a", mock_a.port, 1, 100, 300, "llama3");
    write_conf("a", NULL);
    cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(resp.status, 200);
    support_proc_stop(&routers[0]);

    rec = record_last(NULL, log_path);
    cr_assert_eq(cJSON_GetObjectItem(rec, "prompt_tokens_est")->valuedouble, (double)exact,
                 "counted with the llama3 table loaded at the reload");
    cJSON_Delete(rec);
}

Test(costs, dashboard_shows_what_the_router_reports)
{
    char url[160], profile[] = "/tmp/costrouter-dash-XXXXXX", cmd[96];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    /* 9 prompt + 7 completion tokens at $100000/$300000 per Mtok = $3.00. */
    add_backend("a", mock_a.port, 1, 100000, 300000);
    start_routers(1, "a", "    budget: {daily_usd: 10, monthly_usd: 100}\n");
    cr_assert_eq(chat(0, "x-mock-tokens: 7\r\n", "{\"model\":\"chat\",\"max_tokens\":7," MSG "}"), 0);
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), 3.0, 1e-9);
    cr_assert_not_null(mkdtemp(profile));
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/dashboard#key=adm-secret", routers[0].port);
    char *dom = support_dump_dom(url, profile);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", profile);
    (void)system(cmd);
    cr_assert_not_null(strstr(dom, "<td>acme</td><td>day</td><td class=\"num\">$3.00</td>"
                                   "<td class=\"num\">$10.00</td>"),
                       "spend vs budget missing");
    cr_assert_not_null(strstr(dom, "<td class=\"num\">$3.00</td><td class=\"num\">$100.00</td>"),
                       "month spend missing");
    /* cost per request of backend a: one request, $3.00 */
    cr_assert_not_null(strstr(dom, "<td>a</td><td class=\"num\">1</td><td class=\"num\">$3.00</td>"),
                       "cost per request by backend missing");
    cr_assert_null(strstr(dom, "adm-secret"), "the admin key is in the page");
    free(dom);
}

/* The tenant's spend today, USD, once nothing is held any more (the hold
 * of a request whose client left is settled or released by then). */
static double day_spend_settled(void)
{
    for (int tries = 0; tries < 250; tries++) {
        cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
        if (cJSON_GetObjectItem(body_json(), "reserved_usd")->valuedouble == 0)
            return cJSON_GetObjectItem(json, "day_usd")->valuedouble;
        usleep(20000);
    }
    cr_assert_fail("the request's hold was neither settled nor released");
    return -1;
}

/* The tenant's spend once nothing is held, and in *counted backend a's
 * costrouter_cost_usd_total, USD; then router 0 stops, its cost log
 * whole. */
static double spent_then_stop(double *counted)
{
    double spent = day_spend_settled();

    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    *counted = metric_value(
        "costrouter_cost_usd_total{tenant=\"acme\",backend=\"a\",route=\"chat\"}");
    support_proc_stop(&routers[0]);
    return spent;
}

/* Send a chat request that the backend does not answer for a while,
 * wait for `reached` (or 300 ms) and hang up before any answer. */
static void chat_and_leave(int (*reached)(void))
{
    struct support_http_conn conn;
    struct buf out = {0};

    send_unanswered(&conn, &out, AUTH "x-mock-ttft-ms: 3000\r\n", "{\"model\":\"chat\"," MSG "}");
    for (int tries = 0; tries < 250 && reached != NULL && !reached(); tries++)
        usleep(20000);
    if (reached == NULL)
        usleep(300 * 1000);
    cr_assert(reached == NULL || reached(), "the request never reached the backend");
    support_http_close(&conn);
    buf_free(&out);
}

static int mock_a_has_it(void)
{
    return mock_requests(&mock_a) == 1;
}

/* A client that leaves after its request went whole to an API backend
 * (the mock has read it and waits 3 s before answering) is charged the
 * prompt, which the provider bills: in the store, the metrics and the
 * cost log (499), the completion at nothing. Returns the charge, USD. */
static double leave_once_the_backend_has_it(void)
{
    cJSON *rec;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend_counted("a", mock_a.port, 1, 100, 300, "o200k_base");
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    chat_and_leave(mock_a_has_it);
    double counted, spent = spent_then_stop(&counted);
    rec = record_last(NULL, log_path);
    double prompt = cJSON_GetObjectItem(rec, "billed_prompt_tokens")->valuedouble;
    double want = usd(prompt, 0, 100, 300);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 499);
    cr_assert_gt(prompt, 0, "the prompt was not billed");
    cr_assert_eq(prompt, cJSON_GetObjectItem(rec, "prompt_tokens_est")->valuedouble,
                 "the router's own count of the prompt");
    cr_assert_eq(cJSON_GetObjectItem(rec, "billed_completion_tokens")->valuedouble, 0);
    cr_assert_float_eq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, want, 1e-12);
    cr_assert_float_eq(spent, want, 1e-12, "the store holds %.6f USD", spent);
    cr_assert_float_eq(counted, want, 1e-12, "costrouter_cost_usd_total says %g", counted);
    cJSON_Delete(rec);
    return want;
}

Test(costs, a_client_leaving_before_the_answer_pays_the_prompt_the_backend_has)
{
    leave_once_the_backend_has_it();
}

Test(costs, a_client_leaving_before_the_answer_pays_the_prompt_in_redis)
{
    char path[256], day[16];
    time_t now = time(NULL);
    struct tm tm;

    cr_assert_eq(test_redis_start(&redis, 0), 0);
    double want = leave_once_the_backend_has_it();
    gmtime_r(&now, &tm);
    strftime(day, sizeof(day), "%Y%m%d", &tm);
    snprintf(path, sizeof(path), "costrouter:{%s}:d:%s", tenant_id, day);
    cr_assert_eq(test_redis_int(&redis, "GET %s", path), llround(want * 1e6));
}

/* A client that leaves while the router is still connecting (to a
 * listener whose one-place backlog is taken, so the handshake never
 * completes): the backend has nothing to bill, the tenant pays nothing
 * and its hold is released. */
Test(costs, a_client_leaving_before_its_request_reached_the_backend_pays_nothing)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    struct support_http_conn filler;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cJSON *rec;

    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    cr_assert_eq(listen(fd, 0), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    cr_assert_eq(support_http_connect(&filler, ntohs(a.sin_port)), 0);
    add_backend_with("a", ntohs(a.sin_port), 1, 100, 300, "o200k_base",
                     ", connect_timeout_ms: 10000");
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    chat_and_leave(NULL);
    cr_assert_float_eq(day_spend_settled(), 0, 1e-12);
    support_proc_stop(&routers[0]);
    support_http_close(&filler);
    close(fd);
    rec = record_last(NULL, log_path);
    cr_assert_eq(cJSON_GetObjectItem(rec, "status")->valuedouble, 499);
    cr_assert_eq(cJSON_GetObjectItem(rec, "billed_prompt_tokens")->valuedouble, 0);
    cr_assert_float_eq(cJSON_GetObjectItem(rec, "cost_usd")->valuedouble, 0, 1e-12);
    cJSON_Delete(rec);
}

/* The cost log's cost_usd and its lines, summed (the routers must have
 * stopped). */
static double logged_usd(int *lines)
{
    char line[4096];
    double sum = 0;
    FILE *f = fopen(log_path, "r");

    cr_assert_not_null(f);
    *lines = 0;
    while (fgets(line, sizeof(line), f)) {
        cJSON *rec = cJSON_Parse(line);

        cr_assert_not_null(rec, "%s", line);
        sum += cJSON_GetObjectItem(rec, "cost_usd")->valuedouble;
        (*lines)++;
        cJSON_Delete(rec);
    }
    fclose(f);
    return sum;
}

/* An embedding of "hello there": 2 tokens (the mock's count of words), at
 * $0.1 per million tokens 0.2 micro-USD, under half of one. */
#define TINY_USD (2 * 0.1 / 1e6)

static void embed_tiny(int n)
{
    for (int i = 0; i < n; i++) {
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/embeddings", AUTH,
                               "{\"model\":\"chat\",\"input\":\"hello there\"}"),
                     0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    }
}

/* `n` requests of 0.2 micro-USD each (and the reloads `reload` does
 * between them) are charged what the cost log says they cost, to within
 * the half micro-USD a tenant may carry; each alone rounded to $0. Returns
 * the store's spend, USD. */
static double many_tiny_charges(int n, void (*reload)(int n))
{
    int lines;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 0.1, 0.1);
    start_routers(1, "a", "    budget: {daily_usd: 10}\n");
    if (reload != NULL)
        reload(n);
    else
        embed_tiny(n);
    double counted, spent = spent_then_stop(&counted);
    double logged = logged_usd(&lines);
    cr_assert_eq(lines, n);
    cr_assert_float_eq(logged, n * TINY_USD, 1e-12, "the cost log has each request's cost");
    cr_assert_float_eq(counted, logged, 1e-12, "costrouter_cost_usd_total says %g", counted);
    cr_assert_float_eq(spent, logged, 0.5e-6 + 1e-12,
                       "the store holds %.6f USD, the cost log sums to %.9f USD", spent, logged);
    return spent;
}

Test(costs, many_requests_under_half_a_micro_dollar_are_charged_their_sum)
{
    many_tiny_charges(40, NULL); /* 8 micro-USD */
}

Test(costs, many_requests_under_half_a_micro_dollar_are_charged_their_sum_in_redis)
{
    char path[256], day[16];
    time_t now = time(NULL);
    struct tm tm;

    cr_assert_eq(test_redis_start(&redis, 0), 0);
    double spent = many_tiny_charges(40, NULL);
    gmtime_r(&now, &tm);
    strftime(day, sizeof(day), "%Y%m%d", &tm);
    snprintf(path, sizeof(path), "costrouter:{%s}:d:%s", tenant_id, day);
    cr_assert_eq(test_redis_int(&redis, "GET %s", path), llround(spent * 1e6));
    cr_assert_geq(spent, 7.5e-6, "each was rounded to $0 alone");
}

/* Two requests (0.4 micro-USD carried), then a reload, four times. */
static void embed_across_reloads(int n)
{
    for (int i = 0; i < n / 2; i++) {
        embed_tiny(2);
        cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    }
}

/* A reload keeps what each tenant carries: dropping it would lose 0.4
 * micro-USD at each of these reloads, 1.6 in all. */
Test(costs, a_reload_keeps_the_fraction_a_tenant_carries)
{
    many_tiny_charges(8, embed_across_reloads);
}

/* ---- the cost log behind the disk ---- */

#define BEHIND_CONF(wait_ms) "cost_log_buffer_max: 8192\ncost_log_wait_ms: " #wait_ms "\n"

/* A router whose cost log is a FIFO nobody reads yet, with `conf` (a
 * small cost_log_buffer_max). */
static void start_fifo_router(const char *conf)
{
    fifo.wanted = 1;
    top_extra = conf;
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 1, 1);
    start_routers(1, "a", NULL);
}

/* Feed it chats one after another until its log is behind; returns how
 * many (each answered, each a record with its cost). */
static int fill_until_behind(void)
{
    for (int n = 1; n <= 300; n++) {
        cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert_eq(resp.status, 200, "request %d", n);
        cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
        if (metric_value("costrouter_cost_log_behind") == 1)
            return n;
    }
    cr_assert_fail("the cost log never fell behind");
    return 0;
}

static int start_behind(const char *conf)
{
    start_fifo_router(conf);
    return fill_until_behind();
}

/* Once the router has stopped: the records the FIFO's reader got, and
 * how many of them have `needle`. */
static int fifo_records(const char *needle, int *with)
{
    fifo_join();
    *with = count_log_lines(fifo.out, needle);
    return count_log_lines(fifo.out, "\"request_id\":");
}

/* Let the reader go, stop the router (it must exit 0), and check that the
 * FIFO got `want` records, `want_with` of them with `needle`. */
static void drain_stop_and_count(int want, const char *needle, int want_with)
{
    int with;

    fifo_release();
    support_proc_stop(&routers[0]);
    cr_assert(support_proc_exited_cleanly(&routers[0]));
    cr_assert_eq(fifo_records(needle, &with), want, "a record lost, or one skipped written");
    cr_assert_eq(with, want_with, "%d records with %s", with, needle);
}

/* Read /metrics until `name` is `want` (5 s at most). */
static void wait_metric(const char *name, double want)
{
    for (int tries = 0; tries < 250; tries++) {
        cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
        if (metric_value(name) == want)
            return;
        usleep(20000);
    }
    cr_assert_fail("%s is %g, not %g", name, metric_value(name), want);
}

/* A chat request on a connection of its own, not answered. */
struct held_chat {
    struct support_http_conn conn;
    struct support_http_response resp;
    struct buf req;
};

static void send_held_chat(struct held_chat *h)
{
    *h = (struct held_chat){.conn = {.fd = -1}};
    send_unanswered(&h->conn, &h->req, AUTH, "{\"model\":\"chat\"," MSG "}");
}

/* Send one, and see it unanswered for quiet_ms: parked. */
static void hold_chat(struct held_chat *h, int quiet_ms)
{
    send_held_chat(h);
    cr_assert_eq(support_http_read(&h->conn, &h->resp, quiet_ms), -ETIMEDOUT,
                 "answered %d while the cost log was behind", h->resp.status);
}

static void held_chat_free(struct held_chat *h)
{
    support_http_close(&h->conn);
    support_http_response_free(&h->resp);
    buf_free(&h->req);
}

/* While the cost log is behind, what writes no record (/healthz, /metrics)
 * is answered at once, and a chat request is parked unanswered until the
 * log catches up; one whose client leaves meanwhile is dropped cleanly:
 * its 499 carries no cost, and the log, behind, skips it and counts it.
 * No record with a cost is lost. */
Test(costs, a_cost_log_behind_parks_new_requests_until_it_catches_up)
{
    struct held_chat held, gone;
    int n = start_behind(BEHIND_CONF(20000));

    cr_assert_eq(call_port(routers[0].port, "GET", "/healthz", NULL, NULL), 0);
    cr_assert_eq(resp.status, 200);
    hold_chat(&held, 300);
    hold_chat(&gone, 200);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value("costrouter_cost_log_parked_requests_total"), 2);
    cr_assert_eq(metric_value("costrouter_inflight_requests"), 2);
    held_chat_free(&gone);
    wait_metric("costrouter_cost_log_skipped_total", 1); /* the router saw it leave */
    fifo_release();
    cr_assert_eq(support_http_read(&held.conn, &held.resp, TIMEOUT_MS), 0);
    cr_assert_eq(held.resp.status, 200);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value("costrouter_cost_log_behind"), 0);
    drain_stop_and_count(n + 1, "\"status\":499", 0);
    held_chat_free(&held);
}

/* Parked longer than cost_log_wait_ms: 503 cost_log_behind, Retry-After,
 * nothing charged; its record, carrying no cost, is skipped while the
 * log is behind, and counted. The router parks it after it was sent and
 * answers once its loop clock has moved cost_log_wait_ms on, so the
 * answer comes no sooner than that after the sending, however late the
 * test reads it. (Seeing it unanswered for 200 ms from the read's start,
 * as this test did, needed the test to start that read within 100 ms of
 * the sending, which a loaded machine need not do.) */
Test(costs, a_request_parked_for_cost_log_wait_ms_gets_503)
{
    struct held_chat held;
    int n = start_behind(BEHIND_CONF(300));
    double sent, waited_ms;
    cJSON *body;

    sent = support_mono_ms();
    send_held_chat(&held);
    cr_assert_eq(support_http_read(&held.conn, &held.resp, 3000), 0, "parked past 10 x the wait");
    waited_ms = support_mono_ms() - sent;
    cr_assert_eq(held.resp.status, 503);
    cr_assert_geq(waited_ms, 300 - LOOP_CLOCK_LAG_MS, "answered %.1f ms after it was sent",
                  waited_ms);
    cr_assert_str_eq(support_http_header(&held.resp, "retry-after"), "1");
    cr_assert_null(support_http_header(&held.resp, "x-costrouter-cost-usd"));
    body = cJSON_ParseWithLength(held.resp.body.data, held.resp.body.len);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(body, "error"),
                                                              "code")),
                     "cost_log_behind");
    cJSON_Delete(body);
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value("costrouter_cost_log_parked_requests_total"), 1);
    cr_assert_eq(metric_value("costrouter_cost_log_skipped_total"), 1);
    drain_stop_and_count(n, "\"status\":503", 0);
    held_chat_free(&held);
}

/* SIGTERM while behind: the parked request is answered 503 at once (it
 * never started; its record, with no cost, is skipped), and the router
 * waits for the disk to take every record before it exits 0. */
Test(costs, sigterm_while_the_cost_log_is_behind_refuses_parked_requests_and_loses_nothing)
{
    struct held_chat held;
    int n = start_behind(BEHIND_CONF(20000)), status;

    hold_chat(&held, 300);
    kill(routers[0].pid, SIGTERM);
    cr_assert_eq(support_http_read(&held.conn, &held.resp, 2000), 0, "parked through the stop");
    cr_assert_eq(held.resp.status, 503);
    usleep(300 * 1000);
    cr_assert_eq(waitpid(routers[0].pid, &status, WNOHANG), 0,
                 "exited with records the disk had not taken");
    drain_stop_and_count(n, "\"status\":503", 0);
    held_chat_free(&held);
}

/*
 * While the cost log is behind, refusals of unread requests (a malformed
 * head, with a key before the fault or none) are answered as ever but
 * their records, which carry no cost, are skipped: counted, logged once,
 * and nothing more waits for the disk however many come. A request with a
 * reservation in flight meanwhile still gets its record (a 499 when its
 * client leaves), and once the reader reads, the log catches up.
 */
Test(costs, refusals_of_unread_requests_are_skipped_while_the_cost_log_is_behind)
{
    static const char keyed[] = "POST /v1/chat/completions HTTP/1.1\r\n" AUTH "Host x\r\n\r\n";
    static const char bare[] = "POST /v1/chat/completions HTTP/1.1\r\nHost x\r\n\r\n";
    static const char series[] = "costrouter_requests_total{tenant=\"acme\",backend=\"none\","
                                 "route=\"unknown\",status=\"400\"} ";
    enum { REFUSALS = 60 };
    char log[64] = "/tmp/costrouter-stderr-XXXXXX";
    struct support_http_conn slow = {.fd = -1};
    struct buf slow_req = {0};
    double before;
    int n, warned, with;

    close(mkstemp(log));
    stderr_path = log;
    start_fifo_router(BEHIND_CONF(20000));
    /* Reserved, sent, and answered only when the client has long gone. */
    send_unanswered(&slow, &slow_req, AUTH "x-mock-ttft-ms: 600000\r\n",
                    "{\"model\":\"chat\"," MSG "}");
    wait_metric("costrouter_inflight_requests", 1);
    n = fill_until_behind();
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    before = metric_value("costrouter_cost_log_waiting_bytes");
    cr_assert_geq(before, 8192, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(metric_value("costrouter_cost_log_skipped_total"), 0);
    for (int i = 0; i < REFUSALS; i++) {
        const char *raw = i % 2 ? keyed : bare;
        size_t len = i % 2 ? sizeof(keyed) - 1 : sizeof(bare) - 1;

        cr_assert_eq(support_http_request(routers[0].port, raw, len, TIMEOUT_MS, &resp), 0);
        cr_assert_eq(resp.status, 400, "refusal %d: %d", i, resp.status);
        cr_assert_not_null(cJSON_GetObjectItem(body_json(), "error"), "refusal %d", i);
    }
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(metric_value("costrouter_cost_log_behind"), 1);
    cr_assert_eq(metric_value("costrouter_cost_log_skipped_total"), REFUSALS);
    cr_assert_leq(metric_value("costrouter_cost_log_waiting_bytes"), before,
                  "the refusals' records wait for the disk");
    /* The metrics count them as ever, those with the key under its tenant. */
    const char *p = memmem(resp.body.data, resp.body.len, series, sizeof(series) - 1);
    cr_assert_not_null(p, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(strtod(p + sizeof(series) - 1, NULL), REFUSALS / 2);
    /* The request with money leaves while behind: its record is taken. */
    support_http_close(&slow);
    wait_metric("costrouter_inflight_requests", 0);
    cr_assert_gt(metric_value("costrouter_cost_log_waiting_bytes"), before);
    cr_assert_eq(metric_value("costrouter_cost_log_skipped_total"), REFUSALS);
    fifo_release();
    wait_metric("costrouter_cost_log_behind", 0);
    support_proc_stop(&routers[0]);
    cr_assert(support_proc_exited_cleanly(&routers[0]));
    warned = count_log_lines(log, "costrouter_cost_log_skipped_total");
    unlink(log);
    cr_assert_eq(fifo_records("\"status\":499", &with), n + 1, "a record lost, or a refusal written");
    cr_assert_eq(with, 1, "the record of the request with money that was in flight");
    cr_assert_eq(count_log_lines(fifo.out, "\"status\":400"), 0);
    cr_assert_eq(count_log_lines(fifo.out, "\"status\":200"), n);
    cr_assert_eq(warned, 1, "the skips are logged once a minute, not once each");
    buf_free(&slow_req);
}

/* SIGTERM with a cost log that never drains: after cost_log_wait_ms with
 * no write going through, the router gives the records up (and says so)
 * rather than hang; it exits 0 within the stop's grace. */
Test(costs, sigterm_with_a_cost_log_that_never_drains_exits_after_cost_log_wait_ms)
{
    char log[64] = "/tmp/costrouter-stderr-XXXXXX";
    uint64_t start;
    int lines;

    close(mkstemp(log));
    stderr_path = log;
    start_behind(BEHIND_CONF(500));
    start = (uint64_t)time(NULL);
    support_proc_stop(&routers[0]);
    lines = count_log_lines(log, "at exit; giving up");
    unlink(log);
    cr_assert(support_proc_exited_cleanly(&routers[0]), "hung on the stuck cost log");
    cr_assert_leq((uint64_t)time(NULL) - start, 3);
    cr_assert_eq(lines, 1);
}

/* ---- the request's own tags ---- */

/* x-costrouter-tags puts the request's own tags (what it is for: a
 * feature, an app) beside the tenant's in its cost log line, for
 * chargeback; several lines are one list; the header never goes
 * upstream; a tag the tenant's config sets, a malformed list or more than
 * 8 tags is a 400 and nothing is sent. */
Test(costs, a_request_tags_its_cost_log_line)
{
    static const char *const bad[] = {
        "x-costrouter-tags: team=ads\r\n",  /* the tenant's */
        "x-costrouter-tags: feature\r\n",   /* no value */
        "x-costrouter-tags: =x\r\n",        /* no key */
        "x-costrouter-tags: a b=x\r\n",     /* not a key */
        "x-costrouter-tags: a=1, a=2\r\n",  /* twice */
        "x-costrouter-tags: a=1,b=2,c=3,d=4,e=5,f=6,g=7,h=8,i=9\r\n",
    };
    const cJSON *tags, *headers;
    cJSON *rec;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cr_assert_eq(chat(0, bad[i], "{\"model\":\"chat\"," MSG "}"), 0);
        cr_assert_eq(resp.status, 400, "%s", bad[i]);
        cr_assert_str_eq(
            cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "code")->valuestring,
            "invalid_tags", "%s", bad[i]);
    }
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 0, "none sent");

    cr_assert_eq(chat(0, "x-costrouter-tags: feature=summarize , , app = web\r\n"
                         "X-Costrouter-Tags: release=2026.12\r\n",
                      "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/last-request", NULL, NULL), 0);
    headers = cJSON_GetObjectItem(body_json(), "headers");
    cr_assert_null(cJSON_GetObjectItem(headers, "x-costrouter-tags"), "sent upstream");
    support_proc_stop(&routers[0]);
    rec = record_last(NULL, log_path);
    tags = cJSON_GetObjectItem(rec, "tags");
    cr_assert_eq(cJSON_GetArraySize(tags), 5);
    cr_assert_str_eq(cJSON_GetObjectItem(tags, "team")->valuestring, "search");
    cr_assert_str_eq(cJSON_GetObjectItem(tags, "cost_center")->valuestring, "cc-1");
    cr_assert_str_eq(cJSON_GetObjectItem(tags, "feature")->valuestring, "summarize");
    cr_assert_str_eq(cJSON_GetObjectItem(tags, "app")->valuestring, "web");
    cr_assert_str_eq(cJSON_GetObjectItem(tags, "release")->valuestring, "2026.12");
    cJSON_Delete(rec);
}

/* ---- budgets per key ---- */

/* The 429's error message. */
static const char *error_message(void)
{
    return cJSON_GetStringValue(
        cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "error"), "message"));
}


/* $0.0019 a request at $100/Mtok both ways (9 + 10 tokens, held and
 * settled alike), with budgets ($0.005: two of them) `ci_budget` for the
 * key ci and `tenant_budget` for its tenant (reject): ci, then `second`,
 * pass, and ci's next is refused. */
static void refused_third(const char *ci_budget, const char *tenant_budget, const char *second)
{
    char budget[96];

    key_ci_budget(ci_budget);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 100);
    snprintf(budget, sizeof(budget), "    budget: {%s, on_exhausted: reject}\n", tenant_budget);
    start_routers(1, "a", budget);
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 200);
    cr_assert_eq(key_chat(second, KEY_BODY), 200);
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 429, "ci's third");
}

/* The key ci may spend $0.005, two of them, in a tenant
 * that may spend $1: its third is refused by its own budget, named by the
 * key's name (never its secret), while the tenant's other keys go on. */
Test(costs, a_keys_budget_refuses_that_key_and_not_its_tenants_others)
{
    const char *msg;

    refused_third("daily_usd: 0.005", "daily_usd: 1", KEY_CI);
    msg = error_message();
    cr_assert_not_null(strstr(msg, "budget exhausted: key \"ci\" of acme (the key's own budget)"),
                       "%s", msg);
    cr_assert_null(strstr(msg, KEY_CI), "the key itself in: %s", msg);
    cr_assert_float_eq(header_usd("x-costrouter-budget-remaining-usd"), 0.005 - 2 * 0.0019, 1e-9);
    cr_assert_str_eq(support_http_header(&resp, "x-should-retry"), "false");
    cr_assert_eq(key_chat(KEY_WEB, KEY_BODY), 200, "another key of the tenant");
    cr_assert_eq(key_chat(NULL, KEY_BODY), 200, "the tenant's unnamed key");
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 429, "still refused");
    /* The refusals left nothing held: the tenant's hold went back. */
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "reserved_usd")->valuedouble, 0, 1e-12);
    cr_assert_float_eq(cJSON_GetObjectItem(json, "day_usd")->valuedouble, 4 * 0.0019, 1e-9);
    more_keys = "";
}

/* A key's budget larger than its tenant's: the tenant's still binds, and
 * the 429 says it is the tenant's. */
Test(costs, the_tenants_budget_binds_a_key_whose_own_is_larger)
{
    const char *msg;

    refused_third("daily_usd: 1", "daily_usd: 0.005", KEY_WEB);
    msg = error_message();
    cr_assert_str_eq(msg, "budget exhausted: acme");
    cr_assert_float_eq(header_usd("x-costrouter-budget-remaining-usd"), 0.005 - 2 * 0.0019, 1e-9);
}

/* The cost log's lines of key `name` (the routers stopped): their count,
 * and the sum of their costs into *sum. */
static int key_cost_lines(const char *name, double *sum)
{
    FILE *f = fopen(log_path, "r");
    char line[8192];
    int n = 0;

    cr_assert_not_null(f);
    *sum = 0;
    while (fgets(line, sizeof(line), f)) {
        cJSON *rec = cJSON_Parse(line);
        const cJSON *key = cJSON_GetObjectItem(rec, "key");

        cr_assert_not_null(rec, "%s", line);
        cr_assert_null(strstr(line, "sk-cost"), "a key in the cost log: %s", line);
        if (cJSON_IsString(key) && strcmp(key->valuestring, name) == 0) {
            *sum += cJSON_GetObjectItem(rec, "cost_usd")->valuedouble;
            n++;
        }
        cJSON_Delete(rec);
    }
    fclose(f);
    return n;
}

/* The key's spend in the admin API is the sum of its cost log lines,
 * within the half micro-dollar its own carry keeps (costs of fractions of
 * a micro-dollar each, the tenant's other key's among them, would drift
 * apart on the tenant's carry). */
Test(costs, a_keys_spend_in_the_admin_api_is_the_sum_of_its_cost_log_lines)
{
    const cJSON *keys, *ci;
    double day, month, sum;

    key_ci_budget("daily_usd: 1, monthly_usd: 20");
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 0.037, 0.053); /* fractions of a micro-USD */
    start_routers(1, "a", "    budget: {daily_usd: 5}\n");
    for (int i = 0; i < 12; i++) {
        char headers[128];

        snprintf(headers, sizeof(headers), "Authorization: Bearer %s\r\nx-mock-tokens: %d\r\n",
                 i % 3 ? KEY_CI : KEY_WEB, 1 + i * 7);
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions", headers,
                               "{\"model\":\"chat\",\"max_tokens\":200," MSG "}"),
                     0);
        cr_assert_eq(resp.status, 200);
    }
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    keys = cJSON_GetObjectItem(body_json(), "keys");
    cr_assert_eq(cJSON_GetArraySize(keys), 1, "only the key with a budget: %.*s",
                 (int)resp.body.len, resp.body.data);
    ci = cJSON_GetArrayItem(keys, 0);
    cr_assert_str_eq(cJSON_GetObjectItem(ci, "name")->valuestring, "ci");
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "day_budget_usd")->valuedouble, 1, 1e-12);
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "month_budget_usd")->valuedouble, 20, 1e-12);
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "reserved_usd")->valuedouble, 0, 1e-12);
    day = cJSON_GetObjectItem(ci, "day_usd")->valuedouble;
    month = cJSON_GetObjectItem(ci, "month_usd")->valuedouble;
    /* The list of every tenant says the same. */
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants", ADMIN, NULL), 0);
    ci = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(body_json(), 0), "keys"), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "day_usd")->valuedouble, day, 1e-12);
    support_proc_stop(&routers[0]);
    cr_assert_eq(key_cost_lines("ci", &sum), 8);
    cr_assert_gt(sum, 0);
    cr_assert_leq(fabs(day - sum), 0.5e-6 + 1e-12, "spend %.9f, cost log %.9f", day, sum);
    cr_assert_float_eq(month, day, 1e-12);
}

/* A key's exhausted budget downgrades when its tenant says downgrade: the
 * key's requests go to the cheap backend, the tenant's others do not. */
Test(costs, a_keys_exhausted_budget_downgrades_when_its_tenant_says_so)
{
    const char *body = KEY_BODY;

    key_ci_budget("daily_usd: 0.03");
    start_good_and_cheap(1, "daily_usd: 10");
    cr_assert_eq(key_chat(KEY_CI, body), 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good");
    /* $0.011 left to the key: "good" no longer fits it, "cheap" does. */
    cr_assert_eq(key_chat(KEY_CI, body), 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "downgraded-budget");
    cr_assert_eq(key_chat(KEY_WEB, body), 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good", "another key");
}

/* The same promise for a key's own budget: two routers sharing Redis, six
 * clients on the key ci ($0.05 a day, in a tenant with $10), another on
 * the tenant's key web. The key's spend in Redis is its answers' and
 * passes its budget by no more than the requests in flight are charged
 * beyond their holds (nothing here: max_tokens, and the prompt counted
 * as the mock counts), while web's requests all pass. */
Test(costs, routers_sharing_redis_never_overspend_a_keys_budget)
{
    const int workers = 6, each = 15;
    int granted;
    const cJSON *tenant, *ci;
    double spent;

    key_ci_budget("daily_usd: 0.05");
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock_a, "--token-delay-ms", "1", NULL), 0);
    add_backend_counted("a", mock_a.port, 1, 100, 100, "cl100k_base"); /* held as charged */
    start_routers(2, "a", "    budget: {daily_usd: 10, on_exhausted: reject}\n");
    granted = hammer_all(2, "Authorization: Bearer " KEY_CI "\r\n", workers, each);
    cr_assert_eq(hammer_all(2, "Authorization: Bearer " KEY_WEB "\r\n", 1, 5), 5, "web refused");
    cr_assert_eq(call_port(routers[1].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    tenant = body_json();
    ci = cJSON_GetArrayItem(cJSON_GetObjectItem(tenant, "keys"), 0);
    spent = cJSON_GetObjectItem(ci, "day_usd")->valuedouble;
    cr_assert_float_eq(spent, granted * 0.0019, 1e-9, "spend %f for %d answers", spent, granted);
    cr_assert_float_eq(cJSON_GetObjectItem(tenant, "day_usd")->valuedouble, (granted + 5) * 0.0019,
                       1e-9, "the tenant is charged the key's requests too");
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "reserved_usd")->valuedouble, 0, 1e-12);
    cr_assert_float_eq(cJSON_GetObjectItem(tenant, "reserved_usd")->valuedouble, 0, 1e-12,
                       "a hold the key refused went back to the tenant");
    double excess = largest_excess(workers * each + 5);
    cr_assert_leq(spent, 0.05 + workers * excess + 1e-9, "overspent: $%f (excess %f)", spent,
                  excess);
    cr_assert_gt(spent, 0.05 - 0.0019 - workers * excess, "spent only $%f", spent);
}

/* Router 1 has not heard of the key's spend on router 0: it chooses the
 * good backend, which the tenant's budget grants and the key's, in Redis,
 * refuses. The tenant's hold goes back, and the request, choosing again
 * by the key's numbers, is downgraded: nothing is left held, and each
 * budget is charged each request once. */
Test(costs, a_hold_the_keys_budget_refuses_in_redis_goes_back_to_its_tenant)
{
    const cJSON *ci;

    key_ci_budget("daily_usd: 0.03");
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    start_good_and_cheap(2, "daily_usd: 10");
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "good");
    wait_settled_in_redis();
    cr_assert_eq(call_port(routers[1].port, "POST", "/v1/chat/completions",
                           "Authorization: Bearer " KEY_CI "\r\nx-mock-tokens: 10\r\n", KEY_BODY),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cheap");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "downgraded-budget");
    wait_settled_in_redis();
    cr_assert_eq(call_port(routers[1].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(body_json(), "reserved_usd")->valuedouble, 0, 1e-12,
                       "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_float_eq(cJSON_GetObjectItem(json, "day_usd")->valuedouble, 0.019 + 0.00019, 1e-9);
    ci = cJSON_GetArrayItem(cJSON_GetObjectItem(json, "keys"), 0);
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "day_usd")->valuedouble, 0.019 + 0.00019, 1e-9);
    cr_assert_float_eq(cJSON_GetObjectItem(ci, "reserved_usd")->valuedouble, 0, 1e-12);
}

/* Whether /metrics of router 0 has the line `series`. */
static int metrics_have(const char *series)
{
    cr_assert_eq(call_port(routers[0].port, "GET", "/metrics", ADMIN, NULL), 0);
    return memmem(resp.body.data, resp.body.len, series, strlen(series)) != NULL;
}

/* A reload raises the key's budget (the spend so far still counts, and
 * the gauges keep it), takes it away (the key is limited by its tenant
 * alone, and its spend meanwhile is not counted) and gives it back. */
Test(costs, a_reload_changes_removes_and_gives_back_a_keys_budget)
{
    const char tenant[] = "    budget: {daily_usd: 1, on_exhausted: reject}\n";
    const char spent_2[] =
        "costrouter_key_budget_spent_usd{tenant=\"acme\",key=\"ci\",period=\"day\"} 0.0038";

    refused_third("daily_usd: 0.005", "daily_usd: 1", KEY_CI);
    key_ci_budget("daily_usd: 0.008");
    write_conf("a", tenant);
    reload_router();
    cr_assert(metrics_have(spent_2), "the key's spend gauge after a reload: %.*s",
              (int)resp.body.len, resp.body.data);
    cr_assert(metrics_have("costrouter_key_budget_remaining_usd{tenant=\"acme\",key=\"ci\","
                           "period=\"day\"} 0.0042"));
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 200);
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 200, "$0.0057 + $0.0019 fits $0.008");
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 429);
    key_ci_budget("daily_usd: 0");
    write_conf("a", tenant);
    reload_router();
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 200, "no budget of its own");
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(body_json(), "keys")), 0);
    cr_assert_not(metrics_have("key=\"ci\""), "a gauge of a budget there is no more");
    key_ci_budget("daily_usd: 0.008");
    write_conf("a", tenant);
    reload_router();
    cr_assert_eq(key_chat(KEY_CI, KEY_BODY), 429, "its $0.0076 counted before still is");
    cr_assert_eq(key_chat(KEY_WEB, KEY_BODY), 200);
}

/* A canned upstream answering 200 with the SSE `events`, chunked and
 * properly ended (the HTTP message is whole, whatever the stream says). */
static void start_canned_stream(const char *events, const char *backend_more)
{
    struct buf out = {0};

    cr_assert_eq(buf_printf(&out,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            "%zx\r\n%s\r\n0\r\n\r\n",
                            strlen(events), events),
                 0);
    canned = support_canned_start(out.data, out.len);
    buf_free(&out);
    cr_assert_not_null(canned);
    add_backend_with("a", support_canned_port(canned), 1, 100, 300, NULL, backend_more);
    start_routers(1, "a", NULL);
}

/* Send `body` to `path` twice: both must go upstream (the first answer,
 * a failed or unfinished stream, is no answer to replay). */
static void assert_stream_not_cached(const char *path, const char *body)
{
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(call_port(routers[0].port, "POST", path, AUTH, body), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a",
                         "request %d replayed a stream that failed: %.*s", i,
                         (int)resp.raw.len, resp.raw.data);
    }
    cr_assert_eq(support_canned_requests(canned), 2);
}

/* Anthropic reports an error that happens once a stream has begun as an
 * `event: error` in the 200 stream (overloaded_error, api_error). That
 * answer is a failure: replaying it from the cache for ttl_s served every
 * identical request the same "Overloaded" for an hour. */
Test(costs, a_stream_that_reports_an_error_is_not_cached)
{
    start_canned_stream(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\","
        "\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"m-a\","
        "\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n"
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,"
        "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
        "\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n"
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\","
        "\"message\":\"Overloaded\"}}\n\n",
        ", api: anthropic");
    assert_stream_not_cached("/v1/messages", "{\"model\":\"chat\",\"max_tokens\":5,"
                                             "\"temperature\":0,\"stream\":true," MSG "}");
}

/* A chat stream that stops before its `data: [DONE]` (the upstream, or a
 * proxy before it, ended the HTTP message cleanly mid-answer) is cut:
 * replayed, it gave every later client the cut answer as a whole one. */
Test(costs, a_stream_without_its_end_is_not_cached)
{
    start_canned_stream("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m-a\","
                        "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
                        "\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
                        "");
    assert_stream_not_cached("/v1/chat/completions",
                             "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}");
}

/* A stream that ends as its API ends one is cached on every endpoint:
 * chat's `[DONE]`, Anthropic's message_stop, the Responses API's
 * response.completed. */
Test(costs, a_stream_that_ends_well_is_cached_on_every_endpoint)
{
    static const char *const paths[] = {"/v1/chat/completions", "/v1/messages", "/v1/responses"};
    static const char *const bodies[] = {
        "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}",
        "{\"model\":\"chat\",\"max_tokens\":5,\"temperature\":0,\"stream\":true," MSG "}",
        "{\"model\":\"chat\",\"temperature\":0,\"store\":false,\"stream\":true,"
        "\"input\":\"hello there\"}",
    };
    static const char *const ends[] = {"data: [DONE]", "message_stop", "response.completed"};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    add_backend_with("c", mock_a.port, 1, 100, 300, NULL, ", api: anthropic, api_key: sk-up");
    start_routers(1, "a, c", NULL);
    for (int i = 0; i < 3; i++)
        for (int round = 0; round < 2; round++) {
            cr_assert_eq(call_port(routers[0].port, "POST", paths[i], AUTH, bodies[i]), 0);
            cr_assert_eq(resp.status, 200, "%s: %.*s", paths[i], (int)resp.raw.len, resp.raw.data);
            cr_assert_not_null(memmem(resp.body.data, resp.body.len, ends[i], strlen(ends[i])),
                               "%s", paths[i]);
            if (round == 1)
                cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache",
                                 "%s was not cached", paths[i]);
        }
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 3);
}

/* cache.max_entry_bytes is the largest answer cached (README): one raised
 * to 4 MiB caches a stream of 1.6 MiB, where the router kept at most
 * 1 MiB of an answer whatever the config said, and never cached it. */
Test(costs, the_largest_cached_answer_is_max_entry_bytes)
{
    const char body[] = "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}";

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    top_extra = "cache: {max_entry_bytes: 4194304}\n";
    start_routers(1, "a", NULL);
    for (int round = 0; round < 2; round++) {
        cr_assert_eq(chat(0, "x-mock-event-pad: 100000\r\n", body), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_gt(resp.body.len, 1600000);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), round ? "cache" : "a",
                         "round %d", round);
    }
    top_extra = "";
}

/* ---- single flight: a request identical to one upstream waits for it ---- */

#define JOIN_BODY "{\"model\":\"chat\",\"temperature\":0," MSG "}"

/* The tenant's spend today, from the admin API. */
static double spend_today(void)
{
    cr_assert_eq(call_port(routers[0].port, "GET", "/admin/tenants/acme/spend", ADMIN, NULL),
                 0);
    return cJSON_GetObjectItem(body_json(), "day_usd")->valuedouble;
}

/* A router in front of mockllm (backend a) with a request (sent with
 * `leader_headers` after AUTH) upstream, the flight's leader, after
 * `leader_ms`: identical requests sent next join it. */
static void join_one(struct support_http_conn *leader, struct buf *out,
                     const char *leader_headers, int leader_ms)
{
    char h[256];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    snprintf(h, sizeof(h), AUTH "%s", leader_headers);
    send_unanswered(leader, out, h, JOIN_BODY);
    usleep((useconds_t)leader_ms * 1000); /* the first is upstream, the flight's leader */
}

/* The waiter gets the leader's answer, free, told what it saved: one
 * upstream call, one charge. */
Test(costs, a_request_joined_to_its_twin_gets_its_answer_free)
{
    struct support_http_conn lead = {.fd = -1};
    struct support_http_response lead_resp = {0};
    struct buf out = {0};
    double paid;

    join_one(&lead, &out, "x-mock-ttft-ms: 800\r\n", 300);
    cr_assert_eq(chat(0, NULL, JOIN_BODY), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), 0, 1e-12);
    cr_assert_eq(support_http_read(&lead, &lead_resp, TIMEOUT_MS), 0);
    cr_assert_eq(lead_resp.status, 200);
    paid = strtod(support_http_header(&lead_resp, "x-costrouter-cost-usd"), NULL);
    cr_assert_gt(paid, 0);
    cr_assert_float_eq(spend_today(), paid, 1e-9, "charged once");
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 1);
    support_http_close(&lead);
    support_http_response_free(&lead_resp);
    buf_free(&out);
}

/* The leader's backend fails (a 500 after a while): the waiter goes
 * itself, gets its own answer and pays for it alone. */
Test(costs, a_request_joined_to_a_twin_that_fails_goes_itself)
{
    struct support_http_conn lead = {.fd = -1};
    struct support_http_response lead_resp = {0};
    struct buf out = {0};
    double paid;

    join_one(&lead, &out, "x-mock-ttft-ms: 800\r\nx-mock-status: 500\r\n", 300);
    cr_assert_eq(chat(0, NULL, JOIN_BODY), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.raw.len, resp.raw.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    paid = header_usd("x-costrouter-cost-usd");
    cr_assert_eq(support_http_read(&lead, &lead_resp, TIMEOUT_MS), 0);
    cr_assert_eq(lead_resp.status, 500);
    cr_assert_float_eq(spend_today(), paid, 1e-9);
    support_http_close(&lead);
    support_http_response_free(&lead_resp);
    buf_free(&out);
}

/* The leader's backend stalls past its first_byte_timeout_ms and the
 * leader falls back to a backend of another model, whose answer is no
 * entry of the key: the waiters go themselves. They must not go first to
 * the backend that just failed the same request: each waited out the
 * leader's timeout and then sat through one of its own, slower than had
 * it never joined. They go where the leader found its answer. */
Test(costs, waiters_of_a_failed_leader_skip_the_backend_that_failed_it)
{
    enum { NWAIT = 2 };
    struct support_http_conn lead = {.fd = -1}, wait[NWAIT];
    struct support_http_response lead_resp = {0}, wait_resp[NWAIT];
    struct buf out = {0}, wait_out[NWAIT];
    double t0;
    cJSON *rec;

    memset(wait_resp, 0, sizeof(wait_resp));
    memset(wait_out, 0, sizeof(wait_out));
    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "stall", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    add_backend_with("a", mock_a.port, 1, 100, 300, NULL, ", first_byte_timeout_ms: 800");
    add_backend("b", mock_b.port, 1, 200, 600);
    start_routers(1, "a, b", NULL);
    send_unanswered(&lead, &out, AUTH, JOIN_BODY);
    usleep(300 * 1000); /* the leader waits on a */
    t0 = support_mono_ms();
    for (int i = 0; i < NWAIT; i++) {
        wait[i].fd = -1;
        send_unanswered(&wait[i], &wait_out[i], AUTH, JOIN_BODY);
    }
    cr_assert_eq(support_http_read(&lead, &lead_resp, TIMEOUT_MS), 0);
    cr_assert_eq(lead_resp.status, 200);
    cr_assert_str_eq(support_http_header(&lead_resp, "x-costrouter-backend"), "b");
    for (int i = 0; i < NWAIT; i++) {
        cr_assert_eq(support_http_read(&wait[i], &wait_resp[i], TIMEOUT_MS), 0);
        cr_assert_eq(wait_resp[i].status, 200);
        cr_assert_str_eq(support_http_header(&wait_resp[i], "x-costrouter-backend"), "b");
        /* Its own choice: b, the cheapest with a passed over, no fallback
         * of its own (it called nothing before b). */
        cr_assert_str_eq(support_http_header(&wait_resp[i], "x-costrouter-reason"),
                         "cheapest-qualifying",
                         "waiter %d: %s", i,
                         support_http_header(&wait_resp[i], "x-costrouter-reason"));
    }
    cr_assert_str_eq(support_http_header(&lead_resp, "x-costrouter-reason"), "fallback");
    /* The leader's timeout ends about 500 ms after they came; one more
     * on a would make it 1300. */
    double took = support_mono_ms() - t0;
    cr_assert_lt(took, 1100, "the waiters tried the stalled backend again: %.0f ms", took);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 1);
    /* The cost log says what happened to each: the leader failed on a;
     * the waiters never called it (they said "failed" as the leader). */
    support_proc_stop(&routers[0]);
    rec = record_of(support_http_header(&lead_resp, "x-request-id"));
    cr_assert_str_eq(verdict_of(rec, 0), "failed");
    cJSON_Delete(rec);
    for (int i = 0; i < NWAIT; i++) {
        rec = record_of(support_http_header(&wait_resp[i], "x-request-id"));
        cr_assert_str_eq(verdict_of(rec, 0), "leader-failed", "waiter %d", i);
        cr_assert_null(verdict_of(rec, 1));
        cr_assert_eq(cJSON_GetObjectItem(rec, "fallbacks")->valuedouble, 0);
        cr_assert_str_eq(cJSON_GetObjectItem(rec, "reason")->valuestring, "cheapest-qualifying");
        cJSON_Delete(rec);
    }
    support_http_close(&lead);
    support_http_response_free(&lead_resp);
    buf_free(&out);
    for (int i = 0; i < NWAIT; i++) {
        support_http_close(&wait[i]);
        support_http_response_free(&wait_resp[i]);
        buf_free(&wait_out[i]);
    }
}

/* A stream identical to one upstream does not wait for it: a follower
 * gets the leader's answer once the leader has all of it, so a stream's
 * first token would come at the leader's last. It goes itself (billed as
 * any request); the leader's answer is cached for the next. */
Test(costs, a_stream_identical_to_one_upstream_does_not_wait_for_its_end)
{
    struct support_sse lead = {0}, twin = {0}, again = {0};
    struct support_sse_event ev;
    const char body[] = "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}";
    const char slow[] = AUTH "x-mock-tokens: 30\r\nx-mock-token-delay-ms: 40\r\n";

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    open_chat_stream(&lead, slow, body); /* about 1.2 s of tokens */
    cr_assert_eq(support_sse_next(&lead, &ev, TIMEOUT_MS), 1);
    double t0 = support_mono_ms();
    open_chat_stream(&twin, slow, body);
    cr_assert_eq(support_sse_next(&twin, &ev, TIMEOUT_MS), 1);
    double first = support_mono_ms() - t0;
    cr_assert_lt(first, 700, "the twin's first event came at %.0f ms, after the leader's end",
                 first);
    cr_assert_str_eq(support_http_header(&twin.resp, "x-costrouter-backend"), "a");
    while (support_sse_next(&lead, &ev, TIMEOUT_MS) == 1)
        ;
    while (support_sse_next(&twin, &ev, TIMEOUT_MS) == 1)
        ;
    support_sse_close(&lead);
    support_sse_close(&twin);
    open_chat_stream(&again, AUTH, body);
    cr_assert_str_eq(support_http_header(&again.resp, "x-costrouter-backend"), "cache",
                     "the leader's stream was not cached");
    support_sse_close(&again);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(cJSON_GetObjectItem(body_json(), "requests")->valuedouble, 2);
}

/* The leader's client leaves: the waiter is not left waiting on an
 * answer nobody reads; it goes itself. */
Test(costs, a_request_joined_to_a_twin_whose_client_left_goes_itself)
{
    struct support_http_conn lead = {.fd = -1}, wait = {.fd = -1};
    struct support_http_response wait_resp = {0};
    struct buf out = {0}, wait_out = {0};

    join_one(&lead, &out, "x-mock-ttft-ms: 1500\r\n", 300);
    send_unanswered(&wait, &wait_out, AUTH, JOIN_BODY);
    usleep(300 * 1000); /* joined */
    support_http_close(&lead);
    cr_assert_eq(support_http_read(&wait, &wait_resp, TIMEOUT_MS), 0);
    cr_assert_eq(wait_resp.status, 200);
    cr_assert_str_eq(support_http_header(&wait_resp, "x-costrouter-backend"), "a");
    /* The leader paid its prompt as estimated (its client left before
     * the answer), the waiter its own answer. */
    double left = spend_today() - strtod(support_http_header(&wait_resp, "x-costrouter-cost-usd"),
                                         NULL);
    cr_assert(left > 0 && left < usd(2 * PROMPT_TOKENS, 0, 100, 300), "%g", left);
    support_http_close(&wait);
    support_http_response_free(&wait_resp);
    buf_free(&out);
    buf_free(&wait_out);
}

/* The response cache lives in Redis: a hit there; Redis gone, the same
 * request is answered without a wait (fail_open), and its answer is
 * served from memory while Redis stays away. */
Test(costs, the_response_cache_serves_while_redis_is_down)
{
    const char body[] = "{\"model\":\"chat\",\"temperature\":0," MSG "}";
    static const char *const want[] = {"a", "cache", "a", "cache"};

    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    for (int i = 0; i < 4; i++) {
        if (i == 2)
            test_redis_kill(&redis, SIGKILL);
        double t0 = support_mono_ms();
        cr_assert_eq(chat(0, NULL, body), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), want[i], "request %d", i);
        cr_assert_lt(support_mono_ms() - t0, 1500, "request %d waited", i);
    }
}

/* An answer framed by the upstream closing its connection (no length, not
 * chunked) that breaks off mid-JSON looks whole to HTTP: it is no answer
 * to replay for an hour. */
Test(costs, a_plain_answer_cut_short_is_not_cached)
{
    static const char answer[] =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"m-a\",\"choices\":"
        "[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hel";

    canned = support_canned_start(answer, sizeof(answer) - 1);
    cr_assert_not_null(canned);
    add_backend("a", support_canned_port(canned), 1, 100, 300);
    start_routers(1, "a", NULL);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"temperature\":0," MSG "}"), 0);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a",
                         "request %d: %.*s", i, (int)resp.raw.len, resp.raw.data);
    }
}

/* An entry lives cache.ttl_s; cache.local_bytes bounds the in-process
 * cache, the oldest entries going first. */
Test(costs, cache_entries_expire_and_the_oldest_go_first)
{
    char body[128];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    top_extra = "cache: {ttl_s: 1, max_entry_bytes: 1024, local_bytes: 1600}\n";
    start_routers(1, "a", NULL);
    /* One answer is ~350 bytes: four fit, the fifth evicts the first. */
    for (int i = 0; i < 5; i++) {
        snprintf(body, sizeof(body), "{\"model\":\"chat\",\"temperature\":0,\"seed\":%d," MSG "}", i);
        cr_assert_eq(chat(0, NULL, body), 0);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
        cr_assert(resp.body.len > 300 && resp.body.len < 380, "%zu", resp.body.len);
    }
    for (int i = 4; i >= 0; i--) {
        snprintf(body, sizeof(body), "{\"model\":\"chat\",\"temperature\":0,\"seed\":%d," MSG "}", i);
        cr_assert_eq(chat(0, NULL, body), 0);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), i ? "cache" : "a",
                         "seed %d", i);
    }
    usleep(1100 * 1000);
    cr_assert_eq(chat(0, NULL, body), 0); /* seed 0: cached again at its miss, now expired */
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a", "outlived ttl_s");
    top_extra = "";
}

/* cache.shared: true: one tenant's answer is another's hit, in memory
 * and in Redis, free for the second. */
Test(costs, a_shared_cache_serves_one_tenant_another_tenants_answer)
{
    char tenants[256], hex[65];
    const char body[] = "{\"model\":\"chat\",\"temperature\":0," MSG "}";

    for (int with_redis = 0; with_redis < 2; with_redis++) {
        if (with_redis) {
            for (int i = 0; i < NROUTERS; i++)
                support_proc_stop(&routers[i]);
            support_proc_stop(&mock_a);
            unlink(log_path); /* start_routers makes another */
            buf_reset(&yaml);
            cr_assert_eq(test_redis_start(&redis, 0), 0);
        }
        cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
        add_backend("a", mock_a.port, 1, 100, 300);
        support_key_sha256_hex("sk-other-tenant", hex);
        snprintf(tenants, sizeof(tenants), "  - id: other\n    api_keys: [\"sha256:%s\"]\n", hex);
        top_extra = "cache: {shared: true}\n";
        start_routers(1, "a", tenants);
        cr_assert_eq(chat(0, NULL, body), 0);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions",
                               "Authorization: Bearer sk-other-tenant\r\n", body),
                     0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache",
                         "redis: %d", with_redis);
        cr_assert_float_eq(header_usd("x-costrouter-cost-usd"), 0, 1e-12);
    }
    top_extra = "";
}

/* OpenAI reports a failure inside a begun chat stream as a chunk that is
 * an error object: a stream with one is not cached, even ended by
 * `[DONE]`; a chunk with "error": null is no failure. */
Test(costs, a_chat_stream_with_an_error_chunk_is_not_cached)
{
    start_canned_stream("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m-a\","
                        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n"
                        "data: {\"error\":{\"message\":\"The server had an error\","
                        "\"type\":\"server_error\"}}\n\n"
                        "data: [DONE]\n\n",
                        "");
    assert_stream_not_cached("/v1/chat/completions",
                             "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}");
}

Test(costs, a_chat_stream_whose_chunks_say_error_null_is_cached)
{
    const char body[] = "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}";

    start_canned_stream("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m-a\","
                        "\"error\":null,\"choices\":[{\"index\":0,\"delta\":{\"content\":"
                        "\"\\\"error\\\": 1\"}}]}\n\n"
                        "data: [DONE]\n\n",
                        "");
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(call_port(routers[0].port, "POST", "/v1/chat/completions", AUTH, body), 0);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), i ? "cache" : "a",
                         "request %d", i);
    }
}

/* A backend that answers a stream request with a whole JSON body (as
 * some servers do for options they cannot stream): the client gets that
 * body as JSON; a replay must not turn it into an event stream (it was
 * cached under the stream's key and replayed as text/event-stream, with an
 * SSE cost comment after the JSON). */
Test(costs, a_json_answer_to_a_stream_request_is_not_replayed_as_a_stream)
{
    static const char body[] = "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"m-a\","
                               "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                               "\"content\":\"Hello\"},\"finish_reason\":\"stop\"}],"
                               "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1}}";
    struct buf b = {0};
    size_t len;
    char *answer;

    cr_assert_eq(buf_append(&b, body, sizeof(body) - 1), 0);
    answer = answer_with_body(&b, 0, &len);
    canned = support_canned_start(answer, len);
    free(answer);
    cr_assert_not_null(canned);
    add_backend("a", support_canned_port(canned), 1, 100, 300);
    start_routers(1, "a", NULL);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(chat(0, NULL, "{\"model\":\"chat\",\"temperature\":0,\"stream\":true," MSG "}"), 0);
        cr_assert_eq(resp.status, 200);
        cr_assert_str_eq(support_http_header(&resp, "content-type"), "application/json",
                         "request %d: %.*s", i, (int)resp.raw.len, resp.raw.data);
    }
}

/* cache.enabled and cache.cache_tools reload: turned off, identical
 * requests go upstream; a request with tools is cached once cache_tools
 * is turned on. */
Test(costs, a_reload_turns_the_cache_off_and_tools_on)
{
    const char body[] = "{\"model\":\"chat\",\"temperature\":0," MSG "}";
    const char tools[] = "{\"model\":\"chat\",\"temperature\":0,\"tools\":[{\"type\":\"function\","
                         "\"function\":{\"name\":\"f\",\"parameters\":{}}}]," MSG "}";
    static const char *const confs[] = {"cache: {enabled: false}\n", "cache: {cache_tools: true}\n"};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    add_backend("a", mock_a.port, 1, 100, 300);
    start_routers(1, "a", NULL);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_eq(chat(0, NULL, body), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    for (int i = 0; i < 2; i++) {
        top_extra = confs[i];
        write_conf("a", NULL);
        cr_assert_eq(call_port(routers[0].port, "POST", "/admin/reload", ADMIN, NULL), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        for (int round = 0; round < 2; round++) {
            cr_assert_eq(chat(0, NULL, i ? tools : body), 0);
            cr_assert_eq(resp.status, 200);
            cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"),
                             i && round ? "cache" : "a", "conf %d, round %d", i, round);
        }
    }
    top_extra = "";
}
