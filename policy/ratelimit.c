/* policy/ratelimit.c: token buckets for rpm and tpm (see ratelimit.h). */
#include "policy/ratelimit.h"

#define MINUTE_MS INT64_C(60000)
/* A debt is kept up to an hour's worth of the limit. */
#define MAX_DEBT_MINUTES 60

/* Bring `b` up to `now_ms`: per_minute units per minute, capped at a
 * minute's worth. A bucket seen for the first time starts full. */
static void refill(struct policy_bucket *b, int64_t per_minute, uint64_t now_ms)
{
    int64_t cap = per_minute * MINUTE_MS;
    uint64_t dt;

    if (!b->started) {
        b->started = 1;
        b->level = cap;
        b->last_ms = now_ms;
        return;
    }
    if (now_ms > b->last_ms) {
        dt = now_ms - b->last_ms;
        b->last_ms = now_ms;
        /* Past the longest debt plus a minute, any bucket is full; this
         * also keeps dt x per_minute from overflowing. */
        if (dt > (uint64_t)((MAX_DEBT_MINUTES + 1) * MINUTE_MS))
            b->level = cap;
        else
            b->level += (int64_t)dt * per_minute;
    }
    if (b->level > cap)
        b->level = cap;
}

/* Milliseconds until `b` holds `units`, 0 if it does now. */
static uint64_t wait_for(const struct policy_bucket *b, int64_t per_minute, int64_t units)
{
    int64_t short_by = units * MINUTE_MS - b->level;

    return short_by <= 0 ? 0 : (uint64_t)((short_by + per_minute - 1) / per_minute);
}

enum policy_rate_result policy_ratelimit_admit(struct policy_ratelimit *const *rl, size_t n,
                                               uint64_t now_ms, int64_t tokens,
                                               uint64_t *retry_after_ms)
{
    uint64_t wait = 0, w;

    if (tokens < 0)
        tokens = 0;
    for (size_t i = 0; i < n; i++) {
        struct policy_ratelimit *r = rl[i];

        if (r == NULL)
            continue;
        if (r->tpm > 0 && tokens > r->tpm)
            return POLICY_RATE_TOO_LARGE;
        if (r->rpm > 0) {
            refill(&r->requests, r->rpm, now_ms);
            w = wait_for(&r->requests, r->rpm, 1);
            wait = w > wait ? w : wait;
        }
        /* A request that takes no token (a token count) does not wait
         * for the tokens bucket either, even one in debt: it adds none. */
        if (r->tpm > 0 && tokens > 0) {
            refill(&r->tokens, r->tpm, now_ms);
            w = wait_for(&r->tokens, r->tpm, tokens);
            wait = w > wait ? w : wait;
        }
    }
    if (wait > 0) {
        if (retry_after_ms != NULL)
            *retry_after_ms = wait;
        return POLICY_RATE_LIMITED;
    }
    for (size_t i = 0; i < n; i++) {
        if (rl[i] == NULL)
            continue;
        if (rl[i]->rpm > 0)
            rl[i]->requests.level -= MINUTE_MS;
        if (rl[i]->tpm > 0)
            rl[i]->tokens.level -= tokens * MINUTE_MS;
    }
    return POLICY_RATE_OK;
}

int64_t policy_ratelimit_fit(struct policy_ratelimit *const *rl, size_t n, int64_t sure,
                             int64_t guess)
{
    int64_t total = sure + (guess > 0 ? guess : 0);

    for (size_t i = 0; i < n; i++)
        if (rl[i] != NULL && rl[i]->tpm > 0 && total > rl[i]->tpm)
            total = sure > rl[i]->tpm ? sure : rl[i]->tpm;
    return total;
}

void policy_ratelimit_settle(struct policy_ratelimit *const *rl, size_t n, uint64_t now_ms,
                             int64_t estimated, int64_t actual)
{
    for (size_t i = 0; i < n; i++) {
        struct policy_ratelimit *r = rl[i];
        int64_t floor;

        if (r == NULL || r->tpm <= 0)
            continue;
        refill(&r->tokens, r->tpm, now_ms);
        r->tokens.level -= (actual - estimated) * MINUTE_MS;
        floor = -MAX_DEBT_MINUTES * r->tpm * MINUTE_MS;
        if (r->tokens.level < floor)
            r->tokens.level = floor;
        if (r->tokens.level > r->tpm * MINUTE_MS)
            r->tokens.level = r->tpm * MINUTE_MS;
    }
}

int64_t policy_bucket_available(struct policy_bucket *b, int64_t per_minute, uint64_t now_ms)
{
    if (per_minute <= 0)
        return INT64_MAX;
    refill(b, per_minute, now_ms);
    return b->level > 0 ? b->level / MINUTE_MS : 0;
}

uint64_t policy_bucket_full_ms(const struct policy_bucket *b, int64_t per_minute)
{
    return per_minute <= 0 ? 0 : wait_for(b, per_minute, per_minute);
}
