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
_Static_assert(CONF_SUBJECT_MAX <= CACHE_TENANT_MAX, "every tenant id and key subject fits the store's keys");
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
    opts.spend_file = conf->store_spend_file;
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
 * The generation being replaced's numbers of key `k`, when it had a budget
 * there under the same subject (same tenant, same name), found by the
 * key's hash; NULL otherwise (a key the reload adds, renames, or gives
 * its first budget).
 */
static const struct router__spend *previous_key_spend(struct router *r, const struct conf_key *k)
{
    const struct router *prev = r->shared->current;
    const struct conf_key *old = prev && k->subject ? conf_find_key(prev->conf, k->hash) : NULL;

    if (old == NULL || old->subject == NULL || strcmp(old->subject, k->subject) != 0)
        return NULL;
    return &prev->tenants[old->tenant - prev->conf->tenants].key_spend[old->index];
}

/*
 * A subject's numbers in generation `r`: the store's last ones and the
 * carry of the generation being replaced (shared->current while a reload
 * builds `r`) when it knows the subject too (`old`), else new ones.
 * Requests of both generations then settle into the same remainder, and a
 * reload that started the numbers at 0 had the spend gauges show nothing
 * spent and the whole budget left until the subject's next request.
 */
static int spend_init(struct router__spend *s, const struct router__spend *old)
{
    if (old != NULL)
        *s = *old;
    s->carry = old != NULL ? old->carry : calloc(1, sizeof(*s->carry));
    if (s->carry == NULL)
        return -ENOMEM;
    s->carry->refs++;
    return 0;
}

static void spend_free(struct router__spend *s)
{
    if (s->carry != NULL && --s->carry->refs == 0)
        free(s->carry);
    s->carry = NULL;
}

static void copy_buckets(struct policy_ratelimit *to, const struct policy_ratelimit *from)
{
    to->requests = from->requests;
    to->tokens = from->tokens;
}

/* A reload keeps what the tenant, and each key it still has (by hash),
 * used of its rate limits: fresh buckets gave every reload a new minute's
 * worth and forgave the debt of long answers. A lowered limit caps the
 * level at its next refill. Requests still on the old generation take
 * from and settle into these from now on (limiters_of in proxy.c). */
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

