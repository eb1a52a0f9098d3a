/* common/buf.c: growable byte buffer (see buf.h). */
#define _GNU_SOURCE /* memmem */
#include "common/buf.h"
#include "common/fmt.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int buf_reserve(struct buf *b, size_t extra)
{
    size_t need = b->len + extra, cap;
    char *p;

    if (need <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    p = realloc(b->data, cap);
    if (p == NULL)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

/* buf_append's way when the room runs out (buf.h). */
int buf__append_grow(struct buf *b, const void *p, size_t n)
{
    if (buf_reserve(b, n) != 0)
        return -ENOMEM;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

int buf_append_u64(struct buf *b, uint64_t v)
{
    char tmp[FMT_U64_MAX], *p = fmt_u64(tmp + sizeof(tmp), v);

    return buf_append(b, p, (size_t)(tmp + sizeof(tmp) - p));
}

int buf_append_header(struct buf *b, struct slice name, struct slice value)
{
    char *p;

    if (buf_reserve(b, name.len + value.len + 4) != 0)
        return -ENOMEM;
    p = b->data + b->len;
    memcpy(p, name.p, name.len);
    p += name.len;
    *p++ = ':';
    *p++ = ' ';
    if (value.len)
        memcpy(p, value.p, value.len);
    p += value.len;
    *p++ = '\r';
    *p++ = '\n';
    b->len = (size_t)(p - b->data);
    return 0;
}

int buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    size_t room;
    int n;

    /* Format straight into the spare room; only a miss formats twice. */
    if (buf_reserve(b, 64) != 0)
        return -ENOMEM;
    room = b->cap - b->len;
    va_start(ap, fmt);
    n = vsnprintf(b->data + b->len, room, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -EINVAL;
    if ((size_t)n >= room) {
        if (buf_reserve(b, (size_t)n + 1) != 0)
            return -ENOMEM;
        va_start(ap, fmt);
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
    return 0;
}

void buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

size_t buf_mask(struct buf *b, const char *needle, size_t n, char with)
{
    size_t found = 0, off = 0;
    char *at;

    if (n == 0)
        return 0;
    while (off < b->len && (at = memmem(b->data + off, b->len - off, needle, n)) != NULL) {
        memset(at, with, n);
        off = (size_t)(at - b->data) + n;
        found++;
    }
    return found;
}

void buf_free(struct buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

const char *buf_pairs_get(const struct buf *b, const char *name)
{
    const char *p = b->data, *end = p + b->len;

    while (p < end) {
        const char *value = p + strlen(p) + 1;
        if (value >= end)
            break;
        if (strcmp(p, name) == 0)
            return value;
        p = value + strlen(value) + 1;
    }
    return NULL;
}
