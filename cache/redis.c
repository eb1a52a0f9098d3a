/*
 * cache/redis.c: the Redis store, on the caller's libuv loop through
 * hiredis's async API and an adapter of our own.
 *
 * Connection states (one connection per struct cache):
 *
 *   DOWN --timer(backoff)--> CONNECTING --SCRIPT LOAD replies--> CONNECTED
 *     ^                          |  connect timeout, refused,        |
 *     +--------------------------+  AUTH/SCRIPT LOAD error           |
 *     +-------- reset / EOF / command timeout / poll error ----------+
 *
 * CONNECTING covers resolving the host (uv_getaddrinfo, never the blocking
 * resolver hiredis would use), the TCP connect, AUTH/SELECT and loading the
 * two scripts; one connect timer bounds all of it. In DOWN the same timer
 * waits for the next attempt, doubling from reconnect_min_ms to
 * reconnect_max_ms. On entering CONNECTED the journal is written back.
 *
 * Commands in flight sit on a FIFO list in send order, each with a
 * deadline. Redis answers in order, so one timer watching the head is
 * enough; a command past its deadline drops the whole connection (the
 * replies behind it are stuck too), which fails every pending command with
 * cache_error_timeout and starts the reconnect.
 *
 * Begins and settles do not go out one by one: they wait in a queue until
 * the loop is about to poll (a prepare handle), then the queue is sorted by
 * tenant and period and each run becomes one script call (struct batch),
 * up to BATCH_MAX ops. While a turn's calls are out, the queue waits for
 * their replies (group commit). Under load one call then carries every
 * request that arrived meanwhile, which is what keeps Redis from being the
 * bottleneck; alone, an op waits for nothing but the end of its turn. A
 * tenant's keys share a hash slot, so a batch stays valid on a cluster.
 *
 * Why our own adapter: hiredis 0.14's libuv adapter ignores a poll error,
 * so a refused or reset connection never reaches hiredis and every callback
 * waits forever. Ours hands a poll error to hiredis as readable+writable so
 * it sees the socket error, and drops the connection if hiredis did not.
 *
 * While not CONNECTED, or when a command fails, operations fall back:
 * fail_open answers from the in-process counters (struct cache__local,
 * kept in step with the values Redis returns) and journals charges;
 * fail_closed fails begin/spend_get with error_store_unavailable and still
 * journals charges.
 *
 * Key layout, every key of a tenant in one hash slot:
 *   PREFIX{tenant}:d:YYYYMMDD  spent that UTC day (string integer)
 *   PREFIX{tenant}:m:YYYYMM    spent that UTC month
 *   PREFIX{tenant}:open        open reservations, hash "INSTANCE-SEQ:AMOUNT" -> expiry ms,
 *                              '#' -> the sum of their amounts, '' -> when the earliest of
 *                              them expires, at the soonest (see LUA_COMMON)
 *   PREFIX{tenant}:x           reservations that expired unsettled (kept for a grace period,
 *                              so a late or repeated settle is charged exactly once)
 *   PREFIX{tenant}:applied     ids of the charges without a reservation applied within the
 *                              grace period (sorted set, id -> when), so that one sent again
 *                              after its reply was lost is charged exactly once
 *   PREFIX{tenant}:c:SHA256    cached response (PREFIXc:{SHA256} when shared across tenants)
 *   PREFIXlive                 the instances alive (sorted set, instance id -> when its mark
 *                              lapses): how many share the budgets, for fail_open
 *   PREFIXepoch                set by the first connection, read by each: gone or changed,
 *                              Redis lost its data (see epoch_read)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h" /* before uv.h: sys/param.h redefines MIN/MAX silently */
#include "cache/internal.h"
#include "common/error.h"
#include "common/fmt.h"
#include "common/log.h"

#define DAY_KEY_TTL_S "691200"       /* 8 days */
#define MONTH_KEY_TTL_S "34560000"   /* 400 days */
#define GRACE_MIN_MS 3600000         /* expired reservations remembered at least 1 h */
#define RETRY_MIN_MS 1000            /* first journal write-back retry while connected */
#define RETRY_MAX_MS 30000           /* its ceiling */
#define CLOCK_SKEW_MS 60000          /* how far our clock may be from Redis's */
#define LIVE_EVERY_MS 1000           /* an instance renews its mark in PREFIXlive this often */
#define LIVE_TTL_MS 3500             /* and a mark lapses after this (three beats missed) */

/* ---- scripts ---- */

/* The settles and begins that one loop turn produces for one tenant and
 * period go to Redis as one script call (see "batches" below): a script
 * call costs Redis more than the few commands inside it. The script
 * handles its ops in order, with the results each would have had alone. */

/* What both scripts share. KEYS[3] is the hash of a tenant's open
 * reservations, member "INSTANCE-SEQ:AMOUNT" -> expiry ms, plus two fields
 * of its own: '#', the sum of their amounts, and '', when the earliest of
 * them expires at the soonest (NEVER: none open), so that the sweep
 * (prune) looks at them only when one may have expired, and then moves at
 * most 256 to the expired set KEYS[4]. Each redis.call() costs about a
 * microsecond of its own, hence the sum in the hash: it is read with the
 * settled members' expiries and written with the new members, no
 * commands of its own.
 *
 * A hash, not a sorted set: a small sorted set is a listpack whose every
 * insert parses each member's score again. The field '' is padded past
 * 64 bytes (hash-max-listpack-value) so that Redis makes the hash a hash
 * table from the start: as a listpack, each HSET, HMGET and HDEL would
 * scan every open reservation (~14 % of a call's time at 60 open).
 * tonumber() ignores the padding. */
#define LUA_COMMON                                                                         \
    "local NEVER = 9e15\n"                                                                 \
    "local function now_ms()\n"                                                            \
    "  local t = redis.call('TIME')\n"                                                     \
    "  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"                 \
    "end\n"                                                                                \
    "local function due_value(t)\n"                                                        \
    "  return tostring(t) .. string.rep(' ', 65)\n"                                        \
    "end\n"                                                                                \
    "local function prune(now, grace, reserved, due)\n"                                    \
    "  if due > now then return reserved, due end\n"                                       \
    "  local all = redis.call('HGETALL', KEYS[3])\n"                                       \
    "  local gone, moved, ng = {}, {}, 0\n"                                                \
    "  due = NEVER\n"                                                                      \
    "  for i = 1, #all, 2 do\n"                                                            \
    "    local m = all[i]\n"                                                               \
    "    if m ~= '' and m ~= '#' then\n"                                                   \
    "      local t = tonumber(all[i + 1])\n"                                               \
    "      if t <= now and ng < 256 then\n"                                                \
    "        ng = ng + 1\n"                                                                \
    "        gone[ng] = m\n"                                                               \
    "        moved[2 * ng - 1] = now\n"                                                    \
    "        moved[2 * ng] = m\n"                                                          \
    "        reserved = reserved - tonumber(string.match(m, ':(%d+)$'))\n"                 \
    "      elseif t < due then\n"                                                          \
    "        due = t\n"                                                                    \
    "      end\n"                                                                          \
    "    end\n"                                                                            \
    "  end\n"                                                                              \
    "  if ng > 0 then\n"                                                                   \
    "    redis.call('HDEL', KEYS[3], unpack(gone))\n"                                      \
    "    redis.call('ZADD', KEYS[4], unpack(moved))\n"                                     \
    "    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - grace)\n"                   \
    "    redis.call('PEXPIRE', KEYS[4], grace)\n"                                          \
    "  end\n"                                                                              \
    "  return math.max(reserved, 0), due\n"                                                \
    "end\n"                                                                                \
    "local function counters()\n"                                                          \
    "  local v = redis.call('MGET', KEYS[1], KEYS[2])\n"                                   \
    "  return tonumber(v[1] or '0'), tonumber(v[2] or '0')\n"                              \
    "end\n"

/* One tenant's settlements and reservations of one loop turn, in that
 * order (what a settlement frees, a reservation after it can use).
 *
 * KEYS day month open expired applied [entry...]; ARGV ttl_ms grace_ms
 * day_ttl month_ttl nsettles day_limit month_limit (the begins', alike in a
 * batch), then per settle: member|'' reserved_amount real how, then per
 * begin: member amount entry (its KEYS index, 0: no lookup).
 *
 * A settle drops its reservation and charges `real` when `how` is '1', or
 * when the reservation was still known (open or expired), once even if
 * named twice; open reservations are looked up and removed with one command
 * each for the whole batch (HMGET, HDEL). A charge without a reservation
 * has its id as `how`: charged unless that id is in the applied set
 * (KEYS[5], id -> when applied, kept for the grace period), so that one
 * sent again after its reply was lost is not counted twice. The counters
 * get their expiry when created (a day key outlives its day by a week). A begin
 * answers a cache hit, or reserves `amount` unless a limit would be passed.
 *
 * Returns {day, month after the batch, then per begin: the reserved sum
 * after it (at most 2^60) times 4 plus 0 granted | 1 denied | 2 hit, then each hit's
 * value}: flat, one integer per begin, because each element of a reply
 * costs Redis and hiredis (an allocation) more than the number in it. */
