/*
 * cache/sfile.c: the in-process store's spend kept across a restart
 * (store.spend_file).
 *
 * The in-process store counts each tenant's (and each budgeted key's) day
 * and month spend in memory. Without a file, a restart (a deploy, a crash,
 * a new binary) would start every budget from zero: a monthly budget
 * restarted on the 20th could be spent again. With one, the store saves
 * the counters there once a second while they change, and at the stop;
 * the next start loads those of the current day and month. So a stop
 * (SIGTERM) loses nothing, and a router killed or crashing loses at most
 * its last second of spend from its budgets (never from the cost log).
 * Open reservations are not saved: their requests end with the process.
 *
 * Format: one JSON object per line. The first is a header
 *   {"costrouter_spend":1,"saved_ms":T,"subjects":N,
 *    "day_micro_usd":SUM,"month_micro_usd":SUM}
 * then N lines, one per tenant or key's own budget ("TENANT#NAME")
 *   {"subject":"acme","day":"2026-12-07","day_micro_usd":40,"month_micro_usd":900}
 * where `day` is the day the counters were saved on: day_micro_usd is that
 * day's spend, month_micro_usd that day's month's. A file that does not
 * read back whole (cut short, edited wrong) stops the start, saying where:
 * starting from zero instead is exactly what the file is there to prevent.
 *
 * Saving: the text is built on the loop (a line per subject that spent
 * this month, once a second at most: never per request), then written off
 * the loop on libuv's thread pool as a temporary file, fsync'd and renamed
 * over the old one, so a crash mid-save leaves the old file whole. One
 * save at a time; while one is out, changes wait for the next tick. The
 * stop's save runs on the loop's thread once every handle is closed, when
 * nothing is served any more.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache/internal.h"
#include "common/buf.h"
#include "common/log.h"

#define SFILE_VERSION 1
#define SFILE_SAVE_MS 1000  /* a crash loses at most this much of the spend */

/* ---- saving ---- */

struct sfile_text {
    struct buf body;   /* the subject lines */
    size_t subjects;   /* how many */
    int64_t day_sum;   /* their day_micro_usd */
    int64_t month_sum; /* their month_micro_usd */
};

static int subject_line(void *arg, const char *subject, const struct cache__period *p,
                        int64_t day_spent, int64_t month_spent)
{
    struct sfile_text *t = arg;
    cJSON *o = cJSON_CreateObject();
    char day[16], *text = NULL;
    int rc = -1;

    cache__file_day_text(p, day);
    if (o != NULL && cJSON_AddStringToObject(o, "subject", subject) &&
        cJSON_AddStringToObject(o, "day", day) &&
        cache__file_add_int(o, "day_micro_usd", day_spent) == 0 &&
        cache__file_add_int(o, "month_micro_usd", month_spent) == 0)
        text = cJSON_PrintUnformatted(o);
    if (text != NULL && buf_append(&t->body, text, strlen(text)) == 0 &&
        buf_append_lit(&t->body, "\n") == 0) {
        t->subjects++;
        t->day_sum = cache__sat_add(t->day_sum, day_spent);
        t->month_sum = cache__sat_add(t->month_sum, month_spent);
        rc = 0;
    }
    free(text);
    cJSON_Delete(o);
    return rc;
}

/* The whole file into `out`: header, then a line per subject. -1 on no
 * memory. */
static int file_text(struct cache *c, struct buf *out)
{
    struct sfile_text t = {0};
    int rc = -1;

    if (cache__local_each(&c->local, subject_line, &t) == 0 &&
        buf_printf(out, "{\"costrouter_spend\":%d,\"saved_ms\":%lld,\"subjects\":%zu,"
                        "\"day_micro_usd\":%lld,\"month_micro_usd\":%lld}\n",
                   SFILE_VERSION, (long long)cache__wall_ms(), t.subjects,
                   (long long)t.day_sum, (long long)t.month_sum) >= 0 &&
        buf_append(out, t.body.data, t.body.len) == 0)
        rc = 0;
    buf_free(&t.body);
    return rc;
}

/* A save out on the thread pool. */
struct sfile_save {
    uv_work_t work;  /* its data: this */
    struct cache *c; /* whose file (c->sfile stays until every save is back) */
    struct buf text; /* what to write */
    int err;         /* errno of the write, 0: written */
};

