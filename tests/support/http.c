/* tests/support/http.c: blocking HTTP/1.1 test client (see http.h). */
#define _GNU_SOURCE /* memmem */
#include "tests/support/http.h"
#include <cjson/cJSON.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define READ_CHUNK 16384

double support_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* llhttp callbacks: fill c->cur. A field split across two reads arrives in
 * two callbacks and is simply appended to. */

static struct support_http_response *cur(llhttp_t *p)
{
    return ((struct support_http_conn *)p->data)->cur;
}

static int on_message_begin(llhttp_t *p)
{
    struct support_http_conn *c = p->data;
    c->cur->ttfb_ms = c->read_at - c->sent_at;
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    struct buf *h = &cur(p)->headers;

    if (buf_reserve(h, n) != 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        h->data[h->len++] = (at[i] >= 'A' && at[i] <= 'Z') ? (char)(at[i] + 32) : at[i];
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    return buf_append(&cur(p)->headers, at, n) == 0 ? 0 : -1;
}

static int on_header_end(llhttp_t *p)
{
    return buf_append(&cur(p)->headers, "", 1) == 0 ? 0 : -1;
}

static int on_headers_complete(llhttp_t *p)
{
    struct support_http_conn *c = p->data;

    cur(p)->status = p->status_code;
    cur(p)->headers_done = 1;
    return c->head ? 1 : 0; /* 1: no body follows */
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    return buf_append(&cur(p)->body, at, n) == 0 ? 0 : -1;
}

static int on_message_complete(llhttp_t *p)
{
    struct support_http_conn *c = p->data;

    c->cur->complete = 1;
    c->cur->total_ms = c->read_at - c->sent_at;
    return HPE_PAUSED; /* the next bytes belong to the next response */
}

static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_field_complete = on_header_end,
    .on_header_value_complete = on_header_end,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

int support_http_listen(int *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(fd, 16) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &alen) != 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

int support_http_connect(struct support_http_conn *c, int port)
{
    return support_http_connect_rcvbuf(c, port, 0);
}

int support_http_connect_rcvbuf(struct support_http_conn *c, int port, int rcvbuf)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int one = 1, err;

    *c = (struct support_http_conn){.fd = -1};
    llhttp_init(&c->parser, HTTP_RESPONSE, &settings);
    c->parser.data = c;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        return -errno;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* Before connect: the window scale is agreed in the handshake. */
    if (rcvbuf > 0 && setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)) != 0) {
        err = errno;
        close(c->fd);
        c->fd = -1;
        return -err;
    }
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        err = errno;
        close(c->fd);
        c->fd = -1;
        return -err;
    }
    return 0;
}

/* Wait until fd is ready for `events`, or deadline. Returns 0 or -ETIMEDOUT. */
static int wait_fd(int fd, short events, double deadline)
{
    struct pollfd pfd = {.fd = fd, .events = events};
    double left = deadline - support_mono_ms();

    if (left <= 0 || poll(&pfd, 1, (int)left + 1) == 0)
        return -ETIMEDOUT;
    return 0;
}

/* After a non-blocking TLS call returned n <= 0: wait for what it needs.
 * Returns 0 to call again, -ETIMEDOUT, or -EPROTO (a TLS failure). */
static int tls_wait(struct support_http_conn *c, int n, double deadline)
{
    switch (SSL_get_error(c->ssl, n)) {
    case SSL_ERROR_WANT_READ:
        return wait_fd(c->fd, POLLIN, deadline);
    case SSL_ERROR_WANT_WRITE:
        return wait_fd(c->fd, POLLOUT, deadline);
    default:
        ERR_clear_error();
        return -EPROTO;
    }
}

