/*
 * backends/cost.c: cost models, live load and GPU-time accounting.
 *
 * API backends are priced per token. A self-hosted pool is paid per
 * replica-hour whatever its load, so two questions get two answers:
 *
 * - chargeback: who used the GPU-seconds? An accounting clock runs over
 *   the pool. Between two events (attempt start or finish) with n attempts
 *   in flight on R replicas, each attempt is attributed min(1, R/n) GPU-s
 *   per second (a replica to itself while n <= R, an equal share of the R
 *   replicas beyond) and the R - min(n, R) unused replicas go to the idle
 *   accumulator. Every interval's R GPU-s per second are split without
 *   remainder, so sum(attributed) + idle == R x elapsed exactly. An
 *   attempt with nothing to bill (a failure, an error answer without
 *   usage) is charged nothing: its share moves to the idle accumulator
 *   when it ends, which keeps the sum exact.
 *   `share_ms` is the running integral of min(1, R/n) dt: an attempt's
 *   GPU-ms is its value at finish minus its value at start.
 *
 * - routing: what does one more request cost? Near nothing while the pool
 *   has headroom (its hours are paid anyway), rising to the pool's list
 *   cost (GPU-time of the tokens at rated throughput) where its predicted
 *   TTFT would break the tenant's SLO. docs/cost-model.md has the formulas.
 *
 * All of it is arithmetic on the loop times the router passes in.
 */
#include <math.h>

#include "backends/backend.h"
#include "backends/internal.h"
#include "conf/conf.h"

/* Marginal cost = list x x^EXPONENT with x the load relative to the SLO
 * knee: 6% of list at half the knee, 32% at three quarters. */
#define BACKEND_MARGINAL_EXPONENT 4
/* x is capped here so a pool far past its knee has a finite cost. */
#define BACKEND_MARGINAL_X_MAX 4.0

int backend__conf_replicas(const struct conf_backend *c)
{
    if (c->kind != CONF_BACKEND_SELF_HOSTED)
        return 0;
    return c->replicas > 0 ? c->replicas : 1;
}

int backend__replicas(const struct backend *b)
{
    return backend__conf_replicas(b->conf);
}

/* Concurrent request slots of a pool (replicas x max_concurrency), 0 when
 * unknown or for an API backend. */
static unsigned pool_slots(const struct backend *b)
{
    int r = backend__replicas(b);

    return r > 0 && b->conf->max_concurrency > 0 ? (unsigned)r * (unsigned)b->conf->max_concurrency
                                                   : 0;
}

/* Requests on the pool as routing sees them (of every config): attempts
 * in flight, and those chosen for it whose attempt has not begun yet. */
static unsigned routing_load(const struct backend *b)
{
    return b->clock->inflight + b->clock->chosen;
}

/* USD per GPU-ms of the pool `c` configures (0 if free). */
static double usd_per_gpu_ms(const struct conf_backend *c)
{
    return c->is_free ? 0 : c->gpu_hourly_usd / 3600e3;
}

void backend__advance(struct backend *b, uint64_t now_ms)
{
    struct backend_clock *k = b->clock;
    const struct backend *p = k->params ? k->params : b;
    int r = backend__replicas(p);
    double dt, busy, price = usd_per_gpu_ms(p->conf);

    if (!k->started) {
        k->started = 1;
        k->start_ms = k->at_ms = now_ms;
        return;
    }
    if (now_ms <= k->at_ms)
        return;
    dt = (double)(now_ms - k->at_ms);
    k->at_ms = now_ms;
    if (r == 0)
        return;
    busy = k->inflight < (unsigned)r ? k->inflight : (unsigned)r;
    if (k->inflight > 0) {
        k->share_ms += dt * busy / k->inflight;
        k->share_usd += dt * busy / k->inflight * price;
    }
    k->idle_ms += dt * (r - busy);
    k->idle_usd += dt * (r - busy) * price;
    k->pool_usd += dt * r * price;
}

void backend__ttft_probe_over(struct backend *b, const struct backend_ticket *t)
{
    if (t != NULL && t->ttft_probe != 0 && t->ttft_probe == b->ttft[t->answer].probes)
        b->ttft[t->answer].probing = 0;
}

void backend_attempt_begin(struct backend *b, uint64_t now_ms, enum backend_answer kind,
                           struct backend_ticket *t)
{
    struct backend_latency *l = &b->ttft[kind == BACKEND_STREAM];
    int was_probing = b->probing, was_ttft_probing = l->probing;

