/*
 * tests/router/test_multi.c: the headline promise end to end. Three real
 * routers with one config share one real redis-server, each with a cost
 * log of its own, in front of a real mockllm (priced as an API, or as a
 * GPU pool). Forked clients (45, fifteen a router, each with one request
 * at a time) hammer them with plain and streamed requests, some without
 * max_tokens, some leaving mid-stream, some before the answer, until every
 * one is refused for good (429 budget_exhausted, x-should-retry: false).
 * Then the answers, the cost logs and Redis must agree:
 *   1. Redis's spend is the sum of the cost logs, to the micro-dollar;
 *   2. it passes the budget by no more than the README allows;
 *   3. every 2xx answer's cost is its cost log line's;
 *   4. every answer has one cost log line on its router, and every line
 *      one answer (by request id);
 *   5. the routers exit 0 on SIGTERM and leave nothing reserved in Redis.
 * The tenant has two named keys: ci, with a budget of its own smaller than
 * the tenant's (the store's subject TENANT#ci), used by a third of the
 * clients, and web, with none, by the rest. 1, 2 and 5 hold for the key's
 * subject too, against the cost log lines naming the key, and each line
 * names its answer's key.
 * Other runs stop the routers while the clients still send, or take Redis
 * away midway (frozen with SIGSTOP, or killed and restarted) under
 * fail_open and fail_closed: charges go through the journal, and what the
 * README promises then must hold.
 *
 * mockllm counts the prompt as 3 + sum(4 + words) over the messages, as
 * cl100k_base's chat framing does for the message below, and answers
 * exactly x-mock-tokens completion tokens, so the holds of requests with
 * max_tokens are exact (rounded up to the micro-dollar). Costs have
 * fractions of a micro-dollar, which each router carries to the tenant's
 * next charge: Redis's sum is within half a micro-dollar per router of
 * the cost logs', as the README says, and a router that rounded each
 * charge alone would drift from them by about 0.4 a request.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/support/http.h"
#include "tests/support/proc.h"
#include "tests/support/redis.h"

#define NROUTERS 3
#define NCLIENTS 45          /* each with one request at a time */
#define TIMEOUT_MS 10000
#define CLIENT_SECONDS 30    /* a client that is not refused for good by then fails the test */
#define KEY "sk-multi-tenant"  /* named web: no budget of its own */
#define KEY_CI "sk-multi-ci"     /* named ci: a budget of its own */
#define KEY_NAME "ci"
#define AUTH "Authorization: Bearer " KEY "\r\n"
#define AUTH_CI "Authorization: Bearer " KEY_CI "\r\n"
#define NCI (NCLIENTS / 3)   /* clients sending with KEY_CI: see client_is_ci */
#define ADMIN "Authorization: Bearer adm-multi\r\n"
#define TENANT "acme"
#define PREFIX "costrouter:"
#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]"
#define BUDGET_MICRO 60000   /* $0.06: some 150 answers */
#define PLAIN_HOLD 391       /* 9 prompt tokens at $10/M, 10 completion at $30.04/M: 390.4 */

/* Whose spend a check is about: the tenant's (every line), or its key
 * ci's (the lines naming it). */
enum subject { S_TENANT, S_KEY, S_N };
static const char *const subject_ids[S_N] = {TENANT, TENANT "#" KEY_NAME};

/* What a client sends, one kind per client. */
enum kind { K_PLAIN, K_STREAM, K_GUESS, K_LEAVE, K_EARLY, K_N };

/* One answer as a client saw it; amounts in micro-USD, -1 when absent. */
struct answer {
    int router, kind;
    int ci;            /* sent with KEY_CI */
    int status;        /* -1: the client left before any; 0: none came (the router stopping) */
    char id[64];       /* x-request-id */
    char code[48];     /* error.code of an error answer, "-" else */
    long long head;    /* x-costrouter-cost-usd in the head */
    long long trailer; /* the same in a stream's trailer */
    long long comment; /* the same in a stream's SSE comment */
    int final;         /* x-should-retry: false */
    int left;          /* the client hung up before the end */
};

/* One cost log line. */
struct line {
    char id[64];
    int status, router, seen;
    int ci; /* its "key" is ci */
    long long cost_pico, est_micro;
    long long ts_ms; /* when the request started, -1: unknown */
};

static struct support_proc routers[NROUTERS], mock;
static struct test_redis redis;
static char dir[64], conf_path[128];
static long long budget_micro = BUDGET_MICRO; /* the tenant's daily budget */
/* The key ci's: a tenth of its tenant's, so that with a third of the
 * clients it runs out first however the machine schedules them, and the
 * web clients spend the rest. */
static long long key_budget_micro = BUDGET_MICRO / 10;
static struct answer *answers;
static size_t nanswers;
static struct line *lines;
static size_t nlines;

/* A subject's daily budget. */
static long long budget_of(enum subject s)
{
    return s == S_TENANT ? budget_micro : key_budget_micro;
}

static void teardown(void)
{
    char path[192];

    for (int i = 0; i < NROUTERS; i++) {
        support_proc_stop(&routers[i]);
        snprintf(path, sizeof(path), "%s/router-%d.log", dir, i);
        support_log_show(path, "router");
    }
    support_proc_stop(&mock);
    if (redis.pid)
        test_redis_stop(&redis);
    free(answers);
    free(lines);
    if (dir[0])
        support_remove_tree(dir);
}

TestSuite(multi, .fini = teardown, .timeout = 90);

/* An answer not yet had: no status, id, code or costs. */
static struct answer answer_new(int router, enum kind k)
{
    return (struct answer){.router = router, .kind = k, .id = "-", .code = "-", .head = -1,
                           .trailer = -1, .comment = -1};
}

static long long micro_of(const char *usd)
{
    return usd ? llround(strtod(usd, NULL) * 1e6) : -1;
}

/* ---- the clients (forked: no Criterion calls in them) ---- */

/* Completion tokens for a client's n-th request: fixed for the kinds with
 * max_tokens; for K_GUESS 2-24, and 60 every fifth, so that the P95 its
 * hold is for falls short at times and the real cost passes the hold. */
static int tokens_for(enum kind k, int n)
{
    static const int fixed[K_N] = {[K_PLAIN] = 10, [K_STREAM] = 20, [K_LEAVE] = 30, [K_EARLY] = 10};

    if (k != K_GUESS)
        return fixed[k];
    return n % 5 == 4 ? 60 : 2 + (n * 13) % 23;
}

