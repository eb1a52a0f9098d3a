/*
 * router/server.c: the listening socket and client connections.
 *
 * Reads are parsed in place by llhttp; what must outlive a read (URL,
 * chosen headers, body) is copied into the request. When a request is
 * complete the parser is paused, so bytes of a pipelined next request
 * wait in `pending` until the response is done: responses go out in
 * request order. Reading goes on while a response is in progress so a
 * client that hangs up is noticed and its upstream dropped.
 */
#include <errno.h>
#include <linux/sockios.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/log.h"
#include "common/util.h"
#include "conf/conf.h"
#include "router/internal.h"
#include "router/router.h"
#include "backends/backend.h"
#include "metrics/metrics.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* Size of the loop-wide read buffer; everything read is consumed or
 * copied before the next read, so one buffer serves every socket. */
#define ROUTER_READ_BUF 65536
/* Stop reading a busy client once this many pipelined bytes wait. */
#define ROUTER_PENDING_MAX (1u << 20)
/* Stop reading a client, and answering its pipelined requests, while
 * more than this many bytes of answers wait for it to read them (as
 * PROXY_CLIENT_HIGH_WATER pauses a backend): every answer is queued
 * whole, so a client that sends requests and never reads would
 * otherwise make the router hold all their answers. */
#define ROUTER_CLIENT_HIGH_WATER (256u * 1024)
/* Lingering close (as nginx's lingering_timeout and lingering_time): a
 * client refused before it had sent its whole request is read from, and
 * what it sends dropped, until it stops for this long... */
#define ROUTER_LINGER_IDLE_MS 5000
/* ...or for this long at most, then closed. */
#define ROUTER_LINGER_MAX_MS 30000
/* With no memory for a client, its connection waits this long before the
 * accept is tried again (accept_later). */
#define ROUTER_ACCEPT_RETRY_MS 50
/* At most one "no memory to accept" warning this often. */
#define ROUTER_ACCEPT_LOG_MS 60000

static char router_read_buf[ROUTER_READ_BUF];

/* A write that could not go out at once: owns a copy of its bytes. */
struct client_write {
    uv_write_t req;               /* libuv request; data unused */
    struct router__client *client; /* writer */
    size_t len;                   /* bytes in data */
    char data[];                  /* the copy */
};

static llhttp_settings_t client_settings;
static void client_process(struct router__client *c);
static void generation_free(struct router *r);
static void client_start_reading(struct router__client *c);
static void client_stop_reading(struct router__client *c);
static void client_set_phase(struct router__client *c, enum router__client_phase phase);

uint64_t router__now(const struct router *r)
{
    return uv_now(r->loop);
}

static void read_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    buf->base = router_read_buf;
    buf->len = sizeof(router_read_buf);
}

/* ---- closing ---- */

static void client_free(struct router__client *c)
{
    struct router *r = c->router;

    router__account(c); /* a request cut short by the client: 499 */
    router__request_free(&c->req);
    buf_free(&c->pending);
    SSL_free(c->ssl);
    if (c->prev)
        c->prev->next = c->next;
    else
        r->clients = c->next;
    if (c->next)
        c->next->prev = c->prev;
    r->nclients--;
    r->shared->nclients--;
    metrics_add(r->metrics, METRICS_CLIENT_CONNECTIONS, NULL, -1);
    free(c);
    router__maybe_finish(r);
}

static void client_handle_closed(uv_handle_t *h)
{
    struct router__client *c = h->data;

    if (--c->handles_open == 0)
        client_free(c);
}

/* The one close path: marks the client, drops its upstream, closes both
 * handles; memory goes in the last close callback. */
void router__client_close(struct router__client *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    router__park_remove(c);
    router__proxy_abort(c);
    uv_close((uv_handle_t *)&c->tcp, client_handle_closed);
    uv_close((uv_handle_t *)&c->timeout.timer, client_handle_closed);
}

static void client_shutdown_done(uv_shutdown_t *req, int status)
{
    struct router__client *c = req->data;

    free(req);
    if (c->phase != ROUTER_CLIENT_LINGER || status < 0)
        router__client_close(c);
}

/* A client refused in the middle of sending (a body over the limit, a
 * malformed head) may still be writing. Closing with its bytes unread
 * would reset the connection, and a client still sending would see the
 * reset, not the answer already written (most HTTP clients do not read
 * before they have sent). So, after the answer and our FIN, what it sends
 * is read and dropped until it stops or closes (client_read), for a
 * bounded time (client_timeout). */
static void client_linger(struct router__client *c)
{
    c->linger_end = router__now(c->router) + ROUTER_LINGER_MAX_MS;
    client_set_phase(c, ROUTER_CLIENT_LINGER);
    buf_free(&c->pending);
    c->drain_left = 0; /* of `pending`, now dropped */
    if (!c->reading)
        client_start_reading(c);
}

/* Bytes of its answers the client has not taken yet: those waiting in
 * the write queue and, while there are some (the answer is not all
 * written: rare, no system call else), those still in the socket's send
 * buffer too. The kernel says the socket is writable again only after
 * about a third of that buffer (up to megabytes) went out, so the queue
 * alone can stand still for seconds under a client that reads. */
static size_t client_unsent(struct router__client *c)
{
    size_t n = router__client_write_queue(c);
    uv_os_fd_t fd;
    int out = 0;

    if (n != 0 && uv_fileno((const uv_handle_t *)&c->tcp, &fd) == 0 &&
        ioctl(fd, SIOCOUTQ, &out) == 0 && out > 0)
        n += (size_t)out;
    return n;
}

/* Give an idle connection, or one closing once its answers are written
 * (flushing), idle_timeout_ms. While an answer is still being written,
 * that is the longest the client may take no byte of it (nginx's
 * send_timeout: client_timeout sees the progress); once it is all
 * written, the time it may stay idle (keepalive_timeout). A slow reader
 * of a large answer was closed idle_timeout_ms after the answer ended,
 * with the rest of it unwritten. */
static void client_wait_idle(struct router__client *c)
{
    c->unsent_mark = client_unsent(c);
    router__deadline_set(&c->timeout, c->router->conf->idle_timeout_ms);
}

/* Close after queued writes have gone out (Connection: close). */
static void client_close_after_writes(struct router__client *c)
{
    uv_shutdown_t *req;

    if (c->closing)
        return;
    c->backed_up = 0; /* no more requests: nothing to resume */
    if (c->cut_short) {
        client_linger(c);
    } else {
        client_stop_reading(c);
        /* A client that never reads its answer would hold the shutdown
         * (and the connection, and at a stop or reload the whole
         * generation) for ever: it gets idle_timeout_ms without reading,
         * as an idle keep-alive connection does. */
        c->flushing = 1;
        client_wait_idle(c);
    }
    /* close_notify says the data ended where it should. An answer cut
     * short (the upstream broke, or the budget ran out mid-stream) goes
     * without it, so that a TLS client sees the truncation even where
     * HTTP cannot show it (an HTTP/1.0 body delimited by the close). */
    if (c->ssl && !c->req.broken)
        router__tls_client_shutdown(c);
    req = malloc(sizeof(*req));
    if (req == NULL) {
        router__client_close(c);
        return;
    }
    req->data = c;
    if (uv_shutdown(req, (uv_stream_t *)&c->tcp, client_shutdown_done) != 0) {
        free(req);
        router__client_close(c);
    }
}