static void save_failed(struct cache *c, const char *why)
{
    c->sfile_dirty = 1; /* the next tick tries again */
    if (!c->sfile_failing)
        log_error("store.spend_file %s: cannot write it: %s (retried every second; until it is "
                  "written, a restart would forget the spend since the last save)",
                  c->sfile, why);
    c->sfile_failing = 1;
}

static void save_saved(struct cache *c)
{
    if (c->sfile_failing)
        log_info("store.spend_file %s: written again", c->sfile);
    c->sfile_failing = 0;
}

/* On a thread of the pool: nothing of the store is touched here. */
static void save_work(uv_work_t *w)
{
    struct sfile_save *s = w->data;

    s->err = cache__file_replace(s->c->sfile, s->text.data, s->text.len) < 0 ? errno : 0;
}

static void save_done(uv_work_t *w, int status)
{
    struct sfile_save *s = w->data;
    struct cache *c = s->c;

    c->sfile_work = NULL;
    if (status < 0)
        save_failed(c, uv_strerror(status));
    else if (s->err != 0)
        save_failed(c, strerror(s->err));
    else
        save_saved(c);
    buf_free(&s->text);
    free(s);
    cache__handle_closed(c); /* counted when queued: the store may be freed here */
}

static void tick(uv_timer_t *t)
{
    struct cache *c = t->data;
    struct sfile_save *s;
    int rc;

    if (!c->sfile_dirty || c->sfile_work != NULL)
        return;
    s = calloc(1, sizeof(*s));
    if (s == NULL || file_text(c, &s->text) < 0) {
        if (s != NULL)
            buf_free(&s->text);
        free(s);
        save_failed(c, strerror(ENOMEM));
        return;
    }
    s->c = c;
    s->work.data = s;
    c->sfile_dirty = 0; /* what changes from now on goes in the next save */
    rc = uv_queue_work(c->loop, &s->work, save_work, save_done);
    if (rc < 0) {
        buf_free(&s->text);
        free(s);
        save_failed(c, uv_strerror(rc));
        return;
    }
    c->sfile_work = s;
    c->handles_open++;
}

/* ---- loading ---- */

struct sfile_load {
    struct cache *c;
    int64_t subjects;       /* the header's */
    int64_t day_sum;        /* the header's */
    int64_t month_sum;      /* the header's */
    int64_t n;              /* lines read after the header */
    int64_t day_total;      /* their day_micro_usd */
    int64_t month_total;    /* their month_micro_usd */
    int64_t day_loaded;     /* of those, today's */
    int64_t month_loaded;   /* this month's */
};

static const char *parse_header(struct sfile_load *l, const cJSON *o, const struct yajl_val_s *exact)
{
    int64_t version;

    if (cache__file_get_int(o, exact, "costrouter_spend", &version) < 0 ||
        version != SFILE_VERSION || cache__file_get_int(o, exact, "subjects", &l->subjects) < 0 ||
        cache__file_get_int(o, exact, "day_micro_usd", &l->day_sum) < 0 ||
        cache__file_get_int(o, exact, "month_micro_usd", &l->month_sum) < 0)
        return "not a costrouter spend file header (version 1)";
    return NULL;
}

static const char *parse_subject(struct sfile_load *l, const cJSON *o, const struct yajl_val_s *exact)
{
    const cJSON *subject = cJSON_GetObjectItemCaseSensitive(o, "subject");
    const cJSON *day = cJSON_GetObjectItemCaseSensitive(o, "day");
    struct cache__period saved, now;
    int64_t day_spent, month_spent;
    size_t n;

    if (!cJSON_IsString(subject) || !cJSON_IsString(day) ||
        cache__file_get_int(o, exact, "day_micro_usd", &day_spent) < 0 ||
        cache__file_get_int(o, exact, "month_micro_usd", &month_spent) < 0)
        return "not a spend line (subject, day, day_micro_usd, month_micro_usd)";
    n = strlen(subject->valuestring);
    if (n == 0 || n > CACHE_TENANT_MAX)
        return "bad subject";
    if (cache__file_parse_day(day->valuestring, &saved) < 0)
        return "bad day (YYYY-MM-DD)";
    if (day_spent > month_spent)
        return "day_micro_usd above month_micro_usd (a day's spend is in its month's)";
    /* The store is empty before the load: a subject it has came earlier. */
    if (cache__map_find(&l->c->local.tenants, subject->valuestring, n) != NULL)
        return "subject named twice";
    if (cache__local_restore(&l->c->local, subject->valuestring, &saved, day_spent,
                             month_spent) < 0)
        return strerror(ENOMEM);
    l->n++;
    l->day_total = cache__sat_add(l->day_total, day_spent);
    l->month_total = cache__sat_add(l->month_total, month_spent);
    cache__period_now(&now);
    l->day_loaded = cache__sat_add(l->day_loaded, saved.day == now.day ? day_spent : 0);
    l->month_loaded = cache__sat_add(l->month_loaded, saved.month == now.month ? month_spent : 0);
    return NULL;
}