static const char lua_turn[] =
    LUA_COMMON
    "local ns = tonumber(ARGV[5])\n"
    "local last = 7 + 4 * ns\n"
    "local ask, arg_of, na, seen, known = {'', '#'}, {}, 2, {}, {}\n"
    "for i = 8, last, 4 do\n"
    "  local m = ARGV[i]\n"
    "  if m ~= '' and not seen[m] then\n"
    "    seen[m] = true\n"
    "    na = na + 1\n"
    "    ask[na] = m\n"
    "    arg_of[na] = i\n"
    "  end\n"
    "end\n"
    "local h = redis.call('HMGET', KEYS[3], unpack(ask))\n"
    "local due, reserved = tonumber(h[1] or NEVER), tonumber(h[2] or '0')\n"
    "local was, open, nopen, gone, ngone = reserved, {}, 0, {}, 0\n"
    "for j = 3, na do\n"
    "  if h[j] then\n"
    "    nopen = nopen + 1\n"
    "    open[nopen] = ask[j]\n"
    "    reserved = reserved - tonumber(ARGV[arg_of[j] + 1])\n"
    "    known[arg_of[j]] = true\n"
    "  elseif redis.call('ZSCORE', KEYS[4], ask[j]) then\n"
    "    ngone = ngone + 1\n"
    "    gone[ngone] = ask[j]\n"
    "    known[arg_of[j]] = true\n"
    "  end\n"
    "end\n"
    "reserved = math.max(reserved, 0)\n"
    "local charged, now, ids, nids, new_id = 0, nil, {}, 0, {}\n"
    "for i = 8, last, 4 do\n"
    "  local how = ARGV[i + 3]\n"
    "  if known[i] or how == '1' then\n"
    "    charged = charged + tonumber(ARGV[i + 2])\n"
    "  elseif how ~= '0' and not new_id[how] and not redis.call('ZSCORE', KEYS[5], how) then\n"
    "    now = now or now_ms()\n"
    "    new_id[how] = true\n"
    "    ids[nids + 1] = now\n"
    "    ids[nids + 2] = how\n"
    "    nids = nids + 2\n"
    "    charged = charged + tonumber(ARGV[i + 2])\n"
    "  end\n"
    "end\n"
    /* The counters first: a write that fails (a key of the wrong type)
     * then leaves nothing behind, no hold dropped nor id recorded without
     * its charge, so the journal's write-back charges it again. */
    "local day, month\n"
    "if charged ~= 0 then\n"
    /* In digits: Redis writes a Lua number from 1e17 on as "1e+17", which
     * INCRBY refuses. */
    "  local by = string.format('%.0f', charged)\n"
    "  day = redis.pcall('INCRBY', KEYS[1], by)\n"
    "  if type(day) == 'table' then return day end\n"
    "  month = redis.pcall('INCRBY', KEYS[2], by)\n"
    "  if type(month) == 'table' then\n"
    "    if day == charged then redis.call('DEL', KEYS[1])\n"
    "    else redis.call('DECRBY', KEYS[1], by) end\n"
    "    return month\n"
    "  end\n"
    "  if day == charged then redis.call('EXPIRE', KEYS[1], ARGV[3]) end\n"
    "  if month == charged then redis.call('EXPIRE', KEYS[2], ARGV[4]) end\n"
    "end\n"
    "if nopen > 0 then redis.call('HDEL', KEYS[3], unpack(open)) end\n"
    "if ngone > 0 then redis.call('ZREM', KEYS[4], unpack(gone)) end\n"
    "if nids > 0 then redis.call('ZADD', KEYS[5], unpack(ids)) end\n"
    "if now then\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[2]))\n"
    "  redis.call('PEXPIRE', KEYS[5], ARGV[2])\n"
    "end\n"
    "if #ARGV == last then\n"
    "  if reserved ~= was then redis.call('HSET', KEYS[3], '#', reserved) end\n"
    "  if not day then day, month = counters() end\n"
    "  return {day, month}\n"
    "end\n"
    "now = now or now_ms()\n"
    "local ttl, grace = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local old_due = due\n"
    "reserved, due = prune(now, grace, reserved, due)\n"
    "if not day then day, month = counters() end\n"
    "local dl, ml = tonumber(ARGV[6]), tonumber(ARGV[7])\n"
    "local expires = now + ttl\n"
    "local expires_s = tostring(expires)\n" /* a number argument is formatted at each use */
    "local hset, nh, out, no, hits = {}, 0, {day, month}, 2, {}\n"
    "for i = last + 1, #ARGV, 3 do\n"
    "  local e = ARGV[i + 2]\n"
    "  local v = e ~= '0' and redis.call('GET', KEYS[tonumber(e)])\n"
    "  local amount = tonumber(ARGV[i + 1])\n"
    "  local st = 0\n"
    "  if v then\n"
    "    st = 2\n"
    "    hits[#hits + 1] = v\n"
    "  elseif (dl > 0 and day + reserved + amount > dl) or\n"
    "         (ml > 0 and month + reserved + amount > ml) then\n"
    "    st = 1\n"
    "  else\n"
    "    hset[nh + 1] = ARGV[i]\n"
    "    hset[nh + 2] = expires_s\n"
    "    nh = nh + 2\n"
    "    reserved = reserved + amount\n"
    "  end\n"
    "  no = no + 1\n"
    /* At most 2^60 said: times 4, a hold at the 2^62 ceiling would pass
     * what the reply's integer holds. */
    "  out[no] = math.min(reserved, 2^60) * 4 + st\n"
    "end\n"
    "if nh > 0 and expires < due then due = expires end\n"
    "if due ~= old_due then\n"
    "  hset[nh + 1] = ''\n"
    "  hset[nh + 2] = due_value(due)\n"
    "  nh = nh + 2\n"
    "end\n"
    "if reserved ~= was or nh > 0 then\n"
    "  hset[nh + 1] = '#'\n"
    "  hset[nh + 2] = reserved\n"
    "  redis.call('HSET', KEYS[3], unpack(hset))\n"
    "  redis.call('PEXPIRE', KEYS[3], ttl + grace)\n"
    "end\n"
    "for i = 1, #hits do out[no + i] = hits[i] end\n"
    "return out\n";

/* KEYS day month open expired; ARGV grace_ms. Returns {day, month,
 * reserved}. */
static const char lua_spend[] =
    LUA_COMMON
    "local h = redis.call('HMGET', KEYS[3], '', '#')\n"
    "local due, was = tonumber(h[1] or NEVER), tonumber(h[2] or '0')\n"
    "local reserved, now_due = prune(now_ms(), tonumber(ARGV[1]), was, due)\n"
    /* A sweep cut short at 256 may leave the earliest expiry as it was:
     * the sum must still lose what it moved. */
    "if now_due ~= due or reserved ~= was then\n"
    "  redis.call('HSET', KEYS[3], '', due_value(now_due), '#', reserved)\n"
    "end\n"
    "local day, month = counters()\n"
    "return {day, month, reserved}\n";

/* KEYS live; ARGV instance, ttl_ms. Renews the instance's mark, drops
 * the lapsed ones and returns how many are alive. Redis's clock, not
 * ours: instances' clocks may differ by more than a mark lives. */
static const char lua_live[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local ttl = tonumber(ARGV[2])\n"
    "redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])\n"
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)\n"
    "redis.call('PEXPIRE', KEYS[1], ttl)\n"
    "return redis.call('ZCARD', KEYS[1])\n";

enum { SCRIPT_TURN, SCRIPT_SPEND, SCRIPT_LIVE, NSCRIPTS };

static const char *const scripts[NSCRIPTS] = {lua_turn, lua_spend, lua_live};

/* ---- state ---- */

struct cache__redis {
    struct cache *c;              /* owner */
    char *host;                   /* from the url */
    int port;                     /* default 6379 */
    char *password;               /* AUTH, or NULL; never logged */
    int db;                       /* SELECT when > 0 */
    redisAsyncContext *ac;        /* current connection, NULL when none */
    enum cache_state state;       /* see the diagram above */
    uv_timer_t timer;             /* connect timeout (CONNECTING) or backoff (DOWN) */
    uv_timer_t cmd_timer;         /* deadline of the oldest command in flight */
    uv_getaddrinfo_t gai;         /* host resolution */
    unsigned resolving:1;         /* gai in progress */
    unsigned resolve_counted:1;   /* gai counted in handles_open (closing) */
    uint64_t attempt;             /* connect attempts, to spot stale resolutions */
    uint64_t gai_attempt;         /* attempt the running resolution belongs to */
    uint64_t marks;               /* PREFIXepoch marks this store offered: the last one's
                                     number, so that none is offered twice (epoch_offer) */
    unsigned epoch_out:1;         /* a write-back retry's epoch check is out (retry_cb) */
    int backoff_ms;               /* next reconnect delay */
    int setup_pending;            /* AUTH/SELECT/SCRIPT LOAD replies awaited */
    char sha[NSCRIPTS][41];       /* SHA1 of each script, from SCRIPT LOAD */
    struct cache_op *head;        /* commands in flight, oldest first */
    struct cache_op *tail;        /* newest */
    size_t ninflight;             /* length of that list */
    uint64_t reconnects;          /* successful connections */
    const char *drop_reason;      /* errstr for replies failed by our own drop */
    uv_prepare_t prepare;         /* sends the queue just before the loop polls */
    struct cache_op **queue;      /* begins and settles of this loop turn, not yet sent */
    size_t nqueue;                /* ops in it */
    size_t queue_cap;             /* its allocated length */
    size_t nbatches;              /* batch script calls sent, reply not yet seen */
    char *scratch;                /* a batch's argv and argument bytes, reused */
    size_t scratch_cap;           /* its allocated size */
    uv_timer_t retry;             /* journal write-back again while connected (see journal_retry) */
    int retry_ms;                 /* its next delay */
    size_t nflushing;             /* write-backs out (queued or in flight) */
    unsigned refusing:1;          /* the last script write was refused (OOM, MISCONF, ...) */
    uv_timer_t live_timer;        /* renews this instance's mark in PREFIXlive */
    unsigned live;                /* instances alive at the last renewal, this one included */
    unsigned live_out:1;          /* a renewal is out */
    unsigned live_noscript:1;     /* Redis lost the script: load it before the next renewal */
    unsigned live_warned:1;       /* a renewal's error was logged; quiet until one succeeds */
    struct log_every error_log;   /* Redis's error replies, logged once a second at most */
};

/* The adapter's per-connection state: freed in the poll handle's close
 * callback, which may run after hiredis freed the context. */
struct redis_poll {
    uv_poll_t poll;          /* on the hiredis socket */
    redisAsyncContext *ac;   /* NULL once hiredis cleaned up */
    struct cache *c;         /* for handle accounting */
    int events;              /* UV_READABLE | UV_WRITABLE wanted by hiredis */
    unsigned hold_write:1;   /* queue_send is adding commands: it writes them itself */
    unsigned write_held:1;   /* hiredis asked for a write meanwhile */
};

static void redis_connect(struct cache__redis *s);
static void flush_journal(struct cache__redis *s);
static void send_live(struct cache__redis *s, int leaving);
static void live_timer_cb(uv_timer_t *t);
static void journal_retry(struct cache__redis *s);
static void op_ended(struct cache_op *op, int in_call);

/* ---- adapter ---- */

static void poll_closed(uv_handle_t *h)
{
    struct redis_poll *p = container_of((uv_poll_t *)h, struct redis_poll, poll);
    struct cache *c = p->c;

    free(p);
    cache__handle_closed(c);
}

static void redis_drop(struct cache__redis *s, const char *errstr);

