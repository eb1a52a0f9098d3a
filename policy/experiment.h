/*
 * policy/experiment.h: A/B experiments that split a route's traffic.
 *
 * An experiment names a route, optionally the tenants taking part, and
 * arms with weights; each arm may restrict the route's candidates to a
 * subset. An end user is assigned an arm by hashing a stable key (a header
 * such as x-user-id, else the tenant id) with XXH3, seeded per experiment
 * so two experiments split users independently, and mapping the hash onto
 * the cumulative weights. The same key always lands in the same arm while
 * the experiment's arms and weights stay the same.
 *
 * These structs do not depend on the config: the config loader (or a
 * test) fills the public fields and calls policy_experiment_prepare().
 */
#ifndef POLICY_EXPERIMENT_H
#define POLICY_EXPERIMENT_H

#include <stddef.h>
#include <stdint.h>

struct conf_route;

/* Room for "ab:<experiment>/<arm>" and its NUL. */
#define POLICY_AB_REASON_MAX 96

struct policy_arm {
    const char *name;             /* arm name, e.g. "control" */
    unsigned weight;              /* relative share of the traffic */
    const char *const *backends;  /* backend names the arm may use; NULL = all candidates */
    size_t nbackends;             /* length of backends */
    uint64_t _cum;                /* prepare: weights of the arms up to this one */
    char _reason[POLICY_AB_REASON_MAX]; /* prepare: "ab:<experiment>/<arm>" */
};

struct policy_experiment {
    const char *name;             /* experiment name */
    const char *route;            /* the route's model name */
    const char *const *tenants;   /* tenant ids taking part; NULL = all */
    size_t ntenants;              /* length of tenants */
    struct policy_arm *arms;      /* at least one */
    size_t narms;                 /* length of arms */
    uint64_t _total;              /* prepare: sum of weights */
    uint64_t _seed;               /* prepare: hash seed, from the name */
    const char **_tenants_sorted; /* prepare: tenants sorted, for a binary search */
};

/* Check `e` and fill its private fields (again after a change to the
 * public ones). Returns 0, -EINVAL when it has no arm, weights summing to
 * 0, or names too long for the reason text, or -ENOMEM. */
int policy_experiment_prepare(struct policy_experiment *e) __attribute__((warn_unused_result));

/* Free what policy_experiment_prepare() allocated. */
void policy_experiment_release(struct policy_experiment *e);

/* The arm of end user `key` (len bytes) in the prepared experiment `e`. */
const struct policy_arm *policy_experiment_assign(const struct policy_experiment *e,
                                                  const char *key, size_t len);

/* The first of `n` prepared experiments that applies to `route` and
 * `tenant`, or NULL. Its user header (the config's) is the one whose
 * value is the key for policy_experiment_arm(): not that of another
 * experiment of the route, which may be for other tenants. */
const struct policy_experiment *policy_experiment_find(const struct policy_experiment *list,
                                                      size_t n, const struct conf_route *route,
                                                      const char *tenant);
/* The arm of `e` for `user` (len bytes; NULL, empty or blank: the tenant
 * id is the key, as an empty user header names no user),
 * with *allowed as policy_experiment_pick() sets it. */
const struct policy_arm *policy_experiment_arm(const struct policy_experiment *e,
                                               const struct conf_route *route, const char *tenant,
                                               const char *user, size_t len, uint64_t *allowed);
/* policy_experiment_find() then policy_experiment_arm(): the first of `n`
 * prepared experiments that applies to `route` and
 * `tenant`, with the arm for `user` (len bytes; NULL, empty or blank:
 * the tenant id is the key). Sets *allowed to the route's candidates the arm may use (bit i
 * = candidates[i]) for policy_request.allowed. Returns NULL, *allowed = 0,
 * when no experiment applies or the arm names none of the route's
 * candidates (config validation should prevent that). */
const struct policy_arm *policy_experiment_pick(const struct policy_experiment *list, size_t n,
                                                const struct conf_route *route, const char *tenant,
                                                const char *user, size_t len, uint64_t *allowed);

/* "ab:<experiment>/<arm>", for policy_request.ab_reason and the log. */
const char *policy_arm_reason(const struct policy_arm *arm);

#endif
