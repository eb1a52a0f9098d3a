/*
 * tests/cli/test_report_log.c: `costrouter report` (the binary) over cost
 * logs the real router wrote, in front of a real mockllm: whole answers,
 * streams, the Responses and Messages APIs with web searches, a host that
 * reports its costs (x-mock-cost-micro), a cache hit and a refusal by a
 * rate limit, under two tenants, one with a named key.
 *
 * mockllm counts a chat prompt of "hello there" as 9 tokens (a Responses
 * input of it too) and answers x-mock-tokens: 7; at $100 and $300 per
 * million tokens that is $0.003, a web search at $10 per 1,000 is $0.01,
 * and a file search at $2.50 per 1,000 is $0.0025.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TIMEOUT_MS 5000
#define CHAT_BODY(route, extra)                                                                  \
    "{\"model\":\"" route "\",\"max_tokens\":10" extra ",\"messages\":[{\"role\":\"user\","     \
    "\"content\":\"hello there\"}]}"

static struct support_proc router, mock;
static char dir[64], conf_path[128], log_path[128];
static struct support_http_response resp;
static struct buf req, out;

static void setup(void)
{
    strcpy(dir, "/tmp/report-log-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(conf_path, sizeof(conf_path), "%s/costrouter.yaml", dir);
    snprintf(log_path, sizeof(log_path), "%s/cost.jsonl", dir);
}

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    support_http_response_free(&resp);
    buf_free(&req);
    buf_free(&out);
    support_remove_tree(dir);
}

TestSuite(report_log, .init = setup, .fini = teardown, .timeout = 60);

/* mockllm, and the router in front of it with the three backends, their
 * routes, the tenants acme (key sk-acme) and globex (key sk-globex, named
 * ci, 3 requests a minute), the response cache, and `more` (config
 * lines: experiments). */
static void start(const char *more)
{
    char acme[65], globex[65];
    FILE *f;

    cr_assert_eq(support_mockllm_start(&mock, "--tokens", "7", NULL), 0);
    support_key_sha256_hex("sk-acme", acme);
    support_key_sha256_hex("sk-globex", globex);
    f = fopen(conf_path, "w");
    cr_assert_not_null(f);
    fprintf(f,
            "listen: 127.0.0.1:0\ncost_log: %s\n"
            "backends:\n"
            "  - {name: oa, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-oa, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: 100, output_usd_per_mtok: 300,\n"
            "     tokenizer: o200k_base, web_search_usd_per_1k: 10, file_search_usd_per_1k: 2.5}\n"
            "  - {name: ob, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-ob, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: 200, output_usd_per_mtok: 300,\n"
            "     tokenizer: o200k_base}\n"
            "  - {name: host, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-h, quality: 1,\n"
            "     context_window: 100000, input_usd_per_mtok: 100, output_usd_per_mtok: 300,\n"
            "     tokenizer: o200k_base, cost_from_usage: true}\n"
            "  - {name: an, kind: api, api: anthropic, url: \"http://127.0.0.1:%d/v1\", api_key: k-an,\n"
            "     model: m-an, quality: 1, context_window: 100000, input_usd_per_mtok: 100,\n"
            "     output_usd_per_mtok: 300, tokenizer: o200k_base, web_search_usd_per_1k: 10}\n"
            "routes:\n"
            "  - {model: chat, candidates: [oa]}\n"
            "  - {model: ab, candidates: [oa, ob]}\n"
            "  - {model: hosted, candidates: [host]}\n"
            "  - {model: claude, candidates: [an]}\n"
            "tenants:\n"
            "  - {id: acme, api_keys: [\"sha256:%s\"], tags: {team: search}}\n"
            "  - {id: globex, api_keys: [{hash: \"sha256:%s\", name: ci}], tags: {team: ads},\n"
            "     rate_limits: {rpm: 3}}\n"
            "cache: {enabled: true, ttl_s: 3600}\n%s",
            log_path, mock.port, mock.port, mock.port, mock.port, acme, globex, more);
    fclose(f);
    cr_assert_eq(support_router_start(&router, NULL, conf_path, "/dev/null"), 0);
}

/* POST `body` to `path` as the tenant of `key` with `extra` header lines;
 * the answer's status. */
static int post(const char *key, const char *path, const char *extra, const char *body)
{
    char headers[512];

    snprintf(headers, sizeof(headers),
             "Authorization: Bearer %s\r\nx-api-key: %s\r\nanthropic-version: 2023-06-01\r\n"
             "x-mock-tokens: 7\r\n%s",
             key, key, extra ? extra : "");
    buf_reset(&req);
    support_http_response_free(&resp);
    cr_assert_eq(support_http_format(&req, "POST", path, headers, body), 0);
    cr_assert_eq(support_http_request(router.port, req.data, req.len, TIMEOUT_MS, &resp), 0);
    return resp.status;
}

#define ASSERT_POST(status, ...)                                                                 \
    do {                                                                                         \
        int got_ = post(__VA_ARGS__);                                                            \
        cr_assert_eq(got_, status, "%d: %.*s", got_, (int)resp.body.len, resp.body.data);       \
    } while (0)

/* The requests of the scenario, then the router stopped (its log
 * flushed). Lines: 8. */
