/*
 * backends/backend.c: live backend state, circuit breaking and latency
 * probes.
 *
 * The TTFT average has the same blind spot as an open circuit: it learns
 * only from requests sent to the backend, and policy/ sends none to a
 * backend whose average breaks the tenant's SLO. After one slow spell a
 * backend could be shut out of SLO traffic for good, fast again or not.
 * So an average older than the backend's ttft_stale_ms is treated like a
 * half-open circuit: the next request may go there as if the TTFT were
 * unknown (a latency probe), one at a time so that a burst does not all
 * land on a backend that may still be slow, and the probe's sample
 * replaces the stale average instead of being blended into it (one fast
 * sample would barely move an old slow average, and the backend would
 * wait another interval per step down). A backend never measured is
 * treated the same way: its 0 ms is no prediction, and one request at a
 * time measures it.
 */
#include "backends/backend.h"

#include <stdlib.h>
#include <string.h>

#include "backends/internal.h"
#include "common/log.h"
#include "conf/conf.h"

/* Consecutive failures that open the circuit, and how long it stays open
 * before a half-open probe is allowed. */
#define BACKEND_FAILURE_LIMIT 3
#define BACKEND_EJECT_MS 5000
/* What to tell clients to wait while a half-open probe is out. */
#define BACKEND_PROBE_WAIT_MS 1000
/* Weight of a new sample in the moving averages (TTFT, duration). */
#define BACKEND_TTFT_ALPHA 0.2

/* Every live config's backend set, newest first, one list that each set
 * shares with the one it was made after: a pool that a config removed
 * and the next one has again (or one renamed) is found there while a
 * config that had it still runs requests on it, even when the config
 * just before does not have it. Walked at a reload, never per request. */
struct backend_sets {
    unsigned refs;            /* sets on it */
    struct backend_set *head; /* the newest */
};

struct backend_set {
    struct backend_sets *live; /* every live set (shared) */
    struct backend_set *older; /* the next one on that list */
    size_t count;              /* number of backends */
    struct backend items[];    /* one per conf.backends entry, same order */
};

