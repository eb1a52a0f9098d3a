/*
 * router/proxy.c: one client request sent upstream, cost-aware, with
 * fallback.
 *
 * The flow of a proxied request:
 *   estimate  prompt tokens (exact BPE for the route's tokenizer) and the
 *             completion (max_tokens, or the tenant's recent P95);
 *   choose    policy/ picks the cheapest qualifying candidate against the
 *             tenant's spend snapshot (no I/O);
 *   reserve   spend.c: one store call reserves the estimated cost and, for
 *             deterministic requests, looks the response cache up;
 *   send      the body is rewritten for the backend and sent on a pooled
 *             connection;
 *   answer    until the first byte reaches the client, a failure releases
 *             the reservation and goes back to `choose` with the backend
 *             marked tried; after that the response is the client's:
 *             streams are forwarded event by event, other bodies are held
 *             until complete so their head can carry the settled cost
 *             (one over 8 MiB goes out as it comes, its usage read as it
 *             passes: bigusage.c);
 *   settle    the real cost (usage x price, or the GPU-seconds share) is
 *             charged, logged, and put in x-costrouter-cost-usd (a header,
 *             or for streams a final SSE comment and a chunked trailer).
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"
#include "common/error.h"
#include "common/http_hop.h"
#include "common/http_query.h"
#include "common/http_status.h"
#include "common/log.h"
#include "common/util.h"
#include "conf/conf.h"
#include "metrics/metrics.h"
#include "policy/policy.h"
#include "router/internal.h"

/* Pause the upstream when this many bytes wait to go to the client. */
#define PROXY_CLIENT_HIGH_WATER (256u * 1024)
/* Hold at most this much of a non-streamed body; past it the head goes
 * out without the cost header (it is in the trailer) and the rest is
 * forwarded as it comes, its usage and text read as they pass. */
#define PROXY_HOLD_BODY_MAX (8u * 1024 * 1024)
/* One SSE event is held until its blank line: usage, the token count and
 * on_overrun read whole events. An event longer than this (chat chunks
 * are a few hundred bytes; a streamed image part a few MB) is an upstream
 * that does not frame its stream, whose bytes would pile up unbounded. */
#define PROXY_SSE_EVENT_MAX (16u * 1024 * 1024)
/* Completion tokens assumed when nothing better is known. */
#define PROXY_COMPLETION_FALLBACK 256
/* Store round trips allowed for one request's reservations, beside the
 * one of each attempt sent (each fallback holds anew): those that held
 * nothing to send with (refused under contention, a probe taken). */
#define PROXY_MAX_BEGINS 4

static const char *endpoint_suffix(enum router__endpoint ep)
{
    switch (ep) {
    case ROUTER_EP_CHAT:
        return "/chat/completions";
    case ROUTER_EP_COMPLETIONS:
        return "/completions";
    case ROUTER_EP_EMBEDDINGS:
        return "/embeddings";
    case ROUTER_EP_RESPONSES:
        return "/responses";
    case ROUTER_EP_MESSAGES:
        return "/messages";
    case ROUTER_EP_COUNT_TOKENS:
        return "/messages/count_tokens";
    default:
        return "";
    }
}


/* Is the request a token count (POST /v1/messages/count_tokens)? Anthropic
 * bills nothing for one and it generates nothing: it holds no budget, is
 * charged nothing, takes no tokens from the tpm limits and is not cached
 * (see choose_and_reserve). */
static int counting(const struct router__request *req)
{
    return req->endpoint == ROUTER_EP_COUNT_TOKENS;
}

/* Does the stream to `b` need stream_options.include_usage added? Chat
 * and completions streams carry their usage only when asked. The
 * Responses API has no such option (a server refuses it) and always ends
 * its stream with the usage, in response.completed. */
static int asks_stream_usage(const struct router__request *req, const struct conf_backend *b)
{
    return req->stream && b->stream_usage &&
           (req->endpoint == ROUTER_EP_CHAT || req->endpoint == ROUTER_EP_COMPLETIONS);
}

/* Rewrite the parsed body for backend `b`: its model name, and for a
 * stream (unless the backend says stream_usage: false),
 * stream_options.include_usage so the real token counts arrive at the
 * end (remembered so the extra usage event is not shown to a client that
 * did not ask for it). */
static int rewrite_body(struct router__request *req, const struct conf_backend *b)
{
    cJSON *model, *opts, *inc;

    /* A backend without `model` gets the name the client used (the
     * route's), also after a fallback rewrote it for another backend. */
    model = cJSON_CreateString(b->model ? b->model : req->route->model);
    if (model == NULL || !cJSON_ReplaceItemInObjectCaseSensitive(req->json, "model", model))
        return -1;
    if (!req->stream || req->endpoint == ROUTER_EP_EMBEDDINGS ||
        req->endpoint == ROUTER_EP_RESPONSES)
        return 0;
    opts = cJSON_GetObjectItemCaseSensitive(req->json, "stream_options");
    if (!asks_stream_usage(req, b)) {
        if (req->injected_usage) /* added for a backend tried before */
            cJSON_DeleteItemFromObjectCaseSensitive(opts, "include_usage");
        req->injected_usage = 0;
        return 0;
    }
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
/*
 * Where the top-level "model" string value lies in the (already
 * validated) JSON body: [*start, *end) including its quotes. Only a key
 * written plainly as "model" is found; anything unusual (escapes in the
 * key) returns -1 and the caller re-serializes with cJSON instead.
 */
int router__json_model_span(const char *p, size_t len, size_t *start, size_t *end)
{
    int depth = 0;
    char last = 0; /* last significant character outside strings */
    size_t i = 0;

    while (i < len) {
        char ch = p[i];

        if (ch == '"') {
            size_t s = i++;
            int is_key = depth == 1 && (last == '{' || last == ',');

            while (i < len && p[i] != '"')
                i += p[i] == '\\' ? 2 : 1;
            if (i >= len)
                return -1;
            i++; /* past the closing quote */
            last = '"';
            if (!is_key || i - s != 7 || memcmp(p + s, "\"model\"", 7) != 0)
                continue;
            while (i < len && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r' || p[i] == ':'))
                i++;
            if (i >= len || p[i] != '"')
                return -1;
            *start = i++;
            while (i < len && p[i] != '"')
                i += p[i] == '\\' ? 2 : 1;
            if (i >= len)
                return -1;
            *end = i + 1;
            return 0;
        }
        if (ch == '{' || ch == '[')
            depth++;
        else if (ch == '}' || ch == ']')
            depth--;
        if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r')
            last = ch;
        i++;
    }
    return -1;
}

char *router__json_quote(const char *s)
{
    cJSON *str = cJSON_CreateString(s);
    char *printed = str ? cJSON_PrintUnformatted(str) : NULL;

    cJSON_Delete(str);
    return printed;
}

/* The body for a backend, as pieces of bytes held elsewhere: written
 * straight after the head, so the body is copied once. */
struct body_parts {
    const char *p[5];  /* pieces, in order */
    size_t n[5];       /* their lengths */
    int count;         /* pieces used */
    size_t len;        /* their sum: the Content-Length */
    char *owned;       /* malloc'd piece to free afterwards, or NULL */
};

static void part_add(struct body_parts *bp, const char *p, size_t n)
{
    bp->p[bp->count] = p;
    bp->n[bp->count++] = n;
    bp->len += n;
}

/* The body for backend `b`: the client's bytes with the model value
 * replaced (and, for a stream that did not ask for usage, stream_options
 * added after the opening brace), so the body is not parsed into a tree
 * and printed again. Falls back to cJSON for bodies the splice does not
 * handle. */
static int body_for(struct router__request *req, const struct router__pool *pool,
                    struct body_parts *bp)
{
    const struct conf_backend *b = pool->conf;
    const char *p = req->body.data, *model = pool->model_json;
    size_t start, end, open;
    int inject = 0, rc;

    memset(bp, 0, sizeof(*bp));
    /* Once rewrite_body changed the parsed body (an attempt before), it
     * no longer says what the client sent (its include_usage: false read
     * as true), and the splice below, of the client's bytes, would go by
     * it: that path again. */
    if (req->json_rewritten)
        goto print;
    if (asks_stream_usage(req, b)) {
        const cJSON *opts = cJSON_GetObjectItemCaseSensitive(req->json, "stream_options");

        if (opts != NULL &&
            !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(opts, "include_usage")))
            goto print; /* stream_options to amend: rare, let cJSON do it */
        inject = opts == NULL;
    }
    if (router__json_model_span(p, req->body.len, &start, &end) != 0)
        goto print;
    if (model == NULL) /* the backend has no model: the route's name, JSON-escaped */
        model = bp->owned = router__json_quote(req->route->model);
    if (model == NULL)
        return -1;
    open = (size_t)((const char *)memchr(p, '{', req->body.len) - p);
    part_add(bp, p, open + 1);
    if (inject)
        part_add(bp, "\"stream_options\":{\"include_usage\":true},", 40);
    part_add(bp, p + open + 1, start - open - 1);
    part_add(bp, model, strlen(model));
    part_add(bp, p + end, req->body.len - end);
    req->injected_usage = inject;
    return 0;
print:
    req->json_rewritten = 1;
    router__json_enter(req);
    rc = rewrite_body(req, b);
    router__json_leave();
    if (rc != 0 || (bp->owned = cJSON_PrintUnformatted(req->json)) == NULL)
        return -1;
    part_add(bp, bp->owned, strlen(bp->owned));
    return 0;
}

int router__fixed_headers(const struct conf_backend *b, struct buf *out)
{
    int rc = buf_printf(out, b->host_is_ipv6 ? "Host: [%s]" : "Host: %s", b->host);

    if (rc == 0 && b->port != (b->tls ? 443 : 80))
        rc = buf_printf(out, ":%u", b->port);
    rc = rc ?: buf_append_lit(out, "\r\nContent-Type: application/json\r\n");
    if (rc == 0 && b->api_key) {
        if (strcasecmp(b->auth_header, "Authorization") == 0)
            rc = buf_printf(out, "Authorization: Bearer %s\r\n", b->api_key);
        else
            rc = buf_printf(out, "%s: %s\r\n", b->auth_header, b->api_key);
    }
    return rc;
}

/* The client's headers that go on: not Connection nor those it names
 * (they describe the client's hop only), nor the backend's key header,
 * which is the router's to set. The rest of server.c's filter ran at
 * parse time, when the backend was not known yet. */
static int append_client_headers(struct buf *out, const struct buf *fwd,
                                 const struct conf_backend *b)
{
    struct http_hop_names hop = {.n = 0};

    if (fwd->len == 0)
        return 0;
    if (buf_reserve(out, fwd->len) != 0)
        return -ENOMEM;
    http_hop_names_scan(&hop, fwd->data, fwd->len);
    out->len += http_hop_filter(out->data + out->len, fwd->data, fwd->len, &hop,
                                slice_from(b->auth_header));
    return 0;
}

static int build_request(struct router__client *c, const struct router__pool *pool,
                         struct buf *out)
{
    const struct conf_backend *b = pool->conf;
    struct router__request *req = &c->req;
    struct body_parts body;
    int rc;

    if (body_for(req, pool, &body) != 0) {
        free(body.owned);
        return -1;
    }
    const char *suffix = endpoint_suffix(req->endpoint);
    /* The backend url's own query (Azure OpenAI's api-version), then the
     * client's (Anthropic's beta=true) but for the names the backend's
     * sets; the client's as sent when the url has none (but for empty
     * parameters, dropped, and bytes no request line may hold,
     * percent-encoded: see http_query_merge). */
    struct slice query = router__request_query(req);

    rc = buf_append_lit(out, "POST ");
    rc = rc ?: buf_append(out, b->base_path, strlen(b->base_path));
    rc = rc ?: buf_append(out, suffix, strlen(suffix));
    rc = rc ?: http_query_merge(out, b->query, query);
    rc = rc ?: buf_append_lit(out, " HTTP/1.1\r\n");
    rc = rc ?: buf_append(out, pool->fixed_headers.data, pool->fixed_headers.len);
    rc = rc ?: buf_append_lit(out, "Content-Length: ");
    rc = rc ?: buf_append_u64(out, body.len);
    rc = rc ?: buf_append_lit(out, "\r\n");
    rc = rc ?: buf_append_header(out, SLICE_LIT("x-request-id"), slice_from(req->id_str));
    rc = rc ?: append_client_headers(out, &req->fwd, b);
    /* Anthropic's API refuses a request without its version; a client's
     * own (and its anthropic-beta) went on with its headers. */
    if (rc == 0 && ROUTER_EP_ANTHROPIC(req->endpoint) &&
        router__request_header(req, "anthropic-version", &(size_t){0}) == NULL)
        rc = buf_append_lit(out, "anthropic-version: " ROUTER_ANTHROPIC_VERSION "\r\n");
    rc = rc ?: buf_append(out, "\r\n", 2);
    rc = rc ?: buf_reserve(out, body.len);
    for (int i = 0; rc == 0 && i < body.count; i++)
        rc = buf_append(out, body.p[i], body.n[i]);
    free(body.owned);
    return rc;
}

/* Micro-dollars as "D.DDDDDD" (out: 28 bytes or more), without printf: it
 * runs once or twice per request. */
static void format_usd(char *out, size_t n, int64_t micro)
{
    char tmp[FMT_U64_MAX + 8], *end = tmp + sizeof(tmp), *d;

    if (micro < 0 || n < sizeof(tmp)) {
        snprintf(out, n, "%" PRId64 ".%06" PRId64, micro / 1000000, micro % 1000000);
        return;
    }
    d = fmt_u64(end, (uint64_t)micro);
    while (end - d < 7) /* at least "0.000000" */
        *--d = '0';
    memcpy(out, d, (size_t)(end - d - 6));
    out += end - d - 6;
    *out++ = '.';
    memcpy(out, end - 6, 6);
    out[6] = '\0';
}

/* ---- estimate ---- */

/* Tokens of one piece of text: with the tables, or from its bytes
 * without them (t NULL). */
static int64_t count_text(struct policy_tokens *t, enum conf_tokenizer enc, const char *s,
                          size_t len)
{
    return t ? policy_tokens_count_cached(t, enc, s, len) : policy_tokens_estimate(s, len);
}

/* Text of a completions "prompt" or embeddings "input": a string, an
 * array of token ids, or an array of those. Counted piece by piece. With
 * `longest`, it is raised to the tokens of the longest text (a string, or
 * one array's token ids): each is answered in a context window of its
 * own. */
static int64_t count_texts(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *v,
                           int64_t *longest)
{
    int64_t n = 0, ids = 0;
    const cJSON *item;

    if (cJSON_IsString(v))
        n = count_text(t, enc, v->valuestring, strlen(v->valuestring));
    else if (cJSON_IsArray(v))
        cJSON_ArrayForEach(item, v) {
            if (cJSON_IsNumber(item))
                ids++; /* a token id */
            else
                n += count_texts(t, enc, item, longest);
        }
    if (longest)
        *longest = MAX(*longest, cJSON_IsString(v) ? n : ids);
    return n + ids;
}

/* The texts of member `name` of `obj` (count_texts). */
static int64_t count_member(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *obj,
                           const char *name)
{
    return count_texts(t, enc, cJSON_GetObjectItemCaseSensitive(obj, name), NULL);
}

/* The token tables to count `enc` with, or NULL to estimate from bytes
 * (its table failed to load, at start or at a reload). */
static struct policy_tokens *tokens_for(const struct router__client *c, enum conf_tokenizer enc)
{
    return policy_tokens_has(c->router->tokens, enc) ? c->router->tokens : NULL;
}

/* Prompt tokens of the request for backend `b`: by its tokenizer, and
 * images by its model's rule (the request's "model" names the route).
 * *longest: those of its longest text, for a completions or embeddings
 * array, else -1 (the prompt is one). */
static int64_t count_prompt(struct router__client *c, const struct conf_backend *b,
                            int64_t *longest)
{
    struct router__request *req = &c->req;
    enum conf_tokenizer enc = b->tokenizer;
    struct policy_tokens *t = tokens_for(c, enc);
    int64_t n = -1;

    *longest = -1;
    if (req->endpoint == ROUTER_EP_CHAT && t != NULL)
        n = policy_tokens_chat_for(t, enc, req->json, b->model);
    else if (req->endpoint == ROUTER_EP_COMPLETIONS)
        n = count_texts(t, enc, cJSON_GetObjectItemCaseSensitive(req->json, "prompt"), longest);
    else if (req->endpoint == ROUTER_EP_EMBEDDINGS)
        n = count_texts(t, enc, cJSON_GetObjectItemCaseSensitive(req->json, "input"), longest);
    else if (req->endpoint == ROUTER_EP_RESPONSES && t != NULL)
        n = policy_tokens_responses_for(t, enc, req->json, b->model);
    else if (ROUTER_EP_ANTHROPIC(req->endpoint) && t != NULL)
        n = policy_tokens_messages(t, enc, req->json);
    if (n < 0)
        n = policy_tokens_estimate(req->body.data, req->body.len);
    return n;
}

/* The service tier a request asks for ("service_tier": "flex" or
 * "priority"), the standard one otherwise: what its estimate and hold are
 * priced at until the answer says what it was billed at. */
static enum conf_service_tier asked_tier(const cJSON *json)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(json, "service_tier");

    return cJSON_IsString(v) ? conf_tier_of(v->valuestring, strlen(v->valuestring))
                             : CONF_TIER_STANDARD;
}