int support_https_connect(struct support_http_conn *c, int port, const char *ca_file,
                          int timeout_ms)
{
    static const unsigned char alpn[] = "\x02h2\x08http/1.1";
    double deadline = support_mono_ms() + timeout_ms;
    int rc = support_http_connect(c, port), n;

    if (rc != 0)
        return rc;
    c->ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (c->ssl_ctx == NULL || SSL_CTX_load_verify_locations(c->ssl_ctx, ca_file, NULL) != 1)
        return -EPROTO;
    SSL_CTX_set_verify(c->ssl_ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_mode(c->ssl_ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_alpn_protos(c->ssl_ctx, alpn, sizeof(alpn) - 1);
    c->ssl = SSL_new(c->ssl_ctx);
    if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1 ||
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), "127.0.0.1") != 1)
        return -EPROTO;
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    while ((n = SSL_connect(c->ssl)) != 1)
        if ((rc = tls_wait(c, n, deadline)) != 0)
            return rc;
    return 0;
}

const char *support_https_alpn(const struct support_http_conn *c, char *out, size_t size)
{
    const unsigned char *p = NULL;
    unsigned len = 0;

    if (c->ssl)
        SSL_get0_alpn_selected(c->ssl, &p, &len);
    snprintf(out, size, "%.*s", (int)len, p ? (const char *)p : "");
    return out;
}

static int tls_send(struct support_http_conn *c, const char *p, size_t len)
{
    double deadline = support_mono_ms() + 10000;
    int n, rc;

    while (len > 0) {
        n = SSL_write(c->ssl, p, (int)len);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
        } else if ((rc = tls_wait(c, n, deadline)) != 0) {
            return rc;
        }
    }
    c->sent_at = support_mono_ms();
    return 0;
}

int support_http_send(struct support_http_conn *c, const void *data, size_t len)
{
    const char *p = data;

    if (c->ssl)
        return tls_send(c, p, len);
    while (len > 0) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        p += n;
        len -= (size_t)n;
    }
    c->sent_at = support_mono_ms();
    return 0;
}

/* One SSL_read into c->in. A record not yet whole is no progress; a
 * close_notify, a reset or a TLS error is the end of the connection. */
static int tls_recv(struct support_http_conn *c)
{
    int n = SSL_read(c->ssl, c->in.data + c->in.len, (int)(c->in.cap - c->in.len));

    c->read_at = support_mono_ms();
    if (n > 0) {
        c->in.len += (size_t)n;
        return 0;
    }
    switch (SSL_get_error(c->ssl, n)) {
    case SSL_ERROR_WANT_READ:
        break;
    case SSL_ERROR_ZERO_RETURN:
        c->close_notify = 1;
        c->eof = 1;
        break;
    default: /* a reset, or a close without close_notify */
        c->eof = 1;
    }
    ERR_clear_error();
    return 0;
}

/* Parse buffered bytes, or else read once (waiting until deadline).
 * Returns 1 when c->cur is complete, 0 on progress, or a negative errno. */
static int pump(struct support_http_conn *c, double deadline)
{
    ssize_t n;

    if (c->in_off < c->in.len) {
        const char *start = c->in.data + c->in_off;
        llhttp_errno_t err = llhttp_execute(&c->parser, start, c->in.len - c->in_off);
        size_t used = c->in.len - c->in_off;

        if (err == HPE_PAUSED) {
            used = (size_t)(llhttp_get_error_pos(&c->parser) - start);
            llhttp_resume(&c->parser);
        } else if (err != HPE_OK) {
            return -EPROTO;
        }
        if (buf_append(&c->cur->raw, start, used) != 0)
            return -ENOMEM;
        c->in_off += used;
        if (c->in_off == c->in.len) {
            buf_reset(&c->in);
            c->in_off = 0;
        }
        return err == HPE_PAUSED ? 1 : 0;
    }
    if (c->eof) {
        /* A body delimited by the close completes here. */
        if (!c->cur->complete && llhttp_get_errno(&c->parser) == HPE_OK)
            (void)llhttp_finish(&c->parser);
        return c->cur->complete ? 1 : -ECONNRESET;
    }
    /* OpenSSL may hold decrypted bytes the socket no longer shows. */
    if ((c->ssl == NULL || SSL_pending(c->ssl) == 0) && wait_fd(c->fd, POLLIN, deadline) != 0)
        return -ETIMEDOUT;
    if (buf_reserve(&c->in, READ_CHUNK) != 0)
        return -ENOMEM;
    if (c->ssl)
        return tls_recv(c);
    n = recv(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len, 0);
    c->read_at = support_mono_ms();
    if (n < 0 && errno == EINTR)
        return 0;
    if (n <= 0)
        c->eof = 1; /* a reset counts as a close */
    else
        c->in.len += (size_t)n;
    return 0;
}

