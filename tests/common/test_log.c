/* tests/common/test_log.c: common/log.c's once-a-second (or -interval) lines. */
#include <criterion/criterion.h>
#include <string.h>

#include "common/log.h"

Test(log_every, one_line_a_second_then_the_count_of_the_rest, .timeout = 5)
{
    struct log_every t = {0};
    char note[LOG_EVERY_NOTE_MAX];

    cr_assert(log_every_due(&t, 5000, note), "the first line goes through");
    cr_assert_str_eq(note, "");
    for (int i = 0; i < 7; i++)
        cr_assert_not(log_every_due(&t, 5000 + 100 * (uint64_t)i, note), "line %d held", i);
    cr_assert_not(log_every_due(&t, 5999, note));
    cr_assert(log_every_due(&t, 6000, note), "a second later one goes through");
    cr_assert_str_eq(note, " (and 8 more since the last such line)");
    cr_assert(log_every_due(&t, 7000, note));
    cr_assert_str_eq(note, "", "none held back in between");
    /* A clock that starts at 0 still counts as a line logged. */
    t = (struct log_every){0};
    cr_assert(log_every_due(&t, 0, note));
    cr_assert_not(log_every_due(&t, 10, note));
}

Test(log_every, an_interval_of_its_own, .timeout = 5)
{
    struct log_every t = {.interval_ms = 60000};
    char note[LOG_EVERY_NOTE_MAX];

    cr_assert(log_every_due(&t, 5000, note));
    cr_assert_not(log_every_due(&t, 6000, note), "a second is not the interval");
    cr_assert_not(log_every_due(&t, 64999, note));
    cr_assert(log_every_due(&t, 65000, note), "a minute later one goes through");
    cr_assert_str_eq(note, " (and 2 more since the last such line)");
}
