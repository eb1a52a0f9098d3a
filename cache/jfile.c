/*
 * cache/jfile.c: the journal kept across a stop (store.journal_file).
 *
 * A router stopped while Redis is down or refusing writes would lose the
 * journal's charges from Redis. With a journal file, the close saves them
 * there, and the next start loads them back into the journal, to be written
 * back when Redis answers like any other entry. The file goes once they
 * are all in Redis (journal empty, no write-back out), or is replaced by
 * the next stop's save. A router killed (SIGKILL, a crash) loses what only
 * its memory held, as without a file: it never reaches the save.
 *
 * Format: one JSON object per line. The first is a header
 *   {"costrouter_journal":1,"saved_ms":T,"entries":N,"micro_usd":SUM,"redis_epoch":"MARK"}
 * (MARK: Redis's PREFIXepoch when the entries were sent, "" unknown; see
 * redis.c's epoch_read; optional on load)
 * then N entries
 *   {"tenant":"acme","day":"2026-12-04","micro_usd":40,"origin":"<16 hex>",
 *    "id":7 | "seq":3,"reserved_micro_usd":100, "conditional":true,"since_ms":T}
 * The header's count and sum must match the entries: a file cut short or
 * edited wrong is refused (the router does not start, saying where), never
 * half loaded: its money would be silently gone otherwise. Saved as a
 * temporary file, fsync'd and renamed over the old one, so a crash during
 * the save leaves the old file whole.
 *
 * Why each entry is written back at most once. An entry is re-checked by
 * Redis with what it was sent with, which is why it keeps its origin (the
 * instance id that saved it) rather than taking the new router's:
 * - with a reservation (seq): charged only if Redis still holds the
 *   member "ORIGIN-SEQ:AMOUNT" (open or expired); charging drops it, so a
 *   second send finds nothing and charges nothing. The worst a late write-
 *   back does is charge nothing (the reservation was forgotten: lost from
 *   Redis, never doubled).
 * - without one: sent with its id "ORIGIN-ID", skipped if Redis applied
 *   that id within the grace period. Every entry saved has an id (one is
 *   given at save to those never sent), so a reloaded one is recognised.
 *   Past the grace period Redis has forgotten the id: a conditional entry
 *   (maybe applied) older than that is dropped and logged, not sent (see
 *   redis.c, too_late_to_check).
 * A crash after the load and before the file is removed loads it again,
 * after some entries may have been written back. So the load saves the
 * file again with every entry conditional (charged only if Redis does not
 * know it yet), and in memory the id entries are kept apart from the load
 * on (never merged with others, which would send their money under another
 * id), conditional once this router sent them, or if they were so in the
 * file; reservation entries keep their flag in memory, where it is exact.
 *
 * File access blocks the loop: it happens at start (cache_create) and at
 * the end (cache_close), never per request.
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

#define JFILE_VERSION 1

/* ---- saving ---- */

/* One entry as a JSON line appended to `out`; -1 on no memory. */
static int entry_line(struct buf *out, const struct cache__jentry *e, int all_conditional)
{
    cJSON *o = cJSON_CreateObject();
    char day[16], *text;
    int rc = -1;
    int conditional = e->conditional || all_conditional;
    /* Not conditional until now: nothing of it was applied before this. */
    int64_t since = e->conditional ? e->since_ms : cache__wall_ms();

    cache__file_day_text(&e->period, day);
    if (o == NULL || !cJSON_AddStringToObject(o, "tenant", e->tenant) ||
        !cJSON_AddStringToObject(o, "day", day) ||
        cache__file_add_int(o, "micro_usd", e->real) < 0 ||
        !cJSON_AddStringToObject(o, "origin", e->origin))
        goto out;
    /* Integers in full: through a double, one past 2^53 was rounded */
    if (e->seq != 0 ? cache__file_add_int(o, "seq", (int64_t)e->seq) < 0 ||
                          cache__file_add_int(o, "reserved_micro_usd", e->res_amount) < 0
                    : cache__file_add_int(o, "id", (int64_t)e->id) < 0)
        goto out;
    if (!cJSON_AddBoolToObject(o, "conditional", conditional))
        goto out;
    if (conditional && cache__file_add_int(o, "since_ms", since) < 0)
        goto out;
    text = cJSON_PrintUnformatted(o);
    if (text != NULL) {
        rc = buf_append(out, text, strlen(text)) < 0 || buf_append_lit(out, "\n") < 0 ? -1 : 0;
        free(text);
    }
out:
    cJSON_Delete(o);
    return rc;
}

