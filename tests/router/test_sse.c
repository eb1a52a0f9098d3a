/* tests/router/test_sse.c: SSE event splitting and usage extraction (router/sse.c). */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <string.h>

#include "router/internal.h"

struct collected {
    char events[8][256]; /* copies of each event seen */
    int n;               /* how many */
};

static int collect(void *arg, const char *p, size_t len)
{
    struct collected *c = arg;

    cr_assert_lt(c->n, 8);
    cr_assert_lt(len, sizeof(c->events[0]));
    memcpy(c->events[c->n], p, len);
    c->events[c->n][len] = '\0';
    c->n++;
    return 0;
}

/* Feed `stream` in pieces of `step` bytes; events must come out whole
 * whatever the split, with \n or \r\n line ends. */
/* Arrays, not pointers: Criterion runs each case in a re-executed child,
 * where pointers into the parent's data are meaningless. */
struct split_case {
    char stream[64];
    size_t step;
    int events;
    char first[32];
    size_t tail;
};

ParameterizedTestParameters(sse, split_any_piece_size)
{
    static struct split_case cases[] = {
        {"data: a\n\ndata: b\n\n", 1, 2, "data: a\n\n", 0},
        {"data: a\n\ndata: b\n\n", 3, 2, "data: a\n\n", 0},
        {"data: a\r\n\r\ndata: b\r\n\r\n", 1, 2, "data: a\r\n\r\n", 0},
        {"event: x\ndata: {}\n\ndata: par", 4, 1, "event: x\ndata: {}\n\n", 9},
        {"data: [DONE]\n\n", 100, 1, "data: [DONE]\n\n", 0},
        {"data: no end yet\n", 2, 0, "", 17},
    };
    return cr_make_param_array(struct split_case, cases, sizeof(cases) / sizeof(cases[0]));
}

ParameterizedTest(struct split_case *tc, sse, split_any_piece_size, .timeout = 5)
{
    struct buf b = {0};
    struct collected got = {0};
    size_t len = strlen(tc->stream), scanned = 0;

    for (size_t off = 0; off < len; off += tc->step) {
        size_t n = len - off < tc->step ? len - off : tc->step;
        cr_assert_eq(buf_append(&b, tc->stream + off, n), 0);
        cr_assert_eq(router__sse_split(&b, &scanned, collect, &got), 0);
        cr_assert_eq(scanned, b.len);
    }
    cr_assert_eq(got.n, tc->events, "events: got %d want %d for %s", got.n, tc->events, tc->stream);
    if (tc->events > 0)
        cr_assert_str_eq(got.events[0], tc->first);
    cr_assert_eq(b.len, tc->tail);
    buf_free(&b);
}

Test(sse, data_payload_is_found_after_other_fields, .timeout = 5)
{
    const char ev[] = "event: message\r\nid: 7\r\ndata: {\"x\":1}\r\n\r\n";
    const char *data;
    size_t len;

    cr_assert(router__sse_data(ev, sizeof(ev) - 1, &data, &len));
    cr_assert_eq(len, 7);
    cr_assert_eq(memcmp(data, "{\"x\":1}", 7), 0);
    cr_assert_not(router__sse_data(": comment\n\n", 12, &data, &len));
}

