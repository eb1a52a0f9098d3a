/*
 * router/sse.c: server-sent events framing and usage extraction.
 *
 * Pure functions over bytes, so they are unit-tested without sockets.
 * Usage is looked for only in payloads that contain "usage", so most
 * stream events are forwarded without being parsed as JSON.
 *
 * Two APIs name the counts differently: chat and completions say
 * prompt_tokens, completion_tokens and prompt_tokens_details.cached_tokens;
 * the Responses API input_tokens, output_tokens and
 * input_tokens_details.cached_tokens. Both are read, the first where a
 * usage had both. A Responses stream has its usage one level down, in the
 * terminal event's "response" (router__responses_event). Anthropic's
 * Messages API says input_tokens and output_tokens too, with
 * cache_read_input_tokens and cache_creation_input_tokens beside them
 * (read as they are: its input_tokens counts neither, and proxy.c adds
 * them up) and server_tool_use.web_search_requests, the web searches
 * billed per use; a stream has them in message_start's "message" and in
 * message_delta (router__messages_event). OpenAI's Responses API bills its
 * web searches and file searches per call too, but says so in no usage:
 * its answer's output has a web_search_call or file_search_call item for
 * each (router__responses_searches), and a stream sends each in a
 * response.output_item.done event. Some hosts put
 * what the request cost them in the usage (OpenRouter's "cost", Perplexity's
 * "cost"."total_cost"), which a cost_from_usage backend charges.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <stddef.h>
#include <string.h>

#include "conf/conf.h"
#include "router/internal.h"

/* End of the first event in p[0..len): the index just past its blank
 * line, or 0 if the event is not complete yet. Lines end in \n or \r\n.
 * The search starts at p[from]: bytes before it hold no blank line. */
static size_t event_end(const char *p, size_t len, size_t from)
{
    const char *nl = p + from, *end = p + len;

    while ((nl = memchr(nl, '\n', (size_t)(end - nl))) != NULL) {
        nl++;
        if (nl < end && *nl == '\n')
            return (size_t)(nl + 1 - p);
        if (nl + 1 < end && nl[0] == '\r' && nl[1] == '\n')
            return (size_t)(nl + 2 - p);
    }
    return 0;
}

int router__sse_split(struct buf *sse, size_t *scanned,
                      int (*on_event)(void *arg, const char *p, size_t len), void *arg)
{
    /* A blank line is 2 or 3 bytes: one that began in the last 2 bytes
     * scanned may end in the new ones. Scanning an unfinished event from
     * its start at every read would be quadratic in its size. */
    size_t off = 0, n, from = *scanned > 2 && *scanned <= sse->len ? *scanned - 2 : 0;
    int rc = 0;

    while (off < sse->len && (n = event_end(sse->data + off, sse->len - off, from)) > 0) {
        rc = on_event(arg, sse->data + off, n);
        off += n;
        from = 0;
        if (rc != 0)
            break;
    }
    buf_consume(sse, off);
    *scanned = rc == 0 ? sse->len : 0;
    return rc;
}

int router__sse_data(const char *event, size_t len, const char **data, size_t *data_len)
{
    const char *p = event, *end = event + len;

    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = eol ? eol : end;

        if (line_end > p && line_end[-1] == '\r')
            line_end--;
        if ((size_t)(line_end - p) >= 5 && memcmp(p, "data:", 5) == 0) {
            p += 5;
            if (p < line_end && *p == ' ')
                p++;
            *data = p;
            *data_len = (size_t)(line_end - p);
            return 1;
        }
        if (eol == NULL)
            break;
        p = eol + 1;
    }
    return 0;
}

/* A token count as the upstream reports it, or -1: absent, not a number,
 * negative, or beyond POLICY_TOKENS_COUNT_MAX (the charge then falls back
 * to the router's own counts, as with no usage at all). */
static int64_t json_count(const cJSON *obj, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);

    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= POLICY_TOKENS_COUNT_MAX))
        return -1;
    return (int64_t)v->valuedouble;
}

/* JSON's white space (RFC 8259, 2): no other byte may stand between tokens. */
static int json_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static const char *skip_space(const char *p, const char *end)
{
    while (p < end && json_space(*p))
        p++;
    return p;
}

/* Just past the JSON string that opens at p[0] ('"'), or NULL when it does
 * not close before `end`. A quote is escaped when an odd number of
 * backslashes precede it; the opening quote stops the count. */
