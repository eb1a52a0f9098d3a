/*
 * metrics/metrics.c: the metric registry and the Prometheus text format.
 *
 * Layout: one family per METRICS_LIST entry holds its series in a singly
 * linked list (creation order, for rendering). All series of all families
 * also sit in one open-addressing hash table (linear probing, power-of-two
 * size, at most half full) keyed by xxh3 over (metric id, label values),
 * so an update touches one slot chain and never scans the tenants. A series
 * is one allocation: the struct, then the histogram buckets, then copies of
 * its label values.
 */
#include "metrics/metrics.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <xxhash.h>

#include "common/buf.h"
#include "common/log.h"
#include "metrics/internal.h"

const char metrics_content_type[] = "text/plain; version=0.0.4; charset=utf-8";

struct metric_desc {
    const char *name;       /* exposition name, e.g. costrouter_requests_total */
    enum metrics_type type; /* counter, gauge or histogram */
    const char *help;       /* HELP text */
    const char *labels;     /* comma-separated label names, "" for none */
};

#define METRICS__DESC(id, name, type, help, labels) {name, METRICS_##type, help, labels},
static const struct metric_desc descs[METRICS_NMETRICS] = {METRICS_LIST(METRICS__DESC)};
#undef METRICS__DESC

static const double bucket_bounds[] = {METRICS_BUCKETS_SECONDS};
#define NBUCKETS (sizeof(bucket_bounds) / sizeof(bucket_bounds[0]))

struct series {
    struct series *next;                    /* next series of the same family */
    uint64_t hash;                          /* hash of (id, values) */
    enum metrics_id id;                     /* which metric */
    const char *values[METRICS_MAX_LABELS]; /* label values, in the copy below */
    double value;                           /* counter/gauge value; histogram sum */
    uint64_t count;                         /* histogram: observations */
    uint64_t *buckets;                      /* histogram: NBUCKETS + 1 (+Inf) counts,
                                               not cumulative; NULL otherwise */
};

struct family {
    size_t nlabels;                           /* label names of the metric */
    const char *label_names[METRICS_MAX_LABELS]; /* point into metrics.names */
    struct series *head;                      /* first series created */
    struct series *tail;                      /* last series created */
};

struct metrics {
    struct family fam[METRICS_NMETRICS]; /* one per METRICS_LIST entry */
    struct series **slots;               /* hash table, NULL = empty slot */
    size_t mask;                         /* table size - 1 */
    size_t nseries;                      /* series in the table */
    size_t max_series;                   /* cap on nseries */
    struct series *dropped;              /* SERIES_DROPPED_TOTAL's series */
    struct log_every drop_log;           /* "series dropped", once a minute at most */
    char *names;                         /* all label names, split in place */
};

size_t metrics__dtoa(char out[32], double v)
{
    int n = snprintf(out, 32, "%.15g", v);

    if (strtod(out, NULL) != v)
        n = snprintf(out, 32, "%.17g", v);
    return (size_t)n;
}

static uint64_t series_hash(enum metrics_id id, const char *const *values, size_t n)
{
    uint64_t h = XXH3_64bits_withSeed(&id, sizeof(id), 0x636f7374u);

    for (size_t i = 0; i < n; i++)
        h = XXH3_64bits_withSeed(values[i], strlen(values[i]), h);
    return h;
}

static int series_match(const struct series *s, uint64_t hash, enum metrics_id id,
                        const char *const *values, size_t n)
{
    if (s->hash != hash || s->id != id)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(s->values[i], values[i]) != 0)
            return 0;
    return 1;
}

/* Slot where a series with `hash` is or would go. */
static struct series **find_slot(const struct metrics *m, uint64_t hash, enum metrics_id id,
                                 const char *const *values, size_t n)
{
    size_t i = (size_t)hash & m->mask;

    while (m->slots[i] != NULL && !series_match(m->slots[i], hash, id, values, n))
        i = (i + 1) & m->mask;
    return &m->slots[i];
}