static void run_scenario(void)
{
    start("");
    /* acme: a whole answer and a stream whose host says what they cost
     * (only logged: oa prices them), one from a host that is paid its
     * figure, and a Responses answer with two web search calls and
     * three file search calls */
    ASSERT_POST(200, "sk-acme", "/v1/chat/completions", "x-mock-cost-micro: 1234\r\n",
                CHAT_BODY("chat", ""));
    ASSERT_POST(200, "sk-acme", "/v1/chat/completions", "x-mock-cost-micro: 777\r\n",
                CHAT_BODY("chat", ",\"stream\":true"));
    ASSERT_POST(200, "sk-acme", "/v1/chat/completions",
                "x-mock-cost-micro: 12345\r\nx-costrouter-tags: feature=summary\r\n",
                CHAT_BODY("hosted", ""));
    ASSERT_POST(200, "sk-acme", "/v1/responses",
                "x-mock-web-searches: 2\r\nx-mock-file-searches: 3\r\n"
                "x-costrouter-tags: feature=research\r\n",
                "{\"model\":\"chat\",\"max_output_tokens\":10,\"input\":\"hello there\","
                "\"tools\":[{\"type\":\"web_search\"},{\"type\":\"file_search\"}]}");
    /* globex (3 a minute): Claude with 3 web searches, the same again
     * from the cache, a stream with 2, and a fourth refused */
    ASSERT_POST(200, "sk-globex", "/v1/messages", "x-mock-web-searches: 3\r\n",
                CHAT_BODY("claude", ",\"temperature\":0"));
    ASSERT_POST(200, "sk-globex", "/v1/messages", "x-mock-web-searches: 3\r\n",
                CHAT_BODY("claude", ",\"temperature\":0"));
    cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
    ASSERT_POST(200, "sk-globex", "/v1/messages", "x-mock-web-searches: 2\r\n",
                CHAT_BODY("claude", ",\"stream\":true"));
    ASSERT_POST(429, "sk-globex", "/v1/messages", NULL, CHAT_BODY("claude", ""));
    support_proc_stop(&router);
    cr_assert(support_proc_exited_cleanly(&router));
}

/* `costrouter report --format FORMAT --by BY [more] FILE`; its stdout
 * in `out`, NUL-terminated; the exit status. */
static int report(const char *format, const char *by, const char *more, const char *file)
{
    const char *bin = getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter";
    char *argv[9] = {(char *)bin, "report", "--format", (char *)format, "--by", (char *)by};
    int argc = 6, rc;

    if (more != NULL)
        argv[argc++] = (char *)more;
    argv[argc++] = (char *)file;
    argv[argc] = NULL;
    buf_reset(&out);
    rc = support_run(argv, &out, 10000);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    return rc;
}

static cJSON *json_report(const char *by, const char *file)
{
    cJSON *root;

    cr_assert_eq(report("json", by, NULL, file), 0, "%s", out.data);
    root = cJSON_Parse(out.data);
    cr_assert_not_null(root, "not JSON: %s", out.data);
    return root;
}

/* The group of `dim` whose value is `value`; NULL: the group of the
 * records without one (null in JSON). */
static const cJSON *group(const cJSON *root, const char *dim, const char *value)
{
    const cJSON *g;

    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups")) {
        const cJSON *v = cJSON_GetObjectItem(g, "value");

        if (strcmp(cJSON_GetObjectItem(g, "dimension")->valuestring, dim) == 0 &&
            (value ? cJSON_IsString(v) && strcmp(v->valuestring, value) == 0 : cJSON_IsNull(v)))
            return g;
    }
    cr_assert_fail("no group %s=%s in %s", dim, value ? value : "null", out.data);
    return NULL;
}

static double num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItem(o, key);

    cr_assert(cJSON_IsNumber(v), "%s is not a number: %s", key, out.data);
    return v->valuedouble;
}

/* The sum of `key` over the lines of the log at `path` whose `dim` is
 * `value` (NULL: every line), read with cJSON: what the report must say. */
static double log_sum(const char *path, const char *key, const char *dim, const char *value)
{
    char *text = support_file_read(path), *save = NULL;
    double sum = 0;

    cr_assert_not_null(text);
    for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        cJSON *o = cJSON_Parse(l);
        const cJSON *d = dim ? cJSON_GetObjectItem(o, dim) : NULL, *v = cJSON_GetObjectItem(o, key);

        cr_assert_not_null(o, "the router wrote a line that is no JSON: %s", l);
        if ((dim == NULL || (cJSON_IsString(d) && strcmp(d->valuestring, value) == 0)) &&
            cJSON_IsNumber(v))
            sum += v->valuedouble;
        cJSON_Delete(o);
    }
    free(text);
    return sum;
}

/* Web searches and the costs hosts reported have their columns: the
 * searches counted per group, and the reported costs summed over the
 * lines that have one, with how many had one and what those were charged,
 * so a backend's prices can be set beside its host's figures. A cache hit
 * and a refusal are requests with neither. */
