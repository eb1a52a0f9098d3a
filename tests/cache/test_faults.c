/*
 * tests/cache/test_faults.c: the Redis store under faults, against a real
 * redis-server: down at start (refused, silent), a stopped server (command
 * timeout), killed and restarted mid-load with fail_open (journal written
 * back, nothing lost), fail_closed errors, a Redis that answers but refuses
 * writes, replies lost after Redis applied a charge (through a relay), and
 * several processes hammering one tenant without overspending.
 */
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache/cache.h"
#include "common/error.h"
#include "tests/cache/load.h"
#include "tests/cache/wait.h"
#include "tests/support/redis.h"
#include "tests/support/relay.h"

/* A store with options `o` (url and mode set, its timeouts the tests'
 * short ones) under a key prefix of its own, written to `prefix`. */
static struct cache *open_store_with(uv_loop_t *loop, struct cache_options *o, char *prefix,
                                     size_t n, const char *name)
{
    struct cache *c;

    o->command_timeout_ms = 300;
    o->connect_timeout_ms = 5000;
    o->reconnect_min_ms = 50;
    o->reconnect_max_ms = 200;
    wait_prefix(prefix, n, name);
    o->key_prefix = prefix;
    c = cache_create(loop, o);
    cr_assert_not_null(c);
    return c;
}

static struct cache *open_store(uv_loop_t *loop, const char *url, enum cache_on_failure mode,
                                char *prefix, size_t n, const char *name)
{
    struct cache_options o = {.redis_url = url, .on_failure = mode};

    return open_store_with(loop, &o, prefix, n, name);
}

/* Today's UTC day as the store's day keys name it: YYYYMMDD. */
static void key_day(char day[16])
{
    time_t now = time(NULL);
    struct tm tm;

    gmtime_r(&now, &tm);
    strftime(day, 16, "%Y%m%d", &tm);
}

/* Nothing listens: the refusal must reach hiredis at once (a hung adapter
 * would only be rescued by the 5 s connect timeout, past .timeout). */
Test(faults, refused_at_start_does_not_hang, .timeout = 3)
{
    uv_loop_t loop;
    char prefix[64], url[64];
    struct cache *c;
    struct wait w;
    struct cache_stats st;

    uv_loop_init(&loop);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", test_free_port());
    c = open_store(&loop, url, CACHE_FAIL_CLOSED, prefix, sizeof(prefix), "refused");
    w = wait_begin(&loop, c, "acme", NULL, 10, 0, 0);
    cr_assert_eq(w.err, error_store_unavailable);
    wait_state(&loop, c, CACHE_STATE_DOWN);
    wait_state(&loop, c, CACHE_STATE_CONNECTING); /* backoff, then it tries again */
    wait_state(&loop, c, CACHE_STATE_DOWN);
    w = wait_spend(&loop, c, "acme");
    cr_assert_eq(w.err, error_store_unavailable);
    cache_stats(c, &st);
    cr_assert_eq(st.reconnects, 0);
    wait_close(&loop, c);
}

/* A peer that accepts TCP but never answers: the connect timeout fires. */
Test(faults, silent_server_connect_timeout, .timeout = 5)
{
    uv_loop_t loop;
    char prefix[64], url[64];
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct cache_options o = {.connect_timeout_ms = 300, .on_failure = CACHE_FAIL_CLOSED};
    struct cache *c;
    uint64_t t0;

    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    cr_assert_eq(listen(fd, 16), 0);
    getsockname(fd, (struct sockaddr *)&a, &len);
    snprintf(url, sizeof(url), "redis://localhost:%d", ntohs(a.sin_port));
    uv_loop_init(&loop);
    wait_prefix(prefix, sizeof(prefix), "silent");
    o.redis_url = url;
    o.key_prefix = prefix;
    c = cache_create(&loop, &o);
    cr_assert_not_null(c);
    t0 = uv_hrtime();
    wait_state(&loop, c, CACHE_STATE_DOWN);
    cr_assert_geq((uv_hrtime() - t0) / 1000000, 250, "gave up before the connect timeout");
    cr_assert_eq(wait_begin(&loop, c, "acme", NULL, 1, 0, 0).err, error_store_unavailable);
    wait_close(&loop, c);
    close(fd);
}

/* A stopped server: the command times out, the store reconnects once the
 * server is back. */
Test(faults, stopped_server_command_timeout, .timeout = 15)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w;
    uint64_t t0, ms;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    c = open_store(&loop, r.url, CACHE_FAIL_CLOSED, prefix, sizeof(prefix), "stopped");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    cr_assert(wait_begin(&loop, c, "acme", NULL, 1, 0, 0).begin.granted);
    test_redis_kill(&r, SIGSTOP);
    t0 = uv_hrtime();
    w = wait_begin(&loop, c, "acme", NULL, 1, 0, 0);
    ms = (uv_hrtime() - t0) / 1000000;
    cr_assert_eq(w.err, error_store_unavailable);
    cr_assert_geq(ms, 250, "failed after %llu ms, before the command timeout", (unsigned long long)ms);
    cr_assert_lt(ms, 2000);
    test_redis_kill(&r, SIGCONT);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    w = wait_begin(&loop, c, "acme", NULL, 1, 0, 0);
    cr_assert_null(w.err);
    cr_assert(w.begin.granted);
    wait_close(&loop, c);
    test_redis_stop(&r);
}

/* Redis has day_spent `day` of tenant acme and holds nothing for it
 * (`held`: what a hold left behind would mean); then close the store and
 * stop the server. */
static void spent_then_close(uv_loop_t *loop, struct cache *c, struct test_redis *r,
                             int64_t day, const char *held)
{
    struct wait s = wait_spend(loop, c, "acme");

    cr_assert_null(s.err);
    cr_assert_eq(s.spend.day_spent, day);
    cr_assert_eq(s.spend.reserved, 0, "%s", held);
    wait_close(loop, c);
    test_redis_stop(r);
}

/* A begin sent to a stopped server times out and is served from local
 * counters (fail_open), but Redis still runs it once it resumes: the
 * reservation it makes is released by the write-back, not left holding
 * budget until it expires; the charge is counted once. */
