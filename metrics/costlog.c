/*
 * metrics/costlog.c: the per-request cost log, one JSON line per request.
 *
 * Records are serialized at once into `pending`. A flush swaps `pending`
 * and `inflight` and hands `inflight` to the log's own writer thread, so
 * the loop never waits for the disk and records keep arriving while the
 * write runs. At most one filesystem job (write, open or close, all run by
 * the writer) is out at a time, which keeps lines in order and makes
 * reopen simple:
 *
 *   write()  -> pending --(timer / 64 KiB)--> inflight --writer thread--> fd
 *   reopen() -> after the current job: open(path), then close the old fd
 *   close()  -> after the current job: the rest written the same way,
 *               close fd, close the handles -> free
 *
 * Records are money (chargeback), so none is dropped for want of room,
 * and the loop never blocks on the disk either: when `buffer_max` bytes
 * wait for it (a disk, a FIFO or a stdout pipe slower than the requests,
 * or stuck), the log is "behind" and says so (metrics_cost_log_behind,
 * COST_LOG_BEHIND). The router then starts no new request until the log
 * is back under half of that and calls it back; requests already in
 * flight still append theirs. Records that carry no money (refusals
 * before anything was reserved: of bytes that never made a request, of
 * a parked request) are skipped while behind, counted and logged: the
 * router cannot stop a client from sending malformed requests on one
 * connection after another, and their lines would else grow the buffer
 * for as long as the disk is away. So memory is bounded by buffer_max
 * plus what the requests in flight add.
 *
 * The writer is a thread of ours, not libuv's threadpool: a write stuck
 * for good must not take one of the pool's four threads (DNS lookups run
 * there) for ever, and at exit the log can give up on it (after wait_ms
 * without progress) and let the process end, while libuv would join its
 * threads at exit and hang on the stuck one. The same goes for the open
 * and the closes (a hung mount, a FIFO no one reads yet): they are the
 * writer's jobs too.
 */
#include "metrics/metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common/buf.h"
#include "common/fmt.h"
#include "common/log.h"
#include "common/util.h"
#include "common/utf8.h"
#include "conf/conf.h"
#include "metrics/internal.h"

#define FLUSH_BYTES (64 * 1024)
#define DEFAULT_BUFFER_MAX (16 * 1024 * 1024)
#define DEFAULT_WAIT_MS 30000
#define OPEN_FLAGS (O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC)

/* What the writer is asked to do. */
enum job_kind {
    JOB_WRITE,      /* job_buf to job_fd */
    JOB_OPEN,       /* path again (reopen): the result is the new fd */
    JOB_CLOSE_OLD,  /* job_fd, the file a reopen replaced */
    JOB_CLOSE_LAST, /* job_fd, at the end of metrics_cost_log_close */
};

struct metrics_cost_log {
    uv_loop_t *loop;          /* loop the handles and requests run on */
    uv_timer_t timer;         /* periodic flush (unref'd); after close, the deadline of a write */
    uv_async_t written;       /* the writer finished a job; unref'd until close */
    uv_thread_t thread;       /* the writer */
    uv_mutex_t lock;          /* guards the job_* fields and the writer's flags below */
    uv_cond_t job_cond;       /* the writer waits here for a job */
    enum job_kind job_kind;   /* the job asked for: written by the loop under the lock, so the
                               * loop reads it without (the writer only reads it) */
    uv_buf_t job_buf;         /* (lock) what the writer writes (part of inflight) */
    uv_file job_fd;           /* (lock) where it writes, or what it closes */
    ssize_t job_result;       /* (lock) bytes written, the fd opened, 0, or a negative errno */
    int job_queued;           /* (lock) a job waits for the writer */
    int job_done;             /* (lock) job_result is set and not yet taken */
    int in_job;               /* (lock) the writer is in write(2), open(2) or close(2) */
    int quit;                 /* (lock) the writer returns */
    int detached;             /* (lock) the handles are closing: no uv_async_send */
    int orphaned;             /* (lock) the writer frees the log when its write returns */
    unsigned handles_open;    /* timer + written still to close */
    char *path;               /* file path, NULL for stdout */
    uv_file fd;               /* current file */
    struct buf pending;       /* records not yet handed to a write */
    struct buf inflight;      /* bytes being written */
    size_t inflight_off;      /* bytes of inflight already written */
    uint64_t pending_records; /* records in pending */
    uint64_t inflight_records; /* records in inflight */
    size_t buffer_max;        /* bytes waiting that make the log behind */
    unsigned wait_ms;         /* at exit: longest wait for one write */
    void (*on_caught_up)(void *arg); /* told when the log is no longer behind, or NULL */
    void *caught_up_arg;      /* its argument */
    uint64_t behind_since;    /* loop ms the log fell behind */
    struct metrics *metrics;  /* for COST_LOG_DROPPED_TOTAL, _SKIPPED_TOTAL, _BEHIND, or NULL */
    uint64_t records;         /* records accepted */
    uint64_t dropped;         /* records dropped */
    uint64_t skipped;         /* costless records skipped while behind */
    uint64_t skipped_before;  /* skipped when the log last fell behind */
    int last_error;           /* last write error logged, to log each kind once */
    struct log_every behind_log; /* "behind the disk", once a second at most */
    struct log_every nomem_log; /* "no memory for a record", once a second at most */
    struct log_every skip_log; /* "skipping costless records", once a minute at most */
    unsigned busy:1;          /* a job is out */
    unsigned behind:1;        /* buffer_max reached, not yet back under half */
    unsigned reopen_wanted:1; /* reopen after the current job */
    unsigned closing:1;       /* metrics_cost_log_close() was called */
    unsigned line_cut:1;      /* the file ends inside a line: the next write starts "\n" */
};

