/*
 * router/handler.c: what to do with a complete request.
 *
 * Routes by path, authenticates the tenant, validates the JSON body and
 * finds the route the body's "model" names, then hands over to proxy.c.
 * Answers it makes itself (errors, /healthz, /v1/models) are complete
 * responses. Every error goes through router__send_error, where each
 * errstr constant maps once to a status and an OpenAI-style body.
 */
#define _GNU_SOURCE /* memmem */
#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/http_query.h"
#include "common/http_status.h"
#include "common/log.h"
#include "common/util.h"
#include "common/utf8.h"
#include "conf/conf.h"
#include "metrics/metrics.h"
#include "router/internal.h"

/* Buffers bigger than this are freed between requests rather than kept,
 * so an idle keep-alive connection holds little memory. */
#define ROUTER_KEEP_BUF 16384

struct error_map {
    const char *errstr; /* constant from common/error.h */
    int status;         /* HTTP status */
    const char *type;   /* OpenAI error type */
    const char *code;   /* OpenAI error code */
    const char *headers; /* header lines the answer always has, or NULL */
};

static const struct error_map error_maps[] = {
    {error_bad_json, 400, "invalid_request_error", "invalid_json", NULL},
    {error_duplicate_key, 400, "invalid_request_error", "invalid_json", NULL},
    {error_missing_model, 400, "invalid_request_error", "missing_model", NULL},
    {error_bad_request, 400, "invalid_request_error", "bad_request", NULL},
    {error_invalid_type, 400, "invalid_request_error", "invalid_type", NULL},
    {error_invalid_tags, 400, "invalid_request_error", "invalid_tags", NULL},
    {error_auth_twice, 400, "invalid_request_error", "bad_request", NULL},
    {error_xkey_twice, 400, "invalid_request_error", "bad_request", NULL},
    {error_auth_conflict, 400, "invalid_request_error", "bad_request", NULL},
    /* RFC 9110 11.6.1: a 401 names the scheme to answer it with (both
     * the admin API and /v1 take a Bearer key; no browser prompts for it). */
    {error_unauthorized, 401, "invalid_request_error", "invalid_api_key",
     "WWW-Authenticate: Bearer\r\n"},
    {error_not_found, 404, "invalid_request_error", "unknown_url", NULL},
    {error_unknown_model, 404, "invalid_request_error", "model_not_found", NULL},
    /* OpenAI's answer to a project without access to a model */
    {error_model_not_allowed, 403, "invalid_request_error", "model_not_found", NULL},
    {error_method, 405, "invalid_request_error", "method_not_allowed", NULL},
    {error_origin_not_allowed, 403, "invalid_request_error", "origin_not_allowed", NULL},
    {error_timeout_client, 408, "invalid_request_error", "request_timeout", NULL},
    {error_body_too_large, 413, "invalid_request_error", "request_too_large", NULL},
    {error_headers_too_large, 431, "invalid_request_error", "headers_too_large", NULL},
    {error_context_length, 400, "invalid_request_error", "context_length_exceeded", NULL},
    /* Not retried by the SDKs (a 503 is, in vain): the config decides it. */
    {error_below_quality_floor, 403, "invalid_request_error", "below_quality_floor", NULL},
    {error_budget_exhausted, 429, "insufficient_quota", "budget_exhausted", NULL},
    {error_rate_limited, 429, "rate_limit_error", "rate_limit_exceeded", NULL},
    {error_upstream_connect, 502, "api_error", "upstream_connect_failed", NULL},
    {error_upstream_io, 502, "api_error", "upstream_error", NULL},
    /* Not a 401: the tenant's key was fine, and the SDKs would tell the
     * user to change theirs. */
    {error_upstream_auth, 502, "api_error", "upstream_auth_failed", NULL},
    {error_no_backend, 503, "api_error", "no_backend_available", NULL},
    {error_upstream_connect_timeout, 504, "api_error", "upstream_connect_timeout", NULL},
    {error_upstream_first_byte_timeout, 504, "api_error", "upstream_timeout", NULL},
    {error_upstream_total_timeout, 504, "api_error", "upstream_timeout", NULL},
    {error_upstream_read_timeout, 504, "api_error", "upstream_timeout", NULL},
    {error_store_unavailable, 503, "api_error", "store_unavailable", NULL},
    /* Descriptors free up as connections close: worth a retry soon. */
    {error_no_descriptors, 503, "api_error", "router_overloaded", "Retry-After: 1\r\n"},
    /* Parked and not started: the log may catch up in a moment. */
    {error_cost_log_behind, 503, "api_error", "cost_log_behind", "Retry-After: 1\r\n"},
    {error_no_memory, 500, "api_error", "internal_error", NULL},
    {error_internal, 500, "api_error", "internal_error", NULL},
};

static const struct error_map *error_lookup(const char *errstr)
{
    for (size_t i = 0; i < ARRAY_SIZE(error_maps); i++)
        if (error_maps[i].errstr == errstr)
            return &error_maps[i];
    return &error_maps[ARRAY_SIZE(error_maps) - 1];
}

/* "cr-START-ID" in hex: unique across restarts and instances. */
static void request_id_format(char out[32], uint64_t start_id, uint64_t id)
{
    size_t n = 3;

    memcpy(out, "cr-", 3);
    n += fmt_hex(out + n, start_id);
    out[n++] = '-';
    n += fmt_hex(out + n, id);
    out[n] = '\0';
}

/* Give the request its id, once: at router__handle, or at an answer to
 * bytes that never made a request (malformed, over a limit). */
static void request_number(struct router__client *c)
{
    struct router__request *req = &c->req;

    if (req->id != 0)
        return;
    req->id = ++c->router->next_request_id;
    request_id_format(req->id_str, c->router->start_id, req->id);
}

static enum router__endpoint error_endpoint(const struct router__request *req);

