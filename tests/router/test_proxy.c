/*
 * tests/router/test_proxy.c: the router as a real process in front of real
 * mockllm processes, driven over loopback sockets.
 *
 * Each test writes its own config (ports of the mocks it started), starts
 * ./costrouter on port 0 and talks raw HTTP to it, so every header and
 * every malformed byte is under the test's control.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/support/canned.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TIMEOUT_MS 5000
#define TENANT_KEY "sk-test-tenant"
#define AUTH "Authorization: Bearer " TENANT_KEY "\r\n"
#define ADMIN_KEY "adm-test"
#define ADMIN "Authorization: Bearer " ADMIN_KEY "\r\n"
#define PAD64 "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define PAD256 PAD64 PAD64 PAD64 PAD64
#define CHAT "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]}"

static struct support_proc router, mock_a, mock_b;
static struct support_canned *canned; /* a raw upstream, for answers mockllm will not give */
static struct support_http_response resp;
static struct buf req;
static cJSON *json;
static char conf_path[64];
static char ca_dir[256];

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock_a);
    support_proc_stop(&mock_b);
    support_canned_stop(canned);
    canned = NULL;
    support_http_response_free(&resp);
    buf_free(&req);
    cJSON_Delete(json);
    json = NULL;
    if (conf_path[0])
        unlink(conf_path);
    if (ca_dir[0])
        support_remove_tree(ca_dir);
}

TestSuite(proxy, .fini = teardown, .timeout = 60);

/* Write the config `fmt` (printf) and start the router on it. */
static void start_router_with(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void start_router_with(const char *fmt, ...)
{
    va_list ap;
    FILE *f;
    int fd;

    strcpy(conf_path, "/tmp/costrouter-test-XXXXXX");
    fd = mkstemp(conf_path);
    cr_assert_geq(fd, 0);
    f = fdopen(fd, "w");
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fclose(f);
    char *argv[] = {getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter", "-q",
                    "-c", conf_path, NULL};
    cr_assert_eq(support_proc_start(&router, argv), 0, "router did not start");
}

/* Write a config: `limits` and `backends` are YAML fragments (backends
 * is the list body), routes name candidates. Start the router on it. */
static void start_router(const char *limits, const char *backends, const char *candidates)
{
    char hex[65];

    support_key_sha256_hex(TENANT_KEY, hex);
    start_router_with("listen: 127.0.0.1:0\n"
                      "%s\n"
                      "backends:\n%s\n"
                      "routes:\n"
                      "  - model: chat\n"
                      "    candidates: [%s]\n"
                      "tenants:\n"
                      "  - id: t1\n"
                      "    api_keys: [\"sha256:%s\"]\n",
                      limits ? limits : "", backends, candidates, hex);
}

/* A backend entry for a mock on `port`, at `x` times the usual prices. */
static const char *backend_yaml_priced(char *out, size_t n, const char *name, int port, int x,
                                       const char *extra)
{
    snprintf(out, n,
             "  - name: %s\n"
             "    kind: api\n"
             "    url: http://127.0.0.1:%d/v1\n"
             "    model: upstream-%s\n"
             "    api_key: sk-upstream-%s\n"
             "    quality: 2\n"
             "    context_window: 8192\n"
             "    input_usd_per_mtok: %d\n"
             "    output_usd_per_mtok: %d\n"
             "%s",
             name, port, name, name, x, 2 * x, extra ? extra : "");
    return out;
}

/* A backend entry for a mock on `port`. */
static const char *backend_yaml(char *out, size_t n, const char *name, int port, const char *extra)
{
    return backend_yaml_priced(out, n, name, port, 1, extra);
}

/* The router in front of the running mocks A and B, in that order. */
static void start_router_ab(const char *limits, const char *extra_a)
{
    char a[1024], b[1024], both[2100];

    backend_yaml(a, sizeof(a), "a", mock_a.port, extra_a);
    backend_yaml(b, sizeof(b), "b", mock_b.port, NULL);
    snprintf(both, sizeof(both), "%s%s", a, b);
    start_router(limits, both, "a, b");
}

/* Start mocks A and B and the router in front of them. */
static void start_two(const char *limits, const char *extra_a)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--token-delay-ms", "2", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, "--token-delay-ms", "2", NULL), 0);
    start_router_ab(limits, extra_a);
}

static int call_port(int port, const char *method, const char *path, const char *headers,
                     const char *body)
{
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    return support_http_request(port, req.data, req.len, TIMEOUT_MS, &resp);
}

static int call(const char *method, const char *path, const char *headers, const char *body)
{
    return call_port(router.port, method, path, headers, body);
}

static double metric_value(const char *name);
static const char *last_target(int port);

static cJSON *body_json(void)
{
    cJSON_Delete(json);
    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    cr_assert_not_null(json, "body is not JSON: %.*s", (int)resp.body.len, resp.body.data);
    return json;
}

static const char *json_str(const cJSON *obj, const char *path)
{
    char copy[128], *save = NULL, *part;
    const cJSON *cur = obj;

    snprintf(copy, sizeof(copy), "%s", path);
    for (part = strtok_r(copy, ".", &save); part && cur; part = strtok_r(NULL, ".", &save))
        cur = cJSON_GetObjectItemCaseSensitive(cur, part);
    return cJSON_IsString(cur) ? cur->valuestring : NULL;
}

static double json_num(const cJSON *obj, const char *path)
{
    char copy[128], *save = NULL, *part;
    const cJSON *cur = obj;

    snprintf(copy, sizeof(copy), "%s", path);
    for (part = strtok_r(copy, ".", &save); part && cur; part = strtok_r(NULL, ".", &save))
        cur = cJSON_GetObjectItemCaseSensitive(cur, part);
    cr_assert(cJSON_IsNumber(cur), "%s is not a number", path);
    return cur->valuedouble;
}

/* The error object of an OpenAI-style error body; checks its shape. */
static void assert_error(int status, const char *code)
{
    cJSON *j = body_json();

    cr_assert_eq(resp.status, status, "status %d want %d: %.*s", resp.status, status,
                 (int)resp.body.len, resp.body.data);
    cr_assert_not_null(json_str(j, "error.message"));
    cr_assert_not_null(json_str(j, "error.type"));
    cr_assert_str_eq(json_str(j, "error.code"), code);
    cr_assert_str_eq(support_http_header(&resp, "content-type"), "application/json");
    cr_assert_not_null(support_http_header(&resp, "x-request-id"));
    cr_assert_eq(strncmp(support_http_header(&resp, "x-request-id"), "cr-", 3), 0,
                 "x-request-id \"%s\"", support_http_header(&resp, "x-request-id"));
}

/* POST `body` (with the tenant key and `headers`) as a stream and read
 * its head into `s`. */
static void open_stream(struct support_sse *s, const char *headers, const char *body)
{
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(support_sse_open(s, router.port, req.data, req.len, TIMEOUT_MS), 0);
}

/* ---- proxying ---- */

Test(proxy, chat_is_rewritten_for_the_backend_and_usage_passes_through)
{
    start_two(NULL, NULL);
    cr_assert_eq(call("POST", "/v1/chat/completions",
                      AUTH "x-user-id: u1\r\nOpenAI-Organization: org-other\r\n"
                           "OpenAI-Project: proj-other\r\n",
                      CHAT),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_not_null(support_http_header(&resp, "x-costrouter-reason"));
    const char *id = support_http_header(&resp, "x-request-id");
    cr_assert_not_null(id);
    /* "cr-START-SEQ", both lower-case hex */
    cr_assert_eq(strncmp(id, "cr-", 3), 0, "%s", id);
    size_t start = strspn(id + 3, "0123456789abcdef");
    cr_assert(start > 0 && id[3 + start] == '-', "%s", id);
    cr_assert(strspn(id + 4 + start, "0123456789abcdef") == strlen(id + 4 + start) &&
                  id[4 + start] != '\0', "%s", id);
    cr_assert_gt(json_num(body_json(), "usage.prompt_tokens"), 0);

    /* What the upstream received: its own model name and key, never ours. */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/last-request", NULL, NULL), 0);
    cJSON *j = body_json();
    cr_assert_str_eq(json_str(j, "headers.authorization"), "Bearer sk-upstream-a");
    cr_assert_str_eq(json_str(j, "headers.x-user-id"), "u1");
    /* The account the backend's key bills is not the tenant's to pick. */
    cr_assert_null(json_str(j, "headers.openai-organization"));
    cr_assert_null(json_str(j, "headers.openai-project"));
    cr_assert_null(memmem(resp.body.data, resp.body.len, TENANT_KEY, strlen(TENANT_KEY)));
    cJSON *sent = cJSON_Parse(json_str(j, "body"));
    cr_assert_str_eq(json_str(sent, "model"), "upstream-a");
    cJSON_Delete(sent);
}

/* A client's query string (Azure OpenAI's api-version) goes on to the
 * backend after the backend's path, as sent; the endpoint, /v1/models and
 * the admin API are found by the path alone. */
/* One mock (A) and the router in front of it alone. */
static void start_one(void)
{
    char a[1024];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(NULL, backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), "a");
}

Test(proxy, the_query_string_goes_on_to_the_backend)
{
    start_one();
    cr_assert_eq(call("POST", "/v1/chat/completions?api-version=2024-10-21&x=a%2Fb", AUTH, CHAT),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/last-request", NULL, NULL), 0);
    cr_assert_str_eq(json_str(body_json(), "path"),
                     "/v1/chat/completions?api-version=2024-10-21&x=a%2Fb");
    /* Without one, none: not even a '?'. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/last-request", NULL, NULL), 0);
    cr_assert_str_eq(json_str(body_json(), "path"), "/v1/chat/completions");
    cr_assert_eq(call("GET", "/v1/models?api-version=2024-10-21", AUTH, NULL), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(json_str(cJSON_GetArrayItem(cJSON_GetObjectItem(body_json(), "data"), 0),
                              "id"),
                     "chat");
    cr_assert_eq(call("GET", "/healthz?probe=1", NULL, NULL), 0);
    cr_assert_eq(resp.status, 200);
}

/* Two requests that differ only in their query may be answered
 * differently by the backend (another api-version, another beta): the
 * second is no cache hit on the first's answer; the same query again is. */
Test(proxy, the_response_cache_keys_the_query_string)
{
    static const char body[] =
        "{\"model\":\"chat\",\"temperature\":0,\"messages\":[{\"role\":\"user\","
        "\"content\":\"hello there\"}]}";
    static const char *const paths[] = {
        "/v1/chat/completions",
        "/v1/chat/completions?api-version=2024-10-21",
        "/v1/chat/completions?api-version=2025-01-01",
    };

    start_one();
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < 3; i++) {
            cr_assert_eq(call("POST", paths[i], AUTH, body), 0);
            cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
            cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"),
                             round ? "cache" : "a", "%s, round %d", paths[i], round);
        }
}

/* A request target never holds a fragment (RFC 9112 3.2: no client sends
 * one): a '#' is refused with 400 before anything goes upstream, whether
 * it follows the path or the query, on a proxied path or another; a
 * /v1/messages client gets it in Anthropic's shape. */