Test(usage, final_stream_chunk_with_empty_choices, .timeout = 5)
{
    const char js[] = "{\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,"
                      "\"completion_tokens\":34,\"total_tokens\":46,"
                      "\"prompt_tokens_details\":{\"cached_tokens\":8}}}";
    struct router__usage u;
    int empty;

    cr_assert(router__usage_parse(js, sizeof(js) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, 12);
    cr_assert_eq(u.completion_tokens, 34);
    cr_assert_eq(u.cached_tokens, 8);
    cr_assert(empty);
}

Test(usage, null_usage_and_no_usage_are_not_found, .timeout = 5)
{
    const char with_null[] = "{\"choices\":[{\"delta\":{}}],\"usage\":null}";
    const char without[] = "{\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}";
    struct router__usage u;
    int empty;

    cr_assert_not(router__usage_parse(with_null, sizeof(with_null) - 1, &u, &empty));
    cr_assert_not(empty);
    cr_assert_not(router__usage_parse(without, sizeof(without) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, -1);
}

/* The shortcut for chunks ending in "usage":null} takes only a top-level
 * null: a nested one at the end leaves the real usage object found. */
Test(usage, only_a_top_level_null_usage_ends_the_search, .timeout = 5)
{
    const char nested[] = "{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6},"
                          "\"meta\":{\"usage\":null}}";
    const char spaced[] = "{\"choices\":[],\"usage\":null} \r\n";
    struct router__usage u;
    int empty;

    cr_assert(router__usage_parse(nested, sizeof(nested) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, 5);
    cr_assert_eq(u.completion_tokens, 6);
    cr_assert_not(router__usage_parse(spaced, sizeof(spaced) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, -1);
}

/* Only the root object's own "usage" counts: a member of that name in a
 * nested object before or after it (a provider's extension, a tool's
 * result) or in a key that merely ends in it is not the bill; members
 * after the usage (OpenAI's system_fingerprint) do not hide it. */
Test(usage, a_nested_usage_before_the_top_level_one_is_passed_over, .timeout = 5)
{
    const char nested[] = "{\"choices\":[{\"message\":{\"content\":\"hi\","
                          "\"usage\":{\"prompt_tokens\":900,\"completion_tokens\":900}}}],"
                          "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}";
    const char escaped[] = "{\"say \\\"usage\":{\"prompt_tokens\":900},"
                           "\"text\":\"\\\"usage\\\":{\",\"usage\" : {\"prompt_tokens\":7}}";
    const char only_nested[] = "{\"meta\":{\"usage\":{\"prompt_tokens\":900}},\"usage\":null}";
    const char nested_after[] = "{\"usage\":{\"prompt_tokens\":5},"
                                "\"meta\":{\"usage\":{\"prompt_tokens\":900}}}";
    const char members_after[] = "{\"usage\":{\"prompt_tokens\":5,\"prompt_tokens_details\":"
                                 "{\"cached_tokens\":1}},\"system_fingerprint\":\"fp_}\"}";
    struct router__usage u;
    int empty;

    cr_assert(router__usage_parse(nested, sizeof(nested) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, 5);
    cr_assert_eq(u.completion_tokens, 6);
    cr_assert_not(empty);
    cr_assert(router__usage_parse(escaped, sizeof(escaped) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, 7);
    cr_assert_eq(u.completion_tokens, -1);
    cr_assert_not(router__usage_parse(only_nested, sizeof(only_nested) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, -1);
    cr_assert(router__usage_parse(nested_after, sizeof(nested_after) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, 5);
    cr_assert(router__usage_parse(members_after, sizeof(members_after) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, 5);
    cr_assert_eq(u.cached_tokens, 1);
}

/* The usage-only chunk is told by the root's "choices" being empty, not by
 * an empty "choices" array further in. */
Test(usage, only_the_top_level_choices_decide_the_usage_only_chunk, .timeout = 5)
{
    const char js[] = "{\"meta\":{\"choices\":[]},\"choices\":[{\"delta\":{}}],"
                      "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
    const char spaced[] = "{\"choices\" : [ \n ],\"usage\":{\"prompt_tokens\":1}}";
    struct router__usage u;
    int empty;

    cr_assert(router__usage_parse(js, sizeof(js) - 1, &u, &empty));
    cr_assert_not(empty);
    cr_assert(router__usage_parse(spaced, sizeof(spaced) - 1, &u, &empty));
    cr_assert(empty);
}

/* A broken or hostile upstream: counts that are not counts are unknown
 * (the router then charges its own counts), never cast out of range. */
Test(usage, counts_out_of_range_are_unknown, .timeout = 5)
{
    const char some[] = "{\"usage\":{\"prompt_tokens\":1e300,\"completion_tokens\":7,"
                        "\"prompt_tokens_details\":{\"cached_tokens\":2e12}}}";
    const char none[] = "{\"usage\":{\"prompt_tokens\":-3,\"completion_tokens\":1e999}}";
    struct router__usage u;
    int empty;

    cr_assert(router__usage_parse(some, sizeof(some) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, -1);
    cr_assert_eq(u.completion_tokens, 7);
    cr_assert_eq(u.cached_tokens, -1);
    cr_assert_not(router__usage_parse(none, sizeof(none) - 1, &u, &empty));
    cr_assert_eq(u.prompt_tokens, -1);
    cr_assert_eq(u.completion_tokens, -1);
}

/* ---- the usage of an answer too big to hold (router/bigusage.c) ---- */

/* Feed `json` to a reader in pieces of `step` bytes, as reads would
 * bring it; the last result, and the usage read when it is 1. */
static int big_usage_of(const char *json, size_t step, struct router__usage *u)
{
    struct router__bigusage *b = router__bigusage_new(NULL, NULL);
    size_t len = strlen(json), tlen;
    const char *text;
    int rc = 0;

    cr_assert_not_null(b);
    for (size_t off = 0; off < len && rc == 0; off += step)
        rc = router__bigusage_feed(b, json + off, len - off < step ? len - off : step);
    u->prompt_tokens = u->completion_tokens = u->cached_tokens = -1;
    if (rc == 1) {
        text = router__bigusage_text(b, &tlen);
        cr_assert(router__usage_parse(text, tlen, u, NULL), "%.*s", (int)tlen, text);
    }
    router__bigusage_free(b);
    return rc;
}

/* The root's usage is found whatever the split, past a nested "usage"
 * and those bytes written inside a string, with its numbers as written. */
Test(bigusage, only_the_root_usage_is_read_whatever_the_split, .timeout = 5)
{
    const char js[] = "{\"choices\":[{\"message\":{"
                      "\"content\":\"say \\\"usage\\\":{\\\"prompt_tokens\\\":1}\","
                      "\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}}],"
                      "\"meta\":{\"usage\":{\"prompt_tokens\":4}},"
                      "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,"
                      "\"prompt_tokens_details\":{\"cached_tokens\":8,\"x\":[1,true,null,\"s\"]}}}";
    struct router__usage u;

    for (size_t step = 1; step <= sizeof(js); step += 7) {
        cr_assert_eq(big_usage_of(js, step, &u), 1, "step %zu", step);
        cr_assert_eq(u.prompt_tokens, 12, "step %zu", step);
        cr_assert_eq(u.completion_tokens, 34, "step %zu", step);
        cr_assert_eq(u.cached_tokens, 8, "step %zu", step);
    }
}

/* No root usage, text that is not JSON, a root that is an array and
 * nesting deeper than any answer: no usage, never a crash. */
Test(bigusage, no_usage_is_read_where_the_root_has_none, .timeout = 5)
{
    struct router__usage u;
    char deep[200];

    cr_assert_eq(big_usage_of("{\"choices\":[{\"usage\":{\"prompt_tokens\":1}}]}", 5, &u), 0);
    cr_assert_eq(big_usage_of("not json {\"usage\":{\"prompt_tokens\":1}}", 5, &u), -1);
    cr_assert_eq(big_usage_of("[{\"usage\":{\"prompt_tokens\":1}}]", 5, &u), 0);
    memset(deep, '[', sizeof(deep) - 1);
    deep[sizeof(deep) - 1] = '\0';
    cr_assert_eq(big_usage_of(deep, 5, &u), -1);
    cr_assert_eq(u.prompt_tokens, -1);
}

/* What the reader keeps is bounded: a usage over 4 KiB is absurd and
 * ignored, and a token over 4 MiB ends the reading before it is whole. */
Test(bigusage, a_huge_usage_or_token_is_given_up, .timeout = 10)
{
    size_t n = 5u << 20;
    char *js = malloc(n + 64);
    struct router__usage u;
    size_t at;

    cr_assert_not_null(js);
    strcpy(js, "{\"usage\":{\"prompt_tokens\":1,\"x\":\"");
    at = strlen(js);
    memset(js + at, 'a', 5000);
    strcpy(js + at + 5000, "\"}}");
    cr_assert_eq(big_usage_of(js, 4096, &u), -1);
    strcpy(js, "{\"choices\":\"");
    memset(js + 12, 'a', n);
    strcpy(js + 12 + n, "\",\"usage\":{\"prompt_tokens\":1}}");
    cr_assert_eq(big_usage_of(js, 64 * 1024, &u), -1);
    /* The same, 1 MiB long, is read through. */
    strcpy(js + 12 + (1u << 20), "\",\"usage\":{\"prompt_tokens\":1}}");
    cr_assert_eq(big_usage_of(js, 64 * 1024, &u), 1);
    cr_assert_eq(u.prompt_tokens, 1);
    free(js);
}

/* The usage read is kept as {"usage":...} in 4 KiB: one that fills them
 * exactly is read, one byte more (its last brace) is given up, not read
 * cut short. */
Test(bigusage, a_usage_of_exactly_4_kib_is_read_one_byte_more_is_not, .timeout = 5)
{
    /* {"usage":{"prompt_tokens":7,"x":"aa...a"}}: 36 bytes and the a's. */
    static const char head[] = "{\"usage\":{\"prompt_tokens\":7,\"x\":\"";
    char js[4200];
    struct router__usage u;

    for (size_t total = 4095; total <= 4097; total++) {
        size_t k = total - 36;
        int rc;

        strcpy(js, head);
        memset(js + sizeof(head) - 1, 'a', k);
        strcpy(js + sizeof(head) - 1 + k, "\"}}");
        rc = big_usage_of(js, 100, &u);
        cr_assert_eq(rc, total <= 4096 ? 1 : -1, "a usage of %zu bytes: %d", total, rc);
        cr_assert_eq(u.prompt_tokens, total <= 4096 ? 7 : -1, "a usage of %zu bytes", total);
    }
}

/* The texts handed over for counting, joined with '|' ('#' for a token id). */
static void join_text(void *arg, const char *text, size_t len)
{
    char *out = arg;

    strcat(out, "|");
    strncat(out, text ? text : "#", text ? len : 1);
}

/* Feed `js` (no usage in it) 3 bytes at a time to a reader that joins
 * the texts it hands over into got, each after a '|' ('#' for a number). */
static void texts_handed_over(const char *js, char *got)
{
    struct router__bigusage *b = router__bigusage_new(join_text, got);

    cr_assert_not_null(b);
    for (size_t off = 0, len = strlen(js); off < len; off += 3)
        cr_assert_eq(router__bigusage_feed(b, js + off, len - off < 3 ? len - off : 3), 0);
    router__bigusage_free(b);
}

/* An answer without usage is counted from the texts a held body's count
 * reads (choices' text, message content, tool call arguments; an array
 * of strings and token ids), decoded, and nothing else: not the same
 * names elsewhere, not logprobs, not keys. */
Test(bigusage, the_answered_texts_are_handed_over_to_be_counted, .timeout = 5)
{
    const char js[] =
        "{\"content\":\"no\",\"choices\":[{\"text\":\"t\\u00e9\","
        "\"logprobs\":{\"content\":[{\"token\":\"x\"}]},"
        "\"message\":{\"content\":[\"c1\",7,[\"c2\"],{\"text\":\"no\"}],"
        "\"tool_calls\":[{\"function\":"
        "{\"name\":\"no\",\"arguments\":\"{}\"}}]}},{\"message\":{\"content\":\"second\"}}],"
        "\"meta\":{\"text\":\"no\",\"choices\":[{\"text\":\"no\"}]}}";
    char got[256] = "";

    texts_handed_over(js, got);
    cr_assert_str_eq(got, "|t\xc3\xa9|c1|#|c2|{}|second");
}

/* Only those names, whole, lead to a text: "tex" and "con" are not
 * "text" and "content", and a number where a text is (not in an array
 * of token ids) is no text, as a held body's count has it. */
Test(bigusage, a_prefix_of_a_name_or_a_bare_number_is_not_counted, .timeout = 5)
{
    const char js[] = "{\"choices\":[{\"tex\":\"no\",\"text\":5,\"message\":{\"con\":\"no\","
                      "\"content\":7,\"tool_calls\":[{\"function\":{\"arg\":\"no\","
                      "\"arguments\":9}}]}},{\"text\":\"yes\"}]}";
    char got[256] = "";
    struct router__bigusage *b = router__bigusage_new(join_text, got);

    cr_assert_not_null(b);
    cr_assert_eq(router__bigusage_feed(b, js, sizeof(js) - 1), 0);
    router__bigusage_free(b);
    cr_assert_str_eq(got, "|yes");
}

/* Strings that are not UTF-8 (a Latin-1 answer) are the client's affair:
 * the usage after them is still read. */
Test(bigusage, a_string_that_is_not_utf8_does_not_lose_the_usage, .timeout = 5)
{
    struct router__usage u;

    cr_assert_eq(big_usage_of("{\"choices\":[{\"text\":\"caf\xe9 \xff\"}],"
                              "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}",
                              7, &u),
                 1);
    cr_assert_eq(u.prompt_tokens, 3);
    cr_assert_eq(u.completion_tokens, 4);
}

/* The 8 MiB held before an answer is known to be too big come in one
 * piece: a token over 4 MiB in them is given up all the same, not
 * waited for whole. */
Test(bigusage, a_huge_token_given_in_one_piece_is_given_up, .timeout = 10)
{
    size_t n = 5u << 20;
    char *js = malloc(n + 64);
    struct router__usage u;

    cr_assert_not_null(js);
    strcpy(js, "{\"choices\":\"");
    memset(js + 12, 'a', n);
    strcpy(js + 12 + n, "\",\"usage\":{\"prompt_tokens\":1}}");
    cr_assert_eq(big_usage_of(js, n + 64, &u), -1);
    cr_assert_eq(u.prompt_tokens, -1);
    free(js);
}

/* Nesting is read 64 deep (the root included), and no deeper: the
 * frames the reader keeps are that many. */
Test(bigusage, nesting_is_read_64_deep_and_no_deeper, .timeout = 5)
{
    char js[512];
    struct router__usage u;

    for (int depth = 63; depth <= 65; depth++) {
        size_t o = 0;

        o += (size_t)snprintf(js + o, sizeof(js) - o, "{\"a\":");
        for (int i = 1; i < depth; i++)
            js[o++] = '[';
        for (int i = 1; i < depth; i++)
            js[o++] = ']';
        snprintf(js + o, sizeof(js) - o, ",\"usage\":{\"prompt_tokens\":5}}");
        cr_assert_eq(big_usage_of(js, 16, &u), depth <= 64 ? 1 : -1, "%d deep", depth);
        cr_assert_eq(u.prompt_tokens, depth <= 64 ? 5 : -1, "%d deep", depth);
    }
}

/* ---- the Responses API (POST /v1/responses) ---- */

/* Its usage names mean what chat's do, in a held body and in one too big
 * to hold alike: input, output and cached input tokens. */
Test(usage, the_responses_names_are_read_as_chat_names, .timeout = 5)
{
    const char js[] = "{\"id\":\"resp_1\",\"object\":\"response\",\"output\":[],"
                      "\"usage\":{\"input_tokens\":12,\"input_tokens_details\":{\"cached_tokens\":8},"
                      "\"output_tokens\":34,\"output_tokens_details\":{\"reasoning_tokens\":30},"
                      "\"total_tokens\":46}}";
    struct router__usage u;

    cr_assert(router__usage_parse(js, sizeof(js) - 1, &u, NULL));
    cr_assert_eq(u.prompt_tokens, 12);
    cr_assert_eq(u.completion_tokens, 34);
    cr_assert_eq(u.cached_tokens, 8);
    cr_assert_eq(big_usage_of(js, 5, &u), 1);
    cr_assert_eq(u.prompt_tokens, 12);
    cr_assert_eq(u.completion_tokens, 34);
    cr_assert_eq(u.cached_tokens, 8);
}

/* A stream's usage is its terminal event's response.usage; the events
 * before carry "usage": null, the deltas none, and a "usage" of the
 * event's own beside the response is not the answer's. */
Test(usage, a_responses_stream_has_its_usage_in_the_terminal_event, .timeout = 5)
{
    static const struct {
        const char *data; /* the event's data */
        int found;        /* usage read */
        int delta;        /* a text delta */
    } cases[] = {
        {"{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"r\","
         "\"usage\":null}}", 0, 0},
        {"{\"type\":\"response.output_text.delta\",\"delta\":\"usage\"}", 0, 1},
        {"{\"type\":\"response.output_text.done\",\"text\":\"\\\"usage\\\":{}\"}", 0, 0},
        {"{\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,"
         "\"output_tokens\":7}},\"sequence_number\":9}", 1, 0},
        {"{\"type\":\"response.incomplete\",\"sequence_number\":9,\"response\":{\"output\":"
         "[{\"usage\":{\"input_tokens\":1}}],\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}}",
         1, 0},
        {"{\"type\":\"response.failed\",\"response\":{\"usage\":{\"input_tokens\":5,"
         "\"output_tokens\":7}}}", 1, 0},
        {"{\"type\":\"response.completed\",\"response\":{\"usage\":null},"
         "\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}", 0, 0},
        {"{\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5", 0, 0},
    };
    struct router__usage u;
    int delta, search;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int found = router__responses_event(cases[i].data, strlen(cases[i].data), &u, &delta,
                                            &search);

        cr_assert_eq(found, cases[i].found, "case %zu", i);
        cr_assert_eq(delta, cases[i].delta, "case %zu", i);
        cr_assert_eq(search, 0, "case %zu", i);
        if (found) {
            cr_assert_eq(u.prompt_tokens, 5, "case %zu", i);
            cr_assert_eq(u.completion_tokens, 7, "case %zu", i);
        }
    }
}

/* ---- service tiers ---- */

/* The tier an answer names: the root's "service_tier", after the usage
 * in a whole answer, before the choices in a stream's chunk; not one in
 * a nested object or in a string; any name but flex and priority is the
 * standard tier; not a string, or none, is unknown (-1). */
Test(usage, the_answers_service_tier_is_the_roots, .timeout = 5)
{
    static const struct {
        const char *json;
        int tier;
    } cases[] = {
        {"{\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1},"
         "\"service_tier\":\"flex\",\"system_fingerprint\":null}\n", CONF_TIER_FLEX},
        {"{\"id\":\"c\",\"model\":\"m\",\"service_tier\":\"priority\",\"choices\":[{\"delta\":"
         "{\"content\":\"hi\"}}],\"usage\":null}", CONF_TIER_PRIORITY},
        {"{\"service_tier\":\"default\",\"choices\":[]}", CONF_TIER_STANDARD},
        {"{\"service_tier\":\"scale\"}", CONF_TIER_STANDARD},
        {"{\"service_tier\":\"flexible\"}", CONF_TIER_STANDARD},
        {"{\"service_tier\":\"priority\",\"choices\":[{\"service_tier\":\"flex\"}]}",
         CONF_TIER_PRIORITY},
        {"{\"choices\":[{\"message\":{\"service_tier\":\"flex\"}}]}", -1},
        {"{\"choices\":[{\"text\":\"\\\"service_tier\\\":\\\"flex\\\"\"}]}", -1},
        {"{\"service_tier\":null}", -1},
        {"{\"service_tier\":2}", -1},
        {"{\"service_tier\":\"flex", -1},
        {"[\"service_tier\",\"flex\"]", -1},
        {"", -1},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        cr_assert_eq(router__service_tier(cases[i].json, strlen(cases[i].json)), cases[i].tier,
                     "case %zu: %s", i, cases[i].json);
}

/* A Responses stream names it in its terminal event's response object,
 * not in the event itself. */
Test(usage, a_responses_stream_names_its_tier_in_the_terminal_event, .timeout = 5)
{
    static const char completed[] =
        "{\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":[],"
        "\"service_tier\":\"flex\",\"usage\":{\"input_tokens\":5}},\"sequence_number\":9}";
    static const char created[] =
        "{\"type\":\"response.created\",\"response\":{\"service_tier\":\"flex\"}}";
    static const char outside[] =
        "{\"type\":\"response.completed\",\"service_tier\":\"flex\",\"response\":{}}";

    cr_assert_eq(router__responses_tier(completed, sizeof(completed) - 1), CONF_TIER_FLEX);
    cr_assert_eq(router__responses_tier(created, sizeof(created) - 1), -1, "not terminal");
    cr_assert_eq(router__responses_tier(outside, sizeof(outside) - 1), -1, "not the response's");
}

/* Anthropic's usage names its cache reads and writes beside input_tokens
 * (which counts neither); read as they are, proxy.c adds them up. */
Test(usage, an_anthropic_body_has_its_cache_reads_and_writes, .timeout = 5)
{
    const char js[] = "{\"id\":\"msg_1\",\"type\":\"message\",\"content\":[{\"type\":\"text\","
                      "\"text\":\"\\\"usage\\\":{}\"}],\"usage\":{\"input_tokens\":12,"
                      "\"cache_creation_input_tokens\":30,\"cache_read_input_tokens\":8,"
                      "\"cache_creation\":{\"ephemeral_5m_input_tokens\":18,"
                      "\"ephemeral_1h_input_tokens\":12},\"output_tokens\":34}}";
    struct router__usage u;

    cr_assert(router__usage_parse(js, sizeof(js) - 1, &u, NULL));
    cr_assert_eq(u.prompt_tokens, 12);
    cr_assert_eq(u.completion_tokens, 34);
    cr_assert_eq(u.cached_tokens, 8);
    cr_assert_eq(u.cache_write_tokens, 30);
    cr_assert_eq(u.cache_write_1h_tokens, 12);
}

/* An Anthropic stream: the input counts in message_start's message (its
 * output_tokens, the count so far, left out), the output count in
 * message_delta's own usage; text and tool-input deltas stand for
 * tokens, no other event does. */
Test(usage, an_anthropic_stream_has_its_usage_in_message_start_and_message_delta, .timeout = 5)
{
    static const struct {
        const char *data; /* the event's data */
        int found;        /* usage read */
        int delta;        /* a content delta */
        int64_t prompt, completion, read, write; /* when found */
    } cases[] = {
        {"{\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"content\":[],\"usage\":"
         "{\"input_tokens\":5,\"cache_creation_input_tokens\":3,\"cache_read_input_tokens\":2,"
         "\"output_tokens\":1}}}", 1, 0, 5, -1, 2, 3},
        {"{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\","
         "\"text\":\"\"}}", 0, 0, 0, 0, 0, 0},
        {"{\"type\":\"ping\"}", 0, 0, 0, 0, 0, 0},
        {"{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\","
         "\"text\":\"usage\"}}", 0, 1, 0, 0, 0, 0},
        {"{\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":"
         "\"input_json_delta\",\"partial_json\":\"{\\\"a\\\"\"}}", 0, 1, 0, 0, 0, 0},
        {"{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\","
         "\"thinking\":\"hm\"}}", 0, 0, 0, 0, 0, 0},
        {"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":"
         "{\"output_tokens\":15}}", 1, 0, -1, 15, -1, -1},
        {"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":"
         "{\"input_tokens\":6,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":4,"
         "\"output_tokens\":15}}", 1, 0, 6, 15, 4, 0},
        {"{\"type\":\"message_stop\"}", 0, 0, 0, 0, 0, 0},
        {"{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"x\"}}", 0,
         0, 0, 0, 0, 0},
        {"{\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5", 0, 0, 0, 0,
         0, 0},
    };
    struct router__usage u;
    int delta, done;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int found = router__messages_event(cases[i].data, strlen(cases[i].data), &u, &delta,
                                           &done);

        cr_assert_eq(found, cases[i].found, "case %zu", i);
        cr_assert_eq(delta, cases[i].delta, "case %zu", i);
        cr_assert_eq(done, 0, "case %zu", i);
        if (!found)
            continue;
        cr_assert_eq(u.prompt_tokens, cases[i].prompt, "case %zu", i);
        cr_assert_eq(u.completion_tokens, cases[i].completion, "case %zu", i);
        cr_assert_eq(u.cached_tokens, cases[i].read, "case %zu", i);
        cr_assert_eq(u.cache_write_tokens, cases[i].write, "case %zu", i);
    }
}

/* Anthropic's web searches are in usage.server_tool_use, a count beside
 * the tokens: read from a whole body, from both events of a stream
 * (message_start says 0, message_delta the answer's count), and from an
 * answer too big to hold. A usage that does not say, or says something
 * that is no count, gives -1: billed as no search, and a later event
 * without it keeps the count an earlier one gave. */
Test(usage, an_anthropic_usage_has_its_web_searches, .timeout = 5)
{
    static const struct {
        const char *json; /* a whole body, or an event's data (event = 1) */
        int event;
        int64_t searches; /* read */
    } cases[] = {
        {"{\"type\":\"message\",\"content\":[{\"type\":\"server_tool_use\",\"name\":"
         "\"web_search\"}],\"usage\":{\"input_tokens\":12,\"output_tokens\":34,"
         "\"server_tool_use\":{\"web_search_requests\":3}}}", 0, 3},
        {"{\"usage\":{\"input_tokens\":12,\"output_tokens\":34}}", 0, -1},
        {"{\"usage\":{\"input_tokens\":1,\"output_tokens\":1,\"server_tool_use\":{}}}", 0,
         -1},
        {"{\"usage\":{\"input_tokens\":1,\"output_tokens\":1,\"server_tool_use\":"
         "{\"web_search_requests\":-2}}}", 0, -1},
        {"{\"usage\":{\"input_tokens\":1,\"output_tokens\":1,\"server_tool_use\":"
         "{\"web_search_requests\":\"3\"}}}", 0, -1},
        {"{\"usage\":{\"input_tokens\":1,\"output_tokens\":1,\"server_tool_use\":"
         "{\"web_search_requests\":0}}}", 0, 0},
        {"{\"usage\":{\"input_tokens\":1,\"output_tokens\":1,"
         "\"web_search_requests\":5}}", 0, -1}, /* not where Anthropic puts it */
        {"{\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"content\":[],\"usage\":"
         "{\"input_tokens\":5,\"output_tokens\":1,\"server_tool_use\":"
         "{\"web_search_requests\":0}}}}", 1, 0},
        {"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":"
         "{\"output_tokens\":15,\"server_tool_use\":{\"web_search_requests\":4}}}", 1, 4},
        {"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":"
         "{\"output_tokens\":15}}", 1, -1},
    };
    struct router__usage u;
    int delta, done;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *js = cases[i].json;
        int found = cases[i].event ? router__messages_event(js, strlen(js), &u, &delta, &done)
                                   : router__usage_parse(js, strlen(js), &u, NULL);

        cr_assert(found, "case %zu", i);
        cr_assert_eq(u.web_searches, cases[i].searches, "case %zu: %lld", i,
                     (long long)u.web_searches);
        if (cases[i].event)
            continue;
        for (size_t step = 1; step <= strlen(js); step += 5) {
            cr_assert_eq(big_usage_of(js, step, &u), 1, "case %zu step %zu", i, step);
            cr_assert_eq(u.web_searches, cases[i].searches, "case %zu step %zu (big)", i, step);
        }
    }
}

/* A stream shows each web search Claude makes as it starts: the
 * content_block_start of a server_tool_use block named web_search (not
 * another server tool's, nor a text block or its deltas). */
Test(usage, an_anthropic_stream_shows_its_web_searches_as_they_start, .timeout = 5)
{
    static const struct {
        const char *data;
        int done;
    } cases[] = {
        {"{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":"
         "\"server_tool_use\",\"id\":\"srvtoolu_1\",\"name\":\"web_search\",\"input\":{}}}",
         ROUTER_CALL_WEB_SEARCH},
        {"{\"index\":2,\"content_block\":{\"input\":{},\"name\":\"web_search\",\"type\":"
         "\"server_tool_use\"},\"type\":\"content_block_start\"}", ROUTER_CALL_WEB_SEARCH},
        {"{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":"
         "\"server_tool_use\",\"name\":\"web_fetch\",\"input\":{}}}", 0},
        {"{\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":"
         "\"web_search_tool_result\",\"tool_use_id\":\"srvtoolu_1\",\"content\":[]}}", 0},
        {"{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":"
         "\"tool_use\",\"name\":\"web_search\",\"input\":{}}}", 0},
        {"{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\","
         "\"text\":\"\\\"server_tool_use\\\" web_search\"}}", 0},
        {"{\"type\":\"content_block_stop\",\"index\":0}", 0},
    };
    struct router__usage u;
    int delta, done;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cr_assert_eq(router__messages_event(cases[i].data, strlen(cases[i].data), &u, &delta,
                                            &done),
                     0, "case %zu", i);
        cr_assert_eq(done, cases[i].done, "case %zu", i);
    }
}

/* A usage may say what the request cost: OpenRouter's "cost" (a number
 * of USD), Perplexity's "cost" object by its "total_cost"; not a number,
 * negative or past ROUTER_REPORTED_USD_MAX is none (-1). Read from a held
 * body and from an answer too big to hold alike. */
Test(usage, a_reported_cost_is_read_from_the_usage, .timeout = 5)
{
    static const struct {
        const char *json;
        double cost;
    } cases[] = {
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"cost\":0.012345}}", 0.012345},
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"cost\":0}}", 0},
        {"{\"usage\":{\"input_tokens\":5,\"output_tokens\":7,\"cost\":{\"input_tokens_cost\":1,"
         "\"request_cost\":0.005,\"total_cost\":0.0075}}}", 0.0075},
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"cost\":{\"request_cost\":1}}}",
         -1},
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}", -1},
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"cost\":-0.5}}", -1},
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"cost\":\"0.5\"}}", -1},
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"cost\":10000.5}}", -1},
        {"{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"cost\":10000}}", 10000},
        {"{\"cost\":3,\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}", -1},
    };
    struct router__usage u;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *js = cases[i].json;

        cr_assert(router__usage_parse(js, strlen(js), &u, NULL), "case %zu", i);
        cr_assert_float_eq(u.cost_usd, cases[i].cost, 1e-15, "case %zu: %g", i, u.cost_usd);
        for (size_t step = 1; step <= strlen(js); step += 7) {
            cr_assert_eq(big_usage_of(js, step, &u), 1, "case %zu step %zu", i, step);
            cr_assert_float_eq(u.cost_usd, cases[i].cost, 1e-15, "case %zu step %zu (big)", i,
                               step);
        }
    }
}

