/*
 * tests/support/tsan/criterion/criterion.h: the part of Criterion's API
 * that in-process tests use (Test, TestSuite, cr_assert*), for `make tsan`
 * alone (mk/tsan.mk puts this folder first on the include path).
 *
 * Why not Criterion itself: its runner (BoxFort) maps a shared arena at a
 * random fixed address, which ThreadSanitizer's memory layout refuses, so
 * a Criterion binary built with -fsanitize=thread aborts at start ("Could
 * not initialize inheritable arena", Snaipe/Criterion#274). This runner
 * (runner.c) runs each test in a child of its own, as Criterion does, and
 * prints Criterion's closing "Synthesis" line for tests/run.sh.
 */
#ifndef TESTS_SUPPORT_TSAN_CRITERION_H
#define TESTS_SUPPORT_TSAN_CRITERION_H

#include <stddef.h>
#include <string.h>

struct tsan_suite {
    const char *name;
    void (*init)(void);   /* before each test of the suite */
    void (*fini)(void);   /* after it */
    double timeout;       /* seconds per test, 0: none */
    struct tsan_suite *next;
};

struct tsan_test {
    const char *suite, *name;
    void (*fn)(void);
    void (*init)(void);
    void (*fini)(void);
    double timeout;
    struct tsan_test *next;
};

void tsan_register_test(struct tsan_test *t);
void tsan_register_suite(struct tsan_suite *s);
void tsan_fail(const char *file, int line, const char *expr, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));

#define Test(suite_, name_, ...)                                                                 \
    static void tsan_fn_##suite_##_##name_(void);                                                \
    static struct tsan_test tsan_t_##suite_##_##name_ = {                                        \
        .suite = #suite_, .name = #name_, .fn = tsan_fn_##suite_##_##name_, __VA_ARGS__};        \
    __attribute__((constructor)) static void tsan_reg_##suite_##_##name_(void)                   \
    {                                                                                            \
        tsan_register_test(&tsan_t_##suite_##_##name_);                                          \
    }                                                                                            \
    static void tsan_fn_##suite_##_##name_(void)

#define TestSuite(name_, ...)                                                                    \
    static struct tsan_suite tsan_s_##name_ = {.name = #name_, __VA_ARGS__};                     \
    __attribute__((constructor)) static void tsan_regs_##name_(void)                             \
    {                                                                                            \
        tsan_register_suite(&tsan_s_##name_);                                                    \
    }

/* The message is optional, as in Criterion: " " glues to a literal format
 * (and keeps an empty one from being a zero-length format). */
#define tsan_check(cond, text, ...) \
    ((cond) ? (void)0 : tsan_fail(__FILE__, __LINE__, text, " " __VA_ARGS__))

#define cr_assert(c, ...) tsan_check((c), #c, __VA_ARGS__)
#define cr_assert_not(c, ...) tsan_check(!(c), "!(" #c ")", __VA_ARGS__)
#define cr_assert_null(p, ...) tsan_check((p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_assert_not_null(p, ...) tsan_check((p) != NULL, #p " != NULL", __VA_ARGS__)
#define cr_assert_eq(a, b, ...) tsan_check((a) == (b), #a " == " #b, __VA_ARGS__)
#define cr_assert_neq(a, b, ...) tsan_check((a) != (b), #a " != " #b, __VA_ARGS__)
#define cr_assert_lt(a, b, ...) tsan_check((a) < (b), #a " < " #b, __VA_ARGS__)
#define cr_assert_leq(a, b, ...) tsan_check((a) <= (b), #a " <= " #b, __VA_ARGS__)
#define cr_assert_gt(a, b, ...) tsan_check((a) > (b), #a " > " #b, __VA_ARGS__)
#define cr_assert_geq(a, b, ...) tsan_check((a) >= (b), #a " >= " #b, __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...) \
    tsan_check(strcmp((a), (b)) == 0, #a " equals " #b, __VA_ARGS__)

#endif