Test(proxy, a_request_target_with_a_fragment_is_refused)
{
    static const char *const targets[] = {
        "/v1/chat/completions#frag",
        "/v1/chat/completions?api-version=2024-10-21#frag",
        "/v1/chat/completions?#",
        "/healthz#x",
    };

    start_one();
    for (size_t i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
        cr_assert_eq(call("POST", targets[i], AUTH, CHAT), 0);
        assert_error(400, "bad_request");
        cr_assert_str_eq(json_str(json, "error.type"), "invalid_request_error", "%s", targets[i]);
    }
    cr_assert_eq(call("POST", "/v1/messages?beta=true#frag", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_str_eq(json_str(body_json(), "type"), "error");
    cr_assert_str_eq(json_str(json, "error.type"), "invalid_request_error");
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 0, "%.*s", (int)resp.body.len,
                 resp.body.data);
}

/* A bare '?' is an empty query (RFC 3986 6.2.3 calls the two forms
 * equivalent only by scheme; for what the backend and the cache see they
 * are one): the backend gets the path alone, and the request is the same
 * cache entry as one without it. */
Test(proxy, a_bare_question_mark_is_no_query)
{
    static const char body[] =
        "{\"model\":\"chat\",\"temperature\":0,\"messages\":[{\"role\":\"user\","
        "\"content\":\"hello there\"}]}";

    start_one();
    cr_assert_eq(call("POST", "/v1/chat/completions?", AUTH, body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_str_eq(last_target(mock_a.port), "/v1/chat/completions");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
}

/* One request of a round of queries: its target, the backend that
 * answers it ("cache": a hit), and the target the backend got (NULL: not
 * checked). */
struct query_round {
    const char *target;
    const char *backend;
    const char *upstream;
};

/* The same deterministic chat request at each round's target, in turn. */
static void query_rounds(const struct query_round *rounds, size_t n)
{
    static const char body[] =
        "{\"model\":\"chat\",\"temperature\":0,\"messages\":[{\"role\":\"user\","
        "\"content\":\"hello there\"}]}";

    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(call("POST", rounds[i].target, AUTH, body), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), rounds[i].backend,
                         "round %zu: %s", i, rounds[i].target);
        if (rounds[i].upstream != NULL)
            cr_assert_str_eq(last_target(mock_a.port), rounds[i].upstream, "round %zu", i);
    }
}

/* An empty parameter ("&&", a '&' at an end) is none, as every form
 * decoder (WHATWG URLSearchParams, Python's parse_qs, Go's ParseQuery)
 * reads it: dropped on the way upstream and from the cache key alike, so
 * a query of separators alone is no query, as a bare '?' is. */
Test(proxy, empty_query_parameters_are_dropped)
{
    static const struct query_round rounds[] = {
        {"/v1/chat/completions?&&", "a", "/v1/chat/completions"},
        {"/v1/chat/completions", "cache", NULL},
        {"/v1/chat/completions?&", "cache", NULL},
        {"/v1/chat/completions?&a=1&&b=2&", "a", "/v1/chat/completions?a=1&b=2"},
        {"/v1/chat/completions?a=1&b=2", "cache", NULL},
        {"/v1/chat/completions?a=1&&&b=2", "cache", NULL},
    };

    start_one();
    query_rounds(rounds, sizeof(rounds) / sizeof(rounds[0]));
}

/* Queries that differ only in escapes RFC 3986 6.2.2 calls equivalent
 * (an unreserved character escaped or not, an escape's hex in either
 * case) are one cache entry; the backend still gets each as written.
 * Other differences still key apart. */
Test(proxy, equivalent_percent_escapes_in_the_query_are_one_cache_entry)
{
    static const struct query_round rounds[] = {
        {"/v1/chat/completions?v=A-1.x_~&p=a%2fb", "a", NULL},
        {"/v1/chat/completions?v=%41%2D%31%2e%78%5f%7E&p=a%2Fb", "cache", NULL},
        {"/v1/chat/completions?%76=%41-1.x_~&p=a%2f%62", "cache", NULL},
        {"/v1/chat/completions?v=A-1.x_~&p=a/b", "a", NULL},   /* %2F is no '/' */
        {"/v1/chat/completions?v=a-1.x_~&p=a%2fb", "a", NULL}, /* nor 'a' an 'A' */
    };

    start_one();
    query_rounds(rounds, sizeof(rounds) / sizeof(rounds[0]));
    /* upstream, as the client wrote it */
    cr_assert_eq(call("POST", "/v1/chat/completions?%76=%41&x=1", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(last_target(mock_a.port), "/v1/chat/completions?%76=%41&x=1");
}

/* ---- a backend url's own query (Azure OpenAI) ---- */

/* An api backend entry named `name` at `url` (printf'd with `port`),
 * upstream model `model`, its key sent as `api-key:` as Azure wants it,
 * at `x` times the usual prices. */
static const char *azure_yaml_priced(char *out, size_t n, const char *name, const char *url,
                                     int port, const char *model, int x)
{
    char full[256];

    snprintf(full, sizeof(full), url, port);
    snprintf(out, n,
             "  - name: %s\n"
             "    kind: api\n"
             "    url: \"%s\"\n"
             "    model: %s\n"
             "    api_key: sk-azure-%s\n"
             "    auth_header: api-key\n"
             "    quality: 2\n"
             "    context_window: 8192\n"
             "    input_usd_per_mtok: %d\n"
             "    output_usd_per_mtok: %d\n",
             name, full, model, name, x, 2 * x);
    return out;
}

static const char *azure_yaml(char *out, size_t n, const char *name, const char *url, int port,
                              const char *model)
{
    return azure_yaml_priced(out, n, name, url, port, model, 1);
}

/* The request target the mock on `port` got last. */
static const char *last_target(int port)
{
    cr_assert_eq(call_port(port, "GET", "/mock/last-request", NULL, NULL), 0);
    return json_str(body_json(), "path");
}

/* The router in front of mock A alone, as routes "classic" (an Azure
 * deployment url with its api-version), "v1" (Azure's v1 API: no
 * api-version, the deployment in the body's model) and "bare" (the
 * deployment url without a query, as a config had to say before a url
 * could hold one). */
static void start_azure(void)
{
    char classic[512], v1[512], bare[512], hex[65];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    azure_yaml(classic, sizeof(classic), "classic",
               "http://127.0.0.1:%d/openai/deployments/gpt-4o?api-version=2024-10-21",
               mock_a.port, "gpt-4o");
    azure_yaml(v1, sizeof(v1), "v1", "http://127.0.0.1:%d/openai/v1", mock_a.port,
               "my-gpt-4o-deployment");
    azure_yaml(bare, sizeof(bare), "bare", "http://127.0.0.1:%d/openai/deployments/gpt-4o",
               mock_a.port, "gpt-4o");
    support_key_sha256_hex(TENANT_KEY, hex);
    start_router_with("listen: 127.0.0.1:0\n"
                      "backends:\n%s%s%s"
                      "routes:\n"
                      "  - {model: classic, candidates: [classic]}\n"
                      "  - {model: v1, candidates: [v1]}\n"
                      "  - {model: bare, candidates: [bare]}\n"
                      "tenants:\n"
                      "  - {id: t1, api_keys: [\"sha256:%s\"]}\n",
                      classic, v1, bare, hex);
}

#define AZ_CHAT(route)                                                                         \
    "{\"model\":\"" route "\",\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]}"

/* Azure OpenAI's classic API: the deployment is the url's path, the
 * endpoint's own path follows it (/v1/chat/completions gives
 * .../deployments/NAME/chat/completions: no /v1 is kept), the url's
 * api-version goes with every request, before the client's query, whose
 * own api-version gives way; the key goes as api-key, not Authorization. */
Test(proxy, an_azure_deployment_url_sends_its_api_version_with_every_request)
{
    static const char *const stream =
        "{\"model\":\"classic\",\"stream\":true,\"messages\":[{\"role\":\"user\","
        "\"content\":\"hi\"}]}";

    start_azure();
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, AZ_CHAT("classic")), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(last_target(mock_a.port),
                     "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    cr_assert_str_eq(json_str(json, "headers.api-key"), "sk-azure-classic");
    cr_assert_null(json_str(json, "headers.authorization"), "the tenant's key went on");

    cr_assert_eq(call("POST", "/v1/chat/completions?api-version=2025-01-01&x=a%2Fb", AUTH,
                      AZ_CHAT("classic")), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(last_target(mock_a.port),
                     "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=a%2Fb");

    cr_assert_eq(call("POST", "/v1/embeddings", AUTH, "{\"model\":\"classic\",\"input\":\"hi\"}"),
                 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(last_target(mock_a.port),
                     "/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21");

    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, stream), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "data: [DONE]", 12));
    cr_assert_str_eq(last_target(mock_a.port),
                     "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
}

/* Azure's v1 API: url .../openai/v1, no api-version; the deployment is
 * the body's model, so the backend's model is the deployment's name. A
 * deployment url without a query (all a config could say before) leaves
 * the api-version to the client: without one, Azure answers 404. */
Test(proxy, azure_v1_takes_the_deployment_as_model_and_a_bare_deployment_url_wants_the_clients_query)
{
    start_azure();
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, AZ_CHAT("v1")), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(last_target(mock_a.port), "/openai/v1/chat/completions");
    cr_assert_str_eq(json_str(json, "headers.api-key"), "sk-azure-v1");
    cJSON *sent = cJSON_Parse(json_str(json, "body"));
    cr_assert_str_eq(json_str(sent, "model"), "my-gpt-4o-deployment");
    cJSON_Delete(sent);

    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, AZ_CHAT("bare")), 0);
    cr_assert_eq(resp.status, 404, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(last_target(mock_a.port), "/openai/deployments/gpt-4o/chat/completions");
    cr_assert_eq(call("POST", "/v1/chat/completions?api-version=2024-10-21", AUTH,
                      AZ_CHAT("bare")), 0);
    cr_assert_eq(resp.status, 200);
}

/* One route, an Azure backend first and an OpenAI-style one after it: the
 * Azure one gets its api-version and the client's query, the other only
 * the client's, so neither needs the client to know which serves. */
Test(proxy, a_route_of_an_azure_and_an_openai_backend_sends_each_its_own_query)
{
    char az[512], oa[1024], both[1600];

    cr_assert_eq(support_mockllm_start(&mock_a, "--error-rate", "1", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    azure_yaml(az, sizeof(az), "a",
               "http://127.0.0.1:%d/openai/deployments/gpt-4o?api-version=2024-10-21",
               mock_a.port, "gpt-4o");
    backend_yaml_priced(oa, sizeof(oa), "b", mock_b.port, 3, NULL);
    snprintf(both, sizeof(both), "%s%s", az, oa);
    start_router(NULL, both, "a, b");
    cr_assert_eq(call("POST", "/v1/chat/completions?beta=true", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_str_eq(last_target(mock_a.port),
                     "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&beta=true");
    cr_assert_str_eq(last_target(mock_b.port), "/v1/chat/completions?beta=true");
    cr_assert_str_eq(json_str(json, "headers.authorization"), "Bearer sk-upstream-b");
    cr_assert_null(json_str(json, "headers.api-key"));
}

/* Two backends of one upstream model whose urls ask for other api-versions
 * may answer otherwise (another version adds or drops fields): an answer
 * the second gave after the first failed is not cached as the first's;
 * with the same query it is (the same upstream either way). */
static void cache_across_queries(const char *query_b, const char *want_second)
{
    static const char body[] =
        "{\"model\":\"chat\",\"temperature\":0,\"messages\":[{\"role\":\"user\","
        "\"content\":\"hello there\"}]}";
    char a[512], b[512], url_b[128], both[1100];

    cr_assert_eq(support_mockllm_start(&mock_a, "--error-rate", "1", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    azure_yaml(a, sizeof(a), "a",
               "http://127.0.0.1:%d/openai/deployments/gpt-4o?api-version=2024-10-21",
               mock_a.port, "gpt-4o");
    snprintf(url_b, sizeof(url_b), "http://127.0.0.1:%%d/openai/deployments/gpt-4o?%s", query_b);
    azure_yaml_priced(b, sizeof(b), "b", url_b, mock_b.port, "gpt-4o", 3);
    snprintf(both, sizeof(both), "%s%s", a, b);
    start_router("cache: {enabled: true}\n", both, "a, b");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), want_second);
}

Test(proxy, an_answer_at_another_api_version_is_not_cached_for_the_first)
{
    cache_across_queries("api-version=2025-01-01", "b");
}

Test(proxy, an_answer_at_the_same_api_version_is_cached_for_the_first)
{
    cache_across_queries("api-version=2024-10-21", "cache");
}

/* The same, when no fallback is involved: an A/B experiment sends one
 * user to a (api-version 2024-10-21) and another to b (2025-01-01), both
 * of one upstream model. The answer b gave the one is no cache hit for
 * the other, whose request goes to a. */
Test(proxy, the_cache_key_names_the_backend_urls_query)
{
    static const char body[] =
        "{\"model\":\"chat\",\"temperature\":0,\"messages\":[{\"role\":\"user\","
        "\"content\":\"hello there\"}]}";
    char a[512], b[512], both[1100], header[64], user_a[16] = "", user_b[16] = "";

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    azure_yaml(a, sizeof(a), "a",
               "http://127.0.0.1:%d/openai/deployments/gpt-4o?api-version=2024-10-21",
               mock_a.port, "gpt-4o");
    azure_yaml(b, sizeof(b), "b",
               "http://127.0.0.1:%d/openai/deployments/gpt-4o?api-version=2025-01-01",
               mock_b.port, "gpt-4o");
    snprintf(both, sizeof(both), "%s%s", a, b);
    start_router("experiments:\n"
                 "  - name: versions\n"
                 "    route: chat\n"
                 "    user_header: x-user-id\n"
                 "    arms:\n"
                 "      - {name: old, weight: 50, backends: [a]}\n"
                 "      - {name: new, weight: 50, backends: [b]}\n",
                 both, "a, b");
    /* A user of each arm, found with requests the cache does not keep. */
    for (int i = 0; i < 64 && (user_a[0] == '\0' || user_b[0] == '\0'); i++) {
        snprintf(header, sizeof(header), AUTH "x-user-id: u%d\r\n", i);
        cr_assert_eq(call("POST", "/v1/chat/completions", header, CHAT), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        const char *served = support_http_header(&resp, "x-costrouter-backend");
        snprintf(strcmp(served, "a") == 0 ? user_a : user_b, 16, "u%d", i);
    }
    cr_assert(user_a[0] && user_b[0], "no user of each arm in 64");
    snprintf(header, sizeof(header), AUTH "x-user-id: %s\r\n", user_b);
    cr_assert_eq(call("POST", "/v1/chat/completions", header, body), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_eq(call("POST", "/v1/chat/completions", header, body), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    snprintf(header, sizeof(header), AUTH "x-user-id: %s\r\n", user_a);
    cr_assert_eq(call("POST", "/v1/chat/completions", header, body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
}

Test(proxy, completions_embeddings_models_and_healthz)
{
    start_two(NULL, NULL);
    cr_assert_eq(call("POST", "/v1/completions", AUTH, "{\"model\":\"chat\",\"prompt\":\"hi\"}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(call("POST", "/v1/embeddings", AUTH, "{\"model\":\"chat\",\"input\":\"hi\"}"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_gt(json_num(body_json(), "usage.prompt_tokens"), 0);
    cr_assert_eq(call("GET", "/v1/models", AUTH, NULL), 0);
    cr_assert_eq(resp.status, 200);
    cJSON *data = cJSON_GetObjectItem(body_json(), "data");
    cr_assert_eq(cJSON_GetArraySize(data), 1);
    cr_assert_str_eq(json_str(cJSON_GetArrayItem(data, 0), "id"), "chat");
    cr_assert_eq(call("GET", "/healthz", NULL, NULL), 0);
    cr_assert_eq(resp.status, 200);
}

Test(proxy, stream_events_arrive_one_by_one_and_injected_usage_is_hidden)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int n = 0, rc, saw_done = 0, saw_usage = 0;
    double first = 0, last = 0;

    start_two(NULL, NULL);
    open_stream(&s, AUTH "x-mock-tokens: 8\r\nx-mock-token-delay-ms: 30\r\n",
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    cr_assert_eq(s.resp.status, 200);
    cr_assert_str_eq(support_http_header(&s.resp, "transfer-encoding"), "chunked");
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1) {
        if (n++ == 0)
            first = ev.t_ms;
        last = ev.t_ms;
        if (strcmp(ev.data, "[DONE]") == 0)
            saw_done = 1;
        else if (strstr(ev.data, "\"usage\":{"))
            saw_usage = 1;
    }
    support_sse_close(&s);
    cr_assert_eq(rc, 0, "stream did not end cleanly: %d", rc);
    cr_assert(saw_done);
    cr_assert_not(saw_usage, "the router's own include_usage chunk reached the client");
    cr_assert_eq(n, 9, "8 tokens and [DONE], got %d events", n);
    /* Passed through as produced, not buffered: 7 gaps of 30 ms. */
    cr_assert_gt(last - first, 150.0, "events arrived together (%.1f ms)", last - first);
}

/* Everything the router sends on `c` until it closes the connection. */
static void read_to_close(struct support_http_conn *c, struct buf *out)
{
    struct timeval tv = {.tv_sec = TIMEOUT_MS / 1000};
    char chunk[4096];
    ssize_t n;

    cr_assert_eq(setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
    while ((n = recv(c->fd, chunk, sizeof(chunk), 0)) > 0)
        cr_assert_eq(buf_append(out, chunk, (size_t)n), 0);
    cr_assert_eq(n, 0, "the router did not close the connection: %s", strerror(errno));
}

/* HTTP/1.0 has neither chunks nor trailers: a stream to a 1.0 client goes
 * out as it comes, its cost in the SSE comment, and ends when the router
 * closes the connection. */
Test(proxy, stream_to_an_http10_client_is_not_chunked)
{
    static const char body[] = "{\"model\":\"chat\",\"stream\":true,\"messages\":"
                               "[{\"role\":\"user\",\"content\":\"hello there\"}]}";
    struct support_http_conn c;
    struct buf out = {0};
    const char *end;

    start_two(NULL, NULL);
    buf_reset(&req);
    cr_assert_eq(buf_printf(&req,
                            "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n" AUTH
                            "Connection: keep-alive\r\nContent-Length: %zu\r\n\r\n%s",
                            sizeof(body) - 1, body),
                 0);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    read_to_close(&c, &out);
    support_http_close(&c);
    cr_assert_eq(buf_append(&out, "", 1), 0); /* a C string from here */
    end = strstr(out.data, "\r\n\r\n");
    cr_assert_not_null(end, "%s", out.data);
    cr_assert_eq(strncmp(out.data, "HTTP/1.1 200 ", 13), 0, "%s", out.data);
    cr_assert_null(strcasestr(out.data, "transfer-encoding"), "%s", out.data);
    cr_assert_null(strcasestr(out.data, "trailer:"), "%s", out.data);
    cr_assert_not_null(strcasestr(out.data, "connection: close"), "%s", out.data);
    /* The events as the mock sent them, no chunk sizes between them. */
    cr_assert_eq(strncmp(end + 4, "data: {", 7), 0, "%s", end + 4);
    cr_assert_not_null(strstr(end, "data: [DONE]\n\n: x-costrouter-cost-usd="), "%s", end);
    cr_assert_null(strstr(end, "\r\n0\r\n"), "%s", end);
    buf_free(&out);
}

/* An HTTP/1.0 client keeps its connection only when the answer says
 * Connection: keep-alive (RFC 9112 9.3 and its appendix on 1.0
 * keep-alive): without it the client (ab -k, 1.0 proxies) reads a
 * connection the router keeps open as one to be closed, and waits for
 * the close until idle_timeout_ms. So each answer the router keeps the
 * connection open after says so, its own (/healthz, an error) as well as
 * a backend's, and the next request on that connection is served. */
Test(proxy, an_http10_keep_alive_answer_says_keep_alive)
{
    static const char *const requests[] = {
        "GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "GET /nowhere HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
        "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n" AUTH
        "Connection: keep-alive\r\nContent-Length: 69\r\n\r\n" CHAT,
    };
    static const int statuses[] = {200, 404, 200};
    struct support_http_conn c;

    cr_assert_eq(strlen(CHAT), 69);
    start_two(NULL, NULL);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    for (size_t i = 0; i < sizeof(requests) / sizeof(requests[0]); i++) {
        const char *conn;

        cr_assert_eq(support_http_send(&c, requests[i], strlen(requests[i])), 0);
        cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0, "request %zu", i);
        cr_assert_eq(resp.status, statuses[i], "request %zu", i);
        conn = support_http_header(&resp, "connection");
        cr_assert_not_null(conn, "request %zu: no Connection header to a 1.0 keep-alive client", i);
        cr_assert_eq(strcasecmp(conn, "keep-alive"), 0, "request %zu: Connection: %s", i, conn);
        support_http_response_free(&resp);
    }
    support_http_close(&c);
}

/* listen: HOST:PORT with a host name, which --check-config takes: the
 * router listens on what it resolves to. It used to exit at start with
 * "listen: bad address localhost", after the check said the config was
 * fine. */
Test(proxy, listen_takes_a_host_name)
{
    char a[1024], hex[65];
    char *check[] = {getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter",
                     "--check-config", conf_path, NULL};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    support_key_sha256_hex(TENANT_KEY, hex);
    start_router_with("listen: localhost:0\n"
                      "backends:\n%s\n"
                      "routes: [{model: chat, candidates: [a]}]\n"
                      "tenants: [{id: t1, api_keys: [\"sha256:%s\"]}]\n",
                      backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), hex);
    cr_assert_eq(support_run(check, NULL, TIMEOUT_MS), 0, "--check-config refused it");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
}

Test(proxy, stream_usage_is_forwarded_when_the_client_asks)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int saw_usage = 0;

    start_two(NULL, NULL);
    open_stream(&s, AUTH,
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[],"
                "\"stream_options\":{\"include_usage\":true}}");
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
        if (strstr(ev.data, "\"completion_tokens\""))
            saw_usage = 1;
    support_sse_close(&s);
    cr_assert(saw_usage);
}

/* A client that does not read pauses the backend: the router holds about
 * PROXY_CLIENT_HIGH_WATER of a ~40 MB stream, not the stream, and it all
 * arrives once the client reads. */
Test(proxy, a_client_that_does_not_read_pauses_the_backend)
{
    static const char body[] = "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}";
    struct support_http_conn c;
    struct timespec pause = {1, 0};
    char chunk[65536];
    long before, held;
    ssize_t n;
    size_t total = 0;
    struct buf tail = {0};

    start_two(NULL, NULL);
    before = support_proc_rss_kb(router.pid);
    cr_assert_gt(before, 0);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-tokens: 200000\r\nx-mock-token-delay-ms: 0\r\n",
                                     body),
                 0);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    nanosleep(&pause, NULL); /* the mock has written it all by now */
    held = support_proc_rss_kb(router.pid) - before;
    cr_assert_lt(held, 8 * 1024, "the router grew by %ld KB for a client that reads nothing", held);
    struct timeval tv = {.tv_sec = TIMEOUT_MS / 1000};
    cr_assert_eq(setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
    static const char end[] = "\r\n0\r\nx-costrouter-cost-usd:";
    /* Until the last chunk and its trailer, which may straddle two reads:
     * `tail` keeps the end of the previous read before this one. */
    while ((n = recv(c.fd, chunk, sizeof(chunk), 0)) > 0) {
        total += (size_t)n;
        cr_assert_eq(buf_append(&tail, chunk, (size_t)n), 0);
        if (memmem(tail.data, tail.len, end, sizeof(end) - 1))
            break;
        if (tail.len > 64)
            buf_consume(&tail, tail.len - 64);
    }
    cr_assert_gt(n, 0, "the stream stopped after %zu bytes", total);
    cr_assert_gt(total, 30u << 20, "only %zu bytes", total);
    buf_free(&tail);
    support_http_close(&c);
}

/* Filler bytes for one event bigger than any socket path to the client
 * holds: past the largest send buffer TCP autotuning may give the
 * router's socket (net.ipv4.tcp_wmem's max, 4 MB by default) by 1 MB, so
 * whatever the kernel takes, over PROXY_CLIENT_HIGH_WATER is left queued. */
static int pad_past_send_buffers(void)
{
    long min, def, max = 4L << 20;
    FILE *f = fopen("/proc/sys/net/ipv4/tcp_wmem", "r");

    if (f != NULL) {
        if (fscanf(f, "%ld %ld %ld", &min, &def, &max) != 3)
            max = 4L << 20;
        fclose(f);
    }
    max += 1L << 20;
    return (int)(max < (64L << 20) ? max : (64L << 20));
}

/* Poll the admin API until the only backend's pool holds `idle`
 * connections: the router has read the end of an answer. */
static void wait_pool_idle(int idle)
{
    struct timespec tick = {0, 20 * 1000 * 1000};

    for (int i = 0; i < TIMEOUT_MS / 20; i++) {
        cr_assert_eq(call("GET", "/admin/backends", ADMIN, NULL), 0);
        if (json_num(cJSON_GetArrayItem(body_json(), 0), "idle_connections") == idle)
            return;
        nanosleep(&tick, NULL);
    }
    cr_assert_fail("the pool never held %d idle connection(s): %.*s", idle, (int)resp.body.len,
                   resp.body.data);
}

/* A connection paused for a slow client by the very read that ended its
 * answer goes back to the pool reading (d091a66). The stream is one huge
 * event, forwarded whole when its last byte is read, so the write queue
 * jumps past PROXY_CLIENT_HIGH_WATER in that read; the stream's end comes
 * 500 ms later (the sanitized router needs ~100 ms for the event) in a
 * read of its own, which pauses the upstream and ends the answer. Left
 * paused, the pooled connection never reads the next answer: the next
 * request waits first_byte_timeout_ms and is sent again on a new
 * connection, so the backend serves (and bills) it twice. */
Test(proxy, a_connection_paused_by_its_last_read_is_pooled_reading)
{
    static const char body[] = "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}";
    struct support_http_conn c;
    struct support_http_response r = {0};
    char a[1024], headers[256];
    int pad = pad_past_send_buffers();

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, "    first_byte_timeout_ms: 2000\n");
    start_router("admin_key: " ADMIN_KEY, a, "a");
    snprintf(headers, sizeof(headers),
             AUTH "x-mock-tokens: 1\r\nx-mock-event-pad: %d\r\nx-mock-done-delay-ms: 500\r\n",
             pad);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", headers, body), 0);
    /* A client with a tiny receive buffer that reads nothing until the
     * router has read the whole answer. */
    cr_assert_eq(support_http_connect_rcvbuf(&c, router.port, 4096), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    wait_pool_idle(1);
    cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    cr_assert_gt(r.body.len, (size_t)pad);
    cr_assert_not_null(memmem(r.body.data, r.body.len, "data: [DONE]", 12));
    support_http_response_free(&r);
    support_http_close(&c);

    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_expect_lt(resp.total_ms, 1000.0, "the pooled connection answered after %.0f ms",
                 resp.total_ms);
    /* Two requests on one upstream connection (the second one counted is
     * this stats call's own): no resend. */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 2, "%.*s", (int)resp.body.len,
                 resp.body.data);
    cr_assert_eq(json_num(json, "connections"), 2, "%.*s", (int)resp.body.len, resp.body.data);
}

/* An SSE event that never ends within 16 MiB (here 17 MiB of padding in
 * one token event) is an upstream that does not frame its stream: the
 * router ends the stream with an error event, visibly broken, instead of
 * holding its bytes without bound, and goes on serving. */
Test(proxy, an_sse_event_over_16_mib_ends_the_stream)
{
    char a[1024];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, NULL);
    start_router(NULL, a, "a");
    cr_assert_eq(call("POST", "/v1/chat/completions",
                      AUTH "x-mock-tokens: 1\r\nx-mock-event-pad: 17825792\r\n",
                      "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}"),
                 -ECONNRESET, "the stream ended cleanly");
    cr_assert_eq(resp.status, 200);
    cr_assert_lt(resp.body.len, (size_t)4096, "the event's bytes were sent");
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "event: error", 12), "%.*s",
                       (int)resp.body.len, resp.body.data);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "too long", 8));
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
}

/* stream_usage: false, for servers that refuse stream_options: nothing is
 * added, and the stream is charged one completion token per event. */
Test(proxy, stream_usage_false_adds_no_stream_options)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int events = 0;
    const char *cost = NULL;

    start_two(NULL, "    stream_usage: false\n");
    open_stream(&s, AUTH "x-mock-tokens: 5\r\n",
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
        if (strcmp(ev.data, "[DONE]") != 0)
            events++;
    cost = support_http_header(&s.resp, "x-costrouter-cost-usd"); /* the trailer */
    cr_assert_eq(events, 5);
    cr_assert_not_null(cost);
    /* 3 prompt tokens (the estimate) at $1/Mtok, 5 events at $2/Mtok. */
    cr_assert_float_eq(strtod(cost, NULL), 0.000013, 1e-9, "cost %s", cost);
    support_sse_close(&s);
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/last-request", NULL, NULL), 0);
    cr_assert_null(strstr(json_str(body_json(), "body"), "stream_options"), "%s",
                   json_str(json, "body"));
}

Test(proxy, keep_alive_pipelining_and_upstream_reuse)
{
    struct support_http_conn c;
    struct support_http_response r[3] = {0};
    char a[1024];

    /* One backend, so every request must reuse its pooled connection. */
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(NULL, backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), "a");
    buf_reset(&req);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0); /* three at once */
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(support_http_read(&c, &r[i], TIMEOUT_MS), 0, "response %d", i);
        cr_assert_eq(r[i].status, 200);
        cr_assert_null(support_http_header(&r[i], "connection"));
    }
    /* In order: ids increase. */
    cr_assert_lt(strcmp(support_http_header(&r[0], "x-request-id"),
                        support_http_header(&r[1], "x-request-id")), 0);
    for (int i = 0; i < 3; i++)
        support_http_response_free(&r[i]);
    support_http_close(&c);
    /* Three requests, one upstream connection (the second one counted
     * is this stats call's own). */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 3);
    cr_assert_eq(json_num(json, "connections"), 2, "%.*s", (int)resp.body.len, resp.body.data);
}

