/*
 * tests/router/test_secrets.c: no secret the config holds or a client
 * sends ever comes out of the router, end to end.
 *
 * The real router (log level debug, cost log, admin API, metrics, the
 * response cache) runs with a distinctive string for each kind of secret:
 * tenant keys, backend api_keys (one literal, one from ${ENV}, one sent in
 * x-api-key), keys in two backend urls' queries (?key=), the admin key and the password of a real redis-server with
 * requirepass. In front of it: a real mockllm that wants its key, and two
 * raw upstreams that quote back the request head they got (the key in
 * it) in whatever error they are set to give. The sweep drives every path
 * it can reach, then looks for each secret, and for each 12-byte piece of
 * one, in all the router produced: every answer (head and body), the
 * admin API's and /metrics' answers, the reload's 400, its log (stderr),
 * the cost log, `costrouter report` over it and `--check-config`.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/canned.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"
#include "tests/support/redis.h"

#define TIMEOUT_MS 5000
/* Long enough for a reload that reads the file a moment after it was written. */
#define RELOAD_TIMEOUT_MS 15000
/* A piece of a secret this long found anywhere is a leak. */
#define FRAGMENT 12

/* The secrets: a random-looking body each, so that no 12 bytes of one
 * turn up anywhere by chance. */
#define KEY_ACME "sk-ten-Q7vX2mLp9RzK4wNj8TbY"  /* tenant acme */
#define KEY_POOR "sk-ten-Hd3Kf8Np5Sd2Gj7Yc4Ww"  /* tenant poor: a budget of a micro-dollar */
#define KEY_RATE "sk-ten-Mv1Qc6Wh3Lz8Bx5Pt0Ke"  /* tenant slow: 1 request a minute */
/* Not configured: KEY_ACME but for its last 4 bytes, as a typo or a
 * guess would be. The router must not quote it either. */
#define KEY_WRONG "sk-ten-Q7vX2mLp9RzK4wNj8Zz0"
#define UP_LITERAL "sk-up-lit-5Dn8Gx2Kp7Wq4Rm0Ab" /* backend mock, in the file */
#define UP_ENV "sk-up-env-1Ty6Hb3Zs9Fc2Vn8Cd"     /* backend echo, from ${SECRETS_TEST_UP_KEY} */
#define UP_XKEY "sk-up-xky-4Jr7Mw2Qe5Ua8Lp3Ef"    /* backend echox, sent as x-api-key */
/* Keys in backend urls' queries (?key=, as some hosts take one). */
#define UPQ_MOCK "upq-mck-7Gs2Lw9Dn4Rx1Kb6Vz"     /* backend mock's url */
#define UPQ_ECHO "upq-ech-3Fy8Pc5Mt0Hq7Ju2Wa"     /* backend echo's url, after an api-version */
#define ADMIN_KEY "adm-Z8dW3nQ6rT1yU5cV9bXe"
#define ADMIN_WRONG "adm-Z8dW3nQ6rT1yU5cV9b00"
#define REDIS_PW "rpw-Bm6Tf1Jy4Hk7Qz3Xa2Ls"
#define REDIS_WRONG "rpw-Bm6Tf1Jy4Hk7Qz3Xa200"

#define ENV_NAME "SECRETS_TEST_UP_KEY"
#define AUTH(key) "Authorization: Bearer " key "\r\n"
#define ADMIN AUTH(ADMIN_KEY)
#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]"
#define BODY(model) "{\"model\":\"" model "\"," MSG "}"
#define STREAM(model) "{\"model\":\"" model "\",\"stream\":true," MSG "}"
/* What the echoing upstreams answer: an OpenAI-style error whose message
 * quotes the request head they were sent, Authorization and all. */
#define ECHO_BODY                                                                              \
    "{\"error\":{\"message\":\"Incorrect API key provided. Request: $REQUEST\","              \
    "\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"invalid_api_key\"}}"

static const struct {
    const char *name;
    const char *value;
} secrets[] = {
    {"tenant key acme", KEY_ACME},        {"tenant key poor", KEY_POOR},
    {"tenant key slow", KEY_RATE},        {"a wrong tenant key", KEY_WRONG},
    {"upstream api_key", UP_LITERAL},     {"upstream api_key from ${ENV}", UP_ENV},
    {"upstream x-api-key", UP_XKEY},      {"a key in mock's url", UPQ_MOCK},
    {"a key in echo's url", UPQ_ECHO},    {"admin key", ADMIN_KEY},
    {"a wrong admin key", ADMIN_WRONG},   {"Redis password", REDIS_PW},
    {"a wrong Redis password", REDIS_WRONG},
};

