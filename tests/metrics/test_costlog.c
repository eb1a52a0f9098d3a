/*
 * tests/metrics/test_costlog.c: metrics/costlog.c on a real libuv loop
 * writing real files and FIFOs: JSON validity and keys, flush on the
 * timer, nothing lost at shutdown with writes in flight, a full buffer
 * making the log behind (and calling back under half) instead of refusing
 * records or waiting, a stuck write given up at close, rotation by
 * rename + reopen, stdout, write errors counted as drops, and records
 * that carry no money skipped while behind.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "common/buf.h"
#include "common/util.h"
#include "conf/conf.h"
#include "metrics/metrics.h"

static char dir[64];
static char path[128];
static uv_loop_t loop;

static void setup(void)
{
    strcpy(dir, "/tmp/costlog-test-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/cost.log", dir);
    cr_assert_eq(uv_loop_init(&loop), 0);
}

static void teardown(void)
{
    char cmd[128];

    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0, "a handle or request was left open");
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(costlog, .init = setup, .fini = teardown);

static const struct conf_tag tags[] = {{"cost_center", "cc-42"}, {"team", "search \"core\""}};

/* A record whose strings depend on i; request_id = "req-<i>". */
static void make_record(struct metrics_cost_record *r, char *id, size_t idlen, int i,
                        struct metrics_cost_candidate cands[2])
{
    snprintf(id, idlen, "req-%d", i);
    cands[0] = (struct metrics_cost_candidate){"gpu-a", 0.0005, NULL};
    cands[1] = (struct metrics_cost_candidate){"gpt-4o", NAN, "over budget"};
    *r = (struct metrics_cost_record){
        .ts_ms = 1795000000123LL + i, .request_id = id, .tenant = "acme", .tags = tags, .ntags = 2,
        .route = "chat", .endpoint = "/v1/chat/completions", .backend = "gpu-a", .arm = i % 2 ? "b" : "a",
        .experiment = "exp", .reason = "cheapest",
        .candidates = cands, .ncandidates = 2, .prompt_tokens_est = 100, .prompt_tokens = 98,
        .completion_tokens_est = 50, .completion_tokens = -1, .billed_prompt_tokens = 98,
        .billed_completion_tokens = 40, .billed_cached_tokens = 20,
        .billed_cache_write_tokens = 30, .billed_web_searches = 3, .billed_file_searches = 4,
        .cost_usd_est = 0.0005,
        .cost_usd = 0.00049, .reported_cost_usd = i % 2 ? NAN : 0.0006, .cache_hit = 0, .saved_usd = 0, .ttft_ms = 12.5, .latency_ms = 80,
        .status = 200, .fallbacks = i % 3,
    };
}

/* Read a whole file (NUL-terminated); *len gets its size. */
static char *slurp(const char *p, size_t *len)
{
    FILE *f = fopen(p, "rb");
    char *data;
    long n;

    cr_assert_not_null(f, "%s: %s", p, strerror(errno));
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    data = malloc((size_t)n + 1);
    cr_assert_eq(fread(data, 1, (size_t)n, f), (size_t)n);
    data[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return data;
}

/*
 * Check every line of the file is a JSON object with request_id "req-<i>"
 * and mark seen[i]; returns the number of lines. Counts problems and
 * asserts once, citing the first bad line.
 */
static size_t check_lines(const char *p, char *seen, size_t nseen)
{
    size_t len, lines = 0, bad = 0;
    char *data = slurp(p, &len), *save = NULL, *first_bad = NULL;

    cr_assert(len == 0 || data[len - 1] == '\n', "%s: last line not terminated", p);
    for (char *line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        cJSON *j = cJSON_Parse(line), *id = cJSON_GetObjectItem(j, "request_id");
        int i;

        lines++;
        if (!cJSON_IsString(id) || sscanf(id->valuestring, "req-%d", &i) != 1 || i < 0 ||
            (size_t)i >= nseen || seen[i]) {
            bad++;
            first_bad = first_bad ? first_bad : strdup(line);
        } else {
            seen[i] = 1;
        }
        cJSON_Delete(j);
    }
    cr_assert_eq(bad, 0, "%zu bad or duplicate lines in %s, first: %s", bad, p, first_bad);
    free(data);
    return lines;
}

Test(costlog, lines_are_valid_json_with_every_key, .timeout = 10)
{
    static const char *keys[] = {"ts", "request_id", "tenant", "tags", "route", "endpoint",
                                 "backend", "arm", "experiment",
                                 "reason", "candidates", "prompt_tokens_est", "prompt_tokens",
                                 "completion_tokens_est", "completion_tokens",
                                 "billed_prompt_tokens", "billed_completion_tokens",
                                 "billed_cached_tokens", "billed_cache_write_tokens",
                                 "billed_cache_write_1h_tokens", "billed_web_searches",
                                 "billed_file_searches",
                                 "cost_usd_est",
                                 "cost_usd", "reported_cost_usd", "cache_hit", "saved_usd",
                                 "ttft_ms", "latency_ms", "status", "fallbacks"};
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    char id[32];
    int err = 0;
    struct metrics_cost_log *log = metrics_cost_log_open(&loop, path, 0, 0, 0, NULL, &err);

    cr_assert_not_null(log, "open: %d", err);
    make_record(&r, id, sizeof(id), 0, cands);
    cr_assert_eq(metrics_cost_log_write(log, &r), 0);
    /* hostile strings: quotes, backslash, control bytes, invalid UTF-8, a valid é */
    make_record(&r, id, sizeof(id), 1, cands);
    r.tenant = "t\"x\\y\n\tz\x01\xff\xc3\xa9";
    r.arm = NULL;
    r.experiment = NULL;
    cr_assert_eq(metrics_cost_log_write(log, &r), 0);
    metrics_cost_log_close(log);
    uv_run(&loop, UV_RUN_DEFAULT);

    size_t len;
    char *data = slurp(path, &len), *nl = strchr(data, '\n');
    cr_assert_not_null(nl);
    *nl = '\0';
    cJSON *a = cJSON_Parse(data), *b = cJSON_Parse(nl + 1);
    cr_assert_not_null(a);
    cr_assert_not_null(b, "hostile line must stay valid JSON: %s", nl + 1);
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        cr_assert(cJSON_HasObjectItem(a, keys[i]), "missing key %s", keys[i]);
    cr_assert_str_eq(cJSON_GetObjectItem(a, "ts")->valuestring, "2026-11-18T11:06:40.123Z");
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(a, "tags"), "team")->valuestring,
                     "search \"core\"");
    cr_assert_str_eq(cJSON_GetObjectItem(a, "arm")->valuestring, "a");
    cr_assert_str_eq(cJSON_GetObjectItem(a, "experiment")->valuestring, "exp");
    cr_assert_str_eq(cJSON_GetObjectItem(a, "endpoint")->valuestring, "/v1/chat/completions");
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(a, "completion_tokens")));
    cr_assert_eq(cJSON_GetObjectItem(a, "prompt_tokens")->valuedouble, 98);
    cr_assert_eq(cJSON_GetObjectItem(a, "billed_completion_tokens")->valuedouble, 40);
    cr_assert_eq(cJSON_GetObjectItem(a, "billed_cached_tokens")->valuedouble, 20);
    cr_assert_eq(cJSON_GetObjectItem(a, "billed_cache_write_tokens")->valuedouble, 30);
    cr_assert_eq(cJSON_GetObjectItem(a, "billed_web_searches")->valuedouble, 3);
    cr_assert_eq(cJSON_GetObjectItem(a, "billed_file_searches")->valuedouble, 4);
    cr_assert_eq(cJSON_GetObjectItem(a, "cost_usd")->valuedouble, 0.00049);
    cr_assert_eq(cJSON_GetObjectItem(a, "reported_cost_usd")->valuedouble, 0.0006);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(b, "reported_cost_usd")), "none reported: null");
    cr_assert(cJSON_IsFalse(cJSON_GetObjectItem(a, "cache_hit")));
    cJSON *c = cJSON_GetObjectItem(a, "candidates");
    cr_assert_eq(cJSON_GetArraySize(c), 2);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetArrayItem(c, 0), "rejected")));
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetArrayItem(c, 1), "est_cost_usd")));
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(c, 1), "rejected")->valuestring,
                     "over budget");
    cr_assert_str_eq(cJSON_GetObjectItem(b, "tenant")->valuestring, "t\"x\\y\n\tz\x01\xef\xbf\xbd\xc3\xa9");
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(b, "arm")));
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(b, "experiment")));
    cJSON_Delete(a);
    cJSON_Delete(b);
    free(data);
}

