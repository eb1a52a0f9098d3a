/* tests/policy/test_cost_select.c: policy/cost.c, the cost-aware
 * selector: each rejection reason, budget reject and downgrade, the soft
 * limit, ties, A/B arms, and a GPU pool spilling to the API tier exactly
 * when its predicted TTFT breaks the SLO. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "backends/backend.h"
#include "conf/conf.h"
#include "policy/cost.h"
#include "tests/support/cost_fixture.h"

/* Estimated costs of 1000 prompt + 500 completion tokens (micro-USD):
 *   gpt-4o-mini   1000 x 0.15 + 500 x 0.60  = 150 + 300    = 450     (quality 60)
 *   gpt-4o        1000 x 2.50 + 500 x 10    = 2500 + 5000  = 7500    (quality 80)
 *   claude-sonnet 1000 x 3    + 500 x 15    = 3000 + 7500  = 10500   (quality 90)
 *   llama-gpu     $2.00/h / 3600 x 500 / 1000 tokens/s     = 277.8 -> 278 reserved
 *                 (quality 70); marginal at idle: 277.8 x (1/8)^4 = 0.07 */

/* Backend state set up before a case runs. */
enum {
    SET_GPU_DOWN = 1,      /* three failures: circuit open */
    SET_MINI_SLOW = 2,     /* mini's TTFT average 1500 ms */
    SET_GPU_SLOW = 4,      /* the pool's TTFT average 2000 ms */
    SET_SAME_PRICE = 8,    /* sonnet priced as 4o, 4o slower (800 vs 300 ms) */
    SET_ONE_CANDIDATE = 16, /* the route has only gpt-4o-mini */
    SET_GPU_LONG = 32,     /* the pool's window 262144 tokens */
    SET_GPU_429 = 64,      /* the pool answered 429 at 990, Retry-After 5 s */
    SET_MINI_429 = 128,    /* mini answered 429 at 990, no Retry-After */
    SET_GPU_429_OVER = 256, /* the pool answered 429 at 0 with retry-after-ms 500 */
    SET_4O_429 = 512,      /* 4o answered 429 at 990, Retry-After 2 s */
    SET_SONNET_429 = 1024, /* sonnet answered 429 at 990, retry-after-ms 100 */
    SET_GPU_DEAR = 2048,   /* the pool at $20/h: 2778 reserved, 0.68 marginal at idle */
};
#define SET_ALL_429 (SET_GPU_429 | SET_MINI_429 | SET_4O_429 | SET_SONNET_429)

struct select_case {
    const char *name;
    unsigned setup;            /* SET_ flags */
    int min_quality, max_ttft_ms, downgrade, soft_pct;
    int64_t prompt, completion;
    int64_t day_limit, day_left, month_limit, month_left; /* micro-USD */
    uint64_t tried, allowed;
    const char *ab;
    /* expected */
    int candidate;
    const char *reason;
    int reject;
    int64_t cost_micro;
    const char *verdicts; /* per candidate: mini,4o,sonnet,gpu */
    int64_t context_window; /* with "context-length-exceeded": the largest window */
};

#define BIT(i) (UINT64_C(1) << (i))