Test(faults, a_begin_lost_in_a_stopped_server_holds_nothing_after, .timeout = 15)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    c = open_store(&loop, r.url, CACHE_FAIL_OPEN, prefix, sizeof(prefix), "lost-begin");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    test_redis_kill(&r, SIGSTOP);
    w = wait_begin(&loop, c, "acme", NULL, 100, 0, 0);
    cr_assert_null(w.err);
    cr_assert(w.begin.granted && w.begin.degraded, "served from local counters");
    wait_settle(&loop, c, &w.begin.reservation, 40); /* journaled: Redis is away */
    test_redis_kill(&r, SIGCONT);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    wait_drained(&loop, c);
    spent_then_close(&loop, c, &r, 40, "the lost begin's reservation is still held");
}

/* The local counters that serve while Redis is away hold the month's
 * spend, not the day's: 900 micro-USD spent on earlier days and 50 today
 * leave 50 of a month's 1000, whatever today's 50 say. */
Test(faults, local_counters_hold_the_month_spent_on_other_days, .timeout = 15)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64], month[16];
    struct cache *c;
    struct wait w, fits;
    time_t now = time(NULL);
    struct tm tm;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    c = open_store(&loop, r.url, CACHE_FAIL_OPEN, prefix, sizeof(prefix), "month-local");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    gmtime_r(&now, &tm);
    strftime(month, sizeof(month), "%Y%m", &tm);
    cr_assert_eq(test_redis_int(&r, "INCRBY %s{acme}:m:%s 900", prefix, month), 900);
    w = wait_begin(&loop, c, "acme", NULL, 50, 0, 1000);
    cr_assert(w.begin.granted && !w.begin.degraded);
    cr_assert_eq(w.begin.month_spent, 900);
    cr_assert_null(wait_settle(&loop, c, &w.begin.reservation, 50));
    cr_assert_eq(wait_spend(&loop, c, "acme").spend.month_spent, 950);

    test_redis_kill(&r, SIGSTOP);
    w = wait_begin(&loop, c, "acme", NULL, 51, 0, 1000);
    cr_assert_null(w.err);
    cr_assert(w.begin.degraded, "served from local counters");
    cr_assert_not(w.begin.granted, "950 + 51 is past the month's 1000");
    fits = wait_begin(&loop, c, "acme", NULL, 50, 0, 1000);
    cr_assert(fits.begin.granted && fits.begin.degraded, "950 + 50 fits");
    wait_release(&loop, c, &fits.begin.reservation);
    test_redis_kill(&r, SIGCONT);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    wait_drained(&loop, c);
    spent_then_close(&loop, c, &r, 50, "the local reservation was released");
}

/* Turn the loop until `c` counts `n` instances sharing its Redis, for at
 * most `ms`; how long it took, or -1. */
static int instances_within(uv_loop_t *loop, struct cache *c, unsigned n, int ms)
{
    uint64_t t0 = uv_hrtime();
    struct cache_stats st;

    for (;;) {
        int took = (int)((uv_hrtime() - t0) / 1000000);
        cache_stats(c, &st);
        if (st.instances == n)
            return took;
        if (took > ms)
            return -1;
        wait_ms(loop, 20);
    }
}

/* Grants of `amount` (each settled at once, journaled) `c` makes from its
 * local counters before it refuses one. */
static int64_t degraded_grants(uv_loop_t *loop, struct cache *c, int64_t amount, int64_t limit)
{
    int64_t granted = 0;

    for (;;) {
        struct wait w = wait_begin(loop, c, "acme", NULL, amount, limit, 0);
        cr_assert_null(w.err);
        cr_assert(w.begin.degraded, "served from local counters");
        if (!w.begin.granted)
            return granted;
        granted += amount;
        cr_assert_eq(wait_settle(loop, c, &w.begin.reservation, amount),
                     error_store_unavailable, "journaled");
        cr_assert_leq(granted, limit, "never stops");
    }
}

/* Two instances share one Redis, which then stops answering. Each serves
 * from its own counters and cannot see the other's spend, so each may use
 * half of what Redis last told it was left (the budget less the spend and
 * the other's holds): together they stay within the budget. Each alone
 * used to take all of it. And an instance that stops leaves the list at
 * once, not when its mark lapses. */
Test(faults, instances_split_what_is_left_while_redis_is_away, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *a, *b;
    struct wait w, held, sync;
    int64_t by_a, by_b;
    int took, closed;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    a = open_store(&loop, r.url, CACHE_FAIL_OPEN, prefix, sizeof(prefix), "split");
    b = open_store(&loop, r.url, CACHE_FAIL_OPEN, prefix, sizeof(prefix), "split");
    wait_state(&loop, a, CACHE_STATE_CONNECTED);
    wait_state(&loop, b, CACHE_STATE_CONNECTED);
    cr_assert_geq(instances_within(&loop, a, 2, 3000), 0, "a sees both");
    cr_assert_geq(instances_within(&loop, b, 2, 3000), 0, "b sees both");

    w = wait_begin(&loop, a, "acme", NULL, 400, 1000, 0);
    cr_assert(w.begin.granted && !w.begin.degraded);
    cr_assert_null(wait_settle(&loop, a, &w.begin.reservation, 400));
    held = wait_begin(&loop, b, "acme", NULL, 100, 1000, 0); /* in flight at the outage */
    cr_assert(held.begin.granted && !held.begin.degraded);
    sync = wait_begin(&loop, a, "acme", NULL, 1, 1000, 0); /* a hears of b's hold */
    cr_assert(sync.begin.granted && !sync.begin.degraded);
    cr_assert_eq(sync.begin.reserved, 101);
    cr_assert_null(wait_release(&loop, a, &sync.begin.reservation));

    test_redis_kill(&r, SIGSTOP);
    /* a: 1000 - 400 spent - 100 held by b = 500 left, half of it. */
    by_a = degraded_grants(&loop, a, 10, 1000);
    cr_assert_eq(by_a, 250, "a took %lld", (long long)by_a);
    /* b: 1000 - 400 = 600 left as b heard it (its own hold in it), half of
     * it less the 100 it holds. */
    by_b = degraded_grants(&loop, b, 10, 1000);
    cr_assert_eq(by_b, 200, "b took %lld", (long long)by_b);
    cr_assert_eq(wait_settle(&loop, b, &held.begin.reservation, 100), error_store_unavailable);

    test_redis_kill(&r, SIGCONT);
    wait_state(&loop, a, CACHE_STATE_CONNECTED);
    wait_state(&loop, b, CACHE_STATE_CONNECTED);
    wait_drained(&loop, a);
    wait_drained(&loop, b);
    w = wait_spend(&loop, b, "acme");
    cr_assert_null(w.err);
    cr_assert_eq(w.spend.day_spent, 400 + 250 + 200 + 100, "within the budget of 1000");
    cr_assert_eq(w.spend.reserved, 0);

    cr_assert_geq(instances_within(&loop, b, 2, 3000), 0, "both renewed their marks");
    closed = 0;
    cache_close(a, wait_closed_cb, &closed); /* b keeps the loop alive: no wait_close */
    while (!closed)
        uv_run(&loop, UV_RUN_ONCE);
    took = instances_within(&loop, b, 1, 3000);
    cr_assert_geq(took, 0, "b still counts a after it stopped");
    cr_assert_lt(took, 1500, "a's mark lapsed (%d ms) rather than being removed", took);
    wait_close(&loop, b);
    test_redis_stop(&r);
}