static struct support_proc router, mock;
static struct support_canned *echo, *echox;
static struct test_redis redis;
static struct support_http_response resp;
static struct buf req;
static char dir[64], conf_path[128], log_path[128], err_path[128];
static int answers; /* answers looked at, for the count at the end */
static const char *redis_pw = REDIS_PW; /* the password write_conf puts in store.redis */

static void setup(void)
{
    strcpy(dir, "/tmp/costrouter-secrets-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(conf_path, sizeof(conf_path), "%s/costrouter.yaml", dir);
    snprintf(log_path, sizeof(log_path), "%s/cost.jsonl", dir);
    snprintf(err_path, sizeof(err_path), "%s/stderr.log", dir);
    cr_assert_eq(setenv(ENV_NAME, UP_ENV, 1), 0);
}

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    support_canned_stop(echo);
    support_canned_stop(echox);
    echo = echox = NULL;
    if (redis.pid)
        test_redis_stop(&redis);
    support_http_response_free(&resp);
    buf_free(&req);
    support_remove_tree(dir);
}

TestSuite(secrets, .init = setup, .fini = teardown, .timeout = 120);

/* Fail when `what` (len bytes) holds any secret, or any FRAGMENT bytes
 * of one. */
static void assert_clean(const char *where, const char *what, size_t len)
{
    for (size_t i = 0; i < sizeof(secrets) / sizeof(secrets[0]); i++) {
        const char *s = secrets[i].value;

        for (size_t at = 0; at + FRAGMENT <= strlen(s); at++)
            cr_assert_null(memmem(what, len, s + at, FRAGMENT),
                           "%s: %s shows (\"%.*s\" found):\n%.*s", where, secrets[i].name,
                           FRAGMENT, s + at, (int)len, what);
    }
}

static void assert_file_clean(const char *where, const char *path)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = fopen(path, "r");

    cr_assert_not_null(f, "%s: %s", where, path);
    cr_assert_eq(getdelim(&text, &len, '\0', f) >= 0 || feof(f), 1);
    len = text ? strlen(text) : 0;
    fclose(f);
    cr_assert_gt(len, 0, "%s is empty", where);
    assert_clean(where, text, len);
    free(text);
}

/* The config, with the keys as a file holds them: tenants' as hashes,
 * backends' as they are or from the environment, the Redis password
 * (redis_pw) in the store's url. */
static void write_conf(void)
{
    char acme[65], poor[65], slow[65];
    FILE *f = fopen(conf_path, "w");

    cr_assert_not_null(f);
    support_key_sha256_hex(KEY_ACME, acme);
    support_key_sha256_hex(KEY_POOR, poor);
    support_key_sha256_hex(KEY_RATE, slow);
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "admin_key: %s\n"
            "cost_log: %s\n"
            "store: {redis: \"redis://:%s@127.0.0.1:%d/0\"}\n"
            "cache: {enabled: true}\n"
            "backends:\n"
            "  - {name: mock, kind: api, url: \"http://127.0.0.1:%d/v1?key=" UPQ_MOCK "\",\n"
            "     model: m-mock,\n"
            "     api_key: %s, quality: 1, context_window: 100000, input_usd_per_mtok: 1,\n"
            "     output_usd_per_mtok: 2, tokenizer: estimate, first_byte_timeout_ms: 400}\n"
            "  - {name: echo, kind: api,\n"
            "     url: \"http://127.0.0.1:%d/v1?api-version=2024-10-21&key=" UPQ_ECHO "\",\n"
            "     model: m-echo,\n"
            "     api_key: \"${" ENV_NAME "}\", quality: 1, context_window: 100000,\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 2, tokenizer: estimate}\n"
            "  - {name: echox, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-echox,\n"
            "     auth_header: x-api-key, api_key: %s, quality: 1, context_window: 100000,\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 2, tokenizer: estimate}\n"
            "  - {name: anth, kind: api, api: anthropic, url: \"http://127.0.0.1:%d/v1\",\n"
            "     model: m-anth, api_key: %s, quality: 1, context_window: 100000,\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 2, tokenizer: estimate}\n"
            "  - {name: echoa, kind: api, api: anthropic, url: \"http://127.0.0.1:%d/v1\",\n"
            "     model: m-echoa, api_key: %s, quality: 1, context_window: 100000,\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 2, tokenizer: estimate}\n"
            "routes:\n"
            "  - {model: chat, candidates: [mock]}\n"
            "  - {model: anth, candidates: [anth]}\n"
            "  - {model: echoa, candidates: [echoa]}\n"
            "  - {model: echo, candidates: [echo]}\n"
            "  - {model: echox, candidates: [echox]}\n"
            "  - {model: fallback, candidates: [echo, mock]}\n"
            "tenants:\n"
            "  - {id: acme, api_keys: [\"sha256:%s\"], tags: {team: search}}\n"
            "  - {id: poor, api_keys: [\"sha256:%s\"],\n"
            "     budget: {daily_usd: 0.000001, on_exhausted: reject}}\n"
            "  - {id: slow, api_keys: [{hash: \"sha256:%s\", name: ci}], rate_limits: {rpm: 1}}\n",
            ADMIN_KEY, log_path, redis_pw, redis.port, mock.port, UP_LITERAL,
            support_canned_port(echo), support_canned_port(echox), UP_XKEY, mock.port, UP_LITERAL,
            support_canned_port(echox), UP_XKEY, acme, poor, slow);
    fclose(f);
}

