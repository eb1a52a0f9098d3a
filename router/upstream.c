/*
 * router/upstream.c: connections to backends, pooled per backend.
 *
 * A connection is resolved (uv_getaddrinfo, off the loop), connected,
 * optionally wrapped in TLS (OpenSSL over memory BIOs: ciphertext moves
 * through libuv, OpenSSL never touches the socket), then carries one
 * request at a time. Its response is parsed by llhttp and reported to
 * proxy.c. When the response ends cleanly and both sides allow
 * keep-alive, the connection goes back to the idle list of its pool.
 *
 * One timer per connection follows its phase: connect (incl. TLS
 * handshake), first byte (of a stream: of its body, as its head may come
 * before its first token), then, once the answer has begun, the earlier
 * of total and read (the silence since the last read), and idle time in
 * the pool. A read only notes the loop's time: the timer, set for the
 * read deadline as it stood, finds a later read when it fires and waits
 * again from there (as nginx and libuv's docs do), so a steady answer
 * costs one timer start per read_timeout_ms, not one per read.
 *
 * A reused connection can have been closed by the server just as we
 * picked it; if it fails before any response byte, the request is sent
 * again once on a fresh connection to the same backend, which is not a
 * backend failure.
 */
#include <math.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "backends/backend.h"
#include "common/error.h"
#include "common/http_hop.h"
#include "common/http_status.h"
#include "common/log.h"
#include "common/util.h"
#include "conf/conf.h"
#include "router/internal.h"

/* Close pooled connections idle for this long (servers close theirs too). */
#define UPSTREAM_IDLE_MS 30000
#define UPSTREAM_OUT_KEEP 16384 /* request buffer a connection keeps between requests */

static llhttp_settings_t upstream_settings;
static void upstream_settings_init(void);
static char upstream_read_buf[65536];
static char upstream_plain_buf[65536];

struct upstream_write {
    uv_write_t req;  /* libuv request */
    size_t len;      /* bytes in data */
    char data[];     /* owned copy */
};

static void upstream_fail(struct router__upstream *u, const char *errstr);
static void upstream_close(struct router__upstream *u);
static void upstream_start_request(struct router__upstream *u);
static void finish_response(struct router__upstream *u, int can_keep);

/* ---- pool ---- */

static void idle_remove(struct router__upstream *u)
{
    struct router__pool *pool = u->pool;

    if (u->state != ROUTER_UP_IDLE)
        return;
    if (u->prev_idle)
        u->prev_idle->next_idle = u->next_idle;
    else
        pool->idle_head = u->next_idle;
    if (u->next_idle)
        u->next_idle->prev_idle = u->prev_idle;
    u->next_idle = u->prev_idle = NULL;
    pool->nidle--;
}

/* Back to the pool after a clean response, or closed if the pool is full
 * or the router is stopping. */
static void upstream_release(struct router__upstream *u)
{
    struct router__pool *pool = u->pool;

    u->client = NULL;
    if (pool->router->stopping || pool->nidle >= (unsigned)pool->conf->max_idle_connections) {
        upstream_close(u);
        return;
    }
    /* Paused for a slow client in the read that also ended the answer:
     * an idle connection must read, or the next request on it waits for
     * first_byte_timeout_ms and is sent again elsewhere (billed twice). */
    router__upstream_resume(u);
    u->state = ROUTER_UP_IDLE;
    u->next_idle = pool->idle_head;
    u->prev_idle = NULL;
    if (pool->idle_head)
        pool->idle_head->prev_idle = u;
    pool->idle_head = u;
    pool->nidle++;
    buf_recycle(&u->out, UPSTREAM_OUT_KEEP);
    router__deadline_set(&u->timeout, UPSTREAM_IDLE_MS);
}

int router__pools_init(struct router *r)
{
    const struct conf *conf = r->conf;

    upstream_settings_init();
    r->pools = calloc(conf->nbackends ? conf->nbackends : 1, sizeof(*r->pools));
    if (r->pools == NULL)
        return -1;
    for (size_t i = 0; i < conf->nbackends; i++) {
        struct router__pool *pool = &r->pools[i];

        pool->router = r;
        pool->conf = &conf->backends[i];
        pool->backend = backend_set_get(r->backends, i);
        pool->est_ratio = NAN;
        if (pool->conf->model &&
            (pool->model_json = router__json_quote(pool->conf->model)) == NULL)
            return -1;
        if (router__fixed_headers(pool->conf, &pool->fixed_headers) != 0)
            return -1;
        if (pool->conf->tls) {
            pool->ssl_ctx = router__tls_client_ctx(pool->conf);
            if (pool->ssl_ctx == NULL)
                return -1;
        }
    }
    return 0;
}

