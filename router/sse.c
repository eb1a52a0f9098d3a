/*
 * router/sse.c: server-sent events framing and usage extraction.
 *
 * Pure functions over bytes, so they are unit-tested without sockets.
 * Usage is looked for only in payloads that contain "usage", so most
 * stream events are forwarded without being parsed as JSON.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <string.h>

#include "router/internal.h"

/* End of the first event in p[0..len): the index just past its blank
 * line, or 0 if the event is not complete yet. Lines end in \n or \r\n. */
static size_t event_end(const char *p, size_t len)
{
    const char *nl = p, *end = p + len;

    while ((nl = memchr(nl, '\n', (size_t)(end - nl))) != NULL) {
        nl++;
        if (nl < end && *nl == '\n')
            return (size_t)(nl + 1 - p);
        if (nl + 1 < end && nl[0] == '\r' && nl[1] == '\n')
            return (size_t)(nl + 2 - p);
    }
    return 0;
}

int router__sse_split(struct buf *sse, int (*on_event)(void *arg, const char *p, size_t len),
                      void *arg)
{
    size_t off = 0, n;
    int rc = 0;

    while (off < sse->len && (n = event_end(sse->data + off, sse->len - off)) > 0) {
        rc = on_event(arg, sse->data + off, n);
        off += n;
        if (rc != 0)
            break;
    }
    buf_consume(sse, off);
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

/* Start of the JSON object that is the value of "usage", or NULL when
 * usage is absent or null (OpenAI sends "usage":null in every chunk once
 * include_usage is on, so this must be cheap). */
static const char *usage_object(const char *json, size_t len)
{
    static const char null_tail[] = "\"usage\":null}";
    const size_t tail = sizeof(null_tail) - 1;
    const char *end = json + len, *p = json;

    /* Most chunks end so (OpenAI, vLLM): that "usage" is the top-level
     * one, as the brace after it closes the body, and there is nothing to
     * search for in the rest. This skips a scan of every chunk. */
    while (end > json && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
        end--;
    if ((size_t)(end - json) >= tail && memcmp(end - tail, null_tail, tail) == 0)
        return NULL;

    while ((p = memmem(p, (size_t)(end - p), "\"usage\"", 7)) != NULL) {
        const char *v = p + 7;

        while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
            v++;
        if (v < end && *v == ':') {
            v++;
            while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
                v++;
            if (v < end && *v == '{')
                return v;
        }
        p += 7;
    }
    return NULL;
}

/* Is "choices" an empty array? (the usage-only chunk of a stream) */
static int choices_empty_array(const char *json, size_t len)
{
    const char *end = json + len, *p = memmem(json, len, "\"choices\"", 9);

    if (p == NULL)
        return 0;
    p += 9;
    while (p < end && (*p == ' ' || *p == ':' || *p == '\t'))
        p++;
    if (p >= end || *p != '[')
        return 0;
    p++;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p < end && *p == ']';
}

int router__usage_parse(const char *json, size_t len, struct router__usage *out,
                        int *choices_empty)
{
    const char *start = usage_object(json, len);
    cJSON *usage, *details;
    int found;

    out->prompt_tokens = out->completion_tokens = out->cached_tokens = -1;
    *choices_empty = 0;
    if (start == NULL)
        return 0;
    /* Parse the usage object alone, not the whole (possibly large) body. */
    usage = cJSON_ParseWithLengthOpts(start, (size_t)(json + len - start), NULL, 0);
    if (usage == NULL)
        return 0;
    out->prompt_tokens = json_count(usage, "prompt_tokens");
    out->completion_tokens = json_count(usage, "completion_tokens");
    details = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens_details");
    if (cJSON_IsObject(details))
        out->cached_tokens = json_count(details, "cached_tokens");
    found = out->prompt_tokens >= 0 || out->completion_tokens >= 0;
    cJSON_Delete(usage);
    *choices_empty = choices_empty_array(json, len);
    return found;
}
