/* tests/backends/test_cost.c: backends/cost.c prices, GPU pool load,
 * marginal cost, predicted TTFT and chargeback accounting. */
#include <criterion/criterion.h>
#include <libfyaml.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"
#include "conf/conf.h"
#include "tests/support/cost_fixture.h"

/* Money compared at a millionth of a micro-USD. */
#define USD_EPS 1e-12

struct price_case {
    const char *name;
    int backend;            /* FX_ index */
    int64_t prompt, completion, cached;
    double usd;             /* by hand, in the comment */
    int64_t reserve_micro;  /* usd rounded up to micro-USD */
};

static const struct price_case price_cases[] = {
    /* 1000 x 0.15/1M + 500 x 0.60/1M = 0.00015 + 0.0003 = 0.00045 */
    {"mini 1000+500", FX_MINI, 1000, 500, 0, 0.00045, 450},
    /* 1000 x 2.50/1M + 500 x 10/1M = 0.0025 + 0.005 = 0.0075 */
    {"4o 1000+500", FX_4O, 1000, 500, 0, 0.0075, 7500},
    /* 200 x 2.50/1M + 800 x 1.25/1M + 500 x 10/1M = 0.0005 + 0.001 + 0.005 = 0.0065 */
    {"4o 800 of 1000 cached", FX_4O, 1000, 500, 800, 0.0065, 6500},
    /* 2000 x 3/1M + 1000 x 15/1M = 0.006 + 0.015 = 0.021 */
    {"sonnet 2000+1000", FX_SONNET, 2000, 1000, 0, 0.021, 21000},
    /* 100000 cached of 100000 x 0.30/1M + 0 = 0.03 */
    {"sonnet all cached", FX_SONNET, 100000, 0, 100000, 0.03, 30000},
    /* cached > prompt is clamped to the prompt: 10 x 0.075/1M = 0.00000075 */
    {"mini cached clamped", FX_MINI, 10, 0, 50, 0.00000075, 1},
    /* 1 x 0.15/1M = 0.00000015: reserve rounds up to 1 micro-USD */
    {"mini one token", FX_MINI, 1, 0, 0, 0.00000015, 1},
    {"nothing", FX_4O, 0, 0, 0, 0, 0},
};

Test(cost, api_prices_by_hand, .timeout = 5)
{
    struct fx f;

    fx_init(&f);
    for (size_t i = 0; i < sizeof(price_cases) / sizeof(price_cases[0]); i++) {
        const struct price_case *c = &price_cases[i];
        struct backend_tokens tok = {.prompt = c->prompt, .completion = c->completion,
                                     .cached = c->cached};
        struct backend_cost est = backend_estimate_cost(fx_backend(&f, c->backend), 0, &tok, 0,
                                                        BACKEND_PLAIN);

        cr_assert(fabs(backend_api_price_usd(&f.backends[c->backend], &tok) - c->usd) < USD_EPS,
                  "%s: price %.12f, want %.12f", c->name,
                  backend_api_price_usd(&f.backends[c->backend], &tok), c->usd);
        cr_assert(fabs(est.list_usd - c->usd) < USD_EPS, "%s: list", c->name);
        /* An API backend's marginal cost is its price. */
        cr_assert(fabs(est.marginal_usd - c->usd) < USD_EPS, "%s: marginal", c->name);
        cr_assert_eq(est.reserve_micro, c->reserve_micro, "%s: reserve %lld, want %lld", c->name,
                     (long long)est.reserve_micro, (long long)c->reserve_micro);
    }
    fx_fini(&f);
}

Test(cost, a_cached_price_of_0_bills_cached_tokens_nothing_and_free_is_zero, .timeout = 5)
{
    struct fx f;
    struct backend_tokens tok = {.prompt = 1000, .cached = 1000, .tier = CONF_TIER_STANDARD};

    fx_init(&f);
    /* A cached price of 0 is a price (a host that does not bill cache
     * reads), not none: conf/ gives one unset the input price. */
    f.backends[FX_MINI].cached_input_usd_per_mtok = 0;
    cr_assert_eq(backend_api_price_usd(&f.backends[FX_MINI], &tok), 0);
    tok.prompt = 1500; /* the 500 not cached at 0.15/1M */
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_MINI], &tok) - 0.000075) < USD_EPS);
    f.backends[FX_MINI].is_free = 1;
    cr_assert_eq(backend_api_price_usd(&f.backends[FX_MINI], &tok), 0);
    cr_assert_eq(backend_estimate_cost(fx_backend(&f, FX_MINI), 0, &tok, 0,
                 BACKEND_PLAIN).reserve_micro, 0);
    fx_fini(&f);
}

/* Claude Sonnet's 1M-context rates (conf/prices.yaml): past 200k prompt
 * tokens every token of the request is billed at them. */
static void fx_sonnet_long(struct fx *f)
{
    f->backends[FX_SONNET].long_context =
        (struct conf_long_context){200000, 6.00, 22.50, 0.60, 7.50, 12.00};
}

Test(cost, long_context_rates_bill_the_whole_request_past_the_size, .timeout = 5)
{
    static const struct price_case cases[] = {
        /* at the size, not past it: 200000 x 3/1M + 1000 x 15/1M = 0.6 + 0.015 */
        {"sonnet at 200k", FX_SONNET, 200000, 1000, 0, 0.615, 615000},
        /* one token past: 200001 x 6/1M + 1000 x 22.5/1M = 1.200006 + 0.0225 */
        {"sonnet 200k+1", FX_SONNET, 200001, 1000, 0, 1.222506, 1222506},
        /* 200000 x 6/1M + 100000 cached x 0.6/1M = 1.2 + 0.06: cached count toward the size */
        {"sonnet 300k, 100k cached", FX_SONNET, 300000, 0, 100000, 1.26, 1260000},
        /* 150000 of them cached, still past: 50001 x 6/1M + 150000 x 0.6/1M + 0 */
        {"sonnet mostly cached", FX_SONNET, 200001, 0, 150000, 0.390006, 390006},
    };
    struct fx f;

    fx_init(&f);
    fx_sonnet_long(&f);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct price_case *c = &cases[i];
        struct backend_tokens tok = {.prompt = c->prompt, .completion = c->completion,
                                     .cached = c->cached};
        struct backend_cost est = backend_estimate_cost(fx_backend(&f, c->backend), 0, &tok, 0,
                                                        BACKEND_PLAIN);
        double got = backend_api_price_usd(&f.backends[c->backend], &tok);

        cr_assert(fabs(got - c->usd) < USD_EPS, "%s: price %.12f, want %.12f", c->name, got,
                  c->usd);
        cr_assert(fabs(est.marginal_usd - c->usd) < USD_EPS, "%s: ranked by it", c->name);
        cr_assert_eq(est.reserve_micro, c->reserve_micro, "%s: reserve %lld, want %lld", c->name,
                     (long long)est.reserve_micro, (long long)c->reserve_micro);
    }
    fx_fini(&f);
}

Test(cost, long_context_without_a_size_or_cached_rate, .timeout = 5)
{
    struct backend_tokens tok = {.prompt = 300000, .cached = 300000, .tier = CONF_TIER_STANDARD};
    struct fx f;

    fx_init(&f);
    fx_sonnet_long(&f);
    /* No cached rate in the tier: conf/ gives it the tier's input rate,
     * 300000 x 6/1M, as the base rates fall back to theirs. */
    f.backends[FX_SONNET].long_context.cached_input_usd_per_mtok =
        f.backends[FX_SONNET].long_context.input_usd_per_mtok;
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_SONNET], &tok) - 1.8) < USD_EPS);
    /* Size 0: no tier, whatever the rates say: 300000 x 0.30/1M. */
    f.backends[FX_SONNET].long_context.above_prompt_tokens = 0;
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_SONNET], &tok) - 0.09) < USD_EPS);
    fx_fini(&f);
}