static const char *string_end(const char *p, const char *end)
{
    for (p++; p < end && (p = memchr(p, '"', (size_t)(end - p))) != NULL; p++) {
        const char *b = p;

        while (b[-1] == '\\')
            b--;
        if ((p - b) % 2 == 0)
            return p + 1;
    }
    return NULL;
}

/* One step of a walk over JSON text: past the string that starts at p,
 * or past the byte at p, counting brackets in *depth. NULL when a string
 * does not close before `end`. */
static const char *walk_step(const char *p, const char *end, ptrdiff_t *depth)
{
    switch (*p) {
    case '"':
        return string_end(p, end);
    case '{':
    case '[':
        ++*depth;
        break;
    case '}':
    case ']':
        --*depth;
        break;
    }
    return p + 1;
}

/* Does the object or array that p is inside close at the very end of
 * the text? Walked from p: the first bracket that closes more than was
 * opened since p must be the last byte. */
static int closes_at_end(const char *p, const char *end)
{
    ptrdiff_t depth = 0;

    while (p != NULL && p < end) {
        p = walk_step(p, end, &depth);
        if (depth < 0)
            return p == end;
    }
    return 0;
}

/* The last `key` (quotes included) in json[0..end), or NULL. */
static const char *last_quoted(const char *json, const char *end, const char *key, size_t klen)
{
    const char *q = end;

    while ((q = memrchr(json, '"', (size_t)(q - json))) != NULL) {
        if ((size_t)(end - q) >= klen && memcmp(q, key, klen) == 0)
            return q;
    }
    return NULL;
}

/* Where the value of the root object's first member named `key` (quotes
 * included, as written: escapes in a key are not decoded) starts, or NULL.
 * Strings and nesting are walked, so the same name in a nested object, or
 * those bytes inside a string, are not taken for it; the walk ends with
 * the root object, as cJSON ignores what follows it. */
static const char *member_value(const char *json, const char *end, const char *key, size_t klen)
{
    const char *p = skip_space(json, end), *next, *v;
    ptrdiff_t depth = 0;

    if (p == end || *p != '{')
        return NULL;
    for (; p < end; p = next) {
        if ((next = walk_step(p, end, &depth)) == NULL || depth == 0)
            return NULL;
        if (*p == '"' && depth == 1 && (size_t)(next - p) == klen && memcmp(p, key, klen) == 0) {
            v = skip_space(next, end);
            if (v < end && *v == ':')
                return skip_space(v + 1, end);
        }
    }
    return NULL;
}

/* Where the value of the root object's member `key` (quotes included)
 * starts, or NULL; `end` has no white space before it. The last such name
 * is tried first: usage comes last or nearly so in the answers of OpenAI,
 * vLLM and TGI, service_tier just after it. When the object holding the
 * last name (a name, as an unescaped quote starts it) closes at the very
 * end, that object is the root, and only the text after the name was
 * walked. Otherwise the whole text is. */
static const char *root_value(const char *json, const char *end, const char *key, size_t klen)
{
    const char *k = last_quoted(json, end, key, klen), *v;

    if (k == NULL)
        return NULL;
    v = skip_space(k + klen, end);
    if (k > json && k[-1] != '\\' && v < end && *v == ':' && closes_at_end(v, end))
        return skip_space(v + 1, end);
    return member_value(json, end, key, klen);
}

static const char *trim_end(const char *json, const char *end)
{
    while (end > json && json_space(end[-1]))
        end--;
    return end;
}

/* Start of the JSON object that is the value of the top-level "usage", or
 * NULL when usage is absent, null or not an object. OpenAI sends
 * "usage":null in every chunk once include_usage is on, so this must be
 * cheap: most chunks are settled by their last bytes, the others by a
 * backwards search from quote to quote. */
static const char *usage_object(const char *json, size_t len)
{
    static const char null_tail[] = "\"usage\":null}";
    const size_t tail = sizeof(null_tail) - 1;
    const char *end = trim_end(json, json + len), *v;

    /* Most chunks end so (OpenAI, vLLM): that "usage" is the top-level
     * one, as the brace after it closes the body, and there is nothing to
     * search for in the rest. This skips a scan of every chunk. A
     * backslash before the quote would make it part of a longer key. */
    if ((size_t)(end - json) > tail && memcmp(end - tail, null_tail, tail) == 0 &&
        end[-(ptrdiff_t)tail - 1] != '\\')
        return NULL;
    v = root_value(json, end, "\"usage\"", 7);
    return v != NULL && v < end && *v == '{' ? v : NULL;
}

