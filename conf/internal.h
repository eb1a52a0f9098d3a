/*
 * conf/internal.h: what the files of conf/ share while loading.
 *
 * conf_load() (conf.c) runs three phases over one struct conf__ctx:
 *   1. parse.c: walk the YAML tree, match each key against a table of
 *      directives and convert its value into the field at the directive's
 *      offset, recording which keys were given and on which line; an
 *      `include:` reads each price file right there (conf__include), with
 *      ctx->file switched to it so its errors carry its name;
 *   2. parse.c: apply each table's defaults to the fields still unset and
 *      report missing required keys;
 *   3. check.c: cross-check (duplicates found by sorting, unknown backends,
 *      prices, impossible SLOs, experiments) and build the sorted lookup
 *      indexes.
 * Every problem goes through conf__error() so it reads
 * "FILE:LINE: KEY: message"; loading carries on to report them all.
 */
#ifndef CONF_INTERNAL_H
#define CONF_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"

struct conf;
struct fy_node;

/* One entry of the tenant key index (conf._keys). */
struct conf__key {
    uint8_t hash[32];                 /* SHA-256 of the tenant's key (copied: the
                                         search reads only this array) */
    const struct conf_key *key;       /* the entry, in its tenant's keys */
};

/* What phase 1 learnt about one mapping (the top level, a backend, a
 * route, a tenant, an experiment or an arm), for phases 2 and 3. */
struct conf__meta {
    uint64_t set;    /* bit i: directive i of the object's table was given */
    int line;        /* line of the mapping itself */
    int lines[64];   /* line of each given directive's value */
    char **items;    /* route: candidate names as written (owned) */
    int *item_lines; /* the object's one list of names (route candidates, tenant
                        api_keys, experiment tenants, arm backends): line of each */
    size_t nitems;   /* entries in items (routes) or item_lines */
    struct conf__meta *sub; /* experiment: one per arm (owned) */
    size_t nsub;     /* entries in sub */
};

/* One reported problem: a line of conf__ctx.text. */
struct conf__err {
    int file;   /* 0: the config, i: conf.includes[i - 1]; sorted by first */
    int line;   /* line in the file, to sort the report by */
    size_t off; /* start of "FILE:LINE: KEY: message\n" in conf__ctx.text */
    size_t len; /* its length, newline included */
};

/* Loading state shared by the phases. */
struct conf__ctx {
    const char *file;                /* path, as the prefix of every error: the
                                        config's, or an included file's while
                                        that one is read */
    int file_no;                     /* conf__err.file of errors reported now */
    struct conf *conf;               /* being filled; owned by conf_load */
    struct buf text;                 /* the error lines, in the order found */
    struct conf__err *errs;          /* one per error line */
    size_t nerrs;                    /* entries in errs */
    size_t caperrs;                  /* entries allocated */
    unsigned oom:1;                  /* an allocation failed: the load fails */
    struct conf__meta root;          /* the top-level mapping */
    struct conf__meta *backend_meta; /* one per conf.backends entry */
    struct conf__meta *route_meta;   /* one per conf.routes entry */
    struct conf__meta *tenant_meta;  /* one per conf.tenants entry */
    struct conf__meta *experiment_meta; /* one per conf.experiments entry */
};

/* conf_load() of `len` bytes of config text, as if read from `path`:
 * errors name it, and `include:` resolves against its folder (price
 * files are still read from disk). For the fuzz target
 * (tests/fuzz/fuzz_conf.c), which has no file to give. */
struct conf *conf__load_text(const char *path, const char *text, size_t len, char **errors);

/* Directive indexes, one enum per table: bit i of conf__meta.set and
 * lines[i] refer to directive i. check.c names them to find out whether a
 * key was given and where. */
enum conf__root_key {
    CONF__R_LISTEN, CONF__R_TLS, CONF__R_TLS_CERT_FILE, CONF__R_TLS_KEY_FILE,
    CONF__R_ADMIN_KEY, CONF__R_ADMIN_RELOAD_TIMEOUT, CONF__R_COST_LOG, CONF__R_COST_LOG_BUFFER_MAX, CONF__R_COST_LOG_WAIT,
    CONF__R_INCLUDE, CONF__R_PRICES,
    CONF__R_TOKENIZER_DATA,
    CONF__R_STORE, CONF__R_REDIS, CONF__R_ON_FAILURE, CONF__R_KEY_PREFIX,
    CONF__R_STORE_CONNECT_TIMEOUT, CONF__R_COMMAND_TIMEOUT, CONF__R_RESERVATION_TTL,
    CONF__R_JOURNAL_FILE, CONF__R_SPEND_FILE,
    CONF__R_CACHE, CONF__R_CACHE_ENABLED, CONF__R_CACHE_TTL, CONF__R_MAX_ENTRY_BYTES,
    CONF__R_LOCAL_BYTES, CONF__R_CACHE_SHARED, CONF__R_CACHE_TOOLS,
    CONF__R_LIMITS, CONF__R_MAX_HEADER_BYTES, CONF__R_MAX_BODY_BYTES,
    CONF__R_HEADER_TIMEOUT, CONF__R_BODY_TIMEOUT, CONF__R_IDLE_TIMEOUT,
    CONF__R_MAX_RETRIES, CONF__R_MAX_CONNECTIONS,
    CONF__R_CORS, CONF__R_CORS_ORIGINS, CONF__R_CORS_MAX_AGE,
    CONF__R_BACKENDS, CONF__R_ROUTES, CONF__R_TENANTS, CONF__R_EXPERIMENTS,
    CONF__R_COUNT
};