Test(report_log, web_searches_and_reported_costs_per_group)
{
    const cJSON *tot, *g;
    cJSON *root;

    run_scenario();
    root = json_report("tenant,key,backend,route,tag.feature", log_path);
    cr_assert_eq(num(root, "lines"), 8);
    cr_assert_eq(num(root, "bad_lines"), 0);
    tot = cJSON_GetObjectItem(root, "total");
    cr_assert_eq(num(tot, "requests"), 8);
    cr_assert_eq(num(tot, "errors"), 1, "the 429: %s", out.data);
    cr_assert_eq(num(tot, "cache_hits"), 1);
    cr_assert_eq(num(tot, "web_searches"), 7, "%s", out.data);
    cr_assert_eq(num(tot, "file_searches"), 3, "%s", out.data);
    cr_assert_eq(num(tot, "reported_requests"), 3);
    cr_assert_float_eq(num(tot, "reported_cost_usd"), 0.001234 + 0.000777 + 0.012345, 1e-15);
    cr_assert_float_eq(num(tot, "cost_usd_of_reported"), 0.003 + 0.003 + 0.012345, 1e-15);
    cr_assert_float_eq(num(tot, "cost_usd"), log_sum(log_path, "cost_usd", NULL, NULL), 1e-15);

    /* oa priced its two by its own rates; the host was paid its figure */
    g = group(root, "backend", "oa");
    cr_assert_eq(num(g, "reported_requests"), 2);
    cr_assert_float_eq(num(g, "reported_cost_usd"), 0.002011, 1e-15);
    cr_assert_float_eq(num(g, "cost_usd_of_reported"), 0.006, 1e-15);
    cr_assert_eq(num(g, "web_searches"), 2);
    cr_assert_eq(num(g, "file_searches"), 3);
    cr_assert_float_eq(num(g, "cost_usd"), 0.003 + 0.003 + 0.003 + 0.02 + 0.0075, 1e-15);
    g = group(root, "backend", "host");
    cr_assert_float_eq(num(g, "reported_cost_usd"), 0.012345, 1e-15);
    cr_assert_float_eq(num(g, "cost_usd_of_reported"), 0.012345, 1e-15);
    g = group(root, "backend", "an");
    cr_assert_eq(num(g, "requests"), 2);
    cr_assert_eq(num(g, "web_searches"), 5);
    cr_assert_eq(num(g, "file_searches"), 0);
    cr_assert_eq(num(g, "reported_requests"), 0);
    cr_assert_eq(num(g, "reported_cost_usd"), 0);
    cr_assert_float_eq(num(g, "cost_usd"), log_sum(log_path, "cost_usd", "backend", "an"), 1e-15);
    g = group(root, "backend", "cache");
    cr_assert_eq(num(g, "cache_hits"), 1);
    cr_assert_eq(num(g, "web_searches"), 0, "a cache hit searched nothing");
    cr_assert_eq(num(g, "cost_usd"), 0);
    cr_assert_gt(num(g, "saved_usd"), 0.03);

    g = group(root, "tenant", "globex");
    cr_assert_eq(num(g, "requests"), 4);
    cr_assert_eq(num(g, "errors"), 1);
    cr_assert_eq(num(g, "answered"), 2, "neither the 429 nor the cache hit");
    cr_assert_eq(num(g, "web_searches"), 5);
    cr_assert_eq(num(group(root, "key", "globex#ci"), "web_searches"), 5);
    cr_assert_eq(num(group(root, "tag.feature", "research"), "web_searches"), 2);
    cr_assert_eq(num(group(root, "tag.feature", "research"), "file_searches"), 3);
    cr_assert_eq(num(group(root, "tag.feature", "summary"), "reported_requests"), 1);
    cr_assert_eq(num(group(root, "route", "claude"), "requests"), 4);
    cJSON_Delete(root);

    /* CSV: the same columns, by name */
    cr_assert_eq(report("csv", "backend", NULL, log_path), 0);
    cr_assert_not_null(strstr(out.data, ",saved_usd,web_searches,file_searches,reported_cost_usd,"
                                        "reported_requests,cost_usd_of_reported,answered,"
                                        "usd_per_1k_answered,arm_a,"),
                       "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\ngroup,backend,oa,3,0,"), "%s", out.data);
    cr_assert_not_null(strstr(out.data, ",0,0,2,3,0.002011,2,0.006,3,12.166666666667,,,,,,,,,,,,,\n"),
                       "%s", out.data);
    /* the table: the totals, and the columns of each group */
    cr_assert_eq(report("table", "backend", NULL, log_path), 0);
    cr_assert_not_null(strstr(out.data, "web searches: 7, file searches: 3; costs reported by "
                                        "hosts: $0.014356 on 3 requests, charged $0.018345\n"),
                       "%s", out.data);
    cr_assert_not_null(strstr(out.data, "  web_searches  file_searches  reported_cost_usd"),
                       "%s", out.data);
}

/* A log written before the keys (no billed_web_searches nor
 * reported_cost_usd) counts none of either; a count with a fraction or an
 * amount below 0 is no router's, and its line a bad one. */
Test(report_log, older_lines_and_numbers_no_router_writes)
{
    char path[160];
    FILE *f;
    cJSON *root;

    snprintf(path, sizeof(path), "%s/old.jsonl", dir);
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("{\"tenant\":\"a\",\"cost_usd\":0.5}\n"
          "{\"tenant\":\"a\",\"cost_usd\":0.25,\"billed_web_searches\":null,"
          "\"reported_cost_usd\":null}\n"
          "{\"tenant\":\"a\",\"cost_usd\":0.25,\"billed_web_searches\":1.5}\n"
          "{\"tenant\":\"a\",\"cost_usd\":0.25,\"billed_file_searches\":-1}\n"
          "{\"tenant\":\"a\",\"cost_usd\":0.25,\"reported_cost_usd\":-0.1}\n"
          "{\"tenant\":\"a\",\"cost_usd\":0.25,\"reported_cost_usd\":0}\n",
          f);
    fclose(f);
    root = json_report("tenant", path);
    cr_assert_eq(num(root, "bad_lines"), 3, "%s", out.data);
    cr_assert_eq(num(group(root, "tenant", "a"), "requests"), 3);
    cr_assert_eq(num(group(root, "tenant", "a"), "web_searches"), 0);
    cr_assert_eq(num(group(root, "tenant", "a"), "file_searches"), 0);
    cr_assert_eq(num(group(root, "tenant", "a"), "reported_requests"), 1, "$0 is a figure");
    cr_assert_eq(num(group(root, "tenant", "a"), "cost_usd_of_reported"), 0.25);
    cJSON_Delete(root);
}

/* A record whose newline was lost (a copy cut right after its `}`, then
 * `cat` with the next file) runs into the next one: `{...}{...}` is no
 * JSON object, and the line is a bad one. It was read as the first
 * object alone: the second record left out of every sum without a word,
 * nor a bad line to say so. Bytes after an object are a bad line too. */
