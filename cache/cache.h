/*
 * cache/cache.h: the store. Spend counters, budget reservations and the
 * response cache, shared by every costrouter instance through Redis, or kept
 * in process when no Redis is configured.
 *
 * Amounts are integer micro-dollars. Spend is counted per tenant, per UTC day
 * and per UTC month. A request calls cache_begin() once before it goes
 * upstream: that one call (one Redis round trip) looks the response up in the
 * cache and, on a miss, reserves an upper bound of its cost against the
 * tenant's budgets. When the request ends it calls cache_settle() with the
 * real cost, or cache_release() if it failed before costing anything.
 * Reservations expire (reservation_ttl_ms) so a crashed instance never holds
 * budget forever.
 *
 * All calls are made on the loop thread. Asynchronous operations never call
 * their callback before returning; the callback runs once from the loop,
 * with errstr NULL on success or one of the constants below /
 * error_store_unavailable (common/error.h). cache_cancel() stops a callback
 * from running (the operation itself still completes: a reservation granted
 * after a cancel is released).
 *
 * Faults (Redis store): with CACHE_FAIL_OPEN the store keeps serving from
 * in-process counters (seeded from the last values Redis returned) while
 * Redis is unreachable or refuses writes, each instance within 1/N of what
 * Redis last said was left of a budget, N being the instances alive in
 * Redis (each renews a mark there every second), and journals every charge
 * in memory; the journal is written back when Redis returns, and while
 * connected retried on a timer (1 s doubling to 30 s). Charges without a
 * Redis reservation carry an id, so one sent twice (its reply lost) is
 * applied once. With CACHE_FAIL_CLOSED, cache_begin and cache_spend_get
 * fail with error_store_unavailable, but charges are still journaled: the
 * cost of a request already served is never dropped.
 */
#ifndef CACHE_CACHE_H
#define CACHE_CACHE_H

#include <stddef.h>
#include <stdint.h>

struct uv_loop_s;
struct cJSON;
struct cache;
struct cache_op;

/* Error strings specific to the store (compare by pointer). */
extern const char cache_error_timeout[];   /* Redis did not answer in time */
extern const char cache_error_closed[];    /* cache_close() ran first */
extern const char cache_error_protocol[];  /* unexpected reply from Redis */

enum cache_on_failure {
    CACHE_FAIL_OPEN,   /* serve from local counters, journal spend */
    CACHE_FAIL_CLOSED, /* begin/spend_get fail with error_store_unavailable */
};

enum cache_state {
    CACHE_STATE_CONNECTED,  /* Redis reachable, or the in-process store */
    CACHE_STATE_CONNECTING, /* resolving, connecting or loading scripts */
    CACHE_STATE_DOWN,       /* waiting to reconnect (backoff) */
};

/* Longest tenant id an operation takes (longer: EINVAL), and longest key
 * prefix cache_create() takes: together they bound every Redis key. A
 * "tenant" here is any budget subject: a tenant's id, or a key's name
 * joined to its tenant's (the config's conf_key.subject, up to 401). */
#define CACHE_TENANT_MAX 401
#define CACHE_KEY_PREFIX_MAX 128

/* Filled by the caller; zero fields get the defaults shown. Strings are
 * copied by cache_create(). */
struct cache_options {
    const char *redis_url;        /* redis://[:password@]host[:port][/db]; NULL: in-process */
    enum cache_on_failure on_failure; /* default CACHE_FAIL_OPEN */
    const char *key_prefix;       /* prepended to every key; default "costrouter:"; no '{';
                                   * at most CACHE_KEY_PREFIX_MAX bytes */
    int connect_timeout_ms;       /* resolve+connect+AUTH+SCRIPT LOAD; default 1000 */
    int command_timeout_ms;       /* per command; default 500 */
    int reconnect_min_ms;         /* first backoff delay; default 100 */
    int reconnect_max_ms;         /* backoff ceiling; default 5000 */
    int reservation_ttl_ms;       /* unsettled reservations expire; default 600000 */
    int cache_ttl_s;              /* default TTL of cache_put; default 3600 */
    size_t max_entry_bytes;       /* largest cached value; default 1 MiB */
    size_t local_cache_bytes;     /* in-process cache budget, oldest evicted; default 64 MiB */
    size_t journal_max;           /* most journal entries kept (merged ones count once);
                                   * default 100000, see cache_stats.journal_dropped */
    const char *journal_file;     /* Redis store: the journal is saved there at close and
                                   * loaded by cache_create (see below); NULL: none */
    const char *spend_file;       /* in-process store: the day's and month's spend is saved
                                   * there every second and at close, and loaded by
                                   * cache_create (see below); NULL: none */
    unsigned shared_cache:1;      /* one response cache for all tenants (default per tenant) */
    unsigned cache_tools:1;       /* cache requests that carry tools (default no) */
    /* Called on every state change (for metrics/logs); may be NULL. */
    void (*on_state)(void *arg, enum cache_state state, const char *errstr);
    void *on_state_arg;           /* passed to on_state */
};