/* Send a whole response the router made itself. The answer to HEAD is
 * the head alone, with the Content-Length the body would have had (RFC
 * 9110 9.3.2): a body after it would be read as the next answer's start.
 * To a client of Anthropic's API the request id goes in request-id too,
 * where Anthropic's API puts its own on every answer and its SDKs read
 * it (error.request_id); a backend's answer carries the backend's. */
void router__send_response(struct router__client *c, int status, const char *content_type,
                           const char *extra_headers, const char *body, size_t len)
{
    struct router__request *req = &c->req;
    char head[2048 + ROUTER_CORS_HEADERS_MAX + ROUTER_RATE_HEADERS_MAX];
    char cors[ROUTER_CORS_HEADERS_MAX], rate[ROUTER_RATE_HEADERS_MAX], framing[96] = "";
    int n, anthropic;

    request_number(c);
    req->status = status;
    req->response_started = 1;
    anthropic = ROUTER_EP_ANTHROPIC(error_endpoint(req));
    router__cors_headers(c, cors);
    /* Where the tenant's and key's rpm/tpm stand, on every answer to
     * their requests: clients read them from any (a refusal's too). */
    router__rate_headers(c, rate);
    /* A 204 (a CORS preflight's) has neither (RFC 9110 8.6). */
    if (status != 204)
        snprintf(framing, sizeof(framing), "Content-Type: %s\r\nContent-Length: %zu\r\n",
                 content_type, len);
    n = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\n%sx-request-id: %s\r\n%s%s%s%s%s%s%s\r\n",
                 status, http_status_text(status), framing, req->id_str,
                 anthropic ? "request-id: " : "", anthropic ? req->id_str : "",
                 anthropic ? "\r\n" : "", extra_headers ? extra_headers : "", rate, cors,
                 router__client_connection_header(c));
    if (n < 0 || (size_t)n >= sizeof(head)) {
        router__client_close(c);
        return;
    }
    uv_buf_t bufs[2] = {uv_buf_init(head, (unsigned)n), uv_buf_init((char *)body, (unsigned)len)};
    router__client_sendv(c, bufs, len && !req->head_method ? 2 : 1);
    router__client_response_done(c);
}

/* Anthropic's error type for an answer of `status`: its API has one type
 * per status (docs "Errors"), where OpenAI's has codes. */
static const char *anthropic_error_type(int status)
{
    switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: /* fall through */
    case 431: return "request_too_large";
    case 429: return "rate_limit_error";
    case 503: return "overloaded_error";
    default: return status < 500 ? "invalid_request_error" : "api_error";
    }
}

/* The error object for `errstr` in the language of endpoint `ep` (detail
 * may add context; it must never contain a secret): Anthropic's
 * {"type":"error","error":{"type","message"}} on /v1/messages and its
 * count_tokens, whose SDKs read no other, else OpenAI's. Caller frees. */
char *router__error_json(enum router__endpoint ep, const char *errstr, const char *detail,
                         int *status)
{
    const struct error_map *m = error_lookup(errstr);
    int anthropic = ROUTER_EP_ANTHROPIC(ep);
    cJSON *root = cJSON_CreateObject(), *err;
    char raw[512], msg[512];
    char *out;

    if (anthropic)
        cJSON_AddStringToObject(root, "type", "error");
    err = cJSON_AddObjectToObject(root, "error");

    if (detail && *detail)
        snprintf(raw, sizeof(raw), "%s: %s", errstr, detail);
    else
        snprintf(raw, sizeof(raw), "%s", errstr);
    /* The detail may quote a client's bytes (a model name), and cJSON
     * prints strings as they are: JSON must be valid UTF-8. */
    utf8_copy_valid(msg, sizeof(msg), raw);
    if (anthropic) {
        cJSON_AddStringToObject(err, "type", anthropic_error_type(m->status));
        cJSON_AddStringToObject(err, "message", msg);
    } else {
        cJSON_AddStringToObject(err, "message", msg);
        cJSON_AddStringToObject(err, "type", m->type);
        cJSON_AddNullToObject(err, "param");
        cJSON_AddStringToObject(err, "code", m->code);
    }
    out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    *status = m->status;
    return out;
}

/* Log an error answer: one line a second per kind at most. Under load a
 * down backend or store answers thousands of requests alike a second, and
 * each is in the cost log anyway, with its request id and status. */
static void log_error_answer(struct router__client *c, int status, const char *errstr,
                             const char *detail)
{
    static struct log_every by_kind[ARRAY_SIZE(error_maps)];
    struct log_every *t = &by_kind[error_lookup(errstr) - error_maps];
    char note[LOG_EVERY_NOTE_MAX];

    if (log_every_due(t, router__now(c->router), note))
        log_info("request %s: %d %s%s%s%s", c->req.id_str, status, errstr, detail ? ": " : "",
                 detail ? detail : "", note);
}

void router__send_error(struct router__client *c, const char *errstr, const char *detail)
{
    const char *extra = error_lookup(errstr)->headers, *methods;
    char allow[32];

    /* A 405 MUST say what the path does take (RFC 9110 15.5.6). */
    if (errstr == error_method) {
        methods = router__allowed_methods(&c->req);
        snprintf(allow, sizeof(allow), "Allow: %s\r\n", methods ? methods : "");
        extra = methods ? allow : NULL;
    }
    router__send_error_with(c, errstr, detail, extra);
}

void router__send_error_with(struct router__client *c, const char *errstr, const char *detail,
                             const char *extra_headers)
{
    int status;
    char *body = router__error_json(error_endpoint(&c->req), errstr, detail, &status);

    if (body == NULL) {
        router__client_close(c);
        return;
    }
    request_number(c); /* for the log line */
    if (status >= 500 || status == 408 || status == 413 || status == 431)
        log_error_answer(c, status, errstr, detail);
    router__send_response(c, status, "application/json", extra_headers, body, strlen(body));
    free(body);
}

