/* tests/common/test_http_hop.c: common/http_hop.c, the headers a
 * Connection header names and the filter that drops them. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "common/http_hop.h"

static int has(const struct http_hop_names *h, const char *name)
{
    return http_hop_names_has(h, slice_from(name));
}

/* Filter `block` in place with h and `also`; the result, NUL-terminated. */
static const char *filtered(char *block, const struct http_hop_names *h, const char *also)
{
    size_t n = http_hop_filter(block, block, strlen(block), h, slice_from(also));

    block[n] = '\0';
    return block;
}

Test(http_hop, a_list_is_split_on_commas_and_trimmed, .timeout = 5)
{
    struct http_hop_names h = {.n = 0};

    http_hop_names_add(&h, SLICE_LIT(" keep-alive , X-A,,\tx-b ,close"));
    cr_assert_eq(h.n, 2, "keep-alive and close are no header names to keep");
    cr_assert(has(&h, "x-a"));
    cr_assert(has(&h, "X-B"));
    cr_assert_not(has(&h, "x-c"));
    cr_assert_not(has(&h, "x-a-longer"));
}

Test(http_hop, named_lines_go_wherever_connection_stands, .timeout = 5)
{
    struct http_hop_names h = {.n = 0};
    char block[] = "X-Early: 1\r\nConnection: x-early\r\nKept: 2\r\nconnection: X-Late\r\n"
                   "x-late: 3\r\nx-key: 4\r\nAlso-Kept: 5\r\n";
    char copy[sizeof(block)];

    memcpy(copy, block, sizeof(block));
    http_hop_names_scan(&h, copy, strlen(copy));
    cr_assert_eq(h.n, 2);
    cr_assert_str_eq(filtered(block, &h, "X-Key"), "Kept: 2\r\nAlso-Kept: 5\r\n");
}

Test(http_hop, a_folded_line_goes_with_the_line_it_continues, .timeout = 5)
{
    struct http_hop_names h = {.n = 0};
    char block[] = "X-Hop: a\r\n b\r\nKept: c\r\n d\r\n";

    http_hop_names_add(&h, SLICE_LIT("x-hop"));
    cr_assert_str_eq(filtered(block, &h, ""), "Kept: c\r\n d\r\n");
}

/* Past HTTP_HOP_NAMES_MAX names the work stays bounded and no listed
 * header gets through; an unlisted one may be dropped with them. */
Test(http_hop, a_long_list_still_drops_every_name_it_lists, .timeout = 5)
{
    struct http_hop_names h = {.n = 0};
    char list[1024] = "", block[2048] = "", name[16];
    size_t at = 0, bt = 0;

    for (int i = 0; i < 3 * HTTP_HOP_NAMES_MAX; i++) {
        at += (size_t)snprintf(list + at, sizeof(list) - at, "%sx-h%d", i ? ", " : "", i);
        bt += (size_t)snprintf(block + bt, sizeof(block) - bt, "X-H%d: v\r\n", i);
    }
    http_hop_names_add(&h, (struct slice){list, at});
    cr_assert_eq(h.n, HTTP_HOP_NAMES_MAX);
    cr_assert_neq(h.more, 0);
    for (int i = 0; i < 3 * HTTP_HOP_NAMES_MAX; i++) {
        snprintf(name, sizeof(name), "X-H%d", i);
        cr_assert(has(&h, name), "%s", name);
    }
    cr_assert_str_eq(filtered(block, &h, ""), "");
}
