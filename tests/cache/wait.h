/*
 * tests/cache/wait.h: run one store operation to completion on a loop, for
 * tests. Each helper starts the operation, turns the loop until its
 * callback ran, and returns what the callback saw. Header-only so each
 * test binary gets its own copy.
 */
#ifndef TESTS_CACHE_WAIT_H
#define TESTS_CACHE_WAIT_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <uv.h>

#include "cache/cache.h"

struct wait {
    int done;                        /* callback ran */
    int calls;                       /* times it ran (must be 1) */
    const char *err;                 /* its errstr */
    struct cache_begin_result begin; /* begin outcome */
    char value[256];                 /* copy of a hit's bytes */
    struct cache_spend spend;        /* spend_get outcome */
};

static inline void wait_begin_cb(void *arg, const char *err, const struct cache_begin_result *r)
{
    struct wait *w = arg;

    w->done = 1;
    w->calls++;
    w->err = err;
    if (r) {
        w->begin = *r;
        if (r->value && r->value_len < sizeof(w->value)) {
            memcpy(w->value, r->value, r->value_len);
            w->value[r->value_len] = '\0';
        }
        w->begin.value = NULL;
    }
}

static inline void wait_spend_cb(void *arg, const char *err, const struct cache_spend *s)
{
    struct wait *w = arg;

    w->done = 1;
    w->calls++;
    w->err = err;
    if (s)
        w->spend = *s;
}

static inline void wait_done_cb(void *arg, const char *err)
{
    struct wait *w = arg;

    w->done = 1;
    w->calls++;
    w->err = err;
}

static inline void wait_run(uv_loop_t *loop, struct wait *w)
{
    cr_assert_eq(w->done, 0, "callback ran inside the call");
    while (!w->done)
        uv_run(loop, UV_RUN_ONCE);
    cr_assert_eq(w->calls, 1);
}

static inline struct wait wait_begin(uv_loop_t *loop, struct cache *c, const char *tenant,
                                     const struct cache_key *key, long long amount,
                                     long long day_limit, long long month_limit)
{
    struct wait w = {0};

    cr_assert_not_null(
        cache_begin(c, tenant, key, amount, day_limit, month_limit, wait_begin_cb, &w));
    wait_run(loop, &w);
    return w;
}

static inline const char *wait_settle(uv_loop_t *loop, struct cache *c,
                                      const struct cache_reservation *r, long long real)
{
    struct wait w = {0};

    cr_assert_not_null(cache_settle(c, r, real, wait_done_cb, &w));
    wait_run(loop, &w);
    return w.err;
}

static inline const char *wait_release(uv_loop_t *loop, struct cache *c,
                                       const struct cache_reservation *r)
{
    struct wait w = {0};

    cr_assert_not_null(cache_release(c, r, wait_done_cb, &w));
    wait_run(loop, &w);
    return w.err;
}

static inline struct wait wait_spend(uv_loop_t *loop, struct cache *c, const char *tenant)
{
    struct wait w = {0};

    cr_assert_not_null(cache_spend_get(c, tenant, wait_spend_cb, &w));
    wait_run(loop, &w);
    return w;
}

static inline const char *wait_put(uv_loop_t *loop, struct cache *c, const char *tenant,
                                   const struct cache_key *key, const char *value, int ttl_s)
{
    struct wait w = {0};

    cr_assert_not_null(
        cache_put(c, tenant, key, value, strlen(value), ttl_s, wait_done_cb, &w));
    wait_run(loop, &w);
    return w.err;
}

/* Turn the loop until the store reports `state` (bounded by the test's
 * .timeout). */
static inline void wait_state(uv_loop_t *loop, struct cache *c, enum cache_state state)
{
    struct cache_stats st;

    for (;;) {
        cache_stats(c, &st);
        if (st.state == state)
            return;
        uv_run(loop, UV_RUN_ONCE);
    }
}

static inline void wait_timer_cb(uv_timer_t *t)
{
}

/* Turn the loop until the journal is written back and no command is in
 * flight (bounded by the test's .timeout). */
static inline void wait_drained(uv_loop_t *loop, struct cache *c)
{
    struct cache_stats st;

    for (cache_stats(c, &st); st.journal_entries > 0 || st.inflight > 0; cache_stats(c, &st))
        uv_run(loop, UV_RUN_ONCE);
}

/* Let the loop run for `ms` milliseconds. */
static inline void wait_ms(uv_loop_t *loop, int ms)
{
    uv_timer_t t;

    uv_timer_init(loop, &t);
    uv_timer_start(&t, wait_timer_cb, (uint64_t)ms, 0);
    while (uv_is_active((uv_handle_t *)&t))
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
}

static inline void wait_closed_cb(void *arg)
{
    *(int *)arg = 1;
}

/* Close the store, run the loop dry and check every handle is gone. */
static inline void wait_close(uv_loop_t *loop, struct cache *c)
{
    int closed = 0;

    cache_close(c, wait_closed_cb, &closed);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(closed, 1);
    cr_assert_eq(uv_loop_close(loop), 0);
}

/* A unique key prefix for this test process. */
static inline void wait_prefix(char *out, size_t n, const char *name)
{
    snprintf(out, n, "t%d:%s:", (int)getpid(), name);
}

#endif
