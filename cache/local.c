/*
 * cache/local.c: the in-process store. Spend counters, reservations and
 * cached responses in this process's memory: the single-instance default,
 * and the fallback the Redis store serves from while Redis is unreachable
 * (fail_open).
 *
 * Each tenant keeps its open reservations in a ring ordered by sequence
 * number. Every reservation lives for the same TTL, so that order is also
 * expiry order: expired and settled ones are dropped from the head, and a
 * settle finds its reservation by binary search. Cached values are kept in
 * insertion order and the oldest are evicted past the byte budget.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cache/internal.h"
#include "common/error.h"
#include "common/util.h"

/* One open reservation; amount < 0 once settled. */
struct local_res {
    uint64_t seq;     /* reservation number */
    int64_t amount;   /* held micro-dollars, -1 when settled */
    uint64_t expires; /* monotonic ms */
};

struct local_tenant {
    struct cache__period period; /* the day and month counted below */
    int64_t day_spent;           /* settled today */
    int64_t month_spent;         /* settled this month */
    int64_t reserved;            /* sum of open reservations */
    int64_t remote;              /* sum of our holds in Redis (cache__local_hold_remote) */
    int64_t base_day;            /* day_spent as Redis last answered it (cache__local_sync) */
    int64_t base_month;          /* month_spent likewise */
    int64_t others;              /* what other instances held in Redis then */
    int64_t unconfirmed_day;     /* our charges of this day sent and not answered, journaled
                                  * or being written back: not in what Redis answers
                                  * (cache__local_unconfirmed) */
    int64_t unconfirmed_month;   /* of this month likewise */
    int64_t settling;            /* our holds in Redis whose settle is queued or sent and not
                                  * answered: Redis's answers to calls before it still count
                                  * them, while their charges are unconfirmed already */
    struct local_res *ring;      /* open reservations by seq */
    size_t cap;                  /* ring slots (power of two) */
    size_t head;                 /* index of the oldest */
    size_t count;                /* reservations in the ring */
};

struct cache__local_entry {
    struct cache__map_entry *slot;   /* our slot in local.entries */
    struct cache__local_entry *prev; /* older */
    struct cache__local_entry *next; /* newer */
    uint64_t expires;                /* monotonic ms */
    size_t len;                      /* value bytes */
    char data[];                     /* the value */
};

void cache__local_init(struct cache__local *l, size_t max_bytes, int64_t reservation_ttl_ms)
{
    memset(l, 0, sizeof(*l));
    l->max_bytes = max_bytes;
    l->ttl_ms = reservation_ttl_ms;
}

static void tenant_free(void *p)
{
    struct local_tenant *t = p;

    if (t != NULL)
        free(t->ring);
    free(t);
}

void cache__local_free(struct cache__local *l)
{
    cache__map_free(&l->tenants, tenant_free);
    cache__map_free(&l->entries, free);
    l->oldest = l->newest = NULL;
    l->bytes = 0;
}

static struct local_res *ring_at(struct local_tenant *t, size_t i)
{
    return &t->ring[(t->head + i) & (t->cap - 1)];
}

/* Drop settled and expired reservations from the head; roll the periods. */
static void tenant_refresh(struct local_tenant *t)
{
    struct cache__period now;
    uint64_t ms = cache__mono_ms();

    while (t->count > 0) {
        struct local_res *r = ring_at(t, 0);
        if (r->amount >= 0 && r->expires > ms)
            break;
        if (r->amount >= 0) /* never below 0: a sum held at INT64_MAX lost some */
            t->reserved = MAX(t->reserved - r->amount, 0);
        t->head = (t->head + 1) & (t->cap - 1);
        t->count--;
    }
    cache__period_now(&now);
    if (now.day != t->period.day)
        t->day_spent = t->base_day = t->unconfirmed_day = 0;
    if (now.month != t->period.month)
        t->month_spent = t->base_month = t->unconfirmed_month = 0;
    t->period = now;
}

static struct local_tenant *tenant_get(struct cache__local *l, const char *id)
{
    size_t len = strlen(id);
    struct cache__map_entry *e = cache__map_find(&l->tenants, id, len);
    struct local_tenant *t;

    if (e == NULL) {
        t = calloc(1, sizeof(*t));
        if (t == NULL)
            return NULL;
        e = cache__map_add(&l->tenants, id, len);
        if (e == NULL) {
            free(t);
            return NULL;
        }
        e->value = t;
        cache__period_now(&t->period);
    }
    t = e->value;
    tenant_refresh(t);
    return t;
}

