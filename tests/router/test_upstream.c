/*
 * tests/router/test_upstream.c: router/upstream.c's read timeout, end to
 * end: a real router in front of real mockllm processes.
 *
 * An answer that has begun (a stream's first event, a plain answer's
 * head) and then goes silent is given up after the backend's
 * read_timeout_ms without a read, not held until total_timeout_ms: the
 * client, its budget hold and the backend's slot are freed. Before any
 * byte went to the client that is a failure like a timeout before the
 * answer (the next candidate serves); after, the stream ends as a broken
 * one does. A slow but steady answer, a client slow to read and a stream
 * waiting for its first event are not cut by it.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tests/support/canned.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"
#include "tests/support/record.h"

#define TIMEOUT_MS 5000
#define TENANT_KEY "sk-upstream-tenant"
#define AUTH "Authorization: Bearer " TENANT_KEY "\r\n"
#define ADMIN_KEY "adm-upstream"
#define ADMIN "Authorization: Bearer " ADMIN_KEY "\r\n"
#define CHAT "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]}"
#define CHAT_STREAM                                                                            \
    "{\"model\":\"chat\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hello "  \
    "there\"}]}"

static struct support_proc router, mock_a, mock_b;
static struct support_canned *canned; /* a raw upstream, for answers mockllm will not give */
static struct support_http_response resp;
static struct buf req;
static char conf_path[64], log_path[64];

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock_a);
    support_proc_stop(&mock_b);
    support_canned_stop(canned);
    canned = NULL;
    support_http_response_free(&resp);
    buf_free(&req);
    if (conf_path[0])
        unlink(conf_path);
    if (log_path[0])
        unlink(log_path);
    conf_path[0] = log_path[0] = '\0';
}

TestSuite(upstream, .fini = teardown, .timeout = 60);

/* Write the config: backend a on mock A with the extra keys `extra_a`
 * (a YAML flow fragment starting with ", " or ""), and, when mock B
 * runs, backend b on it, ten times dearer, after a in the route. */
static void write_config(const char *extra_a)
{
    char hex[65], b[512] = "";
    FILE *f;

    support_key_sha256_hex(TENANT_KEY, hex);
    if (mock_b.pid)
        snprintf(b, sizeof(b),
                 "  - {name: b, kind: api, url: \"http://127.0.0.1:%d/v1\", model: up-b, "
                 "input_usd_per_mtok: 10, output_usd_per_mtok: 20}\n",
                 mock_b.port);
    f = fopen(conf_path, "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "admin_key: " ADMIN_KEY "\n"
            "cost_log: %s\n"
            "cache: {enabled: false}\n"
            "backends:\n"
            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: up-a, "
            "input_usd_per_mtok: 1, output_usd_per_mtok: 2%s}\n"
            "%s"
            "routes:\n"
            "  - {model: chat, candidates: [a%s]}\n"
            "tenants:\n"
            "  - {id: t1, api_keys: [\"sha256:%s\"]}\n",
            log_path, mock_a.port, extra_a, b, mock_b.pid ? ", b" : "", hex);
    fclose(f);
}

/* Start the router on write_config(extra_a). */
static void start_router(const char *extra_a)
{
    int fd;

    strcpy(conf_path, "/tmp/costrouter-up-XXXXXX");
    fd = mkstemp(conf_path);
    cr_assert_geq(fd, 0);
    close(fd);
    strcpy(log_path, "/tmp/costrouter-up-log-XXXXXX");
    fd = mkstemp(log_path);
    cr_assert_geq(fd, 0);
    close(fd);
    write_config(extra_a);
    char *argv[] = {getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter", "-q",
                    "-c", conf_path, NULL};
    cr_assert_eq(support_proc_start(&router, argv), 0, "router did not start");
}

static int call(const char *path, const char *headers, const char *body)
{
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, body ? "POST" : "GET", path, headers, body), 0);
    return support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp);
}

/* How a stream read to its end went. */
struct stream_end {
    int rc;         /* support_sse_next's last: 0 clean end, <0 cut or timed out */
    int events;     /* events read, the error event too */
    int deltas;     /* events carrying a delta */
    int error;      /* an error event came */
    int done;       /* its API's clean end came ([DONE], response.completed) */
    double ms;      /* from the request sent to the stream's end */
    char backend[8]; /* x-costrouter-backend */
};

/* POST `body` to `path` with the tenant key and `headers`, and read the
 * stream to its end (each event within `gap_ms`). */
