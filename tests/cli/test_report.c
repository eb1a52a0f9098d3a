/*
 * tests/cli/test_report.c: cli/report.c over a cost log generated with
 * metrics_cost_record_json (the writer's own format) plus junk lines.
 * Expected totals are computed while generating; costs are multiples of
 * 1/1024 so every sum is exact in binary floating point.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "cli/report.h"
#include "common/buf.h"
#include "conf/conf.h"
#include "metrics/metrics.h"
#include "tests/support/proc.h"

static char dir[64], logpath[128], outpath[128];

static void setup(void)
{
    strcpy(dir, "/tmp/report-test-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(logpath, sizeof(logpath), "%s/cost.log", dir);
    snprintf(outpath, sizeof(outpath), "%s/out", dir);
}

static void teardown(void)
{
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(report, .init = setup, .fini = teardown);

static const char *const tenants[] = {"acme", "globex", "a,\"b\""};
static const char *const backends[] = {"gpt-4o", "gpu-a"};
static const char *const teams[] = {"search", "ads"};

struct expect {
    double cost_total, cost_tenant[3], cost_backend[2], cost_team[2];
    unsigned n_tenant[3], n_backend[2], n_team[2], n_total, errors;
    unsigned long long prompt;
};

/* Append one record; aborts (crashing the test) if it cannot. */
static void emit(FILE *f, const struct metrics_cost_record *r)
{
    struct buf b = {0};

    if (metrics_cost_record_json(r, &b) != 0 || fwrite(b.data, 1, b.len, f) != b.len)
        abort();
    buf_free(&b);
}

/*
 * N ordinary records spread over tenants/backends/teams, then the A/B
 * sample on route "exp": arm a costs {1,2,3}/1024, arm b {3,4,5}/1024
 * (equal variances and sizes: Welch df = 4 exactly), then junk lines.
 */
static void generate(unsigned n, struct expect *e)
{
    FILE *f = fopen(logpath, "w");
    char id[32];

    memset(e, 0, sizeof(*e));
    cr_assert_not_null(f);
    for (unsigned i = 0; i < n; i++) {
        unsigned t = i % 3, b = (i / 3) % 2, tm = (i / 7) % 2;
        struct conf_tag tags[] = {{"team", (char *)teams[tm]}, {"cost_center", "cc1"}};
        int settled = i % 5 != 0;
        /* unsettled: the router writes cost_usd 0; null here, beside an
         * estimate, which is no spend: it counts 0 */
        double cost = settled ? (double)(i % 11 + 1) / 1024 : 0;
        snprintf(id, sizeof(id), "r%u", i);
        struct metrics_cost_record r = {
            .ts_ms = 1700000000000LL + i, .request_id = id, .tenant = tenants[t], .tags = tags,
            .ntags = 2, .route = "chat", .backend = backends[b], .reason = "cheapest",
            .prompt_tokens_est = 10, .prompt_tokens = 12, .completion_tokens_est = 5,
            .completion_tokens = 7, .billed_prompt_tokens = settled ? 12 : -1,
            .billed_completion_tokens = settled ? 7 : -1, .cost_usd_est = settled ? 1 : 0.5,
            .cost_usd = settled ? cost : NAN,
            .saved_usd = 0, .ttft_ms = 10, .latency_ms = 20, .status = i % 13 ? 200 : 502,
        };
        emit(f, &r);
        e->cost_total += cost;
        e->cost_tenant[t] += cost;
        e->cost_backend[b] += cost;
        e->cost_team[tm] += cost;
        e->n_tenant[t]++;
        e->n_backend[b]++;
        e->n_team[tm]++;
        e->n_total++;
        e->errors += r.status >= 400;
        e->prompt += settled ? 12 : 0; /* unsettled: nothing billed */
    }
    for (int i = 0; i < 6; i++) {
        snprintf(id, sizeof(id), "ab%d", i);
        double cost = (double)(i < 3 ? i + 1 : i) / 1024; /* a: 1,2,3  b: 3,4,5 */
        struct metrics_cost_record r = {
            .ts_ms = 1700000000000LL, .request_id = id, .tenant = "acme", .route = "exp",
            .backend = "gpu-a", .arm = i < 3 ? "a" : "b", .prompt_tokens_est = -1,
            .prompt_tokens = -1, .completion_tokens_est = -1, .completion_tokens = -1,
            .billed_prompt_tokens = -1, .billed_completion_tokens = -1,
            .cost_usd_est = NAN, .cost_usd = cost, .saved_usd = NAN, .ttft_ms = NAN,
            .latency_ms = NAN, .status = 200,
        };
        emit(f, &r);
        e->cost_total += cost;
        e->cost_tenant[0] += cost;
        e->cost_backend[1] += cost;
        e->n_tenant[0]++;
        e->n_backend[1]++;
        e->n_total++;
    }
    fputs("not json at all\n{\"truncated\": \n[1,2,3]\n\n", f); /* 3 bad, 1 blank */
    fclose(f);
}

static int run(const char *a1, const char *a2, const char *a3, const char *a4)
{
    char *argv[] = {"report", (char *)a1, (char *)a2, (char *)a3, (char *)a4, "-o", outpath, logpath, NULL};
    return cli_report_main(8, argv);
}

static char *slurp(const char *p)
{
    FILE *f = fopen(p, "rb");
    char *data = NULL;
    size_t cap = 0;

    cr_assert_not_null(f);
    cr_assert_geq(getdelim(&data, &cap, '\0', f), 0);
    fclose(f);
    return data;
}

