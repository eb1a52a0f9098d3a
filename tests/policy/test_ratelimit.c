/* tests/policy/test_ratelimit.c: policy/ratelimit.c token buckets for
 * requests and tokens per minute, on a clock the test drives. */
#include <criterion/criterion.h>

#include "policy/ratelimit.h"

struct step {
    uint64_t at_ms;        /* clock */
    int64_t tokens;        /* estimated tokens of the request */
    enum policy_rate_result want;
    uint64_t retry_ms;     /* expected retry-after when limited */
};

struct sequence {
    const char *name;
    int64_t rpm, tpm;
    struct step steps[8];
    size_t nsteps;
};

static const struct sequence sequences[] = {
    /* 10000 tokens/min refill 1 token per 6 ms. 6000 taken leaves 4000; a
     * 5000 request is short by 1000 = 6000 ms; at 6 s there are 5000. */
    {"tpm", 0, 10000,
     {{0, 6000, POLICY_RATE_OK, 0},
      {0, 5000, POLICY_RATE_LIMITED, 6000},
      {5999, 5000, POLICY_RATE_LIMITED, 1},
      {6000, 5000, POLICY_RATE_OK, 0},
      {6000, 10001, POLICY_RATE_TOO_LARGE, 0},
      /* 0 left at 6 s; the bucket is full again a minute later, no more. */
      {606000, 10000, POLICY_RATE_OK, 0},
      {606000, 1, POLICY_RATE_LIMITED, 6}},
     7},
    /* 2 requests/min: one every 30 s, a burst of 2. */
    {"rpm", 2, 0,
     {{1000, 0, POLICY_RATE_OK, 0},
      {1000, 0, POLICY_RATE_OK, 0},
      {1000, 0, POLICY_RATE_LIMITED, 30000},
      {16000, 0, POLICY_RATE_LIMITED, 15000},
      {31000, 0, POLICY_RATE_OK, 0},
      {31000, 0, POLICY_RATE_LIMITED, 30000}},
     6},
    /* Both: the rpm bucket has room, the tpm one does not, and the
     * longer wait wins. 60 rpm = 1 per s; 600 tpm = 1 token per 100 ms. */
    {"rpm and tpm", 60, 600,
     {{0, 500, POLICY_RATE_OK, 0},
      {0, 200, POLICY_RATE_LIMITED, 10000},
      {10000, 200, POLICY_RATE_OK, 0}},
     3},
    {"unlimited", 0, 0,
     {{0, 1000000, POLICY_RATE_OK, 0}, {0, 1000000, POLICY_RATE_OK, 0}}, 2},
};

Test(ratelimit, sequences, .timeout = 5)
{
    for (size_t i = 0; i < sizeof(sequences) / sizeof(sequences[0]); i++) {
        const struct sequence *s = &sequences[i];
        struct policy_ratelimit rl = {.rpm = s->rpm, .tpm = s->tpm};
        struct policy_ratelimit *list[] = {&rl};

        for (size_t k = 0; k < s->nsteps; k++) {
            const struct step *st = &s->steps[k];
            uint64_t retry = 0;
            enum policy_rate_result r = policy_ratelimit_admit(list, 1, st->at_ms, st->tokens, &retry);

            cr_assert_eq(r, st->want, "%s step %zu: result %d, want %d", s->name, k, r, st->want);
            if (r == POLICY_RATE_LIMITED)
                cr_assert_eq(retry, st->retry_ms, "%s step %zu: retry %llu, want %llu", s->name, k,
                             (unsigned long long)retry, (unsigned long long)st->retry_ms);
        }
    }
}

Test(ratelimit, tenant_and_key_all_or_nothing, .timeout = 5)
{
    struct policy_ratelimit tenant = {.rpm = 100};
    struct policy_ratelimit key = {.rpm = 2};
    struct policy_ratelimit *both[] = {&tenant, NULL, &key};

    cr_assert_eq(policy_ratelimit_admit(both, 3, 0, 0, NULL), POLICY_RATE_OK);
    cr_assert_eq(policy_ratelimit_admit(both, 3, 0, 0, NULL), POLICY_RATE_OK);
    /* The key is out; the tenant is not charged for the refused one. */
    cr_assert_eq(policy_ratelimit_admit(both, 3, 0, 0, NULL), POLICY_RATE_LIMITED);
    cr_assert_eq(policy_bucket_available(&tenant.requests, tenant.rpm, 0), 98);
    cr_assert_eq(policy_bucket_available(&key.requests, key.rpm, 0), 0);
    /* Another key of the same tenant still passes. */
    struct policy_ratelimit other = {.rpm = 2};
    struct policy_ratelimit *tenant_other[] = {&tenant, &other};
    cr_assert_eq(policy_ratelimit_admit(tenant_other, 2, 0, 0, NULL), POLICY_RATE_OK);
    cr_assert_eq(policy_bucket_available(&tenant.requests, tenant.rpm, 0), 97);
}