/* Put `s` in the first free slot from its hash on (it is not there yet). */
static void place(struct metrics *m, struct series *s)
{
    size_t j = (size_t)s->hash & m->mask;

    while (m->slots[j] != NULL)
        j = (j + 1) & m->mask;
    m->slots[j] = s;
}

static int grow(struct metrics *m)
{
    size_t size = (m->mask + 1) * 2;
    struct series **old = m->slots, **slots = calloc(size, sizeof(*slots));

    if (slots == NULL)
        return -ENOMEM;
    m->slots = slots;
    m->mask = size - 1;
    for (size_t i = 0; i < size / 2; i++)
        if (old[i] != NULL)
            place(m, old[i]);
    free(old);
    return 0;
}

/* An update of metric `id` that would make a series past the cap is
 * lost: counted, and logged, else the dashboards miss series without a
 * word. Once a minute is enough: when the cap is reached, most requests
 * meet it. */
static void drop_series(struct metrics *m, enum metrics_id id)
{
    char note[LOG_EVERY_NOTE_MAX];

    if (m->dropped != NULL)
        m->dropped->value++;
    if (log_every_due(&m->drop_log, uv_hrtime() / 1000000, note))
        log_warn("metrics: the cap of %zu series is reached: a new series of %s was dropped; "
                 "each update that would make a series is lost, counted in %s%s",
                 m->max_series, descs[id].name, descs[METRICS_SERIES_DROPPED_TOTAL].name, note);
}

/* Find or create the series; NULL with *err set on failure. */
static struct series *lookup(struct metrics *m, enum metrics_id id, const char *const *values,
                             int *err)
{
    struct family *f = &m->fam[id];
    uint64_t hash = series_hash(id, values, f->nlabels);
    struct series **slot = find_slot(m, hash, id, values, f->nlabels), *s;
    size_t lens[METRICS_MAX_LABELS], size, hist;
    char *p;

    if (*slot != NULL)
        return *slot;
    if (m->nseries >= m->max_series) {
        drop_series(m, id);
        *err = -ENOSPC;
        return NULL;
    }
    if ((m->nseries + 1) * 2 > m->mask + 1) {
        if (grow(m) != 0)
            goto nomem;
        slot = find_slot(m, hash, id, values, f->nlabels);
    }
    hist = descs[id].type == METRICS_HISTOGRAM ? (NBUCKETS + 1) * sizeof(uint64_t) : 0;
    size = sizeof(*s) + hist;
    for (size_t i = 0; i < f->nlabels; i++) {
        lens[i] = strlen(values[i]);
        size += lens[i] + 1;
    }
    s = calloc(1, size);
    if (s == NULL)
        goto nomem;
    s->hash = hash;
    s->id = id;
    s->buckets = hist ? (uint64_t *)(s + 1) : NULL;
    p = (char *)(s + 1) + hist;
    for (size_t i = 0; i < f->nlabels; i++) {
        memcpy(p, values[i], lens[i] + 1);
        s->values[i] = p;
        p += lens[i] + 1;
    }
    *slot = s;
    m->nseries++;
    if (f->tail != NULL)
        f->tail->next = s;
    else
        f->head = s;
    f->tail = s;
    return s;

nomem:
    *err = -ENOMEM;
    return NULL;
}

struct metrics *metrics_create(size_t max_series)
{
    struct metrics *m = calloc(1, sizeof(*m));
    size_t total = 0;
    char *p;

