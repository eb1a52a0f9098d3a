/*
 * tests/bench/test_mockllm.c: the simulated LLM server (bench/mockllm)
 * driven as a real process over real sockets with tests/support.
 *
 * The router's integration tests trust mockllm's usage numbers, timing,
 * faults and introspection endpoints; these tests pin them down.
 */
#define _GNU_SOURCE /* memmem */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TIMEOUT_MS 5000

static struct support_proc mock;
static struct support_http_response resp;
static struct buf req;
static cJSON *json;

static void teardown(void)
{
    support_proc_stop(&mock);
    support_http_response_free(&resp);
    buf_free(&req);
    cJSON_Delete(json);
}

/* One timeout for the suite: a test overriding a suite option makes Criterion
 * 2.4.1 leak 48 bytes in its runner with --jobs 2 (LeakSanitizer sees it). */
TestSuite(mockllm, .fini = teardown, .timeout = 30);

/* Stop mockllm and check it exited 0 on SIGTERM. */
static void stop_clean(void)
{
    support_proc_stop(&mock);
    cr_assert(support_proc_exited_cleanly(&mock), "mockllm wait status %d", mock.status);
}

/* Send one request on a new connection; the response lands in resp. */
static int call(const char *method, const char *path, const char *headers, const char *body)
{
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    return support_http_request(mock.port, req.data, req.len, TIMEOUT_MS, &resp);
}

/* Parse resp's body as JSON into the global json (freed in teardown). */
static cJSON *body_json(void)
{
    cJSON_Delete(json);
    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    cr_assert_not_null(json, "body is not JSON: %.*s", (int)resp.body.len, resp.body.data);
    return json;
}

/* Number at a path of object keys (array index as a decimal string). */
static double num(const cJSON *j, const char *a, const char *b)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(j, a);
    if (b != NULL)
        x = cJSON_GetObjectItemCaseSensitive(x, b);
    cr_assert(cJSON_IsNumber(x), "no number at %s.%s", a, b ? b : "");
    return x->valuedouble;
}

static const char *str(const cJSON *j, const char *a)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(j, a);
    cr_assert(cJSON_IsString(x), "no string at %s", a);
    return x->valuestring;
}

static const cJSON *choice0(const cJSON *j)
{
    const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0);
    cr_assert_not_null(c, "no choices[0]");
    return c;
}

static const char chat_body[] =
    "{\"model\":\"gpt-test\",\"messages\":[{\"role\":\"system\",\"content\":\"You are terse.\"},"
    "{\"role\":\"user\",\"content\":\"hello  there\\nworld\"}]}";
/* 3 + (4 + 3 words) + (4 + 3 words) */
#define CHAT_PROMPT_TOKENS 17

Test(mockllm, chat_usage_is_deterministic)
{
    const cJSON *j, *msg;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "5", NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, chat_body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "content-type"), "application/json");
    j = body_json();
    cr_assert_str_eq(str(j, "object"), "chat.completion");
    cr_assert_str_eq(str(j, "model"), "gpt-test");
    cr_assert(strncmp(str(j, "id"), "chatcmpl-", 9) == 0);
    cr_assert_gt(num(j, "created", NULL), 1.6e9);
    msg = cJSON_GetObjectItemCaseSensitive(choice0(j), "message");
    cr_assert_str_eq(str(msg, "role"), "assistant");
    cr_assert_str_eq(str(msg, "content"), "The quick brown fox jumps");
    cr_assert_str_eq(str(choice0(j), "finish_reason"), "stop");
    cr_assert_eq(num(j, "usage", "prompt_tokens"), CHAT_PROMPT_TOKENS);
    cr_assert_eq(num(j, "usage", "completion_tokens"), 5);
    cr_assert_eq(num(j, "usage", "total_tokens"), CHAT_PROMPT_TOKENS + 5);
    stop_clean();
}

Test(mockllm, completions_text_and_max_tokens)
{
    const cJSON *j;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    cr_assert_eq(call("POST", "/v1/completions", NULL,
                      "{\"model\":\"davinci\",\"prompt\":[\"one two\",\"three\"],\"max_tokens\":3}"),
                 0);
    cr_assert_eq(resp.status, 200);
    j = body_json();
    cr_assert_str_eq(str(j, "object"), "text_completion");
    cr_assert_str_eq(str(choice0(j), "text"), "The quick brown");
    cr_assert_str_eq(str(choice0(j), "finish_reason"), "length");
    cr_assert_eq(num(j, "usage", "prompt_tokens"), 3);
    cr_assert_eq(num(j, "usage", "completion_tokens"), 3);
    /* The default is 16 tokens when nothing caps it. */
    cr_assert_eq(call("POST", "/v1/completions", NULL, "{\"model\":\"m\",\"prompt\":\"x\"}"), 0);
    cr_assert_eq(num(body_json(), "usage", "completion_tokens"), 16);
    stop_clean();
}

Test(mockllm, embeddings_and_models)
{
    const cJSON *j, *data, *first;

    cr_assert_eq(support_mockllm_start(&mock, "--model", "served-model", NULL), 0);
    cr_assert_eq(call("POST", "/v1/embeddings", NULL,
                      "{\"model\":\"ignored\",\"input\":[\"a b c\",\"d\"]}"), 0);
    cr_assert_eq(resp.status, 200);
    j = body_json();
    cr_assert_str_eq(str(j, "model"), "served-model");
    data = cJSON_GetObjectItemCaseSensitive(j, "data");
    cr_assert_eq(cJSON_GetArraySize(data), 2);
    first = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(data, 0), "embedding");
    cr_assert_eq(cJSON_GetArraySize(first), 8);
    cr_assert_eq(num(j, "usage", "prompt_tokens"), 4);
    cr_assert_eq(num(j, "usage", "total_tokens"), 4);

    cr_assert_eq(call("GET", "/v1/models", NULL, NULL), 0);
    j = body_json();
    cr_assert_str_eq(str(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "data"), 0),
                         "id"), "served-model");
    /* --model wins over the requested model in completions too. */
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, chat_body), 0);
    cr_assert_str_eq(str(body_json(), "model"), "served-model");
    stop_clean();
}

