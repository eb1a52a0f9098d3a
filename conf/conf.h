/*
 * conf/conf.h: the loaded, validated configuration.
 *
 * conf_load() parses one YAML file (and the price files it includes),
 * interpolates ${ENV_VAR}, applies defaults and cross-checks references,
 * and returns an immutable struct
 * conf. Everything in it is owned by the struct and freed by conf_free().
 * Other modules read these fields; none writes them. conf_load logs
 * nothing and keeps no state between calls: a reload runs it off the
 * event loop, on a thread of its own. A reload builds a new
 * struct conf; requests in flight keep the old one (reference counted).
 */
#ifndef CONF_CONF_H
#define CONF_CONF_H

#include <stddef.h>
#include <stdint.h>

struct conf__key;

/* Longest name (of a backend, tenant, price, experiment, arm or key) and
 * model id, in bytes: the store puts tenant ids in its keys and the
 * router model ids in cache keys, each within bounds of its own. */
#define CONF_NAME_MAX 200
/* Most candidates a route may have: policy/ keeps a request's tried
 * candidates and its A/B arm's as bits of a 64-bit mask. */
#define CONF_CANDIDATES_MAX 64
/* Longest store.key_prefix, in bytes. */
#define CONF_KEY_PREFIX_MAX 128
/* Longest origin `cors.allow_origins` takes (scheme://host:port). */
#define CONF_ORIGIN_MAX 512

enum conf_backend_kind { CONF_BACKEND_API, CONF_BACKEND_SELF_HOSTED };
enum conf_tokenizer { CONF_TOK_ESTIMATE, CONF_TOK_CL100K, CONF_TOK_O200K, CONF_TOK_LLAMA3 };
/* The API a backend speaks: OpenAI's (chat/completions, completions,
 * embeddings, responses) or Anthropic's Messages API (/messages). A
 * request goes only to candidates that speak its endpoint's API. */
enum conf_api { CONF_API_OPENAI, CONF_API_ANTHROPIC, CONF_API_COUNT };
enum conf_on_failure { CONF_FAIL_OPEN, CONF_FAIL_CLOSED };
enum conf_on_exhausted { CONF_EXHAUSTED_REJECT, CONF_EXHAUSTED_DOWNGRADE };
/* A stream that outruns its reservation: charge the overrun and go on, or
 * charge it and cut the stream once the budget is gone. */
enum conf_on_overrun { CONF_OVERRUN_CHARGE, CONF_OVERRUN_CUT };

/* Prices for a long prompt: some APIs bill a whole request at higher rates
 * once its prompt (cached tokens included) passes a size, e.g. Gemini 2.5
 * Pro and Claude Sonnet 4 past 200k tokens. */
struct conf_long_context {
    int64_t above_prompt_tokens;      /* past this many prompt tokens; 0 = no such tier */
    double input_usd_per_mtok;        /* the rates that then bill every token */
    double output_usd_per_mtok;
    double cached_input_usd_per_mtok; /* default: this tier's input price */
    double cache_write_usd_per_mtok;  /* default: 1.25 x this tier's input price */
    double cache_write_1h_usd_per_mtok; /* default: 2 x this tier's input price */
};

/* OpenAI's per-request processing tiers: a request's `service_tier`
 * ("flex": slower, about half price; "priority": faster, about twice) and
 * the answer's, which says what was billed. Any other tier ("default",
 * "auto", "scale") is billed at the standard rates. */
enum conf_service_tier { CONF_TIER_STANDARD, CONF_TIER_FLEX, CONF_TIER_PRIORITY, CONF_TIER_COUNT };

/* The rates of one service tier (`flex:` or `priority:` on a price entry
 * or a backend). They replace the standard rates, long_context's too:
 * OpenAI, the one API with such tiers, has no long-prompt rates. */
struct conf_tier_rates {
    unsigned priced:1;                /* the tier has rates; else it bills at the standard ones */
    double input_usd_per_mtok;
    double output_usd_per_mtok;
    double cached_input_usd_per_mtok; /* default: this tier's input price */
};
/* Anthropic's cache write prices, relative to the input price: 5-minute
 * writes (cache_write_usd_per_mtok) and 1-hour ones
 * (cache_write_1h_usd_per_mtok), the defaults wherever they are not given. */
