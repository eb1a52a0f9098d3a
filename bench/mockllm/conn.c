/*
 * bench/mockllm/conn.c: one client connection of mockllm.
 *
 * Bytes read (decrypted first under TLS) land in c->in and are parsed with
 * llhttp in request mode. on_message_complete pauses the parser, so each
 * request is answered before the next pipelined one is parsed; the parse
 * cursor c->in_off keeps the rest. Header names and values, the URL and the
 * body are copied into reusable buffers of c->req as they arrive, so a field
 * split across two reads (two callbacks) is simply appended to.
 *
 * Output is batched in c->out and sent once per read or timer tick by
 * mockllm__conn_flush(): uv_try_write first, and only what the kernel did
 * not take goes to uv_write (that buffer moves into the write request).
 *
 * Closing: mockllm__conn_close() is the one close path. It closes both
 * handles; the struct is freed when the second close callback runs.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Before uv.h: glibc's sys/param.h (via uv.h) redefines MIN/MAX quietly,
 * the reverse order warns. */
#include "common/util.h"

#include "bench/mockllm/internal.h"
#include "common/log.h"

#define READ_CHUNK 16384
#define MAX_BUFFERED (8u << 20) /* unparsed input kept while busy, and body cap */

/* A uv_write in flight; owns the bytes it sends. */
struct write_req {
    uv_write_t req;   /* libuv request */
    struct buf bytes; /* the data, freed in write_cb */
};

static char tls_read_area[65536]; /* records are fed to OpenSSL at once */

static void process_input(struct mockllm_conn *c);

const char *mockllm__header(const struct mockllm_request *r, const char *name)
{
    return buf_pairs_get(&r->headers, name);
}

/* llhttp callbacks: copy the request's parts into c->req. */

static int on_message_begin(llhttp_t *p)
{
    struct mockllm_conn *c = p->data;

    buf_reset(&c->req.url);
    buf_reset(&c->req.headers);
    buf_reset(&c->req.body);
    c->req.method = NULL;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    struct mockllm_conn *c = p->data;
    return buf_append(&c->req.url, at, n) == 0 ? 0 : -1;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    struct mockllm_conn *c = p->data;
    struct buf *h = &c->req.headers;

    if (h->len + n > 65536 || buf_reserve(h, n) != 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        char ch = at[i];
        h->data[h->len++] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
    }
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    struct mockllm_conn *c = p->data;
    if (c->req.headers.len + n > 65536)
        return -1;
    return buf_append(&c->req.headers, at, n) == 0 ? 0 : -1;
}

/* Both field and value end with a NUL; llhttp calls these even for an
 * empty value, so the buffer always holds whole pairs. */
static int on_header_part_complete(llhttp_t *p)
{
    struct mockllm_conn *c = p->data;
    return buf_append(&c->req.headers, "", 1) == 0 ? 0 : -1;
}

static int on_headers_complete(llhttp_t *p)
{
    struct mockllm_conn *c = p->data;
    const char *expect = mockllm__header(&c->req, "expect");

    c->req.method = llhttp_method_name((llhttp_method_t)p->method);
    if (p->content_length > MAX_BUFFERED && p->content_length != UINT64_MAX)
        return -1;
    /* curl waits a second for this before sending a body over 1 KB. */
    if (expect != NULL && strcasecmp(expect, "100-continue") == 0 &&
        buf_append(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25) != 0)
        return -1;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct mockllm_conn *c = p->data;
    if (c->req.body.len + n > MAX_BUFFERED)
        return -1;
    return buf_append(&c->req.body, at, n) == 0 ? 0 : -1;
}