/* A service tier's rates replace the standard ones, the long-prompt
 * ones too; a tier the backend gives no rates for bills at the standard
 * rates. gpt-4o: standard 2.50 / 10 / 1.25, flex here 1 / 4 / 0.5,
 * priority not priced. */
Test(cost, a_service_tier_bills_at_its_rates, .timeout = 5)
{
    struct backend_tokens tok = {.prompt = 1000, .completion = 500, .cached = 400};
    struct conf_backend *b;
    struct fx f;

    fx_init(&f);
    b = &f.backends[FX_4O];
    b->tiers[CONF_TIER_FLEX] = (struct conf_tier_rates){
        .priced = 1, .input_usd_per_mtok = 1, .output_usd_per_mtok = 4,
        .cached_input_usd_per_mtok = 0.5};
    b->long_context = (struct conf_long_context){.above_prompt_tokens = 10,
                                                 .input_usd_per_mtok = 100,
                                                 .output_usd_per_mtok = 100,
                                                 .cached_input_usd_per_mtok = 100};
    tok.tier = CONF_TIER_FLEX; /* 600 x 1 + 400 x 0.5 + 500 x 4 */
    cr_assert(fabs(backend_api_price_usd(b, &tok) - 0.0028) < USD_EPS, "%.9f",
              backend_api_price_usd(b, &tok));
    cr_assert_eq(backend_estimate_cost(fx_backend(&f, FX_4O), 0, &tok, 0,
                 BACKEND_PLAIN).reserve_micro, 2800,
                 "held at them");
    tok.tier = CONF_TIER_PRIORITY; /* not priced: standard, long past 10 tokens */
    cr_assert(fabs(backend_api_price_usd(b, &tok) - 0.15) < USD_EPS);
    b->long_context.above_prompt_tokens = 0;
    cr_assert(fabs(backend_api_price_usd(b, &tok) - 0.0070) < USD_EPS, "%.9f",
              backend_api_price_usd(b, &tok)); /* 600 x 2.5 + 400 x 1.25 + 500 x 10 */
    tok.tier = CONF_TIER_COUNT; /* out of range: standard */
    cr_assert(fabs(backend_api_price_usd(b, &tok) - 0.0070) < USD_EPS);
    fx_fini(&f);
}

Test(cost, api_finish_settles_real_usage, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_ticket t;
    struct backend_tokens used = {.prompt = 1000, .completion = 500, .tier = CONF_TIER_STANDARD};
    struct backend_charge ch;

    fx_init(&f);
    b = fx_backend(&f, FX_MINI);
    backend_attempt_begin(b, 100, BACKEND_PLAIN, &t);
    cr_assert_eq(backend_inflight(b), 1);
    ch = backend_attempt_finish(b, 1600, &t, &used);
    cr_assert_eq(backend_inflight(b), 0);
    cr_assert_eq(ch.duration_ms, 1500);
    cr_assert_eq(ch.gpu_seconds, 0);
    cr_assert_eq(ch.micro_usd, 450); /* 0.00045 USD, as above */
    /* API backends have no pool: no idle cost, no pool cost. */
    cr_assert_eq(backend_idle_cost_usd(b, 10000), 0);
    cr_assert_eq(backend_pool_cost_usd(b, 10000), 0);
    fx_fini(&f);
}

/* An answer whose usage says what it cost: a backend with cost_from_usage
 * settles that amount, whatever its token prices; one without settles its
 * tokens (the figure is only logged); a free backend settles nothing. */
Test(cost, a_reported_cost_is_settled_only_by_a_cost_from_usage_backend, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_ticket t;
    struct backend_tokens used = {.prompt = 1000, .completion = 500, .tier = CONF_TIER_STANDARD,
                                  .reported = 1, .reported_usd = 0.012345};
    struct backend_charge ch;

    fx_init(&f);
    b = fx_backend(&f, FX_MINI);
    backend_attempt_begin(b, 100, BACKEND_PLAIN, &t);
    ch = backend_attempt_finish(b, 200, &t, &used);
    cr_assert_eq(ch.micro_usd, 450, "tokens at the backend's prices");
    f.backends[FX_MINI].cost_from_usage = 1;
    backend_attempt_begin(b, 300, BACKEND_PLAIN, &t);
    ch = backend_attempt_finish(b, 400, &t, &used);
    cr_assert_eq(ch.micro_usd, 12345, "the reported cost");
    cr_assert(fabs(ch.usd - 0.012345) < USD_EPS);
    used.reported = 0;
    backend_attempt_begin(b, 500, BACKEND_PLAIN, &t);
    ch = backend_attempt_finish(b, 600, &t, &used);
    cr_assert_eq(ch.micro_usd, 450, "no report: the tokens");
    used.reported = 1;
    f.backends[FX_MINI].is_free = 1;
    backend_attempt_begin(b, 700, BACKEND_PLAIN, &t);
    ch = backend_attempt_finish(b, 800, &t, &used);
    cr_assert_eq(ch.micro_usd, 0, "free");
    fx_fini(&f);
}

/* A reloaded config keeps a pool's accounting clock (by the pool's
 * name): an attempt begun under the old config and one under the new
 * share the replicas, the pool's in-flight count (its load) has both, and
 * attributed + idle stays R x elapsed across them. So does a pool with
 * other replicas or price (see below); an API backend's clock is never
 * shared. */
Test(cost, a_reload_keeps_a_same_pools_clock, .timeout = 5)
{
    struct fx f;
    struct conf_backend again[FX_N];
    struct conf conf2;
    struct backend_set *next;
    struct backend *old_gpu, *new_gpu;
    struct backend_ticket t_old, t_new;
    struct backend_charge a, b;
    static const struct backend_tokens served = {.prompt = 100, .completion = 200,
                                                 .tier = CONF_TIER_STANDARD};

    fx_init(&f);
    memcpy(again, f.backends, sizeof(again));
    conf2 = f.conf;
    conf2.backends = again;
    next = backend_set_create_after(&conf2, f.set);
    cr_assert_not_null(next);
    old_gpu = fx_backend(&f, FX_GPU);
    new_gpu = backend_set_get(next, FX_GPU);
    cr_assert(backend_same_clock(old_gpu, new_gpu));
    cr_assert_not(backend_same_clock(fx_backend(&f, FX_MINI), backend_set_get(next, FX_MINI)));
    /* 2 replicas: one attempt on each config from 0 to 1000 ms, a third
     * (new config) from 500 ms: 3 in flight on 2 replicas then. */
    backend_attempt_begin(old_gpu, 0, BACKEND_PLAIN, &t_old);
    backend_attempt_begin(new_gpu, 0, BACKEND_PLAIN, &t_new);
    cr_assert_eq(backend_pool_utilization(new_gpu, 0), 2.0 / 8, "the pool's load has both");
    backend_attempt_begin(new_gpu, 500, BACKEND_PLAIN, NULL);
    a = backend_attempt_finish(old_gpu, 1000, &t_old, &served);
    b = backend_attempt_finish(new_gpu, 1000, &t_new, &served);
    /* each: 0.5 s alone on a replica + 0.5 s x 2/3 */
    cr_assert(fabs(a.gpu_seconds - (0.5 + 1.0 / 3)) < 1e-9, "%f", a.gpu_seconds);
    cr_assert(fabs(b.gpu_seconds - (0.5 + 1.0 / 3)) < 1e-9, "%f", b.gpu_seconds);
    /* the third's share so far (1/3 s) and no idle: 2 x 1 s in all */
    cr_assert(fabs(backend_idle_gpu_seconds(new_gpu, 1000)) < 1e-9, "%f",
              backend_idle_gpu_seconds(new_gpu, 1000));
    backend_set_destroy(next);
    /* Other replicas: the same pool. */
    again[FX_GPU].replicas = 3;
    next = backend_set_create_after(&conf2, f.set);
    cr_assert_not_null(next);
    cr_assert(backend_same_clock(old_gpu, backend_set_get(next, FX_GPU)));
    backend_set_destroy(next);
    fx_fini(&f);
}

