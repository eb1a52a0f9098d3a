/*
 * router/internal.h: structures shared by the files of router/.
 *
 * How a request flows (one client connection, one request at a time):
 *
 *   client socket --read--> llhttp (server.c) --message complete-->
 *   handler.c: route by path, authenticate, parse JSON, find the route
 *   --> proxy.c: policy picks a candidate, request rewritten for it
 *   --> upstream.c: pooled connection (plain or TLS) to the backend
 *   <-- response parsed by llhttp (response mode); status and headers
 *       decide: a 5xx/429 or an error before the first byte means
 *       "try the next candidate"; otherwise the head goes to the client
 *   <-- body forwarded as it arrives (SSE event by event, usage read on
 *       the way), then the upstream connection returns to its pool and
 *       the client parser resumes on any pipelined bytes.
 *
 * Ownership: each libuv handle is embedded in its owner and freed only in
 * its close callback. A client owns its current request. An upstream
 * connection owns the bytes it writes. A client and an upstream
 * connection point at each other only while an exchange is in flight;
 * whichever side closes first detaches the other. The body's JSON tree
 * lives in the request's arena (jsonmem.c); every timeout of a client or
 * an upstream connection is one moving deadline (deadline.c).
 */
#ifndef ROUTER_INTERNAL_H
#define ROUTER_INTERNAL_H

#include <llhttp.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <uv.h>

#include "backends/backend.h"
#include "cache/cache.h"
#include "common/buf.h"
#include "common/fmt.h"
#include "common/log.h"
#include "common/slice.h"
#include "conf/conf.h"
#include "policy/cost.h"
#include "policy/experiment.h"
#include "policy/ratelimit.h"
#include "policy/tokenize.h"
#include "router/router.h"

struct conf;
struct conf_backend;
struct conf_key;
struct conf_route;
struct conf_tenant;
struct backend;
struct backend_set;
struct router__upstream;
struct cJSON;
struct metrics;
struct metrics_cost_log;

/* One pool of idle upstream connections per backend. */
struct router__pool {
    struct router *router;                 /* owner */
    const struct conf_backend *conf;       /* backend this pool connects to */
    struct backend *backend;               /* live health state */
    SSL_CTX *ssl_ctx;                      /* NULL for plain http */
    struct router__upstream *idle_head;    /* idle connections, most recent first */
    unsigned nidle;                        /* length of the idle list */
    unsigned nopen;                        /* all open connections of this pool */
    double est_ratio;                      /* last actual over estimated prompt tokens, NAN:
                                              none yet (the gauge, set at each scrape) */
    char *model_json;                      /* the backend's model name as a JSON string, or NULL */
    struct buf fixed_headers;              /* Host, Content-Type, the key: the same every request */
    struct log_every retry_log;            /* "answered 5xx/429, trying the next" lines */
    struct log_every fail_log;             /* "failed" lines (connect, reset, timeout) */
    struct log_every auth_log;             /* "refused the router's key" lines (401/403) */
};

/* What outlives a config reload: the listening socket and the state that
 * must carry on (spend in the in-process store, metrics, the cost log,
 * token tables). Each reload makes a new router generation on it; older
 * generations drain their connections and are freed. */
struct router__shared {
    uv_loop_t *loop;                /* the one loop everything runs on */
    uv_tcp_t listener;              /* accepting socket */
    size_t nclients;                /* client connections of every generation */
    struct log_every refuse_log;    /* "at max connections" lines */
    struct log_every nofile_log;    /* "no descriptor for a backend connection" lines */
    uv_timer_t accept_retry;        /* accepts again after no memory for a client (server.c) */
    struct log_every accept_log;    /* "no memory to accept" lines, once a minute */
    unsigned listening:1;           /* listener is open */
    char listen_host[256];          /* `listen` of the config at start: what a reload */
    uint16_t listen_port;           /* compares with, as the listener keeps it */
    char listen_at[80];             /* HOST:PORT the listener has, for the log */
    /* The store's journal_dropped (and its amount) the counters have: the
     * store's, as the store outlives reloads, so that a new generation
     * adds only what is dropped from then on. */
    uint64_t journal_dropped_seen;
    int64_t journal_dropped_amount_seen;
    unsigned stopping:1;            /* router_stop called */
    struct router *current;         /* the generation new connections go to */
    struct router *generations;     /* every live generation (list by next_gen) */
    struct policy_tokens *tokens;   /* owned */
    struct cache *store;            /* owned */
    struct cache_flight *flights;   /* owned */
    struct metrics *metrics;        /* owned */
    struct metrics_cost_log *cost_log; /* owned, or NULL */
    struct router__client *parked_head; /* requests parked while the cost log is behind (park.c), */
    struct router__client *parked_tail; /* oldest first, of every generation */
    EVP_MD *sha256;                 /* fetched once: SHA256() looks it up on every call */
    EVP_MD_CTX *sha256_ctx;         /* reused: EVP_Digest() allocates two per call */
    router_reload_hook *reload;     /* admin reload hook, or NULL */
    void *reload_arg;               /* passed to reload */
};

/*
 * Buffers of requests whose connection went idle. A keep-alive connection
 * between requests holds none of them (10,000 idle clients would hold
 * ~4 KB each); the next request on any connection takes a set back, so a
 * busy connection does not allocate per request.
 */
#define ROUTER_REQ_NBUFS 14
/* Tags a request may carry in x-costrouter-tags (its own, beside the
 * tenant's), and their longest key and value. */
#define ROUTER_REQUEST_TAGS_MAX 8
#define ROUTER_TAG_KEY_MAX 64
#define ROUTER_TAG_VALUE_MAX 128
#define ROUTER_REQUEST_OUT_KEEP 65536 /* request_out keeps up to this much between requests */
#define ROUTER_SHELF_MAX 256
struct router__shelf {
    unsigned n;                                          /* sets on the shelf */
    struct buf sets[ROUTER_SHELF_MAX][ROUTER_REQ_NBUFS]; /* [0, n) hold memory */
};

