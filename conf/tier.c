/*
 * conf/tier.c: the names of the service tiers, as the config and the APIs
 * write them. Alone in its file: router/sse.c reads an answer's tier by
 * these names, and what links it (tests/fuzz/fuzz_sse.c) need not bring
 * the config loader along.
 */
#include <string.h>

#include "conf/conf.h"

static const char *const tier_names[CONF_TIER_COUNT] = {"default", "flex", "priority"};

const char *conf_tier_name(enum conf_service_tier tier)
{
    return (unsigned)tier < CONF_TIER_COUNT ? tier_names[tier] : tier_names[CONF_TIER_STANDARD];
}

enum conf_service_tier conf_tier_of(const char *s, size_t len)
{
    for (int t = CONF_TIER_FLEX; t < CONF_TIER_COUNT; t++)
        if (strlen(tier_names[t]) == len && memcmp(s, tier_names[t], len) == 0)
            return (enum conf_service_tier)t;
    return CONF_TIER_STANDARD;
}