/* A config that is wrong on lines that hold keys: each error must name
 * the line and the key's place, never its value. */
static void write_bad_conf(void)
{
    FILE *f = fopen(conf_path, "w");

    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "admin_key: {value: %s}\n"
            "store: {redis: \"redis://:%s@127.0.0.1:99999/0\"}\n"
            "backends:\n"
            "  - {name: mock, kind: api, url: \"http://u:%s@127.0.0.1:%d/v1\", api_key: %s,\n"
            "     quality: high, input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
            "  - {name: echox, kind: api, url: \"http://127.0.0.1:%d/v1\", api_key: [%s],\n"
            "     auth_header: x-api-key, input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
            "  - {name: echo, kind: api, url: \"http://127.0.0.1:%d/v1?key=" UPQ_ECHO "#x\",\n"
            "     api_key: \"%s\\u0001\",\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
            "routes:\n  - {model: chat, candidates: [mock]}\n"
            "tenants:\n  - {id: acme, api_keys: [\"%s\"]}\n",
            ADMIN_KEY, REDIS_PW, UP_LITERAL, mock.port, UP_LITERAL, support_canned_port(echox),
            UP_XKEY, support_canned_port(echo), UP_ENV, KEY_ACME);
    fclose(f);
}

/* Start the router at log level debug (-vv), its stderr to err_path. */
static void start_router(void)
{
    char cmd[512], *argv[] = {"/bin/sh", "-c", cmd, NULL};

    snprintf(cmd, sizeof(cmd), "exec '%s' -vv -c '%s' 2>>'%s'", getenv("COSTROUTER_BIN"),
             conf_path, err_path);
    cr_assert_eq(support_proc_start(&router, argv), 0, "the router did not start");
}

/* Everything up: Redis with a password, mockllm wanting UP_LITERAL, the
 * two echoing upstreams (answering 401 until told otherwise), the
 * router. */
static void start_all(void)
{
    cr_assert_eq(test_redis_start_password(&redis, 0, REDIS_PW), 0);
    cr_assert_eq(support_mockllm_start(&mock, "--require-key", UP_LITERAL, NULL), 0);
    echo = support_canned_start("", 0);
    echox = support_canned_start("", 0);
    cr_assert(echo && echox);
    support_canned_echo(echo, "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n",
                        ECHO_BODY);
    support_canned_echo(echox, "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n",
                        ECHO_BODY);
    write_conf();
    start_router();
}

/* Send raw request bytes on a new connection and read the answer into
 * resp; every answer is checked for secrets. Returns its status. */
static int send_raw(const char *bytes, size_t len, int timeout_ms)
{
    support_http_response_free(&resp);
    cr_assert_eq(support_http_request(router.port, bytes, len, timeout_ms, &resp), 0,
                 "no answer to:\n%.*s", (int)len, bytes);
    assert_clean("an answer", resp.raw.data, resp.raw.len);
    answers++;
    return resp.status;
}

static int call(const char *method, const char *path, const char *headers, const char *body)
{
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    return send_raw(req.data, req.len, RELOAD_TIMEOUT_MS);
}

/* The error code of the answer in resp. */
static const char *error_code(void)
{
    static char code[64];
    cJSON *j = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    const cJSON *c = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "error"), "code");

    snprintf(code, sizeof(code), "%s", cJSON_IsString(c) ? c->valuestring : "");
    cJSON_Delete(j);
    return code;
}

/* Wait until the router has its Redis connection (the password works). */
static void wait_store_up(void)
{
    cr_assert_eq(support_router_store_up(router.port, ADMIN), 1,
                 "the store did not come up: does the router send the password?");
}