/* The number at the end of an x-request-id ("cr-START-N", hex). */
static unsigned long long request_seq(const struct support_http_response *r)
{
    const char *id = support_http_header(r, "x-request-id");

    cr_assert_not_null(id);
    return strtoull(strrchr(id, '-') + 1, NULL, 16);
}

/* Send from `p` until `limit` bytes went or the socket took nothing for
 * a second (the peer stopped reading). Returns the bytes sent. */
static size_t send_until_blocked(int fd, const char *p, size_t chunk, size_t limit)
{
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    size_t sent = 0;
    ssize_t n;

    while (sent < limit) {
        n = send(fd, p + sent % chunk, chunk - sent % chunk, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            sent += (size_t)n;
            continue;
        }
        cr_assert(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "send: %s",
                  strerror(errno));
        if (poll(&pfd, 1, 1000) == 0)
            break;
    }
    return sent;
}

/* A client that pipelines requests and reads none of the answers is held
 * once a little of them waits (the router stops reading it), rather than
 * having every answer built and queued (hundreds of MB). Once it reads,
 * every answer arrives, in order. */
Test(proxy, a_pipelining_client_that_does_not_read_is_held, .timeout = 120)
{
    static const char one[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    const size_t len = sizeof(one) - 1, limit = 32u << 20;
    struct support_http_conn c;
    struct support_http_response r = {0};
    size_t chunk = (65536 / len) * len, sent, answers;
    static char many[65536];
    unsigned long long first = 0;
    long before, grown;

    for (size_t off = 0; off < chunk; off += len)
        memcpy(many + off, one, len);
    support_proc_small_quarantine();
    start_two(NULL, NULL);
    cr_assert_eq(support_http_connect_rcvbuf(&c, router.port, 4096), 0);
    before = support_proc_rss_kb(router.pid);
    cr_assert_gt(before, 0);
    sent = send_until_blocked(c.fd, many, chunk, limit);
    grown = support_proc_rss_kb(router.pid) - before;
    cr_assert_lt(grown, 64 * 1024, "the router grew by %ld KB for %zu bytes of requests", grown,
                 sent);
    cr_assert_lt(sent, limit, "the router read all %zu bytes", sent);
    /* The last request may be cut: finish it once the router reads. */
    answers = (sent + len - 1) / len;
    for (size_t i = 0; i < answers; i++) {
        if (i == sent / len && sent % len != 0)
            cr_assert_eq(support_http_send(&c, one + sent % len, len - sent % len), 0);
        cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0, "answer %zu of %zu", i, answers);
        cr_assert_eq(r.status, 200, "answer %zu", i);
        if (i == 0)
            first = request_seq(&r);
        else
            cr_assert_eq(request_seq(&r), first + i, "answer %zu out of order", i);
    }
    support_http_response_free(&r);
    support_http_close(&c);
}

/* An Upgrade offer (curl --http2 on http:// sends h2c) is declined by
 * answering in HTTP/1.1, and the connection goes on: a GET, a POST with
 * a body and a plain request after them all get 200. CONNECT gets 405
 * and the connection is closed. */
Test(proxy, an_upgrade_offer_is_declined_and_connect_refused)
{
    static const char h2c[] = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                              "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
    struct support_http_conn c;
    struct support_http_response r = {0};

    start_two(NULL, NULL);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    for (int i = 0; i < 3; i++) {
        buf_reset(&req);
        if (i == 0)
            cr_assert_eq(support_http_format(&req, "GET", "/healthz", h2c, NULL), 0);
        else
            cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                             i == 1 ? AUTH "Connection: Upgrade\r\n"
                                                           "Upgrade: websocket\r\n"
                                                    : AUTH,
                                             CHAT),
                         0);
        cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
        cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0, "request %d", i);
        cr_assert_eq(r.status, 200, "request %d: %d %.*s", i, r.status, (int)r.body.len,
                     r.body.data);
        cr_assert_null(support_http_header(&r, "connection"), "request %d", i);
        cr_assert_null(support_http_header(&r, "upgrade"), "request %d", i);
    }
    support_http_response_free(&r);
    support_http_close(&c);

    static const char connect[] = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    support_http_response_free(&resp);
    cr_assert_eq(support_http_request(router.port, connect, sizeof(connect) - 1, TIMEOUT_MS, &resp),
                 0);
    assert_error(405, "method_not_allowed");
    cr_assert_str_eq(support_http_header(&resp, "connection"), "close");
}

/* A chunked body's trailer is not part of the request's head: an
 * Authorization in it does not authenticate, and its fields do not reach
 * the backend. Its bytes still count against max_header_bytes. */
Test(proxy, a_chunked_trailer_neither_authenticates_nor_is_forwarded)
{
    static const char *const heads[] = {AUTH, "", AUTH};
    static const char *const trailers[] = {
        "x-pad: " PAD256 PAD256 PAD256 PAD256 "\r\n", AUTH, "x-trailer-probe: leaked\r\n"};
    static const int want[] = {431, 401, 200};
    char one[4096], a[1024];

    /* One backend: the request that passes is its last one. */
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router("limits: { max_header_bytes: 1024 }",
                 backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), "a");
    for (int i = 0; i < 3; i++) {
        snprintf(one, sizeof(one),
                 "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%s"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "%zx\r\n%s\r\n0\r\n%s\r\n",
                 heads[i], strlen(CHAT), CHAT, trailers[i]);
        support_http_response_free(&resp);
        cr_assert_eq(support_http_request(router.port, one, strlen(one), TIMEOUT_MS, &resp), 0);
        cr_assert_eq(resp.status, want[i], "%d: %d %.*s", i, resp.status, (int)resp.body.len,
                     resp.body.data);
        if (want[i] != 200)
            assert_error(want[i], want[i] == 401 ? "invalid_api_key" : "headers_too_large");
    }
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/last-request", NULL, NULL), 0);
    cr_assert_null(cJSON_GetObjectItem(cJSON_GetObjectItem(body_json(), "headers"),
                                       "x-trailer-probe"),
                   "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_not_null(json_str(json, "headers.authorization"));
}

/* A key given twice in one object is refused: parsers disagree on which
 * counts, so the router could price one request while the backend serves
 * another (a second "model", a larger "max_tokens", a longer "content"). */
Test(proxy, a_key_given_twice_is_refused)
{
    static const char *const dups[] = {
        "{\"model\":\"chat\",\"model\":\"gpt-4\",\"messages\":[]}",
        "{\"model\":\"chat\",\"max_tokens\":5,\"messages\":[],\"max_tokens\":99999}",
        "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"a\","
        "\"content\":\"b\"}]}",
    };
    static const char *const names[] = {"model", "max_tokens", "content"};
    struct buf many = {0};

    start_two(NULL, NULL);
    for (size_t i = 0; i < sizeof(dups) / sizeof(dups[0]); i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, dups[i]), 0);
        assert_error(400, "invalid_json");
        cr_assert_not_null(strstr(json_str(json, "error.message"), names[i]), "%s",
                           json_str(json, "error.message"));
    }
    /* Past the pairwise scan: 40 distinct keys pass, one more "k7" does not. */
    cr_assert_eq(buf_printf(&many, "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\","
                                   "\"content\":\"hi\"}]"), 0);
    for (int i = 0; i < 40; i++)
        cr_assert_eq(buf_printf(&many, ",\"k%d\":%d", i, i), 0);
    cr_assert_eq(buf_append(&many, "}", sizeof("}")), 0); /* with its NUL */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, many.data), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    many.len -= 2;
    cr_assert_eq(buf_append(&many, ",\"k7\":1}", sizeof(",\"k7\":1}")), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, many.data), 0);
    assert_error(400, "invalid_json");
    buf_free(&many);
    /* Only the good one went upstream. */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 1);
}

/* A 304 ends with its head even when it carries a Content-Length (what
 * its 200 would have had), a 204 too: neither waits for a body, and both
 * connections go on serving. */
Test(proxy, bodyless_answers_end_with_their_head)
{
    struct support_http_conn c;
    struct support_http_response r[4] = {0};
    static const char *const status[] = {"304", "204", NULL, "304"};
    static const int want[] = {304, 204, 200, 304};
    char a[1024], extra[64];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(NULL, backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), "a");
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    for (int i = 0; i < 4; i++) {
        snprintf(extra, sizeof(extra), AUTH "%s%s%s", status[i] ? "x-mock-status: " : "",
                 status[i] ? status[i] : "", status[i] ? "\r\n" : "");
        buf_reset(&req);
        cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", extra, CHAT), 0);
        cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
        cr_assert_eq(support_http_read(&c, &r[i], TIMEOUT_MS), 0, "answer %d did not end", i);
        cr_assert_eq(r[i].status, want[i]);
        if (want[i] != 200) {
            cr_assert_eq(r[i].body.len, 0);
            cr_assert_null(support_http_header(&r[i], "content-length"));
            cr_assert_null(support_http_header(&r[i], "transfer-encoding"));
        }
    }
    for (int i = 0; i < 4; i++)
        support_http_response_free(&r[i]);
    support_http_close(&c);
    /* Four answers, one upstream connection (and this stats call's own). */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "connections"), 2, "%.*s", (int)resp.body.len,
                 resp.body.data);
}

/* Answers to HEAD are heads alone, with the Content-Length a GET's body
 * would have: /healthz, /v1/models and an error. The GET pipelined after
 * them parses as the next answer, with its body. */
Test(proxy, answers_to_head_have_no_body)
{
    static const char *const paths[] = {"/healthz", "/v1/models", "/nope", "/metrics"};
    static const int want[] = {200, 200, 404, 200};
    struct support_http_conn c;
    struct support_http_response r = {0};

    start_two("admin_key: " ADMIN_KEY, NULL);
    buf_reset(&req);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(support_http_format(&req, "HEAD", paths[i], i == 3 ? ADMIN : AUTH, NULL), 0);
    cr_assert_eq(support_http_format(&req, "GET", "/healthz", NULL, NULL), 0);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(support_http_read_head(&c, &r, TIMEOUT_MS), 0, "%s", paths[i]);
        cr_assert_eq(r.status, want[i], "%s", paths[i]);
        cr_assert_gt(atoi(support_http_header(&r, "content-length")), 0, "%s", paths[i]);
    }
    cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0, "%.*s", (int)r.raw.len, r.raw.data);
    cr_assert_eq(r.status, 200);
    cr_assert_eq(r.body.len, 15);
    cr_assert_eq(memcmp(r.body.data, "{\"status\":\"ok\"}", 15), 0);
    support_http_response_free(&r);
    support_http_close(&c);
}

/* ---- client errors ---- */

/* A 401 says how to authenticate: WWW-Authenticate, which RFC 9110
 * 11.6.1 requires on every 401, names the Bearer scheme both the admin
 * API and /v1 take (RFC 6750 3). The admin API's and /v1's 401s came
 * without it. */