/* A reload that changes a pool's replicas and price (1 replica at $3.60/h,
 * 1 micro-USD per GPU-ms, to 2 at $7.20/h, 2) keeps its clock: up to the
 * new config's start the old ones run it, then the new ones, for the old
 * config's attempt too. Its own clock for the new config booked the
 * replica idle while the old attempt ran on it and was charged for it:
 * attributed + idle passed the pool's cost by that time. */
Test(cost, a_reload_that_changes_a_pool_prices_each_stretch_at_its_time, .timeout = 5)
{
    struct fx f;
    struct conf_backend again[FX_N];
    struct conf conf2;
    struct backend_set *next;
    struct backend *old_gpu, *new_gpu;
    struct backend_ticket t;
    struct backend_charge a;
    static const struct backend_tokens served = {.prompt = 100, .completion = 200,
                                                 .tier = CONF_TIER_STANDARD};

    fx_init(&f);
    f.backends[FX_GPU].replicas = 1;
    f.backends[FX_GPU].gpu_hourly_usd = 3.60;
    old_gpu = fx_backend(&f, FX_GPU);
    backend_attempt_begin(old_gpu, 0, BACKEND_PLAIN, &t);
    memcpy(again, f.backends, sizeof(again));
    again[FX_GPU].replicas = 2;
    again[FX_GPU].gpu_hourly_usd = 7.20;
    conf2 = f.conf;
    conf2.backends = again;
    next = backend_set_create_after(&conf2, f.set);
    cr_assert_not_null(next);
    new_gpu = backend_set_get(next, FX_GPU);
    cr_assert(backend_same_clock(old_gpu, new_gpu));
    backend_set_start(next, 1000);
    /* 0-1000 ms: 1 replica, busy, at 1 micro-USD a GPU-ms; 1000-2000 ms: 2
     * replicas, one busy, one idle, at 2. */
    a = backend_attempt_finish(old_gpu, 2000, &t, &served);
    cr_assert(fabs(a.gpu_seconds - 2.0) < 1e-9, "%f", a.gpu_seconds);
    cr_assert_eq(a.micro_usd, 1000 + 2000);
    cr_assert(fabs(backend_idle_gpu_seconds(new_gpu, 2000) - 1.0) < 1e-9);
    cr_assert(fabs(backend_idle_cost_usd(new_gpu, 2000) - 0.002) < 1e-12);
    cr_assert(fabs(backend_pool_cost_usd(new_gpu, 2000) - 0.005) < 1e-12);
    cr_assert(fabs(backend_pool_cost_usd(old_gpu, 2000) - 0.005) < 1e-12, "one pool, one cost");
    /* and on, at the new ones: 2 idle replicas at 2 */
    cr_assert(fabs(backend_idle_cost_usd(new_gpu, 3000) - 0.006) < 1e-12);
    backend_set_destroy(next);
    fx_fini(&f);
}

/* A pool is found among the clocks of every live config, not only the
 * config just before: one that a config removed and the next one has
 * again, while the first still runs on it, keeps one clock. So does one
 * renamed at the same url (the same servers); not one at another url,
 * nor one of two pools at that url (which one it is would be a guess). */
Test(cost, a_pool_back_or_renamed_at_its_url_keeps_its_clock, .timeout = 5)
{
    struct fx f;
    struct conf_backend again[FX_N + 1];
    struct conf without, back;
    struct backend_set *next, *third;
    struct backend *old_gpu;

    fx_init(&f);
    backend_set_destroy(f.set);
    f.backends[FX_GPU].url = "http://gpu.internal:8000/v1";
    f.set = backend_set_create(&f.conf);
    old_gpu = fx_backend(&f, FX_GPU);
    without = f.conf;
    without.nbackends = FX_GPU; /* the API backends alone */
    next = backend_set_create_after(&without, f.set);
    cr_assert_not_null(next);
    memcpy(again, f.backends, sizeof(f.backends));
    back = f.conf;
    back.backends = again;
    third = backend_set_create_after(&back, next);
    cr_assert_not_null(third);
    cr_assert(backend_same_clock(old_gpu, backend_set_get(third, FX_GPU)), "back by its name");
    backend_set_destroy(third);
    again[FX_GPU].name = "llama-gpu-b";
    third = backend_set_create_after(&back, next);
    cr_assert(backend_same_clock(old_gpu, backend_set_get(third, FX_GPU)), "renamed, same url");
    backend_set_destroy(third);
    again[FX_GPU].url = "http://gpu2.internal:8000/v1";
    third = backend_set_create_after(&back, next);
    cr_assert_not(backend_same_clock(old_gpu, backend_set_get(third, FX_GPU)), "another url");
    backend_set_destroy(third);
    again[FX_GPU].url = f.backends[FX_GPU].url;
    again[FX_N] = again[FX_GPU];
    again[FX_N].name = "llama-gpu-c";
    again[FX_N].index = FX_N;
    back.nbackends = FX_N + 1;
    third = backend_set_create_after(&back, next);
    cr_assert_not(backend_same_clock(old_gpu, backend_set_get(third, FX_GPU)), "two there");
    cr_assert_not(backend_same_clock(old_gpu, backend_set_get(third, FX_N)), "two there");
    backend_set_destroy(third);
    backend_set_destroy(next);
    fx_fini(&f);
}

/* Start `n` attempts on the GPU pool at `now` (their tickets discarded). */
static void load_pool(struct backend *b, unsigned n, uint64_t now)
{
    for (unsigned i = 0; i < n; i++)
        backend_attempt_begin(b, now, BACKEND_PLAIN, NULL);
}

struct gpu_case {
    unsigned inflight;     /* attempts in flight before the new request */
    double ttft_ms;        /* predicted TTFT */
    double marginal_share; /* marginal / list */
};

/* The pool after fx_gpu_history(200 ms TTFT, 2000 ms duration): 8 slots
 * (2 replicas x 4). A request finding n in flight waits
 * max(0, n - 8 + 1) x 2000/8 ms for a slot: predicted TTFT
 * 200 + 250 x max(0, n - 7). With a 1000 ms SLO the knee is at
 * 8 + floor((1000 - 200) x 8 / 2000) = 11 requests in flight (the new one
 * included): marginal = list x ((n + 1) / 11)^4. */
static const struct gpu_case gpu_cases[] = {
    {0, 200, 1.0 / 14641},           /* (1/11)^4 */
    {3, 200, 256.0 / 14641},         /* (4/11)^4 = 0.0175 */
    {5, 200, 1296.0 / 14641},        /* (6/11)^4 = 0.0885 */
    {7, 200, 4096.0 / 14641},        /* last free slot: (8/11)^4 = 0.28 */
    {8, 450, 6561.0 / 14641},        /* first queued: 200 + 250 */
    {10, 950, 1.0},                  /* 200 + 3 x 250: last within the SLO, at list */
    {11, 1200, 20736.0 / 14641},     /* 200 + 4 x 250 breaks the SLO: (12/11)^4 */
};