/* Money held by requests in flight: here, and ours in Redis. */
static int64_t held(const struct local_tenant *t)
{
    return cache__sat_add(t->reserved, t->remote);
}

static int ring_push(struct local_tenant *t, uint64_t seq, int64_t amount, uint64_t expires)
{
    if (t->count == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 8;
        struct local_res *ring = malloc(cap * sizeof(*ring));
        if (ring == NULL)
            return -ENOMEM;
        for (size_t i = 0; i < t->count; i++)
            ring[i] = *ring_at(t, i);
        free(t->ring);
        t->ring = ring;
        t->cap = cap;
        t->head = 0;
    }
    *ring_at(t, t->count) = (struct local_res){seq, amount, expires};
    t->count++;
    return 0;
}

static void entry_unlink(struct cache__local *l, struct cache__local_entry *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        l->oldest = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        l->newest = e->prev;
    l->bytes -= e->len;
    cache__map_del(&l->entries, e->slot);
    free(e);
}

/* The live entry called `name`, dropping it if expired. */
static struct cache__local_entry *entry_get(struct cache__local *l, const char *name)
{
    struct cache__map_entry *s = cache__map_find(&l->entries, name, strlen(name));
    struct cache__local_entry *e;

    if (s == NULL)
        return NULL;
    e = s->value;
    if (e->expires <= cache__mono_ms()) {
        entry_unlink(l, e);
        return NULL;
    }
    return e;
}

/*
 * The most a limit lets this instance's counters reach while it serves
 * for a Redis shared by `share` instances that it cannot reach: its part
 * of what Redis last told it was left (the limit less the spend and the
 * other instances' holds then). Alone, it can see what it spends and
 * holds itself; the others' spend since is out of sight, so each takes
 * 1/share and together they stay within what was left.
 */
static int64_t share_cap(int64_t limit, int64_t base, int64_t others, unsigned share)
{
    int64_t left = cache__sat_add(cache__sat_add(limit, -base), -others);

    return base + (left > 0 ? left / (int64_t)share : 0);
}

/* Whether `need` more on `spent` passes `limit` (0: none); `share` as in
 * cache__local_begin, `base` being what Redis last said `spent` was. */
static int passes(int64_t limit, int64_t spent, int64_t base, int64_t others, unsigned share,
                  int64_t need)
{
    if (limit <= 0)
        return 0;
    if (share > 0)
        limit = share_cap(limit, base, others, share);
    return cache__sat_add(spent, need) > limit;
}

static int over_limit(const struct local_tenant *t, int64_t amount, int64_t day_limit,
                      int64_t month_limit, unsigned share)
{
    int64_t need = cache__sat_add(held(t), amount);

    return passes(day_limit, t->day_spent, t->base_day, t->others, share, need) ||
           passes(month_limit, t->month_spent, t->base_month, t->others, share, need);
}

int cache__local_begin(struct cache__local *l, const char *tenant, const char *name,
                       int64_t amount, int64_t day_limit, int64_t month_limit, unsigned share,
                       uint64_t seq, struct cache_begin_result *r, char **value)
{
    struct local_tenant *t = tenant_get(l, tenant);
    struct cache__local_entry *e;

    if (t == NULL)
        return -ENOMEM;
    r->lookup = name ? CACHE_LOOKUP_MISS : CACHE_LOOKUP_NONE;
    r->granted = 0;
    r->day_spent = t->day_spent;
    r->month_spent = t->month_spent;
    if (name != NULL && (e = entry_get(l, name)) != NULL) {
        *value = malloc(e->len ? e->len : 1);
        if (*value == NULL)
            return -ENOMEM;
        memcpy(*value, e->data, e->len);
        r->lookup = CACHE_LOOKUP_HIT;
        r->value_len = e->len;
        r->reserved = held(t);
        return 0;
    }
    if (over_limit(t, amount, day_limit, month_limit, share)) {
        r->reserved = held(t);
        return 0;
    }
    if (ring_push(t, seq, amount, cache__mono_ms() + (uint64_t)l->ttl_ms) < 0)
        return -ENOMEM;
    t->reserved = cache__sat_add(t->reserved, amount);
    r->reserved = held(t);
    r->granted = 1;
    r->reservation.amount = amount;
    r->reservation.seq = seq;
    r->reservation.remote = 0;
    return 0;
}

