/*
 * tests/support/cost_fixture.h: a config with three API models and one
 * self-hosted GPU pool, for the cost and selection tests. Header only:
 * each test binary that includes it gets its own copy.
 *
 * Prices are the list prices in conf/prices.yaml (USD per 1M tokens).
 */
#ifndef TESTS_SUPPORT_COST_FIXTURE_H
#define TESTS_SUPPORT_COST_FIXTURE_H

#include <string.h>

#include "backends/backend.h"
#include "conf/conf.h"

/* Backend indexes; the route's candidates are in the same order. */
enum { FX_MINI, FX_4O, FX_SONNET, FX_GPU, FX_N };

struct fx {
    struct conf conf;                   /* points at the arrays below */
    struct conf_backend backends[FX_N]; /* one per FX_ index */
    struct conf_backend *cands[FX_N];   /* the route's candidates */
    struct conf_route route;            /* model "chat", all four candidates */
    struct backend_set *set;            /* live state, clock started at 0 */
};

static inline void fx_api(struct conf_backend *b, const char *name, int quality, int64_t ctx,
                          double in, double out, double cached)
{
    b->name = (char *)name;
    b->model = (char *)name;
    b->kind = CONF_BACKEND_API;
    b->quality = quality;
    b->context_window = ctx;
    b->input_usd_per_mtok = in;
    b->output_usd_per_mtok = out;
    b->cached_input_usd_per_mtok = cached;
}

/* Fill *f and create its backend set. The GPU pool: 2 replicas at
 * $2.00/h each, 4 concurrent requests and 1000 tokens/s per replica. */
static inline void fx_init(struct fx *f)
{
    memset(f, 0, sizeof(*f));
    fx_api(&f->backends[FX_MINI], "gpt-4o-mini", 60, 128000, 0.15, 0.60, 0.075);
    fx_api(&f->backends[FX_4O], "gpt-4o", 80, 128000, 2.50, 10.00, 1.25);
    fx_api(&f->backends[FX_SONNET], "claude-sonnet-4-5", 90, 200000, 3.00, 15.00, 0.30);
    f->backends[FX_GPU] = (struct conf_backend){
        .name = "llama-gpu",
        .model = "llama-gpu",
        .kind = CONF_BACKEND_SELF_HOSTED,
        .quality = 70,
        .context_window = 32768,
        .gpu_hourly_usd = 2.00,
        .replicas = 2,
        .max_concurrency = 4,
        .tokens_per_second = 1000,
    };
    for (size_t i = 0; i < FX_N; i++) {
        f->backends[i].index = i;
        f->cands[i] = &f->backends[i];
    }
    f->route = (struct conf_route){.model = "chat", .candidates = f->cands, .ncandidates = FX_N};
    f->conf.backends = f->backends;
    f->conf.nbackends = FX_N;
    f->conf.routes = &f->route;
    f->conf.nroutes = 1;
    f->set = backend_set_create(&f->conf);
    backend_set_start(f->set, 0);
}

static inline void fx_fini(struct fx *f)
{
    backend_set_destroy(f->set);
    f->set = NULL;
}

static inline struct backend *fx_backend(struct fx *f, int i)
{
    return backend_set_get(f->set, (size_t)i);
}

/* Give the pool a history: one request from `at` with a `ttft_ms` first
 * byte lasting `duration_ms` and making 500 tokens, so its TTFT and
 * duration averages start at exactly these values. */
static inline void fx_gpu_history(struct fx *f, uint64_t at, uint64_t ttft_ms, uint64_t duration_ms)
{
    struct backend *b = fx_backend(f, FX_GPU);
    struct backend_ticket t;
    struct backend_tokens used = {.prompt = 1000, .completion = 500};

    backend_attempt_begin(b, at, BACKEND_PLAIN, &t);
    backend_attempt_success(b, at + ttft_ms, ttft_ms);
    (void)backend_attempt_finish(b, at + duration_ms, &t, &used);
}

#endif