/* ---- JSON ------------------------------------------------------------- */

static int put_string(struct buf *out, const char *str)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t n;
    int rc;

    if (str == NULL)
        return buf_append(out, "null", 4);
    n = strlen(str);
    rc = buf_reserve(out, n + 2) | buf_append(out, "\"", 1);
    for (size_t i = 0; i < n && rc == 0;) {
        size_t run = i, len;

        while (i < n && s[i] >= 0x20 && s[i] < 0x80 && s[i] != '"' && s[i] != '\\')
            i++;
        rc |= buf_append(out, s + run, i - run);
        if (i == n)
            break;
        len = utf8_seq_len(s + i, n - i);
        if (s[i] == '"' || s[i] == '\\')
            rc |= buf_printf(out, "\\%c", s[i]);
        else if (s[i] == '\n')
            rc |= buf_append(out, "\\n", 2);
        else if (s[i] < 0x20)
            rc |= buf_printf(out, "\\u%04x", s[i]);
        else if (len == 0)
            rc |= buf_append(out, UTF8_REPLACEMENT, sizeof(UTF8_REPLACEMENT) - 1);
        else
            rc |= buf_append(out, s + i, len);
        i += len ? len : 1;
    }
    rc |= buf_append(out, "\"", 1);
    return rc ? -ENOMEM : 0;
}

/*
 * A finite double with at most `decimals` fraction digits (trailing zeros
 * dropped), or null. Estimates and savings are micro-USD / 1e6 and times
 * whole ms, which a fixed number of decimals prints exactly; a settled
 * cost is exact to the pico-USD, which is below anything a price can tell
 * apart. No printf per number: this runs once per request for each of
 * six values.
 */
static int put_fixed(struct buf *out, double v, int decimals)
{
    static const uint64_t pow10[] = {1, 10, 100, 1000, 10000, 100000, 1000000, 10000000,
                                     100000000, 1000000000, 10000000000, 100000000000,
                                     1000000000000};
    char digits[24], frac_text[16], *w;
    uint64_t units, frac;
    size_t n = 0;
    int rc;

    if (!isfinite(v))
        return buf_append(out, "null", 4);
    if (fabs(v) * (double)pow10[decimals] >= 9e18) { /* beyond an integer: shortest round trip */
        char text[32];
        return buf_append(out, text, metrics__dtoa(text, v));
    }
    units = (uint64_t)llround(fabs(v) * (double)pow10[decimals]);
    frac = units % pow10[decimals];
    w = fmt_u64(digits + sizeof(digits), units / pow10[decimals]);
    rc = v < 0 && units != 0 ? buf_append(out, "-", 1) : 0;
    rc |= buf_append(out, w, (size_t)(digits + sizeof(digits) - w));
    if (frac == 0)
        return rc;
    frac_text[n++] = '.';
    for (uint64_t d = pow10[decimals] / 10; frac != 0; d /= 10) {
        frac_text[n++] = (char)('0' + frac / d);
        frac %= d;
    }
    return rc | buf_append(out, frac_text, n);
}

#define USD_DECIMALS 12 /* pico-USD: a cost of a few tokens at cents per Mtok shows */
#define MS_DECIMALS 3  /* microseconds */

static int put_int(struct buf *out, int64_t v)
{
    return v < 0 ? buf_append(out, "null", 4) : buf_append_u64(out, (uint64_t)v);
}

