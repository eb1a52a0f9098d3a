/*
 * tests/metrics/test_metrics.c: metrics/metrics.c registry and exposition
 * format. The rendered text is parsed back here with a strict parser of
 * the Prometheus text format (0.0.4), so escaping, cumulative buckets and
 * values are checked as a scraper would read them.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "metrics/metrics.h"

struct sample {
    char name[128];
    int nlabels;
    char keys[6][32];
    char vals[6][256];
    double value;
};

struct parsed {
    struct sample *s;
    size_t n;
    char types[64][160]; /* "name type" from TYPE lines */
    size_t ntypes;
};

/* Unescape a label value starting after the opening quote; returns the end. */
static const char *parse_value(const char *p, char *out, size_t cap)
{
    size_t n = 0;

    for (; *p != '"'; p++) {
        cr_assert(*p != '\0' && *p != '\n', "unterminated label value");
        char c = *p;
        if (c == '\\') {
            p++;
            cr_assert(*p == '\\' || *p == '"' || *p == 'n', "bad escape \\%c", *p);
            c = *p == 'n' ? '\n' : *p;
        }
        cr_assert_lt(n + 1, cap);
        out[n++] = c;
    }
    out[n] = '\0';
    return p + 1;
}

static void parse(const struct buf *b, struct parsed *out)
{
    char *text = strndup(b->data, b->len), *save = NULL;
    const char *last_help = NULL;

    memset(out, 0, sizeof(*out));
    out->s = calloc(20000, sizeof(*out->s));
    cr_assert(b->len > 0 && b->data[b->len - 1] == '\n', "text must end with a newline");
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# HELP ", 7) == 0) {
            last_help = line;
            continue;
        }
        if (strncmp(line, "# TYPE ", 7) == 0) {
            cr_assert_not_null(last_help, "TYPE without HELP");
            snprintf(out->types[out->ntypes++], 160, "%s", line + 7);
            continue;
        }
        cr_assert_neq(line[0], '#', "unexpected comment %s", line);
        struct sample *s = &out->s[out->n++];
        const char *p = line;
        size_t k = 0;
        while (*p && *p != '{' && *p != ' ')
            s->name[k++] = *p++;
        if (*p == '{') {
            p++;
            while (*p != '}') {
                k = 0;
                while (*p != '=')
                    s->keys[s->nlabels][k++] = *p++;
                cr_assert_eq(p[1], '"');
                p = parse_value(p + 2, s->vals[s->nlabels], 256);
                s->nlabels++;
                if (*p == ',')
                    p++;
                else
                    cr_assert_eq(*p, '}', "junk after label value in %s", line);
            }
            p++;
        }
        cr_assert_eq(*p, ' ', "no space before value in %s", line);
        char *end;
        s->value = strcmp(p + 1, "+Inf") == 0 ? INFINITY : strtod(p + 1, &end);
        if (strcmp(p + 1, "+Inf") != 0)
            cr_assert_eq(*end, '\0', "junk after value in %s", line);
    }
    free(text);
}

/* Value of the sample with this name and label pairs (k1, v1, ..., NULL). */
static const struct sample *find(const struct parsed *p, const char *name, ...)
{
    for (size_t i = 0; i < p->n; i++) {
        const struct sample *s = &p->s[i];
        va_list ap;
        int ok = strcmp(s->name, name) == 0, nargs = 0;

        va_start(ap, name);
        for (const char *k; ok && (k = va_arg(ap, const char *)) != NULL; nargs++) {
            const char *v = va_arg(ap, const char *);
            int hit = 0;
            for (int j = 0; j < s->nlabels; j++)
                hit |= strcmp(s->keys[j], k) == 0 && strcmp(s->vals[j], v) == 0;
            ok &= hit;
        }
        va_end(ap);
        if (ok && nargs == s->nlabels)
            return s;
    }
    return NULL;
}

