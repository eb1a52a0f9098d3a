/*
 * backends/internal.h: the backend struct and helpers shared by the files
 * of backends/ (backend.c: health; cost.c: load, cost and accounting).
 */
#ifndef BACKENDS_INTERNAL_H
#define BACKENDS_INTERNAL_H

#include <stdint.h>

#include "backends/backend.h"

/* A self-hosted pool's accounting clock. The pool is a thing of the
 * world, not of a config: a reload that has a pool a live config has (by
 * its name, or renamed at the same url: see backend_set_create_after)
 * shares its clock with the configs before, whose requests may still run
 * on it, so the replica time they use is neither idle for the new config
 * nor theirs alone. Its replicas and price are the newest config's from the
 * reload on, for the old config's requests too; the sums in USD price
 * each stretch of time as it passes, so a new price bills from the reload
 * on and not before. */
struct backend_clock {
    unsigned refs;                   /* backends (of every live config) on it */
    const struct backend *params;    /* the newest config's backend on it, whose replicas
                                        and price run the clock; NULL once that config is
                                        gone: each caller's own */
    unsigned inflight;               /* attempts in flight on the pool, of every config */
    unsigned chosen;                 /* requests chosen for the pool whose attempt has not
                                        begun yet (their hold is being made): load for
                                        routing, not for accounting */
    unsigned started:1;              /* running */
    uint64_t start_ms;               /* loop time the pool's cost period began */
    uint64_t at_ms;                  /* loop time the sums below run to */
    double share_ms;                 /* integral of min(1, replicas/inflight) dt while busy:
                                        GPU-ms one request in flight was attributed */
    double idle_ms;                  /* integral of replicas - min(inflight, replicas) dt,
                                        plus the share of attempts that billed nothing */
    double share_usd;                /* share_ms priced as it passed: USD one request in
                                        flight was attributed */
    double idle_usd;                 /* idle_ms priced as it passed */
    double pool_usd;                 /* replicas x price dt: the pool's whole cost */
};

/* Time to first token of one kind of answer (enum backend_answer). */
struct backend_latency {
    double ewma_ms;                  /* smoothed */
    uint64_t at_ms;                  /* loop time of the last sample */
    unsigned measured:1;             /* a sample came: the average means something */
    unsigned probing:1;              /* latency probe in flight: one request measuring an
                                        average stale or never measured */
    uint64_t probes;                 /* latency probes started: the current one's number */
};

struct backend {
    const struct conf_backend *conf; /* borrowed from the config */
    struct backend_clock *clock;     /* accounting clock, maybe shared (see above) */
    unsigned inflight;               /* this config's attempts started, not ended */
    unsigned failures;               /* consecutive failures */
    uint64_t ejected_until_ms;       /* circuit open until this loop time */
    uint64_t cooldown_until_ms;      /* rate limited (429) until this loop time */
    unsigned probing:1;              /* half-open probe in flight */
    uint64_t probes;                 /* half-open probes started: the current one's number */
    struct backend_latency ttft[BACKEND_ANSWER_KINDS]; /* of plain answers, of streams */
    double duration_ewma_ms;         /* smoothed duration of attempts that made tokens */
    /* tokens/s window: slot i holds the tokens of second window_sec[i] */
    uint64_t window_sec[BACKEND_WINDOW_S]; /* which second the slot counts */
    int64_t window_tokens[BACKEND_WINDOW_S]; /* generated tokens in that second */
};

/* Move b's accounting clock to `now_ms` with its current in-flight count
 * (starting it if needed). Times earlier than the clock count as the
 * clock's time: loop time never goes back, but callers may pass a stale
 * value. */
void backend__advance(struct backend *b, uint64_t now_ms);

/* The attempt begun with `t` (may be NULL: none) is over without a
 * latency sample: if it is its kind's latency probe, still the current
 * one, the next attempt of that kind may measure. */
void backend__ttft_probe_over(struct backend *b, const struct backend_ticket *t);

/* Fold `sample` into the moving average *avg (0 = no sample yet). */
void backend__ewma(double *avg, double sample);

/* The TTFT average of `kind` routing should count on at `now_ms`: 0
 * ("unknown") while a latency probe is due (see backend.c), else the
 * average. */
double backend__ttft_ms(const struct backend *b, uint64_t now_ms, enum backend_answer kind);

/* Replicas of a self-hosted pool (at least 1), 0 for an API backend:
 * of a backend, or of the config entry it is (or will be) made from. */
int backend__replicas(const struct backend *b);
int backend__conf_replicas(const struct conf_backend *c);

#endif
