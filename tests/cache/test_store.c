/*
 * tests/cache/test_store.c: reservation arithmetic, limits, expiry, the
 * response cache and cancellation, each run on both stores: in-process and
 * Redis (a real redis-server per test).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "cache/cache.h"
#include "common/error.h"
#include "tests/cache/wait.h"
#include "tests/support/redis.h"

struct fx {
    uv_loop_t loop;          /* the test's loop */
    struct cache *c;         /* store under test */
    struct test_redis redis; /* server, when use_redis */
    int use_redis;           /* which store */
    char prefix[64];         /* unique key prefix */
};

static void fx_open(struct fx *f, int use_redis, struct cache_options *o, const char *name)
{
    memset(f, 0, sizeof(*f));
    cr_assert_eq(uv_loop_init(&f->loop), 0);
    f->use_redis = use_redis;
    wait_prefix(f->prefix, sizeof(f->prefix), name);
    o->key_prefix = f->prefix;
    if (use_redis) {
        cr_assert_eq(test_redis_start(&f->redis, 0), 0, "redis-server did not start");
        o->redis_url = f->redis.url;
    }
    f->c = cache_create(&f->loop, o);
    cr_assert_not_null(f->c);
    wait_state(&f->loop, f->c, CACHE_STATE_CONNECTED);
}

/* The store's script calls for its ops so far. Every instance also
 * renews its mark in Redis's list of live instances each second, with a
 * script call of its own: one that alone calls ZCARD. */
static long long op_calls(struct fx *f)
{
    return test_redis_calls_less(&f->redis, "evalsha", "zcard");
}

static void fx_close(struct fx *f)
{
    wait_close(&f->loop, f->c);
    if (f->use_redis)
        test_redis_stop(&f->redis);
}

#define BOTH(name, secs)                                                                 \
    static void name##_body(int use_redis);                                              \
    Test(store_memory, name, .timeout = secs) { name##_body(0); }                        \
    Test(store_redis, name, .timeout = secs) { name##_body(1); }                         \
    static void name##_body(int use_redis)

static struct cache_key key_of(int n)
{
    struct cache_key k;

    memset(&k, 0, sizeof(k));
    k.sha256[0] = (uint8_t)n;
    k.sha256[31] = 0xab;
    return k;
}

BOTH(reserve_settle_release_arithmetic, 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct wait w, s;

    fx_open(&f, use_redis, &o, "arith");
    w = wait_begin(&f.loop, f.c, "acme", NULL, 100, 1000, 10000);
    cr_assert_null(w.err);
    cr_assert(w.begin.granted);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_NONE);
    cr_assert_eq(w.begin.day_spent, 0);
    cr_assert_eq(w.begin.reserved, 100);
    cr_assert_eq(w.begin.reservation.amount, 100);
    cr_assert_eq(w.begin.reservation.remote, use_redis);
    cr_assert_str_eq(w.begin.reservation.tenant, "acme");

    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_null(s.err);
    cr_assert_eq(s.spend.reserved, 100);
    cr_assert_eq(s.spend.day_spent, 0);

    cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, 70));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, 70);
    cr_assert_eq(s.spend.month_spent, 70);
    cr_assert_eq(s.spend.reserved, 0);

    /* Release: no charge. */
    w = wait_begin(&f.loop, f.c, "acme", NULL, 50, 1000, 10000);
    cr_assert(w.begin.granted);
    cr_assert_eq(w.begin.day_spent, 70);
    cr_assert_eq(w.begin.reserved, 50);
    cr_assert_null(wait_release(&f.loop, f.c, &w.begin.reservation));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, 70);
    cr_assert_eq(s.spend.reserved, 0);

    /* The real cost is charged even beyond the reservation and the limit. */
    w = wait_begin(&f.loop, f.c, "acme", NULL, 10, 1000, 10000);
    cr_assert(w.begin.granted);
    cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, 5000));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, 5070);
    cr_assert_eq(s.spend.month_spent, 5070);

    /* Other tenants are untouched. */
    s = wait_spend(&f.loop, f.c, "other");
    cr_assert_eq(s.spend.day_spent, 0);
    cr_assert_eq(s.spend.reserved, 0);
    fx_close(&f);
}