#define CONF_CACHE_WRITE_FACTOR 1.25
#define CONF_CACHE_WRITE_1H_FACTOR 2.0

/* One entry of a `prices:` mapping (in the config or an included file). */
struct conf_price {
    char *name;                 /* entry name, e.g. "gpt-4o-mini" */
    const char *file;           /* file it was read from: conf.path or one of conf.includes */
    int line;                   /* line of the entry in that file */
    double input_usd_per_mtok;  /* USD per million uncached prompt tokens */
    double output_usd_per_mtok; /* USD per million completion tokens */
    double cached_input_usd_per_mtok; /* USD per million cached prompt tokens (default: input) */
    double cache_write_usd_per_mtok;  /* USD per million prompt tokens written to the
                                         provider's cache (default: 1.25 x input) */
    double cache_write_1h_usd_per_mtok; /* of those, written to its 1-hour cache
                                           (default: 2 x input) */
    double web_search_usd_per_1k; /* USD per 1,000 server-side web searches (Anthropic's
                                     usage.server_tool_use.web_search_requests, a Responses
                                     answer's web_search_call items); default 0 */
    double file_search_usd_per_1k; /* USD per 1,000 file search calls (a Responses answer's
                                      file_search_call items); default 0 */
    struct conf_long_context long_context; /* complete when its above_prompt_tokens > 0 */
    struct conf_tier_rates tiers[CONF_TIER_COUNT]; /* flex and priority; [STANDARD] unused */
};

struct conf_backend {
    char *name;                 /* unique name, used in routes and logs */
    int line;                   /* line of this entry in the file */
    size_t index;               /* position in conf.backends */
    enum conf_backend_kind kind;
    enum conf_api api;          /* `api:`, default openai */
    char *url;                  /* as written, e.g. https://api.openai.com/v1; its query
                                   may hold a key: never print it */
    unsigned tls:1;             /* url scheme is https */
    unsigned tls_verify:1;      /* verify the certificate (default on) */
    unsigned is_free:1;         /* `free: true`: allowed to have no price */
    unsigned stream_usage:1;    /* ask streams for usage at the end (default on) */
    unsigned cost_from_usage:1; /* `cost_from_usage: true` (api): charge the cost the
                                   answer's usage reports (OpenRouter's usage.cost,
                                   Perplexity's usage.cost.total_cost) when it has one */
    char *host;                 /* host part of url (for connect, SNI, Host:); an IPv6
                                   literal is stored without its brackets */
    unsigned host_is_ipv6:1;    /* host is an IPv6 literal: bracket it in Host: */
    uint16_t port;              /* port, default 80/443 */
    char *base_path;            /* path part of url without trailing '/', e.g. "/v1" */
    char *query;                /* url's query without its '?' (api-version=2024-10-21),
                                   sent with every request (common/http_query.h), or
                                   NULL; may hold a key: never logged */
    char *ca_file;              /* pinned CA bundle, or NULL for the system store */
    char *model;                /* upstream's own model name, replaces "model" */
    char *api_key;              /* secret sent upstream, or NULL; never logged */
    char *auth_header;          /* header carrying api_key, default "Authorization":
                                   that one gets "Bearer <key>", any other (e.g.
                                   x-api-key) the raw key */
    enum conf_tokenizer tokenizer;
    int quality;                /* higher is better */
    int64_t context_window;     /* tokens */
    /* self_hosted */
    double gpu_hourly_usd;      /* price of one replica per hour */
    int replicas;               /* >= 1 (default 1) */
    int max_concurrency;        /* per replica; 0 only for a `free` backend that omits it */
    double tokens_per_second;   /* measured capacity of one replica; 0 as above */
    /* api: each of the three prices is the backend's own if given, else
     * its price entry's; cached input falls back to the input price */
    char *price_name;           /* `price:` as written, or NULL (then `model` is tried) */
    const struct conf_price *price; /* the entry prices were taken from, or NULL */
    double input_usd_per_mtok;
    double output_usd_per_mtok;
    double cached_input_usd_per_mtok; /* defaults to input_usd_per_mtok */
    double cache_write_usd_per_mtok;  /* defaults to 1.25 x input_usd_per_mtok */
    double cache_write_1h_usd_per_mtok; /* defaults to 2 x input_usd_per_mtok */
    double web_search_usd_per_1k;      /* per 1,000 web searches; the entry's, else 0 */
    double file_search_usd_per_1k;     /* per 1,000 file search calls; likewise */
    struct conf_long_context long_context; /* each key the backend's own, else the entry's */
    struct conf_tier_rates tiers[CONF_TIER_COUNT]; /* likewise; [STANDARD] unused */
    unsigned tiered:1;          /* a tier is priced: the answer's service_tier is read */
    /* upstream connection limits, milliseconds (defaults in conf.c) */
    int connect_timeout_ms;
    int first_byte_timeout_ms;
    int total_timeout_ms;
    int read_timeout_ms;        /* longest silence between two reads of an answer
                                   that has begun (a stream's first event, a plain
                                   answer's head); default first_byte_timeout_ms */
    int max_idle_connections;   /* kept-alive idle upstream connections */
    int ttft_stale_ms;          /* a TTFT average this old is re-measured by one
                                   request (a latency probe); 0 = never */
};