Test(cost, gpu_marginal_rises_to_list_at_the_slo_knee, .timeout = 5)
{
    struct backend_tokens tok = {.prompt = 1000, .completion = 500, .tier = CONF_TIER_STANDARD};

    for (size_t i = 0; i < sizeof(gpu_cases) / sizeof(gpu_cases[0]); i++) {
        const struct gpu_case *c = &gpu_cases[i];
        struct fx g;
        struct backend *b;
        struct backend_cost est;
        /* Well after the history, so its 500 tokens left the window. */
        uint64_t now = 60000;

        fx_init(&g);
        fx_gpu_history(&g, 0, 200, 2000);
        b = fx_backend(&g, FX_GPU);
        load_pool(b, c->inflight, now);
        est = backend_estimate_cost(b, now, &tok, 1000, BACKEND_PLAIN);
        /* list: $2.00/h / 3600 x 500 tokens / 1000 tokens/s = 0.000277... */
        cr_assert(fabs(est.list_usd - 2.0 / 3600 * 0.5) < USD_EPS, "n=%u list", c->inflight);
        cr_assert_eq(est.reserve_micro, 278, "n=%u reserve", c->inflight);
        cr_assert(fabs(backend_predicted_ttft_ms(b, now, BACKEND_PLAIN) - c->ttft_ms) < 1e-9,
                  "n=%u: predicted %.3f, want %.3f", c->inflight,
                  backend_predicted_ttft_ms(b, now, BACKEND_PLAIN), c->ttft_ms);
        cr_assert(fabs(est.marginal_usd - est.list_usd * c->marginal_share) < USD_EPS,
                  "n=%u: marginal %.12f, want %.12f", c->inflight, est.marginal_usd,
                  est.list_usd * c->marginal_share);
        cr_assert(fabs(backend_pool_utilization(b, now) - c->inflight / 8.0) < 1e-12);
        fx_fini(&g);
    }
}

/* Requests chosen for the pool and not begun yet (their holds being
 * made) are its load for routing as those in flight are, and stop being
 * so when they begin or are dropped; accounting counts only attempts. */
Test(cost, chosen_requests_are_load_until_they_begin, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_tokens tok = {.prompt = 1000, .completion = 500, .tier = CONF_TIER_STANDARD};
    struct backend_cost est;

    fx_init(&f);
    fx_gpu_history(&f, 0, 200, 2000);
    b = fx_backend(&f, FX_GPU);
    load_pool(b, 7, 60000);
    for (int i = 0; i < 4; i++)
        backend_chosen(b);
    /* 11 counted: as the table's n = 11, 200 + 4 x 250 ms, (12/11)^4. */
    cr_assert(fabs(backend_predicted_ttft_ms(b, 60000, BACKEND_PLAIN) - 1200) < 1e-9);
    est = backend_estimate_cost(b, 60000, &tok, 1000, BACKEND_PLAIN);
    cr_assert(fabs(est.marginal_usd - est.list_usd * 20736.0 / 14641) < USD_EPS);
    cr_assert(fabs(backend_pool_utilization(b, 60000) - 7 / 8.0) < 1e-12);
    for (int i = 0; i < 5; i++) /* one more than chosen: stays at 0 */
        backend_unchosen(b);
    cr_assert(fabs(backend_predicted_ttft_ms(b, 60000, BACKEND_PLAIN) - 200) < 1e-9);
    fx_fini(&f);
}

Test(cost, gpu_without_slo_knees_at_capacity, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_tokens tok = {.prompt = 1000, .completion = 500, .tier = CONF_TIER_STANDARD};
    struct backend_cost est;

    fx_init(&f);
    fx_gpu_history(&f, 0, 200, 2000);
    b = fx_backend(&f, FX_GPU);
    /* 7 in flight + this one = the 8 slots: x = 1, marginal = list. */
    load_pool(b, 7, 60000);
    est = backend_estimate_cost(b, 60000, &tok, 0, BACKEND_PLAIN);
    cr_assert(fabs(est.marginal_usd - est.list_usd) < USD_EPS);
    /* An SLO below the pool's TTFT average is broken even when idle: the
     * marginal cost is at its cap, 4^4 = 256 x list. */
    est = backend_estimate_cost(b, 60000, &tok, 150, BACKEND_PLAIN);
    cr_assert(fabs(est.marginal_usd - 256 * est.list_usd) < USD_EPS);
    fx_fini(&f);
}

Test(cost, tokens_per_second_window_drives_utilization, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_tokens tok = {.prompt = 1000, .completion = 500, .tier = CONF_TIER_STANDARD};
    struct backend_cost est;

    fx_init(&f);
    b = fx_backend(&f, FX_GPU);
    /* 1500 tokens in each second 0..9. */
    for (uint64_t s = 0; s < 10; s++)
        backend_tokens_served(b, s * 1000 + 500, 1500);
    /* At t = 10 s the window holds seconds 1..10: 9 x 1500 tokens over
     * 9 s = 1500 tokens/s, of 2 x 1000 rated: utilization 0.75. */
    cr_assert(fabs(backend_tokens_per_second(b, 10000) - 1500) < 1e-9);
    cr_assert(fabs(backend_pool_utilization(b, 10000) - 0.75) < 1e-12);
    /* No request in flight, so the throughput sets the marginal cost:
     * list x 0.75^4 = list x 0.31640625. */
    est = backend_estimate_cost(b, 10000, &tok, 0, BACKEND_PLAIN);
    cr_assert(fabs(est.marginal_usd - est.list_usd * 0.31640625) < USD_EPS);
    /* Ten seconds later it has all left the window. */
    cr_assert_eq(backend_tokens_per_second(b, 20000), 0);
    /* Early on, the rate is over the time since the clock started (at
     * least 1 s): 3000 tokens by t = 2 s read as 1500/s. */
    fx_fini(&f);
    fx_init(&f);
    b = fx_backend(&f, FX_GPU);
    backend_tokens_served(b, 500, 1500);
    backend_tokens_served(b, 1500, 1500);
    cr_assert(fabs(backend_tokens_per_second(b, 2000) - 1500) < 1e-9);
    cr_assert(fabs(backend_tokens_per_second(b, 200) - 1500) < 1e-9); /* over 1 s, not 0.2 */
    /* Far past its rated throughput the marginal cost stops at list x
     * 4^4: 40000 more tokens by t = 2 s, (3000 + 40000) / 2 s = 21500/s of
     * 2000 rated, a utilization of 10.75, is taken as 4. */
    backend_tokens_served(b, 1900, 40000);
    cr_assert(fabs(backend_pool_utilization(b, 2000) - 10.75) < 1e-9);
    est = backend_estimate_cost(b, 2000, &tok, 0, BACKEND_PLAIN);
    cr_assert(est.list_usd > 0);
    cr_assert(fabs(est.marginal_usd - est.list_usd * 256) < USD_EPS, "marginal %.9f, list %.9f",
              est.marginal_usd, est.list_usd);
    fx_fini(&f);
}

/* Tokens an attempt ends with: an answer billed for them, an error answer
 * without usage (nothing billed), or a failure (NULL). */
static const struct backend_tokens served = {.prompt = 100, .completion = 200,
                                              .tier = CONF_TIER_STANDARD},
                                   unbilled = {.tier = CONF_TIER_STANDARD};

struct span {
    uint64_t start_ms, end_ms;
    double gpu_seconds;                /* its share of the pool, by hand */
    const struct backend_tokens *used; /* what it ended with */
};

/* Two requests, A [0 s, 10 s] and B [5 s, 15 s], over 20 s at $3.60/h per
 * replica (0.001 USD = 1000 micro-USD per GPU-second).
 * One replica: A alone 0-5 (5 GPU-s) then shares with B 5-10 (2.5):
 * 7.5; B likewise 2.5 + 5 = 7.5; idle 15-20 = 5. 7.5 + 7.5 + 5 = 20 = 1 x 20.
 * Two replicas: while n <= 2 each has a replica: A = 10, B = 10; idle
 * 0-5 one replica (5), 10-15 one (5), 15-20 two (10) = 20; 40 = 2 x 20.
 * An attempt that bills nothing (failed, or an error without usage) is
 * charged 0 and its share is idle: 5 + 7.5 = 12.5, 20 + 10 = 30. */