/* `ci`: with KEY_CI, else KEY. */
static int format_request(struct buf *out, enum kind k, int n, int ci)
{
    static const char *const bodies[K_N] = {
        [K_PLAIN] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}",
        [K_STREAM] = "{\"model\":\"chat\",\"stream\":true,\"max_tokens\":20," MSG "}",
        [K_GUESS] = "{\"model\":\"chat\"," MSG "}",
        [K_LEAVE] = "{\"model\":\"chat\",\"stream\":true,\"max_tokens\":30," MSG "}",
        [K_EARLY] = "{\"model\":\"chat\",\"max_tokens\":10," MSG "}",
    };
    static const char *const delays[K_N] = {
        /* The leaver's stream lasts 600 ms: it is gone long before the
         * end. The early leaver's answer starts after 300 ms: it is gone
         * before. */
        [K_LEAVE] = "x-mock-token-delay-ms: 20\r\n",
        [K_EARLY] = "x-mock-ttft-ms: 300\r\n",
    };
    char headers[256];

    snprintf(headers, sizeof(headers), "%sx-mock-tokens: %d\r\n%s", ci ? AUTH_CI : AUTH,
             tokens_for(k, n), delays[k] ? delays[k] : "");
    return support_http_format(out, "POST", "/v1/chat/completions", headers, bodies[k]);
}

/* The head's and the body's parts of an answer that every kind has. */
static void note_answer(struct answer *a, const struct support_http_response *r)
{
    const char *id = support_http_header(r, "x-request-id");
    const char *retry = support_http_header(r, "x-should-retry");
    cJSON *body, *code;

    a->status = r->status;
    snprintf(a->id, sizeof(a->id), "%s", id ? id : "-");
    a->final = retry && strcmp(retry, "false") == 0;
    snprintf(a->code, sizeof(a->code), "-");
    if (r->status < 400 || (body = cJSON_ParseWithLength(r->body.data, r->body.len)) == NULL)
        return;
    code = cJSON_GetObjectItem(cJSON_GetObjectItem(body, "error"), "code");
    if (cJSON_IsString(code))
        snprintf(a->code, sizeof(a->code), "%s", code->valuestring);
    cJSON_Delete(body);
}

/* A whole answer, on `conn` when it is open (keep-alive: K_PLAIN's
 * clients keep theirs), else on a connection of its own. */
static void plain_request(struct answer *a, int port, const struct buf *q,
                          struct support_http_conn *conn)
{
    struct support_http_response r = {0};
    int rc;

    if (conn == NULL)
        rc = support_http_request(port, q->data, q->len, TIMEOUT_MS, &r);
    else if ((conn->fd >= 0 || (rc = support_http_connect(conn, port)) == 0) &&
             (rc = support_http_send(conn, q->data, q->len)) == 0)
        rc = support_http_read(conn, &r, TIMEOUT_MS);
    if (rc == 0) {
        note_answer(a, &r);
        a->head = micro_of(support_http_header(&r, "x-costrouter-cost-usd"));
    } else if (conn != NULL) {
        support_http_close(conn); /* the next request connects again */
    }
    support_http_response_free(&r);
}

/* The cost the router puts in an SSE comment at a stream's end. */
static long long comment_micro(const struct buf *body)
{
    static const char mark[] = ": x-costrouter-cost-usd=";
    const char *p = memmem(body->data, body->len, mark, sizeof(mark) - 1);
    char usd[32] = "";

    if (p == NULL)
        return -1;
    p += sizeof(mark) - 1;
    for (size_t i = 0; i < sizeof(usd) - 1 && p + i < body->data + body->len && p[i] != '\n'; i++)
        usd[i] = p[i];
    return micro_of(usd);
}

/* A stream read to its end, or (leave) left after its first event. */
static void stream_request(struct answer *a, int port, const struct buf *q, int leave)
{
    struct support_sse s;
    struct support_sse_event ev;
    int rc = support_sse_open(&s, port, q->data, q->len, TIMEOUT_MS);

    if (rc == 0)
        while ((rc = support_sse_next(&s, &ev, TIMEOUT_MS)) == 1 && !(leave && s.resp.status == 200))
            ;
    a->left = leave && rc == 1;
    if (rc == 0 || a->left) {
        note_answer(a, &s.resp);
        a->trailer = micro_of(support_http_header(&s.resp, "x-costrouter-cost-usd"));
        a->comment = comment_micro(&s.resp.body);
    }
    support_sse_close(&s);
}

/* A request whose client hangs up 30 ms after sending it, unless its
 * answer (a refusal) came by then. One that left before the head has no
 * request id: its cost log line is found by elimination. */
static void early_request(struct answer *a, int port, const struct buf *q)
{
    struct support_http_conn conn;
    struct support_http_response r = {0};
    int rc = support_http_connect(&conn, port);

    if (rc == 0 && (rc = support_http_send(&conn, q->data, q->len)) == 0 &&
        (rc = support_http_read(&conn, &r, 30)) == -ETIMEDOUT && r.headers_done == 0) {
        a->left = 1;
        a->status = -1;
    } else if (rc == 0 || r.headers_done) { /* else no answer: status 0 */
        note_answer(a, &r);
        a->left = rc != 0;
        a->head = micro_of(support_http_header(&r, "x-costrouter-cost-usd"));
    }
    support_http_close(&conn);
    support_http_response_free(&r);
}

static void one_request(struct answer *a, int port, enum kind k, int n,
                        struct support_http_conn *conn)
{
    struct buf q = {0};

    if (format_request(&q, k, n, a->ci) != 0)
        _exit(3);
    if (k == K_PLAIN || k == K_GUESS)
        plain_request(a, port, &q, k == K_PLAIN ? conn : NULL);
    else if (k == K_EARLY)
        early_request(a, port, &q);
    else
        stream_request(a, port, &q, k == K_LEAVE);
    buf_free(&q);
}

static double mono_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Its listener is closed: the router stopped. */
static int router_gone(int port)
{
    struct support_http_conn conn;
    int rc = support_http_connect(&conn, port);

    support_http_close(&conn);
    return rc == -ECONNREFUSED;
}

static void write_answer(FILE *f, const struct answer *a)
{
    fprintf(f, "%d %d %d %d %s %s %lld %lld %lld %d %d\n", a->router, a->kind, a->ci, a->status,
            a->id, a->code, a->head, a->trailer, a->comment, a->final, a->left);
}

/*
 * The clients of an outage run meet the test after PHASE_ONE requests
 * each: once all are there, it lets them go and takes Redis away at once.
 * So the outage comes while they all still run, however loaded the
 * machine (watching the spend, the test could see a quarter of the budget
 * spent only after all of it was). Pipes, -1 when unused: the clients
 * write a byte to `ready` when there (or done before), and read `go`
 * until the test closes it.
 */
#define PHASE_ONE 2
static int ready[2] = {-1, -1}, go[2] = {-1, -1};

static void client_ready(void)
{
    if (ready[1] < 0)
        return;
    if (write(ready[1], "r", 1) != 1)
        _exit(3);
    close(ready[1]);
    ready[1] = -1;
}

static void client_meet(void)
{
    char byte;

    if (ready[1] < 0)
        return;
    client_ready();
    while (read(go[0], &byte, 1) > 0)
        ;
}

/*
 * Whether client `c` sends with KEY_CI: a third of them, each kind on each
 * router once, spread along the order they are forked in. The first to
 * start spend much of the tenant's budget (in front of the GPU pool it
 * goes in well under a second): the key's clients all among the last
 * found it gone, and the leavers all among the key's found the key's
 * gone at once.
 */
static int client_is_ci(int c)
{
    int group = c / (NROUTERS * K_N), kind = c / NROUTERS % K_N, router = c % NROUTERS;

    return group == (kind + router) % (NCLIENTS / (NROUTERS * K_N));
}