void router__pools_close(struct router *r)
{
    for (size_t i = 0; i < r->conf->nbackends; i++)
        while (r->pools[i].idle_head)
            upstream_close(r->pools[i].idle_head);
}

void router__pools_free(struct router *r)
{
    if (r->pools == NULL)
        return;
    for (size_t i = 0; i < r->conf->nbackends; i++) {
        SSL_CTX_free(r->pools[i].ssl_ctx);
        free(r->pools[i].model_json);
        if (r->pools[i].fixed_headers.data) /* the API key: wiped, not just freed */
            memset(r->pools[i].fixed_headers.data, 0, r->pools[i].fixed_headers.len);
        buf_free(&r->pools[i].fixed_headers);
    }
    free(r->pools);
    r->pools = NULL;
}

/* ---- closing ---- */

static void upstream_free(struct router__upstream *u)
{
    struct router *r = u->pool->router;

    u->pool->nopen--;
    r->nupstreams--;
    if (u->ssl)
        SSL_free(u->ssl);
    buf_free(&u->out);
    buf_free(&u->hname);
    buf_free(&u->hvalue);
    buf_free(&u->conn);
    buf_free(&u->headers);
    free(u);
    router__maybe_finish(r);
}

static void upstream_handle_closed(uv_handle_t *h)
{
    struct router__upstream *u = h->data;

    if (--u->handles_open == 0 && !u->resolving)
        upstream_free(u);
}

static void upstream_close(struct router__upstream *u)
{
    if (u->closing)
        return;
    u->closing = 1;
    idle_remove(u);
    u->client = NULL;
    if (u->resolving)
        uv_cancel((uv_req_t *)&u->gai);
    uv_close((uv_handle_t *)&u->tcp, upstream_handle_closed);
    uv_close((uv_handle_t *)&u->timeout.timer, upstream_handle_closed);
}

void router__upstream_abort(struct router__upstream *u)
{
    u->client = NULL;
    upstream_close(u);
}

/* ---- timers ---- */

/* Arm the deadline of an answer being received, its first event come (or
 * a plain answer's head): total_timeout_ms from the attempt's start, or
 * read_timeout_ms from the last read when that is sooner. Not the read
 * timeout while reading is paused for a slow client: that silence is the
 * client's, and the resume counts as a read. */
static void receive_deadline(struct router__upstream *u, uint64_t now)
{
    uint64_t at = u->total_at;
    uint64_t read_at = u->last_read_ms + (uint64_t)u->pool->conf->read_timeout_ms;

    if (!u->paused && read_at < at)
        at = read_at;
    router__deadline_set(&u->timeout, at > now ? (int)(at - now) : 1);
}

/* The receive deadline passed: the total or the read timeout, or neither
 * when a read came since it was set (then armed again from that read). */
static void receive_timeout(struct router__upstream *u)
{
    uint64_t now = uv_now(u->pool->router->loop);

    if (now >= u->total_at)
        upstream_fail(u, error_upstream_total_timeout);
    else if (!u->paused && now - u->last_read_ms >= (uint64_t)u->pool->conf->read_timeout_ms)
        upstream_fail(u, error_upstream_read_timeout);
    else
        receive_deadline(u, now);
}

static void phase_timeout(void *arg)
{
    struct router__upstream *u = arg;

    switch (u->state) {
    case ROUTER_UP_RESOLVING:
    case ROUTER_UP_CONNECTING:
    case ROUTER_UP_HANDSHAKE:
        upstream_fail(u, error_upstream_connect_timeout);
        break;
    case ROUTER_UP_WAITING:
        upstream_fail(u, error_upstream_first_byte_timeout);
        break;
    case ROUTER_UP_RECEIVING:
        if (u->await_body)
            upstream_fail(u, error_upstream_first_byte_timeout);
        else
            receive_timeout(u);
        break;
    case ROUTER_UP_IDLE:
        upstream_close(u);
        break;
    }
}

/* ---- failure ---- */

/* Copy of the request for a second try on a fresh connection. */
static int upstream_retry_fresh(struct router__upstream *u, struct router__client *c)
{
    struct buf req = u->out;
    int rc;

    u->out = (struct buf){0};
    rc = router__upstream_send_fresh(u->pool, c, req.data, req.len);
    buf_free(&req);
    return rc;
}