/* fail_closed rejects while Redis is gone, but still keeps the charge of a
 * request already served and writes it back. */
Test(faults, fail_closed_rejects_but_keeps_charges, .timeout = 15)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w;
    struct cache_stats st;

    cr_assert_eq(test_redis_start(&r, 1), 0);
    uv_loop_init(&loop);
    c = open_store(&loop, r.url, CACHE_FAIL_CLOSED, prefix, sizeof(prefix), "closed");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    w = wait_begin(&loop, c, "acme", NULL, 100, 0, 0);
    cr_assert(w.begin.granted);
    test_redis_kill(&r, SIGKILL);
    wait_state(&loop, c, CACHE_STATE_DOWN);
    cr_assert_eq(wait_begin(&loop, c, "acme", NULL, 1, 0, 0).err, error_store_unavailable);
    cr_assert_eq(wait_spend(&loop, c, "acme").err, error_store_unavailable);
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 80), error_store_unavailable,
                 "journaled");
    cache_stats(c, &st);
    cr_assert_eq(st.journal_entries, 1);
    cr_assert_eq(st.journal_amount, 80);
    cr_assert_eq(test_redis_restart(&r), 0);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    wait_drained(&loop, c);
    spent_then_close(&loop, c, &r, 80, "the reservation was dropped with the charge");
}

/* Redis killed (SIGKILL) mid-load and restarted from its AOF: fail_open
 * keeps serving, the journal is written back, and Redis ends with exactly
 * the sum of every charge made. */
Test(faults, killed_mid_load_nothing_lost, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct load l = {.tenant = "acme", .amount = 1000, .remaining = 1000000, .seed = 7};
    struct load_chain chains[16];
    struct cache_stats st;
    struct wait s;
    long granted_before;

    cr_assert_eq(test_redis_start(&r, 1), 0);
    uv_loop_init(&loop);
    c = open_store(&loop, r.url, CACHE_FAIL_OPEN, prefix, sizeof(prefix), "killed");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    l.c = c;
    load_start(&l, chains, 16);
    wait_ms(&loop, 300);
    cr_assert_gt(l.granted, 0);
    test_redis_kill(&r, SIGKILL);
    granted_before = l.granted;
    wait_ms(&loop, 600);
    cr_assert_gt(l.granted, granted_before + 50, "fail_open kept serving");
    cr_assert_gt(l.degraded, 0);
    cache_stats(c, &st);
    cr_assert_neq(st.state, CACHE_STATE_CONNECTED);
    cr_assert_gt(st.journal_amount, 0);
    cr_assert_eq(test_redis_restart(&r), 0);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    wait_ms(&loop, 300);
    l.remaining = 0;
    while (l.active > 0)
        uv_run(&loop, UV_RUN_ONCE);
    wait_drained(&loop, c);
    cr_assert_eq(l.errors, 0);
    s = wait_spend(&loop, c, "acme");
    cr_assert_null(s.err);
    cr_assert_not(s.spend.degraded);
    cr_assert_eq(s.spend.day_spent, l.charged, "redis has %lld, charged %lld",
                 (long long)s.spend.day_spent, (long long)l.charged);
    cr_assert_eq(s.spend.month_spent, l.charged);
    wait_close(&loop, c);
    test_redis_stop(&r);
}

/* Turn the loop until the journal is written back and nothing is in
 * flight, for at most `ms`; whether it drained. */
static int drained_within(uv_loop_t *loop, struct cache *c, int ms)
{
    struct cache_stats st;

    for (int waited = 0; waited < ms; waited += 50) {
        cache_stats(c, &st);
        if (st.journal_entries == 0 && st.inflight == 0)
            return 1;
        wait_ms(loop, 50);
    }
    return 0;
}

/* Redis answers but refuses writes (min-replicas-to-write with no replica;
 * MISCONF and OOM under noeviction answer alike) and keeps the connection:
 * charges are journaled, the store says writes are refused, refused begins
 * leave nothing to release (the journal does not grow by one entry per
 * request), and once Redis takes writes again the journal is written back
 * on the same connection, without waiting for a reconnect. */
/* Start a redis-server and a fail_open store on it, connected, with one
 * hold of 100 taken in Redis for tenant acme. */
static struct wait held_in_redis(uv_loop_t *loop, struct test_redis *r, struct cache **c,
                                 char *prefix, size_t n, const char *name)
{
    struct wait w;

    cr_assert_eq(test_redis_start(r, 0), 0);
    uv_loop_init(loop);
    *c = open_store(loop, r->url, CACHE_FAIL_OPEN, prefix, n, name);
    wait_state(loop, *c, CACHE_STATE_CONNECTED);
    w = wait_begin(loop, *c, "acme", NULL, 100, 0, 0);
    cr_assert(w.begin.granted && w.begin.reservation.remote);
    return w;
}

