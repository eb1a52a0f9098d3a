/*
 * policy/cost.h: the cost-aware selector.
 *
 * For one request it looks at every candidate of the route once and
 * returns the choice plus a verdict per candidate for the cost log:
 *   1. qualify: not tried, inside the A/B arm, available (circuit
 *      breaker, not passed over), not cooling down after a 429 (unless no other candidate
 *      would serve: then it is looked at again as if it were not),
 *      context window >= prompt + predicted completion,
 *      predicted TTFT <= max_ttft_ms, quality >= min_quality, estimated
 *      cost <= the budget left;
 *   2. pick the lowest marginal cost, ties by predicted TTFT, then route
 *      order;
 *   3. none: when every candidate the request may use (outside the A/B
 *      arm and above the quality floor: what waiting would not change)
 *      is too small for it, the reason is "context-length-exceeded", for
 *      a 400 rather than a 503; when every one it may use is below the
 *      tenant's quality floor, "below-quality-floor", for a 403: waiting
 *      would not change that either;
 *   4. budget: when some candidate qualifies but none fits the budget,
 *      `reject` answers 429 and `downgrade` takes the cheapest (reserved
 *      cost) candidate that fits ignoring the quality floor, else 429;
 *      once a budget is soft_limit_pct spent that downgrade starts early
 *      (and a soft limit implies `downgrade` when the budget runs out).
 * O(candidates), no allocation: the caller provides the verdict array.
 * Pure: reads backend state and the budget snapshot it is given.
 */
#ifndef POLICY_COST_H
#define POLICY_COST_H

#include <stdint.h>

#include "policy/policy.h"

struct conf_route;
struct backend_set;

/* The tenant's limits that bear on the choice. */
struct policy_limits {
    int min_quality;      /* quality floor, 0 = any */
    int max_ttft_ms;      /* time-to-first-token SLO, 0 = none */
    unsigned downgrade:1; /* on_exhausted: downgrade (else reject) */
    int soft_limit_pct;   /* 1-100: downgrade once this % of a budget is spent; 0 = off */
};

/* One budget (day or month) as the store snapshot has it. */
struct policy_budget {
    int64_t limit_micro;     /* the budget, micro-USD; 0 = no budget */
    int64_t remaining_micro; /* limit - settled - reserved (may be < 0) */
};

struct policy_request {
    const struct conf_route *route; /* route of the request's "model" */
    struct backend_set *backends;   /* live backend state */
    struct policy_limits limits;    /* the tenant's */
    int64_t prompt_tokens;          /* estimated prompt tokens */
    int64_t window_prompt_tokens;   /* of those, the ones one choice reads in its window
                                       (the longest text of a completions or embeddings
                                       array, each read on its own); 0: all of them */
    int64_t completion_tokens;      /* predicted completion (max_tokens or a default),
                                       all choices together */
    int64_t completion_choices;     /* of how many choices, each its own completion of
                                       the prompt (n, best_of, prompts); 0 or 1: one */
    int completion_predicted;       /* 1: completion_tokens is a guess (no max_tokens) */
    int64_t cached_tokens;          /* prompt tokens expected from the upstream cache */
    int service_tier;               /* enum conf_service_tier the request asks for */
    int64_t web_searches;           /* server-side web searches to hold for (the web
                                       search tool's max_uses), priced per backend */
    int64_t file_searches;          /* file search calls to hold for (Responses) */
    int searches_one_cap;           /* 1: the two are one cap on calls of either kind */
    int answer;                     /* enum backend_answer asked for: a stream's TTFT and a
                                       plain answer's (its whole answer) are apart */
    struct policy_budget day;       /* today's budget (UTC) */
    struct policy_budget month;     /* this month's budget (UTC) */
    struct policy_budget key_day;   /* the request's key's own, within the tenant's */
    struct policy_budget key_month; /* (limit 0 when the key has none) */
    uint64_t tried;                 /* candidates already tried (bit i = candidates[i]) */
    uint64_t passed_over;           /* candidates to pass over as if down, not tried by
                                       this request: no fallback of its own (a single-
                                       flight leader failed on them a moment ago) */
    uint64_t allowed;               /* candidates the A/B arm allows; 0 = all */
    uint64_t speaks;                /* candidates that speak the request's API (the
                                       route's conf_route.speaks); 0 = all */
    const char *ab_reason;          /* "ab:<experiment>/<arm>" when an arm applies, else NULL */
    uint64_t now_ms;                /* loop time */
};

/* What happened to one candidate. */
enum policy_verdict_kind {
    POLICY_VERDICT_CHOSEN,    /* this one */
    POLICY_VERDICT_COSTLIER,  /* qualified, but another was cheaper */
    POLICY_VERDICT_TRIED,     /* tried already for this request */
    POLICY_VERDICT_ARM,       /* outside the request's A/B arm */
    POLICY_VERDICT_API,       /* speaks another API than the request's endpoint */
    POLICY_VERDICT_HEALTH,    /* circuit open, or half-open with a probe out */
    POLICY_VERDICT_RATE_LIMITED, /* cooling down after a 429, and another could serve */
    POLICY_VERDICT_CONTEXT,   /* prompt + completion exceed its context window */
    POLICY_VERDICT_SLO,       /* predicted TTFT above max_ttft_ms */
    POLICY_VERDICT_UNMEASURED, /* no TTFT measured yet and its first latency probe out:
                                  passed over for SLO traffic (see choose_cost_aware) */
    POLICY_VERDICT_BUDGET,    /* its estimated cost exceeds the budget left */
    POLICY_VERDICT_QUALITY,   /* below the quality floor */
};

struct policy_verdict {
    enum policy_verdict_kind kind; /* chosen, or why not */
    int64_t cost_micro;            /* estimated cost (what a reservation would hold) */
    double marginal_usd;           /* marginal cost used for ranking */
    double predicted_ttft_ms;      /* predicted time to first token */
};

struct policy_choice {
    int candidate;              /* index into route->candidates, -1 if none */
    enum policy_reason reason;  /* why (or why none) */
    const char *reason_text;    /* x-costrouter-reason: policy_reason_name() or ab_reason */
    unsigned reject_budget:1;   /* answer 429 budget exhausted */
    int64_t cost_micro;         /* estimate to reserve; with reject_budget the cheapest
                                   qualifying estimate that did not fit */
    double marginal_usd;        /* of the chosen candidate */
    double predicted_ttft_ms;   /* of the chosen candidate */
    int64_t context_window;     /* POLICY_REASON_CONTEXT_EXCEEDED: the largest window */
    int best_quality;           /* POLICY_REASON_BELOW_QUALITY_FLOOR: the best on offer */
    uint64_t retry_after_ms;    /* none chosen: when the soonest candidate shut by its
                                   circuit may be tried again; 0 if none is shut */
};

/* A selector behind a small vtable (like h2o's balancer.h), so another
 * policy can replace it without touching the router. */
struct policy_cost_selector {
    const char *name;
    /* Choose for `req`. `verdicts` has room for min(route->ncandidates,
     * 64) entries, filled in candidate order (caller owns it). */
    struct policy_choice (*choose)(const struct policy_request *req,
                                   struct policy_verdict *verdicts);
};

extern const struct policy_cost_selector policy_cost_aware;

/* "chosen", "costlier", "tried", "arm", "api", "health", "rate-limited",
 * "context", "slo", "unmeasured", "budget", "quality". */
const char *policy_verdict_name(enum policy_verdict_kind kind);

#endif