struct timer_ctx {
    uv_timer_t timer;             /* the test's own timer */
    struct metrics_cost_log *log; /* log under test */
    size_t size_at_write;         /* file size right after the writes */
    size_t size_at_timer;         /* file size when the test timer fired */
};

static size_t file_size(const char *p)
{
    struct stat st;

    cr_assert_eq(stat(p, &st), 0);
    return (size_t)st.st_size;
}

static void on_check(uv_timer_t *t)
{
    struct timer_ctx *ctx = (struct timer_ctx *)t;

    ctx->size_at_timer = file_size(path);
    metrics_cost_log_close(ctx->log);
    uv_close((uv_handle_t *)t, NULL);
}

Test(costlog, flushes_on_the_timer, .timeout = 10)
{
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    struct timer_ctx ctx = {0};
    char id[32];
    int err;

    ctx.log = metrics_cost_log_open(&loop, path, 50, 0, 0, NULL, &err);
    cr_assert_not_null(ctx.log);
    for (int i = 0; i < 3; i++) {
        make_record(&r, id, sizeof(id), i, cands);
        cr_assert_eq(metrics_cost_log_write(ctx.log, &r), 0);
    }
    ctx.size_at_write = file_size(path);
    uv_timer_init(&loop, &ctx.timer);
    uv_timer_start(&ctx.timer, on_check, 400, 0);
    uv_run(&loop, UV_RUN_DEFAULT);

    char seen[3] = {0};
    cr_assert_eq(ctx.size_at_write, 0, "nothing is written synchronously by write()");
    cr_assert_gt(ctx.size_at_timer, 0, "the 50 ms timer must have flushed");
    cr_assert_eq(ctx.size_at_timer, file_size(path), "close found nothing left to write");
    cr_assert_eq(check_lines(path, seen, 3), 3);
}

enum { BATCHES = 40, PER_BATCH = 2000 };

struct burst_ctx {
    uv_idle_t idle;               /* writes one batch per loop iteration */
    struct metrics_cost_log *log; /* log under test */
    int batch;                    /* batches written */
};

static void on_idle(uv_idle_t *h)
{
    struct burst_ctx *ctx = (struct burst_ctx *)h;
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    char id[32];

    int failed = 0;

    for (int i = 0; i < PER_BATCH; i++) {
        make_record(&r, id, sizeof(id), ctx->batch * PER_BATCH + i, cands);
        failed += metrics_cost_log_write(ctx->log, &r) != 0;
    }
    cr_assert_eq(failed, 0, "batch %d: %d records refused", ctx->batch, failed);
    if (++ctx->batch == BATCHES) {
        /* close while a write is most likely still on the threadpool */
        metrics_cost_log_close(ctx->log);
        uv_close((uv_handle_t *)h, NULL);
    }
}