/* The whole file: header, then the entries. */
static int file_text(struct buf *out, const struct cache__journal *j, const char *epoch,
                     int all_conditional)
{
    if (buf_printf(out, "{\"costrouter_journal\":%d,\"saved_ms\":%lld,\"entries\":%zu,"
                        "\"micro_usd\":%lld,\"redis_epoch\":\"%s\"}\n",
                   JFILE_VERSION, (long long)cache__wall_ms(), j->count, (long long)j->amount,
                   epoch) < 0)
        return -1;
    for (const struct cache__jentry *e = j->head; e; e = e->next)
        if (entry_line(out, e, all_conditional) < 0)
            return -1;
    return 0;
}

/* Save the journal to the file; `all_conditional`: mark every entry as
 * possibly applied (the load's copy, see the top). 0 or -1 (logged). */
static int save(struct cache *c, int all_conditional)
{
    struct buf text = {0};
    int rc;

    /* An id for every entry never sent: written back after a reload
     * that may be repeated, it must be known by one. */
    for (struct cache__jentry *e = c->journal.head; e; e = e->next)
        if (e->seq == 0 && e->id == 0)
            e->id = ++c->seq;
    rc = file_text(&text, &c->journal, c->redis_epoch, all_conditional);
    if (rc < 0)
        errno = ENOMEM;
    else
        rc = cache__file_replace(c->jfile, text.data, text.len);
    if (rc < 0)
        log_error("store.journal_file %s: cannot write it: %s", c->jfile, strerror(errno));
    buf_free(&text);
    return rc;
}

/* ---- loading ---- */

static int is_origin(const char *s)
{
    size_t n = strspn(s, "0123456789abcdef");

    return n == 16 && s[n] == '\0';
}

/* The entry a line describes, or NULL with *why saying what is wrong. */
static struct cache__jentry *parse_entry(const cJSON *o, const struct yajl_val_s *exact, const char **why)
{
    const cJSON *tenant = cJSON_GetObjectItemCaseSensitive(o, "tenant");
    const cJSON *day = cJSON_GetObjectItemCaseSensitive(o, "day");
    const cJSON *origin = cJSON_GetObjectItemCaseSensitive(o, "origin");
    const cJSON *cond = cJSON_GetObjectItemCaseSensitive(o, "conditional");
    struct cache__jentry *e;
    struct cache__period p;
    int64_t real, seq = 0, res = 0, id = 0, since = 0;
    size_t n;

    *why = "not a journal entry";
    if (!cJSON_IsString(tenant) || !cJSON_IsString(day) || !cJSON_IsString(origin) ||
        !cJSON_IsBool(cond) || cache__file_get_int(o, exact, "micro_usd", &real) < 0)
        return NULL;
    n = strlen(tenant->valuestring);
    if (n == 0 || n > CACHE_TENANT_MAX)
        return *why = "bad tenant", NULL;
    if (cache__file_parse_day(day->valuestring, &p) < 0)
        return *why = "bad day (YYYY-MM-DD)", NULL;
    if (!is_origin(origin->valuestring))
        return *why = "bad origin (16 hex digits)", NULL;
    if (cJSON_HasObjectItem(o, "seq")
            ? cache__file_get_int(o, exact, "seq", &seq) < 0 || seq == 0 ||
                  cache__file_get_int(o, exact, "reserved_micro_usd", &res) < 0
            : cache__file_get_int(o, exact, "id", &id) < 0 || id == 0)
        return *why = "needs a seq and reserved_micro_usd, or an id (each > 0)", NULL;
    if (cJSON_IsTrue(cond) && cache__file_get_int(o, exact, "since_ms", &since) < 0)
        return *why = "a conditional entry needs since_ms", NULL;
    e = calloc(1, sizeof(*e) + n + 1);
    if (e == NULL)
        return *why = "out of memory", NULL;
    memcpy(e->tenant, tenant->valuestring, n + 1);
    memcpy(e->origin, origin->valuestring, sizeof(e->origin));
    e->period = p;
    e->real = real;
    e->seq = (uint64_t)seq;
    e->res_amount = res;
    e->id = (uint64_t)id;
    e->conditional = cJSON_IsTrue(cond);
    e->since_ms = since;
    /* See the top: its id may be applied from now on, so it keeps its
     * amount; but not before this router sends it (a file marks what a
     * router sent, and the load's copy all of it), so Redis's grace
     * period counts from that send, not from now. */
    if (e->seq == 0)
        e->apart = 1;
    *why = NULL;
    return e;
}

/* The header's entry count and sum, or -1; the mark of the Redis its
 * entries went to ("redis_epoch", optional: "" unknown) into `epoch`. */
