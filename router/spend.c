/*
 * router/spend.c: the store side of a request (cache/ behind it).
 *
 * Before a request goes upstream, one store call (cache_begin) looks the
 * response cache up and reserves the estimated cost against the tenant's
 * day and month budgets, atomically, so instances sharing a Redis cannot
 * overspend. When the response ends the reservation is settled with the
 * real cost; a failure before any cost releases it. Every store answer
 * also refreshes the router's snapshot of the tenant's spend, which the
 * policy reads for the next choice, so selection itself needs no round
 * trip.
 *
 * Cached responses carry the cost they were bought for, so a hit can log
 * what it saved: "<micro-USD>\n<bytes>".
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"
#include "cache/cache.h"
#include "common/error.h"
#include "common/log.h"
#include "conf/conf.h"
#include "router/internal.h"

/* What the config accepts, the store takes. */
_Static_assert(CONF_NAME_MAX <= CACHE_TENANT_MAX, "every tenant id fits the store's keys");
_Static_assert(CONF_KEY_PREFIX_MAX <= CACHE_KEY_PREFIX_MAX, "every key prefix fits the store");

static void on_store_state(void *arg, enum cache_state state, const char *errstr)
{
    if (errstr)
        log_warn("store: %s", errstr);
}

/* policy/ takes experiments in its own shape (with prepared weights);
 * the strings stay the config's. */
static int experiments_prepare(struct router *r)
{
    const struct conf *conf = r->conf;

    if (conf->nexperiments == 0)
        return 0;
    r->experiments = calloc(conf->nexperiments, sizeof(*r->experiments));
    if (r->experiments == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < conf->nexperiments; i++) {
        const struct conf_experiment *ce = &conf->experiments[i];
        struct policy_experiment *pe = &r->experiments[i];
        int rc;

        pe->name = ce->name;
        pe->route = ce->route;
        pe->tenants = (const char *const *)ce->tenants;
        pe->ntenants = ce->ntenants;
        pe->narms = ce->narms;
        pe->arms = calloc(ce->narms, sizeof(*pe->arms));
        if (pe->arms == NULL)
            return -ENOMEM;
        for (size_t a = 0; a < ce->narms; a++) {
            pe->arms[a].name = ce->arms[a].name;
            pe->arms[a].weight = (unsigned)ce->arms[a].weight;
            pe->arms[a].backends = (const char *const *)ce->arms[a].backends;
            pe->arms[a].nbackends = ce->arms[a].nbackends;
        }
        if ((rc = policy_experiment_prepare(pe)) != 0)
            return rc;
    }
    return 0;
}

struct cache *router__store_create(uv_loop_t *loop, const struct conf *conf)
{
    struct cache_options opts = {0};

    opts.redis_url = conf->redis_url;
    opts.on_failure = conf->store_on_failure == CONF_FAIL_CLOSED ? CACHE_FAIL_CLOSED : CACHE_FAIL_OPEN;
    opts.key_prefix = conf->store_key_prefix;
    opts.connect_timeout_ms = conf->store_connect_timeout_ms;
    opts.command_timeout_ms = conf->store_command_timeout_ms;
    opts.reservation_ttl_ms = conf->store_reservation_ttl_ms;
    opts.journal_file = conf->store_journal_file;
    opts.cache_ttl_s = conf->cache_ttl_s;
    opts.max_entry_bytes = conf->cache_max_entry_bytes;
    opts.local_cache_bytes = conf->cache_local_bytes;
    opts.shared_cache = conf->cache_shared;
    opts.cache_tools = conf->cache_tools;
    opts.on_state = on_store_state;
    opts.on_state_arg = NULL;
    return cache_create(loop, &opts);
}

/* The generation being replaced's state of tenant `t`, or NULL when it
 * has none (the first config, or a tenant the reload adds). */
static const struct router__tenant *previous_state(struct router *r, const struct conf_tenant *t)
{
    const struct router *prev = r->shared->current;
    const struct conf_tenant *old = prev ? conf_find_tenant(prev->conf, t->id) : NULL;

    return old ? &prev->tenants[old - prev->conf->tenants] : NULL;
}