/* ---- writing ---- */

size_t router__client_write_queue(const struct router__client *c)
{
    return uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp);
}

/* Whether the client has left more answers unread than it may: then its
 * next request waits, and so does reading it (client_hold). */
static int client_full(const struct router__client *c)
{
    return router__client_write_queue(c) > ROUTER_CLIENT_HIGH_WATER;
}

/* Stop reading until the client has read its answers: what it sends then
 * waits in the kernel's buffers and, once they fill, in the client. */
static void client_hold(struct router__client *c)
{
    c->backed_up = 1;
    client_stop_reading(c);
}

static void client_write_done(uv_write_t *req, int status)
{
    struct client_write *w = container_of(req, struct client_write, req);
    struct router__client *c = w->client;

    free(w);
    if (status < 0) {
        if (status != UV_ECANCELED)
            router__client_close(c);
        return;
    }
    /* It reads: more time for the rest; all written, the idle time starts. */
    if ((c->flushing || c->phase == ROUTER_CLIENT_IDLE) && !c->closing)
        client_wait_idle(c);
    if (c->closing || router__client_write_queue(c) != 0)
        return;
    router__proxy_on_client_drain(c);
    if (c->backed_up && !c->closing && !c->in_process) {
        c->backed_up = 0;
        client_process(c); /* the requests that waited, then reading */
    }
}

/* Send bytes, trying a direct write first so the common case copies and
 * allocates nothing; what the socket does not take is copied once. */
void router__client_send_raw(struct router__client *c, const uv_buf_t *bufs, unsigned nbufs)
{
    size_t total = 0, skip = 0, off = 0;
    struct client_write *w;
    int n;

    if (c->closing)
        return;
    for (unsigned i = 0; i < nbufs; i++)
        total += bufs[i].len;
    if (total == 0)
        return;
    if (router__client_write_queue(c) == 0) {
        n = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
        if (n < 0 && n != UV_EAGAIN) {
            router__client_close(c);
            return;
        }
        if (n > 0)
            skip = (size_t)n;
        if (skip == total)
            return;
    }
    w = malloc(sizeof(*w) + total - skip);
    if (w == NULL) {
        router__client_close(c);
        return;
    }
    w->client = c;
    w->len = total - skip;
    for (unsigned i = 0; i < nbufs; i++) {
        size_t len = bufs[i].len;
        const char *p = bufs[i].base;

        if (skip >= len) {
            skip -= len;
            continue;
        }
        p += skip;
        len -= skip;
        skip = 0;
        memcpy(w->data + off, p, len);
        off += len;
    }
    uv_buf_t b = uv_buf_init(w->data, (unsigned)w->len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, client_write_done) != 0) {
        free(w);
        router__client_close(c);
    }
}

void router__client_sendv(struct router__client *c, const uv_buf_t *bufs, unsigned nbufs)
{
    if (c->closing)
        return;
    if (c->ssl)
        router__tls_client_sendv(c, bufs, nbufs);
    else
        router__client_send_raw(c, bufs, nbufs);
}

void router__client_send(struct router__client *c, const char *p, size_t len)
{
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)len);

    router__client_sendv(c, &b, 1);
}

/* ---- timers ---- */

static void client_timeout(void *arg)
{
    struct router__client *c = arg;

    /* Some of its answer went out since: not idle (client_wait_idle). */
    if ((c->flushing || c->phase == ROUTER_CLIENT_IDLE) && router__client_write_queue(c) != 0 &&
        client_unsent(c) < c->unsent_mark) {
        client_wait_idle(c);
        return;
    }
    if (c->flushing) { /* its answer still unread (client_close_after_writes) */
        router__client_close(c);
        return;
    }
    switch (c->phase) {
    case ROUTER_CLIENT_IDLE:
        router__client_close(c);
        break;
    case ROUTER_CLIENT_HEADERS:
    case ROUTER_CLIENT_BODY:
        /* A slow client may still be sending: lingering close, as for a
         * 413, else its next bytes reset the connection. */
        c->req.keep_alive = 0;
        c->cut_short = 1;
        c->phase = ROUTER_CLIENT_BUSY;
        router__refuse(c, error_timeout_client, NULL);
        break;
    case ROUTER_CLIENT_BUSY:
        if (c->parked)
            router__park_expire(c);
        else if (c->req.reload_wait != NULL)
            router__admin_reload_expire(c);
        break;
    case ROUTER_CLIENT_LINGER:
        router__client_close(c);
        break;
    }
}

static void client_set_phase(struct router__client *c, enum router__client_phase phase)
{
    const struct conf *conf = c->router->conf;
    int ms = 0;

    c->phase = phase;
    switch (phase) {
    case ROUTER_CLIENT_IDLE:
        client_wait_idle(c);
        return;
    case ROUTER_CLIENT_HEADERS:
        ms = conf->header_timeout_ms;
        break;
    case ROUTER_CLIENT_BODY:
        ms = conf->body_timeout_ms;
        break;
    case ROUTER_CLIENT_BUSY:
        break;
    case ROUTER_CLIENT_LINGER:
        ms = ROUTER_LINGER_IDLE_MS;
        break;
    }
    router__deadline_set(&c->timeout, ms);
}

/* ---- llhttp callbacks ---- */

static struct router__client *parser_client(llhttp_t *p)
{
    return container_of(p, struct router__client, parser);
}

/* Count head bytes against the limit; -1 stops the parser with 431. */
/* Count a piece of the head (`len` bytes at `at`) against
 * max_header_bytes. While the head is read, the bytes llhttp passes
 * without a callback count too (the method, separators, the blanks before
 * a value, which it skips however many): all from the last byte counted
 * in this read (head_mark) to the piece's end. A trailer's pieces count
 * alone: body bytes come between them. */
static int head_bytes_add(struct router__client *c, const char *at, size_t len)
{
    size_t n = len;

    if (c->phase == ROUTER_CLIENT_HEADERS && at >= c->head_mark)
        n = (size_t)(at + len - c->head_mark);
    c->head_mark = at + len;
    c->req.head_bytes += n;
    if (c->req.head_bytes > c->router->conf->max_header_bytes) {
        c->req.error = error_headers_too_large;
        return -1;
    }
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    struct router__client *c = parser_client(p);

    router__request_reset(&c->req);
    router__request_unshelve(c->router, &c->req);
    c->req.start_ms = router__now(c->router); /* router__handle sets it again */
    client_set_phase(c, ROUTER_CLIENT_HEADERS);
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    struct router__client *c = parser_client(p);

    /* Read here, not from the parser when answering: a request refused
     * before its method was parsed must not take the one before's. */
    c->req.head_method = llhttp_get_method(p) == HTTP_HEAD;
    if (head_bytes_add(c, at, len) != 0 || buf_append(&c->req.url, at, len) != 0)
        return -1;
    return 0;
}