/* The request's buffers that live between requests (`cached` does not). */
static void request_bufs(struct router__request *req, struct buf *out[ROUTER_REQ_NBUFS])
{
    struct buf *all[ROUTER_REQ_NBUFS] = {
        &req->url,     &req->auth, &req->body, &req->hname, &req->hvalue,   &req->fwd,
        &req->tag_text, &req->up_body, &req->sse, &req->head, &req->batch, &req->json_mem,
        &req->verdict_mem, &req->origin,
    };

    memcpy(out, all, sizeof(all));
}

void router__request_shelve(struct router *r, struct router__request *req)
{
    struct buf *bufs[ROUTER_REQ_NBUFS];
    struct router__shelf *shelf = &r->shelf;
    int room = shelf->n < ROUTER_SHELF_MAX;

    if (req->shelved)
        return;
    request_bufs(req, bufs);
    req->shelved = 1;
    for (int i = 0; i < ROUTER_REQ_NBUFS; i++) {
        if (room)
            shelf->sets[shelf->n][i] = *bufs[i];
        else
            buf_free(bufs[i]);
        *bufs[i] = (struct buf){0};
    }
    shelf->n += room;
}

void router__request_unshelve(struct router *r, struct router__request *req)
{
    struct buf *bufs[ROUTER_REQ_NBUFS];
    struct router__shelf *shelf = &r->shelf;

    if (!req->shelved)
        return;
    req->shelved = 0;
    if (shelf->n == 0)
        return; /* the buffers grow as the request needs them */
    shelf->n--;
    request_bufs(req, bufs);
    for (int i = 0; i < ROUTER_REQ_NBUFS; i++)
        *bufs[i] = shelf->sets[shelf->n][i];
}

void router__request_free(struct router__request *req)
{
    struct buf *bufs[ROUTER_REQ_NBUFS];

    router__request_reset(req);
    request_bufs(req, bufs);
    for (int i = 0; i < ROUTER_REQ_NBUFS; i++)
        buf_free(bufs[i]);
}

void router__shelf_free(struct router__shelf *shelf)
{
    for (unsigned n = 0; n < shelf->n; n++)
        for (int i = 0; i < ROUTER_REQ_NBUFS; i++)
            buf_free(&shelf->sets[n][i]);
    shelf->n = 0;
}

void router__request_reset(struct router__request *req)
{
    struct buf *bufs[ROUTER_REQ_NBUFS];

    router__json_drop(req);
    /* Every end of an answer read as it passed comes here: complete,
     * broken off, timed out, or the client gone. */
    router__bigusage_free(req->big_usage);
    req->big_usage = NULL;
    /* The tenant key is a secret: wipe it, do not just forget it. */
    if (req->auth.data)
        memset(req->auth.data, 0, req->auth.len);
    request_bufs(req, bufs);
    for (int i = 0; i < ROUTER_REQ_NBUFS; i++)
        buf_recycle(bufs[i], ROUTER_KEEP_BUF);
    req->batching = 0;
    buf_free(&req->cached);
    req->verdicts = NULL; /* in verdict_mem */
    req->head_bytes = 0;
    req->endpoint = ROUTER_EP_NONE;
    req->ntags = 0;
    req->tenant = NULL;
    req->key = NULL;
    req->arm = NULL;
    req->experiment = NULL;
    req->route = NULL;
    req->error = NULL;
    req->stream = req->injected_usage = req->keep_alive = req->response_started = 0;
    req->json_rewritten = 0;
    req->expect_continue = 0;
    req->auth_seen = req->xkey_seen = req->origin_seen = req->head_method = 0;
    req->accounted = 0;
    req->chunked = req->is_sse = req->upstream_done = req->broken = 0;
    req->request_sent = 0;
    req->tried = req->answered_429 = req->leader_failed = 0;
    req->attempts = req->fallbacks = 0;
    req->candidate = -1;
    req->reason = NULL;
    req->pool = req->sent_pool = NULL;
    req->up = NULL;
    req->status = req->upstream_status = 0;
    req->prompt_tokens = req->completion_tokens = req->cached_tokens = -1;
    req->asked_tier = CONF_TIER_STANDARD;
    req->answered_tier = -1;
    req->cache_write_tokens = req->cache_write_1h_tokens = req->input_tokens = -1;
    req->web_searches = -1;
    req->web_searches_held = 0;
    req->web_search_calls = 0;
    req->file_searches = -1;
    req->file_searches_held = req->file_search_calls = 0;
    req->searches_one_cap = 0;
    req->reported_usd = -1;
    req->start_ms = req->attempt_start_ms = req->ttft_ms = 0;
    req->prompt_est = req->prompt_raw = req->prompt_window = req->completion_pred = -1;
    req->completion_choices = 1;
    req->completion_counted = -1;
    memset(&req->billed, 0, sizeof(req->billed));
    memset(&req->choice, 0, sizeof(req->choice));
    req->choice.candidate = -1;
    req->store_op = NULL;
    memset(&req->res, 0, sizeof(req->res));
    req->over_micro = req->asked_micro = 0; /* given back where it settled, or answered */
    req->asked_key = 0;
    req->has_res = req->attempt_open = req->cacheable = req->flight_leader = 0;
    req->flight_waiting = req->cache_hit = req->head_held = req->settled = 0;
    req->sse_ended = req->sse_failed = 0;
    req->completion_limited = 0;
    req->arm_allowed = 0;
    req->begins = 0;
    req->budget_checked = req->overrun_checked = req->rate_held = 0;
    req->rate_tokens = 0;
    req->sse_scanned = 0;
    req->probe_chosen = req->success_due = req->ttft_due = 0;
    req->chosen_held = 0; /* released where the request ended */
    req->last_error = NULL;
    req->cache_model = req->cache_query = NULL;
    req->events = 0;
    req->cost_micro = req->saved_micro = 0;
    req->cost_usd = 0;
    req->id = 0; /* the next request's is given when it comes */
    req->id_str[0] = '\0';
}