Test(proxy, a_401_says_www_authenticate_bearer)
{
    static const struct {
        const char *method, *path, *headers, *body;
    } cases[] = {
        {"GET", "/metrics", NULL, NULL},
        {"GET", "/admin/backends", "Authorization: Bearer adm-wrong\r\n", NULL},
        {"POST", "/admin/reload", AUTH, NULL},
        {"POST", "/v1/chat/completions", NULL, CHAT},
        {"GET", "/v1/models", "Authorization: Bearer sk-wrong\r\n", NULL},
        {"POST", "/v1/messages", "x-api-key: sk-wrong\r\n", CHAT},
    };
    const char *h;

    start_two("admin_key: " ADMIN_KEY, NULL);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cr_assert_eq(call(cases[i].method, cases[i].path, cases[i].headers, cases[i].body), 0);
        cr_assert_eq(resp.status, 401, "%s %s: %d", cases[i].method, cases[i].path, resp.status);
        h = support_http_header(&resp, "www-authenticate");
        cr_assert(h != NULL && strcmp(h, "Bearer") == 0, "%s %s: WWW-Authenticate: %s",
                  cases[i].method, cases[i].path, h ? h : "(none)");
    }
    /* Not on other errors. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, "{\"model\":"), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_null(support_http_header(&resp, "www-authenticate"));
}

Test(proxy, client_errors_are_openai_json)
{
    start_two(NULL, NULL);
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, CHAT), 0);
    assert_error(401, "invalid_api_key");
    cr_assert_eq(call("POST", "/v1/chat/completions", "Authorization: Bearer sk-wrong\r\n", CHAT), 0);
    assert_error(401, "invalid_api_key");
    cr_assert_null(memmem(resp.body.data, resp.body.len, "sk-wrong", 8), "key echoed");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, "{\"model\":"), 0);
    assert_error(400, "invalid_json");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, "{\"messages\":[]}"), 0);
    assert_error(400, "missing_model");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, "{\"model\":\"nope\"}"), 0);
    assert_error(404, "model_not_found");
    /* The message quotes the model; bytes that are not UTF-8 become U+FFFD. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                      "{\"model\":\"no\xff" "\xc3" "pe\"}"), 0);
    assert_error(404, "model_not_found");
    cr_assert_str_eq(json_str(json, "error.message"),
                     "no route for this model: no\xef\xbf\xbd\xef\xbf\xbdpe");
    /* max_tokens past both backends' 8192-token window: no wait would help. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                      "{\"model\":\"chat\",\"max_tokens\":9000,\"messages\":"
                      "[{\"role\":\"user\",\"content\":\"hi\"}]}"), 0);
    assert_error(400, "context_length_exceeded");
    cr_assert_not_null(strstr(json_str(json, "error.message"), "9000 for the completion (max_tokens)"),
                       "%s", json_str(json, "error.message"));
    cr_assert_not_null(strstr(json_str(json, "error.message"), "largest window is 8192 tokens"));
    /* It names the member the client set, the smaller when both are. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                      "{\"model\":\"chat\",\"max_tokens\":12000,\"max_completion_tokens\":9500,"
                      "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"), 0);
    assert_error(400, "context_length_exceeded");
    cr_assert_not_null(strstr(json_str(json, "error.message"),
                              "9500 for the completion (max_completion_tokens)"),
                       "%s", json_str(json, "error.message"));
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 0, "nothing went upstream");
    cr_assert_eq(call("GET", "/v2/whatever", AUTH, NULL), 0);
    assert_error(404, "unknown_url");
    cr_assert_eq(call("GET", "/v1/chat/completions", AUTH, NULL), 0);
    assert_error(405, "method_not_allowed");
    cr_assert_eq(support_http_request(router.port, "BLAH\r\n\r\n", 8, TIMEOUT_MS, &resp), 0);
    assert_error(400, "bad_request");
    /* A header name that is not a token (a space in it) would go upstream
     * for the backend to read as it likes. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "X Bad Name: 1\r\n", CHAT), 0);
    assert_error(400, "bad_request");
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 0, "it went upstream");
}

/* Members the router reads with a type the APIs refuse are refused as
 * they would be: a `stream` that is not a boolean (the router would take
 * "true" or 1 for false while a server that coerces it, as vLLM does,
 * streams), and a cap the hold is sized by given as a string (the router
 * would read "5000" as no cap and hold for its guess, while such a server
 * makes 5000 tokens). Nothing goes upstream; null is as absent. */
Test(proxy, members_of_a_type_the_apis_refuse_are_refused)
{
    static const struct {
        const char *path, *body, *name;
    } cases[] = {
        {"/v1/chat/completions", "{\"model\":\"chat\",\"stream\":\"true\",\"messages\":[]}",
         "stream"},
        {"/v1/chat/completions", "{\"model\":\"chat\",\"stream\":1,\"messages\":[]}", "stream"},
        {"/v1/completions", "{\"model\":\"chat\",\"stream\":{},\"prompt\":\"hi\"}", "stream"},
        {"/v1/responses", "{\"model\":\"chat\",\"stream\":\"false\",\"input\":\"hi\"}", "stream"},
        {"/v1/chat/completions",
         "{\"model\":\"chat\",\"max_tokens\":\"5000\",\"messages\":[]}", "max_tokens"},
        {"/v1/chat/completions",
         "{\"model\":\"chat\",\"max_completion_tokens\":[9],\"messages\":[]}",
         "max_completion_tokens"},
        {"/v1/chat/completions", "{\"model\":\"chat\",\"n\":\"4\",\"messages\":[]}", "'n'"},
        {"/v1/completions", "{\"model\":\"chat\",\"best_of\":\"3\",\"prompt\":\"hi\"}",
         "best_of"},
        {"/v1/responses", "{\"model\":\"chat\",\"max_output_tokens\":\"64\",\"input\":\"hi\"}",
         "max_output_tokens"},
    };
    static const char *const fine[] = {
        "{\"model\":\"chat\",\"stream\":null,\"messages\":[]}",
        "{\"model\":\"chat\",\"stream\":false,\"messages\":[]}",
        "{\"model\":\"chat\",\"max_tokens\":null,\"n\":1,\"messages\":[]}",
    };
    double sent = 0;

    start_two(NULL, NULL);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cr_assert_eq(call("POST", cases[i].path, AUTH, cases[i].body), 0);
        assert_error(400, "invalid_type");
        cr_assert_not_null(strstr(json_str(json, "error.message"), cases[i].name), "%s",
                           json_str(json, "error.message"));
    }
    for (size_t i = 0; i < sizeof(fine) / sizeof(fine[0]); i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, fine[i]), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    }
    for (int m = 0; m < 2; m++) {
        cr_assert_eq(call_port(m ? mock_b.port : mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
        sent += json_num(body_json(), "requests");
    }
    cr_assert_eq(sent, 3, "only the good ones went upstream");
}

/* A chat body whose messages the estimate cannot read (an item that is
 * no object, a content or role of another type) was counted as a few
 * tokens whatever text it held: under a tpm of 2000 a 3000-token text in
 * `"messages":["..."]` passed where the same text in a message is refused
 * as larger than the limit, and a budget's hold was as small. The API
 * refuses such bodies: so does the router, 400 invalid_type, with nothing
 * sent upstream. */
Test(proxy, chat_messages_of_a_shape_the_api_refuses_are_refused)
{
    static const struct {
        const char *fmt, *what; /* body, %s the long text; words of the message */
    } cases[] = {
        {"{\"model\":\"chat\",\"messages\":[\"%s\"]}", "each message"},
        {"{\"model\":\"chat\",\"messages\":[[{\"role\":\"user\",\"content\":\"%s\"}]]}",
         "each message"},
        {"{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":{\"text\":\"%s\"}}]}",
         "content"},
        {"{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":[\"%s\"]}]}",
         "content part"},
        {"{\"model\":\"chat\",\"messages\":[{\"role\":{\"r\":\"%s\"},\"content\":\"hi\"}]}",
         "role"},
        {"{\"model\":\"chat\",\"messages\":\"%s\"}", "'messages'"},
    };
    static const char *const fine[] = {
        "{\"model\":\"chat\",\"messages\":[]}",
        "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
        "\"text\":\"hi\"}]},{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":"
        "\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}]}",
    };
    char a[1024], hex[65];
    struct buf words = {0}, body = {0};

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    support_key_sha256_hex(TENANT_KEY, hex);
    start_router_with("listen: 127.0.0.1:0\nbackends:\n%s"
                      "routes:\n  - {model: chat, candidates: [a]}\n"
                      "tenants:\n  - id: t1\n    api_keys: [\"sha256:%s\"]\n"
                      "    rate_limits: {tpm: 2000}\n",
                      backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), hex);
    for (int i = 0; i < 3000; i++)
        cr_assert_eq(buf_append_lit(&words, "word "), 0);
    cr_assert_eq(buf_append(&words, "", 1), 0);
    /* The text in a message is larger than the limit. */
    cr_assert_eq(buf_printf(&body, "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\","
                                   "\"content\":\"%s\"}]}", words.data), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, body.data), 0);
    cr_assert_eq(resp.status, 429, "%.*s", (int)resp.body.len, resp.body.data);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        buf_reset(&body);
        cr_assert_eq(buf_printf(&body, cases[i].fmt, words.data), 0);
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, body.data), 0);
        cr_assert_eq(resp.status, 400, "case %zu: %d %.*s", i, resp.status, (int)resp.body.len,
                     resp.body.data);
        assert_error(400, "invalid_type");
        cr_assert_not_null(strstr(json_str(json, "error.message"), cases[i].what), "%s",
                           json_str(json, "error.message"));
    }
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 0, "a refused body went upstream");
    for (size_t i = 0; i < sizeof(fine) / sizeof(fine[0]); i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, fine[i]), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    }
    buf_free(&words);
    buf_free(&body);
}

/* A 405 says which methods the path takes (RFC 9110 15.5.6: the server
 * MUST send Allow): the API's paths, the admin API's (with its key, as
 * without it a path is not told apart from another), in the language of
 * the endpoint (Anthropic's on /v1/messages). */
Test(proxy, a_405_names_the_methods_its_path_allows)
{
    static const struct {
        const char *method, *path, *headers, *allow;
    } cases[] = {
        {"GET", "/v1/chat/completions", AUTH, "POST"},
        {"PUT", "/v1/responses", AUTH, "POST"},
        {"GET", "/v1/messages", "x-api-key: " TENANT_KEY "\r\n", "POST"},
        {"DELETE", "/v1/messages/count_tokens", AUTH, "POST"},
        {"POST", "/v1/models", AUTH, "GET, HEAD"},
        {"POST", "/healthz", NULL, "GET, HEAD"},
        {"POST", "/metrics", ADMIN, "GET, HEAD"},
        {"OPTIONS", "/v1/embeddings", NULL, "POST"},
        {"GET", "/admin/reload", ADMIN, "POST"},
        {"POST", "/admin/backends", ADMIN, "GET, HEAD"},
        {"DELETE", "/admin/tenants/t1/spend", ADMIN, "GET, HEAD"},
    };

    start_two("admin_key: " ADMIN_KEY, NULL);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cr_assert_eq(call(cases[i].method, cases[i].path, cases[i].headers, NULL), 0);
        cr_assert_eq(resp.status, 405, "%s %s: %d", cases[i].method, cases[i].path, resp.status);
        cr_assert_not_null(support_http_header(&resp, "allow"), "%s %s: no Allow",
                           cases[i].method, cases[i].path);
        cr_assert_str_eq(support_http_header(&resp, "allow"), cases[i].allow, "%s %s",
                         cases[i].method, cases[i].path);
        body_json();
        if (strncmp(cases[i].path, "/v1/messages", 12) == 0)
            cr_assert_str_eq(json_str(json, "type"), "error", "%s", cases[i].path);
        else
            cr_assert_str_eq(json_str(json, "error.code"), "method_not_allowed", "%s",
                             cases[i].path);
    }
}

/* The scheme in any case, spaces and tabs around the key: the same key. */
Test(proxy, the_tenant_key_is_read_as_rfc_9110_allows)
{
    static const char *const ok[] = {
        "authorization: bearer " TENANT_KEY "\r\n",
        "Authorization: BEARER  " TENANT_KEY "\r\n",
        "Authorization: Bearer " TENANT_KEY " \t \r\n",
        "Authorization:\tBearer \t" TENANT_KEY "\r\n",
    };
    static const char *const refused[] = {
        "Authorization: Bearer\r\n",
        "Authorization: Bearer   \r\n",
        "Authorization: Basic " TENANT_KEY "\r\n",
        "Authorization: Bearer " TENANT_KEY "x\r\n",
    };

    start_two(NULL, NULL);
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", ok[i], CHAT), 0);
        cr_assert_eq(resp.status, 200, "%s: %d", ok[i], resp.status);
    }
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", refused[i], CHAT), 0);
        assert_error(401, "invalid_api_key");
    }
}

/* Two Authorization headers are refused, never joined or chosen between:
 * "Bearer sk-test" and "-tenant" made the tenant's key. */
Test(proxy, two_authorization_headers_are_refused)
{
    static const char *const twice[] = {
        "Authorization: Bearer sk-test\r\nAuthorization: -tenant\r\n",
        AUTH AUTH,
        AUTH "authorization: Bearer sk-wrong\r\n",
    };

    start_two(NULL, NULL);
    for (size_t i = 0; i < sizeof(twice) / sizeof(twice[0]); i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", twice[i], CHAT), 0);
        assert_error(400, "bad_request");
        cr_assert_not_null(strstr(json_str(json, "error.message"), "Authorization"), "%s",
                           json_str(json, "error.message"));
        cr_assert_str_eq(support_http_header(&resp, "connection"), "close");
    }
    for (int m = 0; m < 2; m++) {
        cr_assert_eq(call_port(m ? mock_b.port : mock_a.port, "GET", "/mock/stats", NULL, NULL),
                     0);
        cr_assert_eq(json_num(body_json(), "requests"), 0, "nothing went upstream");
    }
}

Test(proxy, size_limits_give_413_and_431)
{
    struct buf big = {0};

    start_two("limits: {max_body_bytes: 1024, max_header_bytes: 2048}", NULL);
    cr_assert_eq(buf_printf(&big, "{\"model\":\"chat\",\"prompt\":\"%02000d\"}", 0), 0);
    cr_assert_eq(call("POST", "/v1/completions", AUTH, big.data), 0);
    assert_error(413, "request_too_large");
    buf_reset(&big);
    cr_assert_eq(buf_printf(&big, "x-pad: %03000d\r\n" AUTH, 0), 0);
    cr_assert_eq(call("POST", "/v1/completions", big.data, CHAT), 0);
    assert_error(431, "headers_too_large");

    /* A request refused before it was whole has an id of its own, not
     * the one of the request before it on the connection. */
    struct support_http_conn conn;
    struct support_http_response r[2] = {0};
    buf_reset(&big);
    cr_assert_eq(support_http_format(&big, "GET", "/healthz", NULL, NULL), 0);
    cr_assert_eq(buf_printf(&big, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n" AUTH
                                  "Content-Length: 5000\r\n\r\n"), 0);
    cr_assert_eq(support_http_connect(&conn, router.port), 0);
    cr_assert_eq(support_http_send(&conn, big.data, big.len), 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(support_http_read(&conn, &r[i], TIMEOUT_MS), 0, "response %d", i);
    cr_assert_eq(r[0].status, 200);
    cr_assert_eq(r[1].status, 413);
    cr_assert_not_null(support_http_header(&r[1], "x-request-id"));
    cr_assert_str_neq(support_http_header(&r[0], "x-request-id"),
                      support_http_header(&r[1], "x-request-id"));
    for (int i = 0; i < 2; i++)
        support_http_response_free(&r[i]);
    support_http_close(&conn);
    buf_free(&big);
}

/* A client still sending a body the router refused gets the 413 rather
 * than a reset: the router reads and drops the rest (lingering close),
 * then closes. Most clients read nothing before they have sent all. */
Test(proxy, an_oversized_body_is_read_to_its_end_so_its_413_arrives)
{
    struct support_http_conn c;
    size_t n = 8 << 20; /* far over what socket buffers hold */
    char *body = malloc(n);

    cr_assert_not_null(body);
    memset(body, 'x', n);
    start_two("limits: {max_body_bytes: 1024}", NULL);
    buf_reset(&req);
    cr_assert_eq(buf_printf(&req, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" AUTH
                                  "Content-Length: %zu\r\n\r\n", n), 0);
    cr_assert_eq(buf_append(&req, body, n), 0);
    free(body);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0, "the router reset the connection");
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    assert_error(413, "request_too_large");
    cr_assert_str_eq(support_http_header(&resp, "connection"), "close");
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), -ECONNRESET, "not closed after it");
    support_http_close(&c);
}

Test(proxy, slow_client_gets_408)
{
    struct support_http_conn c;

    start_two("limits: {header_timeout_ms: 200, body_timeout_ms: 200}", NULL);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    const char part[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{";
    cr_assert_eq(support_http_send(&c, part, sizeof(part) - 1), 0);
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    assert_error(408, "request_timeout");
    support_http_close(&c);
}

/* A client that goes on sending its body slowly past body_timeout_ms
 * can read its 408: the router reads and drops what it still sends
 * (lingering close, as after a 413) rather than close with bytes unread,
 * whose reset would throw the 408 away before the client reads it. */
Test(proxy, a_slow_client_still_sending_can_read_its_408)
{
    struct support_http_conn c;
    const char head[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" AUTH
                        "Content-Length: 1000000\r\n\r\n{";
    char chunk[512];
    int rc = 0;

    memset(chunk, 'x', sizeof(chunk));
    start_two("limits: {header_timeout_ms: 300, body_timeout_ms: 300}", NULL);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, head, sizeof(head) - 1), 0);
    /* 1.5 s of sending, the last 1.2 s past the timeout. */
    for (int i = 0; i < 30 && rc == 0; i++) {
        usleep(50 * 1000);
        rc = support_http_send(&c, chunk, sizeof(chunk));
    }
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0, "no 408 to read (the send: %s)",
                 rc ? strerror(-rc) : "ok");
    assert_error(408, "request_timeout");
    cr_assert_eq(rc, 0, "the router reset the connection: %s", strerror(-rc));
    cr_assert_str_eq(support_http_header(&resp, "connection"), "close");
    support_http_close(&c);
}

