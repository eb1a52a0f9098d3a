/* tests/common/test_buf.c: common/buf.c growth, consume, printf and mask. */
#include <criterion/criterion.h>
#include <string.h>

#include "common/buf.h"

Test(buf, append_grows_and_keeps_bytes, .timeout = 5)
{
    struct buf b = {0};
    char chunk[1000];

    memset(chunk, 'x', sizeof(chunk));
    for (int i = 0; i < 100; i++)
        cr_assert_eq(buf_append(&b, chunk, sizeof(chunk)), 0);
    cr_assert_eq(b.len, 100000);
    cr_assert_geq(b.cap, b.len);
    cr_assert_eq(b.data[99999], 'x');
    buf_free(&b);
    cr_assert_null(b.data);
}

/* buf_append copies in place while the bytes fit and grows the block
 * when they do not: the byte that fills the block exactly and the one
 * after it both land. */
Test(buf, append_fills_the_block_exactly_then_grows, .timeout = 5)
{
    struct buf b = {0};

    cr_assert_eq(buf_append(&b, "", 0), 0);
    cr_assert_null(b.data, "an empty append allocates nothing");
    cr_assert_eq(buf_append(&b, "0", 1), 0);
    size_t cap = b.cap;
    for (size_t i = 1; i < cap; i++)
        cr_assert_eq(buf_append(&b, &"0123456789"[i % 10], 1), 0);
    cr_assert_eq(b.len, cap);
    cr_assert_eq(b.cap, cap, "no growth while the bytes fit");
    cr_assert_eq(buf_append_lit(&b, "XY"), 0);
    cr_assert_gt(b.cap, cap);
    cr_assert_eq(b.len, cap + 2);
    for (size_t i = 0; i < cap; i++)
        cr_assert_eq(b.data[i], "0123456789"[i % 10], "byte %zu", i);
    cr_assert_eq(memcmp(b.data + cap, "XY", 2), 0);
    buf_free(&b);
}

Test(buf, consume_keeps_the_tail, .timeout = 5)
{
    struct buf b = {0};

    cr_assert_eq(buf_append(&b, "hello world", 11), 0);
    buf_consume(&b, 6);
    cr_assert_eq(b.len, 5);
    cr_assert_eq(memcmp(b.data, "world", 5), 0);
    buf_consume(&b, 50);
    cr_assert_eq(b.len, 0);
    buf_free(&b);
}

Test(buf, printf_appends_formatted_text, .timeout = 5)
{
    struct buf b = {0};

    cr_assert_eq(buf_printf(&b, "%s=%d", "n", 42), 0);
    cr_assert_eq(buf_printf(&b, ";%.2f", 1.5), 0);
    cr_assert_eq(b.len, strlen("n=42;1.50"));
    cr_assert_eq(memcmp(b.data, "n=42;1.50", b.len), 0);
    buf_free(&b);
}

Test(buf, append_header_writes_one_line, .timeout = 5)
{
    struct buf b = {0};
    const char *want = "x-a: 1\r\nx-empty: \r\n";

    cr_assert_eq(buf_append_header(&b, SLICE_LIT("x-a"), SLICE_LIT("1")), 0);
    cr_assert_eq(buf_append_header(&b, SLICE_LIT("x-empty"), (struct slice){NULL, 0}), 0);
    cr_assert_eq(b.len, strlen(want));
    cr_assert_eq(memcmp(b.data, want, b.len), 0);
    buf_free(&b);
}

Test(buf, append_u64_and_lit, .timeout = 5)
{
    struct buf b = {0};
    const char *want = "0 18446744073709551615 1234";

    cr_assert_eq(buf_append_u64(&b, 0), 0);
    cr_assert_eq(buf_append_lit(&b, " "), 0);
    cr_assert_eq(buf_append_u64(&b, UINT64_MAX), 0);
    cr_assert_eq(buf_append_lit(&b, " "), 0);
    cr_assert_eq(buf_append_u64(&b, 1234), 0);
    cr_assert_eq(b.len, strlen(want));
    cr_assert_eq(memcmp(b.data, want, b.len), 0);
    buf_free(&b);
}

/* buf_mask blanks every copy, also back to back and at both ends, and
 * keeps the length; an empty needle or an empty buffer changes nothing. */
Test(buf, mask_blanks_every_copy_in_place, .timeout = 5)
{
    struct buf b = {0};

    cr_assert_eq(buf_mask(&b, "key", 3, '*'), 0);
    cr_assert_eq(buf_append_lit(&b, "keykey: a key, keyke key"), 0);
    cr_assert_eq(buf_mask(&b, "key", 3, '*'), 5);
    cr_assert_eq(b.len, 24);
    cr_assert_eq(memcmp(b.data, "******: a ***, ***ke ***", 24), 0);
    cr_assert_eq(buf_mask(&b, "", 0, '*'), 0);
    cr_assert_eq(buf_mask(&b, "key", 3, '*'), 0);
    buf_free(&b);
}

/* Copies are counted as they stand in the bytes before the masking, one
 * after the other: a needle made of the mask byte itself is not found
 * again in what was just blanked. */
Test(buf, mask_counts_copies_that_do_not_overlap, .timeout = 5)
{
    struct buf b = {0};

    cr_assert_eq(buf_append_lit(&b, "*****"), 0);
    cr_assert_eq(buf_mask(&b, "**", 2, '*'), 2);
    cr_assert_eq(memcmp(b.data, "*****", 5), 0);
    buf_reset(&b);
    cr_assert_eq(buf_append_lit(&b, "aaaaa"), 0);
    cr_assert_eq(buf_mask(&b, "aa", 2, 'a'), 2);
    buf_free(&b);
}

/* A copy that ends the bytes is blanked: right after another one, and
 * when it is all there is. */
Test(buf, mask_reaches_the_last_byte, .timeout = 5)
{
    struct buf b = {0};

    cr_assert_eq(buf_append_lit(&b, "keykey"), 0);
    cr_assert_eq(buf_mask(&b, "key", 3, '*'), 2);
    cr_assert_eq(memcmp(b.data, "******", 6), 0);
    buf_reset(&b);
    cr_assert_eq(buf_append_lit(&b, "key"), 0);
    cr_assert_eq(buf_mask(&b, "key", 3, '*'), 1);
    cr_assert_eq(memcmp(b.data, "***", 3), 0);
    buf_free(&b);
}
