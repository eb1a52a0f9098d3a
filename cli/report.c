/*
 * cli/report.c: `costrouter report` (see report.h).
 *
 * One pass over the logs. Each line is parsed with cJSON and added to
 * (dimension, value) groups held in a small open-addressing table keyed by
 * xxh3, plus (experiment or route, arm) groups that keep a running mean and
 * variance of cost per request (Welford) for the arm comparison. Memory is
 * proportional to the number of distinct groups, not to the log size.
 *
 * Amounts are summed in integer pico-USD (the cost log's precision), so
 * that a total is the exact sum of its lines, and printed from those
 * integers: exact in CSV and JSON, to the micro-dollar in the table.
 */
#include "cli/report.h"

#include "common/utf8.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

enum format { FORMAT_TABLE, FORMAT_CSV, FORMAT_JSON };

struct stats {
    uint64_t requests;          /* lines counted */
    uint64_t errors;            /* status >= 400 */
    uint64_t prompt_tokens;     /* billed (see line_tokens) */
    uint64_t completion_tokens; /* billed (see line_tokens) */
    uint64_t cache_hits;        /* cache_hit true */
    __int128 cost_pico;         /* cost_usd, pico-USD */
    __int128 saved_pico;        /* saved_usd, pico-USD */
    uint64_t web_searches;      /* billed_web_searches */
    uint64_t file_searches;     /* billed_file_searches */
    __int128 reported_pico;     /* reported_cost_usd of the lines that have one, pico-USD */
    uint64_t reported;          /* lines that have one */
    __int128 cost_reported_pico; /* cost_usd of those lines, pico-USD */
    uint64_t answered;          /* lines answered: status below 400, not from the cache */
    __int128 answered_pico;     /* cost_usd of those lines, pico-USD */
    double mean;                /* running mean of cost per answered request, USD */
    double m2;                  /* running sum of squared deviations (answered) */
};

struct group {
    size_t dim;       /* index into report.dims */
    char *value;      /* group value (tenant id, backend, ...); for an arm, its
                       * experiment's or route's name and the arm's, see add_arm_group */
    char *shown;      /* what the outputs print for an arm (EXPERIMENT/ARM), else NULL */
    size_t arm;       /* an arm's: where its name starts in value */
    struct stats st;  /* what was added */
};

struct gmap {
    struct group *items; /* in insertion order */
    size_t n;            /* items used */
    size_t cap;          /* items allocated */
    uint32_t *slots;     /* index + 1 into items, 0 = empty */
    size_t mask;         /* slots - 1 (power of two) */
};

struct read_file {
    dev_t dev;        /* st_dev */
    ino_t ino;        /* st_ino */
    const char *name; /* as given (an argv string) */
};

struct report {
    char **dims;          /* interned dimension names ("tenant", "tag.team", route names) */
    size_t ndims;         /* entries in dims */
    char **want;          /* --by tokens */
    size_t nwant;         /* entries in want */
    struct gmap groups;   /* (dimension, value) -> stats */
    struct gmap arms;     /* (experiment/route as dim, arm) -> stats */
    struct stats total;   /* every counted line */
    uint64_t lines;       /* non-empty lines read */
    uint64_t bad;         /* lines skipped: not a JSON object, or out of range */
    char first_bad[512];  /* "FILE:LINE" of the first of them */
    struct read_file *files; /* the regular files read, to read each once */
    size_t nfiles;        /* entries in files */
    int64_t since_ms;     /* --since: lines before it are left out; -1 = none */
    int64_t until_ms;     /* --until: lines at or after it are left out; -1 = none */
    uint64_t outside;     /* lines left out by --since or --until */
    uint64_t untimed;     /* lines left out for want of a `ts` to place them */
};

/* ---- groups ------------------------------------------------------------ */

static size_t intern_dim(struct report *r, const char *name)
{
    for (size_t i = 0; i < r->ndims; i++)
        if (strcmp(r->dims[i], name) == 0)
            return i;
    char **dims = realloc(r->dims, (r->ndims + 1) * sizeof(*dims));
    if (dims == NULL || (dims[r->ndims] = strdup(name)) == NULL) {
        perror("report");
        exit(1);
    }
    r->dims = dims;
    return r->ndims++;
}

/* value NULL: the group of the lines without one */
static uint64_t gkey(size_t dim, const char *value)
{
    return value ? XXH3_64bits_withSeed(value, strlen(value), dim)
                 : XXH3_64bits_withSeed("", 0, ~(uint64_t)dim);
}

/* strcmp, NULL (none) equal to itself and first */
static int value_cmp(const char *a, const char *b)
{
    return a && b ? strcmp(a, b) : (a != NULL) - (b != NULL);
}

static void gmap_rehash(struct gmap *m, size_t size)
{
    free(m->slots);
    m->slots = calloc(size, sizeof(*m->slots));
    if (m->slots == NULL) {
        perror("report");
        exit(1);
    }
    m->mask = size - 1;
    for (size_t i = 0; i < m->n; i++) {
        size_t j = gkey(m->items[i].dim, m->items[i].value) & m->mask;
        while (m->slots[j] != 0)
            j = (j + 1) & m->mask;
        m->slots[j] = (uint32_t)i + 1;
    }
}

/* The stats of (dim, value), created zeroed when new; value NULL: the
 * group of the lines without one. Exits on ENOMEM. */
static struct stats *gmap_get(struct gmap *m, size_t dim, const char *value)
{
    size_t j;

    if (m->slots == NULL || (m->n + 1) * 2 > m->mask + 1)
        gmap_rehash(m, m->slots ? (m->mask + 1) * 2 : 64);
    for (j = gkey(dim, value) & m->mask; m->slots[j] != 0; j = (j + 1) & m->mask) {
        struct group *g = &m->items[m->slots[j] - 1];
        if (g->dim == dim && value_cmp(g->value, value) == 0)
            return &g->st;
    }
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        struct group *items = realloc(m->items, cap * sizeof(*items));
        if (items == NULL)
            goto nomem;
        m->items = items;
        m->cap = cap;
    }
    m->items[m->n] = (struct group){.dim = dim, .value = value ? strdup(value) : NULL};
    if (value != NULL && m->items[m->n].value == NULL)
        goto nomem;
    m->slots[j] = (uint32_t)++m->n;
    return &m->items[m->n - 1].st;

nomem:
    perror("report");
    exit(1);
}

/* printf into a new string. Exits on ENOMEM. */
static char *text_of(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *text_of(const char *fmt, ...)
{
    va_list ap;
    int n;
    char *text;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || (text = malloc((size_t)n + 1)) == NULL) {
        perror("report");
        exit(1);
    }
    va_start(ap, fmt);
    vsnprintf(text, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return text;
}

static struct group *group_of(struct stats *st)
{
    return (struct group *)((char *)st - offsetof(struct group, st));
}

static void gmap_free(struct gmap *m)
{
    for (size_t i = 0; i < m->n; i++) {
        free(m->items[i].value);
        free(m->items[i].shown);
    }
    free(m->items);
    free(m->slots);
}

/* ---- reading ----------------------------------------------------------- */

struct line {
    const char *tenant, *backend, *route, *arm, *experiment; /* NULL when absent */
    const char *key;          /* the name of the key it used, NULL when absent (none, or
                               * a key without a name) */
    const char *service_tier; /* the tier whose rates priced it; "default" when absent */
    const char *endpoint;     /* the path it was sent to, NULL in lines written before
                               * the router named it */
    const cJSON *tags;       /* object or NULL */
    int status;              /* HTTP status, 0 when absent */
    double cost;             /* cost_usd or 0 */
    __int128 cost_pico;      /* the same, pico-USD */
    __int128 saved_pico;     /* saved_usd or 0, pico-USD */
    uint64_t prompt, completion; /* tokens */
    int cache_hit;           /* cache_hit true */
    uint64_t web_searches;   /* billed_web_searches or 0 */
    uint64_t file_searches;  /* billed_file_searches or 0 */
    int reported;            /* it has a reported_cost_usd (not null) */
    __int128 reported_pico;  /* that, pico-USD; 0 without */
};

/* The text at `key`, or NULL when the line has none (absent, null, ""):
 * the group of lines without one, which "-" (a name a tenant, an arm or a
 * tag's value may have) is not. */
static const char *str_or_null(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) && v->valuestring[0] ? v->valuestring : NULL;
}