static int parse_header(const cJSON *o, const struct yajl_val_s *exact, int64_t *count, int64_t *sum,
                        char epoch[sizeof(((struct cache *)0)->redis_epoch)])
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(o, "redis_epoch");
    int64_t version;

    if (cache__file_get_int(o, exact, "costrouter_journal", &version) < 0 ||
        version != JFILE_VERSION || cache__file_get_int(o, exact, "entries", count) < 0 ||
        cache__file_get_int(o, exact, "micro_usd", sum) < 0)
        return -1;
    if (cJSON_IsString(e) && strlen(e->valuestring) < sizeof(((struct cache *)0)->redis_epoch))
        strcpy(epoch, e->valuestring);
    return 0;
}

/* What the header says, as the load reads it. */
struct jfile_load {
    struct cache *c;
    int64_t count; /* the header's entries */
    int64_t sum;   /* the header's micro_usd */
};

/* Line `lineno` (1 is the header) into the journal. NULL or what is wrong. */
static const char *load_object(void *arg, const cJSON *o, const struct yajl_val_s *exact, size_t lineno)
{
    struct jfile_load *l = arg;
    struct cache__jentry *e;
    const char *why = NULL;

    if (lineno == 1)
        return parse_header(o, exact, &l->count, &l->sum, l->c->redis_epoch) < 0
                   ? "not a costrouter journal header (version 1)"
                   : NULL;
    e = parse_entry(o, exact, &why);
    if (e) {
        /* Not in Redis yet, as far as this router knows (see redis.c's
         * local counters while Redis is away). */
        cache__local_unconfirmed(&l->c->local, e->tenant, &e->period, e->real);
        cache__journal_readd(&l->c->journal, e, 0);
    }
    return why;
}

/* Load `f` (the file) into the journal; 0 or -1 (logged). */
static int load(struct cache *c, FILE *f)
{
    struct jfile_load l = {.c = c, .count = -1};
    size_t lineno;
    const char *why = cache__file_each_object(f, load_object, &l, &lineno);

    if (why == NULL && (lineno == 0 || (int64_t)c->journal.count != l.count ||
                        c->journal.amount != l.sum)) {
        why = "entries or micro_usd differ from the header's (cut short?)";
        lineno = lineno ? 1 : 0;
    }
    if (why == NULL)
        return 0;
    log_error("store.journal_file %s:%zu: %s; the router does not start: its charges are not in "
              "Redis yet (repair the file, or move it aside and reconcile from the cost log)",
              c->jfile, lineno, why);
    return -1;
}

/* ---- the store's side ---- */

/* Drop the journal's entries without a word: the file has them. */
static void journal_forget(struct cache__journal *j)
{
    struct cache__jentry *e;

    while ((e = cache__journal_pop(j)) != NULL)
        free(e);
}

/* Undo a failed open: the file stays as it is, the store does not use it. */
static int open_failed(struct cache *c)
{
    journal_forget(&c->journal);
    if (c->jfile_lock >= 0)
        close(c->jfile_lock);
    c->jfile_lock = -1;
    free(c->jfile);
    c->jfile = NULL;
    c->opts.journal_file = NULL;
    return -1;
}

int cache__jfile_open(struct cache *c)
{
    FILE *f;
    int rc;

    /* Two routers writing one file would each replace the other's charges. */
    c->jfile_lock = cache__file_lock(c->jfile, "store.journal_file");
    if (c->jfile_lock < 0)
        return open_failed(c);
    f = fopen(c->jfile, "re");
    if (f == NULL && errno == ENOENT)
        return 0;
    if (f == NULL) {
        log_error("store.journal_file %s: cannot read it: %s", c->jfile, strerror(errno));
        return open_failed(c);
    }
    rc = load(c, f);
    fclose(f);
    if (rc < 0 || save(c, 1) < 0)
        return open_failed(c);
    c->jfile_held = 1;
    log_warn("store: %zu journaled charges (%lld micro-dollars) loaded from %s, to be written "
             "back to Redis",
             c->journal.count, (long long)c->journal.amount, c->jfile);
    return 0;
}

void cache__jfile_written_back(struct cache *c)
{
    if (!c->jfile_held)
        return;
    c->jfile_held = 0;
    if (unlink(c->jfile) < 0 && errno != ENOENT)
        log_error("store.journal_file %s: cannot remove it: %s", c->jfile, strerror(errno));
    else
        log_info("store: the charges loaded from %s are written back; file removed", c->jfile);
}

void cache__jfile_close(struct cache *c)
{
    if (c->journal.count > 0 && save(c, 0) == 0) {
        log_warn("store: %zu journaled charges (%lld micro-dollars) not written back to Redis: "
                 "saved to %s for the next start",
                 c->journal.count, (long long)c->journal.amount, c->jfile);
        journal_forget(&c->journal);
    } else if (c->journal.count == 0) {
        cache__jfile_written_back(c);
    }
    if (c->jfile_lock >= 0)
        close(c->jfile_lock);
    c->jfile_lock = -1;
}