Test(report_log, two_records_on_one_line_make_a_bad_line)
{
    char glued[160], *text, *nl;
    cJSON *root;
    const cJSON *tot;

    run_scenario();
    text = support_file_read(log_path);
    cr_assert_not_null(text);
    nl = strchr(text, '\n');
    memmove(nl, nl + 1, strlen(nl + 1) + 1); /* lines 1 and 2 as one */
    nl = strrchr(text, '}');
    memmove(nl + 1 + 4, nl + 1, strlen(nl + 1) + 1);
    memcpy(nl + 1, " \"x\"", 4); /* and junk after the last record */
    snprintf(glued, sizeof(glued), "%s/glued.jsonl", dir);
    cr_assert_eq(support_file_write(glued, text), 0);
    free(text);

    root = json_report("tenant", glued);
    tot = cJSON_GetObjectItem(root, "total");
    cr_assert_eq(num(root, "lines"), 7);
    cr_assert_eq(num(root, "bad_lines"), 2, "%s", out.data);
    cr_assert_eq(num(tot, "requests"), 5, "%s", out.data);
    cJSON_Delete(root);

    /* stderr says where the first bad line is, for a user to look */
    char cmd[512], want[256];
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    snprintf(cmd, sizeof(cmd), "'%s' report --format csv '%s' 2>&1 >/dev/null",
             getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter", glued);
    buf_reset(&out);
    cr_assert_eq(support_run(argv, &out, 10000), 0);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    snprintf(want, sizeof(want), "report: skipped 2 bad lines (the first at %s:1)\n", glued);
    cr_assert_not_null(strstr(out.data, want), "%s", out.data);
}

/* Two experiments on one route, e-acme for acme and e-globex for globex,
 * with arms of the same names (control and treatment); 8 acme users and 3
 * globex users ask once each, then the router is stopped. */
static void run_two_experiments(void)
{
    static const char *const users[] = {"u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"};
    char headers[64];

    start("experiments:\n"
          "  - {name: e-acme, route: ab, tenants: [acme], arms: [{name: control, backends: [oa]},\n"
          "     {name: treatment, backends: [ob]}]}\n"
          "  - {name: e-globex, route: ab, tenants: [globex], arms: [{name: control,\n"
          "     backends: [ob]}, {name: treatment, backends: [oa]}]}\n");
    for (size_t i = 0; i < 8; i++) {
        snprintf(headers, sizeof(headers), "x-user-id: %s\r\n", users[i]);
        ASSERT_POST(200, "sk-acme", "/v1/chat/completions", headers, CHAT_BODY("ab", ""));
    }
    for (size_t i = 0; i < 3; i++) { /* globex: 3 a minute */
        snprintf(headers, sizeof(headers), "x-user-id: %s\r\n", users[i]);
        ASSERT_POST(200, "sk-globex", "/v1/chat/completions", headers, CHAT_BODY("ab", ""));
    }
    support_proc_stop(&router);
}

/* Two experiments on one route, for two tenants, with arms of the same
 * names: each compares its own arms. The log did not say which
 * experiment a line's arm was of, so the report compared them by route:
 * acme's control and globex's control taken as one arm, the difference
 * between arms a mix of two experiments' users, backends and prices. */
Test(report_log, arms_are_compared_within_their_experiment)
{
    const cJSON *d;
    cJSON *root;
    int seen = 0;

    run_two_experiments();
    root = json_report("tenant", log_path);
    cJSON_ArrayForEach(d, cJSON_GetObjectItem(root, "arm_diffs")) {
        const cJSON *e = cJSON_GetObjectItem(d, "experiment");

        cr_assert(cJSON_IsString(e), "an arm comparison by route, not experiment: %s", out.data);
        /* each experiment's arms hold its tenant's requests, no other's */
        cr_assert_eq(num(d, "n_a") + num(d, "n_b"), strcmp(e->valuestring, "e-acme") ? 3 : 8,
                     "%s", out.data);
        seen += strcmp(e->valuestring, "e-acme") == 0;
    }
    cr_assert_eq(seen, 1, "acme's 8 users fell in both arms: %s", out.data);
    cJSON_Delete(root);
}

/* The lines of the log at `path` whose `experiment` and `arm` are those. */
static int log_count_arm(const char *path, const char *experiment, const char *arm)
{
    char *text = support_file_read(path), *save = NULL;
    int n = 0;

    cr_assert_not_null(text);
    for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        cJSON *o = cJSON_Parse(l);
        const cJSON *e = cJSON_GetObjectItem(o, "experiment"), *a = cJSON_GetObjectItem(o, "arm");

        n += cJSON_IsString(e) && cJSON_IsString(a) && strcmp(e->valuestring, experiment) == 0 &&
             strcmp(a->valuestring, arm) == 0;
        cJSON_Delete(o);
    }
    free(text);
    return n;
}

/* `--by arm` groups by experiment and arm: two experiments whose arms
 * share names (control, treatment) were pooled into one "control" and one
 * "treatment", each a mix of both experiments' tenants, backends and
 * prices. Each arm is EXPERIMENT/ARM, in JSON with its experiment and arm
 * apart too. */
Test(report_log, by_arm_keeps_each_experiment_apart)
{
    static const char *const exps[] = {"e-acme", "e-globex"}, *const arms[] = {"control",
                                                                               "treatment"};
    const cJSON *g;
    cJSON *root;
    int total[2] = {0, 0};

    run_two_experiments();
    root = json_report("arm", log_path);
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups")) {
        const cJSON *v = cJSON_GetObjectItem(g, "value");

        cr_assert(cJSON_IsString(v), "%s", out.data);
        cr_assert(strcmp(v->valuestring, "control") && strcmp(v->valuestring, "treatment"),
                  "experiments pooled under one arm name: %s", out.data);
    }
    for (size_t e = 0; e < 2; e++)
        for (size_t a = 0; a < 2; a++) {
            char value[64];
            int n = log_count_arm(log_path, exps[e], arms[a]);

            snprintf(value, sizeof(value), "%s/%s", exps[e], arms[a]);
            total[e] += n;
            if (n == 0)
                continue;
            g = group(root, "arm", value);
            cr_assert_eq(num(g, "requests"), n, "%s: %s", value, out.data);
            cr_assert_str_eq(cJSON_GetObjectItem(g, "experiment")->valuestring, exps[e]);
            cr_assert_str_eq(cJSON_GetObjectItem(g, "arm")->valuestring, arms[a]);
        }
    cr_assert_eq(total[0], 8);
    cr_assert_eq(total[1], 3);
    cJSON_Delete(root);
    cr_assert_eq(report("table", "arm", NULL, log_path), 0);
    cr_assert_not_null(strstr(out.data, "\nby arm\nexperiment/arm "), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\ne-acme/"), "%s", out.data);
    cr_assert_eq(report("csv", "arm", NULL, log_path), 0);
    cr_assert_not_null(strstr(out.data, "\ngroup,arm,e-acme/"), "%s", out.data);
}

/* An arm's mean cost per request is over the requests it answered: a
 * refusal (cost 0, no answer: here a prompt past every context window)
 * and a cache hit (cost 0, no model ran) pulled it toward 0, by as much
 * as an arm had of them, so that the arms compared their refusals and
 * hits as much as their models' prices. Those are counted apart
 * (errors_a, cache_hits_a, ...), and each group has its cost per 1K
 * answered requests beside its cost per 1K requests. acme's 8 users each
 * ask once (control: oa, $0.003; treatment: ob, $0.0039), again (a cache
 * hit), and once with max_tokens past the context window (400). */
