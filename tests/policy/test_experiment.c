/* tests/policy/test_experiment.c: policy/experiment.c, sticky weighted
 * A/B assignment: shares over 100k users, stickiness, independence of
 * experiments, tenant filter, arm candidate subsets. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "policy/cost.h"
#include "policy/experiment.h"
#include "tests/support/cost_fixture.h"

#define USERS 100000

static const char *const big_models[] = {"gpt-4o", "claude-sonnet-4-5"};
static const char *const acme_only[] = {"acme"};

/* "exp" on route "chat": control (all candidates) 70, big 20, gpu 10. */
static void make_experiment(struct policy_experiment *e, struct policy_arm arms[3])
{
    static const char *const gpu_only[] = {"llama-gpu"};

    arms[0] = (struct policy_arm){.name = "control", .weight = 70};
    arms[1] = (struct policy_arm){.name = "big", .weight = 20, .backends = big_models,
                                  .nbackends = 2};
    arms[2] = (struct policy_arm){.name = "gpu", .weight = 10, .backends = gpu_only,
                                  .nbackends = 1};
    *e = (struct policy_experiment){.name = "exp", .route = "chat", .arms = arms, .narms = 3};
    cr_assert_eq(policy_experiment_prepare(e), 0);
}

static size_t user_key(char *buf, size_t cap, unsigned i)
{
    return (size_t)snprintf(buf, cap, "user-%u", i);
}

Test(experiment, shares_match_weights_over_100k_users, .timeout = 5)
{
    struct policy_experiment e;
    struct policy_arm arms[3];
    unsigned count[3] = {0};
    static const double p[3] = {0.7, 0.2, 0.1};
    double chi2 = 0;
    char key[32];

    make_experiment(&e, arms);
    for (unsigned i = 0; i < USERS; i++) {
        const struct policy_arm *a = policy_experiment_assign(&e, key, user_key(key, sizeof(key), i));

        count[a - arms]++;
    }
    for (int k = 0; k < 3; k++) {
        double share = (double)count[k] / USERS;
        /* Binomial standard deviation of a share: sqrt(p(1-p)/N), e.g.
         * sqrt(0.7 x 0.3 / 100000) = 0.00145 for control. */
        double sigma = sqrt(p[k] * (1 - p[k]) / USERS);
        double expect = p[k] * USERS;

        cr_assert(fabs(share - p[k]) < 4 * sigma, "arm %s: share %.4f, weight %.2f (4 sigma %.4f)",
                  arms[k].name, share, p[k], 4 * sigma);
        chi2 += (count[k] - expect) * (count[k] - expect) / expect;
    }
    /* 2 degrees of freedom: 13.8 is the p = 0.001 critical value. */
    cr_assert_lt(chi2, 13.8, "chi-square %.2f", chi2);
}

Test(experiment, assignment_is_sticky, .timeout = 5)
{
    struct policy_experiment e, again;
    struct policy_arm arms[3], arms2[3];
    char key[32];

    make_experiment(&e, arms);
    /* A second, separately prepared copy (as after a config reload). */
    make_experiment(&again, arms2);
    for (unsigned i = 0; i < 10000; i++) {
        size_t len = user_key(key, sizeof(key), i);
        const struct policy_arm *a = policy_experiment_assign(&e, key, len);

        cr_assert_eq(policy_experiment_assign(&e, key, len), a, "user %u moved", i);
        cr_assert_eq(policy_experiment_assign(&again, key, len) - arms2, a - arms,
                     "user %u moved after a reload", i);
    }
}

