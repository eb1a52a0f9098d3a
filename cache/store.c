/*
 * cache/store.c: the public face of the store. Checks arguments, builds the
 * operation object, dispatches it to the store type (in-process or Redis),
 * and runs completions: at once from a Redis reply, or from the idle handle
 * for answers known immediately, so a callback never runs inside the call
 * that started it.
 */
#include <errno.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/util.h" /* before uv.h: sys/param.h redefines MIN/MAX silently */
#include "cache/internal.h"
#include "common/error.h"
#include "common/log.h"

const char cache_error_timeout[] = "spend store timed out";
const char cache_error_closed[] = "spend store closed";
const char cache_error_protocol[] = "unexpected reply from the spend store";

/* Called for every begin and settle: the month is worked out once a day
 * (gmtime_r takes glibc's timezone lock even for UTC). */
void cache__period_now(struct cache__period *p)
{
    static __thread uint32_t last_day = UINT32_MAX, last_month;
    time_t now = time(NULL);
    struct tm tm;

    p->day = (uint32_t)(now / 86400);
    if (p->day != last_day) {
        gmtime_r(&now, &tm);
        last_month = (uint32_t)((tm.tm_year + 1900) * 12 + tm.tm_mon);
        last_day = p->day;
    }
    p->month = last_month;
}

void cache_period_now(struct cache_period *p)
{
    struct cache__period now;

    cache__period_now(&now);
    p->day = now.day;
    p->month = now.month;
}

void cache__period_fmt(const struct cache__period *p, char day[16], char month[16])
{
    time_t t = (time_t)p->day * 86400;
    struct tm tm;

    gmtime_r(&t, &tm);
    snprintf(day, 16, "%04u%02u%02u", (unsigned)tm.tm_year + 1900, (unsigned)tm.tm_mon % 12 + 1,
             (unsigned)tm.tm_mday % 32);
    snprintf(month, 16, "%04u%02u", p->month / 12, p->month % 12 + 1);
}

uint64_t cache__mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int64_t cache__wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

char *cache__entry_name(const struct cache *c, const char *tenant, const struct cache_key *key)
{
    char hex[65];
    char *name;
    size_t n;

    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", key->sha256[i]);
    n = strlen(tenant) + sizeof(hex) + 16;
    name = malloc(n);
    if (name == NULL)
        return NULL;
    if (c->opts.shared_cache)
        snprintf(name, n, "c:{%s}", hex);
    else
        snprintf(name, n, "{%s}:c:%s", tenant, hex);
    return name;
}

static void close_now(struct cache *c);
static int commands_out(const struct cache *c);

static void idle_cb(uv_idle_t *h)
{
    struct cache *c = container_of(h, struct cache, idle);
    struct cache_op *op;

    /* Take the list as it is now: callbacks may defer more ops, which then
     * run on the next turn. */
    op = c->ready_head;
    c->ready_head = c->ready_tail = NULL;
    uv_idle_stop(&c->idle);
    while (op != NULL) {
        struct cache_op *next = op->next;
        cache__finish(op);
        op = next;
    }
    if (c->draining && c->ready_head == NULL && !commands_out(c))
        close_now(c);
}

void cache__defer(struct cache_op *op)
{
    struct cache *c = op->cache;

    op->next = NULL;
    if (c->ready_tail)
        c->ready_tail->next = op;
    else
        c->ready_head = op;
    c->ready_tail = op;
    uv_idle_start(&c->idle, idle_cb);
}

/* Every request makes a begin and a settle: finished ops are kept for the
 * next ones instead of going back to malloc. Under AddressSanitizer each
 * op stays its own allocation, so that a use after free still shows. */
#ifdef __SANITIZE_ADDRESS__
#define OP_POOL_ROOM(c) 0
#else
#define OP_POOL_MAX 256
#define OP_POOL_ROOM(c) ((c)->op_pooled < OP_POOL_MAX)
#endif
#define OP_SIZE (sizeof(struct cache_op) + CACHE_TENANT_MAX + 1) /* any tenant fits */

static void op_free(struct cache_op *op)
{
    struct cache *c = op->cache;

    free(op->name);
    free(op->value);
    free(op->jentry);
    if (OP_POOL_ROOM(c)) {
        op->next = c->op_pool;
        c->op_pool = op;
        c->op_pooled++;
    } else {
        free(op);
    }
}