static const cJSON *group(const cJSON *root, const char *dim, const char *value)
{
    const cJSON *g;

    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups")) {
        const cJSON *v = cJSON_GetObjectItem(g, "value");

        if (strcmp(cJSON_GetObjectItem(g, "dimension")->valuestring, dim) == 0 &&
            (value ? cJSON_IsString(v) && strcmp(v->valuestring, value) == 0 : cJSON_IsNull(v)))
            return g;
    }
    cr_assert_fail("no group %s=%s", dim, value ? value : "null");
    return NULL;
}

static double field(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItem(o, key);
    cr_assert(cJSON_IsNumber(v), "%s is not a number", key);
    return v->valuedouble;
}

Test(report, json_totals_are_exact, .timeout = 20)
{
    struct expect e;

    generate(1000, &e);
    cr_assert_eq(run("--format", "json", "--by", "tenant,tag,backend,arm"), 0);
    char *text = slurp(outpath);
    cJSON *root = cJSON_Parse(text);
    cr_assert_not_null(root, "output is not JSON");
    cr_assert_eq(field(root, "lines"), e.n_total + 3);
    cr_assert_eq(field(root, "bad_lines"), 3);
    const cJSON *tot = cJSON_GetObjectItem(root, "total");
    cr_assert_eq(field(tot, "requests"), e.n_total);
    cr_assert_eq(field(tot, "cost_usd"), e.cost_total);
    cr_assert_eq(field(tot, "errors"), e.errors);
    cr_assert_eq(field(tot, "prompt_tokens"), e.prompt);
    cr_assert_float_eq(field(tot, "usd_per_1k_requests"), e.cost_total * 1000 / e.n_total, 1e-12);
    for (int t = 0; t < 3; t++) {
        const cJSON *g = group(root, "tenant", tenants[t]);
        cr_assert_eq(field(g, "requests"), e.n_tenant[t]);
        cr_assert_eq(field(g, "cost_usd"), e.cost_tenant[t], "tenant %s", tenants[t]);
    }
    for (int b = 0; b < 2; b++) {
        cr_assert_eq(field(group(root, "backend", backends[b]), "requests"), e.n_backend[b]);
        cr_assert_eq(field(group(root, "backend", backends[b]), "cost_usd"), e.cost_backend[b]);
        cr_assert_eq(field(group(root, "tag.team", teams[b]), "cost_usd"), e.cost_team[b]);
        cr_assert_eq(field(group(root, "tag.team", teams[b]), "requests"), e.n_team[b]);
    }
    cr_assert_eq(field(group(root, "tag.cost_center", "cc1"), "requests"), 1000);
    cr_assert_eq(field(group(root, "arm", "(route) exp/a"), "cost_usd"), 6.0 / 1024);
    cr_assert_eq(field(group(root, "arm", "(route) exp/b"), "cost_usd"), 12.0 / 1024);
    cr_assert_eq(field(group(root, "arm", NULL), "requests"), 1000);
    /* route was not asked for */
    const cJSON *g;
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups"))
        cr_assert_str_neq(cJSON_GetObjectItem(g, "dimension")->valuestring, "route");

    /* the A/B comparison: diff 2/1024, df 4, t(0.975, 4) = 2.776445 */
    const cJSON *diffs = cJSON_GetObjectItem(root, "arm_diffs");
    cr_assert_eq(cJSON_GetArraySize(diffs), 1);
    const cJSON *d = cJSON_GetArrayItem(diffs, 0);
    cr_assert_str_eq(cJSON_GetObjectItem(d, "route")->valuestring, "exp");
    cr_assert_str_eq(cJSON_GetObjectItem(d, "arm_a")->valuestring, "a");
    cr_assert_eq(field(d, "n_a"), 3);
    cr_assert_float_eq(field(d, "diff_usd"), 2.0 / 1024, 1e-15);
    cr_assert_float_eq(field(d, "df"), 4, 1e-9);
    double half = 2.7764451051977987 * sqrt(2.0 / 3) / 1024;
    cr_assert_float_eq(field(d, "ci95_low_usd"), 2.0 / 1024 - half, 1e-9 / 1024);
    cr_assert_float_eq(field(d, "ci95_high_usd"), 2.0 / 1024 + half, 1e-9 / 1024);
    cJSON_Delete(root);
    free(text);
}

/* Split one CSV record (RFC 4180 quoting) into fields; returns the count. */
static int csv_split(const char *line, char fields[32][128])
{
    int n = 0;
    size_t k = 0;
    int quoted = 0;

    for (const char *p = line;; p++) {
        if (quoted) {
            cr_assert_neq(*p, '\0', "unterminated quote: %s", line);
            if (*p == '"' && p[1] == '"')
                fields[n][k++] = *++p;
            else if (*p == '"')
                quoted = 0;
            else
                fields[n][k++] = *p;
        } else if (*p == '"' && k == 0) {
            quoted = 1;
        } else if (*p == ',' || *p == '\0') {
            fields[n][k] = '\0';
            n++, k = 0;
            if (*p == '\0')
                return n;
        } else {
            cr_assert_neq(*p, '"', "stray quote: %s", line);
            fields[n][k++] = *p;
        }
    }
}

