/*
 * tests/policy/test_token_stats.c: calibration of estimates converges to
 * the upstream's true ratio, and output prediction takes max_tokens or a
 * high quantile of recent completions.
 */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <math.h>

#include "policy/tokenize.h"

/* Deterministic noise in [-1, 1). */
static double noise(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return (double)(*s % 20001) / 10000.0 - 1.0;
}

Test(token_stats, calibration_converges_within_few_percent, .timeout = 10)
{
    struct policy_calib c;
    policy_calib_init(&c);
    cr_assert_eq(policy_calib_apply(&c, 1000), 1000);
    uint32_t seed = 12345;
    const double truth = 1.37; /* the unknown model makes 37% more tokens */
    for (int i = 0; i < 40; i++) {
        int64_t raw = 200 + (int64_t)(noise(&seed) * 150);
        int64_t reported = (int64_t)llround(raw * truth * (1 + 0.08 * noise(&seed)));
        policy_calib_observe(&c, raw, reported);
    }
    cr_expect_eq(c.samples, 40);
    cr_expect_lt(fabs(c.ratio - truth) / truth, 0.03, "ratio %f vs %f", c.ratio, truth);
    int64_t est = policy_calib_apply(&c, 1000);
    cr_expect_lt(labs((long)(est - 1370)), 1370 * 3 / 100, "estimate %lld", (long long)est);
}

Test(token_stats, calibration_ignores_bad_reports, .timeout = 10)
{
    struct policy_calib c;
    policy_calib_init(&c);
    policy_calib_observe(&c, 100, 0);
    policy_calib_observe(&c, 0, 100);
    cr_expect_eq(c.samples, 0);
    cr_expect_eq(c.ratio, 1.0);
    policy_calib_observe(&c, 1, 1000000); /* clamped to 20 */
    cr_expect_eq(c.ratio, 20.0);
}

/* As the router asks: the request's choices and cap read once, then the
 * prediction. */
static int64_t predict_for(struct policy_outpred *o, const cJSON *req, int64_t fallback)
{
    return policy_outpred_predict(o, policy_outpred_choices(req), policy_outpred_cap(req),
                                  fallback);
}

static int64_t predict(struct policy_outpred *o, const char *json, int64_t fallback)
{
    cJSON *req = json ? cJSON_Parse(json) : NULL;
    int64_t n = predict_for(o, req, fallback);
    cJSON_Delete(req);
    return n;
}

Test(token_stats, prediction_prefers_request_limits, .timeout = 10)
{
    struct policy_outpred o;
    policy_outpred_init(&o);
    cr_expect_eq(predict(&o, "{\"max_tokens\":300}", 50), 300);
    cr_expect_eq(predict(&o, "{\"max_completion_tokens\":200,\"max_tokens\":300}", 50), 200);
    cr_expect_eq(predict(&o, "{\"max_tokens\":100,\"n\":3}", 50), 300);
    cr_expect_eq(predict(&o, "{\"max_tokens\":0}", 50), 50);
    cr_expect_eq(predict(&o, NULL, 50), 50);
    cr_expect_eq(predict(NULL, "{}", 64), 64);
}

Test(token_stats, prediction_uses_p95_of_recent, .timeout = 10)
{
    struct policy_outpred o;
    policy_outpred_init(&o);
    for (int i = 1; i <= 7; i++)
        policy_outpred_observe(&o, 1000, 1);
    cr_expect_eq(predict(&o, "{}", 50), 50, "fewer than 8 samples: fallback");
    policy_outpred_init(&o);
    /* 1..100 in a scrambled order: nearest-rank P95 is 95. */
    for (int i = 0; i < 100; i++)
        policy_outpred_observe(&o, 1 + (i * 37) % 100, 1);
    cr_expect_eq(predict(&o, "{}", 50), 95);
    /* The window forgets: after a full window of 1000s, P95 is 1000. */
    for (int i = 0; i < POLICY_OUTPRED_WINDOW; i++)
        policy_outpred_observe(&o, 1000, 1);
    cr_expect_eq(predict(&o, "{}", 50), 1000);
    /* A 10% tail of long answers pushes P95 to the tail. */
    policy_outpred_init(&o);
    for (int i = 0; i < 100; i++)
        policy_outpred_observe(&o, i % 10 == 0 ? 2000 : 100, 1);
    cr_expect_eq(predict(&o, "{}", 50), 2000);
}

/* An answer to n choices reports their total: learnt per choice, since the
 * prediction for a request with n multiplies by n. */
Test(token_stats, answers_with_n_choices_are_learnt_per_choice, .timeout = 10)
{
    struct policy_outpred o;
    cJSON *four = cJSON_Parse("{\"n\":4}"), *one = cJSON_Parse("{}");

    policy_outpred_init(&o);
    for (int i = 0; i < 10; i++)
        policy_outpred_observe(&o, 400, policy_outpred_choices(four));
    cr_assert_eq(predict_for(&o, one, 256), 100);
    cr_assert_eq(predict_for(&o, four, 256), 400);
    cJSON_Delete(four);
    cJSON_Delete(one);
}

/* A legacy completion answers each prompt of an array on its own, with
 * best_of completions generated (and billed) per prompt when it is more
 * than n: held for all, learnt per one. */
Test(token_stats, completions_hold_for_every_prompt_and_best_of, .timeout = 10)
{
    struct policy_outpred o;
    cJSON *req = cJSON_Parse("{\"prompt\":[\"a\",[1,2]],\"best_of\":3,\"n\":2}");
    cJSON *one = cJSON_Parse("{\"prompt\":[1,2,3]}");

    cr_assert_eq(policy_outpred_choices(req), 6);
    cr_assert_eq(policy_outpred_choices(one), 1, "an array of token ids is one prompt");
    cr_assert_eq(predict(NULL, "{\"prompt\":[\"a\",\"b\"],\"best_of\":3,\"n\":2,\"max_tokens\":10}", 5),
                 60);
    policy_outpred_init(&o);
    for (int i = 0; i < 10; i++)
        policy_outpred_observe(&o, 600, policy_outpred_choices(req));
    cr_assert_eq(predict_for(&o, one, 256), 100);
    cJSON_Delete(req);
    cJSON_Delete(one);
}

/* max_tokens and n may each be up to POLICY_TOKENS_COUNT_MAX (1e12): their
 * product passed 64 bits (1e12 x 1e7 = 1e19) and wrapped negative, which
 * held the request for its prompt alone and passed every context window,
 * where 1e12 tokens alone are refused as too long. */
Test(token_stats, a_huge_max_tokens_times_n_does_not_wrap, .timeout = 10)
{
    cJSON *req = cJSON_Parse("{\"max_tokens\":1000000000000,\"n\":10000000}");
    int64_t pred = predict_for(NULL, req, 256);

    cr_expect_geq(pred, INT64_C(1000000000000), "predicted %lld", (long long)pred);
    /* room left to add a prompt of up to 1e12 tokens without overflow */
    cr_expect_leq(pred, INT64_MAX - INT64_C(1000000000000), "predicted %lld", (long long)pred);
    cJSON_Delete(req);
}
