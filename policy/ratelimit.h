/*
 * policy/ratelimit.h: requests-per-minute and tokens-per-minute limits.
 *
 * Token buckets, one per limit, holding at most a minute's worth and
 * refilled continuously at limit/60 s. Pure arithmetic on the loop time
 * the caller passes; no clock is read here. A tenant and each of its keys
 * get one struct policy_ratelimit each; a request is admitted against all
 * that apply at once, all or nothing. Tokens are taken at the estimate
 * when the request is admitted and corrected with the real count when it
 * ends, so a bucket may run into debt and later requests wait it out.
 */
#ifndef POLICY_RATELIMIT_H
#define POLICY_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

/* Levels are kept in units x 60000, so a refill of per_minute / 60000
 * units per millisecond is exact in integers. */
struct policy_bucket {
    int64_t level;      /* units x 60000; may be < 0 after a settle */
    uint64_t last_ms;   /* loop time of the last refill */
    unsigned started:1; /* a bucket starts full at its first use */
};

struct policy_ratelimit {
    int64_t rpm;                   /* requests per minute, 0 = no limit */
    int64_t tpm;                   /* tokens per minute, 0 = no limit */
    struct policy_bucket requests; /* for rpm */
    struct policy_bucket tokens;   /* for tpm */
};

enum policy_rate_result {
    POLICY_RATE_OK,        /* admitted: one request and the tokens taken */
    POLICY_RATE_LIMITED,   /* not now: *retry_after_ms says when */
    POLICY_RATE_TOO_LARGE, /* more tokens than a whole minute's limit: never */
};

/* Admit a request estimated at `tokens` tokens at `now_ms` against the
 * `n` limiters in `rl` (NULL entries skipped). Takes from every bucket
 * only when all have room. On POLICY_RATE_LIMITED sets *retry_after_ms
 * (may be NULL) to the wait until all would have room. */
enum policy_rate_result policy_ratelimit_admit(struct policy_ratelimit *const *rl, size_t n,
                                               uint64_t now_ms, int64_t tokens,
                                               uint64_t *retry_after_ms);

/* Tokens to admit a request at that needs `sure` tokens (its prompt, and
 * its max_tokens if given) and may use `guess` more (a predicted
 * completion): the guess is cut so that the total fits a minute of the
 * smallest tokens-per-minute limit among `rl`. A guess alone never makes
 * a request POLICY_RATE_TOO_LARGE; such a request waits for a full
 * bucket instead, and its real count is settled as usual. */
int64_t policy_ratelimit_fit(struct policy_ratelimit *const *rl, size_t n, int64_t sure,
                             int64_t guess);

/* The request admitted with `estimated` tokens used `actual`: take the
 * difference from (or give it back to) each limiter's token bucket. */
void policy_ratelimit_settle(struct policy_ratelimit *const *rl, size_t n, uint64_t now_ms,
                             int64_t estimated, int64_t actual);

/* Whole units in a bucket now, for headers like x-ratelimit-remaining. */
int64_t policy_bucket_available(struct policy_bucket *b, int64_t per_minute, uint64_t now_ms);

/* Milliseconds until `b`, as of its last refill (policy_bucket_available),
 * is full again, for headers like x-ratelimit-reset. */
uint64_t policy_bucket_full_ms(const struct policy_bucket *b, int64_t per_minute);

#endif