static int on_message_complete(llhttp_t *p)
{
    struct mockllm_conn *c = p->data;
    c->keep_alive = llhttp_should_keep_alive(p) != 0;
    return HPE_PAUSED;
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_field_complete = on_header_part_complete,
    .on_header_value_complete = on_header_part_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* Closing. */

static void on_handle_closed(uv_handle_t *h)
{
    struct mockllm_conn *c = h->data;

    if (--c->handles > 0)
        return;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        c->srv->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    buf_free(&c->in);
    buf_free(&c->out);
    buf_free(&c->cipher);
    buf_free(&c->req.url);
    buf_free(&c->req.headers);
    buf_free(&c->req.body);
    buf_free(&c->plan.model);
    buf_free(&c->plan.deferred);
    mockllm__tls_free(c->ssl);
    c->ssl = NULL;
    free(c);
}

void mockllm__conn_close(struct mockllm_conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    c->busy = 0;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    mockllm__conn_close(req->data);
}

void mockllm__conn_end(struct mockllm_conn *c, int abrupt)
{
    if (c->closing || c->ending)
        return;
    c->ending = 1;
    c->busy = 0;
    uv_timer_stop(&c->timer);
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
    if (c->ssl != NULL && !abrupt) {
        mockllm__conn_flush(c);
        mockllm__tls_close_notify(c->ssl, &c->cipher);
    }
    mockllm__conn_flush(c);
    if (c->closing)
        return;
    c->shutdown.data = c;
    if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
        mockllm__conn_close(c);
}

/* Writing. */

static void on_write(uv_write_t *req, int status)
{
    struct write_req *w = container_of(req, struct write_req, req);
    struct mockllm_conn *c = req->handle->data;

    buf_free(&w->bytes);
    free(w);
    if (status < 0 && status != UV_ECANCELED)
        mockllm__conn_close(c);
}

/* Send b and leave it empty: what uv_try_write does not take moves into a
 * write request, so b's memory is handed over, not copied. */
static void send_raw(struct mockllm_conn *c, struct buf *b)
{
    uv_buf_t ub = uv_buf_init(b->data, (unsigned)b->len);
    struct write_req *w;
    int n;

    if (b->len == 0)
        return;
    n = uv_try_write((uv_stream_t *)&c->tcp, &ub, 1);
    if (n == UV_EAGAIN || n == UV_ENOSYS)
        n = 0;
    if (n < 0) {
        buf_reset(b);
        mockllm__conn_close(c);
        return;
    }
    if ((size_t)n == b->len) {
        buf_reset(b);
        return;
    }
    w = malloc(sizeof(*w));
    if (w == NULL) {
        buf_reset(b);
        mockllm__conn_close(c);
        return;
    }
    w->bytes = *b;
    *b = (struct buf){0};
    ub = uv_buf_init(w->bytes.data + n, (unsigned)(w->bytes.len - (size_t)n));
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &ub, 1, on_write) != 0) {
        buf_free(&w->bytes);
        free(w);
        mockllm__conn_close(c);
    }
}

void mockllm__conn_flush(struct mockllm_conn *c)
{
    if (c->closing)
        return;
    if (c->ssl == NULL) {
        send_raw(c, &c->out);
        return;
    }
    if (c->out.len > 0) {
        int rc = mockllm__tls_seal(c->ssl, c->out.data, c->out.len, &c->cipher);
        buf_reset(&c->out);
        if (rc != 0) {
            mockllm__conn_close(c);
            return;
        }
    }
    send_raw(c, &c->cipher);
}

/* Reading. */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *out)
{
    struct mockllm_conn *c = h->data;

    if (c->ssl != NULL) {
        *out = uv_buf_init(tls_read_area, sizeof(tls_read_area));
        return;
    }
    if (c->in_off > 0) {
        buf_consume(&c->in, c->in_off);
        c->in_off = 0;
    }
    if (buf_reserve(&c->in, READ_CHUNK) != 0) {
        *out = uv_buf_init(NULL, 0);
        return;
    }
    *out = uv_buf_init(c->in.data + c->in.len, (unsigned)(c->in.cap - c->in.len));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct mockllm_conn *c = s->data;

    if (nread == 0)
        return;
    if (nread < 0) {
        uv_read_stop(s);
        c->reading = 0;
        c->peer_eof = 1;
        /* A stalled or idle connection just goes; an answer in progress
         * finishes (half-closed clients such as `nc -N` still read it). */
        if (nread != UV_EOF || !c->busy || c->plan.fault == MOCKLLM_FAULT_STALL ||
            c->plan.fault == MOCKLLM_FAULT_STALL_MIDSTREAM)
            mockllm__conn_close(c);
        return;
    }
    if (c->ssl != NULL) {
        int rc;
        if (c->in_off > 0) {
            buf_consume(&c->in, c->in_off);
            c->in_off = 0;
        }
        rc = mockllm__tls_feed(c->ssl, b->base, (size_t)nread, &c->in, &c->cipher);
        mockllm__conn_flush(c);
        if (rc < 0) {
            mockllm__conn_close(c);
            return;
        }
        if (rc == 1) { /* close_notify: like EOF, after what came with it */
            uv_read_stop(s);
            c->reading = 0;
            c->peer_eof = 1;
        }
    } else {
        c->in.len += (size_t)nread;
    }
    process_input(c);
}