/* The response cache key: SHA-256 of the normalized request. */
struct cache_key {
    uint8_t sha256[32]; /* digest bytes */
};

/* A budget hold returned by cache_begin(). Plain value: copy it freely,
 * settle or release it exactly once. */
struct cache_reservation {
    const char *tenant; /* borrowed from cache_begin(); must outlive settle/release */
    int64_t amount;     /* micro-dollars held */
    uint64_t seq;       /* id within this instance; 0: no reservation */
    unsigned remote:1;  /* held in Redis (else in the in-process table) */
};

enum cache_lookup {
    CACHE_LOOKUP_NONE, /* no key given */
    CACHE_LOOKUP_MISS, /* key given, not cached */
    CACHE_LOOKUP_HIT,  /* value is the cached response; nothing reserved */
};

struct cache_begin_result {
    enum cache_lookup lookup; /* outcome of the cache lookup */
    const char *value;        /* cached bytes on a hit; valid during the callback only */
    size_t value_len;         /* length of value */
    unsigned granted:1;       /* reservation made (never on a hit) */
    unsigned degraded:1;      /* answered by local counters (Redis unreachable) */
    int64_t day_spent;        /* tenant's spend today, before this request */
    int64_t month_spent;      /* tenant's spend this month */
    int64_t reserved;         /* held by open reservations, including this one */
    struct cache_reservation reservation; /* valid when granted */
};

struct cache_spend {
    int64_t day_spent;   /* settled spend, current UTC day */
    int64_t month_spent; /* settled spend, current UTC month */
    int64_t reserved;    /* held by open reservations */
    unsigned degraded:1; /* from local counters (Redis unreachable) */
};

/* A UTC day and month: the periods spend is counted in. */
struct cache_period {
    uint32_t day;   /* days since 1970-01-01 */
    uint32_t month; /* year * 12 + month (0-11) */
};

/* The periods the store counts spend in now. Numbers read from the store
 * in an earlier day or month are no longer that period's. */
void cache_period_now(struct cache_period *p);

/* Metrics snapshot. */
struct cache_stats {
    enum cache_state state;  /* see enum cache_state */
    size_t journal_entries;  /* charges waiting to be written back */
    int64_t journal_amount;  /* micro-dollars in those entries */
    uint64_t journal_dropped; /* charges and releases not journaled, the journal being full
                               * (opts.journal_max): their spend stays in this instance's
                               * counters, lost to Redis's */
    int64_t journal_dropped_amount; /* micro-dollars in those */
    uint64_t reconnects;     /* successful (re)connections so far */
    size_t inflight;         /* operations sent to Redis or queued for it, not yet answered */
    unsigned instances;      /* instances sharing the store, this one included, as Redis
                              * last listed them (1 until it does; 1 in process) */
    unsigned writes_refused:1; /* connected, but Redis refused the last write (OOM, MISCONF,
                                * NOREPLICAS, READONLY): charges are being journaled */
    unsigned spend_file_failing:1; /* the last save of opts.spend_file failed (retried each
                                    * second): a restart now would forget the spend since
                                    * the last save that worked */
};

typedef void cache_begin_cb(void *arg, const char *errstr, const struct cache_begin_result *r);
typedef void cache_spend_cb(void *arg, const char *errstr, const struct cache_spend *s);
/* Completion of settle/release/put. For settle/release, errstr NULL means
 * applied to the store; error_store_unavailable means journaled, to be
 * written back later (the charge is not lost). */
typedef void cache_done_cb(void *arg, const char *errstr);

/* Create a store on `loop`. With opts->redis_url it starts connecting at
 * once (never blocking). With opts->journal_file too, it locks that file
 * (JOURNAL_FILE.lock: one store per file) and loads the charges a previous
 * close saved there, to be written back like any journal entry; this reads
 * and writes the disk (start-up only). Without opts->redis_url, with
 * opts->spend_file, it locks that file likewise and loads the spend it
 * holds (start-up only), then saves the spend there off the loop. Returns
 * NULL on bad options, no memory, or a journal or spend file it cannot
 * lock or read (logged). */
struct cache *cache_create(struct uv_loop_s *loop, const struct cache_options *opts);

/* Fail pending operations with cache_error_closed (their callbacks run
 * inside this call unless cancelled), drop the connection and close all
 * handles; `closed` (may be NULL) runs from the loop once every handle is
 * closed and the memory freed. Journal entries still pending are saved to
 * the journal file (writing to disk), or without one logged and lost; the
 * spend, to the spend file (a save out on the thread pool is waited for). */
void cache_close(struct cache *c, void (*closed)(void *arg), void *arg);

/*
 * Look `key` up (NULL: no lookup) and, on a miss, reserve `amount` for
 * `tenant` if today's and this month's spend plus open reservations plus
 * `amount` stay within `day_limit` / `month_limit` (0 = no limit). One
 * Redis round trip. Returns the operation (for cache_cancel) or NULL with
 * errno EINVAL (tenant too long, amount < 0) or ENOMEM; the callback then
 * never runs.
 */
