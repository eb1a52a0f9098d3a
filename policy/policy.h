/*
 * policy/policy.h: choosing the backend for a request.
 *
 * Pure code with no I/O: it reads backend state and returns a decision.
 * Selection sits behind a small vtable (like h2o's balancer.h) so the
 * cost-aware selector can replace the first-healthy one without touching
 * the router. `tried` is a bit set over the route's candidates (bit i =
 * candidates[i]), so fallback never picks a backend twice.
 */
#ifndef POLICY_POLICY_H
#define POLICY_POLICY_H

#include <stdint.h>

struct conf_route;
struct backend_set;

/* Why the chosen candidate was chosen; goes to x-costrouter-reason. */
enum policy_reason {
    POLICY_REASON_FIRST_HEALTHY,
    POLICY_REASON_FALLBACK,
    /* the cost-aware selector (policy/cost.h) */
    POLICY_REASON_CHEAPEST,           /* cheapest qualifying candidate */
    POLICY_REASON_ONLY_CANDIDATE,     /* one candidate left to consider */
    POLICY_REASON_AB,                 /* an A/B arm chose the candidates */
    POLICY_REASON_DOWNGRADED_BUDGET,  /* budget exhausted, quality floor dropped */
    POLICY_REASON_DOWNGRADED_SOFT,    /* past the soft limit, quality floor dropped */
    POLICY_REASON_BUDGET_EXHAUSTED,   /* rejected: no candidate fits the budget */
    POLICY_REASON_NONE_QUALIFIED,     /* no candidate qualifies (503) */
};

struct policy_decision {
    int candidate;              /* index into route->candidates, -1 if none */
    enum policy_reason reason;  /* why */
};

struct policy_selector {
    const char *name;
    /* Pick among route's candidates not in `tried`. */
    struct policy_decision (*select_)(const struct conf_route *route, struct backend_set *backends,
                                      uint64_t tried, uint64_t now_ms);
};

/* The proxy core's selector: the first available candidate in route order. */
extern const struct policy_selector policy_first_healthy;

const char *policy_reason_name(enum policy_reason reason);

#endif