/* Whether the header callbacks are for a chunked body's trailer: llhttp
 * reports its fields as it does the head's. A trailer arrives after the
 * request was read and checked, so it is no part of it: an Authorization
 * there must not authenticate, nor any field in it reach the backend.
 * Its bytes still count against max_header_bytes. */
static int in_trailer(const struct router__client *c)
{
    return c->phase == ROUTER_CLIENT_BODY;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct router__client *c = parser_client(p);

    if (head_bytes_add(c, at, len) != 0)
        return -1;
    if (!in_trailer(c) && buf_append(&c->req.hname, at, len) != 0)
        return -1;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct router__client *c = parser_client(p);

    if (head_bytes_add(c, at, len) != 0)
        return -1;
    if (!in_trailer(c) && buf_append(&c->req.hvalue, at, len) != 0)
        return -1;
    return 0;
}

/* Headers that describe this hop or that we set ourselves (content-type,
 * x-request-id: a second copy would contradict ours): never forwarded
 * upstream. accept-encoding is dropped so the upstream answers
 * uncompressed and its usage can be read. Connection is kept for now:
 * proxy.c drops it with the headers it names, which may come after it,
 * and the backend's own key header, once the backend is known. */
/* Client headers never forwarded: framing and hop-by-hop ones, the
 * tenant's credentials, what the router sets itself, and the OpenAI
 * organization and project, which pick the account the backend's key
 * bills: with the operator's key, a tenant could move its requests' cost
 * to another account of the operator's, out of its chargeback (LiteLLM
 * drops them too unless told to forward them). */
static int request_header_is_ours(struct slice name)
{
    static const char *const names[] = {
        "authorization", "host", "content-length", "transfer-encoding", "keep-alive", "te",
        "trailer", "upgrade", "proxy-authorization", "proxy-connection", "http2-settings",
        "accept-encoding", "expect", "x-api-key", "api-key", "cookie", "content-type",
        "x-request-id", "openai-organization", "openai-project", "origin",
    };

    return slice_caseeq_any(name, names, ARRAY_SIZE(names));
}

/* Keep the Origin a browser sends, for the CORS headers (router/cors.c).
 * It is not forwarded: to the backend the router is the client, and a
 * browser's origin would make a provider apply its own browser rules
 * (Anthropic's API refuses requests with one unless told they are meant).
 * Sent twice, it is no origin: the answer then allows none. */
static int origin_take(struct router__request *req, struct slice value)
{
    if (req->origin_seen) {
        buf_reset(&req->origin);
        return 0;
    }
    req->origin_seen = 1;
    return buf_append(&req->origin, value.p, value.len);
}

/* Keep the request's own tags for handler.c to read: several lines are
 * one list, as RFC 9110 5.3 joins list-valued fields. Never forwarded. */
static int tags_take(struct router__request *req, struct slice value)
{
    if (req->tag_text.len > 0 && buf_append(&req->tag_text, ",", 1) != 0)
        return -1;
    return buf_append(&req->tag_text, value.p, value.len);
}

/* The key of an Authorization value "Bearer KEY" (the scheme in any
 * case, the blanks after it skipped), as router__bearer reads it; an
 * empty slice when it is none. */
static struct slice bearer_key(const char *p, size_t len)
{
    size_t skip = 7;

    if (len <= skip || strncasecmp(p, "Bearer ", skip) != 0)
        return (struct slice){p, 0};
    while (skip < len && (p[skip] == ' ' || p[skip] == '\t'))
        skip++;
    return (struct slice){p + skip, len - skip};
}

/* Do the tenant key held in `auth` and `key` (the other header's) name
 * the same key? Compared in constant time, as keys are. */
static int same_key(const struct buf *auth, struct slice key)
{
    struct slice held = bearer_key(auth->data, auth->len);

    return key.len > 0 && held.len == key.len && CRYPTO_memcmp(held.p, key.p, key.len) == 0;
}

/* Keep the Authorization value. A second one is refused, not joined
 * (RFC 9110 5.3 allows joining only list-valued fields): "Bearer sk-ten"
 * and "ant-A" must not make the key "sk-tenant-A", and neither may be
 * chosen over the other, as proxies in front of the router may choose the
 * other one. */
static int auth_take(struct router__request *req, struct slice value)
{
    if (req->auth_seen) {
        req->error = error_auth_twice;
        return -1;
    }
    req->auth_seen = 1;
    if (!req->xkey_seen)
        return buf_append(&req->auth, value.p, value.len);
    /* x-api-key came first and is held as "Bearer KEY": this one must
     * name the same key (see xkey_take). */
    if (!same_key(&req->auth, bearer_key(value.p, value.len))) {
        req->error = error_auth_conflict;
        return -1;
    }
    return 0;
}

/* Does a key header's value (trailing blanks cut) name no key at all: an
 * empty one, or of Authorization (`bearer`) the scheme alone? Anthropic's
 * Python SDK sends "X-Api-Key:" empty beside its token when
 * ANTHROPIC_API_KEY is "" (as gateways tell Claude Code users to set it),
 * and "Bearer " for an empty token. Such a header is skipped: it is not a
 * second key that contradicts the other one, and alone it leaves the
 * request without a key (401), as before. */
static int names_no_key(struct slice value, int bearer)
{
    if (value.len == 0)
        return 1;
    return bearer && value.len == 6 && strncasecmp(value.p, "Bearer", 6) == 0;
}

/* Anthropic's SDKs send the key as x-api-key: KEY. It authenticates as
 * Authorization: Bearer KEY does (held in `auth` in that form when it
 * comes alone). Both may be sent (an SDK given a key and a token), but
 * then they must name the same key: of two different keys neither is
 * chosen, for a proxy in front of the router may choose the other one,
 * and the request is refused (400). Twice is refused as Authorization
 * twice is. The value is never forwarded (request_header_is_ours). */
static int xkey_take(struct router__request *req, struct slice value)
{
    if (req->xkey_seen) {
        req->error = error_xkey_twice;
        return -1;
    }
    req->xkey_seen = 1;
    if (!req->auth_seen) {
        if (buf_append(&req->auth, "Bearer ", 7) != 0)
            return -1;
        return buf_append(&req->auth, value.p, value.len);
    }
    if (!same_key(&req->auth, value)) {
        req->error = error_auth_conflict;
        return -1;
    }
    return 0;
}

/* Is every byte of `name` a tchar (RFC 9110 5.6.2)? llhttp lets a space
 * through ("X Bad Name: 1"), which would go upstream as it is, for the
 * backend (or a proxy before it) to read as it likes. */