/* Line `lineno` (1 is the header): NULL, or what is wrong with it. */
static const char *load_object(void *arg, const cJSON *o, const struct yajl_val_s *exact, size_t lineno)
{
    return lineno == 1 ? parse_header(arg, o, exact) : parse_subject(arg, o, exact);
}

static int load(struct sfile_load *l, FILE *f)
{
    size_t lineno;
    const char *why = cache__file_each_object(f, load_object, l, &lineno);

    if (why == NULL && (lineno == 0 || l->n != l->subjects || l->day_total != l->day_sum ||
                        l->month_total != l->month_sum)) {
        why = "subjects or sums differ from the header's (cut short?)";
        lineno = lineno ? 1 : 0;
    }
    if (why == NULL)
        return 0;
    log_error("store.spend_file %s:%zu: %s; the router does not start: it would forget the "
              "day's and month's spend (repair the file, or move it aside and know that budgets "
              "then start from zero; the cost log has every request)",
              l->c->sfile, lineno, why);
    return -1;
}

/* ---- the store's side ---- */

static void open_failed(struct cache *c)
{
    if (c->sfile_lock >= 0)
        close(c->sfile_lock);
    c->sfile_lock = -1;
}

int cache__sfile_open(struct cache *c)
{
    struct sfile_load l = {.c = c};
    FILE *f;
    int rc = 0;

    c->sfile_lock = cache__file_lock(c->sfile, "store.spend_file");
    if (c->sfile_lock < 0)
        return -1;
    f = fopen(c->sfile, "re");
    if (f == NULL && errno != ENOENT) {
        log_error("store.spend_file %s: cannot read it: %s", c->sfile, strerror(errno));
        open_failed(c);
        return -1;
    }
    if (f != NULL) {
        rc = load(&l, f);
        fclose(f);
        if (rc < 0) {
            open_failed(c);
            return -1;
        }
        log_info("store: spend loaded from %s: %lld subjects, today %lld micro-dollars, this "
                 "month %lld",
                 c->sfile, (long long)l.n, (long long)l.day_loaded, (long long)l.month_loaded);
    }
    uv_timer_init(c->loop, &c->sfile_timer);
    c->sfile_timer.data = c;
    uv_timer_start(&c->sfile_timer, tick, SFILE_SAVE_MS, SFILE_SAVE_MS);
    uv_unref((uv_handle_t *)&c->sfile_timer);
    c->handles_open++;
    return 0;
}

static void timer_closed(uv_handle_t *h)
{
    cache__handle_closed(h->data);
}

void cache__sfile_stop(struct cache *c)
{
    uv_close((uv_handle_t *)&c->sfile_timer, timer_closed);
}

void cache__sfile_close(struct cache *c)
{
    struct buf text = {0};

    if (c->sfile_dirty) {
        int rc = file_text(c, &text);

        if (rc < 0)
            errno = ENOMEM;
        else
            rc = cache__file_replace(c->sfile, text.data, text.len);
        if (rc < 0)
            log_error("store.spend_file %s: cannot write it at the stop: %s (the next start "
                      "counts from its last save)",
                      c->sfile, strerror(errno));
        else
            log_info("store: spend saved to %s", c->sfile);
        buf_free(&text);
    }
    if (c->sfile_lock >= 0)
        close(c->sfile_lock);
    c->sfile_lock = -1;
}