/* A web search tool's type: Anthropic's is versioned (web_search_20250305),
 * OpenAI's Responses API has web_search, web_search_preview and dated
 * versions of both; its file search tool's is file_search. */
#define PROXY_ANTHROPIC_SEARCH_TYPE "web_search_"
#define PROXY_OPENAI_SEARCH_TYPE "web_search"
#define PROXY_OPENAI_FILE_SEARCH_TYPE "file_search"
/* A cap past this counts as this: still a hold no budget fits ($10,000 at
 * $10 per 1,000), and a count a double holds exactly. */
#define PROXY_WEB_SEARCHES_MAX 1000000

/* Is `tool` (an item of a request's "tools") of a type that starts with
 * `prefix`? */
static int tool_type_is(const cJSON *tool, const char *prefix)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(tool, "type");

    return cJSON_IsString(type) && strncmp(type->valuestring, prefix, strlen(prefix)) == 0;
}

/* A cap on calls (max_uses, max_tool_calls) as a count of searches: 0
 * when absent, not a whole number or below 1 (the API refuses those). */
static int64_t searches_capped(const cJSON *max)
{
    if (!cJSON_IsNumber(max) || !(max->valuedouble >= 1))
        return 0;
    if (max->valuedouble > PROXY_WEB_SEARCHES_MAX)
        return PROXY_WEB_SEARCHES_MAX;
    return max->valuedouble == (double)(int64_t)max->valuedouble ? (int64_t)max->valuedouble : 0;
}

/* The web and file searches a request may make, by its own caps, which
 * the APIs do not exceed: on /v1/messages the sum of its web search
 * tools' max_uses; on /v1/responses its max_tool_calls (a cap on all its
 * built-in tool calls) for each of the two tools it has, as one cap when
 * it has both. A request without a cap holds for none: how many searches
 * the model makes is not known before, and the charge (the answer's
 * count) is exact anyway. Read once per request, as the estimate is. */
static void searches_held(struct router__request *req)
{
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(req->json, "tools"), *tool;
    int web = 0, file = 0;
    int64_t cap;

    req->web_searches_held = req->file_searches_held = 0;
    req->searches_one_cap = 0;
    if (!cJSON_IsArray(tools))
        return;
    cJSON_ArrayForEach(tool, tools) {
        web |= tool_type_is(tool, PROXY_OPENAI_SEARCH_TYPE);
        file |= tool_type_is(tool, PROXY_OPENAI_FILE_SEARCH_TYPE);
        if (req->endpoint == ROUTER_EP_MESSAGES && tool_type_is(tool, PROXY_ANTHROPIC_SEARCH_TYPE))
            req->web_searches_held +=
                searches_capped(cJSON_GetObjectItemCaseSensitive(tool, "max_uses"));
    }
    if (req->endpoint != ROUTER_EP_RESPONSES)
        return;
    cap = searches_capped(cJSON_GetObjectItemCaseSensitive(req->json, "max_tool_calls"));
    req->web_searches_held = web ? cap : 0;
    req->file_searches_held = file ? cap : 0;
    req->searches_one_cap = web && file;
}

static void estimate(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    const struct conf_backend *first = req->route->candidates[0];
    struct router__tenant *ts = router__tenant_state(r, req->tenant);

    int64_t longest;

    /* The route's first candidate's tokenizer (and model) stands for the route. */
    req->prompt_raw = count_prompt(c, first, &longest);
    req->prompt_est = first->tokenizer == CONF_TOK_ESTIMATE
                          ? policy_calib_apply(&r->calib[first->index], req->prompt_raw)
                          : req->prompt_raw;
    /* The longest text's share of the estimate, calibrated alike. */
    req->prompt_window = longest >= 0 && longest < req->prompt_raw
                             ? (int64_t)((double)req->prompt_est * longest / req->prompt_raw)
                             : req->prompt_est;
    /* Only a cap the prediction takes: with max_tokens -1 or 0 (which
     * caps nothing) it is a guess, as without one, and a guess must
     * neither refuse a request as too large nor escape on_overrun. */
    int64_t cap = policy_outpred_cap(req->json);

    req->completion_limited = cap > 0;
    req->asked_tier = (int8_t)asked_tier(req->json);
    searches_held(req);
    req->completion_choices = policy_outpred_choices(req->json);
    if (req->endpoint == ROUTER_EP_EMBEDDINGS || req->endpoint == ROUTER_EP_COUNT_TOKENS)
        req->completion_pred = 0;
    else
        req->completion_pred = policy_outpred_predict(&ts->outpred[req->route - r->conf->routes],
                                                      req->completion_choices, cap,
                                                      PROXY_COMPLETION_FALLBACK);
}

/* ---- choose ---- */

static struct policy_budget budget_of(double limit_usd, int64_t spent, int64_t reserved)
{
    struct policy_budget b = {0, 0};

    if (limit_usd > 0) {
        b.limit_micro = router__budget_micro(limit_usd);
        b.remaining_micro = b.limit_micro - spent - reserved;
    }
    return b;
}

#define BUDGET_NONE INT64_MAX

/* What a subject with budgets `daily` and `monthly` has left today or
 * this month, whichever is less (may be negative: overspent), minus the
 * reservations of requests in flight when `count_holds`. BUDGET_NONE when
 * it has no budget. */
static int64_t left_of(const struct router__spend *s, double daily, double monthly,
                       int count_holds)
{
    int64_t held = count_holds ? router__spend_held(s) : 0, left = BUDGET_NONE;

    if (daily > 0)
        left = router__budget_micro(daily) - s->day_spent - held;
    if (monthly > 0)
        left = MIN(left, router__budget_micro(monthly) - s->month_spent - held);
    return left;
}

static int64_t tenant_left(struct router__client *c, int count_holds)
{
    const struct conf_tenant *t = c->req.tenant;

    return left_of(&router__tenant_state(c->router, t)->spend, t->daily_usd, t->monthly_usd,
                   count_holds);
}

/* The key's own budget's (BUDGET_NONE when it has none). */
static int64_t key_left(struct router__client *c, int count_holds)
{
    const struct conf_key *k = c->req.key;
    const struct router__spend *ks = router__key_spend(c->router, k);

    return ks ? left_of(ks, k->daily_usd, k->monthly_usd, count_holds) : BUDGET_NONE;
}

/* What the request may still spend: the smaller of its tenant's and its
 * key's remainders. */
static int64_t budget_left(struct router__client *c, int count_holds)
{
    return MIN(tenant_left(c, count_holds), key_left(c, count_holds));
}

/* Whether the key's own budget is the one that binds (less left than its
 * tenant's), for the 429 and the log to say so. */
static int key_binds(struct router__client *c)
{
    return key_left(c, 1) < tenant_left(c, 1);
}

/* Whose budget refused: the tenant's id, or its key's name (never the key). */
static void budget_owner(struct router__client *c, char *out, size_t size)
{
    if (key_binds(c))
        snprintf(out, size, "key \"%s\" of %s (the key's own budget)", c->req.key->name,
                 c->req.tenant->id);
    else
        snprintf(out, size, "%s", c->req.tenant->id);
}

/*
 * 429 budget_exhausted. Whether a retry can help differs, and clients
 * should know: the OpenAI SDKs retry every 429 twice unless told not to
 * (x-should-retry: false), after Retry-After when there is one. If the
 * money is spent, nothing changes until the period turns or the budget
 * is raised. If it is only held by reservations of requests in flight
 * (which settle at their real, usually smaller, cost) or the store kept
 * refusing reservations under contention, a retry soon may pass.
 */
static void reject_budget(struct router__client *c)
{
    const struct router__request *req = &c->req;
    char extra[160], remaining[80] = "", usd[32], owner[2 * CONF_NAME_MAX + 64];
    char detail[sizeof(owner) + 160];
    int status;
    char *body;
    int64_t left = budget_left(c, 1);
    int spent = req->choice.reject_budget && req->choice.cost_micro > budget_left(c, 0);

    budget_owner(c, owner, sizeof(owner));

    /* Without max_tokens the hold is for a guess (the P95 of recent
     * completions), which the client cannot see and can replace. */
    if (req->choice.reject_budget && !req->completion_limited && req->completion_pred > 0)
        snprintf(detail, sizeof(detail),
                 "%s (the completion, without max_tokens, was estimated at %" PRId64
                 " tokens; a request with a smaller max_tokens may fit)",
                 owner, req->completion_pred);
    else
        snprintf(detail, sizeof(detail), "%s", owner);
    body = router__error_json(req->endpoint, error_budget_exhausted, detail, &status);

    if (left != BUDGET_NONE) {
        format_usd(usd, sizeof(usd), MAX(left, 0));
        snprintf(remaining, sizeof(remaining), "x-costrouter-budget-remaining-usd: %s\r\n", usd);
    }
    snprintf(extra, sizeof(extra), "%s%s", remaining,
             spent ? "x-should-retry: false\r\n" : "Retry-After: 1\r\n");
    c->req.reason = "budget-exhausted";
    router__send_response(c, status, "application/json", extra, body ? body : "",
                          body ? strlen(body) : 0);
    free(body);
}

