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
 * three scripts; one connect timer bounds all of it. In DOWN the same timer
 * waits for the next attempt, doubling from reconnect_min_ms to
 * reconnect_max_ms. On entering CONNECTED the journal is written back.
 *
 * Commands in flight sit on a FIFO list in send order, each with a
 * deadline. Redis answers in order, so one timer watching the head is
 * enough; a command past its deadline drops the whole connection (the
 * replies behind it are stuck too), which fails every pending command with
 * cache_error_timeout and starts the reconnect.
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
 *   PREFIX{tenant}:r           open reservations, zset member "INSTANCE-SEQ:AMOUNT", score expiry ms
 *   PREFIX{tenant}:rs          sum of the open reservations' amounts
 *   PREFIX{tenant}:x           reservations that expired unsettled (kept for a grace period,
 *                              so a late or repeated settle is charged exactly once)
 *   PREFIX{tenant}:c:SHA256    cached response (PREFIXc:{SHA256} when shared across tenants)
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
#include "common/log.h"

#define DAY_KEY_TTL_S "691200"       /* 8 days */
#define MONTH_KEY_TTL_S "34560000"   /* 400 days */
#define GRACE_MIN_MS 3600000         /* expired reservations remembered at least 1 h */

/* ---- scripts ---- */

#define LUA_COMMON                                                                         \
    "local function now_ms()\n"                                                            \
    "  local t = redis.call('TIME')\n"                                                     \
    "  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"                 \
    "end\n"                                                                                \
    "local function prune(now, grace)\n"                                                   \
    "  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 256)\n"    \
    "  for i = 1, #old do\n"                                                               \
    "    redis.call('ZREM', KEYS[3], old[i])\n"                                            \
    "    redis.call('DECRBY', KEYS[4], string.match(old[i], ':(%d+)$'))\n"                 \
    "    redis.call('ZADD', KEYS[5], now, old[i])\n"                                       \
    "  end\n"                                                                              \
    "  if #old > 0 then\n"                                                                 \
    "    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - grace)\n"                   \
    "    redis.call('PEXPIRE', KEYS[5], grace)\n"                                          \
    "  end\n"                                                                              \
    "  local r = tonumber(redis.call('GET', KEYS[4]) or '0')\n"                            \
    "  if r < 0 then redis.call('SET', KEYS[4], '0'); r = 0 end\n"                         \
    "  return r\n"                                                                         \
    "end\n"                                                                                \
    "local function spent(k) return tonumber(redis.call('GET', k) or '0') end\n"

/* KEYS day month res reserved exp [entry]; ARGV member amount day_limit
 * month_limit ttl_ms grace_ms. Returns {0 granted | 1 denied | 2 hit, day,
 * month, reserved [, value]}. */