/* Client `c`: requests of its kind to its router until refused for good
 * or the router stopped (each answer a line in its file, status 0 for
 * none); a 429 worth a retry waits 10 ms. */
static void client(int c, const char *path)
{
    FILE *f = fopen(path, "w");
    struct support_http_conn conn = {.fd = -1};
    double until = mono_s() + CLIENT_SECONDS;
    int router = c % NROUTERS;
    enum kind k = (enum kind)(c / NROUTERS % K_N);

    if (f == NULL)
        _exit(3);
    for (int n = 0; mono_s() < until; n++) {
        struct answer a = answer_new(router, k);

        a.ci = client_is_ci(c);
        if (n == PHASE_ONE)
            client_meet();
        one_request(&a, routers[router].port, k, n, &conn);
        write_answer(f, &a);
        if ((a.status == 429 && a.final) || (a.status == 0 && router_gone(routers[router].port))) {
            client_ready();
            _exit(fclose(f) == 0 ? 0 : 3);
        }
        if (a.status == 429 || a.status == 503)
            usleep(10000);
    }
    fclose(f);
    _exit(4); /* never refused for good */
}

static void client_path(char *out, size_t size, int c)
{
    snprintf(out, size, "%s/client-%d", dir, c);
}

/* `meet`: the clients meet the test after PHASE_ONE requests (see
 * client_meet; let them go with clients_go). */
static void start_clients(pid_t pids[NCLIENTS], int meet)
{
    char path[192];

    if (meet) {
        cr_assert_eq(pipe2(ready, O_CLOEXEC), 0);
        cr_assert_eq(pipe2(go, O_CLOEXEC), 0);
    }
    for (int c = 0; c < NCLIENTS; c++) {
        client_path(path, sizeof(path), c);
        pids[c] = fork();
        cr_assert_geq(pids[c], 0);
        if (pids[c] == 0) {
            if (meet) {
                close(ready[0]);
                close(go[1]);
            }
            client(c, path);
        }
    }
    if (meet) {
        close(ready[1]);
        close(go[0]);
    }
}

/* Once every client is at the meeting (or done), let them all go. */
static void clients_go(void)
{
    char bytes[NCLIENTS];
    size_t got = 0;
    ssize_t n;

    while (got < NCLIENTS && (n = read(ready[0], bytes, sizeof(bytes))) > 0)
        got += (size_t)n;
    cr_assert_eq(got, NCLIENTS, "%zu clients met", got);
    close(ready[0]);
    close(go[1]);
}

/* Only the clients: the servers are children too. */
static void wait_clients(pid_t pids[NCLIENTS])
{
    for (int c = 0; c < NCLIENTS; c++) {
        int status = 0;

        cr_assert_eq(waitpid(pids[c], &status, 0), pids[c]);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "client %d (router %d, kind %d) ended with status %#x", c, c % NROUTERS,
                  c / NROUTERS % K_N, status);
    }
}

/* ---- setup ---- */

/* The backend every request goes to, with %d for mockllm's port. The API
 * at $10 and $30.04 a million tokens: the completion's cost has a
 * fraction of a micro-dollar (0.04 a token), which the routers carry. */
#define API_BACKEND                                                                                \
    "  - {name: api, kind: api, url: \"http://127.0.0.1:%d/v1\", model: m-api,\n"                \
    "     tokenizer: cl100k_base, quality: 1, context_window: 100000,\n"                          \
    "     input_usd_per_mtok: 10, output_usd_per_mtok: 30.04}\n"
/* A GPU pool at $360 an hour a replica: a request costs its share of the
 * pool's time, in fractions of a micro-dollar, and holds its marginal
 * cost, far less. */
#define POOL_BACKEND                                                                               \
    "  - {name: api, kind: self_hosted, url: \"http://127.0.0.1:%d/v1\", model: m-pool,\n"       \
    "     tokenizer: cl100k_base, quality: 1, context_window: 100000,\n"                          \
    "     gpu_hourly_usd: 360, replicas: 2, max_concurrency: 8, tokens_per_second: 1000}\n"

static void write_conf(const char *store_extra, const char *backend)
{
    char hex[65], hex_ci[65];
    FILE *f;

    support_key_sha256_hex(KEY, hex);
    support_key_sha256_hex(KEY_CI, hex_ci);
    snprintf(conf_path, sizeof(conf_path), "%s/costrouter.yaml", dir);
    f = fopen(conf_path, "w");
    cr_assert_not_null(f);
    /* One config for all: each router's cost log comes from its
     * environment. */
    fprintf(f,
            "listen: 127.0.0.1:0\nadmin_key: adm-multi\ncost_log: ${MULTI_COST_LOG}\n"
            "store: {redis: \"%s\", key_prefix: \"" PREFIX "\"%s}\nbackends:\n",
            redis.url, store_extra);
    fprintf(f, backend, mock.port);
    fprintf(f,
            "routes:\n  - {model: chat, candidates: [api]}\n"
            "tenants:\n  - id: " TENANT "\n    api_keys:\n"
            "      - {name: " KEY_NAME ", hash: \"sha256:%s\", budget: {daily_usd: %g}}\n"
            "      - {name: web, hash: \"sha256:%s\"}\n"
            "    budget: {daily_usd: %g, on_exhausted: reject}\n",
            hex_ci, budget_of(S_KEY) / 1e6, hex, budget_micro / 1e6);
    fclose(f);
}

static int http_get(int port, const char *path, struct support_http_response *r)
{
    struct buf q = {0};
    int rc = support_http_format(&q, "GET", path, ADMIN, NULL);

    if (rc == 0)
        rc = support_http_request(port, q.data, q.len, TIMEOUT_MS, r);
    buf_free(&q);
    return rc;
}

/* Whether router `router`'s /metrics has `line` (with its newlines). */
static int metrics_have(int router, const char *line)
{
    struct support_http_response r = {0};
    int yes = http_get(routers[router].port, "/metrics", &r) == 0 &&
              memmem(r.body.data, r.body.len, line, strlen(line)) != NULL;

    support_http_response_free(&r);
    return yes;
}

/* Whether router `router`'s /metrics has `line` within `tries` looks,
 * 20 ms apart. */
static int metrics_have_within(int router, const char *line, int tries)
{
    for (int i = 0; i < tries; i++, usleep(20000))
        if (metrics_have(router, line))
            return 1;
    return 0;
}

/* Wait until router `i` has its Redis connection: before that it serves
 * from memory (and writes back later). */
static void wait_store_up(int i)
{
    static const char up[] = "\ncostrouter_store_up{store=\"redis\"} 1\n";

    cr_assert(metrics_have_within(i, up, 500), "router %d: the store is not up", i);
}

static void start_router(int i)
{
    char cmd[512], costlog[192];
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};

    snprintf(costlog, sizeof(costlog), "%s/cost-%d.jsonl", dir, i);
    cr_assert_eq(setenv("MULTI_COST_LOG", costlog, 1), 0);
    snprintf(cmd, sizeof(cmd), "exec '%s' -c '%s' 2>>'%s/router-%d.log'", getenv("COSTROUTER_BIN"),
             conf_path, dir, i);
    cr_assert_eq(support_proc_start(&routers[i], argv), 0, "router %d did not start", i);
    wait_store_up(i);
}