struct router {
    uv_loop_t *loop;                /* the one loop everything runs on */
    const struct conf *conf;        /* owned: freed with this generation */
    struct router__shared *shared;  /* listener and state that survive reloads */
    struct router *next_gen;        /* shared->generations list */
    uv_timer_t free_timer;          /* closed to free this generation from the loop */
    unsigned nupstreams;            /* open upstream connections of this generation */
    struct backend_set *backends;   /* live backend state */
    struct router__pool *pools;     /* one per conf.backends entry */
    struct router__client *clients; /* all open client connections (list) */
    size_t nclients;                /* length of that list */
    size_t max_clients;             /* limits.max_connections, or fewer if the open-file limit says so */
    uint64_t next_request_id;       /* counter behind request ids */
    uint64_t start_id;              /* random per process, makes request ids unique across instances */
    struct policy_tokens *tokens;   /* shared->tokens (NULL: byte estimates only) */
    struct cache *store;            /* shared->store: spend, reservations, response cache */
    struct cache_flight *flights;   /* shared->flights: single flight of cache misses */
    struct router__tenant *tenants; /* per conf.tenants entry, same order */
    struct policy_calib *calib;     /* per conf.backends entry: prompt estimate calibration */
    double *idle_reported;          /* per backend: idle cost already added to metrics */
    struct policy_experiment *experiments; /* prepared from conf.experiments */
    unsigned store_pending;         /* settles/releases/puts not answered yet */
    struct log_every store_warn;    /* failed store writes, logged once a second */
    struct metrics *metrics;        /* shared->metrics */
    struct metrics_cost_log *cost_log; /* shared->cost_log, or NULL */
    struct router__shelf shelf;     /* buffers of idle connections' requests */
    struct buf request_out;         /* the upstream request being built, reused */
    SSL_CTX *tls_ctx;               /* clients are served TLS with it, or NULL: plain */
    unsigned stopping:1;            /* draining: no keep-alive, pools closing */
    unsigned freeing:1;             /* free_timer closing */
};

/* What a subject's money came to in this instance beyond what the store
 * counts (spend.c): the remainder of its settled costs, and what its
 * streams in flight spent past their holds. Shared by the generations
 * that know the subject, so that a reload neither drops it nor counts it
 * twice (a stream of the old one settles into the new one's numbers). */
struct router__carry {
    double micro;                   /* in [-0.5, 0.5]: charged ahead (< 0) or still owed */
    int64_t over_micro;             /* micro-USD that this instance's streams in flight
                                       have run past their holds, not settled yet */
    int64_t asked_micro;            /* holds this instance asked the store for that it
                                       has not answered yet */
    unsigned refs;                  /* generations pointing at it */
};

/* One budget's subject as the router knows it between requests: a
 * tenant, or a key with a budget of its own (conf_key.subject). */
struct router__spend {
    int64_t day_spent;              /* micro-USD, from the store's last answer */
    int64_t month_spent;            /* micro-USD, same */
    int64_t reserved;               /* micro-USD held by open reservations */
    struct cache_period period;     /* day and month of day_spent and month_spent */
    struct router__carry *carry;    /* sub-micro-USD remainder of its charges; NULL for
                                       a key without a budget (nothing is counted) */
};

/* What the router keeps per tenant between requests. */
struct router__tenant {
    struct policy_ratelimit rl;     /* tenant rpm/tpm */
    struct policy_ratelimit *key_rl; /* per key of the tenant (conf order) */
    struct router__spend spend;     /* the tenant's budget */
    struct router__spend *key_spend; /* per key of the tenant (conf order): the budgets
                                        of those with a subject */
    struct policy_outpred *outpred; /* per route: recent completion lengths */
};

/* Which endpoint a request is for. */
enum router__endpoint {
    ROUTER_EP_NONE,
    ROUTER_EP_CHAT,        /* POST /v1/chat/completions */
    ROUTER_EP_COMPLETIONS, /* POST /v1/completions */
    ROUTER_EP_EMBEDDINGS,  /* POST /v1/embeddings */
    ROUTER_EP_RESPONSES,   /* POST /v1/responses (OpenAI's Responses API) */
    ROUTER_EP_MESSAGES,    /* POST /v1/messages (Anthropic's Messages API) */
    ROUTER_EP_COUNT_TOKENS, /* POST /v1/messages/count_tokens (Anthropic's Token Counting):
                               routed as a message, answered by the backend, free */
    ROUTER_EP_MODELS,      /* GET /v1/models */
    ROUTER_EP_HEALTHZ,     /* GET /healthz */
    ROUTER_EP_METRICS,     /* GET /metrics (admin key when one is set) */
    ROUTER_EP_DASHBOARD,   /* GET /dashboard (page only; its data calls need the key) */
    ROUTER_EP_ADMIN,       /* /admin/... (admin key) */
};

/* Is `ep` one of the proxied /v1 endpoints (routed by model, priced,
 * in the cost log)? They are the enum's first run. */
#define ROUTER_EP_PROXIED(ep) ((ep) >= ROUTER_EP_CHAT && (ep) <= ROUTER_EP_COUNT_TOKENS)

/* Is `ep` one of Anthropic's endpoints (its errors, its headers)? */
#define ROUTER_EP_ANTHROPIC(ep) ((ep) == ROUTER_EP_MESSAGES || (ep) == ROUTER_EP_COUNT_TOKENS)

/* anthropic-version sent to an Anthropic backend when the client sent none:
 * the Messages API's first, whose shape every later one keeps. */
#define ROUTER_ANTHROPIC_VERSION "2023-06-01"

/* The API an endpoint speaks, which the backends serving it must speak. */
#define router__endpoint_api(ep) (ROUTER_EP_ANTHROPIC(ep) ? CONF_API_ANTHROPIC : CONF_API_OPENAI)

/* Client connection phases, which decide the timer and what reads mean. */
enum router__client_phase {
    ROUTER_CLIENT_IDLE,      /* keep-alive, waiting for a request */
    ROUTER_CLIENT_HEADERS,   /* reading request head */
    ROUTER_CLIENT_BODY,      /* reading request body */
    ROUTER_CLIENT_BUSY,      /* request complete, response in progress */
    ROUTER_CLIENT_LINGER,    /* answered and closing: reading what the client still sends */
};

