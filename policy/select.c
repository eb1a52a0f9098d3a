/* policy/select.c: the names of the selection reasons (see policy.h). */
#include "policy/policy.h"

const char *policy_reason_name(enum policy_reason reason)
{
    switch (reason) {
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
    case POLICY_REASON_CONTEXT_EXCEEDED:
        return "context-length-exceeded";
    case POLICY_REASON_BELOW_QUALITY_FLOOR:
        return "below-quality-floor";
    }
    return "unknown";
}