/* Point the parser's output at r, emptied. */
static void begin(struct support_http_conn *c, struct support_http_response *r)
{
    buf_reset(&r->headers);
    buf_reset(&r->body);
    buf_reset(&r->raw);
    r->status = 0;
    r->ttfb_ms = r->total_ms = 0;
    r->headers_done = r->complete = 0;
    c->cur = r;
}

int support_http_read(struct support_http_conn *c, struct support_http_response *r,
                      int timeout_ms)
{
    double deadline = support_mono_ms() + timeout_ms;
    int rc;

    begin(c, r);
    while ((rc = pump(c, deadline)) == 0)
        ;
    return rc == 1 ? 0 : rc;
}

int support_http_read_head(struct support_http_conn *c, struct support_http_response *r,
                           int timeout_ms)
{
    int rc;

    c->head = 1;
    rc = support_http_read(c, r, timeout_ms);
    c->head = 0;
    return rc;
}

int support_http_send_and_leave(int port, const void *req, size_t len, int wait_ms)
{
    struct support_http_conn c = {.fd = -1};
    int rc = support_http_connect(&c, port);

    rc = rc ?: support_http_send(&c, req, len);
    if (rc == 0)
        usleep((useconds_t)wait_ms * 1000);
    support_http_close(&c);
    return rc;
}

void support_http_close(struct support_http_conn *c)
{
    SSL_free(c->ssl);
    SSL_CTX_free(c->ssl_ctx);
    c->ssl = NULL;
    c->ssl_ctx = NULL;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    buf_free(&c->in);
    c->in_off = 0;
    c->cur = NULL;
}

/* Send on c, connected with status rc, and read one response; close c. */
static int request_once(struct support_http_conn *c, int rc, const void *req, size_t len,
                        int timeout_ms, struct support_http_response *r)
{
    if (rc == 0)
        rc = support_http_send(c, req, len);
    if (rc == 0)
        rc = support_http_read(c, r, timeout_ms);
    support_http_close(c);
    return rc;
}

int support_http_request(int port, const void *req, size_t len, int timeout_ms,
                         struct support_http_response *r)
{
    struct support_http_conn c;

    return request_once(&c, support_http_connect(&c, port), req, len, timeout_ms, r);
}

int support_https_request(int port, const char *ca_file, const void *req, size_t len,
                          int timeout_ms, struct support_http_response *r)
{
    struct support_http_conn c;

    return request_once(&c, support_https_connect(&c, port, ca_file, timeout_ms), req, len,
                        timeout_ms, r);
}

int support_router_store_up(int port, const char *admin_headers)
{
    static const char up[] = "\ncostrouter_store_up{store=\"redis\"} 1\n";
    struct support_http_response r = {0};
    struct buf req = {0};
    int found = 0, rc = support_http_format(&req, "GET", "/metrics", admin_headers, NULL);

    for (int tries = 0; rc == 0 && !found && tries < 250; tries++) {
        if (tries > 0)
            nanosleep(&(struct timespec){0, 20000000}, NULL);
        rc = support_http_request(port, req.data, req.len, 5000, &r);
        found = rc == 0 && memmem(r.body.data, r.body.len, up, sizeof(up) - 1) != NULL;
    }
    support_http_response_free(&r);
    buf_free(&req);
    return rc != 0 ? rc : found;
}