/* The request in progress on a client connection, reset between requests. */
struct router__request {
    uint64_t id;                         /* unique within this process */
    char id_str[32];                     /* id as sent in x-request-id: "cr-" 10 + "-" 16 hex digits */
    struct buf url;                      /* request target as received */
    struct buf auth;                     /* Authorization value (secret; never logged) */
    struct buf body;                     /* request body */
    struct buf hname;                    /* header name being assembled */
    struct buf hvalue;                   /* header value being assembled */
    struct buf fwd;                      /* client headers to forward upstream */
    struct buf tag_text;                 /* x-costrouter-tags (lines joined by ','); its
                                            tags point into it once parsed */
    struct buf origin;                   /* Origin (browsers): read for CORS, not forwarded;
                                            emptied when sent twice */
    struct conf_tag tags[ROUTER_REQUEST_TAGS_MAX]; /* the request's own tags */
    unsigned ntags;                      /* entries in tags */
    const char *error;                   /* errstr set by a parser callback */
    size_t head_bytes;                   /* bytes of request head so far */
    enum router__endpoint endpoint;      /* what the path asked for */
    const struct conf_tenant *tenant;    /* authenticated tenant */
    const struct conf_key *key;          /* the key it used */
    const struct policy_arm *arm;        /* A/B arm, or NULL */
    const char *experiment;              /* the experiment of arm (its name), or NULL */
    uint64_t arm_allowed;                /* candidates the arm allows */
    const struct conf_route *route;      /* route named by "model" */
    struct cJSON *json;                  /* parsed body (owned) */
    unsigned stream:1;                   /* "stream": true */
    unsigned injected_usage:1;           /* we added stream_options.include_usage */
    unsigned json_rewritten:1;           /* rewrite_body changed req->json (not the client's now) */
    unsigned keep_alive:1;               /* client wants the connection kept */
    unsigned expect_continue:1;          /* Expect: 100-continue was sent */
    unsigned auth_seen:1;                /* an Authorization header was read */
    unsigned origin_seen:1;              /* an Origin header was read */
    unsigned xkey_seen:1;                /* an x-api-key header was read (kept in `auth`
                                            as "Bearer KEY" when no Authorization came) */
    unsigned head_method:1;              /* HEAD: answers carry no body */
    unsigned response_started:1;         /* any response byte sent to the client */
    unsigned request_sent:1;             /* the attempt's request went whole onto its upstream
                                            socket (upstream.c): the backend may bill it */
    unsigned chunked:1;                  /* response to client is chunked */
    unsigned is_sse:1;                   /* upstream answers text/event-stream */
    unsigned upstream_done:1;            /* upstream response fully received */
    unsigned broken:1;                   /* upstream broke after the response started */
    unsigned sse_ended:1;                /* the stream's own last event passed (router__stream_end) */
    unsigned sse_failed:1;               /* the stream reported an error in it */
    unsigned accounted:1;                /* cost log line and metrics written */
    /* proxying */
    uint64_t tried;                      /* candidates tried (bit per index) */
    uint64_t answered_429;               /* of those, the ones that answered 429 */
    uint64_t leader_failed;              /* of those, the ones never called: the flight
                                            leader this request waited on left them
                                            (on_flight_answer), "leader-failed" in the log */
    unsigned attempts;                   /* attempts made, first included */
    unsigned fallbacks;                  /* attempts after the first */
    int candidate;                       /* current candidate index, -1 none */
    const char *reason;                  /* x-costrouter-reason of the decision */
    struct router__pool *pool;           /* pool of the current attempt */
    struct router__pool *sent_pool;      /* pool of the last attempt sent, NULL before one:
                                            the request's backend when a choice after it
                                            takes none (refused, no candidate left) */
    struct router__upstream *up;         /* upstream connection in use */
    int status;                          /* status sent to the client */
    int upstream_status;                 /* status of the backend's answer, 0 before one */
    struct buf up_body;                  /* non-SSE upstream body kept for usage */
    struct router__bigusage *big_usage;  /* reads the usage of a plain answer too big to
                                            hold, until it is found; or NULL */
    struct buf sse;                      /* partial SSE event */
    size_t sse_scanned;                  /* bytes of it searched for its end */
    int64_t prompt_tokens;               /* from usage, -1 unknown */
    int64_t completion_tokens;           /* from usage, -1 unknown */
    int64_t cached_tokens;               /* usage.prompt_tokens_details.cached_tokens
                                            (Anthropic: cache_read_input_tokens) */
    int64_t cache_write_tokens;          /* Anthropic's cache_creation_input_tokens, -1 unknown */
    int64_t cache_write_1h_tokens;       /* of those, written to the 1-hour cache, -1 unknown */
    int64_t web_searches;                /* server-side web searches its usage reported (the
                                            last count seen; /v1/responses: the web search
                                            calls of its whole output), -1 none reported */
    int64_t input_tokens;                /* Anthropic's input_tokens (neither read from nor
                                            written to the cache), -1 unknown */
    int64_t web_searches_held;           /* web searches its hold counts: its web search
                                            tools' max_uses (/v1/messages), its
                                            max_tool_calls with a web search tool
                                            (/v1/responses), else 0 */
    double reported_usd;                 /* the cost its usage reported (OpenRouter,
                                            Perplexity), -1 none: billed instead of the
                                            tokens' price on a cost_from_usage backend */
    int64_t web_search_calls;            /* web search calls of a Responses answer seen as
                                            they passed (a stream's output_item.done events,
                                            the items read of an answer too big to hold):
                                            billed when its whole output says fewer or
                                            never came */
    int64_t file_searches;               /* file search calls of a Responses answer's whole
                                            output, -1 none seen */
    int64_t file_searches_held;          /* file search calls its hold counts: its
                                            max_tool_calls with a file search tool, else 0 */
    int64_t file_search_calls;           /* file search calls seen as they passed (as
                                            web_search_calls) */
    unsigned searches_one_cap:1;         /* the two held counts are one max_tool_calls: its
                                            hold is for that many of the dearer kind */
    int8_t asked_tier;                   /* enum conf_service_tier of its "service_tier" */
    int8_t answered_tier;                /* the answer's (tiered backends), -1 unknown */
    uint64_t start_ms;                   /* loop time the request was complete */
    uint64_t attempt_start_ms;           /* loop time of the current attempt */
    uint64_t ttft_ms;                    /* first response byte, from start */
    uint64_t head_ttft_ms;               /* the attempt's own TTFT, while success_due */
    /* cost-aware routing and spend */
    int64_t prompt_est;                  /* prompt tokens estimated before sending */
    int64_t prompt_raw;                  /* uncalibrated estimate (tokenizer: estimate) */
    int64_t prompt_window;               /* of prompt_est, what one choice reads in its
                                            window: the longest text of a completions or
                                            embeddings array, else all of it */
    int64_t completion_pred;             /* completion tokens predicted, all choices */
    int64_t completion_choices;          /* completions asked for (policy_outpred_choices) */
    struct policy_verdict *verdicts;     /* one per route candidate, in verdict_mem; or NULL */
    struct policy_choice choice;         /* the current decision */
    struct cache_op *store_op;           /* cache_begin or spend check in flight, or NULL */
    struct cache_reservation res;        /* budget held for the current attempt */
    struct cache_reservation key_res;    /* the same held from its key's own budget */
    int64_t over_micro;                  /* what its stream ran past its hold, counted in
                                            its subjects' carry->over_micro (on_overrun) */
    int64_t asked_micro;                 /* its hold asked of the store, unanswered: in its
                                            tenant's carry->asked_micro, or its key's */
    unsigned asked_key:1;                /* asked_micro is the key's (key_begin) */
    struct cache_key cache_key;          /* response cache key (when cacheable) */
    const char *cache_model;             /* the upstream model cache_key names */
    const char *cache_query;             /* and the backend url's query, or NULL */
    struct cache_flight_waiter waiter;   /* as a single-flight follower */
    struct backend_ticket ticket;        /* the current attempt's accounting */
    struct buf head;                     /* response head held until the cost is known */
    struct buf cached;                   /* bytes to put in the response cache */
    struct buf batch;                    /* events of one upstream read, sent in one write */
    struct buf json_mem;                 /* first block of the body tree's arena (jsonmem.c) */
    struct buf verdict_mem;              /* room for verdicts, kept like the other buffers */
    struct router__jsonmem_block *json_more; /* its overflow blocks */
    unsigned has_res:1;                  /* res must be settled or released */
    unsigned has_key_res:1;              /* key_res too */
    unsigned lookup:2;                   /* enum cache_lookup of the current begin */
    unsigned attempt_open:1;             /* ticket must be finished */
    unsigned cacheable:1;                /* deterministic request, cache enabled */
    unsigned flight_leader:1;            /* we must finish the single flight */
    unsigned flight_waiting:1;           /* waiting for a leader's answer */
    unsigned cache_hit:1;                /* answered from the response cache */
    unsigned head_held:1;                /* head in `head`, not sent yet */
    unsigned settled:1;                  /* cost settled (cost_micro is real) */
    unsigned completion_limited:1;       /* max_tokens / max_completion_tokens given */
    unsigned batching:1;                 /* forward() collects into batch */
    unsigned shelved:1;                  /* buffers given to the shelf (idle) */
    unsigned begins;                     /* cache_begin calls for this request */
    unsigned budget_checked:1;           /* the store was asked before a 429 budget */
    unsigned overrun_checked:1;          /* ... and before cutting a stream (on_overrun) */
    unsigned rate_held:1;                /* rate_tokens taken from the tpm limits, not settled */
    unsigned inflight:1;                 /* counted in costrouter_inflight_requests */
    unsigned probe_chosen:1;             /* its backend was due a probe when chosen */
    unsigned chosen_held:1;              /* counted in its backend's chosen load until its
                                            attempt begins (router__proxy_unchoose) */
    unsigned success_due:1;              /* a held answer's head came: a success for its
                                            backend once it reaches the client */
    unsigned ttft_due:1;                 /* a stream's head came: its first token's time is
                                            the TTFT (cost log, backend's average) */
    int64_t rate_tokens;                 /* tokens taken at admission (rate_limit) */
    const char *last_error;              /* the failed attempt's error, kept across a check */
    uint64_t events;                     /* SSE data events forwarded (token fallback) */
    int64_t completion_counted;          /* a body without usage: its choices' tokens, or -1 */
    int64_t cost_micro;                  /* settled cost, micro-USD (to the nearest) */
    double cost_usd;                     /* the same, exact (what the cost log says) */
    struct backend_tokens billed;        /* tokens cost_micro was settled on (tokens_used());
                                            zeros when nothing was settled from tokens */
    int64_t saved_micro;                 /* cost a cache hit avoided */
    struct router__admin *admin;         /* admin request waiting for the store */
    struct router__reload_wait *reload_wait; /* POST /admin/reload waiting for its reload */
};

