/*
 * tests/support/utf8check.h: UTF-8 validity by RFC 3629's table, for
 * checks on what the router writes (cost log lines, error bodies). Written
 * apart from common/utf8.c on purpose: a test's oracle must not share the
 * code it checks.
 */
#ifndef TESTS_SUPPORT_UTF8CHECK_H
#define TESTS_SUPPORT_UTF8CHECK_H

#include <stddef.h>

/* 1 when s[0..n) is well-formed UTF-8 (no overlong form, surrogate or
 * code point above U+10FFFF), else 0. */
int support_utf8_valid(const unsigned char *s, size_t n);

#endif
