/*
 * cache/flight.c: single flight. Concurrent identical cache misses within
 * one instance collapse into one upstream call: a table keyed by cache key
 * holds, per key in flight, the list of followers waiting for the leader.
 * Followers embed their waiter, so joining allocates only for a leader.
 */
#include <errno.h>
#include <stdlib.h>

#include "cache/internal.h"

struct cache_flight {
    struct cache__map keys; /* sha256 -> struct flight_entry */
};

struct flight_entry {
    struct cache__map_entry *slot;      /* ours in keys */
    struct cache_flight_waiter *head;   /* followers, in arrival order */
    struct cache_flight_waiter *tail;   /* last follower */
};

struct cache_flight *cache_flight_create(void)
{
    return calloc(1, sizeof(struct cache_flight));
}

void cache_flight_free(struct cache_flight *f)
{
    if (f == NULL)
        return;
    cache__map_free(&f->keys, free);
    free(f);
}

size_t cache_flight_count(const struct cache_flight *f)
{
    return f->keys.count;
}

int cache_flight_join(struct cache_flight *f, const struct cache_key *key,
                      struct cache_flight_waiter *w, cache_flight_cb *cb, void *arg)
{
    struct cache__map_entry *s = cache__map_find(&f->keys, key->sha256, sizeof(key->sha256));
    struct flight_entry *e;

    if (s == NULL) {
        e = calloc(1, sizeof(*e));
        if (e == NULL)
            return -ENOMEM;
        s = cache__map_add(&f->keys, key->sha256, sizeof(key->sha256));
        if (s == NULL) {
            free(e);
            return -ENOMEM;
        }
        s->value = e;
        e->slot = s;
        return CACHE_FLIGHT_LEADER;
    }
    e = s->value;
    w->_entry = e;
    w->_cb = cb;
    w->_arg = arg;
    w->_next = NULL;
    w->_prev = e->tail;
    if (e->tail)
        e->tail->_next = w;
    else
        e->head = w;
    e->tail = w;
    return CACHE_FLIGHT_FOLLOWER;
}

void cache_flight_finish(struct cache_flight *f, const struct cache_key *key, const char *value,
                         size_t len, const void *why)
{
    struct cache__map_entry *s = cache__map_find(&f->keys, key->sha256, sizeof(key->sha256));
    struct flight_entry *e;
    struct cache_flight_waiter *w;

    if (s == NULL)
        return;
    e = s->value;
    w = e->head;
    /* Unlink first: a follower told to go upstream may join this key again
     * and must become the new leader. */
    cache__map_del(&f->keys, s);
    free(e);
    while (w != NULL) {
        struct cache_flight_waiter *next = w->_next;
        w->_entry = NULL;
        w->_next = w->_prev = NULL;
        w->_cb(w->_arg, value, len, why); /* may free w */
        w = next;
    }
}

void cache_flight_leave(struct cache_flight *f, struct cache_flight_waiter *w)
{
    struct flight_entry *e = w->_entry;

    if (e == NULL)
        return;
    if (w->_prev)
        w->_prev->_next = w->_next;
    else
        e->head = w->_next;
    if (w->_next)
        w->_next->_prev = w->_prev;
    else
        e->tail = w->_prev;
    w->_entry = NULL;
    w->_next = w->_prev = NULL;
}