/* Each key with a budget gets its numbers, as its tenant does. */
static int key_spend_init(struct router *r, const struct conf_tenant *t, struct router__tenant *ts)
{
    ts->key_spend = calloc(t->nkeys ? t->nkeys : 1, sizeof(*ts->key_spend));
    if (ts->key_spend == NULL)
        return -ENOMEM;
    for (size_t k = 0; k < t->nkeys; k++)
        if (t->keys[k].subject != NULL &&
            spend_init(&ts->key_spend[k], previous_key_spend(r, &t->keys[k])) != 0)
            return -ENOMEM;
    return 0;
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
        const struct router__tenant *old = previous_state(r, t);

        ts->outpred = calloc(conf->nroutes ? conf->nroutes : 1, sizeof(struct policy_outpred));
        ts->key_rl = calloc(t->nkeys ? t->nkeys : 1, sizeof(*ts->key_rl));
        if (ts->outpred == NULL || ts->key_rl == NULL ||
            spend_init(&ts->spend, old ? &old->spend : NULL) != 0 ||
            key_spend_init(r, t, ts) != 0)
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
            struct router__tenant *ts = &r->tenants[i];

            free(ts->outpred);
            free(ts->key_rl);
            spend_free(&ts->spend);
            for (size_t k = 0; ts->key_spend && k < r->conf->tenants[i].nkeys; k++)
                spend_free(&ts->key_spend[k]);
            free(ts->key_spend);
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

struct router__spend *router__key_spend(struct router *r, const struct conf_key *k)
{
    if (k == NULL || k->subject == NULL)
        return NULL;
    return &router__tenant_state(r, k->tenant)->key_spend[k->index];
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

/* The store's answer for a subject, as of the periods it was read in. */
static void store_said(struct router__spend *s, int64_t day, int64_t month, int64_t reserved)
{
    s->day_spent = day;
    s->month_spent = month;
    s->reserved = reserved;
    cache_period_now(&s->period);
}

void router__spend_roll(struct router__spend *s)
{
    struct cache_period now;

    cache_period_now(&now);
    if (now.day != s->period.day)
        s->day_spent = 0;
    if (now.month != s->period.month)
        s->month_spent = 0;
    s->period = now;
}

/*
 * A hold asked of the store counts as held until the store answers: the
 * choices made meanwhile (a burst, while Redis answers the first) see it.
 * Counted by an answer's reserved figure once given, so it stops counting
 * here then. Without it, a burst of 100 requests chose the dear backend
 * past a soft limit by as many as one Redis round trip let through.
 */
static void asked(struct router__client *c, struct router__spend *s, int64_t amount, int key)
{
    c->req.asked_micro = amount;
    c->req.asked_key = key != 0;
    s->carry->asked_micro += amount;
}

/* The store answered the hold asked (or it is cancelled): no longer counted. */
static void answered(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct router__spend *s;

    if (req->asked_micro == 0)
        return; /* none asked: perhaps no tenant either, so no state to look at */
    s = req->asked_key ? router__key_spend(c->router, req->key)
                       : &router__tenant_state(c->router, req->tenant)->spend;
    s->carry->asked_micro -= req->asked_micro;
    req->asked_micro = 0;
}

/* The key's answer: with its hold too the request goes on; refused, the
 * tenant's hold goes back and the request chooses again by the key's
 * fresh numbers (downgrade, or 429 naming the key's budget). */
static void on_key_begin(void *arg, const char *errstr, const struct cache_begin_result *res)
{
    struct router__client *c = arg;
    struct router__request *req = &c->req;

    req->store_op = NULL;
    answered(c);
    if (errstr != NULL) {
        router__spend_release(c);
        router__send_error(c, error_store_unavailable, NULL);
        return;
    }
    store_said(router__key_spend(c->router, req->key), res->day_spent, res->month_spent,
               res->reserved);
    if (res->granted) {
        req->key_res = res->reservation;
        req->has_key_res = 1;
    } else {
        router__spend_release(c);
    }
    router__proxy_reserved(c, res->granted);
}

/* Hold the tenant's hold again from the budget of the request's key, when
 * it has one: a second store call, made only once the tenant's was
 * granted (a refused or cached request asks the key nothing). Returns 1
 * when on_key_begin will continue, 0 when the key has no budget. */
static int key_begin(struct router__client *c)
{
    struct router__request *req = &c->req;
    const struct conf_key *k = req->key;

    if (k == NULL || k->subject == NULL)
        return 0;
    asked(c, router__key_spend(c->router, k), req->res.amount, 1);
    req->store_op = cache_begin(c->router->store, k->subject, NULL, req->res.amount,
                                router__budget_micro(k->daily_usd),
                                router__budget_micro(k->monthly_usd), on_key_begin, c);
    if (req->store_op == NULL) {
        answered(c);
        router__spend_release(c);
        router__send_error(c, error_no_memory, NULL);
    }
    return 1;
}

static void on_begin(void *arg, const char *errstr, const struct cache_begin_result *res)
{
    struct router__client *c = arg;
    struct router__request *req = &c->req;
    struct router__tenant *ts = router__tenant_state(c->router, req->tenant);

    req->store_op = NULL;
    answered(c);
    if (errstr != NULL) {
        router__send_error(c, error_store_unavailable, NULL);
        return;
    }
    store_said(&ts->spend, res->day_spent, res->month_spent, res->reserved);
    if (res->granted) {
        req->res = res->reservation;
        req->has_res = 1;
    }
    if (res->lookup == CACHE_LOOKUP_HIT) {
        router__proxy_replay(c, res->value, res->value_len);
        return;
    }
    req->lookup = res->lookup;
    if (res->granted && key_begin(c))
        return;
    router__proxy_reserved(c, res->granted);
}

void router__spend_begin(struct router__client *c)
{
    struct router__request *req = &c->req;
    const struct conf_tenant *t = req->tenant;
    int lookup = req->cacheable && req->begins == 0;

    req->begins++;
    asked(c, &router__tenant_state(c->router, t)->spend, req->choice.cost_micro, 0);
    req->store_op = cache_begin(c->router->store, t->id, lookup ? &req->cache_key : NULL,
                                req->choice.cost_micro, router__budget_micro(t->daily_usd),
                                router__budget_micro(t->monthly_usd), on_begin, c);
    if (req->store_op == NULL) {
        answered(c);
        router__send_error(c, error_no_memory, NULL);
    }
}

static void on_key_check(void *arg, const char *errstr, const struct cache_spend *s)
{
    struct router__client *c = arg;

    c->req.store_op = NULL;
    if (errstr == NULL) /* else the old numbers stand: refuse as they say */
        store_said(router__key_spend(c->router, c->req.key), s->day_spent, s->month_spent,
                   s->reserved);
    router__proxy_budget_checked(c);
}

/* The tenant's numbers are in; the key's too, when it has a budget. */
static void on_check(void *arg, const char *errstr, const struct cache_spend *s)
{
    struct router__client *c = arg;
    struct router__tenant *ts = router__tenant_state(c->router, c->req.tenant);
    const struct conf_key *k = c->req.key;

    c->req.store_op = NULL;
    if (errstr == NULL) /* else the old numbers stand: refuse as they say */
        store_said(&ts->spend, s->day_spent, s->month_spent, s->reserved);
    if (k != NULL && k->subject != NULL &&
        (c->req.store_op = cache_spend_get(c->router->store, k->subject, on_key_check, c)))
        return;
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
static void forget_hold(struct router__spend *s, int64_t amount)
{
    s->reserved = s->reserved > amount ? s->reserved - amount : 0;
}

void router__spend_release(struct router__client *c)
{
    struct router__request *req = &c->req;

    if (req->has_key_res) {
        req->has_key_res = 0;
        forget_hold(router__key_spend(c->router, req->key), req->key_res.amount);
        track(c->router, cache_release(c->router->store, &req->key_res, on_write_done, c->router));
    }
    if (!req->has_res)
        return;
    req->has_res = 0;
    forget_hold(&router__tenant_state(c->router, req->tenant)->spend, req->res.amount);
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
    if (!(exact < (double)BACKEND_MICRO_MAX)) {
        /* Past the range, as backend_usd_to_micro clamps (the cost
         * header's): llround would be undefined (LLONG_MIN here), a
         * negative charge the store refuses, leaving the hold. */
        carry->micro = 0;
        return BACKEND_MICRO_MAX;
    }
    micro = llround(exact);
    carry->micro = exact - (double)micro;
    return micro;
}

/* Charge `usd` to one subject, with its own carry: a key's charges add up
 * to its requests' costs as its tenant's do, whichever of the tenant's
 * other keys took the tenant's remainders. `has` says whether `res`
 * holds for it. */
static void settle_subject(struct router *r, struct router__spend *s, const char *subject,
                           const struct cache_reservation *res, int has, double usd)
{
    int64_t micro = carry_charge(s->carry, usd);

    router__spend_roll(s);
    s->day_spent += micro;
    s->month_spent += micro;
    if (!has) {
        /* No hold (a token count, which holds none, or a free backend):
         * nothing to write when there is nothing to charge, so a count
         * makes no store call at all; else charge anyway, nothing is lost. */
        if (micro == 0)
            return;
        struct cache_reservation none = {.tenant = subject};
        track(r, cache_settle(r->store, &none, micro, on_write_done, r));
        return;
    }
    forget_hold(s, res->amount);
    track(r, cache_settle(r->store, res, micro, on_write_done, r));
}

int64_t router__spend_held(const struct router__spend *s)
{
    return s->reserved + (s->carry != NULL ? s->carry->over_micro + s->carry->asked_micro : 0);
}

void router__spend_overrun(struct router__client *c, int64_t over)
{
    struct router__request *req = &c->req;
    struct router__spend *ks = router__key_spend(c->router, req->key);
    int64_t delta = over - req->over_micro;

    if (delta == 0)
        return;
    router__tenant_state(c->router, req->tenant)->spend.carry->over_micro += delta;
    if (ks != NULL)
        ks->carry->over_micro += delta;
    req->over_micro = over;
}

void router__spend_settle(struct router__client *c, double usd)
{
    struct router__request *req = &c->req;
    struct router__spend *ks = router__key_spend(c->router, req->key);
    int has = req->has_res, has_key = req->has_key_res;

    router__spend_overrun(c, 0); /* the charge below counts it now */

    req->cost_usd = usd > 0 ? usd : 0;
    req->cost_micro = backend_usd_to_micro(req->cost_usd);
    req->settled = 1;
    req->has_res = req->has_key_res = 0;
    settle_subject(c->router, &router__tenant_state(c->router, req->tenant)->spend, req->tenant->id,
                   &req->res, has, usd);
    if (ks != NULL)
        settle_subject(c->router, ks, req->key->subject, &req->key_res, has_key, usd);
}

void router__spend_cache_store(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct buf value = {0};

    if (!req->flight_leader)
        return;
    /* A stream is an answer once its own last event passed, after no
     * error; a body once its JSON closed (one framed by the upstream's
     * close may break off and still end well for HTTP): one cut short or
     * failing inside its 200 is none to replay. A replay has the form the
     * request asked for (a stream, or a body): an answer of the other
     * form (a server that would not stream) is none to replay either. */
    if (req->status == 200 && !req->broken && req->cached.len > 0 &&
        req->is_sse == req->stream &&
        (req->is_sse ? req->sse_ended && !req->sse_failed
                     : router__json_whole(req->cached.data, req->cached.len)) &&
        buf_printf(&value, "%" PRId64 "\n", req->cost_micro) == 0 &&
        buf_append(&value, req->cached.data, req->cached.len) == 0) {
        track(c->router, cache_put(c->router->store, req->tenant->id, &req->cache_key, value.data,
                                   value.len, 0, on_write_done, c->router));
        req->flight_leader = 0;
        cache_flight_finish(c->router->flights, &req->cache_key, value.data, value.len, NULL);
    } else {
        router__spend_flight_fail(c);
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
    answered(c); /* a cancelled begin is answered to no one */
    if (req->flight_waiting) {
        cache_flight_leave(c->router->flights, &req->waiter);
        req->flight_waiting = 0;
    }
    /* The hold goes back before the flight ends: its waiters choose
     * again at once, and would count it. */
    router__spend_overrun(c, 0);
    router__spend_release(c);
    if (req->flight_leader)
        router__spend_flight_fail(c);
}

void router__spend_flight_fail(struct router__client *c)
{
    struct router__request *req = &c->req;

    /* The followers read the leader's request (tried, candidate, route)
     * during the call: see on_flight_answer in proxy.c. */
    req->flight_leader = 0;
    cache_flight_finish(c->router->flights, &req->cache_key, NULL, 0, req);
}