Test(mockllm, errors_for_bad_requests)
{
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, "{not json"), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_not_null(cJSON_GetObjectItemCaseSensitive(body_json(), "error"));
    cr_assert_eq(call("POST", "/v1/nothing", NULL, "{}"), 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_eq(call("GET", "/v1/chat/completions", NULL, NULL), 0);
    cr_assert_eq(resp.status, 405);
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-tokens: lots\r\n", chat_body), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-status: 429\r\n", chat_body), 0);
    cr_assert_eq(resp.status, 429);
    buf_reset(&req);
    cr_assert_eq(buf_printf(&req, "GARBAGE\r\n\r\n"), 0);
    cr_assert_eq(support_http_request(mock.port, req.data, req.len, TIMEOUT_MS, &resp), 0);
    cr_assert_eq(resp.status, 400);
    stop_clean();
}

/* Where open_stream sends its request. */
static const char *stream_path = "/v1/chat/completions";

/* POST a chat request (or one to stream_path) with `headers` and read the
 * head of its answer into s. Close s with support_sse_close(). */
static void open_stream(struct support_sse *s, const char *headers, const char *body)
{
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", stream_path, headers, body), 0);
    cr_assert_eq(support_sse_open(s, mock.port, req.data, req.len, TIMEOUT_MS), 0);
}

/* Stream a chat request; returns the events' data joined by '|' in out
 * and the number of events (the [DONE] one included). */
static int stream_events(const char *headers, const char *body, struct buf *out)
{
    struct support_sse s;
    struct support_sse_event ev;
    int n = 0, rc;

    open_stream(&s, headers, body);
    cr_assert_eq(s.resp.status, 200);
    cr_assert_str_eq(support_http_header(&s.resp, "content-type"), "text/event-stream");
    cr_assert_str_eq(support_http_header(&s.resp, "transfer-encoding"), "chunked");
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1) {
        cr_assert_eq(buf_printf(out, "%s%s", n ? "|" : "", ev.data), 0);
        n++;
    }
    cr_assert_eq(rc, 0, "stream ended with %d", rc);
    cr_assert(s.resp.raw.len >= 5 &&
              memcmp(s.resp.raw.data + s.resp.raw.len - 5, "0\r\n\r\n", 5) == 0);
    support_sse_close(&s);
    return n;
}

/* Split stream_events' output into its events, as many as `parts` holds; how many. */
#define split_events(joined, parts) split_events_in(joined, parts, sizeof(parts) / sizeof(*parts))

static int split_events_in(char *joined, char **parts, int max)
{
    int n = 0;

    for (char *save = NULL, *t = strtok_r(joined, "|", &save); t && n < max;
         t = strtok_r(NULL, "|", &save))
        parts[n++] = t;
    return n;
}

Test(mockllm, stream_sends_one_event_per_token_then_done)
{
    struct buf events = {0};
    char *last_bar;
    cJSON *chunk;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "4", NULL), 0);
    cr_assert_eq(stream_events(NULL, "{\"model\":\"m\",\"stream\":true,\"messages\":[]}", &events),
                 5);
    cr_assert(strstr(events.data, "\"role\":\"assistant\",\"content\":\"The\"") != NULL);
    cr_assert(strstr(events.data, "\"content\":\" fox\"},\"logprobs\":null,"
                                  "\"finish_reason\":\"stop\"") != NULL);
    cr_assert(strstr(events.data, "usage") == NULL, "usage without include_usage");
    last_bar = strrchr(events.data, '|');
    cr_assert_str_eq(last_bar + 1, "[DONE]");
    *last_bar = '\0';
    chunk = cJSON_Parse(strrchr(events.data, '|') + 1);
    cr_assert_not_null(chunk);
    cr_assert_str_eq(str(chunk, "object"), "chat.completion.chunk");
    cJSON_Delete(chunk);
    buf_free(&events);
    stop_clean();
}

Test(mockllm, include_usage_adds_a_final_usage_chunk)
{
    struct buf events = {0};
    char *parts[8];
    int n;
    cJSON *usage_chunk;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "3", NULL), 0);
    cr_assert_eq(stream_events(NULL,
                               "{\"model\":\"m\",\"stream\":true,\"stream_options\":"
                               "{\"include_usage\":true},\"messages\":[{\"role\":\"user\","
                               "\"content\":\"a b c d\"}]}",
                               &events),
                 5);
    n = split_events(events.data, parts);
    cr_assert_eq(n, 5);
    cr_assert_str_eq(parts[4], "[DONE]");
    usage_chunk = cJSON_Parse(parts[3]);
    cr_assert_not_null(usage_chunk);
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(usage_chunk, "choices")), 0);
    cr_assert_eq(num(usage_chunk, "usage", "prompt_tokens"), 3 + 4 + 4);
    cr_assert_eq(num(usage_chunk, "usage", "completion_tokens"), 3);
    cr_assert_eq(num(usage_chunk, "usage", "total_tokens"), 14);
    cJSON_Delete(usage_chunk);
    /* Token chunks carry "usage":null, as OpenAI's do. */
    cr_assert(strstr(parts[0], "\"usage\":null") != NULL);
    buf_free(&events);
    stop_clean();
}

Test(mockllm, ttft_and_token_delay_are_observed)
{
    struct support_sse s;
    struct support_sse_event ev;
    double first = -1, last = 0;
    int n = 0;

    cr_assert_eq(support_mockllm_start(&mock, "--ttft-ms", "150", NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-tokens: 1\r\n", chat_body), 0);
    cr_assert_geq(resp.ttfb_ms, 140, "non-stream answered after %.1f ms", resp.ttfb_ms);
    /* An x-mock-status error waits the TTFT too (a server that fails
     * after working a while), a stream's as well, and is still the error. */
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-status: 503\r\nx-mock-ttft-ms: 120\r\n",
                      "{\"stream\":true}"),
                 0);
    cr_assert_eq(resp.status, 503);
    cr_assert_geq(resp.ttfb_ms, 110, "error answered after %.1f ms", resp.ttfb_ms);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "\"mock_status\"", 13), "%.*s",
                       (int)resp.body.len, resp.body.data);
    /* Per-request headers override the process defaults. */
    open_stream(&s, "x-mock-ttft-ms: 80\r\nx-mock-token-delay-ms: 40\r\nx-mock-tokens: 4\r\n",
                "{\"stream\":true}");
    cr_assert_geq(s.resp.ttfb_ms, 70);
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1) {
        if (first < 0)
            first = ev.t_ms;
        last = ev.t_ms;
        n++;
    }
    support_sse_close(&s);
    cr_assert_eq(n, 5);
    cr_assert_geq(first, 70, "first token after %.1f ms", first);
    cr_assert_geq(last - first, 3 * 40 - 15, "tokens spread over %.1f ms", last - first);
    stop_clean();
}