/* A reused connection that is reset or closed before any answer byte was
 * most likely closed by the backend as it sat idle: the request goes again
 * on a fresh one. A timeout is not that: the backend has the request and
 * is slow, and sending it again would have it served (and billed) twice.
 * `resend` also for an answer that says the request was not handled (a
 * 408 on a reused connection: on_headers_complete). */
static void upstream_fail_resend(struct router__upstream *u, const char *errstr, int resend)
{
    struct router__client *c = u->client;

    if (resend && u->reused && c != NULL) {
        log_debug("backend %s: reused connection failed (%s), retrying on a new one",
                  u->pool->conf->name, errstr);
        u->client = NULL;
        if (upstream_retry_fresh(u, c) == 0) {
            upstream_close(u);
            return;
        }
    }
    u->client = NULL;
    upstream_close(u);
    if (c)
        router__proxy_on_error(c, errstr);
}

static void upstream_fail(struct router__upstream *u, const char *errstr)
{
    upstream_fail_resend(u, errstr, !u->got_bytes && errstr == error_upstream_io);
}

/* ---- writing ---- */

/* The request is the backend's once the socket has taken its last byte
 * (into the kernel: whether the backend read it, the router cannot
 * know). From then on an API bills its prompt, and a client that leaves
 * is charged it (proxy.c). */
static void note_request_sent(struct router__upstream *u)
{
    if (u->client != NULL && u->state == ROUTER_UP_WAITING &&
        uv_stream_get_write_queue_size((uv_stream_t *)&u->tcp) == 0)
        u->client->req.request_sent = 1;
}

static void write_done(uv_write_t *req, int status)
{
    struct upstream_write *w = container_of(req, struct upstream_write, req);
    struct router__upstream *u = req->data;

    free(w);
    if (status < 0 && status != UV_ECANCELED && !u->closing)
        upstream_fail(u, error_upstream_io);
    else if (status == 0 && !u->closing)
        note_request_sent(u);
}

static int write_bytes(struct router__upstream *u, const char *p, size_t len)
{
    struct upstream_write *w;
    uv_buf_t b;

    if (len == 0)
        return 0;
    /* Most requests fit the socket buffer: no copy, no queued write. */
    if (uv_stream_get_write_queue_size((uv_stream_t *)&u->tcp) == 0) {
        uv_buf_t direct = uv_buf_init((char *)p, (unsigned)len);
        int n = uv_try_write((uv_stream_t *)&u->tcp, &direct, 1);

        if (n == (int)len)
            return 0;
        if (n < 0 && n != UV_EAGAIN)
            return -1;
        if (n > 0) {
            p += n;
            len -= (size_t)n;
        }
    }
    w = malloc(sizeof(*w) + len);
    if (w == NULL)
        return -1;
    memcpy(w->data, p, len);
    w->len = len;
    w->req.data = u;
    b = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&u->tcp, &b, 1, write_done) != 0) {
        free(w);
        return -1;
    }
    return 0;
}

/* Move whatever TLS produced for the network onto the socket. */
static int tls_flush(struct router__upstream *u)
{
    BIO *wbio = SSL_get_wbio(u->ssl);
    char *p;
    long n = BIO_get_mem_data(wbio, &p);
    int rc;

    if (n <= 0)
        return 0;
    rc = write_bytes(u, p, (size_t)n);
    router__tls_wbio_clear(u->ssl);
    return rc;
}

/* Send the request bytes kept in u->out (kept until the response starts
 * so a reused connection's failure can resend them). */
static void upstream_start_request(struct router__upstream *u)
{
    int rc;

    u->state = ROUTER_UP_WAITING;
    router__deadline_set(&u->timeout, u->pool->conf->first_byte_timeout_ms);
    if (u->ssl) {
        rc = SSL_write(u->ssl, u->out.data, (int)u->out.len) > 0 ? 0 : -1;
        rc = rc ?: tls_flush(u);
    } else {
        rc = write_bytes(u, u->out.data, u->out.len);
    }
    if (rc != 0)
        upstream_fail(u, error_upstream_io);
    else
        note_request_sent(u);
}

/* ---- TLS handshake ---- */

static void tls_log_error(struct router__upstream *u, const char *what)
{
    unsigned long e = ERR_get_error();
    char msg[256] = "";
    long verify = SSL_get_verify_result(u->ssl);

    if (e)
        ERR_error_string_n(e, msg, sizeof(msg));
    log_warn("backend %s: TLS %s failed: %s%s%s", u->pool->conf->name, what, msg,
             verify != X509_V_OK ? " certificate: " : "",
             verify != X509_V_OK ? X509_verify_cert_error_string(verify) : "");
    ERR_clear_error();
}