Test(costlog, nothing_lost_at_shutdown, .timeout = 30)
{
    struct burst_ctx ctx = {0};
    int err;
    char *seen = calloc(BATCHES * PER_BATCH, 1);
    struct metrics *m = metrics_create(0);

    ctx.log = metrics_cost_log_open(&loop, path, 1000, 0, 0, m, &err);
    cr_assert_not_null(ctx.log);
    uv_idle_init(&loop, &ctx.idle);
    uv_idle_start(&ctx.idle, on_idle);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(check_lines(path, seen, BATCHES * PER_BATCH), BATCHES * PER_BATCH);
    cr_assert_eq(metrics_get(m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 0);
    metrics_free(m);
    free(seen);
}

enum { OVER_CAP = 40000 }; /* about 22 MB of records, more than the 16 MiB buffer */

/*
 * Write OVER_CAP records from one call, so that no completed write is
 * taken in between (that needs the loop): 16 MiB wait for the disk
 * however fast it is. Asserts that none was refused and that the log says
 * it is behind instead (the loop did not wait for the disk).
 */
static void burst_over_cap(struct metrics_cost_log *log, struct metrics *m)
{
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    char id[32];
    int failed = 0;

    for (int i = 0; i < OVER_CAP; i++) {
        make_record(&r, id, sizeof(id), i, cands);
        failed += metrics_cost_log_write(log, &r) != 0;
    }
    cr_assert_eq(failed, 0, "%d of %d records refused", failed, OVER_CAP);
    cr_assert(metrics_cost_log_behind(log), "16 MiB waiting, and the log is not behind");
    cr_assert_eq(metrics_get(m, METRICS_COST_LOG_BEHIND, NULL), 1);
}

/* Every record of burst_over_cap() once in `file`, none dropped. */
static void check_over_cap(const char *file, struct metrics *m)
{
    char *seen = calloc(OVER_CAP, 1);

    cr_assert_eq(check_lines(file, seen, OVER_CAP), OVER_CAP);
    cr_assert_eq(metrics_get(m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 0);
    free(seen);
}

/* Newlines in the file (0 if it is missing). */
static size_t newlines_in(const char *file)
{
    FILE *f = fopen(file, "rb");
    size_t n = 0;
    int ch;

    if (f == NULL)
        return 0;
    while ((ch = getc_unlocked(f)) != EOF)
        n += ch == '\n';
    fclose(f);
    return n;
}

enum { BLOCKERS = 4 }; /* libuv's default threadpool size */

/* Work that holds a threadpool thread until `go` is posted. */
struct pool_blocker {
    uv_work_t work[BLOCKERS]; /* one per thread */
    uv_sem_t go;              /* posted once per work item to let it end */
};

static void wait_go(uv_work_t *w)
{
    uv_sem_wait(&((struct pool_blocker *)w->data)->go);
}

static void after_go(uv_work_t *w, int status)
{
    (void)w;
    (void)status;
}

/*
 * The threadpool is busy with other work (as with slow DNS lookups): the
 * log, which writes from a thread of its own, writes everything and
 * closes all the same, while the pool is still held.
 */
Test(costlog, a_busy_threadpool_does_not_hold_the_log, .timeout = 30)
{
    struct pool_blocker pb;
    struct metrics *m = metrics_create(0);
    struct metrics_cost_log *log;
    uint64_t until = uv_hrtime() + 20 * (uint64_t)1000000000;
    int err;

    /* read at the threadpool's first use, which is in this test's process */
    setenv("UV_THREADPOOL_SIZE", "1", 1);
    cr_assert_eq(uv_sem_init(&pb.go, 0), 0);
    for (int k = 0; k < BLOCKERS; k++) {
        pb.work[k].data = &pb;
        cr_assert_eq(uv_queue_work(&loop, &pb.work[k], wait_go, after_go), 0);
    }
    log = metrics_cost_log_open(&loop, path, 1000, 0, 0, m, &err);
    cr_assert_not_null(log);
    burst_over_cap(log, m);
    metrics_cost_log_close(log);
    while (newlines_in(path) < OVER_CAP && uv_hrtime() < until) {
        uv_run(&loop, UV_RUN_NOWAIT);
        uv_sleep(10);
    }
    cr_assert_eq(newlines_in(path), OVER_CAP, "the log waited for the threadpool");
    for (int k = 0; k < BLOCKERS; k++)
        uv_sem_post(&pb.go);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_sem_destroy(&pb.go);
    check_over_cap(path, m);
    metrics_free(m);
}

struct fifo_reader {
    uv_thread_t thread; /* drains the FIFO into `out` */
    char out[160];      /* regular file that gets what was read */
    uv_sem_t go;        /* posted to let it read (drain_fifo_when_told) */
    int in;             /* its end of the FIFO */
    int done;           /* (atomic) it read the FIFO's end */
};

/* Copy all the FIFO gives to rd->out. */
static void copy_fifo(struct fifo_reader *rd)
{
    int out = open(rd->out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    static char data[1 << 16];
    ssize_t n;

    while ((n = read(rd->in, data, sizeof(data))) > 0)
        if (write(out, data, (size_t)n) != n)
            break;
    close(rd->in);
    close(out);
    __atomic_store_n(&rd->done, 1, __ATOMIC_RELEASE);
}

/* Open the FIFO at `path`, read nothing for 200 ms, so that the write
 * blocks on the full pipe, then copy all to rd->out. */
static void drain_fifo(void *arg)
{
    struct fifo_reader *rd = arg;

    rd->in = open(path, O_RDONLY);
    uv_sleep(200);
    copy_fifo(rd);
}

/*
 * A consumer slower than the router: the write is stuck in write(2)
 * while 16 MiB pile up; the log is behind, and loses nothing.
 */
Test(costlog, full_buffer_with_a_stuck_write_loses_nothing, .timeout = 30)
{
    struct fifo_reader rd;
    struct metrics *m = metrics_create(0);
    struct metrics_cost_log *log;
    int err;

    snprintf(rd.out, sizeof(rd.out), "%s/drained.log", dir);
    cr_assert_eq(mkfifo(path, 0600), 0);
    cr_assert_eq(uv_thread_create(&rd.thread, drain_fifo, &rd), 0);
    log = metrics_cost_log_open(&loop, path, 1000, 0, 0, m, &err);
    cr_assert_not_null(log);
    burst_over_cap(log, m);
    metrics_cost_log_close(log);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_thread_join(&rd.thread), 0);
    check_over_cap(rd.out, m);
    metrics_free(m);
}

/* Open the FIFO at `path` and read nothing until rd->go is posted, then
 * copy all to rd->out. */
static void drain_fifo_when_told(void *arg)
{
    struct fifo_reader *rd = arg;

    rd->in = open(path, O_RDONLY);
    uv_sem_wait(&rd->go);
    copy_fifo(rd);
}

/* A log on a FIFO whose reader (rd) reads nothing until rd->go is
 * posted. */
static struct metrics_cost_log *open_on_stuck_fifo(struct fifo_reader *rd, unsigned flush_ms,
                                                   size_t buffer_max, unsigned wait_ms,
                                                   struct metrics *m)
{
    struct metrics_cost_log *log;
    int err;

    snprintf(rd->out, sizeof(rd->out), "%s/drained.log", dir);
    cr_assert_eq(uv_sem_init(&rd->go, 0), 0);
    cr_assert_eq(mkfifo(path, 0600), 0);
    cr_assert_eq(uv_thread_create(&rd->thread, drain_fifo_when_told, rd), 0);
    log = metrics_cost_log_open(&loop, path, flush_ms, buffer_max, wait_ms, m, &err);
    cr_assert_not_null(log, "%s", uv_strerror(err));
    return log;
}

/* Write `n` records numbered from `first`; all must be taken. */
static void write_records(struct metrics_cost_log *log, int first, int n)
{
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    char id[32];

    for (int i = first; i < first + n; i++) {
        make_record(&r, id, sizeof(id), i, cands);
        cr_assert_eq(metrics_cost_log_write(log, &r), 0);
    }
}

struct behind_ctx {
    uv_timer_t timer;             /* lets the reader go */
    struct metrics_cost_log *log; /* log under test */
    struct fifo_reader *rd;       /* the stuck reader */
    struct metrics *m;            /* the log's metrics */
    int calls;                    /* on_caught_up calls */
    int ticks;                    /* let_the_reader_go calls */
    int behind_then;              /* metrics_cost_log_behind() in the call */
};

static void on_caught_up(void *arg)
{
    struct behind_ctx *ctx = arg;

    ctx->calls++;
    ctx->behind_then = metrics_cost_log_behind(ctx->log);
    write_records(ctx->log, 100000, 1); /* the callback may write */
    metrics_cost_log_close(ctx->log);
}

/* Once, then every 50 ms until the call back came: the log's own handles
 * do not keep the loop running before it is closed. */
static void let_the_reader_go(uv_timer_t *t)
{
    struct behind_ctx *ctx = (struct behind_ctx *)t;

    if (ctx->calls > 0) {
        uv_close((uv_handle_t *)t, NULL);
        return;
    }
    if (uv_timer_get_repeat(t) != 0) {
        cr_assert_lt(++ctx->ticks, 100, "not called back 5 s after the reader went on");
        return;
    }
    /* 300 ms on, the pipe took what it holds and no more: still behind */
    cr_assert(metrics_cost_log_behind(ctx->log));
    cr_assert_eq(metrics_get(ctx->m, METRICS_COST_LOG_BEHIND, NULL), 1);
    cr_assert_eq(ctx->calls, 0, "called back while behind");
    uv_sem_post(&ctx->rd->go);
    uv_timer_start(t, let_the_reader_go, 50, 50);
}

enum { BEHIND_AT = 512 * 1024 }; /* well over the pipe's 64 KiB */

/* Behind at buffer_max, whatever the disk; called back once the writes
 * bring it under half, with nothing lost. */
Test(costlog, behind_at_buffer_max_and_called_back_under_half, .timeout = 30)
{
    struct fifo_reader rd;
    struct behind_ctx ctx = {.rd = &rd, .m = metrics_create(0)};
    int n = 0;
    char *seen;

    ctx.log = open_on_stuck_fifo(&rd, 20, BEHIND_AT, 0, ctx.m);
    metrics_cost_log_on_caught_up(ctx.log, on_caught_up, &ctx);
    while (!metrics_cost_log_behind(ctx.log))
        write_records(ctx.log, n++, 1);
    cr_assert_gt(n, BEHIND_AT / 1000, "behind after %d records", n);
    uv_timer_init(&loop, &ctx.timer);
    uv_timer_start(&ctx.timer, let_the_reader_go, 300, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_thread_join(&rd.thread), 0);
    cr_assert_eq(ctx.calls, 1);
    cr_assert_eq(ctx.behind_then, 0);
    cr_assert_eq(metrics_get(ctx.m, METRICS_COST_LOG_BEHIND, NULL), 0);
    seen = calloc(100001, 1);
    cr_assert_eq(check_lines(rd.out, seen, 100001), (size_t)n + 1);
    cr_assert(seen[100000], "the callback's record");
    free(seen);
    uv_sem_destroy(&rd.go);
    metrics_free(ctx.m);
}

struct skip_ctx {
    uv_timer_t timer;             /* keeps the loop up until the call back */
    struct metrics_cost_log *log; /* log under test */
    int calls;                    /* on_caught_up_skip calls */
    int ticks;                    /* wait_caught_up calls */
};

/* Costless record number i (a refusal: no tenant, no route, no cost). */
static int write_costless(struct metrics_cost_log *log, int i)
{
    struct metrics_cost_record r = {.ts_ms = 1795000000123LL, .prompt_tokens_est = -1,
                                    .prompt_tokens = -1, .completion_tokens_est = -1,
                                    .completion_tokens = -1, .billed_prompt_tokens = -1,
                                    .billed_completion_tokens = -1, .cost_usd_est = NAN,
                                    .cost_usd = NAN, .ttft_ms = NAN, .latency_ms = 1,
                                    .status = 400, .costless = 1};
    char id[32];

    snprintf(id, sizeof(id), "req-%d", i);
    r.request_id = id;
    return metrics_cost_log_write(log, &r);
}

/* Caught up: costless records are written again. */
static void on_caught_up_skip(void *arg)
{
    struct skip_ctx *ctx = arg;

    ctx->calls++;
    cr_assert_eq(write_costless(ctx->log, 200001), 0);
    metrics_cost_log_close(ctx->log);
}

static void wait_caught_up(uv_timer_t *t)
{
    struct skip_ctx *ctx = (struct skip_ctx *)t;

    if (ctx->calls > 0)
        uv_close((uv_handle_t *)t, NULL);
    else
        cr_assert_lt(++ctx->ticks, 100, "not called back 5 s after the reader went on");
}

/* While behind, a record that carries no money (a refusal) is skipped and
 * counted, and adds nothing to what waits; a record with money is still
 * taken. Before and after, costless records are written like any. */
Test(costlog, costless_records_are_skipped_while_behind, .timeout = 30)
{
    struct fifo_reader rd;
    struct skip_ctx ctx = {0};
    struct metrics *m = metrics_create(0);
    size_t before;
    int n = 0;
    char *seen;

    ctx.log = open_on_stuck_fifo(&rd, 20, BEHIND_AT, 0, m);
    metrics_cost_log_on_caught_up(ctx.log, on_caught_up_skip, &ctx);
    cr_assert_eq(write_costless(ctx.log, 200000), 0);
    while (!metrics_cost_log_behind(ctx.log))
        write_records(ctx.log, n++, 1);
    before = metrics_cost_log_waiting(ctx.log);
    cr_assert_geq(before, BEHIND_AT);
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(write_costless(ctx.log, 300000 + i), 0);
    cr_assert_eq(metrics_cost_log_skipped(ctx.log), 1000);
    cr_assert_eq(metrics_get(m, METRICS_COST_LOG_SKIPPED_TOTAL, NULL), 1000);
    cr_assert_eq(metrics_cost_log_waiting(ctx.log), before, "skipped records wait for the disk");
    write_records(ctx.log, 100000, 1); /* money: taken, behind or not */
    cr_assert_gt(metrics_cost_log_waiting(ctx.log), before);
    cr_assert_eq(metrics_cost_log_records(ctx.log), (uint64_t)n + 2);
    uv_sem_post(&rd.go);
    uv_timer_init(&loop, &ctx.timer);
    uv_timer_start(&ctx.timer, wait_caught_up, 50, 50);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_thread_join(&rd.thread), 0);
    cr_assert_eq(ctx.calls, 1);
    seen = calloc(301000, 1);
    cr_assert_eq(check_lines(rd.out, seen, 301000), (size_t)n + 3);
    cr_assert(seen[200000] && seen[200001], "a costless record written while not behind");
    cr_assert(seen[100000], "the record with money written while behind");
    for (int i = 0; i < 1000; i++)
        cr_assert_not(seen[300000 + i], "skipped record %d written", 300000 + i);
    cr_assert_eq(metrics_get(m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 0);
    free(seen);
    uv_sem_destroy(&rd.go);
    metrics_free(m);
}

/* A FIFO nobody reads at exit: close gives up on the stuck write after
 * wait_ms, counts what was not written as dropped, and the loop ends. */
Test(costlog, close_gives_up_on_a_write_stuck_for_wait_ms, .timeout = 30)
{
    struct fifo_reader rd;
    struct metrics *m = metrics_create(0);
    struct metrics_cost_log *log = open_on_stuck_fifo(&rd, 1000, 0, 300, m);
    uint64_t start;

    write_records(log, 0, 400); /* some 220 KB: more than the pipe holds */
    start = uv_hrtime();
    metrics_cost_log_close(log);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_lt((uv_hrtime() - start) / 1000000, 5000, "close waited for the stuck write");
    cr_assert_gt(metrics_get(m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 0);
    cr_assert_leq(metrics_get(m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 400);
    uv_sem_post(&rd.go); /* the stuck write ends; its thread frees the log */
    cr_assert_eq(uv_thread_join(&rd.thread), 0);
    uv_sem_destroy(&rd.go);
    metrics_free(m);
}

/*
 * Hold the loop (from a callback of the test) until the FIFO's reader,
 * let go now, has had the stuck write whole (its copy stops growing) and
 * wait_ms is over: when the loop goes on, the write's answer and the log's
 * deadline for it are both due.
 */
static void let_go_and_hold_the_loop(struct fifo_reader *rd, unsigned wait_ms)
{
    uint64_t start = uv_hrtime();
    size_t lines = 0, was;

    uv_sem_post(&rd->go);
    do {
        was = lines;
        uv_sleep(100);
        lines = newlines_in(rd->out);
        cr_assert_lt((uv_hrtime() - start) / 1000000, 5000, "the stuck write did not end");
    } while (lines == 0 || lines != was || (uv_hrtime() - start) / 1000000 < wait_ms);
}

/* Did the reader see the FIFO's end (the log closed its file) within 5 s? */
static int reader_saw_the_end(struct fifo_reader *rd)
{
    for (int i = 0; i < 500 && !__atomic_load_n(&rd->done, __ATOMIC_ACQUIRE); i++)
        uv_sleep(10);
    return __atomic_load_n(&rd->done, __ATOMIC_ACQUIRE);
}

struct late_ctx {
    uv_timer_t timer;       /* fires before the log's wait_ms is over */
    uv_check_t check;       /* runs after the I/O of a turn of the loop */
    uv_prepare_t prepare;   /* runs after the timers of a turn of the loop */
    struct fifo_reader *rd; /* the stuck reader */
    struct metrics *m;      /* the log's metrics */
    unsigned wait_ms;       /* the log's */
};

/* After this turn's I/O: the next turn starts with the timers. */
static void on_late_check(uv_check_t *c)
{
    struct late_ctx *ctx = container_of(c, struct late_ctx, check);

    let_go_and_hold_the_loop(ctx->rd, ctx->wait_ms);
    uv_close((uv_handle_t *)c, NULL);
}

static void on_late_timer(uv_timer_t *t)
{
    struct late_ctx *ctx = (struct late_ctx *)t;

    uv_check_init(&loop, &ctx->check);
    uv_check_start(&ctx->check, on_late_check);
    uv_close((uv_handle_t *)t, NULL);
}

/*
 * At exit, the write that was stuck returns just as wait_ms runs out: its
 * answer (an async wake-up) and the deadline are due in the same turn of
 * the loop, and libuv runs timers before it polls. The log must see that the write
 * came back, take its answer and write the rest, not give up records that
 * are written or would be (and leave its file open, so that the FIFO's
 * reader never sees the end).
 */
Test(costlog, a_write_back_just_as_wait_ms_runs_out_is_not_given_up, .timeout = 30)
{
    struct fifo_reader rd = {.done = 0};
    struct late_ctx ctx = {.rd = &rd, .m = metrics_create(0), .wait_ms = 300};
    struct metrics_cost_log *log = open_on_stuck_fifo(&rd, 1000, 0, ctx.wait_ms, ctx.m);

    write_records(log, 0, 400); /* a 64 KiB write that sticks, and 150 KB after it */
    metrics_cost_log_close(log);
    uv_timer_init(&loop, &ctx.timer);
    uv_timer_start(&ctx.timer, on_late_timer, 100, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(metrics_get(ctx.m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 0,
                 "records given up though the write came back");
    cr_assert(reader_saw_the_end(&rd), "the log's file was left open");
    cr_assert_eq(uv_thread_join(&rd.thread), 0);
    cr_assert_eq(newlines_in(rd.out), 400);
    uv_sem_destroy(&rd.go);
    metrics_free(ctx.m);
}

/* Once the log gave up (dropped records counted), in that same turn of
 * the loop, before the log's handles are closed: let the write return. */
static void on_late_prepare(uv_prepare_t *p)
{
    struct late_ctx *ctx = container_of(p, struct late_ctx, prepare);

    if (metrics_get(ctx->m, METRICS_COST_LOG_DROPPED_TOTAL, NULL) == 0)
        return;
    let_go_and_hold_the_loop(ctx->rd, 0);
    uv_close((uv_handle_t *)p, NULL);
}

/*
 * The log gave up on a stuck write at exit, and the write returns before
 * the log's handles are closed: the writer is then not stuck, the log is
 * freed on the loop, and its file must be closed there (else a FIFO's
 * reader waits for the end for ever, and a file stays open).
 */
Test(costlog, a_write_back_after_the_log_gave_up_still_closes_the_file, .timeout = 30)
{
    struct fifo_reader rd = {.done = 0};
    struct late_ctx ctx = {.rd = &rd, .m = metrics_create(0), .wait_ms = 300};
    struct metrics_cost_log *log = open_on_stuck_fifo(&rd, 1000, 0, ctx.wait_ms, ctx.m);

    write_records(log, 0, 400);
    metrics_cost_log_close(log);
    uv_prepare_init(&loop, &ctx.prepare);
    uv_prepare_start(&ctx.prepare, on_late_prepare);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_gt(metrics_get(ctx.m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 0);
    cr_assert(reader_saw_the_end(&rd), "the log's file was left open");
    cr_assert_eq(uv_thread_join(&rd.thread), 0);
    uv_sem_destroy(&rd.go);
    metrics_free(ctx.m);
}

struct rotate_ctx {
    uv_timer_t timer;             /* drives the steps */
    struct metrics_cost_log *log; /* log under test */
    int step;                     /* 0: after first batch flushed, 1: after reopen */
    int next;                     /* next record number */
};

static void write_some(struct rotate_ctx *ctx, int n)
{
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    char id[32];

    for (int i = 0; i < n; i++) {
        make_record(&r, id, sizeof(id), ctx->next++, cands);
        cr_assert_eq(metrics_cost_log_write(ctx->log, &r), 0);
    }
}

static void on_rotate_step(uv_timer_t *t)
{
    struct rotate_ctx *ctx = (struct rotate_ctx *)t;
    char old[160];

    if (ctx->step++ == 0) {
        /* what logrotate does: rename, then signal */
        snprintf(old, sizeof(old), "%s.1", path);
        cr_assert_eq(rename(path, old), 0);
        write_some(ctx, 10); /* buffered before the reopen */
        metrics_cost_log_reopen(ctx->log);
        write_some(ctx, 10); /* after */
        return;
    }
    write_some(ctx, 5);
    metrics_cost_log_close(ctx->log);
    uv_close((uv_handle_t *)t, NULL);
}

Test(costlog, reopen_after_rename_rotates, .timeout = 10)
{
    struct rotate_ctx ctx = {0};
    char old[160], seen[40] = {0};
    int err;

    ctx.log = metrics_cost_log_open(&loop, path, 20, 0, 0, NULL, &err);
    cr_assert_not_null(ctx.log);
    write_some(&ctx, 10);
    uv_timer_init(&loop, &ctx.timer);
    uv_timer_start(&ctx.timer, on_rotate_step, 200, 200);
    uv_run(&loop, UV_RUN_DEFAULT);

    snprintf(old, sizeof(old), "%s.1", path);
    size_t in_old = check_lines(old, seen, 40), in_new = check_lines(path, seen, 40);
    cr_assert_eq(in_old + in_new, 35, "every record in one of the files");
    cr_assert_geq(in_old, 10, "records flushed before the rename stay in the old file");
    cr_assert_geq(in_new, 5, "records after the reopen go to the new file");
    for (int i = 0; i < 10; i++)
        cr_assert(seen[i]);
    /* the last five can only be in the new file */
    memset(seen, 0, sizeof(seen));
    check_lines(path, seen, 40);
    for (int i = 30; i < 35; i++)
        cr_assert(seen[i], "req-%d not in the new file", i);
}

static void on_run_for(uv_timer_t *t)
{
}

/* Give the loop `ms` milliseconds (a timer of its own). */
static void run_for(unsigned ms)
{
    uv_timer_t t;

    uv_timer_init(&loop, &t);
    uv_timer_start(&t, on_run_for, ms, 0);
    while (uv_is_active((uv_handle_t *)&t))
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
}

/*
 * The reopen after a rotation finds, where the file was, something whose
 * open hangs: here a FIFO no one reads (a hung mount would do the same).
 * The open is the writer's, so the loop goes on, and at exit the log
 * gives up on it after wait_ms like on a stuck write; it used to be a
 * libuv threadpool request, which the exit waited for, for ever. Once
 * the open returns (a reader comes), the writer closes what it opened:
 * the reader sees the end.
 */
Test(costlog, close_gives_up_on_a_reopen_stuck_for_wait_ms, .timeout = 30)
{
    struct metrics *m = metrics_create(0);
    struct metrics_cost_log *log;
    char old[160], seen[20] = {0}, buf[64];
    uint64_t start;
    int err, rd;

    log = metrics_cost_log_open(&loop, path, 20, 0, 300, m, &err);
    cr_assert_not_null(log);
    write_records(log, 0, 10);
    run_for(100); /* flushed to the file */
    snprintf(old, sizeof(old), "%s.1", path);
    cr_assert_eq(rename(path, old), 0);
    cr_assert_eq(mkfifo(path, 0600), 0);
    metrics_cost_log_reopen(log);
    write_records(log, 10, 5);
    run_for(200); /* the loop runs while the open hangs */
    start = uv_hrtime();
    metrics_cost_log_close(log);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_lt((uv_hrtime() - start) / 1000000, 5000, "close waited for the stuck reopen");
    cr_assert_eq(metrics_get(m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 5);
    cr_assert_eq(check_lines(old, seen, 20), 10, "the old file has what came before");
    rd = open(path, O_RDONLY); /* the writer's open returns: it closes that file */
    cr_assert_geq(rd, 0);
    cr_assert_eq(read(rd, buf, sizeof(buf)), 0, "the writer left the file it opened open");
    close(rd);
    metrics_free(m);
}

Test(costlog, dash_means_stdout, .timeout = 10)
{
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    char id[32], seen[2] = {0};
    int saved = dup(1), fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600), err;

    cr_assert_geq(fd, 0);
    cr_assert_eq(dup2(fd, 1), 1);
    close(fd);
    struct metrics_cost_log *log = metrics_cost_log_open(&loop, "-", 0, 0, 0, NULL, &err);
    cr_assert_not_null(log);
    for (int i = 0; i < 2; i++) {
        make_record(&r, id, sizeof(id), i, cands);
        cr_assert_eq(metrics_cost_log_write(log, &r), 0);
    }
    metrics_cost_log_reopen(log); /* no-op for stdout */
    metrics_cost_log_close(log);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(fcntl(1, F_GETFD), 0, "stdout must stay open");
    dup2(saved, 1);
    close(saved);
    cr_assert_eq(check_lines(path, seen, 2), 2);
}

static void on_full_step(uv_timer_t *t)
{
    struct rotate_ctx *ctx = (struct rotate_ctx *)t;

    /* the first 3 failed on the threadpool; these 2 fail in the final flush */
    cr_assert_eq(metrics_cost_log_dropped(ctx->log), 3);
    write_some(ctx, 2);
    metrics_cost_log_close(ctx->log);
    uv_close((uv_handle_t *)t, NULL);
}

Test(costlog, write_errors_count_as_dropped, .timeout = 10)
{
    struct rotate_ctx ctx = {0};
    struct metrics *m = metrics_create(0);
    int err;

    ctx.log = metrics_cost_log_open(&loop, "/dev/full", 10, 0, 0, m, &err);
    cr_assert_not_null(ctx.log);
    write_some(&ctx, 3);
    cr_assert_eq(metrics_cost_log_records(ctx.log), 3);
    uv_timer_init(&loop, &ctx.timer);
    uv_timer_start(&ctx.timer, on_full_step, 200, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(metrics_get(m, METRICS_COST_LOG_DROPPED_TOTAL, NULL), 5);
    metrics_free(m);
}

/* The file's lines: each NUL-terminated in the returned buffer (free
 * it), at most `max`; *n gets how many. */
static char *lines_of(const char *p, char **lines, size_t max, size_t *n)
{
    size_t len;
    char *data = slurp(p, &len), *save = NULL;

    *n = 0;
    for (char *line = strtok_r(data, "\n", &save); line && *n < max; line = strtok_r(NULL, "\n", &save))
        lines[(*n)++] = line;
    return data;
}

static void assert_record(const char *line, const char *id)
{
    cJSON *j = cJSON_Parse(line);

    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(j, "request_id")), id, "line: %s",
                     line);
    cJSON_Delete(j);
}

/* A router killed in the middle of a write leaves a cut line: the next
 * one's first record starts on a line of its own. */
Test(costlog, a_file_that_ends_inside_a_line_gets_a_new_line_first, .timeout = 10)
{
    struct rotate_ctx ctx = {0};
    FILE *f = fopen(path, "w");
    char *lines[4], *data;
    size_t n;
    int err;

    cr_assert_not_null(f);
    fputs("{\"request_id\":\"cut", f);
    fclose(f);
    ctx.log = metrics_cost_log_open(&loop, path, 0, 0, 0, NULL, &err);
    cr_assert_not_null(ctx.log);
    write_some(&ctx, 1);
    metrics_cost_log_close(ctx.log);
    uv_run(&loop, UV_RUN_DEFAULT);
    data = lines_of(path, lines, 4, &n);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(lines[0], "{\"request_id\":\"cut");
    assert_record(lines[1], "req-0");
    free(data);
}

static void on_cut_step(uv_timer_t *t)
{
    struct rotate_ctx *ctx = (struct rotate_ctx *)t;
    struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};

    /* 3 records were handed to one write; 1000 bytes went in, the rest
     * failed (EFBIG). With room again, one more. */
    cr_assert_eq(metrics_cost_log_dropped(ctx->log), 2, "the record written whole is no drop");
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &unlimited), 0);
    write_some(ctx, 1);
    metrics_cost_log_close(ctx->log);
    uv_close((uv_handle_t *)t, NULL);
}

/* A write cut short by an error (here the file size limit, as a full disk
 * would) leaves part of a line in the file. The next record is not glued
 * to it: it would make one line that is no JSON, losing both. */
/* Open the log, write three records (some 560 bytes each) under a file
 * size limit of 1000 bytes, run `step` 300 ms later and the loop to its
 * end; the file's lines in lines[8], their count in *n (the text
 * returned, to free). */
static char *write_three_past_a_limit(struct rotate_ctx *ctx, uv_timer_cb step, char **lines,
                                      size_t *n)
{
    struct rlimit small = {1000, RLIM_INFINITY};
    int err;

    signal(SIGXFSZ, SIG_IGN);
    ctx->log = metrics_cost_log_open(&loop, path, 10, 0, 0, NULL, &err);
    cr_assert_not_null(ctx->log);
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
    write_some(ctx, 3);
    uv_timer_init(&loop, &ctx->timer);
    uv_timer_start(&ctx->timer, step, 300, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    return lines_of(path, lines, 8, n);
}

Test(costlog, a_write_cut_short_keeps_the_next_record_whole, .timeout = 10)
{
    struct rotate_ctx ctx = {0};
    char *lines[8], *data;
    size_t n;

    data = write_three_past_a_limit(&ctx, on_cut_step, lines, &n);
    cr_assert_eq(n, 3);
    assert_record(lines[0], "req-0");
    cr_assert_null(cJSON_Parse(lines[1]), "the cut line: %s", lines[1]);
    assert_record(lines[2], "req-3");
    free(data);
}

static void on_cut_after_cut_step(uv_timer_t *t)
{
    struct rotate_ctx *ctx = (struct rotate_ctx *)t;
    struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};

    /* The file held 18 bytes; 982 more went in: the newline that ends the
     * cut line, req-0 whole and part of req-1. req-1 and req-2 are lost:
     * the newline written first is no record. */
    cr_assert_eq(metrics_cost_log_dropped(ctx->log), 2,
                 "dropped %llu: the newline ending the old cut line counted as a record",
                 (unsigned long long)metrics_cost_log_dropped(ctx->log));
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &unlimited), 0);
    metrics_cost_log_close(ctx->log);
    uv_close((uv_handle_t *)t, NULL);
}

/* A file that ends inside a line gets a newline before the first record;
 * when the first write is then cut short, the records lost are counted
 * right: the newline is not one of them. */
Test(costlog, a_cut_first_write_after_a_cut_file_counts_its_drops, .timeout = 10)
{
    struct rotate_ctx ctx = {0};
    FILE *f = fopen(path, "w");
    char *lines[8], *data;
    size_t n;

    cr_assert_not_null(f);
    fputs("{\"request_id\":\"cut", f); /* 18 bytes */
    fclose(f);
    data = write_three_past_a_limit(&ctx, on_cut_after_cut_step, lines, &n);
    cr_assert_eq(n, 3);
    assert_record(lines[1], "req-0");
    free(data);
}

Test(costlog, open_failure_reports_errno, .timeout = 5)
{
    int err = 0;
    char bad[160];

    snprintf(bad, sizeof(bad), "%s/no/such/dir/log", dir);
    cr_assert_null(metrics_cost_log_open(&loop, bad, 0, 0, 0, NULL, &err));
    cr_assert_eq(err, UV_ENOENT);
}

/* The numbers are printed without printf: check the text itself. */
static char *record_line(struct metrics_cost_record *r, struct buf *out)
{
    buf_reset(out);
    cr_assert_eq(metrics_cost_record_json(r, out), 0);
    cr_assert_eq(buf_append(out, "", 1), 0);
    return out->data;
}

Test(costlog, numbers_as_text)
{
    struct metrics_cost_candidate cands[2];
    struct metrics_cost_record r;
    struct buf out = {0};
    char id[32], *line;

    make_record(&r, id, sizeof(id), 0, cands);
    cands[0].est_cost_usd = 0.0000015; /* 1.5 micro-USD */
    r.cost_usd_est = 12.345678;
    r.cost_usd = 0;
    r.saved_usd = 1e12; /* beyond fixed point: shortest round trip */
    r.ttft_ms = 12.5;
    r.latency_ms = 80;
    r.prompt_tokens = 0;
    line = record_line(&r, &out);
    cr_assert(strstr(line, "\"est_cost_usd\":0.0000015,"), "%s", line);
    cr_assert(strstr(line, "\"cost_usd_est\":12.345678,"), "%s", line);
    cr_assert(strstr(line, "\"cost_usd\":0,"), "%s", line);
    cr_assert(strstr(line, "\"saved_usd\":1000000000000,"), "%s", line);
    cr_assert(strstr(line, "\"ttft_ms\":12.5,"), "%s", line);
    cr_assert(strstr(line, "\"latency_ms\":80,"), "%s", line);
    cr_assert(strstr(line, "\"prompt_tokens\":0,"), "%s", line);
    cr_assert(strstr(line, "\"completion_tokens\":null,"), "%s", line);
    cr_assert(strstr(line, "\"status\":200,\"fallbacks\":0}\n"), "%s", line);
    /* the same second reuses its text, the next one does not */
    cr_assert(strstr(line, "\"ts\":\"2026-11-18T11:06:40.123Z\""), "%s", line);
    r.ts_ms += 876;
    cr_assert(strstr(record_line(&r, &out), "\"ts\":\"2026-11-18T11:06:40.999Z\""), "%s", out.data);
    r.ts_ms += 1;
    cr_assert(strstr(record_line(&r, &out), "\"ts\":\"2026-11-18T11:06:41.000Z\""), "%s", out.data);
    buf_free(&out);
}

/* The descriptor of this process open on `p`, or -1. */
static int fd_of(const char *p)
{
    char link[64], target[256];

    for (int fd = 0; fd < 1024; fd++) {
        ssize_t n;

        snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
        n = readlink(link, target, sizeof(target) - 1);
        if (n <= 0)
            continue;
        target[n] = '\0';
        if (strcmp(target, p) == 0)
            return fd;
    }
    return -1;
}

/* A log with nothing to write has its file closed at once (by its
 * writer thread, before the loop turns), and only once: a file the
 * process opens next under the same number (a reload's new cost log, a
 * client's socket) is not closed when the log is freed. */
Test(costlog, the_file_is_closed_once, .timeout = 10)
{
    char real[PATH_MAX];
    int err, fd, devnull;
    struct metrics_cost_log *log = metrics_cost_log_open(&loop, path, 20, 0, 0, NULL, &err);

    cr_assert_not_null(log);
    cr_assert_not_null(realpath(path, real));
    fd = fd_of(real);
    cr_assert_geq(fd, 0, "the log's file is not open");
    metrics_cost_log_close(log);
    for (int i = 0; i < 2000 && fcntl(fd, F_GETFD) != -1; i++)
        uv_sleep(1);
    cr_assert_eq(fcntl(fd, F_GETFD), -1, "not closed at once, though nothing was waiting");
    devnull = open("/dev/null", O_RDONLY); /* most likely takes fd, the lowest free */
    cr_assert_geq(devnull, 0);
    if (devnull != fd) {
        cr_assert_eq(dup2(devnull, fd), fd);
        close(devnull);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_neq(fcntl(fd, F_GETFD), -1, "the log closed descriptor %d again", fd);
    close(fd);
}

/* Occurrences of `text` in the file at `p`. */
static int count_in_file(const char *p, const char *text)
{
    size_t len;
    char *data = slurp(p, &len);
    int n = 0;

    for (const char *at = data; (at = strstr(at, text)) != NULL; at++)
        n++;
    free(data);
    return n;
}

/* While behind, the warning that costless records are skipped comes once
 * a minute, not once a second as other repeated lines do: refusals that
 * go on for seconds are one line, not one a second. */
Test(costlog, skipped_records_are_warned_of_once_a_minute, .timeout = 30)
{
    struct fifo_reader rd;
    struct skip_ctx ctx = {0};
    char err_path[160];
    int saved = dup(2), fd, n = 0;

    snprintf(err_path, sizeof(err_path), "%s/stderr.log", dir);
    fd = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    cr_assert(saved >= 0 && fd >= 0);
    cr_assert_eq(dup2(fd, 2), 2);
    close(fd);
    ctx.log = open_on_stuck_fifo(&rd, 20, BEHIND_AT, 0, NULL);
    metrics_cost_log_on_caught_up(ctx.log, on_caught_up_skip, &ctx);
    while (!metrics_cost_log_behind(ctx.log))
        write_records(ctx.log, n++, 1);
    cr_assert_eq(write_costless(ctx.log, 300000), 0);
    uv_sleep(1100); /* past log_every's default second */
    uv_update_time(&loop);
    cr_assert_eq(write_costless(ctx.log, 300001), 0);
    cr_assert_eq(metrics_cost_log_skipped(ctx.log), 2);
    uv_sem_post(&rd.go);
    uv_timer_init(&loop, &ctx.timer);
    uv_timer_start(&ctx.timer, wait_caught_up, 50, 50);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_thread_join(&rd.thread), 0);
    uv_sem_destroy(&rd.go);
    fflush(stderr);
    cr_assert_eq(dup2(saved, 2), 2);
    close(saved);
    cr_assert_eq(count_in_file(err_path, "are skipped, counted in"), 1);
    cr_assert_eq(count_in_file(err_path, "; 2 records that carry no cost were skipped meanwhile"),
                 1);
}
