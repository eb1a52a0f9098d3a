/*
 * common/buf.h: a growable byte buffer with a read cursor.
 *
 * Used for request bodies, response bodies kept for usage parsing and
 * outgoing bytes. Growth doubles, so appending n bytes costs amortized O(n)
 * and no allocation per byte.
 */
#ifndef COMMON_BUF_H
#define COMMON_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/slice.h"

struct buf {
    char *data;  /* heap block, or NULL while empty */
    size_t len;  /* bytes written */
    size_t cap;  /* bytes allocated */
};

/* Make room for `extra` more bytes. Returns 0 or -ENOMEM. */
int buf_reserve(struct buf *b, size_t extra) __attribute__((warn_unused_result));
int buf__append_grow(struct buf *b, const void *p, size_t n) __attribute__((warn_unused_result));
/* Append bytes. Returns 0 or -ENOMEM. Inline while there is room: the
 * cost log and the response heads are built from dozens of short appends
 * a request, most of literals whose copy the compiler then unrolls. */
__attribute__((warn_unused_result)) static inline int buf_append(struct buf *b, const void *p,
                                                                 size_t n)
{
    if (n == 0)
        return 0;
    if (n > b->cap - b->len)
        return buf__append_grow(b, p, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}
/* Append the header line "name: value\r\n" (the hot path's most
 * frequent format, without printf). Returns 0 or -ENOMEM. */
int buf_append_header(struct buf *b, struct slice name, struct slice value)
    __attribute__((warn_unused_result));
/* Append the decimal digits of v. Returns 0 or -ENOMEM. */
int buf_append_u64(struct buf *b, uint64_t v) __attribute__((warn_unused_result));
/* Append a string literal, its length counted by the compiler. */
#define buf_append_lit(b, lit) buf_append((b), "" lit, sizeof(lit) - 1)
/* Append printf-formatted text. Returns 0, -ENOMEM or -EINVAL. */
int buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drop the first n bytes, keeping the rest. */
void buf_consume(struct buf *b, size_t n);
/* Overwrite every occurrence of the n bytes at `needle` with as many
 * `with` bytes, in place (the length stays). Returns how many were found.
 * For blanking a secret out of bytes held before they go out. */
size_t buf_mask(struct buf *b, const char *needle, size_t n, char with);
/* Forget the contents but keep the memory. */
static inline void buf_reset(struct buf *b) { b->len = 0; }
/* Free the memory. */
void buf_free(struct buf *b);
/* Forget the contents and keep the memory for the next use, unless it grew
 * beyond `keep` bytes: one large request should not stay allocated. */
static inline void buf_recycle(struct buf *b, size_t keep)
{
    if (b->cap > keep)
        buf_free(b);
    else
        buf_reset(b);
}
/* In a buffer of NUL-terminated name and value strings one after the
 * other ("name\0value\0..."), the value of the first pair named `name`,
 * or NULL. */
const char *buf_pairs_get(const struct buf *b, const char *name);

#endif