static int header_name_valid(struct slice name)
{
    static const unsigned char tchar[256] = {
        ['0' ... '9'] = 1, ['A' ... 'Z'] = 1, ['a' ... 'z'] = 1, ['!'] = 1, ['#'] = 1,
        ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1, ['-'] = 1,
        ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    };

    for (size_t i = 0; i < name.len; i++)
        if (!tchar[(unsigned char)name.p[i]])
            return 0;
    return name.len > 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    struct router__client *c = parser_client(p);
    struct router__request *req = &c->req;
    struct slice name = {req->hname.data, req->hname.len};
    struct slice value = {req->hvalue.data, req->hvalue.len};
    int rc = 0;

    if (in_trailer(c))
        return 0; /* dropped */
    if (!header_name_valid(name)) {
        llhttp_set_error_reason(p, "invalid character in a header name");
        return -1;
    }
    /* Whitespace after a value is not part of it (RFC 9110 5.5); llhttp
     * drops it before the value only. */
    while (value.len > 0 && (value.p[value.len - 1] == ' ' || value.p[value.len - 1] == '\t'))
        value.len--;
    if (slice_caseeq(name, "authorization"))
        rc = names_no_key(value, 1) ? 0 : auth_take(req, value);
    else if (slice_caseeq(name, "x-api-key"))
        rc = names_no_key(value, 0) ? 0 : xkey_take(req, value);
    else if (slice_caseeq(name, "expect"))
        req->expect_continue = slice_caseeq(value, "100-continue");
    else if (slice_caseeq(name, "x-costrouter-tags"))
        rc = tags_take(req, value);
    else if (slice_caseeq(name, "origin"))
        rc = origin_take(req, value);
    else if (slice_caseeq(name, "anthropic-version") && value.len == 0)
        rc = 0; /* names no version, which Anthropic's API answers 400: the
                   router sends its own, as when none came (proxy.c) */
    else if (!request_header_is_ours(name) && name.len > 0)
        rc = buf_append_header(&req->fwd, name, value);
    buf_reset(&req->hname);
    buf_reset(&req->hvalue);
    return rc == 0 ? 0 : -1;
}

/* A request target in absolute form, "http://HOST[:PORT]/PATH?QUERY"
 * (what a client sends to a proxy), becomes its origin form "/PATH?QUERY"
 * ("/" before the query or fragment when it has no path): RFC 9112 3.2.2
 * has a server accept it, and every endpoint is found, and the upstream
 * target built, from the path. The host is not checked: the router serves
 * one origin on its port. */
static void url_to_origin_form(struct buf *url)
{
    static const char *const schemes[] = {"http://", "https://"};
    size_t end;

    for (size_t i = 0; i < ARRAY_SIZE(schemes); i++) {
        size_t n = strlen(schemes[i]);

        if (url->len < n || strncasecmp(url->data, schemes[i], n) != 0)
            continue;
        /* The authority ends at the path, the query or the fragment. */
        for (end = n; end < url->len && memchr("/?#", url->data[end], 3) == NULL; end++)
            ;
        if (end < url->len && url->data[end] == '/') {
            buf_consume(url, end);
        } else {
            buf_consume(url, end - 1); /* its last byte becomes the "/" */
            url->data[0] = '/';
        }
        return;
    }
}

static int on_headers_complete(llhttp_t *p)
{
    struct router__client *c = parser_client(p);

    url_to_origin_form(&c->req.url);

    /* CONNECT asks for a tunnel, which the router is not: what follows
     * its head is no HTTP, so it is answered 405 and the connection
     * closed. */
    if (p->method == HTTP_CONNECT) {
        c->req.error = error_method;
        return -1;
    }
    /* An Upgrade offer (curl --http2 sends h2c on http://) is declined
     * by answering in HTTP/1.1 (RFC 9110 7.8). llhttp would stop after
     * the message, taking the rest of the connection as the new
     * protocol: cleared here, before llhttp__after_headers_complete reads
     * it, the next request parses as any keep-alive one. */
    p->upgrade = 0;
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->router->conf->max_body_bytes) {
        c->req.error = error_body_too_large;
        return -1;
    }
    /* The client waits for this before sending a large body (curl does).
     * Not to HTTP/1.0, which has no 1xx: its client would take the 100
     * for the answer (RFC 9110 10.1.1: ignore the expectation). A request
     * refused whatever its body (no known key, no such path) is refused
     * now instead, the body unsent: a final answer in place of the 100,
     * as RFC 9110 10.1.1 allows, then the connection closes. */
    if (c->req.expect_continue && !router__client_http10(c)) {
        if ((c->req.error = router__refusal_on_head(c)) != NULL)
            return -1;
        router__client_send(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    }
    client_set_phase(c, ROUTER_CLIENT_BODY);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct router__client *c = parser_client(p);

    c->head_mark = at + len; /* a pipelined head after it counts from here */
    if (c->req.body.len + len > c->router->conf->max_body_bytes) {
        c->req.error = error_body_too_large;
        return -1;
    }
    return buf_append(&c->req.body, at, len) == 0 ? 0 : -1;
}

static int on_message_complete(llhttp_t *p)
{
    struct router__client *c = parser_client(p);

    /* A draining router closes after it (client_last_answer). */
    c->req.keep_alive = llhttp_should_keep_alive(p) ? 1 : 0;
    client_set_phase(c, ROUTER_CLIENT_BUSY);
    return HPE_PAUSED;
}

/* ---- request processing ---- */

/* Parse `len` bytes at `data`. Returns how many were consumed and sets
 * *complete when a request is complete (the parser is then paused, and
 * the rest waits for the response to finish). */
static size_t client_execute(struct router__client *c, const char *data, size_t len, int *complete)
{
    enum llhttp_errno err;
    const char *pos;

    *complete = 0;
    llhttp_resume(&c->parser);
    c->head_mark = data;
    err = llhttp_execute(&c->parser, data, len);
    /* A head not done yet: the bytes after its last piece are head too
     * (a run of blanks before a value may never reach a callback). */
    if (err == HPE_OK && c->phase == ROUTER_CLIENT_HEADERS && head_bytes_add(c, data + len, 0) != 0)
        err = HPE_USER;
    if (err == HPE_OK)
        return len;
    if (err == HPE_PAUSED) {
        pos = llhttp_get_error_pos(&c->parser);
        *complete = 1;
        return pos ? (size_t)(pos - data) : len;
    }
    /* Malformed or over a limit: answer and close; nothing after it can be
     * trusted to be framed right. */
    c->req.keep_alive = 0;
    c->cut_short = 1;
    client_set_phase(c, ROUTER_CLIENT_BUSY);
    router__refuse(c, c->req.error ? c->req.error : error_bad_request,
                   c->req.error ? NULL : llhttp_get_error_reason(&c->parser));
    return len;
}

/* Work through pipelined bytes while no response is in progress. A loop,
 * not recursion: a response finished synchronously (an error, /healthz)
 * only lets the loop go on (in_process stops the nested call). */
static void client_process(struct router__client *c)
{
    size_t used;
    int complete;

    c->in_process = 1;
    while (!c->closing && c->phase != ROUTER_CLIENT_BUSY && c->pending.len > 0 &&
           !client_full(c)) {
        used = client_execute(c, c->pending.data, c->pending.len, &complete);
        buf_consume(&c->pending, used);
        c->drain_left -= MIN(used, c->drain_left);
        if (complete)
            router__handle(c);
    }
    c->in_process = 0;
    if (c->closing)
        return;
    /* Draining, and what was left before the drain parsed to nothing
     * more (blank lines a client sent after a body): nothing to answer. */
    if (c->phase == ROUTER_CLIENT_IDLE && c->served && c->router->stopping &&
        c->drain_left == 0) {
        client_close_after_writes(c);
        return;
    }
    /* A response in progress keeps reading, to notice a client that
     * leaves; its backend is paused instead (proxy.c). */
    if (c->phase == ROUTER_CLIENT_IDLE && client_full(c)) {
        client_hold(c); /* client_write_done goes on */
        return;
    }
    c->backed_up = 0;
    if (!c->reading)
        client_start_reading(c);
}