/* "YYYY-MM-DDTHH:MM:SS.mmmZ"; the formatted second is kept, as one line
 * after another mostly shares it. */
static int put_ts(struct buf *out, int64_t ts_ms)
{
    static __thread time_t last_secs = -1;
    static __thread char last[32];
    time_t secs = (time_t)(ts_ms / 1000);
    int ms = (int)(ts_ms % 1000);
    char frac[8] = {'.', (char)('0' + ms / 100), (char)('0' + ms / 10 % 10), (char)('0' + ms % 10),
                    'Z', '"'};
    struct tm tm;

    if (ts_ms < 0)
        return buf_append(out, "null", 4);
    if (secs != last_secs) {
        if (gmtime_r(&secs, &tm) == NULL)
            return buf_append(out, "null", 4);
        strftime(last, sizeof(last), "\"%Y-%m-%dT%H:%M:%S", &tm);
        last_secs = secs;
    }
    return buf_append(out, last, strlen(last)) | buf_append(out, frac, 6);
}

int metrics_cost_record_json(const struct metrics_cost_record *r, struct buf *out)
{
    size_t start = out->len;
    int rc = 0;

    rc |= buf_append_lit(out, "{\"ts\":") | put_ts(out, r->ts_ms);
    rc |= buf_append_lit(out, ",\"request_id\":") | put_string(out, r->request_id);
    rc |= buf_append_lit(out, ",\"tenant\":") | put_string(out, r->tenant);
    if (r->key != NULL) /* only named keys: a line has it when its key has a name */
        rc |= buf_append_lit(out, ",\"key\":") | put_string(out, r->key);
    rc |= buf_append_lit(out, ",\"tags\":{");
    for (size_t i = 0; i < r->ntags + r->nrequest_tags; i++) {
        const struct conf_tag *t = i < r->ntags ? &r->tags[i] : &r->request_tags[i - r->ntags];

        rc |= buf_append(out, ",", i > 0) | put_string(out, t->key);
        rc |= buf_append_lit(out, ":") | put_string(out, t->value);
    }
    rc |= buf_append_lit(out, "},\"route\":") | put_string(out, r->route);
    rc |= buf_append_lit(out, ",\"endpoint\":") | put_string(out, r->endpoint);
    rc |= buf_append_lit(out, ",\"backend\":") | put_string(out, r->backend);
    rc |= buf_append_lit(out, ",\"arm\":") | put_string(out, r->arm);
    rc |= buf_append_lit(out, ",\"experiment\":") | put_string(out, r->experiment);
    rc |= buf_append_lit(out, ",\"reason\":") | put_string(out, r->reason);
    rc |= buf_append_lit(out, ",\"candidates\":[");
    for (size_t i = 0; i < r->ncandidates; i++) {
        const struct metrics_cost_candidate *c = &r->candidates[i];
        rc |= buf_append(out, ",", i > 0);
        rc |= buf_append_lit(out, "{\"backend\":") | put_string(out, c->backend);
        rc |= buf_append_lit(out, ",\"est_cost_usd\":") | put_fixed(out, c->est_cost_usd, USD_DECIMALS);
        rc |= buf_append_lit(out, ",\"rejected\":") | put_string(out, c->rejected);
        rc |= buf_append_lit(out, "}");
    }
    rc |= buf_append_lit(out, "],\"prompt_tokens_est\":") | put_int(out, r->prompt_tokens_est);
    rc |= buf_append_lit(out, ",\"prompt_tokens\":") | put_int(out, r->prompt_tokens);
    rc |= buf_append_lit(out, ",\"completion_tokens_est\":") | put_int(out, r->completion_tokens_est);
    rc |= buf_append_lit(out, ",\"completion_tokens\":") | put_int(out, r->completion_tokens);
    rc |= buf_append_lit(out, ",\"billed_prompt_tokens\":") | put_int(out, r->billed_prompt_tokens);
    rc |= buf_append_lit(out, ",\"billed_completion_tokens\":") |
          put_int(out, r->billed_completion_tokens);
    if (r->service_tier != NULL)
        rc |= buf_append_lit(out, ",\"service_tier\":") | put_string(out, r->service_tier);
    rc |= buf_append_lit(out, ",\"billed_cached_tokens\":") | put_int(out, r->billed_cached_tokens);
    rc |= buf_append_lit(out, ",\"billed_cache_write_tokens\":") |
          put_int(out, r->billed_cache_write_tokens);
    rc |= buf_append_lit(out, ",\"billed_cache_write_1h_tokens\":") |
          put_int(out, r->billed_cache_write_1h_tokens);
    rc |= buf_append_lit(out, ",\"billed_web_searches\":") | put_int(out, r->billed_web_searches);
    rc |= buf_append_lit(out, ",\"billed_file_searches\":") |
          put_int(out, r->billed_file_searches);
    rc |= buf_append_lit(out, ",\"cost_usd_est\":") | put_fixed(out, r->cost_usd_est, USD_DECIMALS);
    rc |= buf_append_lit(out, ",\"cost_usd\":") | put_fixed(out, r->cost_usd, USD_DECIMALS);
    rc |= buf_append_lit(out, ",\"reported_cost_usd\":") |
          put_fixed(out, r->reported_cost_usd, USD_DECIMALS);
    rc |= r->cache_hit ? buf_append_lit(out, ",\"cache_hit\":true")
                       : buf_append_lit(out, ",\"cache_hit\":false");
    rc |= buf_append_lit(out, ",\"saved_usd\":") | put_fixed(out, r->saved_usd, USD_DECIMALS);
    rc |= buf_append_lit(out, ",\"ttft_ms\":") | put_fixed(out, r->ttft_ms, MS_DECIMALS);
    rc |= buf_append_lit(out, ",\"latency_ms\":") | put_fixed(out, r->latency_ms, MS_DECIMALS);
    rc |= buf_append_lit(out, ",\"status\":") | put_int(out, r->status);
    rc |= buf_append_lit(out, ",\"fallbacks\":") | put_int(out, r->fallbacks);
    rc |= buf_append_lit(out, "}\n");
    if (rc != 0) {
        out->len = start;
        return -ENOMEM;
    }
    return 0;
}