/* x-mock-event-pad fills each token event (still one JSON chunk) and
 * x-mock-done-delay-ms holds the end back after the last token. */
Test(mockllm, event_pad_and_done_delay_shape_a_stream)
{
    struct support_sse s;
    struct support_sse_event ev;
    double last_token = 0;
    int n = 0;
    cJSON *chunk;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    open_stream(&s,
                "x-mock-tokens: 2\r\nx-mock-event-pad: 100000\r\nx-mock-done-delay-ms: 150\r\n",
                "{\"stream\":true}");
    while (support_sse_next(&s, &ev, TIMEOUT_MS) == 1) {
        n++;
        if (strcmp(ev.data, "[DONE]") == 0) {
            /* 150 ms held back; the gap is measured from when the last
             * 100 KB token event was read whole, which under TSan can be
             * well after it was sent (137 ms seen). Without the delay: ~0. */
            cr_assert_geq(ev.t_ms - last_token, 100, "[DONE] %.1f ms after the last token",
                          ev.t_ms - last_token);
            continue;
        }
        chunk = cJSON_Parse(ev.data);
        cr_assert_not_null(chunk);
        cr_assert_eq(strlen(str(chunk, "x_mock_pad")), 100000);
        cr_assert_not_null(cJSON_GetObjectItemCaseSensitive(choice0(chunk), "delta"));
        cJSON_Delete(chunk);
        last_token = ev.t_ms;
    }
    support_sse_close(&s);
    cr_assert_eq(n, 3);
    stop_clean();
}

Test(mockllm, fault_500_and_error_rate)
{
    const cJSON *err;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-fault: 500\r\n", chat_body), 0);
    cr_assert_eq(resp.status, 500);
    err = cJSON_GetObjectItemCaseSensitive(body_json(), "error");
    cr_assert(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(err, "message")));
    cr_assert_str_eq(str(err, "type"), "server_error");
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, chat_body), 0);
    cr_assert_eq(resp.status, 200);
    stop_clean();

    cr_assert_eq(support_mockllm_start(&mock, "--error-rate", "1", NULL), 0);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(call("POST", "/v1/chat/completions", NULL, chat_body), 0);
        cr_assert_eq(resp.status, 500);
    }
    /* An x-mock-fault header, even "none", overrides the error rate. */
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-fault: none\r\n", chat_body), 0);
    cr_assert_eq(resp.status, 200);
    stop_clean();

    cr_assert_eq(support_mockllm_start(&mock, "--fault", "500", NULL), 0);
    cr_assert_eq(call("POST", "/v1/embeddings", NULL, "{\"input\":\"x\"}"), 0);
    cr_assert_eq(resp.status, 500);
    stop_clean();
}

/* --fault 429 answers as a rate-limited API; --retry-after and the
 * x-mock-retry-after(-ms) headers set what it asks clients to wait. */
Test(mockllm, fault_429_with_retry_after)
{
    cr_assert_eq(support_mockllm_start(&mock, "--fault", "429", "--retry-after", "3", NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, chat_body), 0);
    cr_assert_eq(resp.status, 429);
    cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(body_json(), "error"), "type"),
                     "rate_limit_exceeded");
    cr_assert_str_eq(support_http_header(&resp, "retry-after"), "3");
    cr_assert_null(support_http_header(&resp, "retry-after-ms"));
    cr_assert_eq(call("POST", "/v1/chat/completions",
                      "x-mock-retry-after: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                      "x-mock-retry-after-ms: 250\r\n",
                      chat_body),
                 0);
    cr_assert_str_eq(support_http_header(&resp, "retry-after"), "Sun, 06 Nov 1994 08:49:37 GMT");
    cr_assert_str_eq(support_http_header(&resp, "retry-after-ms"), "250");
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-fault: none\r\n", chat_body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_null(support_http_header(&resp, "retry-after"), "only a 429 says it");
    stop_clean();
}

/* A mockllm started with `--fault FAULT`, asked for a stream: its events
 * read into s until one does not come within `event_ms`, none of them
 * [DONE]; their count in *n, and the last read's result returned. */
static int fault_stream(const char *fault, int event_ms, struct support_sse *s, int *n)
{
    struct support_sse_event ev;
    int rc;

    cr_assert_eq(support_mockllm_start(&mock, "--fault", fault, NULL), 0);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", NULL,
                                     "{\"stream\":true}"), 0);
    cr_assert_eq(support_sse_open(s, mock.port, req.data, req.len, TIMEOUT_MS), 0);
    cr_assert_eq(s->resp.status, 200);
    for (*n = 0; (rc = support_sse_next(s, &ev, event_ms)) == 1; ++*n)
        cr_assert_str_neq(ev.data, "[DONE]");
    return rc;
}

Test(mockllm, close_midstream_ends_without_terminating_chunk)
{
    struct support_sse s;
    int n, rc = fault_stream("close-midstream", TIMEOUT_MS, &s, &n);

    cr_assert_eq(rc, -ECONNRESET);
    cr_assert(n >= 1 && n <= 3, "%d events before the close", n);
    cr_assert_not(s.resp.complete);
    support_sse_close(&s);

    /* Non-streamed: headers and part of the body, then the close. */
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, chat_body), -ECONNRESET);
    cr_assert_eq(resp.status, 200);
    cr_assert_lt(resp.body.len, (size_t)atoi(support_http_header(&resp, "content-length")));
    stop_clean();
}

/* stall-midstream: what close-midstream sends, then nothing, the
 * connection open (a server hung mid-answer); other connections are
 * served meanwhile. */