    if (m == NULL)
        return NULL;
    m->max_series = max_series ? max_series : 100000;
    m->drop_log.interval_ms = 60000;
    m->mask = 63;
    m->slots = calloc(m->mask + 1, sizeof(*m->slots));
    for (size_t i = 0; i < METRICS_NMETRICS; i++)
        total += strlen(descs[i].labels) + 1;
    m->names = malloc(total);
    if (m->slots == NULL || m->names == NULL)
        goto fail;
    p = m->names;
    for (size_t i = 0; i < METRICS_NMETRICS; i++) {
        struct family *f = &m->fam[i];
        size_t len = strlen(descs[i].labels);

        memcpy(p, descs[i].labels, len + 1);
        for (char *tok = p; len > 0 && tok != NULL && f->nlabels < METRICS_MAX_LABELS;) {
            char *comma = strchr(tok, ',');
            f->label_names[f->nlabels++] = tok;
            if (comma != NULL)
                *comma++ = '\0';
            tok = comma;
        }
        p += len + 1;
        if (f->nlabels == 0) {
            int err;
            if (lookup(m, (enum metrics_id)i, NULL, &err) == NULL)
                goto fail;
        }
    }
    m->dropped = m->fam[METRICS_SERIES_DROPPED_TOTAL].head;
    return m;

fail:
    metrics_free(m);
    return NULL;
}

void metrics_free(struct metrics *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < METRICS_NMETRICS; i++) {
        struct series *s = m->fam[i].head, *next;
        for (; s != NULL; s = next) {
            next = s->next;
            free(s);
        }
    }
    free(m->slots);
    free(m->names);
    free(m);
}

int metrics_clear(struct metrics *m, enum metrics_id id)
{
    struct family *f;
    struct series *s, *next;

    if ((unsigned)id >= METRICS_NMETRICS || descs[id].type != METRICS_GAUGE ||
        m->fam[id].nlabels == 0)
        return -EINVAL;
    f = &m->fam[id];
    for (s = f->head; s != NULL; s = next) {
        next = s->next;
        free(s);
        m->nseries--;
    }
    f->head = f->tail = NULL;
    /* Linear probing has no deletion: the table is filled again. */
    memset(m->slots, 0, (m->mask + 1) * sizeof(*m->slots));
    for (size_t i = 0; i < METRICS_NMETRICS; i++)
        for (s = m->fam[i].head; s != NULL; s = s->next)
            place(m, s);
    return 0;
}

static int update(struct metrics *m, enum metrics_id id, const char *const *values, double v,
                  enum metrics_type want, int set)
{
    enum metrics_type type;
    struct series *s;
    int err = 0;

    if ((unsigned)id >= METRICS_NMETRICS || isnan(v))
        return -EINVAL;
    type = descs[id].type;
    if (want == METRICS_HISTOGRAM ? type != METRICS_HISTOGRAM
        : set                     ? type != METRICS_GAUGE
                                  : type == METRICS_HISTOGRAM)
        return -EINVAL;
    if (type == METRICS_COUNTER && v < 0)
        return -EINVAL;
    s = lookup(m, id, values, &err);
    if (s == NULL)
        return err;
    if (type == METRICS_HISTOGRAM) {
        size_t b = 0;
        while (b < NBUCKETS && v > bucket_bounds[b])
            b++;
        s->buckets[b]++;
        s->count++;
        s->value += v;
    } else if (set) {
        s->value = v;
    } else {
        s->value += v;
    }
    return 0;
}

int metrics_add(struct metrics *m, enum metrics_id id, const char *const *values, double v)
{
    return update(m, id, values, v, METRICS_COUNTER, 0);
}

int metrics_set(struct metrics *m, enum metrics_id id, const char *const *values, double v)
{
    return update(m, id, values, v, METRICS_GAUGE, 1);
}

int metrics_observe(struct metrics *m, enum metrics_id id, const char *const *values, double v)
{
    return update(m, id, values, v, METRICS_HISTOGRAM, 0);
}

double metrics_get(const struct metrics *m, enum metrics_id id, const char *const *values)
{
    const struct family *f;
    struct series *s;

    if ((unsigned)id >= METRICS_NMETRICS || descs[id].type == METRICS_HISTOGRAM)
        return NAN;
    f = &m->fam[id];
    s = *find_slot(m, series_hash(id, values, f->nlabels), id, values, f->nlabels);
    return s != NULL ? s->value : NAN;
}

size_t metrics_series_count(const struct metrics *m)
{
    return m->nseries;
}