static void poll_cb(uv_poll_t *h, int status, int events)
{
    struct redis_poll *p = container_of(h, struct redis_poll, poll);
    redisAsyncContext *ac = p->ac;

    if (status < 0)
        events = UV_READABLE | UV_WRITABLE; /* let hiredis find the socket error */
    if (p->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
    if (p->ac && (events & UV_READABLE))
        redisAsyncHandleRead(p->ac);
    /* libuv stopped the poll on error: a context still alive would never
     * hear from its socket again. */
    if (status < 0 && p->ac && p->c->redis->ac == ac)
        redis_drop(p->c->redis, error_store_unavailable);
}

static void poll_update(struct redis_poll *p, int add, int del)
{
    int ev = (p->events | add) & ~del;

    if (ev == p->events || p->ac == NULL)
        return;
    p->events = ev;
    if (ev)
        uv_poll_start(&p->poll, ev, poll_cb);
    else
        uv_poll_stop(&p->poll);
}

static void ev_add_read(void *d) { poll_update(d, UV_READABLE, 0); }
static void ev_del_read(void *d) { poll_update(d, 0, UV_READABLE); }
static void ev_add_write(void *d)
{
    struct redis_poll *p = d;

    if (p->hold_write)
        p->write_held = 1;
    else
        poll_update(p, UV_WRITABLE, 0);
}

static void ev_del_write(void *d) { poll_update(d, 0, UV_WRITABLE); }

static void ev_cleanup(void *d)
{
    struct redis_poll *p = d;

    if (p->ac == NULL)
        return;
    p->ac->ev.cleanup = NULL; /* hiredis 0.14 may call cleanup twice */
    p->ac = NULL;
    uv_poll_stop(&p->poll);
    p->c->handles_open++;
    uv_close((uv_handle_t *)&p->poll, poll_closed);
}

static int adapter_attach(struct cache *c, redisAsyncContext *ac)
{
    struct redis_poll *p = calloc(1, sizeof(*p));

    if (p == NULL)
        return -ENOMEM;
    if (uv_poll_init(c->loop, &p->poll, ac->c.fd) != 0) {
        free(p);
        return -EINVAL;
    }
    p->ac = ac;
    p->c = c;
    ac->ev.data = p;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}

/* ---- connection ---- */

static void set_state(struct cache__redis *s, enum cache_state st, const char *errstr)
{
    if (s->state == st)
        return;
    s->state = st;
    if (s->c->opts.on_state)
        s->c->opts.on_state(s->c->opts.on_state_arg, st, errstr);
}

static void timer_cb(uv_timer_t *t)
{
    struct cache__redis *s = t->data;

    if (s->state == CACHE_STATE_CONNECTING) {
        log_warn("store: connecting to Redis %s:%d timed out", s->host, s->port);
        redis_drop(s, cache_error_timeout);
    } else if (s->state == CACHE_STATE_DOWN) {
        redis_connect(s);
    }
}

/* Enter DOWN and schedule the next attempt. */
static void redis_down(struct cache__redis *s, const char *errstr)
{
    int delay;

    if (s->state == CACHE_STATE_DOWN)
        return;
    if (s->state == CACHE_STATE_CONNECTED && !s->c->closing)
        log_warn("store: lost Redis %s:%d (%s); %s", s->host, s->port, errstr,
                 s->c->opts.on_failure == CACHE_FAIL_OPEN ? "serving from local counters"
                                                          : "failing closed");
    s->setup_pending = 0;
    uv_timer_stop(&s->retry); /* the reconnect writes the journal back */
    uv_timer_stop(&s->live_timer);
    set_state(s, CACHE_STATE_DOWN, errstr);
    if (s->c->closing)
        return;
    delay = s->backoff_ms;
    delay += delay > 4 ? rand() % (delay / 4) : 0; /* spread instances apart */
    s->backoff_ms = MIN(s->backoff_ms * 2, s->c->opts.reconnect_max_ms);
    uv_timer_start(&s->timer, timer_cb, (uint64_t)delay, 0);
}

/* Tear the connection down from outside hiredis's reply processing (or
 * from inside it: hiredis then frees after the callback). Pending commands
 * fail with `errstr`. */
static void redis_drop(struct cache__redis *s, const char *errstr)
{
    redisAsyncContext *ac = s->ac;

    s->ac = NULL;
    redis_down(s, errstr);
    if (ac != NULL) {
        s->drop_reason = errstr;
        redisAsyncFree(ac);
        s->drop_reason = NULL;
    }
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct cache__redis *s = ac->data;

    if (status == REDIS_OK || ac != s->ac)
        return;
    log_warn("store: cannot connect to Redis %s:%d: %s", s->host, s->port, ac->errstr);
    s->ac = NULL; /* hiredis frees it after this callback */
    redis_down(s, error_store_unavailable);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    struct cache__redis *s = ac->data;

    if (ac != s->ac)
        return;
    s->ac = NULL;
    redis_down(s, error_store_unavailable);
}

static void redis_up(struct cache__redis *s)
{
    uv_timer_stop(&s->timer);
    s->backoff_ms = s->c->opts.reconnect_min_ms;
    s->reconnects++;
    log_info("store: connected to Redis %s:%d", s->host, s->port);
    set_state(s, CACHE_STATE_CONNECTED, NULL);
    s->retry_ms = RETRY_MIN_MS;
    flush_journal(s);
    send_live(s, 0);
    uv_timer_start(&s->live_timer, live_timer_cb, LIVE_EVERY_MS, LIVE_EVERY_MS);
}

/* What a setup reply answers (its privdata): AUTH or SELECT, SCRIPT LOAD
 * of script i (SETUP_SCRIPT + i), or the two commands of the epoch. */
enum {
    SETUP_PLAIN,
    SETUP_EPOCH_SET,
    SETUP_EPOCH_GET,
    SETUP_SCRIPT,
};

/*
 * PREFIXepoch: a mark the first connection sets (its instance's id and
 * attempt number: none other sets the same, no expiry), and that every
 * setup reads. A Redis that lost its data (a
 * restart without persistence, a FLUSHALL) lost the mark with it. Then a
 * charge journaled as "may have been applied" (sent, no reply) that drops
 * a Redis hold cannot be told from its hold: the new Redis knows neither
 * the hold nor the spend the charge added, and the write-back, finding no
 * hold, would charge nothing. Such entries become plain charges (the
 * journal's "how" 1): they were not in the Redis that is there now. Those
 * without a hold carry an id, which an empty Redis has never seen: they
 * are charged anyway. The journal file keeps the mark with its entries, so
 * a start that loads them compares too. A mark evicted (a maxmemory policy that evicts
 * keys, which budgets should not run under) reads as lost data too.
 */
static void epoch_read(struct cache__redis *s, const redisReply *reply)
{
    struct cache *c = s->c;
    char now[sizeof(c->redis_epoch)] = "";
    size_t n = 0;
    int64_t amount = 0;

    if (reply->type == REDIS_REPLY_STRING) {
        /* Ours are "INSTANCE-ATTEMPT"; anything else is not ours to
         * read (the journal file keeps it in JSON): leave what we knew. */
        if (reply->len >= sizeof(now) || strspn(reply->str, "0123456789abcdef-") != reply->len)
            return;
        memcpy(now, reply->str, reply->len + 1);
    } else if (reply->type != REDIS_REPLY_NIL) {
        return;
    }
    if (c->redis_epoch[0] != '\0' && strcmp(now, c->redis_epoch) != 0) {
        for (struct cache__jentry *e = c->journal.head; e; e = e->next) {
            if (e->seq == 0 || !e->conditional)
                continue;
            e->conditional = 0;
            n++;
            amount = cache__sat_add(amount, e->real);
        }
        log_warn("store: Redis %s:%d lost its data (restarted without persistence, flushed?): %zu "
                 "journaled charges (%lld micro-dollars) sent to it before, perhaps applied, "
                 "are written back as charges",
                 s->host, s->port, n, (long long)amount);
    }
    memcpy(c->redis_epoch, now, sizeof(now)); /* nil: unknown, whatever the next one reads */
}

/* Replies to the setup commands; privdata says which (SETUP_*). */
static void setup_cb(redisAsyncContext *ac, void *r, void *priv)
{
    struct cache__redis *s = ac->data;
    redisReply *reply = r;
    intptr_t what = (intptr_t)priv;
    intptr_t script = what >= SETUP_SCRIPT ? what - SETUP_SCRIPT : -1;

    if (reply == NULL || ac != s->ac)
        return; /* connection gone; its end is handled elsewhere */
    if (what == SETUP_EPOCH_SET) {
        /* An error here is a refusal of writes (OOM, ...): the GET tells. */
    } else if (what == SETUP_EPOCH_GET) {
        epoch_read(s, reply);
    } else if (reply->type == REDIS_REPLY_ERROR ||
        (script >= 0 && (reply->type != REDIS_REPLY_STRING || reply->len != 40))) {
        log_error("store: Redis refused setup: %s",
                  reply->type == REDIS_REPLY_ERROR ? reply->str : "bad SCRIPT LOAD reply");
        redis_drop(s, cache_error_protocol);
        return;
    }
    if (script >= 0)
        memcpy(s->sha[script], reply->str, 41);
    if (--s->setup_pending == 0)
        redis_up(s);
}

/* Send SET PREFIXepoch MARK NX and GET PREFIXepoch on the connection,
 * with `cb` and `set_priv`, `get_priv` for their replies. MARK is this
 * instance's id and a number it never offered before: a mark gone (a
 * FLUSHALL) and set again by this same store then reads as another one,
 * not as the mark it had. */
static void epoch_offer(struct cache__redis *s, redisCallbackFn *cb, void *set_priv,
                        void *get_priv)
{
    char key[CACHE_KEY_PREFIX_MAX + sizeof("epoch")], mark[sizeof(s->c->redis_epoch)];
    const char *set[] = {"SET", key, mark, "NX"}, *get[] = {"GET", key};

    snprintf(key, sizeof(key), "%sepoch", s->c->prefix);
    snprintf(mark, sizeof(mark), "%s-%llu", s->c->instance, (unsigned long long)++s->marks);
    redisAsyncCommandArgv(s->ac, cb, set_priv, 4, set, NULL);
    redisAsyncCommandArgv(s->ac, cb, get_priv, 2, get, NULL);
}

static void start_session(struct cache__redis *s, const char *ip)
{
    redisAsyncContext *ac = redisAsyncConnect(ip, s->port);
    char db[16];

    if (ac == NULL || ac->err) {
        log_warn("store: cannot connect to Redis %s:%d: %s", s->host, s->port,
                 ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        redis_down(s, error_store_unavailable);
        return;
    }
    ac->data = s;
    if (adapter_attach(s->c, ac) < 0) {
        redisAsyncFree(ac);
        redis_down(s, error_store_unavailable);
        return;
    }
    s->ac = ac;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    s->setup_pending = 0;
    if (s->password) {
        const char *argv[] = {"AUTH", s->password};
        redisAsyncCommandArgv(ac, setup_cb, (void *)SETUP_PLAIN, 2, argv, NULL);
        s->setup_pending++;
    }
    if (s->db > 0) {
        snprintf(db, sizeof(db), "%d", s->db);
        redisAsyncCommand(ac, setup_cb, (void *)SETUP_PLAIN, "SELECT %s", db);
        s->setup_pending++;
    }
    for (intptr_t i = 0; i < NSCRIPTS; i++) {
        const char *argv[] = {"SCRIPT", "LOAD", scripts[i]};
        redisAsyncCommandArgv(ac, setup_cb, (void *)(SETUP_SCRIPT + i), 3, argv, NULL);
        s->setup_pending++;
    }
    /* Last: its reply, before redis_up writes the journal back. */
    epoch_offer(s, setup_cb, (void *)SETUP_EPOCH_SET, (void *)SETUP_EPOCH_GET);
    s->setup_pending += 2;
}

static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct cache__redis *s = req->data;
    char ip[INET6_ADDRSTRLEN] = "";

    s->resolving = 0;
    if (status == 0 && res != NULL) {
        /* Prefer IPv4: "localhost" often lists ::1 first while Redis is
         * bound to 127.0.0.1 only, and we try a single address. */
        const struct addrinfo *a = res;
        for (const struct addrinfo *i = res; i; i = i->ai_next)
            if (i->ai_family == AF_INET) {
                a = i;
                break;
            }
        if (a->ai_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)a->ai_addr, ip, sizeof(ip));
        else
            uv_ip4_name((struct sockaddr_in *)a->ai_addr, ip, sizeof(ip));
    }
    uv_freeaddrinfo(res);
    if (s->resolve_counted) {
        s->resolve_counted = 0;
        cache__handle_closed(s->c);
        return;
    }
    if (s->state != CACHE_STATE_CONNECTING || s->gai_attempt != s->attempt)
        return; /* timed out meanwhile; a later attempt resolves again */
    if (ip[0] == '\0') {
        log_warn("store: cannot resolve Redis host %s: %s", s->host,
                 status ? uv_strerror(status) : "no address");
        redis_down(s, error_store_unavailable);
        return;
    }
    start_session(s, ip);
}