/* How many bytes of s come before its first `a` or `b` (all: none). */
static size_t span_to(struct slice s, char a, char b)
{
    size_t i = 0;

    while (i < s.len && s.p[i] != a && s.p[i] != b)
        i++;
    return i;
}

/* Path without the query string (nor a fragment, which router__handle
 * refuses: a refusal still goes by the path, for its shape). */
static struct slice request_path(const struct router__request *req)
{
    struct slice s = {req->url.data, req->url.len};

    s.len = span_to(s, '?', '#');
    return s;
}

struct slice router__request_query(const struct router__request *req)
{
    struct slice path = request_path(req);
    struct slice q;

    if (path.len == req->url.len)
        return (struct slice){NULL, 0};
    q = (struct slice){req->url.data + path.len, req->url.len - path.len};
    q.len = span_to(q, '#', '#');
    /* A bare '?' is an empty query: no query, upstream and in the cache
     * key alike (`/v1/chat/completions?` is `/v1/chat/completions`). So
     * is one of separators alone ("?&&"): empty parameters go nowhere
     * (http_query_merge), and it has no other. */
    size_t i = 1;
    while (i < q.len && q.p[i] == '&')
        i++;
    if (i >= q.len)
        return (struct slice){NULL, 0};
    return q;
}

/* GET /v1/models/{id}: one model, as both APIs serve it. */
#define MODELS_PREFIX "/v1/models/"
#define MODELS_PREFIX_LEN (sizeof(MODELS_PREFIX) - 1)

/* The {id} of a path /v1/models/{id}, still percent-encoded (a route's
 * name may hold a '/', which a client encodes), or an empty slice. */
static struct slice model_id_of(struct slice path)
{
    if (path.len <= MODELS_PREFIX_LEN || memcmp(path.p, MODELS_PREFIX, MODELS_PREFIX_LEN) != 0)
        return (struct slice){NULL, 0};
    return (struct slice){path.p + MODELS_PREFIX_LEN, path.len - MODELS_PREFIX_LEN};
}

struct endpoint_def {
    const char *path;
    int method; /* llhttp method */
    enum router__endpoint endpoint;
};

static const struct endpoint_def endpoints[] = {
    {"/v1/chat/completions", HTTP_POST, ROUTER_EP_CHAT},
    {"/v1/completions", HTTP_POST, ROUTER_EP_COMPLETIONS},
    {"/v1/embeddings", HTTP_POST, ROUTER_EP_EMBEDDINGS},
    {"/v1/responses", HTTP_POST, ROUTER_EP_RESPONSES},
    {"/v1/messages", HTTP_POST, ROUTER_EP_MESSAGES},
    {"/v1/messages/count_tokens", HTTP_POST, ROUTER_EP_COUNT_TOKENS},
    {"/v1/models", HTTP_GET, ROUTER_EP_MODELS},
    {"/healthz", HTTP_GET, ROUTER_EP_HEALTHZ},
    {"/metrics", HTTP_GET, ROUTER_EP_METRICS},
    {"/dashboard", HTTP_GET, ROUTER_EP_DASHBOARD},
};

const char *router__endpoint_path(enum router__endpoint ep)
{
    for (size_t i = 0; i < ARRAY_SIZE(endpoints) && ROUTER_EP_PROXIED(ep); i++)
        if (endpoints[i].endpoint == ep)
            return endpoints[i].path;
    return NULL;
}

/* The language of the router's errors to `req`: its endpoint's, or, for a
 * request refused before it had one (a wrong method: GET /v1/messages),
 * its path's, so that an Anthropic SDK gets an error it reads. Off the
 * endpoints of one API (an unknown path such as /v1/messages/batches,
 * /v1/models), a client that sends anthropic-version, as Anthropic's API
 * requires and its SDKs do on every request, gets Anthropic's. */
static enum router__endpoint error_endpoint(const struct router__request *req)
{
    struct slice path = request_path(req);
    enum router__endpoint ep = req->endpoint;

    for (size_t i = 0; ep == ROUTER_EP_NONE && path.len > 0 && i < ARRAY_SIZE(endpoints); i++)
        if (slice_eq(path, endpoints[i].path))
            ep = endpoints[i].endpoint;
    if (!ROUTER_EP_PROXIED(ep) &&
        router__request_header(req, "anthropic-version", &(size_t){0}) != NULL)
        return ROUTER_EP_MESSAGES;
    return ep;
}

/* The methods the path of `req` takes, as an Allow header lists them, or
 * NULL for no path of the router's (a CONNECT's authority). The admin
 * paths take GET (and so HEAD), but for the reload, a POST. */
const char *router__allowed_methods(const struct router__request *req)
{
    static const char post[] = "POST", get[] = "GET, HEAD";
    struct slice path = request_path(req);

    if (slice_eq(path, "/admin/reload"))
        return post;
    if ((path.len > 7 && memcmp(path.p, "/admin/", 7) == 0) || model_id_of(path).len > 0)
        return get;
    for (size_t i = 0; i < ARRAY_SIZE(endpoints); i++)
        if (slice_eq(path, endpoints[i].path))
            return endpoints[i].method == HTTP_POST ? post : get;
    return NULL;
}

/* Find the endpoint; sets *errstr to error_not_found or error_method. */
static enum router__endpoint endpoint_find(struct slice path, int method, const char **errstr)
{
    if (path.len > 7 && memcmp(path.p, "/admin/", 7) == 0)
        return ROUTER_EP_ADMIN; /* methods checked per admin path */
    if (model_id_of(path).len > 0) {
        if (method == HTTP_GET || method == HTTP_HEAD)
            return ROUTER_EP_MODELS;
        *errstr = error_method;
        return ROUTER_EP_NONE;
    }
    for (size_t i = 0; i < ARRAY_SIZE(endpoints); i++) {
        if (!slice_eq(path, endpoints[i].path))
            continue;
        if (endpoints[i].method == method ||
            (method == HTTP_HEAD && endpoints[i].method == HTTP_GET))
            return endpoints[i].endpoint;
        *errstr = error_method;
        return ROUTER_EP_NONE;
    }
    *errstr = error_not_found;
    return ROUTER_EP_NONE;
}

