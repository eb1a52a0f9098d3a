/*
 * bench/mockllm/internal.h: what the files of mockllm share.
 *
 * mockllm is a simulated OpenAI-compatible LLM server (see README.md).
 * main.c owns the process (options, listener, signals, stats), conn.c one
 * client connection (reads, llhttp, output batching, TLS glue, the one
 * close path), api.c the answers (endpoints, faults, streaming timers),
 * tls.c the OpenSSL memory-BIO layer.
 *
 * One connection answers one request at a time: the parser pauses after
 * each complete request and the unparsed bytes wait in conn->in until the
 * answer is done, so pipelined requests are answered in order.
 */
#ifndef MOCKLLM_INTERNAL_H
#define MOCKLLM_INTERNAL_H

#include <llhttp.h>
#include <stdint.h>
#include <time.h>
#include <uv.h>

#include "common/buf.h"

struct ssl_ctx_st;
struct ssl_st;

/* Faults, chosen per process (--fault) or per request (x-mock-fault). */
enum mockllm_fault {
    MOCKLLM_FAULT_NONE,
    MOCKLLM_FAULT_STALL,          /* read the request, never answer */
    MOCKLLM_FAULT_CLOSE_MIDSTREAM, /* headers and part of the body, then FIN */
    MOCKLLM_FAULT_STALL_MIDSTREAM, /* headers and part of the body, then nothing, the
                                      connection open until the client leaves */
    MOCKLLM_FAULT_CLOSE_BEFORE,   /* close without sending a byte */
    MOCKLLM_FAULT_500,            /* 500 with an OpenAI-style error JSON */
    MOCKLLM_FAULT_429,            /* 429 rate_limit_exceeded (with --retry-after) */
};

/* Per-process settings from the command line. */
struct mockllm_opts {
    const char *listen;         /* HOST:PORT as given */
    const char *model;          /* --model, or NULL to echo the request's */
    int ttft_ms;                /* delay before the first byte */
    int token_delay_ms;         /* delay between streamed tokens */
    int tokens;                 /* completion tokens per answer */
    double error_rate;          /* fraction of /v1 requests answered 500 */
    enum mockllm_fault fault;   /* applied to every /v1 request */
    const char *require_key;    /* expected Bearer key, or NULL */
    const char *tls_cert;       /* PEM certificate chain, or NULL for plain */
    const char *tls_key;        /* PEM private key */
    uint64_t seed;              /* PRNG seed for --error-rate */
    int pad_header_bytes;       /* --pad-header: x-mock-pad value bytes, 0 = none */
    const char *retry_after;    /* --retry-after: Retry-After value of every 429, or NULL */
};

/* One parsed request. Buffers are reused from request to request. */
struct mockllm_request {
    const char *method;  /* static name from llhttp_method_name() */
    struct buf url;      /* request target as sent (not NUL-terminated) */
    struct buf headers;  /* "name\0value\0" pairs, names lowercased */
    struct buf body;     /* de-chunked body */
};

/* The answer in progress on a connection. */
struct mockllm_plan {
    int endpoint;            /* api.c's enum of endpoints */
    unsigned stream:1;       /* SSE answer */
    unsigned include_usage:1; /* stream_options.include_usage was true */
    unsigned omit_usage:1;   /* x-mock-usage: omit, as servers that send none */
    unsigned started:1;      /* SSE headers sent */
    unsigned end_waited:1;   /* done_delay_ms before the stream's end has passed */
    enum mockllm_fault fault; /* fault for this request */
    int token_delay_ms;      /* delay between streamed tokens */
    int event_pad;           /* x-mock-event-pad: filler bytes in each token event */
    int done_delay_ms;       /* x-mock-done-delay-ms: wait after the last token */
    int tokens;              /* completion tokens to produce */
    int sent;                /* tokens streamed so far */
    int prompt_tokens;       /* see the counting rule in api.c */
    int cached_tokens;       /* x-mock-cached-tokens (responses, messages), at most
                                prompt_tokens */
    int cache_write_tokens;  /* x-mock-cache-write-tokens (messages), at most what
                                prompt_tokens leaves after cached_tokens */
    int cache_write_1h_tokens; /* x-mock-cache-write-1h-tokens: of those, the 1-hour ones */
    int web_searches;        /* x-mock-web-searches: (messages) the usage's
                                server_tool_use.web_search_requests, (responses) that
                                many web_search_call items before the message; -1 for none */
    int file_searches;       /* x-mock-file-searches: (responses) that many file_search_call
                                items after the web search calls */
    int cost_micro;          /* x-mock-cost-micro: usage.cost in micro-USD, -1 for none */
    unsigned cost_object:1;  /* x-mock-cost-shape: object (usage.cost.total_cost) */
    const char *finish;      /* "stop" or "length" */
    const char *service_tier; /* the "service_tier" the answer names, or NULL for none */
    uint64_t id;             /* number in the response id */
    long long created;       /* unix seconds */
    struct buf model;        /* model name, JSON-escaped */
    struct buf deferred;     /* whole answer to send when the timer fires */
};