struct attribution_case {
    int replicas;
    struct span spans[2];
    double idle_gpu_seconds;
};

static const struct attribution_case attribution_cases[] = {
    {1, {{0, 10000, 7.5, &served}, {5000, 15000, 7.5, &served}}, 5},
    {2, {{0, 10000, 10, &served}, {5000, 15000, 10, &served}}, 20},
    {1, {{0, 10000, 7.5, &served}, {5000, 15000, 7.5, NULL}}, 12.5},
    {2, {{0, 10000, 10, &unbilled}, {5000, 15000, 10, &served}}, 30},
};

/* GPU-seconds span `s` is charged for. */
static double charged(const struct span *s)
{
    return s->used == &served ? s->gpu_seconds : 0;
}

Test(cost, attribution_by_hand, .timeout = 5)
{
    for (size_t i = 0; i < sizeof(attribution_cases) / sizeof(attribution_cases[0]); i++) {
        const struct attribution_case *c = &attribution_cases[i];
        struct fx f;
        struct backend *b;
        struct backend_ticket ta, tb;
        struct backend_charge ca, cb;

        fx_init(&f);
        f.backends[FX_GPU].replicas = c->replicas;
        f.backends[FX_GPU].gpu_hourly_usd = 3.60;
        b = fx_backend(&f, FX_GPU);
        backend_attempt_begin(b, c->spans[0].start_ms, BACKEND_PLAIN, &ta);
        backend_attempt_begin(b, c->spans[1].start_ms, BACKEND_PLAIN, &tb);
        ca = backend_attempt_finish(b, c->spans[0].end_ms, &ta, c->spans[0].used);
        cb = backend_attempt_finish(b, c->spans[1].end_ms, &tb, c->spans[1].used);
        cr_assert(fabs(ca.gpu_seconds - charged(&c->spans[0])) < 1e-9, "case %zu A %.6f", i,
                  ca.gpu_seconds);
        cr_assert(fabs(cb.gpu_seconds - charged(&c->spans[1])) < 1e-9, "case %zu B %.6f", i,
                  cb.gpu_seconds);
        cr_assert_eq(ca.micro_usd, (int64_t)(charged(&c->spans[0]) * 1000), "case %zu", i);
        cr_assert_eq(cb.micro_usd, (int64_t)(charged(&c->spans[1]) * 1000), "case %zu", i);
        cr_assert_eq(ca.duration_ms, 10000);
        cr_assert(fabs(backend_idle_gpu_seconds(b, 20000) - c->idle_gpu_seconds) < 1e-9,
                  "case %zu idle %.6f", i, backend_idle_gpu_seconds(b, 20000));
        cr_assert(fabs(backend_idle_cost_usd(b, 20000) - c->idle_gpu_seconds * 0.001) < USD_EPS);
        /* 20 s x R replicas x 0.001 USD */
        cr_assert(fabs(backend_pool_cost_usd(b, 20000) - c->replicas * 20 * 0.001) < USD_EPS);
        fx_fini(&f);
    }
}

Test(cost, three_requests_on_two_replicas_share_two_thirds_each, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_ticket t[3];
    struct backend_charge ch;

    fx_init(&f);
    b = fx_backend(&f, FX_GPU);
    for (int i = 0; i < 3; i++)
        backend_attempt_begin(b, 0, BACKEND_PLAIN, &t[i]);
    /* 3 s with 3 in flight on 2 replicas: 2/3 x 3 = 2 GPU-s each. */
    ch = backend_attempt_finish(b, 3000, &t[0], &served);
    cr_assert(fabs(ch.gpu_seconds - 2) < 1e-9);
    /* Then 2 in flight, one replica each, for 1 s: 2 + 1 = 3. */
    ch = backend_attempt_finish(b, 4000, &t[1], &served);
    cr_assert(fabs(ch.gpu_seconds - 3) < 1e-9);
    cr_assert(fabs(backend_idle_gpu_seconds(b, 4000) - 0) < 1e-9);
    /* $2.00/h x 3 GPU-s / 3600 = 0.001666... USD = 1667 micro-USD */
    cr_assert_eq(ch.micro_usd, 1667);
    fx_fini(&f);
}

/* A deterministic pseudo-random sequence (numerical recipes LCG). */
static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

Test(cost, attributed_plus_idle_is_pool_cost_over_an_hour, .timeout = 5)
{
    enum { MAXQ = 64 };
    struct fx f;
    struct backend *b;
    struct backend_ticket live[MAXQ];
    uint64_t ends[MAXQ];
    unsigned nlive = 0, done = 0;
    uint32_t seed = 42;
    double gpu_sum = 0;
    int64_t micro_sum = 0;
    const uint64_t hour = 3600 * 1000;

    fx_init(&f);
    b = fx_backend(&f, FX_GPU);
    /* Arrivals every 0-2 s, each lasting 0.5-30 s, none after 59 min so all
     * end within the hour. Events are processed in time order. */
    for (uint64_t now = 0; now < hour; now += 100) {
        for (unsigned i = 0; i < nlive;) {
            if (ends[i] <= now) {
                /* One in seven fails, one in eleven is an error answer
                 * without usage: charged nothing, their time is idle. */
                const struct backend_tokens *used = done % 7 == 3    ? NULL
                                                    : done % 11 == 5 ? &unbilled
                                                                     : &served;
                struct backend_charge ch = backend_attempt_finish(b, now, &live[i], used);

                if (used != &served)
                    cr_assert_eq(ch.micro_usd, 0, "request %u billed nothing", done);
                gpu_sum += ch.gpu_seconds;
                micro_sum += ch.micro_usd;
                done++;
                live[i] = live[--nlive];
                ends[i] = ends[nlive];
            } else {
                i++;
            }
        }
        if (now < hour - 60000 && nlive < MAXQ && lcg(&seed) % 20 == 0) {
            backend_attempt_begin(b, now, BACKEND_PLAIN, &live[nlive]);
            ends[nlive++] = now + 500 + lcg(&seed) % 29500;
        }
    }
    cr_assert_eq(nlive, 0);
    cr_assert_gt(done, 1000, "only %u requests", done);
    /* GPU-seconds: exact up to float rounding. 2 replicas x 3600 s. */
    cr_assert(fabs(gpu_sum + backend_idle_gpu_seconds(b, hour) - 2 * 3600.0) < 1e-6,
              "attributed %.6f + idle %.6f", gpu_sum, backend_idle_gpu_seconds(b, hour));
    /* Money: 2 x $2.00 for the hour = 4 USD; each settled request is
     * rounded to the micro-USD, so at most half a micro-USD each. */
    cr_assert(fabs(backend_pool_cost_usd(b, hour) - 4.0) < USD_EPS);
    cr_assert(llabs(micro_sum + backend_usd_to_micro(backend_idle_cost_usd(b, hour)) - 4000000) <=
                  (long long)done / 2 + 1,
              "attributed %lld + idle %lld micro-USD", (long long)micro_sum,
              (long long)backend_usd_to_micro(backend_idle_cost_usd(b, hour)));
    /* The pool was neither idle nor full all the time. */
    cr_assert_gt(gpu_sum, 100);
    cr_assert_gt(backend_idle_gpu_seconds(b, hour), 100);
    fx_fini(&f);
}

/* Work with a prompt and no completion (an embedding) is billed on a
 * pool: 3.6 s alone on 2 replicas is 3.6 GPU-s, $2.00/h x 3.6 / 3600 =
 * $0.002; the other replica's 3.6 s are idle. */