/* Whether the answer to the current request is the connection's last:
 * the client asked for a close, or the generation drains and no byte of
 * a request received before the drain began waits behind this one. The
 * requests a client had pipelined and the router had in hand then are
 * answered (on the old config at a reload; at a stop, as requests in
 * flight are) and the last of them says Connection: close; what came
 * after the drain began is dropped with the close, as an HTTP/1.1
 * client expects of a connection it sees closed (RFC 9112 9.3.2: it
 * sends those again). Fixed while a request is in progress: drain_left
 * changes only when a request is taken from `pending`. */
static int client_last_answer(const struct router__client *c)
{
    return !c->req.keep_alive || (c->router->stopping && c->drain_left == 0);
}

void router__client_response_done(struct router__client *c)
{
    if (c->closing)
        return;
    router__proxy_rate_release(c);
    router__proxy_unchoose(c);
    router__spend_abandon(c); /* nothing may stay held past the response */
    router__account(c);
    if (client_last_answer(c)) {
        client_close_after_writes(c);
        return;
    }
    router__request_reset(&c->req);
    c->served = 1;
    client_set_phase(c, ROUTER_CLIENT_IDLE);
    if (c->pending.len > 0) {
        if (!c->in_process)
            client_process(c);
    } else {
        router__request_shelve(c->router, &c->req);
    }
}

int router__client_http10(const struct router__client *c)
{
    return c->parser.http_major == 1 && c->parser.http_minor == 0;
}

/* An HTTP/1.0 client takes a connection it asked to keep for one the
 * server closes unless the answer says keep-alive (RFC 9112, appendix
 * C.2.2): it then waits for a close that comes only idle_timeout_ms
 * later (ab -k does, and proxies that speak 1.0). A draining generation
 * (a reload replaced its config, or a stop) closes after its last answer
 * (client_last_answer), so that answer says so: else a client sends its
 * next request on a connection being closed. */
const char *router__client_connection_header(const struct router__client *c)
{
    if (client_last_answer(c))
        return "Connection: close\r\n";
    return router__client_http10(c) ? "Connection: keep-alive\r\n" : "";
}

/* LINGER: drop what the client sends; wait for more at most
 * ROUTER_LINGER_IDLE_MS, and never past linger_end. */
static void client_drop(struct router__client *c)
{
    uint64_t now = router__now(c->router);

    if (now >= c->linger_end) {
        router__client_close(c);
        return;
    }
    router__deadline_set(&c->timeout, (int)MIN(ROUTER_LINGER_IDLE_MS, c->linger_end - now));
}

void router__client_take(struct router__client *c, const char *p, size_t len)
{
    size_t used;
    int complete;

    if (c->phase == ROUTER_CLIENT_LINGER) { /* the rest of a TLS read */
        client_drop(c);
        return;
    }
    if (c->phase == ROUTER_CLIENT_IDLE && !c->backed_up && client_full(c))
        client_hold(c); /* the answer before is still unread */
    if (c->phase == ROUTER_CLIENT_BUSY || c->pending.len > 0 || c->backed_up) {
        if (buf_append(&c->pending, p, len) != 0) {
            router__client_close(c);
            return;
        }
        if (c->pending.len > ROUTER_PENDING_MAX)
            client_stop_reading(c);
        return;
    }
    used = client_execute(c, p, len, &complete);
    if (used < len && !c->closing && buf_append(&c->pending, p + used, len - used) != 0) {
        router__client_close(c);
        return;
    }
    if (complete)
        router__handle(c);
}

/* A TLS connection opens with a handshake record (0x16); a method name
 * there means plain HTTP sent to the TLS port. Tell the client so in its
 * own protocol, as nginx does, rather than drop it with a TLS alert it
 * cannot read. */
static int looks_like_plain_http(const struct router__client *c, char first)
{
    return SSL_in_before(c->ssl) && first >= 'A' && first <= 'Z';
}

static void refuse_plain_http(struct router__client *c)
{
    SSL_free(c->ssl);
    c->ssl = NULL;
    c->req.start_ms = router__now(c->router);
    c->req.keep_alive = 0;
    c->cut_short = 1;
    client_set_phase(c, ROUTER_CLIENT_BUSY);
    router__refuse(c, error_bad_request, "plain HTTP was sent to the TLS port; use https://");
}

/* The handshake has header_timeout_ms, as a request head has (a client
 * that stalls in it holds a connection no longer than one stalling in
 * its head); once done, the connection waits for its first request as a
 * plain one does. */
static void client_tls_read(struct router__client *c, const char *p, size_t len)
{
    int was_ready = SSL_is_init_finished(c->ssl);

    router__tls_client_read(c, p, len);
    if (!was_ready && !c->closing && SSL_is_init_finished(c->ssl) &&
        c->phase == ROUTER_CLIENT_IDLE)
        client_set_phase(c, ROUTER_CLIENT_IDLE);
}

static void client_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct router__client *c = s->data;

    if (nread == 0)
        return;
    if (nread < 0) {
        /* EOF or reset: a request in flight is abandoned with its upstream. */
        router__client_close(c);
        return;
    }
    if (c->phase == ROUTER_CLIENT_LINGER)
        client_drop(c);
    else if (c->ssl == NULL)
        router__client_take(c, buf->base, (size_t)nread);
    else if (looks_like_plain_http(c, buf->base[0]))
        refuse_plain_http(c);
    else
        client_tls_read(c, buf->base, (size_t)nread);
}

static void client_start_reading(struct router__client *c)
{
    if (uv_read_start((uv_stream_t *)&c->tcp, read_alloc, client_read) == 0)
        c->reading = 1;
}

static void client_stop_reading(struct router__client *c)
{
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
}

/* ---- accepting ---- */

/* Over the connection limit: closed at once (taking it off the backlog
 * is the only way to stop libuv reporting it again), counted, logged. */
static void refuse_client(struct router__client *c)
{
    struct router *r = c->router;
    uint64_t now = router__now(r);
    char note[LOG_EVERY_NOTE_MAX];

    metrics_add(r->metrics, METRICS_CLIENT_CONNECTIONS_REFUSED_TOTAL, NULL, 1);
    if (log_every_due(&r->shared->refuse_log, now, note))
        log_warn("client connection refused: %zu open, the most this router takes%s",
                 r->max_clients, note);
    router__client_close(c);
}

static void on_connection(uv_stream_t *server, int status);

static void accept_retry(uv_timer_t *t)
{
    struct router__shared *sh = container_of(t, struct router__shared, accept_retry);

    on_connection((uv_stream_t *)&sh->listener, 0);
}

/* No memory for a client: its connection is left where libuv holds it
 * and taken later. Returning from on_connection without uv_accept makes
 * libuv stop watching the listener until uv_accept is called, so without
 * this timer the router would never accept again; with it, the backlog
 * waits in the kernel meanwhile, as libuv intends. */