/* Set both echoing upstreams to answer `status` (a status line's rest)
 * with the echo as JSON, or as an SSE event when `sse`. */
static void echo_status_as(const char *status, int sse)
{
    char head[128];

    snprintf(head, sizeof(head), "HTTP/1.1 %s\r\nContent-Type: %s\r\n", status,
             sse ? "text/event-stream" : "application/json");
    support_canned_echo(echo, head, sse ? "data: " ECHO_BODY "\n\n" : ECHO_BODY);
    support_canned_echo(echox, head, sse ? "data: " ECHO_BODY "\n\n" : ECHO_BODY);
}

static void echo_status(const char *status)
{
    echo_status_as(status, 0);
}

/* Set both echoing upstreams to answer 200, plain or streamed, with the
 * request they got quoted in a header. */
static void echo_ok(int sse)
{
    static const char answer[] =
        "{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,"
        "\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}],"
        "\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}";
    char head[128];

    snprintf(head, sizeof(head), "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nx-echo: $REQUEST\r\n",
             sse ? "text/event-stream" : "application/json");
    support_canned_echo(echo, head, sse ? "data: {}\n\ndata: [DONE]\n\n" : answer);
    support_canned_echo(echox, head, sse ? "data: {}\n\ndata: [DONE]\n\n" : answer);
}

/* Requests a client may send, good and bad, to the mock. */
static void drive_clients(void)
{
    static const char *const malformed[] = {
        /* the key without "Bearer", in Basic form, twice, after junk */
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " KEY_ACME "\r\n"
        "Content-Length: 2\r\n\r\n{}",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " KEY_ACME "\r\n"
        "Content-Length: 2\r\n\r\n{}",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" AUTH(KEY_ACME) AUTH(KEY_WRONG)
        "Content-Length: 2\r\n\r\n{}",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x " KEY_ACME "\r\n"
        "Content-Length: 2\r\n\r\n{}",
        /* a control byte in the value, a key in a header name, a key as the path */
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " KEY_ACME
        "\x01\r\nContent-Length: 2\r\n\r\n{}",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX " KEY_ACME ": 1\r\n\r\n",
        "GET /" KEY_ACME " HTTP/1.1\r\nHost: x\r\n" AUTH(KEY_ACME) "\r\n",
        "GET /v1/models?key=" KEY_ACME " HTTP/1.1\r\nHost: x\r\n" AUTH(KEY_WRONG) "\r\n",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    };

    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("chat")), 200,
                 "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), STREAM("chat")), 200);
    cr_assert_eq(call("POST", "/v1/completions", AUTH(KEY_ACME),
                      "{\"model\":\"chat\",\"prompt\":\"hi\"}"), 200);
    cr_assert_eq(call("POST", "/v1/embeddings", AUTH(KEY_ACME),
                      "{\"model\":\"chat\",\"input\":\"hi\"}"), 200);
    for (int i = 0; i < 2; i++) /* the second from the cache */
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME),
                          "{\"model\":\"chat\",\"temperature\":0," MSG "}"), 200);
    cr_assert_eq(call("GET", "/v1/models", AUTH(KEY_ACME), NULL), 200);
    cr_assert_eq(call("GET", "/healthz", NULL, NULL), 200);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "HEAD", "/v1/chat/completions", AUTH(KEY_WRONG), NULL),
                 0);
    support_http_response_free(&resp);
    {
        struct support_http_conn conn;

        cr_assert_eq(support_http_connect(&conn, router.port), 0);
        cr_assert_eq(support_http_send(&conn, req.data, req.len), 0);
        cr_assert_eq(support_http_read_head(&conn, &resp, TIMEOUT_MS), 0);
        support_http_close(&conn);
        assert_clean("an answer to HEAD", resp.raw.data, resp.raw.len);
    }
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_WRONG), BODY("chat")), 401);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), "{\"model\":"), 400);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("nope")), 404);
    for (size_t i = 0; i < sizeof(malformed) / sizeof(malformed[0]); i++) {
        int status = send_raw(malformed[i], strlen(malformed[i]), TIMEOUT_MS);
        cr_assert(status >= 400 && status < 500, "malformed %zu: %d", i, status);
    }
    /* A head over limits.max_header_bytes, the key in it. */
    {
        struct buf big = {0};

        cr_assert_eq(buf_printf(&big, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                      AUTH(KEY_ACME) "X-Pad: %070000d\r\n\r\n", 0), 0);
        cr_assert_eq(send_raw(big.data, big.len, TIMEOUT_MS), 431);
        buf_free(&big);
    }
    /* Refusals: budget, rate limit. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_POOR), BODY("chat")), 429);
    cr_assert_str_eq(error_code(), "budget_exhausted");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_RATE), BODY("chat")), 200);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_RATE), BODY("chat")), 429);
    cr_assert_str_eq(error_code(), "rate_limit_exceeded");
    /* The mock's own failures: its error statuses, a stall past the
     * first-byte timeout, resets before and in the answer. */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME) "x-mock-status: 500\r\n",
                      BODY("chat")), 500);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME) "x-mock-status: 400\r\n",
                      BODY("chat")), 400);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME) "x-mock-status: 401\r\n",
                      BODY("chat")), 502);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME) "x-mock-status: 400\r\n",
                      BODY("chat")), 400); /* a success for the circuit */
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME) "x-mock-fault: stall\r\n",
                      BODY("chat")), 504);
    cr_assert_eq(call("POST", "/v1/chat/completions",
                      AUTH(KEY_ACME) "x-mock-fault: close-before-response\r\n", BODY("chat")), 502);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     AUTH(KEY_ACME) "x-mock-fault: close-midstream\r\n",
                                     STREAM("chat")), 0);
    support_http_response_free(&resp);
    support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp); /* cut short */
    assert_clean("a stream cut short", resp.raw.data, resp.raw.len);
}

