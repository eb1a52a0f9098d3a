/* tests/common/test_utf8.c: common/utf8.c, what makes client bytes safe
 * to quote in JSON. */
#include <criterion/criterion.h>
#include <string.h>

#include "common/utf8.h"

#define FFFD "\xef\xbf\xbd"

Test(utf8, sequences_valid_and_not, .timeout = 5)
{
    static const struct {
        const char *s;
        size_t len;
    } cases[] = {
        {"a", 1},           {"\xc3\xa9", 2},     {"\xe2\x82\xac", 3}, {"\xf0\x9f\x98\x80", 4},
        {"\xc0\xaf", 0},    /* overlong '/' */
        {"\xe0\x80\xaf", 0}, /* overlong, 3 bytes */
        {"\xed\xa0\x80", 0}, /* a surrogate */
        {"\xf4\x90\x80\x80", 0}, /* past U+10FFFF */
        {"\xff", 0},        {"\x80", 0},         {"\xc3", 0},         {"\xc3(", 0},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        cr_expect_eq(utf8_seq_len((const unsigned char *)cases[i].s, strlen(cases[i].s)),
                     cases[i].len, "case %zu", i);
}

Test(utf8, copy_replaces_invalid_bytes_and_cuts_at_a_boundary, .timeout = 5)
{
    char out[16];

    cr_assert_eq(utf8_copy_valid(out, sizeof(out), "a\xff" "b\xc3"), 2 + 3 + 3);
    cr_assert_str_eq(out, "a" FFFD "b" FFFD);
    /* 6 bytes of room: "ab" and one euro sign (3) fit, the second does not. */
    cr_assert_eq(utf8_copy_valid(out, 6, "ab\xe2\x82\xac\xe2\x82\xac"), 5);
    cr_assert_str_eq(out, "ab\xe2\x82\xac");
    /* A sequence cut by whoever made the text is one replacement per byte. */
    cr_assert_eq(utf8_copy_valid(out, sizeof(out), "x\xe2\x82"), 1 + 6);
    cr_assert_str_eq(out, "x" FFFD FFFD);
    cr_assert_eq(utf8_copy_valid(out, 1, "abc"), 0);
    cr_assert_str_eq(out, "");
}