/* Is the top-level "choices" an empty array? (the usage-only chunk of a
 * stream) */
static int choices_empty_array(const char *json, size_t len)
{
    const char *end = json + len, *v = member_value(json, end, "\"choices\"", 9);

    if (v == NULL || v >= end || *v != '[')
        return 0;
    v = skip_space(v + 1, end);
    return v < end && *v == ']';
}

/* Every count of `out` unknown: what an event or body without them leaves. */
static void usage_unknown(struct router__usage *out)
{
    out->prompt_tokens = out->completion_tokens = out->cached_tokens = -1;
    out->cache_write_tokens = out->cache_write_1h_tokens = out->web_searches = -1;
    out->file_searches = -1;
    out->cost_usd = -1;
}

/* The cost a usage reports, in USD: OpenRouter's "cost" (its credits are
 * dollars), or the "total_cost" of Perplexity's "cost" object; -1 when
 * there is none, or it is no amount a request can cost (negative, past
 * ROUTER_REPORTED_USD_MAX, not a number). */
static double reported_cost(const cJSON *usage)
{
    const cJSON *cost = cJSON_GetObjectItemCaseSensitive(usage, "cost");

    if (cJSON_IsObject(cost))
        cost = cJSON_GetObjectItemCaseSensitive(cost, "total_cost");
    if (!cJSON_IsNumber(cost) || !(cost->valuedouble >= 0 &&
                                   cost->valuedouble <= ROUTER_REPORTED_USD_MAX))
        return -1;
    return cost->valuedouble;
}

int router__usage_parse(const char *json, size_t len, struct router__usage *out,
                        int *choices_empty)
{
    const char *start = usage_object(json, len);
    cJSON *usage, *details;
    int found;

    usage_unknown(out);
    if (choices_empty != NULL)
        *choices_empty = 0;
    if (start == NULL)
        return 0;
    /* Parse the usage object alone, not the whole (possibly large) body. */
    usage = cJSON_ParseWithLengthOpts(start, (size_t)(json + len - start), NULL, 0);
    if (usage == NULL)
        return 0;
    out->prompt_tokens = json_count(usage, "prompt_tokens");
    if (out->prompt_tokens < 0)
        out->prompt_tokens = json_count(usage, "input_tokens");
    out->completion_tokens = json_count(usage, "completion_tokens");
    if (out->completion_tokens < 0)
        out->completion_tokens = json_count(usage, "output_tokens");
    details = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens_details");
    if (!cJSON_IsObject(details))
        details = cJSON_GetObjectItemCaseSensitive(usage, "input_tokens_details");
    if (cJSON_IsObject(details))
        out->cached_tokens = json_count(details, "cached_tokens");
    else
        out->cached_tokens = json_count(usage, "cache_read_input_tokens");
    out->cache_write_tokens = json_count(usage, "cache_creation_input_tokens");
    /* The 1-hour writes among them, which cost more than the 5-minute ones. */
    details = cJSON_GetObjectItemCaseSensitive(usage, "cache_creation");
    if (cJSON_IsObject(details))
        out->cache_write_1h_tokens = json_count(details, "ephemeral_1h_input_tokens");
    /* Server tools bill per use on top of the tokens: web searches. */
    details = cJSON_GetObjectItemCaseSensitive(usage, "server_tool_use");
    if (cJSON_IsObject(details))
        out->web_searches = json_count(details, "web_search_requests");
    /* Some hosts say what the request cost them (cost_from_usage bills it). */
    out->cost_usd = reported_cost(usage);
    found = out->prompt_tokens >= 0 || out->completion_tokens >= 0;
    cJSON_Delete(usage);
    if (choices_empty != NULL)
        *choices_empty = choices_empty_array(json, len);
    return found;
}

/* Is the JSON value at v (in [v, end)) the string `quoted`, as written? */
static int value_is(const char *v, const char *end, const char *quoted, size_t qlen)
{
    return v != NULL && (size_t)(end - v) >= qlen && memcmp(v, quoted, qlen) == 0;
}

#define LIT(s) s, sizeof(s) - 1

/* Just past the object or array that opens at p, or NULL when it does
 * not close before `end`. */
static const char *value_end(const char *p, const char *end)
{
    ptrdiff_t depth = 0;

    do
        p = walk_step(p, end, &depth);
    while (p != NULL && p < end && depth > 0);
    return p != NULL && depth == 0 ? p : NULL;
}

