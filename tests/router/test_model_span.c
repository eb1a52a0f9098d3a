/* tests/router/test_model_span.c: finding the top-level "model" value to
 * splice (router/proxy.c router__json_model_span). */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <string.h>

#include "router/internal.h"

/* Arrays, not pointers: Criterion re-executes the binary per case. */
struct span_case {
    char body[160]; /* JSON object */
    char value[40]; /* the span's text, or "" when none is expected */
};

ParameterizedTestParameters(model_span, finds_only_the_top_level_value)
{
    static struct span_case cases[] = {
        {"{\"model\":\"chat\",\"messages\":[]}", "\"chat\""},
        {" { \"model\" : \"c h\\\"at\" , \"x\": 1 }", "\"c h\\\"at\""},
        {"{\"messages\":[{\"model\":\"inner\"}],\"model\":\"outer\"}", "\"outer\""},
        {"{\"meta\":{\"model\":\"inner\"},\"model\":\"outer\"}", "\"outer\""},
        {"{\"content\":\"a \\\"model\\\": \\\"fake\\\" {\",\"model\":\"real\"}", "\"real\""},
        {"{\"x\":\"model\",\"model\":\"m\"}", "\"m\""},
        {"{\"mod\\u0065l\":\"escaped-key\"}", ""},
        {"{\"model\":42}", ""},
        {"{\"models\":\"no\"}", ""},
    };
    return cr_make_param_array(struct span_case, cases, sizeof(cases) / sizeof(cases[0]));
}

ParameterizedTest(struct span_case *tc, model_span, finds_only_the_top_level_value, .timeout = 5)
{
    size_t start = 0, end = 0;
    int rc = router__json_model_span(tc->body, strlen(tc->body), &start, &end);

    if (tc->value[0] == '\0') {
        cr_assert_eq(rc, -1, "found a span in %s", tc->body);
        return;
    }
    cr_assert_eq(rc, 0, "no span in %s", tc->body);
    cr_assert_eq(end - start, strlen(tc->value), "span %.*s in %s", (int)(end - start),
                 tc->body + start, tc->body);
    cr_assert_eq(memcmp(tc->body + start, tc->value, end - start), 0);
}
