/*
 * policy/policy.h: why a backend was chosen for a request.
 *
 * The selection itself is policy/cost.h's cost-aware selector; this holds
 * the reasons it gives, which go to x-costrouter-reason and the cost log.
 */
#ifndef POLICY_POLICY_H
#define POLICY_POLICY_H

/* Why the chosen candidate was chosen; goes to x-costrouter-reason. */
enum policy_reason {
    POLICY_REASON_FALLBACK,           /* an earlier candidate failed */
    POLICY_REASON_CHEAPEST,           /* cheapest qualifying candidate */
    POLICY_REASON_ONLY_CANDIDATE,     /* one candidate left to consider */
    POLICY_REASON_AB,                 /* an A/B arm chose the candidates */
    POLICY_REASON_DOWNGRADED_BUDGET,  /* budget exhausted, quality floor dropped */
    POLICY_REASON_DOWNGRADED_SOFT,    /* past the soft limit, quality floor dropped */
    POLICY_REASON_BUDGET_EXHAUSTED,   /* rejected: no candidate fits the budget */
    POLICY_REASON_NONE_QUALIFIED,     /* no candidate qualifies (503) */
    POLICY_REASON_CONTEXT_EXCEEDED,   /* too long for every candidate it may use (400) */
    POLICY_REASON_BELOW_QUALITY_FLOOR, /* every candidate it may use is below the tenant's
                                          floor: never served while the config stands (403) */
};

const char *policy_reason_name(enum policy_reason reason);

#endif