enum conf__backend_key {
    CONF__B_NAME, CONF__B_KIND, CONF__B_URL, CONF__B_MODEL, CONF__B_TOKENIZER,
    CONF__B_QUALITY, CONF__B_CONTEXT_WINDOW, CONF__B_FREE,
    CONF__B_GPU_HOURLY_USD, CONF__B_REPLICAS, CONF__B_MAX_CONCURRENCY,
    CONF__B_TOKENS_PER_SECOND,
    CONF__B_API_KEY, CONF__B_AUTH_HEADER, CONF__B_PRICE, CONF__B_INPUT_USD,
    CONF__B_OUTPUT_USD, CONF__B_CACHED_INPUT_USD,
    CONF__B_CONNECT_TIMEOUT, CONF__B_FIRST_BYTE_TIMEOUT, CONF__B_TOTAL_TIMEOUT,
    CONF__B_READ_TIMEOUT,
    CONF__B_MAX_IDLE, CONF__B_TTFT_STALE, CONF__B_CA_FILE, CONF__B_TLS_VERIFY,
    CONF__B_STREAM_USAGE,
    CONF__B_LONG_CONTEXT, CONF__B_LONG_ABOVE, CONF__B_LONG_INPUT_USD, CONF__B_LONG_OUTPUT_USD,
    CONF__B_LONG_CACHED_INPUT_USD,
    /* per service tier, CONF__TIER_KEYS keys in this order (check.c counts on it) */
    CONF__B_FLEX, CONF__B_FLEX_INPUT_USD, CONF__B_FLEX_OUTPUT_USD, CONF__B_FLEX_CACHED_INPUT_USD,
    CONF__B_PRIORITY, CONF__B_PRIORITY_INPUT_USD, CONF__B_PRIORITY_OUTPUT_USD,
    CONF__B_PRIORITY_CACHED_INPUT_USD,
    CONF__B_API, CONF__B_CACHE_WRITE_USD,
    CONF__B_LONG_CACHE_WRITE_USD, CONF__B_CACHE_WRITE_1H_USD, CONF__B_LONG_CACHE_WRITE_1H_USD,
    CONF__B_WEB_SEARCH_USD, CONF__B_COST_FROM_USAGE, CONF__B_FILE_SEARCH_USD,
    CONF__B_COUNT
};

enum conf__route_key { CONF__RT_MODEL, CONF__RT_CANDIDATES, CONF__RT_COUNT };

enum conf__tenant_key {
    CONF__T_ID, CONF__T_API_KEYS,
    CONF__T_BUDGET, CONF__T_DAILY_USD, CONF__T_MONTHLY_USD, CONF__T_ON_EXHAUSTED,
    CONF__T_SOFT_LIMIT, CONF__T_ON_OVERRUN,
    CONF__T_RATE_LIMITS, CONF__T_RPM, CONF__T_TPM,
    CONF__T_SLO, CONF__T_MAX_TTFT_MS, CONF__T_MIN_QUALITY,
    CONF__T_TAGS, CONF__T_MODELS,
    CONF__T_COUNT
};

enum conf__experiment_key {
    CONF__E_NAME, CONF__E_ROUTE, CONF__E_TENANTS, CONF__E_USER_HEADER, CONF__E_ARMS,
    CONF__E_COUNT
};

enum conf__arm_key { CONF__A_NAME, CONF__A_WEIGHT, CONF__A_BACKENDS, CONF__A_COUNT };

enum conf__key_key {
    CONF__K_HASH, CONF__K_NAME, CONF__K_RPM, CONF__K_TPM, CONF__K_MODELS, CONF__K_BUDGET,
    CONF__K_DAILY_USD, CONF__K_MONTHLY_USD, CONF__K_COUNT
};

