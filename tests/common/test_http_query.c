/* tests/common/test_http_query.c: common/http_query.c, a backend url's
 * query merged with the client's, parameter names, and the check a
 * backend url's query passes. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <string.h>

#include "common/buf.h"
#include "common/http_query.h"

struct merge_case {
    const char *own;    /* the backend's query, or NULL */
    const char *client; /* the client's, with its '?' (or "") */
    const char *want;   /* what goes after the path */
};

static const struct merge_case merges[] = {
    /* no query of the backend's: the client's byte for byte, but for its
     * empty parameters; nothing when it has no other */
    {NULL, "", ""},
    {NULL, "?", ""},
    {NULL, "?&&", ""},
    {NULL, "?api-version=2024-10-21&x=a%2Fb&y", "?api-version=2024-10-21&x=a%2Fb&y"},
    {NULL, "?&api-version=2024-10-21&x=a%2Fb&&y&", "?api-version=2024-10-21&x=a%2Fb&y"},
    /* the backend's alone */
    {"api-version=2024-10-21", "", "?api-version=2024-10-21"},
    {"api-version=2024-10-21", "?", "?api-version=2024-10-21"},
    /* the client's after it, but for the names it sets, however spelt */
    {"api-version=2024-10-21", "?beta=true", "?api-version=2024-10-21&beta=true"},
    {"api-version=2024-10-21", "?api-version=2025-01-01", "?api-version=2024-10-21"},
    {"api-version=2024-10-21", "?API-Version=1&a=1&api%2dversion=2&api%2Dversion&b",
     "?api-version=2024-10-21&a=1&b"},
    {"api-version=2024-10-21", "?api-versions=1&api=2&xapi-version=3",
     "?api-version=2024-10-21&api-versions=1&api=2&xapi-version=3"},
    /* a name without a value is named as well; empty pieces are dropped */
    {"key=k1&flag", "?&flag=1&&key&c=%7B&", "?key=k1&flag&c=%7B"},
    /* the client's order and bytes are kept */
    {"a=1", "?z=2&y=%20+&x=a=b", "?a=1&z=2&y=%20+&x=a=b"},
    /* but for the bytes no request line may hold (llhttp lets them in),
     * percent-encoded, with or without a query of the backend's */
    {NULL, "?q=caf\xc3\xa9&t=a\tb\f", "?q=caf%C3%A9&t=a%09b%0C"},
    {"a=1", "?q=caf\xc3\xa9&t=a\tb", "?a=1&q=caf%C3%A9&t=a%09b"},
};

#define NMERGES (sizeof(merges) / sizeof(merges[0]))

/* Criterion copies parameters into the test's process: indexes, not the
 * structs' pointers. */
ParameterizedTestParameters(http_query, merge)
{
    static size_t index[NMERGES];

    for (size_t i = 0; i < NMERGES; i++)
        index[i] = i;
    return cr_make_param_array(size_t, index, NMERGES);
}

ParameterizedTest(size_t *i, http_query, merge, .timeout = 5)
{
    const struct merge_case *tc = &merges[*i];
    struct buf out = {0};

    cr_assert_eq(buf_append_lit(&out, "/p"), 0);
    cr_assert_eq(http_query_merge(&out, tc->own, slice_from(tc->client)), 0);
    cr_expect_eq(out.len, 2 + strlen(tc->want), "own %s, client %s: got %.*s", tc->own,
                 tc->client, (int)out.len, out.data);
    cr_expect_eq(memcmp(out.data, "/p", 2), 0);
    cr_expect_eq(memcmp(out.data + 2, tc->want, strlen(tc->want)), 0,
                 "own %s, client %s: got %.*s want %s", tc->own, tc->client, (int)out.len - 2,
                 out.data + 2, tc->want);
    buf_free(&out);
}