/* Redis, mockllm (1 ms a token) and the routers, with `store_extra` in
 * the config's store mapping and `backend` (API_BACKEND, POOL_BACKEND). */
static void start_all(const char *store_extra, const char *backend, int persist)
{
    strcpy(dir, "/tmp/costrouter-multi-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    cr_assert_eq(test_redis_start(&redis, persist), 0);
    cr_assert_eq(support_mockllm_start(&mock, "--token-delay-ms", "1", NULL), 0);
    write_conf(store_extra, backend);
    for (int i = 0; i < NROUTERS; i++)
        start_router(i);
}

/* ---- what the clients saw ---- */

/* `array` (of n items of `size` bytes, room for *cap) with room for one
 * more. */
static void *room_for_one(void *array, size_t n, size_t *cap, size_t size)
{
    if (n < *cap)
        return array;
    *cap = *cap ? 2 * *cap : 256;
    array = realloc(array, *cap * size);
    cr_assert_not_null(array);
    return array;
}

static void add_answer(const struct answer *a)
{
    static size_t cap;

    answers = room_for_one(answers, nanswers, &cap, sizeof(*answers));
    answers[nanswers++] = *a;
}

/* `unanswered_ok`: the routers were stopped while the client ran. */
static void read_client(int c, int unanswered_ok)
{
    char path[192], text[512];
    FILE *f;

    client_path(path, sizeof(path), c);
    f = fopen(path, "r");
    cr_assert_not_null(f, "client %d wrote nothing", c);
    while (fgets(text, sizeof(text), f)) {
        struct answer a = {0};

        cr_assert_eq(sscanf(text, "%d %d %d %d %63s %47s %lld %lld %lld %d %d", &a.router,
                            &a.kind, &a.ci, &a.status, a.id, a.code, &a.head, &a.trailer,
                            &a.comment, &a.final, &a.left),
                     11, "client %d: %s", c, text);
        cr_assert(a.status != 0 || unanswered_ok, "client %d got no answer (router %d, kind %d)",
                  c, a.router, a.kind);
        add_answer(&a);
    }
    fclose(f);
}

/* After the clients: every router refuses a plain request for good, by
 * either key. */
static void every_router_refuses(void)
{
    for (int i = 0; i < 2 * NROUTERS; i++) {
        struct answer a = answer_new(i % NROUTERS, K_PLAIN);
        struct buf q = {0};

        a.ci = i >= NROUTERS;
        cr_assert_eq(format_request(&q, K_PLAIN, 0, a.ci), 0);
        plain_request(&a, routers[a.router].port, &q, NULL);
        buf_free(&q);
        cr_assert_eq(a.status, 429, "router %d, ci %d: %d", a.router, a.ci, a.status);
        cr_assert_str_eq(a.code, "budget_exhausted");
        cr_assert(a.final, "router %d, ci %d: a 429 worth a retry when nothing is in flight",
                  a.router, a.ci);
        add_answer(&a);
    }
}

/* ---- the cost logs ---- */

static void add_line(const struct line *l)
{
    static size_t cap;

    lines = room_for_one(lines, nlines, &cap, sizeof(*lines));
    lines[nlines++] = *l;
}

static double number_of(const cJSON *rec, const char *name)
{
    const cJSON *v = cJSON_GetObjectItem(rec, name);

    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* Wall-clock ms of a log line ("2026-12-07T05:39:30.123Z info ...") or a
 * cost log line's "ts", -1
 * when it has no time. */
static long long log_line_ms(const char *line)
{
    struct tm tm = {0};
    int ms;

    if (sscanf(line, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
               &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) != 7)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (long long)timegm(&tm) * 1000 + ms;
}

static void read_cost_log(int router)
{
    char path[192], text[8192];
    FILE *f;

    snprintf(path, sizeof(path), "%s/cost-%d.jsonl", dir, router);
    f = fopen(path, "r");
    cr_assert_not_null(f, "no cost log for router %d", router);
    while (fgets(text, sizeof(text), f)) {
        cJSON *rec = cJSON_Parse(text);
        const cJSON *id = cJSON_GetObjectItem(rec, "request_id");
        const cJSON *ts = cJSON_GetObjectItem(rec, "ts");
        const cJSON *key = cJSON_GetObjectItem(rec, "key");
        double est = number_of(rec, "cost_usd_est");
        struct line l = {.router = router};

        cr_assert(cJSON_IsString(id), "router %d: bad cost log line: %s", router, text);
        /* both keys have a name: every line names one */
        cr_assert(cJSON_IsString(key), "router %d: a line without its key: %s", router, text);
        l.ci = strcmp(key->valuestring, KEY_NAME) == 0;
        snprintf(l.id, sizeof(l.id), "%s", id->valuestring);
        l.status = (int)number_of(rec, "status");
        l.cost_pico = llround(number_of(rec, "cost_usd") * 1e12);
        l.est_micro = isnan(est) ? 0 : llround(est * 1e6);
        l.ts_ms = cJSON_IsString(ts) ? log_line_ms(ts->valuestring) : -1;
        add_line(&l);
        cJSON_Delete(rec);
    }
    fclose(f);
}

static int by_id(const void *a, const void *b)
{
    return strcmp(((const struct line *)a)->id, ((const struct line *)b)->id);
}

static struct line *line_of(const char *id)
{
    struct line key;

    snprintf(key.id, sizeof(key.id), "%s", id);
    return bsearch(&key, lines, nlines, sizeof(*lines), by_id);
}

/* 3: what the answer said it cost is what its line says (to the nearest
 * micro-dollar, as the header gives it). */
static void answer_cost_is_logged(const struct answer *a, const struct line *l)
{
    long long logged = llround(l->cost_pico / 1e6);

    if (a->left) { /* it saw no cost: its line says why */
        cr_assert(l->status == 499 || l->status == a->status, "%s: left, logged %d", a->id,
                  l->status);
        return;
    }
    cr_assert_eq(l->status, a->status, "%s: answered %d, logged %d", a->id, a->status, l->status);
    if (a->status != 200)
        return;
    if (a->kind != K_STREAM && a->kind != K_LEAVE) {
        /* K_EARLY too: a client kept off the CPU past its 30 ms finds
         * its whole answer there */
        cr_assert_eq(a->head, logged, "%s: header %lld, logged %lld", a->id, a->head, logged);
    } else {
        cr_assert_eq(a->trailer, logged, "%s: trailer %lld, logged %lld", a->id, a->trailer, logged);
        cr_assert_eq(a->comment, logged, "%s: comment %lld, logged %lld", a->id, a->comment, logged);
    }
}

/* 3 and 4: each answer has one line on its router, each line one answer;
 * the lines no answer names are those of the clients that left before
 * their answer's head, as many on each router. A request that got no
 * answer at all (its router stopping) has none. */
static void answers_match_lines(int stopped)
{
    int leavers = 0, unnamed[NROUTERS] = {0};
    size_t unanswered = 0;

    qsort(lines, nlines, sizeof(*lines), by_id);
    for (size_t i = 1; i < nlines; i++)
        cr_assert_str_neq(lines[i - 1].id, lines[i].id, "request id logged twice");
    for (size_t i = 0; i < nanswers; i++) {
        const struct answer *a = &answers[i];
        struct line *l;

        if (a->status <= 0) {
            unnamed[a->router] += a->status == -1;
            unanswered += a->status == 0;
            continue;
        }
        l = line_of(a->id);
        cr_assert_not_null(l, "answer %s (router %d, status %d) has no cost log line", a->id,
                           a->router, a->status);
        cr_assert_eq(l->router, a->router, "%s logged by router %d, answered by %d", a->id,
                     l->router, a->router);
        cr_assert_eq(l->seen, 0, "two answers with request id %s", a->id);
        cr_assert_eq(l->ci, a->ci, "%s: sent with ci %d, logged with ci %d", a->id, a->ci, l->ci);
        l->seen = 1;
        answer_cost_is_logged(a, l);
    }
    for (size_t i = 0; i < nlines; i++) {
        leavers += lines[i].status == 499;
        /* Not always 499: an answer may have gone out just after its
         * client left. */
        unnamed[lines[i].router] -= !lines[i].seen;
    }
    /* A router stopping may close a connection it never read from (in
     * the listen backlog still): a client that left before has no line. */
    for (int i = 0; i < NROUTERS; i++) {
        cr_assert(unnamed[i] == 0 || (stopped && unnamed[i] > 0),
                  "router %d: %d clients left unanswered and not logged", i, unnamed[i]);
        unanswered += (size_t)unnamed[i];
    }
    cr_assert_eq(nlines, nanswers - unanswered, "%zu cost log lines for %zu answers", nlines,
                 nanswers - unanswered);
    cr_assert_gt(leavers, 0, "no client left: the test proves less than it says");
}

/* Whether line `l` is charged to subject `s`. */
static int charged_to(const struct line *l, enum subject s)
{
    return s == S_TENANT || l->ci;
}

static long long logged_pico(enum subject s)
{
    long long sum = 0;

    for (size_t i = 0; i < nlines; i++)
        sum += charged_to(&lines[i], s) ? lines[i].cost_pico : 0;
    return sum;
}

static int by_excess_desc(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;

    return (x < y) - (x > y);
}

/* What a line was charged at most: its cost, plus the carry, is under
 * one micro-dollar more, so the cost rounded up. */
static long long charged_at_most(const struct line *l)
{
    return (l->cost_pico + 999999) / 1000000;
}

/* The sum of the k largest amounts by which lines charged to `s` were
 * charged beyond their holds. */
static long long largest_excesses(enum subject s, size_t k)
{
    long long *excess = calloc(nlines ? nlines : 1, sizeof(*excess)), sum = 0;
    size_t n = 0;

    cr_assert_not_null(excess);
    for (size_t i = 0; i < nlines; i++) {
        long long over = charged_at_most(&lines[i]) - lines[i].est_micro;

        if (charged_to(&lines[i], s))
            excess[n++] = over > 0 ? over : 0;
    }
    qsort(excess, n, sizeof(*excess), by_excess_desc);
    for (size_t i = 0; i < n && i < k; i++)
        sum += excess[i];
    free(excess);
    return sum;
}

/*
 * 2: the README's bound. A request is admitted only while the settled
 * spend plus the open holds plus its own hold fit the budget, so the
 * spend passes the budget at most by what the requests in flight at the
 * last admission were charged beyond their holds. With one request at a
 * time per client, at most NCLIENTS are in flight: the NCLIENTS largest
 * excesses bound it; for the key, at most its NCI clients' requests.
 */
static void budget_held_beside(enum subject s, long long spent, long long skew)
{
    long long bound = largest_excesses(s, s == S_TENANT ? NCLIENTS : NCI);

    cr_assert_leq(spent, budget_of(s) + bound + skew,
                  "%s spent %lld micro-USD, budget %lld + excess %lld + reconnect skew %lld",
                  subject_ids[s], spent, budget_of(s), bound, skew);
}

static void budget_held(const long long spent[S_N])
{
    for (int s = 0; s < S_N; s++)
        budget_held_beside(s, spent[s], 0);
}

/* ---- Redis ---- */

static long long redis_day_spend(enum subject s)
{
    return test_redis_day_spend(&redis, PREFIX, subject_ids[s]);
}

static long long redis_reserved(enum subject s)
{
    long long held = test_redis_int(&redis, "HGET " PREFIX "{%s}:open #", subject_ids[s]);

    return held < 0 ? 0 : held; /* no hash: nothing held */
}

/* The largest single hold open for the tenant in Redis (members of its
 * open hash are "INSTANCE-SEQ:AMOUNT"), 0 when none. */
static long long redis_largest_hold(void)
{
    static const char script[] =
        "local m = 0\n"
        "for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do\n"
        "  local a = tonumber(string.match(k, ':(%d+)$'))\n"
        "  if a and a > m then m = a end\n"
        "end\n"
        "return m\n";

    return test_redis_int(&redis, "EVAL %s 1 %s", script, PREFIX "{" TENANT "}:open");
}

/* Settles go to Redis after the answers: wait until nothing is held. */
static void wait_nothing_reserved(void)
{
    for (int s = 0; s < S_N; s++) {
        for (int tries = 0; tries < 250 && redis_reserved(s) != 0; tries++)
            usleep(20000);
        cr_assert_eq(redis_reserved(s), 0, "still reserved in Redis for %s", subject_ids[s]);
    }
}

/* Every router's admin API reports Redis's spend and nothing held. */
static void admin_spend_is_redis(long long spent)
{
    for (int i = 0; i < NROUTERS; i++) {
        struct support_http_response r = {0};
        cJSON *body;

        cr_assert_eq(http_get(routers[i].port, "/admin/tenants/" TENANT "/spend", &r), 0);
        body = cJSON_ParseWithLength(r.body.data, r.body.len);
        cr_assert_not_null(body);
        cr_assert_eq(llround(number_of(body, "day_usd") * 1e6), spent, "router %d", i);
        cr_assert_eq(llround(number_of(body, "reserved_usd") * 1e6), 0, "router %d", i);
        cr_assert(cJSON_IsFalse(cJSON_GetObjectItem(body, "degraded")), "router %d", i);
        cJSON_Delete(body);
        support_http_response_free(&r);
    }
}

/* 5: SIGTERM, exit 0, nothing left reserved. All are told at once; a
 * second SIGTERM from support_proc_stop changes nothing. */
static void stop_routers(void)
{
    for (int i = 0; i < NROUTERS; i++)
        if (routers[i].pid > 0) /* 0 once stopped, and kill(0) is our own group */
            kill(routers[i].pid, SIGTERM);
    for (int i = 0; i < NROUTERS; i++) {
        support_proc_stop(&routers[i]);
        cr_assert(support_proc_exited_cleanly(&routers[i]), "router %d: status %#x", i,
                  routers[i].status);
    }
    for (int s = 0; s < S_N; s++)
        cr_assert_eq(redis_reserved(s), 0, "reserved in Redis for %s after the stop",
                     subject_ids[s]);
}

/* Redis's spend of each subject. */
static void redis_spends(long long spent[S_N])
{
    for (int s = 0; s < S_N; s++)
        spent[s] = redis_day_spend(s);
}

/* 3 and 4, then 1 for each subject: the stopped routers' cost logs
 * against Redis's `spent`. `stopped`: they were stopped while their
 * clients ran. */
static void logs_agree_with(const long long spent[S_N], int stopped)
{
    for (int i = 0; i < NROUTERS; i++)
        read_cost_log(i);
    answers_match_lines(stopped);
    /* each router carries at most half a micro-dollar for each subject */
    for (int s = 0; s < S_N; s++)
        cr_assert_leq(llabs(spent[s] * 1000000 - logged_pico(s)), NROUTERS * 500000,
                      "%s: Redis %lld micro-USD, cost logs %.6f", subject_ids[s], spent[s],
                      logged_pico(s) / 1e12);
}

/* After the clients: the routers refuse, settle, stop; then 1, 3, 4.
 * Redis's spend of each subject in `spent`. */
static void finish_and_check(long long spent[S_N])
{
    every_router_refuses();
    wait_nothing_reserved();
    redis_spends(spent);
    admin_spend_is_redis(spent[S_TENANT]);
    stop_routers();
    for (int s = 0; s < S_N; s++)
        cr_assert_eq(redis_day_spend(s), spent[s], "%s: spend moved after the answers",
                     subject_ids[s]);
    logs_agree_with(spent, 0);
}

static void read_clients(int unanswered_ok)
{
    for (int c = 0; c < NCLIENTS; c++)
        read_client(c, unanswered_ok);
}

Test(multi, routers_sharing_redis_hold_the_budget_and_agree_with_their_cost_logs)
{
    pid_t pids[NCLIENTS];
    long long spent[S_N];

    start_all("", API_BACKEND, 0);
    start_clients(pids, 0);
    wait_clients(pids);
    read_clients(0);
    finish_and_check(spent);
    budget_held(spent);
    /* And refused for good only once a plain request no longer fit. */
    cr_assert_gt(spent[S_TENANT], budget_micro - PLAIN_HOLD, "spent only %lld micro-USD",
                 spent[S_TENANT]);
    /* The key's clients ran well into its budget before the tenant's ran
     * out. Not to the last plain request: near the end their own holds
     * (some 15 in flight, a guess's ~1900 micro-USD) fill most of its
     * budget, so they are told to retry while the web clients spend the
     * tenant's; under ASan they stopped at 91% once. */
    cr_assert_gt(spent[S_KEY], key_budget_micro / 2, "the key spent only %lld micro-USD",
                 spent[S_KEY]);
}

/* The same in front of a GPU pool: each request costs its share of the
 * pool's time, which may pass its hold whether it says max_tokens or not. */
Test(multi, routers_sharing_a_gpu_pool_hold_the_budget_and_agree_with_their_cost_logs)
{
    pid_t pids[NCLIENTS];
    long long spent[S_N];

    /* A request costs some 4400 micro-USD of the pool's time and the
     * tenant's budget goes in a fraction of a second: a tenth of it for
     * the key would go with its first requests, and its leavers' with
     * them (some run had then no leaver at all). */
    key_budget_micro = budget_micro / 2;
    start_all("", POOL_BACKEND, 0);
    start_clients(pids, 0);
    wait_clients(pids);
    read_clients(0);
    finish_and_check(spent);
    budget_held(spent);
}

/* Until a quarter of the budget is spent (15 s at most). On a loaded
 * machine the test may see it only later. */
static void wait_quarter_spent(void)
{
    for (int tries = 0; tries < 1500 && redis_day_spend(S_TENANT) < budget_micro / 4; tries++)
        usleep(10000);
}

/* The routers stop (SIGTERM) while their clients keep sending: requests
 * in flight end, answered and logged; the rest get no answer and leave no
 * line. The stop leaves nothing reserved. */
Test(multi, routers_stopped_mid_run_leave_nothing_reserved_and_agree_with_their_cost_logs)
{
    pid_t pids[NCLIENTS];
    long long spent[S_N];

    start_all("", API_BACKEND, 0);
    start_clients(pids, 0);
    wait_quarter_spent();
    stop_routers();
    wait_clients(pids);
    read_clients(1);
    redis_spends(spent);
    logs_agree_with(spent, 1);
}

/* A chat request to router 0 of `tokens` completion tokens (max_tokens
 * too, so that its hold is its cost) answered after `ttft_ms`, sent on
 * `conn` without reading the answer. */
static void send_chat(struct support_http_conn *conn, int tokens, int ttft_ms)
{
    char headers[256], body[256];
    struct buf q = {0};

    snprintf(headers, sizeof(headers),
             AUTH "x-mock-tokens: %d\r\nx-mock-ttft-ms: %d\r\nx-mock-token-delay-ms: 0\r\n", tokens,
             ttft_ms);
    snprintf(body, sizeof(body), "{\"model\":\"chat\",\"max_tokens\":%d," MSG "}", tokens);
    cr_assert_eq(support_http_format(&q, "POST", "/v1/chat/completions", headers, body), 0);
    cr_assert_eq(support_http_connect(conn, routers[0].port), 0);
    cr_assert_eq(support_http_send(conn, q.data, q.len), 0);
    buf_free(&q);
}

static int chat_status(int tokens)
{
    struct support_http_conn conn;
    struct support_http_response r = {0};
    int status;

    send_chat(&conn, tokens, 0);
    cr_assert_eq(support_http_read(&conn, &r, TIMEOUT_MS), 0);
    status = r.status;
    support_http_close(&conn);
    support_http_response_free(&r);
    return status;
}

/* How Redis goes away in the middle of a run. */
enum outage {
    FREEZE,  /* SIGSTOP, later SIGCONT: connections hang */
    RESTART, /* SIGKILL, later started again on its append-only file */
};

static int store_up_is(int router, int up)
{
    char want[64];

    snprintf(want, sizeof(want), "\ncostrouter_store_up{store=\"redis\"} %d\n", up);
    return metrics_have(router, want);
}

/* Wait until router `router` counts `n` routers sharing Redis (each
 * renews its mark every second; one that stops removes it). */
static void wait_instances(int router, int n)
{
    char want[80];

    snprintf(want, sizeof(want), "\ncostrouter_store_instances{store=\"redis\"} %d\n", n);
    cr_assert(metrics_have_within(router, want, 250), "router %d does not count %d routers",
              router, n);
}

/*
 * Whatever the clients do meanwhile, one request goes through the journal:
 * the test's own to router 0, held in Redis just before Redis goes away
 * and ending 1.2 s later, within the outage. It holds 30130 micro-USD
 * (1000 tokens), more than any client's, so that the wait sees its hold:
 * as a hold of its own, since the clients' together, still making their
 * first requests, may reach as much for a moment (the wait then passed
 * and the check after it failed).
 */
static void hold_across(struct support_http_conn *slow)
{
    send_chat(slow, 1000, 1200);
    for (int tries = 0; tries < 500 && redis_largest_hold() < 30130; tries++)
        usleep(10000);
    cr_assert_eq(redis_largest_hold(), 30130, "the test's request holds nothing in Redis");
}

/* Its answer, as a client's. */
static void hold_across_answered(struct support_http_conn *slow)
{
    struct support_http_response r = {0};
    struct answer a = answer_new(0, K_PLAIN);

    cr_assert_eq(support_http_read(slow, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    note_answer(&a, &r);
    a.head = micro_of(support_http_header(&r, "x-costrouter-cost-usd"));
    add_answer(&a);
    support_http_close(slow);
    support_http_response_free(&r);
}

/* When Redis went away and came back, in the routers' log clock. */
static long long outage_ms, back_ms;

static long long wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Once the clients have made PHASE_ONE requests each, they go on and
 * Redis goes away for 1.5 s: longer than the command timeout, so the
 * routers take it for down, serve or refuse as store.on_failure says, and
 * journal the charges. A router notices when a command of its times out,
 * and a loaded machine may take a while to let it: one that does within
 * the 1.5 s is enough here. */
static void outage_midway(enum outage how, struct support_http_conn *slow)
{
    double until;
    int noticed = 0;
    long long spent = redis_day_spend(S_TENANT);

    hold_across(slow);
    clients_go();
    until = mono_s() + 1.5;
    outage_ms = wall_ms();
    test_redis_kill(&redis, how == FREEZE ? SIGSTOP : SIGKILL);
    while (!noticed && mono_s() < until - 0.1) {
        usleep(50000);
        noticed = store_up_is(0, 0) || store_up_is(1, 0) || store_up_is(2, 0);
    }
    cr_assert(noticed, "Redis is away (%lld of %lld micro-USD spent), yet every router has it up",
              spent, budget_micro);
    usleep((useconds_t)(fmax(until - mono_s(), 0) * 1e6));
    if (how == FREEZE)
        test_redis_kill(&redis, SIGCONT);
    else
        cr_assert_eq(test_redis_restart(&redis), 0);
    back_ms = wall_ms();
}

static int journaled(void)
{
    char path[192];
    int n = 0;

    for (int i = 0; i < NROUTERS; i++) {
        snprintf(path, sizeof(path), "%s/router-%d.log", dir, i);
        n += support_log_count(path, "charges are journaled");
    }
    return n;
}

/* How router `router` lived through the outage, from its log. */
struct reconnect {
    long long connected_ms; /* back on Redis: the last connect since the outage,
                             * or when Redis came back if it never lost it */
    long long first_ms;     /* its first connect since the outage (or as above) */
    long long journal;      /* micro-USD it wrote back from its journal (the most
                             * one write-back line names), 0: none */
};

static void read_reconnect(int router, struct reconnect *out)
{
    char path[192], line[1024];
    const char *wb;
    long long ms, amount;
    int lost = 0;
    FILE *f;

    snprintf(path, sizeof(path), "%s/router-%d.log", dir, router);
    f = fopen(path, "r");
    cr_assert_not_null(f, "%s", path);
    *out = (struct reconnect){-1, -1, 0};
    while (fgets(line, sizeof(line), f) != NULL) {
        ms = log_line_ms(line);
        if (ms < outage_ms)
            continue;
        if (strstr(line, "store: lost Redis") != NULL) {
            lost = 1;
        } else if (strstr(line, "store: connected to Redis") != NULL) {
            out->connected_ms = ms;
            if (out->first_ms < 0)
                out->first_ms = ms;
        } else if ((wb = strstr(line, "store: writing back ")) != NULL &&
                   sscanf(wb, "store: writing back %*[0-9] journaled charges (%lld", &amount) == 1 &&
                   amount > out->journal) {
            out->journal = amount;
        }
    }
    fclose(f);
    if (!lost || out->connected_ms < 0)
        out->connected_ms = out->first_ms = back_ms;
}

/* What router `router`'s cost log says it charged to `s` for requests
 * that started from `from_ms` to `to_ms` (micro-USD, rounded up). */
static long long charged_between(int router, enum subject s, long long from_ms, long long to_ms)
{
    long long pico = 0;

    for (size_t i = 0; i < nlines; i++)
        if (lines[i].router == router && charged_to(&lines[i], s) && lines[i].ts_ms >= from_ms &&
            lines[i].ts_ms <= to_ms)
            pico += lines[i].cost_pico;
    return (pico + 999999) / 1000000;
}

/*
 * What README Status allows beyond budget_held under fail_open: a router
 * still on its own counters while another is back on Redis's exact
 * counts, which miss the first one's journaled spend, lets the budget pass
 * by that spend (at most its share). A router writes its journal back as
 * it reconnects, before it admits anything there, so router d's journal
 * is missed only by what the routers back before it admitted meanwhile:
 * the requests they started from their reconnect to d's (20 ms more, for
 * d's write-back to reach Redis on a loaded machine). Each router retries
 * on its own backoff (100 ms doubling, with jitter): when their last
 * failed attempts fell alike, they reconnect within a few ms and this is
 * a few requests; when one's fell just before Redis came back, its next
 * comes up to a second after the others'.
 *
 * The same for subject `s`: what the others admitted for it meanwhile.
 * The write-back's log line gives the journal's whole amount, every
 * subject's (each request of the key is in it twice, tenant and key), so
 * for the key that cap is looser than its own journal.
 */
static long long reconnect_skew(enum subject s)
{
    struct reconnect r[NROUTERS];
    long long skew = 0;

    for (int i = 0; i < NROUTERS; i++)
        read_reconnect(i, &r[i]);
    for (int d = 0; d < NROUTERS; d++) {
        long long missed = 0;

        for (int j = 0; j < NROUTERS; j++)
            if (j != d && r[j].first_ms < r[d].connected_ms + 20)
                missed += charged_between(j, s, r[j].first_ms, r[d].connected_ms + 20);
        if (missed > r[d].journal)
            missed = r[d].journal;
        if (missed > 0)
            cr_log_info("router %d back on Redis after others, %lld micro-USD journaled, "
                        "%lld admitted for %s by the others meanwhile",
                        d, r[d].journal, missed, subject_ids[s]);
        skew += missed;
    }
    return skew;
}

/*
 * What fail_open promises while Redis is away: each router admits against
 * its share of what Redis last told it was left of the budget (1/3 here,
 * once all three count each other), plus what it spends and holds itself,
 * so together they pass the budget only as in budget_held, and by the
 * reconnect skew when they come back to Redis one after the other.
 * Before the shares each router could spend all that was left: up to 3x.
 *
 * A run with an outage midway, with `on_failure` as the store's. The
 * clients take a 503 store_unavailable as a 429 worth a retry. The budget
 * is four times the others', so that the first PHASE_ONE requests of each
 * client spend only some of it; the key's a fifth of it, so that some
 * of the key's is left for the outage too. */
static void run_with_outage(const char *on_failure, enum outage how)
{
    char store[128];
    pid_t pids[NCLIENTS];
    struct support_http_conn slow;
    long long spent[S_N];

    budget_micro = 4 * BUDGET_MICRO;
    key_budget_micro = budget_micro / 5;
    snprintf(store, sizeof(store), ", on_failure: %s, command_timeout_ms: 200", on_failure);
    start_all(store, API_BACKEND, how == RESTART);
    for (int i = 0; i < NROUTERS; i++)
        wait_instances(i, NROUTERS);
    start_clients(pids, 1);
    outage_midway(how, &slow);
    wait_clients(pids);
    for (int i = 0; i < NROUTERS; i++)
        wait_store_up(i);
    read_clients(0);
    hold_across_answered(&slow);
    cr_assert_gt(journaled(), 0, "Redis was away, yet no charge was journaled");
    finish_and_check(spent);
    for (int s = 0; s < S_N; s++)
        budget_held_beside(s, spent[s], strcmp(on_failure, "fail_open") == 0 ? reconnect_skew(s) : 0);
}

Test(multi, a_frozen_redis_under_fail_open_still_agrees_with_the_cost_logs)
{
    run_with_outage("fail_open", FREEZE);
}

Test(multi, a_restarted_redis_under_fail_open_still_agrees_with_the_cost_logs)
{
    run_with_outage("fail_open", RESTART);
}

Test(multi, a_frozen_redis_under_fail_closed_still_agrees_with_the_cost_logs)
{
    run_with_outage("fail_closed", FREEZE);
}

/*
 * A router serving from its own counters (Redis frozen, fail_open) counts
 * the holds it made in Redis before, for requests still in flight: else
 * it let others take the money one of them holds, and the spend passed
 * the budget by that hold, though every request cost exactly its hold.
 * Router 0 alone (the others stopped, and gone from its count), so that
 * it may use all that is left, not a third.
 */
Test(multi, serving_from_local_counters_counts_the_holds_made_in_redis)
{
    struct support_http_conn slow;
    struct support_http_response r = {0};
    int granted = 0;

    start_all(", on_failure: fail_open, command_timeout_ms: 200", API_BACKEND, 0);
    support_proc_stop(&routers[1]);
    support_proc_stop(&routers[2]);
    wait_instances(0, 1);
    /* 1000 tokens: 90 + 30040 micro-USD, half the budget, for 3 s. */
    send_chat(&slow, 1000, 3000);
    for (int tries = 0; tries < 250 && redis_reserved(S_TENANT) == 0; tries++)
        usleep(10000);
    cr_assert_eq(redis_reserved(S_TENANT), 30130, "the slow request's hold is not in Redis");
    test_redis_kill(&redis, SIGSTOP);
    while (granted < 200 && chat_status(10) == 200)
        granted++;
    cr_assert_eq(support_http_read(&slow, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    support_http_close(&slow);
    support_http_response_free(&r);
    test_redis_kill(&redis, SIGCONT);
    wait_store_up(0);
    stop_routers(); /* the journal written back */
    cr_assert_leq(redis_day_spend(S_TENANT), budget_micro, "%d requests of 390.4 micro-USD admitted",
                  granted);
}

/*
 * A settle whose reply was lost (Redis frozen past the command timeout)
 * is journaled as "charge it if Redis still holds its hold" (it may have
 * been applied). Its write-back fails on the connection made when Redis
 * came back (the tenant's day key is a hash: WRONGTYPE), so it is retried
 * on that live connection; meanwhile Redis is flushed (FLUSHALL), which
 * takes the hold, the bad key and the mark PREFIXepoch. The retry found no
 * hold and charged nothing: the mark was read only by the connection's
 * setup, before the flush. It is read again before each retry, and the
 * flushed Redis is charged the settle.
 */
Test(multi, a_maybe_applied_settle_is_charged_after_a_flushall_on_a_live_connection)
{
    static const char empty[] = "\ncostrouter_store_journal_entries{store=\"redis\"} 0\n";
    struct support_http_conn slow;
    struct support_http_response r = {0};
    char day[16];
    time_t now = time(NULL);
    struct tm tm;

    gmtime_r(&now, &tm);
    strftime(day, sizeof(day), "%Y%m%d", &tm);
    start_all(", on_failure: fail_open, command_timeout_ms: 200", API_BACKEND, 0);
    support_proc_stop(&routers[1]);
    support_proc_stop(&routers[2]);
    send_chat(&slow, 10, 600);
    for (int tries = 0; tries < 250 && redis_reserved(S_TENANT) == 0; tries++)
        usleep(10000);
    cr_assert_gt(redis_reserved(S_TENANT), 0, "the request's hold is not in Redis");
    cr_assert_eq(test_redis_int(&redis, "HSET " PREFIX "{" TENANT "}:d:%s x 1", day), 1);
    test_redis_kill(&redis, SIGSTOP);
    cr_assert_eq(support_http_read(&slow, &r, TIMEOUT_MS), 0);
    cr_assert_eq(r.status, 200);
    support_http_close(&slow);
    support_http_response_free(&r);
    usleep(400 * 1000); /* the settle's reply is past its timeout */
    test_redis_kill(&redis, SIGCONT);
    wait_store_up(0);
    usleep(300 * 1000); /* the first write-back was refused: WRONGTYPE */
    cr_assert_eq(test_redis_day_spend(&redis, PREFIX, TENANT), -1, "the day key is a hash");
    cr_assert_gt(redis_reserved(S_TENANT), 0, "the hold is still in Redis");
    cr_assert_not(metrics_have(0, empty), "the settle is not journaled");
    cr_assert_eq(test_redis_int(&redis, "FLUSHALL"), -1); /* +OK, not a number */
    cr_assert(metrics_have_within(0, empty, 400), "the journal was not written back");
    cr_assert_eq(redis_day_spend(S_TENANT), PLAIN_HOLD - 1,
                 "the flushed Redis was not charged the settle (390.4 micro-USD)");
}

/*
 * A router told to stop while Redis has yet to answer a reservation whose
 * client has left waits for that answer and releases the reservation,
 * rather than leave it held in Redis until it expires: once no request is
 * in flight the router stops, and closing its store had dropped the
 * connection with the reservation's command in it, which Redis then ran.
 */
Test(multi, a_router_stopping_releases_a_hold_whose_client_left)
{
    struct support_http_conn gone;

    start_all(", command_timeout_ms: 2000", API_BACKEND, 0);
    test_redis_kill(&redis, SIGSTOP);
    send_chat(&gone, 10, 0); /* its reservation waits in Redis's socket */
    usleep(100 * 1000);
    support_http_close(&gone);
    usleep(100 * 1000);
    kill(routers[0].pid, SIGTERM);
    usleep(300 * 1000);
    test_redis_kill(&redis, SIGCONT);
    support_proc_stop(&routers[0]);
    cr_assert(support_proc_exited_cleanly(&routers[0]), "status %#x", routers[0].status);
    usleep(100 * 1000); /* what Redis read before the router left, it runs */
    cr_assert_eq(redis_reserved(S_TENANT), 0, "held in Redis after the stop");
}