int router__json_whole(const char *json, size_t len)
{
    const char *end = json + len, *p = skip_space(json, end);

    if (p == end || (*p != '{' && *p != '['))
        return 0;
    p = value_end(p, end);
    return p != NULL && skip_space(p, end) == end;
}

/* The value of the root member `key` when it is an object: its start,
 * with *obj_end just past it; NULL otherwise. */
static const char *member_object(const char *json, const char *end, const char *key,
                                 size_t klen, const char **obj_end)
{
    const char *v = member_value(json, end, key, klen);

    if (v == NULL || v >= end || *v != '{' || (*obj_end = value_end(v, end)) == NULL)
        return NULL;
    return v;
}

/* The "response" object of a terminal /v1/responses event, in
 * [*resp, *resp_end), or 0 when the event is no such one. Only a terminal
 * event's object is the answer's: response.created and
 * response.in_progress carry the same object with "usage": null. */
static int terminal_response(const char *json, const char *end, const char *type,
                             const char **resp, const char **resp_end)
{
    if (!(value_is(type, end, LIT("\"response.completed\"")) ||
          value_is(type, end, LIT("\"response.incomplete\"")) ||
          value_is(type, end, LIT("\"response.failed\""))))
        return 0;
    return (*resp = member_object(json, end, LIT("\"response\""), resp_end)) != NULL;
}

/* The hosted tool call billed per call that the object in [item, end) of
 * a Responses answer's output is: ROUTER_CALL_WEB_SEARCH,
 * ROUTER_CALL_FILE_SEARCH, or 0 for any other item. */
static int call_item(const char *item, const char *end)
{
    const char *type = member_value(item, end, LIT("\"type\""));

    if (value_is(type, end, LIT("\"web_search_call\"")))
        return ROUTER_CALL_WEB_SEARCH;
    if (value_is(type, end, LIT("\"file_search_call\"")))
        return ROUTER_CALL_FILE_SEARCH;
    return 0;
}

/* Just past the JSON value that starts at p, or NULL when it does not end
 * before `end`. A number or literal ends where a delimiter or space does. */
static const char *element_end(const char *p, const char *end)
{
    if (*p == '"')
        return string_end(p, end);
    if (*p == '{' || *p == '[')
        return value_end(p, end);
    while (p < end && *p != ',' && *p != ']' && *p != '}' && !json_space(*p))
        p++;
    return p < end ? p : NULL;
}

/* The web and file search calls among the items of the root's "output"
 * array, both -1 when there is no such array. The items are walked, not
 * parsed: an answer's output can be large, and only their types count. */
static void output_searches(const char *json, const char *end, struct router__calls *out)
{
    const char *p = member_value(json, end, LIT("\"output\"")), *item_end;
    int kind;

    out->web = out->file = -1;
    if (p == NULL || p >= end || *p != '[')
        return;
    out->web = out->file = 0;
    for (p = skip_space(p + 1, end); p < end && *p != ']'; p = skip_space(p + 1, end)) {
        if ((item_end = element_end(p, end)) == NULL)
            break;
        kind = *p == '{' ? call_item(p, item_end) : 0;
        out->web += kind == ROUTER_CALL_WEB_SEARCH;
        out->file += kind == ROUTER_CALL_FILE_SEARCH;
        p = skip_space(item_end, end);
        if (p >= end || *p != ',')
            break;
    }
}

void router__responses_searches(const char *json, size_t len, struct router__calls *out)
{
    output_searches(json, json + len, out);
}

int router__responses_event(const char *json, size_t len, struct router__usage *out,
                            int *text_delta, int *call_done)
{
    const char *end = json + len, *type = member_value(json, end, LIT("\"type\""));
    const char *resp, *resp_end, *item, *item_end;
    struct router__calls calls;
    int found;

    usage_unknown(out);
    *call_done = 0;
    *text_delta = value_is(type, end, LIT("\"response.output_text.delta\""));
    if (*text_delta)
        return 0;
    if (value_is(type, end, LIT("\"response.output_item.done\""))) {
        item = member_object(json, end, LIT("\"item\""), &item_end);
        *call_done = item != NULL ? call_item(item, item_end) : 0;
        return 0;
    }
    if (!terminal_response(json, end, type, &resp, &resp_end))
        return 0;
    /* The response object alone is a root of its own: its usage is found
     * as a body's is, and no "usage" of the event's own can stand in. */
    found = router__usage_parse(resp, (size_t)(resp_end - resp), out, NULL);
    output_searches(resp, resp_end, &calls);
    out->web_searches = calls.web;
    out->file_searches = calls.file;
    return found;
}