const char *router__bearer(const struct router__client *c, size_t *len)
{
    const struct buf *a = &c->req.auth;
    size_t skip = 7; /* the value's trailing whitespace is gone already (server.c) */

    if (a->len <= skip || strncasecmp(a->data, "Bearer ", skip) != 0)
        return NULL;
    while (skip < a->len && (a->data[skip] == ' ' || a->data[skip] == '\t'))
        skip++;
    *len = a->len - skip;
    return a->data + skip;
}

/* The tenant key of "Authorization: Bearer KEY", or NULL. The key is
 * hashed at once; only its hash is compared (in constant time). */
static const struct conf_key *authenticate(struct router__client *c)
{
    struct router__shared *sh = c->router->shared;
    uint8_t digest[32];
    size_t len;
    const char *key = router__bearer(c, &len);

    if (key == NULL || len == 0)
        return NULL;
    if (EVP_DigestInit_ex2(sh->sha256_ctx, sh->sha256, NULL) != 1 ||
        EVP_DigestUpdate(sh->sha256_ctx, key, len) != 1 ||
        EVP_DigestFinal_ex(sh->sha256_ctx, digest, NULL) != 1)
        return NULL;
    return conf_find_key(c->router->conf, digest);
}

/* Does the client speak Anthropic's API? It sends anthropic-version, as
 * Anthropic's API requires and its SDKs do on every request. */
static int speaks_anthropic(const struct router__client *c)
{
    return router__request_header(&c->req, "anthropic-version", &(size_t){0}) != NULL;
}

/* May the client list or use `route`: its key allows it, and one of its
 * candidates speaks the client's API (else its requests are a 404)? */
static int model_listed(const struct router__client *c, const struct conf_route *route)
{
    return route->speaks[speaks_anthropic(c) ? CONF_API_ANTHROPIC : CONF_API_OPENAI] != 0 &&
           conf_key_allows(c->req.key, route);
}

/* A route as the client's API describes a model: Anthropic's {type, id,
 * display_name, created_at}, OpenAI's {id, object, created, owned_by}. */
static cJSON *model_object(const struct router__client *c, const char *id)
{
    cJSON *m = cJSON_CreateObject();

    if (speaks_anthropic(c)) {
        cJSON_AddStringToObject(m, "type", "model");
        cJSON_AddStringToObject(m, "id", id);
        cJSON_AddStringToObject(m, "display_name", id);
        cJSON_AddStringToObject(m, "created_at", "1970-01-01T00:00:00Z");
    } else {
        cJSON_AddStringToObject(m, "id", id);
        cJSON_AddStringToObject(m, "object", "model");
        cJSON_AddNumberToObject(m, "created", 0);
        cJSON_AddStringToObject(m, "owned_by", "costrouter");
    }
    return m;
}

/* Answer `root` (freed) as a 200 JSON body. */
static void send_json(struct router__client *c, cJSON *root)
{
    char *body = cJSON_PrintUnformatted(root);

    cJSON_Delete(root);
    if (body == NULL) {
        router__send_error(c, error_no_memory, NULL);
        return;
    }
    router__send_response(c, 200, "application/json", NULL, body, strlen(body));
    free(body);
}

/* `enc` percent-decoded into out[cap] (NUL-terminated); -1 when it does
 * not fit, has a bad escape or decodes to a NUL byte. */
static int percent_decode(struct slice enc, char *out, size_t cap)
{
    size_t n = 0;

    for (size_t i = 0; i < enc.len; i++) {
        unsigned char ch = (unsigned char)enc.p[i];

        if (ch == '%') {
            if (!http_percent_at(enc, i, &ch))
                return -1;
            i += 2;
        }
        if (ch == 0 || n + 1 >= cap)
            return -1;
        out[n++] = (char)ch;
    }
    out[n] = '\0';
    return 0;
}

/* GET /v1/models/{id}: the route of that name as a model, if the client
 * may list it (see send_models); else the 404 a request naming it gets. */
static void send_model(struct router__client *c, struct slice enc)
{
    const struct conf_route *route;
    char id[CONF_NAME_MAX + 1];

    if (percent_decode(enc, id, sizeof(id)) != 0 ||
        (route = conf_find_route(c->router->conf, id, strlen(id))) == NULL ||
        !model_listed(c, route)) {
        router__send_error(c, error_unknown_model, NULL);
        return;
    }
    send_json(c, model_object(c, route->model));
}

/* The routes the tenant may use that the client's API can serve (a route
 * none of whose candidates speaks it would answer its requests 404), as
 * that API lists models. A client that speaks Anthropic's gets one page
 * of its model objects with has_more, first_id and last_id; any other
 * OpenAI's list. */
static void send_models(struct router__client *c)
{
    const struct conf *conf = c->router->conf;
    int anthropic = speaks_anthropic(c);
    cJSON *root = cJSON_CreateObject(), *data = cJSON_AddArrayToObject(root, "data");
    const char *first = NULL, *last = NULL;

    if (!anthropic)
        cJSON_AddStringToObject(root, "object", "list");
    for (size_t i = 0; i < conf->nroutes; i++) {
        const char *id = conf->routes[i].model;

        if (!model_listed(c, &conf->routes[i]))
            continue;
        cJSON_AddItemToArray(data, model_object(c, id));
        first = first ? first : id;
        last = id;
    }
    if (anthropic) {
        cJSON_AddBoolToObject(root, "has_more", 0);
        if (first) {
            cJSON_AddStringToObject(root, "first_id", first);
            cJSON_AddStringToObject(root, "last_id", last);
        } else {
            cJSON_AddNullToObject(root, "first_id");
            cJSON_AddNullToObject(root, "last_id");
        }
    }
    send_json(c, root);
}

static int key_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