int cache__local_settle(struct cache__local *l, const char *tenant, uint64_t seq, int64_t real)
{
    struct local_tenant *t = tenant_get(l, tenant);
    size_t lo = 0, hi;

    if (t == NULL)
        return -ENOMEM;
    t->day_spent = cache__sat_add(t->day_spent, real);
    t->month_spent = cache__sat_add(t->month_spent, real);
    if (seq == 0)
        return 0;
    hi = t->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ring_at(t, mid)->seq < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < t->count && ring_at(t, lo)->seq == seq && ring_at(t, lo)->amount >= 0) {
        t->reserved = MAX(t->reserved - ring_at(t, lo)->amount, 0);
        ring_at(t, lo)->amount = -1;
        tenant_refresh(t);
    }
    return 0;
}

void cache__local_spend(struct cache__local *l, const char *tenant, struct cache_spend *out)
{
    struct cache__map_entry *e = cache__map_find(&l->tenants, tenant, strlen(tenant));
    struct local_tenant *t = e ? e->value : NULL;

    memset(out, 0, sizeof(*out));
    if (t == NULL)
        return;
    tenant_refresh(t);
    out->day_spent = t->day_spent;
    out->month_spent = t->month_spent;
    out->reserved = held(t);
}

int cache__local_hold_remote(struct cache__local *l, const char *tenant, int64_t amount)
{
    struct local_tenant *t = tenant_get(l, tenant);

    if (t == NULL)
        return -ENOMEM;
    /* Never below 0: a hold that could not be counted (no memory then)
     * is dropped all the same. */
    t->remote = MAX(cache__sat_add(t->remote, amount), 0);
    return 0;
}

int cache__local_sync(struct cache__local *l, const char *tenant, int64_t day_spent,
                      int64_t month_spent, int64_t reserved)
{
    struct local_tenant *t = tenant_get(l, tenant);

    if (t == NULL)
        return -ENOMEM;
    /* Redis's figures lack our charges it has not confirmed (sent and not
     * answered, journaled): they are ours since its word, as if made
     * after it. */
    t->base_day = day_spent;
    t->base_month = month_spent;
    t->day_spent = cache__sat_add(day_spent, t->unconfirmed_day);
    t->month_spent = cache__sat_add(month_spent, t->unconfirmed_month);
    /* Never below 0: our settles already sent are no longer in t->remote
     * but may still be in `reserved`, which then only makes us careful. */
    if (reserved >= 0)
        t->others = MAX(reserved - t->remote, 0);
    return 0;
}

void cache__local_enforced(struct cache__local *l, const char *tenant, struct cache_spend *s)
{
    struct cache__map_entry *e = cache__map_find(&l->tenants, tenant, strlen(tenant));
    struct local_tenant *t = e ? e->value : NULL;

    if (t == NULL)
        return;
    tenant_refresh(t);
    s->day_spent = t->day_spent;
    s->month_spent = t->month_spent;
    s->reserved = cache__sat_add(s->reserved, t->reserved);
}

int cache__local_recheck(struct cache__local *l, const char *tenant, int64_t day_limit,
                         int64_t month_limit, struct cache_begin_result *r)
{
    struct cache__map_entry *e = cache__map_find(&l->tenants, tenant, strlen(tenant));
    struct local_tenant *t = e ? e->value : NULL;
    int64_t need;

    if (t == NULL)
        return 0;
    tenant_refresh(t);
    if (t->unconfirmed_day == 0 && t->unconfirmed_month == 0 && t->reserved == 0)
        return 0; /* Redis's figures are ours: its decision stands */
    r->day_spent = t->day_spent;
    r->month_spent = t->month_spent;
    /* Holds whose settle is still out are counted by their charge. */
    r->reserved = need = cache__sat_add(MAX(r->reserved - t->settling, 0), t->reserved);
    if (!r->granted)
        return 0;
    return (day_limit > 0 && cache__sat_add(t->day_spent, need) > day_limit) ||
           (month_limit > 0 && cache__sat_add(t->month_spent, need) > month_limit);
}

int cache__local_settling(struct cache__local *l, const char *tenant, int64_t amount)
{
    struct local_tenant *t = tenant_get(l, tenant);

    if (t == NULL)
        return -ENOMEM;
    t->settling = MAX(cache__sat_add(t->settling, amount), 0);
    return 0;
}