Test(mockllm, stall_midstream_sends_part_then_nothing)
{
    struct support_sse s;
    int n, rc = fault_stream("stall-midstream", 500, &s, &n);

    cr_assert_eq(rc, -ETIMEDOUT, "rc %d", rc);
    cr_assert_eq(n, 3, "%d events before the stall", n);
    support_sse_close(&s);

    /* Non-streamed: headers and half the body, then nothing. */
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", NULL, chat_body), 0);
    cr_assert_eq(support_http_request(mock.port, req.data, req.len, 500, &resp), -ETIMEDOUT);
    cr_assert_eq(resp.status, 200);
    cr_assert_gt(resp.body.len, 0);
    cr_assert_lt(resp.body.len, (size_t)atoi(support_http_header(&resp, "content-length")));
    cr_assert_eq(call("GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(resp.status, 200);
    stop_clean();
}

Test(mockllm, close_before_response_and_stall)
{
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-fault: close-before-response\r\n",
                      chat_body),
                 -ECONNRESET);
    cr_assert_eq(resp.status, 0);
    cr_assert_eq(resp.raw.len, 0);

    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     "x-mock-fault: stall\r\n", chat_body), 0);
    cr_assert_eq(support_http_request(mock.port, req.data, req.len, 300, &resp), -ETIMEDOUT);
    cr_assert_eq(resp.raw.len, 0);
    /* A stalled connection does not block the others. */
    cr_assert_eq(call("GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(resp.status, 200);
    stop_clean();
}

Test(mockllm, require_key)
{
    cr_assert_eq(support_mockllm_start(&mock, "--require-key", "sk-backend", NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, chat_body), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(body_json(), "error"), "code"),
                     "invalid_api_key");
    cr_assert_eq(call("POST", "/v1/chat/completions", "Authorization: Bearer sk-other\r\n",
                      chat_body), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_eq(call("POST", "/v1/chat/completions", "Authorization: Bearer sk-backend\r\n",
                      chat_body), 0);
    cr_assert_eq(resp.status, 200);
    /* Test endpoints need no key. */
    cr_assert_eq(call("GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(resp.status, 200);
    stop_clean();
}

Test(mockllm, keep_alive_reuses_one_connection)
{
    struct support_http_conn c;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "2", NULL), 0);
    cr_assert_eq(support_http_connect(&c, mock.port), 0);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", NULL, chat_body), 0);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
        cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
        cr_assert_eq(resp.status, 200);
    }
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    support_http_close(&c);
    cr_assert_eq(num(body_json(), "connections", NULL), 1);
    cr_assert_eq(num(json, "requests", NULL), 2);
    stop_clean();
}

Test(mockllm, pipelined_requests_are_answered_in_order)
{
    struct support_http_conn c;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "2", NULL), 0);
    buf_reset(&req);
    /* A slow one first: its answer must still come first. */
    cr_assert_eq(support_http_format(&req, "POST", "/v1/completions", "x-mock-ttft-ms: 100\r\n",
                                     "{\"prompt\":\"first\"}"), 0);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", NULL,
                                     "{\"stream\":true}"), 0);
    cr_assert_eq(support_http_format(&req, "GET", "/v1/models", NULL, NULL), 0);
    cr_assert_eq(support_http_connect(&c, mock.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    cr_assert_str_eq(str(body_json(), "object"), "text_completion");
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    cr_assert_str_eq(support_http_header(&resp, "content-type"), "text/event-stream");
    cr_assert(strstr(resp.body.data, "data: [DONE]") != NULL);
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    cr_assert_str_eq(str(body_json(), "object"), "list");
    support_http_close(&c);
    stop_clean();
}

Test(mockllm, last_request_echoes_what_was_received)
{
    const char body[] = "{\"model\":\"rewritten\",\"messages\":[]}";
    struct support_http_conn c;
    const cJSON *headers;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions?x=1",
                                     "Authorization: Bearer sk-up\r\nX-Trace-Id: t-1\r\n"
                                     "X-Empty:\r\n",
                                     body), 0);
    /* Dribble the request in small pieces so fields split across reads. */
    cr_assert_eq(support_http_connect(&c, mock.port), 0);
    for (size_t off = 0; off < req.len; off += 7) {
        size_t n = req.len - off < 7 ? req.len - off : 7;
        cr_assert_eq(support_http_send(&c, req.data + off, n), 0);
        usleep(1000);
    }
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    cr_assert_eq(resp.status, 200);
    support_http_close(&c);

    cr_assert_eq(call("GET", "/mock/last-request", NULL, NULL), 0);
    body_json();
    cr_assert_str_eq(str(json, "method"), "POST");
    cr_assert_str_eq(str(json, "path"), "/v1/chat/completions?x=1");
    cr_assert_str_eq(str(json, "body"), body);
    headers = cJSON_GetObjectItemCaseSensitive(json, "headers");
    cr_assert_str_eq(str(headers, "authorization"), "Bearer sk-up");
    cr_assert_str_eq(str(headers, "x-trace-id"), "t-1");
    cr_assert_str_eq(str(headers, "x-empty"), "");
    cr_assert_str_eq(str(headers, "content-type"), "application/json");
    /* /mock requests are neither counted nor remembered. */
    cr_assert_eq(call("GET", "/mock/stats", NULL, NULL), 0);
    cr_assert_eq(num(body_json(), "requests", NULL), 1);
    stop_clean();
}

Test(mockllm, connection_close_is_honoured)
{
    struct support_http_conn c;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "GET", "/v1/models", "Connection: close\r\n", NULL),
                 0);
    cr_assert_eq(support_http_connect(&c, mock.port), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), 0);
    cr_assert_str_eq(support_http_header(&resp, "connection"), "close");
    cr_assert_eq(support_http_read(&c, &resp, TIMEOUT_MS), -ECONNRESET);
    support_http_close(&c);
    stop_clean();
}

Test(mockllm, sigterm_with_open_streams_exits_zero)
{
    struct support_http_conn stalled;
    struct support_sse s;
    struct support_sse_event ev;

    cr_assert_eq(support_mockllm_start(&mock, "--token-delay-ms", "1000", NULL), 0);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     "x-mock-fault: stall\r\n", "{}"), 0);
    cr_assert_eq(support_http_connect(&stalled, mock.port), 0);
    cr_assert_eq(support_http_send(&stalled, req.data, req.len), 0);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", NULL,
                                     "{\"stream\":true}"), 0);
    cr_assert_eq(support_sse_open(&s, mock.port, req.data, req.len, TIMEOUT_MS), 0);
    cr_assert_eq(support_sse_next(&s, &ev, TIMEOUT_MS), 1);
    /* Mid-stream and mid-stall, SIGTERM still ends it at once with 0. */
    stop_clean();
    cr_assert_eq(support_sse_next(&s, &ev, TIMEOUT_MS), -ECONNRESET);
    support_sse_close(&s);
    support_http_close(&stalled);
}

