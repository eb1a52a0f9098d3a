/*
 * tests/support/http.h: a small blocking HTTP/1.1 client for tests.
 *
 * Sends raw request bytes (so tests control every header, and can send
 * malformed or pipelined requests) to 127.0.0.1 and parses responses with
 * llhttp in response mode. One connection can carry many requests: each
 * support_http_read() returns the next response, keeping bytes that belong
 * to the following one. An SSE reader returns a streamed body event by event
 * with the time each arrived. Blocking with poll() timeouts: tests only.
 */
#ifndef TESTS_SUPPORT_HTTP_H
#define TESTS_SUPPORT_HTTP_H

#include <llhttp.h>
#include <openssl/ssl.h>
#include <stddef.h>

#include "common/buf.h"

/* One response. Zero it, or let support_http_read() do it. */
struct support_http_response {
    int status;          /* status code, 0 until the status line is parsed */
    struct buf headers;  /* "name\0value\0" pairs, names lowercased */
    struct buf body;     /* body with chunked framing removed */
    struct buf raw;      /* the bytes of this response as received */
    double ttfb_ms;      /* its first byte's arrival, ms after the request was sent */
    double total_ms;     /* its last byte's arrival, ms after the request was sent */
    unsigned headers_done:1; /* header block complete */
    unsigned complete:1;     /* message complete (length reached / last chunk) */
};

/* CLOCK_MONOTONIC in ms: the clock of sent_at and read_at, for timing
 * a test's requests. */
double support_mono_ms(void);

/* A client connection. */
struct support_http_conn {
    int fd;                 /* socket, -1 when closed */
    llhttp_t parser;        /* response parser, paused between responses */
    struct buf in;          /* received bytes, unparsed from in_off */
    size_t in_off;          /* parse cursor */
    struct support_http_response *cur; /* response being filled */
    double sent_at;         /* monotonic ms when the last send finished */
    double read_at;         /* monotonic ms of the read being parsed */
    unsigned eof:1;         /* the server closed (or reset) the connection */
    SSL_CTX *ssl_ctx;       /* TLS (support_https_connect), else NULL */
    SSL *ssl;               /* its session, over the non-blocking fd */
    unsigned close_notify:1; /* TLS: the server ended with close_notify (a clean end) */
    unsigned head:1;        /* the response being read answers HEAD: it has no body */
};

/* A streamed response read as Server-Sent Events. */
struct support_sse {
    struct support_http_conn conn;      /* its connection */
    struct support_http_response resp;  /* status and headers; body grows */
    size_t body_off;                    /* body bytes already returned as events */
    struct buf event;                   /* data of the last event returned */
};

/* One event: its data lines joined by '\n' (the "data: " prefix removed). */
struct support_sse_event {
    const char *data; /* NUL-terminated; valid until the next call */
    size_t len;       /* bytes in data */
    double t_ms;      /* arrival, ms after the request was sent */
};

/* Connect to 127.0.0.1:port. Returns 0 or a negative errno. */
int support_http_connect(struct support_http_conn *c, int port)
    __attribute__((warn_unused_result));
/* A socket listening on a free loopback port, put in *port: for an
 * upstream or a relay a test plays itself. Returns the fd, or -1. */
int support_http_listen(int *port);
/* The same with SO_RCVBUF set to rcvbuf bytes first (Linux doubles it; 0
 * leaves the default): a client that takes in little at a time. */
int support_http_connect_rcvbuf(struct support_http_conn *c, int port, int rcvbuf)
    __attribute__((warn_unused_result));
/* Connect and do a TLS handshake as a client would: the certificate is
 * verified against ca_file for IP 127.0.0.1, and ALPN offers h2 and
 * http/1.1. Sends, reads and closes on c then go through TLS. Returns 0, a
 * negative errno, -ETIMEDOUT after timeout_ms, or -EPROTO when the
 * handshake or the verification fails; close c in every case. */
int support_https_connect(struct support_http_conn *c, int port, const char *ca_file,
                          int timeout_ms) __attribute__((warn_unused_result));
