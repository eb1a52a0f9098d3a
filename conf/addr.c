/*
 * conf/addr.c: the addresses in a config: backend urls, the listen
 * address and the Redis url.
 *
 * Only the pieces the router needs are kept (scheme, host, port, path, a
 * backend's query, Redis db and password); anything else (fragments,
 * credentials in an http url) is refused. Error messages never repeat the
 * text, since urls can carry passwords (and a backend's query a key).
 */
#include "conf/conf.h"
#include "conf/internal.h"
#include "common/http_query.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Split "HOST[:PORT]" or "[V6][:PORT]" (`len` bytes) into a malloc'd
 * *host (brackets removed; "" when absent), *v6 and *port (-1 if absent).
 * Returns NULL, or an error message that does not quote the input. */
static const char *split_hostport(const char *s, size_t len, char **host, int *v6, long *port)
{
    const char *h = s, *end = s + len, *colon;
    size_t hlen;

    *host = NULL;
    *v6 = 0;
    *port = -1;
    if (len > 0 && s[0] == '[') {
        const char *close = memchr(s, ']', len);
        char tmp[64];
        struct in6_addr a;

        if (close == NULL)
            return "has an IPv6 address without its closing ']'";
        h = s + 1;
        hlen = (size_t)(close - h);
        if (hlen >= sizeof(tmp))
            return "has an invalid IPv6 address";
        memcpy(tmp, h, hlen);
        tmp[hlen] = '\0';
        if (inet_pton(AF_INET6, tmp, &a) != 1)
            return "has an invalid IPv6 address";
        *v6 = 1;
        colon = close + 1 < end ? close + 1 : NULL;
        if (colon && *colon != ':')
            return "has text after the IPv6 address";
    } else {
        colon = memchr(s, ':', len);
        hlen = colon ? (size_t)(colon - s) : len;
        for (size_t i = 0; i < hlen; i++)
            if (!isalnum((unsigned char)h[i]) && !strchr("-._", h[i]))
                return "has an invalid host name";
    }
    if (colon) {
        const char *p = colon + 1;
        long v = 0;

        if (p == end || end - p > 5)
            return "has an invalid port";
        for (; p < end; p++) {
            if (!isdigit((unsigned char)*p))
                return "has an invalid port";
            v = v * 10 + (*p - '0');
        }
        *port = v;
    }
    if ((*host = strndup(h, hlen)) == NULL)
        return "out of memory";
    return NULL;
}

static void replace(char **field, char *value)
{
    free(*field);
    *field = value;
}

int conf__parse_url(struct conf__ctx *ctx, struct conf_backend *b, const char *url, int line,
                    const char *path)
{
    const char *rest, *msg, *q;
    size_t alen, plen;
    char *host = NULL, *base = NULL, *query = NULL;
    long port;
    int tls, v6;

    if (strncasecmp(url, "http://", 7) == 0)
        tls = 0, rest = url + 7;
    else if (strncasecmp(url, "https://", 8) == 0)
        tls = 1, rest = url + 8;
    else
        return conf__error(ctx, line, path, "must start with http:// or https://");
    for (const char *p = rest; *p; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f)
            return conf__error(ctx, line, path, "must not contain spaces or control characters");
    alen = strcspn(rest, "/?#");
    if (memchr(rest, '@', alen))
        return conf__error(ctx, line, path, "must not hold credentials: use api_key");
    if ((msg = split_hostport(rest, alen, &host, &v6, &port)) != NULL)
        return conf__error(ctx, line, path, "%s", msg);
    if (*host == '\0') {
        msg = "has no host";
        goto fail;
    }
    if (port == 0 || port > 65535) {
        msg = "has a port outside 1..65535";
        goto fail;
    }
    if (strchr(rest + alen, '#')) {
        msg = "must not have a fragment";
        goto fail;
    }
    /* The query goes with every request (Azure's api-version): checked
     * here, so that the router can send it as written. */
    q = strchr(rest + alen, '?');
    if (q && (msg = http_query_check(q + 1)) != NULL)
        goto fail;
    plen = q ? (size_t)(q - (rest + alen)) : strlen(rest + alen);
    while (plen > 0 && rest[alen + plen - 1] == '/')
        plen--;
    if ((base = strndup(rest + alen, plen)) == NULL || (q && (query = strdup(q + 1)) == NULL)) {
        free(base);
        msg = "out of memory";
        goto fail;
    }
    b->tls = tls;
    b->host_is_ipv6 = v6;
    b->port = (uint16_t)(port > 0 ? port : tls ? 443 : 80);
    replace(&b->host, host);
    replace(&b->base_path, base);
    replace(&b->query, query);
    return 0;
fail:
    free(host);
    return conf__error(ctx, line, path, "%s", msg);
}

int conf__parse_listen(struct conf__ctx *ctx, const char *text, int line, const char *path)
{
    struct conf *c = ctx->conf;
    const char *msg;
    char *host;
    long port;
    int v6;

    if ((msg = split_hostport(text, strlen(text), &host, &v6, &port)) != NULL)
        return conf__error(ctx, line, path, "%s", msg);
    if (port < 0 || port > 65535) {
        free(host);
        return conf__error(ctx, line, path, "needs HOST:PORT with a port in 0..65535");
    }
    if (*host == '\0') {
        free(host);
        if ((host = strdup("0.0.0.0")) == NULL)
            return ctx->oom = 1, -1;
    }
    replace(&c->listen_host, host);
    c->listen_port = (uint16_t)port;
    return 0;
}

int conf__parse_redis(struct conf__ctx *ctx, const char *url, int line, const char *path)
{
    struct conf *c = ctx->conf;
    const char *rest, *at, *msg;
    char *host = NULL, *password = NULL, *copy = NULL;
    size_t alen;
    long port, db = 0;
    int v6;

    if (strncasecmp(url, "redis://", 8) != 0)
        return conf__error(ctx, line, path, "must start with redis://");
    rest = url + 8;
    alen = strcspn(rest, "/");
    at = memchr(rest, '@', alen);
    if (at) {
        if (rest[0] != ':')
            return conf__error(ctx, line, path,
                               "takes a password only, as redis://:PASSWORD@HOST");
        if ((password = strndup(rest + 1, (size_t)(at - rest - 1))) == NULL)
            return ctx->oom = 1, -1;
        alen -= (size_t)(at + 1 - rest);
        rest = at + 1;
    }
    if ((msg = split_hostport(rest, alen, &host, &v6, &port)) != NULL)
        goto fail;
    msg = "has no host";
    if (*host == '\0')
        goto fail;
    msg = "has a port outside 1..65535";
    if (port == 0 || port > 65535)
        goto fail;
    msg = "needs a database number 0..1000000 after the '/'";
    if (rest[alen] == '/' && rest[alen + 1] != '\0') {
        char *end;

        db = strtol(rest + alen + 1, &end, 10);
        if (!isdigit((unsigned char)rest[alen + 1]) || *end != '\0' || db > 1000000)
            goto fail;
    }
    if ((copy = strdup(url)) == NULL)
        goto oom;
    replace(&c->redis_url, copy);
    replace(&c->redis_host, host);
    replace(&c->redis_password, password);
    c->redis_port = (uint16_t)(port > 0 ? port : 6379);
    c->redis_db = (int)db;
    return 0;
oom:
    ctx->oom = 1;
    msg = "out of memory";
fail:
    free(host);
    free(password);
    return conf__error(ctx, line, path, "%s", msg);
}