/*
 * Bounds of a line's numbers. A line with a number outside them was not
 * written by the router (nor by any sane tool): it is skipped and counted
 * as a bad line, like a line cut short, rather than clamped, as a clamped
 * value is a number the log never said; every figure of the report stays
 * a sum of what its lines said, and the count of bad lines says some were
 * left out. The bounds also make every conversion and sum defined:
 * - an amount (USD) is at most 2^63 - 1 micro-dollars, the most the spend
 *   store can count: a sum over any number of lines, and the variance of
 *   an arm, then stay finite doubles (JSON has no infinity);
 * - an amount whose total would pass COST_TOTAL_MAX ($10^15) is skipped
 *   too (see add_line): every amount printed, even per 1K requests of one
 *   request, then has whole dollars that fit a uint64_t;
 * - a token count is a whole number (the router counts whole tokens; one
 *   with a fraction was cut to a number the log never said) of at most
 *   10^15 - 1 (below 2^53: a double holds it, and a JSON reader's double
 *   too); a line that would take a total of tokens past it is skipped
 *   too (see add_line), so no sum wraps and every token figure is exact.
 */
#define COST_MAX ((double)INT64_MAX / 1e6)
#define PICO_PER_USD 1000000000000 /* 10^12 */
#define COST_TOTAL_MAX ((__int128)1000000000000000 * PICO_PER_USD)
#define TOKENS_MAX UINT64_C(999999999999999)

/* `usd` (in [0, COST_MAX]) in pico-USD, to the nearest (halves up): the
 * double's exact value, which for an amount written with at most 12
 * decimals (as the cost log writes them) below $8,192 (2^13, where a
 * double's step passes a pico-USD) is that amount. By integers, not usd x
 * 1e12 in doubles, which would round a second time. */
static __int128 pico_of(double usd)
{
    int e, shift;
    double m = frexp(usd, &e); /* usd = m x 2^e, m in [0.5, 1) */
    __int128 n = (__int128)ldexp(m, 53) * PICO_PER_USD;

    shift = 53 - e; /* usd x 10^12 = n / 2^shift; shift >= 9 up to COST_MAX */
    if (shift > 100) /* n < 2^93: under half a pico-USD */
        return 0;
    return (n + ((__int128)1 << (shift - 1))) >> shift;
}

/* The number at `key`, else at `fallback` (a key absent, null or not a
 * number is passed over), else 0. A number outside [0, max] (negative,
 * infinite: cJSON reads 1e400 as inf) sets *bad and gives 0. */
static double num2(const cJSON *o, const char *key, const char *fallback, double max, int *bad)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

    if (!cJSON_IsNumber(v))
        return fallback ? num2(o, fallback, NULL, max, bad) : 0;
    if (v->valuedouble >= 0 && v->valuedouble <= max)
        return v->valuedouble;
    *bad = 1;
    return 0;
}

/* A line's tokens of one kind: `billed` (billed_prompt_tokens, ...) in a
 * log that has the key, what the charge was computed from (null: nothing
 * was charged); in an older log, the upstream's `usage` count, else the
 * estimate `est`, as the report read them before. In range (num2), so the
 * conversion is defined; a count with a fraction sets *bad. */
static uint64_t line_tokens(const cJSON *o, const char *billed, const char *usage, const char *est,
                            int *bad)
{
    double n = cJSON_HasObjectItem(o, billed) ? num2(o, billed, NULL, (double)TOKENS_MAX, bad)
                                              : num2(o, usage, est, (double)TOKENS_MAX, bad);

    if (n != floor(n))
        *bad = 1;
    return (uint64_t)n;
}

/* A line's count at `key` (billed_web_searches, ...): a whole number in
 * [0, TOKENS_MAX], else *bad; 0 when absent or null (older lines). */
static uint64_t line_count(const cJSON *o, const char *key, int *bad)
{
    double n = num2(o, key, NULL, (double)TOKENS_MAX, bad);

    if (n != floor(n))
        *bad = 1;
    return (uint64_t)n;
}

/* Was the line answered by a model: not refused nor failed (status 400
 * and above: its cost 0 or a part), not from the cache (0, no model ran),
 * not a token count (free: /v1/messages/count_tokens)? The A/B means are
 * over these: a mean cost per request mixing refusals, hits and counts at
 * $0 compares the arms' refusals, hits and counts as much as their
 * models' prices. */
static int answered(const struct line *l)
{
    return l->status < 400 && !l->cache_hit &&
           !(l->endpoint != NULL && strcmp(l->endpoint, "/v1/messages/count_tokens") == 0);
}

static void stats_add(struct stats *s, const struct line *l)
{
    double d;

    s->requests++;
    s->errors += l->status >= 400;
    s->prompt_tokens += l->prompt;
    s->completion_tokens += l->completion;
    s->cache_hits += l->cache_hit != 0;
    s->cost_pico += l->cost_pico;
    s->saved_pico += l->saved_pico;
    s->web_searches += l->web_searches;
    s->file_searches += l->file_searches;
    s->reported += l->reported != 0;
    s->reported_pico += l->reported_pico;
    s->cost_reported_pico += l->reported ? l->cost_pico : 0;
    if (!answered(l))
        return;
    s->answered++;
    s->answered_pico += l->cost_pico;
    d = l->cost - s->mean;
    s->mean += d / (double)s->answered;
    s->m2 += d * (l->cost - s->mean);
}

static int wanted(const struct report *r, const char *dim)
{
    for (size_t i = 0; i < r->nwant; i++)
        if (strcmp(r->want[i], dim) == 0 || (strcmp(r->want[i], "tag") == 0 && strncmp(dim, "tag.", 4) == 0))
            return 1;
    return 0;
}

/* Read the line `o` into *l. Returns -1 when a number of it is out of
 * range (see COST_MAX), else 0. */
static int read_line(const cJSON *o, struct line *l)
{
    const cJSON *status = cJSON_GetObjectItemCaseSensitive(o, "status");
    int bad = 0;

    *l = (struct line){
        .tenant = str_or_null(o, "tenant"), .backend = str_or_null(o, "backend"),
        .route = str_or_null(o, "route"), .arm = str_or_null(o, "arm"),
        .experiment = str_or_null(o, "experiment"), .key = str_or_null(o, "key"),
        .service_tier = str_or_null(o, "service_tier"),
        .endpoint = str_or_null(o, "endpoint"),
        .tags = cJSON_GetObjectItemCaseSensitive(o, "tags"),
        .status = cJSON_IsNumber(status) ? status->valueint : 0, /* cJSON saturates valueint */
        .cache_hit = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "cache_hit")),
    };
    /* The router names a tier only when its rates priced the request
     * (flex, priority): the others were billed at the standard rates. */
    if (l->service_tier == NULL)
        l->service_tier = "default";
    /* cost_usd alone: the router writes it (0 when nothing was settled)
     * wherever it writes an estimate, and an estimate is no spend. */
    l->cost = num2(o, "cost_usd", NULL, COST_MAX, &bad);
    l->cost_pico = pico_of(l->cost);
    l->saved_pico = pico_of(num2(o, "saved_usd", NULL, COST_MAX, &bad));
    l->prompt = line_tokens(o, "billed_prompt_tokens", "prompt_tokens", "prompt_tokens_est", &bad);
    l->completion = line_tokens(o, "billed_completion_tokens", "completion_tokens",
                                "completion_tokens_est", &bad);
    l->web_searches = line_count(o, "billed_web_searches", &bad);
    l->file_searches = line_count(o, "billed_file_searches", &bad);
    /* The host's own figure: null (or absent, in older lines) when it
     * reported none, which is not $0. */
    l->reported = cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(o, "reported_cost_usd"));
    if (l->reported)
        l->reported_pico = pico_of(num2(o, "reported_cost_usd", NULL, COST_MAX, &bad));
    return bad ? -1 : 0;
}

