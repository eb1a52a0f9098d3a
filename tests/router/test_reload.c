/*
 * tests/router/test_reload.c: config reloads run off the event loop, one
 * at a time, through the real router in front of real mockllm processes.
 *
 * The config file is swapped for a FIFO once the router runs, so a reload
 * waits, reading it, for as long as the test likes: what the router does
 * meanwhile (serve requests, queue more reloads, stop) is then seen from
 * outside, with no timing to guess.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TIMEOUT_MS 5000
/* A reload that has to read a file the test wrote a moment ago. */
#define RELOAD_TIMEOUT_MS 15000
#define KEY "sk-reload-tenant"
#define AUTH "Authorization: Bearer " KEY "\r\n"
#define ADMIN "Authorization: Bearer adm-reload\r\n"
#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]"
/* What main.c logs for a reload asked for while one runs. */
#define QUEUED_LINE "reload asked for while one runs"

static struct support_proc router, mock_a, mock_b;
static struct support_http_response resp;
static char conf_path[64], log_path[64];
static int fifo_fd = -1; /* the test's writing end of the config FIFO */

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock_a);
    support_proc_stop(&mock_b);
    if (fifo_fd >= 0)
        close(fifo_fd);
    fifo_fd = -1;
    support_http_response_free(&resp);
    if (conf_path[0])
        unlink(conf_path);
    if (log_path[0]) {
        support_log_show(log_path, "router");
        unlink(log_path);
    }
}

TestSuite(reload, .fini = teardown, .timeout = 90);

/* The config: `top` (top-level keys, may be ""), backends a and b on the
 * two mocks, `routes` as YAML list items, one tenant. */
static void conf_text(struct buf *out, const char *top, const char *routes)
{
    char hex[65];

    support_key_sha256_hex(KEY, hex);
    buf_reset(out);
    cr_assert_eq(buf_printf(out,
                            "listen: 127.0.0.1:0\nadmin_key: adm-reload\n%sbackends:\n"
                            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a,\n"
                            "     quality: 1, context_window: 100000, input_usd_per_mtok: 1,\n"
                            "     output_usd_per_mtok: 1, tokenizer: estimate}\n"
                            "  - {name: b, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-b,\n"
                            "     quality: 1, context_window: 100000, input_usd_per_mtok: 1,\n"
                            "     output_usd_per_mtok: 1, tokenizer: estimate}\n"
                            "routes:\n%s"
                            "tenants:\n  - id: acme\n    api_keys: [\"sha256:%s\"]\n",
                            top, mock_a.port, mock_b.port, routes, hex),
                 0);
}

/* Start the mocks and the router on a config with `top` and `routes`,
 * logging to log_path; then put a FIFO where its config file was, so
 * that the next reload waits for the test to write it. */
/* Write the config with `top` and `routes` as a plain file at conf_path. */
static void write_conf(const char *top, const char *routes)
{
    struct buf text = {0};
    FILE *f;

    conf_text(&text, top, routes);
    f = fopen(conf_path, "w");
    cr_assert_not_null(f);
    fwrite(text.data, 1, text.len, f);
    fclose(f);
    buf_free(&text);
}

static void start_with(const char *top, const char *routes)
{
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    cr_assert_eq(support_mockllm_start(&mock_b, NULL), 0);
    strcpy(conf_path, "/tmp/costrouter-reload-XXXXXX");
    close(mkstemp(conf_path));
    strcpy(log_path, "/tmp/costrouter-reload-log-XXXXXX");
    close(mkstemp(log_path));
    write_conf(top, routes);
    cr_assert_eq(support_router_start(&router, NULL, conf_path, log_path), 0,
                 "the router did not start");
    cr_assert_eq(unlink(conf_path), 0);
    cr_assert_eq(mkfifo(conf_path, 0600), 0);
}

static void start(const char *routes)
{
    start_with("", routes);
}

/* Open the FIFO's writing end once a reload has opened it to read (it
 * then waits in read() for what the test writes). */