Test(report, csv_is_valid_and_matches, .timeout = 20)
{
    struct expect e;
    static char f[32][128];
    int width = 0, seen_tenant = 0, seen_diff = 0;

    generate(300, &e);
    cr_assert_eq(run("--format", "csv", "--by", "tenant,route"), 0);
    char *text = slurp(outpath), *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        int n = csv_split(line, f);
        if (width == 0) {
            width = n;
            cr_assert_str_eq(f[0], "kind");
            cr_assert_str_eq(f[7], "cost_usd");
            continue;
        }
        cr_assert_eq(n, width, "ragged row: %s", line);
        if (strcmp(f[0], "total") == 0) {
            cr_assert_eq(strtod(f[3], NULL), e.n_total);
            cr_assert_eq(strtod(f[7], NULL), e.cost_total);
        }
        if (strcmp(f[0], "group") == 0 && strcmp(f[1], "tenant") == 0 && strcmp(f[2], tenants[2]) == 0) {
            seen_tenant = 1;
            cr_assert_eq(strtod(f[3], NULL), e.n_tenant[2]);
            cr_assert_eq(strtod(f[7], NULL), e.cost_tenant[2]);
        }
        if (strcmp(f[0], "arm_diff") == 0) {
            seen_diff = 1;
            cr_assert_str_eq(f[2], "exp");
            cr_assert_float_eq(strtod(f[24], NULL), 2.0 / 1024, 1e-15);
            cr_assert_lt(strtod(f[25], NULL), strtod(f[26], NULL));
        }
    }
    cr_assert(seen_tenant, "quoted tenant value must round-trip");
    cr_assert(seen_diff);
    free(text);
}

Test(report, table_and_progress, .timeout = 20)
{
    struct expect e;
    char errpath[160];
    int saved = dup(2);

    generate(50, &e);
    snprintf(errpath, sizeof(errpath), "%s/stderr", dir);
    cr_assert_not_null(freopen(errpath, "w", stderr));
    int rc = run("--format", "table", "--progress", "--by=backend");
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    cr_assert_eq(rc, 0);
    char *text = slurp(outpath), *err = slurp(errpath);
    cr_assert_not_null(strstr(text, "by backend\n"));
    cr_assert_not_null(strstr(text, "gpu-a"));
    cr_assert_not_null(strstr(text, "bad lines skipped: 3"));
    cr_assert_not_null(strstr(text, "route exp: a (n=3"));
    cr_assert_null(strstr(text, "by tenant"));
    cr_assert_not_null(strstr(err, "cost.log: 59 lines"), "progress line: %s", err);
    cr_assert_not_null(strstr(err, "(100%)"));
    cr_assert_not_null(strstr(err, "skipped 3 bad lines"));
    free(text);
    free(err);
}

/* Write `lines` (n of them) as the log. */
static void write_log(const char *const *lines, size_t n)
{
    FILE *f = fopen(logpath, "w");

    cr_assert_not_null(f);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s\n", lines[i]);
    fclose(f);
}

/* The report in JSON, --by `by`, of the log `lines` (n of them); *text
 * gets its text (to free). */
static cJSON *json_report_of(const char *const *lines, size_t n, const char *by, char **text)
{
    cJSON *root;

    write_log(lines, n);
    cr_assert_eq(run("--format", "json", "--by", by), 0);
    *text = slurp(outpath);
    root = cJSON_Parse(*text);
    cr_assert_not_null(root, "output is not JSON: %s", *text);
    return root;
}

/* Tokens are what was billed, which the estimates are not: a stream
 * without usage billed on the router's count, an upstream error billed
 * nothing. A log older than the billed_* keys is read as before: usage,
 * else the estimates. */
Test(report, tokens_are_what_was_billed, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"route\":\"nu\",\"prompt_tokens_est\":9,\"prompt_tokens\":null,"
        "\"completion_tokens_est\":256,\"completion_tokens\":null,"
        "\"billed_prompt_tokens\":9,\"billed_completion_tokens\":16,\"cost_usd\":0.000041}",
        "{\"route\":\"api\",\"prompt_tokens_est\":9,\"prompt_tokens\":null,"
        "\"completion_tokens_est\":256,\"completion_tokens\":null,"
        "\"billed_prompt_tokens\":0,\"billed_completion_tokens\":0,\"cost_usd\":0,\"status\":400}",
        "{\"route\":\"old\",\"prompt_tokens_est\":10,\"prompt_tokens\":null,"
        "\"completion_tokens_est\":5,\"completion_tokens\":null,\"cost_usd\":0}",
        "{\"route\":\"old\",\"prompt_tokens_est\":10,\"prompt_tokens\":12,"
        "\"completion_tokens_est\":5,\"completion_tokens\":7,\"cost_usd\":0}",
        /* a line with the cache counts of an Anthropic answer (2026-12-07) */
        "{\"route\":\"anth\",\"prompt_tokens_est\":17,\"prompt_tokens\":18,"
        "\"completion_tokens_est\":50,\"completion_tokens\":3,\"billed_prompt_tokens\":18,"
        "\"billed_completion_tokens\":3,\"billed_cached_tokens\":4,"
        "\"billed_cache_write_tokens\":6,\"cost_usd\":0.00249}",
        /* and its web searches (2026-12-07): a count, no tokens */
        "{\"route\":\"web\",\"prompt_tokens_est\":17,\"prompt_tokens\":18,"
        "\"completion_tokens_est\":50,\"completion_tokens\":3,\"billed_prompt_tokens\":18,"
        "\"billed_completion_tokens\":3,\"billed_cached_tokens\":0,"
        "\"billed_cache_write_tokens\":0,\"billed_cache_write_1h_tokens\":0,"
        "\"billed_web_searches\":3,\"cost_usd\":0.030099}",
    };
    static const struct {
        const char *route;
        double prompt, completion;
    } want[] = {{"nu", 9, 16}, {"api", 0, 0}, {"old", 10 + 12, 5 + 7}, {"anth", 18, 3},
                {"web", 18, 3}};
    char *text;
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "route", &text);

    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        const cJSON *g = group(root, "route", want[i].route);
        cr_assert_eq(field(g, "prompt_tokens"), want[i].prompt, "%s", want[i].route);
        cr_assert_eq(field(g, "completion_tokens"), want[i].completion, "%s", want[i].route);
    }
    cr_assert_eq(field(group(root, "route", "web"), "cost_usd"), 0.030099, "the searches' fee in");
    cJSON_Delete(root);
    free(text);
}