    backend_attempt_start(b, now_ms, kind);
    if (t != NULL) {
        t->start_ms = now_ms;
        t->share_mark_ms = b->clock->share_ms;
        t->share_mark_usd = b->clock->share_usd;
        t->probe = b->probing && !was_probing ? ++b->probes : 0;
        t->ttft_probe = l->probing && !was_ttft_probing ? ++l->probes : 0;
        t->answer = kind == BACKEND_STREAM;
    }
}

/* The fee of `calls` hosted tool calls at `usd_per_1k`: a price per call
 * on top of the tokens, whatever the prompt's size or the service tier. */
static double calls_usd(int64_t calls, double usd_per_1k)
{
    return calls > 0 ? (double)calls * usd_per_1k / 1000.0 : 0;
}

/* The web searches' and file search calls' fees. Counts that share one
 * cap (a hold for a Responses request's max_tool_calls, with both tools)
 * stand for that many calls of either kind: the dearer is held. */
static double tool_calls_usd(const struct conf_backend *c, const struct backend_tokens *tok)
{
    double web = calls_usd(tok->web_searches, c->web_search_usd_per_1k);
    double file = calls_usd(tok->file_searches, c->file_search_usd_per_1k);

    if (tok->searches_one_cap)
        return web > file ? web : file;
    return web + file;
}

double backend_api_price_usd(const struct conf_backend *c, const struct backend_tokens *tok)
{
    int64_t prompt = tok->prompt > 0 ? tok->prompt : 0;
    int64_t cached = tok->cached < 0 ? 0 : tok->cached > prompt ? prompt : tok->cached;
    int64_t completion = tok->completion > 0 ? tok->completion : 0;
    const struct conf_long_context *l = &c->long_context;
    /* Past the size, the provider bills the whole request at the long
     * rates, not only the tokens beyond it. */
    int is_long = l->above_prompt_tokens > 0 && prompt > l->above_prompt_tokens;
    double input = is_long ? l->input_usd_per_mtok : c->input_usd_per_mtok;
    double output = is_long ? l->output_usd_per_mtok : c->output_usd_per_mtok;
    double cached_price = is_long ? l->cached_input_usd_per_mtok : c->cached_input_usd_per_mtok;
    double write_price = is_long ? l->cache_write_usd_per_mtok : c->cache_write_usd_per_mtok;
    double write_1h_price = is_long ? l->cache_write_1h_usd_per_mtok
                                    : c->cache_write_1h_usd_per_mtok;
    /* Written tokens are prompt tokens too, neither cached nor plain; of
     * them, those kept an hour cost more. */
    int64_t written = tok->cache_write < 0                 ? 0
                      : tok->cache_write > prompt - cached ? prompt - cached
                                                           : tok->cache_write;
    int64_t hour = tok->cache_write_1h < 0         ? 0
                   : tok->cache_write_1h > written ? written
                                                   : tok->cache_write_1h;

    if (c->kind != CONF_BACKEND_API || c->is_free)
        return 0;
    if (tok->tier > CONF_TIER_STANDARD && tok->tier < CONF_TIER_COUNT &&
        c->tiers[tok->tier].priced) {
        const struct conf_tier_rates *t = &c->tiers[tok->tier];

        input = t->input_usd_per_mtok;
        output = t->output_usd_per_mtok;
        cached_price = t->cached_input_usd_per_mtok;
    }
    return ((double)(prompt - cached - written) * input + (double)cached * cached_price +
            (double)(written - hour) * write_price + (double)hour * write_1h_price +
            (double)completion * output) /
               1e6 +
           tool_calls_usd(c, tok);
}

/* Did an attempt that ended with `used` produce something to bill? A
 * failure (no `used`) and an error answer without usage bill no tokens. */
static int billable(const struct backend_tokens *used)
{
    return used->prompt > 0 || used->completion > 0;
}

