/*
 * tests/router/test_cors.c: web pages of other origins calling the router
 * (`cors:`), through the real router in front of a real mockllm (or of a
 * raw upstream, tests/support/canned.h), and once with a real browser:
 * headless Chromium loads a page of another origin whose script calls
 * the router with a tenant key, as a web app would.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/browser.h"
#include "tests/support/canned.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TIMEOUT_MS 5000
#define KEY "sk-cors-tenant"
#define AUTH "Authorization: Bearer " KEY "\r\n"
#define APP "https://app.example.com"
#define CHAT                                                                                     \
    "{\"model\":\"chat\",\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":"     \
    "\"hello there\"}]}"
#define PREFLIGHT_HEADERS                                                                        \
    "Origin: " APP "\r\nAccess-Control-Request-Method: POST\r\n"                                 \
    "Access-Control-Request-Headers: authorization,content-type\r\n"

static struct support_proc router, mock;
static struct support_canned *canned, *page;
static struct support_http_response resp;
static char conf_path[64], log_path[64], cost_path[64], profile[64];

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    support_canned_stop(canned);
    support_canned_stop(page);
    canned = page = NULL;
    support_http_response_free(&resp);
    if (conf_path[0])
        unlink(conf_path);
    if (cost_path[0])
        unlink(cost_path);
    if (log_path[0]) {
        support_log_show(log_path, "router");
        unlink(log_path);
    }
    if (profile[0])
        support_remove_tree(profile);
}

TestSuite(cors, .fini = teardown, .timeout = 60);

static void temp_name(char *path, const char *pattern)
{
    strcpy(path, pattern);
    close(mkstemp(path));
}

/* The router in front of the upstream on `port`, with `cors` (YAML for
 * the top level, or "" for none). */
static void start_router(int port, const char *cors)
{
    char hex[65], yaml[2048];

    support_key_sha256_hex(KEY, hex);
    temp_name(conf_path, "/tmp/costrouter-cors-XXXXXX");
    temp_name(log_path, "/tmp/costrouter-cors-log-XXXXXX");
    temp_name(cost_path, "/tmp/costrouter-cors-cost-XXXXXX");
    snprintf(yaml, sizeof(yaml),
             "listen: 127.0.0.1:0\ncost_log: %s\n%s\nbackends:\n"
             "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a,\n"
             "     quality: 1, context_window: 100000, input_usd_per_mtok: 1,\n"
             "     output_usd_per_mtok: 1, tokenizer: estimate}\n"
             "routes:\n  - {model: chat, candidates: [a]}\n"
             "tenants:\n  - id: acme\n    api_keys: [\"sha256:%s\"]\n",
             cost_path, cors, port, hex);
    cr_assert_eq(support_file_write(conf_path, yaml), 0);
    cr_assert_eq(support_router_start(&router, NULL, conf_path, log_path), 0,
                 "the router did not start");
}

static void start(const char *cors)
{
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    start_router(mock.port, cors);
}

static int call(const char *method, const char *path, const char *headers, const char *body)
{
    struct buf req = {0};
    int rc;

    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    rc = support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp);
    buf_free(&req);
    return rc;
}

/* How many headers of lowercase `name` the response has. */
static int header_count(const char *name)
{
    int n = 0;

    for (size_t off = 0; off < resp.headers.len;) {
        const char *h = resp.headers.data + off, *v = h + strlen(h) + 1;

        n += strcmp(h, name) == 0;
        off = (size_t)(v + strlen(v) + 1 - resp.headers.data);
    }
    return n;
}

/* The requests mockllm has answered, from its /mock/stats. */
static double mock_requests(void)
{
    static const char get[] = "GET /mock/stats HTTP/1.1\r\nHost: x\r\n\r\n";
    struct support_http_response r = {0};
    const char *p;
    double n;

    cr_assert_eq(support_http_request(mock.port, get, sizeof(get) - 1, TIMEOUT_MS, &r), 0);
    cr_assert_eq(buf_append(&r.body, "", 1), 0);
    p = strstr(r.body.data, "\"requests\":");
    cr_assert_not_null(p, "%s", r.body.data);
    n = strtod(p + 11, NULL);
    support_http_response_free(&r);
    return n;
}