static void accept_later(struct router__shared *sh)
{
    char note[LOG_EVERY_NOTE_MAX];

    metrics_add(sh->metrics, METRICS_CLIENT_ACCEPT_RETRIES_TOTAL, NULL, 1);
    if (log_every_due(&sh->accept_log, uv_now(sh->loop), note))
        log_warn("no memory for a client connection: accepting it again in %d ms%s",
                 ROUTER_ACCEPT_RETRY_MS, note);
    uv_timer_start(&sh->accept_retry, accept_retry, ROUTER_ACCEPT_RETRY_MS, 0);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct router__shared *sh = server->data;
    struct router *r = sh->current;
    struct router__client *c;

    if (status < 0) {
        log_warn("accept: %s", uv_strerror(status));
        return;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL) {
        accept_later(sh);
        return;
    }
    c->router = r;
    c->req.shelved = 1; /* its first request takes buffers from the shelf */
    uv_tcp_init(r->loop, &c->tcp);
    router__deadline_init(r->loop, &c->timeout, c, client_timeout);
    c->tcp.data = c;
    c->handles_open = 2;
    c->next = r->clients;
    if (r->clients)
        r->clients->prev = c;
    r->clients = c;
    r->nclients++;
    sh->nclients++;
    metrics_add(r->metrics, METRICS_CLIENT_CONNECTIONS, NULL, 1);
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        router__client_close(c);
        return;
    }
    if (sh->nclients > r->max_clients) {
        refuse_client(c);
        return;
    }
    if (r->tls_ctx && router__tls_client_start(c, r->tls_ctx) != 0) {
        router__client_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &client_settings);
    c->req.candidate = -1;
    client_set_phase(c, ROUTER_CLIENT_IDLE);
    if (c->ssl) /* until the handshake is done (client_tls_read) */
        router__deadline_set(&c->timeout, r->conf->header_timeout_ms);
    client_start_reading(c);
}

/* ---- router lifecycle ---- */

static void settings_init(void)
{
    llhttp_settings_init(&client_settings);
    client_settings.on_message_begin = on_message_begin;
    client_settings.on_url = on_url;
    client_settings.on_header_field = on_header_field;
    client_settings.on_header_value = on_header_value;
    client_settings.on_header_value_complete = on_header_value_complete;
    client_settings.on_headers_complete = on_headers_complete;
    client_settings.on_body = on_body;
    client_settings.on_message_complete = on_message_complete;
}

/* What shared_create made that closing the loop's handles does not free. */
static void shared_free(struct router__shared *sh)
{
    if (sh->flights)
        cache_flight_free(sh->flights);
    policy_tokens_free(sh->tokens);
    metrics_free(sh->metrics);
    EVP_MD_CTX_free(sh->sha256_ctx);
    EVP_MD_free(sh->sha256);
    free(sh);
}

/* The token tables `conf`'s backends count with (policy_tokens_load_some). */
static unsigned conf_encodings(const struct conf *conf)
{
    unsigned need = 0;

    for (size_t i = 0; i < conf->nbackends; i++)
        need |= 1u << conf->backends[i].tokenizer;
    return need;
}

/* A backend of `conf` that counts with `enc`, in `out`: the first one's
 * name, and how many more there are. */
static const char *tokens_users(const struct conf *conf, enum conf_tokenizer enc, char *out,
                                size_t size)
{
    const char *first = NULL;
    size_t more = 0;

    for (size_t i = 0; i < conf->nbackends; i++) {
        if (conf->backends[i].tokenizer != enc)
            continue;
        if (first == NULL)
            first = conf->backends[i].name;
        else
            more++;
    }
    if (more > 0)
        snprintf(out, size, "backend %s and %zu more", first, more);
    else
        snprintf(out, size, "backend %s", first);
    return out;
}

/* Load the token tables `conf`'s backends count with that are not loaded
 * yet: at start, and at a reload (on the loop, see router_reload), which
 * so loads one the config names for the first time or one missing until
 * then (`make deps` run since). Each table apart: one that cannot be read
 * leaves only its own backends' prompts estimated from bytes, and a
 * warning names it and them (vocab_load's error line says why). */
static void tokens_load(struct router__shared *sh, const struct conf *conf, int reload)
{
    const char *when = reload ? "reload: " : "";
    unsigned need = conf_encodings(conf);
    char users[160];
    int rc, had[CONF_TOK_LLAMA3 + 1];

    if (sh->tokens == NULL) {
        rc = policy_tokens_load_some(&sh->tokens, conf->tokenizer_data, 0);
        if (rc != 0) {
            log_warn("%stoken tables not loaded (%s): prompt tokens will be estimated from bytes",
                     when, strerror(-rc));
            sh->tokens = NULL;
            return;
        }
    }
    for (int e = CONF_TOK_CL100K; e <= CONF_TOK_LLAMA3; e++)
        had[e] = policy_tokens_has(sh->tokens, e);
    if (policy_tokens_add(sh->tokens, need) == 0 && !reload)
        return;
    for (int e = CONF_TOK_CL100K; e <= CONF_TOK_LLAMA3; e++) {
        if (!(need & (1u << e)) || had[e])
            continue;
        if (policy_tokens_has(sh->tokens, e))
            log_info("%stoken table %s loaded", when, policy_tokens_file(e));
        else
            log_warn("%stoken table %s not loaded: prompt tokens of %s will be estimated from "
                     "bytes; run `make deps` to fetch it, then reload",
                     when, policy_tokens_file(e), tokens_users(conf, e, users, sizeof(users)));
    }
}

/* The state that outlives reloads, made once with the first config. */
static struct router__shared *shared_create(uv_loop_t *loop, const struct conf *conf)
{
    struct router__shared *sh = calloc(1, sizeof(*sh));

    if (sh == NULL)
        return NULL;
    sh->loop = loop;
    sh->metrics = metrics_create(0);
    sh->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    sh->sha256_ctx = EVP_MD_CTX_new();
    if (sh->metrics == NULL || sh->sha256 == NULL || sh->sha256_ctx == NULL)
        goto fail;
    if (conf->cost_log != NULL) {
        int err = 0;

        sh->cost_log = metrics_cost_log_open(loop, conf->cost_log, 0, conf->cost_log_buffer_max,
                                             (unsigned)conf->cost_log_wait_ms, sh->metrics, &err);
        if (sh->cost_log == NULL) {
            log_error("cost_log %s: %s", conf->cost_log, uv_strerror(err));
            goto fail;
        }
        metrics_cost_log_on_caught_up(sh->cost_log, router__park_resume, sh);
    }
    tokens_load(sh, conf, 0);
    sh->store = router__store_create(loop, conf);
    sh->flights = cache_flight_create();
    if (sh->store == NULL || sh->flights == NULL)
        goto fail;
    return sh;
fail:
    if (sh->cost_log)
        metrics_cost_log_close(sh->cost_log);
    if (sh->store)
        cache_close(sh->store, NULL, NULL);
    shared_free(sh);
    return NULL;
}

