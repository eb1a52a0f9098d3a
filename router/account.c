/*
 * router/account.c: what each finished request leaves behind: one cost
 * log line and its Prometheus series.
 *
 * Label values come from the config (tenant id, route, backend name),
 * never from what a client sent, so clients cannot mint new series.
 */
#include <math.h>
#include <stdio.h>
#include <sys/time.h>

#include "conf/conf.h"
#include "metrics/metrics.h"
#include "backends/backend.h"
#include "cache/cache.h"
#include "policy/cost.h"
#include "router/internal.h"

/* Wall-clock ms since the epoch, for the cost log's ts. */
static int64_t wall_ms(void)
{
    struct timeval tv;

    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

/* The backend label of the metrics: as in the cost log, "cache" for a
 * cache hit (its pool is the one chosen before the lookup, which did no
 * work for it). */
static const char *backend_name(const struct router__request *req)
{
    if (req->cache_hit)
        return "cache";
    return req->pool ? req->pool->conf->name : "none";
}

/* One entry per route candidate, in route order, from the policy's last
 * verdicts: the chosen one has no rejection; a candidate tried earlier
 * in this request says "rate-limited" if it answered 429 (as one passed
 * over while cooling down from a 429 does), else "failed"; one this
 * request never called, passed over because the single-flight leader it
 * waited on had just left it, "leader-failed": the request's own log
 * says what happened to it, not to its twin. */
static size_t fill_candidates(const struct router__request *req, struct metrics_cost_candidate *out,
                              size_t max)
{
    size_t n = 0;

    if (req->route == NULL || req->verdicts == NULL)
        return 0;
    for (size_t i = 0; i < req->route->ncandidates && i < 64 && n < max; i++, n++) {
        const struct policy_verdict *v = &req->verdicts[i];
        uint64_t bit = UINT64_C(1) << i;
        int failed = (req->tried & bit) && (int)i != req->candidate;

        out[n].backend = req->route->candidates[i]->name;
        out[n].est_cost_usd = (double)v->cost_micro / 1e6;
        if (failed)
            out[n].rejected = req->leader_failed & bit  ? "leader-failed"
                              : req->answered_429 & bit ? "rate-limited"
                                                        : "failed";
        else if (v->kind == POLICY_VERDICT_CHOSEN && (int)i == req->candidate)
            out[n].rejected = NULL;
        else
            out[n].rejected = policy_verdict_name(v->kind);
    }
    return n;
}

/*
 * Whether the request's record carries no money, which the cost log may
 * skip while it is behind (metrics_cost_record.costless). Every
 * reservation and every cache lookup is made through the store's begin
 * (router__spend_begin counts them in `begins`), and every backend call
 * comes after one: a request with neither was refused before any of
 * them (unread, malformed, unauthenticated, parked, rate limited, over
 * budget before asking for a reservation). The other fields follow from
 * those today; they are checked all the same, so that a path added later
 * that charges or saves without a begin keeps its record.
 */
static int carries_no_money(const struct router__request *req)
{
    return req->begins == 0 && req->tried == 0 && !req->has_res && !req->settled &&
           !req->cache_hit && req->saved_micro == 0 && req->billed.prompt == 0 &&
           req->billed.completion == 0;
}

/* The tier whose rates priced the settled tokens, NULL for the standard
 * rates (a tier the backend gives no rates for bills at those). */
static const char *billed_tier_name(const struct router__request *req)
{
    int tier = req->billed.tier;

    if (!req->settled || req->pool == NULL || tier <= CONF_TIER_STANDARD ||
        tier >= CONF_TIER_COUNT || !req->pool->conf->tiers[tier].priced)
        return NULL;
    return conf_tier_name((enum conf_service_tier)tier);
}

/* Whether the request has a time to its first token: a plain answer's
 * head, a stream's first token (proxy.c's ttft_due). A stream that had
 * none, its client gone or the stream ended or broken before it, has no
 * TTFT: the time its head came (held, unseen by the client) is not one. */
static int has_ttft(const struct router__request *req)
{
    return req->response_started && !req->ttft_due;
}

void router__account(struct router__client *c)
{
    struct router *r = c->router;
    struct router__request *req = &c->req;
    struct metrics_cost_candidate cands[CONF_CANDIDATES_MAX]; /* one per candidate */
    struct metrics_cost_record rec = {0};
    uint64_t now = router__now(r);
    char status[8];
    const char *tenant = req->tenant ? req->tenant->id : "unauthenticated";
    const char *route = req->route ? req->route->model : "unknown";
    const char *backend = backend_name(req);

    if (req->inflight) {
        req->inflight = 0;
        metrics_add(r->metrics, METRICS_INFLIGHT_REQUESTS, NULL, -1);
    }
    if (!ROUTER_EP_PROXIED(req->endpoint) || req->accounted)
        return;
    req->accounted = 1;
    snprintf(status, sizeof(status), "%d", req->status ? req->status : 499);

    const char *req_labels[] = {tenant, backend, route, status};
    metrics_add(r->metrics, METRICS_REQUESTS_TOTAL, req_labels, 1);
    /* The tokens charged: the upstream's usage, or the router's own count
     * when it sent none (usage alone would leave those requests out). */
    if (req->billed.prompt > 0 || req->billed.completion > 0) {
        const char *prompt_labels[] = {tenant, backend, route, "prompt"};
        const char *completion_labels[] = {tenant, backend, route, "completion"};
        if (req->billed.prompt > 0)
            metrics_add(r->metrics, METRICS_TOKENS_TOTAL, prompt_labels, (double)req->billed.prompt);
        if (req->billed.completion > 0)
            metrics_add(r->metrics, METRICS_TOKENS_TOTAL, completion_labels,
                        (double)req->billed.completion);
    }
    if (req->settled && req->cost_usd > 0) {
        const char *cost_labels[] = {tenant, backend, route};
        metrics_add(r->metrics, METRICS_COST_USD_TOTAL, cost_labels, req->cost_usd);
    }
    if (req->cache_hit) {
        const char *t_labels[] = {tenant};
        metrics_add(r->metrics, METRICS_CACHE_HITS_TOTAL, t_labels, 1);
        metrics_add(r->metrics, METRICS_CACHE_SAVED_USD_TOTAL, t_labels,
                    (double)req->saved_micro / 1e6);
    }
    if (req->pool && !req->cache_hit) {
        const char *b_labels[] = {backend};
        metrics_observe(r->metrics, METRICS_REQUEST_DURATION_SECONDS, b_labels,
                        (double)(now - req->start_ms) / 1000.0);
        if (has_ttft(req) && req->ttft_ms > 0)
            metrics_observe(r->metrics, METRICS_TTFT_SECONDS, b_labels, (double)req->ttft_ms / 1000.0);
    }
    if (r->cost_log == NULL)
        return;
    rec.ts_ms = wall_ms() - (int64_t)(now - req->start_ms);
    rec.request_id = req->id_str;
    rec.tenant = req->tenant ? req->tenant->id : NULL;
    rec.key = req->tenant && req->key ? req->key->name : NULL;
    rec.tags = req->tenant ? req->tenant->tags : NULL;
    rec.ntags = req->tenant ? req->tenant->ntags : 0;
    rec.request_tags = req->tags;
    rec.nrequest_tags = req->ntags;
    rec.route = req->route ? req->route->model : NULL;
    rec.endpoint = router__endpoint_path(req->endpoint);
    rec.backend = req->pool ? req->pool->conf->name : NULL;
    rec.reason = req->reason;
    rec.arm = req->arm ? req->arm->name : NULL;
    rec.experiment = req->arm ? req->experiment : NULL;
    rec.candidates = cands;
    rec.ncandidates = fill_candidates(req, cands, sizeof(cands) / sizeof(cands[0]));
    rec.backend = req->cache_hit ? "cache" : rec.backend;
    rec.prompt_tokens_est = req->prompt_est;
    rec.prompt_tokens = req->prompt_tokens;
    rec.completion_tokens_est = req->completion_pred;
    rec.completion_tokens = req->completion_tokens;
    /* Known (0 when nothing was settled) wherever cost_usd is. */
    rec.billed_prompt_tokens = req->settled || req->route ? req->billed.prompt : -1;
    rec.billed_completion_tokens = req->settled || req->route ? req->billed.completion : -1;
    rec.service_tier = billed_tier_name(req);
    rec.billed_cached_tokens = req->settled || req->route ? req->billed.cached : -1;
    rec.billed_cache_write_tokens = req->settled || req->route ? req->billed.cache_write : -1;
    rec.billed_cache_write_1h_tokens =
        req->settled || req->route ? req->billed.cache_write_1h : -1;
    rec.billed_web_searches = req->settled || req->route ? req->billed.web_searches : -1;
    rec.billed_file_searches = req->settled || req->route ? req->billed.file_searches : -1;
    rec.cost_usd_est = req->choice.candidate >= 0 ? (double)req->choice.cost_micro / 1e6 : NAN;
    rec.cost_usd = req->settled ? req->cost_usd : (req->route ? 0.0 : NAN);
    rec.reported_cost_usd = req->reported_usd >= 0 ? req->reported_usd : NAN;
    rec.cache_hit = req->cache_hit;
    rec.saved_usd = (double)req->saved_micro / 1e6;
    rec.ttft_ms = has_ttft(req) ? (double)req->ttft_ms : NAN;
    rec.latency_ms = (double)(now - req->start_ms);
    rec.status = req->status ? req->status : 499;
    rec.fallbacks = (int)req->fallbacks;
    rec.costless = carries_no_money(req);
    metrics_cost_log_write(r->cost_log, &rec);
}

void router__account_idle(struct router *r)
{
    const struct conf *conf = r->conf;
    uint64_t now = router__now(r);

    for (size_t i = 0; i < conf->nbackends; i++) {
        const char *labels[] = {conf->backends[i].name};
        double idle;

        if (conf->backends[i].kind != CONF_BACKEND_SELF_HOSTED)
            continue;
        /* The pool accrues idle cost itself; the counter gets the increase. */
        idle = backend_idle_cost_usd(backend_set_get(r->backends, i), now);
        if (idle > r->idle_reported[i]) {
            metrics_add(r->metrics, METRICS_GPU_POOL_IDLE_COST_USD_TOTAL, labels,
                        idle - r->idle_reported[i]);
            r->idle_reported[i] = idle;
        }
    }
}

/* What the idle cost counter already has of the idle cost of `r`'s
 * backend `i`: as much as a live generation on the same pool's clock
 * reported (the clock's idle only grows, so the most). A pool that the
 * generation just before did not have (removed, then added again while
 * an older one still runs on it), or had under another name, keeps one
 * accounting (backend_set_create_after): starting from 0, the counter got
 * the pool's idle cost since the oldest of them began, again. */
static double idle_already_reported(const struct router *r, size_t i)
{
    const struct backend *b = backend_set_get(r->backends, i);
    double most = 0;

    for (const struct router *g = r->shared->generations; g != NULL; g = g->next_gen) {
        if (g == r)
            continue;
        for (size_t j = 0; j < g->conf->nbackends; j++)
            if (g->idle_reported[j] > most &&
                backend_same_clock(b, backend_set_get(g->backends, j)))
                most = g->idle_reported[j];
    }
    return most;
}

void router__account_carry(struct router *r, const struct router *old)
{
    const struct conf *conf = r->conf;

    for (size_t i = 0; i < conf->nbackends; i++) {
        const struct conf_backend *was = conf_find_backend(old->conf, conf->backends[i].name);

        if (conf->backends[i].kind == CONF_BACKEND_SELF_HOSTED)
            r->idle_reported[i] = idle_already_reported(r, i);
        if (was != NULL)
            r->pools[i].est_ratio = old->pools[was->index].est_ratio;
    }
}

void router__forget_gauges(struct router *r)
{
    static const enum metrics_id set_afresh[] = {
        METRICS_BUDGET_SPENT_USD,     METRICS_BUDGET_REMAINING_USD,
        METRICS_KEY_BUDGET_SPENT_USD, METRICS_KEY_BUDGET_REMAINING_USD,
        METRICS_GPU_POOL_UTILIZATION_RATIO, METRICS_TOKEN_ESTIMATE_RATIO};

    for (size_t i = 0; i < sizeof(set_afresh) / sizeof(set_afresh[0]); i++)
        metrics_clear(r->metrics, set_afresh[i]);
}

/* One subject's spend and remaining gauges, day and month (`day` and
 * `month`: its labels), remaining from the budget as enforced
 * (router__budget_micro), in micro-USD as the spend is. */
static void spend_gauges(struct router *r, enum metrics_id spent, enum metrics_id remaining,
                         struct router__spend *s, double daily_usd, double monthly_usd,
                         const char **day, const char **month)
{
    router__spend_roll(s);
    metrics_set(r->metrics, spent, day, (double)s->day_spent / 1e6);
    metrics_set(r->metrics, spent, month, (double)s->month_spent / 1e6);
    if (daily_usd > 0)
        metrics_set(r->metrics, remaining, day,
                    (double)(router__budget_micro(daily_usd) - s->day_spent) / 1e6);
    if (monthly_usd > 0)
        metrics_set(r->metrics, remaining, month,
                    (double)(router__budget_micro(monthly_usd) - s->month_spent) / 1e6);
}

/* Open connections to each backend, of every generation: those of the
 * current config's backends (0 too), and those of a backend a reload
 * removed while an older generation still has some open. Made afresh
 * (cleared first), so a removed backend's series goes with its last
 * connection; the table refill costs about what the scrape's text does. */
static void upstream_gauges(struct router *r)
{
    metrics_clear(r->metrics, METRICS_UPSTREAM_CONNECTIONS);
    for (struct router *g = r->shared->generations; g != NULL; g = g->next_gen)
        for (size_t i = 0; g->pools != NULL && i < g->conf->nbackends; i++) {
            const char *labels[] = {g->conf->backends[i].name};

            if (g == r || g->pools[i].nopen > 0)
                metrics_add(r->metrics, METRICS_UPSTREAM_CONNECTIONS, labels, g->pools[i].nopen);
        }
}

void router__refresh_gauges(struct router *r)
{
    struct router__shared *sh = r->shared;
    const struct conf *conf = r->conf;
    uint64_t now = router__now(r);
    struct cache_stats st;

    for (size_t i = 0; i < conf->ntenants; i++) {
        const struct conf_tenant *t = &conf->tenants[i];
        struct router__tenant *ts = &r->tenants[i];
        const char *day[] = {t->id, "day"}, *month[] = {t->id, "month"};

        spend_gauges(r, METRICS_BUDGET_SPENT_USD, METRICS_BUDGET_REMAINING_USD, &ts->spend,
                     t->daily_usd, t->monthly_usd, day, month);
        for (size_t k = 0; k < t->nkeys; k++) {
            const struct conf_key *key = &t->keys[k];
            const char *kday[] = {t->id, key->name, "day"}, *kmonth[] = {t->id, key->name, "month"};

            if (key->subject != NULL)
                spend_gauges(r, METRICS_KEY_BUDGET_SPENT_USD, METRICS_KEY_BUDGET_REMAINING_USD,
                             &ts->key_spend[k], key->daily_usd, key->monthly_usd, kday, kmonth);
        }
    }
    for (size_t i = 0; i < conf->nbackends; i++) {
        const struct backend *b = backend_set_get(r->backends, i);
        const char *labels[] = {conf->backends[i].name};

        if (!isnan(r->pools[i].est_ratio))
            metrics_set(r->metrics, METRICS_TOKEN_ESTIMATE_RATIO, labels, r->pools[i].est_ratio);
        if (conf->backends[i].kind != CONF_BACKEND_SELF_HOSTED)
            continue;
        metrics_set(r->metrics, METRICS_GPU_POOL_UTILIZATION_RATIO, labels,
                    backend_pool_utilization(b, now));
    }
    upstream_gauges(r);
    router__account_idle(r);
    if (r->cost_log)
        metrics_set(r->metrics, METRICS_COST_LOG_WAITING_BYTES, NULL,
                    (double)metrics_cost_log_waiting(r->cost_log));
    if (r->store) {
        const char *labels[] = {conf->redis_url ? "redis" : "memory"};

        cache_stats(r->store, &st);
        /* Connected but refusing writes is not up: every charge is being
         * journaled, and shared budgets no longer see this instance's spend. */
        metrics_set(r->metrics, METRICS_STORE_UP, labels,
                    st.state == CACHE_STATE_CONNECTED && !st.writes_refused);
        metrics_set(r->metrics, METRICS_STORE_INSTANCES, labels, st.instances);
        if (conf->redis_url) {
            metrics_set(r->metrics, METRICS_STORE_JOURNAL_ENTRIES, labels,
                        (double)st.journal_entries);
            /* Counters: what the store dropped since the last look, by
             * any generation (the store is made once, at start). */
            metrics_add(r->metrics, METRICS_STORE_JOURNAL_DROPPED_TOTAL, labels,
                        (double)(st.journal_dropped - sh->journal_dropped_seen));
            metrics_add(r->metrics, METRICS_STORE_JOURNAL_DROPPED_USD_TOTAL, labels,
                        (double)MAX(st.journal_dropped_amount - sh->journal_dropped_amount_seen,
                                    0) / 1e6);
            sh->journal_dropped_seen = st.journal_dropped;
            sh->journal_dropped_amount_seen = st.journal_dropped_amount;
        }
        if (conf->store_spend_file)
            metrics_set(r->metrics, METRICS_STORE_SPEND_FILE_FAILING, labels,
                        st.spend_file_failing);
    }
}