struct cache_op *cache_begin(struct cache *c, const char *tenant, const struct cache_key *key,
                             int64_t amount, int64_t day_limit, int64_t month_limit,
                             cache_begin_cb *cb, void *arg);

/* Remove the reservation and charge `real` (>= 0, may exceed the reserved
 * amount and the limits: the real cost is always charged) to today's and
 * this month's spend. cb may be NULL. Returns the operation or NULL (ENOMEM:
 * the charge is journaled anyway when possible, see errno). A reservation
 * settled again is charged again by both stores and frees nothing: Redis
 * cannot tell a second settle from a late one of a reservation it forgot
 * after the grace period, which must be charged. */
struct cache_op *cache_settle(struct cache *c, const struct cache_reservation *r, int64_t real,
                              cache_done_cb *cb, void *arg);

/* Drop the reservation without charging (failure before any cost). */
struct cache_op *cache_release(struct cache *c, const struct cache_reservation *r,
                               cache_done_cb *cb, void *arg);

/* Spend and reservations of `tenant` (admin API). */
struct cache_op *cache_spend_get(struct cache *c, const char *tenant, cache_spend_cb *cb,
                                 void *arg);

/* Store `len` bytes (copied before return) under `key` for `tenant` (ignored
 * when the cache is shared) for `ttl_s` seconds (0: options' default).
 * Returns NULL with errno EMSGSIZE when len > max_entry_bytes. */
struct cache_op *cache_put(struct cache *c, const char *tenant, const struct cache_key *key,
                           const void *value, size_t len, int ttl_s, cache_done_cb *cb,
                           void *arg);

/* The callback of `op` will not run. Call only before it ran. */
void cache_cancel(struct cache_op *op);

/* Current state and journal size (for metrics). */
void cache_stats(const struct cache *c, struct cache_stats *out);

/*
 * Compute the response cache key of a request: SHA-256 over the route (the
 * model name the client asked for), the upstream model and the request with
 * the top-level fields that do not change the answer dropped ("stream",
 * "stream_options", "user", "store", "metadata", and "model", replaced by
 * the two names) and every object's keys sorted. The request is not
 * modified. Returns 0, -EINVAL (request not an object) or -ENOMEM.
 */
int cache_key_make(const char *route, const char *upstream_model, const struct cJSON *request,
                   struct cache_key *out) __attribute__((warn_unused_result));

/* Whether a response to `request` may be cached: deterministic
 * ("temperature": 0 or a "seed") and no "tools"/"functions"/"mcp_servers"
 * unless allow_tools. */
int cache_cacheable(const struct cJSON *request, int allow_tools);

/*
 * Single flight: collapses concurrent identical cache misses within one
 * instance. The first caller for a key becomes the leader and goes
 * upstream; later callers (followers) wait, embedding a struct
 * cache_flight_waiter in their request (no allocation). The leader must
 * end its flight exactly once with cache_flight_finish(): with the response
 * bytes, or NULL when it failed or was cancelled, in which case each
 * follower goes upstream itself.
 */
struct cache_flight;

/* `value` is the leader's response (valid during the call only), or NULL:
 * the leader failed, go upstream yourself. `why` is what the leader
 * passed to cache_flight_finish (with NULL: what it learnt failing, such
 * as the backends that failed it), valid during the call only. */
typedef void cache_flight_cb(void *arg, const char *value, size_t len, const void *why);

struct cache_flight_waiter {
    struct cache_flight_waiter *_next; /* private: list of the key's followers */
    struct cache_flight_waiter *_prev; /* private */
    void *_entry;                      /* private: entry waited on, NULL when done */
    cache_flight_cb *_cb;              /* private */
    void *_arg;                        /* private */
};

enum cache_flight_role {
    CACHE_FLIGHT_LEADER,   /* go upstream, then cache_flight_finish() */
    CACHE_FLIGHT_FOLLOWER, /* wait: cb runs once from the leader's finish */
};

/* An empty table, or NULL on no memory. */
struct cache_flight *cache_flight_create(void);
/* Free the table. Every flight must have finished. */
void cache_flight_free(struct cache_flight *f);
/* Join the flight for `key`. Returns the role, or -ENOMEM (go upstream
 * alone). As a follower, `w` must stay valid until cb runs or
 * cache_flight_leave(). */
int cache_flight_join(struct cache_flight *f, const struct cache_key *key,
                      struct cache_flight_waiter *w, cache_flight_cb *cb, void *arg);
/* End the flight for `key`: each follower's cb runs before this returns,
 * given value, len and why. */
void cache_flight_finish(struct cache_flight *f, const struct cache_key *key, const char *value,
                         size_t len, const void *why);
/* A follower gives up (its client went away); its cb will not run. */
void cache_flight_leave(struct cache_flight *f, struct cache_flight_waiter *w);
/* Number of keys in flight. */
size_t cache_flight_count(const struct cache_flight *f);

#endif