/* By key: the lines of each named key, TENANT#NAME (names are unique
 * within a tenant only), none (null) for the others; not among the groups unless
 * asked. */
Test(report, by_key, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"tenant\":\"a\",\"key\":\"ci\",\"cost_usd\":0.25}",
        "{\"tenant\":\"a\",\"key\":\"ci\",\"cost_usd\":0.5}",
        "{\"tenant\":\"b\",\"key\":\"ci\",\"cost_usd\":2}",
        "{\"tenant\":\"a\",\"cost_usd\":1}",
    };
    char *text;
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "key", &text);

    cr_assert_eq(field(group(root, "key", "a#ci"), "cost_usd"), 0.75);
    cr_assert_eq(field(group(root, "key", "a#ci"), "requests"), 2);
    cr_assert_eq(field(group(root, "key", "b#ci"), "cost_usd"), 2);
    cr_assert_eq(field(group(root, "key", NULL), "requests"), 1);
    cJSON_Delete(root);
    free(text);
}

/* By service tier: the tier whose rates priced a line, "default" for a
 * line that names none (billed at the standard rates, as every line
 * written before tiers were priced); not among the groups unless asked. */
Test(report, by_service_tier, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"route\":\"r\",\"service_tier\":\"flex\",\"cost_usd\":0.25}",
        "{\"route\":\"r\",\"service_tier\":\"flex\",\"cost_usd\":0.5}",
        "{\"route\":\"r\",\"service_tier\":\"priority\",\"cost_usd\":2}",
        "{\"route\":\"r\",\"cost_usd\":1}",
        "{\"route\":\"r\",\"service_tier\":null,\"cost_usd\":1}",
    };
    char *text;
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "service_tier", &text);
    const cJSON *g;

    cr_assert_eq(field(group(root, "service_tier", "flex"), "cost_usd"), 0.75);
    cr_assert_eq(field(group(root, "service_tier", "flex"), "requests"), 2);
    cr_assert_eq(field(group(root, "service_tier", "priority"), "cost_usd"), 2);
    cr_assert_eq(field(group(root, "service_tier", "default"), "requests"), 2);
    cJSON_Delete(root);
    free(text);
    root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "tenant,tag,backend,route,arm",
                          &text);
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups"))
        cr_assert_str_neq(cJSON_GetObjectItem(g, "dimension")->valuestring, "service_tier");
    cJSON_Delete(root);
    free(text);
}

/* By endpoint: a route serving /v1/messages and its free token counts
 * shows each apart (the counts, at $0, lower the route's cost per 1K
 * requests); lines written before the router named endpoints are none (null). */
Test(report, by_endpoint, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"route\":\"claude\",\"endpoint\":\"/v1/messages\",\"cost_usd\":0.5}",
        "{\"route\":\"claude\",\"endpoint\":\"/v1/messages\",\"cost_usd\":0.25}",
        "{\"route\":\"claude\",\"endpoint\":\"/v1/messages/count_tokens\",\"cost_usd\":0}",
        "{\"route\":\"claude\",\"cost_usd\":1}",
    };
    char *text;
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "endpoint,route", &text);

    cr_assert_eq(field(group(root, "endpoint", "/v1/messages"), "cost_usd"), 0.75);
    cr_assert_eq(field(group(root, "endpoint", "/v1/messages"), "requests"), 2);
    cr_assert_eq(field(group(root, "endpoint", "/v1/messages/count_tokens"), "requests"), 1);
    cr_assert_eq(field(group(root, "endpoint", "/v1/messages/count_tokens"), "cost_usd"), 0);
    cr_assert_eq(field(group(root, "endpoint", NULL), "requests"), 1);
    cr_assert_eq(field(group(root, "route", "claude"), "requests"), 4);
    cJSON_Delete(root);
    free(text);
}

/* Two arms whose costs never vary have no interval (Welch's df is 0/0;
 * a zero-width one claimed certainty from two requests an arm); one
 * constant arm beside a varying one has the interval of the other's
 * variance alone, with its n - 1 degrees of freedom. */
Test(report, constant_arms_have_no_confidence_interval, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"route\":\"c\",\"arm\":\"a\",\"cost_usd\":0.0009765625}",
        "{\"route\":\"c\",\"arm\":\"a\",\"cost_usd\":0.0009765625}",
        "{\"route\":\"c\",\"arm\":\"b\",\"cost_usd\":0.001953125}",
        "{\"route\":\"c\",\"arm\":\"b\",\"cost_usd\":0.001953125}",
        "{\"route\":\"v\",\"arm\":\"a\",\"cost_usd\":0.0009765625}",
        "{\"route\":\"v\",\"arm\":\"a\",\"cost_usd\":0.0009765625}",
        "{\"route\":\"v\",\"arm\":\"a\",\"cost_usd\":0.0009765625}",
        "{\"route\":\"v\",\"arm\":\"b\",\"cost_usd\":0}",
        "{\"route\":\"v\",\"arm\":\"b\",\"cost_usd\":0.001953125}",
    };
    const cJSON *d;
    char *text;
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "arm", &text);

    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(root, "arm_diffs")), 2);
    d = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "arm_diffs"), 0);
    cr_assert_str_eq(cJSON_GetObjectItem(d, "route")->valuestring, "c");
    cr_assert_eq(field(d, "diff_usd"), 1.0 / 1024);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(d, "ci95_low_usd")), "%s", text);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(d, "ci95_high_usd")));
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(d, "df")));
    /* b: {0, 2}/1024, variance 2/1024^2, over 2: the standard error is
     * 1/1024 and df = 1, where t = 12.7062. */
    d = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "arm_diffs"), 1);
    cr_assert_eq(field(d, "df"), 1);
    cr_assert_float_eq(field(d, "ci95_high_usd"), 12.7062047361747 / 1024, 1e-12);
    cJSON_Delete(root);
    free(text);
    cr_assert_eq(run("--format", "table", "--by", "arm"), 0);
    text = slurp(outpath);
    cr_assert_not_null(strstr(text, "route c: a (n=2, $0.000977; 0 errors, 0 cache hits) vs b (n=2, "
                                    "$0.001953; 0 errors, 0 cache hits): +0.000977 "
                                    "[no CI: neither arm's cost varies]"),
                       "%s", text);
    free(text);
}

