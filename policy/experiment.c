/* policy/experiment.c: sticky weighted A/B assignment (see experiment.h). */
#include "policy/experiment.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "conf/conf.h"

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The tenant filter is looked up on every request of the route, and a
 * config may list thousands of tenants: sorted once here, searched in
 * log n there. A copy, as the config's order is the user's. */
static int sort_tenants(struct policy_experiment *e)
{
    free(e->_tenants_sorted);
    e->_tenants_sorted = NULL;
    if (e->tenants == NULL || e->ntenants == 0)
        return 0;
    e->_tenants_sorted = malloc(e->ntenants * sizeof(*e->_tenants_sorted));
    if (e->_tenants_sorted == NULL)
        return -ENOMEM;
    memcpy(e->_tenants_sorted, e->tenants, e->ntenants * sizeof(*e->_tenants_sorted));
    qsort(e->_tenants_sorted, e->ntenants, sizeof(*e->_tenants_sorted), compare_names);
    return 0;
}

void policy_experiment_release(struct policy_experiment *e)
{
    free(e->_tenants_sorted);
    e->_tenants_sorted = NULL;
}

int policy_experiment_prepare(struct policy_experiment *e)
{
    uint64_t total = 0;

    if (e->narms == 0 || e->name == NULL)
        return -EINVAL;
    for (size_t i = 0; i < e->narms; i++) {
        struct policy_arm *a = &e->arms[i];
        int len = snprintf(a->_reason, sizeof(a->_reason), "ab:%s/%s", e->name, a->name);

        if (len < 0 || (size_t)len >= sizeof(a->_reason))
            return -EINVAL;
        total += a->weight;
        a->_cum = total;
    }
    if (total == 0)
        return -EINVAL;
    e->_total = total;
    e->_seed = XXH3_64bits(e->name, strlen(e->name));
    return sort_tenants(e);
}

const struct policy_arm *policy_experiment_assign(const struct policy_experiment *e,
                                                  const char *key, size_t len)
{
    uint64_t h = XXH3_64bits_withSeed(key, len, e->_seed);
    /* h scaled onto [0, total): the high word of h x total (Lemire's
     * multiply-shift), without modulo bias worth the name. */
    uint64_t r = (uint64_t)(((unsigned __int128)h * e->_total) >> 64);

    for (size_t i = 0; i < e->narms; i++)
        if (r < e->arms[i]._cum)
            return &e->arms[i];
    return &e->arms[e->narms - 1];
}

static int has_tenant(const struct policy_experiment *e, const char *tenant)
{
    if (e->tenants == NULL)
        return 1;
    if (tenant == NULL || e->_tenants_sorted == NULL)
        return 0;
    return bsearch(&tenant, e->_tenants_sorted, e->ntenants, sizeof(*e->_tenants_sorted),
                   compare_names) != NULL;
}

/* The route's candidates named by the arm (all when it names none). */
static uint64_t arm_candidates(const struct policy_arm *a, const struct conf_route *route)
{
    size_t n = route->ncandidates < 64 ? route->ncandidates : 64;
    uint64_t mask = 0;

    for (size_t i = 0; i < n; i++) {
        if (a->backends == NULL) {
            mask |= UINT64_C(1) << i;
            continue;
        }
        for (size_t j = 0; j < a->nbackends; j++)
            if (strcmp(a->backends[j], route->candidates[i]->name) == 0)
                mask |= UINT64_C(1) << i;
    }
    return mask;
}

const struct policy_experiment *policy_experiment_find(const struct policy_experiment *list,
                                                      size_t n, const struct conf_route *route,
                                                      const char *tenant)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(list[i].route, route->model) == 0 && has_tenant(&list[i], tenant))
            return &list[i];
    return NULL;
}

/* The user's id without the blanks around it; NULL when nothing is left.
 * An empty header (`x-user-id:`) names no user: hashed as the user "",
 * every such request of every tenant would fall in one arm. */
static const char *trim_blanks(const char *user, size_t *len)
{
    size_t n = user ? *len : 0;

    while (n > 0 && (*user == ' ' || *user == '\t'))
        user++, n--;
    while (n > 0 && (user[n - 1] == ' ' || user[n - 1] == '\t'))
        n--;
    *len = n;
    return n > 0 ? user : NULL;
}

const struct policy_arm *policy_experiment_arm(const struct policy_experiment *e,
                                               const struct conf_route *route, const char *tenant,
                                               const char *user, size_t len, uint64_t *allowed)
{
    const struct policy_arm *arm;

    *allowed = 0;
    user = trim_blanks(user, &len);
    if (user == NULL) {
        if (tenant == NULL)
            return NULL;
        user = tenant;
        len = strlen(tenant);
    }
    arm = policy_experiment_assign(e, user, len);
    *allowed = arm_candidates(arm, route);
    return *allowed ? arm : NULL;
}

const struct policy_arm *policy_experiment_pick(const struct policy_experiment *list, size_t n,
                                                const struct conf_route *route, const char *tenant,
                                                const char *user, size_t len, uint64_t *allowed)
{
    const struct policy_experiment *e = policy_experiment_find(list, n, route, tenant);

    *allowed = 0;
    return e ? policy_experiment_arm(e, route, tenant, user, len, allowed) : NULL;
}

const char *policy_arm_reason(const struct policy_arm *arm)
{
    return arm->_reason;
}