/* Upstreams that quote the key they were sent, in every error status. */
static void drive_echoing_upstreams(void)
{
    static const char *const models[] = {"echo", "echox"};

    for (size_t m = 0; m < 2; m++) {
        char body[128], stream[128];

        snprintf(body, sizeof(body), "{\"model\":\"%s\"," MSG "}", models[m]);
        snprintf(stream, sizeof(stream), "{\"model\":\"%s\",\"stream\":true," MSG "}", models[m]);
        /* In an order that never fails three times running, which would
         * open the backend's circuit: a 400 is no failure. */
        echo_status("401 Unauthorized");
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), body), 502);
        cr_assert_str_eq(error_code(), "upstream_auth_failed");
        echo_status("403 Forbidden");
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), body), 502);
        cr_assert_str_eq(error_code(), "upstream_auth_failed");
        /* Other errors pass through, with the key blanked out. */
        echo_status("400 Bad Request");
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), stream), 400);
        cr_assert_not_null(memmem(resp.body.data, resp.body.len, "Request: POST", 13),
                           "the upstream's own body: %.*s", (int)resp.body.len, resp.body.data);
        echo_status("401 Unauthorized");
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), stream), 502);
        echo_status("500 Internal Server Error");
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), body), 500);
        echo_status("429 Too Many Requests");
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), body), 429);
        /* Answers that quote the request in a header. */
        echo_ok(0);
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), body), 200);
        cr_assert_not_null(support_http_header(&resp, "x-echo"));
        echo_ok(1);
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), stream), 200);
        cr_assert_not_null(support_http_header(&resp, "x-echo"));
        echo_status_as("500 Internal Server Error", 1); /* an error that says it streams */
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), stream), 500);
        cr_assert_not_null(memmem(resp.body.data, resp.body.len, "data: {", 7));
    }
    echo_status("401 Unauthorized");
}

#define XKEY(key) "x-api-key: " key "\r\n"
#define ABODY(model) "{\"model\":\"" model "\",\"max_tokens\":5," MSG "}"

/* /v1/messages: the tenant's key as x-api-key (the way Anthropic's SDKs
 * send it) is never forwarded nor quoted back, whether the request
 * succeeds, is refused, or the upstream answers an error that quotes
 * the head it got; and the backend's, sent as x-api-key, is blanked. */
