/* policy/cost.c: the cost-aware selector (see cost.h). */
#include "policy/cost.h"

#include "backends/backend.h"
#include "common/util.h"
#include "conf/conf.h"

/* Marginal costs closer than this (USD) are a tie. */
#define POLICY_COST_TIE_USD 1e-12

/* Is candidate `a` a better pick than `b` (-1 = none yet) by marginal
 * cost, then predicted TTFT? Earlier route order wins the rest. */
static int cheaper(const struct policy_verdict *v, int a, int b)
{
    double d;

    if (b < 0)
        return 1;
    d = v[a].marginal_usd - v[b].marginal_usd;
    if (d < -POLICY_COST_TIE_USD || d > POLICY_COST_TIE_USD)
        return d < 0;
    return v[a].predicted_ttft_ms < v[b].predicted_ttft_ms;
}

/* For a downgrade: the smaller charge to the tenant's budget first. */
static int cheaper_for_budget(const struct policy_verdict *v, int a, int b)
{
    if (b >= 0 && v[a].cost_micro != v[b].cost_micro)
        return v[a].cost_micro < v[b].cost_micro;
    return cheaper(v, a, b);
}

/* Fold one budget into the budget left and the soft-limit flag. */
static void read_budget(const struct policy_budget *bu, int soft_pct, int64_t *left, int *soft)
{
    if (bu->limit_micro <= 0)
        return;
    if (bu->remaining_micro < *left)
        *left = bu->remaining_micro;
    /* spent / limit >= soft_pct / 100, in 128-bit integers: a config may
     * give a budget up to 1e18 micro-USD, and pct x that overflows 64 bits
     * (read as negative, every request was downgraded from the first). */
    if (soft_pct > 0 && ((__int128)bu->limit_micro - bu->remaining_micro) * 100 >=
                            (__int128)soft_pct * bu->limit_micro)
        *soft = 1;
}

/* The prompt tokens one choice reads in its context window: one of the
 * texts of an array, each answered on its own, or the whole prompt. */
static int64_t window_prompt(const struct policy_request *req)
{
    return req->window_prompt_tokens > 0 ? req->window_prompt_tokens : req->prompt_tokens;
}

/* The completion of one choice to count on backend `cb`: each choice (of
 * n, best_of) completes the prompt in its own window, so the window bounds
 * a choice, not their sum. A predicted one (the request gave no
 * max_tokens) cannot outgrow what the context window leaves after the
 * prompt: the backend stops there. Without this cap, one long answer
 * seen on a big-window backend made every later request without
 * max_tokens "too long" for the smaller windows, or for all of them, and
 * refused requests teach the prediction nothing, so it never came down. */
static int64_t completion_on(const struct policy_request *req, const struct conf_backend *cb)
{
    int64_t per = req->completion_tokens / MAX(req->completion_choices, 1);
    int64_t prompt = window_prompt(req);

    if (req->completion_predicted && cb->context_window > 0 && prompt < cb->context_window)
        return MIN(per, cb->context_window - prompt);
    return per;
}

/* What one pass looks at: backends cooling down after a 429 for at most
 * `cooling_ms` more count as any other (0: none do); backends never
 * measured whose first latency probe is out count for SLO traffic only
 * with `unmeasured`. */
struct take {
    uint64_t cooling_ms;
    int unmeasured;
};

/* The verdict on candidate `i` up to (not including) quality and budget,
 * with its estimates filled in. POLICY_VERDICT_COSTLIER means "passed".
 * A backend with more than `take->cooling_ms` of a 429 cooldown left is
 * "rate-limited", with that time in *cooldown_ms. A backend never measured
 * with its probe out is "unmeasured" to a request with an SLO (its 0 ms
 * is no prediction; nor is it "slo": nothing predicts it past the SLO)
 * unless `take->unmeasured`; *unknown says it was that. */