static const struct select_case cases[] = {
    {"no limits: the idle pool is cheapest", 0, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0, 0, NULL,
     FX_GPU, "cheapest-qualifying", 0, 278, "costlier,costlier,costlier,chosen", 0},
    {"quality floor 75", 0, 75, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0, 0, NULL,
     FX_4O, "cheapest-qualifying", 0, 7500, "quality,chosen,costlier,quality", 0},
    /* 100000 + 50000 = 150000 tokens: only sonnet's 200000 window holds
     * them. 100000 x 3/1M + 50000 x 15/1M = 0.3 + 0.75 = 1.05 USD. */
    {"context", 0, 0, 0, 0, 0, 100000, 50000, 0, 0, 0, 0, 0, 0, NULL,
     FX_SONNET, "cheapest-qualifying", 0, 1050000, "context,context,chosen,context", 0},
    {"health: pool ejected", SET_GPU_DOWN, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0, 0, NULL,
     FX_MINI, "cheapest-qualifying", 0, 450, "chosen,costlier,costlier,health", 0},
    {"slo 1000 ms: mini 1500, pool 2000", SET_MINI_SLOW | SET_GPU_SLOW, 0, 1000, 0, 0, 1000, 500,
     0, 0, 0, 0, 0, 0, NULL, FX_4O, "cheapest-qualifying", 0, 7500, "slo,chosen,costlier,slo", 0},
    {"fallback after the pool", 0, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0, BIT(FX_GPU), 0, NULL,
     FX_MINI, "fallback", 0, 450, "chosen,costlier,costlier,tried", 0},
    /* Day budget 10000, 400 left: 4o (7500) and sonnet (10500) qualify
     * but do not fit; mini (450) does not fit either; the pool (278)
     * fits but is below the floor. */
    {"budget: reject", 0, 75, 0, 0, 0, 1000, 500, 10000, 400, 0, 0, 0, 0, NULL,
     -1, "budget-exhausted", 1, 7500, "budget,budget,budget,quality", 0},
    {"budget: downgrade to what fits", 0, 75, 0, 1, 0, 1000, 500, 10000, 400, 0, 0, 0, 0, NULL,
     FX_GPU, "downgraded-budget", 0, 278, "budget,budget,budget,chosen", 0},
    /* The pool at $20/h: $20 / 3600 x 500 / 1000 tokens/s = 2777.8 -> 2778
     * reserved, marginal 2777.8 x (1/8)^4 = 0.68. Both it and mini (450)
     * fit the 3000 left, below the floor: the downgrade takes the smaller
     * charge to the budget, mini, not the pool's smaller marginal cost. */
    {"budget: downgrade to the smaller hold", SET_GPU_DEAR, 75, 0, 1, 0, 1000, 500, 10000, 3000,
     0, 0, 0, 0, NULL, FX_MINI, "downgraded-budget", 0, 450, "chosen,budget,budget,quality", 0},
    {"budget: downgrade, nothing fits", 0, 75, 0, 1, 0, 1000, 500, 10000, 100, 0, 0, 0, 0, NULL,
     -1, "budget-exhausted", 1, 7500, "budget,budget,budget,budget", 0},
    {"budget: downgrade to mini with the pool down", SET_GPU_DOWN, 75, 0, 1, 0, 1000, 500, 10000,
     500, 0, 0, 0, 0, NULL, FX_MINI, "downgraded-budget", 0, 450, "chosen,budget,budget,health", 0},
    {"budget overdrawn (negative left)", 0, 0, 0, 0, 0, 1000, 500, 10000, -5, 0, 0, 0, 0, NULL,
     -1, "budget-exhausted", 1, 278, "budget,budget,budget,budget", 0},
    /* Month is the binding budget: 8000 left of it, the day has plenty. */
    {"month budget binds", 0, 85, 0, 0, 0, 1000, 500, 1000000, 900000, 5000000, 8000, 0, 0, NULL,
     -1, "budget-exhausted", 1, 10500, "quality,quality,budget,quality", 0},
    {"no budget configured: remaining ignored", 0, 75, 0, 0, 0, 1000, 500, 0, -100, 0, 0, 0, 0,
     NULL, FX_4O, "cheapest-qualifying", 0, 7500, "quality,chosen,costlier,quality", 0},
    /* 85000 of 100000 spent = 85% >= 80%: downgrade early to the pool. */
    {"soft limit crossed", 0, 75, 0, 0, 80, 1000, 500, 100000, 15000, 0, 0, 0, 0, NULL,
     FX_GPU, "downgraded-soft-limit", 0, 278, "quality,costlier,costlier,chosen", 0},
    /* 75% spent: not yet. */
    {"soft limit not crossed", 0, 75, 0, 0, 80, 1000, 500, 100000, 25000, 0, 0, 0, 0, NULL,
     FX_4O, "cheapest-qualifying", 0, 7500, "quality,chosen,costlier,quality", 0},
    /* Exactly 80% spent counts. */
    {"soft limit exactly", 0, 75, 0, 0, 80, 1000, 500, 100000, 20000, 0, 0, 0, 0, NULL,
     FX_GPU, "downgraded-soft-limit", 0, 278, "quality,costlier,costlier,chosen", 0},
    /* The largest budget a config allows (1e12 USD = 1e18 micro-USD),
     * nothing spent: 50% x limit passes 64 bits, and read as negative
     * it downgraded every request from the first. */
    {"soft limit of the largest budget, untouched", 0, 75, 0, 0, 50, 1000, 500,
     INT64_C(1000000000000000000), INT64_C(1000000000000000000), 0, 0, 0, 0, NULL,
     FX_4O, "cheapest-qualifying", 0, 7500, "quality,chosen,costlier,quality", 0},
    {"soft limit of the largest budget, crossed", 0, 75, 0, 0, 50, 1000, 500,
     INT64_C(1000000000000000000), INT64_C(400000000000000000), 0, 0, 0, 0, NULL,
     FX_GPU, "downgraded-soft-limit", 0, 278, "quality,costlier,costlier,chosen", 0},
    /* Soft limit with a reject tenant and the floor's models out of
     * budget: the soft limit still downgrades. */
    {"soft limit implies downgrade", 0, 75, 0, 0, 80, 1000, 500, 100000, 5000, 0, 0, 0, 0, NULL,
     FX_GPU, "downgraded-budget", 0, 278, "quality,budget,budget,chosen", 0},
    /* The same with 70% spent, below the soft limit: 10000 + 5000 tokens,
     * 4o (75000) and sonnet (105000) do not fit the 30000 left. A soft
     * limit set is a request to downgrade (docs/cost-model.md, rule 2): the
     * pool (2778), as at 95% spent, not a 429 at 70% that 95% would not get. */
    {"soft limit set, not crossed, implies downgrade", 0, 75, 0, 0, 80, 10000, 5000, 100000,
     30000, 0, 0, 0, 0, NULL, FX_GPU, "downgraded-budget", 0, 2778, "quality,budget,budget,chosen",
     0},
    /* 4o and sonnet both 7500; sonnet's predicted TTFT 300 < 4o's 800. */
    {"tie by predicted latency", SET_SAME_PRICE, 75, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0, 0, NULL,
     FX_SONNET, "cheapest-qualifying", 0, 7500, "quality,costlier,chosen,quality", 0},
    {"only candidate", SET_ONE_CANDIDATE, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0, 0, NULL,
     FX_MINI, "only-candidate", 0, 450, "chosen", 0},
    {"only candidate, below the floor", SET_ONE_CANDIDATE, 70, 0, 0, 0, 1000, 500, 0, 0, 0, 0,
     0, 0, NULL, -1, "below-quality-floor", 0, 0, "quality", 0},
    {"a/b arm of 4o and sonnet", 0, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0,
     BIT(FX_4O) | BIT(FX_SONNET), "ab:exp/big", FX_4O, "ab:exp/big", 0, 7500,
     "arm,chosen,costlier,arm", 0},
    /* 250000 + 500 tokens: more than any window (sonnet's 200000 is the
     * largest), so no wait would help: a 400, not a 503. */
    {"too long for every window", 0, 0, 0, 0, 0, 250000, 500, 0, 0, 0, 0, 0, 0, NULL,
     -1, "context-length-exceeded", 0, 0, "context,context,context,context", 200000},
    {"too long, max_tokens counted", 0, 0, 0, 0, 0, 1000, 199001, 0, 0, 0, 0, 0, 0, NULL,
     -1, "context-length-exceeded", 0, 0, "context,context,context,context", 200000},
    {"too long for the arm's backends", 0, 0, 0, 0, 0, 150000, 500, 0, 0, 0, 0, 0,
     BIT(FX_MINI) | BIT(FX_4O), "ab:exp/small", -1, "context-length-exceeded", 0, 0,
     "context,context,arm,arm", 128000},
    /* The pool would hold it but is below the floor of 75. */
    {"too long above the floor", SET_GPU_LONG, 75, 0, 0, 0, 250000, 500, 0, 0, 0, 0, 0, 0, NULL,
     -1, "context-length-exceeded", 0, 0, "context,context,context,quality", 200000},
    /* The pool is down, and might hold it when back: a 503. */
    {"too long while the long one is down", SET_GPU_LONG | SET_GPU_DOWN, 0, 0, 0, 0, 250000, 500,
     0, 0, 0, 0, 0, 0, NULL, -1, "no-qualifying-candidate", 0, 0,
     "context,context,context,health", 0},
    /* Every candidate below the floor (the pool, down, too): no wait
     * helps, a 403 rather than a 503. */
    {"all below the floor", SET_GPU_DOWN, 95, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0, 0, NULL,
     -1, "below-quality-floor", 0, 0, "quality,quality,quality,health", 0},
    /* Sonnet, the one at the floor, is outside the arm: the same. */
    {"the arm's candidates below the floor", 0, 85, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0,
     BIT(FX_MINI) | BIT(FX_4O), "ab:exp/small", -1, "below-quality-floor", 0, 0,
     "quality,quality,arm,arm", 0},
    /* Sonnet was tried and failed: the rest are below the floor, but that
     * is this request's bad luck, not the config's: none qualifies. */
    {"the one at the floor was tried", 0, 85, 0, 0, 0, 1000, 500, 0, 0, 0, 0, BIT(FX_SONNET), 0,
     NULL, -1, "no-qualifying-candidate", 0, 0, "quality,quality,tried,quality", 0},
    /* The arm's one at the floor is down: it may come back, a 503. */
    {"the arm's one at the floor is down", SET_GPU_DOWN, 70, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0,
     BIT(FX_MINI) | BIT(FX_GPU), "ab:exp/cheap", -1, "no-qualifying-candidate", 0, 0,
     "quality,arm,arm,health", 0},
    /* A backend cooling down after a 429 is passed over while another can
     * serve, and taken when none can. */
    {"429: the pool cools down, mini serves", SET_GPU_429, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0,
     0, NULL, FX_MINI, "cheapest-qualifying", 0, 450, "chosen,costlier,costlier,rate-limited", 0},
    {"429: its cooldown is over", SET_GPU_429_OVER, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0, 0, 0, NULL,
     FX_GPU, "cheapest-qualifying", 0, 278, "costlier,costlier,costlier,chosen", 0},
    {"429: the only candidate is still tried", SET_ONE_CANDIDATE | SET_MINI_429, 0, 0, 0, 0, 1000,
     500, 0, 0, 0, 0, 0, 0, NULL, FX_MINI, "only-candidate", 0, 450, "chosen", 0},
    {"429: the rest tried already", SET_GPU_429, 0, 0, 0, 0, 1000, 500, 0, 0, 0, 0,
     BIT(FX_MINI) | BIT(FX_4O) | BIT(FX_SONNET), 0, NULL, FX_GPU, "fallback", 0, 278,
     "tried,tried,tried,chosen", 0},
    {"429: the cooling one alone fits the budget", SET_MINI_429, 0, 0, 0, 0, 1000, 500, 10000, 460,
     0, 0, BIT(FX_GPU), 0, NULL, FX_MINI, "fallback", 0, 450, "chosen,budget,budget,tried", 0},
    /* As "budget: downgrade to what fits", with the pool cooling: still the
     * pool, not a 429 for the budget. */
    {"429: the downgrade that fits", SET_GPU_429, 75, 0, 1, 0, 1000, 500, 10000, 400, 0, 0, 0, 0,
     NULL, FX_GPU, "downgraded-budget", 0, 278, "budget,budget,budget,chosen", 0},
    /* Both mini and the pool are below the floor: the downgrade goes to
     * mini rather than to the cooling pool. */
    {"429: downgrade, not the cooling one", SET_GPU_429, 75, 0, 1, 0, 1000, 500, 10000, 500, 0,
     0, 0, 0, NULL, FX_MINI, "downgraded-budget", 0, 450, "chosen,budget,budget,rate-limited", 0},
    /* Without 4o the tenant would be downgraded below its floor (sonnet
     * does not fit 8000): 4o, cooling, is taken instead. */
    {"429: no downgrade that the cooling one avoids", SET_4O_429, 75, 0, 1, 0, 1000, 500, 10000,
     8000, 0, 0, 0, 0, NULL, FX_4O, "cheapest-qualifying", 0, 7500, "quality,chosen,budget,quality",
     0},
    /* As above, with sonnet cooling too, and back sooner (90 ms) than 4o
     * (1990 ms). With sonnet counted, sonnet does not fit 8000 and the
     * tenant is downgraded below its floor; with all counted, 4o serves at
     * the floor: that is taken, not the downgrade the sooner pass found. */
    {"429: no downgrade that a later cooling one avoids", SET_4O_429 | SET_SONNET_429, 75, 0, 1,
     0, 1000, 500, 10000, 8000, 0, 0, 0, 0, NULL, FX_4O, "cheapest-qualifying", 0, 7500,
     "quality,chosen,budget,quality", 0},
    /* All cooling: the one whose cooldown ends first (sonnet, 90 ms left)
     * is the likeliest to be served, dear as it is. */
    {"429: all cooling, the soonest back is asked", SET_ALL_429, 0, 0, 0, 0, 1000, 500, 0, 0, 0,
     0, 0, 0, NULL, FX_SONNET, "cheapest-qualifying", 0, 10500,
     "rate-limited,rate-limited,chosen,rate-limited", 0},
    /* ... unless it does not fit the budget: then all are looked at. */
    {"429: all cooling, the soonest too dear", SET_ALL_429, 0, 0, 0, 0, 1000, 500, 10000, 8000, 0,
     0, 0, 0, NULL, FX_GPU, "cheapest-qualifying", 0, 278, "costlier,costlier,budget,chosen", 0},
};