Test(faults, refused_writes_are_written_back_without_a_reconnect, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w;
    struct cache_stats st;

    w = held_in_redis(&loop, &r, &c, prefix, sizeof(prefix), "refused-writes");
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 1");
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 40), error_store_unavailable,
                 "journaled: Redis refused the write");
    for (int i = 0; i < 10; i++) {
        struct wait d = wait_begin(&loop, c, "acme", NULL, 10, 0, 0);
        cr_assert_null(d.err);
        cr_assert(d.begin.granted && d.begin.degraded, "served from local counters");
        cr_assert_eq(wait_settle(&loop, c, &d.begin.reservation, 5), error_store_unavailable);
    }
    cache_stats(c, &st);
    cr_assert_eq(st.state, CACHE_STATE_CONNECTED, "the connection stays");
    cr_assert(st.writes_refused, "the store says Redis refuses writes");
    cr_assert_eq(st.journal_amount, 90);
    cr_assert_leq(st.journal_entries, 2, "%zu entries for 11 charges", st.journal_entries);
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 0");
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    cache_stats(c, &st);
    cr_assert_eq(st.reconnects, 1, "written back without a reconnect");
    cr_assert_not(st.writes_refused);
    spent_then_close(&loop, c, &r, 90, "the refused settle's reservation is still held");
}

/* A settle of a Redis hold sent to a Redis that stops answering (its
 * reply never comes: it may have been applied) is journaled as "charge if
 * the hold is still known". Redis then restarts without persistence: the
 * new one knows neither the hold nor the spend, and the write-back found
 * no hold and charged nothing, without a word. The store sees the data
 * is gone (its mark PREFIXepoch is) and writes such a settle back as a
 * plain charge. */
Test(faults, a_maybe_applied_settle_is_charged_by_a_redis_restarted_empty, .timeout = 20)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w;

    w = held_in_redis(&loop, &r, &c, prefix, sizeof(prefix), "restart-empty");
    test_redis_kill(&r, SIGSTOP);
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 40), error_store_unavailable,
                 "journaled: no answer before the command timeout");
    test_redis_kill(&r, SIGKILL);
    cr_assert_eq(test_redis_restart(&r), 0);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    cr_assert_eq(test_redis_day_spend(&r, prefix, "acme"), 40,
                 "the settle's 40 are not in the restarted Redis");
    spent_then_close(&loop, c, &r, 40, "a hold in a Redis restarted empty");
}

/* The same settle saved in the journal file by a stop, and loaded by the
 * next start, after Redis restarted without persistence: the file keeps
 * the mark of the Redis its entries were sent to, and the new start's
 * write-back charges the settle. */
Test(faults, a_maybe_applied_settle_in_the_journal_file_is_charged_by_a_redis_restarted_empty,
     .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64], path[64] = "/tmp/costrouter-jfile-XXXXXX", lock[80];
    struct cache *c;
    struct cache_options o = {.on_failure = CACHE_FAIL_OPEN, .journal_file = path};
    struct wait w;

    close(mkstemp(path));
    unlink(path);
    snprintf(lock, sizeof(lock), "%s.lock", path);
    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    o.redis_url = r.url;
    c = open_store_with(&loop, &o, prefix, sizeof(prefix), "jfile-empty");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    w = wait_begin(&loop, c, "acme", NULL, 100, 0, 0);
    cr_assert(w.begin.granted && w.begin.reservation.remote);
    test_redis_kill(&r, SIGSTOP);
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 40), error_store_unavailable);
    wait_close(&loop, c); /* saved to the file */
    cr_assert_eq(access(path, F_OK), 0, "the journal file was not saved");
    test_redis_kill(&r, SIGKILL);
    cr_assert_eq(test_redis_restart(&r), 0);
    uv_loop_init(&loop);
    c = cache_create(&loop, &o);
    cr_assert_not_null(c);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    cr_assert_eq(test_redis_day_spend(&r, prefix, "acme"), 40,
                 "the saved settle's 40 are not in the restarted Redis");
    spent_then_close(&loop, c, &r, 40, "a hold in a Redis restarted empty");
    unlink(path);
    unlink(lock);
}

/* While Redis refuses writes, reads still go through (the router reads a
 * tenant's spend before it picks a backend). What such a read answers
 * lacks the charges journaled meanwhile: the local counters that then
 * serve must keep counting them, or each read would hand the tenant its
 * budget again. */
Test(faults, a_read_while_writes_are_refused_keeps_the_journaled_spend, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w, s;

    w = held_in_redis(&loop, &r, &c, prefix, sizeof(prefix), "refused-read");
    cr_assert_null(wait_settle(&loop, c, &w.begin.reservation, 0));
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 1");
    w = wait_begin(&loop, c, "acme", NULL, 10, 100, 0);
    cr_assert_null(w.err);
    cr_assert(w.begin.granted && w.begin.degraded, "served from local counters");
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 90), error_store_unavailable,
                 "journaled: Redis refused the write");
    s = wait_spend(&loop, c, "acme"); /* a read: Redis answers it */
    cr_assert_null(s.err);
    cr_assert_eq(s.spend.day_spent, 90,
                 "the read says %lld spent, Redis's figure without the 90 journaled that "
                 "these counters enforce",
                 (long long)s.spend.day_spent);
    w = wait_begin(&loop, c, "acme", NULL, 50, 100, 0);
    cr_assert_null(w.err);
    cr_assert_not(w.begin.granted,
                  "90 of a day's 100 spent (journaled), yet a hold of 50 was granted after a "
                  "read of the spend (the read said %lld spent)",
                  (long long)s.spend.day_spent);
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 0");
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    /* Written back, the 90 are in Redis's answers: counted once, not
     * again as journaled. */
    cr_assert_eq(wait_spend(&loop, c, "acme").spend.day_spent, 90);
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 1");
    w = wait_begin(&loop, c, "acme", NULL, 10, 100, 0);
    cr_assert(w.begin.granted && w.begin.degraded, "90 + 10 fit 100");
    cr_assert_eq(w.begin.day_spent, 90);
    cr_assert_null(wait_release(&loop, c, &w.begin.reservation));
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 0");
    spent_then_close(&loop, c, &r, 90, "a hold stays after the write-back");
}

/* A tenant whose keys Redis answers with an error that is no refusal
 * (here WRONGTYPE: its hash of open holds is a string, set by someone
 * else) fails every call of that tenant, for as long as the key stays:
 * each begin journals a release and each settle a charge with its own id,
 * which never merge, and each write-back fails again. The journal stops at
 * opts.journal_max entries (it grew by two a request), counts what it
 * drops, and the dropped charges stay in this instance's counters: the
 * spend it answers keeps them. Once the key is mended, what was journaled
 * reaches Redis. */