/* A timeout whose deadline moves often (deadline.c). */
struct router__deadline {
    uv_timer_t timer;                    /* fires at `due`; data: the owner */
    uint64_t at;                         /* loop ms of the deadline, 0: none */
    uint64_t due;                        /* loop ms the timer fires, 0: not armed */
    void (*on_expire)(void *owner);      /* called once `at` has passed */
};

void router__deadline_init(uv_loop_t *loop, struct router__deadline *d, void *owner,
                           void (*on_expire)(void *owner));
/* Expire `ms` from now; ms <= 0 clears the deadline. */
void router__deadline_set(struct router__deadline *d, int ms);

struct router__client {
    uv_tcp_t tcp;                        /* the socket; freed in close cb */
    struct router__deadline timeout;     /* idle/header/body timeout */
    struct router *router;               /* owner */
    struct router__client *next, *prev;  /* router's client list */
    llhttp_t parser;                     /* request parser */
    struct buf pending;                  /* unparsed bytes after a pause (pipelining) */
    size_t drain_left;                   /* draining: of `pending`, the bytes received before
                                            the drain began, still to answer (server.c) */
    enum router__client_phase phase;     /* what we wait for */
    struct router__request req;          /* current request */
    unsigned closing:1;                  /* close requested */
    unsigned served:1;                   /* a response went out: idle now means keep-alive */
    unsigned handles_open;               /* tcp + timer still to close */
    unsigned reading:1;                  /* uv_read_start active */
    unsigned in_process:1;               /* client_process is on the stack */
    unsigned cut_short:1;                /* refused before its request was read to the end */
    unsigned backed_up:1;                /* reading held: answers queued past the high-water mark */
    unsigned parked:1;                   /* its request waits for the cost log (park.c) */
    unsigned flushing:1;                 /* closing once its answers are written: idle_timeout_ms bounds the wait */
    const char *head_mark;               /* in the bytes being parsed, the end of what
                                            max_header_bytes has counted (server.c) */
    struct router__client *park_next, *park_prev; /* shared->parked list */
    uint64_t linger_end;                 /* LINGER: close by then (loop ms) */
    size_t unsent_mark;                  /* IDLE or flushing: answer bytes unwritten when
                                            idle_timeout_ms was last set; fewer at the
                                            timeout is progress, not idleness (server.c) */
    SSL *ssl;                            /* TLS session (memory BIOs), NULL for plain */
};