Test(metrics, counters_and_gauges_read_back, .timeout = 5)
{
    struct metrics *m = metrics_create(0);
    struct buf b = {0};
    struct parsed p;
    const char *req[] = {"acme", "gpt-4o", "gpt-4o", "200"};
    const char *req2[] = {"acme", "gpt-4o", "gpt-4o", "502"};
    const char *cost[] = {"acme", "gpt-4o", "gpt-4o"};
    const char *tenant_day[] = {"acme", "day"};

    cr_assert_not_null(m);
    for (int i = 0; i < 7; i++)
        cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, req, 1), 0);
    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, req2, 1), 0);
    cr_assert_eq(metrics_add(m, METRICS_COST_USD_TOTAL, cost, 0.1), 0);
    cr_assert_eq(metrics_add(m, METRICS_COST_USD_TOTAL, cost, 0.2), 0);
    cr_assert_eq(metrics_set(m, METRICS_BUDGET_REMAINING_USD, tenant_day, 40), 0);
    cr_assert_eq(metrics_set(m, METRICS_BUDGET_REMAINING_USD, tenant_day, 12.5), 0);
    cr_assert_eq(metrics_add(m, METRICS_INFLIGHT_REQUESTS, NULL, 3), 0);
    cr_assert_eq(metrics_add(m, METRICS_INFLIGHT_REQUESTS, NULL, -1), 0);
    /* wrong use is refused and changes nothing */
    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, req, -1), -EINVAL);
    cr_assert_eq(metrics_set(m, METRICS_REQUESTS_TOTAL, req, 5), -EINVAL);
    cr_assert_eq(metrics_observe(m, METRICS_REQUESTS_TOTAL, req, 5), -EINVAL);
    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, req, NAN), -EINVAL);

    cr_assert_eq(metrics_render(m, &b), 0);
    parse(&b, &p);
    cr_assert_eq(find(&p, "costrouter_requests_total", "tenant", "acme", "backend", "gpt-4o", "route",
                      "gpt-4o", "status", "200", NULL)->value, 7);
    cr_assert_eq(find(&p, "costrouter_requests_total", "tenant", "acme", "backend", "gpt-4o", "route",
                      "gpt-4o", "status", "502", NULL)->value, 1);
    cr_assert_eq(find(&p, "costrouter_cost_usd_total", "tenant", "acme", "backend", "gpt-4o", "route",
                      "gpt-4o", NULL)->value, 0.1 + 0.2, "sum must survive the round trip exactly");
    cr_assert_eq(find(&p, "costrouter_budget_remaining_usd", "tenant", "acme", "period", "day", NULL)->value,
                 12.5);
    cr_assert_eq(find(&p, "costrouter_inflight_requests", NULL)->value, 2);
    /* label-less metrics exist from the start */
    cr_assert_eq(find(&p, "costrouter_client_connections", NULL)->value, 0);
    cr_assert_eq(metrics_get(m, METRICS_REQUESTS_TOTAL, req), 7);
    cr_assert(isnan(metrics_get(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){"nobody"})));
    /* every metric has HELP and TYPE, also without series */
    cr_assert_eq(p.ntypes, METRICS_NMETRICS);
    cr_assert_str_eq(p.types[0], "costrouter_requests_total counter");
    free(p.s);
    buf_free(&b);
    metrics_free(m);
}

Test(metrics, label_values_are_escaped, .timeout = 5)
{
    struct metrics *m = metrics_create(0);
    const char *nasty = "a\"b\\c\nd}e,f=g";
    const char *labels[] = {nasty, "ok"};
    struct buf b = {0};
    struct parsed p;

    cr_assert_eq(metrics_set(m, METRICS_BUDGET_SPENT_USD, labels, 1.5), 0);
    cr_assert_eq(metrics_render(m, &b), 0);
    const char *want = "tenant=\"a\\\"b\\\\c\\nd}e,f=g\"";
    cr_assert_not_null(memmem(b.data, b.len, want, strlen(want)), "raw escaping");
    parse(&b, &p);
    const struct sample *s = find(&p, "costrouter_budget_spent_usd", "tenant", nasty, "period", "ok", NULL);
    cr_assert_not_null(s, "escaped value must parse back to the original");
    cr_assert_eq(s->value, 1.5);
    free(p.s);
    buf_free(&b);
    metrics_free(m);
}