Test(http_query, names_compare_decoded_and_case_blind, .timeout = 5)
{
    cr_expect(http_query_name_eq(SLICE_LIT("api-version"), SLICE_LIT("API-VERSION")));
    cr_expect(http_query_name_eq(SLICE_LIT("api%2Dversion"), SLICE_LIT("api-version")));
    cr_expect(http_query_name_eq(SLICE_LIT("%61pi-version"), SLICE_LIT("Api%2dversion")));
    cr_expect_not(http_query_name_eq(SLICE_LIT("api-version"), SLICE_LIT("api-versio")));
    cr_expect_not(http_query_name_eq(SLICE_LIT("api"), SLICE_LIT("api-version")));
    cr_expect_not(http_query_name_eq(SLICE_LIT("a%2"), SLICE_LIT("a")), "a broken escape is bytes");
    cr_expect(http_query_name_eq(SLICE_LIT("a%2"), SLICE_LIT("A%2")));
    cr_expect(http_query_name_eq(SLICE_LIT(""), SLICE_LIT("")));
}

Test(http_query, parameters_split_on_ampersands, .timeout = 5)
{
    struct slice rest = SLICE_LIT("&a=1&&flag&b==x&");
    struct http_query_param p;

    cr_assert(http_query_next(&rest, &p));
    cr_expect_eq(p.name.len, 1);
    cr_expect_eq(memcmp(p.value.p, "1", 1), 0);
    cr_assert(http_query_next(&rest, &p));
    cr_expect_eq(p.all.len, 4);
    cr_expect_eq(p.name.len, 4);
    cr_expect_eq(p.value.len, 0);
    cr_assert(http_query_next(&rest, &p));
    cr_expect_eq(p.name.len, 1);
    cr_expect_eq(p.value.len, 2, "the value keeps a second '='");
    cr_expect_not(http_query_next(&rest, &p));
}

Test(http_query, the_check_refuses_what_cannot_go_as_written, .timeout = 5)
{
    static const char *const good[] = {"api-version=2024-10-21", "key=AIza-_.~", "flag",
                                       "a=1&b=2&a=3", "k=%2F%2f", "x=/?:@!$'()*+,;="};
    static const char *const bad[] = {"", "&a=1", "a=1&", "a=1&&b=2", "=x", "a=1&=x",
                                      "a=%", "a=%4", "a=%G0", "a={x}", "a=\"x\"", "a=x|y",
                                      "a=x^", "a=[1]", "a=\xc3\xa9", "a=x\\y", "a=`x`"};

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        cr_expect_null(http_query_check(good[i]), "%s: %s", good[i], http_query_check(good[i]));
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_expect_not_null(http_query_check(bad[i]), "%s passed", bad[i]);
}

/* The cache key's normal form of a client's query (RFC 3986 6.2.2): the
 * escapes of unreserved characters decoded, other escapes' hex in
 * capitals, bytes sent escaped written escaped, a stray '%' as "%%"; the
 * count (out NULL) is what is written. */
Test(http_query, the_normal_form_decodes_unreserved_escapes_only, .timeout = 5)
{
    static const struct {
        const char *q, *want;
    } cases[] = {
        {"?v=A-1.x_~&p=a%2Fb", "?v=A-1.x_~&p=a%2Fb"},
        {"?%76=%41%2D%31%2e%78%5f%7E&p=a%2fb", "?v=A-1.x_~&p=a%2Fb"},
        {"?a=%20+%3d%26%25", "?a=%20+%3D%26%25"},
        {"?q=caf\xc3\xa9&t=a\tb", "?q=caf%C3%A9&t=a%09b"},
        {"?q=caf%c3%a9&t=a%09b", "?q=caf%C3%A9&t=a%09b"},
        {"?a=%%41&b=%A&c=%4g&d=%", "?a=%%A&b=%%A&c=%%4g&d=%%"},
        /* empty parameters left out, as upstream */
        {"?&a=1&&b&", "?a=1&b"},
        {"?&&", "?"},
        {"?a=%26&&b", "?a=%26&b"},
    };
    char out[128];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct slice q = slice_from(cases[i].q);
        size_t n = http_query_normal(NULL, q);

        cr_assert_leq(n, 3 * q.len);
        cr_assert_lt(n, sizeof(out));
        cr_expect_eq(http_query_normal(out, q), n);
        cr_expect_eq(n, strlen(cases[i].want), "%s: got %.*s", cases[i].q, (int)n, out);
        cr_expect_eq(memcmp(out, cases[i].want, strlen(cases[i].want)), 0,
                     "%s: got %.*s want %s", cases[i].q, (int)n, out, cases[i].want);
    }
}