/* The process: one listener, one loop, every open connection. */
struct mockllm_server {
    uv_loop_t *loop;               /* the default loop */
    uv_tcp_t listener;             /* accepting socket */
    uv_signal_t sigterm;           /* SIGTERM watcher */
    uv_signal_t sigint;            /* SIGINT watcher */
    struct mockllm_opts opts;      /* command line */
    struct ssl_ctx_st *tls;        /* server context, or NULL for plain HTTP */
    struct mockllm_conn *conns;    /* open connections, doubly linked */
    uint64_t requests;             /* /v1 requests received */
    uint64_t connections;          /* connections accepted */
    uint64_t rng;                  /* xorshift state for --error-rate */
    uint64_t next_id;              /* counter for response ids */
    char *pad_header;              /* "x-mock-pad: aaa...\r\n" for --pad-header, or "" */
    struct mockllm_request last;   /* last /v1 request, for /mock/last-request */
    unsigned stopping:1;           /* a signal came: closing everything */
};

/* One client connection; freed by conn.c once every handle is closed. */
struct mockllm_conn {
    uv_tcp_t tcp;                  /* the socket */
    uv_timer_t timer;              /* ttft / token delays of the answer */
    uv_shutdown_t shutdown;        /* graceful end after the last write */
    struct mockllm_server *srv;    /* owner */
    struct mockllm_conn *prev;     /* server list links */
    struct mockllm_conn *next;
    llhttp_t parser;               /* request parser, paused between requests */
    struct buf in;                 /* plaintext received, unparsed from in_off */
    size_t in_off;                 /* parse cursor into in */
    struct buf out;                /* plaintext to send at the next flush */
    struct buf cipher;             /* TLS records to send */
    struct ssl_st *ssl;            /* TLS session, or NULL for plain */
    struct mockllm_request req;    /* request being parsed or answered */
    struct mockllm_plan plan;      /* answer in progress */
    int handles;                   /* open libuv handles; free at zero */
    unsigned busy:1;               /* a request is being answered */
    unsigned in_loop:1;            /* inside the parse loop (no re-entry) */
    unsigned keep_alive:1;         /* the current request allows reuse */
    unsigned ending:1;             /* shutting down after pending writes */
    unsigned closing:1;            /* uv_close called */
    unsigned peer_eof:1;           /* client sent FIN */
    unsigned reading:1;            /* uv_read_start active */
};

/* conn.c */
/* Accept a pending connection on the listener. Errors are logged. */
void mockllm__conn_accept(struct mockllm_server *srv);
/* Send out (and TLS records) now: uv_try_write, the rest by uv_write. */
void mockllm__conn_flush(struct mockllm_conn *c);
/* The answer to the current request is complete: go on with the next
 * pipelined request, or end the connection if it was not keep-alive. */
void mockllm__conn_done(struct mockllm_conn *c);
/* Flush, then half-close after the pending writes and close (no TLS
 * close_notify when `abrupt`, to look like a dropped upstream). */
void mockllm__conn_end(struct mockllm_conn *c, int abrupt);
/* Close now; pending writes are dropped. Safe to call twice. */
void mockllm__conn_close(struct mockllm_conn *c);
/* Value of a request header by lowercase name, or NULL. */
const char *mockllm__header(const struct mockllm_request *r, const char *name);

/* api.c */
/* Answer the complete request in c->req. Called with c->busy set; either
 * answers synchronously and calls mockllm__conn_done(), or leaves timers
 * running that do it later, or (stall) never does. */
void mockllm__dispatch(struct mockllm_conn *c);
/* Timer callback driving deferred and streamed answers. */
void mockllm__on_timer(uv_timer_t *t);
/* Reset the per-request state of a plan, keeping its buffers. */
void mockllm__plan_reset(struct mockllm_plan *p);
/* Parse a fault name (none, stall, close-midstream, close-before-response,
 * 500, 429) to enum mockllm_fault; -1 if unknown. */
int mockllm__fault_parse(const char *s);
/* Free api.c's shared scratch buffer (at exit). */
void mockllm__api_cleanup(void);

/* tls.c */
/* A server context with this certificate chain and key, or NULL (logged). */
struct ssl_ctx_st *mockllm__tls_ctx(const char *cert, const char *key);
/* A server session on memory BIOs, or NULL. */
struct ssl_st *mockllm__tls_session(struct ssl_ctx_st *ctx);
/* Feed received records; append decrypted bytes to plain and records to
 * send (handshake) to cipher. Returns 0, 1 when the peer sent close_notify,
 * or -EPROTO. */
int mockllm__tls_feed(struct ssl_st *ssl, const char *data, size_t len, struct buf *plain,
                      struct buf *cipher);
/* Encrypt plaintext and append the records to cipher. Returns 0 or -EPROTO. */
int mockllm__tls_seal(struct ssl_st *ssl, const char *data, size_t len, struct buf *cipher);
/* Free a context (NULL is fine). */
void mockllm__tls_ctx_free(struct ssl_ctx_st *ctx);
/* Free a session (NULL is fine). */
void mockllm__tls_free(struct ssl_st *ssl);
/* Append a close_notify alert to cipher. */
void mockllm__tls_close_notify(struct ssl_st *ssl, struct buf *cipher);

#endif