BOTH(denial_at_the_limit, 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct wait w[3], d, s;

    fx_open(&f, use_redis, &o, "limit");
    for (int i = 0; i < 3; i++) {
        w[i] = wait_begin(&f.loop, f.c, "acme", NULL, 100, 300, 0);
        cr_assert(w[i].begin.granted, "reservation %d", i);
    }
    /* Exactly at the limit: the next one is denied, without error. */
    d = wait_begin(&f.loop, f.c, "acme", NULL, 1, 300, 0);
    cr_assert_null(d.err);
    cr_assert_not(d.begin.granted);
    cr_assert_eq(d.begin.reserved, 300);

    cr_assert_null(wait_settle(&f.loop, f.c, &w[0].begin.reservation, 100));
    d = wait_begin(&f.loop, f.c, "acme", NULL, 1, 300, 0);
    cr_assert_not(d.begin.granted, "spent 100 + reserved 200 + 1 > 300");
    cr_assert_eq(d.begin.day_spent, 100);

    cr_assert_null(wait_release(&f.loop, f.c, &w[1].begin.reservation));
    d = wait_begin(&f.loop, f.c, "acme", NULL, 100, 300, 0);
    cr_assert(d.begin.granted, "a release frees its budget");

    /* The monthly limit binds on its own. */
    w[0] = wait_begin(&f.loop, f.c, "beta", NULL, 100, 0, 150);
    cr_assert(w[0].begin.granted);
    d = wait_begin(&f.loop, f.c, "beta", NULL, 100, 0, 150);
    cr_assert_not(d.begin.granted);
    s = wait_spend(&f.loop, f.c, "beta");
    cr_assert_eq(s.spend.reserved, 100);
    fx_close(&f);
}

BOTH(reservations_expire, 20)
{
    struct cache_options o = {.reservation_ttl_ms = 300};
    struct fx f;
    struct wait w, d, s;

    fx_open(&f, use_redis, &o, "expiry");
    w = wait_begin(&f.loop, f.c, "acme", NULL, 100, 100, 0);
    cr_assert(w.begin.granted);
    d = wait_begin(&f.loop, f.c, "acme", NULL, 100, 100, 0);
    cr_assert_not(d.begin.granted);
    wait_ms(&f.loop, 500);
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.reserved, 0, "an expired reservation holds nothing");
    d = wait_begin(&f.loop, f.c, "acme", NULL, 100, 100, 0);
    cr_assert(d.begin.granted);
    /* Settling the expired one still charges its real cost, once. */
    cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, 40));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, 40);
    cr_assert_eq(s.spend.reserved, 100);
    fx_close(&f);
}

/* Each reservation expires at its own time: one that expired does not
 * take a younger one with it, and the younger one still expires later. */
BOTH(reservations_expire_each_at_its_time, 20)
{
    struct cache_options o = {.reservation_ttl_ms = 600};
    struct fx f;
    struct wait old, young, s;

    fx_open(&f, use_redis, &o, "expiry2");
    old = wait_begin(&f.loop, f.c, "acme", NULL, 100, 1000, 0);
    cr_assert(old.begin.granted);
    wait_ms(&f.loop, 300);
    young = wait_begin(&f.loop, f.c, "acme", NULL, 30, 1000, 0);
    cr_assert(young.begin.granted);
    wait_ms(&f.loop, 400); /* the old one is past its 600 ms, the young one is not */
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.reserved, 30);
    wait_ms(&f.loop, 400);
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.reserved, 0, "the young one expired in its turn");
    /* Settled late, each is charged its real cost. */
    cr_assert_null(wait_settle(&f.loop, f.c, &young.begin.reservation, 20));
    cr_assert_null(wait_settle(&f.loop, f.c, &old.begin.reservation, 50));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, 70);
    cr_assert_eq(s.spend.reserved, 0);
    fx_close(&f);
}