static struct stream_end read_stream(const char *path, const char *headers, const char *body,
                                     int gap_ms)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    struct stream_end e = {0};
    char head[512];
    double t0;

    snprintf(head, sizeof(head), AUTH "%s", headers);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", path, head, body), 0);
    t0 = support_mono_ms();
    cr_assert_eq(support_sse_open(&s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    cr_assert_eq(s.resp.status, 200, "status %d", s.resp.status);
    snprintf(e.backend, sizeof(e.backend), "%s",
             support_http_header(&s.resp, "x-costrouter-backend")
                 ? support_http_header(&s.resp, "x-costrouter-backend")
                 : "");
    while ((e.rc = support_sse_next(&s, &ev, gap_ms)) == 1) {
        e.events++;
        e.deltas += strstr(ev.data, "delta") != NULL;
        e.error |= strstr(ev.data, "\"error\"") != NULL;
        e.done |= strcmp(ev.data, "[DONE]") == 0 || strstr(ev.data, "response.completed");
    }
    e.ms = support_mono_ms() - t0;
    support_sse_close(&s);
    return e;
}

/* ---- a stream that goes silent after it has begun ---- */

/* A Responses stream whose backend sends its head and response.created at
 * once, then nothing (mockllm's first token 60 s away: a backend hung
 * after its first event). Its first byte came, so first_byte_timeout_ms
 * (300) was over; the stream was held until total_timeout_ms (4 s here,
 * 600 s by default), with the client, its budget hold and the backend's
 * slot. Now read_timeout_ms (by default the backend's
 * first_byte_timeout_ms) ends it: an error event, no clean end. */
Test(upstream, a_stream_silent_after_its_first_event_ends_at_the_read_timeout)
{
    struct stream_end e;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(", first_byte_timeout_ms: 300, total_timeout_ms: 4000");
    e = read_stream("/v1/responses", "x-mock-head-first: 1\r\nx-mock-ttft-ms: 60000\r\n",
                    "{\"model\":\"chat\",\"stream\":true,\"input\":\"hello there\"}", 10000);
    cr_assert_geq(e.events, 2, "%d events", e.events); /* response.created, the error */
    cr_assert(e.error, "no error event");
    cr_assert_not(e.done);
    cr_assert_neq(e.rc, 0, "the stream ended as if it were complete");
    cr_assert_lt(e.ms, 2000.0, "the silent stream was held %.0f ms", e.ms);
    cr_assert_geq(e.ms, 250.0, "cut after %.0f ms, before its read timeout", e.ms);
}

/* A chat stream whose backend sends three tokens, then nothing, its
 * connection open: ended after read_timeout_ms (by default
 * first_byte_timeout_ms, 300 here) with an error event, not [DONE], and
 * charged the prompt and the three deltas that passed, as a stream cut
 * by its backend is. Before, it was held until total_timeout_ms. */
Test(upstream, a_stream_stalled_mid_way_ends_with_an_error_and_is_charged_what_passed)
{
    struct stream_end e;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(", first_byte_timeout_ms: 300, total_timeout_ms: 6000");
    e = read_stream("/v1/chat/completions", "x-mock-tokens: 8\r\nx-mock-fault: stall-midstream\r\n",
                    CHAT_STREAM, 10000);
    cr_assert_eq(e.deltas, 3, "%d deltas", e.deltas);
    cr_assert(e.error, "no error event");
    cr_assert_not(e.done);
    cr_assert_eq(e.rc, -ECONNRESET, "rc %d", e.rc);
    cr_assert_lt(e.ms, 2500.0, "the stalled stream was held %.0f ms", e.ms);
    cJSON *rec = record_last(&router, log_path);
    double prompt = record_num(rec, "billed_prompt_tokens");
    cr_assert_gt(prompt, 0);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 3);
    cr_assert_float_eq(record_num(rec, "cost_usd"), (prompt * 1 + 3 * 2) / 1e6, 1e-9);
    cJSON_Delete(rec);
}

/* Such a stall is the backend's failure, as a stream it cuts is: three in
 * a row open its circuit, and the next stream goes to b. (One ended by
 * total_timeout_ms is not counted, as a client slow to read may cause
 * it; a read timeout does not run while the client holds the stream
 * back.) */
Test(upstream, streams_stalled_mid_way_open_the_backends_circuit)
{
    struct stream_end e;

    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "stall-midstream", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    start_router(", first_byte_timeout_ms: 200, total_timeout_ms: 2000");
    for (int i = 0; i < 4; i++) {
        e = read_stream("/v1/chat/completions", "", CHAT_STREAM, 10000);
        cr_assert_str_eq(e.backend, i < 3 ? "a" : "b", "stream %d", i);
        cr_assert(i < 3 ? e.rc != 0 && e.error : e.rc == 0 && e.done, "stream %d: rc %d", i,
                  e.rc);
    }
}

/* ---- a plain answer that goes silent after its head ---- */

/* A plain answer is held until it ends: one whose body stops half-way,
 * its connection open, has shown the client nothing, so after
 * read_timeout_ms the next candidate serves it (before: after
 * total_timeout_ms). */