Test(metrics, histogram_buckets_are_cumulative, .timeout = 5)
{
    static const double bounds[] = {METRICS_BUCKETS_SECONDS};
    const double obs[] = {0.001, 0.005, 0.007, 0.3, 0.3, 2, 1000};
    const char *be[] = {"gpu-a"};
    struct metrics *m = metrics_create(0);
    struct buf b = {0};
    struct parsed p;
    double prev = 0, sum = 0;
    char le[32];

    for (size_t i = 0; i < sizeof(obs) / sizeof(obs[0]); i++) {
        cr_assert_eq(metrics_observe(m, METRICS_TTFT_SECONDS, be, obs[i]), 0);
        sum += obs[i];
    }
    cr_assert_eq(metrics_render(m, &b), 0);
    parse(&b, &p);
    for (size_t i = 0; i < sizeof(bounds) / sizeof(bounds[0]); i++) {
        size_t want = 0;
        for (size_t j = 0; j < sizeof(obs) / sizeof(obs[0]); j++)
            want += obs[j] <= bounds[i];
        snprintf(le, sizeof(le), "%g", bounds[i]);
        const struct sample *s = find(&p, "costrouter_ttft_seconds_bucket", "backend", "gpu-a", "le", le, NULL);
        cr_assert_not_null(s, "bucket le=%s", le);
        cr_assert_eq(s->value, (double)want, "le=%s: %g != %zu", le, s->value, want);
        cr_assert_geq(s->value, prev);
        prev = s->value;
    }
    cr_assert_eq(find(&p, "costrouter_ttft_seconds_bucket", "backend", "gpu-a", "le", "+Inf", NULL)->value, 7);
    cr_assert_eq(find(&p, "costrouter_ttft_seconds_count", "backend", "gpu-a", NULL)->value, 7);
    cr_assert_float_eq(find(&p, "costrouter_ttft_seconds_sum", "backend", "gpu-a", NULL)->value, sum, 1e-9);
    cr_assert_eq(metrics_add(m, METRICS_TTFT_SECONDS, be, 1), -EINVAL);
    free(p.s);
    buf_free(&b);
    metrics_free(m);
}

/* Loops count mismatches and assert once, so a failure reports a total. */
Test(metrics, many_series_each_found_again, .timeout = 10)
{
    enum { TENANTS = 5000, BACKENDS = 3 };
    struct metrics *m = metrics_create(0);
    char t[32];
    const char *be[] = {"a", "b", "c"};
    int bad = 0;

    for (int round = 0; round < 3; round++)
        for (int i = 0; i < TENANTS; i++)
            for (int j = 0; j < BACKENDS; j++) {
                snprintf(t, sizeof(t), "tenant-%d", i);
                const char *v[] = {t, be[j], "m", "200"};
                bad += metrics_add(m, METRICS_REQUESTS_TOTAL, v, i + j) != 0;
            }
    cr_assert_eq(bad, 0, "%d updates failed", bad);
    size_t fixed = metrics_series_count(m) - TENANTS * BACKENDS;
    for (int i = 0; i < TENANTS; i++)
        for (int j = 0; j < BACKENDS; j++) {
            snprintf(t, sizeof(t), "tenant-%d", i);
            const char *v[] = {t, be[j], "m", "200"};
            bad += metrics_get(m, METRICS_REQUESTS_TOTAL, v) != 3.0 * (i + j);
        }
    cr_assert_eq(bad, 0, "%d series read back wrong", bad);
    /* same values under another metric are another series */
    const char *v[] = {"tenant-1", "a", "m"};
    cr_assert(isnan(metrics_get(m, METRICS_COST_USD_TOTAL, v)));
    cr_assert_eq(metrics_series_count(m), TENANTS * BACKENDS + fixed);
    metrics_free(m);
}

/* A series is its values one by one, not their concatenation: where one
 * value ends tells series apart. Long values are found again as well. */