/* Timeouts move with the connection's phase (router/deadline.c): a
 * keep-alive connection outlives the header timeout it had while its
 * first request came in, and is closed once idle_timeout_ms has passed. */
Test(proxy, idle_connection_closes_at_its_own_timeout)
{
    struct support_http_conn c;
    struct support_http_response r = {0};
    struct buf req = {0};
    struct timespec t0, t1;
    double waited;

    start_two("limits: {header_timeout_ms: 200, idle_timeout_ms: 800}", NULL);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    support_http_response_free(&r);
    usleep(400 * 1000); /* past the header timeout, within the idle one */
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0, "closed before its idle timeout");
    cr_assert_eq(r.status, 200);
    support_http_response_free(&r);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cr_assert_eq(support_http_read(&c, &r, 5000), -ECONNRESET, "an idle connection is closed");
    clock_gettime(CLOCK_MONOTONIC, &t1);
    waited = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    cr_assert(waited > 600 && waited < 4000, "closed %.0f ms after the response", waited);
    support_http_response_free(&r);
    support_http_close(&c);
    buf_free(&req);
}

/* A keep-alive client reading a large answer slowly is not closed as
 * idle while it reads: the idle clock starts once the answer is all
 * written (nginx's keepalive_timeout), and until then the connection is
 * closed only if no byte of it went out for idle_timeout_ms (nginx's
 * send_timeout). Here one SSE event past the socket buffers is queued
 * whole, the answer ends, and the client takes ~8 KiB every 8 ms:
 * seconds of reading, never idle_timeout_ms (1 s) without progress.
 * Before, it was closed 1 s after the answer ended, ~2.8 of 5 MiB read. */
/* A router with `limits` (a flow mapping's inside) in front of one mock,
 * asked on `c` (a small receive buffer) for a stream of one event of `pad`
 * bytes, past the socket buffers; returns once the answer has ended
 * upstream and the router holds most of it. */
static void ask_for_a_large_stream(struct support_http_conn *c, const char *limits, int pad)
{
    static const char body[] = "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}";
    char a[1024], headers[256], conf[256];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, NULL);
    snprintf(conf, sizeof(conf), "admin_key: " ADMIN_KEY "\nlimits: {%s}", limits);
    start_router(conf, a, "a");
    snprintf(headers, sizeof(headers),
             AUTH "x-mock-tokens: 1\r\nx-mock-event-pad: %d\r\nx-mock-done-delay-ms: 300\r\n", pad);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(support_http_connect_rcvbuf(c, router.port, 4096), 0);
    cr_assert_eq(support_http_send(c, req.data, req.len), 0);
    wait_pool_idle(1);
}

Test(proxy, a_slow_reader_of_a_large_answer_is_not_closed_as_idle)
{
    struct support_http_conn c;
    struct support_http_response r = {0};
    int pad = pad_past_send_buffers();
    struct timespec tick = {0, 8 * 1000 * 1000};
    size_t got = 0;

    ask_for_a_large_stream(&c, "idle_timeout_ms: 1000", pad);
    for (;;) {
        ssize_t n;

        cr_assert_eq(buf_reserve(&c.in, 8192), 0);
        n = recv(c.fd, c.in.data + c.in.len, 8192, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            break;
        if (n > 0) {
            c.in.len += (size_t)n;
            got += (size_t)n;
            if (memmem(c.in.data + (c.in.len > 1024 ? c.in.len - 1024 : 0),
                       c.in.len > 1024 ? 1024 : c.in.len, "data: [DONE]", 12) != NULL)
                break;
        }
        nanosleep(&tick, NULL);
    }
    int rc = support_http_read(&c, &r, TIMEOUT_MS);
    cr_assert_eq(rc, 0, "the answer was cut after %zu of its %d bytes", got, pad);
    cr_assert_eq(r.status, 200);
    cr_assert_gt(r.body.len, (size_t)pad);
    cr_assert_not_null(memmem(r.body.data, r.body.len, "data: [DONE]", 12));
    support_http_response_free(&r);
    support_http_close(&c);
}

/* The other side of it: a client that takes nothing of a large answer
 * is still closed idle_timeout_ms after its last progress, not held open
 * for ever by the answer it does not read. */
Test(proxy, a_client_that_reads_nothing_of_a_large_answer_is_closed)
{
    struct support_http_conn c;
    struct support_http_response r = {0};
    int pad = pad_past_send_buffers();

    ask_for_a_large_stream(&c, "idle_timeout_ms: 500", pad);
    usleep(2000 * 1000);
    cr_assert_neq(support_http_read(&c, &r, TIMEOUT_MS), 0, "the whole answer waited %zu bytes",
                  r.raw.len);
    cr_assert_lt(r.body.len, (size_t)pad);
    support_http_response_free(&r);
    support_http_close(&c);
}

/* ---- upstream failures ---- */

Test(proxy, down_backend_falls_back_to_the_next_candidate)
{
    start_two(NULL, NULL);
    support_proc_stop(&mock_a); /* port now refuses */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-reason"), "fallback");
}

Test(proxy, upstream_5xx_falls_back_and_4xx_does_not)
{
    start_two(NULL, NULL);
    /* x-mock-status reaches both mocks; only a 5xx/429 moves on. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-status: 400\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    support_proc_stop(&mock_b);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    support_proc_stop(&router);
    support_proc_stop(&mock_a);
    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "500", NULL), 0);
    unlink(conf_path);
    start_router_ab(NULL, NULL);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
}

/* A backend's head is held to limits.max_header_bytes too: past it the
 * answer is a bad response, and the next candidate serves. */
Test(proxy, an_oversized_upstream_head_moves_to_the_next_candidate)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--pad-header", "4096", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, "--pad-header", "1024", NULL), 0);
    start_router_ab("limits: {max_header_bytes: 2048}", NULL);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_eq(strlen(support_http_header(&resp, "x-mock-pad")), 1024);
    cr_assert_eq(json_num(body_json(), "usage.completion_tokens"), 16);
}

Test(proxy, all_backends_down_is_502_then_503_when_ejected)
{
    start_two(NULL, NULL);
    support_proc_stop(&mock_a);
    support_proc_stop(&mock_b);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(502, "upstream_connect_failed");
    /* After three failures each, both circuits are open: nothing to try. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(503, "no_backend_available");
    /* ... for 5 s: the answer says when to come back, as the SDKs read it. */
    const char *ms = support_http_header(&resp, "retry-after-ms");
    cr_assert_not_null(ms, "no retry-after-ms");
    cr_assert(atoi(ms) > 4000 && atoi(ms) <= 5000, "retry-after-ms: %s", ms);
    cr_assert_str_eq(support_http_header(&resp, "retry-after"), "5");
}

/* A route's only backend answering 5xx: each goes to the client, and the
 * three in a row open its circuit as three resets would. */
Test(proxy, five_hundreds_from_the_last_candidate_open_its_circuit)
{
    char a[1024];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, NULL);
    start_router("limits: {max_retries: 0}", a, "a");
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-status: 500\r\n", CHAT), 0);
        cr_assert_eq(resp.status, 500);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    }
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(503, "no_backend_available");
}

/* A router whose one backend, a (mockllm), failed three times in a row
 * (closed before answering): its circuit is open for 5 s. */
static void open_the_circuit_of_a(void)
{
    char a[1024];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, NULL);
    start_router("limits: {max_retries: 0}", a, "a");
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions",
                          AUTH "x-mock-fault: close-before-response\r\n", CHAT),
                     0);
        cr_assert_eq(resp.status, 502);
    }
}

/* The half-open probe of a recovered backend belongs to a client that
 * gives up before the answer (a short client timeout against a slow first
 * request is common): the probe told nothing, so the next request probes
 * again. The backend must not stay shut out until a reload. */
Test(proxy, a_probe_whose_client_left_lets_the_next_request_probe)
{
    open_the_circuit_of_a();
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(503, "no_backend_available"); /* open for 5 s */
    usleep(5200 * 1000);

    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-ttft-ms: 3000\r\n", CHAT),
                 0);
    /* the probe's client gives up */
    cr_assert_eq(support_http_send_and_leave(router.port, req.data, req.len, 300), 0);
    usleep(200 * 1000);

    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "after the new probe closed the circuit");
}

/* A burst when the circuit turns half-open: all its requests chose the
 * backend as the probe before any began there. Only the first to begin
 * is the probe; the others choose again and, with the probe out and no
 * other candidate, are told to come back. */
Test(proxy, a_burst_at_half_open_sends_one_probe)
{
    struct support_http_conn conns[6];
    struct support_http_response r = {0};
    int served = 0, refused = 0;

    open_the_circuit_of_a();
    usleep(5200 * 1000); /* the circuit is half-open */
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-ttft-ms: 300\r\n", CHAT),
                 0);
    for (int i = 0; i < 6; i++)
        cr_assert_eq(support_http_connect(&conns[i], router.port), 0);
    for (int i = 0; i < 6; i++) /* back to back: one read of the router's, or few */
        cr_assert_eq(support_http_send(&conns[i], req.data, req.len), 0);
    for (int i = 0; i < 6; i++) {
        cr_assert_eq(support_http_read(&conns[i], &r, TIMEOUT_MS), 0);
        served += r.status == 200;
        refused += r.status == 503;
        support_http_response_free(&r);
        support_http_close(&conns[i]);
    }
    cr_assert_eq(served, 1, "%d requests went to the half-open backend", served);
    cr_assert_eq(refused, 5);
}

Test(proxy, stalled_upstream_gives_504_after_first_byte_timeout)
{
    char a[1024];

    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "stall", NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, "    first_byte_timeout_ms: 300\n");
    start_router("limits: {max_retries: 0}", a, "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(504, "upstream_timeout");
    cr_assert_lt(resp.total_ms, 3000.0);
}

/* A pooled connection that times out waiting for its first byte was not
 * closed under the router: the backend has the request and is working
 * on it. Only a reset or close is sent again on a fresh connection; a
 * timeout is the backend's failure, so the backend is not sent (and an
 * API does not bill) the request twice, nor the client kept waiting for
 * two timeouts. */
Test(proxy, a_pooled_connection_that_times_out_is_not_sent_again)
{
    char a[1024];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, "    first_byte_timeout_ms: 300\n");
    start_router("admin_key: " ADMIN_KEY "\nlimits: {max_retries: 0}", a, "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    wait_pool_idle(1);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-fault: stall\r\n", CHAT), 0);
    assert_error(504, "upstream_timeout");
    /* Two requests on the one pooled connection (the second connection
     * counted is this stats call's own): the stalled one went once. */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 2, "%.*s", (int)resp.body.len,
                 resp.body.data);
    cr_assert_eq(json_num(json, "connections"), 2, "%.*s", (int)resp.body.len, resp.body.data);
}

/* An API backend that has the whole request and times out may still serve
 * and bill it, though b serves the client and no request is charged it:
 * counted in costrouter_backend_abandoned_total, per backend, so that an
 * operator can set the invoice against the charges. */
Test(proxy, an_api_attempt_that_times_out_after_its_request_is_counted_abandoned)
{
    char a[1024], b[1024], both[2100];

    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "stall", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    backend_yaml_priced(a, sizeof(a), "a", mock_a.port, 1, "    first_byte_timeout_ms: 300\n");
    backend_yaml_priced(b, sizeof(b), "b", mock_b.port, 10, NULL);
    snprintf(both, sizeof(both), "%s%s", a, b);
    start_router("admin_key: " ADMIN_KEY, both, "a, b");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_eq(metric_value("costrouter_backend_abandoned_total{backend=\"a\"}"), 1);
    cr_assert(isnan(support_metrics_value(&resp, "costrouter_backend_abandoned_total{backend=\"b\"}")));
}

/* A plain answer is held until it ends: one cut after its head has shown
 * the client nothing, so the next candidate serves it, and the cut
 * attempt is not charged. */
Test(proxy, a_plain_answer_cut_after_its_head_falls_back)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "close-midstream", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    start_router_ab(NULL, NULL);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_eq(json_num(body_json(), "usage.completion_tokens"), 16);
}

/* Backends a and b for mocks A and B, the one named `dearer` ten times
 * dearer: the other is the choice whenever it qualifies, whatever their
 * latencies. */
static void dearer_yaml(char *both, size_t size, const char *dearer)
{
    char a[1024], b[1024];

    backend_yaml_priced(a, sizeof(a), "a", mock_a.port, strcmp(dearer, "a") == 0 ? 10 : 1, NULL);
    backend_yaml_priced(b, sizeof(b), "b", mock_b.port, strcmp(dearer, "b") == 0 ? 10 : 1, NULL);
    snprintf(both, size, "%s%s", a, b);
}

/* The router in front of `backends`, candidates "a, b", its tenant's
 * entry ending with `tenant` (YAML lines). */
static void start_router_tenant(const char *backends, const char *tenant)
{
    char hex[65];

    support_key_sha256_hex(TENANT_KEY, hex);
    start_router_with("listen: 127.0.0.1:0\n"
                      "backends:\n%s\n"
                      "routes:\n"
                      "  - model: chat\n"
                      "    candidates: [a, b]\n"
                      "tenants:\n"
                      "  - id: t1\n"
                      "    api_keys: [\"sha256:%s\"]\n"
                      "%s",
                      backends, hex, tenant);
}

/* Mocks A and B, B ten times dearer, and the router in front of them,
 * its tenant's entry ending with `tenant` (YAML lines). */
static void start_two_b_dearer(const char *tenant)
{
    char both[2100];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    dearer_yaml(both, sizeof(both), "b");
    start_router_tenant(both, tenant);
}

/* The router in front of them, candidates "a, b". */
static void start_router_dearer(const char *limits, const char *dearer)
{
    char both[2100];

    dearer_yaml(both, sizeof(both), dearer);
    start_router(limits, both, "a, b");
}

/* vLLM's and TGI's servers send a stream's head at once, its first event
 * with its first token. A backend stuck before that (a=mock A, its first
 * token 3 s away, first_byte_timeout_ms 300) sent its head, which went to
 * the client at once: first_byte_timeout_ms was over, the stream waited
 * for total_timeout_ms, and no other candidate could serve it. The head
 * of a stream is now held until its first event, and first_byte_timeout_ms
 * runs until then: b serves the stream, in well under 3 s. */
Test(proxy, a_stream_whose_head_comes_first_falls_back_when_its_first_event_is_late)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    struct timespec t0, t1;
    char a[1024], b[1024], both[2100];
    int rc, deltas = 0, done = 0;
    double ms;

    cr_assert_eq(support_mockllm_start(&mock_a, "--ttft-ms", "3000", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    backend_yaml_priced(a, sizeof(a), "a", mock_a.port, 1, "    first_byte_timeout_ms: 300\n");
    backend_yaml_priced(b, sizeof(b), "b", mock_b.port, 10, NULL);
    snprintf(both, sizeof(both), "%s%s", a, b);
    start_router(NULL, both, "a, b");
    clock_gettime(CLOCK_MONOTONIC, &t0);
    open_stream(&s, AUTH "x-mock-head-first: 1\r\n",
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    cr_assert_eq(s.resp.status, 200);
    cr_expect_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), "b");
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1) {
        deltas += strstr(ev.data, "delta") != NULL;
        done |= strcmp(ev.data, "[DONE]") == 0;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    support_sse_close(&s);
    ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    cr_assert_eq(rc, 0, "the stream did not end cleanly");
    cr_assert(done && deltas == 16, "%d deltas", deltas);
    cr_assert_lt(ms, 2500.0, "the stream took %.0f ms", ms);
}

/* Such a cut is a failure of the backend's like a reset before the head:
 * three in a row open its circuit, and the next request goes straight to
 * the next candidate. Its head's arrival is no success: counted as one,
 * it cleared the failures each time, and a backend that cuts every
 * answer got (and delayed) every request, its circuit never open. */
Test(proxy, plain_answers_cut_after_their_head_open_the_circuit)
{
    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "close-midstream", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    start_router_dearer(NULL, "b");
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    }
    /* The fourth was not sent to a: its circuit was open. */
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 3, "%.*s", (int)resp.body.len,
                 resp.body.data);
}

/* A 5xx or 429 goes to the next candidate only when there is one that
 * could take the request: with the others shut (here b, whose circuit
 * three connect failures opened), the client gets the backend's own
 * answer, as from a route's only backend, and not a 502 the router made
 * up: a 429 keeps its Retry-After, which the client's SDK waits for. */
Test(proxy, a_429_with_no_candidate_left_to_try_is_the_backends_own)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    start_router_dearer(NULL, "a");
    support_proc_stop(&mock_b); /* b, the cheaper, refuses connections */
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    }
    cr_assert_eq(call("POST", "/v1/chat/completions",
                      AUTH "x-mock-status: 429\r\nx-mock-retry-after: 7\r\n", CHAT),
                 0);
    cr_assert_eq(resp.status, 429, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_str_eq(support_http_header(&resp, "retry-after"), "7");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-status: 503\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 503, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
}

/* Nor when the one left is too dear for the budget: the cheap backend's
 * 500 is the answer, not a 429 budget_exhausted that tells the client's
 * SDK not to retry (x-should-retry: false) while its budget covers the
 * backend it would go to. */