static void tls_handshake_step(struct router__upstream *u)
{
    int rc = SSL_do_handshake(u->ssl);

    if (tls_flush(u) != 0) {
        upstream_fail(u, error_upstream_connect);
        return;
    }
    if (rc == 1) {
        upstream_start_request(u);
        return;
    }
    if (SSL_get_error(u->ssl, rc) == SSL_ERROR_WANT_READ)
        return;
    tls_log_error(u, "handshake");
    upstream_fail(u, error_upstream_connect);
}

static int tls_start(struct router__upstream *u)
{
    const struct conf_backend *b = u->pool->conf;
    struct in6_addr addr;
    int is_ip = inet_pton(AF_INET, b->host, &addr) == 1 || inet_pton(AF_INET6, b->host, &addr) == 1;

    u->ssl = SSL_new(u->pool->ssl_ctx);
    if (u->ssl == NULL)
        return -1;
    SSL_set_bio(u->ssl, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
    SSL_set_connect_state(u->ssl);
    if (!is_ip && SSL_set_tlsext_host_name(u->ssl, b->host) != 1)
        return -1;
    if (b->tls_verify) {
        X509_VERIFY_PARAM *param = SSL_get0_param(u->ssl);

        if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, b->host) != 1
                  : X509_VERIFY_PARAM_set1_host(param, b->host, 0) != 1)
            return -1;
    }
    u->state = ROUTER_UP_HANDSHAKE;
    tls_handshake_step(u);
    return 0;
}

/* ---- reading ---- */

static void read_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    buf->base = upstream_read_buf;
    buf->len = sizeof(upstream_read_buf);
}

/* Feed response bytes to llhttp. Returns -1 once the connection is gone
 * or handed back (the caller must stop touching it). */
static int parse_response(struct router__upstream *u, const char *p, size_t len)
{
    struct router__client *c;
    enum llhttp_errno err;

    if (u->state == ROUTER_UP_IDLE) {
        /* Bytes nobody asked for: the connection can't be trusted. */
        upstream_close(u);
        return -1;
    }
    c = u->client;
    if (c)
        router__proxy_batch(c);
    err = llhttp_execute(&u->parser, p, len);
    /* A complete response is flushed by router__proxy_on_complete, after
     * its end has joined the batch. */
    if (c && u->client == c && !u->closing && !(err == HPE_PAUSED && u->complete))
        router__proxy_flush(c);
    if (err == HPE_OK)
        return u->closing ? -1 : 0;
    if (u->closing)
        return -1; /* abandoned by proxy.c */
    if (err == HPE_PAUSED && u->complete) {
        /* Bytes after a complete response are a protocol error: no reuse.
         * Over TLS they may be in a record SSL_read has not given yet
         * (still in the read BIO, or decrypted and buffered): pooled with
         * them, the connection would hand them to its next request as
         * that request's answer. */
        const char *pos = llhttp_get_error_pos(&u->parser);
        int more = u->ssl != NULL &&
                   (SSL_has_pending(u->ssl) || BIO_ctrl_pending(SSL_get_rbio(u->ssl)) > 0);
        finish_response(u, pos == p + len && !more);
        return -1;
    }
    log_warn("backend %s: bad HTTP response: %s", u->pool->conf->name,
             llhttp_get_error_reason(&u->parser));
    upstream_fail(u, error_upstream_io);
    return -1;
}

/* The connection ended: `clean` for a close (EOF; over TLS only
 * close_notify, RFC 8446 6.1: a TCP close without it is a truncation, a
 * crashed server or an attacker), not for a reset or another error,
 * which breaks a response delimited by the connection's end as it breaks
 * any other. */
static void on_eof(struct router__upstream *u, int clean)
{
    /* A response delimited by connection close ends here. */
    if (clean && u->state == ROUTER_UP_RECEIVING && llhttp_finish(&u->parser) == HPE_PAUSED &&
        u->complete) {
        finish_response(u, 0);
        return;
    }
    if (u->closing)
        return;
    if (u->state == ROUTER_UP_IDLE) {
        upstream_close(u);
        return;
    }
    upstream_fail(u, error_upstream_io);
}