enum conf__price_key {
    CONF__P_INPUT_USD, CONF__P_OUTPUT_USD, CONF__P_CACHED_INPUT_USD,
    CONF__P_LONG_CONTEXT, CONF__P_LONG_ABOVE, CONF__P_LONG_INPUT_USD, CONF__P_LONG_OUTPUT_USD,
    CONF__P_LONG_CACHED_INPUT_USD,
    CONF__P_FLEX, CONF__P_FLEX_INPUT_USD, CONF__P_FLEX_OUTPUT_USD, CONF__P_FLEX_CACHED_INPUT_USD,
    CONF__P_PRIORITY, CONF__P_PRIORITY_INPUT_USD, CONF__P_PRIORITY_OUTPUT_USD,
    CONF__P_PRIORITY_CACHED_INPUT_USD,
    CONF__P_CACHE_WRITE_USD, CONF__P_LONG_CACHE_WRITE_USD,
    CONF__P_CACHE_WRITE_1H_USD, CONF__P_LONG_CACHE_WRITE_1H_USD,
    CONF__P_WEB_SEARCH_USD, CONF__P_FILE_SEARCH_USD,
    CONF__P_COUNT
};

/* A service tier's keys, from its section key (CONF__B_FLEX, CONF__P_FLEX,
 * ...): the section, then the input, output and cached input rates. The
 * tier's section key is that of flex plus (tier - CONF_TIER_FLEX) x this. */
#define CONF__TIER_KEYS 4
enum { CONF__TIER_INPUT = 1, CONF__TIER_OUTPUT = 2, CONF__TIER_CACHED = 3 };

/* The top level of an included file. */
enum conf__included_key { CONF__I_PRICES, CONF__I_COUNT };

/* Record one problem: "FILE:LINE: PATH: message". A line below 1 is shown
 * as 1. Never pass a secret in the message. Always returns -1, so callers
 * can `return conf__error(...)`. */
int conf__error(struct conf__ctx *ctx, int line, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Free a `models:` list's names and lines (kept from phase 1 to 3). */
void conf__models_names_free(struct conf_models *m);

/* Phase 1: parse the top-level mapping `root` (may be NULL) into ctx->conf
 * and the metas; returns -1 if `root` is not a mapping at all, when the
 * later phases would only repeat that. Phase 2: apply defaults and report
 * missing keys. */
int conf__parse(struct conf__ctx *ctx, struct fy_node *root);
void conf__defaults(struct conf__ctx *ctx);
/* Phase 3: cross-checks, then the sorted indexes (also on error, so that
 * conf_free finds a consistent struct). */
void conf__check(struct conf__ctx *ctx);

/* Phase 1 of an `include:` entry `rel` (written at `line`, key `path`):
 * resolve it against the config's folder, read it and parse its prices
 * into ctx->conf, its errors carrying its own name and lines. */
void conf__include(struct conf__ctx *ctx, const char *rel, int line, const char *path);
/* Parse the top-level mapping `root` of an included file (which may only
 * hold `prices:`). */
void conf__parse_included(struct conf__ctx *ctx, struct fy_node *root);

/* Reports every key that a mapping under `root` gives twice, by its path,
 * at the second with the line of the first; returns how many. For a
 * document libfyaml refused, read again with duplicate keys allowed:
 * libfyaml names neither the key nor the first, and stops at one. */
size_t conf__duplicate_keys(struct conf__ctx *ctx, struct fy_node *root);

/* Split "http[s]://HOST[:PORT][/PATH][?QUERY]" into the backend's tls,
 * host, host_is_ipv6, port, base_path (trailing '/' dropped) and query
 * (http_query_check; NULL without a '?'). Returns 0, or -1 after reporting
 * the problem at (line, path). Never echoes the url back, since a url may
 * carry credentials. */
int conf__parse_url(struct conf__ctx *ctx, struct conf_backend *b, const char *url, int line,
                    const char *path);
/* Split "HOST:PORT", "[V6]:PORT" or ":PORT" (any address) into listen_host
 * and listen_port (0..65535). Returns 0 or -1 as above. */
int conf__parse_listen(struct conf__ctx *ctx, const char *text, int line, const char *path);
/* Split "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]" into the redis_*
 * fields. Returns 0 or -1 as above; the password is never echoed. */
int conf__parse_redis(struct conf__ctx *ctx, const char *url, int line, const char *path);

/* Replace ${NAME} with the environment variable NAME ("$${" stands for a
 * literal "${"). Returns a malloc'd string, or NULL after reporting an
 * unset variable or a malformed reference at (line, path). */
char *conf__interpolate(struct conf__ctx *ctx, const char *text, size_t len, int line,
                        const char *path);

/* Write `s` (len bytes) into out[CONF__QUOTE_SIZE] as a double-quoted,
 * escaped, length-capped string, so an echoed value cannot break the
 * one-line-per-error format. Returns out. Never use it on a secret. */
#define CONF__QUOTE_SIZE 96
const char *conf__quote(char *out, const char *s, size_t len);

#endif
