/*
 * tests/fuzz/fuzz_sse.c: libFuzzer target for what the router reads out of
 * an upstream's answer (router/sse.c; `make fuzz-sse`, clang with ASan and
 * UBSan). The bytes come from a backend, which can be buggy or hostile.
 *
 * The first input byte chooses where the rest is cut in two reads; then:
 * - the SSE splitter, fed the two reads, hands out events that, with the
 *   tail it keeps, are exactly the input (pass-through loses and repeats
 *   nothing), each ending in its first blank line, the same events as
 *   when the input arrives in one read;
 * - usage read from each event's data line, and from the whole input as a
 *   non-streamed body, never crashes; when that text is a JSON object
 *   whose only "usage" is its top-level one, the fast scan finds the same
 *   counts as a full cJSON parse (counts out of range read as unknown).
 */
#define _GNU_SOURCE /* memmem */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "router/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct events {
    struct buf all;   /* every event handed out, in order */
    size_t count;
};

static int64_t reference_count(const cJSON *obj, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);

    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= POLICY_TOKENS_COUNT_MAX))
        return -1;
    return (int64_t)v->valuedouble;
}

/* No control bytes but JSON's white space: cJSON also skips the others
 * between tokens, which the router's scan (rightly) does not, so such
 * inputs are left out of the comparison. */
static int only_json_bytes(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 && c != '\t' && c != '\n' && c != '\r')
            return 0;
    }
    return 1;
}

static void check_usage_against_cjson(const char *text, size_t len)
{
    struct router__usage got;
    int choices_empty;
    int found = router__usage_parse(text, len, &got, &choices_empty);
    const char *first = memmem(text, len, "\"usage\"", 7);
    cJSON *root, *usage, *details;

    if (first == NULL || memmem(first + 1, len - (size_t)(first + 1 - text), "\"usage\"", 7) != NULL ||
        !only_json_bytes(text, len))
        return;
    root = cJSON_ParseWithLength(text, len);
    usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (cJSON_IsObject(usage)) {
        int64_t prompt = reference_count(usage, "prompt_tokens");
        int64_t completion = reference_count(usage, "completion_tokens");
        int64_t cached = -1;

        details = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens_details");
        if (cJSON_IsObject(details))
            cached = reference_count(details, "cached_tokens");
        if (found != (prompt >= 0 || completion >= 0) || got.prompt_tokens != prompt ||
            got.completion_tokens != completion || got.cached_tokens != cached) {
            fprintf(stderr, "usage: got %d %lld/%lld/%lld, cJSON %lld/%lld/%lld\n", found,
                    (long long)got.prompt_tokens, (long long)got.completion_tokens,
                    (long long)got.cached_tokens, (long long)prompt, (long long)completion,
                    (long long)cached);
            abort();
        }
    }
    cJSON_Delete(root);
}

/* Does p[0..len) end in a blank line (\n\n or \n\r\n), with none before? */
static int one_event(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '\n')
            continue;
        if (i + 1 < len && p[i + 1] == '\n')
            return i + 2 == len;
        if (i + 2 < len && p[i + 1] == '\r' && p[i + 2] == '\n')
            return i + 3 == len;
    }
    return 0;
}

static int collect(void *arg, const char *p, size_t len)
{
    struct events *ev = arg;
    const char *payload;
    size_t plen;

    if (!one_event(p, len))
        abort();
    if (router__sse_data(p, len, &payload, &plen)) {
        if (payload < p || payload + plen > p + len)
            abort();
        check_usage_against_cjson(payload, plen);
    }
    if (buf_append(&ev->all, p, len) != 0)
        abort();
    ev->count++;
    return 0;
}

static int same_bytes(const char *a, const char *b, size_t len)
{
    return len == 0 || memcmp(a, b, len) == 0;
}

/* Split `text` as it arrives in reads of [0, cut) and [cut, len). */
static void split(const char *text, size_t len, size_t cut, struct events *ev, struct buf *tail)
{
    if (buf_append(tail, text, cut) != 0 || router__sse_split(tail, collect, ev) != 0 ||
        buf_append(tail, text + cut, len - cut) != 0 || router__sse_split(tail, collect, ev) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct events one = {{0}, 0}, two = {{0}, 0};
    struct buf tail_one = {0}, tail_two = {0};
    const char *text = (const char *)data + 1;
    size_t len, cut;

    if (size == 0)
        return 0;
    len = size - 1;
    cut = len ? data[0] % (len + 1) : 0;

    split(text, len, len, &one, &tail_one);
    split(text, len, cut, &two, &tail_two);
    /* Events and tail are the input, in order, whatever the reads. */
    if (one.all.len + tail_one.len != len || !same_bytes(one.all.data, text, one.all.len) ||
        !same_bytes(tail_one.data, text + one.all.len, tail_one.len))
        abort();
    if (one.count != two.count || one.all.len != two.all.len ||
        !same_bytes(one.all.data, two.all.data, one.all.len))
        abort();

    check_usage_against_cjson(text, len);

    buf_free(&one.all);
    buf_free(&two.all);
    buf_free(&tail_one);
    buf_free(&tail_two);
    return 0;
}
