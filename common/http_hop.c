/*
 * common/http_hop.c: see http_hop.h.
 */
#include "common/http_hop.h"

#include <string.h>
#include <strings.h>

static int slices_caseeq(struct slice a, struct slice b)
{
    return a.len == b.len && (a.len == 0 || strncasecmp(a.p, b.p, a.len) == 0);
}

/* Which bit of `more` a name sets: FNV-1a over its lowercase bytes. */
static unsigned name_bit(struct slice name)
{
    uint32_t h = 2166136261u;

    for (size_t i = 0; i < name.len; i++) {
        unsigned char ch = (unsigned char)name.p[i];
        h = (h ^ (ch >= 'A' && ch <= 'Z' ? ch + 32u : ch)) * 16777619u;
    }
    return h & 63u;
}

static int is_ows(char ch)
{
    return ch == ' ' || ch == '\t';
}

static void add_name(struct http_hop_names *h, struct slice name)
{
    if (name.len == 0 || slice_caseeq(name, "keep-alive") || slice_caseeq(name, "close"))
        return;
    if (h->n < HTTP_HOP_NAMES_MAX)
        h->name[h->n++] = name;
    else
        h->more |= UINT64_C(1) << name_bit(name);
}

void http_hop_names_add(struct http_hop_names *h, struct slice value)
{
    const char *p = value.p, *end = value.p + value.len;

    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *stop = comma ? comma : end;
        struct slice name;

        while (p < stop && is_ows(*p))
            p++;
        name = (struct slice){p, (size_t)(stop - p)};
        while (name.len > 0 && is_ows(name.p[name.len - 1]))
            name.len--;
        add_name(h, name);
        p = comma ? comma + 1 : end;
    }
}

int http_hop_names_has(const struct http_hop_names *h, struct slice name)
{
    for (unsigned i = 0; i < h->n; i++)
        if (slices_caseeq(h->name[i], name))
            return 1;
    return h->more != 0 && (h->more >> name_bit(name) & 1u);
}

/* The name of a header line: the bytes before its colon (the whole line
 * if it has none). */
static struct slice line_name(const char *p, size_t n)
{
    const char *colon = memchr(p, ':', n);

    return (struct slice){p, colon ? (size_t)(colon - p) : n};
}

/* The length of the line at p, its "\r\n" (or a lone '\n') included. */
static size_t line_len(const char *p, const char *end)
{
    const char *nl = memchr(p, '\n', (size_t)(end - p));

    return nl ? (size_t)(nl + 1 - p) : (size_t)(end - p);
}

void http_hop_names_scan(struct http_hop_names *h, const char *p, size_t len)
{
    const char *end = p + len;

    while (p < end) {
        size_t n = line_len(p, end);
        struct slice name = line_name(p, n);

        if (name.len < n && slice_caseeq(name, "connection")) {
            struct slice value = {p + name.len + 1, n - name.len - 1};

            while (value.len > 0 &&
                   (value.p[value.len - 1] == '\n' || value.p[value.len - 1] == '\r'))
                value.len--;
            http_hop_names_add(h, value);
        }
        p += n;
    }
}

static int line_dropped(struct slice name, const struct http_hop_names *h, struct slice also)
{
    return slice_caseeq(name, "connection") || (also.len > 0 && slices_caseeq(name, also)) ||
           http_hop_names_has(h, name);
}

size_t http_hop_filter(char *dst, const char *p, size_t len, const struct http_hop_names *h,
                       struct slice also)
{
    const char *end = p + len;
    size_t out = 0;
    int keep = 1;

    while (p < end) {
        size_t n = line_len(p, end);

        /* A folded line (obs-fold) shares the fate of the line it continues. */
        if (!is_ows(*p))
            keep = !line_dropped(line_name(p, n), h, also);
        if (keep) {
            memmove(dst + out, p, n);
            out += n;
        }
        p += n;
    }
    return out;
}
