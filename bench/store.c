/*
 * bench/store.c: throughput of the store's per-request work, begin (cache
 * lookup + reservation) then settle, with Redis and with the in-process
 * store in one run. Starts its own redis-server on a loopback port.
 * Prints `name: value unit` lines.
 *
 * usage: store [requests] [concurrency]   (default 200000 64)
 */
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

#include "cache/cache.h"
#include "tests/cache/load.h"
#include "tests/support/redis.h"

static void closed(void *arg)
{
    *(int *)arg = 1;
}

/* Run `requests` begin+settle pairs with `conc` in flight; ops/s or -1. */
static double run(const char *url, long requests, int conc)
{
    uv_loop_t loop;
    struct cache_options o = {.redis_url = url, .key_prefix = "bench:", .command_timeout_ms = 5000};
    struct load l = {.tenant = "bench", .amount = 1000, .remaining = requests, .seed = 1};
    struct load_chain *chains = calloc((size_t)conc, sizeof(*chains));
    struct cache_stats st;
    struct cache *c;
    uint64_t t0, t1;
    int done = 0;

    uv_loop_init(&loop);
    c = cache_create(&loop, &o);
    if (c == NULL || chains == NULL)
        return -1;
    for (cache_stats(c, &st); st.state != CACHE_STATE_CONNECTED; cache_stats(c, &st))
        uv_run(&loop, UV_RUN_ONCE);
    l.c = c;
    t0 = uv_hrtime();
    load_start(&l, chains, conc);
    while (l.active > 0)
        uv_run(&loop, UV_RUN_ONCE);
    t1 = uv_hrtime();
    cache_close(c, closed, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    free(chains);
    if (l.errors || l.degraded || l.granted != requests) {
        fprintf(stderr, "store bench: %ld errors, %ld degraded, %ld granted of %ld\n", l.errors,
                l.degraded, l.granted, requests);
        return -1;
    }
    return (double)requests / ((double)(t1 - t0) / 1e9);
}

int main(int argc, char **argv)
{
    long requests = argc > 1 ? atol(argv[1]) : 200000;
    int conc = argc > 2 ? atoi(argv[2]) : 64;
    struct test_redis r;
    double mem, red;

    if (test_redis_start(&r, 0) < 0) {
        fprintf(stderr, "store bench: cannot start redis-server\n");
        return 1;
    }
    mem = run(NULL, requests, conc);
    red = run(r.url, requests, conc);
    test_redis_stop(&r);
    if (mem < 0 || red < 0)
        return 1;
    printf("store_memory_begin_settle: %.0f requests/s\n", mem);
    printf("store_redis_begin_settle: %.0f requests/s\n", red);
    printf("store_redis_vs_memory: %.4f ratio\n", red / mem);
    printf("store_requests: %ld count (concurrency %d)\n", requests, conc);
    return 0;
}