Test(upstream, a_plain_answer_stalled_after_its_head_falls_back)
{
    double t0;

    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "stall-midstream", NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    start_router(", first_byte_timeout_ms: 300, total_timeout_ms: 4000");
    t0 = support_mono_ms();
    cr_assert_eq(call("/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    cr_assert_lt(support_mono_ms() - t0, 2000.0, "a's stalled answer was waited for %.0f ms",
                 support_mono_ms() - t0);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_eq(record_num(rec, "fallbacks"), 1);
    cr_assert_eq(record_num(rec, "billed_completion_tokens"), 16);
    cJSON_Delete(rec);
}

/* With no other candidate, the client gets the timeout: a 504. */
Test(upstream, a_plain_answer_stalled_after_its_head_with_no_fallback_is_a_504)
{
    double t0;

    cr_assert_eq(support_mockllm_start(&mock_a, "--fault", "stall-midstream", NULL), 0);
    start_router(", first_byte_timeout_ms: 300, total_timeout_ms: 4000");
    t0 = support_mono_ms();
    cr_assert_eq(call("/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 504, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "\"upstream_timeout\"", 18),
                       "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_lt(support_mono_ms() - t0, 2000.0, "a's stalled answer was waited for %.0f ms",
                 support_mono_ms() - t0);
}

/* A plain answer over 8 MiB is not held: it goes out as it comes. One
 * whose backend stops sending after 9 MiB, its connection open, had
 * reached the client: it ends there, unfinished (no last chunk, so the
 * client sees it cut), after read_timeout_ms, and is charged the prompt
 * and the text that passed (its content, 1000 times "and so on "). */
Test(upstream, a_big_plain_answer_stalled_after_it_went_out_ends_unfinished)
{
    struct buf body = {0}, answer = {0};
    double t0;

    cr_assert_eq(buf_append_lit(&body, "{\"id\":\"chatcmpl-big\",\"object\":\"chat.completion\","
                                       "\"choices\":[{\"index\":0,\"message\":{\"role\":"
                                       "\"assistant\",\"content\":\""),
                 0);
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(buf_append_lit(&body, "and so on "), 0);
    /* then logprobs (small tokens, as a real answer's) past 9 MiB */
    cr_assert_eq(buf_append_lit(&body, "\"},\"logprobs\":{\"content\":["), 0);
    while (body.len < 9u << 20)
        cr_assert_eq(buf_append_lit(&body, "{\"token\":\"ab\",\"logprob\":-0.1,\"bytes\":[97,98],"
                                           "\"top_logprobs\":[]},"),
                     0);
    cr_assert_eq(buf_printf(&answer,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            "Content-Length: %zu\r\n\r\n",
                            body.len + 1000),
                 0);
    cr_assert_eq(buf_append(&answer, body.data, body.len), 0);
    canned = support_canned_start(answer.data, answer.len);
    cr_assert_not_null(canned);
    support_canned_hold(canned, 1);
    buf_free(&body);
    buf_free(&answer);
    mock_a.port = support_canned_port(canned); /* backend a: the canned upstream */
    start_router(", first_byte_timeout_ms: 300, total_timeout_ms: 5000");
    t0 = support_mono_ms();
    cr_assert_eq(call("/v1/chat/completions", AUTH, CHAT), -ECONNRESET);
    cr_assert_eq(resp.status, 200);
    cr_assert_geq(resp.body.len, 9u << 20);
    cr_assert_lt(support_mono_ms() - t0, 3000.0, "the stalled answer was held %.0f ms", support_mono_ms() - t0);
    cJSON *rec = record_last(&router, log_path);
    cr_assert_gt(record_num(rec, "billed_prompt_tokens"), 0);
    cr_assert_geq(record_num(rec, "billed_completion_tokens"), 1000); /* 3000 words */
    cJSON_Delete(rec);
}

/* ---- what the read timeout must not cut ---- */

/* Tokens every 300 ms with read_timeout_ms 500: each read comes in time,
 * the stream is whole (the one timer is re-armed from the last read, not
 * from when it was set). */
Test(upstream, a_slow_but_steady_stream_is_not_cut)
{
    struct stream_end e;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(", read_timeout_ms: 500");
    e = read_stream("/v1/chat/completions", "x-mock-tokens: 8\r\nx-mock-token-delay-ms: 300\r\n",
                    CHAT_STREAM, 5000);
    cr_assert_eq(e.rc, 0, "the stream was cut after %.0f ms, %d deltas", e.ms, e.deltas);
    cr_assert(e.done && !e.error);
    cr_assert_eq(e.deltas, 8);
    cr_assert_geq(e.ms, 2000.0); /* 7 gaps of 300 ms */
}

/* Until a stream's first event (its head alone is no answer), the
 * first-byte timeout runs, not the read timeout: a stream whose head
 * comes at once and its first token after 800 ms is served whole with
 * read_timeout_ms 200; a backend that says nothing gets its 504 after
 * first_byte_timeout_ms as before. */
Test(upstream, until_the_first_event_the_first_byte_timeout_runs)
{
    struct stream_end e;
    double t0;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(", first_byte_timeout_ms: 3000, read_timeout_ms: 200");
    e = read_stream("/v1/chat/completions", "x-mock-head-first: 1\r\nx-mock-ttft-ms: 800\r\n",
                    CHAT_STREAM, 5000);
    cr_assert_eq(e.rc, 0, "the stream was cut after %.0f ms", e.ms);
    cr_assert(e.done && e.deltas == 16, "%d deltas", e.deltas);
    cr_assert_geq(e.ms, 750.0);
    t0 = support_mono_ms();
    cr_assert_eq(call("/v1/chat/completions", AUTH "x-mock-fault: stall\r\n", CHAT), 0);
    cr_assert_eq(resp.status, 504, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_geq(support_mono_ms() - t0, 2900.0, "a silent backend got %.0f ms", support_mono_ms() - t0);
}

/* A client that reads nothing for a while holds the stream back: the
 * router stops reading its backend (the answer waits in the router's and
 * the kernel's buffers). That silence is the client's, not the
 * backend's: the read timeout does not run while reading is paused, and
 * the stream is whole once the client reads. */
Test(upstream, a_client_slow_to_read_is_not_cut_by_the_read_timeout)
{
    struct support_http_conn c;
    struct support_http_response r = {0};
    char headers[256];
    long max = 4L << 20, lo, def;
    FILE *f = fopen("/proc/sys/net/ipv4/tcp_wmem", "r");

    /* 2 MB events, more of them than the socket buffers between the
     * router and the client hold: the router must stop reading */
    if (f != NULL) {
        if (fscanf(f, "%ld %ld %ld", &lo, &def, &max) != 3)
            max = 4L << 20;
        fclose(f);
    }
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(", read_timeout_ms: 300");
    snprintf(headers, sizeof(headers), AUTH "x-mock-tokens: %ld\r\nx-mock-event-pad: %d\r\n",
             max / (2L << 20) + 3, 2 << 20);
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", headers, CHAT_STREAM),
                 0);
    cr_assert_eq(support_http_connect_rcvbuf(&c, router.port, 4096), 0);
    cr_assert_eq(support_http_send(&c, req.data, req.len), 0);
    usleep(1500 * 1000); /* five read timeouts without reading */
    cr_assert_eq(support_http_read(&c, &r, 20000), 0, "the stream was cut after %zu bytes",
                 r.raw.len);
    cr_assert_eq(r.status, 200);
    cr_assert_not_null(memmem(r.body.data, r.body.len, "data: [DONE]", 12));
    cr_assert_null(memmem(r.body.data, r.body.len, "\"error\"", 7));
    support_http_response_free(&r);
    support_http_close(&c);
}

/* ---- reload ---- */

/* read_timeout_ms is read per request from the config it started under:
 * a reload that lowers it applies to the next stream; a stream in flight
 * keeps the one it began with, as it keeps the rest of its config. */
Test(upstream, a_reload_changes_the_read_timeout_of_the_next_request)
{
    struct support_sse s = {0};
    struct support_sse_event ev;
    struct stream_end e;
    double t0;
    int rc, error = 0;

    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    start_router(", read_timeout_ms: 2000");
    /* a stream that stalls after three tokens, in flight over the reload */
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-fault: stall-midstream\r\n", CHAT_STREAM),
                 0);
    t0 = support_mono_ms();
    cr_assert_eq(support_sse_open(&s, router.port, req.data, req.len, TIMEOUT_MS), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(support_sse_next(&s, &ev, TIMEOUT_MS), 1);
    write_config(", read_timeout_ms: 200");
    cr_assert_eq(call("/admin/reload", ADMIN, ""), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    e = read_stream("/v1/chat/completions", "x-mock-fault: stall-midstream\r\n", CHAT_STREAM,
                    5000);
    cr_assert(e.error && e.rc == -ECONNRESET, "rc %d", e.rc);
    cr_assert_lt(e.ms, 1200.0, "the new config's 200 ms took %.0f ms", e.ms);
    while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1)
        error |= strstr(ev.data, "\"error\"") != NULL;
    cr_assert(error && rc == -ECONNRESET, "rc %d", rc);
    cr_assert_geq(support_mono_ms() - t0, 1900.0, "the stream in flight was cut after %.0f ms",
                  support_mono_ms() - t0);
    support_sse_close(&s);
}