/*
 * The carry of tenant `t` in generation `r`: the one of the generation
 * being replaced (shared->current while a reload builds `r`) when it
 * knows the tenant too, else a new one. Requests of both generations
 * then settle into the same remainder.
 */
static struct router__carry *carry_for(struct router *r, const struct conf_tenant *t)
{
    const struct router__tenant *old = previous_state(r, t);
    struct router__carry *carry = old ? old->carry : calloc(1, sizeof(*carry));

    if (carry != NULL)
        carry->refs++;
    return carry;
}

static void copy_buckets(struct policy_ratelimit *to, const struct policy_ratelimit *from)
{
    to->requests = from->requests;
    to->tokens = from->tokens;
}

/* A reload keeps what the tenant, and each key it still has (by hash),
 * used of its rate limits: fresh buckets gave every reload a new minute's
 * worth and forgave the debt of long answers. A lowered limit caps the
 * level at its next refill. The token corrections of requests still in
 * flight on the old generation land in its buckets, not these. */
static void carry_limits(struct router *r, const struct conf_tenant *t, struct router__tenant *ts)
{
    const struct router__tenant *old = previous_state(r, t);
    const struct conf_key *k;

    if (old == NULL)
        return;
    copy_buckets(&ts->rl, &old->rl);
    for (size_t i = 0; i < t->nkeys; i++) {
        k = conf_find_key(r->shared->current->conf, t->keys[i].hash);
        if (k != NULL && strcmp(k->tenant->id, t->id) == 0)
            copy_buckets(&ts->key_rl[i], &old->key_rl[k->index]);
    }
}

/* The store's last numbers for the tenant, from the generation being
 * replaced: a reload that started them at 0 had the spend gauges show
 * nothing spent and the whole budget left until each tenant's next
 * request. */
static void inherit_spend(struct router__tenant *ts, const struct router__tenant *old)
{
    if (old == NULL)
        return;
    ts->day_spent = old->day_spent;
    ts->month_spent = old->month_spent;
    ts->reserved = old->reserved;
    ts->period = old->period;
}

int router__spend_init(struct router *r)
{
    const struct conf *conf = r->conf;

    r->tenants = calloc(conf->ntenants ? conf->ntenants : 1, sizeof(*r->tenants));
    r->calib = calloc(conf->nbackends ? conf->nbackends : 1, sizeof(*r->calib));
    r->idle_reported = calloc(conf->nbackends ? conf->nbackends : 1, sizeof(double));
    if (r->tenants == NULL || r->calib == NULL || r->idle_reported == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < conf->ntenants; i++) {
        const struct conf_tenant *t = &conf->tenants[i];
        struct router__tenant *ts = &r->tenants[i];

        ts->outpred = calloc(conf->nroutes ? conf->nroutes : 1, sizeof(struct policy_outpred));
        ts->key_rl = calloc(t->nkeys ? t->nkeys : 1, sizeof(*ts->key_rl));
        ts->carry = carry_for(r, t);
        inherit_spend(ts, previous_state(r, t));
        if (ts->outpred == NULL || ts->key_rl == NULL || ts->carry == NULL)
            return -ENOMEM;
        ts->rl.rpm = t->rpm;
        ts->rl.tpm = t->tpm;
        for (size_t k = 0; k < t->nkeys; k++) {
            ts->key_rl[k].rpm = t->keys[k].rpm;
            ts->key_rl[k].tpm = t->keys[k].tpm;
        }
        carry_limits(r, t, ts);
        for (size_t j = 0; j < conf->nroutes; j++)
            policy_outpred_init(&r->tenants[i].outpred[j]);
    }
    for (size_t i = 0; i < conf->nbackends; i++)
        policy_calib_init(&r->calib[i]);
    return experiments_prepare(r);
}

