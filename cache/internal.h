/*
 * cache/internal.h: what the files of cache/ share. Not for other modules.
 *
 * struct cache dispatches every operation through a store vtable (struct
 * cache__type, like redis's ConnectionType): cache__local_type keeps
 * everything in process, cache__redis_type talks to Redis and falls back to
 * the same in-process structures (struct cache__local) while Redis is
 * unreachable. Operations are heap objects (struct cache_op) completed
 * exactly once through cache__finish(), either from a Redis reply callback
 * or, for answers known at once, from the idle handle (cache__defer), so no
 * callback ever runs inside the call that started it.
 */
#ifndef CACHE_INTERNAL_H
#define CACHE_INTERNAL_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <uv.h>

#include "cache/cache.h"

#define CACHE__NAME_MAX 640   /* longest key name built */

/* ---- hash map (map.c): byte-string keys, chained buckets ---- */

struct cache__map_entry {
    struct cache__map_entry *next; /* bucket chain */
    uint64_t hash;                 /* of key */
    void *value;                   /* owned by the map's user */
    size_t klen;                   /* key length */
    char key[];                    /* key bytes, NUL-terminated */
};

struct cache__map {
    struct cache__map_entry **buckets; /* nbuckets heads */
    size_t nbuckets;                   /* power of two, or 0 before first insert */
    size_t count;                      /* entries */
};

struct cache__map_entry *cache__map_find(const struct cache__map *m, const void *key, size_t len);
/* Add an entry (key must be absent) with value NULL; NULL on no memory. */
struct cache__map_entry *cache__map_add(struct cache__map *m, const void *key, size_t len);
/* Unlink and free the entry (not its value). */
void cache__map_del(struct cache__map *m, struct cache__map_entry *e);
/* Free every entry, calling free_value (may be NULL) on each value. */
void cache__map_free(struct cache__map *m, void (*free_value)(void *));

/* ---- time ---- */

/* A UTC day and month, the two budget periods. */
struct cache__period {
    uint32_t day;   /* days since 1970-01-01 */
    uint32_t month; /* year * 12 + month (0-11) */
};

void cache__period_now(struct cache__period *p);
/* "YYYYMMDD" and "YYYYMM". */
void cache__period_fmt(const struct cache__period *p, char day[16], char month[16]);
/* Monotonic milliseconds, for in-process expiry. */
uint64_t cache__mono_ms(void);
/* Wall-clock milliseconds since 1970 (what Redis's TIME counts in). */
int64_t cache__wall_ms(void);

/* a + b, held at INT64_MAX / INT64_MIN instead of overflowing: amounts
 * reach 2^62 (BACKEND_MICRO_MAX), and two of them would pass INT64_MAX. */