Test(metrics, label_boundaries_and_long_values_make_their_own_series, .timeout = 5)
{
    struct metrics *m = metrics_create(0);
    size_t start = metrics_series_count(m);
    char long_a[400], long_b[400];
    const char *ab_c[] = {"ab", "c", "m", "200"}, *a_bc[] = {"a", "bc", "m", "200"};
    const char *longs[] = {long_a, long_b, "m", "200"};

    memset(long_a, 'a', sizeof(long_a) - 1);
    long_a[sizeof(long_a) - 1] = '\0';
    memcpy(long_b, long_a, sizeof(long_a));
    long_b[sizeof(long_b) - 2] = 'b';
    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, ab_c, 1), 0);
    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, a_bc, 2), 0);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, longs, 5), 0);
    cr_assert_eq(metrics_get(m, METRICS_REQUESTS_TOTAL, ab_c), 1);
    cr_assert_eq(metrics_get(m, METRICS_REQUESTS_TOTAL, a_bc), 2);
    cr_assert_eq(metrics_get(m, METRICS_REQUESTS_TOTAL, longs), 15);
    cr_assert_eq(metrics_series_count(m), start + 3);
    metrics_free(m);
}

/* A cleared gauge has no series left, not in the text either; every
 * other series (thousands, so the table had grown) is still found and
 * updated in place, and the gauge takes new series again. */
Test(metrics, a_cleared_gauge_leaves_the_other_series_whole, .timeout = 5)
{
    enum { TENANTS = 2000 };
    static const char gone[] = "spent_usd{tenant=\"tenant-";
    struct metrics *m = metrics_create(0);
    size_t start = metrics_series_count(m);
    struct buf out = {0};
    char t[32];
    int bad = 0;

    for (int i = 0; i < TENANTS; i++) {
        snprintf(t, sizeof(t), "tenant-%d", i);
        bad += metrics_set(m, METRICS_BUDGET_SPENT_USD, (const char *[]){t, "day"}, i) != 0;
        bad += metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){t}, i) != 0;
    }
    cr_assert_eq(bad, 0);
    cr_assert_eq(metrics_clear(m, METRICS_BUDGET_SPENT_USD), 0);
    cr_assert_eq(metrics_series_count(m), start + TENANTS);
    for (int i = 0; i < TENANTS; i++) {
        snprintf(t, sizeof(t), "tenant-%d", i);
        bad += !isnan(metrics_get(m, METRICS_BUDGET_SPENT_USD, (const char *[]){t, "day"}));
        bad += metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){t}, 1) != 0;
        bad += metrics_get(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){t}) != i + 1;
    }
    cr_assert_eq(bad, 0, "%d series wrong after the clear", bad);
    cr_assert_eq(metrics_series_count(m), start + TENANTS, "a series was made twice");
    cr_assert_eq(metrics_set(m, METRICS_BUDGET_SPENT_USD, (const char *[]){"new", "day"}, 2), 0);
    cr_assert_eq(metrics_get(m, METRICS_BUDGET_SPENT_USD, (const char *[]){"new", "day"}), 2);
    cr_assert_eq(metrics_render(m, &out), 0);
    cr_assert_null(memmem(out.data, out.len, gone, sizeof(gone) - 1), "%.*s", 300, out.data);
    /* Counters only go up: they are never cleared. */
    cr_assert_eq(metrics_clear(m, METRICS_CACHE_HITS_TOTAL), -EINVAL);
    cr_assert_eq(metrics_clear(m, METRICS_INFLIGHT_REQUESTS), -EINVAL);
    buf_free(&out);
    metrics_free(m);
}

/* Series a fresh registry has: those of the label-less metrics. */
static size_t fixed_series(void)
{
    struct metrics *m = metrics_create(0);
    size_t n = metrics_series_count(m);

    metrics_free(m);
    return n;
}

Test(metrics, series_cap_is_enforced, .timeout = 5)
{
    size_t start = fixed_series();
    struct metrics *m = metrics_create(start + 8);
    char t[16];
    int rc = 0, made = 0;

    for (int i = 0; i < 20 && rc == 0; i++) {
        snprintf(t, sizeof(t), "t%d", i);
        rc = metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){t}, 1);
        made += rc == 0;
    }
    cr_assert_eq(rc, -ENOSPC);
    cr_assert_eq(made, 8);
    /* existing series still update */
    cr_assert_eq(metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){"t0"}, 1), 0);
    cr_assert_eq(metrics_get(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){"t0"}), 2);
    metrics_free(m);
}