struct conf_route {
    char *model;                       /* what clients put in "model" */
    int line;
    struct conf_backend **candidates;  /* borrowed from conf.backends, in order */
    size_t ncandidates;
    uint64_t speaks[CONF_API_COUNT];   /* bit i: candidates[i] speaks that API; 0: none
                                          does (the route is unknown to that API) */
};

struct conf_tag {
    char *key;
    char *value;
};

struct conf_tenant;

/* One accepted tenant key: an api_keys entry, written either as a plain
 * "sha256:..." string or as {hash, name, rpm, tpm}. */
/* A `models:` list, a tenant's or a key's: the routes (by the "model"
 * clients send) it allows. */
struct conf_models {
    const struct conf_route **routes; /* sorted by address for the conf_*_allows
                                         lookups; NULL = every route */
    size_t n;                         /* entries in routes */
    char **names;                     /* as written, and their lines: kept from parsing */
    int *lines;                       /* until check.c resolves them, then freed */
    size_t nnames;
};

struct conf_key {
    uint8_t hash[32];                 /* SHA-256 of the key */
    char *name;                       /* label for logs and metrics, or NULL; unique in its tenant */
    int line;                         /* line of the entry */
    size_t index;                     /* position in tenant->keys */
    int64_t rpm;                      /* requests per minute through this key, 0 = no limit */
    int64_t tpm;                      /* tokens per minute through this key, 0 = no limit */
    const struct conf_tenant *tenant; /* owner */
    struct conf_models models;        /* `models:`, within its tenant's */
    double daily_usd;                 /* budget.daily_usd, 0 = none (the tenant's binds too) */
    double monthly_usd;               /* budget.monthly_usd, 0 = none */
    char *subject;                    /* what the store counts its spend under ("TENANT#NAME",
                                         see CONF_KEY_SUBJECT_SEP), or NULL: no budget */
};

/* Between a tenant's id and a key's name in conf_key.subject. Names never
 * hold it, so no subject is a tenant id, nor two keys' the same; nor do
 * they hold '{' or '}', so the store's hash tag stays whole. */
#define CONF_KEY_SUBJECT_SEP '#'
#define CONF_SUBJECT_MAX (2 * CONF_NAME_MAX + 1)

struct conf_tenant {
    char *id;
    int line;
    uint8_t (*key_hashes)[32];   /* SHA-256 of each accepted key (same as keys[i].hash) */
    struct conf_key *keys;       /* the keys with their limits, parallel to key_hashes */
    size_t nkeys;
    double daily_usd;            /* 0 = no daily budget */
    double monthly_usd;          /* 0 = no monthly budget */
    enum conf_on_exhausted on_exhausted;
    int soft_limit_pct;          /* budget.soft_limit_pct: from this share of a budget on,
                                    behave as if exhausted (downgrade early); 0 = none */
    enum conf_on_overrun on_overrun; /* budget.on_overrun, default charge */
    int64_t rpm;                 /* rate_limits.rpm, requests per minute; 0 = no limit */
    int64_t tpm;                 /* rate_limits.tpm, tokens per minute; 0 = no limit */
    int max_ttft_ms;             /* 0 = no latency SLO */
    int min_quality;             /* 0 = any */
    struct conf_tag *tags;
    size_t ntags;
    struct conf_models models;   /* `models:` the routes it may use */
};