Test(ratelimit, settle_charges_overrun_and_refunds, .timeout = 5)
{
    struct policy_ratelimit rl = {.tpm = 2000};
    struct policy_ratelimit *list[] = {&rl};
    uint64_t retry = 0;

    /* Estimated 1000, used 3000: 2000 - 1000 - 2000 = -1000, in debt. */
    cr_assert_eq(policy_ratelimit_admit(list, 1, 0, 1000, NULL), POLICY_RATE_OK);
    policy_ratelimit_settle(list, 1, 0, 1000, 3000);
    cr_assert_eq(policy_bucket_available(&rl.tokens, rl.tpm, 0), 0);
    /* Full again (x-ratelimit-reset-tokens) after 3000 x 60000 / 2000 ms. */
    cr_assert_eq(policy_bucket_full_ms(&rl.tokens, rl.tpm), 90000);
    /* One token needs 1001 more: 1001 x 60000 / 2000 = 30030 ms. */
    cr_assert_eq(policy_ratelimit_admit(list, 1, 0, 1, &retry), POLICY_RATE_LIMITED);
    cr_assert_eq(retry, 30030);
    /* At 60 s: -1000 + 2000 = 1000 available. Estimated 1000, used 200:
     * 800 come back. */
    cr_assert_eq(policy_bucket_available(&rl.tokens, rl.tpm, 60000), 1000);
    cr_assert_eq(policy_ratelimit_admit(list, 1, 60000, 1000, NULL), POLICY_RATE_OK);
    policy_ratelimit_settle(list, 1, 60000, 1000, 200);
    cr_assert_eq(policy_bucket_available(&rl.tokens, rl.tpm, 60000), 800);
    /* A refund never fills past a minute's worth. */
    policy_ratelimit_settle(list, 1, 60000, 100000, 0);
    cr_assert_eq(policy_bucket_available(&rl.tokens, rl.tpm, 60000), 2000);
}

Test(ratelimit, debt_is_bounded_and_waits_out, .timeout = 5)
{
    struct policy_ratelimit rl = {.tpm = 1000};
    struct policy_ratelimit *list[] = {&rl};

    cr_assert_eq(policy_ratelimit_admit(list, 1, 0, 10, NULL), POLICY_RATE_OK);
    /* A runaway stream: a billion tokens. The debt stops at an hour's
     * worth (60000 tokens), so 61 minutes later the bucket is full. */
    policy_ratelimit_settle(list, 1, 0, 10, 1000000000);
    cr_assert_eq(policy_ratelimit_admit(list, 1, 60 * 60000, 1, NULL), POLICY_RATE_LIMITED);
    cr_assert_eq(policy_bucket_available(&rl.tokens, rl.tpm, 61 * 60000), 1000);
    cr_assert_eq(policy_ratelimit_admit(list, 1, 61 * 60000, 1000, NULL), POLICY_RATE_OK);
}

Test(ratelimit, clock_going_back_adds_nothing, .timeout = 5)
{
    struct policy_ratelimit rl = {.rpm = 1};
    struct policy_ratelimit *list[] = {&rl};

    cr_assert_eq(policy_ratelimit_admit(list, 1, 100000, 0, NULL), POLICY_RATE_OK);
    cr_assert_eq(policy_ratelimit_admit(list, 1, 50000, 0, NULL), POLICY_RATE_LIMITED);
    cr_assert_eq(policy_ratelimit_admit(list, 1, 160000, 0, NULL), POLICY_RATE_OK);
}

/* A predicted completion is cut to the smallest tpm among the limiters;
 * what the request surely needs is not. */
Test(ratelimit, a_guess_is_cut_to_the_smallest_tpm, .timeout = 5)
{
    struct policy_ratelimit tenant = {.tpm = 5000}, key = {.tpm = 800}, open = {0};
    struct policy_ratelimit *both[] = {&tenant, &key}, *none[] = {&open, NULL};

    cr_assert_eq(policy_ratelimit_fit(none, 2, 9, 900), 909);
    cr_assert_eq(policy_ratelimit_fit(both, 2, 9, 700), 709);
    cr_assert_eq(policy_ratelimit_fit(both, 2, 9, 900), 800);
    cr_assert_eq(policy_ratelimit_fit(both, 2, 900, 50), 900, "the sure part stays");
    cr_assert_eq(policy_ratelimit_fit(both, 2, 9, -1), 9);
    /* The cut request is admitted on a full bucket; the sure one never. */
    cr_assert_eq(policy_ratelimit_admit(both, 2, 0, policy_ratelimit_fit(both, 2, 9, 900), NULL),
                 POLICY_RATE_OK);
    cr_assert_eq(policy_ratelimit_admit(both, 2, 0, policy_ratelimit_fit(both, 2, 900, 0), NULL),
                 POLICY_RATE_TOO_LARGE);
}