/* `costrouter report` (the binary, $COSTROUTER_BIN) over the log with
 * `format`; its stdout, NUL-terminated, goes to out. */
static void run_binary(const char *format, struct buf *out)
{
    const char *bin = getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter";
    char *argv[] = {(char *)bin, "report", "--format", (char *)format, "--by", "tenant,arm",
                    logpath, NULL};

    buf_reset(out);
    cr_assert_eq(support_run(argv, out, 10000), 0, "report --format %s", format);
    cr_assert_eq(buf_append(out, "", 1), 0);
}

/* Every number in a JSON document is finite (cJSON prints an infinity as
 * null, so a null where a number belongs fails too, at its caller). */
static int json_all_finite(const cJSON *o)
{
    const cJSON *c;

    if (cJSON_IsNumber(o))
        return isfinite(o->valuedouble);
    cJSON_ArrayForEach(c, o)
        if (!json_all_finite(c))
            return 0;
    return 1;
}

/* No word of `text` (a table or CSV) is an infinity or a NaN as printf
 * writes them ("inf", "-nan", "+inf", ...). Returns the first found, or
 * NULL. */
static const char *non_finite_word(const char *text)
{
    static char word[64];
    const char *p = text;

    while (*p) {
        size_t n = strcspn(p, " ,\n$[]()");
        if (n > 0 && n < sizeof(word)) {
            memcpy(word, p, n);
            word[n] = '\0';
            const char *w = word + (word[0] == '+' || word[0] == '-');
            if (strcasecmp(w, "inf") == 0 || strcasecmp(w, "nan") == 0)
                return word;
        }
        p += n + (p[n] != '\0');
    }
    return NULL;
}

/* Numbers no router writes, yet valid JSON: a token count of 10^15, 2^64
 * or 1e30 (converting those to an integer was undefined), an amount whose
 * sum is infinite (it printed $inf, and null in JSON), a negative one (it
 * fell back to the estimate). Each such line is skipped and counted as
 * bad; so is one taking the total of tokens past 10^15 - 1. The bounds
 * themselves are taken: the totals are exact, every output has finite
 * numbers. */
Test(report, numbers_out_of_range_make_a_bad_line, .timeout = 20)
{
    static const char *const lines[] = {
        "{\"tenant\":\"big\",\"arm\":\"a\",\"cost_usd\":9223372036854.775,"
        "\"billed_prompt_tokens\":999999999999998,\"billed_completion_tokens\":1}",
        "{\"tenant\":\"ok\",\"arm\":\"a\",\"cost_usd\":0.5,"
        "\"billed_prompt_tokens\":1,\"billed_completion_tokens\":2}",
        "{\"tenant\":\"ok\",\"arm\":\"b\",\"cost_usd\":9223372036854.775}",
        "{\"tenant\":\"ok\",\"arm\":\"b\",\"cost_usd\":0}",
        /* the total of prompt tokens is 10^15 - 1 now */
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"billed_prompt_tokens\":1}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"prompt_tokens\":1e30,\"completion_tokens\":5}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"billed_completion_tokens\":18446744073709551616}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"billed_completion_tokens\":1000000000000000}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"completion_tokens\":null,\"completion_tokens_est\":-3}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"cost_usd\":1e308}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"cost_usd\":1e308}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"cost_usd\":1e400}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"cost_usd\":-0.5,\"cost_usd_est\":0.25}",
        "{\"tenant\":\"bad\",\"arm\":\"b\",\"cost_usd\":0,\"saved_usd\":-1}",
    };
    const size_t n = sizeof(lines) / sizeof(lines[0]), bad = n - 4;
    const double cost = 9223372036854.775 + 0.5 + 9223372036854.775;
    struct buf out = {0};
    static char f[32][128];

    write_log(lines, n);
    run_binary("json", &out);
    cJSON *root = cJSON_Parse(out.data);
    cr_assert_not_null(root, "output is not JSON: %s", out.data);
    cr_assert(json_all_finite(root), "%s", out.data);
    cr_assert_eq(field(root, "lines"), n);
    cr_assert_eq(field(root, "bad_lines"), bad, "%s", out.data);
    const cJSON *tot = cJSON_GetObjectItem(root, "total");
    cr_assert_eq(field(tot, "requests"), 4);
    cr_assert_eq(field(tot, "prompt_tokens"), 999999999999999.0);
    cr_assert_eq(field(tot, "completion_tokens"), 3);
    cr_assert_eq(field(tot, "cost_usd"), cost, "%s", out.data);
    cr_assert_eq(field(group(root, "tenant", "ok"), "requests"), 3);
    const cJSON *g;
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(root, "groups"))
        cr_assert_str_neq(cJSON_GetObjectItem(g, "value")->valuestring, "bad");
    const cJSON *d = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "arm_diffs"), 0);
    cr_assert_not_null(d);
    cr_assert_lt(field(d, "ci95_low_usd"), field(d, "ci95_high_usd"), "%s", out.data);
    cJSON_Delete(root);

    run_binary("table", &out);
    cr_assert_null(non_finite_word(out.data), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "bad lines skipped: 10\n"), "%s", out.data);
    cr_assert_not_null(strstr(out.data, " 999999999999999 "), "%s", out.data);

    run_binary("csv", &out);
    cr_assert_null(non_finite_word(out.data), "%s", out.data);
    *strchr(strchr(out.data, '\n') + 1, '\n') = '\0'; /* the total row */
    cr_assert_gt(csv_split(strchr(out.data, '\n') + 1, f), 10);
    cr_assert_str_eq(f[0], "total");
    cr_assert_str_eq(f[5], "999999999999999", "%s", out.data);
    cr_assert_eq(strtod(f[7], NULL), cost, "%s", out.data);
    buf_free(&out);
}