/* One arm of an experiment. */
struct conf_arm {
    char *name;                  /* unique in its experiment */
    int line;
    int weight;                  /* relative share, >= 0 (default 1); the arms' sum is > 0 */
    char **backends;             /* backend names (route candidates) the arm may use;
                                    NULL = all of the route's candidates */
    size_t nbackends;            /* length of backends */
};

/* An A/B experiment over one route (policy/experiment.h takes the same
 * shape: the strings can be passed as they are). */
struct conf_experiment {
    char *name;                  /* unique */
    int line;
    char *route;                 /* model name of an existing route */
    char **tenants;              /* tenant ids taking part; NULL = all tenants */
    size_t ntenants;             /* length of tenants */
    char *user_header;           /* request header whose value picks the arm (default
                                    x-user-id); without it the tenant id is used */
    struct conf_arm *arms;       /* at least one */
    size_t narms;                /* length of arms */
};

struct conf {
    char *path;                  /* file it was loaded from */
    char **includes;             /* files named by `include:`, resolved against the
                                    folder of `path`, in order */
    size_t nincludes;            /* length of includes */
    char *tokenizer_data;        /* folder of the tokenizer rank files: `tokenizer_data:`,
                                    else $COSTROUTER_DATA, else "data/tokens" (relative
                                    to the working directory) */
    char *listen_host;           /* default 127.0.0.1 */
    uint16_t listen_port;        /* default 8080; 0 = any free port */
    char *tls_cert_file;         /* PEM chain clients are served TLS with, or NULL: plain
                                    HTTP (section `tls:`, given with tls_key_file) */
    char *tls_key_file;          /* PEM private key of tls_cert_file */
    char *admin_key;             /* secret, or NULL: admin API off */
    int admin_reload_timeout_ms; /* POST /admin/reload answers 504 once its reload has run
                                    this long (the reload goes on), default 30000 */
    char *cost_log;              /* path, "-" for stdout, NULL for none */
    size_t cost_log_buffer_max;  /* bytes waiting for the disk that hold new requests,
                                    default 16 MiB (until half are written) */
    int cost_log_wait_ms;        /* a held request waits this long (then 503); at exit,
                                    the longest wait for one write; default 30000 */
    char *redis_url;             /* store.redis exactly as given (after ${ENV}), for
                                    cache_options.redis_url; NULL: in-process store;
                                    may hold a password: never log */
    char *redis_host;            /* parsed from redis_url (redis://[:PASS@]HOST[:PORT][/DB]) */
    uint16_t redis_port;         /* default 6379 */
    int redis_db;                /* default 0 */
    char *redis_password;        /* secret, or NULL */
    enum conf_on_failure store_on_failure;
    char *store_key_prefix;      /* prefix of every Redis key, default "costrouter:"; no '{' */
    int store_connect_timeout_ms;  /* resolve+connect+AUTH, default 1000 */
    int store_command_timeout_ms;  /* per Redis command, default 500 */
    int store_reservation_ttl_ms;  /* unsettled reservations expire, default 600000 */
    char *store_journal_file;    /* where the Redis journal is saved at a stop, or NULL */
    char *store_spend_file;      /* where the in-process store keeps its spend, or NULL */
    /* response cache (section `cache:`), all with defaults */
    unsigned cache_enabled:1;    /* default on */
    unsigned cache_shared:1;     /* one cache for all tenants (default: one per tenant) */
    unsigned cache_tools:1;      /* also cache requests that carry tools (default off) */
    int cache_ttl_s;             /* entry lifetime, default 3600 */
    size_t cache_max_entry_bytes; /* largest cached response, default 1 MiB */
    size_t cache_local_bytes;    /* in-process cache size, default 64 MiB */
    /* client limits (section `limits:`), all with defaults */
    size_t max_header_bytes;     /* default 64 KiB -> 431 */
    size_t max_body_bytes;       /* default 8 MiB -> 413 */
    int header_timeout_ms;       /* default 10000 -> 408 */
    int body_timeout_ms;         /* default 30000 -> 408 */
    int idle_timeout_ms;         /* keep-alive idle, default 60000: close */
    int max_retries;             /* extra candidates tried on failure, default 2 */
    size_t max_connections;      /* accepted client connections, default 20000 */
    /* browsers on other origins (section `cors:`): none = no CORS answers */
    char **cors_origins;         /* `allow_origins`, lowercase and sorted (binary search),
                                    or the one entry "*": any origin */
    size_t ncors_origins;
    int cors_max_age_s;          /* how long a browser keeps a preflight's answer, default 600 */
    struct conf_backend *backends;
    size_t nbackends;
    struct conf_route *routes;
    size_t nroutes;
    struct conf_tenant *tenants;
    size_t ntenants;
    struct conf_price *prices;   /* every price entry read (own `prices:` and includes) */
    size_t nprices;
    struct conf_experiment *experiments; /* in file order: the first that applies wins */
    size_t nexperiments;
    /* private: sorted indexes behind the conf_find_* lookups */
    struct conf_backend **_backends_by_name;
    struct conf_route **_routes_by_model;
    struct conf_tenant **_tenants_by_id;
    struct conf_price **_prices_by_name;
    struct conf__key *_keys;     /* (key hash, key), sorted by hash */
    size_t _nkeys;
};

