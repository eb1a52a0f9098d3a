/*
 * bench/probe.c: the two measuring clients of bench/run.sh that wrk cannot
 * play. Both send the chat body of BODY_FILE (bench/chat.json) as
 * POST /v1/chat/completions with a Bearer tenant key, over IPv4.
 *
 *   probe ttfb HOST PORT BODY_FILE N [CUSTOM_HOST]
 *     Time to first token of streamed answers: N requests with
 *     "stream": true, one after another on one keep-alive connection, after
 *     20 unmeasured warm-up requests. Each is timed from just before the
 *     request is written to the arrival of the first "data:" byte of the
 *     SSE body; the rest of the chunked answer is read before the next.
 *     CUSTOM_HOST adds the Portkey headers (x-portkey-provider: openai,
 *     x-portkey-custom-host). Prints "TTFB n=N p50_us=.. p90_us=.. p99_us=..".
 *
 *   probe idle HOST PORT BODY_FILE N
 *     N idle keep-alive connections: opens them one after another, sends
 *     one non-streamed request on each and reads its answer, so each has
 *     carried a real request; then prints "OPEN N" and keeps them all open
 *     and idle until it is killed. The caller raises `ulimit -n` above N.
 *
 * With PROBE_TLS_CA=FILE in the environment both speak TLS, verifying the
 * server's certificate against FILE (for IP HOST), as an HTTPS client does.
 *
 * Exit 1 on any error (connect, TLS, status other than 200, early close).
 */
#define _GNU_SOURCE /* memmem */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define PROBE_WARMUP 20

/* Receive buffer: one answer is read whole before the next request. */
static char rbuf[1 << 20];

/* One connection: plain, or TLS when tls_ctx is set (PROBE_TLS_CA). */
struct probe_conn {
    int fd;
    SSL *ssl;
};

static SSL_CTX *tls_ctx;

/* What one answer looked like, filled by read_answer(). */
struct probe_answer {
    double first_data_us; /* time from the start to the first "data:" byte, or -1 */
};

static double now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

/* The file's bytes without trailing white space, NUL-terminated, or NULL. */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *p = NULL;
    long n;

    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
        goto fail;
    p = malloc((size_t)n + 1);
    if (!p || fread(p, 1, (size_t)n, f) != (size_t)n)
        goto fail;
    while (n > 0 && (p[n - 1] == '\n' || p[n - 1] == ' ' || p[n - 1] == '\r'))
        n--;
    p[n] = '\0';
    *len = (size_t)n;
    fclose(f);
    return p;
fail:
    free(p);
    fclose(f);
    return NULL;
}

/*
 * The whole HTTP request for BODY_FILE (malloc'd, length in *len), with
 * "stream": true when `stream`, and the Portkey headers when custom_host
 * is not NULL. NULL on error, with a message.
 */
static char *build_request(const char *host, const char *port, const char *body_file, int stream,
                           const char *custom_host, size_t *len)
{
    size_t body_len, cap;
    char *body = read_file(body_file, &body_len), *req = NULL, *flag;
    int n;

    if (!body) {
        fprintf(stderr, "probe: cannot read %s\n", body_file);
        return NULL;
    }
    flag = strstr(body, "\"stream\": false");
    if (!flag) {
        fprintf(stderr, "probe: %s has no \"stream\": false\n", body_file);
        goto out;
    }
    /* "false" -> "true " keeps the length: the trailing space is valid JSON. */
    if (stream)
        memcpy(flag + 10, "true ", 5);
    cap = body_len + 1024;
    req = malloc(cap);
    if (!req)
        goto out;
    n = snprintf(req, cap,
                 "POST /v1/chat/completions HTTP/1.1\r\n"
                 "Host: %s:%s\r\n"
                 "Authorization: Bearer sk-demo-tenant\r\n"
                 "Content-Type: application/json\r\n"
                 "%s%s%s"
                 "Content-Length: %zu\r\n\r\n%s",
                 host, port, custom_host ? "x-portkey-provider: openai\r\nx-portkey-custom-host: " : "",
                 custom_host ? custom_host : "", custom_host ? "\r\n" : "", body_len, body);
    if (n < 0 || (size_t)n >= cap) {
        free(req);
        req = NULL;
        goto out;
    }
    *len = (size_t)n;
out:
    free(body);
    return req;
}