Test(proxy, a_5xx_with_only_a_fallback_beyond_the_budget_is_the_backends_own)
{
    /* About $0.0005 on a (10 prompt tokens, 256 predicted), $0.005 on b */
    start_two_b_dearer("    budget: { daily_usd: 0.002 }\n");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-status: 500\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 500, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_eq(call_port(mock_b.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 0);
    /* and the budget is what it was: the next request is served */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
}

/* Each attempt holds its own reservation, one store call each: a
 * request that falls back max_retries times makes max_retries + 1 of
 * them. The bound on store calls is for those that hold nothing (refused
 * under contention, a probe taken meanwhile); counted with them, the
 * fifth attempt of a route whose first four backends are down was
 * answered 429 budget_exhausted (insufficient_quota), to a tenant
 * without any budget. */
Test(proxy, a_fifth_attempt_is_not_refused_for_the_reservations_before_it)
{
    char yaml[5][1024], all[5200];
    const char *names[5] = {"a", "b", "c", "d", "e"};
    int down;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    down = mock_b.port;
    support_proc_stop(&mock_b); /* its port now refuses */
    for (int i = 0; i < 5; i++) /* dearer down the route: e, the one up, is last */
        backend_yaml_priced(yaml[i], sizeof(yaml[i]), names[i], i < 4 ? down : mock_a.port,
                            i + 1, NULL);
    snprintf(all, sizeof(all), "%s%s%s%s%s", yaml[0], yaml[1], yaml[2], yaml[3], yaml[4]);
    start_router("limits: {max_retries: 4}", all, "a, b, c, d, e");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "e");
}

/* A backend's 4xx refusal (a request it finds invalid, too long, ...)
 * comes as fast as it validates, whatever its time to first token: no
 * latency sample, as a 429 is none. Taken as one, a few refused requests
 * pulled the average of a slow backend down to a few ms, and requests of
 * a tenant whose SLO it breaks went on to it, one slow answer after
 * another, while the average crept back up. */
Test(proxy, a_fast_4xx_refusal_is_no_ttft_sample)
{
    start_two_b_dearer("    slo: { max_ttft_ms: 200 }\n");
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-status: 400\r\n", CHAT), 0);
        cr_assert_eq(resp.status, 400);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    }
    /* a's real time to first token: 400 ms, twice the SLO */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-ttft-ms: 400\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-ttft-ms: 400\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b",
                     "a's average said it meets the SLO");
}

/* A stream whose head comes at once and whose first token 400 ms later
 * (as vLLM's server sends them), read to its end; returns the backend
 * that served it. */
static const char *stream_served_by(struct support_sse *s)
{
    struct support_sse_event ev;
    static char name[16];

    open_stream(s, AUTH "x-mock-head-first: 1\r\nx-mock-ttft-ms: 400\r\n",
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    cr_assert_eq(s->resp.status, 200);
    snprintf(name, sizeof(name), "%s", support_http_header(&s->resp, "x-costrouter-backend"));
    while (support_sse_next(s, &ev, TIMEOUT_MS) == 1)
        ;
    support_sse_close(s);
    return name;
}

/* Nor is a stream's head: a server may send it before its first token
 * (vLLM's does, however long its queue). A backend 400 ms to its first
 * token was taken, by its heads, for one of a few ms, and got every
 * stream of a tenant whose 200 ms SLO it breaks. */
Test(proxy, a_streams_ttft_is_its_first_tokens_not_its_heads)
{
    struct support_sse s = {0};

    start_two_b_dearer("    slo: { max_ttft_ms: 200 }\n");
    cr_assert_str_eq(stream_served_by(&s), "a"); /* no average yet */
    cr_assert_str_eq(stream_served_by(&s), "b", "a's average said it meets the SLO");
}

/* A stream that its backend breaks (here: closes after three tokens)
 * cannot go to another candidate, its client has part of it; but it is
 * the backend's failure all the same: three in a row open its circuit,
 * and the next stream goes to the next candidate. Its head, which came,
 * is no success: counted as one, it cleared the failures each time. */
Test(proxy, streams_their_backend_breaks_open_its_circuit)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int rc;

    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "close-midstream", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    start_router_dearer(NULL, "b");
    for (int i = 0; i < 4; i++) {
        open_stream(&s, AUTH, "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
        cr_assert_eq(s.resp.status, 200);
        cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), i < 3 ? "a" : "b",
                         "stream %d", i);
        while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
            ;
        support_sse_close(&s);
        cr_assert(i < 3 ? rc != 0 : rc == 0, "stream %d: rc %d", i, rc);
    }
}

/* The same when the cheap backend is down: the client learns that it is
 * (502, which its SDK retries), not that its budget is spent. */
Test(proxy, a_connect_failure_with_only_a_fallback_beyond_the_budget_is_a_502)
{
    start_two_b_dearer("    budget: { daily_usd: 0.002 }\n");
    support_proc_stop(&mock_a); /* a refuses connections */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(502, "upstream_connect_failed");
    cr_assert_null(support_http_header(&resp, "x-should-retry"));
}

/* Bodies the router would read differently from the backend: a string
 * with U+0000 (its C string ends there, so the prompt would be counted
 * and priced cut short) and text after the JSON value. Both 400; an
 * escaped backslash before "u0000" and trailing white space are fine. */
Test(proxy, bodies_read_two_ways_are_refused)
{
    start_two(NULL, NULL);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                      "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\","
                      "\"content\":\"hi\\u0000 and 100 KB more\"}]}"),
                 0);
    assert_error(400, "invalid_json");
    cr_assert_not_null(strstr(json_str(json, "error.message"), "U+0000"));
    /* an escaped backslash, then an escaped U+0000 */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                      "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\","
                      "\"content\":\"C:\\\\\\u0000\"}]}"),
                 0);
    assert_error(400, "invalid_json");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                      "{\"model\":\"chat\",\"messages\":[]} {\"model\":\"other\"}"),
                 0);
    assert_error(400, "invalid_json");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                      "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\","
                      "\"content\":\"a path C:\\\\u0000\"}]} \r\n"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}

Test(proxy, upstream_dying_mid_stream_is_an_error_event_not_a_clean_end)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int rc, saw_error = 0, saw_done = 0;

    start_two(NULL, NULL);
    open_stream(&s, AUTH "x-mock-fault: close-midstream\r\n",
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    cr_assert_eq(s.resp.status, 200);
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1) {
        if (strstr(ev.data, "\"error\""))
            saw_error = 1;
        if (strcmp(ev.data, "[DONE]") == 0)
            saw_done = 1;
    }
    support_sse_close(&s);
    cr_assert(saw_error, "no SSE error event");
    cr_assert_not(saw_done);
    cr_assert_neq(rc, 0, "the stream ended as if it were complete");
}

/* ---- what crosses the router from a raw upstream ---- */

#define OK_BODY                                                                                \
    "{\"choices\":[{\"message\":{\"content\":\"hi\"}}],"                                          \
    "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}"
#define OK_ANSWER(headers)                                                                     \
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" headers "Content-Length: 92\r\n"  \
    "Connection: close\r\n\r\n" OK_BODY
/* A whole response, to be sent as if it were the body of something else. */
#define INJECTED                                                                               \
    "HTTP/1.1 200 OK\r\nx-costrouter-backend: injected\r\nContent-Length: 19\r\n\r\n"           \
    "{\"injected\":\"yes\"}\n"

static void start_canned(const char *answer)
{
    canned = support_canned_start(answer, strlen(answer));
    cr_assert_not_null(canned);
}

/* The router in front of a canned upstream (a) that answers `answer`,
 * then mockllm (b). */
static void start_canned_then_b(const char *answer)
{
    char a[1024], b[1024], both[2100];

    start_canned(answer);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    backend_yaml(a, sizeof(a), "a", support_canned_port(canned), NULL);
    backend_yaml(b, sizeof(b), "b", mock_b.port, NULL);
    snprintf(both, sizeof(both), "%s%s", a, b);
    start_router(NULL, both, "a, b");
}

/* The response a canned upstream's `answer` becomes, through the router
 * (resp; its raw bytes NUL-terminated, for the messages). */
static void answer_through_router(const char *answer)
{
    char a[1024];

    start_canned(answer);
    start_router(NULL, backend_yaml(a, sizeof(a), "a", support_canned_port(canned), NULL), "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(buf_append(&resp.raw, "", 1), 0);
}

/* An Anthropic client's SDK reads request-id (error.request_id). A
 * backend's own (Anthropic's, which its support knows) goes on as it
 * came; an Anthropic-compatible backend that sends none (mockllm, like
 * many servers) gets the router's, the id of the request's cost log line,
 * as the router's own answers carry it. */
Test(proxy, an_anthropic_answer_carries_the_backends_request_id_or_the_routers)
{
    static const char body[] = "{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\","
                               "\"content\":[],\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}";
    static const char msg[] =
        "{\"model\":\"chat\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    char a[1024], answer[512];

    snprintf(answer, sizeof(answer),
             "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nrequest-id: req_011abc\r\n"
             "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
             strlen(body), body);
    start_canned(answer);
    start_router(NULL,
                 backend_yaml(a, sizeof(a), "a", support_canned_port(canned),
                              "    api: anthropic\n"),
                 "a");
    cr_assert_eq(call("POST", "/v1/messages", AUTH, msg), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "request-id"), "req_011abc");
    cr_assert_eq(strncmp(support_http_header(&resp, "x-request-id"), "cr-", 3), 0);
    support_proc_stop(&router);
    unlink(conf_path);

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(NULL, backend_yaml(a, sizeof(a), "a", mock_a.port, "    api: anthropic\n"),
                 "a");
    cr_assert_eq(call("POST", "/v1/messages", AUTH, msg), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_not_null(support_http_header(&resp, "request-id"), "no request-id");
    cr_assert_str_eq(support_http_header(&resp, "request-id"),
                     support_http_header(&resp, "x-request-id"));
    /* Nor is a chat answer given one: OpenAI's API has x-request-id alone. */
    support_proc_stop(&router);
    unlink(conf_path);
    start_router(NULL, backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_null(support_http_header(&resp, "request-id"));
}

/* An answer without Content-Length or chunks ends when its connection
 * does: with a close, not with a reset, which is a backend that broke.
 * Taken for its end, a stream cut so looked complete (its cost comment,
 * its last chunk) and a plain answer cut so went out, truncated, as a
 * 200: the stream must end with an error event and no last chunk, and
 * the plain answer, which nobody has seen, goes to the next candidate. */
Test(proxy, an_answer_ended_by_its_connection_is_broken_by_a_reset)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int rc, saw_error = 0, events = 0;

    start_canned_then_b("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
                        "{\"choices\":[{\"message\":{\"content\":\"the start of");
    support_canned_reset(canned, 1);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b", "%.*s",
                     (int)resp.body.len, resp.body.data);
    cr_assert_eq(json_num(body_json(), "usage.completion_tokens"), 16);

    support_canned_set(canned,
                       "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                       "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
                       "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
                       strlen("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                              "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
                              "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"));
    support_canned_reset(canned, 1);
    open_stream(&s, AUTH, "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    cr_assert_eq(s.resp.status, 200);
    cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), "a");
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1) {
        events += strstr(ev.data, "delta") != NULL;
        saw_error |= strstr(ev.data, "\"error\"") != NULL;
    }
    support_sse_close(&s);
    cr_assert_eq(events, 2);
    cr_assert(saw_error, "no SSE error event");
    cr_assert_neq(rc, 0, "the stream ended as if it were complete");
}

/* A keep-alive answer: the router pools its connection. */
#define KEEP_ANSWER                                                                            \
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 92\r\n\r\n" OK_BODY

/* A canned backend (a, the route's only one, max_retries 0) keeps its
 * first connection for a second request and answers that with `closing`
 * (len bytes) as it closes it: the keep-alive race, a server closing an
 * idle connection just as the router reuses it. The request was never
 * handled: it goes again, once, on a fresh connection to the same
 * backend, which answers it; that is no failure of the backend, and the
 * request is charged once. */
static void assert_reused_connection_closing_is_resent(const char *closing, size_t len)
{
    char a[1024], cost[32];

    start_canned(KEEP_ANSWER);
    support_canned_reuse(canned, closing, len);
    start_router("admin_key: " ADMIN_KEY "\nlimits: {max_retries: 0}",
                 backend_yaml(a, sizeof(a), "a", support_canned_port(canned), NULL), "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    snprintf(cost, sizeof(cost), "%s", support_http_header(&resp, "x-costrouter-cost-usd"));
    wait_pool_idle(1);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "the client got the closing connection's answer: %.*s",
                 (int)resp.raw.len, resp.raw.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-cost-usd"), cost);
    cr_assert_eq(support_canned_requests(canned), 3, "sent %d times, not once again",
                 support_canned_requests(canned) - 1);
    cr_assert_eq(call("GET", "/admin/backends", ADMIN, NULL), 0);
    cr_assert_eq(json_num(cJSON_GetArrayItem(body_json(), 0), "consecutive_failures"), 0);
}

/* RFC 9110 15.5.9: a 408 says the server did not get the request (Node's
 * server sends one, with Connection: close, on a keep-alive connection
 * it times out); the client may send it again. Passed on, the client got
 * a 408 for a request no backend had seen. */
Test(proxy, a_408_closing_a_reused_connection_is_sent_again_on_a_fresh_one)
{
    static const char closing[] = "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n";

    assert_reused_connection_closing_is_resent(closing, sizeof(closing) - 1);
}

/* The same race without a word: the server closes as the request comes. */
Test(proxy, a_reused_connection_closed_unanswered_is_sent_again_on_a_fresh_one)
{
    assert_reused_connection_closing_is_resent("", 0);
}

/* A 408 on a fresh connection: the backend did not take a request the
 * router sent whole, at once. It did not handle it, so another candidate
 * may, as after a 5xx; passed on, the client got a 408 for its request
 * while backend b was there to serve it. */
Test(proxy, a_408_on_a_fresh_connection_goes_to_the_next_candidate)
{
    start_canned_then_b("HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.raw.len, resp.raw.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_eq(support_canned_requests(canned), 1);
}

/* A 200 stream that ends before its first byte (its head, then the end
 * of a body of 0 bytes, or the connection closed) is no answer: no event,
 * no end of stream. Its head is held until a first byte, so the client
 * has seen nothing: a failure, served by the next candidate, as a cut
 * before the first byte is. It went to the client as an empty 200 whose
 * cost rode in a Content-Length head, and was charged its prompt. */
Test(proxy, a_stream_that_ends_before_its_first_byte_goes_to_the_next_candidate)
{
    static const char *const empty[] = {
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
    };

    start_canned_then_b("");
    for (int i = 0; i < 2; i++) {
        support_canned_set(canned, empty[i], strlen(empty[i]));
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH,
                          "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}"),
                     0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.raw.len, resp.raw.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b", "case %d: %.*s",
                         i, (int)resp.raw.len, resp.raw.data);
        cr_assert_not_null(memmem(resp.body.data, resp.body.len, "data: [DONE]", 12),
                           "case %d: %.*s", i, (int)resp.body.len, resp.body.data);
        cr_assert_eq(support_canned_requests(canned), i + 1);
    }
}

/* A 1xx carrying a body (150, 199, and 099, which is no status at all)
 * is a bad response: the client gets the next candidate's answer, never
 * the bytes the backend passed off as that body, on a connection that
 * stays in step. */
Test(proxy, a_1xx_with_a_body_is_a_bad_response_not_an_injected_answer)
{
    static const char *const status[] = {"150", "199", "099"};
    struct support_http_conn c;
    char answer[512];

    start_canned_then_b("");
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    for (int i = 0; i < 3; i++) {
        snprintf(answer, sizeof(answer), "HTTP/1.1 %s X\r\nContent-Length: %zu\r\n\r\n%s",
                 status[i], strlen(INJECTED), INJECTED);
        support_canned_set(canned, answer, strlen(answer));
        buf_reset(&req);
        cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", AUTH, CHAT), 0);
        cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
        support_http_response_free(&resp);
        cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0, "status %s: no answer",
                     status[i]);
        cr_assert_eq(support_canned_requests(canned), i + 1, "status %s: a not tried", status[i]);
        cr_assert_null(memmem(resp.raw.data, resp.raw.len, "injected", 8),
                       "status %s: the backend's bytes reached the client: %.*s", status[i],
                       (int)resp.raw.len, resp.raw.data);
        cr_assert_eq(resp.status, 200, "status %s: %d", status[i], resp.status);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    }
    support_http_close(&c);
}

/* A status below 100 is no interim head to skip, even without a body:
 * the answer after it is not trusted, the next candidate serves. */
Test(proxy, a_status_below_100_is_a_bad_response)
{
    start_canned_then_b("HTTP/1.1 099 X\r\n\r\n" OK_ANSWER("X-From: a\r\n"));
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(support_canned_requests(canned), 1);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_null(support_http_header(&resp, "x-from"));
}

/* Nor is one above 599 (no status class says what it means): from the
 * only candidate, the client gets a 502, not a 999. */
