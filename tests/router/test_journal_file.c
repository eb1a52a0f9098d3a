/*
 * tests/router/test_journal_file.c: store.journal_file through the real
 * router, a real mockllm and a real redis-server (append-only, fsync
 * always, so that a restart keeps what Redis had: spend, open
 * reservations, applied ids). Charges journaled while Redis is down are
 * saved at a stop and written back after the next start, once; a file
 * left by a crash after its write-back charges nothing again; a charge
 * that may have been applied longer ago than Redis remembers is not sent;
 * a corrupt file or one another router holds stops the start.
 *
 * mockllm counts 9 prompt tokens for MSG and streams x-mock-tokens: 7, so
 * every request costs 9 * $100 + 7 * $300 per million tokens = 3000
 * micro-dollars.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
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
#include "tests/support/redis.h"

#define TIMEOUT_MS 5000
#define KEY "sk-journal-tenant"
#define AUTH "Authorization: Bearer " KEY "\r\n"
#define ADMIN "Authorization: Bearer adm-secret\r\n"
#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]"
#define BODY "{\"model\":\"chat\"," MSG "}"
#define COST 3000 /* micro-dollars per request, see above */

static struct support_proc router, other, mock;
static struct test_redis redis;
static struct support_http_response resp;
static struct buf req;
static char dir[64], conf_path[128], log_path[128], err_path[128], jfile[128];

static void setup(void)
{
    strcpy(dir, "/tmp/costrouter-jfile-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(conf_path, sizeof(conf_path), "%s/costrouter.yaml", dir);
    snprintf(log_path, sizeof(log_path), "%s/cost.jsonl", dir);
    snprintf(err_path, sizeof(err_path), "%s/stderr.log", dir);
    snprintf(jfile, sizeof(jfile), "%s/journal.jsonl", dir);
}

static void teardown(void)
{
    char cmd[128];

    support_proc_stop(&router);
    support_proc_stop(&other);
    support_proc_stop(&mock);
    if (redis.pid)
        test_redis_stop(&redis);
    support_http_response_free(&resp);
    buf_free(&req);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(jfile, .init = setup, .fini = teardown, .timeout = 60);

/* The config: one backend (mock), tenant acme, the Redis store at `url`
 * with the journal file. */
static void write_conf(const char *url)
{
    char hex[65];
    FILE *f = fopen(conf_path, "w");

    cr_assert_not_null(f);
    support_key_sha256_hex(KEY, hex);
    fprintf(f,
            "listen: 127.0.0.1:0\nadmin_key: adm-secret\ncost_log: %s\n"
            "store: {redis: \"%s\", journal_file: %s}\n"
            "backends:\n"
            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: 100, output_usd_per_mtok: 300}\n"
            "routes:\n  - {model: chat, candidates: [a]}\n"
            "tenants:\n  - {id: acme, api_keys: [\"sha256:%s\"]}\n",
            log_path, url, jfile, mock.port, hex);
    fclose(f);
}

/* Start a router on the config, its stderr appended to err_path. Returns
 * as support_proc_start(). */
static int start(struct support_proc *p)
{
    return support_router_start(p, NULL, conf_path, err_path);
}

static int call(const char *method, const char *path, const char *headers, const char *body)
{
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    return support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp);
}