static const char lua_begin[] =
    LUA_COMMON
    "local now = now_ms()\n"
    "local grace = tonumber(ARGV[6])\n"
    "local reserved = prune(now, grace)\n"
    "local day, month = spent(KEYS[1]), spent(KEYS[2])\n"
    "if KEYS[6] then\n"
    "  local v = redis.call('GET', KEYS[6])\n"
    "  if v then return {2, day, month, reserved, v} end\n"
    "end\n"
    "local amount, dl, ml = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "if (dl > 0 and day + reserved + amount > dl) or (ml > 0 and month + reserved + amount > "
    "ml) then\n"
    "  return {1, day, month, reserved}\n"
    "end\n"
    "local ttl = tonumber(ARGV[5])\n"
    "redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])\n"
    "reserved = redis.call('INCRBY', KEYS[4], ARGV[2])\n"
    "redis.call('PEXPIRE', KEYS[3], ttl + grace)\n"
    "redis.call('PEXPIRE', KEYS[4], ttl + grace)\n"
    "return {0, day, month, reserved}\n";

/* KEYS day month res reserved exp; ARGV member|'' real force day_ttl
 * month_ttl. Drops the reservation; charges when force, or when the
 * reservation was still known (open or expired). Returns {day, month,
 * charged}. */
static const char lua_settle[] =
    LUA_COMMON
    "local charge = ARGV[3] == '1'\n"
    "local m = ARGV[1]\n"
    "if m ~= '' then\n"
    "  if redis.call('ZREM', KEYS[3], m) == 1 then\n"
    "    if redis.call('DECRBY', KEYS[4], string.match(m, ':(%d+)$')) < 0 then\n"
    "      redis.call('SET', KEYS[4], '0')\n"
    "    end\n"
    "    charge = true\n"
    "  elseif redis.call('ZREM', KEYS[5], m) == 1 then\n"
    "    charge = true\n"
    "  end\n"
    "end\n"
    "if charge and ARGV[2] ~= '0' then\n"
    "  local d = redis.call('INCRBY', KEYS[1], ARGV[2])\n"
    "  local mo = redis.call('INCRBY', KEYS[2], ARGV[2])\n"
    "  redis.call('EXPIRE', KEYS[1], ARGV[4])\n"
    "  redis.call('EXPIRE', KEYS[2], ARGV[5])\n"
    "  return {d, mo, 1}\n"
    "end\n"
    "return {spent(KEYS[1]), spent(KEYS[2]), 0}\n";

/* KEYS day month res reserved exp; ARGV grace_ms. Returns {day, month,
 * reserved}. */
static const char lua_spend[] =
    LUA_COMMON
    "local reserved = prune(now_ms(), tonumber(ARGV[1]))\n"
    "return {spent(KEYS[1]), spent(KEYS[2]), reserved}\n";

enum { SCRIPT_BEGIN, SCRIPT_SETTLE, SCRIPT_SPEND, NSCRIPTS };

static const char *const scripts[NSCRIPTS] = {lua_begin, lua_settle, lua_spend};

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
    int backoff_ms;               /* next reconnect delay */
    int setup_pending;            /* AUTH/SELECT/SCRIPT LOAD replies awaited */
    char sha[NSCRIPTS][41];       /* SHA1 of each script, from SCRIPT LOAD */
    struct cache_op *head;        /* commands in flight, oldest first */
    struct cache_op *tail;        /* newest */
    size_t ninflight;             /* length of that list */
    uint64_t reconnects;          /* successful connections */
    const char *drop_reason;      /* errstr for replies failed by our own drop */
};

/* The adapter's per-connection state: freed in the poll handle's close
 * callback, which may run after hiredis freed the context. */
struct redis_poll {
    uv_poll_t poll;          /* on the hiredis socket */
    redisAsyncContext *ac;   /* NULL once hiredis cleaned up */
    struct cache *c;         /* for handle accounting */
    int events;              /* UV_READABLE | UV_WRITABLE wanted by hiredis */
};

static void redis_connect(struct cache__redis *s);
static void flush_journal(struct cache__redis *s);
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
static void ev_add_write(void *d) { poll_update(d, UV_WRITABLE, 0); }
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
    flush_journal(s);
}

/* Replies to AUTH, SELECT and SCRIPT LOAD; privdata is the script index + 1
 * for SCRIPT LOAD, NULL otherwise. */
