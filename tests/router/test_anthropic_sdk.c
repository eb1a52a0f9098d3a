/*
 * tests/router/test_anthropic_sdk.c: the official @anthropic-ai/sdk npm
 * client (Node) calls messages.create (and messages.countTokens) through
 * the router in front of an Anthropic-speaking mockllm, plain and
 * streamed, with only its base URL changed: its x-api-key is the tenant's key, the router sends the
 * backend's own. The stream carries the router's cost as an SSE comment
 * after message_stop, which the SDK's parser must skip (and does). The
 * client script is tests/router/anthropic_client.mjs; the package is
 * installed by `make deps` (mk/anthropic.mk).
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TENANT_KEY "sk-anthropic-sdk-tenant"
#define UPSTREAM_KEY "sk-ant-sdk-upstream"

static struct support_proc router, mock;
static char conf_path[64];
static cJSON *result;

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    if (conf_path[0])
        unlink(conf_path);
    cJSON_Delete(result);
}

TestSuite(anthropic_sdk, .fini = teardown, .timeout = 60);

static void start(void)
{
    char hex[65];
    FILE *f;

    support_key_sha256_hex(TENANT_KEY, hex);
    cr_assert_eq(support_mockllm_start(&mock, "--token-delay-ms", "1", "--require-key",
                                       UPSTREAM_KEY, NULL),
                 0);
    strcpy(conf_path, "/tmp/costrouter-asdk-XXXXXX");
    f = fdopen(mkstemp(conf_path), "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "backends:\n"
            "  - {name: m, kind: api, api: anthropic, url: \"http://127.0.0.1:%d/v1\",\n"
            "     api_key: %s, model: claude-mock, quality: 1, context_window: 8192,\n"
            "     input_usd_per_mtok: 3, output_usd_per_mtok: 15}\n"
            "  - {name: o, kind: api, url: \"http://127.0.0.1:%d/v1\", model: gpt-mock,\n"
            "     quality: 1, context_window: 8192, input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
            "routes:\n  - {model: claude, candidates: [m]}\n  - {model: gpt, candidates: [o]}\n"
            "tenants:\n  - {id: sdk, api_keys: [\"sha256:%s\"]}\n",
            mock.port, UPSTREAM_KEY, mock.port, hex);
    fclose(f);
    char *argv[] = {getenv("COSTROUTER_BIN"), "-q", "-c", conf_path, NULL};
    cr_assert_eq(support_proc_start(&router, argv), 0);
}

/* Run the Node client in `mode`, parse the JSON line it prints. */
static cJSON *run_client(const char *mode, const char *key)
{
    char base[64], path[512];
    struct buf out = {0};
    const char *src = getenv("COSTROUTER_SRC") ? getenv("COSTROUTER_SRC") : ".";

    /* The SDK puts /v1/messages after its base URL itself. */
    snprintf(base, sizeof(base), "http://127.0.0.1:%d", router.port);
    snprintf(path, sizeof(path), "%s/build/npm-anthropic", src);
    setenv("ANTHROPIC_NPM_DIR", path, 1);
    snprintf(path, sizeof(path), "%s/tests/router/anthropic_client.mjs", src);
    char *argv[] = {"node", path, base, (char *)key, (char *)mode, NULL};
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

/* mockllm's prompt: 3 + (4 + words(system)) + (4 + words(message)). */
Test(anthropic_sdk, messages_create_plain)
{
    start();
    cJSON *r = run_client("plain", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_str_eq(get(r, "type")->valuestring, "message");
    cr_assert_str_eq(get(r, "stop_reason")->valuestring, "max_tokens");
    cr_assert_str_eq(get(r, "text")->valuestring, "The quick brown fox jumps");
    cr_assert_eq(get(get(r, "usage"), "input_tokens")->valuedouble, 3 + 6 + 8);
    cr_assert_eq(get(get(r, "usage"), "output_tokens")->valuedouble, 5);
}

/* messages.countTokens goes to /v1/messages/count_tokens and gets the
 * upstream's count as it came: mockllm's prompt rule, as above. */
Test(anthropic_sdk, messages_count_tokens)
{
    start();
    cJSON *r = run_client("count", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_eq(get(get(r, "count"), "input_tokens")->valuedouble, 3 + 6 + 8);
}

/* Streamed: every event comes through in order and the SDK's own stream
 * helper gathers the final message; the cost comment after message_stop
 * is in the bytes and bothers neither. */
Test(anthropic_sdk, messages_create_streamed_with_the_cost_comment)
{
    start();
    cJSON *r = run_client("stream", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    const cJSON *types = get(r, "types");
    int n = cJSON_GetArraySize(types);
    /* message_start, content_block_start, 16 deltas, content_block_stop,
     * message_delta, message_stop (the SDK drops ping) */
    cr_assert_eq(n, 21, "%s", cJSON_PrintUnformatted(types));
    cr_assert_str_eq(cJSON_GetArrayItem(types, 0)->valuestring, "message_start");
    cr_assert_str_eq(cJSON_GetArrayItem(types, n - 1)->valuestring, "message_stop");
    cr_assert_gt(strlen(get(r, "text")->valuestring), 0);
    cr_assert_eq(get(get(r, "input"), "input_tokens")->valuedouble, 3 + 8);
    cr_assert_eq(get(get(r, "usage"), "output_tokens")->valuedouble, 16);
    cr_assert_str_eq(get(r, "final_text")->valuestring, "The quick brown");
    cr_assert_eq(get(get(r, "final_usage"), "output_tokens")->valuedouble, 3);

    /* The same stream's bytes: the comment is there for the SDK to skip. */
    static const char body[] = "{\"model\":\"claude\",\"max_tokens\":3,\"stream\":true,"
                               "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    struct support_sse s = {0};
    struct support_sse_event ev;
    struct buf req = {0};

    cr_assert_eq(support_http_format(&req, "POST", "/v1/messages",
                                     "x-api-key: " TENANT_KEY "\r\n", body),
                 0);
    cr_assert_eq(support_sse_open(&s, router.port, req.data, req.len, 5000), 0);
    while (support_sse_next(&s, &ev, 5000) == 1)
        ;
    cr_assert_not_null(memmem(s.resp.raw.data, s.resp.raw.len, "message_stop", 12));
    cr_assert_not_null(memmem(s.resp.raw.data, s.resp.raw.len, ": x-costrouter-cost-usd=", 24));
    support_sse_close(&s);
    buf_free(&req);
}

/* models.list pages through the routes it can use: "claude", not the
 * OpenAI-only "gpt", whose /v1/messages requests would get a 404. */
Test(anthropic_sdk, models_list_holds_the_routes_it_can_use)
{
    start();
    cJSON *r = run_client("models", TENANT_KEY);
    cr_assert(cJSON_IsTrue(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_eq(cJSON_GetArraySize(get(r, "ids")), 1, "%s", cJSON_PrintUnformatted(r));
    cr_assert_str_eq(cJSON_GetArrayItem(get(r, "ids"), 0)->valuestring, "claude");
    cr_assert_str_eq(get(r, "display_name")->valuestring, "claude");
    cr_assert_str_eq(get(r, "retrieved")->valuestring, "claude", "models.retrieve");
}

/* The router's errors outside /v1/messages are Anthropic's too, to the
 * SDK (it sends anthropic-version): an API the router does not serve is
 * a not_found_error, a bad key on models.list an authentication_error. */
Test(anthropic_sdk, errors_off_the_messages_paths_are_anthropic_shaped)
{
    start();
    cJSON *r = run_client("batches", TENANT_KEY);
    cr_assert(cJSON_IsFalse(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_str_eq(get(r, "error_class")->valuestring, "NotFoundError");
    cr_assert_str_eq(get(r, "error_type")->valuestring, "not_found_error", "%s",
                     cJSON_PrintUnformatted(r));
    r = run_client("badkey-models", "sk-not-a-tenant");
    cr_assert(cJSON_IsFalse(get(r, "ok")), "%s", cJSON_PrintUnformatted(r));
    cr_assert_str_eq(get(r, "error_class")->valuestring, "AuthenticationError");
    cr_assert_str_eq(get(r, "error_type")->valuestring, "authentication_error", "%s",
                     cJSON_PrintUnformatted(r));
}

Test(anthropic_sdk, a_bad_key_is_an_authentication_error)
{
    start();
    cJSON *r = run_client("badkey", "sk-not-a-tenant");
    cr_assert(cJSON_IsFalse(get(r, "ok")));
    cr_assert_str_eq(get(r, "error_class")->valuestring, "AuthenticationError");
    cr_assert_eq(get(r, "status")->valuedouble, 401);
    cr_assert_str_eq(get(r, "error_type")->valuestring, "authentication_error");
}

/* The upstream breaks mid-stream: the router's error event, in
 * Anthropic's shape, makes the SDK raise, not end as if complete. */
Test(anthropic_sdk, a_broken_stream_raises_in_the_client)
{
    start();
    cJSON *r = run_client("midstream", TENANT_KEY);
    cr_assert(cJSON_IsFalse(get(r, "ok")), "a broken stream looked complete: %s",
              cJSON_PrintUnformatted(r));
    cr_assert_str_eq(get(r, "error_type")->valuestring, "api_error", "%s",
                     cJSON_PrintUnformatted(r));
}