int support_http_format(struct buf *out, const char *method, const char *path,
                        const char *extra_headers, const char *body)
{
    int rc = buf_printf(out, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s", method, path,
                        extra_headers ? extra_headers : "");
    if (rc == 0 && body != NULL)
        rc = buf_printf(out, "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                        strlen(body), body);
    else if (rc == 0)
        rc = buf_printf(out, "\r\n");
    return rc;
}

const char *support_http_header(const struct support_http_response *r, const char *name)
{
    return buf_pairs_get(&r->headers, name);
}

double support_metrics_value(const struct support_http_response *r, const char *name)
{
    const char *p = r->body.data, *end = p + r->body.len;
    size_t len = strlen(name);

    while (p != NULL && p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *eol = nl ? nl : end;
        char value[64];

        if ((size_t)(eol - p) > len + 1 && memcmp(p, name, len) == 0 && p[len] == ' ') {
            snprintf(value, sizeof(value), "%.*s", (int)(eol - p - len - 1), p + len + 1);
            return strtod(value, NULL);
        }
        p = nl ? nl + 1 : NULL;
    }
    return NAN;
}

void support_http_response_free(struct support_http_response *r)
{
    buf_free(&r->headers);
    buf_free(&r->body);
    buf_free(&r->raw);
}

int support_sse_open(struct support_sse *s, int port, const void *req, size_t len,
                     int timeout_ms)
{
    int rc;

    *s = (struct support_sse){0};
    rc = support_http_connect(&s->conn, port);
    if (rc != 0)
        return rc;
    return support_sse_begin(s, req, len, timeout_ms);
}

int support_sse_begin(struct support_sse *s, const void *req, size_t len, int timeout_ms)
{
    double deadline = support_mono_ms() + timeout_ms;
    int rc = support_http_send(&s->conn, req, len);

    if (rc != 0)
        return rc;
    begin(&s->conn, &s->resp);
    while (!s->resp.headers_done && (rc = pump(&s->conn, deadline)) == 0)
        ;
    return rc < 0 ? rc : 0;
}

/* Take the next complete event from the body into s->event. Returns 1 if
 * there was one, else 0 (blank lines without data are skipped). */
static int take_event(struct support_sse *s)
{
    const char *base = s->resp.body.data, *p = base + s->body_off;
    const char *end = base + s->resp.body.len, *nl;
    int have_data = 0;

    buf_reset(&s->event);
    while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        size_t n = (size_t)(nl - p);
        if (n > 0 && p[n - 1] == '\r')
            n--;
        if (n == 0) {
            s->body_off = (size_t)(nl + 1 - base);
            if (have_data) {
                if (buf_append(&s->event, "", 1) != 0)
                    return 0;
                s->event.len--; /* keep the NUL out of the length */
                return 1;
            }
        } else if (n >= 5 && memcmp(p, "data:", 5) == 0) {
            size_t skip = (n > 5 && p[5] == ' ') ? 6 : 5;
            if ((have_data && buf_append(&s->event, "\n", 1) != 0) ||
                buf_append(&s->event, p + skip, n - skip) != 0)
                return 0;
            have_data = 1;
        }
        p = nl + 1;
    }
    return 0;
}

int support_sse_next(struct support_sse *s, struct support_sse_event *ev, int timeout_ms)
{
    double deadline = support_mono_ms() + timeout_ms;

    for (;;) {
        int rc;
        if (take_event(s)) {
            ev->data = s->event.data;
            ev->len = s->event.len;
            ev->t_ms = s->conn.read_at - s->conn.sent_at;
            return 1;
        }
        if (s->resp.complete)
            return 0;
        rc = pump(&s->conn, deadline);
        if (rc < 0)
            return rc;
    }
}

void support_sse_close(struct support_sse *s)
{
    support_http_close(&s->conn);
    support_http_response_free(&s->resp);
    buf_free(&s->event);
}

int support_sse_cost(const struct support_sse *s, double *comment, double *trailer)
{
    const char *c = memmem(s->resp.raw.data, s->resp.raw.len, ": x-costrouter-cost-usd=", 24);
    const char *t = memmem(s->resp.raw.data, s->resp.raw.len, "x-costrouter-cost-usd: ", 23);

    if (c == NULL || t == NULL)
        return -1;
    *comment = strtod(c + 24, NULL);
    *trailer = strtod(t + 23, NULL);
    return 0;
}

cJSON *support_last_json_line(const char *path)
{
    char line[4096], last[4096] = "";
    FILE *f = fopen(path, "r");

    if (f == NULL)
        return NULL;
    while (fgets(line, sizeof(line), f))
        strcpy(last, line);
    fclose(f);
    return cJSON_Parse(last);
}