static void drive_anthropic(void)
{
    static const char *const malformed[] = {
        /* x-api-key twice, with Authorization naming another key, empty */
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\n" XKEY(KEY_ACME) XKEY(KEY_WRONG)
        "Content-Length: 2\r\n\r\n{}",
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\n" XKEY(KEY_ACME) AUTH(KEY_WRONG)
        "Content-Length: 2\r\n\r\n{}",
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\n" AUTH(KEY_WRONG) XKEY(KEY_ACME)
        "Content-Length: 2\r\n\r\n{}",
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: \r\nContent-Length: 2\r\n\r\n{}",
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\n" XKEY(KEY_ACME "\x01")
        "Content-Length: 2\r\n\r\n{}",
    };

    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME), ABODY("anth")), 200, "%.*s",
                 (int)resp.body.len, resp.body.data);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME) AUTH(KEY_ACME), ABODY("anth")), 200);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME),
                      "{\"model\":\"anth\",\"max_tokens\":5,\"stream\":true," MSG "}"),
                 200);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_WRONG), ABODY("anth")), 401);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME), "{\"model\":"), 400);
    cr_assert_eq(call("POST", "/v1/messages/count_tokens", XKEY(KEY_ACME) AUTH(KEY_ACME),
                      "{\"model\":\"anth\"," MSG "}"),
                 200);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME), ABODY("chat")), 404);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_POOR), ABODY("anth")), 429);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME) "x-mock-fault: close-before-response\r\n",
                      ABODY("anth")), 502);
    for (size_t i = 0; i < sizeof(malformed) / sizeof(malformed[0]); i++) {
        int status = send_raw(malformed[i], strlen(malformed[i]), TIMEOUT_MS);
        cr_assert(status >= 400 && status < 500, "malformed %zu: %d", i, status);
    }
    /* An upstream quoting the head it got, in an error and in a header. */
    echo_status("400 Bad Request");
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME), ABODY("echoa")), 400);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "x-api-key: ****", 15),
                       "the upstream's own body, its key blanked: %.*s", (int)resp.body.len,
                       resp.body.data);
    echo_status("401 Unauthorized");
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME), ABODY("echoa")), 502);
    echo_ok(0);
    cr_assert_eq(call("POST", "/v1/messages", XKEY(KEY_ACME), ABODY("echoa")), 200);
    cr_assert_not_null(support_http_header(&resp, "x-echo"));
    /* count_tokens: the same keys, the same echoes (and a refusal) */
    cr_assert_eq(call("POST", "/v1/messages/count_tokens", XKEY(KEY_ACME), ABODY("echoa")), 200);
    cr_assert_not_null(support_http_header(&resp, "x-echo"));
    cr_assert_eq(call("POST", "/v1/messages/count_tokens", XKEY(KEY_WRONG), ABODY("anth")), 401);
    echo_status("400 Bad Request");
    cr_assert_eq(call("POST", "/v1/messages/count_tokens", XKEY(KEY_ACME), ABODY("echoa")), 400);
    echo_ok(0);
    /* x-api-key on an OpenAI endpoint, to a backend keyed by Authorization:
     * the client's x-api-key is not that backend's key header, and must
     * not go on either. */
    cr_assert_eq(call("POST", "/v1/chat/completions", XKEY(KEY_ACME), BODY("echo")), 200);
    cr_assert_not_null(support_http_header(&resp, "x-echo"));
    echo_status("400 Bad Request");
    cr_assert_eq(call("POST", "/v1/chat/completions", XKEY(KEY_ACME), BODY("echo")), 400);
    echo_status("401 Unauthorized");
}

/* Every admin endpoint with the right key, a wrong one, none, and a
 * tenant's key. */
static void drive_admin(void)
{
    static const char *const paths[] = {"/admin/tenants", "/admin/tenants/acme/spend",
                                        "/admin/tenants/poor/spend", "/admin/tenants/slow/spend",
                                        "/admin/backends", "/metrics", "/dashboard"};
    static const char *const wrong[] = {AUTH(ADMIN_WRONG), AUTH(KEY_ACME), "", AUTH(UP_LITERAL),
                                        "Authorization: " ADMIN_KEY "\r\n"};

    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        cr_assert_eq(call("GET", paths[i], ADMIN, NULL), 200, "%s", paths[i]);
        for (size_t w = 0; w < sizeof(wrong) / sizeof(wrong[0]) && i < 6; w++)
            cr_assert_eq(call("GET", paths[i], wrong[w], NULL), 401, "%s", paths[i]);
    }
    cr_assert_eq(call("POST", "/admin/reload", AUTH(ADMIN_WRONG), NULL), 401);
}

/* How many lines of the file at `path` hold one of the n `texts`. */
static int lines_with(const char *path, const char *const *texts, size_t n)
{
    FILE *f = fopen(path, "r");
    char line[4096];
    int count = 0;

    cr_assert_not_null(f);
    while (fgets(line, sizeof(line), f))
        for (size_t i = 0; i < n; i++)
            count += strstr(line, texts[i]) != NULL;
    fclose(f);
    return count;
}

/* Lines of the router's log that end a reload, applied or not. */
static int reloads_logged(void)
{
    static const char *const ends[] = {"config reloaded", "the running config stays",
                                       "the config was not reloaded"};

    return lines_with(err_path, ends, sizeof(ends) / sizeof(ends[0]));
}

/* SIGHUP, and wait for that reload to end: the file must not change
 * while it is read. */