static void upstream_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct router__upstream *u = s->data;
    int n;

    if (nread == 0 || u->closing)
        return;
    if (nread < 0) {
        on_eof(u, nread == UV_EOF && u->ssl == NULL);
        return;
    }
    u->last_read_ms = uv_now(s->loop); /* for the read timeout: see receive_timeout */
    if (u->ssl == NULL) {
        parse_response(u, buf->base, (size_t)nread);
        return;
    }
    if (BIO_write(SSL_get_rbio(u->ssl), buf->base, (int)nread) != (int)nread) {
        upstream_fail(u, error_upstream_io);
        return;
    }
    if (u->state == ROUTER_UP_HANDSHAKE) {
        tls_handshake_step(u);
        if (u->closing || u->state == ROUTER_UP_HANDSHAKE)
            return;
    }
    while ((n = SSL_read(u->ssl, upstream_plain_buf, sizeof(upstream_plain_buf))) > 0)
        if (parse_response(u, upstream_plain_buf, (size_t)n) != 0)
            return;
    switch (SSL_get_error(u->ssl, n)) {
    case SSL_ERROR_WANT_READ:
        if (tls_flush(u) != 0)
            upstream_fail(u, error_upstream_io);
        break;
    case SSL_ERROR_ZERO_RETURN:
        on_eof(u, 1);
        break;
    default:
        tls_log_error(u, "read");
        upstream_fail(u, error_upstream_io);
    }
}

void router__upstream_pause(struct router__upstream *u)
{
    if (u->paused || u->closing)
        return;
    u->paused = 1;
    uv_read_stop((uv_stream_t *)&u->tcp);
}

void router__upstream_resume(struct router__upstream *u)
{
    if (!u->paused || u->closing)
        return;
    u->paused = 0;
    uv_read_start((uv_stream_t *)&u->tcp, read_alloc, upstream_read);
    /* The pause was the client's: read_timeout_ms starts again now. */
    u->last_read_ms = uv_now(u->pool->router->loop);
    if (u->state == ROUTER_UP_RECEIVING && !u->await_body)
        receive_deadline(u, u->last_read_ms);
}

/* ---- llhttp response callbacks ---- */

static struct router__upstream *parser_upstream(llhttp_t *p)
{
    return container_of(p, struct router__upstream, parser);
}

static int on_message_begin(llhttp_t *p)
{
    struct router__upstream *u = parser_upstream(p);

    u->got_bytes = 1;
    u->is_sse = 0;
    u->await_body = 0;
    u->head_bytes = 0;
    u->retry_after_ms = -1;
    u->retry_after_in_ms = 0;
    u->request_id_seen = 0;
    buf_reset(&u->headers);
    buf_reset(&u->conn);
    return 0;
}

/* Count header bytes against limits.max_header_bytes, as the client side
 * does: a backend that never ends its head would otherwise grow these
 * buffers until a timeout. Past it, the answer is a bad response (502,
 * or the next candidate). */
static int upstream_head_add(llhttp_t *p, size_t len)
{
    struct router__upstream *u = parser_upstream(p);

    u->head_bytes += len;
    if (u->head_bytes <= (size_t)u->pool->router->conf->max_header_bytes)
        return 0;
    llhttp_set_error_reason(p, "response head over limits.max_header_bytes");
    return -1;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    if (upstream_head_add(p, len) != 0)
        return -1;
    return buf_append(&parser_upstream(p)->hname, at, len) == 0 ? 0 : -1;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    if (upstream_head_add(p, len) != 0)
        return -1;
    return buf_append(&parser_upstream(p)->hvalue, at, len) == 0 ? 0 : -1;
}

/* Response headers that describe the upstream hop, or that the router
 * sets itself, are not forwarded. The whole x-costrouter- prefix is the
 * router's: a backend's x-costrouter-saved-usd or -budget-remaining-usd
 * would pass for the router's own word to the client. Nor is Set-Cookie:
 * the router never sends a client's cookies on, so a backend's (a CDN's
 * in front of an API) would be kept by clients of the router's site for
 * nothing, one tenant's next to another's. Nor the backend's CORS
 * headers (Access-Control-*): which pages may read an answer is the
 * router's word (`cors:`), and a second Access-Control-Allow-Origin
 * beside the router's makes browsers refuse the answer. */
static int response_header_is_ours(struct slice name)
{
    static const char *const names[] = {
        "connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
        "upgrade", "proxy-connection", "x-request-id", "set-cookie",
    };

    if (name.len >= 13 && strncasecmp(name.p, "x-costrouter-", 13) == 0)
        return 1;
    if (name.len >= 15 && strncasecmp(name.p, "access-control-", 15) == 0)
        return 1;
    return slice_caseeq_any(name, names, ARRAY_SIZE(names));
}