static int64_t utc_ms(const char *s);

/* Add the line `l` to its --by arm group: the arm of its experiment (by
 * route for a line written before the log named the experiment), as the
 * A/B comparison takes them. Arm names are unique only within an
 * experiment: two experiments with arms control and treatment have four
 * arms. Keyed by value "e" (experiment) or "r" (route), the name, a 0x1f
 * and the arm's name; shown EXPERIMENT/ARM, or (route) ROUTE/ARM. */
static void add_arm_group(struct report *r, const struct line *l)
{
    int by_route = l->experiment == NULL;
    const char *name = by_route ? (l->route ? l->route : "") : l->experiment;
    size_t dim = intern_dim(r, "arm"), split = 1 + strlen(name) + 1;
    char *key;
    struct group *g;

    if (l->arm == NULL) {
        stats_add(gmap_get(&r->groups, dim, NULL), l);
        return;
    }
    key = text_of("%c%s\x1f%s", by_route ? 'r' : 'e', name, l->arm);
    g = group_of(gmap_get(&r->groups, dim, key));
    free(key);
    if (g->shown == NULL) {
        g->arm = split;
        g->shown = text_of("%s%s/%s", by_route ? "(route) " : "", name, l->arm);
    }
    stats_add(&g->st, l);
}

/* Add the line `o` to the total and its groups. Returns -1, adding
 * nothing, for a line out of range, or one whose tokens or amounts would
 * take the total past TOKENS_MAX or COST_TOTAL_MAX: every group's sum is
 * at most the total's. */
static int add_line(struct report *r, const cJSON *o)
{
    struct line l;

    if (read_line(o, &l) != 0 || l.prompt > TOKENS_MAX - r->total.prompt_tokens ||
        l.completion > TOKENS_MAX - r->total.completion_tokens ||
        l.cost_pico > COST_TOTAL_MAX - r->total.cost_pico ||
        l.saved_pico > COST_TOTAL_MAX - r->total.saved_pico ||
        l.web_searches > TOKENS_MAX - r->total.web_searches ||
        l.file_searches > TOKENS_MAX - r->total.file_searches ||
        l.reported_pico > COST_TOTAL_MAX - r->total.reported_pico)
        return -1;
    /* A key's name is unique within its tenant only: grouped as the store
     * counts it, TENANT#NAME. */
    char key[2 * 256 + 2], day[11], month[8], dim[256];
    const cJSON *tag, *ts = cJSON_GetObjectItemCaseSensitive(o, "ts");
    /* The UTC day and month the request started (its `ts`), none without
     * one to place it. */
    int timed = (wanted(r, "day") || wanted(r, "month")) && cJSON_IsString(ts) &&
                utc_ms(ts->valuestring) >= 0;

    if (timed) {
        snprintf(day, sizeof(day), "%.10s", ts->valuestring);
        snprintf(month, sizeof(month), "%.7s", ts->valuestring);
    }
    if (l.key != NULL)
        snprintf(key, sizeof(key), "%s#%s", l.tenant ? l.tenant : "-", l.key);

    const char *plain[][2] = {{"tenant", l.tenant}, {"backend", l.backend}, {"route", l.route},
                              {"service_tier", l.service_tier}, {"key", l.key ? key : NULL},
                              {"endpoint", l.endpoint}, {"day", timed ? day : NULL},
                              {"month", timed ? month : NULL}};

    stats_add(&r->total, &l);
    for (size_t i = 0; i < sizeof(plain) / sizeof(plain[0]); i++)
        if (wanted(r, plain[i][0]))
            stats_add(gmap_get(&r->groups, intern_dim(r, plain[i][0]), plain[i][1]), &l);
    if (wanted(r, "arm"))
        add_arm_group(r, &l);
    if (cJSON_IsObject(l.tags)) {
        cJSON_ArrayForEach(tag, l.tags) {
            /* A key named twice counts once, its first value, and one too
             * long for a name is none (no router writes either): a line is
             * in one group of a tag at most, which add_tag_none_groups
             * relies on. */
            if ((size_t)snprintf(dim, sizeof(dim), "tag.%s", tag->string) < sizeof(dim) &&
                cJSON_IsString(tag) && wanted(r, dim) &&
                cJSON_GetObjectItemCaseSensitive(l.tags, tag->string) == tag)
                stats_add(gmap_get(&r->groups, intern_dim(r, dim), tag->valuestring), &l);
        }
    }
    if (l.arm != NULL) {
        snprintf(dim, sizeof(dim), "%s\x1f%s", l.experiment ? "experiment" : "route",
                 l.experiment ? l.experiment : l.route ? l.route : "");
        stats_add(gmap_get(&r->arms, intern_dim(r, dim), l.arm), &l);
    }
    return 0;
}

/* `part` taken out of `s`: every field a sum over lines (the running
 * mean and m2 of arms are not: left at 0, groups do not use them). */
static void stats_sub(struct stats *s, const struct stats *part)
{
    s->requests -= part->requests;
    s->errors -= part->errors;
    s->prompt_tokens -= part->prompt_tokens;
    s->completion_tokens -= part->completion_tokens;
    s->cache_hits -= part->cache_hits;
    s->cost_pico -= part->cost_pico;
    s->saved_pico -= part->saved_pico;
    s->web_searches -= part->web_searches;
    s->file_searches -= part->file_searches;
    s->reported_pico -= part->reported_pico;
    s->reported -= part->reported;
    s->cost_reported_pico -= part->cost_reported_pico;
    s->answered -= part->answered;
    s->answered_pico -= part->answered_pico;
    s->mean = s->m2 = 0;
}

/*
 * Each tag's group of the lines without it (no such tag, or no tags), as
 * every other dimension has one: the total less the tag's groups, each
 * line being in at most one of them. A tag named in --by that no line
 * carries gets the whole total. Done once the lines are read: a tag
 * first seen late in the log (--by tag) had lines without it before.
 */
static void add_tag_none_groups(struct report *r)
{
    struct stats *none;

    for (size_t i = 0; i < r->nwant; i++)
        if (strncmp(r->want[i], "tag.", 4) == 0)
            intern_dim(r, r->want[i]);
    none = malloc((r->ndims ? r->ndims : 1) * sizeof(*none)); /* per dim: total less its groups */
    if (none == NULL) {
        perror("report");
        exit(1);
    }
    for (size_t d = 0; d < r->ndims; d++) {
        none[d] = r->total;
        none[d].mean = none[d].m2 = 0;
    }
    for (size_t i = 0; i < r->groups.n; i++) {
        const struct group *g = &r->groups.items[i];

        if (g->value != NULL)
            stats_sub(&none[g->dim], &g->st);
    }
    for (size_t d = 0; d < r->ndims; d++)
        if (strncmp(r->dims[d], "tag.", 4) == 0 && none[d].requests > 0)
            *gmap_get(&r->groups, d, NULL) = none[d];
    free(none);
}