Test(mockllm, tls_with_the_test_ca)
{
    char dir[64], cert[128], key[128], ca[128], url[128];
    struct buf out = {0};

    cr_assert_eq(support_make_test_ca(dir, sizeof(dir)), 0);
    snprintf(cert, sizeof(cert), "%s/server.crt", dir);
    snprintf(key, sizeof(key), "%s/server.key", dir);
    snprintf(ca, sizeof(ca), "%s/ca.crt", dir);
    cr_assert_eq(support_mockllm_start(&mock, "--tls-cert", cert, "--tls-key", key, "--tokens",
                                       "3", NULL), 0);
    snprintf(url, sizeof(url), "https://127.0.0.1:%d/v1/chat/completions", mock.port);
    {
        char *argv[] = {"curl", "-sS", "--cacert", ca, "-H", "Content-Type: application/json",
                        "-d", (char *)chat_body, url, NULL};
        cr_assert_eq(support_run(argv, &out, 10000), 0);
        cr_assert(memmem(out.data, out.len, "\"total_tokens\":20", 17) != NULL, "%.*s",
                  (int)out.len, out.data);
    }
    buf_reset(&out);
    {
        char *argv[] = {"curl", "-sS", "-N", "--cacert", ca, "-d",
                        "{\"stream\":true,\"stream_options\":{\"include_usage\":true}}", url,
                        NULL};
        cr_assert_eq(support_run(argv, &out, 10000), 0);
        cr_assert(memmem(out.data, out.len, "data: [DONE]", 12) != NULL);
        cr_assert(memmem(out.data, out.len, "\"completion_tokens\":3", 21) != NULL);
    }
    {
        /* Without the CA the certificate does not verify: TLS is real. */
        char *argv[] = {"curl", "-s", url, NULL};
        cr_assert_eq(support_run(argv, NULL, 10000), 60);
    }
    buf_free(&out);
    stop_clean();
    support_remove_tree(dir);
}

/* ---- POST /v1/responses ---- */

/* instructions (2 words) and one item of each kind counted: 3 + (4 + 2)
 * + (4 + 3) + (4 + 1) + (4 + 2) + (4 + 1); a reasoning item counts 4. */
static const char responses_body[] =
    "{\"model\":\"gpt-test\",\"instructions\":\"be terse\",\"input\":["
    "{\"role\":\"user\",\"content\":[{\"type\":\"input_text\",\"text\":\"one two\"},"
    "{\"type\":\"input_text\",\"text\":\"three\"}]},"
    "{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"four\"},"
    "{\"type\":\"function_call\",\"call_id\":\"c\",\"name\":\"f\",\"arguments\":\"{\\\"a\\\": 1}\"},"
    "{\"type\":\"function_call_output\",\"call_id\":\"c\",\"output\":\"done\"},"
    "{\"type\":\"reasoning\",\"summary\":[]}]";
#define RESPONSES_PROMPT_TOKENS (3 + 6 + 7 + 5 + 6 + 5 + 4)

Test(mockllm, responses_whole_with_usage_cached_tokens_and_max_output_tokens)
{
    const cJSON *j, *item, *part;
    char body[1024];

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "5", NULL), 0);
    snprintf(body, sizeof(body), "%s}", responses_body);
    cr_assert_eq(call("POST", "/v1/responses", "x-mock-cached-tokens: 4\r\n", body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    j = body_json();
    cr_assert_str_eq(str(j, "object"), "response");
    cr_assert_str_eq(str(j, "status"), "completed");
    cr_assert(strncmp(str(j, "id"), "resp_", 5) == 0);
    item = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "output"), 0);
    cr_assert_str_eq(str(item, "type"), "message");
    part = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(item, "content"), 0);
    cr_assert_str_eq(str(part, "type"), "output_text");
    cr_assert_str_eq(str(part, "text"), "The quick brown fox jumps");
    cr_assert_eq(num(j, "usage", "input_tokens"), RESPONSES_PROMPT_TOKENS);
    cr_assert_eq(num(j, "usage", "output_tokens"), 5);
    cr_assert_eq(num(cJSON_GetObjectItemCaseSensitive(j, "usage"), "input_tokens_details",
                     "cached_tokens"),
                 4);
    /* max_output_tokens caps it: status incomplete, and why. */
    snprintf(body, sizeof(body), "%s,\"max_output_tokens\":2}", responses_body);
    cr_assert_eq(call("POST", "/v1/responses", NULL, body), 0);
    j = body_json();
    cr_assert_str_eq(str(j, "status"), "incomplete");
    cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(j, "incomplete_details"), "reason"),
                     "max_output_tokens");
    cr_assert_eq(num(j, "usage", "output_tokens"), 2);
    cr_assert_eq(num(cJSON_GetObjectItemCaseSensitive(j, "usage"), "input_tokens_details",
                     "cached_tokens"),
                 0);
    /* Under x-mock-usage: omit there is none. */
    cr_assert_eq(call("POST", "/v1/responses", "x-mock-usage: omit\r\n", body), 0);
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(body_json(), "usage"));
    stop_clean();
}