/* Prometheus number: NaN, +Inf, -Inf or the shortest exact decimal. */
static int put_number(struct buf *out, double v)
{
    char tmp[32];
    size_t n;

    if (isnan(v))
        return buf_append(out, "NaN", 3);
    if (isinf(v))
        return v > 0 ? buf_append(out, "+Inf", 4) : buf_append(out, "-Inf", 4);
    n = metrics__dtoa(tmp, v);
    return buf_append(out, tmp, n);
}

/* Escape for a label value (\\, \", \n) or, with help=1, for HELP (\\, \n). */
static int put_escaped(struct buf *out, const char *s, int help)
{
    const char *run = s;

    for (; *s; s++) {
        const char *esc = *s == '\\' ? "\\\\" : *s == '\n' ? "\\n" : *s == '"' && !help ? "\\\"" : NULL;
        if (esc == NULL)
            continue;
        if (buf_append(out, run, (size_t)(s - run)) != 0 || buf_append(out, esc, 2) != 0)
            return -ENOMEM;
        run = s + 1;
    }
    return buf_append(out, run, (size_t)(s - run));
}

/*
 * name{l1="v1",...[,le="b"]} — `le` is appended when not NULL. Nothing is
 * written for a label-less series without le.
 */
static int put_series_name(struct buf *out, const char *name, const char *suffix,
                           const struct family *f, const struct series *s, const char *le)
{
    int rc = buf_printf(out, "%s%s", name, suffix);

    if (f->nlabels == 0 && le == NULL)
        return rc;
    rc |= buf_append(out, "{", 1);
    for (size_t i = 0; i < f->nlabels; i++) {
        rc |= buf_printf(out, "%s%s=\"", i ? "," : "", f->label_names[i]);
        rc |= put_escaped(out, s->values[i], 0);
        rc |= buf_append(out, "\"", 1);
    }
    if (le != NULL)
        rc |= buf_printf(out, "%sle=\"%s\"", f->nlabels ? "," : "", le);
    rc |= buf_append(out, "}", 1);
    return rc;
}

static int render_histogram(struct buf *out, const char *name, const struct family *f,
                            const struct series *s)
{
    uint64_t cum = 0;
    char le[32];
    int rc = 0;

    for (size_t b = 0; b <= NBUCKETS; b++) {
        cum += s->buckets[b];
        if (b < NBUCKETS)
            metrics__dtoa(le, bucket_bounds[b]);
        else
            strcpy(le, "+Inf");
        rc |= put_series_name(out, name, "_bucket", f, s, le);
        rc |= buf_printf(out, " %llu\n", (unsigned long long)cum);
    }
    rc |= put_series_name(out, name, "_sum", f, s, NULL);
    rc |= buf_append(out, " ", 1);
    rc |= put_number(out, s->value);
    rc |= buf_append(out, "\n", 1);
    rc |= put_series_name(out, name, "_count", f, s, NULL);
    rc |= buf_printf(out, " %llu\n", (unsigned long long)s->count);
    return rc;
}

int metrics_render(const struct metrics *m, struct buf *out)
{
    static const char *const type_names[] = {"counter", "gauge", "histogram"};
    int rc = 0;

    for (size_t i = 0; i < METRICS_NMETRICS && rc == 0; i++) {
        const struct family *f = &m->fam[i];
        const char *name = descs[i].name;

        rc |= buf_printf(out, "# HELP %s ", name);
        rc |= put_escaped(out, descs[i].help, 1);
        rc |= buf_printf(out, "\n# TYPE %s %s\n", name, type_names[descs[i].type]);
        for (const struct series *s = f->head; s != NULL && rc == 0; s = s->next) {
            if (descs[i].type == METRICS_HISTOGRAM) {
                rc |= render_histogram(out, name, f, s);
                continue;
            }
            rc |= put_series_name(out, name, "", f, s, NULL);
            rc |= buf_append(out, " ", 1);
            rc |= put_number(out, s->value);
            rc |= buf_append(out, "\n", 1);
        }
    }
    return rc ? -ENOMEM : 0;
}
