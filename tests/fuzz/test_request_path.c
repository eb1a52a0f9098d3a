/*
 * tests/fuzz/test_request_path.c: a short, fixed-seed run of the request
 * path fuzzer (tests/fuzz/fuzz_http.c) in every `make test` and `make
 * asan`, against the router under test ($COSTROUTER_BIN: the sanitized one
 * in `make asan`). `make fuzz-http` runs it for longer with a new seed.
 *
 * The driver does the checking (answers, keys, hangs, reloads, spend
 * against the cost log, exit status, sanitizer reports); this test holds it
 * to exit 0 and to have reached the backends, reloaded and (with Redis)
 * frozen Redis often enough to prove something. Once with the in-process
 * store over plain HTTP, once with a redis-server of the driver's own and
 * the router serving TLS.
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

/* The count just before `what` in the summary line ("..., 7 reloads"), or -1. */
static long count_before(const char *out, const char *what)
{
    const char *p = strstr(out, what);

    while (p && p > out && p[-1] >= '0' && p[-1] <= '9')
        p--;
    return p && p[0] >= '0' && p[0] <= '9' ? strtol(p, NULL, 10) : -1;
}

/* Run the driver for 15 s with seed 1 (with --redis and --tls when
 * `redis_tls`) and hold it to a clean end with answers of several kinds,
 * reloads and, with Redis, freezes. */
static void run_driver(int redis_tls)
{
    char driver[256], *argv[8], **arg = argv;
    struct buf out = {0};
    int rc;

    snprintf(driver, sizeof(driver), "%s/fuzz_http", getenv("BUILD") ? getenv("BUILD") : "build");
    *arg++ = driver;
    if (redis_tls) {
        *arg++ = "--redis";
        *arg++ = "--tls";
    }
    *arg++ = getenv("COSTROUTER_BIN");
    *arg++ = (char *)support_mockllm_bin();
    *arg++ = "15"; /* seconds */
    *arg++ = "1";  /* seed */
    *arg = NULL;
    rc = support_run(argv, &out, 120000);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    cr_assert_eq(rc, 0, "fuzz_http exited %d:\n%s", rc, out.data);
    cr_assert(strstr(out.data, "; clean\n") != NULL, "%s", out.data);
    /* Answers from the backends, and refusals of several kinds. */
    cr_assert_gt(answers_with_status(out.data, "200"), 100, "%s", out.data);
    cr_assert_gt(answers_with_status(out.data, "400"), 20, "%s", out.data);
    cr_assert_gt(answers_with_status(out.data, "401"), 20, "%s", out.data);
    cr_assert_geq(count_before(out.data, " reloads"), 3, "%s", out.data);
    if (redis_tls) {
        cr_assert_geq(count_before(out.data, " Redis freezes"), 1, "%s", out.data);
        cr_assert(strstr(out.data, "store, TLS\n") != NULL, "%s", out.data);
    }
    buf_free(&out);
}

Test(request_path, generated_requests_leave_the_router_sound, .timeout = 150)
{
    run_driver(0);
}

Test(request_path, generated_requests_over_tls_with_redis_frozen_now_and_then, .timeout = 150)
{
    run_driver(1);
}
