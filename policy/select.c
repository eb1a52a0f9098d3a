/* policy/select.c: the first-available selector (see policy.h). */
#include "policy/policy.h"

#include "backends/backend.h"
#include "conf/conf.h"

static struct policy_decision first_healthy_select(const struct conf_route *route,
                                                   struct backend_set *backends, uint64_t tried,
                                                   uint64_t now_ms)
{
    struct policy_decision d = {-1, tried ? POLICY_REASON_FALLBACK : POLICY_REASON_FIRST_HEALTHY};

    for (size_t i = 0; i < route->ncandidates && i < 64; i++) {
        struct backend *b;

        if (tried & (UINT64_C(1) << i))
            continue;
        b = backend_set_get(backends, route->candidates[i]->index);
        if (b != NULL && backend_available(b, now_ms)) {
            d.candidate = (int)i;
            return d;
        }
    }
    return d;
}

const struct policy_selector policy_first_healthy = {
    .name = "first-healthy",
    .select_ = first_healthy_select,
};

const char *policy_reason_name(enum policy_reason reason)
{
    switch (reason) {
    case POLICY_REASON_FIRST_HEALTHY:
        return "first-healthy";
    case POLICY_REASON_FALLBACK:
        return "fallback";
    case POLICY_REASON_CHEAPEST:
        return "cheapest-qualifying";
    case POLICY_REASON_ONLY_CANDIDATE:
        return "only-candidate";
    case POLICY_REASON_AB:
        return "ab";
    case POLICY_REASON_DOWNGRADED_BUDGET:
        return "downgraded-budget";
    case POLICY_REASON_DOWNGRADED_SOFT:
        return "downgraded-soft-limit";
    case POLICY_REASON_BUDGET_EXHAUSTED:
        return "budget-exhausted";
    case POLICY_REASON_NONE_QUALIFIED:
        return "no-qualifying-candidate";
    }
    return "unknown";
}
