/*
 * tests/router/test_accept.c: accepting client connections when memory
 * runs out, through the real router in front of a real mockllm.
 *
 * The router runs with tests/support/preload/failcalloc.so preloaded:
 * its calloc fails while the test's trigger file exists. A connection
 * that comes meanwhile must wait, not be lost, and the router must go on
 * accepting once memory is back (libuv stops watching a listener whose
 * connection callback did not accept). Under `make asan` the shim passes
 * on to ASan's calloc.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <libgen.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TIMEOUT_MS 5000
#define KEY "sk-accept-tenant"
#define AUTH "Authorization: Bearer " KEY "\r\n"
#define ADMIN "Authorization: Bearer adm-accept\r\n"
#define CHAT "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]}"
/* What the router logs when it puts an accept off. */
#define NOMEM_LINE "no memory for a client connection"

static struct support_proc router, mock;
static struct support_http_conn conns[3];
static struct support_http_response resp;
static char conf_path[64], log_path[64], trigger_path[64];

static void setup(void)
{
    for (size_t i = 0; i < sizeof(conns) / sizeof(conns[0]); i++)
        conns[i].fd = -1;
}

static void teardown(void)
{
    if (trigger_path[0])
        unlink(trigger_path); /* before the stop: its path may allocate */
    support_proc_stop(&router);
    support_proc_stop(&mock);
    for (size_t i = 0; i < sizeof(conns) / sizeof(conns[0]); i++)
        support_http_close(&conns[i]);
    support_http_response_free(&resp);
    if (conf_path[0])
        unlink(conf_path);
    if (log_path[0]) {
        support_log_show(log_path, "router");
        unlink(log_path);
    }
}

TestSuite(accept, .init = setup, .fini = teardown, .timeout = 60);

/* The shim, built beside mockllm: $BUILD/tests/support/preload/. */
static void shim_path(char *out, size_t size)
{
    char bin[512];

    snprintf(bin, sizeof(bin), "%s", support_mockllm_bin());
    snprintf(out, size, "%s/tests/support/preload/failcalloc.so", dirname(bin));
    cr_assert_eq(access(out, R_OK), 0, "%s: %s (make builds it with the tests)", out,
                 strerror(errno));
}

static void temp_name(char *path, const char *pattern)
{
    strcpy(path, pattern);
    close(mkstemp(path));
}

/* A mock, and the router in front of it with the shim preloaded; the
 * trigger's name is made, the file itself removed: calloc works. */
static void start(void)
{
    char shim[512], cmd[2048], hex[65], *argv[] = {"/bin/sh", "-c", cmd, NULL};
    FILE *f;

    shim_path(shim, sizeof(shim));
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    support_key_sha256_hex(KEY, hex);
    temp_name(conf_path, "/tmp/costrouter-accept-XXXXXX");
    temp_name(log_path, "/tmp/costrouter-accept-log-XXXXXX");
    temp_name(trigger_path, "/tmp/costrouter-accept-nomem-XXXXXX");
    unlink(trigger_path);
    cr_assert_not_null(f = fopen(conf_path, "w"));
    fprintf(f,
            "listen: 127.0.0.1:0\nadmin_key: adm-accept\nbackends:\n"
            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a,\n"
            "     quality: 1, context_window: 100000, input_usd_per_mtok: 1,\n"
            "     output_usd_per_mtok: 1, tokenizer: estimate}\n"
            "routes:\n  - {model: chat, candidates: [a]}\n"
            "tenants:\n  - id: acme\n    api_keys: [\"sha256:%s\"]\n",
            mock.port, hex);
    fclose(f);
    snprintf(cmd, sizeof(cmd),
             "LD_PRELOAD='%s' COSTROUTER_TEST_FAIL_CALLOC='%s' "
             "ASAN_OPTIONS=\"${ASAN_OPTIONS:+$ASAN_OPTIONS:}verify_asan_link_order=0\" "
             "exec '%s' -c '%s' 2>>'%s'",
             shim, trigger_path, getenv("COSTROUTER_BIN"), conf_path, log_path);
    cr_assert_eq(support_proc_start(&router, argv), 0, "the router did not start");
}

/* From now on the router's calloc fails (0) or works (1). */
static void memory(int available)
{
    if (available) {
        cr_assert_eq(unlink(trigger_path), 0);
        return;
    }
    FILE *f = fopen(trigger_path, "w");

    cr_assert_not_null(f);
    fclose(f);
}

/* Connect conns[i] and send a chat request on it, answer unread. */
static void send_chat(int i)
{
    struct buf req = {0};

    cr_assert_eq(support_http_format(&req, "POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(support_http_connect(&conns[i], router.port), 0);
    cr_assert_eq(support_http_send(&conns[i], req.data, req.len), 0);
    buf_free(&req);
}

/* The answer on conns[i] within `ms`: its status, or the read's error. */
static int answer(int i, int ms)
{
    int rc = support_http_read(&conns[i], &resp, ms);

    return rc == 0 ? resp.status : rc;
}

/* Lines of the router's log that hold `text`. */
static int log_count(const char *text)
{
    int n = support_log_count(log_path, text);

    cr_assert_geq(n, 0, "%s: %s", log_path, strerror(errno));
    return n;
}

/* The unlabelled series `name` of /metrics. */
static double metric(const char *name)
{
    struct buf req = {0};
    double v;

    cr_assert_eq(support_http_format(&req, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp), 0);
    buf_free(&req);
    cr_assert_eq(resp.status, 200);
    v = support_metrics_value(&resp, name);
    cr_assert(!isnan(v), "%s not in /metrics", name);
    return v;
}

/* Connections that come while the router has no memory for them wait in
 * the backlog and are served once it has; so are later ones. Before the
 * accept was retried, the router never accepted again: the first read
 * below timed out. The warning comes once however often it is retried. */
Test(accept, connections_made_without_memory_are_served_once_there_is_some)
{
    start();
    send_chat(0);
    cr_assert_eq(answer(0, TIMEOUT_MS), 200, "before the memory runs out");
    support_http_close(&conns[0]);

    memory(0);
    send_chat(0);
    send_chat(1);
    /* Over a second without memory: the warning's interval is a minute,
     * not the second log lines are limited to by default. */
    cr_assert_eq(answer(0, 1300), -ETIMEDOUT, "answered with calloc failing: the shim is not in");
    memory(1);
    cr_assert_eq(answer(0, TIMEOUT_MS), 200, "a connection made without memory was lost");
    cr_assert_eq(answer(1, TIMEOUT_MS), 200, "the second one waiting was lost");

    send_chat(2);
    cr_assert_eq(answer(2, TIMEOUT_MS), 200, "a connection made after was not served");
    cr_assert_eq(log_count(NOMEM_LINE), 1, "one warning a minute at most");
    cr_assert_geq(metric("costrouter_client_accept_retries_total"), 2);
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
}

/* A stop while an accept waits for memory: the retry goes with the
 * listener, and the router exits at once and cleanly. */
Test(accept, a_stop_while_an_accept_waits_for_memory_exits_cleanly)
{
    start();
    memory(0);
    send_chat(0);
    for (int i = 0; i < TIMEOUT_MS / 10 && log_count(NOMEM_LINE) == 0; i++)
        usleep(10000);
    cr_assert_eq(log_count(NOMEM_LINE), 1, "the accept was not put off");

    support_proc_stop(&router); /* SIGTERM, SIGKILL after 3 s */
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d (retrying for ever?)",
              router.status);
}