/* Did the report's JSON `out` write `key` with the number text `value`
 * (as written: a parser would make a double of it)? */
static int json_wrote(const char *out, const char *key, const char *value)
{
    char pair[128];
    const char *p;

    snprintf(pair, sizeof(pair), "\"%s\":\t%s", key, value);
    for (p = strstr(out, pair); p != NULL; p = strstr(p + 1, pair))
        if (p[strlen(pair)] == ',' || p[strlen(pair)] == '\n')
            return 1;
    return 0;
}

/* Amounts are summed exactly, to the pico-dollar the cost log writes, and
 * printed so in CSV and JSON: 999.999999999999 + 0.000000000002 is
 * 1000.000000000001, which in doubles was 1000.0000000000009 (JSON) or
 * 1000 (CSV, 15 digits); 0.1 + 0.2 is 0.3, not 0.30000000000000004. The
 * cost per 1K requests is rounded to the pico-dollar. */
Test(report, amounts_add_up_exactly, .timeout = 20)
{
    static const char *const lines[] = {
        "{\"tenant\":\"a\",\"cost_usd\":999.999999999999,\"saved_usd\":0.1}",
        "{\"tenant\":\"a\",\"cost_usd\":0.000000000002,\"saved_usd\":0.2}",
        "{\"tenant\":\"b\",\"cost_usd\":0.1}",
        "{\"tenant\":\"b\",\"cost_usd\":0.2}",
        "{\"tenant\":\"b\",\"cost_usd\":0.000002}",
    };
    static const char *const wrote[][2] = {
        {"cost_usd", "1000.000000000001"},          /* a */
        {"saved_usd", "0.3"},                       /* a and the total */
        {"usd_per_1k_requests", "500000.0000000005"}, /* a */
        {"cost_usd", "0.300002"},                   /* b */
        {"usd_per_1k_requests", "100.000666666667"}, /* b: 100.0006666... */
        {"cost_usd", "1000.300002000001"},          /* the total */
    };
    struct buf out = {0};
    static char f[32][128];

    write_log(lines, sizeof(lines) / sizeof(lines[0]));
    run_binary("json", &out);
    cJSON *root = cJSON_Parse(out.data);
    cr_assert_not_null(root, "output is not JSON: %s", out.data);
    cJSON_Delete(root);
    for (size_t i = 0; i < sizeof(wrote) / sizeof(wrote[0]); i++)
        cr_assert(json_wrote(out.data, wrote[i][0], wrote[i][1]), "%s %s: %s", wrote[i][0],
                  wrote[i][1], out.data);

    run_binary("csv", &out);
    *strchr(strchr(out.data, '\n') + 1, '\n') = '\0'; /* the total row */
    cr_assert_gt(csv_split(strchr(out.data, '\n') + 1, f), 10);
    cr_assert_str_eq(f[0], "total");
    cr_assert_str_eq(f[7], "1000.300002000001", "%s", out.data);
    cr_assert_str_eq(f[10], "0.3", "%s", out.data);

    run_binary("table", &out);
    cr_assert_not_null(strstr(out.data, "$1000.300002, $200060.000400 per 1K requests"), "%s",
                       out.data);
    cr_assert_not_null(strstr(out.data, " 100.000667 "), "b, rounded: %s", out.data);
    buf_free(&out);
}

/* The cost is cost_usd alone. The router writes it wherever it writes an
 * estimate (0 when nothing was settled); a line with the estimate and no
 * cost (null, or hand-made) spent nothing, where the report counted the
 * estimate as spent. */
Test(report, an_estimate_is_not_spend, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"tenant\":\"a\",\"cost_usd\":null,\"cost_usd_est\":0.5}",
        "{\"tenant\":\"a\",\"cost_usd_est\":0.25}",
        "{\"tenant\":\"a\",\"cost_usd\":0.125,\"cost_usd_est\":0.5}",
    };
    char *text;
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "tenant", &text);

    cr_assert_eq(field(group(root, "tenant", "a"), "requests"), 3);
    cr_assert_eq(field(group(root, "tenant", "a"), "cost_usd"), 0.125, "%s", text);
    cJSON_Delete(root);
    free(text);
}

/* The router counts whole tokens: a count with a fraction is no router's,
 * and the line is a bad one, as one out of range is; it was cut to the
 * whole tokens below, a number the log never said. */
Test(report, a_fraction_of_a_token_makes_a_bad_line, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"tenant\":\"a\",\"billed_prompt_tokens\":3,\"billed_completion_tokens\":4}",
        "{\"tenant\":\"a\",\"billed_prompt_tokens\":2.5,\"billed_completion_tokens\":1}",
        "{\"tenant\":\"a\",\"prompt_tokens\":1,\"completion_tokens\":null,"
        "\"completion_tokens_est\":0.5}",
        "{\"tenant\":\"a\",\"prompt_tokens\":1e3,\"completion_tokens\":2.0}",
    };
    char *text;
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "tenant", &text);

    cr_assert_eq(field(root, "bad_lines"), 2, "%s", text);
    const cJSON *tot = cJSON_GetObjectItem(root, "total");
    cr_assert_eq(field(tot, "requests"), 2);
    cr_assert_eq(field(tot, "prompt_tokens"), 1003);
    cr_assert_eq(field(tot, "completion_tokens"), 6);
    cJSON_Delete(root);
    free(text);
}