Test(cost, a_prompt_without_completion_is_billed_on_a_pool, .timeout = 5)
{
    static const struct backend_tokens embedded = {.prompt = 100, .tier = CONF_TIER_STANDARD};
    struct fx f;
    struct backend *b;
    struct backend_ticket t;
    struct backend_charge ch;

    fx_init(&f);
    b = fx_backend(&f, FX_GPU);
    backend_attempt_begin(b, 0, BACKEND_PLAIN, &t);
    /* Half way, with no event since the start: one replica idle 1.8 s. */
    cr_assert(fabs(backend_idle_gpu_seconds(b, 1800) - 1.8) < 1e-9);
    ch = backend_attempt_finish(b, 3600, &t, &embedded);
    cr_assert(fabs(ch.gpu_seconds - 3.6) < 1e-9, "%.6f GPU-s", ch.gpu_seconds);
    cr_assert_eq(ch.micro_usd, 2000);
    cr_assert(fabs(backend_idle_gpu_seconds(b, 3600) - 3.6) < 1e-9);
    fx_fini(&f);
}

/* A pool that says free: true costs nothing, its hourly price given or
 * not: no hold, no marginal cost, no charge for what it served. */
Test(cost, a_free_pool_reserves_and_charges_nothing, .timeout = 5)
{
    struct backend_tokens tok = {.prompt = 1000, .completion = 500, .tier = CONF_TIER_STANDARD};
    struct fx f;
    struct backend *b;
    struct backend_ticket t;
    struct backend_cost est;
    struct backend_charge ch;

    fx_init(&f);
    f.backends[FX_GPU].is_free = 1;
    b = fx_backend(&f, FX_GPU);
    est = backend_estimate_cost(b, 0, &tok, 0, BACKEND_PLAIN);
    cr_assert_eq(est.reserve_micro, 0);
    cr_assert_eq(est.list_usd, 0);
    cr_assert_eq(est.marginal_usd, 0);
    backend_attempt_begin(b, 0, BACKEND_PLAIN, &t);
    ch = backend_attempt_finish(b, 3600, &t, &served);
    cr_assert(fabs(ch.gpu_seconds - 3.6) < 1e-9, "its time is still accounted");
    cr_assert_eq(ch.usd, 0);
    cr_assert_eq(ch.micro_usd, 0);
    cr_assert_eq(backend_idle_cost_usd(b, 3600), 0);
    fx_fini(&f);
}

Test(cost, health_api_still_works_with_accounting, .timeout = 5)
{
    struct fx f;
    struct backend *b;

    fx_init(&f);
    b = fx_backend(&f, FX_GPU);
    backend_attempt_start(b, 1000, BACKEND_PLAIN);
    cr_assert_eq(backend_inflight(b), 1);
    backend_attempt_failure(b, 1000, NULL);
    backend_attempt_end(b);
    cr_assert_eq(backend_inflight(b), 0);
    backend_attempt_start(b, 1100, BACKEND_PLAIN);
    backend_attempt_failure(b, 1100, NULL);
    backend_attempt_end(b);
    backend_attempt_start(b, 1200, BACKEND_PLAIN);
    backend_attempt_failure(b, 1200, NULL);
    backend_attempt_end(b);
    cr_assert_str_eq(backend_circuit_name(b, 1300), "open");
    cr_assert_not(backend_available(b, 1300));
    cr_assert_str_eq(backend_circuit_name(b, 6200), "half-open");
    /* Loop time passed in out of order does not run the clock backwards. */
    backend_attempt_begin(b, 6200, BACKEND_PLAIN, NULL);
    backend_attempt_begin(b, 6100, BACKEND_PLAIN, NULL);
    cr_assert_eq(backend_inflight(b), 2);
    cr_assert(backend_idle_gpu_seconds(b, 6200) >= 0);
    fx_fini(&f);
}

/* A TTFT average older than ttft_stale_ms is left out of the prediction
 * for one request at a time (the latency probe); others keep the old one.
 * A probe that ends without a first byte frees the slot; the probe's
 * sample replaces the stale average; fresh samples blend as before. */
Test(cost, a_stale_ttft_average_is_re_measured_by_one_request_at_a_time, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_ticket t0, t1, t2, t3;

    fx_init(&f);
    f.backends[FX_MINI].ttft_stale_ms = 1000;
    b = fx_backend(&f, FX_MINI);
    cr_assert(backend_latency_probe_due(b, 0, BACKEND_PLAIN),
              "never measured: the first is a probe");
    backend_attempt_begin(b, 0, BACKEND_PLAIN, &t0);
    cr_assert_neq(t0.ttft_probe, 0);
    cr_assert(backend_ttft_unknown(b, BACKEND_PLAIN));
    cr_assert_not(backend_latency_probe_due(b, 0, BACKEND_PLAIN), "one at a time");
    backend_attempt_success(b, 900, 900);
    cr_assert_not(backend_ttft_unknown(b, BACKEND_PLAIN));
    (void)backend_attempt_finish(b, 1000, &t0, NULL);
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 1899, BACKEND_PLAIN), 900, 1e-9);
    cr_assert_not(backend_latency_probe_due(b, 1899, BACKEND_PLAIN));

    /* 1000 ms after the sample: stale. */
    cr_assert(backend_latency_probe_due(b, 1900, BACKEND_PLAIN));
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 1900, BACKEND_PLAIN), 0, 1e-9);
    backend_attempt_begin(b, 1900, BACKEND_PLAIN, &t1);
    cr_assert_neq(t1.ttft_probe, 0);
    cr_assert_not(backend_latency_probe_due(b, 1900, BACKEND_PLAIN));
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 1900, BACKEND_PLAIN), 900, 1e-9,
                       "one probe at a time");
    backend_attempt_begin(b, 1950, BACKEND_PLAIN, &t2);
    cr_assert_eq(t2.ttft_probe, 0);
    (void)backend_attempt_finish(b, 2000, &t2, NULL); /* not the probe: it stays out */
    cr_assert_not(backend_latency_probe_due(b, 2000, BACKEND_PLAIN));
    (void)backend_attempt_finish(b, 2100, &t1, NULL); /* the probe's client left */
    cr_assert(backend_latency_probe_due(b, 2100, BACKEND_PLAIN),
              "the probe's slot was not released");

    backend_attempt_begin(b, 2200, BACKEND_PLAIN, &t3);
    cr_assert_gt(t3.ttft_probe, t1.ttft_probe);
    backend_attempt_success(b, 2250, 50);
    (void)backend_attempt_finish(b, 2300, &t3, NULL);
    /* Replaced: blended, 900 + 0.2 x (50 - 900) = 730 would still break
     * a 500 ms SLO and wait another interval. */
    cr_assert_float_eq(backend_ttft_ewma_ms(b, BACKEND_PLAIN), 50, 1e-9);
    cr_assert_not(backend_latency_probe_due(b, 2300, BACKEND_PLAIN));
    backend_attempt_begin(b, 2300, BACKEND_PLAIN, NULL);
    backend_attempt_success(b, 2400, 150);
    backend_attempt_end(b);
    cr_assert_float_eq(backend_ttft_ewma_ms(b, BACKEND_PLAIN), 70, 1e-9, "fresh samples blend");

    f.backends[FX_MINI].ttft_stale_ms = 0; /* never re-checked */
    cr_assert_not(backend_latency_probe_due(b, 1000000, BACKEND_PLAIN));
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 1000000, BACKEND_PLAIN), 70, 1e-9);
    fx_fini(&f);
}