Test(experiment, experiments_split_users_independently, .timeout = 5)
{
    struct policy_arm a1[2] = {{.name = "x", .weight = 1}, {.name = "y", .weight = 1}};
    struct policy_arm a2[2] = {{.name = "x", .weight = 1}, {.name = "y", .weight = 1}};
    struct policy_experiment e1 = {.name = "first", .route = "chat", .arms = a1, .narms = 2};
    struct policy_experiment e2 = {.name = "second", .route = "chat", .arms = a2, .narms = 2};
    unsigned both = 0;
    char key[32];

    cr_assert_eq(policy_experiment_prepare(&e1), 0);
    cr_assert_eq(policy_experiment_prepare(&e2), 0);
    for (unsigned i = 0; i < USERS; i++) {
        size_t len = user_key(key, sizeof(key), i);

        both += policy_experiment_assign(&e1, key, len) == &a1[0] &&
                policy_experiment_assign(&e2, key, len) == &a2[0];
    }
    /* Independent halves: 25% in "x" of both; sigma = sqrt(.25 x .75 / N)
     * = 0.00137. The same seed would give 50%. */
    cr_assert(fabs((double)both / USERS - 0.25) < 4 * 0.00137, "%.4f in x of both",
              (double)both / USERS);
}

Test(experiment, zero_weight_arm_gets_nobody, .timeout = 5)
{
    struct policy_arm arms[2] = {{.name = "off", .weight = 0}, {.name = "on", .weight = 5}};
    struct policy_experiment e = {.name = "e", .route = "chat", .arms = arms, .narms = 2};
    char key[32];

    cr_assert_eq(policy_experiment_prepare(&e), 0);
    for (unsigned i = 0; i < 10000; i++)
        cr_assert_eq(policy_experiment_assign(&e, key, user_key(key, sizeof(key), i)), &arms[1]);
}

Test(experiment, prepare_rejects_bad_experiments, .timeout = 5)
{
    char long_name[200];
    struct policy_arm zero[1] = {{.name = "a", .weight = 0}};
    struct policy_arm one[1] = {{.name = "a", .weight = 1}};
    struct policy_experiment e = {.name = "e", .route = "chat", .arms = zero, .narms = 1};

    cr_assert_eq(policy_experiment_prepare(&e), -EINVAL);
    e.narms = 0;
    e.arms = one;
    cr_assert_eq(policy_experiment_prepare(&e), -EINVAL);
    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    e.narms = 1;
    e.name = long_name;
    cr_assert_eq(policy_experiment_prepare(&e), -EINVAL);
    e.name = "e";
    cr_assert_eq(policy_experiment_prepare(&e), 0);
    cr_assert_str_eq(policy_arm_reason(&one[0]), "ab:e/a");
}

Test(experiment, pick_by_route_tenant_and_user, .timeout = 5)
{
    struct fx f;
    struct policy_experiment e;
    struct policy_arm arms[3];
    const struct policy_arm *a;
    uint64_t allowed = 99;
    char key[32];

    fx_init(&f);
    make_experiment(&e, arms);
    /* Another route: no experiment. */
    f.route.model = "embed";
    cr_assert_null(policy_experiment_pick(&e, 1, &f.route, "acme", "u", 1, &allowed));
    cr_assert_eq(allowed, 0);
    f.route.model = "chat";
    /* Each arm's candidates: control all four, big 4o + sonnet, gpu the pool. */
    for (unsigned i = 0; i < 1000; i++) {
        size_t len = user_key(key, sizeof(key), i);

        a = policy_experiment_pick(&e, 1, &f.route, "acme", key, len, &allowed);
        cr_assert_eq(a, policy_experiment_assign(&e, key, len));
        if (a == &arms[0])
            cr_assert_eq(allowed, 0xf);
        else if (a == &arms[1])
            cr_assert_eq(allowed, (1u << FX_4O) | (1u << FX_SONNET));
        else
            cr_assert_eq(allowed, 1u << FX_GPU);
    }
    /* No user header: the tenant id is the key. */
    a = policy_experiment_pick(&e, 1, &f.route, "acme", NULL, 0, &allowed);
    cr_assert_eq(a, policy_experiment_assign(&e, "acme", 4));
    /* A tenant filter. */
    e.tenants = acme_only;
    e.ntenants = 1;
    cr_assert_eq(policy_experiment_prepare(&e), 0);
    cr_assert_null(policy_experiment_pick(&e, 1, &f.route, "globex", "u", 1, &allowed));
    cr_assert_not_null(policy_experiment_pick(&e, 1, &f.route, "acme", "u", 1, &allowed));
    /* An arm naming none of the route's candidates applies to nobody. */
    arms[0].backends = acme_only;
    arms[0].nbackends = 1;
    arms[1].backends = acme_only;
    arms[2].backends = acme_only;
    cr_assert_null(policy_experiment_pick(&e, 1, &f.route, "acme", "u", 1, &allowed));
    cr_assert_eq(allowed, 0);
    policy_experiment_release(&e);
    fx_fini(&f);
}

