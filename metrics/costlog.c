/*
 * metrics/costlog.c: the per-request cost log, one JSON line per request.
 *
 * Records are serialized at once into `pending`. A flush swaps `pending`
 * and `inflight` and hands `inflight` to a write on the threadpool, so
 * the loop does not wait for the disk and records keep arriving while the
 * write runs. At most one filesystem request (write, open or close) is in
 * flight at a time, which keeps lines in order and makes reopen simple:
 *
 *   write()  -> pending --(timer / 64 KiB)--> inflight --work_write--> fd
 *   reopen() -> after the current write: uv_fs_open(path), then close old fd
 *   close()  -> after the current request: synchronous write of the rest,
 *               close fd, uv_close(timer) -> free
 *
 * Records are money (chargeback), so none is dropped for want of room.
 * When 16 MiB wait for the disk (a disk, or a threadpool, slower than the
 * requests), write() waits for the write in flight and writes the rest
 * itself, on the loop: back-pressure, the router slows to the disk's pace
 * while memory stays bounded. That is why the write is our own work item
 * rather than uv_fs_write: the loop can wait for it (a condition variable)
 * or take it back (uv_cancel), which libuv offers for neither.
 */
#include "metrics/metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
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
#define MAX_BUFFERED (16 * 1024 * 1024)
#define OPEN_FLAGS (O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC)