/* The member of `body` that caps each choice at `cap` tokens (the one
 * policy_outpred_cap took), for a message that names what the client set. */
static const char *cap_member(const cJSON *body, int64_t cap)
{
    static const char *const names[] = {"max_completion_tokens", "max_tokens",
                                        "max_output_tokens"};

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, names[i]);

        if (cJSON_IsNumber(v) && (int64_t)v->valuedouble == cap)
            return names[i];
    }
    return "max_tokens";
}

/* A 400 that says by how much the request is too long: what one choice
 * reads in its window (of an array of texts, the longest). */
static void reject_context(struct router__client *c)
{
    const struct router__request *req = &c->req;
    const char *of = req->prompt_window < req->prompt_est ? " (its longest text)" : "";
    int64_t per_choice = req->completion_pred / MAX(req->completion_choices, 1);
    char detail[200];

    if (req->completion_limited)
        snprintf(detail, sizeof(detail),
                 "about %" PRId64 " prompt tokens%s + %" PRId64 " for the completion "
                 "(%s), and the largest window is %" PRId64 " tokens",
                 req->prompt_window, of, per_choice, cap_member(req->json, per_choice),
                 req->choice.context_window);
    else
        snprintf(detail, sizeof(detail),
                 "about %" PRId64 " prompt tokens%s, and the largest window is %" PRId64
                 " tokens",
                 req->prompt_window, of, req->choice.context_window);
    router__send_error(c, error_context_length, detail);
}

/* Every candidate the request may use is below its tenant's quality
 * floor: say which model and what is on offer, so whoever runs the
 * config sees the mismatch. */
static void reject_quality(struct router__client *c)
{
    const struct router__request *req = &c->req;
    char detail[320];

    snprintf(detail, sizeof(detail),
             "model \"%s\": the best backend it may use has quality %d, the floor is %d",
             req->route->model, req->choice.best_quality, req->tenant->min_quality);
    router__send_error(c, error_below_quality_floor, detail);
}

/* A choice the budget decided: refused, or downgraded. */
static int budget_bound(const struct policy_choice *ch)
{
    return ch->reject_budget || ch->reason == POLICY_REASON_DOWNGRADED_BUDGET ||
           ch->reason == POLICY_REASON_DOWNGRADED_SOFT;
}

/* No candidate (or none left after failures). When some are shut by
 * their circuit, say when the soonest may serve again: the OpenAI SDKs
 * retry 5xx twice, after retry-after-ms or Retry-After when given, else
 * after 0.5-1 s and 1-2 s, both inside a 5 s circuit. */
static void reject_none(struct router__client *c, const char *errstr)
{
    uint64_t ms = c->req.choice.retry_after_ms;
    char extra[80];

    if (ms == 0) {
        router__send_error(c, errstr, NULL);
        return;
    }
    snprintf(extra, sizeof(extra), "Retry-After: %llu\r\nretry-after-ms: %llu\r\n",
             (unsigned long long)((ms + 999) / 1000), (unsigned long long)ms);
    router__send_error_with(c, errstr, NULL, extra);
}

/* The request's backend no longer counts it as chosen and not begun:
 * its attempt begins, it chooses again, or it ends. Once per choice. */
void router__proxy_unchoose(struct router__client *c)
{
    if (!c->req.chosen_held)
        return;
    c->req.chosen_held = 0;
    backend_unchosen(c->req.pool->backend);
}

/* The kind of answer `req` asks for, whose TTFT it is predicted by. */
static enum backend_answer answer_asked(const struct router__request *req)
{
    return req->stream ? BACKEND_STREAM : BACKEND_PLAIN;
}

/* The latency whose probe `req` may be (backend_probe_due): its kind's,
 * when its tenant has an SLO. */
static int latency_asked(const struct router__request *req)
{
    return req->tenant->max_ttft_ms > 0 ? (int)answer_asked(req) : BACKEND_LATENCY_NONE;
}

/* What policy/ is asked for `c`'s request, with the spend as this
 * instance has it now. */
static void policy_request_of(struct router__client *c, struct policy_request *out)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    const struct conf_tenant *t = req->tenant;
    struct router__tenant *ts = router__tenant_state(r, t);
    const struct router__spend *ks = router__key_spend(r, req->key);
    struct policy_request preq = {0};

    preq.route = req->route;
    preq.backends = r->backends;
    preq.limits.min_quality = t->min_quality;
    preq.limits.max_ttft_ms = t->max_ttft_ms;
    preq.limits.downgrade = t->on_exhausted == CONF_EXHAUSTED_DOWNGRADE;
    preq.limits.soft_limit_pct = t->soft_limit_pct;
    preq.speaks = req->route->speaks[router__endpoint_api(req->endpoint)];
    if (req->arm) {
        preq.allowed = req->arm_allowed;
        preq.ab_reason = policy_arm_reason(req->arm);
    }
    preq.prompt_tokens = req->prompt_est;
    preq.window_prompt_tokens = req->prompt_window;
    preq.completion_tokens = req->completion_pred;
    preq.completion_choices = req->completion_choices;
    preq.completion_predicted = !req->completion_limited;
    preq.service_tier = req->asked_tier;
    preq.web_searches = req->web_searches_held;
    preq.file_searches = req->file_searches_held;
    preq.searches_one_cap = req->searches_one_cap;
    preq.answer = answer_asked(req);
    /* Held: the open reservations and what streams in flight here ran
     * past theirs (on_overrun: cut), which a new hold must not spend again. */
    preq.day = budget_of(t->daily_usd, ts->spend.day_spent, router__spend_held(&ts->spend));
    preq.month = budget_of(t->monthly_usd, ts->spend.month_spent, router__spend_held(&ts->spend));
    if (ks != NULL) {
        preq.key_day = budget_of(req->key->daily_usd, ks->day_spent, router__spend_held(ks));
        preq.key_month = budget_of(req->key->monthly_usd, ks->month_spent, router__spend_held(ks));
    }
    /* The backends a flight leader failed on are down to this request,
     * not tried by it: its reason is its own choice's, not "fallback". */
    preq.tried = req->tried & ~req->leader_failed;
    preq.passed_over = req->leader_failed;
    preq.now_ms = router__now(r);
    if (counting(req)) {
        /* Free on every candidate: no budget refuses or downgrades it, and
         * no window is too small for it (its size is what the client asks;
         * the estimate is not Claude's count). All cost $0, so the one
         * predicted to answer first is taken, then route order. */
        preq.prompt_tokens = preq.window_prompt_tokens = preq.completion_tokens = 0;
        preq.day = preq.month = (struct policy_budget){0, 0};
        preq.key_day = preq.key_month = (struct policy_budget){0, 0}; /* the key's too */
    }
    *out = preq;
}

/* Ask policy/ for a candidate. Returns 0 with req->choice set, or -1
 * after answering the client (429 budget, 400 too long, 503 none, or
 * last error) or asking the store for fresh spend first (the answer
 * comes back to router__proxy_budget_checked). */
static int choose(struct router__client *c, const char *last_error)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    struct policy_request preq;

    router__proxy_unchoose(c);
    /* Until a candidate is chosen, the request's backend is the last one
     * it was sent to, if any: a choice that a hold refused in the store,
     * or a probe taken meanwhile, sent nothing there, and a refusal now
     * counted under it (metrics, cost log) what no backend answered. */
    req->pool = req->sent_pool;
    if (req->attempts > (unsigned)r->conf->max_retries) {
        router__send_error(c, last_error, NULL);
        return -1;
    }
    if (req->verdicts == NULL) { /* a buffer kept from request to request: no malloc */
        size_t size = MIN(req->route->ncandidates, 64) * sizeof(*req->verdicts);

        if (buf_reserve(&req->verdict_mem, size) < 0) {
            router__send_error(c, error_no_memory, NULL);
            return -1;
        }
        req->verdicts = (struct policy_verdict *)(void *)req->verdict_mem.data;
        memset(req->verdicts, 0, size);
    }
    policy_request_of(c, &preq);
    req->choice = policy_cost_aware.choose(&preq, req->verdicts);
    if (budget_bound(&req->choice) && req->begins == 0 && !req->budget_checked) {
        /* The numbers are the store's answer to an earlier request. Since
         * then, requests in flight may have settled below what they held,
         * other instances too, or the day or month turned: without asking,
         * a tenant could be refused until a reload, or downgraded on every
         * other request (each one's own settled hold still counted). */
        req->budget_checked = 1;
        req->last_error = last_error;
        if (router__spend_check(c) != 0)
            router__send_error(c, error_no_memory, NULL);
        return -1;
    }
    if (req->choice.reject_budget && last_error != NULL && req->attempts > 0) {
        /* A fallback whose candidates left are too dear: the budget
         * covered the one that failed, and a retry may go there again.
         * The failure is the answer, not budget_exhausted, which tells
         * the client's SDK not to retry (insufficient_quota). */
        req->reason = policy_reason_name(req->choice.reason);
        reject_none(c, last_error);
        return -1;
    }
    if (req->choice.reject_budget) {
        reject_budget(c);
        return -1;
    }
    if (req->choice.candidate < 0) {
        req->reason = policy_reason_name(req->choice.reason);
        if (req->choice.reason == POLICY_REASON_CONTEXT_EXCEEDED)
            reject_context(c);
        else if (req->choice.reason == POLICY_REASON_BELOW_QUALITY_FLOOR)
            reject_quality(c);
        else
            reject_none(c, last_error ? last_error : error_no_backend);
        return -1;
    }
    req->candidate = req->choice.candidate;
    req->reason = req->choice.reason_text;
    req->pool = &r->pools[req->route->candidates[req->candidate]->index];
    req->probe_chosen = backend_probe_due(req->pool->backend, preq.now_ms, latency_asked(req));
    /* Load from now on: the hold is made before the attempt begins, and
     * the requests of a burst all choose meanwhile. */
    backend_chosen(req->pool->backend);
    req->chosen_held = 1;
    return 0;
}

static void send_attempt(struct router__client *c);

static const char *header_from(const struct router__request *req, const char *p,
                               const char *name, size_t *len);

/* Append " name=LEN:item" for each item of the comma-separated list
 * v[0..len), blanks around items dropped, empty ones skipped; *items
 * counts those appended. */
static int key_list_items(struct buf *out, const char *name, const char *v, size_t len,
                          size_t *items)
{
    const char *end = v + len, *comma;
    int rc = 0;

    while (v < end && rc == 0) {
        comma = memchr(v, ',', (size_t)(end - v));
        const char *b = v, *e = comma ? comma : end;

        while (b < e && (*b == ' ' || *b == '\t'))
            b++;
        while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        if (e > b) {
            rc = buf_printf(out, " %s=%zu:%.*s", name, (size_t)(e - b), (int)(e - b), b);
            ++*items;
        }
        v = comma ? comma + 1 : end;
    }
    return rc;
}

/* Append " query=LEN:" and the client's query in its normal form
 * (http_query_normal): queries that differ only in how they escape one
 * character ask the backend the same and share an entry, while the
 * backend still gets the query as sent. Written in place, in one pass to
 * count and one to write. */
static int key_query(struct buf *out, struct slice query)
{
    size_t n = http_query_normal(NULL, query);
    int rc = buf_printf(out, " query=%zu:", n);

    rc = rc ?: buf_reserve(out, n + 1);
    if (rc == 0) {
        http_query_normal(out->data + out->len, query);
        out->len += n;
        out->data[out->len] = '\0'; /* the key is read as a string, as buf_printf leaves it */
    }
    return rc;
}

/* The headers of a /v1/messages request that change its answer, for its
 * cache key: anthropic-beta (interleaved thinking, longer outputs, new
 * tools) and anthropic-version (the answer's shape), each as sent or
 * absent (the version: the one the router then sends; an empty one was
 * dropped when parsed, so it is absent too). Every header of
 * the name counts, item by item: betas come as one comma-separated
 * header or as several, and all of them go upstream. Betas that name
 * none (an empty header, only commas and blanks) ask for none: the key
 * of no header. */