static void redis_connect(struct cache__redis *s)
{
    struct in6_addr a6;
    struct in_addr a4;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};

    s->attempt++;
    set_state(s, CACHE_STATE_CONNECTING, NULL);
    uv_timer_start(&s->timer, timer_cb, (uint64_t)s->c->opts.connect_timeout_ms, 0);
    if (inet_pton(AF_INET, s->host, &a4) == 1 || inet_pton(AF_INET6, s->host, &a6) == 1) {
        start_session(s, s->host);
        return;
    }
    if (s->resolving)
        return; /* the previous lookup is still running: wait for the timeout */
    s->gai.data = s;
    s->gai_attempt = s->attempt;
    if (uv_getaddrinfo(s->c->loop, &s->gai, gai_cb, s->host, NULL, &hints) == 0)
        s->resolving = 1;
    else
        redis_down(s, error_store_unavailable);
}

/* redis://[[user]:password@]host[:port][/db] */
static int parse_url(struct cache__redis *s, const char *url)
{
    const char *p, *at, *slash, *colon, *end;

    if (strncmp(url, "redis://", 8) != 0)
        return -EINVAL;
    p = url + 8;
    end = p + strlen(p);
    slash = strchr(p, '/');
    if (slash == NULL)
        slash = end;
    at = memchr(p, '@', (size_t)(slash - p));
    if (at != NULL) {
        colon = memchr(p, ':', (size_t)(at - p));
        if (colon != NULL && at - colon > 1 &&
            (s->password = strndup(colon + 1, (size_t)(at - colon - 1))) == NULL)
            return -ENOMEM;
        p = at + 1;
    }
    s->port = 6379;
    colon = memchr(p, ':', (size_t)(slash - p));
    if (p[0] == '[') { /* [v6]:port */
        const char *rbr = memchr(p, ']', (size_t)(slash - p));
        if (rbr == NULL)
            return -EINVAL;
        s->host = strndup(p + 1, (size_t)(rbr - p - 1));
        colon = rbr[1] == ':' ? rbr + 1 : NULL;
    } else {
        s->host = strndup(p, (size_t)((colon ? colon : slash) - p));
    }
    if (s->host == NULL)
        return -ENOMEM;
    if (s->host[0] == '\0')
        return -EINVAL;
    if (colon != NULL) {
        char *e;
        long port = strtol(colon + 1, &e, 10);
        if (e != slash || port <= 0 || port > 65535)
            return -EINVAL;
        s->port = (int)port;
    }
    if (*slash == '/' && slash[1] != '\0') {
        char *e;
        long db = strtol(slash + 1, &e, 10);
        if (*e != '\0' || db < 0 || db > 1000000)
            return -EINVAL;
        s->db = (int)db;
    }
    return 0;
}

/* ---- commands in flight ---- */

static void cmd_timer_cb(uv_timer_t *t)
{
    struct cache__redis *s = t->data;
    uint64_t now = uv_now(s->c->loop);

    if (s->head == NULL)
        return;
    if (s->head->deadline <= now) {
        log_warn("store: Redis command timed out after %d ms", s->c->opts.command_timeout_ms);
        redis_drop(s, cache_error_timeout);
        return;
    }
    uv_timer_start(&s->cmd_timer, cmd_timer_cb, s->head->deadline - now, 0);
}

static void inflight_add(struct cache__redis *s, struct cache_op *op)
{
    op->deadline = uv_now(s->c->loop) + (uint64_t)s->c->opts.command_timeout_ms;
    op->inflight = 1;
    op->next = NULL;
    op->prev = s->tail;
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    s->ninflight++;
    if (!uv_is_active((uv_handle_t *)&s->cmd_timer))
        uv_timer_start(&s->cmd_timer, cmd_timer_cb, (uint64_t)s->c->opts.command_timeout_ms, 0);
}

static void inflight_del(struct cache__redis *s, struct cache_op *op)
{
    if (!op->inflight)
        return;
    if (op->prev)
        op->prev->next = op->next;
    else
        s->head = op->next;
    if (op->next)
        op->next->prev = op->prev;
    else
        s->tail = op->prev;
    op->next = op->prev = NULL;
    op->inflight = 0;
    s->ninflight--;
}

static void reply_cb(redisAsyncContext *ac, void *r, void *priv);

static int send_argv(struct cache__redis *s, struct cache_op *op, int argc, const char **argv,
                     const size_t *lens)
{
    if (s->ac == NULL || s->state != CACHE_STATE_CONNECTED ||
        redisAsyncCommandArgv(s->ac, reply_cb, op, argc, argv, lens) != REDIS_OK)
        return -1;
    op->pending++;
    if (!op->inflight)
        inflight_add(s, op);
    return 0;
}

/* Renew this instance's mark in PREFIXlive, or with `leaving` remove it.
 * The count it answers (parse_reply) is what fail_open divides a budget's
 * remainder by while Redis is away (cache__local_begin). After a NOSCRIPT
 * the script is loaded again ahead of it (its reply unread): sending it
 * whole each second would cost Redis a compile each time. */
static void send_live(struct cache__redis *s, int leaving)
{
    struct cache *c = s->c;
    struct cache_op *op;
    char key[CACHE_KEY_PREFIX_MAX + sizeof("live")], ttl[16];
    const char *load[] = {"SCRIPT", "LOAD", lua_live};
    const char *renew[] = {"EVALSHA", s->sha[SCRIPT_LIVE], "1", key, c->instance, ttl};
    const char *remove[] = {"ZREM", key, c->instance};

    if (s->live_out || s->state != CACHE_STATE_CONNECTED ||
        (op = cache__op_new(c, CACHE__LIVE, NULL)) == NULL)
        return;
    snprintf(key, sizeof(key), "%slive", c->prefix);
    snprintf(ttl, sizeof(ttl), "%d", LIVE_TTL_MS);
    op->release = leaving;
    if (!leaving && s->live_noscript &&
        redisAsyncCommandArgv(s->ac, NULL, NULL, 3, load, NULL) == REDIS_OK)
        s->live_noscript = 0;
    if ((leaving ? send_argv(s, op, 3, remove, NULL) : send_argv(s, op, 6, renew, NULL)) < 0) {
        cache__finish(op);
        return;
    }
    s->live_out = 1;
}

static void live_timer_cb(uv_timer_t *t)
{
    send_live(t->data, 0);
}

/* "{TENANT}:c:" and 64 hex digits, the longest entry name (cache__entry_name),
 * after the longest prefix, and every per-tenant key fit CACHE__NAME_MAX. */
_Static_assert(CACHE_KEY_PREFIX_MAX + CACHE_TENANT_MAX + sizeof("{}:c:") + 64 <= CACHE__NAME_MAX,
               "the longest key fits CACHE__NAME_MAX");

/* Bytes of an entry's key, with its NUL. */
static size_t entry_key_size(const struct cache *c, const char *name)
{
    return strlen(c->prefix) + strlen(name) + 1;
}

/* An entry's key (the prefix, then its name) at `key`, which has
 * entry_key_size() bytes; returns its length. */
static size_t entry_key(const struct cache *c, const char *name, char *key)
{
    size_t np = strlen(c->prefix), nn = strlen(name);

    memcpy(key, c->prefix, np);
    memcpy(key + np, name, nn + 1);
    return np + nn;
}

/* The four per-tenant keys of a period. */
struct keys {
    char day[CACHE__NAME_MAX];      /* spend that day */
    char month[CACHE__NAME_MAX];    /* spend that month */
    char res[CACHE__NAME_MAX];      /* open reservations */
    char exp[CACHE__NAME_MAX];      /* expired reservations */
    char applied[CACHE__NAME_MAX];  /* ids of charges applied without a reservation */
};

static void keys_build(const struct cache *c, const char *tenant, const struct cache__period *p,
                       struct keys *k)
{
    char d[16], m[16];

    cache__period_fmt(p, d, m);
    snprintf(k->day, sizeof(k->day), "%s{%s}:d:%s", c->prefix, tenant, d);
    snprintf(k->month, sizeof(k->month), "%s{%s}:m:%s", c->prefix, tenant, m);
    snprintf(k->res, sizeof(k->res), "%s{%s}:open", c->prefix, tenant);
    snprintf(k->exp, sizeof(k->exp), "%s{%s}:x", c->prefix, tenant);
    snprintf(k->applied, sizeof(k->applied), "%s{%s}:applied", c->prefix, tenant);
}

static int grace_ms(const struct cache *c)
{
    return MAX(c->opts.reservation_ttl_ms, GRACE_MIN_MS);
}

/* Send the spend script; with `eval` the body instead of the SHA. */
static int send_spend(struct cache__redis *s, struct cache_op *op, int eval)
{
    struct keys k;
    char grace[24];
    const char *argv[] = {eval ? "EVAL" : "EVALSHA",
                          eval ? scripts[SCRIPT_SPEND] : s->sha[SCRIPT_SPEND],
                          "4", k.day, k.month, k.res, k.exp, grace};

    keys_build(s->c, op->tenant, &op->period, &k);
    snprintf(grace, sizeof(grace), "%d", grace_ms(s->c));
    return send_argv(s, op, 8, argv, NULL);
}

/* ---- batches ---- */

#define BATCH_MAX 64      /* ops per script call: bounds its arguments and its time in Redis */
#define QUEUE_HOLD_MAX 256 /* ops held back while a turn is out, at most */
#define BATCH_HEAD 15     /* EVALSHA sha numkeys, five keys, seven common arguments */
#define NUM_MAX 24        /* bytes of a formatted int64, with its NUL */
#define MEMBER_MAX 64     /* "INSTANCE-SEQ:AMOUNT" */

/* One script call: the settles and write-backs, then the begins, of one
 * tenant and period. Freed when its reply has been handed to every op. */
struct batch {
    struct cache__redis *s;  /* connection it went out on */
    unsigned sent_eval:1;    /* NOSCRIPT fallback already used */
    size_t n;                /* ops */
    size_t nsettles;         /* ops[0..nsettles) settle, the rest begin */
    struct cache_op *ops[];  /* in script order */
};