#define DUP_SCAN_MAX 16 /* members compared pairwise; more are sorted */

/* A name that appears twice among the `n` members of `obj`, NULL if none,
 * "" when out of memory. Sorted when there are many, so that an object
 * of a million keys is not a million squared comparisons. */
static const char *twice_in(const cJSON *obj, size_t n)
{
    const char **names, *found = NULL;
    size_t i = 0;

    if (n <= DUP_SCAN_MAX) {
        for (const cJSON *a = obj->child; a; a = a->next)
            for (const cJSON *b = a->next; b; b = b->next)
                if (strcmp(a->string, b->string) == 0)
                    return a->string;
        return NULL;
    }
    if ((names = malloc(n * sizeof(*names))) == NULL)
        return "";
    for (const cJSON *a = obj->child; a; a = a->next)
        names[i++] = a->string;
    qsort(names, n, sizeof(*names), key_cmp);
    for (i = 1; i < n && found == NULL; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            found = names[i];
    free(names);
    return found;
}

/* The first name that appears twice in one object of the tree, NULL if
 * none, "" when out of memory.
 * Parsers disagree on which of two "model"s or "max_tokens"s counts
 * (cJSON takes the first, many servers the last), so such a body could
 * be priced as one request and served as another. */
static const char *duplicate_key(const cJSON *node)
{
    const char *dup = NULL;
    size_t n = 0;

    for (const cJSON *a = node->child; a && dup == NULL; a = a->next, n++)
        if (a->child)
            dup = duplicate_key(a);
    if (dup == NULL && cJSON_IsObject(node) && n > 1)
        dup = twice_in(node, n);
    return dup;
}

/* Validate the JSON body and find the route its "model" names. */
/* Does the body hold U+0000, raw or escaped (\u0000, after an odd run of
 * backslashes)? cJSON's strings end there: the router would count, price
 * and limit a prompt cut short at it while the backend got all of it. */
static int holds_nul(const char *p, size_t len)
{
    const char *end = p + len, *q = p, *run;

    if (len == 0)
        return 0;
    if (memchr(p, '\0', len) != NULL)
        return 1;
    /* From backslash run to backslash run (memchr, not a search for
     * "u0000" at every byte: 3.5k instructions for a 1 KB chat): after an
     * odd run the next character is escaped. */
    while ((q = memchr(q, '\\', (size_t)(end - q))) != NULL) {
        for (run = q; q < end && *q == '\\'; q++)
            ;
        if ((q - run) % 2 == 1 && end - q >= 5 && memcmp(q, "u0000", 5) == 0)
            return 1;
    }
    return 0;
}

/* Is `v` absent, null, or of a JSON type in `types` (cJSON type bits)? */
static int absent_or(const cJSON *v, int types)
{
    return v == NULL || cJSON_IsNull(v) || (v->type & 0xff & types) != 0;
}

/* Does the array `v` hold objects only? 1 when `v` is no array (its own
 * type is checked apart). */
static int objects_only(const cJSON *v)
{
    const cJSON *item;

    if (!cJSON_IsArray(v))
        return 1;
    cJSON_ArrayForEach(item, v)
        if (!cJSON_IsObject(item))
            return 0;
    return 1;
}

/* A /v1/responses body whose members the estimate reads have types the
 * API refuses too: answered 400 here, as OpenAI would, rather than priced
 * as something else and sent. NULL when fine, else what is wrong. */
static const char *responses_shape_error(const cJSON *body)
{
    const cJSON *input = cJSON_GetObjectItemCaseSensitive(body, "input"), *item;

    if (!absent_or(cJSON_GetObjectItemCaseSensitive(body, "instructions"), cJSON_String))
        return "'instructions' must be a string";
    if (!absent_or(cJSON_GetObjectItemCaseSensitive(body, "max_output_tokens"), cJSON_Number))
        return "'max_output_tokens' must be an integer";
    if (!absent_or(input, cJSON_String | cJSON_Array))
        return "'input' must be a string or an array of input items";
    if (!cJSON_IsArray(input))
        return NULL;
    cJSON_ArrayForEach(item, input) {
        if (!cJSON_IsObject(item))
            return "each item of 'input' must be an object";
        if (!absent_or(cJSON_GetObjectItemCaseSensitive(item, "content"),
                       cJSON_String | cJSON_Array))
            return "an input message's 'content' must be a string or an array of parts";
    }
    return NULL;
}

/* A chat body whose messages have types the API refuses too: answered
 * 400 here, as OpenAI would, rather than priced as something else and
 * sent. The estimate counts a message's string members and the parts of
 * its content array: a message that is no object, or a content or role
 * of another type, was a few tokens whatever it held, under tpm limits
 * and budget holds. NULL when fine, else what is wrong. */
static const char *chat_shape_error(const cJSON *body)
{
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(body, "messages"), *m;

    if (!absent_or(msgs, cJSON_Array))
        return "'messages' must be an array of messages";
    if (!cJSON_IsArray(msgs))
        return NULL;
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");

        if (!cJSON_IsObject(m))
            return "each message of 'messages' must be an object";
        if (!absent_or(cJSON_GetObjectItemCaseSensitive(m, "role"), cJSON_String))
            return "a message's 'role' must be a string";
        if (!absent_or(content, cJSON_String | cJSON_Array))
            return "a message's 'content' must be a string or an array of content parts";
        if (!objects_only(content))
            return "each content part of a message must be an object";
    }
    return NULL;
}

/* A /v1/messages body whose members the estimate reads have types
 * Anthropic's API refuses too (or without the max_tokens it requires, which
 * a count_tokens body, `counting`, has not): answered 400 here, as the API
 * would, rather than priced as something else and sent. NULL when fine,
 * else what is wrong. */