Test(cors, preflight_from_a_listed_origin_is_answered_without_a_key)
{
    start("cors:\n  allow_origins: [\"http://localhost:3000\", \"https://App.Example.com\"]\n");
    cr_assert_eq(call("OPTIONS", "/v1/chat/completions", PREFLIGHT_HEADERS, NULL), 0);
    cr_assert_eq(resp.status, 204, "%.*s", (int)resp.body.len, resp.body.data);
    cr_expect_str_eq(support_http_header(&resp, "access-control-allow-origin"), APP);
    cr_expect_str_eq(support_http_header(&resp, "access-control-allow-methods"), "POST");
    cr_expect_str_eq(support_http_header(&resp, "access-control-allow-headers"),
                     "authorization,content-type");
    cr_expect_str_eq(support_http_header(&resp, "access-control-max-age"), "600");
    cr_expect_null(support_http_header(&resp, "content-length"), "a 204 has no length");
    cr_expect_eq(resp.body.len, 0);

    /* The admin and model paths take GET. */
    cr_assert_eq(call("OPTIONS", "/v1/models",
                      "Origin: " APP "\r\nAccess-Control-Request-Method: GET\r\n", NULL), 0);
    cr_assert_eq(resp.status, 204);
    cr_expect_str_eq(support_http_header(&resp, "access-control-allow-methods"), "GET, HEAD");
    cr_expect_null(support_http_header(&resp, "access-control-allow-headers"));
    cr_expect_eq(mock_requests(), 0, "a preflight never goes upstream");
}

Test(cors, preflight_from_another_origin_is_refused)
{
    start("cors: {allow_origins: [\"" APP "\"], max_age_s: 30}\n");
    cr_assert_eq(call("OPTIONS", "/v1/chat/completions",
                      "Origin: https://evil.example.com\r\n"
                      "Access-Control-Request-Method: POST\r\n", NULL), 0);
    cr_assert_eq(resp.status, 403);
    cr_expect_null(support_http_header(&resp, "access-control-allow-origin"));
    cr_expect_str_eq(support_http_header(&resp, "vary"), "Origin");
    cr_expect(memmem(resp.body.data, resp.body.len, "origin_not_allowed", 18) != NULL, "%.*s",
              (int)resp.body.len, resp.body.data);

    /* Headers that are no list of names are not echoed. */
    cr_assert_eq(call("OPTIONS", "/v1/chat/completions",
                      "Origin: " APP "\r\nAccess-Control-Request-Method: POST\r\n"
                      "Access-Control-Request-Headers: authorization;x=<b>\r\n", NULL), 0);
    cr_assert_eq(resp.status, 204);
    cr_expect_null(support_http_header(&resp, "access-control-allow-headers"));
    cr_expect_str_eq(support_http_header(&resp, "access-control-max-age"), "30");

    /* An OPTIONS that is no preflight, and a preflight of no path. */
    cr_assert_eq(call("OPTIONS", "/v1/chat/completions", "Origin: " APP "\r\n", NULL), 0);
    cr_expect_eq(resp.status, 405);
    cr_assert_eq(call("OPTIONS", "/v1/nothing", PREFLIGHT_HEADERS, NULL), 0);
    cr_expect_eq(resp.status, 404);
}