Test(proxy, a_status_above_599_is_a_bad_response)
{
    char a[1024];

    start_canned("HTTP/1.1 999 Server Error\r\nContent-Length: 0\r\n\r\n");
    start_router("limits: {max_retries: 0}",
                 backend_yaml(a, sizeof(a), "a", support_canned_port(canned), NULL), "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(502, "upstream_error");
}

/* 100 and 103 without a body are followed by the real answer, which the
 * client gets alone: no interim head, none of the 103's headers. */
Test(proxy, interim_1xx_heads_are_skipped_and_the_real_answer_follows)
{
    answer_through_router("HTTP/1.1 100 Continue\r\n\r\n"
                          "HTTP/1.1 103 Early Hints\r\nLink: </hint>\r\n\r\n" OK_ANSWER(""));
    cr_assert_eq(strncmp(resp.raw.data, "HTTP/1.1 200", 12), 0, "%.*s", (int)resp.raw.len,
                 resp.raw.data);
    cr_assert_null(support_http_header(&resp, "link"));
    cr_assert_eq(resp.body.len, strlen(OK_BODY), "%s", resp.raw.data);
}

/* The lines of `head` named `name` (case-insensitive): how many, and the
 * first one's value into value (size n). */
static int head_lines(const char *head, const char *name, char *value, size_t n)
{
    size_t len = strlen(name);
    int count = 0;

    if (value)
        value[0] = '\0';
    for (const char *p = head; p && *p; p = strstr(p, "\r\n"), p = p ? p + 2 : NULL) {
        if (strncasecmp(p, name, len) != 0 || p[len] != ':')
            continue;
        if (count++ == 0 && value) {
            const char *v = p + len + 1 + strspn(p + len + 1, " ");
            snprintf(value, n, "%.*s", (int)strcspn(v, "\r"), v);
        }
    }
    return count;
}

/* The request head a canned upstream got for one chat request with the
 * client's `headers`, its backend configured with `extra`. */
static const char *head_sent_for(const char *headers, const char *extra)
{
    char a[1024];

    start_canned(OK_ANSWER(""));
    start_router(NULL, backend_yaml(a, sizeof(a), "a", support_canned_port(canned), extra), "a");
    cr_assert_eq(call("POST", "/v1/chat/completions", headers, CHAT), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(support_canned_requests(canned), 1);
    return support_canned_heads(canned);
}

/* llhttp takes a TAB, a form feed and raw UTF-8 in a request target
 * (its lenient URL characters), which RFC 9112 3.2 does not: forwarded
 * as they came, the backend got a request line that h11 (uvicorn's
 * servers), Go and others refuse, or split at the TAB, and the client
 * its 400 for a query that went through before queries were passed on.
 * They go on percent-encoded, as a browser sends them. */
Test(proxy, a_query_with_bytes_no_request_line_may_hold_goes_on_percent_encoded)
{
    char a[1024];
    char line[256];
    const char *head, *eol;

    start_canned(OK_ANSWER(""));
    start_router(NULL, backend_yaml(a, sizeof(a), "a", support_canned_port(canned), NULL), "a");
    cr_assert_eq(call("POST", "/v1/chat/completions?q=caf\xc3\xa9&t=a\tb&f=\x0c&p=%41", AUTH, CHAT),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.raw.len, resp.raw.data);
    head = support_canned_heads(canned);
    eol = strstr(head, "\r\n");
    cr_assert_not_null(eol);
    snprintf(line, sizeof(line), "%.*s", (int)(eol - head), head);
    cr_assert_str_eq(line, "POST /v1/chat/completions?q=caf%C3%A9&t=a%09b&f=%0C&p=%41 HTTP/1.1");
}

/* Connection names headers of the client's hop only (RFC 9110 7.6.1):
 * they stay behind, before or after it, and so does HTTP2-Settings. */
Test(proxy, headers_the_clients_connection_names_are_not_forwarded)
{
    const char *head = head_sent_for(AUTH "X-Early: e\r\nConnection: keep-alive, X-Early, x-hop\r\n"
                                          "X-Hop: h\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
                                          "X-Kept: yes\r\n",
                                     NULL);
    char v[64];

    cr_assert_eq(head_lines(head, "x-hop", NULL, 0), 0, "%s", head);
    cr_assert_eq(head_lines(head, "x-early", NULL, 0), 0, "%s", head);
    cr_assert_eq(head_lines(head, "http2-settings", NULL, 0), 0, "%s", head);
    cr_assert_eq(head_lines(head, "connection", NULL, 0), 0, "%s", head);
    cr_assert_eq(head_lines(head, "x-kept", v, sizeof(v)), 1, "%s", head);
    cr_assert_str_eq(v, "yes");
}

/* A backend's Connection names headers of its hop to the router, before
 * or after it: they go no further. */
Test(proxy, headers_a_backends_connection_names_stay_behind)
{
    answer_through_router(OK_ANSWER("X-Early-Hop: e\r\nConnection: X-Secret-Hop, x-early-hop\r\n"
                                    "X-Secret-Hop: internal\r\nX-Kept: yes\r\n"
                                    "Set-Cookie: __cf_bm=backend; path=/\r\n"));
    cr_assert_null(support_http_header(&resp, "x-secret-hop"), "%s", resp.raw.data);
    cr_assert_null(support_http_header(&resp, "x-early-hop"), "%s", resp.raw.data);
    /* The client's cookies are not sent on, nor are the backend's sent back. */
    cr_assert_null(support_http_header(&resp, "set-cookie"), "%s", resp.raw.data);
    cr_assert_str_eq(support_http_header(&resp, "x-kept"), "yes");
}

/* A client's copy of the backend's key header never follows the
 * router's: the backend might read either. */
Test(proxy, a_clients_copy_of_the_backends_key_header_is_not_forwarded)
{
    const char *head = head_sent_for(AUTH "X-Goog-Api-Key: TENANT-SUPPLIED\r\n",
                                     "    auth_header: x-goog-api-key\n");
    char v[64];

    cr_assert_eq(head_lines(head, "x-goog-api-key", v, sizeof(v)), 1, "%s", head);
    cr_assert_str_eq(v, "sk-upstream-a");
    cr_assert_null(strstr(head, "TENANT-SUPPLIED"), "%s", head);
}

/* The router sets x-request-id and Content-Type itself; the client's
 * go no further, so the backend sees one of each. */
Test(proxy, the_clients_request_id_and_content_type_are_not_sent_twice)
{
    const char *head =
        head_sent_for(AUTH "x-request-id: spoofed\r\nContent-Type: text/plain\r\n", NULL);
    char v[64];

    cr_assert_eq(head_lines(head, "x-request-id", v, sizeof(v)), 1, "%s", head);
    cr_assert_eq(strncmp(v, "cr-", 3), 0, "%s", head);
    cr_assert_eq(head_lines(head, "content-type", v, sizeof(v)), 1, "%s", head);
    cr_assert_str_eq(v, "application/json");
}

/* x-costrouter-* headers are the router's word to the client; a
 * backend's (a saving, a budget) never pass for it. */
Test(proxy, a_backends_x_costrouter_headers_stay_behind)
{
    answer_through_router(OK_ANSWER("x-costrouter-saved-usd: 99\r\n"
                                    "X-Costrouter-Budget-Remaining-Usd: 1000\r\n"
                                    "x-costrouter-backend: gpu\r\nX-Kept: yes\r\n"));
    cr_assert_null(support_http_header(&resp, "x-costrouter-saved-usd"), "%s", resp.raw.data);
    cr_assert_null(support_http_header(&resp, "x-costrouter-budget-remaining-usd"), "%s",
                   resp.raw.data);
    cr_assert_eq(head_lines(resp.raw.data, "x-costrouter-backend", NULL, 0), 1, "%s",
                 resp.raw.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_str_eq(support_http_header(&resp, "x-kept"), "yes");
}

/* ---- TLS upstream ---- */

static void start_tls(int pin_ca)
{
    char a[2048], extra[512], cert[300], key[300];

    cr_assert_eq(support_make_test_ca(ca_dir, sizeof(ca_dir)), 0);
    snprintf(cert, sizeof(cert), "%s/server.crt", ca_dir);
    snprintf(key, sizeof(key), "%s/server.key", ca_dir);
    cr_assert_eq(support_mockllm_start(&mock_a, "--tls-cert", cert, "--tls-key", key, NULL), 0);
    snprintf(extra, sizeof(extra), pin_ca ? "    ca_file: %s/ca.crt\n" : "", ca_dir);
    snprintf(a, sizeof(a),
             "  - name: tls\n    kind: api\n    url: https://localhost:%d/v1\n"
             "    model: m\n    api_key: sk-up\n    quality: 1\n    context_window: 1000\n"
             "    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\n%s",
             mock_a.port, extra);
    start_router("limits: {max_retries: 0}", a, "tls");
}

Test(proxy, tls_upstream_with_pinned_ca_streams)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int n = 0;

    start_tls(1);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_gt(json_num(body_json(), "usage.completion_tokens"), 0);
    open_stream(&s, AUTH, "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
        n++;
    support_sse_close(&s);
    cr_assert_gt(n, 2);
}

Test(proxy, tls_upstream_with_unknown_ca_is_refused)
{
    start_tls(0);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    assert_error(502, "upstream_connect_failed");
}

Test(proxy, expect_100_continue_is_answered_before_the_body)
{
    struct support_http_conn c;
    const char head[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" AUTH
                        "Content-Type: application/json\r\nExpect: 100-continue\r\n"
                        "Content-Length: 70\r\n\r\n";
    const char body[] = "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hello there!\"}]}";

    cr_assert_eq(strlen(body), 70);
    start_two(NULL, NULL);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, head, sizeof(head) - 1), 0);
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    cr_assert_eq(resp.status, 100);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_send(&c, body, sizeof(body) - 1), 0);
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    support_http_close(&c);
}

/* A request the router will refuse whatever its body holds (no tenant
 * key it knows, an unknown path, a wrong method) is refused on its head
 * when it asks to wait for 100 Continue: the client (curl, for a body
 * over 1 MB) learns at once instead of sending the whole body first. It
 * got 100 Continue, then the refusal once the body was read. */
Test(proxy, expect_100_continue_refused_on_its_head)
{
    static const char *const heads[] = {
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        "Authorization: Bearer sk-not-a-tenant\r\n",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        "POST /v1/nowhere HTTP/1.1\r\nHost: x\r\n" AUTH,
        "PUT /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" AUTH,
    };
    static const int statuses[] = {401, 401, 404, 405};
    struct buf head = {0};

    start_two(NULL, NULL);
    for (size_t i = 0; i < sizeof(heads) / sizeof(heads[0]); i++) {
        struct support_http_conn c;

        buf_reset(&head);
        cr_assert_eq(buf_printf(&head, "%sExpect: 100-continue\r\nContent-Length: 69\r\n\r\n",
                                heads[i]),
                     0);
        cr_assert_eq(support_http_connect(&c, router.port), 0);
        cr_assert_eq(support_http_send(&c, head.data, head.len), 0);
        cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0, "request %zu", i);
        cr_assert_eq(resp.status, statuses[i], "request %zu: %d", i, resp.status);
        support_http_response_free(&resp);
        support_http_close(&c);
    }
    buf_free(&head);
    /* The tenant's own request still gets its 100 (expect_100_continue_...). */
}

/* An HTTP/1.0 client knows no 1xx answer: it would take a 100 Continue
 * for the final answer and the real one for garbage after it. RFC 9110
 * 10.1.1: a server ignores 100-continue in an HTTP/1.0 request. */
Test(proxy, expect_100_continue_from_an_http10_client_is_ignored)
{
    struct support_http_conn c;
    const char request[] = "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n" AUTH
                           "Expect: 100-continue\r\nContent-Length: 69\r\n\r\n" CHAT;
    struct buf out = {0};

    cr_assert_eq(strlen(CHAT), 69);
    start_two(NULL, NULL);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, request, sizeof(request) - 1), 0);
    read_to_close(&c, &out);
    support_http_close(&c);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    cr_assert_eq(strncmp(out.data, "HTTP/1.1 200 ", 13), 0, "%s", out.data);
    buf_free(&out);
}

/* A request target in absolute form (http://HOST/PATH, as a client sends
 * to a proxy: HTTP_PROXY pointing at the router) names the same resource
 * as its path (RFC 9112 3.2.2: a server MUST accept it). It was a 404
 * "unknown path": the router took the whole URL for the path. */
Test(proxy, an_absolute_form_request_target_is_its_path)
{
    static const char *const requests[] = {
        "GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "GET HTTPS://example.com:8443/healthz?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "POST http://127.0.0.1/v1/chat/completions HTTP/1.1\r\nHost: x\r\n" AUTH
        "Content-Length: 69\r\n\r\n" CHAT,
    };
    struct support_http_conn c;

    cr_assert_eq(strlen(CHAT), 69);
    start_two(NULL, NULL);
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    for (size_t i = 0; i < sizeof(requests) / sizeof(requests[0]); i++) {
        cr_assert_eq(support_http_send(&c, requests[i], strlen(requests[i])), 0);
        cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0, "request %zu", i);
        cr_assert_eq(resp.status, 200, "request %zu: %d %.*s", i, resp.status,
                     (int)resp.body.len, resp.body.data);
        support_http_response_free(&resp);
    }
    support_http_close(&c);
    /* A fragment after the authority is refused as after a path. */
    cr_assert_eq(call("GET", "http://127.0.0.1#x", NULL, NULL), 0);
    cr_assert_eq(resp.status, 400);
}

Test(proxy, sigterm_lets_a_stream_in_flight_finish)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int rc, n = 0;

    start_two(NULL, NULL);
    open_stream(&s, AUTH "x-mock-tokens: 10\r\nx-mock-token-delay-ms: 40\r\n",
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    cr_assert_eq(support_sse_next(&s, &ev, TIMEOUT_MS), 1);
    kill(router.pid, SIGTERM);
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        n++;
    support_sse_close(&s);
    cr_assert_eq(rc, 0, "stream cut by shutdown: %d", rc);
    cr_assert_eq(n, 10, "9 more tokens and [DONE], got %d", n);
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "router exit status %d", router.status);
}

/* SIGTERM after SIGTERM while the router stops: it still exits cleanly.
 * Closing its signal watchers puts the default action back, so a signal
 * at that moment used to kill it (about one exit in ten, more under
 * ASan); twenty stops make a regression show. */
Test(proxy, repeated_sigterm_while_stopping_is_a_clean_exit)
{
    struct timespec gap = {0, 50000};
    char a[1024];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, NULL);
    for (int i = 0; i < 20; i++) {
        int status = 0;
        pid_t pid;

        start_router(NULL, a, "a");
        pid = router.pid;
        while (waitpid(pid, &status, WNOHANG) == 0) {
            kill(pid, SIGTERM);
            nanosleep(&gap, NULL);
        }
        router.pid = 0; /* reaped here */
        unlink(conf_path);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "stop %d: wait status %d (killed by signal %d)", i, status,
                  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    }
}

Test(proxy, a_taken_port_is_an_error_exit_not_a_hang)
{
    char second[64], line[128];
    FILE *in, *out;
    int fd;

    start_two(NULL, NULL);
    /* The same config with the first router's port made explicit. */
    strcpy(second, "/tmp/costrouter-test2-XXXXXX");
    fd = mkstemp(second);
    cr_assert_geq(fd, 0);
    out = fdopen(fd, "w");
    in = fopen(conf_path, "r");
    cr_assert_not_null(in);
    while (fgets(line, sizeof(line), in))
        if (strncmp(line, "listen:", 7) == 0)
            fprintf(out, "listen: 127.0.0.1:%d\n", router.port);
        else
            fputs(line, out);
    fclose(in);
    fclose(out);
    char *argv[] = {getenv("COSTROUTER_BIN"), "-q", "-c", second, NULL};
    int rc = support_run(argv, NULL, 5000);
    unlink(second);
    cr_assert_eq(rc, 1, "second router: %d (want exit 1, not a hang)", rc);
}

/* ---- the models a tenant may use ---- */

#define OTHER_KEY "sk-test-other"
#define BOT_KEY "sk-test-bot"

/* A tenant limited to `models: [mini, big]` beside one that may use
 * every route: the other routes are a 403 for it (OpenAI's answer to a
 * project without access to a model), nothing goes upstream, and
 * /v1/models lists only its own. A key of the latter limited to
 * `models: [big]` has that alone. */
