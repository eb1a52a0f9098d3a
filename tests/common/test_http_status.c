/* tests/common/test_http_status.c: common/http_status.c, the reason
 * phrases and how long a 429's Retry-After asks to wait. */
#include <criterion/criterion.h>
#include <string.h>

#include "common/http_status.h"

/* 1994-11-06 08:49:37 UTC, the date RFC 9110 uses as its example. */
#define RFC_DATE 784111777

static int64_t wait_ms(const char *value, int in_ms, time_t now)
{
    return http_retry_after_ms(value, strlen(value), in_ms, now);
}

Test(http_status, retry_after_seconds_and_fractions, .timeout = 5)
{
    cr_assert_eq(wait_ms("120", 0, 0), 120000);
    cr_assert_eq(wait_ms("0", 0, 0), 0);
    cr_assert_eq(wait_ms(" 7 ", 0, 0), 7000, "spaces around the value are not part of it");
    cr_assert_eq(wait_ms("1.5", 0, 0), 1500);
    cr_assert_eq(wait_ms("0.0004", 0, 0), 1, "a fraction of a ms rounds up, not to no wait");
    cr_assert_eq(wait_ms("20", 1, 0), 20, "retry-after-ms is in ms");
    cr_assert_eq(wait_ms("20.25", 1, 0), 21);
    /* Far past any cooldown, and past int64 as seconds: capped, no overflow. */
    cr_assert_eq(wait_ms("99999999999999999999999999", 0, 0), HTTP_RETRY_AFTER_MAX_MS);
    cr_assert_eq(wait_ms("9223372036854775807", 1, 0), HTTP_RETRY_AFTER_MAX_MS);
}

Test(http_status, retry_after_http_date, .timeout = 5)
{
    cr_assert_eq(wait_ms("Sun, 06 Nov 1994 08:49:37 GMT", 0, RFC_DATE - 30), 30000);
    cr_assert_eq(wait_ms("Sun, 06 Nov 1994 08:49:37 GMT", 0, RFC_DATE), 0);
    cr_assert_eq(wait_ms("Sun, 06 Nov 1994 08:49:37 GMT", 0, RFC_DATE + 3600), 0,
                 "a date in the past asks for no wait");
    cr_assert_eq(wait_ms("Sun, 06 Nov 1994 08:49:37 GMT", 1, RFC_DATE - 30), -1,
                 "retry-after-ms is a number only");
}

Test(http_status, retry_after_garbage_is_unknown, .timeout = 5)
{
    static const char *const bad[] = {
        "", "  ", "-5", "soon", "5s", "1e3", "1.5.2", "12 34", "0x10",
        "Sun, 06 Nov 1994 08:49:37",         /* no zone */
        "Sun, 06 Nov 1994 08:49:37 GMT+1",   /* trailing bytes */
        "Sunday, 06-Nov-94 08:49:37 GMT " "and a tail long enough to overflow the date buffer",
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_expect_eq(wait_ms(bad[i], 0, RFC_DATE), -1, "\"%s\"", bad[i]);
    /* Not NUL-terminated: only `len` bytes are read. */
    cr_assert_eq(http_retry_after_ms("12345", 2, 0, 0), 12000);
}

Test(http_status, reason_phrases, .timeout = 5)
{
    cr_assert_str_eq(http_status_text(429), "Too Many Requests");
    cr_assert_str_eq(http_status_text(599), "Server Error");
    cr_assert(http_status_bodyless(304) && http_status_bodyless(101) && !http_status_bodyless(200));
}
