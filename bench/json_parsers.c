/*
 * bench/json_parsers.c: how long the C JSON parsers Debian 12 ships take
 * to read one request body, for bench/PROFILE.md (seventh pass). It backs
 * a decision, keeping cJSON, and is not part of `make bench`: it needs
 * three -dev packages the router does not use.
 *
 *   apt-get install libcjson-dev libyajl-dev libjsmn-dev libjsonparser-dev
 *   cc -O2 -o build/json_parsers bench/json_parsers.c -lcjson -lyajl \
 *      /usr/lib/x86_64-linux-gnu/libjsonparser.a -lm
 *   build/json_parsers bench/chat.json
 *
 * Each parser reads the body the way the router would need it read:
 * - cJSON: a tree, its nodes from an arena that is reset per parse (as
 *   router/jsonmem.c does);
 * - yajl: callbacks only, no tree, UTF-8 checks off (a lower bound for
 *   anything built on it);
 * - jsmn: token boundaries only: strings not unescaped, numbers not
 *   converted, so less than the router needs (a lower bound again);
 * - json-parser (udp): a tree from malloc.
 * Prints microseconds per parse, the best of five runs of 100,000.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <json-parser/json.h>
#include <yajl/yajl_parse.h>
#define JSMN_STATIC
#include <jsmn.h>

#define PARSES 100000
#define RUNS 5

static char arena[1 << 16];
static size_t arena_used;

static void *arena_alloc(size_t n)
{
    void *p;

    n = (n + 15) & ~(size_t)15;
    if (arena_used + n > sizeof(arena))
        return NULL;
    p = arena + arena_used;
    arena_used += n;
    return p;
}

static void arena_free(void *p)
{
    (void)p;
}

static int cjson_parse(const char *body, size_t len)
{
    arena_used = 0;
    return cJSON_ParseWithLength(body, len) != NULL;
}

static int y_null(void *ctx)
{
    (void)ctx;
    return 1;
}

static int y_bool(void *ctx, int b)
{
    (void)ctx;
    (void)b;
    return 1;
}

static int y_bytes(void *ctx, const unsigned char *s, size_t len)
{
    (void)ctx;
    (void)s;
    (void)len;
    return 1;
}

static int y_number(void *ctx, const char *s, size_t len)
{
    (void)ctx;
    (void)s;
    (void)len;
    return 1;
}

static const yajl_callbacks yajl_cbs = {
    .yajl_null = y_null,
    .yajl_boolean = y_bool,
    .yajl_number = y_number,
    .yajl_string = y_bytes,
    .yajl_start_map = y_null,
    .yajl_map_key = y_bytes,
    .yajl_end_map = y_null,
    .yajl_start_array = y_null,
    .yajl_end_array = y_null,
};

static int yajl_parse_body(const char *body, size_t len)
{
    yajl_handle y = yajl_alloc(&yajl_cbs, NULL, NULL);
    int ok;

    yajl_config(y, yajl_dont_validate_strings, 1);
    ok = yajl_parse(y, (const unsigned char *)body, len) == yajl_status_ok &&
         yajl_complete_parse(y) == yajl_status_ok;
    yajl_free(y);
    return ok;
}

static int jsmn_tokens(const char *body, size_t len)
{
    jsmn_parser p;
    jsmntok_t tokens[256];

    jsmn_init(&p);
    return jsmn_parse(&p, body, len, tokens, 256) > 0;
}

static int json_parser_parse(const char *body, size_t len)
{
    json_value *v = json_parse(body, len);

    json_value_free(v);
    return v != NULL;
}

static double seconds(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void measure(const char *name, int (*parse)(const char *, size_t), const char *body,
                    size_t len)
{
    double best = 1e9;

    for (int run = 0; run < RUNS; run++) {
        double t0 = seconds(), t;

        for (int i = 0; i < PARSES; i++) {
            if (!parse(body, len)) {
                fprintf(stderr, "%s: the body does not parse\n", name);
                exit(1);
            }
        }
        t = seconds() - t0;
        if (t < best)
            best = t;
    }
    printf("%-12s %6.2f us per parse\n", name, best / PARSES * 1e6);
}

int main(int argc, char **argv)
{
    static char body[1 << 15];
    cJSON_Hooks hooks = {arena_alloc, arena_free};
    FILE *f;
    size_t len;

    if (argc != 2 || (f = fopen(argv[1], "rb")) == NULL) {
        fprintf(stderr, "usage: %s BODY.json\n", argv[0]);
        return 2;
    }
    len = fread(body, 1, sizeof(body), f);
    fclose(f);
    printf("%zu-byte body\n", len);
    cJSON_InitHooks(&hooks);
    measure("cJSON", cjson_parse, body, len);
    measure("yajl", yajl_parse_body, body, len);
    measure("jsmn", jsmn_tokens, body, len);
    measure("json-parser", json_parser_parse, body, len);
    return 0;
}