/* Amounts are bounded in total as tokens are: 108 lines of the largest
 * amount a line may have ($9,223,372,036,854.775807) come to under
 * $10^15, the 109th would take the total past it and is a bad line,
 * and so are those after it; a smaller one still fits. Costs and savings
 * alike. */
Test(report, amounts_past_a_total_of_10e15_usd_make_bad_lines, .timeout = 20)
{
    static const char *lines[223];
    const double most = 108 * 9223372036854.775;

    for (size_t i = 0; i < 111; i++) {
        lines[i] = "{\"tenant\":\"a\",\"cost_usd\":9223372036854.775}";
        lines[111 + i] = "{\"tenant\":\"a\",\"cost_usd\":0,\"saved_usd\":9223372036854.775}";
    }
    lines[222] = "{\"tenant\":\"a\",\"cost_usd\":0.5,\"saved_usd\":0.5}";
    char *text;
    cJSON *root = json_report_of(lines, 223, "tenant", &text);
    const cJSON *tot = cJSON_GetObjectItem(root, "total");

    cr_assert_eq(field(root, "bad_lines"), 6, "%s", text);
    cr_assert_eq(field(tot, "requests"), 217);
    cr_assert_float_eq(field(tot, "cost_usd"), most + 0.5, most * 1e-15);
    cr_assert_float_eq(field(tot, "saved_usd"), most + 0.5, most * 1e-15);
    cJSON_Delete(root);
    free(text);
}

Test(report, usage_errors, .timeout = 10)
{
    struct expect e;
    char *missing[] = {"report", "/nonexistent/cost.log", NULL};

    generate(5, &e);
    cr_assert_eq(run("--format", "xml", "--by", "tenant"), 2);
    cr_assert_eq(run("--format", "csv", "--by", "tenant,planet"), 2);
    cr_assert_eq(cli_report_main(2, missing), 1);
    cr_assert_eq(run("--format", "csv", "--by", "tag.team"), 0, "runs again after errors");
}

/* A whole-dollar amount is written without a point ("1", not "1."), and
 * a dimension's values come dearest first. */
Test(report, whole_dollars_and_the_dearest_first, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"tenant\":\"c\",\"cost_usd\":1}",
        "{\"tenant\":\"d\",\"cost_usd\":2.5}",
        "{\"tenant\":\"e\",\"cost_usd\":0.25}",
    };
    struct buf out = {0};
    const char *c, *d, *e;

    write_log(lines, sizeof(lines) / sizeof(lines[0]));
    run_binary("csv", &out);
    c = strstr(out.data, "\ngroup,tenant,c,1,0,0,0,1,1000,");
    d = strstr(out.data, "\ngroup,tenant,d,1,0,0,0,2.5,2500,");
    e = strstr(out.data, "\ngroup,tenant,e,1,0,0,0,0.25,250,");
    cr_assert(c && d && e, "%s", out.data);
    cr_assert(d < c && c < e, "not dearest first: %s", out.data);
    run_binary("json", &out);
    cr_assert(json_wrote(out.data, "cost_usd", "1"), "%s", out.data);
    buf_free(&out);
}

/* A record of `usd` for `tenant` at `ts_ms` (-1: the writer's null), in
 * the writer's own format. */
static void emit_at(FILE *f, int64_t ts_ms, const char *tenant, double usd)
{
    struct metrics_cost_record r = {
        .ts_ms = ts_ms, .request_id = "r", .tenant = tenant, .route = "chat", .backend = "b",
        .reason = "cheapest", .prompt_tokens_est = -1, .prompt_tokens = -1,
        .completion_tokens_est = -1, .completion_tokens = -1, .billed_prompt_tokens = -1,
        .billed_completion_tokens = -1, .cost_usd_est = NAN, .cost_usd = usd, .saved_usd = NAN,
        .ttft_ms = NAN, .latency_ms = NAN, .status = 200,
    };

    emit(f, &r);
}

/* `report --since --until` on the log, JSON by tenant; the exit status. */
static int run_period(const char *since, const char *until)
{
    char *argv[14] = {"report", "--format", "json", "--by", "tenant", "-o", outpath};
    int argc = 7;

    if (since)
        argv[argc++] = "--since", argv[argc++] = (char *)since;
    if (until)
        argv[argc++] = "--until", argv[argc++] = (char *)until;
    argv[argc++] = logpath;
    argv[argc] = NULL;
    return cli_report_main(argc, argv);
}

/* A month's chargeback from a log that runs past it: --since is in the
 * period, --until is not, to the millisecond of the records' `ts`; a
 * record without one is left out and counted, not taken as bad. */