/* A batch's arguments, in s->scratch: argv pointers, then their bytes. */
struct args {
    const char **argv;  /* argument pointers */
    int argc;           /* used */
    char *p;            /* next free byte */
    char *end;          /* end of the scratch */
    int overflow;       /* the size estimate was wrong: do not send */
};

static const char *op_tenant(const struct cache_op *op)
{
    return op->jentry ? op->jentry->tenant : op->tenant;
}

static const struct cache__period *op_period(const struct cache_op *op)
{
    return op->jentry ? &op->jentry->period : &op->period;
}

/* 0 when two ops can share a script call; else their order. */
static int batch_cmp(const struct cache_op *x, const struct cache_op *y)
{
    const struct cache__period *px = op_period(x), *py = op_period(y);
    int d = strcmp(op_tenant(x), op_tenant(y));

    if (d == 0)
        d = (px->day > py->day) - (px->day < py->day);
    if (d == 0)
        d = (px->month > py->month) - (px->month < py->month);
    return d;
}

static int is_begin(const struct cache_op *op)
{
    return op->kind == CACHE__BEGIN;
}

/* qsort order: by batch; in a batch the settles first (what they free,
 * the begins can use), then by reservation number, which for begins is
 * arrival order (who is first when a limit is near). */
static int queue_order(const void *a, const void *b)
{
    const struct cache_op *x = *(struct cache_op *const *)a, *y = *(struct cache_op *const *)b;
    int d = batch_cmp(x, y);

    if (d == 0)
        d = is_begin(x) - is_begin(y);
    return d ? d : (x->res.seq > y->res.seq) - (x->res.seq < y->res.seq);
}

static void arg_add(struct args *a, const char *v)
{
    a->argv[a->argc++] = v;
}

/* Where the next argument of up to `need` bytes goes, or NULL: the size
 * estimate was wrong, and the batch will not be sent. */
static char *arg_room(struct args *a, size_t need)
{
    if ((size_t)(a->end - a->p) >= need)
        return a->p;
    a->overflow = 1;
    a->argv[a->argc++] = "";
    return NULL;
}

/* End the argument begun at a->p just before `end`. */
static void arg_done(struct args *a, char *end)
{
    *end++ = '\0';
    a->argv[a->argc++] = a->p;
    a->p = end;
}

/* The decimal digits of v at p; returns the end. Several per request in
 * a batch's arguments: printf would be most of the batch's cost. */
static char *put_int(char *p, int64_t v)
{
    char tmp[FMT_U64_MAX], *d = fmt_u64(tmp + sizeof(tmp), v < 0 ? -(uint64_t)v : (uint64_t)v);
    size_t n = (size_t)(tmp + sizeof(tmp) - d);

    if (v < 0)
        *p++ = '-';
    memcpy(p, d, n);
    return p + n;
}

static void arg_int(struct args *a, int64_t v)
{
    char *p = arg_room(a, NUM_MAX);

    if (p)
        arg_done(a, put_int(p, v));
}

/* A cache entry's key: the prefix and the entry's name. */
static void arg_entry_key(struct args *a, const struct cache *c, const char *name)
{
    char *p = arg_room(a, entry_key_size(c, name));

    if (p)
        arg_done(a, p + entry_key(c, name, p));
}

/* "INSTANCE-SEQ:AMOUNT": the instance id, two numbers of at most 20
 * digits, two separators and the NUL. */
_Static_assert(sizeof(((struct cache *)0)->instance) + 2 * 20 + 2 <= MEMBER_MAX,
               "a reservation member fits MEMBER_MAX");

/* "INSTANCE-SEQ" at p, the start of a member and a whole charge id; returns
 * the end. `instance` is this store's, or a journal entry's origin. */
static char *put_instance_seq(char *p, const char *instance, uint64_t seq)
{
    size_t n = strlen(instance);

    memcpy(p, instance, n);
    p[n] = '-';
    return put_int(p + n + 1, (int64_t)seq);
}

static void arg_member(struct args *a, const char *instance, uint64_t seq, int64_t amount)
{
    char *p = arg_room(a, MEMBER_MAX);

    if (p == NULL)
        return;
    p = put_instance_seq(p, instance, seq);
    *p++ = ':';
    arg_done(a, put_int(p, amount));
}

/* A charge's id, "INSTANCE-ID": unique across instances, as members are. */
static void arg_id(struct args *a, const char *instance, uint64_t id)
{
    char *p = arg_room(a, MEMBER_MAX);

    if (p)
        arg_done(a, put_instance_seq(p, instance, id));
}

/* A reservation's member and amount, or '' and 0 for none (seq 0). */
static void args_member(struct args *a, const char *instance, uint64_t seq, int64_t amount)
{
    if (seq == 0) {
        arg_add(a, "");
        arg_add(a, "0");
        return;
    }
    arg_member(a, instance, seq, amount);
    arg_int(a, amount);
}

/* A begin that looks up a cache entry of the tenant's (a key of its slot). */
static int has_entry(const struct cache_op *op)
{
    return is_begin(op) && op->name && !op->cache->opts.shared_cache;
}

/* Size the scratch for `b` and point `a` into it. */
static int args_init(struct cache__redis *s, const struct batch *b, struct args *a)
{
    size_t nargs = BATCH_HEAD + b->n * 5, bytes = 4 * NUM_MAX, need;

    for (size_t i = 0; i < b->n; i++) {
        bytes += MEMBER_MAX + 4 * NUM_MAX;
        if (has_entry(b->ops[i])) {
            nargs++;
            bytes += entry_key_size(s->c, b->ops[i]->name);
        }
    }
    need = nargs * sizeof(char *) + bytes;
    if (need > s->scratch_cap) {
        char *p = realloc(s->scratch, need);
        if (p == NULL)
            return -1;
        s->scratch = p;
        s->scratch_cap = need;
    }
    a->argv = (const char **)(void *)s->scratch;
    a->argc = 0;
    a->p = s->scratch + nargs * sizeof(char *);
    a->end = s->scratch + need;
    a->overflow = 0;
    return 0;
}

/* A settle or write-back: member|'' reserved-amount real how. A charge
 * without a reservation always goes with its id: its reply may be lost
 * after Redis applied it, and only the id tells the second send apart. */
static void args_settle(struct args *a, const struct cache *c, const struct cache_op *op)
{
    const struct cache__jentry *e = op->jentry;

    if (e == NULL && op->res.remote) { /* charges whatever happened to the reservation */
        args_member(a, c->instance, op->res.seq, op->res.amount);
        arg_int(a, op->amount);
        arg_add(a, "1");
    } else if (e == NULL) {
        args_member(a, c->instance, 0, 0);
        arg_int(a, op->amount);
        arg_id(a, c->instance, op->charge_id);
    } else if (e->seq != 0) { /* a sent one may have been applied already */
        args_member(a, e->origin, e->seq, e->res_amount);
        arg_int(a, e->real);
        arg_add(a, e->conditional ? "0" : "1");
    } else {
        args_member(a, e->origin, 0, 0);
        arg_int(a, e->real);
        arg_id(a, e->origin, e->id);
    }
}

/* A begin: member amount entry-key-index. */
static void args_begin(struct args *a, const struct cache *c, const struct cache_op *op,
                       int entry)
{
    arg_member(a, c->instance, op->res.seq, op->amount);
    arg_int(a, op->amount);
    arg_int(a, entry);
}

/* ARGV: ttl grace day_ttl month_ttl nsettles day_limit month_limit, the
 * settles, the begins. */
static void args_ops(struct args *a, const struct batch *b)
{
    const struct cache *c = b->s->c;
    int entry = 6; /* KEYS index of the first cache entry */

    arg_int(a, c->opts.reservation_ttl_ms);
    arg_int(a, grace_ms(c));
    arg_add(a, DAY_KEY_TTL_S);
    arg_add(a, MONTH_KEY_TTL_S);
    arg_int(a, (int64_t)b->nsettles);
    arg_int(a, b->nsettles < b->n ? b->ops[b->nsettles]->day_limit : 0);
    arg_int(a, b->nsettles < b->n ? b->ops[b->nsettles]->month_limit : 0);
    for (size_t i = 0; i < b->nsettles; i++)
        args_settle(a, c, b->ops[i]);
    for (size_t i = b->nsettles; i < b->n; i++)
        args_begin(a, c, b->ops[i], has_entry(b->ops[i]) ? entry++ : 0);
}

static void batch_reply_cb(redisAsyncContext *ac, void *r, void *priv);

/* Send `b` (with `eval` the script body instead of its SHA). */
static int batch_send(struct batch *b, int eval)
{
    struct cache__redis *s = b->s;
    struct cache *c = s->c;
    int nkeys = 5;
    struct keys k;
    struct args a;

    if (s->ac == NULL || s->state != CACHE_STATE_CONNECTED || args_init(s, b, &a) < 0)
        return -1;
    for (size_t i = b->nsettles; i < b->n; i++)
        nkeys += has_entry(b->ops[i]);
    keys_build(c, op_tenant(b->ops[0]), op_period(b->ops[0]), &k);
    arg_add(&a, eval ? "EVAL" : "EVALSHA");
    arg_add(&a, eval ? scripts[SCRIPT_TURN] : s->sha[SCRIPT_TURN]);
    arg_int(&a, nkeys);
    arg_add(&a, k.day);
    arg_add(&a, k.month);
    arg_add(&a, k.res);
    arg_add(&a, k.exp);
    arg_add(&a, k.applied);
    for (size_t i = b->nsettles; i < b->n; i++)
        if (has_entry(b->ops[i]))
            arg_entry_key(&a, c, b->ops[i]->name);
    args_ops(&a, b);
    if (a.overflow ||
        redisAsyncCommandArgv(s->ac, batch_reply_cb, b, a.argc, a.argv, NULL) != REDIS_OK)
        return -1;
    s->nbatches++;
    for (size_t i = 0; i < b->n; i++) {
        /* A begin listed since its GET (a shared cache) may have waited
         * in the queue: its deadline is the call's, from now. */
        inflight_del(s, b->ops[i]);
        b->ops[i]->pending++;
        inflight_add(s, b->ops[i]);
    }
    return 0;
}

/* An op that never reached Redis: nothing of it was applied. */
static void op_unsent(struct cache_op *op)
{
    struct cache *c = op->cache;

    if (op->errstr == NULL)
        op->errstr = error_store_unavailable;
    if (op->kind == CACHE__FLUSH) {
        cache__journal_readd(&c->journal, op->jentry, 0);
        op->jentry = NULL;
        c->redis->nflushing--;
        cache__finish(op);
        journal_retry(c->redis);
    } else if (op->pending == 0) { /* else a begin's GET is out: its reply ends the op */
        inflight_del(c->redis, op); /* a begin whose GET was answered is still listed */
        op_ended(op, 1);
    }
}