/* ---- writer ------------------------------------------------------------ */

static void kick(struct metrics_cost_log *log, int force);

static const char *log_name(const struct metrics_cost_log *log)
{
    return log->path ? log->path : "stdout";
}

static void count_dropped(struct metrics_cost_log *log, uint64_t n)
{
    log->dropped += n;
    if (log->metrics != NULL && n > 0)
        (void)metrics_add(log->metrics, METRICS_COST_LOG_DROPPED_TOTAL, NULL, (double)n);
}

/* Records wholly in p[0..len): one per newline. */
static uint64_t lines_in(const char *p, size_t len)
{
    uint64_t n = 0;
    const char *end = p + len;

    while (p < end && (p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        n++;
        p++;
    }
    return n;
}

/* Bytes waiting for the disk: the rest of inflight and all of pending. */
static size_t waiting(const struct metrics_cost_log *log)
{
    return log->pending.len + log->inflight.len - log->inflight_off;
}

/* Records not written yet: those of pending, and of inflight those not
 * wholly written. */
static uint64_t unwritten_records(const struct metrics_cost_log *log)
{
    return log->pending_records + log->inflight_records -
           lines_in(log->inflight.data, log->inflight_off);
}

/*
 * The rest of inflight could not be written: its records are dropped,
 * not those written before the error. If the error cut a line, that part
 * stays in the file, and the next record must not be glued to it (one
 * line that is no JSON: `costrouter report` would skip both): inflight
 * keeps a lone newline, written before anything else.
 */
static void write_failed(struct metrics_cost_log *log, int err)
{
    size_t off = log->inflight_off;

    if (err != log->last_error)
        log_error("cost log %s: write: %s; dropping records", log_name(log), uv_strerror(err));
    log->last_error = err;
    count_dropped(log, log->inflight_records - lines_in(log->inflight.data, off));
    if (off > 0 && log->inflight.data[off - 1] != '\n')
        log->line_cut = 1;
    buf_reset(&log->inflight);
    log->inflight_off = 0;
    log->inflight_records = 0;
    if (log->line_cut && buf_append(&log->inflight, "\n", 1) != 0)
        log->line_cut = 0; /* no memory for one byte: that line stays glued */
}

/* Apply a write's result (bytes written, or a negative errno) to inflight. */
static void take_result(struct metrics_cost_log *log, ssize_t n)
{
    if (n < 0) {
        write_failed(log, (int)n);
        return;
    }
    if (n > 0)
        log->line_cut = 0; /* the newline went first */
    log->inflight_off += (size_t)n;
    if (log->inflight_off == log->inflight.len) {
        buf_reset(&log->inflight);
        log->inflight_off = 0;
        log->inflight_records = 0;
    }
}

/* Close the file unless it is stdout or closed already, so that a FIFO's
 * reader sees its end. By whoever frees the log: the loop, or the writer
 * once orphaned. */
static void close_file(struct metrics_cost_log *log)
{
    if (log->path != NULL && log->fd >= 0)
        close(log->fd);
    log->fd = -1;
}

static void log_free(struct metrics_cost_log *log)
{
    uv_cond_destroy(&log->job_cond);
    uv_mutex_destroy(&log->lock);
    buf_free(&log->pending);
    buf_free(&log->inflight);
    free(log->path);
    free(log);
}

/*
 * One write(2) of what `b` holds; a non-blocking stdout that is full is
 * waited for here (poll), off the loop, so that to the loop it is just a
 * slow write.
 */
static ssize_t write_once(uv_file fd, uv_buf_t b)
{
    for (;;) {
        ssize_t n = write(fd, b.base, b.len);
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};

        if (n >= 0)
            return n;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            (void)poll(&pfd, 1, -1);
        else if (errno != EINTR)
            return -errno; /* libuv's error codes are negative errnos on Unix */
    }
}