static int fifo_open_writer(void)
{
    for (int i = 0; i < RELOAD_TIMEOUT_MS / 10; i++) {
        int fd = open(conf_path, O_WRONLY | O_NONBLOCK);

        if (fd >= 0) {
            cr_assert_eq(fcntl(fd, F_SETFL, 0), 0);
            return fd;
        }
        cr_assert_eq(errno, ENXIO, "open: %s", strerror(errno));
        usleep(10000);
    }
    cr_assert_fail("no reload opened the config to read it");
    return -1;
}

/* Write a config with `routes` into the FIFO and close it: the reload
 * reading it gets the whole file. */
static void fifo_write_conf(const char *routes)
{
    struct buf text = {0};

    conf_text(&text, "", routes);
    cr_assert_eq(write(fifo_fd, text.data, text.len), (ssize_t)text.len);
    close(fifo_fd);
    fifo_fd = -1;
    buf_free(&text);
}

static int call(const char *method, const char *path, const char *headers, const char *body)
{
    struct buf req = {0};
    int rc;

    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    rc = support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp);
    buf_free(&req);
    return rc;
}

/* A chat request for `model`: 0 and resp filled, or the error. */
static int chat(const char *model)
{
    char body[256];

    snprintf(body, sizeof(body), "{\"model\":\"%s\"," MSG "}", model);
    return call("POST", "/v1/chat/completions", AUTH, body);
}

