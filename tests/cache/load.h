/*
 * tests/cache/load.h: a request-shaped load on the store for tests and the
 * benchmark: `chains` concurrent loops of begin -> settle(random real cost
 * up to the reserved amount), counting what was granted and charged.
 */
#ifndef TESTS_CACHE_LOAD_H
#define TESTS_CACHE_LOAD_H

#include <stdint.h>
#include <stdlib.h>

#include "cache/cache.h"

struct load {
    struct cache *c;        /* store under load */
    const char *tenant;     /* one tenant for all */
    int64_t amount;         /* reserved per request */
    int64_t day_limit;      /* passed to begin */
    long remaining;         /* begins still to start */
    int active;             /* chains running */
    int fixed_real;         /* settle exactly `amount` (else 1..amount) */
    int64_t charged;        /* sum of real costs passed to settle */
    long granted;           /* begins granted */
    long denied;            /* begins denied */
    long errors;            /* begins failed */
    long degraded;          /* granted from local counters */
    long settles_journaled; /* settles reported as journaled */
    unsigned seed;          /* rand_r state */
};

struct load_chain {
    struct load *l;                  /* owner */
    struct cache_reservation res;    /* current reservation */
};

static inline void load_next(struct load_chain *ch);

static inline void load_settled(void *arg, const char *err)
{
    struct load_chain *ch = arg;

    if (err)
        ch->l->settles_journaled++;
    load_next(ch);
}

static inline void load_begun(void *arg, const char *err, const struct cache_begin_result *r)
{
    struct load_chain *ch = arg;
    struct load *l = ch->l;
    int64_t real;

    if (err) {
        l->errors++;
    } else if (r->granted) {
        l->granted++;
        l->degraded += r->degraded;
        ch->res = r->reservation;
        real = l->fixed_real ? l->amount : 1 + rand_r(&l->seed) % l->amount;
        l->charged += real;
        if (cache_settle(l->c, &ch->res, real, load_settled, ch) != NULL)
            return;
        l->errors++;
    } else {
        l->denied++;
    }
    load_next(ch);
}

static inline void load_next(struct load_chain *ch)
{
    struct load *l = ch->l;

    if (l->remaining <= 0) {
        l->active--;
        return;
    }
    l->remaining--;
    if (cache_begin(l->c, l->tenant, NULL, l->amount, l->day_limit, 0, load_begun, ch) == NULL) {
        l->errors++;
        l->active--;
    }
}

/* Start `n` chains (array owned by the caller, alive until active == 0). */
static inline void load_start(struct load *l, struct load_chain *chains, int n)
{
    for (int i = 0; i < n; i++) {
        chains[i].l = l;
        l->active++;
        load_next(&chains[i]);
    }
}

#endif