struct backend_charge backend_attempt_finish(struct backend *b, uint64_t now_ms,
                                             const struct backend_ticket *t,
                                             const struct backend_tokens *used)
{
    struct backend_charge ch = {0};
    static const struct backend_tokens none;

    if (used == NULL)
        used = &none;
    backend__advance(b, now_ms);
    if (t != NULL && t->probe != 0 && t->probe == b->probes) {
        /* A probe that ends with neither a success nor a failure (its
         * client left, the router ran out of descriptors) told nothing:
         * the next request probes, or the circuit would never close. */
        b->probing = 0;
    }
    /* Likewise a latency probe without a first byte: the average is still
     * stale, and nobody else would re-measure it. */
    backend__ttft_probe_over(b, t);
    if (t != NULL) {
        ch.duration_ms = now_ms > t->start_ms ? now_ms - t->start_ms : 0;
        if (backend__replicas(b) > 0) {
            ch.gpu_seconds = (b->clock->share_ms - t->share_mark_ms) / 1000.0;
            ch.usd = b->clock->share_usd - t->share_mark_usd; /* priced as it passed */
        }
    }
    backend_attempt_end(b);
    if (used->completion > 0) {
        backend_tokens_served(b, now_ms, used->completion);
        if (t != NULL && !used->partial)
            backend__ewma(&b->duration_ewma_ms, (double)ch.duration_ms);
    }
    if (!billable(used)) {
        /* Nobody is charged for it, as an API does not bill what it
         * refuses; the pool's time still passed, so it is unattributed
         * (idle) and attributed + idle stays R x elapsed. */
        b->clock->idle_ms += ch.gpu_seconds * 1000.0;
        b->clock->idle_usd += ch.usd;
        ch.gpu_seconds = 0;
        ch.usd = 0;
    }
    if (backend__replicas(b) == 0)
        ch.usd = b->conf->cost_from_usage && used->reported && !b->conf->is_free
                     ? used->reported_usd /* what the host bills, whatever its prices */
                     : backend_api_price_usd(b->conf, used);
    ch.micro_usd = backend_usd_to_micro(ch.usd);
    return ch;
}

void backend_tokens_served(struct backend *b, uint64_t now_ms, int64_t tokens)
{
    uint64_t sec = now_ms / 1000;
    unsigned slot = (unsigned)(sec % BACKEND_WINDOW_S);

    backend__advance(b, now_ms);
    if (b->window_sec[slot] != sec) {
        b->window_sec[slot] = sec;
        b->window_tokens[slot] = 0;
    }
    if (tokens > 0)
        b->window_tokens[slot] += tokens;
}

double backend_tokens_per_second(const struct backend *b, uint64_t now_ms)
{
    uint64_t sec = now_ms / 1000;
    int64_t sum = 0;
    double span_s, elapsed_s;

    for (unsigned i = 0; i < BACKEND_WINDOW_S; i++)
        if (b->window_sec[i] <= sec && b->window_sec[i] + BACKEND_WINDOW_S > sec)
            sum += b->window_tokens[i];
    /* The window is W-1 whole seconds plus the current partial one, and no
     * longer than the clock has run; at least 1 s so a first burst does not
     * read as an enormous rate. */
    span_s = (BACKEND_WINDOW_S - 1) + (double)(now_ms % 1000) / 1000.0;
    elapsed_s = b->clock->started && now_ms > b->clock->start_ms
                    ? (double)(now_ms - b->clock->start_ms) / 1000.0
                    : 0;
    if (elapsed_s < span_s)
        span_s = elapsed_s;
    if (span_s < 1)
        span_s = 1;
    return (double)sum / span_s;
}

double backend_duration_ewma_ms(const struct backend *b)
{
    return b->duration_ewma_ms;
}

double backend_predicted_ttft_ms(const struct backend *b, uint64_t now_ms,
                                 enum backend_answer kind)
{
    unsigned slots = pool_slots(b), inflight = routing_load(b); /* every config's */
    double ttft = backend__ttft_ms(b, now_ms, kind);

    if (slots > 0 && inflight >= slots)
        ttft += (double)(inflight - slots + 1) * b->duration_ewma_ms / slots;
    return ttft;
}

/* Throughput utilization: tokens/s over the window / rated pool tokens/s. */
static double throughput_utilization(const struct backend *b, uint64_t now_ms)
{
    int r = backend__replicas(b);

    if (r == 0 || b->conf->tokens_per_second <= 0)
        return 0;
    return backend_tokens_per_second(b, now_ms) / (r * b->conf->tokens_per_second);
}

double backend_pool_utilization(const struct backend *b, uint64_t now_ms)
{
    unsigned slots = pool_slots(b);
    double conc = slots > 0 ? (double)b->clock->inflight / slots : 0;
    double tput = throughput_utilization(b, now_ms);

    return conc > tput ? conc : tput;
}

/* Requests in flight (the new one included) at which the predicted TTFT
 * reaches `slo_ms`: all slots, plus as many queued as the SLO's slack
 * over the TTFT average allows (each queued request waits duration/slots
 * longer). 0 when the SLO is broken even with an idle pool.
 * The duration average is not re-checked when stale as the TTFT one is:
 * it only prices the queue, and a pool nobody is sent to drains, so with
 * slack >= 0 the knee is at least the slots and an idle pool costs at
 * most its list price whatever the average says: it cannot shut a
 * backend out. Whatever the backend serves, probes included, refreshes
 * it. */