/* The `k` digits at `s` as a number, or -1 if they are not all digits. */
static int digits_at(const char *s, int k)
{
    int v = 0;

    for (int i = 0; i < k; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Milliseconds since 1970 of a UTC time written YYYY-MM-DD, optionally
 * followed by THH:MM, :SS and a fraction, and a Z: the cost log writes
 * YYYY-MM-DDTHH:MM:SS.mmmZ. -1 if `s` is not so written or names no such
 * day or time (2026-02-30, 24:00). A fraction is cut to the millisecond. */
static int64_t utc_ms(const char *s)
{
    int f[6] = {digits_at(s, 4), -1, -1, 0, 0, 0}, ms = 0, places = 0;
    struct tm tm;
    time_t t;

    if (f[0] < 0 || s[4] != '-' || (f[1] = digits_at(s + 5, 2)) < 0 || s[7] != '-' ||
        (f[2] = digits_at(s + 8, 2)) < 0)
        return -1;
    s += 10;
    if (*s == 'T') {
        if ((f[3] = digits_at(s + 1, 2)) < 0 || s[3] != ':' || (f[4] = digits_at(s + 4, 2)) < 0)
            return -1;
        s += 6;
        if (*s == ':') {
            if ((f[5] = digits_at(s + 1, 2)) < 0)
                return -1;
            s += 3;
            if (*s == '.') {
                for (s++; *s >= '0' && *s <= '9'; s++, places++)
                    if (places < 3)
                        ms = ms * 10 + (*s - '0');
                if (places == 0)
                    return -1;
                for (; places < 3; places++)
                    ms *= 10;
            }
        }
    }
    s += *s == 'Z';
    if (*s != '\0')
        return -1;
    tm = (struct tm){.tm_year = f[0] - 1900, .tm_mon = f[1] - 1, .tm_mday = f[2],
                     .tm_hour = f[3], .tm_min = f[4], .tm_sec = f[5]};
    t = timegm(&tm);
    /* timegm carries what is out of range into tm (February 30th becomes
     * March 2nd): a time that does not stay as written was no such time */
    if (tm.tm_year != f[0] - 1900 || tm.tm_mon != f[1] - 1 || tm.tm_mday != f[2] ||
        tm.tm_hour != f[3] || tm.tm_min != f[4] || tm.tm_sec != f[5])
        return -1;
    return (int64_t)t * 1000 + ms;
}

/* Is line `o` in the period --since and --until give? 1 if it is (or no
 * period was given); 0, counted, if it is not or has no `ts` to tell. */
static int in_period(struct report *r, const cJSON *o)
{
    const cJSON *ts;
    int64_t ms;

    if (r->since_ms < 0 && r->until_ms < 0)
        return 1;
    ts = cJSON_GetObjectItemCaseSensitive(o, "ts");
    if (!cJSON_IsString(ts) || (ms = utc_ms(ts->valuestring)) < 0) {
        r->untimed++;
        return 0;
    }
    if ((r->since_ms >= 0 && ms < r->since_ms) || (r->until_ms >= 0 && ms >= r->until_ms)) {
        r->outside++;
        return 0;
    }
    return 1;
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void progress(const char *name, uint64_t lines, off_t done, off_t size, int last)
{
    fprintf(stderr, "\rreport: %s: %llu lines, %.1f MB", name, (unsigned long long)lines, done / 1e6);
    if (size > 0)
        fprintf(stderr, " (%d%%)", (int)(100.0 * (double)done / (double)size));
    fputs(last ? "\n" : "", stderr);
    fflush(stderr);
}

/* The line `p` (n bytes) as JSON, or NULL when it is none. Nothing but
 * blanks may follow the value: cJSON alone stops after the first one, and
 * took `{...}{...}` (a record whose newline was lost, run into the next
 * one) for the first record, the second lost without a bad line. */
static cJSON *parse_line(const char *p, size_t n)
{
    const char *end = NULL;
    cJSON *o = cJSON_ParseWithLengthOpts(p, n, &end, 0);

    if (o == NULL)
        return NULL;
    while (end < p + n && (*end == ' ' || *end == '\t'))
        end++;
    if (end == p + n)
        return o;
    cJSON_Delete(o);
    return NULL;
}

/* The compression whose magic number starts `p` (n bytes), or NULL: a
 * rotated log compressed by logrotate is no cost log until decompressed,
 * and read as text each of its "lines" was a bad line, its records
 * missing from every sum. */
static const char *compressed(const char *p, size_t n)
{
    static const struct {
        const char *cat, *magic; /* the tool that decompresses it to stdout */
        size_t len;
    } kinds[] = {{"zcat", "\x1f\x8b", 2}, {"zstdcat", "\x28\xb5\x2f\xfd", 4},
                 {"xzcat", "\xfd" "7zXZ", 5}};

    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
        if (n >= kinds[i].len && memcmp(p, kinds[i].magic, kinds[i].len) == 0)
            return kinds[i].cat;
    return NULL;
}

/* Add every line of `path` ("-" = stdin). Returns 0 or -1 (message printed). */
static int read_log(struct report *r, const char *path, int show)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
    const char *name = f == stdin ? "stdin" : path;
    struct stat st;
    off_t size = 0, done = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    double last = now_s();
    uint64_t before = r->lines, lineno = 0;

    if (f == NULL) {
        fprintf(stderr, "report: %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode)) {
        /* One file under two names (a "current" symlink beside its
         * target, globs that overlap) is read once: twice, every record
         * of it was billed twice. */
        for (size_t i = 0; i < r->nfiles; i++)
            if (r->files[i].dev == st.st_dev && r->files[i].ino == st.st_ino) {
                fprintf(stderr, "report: %s: the same file as %s: read once\n", name,
                        r->files[i].name);
                fclose(f);
                return 0;
            }
        struct read_file *files = realloc(r->files, (r->nfiles + 1) * sizeof(*files));
        if (files == NULL) {
            perror("report");
            exit(1);
        }
        r->files = files;
        r->files[r->nfiles++] = (struct read_file){st.st_dev, st.st_ino, name};
        size = st.st_size;
    }
    while ((n = getline(&line, &cap, f)) > 0) {
        done += n;
        if (lineno++ == 0 && compressed(line, (size_t)n) != NULL) {
            fprintf(stderr, "report: %s: compressed: decompress it first (%s FILE | "
                            "costrouter report - ...)\n",
                    name, compressed(line, (size_t)n));
            free(line);
            if (f != stdin)
                fclose(f);
            return -1;
        }
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        if (n == 0)
            continue;
        r->lines++;
        cJSON *o = parse_line(line, (size_t)n);
        if (!cJSON_IsObject(o) || (in_period(r, o) && add_line(r, o) != 0)) {
            /* where a user can look: the file's line, blank lines counted */
            if (r->bad++ == 0)
                snprintf(r->first_bad, sizeof(r->first_bad), "%s:%llu", name,
                         (unsigned long long)lineno);
        }
        cJSON_Delete(o);
        if (show && (r->lines & 0x3fff) == 0 && now_s() - last >= 0.25) {
            last = now_s();
            progress(name, r->lines - before, done, size, 0);
        }
    }
    if (show)
        progress(name, r->lines - before, done, size, 1);
    free(line);
    if (ferror(f)) {
        fprintf(stderr, "report: %s: %s\n", name, strerror(errno));
        if (f != stdin)
            fclose(f);
        return -1;
    }
    if (f != stdin)
        fclose(f);
    return 0;
}

/* ---- statistics ----------------------------------------------------------- */

/* Continued fraction of the incomplete beta function (modified Lentz). */
static double beta_cf(double a, double b, double x)
{
    const double tiny = 1e-300;
    double c = 1, d = 1 - (a + b) * x / (a + 1), h;

    d = 1 / (fabs(d) < tiny ? tiny : d);
    h = d;
    for (int m = 1; m <= 500; m++) {
        double m2 = 2.0 * m, aa, del;

        aa = m * (b - m) * x / ((a - 1 + m2) * (a + m2));
        d = 1 + aa * d;
        c = 1 + aa / c;
        d = 1 / (fabs(d) < tiny ? tiny : d);
        c = fabs(c) < tiny ? tiny : c;
        h *= d * c;
        aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1 + m2));
        d = 1 + aa * d;
        c = 1 + aa / c;
        d = 1 / (fabs(d) < tiny ? tiny : d);
        c = fabs(c) < tiny ? tiny : c;
        del = d * c;
        h *= del;
        if (fabs(del - 1) < 1e-15)
            break;
    }
    return h;
}

/* Regularized incomplete beta I_x(a, b). */
static double beta_inc(double a, double b, double x)
{
    double front;

    if (x <= 0)
        return 0;
    if (x >= 1)
        return 1;
    front = exp(lgamma(a + b) - lgamma(a) - lgamma(b) + a * log(x) + b * log1p(-x));
    if (x < (a + 1) / (a + b + 2))
        return front * beta_cf(a, b, x) / a;
    return 1 - front * beta_cf(b, a, 1 - x) / b;
}

/* t such that P(T > t) = 0.025 for Student's t with df degrees of freedom. */
static double t975(double df)
{
    double lo = 0, hi = 1000;

    if (!isfinite(df) || df > 1e7)
        return 1.959963984540054;
    for (int i = 0; i < 200 && hi - lo > 1e-12; i++) {
        double t = (lo + hi) / 2;
        if (0.5 * beta_inc(df / 2, 0.5, df / (df + t * t)) > 0.025)
            lo = t;
        else
            hi = t;
    }
    return (lo + hi) / 2;
}

struct arm_diff {
    const char *kind;               /* "route" or "experiment" */
    const char *group;              /* route or experiment name */
    const struct group *a, *b;      /* arms, a's name sorts first */
    double diff;                    /* mean(b) - mean(a), USD per request; NAN when
                                       either arm answered none (arm_mean) */
    double lo, hi;                  /* 95% CI; NAN when either arm has n < 2 or
                                       neither arm's cost varies */
    double df;                      /* Welch-Satterthwaite degrees of freedom */
};

/* The mean cost of an arm's answered requests; NAN when it answered
 * none: its refusals and cache hits are no mean of $0, and a difference
 * with such an arm was the other arm's whole mean. */
static double arm_mean(const struct stats *s)
{
    return s->answered > 0 ? s->mean : NAN;
}

static void welch(struct arm_diff *d)
{
    double na = (double)d->a->st.answered, nb = (double)d->b->st.answered, va, vb, se2, half;

    d->diff = arm_mean(&d->b->st) - arm_mean(&d->a->st);
    d->lo = d->hi = d->df = NAN;
    if (na < 2 || nb < 2)
        return;
    va = d->a->st.m2 / (na - 1) / na;
    vb = d->b->st.m2 / (nb - 1) / nb;
    se2 = va + vb;
    /* Both samples constant: Welch's df is 0/0 and the interval would be
     * the difference alone, a certainty two requests an arm cannot give
     * (R's t.test refuses such data too). */
    if (!(se2 > 0))
        return;
    d->df = se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1));
    half = t975(d->df) * sqrt(se2);
    d->lo = d->diff - half;
    d->hi = d->diff + half;
}