Test(report_log, arm_means_are_over_answered_requests)
{
    static const char *const users[] = {"u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"};
    char headers[64], body[256];
    const cJSON *d, *g;
    cJSON *root;

    start("experiments:\n"
          "  - {name: e-acme, route: ab, tenants: [acme], arms: [{name: control, backends: [oa]},\n"
          "     {name: treatment, backends: [ob]}]}\n");
    for (size_t i = 0; i < 8; i++) {
        snprintf(headers, sizeof(headers), "x-user-id: %s\r\n", users[i]);
        snprintf(body, sizeof(body),
                 "{\"model\":\"ab\",\"max_tokens\":%zu,\"temperature\":0,\"messages\":[{\"role\":"
                 "\"user\",\"content\":\"hello there\"}]}",
                 10 + i);
        ASSERT_POST(200, "sk-acme", "/v1/chat/completions", headers, body);
        ASSERT_POST(200, "sk-acme", "/v1/chat/completions", headers, body);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "cache");
        ASSERT_POST(400, "sk-acme", "/v1/chat/completions", headers,
                    "{\"model\":\"ab\",\"max_tokens\":99995,\"messages\":[{\"role\":"
                    "\"user\",\"content\":\"hello there\"}]}");
        cr_assert_not_null(strstr(resp.body.data, "context_length_exceeded"), "%s",
                           resp.body.data);
    }
    support_proc_stop(&router);
    cr_assert_eq(log_count_arm(log_path, "e-acme", "control") +
                     log_count_arm(log_path, "e-acme", "treatment"),
                 24, "hits and refusals are of their arm: %s", support_file_read(log_path));

    root = json_report("arm", log_path);
    d = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "arm_diffs"), 0);
    cr_assert_not_null(d, "%s", out.data);
    cr_assert_float_eq(num(d, "mean_a_usd"), 0.003, 1e-15, "control: %s", out.data);
    cr_assert_float_eq(num(d, "mean_b_usd"), 0.0039, 1e-15, "treatment: %s", out.data);
    cr_assert_eq(num(d, "n_a") + num(d, "n_b"), 8, "%s", out.data);
    cr_assert_eq(num(d, "n_a"), log_count_arm(log_path, "e-acme", "control") / 3);
    cr_assert_eq(num(d, "errors_a") + num(d, "errors_b"), 8, "%s", out.data);
    cr_assert_eq(num(d, "cache_hits_a") + num(d, "cache_hits_b"), 8, "%s", out.data);
    cr_assert_eq(num(d, "errors_a"), num(d, "n_a"));
    g = group(root, "arm", "e-acme/control");
    cr_assert_eq(num(g, "requests"), 3 * num(d, "n_a"));
    cr_assert_eq(num(g, "answered"), num(d, "n_a"));
    cr_assert_float_eq(num(g, "usd_per_1k_answered"), 3, 1e-12, "%s", out.data);
    cr_assert_float_eq(num(g, "usd_per_1k_requests"), 1, 1e-12, "%s", out.data);
    cJSON_Delete(root);
    cr_assert_eq(report("table", "arm", NULL, log_path), 0);
    cr_assert_not_null(strstr(out.data, ", $0.003000; "), "%s", out.data);
}

/* An arm whose every request failed (here its backend answers 500, then
 * its circuit opens: 503) answered none: it has no mean. Its mean was
 * written $0 and the difference between the arms was the other arm's
 * whole mean, +$0.0039 "cheaper" for an arm that served nobody. The mean
 * and the difference are null in JSON, empty in CSV, and said so in the
 * table. Each user's first request fails, wherever it goes; the
 * treatment's users then ask once more and are answered. */
Test(report_log, an_arm_that_answered_none_has_no_mean)
{
    static const char *const users[] = {"u0", "u1", "u2", "u3", "u4", "u5"};
    char headers[96], body[256];
    int control = 0, treatment = 0;
    const cJSON *d;
    cJSON *root;

    start("experiments:\n"
          "  - {name: e-acme, route: ab, tenants: [acme], arms: [{name: control, backends: [oa]},\n"
          "     {name: treatment, backends: [ob]}]}\n");
    for (size_t i = 0; i < sizeof(users) / sizeof(users[0]); i++) {
        const char *backend;

        snprintf(headers, sizeof(headers), "x-user-id: %s\r\nx-mock-status: 500\r\n", users[i]);
        cr_assert_geq(post("sk-acme", "/v1/chat/completions", headers, CHAT_BODY("ab", "")), 500);
        backend = support_http_header(&resp, "x-costrouter-backend");
        if (backend == NULL || strcmp(backend, "ob") != 0) { /* oa, or its circuit open */
            control++;
            continue;
        }
        treatment++;
        snprintf(headers, sizeof(headers), "x-user-id: %s\r\n", users[i]);
        snprintf(body, sizeof(body),
                 "{\"model\":\"ab\",\"max_tokens\":%zu,\"messages\":[{\"role\":\"user\","
                 "\"content\":\"hello there\"}]}",
                 10 + i);
        ASSERT_POST(200, "sk-acme", "/v1/chat/completions", headers, body);
        cr_assert_str_eq(support_http_header(&resp, "x-costrouter-backend"), "ob");
    }
    support_proc_stop(&router);
    cr_assert(control > 0 && treatment > 0, "control %d, treatment %d users", control, treatment);
    cr_assert_eq(log_count_arm(log_path, "e-acme", "control"), control, "%s",
                 support_file_read(log_path));

    root = json_report("arm", log_path);
    d = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "arm_diffs"), 0);
    cr_assert_not_null(d, "%s", out.data);
    cr_assert_str_eq(cJSON_GetObjectItem(d, "arm_a")->valuestring, "control");
    cr_assert_eq(num(d, "n_a"), 0, "%s", out.data);
    cr_assert_eq(num(d, "errors_a"), control, "%s", out.data);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(d, "mean_a_usd")), "a mean of none: %s", out.data);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(d, "diff_usd")), "%s", out.data);
    cr_assert_float_eq(num(d, "mean_b_usd"), 0.0039, 1e-15, "%s", out.data);
    cJSON_Delete(root);
    cr_assert_eq(report("csv", "arm", NULL, log_path), 0);
    /* n_a, n_b, mean_a_usd (empty), mean_b_usd, diff_usd (empty) */
    snprintf(body, sizeof(body), ",control,treatment,0,%d,,0.0039,,", treatment);
    cr_assert_not_null(strstr(out.data, body), "%s in %s", body, out.data);
    cr_assert_eq(report("table", "arm", NULL, log_path), 0);
    snprintf(body, sizeof(body), "control (n=0, no mean; %d errors, 0 cache hits) vs", control);
    cr_assert_not_null(strstr(out.data, body), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "0 cache hits): no difference [an arm answered no "
                                        "request]\n"),
                       "%s", out.data);
}