/* Upstream connection states. */
enum router__upstream_state {
    ROUTER_UP_RESOLVING,
    ROUTER_UP_CONNECTING,
    ROUTER_UP_HANDSHAKE,   /* TLS */
    ROUTER_UP_WAITING,     /* request sent, no response byte yet */
    ROUTER_UP_RECEIVING,   /* response in progress */
    ROUTER_UP_IDLE,        /* in the pool */
};

struct router__upstream {
    uv_tcp_t tcp;                         /* the socket; freed in close cb */
    struct router__deadline timeout;      /* connect / first byte / total / idle */
    uv_getaddrinfo_t gai;                 /* name resolution in progress */
    uv_connect_t connect_req;             /* connect in progress */
    struct router__pool *pool;            /* owner pool */
    struct router__client *client;        /* client being served, or NULL */
    struct router__upstream *next_idle;   /* pool idle list */
    struct router__upstream *prev_idle;
    llhttp_t parser;                      /* response parser */
    enum router__upstream_state state;
    SSL *ssl;                             /* TLS session, NULL for plain */
    BIO *net_bio;                         /* our end of the TLS BIO pair */
    struct buf out;                       /* request bytes not yet handed to TLS/socket */
    struct buf hname, hvalue;             /* response header being assembled */
    struct buf headers;                   /* response headers to forward, "Name: value\r\n" each */
    struct buf conn;                      /* its Connection values, comma-joined: names to drop */
    size_t head_bytes;                    /* header bytes of the response so far */
    uint64_t last_read_ms;                /* loop ms of the last read from the socket,
                                             or of the resume after a pause */
    uint64_t total_at;                    /* loop ms total_timeout_ms ends the answer
                                             being received */
    int64_t retry_after_ms;               /* a 429's Retry-After in ms, -1 if none */
    unsigned retry_after_in_ms:1;         /* that came from retry-after-ms (preferred) */
    unsigned is_sse:1;                    /* content-type text/event-stream */
    unsigned request_id_seen:1;           /* it has a request-id (Anthropic's API's id) */
    unsigned reused:1;                    /* came from the idle pool */
    unsigned got_bytes:1;                 /* any response byte received */
    unsigned closing:1;
    unsigned handles_open;                /* tcp + timer still to close */
    unsigned tcp_open:1;                  /* tcp handle initialised */
    unsigned paused:1;                    /* reading paused for backpressure */
    unsigned resolving:1;                 /* uv_getaddrinfo in flight (holds memory) */
    unsigned complete:1;                  /* llhttp saw the end of the response */
    unsigned keep_alive:1;                /* that response allows reuse */
    unsigned await_body:1;                /* a stream's head came, no body byte yet: the
                                             first-byte timeout still runs */
};

/* server.c: client side */
void router__client_send(struct router__client *c, const char *p, size_t len);
void router__client_sendv(struct router__client *c, const uv_buf_t *bufs, unsigned nbufs);
/* Put bytes on the socket as they are (TLS records, or plain HTTP). */
void router__client_send_raw(struct router__client *c, const uv_buf_t *bufs, unsigned nbufs);
/* Plaintext bytes the client sent: parse them, or keep them for later. */
void router__client_take(struct router__client *c, const char *p, size_t len);
void router__client_response_done(struct router__client *c);
/* Is the client's request HTTP/1.0 (no chunks, keep-alive only when both
 * sides say so)? */
int router__client_http10(const struct router__client *c);
/* The Connection header line of an answer to the current request, with
 * its CRLF: close when the connection closes after it, keep-alive when an
 * HTTP/1.0 client keeps it, else "" (HTTP/1.1 keeps it by default). */
const char *router__client_connection_header(const struct router__client *c);
void router__client_close(struct router__client *c);
size_t router__client_write_queue(const struct router__client *c);
uint64_t router__now(const struct router *r);

/* handler.c: what to do with a complete request */
void router__handle(struct router__client *c);
/* Before the body of a request whose head is read: the error it will be
 * refused with whatever its body holds (an unknown path, a wrong method,
 * a /v1 request without a tenant key the router knows), or NULL. */
const char *router__refusal_on_head(struct router__client *c);
/* Answer bytes refused before they made a whole request (malformed, over
 * a limit, too slow) with `errstr`; a /v1 one is accounted as a request. */
void router__refuse(struct router__client *c, const char *errstr, const char *detail);
/* The credential of the request's "Authorization: Bearer KEY" (the
 * scheme in any case, the blanks after it skipped) and its length, or
 * NULL: the one reading of a key for tenants and for the admin API. */
const char *router__bearer(const struct router__client *c, size_t *len);
/* The value of the client's header `name` among those forwarded (`fwd`)
 * and its length in *len, or NULL when it sent none (proxy.c). */
const char *router__request_header(const struct router__request *req, const char *name,
                                   size_t *len);
/* The request target's query with its '?' ("?beta=true"), as the client
 * sent it, or an empty slice when it has none or only the '?' (an empty
 * query is none, RFC 3986 6.2.3): passed on to the backend
 * and part of the cache key; endpoints are found by the path alone. */
struct slice router__request_query(const struct router__request *req);
/* Whether the request carries the admin key (admin.c). */
int router__admin_authorized(struct router__client *c);
/* The path of a proxied endpoint ("/v1/messages"), for the cost log;
 * NULL for any other. */
const char *router__endpoint_path(enum router__endpoint ep);
/* Send a complete OpenAI-style error response for `errstr`. */
void router__send_error(struct router__client *c, const char *errstr, const char *detail);
/* The same with more header lines (each ending in CRLF), or NULL. */
void router__send_error_with(struct router__client *c, const char *errstr, const char *detail,
                             const char *extra_headers);
/* Send a complete response the router made itself. */
/* CORS (router/cors.c), for browsers calling from other origins
 * (`cors:`). The headers an answer to `c`'s request carries for its
 * Origin, written to `out` (at least ROUTER_CORS_HEADERS_MAX bytes,
 * NUL-terminated): their length, 0 when it has none to carry. */
#define ROUTER_CORS_HEADERS_MAX (CONF_ORIGIN_MAX + 128)
size_t router__cors_headers(const struct router__client *c, char *out);
/* The methods the path of `req` takes ("POST", "GET, HEAD"), or NULL
 * for no path of the router's. */
