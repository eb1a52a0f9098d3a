/*
 * router/deadline.c: a timeout that moves at every phase of every request
 * (a client's idle, header and body waits; an upstream's connect, first
 * byte, total and idle times) without restarting a libuv timer each time.
 *
 * uv_timer_start and uv_timer_stop reorder the loop's timer heap; at four
 * to seven phase changes per request that was ~4% of the router's CPU.
 * Here a later deadline only updates a number: the timer fires at the
 * earlier time, sees the deadline has moved, and waits for the rest. Only
 * a deadline earlier than the timer's re-arms it. Clearing the deadline
 * leaves the timer to fire once for nothing.
 */
#include "common/util.h" /* before uv.h: sys/param.h redefines MIN/MAX silently */
#include "router/internal.h"

static void deadline_fired(uv_timer_t *t)
{
    struct router__deadline *d = container_of(t, struct router__deadline, timer);
    uint64_t now = uv_now(t->loop);

    d->due = 0;
    if (d->at == 0)
        return;
    if (now < d->at) {
        d->due = d->at;
        uv_timer_start(&d->timer, deadline_fired, d->at - now, 0);
        return;
    }
    d->at = 0;
    d->on_expire(d->timer.data);
}

void router__deadline_init(uv_loop_t *loop, struct router__deadline *d, void *owner,
                           void (*on_expire)(void *owner))
{
    uv_timer_init(loop, &d->timer);
    d->timer.data = owner;
    d->on_expire = on_expire;
    d->at = d->due = 0;
}

void router__deadline_set(struct router__deadline *d, int ms)
{
    if (ms <= 0) {
        d->at = 0;
        return;
    }
    d->at = uv_now(d->timer.loop) + (uint64_t)ms;
    if (d->due == 0 || d->due > d->at) {
        d->due = d->at;
        uv_timer_start(&d->timer, deadline_fired, (uint64_t)ms, 0);
    }
}