static int anthropic_key_headers(const struct router__request *req, struct buf *out)
{
    static const char *const names[] = {"anthropic-beta", "anthropic-version"};
    const char *v;
    size_t len = 0, items;
    int rc = 0;

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]) && rc == 0; i++) {
        v = header_from(req, NULL, names[i], &len);
        items = 0;
        if (v == NULL && i == 1)
            rc = key_list_items(out, names[i], ROUTER_ANTHROPIC_VERSION,
                                strlen(ROUTER_ANTHROPIC_VERSION), &items);
        for (; v != NULL && rc == 0; v = header_from(req, v + len, names[i], &len))
            rc = key_list_items(out, names[i], v, len, &items);
        if (rc == 0 && i == 0 && items == 0)
            rc = buf_printf(out, " %s=-", names[i]);
    }
    return rc;
}

/* Choose, then reserve (the store answers in router__proxy_reserved). A
 * token count goes at once: it costs nothing, so there is nothing to
 * hold, and without a hold there is no store call to make (a store that
 * is down or refuses writes does not refuse it either). Nor is it looked
 * up in the cache: a hit would save nothing. */
static void choose_and_reserve(struct router__client *c, const char *last_error)
{
    struct router__request *req = &c->req;
    const struct conf_backend *b;
    struct buf route_key = {0};
    const char *kind, *api;

    if (choose(c, last_error) != 0)
        return;
    if (counting(req)) {
        send_attempt(c);
        return;
    }
    b = req->route->candidates[req->candidate];
    if (req->cacheable && req->begins == 0) {
        /* Streams and plain answers are cached apart: each replays as sent
         * (so are streams that asked for other stream_options, such as
         * the usage event: the key holds them, see cache/key.c). Unless
         * the cache is shared, so are tenants: the store names entries
         * per tenant, but the single flight goes by this key alone, and
         * joined one tenant's request to another's answer (billed to the
         * first, telling the second that someone sends the same prompt). */
        kind = req->stream ? "#stream" : "";
        /* and so are the endpoints: one body may mean two requests, and an
         * Anthropic answer is no chat answer */
        api = endpoint_suffix(req->endpoint);
        int rc = buf_printf(&route_key, "%s%s%s", req->route->model, api, kind);
        if (rc == 0 && !c->router->conf->cache_shared)
            rc = buf_printf(&route_key, " tenant=%zu:%s", strlen(req->tenant->id), req->tenant->id);
        if (rc == 0 && req->endpoint == ROUTER_EP_MESSAGES)
            rc = anthropic_key_headers(req, &route_key);
        /* and so are queries, which the backend gets (an api-version);
         * none adds nothing, so entries made before queries went on hit */
        struct slice query = router__request_query(req);
        if (rc == 0 && query.len > 0)
            rc = key_query(&route_key, query);
        /* and so is the backend url's own (another api-version may answer
         * otherwise), held beside the model: a fallback to a backend of
         * another query is one to another upstream (send_attempt). The
         * key is a hash: a `key=` in it shows nowhere. */
        req->cache_query = b->query;
        if (rc == 0 && b->query != NULL)
            rc = buf_printf(&route_key, " backend_query=%zu:%s", strlen(b->query), b->query);
        req->cache_model = b->model ? b->model : req->route->model;
        if (rc != 0 || cache_key_make(route_key.data, req->cache_model, req->json, &req->cache_key) != 0)
            req->cacheable = 0;
        buf_free(&route_key);
    }
    if (req->begins >= req->attempts + PROXY_MAX_BEGINS) {
        reject_budget(c);
        return;
    }
    router__spend_begin(c);
}

static void settle(struct router__client *c);
static void fail_midstream(struct router__client *c, const char *errstr, const char *detail);
static void forward(struct router__client *c, const char *p, size_t len);

/* ---- send ---- */

/* Are two backend url queries (NULL: none) the same? */
static int same_query(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static void send_attempt(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    struct buf *out = &r->request_out;
    uint64_t now = router__now(r);
    int rc;

    req->tried |= UINT64_C(1) << req->candidate;
    req->sent_pool = req->pool;
    if (req->attempts++ > 0)
        req->fallbacks++;
    if (req->cacheable && req->cache_model != NULL &&
        (strcmp(req->pool->conf->model ? req->pool->conf->model : req->route->model,
                req->cache_model) != 0 ||
         !same_query(req->pool->conf->query, req->cache_query))) {
        /* Gone to a backend of another upstream model or url query than
         * the key names (a fallback, another choice): its answer is no
         * answer for that key, nor for the requests waiting on it, which
         * go themselves. */
        req->cacheable = 0;
        if (req->flight_leader)
            router__spend_flight_fail(c);
    }
    req->attempt_start_ms = now;
    buf_reset(out);
    if (build_request(c, req->pool, out) != 0) {
        router__spend_release(c);
        router__send_error(c, error_no_memory, NULL);
        return;
    }
    router__proxy_unchoose(c);
    backend_attempt_begin(req->pool->backend, now, answer_asked(req), &req->ticket);
    req->attempt_open = 1;
    rc = router__upstream_send(req->pool, c, out->data, out->len);
    buf_recycle(out, ROUTER_REQUEST_OUT_KEEP);
    if (rc != 0)
        router__proxy_on_error(c, error_upstream_connect);
}

/* The leader's answer, or NULL: go ourselves. Then `why` is the leader's
 * request (router__spend_flight_fail), which tells the candidates it left
 * after a failure: all it tried but the one it is on. The same request
 * failed there a moment ago, so they are passed over as if this request
 * had tried them: a follower went first to the backend that had just
 * failed the leader (a timeout waited out twice, slower than had it not
 * waited at all). Only within one generation: a reload may have
 * reordered the route's candidates. */
static void on_flight_answer(void *arg, const char *value, size_t len, const void *why)
{
    struct router__client *c = arg;
    struct router__request *req = &c->req;
    const struct router__request *leader = why;
    uint64_t failed = 0;

    req->flight_waiting = 0;
    if (value != NULL) {
        router__spend_release(c);
        router__proxy_replay(c, value, len);
        return;
    }
    if (leader != NULL && leader->route == req->route)
        failed = leader->tried & ~(UINT64_C(1) << leader->candidate);
    req->leader_failed |= failed & ~req->tried; /* not called by this request */
    req->tried |= failed;
    if (failed & (UINT64_C(1) << req->candidate)) {
        router__spend_release(c); /* held for the failed backend: choose again */
        choose_and_reserve(c, NULL);
        return;
    }
    send_attempt(c);
}

void router__proxy_reserved(struct router__client *c, int granted)
{
    struct router__request *req = &c->req;
    int role;

    if (!granted) {
        /* Another request or instance spent the budget since our
         * snapshot: choose again with the store's numbers. */
        choose_and_reserve(c, NULL);
        return;
    }
    if (req->probe_chosen &&
        !backend_probe_due(req->pool->backend, router__now(c->router), latency_asked(req))) {
        /* Chosen as a backend's one probe (half-open circuit, stale TTFT
         * or none yet), but a request that chose it too began there while
         * this one's hold was being made: a burst at the moment a backend
         * may come back, or is new, went to it whole. Choose again, with
         * that probe out. */
        req->probe_chosen = 0;
        router__spend_release(c);
        choose_and_reserve(c, NULL);
        return;
    }
    if (req->cacheable && req->lookup == CACHE_LOOKUP_MISS && !req->flight_leader) {
        role = cache_flight_join(c->router->flights, &req->cache_key, &req->waiter,
                                 on_flight_answer, c);
        if (role == CACHE_FLIGHT_FOLLOWER && req->stream) {
            /* A follower gets the leader's answer once it has all of it:
             * for a stream, its first token would come at the leader's
             * last (the tenant's max_ttft_ms broken by the whole length
             * of an answer). A stream goes itself, uncached: the leader's
             * answer will be. */
            cache_flight_leave(c->router->flights, &req->waiter);
        } else if (role == CACHE_FLIGHT_FOLLOWER) {
            router__proxy_unchoose(c); /* it waits for the leader's answer */
            req->flight_waiting = 1;
            return;
        }
        req->flight_leader = role == CACHE_FLIGHT_LEADER;
    }
    send_attempt(c);
}

void router__proxy_budget_checked(struct router__client *c)
{
    if (c->req.response_started)
        return; /* overrun_cut's check: the stream's next event decides */
    choose_and_reserve(c, c->req.last_error);
}

/* The tenant's and the key's rate limiters, for policy_ratelimit_*: the
 * current generation's when it still has both (the key found by its hash,
 * in the same tenant), else the request's own. A request a reload left on
 * the old generation (a stream in flight, a connection accepted before)
 * takes from and settles into the buckets the new requests use, which a
 * reload copied: a long stream's real count went to buckets no request
 * read again, and the old and the new admitted from one minute twice. */
static void limiters_of(struct router__client *c, struct policy_ratelimit *rl[2])
{
    struct router *r = c->router, *now = r->shared->current;
    const struct conf_tenant *t = c->req.tenant;
    const struct conf_key *k = c->req.key;
    struct router__tenant *ts;

    if (now != NULL && now != r) {
        const struct conf_tenant *nt = conf_find_tenant(now->conf, t->id);
        const struct conf_key *nk = conf_find_key(now->conf, k->hash);

        if (nt != NULL && nk != NULL && nk->tenant == nt) {
            r = now;
            t = nt;
            k = nk;
        }
    }
    ts = router__tenant_state(r, t);
    rl[0] = &ts->rl;
    rl[1] = &ts->key_rl[k->index];
}

int router__rate_limited(const struct router__client *c)
{
    const struct conf_tenant *t = c->req.tenant;
    const struct conf_key *k = c->req.key;

    return t != NULL && (t->rpm > 0 || t->tpm > 0 || (k != NULL && (k->rpm > 0 || k->tpm > 0)));
}

/* A wait as OpenAI's x-ratelimit-reset-* write it: "20ms", "6s", "1m30s"
 * (seconds rounded up). */
static int format_reset(char *out, size_t size, uint64_t ms)
{
    unsigned long long s = (ms + 999) / 1000;

    if (ms < 1000)
        return snprintf(out, size, "%llums", (unsigned long long)ms);
    if (s < 60)
        return snprintf(out, size, "%llus", s);
    return snprintf(out, size, "%llum%llus", s / 60, s % 60);
}

/* One kind's three lines, for the limiter of `rl` with the least left. */
static size_t kind_headers(struct policy_ratelimit *const *rl, int tokens, uint64_t now,
                           char *out, size_t size)
{
    const char *kind = tokens ? "tokens" : "requests";
    int64_t limit = 0, left = INT64_MAX, per, avail;
    uint64_t full = 0;
    char reset[32];
    int n;

    for (size_t i = 0; i < 2; i++) {
        struct policy_bucket *b = tokens ? &rl[i]->tokens : &rl[i]->requests;

        per = tokens ? rl[i]->tpm : rl[i]->rpm;
        if (per <= 0)
            continue;
        avail = policy_bucket_available(b, per, now);
        if (avail < left || (avail == left && per < limit)) {
            left = avail;
            limit = per;
            full = policy_bucket_full_ms(b, per);
        }
    }
    if (limit == 0)
        return 0;
    format_reset(reset, sizeof(reset), full);
    n = snprintf(out, size,
                 "x-ratelimit-limit-%s: %" PRId64 "\r\nx-ratelimit-remaining-%s: %" PRId64
                 "\r\nx-ratelimit-reset-%s: %s\r\n",
                 kind, limit, kind, left, kind, reset);
    return n > 0 && (size_t)n < size ? (size_t)n : 0;
}

size_t router__rate_headers(struct router__client *c, char *out)
{
    struct policy_ratelimit *rl[2];
    uint64_t now = router__now(c->router);
    size_t len;

    out[0] = '\0';
    if (!router__rate_limited(c))
        return 0;
    limiters_of(c, rl);
    len = kind_headers(rl, 0, now, out, ROUTER_RATE_HEADERS_MAX);
    return len + kind_headers(rl, 1, now, out + len, ROUTER_RATE_HEADERS_MAX - len);
}

/* Which limit of `rl` refused `tokens` (policy_ratelimit_admit refilled
 * them), for the 429's message: the client learns what to slow down or
 * cut, and under whose limit. */
static void refused_by(struct router__client *c, struct policy_ratelimit *const *rl,
                       int64_t tokens, int too_large, char *out, size_t size)
{
    const struct conf_key *k = c->req.key;
    uint64_t now = router__now(c->router);
    const char *kind = NULL;
    int64_t limit = 0;
    int at = -1; /* 0: the tenant's, 1: the key's */

    for (int i = 0; i < 2 && at < 0; i++) {
        struct policy_ratelimit *r = rl[i];
        int64_t room = too_large ? r->tpm : policy_bucket_available(&r->tokens, r->tpm, now);

        if (r->tpm > 0 && tokens > room)
            kind = "tokens", limit = r->tpm, at = i;
        if (!too_large && r->rpm > 0 && policy_bucket_available(&r->requests, r->rpm, now) < 1)
            kind = "requests", limit = r->rpm, at = i;
    }
    out[0] = '\0';
    if (at == 0)
        snprintf(out, size, "%s per minute of tenant %s (%" PRId64 ")", kind, c->req.tenant->id,
                 limit);
    else if (at == 1 && k->name != NULL)
        snprintf(out, size, "%s per minute of key \"%s\" of %s (%" PRId64 ")", kind, k->name,
                 c->req.tenant->id, limit);
    else if (at == 1)
        snprintf(out, size, "%s per minute of this key (%" PRId64 ")", kind, limit);
}

/* Requests and tokens per minute, per tenant and per key: 429 with
 * Retry-After when over. Returns 0 when admitted. */
static int rate_limit(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct policy_ratelimit *rl[2];
    int64_t pred = MAX(req->completion_pred, 0);
    uint64_t retry_ms = 0;
    enum policy_rate_result res;
    char extra[64], which[CONF_NAME_MAX * 2 + 64];
    char detail[sizeof(which) + 160];
    int status;
    char *body;

    limiters_of(c, rl);
    /* A count takes a request from rpm and no token from tpm: it
     * generates none and is billed none (Anthropic limits it by requests
     * per minute alone). */
    req->rate_tokens = counting(req) ? 0
                       : policy_ratelimit_fit(rl, 2,
                                              req->prompt_est + (req->completion_limited ? pred : 0),
                                              req->completion_limited ? 0 : pred);
    res = policy_ratelimit_admit(rl, 2, router__now(c->router), req->rate_tokens, &retry_ms);
    if (res == POLICY_RATE_OK) {
        req->rate_held = 1;
        return 0;
    }
    refused_by(c, rl, req->rate_tokens, res == POLICY_RATE_TOO_LARGE, which, sizeof(which));
    if (res == POLICY_RATE_TOO_LARGE)
        snprintf(detail, sizeof(detail),
                 "request larger than the limit of %s: %" PRId64 " tokens with its prompt and "
                 "max_tokens; a smaller max_tokens may fit",
                 which, req->rate_tokens);
    else
        snprintf(detail, sizeof(detail), "%s", which);
    body = router__error_json(req->endpoint, error_rate_limited, detail[0] ? detail : NULL,
                              &status);
    /* One larger than a whole minute never passes as it is: a retry
     * cannot help, and the SDKs retry every 429 unless told not to. */
    if (res == POLICY_RATE_TOO_LARGE)
        snprintf(extra, sizeof(extra), "x-should-retry: false\r\n");
    else
        snprintf(extra, sizeof(extra), "Retry-After: %llu\r\n",
                 (unsigned long long)((retry_ms + 999) / 1000));
    req->reason = "rate-limited";
    router__send_response(c, status, "application/json", extra, body ? body : "",
                          body ? strlen(body) : 0);
    free(body);
    return -1;
}

/* Correct the tokens taken at admission by what the request used: its
 * real count, or none for one refused after it (context, budget, no
 * backend) or answered from the cache. Once per request. */
static void rate_settle(struct router__client *c, int64_t actual)
{
    struct policy_ratelimit *rl[2];

    if (!c->req.rate_held)
        return;
    c->req.rate_held = 0;
    limiters_of(c, rl);
    policy_ratelimit_settle(rl, 2, router__now(c->router), c->req.rate_tokens, actual);
}

void router__proxy_rate_release(struct router__client *c)
{
    rate_settle(c, 0);
}

/* The value of the first header `name` in the forwarded headers at or
 * after `p` (a line start; NULL: the first line), as router__request_header. */
static const char *header_from(const struct router__request *req, const char *p,
                               const char *name, size_t *len)
{
    size_t n = strlen(name);
    const char *end = req->fwd.data ? req->fwd.data + req->fwd.len : NULL;

    if (p == NULL)
        p = req->fwd.data;
    while (p && p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (eol == NULL)
            break;
        if ((size_t)(eol - p) > n + 1 && strncasecmp(p, name, n) == 0 && p[n] == ':') {
            const char *v = p + n + 1;
            while (v < eol && *v == ' ')
                v++;
            *len = (size_t)(eol - v);
            return v;
        }
        p = eol + 2;
    }
    return NULL;
}

const char *router__request_header(const struct router__request *req, const char *name,
                                   size_t *len)
{
    return header_from(req, NULL, name, len);
}

/* The A/B arm of this request, sticky per end user (the user header of
 * the experiment that applies, else the tenant). Not the header of the
 * route's first experiment: that one may be for other tenants, and
 * keying by a header their clients do not send put all users in one arm. */
static void assign_arm(struct router__client *c)
{
    struct router__request *req = &c->req;
    const struct router *r = c->router;
    const struct policy_experiment *e;
    const char *user;
    size_t len = 0;

    e = policy_experiment_find(r->experiments, r->conf->nexperiments, req->route, req->tenant->id);
    if (e == NULL)
        return;
    user = router__request_header(req, r->conf->experiments[e - r->experiments].user_header, &len);
    req->arm = policy_experiment_arm(e, req->route, req->tenant->id, user, len, &req->arm_allowed);
    req->experiment = req->arm ? e->name : NULL;
}

/* An arm none of whose backends speaks the request's API is, to its
 * users of that API, what a route with none such is (handler.c): no model,
 * 404, before any limit is taken. A 503 said a retry could help, and the
 * SDKs retried what never could pass while the user stays in the arm.
 * Returns 1 after answering. */
static int arm_speaks_none(struct router__client *c)
{
    struct router__request *req = &c->req;
    enum conf_api api = router__endpoint_api(req->endpoint);
    char detail[CONF_NAME_MAX * 3 + 64];

    if (req->arm == NULL || (req->arm_allowed & req->route->speaks[api]))
        return 0;
    snprintf(detail, sizeof(detail), "%s (its A/B arm %s/%s has no backend for this API)",
             req->route->model, req->experiment, req->arm->name);
    router__send_error(c, error_unknown_model, detail);
    return 1;
}

/* May a /v1/responses request be answered from the cache? The API stores
 * each response by default under an id a client may chain
 * (previous_response_id): a replay would hand two clients one id, one of
 * them for a response never made for it. With "store": false the id
 * names nothing; and a request that chains none (no previous_response_id,
 * no conversation) depends on nothing kept upstream. */
static int responses_cacheable(const cJSON *json)
{
    static const char *const chained[] = {"previous_response_id", "conversation"};

    if (!cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(json, "store")))
        return 0;
    for (size_t i = 0; i < sizeof(chained) / sizeof(chained[0]); i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(json, chained[i]);

        if (v != NULL && !cJSON_IsNull(v))
            return 0;
    }
    return 1;
}