static void setup(struct fx *f, unsigned flags)
{
    struct backend *b;

    if (flags & SET_GPU_DOWN) {
        b = fx_backend(f, FX_GPU);
        for (int i = 0; i < 3; i++) {
            backend_attempt_start(b, 10, BACKEND_PLAIN);
            backend_attempt_failure(b, 10, NULL);
            backend_attempt_end(b);
        }
    }
    if (flags & SET_MINI_SLOW)
        backend_attempt_success(fx_backend(f, FX_MINI), 10, 1500);
    if (flags & SET_GPU_SLOW)
        backend_attempt_success(fx_backend(f, FX_GPU), 10, 2000);
    if (flags & SET_SAME_PRICE) {
        f->backends[FX_SONNET].input_usd_per_mtok = 2.50;
        f->backends[FX_SONNET].output_usd_per_mtok = 10.00;
        backend_attempt_success(fx_backend(f, FX_4O), 10, 800);
        backend_attempt_success(fx_backend(f, FX_SONNET), 10, 300);
    }
    if (flags & SET_ONE_CANDIDATE)
        f->route.ncandidates = 1;
    if (flags & SET_GPU_LONG)
        f->backends[FX_GPU].context_window = 262144;
    if (flags & SET_GPU_429)
        backend_rate_limited(fx_backend(f, FX_GPU), 990, 5000);
    if (flags & SET_MINI_429)
        backend_rate_limited(fx_backend(f, FX_MINI), 990, -1);
    if (flags & SET_4O_429)
        backend_rate_limited(fx_backend(f, FX_4O), 990, 2000);
    if (flags & SET_SONNET_429)
        backend_rate_limited(fx_backend(f, FX_SONNET), 990, 100);
    if (flags & SET_GPU_DEAR)
        f->backends[FX_GPU].gpu_hourly_usd = 20.00;
    if (flags & SET_GPU_429_OVER)
        backend_rate_limited(fx_backend(f, FX_GPU), 0, 500);
}