void cache__finish(struct cache_op *op)
{
    struct cache *c = op->cache;

    if (op->kind == CACHE__BEGIN) {
        op->result.value = op->result.lookup == CACHE_LOOKUP_HIT ? op->value : NULL;
        op->result.reservation.tenant = op->tenant_ref;
        if (op->cancelled && op->errstr == NULL && op->result.granted && !c->closing)
            cache__release_orphan(c, op->tenant, &op->result.reservation);
    }
    if (!op->cancelled) {
        switch (op->kind) {
        case CACHE__BEGIN:
            if (op->cb.begin)
                op->cb.begin(op->arg, op->errstr, op->errstr ? NULL : &op->result);
            break;
        case CACHE__SPEND:
            if (op->cb.spend)
                op->cb.spend(op->arg, op->errstr, op->errstr ? NULL : &op->spend);
            break;
        case CACHE__SETTLE:
        case CACHE__PUT:
            if (op->cb.done)
                op->cb.done(op->arg, op->errstr);
            break;
        case CACHE__FLUSH:
        case CACHE__LIVE:
            break;
        }
    }
    op_free(op);
    if (c->draining) /* the last answer? idle_cb checks, outside any reply */
        uv_idle_start(&c->idle, idle_cb);
}

void cache_cancel(struct cache_op *op)
{
    if (op != NULL)
        op->cancelled = 1;
}

struct cache_op *cache__op_new(struct cache *c, enum cache__kind kind, const char *tenant)
{
    size_t n = tenant ? strlen(tenant) : 0;
    struct cache_op *op;