/* The web and file search calls of an answer too big to hold, read at
 * every split. */
static struct router__calls big_calls_of(const char *json, size_t step)
{
    struct router__bigusage *b = router__bigusage_new(NULL, NULL);
    size_t len = strlen(json);
    struct router__calls n;

    cr_assert_not_null(b);
    for (size_t off = 0; off < len; off += step)
        router__bigusage_feed(b, json + off, len - off < step ? len - off : step);
    n = router__bigusage_calls(b);
    router__bigusage_free(b);
    return n;
}

/* OpenAI bills a Responses answer's web searches and file searches per
 * call, and no usage says how many: the answer's root "output" has an
 * item of type web_search_call or file_search_call for each, found
 * wherever "type" stands in the item and whatever white space and
 * whatever items that are no objects stand before it, but not in a nested
 * "output" or array, an item of another type, a content part, or inside a
 * string. The same counts from a held body and from an answer too big to
 * hold, whatever the split (that reader counts no more than it has read:
 * -1 is 0 there). */
Test(usage, a_responses_answer_counts_its_web_and_file_search_calls, .timeout = 5)
{
    static const struct {
        const char *json;
        int64_t web, file;
    } cases[] = {
        {"{\"object\":\"response\",\"output\":[{\"type\":\"web_search_call\",\"id\":\"ws_1\","
         "\"status\":\"completed\",\"action\":{\"type\":\"search\",\"query\":\"q\"}},"
         "{\"id\":\"ws_2\",\"status\":\"completed\",\"type\":\"web_search_call\"},"
         "{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"hi\"}]}],"
         "\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}", 2, 0},
        {"{\"output\" : [ {\"type\" : \"web_search_call\"} ,\n {\"type\":\"web_search_call\"}\t],"
         "\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}", 2, 0},
        {"{\"object\":\"response\",\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}", -1, -1},
        {"{\"output\":[],\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}", 0, 0},
        {"{\"output\":null}", -1, -1},
        {"{\"meta\":{\"output\":[{\"type\":\"web_search_call\"}]},\"output\":[{\"type\":"
         "\"message\",\"content\":[{\"type\":\"web_search_call\"}]},{\"type\":"
         "\"web_search_call_x\"},{\"type\":\"file_search_callx\"},{\"type\":\"message\","
         "\"text\":\"\\\"type\\\":\\\"web_search_call\\\"\"}]}", 0, 0},
        {"{\"output\":[{\"type\":\"web_search_call\"},{\"type\":\"web_search_call\"},"
         "{\"type\":\"message\"},{\"type\":\"web_search_call\"}]}", 3, 0},
        {"{\"output\":[1, \"]\", null,[{\"type\":\"web_search_call\"}],-2.5e3 ,"
         "{\"type\":\"web_search_call\"}]}", 1, 0},
        {"{\"output\":[{\"id\":\"fs_1\",\"type\":\"file_search_call\",\"queries\":[\"q\"],"
         "\"results\":null},{\"type\":\"web_search_call\"},{\"type\":\"file_search_call\"},"
         "{\"type\":\"message\",\"content\":[{\"type\":\"file_search_call\"}]}],"
         "\"meta\":{\"type\":\"file_search_call\"}}", 1, 2},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *js = cases[i].json;
        struct router__calls got;

        router__responses_searches(js, strlen(js), &got);
        cr_assert_eq(got.web, cases[i].web, "case %zu", i);
        cr_assert_eq(got.file, cases[i].file, "case %zu", i);
        for (size_t step = 1; step <= strlen(js); step += 3) {
            got = big_calls_of(js, step);
            cr_assert_eq(got.web, MAX(cases[i].web, 0), "case %zu step %zu (big)", i, step);
            cr_assert_eq(got.file, MAX(cases[i].file, 0), "case %zu step %zu (big)", i, step);
        }
    }
}

