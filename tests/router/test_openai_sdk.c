/*
 * tests/router/test_openai_sdk.c: the official openai npm client (Node)
 * talks to the router in front of mockllm, plain and streamed, with only
 * its base URL changed, over plain HTTP and over TLS (Node trusting the
 * test CA through NODE_EXTRA_CA_CERTS). The client script is
 * tests/router/openai_client.mjs; the package is installed by `make deps`
 * (mk/openai.mk).
 */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TENANT_KEY "sk-sdk-tenant"
#define BROKE_KEY "sk-sdk-broke"  /* a tenant whose budget covers no request */

static struct support_proc router, mock;
static char conf_path[64];
static char ca_dir[256]; /* set when the router serves TLS */
static cJSON *result;

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    if (conf_path[0])
        unlink(conf_path);
    if (ca_dir[0])
        support_remove_tree(ca_dir);
    cJSON_Delete(result);
}

TestSuite(openai_sdk, .fini = teardown, .timeout = 60);

/* The router in front of a mock; over TLS with a fresh test CA if `tls`. */
static void start_with(int tls)
{
    char hex[65], broke_hex[65], tls_yaml[700] = "";
    FILE *f;

    if (tls) {
        cr_assert_eq(support_make_test_ca(ca_dir, sizeof(ca_dir)), 0);
        snprintf(tls_yaml, sizeof(tls_yaml),
                 "tls: {cert_file: %s/server.crt, key_file: %s/server.key}\n", ca_dir, ca_dir);
    }
    support_key_sha256_hex(TENANT_KEY, hex);
    support_key_sha256_hex(BROKE_KEY, broke_hex);
    cr_assert_eq(support_mockllm_start(&mock, "--token-delay-ms", "1", NULL), 0);
    strcpy(conf_path, "/tmp/costrouter-sdk-XXXXXX");
    f = fdopen(mkstemp(conf_path), "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "%s"
            "backends:\n"
            "  - {name: m, kind: api, url: \"http://127.0.0.1:%d/v1\", model: mock-model,\n"
            "     quality: 1, context_window: 8192, input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
            "routes:\n  - {model: chat, candidates: [m]}\n"
            "tenants:\n  - {id: sdk, api_keys: [\"sha256:%s\"]}\n"
            "  - {id: broke, api_keys: [\"sha256:%s\"],\n"
            "     budget: {daily_usd: 0.000001, on_exhausted: reject}}\n",
            tls_yaml, mock.port, hex, broke_hex);
    fclose(f);
    char *argv[] = {getenv("COSTROUTER_BIN"), "-q", "-c", conf_path, NULL};
    cr_assert_eq(support_proc_start(&router, argv), 0);
}

static void start(void)
{
    start_with(0);
}

/* Run the Node client in `mode`, parse the JSON line it prints. */
static cJSON *run_client(const char *mode, const char *key)
{
    char base[64], script[512];
    struct buf out = {0};
    const char *src = getenv("COSTROUTER_SRC") ? getenv("COSTROUTER_SRC") : ".";

    snprintf(base, sizeof(base), "%s://127.0.0.1:%d/v1", ca_dir[0] ? "https" : "http",
             router.port);
    if (ca_dir[0]) {
        snprintf(script, sizeof(script), "%s/ca.crt", ca_dir);
        setenv("NODE_EXTRA_CA_CERTS", script, 1);
    }
    snprintf(script, sizeof(script), "%s/build/npm-openai", src);
    setenv("OPENAI_NPM_DIR", script, 1);
    snprintf(script, sizeof(script), "%s/tests/router/openai_client.mjs", src);
    char *argv[] = {"node", script, base, (char *)key, (char *)mode, NULL};
    int rc = support_run(argv, &out, 30000);
    cr_assert_eq(rc, 0, "node exited %d", rc);
    cJSON_Delete(result);
    result = cJSON_ParseWithLength(out.data, out.len);
    cr_assert_not_null(result, "client printed: %.*s", (int)out.len, out.data);
    buf_free(&out);
    return result;
}

