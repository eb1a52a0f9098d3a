/*
 * common/http_hop.h: the headers a Connection header names.
 *
 * RFC 9110 7.6.1: a sender lists in Connection the header fields that
 * describe only this hop ("Connection: keep-alive, X-Hop" makes X-Hop
 * hop-by-hop), and a proxy must drop them along with Connection itself.
 * The router does so both ways: for a client's headers before they go to
 * a backend, and for a backend's before they go to the client.
 *
 * Header blocks here are the router's own "Name: value\r\n" lines
 * (buf_append_header), already parsed by llhttp. Work is bounded and
 * allocates nothing: up to HTTP_HOP_NAMES_MAX names are kept exactly; the
 * rest of a longer list only as bits of a small hash set, so a header
 * whose name shares a bit with one of them is dropped too. That errs
 * towards dropping: a listed header is never forwarded.
 */
#ifndef COMMON_HTTP_HOP_H
#define COMMON_HTTP_HOP_H

#include <stddef.h>
#include <stdint.h>

#include "common/slice.h"

#define HTTP_HOP_NAMES_MAX 16 /* names kept exactly; real lists have one or two */

struct http_hop_names {
    struct slice name[HTTP_HOP_NAMES_MAX]; /* listed names, borrowed from the Connection value */
    unsigned n;                            /* entries in name */
    uint64_t more;                         /* past the array: one bit per name hash */
};

/* Add the names of one Connection value (a comma-separated list) to h.
 * Names every proxy drops anyway (keep-alive, close) are skipped. The
 * value must outlive h. */
void http_hop_names_add(struct http_hop_names *h, struct slice value);
/* Does h name `name` (ASCII case-insensitive)? */
int http_hop_names_has(const struct http_hop_names *h, struct slice name);
/* Add the values of every Connection line of the header block [p, p+len)
 * to h. */
void http_hop_names_scan(struct http_hop_names *h, const char *p, size_t len);
/* Copy the lines of the header block [p, p+len) to dst, leaving out
 * Connection, the lines h names and any named `also` (empty: none). dst
 * has room for len bytes; it may be p itself (lines only move towards the
 * start), but then h must not borrow from that block. Returns the bytes
 * written. */
size_t http_hop_filter(char *dst, const char *p, size_t len, const struct http_hop_names *h,
                       struct slice also);

#endif
