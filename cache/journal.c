/*
 * cache/journal.c: charges made while Redis was unreachable, kept in memory
 * until the Redis store writes them back.
 *
 * Charges with no Redis reservation attached (the bulk of an outage: local
 * reservations settled locally) are merged per tenant, day and month, so
 * the journal stays as small as the number of tenants however long the
 * outage. Charges that must also drop a Redis reservation keep one entry
 * each; there are at most as many as reservations open when Redis went
 * away. A "conditional" entry is one whose first write may have reached
 * Redis (its reply was lost): the write-back then charges only if Redis
 * still knows the reservation, so it is not counted twice. A charge with no
 * reservation has nothing Redis could know it by but the id it was sent
 * with (cache_op.charge_id, jentry.id): Redis records the ids it applied
 * and skips one it has seen. A conditional entry is never merged into, as
 * its amount must stay the one sent under its id.
 *
 * Redis forgets an applied id after the grace period, so a conditional
 * entry without a reservation remembers when it may first have been
 * applied (since_ms); the write-back gives up on one older than that
 * window rather than charge it twice (redis.c, too_late_to_check). Each
 * entry also names the instance whose ids it carries (origin): its own, or
 * for entries loaded from the journal file, the router that saved them.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cache/internal.h"
#include "common/log.h"
#include "common/util.h"

/* Aggregation key: tenant, NUL, day, month. */
static size_t agg_key(char *out, const char *tenant, const struct cache__period *p)
{
    size_t n = strlen(tenant);

    memcpy(out, tenant, n + 1);
    memcpy(out + n + 1, &p->day, sizeof(p->day));
    memcpy(out + n + 1 + sizeof(p->day), &p->month, sizeof(p->month));
    return n + 1 + sizeof(p->day) + sizeof(p->month);
}

static void append(struct cache__journal *j, struct cache__jentry *e)
{
    e->next = NULL;
    if (j->tail)
        j->tail->next = e;
    else
        j->head = e;
    j->tail = e;
    j->count++;
    j->amount = cache__sat_add(j->amount, e->real);
}

static int mergeable(const struct cache__jentry *e)
{
    return e->seq == 0 && !e->conditional && !e->apart;
}

/* Merge `real` into the tenant+period slot if there is one; 1 if merged. */
static int merge(struct cache__journal *j, const char *tenant, const struct cache__period *p,
                 int64_t real)
{
    char key[CACHE_TENANT_MAX + 16];
    struct cache__map_entry *s = cache__map_find(&j->agg, key, agg_key(key, tenant, p));

    if (s == NULL)
        return 0;
    ((struct cache__jentry *)s->value)->real =
        cache__sat_add(((struct cache__jentry *)s->value)->real, real);
    j->amount = cache__sat_add(j->amount, real);
    return 1;
}

/* Give a mergeable entry its aggregation slot (best effort). */
static void index_entry(struct cache__journal *j, struct cache__jentry *e)
{
    char key[CACHE_TENANT_MAX + 16];

    e->agg = cache__map_add(&j->agg, key, agg_key(key, e->tenant, &e->period));
    if (e->agg)
        e->agg->value = e;
}

int cache__journal_add(struct cache__journal *j, const char *tenant,
                       const struct cache__period *p, int64_t real, uint64_t seq,
                       int64_t res_amount, uint64_t id, int conditional)
{
    struct cache__jentry *e;
    size_t n = strlen(tenant);

    if (seq == 0 && id == 0)
        conditional = 0; /* nothing to check against: charge at least once */
    if (seq == 0 && !conditional && merge(j, tenant, p, real))
        return 0;
    if (j->max > 0 && j->count >= j->max) {
        j->dropped++;
        j->dropped_amount = cache__sat_add(j->dropped_amount, real);
        if (!j->full_logged)
            log_error("store journal: full (%zu entries): an entry of %lld micro-dollars of "
                      "tenant %s is not journaled, nor those after it that merge into no entry "
                      "(counted in costrouter_store_journal_dropped_total): kept in this "
                      "instance's counters, lost to Redis's (the cost log has them)",
                      j->count, (long long)real, tenant);
        j->full_logged = 1;
        return -ENOSPC;
    }
    e = malloc(sizeof(*e) + n + 1);
    if (e == NULL) {
        log_error("store journal: out of memory, %lld micro-dollars lost", (long long)real);
        return -ENOMEM;
    }
    memcpy(e->tenant, tenant, n + 1);
    e->period = *p;
    e->real = real;
    e->seq = seq;
    e->res_amount = res_amount;
    e->id = seq == 0 ? id : 0;
    e->conditional = 0;
    e->apart = 0;
    e->since_ms = 0;
    if (conditional)
        cache__journal_mark_conditional(e);
    memcpy(e->origin, j->instance, sizeof(e->origin));
    e->agg = NULL;
    if (mergeable(e))
        index_entry(j, e);
    append(j, e);
    return 0;
}

struct cache__jentry *cache__journal_pop(struct cache__journal *j)
{
    struct cache__jentry *e = j->head;

    if (e == NULL)
        return NULL;
    j->head = e->next;
    if (j->head == NULL)
        j->tail = NULL;
    if (e->agg) {
        cache__map_del(&j->agg, e->agg);
        e->agg = NULL;
    }
    if (--j->count == 0)
        j->full_logged = 0;
    j->amount = MAX(j->amount - e->real, 0); /* a sum held at INT64_MAX lost some */
    e->next = NULL;
    return e;
}

void cache__journal_mark_conditional(struct cache__jentry *e)
{
    if (e->conditional)
        return; /* it may have been applied since it first went out */
    e->conditional = 1;
    e->since_ms = cache__wall_ms();
}

void cache__journal_readd(struct cache__journal *j, struct cache__jentry *e, int conditional)
{
    if (conditional && (e->seq != 0 || e->id != 0))
        cache__journal_mark_conditional(e);
    if (mergeable(e) && merge(j, e->tenant, &e->period, e->real)) {
        free(e);
        return;
    }
    if (mergeable(e))
        index_entry(j, e);
    append(j, e);
}

void cache__journal_free(struct cache__journal *j)
{
    struct cache__jentry *e;

    /* Only cache_close() gets here with entries: stopped while Redis was
     * away or refused writes, with no journal file (or one that could not
     * be written). Those charges are lost to Redis (the cost log still has
     * them), which whoever reconciles spend must hear. */
    if (j->count > 0)
        log_error("store journal: %zu entries (%lld micro-dollars) not written back to Redis: "
                  "lost from the shared spend (the cost log has them)",
                  j->count, (long long)j->amount);
    while ((e = cache__journal_pop(j)) != NULL)
        free(e);
    cache__map_free(&j->agg, NULL);
}