/* A reservation settled while an older one is still open (not first in
 * line) is freed once: named again it frees nothing, and when the older
 * one expires nothing of the settled one is freed a second time. */
BOTH(a_settled_reservation_behind_an_open_one_is_freed_once, 20)
{
    struct cache_options o = {.reservation_ttl_ms = 300};
    struct fx f;
    struct wait older, younger, s;

    fx_open(&f, use_redis, &o, "behind");
    older = wait_begin(&f.loop, f.c, "acme", NULL, 100, 1000, 0);
    younger = wait_begin(&f.loop, f.c, "acme", NULL, 30, 1000, 0);
    cr_assert(older.begin.granted && younger.begin.granted);
    cr_assert_null(wait_settle(&f.loop, f.c, &younger.begin.reservation, 20));
    cr_assert_null(wait_settle(&f.loop, f.c, &younger.begin.reservation, 0));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.reserved, 100, "the older one's hold, all of it");
    cr_assert_eq(s.spend.day_spent, 20);
    wait_ms(&f.loop, 500);
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.reserved, 0, "both gone, neither freed twice");
    fx_close(&f);
}

/* Both stores treat a settle named again alike: its charge is charged
 * (the real cost is always charged, and Redis cannot tell a second settle
 * from a late one of a reservation it forgot after the grace period),
 * and it frees nothing a second time. Callers settle once. */
BOTH(a_second_settle_of_one_reservation_is_charged_and_frees_nothing, 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct wait w, other, s;

    fx_open(&f, use_redis, &o, "twice");
    other = wait_begin(&f.loop, f.c, "acme", NULL, 30, 1000, 0); /* keeps w in the ring */
    w = wait_begin(&f.loop, f.c, "acme", NULL, 100, 1000, 0);
    cr_assert(w.begin.granted && other.begin.granted);
    cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, 40));
    cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, 40));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, 80);
    cr_assert_eq(s.spend.month_spent, 80);
    cr_assert_eq(s.spend.reserved, 30, "the other hold stands");
    cr_assert_null(wait_release(&f.loop, f.c, &other.begin.reservation));
    fx_close(&f);
}

/* A hit holds nothing itself but reports the tenant's numbers as a miss
 * does: the router's next choice counts the holds of requests in flight. */
BOTH(a_hit_reports_the_holds_in_flight, 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct wait held, hit;
    struct cache_key k = key_of(3);

    fx_open(&f, use_redis, &o, "hit-holds");
    cr_assert_null(wait_put(&f.loop, f.c, "acme", &k, "cached", 0));
    held = wait_begin(&f.loop, f.c, "acme", NULL, 70, 1000, 0);
    cr_assert(held.begin.granted);
    hit = wait_begin(&f.loop, f.c, "acme", &k, 10, 1000, 0);
    cr_assert_eq(hit.begin.lookup, CACHE_LOOKUP_HIT);
    cr_assert_not(hit.begin.granted);
    cr_assert_eq(hit.begin.reserved, 70);
    cr_assert_null(wait_release(&f.loop, f.c, &held.begin.reservation));
    fx_close(&f);
}

/* Finished ops are reused: one that served a short tenant id then serves
 * the longest one accepted, and each tenant's spend stays its own. */
BOTH(reused_ops_keep_tenants_apart, 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct wait w, s;
    char longest[CACHE_TENANT_MAX + 1];

    memset(longest, 'z', sizeof(longest) - 1);
    longest[sizeof(longest) - 1] = '\0';
    fx_open(&f, use_redis, &o, "reuse");
    for (int i = 0; i < 20; i++) {
        w = wait_begin(&f.loop, f.c, i % 2 ? "a" : longest, NULL, 10, 0, 0);
        cr_assert(w.begin.granted);
        cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, i % 2 ? 1 : 100));
    }
    s = wait_spend(&f.loop, f.c, "a");
    cr_assert_eq(s.spend.day_spent, 10);
    cr_assert_eq(s.spend.reserved, 0);
    s = wait_spend(&f.loop, f.c, longest);
    cr_assert_null(s.err);
    cr_assert_eq(s.spend.day_spent, 1000);
    longest[sizeof(longest) - 2] = '\0'; /* a different tenant, one byte shorter */
    s = wait_spend(&f.loop, f.c, longest);
    cr_assert_eq(s.spend.day_spent, 0);
    fx_close(&f);
}

