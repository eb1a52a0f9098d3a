/*
 * tests/cache/test_flight.c: single flight collapses identical misses:
 * one leader, followers get its answer or are sent upstream on failure.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "cache/cache.h"

struct follower {
    struct cache_flight_waiter w; /* embedded waiter */
    int calls;                    /* callback runs */
    char got[32];                 /* value seen, "" for NULL */
    int null;                     /* told to go upstream */
    const void *why;              /* what the leader passed */
};

static void follower_cb(void *arg, const char *value, size_t len, const void *why)
{
    struct follower *f = arg;

    f->calls++;
    f->why = why;
    f->null = value == NULL;
    if (value)
        memcpy(f->got, value, len < sizeof(f->got) ? len : sizeof(f->got) - 1);
}

static struct cache_key key(int n)
{
    struct cache_key k;

    memset(&k, n, sizeof(k));
    return k;
}

Test(flight, followers_get_the_leaders_answer, .timeout = 5)
{
    struct cache_flight *fl = cache_flight_create();
    struct cache_key k = key(1), other = key(2);
    struct follower f[3] = {0}, o = {0};

    cr_assert_eq(cache_flight_join(fl, &k, &f[0].w, follower_cb, &f[0]), CACHE_FLIGHT_LEADER);
    cr_assert_eq(cache_flight_join(fl, &k, &f[1].w, follower_cb, &f[1]), CACHE_FLIGHT_FOLLOWER);
    cr_assert_eq(cache_flight_join(fl, &k, &f[2].w, follower_cb, &f[2]), CACHE_FLIGHT_FOLLOWER);
    cr_assert_eq(cache_flight_join(fl, &other, &o.w, follower_cb, &o), CACHE_FLIGHT_LEADER);
    cr_assert_eq(cache_flight_count(fl), 2);
    cache_flight_finish(fl, &k, "answer", 6, NULL);
    cr_assert_eq(f[0].calls, 0, "the leader is not called back");
    for (int i = 1; i < 3; i++) {
        cr_assert_eq(f[i].calls, 1);
        cr_assert_str_eq(f[i].got, "answer");
    }
    cr_assert_eq(cache_flight_count(fl), 1);
    /* The key is free again: the next miss leads. */
    cr_assert_eq(cache_flight_join(fl, &k, &f[0].w, follower_cb, &f[0]), CACHE_FLIGHT_LEADER);
    cr_assert_eq(cache_flight_join(fl, &k, &f[1].w, follower_cb, &f[1]), CACHE_FLIGHT_FOLLOWER);
    /* A leader that failed tells its followers why. */
    cache_flight_finish(fl, &k, NULL, 0, &f[0]);
    cr_assert_eq(f[1].calls, 2);
    cr_assert(f[1].null);
    cr_assert_eq(f[1].why, &f[0]);
    cache_flight_finish(fl, &other, NULL, 0, NULL);
    cr_assert_eq(cache_flight_count(fl), 0);
    cache_flight_free(fl);
}

static struct cache_flight *rejoin_table;
static struct cache_key rejoin_key;
static int rejoin_roles[3];
static int rejoin_n;
static struct follower rejoin_next[3];

/* A follower told to go upstream joins again, as the router would. */
static void rejoin_cb(void *arg, const char *value, size_t len, const void *why)
{
    int i = rejoin_n++;

    cr_assert_null(value);
    rejoin_roles[i] = cache_flight_join(rejoin_table, &rejoin_key, &rejoin_next[i].w,
                                        follower_cb, &rejoin_next[i]);
}

Test(flight, leader_failure_sends_followers_upstream, .timeout = 5)
{
    struct cache_flight_waiter w[4];

    rejoin_table = cache_flight_create();
    rejoin_key = key(9);
    cr_assert_eq(cache_flight_join(rejoin_table, &rejoin_key, &w[0], rejoin_cb, NULL),
                 CACHE_FLIGHT_LEADER);
    for (int i = 1; i < 4; i++)
        cr_assert_eq(cache_flight_join(rejoin_table, &rejoin_key, &w[i], rejoin_cb, NULL),
                     CACHE_FLIGHT_FOLLOWER);
    cache_flight_finish(rejoin_table, &rejoin_key, NULL, 0, NULL);
    cr_assert_eq(rejoin_n, 3);
    cr_assert_eq(rejoin_roles[0], CACHE_FLIGHT_LEADER, "first retry leads a new flight");
    cr_assert_eq(rejoin_roles[1], CACHE_FLIGHT_FOLLOWER);
    cr_assert_eq(rejoin_roles[2], CACHE_FLIGHT_FOLLOWER);
    cache_flight_finish(rejoin_table, &rejoin_key, "late", 4, NULL);
    cr_assert_str_eq(rejoin_next[1].got, "late");
    cr_assert_str_eq(rejoin_next[2].got, "late");
    cache_flight_free(rejoin_table);
}

Test(flight, a_follower_can_leave, .timeout = 5)
{
    struct cache_flight *fl = cache_flight_create();
    struct cache_key k = key(3);
    struct follower lead = {0}, a = {0}, b = {0}, c = {0};

    cr_assert_eq(cache_flight_join(fl, &k, &lead.w, follower_cb, &lead), CACHE_FLIGHT_LEADER);
    cache_flight_join(fl, &k, &a.w, follower_cb, &a);
    cache_flight_join(fl, &k, &b.w, follower_cb, &b);
    cache_flight_join(fl, &k, &c.w, follower_cb, &c);
    cache_flight_leave(fl, &b.w);
    cache_flight_leave(fl, &b.w); /* twice is harmless */
    cache_flight_finish(fl, &k, "x", 1, NULL);
    cr_assert_eq(a.calls, 1);
    cr_assert_eq(b.calls, 0);
    cr_assert_eq(c.calls, 1);
    cache_flight_leave(fl, &a.w); /* after the end: no effect */
    cache_flight_free(fl);
}

Test(flight, many_keys, .timeout = 5)
{
    struct cache_flight *fl = cache_flight_create();
    struct follower dummy;

    for (int i = 0; i < 1000; i++) {
        struct cache_key k;
        memset(&k, 0, sizeof(k));
        memcpy(k.sha256, &i, sizeof(i));
        cr_assert_eq(cache_flight_join(fl, &k, &dummy.w, follower_cb, &dummy),
                     CACHE_FLIGHT_LEADER);
    }
    cr_assert_eq(cache_flight_count(fl), 1000);
    for (int i = 0; i < 1000; i++) {
        struct cache_key k;
        memset(&k, 0, sizeof(k));
        memcpy(k.sha256, &i, sizeof(i));
        cache_flight_finish(fl, &k, NULL, 0, NULL);
    }
    cr_assert_eq(cache_flight_count(fl), 0);
    cache_flight_free(fl);
}
