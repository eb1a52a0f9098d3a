/*
 * router/park.c: requests parked while the cost log is behind.
 *
 * Every /v1 request writes a cost log record when it ends (while the
 * log is behind, one refused at no cost is skipped instead: account.c).
 * When the log falls behind the disk (metrics_cost_log_behind:
 * cost_log_buffer_max bytes wait), a request that arrives is parked
 * before it starts: it is authenticated (so that its record names its
 * tenant) but holds no rate limit, no reservation and no upstream. Parked requests wait in one
 * list, in arrival order, and are resumed from its head when the log
 * calls back (back under half), answered 503 after cost_log_wait_ms, or
 * answered 503 at once when the router stops. The loop itself never
 * waits: /healthz, /metrics and the admin API (which write no record)
 * keep answering, and requests in flight finish and write theirs.
 *
 * A parked client is busy, so its next request is not read (pipelined
 * bytes wait, up to ROUTER_PENDING_MAX): what parking holds is bounded by
 * the connections. Parking and resuming are O(1) per request; a resume
 * walks the list once.
 */
#include <stdio.h>

#include "common/error.h"
#include "conf/conf.h"
#include "metrics/metrics.h"
#include "router/internal.h"

static void park_unlink(struct router__client *c)
{
    struct router__shared *sh = c->router->shared;

    if (c->park_prev)
        c->park_prev->park_next = c->park_next;
    else
        sh->parked_head = c->park_next;
    if (c->park_next)
        c->park_next->park_prev = c->park_prev;
    else
        sh->parked_tail = c->park_prev;
    c->park_next = c->park_prev = NULL;
    c->parked = 0;
}

/* 503, Retry-After (error map): the request was not started, so nothing
 * was charged; another instance, or this one a moment later, can take it. */
static void park_refuse(struct router__client *c, const char *why)
{
    park_unlink(c);
    router__send_error(c, error_cost_log_behind, why);
}

int router__park(struct router__client *c)
{
    struct router__shared *sh = c->router->shared;

    /* Behind the ones already parked too, so that they go first. */
    if (sh->cost_log == NULL ||
        (sh->parked_head == NULL && !metrics_cost_log_behind(sh->cost_log)))
        return 0;
    metrics_add(sh->metrics, METRICS_COST_LOG_PARKED_TOTAL, NULL, 1);
    if (sh->stopping) { /* a pipelined request after the stop */
        router__send_error(c, error_cost_log_behind, "the router is stopping");
        return 1;
    }
    c->parked = 1;
    c->park_prev = sh->parked_tail;
    if (sh->parked_tail)
        sh->parked_tail->park_next = c;
    else
        sh->parked_head = c;
    sh->parked_tail = c;
    router__deadline_set(&c->timeout, c->router->conf->cost_log_wait_ms);
    return 1;
}

void router__park_remove(struct router__client *c)
{
    if (c->parked)
        park_unlink(c);
}

void router__park_expire(struct router__client *c)
{
    char why[64];

    snprintf(why, sizeof(why), "waited %d ms (cost_log_wait_ms)", c->router->conf->cost_log_wait_ms);
    park_refuse(c, why);
}

void router__park_resume(void *arg)
{
    struct router__shared *sh = arg;
    struct router__client *c;

    /* A resumed request may answer at once and write its record, which
     * may put the log behind again: the rest then wait for the next call. */
    while ((c = sh->parked_head) != NULL && !metrics_cost_log_behind(sh->cost_log)) {
        park_unlink(c);
        router__deadline_set(&c->timeout, 0);
        router__handle_resume(c);
    }
}

void router__park_refuse_all(struct router__shared *sh)
{
    while (sh->parked_head != NULL)
        park_refuse(sh->parked_head, "the router is stopping");
}
