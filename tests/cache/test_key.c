/*
 * tests/cache/test_key.c: the response cache key ignores fields that do not
 * change the answer and key order, and tells everything else apart; the
 * cacheable predicate. Cases come from a table.
 */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <string.h>

#include "cache/cache.h"

static struct cache_key key_of(const char *route, const char *model, const char *json)
{
    struct cache_key k;
    cJSON *req = cJSON_Parse(json);

    cr_assert_not_null(req, "bad test json: %s", json);
    cr_assert_eq(cache_key_make(route, model, req, &k), 0);
    cJSON_Delete(req);
    return k;
}

#define BASE "{\"model\":\"gpt\",\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"

/* Arrays, not pointers: Criterion may run each case in a fresh process
 * where pointers into the parent's data are not valid. */
struct pair {
    char a[256];    /* request */
    char b[256];    /* another request */
    int same;       /* same key expected */
};

static struct pair pairs[] = {
    {BASE, BASE, 1},
    /* ignored fields */
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"stream\":true,"
           "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1},
    /* stream_options change the stream, unless they ask what no options do */
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
           "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 0},
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"stream_options\":{\"include_obfuscation\":false},"
           "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 0},
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"stream_options\":{\"some_new_option\":false},"
           "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 0},
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"stream_options\":{\"include_usage\":false,"
           "\"include_obfuscation\":true,\"continuous_usage_stats\":false},"
           "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1},
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"stream_options\":null,"
           "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1},
    {"{\"stream_options\":{\"include_usage\":true,\"include_obfuscation\":true}}",
     "{\"stream_options\":{\"include_usage\":true}}", 1},
    {"{\"x\":{\"include_usage\":false}}", "{\"x\":{}}", 0}, /* only in stream_options */
    {BASE, "{\"user\":\"u-123\",\"model\":\"gpt\",\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1},
    /* key order, at every level; 0 and 0.0 */
    {BASE, "{\"messages\":[{\"content\":\"hi\",\"role\":\"user\"}],\"temperature\":0.0,\"model\":\"gpt\"}", 1},
    /* the client's model name is replaced by route + upstream model */
    {BASE, "{\"model\":\"alias\",\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1},
    /* what changes the answer */
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"hi!\"}]}", 0},
    {BASE, "{\"model\":\"gpt\",\"temperature\":0.5,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 0},
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 0},
    {BASE, "{\"model\":\"gpt\",\"temperature\":0,\"messages\":[{\"role\":\"system\",\"content\":\"hi\"}]}", 0},
    /* message order matters */
    {"{\"messages\":[\"a\",\"b\"]}", "{\"messages\":[\"b\",\"a\"]}", 0},
    /* types are distinct: "1" vs 1, null vs false, nested vs flat */
    {"{\"x\":\"1\"}", "{\"x\":1}", 0},
    {"{\"x\":null}", "{\"x\":false}", 0},
    {"{\"x\":[\"ab\"]}", "{\"x\":[\"a\",\"b\"]}", 0},
    {"{\"x\":{\"user\":1}}", "{\"x\":{}}", 0}, /* only top-level fields are dropped */
};

ParameterizedTestParameters(key, pairs)
{
    return cr_make_param_array(struct pair, pairs, sizeof(pairs) / sizeof(pairs[0]));
}

ParameterizedTest(struct pair *p, key, pairs, .timeout = 5)
{
    struct cache_key a = key_of("gpt", "gpt-4o-2024", p->a);
    struct cache_key b = key_of("gpt", "gpt-4o-2024", p->b);

    cr_assert_eq(memcmp(a.sha256, b.sha256, 32) == 0, p->same, "%s vs %s", p->a, p->b);
}

Test(key, route_and_upstream_model_are_part_of_the_key, .timeout = 5)
{
    struct cache_key a = key_of("gpt", "m1", BASE), b = key_of("gpt", "m2", BASE),
                     c = key_of("fast", "m1", BASE);

    cr_assert_neq(memcmp(a.sha256, b.sha256, 32), 0);
    cr_assert_neq(memcmp(a.sha256, c.sha256, 32), 0);
}

Test(key, rejects_non_objects, .timeout = 5)
{
    cJSON *arr = cJSON_Parse("[1]");
    struct cache_key k;

    cr_assert_lt(cache_key_make("r", "m", arr, &k), 0);
    cJSON_Delete(arr);
}

struct cacheable_case {
    char json[128];    /* request */
    int allow_tools;   /* option */
    int want;          /* expected */
};

static struct cacheable_case cacheable_cases[] = {
    {"{\"temperature\":0}", 0, 1},
    {"{\"seed\":42}", 0, 1},
    {"{\"seed\":42,\"temperature\":1}", 0, 1},
    {"{}", 0, 0},                          /* default temperature is 1 */
    {"{\"temperature\":0.2}", 0, 0},
    {"{\"temperature\":\"0\"}", 0, 0},
    {"{\"temperature\":0,\"tools\":[{\"type\":\"function\"}]}", 0, 0},
    {"{\"temperature\":0,\"tools\":[{\"type\":\"function\"}]}", 1, 1},
    {"{\"temperature\":0,\"tools\":[]}", 0, 1},
    {"{\"temperature\":0,\"functions\":[{\"name\":\"f\"}]}", 0, 0},
};

ParameterizedTestParameters(key, cacheable)
{
    return cr_make_param_array(struct cacheable_case, cacheable_cases,
                               sizeof(cacheable_cases) / sizeof(cacheable_cases[0]));
}

ParameterizedTest(struct cacheable_case *c, key, cacheable, .timeout = 5)
{
    cJSON *req = cJSON_Parse(c->json);

    cr_assert_eq(cache_cacheable(req, c->allow_tools), c->want, "%s", c->json);
    cJSON_Delete(req);
}