static inline int64_t cache__sat_add(int64_t a, int64_t b)
{
    int64_t r;

    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

/* ---- in-process store (local.c) ---- */

struct cache__local_entry;

struct cache__local {
    struct cache__map tenants;           /* tenant id -> struct local_tenant */
    struct cache__map entries;           /* entry name -> struct cache__local_entry */
    struct cache__local_entry *oldest;   /* eviction order: oldest first */
    struct cache__local_entry *newest;   /* last inserted */
    size_t bytes;                        /* value bytes held */
    size_t max_bytes;                    /* budget; oldest entries evicted beyond it */
    int64_t ttl_ms;                      /* reservation lifetime */
};

void cache__local_init(struct cache__local *l, size_t max_bytes, int64_t reservation_ttl_ms);
void cache__local_free(struct cache__local *l);
/* Look `name` up (NULL: no lookup) and reserve `amount` under `seq` unless
 * over a limit. `share` 0: these counters are the store; n > 0: they stand
 * in for a Redis that n instances share (this one included), and this one
 * may use 1/n of what Redis last said was left. On a hit *value gets a
 * malloc'd copy. 0 or -ENOMEM. */
int cache__local_begin(struct cache__local *l, const char *tenant, const char *name,
                       int64_t amount, int64_t day_limit, int64_t month_limit, unsigned share,
                       uint64_t seq, struct cache_begin_result *r, char **value);
/* Drop reservation `seq` (0: none) and charge `real` (0: nothing). */
int cache__local_settle(struct cache__local *l, const char *tenant, uint64_t seq, int64_t real);
void cache__local_spend(struct cache__local *l, const char *tenant, struct cache_spend *out);
int cache__local_put(struct cache__local *l, const char *name, const void *value, size_t len,
                     int ttl_s);
/* Count (amount > 0) or drop (amount < 0) a hold this instance has in
 * Redis, for a request in flight: serving from these counters while Redis
 * is away, the money it holds is not free for others. 0 or -ENOMEM. */
int cache__local_hold_remote(struct cache__local *l, const char *tenant, int64_t amount);
/* Overwrite the spend counters with authoritative values (from Redis),
 * and with `reserved` >= 0 (all instances' holds; -1: not in the reply)
 * note what the other instances hold. */
int cache__local_sync(struct cache__local *l, const char *tenant, int64_t day_spent,
                      int64_t month_spent, int64_t reserved);
/* What these counters enforce for `tenant`, from `s`, Redis's answer just
 * synced (cache__local_sync): its spend with our charges Redis has not
 * confirmed, and its holds with the ones kept here (made while Redis was
 * away or refused writes, not in Redis). */
void cache__local_enforced(struct cache__local *l, const char *tenant, struct cache_spend *s);
/* A begin Redis answered (`r`, just synced): when these counters know
 * more than Redis (our charges it has not confirmed, journaled while it
 * refused writes or was away; holds kept here), `r`'s figures become what
 * they enforce, and 1 when Redis's grant does not fit `day_limit` /
 * `month_limit` (0: none) by them: the caller releases it. Else 0. */
int cache__local_recheck(struct cache__local *l, const char *tenant, int64_t day_limit,
                         int64_t month_limit, struct cache_begin_result *r);
/* Count (amount > 0) or drop (amount < 0) a hold of ours in Redis whose
 * settle is queued or sent (cache__local_recheck). 0 or -ENOMEM. */
int cache__local_settling(struct cache__local *l, const char *tenant, int64_t amount);
/* Count (amount > 0) or drop (amount < 0) a charge of period `p` that
 * Redis does not have yet: sent and not answered, journaled, or being
 * written back. What Redis answers (cache__local_sync) lacks it, and these
 * counters must not. */
int cache__local_unconfirmed(struct cache__local *l, const char *tenant,
                             const struct cache__period *p, int64_t amount);
/* Set a subject's spend as saved on day `p` (sfile.c): its day's counter
 * if `p` is today, its month's if `p` is in this month; older is nothing.
 * 0 or -ENOMEM. */
int cache__local_restore(struct cache__local *l, const char *subject,
                         const struct cache__period *p, int64_t day_spent, int64_t month_spent);
/* Call `fn` for each subject that has spent this month (so today too),
 * with the current period; stops at, and returns, fn's first non-zero. */
typedef int cache__local_each_fn(void *arg, const char *subject, const struct cache__period *p,
                                 int64_t day_spent, int64_t month_spent);
int cache__local_each(struct cache__local *l, cache__local_each_fn *fn, void *arg);

/* ---- journal (journal.c): charges waiting for Redis ---- */

struct cache__jentry {
    struct cache__jentry *next;   /* FIFO */
    struct cache__map_entry *agg; /* aggregation slot, when merged by tenant+period */
    struct cache__period period;  /* day and month the charge belongs to */
    int64_t real;                 /* micro-dollars to charge */
    uint64_t seq;                 /* Redis reservation to drop with it, 0: none */
    int64_t res_amount;           /* that reservation's amount (part of its member) */
    uint64_t id;                  /* seq 0: the charge's id, sent with it so that Redis applies
                                   * it once (0: never sent yet) */
    int64_t since_ms;             /* conditional, seq 0: wall-clock ms before which its id
                                   * was not applied (Redis forgets ids after the grace) */
    unsigned conditional:1;       /* may have been applied: charge only if the reservation is
                                   * still known (seq), or if Redis has not seen the id */
    unsigned apart:1;             /* seq 0: never merged with others, its amount staying the
                                   * one a copy in the journal file has under its id (jfile.c) */
    char origin[17];              /* instance id in its reservation member or id: this
                                   * instance's, or the one that saved it (jfile.c) */
    char tenant[];                /* tenant id */
};

struct cache__journal {
    struct cache__jentry *head;   /* oldest */
    struct cache__jentry *tail;   /* newest */
    struct cache__map agg;        /* tenant+period -> unconditional, member-less entry */
    size_t count;                 /* entries */
    int64_t amount;               /* sum of real */
    const char *instance;         /* this instance's id: the origin of the entries it adds */
    size_t max;                   /* most entries cache__journal_add makes (opts.journal_max) */
    uint64_t dropped;             /* adds refused at max */
    int64_t dropped_amount;       /* micro-dollars in them */
    unsigned full_logged:1;       /* a refusal was logged: quiet until the journal empties */
};

/* Journal a charge. seq != 0 names a Redis reservation to drop; else `id`
 * (0: none) is the charge's id if it was sent. `conditional`: it was sent
 * and may have been applied. Returns 0, -ENOMEM (the charge is then lost
 * and logged) or -ENOSPC: the journal holds j->max entries and the charge
 * merges into none of them (counted in j->dropped, logged once until the
 * journal empties). That bounds the journal when Redis keeps answering one
 * tenant's calls with an error (a key of the wrong type): each request
 * adds entries that never merge, and their write-backs keep failing. */
int cache__journal_add(struct cache__journal *j, const char *tenant,
                       const struct cache__period *p, int64_t real, uint64_t seq,
                       int64_t res_amount, uint64_t id, int conditional);
/* Detach the oldest entry (caller owns it), or NULL. */
struct cache__jentry *cache__journal_pop(struct cache__journal *j);
/* Put back an entry whose write-back failed; `conditional` if it may have
 * been applied (an entry once conditional stays so). Takes ownership. */
void cache__journal_readd(struct cache__journal *j, struct cache__jentry *e, int conditional);
/* Mark `e` as possibly applied from now on (keeps an earlier since_ms). */
void cache__journal_mark_conditional(struct cache__jentry *e);
/* Free every entry; those left are logged at error level as lost to Redis. */
void cache__journal_free(struct cache__journal *j);

/* ---- files (file.c): what jfile.c and sfile.c share ---- */

struct cJSON;
struct yajl_val_s;
/* Write `data` to `path` atomically: PATH.tmp, fsync, rename, fsync of the
 * folder. 0 or -1 with errno set. Safe off the loop (no shared state). */
int cache__file_replace(const char *path, const char *data, size_t len);
/* flock PATH.lock (created if need be) without waiting: the fd to keep
 * open for as long as the file is ours, or -1 (logged, `what` naming the
 * setting) when it cannot be had, another router holding it among others. */
int cache__file_lock(const char *path, const char *what);
/* "YYYY-MM-DD" of a period's day, and back (-1: not such a date). */
void cache__file_day_text(const struct cache__period *p, char out[16]);
int cache__file_parse_day(const char *s, struct cache__period *p);
/* Read `f` a line at a time, each a JSON object handed to `fn` parsed by
 * cJSON and by yajl (`exact`, for cache__file_get_int), with its line
 * number (1 first), until fn says what is wrong with one (its
 * answer, not NULL) or the file ends. NULL when every line was read and
 * taken, else what is wrong: fn's answer, a line that is not a JSON
 * object, too long or holding a NUL, or a read error. *lineno: the lines
 * read, the wrong one last. */
typedef const char *cache__file_object_fn(void *arg, const struct cJSON *o,
                                          const struct yajl_val_s *exact, size_t lineno);
const char *cache__file_each_object(FILE *f, cache__file_object_fn *fn, void *arg,
                                    size_t *lineno);
/* A whole number in [0, INT64_MAX] under `name` of `o`: to the unit when
 * written as an integer (as cache__file_add_int writes them; a double
 * would round it past 2^53), read from `exact`, the same line parsed by
 * yajl, whose integers are int64 (NULL: none); in another form (1e+15),
 * up to 2^53. -1 if absent or not. */
int cache__file_get_int(const struct cJSON *o, const struct yajl_val_s *exact, const char *name,
                        int64_t *out);
/* Add `v` (>= 0) to `o` as `name`, an integer written in full (not through
 * a double). 0 or -1 on no memory. */
int cache__file_add_int(struct cJSON *o, const char *name, int64_t v);

/* ---- spend file (sfile.c): the in-process store's spend kept across a restart ---- */

/* Lock c->opts.spend_file, load the day's and month's spend a previous
 * run saved there and start saving it every second. 0, or -1 (logged):
 * the store must not start. */
int cache__sfile_open(struct cache *c);
/* cache_close(): stop the timer (a save in flight is waited for through
 * c->handles_open). */
void cache__sfile_stop(struct cache *c);
/* At the end (every handle closed): save what changed since the last
 * save, on the loop's thread, and release the lock. */
void cache__sfile_close(struct cache *c);

/* ---- journal file (jfile.c): the journal kept across a stop ---- */

/* Lock c->opts.journal_file and load what a stop saved there into the
 * journal. 0, or -1 (logged): the store must not start. */
int cache__jfile_open(struct cache *c);
/* The journal is empty and no write-back is out: a loaded file is no
 * longer needed. */
void cache__jfile_written_back(struct cache *c);
/* At the end: save what the journal still holds (and empty it), or remove
 * a file whose entries all reached Redis; release the lock. */
void cache__jfile_close(struct cache *c);

/* ---- operations and the store vtable ---- */

enum cache__kind {
    CACHE__BEGIN,
    CACHE__SETTLE,  /* settle and release (real == 0, release flag) */
    CACHE__SPEND,
    CACHE__PUT,
    CACHE__FLUSH,   /* journal write-back, no caller */
    CACHE__LIVE,    /* this instance's mark in Redis's list of live ones, no caller */
};

struct cache__redis;

struct cache_op {
    struct cache *cache;              /* owner */
    struct cache_op *next;            /* ready list or Redis in-flight list */
    struct cache_op *prev;            /* in-flight list */
    enum cache__kind kind;            /* what it does */
    union {
        cache_begin_cb *begin;
        cache_spend_cb *spend;
        cache_done_cb *done;
    } cb;                             /* caller's callback, may be NULL */
    void *arg;                        /* caller's argument */
    const char *errstr;               /* outcome, NULL: success */
    unsigned cancelled:1;             /* cache_cancel() ran */
    unsigned release:1;               /* SETTLE: a release; LIVE: the mark's removal */
    unsigned shared_get:1;            /* BEGIN: cache GET pipelined beside the script */
    unsigned sent_eval:1;             /* SPEND: NOSCRIPT fallback already used */
    unsigned inflight:1;              /* on the Redis in-flight list */
    unsigned queued:1;                /* waiting in the Redis batch queue */
    unsigned refused:1;               /* Redis refused the write: nothing of it was applied */
    int pending;                      /* Redis replies still awaited */
    uint64_t deadline;                /* loop time (ms) the replies are due */
    const char *tenant_ref;           /* caller's tenant pointer, for the reservation */
    struct cache__period period;      /* periods charged / checked */
    int64_t amount;                   /* BEGIN: to reserve; SETTLE: real cost */
    int64_t day_limit;                /* BEGIN */
    int64_t month_limit;              /* BEGIN */
    struct cache_reservation res;     /* SETTLE: the reservation; BEGIN: the new one */
    uint64_t charge_id;               /* SETTLE without a Redis reservation: its id (0: none) */
    struct cache__jentry *jentry;     /* FLUSH: the entry being written back */
    char *name;                       /* BEGIN/PUT: cache entry name (no prefix), or NULL */
    char *value;                      /* owned copy of a cached value */
    size_t value_len;                 /* its length */
    int ttl_s;                        /* PUT */
    struct cache_begin_result result; /* BEGIN outcome */
    struct cache_spend spend;         /* SPEND outcome */
    char tenant[];                    /* owned copy of the tenant id */
};

struct cache__type {
    const char *name;                          /* "memory" or "redis" */
    void (*begin)(struct cache_op *op);        /* fill result, then finish or defer */
    void (*settle)(struct cache_op *op);       /* settle or release */
    void (*spend)(struct cache_op *op);
    void (*put)(struct cache_op *op);
    enum cache_state (*state)(const struct cache *c);
    /* Drop connections, fail in-flight ops, start closing handles (each
     * counted in c->handles_open and ended with cache__handle_closed). */
    void (*close)(struct cache *c);
    /* cache_close() is about to close: say goodbye to what is shared
     * (the commands it sends are waited for like any). May be NULL. */
    void (*leave)(struct cache *c);
    void (*stats)(const struct cache *c, struct cache_stats *out);
};

extern const struct cache__type cache__local_type;
extern const struct cache__type cache__redis_type;

struct cache {
    uv_loop_t *loop;                   /* caller's loop */
    struct cache_options opts;         /* with defaults; strings point below */
    char *prefix;                      /* owned key prefix */
    char *url;                         /* owned redis url, or NULL */
    const struct cache__type *type;    /* the store */
    struct cache__local local;         /* in-process data (store or fallback) */
    struct cache__journal journal;     /* charges waiting for Redis */
    struct cache__redis *redis;        /* Redis connection, or NULL */
    struct cache_op *ready_head;       /* ops whose answer is known, to finish */
    struct cache_op *ready_tail;       /* last of them */
    uv_idle_t idle;                    /* runs the ready list */
    struct cache_op *op_pool;          /* finished ops kept for reuse, linked by next */
    unsigned op_pooled;                /* how many */
    char instance[17];                 /* random hex id in reservation members */
    uint64_t seq;                      /* last reservation number */
    int handles_open;                  /* handles whose close callback is due */
    void (*closed)(void *arg);         /* cache_close() callback */
    void *closed_arg;                  /* its argument */
    unsigned closing:1;                /* cache_close() closed the store */
    unsigned draining:1;               /* cache_close() waits for commands in flight first */
    char redis_epoch[40];              /* Redis's PREFIXepoch as the last setup or write-back
                                        * retry read it (redis.c), or as the journal file
                                        * kept it from the Redis its entries went to; ""
                                        * unknown */
    char *jfile;                       /* owned opts.journal_file, or NULL */
    int jfile_lock;                    /* fd holding the flock on JFILE.lock, -1: none */
    unsigned jfile_held:1;             /* the file holds entries not yet confirmed by Redis */
    char *sfile;                       /* owned opts.spend_file, or NULL */
    int sfile_lock;                    /* fd holding the flock on SFILE.lock, -1: none */
    uv_timer_t sfile_timer;            /* saves the spend every second while it changes */
    struct sfile_save *sfile_work;     /* a save out on the thread pool, or NULL */
    unsigned sfile_dirty:1;            /* spend changed since the last save was built */
    unsigned sfile_failing:1;          /* the last save failed (logged once) */
};

/* A zeroed op of `kind` for `tenant` (NULL: none), from the pool of
 * finished ones when it has any; NULL with errno set on failure. */
struct cache_op *cache__op_new(struct cache *c, enum cache__kind kind, const char *tenant);
/* Finish `op` now: run its callback unless cancelled, then free it. */
void cache__finish(struct cache_op *op);
/* Finish `op` from the loop's next idle turn. */
void cache__defer(struct cache_op *op);
/* One handle counted in c->handles_open finished closing. */
void cache__handle_closed(struct cache *c);
/* Start a release for a reservation nobody will settle (cancelled begin). */
void cache__release_orphan(struct cache *c, const char *tenant,
                           const struct cache_reservation *r);
/* Entry name of a cache key without prefix: "{tenant}:c:HEX" or "c:{HEX}".
 * Returns a malloc'd string or NULL. */
char *cache__entry_name(const struct cache *c, const char *tenant, const struct cache_key *key);

/* Redis side (redis.c). */
int cache__redis_create(struct cache *c);
void cache__redis_free(struct cache *c);

#endif