static double knee_requests(const struct backend *b, uint64_t now_ms, int slo_ms,
                            enum backend_answer kind)
{
    unsigned slots = pool_slots(b);
    double slack = slo_ms - backend__ttft_ms(b, now_ms, kind);

    if (slo_ms <= 0 || b->duration_ewma_ms <= 0)
        return slots;
    if (slack < 0)
        return 0;
    return slots + floor(slack * slots / b->duration_ewma_ms);
}

struct backend_cost backend_estimate_cost(const struct backend *b, uint64_t now_ms,
                                          const struct backend_tokens *tok, int slo_ms,
                                          enum backend_answer kind)
{
    struct backend_cost c = {0};
    const struct conf_backend *cf = b->conf;
    double x = 0, knee, tput;

    if (cf->is_free)
        return c;
    if (backend__replicas(b) == 0) {
        c.list_usd = c.marginal_usd = backend_api_price_usd(cf, tok);
    } else {
        if (cf->tokens_per_second > 0 && tok->completion > 0)
            c.list_usd = cf->gpu_hourly_usd / 3600.0 * (double)tok->completion /
                         cf->tokens_per_second;
        if (pool_slots(b) > 0) {
            knee = knee_requests(b, now_ms, slo_ms, kind);
            x = knee > 0 ? (routing_load(b) + 1.0) / knee : BACKEND_MARGINAL_X_MAX;
        }
        tput = throughput_utilization(b, now_ms);
        if (tput > x)
            x = tput;
        if (x > BACKEND_MARGINAL_X_MAX)
            x = BACKEND_MARGINAL_X_MAX;
        c.marginal_usd = c.list_usd * pow(x, BACKEND_MARGINAL_EXPONENT);
    }
    c.reserve_micro = backend_usd_to_micro_ceil(c.list_usd);
    return c;
}

/* One of the pool's sums at `now_ms`, the stretch since its last event
 * (not yet folded in) included: idle GPU-ms, idle USD, or the pool's whole
 * cost in USD. 0 for an API backend or a clock not started. */
enum { SUM_IDLE_MS, SUM_IDLE_USD, SUM_POOL_USD, SUMS };

static double pool_sum_at(const struct backend *b, uint64_t now_ms, int which)
{
    const struct backend_clock *k = b->clock;
    const struct backend *p = k->params ? k->params : b;
    int r = backend__replicas(p);
    double dt, price = usd_per_gpu_ms(p->conf), out[SUMS];
    unsigned busy;

    if (backend__replicas(b) == 0 || !k->started)
        return 0;
    busy = k->inflight < (unsigned)r ? k->inflight : (unsigned)r;
    dt = now_ms > k->at_ms ? (double)(now_ms - k->at_ms) : 0;
    out[SUM_IDLE_MS] = k->idle_ms + dt * (r - busy);
    out[SUM_IDLE_USD] = k->idle_usd + dt * (r - busy) * price;
    out[SUM_POOL_USD] = k->pool_usd + dt * r * price;
    return out[which];
}

double backend_idle_gpu_seconds(const struct backend *b, uint64_t now_ms)
{
    return pool_sum_at(b, now_ms, SUM_IDLE_MS) / 1000.0;
}

double backend_idle_cost_usd(const struct backend *b, uint64_t now_ms)
{
    return pool_sum_at(b, now_ms, SUM_IDLE_USD);
}

double backend_pool_cost_usd(const struct backend *b, uint64_t now_ms)
{
    return pool_sum_at(b, now_ms, SUM_POOL_USD);
}

/* Float noise below a millionth of a micro-USD is not a micro-USD. */
#define BACKEND_MICRO_EPSILON 1e-6

/* The clamps both roundings share, on micro-USD still a double: nothing
 * for what is not a positive amount (a NaN fails every comparison), the
 * ceiling past it, so that the conversion to an integer is defined. */
static int micro_clamped(double micro, int64_t *out)
{
    if (!(micro > 0)) {
        *out = 0;
        return 1;
    }
    if (micro >= (double)BACKEND_MICRO_MAX) {
        *out = BACKEND_MICRO_MAX;
        return 1;
    }
    return 0;
}

int64_t backend_usd_to_micro_ceil(double usd)
{
    double micro = ceil(usd * 1e6 - BACKEND_MICRO_EPSILON);
    int64_t out;

    return micro_clamped(micro, &out) ? out : (int64_t)micro;
}

int64_t backend_usd_to_micro(double usd)
{
    double micro = usd * 1e6;
    int64_t out;

    return micro_clamped(micro, &out) ? out : llround(micro);
}