/* A failure ends the failed attempt's own latency probe and no other:
 * not the other kind's (each kind is measured apart), nor the probe of
 * its kind that another attempt has out (a failed request sent by the
 * old prediction made a second probe due while the first was out). */
Test(cost, a_failure_ends_only_its_own_latency_probe, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_ticket plain, stream, other;

    fx_init(&f);
    b = fx_backend(&f, FX_MINI);
    backend_attempt_begin(b, 0, BACKEND_STREAM, &stream);
    backend_attempt_begin(b, 0, BACKEND_PLAIN, &plain);
    backend_attempt_begin(b, 0, BACKEND_PLAIN, &other);
    cr_assert(stream.ttft_probe != 0 && plain.ttft_probe != 0 && other.ttft_probe == 0);
    backend_attempt_failure(b, 10, &other);
    (void)backend_attempt_finish(b, 10, &other, NULL);
    cr_assert_not(backend_latency_probe_due(b, 10, BACKEND_PLAIN), "the plain probe is out");
    backend_attempt_failure(b, 20, &plain);
    cr_assert(backend_latency_probe_due(b, 20, BACKEND_PLAIN), "the failed probe is over");
    cr_assert_not(backend_latency_probe_due(b, 20, BACKEND_STREAM), "the stream probe is out");
    cr_assert(backend_ttft_unknown(b, BACKEND_STREAM));
    (void)backend_attempt_finish(b, 20, &plain, NULL);
    cr_assert_not(backend_latency_probe_due(b, 20, BACKEND_STREAM));
    backend_ttft_sample(b, 30, BACKEND_STREAM, 30);
    (void)backend_attempt_finish(b, 40, &stream, NULL);
    cr_assert_float_eq(backend_ttft_ewma_ms(b, BACKEND_STREAM), 30, 1e-9);
    fx_fini(&f);
}

/* A 429 starts a cooldown as long as its Retry-After asks (the default
 * without one, at most the cap); a later, shorter one does not cut it
 * short; it is no circuit failure. */
Test(cost, a_429_cools_a_backend_down_for_its_retry_after, .timeout = 5)
{
    struct fx f;
    struct backend *b;

    fx_init(&f);
    b = fx_backend(&f, FX_MINI);
    cr_assert_eq(backend_cooldown_ms(b, 1000), 0);
    backend_rate_limited(b, 1000, 2500);
    cr_assert_eq(backend_cooldown_ms(b, 1000), 2500);
    cr_assert_eq(backend_cooldown_ms(b, 3000), 500);
    cr_assert_eq(backend_cooldown_ms(b, 3500), 0);
    backend_rate_limited(b, 4000, 3000);
    backend_rate_limited(b, 4100, 100);
    cr_assert_eq(backend_cooldown_ms(b, 4100), 2900, "a shorter wait keeps the longer one");
    backend_rate_limited(b, 10000, 0);
    cr_assert_eq(backend_cooldown_ms(b, 10000), 0, "Retry-After: 0 asks for none");
    backend_rate_limited(b, 10000, -1);
    cr_assert_eq(backend_cooldown_ms(b, 10000), BACKEND_COOLDOWN_DEFAULT_MS);
    backend_rate_limited(b, 20000, 86400000);
    cr_assert_eq(backend_cooldown_ms(b, 20000), BACKEND_COOLDOWN_MAX_MS);
    cr_assert(backend_available(b, 20000), "a 429 is not a circuit failure");
    cr_assert_str_eq(backend_circuit_name(b, 20000), "closed");
    cr_assert_eq(backend_consecutive_failures(b), 0);
    fx_fini(&f);
}

Test(cost, micro_usd_rounding, .timeout = 5)
{
    cr_assert_eq(backend_usd_to_micro_ceil(0.00045), 450);
    cr_assert_eq(backend_usd_to_micro_ceil(0.0004501), 451);
    cr_assert_eq(backend_usd_to_micro_ceil(0), 0);
    /* Half a thousandth of a micro-USD over is more than float noise: held. */
    cr_assert_eq(backend_usd_to_micro_ceil(0.0010000005), 1001);
    cr_assert_eq(backend_usd_to_micro(0.0004504), 450);
    cr_assert_eq(backend_usd_to_micro(0.0004506), 451);
    cr_assert_eq(backend_usd_to_micro(12.5), 12500000);
}

/* The one conversion of money, at its edges. What is not a positive
 * amount is 0 (a NaN was INT64_MIN through llround); past
 * BACKEND_MICRO_MAX, +inf included, it is that (the conversion to an
 * integer was undefined). Large budgets round as small ones: 2^52 + 1
 * micro-USD is odd, where adding 0.5 before truncating (the store's
 * limits did) rounds to the even 2^52 + 2, one more than the router's
 * checks allowed. */
Test(cost, micro_usd_edges, .timeout = 5)
{
    cr_assert_eq(backend_usd_to_micro(NAN), 0);
    cr_assert_eq(backend_usd_to_micro_ceil(NAN), 0);
    cr_assert_eq(backend_usd_to_micro(-1), 0);
    cr_assert_eq(backend_usd_to_micro(-0.0), 0);
    cr_assert_eq(backend_usd_to_micro_ceil(-1), 0);
    cr_assert_eq(backend_usd_to_micro(0.0000004), 0);
    cr_assert_eq(backend_usd_to_micro(0.0000005), 1, "a half rounds away from zero");
    cr_assert_eq(backend_usd_to_micro(INFINITY), BACKEND_MICRO_MAX);
    cr_assert_eq(backend_usd_to_micro_ceil(INFINITY), BACKEND_MICRO_MAX);
    cr_assert_eq(backend_usd_to_micro(1e300), BACKEND_MICRO_MAX);
    cr_assert_eq(backend_usd_to_micro_ceil(1e300), BACKEND_MICRO_MAX);
    cr_assert_eq(backend_usd_to_micro(1e12), 1000000000000000000, "the largest budget");
    cr_assert_eq(backend_usd_to_micro(4503599627.370497), 4503599627370497);
    cr_assert_eq(backend_usd_to_micro_ceil(4503599627.370497), 4503599627370497);
}

/* The fixture's API prices are the ones conf/prices.yaml ships, read
 * with the YAML library the config loader uses. */
Test(cost, fixture_prices_are_those_of_prices_yaml, .timeout = 5)
{
    const char *src = getenv("COSTROUTER_SRC");
    char path[4096];
    struct fy_document *doc;
    struct fx f;

    snprintf(path, sizeof(path), "%s/conf/prices.yaml", src ? src : ".");
    doc = fy_document_build_from_file(NULL, path);
    cr_assert_not_null(doc, "cannot parse %s", path);
    fx_init(&f);
    for (int i = 0; i < FX_N; i++) {
        const struct conf_backend *b = &f.backends[i];
        char fmt[256];
        double in = -1, out = -1, cached = -1;

        if (b->kind != CONF_BACKEND_API)
            continue;
        snprintf(fmt, sizeof(fmt),
                 "/prices/%s/input_usd_per_mtok %%lf /prices/%s/output_usd_per_mtok %%lf "
                 "/prices/%s/cached_input_usd_per_mtok %%lf",
                 b->name, b->name, b->name);
        cr_assert_eq(fy_document_scanf(doc, fmt, &in, &out, &cached), 3, "%s", b->name);
        cr_assert_eq(in, b->input_usd_per_mtok, "%s input", b->name);
        cr_assert_eq(out, b->output_usd_per_mtok, "%s output", b->name);
        cr_assert_eq(cached, b->cached_input_usd_per_mtok, "%s cached", b->name);
    }
    fx_fini(&f);
    fy_document_destroy(doc);
}

/* Anthropic's cache writes: prompt tokens at their own rate, neither the
 * input nor the cached one; in the long-prompt tier at the tier's. */
