/*
 * common/http_query.c: see http_query.h.
 */
#include "common/http_query.h"

#include <string.h>

#include "common/buf.h"

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if ((c | 32) >= 'a' && (c | 32) <= 'f')
        return (c | 32) - 'a' + 10;
    return -1;
}

int http_percent_at(struct slice s, size_t i, unsigned char *byte)
{
    int hi, lo;

    if (s.p[i] != '%' || s.len - i < 3 || (hi = hexval(s.p[i + 1])) < 0 ||
        (lo = hexval(s.p[i + 2])) < 0)
        return 0;
    *byte = (unsigned char)(hi << 4 | lo);
    return 1;
}

/* The byte of `s` at *i, percent-decoded and ASCII-lowercased; *i moves
 * past what it took (3 bytes for an escape, else 1). */
static unsigned char decoded_at(struct slice s, size_t *i)
{
    unsigned char c = (unsigned char)s.p[*i];

    *i += http_percent_at(s, *i, &c) ? 3 : 1;
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c;
}

int http_query_name_eq(struct slice a, struct slice b)
{
    size_t i = 0, j = 0;

    while (i < a.len && j < b.len)
        if (decoded_at(a, &i) != decoded_at(b, &j))
            return 0;
    return i == a.len && j == b.len;
}

int http_query_next(struct slice *rest, struct http_query_param *p)
{
    while (rest->len > 0) {
        const char *amp = memchr(rest->p, '&', rest->len);
        size_t n = amp ? (size_t)(amp - rest->p) : rest->len;
        struct slice all = {rest->p, n};
        const char *eq;

        rest->p += amp ? n + 1 : n;
        rest->len -= amp ? n + 1 : n;
        if (n == 0)
            continue;
        eq = memchr(all.p, '=', n);
        p->all = all;
        p->name = (struct slice){all.p, eq ? (size_t)(eq - all.p) : n};
        p->value = eq ? (struct slice){eq + 1, n - p->name.len - 1} : (struct slice){NULL, 0};
        return 1;
    }
    return 0;
}

/* May `c` stand unescaped in a query (RFC 3986 3.4: pchar, '/' and '?';
 * '%' is checked apart)? */
static int query_byte(unsigned char c)
{
    return (c >= '0' && c <= '9') || ((c | 32) >= 'a' && (c | 32) <= 'z') ||
           (c != '\0' && strchr("-._~!$&'()*+,;=:@/?", c) != NULL);
}

const char *http_query_check(const char *q)
{
    size_t len = strlen(q);
    struct slice rest = {q, len};
    struct http_query_param p;

    if (len == 0)
        return "has an empty query after its '?'";
    if (q[0] == '&' || q[len - 1] == '&' || strstr(q, "&&") != NULL)
        return "has an empty parameter in its query ('&&', or a '&' at an end)";
    for (size_t i = 0; i < len; i++) {
        unsigned char byte;

        if (q[i] == '%') {
            if (!http_percent_at(rest, i, &byte))
                return "has a '%' in its query without two hex digits after it";
            i += 2;
        } else if (!query_byte((unsigned char)q[i])) {
            return "has a character its query may not hold as it is: percent-encode it";
        }
    }
    while (http_query_next(&rest, &p))
        if (p.name.len == 0)
            return "has a parameter without a name in its query";
    return NULL;
}

/* Does query `own` hold a parameter named `name` (http_query_name_eq)? */
static int names(const char *own, struct slice name)
{
    struct slice rest = slice_from(own);
    struct http_query_param p;

    while (http_query_next(&rest, &p))
        if (http_query_name_eq(p.name, name))
            return 1;
    return 0;
}

/* Is c one of RFC 3986's unreserved characters (2.3)? */
static int unreserved(unsigned char c)
{
    return (c >= '0' && c <= '9') || ((c | 32) >= 'a' && (c | 32) <= 'z') || c == '-' ||
           c == '.' || c == '_' || c == '~';
}

/* Does http_query_merge send c escaped (append_encoded)? */
static int escaped_upstream(unsigned char c)
{
    return c <= 0x20 || c >= 0x7f;
}

static const char hex_upper[] = "0123456789ABCDEF";

/* Write byte c at out + n (out NULL: nowhere), as "%XX" when `escape`;
 * the new length. */
static size_t put(char *out, size_t n, unsigned char c, int escape)
{
    if (out && escape) {
        out[n] = '%';
        out[n + 1] = hex_upper[c >> 4];
        out[n + 2] = hex_upper[c & 15];
    } else if (out) {
        out[n] = (char)c;
    }
    return n + (escape ? 3 : 1);
}

/* Write the normal form of one parameter `s` at out + n (out NULL:
 * nowhere), as http_query_normal; the new length. */
static size_t normal_param(char *out, size_t n, struct slice s)
{
    for (size_t i = 0; i < s.len; i++) {
        unsigned char c = (unsigned char)s.p[i];

        if (http_percent_at(s, i, &c)) {
            i += 2;
            n = put(out, n, c, !unreserved(c));
        } else if (c == '%') {
            /* one that starts no escape: "%%", which no escape writes, so
             * "%%41" and "%A" (both sent as they are) key apart */
            n = put(out, put(out, n, '%', 0), '%', 0);
        } else {
            n = put(out, n, c, escaped_upstream(c));
        }
    }
    return n;
}

/* Skip the '?' that starts a client's query, if it does. */
static struct slice after_mark(struct slice q)
{
    if (q.len > 0 && q.p[0] == '?') {
        q.p++;
        q.len--;
    }
    return q;
}

size_t http_query_normal(char *out, struct slice q)
{
    struct slice rest = after_mark(q);
    struct http_query_param p;
    size_t n = rest.len < q.len ? put(out, 0, '?', 0) : 0;

    for (int first = 1; http_query_next(&rest, &p); first = 0)
        n = normal_param(out, first ? n : put(out, n, '&', 0), p.all);
    return n;
}

/* Append the client's bytes p[0..len): as sent, but for the bytes llhttp
 * lets into a request target that RFC 9112 3.2 does not (a TAB, a form
 * feed, raw UTF-8), percent-encoded as a browser sends them: a backend's
 * parser (h11, Go's) refuses them, or splits the line at the TAB. */
static int append_encoded(struct buf *out, const char *p, size_t len)
{
    const char *end = p + len, *run = p;
    int rc = 0;

    if (len == 0)
        return 0; /* p may be NULL */
    for (; p < end && rc == 0; p++) {
        unsigned char ch = (unsigned char)*p;

        if (!escaped_upstream(ch))
            continue;
        char enc[3] = {'%', hex_upper[ch >> 4], hex_upper[ch & 15]};

        rc = buf_append(out, run, (size_t)(p - run)) ?: buf_append(out, enc, 3);
        run = p + 1;
    }
    return rc ?: buf_append(out, run, (size_t)(end - run));
}

int http_query_merge(struct buf *out, const char *own, struct slice client)
{
    struct slice rest = after_mark(client);
    struct http_query_param p;
    char sep = '?';
    int rc = 0;

    if (own != NULL) {
        rc = buf_append_lit(out, "?");
        rc = rc ?: buf_append(out, own, strlen(own));
        sep = '&';
    }
    while (rc == 0 && http_query_next(&rest, &p)) {
        if (own != NULL && names(own, p.name))
            continue;
        rc = buf_append(out, &sep, 1);
        rc = rc ?: append_encoded(out, p.all.p, p.all.len);
        sep = '&';
    }
    return rc;
}