/* A backend's x-ratelimit-* speak of the router's account with it, shared
 * by every tenant: to a client whose tenant or key has limits of the
 * router's, they go in favour of the router's own (router__rate_headers),
 * which speak of its limits; two values of one header would contradict. */
static int rate_header_replaced(const struct router__upstream *u, struct slice name)
{
    return name.len >= 12 && strncasecmp(name.p, "x-ratelimit-", 12) == 0 && u->client != NULL &&
           router__rate_limited(u->client);
}

/* A 429's wait: retry-after-ms (Azure OpenAI) over Retry-After, as
 * OpenAI's SDKs read them. Other statuses leave it unread. */
static void note_retry_after(struct router__upstream *u, int status, struct slice name,
                             struct slice value)
{
    int in_ms;
    int64_t ms;

    if (status != 429)
        return;
    if (slice_caseeq(name, "retry-after-ms"))
        in_ms = 1;
    else if (slice_caseeq(name, "retry-after") && !u->retry_after_in_ms)
        in_ms = 0;
    else
        return;
    ms = http_retry_after_ms(value.p, value.len, in_ms, time(NULL));
    if (ms >= 0) {
        u->retry_after_ms = ms;
        u->retry_after_in_ms = in_ms;
    }
}

static int on_header_value_complete(llhttp_t *p)
{
    struct router__upstream *u = parser_upstream(p);
    struct slice name = {u->hname.data, u->hname.len};
    struct slice value = {u->hvalue.data, u->hvalue.len};
    int rc = 0;

    if (slice_caseeq(name, "content-type") && value.len >= 17 &&
        strncasecmp(value.p, "text/event-stream", 17) == 0)
        u->is_sse = 1;
    note_retry_after(u, p->status_code, name, value);
    if (slice_caseeq(name, "request-id"))
        u->request_id_seen = 1;
    if (slice_caseeq(name, "connection"))
        rc = (u->conn.len > 0 ? buf_append_lit(&u->conn, ",") : 0) ?:
             buf_append(&u->conn, value.p, value.len);
    else if (!response_header_is_ours(name) && name.len > 0 && !rate_header_replaced(u, name))
        rc = buf_append_header(&u->headers, name, value);
    buf_reset(&u->hname);
    buf_reset(&u->hvalue);
    return rc == 0 ? 0 : -1;
}

/* A 1xx (100, 103; 101 ends as an upgrade) is followed by the real
 * head. RFC 9112 6.3: it ends at its blank line whatever it says, and
 * RFC 9110 8.6 forbids it a Content-Length. One that announces a body
 * anyway is a bad response: whether its bytes are that body or the next
 * head is a guess, and a wrong guess puts the backend's bytes into the
 * client's connection as an answer of their own. */
static int interim_head(llhttp_t *p)
{
    if ((p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0)) {
        llhttp_set_error_reason(p, "1xx response with a body");
        return -1;
    }
    return 1; /* no body: llhttp reads the next head */
}

/* Drop the headers the backend's Connection named (they describe its hop
 * to us only). They may come before Connection, so this runs on the whole
 * head, in place. */
static void drop_named_hop_headers(struct router__upstream *u)
{
    struct http_hop_names hop = {.n = 0};

    if (u->conn.len == 0)
        return;
    http_hop_names_add(&hop, (struct slice){u->conn.data, u->conn.len});
    u->headers.len = http_hop_filter(u->headers.data, u->headers.data, u->headers.len, &hop,
                                     (struct slice){NULL, 0});
}

/* What total_timeout_ms leaves of the attempt at `now` (at least 1 ms). */
static int total_left(const struct router__upstream *u, uint64_t now)
{
    uint64_t elapsed = now - u->client->req.attempt_start_ms;
    int total = u->pool->conf->total_timeout_ms;

    return total > (int)elapsed ? total - (int)elapsed : 1;
}