Test(mockllm, responses_stream_created_deltas_then_completed_without_done)
{
    struct buf events = {0};
    char *parts[8];
    int n;
    cJSON *last;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "3", NULL), 0);
    stream_path = "/v1/responses";
    cr_assert_eq(stream_events(NULL,
                               "{\"model\":\"m\",\"stream\":true,\"input\":\"a b c d\"}",
                               &events),
                 5);
    n = split_events(events.data, parts);
    cr_assert_eq(n, 5);
    cr_assert(strstr(parts[0], "\"type\":\"response.created\"") != NULL, "%s", parts[0]);
    cr_assert(strstr(parts[0], "\"usage\":null") != NULL, "%s", parts[0]);
    cr_assert(strstr(parts[1], "\"type\":\"response.output_text.delta\"") != NULL);
    cr_assert(strstr(parts[1], "\"delta\":\"The\"") != NULL, "%s", parts[1]);
    cr_assert(strstr(parts[3], "\"delta\":\" brown\"") != NULL, "%s", parts[3]);
    last = cJSON_Parse(parts[4]);
    cr_assert_not_null(last);
    cr_assert_str_eq(str(last, "type"), "response.completed");
    cr_assert_eq(num(cJSON_GetObjectItemCaseSensitive(last, "response"), "usage", "input_tokens"),
                 3 + 4 + 4);
    cr_assert_eq(num(cJSON_GetObjectItemCaseSensitive(last, "response"), "usage", "output_tokens"),
                 3);
    cJSON_Delete(last);
    buf_free(&events);
    stop_clean();
}

/* x-mock-web-searches: N puts N web_search_call items before the message
 * of a Responses answer (its usage says nothing of them, as OpenAI's
 * does not); a stream has an output_item.added and .done event for each
 * after response.created, and its terminal response lists them too. */
Test(mockllm, responses_report_web_search_calls)
{
    const cJSON *output, *item;
    struct buf events = {0};
    char *parts[12];
    cJSON *e;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "2", NULL), 0);
    cr_assert_eq(call("POST", "/v1/responses", "x-mock-web-searches: 2\r\n",
                      "{\"model\":\"m\",\"input\":\"a b\"}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    output = cJSON_GetObjectItemCaseSensitive(body_json(), "output");
    cr_assert_eq(cJSON_GetArraySize(output), 3);
    for (int i = 0; i < 2; i++) {
        item = cJSON_GetArrayItem(output, i);
        cr_assert_str_eq(str(item, "type"), "web_search_call");
        cr_assert_str_eq(str(item, "status"), "completed");
    }
    cr_assert_str_eq(str(cJSON_GetArrayItem(output, 2), "type"), "message");
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(json, "usage"), "server_tool_use"));
    stream_path = "/v1/responses";
    cr_assert_eq(stream_events("x-mock-web-searches: 1\r\n",
                               "{\"model\":\"m\",\"stream\":true,\"input\":\"a b\"}", &events),
                 6);
    cr_assert_eq(split_events(events.data, parts), 6);
    cr_assert(strstr(parts[1], "\"type\":\"response.output_item.added\"") != NULL, "%s",
              parts[1]);
    e = cJSON_Parse(parts[2]);
    cr_assert_not_null(e);
    cr_assert_str_eq(str(e, "type"), "response.output_item.done");
    cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(e, "item"), "type"), "web_search_call");
    cJSON_Delete(e);
    cr_assert(strstr(parts[3], "\"output_index\":1") != NULL, "%s", parts[3]);
    e = cJSON_Parse(parts[5]);
    cr_assert_not_null(e);
    output = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(e, "response"),
                                              "output");
    cr_assert_eq(cJSON_GetArraySize(output), 2);
    cr_assert_str_eq(str(cJSON_GetArrayItem(output, 0), "type"), "web_search_call");
    cJSON_Delete(e);
    buf_free(&events);
    stop_clean();
}

/* x-mock-file-searches: M puts M file_search_call items after the web
 * search calls, before the message; a stream shows them as it shows
 * those. */
Test(mockllm, responses_report_file_search_calls)
{
    const cJSON *output;
    struct buf events = {0};
    char *parts[12];
    cJSON *e;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "2", NULL), 0);
    cr_assert_eq(call("POST", "/v1/responses",
                      "x-mock-web-searches: 1\r\nx-mock-file-searches: 2\r\n",
                      "{\"model\":\"m\",\"input\":\"a b\"}"),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    output = cJSON_GetObjectItemCaseSensitive(body_json(), "output");
    cr_assert_eq(cJSON_GetArraySize(output), 4);
    cr_assert_str_eq(str(cJSON_GetArrayItem(output, 0), "type"), "web_search_call");
    for (int i = 1; i < 3; i++) {
        cr_assert_str_eq(str(cJSON_GetArrayItem(output, i), "type"), "file_search_call");
        cr_assert_str_eq(str(cJSON_GetArrayItem(output, i), "status"), "completed");
    }
    cr_assert_str_eq(str(cJSON_GetArrayItem(output, 3), "type"), "message");
    stream_path = "/v1/responses";
    cr_assert_eq(stream_events("x-mock-file-searches: 1\r\n",
                               "{\"model\":\"m\",\"stream\":true,\"input\":\"a b\"}", &events),
                 6);
    cr_assert_eq(split_events(events.data, parts), 6);
    e = cJSON_Parse(parts[2]);
    cr_assert_not_null(e);
    cr_assert_str_eq(str(e, "type"), "response.output_item.done");
    cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(e, "item"), "type"),
                     "file_search_call");
    cJSON_Delete(e);
    buf_free(&events);
    stop_clean();
}

/* The Responses API has no stream_options.include_usage: a body that has
 * it is refused, so a router adding it is seen at once. */
Test(mockllm, responses_refuse_stream_options_include_usage)
{
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    cr_assert_eq(call("POST", "/v1/responses", NULL,
                      "{\"model\":\"m\",\"stream\":true,\"input\":\"hi\","
                      "\"stream_options\":{\"include_usage\":true}}"),
                 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(body_json(), "error"), "code"),
                     "unknown_parameter");
    stop_clean();
}

/* The service tier an answer names, as OpenAI's do: the one asked for
 * ("auto" runs at default), or x-mock-service-tier's (what a request was
 * "run at"), after the usage of a whole answer, in every chunk of a
 * stream, in a Responses object; none when neither says; a tier that is
 * none of OpenAI's is a 400. */
