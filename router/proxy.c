/*
 * router/proxy.c: one client request sent upstream, with fallback.
 *
 * An attempt asks policy/ for a candidate not tried yet, rewrites the
 * body for it ("model" becomes the backend's own name; a stream asks for
 * usage) and sends it on a pooled connection. Until the first response
 * byte goes to the client, a failure (connect error, reset, timeout, a 5xx
 * or 429 status) moves on to the next candidate, up to max_retries more.
 * After that the response is the client's: bytes are forwarded as they
 * arrive, SSE event by event, and a break is reported in-band.
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"
#include "common/error.h"
#include "common/log.h"
#include "common/util.h"
#include "conf/conf.h"
#include "policy/policy.h"
#include "router/internal.h"

/* Pause the upstream when this many bytes wait to go to the client. */
#define PROXY_CLIENT_HIGH_WATER (256u * 1024)
/* Keep at most this much of a non-streamed body to read its usage. */
#define PROXY_USAGE_BODY_MAX (16u * 1024 * 1024)

static const char *endpoint_suffix(enum router__endpoint ep)
{
    switch (ep) {
    case ROUTER_EP_CHAT:
        return "/chat/completions";
    case ROUTER_EP_COMPLETIONS:
        return "/completions";
    case ROUTER_EP_EMBEDDINGS:
        return "/embeddings";
    default:
        return "";
    }
}

/* Rewrite the parsed body for backend `b`: its model name, and for a
 * stream, stream_options.include_usage so the real token counts arrive
 * at the end (remembered so the extra usage event is not shown to a
 * client that did not ask for it). */
static int rewrite_body(struct router__request *req, const struct conf_backend *b)
{
    cJSON *model, *opts, *inc;

    /* A backend without `model` gets the name the client used (the
     * route's), also after a fallback rewrote it for another backend. */
    model = cJSON_CreateString(b->model ? b->model : req->route->model);
    if (model == NULL || !cJSON_ReplaceItemInObjectCaseSensitive(req->json, "model", model))
        return -1;
    if (!req->stream || req->endpoint == ROUTER_EP_EMBEDDINGS)
        return 0;
    opts = cJSON_GetObjectItemCaseSensitive(req->json, "stream_options");
    if (opts == NULL || cJSON_IsNull(opts)) {
        cJSON_DeleteItemFromObjectCaseSensitive(req->json, "stream_options");
        opts = cJSON_AddObjectToObject(req->json, "stream_options");
    }
    if (!cJSON_IsObject(opts))
        return 0;
    inc = cJSON_GetObjectItemCaseSensitive(opts, "include_usage");
    if (!cJSON_IsTrue(inc)) {
        cJSON_DeleteItemFromObjectCaseSensitive(opts, "include_usage");
        cJSON_AddTrueToObject(opts, "include_usage");
        req->injected_usage = 1;
    }
    return 0;
}

/* The bytes of the upstream request for backend `b`, into `out`. */
static int build_request(struct router__client *c, const struct conf_backend *b, struct buf *out)
{
    struct router__request *req = &c->req;
    char *body;
    int rc;

    if (rewrite_body(req, b) != 0)
        return -1;
    body = cJSON_PrintUnformatted(req->json);
    if (body == NULL)
        return -1;
    size_t len = strlen(body);
    rc = buf_printf(out, b->host_is_ipv6 ? "POST %s%s HTTP/1.1\r\nHost: [%s]" : "POST %s%s HTTP/1.1\r\nHost: %s",
                    b->base_path, endpoint_suffix(req->endpoint), b->host);
    if (rc == 0 && b->port != (b->tls ? 443 : 80))
        rc = buf_printf(out, ":%u", b->port);
    rc = rc ?: buf_printf(out, "\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                               "x-request-id: %s\r\n",
                          len, req->id_str);
    if (rc == 0 && b->api_key) {
        if (strcasecmp(b->auth_header, "Authorization") == 0)
            rc = buf_printf(out, "Authorization: Bearer %s\r\n", b->api_key);
        else
            rc = buf_printf(out, "%s: %s\r\n", b->auth_header, b->api_key);
    }
    rc = rc ?: buf_append(out, req->fwd.data, req->fwd.len);
    rc = rc ?: buf_append(out, "\r\n", 2);
    rc = rc ?: buf_append(out, body, len);
    free(body);
    return rc;
}

static void proxy_fail(struct router__client *c, const char *errstr)
{
    router__send_error(c, errstr, NULL);
}