BOTH(response_cache_put_get_ttl_size, 20)
{
    struct cache_options o = {.max_entry_bytes = 64};
    struct fx f;
    struct wait w;
    struct cache_key k1 = key_of(1), k2 = key_of(2);
    char big[65];

    fx_open(&f, use_redis, &o, "cache");
    w = wait_begin(&f.loop, f.c, "acme", &k1, 10, 0, 0);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_MISS);
    cr_assert(w.begin.granted);
    cr_assert_null(wait_release(&f.loop, f.c, &w.begin.reservation));

    cr_assert_null(wait_put(&f.loop, f.c, "acme", &k1, "{\"answer\":42}", 1));
    w = wait_begin(&f.loop, f.c, "acme", &k1, 10, 0, 0);
    cr_assert_null(w.err);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_HIT);
    cr_assert_str_eq(w.value, "{\"answer\":42}");
    cr_assert_eq(w.begin.value_len, strlen("{\"answer\":42}"));
    cr_assert_not(w.begin.granted, "a hit costs nothing");
    cr_assert_eq(w.begin.reserved, 0);

    /* Scoped per tenant; other keys miss. */
    w = wait_begin(&f.loop, f.c, "other", &k1, 10, 0, 0);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_MISS);
    cr_assert_null(wait_release(&f.loop, f.c, &w.begin.reservation));
    w = wait_begin(&f.loop, f.c, "acme", &k2, 10, 0, 0);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_MISS);
    cr_assert_null(wait_release(&f.loop, f.c, &w.begin.reservation));

    /* Max entry size. */
    memset(big, 'x', sizeof(big));
    errno = 0;
    cr_assert_null(cache_put(f.c, "acme", &k2, big, sizeof(big), 0, wait_done_cb, NULL));
    cr_assert_eq(errno, EMSGSIZE);
    cr_assert_not_null(cache_put(f.c, "acme", &k2, big, 64, 0, NULL, NULL));

    /* TTL. */
    wait_ms(&f.loop, 1200);
    w = wait_begin(&f.loop, f.c, "acme", &k1, 10, 0, 0);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_MISS, "expired after its ttl");
    cr_assert_null(wait_release(&f.loop, f.c, &w.begin.reservation));
    w = wait_begin(&f.loop, f.c, "acme", &k2, 10, 0, 0);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_HIT, "default ttl still running");
    cr_assert_eq(w.begin.value_len, 64);
    fx_close(&f);
}

BOTH(shared_cache_across_tenants, 20)
{
    struct cache_options o = {.shared_cache = 1};
    struct fx f;
    struct wait w, s;
    struct cache_key k = key_of(7);

    fx_open(&f, use_redis, &o, "shared");
    cr_assert_null(wait_put(&f.loop, f.c, "acme", &k, "same answer", 0));
    w = wait_begin(&f.loop, f.c, "other", &k, 10, 0, 0);
    cr_assert_eq(w.begin.lookup, CACHE_LOOKUP_HIT);
    cr_assert_str_eq(w.value, "same answer");
    cr_assert_not(w.begin.granted);
    /* The reservation made beside the lookup is given back. */
    for (int i = 0; i < 100; i++) {
        s = wait_spend(&f.loop, f.c, "other");
        if (s.spend.reserved == 0)
            break;
    }
    cr_assert_eq(s.spend.reserved, 0);
    fx_close(&f);
}

static int cancelled_cb_ran;