static const cJSON *get(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

Test(openai_sdk, plain_chat_models_and_embeddings)
{
    start();
    cJSON *r = run_client("plain", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert(cJSON_IsString(get(r, "content")));
    cr_assert_gt(get(get(r, "usage"), "completion_tokens")->valuedouble, 0);
    cr_assert_str_eq(cJSON_GetArrayItem(get(r, "models"), 0)->valuestring, "chat");
    cr_assert_str_eq(get(r, "retrieved")->valuestring, "chat", "models.retrieve");
    cr_assert_gt(get(r, "embedding_len")->valuedouble, 0);
}

Test(openai_sdk, streamed_chat_with_usage)
{
    start();
    cJSON *r = run_client("stream", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_gt(get(r, "chunks")->valuedouble, 2);
    cr_assert_gt(strlen(get(r, "text")->valuestring), 0);
    cr_assert_gt(get(get(r, "usage"), "completion_tokens")->valuedouble, 0);
}

Test(openai_sdk, streamed_and_plain_chat_over_tls)
{
    start_with(1);
    cJSON *r = run_client("stream", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_gt(get(r, "chunks")->valuedouble, 2);
    cr_assert_gt(get(get(r, "usage"), "completion_tokens")->valuedouble, 0);
    r = run_client("plain", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_gt(get(get(r, "usage"), "completion_tokens")->valuedouble, 0);
}

/* mockllm's Responses prompt: 3 + (4 + words(instructions)) + (4 +
 * words(input)) for a string input, 3 + (4 + words(content)) for one
 * message; 16 output tokens unless max_output_tokens caps them. */
Test(openai_sdk, responses_plain_and_streamed)
{
    start();
    cJSON *r = run_client("responses", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_str_eq(get(r, "status")->valuestring, "incomplete"); /* max_output_tokens: 5 */
    cr_assert_str_eq(get(r, "text")->valuestring, "The quick brown fox jumps");
    cr_assert_eq(get(get(r, "usage"), "input_tokens")->valuedouble, 3 + 6 + 8);
    cr_assert_eq(get(get(r, "usage"), "output_tokens")->valuedouble, 5);
    r = run_client("responses-stream", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    const cJSON *types = get(r, "types");
    int n = cJSON_GetArraySize(types);
    cr_assert_eq(n, 18, "%s", cJSON_PrintUnformatted(types)); /* created, 16 deltas, completed */
    cr_assert_str_eq(cJSON_GetArrayItem(types, 0)->valuestring, "response.created");
    cr_assert_str_eq(cJSON_GetArrayItem(types, n - 1)->valuestring, "response.completed");
    cr_assert_gt(strlen(get(r, "text")->valuestring), 0);
    cr_assert_eq(get(get(r, "usage"), "input_tokens")->valuedouble, 3 + 8);
    cr_assert_eq(get(get(r, "usage"), "output_tokens")->valuedouble, 16);
}

Test(openai_sdk, bad_key_is_an_authentication_error)
{
    start();
    cJSON *r = run_client("badkey", "sk-not-a-tenant");
    cr_assert(cJSON_IsFalse(get(r, "ok")));
    cr_assert_str_eq(get(r, "error_class")->valuestring, "AuthenticationError");
    cr_assert_eq(get(r, "status")->valuedouble, 401);
    cr_assert_str_eq(get(r, "code")->valuestring, "invalid_api_key");
}

Test(openai_sdk, broken_stream_raises_in_the_client)
{
    start();
    cJSON *r = run_client("midstream", TENANT_KEY);
    cr_assert(cJSON_IsFalse(get(r, "ok")), "a broken stream looked complete: %s",
              cJSON_PrintUnformatted(r));
}

/* The sum of costrouter_requests_total's series whose labels hold `labels`. */
static double requests_answered(const char *labels)
{
    static const char name[] = "costrouter_requests_total{";
    static const char get[] = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";
    struct support_http_response r = {0};
    double sum = 0;

    cr_assert_eq(support_http_request(router.port, get, sizeof(get) - 1, 5000, &r), 0);
    cr_assert_eq(buf_append(&r.body, "", 1), 0);
    for (char *line = strtok(r.body.data, "\n"); line; line = strtok(NULL, "\n"))
        if (strncmp(line, name, sizeof(name) - 1) == 0 && strstr(line, labels))
            sum += strtod(strrchr(line, ' ') + 1, NULL);
    support_http_response_free(&r);
    return sum;
}

/* The SDK retries every 429 twice by default; a spent budget says
 * x-should-retry: false, so it asks once and raises at once. */
Test(openai_sdk, spent_budget_is_not_retried_by_the_client)
{
    start();
    cJSON *r = run_client("retries", BROKE_KEY);
    cr_assert(cJSON_IsFalse(get(r, "ok")));
    cr_assert_str_eq(get(r, "error_class")->valuestring, "RateLimitError");
    cr_assert_eq(get(r, "status")->valuedouble, 429);
    cr_assert_str_eq(get(r, "code")->valuestring, "budget_exhausted");
    cr_assert_eq(requests_answered("tenant=\"broke\""), 1, "the client asked %g times",
                 requests_answered("tenant=\"broke\""));
}