static const char *messages_shape_error(const cJSON *body, int counting)
{
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(body, "messages"), *m;
    const cJSON *system = cJSON_GetObjectItemCaseSensitive(body, "system");
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(body, "tools");

    if (!counting && !cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(body, "max_tokens")))
        return "max_tokens: Field required (an integer)";
    if (!cJSON_IsArray(msgs))
        return "messages: Field required (an array of messages)";
    if (!absent_or(system, cJSON_String | cJSON_Array))
        return "system: must be a string or an array of text blocks";
    if (!objects_only(system))
        return "system: each block must be an object";
    if (!absent_or(tools, cJSON_Array))
        return "tools: must be an array";
    if (!objects_only(tools))
        return "tools: each tool must be an object";
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");

        if (!cJSON_IsObject(m))
            return "messages: each message must be an object";
        if (!cJSON_IsString(content) && !cJSON_IsArray(content))
            return "messages: a message's content must be a string or an array of blocks";
        if (!objects_only(content))
            return "messages: each content block must be an object";
    }
    return NULL;
}

/* The members a request's completion hold is sized by, which must be
 * numbers when given: a string ("5000") is no cap to the router, which
 * would hold for its guess, while a server that coerces it (vLLM) makes
 * that many tokens. The APIs refuse them too. */
static const char *held_number_error(const cJSON *body)
{
    static const char *const names[][2] = {
        {"max_tokens", "'max_tokens' must be a number"},
        {"max_completion_tokens", "'max_completion_tokens' must be a number"},
        {"max_output_tokens", "'max_output_tokens' must be a number"},
        {"n", "'n' must be a number"},
        {"best_of", "'best_of' must be a number"},
    };
    const cJSON *m;

    /* One walk of the body's members (not a lookup per name, each of
     * which walks them all when the name is absent, as most are). */
    cJSON_ArrayForEach(m, body) {
        if (absent_or(m, cJSON_Number))
            continue;
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
            if (strcmp(m->string, names[i][0]) == 0)
                return names[i][1];
    }
    return NULL;
}

static const char *parse_body(struct router__client *c, const char **detail)
{
    struct router__request *req = &c->req;
    const cJSON *model, *stream;

    if (router__json_parse(req) == NULL || !cJSON_IsObject(req->json))
        return error_bad_json;
    if (holds_nul(req->body.data, req->body.len)) {
        *detail = "a string holds U+0000";
        return error_bad_json;
    }
    if ((*detail = duplicate_key(req->json)) != NULL)
        return **detail ? error_duplicate_key : error_no_memory;
    model = cJSON_GetObjectItemCaseSensitive(req->json, "model");
    if (!cJSON_IsString(model) || model->valuestring[0] == '\0')
        return error_missing_model;
    req->route = conf_find_route(c->router->conf, model->valuestring, strlen(model->valuestring));
    /* A route none of whose candidates speaks the endpoint's API is, to
     * that API, no model at all: answered as an unknown one. */
    if (req->route == NULL || req->route->speaks[router__endpoint_api(req->endpoint)] == 0)
        return error_unknown_model;
    if (!conf_key_allows(req->key, req->route))
        return error_model_not_allowed;
    if (req->endpoint == ROUTER_EP_CHAT && (*detail = chat_shape_error(req->json)))
        return error_invalid_type;
    if (req->endpoint == ROUTER_EP_RESPONSES && (*detail = responses_shape_error(req->json)))
        return error_invalid_type;
    if (ROUTER_EP_ANTHROPIC(req->endpoint) &&
        (*detail = messages_shape_error(req->json, req->endpoint == ROUTER_EP_COUNT_TOKENS)))
        return error_invalid_type;
    stream = cJSON_GetObjectItemCaseSensitive(req->json, "stream");
    /* As the APIs refuse it: else the router would take "true" or 1 for
     * false while a server that coerces it (vLLM) streams. */
    if (req->endpoint != ROUTER_EP_EMBEDDINGS && req->endpoint != ROUTER_EP_COUNT_TOKENS &&
        !absent_or(stream, cJSON_True | cJSON_False)) {
        *detail = "'stream' must be a boolean";
        return error_invalid_type;
    }
    if (req->endpoint != ROUTER_EP_EMBEDDINGS && req->endpoint != ROUTER_EP_COUNT_TOKENS &&
        (*detail = held_number_error(req->json)) != NULL)
        return error_invalid_type;
    req->stream = cJSON_IsTrue(stream) && req->endpoint != ROUTER_EP_EMBEDDINGS;
    return NULL;
}

/* Bytes a tag key may hold: a name for the report's tag.KEY groups. */
static int tag_key_byte(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_' || ch == '-' || ch == '.';
}

/* `s` with blanks cut from both ends. */
static struct slice trim_blanks(struct slice s)
{
    while (s.len > 0 && (s.p[0] == ' ' || s.p[0] == '\t'))
        s.p++, s.len--;
    while (s.len > 0 && (s.p[s.len - 1] == ' ' || s.p[s.len - 1] == '\t'))
        s.len--;
    return s;
}

/* Why the tag `key`=`value` cannot be taken (`has_value`: an '=' was
 * there), or NULL. */
static const char *tag_problem(const struct router__request *req, struct slice key,
                               struct slice value, int has_value)
{
    if (!has_value || key.len == 0 || value.len == 0)
        return "each tag is KEY=VALUE, both non-empty";
    if (key.len > ROUTER_TAG_KEY_MAX || value.len > ROUTER_TAG_VALUE_MAX)
        return "a tag key has at most 64 bytes, a value 128";
    for (size_t i = 0; i < key.len; i++)
        if (!tag_key_byte((unsigned char)key.p[i]))
            return "a tag key holds letters, digits and _ - . only";
    for (size_t i = 0; i < value.len; i++)
        if ((unsigned char)value.p[i] < 0x20 || (unsigned char)value.p[i] > 0x7e)
            return "a tag value holds printable ASCII only";
    for (size_t i = 0; i < req->tenant->ntags; i++)
        if (slice_eq(key, req->tenant->tags[i].key))
            return "a tag the tenant's config sets cannot be set by a request";
    for (unsigned i = 0; i < req->ntags; i++)
        if (slice_eq(key, req->tags[i].key))
            return "a tag is given twice";
    if (req->ntags == ROUTER_REQUEST_TAGS_MAX)
        return "at most 8 tags";
    return NULL;
}