    if (c->closing || n > CACHE_TENANT_MAX) {
        errno = EINVAL;
        return NULL;
    }
    op = c->op_pool;
    if (op != NULL) {
        c->op_pool = op->next;
        c->op_pooled--;
    } else if ((op = malloc(OP_SIZE)) == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    memset(op, 0, sizeof(*op));
    op->tenant[n] = '\0';
    op->cache = c;
    op->kind = kind;
    op->tenant_ref = tenant;
    if (n)
        memcpy(op->tenant, tenant, n);
    cache__period_now(&op->period);
    return op;
}

struct cache_op *cache_begin(struct cache *c, const char *tenant, const struct cache_key *key,
                             int64_t amount, int64_t day_limit, int64_t month_limit,
                             cache_begin_cb *cb, void *arg)
{
    struct cache_op *op;

    if (tenant == NULL || amount < 0) {
        errno = EINVAL;
        return NULL;
    }
    op = cache__op_new(c, CACHE__BEGIN, tenant);
    if (op == NULL)
        return NULL;
    if (key != NULL && (op->name = cache__entry_name(c, tenant, key)) == NULL) {
        op_free(op);
        errno = ENOMEM;
        return NULL;
    }
    op->amount = amount;
    op->day_limit = day_limit;
    op->month_limit = month_limit;
    op->cb.begin = cb;
    op->arg = arg;
    c->type->begin(op);
    return op;
}

static struct cache_op *settle_common(struct cache *c, const struct cache_reservation *r,
                                      int64_t real, int release, cache_done_cb *cb, void *arg)
{
    struct cache_op *op;

    if (r == NULL || r->tenant == NULL || real < 0) {
        errno = EINVAL;
        return NULL;
    }
    op = cache__op_new(c, CACHE__SETTLE, r->tenant);
    if (op == NULL) {
        if (r->remote)
            cache__local_hold_remote(&c->local, r->tenant, -r->amount);
        /* Never drop a charge silently: journal it if we can. */
        if (real > 0 && !c->closing && strlen(r->tenant) <= CACHE_TENANT_MAX) {
            struct cache__period p;
            cache__period_now(&p);
            if (cache__journal_add(&c->journal, r->tenant, &p, real, r->remote ? r->seq : 0,
                                   r->amount, 0, 0) != -ENOMEM) /* full: kept here all the same */
                cache__local_unconfirmed(&c->local, r->tenant, &p, real);
        }
        return NULL;
    }
    op->res = *r;
    op->amount = real;
    op->release = release ? 1 : 0;
    op->cb.done = cb;
    op->arg = arg;
    c->type->settle(op);
    return op;
}

struct cache_op *cache_settle(struct cache *c, const struct cache_reservation *r, int64_t real,
                              cache_done_cb *cb, void *arg)
{
    return settle_common(c, r, real, 0, cb, arg);
}

struct cache_op *cache_release(struct cache *c, const struct cache_reservation *r,
                               cache_done_cb *cb, void *arg)
{
    return settle_common(c, r, 0, 1, cb, arg);
}

void cache__release_orphan(struct cache *c, const char *tenant,
                           const struct cache_reservation *r)
{
    struct cache_reservation copy = *r;

    copy.tenant = tenant; /* the op's own copy: the caller's may be gone */
    if (settle_common(c, &copy, 0, 1, NULL, NULL) == NULL)
        log_warn("store: could not release a cancelled reservation; it will expire");
}

struct cache_op *cache_spend_get(struct cache *c, const char *tenant, cache_spend_cb *cb,
                                 void *arg)
{
    struct cache_op *op;

    if (tenant == NULL) {
        errno = EINVAL;
        return NULL;
    }
    op = cache__op_new(c, CACHE__SPEND, tenant);
    if (op == NULL)
        return NULL;
    op->cb.spend = cb;
    op->arg = arg;
    c->type->spend(op);
    return op;
}

struct cache_op *cache_put(struct cache *c, const char *tenant, const struct cache_key *key,
                           const void *value, size_t len, int ttl_s, cache_done_cb *cb,
                           void *arg)
{
    struct cache_op *op;

    if (tenant == NULL || key == NULL || ttl_s < 0) {
        errno = EINVAL;
        return NULL;
    }
    if (len > c->opts.max_entry_bytes) {
        errno = EMSGSIZE;
        return NULL;
    }
    op = cache__op_new(c, CACHE__PUT, tenant);
    if (op == NULL)
        return NULL;
    op->name = cache__entry_name(c, tenant, key);
    op->value = malloc(len ? len : 1);
    if (op->name == NULL || op->value == NULL) {
        op_free(op);
        errno = ENOMEM;
        return NULL;
    }
    memcpy(op->value, value, len);
    op->value_len = len;
    op->ttl_s = ttl_s ? ttl_s : c->opts.cache_ttl_s;
    op->cb.done = cb;
    op->arg = arg;
    c->type->put(op);
    return op;
}

void cache_stats(const struct cache *c, struct cache_stats *out)
{
    memset(out, 0, sizeof(*out));
    c->type->stats(c, out);
    out->journal_entries = c->journal.count;
    out->journal_amount = c->journal.amount;
    out->journal_dropped = c->journal.dropped;
    out->journal_dropped_amount = c->journal.dropped_amount;
    out->spend_file_failing = c->sfile_failing;
}

static void apply_defaults(struct cache_options *o)
{
    if (o->connect_timeout_ms <= 0)
        o->connect_timeout_ms = 1000;
    if (o->command_timeout_ms <= 0)
        o->command_timeout_ms = 500;
    if (o->reconnect_min_ms <= 0)
        o->reconnect_min_ms = 100;
    if (o->reconnect_max_ms <= 0)
        o->reconnect_max_ms = 5000;
    if (o->reconnect_max_ms < o->reconnect_min_ms)
        o->reconnect_max_ms = o->reconnect_min_ms;
    if (o->reservation_ttl_ms <= 0)
        o->reservation_ttl_ms = 600000;
    if (o->cache_ttl_s <= 0)
        o->cache_ttl_s = 3600;
    if (o->max_entry_bytes == 0)
        o->max_entry_bytes = 1 << 20;
    if (o->local_cache_bytes == 0)
        o->local_cache_bytes = 64 << 20;
    if (o->journal_max == 0)
        o->journal_max = 100000;
}

struct cache *cache_create(uv_loop_t *loop, const struct cache_options *opts)
{
    struct cache *c = calloc(1, sizeof(*c));
    uint8_t id[8];