/* Start the next attempt, or answer with `last_error` when none is left. */
static void attempt_next(struct router__client *c, const char *last_error)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    struct policy_decision d;
    const struct conf_backend *b;
    struct buf out = {0};
    uint64_t now = router__now(r);
    int rc;

    if (req->attempts > (unsigned)r->conf->max_retries) {
        proxy_fail(c, last_error);
        return;
    }
    d = policy_first_healthy.select_(req->route, r->backends, req->tried, now);
    if (d.candidate < 0) {
        proxy_fail(c, last_error ? last_error : error_no_backend);
        return;
    }
    req->candidate = d.candidate;
    req->tried |= UINT64_C(1) << d.candidate;
    req->reason = policy_reason_name(d.reason);
    if (req->attempts++ > 0)
        req->fallbacks++;
    b = req->route->candidates[d.candidate];
    req->pool = &r->pools[b->index];
    req->attempt_start_ms = now;
    if (build_request(c, b, &out) != 0) {
        buf_free(&out);
        proxy_fail(c, error_no_memory);
        return;
    }
    backend_attempt_start(req->pool->backend, now);
    rc = router__upstream_send(req->pool, c, out.data, out.len);
    buf_free(&out);
    if (rc != 0) {
        backend_attempt_end(req->pool->backend);
        backend_attempt_failure(req->pool->backend, now);
        attempt_next(c, error_upstream_connect);
    }
}

void router__proxy_start(struct router__client *c)
{
    attempt_next(c, NULL);
}

void router__proxy_on_connected(struct router__client *c)
{
}

/* Is `status` worth another candidate? 5xx and 429 say "this backend,
 * not this request"; other 4xx would fail anywhere. */
static int status_retryable(int status)
{
    return status >= 500 || status == 429;
}

static int more_candidates(const struct router__client *c)
{
    const struct router__request *req = &c->req;
    uint64_t all = req->route->ncandidates >= 64 ? UINT64_MAX
                                                 : (UINT64_C(1) << req->route->ncandidates) - 1;

    return (req->tried & all) != all && req->attempts <= (unsigned)c->router->conf->max_retries;
}

int router__proxy_on_head(struct router__client *c, int status, const struct buf *headers,
                          int64_t content_length, int is_sse)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    const struct conf_backend *b = req->pool->conf;
    uint64_t now = router__now(r);
    struct buf head = {0};
    int rc;

    if (status_retryable(status) && more_candidates(c)) {
        log_info("request %s: backend %s answered %d, trying the next candidate", req->id_str,
                 b->name, status);
        backend_attempt_end(req->pool->backend);
        if (status >= 500)
            backend_attempt_failure(req->pool->backend, now);
        router__upstream_abort(req->up);
        req->up = NULL;
        attempt_next(c, error_upstream_io);
        return 1;
    }
    req->ttft_ms = now - req->start_ms;
    if (status < 500)
        backend_attempt_success(req->pool->backend, now, now - req->attempt_start_ms);
    req->status = status;
    req->is_sse = is_sse ? 1 : 0;
    req->chunked = content_length < 0 || is_sse;
    rc = buf_printf(&head, "HTTP/1.1 %d %s\r\n", status, router__status_text(status));
    rc = rc ?: buf_append(&head, headers->data, headers->len);
    rc = rc ?: buf_printf(&head, "x-request-id: %s\r\nx-costrouter-backend: %s\r\n"
                                 "x-costrouter-reason: %s\r\n",
                          req->id_str, b->name, req->reason);
    if (rc == 0 && req->chunked)
        rc = buf_printf(&head, "Transfer-Encoding: chunked\r\n");
    else if (rc == 0)
        rc = buf_printf(&head, "Content-Length: %lld\r\n", (long long)content_length);
    if (rc == 0 && !req->keep_alive)
        rc = buf_printf(&head, "Connection: close\r\n");
    rc = rc ?: buf_append(&head, "\r\n", 2);
    if (rc != 0) {
        buf_free(&head);
        router__client_close(c);
        return 1;
    }
    req->response_started = 1;
    router__client_send(c, head.data, head.len);
    buf_free(&head);
    return 0;
}

/* Send body bytes as they are, or as one chunk. */
static void forward(struct router__client *c, const char *p, size_t len)
{
    char size[24];

    if (len == 0)
        return;
    if (!c->req.chunked) {
        router__client_send(c, p, len);
        return;
    }
    uv_buf_t bufs[3] = {
        uv_buf_init(size, (unsigned)snprintf(size, sizeof(size), "%zx\r\n", len)),
        uv_buf_init((char *)p, (unsigned)len),
        uv_buf_init("\r\n", 2),
    };
    router__client_sendv(c, bufs, 3);
}