struct metrics_cost_log {
    uv_loop_t *loop;          /* loop the timer and requests run on */
    uv_timer_t timer;         /* periodic flush; unref'd */
    uv_fs_t req;              /* the open or close in flight */
    uv_work_t work;           /* the write in flight */
    uv_mutex_t lock;          /* guards work_done and work_result */
    uv_cond_t work_cond;      /* signalled when work_write returns */
    uv_buf_t work_buf;        /* what work_write writes (part of inflight) */
    uv_file work_fd;          /* where work_write writes */
    ssize_t work_result;      /* bytes work_write wrote, or a negative errno */
    int work_done;            /* work_write returned (under lock) */
    char *path;               /* file path, NULL for stdout */
    uv_file fd;               /* current file */
    uv_file old_fd;           /* file being closed after a reopen, or -1 */
    struct buf pending;       /* records not yet handed to a write */
    struct buf inflight;      /* bytes being written */
    size_t inflight_off;      /* bytes of inflight already written */
    uint64_t pending_records; /* records in pending */
    uint64_t inflight_records; /* records in inflight */
    struct metrics *metrics;  /* for COST_LOG_DROPPED_TOTAL and _WAITS_TOTAL, or NULL */
    uint64_t records;         /* records accepted */
    uint64_t dropped;         /* records dropped */
    int last_error;           /* last write error logged, to log each kind once */
    struct log_every wait_log; /* "waited for the disk", once a second at most */
    struct log_every nomem_log; /* "no memory for a record", once a second at most */
    unsigned busy:1;          /* req or work is in flight */
    unsigned writing:1;       /* ... and it is work */
    unsigned result_taken:1;  /* work_result already applied to inflight */
    unsigned reopen_wanted:1; /* reopen after the current request */
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
    rc |= buf_append_lit(out, ",\"tags\":{");
    for (size_t i = 0; i < r->ntags; i++) {
        rc |= buf_append(out, ",", i > 0) | put_string(out, r->tags[i].key);
        rc |= buf_append_lit(out, ":") | put_string(out, r->tags[i].value);
    }
    rc |= buf_append_lit(out, "},\"route\":") | put_string(out, r->route);
    rc |= buf_append_lit(out, ",\"backend\":") | put_string(out, r->backend);
    rc |= buf_append_lit(out, ",\"arm\":") | put_string(out, r->arm);
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
    rc |= buf_append_lit(out, ",\"cost_usd_est\":") | put_fixed(out, r->cost_usd_est, USD_DECIMALS);
    rc |= buf_append_lit(out, ",\"cost_usd\":") | put_fixed(out, r->cost_usd, USD_DECIMALS);
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
        log_error("cost log %s: write: %s; dropping records", log->path ? log->path : "stdout",
                  uv_strerror(err));
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

/*
 * Apply work_write's result to inflight, once: from after_write, or
 * earlier from make_room. Returns 1 when a non-blocking stdout was full
 * (inflight is kept for a retry).
 */
static int take_result(struct metrics_cost_log *log)
{
    ssize_t n = log->work_result;

    if (log->result_taken)
        return 0;
    log->result_taken = 1;
    if (n == UV_EAGAIN)
        return 1;
    if (n < 0) {
        write_failed(log, (int)n);
    } else {
        if (n > 0)
            log->line_cut = 0; /* the newline went first */
        log->inflight_off += (size_t)n;
        if (log->inflight_off == log->inflight.len) {
            buf_reset(&log->inflight);
            log->inflight_off = 0;
            log->inflight_records = 0;
        }
    }
    return 0;
}

/* On the threadpool: one write(2), as uv_fs_write would do, then tell a
 * loop waiting in make_room. Touches nothing of `log` the loop changes
 * meanwhile. */
static void work_write(uv_work_t *w)
{
    struct metrics_cost_log *log = container_of(w, struct metrics_cost_log, work);
    ssize_t n;

    do
        n = write(log->work_fd, log->work_buf.base, log->work_buf.len);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        n = -errno; /* libuv's error codes are negative errnos on Unix */
    uv_mutex_lock(&log->lock);
    log->work_result = n;
    log->work_done = 1;
    uv_cond_signal(&log->work_cond);
    uv_mutex_unlock(&log->lock);
}

static void after_write(uv_work_t *w, int status)
{
    struct metrics_cost_log *log = container_of(w, struct metrics_cost_log, work);

    (void)status; /* UV_ECANCELED: make_room took the write back, result_taken is set */
    log->busy = 0;
    log->writing = 0;
    if (take_result(log) && !log->closing)
        return; /* non-blocking stdout is full: keep inflight, retry on the timer */
    kick(log, log->closing);
}

static void on_close_old(uv_fs_t *req)
{
    struct metrics_cost_log *log = container_of(req, struct metrics_cost_log, req);

    uv_fs_req_cleanup(req);
    log->busy = 0;
    log->old_fd = -1;
    kick(log, log->closing);
}

static void on_open(uv_fs_t *req)
{
    struct metrics_cost_log *log = container_of(req, struct metrics_cost_log, req);
    ssize_t fd = req->result;

    uv_fs_req_cleanup(req);
    log->busy = 0;
    if (fd < 0) {
        log_error("cost log %s: reopen: %s; keeping the old file", log->path, uv_strerror((int)fd));
    } else {
        log->old_fd = log->fd;
        log->fd = (uv_file)fd;
        if (!log->closing && uv_fs_close(log->loop, &log->req, log->old_fd, on_close_old) == 0) {
            log->busy = 1;
            return;
        }
        uv_fs_t sync;
        uv_fs_close(NULL, &sync, log->old_fd, NULL);
        uv_fs_req_cleanup(&sync);
        log->old_fd = -1;
    }
    kick(log, log->closing);
}

static void start_write(struct metrics_cost_log *log)
{
    int rc;

    log->work_buf = uv_buf_init(log->inflight.data + log->inflight_off,
                                (unsigned)(log->inflight.len - log->inflight_off));
    log->work_fd = log->fd;
    log->work_done = 0;
    log->result_taken = 0;
    rc = uv_queue_work(log->loop, &log->work, work_write, after_write);
    if (rc == 0) {
        log->busy = 1;
        log->writing = 1;
    } else {
        write_failed(log, rc);
    }
}

/*
 * Write all of [p, p+len) synchronously; for the final flush. A
 * non-blocking stdout nobody drains gets 10 s, so shutdown cannot hang.
 */
static int write_sync(uv_file fd, const char *p, size_t len)
{
    int waits = 0;

    while (len > 0) {
        uv_buf_t b = uv_buf_init((char *)p, (unsigned)MIN(len, (size_t)1 << 30));
        uv_fs_t req;
        int n = uv_fs_write(NULL, &req, fd, &b, 1, -1, NULL);

        uv_fs_req_cleanup(&req);
        if (n == UV_EAGAIN && waits++ < 10) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            (void)poll(&pfd, 1, 1000);
            continue;
        }
        if (n < 0)
            return n;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void on_timer_closed(uv_handle_t *h)
{
    struct metrics_cost_log *log = container_of((uv_timer_t *)h, struct metrics_cost_log, timer);

    uv_cond_destroy(&log->work_cond);
    uv_mutex_destroy(&log->lock);
    buf_free(&log->pending);
    buf_free(&log->inflight);
    free(log->path);
    free(log);
}

/*
 * Write the rest of inflight, then pending, synchronously on the loop,
 * leaving both empty; what cannot be written is counted as dropped. Only
 * when no write is in flight, so that lines stay whole and in order.
 */
static void write_all_now(struct metrics_cost_log *log, const char *what)
{
    int rc = write_sync(log->fd, log->inflight.data + log->inflight_off,
                        log->inflight.len - log->inflight_off);

    if (rc == 0)
        rc = write_sync(log->fd, log->pending.data, log->pending.len);
    if (rc < 0) {
        log_error("cost log %s: %s: %s; dropping records", log->path ? log->path : "stdout", what,
                  uv_strerror(rc));
        count_dropped(log, log->inflight_records + log->pending_records);
    }
    buf_reset(&log->inflight);
    buf_reset(&log->pending);
    log->inflight_off = 0;
    log->inflight_records = 0;
    log->pending_records = 0;
}

/* Called once nothing is in flight after metrics_cost_log_close(). */
static void finish_close(struct metrics_cost_log *log)
{
    write_all_now(log, "final write");
    if (log->path != NULL) {
        uv_fs_t req;
        uv_fs_close(NULL, &req, log->fd, NULL);
        uv_fs_req_cleanup(&req);
    }
    uv_close((uv_handle_t *)&log->timer, on_timer_closed);
}

/*
 * Back-pressure, when 16 MiB are buffered: get the write in flight out of
 * the way, then write everything on the loop, waiting for the disk. A
 * write still queued (the threadpool busy, e.g. with DNS lookups) is
 * cancelled and its bytes written here; one already running is waited
 * for, as its bytes must land first. An open or close in flight writes
 * nothing, so it needs no wait (and kick() starts one only once inflight
 * is written). after_write still runs later and finds result_taken set.
 */
static void make_room(struct metrics_cost_log *log)
{
    uint64_t start = uv_hrtime(), waited_ms;
    char note[LOG_EVERY_NOTE_MAX];

    if (log->writing && !log->result_taken) {
        if (uv_cancel((uv_req_t *)&log->work) == 0) {
            log->result_taken = 1; /* never ran: its bytes are still in inflight */
        } else {
            uv_mutex_lock(&log->lock);
            while (!log->work_done)
                uv_cond_wait(&log->work_cond, &log->lock);
            uv_mutex_unlock(&log->lock);
            (void)take_result(log); /* EAGAIN: write_sync retries the rest */
        }
    }
    write_all_now(log, "write");
    waited_ms = (uv_hrtime() - start) / 1000000;
    if (log->metrics != NULL)
        (void)metrics_add(log->metrics, METRICS_COST_LOG_WAITS_TOTAL, NULL, 1);
    if (log_every_due(&log->wait_log, uv_hrtime() / 1000000, note))
        log_warn("cost log %s: %d MiB waiting for the disk; the loop wrote them itself in %llu "
                 "ms%s", log->path ? log->path : "stdout", MAX_BUFFERED >> 20,
                 (unsigned long long)waited_ms, note);
}

/*
 * Start the next filesystem request if none is in flight: the rest of
 * inflight, else a reopen if one was asked for, else pending when
 * `force`d or big enough. While closing, finish synchronously instead.
 */
static void kick(struct metrics_cost_log *log, int force)
{
    if (log->busy)
        return;
    if (log->closing) {
        finish_close(log);
        return;
    }
    if (log->inflight.len > log->inflight_off) {
        /* first: a line is never split across the old and the new file */
        start_write(log);
        return;
    }
    if (log->reopen_wanted) {
        log->reopen_wanted = 0;
        if (uv_fs_open(log->loop, &log->req, log->path, OPEN_FLAGS, 0640, on_open) == 0) {
            log->busy = 1;
            return;
        }
    }
    if (log->pending.len == 0 || (!force && log->pending.len < FLUSH_BYTES))
        return;
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

struct metrics_cost_log *metrics_cost_log_open(uv_loop_t *loop, const char *path,
                                               unsigned flush_ms, struct metrics *m, int *err)
{
    struct metrics_cost_log *log = calloc(1, sizeof(*log));
    int rc = -ENOMEM, sync_made = 0;

    if (log == NULL)
        goto fail;
    log->loop = loop;
    log->metrics = m;
    log->old_fd = -1;
    log->fd = 1;
    if ((rc = uv_mutex_init(&log->lock)) != 0)
        goto fail;
    if ((rc = uv_cond_init(&log->work_cond)) != 0) {
        uv_mutex_destroy(&log->lock);
        goto fail;
    }
    sync_made = 1;
    rc = -ENOMEM;
    if (strcmp(path, "-") != 0) {
        uv_fs_t req;

        log->path = strdup(path);
        if (log->path == NULL)
            goto fail;
        rc = uv_fs_open(NULL, &req, path, OPEN_FLAGS, 0640, NULL);
        uv_fs_req_cleanup(&req);
        if (rc < 0)
            goto fail;
        log->fd = rc;
        if (ends_inside_a_line(path) && buf_append(&log->pending, "\n", 1) != 0) {
            rc = -ENOMEM;
            goto fail;
        }
    }
    uv_timer_init(loop, &log->timer);
    uv_timer_start(&log->timer, on_timer, flush_ms ? flush_ms : 200, flush_ms ? flush_ms : 200);
    uv_unref((uv_handle_t *)&log->timer);
    return log;

fail:
    if (sync_made) {
        uv_cond_destroy(&log->work_cond);
        uv_mutex_destroy(&log->lock);
    }
    if (log != NULL)
        free(log->path);
    free(log);
    *err = rc;
    return NULL;
}

int metrics_cost_log_write(struct metrics_cost_log *log, const struct metrics_cost_record *r)
{
    char note[LOG_EVERY_NOTE_MAX];

    if (log->closing) {
        count_dropped(log, 1);
        return -ENOBUFS;
    }
    if (log->pending.len + log->inflight.len >= MAX_BUFFERED)
        make_room(log);
    if (metrics_cost_record_json(r, &log->pending) != 0) {
        count_dropped(log, 1);
        if (log_every_due(&log->nomem_log, uv_hrtime() / 1000000, note))
            log_error("cost log %s: no memory for a record; dropping it%s",
                      log->path ? log->path : "stdout", note);
        return -ENOMEM;
    }
    log->records++;
    log->pending_records++;
    if (log->pending.len >= FLUSH_BYTES)
        kick(log, 0);
    return 0;
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
    uv_timer_stop(&log->timer);
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