/* A tenant filter of thousands, listed out of order: every listed tenant
 * takes part and no other does (it is searched, not scanned). */
Test(experiment, a_long_tenant_list_lets_in_exactly_its_tenants, .timeout = 5)
{
    enum { TENANTS = 3000 };
    static char names[TENANTS][16];
    static const char *listed[TENANTS / 2];
    struct fx f;
    struct policy_experiment e;
    struct policy_arm arms[3];
    uint64_t allowed;

    fx_init(&f);
    f.route.model = "chat";
    make_experiment(&e, arms);
    for (unsigned i = 0; i < TENANTS; i++)
        snprintf(names[i], sizeof(names[i]), "t-%u", (i * 7919u) % TENANTS);
    for (unsigned i = 0; i < TENANTS / 2; i++)
        listed[i] = names[2 * i];
    e.tenants = listed;
    e.ntenants = TENANTS / 2;
    cr_assert_eq(policy_experiment_prepare(&e), 0);
    for (unsigned i = 0; i < TENANTS; i++) {
        const struct policy_arm *a = policy_experiment_pick(&e, 1, &f.route, names[i], "u", 1,
                                                            &allowed);

        cr_assert_eq(a != NULL, i % 2 == 0, "tenant %s (listed: %d)", names[i], i % 2 == 0);
    }
    cr_assert_null(policy_experiment_pick(&e, 1, &f.route, NULL, "u", 1, &allowed));
    cr_assert_null(policy_experiment_pick(&e, 1, &f.route, "t-", "u", 1, &allowed));
    cr_assert_str_eq(e.tenants[0], names[0], "the config's order is left as it was");
    policy_experiment_release(&e);
    fx_fini(&f);
}

Test(experiment, selector_reports_the_arm, .timeout = 5)
{
    struct fx f;
    struct policy_experiment e;
    struct policy_arm arms[3];
    struct policy_verdict v[FX_N];
    struct policy_choice ch;
    struct policy_request req;
    const struct policy_arm *a = NULL;
    char key[32];
    size_t len = 0;

    fx_init(&f);
    make_experiment(&e, arms);
    /* Find a user in the "big" arm. */
    for (unsigned i = 0; a != &arms[1]; i++) {
        len = user_key(key, sizeof(key), i);
        a = policy_experiment_assign(&e, key, len);
    }
    req = (struct policy_request){.route = &f.route, .backends = f.set, .prompt_tokens = 1000,
                                  .completion_tokens = 500, .now_ms = 1000};
    a = policy_experiment_pick(&e, 1, &f.route, "acme", key, len, &req.allowed);
    req.ab_reason = policy_arm_reason(a);
    ch = policy_cost_aware.choose(&req, v);
    /* Without the arm the idle pool would win; in it, 4o (7500 < 10500). */
    cr_assert_eq(ch.candidate, FX_4O);
    cr_assert_str_eq(ch.reason_text, "ab:exp/big");
    cr_assert_eq(v[FX_GPU].kind, POLICY_VERDICT_ARM);
    cr_assert_eq(v[FX_MINI].kind, POLICY_VERDICT_ARM);
    fx_fini(&f);
}