static void note_usage(struct router__request *req, const struct router__usage *u)
{
    if (u->prompt_tokens >= 0)
        req->prompt_tokens = u->prompt_tokens;
    if (u->completion_tokens >= 0)
        req->completion_tokens = u->completion_tokens;
    if (u->cached_tokens >= 0)
        req->cached_tokens = u->cached_tokens;
}

/* One complete SSE event: read usage from it, drop the usage-only event
 * we asked for on the client's behalf, forward the rest. */
static int on_sse_event(void *arg, const char *p, size_t len)
{
    struct router__client *c = arg;
    struct router__usage u;
    const char *data;
    size_t dlen;
    int choices_empty = 0;

    if (router__sse_data(p, len, &data, &dlen) && router__usage_parse(data, dlen, &u, &choices_empty)) {
        note_usage(&c->req, &u);
        if (c->req.injected_usage && choices_empty)
            return 0;
    }
    forward(c, p, len);
    return c->closing ? -1 : 0;
}

void router__proxy_on_body(struct router__client *c, const char *p, size_t len)
{
    struct router__request *req = &c->req;

    if (req->is_sse) {
        if (buf_append(&req->sse, p, len) != 0 || router__sse_split(&req->sse, on_sse_event, c) != 0)
            return;
    } else {
        if (req->up_body.len + len <= PROXY_USAGE_BODY_MAX &&
            buf_append(&req->up_body, p, len) != 0) {
            router__client_close(c);
            return;
        }
        forward(c, p, len);
    }
    if (!c->closing && req->up && router__client_write_queue(c) > PROXY_CLIENT_HIGH_WATER)
        router__upstream_pause(req->up);
}

void router__proxy_on_client_drain(struct router__client *c)
{
    if (c->req.up)
        router__upstream_resume(c->req.up);
}

static void request_finished(struct router__client *c)
{
    struct router__request *req = &c->req;
    uint64_t now = router__now(c->router);

    log_debug("request %s: tenant=%s route=%s backend=%s status=%d prompt=%lld completion=%lld "
              "ttft=%llums total=%llums fallbacks=%u",
              req->id_str, req->tenant ? req->tenant->id : "-", req->route ? req->route->model : "-",
              req->pool ? req->pool->conf->name : "-", req->status, (long long)req->prompt_tokens,
              (long long)req->completion_tokens, (unsigned long long)req->ttft_ms,
              (unsigned long long)(now - req->start_ms), req->fallbacks);
    (void)now;
    (void)req;
}

void router__proxy_on_complete(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct router__usage u;
    int choices_empty;

    req->up = NULL;
    req->upstream_done = 1;
    backend_attempt_end(req->pool->backend);
    if (req->is_sse && req->sse.len > 0) {
        forward(c, req->sse.data, req->sse.len);
        buf_reset(&req->sse);
    }
    if (!req->is_sse && req->up_body.len > 0 &&
        router__usage_parse(req->up_body.data, req->up_body.len, &u, &choices_empty))
        note_usage(req, &u);
    if (req->chunked)
        router__client_send(c, "0\r\n\r\n", 5);
    request_finished(c);
    router__client_response_done(c);
}

/* The upstream broke after the client got the response head: say so in
 * the stream (an SSE error event) and close, never a clean end. */
static void fail_midstream(struct router__client *c, const char *errstr)
{
    struct router__request *req = &c->req;
    int status;
    char *err = router__error_json(errstr, "the upstream connection broke mid-response", &status);
    struct buf ev = {0};

    req->broken = 1;
    req->keep_alive = 0;
    if (req->is_sse && err && buf_printf(&ev, "event: error\ndata: %s\n\n", err) == 0)
        forward(c, ev.data, ev.len);
    buf_free(&ev);
    free(err);
    request_finished(c);
    /* No terminating chunk: the transfer is visibly incomplete too. */
    router__client_response_done(c);
}

void router__proxy_on_error(struct router__client *c, const char *errstr)
{
    struct router__request *req = &c->req;
    uint64_t now = router__now(c->router);

    req->up = NULL;
    backend_attempt_end(req->pool->backend);
    if (req->response_started) {
        log_warn("request %s: backend %s failed mid-response: %s", req->id_str,
                 req->pool->conf->name, errstr);
        fail_midstream(c, errstr);
        return;
    }
    backend_attempt_failure(req->pool->backend, now);
    log_info("request %s: backend %s failed: %s", req->id_str, req->pool->conf->name, errstr);
    attempt_next(c, errstr);
}

void router__proxy_abort(struct router__client *c)
{
    struct router__request *req = &c->req;

    if (req->up == NULL)
        return;
    backend_attempt_end(req->pool->backend);
    router__upstream_abort(req->up);
    req->up = NULL;
}