/* A stream shows each web or file search call when it is done
 * (response.output_item.done; added is not done) and all of them in its
 * terminal event's response, whose counts come with the usage. */
Test(usage, a_responses_stream_shows_its_search_calls, .timeout = 5)
{
    static const struct {
        const char *data;
        int done;         /* a call done: ROUTER_CALL_WEB_SEARCH or _FILE_SEARCH */
        int found;        /* usage read */
        int64_t searches; /* the terminal event's counts */
        int64_t file_searches;
    } cases[] = {
        {"{\"type\":\"response.output_item.added\",\"output_index\":0,\"item\":{\"type\":"
         "\"web_search_call\",\"status\":\"in_progress\"}}", 0, 0, -1, -1},
        {"{\"type\":\"response.output_item.done\",\"sequence_number\":2,\"output_index\":0,"
         "\"item\":{\"id\":\"ws_1\",\"type\":\"web_search_call\",\"status\":\"completed\"}}",
         ROUTER_CALL_WEB_SEARCH, 0, -1, -1},
        {"{\"type\":\"response.output_item.done\",\"output_index\":1,\"item\":{\"id\":"
         "\"fs_1\",\"type\":\"file_search_call\",\"status\":\"completed\",\"queries\":[]}}",
         ROUTER_CALL_FILE_SEARCH, 0, -1, -1},
        {"{\"type\":\"response.output_item.done\",\"item\":{\"type\":\"message\",\"content\":"
         "[{\"type\":\"web_search_call\"}]}}", 0, 0, -1, -1},
        {"{\"type\":\"response.web_search_call.completed\",\"item_id\":\"ws_1\"}", 0, 0, -1, -1},
        {"{\"type\":\"response.file_search_call.completed\",\"item_id\":\"fs_1\"}", 0, 0, -1,
         -1},
        {"{\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":"
         "\"web_search_call\"},{\"type\":\"file_search_call\"},{\"type\":\"web_search_call\"},"
         "{\"type\":\"message\"}],\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}}",
         0, 1, 2, 1},
        {"{\"type\":\"response.completed\",\"output\":[{\"type\":\"web_search_call\"}],"
         "\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}}", 0, 1, -1, -1},
    };
    struct router__usage u;
    int delta, done;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *js = cases[i].data;
        int found = router__responses_event(js, strlen(js), &u, &delta, &done);

        cr_assert_eq(found, cases[i].found, "case %zu", i);
        cr_assert_eq(done, cases[i].done, "case %zu", i);
        cr_assert_eq(u.web_searches, cases[i].searches, "case %zu: %lld", i,
                     (long long)u.web_searches);
        cr_assert_eq(u.file_searches, cases[i].file_searches, "case %zu: %lld", i,
                     (long long)u.file_searches);
        cr_assert_eq(delta, 0, "case %zu", i);
    }
}

/* An answer too big to hold without usage is counted from the output's
 * message text parts and function call arguments, as a held one is. */
Test(bigusage, a_responses_answer_hands_over_its_output_texts, .timeout = 5)
{
    const char js[] = "{\"object\":\"response\",\"instructions\":\"no\",\"output\":["
                      "{\"type\":\"reasoning\",\"summary\":[{\"type\":\"summary_text\",\"text\":\"no\"}]},"
                      "{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":"
                      "\"output_text\",\"text\":\"hi\",\"annotations\":[]},{\"type\":\"output_text\","
                      "\"text\":\"there\"}]},"
                      "{\"type\":\"function_call\",\"name\":\"no\",\"arguments\":\"{}\"}]}";
    char got[256] = "";

    texts_handed_over(js, got);
    cr_assert_str_eq(got, "|hi|there|{}");
}