Test(faults, a_tenant_redis_answers_with_errors_does_not_grow_the_journal, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct cache_options o = {.on_failure = CACHE_FAIL_OPEN, .journal_max = 8};
    struct cache_stats st;
    struct wait w;
    long long in_redis;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    o.redis_url = r.url;
    c = open_store_with(&loop, &o, prefix, sizeof(prefix), "wrongtype");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    cr_assert_eq(test_redis_int(&r, "SET %s{acme}:open not-a-hash", prefix), -1);
    for (int i = 0; i < 30; i++) {
        w = wait_begin(&loop, c, "acme", NULL, 10, 0, 0);
        cr_assert_null(w.err);
        cr_assert(w.begin.granted && w.begin.degraded, "request %d: served locally", i);
        wait_settle(&loop, c, &w.begin.reservation, 10);
    }
    cache_stats(c, &st);
    cr_assert_leq(st.journal_entries, 8, "%zu journal entries after 30 requests",
                  st.journal_entries);
    cr_assert_gt(st.journal_dropped, 0);
    cr_assert_gt(st.journal_dropped_amount, 0);
    cr_assert_eq(st.state, CACHE_STATE_CONNECTED);
    w = wait_spend(&loop, c, "acme");
    cr_assert_null(w.err);
    cr_assert_eq(w.spend.day_spent, 300, "this instance spent 300, its counters say %lld",
                 (long long)w.spend.day_spent);
    /* Another tenant is charged in Redis as usual. */
    w = wait_begin(&loop, c, "other", NULL, 10, 0, 0);
    cr_assert(w.begin.granted && !w.begin.degraded);
    cr_assert_null(wait_settle(&loop, c, &w.begin.reservation, 7));
    cr_assert_eq(test_redis_day_spend(&r, prefix, "other"), 7);
    /* Mended: the journal is written back (a reconnect does it at once). */
    test_redis_int(&r, "DEL %s{acme}:open", prefix);
    test_redis_int(&r, "CLIENT KILL TYPE normal");
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    in_redis = test_redis_day_spend(&r, prefix, "acme");
    cr_assert_gt(in_redis, 0, "nothing of the journal reached Redis");
    cr_assert_lt(in_redis, 300, "the dropped charges are in Redis too?");
    cache_stats(c, &st);
    cr_assert_eq(in_redis + st.journal_dropped_amount, 300, "%lld in Redis, %lld dropped",
                 in_redis, (long long)st.journal_dropped_amount);
    w = wait_spend(&loop, c, "acme");
    cr_assert_null(w.err);
    cr_assert_not(w.spend.degraded);
    cr_assert_eq(w.spend.day_spent, 300, "what Redis has and what it never got");
    wait_close(&loop, c);
    test_redis_stop(&r);
}

/* A tenant's day counter of the wrong type (a list, set by something
 * else) makes the charge's INCRBY fail after the script has already
 * dropped the hold it settles. The settle is journaled as "charge if the
 * hold is still known", and its write-back, finding no hold, charged
 * nothing and counted as done: the charge was lost from Redis and from
 * the local counters alike. A failing script must leave nothing behind:
 * the charge stays journaled (and counted here) until the key is mended,
 * then reaches Redis once. */
Test(faults, a_charge_redis_fails_to_count_is_not_lost, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64], day[16];
    struct cache *c;
    struct wait w;
    struct cache_stats st;

    w = held_in_redis(&loop, &r, &c, prefix, sizeof(prefix), "wrongtype-day");
    key_day(day);
    cr_assert_eq(test_redis_int(&r, "RPUSH %s{acme}:d:%s x", prefix, day), 1);
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 40), error_store_unavailable,
                 "Redis answered the charge with an error: journaled");
    wait_ms(&loop, 1500); /* the write-back is retried after 1 s */
    cache_stats(c, &st);
    cr_assert_eq(st.journal_amount, 40, "the charge left the journal (%lld journaled)",
                 (long long)st.journal_amount);
    w = wait_spend(&loop, c, "acme");
    cr_assert_eq(w.spend.month_spent, 40, "this instance forgot the charge (month %lld)",
                 (long long)w.spend.month_spent);
    test_redis_int(&r, "DEL %s{acme}:d:%s", prefix, day);
    test_redis_int(&r, "CLIENT KILL TYPE normal"); /* a reconnect writes back at once */
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    spent_then_close(&loop, c, &r, 40, "the settle's hold is still held");
}

/* Redis takes writes again while charges journaled during its refusal
 * wait for their write-back (retried on a timer, up to 30 s apart): a
 * begin that Redis grants meanwhile is checked against Redis's figures,
 * which lack them. 90 of a day's 100 were spent (journaled); a hold of 50
 * was granted, the budget spent again. The store checks Redis's grant
 * against what it knows (Redis's figures and its charges Redis has not
 * confirmed) and releases one that does not fit. */
Test(faults, a_grant_after_writes_resume_counts_the_journaled_spend, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w;
    struct cache_stats st;

    w = held_in_redis(&loop, &r, &c, prefix, sizeof(prefix), "resume-grant");
    cr_assert_null(wait_settle(&loop, c, &w.begin.reservation, 0));
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 1");
    w = wait_begin(&loop, c, "acme", NULL, 10, 100, 0);
    cr_assert(w.begin.granted && w.begin.degraded, "served from local counters");
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 90), error_store_unavailable);
    test_redis_int(&r, "CONFIG SET min-replicas-to-write 0");
    w = wait_begin(&loop, c, "acme", NULL, 50, 100, 0);
    cache_stats(c, &st);
    cr_assert_eq(st.journal_amount, 90, "written back already: the test proves nothing");
    cr_assert_null(w.err);
    cr_assert_not(w.begin.granted, "90 of 100 spent (journaled), yet Redis's grant of 50 stood");
    cr_assert_eq(w.begin.day_spent, 90, "the answer's spend lacks the journaled 90");
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    spent_then_close(&loop, c, &r, 90, "the refused grant's hold is still held");
}

/* The same check must not count a hold twice: a settle made while a
 * begin's call is out waits in the queue (group commit), its charge not
 * confirmed yet and its hold still in Redis's answer to the begin. Here
 * A holds 50 of 100, B asks 50 more, A settles at 10 while B's call is
 * out: 10 spent and 50 held fit, yet A's 50 counted as held and 10 as
 * spent refused B (with a journal waiting for another tenant's charge,
 * which turns the check on). */