static enum policy_verdict_kind qualify(const struct policy_request *req, size_t i,
                                        const struct take *take, struct policy_verdict *v,
                                        uint64_t *cooldown_ms, int *unknown)
{
    const struct conf_backend *cb = req->route->candidates[i];
    const struct backend *b = backend_set_get(req->backends, cb->index);
    struct backend_tokens tok = {.prompt = req->prompt_tokens,
                                 .completion = completion_on(req, cb) *
                                               MAX(req->completion_choices, 1),
                                 .cached = req->cached_tokens,
                                 .tier = req->service_tier,
                                 .web_searches = req->web_searches,
                                 .file_searches = req->file_searches,
                                 .searches_one_cap = req->searches_one_cap != 0};
    struct backend_cost est;
    uint64_t bit = UINT64_C(1) << i;
    enum backend_answer answer = req->answer == BACKEND_STREAM ? BACKEND_STREAM : BACKEND_PLAIN;

    if (b == NULL)
        return POLICY_VERDICT_HEALTH;
    est = backend_estimate_cost(b, req->now_ms, &tok, req->limits.max_ttft_ms, answer);
    v->cost_micro = est.reserve_micro;
    v->marginal_usd = est.marginal_usd;
    v->predicted_ttft_ms = backend_predicted_ttft_ms(b, req->now_ms, answer);
    if (req->tried & bit)
        return POLICY_VERDICT_TRIED;
    if (req->speaks && !(req->speaks & bit))
        return POLICY_VERDICT_API;
    if (req->allowed && !(req->allowed & bit))
        return POLICY_VERDICT_ARM;
    if ((req->passed_over & bit) || !backend_available(b, req->now_ms))
        return POLICY_VERDICT_HEALTH;
    if ((*cooldown_ms = backend_cooldown_ms(b, req->now_ms)) > take->cooling_ms)
        return POLICY_VERDICT_RATE_LIMITED;
    if (cb->context_window > 0 &&
        cb->context_window < window_prompt(req) + completion_on(req, cb))
        return POLICY_VERDICT_CONTEXT;
    if (req->limits.max_ttft_ms > 0 && v->predicted_ttft_ms > req->limits.max_ttft_ms)
        return POLICY_VERDICT_SLO;
    if (req->limits.max_ttft_ms > 0 && backend_ttft_unknown(b, answer)) {
        *unknown = 1;
        if (!take->unmeasured)
            return POLICY_VERDICT_UNMEASURED;
    }
    return POLICY_VERDICT_COSTLIER;
}

/* Outside the request's A/B arm, or speaking another API than its
 * endpoint's: no wait or retry brings such a candidate in reach. */
static int out_of_reach(enum policy_verdict_kind kind)
{
    return kind == POLICY_VERDICT_ARM || kind == POLICY_VERDICT_API;
}

/* Candidates passed over for a cooldown in one pass: how many, and the
 * shortest and longest cooldown left among them; and how many were never
 * measured with their probe out. */
struct cooling {
    unsigned count;
    uint64_t soonest_ms, latest_ms;
    unsigned unmeasured;
};

static void note_cooling(struct cooling *c, uint64_t left_ms)
{
    c->count++;
    c->soonest_ms = MIN(c->soonest_ms, left_ms);
    c->latest_ms = MAX(c->latest_ms, left_ms);
}

/* One look at every candidate, those `take` says counting. */
static struct policy_choice choose_pass(const struct policy_request *req, const struct take *take,
                                        struct policy_verdict *v, struct cooling *cooling)
{
    struct policy_choice ch = {.candidate = -1, .reason = POLICY_REASON_NONE_QUALIFIED};
    size_t n = req->route->ncandidates < 64 ? req->route->ncandidates : 64;
    int64_t left = INT64_MAX, over_cost = INT64_MAX;
    int soft = 0, best = -1, floorless = -1, over_budget = 0;
    unsigned eligible = 0, lasting = 0, too_small = 0, below_floor = 0, arm_out = 0;