static void batch_start(struct cache__redis *s, struct cache_op **ops, size_t n)
{
    struct batch *b = malloc(sizeof(*b) + n * sizeof(b->ops[0]));

    for (size_t i = 0; i < n; i++)
        ops[i]->queued = 0;
    if (b != NULL) {
        b->s = s;
        b->sent_eval = 0;
        b->n = n;
        for (b->nsettles = 0; b->nsettles < n && !is_begin(ops[b->nsettles]); b->nsettles++)
            ;
        memcpy(b->ops, ops, n * sizeof(ops[0]));
        if (batch_send(b, 0) == 0)
            return;
        free(b);
    }
    for (size_t i = 0; i < n; i++)
        op_unsent(ops[i]);
}

/* How many of the sorted q[0..n) share one script call: one tenant and
 * period, at most BATCH_MAX, and begins of the same limits (the call
 * carries them once; they differ only across a config reload). */
static size_t batch_len(struct cache_op *const *q, size_t n)
{
    const struct cache_op *begin = NULL;
    size_t j;

    for (j = 0; j < n && j < BATCH_MAX; j++) {
        if (j > 0 && batch_cmp(q[0], q[j]) != 0)
            break;
        if (!is_begin(q[j]))
            continue;
        if (begin == NULL)
            begin = q[j];
        else if (q[j]->day_limit != begin->day_limit || q[j]->month_limit != begin->month_limit)
            break;
    }
    return j;
}

/* Send every queued op, one script call per tenant and period, and
 * write them at once: the socket is nearly always writable, so waiting for
 * the loop to say so would only cost two epoll_ctl calls per turn. */
static void queue_send(struct cache__redis *s)
{
    struct cache_op **q = s->queue;
    size_t n = s->nqueue, cap = s->queue_cap, i, j;
    redisAsyncContext *ac = s->ac;
    struct redis_poll *p = ac ? ac->ev.data : NULL;

    uv_prepare_stop(&s->prepare);
    if (n == 0)
        return;
    /* Ending an op below may queue others: they go to a new array. */
    s->queue = NULL;
    s->nqueue = s->queue_cap = 0;
    qsort(q, n, sizeof(*q), queue_order);
    if (p)
        p->hold_write = 1;
    for (i = 0; i < n; i = j) {
        j = i + batch_len(q + i, n - i);
        batch_start(s, q + i, j - i);
    }
    if (p && s->ac == ac) { /* ending ops never frees the connection, but be sure */
        p->hold_write = 0;
        if (p->write_held) {
            p->write_held = 0;
            redisAsyncHandleWrite(ac); /* asks for the poll itself if the socket is full */
        }
    }
    if (s->queue == NULL) {
        s->queue = q;
        s->queue_cap = cap;
    } else {
        free(q);
    }
}

/* While a turn's script calls are out, later ops wait for their replies
 * and then go together (group commit): under load a call carries more ops
 * and Redis runs fewer calls, alone an op still leaves at once. The queue
 * is bounded by the requests in flight; QUEUE_HOLD_MAX caps it anyway. */
static void prepare_cb(uv_prepare_t *h)
{
    struct cache__redis *s = h->data;

    if (s->nbatches > 0 && s->nqueue < QUEUE_HOLD_MAX)
        return;
    queue_send(s);
}

/* Queue a begin, settle or write-back for this turn's script calls; -1
 * when it cannot go to Redis (not connected, no memory). */
static int queue_add(struct cache__redis *s, struct cache_op *op)
{
    if (s->ac == NULL || s->state != CACHE_STATE_CONNECTED)
        return -1;
    if (s->nqueue == s->queue_cap) {
        size_t cap = s->queue_cap ? 2 * s->queue_cap : 64;
        struct cache_op **q = realloc(s->queue, cap * sizeof(*q));
        if (q == NULL)
            return -1;
        s->queue = q;
        s->queue_cap = cap;
    }
    s->queue[s->nqueue++] = op;
    op->queued = 1;
    if (s->nqueue == 1)
        uv_prepare_start(&s->prepare, prepare_cb);
    return 0;
}

/* ---- reply parsing ---- */

static int int_at(const redisReply *r, size_t i, int64_t *out)
{
    if (r->type != REDIS_REPLY_ARRAY || i >= r->elements ||
        r->element[i]->type != REDIS_REPLY_INTEGER)
        return -1;
    *out = r->element[i]->integer;
    return 0;
}

static int copy_value(struct cache_op *op, const char *p, size_t len)
{
    free(op->value);
    op->value = malloc(len ? len : 1);
    if (op->value == NULL)
        return -1;
    memcpy(op->value, p, len);
    op->value_len = len;
    op->result.value_len = len;
    return 0;
}

/* Apply a single command's reply (a shared-cache GET, the spend script, a
 * SET) to the op; sets op->errstr on failure. */
static void parse_reply(struct cache_op *op, const redisReply *r)
{
    if (op->shared_get) { /* the pipelined GET answers before the begin script */
        op->shared_get = 0;
        if (r->type == REDIS_REPLY_STRING) {
            if (copy_value(op, r->str, r->len) < 0)
                op->errstr = error_no_memory;
            op->result.lookup = CACHE_LOOKUP_HIT;
        } else if (r->type != REDIS_REPLY_NIL) {
            op->errstr = cache_error_protocol;
        }
    } else if (op->kind == CACHE__SPEND) {
        if (int_at(r, 0, &op->spend.day_spent) < 0 || int_at(r, 1, &op->spend.month_spent) < 0 ||
            int_at(r, 2, &op->spend.reserved) < 0)
            op->errstr = cache_error_protocol;
    } else if (op->kind == CACHE__LIVE) {
        if (r->type != REDIS_REPLY_INTEGER)
            op->errstr = cache_error_protocol;
        else if (!op->release) { /* our own mark is in the count, unless it lapsed meanwhile */
            op->cache->redis->live = r->integer > 1 ? (unsigned)MIN(r->integer, 1000000) : 1;
            op->cache->redis->live_warned = 0;
        }
    } else if (op->kind != CACHE__PUT || r->type != REDIS_REPLY_STATUS) {
        op->errstr = cache_error_protocol;
    }
}

/* One begin's outcome; `value` is its hit's bytes (status 2). */
static void begin_apply(struct cache_op *op, int64_t day, int64_t month, int64_t st,
                        int64_t reserved, const redisReply *value)
{
    struct cache_begin_result *b = &op->result;

    b->day_spent = day;
    b->month_spent = month;
    b->reserved = reserved;
    if (st == 2) {
        if (value == NULL || value->type != REDIS_REPLY_STRING)
            op->errstr = cache_error_protocol;
        else if (copy_value(op, value->str, value->len) < 0)
            op->errstr = error_no_memory;
        b->lookup = CACHE_LOOKUP_HIT;
    } else if (st == 0) {
        b->granted = 1;
        b->reservation.amount = op->amount;
        b->reservation.seq = op->res.seq;
        b->reservation.remote = 1;
    }
}

/* The turn script's reply: {day, month, then reserved * 4 + status per
 * begin, then each hit's value}. Ops already failed are left as they are. */
static void parse_turn(struct batch *b, const redisReply *r)
{
    int64_t day = 0, month = 0, st_reserved;
    size_t nbegins = b->n - b->nsettles, hit = 2 + nbegins;
    int bad = int_at(r, 0, &day) < 0 || int_at(r, 1, &month) < 0;

    for (size_t i = 0; i < b->n; i++) {
        struct cache_op *op = b->ops[i];
        size_t j = i - b->nsettles; /* index among the begins */
        const redisReply *value = NULL;
        if (i < b->nsettles) {
            op->spend.day_spent = day;
            op->spend.month_spent = month;
        } else if (!bad && (int_at(r, 2 + j, &st_reserved) < 0 || st_reserved < 0)) {
            bad = 1; /* the hit values can no longer be matched up */
        } else if (!bad) {
            int64_t st = st_reserved % 4;

            if (st == 2 && hit < r->elements)
                value = r->element[hit++];
            if (op->errstr == NULL)
                begin_apply(op, day, month, st, st_reserved / 4, value);
        }
        if (bad && op->errstr == NULL)
            op->errstr = cache_error_protocol;
    }
}

static const char *reply_error(struct cache__redis *s, const redisReply *reply)
{
    char note[LOG_EVERY_NOTE_MAX];

    if (reply == NULL)
        return s->drop_reason ? s->drop_reason : error_store_unavailable;
    /* Once a second at most: an error that stays (a tenant's key of the
     * wrong type) comes back with each of its requests. */
    if (log_every_due(&s->error_log, uv_now(s->c->loop), note))
        log_warn("store: Redis error: %s%s", reply->str, note);
    return cache_error_protocol;
}

/* An error Redis gives a write it refuses while it keeps the connection:
 * out of memory under noeviction, a failed BGSAVE or AOF write (MISCONF),
 * too few replicas (NOREPLICAS), a replica (READONLY). Inside our scripts
 * these hit the first write command, so nothing of the call was applied.
 * Redis 7 keeps the code at the start; older versions wrap it in "ERR Error
 * running script ...: -CODE ...". */
static int is_refusal(const redisReply *reply)
{
    static const char *const codes[] = {"OOM", "MISCONF", "NOREPLICAS", "READONLY"};
    char wrapped[16];

    if (reply == NULL || reply->type != REDIS_REPLY_ERROR)
        return 0;
    for (size_t i = 0; i < ARRAY_SIZE(codes); i++) {
        size_t n = strlen(codes[i]);
        snprintf(wrapped, sizeof(wrapped), ": -%s ", codes[i]);
        if ((strncmp(reply->str, codes[i], n) == 0 && reply->str[n] == ' ') ||
            strstr(reply->str, wrapped) != NULL)
            return 1;
    }
    return 0;
}

/* READONLY: the server is a replica now, which after a failover is the
 * old primary, while the name we connect to (a DNS name that moved, a
 * proxy) leads to the new one. Unlike the other refusals, waiting on this
 * connection would not help: it is dropped, and the reconnect (which
 * resolves the name again) finds the primary, or meets the replica again
 * after the usual backoff. */
static int is_readonly(const redisReply *reply)
{
    return reply != NULL && reply->type == REDIS_REPLY_ERROR &&
           (strncmp(reply->str, "READONLY ", 9) == 0 || strstr(reply->str, ": -READONLY ") != NULL);
}

/* Whether Redis takes writes, from the replies to script calls: a refused
 * write sets it (the store then counts as not up, see cache_stats), one
 * that went through clears it. Logged on change only: while Redis refuses,
 * every request would log. */
static void writes_refused(struct cache__redis *s, int refused, const char *why)
{
    if (refused == s->refusing)
        return;
    s->refusing = refused ? 1 : 0;
    if (refused)
        log_error("store: Redis %s:%d refuses writes (%s); charges are journaled and written "
                  "back once it takes them again",
                  s->host, s->port, why);
    else
        log_info("store: Redis %s:%d takes writes again", s->host, s->port);
}

/* A batch that got through wrote if it charged, dropped a reservation or
 * made one (settles first, then begins). */