Test(proxy, a_tenant_uses_only_its_models)
{
    char a[1024], hex[65], other_hex[65], bot_hex[65];

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    support_key_sha256_hex(TENANT_KEY, hex);
    support_key_sha256_hex(OTHER_KEY, other_hex);
    support_key_sha256_hex(BOT_KEY, bot_hex);
    start_router_with(
        "listen: 127.0.0.1:0\nbackends:\n%s"
        "routes:\n  - {model: chat, candidates: [a]}\n  - {model: mini, candidates: [a]}\n"
        "  - {model: big, candidates: [a]}\n"
        "tenants:\n  - {id: all, api_keys: [\"sha256:%s\", {hash: \"sha256:%s\", models: [big]}]}\n"
        "  - {id: limited, api_keys: [\"sha256:%s\"], models: [mini, big]}\n",
        backend_yaml(a, sizeof(a), "a", mock_a.port, NULL), hex, bot_hex, other_hex);

    cr_assert_eq(call("POST", "/v1/chat/completions", "Authorization: Bearer " OTHER_KEY "\r\n",
                      CHAT),
                 0);
    assert_error(403, "model_not_found");
    cr_assert_str_eq(json_str(json, "error.message"), "this key may not use this model: chat");
    cr_assert_eq(call("POST", "/v1/chat/completions", "Authorization: Bearer " OTHER_KEY "\r\n",
                      "{\"model\":\"mini\",\"messages\":[]}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "the other tenant may");
    cr_assert_eq(call_port(mock_a.port, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(json_num(body_json(), "requests"), 2, "the refused one never went upstream");

    cr_assert_eq(call("GET", "/v1/models", "Authorization: Bearer " OTHER_KEY "\r\n", NULL), 0);
    cJSON *data = cJSON_GetObjectItem(body_json(), "data");
    cr_assert_eq(cJSON_GetArraySize(data), 2);
    cr_assert_str_eq(json_str(cJSON_GetArrayItem(data, 0), "id"), "mini");
    cr_assert_str_eq(json_str(cJSON_GetArrayItem(data, 1), "id"), "big");
    cr_assert_eq(call("GET", "/v1/models", AUTH, NULL), 0);
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(body_json(), "data")), 3);

    cr_assert_eq(call("POST", "/v1/chat/completions", "Authorization: Bearer " BOT_KEY "\r\n",
                      CHAT),
                 0);
    assert_error(403, "model_not_found");
    cr_assert_eq(call("GET", "/v1/models", "Authorization: Bearer " BOT_KEY "\r\n", NULL), 0);
    data = cJSON_GetObjectItem(body_json(), "data");
    cr_assert_eq(cJSON_GetArraySize(data), 1);
    cr_assert_str_eq(json_str(cJSON_GetArrayItem(data, 0), "id"), "big");
    cr_assert_eq(call("POST", "/v1/chat/completions", "Authorization: Bearer " BOT_KEY "\r\n",
                      "{\"model\":\"big\",\"messages\":[]}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}

/* A stream whose client said stream_options.include_usage: false asks the
 * backend for the usage all the same (the charge is the usage), on the
 * backend a fallback goes to too: the first attempt's rewrite of the
 * parsed body must not pass for the client's own include_usage: true,
 * after which the second backend was sent the client's false and the
 * stream was charged by its events. */
Test(proxy, a_fallback_stream_asks_for_the_usage_the_client_turned_off)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    int saw_usage = 0;

    start_canned_then_b("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n"
                        "Connection: close\r\n\r\n{}");
    open_stream(&s, AUTH,
                "{\"model\":\"chat\",\"stream\":true,\"messages\":[],"
                "\"stream_options\":{\"include_usage\":false}}");
    cr_assert_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), "b");
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1)
        if (strstr(ev.data, "\"completion_tokens\""))
            saw_usage = 1;
    support_sse_close(&s);
    cr_assert(!saw_usage, "the client did not ask for the usage event");
    cr_assert_eq(call_port(mock_b.port, "GET", "/mock/last-request", NULL, NULL), 0);
    cJSON *sent = cJSON_Parse(json_str(body_json(), "body"));
    cr_assert_not_null(sent);
    cJSON *opts = cJSON_GetObjectItem(sent, "stream_options");
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(opts, "include_usage")),
              "backend b was not asked for the usage: %s", json_str(body_json(), "body"));
    cJSON_Delete(sent);
}

/* The unlabelled series `name` of /metrics. */
static double metric_value(const char *name)
{
    double v;

    cr_assert_eq(call("GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    v = support_metrics_value(&resp, name);
    cr_assert(v == v, "%s not in /metrics", name);
    return v;
}

/* A client that asked for Connection: close and reads none of a large
 * answer: once the answer is done the router closes after its writes
 * (client_close_after_writes), which wait for a client that never reads.
 * That wait must end (as an idle keep-alive connection's does, at
 * idle_timeout_ms), not hold the connection, its descriptor and the
 * queued answer for ever. */
Test(proxy, a_close_after_an_answer_the_client_never_reads_ends)
{
    static const char body[] = "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}";
    struct support_http_conn c;
    char a[1024], headers[256];
    int pad = pad_past_send_buffers();
    double open = -1;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, NULL);
    start_router("admin_key: " ADMIN_KEY "\n"
                 "limits: {header_timeout_ms: 300, body_timeout_ms: 300, idle_timeout_ms: 500}",
                 a, "a");
    snprintf(headers, sizeof(headers),
             AUTH "Connection: close\r\nx-mock-tokens: 1\r\nx-mock-event-pad: %d\r\n"
                  "x-mock-done-delay-ms: 300\r\n",
             pad);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(support_http_connect_rcvbuf(&c, router.port, 4096), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    wait_pool_idle(1); /* the router has read the whole answer */
    /* Well past every client timeout (idle 500 ms): the connection of
     * /metrics itself is the only one left. */
    for (int i = 0; i < 40; i++) {
        usleep(100 * 1000);
        open = metric_value("costrouter_client_connections");
        if (open <= 1)
            break;
    }
    cr_assert_leq(open, 1, "%.0f client connections still open 4 s after the answer", open);
    support_http_close(&c);
}

/* limits.max_header_bytes is about the head's bytes as sent: blanks
 * before a header's value (which llhttp skips without reporting them)
 * count as well as the value does (they were not: 200, not 431), in one
 * read or spread over many; a head just under the limit with them passes. */
Test(proxy, blanks_before_a_header_value_count_against_the_header_limit)
{
    struct buf big = {0};
    size_t n = 16384;

    start_two("limits: {max_header_bytes: 2048}", NULL);
    cr_assert_eq(buf_append_lit(&big, "x-pad:"), 0);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(buf_append(&big, " ", 1), 0);
    cr_assert_eq(buf_append(&big, "v\r\n" AUTH, sizeof("v\r\n" AUTH)), 0); /* with its NUL */
    cr_assert_eq(call("POST", "/v1/chat/completions", big.data, CHAT), 0);
    assert_error(431, "headers_too_large");
    /* Under the limit with them: served. */
    buf_reset(&big);
    cr_assert_eq(buf_append_lit(&big, "x-pad:"), 0);
    for (size_t i = 0; i < 1200; i++)
        cr_assert_eq(buf_append(&big, " ", 1), 0);
    cr_assert_eq(buf_append(&big, "v\r\n" AUTH, sizeof("v\r\n" AUTH)), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", big.data, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%d %.*s", resp.status, (int)resp.body.len, resp.body.data);
    buf_free(&big);
}

/* The same blanks sent a few at a time, so that reads end inside them,
 * before any callback of their value: 431 before the head is done. */
Test(proxy, blanks_spread_over_reads_count_against_the_header_limit)
{
    struct support_http_conn c = {.fd = -1};
    struct support_http_response r = {0};
    static const char start[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-pad:";
    char spaces[512];

    start_two("limits: {max_header_bytes: 2048}", NULL);
    memset(spaces, ' ', sizeof(spaces));
    cr_assert_eq(support_http_connect(&c, router.port), 0);
    cr_assert_eq(support_http_send(&c, start, sizeof(start) - 1), 0);
    for (int i = 0; i < 8; i++) {
        usleep(20 * 1000);
        if (support_http_send(&c, spaces, sizeof(spaces)) != 0)
            break; /* refused and closed already */
    }
    cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 431, "%d %.*s", r.status, (int)r.body.len, r.body.data);
    support_http_close(&c);
    support_http_response_free(&r);
}

/* ---- a TLS upstream that sends a record after its answer ---- */

struct tls_extra {
    int lfd;           /* listening socket */
    SSL_CTX *ctx;      /* server context (the test CA's server.crt) */
    int served;        /* answers written */
    int connections;   /* connections accepted */
};

/* Read one request (head and Content-Length body) over `ssl`: 0, or -1
 * at the end of the connection. */
static int tls_extra_read_request(SSL *ssl)
{
    char in[65536];
    size_t have = 0;
    const char *end = NULL;

    while (end == NULL) {
        int n = SSL_read(ssl, in + have, (int)(sizeof(in) - 1 - have));

        if (n <= 0)
            return -1;
        have += (size_t)n;
        in[have] = '\0';
        end = strstr(in, "\r\n\r\n");
    }
    const char *cl = strcasestr(in, "\r\ncontent-length:");
    size_t want = (size_t)(end + 4 - in) + (cl ? strtoul(cl + 17, NULL, 10) : 0);
    while (have < want) {
        int n = SSL_read(ssl, in + have, (int)(sizeof(in) - 1 - have));

        if (n <= 0)
            return -1;
        have += (size_t)n;
    }
    return 0;
}

/* A whole chat answer whose content is `text`. */
static void tls_extra_answer(struct buf *out, const char *text)
{
    char body[512];

    snprintf(body, sizeof(body),
             "{\"id\":\"x\",\"object\":\"chat.completion\",\"model\":\"m\",\"choices\":[{\"index\":0,"
             "\"message\":{\"role\":\"assistant\",\"content\":\"%s\"},\"finish_reason\":\"stop\"}],"
             "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}",
             text);
    buf_printf(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
               strlen(body), body);
}

/* A server context with the test CA's server.crt (made in ca_dir). */
static SSL_CTX *tls_server_ctx(void)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    char path[300];

    cr_assert_eq(support_make_test_ca(ca_dir, sizeof(ca_dir)), 0);
    snprintf(path, sizeof(path), "%s/server.crt", ca_dir);
    cr_assert_eq(SSL_CTX_use_certificate_chain_file(ctx, path), 1);
    snprintf(path, sizeof(path), "%s/server.key", ca_dir);
    cr_assert_eq(SSL_CTX_use_PrivateKey_file(ctx, path, SSL_FILETYPE_PEM), 1);
    return ctx;
}

/* Backend "tls" at https://127.0.0.1:port, trusting the test CA. */
static const char *tls_backend_yaml(char *out, size_t n, int port)
{
    snprintf(out, n,
             "  - name: tls\n    kind: api\n    url: https://127.0.0.1:%d/v1\n"
             "    model: m\n    api_key: sk-up\n    quality: 1\n    context_window: 1000\n"
             "    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\n    ca_file: %s/ca.crt\n",
             port, ca_dir);
    return out;
}

/* Serve connections one after the other; answer request k with
 * "answer-k". The first answer is followed, in the same TCP write but in
 * a TLS record of its own, by a whole second answer nobody asked for. */
static void *tls_extra_main(void *arg)
{
    struct tls_extra *t = arg;
    struct timeval tv = {.tv_sec = 5};

    while (t->served < 2 && t->connections < 3) {
        struct pollfd pfd = {.fd = t->lfd, .events = POLLIN};
        int fd;
        SSL *ssl;

        if (poll(&pfd, 1, 5000) != 1 || (fd = accept(t->lfd, NULL, NULL)) < 0)
            break;
        t->connections++;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        ssl = SSL_new(t->ctx);
        SSL_set_fd(ssl, fd);
        if (SSL_accept(ssl) == 1) {
            BIO *mem = BIO_new(BIO_s_mem());

            SSL_set0_wbio(ssl, mem);
            while (t->served < 2 && tls_extra_read_request(ssl) == 0) {
                struct buf a = {0}, b = {0};
                char text[32];
                char *p;
                long n;

                snprintf(text, sizeof(text), "answer-%d", ++t->served);
                tls_extra_answer(&a, text);
                SSL_write(ssl, a.data, (int)a.len);
                if (t->served == 1) {
                    tls_extra_answer(&b, "INJECTED");
                    SSL_write(ssl, b.data, (int)b.len);
                }
                n = BIO_get_mem_data(mem, &p);
                if (n > 0 && write(fd, p, (size_t)n) != n)
                    break;
                (void)BIO_reset(mem);
                buf_free(&a);
                buf_free(&b);
            }
        }
        SSL_free(ssl);
        close(fd);
    }
    return NULL;
}

/* Bytes after a complete answer make its connection unfit for reuse: on
 * a plain connection parse_response sees them in the same read and closes
 * it. Over TLS they may come as a record of their own in that read, which
 * SSL_read gives only after the answer was handed back: the connection
 * was pooled with them waiting, and the next request on it got them as
 * its answer. */
Test(proxy, bytes_after_a_tls_answer_are_not_the_next_requests_answer)
{
    struct tls_extra t = {0};
    pthread_t th;
    char a[2048];
    int port;

    t.ctx = tls_server_ctx();
    t.lfd = support_http_listen(&port);
    cr_assert_geq(t.lfd, 0);
    cr_assert_eq(pthread_create(&th, NULL, tls_extra_main, &t), 0);
    start_router("limits: {max_retries: 0}", tls_backend_yaml(a, sizeof(a), port), "tls");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(json_str(cJSON_GetArrayItem(cJSON_GetObjectItem(body_json(), "choices"), 0),
                              "message.content"),
                     "answer-1");
    usleep(200 * 1000);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(json_str(cJSON_GetArrayItem(cJSON_GetObjectItem(body_json(), "choices"), 0),
                              "message.content"),
                     "answer-2", "the second request got another answer: %.*s",
                     (int)resp.body.len, resp.body.data);
    support_proc_stop(&router);
    pthread_join(th, NULL);
    close(t.lfd);
    SSL_CTX_free(t.ctx);
}

/* ---- a TLS upstream that ends its connections without close_notify ---- */

struct tls_cut {
    int lfd;            /* listening socket */
    SSL_CTX *ctx;       /* server context */
    const char *answer; /* every request's answer */
    int stop;           /* set by the test: return */
};

/* Each connection: one request, `answer`, then the TCP connection closed
 * with no TLS close_notify (a server that crashed, or an attacker cutting
 * the connection). */
static void *tls_cut_main(void *arg)
{
    struct tls_cut *t = arg;
    struct timeval tv = {.tv_sec = 5};

    while (!__atomic_load_n(&t->stop, __ATOMIC_ACQUIRE)) {
        struct pollfd pfd = {.fd = t->lfd, .events = POLLIN};
        int fd;
        SSL *ssl;

        if (poll(&pfd, 1, 100) != 1 || (fd = accept(t->lfd, NULL, NULL)) < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        ssl = SSL_new(t->ctx);
        SSL_set_fd(ssl, fd);
        if (SSL_accept(ssl) == 1 && tls_extra_read_request(ssl) == 0) {
            const char *answer = __atomic_load_n(&t->answer, __ATOMIC_ACQUIRE);

            SSL_write(ssl, answer, (int)strlen(answer));
        }
        SSL_free(ssl); /* no SSL_shutdown: no close_notify */
        close(fd);
    }
    return NULL;
}

/* Over TLS an answer delimited by its connection ends with the server's
 * close_notify; a TCP close without one (RFC 8446 6.1: a truncation) is
 * a cut answer, as a reset is on plain TCP. Taken for its end, a plain
 * answer cut so went out, truncated, as a 200 from the TLS backend, and a
 * stream cut so ended as if complete: now the plain answer goes to the
 * next candidate and the stream ends with an error event. */
Test(proxy, a_tls_answer_ended_by_its_connection_needs_close_notify)
{
    static const char stream[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                                 "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
                                 "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n";
    struct tls_cut t = {0};
    struct support_sse s = {0};
    struct support_sse_event ev;
    pthread_t th;
    char a[2048], b[1024], both[3100];
    int port, rc, saw_error = 0, events = 0;

    t.ctx = tls_server_ctx();
    t.answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
               "{\"choices\":[{\"message\":{\"content\":\"the start of";
    t.lfd = support_http_listen(&port);
    cr_assert_geq(t.lfd, 0);
    cr_assert_eq(pthread_create(&th, NULL, tls_cut_main, &t), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    tls_backend_yaml(a, sizeof(a), port);
    backend_yaml_priced(b, sizeof(b), "b", mock_b.port, 10, NULL);
    snprintf(both, sizeof(both), "%s%s", a, b);
    start_router(NULL, both, "tls, b");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_expect_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b", "%.*s",
                     (int)resp.body.len, resp.body.data);

    __atomic_store_n(&t.answer, stream, __ATOMIC_RELEASE); /* tls is still the choice */
    open_stream(&s, AUTH, "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}");
    cr_assert_eq(s.resp.status, 200);
    cr_expect_str_eq(support_http_header(&s.resp, "x-costrouter-backend"), "tls");
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1) {
        events += strstr(ev.data, "delta") != NULL;
        saw_error |= strstr(ev.data, "\"error\"") != NULL;
    }
    support_sse_close(&s);
    __atomic_store_n(&t.stop, 1, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    close(t.lfd);
    SSL_CTX_free(t.ctx);
    cr_assert_eq(events, 2);
    cr_assert(saw_error, "no SSE error event");
    cr_assert_neq(rc, 0, "the stream ended as if it were complete");
}

/* A reload closes the old config's idle keep-alive connections at once.
 * One whose last answer is complete but not yet read by its client
 * (still queued in the router) is not idle: closing it cut that answer,
 * which was served and billed. It is closed once the answer is written. */
Test(proxy, a_reload_does_not_cut_an_answer_its_client_has_not_read)
{
    static const char body[] = "{\"model\":\"chat\",\"stream\":true,\"messages\":[]}";
    struct support_http_conn c;
    struct support_http_response r = {0};
    char a[1024], headers[256];
    int pad = pad_past_send_buffers();

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    backend_yaml(a, sizeof(a), "a", mock_a.port, NULL);
    start_router("admin_key: " ADMIN_KEY, a, "a");
    snprintf(headers, sizeof(headers),
             AUTH "x-mock-tokens: 1\r\nx-mock-event-pad: %d\r\nx-mock-done-delay-ms: 300\r\n", pad);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(support_http_connect_rcvbuf(&c, router.port, 4096), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    wait_pool_idle(1); /* the router has the whole answer, the client little of it */
    cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    usleep(200 * 1000);
    cr_assert_eq(support_http_read(&c, &r, TIMEOUT_MS), 0, "the answer was cut after %zu bytes",
                 r.raw.len);
    cr_assert_eq(r.status, 200);
    cr_assert_not_null(memmem(r.body.data, r.body.len, "data: [DONE]", 12));
    support_http_response_free(&r);
    support_http_close(&c);
}