/* "chosen,costlier,..." for the first n verdicts. */
static void verdict_list(const struct policy_verdict *v, size_t n, char *out, size_t cap)
{
    size_t len = 0;

    out[0] = '\0';
    for (size_t i = 0; i < n; i++)
        len += (size_t)snprintf(out + len, cap - len, "%s%s", i ? "," : "",
                                policy_verdict_name(v[i].kind));
}

Test(cost_select, table, .timeout = 5)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct select_case *c = &cases[i];
        struct fx f;
        struct policy_verdict v[FX_N];
        struct policy_choice ch;
        char got[128];

        fx_init(&f);
        setup(&f, c->setup);
        struct policy_request req = {
            .route = &f.route,
            .backends = f.set,
            .limits = {.min_quality = c->min_quality,
                       .max_ttft_ms = c->max_ttft_ms,
                       .downgrade = c->downgrade ? 1 : 0,
                       .soft_limit_pct = c->soft_pct},
            .prompt_tokens = c->prompt,
            .completion_tokens = c->completion,
            .day = {c->day_limit, c->day_left},
            .month = {c->month_limit, c->month_left},
            .tried = c->tried,
            .allowed = c->allowed,
            .ab_reason = c->ab,
            .now_ms = 1000,
        };
        ch = policy_cost_aware.choose(&req, v);
        verdict_list(v, f.route.ncandidates, got, sizeof(got));
        cr_expect_eq(ch.candidate, c->candidate, "%s: candidate %d, want %d", c->name,
                     ch.candidate, c->candidate);
        cr_expect_str_eq(ch.reason_text, c->reason, "%s: reason %s", c->name, ch.reason_text);
        cr_expect_eq(ch.reject_budget, (unsigned)c->reject, "%s: reject", c->name);
        cr_expect_eq(ch.cost_micro, c->cost_micro, "%s: cost %lld, want %lld", c->name,
                     (long long)ch.cost_micro, (long long)c->cost_micro);
        cr_expect_str_eq(got, c->verdicts, "%s: verdicts %s, want %s", c->name, got, c->verdicts);
        if (c->context_window)
            cr_expect_eq(ch.context_window, c->context_window, "%s: window %lld", c->name,
                         (long long)ch.context_window);
        fx_fini(&f);
    }
}