static void cancelled_cb(void *arg, const char *err, const struct cache_begin_result *r)
{
    cancelled_cb_ran = 1;
}

BOTH(cancel_releases_the_reservation, 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct cache_op *op;
    struct wait s;

    fx_open(&f, use_redis, &o, "cancel");
    op = cache_begin(f.c, "acme", NULL, 100, 0, 0, cancelled_cb, NULL);
    cr_assert_not_null(op);
    cache_cancel(op);
    for (int i = 0; i < 100; i++) {
        s = wait_spend(&f.loop, f.c, "acme");
        if (s.spend.reserved == 0)
            break;
    }
    cr_assert_eq(s.spend.reserved, 0);
    cr_assert_eq(cancelled_cb_ran, 0);
    fx_close(&f);
}

/* Turn the loop until every callback in `w` ran once. */
static void wait_all(uv_loop_t *loop, struct wait *w, int n)
{
    for (int i = 0; i < n; i++)
        cr_assert_eq(w[i].done, 0, "callback %d ran inside the call", i);
    for (int i = 0; i < n; i++) {
        while (!w[i].done)
            uv_run(loop, UV_RUN_ONCE);
        cr_assert_eq(w[i].calls, 1);
    }
}

/* The begins and settles made in one loop turn reach Redis as one script
 * call per tenant, and each gets the answer it would have had alone: in
 * call order, the limit admits exactly as many as fit. */
Test(store_redis, one_turn_is_one_script_call_per_tenant, .timeout = 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct wait w[25] = {0}, done[15] = {0}, s;
    struct wait *acme = w, *beta = w + 20;
    long long calls;

    fx_open(&f, 1, &o, "batch");
    calls = op_calls(&f);
    for (int i = 0; i < 20; i++)
        cr_assert_not_null(cache_begin(f.c, "acme", NULL, 100, 1500, 0, wait_begin_cb, &acme[i]));
    for (int i = 0; i < 5; i++)
        cr_assert_not_null(cache_begin(f.c, "beta", NULL, 7, 0, 0, wait_begin_cb, &beta[i]));
    wait_all(&f.loop, w, 25);
    cr_assert_eq(op_calls(&f), calls + 2, "one call per tenant");
    for (int i = 0; i < 20; i++) {
        cr_assert_null(acme[i].err);
        cr_assert_eq(acme[i].begin.granted, i < 15, "begin %d", i);
        cr_assert_eq(acme[i].begin.reserved, i < 15 ? 100 * (i + 1) : 1500, "begin %d", i);
    }
    for (int i = 0; i < 5; i++) {
        cr_assert(beta[i].begin.granted);
        cr_assert_eq(beta[i].begin.reserved, 7 * (i + 1));
    }

    /* However many reservations a call settles, they cost one HMGET and
     * one HDEL, and their sum is written back with one HSET. */
    long long hash_ops[3];
    static const char *const hash_cmds[3] = {"hmget", "hdel", "hset"};
    for (int k = 0; k < 3; k++)
        hash_ops[k] = test_redis_calls(&f.redis, hash_cmds[k]);
    calls = op_calls(&f);
    for (int i = 0; i < 15; i++)
        cr_assert_not_null(
            cache_settle(f.c, &acme[i].begin.reservation, 10 + i, wait_done_cb, &done[i]));
    wait_all(&f.loop, done, 15);
    cr_assert_eq(op_calls(&f), calls + 1);
    for (int k = 0; k < 3; k++)
        cr_assert_eq(test_redis_calls(&f.redis, hash_cmds[k]), hash_ops[k] + 1, "%s",
                     hash_cmds[k]);
    for (int i = 0; i < 15; i++)
        cr_assert_null(done[i].err);
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, 15 * 10 + 14 * 15 / 2);
    cr_assert_eq(s.spend.month_spent, 15 * 10 + 14 * 15 / 2);
    cr_assert_eq(s.spend.reserved, 0);
    s = wait_spend(&f.loop, f.c, "beta");
    cr_assert_eq(s.spend.reserved, 35);
    cr_assert_eq(s.spend.day_spent, 0);

    /* A release and a begin of the same turn: one call, the release
     * first, so the begin fits (255 spent + 1000 <= 1500; with the old
     * reservation still held it would not). */
    struct wait held = wait_begin(&f.loop, f.c, "acme", NULL, 1000, 1500, 0), turn[2] = {0};
    cr_assert(held.begin.granted);
    calls = op_calls(&f);
    cr_assert_not_null(cache_begin(f.c, "acme", NULL, 1000, 1500, 0, wait_begin_cb, &turn[0]));
    cr_assert_not_null(cache_release(f.c, &held.begin.reservation, wait_done_cb, &turn[1]));
    wait_all(&f.loop, turn, 2);
    cr_assert_eq(op_calls(&f), calls + 1);
    cr_assert_null(turn[1].err);
    cr_assert(turn[0].begin.granted, "the release of the same turn went first");
    cr_assert_eq(turn[0].begin.reserved, 1000);
    fx_close(&f);
}