/* A token count (/v1/messages/count_tokens) is free and no model
 * answers it: it is no answered request. Counted as one, at $0, it pulled
 * an arm's mean and a group's usd_per_1k_answered toward 0 by as much as
 * its clients counted before they sent (here half: $0.0015 for messages
 * of $0.003 each), as cache hits did before they were left out. 4 users
 * of the experiment on claude each count, then send their message. */
Test(report_log, token_counts_are_not_answered_requests)
{
    static const char *const users[] = {"u0", "u1", "u2", "u3"};
    char headers[64], body[256];
    const cJSON *d, *g;
    cJSON *root;
    double mean;

    start("experiments:\n"
          "  - {name: e-claude, route: claude, tenants: [acme], arms: [{name: control, backends: "
          "[an]},\n     {name: treatment, backends: [an]}]}\n");
    for (size_t i = 0; i < sizeof(users) / sizeof(users[0]); i++) {
        snprintf(headers, sizeof(headers), "x-user-id: %s\r\n", users[i]);
        snprintf(body, sizeof(body),
                 "{\"model\":\"claude\",\"max_tokens\":%zu,\"messages\":[{\"role\":\"user\","
                 "\"content\":\"hello there\"}]}",
                 10 + i);
        ASSERT_POST(200, "sk-acme", "/v1/messages/count_tokens", headers,
                    "{\"model\":\"claude\",\"messages\":[{\"role\":\"user\",\"content\":"
                    "\"hello there\"}]}");
        ASSERT_POST(200, "sk-acme", "/v1/messages", headers, body);
    }
    support_proc_stop(&router);
    cr_assert_eq(log_count_arm(log_path, "e-claude", "control") +
                     log_count_arm(log_path, "e-claude", "treatment"),
                 8, "the counts are of their arm: %s", support_file_read(log_path));

    /* every message costs the same: 7 tokens each, whatever its max_tokens */
    mean = log_sum(log_path, "cost_usd", "endpoint", "/v1/messages") / 4;
    cr_assert_gt(mean, 0.001, "%s", support_file_read(log_path));
    root = json_report("backend,arm", log_path);
    g = group(root, "backend", "an");
    cr_assert_eq(num(g, "requests"), 8, "%s", out.data);
    cr_assert_eq(num(g, "answered"), 4, "%s", out.data);
    cr_assert_float_eq(num(g, "usd_per_1k_answered"), mean * 1000, 1e-9, "%s", out.data);
    cJSON_ArrayForEach(d, cJSON_GetObjectItem(root, "arm_diffs")) {
        cr_assert_eq(num(d, "n_a") + num(d, "n_b"), 4, "%s", out.data);
        if (num(d, "n_a") > 0)
            cr_assert_float_eq(num(d, "mean_a_usd"), mean, 1e-12, "%s", out.data);
        if (num(d, "n_b") > 0)
            cr_assert_float_eq(num(d, "mean_b_usd"), mean, 1e-12, "%s", out.data);
    }
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(root, "arm_diffs")), 1, "%s", out.data);
    cJSON_Delete(root);
}

/* A tenant or arm named "-" (names may be) is not the group of records
 * without one: they were one group, "-", summing a tenant's spend with
 * the unauthenticated refusals, and an arm "-" was no arm at all, left out
 * of its experiment's comparison. The records without one are null in
 * JSON, an empty field in CSV and - in the table, where a value that is
 * "-" prints as \-. */
