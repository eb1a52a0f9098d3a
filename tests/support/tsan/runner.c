/*
 * tests/support/tsan/runner.c: runs the tests registered through the
 * stand-in criterion.h next to it (see there why), for `make tsan`.
 *
 * Each test runs in a forked child (suite init, test, suite fini), killed
 * at its timeout; a child that exits 0 passed, one that exits otherwise
 * failed (a failed assertion, or ThreadSanitizer's exitcode), one killed
 * by a signal crashed. Options: --filter GLOB (on "suite/name"); --jobs N
 * is accepted and ignored (one test at a time). Ends with Criterion's
 * "[====] Synthesis: ..." line; exits 1 if any test did not pass.
 */
#include <fnmatch.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "criterion/criterion.h"

static struct tsan_test *tests;
static struct tsan_suite *suites;

void tsan_register_test(struct tsan_test *t)
{
    t->next = tests;
    tests = t;
}

void tsan_register_suite(struct tsan_suite *s)
{
    s->next = suites;
    suites = s;
}

void tsan_fail(const char *file, int line, const char *expr, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "[----] %s:%d: Assertion Failed: %s\n[----]  ", file, line, expr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(NULL);
    _exit(1);
}

static const struct tsan_suite *suite_of(const struct tsan_test *t)
{
    for (const struct tsan_suite *s = suites; s != NULL; s = s->next)
        if (strcmp(s->name, t->suite) == 0)
            return s;
    return NULL;
}

static void run_child(const struct tsan_test *t)
{
    const struct tsan_suite *s = suite_of(t);
    double timeout = t->timeout ? t->timeout : s ? s->timeout : 0;

    if (timeout > 0)
        alarm((unsigned)timeout + 1);
    if (s && s->init)
        s->init();
    if (t->init)
        t->init();
    t->fn();
    if (t->fini)
        t->fini();
    if (s && s->fini)
        s->fini();
    fflush(NULL);
    _exit(0);
}

/* 0 passed, 1 failed, 2 crashed. */
static int run_one(const struct tsan_test *t)
{
    int status;
    pid_t pid;

    fflush(NULL);
    if ((pid = fork()) < 0) {
        perror("fork");
        return 2;
    }
    if (pid == 0)
        run_child(t);
    if (waitpid(pid, &status, 0) != pid)
        return 2;
    if (WIFSIGNALED(status)) {
        fprintf(stderr, "[CRASH] %s::%s: signal %d\n", t->suite, t->name, WTERMSIG(status));
        return 2;
    }
    fprintf(stderr, "[%s] %s::%s\n", WEXITSTATUS(status) == 0 ? "PASS" : "FAIL", t->suite,
            t->name);
    return WEXITSTATUS(status) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    const char *filter = NULL;
    int counts[3] = {0, 0, 0}, tested = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--filter") == 0 && i + 1 < argc)
            filter = argv[++i];
        else if (strcmp(argv[i], "--jobs") == 0 && i + 1 < argc)
            i++;
    }
    for (const struct tsan_test *t = tests; t != NULL; t = t->next) {
        char id[256];

        snprintf(id, sizeof(id), "%s/%s", t->suite, t->name);
        if (filter != NULL && fnmatch(filter, id, 0) != 0)
            continue;
        tested++;
        counts[run_one(t)]++;
    }
    fprintf(stderr, "[====] Synthesis: Tested: %d | Passing: %d | Failing: %d | Crashing: %d\n",
            tested, counts[0], counts[1], counts[2]);
    return counts[1] + counts[2] == 0 ? 0 : 1;
}