Test(faults, a_grant_is_not_refused_for_a_settle_queued_behind_it, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait a, b = {0}, x;
    struct cache_stats st;
    char day[16];

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    c = open_store(&loop, r.url, CACHE_FAIL_OPEN, prefix, sizeof(prefix), "queued-settle");
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    /* Tenant x's charges fail for good (its day counter is a list). */
    key_day(day);
    cr_assert_eq(test_redis_int(&r, "RPUSH %s{x}:d:%s v", prefix, day), 1);
    x = wait_begin(&loop, c, "x", NULL, 5, 0, 0);
    cr_assert(x.begin.granted);
    cr_assert_eq(wait_settle(&loop, c, &x.begin.reservation, 5), error_store_unavailable);
    cache_stats(c, &st);
    cr_assert_gt(st.journal_entries, 0);
    a = wait_begin(&loop, c, "acme", NULL, 50, 100, 0);
    cr_assert(a.begin.granted && !a.begin.degraded);
    cr_assert_not_null(cache_begin(c, "acme", NULL, 50, 100, 0, wait_begin_cb, &b));
    test_redis_kill(&r, SIGSTOP); /* B's answer waits */
    uv_run(&loop, UV_RUN_NOWAIT); /* B's call goes out */
    cr_assert_not_null(cache_settle(c, &a.begin.reservation, 10, NULL, NULL)); /* queued */
    uv_run(&loop, UV_RUN_NOWAIT);
    test_redis_kill(&r, SIGCONT);
    while (!b.done)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert_null(b.err);
    cr_assert(b.begin.granted, "10 spent and 50 held of 100, yet B's 50 refused (%lld spent, "
                               "%lld reserved)",
              (long long)b.begin.day_spent, (long long)b.begin.reserved);
    cr_assert_null(wait_release(&loop, c, &b.begin.reservation));
    test_redis_int(&r, "DEL %s{x}:d:%s", prefix, day);
    test_redis_int(&r, "CLIENT KILL TYPE normal");
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    spent_then_close(&loop, c, &r, 10, "B's hold is still held");
}

/* With a shared response cache a begin sends its GET at once and waits in
 * the queue for its script call (group commit holds it while an earlier
 * call is out). When the connection drops meanwhile, the begin is never
 * sent and ends from the queue: it must leave the list of commands in
 * flight, or its stale deadline drops each new connection as timed out
 * and a close waits for an answer that never comes. */
Test(faults, a_queued_begin_whose_get_went_out_leaves_nothing_in_flight, .timeout = 20)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache_options o = {
        .on_failure = CACHE_FAIL_OPEN,
        .command_timeout_ms = 300,
        .connect_timeout_ms = 5000,
        .reconnect_min_ms = 50,
        .reconnect_max_ms = 200,
        .shared_cache = 1,
    };
    struct cache_key k = {{1, 2, 3}};
    struct cache *c;
    struct wait a = {0}, b = {0}, w;
    struct cache_stats st;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    wait_prefix(prefix, sizeof(prefix), "queued-get");
    o.redis_url = r.url;
    o.key_prefix = prefix;
    c = cache_create(&loop, &o);
    cr_assert_not_null(c);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    test_redis_kill(&r, SIGSTOP);
    cr_assert_not_null(cache_begin(c, "acme", NULL, 10, 0, 0, wait_begin_cb, &a));
    uv_run(&loop, UV_RUN_NOWAIT); /* its script call goes out */
    cr_assert_not_null(cache_begin(c, "acme", &k, 10, 0, 0, wait_begin_cb, &b));
    uv_run(&loop, UV_RUN_NOWAIT); /* the GET goes out, the begin waits for a's call */
    wait_run(&loop, &a);
    wait_run(&loop, &b);
    cr_assert(a.begin.degraded && b.begin.degraded, "both timed out: local counters");
    test_redis_kill(&r, SIGCONT);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    wait_ms(&loop, 1000); /* past a command timeout on the new connection */
    cache_stats(c, &st);
    cr_assert_eq(st.reconnects, 2, "the new connection was dropped too (%llu connections)",
                 (unsigned long long)st.reconnects);
    /* (the live mark's renewal may be out for a moment) */
    for (int tries = 0; tries < 50 && (cache_stats(c, &st), st.inflight > 0); tries++)
        wait_ms(&loop, 20);
    cr_assert_eq(st.inflight, 0, "%zu commands in flight on an idle store", st.inflight);
    w = wait_begin(&loop, c, "acme", NULL, 10, 0, 0);
    cr_assert(w.begin.granted && !w.begin.degraded);
    cr_assert_null(wait_release(&loop, c, &w.begin.reservation));
    wait_close(&loop, c);
    test_redis_stop(&r);
}

/* A begin's script call gets the whole command timeout, counted from when
 * it goes out. With a shared response cache its GET goes out first and
 * the begin may then wait in the queue while an earlier call is out
 * (group commit): the GET's deadline is not the call's. CLIENT PAUSE
 * WRITE holds script calls and lets the GET through. */
Test(faults, a_held_begin_gets_its_own_command_timeout, .timeout = 20)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache_options o = {
        .on_failure = CACHE_FAIL_OPEN,
        .command_timeout_ms = 500,
        .connect_timeout_ms = 5000,
        .shared_cache = 1,
    };
    struct cache_key k = {{4, 5, 6}};
    struct cache *c;
    struct wait a = {0}, b = {0};
    struct cache_stats st;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    uv_loop_init(&loop);
    wait_prefix(prefix, sizeof(prefix), "held-deadline");
    o.redis_url = r.url;
    o.key_prefix = prefix;
    c = cache_create(&loop, &o);
    cr_assert_not_null(c);
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    test_redis_int(&r, "CLIENT PAUSE 350 WRITE");
    cr_assert_not_null(cache_begin(c, "acme", NULL, 10, 0, 0, wait_begin_cb, &a));
    uv_run(&loop, UV_RUN_NOWAIT); /* a's call goes out, held by the pause */
    cr_assert_not_null(cache_begin(c, "acme", &k, 10, 0, 0, wait_begin_cb, &b));
    uv_run(&loop, UV_RUN_NOWAIT); /* b's GET goes out; b waits for a's call */
    wait_run(&loop, &a);
    cr_assert(a.begin.granted && !a.begin.degraded);
    cr_assert_not(b.done);
    test_redis_int(&r, "CLIENT PAUSE 350 WRITE"); /* b's call, sent now, waits 350 ms */
    wait_run(&loop, &b);
    cache_stats(c, &st);
    cr_assert(b.begin.granted && !b.begin.degraded,
              "b's call timed out ~150 ms after it went out, on its GET's deadline "
              "(command timeout 500 ms; %llu connections)",
              (unsigned long long)st.reconnects);
    cr_assert_eq(st.reconnects, 1);
    cr_assert_null(wait_release(&loop, c, &a.begin.reservation));
    cr_assert_null(wait_release(&loop, c, &b.begin.reservation));
    wait_close(&loop, c);
    test_redis_stop(&r);
}