const char *router__allowed_methods(const struct router__request *req);
/* Answer `c`'s OPTIONS request if it is a CORS preflight (1), else 0. */
int router__cors_preflight(struct router__client *c);

void router__send_response(struct router__client *c, int status, const char *content_type,
                           const char *extra_headers, const char *body, size_t len);
/* The error body for errstr in the language of endpoint `ep`: Anthropic's
 * {"type":"error","error":{...}} on /v1/messages, else OpenAI's
 * {"error":{...}}; sets *status. Caller frees. */
char *router__error_json(enum router__endpoint ep, const char *errstr, const char *detail,
                         int *status);
/* Free per-request state. */
void router__request_reset(struct router__request *req);
/* Reset, then free the request's buffers (the connection is closing). */
void router__request_free(struct router__request *req);
/* The connection went idle: the request's (reset) buffers go to the shelf,
 * or are freed when it is full. */
void router__request_shelve(struct router *r, struct router__request *req);
/* A request begins: take buffers back from the shelf if it gave its own. */
void router__request_unshelve(struct router *r, struct router__request *req);
/* Free what the shelf holds (generation freed). */
void router__shelf_free(struct router__shelf *shelf);

/* The rest of router__handle, for a /v1 request authenticated and let
 * start (at once, or when router__park_resume takes it). */
void router__handle_resume(struct router__client *c);

/* park.c: /v1 requests wait while the cost log is behind the disk */
/* Park c's request if the log is behind (or others wait): returns 1 and
 * the request is resumed, refused or dropped later; 0: go on now. */
int router__park(struct router__client *c);
/* The client is closing: forget its parked request, if any. */
void router__park_remove(struct router__client *c);
/* Its cost_log_wait_ms passed: 503. */
void router__park_expire(struct router__client *c);
/* metrics_cost_log_on_caught_up's callback (arg: the router__shared):
 * resume parked requests in arrival order while the log is not behind. */
void router__park_resume(void *arg);
/* At stop: answer every parked request 503. */
void router__park_refuse_all(struct router__shared *sh);

/* account.c: cost log line and metrics of a finished /v1 request (once) */
void router__account(struct router__client *c);

/* spend.c: reservations, settlement and the response cache */
/* The store for `conf` (shared by every generation). */
struct cache *router__store_create(uv_loop_t *loop, const struct conf *conf);
int router__spend_init(struct router *r);
void router__spend_free(struct router *r);
/* server.c: once a stopping generation has no client, upstream or store
 * write left, free it (and when the last one goes at shutdown, close the
 * store and the cost log so the loop can end). */
void router__maybe_finish(struct router *r);
/* A tenant's budget in USD (daily_usd, monthly_usd) as the store's limit
 * and the policy's: micro-USD by backend_usd_to_micro(), so that the
 * router's checks and the store's reservations agree, except that a
 * positive budget is at least 1 (0 means no budget to both). */
int64_t router__budget_micro(double usd);
/* Reserve the choice's cost (and look the cache up) for the request, from
 * its tenant's budget and then its key's own, if any; on the answers,
 * router__proxy_reserved() continues. */
void router__spend_begin(struct router__client *c);
/* Read the tenant's (and its key's own) spend and holds from the store
 * into their snapshots;
 * then router__proxy_budget_checked() continues. Returns 0, or -1 (no
 * memory: no callback). */
int router__spend_check(struct router__client *c);
/* Release the current reservations (failure before any cost). */
void router__spend_release(struct router__client *c);
/* Settle the current reservation with `usd`, the real cost: the store is
 * charged whole micro-USD, the tenant's remainder carried to its next
 * charge. */
void router__spend_settle(struct router__client *c, double usd);
/* Put the finished response in the cache and end its single flight. */
void router__spend_cache_store(struct router__client *c);
/* Request teardown: cancel store callbacks, end flights, release holds. */
void router__spend_abandon(struct router__client *c);
/* Room for router__rate_headers' six lines. */
#define ROUTER_RATE_HEADERS_MAX 256
/* Whether the request's tenant or key has an rpm or tpm limit: then the
 * router's x-ratelimit-* headers answer it, not its backend's. */
int router__rate_limited(const struct router__client *c);
/* x-ratelimit-{limit,remaining,reset}-{requests,tokens}, OpenAI's names,
 * for the limits of the request's tenant and key (of the two of one kind,
 * the one with less left), as lines into `out` (ROUTER_RATE_HEADERS_MAX
 * bytes). Returns their length, 0 when no limit applies. */
size_t router__rate_headers(struct router__client *c, char *out);
/* The request's stream has now run `over` micro-USD past its hold: its
 * tenant and key count that as held until it settles. */
void router__spend_overrun(struct router__client *c, int64_t over);
/* What subject `s` holds in this instance: the store's open reservations
 * as last read, the holds asked since and not answered, and its streams'
 * runs past theirs. */
int64_t router__spend_held(const struct router__spend *s);
/* End the single flight `c` leads with no answer: its followers go
 * upstream themselves, passing over the candidates that failed it. */
void router__spend_flight_fail(struct router__client *c);
struct router__tenant *router__tenant_state(struct router *r, const struct conf_tenant *t);
/* The numbers of key `k`'s own budget (of its generation `r`), or NULL
 * when it has none (no subject). */
struct router__spend *router__key_spend(struct router *r, const struct conf_key *k);
/* Bring a subject's numbers to the current day and month: those of a
 * period that has ended since the store's answer become 0, as the store
 * counts the new period from 0. Else a tenant idle since midnight showed
 * yesterday's spend as today's in the spend gauges. */
void router__spend_roll(struct router__spend *s);

/* admin.c: /metrics, /dashboard, /admin/... */
void router__admin_handle(struct router__client *c, struct slice path);
void router__admin_abandon(struct router__client *c);
/* A POST /admin/reload waited admin_reload_timeout_ms: answer 504, and
 * leave the reload to go on without it. */
void router__admin_reload_expire(struct router__client *c);
/* account.c: set gauges that are read, not counted (budgets, pools, store) */
void router__refresh_gauges(struct router *r);
/* Drop the series router__refresh_gauges sets (at a reload): those of a
 * tenant or pool the new config no longer has, or of a budget it no
 * longer sets, kept their last value forever. The next scrape sets the
 * current ones. */