/* The request's own tags (x-costrouter-tags: KEY=VALUE, ...), beside the
 * tenant's in its cost log line: what it is for (a feature, an app), for
 * chargeback. They are cut out of tag_text in place (NUL-ended). The
 * tenant's own tags stay the operator's: a request cannot set those. */
static const char *parse_tags(struct router__request *req, const char **detail)
{
    char *p, *end;

    if (req->tag_text.len == 0)
        return NULL;
    if (buf_append(&req->tag_text, "", 1) != 0) /* a NUL after the last value */
        return error_no_memory;
    p = req->tag_text.data;
    end = p + req->tag_text.len - 1;
    while (p < end) {
        char *comma = memchr(p, ',', (size_t)(end - p)), *stop = comma ? comma : end;
        char *eq = memchr(p, '=', (size_t)(stop - p));
        struct slice whole = trim_blanks((struct slice){p, (size_t)(stop - p)});
        struct slice key = trim_blanks((struct slice){p, (size_t)((eq ? eq : stop) - p)});
        struct slice value = eq ? trim_blanks((struct slice){eq + 1, (size_t)(stop - eq - 1)})
                                : (struct slice){stop, 0};

        p = stop + 1;
        if (whole.len == 0)
            continue; /* an empty element of the list ("a=b, ,c=d"), as RFC 9110 5.6.1 allows */
        if ((*detail = tag_problem(req, key, value, eq != NULL)) != NULL) {
            req->ntags = 0; /* refused: its line carries none of them, not those before */
            return error_invalid_tags;
        }
        ((char *)key.p)[key.len] = '\0';
        ((char *)value.p)[value.len] = '\0';
        req->tags[req->ntags++] = (struct conf_tag){(char *)key.p, (char *)value.p};
    }
    return NULL;
}

const char *router__refusal_on_head(struct router__client *c)
{
    struct router__request *req = &c->req;
    const char *errstr = NULL;
    enum router__endpoint ep =
        endpoint_find(request_path(req), llhttp_get_method(&c->parser), &errstr);

    if (ep == ROUTER_EP_NONE)
        return errstr; /* unknown path, wrong method */
    if (ROUTER_EP_PROXIED(ep) && authenticate(c) == NULL)
        return error_unauthorized;
    return NULL;
}

void router__refuse(struct router__client *c, const char *errstr, const char *detail)
{
    struct router__request *req = &c->req;
    const char *unused = NULL;
    enum router__endpoint ep = req->url.len > 0 ? endpoint_find(request_path(req),
                                                                llhttp_get_method(&c->parser),
                                                                &unused)
                                                : ROUTER_EP_NONE;

    request_number(c);
    if (ROUTER_EP_PROXIED(ep)) {
        /* In the cost log and the metrics like any /v1 request, under its
         * tenant when the key was read before the refusal. */
        req->endpoint = ep;
        req->key = authenticate(c);
        req->tenant = req->key ? req->key->tenant : NULL;
    }
    router__send_error(c, errstr, detail);
}

void router__handle(struct router__client *c)
{
    struct router__request *req = &c->req;
    const char *errstr = NULL;
    const char *detail = NULL;

    request_number(c);
    req->start_ms = router__now(c->router);
    if (req->url.len > 0 && memchr(req->url.data, '#', req->url.len) != NULL) {
        /* A fragment is the client's own, never sent (RFC 9112 3.2: a
         * request target has none; llhttp lets it in). Passed on, it
         * would reach the backend as part of the query; Envoy refuses it
         * too. Refused as any malformed request, in the path's shape. */
        router__refuse(c, error_bad_request, "the request target has a fragment ('#')");
        return;
    }
    if (llhttp_get_method(&c->parser) == HTTP_OPTIONS && router__cors_preflight(c))
        return;
    req->endpoint = endpoint_find(request_path(req), llhttp_get_method(&c->parser), &errstr);
    if (req->endpoint == ROUTER_EP_NONE)
        goto fail;
    if (req->endpoint == ROUTER_EP_HEALTHZ) {
        static const char ok[] = "{\"status\":\"ok\"}";
        router__send_response(c, 200, "application/json", NULL, ok, sizeof(ok) - 1);
        return;
    }
    if (req->endpoint >= ROUTER_EP_METRICS) {
        router__admin_handle(c, request_path(req));
        return;
    }
    req->key = authenticate(c);
    req->tenant = req->key ? req->key->tenant : NULL;
    if (ROUTER_EP_PROXIED(req->endpoint)) {
        req->inflight = 1; /* until router__account */
        metrics_add(c->router->metrics, METRICS_INFLIGHT_REQUESTS, NULL, 1);
        /* It will write a cost log record: not while the log is behind. */
        if (router__park(c))
            return;
    }
    router__handle_resume(c);
    return;
fail:
    router__send_error(c, errstr, detail);
}

void router__handle_resume(struct router__client *c)
{
    struct router__request *req = &c->req;
    const char *errstr = NULL;
    const char *detail = NULL;

    if (req->tenant == NULL) {
        errstr = error_unauthorized;
        goto fail;
    }
    if (req->endpoint == ROUTER_EP_MODELS) {
        struct slice id = model_id_of(request_path(req));

        if (id.len > 0)
            send_model(c, id);
        else
            send_models(c);
        return;
    }
    errstr = parse_body(c, &detail);
    if (errstr == NULL)
        errstr = parse_tags(req, &detail);
    if (errstr == error_unknown_model || errstr == error_model_not_allowed)
        detail = cJSON_GetObjectItemCaseSensitive(req->json, "model")->valuestring;
    if (errstr != NULL)
        goto fail;
    router__proxy_start(c);
    return;
fail:
    router__send_error(c, errstr, detail);
}
