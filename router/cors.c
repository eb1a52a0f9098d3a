/*
 * router/cors.c: answers to web pages of other origins (the CORS protocol
 * of the Fetch standard), when `cors.allow_origins` lists them.
 *
 * A page of https://app.example.com that calls the router with fetch()
 * may read the answer only if the answer names its origin in
 * Access-Control-Allow-Origin. Before a request with an Authorization
 * header or a JSON body, the browser asks first: an OPTIONS request (the
 * preflight) with the method and headers it means to send, and no key,
 * answered here without authentication. Without `cors:` the router sends
 * no such header and a preflight gets the 405 any OPTIONS gets.
 */
#include <stdio.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "conf/conf.h"
#include "router/internal.h"

/* The longest Access-Control-Request-Headers answered: a browser lists
 * the few headers a script set; a longer list is refused (no Allow-Headers,
 * so the browser stops). */
#define CORS_REQUEST_HEADERS_MAX 1024

/* The Access-Control-Allow-Origin value of the answer to `c`'s request,
 * and its length: "*" when every origin is allowed, the request's Origin
 * when it is listed (looked up in lowercase, as the list is kept), else
 * NULL: no CORS header, and the browser keeps the answer from the page. */
static const char *allowed_origin(const struct router__client *c, size_t *len)
{
    const struct conf *conf = c->router->conf;
    const struct buf *o = &c->req.origin;
    char lower[CONF_ORIGIN_MAX];

    if (conf->ncors_origins == 0 || o->len == 0 || o->len > CONF_ORIGIN_MAX)
        return NULL;
    if (conf_cors_any(conf)) {
        *len = 1;
        return "*";
    }
    for (size_t i = 0; i < o->len; i++) {
        unsigned char ch = (unsigned char)o->data[i];

        if (ch <= ' ' || ch > '~')
            return NULL; /* no origin a browser sends; never echoed */
        lower[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + ('a' - 'A') : ch);
    }
    if (!conf_cors_allows(conf, lower, o->len))
        return NULL;
    *len = o->len;
    return o->data;
}

size_t router__cors_headers(const struct router__client *c, char *out)
{
    const struct conf *conf = c->router->conf;
    size_t len = 0;
    const char *origin;
    int n;

    out[0] = '\0';
    if (conf->ncors_origins == 0)
        return 0;
    origin = allowed_origin(c, &len);
    /* With a list, the answer depends on the Origin: caches must know. */
    n = snprintf(out, ROUTER_CORS_HEADERS_MAX, "%s%.*s%s%s",
                 origin ? "Access-Control-Allow-Origin: " : "", (int)len, origin ? origin : "",
                 origin ? "\r\nAccess-Control-Expose-Headers: *\r\n" : "",
                 conf_cors_any(conf) ? "" : "Vary: Origin\r\n");
    if (n <= 0 || n >= ROUTER_CORS_HEADERS_MAX) {
        out[0] = '\0';
        return 0;
    }
    return (size_t)n;
}

/* Is `v` a list of header names, as a browser sends in
 * Access-Control-Request-Headers ("authorization,content-type")? It is
 * echoed in the answer: nothing else may pass. */
static int header_name_list(const char *v, size_t len)
{
    if (len == 0 || len > CORS_REQUEST_HEADERS_MAX)
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)v[i];

        if (!(ch >= 'a' && ch <= 'z') && !(ch >= 'A' && ch <= 'Z') &&
            !(ch >= '0' && ch <= '9') && !strchr("-_., ", ch))
            return 0;
    }
    return 1;
}

int router__cors_preflight(struct router__client *c)
{
    struct router__request *req = &c->req;
    const char *methods, *asked;
    size_t asked_len = 0, len = 0;
    struct buf extra = {0};
    int rc;

    if (c->router->conf->ncors_origins == 0 || req->origin.len == 0 ||
        router__request_header(req, "access-control-request-method", &len) == NULL)
        return 0; /* no preflight: the 405 of any OPTIONS */
    methods = router__allowed_methods(req);
    if (methods == NULL)
        return 0; /* no path of the router's: its 404 */
    if (allowed_origin(c, &len) == NULL) {
        router__send_error(c, error_origin_not_allowed, NULL);
        return 1;
    }
    /* Which headers the page's script may set: those it asks for (its
     * Authorization, Content-Type, x-api-key, anthropic-version...), all
     * of which the router takes or forwards. */
    asked = router__request_header(req, "access-control-request-headers", &asked_len);
    rc = buf_printf(&extra, "Access-Control-Allow-Methods: %s\r\nAccess-Control-Max-Age: %d\r\n",
                    methods, c->router->conf->cors_max_age_s);
    if (rc == 0 && asked != NULL && header_name_list(asked, asked_len))
        rc = buf_printf(&extra, "Access-Control-Allow-Headers: %.*s\r\n", (int)asked_len, asked);
    rc = rc ?: buf_append_lit(&extra, "Vary: Access-Control-Request-Method, "
                                      "Access-Control-Request-Headers\r\n");
    rc = rc ?: buf_append(&extra, "", 1); /* NUL-terminated for router__send_response */
    if (rc != 0) {
        buf_free(&extra);
        router__send_error(c, error_no_memory, NULL);
        return 1;
    }
    router__send_response(c, 204, NULL, extra.data, NULL, 0);
    buf_free(&extra);
    return 1;
}