Test(mockllm, service_tier_as_asked_or_as_told)
{
    struct buf events = {0};
    char *parts[8];

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "2", NULL), 0);
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL,
                      "{\"model\":\"m\",\"service_tier\":\"flex\",\"messages\":[]}"),
                 0);
    cr_assert_str_eq(str(body_json(), "service_tier"), "flex");
    cr_assert_not_null(strstr(resp.body.data, "},\"service_tier\":\"flex\"}"), "after the usage");
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL,
                      "{\"model\":\"m\",\"service_tier\":\"auto\",\"messages\":[]}"),
                 0);
    cr_assert_str_eq(str(body_json(), "service_tier"), "default");
    cr_assert_eq(call("POST", "/v1/chat/completions", NULL, "{\"model\":\"m\",\"messages\":[]}"),
                 0);
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(body_json(), "service_tier"));
    cr_assert_eq(call("POST", "/v1/responses", "x-mock-service-tier: priority\r\n",
                      "{\"model\":\"m\",\"service_tier\":\"flex\",\"input\":\"hi\"}"),
                 0);
    cr_assert_str_eq(str(body_json(), "service_tier"), "priority");
    cr_assert_eq(call("POST", "/v1/chat/completions", "x-mock-service-tier: cheap\r\n",
                      "{\"model\":\"m\",\"messages\":[]}"),
                 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_eq(stream_events("x-mock-service-tier: flex\r\n",
                               "{\"model\":\"m\",\"stream\":true,\"messages\":[],"
                               "\"stream_options\":{\"include_usage\":true}}",
                               &events),
                 4);
    cr_assert_eq(split_events(events.data, parts), 4);
    for (int i = 0; i < 3; i++)
        cr_assert_not_null(strstr(parts[i], "\"service_tier\":\"flex\""), "%s", parts[i]);
    buf_free(&events);
    stop_clean();
}

/* ---- POST /v1/messages (Anthropic) ---- */

/* system (2 words as a text block) and two messages: 3 + (4 + 2) + (4 +
 * 3) + (4 + 1). */
static const char messages_body[] =
    "{\"model\":\"claude-test\",\"max_tokens\":%d,%s\"system\":[{\"type\":\"text\",\"text\":"
    "\"be terse\"}],\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
    "\"text\":\"one two three\"}]},{\"role\":\"assistant\",\"content\":\"four\"}]}";
#define MESSAGES_PROMPT_TOKENS (3 + 6 + 7 + 5)
#define ANTHROPIC "x-api-key: sk-ant\r\nanthropic-version: 2023-06-01\r\n"

/* The error in an Anthropic-shaped answer: {"type":"error","error":{type}}. */
static const char *anthropic_error_type(void)
{
    const cJSON *j = body_json();

    cr_assert_str_eq(str(j, "type"), "error");
    return str(cJSON_GetObjectItemCaseSensitive(j, "error"), "type");
}

Test(mockllm, messages_whole_with_cache_counts_and_max_tokens)
{
    const cJSON *j, *block;
    char body[1024];

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "5", NULL), 0);
    snprintf(body, sizeof(body), messages_body, 100, "");
    cr_assert_eq(call("POST", "/v1/messages",
                      ANTHROPIC "x-mock-cached-tokens: 4\r\nx-mock-cache-write-tokens: 6\r\n"
                                "x-mock-cache-write-1h-tokens: 2\r\n",
                      body),
                 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    j = body_json();
    cr_assert_str_eq(str(j, "type"), "message");
    cr_assert_str_eq(str(j, "role"), "assistant");
    cr_assert_str_eq(str(j, "model"), "claude-test");
    cr_assert_str_eq(str(j, "stop_reason"), "end_turn");
    block = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "content"), 0);
    cr_assert_str_eq(str(block, "type"), "text");
    cr_assert_str_eq(str(block, "text"), "The quick brown fox jumps");
    /* input_tokens excludes both cache counts, as Anthropic's does */
    cr_assert_eq(num(j, "usage", "input_tokens"), MESSAGES_PROMPT_TOKENS - 4 - 6);
    cr_assert_eq(num(j, "usage", "cache_read_input_tokens"), 4);
    cr_assert_eq(num(j, "usage", "cache_creation_input_tokens"), 6);
    cr_assert_eq(num(cJSON_GetObjectItemCaseSensitive(j, "usage"), "cache_creation",
                     "ephemeral_5m_input_tokens"),
                 4);
    cr_assert_eq(num(cJSON_GetObjectItemCaseSensitive(j, "usage"), "cache_creation",
                     "ephemeral_1h_input_tokens"),
                 2);
    cr_assert_eq(num(j, "usage", "output_tokens"), 5);
    snprintf(body, sizeof(body), messages_body, 2, "");
    cr_assert_eq(call("POST", "/v1/messages", ANTHROPIC, body), 0);
    j = body_json();
    cr_assert_str_eq(str(j, "stop_reason"), "max_tokens");
    cr_assert_eq(num(j, "usage", "output_tokens"), 2);
    cr_assert_eq(num(j, "usage", "input_tokens"), MESSAGES_PROMPT_TOKENS);
    cr_assert_eq(call("POST", "/v1/messages", ANTHROPIC "x-mock-usage: omit\r\n", body), 0);
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(body_json(), "usage"));
    stop_clean();
}

/* message_start (input counts, output 1), content_block_start, ping, one
 * text_delta per token, content_block_stop, message_delta (the output
 * count), message_stop; no [DONE]. */
Test(mockllm, messages_stream_is_anthropic_shaped)
{
    static const char *const types[] = {"message_start", "content_block_start", "ping",
                                        "content_block_delta", "content_block_delta",
                                        "content_block_stop", "message_delta", "message_stop"};
    struct buf events = {0};
    char *parts[8], body[1024];
    cJSON *e;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "2", NULL), 0);
    stream_path = "/v1/messages";
    snprintf(body, sizeof(body), messages_body, 100, "\"stream\":true,");
    cr_assert_eq(stream_events(ANTHROPIC "x-mock-cached-tokens: 3\r\n", body, &events), 8);
    cr_assert_eq(split_events(events.data, parts), 8);
    for (int i = 0; i < 8; i++) {
        e = cJSON_Parse(parts[i]);
        cr_assert_not_null(e, "%s", parts[i]);
        cr_assert_str_eq(str(e, "type"), types[i]);
        if (i == 0) {
            const cJSON *m = cJSON_GetObjectItemCaseSensitive(e, "message");
            cr_assert_eq(num(m, "usage", "input_tokens"), MESSAGES_PROMPT_TOKENS - 3);
            cr_assert_eq(num(m, "usage", "cache_read_input_tokens"), 3);
            cr_assert_eq(num(m, "usage", "output_tokens"), 1);
        }
        if (i == 4)
            cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(e, "delta"), "text"), " quick");
        if (i == 6)
            cr_assert_eq(num(e, "usage", "output_tokens"), 2);
        cJSON_Delete(e);
    }
    buf_free(&events);
    stop_clean();
}