    read_budget(&req->day, req->limits.soft_limit_pct, &left, &soft);
    read_budget(&req->month, req->limits.soft_limit_pct, &left, &soft);
    read_budget(&req->key_day, req->limits.soft_limit_pct, &left, &soft);
    read_budget(&req->key_month, req->limits.soft_limit_pct, &left, &soft);
    for (size_t i = 0; i < n; i++) {
        struct policy_verdict *c = &v[i];
        int quality_ok = req->route->candidates[i]->quality >= req->limits.min_quality;
        uint64_t cooldown_ms = 0;
        int unknown = 0;

        *c = (struct policy_verdict){0};
        c->kind = qualify(req, i, take, c, &cooldown_ms, &unknown);
        if (c->kind == POLICY_VERDICT_RATE_LIMITED)
            note_cooling(cooling, cooldown_ms);
        cooling->unmeasured += unknown;
        if (c->kind != POLICY_VERDICT_TRIED && !out_of_reach(c->kind))
            eligible++;
        if (out_of_reach(c->kind))
            arm_out++;
        else if (!quality_ok) {
            below_floor++;
            ch.best_quality = MAX(ch.best_quality, req->route->candidates[i]->quality);
        }
        if (out_of_reach(c->kind) || (c->kind == POLICY_VERDICT_COSTLIER && !quality_ok))
            lasting++;
        if (c->kind == POLICY_VERDICT_CONTEXT) {
            lasting++;
            too_small++;
            ch.context_window = MAX(ch.context_window, req->route->candidates[i]->context_window);
        }
        if (c->kind != POLICY_VERDICT_COSTLIER)
            continue;
        if (c->cost_micro > left) {
            /* Would it have qualified but for the budget? */
            c->kind = POLICY_VERDICT_BUDGET;
            if (quality_ok) {
                over_budget = 1;
                if (c->cost_micro < over_cost)
                    over_cost = c->cost_micro;
            }
            continue;
        }
        if (cheaper_for_budget(v, (int)i, floorless))
            floorless = (int)i;
        if (!quality_ok)
            c->kind = POLICY_VERDICT_QUALITY;
        else if (cheaper(v, (int)i, best))
            best = (int)i;
    }

    if (best < 0 && over_budget) {
        /* A soft limit is a request to downgrade: it implies downgrade,
         * crossed or not (else a request too dear for what is left was
         * refused below the soft limit and downgraded past it). */
        if ((req->limits.downgrade || req->limits.soft_limit_pct > 0 || soft) && floorless >= 0) {
            ch.candidate = floorless;
            ch.reason = POLICY_REASON_DOWNGRADED_BUDGET;
        } else {
            ch.reason = POLICY_REASON_BUDGET_EXHAUSTED;
            ch.reject_budget = 1;
            ch.cost_micro = over_cost;
        }
    } else if (soft && floorless >= 0 && floorless != best) {
        ch.candidate = floorless;
        ch.reason = POLICY_REASON_DOWNGRADED_SOFT;
    } else if (best < 0 && too_small > 0 && lasting == n) {
        ch.reason = POLICY_REASON_CONTEXT_EXCEEDED;
    } else if (best < 0 && below_floor > 0 && below_floor + arm_out == n) {
        /* Not "not now": no wait or retry helps while the config stands.
         * (Past its soft limit, the floor is dropped: chosen above.) */
        ch.reason = POLICY_REASON_BELOW_QUALITY_FLOOR;
    } else if (best >= 0) {
        ch.candidate = best;
        ch.reason = req->tried            ? POLICY_REASON_FALLBACK
                    : req->ab_reason      ? POLICY_REASON_AB
                    : eligible == 1       ? POLICY_REASON_ONLY_CANDIDATE
                                          : POLICY_REASON_CHEAPEST;
    }
    ch.reason_text = ch.reason == POLICY_REASON_AB ? req->ab_reason : policy_reason_name(ch.reason);
    if (ch.candidate >= 0) {
        v[ch.candidate].kind = POLICY_VERDICT_CHOSEN;
        ch.cost_micro = v[ch.candidate].cost_micro;
        ch.marginal_usd = v[ch.candidate].marginal_usd;
        ch.predicted_ttft_ms = v[ch.candidate].predicted_ttft_ms;
    }
    return ch;
}

/* Does `ch` serve the request as asked: a candidate, not a downgrade
 * below the quality floor for the budget? */
static int serves(const struct policy_choice *ch)
{
    return ch->candidate >= 0 && ch->reason != POLICY_REASON_DOWNGRADED_BUDGET;
}

/* Backends cooling down after a 429 are passed over while another
 * candidate can take the request as well. They are looked at again when
 * without them the answer would be none (a 503, or a 429 for the budget)
 * or a downgrade below the tenant's quality floor that one of them would
 * avoid: first those whose cooldown ends soonest (the likeliest to be
 * served), then all. The upstream knows best whether its limit has reset,
 * and its own 429 with its Retry-After is a truer answer than one made up
 * here. Backends never measured count as `unmeasured` says; *unknown
 * (may be NULL) gets how many of them the passes met. */
