/*
 * tests/router/test_spend_file.c: store.spend_file through the real router
 * and a real mockllm, with the in-process store. The day's and month's
 * spend of tenants and of keys with a budget of their own survives a stop
 * and a kill (what the last save had), so a budget spent before a restart
 * stays spent; a day or month that has passed counts for nothing; a save
 * that fails is retried; a corrupt file, or one another router holds,
 * stops the start.
 *
 * mockllm counts 9 prompt tokens for MSG and answers x-mock-tokens: 7, so
 * every request costs 9 * $100 + 7 * $300 per million tokens = 3000
 * micro-dollars, and holds about as much (max_tokens 7, the router's count
 * of the prompt).
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

#define TIMEOUT_MS 5000
#define KEY "sk-spend-tenant"
#define CI_KEY "sk-spend-ci"
#define ADMIN "Authorization: Bearer adm-secret\r\n"
#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]"
#define BODY "{\"model\":\"chat\",\"max_tokens\":7," MSG "}"
#define COST 3000 /* micro-dollars per request, see above */

static struct support_proc router, other, mock;
static struct support_http_response resp;
static struct buf req;
static char dir[64], conf_path[128], log_path[128], err_path[128], sfile[128];

static void setup(void)
{
    strcpy(dir, "/tmp/costrouter-sfile-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(conf_path, sizeof(conf_path), "%s/costrouter.yaml", dir);
    snprintf(log_path, sizeof(log_path), "%s/cost.jsonl", dir);
    snprintf(err_path, sizeof(err_path), "%s/stderr.log", dir);
    snprintf(sfile, sizeof(sfile), "%s/spend.jsonl", dir);
}

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&other);
    support_proc_stop(&mock);
    support_http_response_free(&resp);
    buf_free(&req);
    support_remove_tree(dir);
}

TestSuite(sfile, .init = setup, .fini = teardown, .timeout = 60);

/* The config: one backend (mock), tenant acme with a day budget of
 * `daily` micro-dollars (0: none) and a key "ci" with a budget of its own,
 * the in-process store with the spend file. */