    if (c == NULL)
        return NULL;
    c->loop = loop;
    c->opts = *opts;
    apply_defaults(&c->opts);
    c->prefix = strdup(opts->key_prefix ? opts->key_prefix : "costrouter:");
    if (c->prefix == NULL || strchr(c->prefix, '{') || strchr(c->prefix, '}') ||
        strlen(c->prefix) > CACHE_KEY_PREFIX_MAX)
        goto fail;
    c->opts.key_prefix = c->prefix;
    if (opts->redis_url) {
        c->url = strdup(opts->redis_url);
        if (c->url == NULL)
            goto fail;
        c->opts.redis_url = c->url;
    }
    c->jfile_lock = -1;
    if (c->url && opts->journal_file) {
        c->jfile = strdup(opts->journal_file);
        if (c->jfile == NULL)
            goto fail;
    }
    c->opts.journal_file = c->jfile;
    c->sfile_lock = -1;
    if (!c->url && opts->spend_file) {
        c->sfile = strdup(opts->spend_file);
        if (c->sfile == NULL)
            goto fail;
    }
    c->opts.spend_file = c->sfile;
    if (RAND_bytes(id, sizeof(id)) != 1)
        goto fail;
    for (size_t i = 0; i < sizeof(id); i++)
        snprintf(c->instance + 2 * i, 3, "%02x", id[i]);
    c->journal.instance = c->instance;
    c->journal.max = c->opts.journal_max;
    cache__local_init(&c->local, c->opts.local_cache_bytes, c->opts.reservation_ttl_ms);
    uv_idle_init(loop, &c->idle);
    c->handles_open = 1;
    c->type = &cache__local_type;
    if (c->url) {
        c->type = &cache__redis_type;
        /* The file first: its entries are in the journal before the
         * connection, whose setup writes the journal back. */
        if ((c->jfile && cache__jfile_open(c) < 0) || cache__redis_create(c) < 0) {
            /* Only the idle handle exists: close it, free from its callback. */
            c->closing = 1;
            c->type = &cache__local_type;
            cache_close(c, NULL, NULL);
            return NULL;
        }
    } else if (c->sfile && cache__sfile_open(c) < 0) {
        c->closing = 1;
        cache_close(c, NULL, NULL);
        return NULL;
    }
    return c;

fail:
    free(c->prefix);
    free(c->url);
    free(c->jfile);
    free(c->sfile);
    free(c);
    return NULL;
}

static void cache_free(struct cache *c)
{
    void (*closed)(void *) = c->closed;
    void *arg = c->closed_arg;

    while (c->op_pool != NULL) {
        struct cache_op *op = c->op_pool;

        c->op_pool = op->next;
        free(op);
    }
    cache__redis_free(c);
    if (c->jfile)
        cache__jfile_close(c);
    if (c->sfile)
        cache__sfile_close(c);
    cache__journal_free(&c->journal);
    cache__local_free(&c->local);
    free(c->prefix);
    free(c->url);
    free(c->jfile);
    free(c->sfile);
    free(c);
    if (closed)
        closed(arg);
}

void cache__handle_closed(struct cache *c)
{
    if (--c->handles_open == 0)
        cache_free(c);
}

static void idle_closed(uv_handle_t *h)
{
    cache__handle_closed(container_of((uv_idle_t *)h, struct cache, idle));
}

/* Commands sent to Redis, or queued for it, not answered yet. */
static int commands_out(const struct cache *c)
{
    struct cache_stats st = {0};

    c->type->stats(c, &st);
    return st.inflight > 0;
}

/*
 * The commands already out may be reservations whose requests are gone
 * (their client left, and the router cancelled them): their answers
 * release them (cache__finish). Closing at once dropped the connection
 * with them in it, and Redis, which runs what it read, kept them held
 * until they expired, on every instance sharing it. So the store waits
 * for those answers first, which the command timeout bounds, and the
 * releases they send.
 */
void cache_close(struct cache *c, void (*closed)(void *arg), void *arg)
{
    c->closed = closed;
    c->closed_arg = arg;
    if (!c->closing && !c->draining && c->type->leave)
        c->type->leave(c);
    if (!c->closing && commands_out(c)) {
        c->draining = 1;
        return;
    }
    close_now(c);
}

static void close_now(struct cache *c)
{
    c->draining = 0;
    c->closing = 1;
    c->type->close(c);
    if (c->sfile && c->sfile_lock >= 0)
        cache__sfile_stop(c);
    /* Answers already known are delivered as they are. */
    while (c->ready_head) {
        struct cache_op *op = c->ready_head;
        c->ready_head = op->next;
        if (c->ready_head == NULL)
            c->ready_tail = NULL;
        cache__finish(op);
    }
    uv_close((uv_handle_t *)&c->idle, idle_closed);
}