void router__spend_free(struct router *r)
{
    if (r->tenants)
        for (size_t i = 0; i < r->conf->ntenants; i++) {
            struct router__carry *carry = r->tenants[i].carry;

            free(r->tenants[i].outpred);
            free(r->tenants[i].key_rl);
            if (carry != NULL && --carry->refs == 0)
                free(carry);
        }
    if (r->experiments)
        for (size_t i = 0; i < r->conf->nexperiments; i++) {
            policy_experiment_release(&r->experiments[i]);
            free(r->experiments[i].arms);
        }
    free(r->experiments);
    r->experiments = NULL;
    free(r->tenants);
    r->tenants = NULL;
    free(r->calib);
    r->calib = NULL;
    free(r->idle_reported);
    r->idle_reported = NULL;
}

struct router__tenant *router__tenant_state(struct router *r, const struct conf_tenant *t)
{
    return &r->tenants[t - r->conf->tenants];
}

/* A failed write, logged once a second at most: while the store is down
 * every settlement fails alike, and a line each flooded the log with
 * thousands a second. The state change itself is logged by
 * on_store_state. */
static void warn_write_failed(struct router *r, const char *errstr)
{
    char note[LOG_EVERY_NOTE_MAX];

    if (log_every_due(&r->store_warn, router__now(r), note))
        log_warn("store: %s (charges are journaled and written back later)%s", errstr, note);
}

/* Settles, releases and puts are counted until answered, so that a
 * stopping router closes the store only after they were applied. */
static void on_write_done(void *arg, const char *errstr)
{
    struct router *r = arg;

    if (errstr)
        warn_write_failed(r, errstr);
    r->store_pending--;
    router__maybe_finish(r);
}

static void track(struct router *r, struct cache_op *op)
{
    if (op != NULL)
        r->store_pending++;
}

int64_t router__budget_micro(double usd)
{
    int64_t micro = backend_usd_to_micro(usd);

    /* 0 is no budget to the store and the policy: a positive budget under
     * half a micro-dollar is the least budget there is, not none. */
    return usd > 0 && micro == 0 ? 1 : micro;
}

/* The store's answer for the tenant, as of the periods it was read in. */
static void store_said(struct router__tenant *ts, int64_t day, int64_t month, int64_t reserved)
{
    ts->day_spent = day;
    ts->month_spent = month;
    ts->reserved = reserved;
    cache_period_now(&ts->period);
}

void router__tenant_roll(struct router__tenant *ts)
{
    struct cache_period now;

    cache_period_now(&now);
    if (now.day != ts->period.day)
        ts->day_spent = 0;
    if (now.month != ts->period.month)
        ts->month_spent = 0;
    ts->period = now;
}

static void on_begin(void *arg, const char *errstr, const struct cache_begin_result *res)
{
    struct router__client *c = arg;
    struct router__request *req = &c->req;
    struct router__tenant *ts = router__tenant_state(c->router, req->tenant);

    req->store_op = NULL;
    if (errstr != NULL) {
        router__send_error(c, error_store_unavailable, NULL);
        return;
    }
    store_said(ts, res->day_spent, res->month_spent, res->reserved);
    if (res->granted) {
        req->res = res->reservation;
        req->has_res = 1;
    }
    if (res->lookup == CACHE_LOOKUP_HIT) {
        router__proxy_replay(c, res->value, res->value_len);
        return;
    }
    router__proxy_reserved(c, res);
}

void router__spend_begin(struct router__client *c)
{
    struct router__request *req = &c->req;
    const struct conf_tenant *t = req->tenant;
    int lookup = req->cacheable && req->begins == 0;

    req->begins++;
    req->store_op = cache_begin(c->router->store, t->id, lookup ? &req->cache_key : NULL,
                                req->choice.cost_micro, router__budget_micro(t->daily_usd),
                                router__budget_micro(t->monthly_usd), on_begin, c);
    if (req->store_op == NULL)
        router__send_error(c, error_no_memory, NULL);
}

static void on_check(void *arg, const char *errstr, const struct cache_spend *s)
{
    struct router__client *c = arg;
    struct router__tenant *ts = router__tenant_state(c->router, c->req.tenant);

    c->req.store_op = NULL;
    if (errstr == NULL) /* else the old numbers stand: refuse as they say */
        store_said(ts, s->day_spent, s->month_spent, s->reserved);
    router__proxy_budget_checked(c);
}