void router__proxy_start(struct router__client *c)
{
    struct router__request *req = &c->req;
    const struct conf *conf = c->router->conf;

    estimate(c);
    /* The arm first: pure and sticky, it takes nothing, and a request a
     * limit refuses is of its arm too (in the cost log, `report --by arm`). */
    assign_arm(c);
    if (arm_speaks_none(c))
        return;
    if (rate_limit(c) != 0)
        return;
    req->cacheable = conf->cache_enabled && req->endpoint != ROUTER_EP_EMBEDDINGS &&
                     (req->endpoint != ROUTER_EP_RESPONSES || responses_cacheable(req->json)) &&
                     cache_cacheable(req->json, conf->cache_tools);
    choose_and_reserve(c, NULL);
}

/* ---- replay from the cache ---- */

void router__proxy_replay(struct router__client *c, const char *value, size_t len)
{
    struct router__request *req = &c->req;
    const char *nl = memchr(value, '\n', len);
    char extra[256], saved[32];

    if (nl == NULL) {
        router__send_error(c, error_internal, "bad cache entry");
        return;
    }
    req->saved_micro = strtoll(value, NULL, 10);
    req->cache_hit = 1;
    req->settled = 1;
    req->cost_micro = 0;
    req->cost_usd = 0;
    req->reason = "cache-hit";
    len -= (size_t)(nl + 1 - value);
    value = nl + 1;
    format_usd(saved, sizeof(saved), req->saved_micro);
    snprintf(extra, sizeof(extra),
             "x-costrouter-backend: cache\r\nx-costrouter-reason: cache-hit\r\n"
             "x-costrouter-cost-usd: 0.000000\r\nx-costrouter-saved-usd: %s\r\n%s",
             saved, req->stream ? "Cache-Control: no-cache\r\n" : "");
    if (!req->stream) {
        router__send_response(c, 200, "application/json", extra, value, len);
        return;
    }
    /* A cached stream is whole: it goes out with its length, like a body
     * (which HTTP/1.0 clients can read too), and ends with its cost as
     * every stream does (the comment its first client got was the cost
     * of that one, not kept). */
    static const char cost[] = ": x-costrouter-cost-usd=0.000000\n\n";
    struct buf out = {0};

    if (buf_reserve(&out, len + sizeof(cost)) != 0 || buf_append(&out, value, len) != 0 ||
        buf_append(&out, cost, sizeof(cost) - 1) != 0) {
        buf_free(&out);
        router__send_error(c, error_no_memory, NULL);
        return;
    }
    router__send_response(c, 200, "text/event-stream", extra, out.data, out.len);
    buf_free(&out);
}

/* ---- the response ---- */

/* Did the backend fail with `status`? A 5xx, or a 408 (upstream.c sends
 * one that closes a reused connection again on a fresh one; one on a
 * fresh connection refuses a request the router sent whole at once: the
 * backend did not read it, RFC 9110 15.5.9, so another may serve it). */
static int status_failure(int status)
{
    return status >= 500 || status == 408;
}

/* Is `status` worth another candidate? 5xx, 408 and 429 say "this
 * backend, not this request"; other 4xx would fail anywhere. */
static int status_retryable(int status)
{
    return status_failure(status) || status == 429;
}

/* A 401 or 403 from a backend refuses the router's key for it, not the
 * tenant's, which the router checked itself. */
static int refuses_router_key(int status)
{
    return status == 401 || status == 403;
}

static int more_candidates(const struct router__client *c)
{
    const struct router__request *req = &c->req;
    uint64_t all = req->route->ncandidates >= 64 ? UINT64_MAX
                                                 : (UINT64_C(1) << req->route->ncandidates) - 1;

    return (req->tried & all) != all && req->attempts <= (unsigned)c->router->conf->max_retries;
}

/* Would another candidate take the request now, were this attempt given
 * up? The choice the next attempt would make (this attempt's hold given
 * back), made before a backend's 5xx or 429 is dropped for it: when none
 * would (the others tried, shut by their circuit, too small, too dear,
 * of another API), the client gets the backend's own answer, as from a
 * route's only backend, and not the router's 502 with the answer lost
 * (a 429's Retry-After among it). */
static int fallback_left(struct router__client *c)
{
    const struct router__request *req = &c->req;
    struct policy_verdict scratch[64]; /* req->verdicts stay the cost log's */
    struct policy_request preq;

    if (!more_candidates(c))
        return 0;
    policy_request_of(c, &preq);
    if (req->has_res) {
        preq.day.remaining_micro += preq.day.limit_micro > 0 ? req->res.amount : 0;
        preq.month.remaining_micro += preq.month.limit_micro > 0 ? req->res.amount : 0;
    }
    if (req->has_key_res) {
        preq.key_day.remaining_micro += preq.key_day.limit_micro > 0 ? req->key_res.amount : 0;
        preq.key_month.remaining_micro +=
            preq.key_month.limit_micro > 0 ? req->key_res.amount : 0;
    }
    return policy_cost_aware.choose(&preq, scratch).candidate >= 0;
}

/* End the current attempt's accounting; `used` NULL for a failure. */
static struct backend_charge finish_attempt(struct router__client *c, const struct backend_tokens *used)
{
    struct router__request *req = &c->req;
    struct backend_charge none = {0};

    if (!req->attempt_open)
        return none;
    req->attempt_open = 0;
    return backend_attempt_finish(req->pool->backend, router__now(c->router), &req->ticket, used);
}

/* The attempt failed before the client saw anything: free its hold and
 * choose again, the failed backend now marked tried. */
static void retry_elsewhere(struct router__client *c, const char *errstr)
{
    finish_attempt(c, NULL);
    router__spend_release(c);
    choose_and_reserve(c, errstr);
}

/* The backend refused the router's key. Its answer never reaches the
 * client: the body may quote the key it was sent (a self-hosted server
 * echoing its request), and a 401 would have the client's SDK tell its
 * user to change a key that is fine. As for a 5xx, the backend failed:
 * its circuit counts it and another candidate may serve; with none left
 * the client gets the router's 502 upstream_auth_failed. The operator
 * learns of it from the log, which names the backend, not the key. */
static void key_refused(struct router__client *c, int status, uint64_t now)
{
    struct router__request *req = &c->req;
    char note[LOG_EVERY_NOTE_MAX];

    if (log_every_due(&req->pool->auth_log, now, note))
        log_warn("request %s: backend %s answered %d to the router's key: check its api_key%s",
                 req->id_str, req->pool->conf->name, status, note);
    backend_attempt_failure(req->pool->backend, now, &req->ticket);
    router__upstream_abort(req->up);
    req->up = NULL;
    retry_elsewhere(c, error_upstream_auth);
}