static int on_headers_complete(llhttp_t *p)
{
    struct router__upstream *u = parser_upstream(p);
    struct router__client *c = u->client;
    int bodyless = http_status_bodyless(p->status_code);
    int64_t length = -1; /* chunked, or until the connection closes */
    uint64_t now;
    int total;

    if (c == NULL)
        return -1;
    if (bodyless)
        length = 0;
    else if ((p->flags & F_CONTENT_LENGTH) && !(p->flags & F_CHUNKED))
        length = (int64_t)p->content_length;
    /* RFC 9110 15: a status is 100-599; the router and its clients give
     * no meaning to others (what class is a 999?). */
    if (p->status_code < 100 || p->status_code > 599) {
        llhttp_set_error_reason(p, "response status out of 100-599");
        return -1;
    }
    if (p->status_code < 200)
        return interim_head(p);
    if (p->status_code == 408 && u->reused) {
        /* RFC 9110 15.5.9: the server did not get the request, and the
         * client may send it again. Node's server sends one as it closes
         * a keep-alive connection it timed out, which the router may
         * have reused that very moment: as for a reset there, the
         * request goes again on a fresh connection (Chromium and Firefox
         * do so). A 408 on that one is the backend's answer (proxy.c). */
        upstream_fail_resend(u, error_upstream_io, 1);
        return -1;
    }
    drop_named_hop_headers(u);
    /* The request bytes are no longer needed for a resend; the buffer
     * serves the next request on this connection. */
    buf_recycle(&u->out, UPSTREAM_OUT_KEEP);
    u->state = ROUTER_UP_RECEIVING;
    now = uv_now(u->pool->router->loop);
    total = total_left(u, now);
    u->total_at = now + (uint64_t)total;
    /* A stream's head is no answer yet: vLLM's and TGI's servers send it
     * at once, and their first event with the first token. Until that
     * first body byte the first-byte timeout still runs (proxy.c holds
     * the head until then, so that another candidate may serve). */
    u->await_body = u->is_sse && p->status_code < 400;
    if (!u->await_body)
        receive_deadline(u, now);
    else if (u->timeout.at <= now || u->timeout.at > u->total_at)
        router__deadline_set(&u->timeout, total);
    if (router__proxy_on_head(c, p->status_code, &u->headers, length, u->is_sse,
                              u->retry_after_ms) != 0)
        return -1;
    /* llhttp 8 reads a 304's Content-Length bytes as its body unless told:
     * 1 skips the body. */
    return u->client ? bodyless : -1;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct router__upstream *u = parser_upstream(p);

    if (u->client == NULL)
        return -1;
    /* Never forward what is not the final answer's body (interim_head
     * refuses a 1xx body; this keeps it so). */
    if (p->status_code < 200)
        return -1;
    if (u->await_body) { /* a stream's first event: total and read timeouts from here on */
        u->await_body = 0;
        receive_deadline(u, uv_now(u->pool->router->loop));
    }
    router__proxy_on_body(u->client, at, len);
    return u->client && !u->closing ? 0 : -1;
}

/* Mark the response complete and pause llhttp; finish_response runs
 * after llhttp_execute returns, when the parser may be reset. */
static int on_message_complete(llhttp_t *p)
{
    struct router__upstream *u = parser_upstream(p);

    if (p->status_code < 200)
        return 0;
    u->complete = 1;
    u->keep_alive = llhttp_should_keep_alive(p) ? 1 : 0;
    return HPE_PAUSED;
}

/* The response ended cleanly: pool or close the connection first (so a
 * pipelined next request can take it), then tell proxy.c. */
static void finish_response(struct router__upstream *u, int can_keep)
{
    struct router__client *c = u->client;

    u->client = NULL;
    u->complete = 0;
    if (can_keep && u->keep_alive) {
        llhttp_init(&u->parser, HTTP_RESPONSE, &upstream_settings);
        u->got_bytes = 0;
        u->reused = 0;
        upstream_release(u);
    } else {
        upstream_close(u);
    }
    if (c)
        router__proxy_on_complete(c);
}

/* ---- connecting ---- */

/* Why a connect could not start. Out of descriptors is the router's own
 * limit, not the backend's failure: it must not open the backend's
 * circuit or send the request to a dearer backend. */
static const char *connect_error(struct router__upstream *u, int rc)
{
    struct router *r = u->pool->router;
    char note[LOG_EVERY_NOTE_MAX];

    if (rc != UV_EMFILE && rc != UV_ENFILE)
        return error_upstream_connect;
    if (log_every_due(&r->shared->nofile_log, router__now(r), note))
        log_warn("backend %s: no descriptor for a new connection (%s): answering 503; raise "
                 "the open-file limit or lower limits.max_connections%s",
                 u->pool->conf->name, uv_strerror(rc), note);
    return error_no_descriptors;
}