/* Past the cap, each update that would make a series (of a counter, a
 * gauge or a histogram) is counted, in the text a scraper reads, and
 * logged once, not once per update: a dashboard missing series says so.
 * Updates of series that exist count nothing. */
Test(metrics, series_past_the_cap_are_counted_and_logged_once, .timeout = 5)
{
    struct metrics *m = metrics_create(fixed_series() + 8);
    char t[16], errpath[] = "/tmp/metrics-test-XXXXXX";
    int saved = dup(2), fd = mkstemp(errpath), lost = 0;
    struct buf b = {0};
    struct parsed p;

    cr_assert_geq(fd, 0);
    cr_assert_geq(dup2(fd, 2), 0);
    for (int i = 0; i < 20; i++) {
        snprintf(t, sizeof(t), "t%d", i);
        lost += metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){t}, 1) == -ENOSPC;
        cr_assert_eq(metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){"t0"}, 1), 0);
    }
    lost += metrics_set(m, METRICS_BUDGET_SPENT_USD, (const char *[]){"t0", "day"}, 1) == -ENOSPC;
    lost += metrics_observe(m, METRICS_TTFT_SECONDS, (const char *[]){"gpu"}, 1) == -ENOSPC;
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    cr_assert_eq(lost, 12 + 2);
    cr_assert_eq(metrics_get(m, METRICS_SERIES_DROPPED_TOTAL, NULL), 14);
    cr_assert_eq(metrics_render(m, &b), 0);
    parse(&b, &p);
    const struct sample *s = find(&p, "costrouter_metrics_series_dropped_total", NULL);
    cr_assert_not_null(s, "%.*s", (int)b.len, b.data);
    cr_assert_eq(s->value, 14);
    cr_assert_null(find(&p, "costrouter_cache_hits_total", "tenant", "t8", NULL));
    size_t types = 0;
    for (size_t i = 0; i < p.ntypes; i++)
        types += strcmp(p.types[i], "costrouter_metrics_series_dropped_total counter") == 0;
    cr_assert_eq(types, 1);

    char *err = NULL;
    size_t cap = 0, lines = 0;
    FILE *f = fdopen(fd, "r");
    cr_assert_not_null(f);
    rewind(f);
    cr_assert_gt(getdelim(&err, &cap, '\0', f), 0, "nothing logged");
    for (const char *nl = err; (nl = strchr(nl, '\n')) != NULL; nl++)
        lines++;
    cr_assert_eq(lines, 1, "one line for 14 updates lost, not one each:\n%s", err);
    cr_assert_not_null(strstr(err, "WARN"), "%s", err);
    cr_assert_not_null(strstr(err, "cap of"), "%s", err);
    cr_assert_not_null(strstr(err, "costrouter_cache_hits_total"), "%s", err);
    cr_assert_not_null(strstr(err, "costrouter_metrics_series_dropped_total"), "%s", err);
    free(err);
    fclose(f);
    unlink(errpath);
    free(p.s);
    buf_free(&b);
    metrics_free(m);
}

Test(metrics, dashboard_is_embedded, .timeout = 5)
{
    size_t len;
    const char *page = metrics_dashboard(&len);

    cr_assert_gt(len, 1000);
    cr_assert_eq(strncmp(page, "<!DOCTYPE html>", 15), 0);
    cr_assert_not_null(strstr(page, "/admin/tenants"));
    cr_assert_eq(page[len], '\0');
    cr_assert_not_null(strstr(page + len - 10, "</html>"));
    cr_assert_null(strstr(page, "src=\"http"), "no external script");
    cr_assert_null(strstr(page, "href=\"http"), "no external stylesheet");
    cr_assert_null(strstr(page, "url(http"), "no external font or image");
    cr_assert_null(strstr(page, "@import"), "no external stylesheet");
}
