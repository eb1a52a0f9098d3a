/*
 * common/slice.h: a borrowed run of bytes, not NUL-terminated.
 *
 * A slice never owns its memory: whoever made it says how long `p` stays
 * valid (for llhttp fields, until the read buffer is consumed).
 */
#ifndef COMMON_SLICE_H
#define COMMON_SLICE_H

#include <stddef.h>
#include <string.h>
#include <strings.h>

struct slice {
    const char *p; /* first byte, or NULL for the empty slice */
    size_t len;    /* number of bytes */
};

#define SLICE_LIT(s) ((struct slice){(s), sizeof(s) - 1})

static inline struct slice slice_from(const char *s)
{
    return (struct slice){s, s ? strlen(s) : 0};
}

static inline int slice_eq(struct slice a, const char *lit)
{
    size_t n = strlen(lit);
    return a.len == n && (n == 0 || memcmp(a.p, lit, n) == 0);
}

/* ASCII case-insensitive compare, for header names. */
static inline int slice_caseeq(struct slice a, const char *lit)
{
    size_t n = strlen(lit);
    return a.len == n && (n == 0 || strncasecmp(a.p, lit, n) == 0);
}

/* Is `a` one of the `n` lowercase names (ASCII case-insensitive)? */
static inline int slice_caseeq_any(struct slice a, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (slice_caseeq(a, names[i]))
            return 1;
    return 0;
}

#endif