/* x-mock-web-searches: N puts Anthropic's server_tool_use count in the
 * usage: a whole answer's, and in a stream message_delta's (message_start
 * says 0); a stream also starts a server_tool_use block for each search
 * (started and stopped) before its text block, whose index follows
 * theirs; without it there is no server_tool_use; a bad count is a 400. */
Test(mockllm, messages_report_web_searches)
{
    const cJSON *usage;
    struct buf events = {0};
    char *parts[24], body[1024];
    cJSON *e;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "2", NULL), 0);
    snprintf(body, sizeof(body), messages_body, 100, "");
    cr_assert_eq(call("POST", "/v1/messages", ANTHROPIC "x-mock-web-searches: 3\r\n", body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    usage = cJSON_GetObjectItemCaseSensitive(body_json(), "usage");
    cr_assert_eq(num(usage, "server_tool_use", "web_search_requests"), 3);
    cr_assert_eq(num(usage, "output_tokens", NULL), 2);
    cr_assert_eq(call("POST", "/v1/messages", ANTHROPIC, body), 0);
    usage = cJSON_GetObjectItemCaseSensitive(body_json(), "usage");
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(usage, "server_tool_use"));
    cr_assert_eq(call("POST", "/v1/messages", ANTHROPIC "x-mock-web-searches: x\r\n", body), 0);
    cr_assert_eq(resp.status, 400);
    stream_path = "/v1/messages";
    snprintf(body, sizeof(body), messages_body, 100, "\"stream\":true,");
    /* message_start, 5 x (block start, stop), text start, ping, 2 deltas,
     * its stop, message_delta, message_stop */
    cr_assert_eq(stream_events(ANTHROPIC "x-mock-web-searches: 5\r\n", body, &events), 18);
    cr_assert_eq(split_events(events.data, parts), 18);
    e = cJSON_Parse(parts[0]);
    cr_assert_not_null(e);
    usage = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(e, "message"), "usage");
    cr_assert_eq(num(usage, "server_tool_use", "web_search_requests"), 0);
    cJSON_Delete(e);
    for (int i = 0; i < 5; i++) {
        e = cJSON_Parse(parts[1 + 2 * i]);
        cr_assert_not_null(e);
        cr_assert_str_eq(str(e, "type"), "content_block_start");
        cr_assert_eq(num(e, "index", NULL), i);
        cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(e, "content_block"), "type"),
                         "server_tool_use");
        cr_assert_str_eq(str(cJSON_GetObjectItemCaseSensitive(e, "content_block"), "name"),
                         "web_search");
        cJSON_Delete(e);
    }
    e = cJSON_Parse(parts[13]);
    cr_assert_not_null(e);
    cr_assert_str_eq(str(e, "type"), "content_block_delta");
    cr_assert_eq(num(e, "index", NULL), 5, "the text block follows the searches'");
    cJSON_Delete(e);
    e = cJSON_Parse(parts[16]);
    cr_assert_not_null(e);
    cr_assert_str_eq(str(e, "type"), "message_delta");
    usage = cJSON_GetObjectItemCaseSensitive(e, "usage");
    cr_assert_eq(num(usage, "server_tool_use", "web_search_requests"), 5);
    cJSON_Delete(e);
    buf_free(&events);
    stop_clean();
}

/* Without x-api-key (or with another than --require-key) a 401
 * authentication_error; without anthropic-version a 400. */
Test(mockllm, messages_require_x_api_key_and_anthropic_version)
{
    char body[1024];

    cr_assert_eq(support_mockllm_start(&mock, "--require-key", "sk-ant", NULL), 0);
    snprintf(body, sizeof(body), messages_body, 5, "");
    cr_assert_eq(call("POST", "/v1/messages", "anthropic-version: 2023-06-01\r\n", body), 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_str_eq(anthropic_error_type(), "authentication_error");
    cr_assert_eq(call("POST", "/v1/messages",
                      "x-api-key: sk-other\r\nanthropic-version: 2023-06-01\r\n", body),
                 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_eq(call("POST", "/v1/messages", "Authorization: Bearer sk-ant\r\n"
                                              "anthropic-version: 2023-06-01\r\n", body),
                 0);
    cr_assert_eq(resp.status, 401, "a Bearer token is not Anthropic's way");
    cr_assert_eq(call("POST", "/v1/messages", "x-api-key: sk-ant\r\n", body), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_str_eq(anthropic_error_type(), "invalid_request_error");
    cr_assert_eq(call("POST", "/v1/messages", "x-api-key: sk-ant\r\nanthropic-version:\r\n", body),
                 0);
    cr_assert_eq(resp.status, 400, "an empty version is none");
    cr_assert_eq(call("POST", "/v1/messages", ANTHROPIC, body), 0);
    cr_assert_eq(resp.status, 200);
    stop_clean();
}

/* count_tokens: the same requirements; the Messages prompt's count as
 * {"input_tokens": N} (3 + 4 + 2 words of system + 4 + 3 + 4 + 1 = 21). */
Test(mockllm, count_tokens_counts_a_messages_prompt)
{
    char body[1024];

    cr_assert_eq(support_mockllm_start(&mock, "--require-key", "sk-ant", NULL), 0);
    snprintf(body, sizeof(body), messages_body, 5, "");
    cr_assert_eq(call("POST", "/v1/messages/count_tokens", "anthropic-version: 2023-06-01\r\n",
                      body),
                 0);
    cr_assert_eq(resp.status, 401);
    cr_assert_str_eq(anthropic_error_type(), "authentication_error");
    cr_assert_eq(call("POST", "/v1/messages/count_tokens", "x-api-key: sk-ant\r\n", body), 0);
    cr_assert_eq(resp.status, 400);
    cr_assert_eq(call("POST", "/v1/messages/count_tokens", ANTHROPIC, body), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(resp.body.len, strlen("{\"input_tokens\":21}"));
    cr_assert_eq(memcmp(resp.body.data, "{\"input_tokens\":21}", resp.body.len), 0);
    stop_clean();
}