Test(cost_select, verdicts_carry_each_estimate, .timeout = 5)
{
    struct fx f;
    struct policy_verdict v[FX_N];
    struct policy_request req;
    static const int64_t want[FX_N] = {450, 7500, 10500, 278};

    fx_init(&f);
    req = (struct policy_request){.route = &f.route, .backends = f.set, .prompt_tokens = 1000,
                                  .completion_tokens = 500, .now_ms = 1000};
    (void)policy_cost_aware.choose(&req, v);
    for (int i = 0; i < FX_N; i++)
        cr_assert_eq(v[i].cost_micro, want[i], "candidate %d", i);
    /* API marginal = price; the idle pool's is a sliver of its list. */
    cr_assert_float_eq(v[FX_MINI].marginal_usd, 0.00045, 1e-12);
    cr_assert_lt(v[FX_GPU].marginal_usd, 0.0001);
    fx_fini(&f);
}

/* Load the pool to `inflight` requests and choose for a tenant with a
 * 1000 ms SLO. The pool: 200 ms TTFT, 2000 ms per request, 8 slots, so its
 * predicted TTFT is 200 + 250 x max(0, n - 7) ms (see test_cost.c). */
static struct policy_choice choose_at_load(struct fx *f, unsigned inflight,
                                           struct policy_verdict *v)
{
    struct backend *gpu = fx_backend(f, FX_GPU);
    struct policy_request req = {
        .route = &f->route,
        .backends = f->set,
        .limits = {.max_ttft_ms = 1000},
        .prompt_tokens = 1000,
        .completion_tokens = 500,
        .now_ms = 60000,
    };