/*
 * Load and validate `path`. On success returns the config and sets
 * *errors to NULL. On failure returns NULL and sets *errors to a malloc'd
 * text (caller frees) with one line per problem, each
 * "FILE:LINE: KEY: message", e.g.
 *   costrouter.yaml:42: routes[0].candidates[1]: unknown backend "gpu-b"
 * FILE is `path`, or an included price file for an error inside it; the
 * lines come sorted by file (the config first), then by line.
 */
struct conf *conf_load(const char *path, char **errors);

/* Free everything conf_load returned. NULL is fine. */
void conf_free(struct conf *conf);

/* "N backends, N routes, N tenants" (each noun singular for one) into
 * out[size]: what the config holds, for --check-config and the log. */
const char *conf_summary(const struct conf *conf, char *out, size_t size);

/* Lookups used at start-up and by the router, O(log n) over sorted
 * indexes; each returns NULL when nothing matches. `name` is a C string;
 * `model` is `len` bytes, not NUL-terminated (a slice of the request). */
const struct conf_backend *conf_find_backend(const struct conf *conf, const char *name);
const struct conf_route *conf_find_route(const struct conf *conf, const char *model, size_t len);
/* Tenant whose key hashes to `sha256`. A binary search over the sorted
 * hashes picks the one candidate; the 32 bytes are then compared with
 * CRYPTO_memcmp, so the final comparison is constant time. */
const struct conf_tenant *conf_find_tenant_by_key(const struct conf *conf, const uint8_t sha256[32]);
/* The same search, returning the key entry itself (its name and limits;
 * ->tenant is its owner), or NULL. */
const struct conf_key *conf_find_key(const struct conf *conf, const uint8_t sha256[32]);
/* Does `cors.allow_origins` allow every origin ("*")? */
int conf_cors_any(const struct conf *conf);
/* Does it allow `origin` (`len` bytes, lowercase: the list is kept so),
 * or every one? A binary search of the sorted list. */
int conf_cors_allows(const struct conf *conf, const char *origin, size_t len);
/* May tenant `t` send requests to route `r` (of the same conf)? A binary
 * search of its `models:`, if it has any. */
int conf_tenant_allows(const struct conf_tenant *t, const struct conf_route *r);
/* The same for a request made with key `k`: its tenant's `models:` and
 * its own must both allow `r`. */
int conf_key_allows(const struct conf_key *k, const struct conf_route *r);
/* Tenant by id, price entry by name (C strings); NULL when none. */
const struct conf_tenant *conf_find_tenant(const struct conf *conf, const char *id);
const struct conf_price *conf_find_price(const struct conf *conf, const char *name);
/* A service tier's name as the config and the API write it ("flex",
 * "priority"; "default" for the standard tier), and the tier a request or
 * an answer names with `len` bytes at `s`: any name but flex and priority
 * is the standard tier. */
const char *conf_tier_name(enum conf_service_tier tier);
enum conf_service_tier conf_tier_of(const char *s, size_t len);

#endif