static int batch_wrote(const struct batch *b)
{
    if (b->nsettles > 0)
        return 1;
    for (size_t i = 0; i < b->n; i++)
        if (b->ops[i]->errstr == NULL && b->ops[i]->result.granted)
            return 1;
    return 0;
}

static int is_noscript(const redisReply *reply)
{
    return reply && reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "NOSCRIPT", 8) == 0;
}

/* One reply of `op` handled: end it when it was the last awaited. */
static void op_replied(struct cache__redis *s, struct cache_op *op)
{
    if (--op->pending > 0 || op->queued)
        return; /* more replies due, or its script is still to be sent */
    inflight_del(s, op);
    op_ended(op, 0);
}

/* A renewal of our live mark failed. NOSCRIPT (a flushed script cache)
 * reloads it; a refused write (OOM, ...) is the batches' to report; any
 * other error is logged once until a renewal goes through, not every
 * second. The count Redis gave last stays. */
static void live_error(struct cache__redis *s, const redisReply *reply)
{
    if (is_noscript(reply)) {
        s->live_noscript = 1;
        return;
    }
    if (is_refusal(reply) || s->live_warned)
        return;
    log_warn("store: Redis refused this instance's live mark: %s", reply->str);
    s->live_warned = 1;
}

/* Replies to single commands: a shared-cache GET, a SET, the spend script. */
static void reply_cb(redisAsyncContext *ac, void *r, void *priv)
{
    struct cache_op *op = priv;
    struct cache__redis *s = op->cache->redis;
    redisReply *reply = r;

    if (is_noscript(reply) && op->kind == CACHE__SPEND && !op->sent_eval && op->errstr == NULL) {
        op->sent_eval = 1;
        op->pending--;
        inflight_del(s, op);
        if (send_spend(s, op, 1) == 0)
            return;
        op->pending++;
        op->errstr = error_store_unavailable;
    } else if (op->kind == CACHE__LIVE && reply != NULL && reply->type == REDIS_REPLY_ERROR) {
        live_error(s, reply);
        op->errstr = cache_error_protocol;
    } else if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        const char *err = reply_error(s, reply);
        if (op->errstr == NULL)
            op->errstr = err;
    } else if (op->errstr == NULL) {
        parse_reply(op, reply);
    }
    op_replied(s, op);
}

/* The reply to a batch: the turn script's flat array (parse_turn). */
static void batch_reply_cb(redisAsyncContext *ac, void *r, void *priv)
{
    struct batch *b = priv;
    struct cache__redis *s = b->s;
    redisReply *reply = r;
    const char *err = NULL;

    s->nbatches--;
    if (is_noscript(reply) && !b->sent_eval) { /* SCRIPT FLUSH, failover: send the body */
        b->sent_eval = 1;
        for (size_t i = 0; i < b->n; i++)
            if (--b->ops[i]->pending == 0)
                inflight_del(s, b->ops[i]);
        if (batch_send(b, 1) == 0)
            return;
        for (size_t i = 0; i < b->n; i++)
            b->ops[i]->pending++;
        err = error_store_unavailable;
    } else if (is_refusal(reply)) {
        err = error_store_unavailable;
        writes_refused(s, 1, reply->str);
        for (size_t i = 0; i < b->n; i++)
            b->ops[i]->refused = 1;
    } else if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        err = reply_error(s, reply);
    } else {
        parse_turn(b, reply);
        if (batch_wrote(b))
            writes_refused(s, 0, NULL);
    }
    for (size_t i = 0; i < b->n; i++) {
        struct cache_op *op = b->ops[i];
        if (op->errstr == NULL && err != NULL)
            op->errstr = err;
        op_replied(s, op);
    }
    if (is_readonly(reply) && ac == s->ac)
        redis_drop(s, error_store_unavailable);
    free(b);
}

/* ---- operations ---- */

static int fail_open(const struct cache *c)
{
    return c->opts.on_failure == CACHE_FAIL_OPEN;
}

/* Complete now (from a reply) or from the loop (still inside the call). */
static void complete(struct cache_op *op, int in_call)
{
    if (in_call)
        cache__defer(op);
    else
        cache__finish(op);
}

/* A begin that went out and got no answer (a command timeout, a lost
 * connection) may still be applied when Redis reads it: a reservation no
 * settle would name, holding budget until it expires. Journal its release:
 * written back as a settle of nothing that drops the reservation only if
 * Redis holds it. Sent after the reconnect's setup is answered, it comes
 * after the lost command, which Redis read first. */
static void journal_lost_begin(struct cache_op *op)
{
    cache__journal_add(&op->cache->journal, op->tenant, &op->period, 0, op->res.seq, op->amount,
                       0, 1);
}

static void begin_ended(struct cache_op *op, int in_call)
{
    struct cache *c = op->cache;
    struct cache_begin_result *b = &op->result;

    if (op->errstr != NULL && !in_call && !c->closing && !op->refused)
        journal_lost_begin(op);
    if (op->errstr == NULL) {
        if (b->granted) /* until its settle: see cache__local_hold_remote */
            cache__local_hold_remote(&c->local, op->tenant, b->reservation.amount);
        cache__local_sync(&c->local, op->tenant, b->day_spent, b->month_spent, b->reserved);
        if (b->lookup == CACHE_LOOKUP_HIT && b->granted) {
            /* Shared cache: the reservation made beside the GET is not needed. */
            cache__release_orphan(c, op->tenant, &b->reservation);
            b->granted = 0;
        } else if (b->lookup != CACHE_LOOKUP_HIT &&
                   (c->journal.count > 0 || c->redis->nflushing > 0) &&
                   cache__local_recheck(&c->local, op->tenant, op->day_limit, op->month_limit,
                                        b)) {
            /* Redis granted it on figures that lack our charges it has not
             * confirmed (Redis takes writes again, the journal is still
             * to be written back): by what this instance knows, the hold
             * does not fit. Only with a journal: without one, the charges
             * not confirmed yet are settles sent after this begin, whose
             * holds Redis's answer still counts (checked, they would be
             * counted twice). */
            cache__release_orphan(c, op->tenant, &b->reservation);
            b->granted = 0;
        }
    } else if (c->closing) {
        op->errstr = cache_error_closed;
    } else if (fail_open(c)) {
        char *value = NULL;
        free(op->value);
        op->value = NULL;
        memset(b, 0, sizeof(*b));
        op->errstr = NULL;
        if (cache__local_begin(&c->local, op->tenant, op->name, op->amount, op->day_limit,
                               op->month_limit, c->redis->live, ++c->seq, b, &value) < 0)
            op->errstr = error_no_memory;
        op->value = value;
        b->degraded = 1;
    } else {
        op->errstr = error_store_unavailable;
    }
    complete(op, in_call);
}

static void settle_ended(struct cache_op *op, int in_call)
{
    struct cache *c = op->cache;
    const struct cache_reservation *r = &op->res;

    if (r->remote) /* answered, journaled or lost: no longer out */
        cache__local_settling(&c->local, op->tenant, -r->amount);

    if (op->errstr == NULL) {
        /* Redis has it: in its figures from this reply on (it answers in
         * order), and no longer ours to add. */
        cache__local_unconfirmed(&c->local, op->tenant, &op->period, -op->amount);
        cache__local_sync(&c->local, op->tenant, op->spend.day_spent, op->spend.month_spent, -1);
    } else if (c->closing) {
        op->errstr = cache_error_closed;
    } else {
        /* A command that was sent may have been applied (unless Redis
         * refused it): its write-back then only charges if Redis still
         * holds the reservation, or has not seen the charge's id. Still
         * unconfirmed in the local counters, journaled or not journaled
         * for a full journal (this instance keeps counting it); lost for
         * lack of memory, not. */
        if (cache__journal_add(&c->journal, op->tenant, &op->period, op->amount,
                               r->remote ? r->seq : 0, r->amount, op->charge_id,
                               !in_call && !op->refused) == -ENOMEM)
            cache__local_unconfirmed(&c->local, op->tenant, &op->period, -op->amount);
        op->errstr = error_store_unavailable;
    }
    complete(op, in_call);
}

static void spend_ended(struct cache_op *op, int in_call)
{
    struct cache *c = op->cache;

    if (op->errstr == NULL) {
        /* Shown as enforced: Redis's figures lack our charges it has not
         * confirmed (journaled while it refuses writes) and our local
         * holds, which the local counters that serve then count. */
        cache__local_sync(&c->local, op->tenant, op->spend.day_spent, op->spend.month_spent,
                          op->spend.reserved);
        cache__local_enforced(&c->local, op->tenant, &op->spend);
    } else if (c->closing) {
        op->errstr = cache_error_closed;
    } else if (fail_open(c)) {
        op->errstr = NULL;
        cache__local_spend(&c->local, op->tenant, &op->spend);
        op->spend.degraded = 1;
    } else {
        op->errstr = error_store_unavailable;
    }
    complete(op, in_call);
}

static void flush_ended(struct cache_op *op)
{
    struct cache *c = op->cache;

    c->redis->nflushing--;
    if (op->errstr == NULL) {
        c->redis->retry_ms = RETRY_MIN_MS;
        cache__local_unconfirmed(&c->local, op->jentry->tenant, &op->jentry->period,
                                 -op->jentry->real); /* Redis's answers count it now */
    } else {
        /* Closing too: the journal file saves it, or the close counts it
         * among the charges lost to Redis. */
        cache__journal_readd(&c->journal, op->jentry, !op->refused);
        op->jentry = NULL;
    }
    cache__finish(op);
}

/* `op` got its answer (or none will come): hand it on. Whatever it added to
 * the journal while connected is written back by journal_retry. */
static void op_ended(struct cache_op *op, int in_call)
{
    struct cache__redis *s = op->cache->redis;

    switch (op->kind) {
    case CACHE__BEGIN:
        begin_ended(op, in_call);
        break;
    case CACHE__SETTLE:
        settle_ended(op, in_call);
        break;
    case CACHE__SPEND:
        spend_ended(op, in_call);
        break;
    case CACHE__PUT:
        if (op->errstr && op->cache->closing)
            op->errstr = cache_error_closed;
        complete(op, in_call);
        break;
    case CACHE__FLUSH:
        flush_ended(op);
        break;
    case CACHE__LIVE: /* a failure keeps the count Redis gave last */
        s->live_out = 0;
        cache__finish(op);
        break;
    }
    journal_retry(s);
}

static void redis_begin(struct cache_op *op)
{
    struct cache *c = op->cache;
    struct cache__redis *s = c->redis;

    op->res.seq = ++c->seq;
    if (op->name && c->opts.shared_cache && s->state == CACHE_STATE_CONNECTED) {
        char key[CACHE__NAME_MAX];
        const char *argv[] = {"GET", key};
        size_t lens[] = {3, entry_key(c, op->name, key)};
        if (send_argv(s, op, 2, argv, lens) == 0)
            op->shared_get = 1;
    }
    op->result.lookup = op->name ? CACHE_LOOKUP_MISS : CACHE_LOOKUP_NONE;
    if (queue_add(s, op) == 0)
        return;
    op->errstr = error_store_unavailable;
    if (op->pending == 0) /* else the GET went out: finish when it answers */
        begin_ended(op, 1);
}