/* While a turn's script call is out, the ops of the turns after it wait
 * for its reply and then go together, still in arrival order. CLIENT
 * PAUSE keeps the first call out for as long as the test needs. */
Test(store_redis, later_turns_wait_for_the_call_out, .timeout = 20)
{
    struct cache_options o = {.command_timeout_ms = 5000};
    struct fx f;
    struct wait w[14] = {0};
    struct wait *acme = w, *beta = w + 12;
    long long calls;

    fx_open(&f, 1, &o, "hold");
    calls = op_calls(&f);
    test_redis_int(&f.redis, "CLIENT PAUSE 300");
    for (int turn = 0; turn < 3; turn++) {
        for (int i = 4 * turn; i < 4 * turn + 4; i++)
            cr_assert_not_null(
                cache_begin(f.c, "acme", NULL, 100, 1000, 0, wait_begin_cb, &acme[i]));
        if (turn == 2)
            for (int i = 0; i < 2; i++)
                cr_assert_not_null(
                    cache_begin(f.c, "beta", NULL, 7, 0, 0, wait_begin_cb, &beta[i]));
        uv_run(&f.loop, UV_RUN_NOWAIT);
    }
    cr_assert_not(acme[0].done, "Redis was paused: the first call is still out");
    wait_all(&f.loop, w, 14);
    /* The first turn's call, then one per tenant for the two held turns:
     * sent as they came, it would have been four. */
    cr_assert_eq(op_calls(&f), calls + 3);
    for (int i = 0; i < 12; i++) {
        cr_assert_null(acme[i].err);
        cr_assert_eq(acme[i].begin.granted, i < 10, "begin %d", i);
        cr_assert_eq(acme[i].begin.reserved, i < 10 ? 100 * (i + 1) : 1000, "begin %d", i);
    }
    cr_assert(beta[0].begin.granted && beta[1].begin.granted);
    cr_assert_eq(beta[1].begin.reserved, 14);
    fx_close(&f);
}

/* After SCRIPT FLUSH (a restart, a failover) each script is sent whole
 * once, and the answers are the same. */
Test(store_redis, flushed_scripts_are_sent_whole, .timeout = 20)
{
    struct cache_options o = {0};
    struct fx f;
    struct wait w, s;

    fx_open(&f, 1, &o, "noscript");
    test_redis_int(&f.redis, "SCRIPT FLUSH");
    w = wait_begin(&f.loop, f.c, "acme", NULL, 100, 1000, 0);
    cr_assert_null(w.err);
    cr_assert(w.begin.granted);
    cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, 40));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_null(s.err);
    cr_assert_eq(s.spend.day_spent, 40);
    cr_assert_eq(s.spend.reserved, 0);
    cr_assert_eq(test_redis_calls(&f.redis, "eval"), 2, "each of the two scripts once");
    fx_close(&f);
}