/* ---- output ---------------------------------------------------------------- */

static const char *const columns[] = {
    "requests",     "errors",       "prompt_tokens",     "completion_tokens",
    "cost_usd",     "usd_per_1k_requests", "cache_hits", "saved_usd",
    "web_searches", "file_searches",       "reported_cost_usd", "reported_requests",
    "cost_usd_of_reported", "answered",    "usd_per_1k_answered"};
#define NCOLUMNS (sizeof(columns) / sizeof(columns[0]))
#define TABLE_DECIMALS 6  /* the table's amounts: to the micro-dollar */
#define EXACT_DECIMALS 12 /* CSV's and JSON's: to the pico-dollar, exact */

/* An amount column's pico-USD (per 1K requests: to the nearest), or -1
 * for a count column. */
static __int128 column_pico(const struct stats *s, size_t i)
{
    __int128 n = (__int128)s->requests, a = (__int128)s->answered;

    switch (i) {
    case 4: return s->cost_pico;
    case 5: return n ? (s->cost_pico * 1000 + n / 2) / n : 0;
    case 14: return a ? (s->answered_pico * 1000 + a / 2) / a : 0;
    case 7: return s->saved_pico;
    case 10: return s->reported_pico;
    case 12: return s->cost_reported_pico;
    default: return -1;
    }
}

static uint64_t column_count(const struct stats *s, size_t i)
{
    switch (i) {
    case 0: return s->requests;
    case 1: return s->errors;
    case 2: return s->prompt_tokens;
    case 3: return s->completion_tokens;
    case 6: return s->cache_hits;
    case 8: return s->web_searches;
    case 9: return s->file_searches;
    case 13: return s->answered;
    default: return s->reported;
    }
}

/* Pico-USD as USD with `decimals` fraction digits (at most
 * EXACT_DECIMALS), rounded, halves up. With EXACT_DECIMALS it is exact and
 * trailing zeros are dropped (CSV and JSON: a reader with a decimal type
 * gets the very sum). Its whole dollars fit a uint64_t (COST_TOTAL_MAX);
 * `out` has room for 40 bytes. */
static void usd_text(char *out, size_t cap, __int128 pico, int decimals)
{
    uint64_t unit = 1, scale = 1;
    int n;

    for (int i = 0; i < EXACT_DECIMALS; i++)
        *(i < decimals ? &scale : &unit) *= 10;
    pico = (pico + (__int128)(unit / 2)) / (__int128)unit;
    n = snprintf(out, cap, "%" PRIu64 ".%0*" PRIu64, (uint64_t)(pico / (__int128)scale), decimals,
                 (uint64_t)(pico % (__int128)scale));
    if (decimals < EXACT_DECIMALS || n <= 0 || (size_t)n >= cap)
        return;
    while (out[n - 1] == '0')
        n--;
    out[n - (out[n - 1] == '.')] = '\0';
}

/* Column `i` of `s` as text: a count as an integer, an amount by
 * usd_text() with `decimals`. */
static void column_text(char *out, size_t cap, const struct stats *s, size_t i, int decimals)
{
    __int128 pico = column_pico(s, i);

    if (pico >= 0)
        usd_text(out, cap, pico, decimals);
    else
        snprintf(out, cap, "%" PRIu64, column_count(s, i));
}

static const char *dim_name(const struct report *r, size_t dim)
{
    return r->dims[dim];
}

/* What the outputs print for the value of `g` (an arm: EXPERIMENT/ARM);
 * NULL for the group of the lines without one. */
static const char *group_text(const struct group *g)
{
    return g->shown ? g->shown : g->value;
}

/* A value as the table prints it, in a new string (exits on ENOMEM).
 * Values are the log's (a tag's is the client's, x-costrouter-tags):
 * their control characters would break the table's rows (a newline) or
 * run in the reader's terminal (ESC [ ...), so they are escaped as \n,
 * \t, \r, \xHH (the other C0 ones, DEL and bytes that are no UTF-8),
 * \u00HH (C1: U+0080 to U+009F, CSI among them), and \ as \\. None
 * (NULL) is "-", so a value that is "-" is \-. */