Test(report, since_and_until_keep_the_records_of_a_period, .timeout = 10)
{
    const int64_t dec1 = 1796083200000LL; /* 2026-12-01T00:00:00.000Z */
    const int64_t jan1 = 1798761600000LL; /* 2027-01-01T00:00:00.000Z */
    FILE *f = fopen(logpath, "w");
    char *text;
    cJSON *root;

    cr_assert_not_null(f);
    emit_at(f, dec1 - 1, "acme", 1.0 / 1024);  /* 2026-11-30T23:59:59.999Z: out */
    emit_at(f, dec1, "acme", 2.0 / 1024);      /* in */
    emit_at(f, jan1 - 1, "globex", 4.0 / 1024); /* in */
    emit_at(f, jan1, "globex", 8.0 / 1024);    /* out */
    emit_at(f, -1, "acme", 16.0 / 1024);       /* "ts":null: untimed */
    fputs("{\"tenant\":\"acme\",\"cost_usd\":1}\n", f); /* no ts: untimed */
    fputs("not json\n", f);                          /* bad */
    fclose(f);

    cr_assert_eq(run_period("2026-12-01", "2027-01-01T00:00:00Z"), 0);
    root = cJSON_Parse(text = slurp(outpath));
    cr_assert_not_null(root, "%s", text);
    cr_expect_eq(cJSON_GetObjectItem(root, "lines")->valuedouble, 7);
    cr_expect_eq(cJSON_GetObjectItem(root, "bad_lines")->valuedouble, 1);
    cr_expect_eq(cJSON_GetObjectItem(root, "outside_lines")->valuedouble, 2);
    cr_expect_eq(cJSON_GetObjectItem(root, "untimed_lines")->valuedouble, 2);
    cr_expect_str_eq(cJSON_GetObjectItem(root, "since")->valuestring, "2026-12-01T00:00:00.000Z");
    cr_expect_str_eq(cJSON_GetObjectItem(root, "until")->valuestring, "2027-01-01T00:00:00.000Z");
    cr_expect_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "total"), "requests")->valuedouble, 2);
    cr_expect_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "total"), "cost_usd")->valuedouble,
                 6.0 / 1024);
    cr_expect_eq(cJSON_GetObjectItem(group(root, "tenant", "acme"), "cost_usd")->valuedouble,
                 2.0 / 1024);
    cr_expect_eq(cJSON_GetObjectItem(group(root, "tenant", "globex"), "cost_usd")->valuedouble,
                 4.0 / 1024);
    cJSON_Delete(root);
    free(text);

    /* a bound alone, to the millisecond: the last one of November onward */
    cr_assert_eq(run_period("2026-11-30T23:59:59.999", NULL), 0);
    root = cJSON_Parse(text = slurp(outpath));
    cr_expect_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "total"), "requests")->valuedouble, 4);
    cr_expect(cJSON_IsNull(cJSON_GetObjectItem(root, "until")));
    cJSON_Delete(root);
    free(text);

    /* without a period every line counts, and none is left out */
    cr_assert_eq(run_period(NULL, NULL), 0);
    root = cJSON_Parse(text = slurp(outpath));
    cr_expect_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "total"), "requests")->valuedouble, 6);
    cr_expect_eq(cJSON_GetObjectItem(root, "untimed_lines")->valuedouble, 0);
    cJSON_Delete(root);
    free(text);
}

/* A time that is not one, and an empty period, are usage errors. */
Test(report, since_and_until_refuse_what_is_not_a_utc_time, .timeout = 10)
{
    static const char *const bad[] = {"2026-02-30", "2026-12-01T24:00", "2026-12-1",
                                      "2026-12-01T10:00+02:00", "2026-12-01T10", "yesterday",
                                      "2026-12-01T10:00:00.", ""};

    write_log((const char *const[]){"{\"ts\":\"2026-12-01T00:00:00.000Z\",\"cost_usd\":1}"}, 1);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_expect_eq(run_period(bad[i], NULL), 2, "--since \"%s\"", bad[i]);
    cr_expect_eq(run_period("2026-12-02", "2026-12-01"), 2, "until before since");
    cr_expect_eq(run_period("2026-12-01", "2026-12-01"), 2, "an empty period");
    cr_expect_eq(run_period("2024-02-29T23:59:59.5Z", "2026-12-01T00:00:00.001"), 0);
}

/* A group value a spreadsheet would run as a formula (a tag's value is
 * the client's: x-costrouter-tags: team==HYPERLINK(...)) starts with a '
 * in CSV, which spreadsheets show as text; the lone "-" (no value), plain
 * values and the JSON output are as logged. */
Test(report, csv_values_a_spreadsheet_would_run_start_with_a_quote, .timeout = 10)
{
    static const char *const lines[] = {
        "{\"tenant\":\"a\",\"tags\":{\"team\":\"=HYPERLINK(\\\"http://x\\\",\\\"y\\\")\"},"
        "\"cost_usd\":0.5}",
        "{\"tenant\":\"a\",\"tags\":{\"team\":\"@SUM(A1)\"},\"cost_usd\":0.25}",
        "{\"tenant\":\"a\",\"tags\":{\"team\":\"-2+3\"},\"cost_usd\":0.125}",
        "{\"tenant\":\"a\",\"tags\":{\"team\":\"ads\"},\"cost_usd\":0.0625}",
        "{\"tenant\":\"a\",\"tags\":{\"team\":\"-\"},\"cost_usd\":0.03125}",
    };
    char *text;

    write_log(lines, sizeof(lines) / sizeof(lines[0]));
    cr_assert_eq(run("--format", "csv", "--by", "tag.team"), 0);
    text = slurp(outpath);
    cr_assert_not_null(strstr(text, ",\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\","), "%s", text);
    cr_assert_not_null(strstr(text, ",'@SUM(A1),"), "%s", text);
    cr_assert_not_null(strstr(text, ",'-2+3,"), "%s", text);
    cr_assert_not_null(strstr(text, ",tag.team,ads,"), "%s", text);
    cr_assert_not_null(strstr(text, ",tag.team,-,"), "%s", text);
    free(text);
    cJSON *root = json_report_of(lines, sizeof(lines) / sizeof(lines[0]), "tag.team", &text);
    cr_assert_eq(field(group(root, "tag.team", "@SUM(A1)"), "requests"), 1, "%s", text);
    cJSON_Delete(root);
    free(text);
}