/* Keys shorter than this are not blanked out of answers: masking every
 * "ab" would mangle the JSON, and such a key guards nothing. */
#define PROXY_SCRUB_KEY_MIN 8

/* A backend's answer may quote the key the router sent it (a self-hosted
 * server echoing the request it refused, a debugging proxy copying a
 * header): blank each copy out of `b`, the answer's head or the held body
 * of an error, before it goes to the client. So are the values of the
 * backend url's query, which may be a key too (`?key=`, as some hosts
 * take it), but for `api-version`'s: a date, no secret, and what an error
 * about it names. A few hundred bytes of head, and error bodies, which
 * are small and read once; a 2xx body is not scanned. */
static void scrub_key(struct router__request *req, struct buf *b, const char *what)
{
    const struct conf_backend *cb = req->pool->conf;
    size_t n = cb->api_key ? strlen(cb->api_key) : 0, found = 0;
    struct slice rest = slice_from(cb->query);
    struct http_query_param p;

    if (n >= PROXY_SCRUB_KEY_MIN)
        found += buf_mask(b, cb->api_key, n, '*');
    while (http_query_next(&rest, &p))
        if (p.value.len >= PROXY_SCRUB_KEY_MIN &&
            !http_query_name_eq(p.name, SLICE_LIT("api-version")))
            found += buf_mask(b, p.value.p, p.value.len, '*');
    if (found > 0)
        log_info("request %s: backend %s quoted the router's key (or its url's query) in its %d "
                 "answer's %s; blanked out",
                 req->id_str, cb->name, req->status, what);
}

/* Send bytes to the client: into the batch while one is being collected
 * (upstream.c parses a read), else at once. */
static void send_bufs(struct router__client *c, const uv_buf_t *bufs, unsigned nbufs)
{
    if (!c->req.batching) {
        router__client_sendv(c, bufs, nbufs);
        return;
    }
    for (unsigned i = 0; i < nbufs; i++)
        if (buf_append(&c->req.batch, bufs[i].base, bufs[i].len) != 0) {
            router__client_close(c);
            return;
        }
}

/* Send bytes as they are (not as a chunk). */
static void send_raw(struct router__client *c, const char *p, size_t len)
{
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)len);

    send_bufs(c, &b, 1);
}

/* Write the held head with the length and, once known, the cost, and
 * `body` (may be NULL) in the same write. */
static void send_held_head(struct router__client *c, int64_t length, int with_cost,
                           const struct buf *body)
{
    struct router__request *req = &c->req;
    const char *conn;
    char usd[32];
    int rc = 0;

    if (!req->head_held)
        return;
    req->head_held = 0;
    if (with_cost) {
        format_usd(usd, sizeof(usd), req->cost_micro);
        rc = buf_append_header(&req->head, SLICE_LIT("x-costrouter-cost-usd"), slice_from(usd));
    }
    if (http_status_bodyless(req->status)) {
        /* no framing: the head is the whole response */
    } else if (rc == 0 && length >= 0) {
        rc = buf_append_lit(&req->head, "Content-Length: ");
        rc = rc ?: buf_append_u64(&req->head, (uint64_t)length);
        rc = rc ?: buf_append_lit(&req->head, "\r\n");
    } else if (router__client_http10(c)) {
        /* HTTP/1.0 has no chunked coding: the body ends with the connection. */
        req->keep_alive = 0;
    } else if (rc == 0) {
        rc = buf_append_lit(&req->head, "Transfer-Encoding: chunked\r\n");
        /* Announced, as RFC 9110 asks, where it comes only at the end. */
        if (!with_cost)
            rc = rc ?: buf_append_lit(&req->head, "Trailer: x-costrouter-cost-usd\r\n");
        req->chunked = 1;
    }
    conn = router__client_connection_header(c); /* after keep_alive is final */
    rc = rc ?: buf_append(&req->head, conn, strlen(conn));
    rc = rc ?: buf_append(&req->head, "\r\n", 2);
    if (rc != 0) {
        router__client_close(c);
        return;
    }
    uv_buf_t bufs[2] = {uv_buf_init(req->head.data, (unsigned)req->head.len),
                        uv_buf_init(body ? body->data : NULL, body ? (unsigned)body->len : 0)};
    send_bufs(c, bufs, body && body->len ? 2 : 1);
}

/* The answer whose head came ended whole: a success for its backend,
 * with the TTFT its head had; a refusal (4xx) is no sample, as a 429 is
 * not: it comes as fast as the backend validates, and would pull a slow
 * backend's average down to a few ms; nor is a stream's head, as vLLM's
 * server sends it at once however long its queue: its first token is
 * (ttft_due). Nor is a token count's answer, which comes once the
 * backend has counted, however long its messages take: a count that
 * probed a backend never measured had it predicted at a few ms. */
static void note_success(struct router__client *c)
{
    struct router__request *req = &c->req;

    if (!req->success_due)
        return;
    req->success_due = 0;
    if (req->status >= 400 || req->is_sse || counting(req))
        backend_attempt_answered(req->pool->backend);
    else
        backend_attempt_success(req->pool->backend, router__now(c->router), req->head_ttft_ms);
}

int router__proxy_on_head(struct router__client *c, int status, const struct buf *headers,
                          int64_t content_length, int is_sse, int64_t retry_after_ms)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    const struct conf_backend *b = req->pool->conf;
    uint64_t now = router__now(r);
    int rc;

    if (status == 429) {
        const char *labels[] = {b->name};

        req->answered_429 |= UINT64_C(1) << req->candidate;
        backend_rate_limited(req->pool->backend, now, retry_after_ms);
        metrics_add(r->metrics, METRICS_BACKEND_RATE_LIMITED_TOTAL, labels, 1);
    }
    if (refuses_router_key(status)) {
        key_refused(c, status, now);
        return 1;
    }
    if (status_retryable(status) && fallback_left(c)) {
        char note[LOG_EVERY_NOTE_MAX];

        if (log_every_due(&req->pool->retry_log, now, note))
            log_info("request %s: backend %s answered %d, trying the next candidate%s",
                     req->id_str, b->name, status, note);
        if (status_failure(status))
            backend_attempt_failure(req->pool->backend, now, &req->ticket);
        router__upstream_abort(req->up);
        req->up = NULL;
        retry_elsewhere(c, error_upstream_io);
        return 1;
    }
    req->ttft_ms = now - req->start_ms;
    req->upstream_status = status;
    /* As when another candidate follows: a 5xx or 408 is a failure (else a
     * route's last or only backend answering 500s never had its circuit
     * opened), a 429 neither a failure nor a latency sample (a fast
     * refusal says nothing of how fast it serves; nor does a 4xx, a
     * success without one: note_success). */
    if (status_failure(status)) {
        backend_attempt_failure(req->pool->backend, now, &req->ticket);
    } else if (status != 429) {
        /* An answer that its backend breaks before its end is a failure
         * (router__proxy_on_error): its head alone is no success, or a
         * backend that cuts every answer would clear its failures each
         * time and never have its circuit opened. */
        req->head_ttft_ms = now - req->attempt_start_ms;
        req->success_due = 1;
        req->ttft_due = is_sse && status < 400;
    }
    req->status = status;
    /* An error answer is held whole even when it says it is a stream, so
     * that scrub_key sees all of its body before the client does. */
    req->is_sse = is_sse && status < 400;
    req->response_started = 1;
    buf_reset(&req->head);
    rc = buf_append_lit(&req->head, "HTTP/1.1 ");
    rc = rc ?: buf_append_u64(&req->head, (uint64_t)status);
    rc = rc ?: buf_append_lit(&req->head, " ");
    rc = rc ?: buf_append(&req->head, http_status_text(status), strlen(http_status_text(status)));
    rc = rc ?: buf_append_lit(&req->head, "\r\n");
    rc = rc ?: buf_append(&req->head, headers->data, headers->len);
    scrub_key(req, &req->head, "head");
    rc = rc ?: buf_append_header(&req->head, SLICE_LIT("x-request-id"), slice_from(req->id_str));
    /* Anthropic's SDKs read request-id: the backend's own (Anthropic's)
     * went on with its headers; one that sends none gets the router's,
     * as the router's own answers do (router__send_response). */
    if (rc == 0 && ROUTER_EP_ANTHROPIC(req->endpoint) &&
        !(req->up && req->up->request_id_seen))
        rc = buf_append_header(&req->head, SLICE_LIT("request-id"), slice_from(req->id_str));
    rc = rc ?: buf_append_header(&req->head, SLICE_LIT("x-costrouter-backend"), slice_from(b->name));
    rc = rc ?: buf_append_header(&req->head, SLICE_LIT("x-costrouter-reason"), slice_from(req->reason));
    if (rc == 0) {
        char cors[ROUTER_CORS_HEADERS_MAX], rate[ROUTER_RATE_HEADERS_MAX];

        rc = buf_append(&req->head, cors, router__cors_headers(c, cors));
        rc = rc ?: buf_append(&req->head, rate, router__rate_headers(c, rate));
    }
    if (rc != 0) {
        router__client_close(c);
        return 1;
    }
    req->head_held = 1;
    /* A stream's head waits for its first body byte (router__proxy_on_body):
     * vLLM's and TGI's servers send it at once, before the first token,
     * and a stream stuck before that token has shown the client nothing,
     * so another candidate may still serve it. The cost follows at the
     * end. The head and the events of that read: one write. */
    req->batching = req->is_sse;
    return 0;
}

/* Events parsed from one upstream read go out in one write: upstream.c
 * starts collecting before it parses a read (router__proxy_batch) and
 * sends them after (router__proxy_flush). */
void router__proxy_batch(struct router__client *c)
{
    c->req.batching = c->req.is_sse;
}

void router__proxy_flush(struct router__client *c)
{
    struct router__request *req = &c->req;

    req->batching = 0;
    if (req->batch.len == 0 || c->closing)
        return;
    router__client_send(c, req->batch.data, req->batch.len);
    buf_reset(&req->batch);
}

/* Send body bytes as they are, or as one chunk. */
static void forward(struct router__client *c, const char *p, size_t len)
{
    char size[24];

    if (len == 0)
        return;
    if (!c->req.chunked) {
        send_raw(c, p, len);
        return;
    }
    uv_buf_t bufs[3] = {
        uv_buf_init(size, (unsigned)router__chunk_line(size, len)),
        uv_buf_init((char *)p, (unsigned)len),
        uv_buf_init("\r\n", 2),
    };
    send_bufs(c, bufs, 3);
}

/* Keep the counts `u` has, the last seen of each (a stream's web
 * searches too: message_delta's count is the answer's). Anthropic's
 * input_tokens counts neither the tokens read from the cache nor those
 * written to it: its prompt, as the router counts prompts (cached ones
 * included), is the sum of the three, of which the read ones are cached. */
static void note_usage(struct router__request *req, const struct router__usage *u)
{
    if (u->completion_tokens >= 0)
        req->completion_tokens = u->completion_tokens;
    if (u->cached_tokens >= 0)
        req->cached_tokens = u->cached_tokens;
    if (u->web_searches >= 0)
        req->web_searches = u->web_searches;
    if (u->file_searches >= 0)
        req->file_searches = u->file_searches;
    if (u->cost_usd >= 0)
        req->reported_usd = u->cost_usd;
    if (req->endpoint != ROUTER_EP_MESSAGES) {
        if (u->prompt_tokens >= 0)
            req->prompt_tokens = u->prompt_tokens;
        return;
    }
    if (u->prompt_tokens >= 0)
        req->input_tokens = u->prompt_tokens;
    if (u->cache_write_tokens >= 0)
        req->cache_write_tokens = u->cache_write_tokens;
    if (u->cache_write_1h_tokens >= 0)
        req->cache_write_1h_tokens = u->cache_write_1h_tokens;
    if (req->input_tokens >= 0)
        req->prompt_tokens = req->input_tokens + MAX(req->cache_write_tokens, 0) +
                             MAX(req->cached_tokens, 0);
}

/* Keep the answer for the cache, up to cache.max_entry_bytes (the store
 * refuses more, and then so does the single flight). */
static void keep_for_cache(struct router__client *c, const char *p, size_t len)
{
    struct router__request *req = &c->req;

    if (!req->flight_leader)
        return;
    if (req->cached.len + len > c->router->conf->cache_max_entry_bytes ||
        buf_append(&req->cached, p, len) != 0) {
        /* Too big to cache: the flight finishes without a value. */
        buf_free(&req->cached);
        req->cacheable = 0;
    }
}

static void end_with_cost(struct router__client *c);

/* The tier a request is billed at: the answer's when it said one, else
 * the one asked for (an answer too big to hold, a stream without it). */
static int billed_tier(const struct router__request *req)
{
    return req->answered_tier >= 0 ? req->answered_tier : req->asked_tier;
}

/* on_overrun: cut. A stream with no max_tokens whose running cost, with
 * the event about to go, would pass its reservation and the rest of the
 * budget is ended instead with an SSE error event, then the cost as at
 * any end; what was streamed is charged. Returns 1 when cut. */