    while (backend_inflight(gpu) < inflight)
        backend_attempt_begin(gpu, 60000, BACKEND_PLAIN, NULL);
    return policy_cost_aware.choose(&req, v);
}

Test(cost_select, pool_spills_to_api_exactly_when_the_slo_breaks, .timeout = 5)
{
    struct fx f;
    struct policy_verdict v[FX_N];

    fx_init(&f);
    fx_gpu_history(&f, 0, 200, 2000);
    backend_attempt_success(fx_backend(&f, FX_MINI), 10, 300);
    for (unsigned n = 0; n <= 16; n++) {
        struct policy_choice ch = choose_at_load(&f, n, v);
        double ttft = backend_predicted_ttft_ms(fx_backend(&f, FX_GPU), 60000, BACKEND_PLAIN);

        /* n = 10: 950 ms, still within; n = 11: 1200 ms breaks it. */
        if (n <= 10) {
            cr_assert_eq(ch.candidate, FX_GPU, "n=%u (ttft %.0f) should stay on the pool", n, ttft);
            cr_assert_leq(ttft, 1000);
        } else {
            cr_assert_eq(ch.candidate, FX_MINI, "n=%u (ttft %.0f) should spill", n, ttft);
            cr_assert_gt(ttft, 1000);
            cr_assert_eq(v[FX_GPU].kind, POLICY_VERDICT_SLO);
        }
        cr_assert_str_eq(ch.reason_text, "cheapest-qualifying");
    }
    fx_fini(&f);
}