/* READONLY (the server became a replica: after a failover, the old
 * primary) is the one refusal a reconnect can cure, as the name may lead
 * to the new primary now: the store drops the connection, and once a
 * server takes writes again the journal is written back. */
Test(faults, a_readonly_server_is_left_for_a_reconnect, .timeout = 30)
{
    uv_loop_t loop;
    struct test_redis r;
    char prefix[64];
    struct cache *c;
    struct wait w;
    struct cache_stats st;

    w = held_in_redis(&loop, &r, &c, prefix, sizeof(prefix), "readonly");
    test_redis_int(&r, "REPLICAOF 127.0.0.1 1"); /* a master that is not there */
    cr_assert_eq(wait_settle(&loop, c, &w.begin.reservation, 40), error_store_unavailable,
                 "journaled: Redis refused the write");
    cache_stats(c, &st);
    cr_assert_neq(st.state, CACHE_STATE_CONNECTED, "the connection to a replica stays");
    test_redis_int(&r, "REPLICAOF NO ONE");
    cr_assert(drained_within(&loop, c, 10000), "the journal was not written back");
    cache_stats(c, &st);
    cr_assert_geq(st.reconnects, 2);
    spent_then_close(&loop, c, &r, 40, "a hold stays after the write-back");
}

/* A fail_open store talking to its own redis-server through a relay. */
struct relayed {
    uv_loop_t loop;            /* the test's loop */
    struct test_redis r;       /* the server */
    struct test_relay *relay;  /* between the store and the server */
    struct cache *c;           /* the store */
    char prefix[64];           /* its key prefix */
};

/* Open it, connect, then take Redis away (the store DOWN). */
static void relayed_open_down(struct relayed *x, const char *name)
{
    char url[64];

    cr_assert_eq(test_redis_start(&x->r, 0), 0);
    x->relay = test_relay_start(x->r.port);
    cr_assert_not_null(x->relay);
    uv_loop_init(&x->loop);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", test_relay_port(x->relay));
    x->c = open_store(&x->loop, url, CACHE_FAIL_OPEN, x->prefix, sizeof(x->prefix), name);
    wait_state(&x->loop, x->c, CACHE_STATE_CONNECTED);
    test_relay_down(x->relay, 1);
    wait_state(&x->loop, x->c, CACHE_STATE_DOWN);
}

/* A reservation of `amount` made on local counters (Redis away). */
static struct cache_reservation degraded_begin(struct relayed *x, long long amount)
{
    struct wait w = wait_begin(&x->loop, x->c, "acme", NULL, amount, 0, 0);

    cr_assert_null(w.err);
    cr_assert(w.begin.granted && w.begin.degraded && !w.begin.reservation.remote);
    return w.begin.reservation;
}

/* Once written back, Redis holds `want` for the day, and the ids it keeps
 * to apply each charge once expire with the grace period (1 h here); then
 * close all. */
static void relayed_check_close(struct relayed *x, long long want)
{
    struct wait s;
    long long ttl;

    wait_state(&x->loop, x->c, CACHE_STATE_CONNECTED);
    wait_drained(&x->loop, x->c);
    cr_assert_eq(test_relay_lost(x->relay), 1, "no reply was lost");
    s = wait_spend(&x->loop, x->c, "acme");
    cr_assert_null(s.err);
    cr_assert_eq(s.spend.day_spent, want, "charged %lld for %lld", (long long)s.spend.day_spent,
                 want);
    ttl = test_redis_int(&x->r, "PTTL %s{acme}:applied", x->prefix);
    cr_assert(ttl > 0 && ttl <= 3600000, "the applied ids expire in %lld ms", ttl);
    wait_close(&x->loop, x->c);
    test_relay_stop(x->relay);
    test_redis_stop(&x->r);
}

/* A charge journaled during an outage is written back when Redis returns;
 * Redis applies it but the reply is lost (command timeout). It is written
 * back again on the next connection, and must not be counted twice; a
 * charge journaled meanwhile must not be folded into it (it would be
 * skipped with it). */
Test(faults, a_write_back_whose_reply_is_lost_is_charged_once, .timeout = 20)
{
    struct relayed x;
    struct cache_reservation res;

    relayed_open_down(&x, "lost-writeback");
    res = degraded_begin(&x, 100);
    cr_assert_eq(wait_settle(&x.loop, x.c, &res, 40), error_store_unavailable);
    test_relay_lose_next(x.relay);
    test_relay_down(x.relay, 0);
    while (test_relay_lost(x.relay) == 0)
        wait_ms(&x.loop, 5);
    test_relay_down(x.relay, 1); /* the write-back is out: keep Redis away after it */
    wait_state(&x.loop, x.c, CACHE_STATE_DOWN);
    res = degraded_begin(&x, 100);
    cr_assert_eq(wait_settle(&x.loop, x.c, &res, 25), error_store_unavailable);
    test_relay_down(x.relay, 0);
    relayed_check_close(&x, 65);
}

/* A request admitted on local counters during an outage (no Redis
 * reservation) settles once Redis is back; Redis applies the settle but
 * its reply is lost. The charge is journaled and written back, and must
 * not be counted twice. */
Test(faults, an_unreserved_settle_whose_reply_is_lost_is_charged_once, .timeout = 20)
{
    struct relayed x;
    struct cache_reservation res;

    relayed_open_down(&x, "lost-settle");
    res = degraded_begin(&x, 100);
    test_relay_lose_next(x.relay);
    test_relay_down(x.relay, 0);
    wait_state(&x.loop, x.c, CACHE_STATE_CONNECTED);
    cr_assert_eq(wait_settle(&x.loop, x.c, &res, 40), error_store_unavailable,
                 "the reply was lost: journaled");
    relayed_check_close(&x, 40);
}