Test(report_log, a_tenant_or_arm_named_dash_is_not_the_none_group)
{
    char path[160];
    cJSON *root;
    const cJSON *d;

    snprintf(path, sizeof(path), "%s/dash.jsonl", dir);
    cr_assert_eq(support_file_write(
                     path, "{\"tenant\":\"-\",\"route\":\"r\",\"experiment\":\"e\",\"arm\":\"-\","
                           "\"status\":200,\"cost_usd\":1}\n"
                           "{\"tenant\":\"-\",\"route\":\"r\",\"experiment\":\"e\",\"arm\":\"-\","
                           "\"status\":200,\"cost_usd\":1}\n"
                           "{\"tenant\":\"-\",\"route\":\"r\",\"experiment\":\"e\",\"arm\":\"x\","
                           "\"status\":200,\"cost_usd\":4}\n"
                           "{\"tenant\":\"-\",\"route\":\"r\",\"experiment\":\"e\",\"arm\":\"x\","
                           "\"status\":200,\"cost_usd\":4}\n"
                           "{\"tenant\":null,\"arm\":null,\"status\":401,\"cost_usd\":0}\n"
                           "{\"tenant\":\"a\",\"route\":\"r\",\"status\":200,\"cost_usd\":2}\n"),
                 0);
    root = json_report("tenant,arm", path);
    cr_assert_eq(num(group(root, "tenant", "-"), "requests"), 4, "%s", out.data);
    cr_assert_eq(num(group(root, "tenant", "-"), "cost_usd"), 10, "%s", out.data);
    cr_assert_eq(num(group(root, "tenant", NULL), "requests"), 1, "%s", out.data);
    cr_assert_eq(num(group(root, "arm", "e/-"), "requests"), 2, "%s", out.data);
    cr_assert_eq(num(group(root, "arm", NULL), "requests"), 2, "%s", out.data);
    cr_assert_eq(num(group(root, "arm", NULL), "cost_usd"), 2, "%s", out.data);
    d = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "arm_diffs"), 0);
    cr_assert_not_null(d, "arm - left out of experiment e's comparison: %s", out.data);
    cr_assert_str_eq(cJSON_GetObjectItem(d, "arm_a")->valuestring, "-");
    cr_assert_eq(num(d, "diff_usd"), 3);
    cJSON_Delete(root);

    cr_assert_eq(report("csv", "tenant", NULL, path), 0);
    cr_assert_not_null(strstr(out.data, "\ngroup,tenant,-,4,"), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\ngroup,tenant,,1,"), "%s", out.data);
    cr_assert_eq(report("table", "tenant", NULL, path), 0);
    cr_assert_not_null(strstr(out.data, "\n\\-             4       0 "), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\n-              1       1 "), "%s", out.data);
}

/* Values from the log (a tag's is the client's, x-costrouter-tags) went
 * into the table raw: a newline broke its rows, and an escape sequence
 * (ESC [ ...) ran in the terminal of whoever read the report (colours,
 * a cleared screen, a title). The table writes control characters (and
 * \) escaped, \n, \t, \r, \\ and \xHH (C1 ones as \u00HH); CSV and JSON
 * quote them as their formats do. */
Test(report_log, control_characters_are_escaped_in_the_table)
{
    char path[160];

    snprintf(path, sizeof(path), "%s/ctl.jsonl", dir);
    cr_assert_eq(support_file_write(
                     path,
                     "{\"tenant\":\"a\\nb\",\"route\":\"r\",\"experiment\":\"e\\u001b[2J\","
                     "\"arm\":\"x\\ty\",\"cost_usd\":1,\"tags\":{\"te\\u001bam\":\"\\u001b]0;"
                     "pwned\\u0007\"}}\n"
                     "{\"tenant\":\"c\\\\d\\u009b1m\",\"route\":\"r\",\"experiment\":"
                     "\"e\\u001b[2J\",\"arm\":\"z\\r\",\"cost_usd\":2}\n"),
                 0);
    cr_assert_eq(report("table", "tenant,arm,tag", NULL, path), 0);
    for (const unsigned char *p = (const unsigned char *)out.data; *p; p++) {
        cr_assert(*p >= 0x20 || *p == '\n', "a control byte %#x in the table: %s", *p, out.data);
        cr_assert(*p != 0x7f && !(p[0] == 0xc2 && p[1] >= 0x80 && p[1] < 0xa0),
                  "a control character in the table: %s", out.data);
    }
    cr_assert_not_null(strstr(out.data, "\na\\nb "), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\nc\\\\d\\u009b1m "), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\ne\\x1b[2J/x\\ty "), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\nby tag.te\\x1bam\n"), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "\n\\x1b]0;pwned\\x07 "), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "experiment e\\x1b[2J: x\\ty (n=1"), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "vs z\\r (n=1"), "%s", out.data);
    /* CSV keeps the bytes, quoted where they need it; JSON escapes them */
    cr_assert_eq(report("csv", "tenant", NULL, path), 0);
    cr_assert_not_null(strstr(out.data, "\ngroup,tenant,\"a\nb\","), "%s", out.data);
}

/* `report cost.jsonl*` over a log rotated by logrotate takes in its
 * compressed files too. Read as text, each of their "lines" was a bad
 * line and their records were missing from every sum, under a report
 * that exited 0: a month billed short. The report refuses such a file
 * and says how to read it. */
Test(report_log, a_compressed_rotated_log_is_refused_not_read_as_bad_lines)
{
    char gz[160], cmd[512];
    char *sh[] = {"/bin/sh", "-c", cmd, NULL};

    if (access("/usr/bin/gzip", X_OK) != 0 && access("/bin/gzip", X_OK) != 0)
        cr_skip_test("no gzip");
    run_scenario();
    snprintf(gz, sizeof(gz), "%s/cost.jsonl.1.gz", dir);
    snprintf(cmd, sizeof(cmd), "gzip -c '%s' > '%s'", log_path, gz);
    cr_assert_eq(support_run(sh, NULL, 10000), 0);

    cr_assert_eq(report("json", "tenant", log_path, gz), 1, "%s", out.data);
    cr_assert_eq(strlen(out.data), 0, "a report without the file's records: %s", out.data);
    snprintf(cmd, sizeof(cmd), "'%s' report '%s' 2>&1 >/dev/null",
             getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter", gz);
    buf_reset(&out);
    cr_assert_eq(support_run(sh, &out, 10000), 1);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    cr_assert_not_null(strstr(out.data, "cost.jsonl.1.gz: compressed: decompress it first (zcat "),
                       "%s", out.data);
    /* decompressed, it is read as any log */
    snprintf(cmd, sizeof(cmd), "zcat '%s' | '%s' report --format csv - | grep -c '^total,,,8,'",
             gz, getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter");
    cr_assert_eq(support_run(sh, NULL, 10000), 0);
}

/* One file under two names, as `report logs/STAR.jsonl` gives it when a
 * "current" symlink sits beside its target (or globs overlap), is read
 * once, with a word on stderr; it was read twice and every record in it
 * billed twice. */
Test(report_log, one_file_under_two_names_is_read_once)
{
    char current[160];
    cJSON *root;

    run_scenario();
    snprintf(current, sizeof(current), "%s/current.jsonl", dir);
    cr_assert_eq(symlink(log_path, current), 0);
    root = json_report("tenant", current);
    double once = num(cJSON_GetObjectItem(root, "total"), "cost_usd");
    cJSON_Delete(root);

    cr_assert_eq(report("json", "tenant", log_path, current), 0);
    root = cJSON_Parse(out.data);
    cr_assert_not_null(root, "%s", out.data);
    cr_assert_eq(num(root, "lines"), 8, "%s", out.data);
    cr_assert_eq(num(cJSON_GetObjectItem(root, "total"), "requests"), 8);
    cr_assert_eq(num(cJSON_GetObjectItem(root, "total"), "cost_usd"), once);
    cJSON_Delete(root);
}

/* A request refused for its tags (400 invalid_tags) carries none of
 * them: its line had those read before the bad one ("feature=a, b" gave
 * feature a, "b, feature=a" nothing), and the report counted the refusal
 * under tag.feature a, which the request never got. */
Test(report_log, a_request_refused_for_its_tags_carries_none)
{
    cJSON *root;
    const cJSON *g;

    start("");
    ASSERT_POST(200, "sk-acme", "/v1/chat/completions", "x-costrouter-tags: feature=a\r\n",
                CHAT_BODY("chat", ""));
    ASSERT_POST(400, "sk-acme", "/v1/chat/completions", "x-costrouter-tags: feature=a, b\r\n",
                CHAT_BODY("chat", ""));
    ASSERT_POST(400, "sk-acme", "/v1/chat/completions", "x-costrouter-tags: b, feature=a\r\n",
                CHAT_BODY("chat", ""));
    ASSERT_POST(400, "sk-acme", "/v1/chat/completions",
                "x-costrouter-tags: feature=a, team=other\r\n", CHAT_BODY("chat", ""));
    support_proc_stop(&router);

    root = json_report("tag", log_path);
    cr_assert_eq(num(cJSON_GetObjectItem(root, "total"), "requests"), 4);
    cr_assert_eq(num(group(root, "tag.feature", "a"), "requests"), 1, "%s", out.data);
    cr_assert_eq(num(group(root, "tag.feature", "a"), "errors"), 0, "%s", out.data);
    cr_assert_eq(num(group(root, "tag.team", "search"), "requests"), 4, "the tenant's own");
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups")) {
        const cJSON *v = cJSON_GetObjectItem(g, "value");

        cr_assert(!cJSON_IsString(v) || strcmp(v->valuestring, "other") != 0);
    }
    cJSON_Delete(root);
}

/* A tag's groups add up to the total, as every other dimension's do: the
 * lines without that tag (untagged requests, another tenant's) are its
 * group of lines without a value, null in JSON. The report left them out,
 * so `--by tag.feature` showed less spend than was logged, the untagged
 * part in no row of it. */
Test(report_log, lines_without_a_tag_are_its_none_group)
{
    const char *const dims[] = {"tag.feature", "tag"};
    const cJSON *g, *none;
    cJSON *root;

    start("");
    ASSERT_POST(200, "sk-acme", "/v1/chat/completions", "x-costrouter-tags: feature=a\r\n",
                CHAT_BODY("chat", ""));
    ASSERT_POST(200, "sk-acme", "/v1/chat/completions", NULL, CHAT_BODY("chat", ""));
    ASSERT_POST(200, "sk-globex", "/v1/chat/completions", NULL, CHAT_BODY("chat", ""));
    ASSERT_POST(401, "sk-nobody", "/v1/chat/completions", NULL, CHAT_BODY("chat", ""));
    support_proc_stop(&router);

    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++) {
        double requests = 0, cost = 0;

        root = json_report(dims[i], log_path);
        cr_assert_eq(num(group(root, "tag.feature", "a"), "requests"), 1, "%s", out.data);
        none = group(root, "tag.feature", NULL);
        cr_assert_eq(num(none, "requests"), 3, "%s", out.data);
        cr_assert_eq(num(none, "errors"), 1, "%s", out.data);
        cr_assert_eq(num(none, "answered"), 2, "%s", out.data);
        cr_assert_float_eq(num(none, "cost_usd"), 0.006, 1e-15, "%s", out.data);
        cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups"))
            if (strcmp(cJSON_GetObjectItem(g, "dimension")->valuestring, "tag.feature") == 0) {
                requests += num(g, "requests");
                cost += num(g, "cost_usd");
            }
        cr_assert_eq(requests, 4, "%s", out.data);
        cr_assert_float_eq(cost, log_sum(log_path, "cost_usd", NULL, NULL), 1e-15);
        cJSON_Delete(root);
    }
    /* the table prints it as every dimension's: "-" */
    cr_assert_eq(report("table", "tag.feature", NULL, log_path), 0);
    cr_assert_not_null(strstr(out.data, "\n-  "), "%s", out.data);
}

/* --by day and --by month: the UTC day and month each request started
 * (its ts), in order of time, none (null) for a line without a ts; the last
 * millisecond of November and the first of December fall apart. */
Test(report_log, by_day_and_month)
{
    char older[160], today[11], month[8];
    cJSON *root, *first;
    const cJSON *g;
    const char *prev = "";

    run_scenario();
    char *text = support_file_read(log_path);
    cr_assert_not_null(text);
    *strchr(text, '\n') = '\0';
    first = cJSON_Parse(text);
    free(text);
    cr_assert_not_null(first);
    snprintf(today, sizeof(today), "%.10s", cJSON_GetObjectItem(first, "ts")->valuestring);
    snprintf(month, sizeof(month), "%.7s", today);
    cJSON_Delete(first);
    snprintf(older, sizeof(older), "%s/older.jsonl", dir);
    cr_assert_eq(support_file_write(older,
                                    "{\"ts\":\"2025-11-30T23:59:59.999Z\",\"tenant\":\"acme\","
                                    "\"cost_usd\":1}\n"
                                    "{\"ts\":\"2025-12-01T00:00:00.000Z\",\"tenant\":\"acme\","
                                    "\"cost_usd\":2}\n"
                                    "{\"ts\":null,\"tenant\":\"acme\",\"cost_usd\":4}\n"),
                 0);
    cr_assert_eq(report("json", "day,month", log_path, older), 0);
    root = cJSON_Parse(out.data);
    cr_assert_not_null(root, "%s", out.data);
    cr_assert_eq(num(group(root, "day", today), "requests"), 8);
    cr_assert_eq(num(group(root, "day", "2025-11-30"), "cost_usd"), 1);
    cr_assert_eq(num(group(root, "day", "2025-12-01"), "cost_usd"), 2);
    cr_assert_eq(num(group(root, "day", NULL), "cost_usd"), 4);
    cr_assert_eq(num(group(root, "month", "2025-11"), "cost_usd"), 1);
    cr_assert_eq(num(group(root, "month", month), "requests"), 8);
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups")) {
        const char *v = cJSON_GetObjectItem(g, "value")->valuestring;
        if (strcmp(cJSON_GetObjectItem(g, "dimension")->valuestring, "day") == 0 && v != NULL) {
            cr_assert_lt(strcmp(prev, v), 0, "days out of order: %s", out.data);
            prev = v;
        }
    }
    cJSON_Delete(root);
}