/* A connected TCP socket to host:port, or -1 with a message. */
static int connect_tcp(const char *host, const char *port)
{
    struct sockaddr_in sa = {0};
    int fd, one = 1;

    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "probe: bad IPv4 address %s\n", host);
        return -1;
    }
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        fprintf(stderr, "probe: connect %s:%s: %s\n", host, port, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

/* A connection to host:port, TLS (verified) with PROBE_TLS_CA; 0 or -1. */
static int connect_to(struct probe_conn *c, const char *host, const char *port)
{
    c->ssl = NULL;
    if ((c->fd = connect_tcp(host, port)) < 0)
        return -1;
    if (tls_ctx == NULL)
        return 0;
    c->ssl = SSL_new(tls_ctx);
    if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1 ||
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host) != 1 ||
        SSL_connect(c->ssl) != 1) {
        char err[256];

        ERR_error_string_n(ERR_get_error(), err, sizeof(err));
        fprintf(stderr, "probe: TLS handshake with %s:%s: %s\n", host, port, err);
        return -1;
    }
    return 0;
}

static ssize_t conn_write(struct probe_conn *c, const char *p, size_t len)
{
    if (c->ssl)
        return SSL_write(c->ssl, p, (int)len);
    return write(c->fd, p, len);
}

static ssize_t conn_read(struct probe_conn *c, char *p, size_t len)
{
    if (c->ssl)
        return SSL_read(c->ssl, p, (int)len);
    return read(c->fd, p, len);
}

/* The client context for PROBE_TLS_CA, or NULL with a message. */
static SSL_CTX *tls_client(const char *ca_file)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

    if (ctx == NULL || SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
        fprintf(stderr, "probe: cannot load the CA file %s\n", ca_file);
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    return ctx;
}

/* Offset just past the headers and the body length if the answer has a
 * Content-Length (else *body_len = -1); 0 while the headers are incomplete. */
static size_t parse_head(long *body_len)
{
    char *end = strstr(rbuf, "\r\n\r\n"), *line = rbuf;

    if (!end)
        return 0;
    *body_len = -1;
    while ((line = strchr(line, '\n')) && line < end) {
        line++;
        if (strncasecmp(line, "content-length:", 15) == 0) {
            *body_len = strtol(line + 15, NULL, 10);
            break;
        }
    }
    return (size_t)(end + 4 - rbuf);
}

/* Whether a chunked body (`len` bytes at `p`) is complete: its chunks
 * walked by their sizes up to the last (size 0) one, then trailer lines
 * (costrouter sends x-costrouter-cost-usd there) up to an empty line. */
static int chunked_complete(const char *p, size_t len)
{
    const char *end = p + len, *eol;

    for (;;) {
        unsigned long size;
        char *after;

        if (!(eol = memmem(p, (size_t)(end - p), "\r\n", 2)))
            return 0;
        size = strtoul(p, &after, 16);
        if (after == p)
            return 0;
        p = eol + 2;
        if (size == 0)
            break;
        if ((size_t)(end - p) < size + 2)
            return 0;
        p += size + 2;
    }
    while ((eol = memmem(p, (size_t)(end - p), "\r\n", 2)) != NULL) {
        if (eol == p)
            return 1;
        p = eol + 2;
    }
    return 0;
}

/*
 * Write the request, then read one whole answer: up to its Content-Length,
 * or for a chunked one up to the last chunk. Checks the status is 200 and
 * records when the first "data:" byte arrived. 0, or -1 with a message.
 */