int cache__local_unconfirmed(struct cache__local *l, const char *tenant,
                             const struct cache__period *p, int64_t amount)
{
    struct local_tenant *t = tenant_get(l, tenant);

    if (t == NULL)
        return -ENOMEM;
    /* Of an earlier day or month: no longer in these counters. */
    if (p->day == t->period.day)
        t->unconfirmed_day = MAX(cache__sat_add(t->unconfirmed_day, amount), 0);
    if (p->month == t->period.month)
        t->unconfirmed_month = MAX(cache__sat_add(t->unconfirmed_month, amount), 0);
    return 0;
}

int cache__local_restore(struct cache__local *l, const char *subject,
                         const struct cache__period *p, int64_t day_spent, int64_t month_spent)
{
    struct local_tenant *t = tenant_get(l, subject);

    if (t == NULL)
        return -ENOMEM;
    if (p->day == t->period.day)
        t->day_spent = day_spent;
    if (p->month == t->period.month)
        t->month_spent = month_spent;
    return 0;
}

int cache__local_each(struct cache__local *l, cache__local_each_fn *fn, void *arg)
{
    for (size_t i = 0; i < l->tenants.nbuckets; i++) {
        for (struct cache__map_entry *e = l->tenants.buckets[i]; e; e = e->next) {
            struct local_tenant *t = e->value;
            int rc;

            tenant_refresh(t); /* a new day or month starts from 0 */
            if (t->day_spent == 0 && t->month_spent == 0)
                continue;
            rc = fn(arg, e->key, &t->period, t->day_spent, t->month_spent);
            if (rc != 0)
                return rc;
        }
    }
    return 0;
}

int cache__local_put(struct cache__local *l, const char *name, const void *value, size_t len,
                     int ttl_s)
{
    struct cache__map_entry *s = cache__map_find(&l->entries, name, strlen(name));
    struct cache__local_entry *e;

    if (s != NULL)
        entry_unlink(l, s->value);
    if (len > l->max_bytes)
        return -EMSGSIZE;
    while (l->oldest != NULL && l->bytes + len > l->max_bytes)
        entry_unlink(l, l->oldest);
    e = malloc(sizeof(*e) + len);
    if (e == NULL)
        return -ENOMEM;
    e->slot = cache__map_add(&l->entries, name, strlen(name));
    if (e->slot == NULL) {
        free(e);
        return -ENOMEM;
    }
    e->slot->value = e;
    e->expires = cache__mono_ms() + (uint64_t)ttl_s * 1000;
    e->len = len;
    memcpy(e->data, value, len);
    e->next = NULL;
    e->prev = l->newest;
    if (l->newest)
        l->newest->next = e;
    else
        l->oldest = e;
    l->newest = e;
    l->bytes += len;
    return 0;
}

/* ---- the in-process store type: every answer is known at once ---- */

static void local_begin(struct cache_op *op)
{
    struct cache *c = op->cache;

    if (cache__local_begin(&c->local, op->tenant, op->name, op->amount, op->day_limit,
                           op->month_limit, 0, ++c->seq, &op->result, &op->value) < 0)
        op->errstr = error_no_memory;
    cache__defer(op);
}

static void local_settle(struct cache_op *op)
{
    if (cache__local_settle(&op->cache->local, op->tenant, op->res.seq, op->amount) < 0)
        op->errstr = error_no_memory;
    else if (op->amount != 0)
        op->cache->sfile_dirty = 1; /* the spend file's next tick saves it */
    cache__defer(op);
}

static void local_spend(struct cache_op *op)
{
    cache__local_spend(&op->cache->local, op->tenant, &op->spend);
    cache__defer(op);
}

static void local_put(struct cache_op *op)
{
    if (cache__local_put(&op->cache->local, op->name, op->value, op->value_len, op->ttl_s) < 0)
        op->errstr = error_no_memory;
    cache__defer(op);
}

static enum cache_state local_state(const struct cache *c)
{
    return CACHE_STATE_CONNECTED;
}

static void local_close(struct cache *c)
{
}

static void local_stats(const struct cache *c, struct cache_stats *out)
{
    out->state = CACHE_STATE_CONNECTED;
    out->instances = 1;
}

const struct cache__type cache__local_type = {
    .name = "memory",
    .begin = local_begin,
    .settle = local_settle,
    .spend = local_spend,
    .put = local_put,
    .state = local_state,
    .close = local_close,
    .stats = local_stats,
};