/* One job, off the loop: bytes written, the fd opened, 0, or -errno. */
static ssize_t run_job(enum job_kind kind, uv_file fd, uv_buf_t b, const char *path)
{
    int rc;

    switch (kind) {
    case JOB_OPEN:
        rc = open(path, OPEN_FLAGS, 0640);
        return rc >= 0 ? rc : -errno;
    case JOB_CLOSE_OLD:
    case JOB_CLOSE_LAST:
        return close(fd) == 0 || errno == EINTR ? 0 : -errno; /* EINTR: closed all the same */
    case JOB_WRITE:
        break;
    }
    return write_once(fd, b);
}

/*
 * The writer thread: one job at a time, each answered through `written`.
 * Once the loop has given up on a stuck job (orphaned), the log is the
 * writer's to free, when that job returns, if ever; a file it opened
 * then is no one's, and is closed.
 */
static void writer_main(void *arg)
{
    struct metrics_cost_log *log = arg;
    int orphaned;

    uv_mutex_lock(&log->lock);
    for (;;) {
        while (!log->job_queued && !log->quit)
            uv_cond_wait(&log->job_cond, &log->lock);
        if (!log->job_queued)
            break;
        enum job_kind kind = log->job_kind;
        uv_buf_t b = log->job_buf;
        uv_file fd = log->job_fd;
        log->job_queued = 0;
        log->in_job = 1;
        uv_mutex_unlock(&log->lock);
        ssize_t n = run_job(kind, fd, b, log->path);
        uv_mutex_lock(&log->lock);
        log->in_job = 0;
        if (log->orphaned) {
            if (kind == JOB_OPEN && n >= 0)
                close((int)n);
            break;
        }
        log->job_result = n;
        log->job_done = 1;
        if (!log->detached)
            uv_async_send(&log->written);
    }
    orphaned = log->orphaned;
    uv_mutex_unlock(&log->lock);
    if (!orphaned)
        return;
    close_file(log);
    log_free(log);
}

/* Start the writer with every signal blocked: the router's stop signals
 * are meant for the loop's thread alone (main.c), and the writer has no
 * use for any. */
