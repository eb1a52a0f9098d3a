/*
 * tests/policy/tokens_fixture.h: where the tokenizer tests find their data.
 * Token tables: $COSTROUTER_SRC/data/tokens (made by `make data`);
 * reference counts: $COSTROUTER_SRC/build/tokens-test.
 */
#ifndef TESTS_POLICY_TOKENS_FIXTURE_H
#define TESTS_POLICY_TOKENS_FIXTURE_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>

#include "policy/tokenize.h"

static inline const char *fixture_src(void)
{
    const char *src = getenv("COSTROUTER_SRC");
    return src && *src ? src : ".";
}

/* Load the three encodings or fail the test. */
static inline struct policy_tokens *fixture_tokens(void)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s/data/tokens", fixture_src());
    struct policy_tokens *t = NULL;
    int rc = policy_tokens_load(&t, dir);
    cr_assert_eq(rc, 0, "policy_tokens_load(%s) = %d: run `make data`", dir, rc);
    return t;
}

#endif