/* The protocol the server chose by ALPN, "" for none, written to out. */
const char *support_https_alpn(const struct support_http_conn *c, char *out, size_t size);
/* Send all bytes and note the time. Returns 0 or a negative errno. */
int support_http_send(struct support_http_conn *c, const void *data, size_t len)
    __attribute__((warn_unused_result));
/* Read the next response into r (reset first; free it with
 * support_http_response_free()). Returns 0 when it is complete, -ETIMEDOUT
 * after timeout_ms, -ECONNRESET if the server closed first, -EPROTO if it
 * did not parse; r keeps what arrived in every case. */
int support_http_read(struct support_http_conn *c, struct support_http_response *r,
                      int timeout_ms);
/* The same for the answer to a HEAD request, which ends with its head
 * whatever its Content-Length says. */
int support_http_read_head(struct support_http_conn *c, struct support_http_response *r,
                           int timeout_ms);
/* Close the socket and free the buffers. Safe to call twice. */
void support_http_close(struct support_http_conn *c);

/* A client that leaves before its answer: connect, send, wait `wait_ms`,
 * close. Returns 0 or the connect/send error. */
int support_http_send_and_leave(int port, const void *req, size_t len, int wait_ms)
    __attribute__((warn_unused_result));

/* Connect, send, read one response, close. Returns as support_http_read(),
 * or the connect/send error. */
int support_http_request(int port, const void *req, size_t len, int timeout_ms,
                         struct support_http_response *r);
/* The same over TLS, as support_https_connect() connects. */
int support_https_request(int port, const char *ca_file, const void *req, size_t len,
                          int timeout_ms, struct support_http_response *r);
/* Format a request into out (appended): the request line, Host, the extra
 * header lines (each ending in "\r\n", or NULL) and, when body is not NULL,
 * Content-Type: application/json, Content-Length and the body. Returns 0 or
 * -ENOMEM. */
int support_http_format(struct buf *out, const char *method, const char *path,
                        const char *extra_headers, const char *body)
    __attribute__((warn_unused_result));
/* Wait (5 s at most) until the router on `port` says in /metrics, asked
 * with `admin_headers` (header lines), that it has its Redis connection:
 * before that it serves from memory and writes back later. Returns 1 once
 * it has, 0 if it never did, or a request's negative errno. */
int support_router_store_up(int port, const char *admin_headers);
/* Value of a response header by lowercase name, or NULL. */
const char *support_http_header(const struct support_http_response *r, const char *name);
/* The value of the unlabelled series `name` in r's body (a /metrics
 * answer), or NAN when there is none. */
double support_metrics_value(const struct support_http_response *r, const char *name);
/* Free a response's buffers (it can be read into again). */
void support_http_response_free(struct support_http_response *r);

/* Connect, send the request and read up to the end of the header block.
 * Returns 0, or as support_http_read(); s->resp has the status and
 * headers. Close with support_sse_close() in every case. */
int support_sse_open(struct support_sse *s, int port, const void *req, size_t len,
                     int timeout_ms);
/* As support_sse_open, on s->conn already connected (e.g. by
 * support_https_connect on a zeroed s). */
int support_sse_begin(struct support_sse *s, const void *req, size_t len, int timeout_ms);
/* Next event. Returns 1 with *ev filled, 0 when the response ended cleanly
 * (terminating chunk) with no more events, -ETIMEDOUT, -ECONNRESET if the
 * server closed mid-stream, or -EPROTO. */
int support_sse_next(struct support_sse *s, struct support_sse_event *ev, int timeout_ms);
void support_sse_close(struct support_sse *s);
/* The router's cost of a finished stream: the `: x-costrouter-cost-usd=`
 * SSE comment in *comment and the trailer's value in *trailer. Returns 0,
 * or -1 when either is missing. */
int support_sse_cost(const struct support_sse *s, double *comment, double *trailer);

struct cJSON;
/* The last line of the file at `path`, parsed (NULL when the file cannot
 * be read or the line is no JSON; caller frees with cJSON_Delete): a cost
 * log's newest record. */
struct cJSON *support_last_json_line(const char *path);

#endif