void router__forget_gauges(struct router *r);
/* Add the GPU pools' idle cost accrued since it was last added to its
 * counter (at each scrape, and for the generation a reload replaces:
 * its pools' accrual ends there; the new generation's goes on from it
 * for a pool it keeps, router__account_carry, else from 0). */
void router__account_idle(struct router *r);
/* After a reload: a pool whose clock `r` shares with a live generation
 * (`old`, or an older one still running requests on it) goes on from what
 * they reported of its idle cost (router__account_idle(old) first), so
 * that the counter does not get it twice; a backend `r` keeps (by name)
 * keeps its last estimate ratio (the gauge is not gone until its next
 * request). */
void router__account_carry(struct router *r, const struct router *old);

/* jsonmem.c: cJSON allocates a request's tree from the request's arena */
struct router__jsonmem_block;
/* Make cJSON allocate through us (once per process, before any cJSON use). */
void router__json_install(void);
/* Parse req->body into req->json, in the arena; NULL if it is not JSON. */
struct cJSON *router__json_parse(struct router__request *req);
/* Around any cJSON call that adds to or removes from req->json. */
void router__json_enter(struct router__request *req);
void router__json_leave(void);
/* Free req->json and the arena. */
void router__json_drop(struct router__request *req);

/* "SIZE\r\n", the line before an HTTP chunk of `len` bytes (out: 18 bytes). */
static inline size_t router__chunk_line(char *out, size_t len)
{
    size_t n = fmt_hex(out, len);

    out[n++] = '\r';
    out[n++] = '\n';
    return n;
}

/* proxy.c: one request to upstreams, with fallback */
/* [start, end) of the top-level "model" string value in validated JSON;
 * -1 when it is not written plainly. */
int router__json_model_span(const char *p, size_t len, size_t *start, size_t *end);
/* `s` as a JSON string with its quotes (malloc'd), or NULL. */
char *router__json_quote(const char *s);
/* The upstream request headers that are the same for every request to
 * backend `b` (holds its API key: never logged). */
int router__fixed_headers(const struct conf_backend *b, struct buf *out);
/* The store answered cache_begin (the key's too, when it has a budget):
 * continue with the reservations granted, or re-choose / reject when one
 * was denied (then none is held). req->lookup says what the cache lookup
 * found. */
void router__proxy_reserved(struct router__client *c, int granted);
/* The store answered router__spend_check: choose again (or, mid-stream,
 * let the next event decide on a cut). */
void router__proxy_budget_checked(struct router__client *c);
/* A cache hit (ours or a single-flight leader's): answer from `value`. */
void router__proxy_replay(struct router__client *c, const char *value, size_t len);
void router__proxy_start(struct router__client *c);
/* upstream.c calls these on the client attached to an upstream */
void router__proxy_on_connected(struct router__client *c);
/* The response head: `retry_after_ms` is what a 429's Retry-After or
 * retry-after-ms asks for (-1: not said, or not a 429). */
int router__proxy_on_head(struct router__client *c, int status, const struct buf *headers,
                          int64_t content_length, int is_sse, int64_t retry_after_ms);
void router__proxy_on_body(struct router__client *c, const char *p, size_t len);
void router__proxy_on_complete(struct router__client *c);
void router__proxy_on_error(struct router__client *c, const char *errstr);
/* the client went away or timed out: drop the upstream side */
void router__proxy_abort(struct router__client *c);
/* Give back the tokens a request took from its tpm limits at admission
 * and did not use: it ends without an upstream answer. */
void router__proxy_rate_release(struct router__client *c);
/* The request's chosen backend stops counting it as load (chosen, not
 * begun): its attempt begins, it chooses again, or it ends. */
void router__proxy_unchoose(struct router__client *c);
/* around parsing one upstream read: collect SSE events, then one write */
void router__proxy_batch(struct router__client *c);
void router__proxy_flush(struct router__client *c);
/* the client's writes drained: resume a paused upstream */
void router__proxy_on_client_drain(struct router__client *c);

/* upstream.c: pooled connections */
int router__pools_init(struct router *r);
/* Close idle connections (at stop). */
void router__pools_close(struct router *r);
/* Free TLS contexts and pools after the loop ended. */
void router__pools_free(struct router *r);
/* Get an idle or new connection for `c`'s current attempt; the request
 * bytes in `request` are copied. Progress is reported through proxy
 * callbacks. Returns 0 or a negative error (reported synchronously). */
int router__upstream_send(struct router__pool *pool, struct router__client *c, const char *request,
                          size_t len);
/* Detach from the client and close (response not wanted any more). */
void router__upstream_abort(struct router__upstream *u);
/* Like router__upstream_send, always on a new connection. */
int router__upstream_send_fresh(struct router__pool *pool, struct router__client *c,
                                const char *request, size_t len);
void router__upstream_pause(struct router__upstream *u);
void router__upstream_resume(struct router__upstream *u);

/* fdlimit.c: raise the open-file limit to what `conf` needs if the hard
 * limit allows; returns the client connections to accept at once. */
size_t router__fd_budget(const struct conf *conf);

/* tls.c: contexts, and the TLS layer of client connections */
SSL_CTX *router__tls_client_ctx(const struct conf_backend *b);
/* The context clients are served with (conf's tls.cert_file and
 * tls.key_file), or NULL with the reason written to why. */
SSL_CTX *router__tls_server_ctx(const struct conf *conf, char *why, size_t size);
/* Give client `c` a TLS session in server mode. Returns 0 or -1. */
int router__tls_client_start(struct router__client *c, SSL_CTX *ctx);
/* Ciphertext read from the client: decrypt it into router__client_take,
 * answer the handshake, or close on a TLS error. */
void router__tls_client_read(struct router__client *c, const char *p, size_t len);
/* Encrypt and send. */
void router__tls_client_sendv(struct router__client *c, const uv_buf_t *bufs, unsigned nbufs);
/* Empty a session's memory write BIO once its bytes have been sent. */
void router__tls_wbio_clear(SSL *ssl);
/* Queue close_notify before the connection is shut down. */
void router__tls_client_shutdown(struct router__client *c);

/* sse.c: split SSE bytes into events; usage extraction */
/* A reported cost above this is taken for none: no request costs $10,000,
 * and a backend that says so is wrong (its tokens are billed instead). */
