/*
 * cache/map.c: a small chained hash map over byte-string keys, used for the
 * in-process tenants and cache entries, the journal's aggregation and the
 * single-flight table. Doubles its buckets past a load factor of 1.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "cache/internal.h"

static int map_grow(struct cache__map *m)
{
    size_t n = m->nbuckets ? m->nbuckets * 2 : 16;
    struct cache__map_entry **b = calloc(n, sizeof(*b));

    if (b == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < m->nbuckets; i++) {
        struct cache__map_entry *e = m->buckets[i], *next;
        for (; e != NULL; e = next) {
            next = e->next;
            e->next = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = n;
    return 0;
}

struct cache__map_entry *cache__map_find(const struct cache__map *m, const void *key, size_t len)
{
    uint64_t h;

    if (m->nbuckets == 0)
        return NULL;
    h = XXH3_64bits(key, len);
    for (struct cache__map_entry *e = m->buckets[h & (m->nbuckets - 1)]; e; e = e->next)
        if (e->hash == h && e->klen == len && memcmp(e->key, key, len) == 0)
            return e;
    return NULL;
}

struct cache__map_entry *cache__map_add(struct cache__map *m, const void *key, size_t len)
{
    struct cache__map_entry *e;
    size_t i;

    if (m->count >= m->nbuckets && map_grow(m) < 0)
        return NULL;
    e = malloc(sizeof(*e) + len + 1);
    if (e == NULL)
        return NULL;
    e->hash = XXH3_64bits(key, len);
    e->value = NULL;
    e->klen = len;
    memcpy(e->key, key, len);
    e->key[len] = '\0';
    i = e->hash & (m->nbuckets - 1);
    e->next = m->buckets[i];
    m->buckets[i] = e;
    m->count++;
    return e;
}

void cache__map_del(struct cache__map *m, struct cache__map_entry *e)
{
    struct cache__map_entry **p = &m->buckets[e->hash & (m->nbuckets - 1)];

    while (*p != e)
        p = &(*p)->next;
    *p = e->next;
    m->count--;
    free(e);
}

void cache__map_free(struct cache__map *m, void (*free_value)(void *))
{
    for (size_t i = 0; i < m->nbuckets; i++) {
        struct cache__map_entry *e = m->buckets[i], *next;
        for (; e != NULL; e = next) {
            next = e->next;
            if (free_value)
                free_value(e->value);
            free(e);
        }
    }
    free(m->buckets);
    m->buckets = NULL;
    m->nbuckets = 0;
    m->count = 0;
}