static int overrun_cut(struct router__client *c)
{
    struct router__request *req = &c->req;
    const struct conf_backend *b = req->pool->conf;
    struct backend_tokens so_far = {.prompt = req->prompt_est,
                                    .completion = (int64_t)req->events + 1,
                                    .tier = billed_tier(req)};
    int64_t running, left;
    int status;
    char *err, owner[2 * CONF_NAME_MAX + 64], detail[sizeof(owner) + 16];
    struct buf ev = {0};

    if (req->tenant->on_overrun != CONF_OVERRUN_CUT || req->completion_limited ||
        b->kind != CONF_BACKEND_API)
        return 0;
    left = budget_left(c, 1);
    if (left == BUDGET_NONE)
        return 0;
    /* Its own hold, and what it already ran past it, are its to spend;
     * what the other streams here ran past theirs is not: each spent the
     * same rest of the budget, and three streams at once overspent it by
     * two rests. */
    left = MAX(left + req->over_micro, 0);
    running = backend_usd_to_micro(backend_api_price_usd(b, &so_far));
    if (running > req->res.amount && !req->overrun_checked && req->store_op == NULL) {
        /* Past its own hold the stream spends what the tenant has left,
         * by numbers that may count holds settled since. Read them afresh
         * once, now, so that the cut below (while the answer is out, by
         * the old numbers) is judged by the store's by the time it nears. */
        req->overrun_checked = 1;
        router__spend_check(c);
    }
    if (running <= req->res.amount + left) {
        router__spend_overrun(c, MAX(running - req->res.amount, 0));
        return 0;
    }
    budget_owner(c, owner, sizeof(owner));
    log_info("request %s: %s over budget mid-stream, cutting it", req->id_str, owner);
    /* Named as the 429 names it: the tenant, or the key by its name. */
    snprintf(detail, sizeof(detail), "%s, mid-stream", owner);
    err = router__error_json(req->endpoint, error_budget_exhausted, detail, &status);
    if (err && buf_printf(&ev, "event: error\ndata: %s\n\n", err) == 0)
        forward(c, ev.data, ev.len);
    router__proxy_flush(c);
    buf_free(&ev);
    free(err);
    if (req->up) {
        router__upstream_abort(req->up);
        req->up = NULL;
    }
    req->broken = 1;
    req->keep_alive = 0;
    req->reason = "budget-cut";
    settle(c);
    router__spend_cache_store(c);
    end_with_cost(c);
    router__client_response_done(c);
    return 1;
}

/* router__usage_parse with its few cJSON nodes in the request's arena. */
static int usage_of(struct router__request *req, const char *json, size_t len,
                    struct router__usage *u, int *choices_empty)
{
    int found;

    router__json_enter(req);
    found = router__usage_parse(json, len, u, choices_empty);
    router__json_leave();
    return found;
}

/* One complete SSE event: read usage from it, drop the usage-only event
 * we asked for on the client's behalf, forward the rest. A /v1/responses
 * stream has its usage in its terminal event and no [DONE]. */
static int on_sse_event(void *arg, const char *p, size_t len)
{
    struct router__client *c = arg;
    struct router__request *req = &c->req;
    struct router__usage u;
    const char *data;
    size_t dlen;
    int choices_empty = 0;

    if (router__sse_data(p, len, &data, &dlen)) {
        int counted; /* an event that stands for a token, should no usage come */

        if (req->flight_leader) { /* to be cached: only a stream that ended well */
            int end = router__stream_end(req->endpoint, data, dlen);

            req->sse_ended |= end == ROUTER_STREAM_END;
            req->sse_failed |= end == ROUTER_STREAM_FAILED;
        }

        if (req->endpoint == ROUTER_EP_RESPONSES || req->endpoint == ROUTER_EP_MESSAGES) {
            int found, messages = req->endpoint == ROUTER_EP_MESSAGES;
            int call_done = 0; /* a web or file search call done (or begun: Messages) */

            router__json_enter(req); /* usage's few cJSON nodes in the request's arena */
            found = messages ? router__messages_event(data, dlen, &u, &counted, &call_done)
                             : router__responses_event(data, dlen, &u, &counted, &call_done);
            router__json_leave();
            req->web_search_calls += call_done == ROUTER_CALL_WEB_SEARCH;
            req->file_search_calls += call_done == ROUTER_CALL_FILE_SEARCH;
            if (found)
                note_usage(req, &u);
            if (found && !messages && req->pool->conf->tiered)
                req->answered_tier = (int8_t)router__responses_tier(data, dlen);
            /* Only text deltas: the lifecycle events (created, item
             * added, part done, ...; message_start, content_block_start,
             * ping, ...) are no tokens of the answer. */
        } else {
            /* Every chunk of OpenAI's names the tier: the first says it. */
            if (req->answered_tier < 0 && req->pool->conf->tiered)
                req->answered_tier = (int8_t)router__service_tier(data, dlen);
            if (usage_of(req, data, dlen, &u, &choices_empty)) {
                note_usage(req, &u);
                if (req->injected_usage && choices_empty)
                    return 0;
            }
            counted = !(dlen == 6 && memcmp(data, "[DONE]", 6) == 0);
        }
        if (counted) {
            uint64_t now = router__now(c->router);

            /* The backend's first token came, sent on or not: its time is
             * the backend's, a sample even when the budget cuts it. */
            if (req->ttft_due)
                backend_ttft_sample(req->pool->backend, now, BACKEND_STREAM,
                                    now - req->attempt_start_ms);
            if (overrun_cut(c))
                return -1; /* before this event went: not charged, nor the client's TTFT */
            if (req->ttft_due) { /* the client's first token (has_ttft in account.c) */
                req->ttft_due = 0;
                req->ttft_ms = now - req->start_ms;
            }
            req->events++;
        }
    }
    if (req->cacheable)
        keep_for_cache(c, p, len);
    forward(c, p, len);
    return c->closing ? -1 : 0;
}

/* Is the text of an answer without usage counted? A 2xx of chat,
 * completions or responses: an embedding has no text, an error no
 * completion. */
static int answer_counted(const struct router__request *req)
{
    return req->status / 100 == 2 && req->endpoint != ROUTER_EP_EMBEDDINGS;
}

/* A piece of the text of an answer too big to hold, as it passes (text
 * NULL: a token id): counted as count_completion counts a held body's, in
 * case no usage comes. */
static void count_big_text(void *arg, const char *text, size_t len)
{
    struct router__client *c = arg;
    struct router__request *req = &c->req;
    enum conf_tokenizer enc = req->pool->conf->tokenizer;
    int64_t n = text != NULL ? count_text(tokens_for(c, enc), enc, text, len) : 1;

    req->completion_counted += MAX(n, 0);
}

/* The web and file search calls an answer too big to hold showed as it
 * passed: they were made, so they are billed even if it breaks off. */
static void note_passed_calls(struct router__request *req)
{
    struct router__calls calls = router__bigusage_calls(req->big_usage);

    req->web_search_calls = calls.web;
    req->file_search_calls = calls.file;
}

/* The web and file search calls of a whole Responses answer's output. */
static void whole_output_calls(struct router__request *req)
{
    struct router__calls calls;

    router__responses_searches(req->up_body.data, req->up_body.len, &calls);
    req->web_searches = calls.web;
    req->file_searches = calls.file;
}

/* The answer passing has no usage to read, or no more: say why (its
 * charge is then that of an answer without usage) and let the reader go. */
static void big_usage_stop(struct router__request *req, const char *why)
{
    if (why != NULL)
        log_info("request %s: backend %s's answer over %u bytes %s; charged as one without usage",
                 req->id_str, req->pool->conf->name, PROXY_HOLD_BODY_MAX, why);
    note_passed_calls(req);
    router__bigusage_free(req->big_usage);
    req->big_usage = NULL;
}

/* Bytes of a plain answer that goes out as it comes: its usage, once the
 * reader finds it whole, is noted as a held body's would be. */
static void read_big_usage(struct router__request *req, const char *p, size_t len)
{
    struct router__usage u;
    const char *text;
    size_t tlen;
    int rc = router__bigusage_feed(req->big_usage, p, len);

    if (rc == 0)
        return;
    if (rc < 0) {
        big_usage_stop(req, "is not JSON or passed a limit of its reader");
        return;
    }
    text = router__bigusage_text(req->big_usage, &tlen);
    if (!usage_of(req, text, tlen, &u, NULL)) {
        big_usage_stop(req, "has a usage without token counts");
        return;
    }
    note_usage(req, &u);
    big_usage_stop(req, NULL);
}

/* A plain answer too big to hold: the head goes without the cost (it is
 * in the trailer), then what was held and the rest as it comes. Its usage
 * is read as it passes, so that it is charged as a held body would be. */
static void pass_big_body(struct router__client *c, const char *p, size_t len)
{
    struct router__request *req = &c->req;

    send_held_head(c, -1, 0, NULL);
    forward(c, req->up_body.data, req->up_body.len);
    forward(c, p, len);
    req->cacheable = 0;
    if (!c->closing) {
        int counted = answer_counted(req);

        if (counted)
            req->completion_counted = 0;
        req->big_usage = router__bigusage_new(counted ? count_big_text : NULL, c);
        if (req->big_usage != NULL)
            read_big_usage(req, req->up_body.data, req->up_body.len);
        if (req->big_usage != NULL)
            read_big_usage(req, p, len);
    }
    buf_free(&req->up_body); /* sent: the memory of a held body goes now */
}

