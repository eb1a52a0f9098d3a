/*
 * common/fmt.h: numbers as text without printf, for what runs on every
 * request (cost log lines, response and upstream headers, chunk sizes,
 * Redis arguments), where snprintf's format parsing cost more than the
 * digits.
 */
#ifndef COMMON_FMT_H
#define COMMON_FMT_H

#include <stddef.h>
#include <stdint.h>

#define FMT_U64_MAX 20 /* decimal digits of the largest uint64_t */

/* The decimal digits of v, written to end just before `end`; returns
 * where they start (at most FMT_U64_MAX bytes before `end`). */
static inline char *fmt_u64(char *end, uint64_t v)
{
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    return end;
}

/* v in lower-case hex at `out`, without leading zeros (at most 16
 * digits); returns how many were written. */
static inline size_t fmt_hex(char *out, uint64_t v)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[16], *p = tmp + sizeof(tmp);
    size_t n;

    do {
        *--p = digits[v & 15];
        v >>= 4;
    } while (v != 0);
    n = (size_t)(tmp + sizeof(tmp) - p);
    for (size_t i = 0; i < n; i++)
        out[i] = p[i];
    return n;
}

/* The value of hex digit `c` (either case), or -1: fmt_hex's inverse, for
 * the hex the config and URLs carry. */
static inline int fmt_hex_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20; /* ASCII lower case */
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

#endif