static char *table_text(const char *v)
{
    const char *s = v ? v : "-";
    const unsigned char *p = (const unsigned char *)s, *end = p + strlen(s);
    char *out = malloc(4 * (size_t)(end - p) + 3), *o = out;
    size_t k;

    if (out == NULL) {
        perror("report");
        exit(1);
    }
    if (v != NULL && strcmp(v, "-") == 0)
        *o++ = '\\';
    for (; p < end; p += k) {
        k = utf8_seq_len(p, (size_t)(end - p));
        if (k == 2 && p[0] == 0xc2 && p[1] < 0xa0) {
            o += sprintf(o, "\\u00%02x", p[1]);
        } else if (k > 1) {
            memcpy(o, p, k);
            o += k;
        } else {
            k = 1;
            if (*p == '\\' || *p == '\n' || *p == '\t' || *p == '\r') {
                *o++ = '\\';
                *o++ = *p == '\n' ? 'n' : *p == '\t' ? 't' : *p == '\r' ? 'r' : '\\';
            } else if (*p < 0x20 || *p >= 0x7f) {
                o += sprintf(o, "\\x%02x", *p);
            } else {
                *o++ = (char)*p;
            }
        }
    }
    *o = '\0';
    return out;
}

/* Groups in output order: --by order (tag keys sorted), cost descending
 * (days and months: in order of time). */
static const struct report *sort_ctx;
static int cmp_group(const void *pa, const void *pb)
{
    const struct group *a = *(const struct group *const *)pa, *b = *(const struct group *const *)pb;
    const char *da = dim_name(sort_ctx, a->dim), *db = dim_name(sort_ctx, b->dim);
    size_t ra = sort_ctx->nwant, rb = sort_ctx->nwant;

    for (size_t i = 0; i < sort_ctx->nwant; i++) {
        const char *w = sort_ctx->want[i];
        if (ra == sort_ctx->nwant && (strcmp(w, da) == 0 || (strcmp(w, "tag") == 0 && strncmp(da, "tag.", 4) == 0)))
            ra = i;
        if (rb == sort_ctx->nwant && (strcmp(w, db) == 0 || (strcmp(w, "tag") == 0 && strncmp(db, "tag.", 4) == 0)))
            rb = i;
    }
    if (ra != rb)
        return ra < rb ? -1 : 1;
    if (strcmp(da, db) != 0)
        return strcmp(da, db);
    if (strcmp(da, "day") == 0 || strcmp(da, "month") == 0) /* in order of time */
        return value_cmp(a->value, b->value);
    if (a->st.cost_pico != b->st.cost_pico)
        return a->st.cost_pico > b->st.cost_pico ? -1 : 1;
    return value_cmp(a->value, b->value);
}

static int cmp_arm(const void *pa, const void *pb)
{
    const struct group *a = *(const struct group *const *)pa, *b = *(const struct group *const *)pb;
    int c = strcmp(dim_name(sort_ctx, a->dim), dim_name(sort_ctx, b->dim));
    return c ? c : strcmp(a->value, b->value);
}

static const struct group **sorted(const struct report *r, const struct gmap *m,
                                   int (*cmp)(const void *, const void *))
{
    const struct group **v = malloc((m->n + 1) * sizeof(*v));

    if (v == NULL) {
        perror("report");
        exit(1);
    }
    for (size_t i = 0; i < m->n; i++)
        v[i] = &m->items[i];
    sort_ctx = r;
    qsort(v, m->n, sizeof(*v), cmp);
    return v;
}

/* Every pair of arms within each experiment/route; *n gets the count. */
static struct arm_diff *arm_diffs(const struct report *r, size_t *n)
{
    const struct group **arms = sorted(r, &r->arms, cmp_arm);
    struct arm_diff *out = NULL;
    size_t cap = 0;

    *n = 0;
    for (size_t i = 0; i < r->arms.n; i++)
        for (size_t j = i + 1; j < r->arms.n && arms[j]->dim == arms[i]->dim; j++) {
            if (*n == cap) {
                cap = cap ? cap * 2 : 16;
                out = realloc(out, cap * sizeof(*out));
                if (out == NULL) {
                    perror("report");
                    exit(1);
                }
            }
            const char *dim = dim_name(r, arms[i]->dim), *sep = strchr(dim, '\x1f');
            out[*n] = (struct arm_diff){.kind = dim[0] == 'e' ? "experiment" : "route",
                                        .group = sep + 1, .a = arms[i], .b = arms[j]};
            welch(&out[(*n)++]);
        }
    free(arms);
    return out;
}

/* `ms` (a --since or --until) as the cost log writes a time; NULL when
 * it is -1 (no bound). */
static const char *time_text(char *out, size_t cap, int64_t ms)
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;

    if (ms < 0 || gmtime_r(&secs, &tm) == NULL || cap < 25)
        return NULL;
    strftime(out, cap, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + 19, cap - 19, ".%03dZ", (int)(ms % 1000));
    return out;
}

static void json_add_time(cJSON *o, const char *key, int64_t ms)
{
    char text[32];

    if (time_text(text, sizeof(text), ms) == NULL)
        cJSON_AddNullToObject(o, key);
    else
        cJSON_AddStringToObject(o, key, text);
}

/* An arm in the A/B lines: its name, answered requests and their mean
 * cost, and the requests not in that mean. */
static void table_arm(FILE *out, const char *name, const struct stats *s)
{
    fprintf(out, "%s (n=%llu, ", name, (unsigned long long)s->answered);
    if (s->answered > 0)
        fprintf(out, "$%.6f", s->mean);
    else
        fputs("no mean", out);
    fprintf(out, "; %llu errors, %llu cache hits)", (unsigned long long)s->errors,
            (unsigned long long)s->cache_hits);
}

static void print_table(const struct report *r, FILE *out, const struct group **g,
                        const struct arm_diff *d, size_t nd)
{
    char cell[64], cost[48], per_1k[48], saved[48], reported[48], cost_reported[48];

    char since[32], until[32];

    fprintf(out, "lines: %llu  bad lines skipped: %llu\n", (unsigned long long)r->lines,
            (unsigned long long)r->bad);
    if (r->since_ms >= 0 || r->until_ms >= 0)
        fprintf(out, "period: from %s until %s; left out: %llu lines outside it, %llu without "
                     "a time\n",
                time_text(since, sizeof(since), r->since_ms) ? since : "the start",
                time_text(until, sizeof(until), r->until_ms) ? until : "the end",
                (unsigned long long)r->outside, (unsigned long long)r->untimed);
    column_text(cost, sizeof(cost), &r->total, 4, TABLE_DECIMALS);
    column_text(per_1k, sizeof(per_1k), &r->total, 5, TABLE_DECIMALS);
    column_text(saved, sizeof(saved), &r->total, 7, TABLE_DECIMALS);
    column_text(reported, sizeof(reported), &r->total, 10, TABLE_DECIMALS);
    column_text(cost_reported, sizeof(cost_reported), &r->total, 12, TABLE_DECIMALS);
    fprintf(out, "total: %llu requests, $%s, $%s per 1K requests, %llu cache hits saved $%s\n",
            (unsigned long long)r->total.requests, cost, per_1k,
            (unsigned long long)r->total.cache_hits, saved);
    fprintf(out, "web searches: %llu, file searches: %llu; costs reported by hosts: $%s on %llu "
                 "requests, charged $%s\n",
            (unsigned long long)r->total.web_searches,
            (unsigned long long)r->total.file_searches, reported,
            (unsigned long long)r->total.reported, cost_reported);
    for (size_t s = 0; s < r->groups.n;) {
        size_t e = s, width[NCOLUMNS + 1];
        const char *dim = dim_name(r, g[s]->dim);

        while (e < r->groups.n && g[e]->dim == g[s]->dim)
            e++;
        char *name = table_text(dim), *head = table_text(strcmp(dim, "arm") ? dim : "experiment/arm");

        width[0] = strlen(head);
        for (size_t c = 0; c < NCOLUMNS; c++)
            width[c + 1] = strlen(columns[c]);
        for (size_t i = s; i < e; i++) {
            char *text = table_text(group_text(g[i]));

            width[0] = strlen(text) > width[0] ? strlen(text) : width[0];
            free(text);
            for (size_t c = 0; c < NCOLUMNS; c++) {
                column_text(cell, sizeof(cell), &g[i]->st, c, TABLE_DECIMALS);
                width[c + 1] = strlen(cell) > width[c + 1] ? strlen(cell) : width[c + 1];
            }
        }
        fprintf(out, "\nby %s\n%-*s", name, (int)width[0], head);
        free(name);
        free(head);
        for (size_t c = 0; c < NCOLUMNS; c++)
            fprintf(out, "  %*s", (int)width[c + 1], columns[c]);
        fputc('\n', out);
        for (size_t i = s; i < e; i++) {
            char *text = table_text(group_text(g[i]));

            fprintf(out, "%-*s", (int)width[0], text);
            free(text);
            for (size_t c = 0; c < NCOLUMNS; c++) {
                column_text(cell, sizeof(cell), &g[i]->st, c, TABLE_DECIMALS);
                fprintf(out, "  %*s", (int)width[c + 1], cell);
            }
            fputc('\n', out);
        }
        s = e;
    }
    if (nd > 0)
        fprintf(out, "\nA/B arms: difference in mean cost per answered request (b - a), 95%% CI "
                     "(Welch)\n");
    for (size_t i = 0; i < nd; i++) {
        char *group = table_text(d[i].group), *a = table_text(d[i].a->value),
             *b = table_text(d[i].b->value);

        fprintf(out, "%s %s: ", d[i].kind, group);
        table_arm(out, a, &d[i].a->st);
        fputs(" vs ", out);
        table_arm(out, b, &d[i].b->st);
        if (!isnan(d[i].diff))
            fprintf(out, ": %+.6f", d[i].diff);
        if (isnan(d[i].diff))
            fprintf(out, ": no difference [an arm answered no request]\n");
        else if (isnan(d[i].lo) && (d[i].a->st.answered < 2 || d[i].b->st.answered < 2))
            fprintf(out, " [CI needs 2+ requests per arm]\n");
        else if (isnan(d[i].lo))
            fprintf(out, " [no CI: neither arm's cost varies]\n");
        else
            fprintf(out, " [%+.6f, %+.6f]\n", d[i].lo, d[i].hi);
        free(group);
        free(a);
        free(b);
    }
}