/* Send POST /admin/reload on a connection of its own, answer unread. */
static void send_reload(struct support_http_conn *conn)
{
    struct buf req = {0};

    cr_assert_eq(support_http_format(&req, "POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(support_http_connect(conn, router.port), 0);
    cr_assert_eq(support_http_send(conn, req.data, req.len), 0);
    buf_free(&req);
}

/* The reload on `conn` has not been answered yet. */
static void assert_unanswered(struct support_http_conn *conn, const char *what)
{
    struct support_http_response r = {0};

    cr_assert_eq(support_http_read(conn, &r, 300), -ETIMEDOUT, "%s was answered %d: %.*s", what,
                 r.status, (int)r.body.len, r.body.data ? r.body.data : "");
    support_http_response_free(&r);
}

/* Read the reload's answer on `conn` and close it: its status. */
static int reload_answer(struct support_http_conn *conn, struct support_http_response *r)
{
    int rc = support_http_read(conn, r, RELOAD_TIMEOUT_MS);

    support_http_close(conn);
    cr_assert_eq(rc, 0, "the reload was not answered (%d)", rc);
    return r->status;
}

/* Lines of the router's log that hold `text`. */
static int log_count(const char *text)
{
    int n = support_log_count(log_path, text);

    cr_assert_geq(n, 0, "%s: %s", log_path, strerror(errno));
    return n;
}

/* Wait until the router has logged `n` reloads queued behind the one
 * that runs. */
static void wait_queued(int n)
{
    for (int i = 0; i < RELOAD_TIMEOUT_MS / 10 && log_count(QUEUED_LINE) < n; i++)
        usleep(10000);
    cr_assert_eq(log_count(QUEUED_LINE), n, "reload %d was not queued", n);
}

/* While a reload waits to read its file, the loop serves requests and
 * /metrics; the reload is answered once the file is written, and the new
 * config applies. Before reloads ran off the loop, the chat request here
 * waited for the whole reload: it timed out. */
Test(reload, the_loop_serves_while_a_reload_reads_its_file)
{
    struct support_http_conn admin;
    struct support_http_response r = {0};

    start("  - {model: chat, candidates: [a]}\n");
    cr_assert_eq(chat("chat"), 0);
    cr_assert_eq(resp.status, 200);
    send_reload(&admin);
    fifo_fd = fifo_open_writer(); /* the reload now waits in read() */

    cr_assert_eq(chat("chat"), 0, "a request waited for the reload");
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");
    cr_assert_eq(call("GET", "/metrics", ADMIN, NULL), 0, "/metrics waited for the reload");
    cr_assert_eq(resp.status, 200);
    assert_unanswered(&admin, "the reload of a file not written yet");

    fifo_write_conf("  - {model: chat, candidates: [b]}\n  - {model: chat2, candidates: [b]}\n");
    cr_assert_eq(reload_answer(&admin, &r), 200, "%.*s", (int)r.body.len, r.body.data);
    cr_assert_not_null(strstr(r.body.data, "\"reloaded\""), "%.*s", (int)r.body.len, r.body.data);
    support_http_response_free(&r);
    cr_assert_eq(chat("chat2"), 0);
    cr_assert_eq(resp.status, 200, "the new route is not there");
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
}

/* Reloads asked for while one runs (admin requests, SIGHUPs, a client
 * that leaves before its answer) wait for it and then make one more load
 * of the file, which reads what was written last: the first request gets
 * the first load's outcome, those asked meanwhile the second's. */
Test(reload, reloads_asked_for_while_one_runs_make_one_more_after_it)
{
    struct support_http_conn first, second, gone;
    struct support_http_response r = {0};

    start("  - {model: chat, candidates: [a]}\n");
    send_reload(&first);
    fifo_fd = fifo_open_writer();
    send_reload(&second);
    wait_queued(1);
    send_reload(&gone);
    wait_queued(2);
    kill(router.pid, SIGHUP); /* one at a time: two pending at once are one */
    wait_queued(3);
    kill(router.pid, SIGHUP);
    wait_queued(4);
    support_http_close(&gone); /* its answer will have no one to go to */
    assert_unanswered(&second, "a reload queued behind one that runs");

    /* The first load ends: its request is answered, the one queued starts
     * and reads the file again. */
    fifo_write_conf("  - {model: chat, candidates: [b]}\n");
    cr_assert_eq(reload_answer(&first, &r), 200, "%.*s", (int)r.body.len, r.body.data);
    support_http_response_free(&r);
    cr_assert_eq(chat("chat"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");
    fifo_fd = fifo_open_writer();
    assert_unanswered(&second, "a reload whose load has not read the file");

    /* The second: a broken file now, so its requests get its errors. */
    cr_assert_eq(write(fifo_fd, "bogus_key: 1\n", 13), 13);
    close(fifo_fd);
    fifo_fd = -1;
    cr_assert_eq(reload_answer(&second, &r), 400, "%.*s", (int)r.body.len, r.body.data);
    cr_assert_not_null(strstr(r.body.data, "bogus_key"), "%.*s", (int)r.body.len, r.body.data);
    support_http_response_free(&r);
    cr_assert_eq(log_count("config reloaded"), 1);
    cr_assert_eq(chat("chat"), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b", "the running config stays");

    /* Six requests, two loads: no third one opens the file. */
    usleep(300 * 1000);
    cr_assert_lt(open(conf_path, O_WRONLY | O_NONBLOCK), 0, "a third load read the file");
    cr_assert_eq(errno, ENXIO);
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
}

/* SIGTERM while a reload waits for good on its file: the router stops at
 * once and cleanly (exit 0, nothing leaked under the sanitizers), the
 * waiting admin request answered 503, the loaded config never applied. */
Test(reload, a_stop_does_not_wait_for_a_reload_stuck_reading)
{
    struct support_http_conn admin;
    struct support_http_response r = {0};

    start("  - {model: chat, candidates: [a]}\n");
    send_reload(&admin);
    fifo_fd = fifo_open_writer(); /* never written: the reload is stuck */
    cr_assert_eq(chat("chat"), 0);
    cr_assert_eq(resp.status, 200);

    support_proc_stop(&router); /* SIGTERM, SIGKILL after 3 s */
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d (stuck on the reload?)",
              router.status);
    cr_assert_eq(reload_answer(&admin, &r), 503, "%.*s", (int)r.body.len, r.body.data);
    cr_assert_not_null(strstr(r.body.data, "not reloaded"), "%.*s", (int)r.body.len, r.body.data);
    support_http_response_free(&r);
    cr_assert_eq(log_count("config reloaded"), 0);
}

static long long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A reload whose file is not written within admin_reload_timeout_ms: its
 * request is answered 504 reload_timeout then, while the load goes on;
 * once the file is written, that load is applied, and later reloads work
 * as ever. Before the bound, the request waited as long as the file did:
 * the first answer below never came. */
Test(reload, the_answer_waits_no_longer_than_admin_reload_timeout_ms)
{
    struct support_http_conn admin;
    struct support_http_response r = {0};
    long long t0;

    start_with("admin_reload_timeout_ms: 500\n", "  - {model: chat, candidates: [a]}\n");
    t0 = now_ms();
    send_reload(&admin);
    fifo_fd = fifo_open_writer(); /* not written for now: the load waits */
    cr_assert_eq(reload_answer(&admin, &r), 504, "%.*s", (int)r.body.len, r.body.data);
    cr_assert_geq(now_ms() - t0, 450, "answered before its time");
    cr_assert_not_null(strstr(r.body.data, "\"code\":\"reload_timeout\""), "%.*s",
                       (int)r.body.len, r.body.data);
    cr_assert_not_null(strstr(r.body.data, "\"param\":null"), "%.*s", (int)r.body.len,
                       r.body.data);
    cr_assert_not_null(strstr(r.body.data, "goes on"), "%.*s", (int)r.body.len, r.body.data);
    support_http_response_free(&r);
    cr_assert_eq(chat("chat"), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "a");

    /* The load was not given up: written now, its config applies. */
    fifo_write_conf("  - {model: chat, candidates: [b]}\n");
    for (int i = 0; i < RELOAD_TIMEOUT_MS / 10 && log_count("config reloaded") == 0; i++)
        usleep(10000);
    cr_assert_eq(log_count("config reloaded"), 1, "the load that timed out was not applied");
    cr_assert_eq(chat("chat"), 0);
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "b");

    /* A later reload (the file's default bound now: 30 s) is answered. */
    send_reload(&admin);
    fifo_fd = fifo_open_writer();
    fifo_write_conf("  - {model: chat, candidates: [b]}\n  - {model: chat2, candidates: [a]}\n");
    cr_assert_eq(reload_answer(&admin, &r), 200, "%.*s", (int)r.body.len, r.body.data);
    support_http_response_free(&r);
    cr_assert_eq(chat("chat2"), 0);
    cr_assert_eq(resp.status, 200, "the later reload did not apply");
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
}

/* Reload with `text` written into the FIFO as the config: the 400 answer's
 * error message must hold `want` and end without whitespace. */
static void assert_refused_with(const char *text, const char *want)
{
    struct support_http_conn admin;
    struct support_http_response r = {0};
    const cJSON *message;
    cJSON *body;
    size_t len;

    send_reload(&admin);
    fifo_fd = fifo_open_writer();
    cr_assert_eq(write(fifo_fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fifo_fd);
    fifo_fd = -1;
    cr_assert_eq(reload_answer(&admin, &r), 400, "%.*s", (int)r.body.len, r.body.data);
    body = cJSON_ParseWithLength(r.body.data, r.body.len);
    message = cJSON_GetObjectItem(cJSON_GetObjectItem(body, "error"), "message");
    cr_assert(cJSON_IsString(message), "%.*s", (int)r.body.len, r.body.data);
    len = strlen(message->valuestring);
    cr_assert_not_null(strstr(message->valuestring, want), "%s", message->valuestring);
    cr_assert(len > 0 && !isspace((unsigned char)message->valuestring[len - 1]),
              "the message ends with whitespace: \"%s\"", message->valuestring);
    cJSON_Delete(body);
    support_http_response_free(&r);
}

/* The 400 of a refused reload carries the config's errors, one a line,
 * with no newline after the last: libfyaml's (a YAML syntax error) and
 * the router's own (an unknown key, two errors). Each ended with one. */
Test(reload, the_400_message_ends_without_a_newline)
{
    start("  - {model: chat, candidates: [a]}\n");
    assert_refused_with("listen: [unclosed\n", "(yaml)");
    assert_refused_with("bogus_key: 1\nother_bogus_key: 2\n", "other_bogus_key");
    cr_assert_eq(chat("chat"), 0);
    cr_assert_eq(resp.status, 200, "the running config stays");
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
}

/* Lines in the file at `path` once it has `want` (the cost log is written
 * every 200 ms): -1 if it cannot be read. */
static int wait_lines(const char *path, int want)
{
    int n = -1;

    for (int i = 0; i < TIMEOUT_MS / 20; i++) {
        char line[4096];
        FILE *f = fopen(path, "r");

        n = -1;
        if (f != NULL) {
            for (n = 0; fgets(line, sizeof(line), f) != NULL;)
                n++;
            fclose(f);
        }
        if (n >= want)
            break;
        usleep(20000);
    }
    return n;
}

/* start_with, but the config stays a plain file, which a reload reads
 * at once. */
static void start_plain(const char *top, const char *routes)
{
    start_with(top, routes);
    cr_assert_eq(unlink(conf_path), 0);
    write_conf(top, routes);
}

/* POST /admin/reload does what SIGHUP does (README: "the same as
 * SIGHUP"): it reopens the cost log too, so a rotation may be finished
 * with either. It reloaded the config alone: the router went on writing
 * to the file moved aside (or deleted, its lines lost with it), and the
 * new file was never made. */
Test(reload, the_admin_reload_reopens_the_cost_log)
{
    char log[64], moved[80], top[128];
    struct support_http_conn conn;
    struct support_http_response r = {0};

    strcpy(log, "/tmp/costrouter-reload-cost-XXXXXX");
    close(mkstemp(log));
    snprintf(moved, sizeof(moved), "%s.1", log);
    snprintf(top, sizeof(top), "cost_log: %s\n", log);
    start_plain(top, "  - {model: chat, candidates: [a]}\n");

    cr_assert_eq(chat("chat"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(wait_lines(log, 1), 1);
    cr_assert_eq(rename(log, moved), 0); /* logrotate's move */
    send_reload(&conn);
    cr_assert_eq(reload_answer(&conn, &r), 200, "%.*s", (int)r.body.len, r.body.data);
    support_http_response_free(&r);
    cr_assert_eq(chat("chat"), 0);
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(wait_lines(log, 1), 1, "the request after the reload is not in a new %s", log);
    cr_assert_eq(wait_lines(moved, 1), 1, "only the line before the rotation in %s", moved);
    unlink(log);
    unlink(moved);
}

/* An answer after which the router closes its connection, as it does
 * after every answer on the config a reload replaced, says Connection:
 * close (README, Signals), so that a client does not send its next
 * request on a connection being closed: the reload's own answer, and a
 * request in flight during a SIGHUP reload. Both went without it, and
 * the connection closed under a client that thought it kept. */
Test(reload, answers_on_the_config_replaced_say_connection_close)
{
    struct support_http_conn conn;
    struct support_http_response r = {0};
    struct buf slow = {0};
    const char *h;
    int before;

    start_plain("", "  - {model: chat, candidates: [a]}\n");
    send_reload(&conn);
    cr_assert_eq(support_http_read(&conn, &r, RELOAD_TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    h = support_http_header(&r, "connection");
    cr_assert(h != NULL && strcasecmp(h, "close") == 0, "the reload's answer: Connection: %s",
              h ? h : "(none)");
    support_http_close(&conn);
    support_http_response_free(&r);

    before = log_count("config reloaded");
    cr_assert_eq(support_http_format(&slow, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-ttft-ms: 1500\r\n",
                                     "{\"model\":\"chat\"," MSG "}"),
                 0);
    cr_assert_eq(support_http_connect(&conn, router.port), 0);
    cr_assert_eq(support_http_send(&conn, slow.data, slow.len), 0);
    buf_free(&slow);
    usleep(300000); /* the request is upstream */
    kill(router.pid, SIGHUP);
    for (int i = 0; i < RELOAD_TIMEOUT_MS / 10 && log_count("config reloaded") == before; i++)
        usleep(10000);
    cr_assert_gt(log_count("config reloaded"), before, "the SIGHUP reload was not applied");
    cr_assert_eq(support_http_read(&conn, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    h = support_http_header(&r, "connection");
    cr_assert(h != NULL && strcasecmp(h, "close") == 0,
              "the answer in flight at the reload: Connection: %s", h ? h : "(none)");
    support_http_close(&conn);
    support_http_response_free(&r);
}

/* tokenizer_data is where the token tables were loaded from at start,
 * and where a reload loads one it names for the first time: a reload
 * cannot move it, so one that changes it is refused, naming the key, as
 * the other settings made once at start are (README, Signals). It was
 * taken, and ignored: tables still came from the old folder (or none at
 * all, when the start found none there), prompts estimated from bytes. */
Test(reload, a_reload_that_moves_tokenizer_data_is_refused)
{
    char a[64], b[64], top[160];
    struct buf text = {0};
    const char *routes = "  - {model: chat, candidates: [a]}\n";

    strcpy(a, "/tmp/costrouter-reload-tok-a-XXXXXX");
    strcpy(b, "/tmp/costrouter-reload-tok-b-XXXXXX");
    cr_assert_not_null(mkdtemp(a));
    cr_assert_not_null(mkdtemp(b));
    snprintf(top, sizeof(top), "tokenizer_data: %s\n", a);
    start_with(top, routes);
    snprintf(top, sizeof(top), "tokenizer_data: %s\n", b);
    conf_text(&text, top, routes);
    assert_refused_with(text.data, "tokenizer_data cannot change without a restart");
    buf_free(&text);
    cr_assert_eq(chat("chat"), 0);
    cr_assert_eq(resp.status, 200, "the running config stays");
    rmdir(a);
    rmdir(b);
}

/* prompt_tokens_est of line `n` (1-based) of the cost log at `path`,
 * waiting for it to be written; -1 if it never is. */
static double logged_prompt_est(const char *path, int n)
{
    double v = -1;

    if (wait_lines(path, n) < n)
        return -1;
    FILE *f = fopen(path, "r");
    char line[8192];

    for (int i = 0; f != NULL && i < n && fgets(line, sizeof(line), f) != NULL; i++) {
        cJSON *j = cJSON_Parse(line);

        if (i == n - 1)
            v = cJSON_GetNumberValue(cJSON_GetObjectItem(j, "prompt_tokens_est"));
        cJSON_Delete(j);
    }
    if (f)
        fclose(f);
    return v;
}

/* The exact prompt count of the chat body in `body_path` with encoding
 * `enc`, as `costrouter tokens` makes it from the tables in data/tokens. */
static long exact_count(const char *enc, const char *body_path)
{
    char data[512];
    struct buf out = {0};
    long n;

    snprintf(data, sizeof(data), "%s/data/tokens",
             getenv("COSTROUTER_SRC") ? getenv("COSTROUTER_SRC") : ".");
    char *argv[] = {getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter",
                    "tokens", "--encoding", (char *)enc, "--chat", "--data", data,
                    (char *)body_path, NULL};
    cr_assert_eq(support_run(argv, &out, TIMEOUT_MS), 0);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    n = strtol(out.data, NULL, 10);
    buf_free(&out);
    cr_assert_gt(n, 0);
    return n;
}

/* Put table `file` of data/tokens into `dir` (a link to it). */
static void table_link(const char *dir, const char *file)
{
    char src[600], dst[600];

    snprintf(src, sizeof(src), "%s/data/tokens/%s",
             getenv("COSTROUTER_SRC") ? getenv("COSTROUTER_SRC") : ".", file);
    if (src[0] != '/') { /* a link's target is read from its own folder */
        char cwd[256];

        cr_assert_not_null(getcwd(cwd, sizeof(cwd)));
        snprintf(src, sizeof(src), "%s/data/tokens/%s", cwd, file);
    }
    snprintf(dst, sizeof(dst), "%s/%s", dir, file);
    cr_assert_eq(symlink(src, dst), 0, "%s: %s", dst, strerror(errno));
}

/* POST the chat `body`: its prompt_tokens_est, line `n` of cost log `log`. */
static double chat_est(const char *body, const char *log, int n)
{
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH, body), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    return logged_prompt_est(log, n);
}

/* POST /admin/reload, which must succeed. */
static void reload_ok(void)
{
    cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}

/* Start mock A and the router on it, with cost log `log` and
 * tokenizer_data `dir`: backend a counts with o200k_base (route "chat");
 * with `llama`, backend b too, with llama3 (route "llama"). */
static void start_counting(const char *log, const char *dir, int llama)
{
    char hex[65];
    FILE *f;

    support_key_sha256_hex(KEY, hex);
    cr_assert_eq(support_mockllm_start(&mock_a, NULL), 0);
    strcpy(conf_path, "/tmp/costrouter-reload-XXXXXX");
    close(mkstemp(conf_path));
    strcpy(log_path, "/tmp/costrouter-reload-log-XXXXXX");
    close(mkstemp(log_path));
    f = fopen(conf_path, "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\nadmin_key: adm-reload\ncost_log: %s\ntokenizer_data: %s\n"
            "backends:\n"
            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a,\n"
            "     quality: 1, context_window: 100000, input_usd_per_mtok: 1,\n"
            "     output_usd_per_mtok: 1, tokenizer: o200k_base}\n",
            log, dir, mock_a.port);
    if (llama)
        fprintf(f,
                "  - {name: b, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-b,\n"
                "     quality: 1, context_window: 100000, input_usd_per_mtok: 1,\n"
                "     output_usd_per_mtok: 1, tokenizer: llama3}\n",
                mock_a.port);
    fprintf(f, "routes:\n  - {model: chat, candidates: [a]}\n%s"
               "tenants:\n  - id: acme\n    api_keys: [\"sha256:%s\"]\n",
            llama ? "  - {model: llama, candidates: [b]}\n" : "", hex);
    fclose(f);
    cr_assert_eq(support_router_start(&router, NULL, conf_path, log_path), 0);
}

/* A router started where tokenizer_data has no tables (`make deps` not
 * run yet) estimates prompts from bytes and says so; once the tables are
 * there, a reload loads them (README: a reload loads a table it names
 * for the first time), so prompts are counted exactly from then on. It
 * never did: with none loaded at start, a reload tried no table. */
Test(reload, a_reload_loads_the_token_tables_missing_at_start)
{
    static const char body[] =
        "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"hello there, hello there, hello there\"}]}";
    char dir[64], table[128], log[64], body_path[64];
    long exact;

    strcpy(dir, "/tmp/costrouter-reload-tables-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    strcpy(log, "/tmp/costrouter-reload-cost-XXXXXX");
    close(mkstemp(log));
    strcpy(body_path, "/tmp/costrouter-reload-body-XXXXXX");
    close(mkstemp(body_path));
    cr_assert_eq(support_file_write(body_path, body), 0);
    exact = exact_count("o200k_base", body_path);
    snprintf(table, sizeof(table), "%s/o200k_base.tok", dir);

    start_counting(log, dir, 0);
    cr_assert_neq(chat_est(body, log, 1), (double)exact, "counted exactly without tables");

    table_link(dir, "o200k_base.tok");
    reload_ok();
    cr_assert_eq(chat_est(body, log, 2), (double)exact,
                 "still estimated from bytes after the reload (exact: %ld)", exact);
    unlink(table);
    rmdir(dir);
    unlink(log);
    unlink(body_path);
}

/* Send three chat requests pipelined on `conn` (the first waits 1500 ms
 * for its first token, upstream), then, once the router has them, the
 * signal `sig`; a fourth request is sent after the signal took effect. */
static void pipeline_through_signal(struct support_http_conn *conn, int sig)
{
    struct buf reqs = {0}, late = {0};
    const char *body = "{\"model\":\"chat\"," MSG "}";
    const char *done = sig == SIGHUP ? "config reloaded" : "stopping after requests";
    int before = log_count(done);

    cr_assert_eq(support_http_format(&reqs, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-ttft-ms: 1500\r\n", body),
                 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(support_http_format(&reqs, "POST", "/v1/chat/completions", AUTH, body), 0);
    cr_assert_eq(support_http_connect(conn, router.port), 0);
    cr_assert_eq(support_http_send(conn, reqs.data, reqs.len), 0);
    buf_free(&reqs);
    usleep(300000); /* the first is upstream, the other two buffered */
    kill(router.pid, sig);
    for (int i = 0; i < RELOAD_TIMEOUT_MS / 10 && log_count(done) == before; i++)
        usleep(10000);
    cr_assert_gt(log_count(done), before, "signal %d did not take effect", sig);
    /* Sent after the drain began: not among those it answers. */
    cr_assert_eq(support_http_format(&late, "POST", "/v1/chat/completions", AUTH, body), 0);
    cr_assert_eq(support_http_send(conn, late.data, late.len), 0);
    buf_free(&late);
}

/* Read the three pipelined answers on `conn`: 200 each, only the last
 * saying Connection: close, and then the close, the late fourth request
 * unanswered. */
static void assert_pipeline_answered(struct support_http_conn *conn, const char *when)
{
    struct support_http_response r = {0};

    for (int i = 0; i < 3; i++) {
        int rc = support_http_read(conn, &r, TIMEOUT_MS);
        const char *h;

        cr_assert_eq(rc, 0, "%s: pipelined request %d of 3 unanswered (%d)", when, i + 1, rc);
        cr_assert_eq(r.status, 200, "%s: request %d: %d", when, i + 1, r.status);
        h = support_http_header(&r, "connection");
        if (i < 2)
            cr_assert(h == NULL || strcasecmp(h, "close") != 0,
                      "%s: request %d says Connection: close, the next unanswered", when, i + 1);
        else
            cr_assert(h != NULL && strcasecmp(h, "close") == 0,
                      "%s: the last request received before: Connection: %s", when,
                      h ? h : "(none)");
    }
    cr_assert_eq(support_http_read(conn, &r, TIMEOUT_MS), -ECONNRESET,
                 "%s: a request sent after the drain began was answered %d", when, r.status);
    support_http_response_free(&r);
    support_http_close(conn);
}

/* Requests a client pipelined before a reload, which the router had
 * received and buffered behind the one in flight, are answered on the
 * config replaced (README, Signals): the answer to the last of them says
 * Connection: close. The first answer said close and the two behind it
 * were dropped unanswered. */
Test(reload, pipelined_requests_received_before_a_reload_are_answered)
{
    struct support_http_conn conn;

    start_plain("", "  - {model: chat, candidates: [a]}\n");
    pipeline_through_signal(&conn, SIGHUP);
    assert_pipeline_answered(&conn, "reload");
}

/* The same at a stop: the requests received are in flight too. */
Test(reload, pipelined_requests_received_before_a_stop_are_answered)
{
    struct support_http_conn conn;

    start_plain("", "  - {model: chat, candidates: [a]}\n");
    pipeline_through_signal(&conn, SIGTERM);
    assert_pipeline_answered(&conn, "stop");
}

/* A start where one of the tables the backends name is missing from
 * tokenizer_data (llama3.tok here) loads the others, counts exactly with
 * them, estimates from bytes for the backends of the missing one alone,
 * and says which table it lacks, as a reload does (README, Configuration);
 * a reload once it is there loads it. The start loaded all or none: every
 * prompt was estimated from bytes, o200k's backend's too. */
Test(reload, a_start_missing_one_token_table_loads_the_others)
{
    static const char body_a[] =
        "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"hello there, hello there, hello there\"}]}";
    static const char body_b[] =
        "{\"model\":\"llama\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"hello there, hello there, hello there\"}]}";
    char dir[64], log[64], path_a[64], path_b[64], link[128];
    long exact_a, exact_b;

    strcpy(dir, "/tmp/costrouter-start-tables-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    table_link(dir, "o200k_base.tok");
    table_link(dir, "cl100k_base.tok");
    strcpy(log, "/tmp/costrouter-start-cost-XXXXXX");
    close(mkstemp(log));
    strcpy(path_a, "/tmp/costrouter-start-body-XXXXXX");
    close(mkstemp(path_a));
    cr_assert_eq(support_file_write(path_a, body_a), 0);
    strcpy(path_b, "/tmp/costrouter-start-body-XXXXXX");
    close(mkstemp(path_b));
    cr_assert_eq(support_file_write(path_b, body_b), 0);
    exact_a = exact_count("o200k_base", path_a);
    exact_b = exact_count("llama3", path_b);

    start_counting(log, dir, 1);
    cr_assert_eq(log_count("token table llama3.tok not loaded"), 1,
                 "no warning names the missing table");
    cr_assert_eq(chat_est(body_a, log, 1), (double)exact_a,
                 "o200k's backend estimated from bytes (exact: %ld)", exact_a);
    cr_assert_neq(chat_est(body_b, log, 2), (double)exact_b, "counted exactly without llama3.tok");

    table_link(dir, "llama3.tok");
    reload_ok();
    cr_assert_eq(chat_est(body_b, log, 3), (double)exact_b,
                 "llama3 still estimated after the reload (exact: %ld)", exact_b);
    for (int i = 0; i < 3; i++) {
        static const char *files[] = {"o200k_base.tok", "cl100k_base.tok", "llama3.tok"};

        snprintf(link, sizeof(link), "%s/%s", dir, files[i]);
        unlink(link);
    }
    rmdir(dir);
    unlink(log);
    unlink(path_a);
    unlink(path_b);
}