static int writer_start(struct metrics_cost_log *log)
{
    sigset_t all, old;
    int rc;

    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = uv_thread_create(&log->thread, writer_main, log);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* The last handle closed: end the writer and free, or, when it is stuck
 * in a write, leave both to it. */
static void on_handle_closed(uv_handle_t *h)
{
    struct metrics_cost_log *log = h->data;
    uv_thread_t thread = log->thread;
    int stuck;

    if (--log->handles_open > 0)
        return;
    uv_mutex_lock(&log->lock);
    stuck = log->in_job || log->job_queued;
    if (stuck)
        log->orphaned = 1;
    else
        log->quit = 1;
    uv_cond_signal(&log->job_cond);
    uv_mutex_unlock(&log->lock);
    if (stuck) {
        pthread_detach(thread); /* the process may end with it in write(2) */
        return;
    }
    uv_thread_join(&log->thread);
    /* After finish_close the file is closed; after on_stuck it may not be,
     * and the job given up may have come back since. */
    close_file(log);
    log_free(log);
}

/* Close both handles; the last close frees the log (on_handle_closed). */
static void release_loop(struct metrics_cost_log *log)
{
    uv_mutex_lock(&log->lock);
    log->detached = 1;
    uv_mutex_unlock(&log->lock);
    uv_close((uv_handle_t *)&log->timer, on_handle_closed);
    uv_close((uv_handle_t *)&log->written, on_handle_closed);
}

/* Has the writer's job returned, its answer not yet taken? */
static int job_returned(struct metrics_cost_log *log)
{
    int done;

    uv_mutex_lock(&log->lock);
    done = log->job_done;
    uv_mutex_unlock(&log->lock);
    return done;
}

static void start_job(struct metrics_cost_log *log, enum job_kind kind, uv_file fd, uv_buf_t b);

/* Called once nothing is in flight or waiting after metrics_cost_log_close():
 * the file is closed by the writer (a close can hang too: NFS), then the
 * handles. */
static void finish_close(struct metrics_cost_log *log)
{
    uv_file fd = log->fd;

    if (log->path == NULL || fd < 0) {
        release_loop(log);
        return;
    }
    log->fd = -1; /* the writer's now: close_file must not close it again */
    start_job(log, JOB_CLOSE_LAST, fd, uv_buf_init(NULL, 0));
}

/*
 * At exit, a job (a write, the open of a reopen, a close) has not returned
 * for wait_ms: the disk (or whoever reads the FIFO or pipe, or a hung
 * mount) stopped answering. Waiting longer could hang the exit for ever,
 * so what is not written is given up, counted and logged; the job itself
 * stays with the writer thread (on_handle_closed) and may still end.
 */
static void on_stuck(uv_timer_t *t)
{
    struct metrics_cost_log *log = container_of(t, struct metrics_cost_log, timer);
    uint64_t lost = unwritten_records(log);

    /* A job that came back as the time ran out: its answer (on_written) is
     * due in this same turn of the loop, after the timers, and the disk
     * took it. */
    if (!log->busy || job_returned(log)) {
        uv_timer_start(&log->timer, on_stuck, log->wait_ms, 0);
        return;
    }
    log_error("cost log %s: no %s went through for %u ms at exit; giving up %llu records "
              "(%zu bytes) not written", log_name(log),
              log->job_kind == JOB_WRITE  ? "write"
              : log->job_kind == JOB_OPEN ? "reopen"
                                          : "close",
              log->wait_ms, (unsigned long long)lost, waiting(log));
    count_dropped(log, lost);
    release_loop(log);
}

static void start_job(struct metrics_cost_log *log, enum job_kind kind, uv_file fd, uv_buf_t b)
{
    uv_mutex_lock(&log->lock);
    log->job_kind = kind;
    log->job_buf = b;
    log->job_fd = fd;
    log->job_queued = 1;
    uv_cond_signal(&log->job_cond);
    uv_mutex_unlock(&log->lock);
    log->busy = 1;
}

static void start_write(struct metrics_cost_log *log)
{
    start_job(log, JOB_WRITE, log->fd,
              uv_buf_init(log->inflight.data + log->inflight_off,
                          (unsigned)MIN(log->inflight.len - log->inflight_off, (size_t)1 << 30)));
}

/* Over buffer_max: new requests are to wait (metrics_cost_log_behind). */
static void fall_behind(struct metrics_cost_log *log)
{
    char note[LOG_EVERY_NOTE_MAX];
    uint64_t now = uv_now(log->loop);

    log->behind = 1;
    log->behind_since = now;
    log->skipped_before = log->skipped;
    if (log->metrics != NULL)
        (void)metrics_set(log->metrics, METRICS_COST_LOG_BEHIND, NULL, 1);
    if (log_every_due(&log->behind_log, now, note))
        log_warn("cost log %s: %zu bytes wait for the disk; new requests wait until half of "
                 "them are written%s", log_name(log), waiting(log), note);
}

/* Back under half of buffer_max after falling behind: tell the router. */
static void maybe_caught_up(struct metrics_cost_log *log)
{
    if (!log->behind || log->closing || waiting(log) >= log->buffer_max / 2)
        return;
    log->behind = 0;
    if (log->metrics != NULL)
        (void)metrics_set(log->metrics, METRICS_COST_LOG_BEHIND, NULL, 0);
    log_info("cost log %s: caught up with the disk after %llu ms; %llu records that carry no "
             "cost were skipped meanwhile", log_name(log),
             (unsigned long long)(uv_now(log->loop) - log->behind_since),
             (unsigned long long)(log->skipped - log->skipped_before));
    if (log->on_caught_up != NULL)
        log->on_caught_up(log->caught_up_arg);
}

/* The reopen's open returned: on success the new file takes the records
 * from now on, and the old one is closed (the next job). */
static void reopened(struct metrics_cost_log *log, ssize_t fd)
{
    if (fd < 0) {
        log_error("cost log %s: reopen: %s; keeping the old file", log->path, uv_strerror((int)fd));
        return;
    }
    start_job(log, JOB_CLOSE_OLD, log->fd, uv_buf_init(NULL, 0));
    log->fd = (uv_file)fd;
}

static void on_written(uv_async_t *a)
{
    struct metrics_cost_log *log = container_of(a, struct metrics_cost_log, written);
    ssize_t n;

    uv_mutex_lock(&log->lock);
    if (!log->job_done) { /* sends are coalesced; this one was taken already */
        uv_mutex_unlock(&log->lock);
        return;
    }
    n = log->job_result;
    log->job_done = 0;
    uv_mutex_unlock(&log->lock);
    log->busy = 0;
    switch (log->job_kind) {
    case JOB_WRITE:
        take_result(log, n);
        break;
    case JOB_OPEN:
        reopened(log, n);
        break;
    case JOB_CLOSE_OLD: /* an error is the old file's, which nothing writes to now */
        break;
    case JOB_CLOSE_LAST:
        release_loop(log);
        return;
    }
    if (log->closing) /* the disk answered: it gets wait_ms again */
        uv_timer_start(&log->timer, on_stuck, log->wait_ms, 0);
    kick(log, log->closing);
    maybe_caught_up(log);
}

/*
 * Start the next job if none is out: the rest of inflight, else a reopen
 * if one was asked for, else pending when `force`d or big enough. Once
 * closing and all is written, finish.
 */
static void kick(struct metrics_cost_log *log, int force)
{
    if (log->busy)
        return;
    if (log->inflight.len > log->inflight_off) {
        /* first: a line is never split across the old and the new file */
        start_write(log);
        return;
    }
    if (log->reopen_wanted && !log->closing) {
        log->reopen_wanted = 0;
        start_job(log, JOB_OPEN, -1, uv_buf_init(NULL, 0));
        return;
    }
    if (log->pending.len == 0 || (!force && log->pending.len < FLUSH_BYTES)) {
        if (log->closing && log->pending.len == 0)
            finish_close(log);
        return;
    }
    struct buf tmp = log->inflight;
    log->inflight = log->pending;
    log->pending = tmp;
    log->inflight_off = 0;
    log->inflight_records = log->pending_records;
    log->pending_records = 0;
    start_write(log);
}

static void on_timer(uv_timer_t *t)
{
    kick(container_of(t, struct metrics_cost_log, timer), 1);
}

/* Does the file end inside a line? A router killed in the middle of a
 * write (SIGKILL, the OOM killer, power) leaves one; its successor must
 * not append its first record to it. At start, before the loop runs. */
static int ends_inside_a_line(const char *path)
{
    struct stat st;
    char last;
    int fd = open(path, O_RDONLY | O_CLOEXEC), cut;

    if (fd < 0)
        return 0;
    cut = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 &&
          pread(fd, &last, 1, st.st_size - 1) == 1 && last != '\n';
    close(fd);
    return cut;
}

/* Open the file (synchronously: at start-up) unless it is stdout. */
static int open_file(struct metrics_cost_log *log, const char *path)
{
    uv_fs_t req;
    int rc;

    if (strcmp(path, "-") == 0)
        return 0;
    log->fd = -1;
    if ((log->path = strdup(path)) == NULL)
        return -ENOMEM;
    rc = uv_fs_open(NULL, &req, path, OPEN_FLAGS, 0640, NULL);
    uv_fs_req_cleanup(&req);
    if (rc < 0)
        return rc;
    log->fd = rc;
    /* The newline goes in inflight, alone, as write_failed puts one: in
     * pending, before the first records, lines_in would count it as one
     * of them, and a first write cut short would drop one record more
     * than it counts. */
    if (ends_inside_a_line(path)) {
        if (buf_append(&log->inflight, "\n", 1) != 0)
            return -ENOMEM;
        log->line_cut = 1;
    }
    return 0;
}

/* Stop a writer that never had a job (open failed after it started). */
static void writer_stop(struct metrics_cost_log *log)
{
    uv_mutex_lock(&log->lock);
    log->quit = 1;
    uv_cond_signal(&log->job_cond);
    uv_mutex_unlock(&log->lock);
    uv_thread_join(&log->thread);
}

/* The writer, then the handles; on failure nothing is left running. */
static int start_log(struct metrics_cost_log *log, unsigned flush_ms)
{
    int rc = writer_start(log);

    if (rc != 0)
        return rc;
    if ((rc = uv_async_init(log->loop, &log->written, on_written)) != 0) {
        writer_stop(log);
        return rc;
    }
    log->written.data = log;
    uv_unref((uv_handle_t *)&log->written); /* until close: the loop need not wait for the log */
    uv_timer_init(log->loop, &log->timer);
    log->timer.data = log;
    log->handles_open = 2;
    uv_timer_start(&log->timer, on_timer, flush_ms ? flush_ms : 200, flush_ms ? flush_ms : 200);
    uv_unref((uv_handle_t *)&log->timer);
    return 0;
}

struct metrics_cost_log *metrics_cost_log_open(uv_loop_t *loop, const char *path,
                                               unsigned flush_ms, size_t buffer_max,
                                               unsigned wait_ms, struct metrics *m, int *err)
{
    struct metrics_cost_log *log = calloc(1, sizeof(*log));
    int rc = -ENOMEM, sync_made = 0;

    if (log == NULL)
        goto fail;
    log->loop = loop;
    log->metrics = m;
    log->fd = 1;
    log->buffer_max = buffer_max ? buffer_max : DEFAULT_BUFFER_MAX;
    log->wait_ms = wait_ms ? wait_ms : DEFAULT_WAIT_MS;
    log->skip_log.interval_ms = 60000; /* one line for a whole flood of refusals */
    if ((rc = uv_mutex_init(&log->lock)) != 0)
        goto fail;
    if ((rc = uv_cond_init(&log->job_cond)) != 0) {
        uv_mutex_destroy(&log->lock);
        goto fail;
    }
    sync_made = 1;
    if ((rc = open_file(log, path)) != 0 || (rc = start_log(log, flush_ms)) != 0)
        goto fail;
    return log;

fail:
    if (log != NULL)
        close_file(log);
    if (sync_made) {
        uv_cond_destroy(&log->job_cond);
        uv_mutex_destroy(&log->lock);
    }
    if (log != NULL) {
        buf_free(&log->pending);
        buf_free(&log->inflight);
        free(log->path);
    }
    free(log);
    *err = rc;
    return NULL;
}

/* A costless record while behind: counted, not written. */
static void skip(struct metrics_cost_log *log)
{
    char note[LOG_EVERY_NOTE_MAX];

    log->skipped++;
    if (log->metrics != NULL)
        (void)metrics_add(log->metrics, METRICS_COST_LOG_SKIPPED_TOTAL, NULL, 1);
    if (log_every_due(&log->skip_log, uv_now(log->loop), note))
        log_warn("cost log %s: behind the disk: records that carry no cost (refusals: nothing "
                 "reserved, charged or saved) are skipped, counted in "
                 "costrouter_cost_log_skipped_total; %llu skipped in all%s",
                 log_name(log), (unsigned long long)log->skipped, note);
}

int metrics_cost_log_write(struct metrics_cost_log *log, const struct metrics_cost_record *r)
{
    char note[LOG_EVERY_NOTE_MAX];

    if (log->closing) {
        count_dropped(log, 1);
        return -ENOBUFS;
    }
    if (log->behind && r->costless) {
        skip(log);
        return 0;
    }
    if (metrics_cost_record_json(r, &log->pending) != 0) {
        count_dropped(log, 1);
        if (log_every_due(&log->nomem_log, uv_hrtime() / 1000000, note))
            log_error("cost log %s: no memory for a record; dropping it%s", log_name(log), note);
        return -ENOMEM;
    }
    log->records++;
    log->pending_records++;
    if (!log->behind && waiting(log) >= log->buffer_max)
        fall_behind(log);
    /* Behind, the disk gets the next bytes as soon as it takes them. */
    if (log->pending.len >= FLUSH_BYTES || log->behind)
        kick(log, log->behind);
    return 0;
}

int metrics_cost_log_behind(const struct metrics_cost_log *log)
{
    return log->behind;
}

void metrics_cost_log_on_caught_up(struct metrics_cost_log *log, void (*cb)(void *arg), void *arg)
{
    log->on_caught_up = cb;
    log->caught_up_arg = arg;
}

void metrics_cost_log_reopen(struct metrics_cost_log *log)
{
    if (log->path == NULL || log->closing)
        return;
    log->reopen_wanted = 1;
    kick(log, 1);
}

void metrics_cost_log_close(struct metrics_cost_log *log)
{
    log->closing = 1;
    /* From now on the loop waits for the log, each write for wait_ms. */
    uv_ref((uv_handle_t *)&log->written);
    uv_timer_start(&log->timer, on_stuck, log->wait_ms, 0);
    kick(log, 1);
}

uint64_t metrics_cost_log_records(const struct metrics_cost_log *log)
{
    return log->records;
}

uint64_t metrics_cost_log_dropped(const struct metrics_cost_log *log)
{
    return log->dropped;
}

uint64_t metrics_cost_log_skipped(const struct metrics_cost_log *log)
{
    return log->skipped;
}

size_t metrics_cost_log_waiting(const struct metrics_cost_log *log)
{
    return waiting(log);
}
