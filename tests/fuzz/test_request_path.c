/*
 * tests/fuzz/test_request_path.c: a short, fixed-seed run of the request
 * path fuzzer (tests/fuzz/fuzz_http.c) in every `make test` and `make
 * asan`, against the router under test ($COSTROUTER_BIN: the sanitized one
 * in `make asan`). `make fuzz-http` runs it for longer with a new seed.
 *
 * The driver does the checking (answers, keys, hangs, spend against the
 * cost log, exit status, sanitizer reports); this test holds it to exit 0
 * and to have reached the backends often enough to prove something.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "tests/support/proc.h"

/* The count after " STATUS " in the driver's summary line, or -1. */
static long answers_with_status(const char *out, const char *status)
{
    char needle[16];
    const char *p;

    snprintf(needle, sizeof(needle), " %s ", status);
    p = strstr(out, "answers by status:");
    p = p ? strstr(p, needle) : NULL;
    return p ? strtol(p + strlen(needle), NULL, 10) : -1;
}

Test(request_path, generated_requests_leave_the_router_sound, .timeout = 150)
{
    char driver[256], *argv[6];
    struct buf out = {0};
    int rc;

    snprintf(driver, sizeof(driver), "%s/fuzz_http", getenv("BUILD") ? getenv("BUILD") : "build");
    argv[0] = driver;
    argv[1] = getenv("COSTROUTER_BIN");
    argv[2] = (char *)support_mockllm_bin();
    argv[3] = "15"; /* seconds */
    argv[4] = "1";  /* seed */
    argv[5] = NULL;
    rc = support_run(argv, &out, 120000);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    cr_assert_eq(rc, 0, "fuzz_http exited %d:\n%s", rc, out.data);
    cr_assert(strstr(out.data, "; clean\n") != NULL, "%s", out.data);
    /* Answers from the backends, and refusals of several kinds. */
    cr_assert_gt(answers_with_status(out.data, "200"), 100, "%s", out.data);
    cr_assert_gt(answers_with_status(out.data, "400"), 20, "%s", out.data);
    cr_assert_gt(answers_with_status(out.data, "401"), 20, "%s", out.data);
    buf_free(&out);
}