static void setup_cb(redisAsyncContext *ac, void *r, void *priv)
{
    struct cache__redis *s = ac->data;
    redisReply *reply = r;
    intptr_t script = (intptr_t)priv - 1;

    if (reply == NULL || ac != s->ac)
        return; /* connection gone; its end is handled elsewhere */
    if (reply->type == REDIS_REPLY_ERROR ||
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
        redisAsyncCommandArgv(ac, setup_cb, NULL, 2, argv, NULL);
        s->setup_pending++;
    }
    if (s->db > 0) {
        snprintf(db, sizeof(db), "%d", s->db);
        redisAsyncCommand(ac, setup_cb, NULL, "SELECT %s", db);
        s->setup_pending++;
    }
    for (intptr_t i = 0; i < NSCRIPTS; i++) {
        const char *argv[] = {"SCRIPT", "LOAD", scripts[i]};
        redisAsyncCommandArgv(ac, setup_cb, (void *)(i + 1), 3, argv, NULL);
        s->setup_pending++;
    }
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

/* The five per-tenant keys of a period, plus the cache entry's full name. */
struct keys {
    char day[CACHE__NAME_MAX];      /* spend that day */
    char month[CACHE__NAME_MAX];    /* spend that month */
    char res[CACHE__NAME_MAX];      /* open reservations */
    char reserved[CACHE__NAME_MAX]; /* their sum */
    char exp[CACHE__NAME_MAX];      /* expired reservations */
    char entry[CACHE__NAME_MAX];    /* cache entry, when asked */
};

static void keys_build(const struct cache *c, const char *tenant, const struct cache__period *p,
                       const char *entry, struct keys *k)
{
    char d[16], m[16];

    cache__period_fmt(p, d, m);
    snprintf(k->day, sizeof(k->day), "%s{%s}:d:%s", c->prefix, tenant, d);
    snprintf(k->month, sizeof(k->month), "%s{%s}:m:%s", c->prefix, tenant, m);
    snprintf(k->res, sizeof(k->res), "%s{%s}:r", c->prefix, tenant);
    snprintf(k->reserved, sizeof(k->reserved), "%s{%s}:rs", c->prefix, tenant);
    snprintf(k->exp, sizeof(k->exp), "%s{%s}:x", c->prefix, tenant);
    snprintf(k->entry, sizeof(k->entry), "%s%s", c->prefix, entry ? entry : "");
}

static void member_fmt(const struct cache *c, uint64_t seq, int64_t amount, char *out, size_t n)
{
    snprintf(out, n, "%s-%llu:%lld", c->instance, (unsigned long long)seq, (long long)amount);
}

static int grace_ms(const struct cache *c)
{
    return MAX(c->opts.reservation_ttl_ms, GRACE_MIN_MS);
}

/* Send the op's script; with `eval` the body instead of the SHA. */
static int send_script(struct cache__redis *s, struct cache_op *op, int eval)
{
    struct cache *c = s->c;
    struct keys k;
    char member[64] = "", amount[24], dl[24], ml[24], ttl[24], grace[24], real[24];
    const char *argv[16];
    int argc = 0, script, nkeys = 5;

    snprintf(grace, sizeof(grace), "%d", grace_ms(c));
    switch (op->kind) {
    case CACHE__BEGIN:
        script = SCRIPT_BEGIN;
        keys_build(c, op->tenant, &op->period, op->name, &k);
        if (op->name && !c->opts.shared_cache)
            nkeys = 6;
        break;
    case CACHE__SPEND:
        script = SCRIPT_SPEND;
        keys_build(c, op->tenant, &op->period, NULL, &k);
        break;
    default:
        script = SCRIPT_SETTLE;
        keys_build(c, op->jentry ? op->jentry->tenant : op->tenant,
                   op->jentry ? &op->jentry->period : &op->period, NULL, &k);
        break;
    }
    argv[argc++] = eval ? "EVAL" : "EVALSHA";
    argv[argc++] = eval ? scripts[script] : s->sha[script];
    argv[argc++] = nkeys == 6 ? "6" : "5";
    argv[argc++] = k.day;
    argv[argc++] = k.month;
    argv[argc++] = k.res;
    argv[argc++] = k.reserved;
    argv[argc++] = k.exp;
    if (nkeys == 6)
        argv[argc++] = k.entry;
    switch (op->kind) {
    case CACHE__BEGIN:
        member_fmt(c, op->res.seq, op->amount, member, sizeof(member));
        snprintf(amount, sizeof(amount), "%lld", (long long)op->amount);
        snprintf(dl, sizeof(dl), "%lld", (long long)op->day_limit);
        snprintf(ml, sizeof(ml), "%lld", (long long)op->month_limit);
        snprintf(ttl, sizeof(ttl), "%d", c->opts.reservation_ttl_ms);
        argv[argc++] = member;
        argv[argc++] = amount;
        argv[argc++] = dl;
        argv[argc++] = ml;
        argv[argc++] = ttl;
        argv[argc++] = grace;
        break;
    case CACHE__SPEND:
        argv[argc++] = grace;
        break;
    case CACHE__SETTLE:
        if (op->res.remote)
            member_fmt(c, op->res.seq, op->res.amount, member, sizeof(member));
        snprintf(real, sizeof(real), "%lld", (long long)op->amount);
        argv[argc++] = member;
        argv[argc++] = real;
        argv[argc++] = "1";
        argv[argc++] = DAY_KEY_TTL_S;
        argv[argc++] = MONTH_KEY_TTL_S;
        break;
    default: /* CACHE__FLUSH */
        if (op->jentry->seq)
            member_fmt(c, op->jentry->seq, op->jentry->res_amount, member, sizeof(member));
        snprintf(real, sizeof(real), "%lld", (long long)op->jentry->real);
        argv[argc++] = member;
        argv[argc++] = real;
        argv[argc++] = op->jentry->conditional ? "0" : "1";
        argv[argc++] = DAY_KEY_TTL_S;
        argv[argc++] = MONTH_KEY_TTL_S;
        break;
    }
    return send_argv(s, op, argc, argv, NULL);
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

/* Apply one reply to the op; sets op->errstr on failure. */
static void parse_reply(struct cache_op *op, const redisReply *r)
{
    struct cache_begin_result *b = &op->result;
    int64_t st, day, month, res;

    if (op->shared_get) { /* the pipelined GET answers first */
        op->shared_get = 0;
        if (r->type == REDIS_REPLY_STRING) {
            if (copy_value(op, r->str, r->len) < 0)
                op->errstr = error_no_memory;
            b->lookup = CACHE_LOOKUP_HIT;
        } else if (r->type != REDIS_REPLY_NIL) {
            op->errstr = cache_error_protocol;
        }
        return;
    }
    switch (op->kind) {
    case CACHE__BEGIN:
        if (int_at(r, 0, &st) < 0 || int_at(r, 1, &day) < 0 || int_at(r, 2, &month) < 0 ||
            int_at(r, 3, &res) < 0) {
            op->errstr = cache_error_protocol;
            return;
        }
        b->day_spent = day;
        b->month_spent = month;
        b->reserved = res;
        if (st == 2 && r->elements > 4 && r->element[4]->type == REDIS_REPLY_STRING) {
            if (copy_value(op, r->element[4]->str, r->element[4]->len) < 0)
                op->errstr = error_no_memory;
            b->lookup = CACHE_LOOKUP_HIT;
        } else if (st == 0) {
            b->granted = 1;
            b->reservation.amount = op->amount;
            b->reservation.seq = op->res.seq;
            b->reservation.remote = 1;
        }
        break;
    case CACHE__SPEND:
        if (int_at(r, 0, &op->spend.day_spent) < 0 || int_at(r, 1, &op->spend.month_spent) < 0 ||
            int_at(r, 2, &op->spend.reserved) < 0)
            op->errstr = cache_error_protocol;
        break;
    case CACHE__SETTLE:
    case CACHE__FLUSH:
        if (int_at(r, 0, &day) < 0 || int_at(r, 1, &month) < 0) {
            op->errstr = cache_error_protocol;
            return;
        }
        op->spend.day_spent = day;
        op->spend.month_spent = month;
        break;
    case CACHE__PUT:
        if (r->type != REDIS_REPLY_STATUS)
            op->errstr = cache_error_protocol;
        break;
    }
}

static void reply_cb(redisAsyncContext *ac, void *r, void *priv)
{
    struct cache_op *op = priv;
    struct cache__redis *s = op->cache->redis;
    redisReply *reply = r;

    op->pending--;
    if (reply == NULL) {
        if (op->errstr == NULL)
            op->errstr = s->drop_reason ? s->drop_reason : error_store_unavailable;
    } else if (reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "NOSCRIPT", 8) == 0 &&
               !op->sent_eval && op->errstr == NULL) {
        op->sent_eval = 1;
        inflight_del(s, op);
        if (send_script(s, op, 1) == 0)
            return;
        op->errstr = error_store_unavailable;
    } else if (reply->type == REDIS_REPLY_ERROR) {
        log_warn("store: Redis error: %s", reply->str);
        op->errstr = cache_error_protocol;
    } else if (op->errstr == NULL) {
        parse_reply(op, reply);
    }
    if (op->pending > 0)
        return;
    inflight_del(s, op);
    op_ended(op, 0);
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

static void begin_ended(struct cache_op *op, int in_call)
{
    struct cache *c = op->cache;
    struct cache_begin_result *b = &op->result;

    if (op->errstr == NULL) {
        cache__local_sync(&c->local, op->tenant, b->day_spent, b->month_spent);
        if (b->lookup == CACHE_LOOKUP_HIT && b->granted) {
            /* Shared cache: the reservation made beside the GET is not needed. */
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
                               op->month_limit, ++c->seq, b, &value) < 0)
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

    if (op->errstr == NULL) {
        cache__local_sync(&c->local, op->tenant, op->spend.day_spent, op->spend.month_spent);
    } else if (c->closing) {
        op->errstr = cache_error_closed;
    } else {
        /* A command that was sent may have been applied: its write-back
         * then only charges if Redis still holds the reservation. */
        cache__journal_add(&c->journal, op->tenant, &op->period, op->amount,
                           r->remote ? r->seq : 0, r->amount, !in_call);
        op->errstr = error_store_unavailable;
    }
    complete(op, in_call);
}

static void spend_ended(struct cache_op *op, int in_call)
{
    struct cache *c = op->cache;

    if (op->errstr == NULL) {
        cache__local_sync(&c->local, op->tenant, op->spend.day_spent, op->spend.month_spent);
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

    if (op->errstr != NULL && !c->closing) {
        cache__journal_readd(&c->journal, op->jentry, 1);
        op->jentry = NULL;
    }
    cache__finish(op);
}

static void op_ended(struct cache_op *op, int in_call)
{
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
    }
}

static void redis_begin(struct cache_op *op)
{
    struct cache *c = op->cache;
    struct cache__redis *s = c->redis;

    op->res.seq = ++c->seq;
    if (op->name && c->opts.shared_cache && s->state == CACHE_STATE_CONNECTED) {
        char key[CACHE__NAME_MAX];
        const char *argv[] = {"GET", key};
        snprintf(key, sizeof(key), "%s%s", c->prefix, op->name);
        if (send_argv(s, op, 2, argv, NULL) == 0)
            op->shared_get = 1;
    }
    op->result.lookup = op->name ? CACHE_LOOKUP_MISS : CACHE_LOOKUP_NONE;
    if (send_script(s, op, 0) == 0)
        return;
    if (op->pending > 0) { /* the GET went out: finish when it answers */
        op->errstr = error_store_unavailable;
        return;
    }
    op->errstr = error_store_unavailable;
    begin_ended(op, 1);
}

static void redis_settle(struct cache_op *op)
{
    struct cache *c = op->cache;
    const struct cache_reservation *r = &op->res;

    /* The local counters follow every charge, so that serving from them
     * after a failure starts from the right place. */
    cache__local_settle(&c->local, op->tenant, r->remote ? 0 : r->seq, op->amount);
    if (!r->remote && op->amount == 0) {
        cache__defer(op); /* a local release: nothing to tell Redis */
        return;
    }
    if (send_script(c->redis, op, 0) == 0)
        return;
    op->errstr = error_store_unavailable;
    settle_ended(op, 1); /* never sent: written back unconditionally */
}

static void redis_spend(struct cache_op *op)
{
    if (send_script(op->cache->redis, op, 0) == 0)
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

    snprintf(key, sizeof(key), "%s%s", c->prefix, op->name);
    snprintf(ttl, sizeof(ttl), "%lld", (long long)op->ttl_s * 1000);
    lens[1] = strlen(key);
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
        struct cache_op *op = calloc(1, sizeof(*op) + 1);
        if (op == NULL) {
            cache__journal_readd(&c->journal, e, 0);
            return;
        }
        op->cache = c;
        op->kind = CACHE__FLUSH;
        op->jentry = e;
        if (send_script(s, op, 0) < 0) {
            cache__journal_readd(&c->journal, e, 0);
            op->jentry = NULL;
            cache__finish(op);
            return;
        }
    }
}

static enum cache_state redis_state(const struct cache *c)
{
    return c->redis->state;
}

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
    redis_drop(s, cache_error_closed);
    if (s->resolving && !s->resolve_counted) {
        s->resolve_counted = 1;
        c->handles_open++;
        uv_cancel((uv_req_t *)&s->gai);
    }
    c->handles_open += 2;
    uv_close((uv_handle_t *)&s->timer, timer_closed);
    uv_close((uv_handle_t *)&s->cmd_timer, timer_closed);
}

static void redis_stats(const struct cache *c, struct cache_stats *out)
{
    out->state = c->redis->state;
    out->reconnects = c->redis->reconnects;
    out->inflight = c->redis->ninflight;
}

const struct cache__type cache__redis_type = {
    .name = "redis",
    .begin = redis_begin,
    .settle = redis_settle,
    .spend = redis_spend,
    .put = redis_put,
    .state = redis_state,
    .close = redis_close,
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
    s->timer.data = s;
    s->cmd_timer.data = s;
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
    free(s);
    c->redis = NULL;
}