static void redis_settle(struct cache_op *op)
{
    struct cache *c = op->cache;
    const struct cache_reservation *r = &op->res;

    /* The local counters follow every charge and hold, so that serving
     * from them after a failure starts from the right place. */
    cache__local_settle(&c->local, op->tenant, r->remote ? 0 : r->seq, op->amount);
    /* Until Redis answers it, a reply from a call sent before it (which
     * lacks it) must not take it out of the local counters. */
    cache__local_unconfirmed(&c->local, op->tenant, &op->period, op->amount);
    if (r->remote) {
        cache__local_hold_remote(&c->local, op->tenant, -r->amount);
        cache__local_settling(&c->local, op->tenant, r->amount); /* until settle_ended */
    }
    if (!r->remote && op->amount == 0) {
        cache__defer(op); /* a local release: nothing to tell Redis */
        return;
    }
    if (!r->remote)
        op->charge_id = ++c->seq; /* nothing else tells Redis it applied this one */
    if (queue_add(c->redis, op) == 0)
        return;
    op->errstr = error_store_unavailable;
    settle_ended(op, 1); /* never sent: written back unconditionally */
}

static void redis_spend(struct cache_op *op)
{
    /* A read: what was called before it must reach Redis first. */
    queue_send(op->cache->redis);
    if (send_spend(op->cache->redis, op, 0) == 0)
        return;
    op->errstr = error_store_unavailable;
    spend_ended(op, 1);
}

static void redis_put(struct cache_op *op)
{
    struct cache *c = op->cache;
    char key[CACHE__NAME_MAX], ttl[24];
    const char *argv[] = {"SET", key, op->value, "PX", ttl};
    size_t lens[] = {3, 0, op->value_len, 2, 0};

    lens[1] = entry_key(c, op->name, key);
    snprintf(ttl, sizeof(ttl), "%lld", (long long)op->ttl_s * 1000);
    lens[4] = strlen(ttl);
    if (send_argv(c->redis, op, 5, argv, lens) == 0)
        return;
    /* Serve later degraded lookups from memory. */
    if (fail_open(c) &&
        cache__local_put(&c->local, op->name, op->value, op->value_len, op->ttl_s) == 0)
        op->errstr = NULL;
    else
        op->errstr = error_store_unavailable;
    cache__defer(op);
}

/* Whether `e` (popped) may have been applied so long ago that Redis has
 * forgotten the id that would tell: the applied set keeps an id for the
 * grace period after it was applied (on Redis's clock, which CLOCK_SKEW_MS
 * allows to differ from ours), and the first send that may have applied
 * it left at most a command timeout before since_ms. A reservation entry
 * is safe at any age: a member Redis no longer knows is not charged. An id
 * entry sent this late could be charged twice; it is dropped instead,
 * logged with its amount (the cost log has the request). */
static int too_late_to_check(const struct cache *c, const struct cache__jentry *e)
{
    int64_t window = (int64_t)grace_ms(c) - c->opts.command_timeout_ms - CLOCK_SKEW_MS;

    if (e->seq != 0 || !e->conditional || cache__wall_ms() - e->since_ms < window)
        return 0;
    log_error("store: a journaled charge of %lld micro-dollars to tenant %s may have been "
              "applied more than the grace period ago, when Redis no longer knows: not "
              "written back, lest it be charged twice (the cost log has it)",
              (long long)e->real, e->tenant);
    return 1;
}

static void flush_journal(struct cache__redis *s)
{
    struct cache *c = s->c;
    size_t n = c->journal.count;

    if (n > 0)
        log_info("store: writing back %zu journaled charges (%lld micro-dollars)", n,
                 (long long)c->journal.amount);
    /* Only the entries present now: a failure re-adds at the tail. */
    for (; n > 0 && s->state == CACHE_STATE_CONNECTED; n--) {
        struct cache__jentry *e = cache__journal_pop(&c->journal);
        struct cache_op *op;
        if (too_late_to_check(c, e)) {
            cache__local_unconfirmed(&c->local, e->tenant, &e->period, -e->real);
            free(e);
            continue;
        }
        op = cache__op_new(c, CACHE__FLUSH, NULL);
        if (op == NULL) {
            cache__journal_readd(&c->journal, e, 0);
            break;
        }
        if (e->seq == 0 && e->id == 0)
            e->id = ++c->seq; /* kept from now on: see journal.c */
        op->jentry = e;
        if (queue_add(s, op) < 0) {
            cache__journal_readd(&c->journal, e, 0);
            op->jentry = NULL;
            cache__finish(op);
            break;
        }
        s->nflushing++;
    }
    journal_retry(s);
}

/* Replies to a write-back retry's epoch check: the GET's (priv
 * SETUP_EPOCH_GET) reads the mark, then the journal is written back. */
static void retry_epoch_cb(redisAsyncContext *ac, void *r, void *priv)
{
    struct cache__redis *s = ac->data;

    if ((intptr_t)priv != SETUP_EPOCH_GET)
        return; /* the SET's: an error is a refusal of writes, the GET tells */
    s->epoch_out = 0;
    if (r == NULL || ac != s->ac || s->c->closing)
        return; /* connection gone: redis_up writes the journal back */
    epoch_read(s, r);
    flush_journal(s);
}

/* A write-back retry, on a connection whose setup read PREFIXepoch a
 * while ago: a FLUSHALL since then, on this live connection, took the
 * holds with it, and a charge journaled as "only if Redis still holds
 * its reservation" would be charged nothing. So the mark is read again
 * first (epoch_read turns such charges into plain ones if it changed):
 * two commands and one round trip per retry, at most one a second, none
 * per request. The scripts that requests call cannot read it: it is not
 * in their tenant's hash slot. */
static void retry_cb(uv_timer_t *t)
{
    struct cache__redis *s = t->data;

    if (s->state != CACHE_STATE_CONNECTED || s->ac == NULL || s->c->journal.count == 0) {
        flush_journal(s);
        return;
    }
    s->epoch_out = 1;
    epoch_offer(s, retry_epoch_cb, (void *)SETUP_EPOCH_SET, (void *)SETUP_EPOCH_GET);
}

/* Charges journaled while connected (Redis refused them, or answered with
 * an error) wait for no reconnect: write them back on a timer, from
 * RETRY_MIN_MS doubling to RETRY_MAX_MS while the write-backs fail, so a
 * Redis that refuses writes for long costs one script call per tenant every
 * RETRY_MAX_MS. Started only when no write-back is out: its end calls this
 * again. A disconnect stops it (redis_up writes the journal back). */
static void journal_retry(struct cache__redis *s)
{
    struct cache *c = s->c;

    if (c->jfile_held && c->journal.count == 0 && s->nflushing == 0 && !c->closing)
        cache__jfile_written_back(c); /* every entry it held is in Redis */
    if (c->journal.count == 0 || c->closing || s->state != CACHE_STATE_CONNECTED ||
        s->nflushing > 0 || s->epoch_out || uv_is_active((uv_handle_t *)&s->retry))
        return;
    uv_timer_start(&s->retry, retry_cb, (uint64_t)s->retry_ms, 0);
    s->retry_ms = MIN(s->retry_ms * 2, RETRY_MAX_MS);
}

static enum cache_state redis_state(const struct cache *c)
{
    return c->redis->state;
}

/* Close callback of the timers and the prepare handle. */
static void timer_closed(uv_handle_t *h)
{
    struct cache__redis *s = h->data;

    cache__handle_closed(s->c);
}

static void redis_close(struct cache *c)
{
    struct cache__redis *s = c->redis;

    uv_timer_stop(&s->timer);
    uv_timer_stop(&s->cmd_timer);
    uv_timer_stop(&s->retry);
    uv_timer_stop(&s->live_timer);
    redis_drop(s, cache_error_closed);
    queue_send(s); /* fails what is queued: the connection is gone */
    if (s->resolving && !s->resolve_counted) {
        s->resolve_counted = 1;
        c->handles_open++;
        uv_cancel((uv_req_t *)&s->gai);
    }
    c->handles_open += 5;
    uv_close((uv_handle_t *)&s->live_timer, timer_closed);
    uv_close((uv_handle_t *)&s->timer, timer_closed);
    uv_close((uv_handle_t *)&s->cmd_timer, timer_closed);
    uv_close((uv_handle_t *)&s->retry, timer_closed);
    uv_close((uv_handle_t *)&s->prepare, timer_closed);
}

static void redis_stats(const struct cache *c, struct cache_stats *out)
{
    out->state = c->redis->state;
    out->reconnects = c->redis->reconnects;
    out->inflight = c->redis->ninflight + c->redis->nqueue;
    out->writes_refused = c->redis->refusing;
    out->instances = c->redis->live;
}

/* A stopping instance no longer counts among those sharing the budgets. */
static void redis_leave(struct cache *c)
{
    struct cache__redis *s = c->redis;

    uv_timer_stop(&s->live_timer);
    s->live_out = 0; /* a renewal out is answered first: Redis answers in order */
    send_live(s, 1);
}

const struct cache__type cache__redis_type = {
    .name = "redis",
    .begin = redis_begin,
    .settle = redis_settle,
    .spend = redis_spend,
    .put = redis_put,
    .state = redis_state,
    .close = redis_close,
    .leave = redis_leave,
    .stats = redis_stats,
};

int cache__redis_create(struct cache *c)
{
    struct cache__redis *s = calloc(1, sizeof(*s));

    if (s == NULL)
        return -ENOMEM;
    c->redis = s;
    s->c = c;
    if (parse_url(s, c->url) < 0) {
        log_error("store: bad redis url (expected redis://[:password@]host[:port][/db])");
        return -EINVAL;
    }
    s->backoff_ms = c->opts.reconnect_min_ms;
    s->state = CACHE_STATE_DOWN;
    uv_timer_init(c->loop, &s->timer);
    uv_timer_init(c->loop, &s->cmd_timer);
    uv_timer_init(c->loop, &s->retry);
    uv_prepare_init(c->loop, &s->prepare);
    uv_timer_init(c->loop, &s->live_timer);
    uv_unref((uv_handle_t *)&s->live_timer); /* a renewal alone keeps no loop alive */
    s->live_timer.data = s;
    s->live = 1;
    s->timer.data = s;
    s->cmd_timer.data = s;
    s->retry.data = s;
    s->retry_ms = RETRY_MIN_MS;
    s->prepare.data = s;
    redis_connect(s);
    return 0;
}

void cache__redis_free(struct cache *c)
{
    struct cache__redis *s = c->redis;

    if (s == NULL)
        return;
    free(s->host);
    free(s->password);
    free(s->queue);
    free(s->scratch);
    free(s);
    c->redis = NULL;
}