static int same_text(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* Does `conf` have a self-hosted pool named `name`, or (`name` NULL)
 * another than `c` at `c`'s url? A scan: at a reload only. */
static int has_pool(const struct conf *conf, const char *name, const struct conf_backend *c)
{
    for (size_t i = 0; i < conf->nbackends; i++) {
        const struct conf_backend *o = &conf->backends[i];

        if (o->kind == CONF_BACKEND_SELF_HOSTED &&
            (name != NULL ? strcmp(o->name, name) == 0 : o != c && same_text(o->url, c->url)))
            return 1;
    }
    return 0;
}

/* Has a backend of `set` before its n-th got `k`? */
static int claimed(const struct backend_set *set, size_t n, const struct backend_clock *k)
{
    for (size_t i = 0; i < n; i++)
        if (set->items[i].clock == k)
            return 1;
    return 0;
}

/* Is `o` (of a live set) the pool `c` (the n-th of `set`, of `conf`) by
 * its name (`by_name`), or by its url, renamed: at `c`'s url, under a
 * name `conf` no longer has? Not if an earlier backend of `set` has its
 * clock. The scans last, for the few that match. */
static int may_be(const struct backend *o, const struct backend_set *set, size_t n,
                  const struct conf *conf, const struct conf_backend *c, int by_name)
{
    if (o->conf->kind != CONF_BACKEND_SELF_HOSTED)
        return 0;
    if (by_name ? strcmp(o->conf->name, c->name) != 0
                : !same_text(o->conf->url, c->url) || has_pool(conf, o->conf->name, NULL))
        return 0;
    return !claimed(set, n, o->clock);
}

/* The clock of a live config's pool that the n-th backend of `set` (of
 * `conf`), a pool, is: the one of that name, newest config first (its
 * replicas, price and url may change: the clock's sums price each stretch
 * of time as it passed), else that of a pool renamed: the one clock at
 * its url under a name `conf` no longer has, when it is the only pool of
 * `conf` there. The same url is the same servers, so the same replicas
 * paid for (README, Signals); with two clocks that could be it, or two
 * pools of `conf` at that url, which is which would be a guess: none.
 * NULL: a pool new to the process. */
static struct backend_clock *pool_clock(const struct backend_set *set, size_t n,
                                        const struct conf *conf)
{
    const struct conf_backend *c = &conf->backends[n];
    struct backend_clock *renamed = NULL;

    for (const struct backend_set *s = set->live->head; s != NULL; s = s->older)
        for (size_t i = 0; s != set && i < s->count; i++)
            if (may_be(&s->items[i], set, n, conf, c, 1))
                return s->items[i].clock;
    if (c->url == NULL || has_pool(conf, NULL, c))
        return NULL;
    for (const struct backend_set *s = set->live->head; s != NULL; s = s->older)
        for (size_t i = 0; s != set && i < s->count; i++)
            if (may_be(&s->items[i], set, n, conf, c, 0)) {
                if (renamed != NULL && renamed != s->items[i].clock)
                    return NULL;
                renamed = s->items[i].clock;
            }
    return renamed;
}

/* The clock of the n-th backend of `set` (of `conf`): a pool's of a live
 * config (pool_clock), else new. NULL when out of memory. */
static struct backend_clock *clock_for(const struct backend_set *set, size_t n,
                                       const struct conf *conf)
{
    struct backend_clock *k = NULL;

    if (conf->backends[n].kind == CONF_BACKEND_SELF_HOSTED)
        k = pool_clock(set, n, conf);
    if (k == NULL && (k = calloc(1, sizeof(*k))) == NULL)
        return NULL;
    k->refs++;
    return k;
}

/* The backend of the config before that `to` is: the one of its name,
 * else, for a pool renamed at its url, the one whose clock it took
 * (pool_clock: the same url is the same servers). NULL: none. */
static const struct backend *previous_self(const struct backend *to,
                                           const struct backend_set *prev)
{
    for (size_t i = 0; prev != NULL && i < prev->count; i++)
        if (strcmp(prev->items[i].conf->name, to->conf->name) == 0)
            return &prev->items[i];
    for (size_t i = 0; prev != NULL && to->conf->kind == CONF_BACKEND_SELF_HOSTED &&
                       i < prev->count; i++)
        if (prev->items[i].clock == to->clock)
            return &prev->items[i];
    return NULL;
}

/* What `to` was of the config before (previous_self) measured of its
 * upstream's latency, when it is the same upstream (url and model): the
 * TTFT averages of both kinds and the duration average. Forgotten, every
 * backend was new after any reload, and SLO traffic went by guesses until
 * each was measured again. Probes in flight stay the old config's. */
static void carry_latency(struct backend *to, const struct backend_set *prev)
{
    const struct conf_backend *c = to->conf;
    const struct backend *b = previous_self(to, prev);

    if (b == NULL || !same_text(b->conf->url, c->url) || !same_text(b->conf->model, c->model))
        return;
    for (int k = 0; k < BACKEND_ANSWER_KINDS; k++) {
        to->ttft[k] = b->ttft[k];
        to->ttft[k].probing = 0;
        to->ttft[k].probes = 0;
    }
    to->duration_ewma_ms = b->duration_ewma_ms;
}

struct backend_set *backend_set_create_after(const struct conf *conf, struct backend_set *prev)
{
    struct backend_set *set = calloc(1, sizeof(*set) + conf->nbackends * sizeof(struct backend));

    if (set == NULL)
        return NULL;
    set->live = prev != NULL ? prev->live : calloc(1, sizeof(*set->live));
    if (set->live == NULL) {
        free(set);
        return NULL;
    }
    set->live->refs++;
    set->older = set->live->head;
    set->live->head = set;
    set->count = conf->nbackends;
    for (size_t i = 0; i < conf->nbackends; i++) {
        set->items[i].conf = &conf->backends[i];
        if ((set->items[i].clock = clock_for(set, i, conf)) == NULL) {
            backend_set_destroy(set);
            return NULL;
        }
        if (set->items[i].clock->refs == 1)
            set->items[i].clock->params = &set->items[i]; /* its own */
        carry_latency(&set->items[i], prev);
    }
    return set;
}

struct backend_set *backend_set_create(const struct conf *conf)
{
    return backend_set_create_after(conf, NULL);
}

void backend_set_destroy(struct backend_set *set)
{
    struct backend_set **pp;

    if (set == NULL)
        return;
    for (size_t i = 0; i < set->count; i++) {
        struct backend_clock *k = set->items[i].clock;

        if (k == NULL)
            continue;
        if (k->params == &set->items[i])
            k->params = NULL;
        if (--k->refs == 0)
            free(k);
    }
    for (pp = &set->live->head; *pp != NULL && *pp != set; pp = &(*pp)->older)
        ;
    if (*pp != NULL)
        *pp = set->older;
    if (--set->live->refs == 0)
        free(set->live);
    free(set);
}

int backend_same_clock(const struct backend *a, const struct backend *b)
{
    return a->clock == b->clock;
}

void backend_set_start(struct backend_set *set, uint64_t now_ms)
{
    for (size_t i = 0; i < set->count; i++) {
        backend__advance(&set->items[i], now_ms); /* at the params it had until now */
        set->items[i].clock->params = &set->items[i];
    }
}

size_t backend_set_count(const struct backend_set *set)
{
    return set->count;
}

struct backend *backend_set_get(struct backend_set *set, size_t index)
{
    return index < set->count ? &set->items[index] : NULL;
}

const struct conf_backend *backend_conf(const struct backend *b)
{
    return b->conf;
}

static int circuit_open(const struct backend *b, uint64_t now_ms)
{
    return b->failures >= BACKEND_FAILURE_LIMIT && now_ms < b->ejected_until_ms;
}

static int circuit_half_open(const struct backend *b, uint64_t now_ms)
{
    return b->failures >= BACKEND_FAILURE_LIMIT && now_ms >= b->ejected_until_ms;
}

int backend_available(const struct backend *b, uint64_t now_ms)
{
    if (circuit_open(b, now_ms))
        return 0;
    if (circuit_half_open(b, now_ms))
        return !b->probing;
    return 1;
}

int backend_probe_due(const struct backend *b, uint64_t now_ms, int latency)
{
    return (circuit_half_open(b, now_ms) && !b->probing) ||
           (latency >= 0 && backend_latency_probe_due(b, now_ms, (enum backend_answer)latency));
}

uint64_t backend_unavailable_ms(const struct backend *b, uint64_t now_ms)
{
    if (circuit_open(b, now_ms))
        return b->ejected_until_ms - now_ms;
    if (circuit_half_open(b, now_ms) && b->probing)
        return BACKEND_PROBE_WAIT_MS;
    return 0;
}

/* The latency state of `kind`'s answers. */
static const struct backend_latency *latency_of(const struct backend *b, enum backend_answer kind)
{
    return &b->ttft[kind == BACKEND_STREAM];
}

/* Is the average older than the backend's ttft_stale_ms (0: never)? One
 * never measured has no average to re-check (see below). */
static int ttft_stale(const struct backend *b, const struct backend_latency *l, uint64_t now_ms)
{
    int stale_ms = b->conf->ttft_stale_ms;

    return stale_ms > 0 && l->measured && now_ms >= l->at_ms + (uint64_t)stale_ms;
}

/* A backend never measured (new, or new to this config) is predicted at
 * 0 ms, which nothing backs: it is measured the way a stale average is,
 * by one request at a time, so that a burst of SLO traffic does not all
 * go to a backend that may be slow (backend_ttft_unknown). Each kind of
 * answer apart: a plain answer's first byte comes with its last token. */
int backend_latency_probe_due(const struct backend *b, uint64_t now_ms, enum backend_answer kind)
{
    const struct backend_latency *l = latency_of(b, kind);

    return (!l->measured || ttft_stale(b, l, now_ms)) && !l->probing;
}

int backend_ttft_unknown(const struct backend *b, enum backend_answer kind)
{
    const struct backend_latency *l = latency_of(b, kind);

    return !l->measured && l->probing;
}

double backend__ttft_ms(const struct backend *b, uint64_t now_ms, enum backend_answer kind)
{
    return backend_latency_probe_due(b, now_ms, kind) ? 0 : latency_of(b, kind)->ewma_ms;
}

void backend_attempt_start(struct backend *b, uint64_t now_ms, enum backend_answer kind)
{
    backend__advance(b, now_ms);
    b->inflight++;
    b->clock->inflight++;
    if (circuit_half_open(b, now_ms))
        b->probing = 1;
    if (backend_latency_probe_due(b, now_ms, kind))
        b->ttft[kind == BACKEND_STREAM].probing = 1;
}

void backend_attempt_answered(struct backend *b)
{
    if (b->failures >= BACKEND_FAILURE_LIMIT)
        log_info("backend %s: circuit closed after a successful probe", b->conf->name);
    b->failures = 0;
    b->probing = 0;
}

void backend_attempt_success(struct backend *b, uint64_t now_ms, uint64_t ttft_ms)
{
    backend_attempt_answered(b);
    backend_ttft_sample(b, now_ms, BACKEND_PLAIN, ttft_ms);
}

void backend_ttft_sample(struct backend *b, uint64_t now_ms, enum backend_answer kind,
                         uint64_t ttft_ms)
{
    struct backend_latency *l = &b->ttft[kind == BACKEND_STREAM];

    l->probing = 0;
    if (ttft_stale(b, l, now_ms))
        l->ewma_ms = 0; /* the fresh sample replaces the stale average */
    backend__ewma(&l->ewma_ms, (double)ttft_ms);
    l->at_ms = now_ms;
    l->measured = 1;
}

void backend__ewma(double *avg, double sample)
{
    if (*avg == 0)
        *avg = sample;
    else
        *avg += BACKEND_TTFT_ALPHA * (sample - *avg);
}

void backend_attempt_failure(struct backend *b, uint64_t now_ms, const struct backend_ticket *t)
{
    b->failures++;
    b->probing = 0;
    /* No sample: the next request of its kind may measure. Only its own
     * probe: the other kind's, or a later one of its kind, is still out,
     * and a second one would send a burst where nothing is measured. */
    backend__ttft_probe_over(b, t);
    if (b->failures >= BACKEND_FAILURE_LIMIT) {
        if (b->failures == BACKEND_FAILURE_LIMIT)
            log_warn("backend %s: %u consecutive failures, ejected for %d ms", b->conf->name,
                     b->failures, BACKEND_EJECT_MS);
        b->ejected_until_ms = now_ms + BACKEND_EJECT_MS;
    }
}

void backend_rate_limited(struct backend *b, uint64_t now_ms, int64_t retry_after_ms)
{
    uint64_t wait = retry_after_ms < 0                          ? BACKEND_COOLDOWN_DEFAULT_MS
                    : retry_after_ms > BACKEND_COOLDOWN_MAX_MS ? BACKEND_COOLDOWN_MAX_MS
                                                                : (uint64_t)retry_after_ms;

    /* "Retry-After: 0" asks for no wait; a wait inside the current one
     * changes nothing. So this logs at most once per cooldown. */
    if (wait == 0 || now_ms + wait <= b->cooldown_until_ms)
        return;
    if (b->cooldown_until_ms <= now_ms)
        log_info("backend %s: rate limited (429), passed over for %llu ms where another can serve",
                 b->conf->name, (unsigned long long)wait);
    b->cooldown_until_ms = now_ms + wait;
}

uint64_t backend_cooldown_ms(const struct backend *b, uint64_t now_ms)
{
    return b->cooldown_until_ms > now_ms ? b->cooldown_until_ms - now_ms : 0;
}

/* Without a time, the interval since the last event is left to be
 * counted with the new in-flight count; backend_attempt_finish is exact. */
void backend_attempt_end(struct backend *b)
{
    if (b->inflight > 0)
        b->inflight--;
    if (b->clock->inflight > 0)
        b->clock->inflight--;
}

void backend_chosen(struct backend *b)
{
    b->clock->chosen++;
}

void backend_unchosen(struct backend *b)
{
    if (b->clock->chosen > 0)
        b->clock->chosen--;
}

unsigned backend_inflight(const struct backend *b)
{
    return b->inflight;
}

double backend_ttft_ewma_ms(const struct backend *b, enum backend_answer kind)
{
    return latency_of(b, kind)->ewma_ms;
}

unsigned backend_consecutive_failures(const struct backend *b)
{
    return b->failures;
}

const char *backend_circuit_name(const struct backend *b, uint64_t now_ms)
{
    if (circuit_open(b, now_ms))
        return "open";
    if (circuit_half_open(b, now_ms))
        return "half-open";
    return "closed";
}