/* At shutdown, once no generation is left: flush and close what the
 * loop is still waiting on. */
static void shared_close(struct router__shared *sh)
{
    if (sh->store) {
        cache_close(sh->store, NULL, NULL);
        sh->store = NULL;
    }
    if (sh->cost_log) {
        metrics_cost_log_close(sh->cost_log);
        sh->cost_log = NULL;
    }
}

/* One generation: backends, pools and per-tenant state for `conf`. When
 * the listener's certificate or key will not load, the reason is logged
 * and, if errors is not NULL, set there (malloc'd). */
static struct router *generation_create(struct router__shared *sh, struct conf *conf,
                                        char **errors)
{
    struct router *r = calloc(1, sizeof(*r));

    if (r == NULL) {
        conf_free(conf);
        return NULL;
    }
    r->loop = sh->loop;
    r->conf = conf;
    r->shared = sh;
    r->metrics = sh->metrics;
    r->cost_log = sh->cost_log;
    r->tokens = sh->tokens;
    r->store = sh->store;
    r->flights = sh->flights;
    /* Request ids must not repeat across restarts and instances sharing
     * one cost log; a random per-process prefix does that. */
    if (RAND_bytes((unsigned char *)&r->start_id, sizeof(r->start_id)) != 1)
        r->start_id = uv_hrtime() ^ ((uint64_t)getpid() << 32);
    r->start_id &= 0xffffffffffULL;
    if (conf->tls_cert_file) {
        char why[1024];

        if ((r->tls_ctx = router__tls_server_ctx(conf, why, sizeof(why))) == NULL) {
            log_error("%s", why);
            if (errors)
                *errors = strdup(why);
            generation_free(r);
            return NULL;
        }
    }
    r->max_clients = router__fd_budget(conf);
    /* A pool kept from the config before keeps its accounting clock. */
    r->backends = backend_set_create_after(conf, sh->current ? sh->current->backends : NULL);
    if (r->backends == NULL || router__spend_init(r) != 0 || router__pools_init(r) != 0) {
        generation_free(r);
        return NULL;
    }
    /* Last: a handle must be closed through the loop, which the failures
     * above (a reload with a bad certificate) free without. */
    uv_timer_init(r->loop, &r->free_timer);
    r->free_timer.data = r;
    backend_set_start(r->backends, uv_now(r->loop));
    r->next_gen = sh->generations;
    sh->generations = r;
    return r;
}

static void generation_free(struct router *r)
{
    router__shelf_free(&r->shelf);
    buf_free(&r->request_out);
    router__spend_free(r);
    router__pools_free(r);
    backend_set_destroy(r->backends);
    SSL_CTX_free(r->tls_ctx);
    conf_free((struct conf *)r->conf);
    free(r);
}

static void generation_closed(uv_handle_t *h)
{
    generation_free(h->data);
}

static void generation_unlink(struct router *r)
{
    struct router **pp = &r->shared->generations;

    while (*pp && *pp != r)
        pp = &(*pp)->next_gen;
    if (*pp)
        *pp = r->next_gen;
}

/* Stop taking keep-alive requests, close idle clients and connections.
 * With `spare_fresh` (a reload, the listener stays), a connection that
 * has not had a request yet is left to get its one answer: its client
 * connected a moment ago and its request may be in the socket buffer
 * already, which a close would answer with a reset. (An idle keep-alive
 * connection has that race too, as in every HTTP/1.1 server, but its
 * client knows the connection was used and may have been closed.) */
static void generation_drain(struct router *r, int spare_fresh)
{
    struct router__client *c, *next;

    if (r->stopping)
        return;
    r->stopping = 1;
    for (c = r->clients; c != NULL; c = next) {
        next = c->next;
        /* Requests it had pipelined and we hold get their answers first
         * (client_last_answer), however they wait: behind one in
         * progress, or behind answers it has not read (backed_up). */
        c->drain_left = c->phase == ROUTER_CLIENT_LINGER ? 0 : c->pending.len;
        if (c->drain_left > 0)
            continue;
        /* A lingering one has its answer: at a reload it may finish
         * reading what its client still sends. */
        if (c->phase == ROUTER_CLIENT_IDLE && (c->served || !spare_fresh) &&
            router__client_write_queue(c) > 0)
            client_close_after_writes(c); /* its last answer, done but not yet read */
        else if ((c->phase == ROUTER_CLIENT_IDLE && (c->served || !spare_fresh)) ||
                 (c->phase == ROUTER_CLIENT_LINGER && !spare_fresh))
            router__client_close(c);
    }
    router__pools_close(r);
    router__maybe_finish(r);
}

void router__maybe_finish(struct router *r)
{
    struct router__shared *sh = r->shared;

    if (!r->stopping || r->freeing || r->nclients > 0 || r->nupstreams > 0 || r->store_pending > 0)
        return;
    /* Drained. The current generation stays until the whole router stops,
     * and then only closes its handle: router_destroy frees it. */
    if (r == sh->current && !sh->stopping)
        return;
    r->freeing = 1;
    generation_unlink(r);
    uv_close((uv_handle_t *)&r->free_timer, r == sh->current ? NULL : generation_closed);
    if (sh->stopping && sh->generations == NULL)
        shared_close(sh);
}

struct router *router_create(uv_loop_t *loop, struct conf *conf)
{
    struct router__shared *sh;
    struct router *r;

    settings_init();
    router__json_install();
    sh = shared_create(loop, conf);
    if (sh == NULL) {
        conf_free(conf);
        return NULL;
    }
    r = generation_create(sh, conf, NULL);
    if (r == NULL) {
        /* Until every close is done: a cost log write still out would
         * count what it gave up in the metrics freed below (bounded by
         * cost_log_wait_ms; main runs the loop to its end next anyway). */
        shared_close(sh);
        uv_run(loop, UV_RUN_DEFAULT);
        shared_free(sh);
        return NULL;
    }
    sh->current = r;
    return r;
}

static int differ(const char *a, const char *b)
{
    return a == NULL || b == NULL ? a != b : strcmp(a, b) != 0;
}


/* The first setting that the state made once at start (the store with its
 * connection and cache, the cost log file, the token tables) was made from and that `next`
 * changes, or NULL. A reload cannot apply such a change; run on the old
 * values while the file says otherwise, a router moved to Redis would
 * keep its budgets to itself. Names only: store.redis may hold a
 * password. */