/* The store's mark in the list of live instances (what fail_open splits
 * a budget by) is renewed each second, through a script call: after a
 * SCRIPT FLUSH the script is loaded again, and the mark comes back. */
Test(store_redis, the_live_mark_is_renewed_after_a_script_flush, .timeout = 20)
{
    struct cache_options o = {0};
    struct fx f;
    long long n = 0;

    fx_open(&f, 1, &o, "live");
    for (int tries = 0; tries < 150 && n != 1; tries++, wait_ms(&f.loop, 20))
        n = test_redis_int(&f.redis, "ZCARD %slive", f.prefix);
    cr_assert_eq(n, 1, "the store is not in the list");
    test_redis_int(&f.redis, "SCRIPT FLUSH");
    test_redis_int(&f.redis, "DEL %slive", f.prefix);
    for (int tries = 0; tries < 150 && (n = test_redis_int(&f.redis, "ZCARD %slive", f.prefix)) == 0;
         tries++)
        wait_ms(&f.loop, 20);
    cr_assert_eq(n, 1, "not renewed after the flush");
    cr_assert_eq(test_redis_calls(&f.redis, "eval"), 0, "the script was loaded, not sent whole");
    fx_close(&f);
}

/* Amounts at the ceiling the router clamps money to (BACKEND_MICRO_MAX,
 * 2^62 micro-USD): two holds or two charges of it would pass INT64_MAX.
 * The counters saturate there instead of wrapping to a negative spend
 * (which would hand the tenant a budget back). */
Test(store_memory, counters_saturate_at_the_ceiling, .timeout = 5)
{
    const long long ceiling = (long long)1 << 62;
    struct cache_options o = {0};
    struct fx f;
    struct wait w[2], s;

    fx_open(&f, 0, &o, "ceiling");
    for (int i = 0; i < 2; i++) {
        w[i] = wait_begin(&f.loop, f.c, "acme", NULL, ceiling, 0, 0);
        cr_assert(w[i].begin.granted);
        cr_assert_geq(w[i].begin.reserved, ceiling, "hold %d: %lld reserved", i,
                      (long long)w[i].begin.reserved);
    }
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.reserved, INT64_MAX, "%lld reserved", (long long)s.spend.reserved);
    for (int i = 0; i < 2; i++)
        cr_assert_null(wait_settle(&f.loop, f.c, &w[i].begin.reservation, ceiling));
    s = wait_spend(&f.loop, f.c, "acme");
    cr_assert_eq(s.spend.day_spent, INT64_MAX, "%lld spent today", (long long)s.spend.day_spent);
    cr_assert_eq(s.spend.month_spent, INT64_MAX);
    cr_assert_geq(s.spend.reserved, 0);
    /* Any limit is passed. */
    cr_assert_not(wait_begin(&f.loop, f.c, "acme", NULL, 1, ceiling, 0).begin.granted);
    fx_close(&f);
}

/* A charge of 10^17 micro-dollars (within BACKEND_MICRO_MAX, 2^62: a
 * price of $1 a token and a window of 10^11 tokens make it) reaches
 * Redis's counters: the script's numbers are Lua floats, which Redis
 * wrote into the INCRBY as "1e+17", an error ("not an integer"), and the
 * charge stayed journaled for good. */
Test(store_redis, a_charge_of_10_to_the_17_reaches_the_counters, .timeout = 20)
{
    const long long big = 100000000000000000LL;
    struct cache_options o = {0};
    struct fx f;
    struct wait w;

    fx_open(&f, 1, &o, "big-charge");
    w = wait_begin(&f.loop, f.c, "acme", NULL, big, 0, 0);
    cr_assert(w.begin.granted && !w.begin.degraded);
    cr_assert_null(wait_settle(&f.loop, f.c, &w.begin.reservation, big));
    cr_assert_eq(test_redis_day_spend(&f.redis, f.prefix, "acme"), big);
    fx_close(&f);
}