Test(cost, cache_writes_are_billed_at_the_cache_write_rate, .timeout = 5)
{
    struct fx f;
    /* 2000 prompt tokens: 500 read from the cache, 1000 written to it,
     * 500 plain; 100 out. */
    struct backend_tokens tok = {.prompt = 2000, .completion = 100, .cached = 500,
                                 .cache_write = 1000, .tier = CONF_TIER_STANDARD};
    /* writes past what is left: clamped to 6 */
    struct backend_tokens over = {.prompt = 10, .cached = 4, .cache_write = 50,
                                  .tier = CONF_TIER_STANDARD};

    fx_init(&f);
    f.backends[FX_SONNET].cache_write_usd_per_mtok = 3.75;
    /* 500 x 3 + 500 x 0.3 + 1000 x 3.75 + 100 x 15 = 1500 + 150 + 3750 + 1500 micro */
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_SONNET], &tok) - 0.0069) < USD_EPS,
              "%.12f", backend_api_price_usd(&f.backends[FX_SONNET], &tok));
    /* 4 x 0.3 + 6 x 3.75 = 1.2 + 22.5 */
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_SONNET], &over) - 0.0000237) < USD_EPS,
              "%.12f", backend_api_price_usd(&f.backends[FX_SONNET], &over));
    /* 400 of the 1000 written to the 1-hour cache, at 6: 600 x 3.75 + 400 x 6 = 4650 */
    tok.cache_write_1h = 400;
    f.backends[FX_SONNET].cache_write_1h_usd_per_mtok = 6;
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_SONNET], &tok) - 0.0078) < USD_EPS,
              "%.12f", backend_api_price_usd(&f.backends[FX_SONNET], &tok));
    tok.cache_write_1h = 5000; /* more than were written: clamped to all 1000 */
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_SONNET], &tok) - 0.00915) < USD_EPS,
              "%.12f", backend_api_price_usd(&f.backends[FX_SONNET], &tok));
    tok.cache_write_1h = 0;
    fx_sonnet_long(&f);
    f.backends[FX_SONNET].long_context.cache_write_usd_per_mtok = 7.5;
    tok.prompt = 300000; /* past 200k: 298500 x 6 + 500 x 0.6 + 1000 x 7.5 + 100 x 22.5 */
    cr_assert(fabs(backend_api_price_usd(&f.backends[FX_SONNET], &tok) - 1.80105) < USD_EPS,
              "%.12f", backend_api_price_usd(&f.backends[FX_SONNET], &tok));
    fx_fini(&f);
}

/* Anthropic's web searches: a fee per search on top of the tokens, the
 * same in the long-prompt tier; the hold counts them as the charge does;
 * a backend without the price and a free one charge none. */
Test(cost, web_searches_are_billed_per_thousand, .timeout = 5)
{
    struct fx f;
    /* 2000 x 3 + 100 x 15 = 7500 micro, then 3 searches at $10 per 1,000 */
    struct backend_tokens tok = {.prompt = 2000, .completion = 100, .web_searches = 3};
    struct conf_backend *b;

    fx_init(&f);
    b = &f.backends[FX_SONNET];
    cr_assert(fabs(backend_api_price_usd(b, &tok) - 0.0075) < USD_EPS, "no price: no fee, %.12f",
              backend_api_price_usd(b, &tok));
    b->web_search_usd_per_1k = 10;
    cr_assert(fabs(backend_api_price_usd(b, &tok) - 0.0375) < USD_EPS, "%.12f",
              backend_api_price_usd(b, &tok));
    cr_assert_eq(backend_estimate_cost(fx_backend(&f, FX_SONNET), 0, &tok, 0,
                 BACKEND_PLAIN).reserve_micro,
                 37500, "held for them");
    tok.web_searches = -1; /* unknown counts none */
    cr_assert(fabs(backend_api_price_usd(b, &tok) - 0.0075) < USD_EPS);
    tok.web_searches = 3;
    fx_sonnet_long(&f);
    tok.prompt = 300000; /* 300000 x 6 + 100 x 22.5, and the same fee */
    cr_assert(fabs(backend_api_price_usd(b, &tok) - (1.80225 + 0.03)) < USD_EPS, "%.12f",
              backend_api_price_usd(b, &tok));
    b->is_free = 1;
    cr_assert_eq(backend_api_price_usd(b, &tok), 0);
    fx_fini(&f);
}

/* A plain answer's first byte is its head, which comes with its last
 * token; a stream's is its first event. Each kind is averaged, probed
 * and predicted apart: one kind's samples say nothing of the other's. */
Test(cost, streams_and_plain_answers_are_timed_apart, .timeout = 5)
{
    struct fx f;
    struct backend *b;
    struct backend_ticket ts, tp;

    fx_init(&f);
    b = fx_backend(&f, FX_MINI);
    backend_attempt_begin(b, 0, BACKEND_STREAM, &ts);
    cr_assert_neq(ts.ttft_probe, 0, "the streams' first");
    backend_attempt_begin(b, 0, BACKEND_PLAIN, &tp);
    cr_assert_neq(tp.ttft_probe, 0, "the plain answers' first: a probe of their own");
    backend_ttft_sample(b, 50, BACKEND_STREAM, 50);
    (void)backend_attempt_finish(b, 60, &ts, NULL);
    cr_assert(backend_ttft_unknown(b, BACKEND_PLAIN), "a stream's sample is none of a plain's");
    backend_attempt_success(b, 2000, 2000);
    (void)backend_attempt_finish(b, 2000, &tp, NULL);
    cr_assert_float_eq(backend_ttft_ewma_ms(b, BACKEND_STREAM), 50, 1e-9);
    cr_assert_float_eq(backend_ttft_ewma_ms(b, BACKEND_PLAIN), 2000, 1e-9);
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 2000, BACKEND_STREAM), 50, 1e-9);
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 2000, BACKEND_PLAIN), 2000, 1e-9);
    fx_fini(&f);
}

/* A reload keeps what was measured of a backend's latency when the new
 * config names the same upstream (name, url, model); another url is
 * another upstream, measured afresh. */
Test(cost, a_reload_keeps_what_was_measured_of_the_same_upstream, .timeout = 5)
{
    struct fx f;
    struct conf_backend again[FX_N];
    struct conf conf2;
    struct backend_set *next;
    struct backend *b;

    fx_init(&f);
    backend_attempt_success(fx_backend(&f, FX_MINI), 100, 300);
    backend_ttft_sample(fx_backend(&f, FX_MINI), 100, BACKEND_STREAM, 40);
    memcpy(again, f.backends, sizeof(again));
    conf2 = f.conf;
    conf2.backends = again;
    next = backend_set_create_after(&conf2, f.set);
    cr_assert_not_null(next);
    b = backend_set_get(next, FX_MINI);
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 200, BACKEND_PLAIN), 300, 1e-9);
    cr_assert_float_eq(backend_predicted_ttft_ms(b, 200, BACKEND_STREAM), 40, 1e-9);
    cr_assert_not(backend_latency_probe_due(b, 200, BACKEND_PLAIN));
    cr_assert(backend_latency_probe_due(backend_set_get(next, FX_4O), 200, BACKEND_PLAIN),
              "never measured before either");
    backend_set_destroy(next);
    again[FX_MINI].url = "http://127.0.0.1:9/v1";
    next = backend_set_create_after(&conf2, f.set);
    cr_assert_not_null(next);
    b = backend_set_get(next, FX_MINI);
    cr_assert(backend_latency_probe_due(b, 200, BACKEND_PLAIN), "another upstream");
    cr_assert_float_eq(backend_ttft_ewma_ms(b, BACKEND_PLAIN), 0, 1e-9);
    backend_set_destroy(next);
    fx_fini(&f);
}
