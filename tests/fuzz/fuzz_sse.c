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
 *   non-streamed body, never crashes; when that text is one JSON object,
 *   the scan finds the same counts as a full cJSON parse reads in the
 *   root's "usage" (counts out of range read as unknown), however many
 *   other "usage" members and strings the text holds, and the same answer
 *   to whether the root's "choices" is empty;
 * - the same again for an answer built from the input's bytes: random
 *   bytes are seldom valid JSON, so this is what reaches nested and
 *   escaped names (see "answers built from the input" below);
 * - the reader of answers too big to hold (router/bigusage.c), fed the
 *   same text in two reads, never crashes or leaks, and unless it gives
 *   up (text yajl refuses, or past its limits), finds the same usage as
 *   the scan.
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

/* How many members of the object `obj` are named `name`. */
static int members_named(const cJSON *obj, const char *name)
{
    int n = 0;

    for (const cJSON *m = obj->child; m != NULL; m = m->next)
        n += m->string != NULL && strcmp(m->string, name) == 0;
    return n;
}

/* Is `text` one JSON object, as an upstream's answer or event is, that
 * the scan and cJSON must read alike? Left out: what cJSON reads
 * differently by design (control bytes, \u escapes, which it decodes in
 * names and the scan does not), and names the root holds twice, whose
 * meaning JSON leaves open (RFC 8259, 4). */