Test(cors, without_cors_a_preflight_gets_405_and_answers_no_origin)
{
    start("");
    cr_assert_eq(call("OPTIONS", "/v1/chat/completions", PREFLIGHT_HEADERS, NULL), 0);
    cr_expect_eq(resp.status, 405);
    cr_expect_str_eq(support_http_header(&resp, "allow"), "POST");
    cr_assert_eq(call("POST", "/v1/chat/completions", "Origin: " APP "\r\n" AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_expect_null(support_http_header(&resp, "access-control-allow-origin"));
    cr_expect_null(support_http_header(&resp, "vary"));
}

/* Every answer to a listed origin names it: proxied, streamed, cached,
 * and the router's own errors, which the page must read too. */
Test(cors, every_answer_to_a_listed_origin_names_it)
{
    static const char *const cases[] = {"plain", "cached", "stream", "no key", "other origin"};
    static const char stream[] = "{\"model\":\"chat\",\"stream\":true,\"messages\":"
                                 "[{\"role\":\"user\",\"content\":\"hello there\"}]}";

    start("cors:\n  allow_origins: [\"" APP "\"]\n");
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *headers = i == 3 ? "Origin: " APP "\r\n"
                              : i == 4 ? "Origin: https://evil.example.com\r\n" AUTH
                                       : "Origin: " APP "\r\n" AUTH;

        cr_assert_eq(call("POST", "/v1/chat/completions", headers, i == 2 ? stream : CHAT), 0,
                     "%s", cases[i]);
        cr_assert_eq(resp.status, i == 3 ? 401 : 200, "%s", cases[i]);
        cr_expect_str_eq(support_http_header(&resp, "vary"), "Origin", "%s", cases[i]);
        if (i == 4) {
            cr_expect_null(support_http_header(&resp, "access-control-allow-origin"));
            continue;
        }
        cr_expect_str_eq(support_http_header(&resp, "access-control-allow-origin"), APP, "%s",
                         cases[i]);
        cr_expect_str_eq(support_http_header(&resp, "access-control-expose-headers"), "*");
        if (i == 1)
            cr_expect_str_eq(support_http_header(&resp, "x-costrouter-reason"), "cache-hit");
    }
}

Test(cors, any_origin_is_star)
{
    start("cors: {allow_origins: [\"*\"]}\n");
    cr_assert_eq(call("POST", "/v1/chat/completions", "Origin: https://anyone.example\r\n" AUTH,
                      CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_expect_str_eq(support_http_header(&resp, "access-control-allow-origin"), "*");
    cr_expect_null(support_http_header(&resp, "vary"), "the answer does not depend on it");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_expect_null(support_http_header(&resp, "access-control-allow-origin"),
                   "no Origin, no browser");
}

/* The Origin is not sent on (to the backend the router is the client),
 * and a backend's own CORS headers do not reach the client beside the
 * router's: two Access-Control-Allow-Origin make browsers refuse. */
Test(cors, origin_not_forwarded_and_backend_cors_headers_dropped)
{
    static const char body[] =
        "{\"id\":\"x\",\"object\":\"chat.completion\",\"model\":\"m-a\",\"choices\":[],"
        "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}";
    char answer[512];

    snprintf(answer, sizeof(answer),
             "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             "Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Credentials: true\r\n"
             "Content-Length: %zu\r\n\r\n%s",
             sizeof(body) - 1, body);
    cr_assert_not_null(canned = support_canned_start(answer, strlen(answer)));
    start_router(support_canned_port(canned), "cors: {allow_origins: [\"" APP "\"]}\n");
    cr_assert_eq(call("POST", "/v1/chat/completions", "Origin: " APP "\r\n" AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_expect_eq(header_count("access-control-allow-origin"), 1);
    cr_expect_str_eq(support_http_header(&resp, "access-control-allow-origin"), APP);
    cr_expect_null(support_http_header(&resp, "access-control-allow-credentials"));
    cr_expect_null(strcasestr(support_canned_heads(canned), "\norigin:"), "%s",
                   support_canned_heads(canned));
}

/* A page of origin `origin_port` that calls the router with the tenant's
 * key and shows what it could read. */
static void serve_page(void)
{
    char html[2048], answer[2560];
    int n;

    n = snprintf(html, sizeof(html),
                 "<!doctype html><html><body><pre id=\"out\">pending</pre><script>"
                 "fetch('http://127.0.0.1:%d/v1/chat/completions', {method: 'POST',"
                 " headers: {'Authorization': 'Bearer " KEY "',"
                 " 'Content-Type': 'application/json'}, body: JSON.stringify({model: 'chat',"
                 " messages: [{role: 'user', content: 'hello there'}]})})"
                 ".then(r => r.json().then(j => { document.getElementById('out').textContent ="
                 " 'status=' + r.status + ' cost=' + r.headers.get('x-costrouter-cost-usd') +"
                 " ' content=' + j.choices[0].message.content; }))"
                 ".catch(e => { document.getElementById('out').textContent = 'blocked: ' + e; });"
                 "</script></body></html>",
                 router.port);
    snprintf(answer, sizeof(answer),
             "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
             "Connection: close\r\n\r\n%s",
             n, html);
    support_canned_set(page, answer, strlen(answer));
}

static char *browse(void)
{
    char url[64];

    strcpy(profile, "/tmp/costrouter-cors-browser-XXXXXX");
    cr_assert_not_null(mkdtemp(profile));
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/", support_canned_port(page));
    return support_dump_dom(url, profile);
}

Test(cors, a_browser_page_of_a_listed_origin_reads_the_answer_and_its_cost)
{
    char cors[128], *dom;

    cr_assert_not_null(page = support_canned_start("", 0));
    snprintf(cors, sizeof(cors), "cors: {allow_origins: [\"http://127.0.0.1:%d\"]}\n",
             support_canned_port(page));
    start(cors);
    serve_page();
    dom = browse();
    cr_expect(strstr(dom, "status=200 cost=0.0000") != NULL, "%s", dom);
    cr_expect(strstr(dom, "content=The quick") != NULL, "%s", dom);
    cr_expect_eq(mock_requests(), 1);
    free(dom);
}

Test(cors, a_browser_page_of_another_origin_is_stopped_before_its_request)
{
    char *dom;

    cr_assert_not_null(page = support_canned_start("", 0));
    start("cors: {allow_origins: [\"" APP "\"]}\n");
    serve_page();
    dom = browse();
    cr_expect(strstr(dom, "blocked: TypeError") != NULL, "%s", dom);
    cr_expect_eq(mock_requests(), 0, "the preflight was refused: no request was sent");
    free(dom);
}
