/*
 * cache/key.c: the response cache key and the cacheable predicate.
 *
 * The key is SHA-256 over a canonical encoding of (route, upstream model,
 * request), where the request loses the fields that do not change the
 * answer and every object's keys are sorted, so two requests that differ
 * only in key order, streaming or the end-user id share one entry. The
 * encoding is length-prefixed (not JSON), so no two different inputs
 * encode alike. Numbers go through their double value, so 1 and 1.0 agree.
 *
 * stream_options stays in: its members change the stream (include_usage
 * adds the usage event, OpenAI's include_obfuscation: false drops every
 * chunk's padding, vLLM's continuous_usage_stats puts usage in each
 * chunk), and a replay gives the events its first client got. A member at
 * its default asks nothing and is left out, as are a null and an object
 * left empty, so {"include_usage": false} is the entry of no options.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache.h"

/* Top-level fields that do not change the answer. "model" is replaced by
 * the route and upstream model given by the caller. */
static const char *const ignored[] = {"stream", "user", "store", "metadata", "model"};

/* Where an object being encoded is: members to leave out depend on it. */
enum where { W_NESTED, W_TOP, W_STREAM_OPTIONS };

/* The stream_options members whose default is known, and that default. */
static const struct {
    const char *name;
    int value;
} option_defaults[] = {
    {"include_usage", 0},
    {"include_obfuscation", 1},
    {"continuous_usage_stats", 0},
};

static int is_ignored(const char *name)
{
    for (size_t i = 0; i < sizeof(ignored) / sizeof(ignored[0]); i++)
        if (strcmp(name, ignored[i]) == 0)
            return 1;
    return 0;
}

/* A stream_options member that asks what it would without it. */
static int is_default_option(const cJSON *m)
{
    for (size_t i = 0; i < sizeof(option_defaults) / sizeof(option_defaults[0]); i++)
        if (strcmp(m->string, option_defaults[i].name) == 0)
            return option_defaults[i].value ? cJSON_IsTrue(m) : cJSON_IsFalse(m);
    return 0;
}

/* stream_options that ask nothing: null, or every member at its default. */
static int options_ask_nothing(const cJSON *v)
{
    if (cJSON_IsNull(v))
        return 1;
    if (!cJSON_IsObject(v))
        return 0;
    for (const cJSON *m = v->child; m; m = m->next)
        if (!is_default_option(m))
            return 0;
    return 1;
}

/* Is member `m` of an object at `where` left out of the key? */
static int left_out(const cJSON *m, enum where where)
{
    if (m->string == NULL || where == W_NESTED)
        return 0;
    if (where == W_STREAM_OPTIONS)
        return is_default_option(m);
    return is_ignored(m->string) ||
           (strcmp(m->string, "stream_options") == 0 && options_ask_nothing(m));
}

/* Hash "TAG LEN:" then `len` bytes of p, or, with p NULL, only the header
 * (containers: LEN is then their element count). */
static int feed(EVP_MD_CTX *md, char tag, const void *p, size_t len)
{
    char head[24];
    int n = snprintf(head, sizeof(head), "%c%zu:", tag, len);

    if (EVP_DigestUpdate(md, head, (size_t)n) != 1)
        return -ENOMEM;
    return p == NULL || EVP_DigestUpdate(md, p, len) == 1 ? 0 : -ENOMEM;
}

static int by_name(const void *a, const void *b)
{
    const cJSON *x = *(const cJSON *const *)a, *y = *(const cJSON *const *)b;

    return strcmp(x->string ? x->string : "", y->string ? y->string : "");
}

static int encode(EVP_MD_CTX *md, const cJSON *v, enum where where)
{
    char num[40];
    const cJSON *ch;
    const cJSON **kids;
    size_t n = 0, i;
    int rc = 0;

    if (cJSON_IsString(v))
        return feed(md, 's', v->valuestring, strlen(v->valuestring));
    if (cJSON_IsNumber(v)) {
        snprintf(num, sizeof(num), "%.17g", v->valuedouble);
        return feed(md, 'n', num, strlen(num));
    }
    if (cJSON_IsTrue(v))
        return feed(md, 't', "", 0);
    if (cJSON_IsFalse(v))
        return feed(md, 'f', "", 0);
    if (cJSON_IsArray(v)) {
        for (ch = v->child; ch; ch = ch->next)
            n++;
        if ((rc = feed(md, 'a', NULL, n)) < 0)
            return rc;
        for (ch = v->child; ch && rc == 0; ch = ch->next)
            rc = encode(md, ch, W_NESTED);
        return rc;
    }
    if (!cJSON_IsObject(v))
        return feed(md, 'z', "", 0); /* null (and raw, never parsed) */
    for (ch = v->child; ch; ch = ch->next)
        n++;
    kids = malloc((n ? n : 1) * sizeof(*kids));
    if (kids == NULL)
        return -ENOMEM;
    n = 0;
    for (ch = v->child; ch; ch = ch->next)
        if (!left_out(ch, where))
            kids[n++] = ch;
    qsort(kids, n, sizeof(*kids), by_name);
    rc = feed(md, 'o', NULL, n);
    for (i = 0; i < n && rc == 0; i++) {
        const char *name = kids[i]->string ? kids[i]->string : "";
        rc = feed(md, 'k', name, strlen(name));
        if (rc == 0)
            rc = encode(md, kids[i],
                        where == W_TOP && strcmp(name, "stream_options") == 0 ? W_STREAM_OPTIONS
                                                                               : W_NESTED);
    }
    free(kids);
    return rc;
}

int cache_key_make(const char *route, const char *upstream_model, const cJSON *request,
                   struct cache_key *out)
{
    static const char version[] = "costrouter-cache-v1";
    EVP_MD_CTX *md;
    unsigned len = 0;
    int rc = -ENOMEM;

    if (!cJSON_IsObject(request) || route == NULL || upstream_model == NULL)
        return -EINVAL;
    md = EVP_MD_CTX_new();
    if (md == NULL)
        return -ENOMEM;
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
        goto done;
    if (feed(md, 'v', version, sizeof(version) - 1) < 0 ||
        feed(md, 'r', route, strlen(route)) < 0 ||
        feed(md, 'm', upstream_model, strlen(upstream_model)) < 0)
        goto done;
    if ((rc = encode(md, request, W_TOP)) < 0)
        goto done;
    rc = EVP_DigestFinal_ex(md, out->sha256, &len) == 1 && len == 32 ? 0 : -ENOMEM;
done:
    EVP_MD_CTX_free(md);
    return rc;
}

int cache_cacheable(const cJSON *request, int allow_tools)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(request, "temperature");
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(request, "seed");
    /* mcp_servers: Anthropic's MCP connector, the tools of remote servers */
    const char *tools[] = {"tools", "functions", "mcp_servers"};

    if (!cJSON_IsObject(request))
        return 0;
    if (!(cJSON_IsNumber(t) && t->valuedouble == 0) && !cJSON_IsNumber(seed))
        return 0;
    if (!allow_tools)
        for (size_t i = 0; i < sizeof(tools) / sizeof(tools[0]); i++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(request, tools[i]);
            if (v != NULL && !cJSON_IsNull(v) && !(cJSON_IsArray(v) && v->child == NULL))
                return 0;
        }
    return 1;
}