/* Would a spreadsheet opening the CSV run the text `s` as a formula? A
 * tag's value is the client's (x-costrouter-tags), and one such as
 * =HYPERLINK(...) would run in whoever opens the report. The lone "-"
 * is plain text to them. */
static int csv_formula(const char *s)
{
    return strchr("=+-@\t\r", s[0]) != NULL && s[0] != '\0' && strcmp(s, "-") != 0;
}

/* A CSV text field (RFC 4180); one a spreadsheet would take for a
 * formula starts with a ' (OWASP's advice for CSV injection), which
 * spreadsheets show as text and do not run. */
static void csv_field(FILE *out, const char *s)
{
    const char *lead = csv_formula(s) ? "'" : "";

    if (strpbrk(s, ",\"\r\n") == NULL) {
        fprintf(out, "%s%s", lead, s);
        return;
    }
    fprintf(out, "\"%s", lead);
    for (; *s; s++) {
        if (*s == '"')
            fputc('"', out);
        fputc(*s, out);
    }
    fputc('"', out);
}

/* A finite double as the shortest %g that reads back as the same double
 * (as cJSON writes JSON numbers); nothing else. */
static void csv_num(FILE *out, double v)
{
    char text[32];

    if (!isfinite(v)) {
        fputc(',', out);
        return;
    }
    for (int digits = 15; digits <= 17; digits++) {
        snprintf(text, sizeof(text), "%.*g", digits, v);
        if (strtod(text, NULL) == v)
            break;
    }
    fprintf(out, ",%s", text);
}

static void csv_stats_row(FILE *out, const char *kind, const char *dim, const char *value,
                          const struct stats *s)
{
    fputs(kind, out);
    fputc(',', out);
    csv_field(out, dim);
    fputc(',', out);
    csv_field(out, value);
    char cell[48];

    for (size_t c = 0; c < NCOLUMNS; c++) {
        column_text(cell, sizeof(cell), s, c, EXACT_DECIMALS);
        fprintf(out, ",%s", cell);
    }
    fputs(",,,,,,,,,,,,,\n", out); /* the 13 arm columns */
}

static void print_csv(const struct report *r, FILE *out, const struct group **g,
                      const struct arm_diff *d, size_t nd)
{
    fputs("kind,dimension,value", out);
    for (size_t c = 0; c < NCOLUMNS; c++)
        fprintf(out, ",%s", columns[c]);
    fputs(",arm_a,arm_b,n_a,n_b,mean_a_usd,mean_b_usd,diff_usd,ci95_low_usd,ci95_high_usd,"
          "errors_a,errors_b,cache_hits_a,cache_hits_b\n",
          out);
    csv_stats_row(out, "total", "", "", &r->total);
    for (size_t i = 0; i < r->groups.n; i++)
        csv_stats_row(out, "group", dim_name(r, g[i]->dim), group_text(g[i]) ? group_text(g[i]) : "",
                      &g[i]->st);
    for (size_t i = 0; i < nd; i++) {
        fprintf(out, "arm_diff,%s,", d[i].kind);
        csv_field(out, d[i].group);
        for (size_t c = 0; c < NCOLUMNS; c++) /* the stats columns */
            fputc(',', out);
        fputc(',', out);
        csv_field(out, d[i].a->value);
        fputc(',', out);
        csv_field(out, d[i].b->value);
        fprintf(out, ",%llu,%llu", (unsigned long long)d[i].a->st.answered,
                (unsigned long long)d[i].b->st.answered);
        csv_num(out, arm_mean(&d[i].a->st));
        csv_num(out, arm_mean(&d[i].b->st));
        csv_num(out, d[i].diff);
        csv_num(out, d[i].lo);
        csv_num(out, d[i].hi);
        fprintf(out, ",%llu,%llu,%llu,%llu\n", (unsigned long long)d[i].a->st.errors,
                (unsigned long long)d[i].b->st.errors, (unsigned long long)d[i].a->st.cache_hits,
                (unsigned long long)d[i].b->st.cache_hits);
    }
}

static cJSON *json_stats(const struct stats *s)
{
    cJSON *o = cJSON_CreateObject();
    char cell[48];

    /* As text: a double would round the sum (cJSON would write it back as
     * the double, 0.1 + 0.2 as 0.30000000000000004). */
    for (size_t c = 0; c < NCOLUMNS; c++) {
        column_text(cell, sizeof(cell), s, c, EXACT_DECIMALS);
        cJSON_AddRawToObject(o, columns[c], cell);
    }
    return o;
}

static void json_add_finite(cJSON *o, const char *key, double v)
{
    if (isfinite(v))
        cJSON_AddNumberToObject(o, key, v);
    else
        cJSON_AddNullToObject(o, key);
}