static struct policy_choice choose_cheapest(const struct policy_request *req,
                                            struct policy_verdict *v, int unmeasured,
                                            unsigned *unknown)
{
    struct cooling cooling = {0, UINT64_MAX, 0, 0}, again = cooling;
    struct take take = {0, unmeasured};
    struct policy_choice ch = choose_pass(req, &take, v, &cooling), with_cooling = ch;
    uint64_t limits[2], downgrade_at = UINT64_MAX;
    size_t k;

    if (unknown != NULL)
        *unknown = cooling.unmeasured;
    if (cooling.count == 0 || serves(&ch))
        return ch;
    limits[0] = cooling.soonest_ms;
    limits[1] = cooling.latest_ms;
    for (k = 0; k < 2 && (k == 0 || limits[1] > limits[0]); k++) {
        take.cooling_ms = limits[k];
        with_cooling = choose_pass(req, &take, v, &again);
        if (unknown != NULL)
            *unknown += again.unmeasured;
        if (serves(&with_cooling))
            return with_cooling;
        /* A downgrade beats no answer, but only once no pass avoids it:
         * one with more of the cooling ones may serve at the floor. */
        if (ch.candidate < 0 && with_cooling.candidate >= 0 && downgrade_at == UINT64_MAX)
            downgrade_at = limits[k];
    }
    take.cooling_ms = downgrade_at;
    if (downgrade_at != UINT64_MAX)
        return limits[k - 1] == downgrade_at ? with_cooling : choose_pass(req, &take, v, &again);
    if (ch.candidate < 0)
        return with_cooling;
    take.cooling_ms = 0;
    return choose_pass(req, &take, v, &again); /* the downgrade stands: its verdicts again */
}

/* No candidate: when the soonest of those shut by their circuit opens. */
static uint64_t soonest_reopening(const struct policy_request *req, const struct policy_verdict *v)
{
    size_t n = req->route->ncandidates < 64 ? req->route->ncandidates : 64;
    uint64_t soonest = 0;

    for (size_t i = 0; i < n; i++) {
        const struct backend *b = backend_set_get(req->backends, req->route->candidates[i]->index);
        uint64_t ms = v[i].kind == POLICY_VERDICT_HEALTH && b ? backend_unavailable_ms(b, req->now_ms)
                                                              : 0;

        if (ms > 0 && (soonest == 0 || ms < soonest))
            soonest = ms;
    }
    return soonest;
}

/* A backend never measured is predicted at 0 ms, a guess: while its
 * first latency probe is out, SLO traffic goes to candidates measured
 * within the SLO, and to it only when none of them serves the request
 * (none qualifies, or only by a downgrade): the same preference as for a
 * backend cooling down, so a route of new backends still serves. */
static struct policy_choice choose_cost_aware(const struct policy_request *req,
                                              struct policy_verdict *v)
{
    unsigned unknown = 0;
    struct policy_choice ch = choose_cheapest(req, v, 0, &unknown), with_unknown;

    if (unknown > 0 && !serves(&ch)) {
        with_unknown = choose_cheapest(req, v, 1, NULL);
        if (serves(&with_unknown) || (ch.candidate < 0 && with_unknown.candidate >= 0))
            ch = with_unknown;
        else
            ch = choose_cheapest(req, v, 0, NULL); /* it stands: its verdicts again */
    }

    if (ch.candidate < 0 && !ch.reject_budget)
        ch.retry_after_ms = soonest_reopening(req, v);
    return ch;
}

const struct policy_cost_selector policy_cost_aware = {
    .name = "cost-aware",
    .choose = choose_cost_aware,
};

const char *policy_verdict_name(enum policy_verdict_kind kind)
{
    switch (kind) {
    case POLICY_VERDICT_CHOSEN:
        return "chosen";
    case POLICY_VERDICT_COSTLIER:
        return "costlier";
    case POLICY_VERDICT_TRIED:
        return "tried";
    case POLICY_VERDICT_ARM:
        return "arm";
    case POLICY_VERDICT_API:
        return "api";
    case POLICY_VERDICT_HEALTH:
        return "health";
    case POLICY_VERDICT_RATE_LIMITED:
        return "rate-limited";
    case POLICY_VERDICT_CONTEXT:
        return "context";
    case POLICY_VERDICT_SLO:
        return "slo";
    case POLICY_VERDICT_UNMEASURED:
        return "unmeasured";
    case POLICY_VERDICT_BUDGET:
        return "budget";
    case POLICY_VERDICT_QUALITY:
        return "quality";
    }
    return "unknown";
}