static void write_conf(long long daily)
{
    char hex[65], ci_hex[65];
    FILE *f = fopen(conf_path, "w");

    cr_assert_not_null(f);
    support_key_sha256_hex(KEY, hex);
    support_key_sha256_hex(CI_KEY, ci_hex);
    fprintf(f,
            "listen: 127.0.0.1:0\nadmin_key: adm-secret\ncost_log: %s\n"
            "store: {spend_file: %s}\n"
            "backends:\n"
            "  - {name: a, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-a, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: 100, output_usd_per_mtok: 300,\n"
            "     tokenizer: cl100k_base}\n"
            "routes:\n  - {model: chat, candidates: [a]}\n"
            "tenants:\n"
            "  - id: acme\n"
            "    api_keys: [\"sha256:%s\", {hash: \"sha256:%s\", name: ci, budget: {daily_usd: 1}}]\n"
            "    budget: {daily_usd: %.6f, monthly_usd: 100, on_exhausted: reject}\n",
            log_path, sfile, mock.port, hex, ci_hex, daily > 0 ? (double)daily / 1e6 : 50.0);
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

/* A chat request with `key`; its status. */
static int chat(const char *key)
{
    char headers[128];

    snprintf(headers, sizeof(headers), "Authorization: Bearer %s\r\nx-mock-tokens: 7\r\n", key);
    cr_assert_eq(call("POST", "/v1/chat/completions", headers, BODY), 0);
    return resp.status;
}

static long long micro(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    cr_assert(cJSON_IsNumber(v), "no %s", name);
    return llround(v->valuedouble * 1e6);
}

/* acme's spend as the admin API has it: today and this month, and the key
 * ci's (today's is its month's in these tests). */
static void admin_spend(long long *day, long long *month, long long *ci_day, long long *ci_month)
{
    cJSON *o, *keys;

    cr_assert_eq(call("GET", "/admin/tenants/acme/spend", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
    o = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    cr_assert_not_null(o);
    *day = micro(o, "day_usd");
    *month = micro(o, "month_usd");
    keys = cJSON_GetObjectItemCaseSensitive(o, "keys");
    cr_assert(cJSON_IsArray(keys) && cJSON_GetArraySize(keys) == 1, "keys: %.*s",
              (int)resp.body.len, resp.body.data);
    *ci_day = micro(cJSON_GetArrayItem(keys, 0), "day_usd");
    *ci_month = micro(cJSON_GetArrayItem(keys, 0), "month_usd");
    cJSON_Delete(o);
}

static void assert_spend(long long day, long long month, long long ci_spent)
{
    long long d, m, ci_d, ci_m;

    admin_spend(&d, &m, &ci_d, &ci_m);
    cr_assert_eq(d, day, "acme spent %lld today, expected %lld", d, day);
    cr_assert_eq(m, month, "acme spent %lld this month, expected %lld", m, month);
    cr_assert_eq(ci_d, ci_spent, "ci spent %lld today, expected %lld", ci_d, ci_spent);
    cr_assert_eq(ci_m, ci_spent, "ci spent %lld this month, expected %lld", ci_m, ci_spent);
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

/* The spend file's header field `name`, -1 when there is no file yet or
 * no such field. */
static long long header_field(const char *name)
{
    FILE *f = fopen(sfile, "r");
    char line[512];
    cJSON *h, *v;
    long long n = -1;

    if (f == NULL)
        return -1;
    if (fgets(line, sizeof(line), f) != NULL) {
        h = cJSON_Parse(line);
        v = cJSON_GetObjectItem(h, "costrouter_spend") ? cJSON_GetObjectItem(h, name) : NULL;
        if (cJSON_IsNumber(v))
            n = (long long)v->valuedouble;
        cJSON_Delete(h);
    }
    fclose(f);
    return n;
}

/* Wait (5 s at most) until the file, saved while the router serves, says
 * `day` micro-dollars were spent today over all its subjects. */
static void wait_saved(long long day)
{
    for (int tries = 0; tries < 250 && header_field("day_micro_usd") != day; tries++)
        usleep(20000);
    cr_assert_eq(header_field("day_micro_usd"), day, "the file says %lld, expected %lld",
                 header_field("day_micro_usd"), day);
}

/* "YYYY-MM-DD" of `days_ago` days before today (UTC), and whether that day
 * is in this month. */
static int day_ago(int days_ago, char out[16])
{
    time_t now = time(NULL), then = now - (time_t)days_ago * 86400;
    struct tm a, b;

    gmtime_r(&now, &a);
    gmtime_r(&then, &b);
    strftime(out, 16, "%Y-%m-%d", &b);
    return a.tm_year == b.tm_year && a.tm_mon == b.tm_mon;
}

/* Stopped (SIGTERM), the router saves the spend of the tenant and of its
 * key's own budget; the next start goes on counting from it. */
Test(sfile, the_spend_of_tenants_and_keys_survives_a_stop)
{
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    cr_assert_eq(start(&router), 0);
    cr_assert_eq(chat(KEY), 200);
    cr_assert_eq(chat(KEY), 200);
    cr_assert_eq(chat(CI_KEY), 200);
    assert_spend(3 * COST, 3 * COST, COST);
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
    cr_assert_eq(header_field("subjects"), 2, "the file names %lld subjects",
                 header_field("subjects"));
    cr_assert_eq(header_field("day_micro_usd"), 4 * COST, "acme's and ci's: %lld",
                 header_field("day_micro_usd"));

    cr_assert_eq(start(&router), 0);
    assert_spend(3 * COST, 3 * COST, COST);
    cr_assert_eq(chat(CI_KEY), 200);
    assert_spend(4 * COST, 4 * COST, 2 * COST);
    support_proc_stop(&router);
    cr_assert_eq(start(&router), 0);
    assert_spend(4 * COST, 4 * COST, 2 * COST);
}

/* The point of the file: a day budget spent before a restart is still
 * spent after it (without the file, the router would start from 0 and
 * serve the request). */
Test(sfile, a_spent_budget_stays_spent_after_a_restart)
{
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(2 * COST + COST / 2); /* two requests fit, a third's hold does not */
    cr_assert_eq(start(&router), 0);
    cr_assert_eq(chat(KEY), 200);
    cr_assert_eq(chat(KEY), 200);
    cr_assert_eq(chat(KEY), 429, "the budget let a third request pass");
    support_proc_stop(&router);
    cr_assert_eq(start(&router), 0);
    cr_assert_eq(chat(KEY), 429, "a restart gave the budget back: %.*s", (int)resp.body.len,
                 resp.body.data);
}

/* The file is saved while the router serves (every second while the
 * spend changes), so a router killed (SIGKILL: no stop, no last save)
 * still starts again from what it had saved. */
Test(sfile, a_killed_router_starts_again_from_its_last_save)
{
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    cr_assert_eq(start(&router), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(chat(KEY), 200);
    wait_saved(3 * COST);
    kill(router.pid, SIGKILL);
    support_proc_stop(&router);
    cr_assert_eq(start(&router), 0);
    assert_spend(3 * COST, 3 * COST, 0);
}

/* Counters saved on an earlier day count for this month only; saved in
 * an earlier month, for nothing. */
Test(sfile, an_earlier_day_counts_for_its_month_only)
{
    char yesterday[16], last_year[16], text[1024];
    int same_month = day_ago(1, yesterday);

    day_ago(366, last_year);
    snprintf(text, sizeof(text),
             "{\"costrouter_spend\":1,\"saved_ms\":1,\"subjects\":2,\"day_micro_usd\":700,"
             "\"month_micro_usd\":9000}\n"
             "{\"subject\":\"acme\",\"day\":\"%s\",\"day_micro_usd\":500,\"month_micro_usd\":2000}\n"
             "{\"subject\":\"acme#ci\",\"day\":\"%s\",\"day_micro_usd\":200,"
             "\"month_micro_usd\":7000}\n",
             yesterday, last_year);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    spill(sfile, text);
    cr_assert_eq(start(&router), 0);
    assert_spend(0, same_month ? 2000 : 0, 0);
    cr_assert_eq(chat(KEY), 200);
    assert_spend(COST, (same_month ? 2000 : 0) + COST, 0);
}

/* costrouter_store_spend_file_failing from /metrics, -1 if absent. */
static int failing_gauge(void)
{
    static const char name[] = "\ncostrouter_store_spend_file_failing{store=\"memory\"} ";
    char *text, *at;
    int v = -1;

    cr_assert_eq(call("GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    text = strndup(resp.body.data, resp.body.len);
    at = strstr(text, name);
    if (at != NULL)
        v = atoi(at + strlen(name));
    free(text);
    return v;
}

/* A save that fails (the name is taken by a folder) is logged once and
 * retried every second; once it can be written, it is. */
Test(sfile, a_failed_save_is_retried)
{
    char inside[160];

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    cr_assert_eq(start(&router), 0);
    cr_assert_eq(chat(KEY), 200);
    wait_saved(COST);
    cr_assert_eq(failing_gauge(), 0);
    cr_assert_eq(unlink(sfile), 0);
    cr_assert_eq(mkdir(sfile, 0700), 0);
    snprintf(inside, sizeof(inside), "%s/x", sfile);
    spill(inside, "x"); /* a folder that is not empty: rename cannot replace it */
    cr_assert_eq(chat(KEY), 200);
    for (int tries = 0; tries < 250 && support_log_count(err_path, "cannot write it") == 0;
         tries++)
        usleep(20000);
    cr_assert_eq(chat(KEY), 200);
    usleep(2500000); /* two more ticks fail */
    cr_assert_eq(support_log_count(err_path, "store.spend_file"), 1,
                 "the failure was not logged once");
    cr_assert_eq(failing_gauge(), 1, "/metrics does not say the saves fail");
    cr_assert_eq(unlink(inside), 0);
    cr_assert_eq(rmdir(sfile), 0);
    wait_saved(3 * COST);
    /* The file is renamed in place on the thread pool before the loop
     * hears the save worked: the log line and the gauge follow it. */
    for (int tries = 0; tries < 250 && support_log_count(err_path, "written again") == 0; tries++)
        usleep(20000);
    cr_assert_eq(support_log_count(err_path, "written again"), 1);
    cr_assert_eq(failing_gauge(), 0, "/metrics still says the saves fail");
}

/* A file the router cannot read whole stops the start, says where, and is
 * left as it was. */
Test(sfile, a_corrupt_file_stops_the_start_and_stays)
{
    static const char *const bad[] = {
        /* a valid line, but the header says there are two */
        "{\"costrouter_spend\":1,\"saved_ms\":1,\"subjects\":2,\"day_micro_usd\":40,"
        "\"month_micro_usd\":90}\n"
        "{\"subject\":\"acme\",\"day\":\"2026-12-04\",\"day_micro_usd\":40,"
        "\"month_micro_usd\":90}\n",
        /* not JSON */
        "{\"costrouter_spend\":1,\"saved_ms\":1,\"subjects\":1,\"day_micro_usd\":40,"
        "\"month_micro_usd\":90}\n"
        "{\"subject\":\"acme\",\"day\":\"2026-12-04\",\"day_micro_usd\":4\n",
        /* a day's spend above its month's */
        "{\"costrouter_spend\":1,\"saved_ms\":1,\"subjects\":1,\"day_micro_usd\":90,"
        "\"month_micro_usd\":40}\n"
        "{\"subject\":\"acme\",\"day\":\"2026-12-04\",\"day_micro_usd\":90,"
        "\"month_micro_usd\":40}\n",
        /* a subject twice */
        "{\"costrouter_spend\":1,\"saved_ms\":1,\"subjects\":2,\"day_micro_usd\":80,"
        "\"month_micro_usd\":180}\n"
        "{\"subject\":\"acme\",\"day\":\"2026-12-04\",\"day_micro_usd\":40,"
        "\"month_micro_usd\":90}\n"
        "{\"subject\":\"acme\",\"day\":\"2026-12-04\",\"day_micro_usd\":40,"
        "\"month_micro_usd\":90}\n",
    };
    static const int line_of[] = {1, 2, 2, 3};
    char *left;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char want[160], *log;

        spill(sfile, bad[i]);
        unlink(err_path);
        cr_assert_neq(start(&router), 0, "started with corrupt file %zu", i);
        left = slurp(sfile);
        cr_assert_str_eq(left, bad[i], "file %zu was changed", i);
        free(left);
        log = slurp(err_path);
        snprintf(want, sizeof(want), "store.spend_file %s:%d: ", sfile, line_of[i]);
        cr_assert_not_null(strstr(log, want), "file %zu: %s", i, log);
        free(log);
    }
}

/* Two routers on one file would replace each other's spend: the second
 * does not start. */
Test(sfile, a_file_in_use_by_another_router_stops_the_start)
{
    char *log;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    cr_assert_eq(start(&router), 0);
    cr_assert_neq(start(&other), 0, "a second router started on the same spend file");
    log = slurp(err_path);
    cr_assert_not_null(strstr(log, "in use by another router"), "%s", log);
    free(log);
}

/* The file cannot move on a reload (the store was made with it): the
 * reload is refused, naming the key, and the running file keeps being
 * saved. */
Test(sfile, a_reload_cannot_move_the_file)
{
    char moved[4096], *conf, *at;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    cr_assert_eq(start(&router), 0);
    conf = slurp(conf_path);
    at = strstr(conf, "spend.jsonl");
    cr_assert_not_null(at);
    cr_assert_lt(snprintf(moved, sizeof(moved), "%.*smoved.jsonl%s", (int)(at - conf), conf,
                          at + strlen("spend.jsonl")),
                 (int)sizeof(moved));
    spill(conf_path, moved);
    free(conf);
    cr_assert_eq(call("POST", "/admin/reload", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 400, "%.*s", (int)resp.body.len, resp.body.data);
    cr_assert_not_null(memmem(resp.body.data, resp.body.len, "store.spend_file", 16), "%.*s",
                       (int)resp.body.len, resp.body.data);
    cr_assert_eq(chat(KEY), 200);
    wait_saved(COST);
}

/* The line of the spend file at `path` naming `subject` ("\"subject\":
 * \"NAME\"" in it), copied to out; 0 if found. */
static int subject_line_of(const char *subject, char *out, size_t cap)
{
    char *text = slurp(sfile), *save = NULL, want[64];
    int rc = -1;

    snprintf(want, sizeof(want), "\"subject\":\"%s\"", subject);
    for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save))
        if (strstr(l, want) != NULL && rc != 0) {
            snprintf(out, cap, "%s", l);
            rc = 0;
        }
    free(text);
    return rc;
}

/* The store counts up to 2^63 - 1 micro-dollars a subject (one request
 * may cost 2^62), but the file's numbers went through doubles: one above
 * 2^53 was refused at the load (the router did not start on the file it
 * had written), and was written rounded (2^53 + 1 as 2^53), its header
 * sum exact, so the next start refused the file as cut short. Loaded and
 * written as integers, to the micro-dollar, they survive a restart. */
Test(sfile, amounts_above_2_53_micro_dollars_are_kept_exactly)
{
    char today[16], text[1024], line[512], *log;

    day_ago(0, today);
    snprintf(text, sizeof(text),
             "{\"costrouter_spend\":1,\"saved_ms\":1,\"subjects\":1,"
             "\"day_micro_usd\":9007199254740993,\"month_micro_usd\":4611686018427387907}\n"
             "{\"subject\":\"globex\",\"day\":\"%s\",\"day_micro_usd\":9007199254740993,"
             "\"month_micro_usd\":4611686018427387907}\n",
             today);
    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    write_conf(0);
    spill(sfile, text);
    if (start(&router) != 0) {
        log = slurp(err_path);
        cr_assert_fail("the router did not start on the file: %s", log);
    }
    cr_assert_eq(chat(KEY), 200); /* acme spends: the file is saved at the stop */
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router), "exit status %d", router.status);
    cr_assert_eq(subject_line_of("globex", line, sizeof(line)), 0, "%s", slurp(sfile));
    cr_assert_not_null(strstr(line, "\"day_micro_usd\":9007199254740993,"), "written: %s", line);
    cr_assert_not_null(strstr(line, "\"month_micro_usd\":4611686018427387907}"), "written: %s",
                       line);
    log = slurp(sfile);
    cr_assert_not_null(strstr(log, "\"month_micro_usd\":4611686018427390907}\n"),
                       "the header's sum (globex's and acme's 3000): %s", log);
    free(log);
    if (start(&router) != 0) {
        log = slurp(err_path);
        cr_assert_fail("the router did not start again on the file it wrote: %s", log);
    }
    assert_spend(COST, COST, 0);
}