Test(cost_select, dear_pool_spills_on_marginal_cost_before_the_slo, .timeout = 5)
{
    struct fx f;
    struct policy_verdict v[FX_N];
    struct policy_choice ch;

    /* At $4.00/h the pool's list cost is 4/3600 x 0.5 = 555.6 micro-USD,
     * more than mini's 450: its marginal 555.6 x ((n+1)/11)^4 passes 450
     * when (n+1)/11 > 0.9487, i.e. at n = 10, one request before the SLO
     * breaks (n = 10 predicts 950 ms). */
    fx_init(&f);
    f.backends[FX_GPU].gpu_hourly_usd = 4.00;
    fx_gpu_history(&f, 0, 200, 2000);
    ch = choose_at_load(&f, 9, v);
    cr_assert_eq(ch.candidate, FX_GPU);
    ch = choose_at_load(&f, 10, v);
    cr_assert_eq(ch.candidate, FX_MINI);
    cr_assert_eq(v[FX_GPU].kind, POLICY_VERDICT_COSTLIER);
    cr_assert_gt(v[FX_GPU].marginal_usd, v[FX_MINI].marginal_usd);
    fx_fini(&f);
}

Test(cost_select, reason_and_verdict_names, .timeout = 5)
{
    cr_assert_str_eq(policy_reason_name(POLICY_REASON_DOWNGRADED_SOFT), "downgraded-soft-limit");
    cr_assert_str_eq(policy_reason_name(POLICY_REASON_FALLBACK), "fallback");
    cr_assert_str_eq(policy_verdict_name(POLICY_VERDICT_SLO), "slo");
    cr_assert_str_eq(policy_verdict_name(POLICY_VERDICT_UNMEASURED), "unmeasured");
    cr_assert_str_eq(policy_verdict_name(POLICY_VERDICT_TRIED), "tried");
    cr_assert_str_eq(policy_verdict_name(POLICY_VERDICT_RATE_LIMITED), "rate-limited");
}

/* A key's own budget (within its tenant's, which has none here) binds as
 * the tenant's does: what is left to it decides what fits, and its soft
 * limit downgrades early. Floor 75: only 4o and sonnet are at it. */
