/*
 * router/jsonmem.c: where cJSON allocates a request body's tree.
 *
 * A 1 KB chat body parses into some sixty cJSON nodes and strings, each
 * its own malloc and, when the request ends, its own free: together about
 * 7% of the router's CPU per request. cJSON lets the process choose its
 * allocator (cJSON_InitHooks). Ours hands out memory from the request's
 * arena while that request's tree is built or changed (between
 * router__json_enter and router__json_leave), and from malloc otherwise,
 * so cJSON's other uses (admin answers, usage parsing, printing) are
 * untouched. Freeing a piece of the arena does nothing; the arena is
 * dropped with the tree, which is therefore changed only between enter and
 * leave: a node made outside would be leaked.
 *
 * The arena's first block is one of the request's buffers (req->json_mem),
 * so it is reused from request to request and shelved while the
 * connection is idle like the others; a body that needs more gets
 * overflow blocks, freed at the end of the request.
 */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>

#include "router/internal.h"

#define JSONMEM_ALIGN 16           /* what malloc guarantees, so cJSON sees no difference */
#define JSONMEM_BLOCK_MIN 16384    /* smallest overflow block */

struct router__jsonmem_block {
    struct router__jsonmem_block *next; /* older block */
    size_t used;                        /* bytes handed out */
    size_t cap;                         /* bytes in data */
    _Alignas(JSONMEM_ALIGN) char data[];
};

/* The request whose tree is being worked on. Thread-local: a thread other
 * than the loop's never allocates from a request. */
static __thread struct router__request *current;

static size_t align_up(size_t n)
{
    return (n + JSONMEM_ALIGN - 1) & ~(size_t)(JSONMEM_ALIGN - 1);
}

static void *arena_alloc(struct router__request *req, size_t n)
{
    struct buf *first = &req->json_mem;
    struct router__jsonmem_block *b = req->json_more;
    size_t at;

    n = align_up(n ? n : 1);
    at = align_up(first->len);
    if (first->data && at + n <= first->cap) {
        first->len = at + n;
        return first->data + at;
    }
    if (b == NULL || b->used + n > b->cap) {
        size_t cap = b ? 2 * b->cap : JSONMEM_BLOCK_MIN;
        if (cap < n)
            cap = n;
        b = malloc(sizeof(*b) + cap);
        if (b == NULL)
            return NULL;
        b->next = req->json_more;
        b->used = 0;
        b->cap = cap;
        req->json_more = b;
    }
    b->used += n;
    return b->data + b->used - n;
}

static int arena_owns(const struct router__request *req, const void *p)
{
    const char *c = p;

    if (req->json_mem.data && c >= req->json_mem.data && c < req->json_mem.data + req->json_mem.cap)
        return 1;
    for (const struct router__jsonmem_block *b = req->json_more; b; b = b->next)
        if (c >= b->data && c < b->data + b->cap)
            return 1;
    return 0;
}

static void *json_malloc(size_t n)
{
    return current ? arena_alloc(current, n) : malloc(n);
}

static void json_free(void *p)
{
    if (p != NULL && (current == NULL || !arena_owns(current, p)))
        free(p);
}

void router__json_install(void)
{
    cJSON_Hooks hooks = {.malloc_fn = json_malloc, .free_fn = json_free};

    cJSON_InitHooks(&hooks);
}

void router__json_enter(struct router__request *req)
{
    current = req;
}

void router__json_leave(void)
{
    current = NULL;
}

cJSON *router__json_parse(struct router__request *req)
{
    const char *body = req->body.data ? req->body.data : "", *end = NULL;

    /* Room for the tree of most bodies in one block (nodes are 64 bytes,
     * strings are copied); without it, overflow blocks serve. */
    if (buf_reserve(&req->json_mem, 2 * req->body.len + 4096) != 0)
        buf_free(&req->json_mem);

    router__json_enter(req);
    req->json = cJSON_ParseWithLengthOpts(body, req->body.len, &end, 0);
    router__json_leave();
    /* Text after the value (`{...} {...}`) is no JSON document: the
     * router would price the first value while the backend, forwarded
     * all of it, may read another or refuse. */
    while (req->json != NULL && end < body + req->body.len &&
           (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r'))
        end++;
    if (req->json != NULL && end != body + req->body.len)
        req->json = NULL; /* in the arena: dropped with it */
    return req->json;
}

void router__json_drop(struct router__request *req)
{
    /* No cJSON_Delete: the tree is parsed and changed (rewrite_body) only
     * between router__json_enter and router__json_leave, so all of it is
     * in the arena, and walking it to free nothing cost ~3% of a request. */
    req->json = NULL;
    buf_reset(&req->json_mem);
    while (req->json_more) {
        struct router__jsonmem_block *b = req->json_more;
        req->json_more = b->next;
        free(b);
    }
}
