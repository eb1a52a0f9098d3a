/*
 * common/http_query.h: a backend url's own query and the client's.
 *
 * A backend's `url` may carry a query the host wants with every request
 * (Azure OpenAI's `api-version=2024-10-21`, a `key=` some hosts take in
 * place of a header). The client may send a query too. What goes upstream
 * is the backend's query as written, then the client's parameters that
 * the backend's does not name, each as the client wrote it, in its order:
 * the operator's choice wins, as with the model and the key. Names are
 * compared percent-decoded and ASCII case-insensitively (`API-Version`,
 * `api%2Dversion` and `api-version` are one name to this rule), so a
 * client cannot slip a second value past the operator's.
 *
 * A query here is its text without the '?'. Nothing allocates; work is
 * linear in the two queries' lengths times the backend's few parameters.
 */
#ifndef COMMON_HTTP_QUERY_H
#define COMMON_HTTP_QUERY_H

#include <stddef.h>

#include "common/slice.h"

struct buf;

/* Is there a percent-escape ("%" and two hex digits, either case) at
 * s.p[i] (i < s.len)? 1 and its byte in *byte, else 0 (*byte untouched). */
int http_percent_at(struct slice s, size_t i, unsigned char *byte);

/* One parameter of a query, pointing into it. */
struct http_query_param {
    struct slice all;   /* "name=value" (or "name") as written */
    struct slice name;  /* before the first '=' */
    struct slice value; /* after it; empty when there is none */
};

/* The next non-empty parameter of *rest ("a=1&&b", no '?'): 1 and *p set,
 * *rest moved past it; 0 at the end. Empty pieces ("&&") are skipped. */
int http_query_next(struct slice *rest, struct http_query_param *p);

/* Are two parameter names one name: equal once percent-decoded, ASCII
 * case-insensitively? A malformed escape compares as its bytes. */
int http_query_name_eq(struct slice a, struct slice b);

/* Is `q` (no '?') fit to go with every request: not empty, no empty
 * parameter ("&&", a '&' at an end), none without a name ("=x"), only
 * bytes RFC 3986 allows in a query, each '%' followed by two hex digits?
 * NULL when it is, else a message that does not quote q (it may hold a
 * key). */
const char *http_query_check(const char *q);

/* Append what goes after the path upstream: with no `own` (NULL) the
 * client's query (its '?' included) but for its empty parameters ("&&",
 * a '&' at an end: every form decoder skips them), nothing when it has
 * no other; else '?', `own`, then '&' and each non-empty parameter of the
 * client's whose name `own` does not hold. The client's bytes that no
 * request line may hold (a TAB, a form feed, non-ASCII: llhttp lets them
 * in) go percent-encoded. Returns 0 or -ENOMEM. */
int http_query_merge(struct buf *out, const char *own, struct slice client);

/* Write the client's query `q` (its '?' included, as sent) to `out` in
 * the normal form of RFC 3986 6.2.2, for a cache key: an escape of an
 * unreserved character (ALPHA, DIGIT, '-', '.', '_', '~') decoded, the
 * hex of every other escape in capitals, the bytes http_query_merge
 * escapes escaped as it does, a '%' that starts no escape as "%%"; all
 * else as it is. So two queries a backend must read alike (`%41`, `A`;
 * `%2f`, `%2F`) are written alike, and no others; its empty parameters are
 * left out, as http_query_merge leaves them. With `out` NULL only count.
 * Returns the length written, at most 3 x q.len. */
size_t http_query_normal(char *out, struct slice q);

#endif