int router__spend_check(struct router__client *c)
{
    struct router__request *req = &c->req;

    req->store_op = cache_spend_get(c->router->store, req->tenant->id, on_check, c);
    return req->store_op != NULL ? 0 : -1;
}

/*
 * The tenant's numbers are the store's answer to its last begin or check,
 * which counted this request's hold and not its charge. Kept up to date
 * with this instance's own settles and releases until the next answer
 * replaces them: the spend gauges showed every tenant a request behind
 * (an idle tenant's last requests never), and the next choice counted a
 * hold that was gone.
 */
static void forget_hold(struct router__client *c)
{
    struct router__tenant *ts = router__tenant_state(c->router, c->req.tenant);

    ts->reserved = ts->reserved > c->req.res.amount ? ts->reserved - c->req.res.amount : 0;
}

void router__spend_release(struct router__client *c)
{
    struct router__request *req = &c->req;

    if (!req->has_res)
        return;
    req->has_res = 0;
    forget_hold(c);
    track(c->router, cache_release(c->router->store, &req->res, on_write_done, c->router));
}

/*
 * The whole micro-USD to charge for `usd`: the cost plus what the tenant's
 * earlier charges left over, to the nearest; the rest is carried. Summed
 * over a tenant's requests the store stays within half a micro-USD of
 * their exact costs (the cost log's), where rounding each one alone
 * charged $0 for any request under half a micro-USD, however many. A
 * cost of 0 (nothing billed) leaves the carry alone: nothing is charged
 * for it, and a charge is never negative.
 */
static int64_t carry_charge(struct router__carry *carry, double usd)
{
    double exact;
    int64_t micro;

    if (!(usd > 0))
        return 0;
    exact = usd * 1e6 + carry->micro;
    micro = llround(exact);
    carry->micro = exact - (double)micro;
    return micro;
}

void router__spend_settle(struct router__client *c, double usd)
{
    struct router__request *req = &c->req;
    struct router__tenant *ts = router__tenant_state(c->router, req->tenant);
    int64_t micro = carry_charge(ts->carry, usd);

    req->cost_usd = usd > 0 ? usd : 0;
    req->cost_micro = backend_usd_to_micro(req->cost_usd);
    req->settled = 1;
    router__tenant_roll(ts);
    ts->day_spent += micro;
    ts->month_spent += micro;
    if (!req->has_res) {
        /* No hold (a token count, which holds none, or a free backend):
         * nothing to write when there is nothing to charge, so a count
         * makes no store call at all; else charge anyway, nothing is lost. */
        if (micro == 0)
            return;
        struct cache_reservation none = {.tenant = req->tenant->id};
        track(c->router, cache_settle(c->router->store, &none, micro, on_write_done, c->router));
        return;
    }
    req->has_res = 0;
    forget_hold(c);
    track(c->router, cache_settle(c->router->store, &req->res, micro, on_write_done, c->router));
}

void router__spend_cache_store(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct buf value = {0};

    if (!req->flight_leader)
        return;
    req->flight_leader = 0;
    if (req->status == 200 && !req->broken && req->cached.len > 0 &&
        buf_printf(&value, "%" PRId64 "\n", req->cost_micro) == 0 &&
        buf_append(&value, req->cached.data, req->cached.len) == 0) {
        track(c->router, cache_put(c->router->store, req->tenant->id, &req->cache_key, value.data,
                                   value.len, 0, on_write_done, c->router));
        cache_flight_finish(c->router->flights, &req->cache_key, value.data, value.len);
    } else {
        cache_flight_finish(c->router->flights, &req->cache_key, NULL, 0);
    }
    buf_free(&value);
}

void router__spend_abandon(struct router__client *c)
{
    struct router__request *req = &c->req;

    router__admin_abandon(c);
    if (req->store_op) {
        cache_cancel(req->store_op);
        req->store_op = NULL;
    }
    if (req->flight_waiting) {
        cache_flight_leave(c->router->flights, &req->waiter);
        req->flight_waiting = 0;
    }
    if (req->flight_leader) {
        req->flight_leader = 0;
        cache_flight_finish(c->router->flights, &req->cache_key, NULL, 0);
    }
    router__spend_release(c);
}