static int exchange(struct probe_conn *c, const char *req, size_t req_len, struct probe_answer *a)
{
    double t0 = now_us();
    size_t got = 0, head = 0;
    long body_len = -1;

    a->first_data_us = -1;
    while (req_len > 0) {
        ssize_t n = conn_write(c, req, req_len);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "probe: write: %s\n", strerror(errno));
            return -1;
        }
        req += n;
        req_len -= (size_t)n;
    }
    for (;;) {
        ssize_t n = conn_read(c, rbuf + got, sizeof(rbuf) - 1 - got);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "probe: connection closed after %zu bytes\n", got);
            return -1;
        }
        got += (size_t)n;
        rbuf[got] = '\0';
        if (a->first_data_us < 0 && strstr(rbuf, "data:"))
            a->first_data_us = now_us() - t0;
        if (!head && (head = parse_head(&body_len)) && strncmp(rbuf, "HTTP/1.1 200", 12) != 0) {
            fprintf(stderr, "probe: unexpected answer: %.60s\n", rbuf);
            return -1;
        }
        if (head && body_len >= 0 && got >= head + (size_t)body_len)
            return 0;
        if (head && body_len < 0 && chunked_complete(rbuf + head, got - head))
            return 0;
        if (got == sizeof(rbuf) - 1) {
            fprintf(stderr, "probe: answer larger than %zu bytes\n", sizeof(rbuf));
            return -1;
        }
    }
}

static int run_ttfb(const char *host, const char *port, const char *req, size_t req_len, int n)
{
    struct probe_answer a;
    double *samples = calloc((size_t)n, sizeof(*samples));
    struct probe_conn c;

    if (!samples || connect_to(&c, host, port) < 0)
        return 1;
    for (int i = 0; i < PROBE_WARMUP + n; i++) {
        if (exchange(&c, req, req_len, &a) < 0)
            return 1;
        if (a.first_data_us < 0) {
            fprintf(stderr, "probe: streamed answer without SSE data\n");
            return 1;
        }
        if (i >= PROBE_WARMUP)
            samples[i - PROBE_WARMUP] = a.first_data_us;
    }
    qsort(samples, (size_t)n, sizeof(*samples), cmp_double);
    printf("TTFB n=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f\n", n, samples[n / 2],
           samples[(size_t)(n * 0.90)], samples[(size_t)(n * 0.99)]);
    SSL_free(c.ssl);
    close(c.fd);
    free(samples);
    return 0;
}

static int run_idle(const char *host, const char *port, const char *req, size_t req_len, int n)
{
    struct probe_answer a;

    for (int i = 0; i < n; i++) {
        struct probe_conn c;

        if (connect_to(&c, host, port) < 0 || exchange(&c, req, req_len, &a) < 0) {
            fprintf(stderr, "probe: connection %d failed\n", i);
            return 1;
        }
        /* It stays open, idle, until the process is killed. */
    }
    printf("OPEN %d\n", n);
    fflush(stdout);
    for (;;)
        pause();
}

int main(int argc, char **argv)
{
    int ttfb = argc >= 6 && strcmp(argv[1], "ttfb") == 0;
    int idle = argc == 6 && strcmp(argv[1], "idle") == 0;
    size_t req_len;
    char *req;
    int n, rc;

    if ((!ttfb && !idle) || argc > 7 || (n = atoi(argv[5])) <= 0) {
        fprintf(stderr, "usage: probe ttfb HOST PORT BODY_FILE N [CUSTOM_HOST]\n"
                        "       probe idle HOST PORT BODY_FILE N\n");
        return 2;
    }
    if (getenv("PROBE_TLS_CA") && (tls_ctx = tls_client(getenv("PROBE_TLS_CA"))) == NULL)
        return 2;
    req = build_request(argv[2], argv[3], argv[4], ttfb, argc == 7 ? argv[6] : NULL, &req_len);
    if (!req)
        return 2;
    rc = ttfb ? run_ttfb(argv[2], argv[3], req, req_len, n)
              : run_idle(argv[2], argv[3], req, req_len, n);
    free(req);
    return rc;
}