static void sighup(void)
{
    int before = reloads_logged();

    cr_assert_eq(kill(router.pid, SIGHUP), 0);
    for (int i = 0; i < RELOAD_TIMEOUT_MS / 10 && reloads_logged() == before; i++)
        usleep(10000);
    cr_assert_gt(reloads_logged(), before, "the SIGHUP's reload did not end");
}

/* Reloads: a good one, one refused for errors on lines that hold keys
 * (the 400 lists them), one that changes the Redis password (which a
 * reload cannot apply), then SIGHUP with each. */
static void drive_reloads(void)
{
    cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 200);
    write_bad_conf();
    cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 400);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "admin_key", 9), "%.*s",
                       (int)resp.body.len, resp.body.data);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "backends[1].api_key", 19), "%.*s",
                       (int)resp.body.len, resp.body.data);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "backends[2].url", 15), "%.*s",
                       (int)resp.body.len, resp.body.data);
    sighup();
    redis_pw = REDIS_WRONG;
    write_conf();
    redis_pw = REDIS_PW;
    cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 400);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "store.redis", 11));
    sighup();
    write_conf();
    cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 200);
    sighup();
    cr_assert_eq(call("GET", "/admin/backends", ADMIN, NULL), 200); /* after the SIGHUP */
}

/* A second router whose Redis password is wrong: Redis refuses it, and
 * the log says so without either password. */
static void wrong_redis_password(void)
{
    static const char *const refused[] = {"Redis refused setup"};

    redis_pw = REDIS_WRONG;
    write_conf();
    redis_pw = REDIS_PW;
    start_router();
    for (int i = 0; i < 500 && lines_with(err_path, refused, 1) == 0; i++)
        usleep(10000);
    cr_assert_gt(lines_with(err_path, refused, 1), 0, "no word of the refused password in the log");
    support_proc_stop(&router);
    write_conf();
}

/* Run `cmd` through the shell, stdout and stderr both into out. */
static int run_shell(const char *cmd, struct buf *out)
{
    char *argv[] = {"/bin/sh", "-c", (char *)cmd, NULL};

    buf_reset(out);
    return support_run(argv, out, 30000);
}

/* What the command-line tools print over the config and the cost log. */
static void check_tools(void)
{
    static const char *const reports[] = {"", "--format csv", "--format json",
                                          "--format json --by tenant,tag.team,backend,route"};
    struct buf out = {0};
    char cmd[512];

    snprintf(cmd, sizeof(cmd), "'%s' --check-config '%s' 2>&1", getenv("COSTROUTER_BIN"),
             conf_path);
    cr_assert_eq(run_shell(cmd, &out), 0, "%.*s", (int)out.len, out.data);
    assert_clean("--check-config on a good config", out.data, out.len);
    write_bad_conf();
    cr_assert_eq(run_shell(cmd, &out), 1, "%.*s", (int)out.len, out.data);
    cr_assert_not_null(memmem(out.data, out.len, "tenants[0].api_keys[0]", 22));
    assert_clean("--check-config on a bad config", out.data, out.len);
    for (size_t i = 0; i < sizeof(reports) / sizeof(reports[0]); i++) {
        snprintf(cmd, sizeof(cmd), "'%s' report %s '%s' 2>&1", getenv("COSTROUTER_BIN"),
                 reports[i], log_path);
        cr_assert_eq(run_shell(cmd, &out), 0, "%.*s", (int)out.len, out.data);
        cr_assert_not_null(memmem(out.data, out.len, "acme", 4));
        assert_clean("costrouter report", out.data, out.len);
    }
    buf_free(&out);
}

Test(secrets, never_leave_the_router)
{
    start_all();
    wait_store_up();
    drive_clients();
    drive_echoing_upstreams();
    drive_anthropic();
    drive_admin();
    drive_reloads();
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router));
    wrong_redis_password();
    assert_file_clean("the router's log", err_path);
    assert_file_clean("the cost log", log_path);
    check_tools();
    cr_assert_gt(answers, 60);
}

/* A backend that refuses the router's key is the router's problem, not
 * the tenant's: its answer (which quotes the key) never reaches the
 * client, the next candidate serves, and with none left the client gets
 * the router's 502 upstream_auth_failed, charged nothing. Other error
 * answers pass, with the key blanked out. */