static void chat(void)
{
    cr_assert_eq(call("POST", "/v1/chat/completions", AUTH "x-mock-tokens: 7\r\n", BODY), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}

/* Wait until the router has its Redis connection. */
static void wait_store_up(void)
{
    cr_assert_eq(support_router_store_up(router.port, ADMIN), 1, "the store did not come up");
}

/* Today's spend of acme in Redis (-1: none). */
static long long redis_day(void)
{
    return test_redis_day_spend(&redis, "costrouter:", "acme");
}

/* What Redis holds for acme's open reservations (their sum). */
static long long redis_reserved(void)
{
    long long v = test_redis_int(&redis, "HGET costrouter:{acme}:open #");

    return v < 0 ? 0 : v;
}

/* The sum of cost_usd over the cost log, in micro-dollars. */
static long long cost_log_total(void)
{
    FILE *f = fopen(log_path, "r");
    char line[8192];
    long long sum = 0;

    cr_assert_not_null(f);
    while (fgets(line, sizeof(line), f)) {
        cJSON *j = cJSON_Parse(line);
        cJSON *c = cJSON_GetObjectItem(j, "cost_usd");

        cr_assert(cJSON_IsNumber(c), "a cost log line without cost_usd: %s", line);
        sum += llround(c->valuedouble * 1e6);
        cJSON_Delete(j);
    }
    fclose(f);
    return sum;
}

static int exists(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0;
}

/* The journal file's header field `name` (-1 when absent). */
static long long header_field(const char *name)
{
    FILE *f = fopen(jfile, "r");
    char line[512];
    cJSON *h, *v;
    long long n = -1;

    cr_assert_not_null(f, "no journal file: %s", strerror(errno));
    cr_assert_not_null(fgets(line, sizeof(line), f));
    fclose(f);
    h = cJSON_Parse(line);
    v = cJSON_GetObjectItem(h, "costrouter_journal") ? cJSON_GetObjectItem(h, name) : NULL;
    if (cJSON_IsNumber(v))
        n = (long long)v->valuedouble;
    cJSON_Delete(h);
    return n;
}

/* The file at `path`, which must be readable. */
static char *slurp(const char *path)
{
    char *data = support_file_read(path);

    cr_assert_not_null(data, "%s: %s", path, strerror(errno));
    return data;
}

static void spill(const char *path, const char *data)
{
    cr_assert_eq(support_file_write(path, data), 0, "%s", path);
}

/* Wait until the router wrote the file back (it is gone) and Redis holds
 * `want` for the day, nothing reserved. */
static void wait_written_back(long long want)
{
    for (int tries = 0; tries < 250 && (exists(jfile) || redis_day() != want); tries++)
        usleep(20000);
    cr_assert(!exists(jfile), "the journal file is still there");
    cr_assert_eq(redis_day(), want, "Redis has %lld of %lld", redis_day(), want);
    cr_assert_eq(redis_reserved(), 0, "a reservation is still held");
}

/* Redis up, 3 requests charged; one request reserved in Redis and still
 * upstream when Redis is killed, then 4 more served on local counters:
 * the 5 charges made while Redis is down are journaled, and the router is
 * stopped with them (SIGTERM). Returns the total the cost log has. */
static long long an_outage_then_a_stop(void)
{
    struct support_http_conn slow = {.fd = -1};
    struct support_http_response slow_resp = {0};
    struct buf slow_req = {0};
    long long held = 0;

    cr_assert_eq(test_redis_start(&redis, 1), 0);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(redis.url);
    cr_assert_eq(start(&router), 0);
    wait_store_up();
    for (int i = 0; i < 3; i++)
        chat();
    cr_assert_eq(support_http_format(&slow_req, "POST", "/v1/chat/completions",
                                     AUTH "x-mock-tokens: 7\r\nx-mock-ttft-ms: 3000\r\n", BODY),
                 0);
    cr_assert_eq(support_http_connect(&slow, router.port), 0);
    /* The last chat's settle may still be on its way to Redis after its
     * answer: what Redis holds must be the slow request's, not that. */
    for (int tries = 0; tries < 250 && redis_reserved() != 0; tries++)
        usleep(10000);
    cr_assert_eq(redis_reserved(), 0, "the chats left a reservation in Redis");
    cr_assert_eq(support_http_send(&slow, slow_req.data, slow_req.len), 0);
    buf_free(&slow_req); /* sent: a failed assertion below leaks nothing */
    for (int tries = 0; tries < 250 && (held = redis_reserved()) == 0; tries++)
        usleep(10000);
    cr_assert_gt(held, 0, "the slow request holds nothing in Redis");
    test_redis_kill(&redis, SIGKILL);
    for (int i = 0; i < 4; i++)
        chat();
    cr_assert_eq(support_http_read(&slow, &slow_resp, TIMEOUT_MS), 0);
    cr_assert_eq(slow_resp.status, 200);
    support_http_close(&slow);
    support_http_response_free(&slow_resp);
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
    cr_assert(exists(jfile), "the journal was not saved at the stop");
    cr_assert_eq(header_field("micro_usd"), 5 * COST, "the file holds %lld",
                 header_field("micro_usd"));
    cr_assert_eq(cost_log_total(), 8 * COST);
    return 8 * COST;
}

/* Redis comes back with what it had (3 requests and the slow one's
 * reservation); the next start writes the saved journal back: Redis then
 * has what the cost log has, holds nothing, and the file is gone. */
Test(jfile, charges_saved_at_a_stop_reach_redis_after_the_next_start)
{
    long long total = an_outage_then_a_stop();

    cr_assert_eq(test_redis_restart(&redis), 0);
    cr_assert_eq(redis_day(), 3 * COST, "Redis lost what it had");
    cr_assert_eq(start(&router), 0);
    wait_store_up();
    wait_written_back(total);
    support_proc_stop(&router);
    cr_assert(!exists(jfile), "a stop with nothing journaled saved a file");
}

/* Started while Redis is still down, the router loads the file (it then
 * holds what a crash would leave) and, stopped again, saves it again. The
 * next start writes it back. Then the copy a crash after the write-back
 * would have left is put back: loaded again, it charges nothing twice. */
Test(jfile, a_file_loaded_again_after_its_write_back_charges_nothing_twice)
{
    long long total = an_outage_then_a_stop();
    char *crash_copy;

    cr_assert_eq(start(&router), 0); /* Redis still down */
    crash_copy = slurp(jfile);
    chat(); /* served on local counters, journaled too */
    total += COST;
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
    cr_assert_eq(header_field("micro_usd"), 6 * COST, "not saved again whole");

    cr_assert_eq(test_redis_restart(&redis), 0);
    cr_assert_eq(start(&router), 0);
    wait_store_up();
    wait_written_back(total);
    cr_assert_eq(cost_log_total(), total);
    support_proc_stop(&router);

    spill(jfile, crash_copy);
    free(crash_copy);
    cr_assert_eq(start(&router), 0);
    wait_store_up();
    wait_written_back(total);
}

/* Today's UTC date as the journal file writes it (YYYY-MM-DD). */
static void utc_today(char day[16])
{
    time_t now = time(NULL);
    struct tm tm;

    gmtime_r(&now, &tm);
    strftime(day, 16, "%Y-%m-%d", &tm);
}

/* A charge above 2^53 micro-dollars (the store counts to 2^63 - 1; one
 * request may cost 2^62): the file's numbers went through doubles, so
 * the load refused one (the router did not start), and a save wrote it
 * rounded (2^53 + 1 as 2^53) under its exact header sum, a file the next
 * start refused as cut short. Loaded, saved again at the load and at the
 * stop (Redis down) to the unit, loaded again, it reaches Redis (whose
 * scripts count in doubles: to the unit up to 2^53 only). */
Test(jfile, a_charge_above_2_53_micro_dollars_is_saved_exactly)
{
    char day[16], text[1024], *log;

    utc_today(day);
    snprintf(text, sizeof(text),
             "{\"costrouter_journal\":1,\"saved_ms\":1,\"entries\":1,"
             "\"micro_usd\":9007199254740993}\n"
             "{\"tenant\":\"acme\",\"day\":\"%s\",\"micro_usd\":9007199254740993,"
             "\"origin\":\"0123456789abcdef\",\"id\":7,\"conditional\":false}\n",
             day);
    cr_assert_eq(test_redis_start(&redis, 1), 0);
    test_redis_kill(&redis, SIGKILL);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(redis.url);
    spill(jfile, text);
    if (start(&router) != 0) {
        log = slurp(err_path);
        cr_assert_fail("the router did not start on the file: %s", log);
    }
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
    log = slurp(jfile);
    cr_assert_not_null(strchr(log, '\n'), "%s", log);
    cr_assert_not_null(strstr(strchr(log, '\n'), "\"micro_usd\":9007199254740993,"), "saved: %s",
                       log);
    free(log);
    cr_assert_eq(test_redis_restart(&redis), 0);
    if (start(&router) != 0) {
        log = slurp(err_path);
        cr_assert_fail("the router did not start on the file it saved: %s", log);
    }
    wait_store_up();
    for (int tries = 0; tries < 250 && (exists(jfile) || redis_day() < 0); tries++)
        usleep(20000);
    cr_assert(!exists(jfile), "the journal file is still there");
    cr_assert(redis_day() >= 9007199254740992LL && redis_day() <= 9007199254740993LL,
              "Redis has %lld", redis_day());
}

/* Redis forgets the id of an applied charge after the grace period (1 h
 * here): a charge that may have been applied longer ago than that (its
 * reply was lost in 1970) is not sent, lest it be charged twice, and is
 * logged; the one beside it, never sent, is charged. */
Test(jfile, a_maybe_applied_charge_past_the_grace_is_not_sent)
{
    char day[16], text[1024], *log;

    utc_today(day);
    snprintf(text, sizeof(text),
             "{\"costrouter_journal\":1,\"saved_ms\":1,\"entries\":2,\"micro_usd\":65}\n"
             "{\"tenant\":\"acme\",\"day\":\"%s\",\"micro_usd\":40,\"origin\":\"0123456789abcdef\","
             "\"id\":7,\"conditional\":true,\"since_ms\":1000}\n"
             "{\"tenant\":\"acme\",\"day\":\"%s\",\"micro_usd\":25,\"origin\":\"0123456789abcdef\","
             "\"id\":8,\"conditional\":false}\n",
             day, day);
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(redis.url);
    spill(jfile, text);
    cr_assert_eq(start(&router), 0);
    wait_store_up();
    wait_written_back(25);
    log = slurp(err_path);
    cr_assert_not_null(strstr(log, "of 40 micro-dollars to tenant acme"), "not logged: %s", log);
    free(log);
}

/* A charge loaded from the file that was never sent (not conditional
 * there) is written back however long Redis stays away after the start:
 * only a send can have applied it, so Redis's grace period counts from
 * that, not from the load. The router's wall clock is moved 70 minutes on
 * after its start (libfaketime, its monotonic clock left alone). */
#define FAKETIME_LIB "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
Test(jfile, a_loaded_charge_never_sent_is_written_back_after_a_long_outage)
{
    char day[16], text[1024], clock_file[160], asan[512], *log, *asan_was;
    time_t now = time(NULL);
    struct tm tm;

    if (access(FAKETIME_LIB, R_OK) != 0)
        cr_skip_test("no libfaketime");
    gmtime_r(&now, &tm);
    if (tm.tm_hour == 23) /* 70 minutes on would be another day */
        cr_skip_test("too close to midnight UTC");
    strftime(day, sizeof(day), "%Y-%m-%d", &tm);
    snprintf(text, sizeof(text),
             "{\"costrouter_journal\":1,\"saved_ms\":1,\"entries\":1,\"micro_usd\":25}\n"
             "{\"tenant\":\"acme\",\"day\":\"%s\",\"micro_usd\":25,\"origin\":\"0123456789abcdef\","
             "\"id\":8,\"conditional\":false}\n",
             day);
    snprintf(clock_file, sizeof(clock_file), "%s/faketime", dir);
    spill(clock_file, "+0\n");
    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(redis.url);
    spill(jfile, text);
    test_redis_kill(&redis, SIGKILL); /* down at the start */
    setenv("LD_PRELOAD", FAKETIME_LIB, 1);
    setenv("FAKETIME_TIMESTAMP_FILE", clock_file, 1);
    setenv("FAKETIME_NO_CACHE", "1", 1);
    setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1", 1);
    /* Under `make asan` the preload comes before ASan's runtime, which
     * refuses to start so unless told the order is fine. */
    asan_was = getenv("ASAN_OPTIONS") ? strdup(getenv("ASAN_OPTIONS")) : NULL;
    snprintf(asan, sizeof(asan), "%s%sverify_asan_link_order=0", asan_was ? asan_was : "",
             asan_was && *asan_was ? ":" : "");
    setenv("ASAN_OPTIONS", asan, 1);
    cr_assert_eq(start(&router), 0);
    unsetenv("LD_PRELOAD");
    if (asan_was != NULL)
        setenv("ASAN_OPTIONS", asan_was, 1);
    else
        unsetenv("ASAN_OPTIONS");
    free(asan_was);
    for (int tries = 0; tries < 250; tries++, usleep(20000)) { /* loaded */
        log = slurp(err_path);
        int loaded = strstr(log, "loaded from") != NULL;
        free(log);
        if (loaded)
            break;
    }
    spill(clock_file, "+4200\n");
    usleep(200000);
    cr_assert_eq(test_redis_restart(&redis), 0);
    wait_store_up();
    for (int tries = 0; tries < 250 && redis_day() != 25; tries++, usleep(20000)) {
        log = slurp(err_path);
        char *dropped = strstr(log, "store: a journaled charge");
        if (dropped)
            cr_assert_fail("dropped, never sent: %.*s", (int)strcspn(dropped, "\n"), dropped);
        free(log);
    }
    wait_written_back(25);
}

/* A file the router cannot read whole stops the start, says where, and
 * is left as it was: its charges are not in Redis yet. */
Test(jfile, a_corrupt_file_stops_the_start_and_stays)
{
    static const char *const bad[] = {
        /* a valid entry, but the header says there are two */
        "{\"costrouter_journal\":1,\"saved_ms\":1,\"entries\":2,\"micro_usd\":80}\n"
        "{\"tenant\":\"acme\",\"day\":\"2026-12-04\",\"micro_usd\":40,"
        "\"origin\":\"0123456789abcdef\",\"id\":7,\"conditional\":false}\n",
        /* not JSON */
        "{\"costrouter_journal\":1,\"saved_ms\":1,\"entries\":1,\"micro_usd\":40}\n"
        "{\"tenant\":\"acme\",\"day\":\"2026-12-04\",\"micro_usd\":4\n",
        /* a day that is not one */
        "{\"costrouter_journal\":1,\"saved_ms\":1,\"entries\":1,\"micro_usd\":40}\n"
        "{\"tenant\":\"acme\",\"day\":\"2026-02-30\",\"micro_usd\":40,"
        "\"origin\":\"0123456789abcdef\",\"id\":7,\"conditional\":false}\n",
    };
    char url[64], *left;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", test_free_port());
    write_conf(url);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char want[160], *log;

        spill(jfile, bad[i]);
        unlink(err_path);
        cr_assert_neq(start(&router), 0, "started with corrupt file %zu", i);
        left = slurp(jfile);
        cr_assert_str_eq(left, bad[i], "file %zu was changed", i);
        free(left);
        log = slurp(err_path);
        snprintf(want, sizeof(want), "store.journal_file %s:%d: ", jfile, i == 0 ? 1 : 2);
        cr_assert_not_null(strstr(log, want), "file %zu: %s", i, log);
        free(log);
    }
}