/* A settle made while an earlier call of its tenant is out waits for that
 * call's reply (group commit), whose numbers then replace the local
 * counters: they do not have the settle's charge yet. When the settle's
 * own reply is then lost and Redis stays away, the local counters that
 * serve must still count it. */
Test(faults, a_settle_lost_behind_an_answered_call_still_counts_locally, .timeout = 20)
{
    struct relayed x;
    struct wait a, d = {0}, e;
    char url[64];

    cr_assert_eq(test_redis_start(&x.r, 0), 0);
    x.relay = test_relay_start(x.r.port);
    cr_assert_not_null(x.relay);
    uv_loop_init(&x.loop);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", test_relay_port(x.relay));
    x.c = open_store(&x.loop, url, CACHE_FAIL_OPEN, x.prefix, sizeof(x.prefix), "lost-behind");
    wait_state(&x.loop, x.c, CACHE_STATE_CONNECTED);
    a = wait_begin(&x.loop, x.c, "acme", NULL, 10, 100, 0);
    cr_assert(a.begin.granted && !a.begin.degraded);
    cr_assert_not_null(cache_begin(x.c, "acme", NULL, 1, 100, 0, wait_begin_cb, &d));
    uv_run(&x.loop, UV_RUN_NOWAIT); /* d's call goes out */
    for (int tries = 0; tries < 250; tries++, usleep(10000)) /* and reached Redis */
        if (test_redis_int(&x.r, "HGET %s{acme}:open #", x.prefix) == 11)
            break;
    test_relay_lose_next(x.relay); /* the settle's call, sent once d's is answered */
    cr_assert_eq(wait_settle(&x.loop, x.c, &a.begin.reservation, 90), error_store_unavailable,
                 "the reply was lost: journaled");
    test_relay_down(x.relay, 1); /* and Redis stays away */
    cr_assert(d.done && d.begin.granted && !d.begin.degraded);
    cr_assert_eq(d.begin.day_spent, 0, "d's answer came before the settle's");
    e = wait_begin(&x.loop, x.c, "acme", NULL, 50, 100, 0);
    cr_assert_null(e.err);
    cr_assert(e.begin.degraded);
    cr_assert_not(e.begin.granted, "90 of 100 charged (reply lost), yet 50 more held locally "
                                   "(local spend %lld)", (long long)e.begin.day_spent);
    cr_assert_not_null(cache_settle(x.c, &d.begin.reservation, 0, NULL, NULL));
    test_relay_down(x.relay, 0);
    wait_state(&x.loop, x.c, CACHE_STATE_CONNECTED);
    wait_drained(&x.loop, x.c);
    cr_assert_eq(test_relay_lost(x.relay), 1, "no reply was lost");
    e = wait_spend(&x.loop, x.c, "acme");
    cr_assert_eq(e.spend.day_spent, 90, "charged %lld for 90", (long long)e.spend.day_spent);
    cr_assert_eq(e.spend.reserved, 0);
    wait_close(&x.loop, x.c);
    test_relay_stop(x.relay);
    test_redis_stop(&x.r);
}

/* Worker process: its own loop and connection, begin+settle at full
 * amount against one tenant. Writes how many were granted. */
static void worker(const char *url, const char *prefix, int out)
{
    uv_loop_t loop;
    struct cache_options o = {.redis_url = url, .key_prefix = prefix,
                              .on_failure = CACHE_FAIL_CLOSED};
    struct load l = {.tenant = "acme", .amount = 7, .day_limit = 1000, .remaining = 400,
                     .fixed_real = 1};
    struct load_chain chains[8];
    struct cache *c;
    int closed = 0;

    uv_loop_init(&loop);
    c = cache_create(&loop, &o);
    if (c == NULL)
        _exit(2);
    for (struct cache_stats st = {0}; cache_stats(c, &st), st.state != CACHE_STATE_CONNECTED;)
        uv_run(&loop, UV_RUN_ONCE);
    l.c = c;
    load_start(&l, chains, 8);
    while (l.active > 0)
        uv_run(&loop, UV_RUN_ONCE);
    cache_close(c, wait_closed_cb, &closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (write(out, &l.granted, sizeof(l.granted)) != sizeof(l.granted))
        _exit(3);
    _exit(l.errors == 0 && closed && uv_loop_close(&loop) == 0 ? 0 : 4);
}

Test(faults, processes_hammering_one_tenant_stay_within_budget, .timeout = 30)
{
    enum { N = 4 };
    struct test_redis r;
    char prefix[64];
    int fds[2];
    pid_t pids[N];
    long total = 0, got;
    uv_loop_t loop;
    struct cache *c;
    struct wait s;

    cr_assert_eq(test_redis_start(&r, 0), 0);
    wait_prefix(prefix, sizeof(prefix), "procs");
    cr_assert_eq(pipe(fds), 0);
    for (int i = 0; i < N; i++) {
        pids[i] = fork();
        cr_assert_geq(pids[i], 0);
        if (pids[i] == 0)
            worker(r.url, prefix, fds[1]);
    }
    for (int i = 0; i < N; i++) {
        int status;
        cr_assert_eq(waitpid(pids[i], &status, 0), pids[i]);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "worker %d failed", i);
        cr_assert_eq(read(fds[0], &got, sizeof(got)), (ssize_t)sizeof(got));
        total += got;
    }
    uv_loop_init(&loop);
    {
        struct cache_options o = {.redis_url = r.url, .key_prefix = prefix};
        c = cache_create(&loop, &o);
    }
    wait_state(&loop, c, CACHE_STATE_CONNECTED);
    s = wait_spend(&loop, c, "acme");
    cr_assert_eq(s.spend.day_spent, total * 7, "every granted request charged once");
    cr_assert_leq(s.spend.day_spent, 1000, "overspent: %lld", (long long)s.spend.day_spent);
    cr_assert_gt(s.spend.day_spent, 500, "the budget was barely used");
    cr_assert_eq(s.spend.reserved, 0);
    wait_close(&loop, c);
    close(fds[0]);
    close(fds[1]);
    test_redis_stop(&r);
}