static void on_connect(uv_connect_t *req, int status)
{
    struct router__upstream *u = req->data;

    if (status == UV_ECANCELED || u->closing)
        return;
    if (status < 0) {
        log_info("backend %s: connect to %s:%u: %s", u->pool->conf->name, u->pool->conf->host,
                 u->pool->conf->port, uv_strerror(status));
        upstream_fail(u, error_upstream_connect);
        return;
    }
    uv_tcp_nodelay(&u->tcp, 1);
    if (uv_read_start((uv_stream_t *)&u->tcp, read_alloc, upstream_read) != 0) {
        upstream_fail(u, error_upstream_connect);
        return;
    }
    if (u->ssl == NULL && u->pool->ssl_ctx) {
        if (tls_start(u) != 0) {
            tls_log_error(u, "setup");
            upstream_fail(u, error_upstream_connect);
        }
        return;
    }
    upstream_start_request(u);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct router__upstream *u = req->data;
    int rc;

    u->resolving = 0;
    if (u->closing) {
        uv_freeaddrinfo(res);
        if (u->handles_open == 0)
            upstream_free(u);
        return;
    }
    if (status < 0 || res == NULL) {
        log_info("backend %s: resolve %s: %s", u->pool->conf->name, u->pool->conf->host,
                 uv_strerror(status));
        uv_freeaddrinfo(res);
        upstream_fail(u, connect_error(u, status));
        return;
    }
    u->state = ROUTER_UP_CONNECTING;
    u->connect_req.data = u;
    rc = uv_tcp_connect(&u->connect_req, &u->tcp, res->ai_addr, on_connect);
    uv_freeaddrinfo(res);
    if (rc != 0)
        upstream_fail(u, connect_error(u, rc));
}

static struct router__upstream *upstream_new(struct router__pool *pool)
{
    struct router__upstream *u = calloc(1, sizeof(*u));
    uv_loop_t *loop = pool->router->loop;

    if (u == NULL)
        return NULL;
    u->pool = pool;
    uv_tcp_init(loop, &u->tcp);
    router__deadline_init(loop, &u->timeout, u, phase_timeout);
    u->tcp.data = u;
    u->handles_open = 2;
    llhttp_init(&u->parser, HTTP_RESPONSE, &upstream_settings);
    pool->nopen++;
    pool->router->nupstreams++;
    return u;
}

/* Once per process: the parsers of every generation point at these, so a
 * reload must not reset them while the old one's responses are parsed. */
static void upstream_settings_init(void)
{
    if (upstream_settings.on_body != NULL)
        return;
    llhttp_settings_init(&upstream_settings);
    upstream_settings.on_message_begin = on_message_begin;
    upstream_settings.on_header_field = on_header_field;
    upstream_settings.on_header_value = on_header_value;
    upstream_settings.on_header_value_complete = on_header_value_complete;
    upstream_settings.on_headers_complete = on_headers_complete;
    upstream_settings.on_body = on_body;
    upstream_settings.on_message_complete = on_message_complete;
}

int router__upstream_send_fresh(struct router__pool *pool, struct router__client *c,
                                const char *request, size_t len)
{
    struct router__upstream *u;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    char port[8];
    int rc;

    u = upstream_new(pool);
    if (u == NULL)
        return -1;
    if (buf_append(&u->out, request, len) != 0) {
        upstream_close(u);
        return -1;
    }
    u->client = c;
    c->req.up = u;
    c->req.request_sent = 0; /* a resend after a reused connection failed: not yet */
    u->state = ROUTER_UP_RESOLVING;
    u->gai.data = u;
    snprintf(port, sizeof(port), "%u", pool->conf->port);
    router__deadline_set(&u->timeout, pool->conf->connect_timeout_ms);
    rc = uv_getaddrinfo(pool->router->loop, &u->gai, on_resolved, pool->conf->host, port, &hints);
    if (rc != 0) {
        u->client = NULL;
        c->req.up = NULL;
        upstream_close(u);
        return -1;
    }
    u->resolving = 1;
    return 0;
}

int router__upstream_send(struct router__pool *pool, struct router__client *c, const char *request,
                          size_t len)
{
    struct router__upstream *u = pool->idle_head;

    if (u == NULL)
        return router__upstream_send_fresh(pool, c, request, len);
    idle_remove(u);
    if (buf_append(&u->out, request, len) != 0) {
        upstream_close(u);
        return -1;
    }
    u->client = c;
    u->reused = 1;
    c->req.up = u;
    c->req.request_sent = 0;
    upstream_start_request(u);
    return 0;
}