int router__service_tier(const char *json, size_t len)
{
    const char *end = trim_end(json, json + len);
    const char *v = root_value(json, end, LIT("\"service_tier\"")), *v_end;

    if (v == NULL || v >= end || *v != '"' || (v_end = string_end(v, end)) == NULL)
        return -1;
    return (int)conf_tier_of(v + 1, (size_t)(v_end - v - 2));
}

int router__responses_tier(const char *json, size_t len)
{
    const char *end = json + len, *type = member_value(json, end, LIT("\"type\""));
    const char *resp, *resp_end;

    if (!terminal_response(json, end, type, &resp, &resp_end))
        return -1;
    return router__service_tier(resp, (size_t)(resp_end - resp));
}

int router__stream_end(enum router__endpoint ep, const char *json, size_t len)
{
    const char *end = json + len, *type, *err;

    if (ep == ROUTER_EP_CHAT || ep == ROUTER_EP_COMPLETIONS) {
        if (len == 6 && memcmp(json, "[DONE]", 6) == 0)
            return ROUTER_STREAM_END;
        /* OpenAI reports a failure once a stream has begun as a chunk
         * that is an error object ("error": null in a chunk is none). */
        end = trim_end(json, end);
        err = root_value(json, end, LIT("\"error\""));
        return err != NULL && err < end && *err != 'n' ? ROUTER_STREAM_FAILED : 0;
    }
    type = member_value(json, end, LIT("\"type\""));
    if (value_is(type, end, LIT("\"error\"")) || value_is(type, end, LIT("\"response.failed\"")))
        return ROUTER_STREAM_FAILED;
    if (ep == ROUTER_EP_MESSAGES)
        return value_is(type, end, LIT("\"message_stop\"")) ? ROUTER_STREAM_END : 0;
    return value_is(type, end, LIT("\"response.completed\"")) ||
                   value_is(type, end, LIT("\"response.incomplete\""))
               ? ROUTER_STREAM_END
               : 0;
}

/* Is the content block in [block, end) a web search Claude started (a
 * server_tool_use block of the web_search tool)? Each is one search,
 * billed; web_fetch and code execution blocks bill otherwise. */
static int search_block(const char *block, const char *end)
{
    return value_is(member_value(block, end, LIT("\"type\"")), end, LIT("\"server_tool_use\"")) &&
           value_is(member_value(block, end, LIT("\"name\"")), end, LIT("\"web_search\""));
}

int router__messages_event(const char *json, size_t len, struct router__usage *out,
                           int *text_delta, int *call_done)
{
    const char *end = json + len, *type = member_value(json, end, LIT("\"type\""));
    const char *msg, *msg_end, *delta, *dtype, *block, *block_end;

    usage_unknown(out);
    *text_delta = *call_done = 0;
    if (value_is(type, end, LIT("\"content_block_start\""))) {
        block = member_object(json, end, LIT("\"content_block\""), &block_end);
        *call_done = block != NULL && search_block(block, block_end) ? ROUTER_CALL_WEB_SEARCH : 0;
        return 0;
    }
    if (value_is(type, end, LIT("\"content_block_delta\""))) {
        /* Text and a tool call's input as it is written: the answer's
         * tokens. thinking_delta and signature_delta are not counted. */
        if ((delta = member_object(json, end, LIT("\"delta\""), &msg_end)) != NULL) {
            dtype = member_value(delta, msg_end, LIT("\"type\""));
            *text_delta = value_is(dtype, msg_end, LIT("\"text_delta\"")) ||
                          value_is(dtype, msg_end, LIT("\"input_json_delta\""));
        }
        return 0;
    }
    if (value_is(type, end, LIT("\"message_delta\"")))
        return router__usage_parse(json, len, out, NULL);
    if (!value_is(type, end, LIT("\"message_start\"")))
        return 0;
    msg = member_object(json, end, LIT("\"message\""), &msg_end);
    if (msg == NULL || !router__usage_parse(msg, (size_t)(msg_end - msg), out, NULL))
        return 0;
    /* Its output_tokens is the count so far (1 or so), not the answer's:
     * a stream that ends before a message_delta is charged its deltas. */
    out->completion_tokens = -1;
    return out->prompt_tokens >= 0;
}