/* A hold at the ceiling the router clamps money to (2^62 micro-USD) is
 * made in Redis: the script answered the reserved sum times 4 (plus the
 * begin's status), past what a reply's integer holds, and the begin failed
 * as a protocol error, served from local counters. */
Test(store_redis, a_hold_at_the_ceiling_is_made_in_redis, .timeout = 20)
{
    const long long ceiling = (long long)1 << 62;
    struct cache_options o = {0};
    struct fx f;
    struct wait w;

    fx_open(&f, 1, &o, "big-hold");
    w = wait_begin(&f.loop, f.c, "acme", NULL, ceiling, 0, 0);
    cr_assert_null(w.err);
    cr_assert(w.begin.granted && !w.begin.degraded, "granted %d, degraded %d", w.begin.granted,
              w.begin.degraded);
    cr_assert_geq(w.begin.reserved, (long long)1 << 60, "%lld reserved",
                  (long long)w.begin.reserved);
    cr_assert_null(wait_release(&f.loop, f.c, &w.begin.reservation));
    cr_assert_eq(wait_spend(&f.loop, f.c, "acme").spend.reserved, 0);
    fx_close(&f);
}

Test(store_memory, bad_arguments, .timeout = 5)
{
    uv_loop_t loop;
    struct cache_options o = {.key_prefix = "bad{prefix"};
    char tenant[CACHE_TENANT_MAX + 2], prefix[CACHE_KEY_PREFIX_MAX + 2];

    uv_loop_init(&loop);
    cr_assert_null(cache_create(&loop, &o), "'{' in the prefix would break hash tags");
    memset(prefix, 'p', sizeof(prefix) - 1);
    prefix[sizeof(prefix) - 1] = '\0';
    o.key_prefix = prefix;
    cr_assert_null(cache_create(&loop, &o), "a prefix this long would not fit the keys");
    o.key_prefix = NULL;
    o.redis_url = "http://nope";
    cr_assert_null(cache_create(&loop, &o));
    uv_run(&loop, UV_RUN_DEFAULT);
    o.redis_url = NULL;
    struct cache *c = cache_create(&loop, &o);
    memset(tenant, 'a', sizeof(tenant) - 1);
    tenant[sizeof(tenant) - 1] = '\0';
    errno = 0;
    cr_assert_null(cache_begin(c, tenant, NULL, 1, 0, 0, NULL, NULL));
    cr_assert_eq(errno, EINVAL);
    cr_assert_null(cache_begin(c, "acme", NULL, -1, 0, 0, NULL, NULL));
    wait_close(&loop, c);
}

/* A sweep moves at most 256 expired reservations per call. When the spend
 * script's sweep leaves expired ones behind with the same expiry as the
 * earliest (the begins of one call share theirs), the sum it keeps must
 * still lose those it moved: else the next sweep starts from the old sum
 * and the moved ones hold budget for as long as the tenant is active. */
Test(store_redis, a_partial_sweep_by_a_spend_read_keeps_the_sum, .timeout = 20)
{
    struct cache_options o = {.reservation_ttl_ms = 300};
    enum { N = 320 };
    static struct wait w[N];
    struct fx f;
    struct wait s;

    memset(w, 0, sizeof(w));
    fx_open(&f, 1, &o, "sweep");
    for (int i = 0; i < N; i++)
        cr_assert_not_null(cache_begin(f.c, "acme", NULL, 10, 0, 0, wait_begin_cb, &w[i]));
    wait_all(&f.loop, w, N);
    for (int i = 0; i < N; i++)
        cr_assert(w[i].begin.granted);
    wait_ms(&f.loop, 500); /* all of them expired, none settled */
    s = wait_spend(&f.loop, f.c, "acme"); /* sweeps 256 */
    cr_assert_null(s.err);
    s = wait_spend(&f.loop, f.c, "acme"); /* sweeps the rest */
    cr_assert_null(s.err);
    cr_assert_eq(s.spend.reserved, 0, "%lld micro-USD still held by expired reservations",
                 (long long)s.spend.reserved);
    fx_close(&f);
}