Test(secrets, a_backend_refusing_the_routers_key_is_a_502_and_the_next_candidate_serves)
{
    const char *backend;

    start_all();
    wait_store_up();
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("fallback")), 200,
                 "%.*s", (int)resp.body.len, resp.body.data);
    backend = support_http_header(&resp, "x-costrouter-backend");
    cr_assert_str_eq(backend ? backend : "", "mock");
    cr_assert_eq(support_canned_requests(echo), 1, "echo was tried first");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("echo")), 502);
    cr_assert_str_eq(error_code(), "upstream_auth_failed");
    echo_status("500 Internal Server Error");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("echo")), 500);
    /* The echo, its key blanked: the Authorization line is still there. */
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "authorization: Bearer ****", 26) ?:
                           memmem(resp.body.data, resp.body.len, "Authorization: Bearer ****", 26),
                       "%.*s", (int)resp.body.len, resp.body.data);
}

/* Keys of 8 and 7 bytes, the shortest blanked out of answers and one
 * byte less. */
#define KEY_8 "k8Ab3xYz"
#define KEY_7 "k7Ab3xY"

/* A router with no store in front of the two echoing upstreams, set to
 * answer `status`: echo as backend "eight", whose api_key is KEY_8,
 * echox as "seven" (KEY_7). Routes: eight, seven, and both, eight first. */
static void start_short_keys(const char *status)
{
    char tenant[65];
    FILE *f;

    echo = support_canned_start("", 0);
    echox = support_canned_start("", 0);
    cr_assert(echo && echox);
    echo_status(status);
    support_key_sha256_hex(KEY_ACME, tenant);
    f = fopen(conf_path, "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "backends:\n"
            "  - {name: eight, kind: api, url: \"http://127.0.0.1:%d/v1\", api_key: " KEY_8 ",\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
            "  - {name: seven, kind: api, url: \"http://127.0.0.1:%d/v1\", api_key: " KEY_7 ",\n"
            "     input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
            "routes:\n"
            "  - {model: eight, candidates: [eight]}\n"
            "  - {model: seven, candidates: [seven]}\n"
            "  - {model: both, candidates: [eight, seven]}\n"
            "tenants:\n"
            "  - {id: acme, api_keys: [\"sha256:%s\"]}\n",
            support_canned_port(echo), support_canned_port(echox), tenant);
    fclose(f);
    start_router();
}

/* Does the answer's body quote the Authorization header as `value`? */
static int body_quotes_bearer(const char *value)
{
    char want[64];
    int n = snprintf(want, sizeof(want), "Bearer %s\\r\\n", value); /* as JSON escapes it */

    return memmem(resp.body.data, resp.body.len, want, (size_t)n) != NULL;
}

/* The shortest key blanked out of an answer is 8 bytes: one of 8 that an
 * upstream quotes in its error is starred out whole, one of 7 (too short
 * to guard anything, and blanking every copy of it would mangle JSON) is
 * left as it is. */
Test(secrets, a_backend_key_of_8_bytes_is_blanked_out_one_of_7_is_not)
{
    start_short_keys("500 Internal Server Error");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("eight")), 500);
    cr_assert(body_quotes_bearer("********"), "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_null(memmem(resp.body.data, resp.body.len, KEY_8, 8));
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("seven")), 500);
    cr_assert(body_quotes_bearer(KEY_7), "%.*s", (int)resp.body.len, resp.body.data);
}

/* Errors other than 401 and 403 pass to the client with the key blanked
 * out: a 400 that says it streams (held whole like any error, so that
 * all of it is scrubbed), and a 407, which is not the backend refusing
 * the router's key. */
Test(secrets, other_errors_pass_with_the_key_blanked_out)
{
    start_short_keys("400 Bad Request");
    echo_status_as("400 Bad Request", 1);
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), STREAM("eight")), 400);
    cr_assert(body_quotes_bearer("********"), "%.*s", (int)resp.body.len, resp.body.data);
    echo_status("407 Proxy Authentication Required");
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("eight")), 407);
    cr_assert(body_quotes_bearer("********"), "%.*s", (int)resp.body.len, resp.body.data);
}

/* A backend that refuses the router's key fails as a 5xx does: after
 * three refusals its circuit opens, and the next candidate serves
 * without it being tried first. */
Test(secrets, a_backend_refusing_the_routers_key_opens_its_circuit)
{
    start_short_keys("401 Unauthorized");
    support_canned_echo(echox, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
                        "{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,"
                        "\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},"
                        "\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":9,"
                        "\"completion_tokens\":1,\"total_tokens\":10}}");
    for (int i = 0; i < 6; i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", AUTH(KEY_ACME), BODY("both")), 200,
                     "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "seven");
    }
    cr_assert_eq(support_canned_requests(echo), 3, "tried after its circuit opened");
    cr_assert_eq(support_canned_requests(echox), 6);
}