Test(cost_select, a_keys_own_budget_binds_as_its_tenants, .timeout = 5)
{
    struct fx f;
    struct policy_verdict v[FX_N];
    struct policy_choice ch;
    struct policy_request req;

    fx_init(&f);
    req = (struct policy_request){.route = &f.route, .backends = f.set, .prompt_tokens = 1000,
                                  .completion_tokens = 500, .now_ms = 1000,
                                  .limits = {.min_quality = 75, .downgrade = 1}};
    req.key_day = (struct policy_budget){10000, 400}; /* 4o (7500) does not fit */
    ch = policy_cost_aware.choose(&req, v);
    cr_expect_eq(ch.candidate, FX_GPU);
    cr_expect_str_eq(ch.reason_text, "downgraded-budget");
    req.key_day = (struct policy_budget){0, 0};
    req.key_month = (struct policy_budget){100000, 10000}; /* 90% spent */
    req.limits.soft_limit_pct = 80;
    ch = policy_cost_aware.choose(&req, v);
    cr_expect_str_eq(ch.reason_text, "downgraded-soft-limit");
    req.limits.downgrade = 0;
    req.limits.soft_limit_pct = 0;
    req.key_month = (struct policy_budget){100000, 100};
    ch = policy_cost_aware.choose(&req, v);
    cr_expect(ch.reject_budget, "nothing fits the key's $0.0001");
    fx_fini(&f);
}

/* A backend never measured is predicted at 0 ms, a guess. While its
 * first latency probe is out, SLO traffic keeps to candidates measured
 * within the SLO, and goes to it only when none of those serves the
 * request: none within the SLO, or none within the budget. */
Test(cost_select, a_backend_never_measured_waits_for_its_probe, .timeout = 5)
{
    struct fx f;
    struct policy_verdict v[FX_N];
    struct policy_choice ch;
    struct policy_request req;
    struct backend *gpu, *mini;

    fx_init(&f);
    gpu = fx_backend(&f, FX_GPU);
    mini = fx_backend(&f, FX_MINI);
    backend_attempt_success(mini, 10, 300);
    backend_attempt_success(fx_backend(&f, FX_4O), 10, 1500);
    backend_attempt_success(fx_backend(&f, FX_SONNET), 10, 1500);
    req = (struct policy_request){.route = &f.route, .backends = f.set, .prompt_tokens = 1000,
                                  .completion_tokens = 500, .now_ms = 1000,
                                  .limits = {.max_ttft_ms = 1000}};
    cr_assert(backend_latency_probe_due(gpu, 1000, BACKEND_PLAIN),
              "never measured: the next is its probe");
    ch = policy_cost_aware.choose(&req, v);
    cr_assert_eq(ch.candidate, FX_GPU, "the cheapest goes first, as the probe");
    backend_attempt_begin(gpu, 1000, BACKEND_PLAIN, NULL);
    cr_assert(backend_ttft_unknown(gpu, BACKEND_PLAIN));
    ch = policy_cost_aware.choose(&req, v);
    cr_assert_eq(ch.candidate, FX_MINI, "measured within the SLO while the probe is out");
    cr_assert_eq(v[FX_GPU].kind, POLICY_VERDICT_UNMEASURED, "not slo: 0 ms is no prediction");
    req.limits.max_ttft_ms = 0;
    ch = policy_cost_aware.choose(&req, v);
    cr_assert_eq(ch.candidate, FX_GPU, "without an SLO, the prediction does not count");
    req.limits.max_ttft_ms = 1000;
    req.day = (struct policy_budget){10000, 400}; /* mini's 450 does not fit, the pool's 278 does */
    ch = policy_cost_aware.choose(&req, v);
    cr_assert_eq(ch.candidate, FX_GPU, "rather than a 429");
    cr_assert_str_eq(ch.reason_text, "cheapest-qualifying");
    req.day = (struct policy_budget){0, 0};
    backend_attempt_success(mini, 1000, 1500); /* 300 + 0.2 x 1200 = 540 */
    backend_attempt_success(mini, 1000, 5000); /* 540 + 0.2 x 4460 = 1432 */
    ch = policy_cost_aware.choose(&req, v);
    cr_assert_eq(ch.candidate, FX_GPU, "none measured within the SLO: rather than a 503");
    backend_ttft_sample(gpu, 1200, BACKEND_PLAIN, 200);
    cr_assert_not(backend_ttft_unknown(gpu, BACKEND_PLAIN));
    cr_assert_not(backend_latency_probe_due(gpu, 1200, BACKEND_PLAIN));
    fx_fini(&f);
}