static int print_json(const struct report *r, FILE *out, const struct group **g,
                      const struct arm_diff *d, size_t nd)
{
    cJSON *root = cJSON_CreateObject(), *groups, *diffs;
    char *text;

    cJSON_AddNumberToObject(root, "lines", (double)r->lines);
    cJSON_AddNumberToObject(root, "bad_lines", (double)r->bad);
    json_add_time(root, "since", r->since_ms);
    json_add_time(root, "until", r->until_ms);
    cJSON_AddNumberToObject(root, "outside_lines", (double)r->outside);
    cJSON_AddNumberToObject(root, "untimed_lines", (double)r->untimed);
    cJSON_AddItemToObject(root, "total", json_stats(&r->total));
    groups = cJSON_AddArrayToObject(root, "groups");
    for (size_t i = 0; i < r->groups.n; i++) {
        cJSON *o = json_stats(&g[i]->st);
        cJSON_AddStringToObject(o, "dimension", dim_name(r, g[i]->dim));
        if (group_text(g[i]) != NULL)
            cJSON_AddStringToObject(o, "value", group_text(g[i]));
        else
            cJSON_AddNullToObject(o, "value");
        if (g[i]->shown != NULL) { /* an arm: its experiment (or route) and name apart */
            char *name = strndup(g[i]->value + 1, g[i]->arm - 2);

            if (name == NULL)
                return -1;
            cJSON_AddStringToObject(o, g[i]->value[0] == 'e' ? "experiment" : "route", name);
            cJSON_AddStringToObject(o, "arm", g[i]->value + g[i]->arm);
            free(name);
        }
        cJSON_AddItemToArray(groups, o);
    }
    diffs = cJSON_AddArrayToObject(root, "arm_diffs");
    for (size_t i = 0; i < nd; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, d[i].kind, d[i].group);
        cJSON_AddStringToObject(o, "arm_a", d[i].a->value);
        cJSON_AddStringToObject(o, "arm_b", d[i].b->value);
        cJSON_AddNumberToObject(o, "n_a", (double)d[i].a->st.answered);
        cJSON_AddNumberToObject(o, "n_b", (double)d[i].b->st.answered);
        cJSON_AddNumberToObject(o, "errors_a", (double)d[i].a->st.errors);
        cJSON_AddNumberToObject(o, "errors_b", (double)d[i].b->st.errors);
        cJSON_AddNumberToObject(o, "cache_hits_a", (double)d[i].a->st.cache_hits);
        cJSON_AddNumberToObject(o, "cache_hits_b", (double)d[i].b->st.cache_hits);
        json_add_finite(o, "mean_a_usd", arm_mean(&d[i].a->st));
        json_add_finite(o, "mean_b_usd", arm_mean(&d[i].b->st));
        json_add_finite(o, "diff_usd", d[i].diff);
        json_add_finite(o, "ci95_low_usd", d[i].lo);
        json_add_finite(o, "ci95_high_usd", d[i].hi);
        json_add_finite(o, "df", d[i].df);
        cJSON_AddItemToArray(diffs, o);
    }
    text = cJSON_Print(root);
    cJSON_Delete(root);
    if (text == NULL)
        return -1;
    fprintf(out, "%s\n", text);
    cJSON_free(text);
    return 0;
}

/* ---- main ---------------------------------------------------------------- */

static void usage(FILE *f)
{
    fputs("usage: costrouter report [--format table|csv|json]\n"
          "                         [--by tenant,tag,backend,route,arm,service_tier,key,\n"
          "                               endpoint,day,month]\n"
          "                         [--since TIME] [--until TIME] [--progress] [-o FILE]\n"
          "                         [FILE|-]...\n"
          "TIME is UTC: YYYY-MM-DD[THH:MM[:SS[.fff]]][Z]; --since is in the period, --until not\n",
          f);
}

/* Split --by into r->want; returns -1 on an unknown dimension. */
static int parse_by(struct report *r, char *list)
{
    char *save = NULL;

    for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (strcmp(t, "tenant") && strcmp(t, "backend") && strcmp(t, "route") && strcmp(t, "arm") &&
            strcmp(t, "service_tier") && strcmp(t, "key") && strcmp(t, "endpoint") &&
            strcmp(t, "day") && strcmp(t, "month") &&
            strcmp(t, "tag") &&
            (strncmp(t, "tag.", 4) || t[4] == '\0')) {
            fprintf(stderr, "report: --by: unknown dimension \"%s\"\n", t);
            return -1;
        }
        r->want[r->nwant++] = t;
    }
    return 0;
}

int cli_report_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'}, {"by", required_argument, NULL, 'b'},
        {"progress", no_argument, NULL, 'p'},     {"output", required_argument, NULL, 'o'},
        {"since", required_argument, NULL, 's'},  {"until", required_argument, NULL, 'u'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    char default_by[] = "tenant,tag,backend,route,arm", *by = NULL, *by_copy = NULL;
    const char *output = NULL;
    struct report r = {.since_ms = -1, .until_ms = -1};
    enum format format = FORMAT_TABLE;
    int show = isatty(2), rc = 2, c;
    const struct group **g = NULL;
    struct arm_diff *d = NULL;
    size_t nd = 0;
    FILE *out = stdout;

    optind = 0; /* full reset: callable more than once per process */
    while ((c = getopt_long(argc, argv, "f:b:po:h", opts, NULL)) != -1) {
        switch (c) {
        case 'f':
            if (strcmp(optarg, "table") == 0)
                format = FORMAT_TABLE;
            else if (strcmp(optarg, "csv") == 0)
                format = FORMAT_CSV;
            else if (strcmp(optarg, "json") == 0)
                format = FORMAT_JSON;
            else
                goto usage;
            break;
        case 'b': by = optarg; break;
        case 'p': show = 1; break;
        case 'o': output = optarg; break;
        case 's':
        case 'u':
            if ((*(c == 's' ? &r.since_ms : &r.until_ms) = utc_ms(optarg)) < 0) {
                fprintf(stderr, "report: --%s: not a UTC time: \"%s\"\n",
                        c == 's' ? "since" : "until", optarg);
                goto usage;
            }
            break;
        case 'h': usage(stdout); return 0;
        default: goto usage;
        }
    }
    by_copy = strdup(by ? by : default_by);
    if (by_copy != NULL)
        r.want = calloc(strlen(by_copy) / 2 + 1, sizeof(*r.want));
    if (r.want == NULL) {
        rc = 1;
        goto done;
    }
    if (parse_by(&r, by_copy) != 0)
        goto usage;
    if (r.since_ms >= 0 && r.until_ms >= 0 && r.until_ms <= r.since_ms) {
        fprintf(stderr, "report: --until is not after --since: the period is empty\n");
        goto usage;
    }
    rc = 1;
    for (int i = optind; i < argc; i++)
        if (read_log(&r, argv[i], show) != 0)
            goto done;
    if (optind == argc && read_log(&r, "-", show) != 0)
        goto done;
    if (r.bad > 0)
        fprintf(stderr, "report: skipped %llu bad lines (the first at %s)\n",
                (unsigned long long)r.bad, r.first_bad);
    if (r.outside > 0)
        fprintf(stderr, "report: left out %llu lines outside the period\n",
                (unsigned long long)r.outside);
    if (r.untimed > 0)
        fprintf(stderr, "report: left out %llu lines without a time (ts) to place them\n",
                (unsigned long long)r.untimed);
    if (output != NULL && (out = fopen(output, "w")) == NULL) {
        fprintf(stderr, "report: %s: %s\n", output, strerror(errno));
        goto done;
    }
    add_tag_none_groups(&r);
    g = sorted(&r, &r.groups, cmp_group);
    d = arm_diffs(&r, &nd);
    if (format == FORMAT_TABLE)
        print_table(&r, out, g, d, nd);
    else if (format == FORMAT_CSV)
        print_csv(&r, out, g, d, nd);
    else if (print_json(&r, out, g, d, nd) != 0)
        goto done;
    rc = fflush(out) == 0 && !ferror(out) ? 0 : 1;
    goto done;

usage:
    usage(stderr);
    rc = 2;
done:
    if (out != stdout && out != NULL && fclose(out) != 0)
        rc = 1;
    free(g);
    free(d);
    gmap_free(&r.groups);
    gmap_free(&r.arms);
    for (size_t i = 0; i < r.ndims; i++)
        free(r.dims[i]);
    free(r.dims);
    free(r.want);
    free(r.files);
    free(by_copy);
    return rc;
}