/* Two routers on one file would replace each other's charges: the second
 * does not start. */
Test(jfile, a_file_in_use_by_another_router_stops_the_start)
{
    char *log;

    cr_assert_eq(test_redis_start(&redis, 0), 0);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(redis.url);
    cr_assert_eq(start(&router), 0);
    cr_assert_neq(start(&other), 0, "a second router started on the same journal file");
    log = slurp(err_path);
    cr_assert_not_null(strstr(log, "in use by another router"), "%s", log);
    free(log);
}

/* The value of the sample `name` (with its labels) in /metrics, -1 when
 * it has none. */
static double metric(const char *name)
{
    const char *p;

    cr_assert_eq(call("GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    for (p = resp.body.data; p != NULL && p < resp.body.data + resp.body.len;
         p = memchr(p, '\n', resp.body.len - (size_t)(p - resp.body.data)), p = p ? p + 1 : p)
        if (strncmp(p, name, strlen(name)) == 0 && p[strlen(name)] == ' ')
            return strtod(p + strlen(name) + 1, NULL);
    return -1;
}

/* The journal dropped counters are the store's count, which a reload
 * keeps (the store is made once): a reload must not add it again. It
 * did: the counter's "seen" mark was the generation's, so the first
 * scrape after each reload added everything dropped since the start
 * once more (1 drop showed 2, then 3, ...). The journal is filled by a
 * file of 100000 entries (its cap) kept apart from new charges, with
 * Redis down, so the next request's charge is dropped. */
Test(jfile, a_reload_does_not_count_the_journal_drops_again, .timeout = 120)
{
    static const char dropped[] = "costrouter_store_journal_dropped_total{store=\"redis\"}";
    static const char dropped_usd[] =
        "costrouter_store_journal_dropped_usd_total{store=\"redis\"}";
    enum { N = 100000 };
    char day[16];
    double usd;
    FILE *f;

    utc_today(day);
    f = fopen(jfile, "w");
    cr_assert_not_null(f);
    fprintf(f, "{\"costrouter_journal\":1,\"saved_ms\":1,\"entries\":%d,\"micro_usd\":%d}\n", N, N);
    for (int i = 1; i <= N; i++)
        fprintf(f,
                "{\"tenant\":\"other\",\"day\":\"%s\",\"micro_usd\":1,"
                "\"origin\":\"0123456789abcdef\",\"id\":%d,\"conditional\":false}\n",
                day, i);
    fclose(f);
    cr_assert_eq(test_redis_start(&redis, 1), 0);
    test_redis_kill(&redis, SIGKILL);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(redis.url);
    cr_assert_eq(start(&router), 0, "%s", slurp(err_path));
    chat();
    cr_assert_eq(metric(dropped), 1, "the charge over the cap is counted");
    usd = metric(dropped_usd);
    cr_assert_float_eq(usd, COST / 1e6, 1e-12);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 0);
        cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_eq(metric(dropped), 1, "reload %d counted the drop again", i + 1);
        cr_assert_float_eq(metric(dropped_usd), usd, 1e-12, "reload %d", i + 1);
    }
}