static cJSON *comparable_object(const char *text, size_t len)
{
    const char *rest = NULL;
    cJSON *root;

    if (!only_json_bytes(text, len) || memmem(text, len, "\\u", 2) != NULL)
        return NULL;
    root = cJSON_ParseWithLengthOpts(text, len, &rest, 0);
    if (root == NULL)
        return NULL;
    while (rest < text + len && (*rest == ' ' || *rest == '\t' || *rest == '\n' || *rest == '\r'))
        rest++;
    if (rest != text + len || !cJSON_IsObject(root) || members_named(root, "usage") > 1 ||
        members_named(root, "choices") > 1) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

/* The reader of a big answer, fed `text` in reads of about len/2 bytes,
 * reads what the scan reads, unless it gave up. */
static void check_big_usage(const char *text, size_t len, int found,
                            const struct router__usage *want)
{
    struct router__bigusage *b = router__bigusage_new(NULL, NULL);
    struct router__usage got = {-1, -1, -1};
    size_t half = len / 2, tlen;
    int rc, got_found = 0;
    const char *t;

    if (b == NULL)
        abort();
    rc = router__bigusage_feed(b, text, half);
    if (rc == 0)
        rc = router__bigusage_feed(b, text + half, len - half);
    if (rc == 1) {
        t = router__bigusage_text(b, &tlen);
        got_found = router__usage_parse(t, tlen, &got, NULL);
    }
    router__bigusage_free(b);
    if (rc < 0)
        return;
    if (got_found != found || got.prompt_tokens != want->prompt_tokens ||
        got.completion_tokens != want->completion_tokens ||
        got.cached_tokens != want->cached_tokens) {
        fprintf(stderr, "big usage: got %d %lld/%lld/%lld, scan %d %lld/%lld/%lld\n", got_found,
                (long long)got.prompt_tokens, (long long)got.completion_tokens,
                (long long)got.cached_tokens, found, (long long)want->prompt_tokens,
                (long long)want->completion_tokens, (long long)want->cached_tokens);
        abort();
    }
}

/* The scan finds the root object's "usage" exactly when cJSON does, with
 * the same counts, and whatever other "usage" the text holds elsewhere;
 * an empty root "choices" marks the usage-only chunk. */
static void check_usage_against_cjson(const char *text, size_t len)
{
    struct router__usage got;
    int choices_empty;
    int found = router__usage_parse(text, len, &got, &choices_empty);
    cJSON *root = comparable_object(text, len), *usage, *details, *choices;
    int64_t prompt = -1, completion = -1, cached = -1;
    int want_found, want_empty;

    if (root == NULL)
        return;
    usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (cJSON_IsObject(usage)) {
        prompt = reference_count(usage, "prompt_tokens");
        completion = reference_count(usage, "completion_tokens");
        details = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens_details");
        if (cJSON_IsObject(details))
            cached = reference_count(details, "cached_tokens");
    }
    choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    want_found = prompt >= 0 || completion >= 0;
    want_empty = want_found && cJSON_IsArray(choices) && choices->child == NULL;
    if (found != want_found || got.prompt_tokens != prompt || got.completion_tokens != completion ||
        got.cached_tokens != cached || (found && choices_empty != want_empty)) {
        fprintf(stderr, "usage: got %d %lld/%lld/%lld empty %d, cJSON %lld/%lld/%lld empty %d\n",
                found, (long long)got.prompt_tokens, (long long)got.completion_tokens,
                (long long)got.cached_tokens, choices_empty, (long long)prompt,
                (long long)completion, (long long)cached, want_empty);
        abort();
    }
    cJSON_Delete(root);
    check_big_usage(text, len, found, &got);
}

/* Calls of type `kind` (web_search_call, file_search_call) in cJSON's
 * reading of the root's "output": items whose first "type" is `kind` (the
 * scan's rule), or whose "type" members of that value are counted each
 * (`every`: the big reader's, which sees every member); -1 without an
 * output array. */
static int64_t reference_searches(const cJSON *root, const char *kind, int every)
{
    const cJSON *output = cJSON_GetObjectItemCaseSensitive(root, "output"), *item, *m;
    int64_t n = 0;

    if (!cJSON_IsArray(output))
        return -1;
    cJSON_ArrayForEach(item, output) {
        if (!cJSON_IsObject(item))
            continue;
        for (m = item->child; m != NULL; m = m->next) {
            if (strcmp(m->string, "type") != 0)
                continue;
            n += cJSON_IsString(m) && strcmp(m->valuestring, kind) == 0;
            if (!every)
                break;
        }
    }
    return n;
}

/* A count of `what` found against cJSON's; abort when they differ. */
static void check_count(const char *what, int64_t got, int64_t want)
{
    if (got != want) {
        fprintf(stderr, "%s: got %lld, cJSON %lld\n", what, (long long)got, (long long)want);
        abort();
    }
}

/* The scan counts a Responses answer's web and file search calls as cJSON
 * reads them; the big reader too, when it read the whole text (it stops
 * at the usage, and gives up on what yajl refuses). */
static void check_searches_against_cjson(const char *text, size_t len)
{
    cJSON *root = comparable_object(text, len);
    struct router__calls got, big;
    struct router__bigusage *b;
    int rc;

    if (root == NULL)
        return;
    if (members_named(root, "output") > 1) {
        cJSON_Delete(root);
        return;
    }
    router__responses_searches(text, len, &got);
    check_count("web searches", got.web, reference_searches(root, "web_search_call", 0));
    check_count("file searches", got.file, reference_searches(root, "file_search_call", 0));
    if ((b = router__bigusage_new(NULL, NULL)) == NULL)
        abort();
    rc = router__bigusage_feed(b, text, len / 2);
    if (rc == 0)
        rc = router__bigusage_feed(b, text + len / 2, len - len / 2);
    big = router__bigusage_calls(b);
    router__bigusage_free(b);
    if (rc == 0) {
        check_count("web searches (big)", big.web,
                    MAX(reference_searches(root, "web_search_call", 1), 0));
        check_count("file searches (big)", big.file,
                    MAX(reference_searches(root, "file_search_call", 1), 0));
    }
    cJSON_Delete(root);
}

/* The scan's service tier is the root's "service_tier" as cJSON reads
 * it: flex or priority by name, any other string the standard tier, no
 * string -1. */
static void check_tier_against_cjson(const char *text, size_t len)
{
    int got = router__service_tier(text, len), want = -1;
    cJSON *root = comparable_object(text, len);
    const cJSON *tier;

    if (root == NULL)
        return;
    if (members_named(root, "service_tier") > 1) {
        cJSON_Delete(root);
        return;
    }
    tier = cJSON_GetObjectItemCaseSensitive(root, "service_tier");
    if (cJSON_IsString(tier))
        want = (int)conf_tier_of(tier->valuestring, strlen(tier->valuestring));
    if (got != want) {
        fprintf(stderr, "service_tier: got %d, cJSON %d\n", got, want);
        abort();
    }
    cJSON_Delete(root);
}

/* ---- answers built from the input ----
 * Random bytes are almost never valid JSON, and cJSON (a Debian library,
 * not instrumented) gives the fuzzer no coverage to steer by; so the input
 * is also read as choices that build a valid object from the names and
 * values the scan looks for: nested, repeated, in strings and in keys. */

struct gen {
    const uint8_t *p, *end;
    struct buf out;
};

static unsigned gen_pick(struct gen *g, unsigned n)
{
    return g->p < g->end ? *g->p++ % n : 0;
}

static void gen_put(struct gen *g, const char *s)
{
    if (buf_append(&g->out, s, strlen(s)) != 0)
        abort();
}

static void gen_space(struct gen *g)
{
    static const char *const spaces[] = {"", "", " ", "\n", " \r\n\t"};

    gen_put(g, spaces[gen_pick(g, 5)]);
}

static const char *const gen_names[] = {
    "\"usage\"", "\"choices\"", "\"prompt_tokens\"", "\"completion_tokens\"",
    "\"prompt_tokens_details\"", "\"cached_tokens\"", "\"say \\\"usage\"", "\"usage\\\\\"", "\"x\"",
    "\"service_tier\"", "\"output\"", "\"type\"",
};

static const char *const gen_scalars[] = {
    "0", "7", "12", "-3", "1e300", "2.5", "null", "true", "\"usage\"", "\"\\\"usage\\\":{\"",
    "\"\\\\\"", "\"usage\\\":null}\"", "\"}\"", "\"[\"", "\"flex\"", "\"priority\"",
    "\"\\\"service_tier\\\":\\\"flex\"", "\"web_search_call\"", "\"web_search_call_\"",
    "\"file_search_call\"",
};

static void gen_value(struct gen *g, int depth);

/* An object (with names) or an array of up to four values. */
static void gen_container(struct gen *g, int depth, int object)
{
    unsigned n = gen_pick(g, 5);

    gen_put(g, object ? "{" : "[");
    for (unsigned i = 0; i < n; i++) {
        if (i > 0)
            gen_put(g, ",");
        gen_space(g);
        if (object) {
            gen_put(g, gen_names[gen_pick(g, sizeof(gen_names) / sizeof(gen_names[0]))]);
            gen_space(g);
            gen_put(g, ":");
            gen_space(g);
        }
        gen_value(g, depth + 1);
    }
    gen_space(g);
    gen_put(g, object ? "}" : "]");
}

static void gen_value(struct gen *g, int depth)
{
    unsigned kind = depth >= 6 ? 2 : gen_pick(g, 4);

    if (kind < 2)
        gen_container(g, depth, kind == 0);
    else
        gen_put(g, gen_scalars[gen_pick(g, sizeof(gen_scalars) / sizeof(gen_scalars[0]))]);
}

/* The input read as an answer (an object), checked as a body and as the
 * data line of an event. */
static void check_built_answer(const uint8_t *data, size_t size)
{
    struct gen g = {data, data + size, {0}};
    const char *payload;
    size_t plen;

    gen_space(&g);
    gen_container(&g, 0, 1);
    gen_space(&g);
    check_usage_against_cjson(g.out.data, g.out.len);
    check_tier_against_cjson(g.out.data, g.out.len);
    check_searches_against_cjson(g.out.data, g.out.len);
    buf_reset(&g.out);
    gen_put(&g, "data: ");
    g.p = data;
    gen_container(&g, 0, 1);
    gen_put(&g, "\n\n");
    if (!router__sse_data(g.out.data, g.out.len, &payload, &plen))
        abort();
    check_usage_against_cjson(payload, plen);
    check_tier_against_cjson(payload, plen);
    buf_free(&g.out);
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
    size_t scanned = 0;

    if (buf_append(tail, text, cut) != 0 || router__sse_split(tail, &scanned, collect, ev) != 0 ||
        buf_append(tail, text + cut, len - cut) != 0 ||
        router__sse_split(tail, &scanned, collect, ev) != 0)
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
    check_built_answer(data, size);

    buf_free(&one.all);
    buf_free(&two.all);
    buf_free(&tail_one);
    buf_free(&tail_two);
    return 0;
}