void router__proxy_on_body(struct router__client *c, const char *p, size_t len)
{
    struct router__request *req = &c->req;

    if (req->is_sse) {
        int rc;

        send_held_head(c, -1, 0, NULL); /* the stream's first bytes: it goes out */
        if (buf_append(&req->sse, p, len) != 0) {
            router__client_close(c);
            return;
        }
        rc = router__sse_split(&req->sse, &req->sse_scanned, on_sse_event, c);
        if (rc != 0)
            return; /* cut or closed: the batch was flushed or dropped */
        if (req->sse.len > PROXY_SSE_EVENT_MAX) {
            log_warn("request %s: backend %s sent an SSE event over %u bytes, ending the stream",
                     req->id_str, req->pool->conf->name, PROXY_SSE_EVENT_MAX);
            router__upstream_abort(req->up);
            req->up = NULL;
            fail_midstream(c, error_upstream_io, "an event of the upstream's stream was too long");
            return;
        }
    } else if (req->head_held) {
        if (req->up_body.len + len > PROXY_HOLD_BODY_MAX)
            pass_big_body(c, p, len);
        else if (buf_append(&req->up_body, p, len) != 0) {
            router__client_close(c);
            return;
        }
    } else {
        if (req->big_usage != NULL)
            read_big_usage(req, p, len);
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

/* Tokens to charge: the upstream's usage, else our estimates (prompt)
 * and what was answered: the counted text of a whole body, or one token
 * per streamed event. A backend's own error without usage charges
 * nothing: APIs do not bill the requests they refuse. */
static struct backend_tokens tokens_used(const struct router__request *req)
{
    struct backend_tokens t = {.tier = billed_tier(req)};

    if (counting(req))
        return (struct backend_tokens){0}; /* the count is its answer, billed nothing */
    if (req->upstream_status >= 400 && req->prompt_tokens < 0 && req->completion_tokens < 0)
        return (struct backend_tokens){0};
    t.prompt = req->prompt_tokens >= 0 ? req->prompt_tokens : req->prompt_est;
    t.completion = req->completion_tokens >= 0    ? req->completion_tokens
                   : req->completion_counted >= 0 ? req->completion_counted
                                                  : (int64_t)req->events;
    t.cached = req->cached_tokens > 0 ? req->cached_tokens : 0;
    t.cache_write = req->cache_write_tokens > 0 ? req->cache_write_tokens : 0;
    t.cache_write_1h = req->cache_write_1h_tokens > 0 ? req->cache_write_1h_tokens : 0;
    t.web_searches = MAX(MAX(req->web_searches, req->web_search_calls), 0);
    t.file_searches = MAX(MAX(req->file_searches, req->file_search_calls), 0);
    t.reported = req->reported_usd >= 0;
    t.reported_usd = t.reported ? req->reported_usd : 0;
    return t;
}

/* Charge what the attempt really cost and learn from its usage. */
static void settle(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct router *r = c->router;
    const struct conf_backend *b = req->pool->conf;
    struct backend_tokens used;
    struct backend_charge charge;
    struct router__tenant *ts = router__tenant_state(r, req->tenant);

    /* Once. A write that fails while the end of a response goes out
     * (router__proxy_on_complete at an upstream's EOF, not batched)
     * closes the client, and its abort settles what was sent; the
     * second settle wrote $0 over the real cost (which the cost log
     * records) and fed the statistics twice. */
    if (req->settled)
        return;
    /* An answer too big to hold that broke off, or whose client left,
     * before its end: the search calls that had passed were made
     * (big_usage_stop, which notes them, runs only at its end). */
    if (req->big_usage != NULL)
        note_passed_calls(req);
    used = req->billed = tokens_used(req);
    used.partial = !req->upstream_done; /* broken, or its client left */
    charge = finish_attempt(c, &used);
    router__spend_settle(c, charge.usd);
    rate_settle(c, used.prompt + used.completion);
    if (req->prompt_tokens > 0 && b->tokenizer == CONF_TOK_ESTIMATE)
        policy_calib_observe(&r->calib[b->index],
                             policy_tokens_estimate(req->body.data, req->body.len),
                             req->prompt_tokens);
    if (req->completion_tokens >= 0 && req->endpoint != ROUTER_EP_EMBEDDINGS)
        policy_outpred_observe(&ts->outpred[req->route - r->conf->routes], req->completion_tokens,
                               req->completion_choices);
    if (req->prompt_tokens > 0 && req->prompt_est > 0) {
        /* Kept by the current generation's pool, which the scrape shows
         * (router__refresh_gauges): none for a backend a reload removed. */
        struct router *now = r->shared->current;
        const struct conf_backend *kept = now == r ? b : conf_find_backend(now->conf, b->name);

        if (kept != NULL)
            now->pools[kept->index].est_ratio = b->tokenizer == CONF_TOK_ESTIMATE
                                                    ? r->calib[b->index].ratio
                                                    : (double)req->prompt_tokens / req->prompt_est;
    }
}

/* The client left after its request went whole to an API backend and
 * before any answer: the provider bills the prompt it began on, so the
 * tenant is charged the prompt tokens the router counted. The completion
 * is unknown and charged nothing: the provider may bill a few tokens it
 * generated before it noticed, but a guess would over-charge. */
static void settle_prompt(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct backend_tokens used = {.prompt = req->prompt_est, .tier = req->asked_tier};
    struct backend_charge charge;

    req->billed = used;
    charge = finish_attempt(c, &used);
    router__spend_settle(c, charge.usd);
    rate_settle(c, used.prompt);
}

/* a, b and c end to end in out[96] (b: a formatted amount, under 32
 * bytes); returns the length. */
static size_t join3(char out[96], const char *a, const char *b, const char *c)
{
    size_t na = strlen(a), nb = strlen(b), nc = strlen(c);

    memcpy(out, a, na);
    memcpy(out + na, b, nb);
    memcpy(out + na + nb, c, nc);
    return na + nb + nc;
}

/* The end of a response that went out as it came: the settled cost as an
 * SSE comment clients ignore, then as a trailer in the last chunk (not for
 * HTTP/1.0, which has neither chunks nor trailers). */
static void end_with_cost(struct router__client *c)
{
    struct router__request *req = &c->req;
    char usd[32], tail[96];

    format_usd(usd, sizeof(usd), req->cost_micro);
    if (req->is_sse)
        forward(c, tail, join3(tail, ": x-costrouter-cost-usd=", usd, "\n\n"));
    if (req->chunked)
        send_raw(c, tail, join3(tail, "0\r\nx-costrouter-cost-usd: ", usd, "\r\n\r\n"));
}

/* A 2xx chat or completions body with no usage (some self-hosted servers
 * leave it out): count what its choices say with the backend's
 * tokenizer, so that the answer is not charged as if it were empty. A
 * Responses answer has its text in "output": its messages' content parts
 * ("text") and its function calls' "arguments". */
static void count_completion(struct router__client *c)
{
    struct router__request *req = &c->req;
    const struct conf_backend *b = req->pool->conf;
    struct policy_tokens *t = tokens_for(c, b->tokenizer);
    cJSON *body, *choice, *calls, *call;
    int64_t n = 0;

    if (!answer_counted(req))
        return;
    body = cJSON_ParseWithLength(req->up_body.data, req->up_body.len);
    cJSON_ArrayForEach(choice, cJSON_GetObjectItemCaseSensitive(body, "choices")) {
        const cJSON *msg = cJSON_GetObjectItemCaseSensitive(choice, "message");

        n += count_member(t, b->tokenizer, choice, "text");
        n += count_member(t, b->tokenizer, msg, "content");
        calls = cJSON_GetObjectItemCaseSensitive(msg, "tool_calls");
        cJSON_ArrayForEach(call, calls) {
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");
            n += count_member(t, b->tokenizer, fn, "arguments");
        }
    }
    cJSON_ArrayForEach(choice, cJSON_GetObjectItemCaseSensitive(body, "output")) {
        const cJSON *part;

        n += count_member(t, b->tokenizer, choice, "arguments");
        cJSON_ArrayForEach(part, cJSON_GetObjectItemCaseSensitive(choice, "content"))
            n += count_member(t, b->tokenizer, part, "text");
    }
    /* An Anthropic answer: its content blocks' text and its tool calls'
     * input (as compact JSON, as it was streamed). */
    cJSON_ArrayForEach(choice, cJSON_GetObjectItemCaseSensitive(body, "content")) {
        const cJSON *input = cJSON_GetObjectItemCaseSensitive(choice, "input");
        char *json = input ? cJSON_PrintUnformatted(input) : NULL;

        n += count_member(t, b->tokenizer, choice, "text");
        if (json)
            n += count_text(t, b->tokenizer, json, strlen(json));
        cJSON_free(json);
    }
    if (body != NULL)
        req->completion_counted = n;
    cJSON_Delete(body);
}

/* A count's answer, {"input_tokens": N}: the prompt's size by the
 * backend's own tokenizer, which the router only estimates. Kept as the
 * request's prompt tokens (the cost log's, billed none), and so, like a
 * settled usage, it calibrates a `tokenizer: estimate` backend. */
static void note_count(struct router__request *req)
{
    cJSON *body;
    const cJSON *n;

    if (req->status / 100 != 2)
        return;
    body = cJSON_ParseWithLength(req->up_body.data, req->up_body.len);
    n = cJSON_GetObjectItemCaseSensitive(body, "input_tokens");
    if (cJSON_IsNumber(n) && n->valuedouble >= 0 && n->valuedouble < 1e15)
        req->prompt_tokens = (int64_t)n->valuedouble;
    cJSON_Delete(body);
}

void router__proxy_on_complete(struct router__client *c)
{
    struct router__request *req = &c->req;
    struct router__usage u;

    if (req->is_sse && req->head_held && req->status / 100 == 2) {
        /* A stream that ended before its first byte (a body of 0 bytes):
         * no event, no end of stream, no answer. Its head was held, the
         * client saw nothing: a failure as a cut before that byte is, and
         * the next candidate may serve. */
        router__proxy_on_error(c, error_upstream_io);
        return;
    }
    req->up = NULL;
    req->upstream_done = 1;
    /* A stream's last events, its cost and its end join the batch of the
     * read that ended it (if any): one write. */
    if (req->is_sse && req->sse.len > 0) {
        forward(c, req->sse.data, req->sse.len);
        buf_reset(&req->sse);
        req->sse_scanned = 0;
    }
    if (!req->is_sse && req->up_body.len > 0 &&
        usage_of(req, req->up_body.data, req->up_body.len, &u, NULL))
        note_usage(req, &u);
    if (!req->is_sse && req->up_body.len > 0 && req->endpoint == ROUTER_EP_RESPONSES)
        whole_output_calls(req);
    if (!req->is_sse && req->up_body.len > 0 && req->pool->conf->tiered)
        req->answered_tier = (int8_t)router__service_tier(req->up_body.data, req->up_body.len);
    if (!req->is_sse && req->completion_tokens < 0 && req->up_body.len > 0)
        count_completion(c);
    if (counting(req) && req->up_body.len > 0)
        note_count(req);
    if (req->big_usage != NULL)
        big_usage_stop(req, "ended without usage");
    note_success(c);
    settle(c);
    if (req->head_held) {
        if (req->status >= 400)
            scrub_key(req, &req->up_body, "body");
        send_held_head(c, (int64_t)req->up_body.len, 1, &req->up_body);
        if (req->cacheable)
            keep_for_cache(c, req->up_body.data, req->up_body.len);
    } else {
        end_with_cost(c);
    }
    router__proxy_flush(c);
    router__spend_cache_store(c);
    router__client_response_done(c);
}

/* The upstream broke after the client got the response head: say so in
 * the stream (an SSE error event) and close, never a clean end. The
 * tenant pays for what was streamed. */
static void fail_midstream(struct router__client *c, const char *errstr, const char *detail)
{
    struct router__request *req = &c->req;
    int status;
    char *err = router__error_json(c->req.endpoint, errstr, detail, &status);
    struct buf ev = {0};

    req->broken = 1;
    req->keep_alive = 0;
    router__proxy_flush(c);
    settle(c);
    if (req->head_held) {
        /* Nothing sent yet: a clean error is still possible. */
        req->head_held = 0;
        free(err);
        router__spend_cache_store(c);
        router__send_error(c, errstr, NULL);
        return;
    }
    if (req->is_sse && err && buf_printf(&ev, "event: error\ndata: %s\n\n", err) == 0)
        forward(c, ev.data, ev.len);
    buf_free(&ev);
    free(err);
    router__spend_cache_store(c);
    /* No terminating chunk: the transfer is visibly incomplete too. */
    router__client_response_done(c);
}

/* Undo what router__proxy_on_head noted of an answer held back and not
 * sent, for another attempt. */
static void forget_response(struct router__request *req)
{
    req->response_started = 0;
    req->head_held = 0;
    req->success_due = 0;
    req->status = req->upstream_status = 0;
    req->ttft_ms = 0;
    req->ttft_due = 0;
    buf_reset(&req->head);
    buf_reset(&req->up_body);
}

/* An attempt given up without an answer after its whole request went to
 * an API backend (a timeout, an answer cut before it reached the client):
 * the provider may have served it, and bill it, while no request is
 * charged it (the next candidate serves, or the client gets the error).
 * Counted per backend, for the operator to set against the invoice. */
static void note_abandoned(struct router__client *c)
{
    struct router__request *req = &c->req;
    const char *labels[] = {req->pool->conf->name};

    if (req->request_sent && req->pool->conf->kind == CONF_BACKEND_API && !counting(req))
        metrics_add(c->router->metrics, METRICS_BACKEND_ABANDONED_TOTAL, labels, 1);
}

void router__proxy_on_error(struct router__client *c, const char *errstr)
{
    struct router__request *req = &c->req;
    uint64_t now = router__now(c->router);
    char note[LOG_EVERY_NOTE_MAX];

    req->up = NULL;
    if (req->response_started && req->head_held) {
        /* A plain answer is held whole until it ends (for its length and
         * cost), a stream's head until its first body byte: cut before
         * that, the client has seen nothing, so this is a failure before
         * the response like any other (a stream's first-byte timeout too).
         * Not charged, and the next candidate may serve. */
        forget_response(req);
    }
    if (req->response_started) {
        log_warn("request %s: backend %s failed mid-response: %s", req->id_str,
                 req->pool->conf->name, errstr);
        /* Cut by its backend (reset, close, bad framing) or silent past
         * read_timeout_ms (which does not run while a slow client holds
         * it back): a failure, though too late for another candidate.
         * The total timeout is not counted: a client that reads slowly
         * holds the backend back (paused) too. */
        if (req->success_due &&
            (errstr == error_upstream_io || errstr == error_upstream_read_timeout)) {
            req->success_due = 0;
            backend_attempt_failure(req->pool->backend, now, &req->ticket);
        }
        fail_midstream(c, errstr,
                       errstr == error_upstream_read_timeout
                           ? NULL
                           : "the upstream connection broke mid-response");
        return;
    }
    if (errstr == error_no_descriptors) { /* ours: no other backend fares better */
        finish_attempt(c, NULL);
        router__spend_release(c);
        router__send_error(c, errstr, NULL);
        return;
    }
    backend_attempt_failure(req->pool->backend, now, &req->ticket);
    note_abandoned(c);
    if (log_every_due(&req->pool->fail_log, now, note))
        log_info("request %s: backend %s failed: %s%s", req->id_str, req->pool->conf->name, errstr,
                 note);
    retry_elsewhere(c, errstr);
}

void router__proxy_abort(struct router__client *c)
{
    struct router__request *req = &c->req;

    /* The client left before the answer ended: 499 in the log and the
     * metrics, as before the head, not the upstream's 200. */
    if (!req->accounted && req->response_started && !req->upstream_done)
        req->status = 499;
    if (req->up != NULL) {
        router__upstream_abort(req->up);
        req->up = NULL;
    }
    if (req->attempt_open) {
        if (req->response_started)
            settle(c); /* the client left mid-response: charge what was sent */
        else if (req->request_sent && req->pool->conf->kind == CONF_BACKEND_API &&
                 !counting(req))
            settle_prompt(c);
        else
            finish_attempt(c, NULL); /* a pool's time for it is idle, as for any failure */
    }
    rate_settle(c, 0);
    router__proxy_unchoose(c);
    router__spend_abandon(c);
}