#define ROUTER_REPORTED_USD_MAX 10000.0
struct router__usage {
    int64_t prompt_tokens;     /* -1 when absent (Anthropic: input_tokens, which counts
                                  no cached or cache-written token) */
    int64_t completion_tokens; /* -1 when absent */
    int64_t cached_tokens;     /* -1 when absent (Anthropic: cache_read_input_tokens) */
    int64_t cache_write_tokens; /* Anthropic's cache_creation_input_tokens, -1 when absent */
    int64_t cache_write_1h_tokens; /* of those, its cache_creation.ephemeral_1h_input_tokens,
                                      -1 when absent */
    int64_t web_searches;      /* Anthropic's server_tool_use.web_search_requests (a
                                  Responses terminal event: its web_search_call items),
                                  -1 when this usage does not say (billed as none) */
    int64_t file_searches;     /* a Responses terminal event's file_search_call items,
                                  -1 when it does not say */
    double cost_usd;           /* the cost the backend reports: usage.cost (OpenRouter) or
                                  usage.cost.total_cost (Perplexity), USD; -1 when none */
};
/* Find complete events in `sse` (appended bytes), call `on_event` for
 * each with the event bytes including its terminating blank line, and
 * keep the tail. *scanned (0 for a new stream) remembers how much of the
 * tail was searched, for the next call. Returns 0, or the first non-zero
 * on_event result. */
int router__sse_split(struct buf *sse, size_t *scanned,
                      int (*on_event)(void *arg, const char *p, size_t len), void *arg);
/* Read the root object's usage out of a JSON text (a response or an SSE
 * data payload). Returns 1 if usage was found, 0 if not. With usage found
 * and choices_empty not NULL, also tells whether the root's "choices" is
 * an empty array (the usage-only event of a stream). */
int router__usage_parse(const char *json, size_t len, struct router__usage *out,
                        int *choices_empty);
/* The hosted tool calls of a Responses answer billed per call. */
enum { ROUTER_CALL_WEB_SEARCH = 1, ROUTER_CALL_FILE_SEARCH };
struct router__calls {
    int64_t web;  /* items of type web_search_call */
    int64_t file; /* items of type file_search_call */
};
/* One event of a /v1/responses stream (its data payload): *text_delta is
 * set when its type is response.output_text.delta (the events an answer
 * without usage is charged by), *call_done to ROUTER_CALL_WEB_SEARCH or
 * ROUTER_CALL_FILE_SEARCH when it is response.output_item.done with such
 * a call's item (else 0); returns 1 with the usage of a terminal event
 * (response.completed, .incomplete or .failed), read from its "response"
 * object as router__usage_parse reads a body's, else 0. A terminal
 * event's out->web_searches and out->file_searches count its response's
 * calls (router__responses_searches). */
int router__responses_event(const char *json, size_t len, struct router__usage *out,
                            int *text_delta, int *call_done);
/* The web and file search calls in the root's "output" of a Responses
 * answer, both -1 when it has no output array. */
void router__responses_searches(const char *json, size_t len, struct router__calls *out);
/* The service tier an answer says it was billed at: the root object's
 * "service_tier" (a whole answer, or a stream's chunk) as an enum
 * conf_service_tier, any name but flex and priority being the standard
 * tier; -1 when absent or not a string. router__responses_tier reads it
 * from a /v1/responses terminal event's "response" (-1 for any other
 * event). Only called for backends that price tiers: it may walk the
 * text. */
int router__service_tier(const char *json, size_t len);
int router__responses_tier(const char *json, size_t len);
/* One event of a /v1/messages stream (its data payload): *text_delta is
 * set for a content_block_delta whose delta is a text_delta or an
 * input_json_delta (the events an answer without usage is charged by),
 * *call_done to ROUTER_CALL_WEB_SEARCH for the content_block_start of a
 * web search (a server_tool_use block named web_search), else 0;
 * returns 1 with the usage of message_start (its "message"'s, without
 * its output_tokens, which count the answer so far) or message_delta
 * (its own), read as router__usage_parse reads a body's, else 0. Counts
 * an event leaves out stay -1: the caller keeps the last seen of each. */
int router__messages_event(const char *json, size_t len, struct router__usage *out,
                           int *text_delta, int *call_done);
/* Is json[0..len) one whole JSON object or array (its brackets and
 * strings closed, nothing but white space after it)? Walked, not parsed:
 * a body that broke off is told apart, no allocation. */
int router__json_whole(const char *json, size_t len);
/* What one SSE event's data payload says of its stream's end, on
 * endpoint `ep`: ROUTER_STREAM_END for its own last event (chat's and
 * completions' `[DONE]`, message_stop, response.completed or
 * response.incomplete), ROUTER_STREAM_FAILED for an error reported in the
 * stream (an "error" event, response.failed, a chunk that is an error
 * object), else 0. */
#define ROUTER_STREAM_END 1
#define ROUTER_STREAM_FAILED (-1)
int router__stream_end(enum router__endpoint ep, const char *data, size_t len);
/* Does an SSE event carry a data line? Sets data and data_len to its payload. */
int router__sse_data(const char *event, size_t len, const char **data, size_t *data_len);

/* bigusage.c: the root usage of a plain answer too big to hold, and the
 * text it answered, read as it passes (yajl), in bounded memory. */
struct router__bigusage;
/* A reader for one answer; NULL when out of memory. `on_text` (NULL: no
 * counting) gets each piece of answered text, decoded, as a held body's
 * is counted: the choices' text, message content and tool call
 * arguments; text NULL is a token id in an array of them. */
struct router__bigusage *router__bigusage_new(void (*on_text)(void *arg, const char *text,
                                                                size_t len),
                                               void *arg);
/* The answer's next bytes. Returns 0 while the usage may still come, 1
 * once the root object's first "usage" value is whole (read it with
 * router__bigusage_text), -1 when none will be read (not JSON, or past a
 * size or depth limit). Bytes after a non-zero result are ignored. */
int router__bigusage_feed(struct router__bigusage *b, const char *p, size_t len);
/* After a 1: {"usage":<its value>} for router__usage_parse. */
const char *router__bigusage_text(const struct router__bigusage *b, size_t *len);
/* The web and file search calls (output items of those types) read so far. */
struct router__calls router__bigusage_calls(const struct router__bigusage *b);
void router__bigusage_free(struct router__bigusage *b);

#endif