static const char *restart_only_change(const struct conf *now, const struct conf *next)
{
    if (differ(now->redis_url, next->redis_url))
        return "store.redis";
    if (now->store_on_failure != next->store_on_failure)
        return "store.on_failure";
    if (differ(now->store_key_prefix, next->store_key_prefix))
        return "store.key_prefix";
    if (now->store_connect_timeout_ms != next->store_connect_timeout_ms)
        return "store.connect_timeout_ms";
    if (now->store_command_timeout_ms != next->store_command_timeout_ms)
        return "store.command_timeout_ms";
    if (now->store_reservation_ttl_ms != next->store_reservation_ttl_ms)
        return "store.reservation_ttl_ms";
    if (differ(now->store_journal_file, next->store_journal_file))
        return "store.journal_file";
    if (differ(now->store_spend_file, next->store_spend_file))
        return "store.spend_file";
    if (now->cache_ttl_s != next->cache_ttl_s)
        return "cache.ttl_s";
    if (now->cache_max_entry_bytes != next->cache_max_entry_bytes)
        return "cache.max_entry_bytes";
    if (now->cache_local_bytes != next->cache_local_bytes)
        return "cache.local_bytes";
    if (now->cache_shared != next->cache_shared)
        return "cache.shared";
    if (differ(now->cost_log, next->cost_log))
        return "cost_log";
    if (now->cost_log_buffer_max != next->cost_log_buffer_max)
        return "cost_log_buffer_max";
    if (now->cost_log_wait_ms != next->cost_log_wait_ms)
        return "cost_log_wait_ms";
    /* The token tables come from there: those loaded at start, and those
     * a reload names first (policy_tokens_add reads the folder they were
     * created with). Taken and ignored, it would look applied. */
    if (differ(now->tokenizer_data, next->tokenizer_data))
        return "tokenizer_data";
    return NULL;
}

struct router *router_reload(struct router *old, struct conf *conf, char **errors)
{
    struct router__shared *sh = old->shared;
    const char *fixed = restart_only_change(old->conf, conf);
    char summary[128];
    struct router *r;

    if (fixed != NULL) {
        char why[128];

        snprintf(why, sizeof(why), "%s cannot change without a restart; the config was not reloaded",
                 fixed);
        log_error("reload: %s", why);
        if (errors)
            *errors = strdup(why);
        conf_free(conf);
        return NULL;
    }

    /* Compared with the config at start, not the last reload's: that one
     * may name an address the listener never moved to. */
    if (conf->listen_port != sh->listen_port || strcmp(conf->listen_host, sh->listen_host) != 0)
        log_warn("reload: listen cannot change without a restart; still on %s", sh->listen_at);
    /* Still on the loop (~40 ms a table, once per process for each new
     * one): the tables live in sh->tokens, which the loop counts with and
     * which is not thread-safe, so a load off the loop would need a way to
     * move a table loaded apart into it, which policy/ does not have yet. */
    tokens_load(sh, conf, 1);
    r = generation_create(sh, conf, errors);
    if (r == NULL)
        return NULL;
    sh->current = r;
    router__account_idle(old);
    router__account_carry(r, old);
    router__forget_gauges(r);
    log_info("config reloaded: %s", conf_summary(conf, summary, sizeof(summary)));
    generation_drain(old, 1);
    return r;
}

void router_set_reload_hook(struct router *r, router_reload_hook *reload, void *arg)
{
    r->shared->reload = reload;
    r->shared->reload_arg = arg;
}

/* The address `conf`'s listen names: an IP address as it is, else a host
 * name resolved once, here at start (the loop is not running yet, so the
 * lookup may block), its first address taken, as nginx does with
 * `listen localhost:8080`. The config check takes any HOST, so a name
 * must work too. */
static int listen_address(uv_loop_t *loop, const struct conf *conf, struct sockaddr_storage *addr)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    uv_getaddrinfo_t req;
    int rc;

    if (uv_ip4_addr(conf->listen_host, conf->listen_port, (struct sockaddr_in *)addr) == 0 ||
        uv_ip6_addr(conf->listen_host, conf->listen_port, (struct sockaddr_in6 *)addr) == 0)
        return 0;
    /* No callback: uv_getaddrinfo runs the lookup there and then. */
    rc = uv_getaddrinfo(loop, &req, NULL, conf->listen_host, NULL, &hints);
    if (rc != 0) {
        log_error("listen: cannot resolve %s: %s", conf->listen_host, uv_strerror(rc));
        return rc;
    }
    memcpy(addr, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
    if (addr->ss_family == AF_INET6)
        ((struct sockaddr_in6 *)addr)->sin6_port = htons(conf->listen_port);
    else
        ((struct sockaddr_in *)addr)->sin_port = htons(conf->listen_port);
    uv_freeaddrinfo(req.addrinfo);
    return 0;
}

int router_start(struct router *r)
{
    struct router__shared *sh = r->shared;
    struct sockaddr_storage addr;
    struct sockaddr_storage bound;
    char host[64];
    int namelen = sizeof(bound), rc;

    if ((rc = listen_address(sh->loop, r->conf, &addr)) != 0)
        return rc;
    uv_tcp_init(sh->loop, &sh->listener);
    sh->listener.data = sh;
    uv_timer_init(sh->loop, &sh->accept_retry); /* closed with the listener */
    sh->accept_log.interval_ms = ROUTER_ACCEPT_LOG_MS;
    sh->listening = 1;
    rc = uv_tcp_bind(&sh->listener, (struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&sh->listener, 1024, on_connection);
    if (rc != 0) {
        log_error("listen on %s:%u: %s", r->conf->listen_host, r->conf->listen_port,
                  uv_strerror(rc));
        return rc;
    }
    uv_tcp_getsockname(&sh->listener, (struct sockaddr *)&bound, &namelen);
    if (bound.ss_family == AF_INET6)
        uv_ip6_name((struct sockaddr_in6 *)&bound, host, sizeof(host));
    else
        uv_ip4_name((struct sockaddr_in *)&bound, host, sizeof(host));
    rc = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    snprintf(sh->listen_host, sizeof(sh->listen_host), "%s", r->conf->listen_host);
    sh->listen_port = r->conf->listen_port;
    snprintf(sh->listen_at, sizeof(sh->listen_at), "%s:%d", host, rc);
    log_info("listening on %s:%d%s", host, rc, r->tls_ctx ? " (TLS)" : "");
    printf("listening on %s:%d\n", host, rc);
    fflush(stdout);
    return 0;
}

void router_stop(struct router *r)
{
    struct router__shared *sh = r->shared;
    struct router *g, *next;

    if (sh->stopping)
        return;
    sh->stopping = 1;
    if (sh->listening) {
        /* A connection put off for memory goes with the listener. */
        uv_close((uv_handle_t *)&sh->accept_retry, NULL);
        uv_close((uv_handle_t *)&sh->listener, NULL);
        sh->listening = 0;
    }
    for (g = sh->generations; g != NULL; g = next) {
        next = g->next_gen;
        generation_drain(g, 0);
        router__maybe_finish(g); /* an already drained one goes now */
    }
    /* Not started yet: a stop does not wait for the disk on their behalf. */
    router__park_refuse_all(sh);
    if (sh->generations == NULL)
        shared_close(sh);
}

void router_reopen_logs(struct router *r)
{
    if (r->cost_log) {
        log_info("reopening cost log %s", r->conf->cost_log);
        metrics_cost_log_reopen(r->cost_log);
    }
}

void router_destroy(struct router *r)
{
    struct router__shared *sh;

    if (r == NULL)
        return;
    sh = r->shared;
    /* After the loop: every other generation was freed while draining. */
    while (sh->generations) {
        struct router *g = sh->generations;

        sh->generations = g->next_gen;
        if (g != r)
            generation_free(g);
    }
    generation_free(r);
    shared_close(sh);
    shared_free(sh);
}