static void start_reading(struct mockllm_conn *c)
{
    if (c->reading || c->peer_eof || c->ending || c->closing)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
        mockllm__conn_close(c);
        return;
    }
    c->reading = 1;
}

/* Answer a request that did not parse, then end the connection. */
static void reject_malformed(struct mockllm_conn *c, llhttp_errno_t err)
{
    static const char body[] = "{\"error\":{\"message\":\"malformed HTTP request\","
                               "\"type\":\"invalid_request_error\",\"param\":null,"
                               "\"code\":null}}";
    (void)err;
    if (buf_printf(&c->out,
                     "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                     sizeof(body) - 1, body) != 0)
        buf_reset(&c->out);
    mockllm__conn_end(c, 0);
}

/* Parse and answer requests from in_off until one is left in progress, the
 * input runs out, or the connection ends. Flushes once at the end. */
static void process_input(struct mockllm_conn *c)
{
    if (c->in_loop)
        return;
    c->in_loop = 1;
    while (!c->busy && !c->ending && !c->closing && c->in_off < c->in.len) {
        const char *start = c->in.data + c->in_off;
        llhttp_errno_t err = llhttp_execute(&c->parser, start, c->in.len - c->in_off);

        if (err == HPE_OK) {
            c->in_off = c->in.len;
            break;
        }
        if (err != HPE_PAUSED) {
            reject_malformed(c, err);
            break;
        }
        c->in_off += (size_t)(llhttp_get_error_pos(&c->parser) - start);
        llhttp_resume(&c->parser);
        c->busy = 1;
        mockllm__dispatch(c);
    }
    if (c->in_off == c->in.len) {
        buf_reset(&c->in);
        c->in_off = 0;
    }
    c->in_loop = 0;
    mockllm__conn_flush(c);
    if (c->closing || c->ending)
        return;
    /* Back-pressure: do not buffer unbounded pipelined input while busy. */
    if (c->busy && c->in.len - c->in_off > MAX_BUFFERED && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    } else if (!c->busy && c->peer_eof) {
        mockllm__conn_end(c, 0);
    } else {
        start_reading(c);
    }
}

void mockllm__conn_done(struct mockllm_conn *c)
{
    c->busy = 0;
    if (c->closing || c->ending)
        return;
    if (!c->keep_alive) {
        mockllm__conn_end(c, 0);
        return;
    }
    if (!c->in_loop)
        process_input(c);
}

void mockllm__conn_accept(struct mockllm_server *srv)
{
    struct mockllm_conn *c = calloc(1, sizeof(*c));
    int rc;

    if (c == NULL) {
        log_error("accept: out of memory");
        return;
    }
    c->srv = srv;
    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->handles = 2;
    c->next = srv->conns;
    if (srv->conns != NULL)
        srv->conns->prev = c;
    srv->conns = c;
    rc = uv_accept((uv_stream_t *)&srv->listener, (uv_stream_t *)&c->tcp);
    if (rc != 0) {
        log_warn("accept: %s", uv_strerror(rc));
        mockllm__conn_close(c);
        return;
    }
    srv->connections++;
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
    c->parser.data = c;
    if (srv->tls != NULL && (c->ssl = mockllm__tls_session(srv->tls)) == NULL) {
        mockllm__conn_close(c);
        return;
    }
    start_reading(c);
}
