/*
 * tests/router/test_fdlimit.c: the router against its open-file limit,
 * as a real process in front of a real mockllm. The limit is set on the
 * router process itself: inherited from this test at exec (setrlimit
 * before support_proc_start) or changed while it runs (prlimit(2)).
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"
#include "tests/support/proc.h"

#define TIMEOUT_MS 5000
#define TENANT_KEY "sk-fd-tenant"
#define AUTH "Authorization: Bearer " TENANT_KEY "\r\n"
#define ADMIN "Authorization: Bearer adm-fd-secret\r\n"
#define CHAT "{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]}"

static struct support_proc router, mock;
static struct support_http_conn conns[96];
static struct support_http_response resp;
static struct buf req;
static cJSON *json;
static char conf_path[64];

static void setup(void)
{
    for (size_t i = 0; i < sizeof(conns) / sizeof(conns[0]); i++)
        conns[i].fd = -1;
}

static void teardown(void)
{
    support_proc_stop(&router);
    support_proc_stop(&mock);
    for (size_t i = 0; i < sizeof(conns) / sizeof(conns[0]); i++)
        support_http_close(&conns[i]);
    support_http_response_free(&resp);
    buf_free(&req);
    cJSON_Delete(json);
    if (conf_path[0])
        unlink(conf_path);
}

TestSuite(fdlimit, .init = setup, .fini = teardown, .timeout = 60);

/* A mock, and the router in front of it with `limits` (YAML, may be "")
 * and the open-file limit `soft`:`hard` (0: this process's own), set by
 * util-linux's prlimit(1) before it execs the router: lowering our own
 * hard limit could not be undone without CAP_SYS_RESOURCE. */
static void start(const char *limits, rlim_t soft, rlim_t hard)
{
    char *bin = getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter";
    char nofile[64];
    char *plain[] = {bin, "-q", "-c", conf_path, NULL};
    char *limited[] = {"prlimit", nofile, bin, "-q", "-c", conf_path, NULL};
    char hex[65];
    FILE *f;
    int fd;

    cr_assert_eq(support_mockllm_start(&mock, NULL), 0);
    support_key_sha256_hex(TENANT_KEY, hex);
    strcpy(conf_path, "/tmp/costrouter-fd-XXXXXX");
    cr_assert_geq(fd = mkstemp(conf_path), 0);
    close(fd);
    cr_assert_not_null(f = fopen(conf_path, "w"));
    fprintf(f,
            "listen: 127.0.0.1:0\n"
            "admin_key: adm-fd-secret\n"
            "%s"
            "backends:\n"
            "  - name: a\n"
            "    kind: api\n"
            "    url: http://127.0.0.1:%d/v1\n"
            "    model: upstream-a\n"
            "    quality: 1\n"
            "    context_window: 1000000\n"
            "    input_usd_per_mtok: 1\n"
            "    output_usd_per_mtok: 2\n"
            "routes:\n"
            "  - model: chat\n"
            "    candidates: [a]\n"
            "tenants:\n"
            "  - id: t1\n"
            "    api_keys: [\"sha256:%s\"]\n",
            limits, mock.port, hex);
    fclose(f);
    snprintf(nofile, sizeof(nofile), "--nofile=%llu:%llu", (unsigned long long)soft,
             (unsigned long long)hard);
    cr_assert_eq(support_proc_start(&router, soft ? limited : plain), 0, "router did not start");
}

/* One request on conns[i] (connected if it is not), answer in resp. */
static int call(int i, const char *method, const char *path, const char *headers,
                const char *body)
{
    int rc;

    if (conns[i].fd < 0 && (rc = support_http_connect(&conns[i], router.port)) != 0)
        return rc;
    buf_reset(&req);
    cr_assert_eq(support_http_format(&req, method, path, headers, body), 0);
    if ((rc = support_http_send(&conns[i], req.data, req.len)) != 0)
        return rc;
    return support_http_read(&conns[i], &resp, TIMEOUT_MS);
}

static cJSON *body_json(void)
{
    cJSON_Delete(json);
    json = cJSON_ParseWithLength(resp.body.data, resp.body.len);
    cr_assert_not_null(json, "body is not JSON: %.*s", (int)resp.body.len, resp.body.data);
    return json;
}

/* Backend a's entry in /admin/backends, asked on conns[i]. */
static const cJSON *backend_a(int i)
{
    cr_assert_eq(call(i, "GET", "/admin/backends", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    return cJSON_GetArrayItem(body_json(), 0);
}

/* The unlabelled series `name` of /metrics, asked on conns[i]. */
static double metric(int i, const char *name)
{
    double v;

    cr_assert_eq(call(i, "GET", "/metrics", ADMIN, NULL), 0);
    cr_assert_eq(resp.status, 200);
    v = support_metrics_value(&resp, name);
    cr_assert(!isnan(v), "%s not in /metrics", name);
    return v;
}

/* "Max open files" soft limit of process `pid`, from /proc. */
static long open_file_limit(pid_t pid)
{
    char path[64], line[256];
    long soft = -1;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/limits", (int)pid);
    cr_assert_not_null(f = fopen(path, "r"));
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "Max open files", 14) == 0)
            soft = strtol(line + 14, NULL, 10);
    fclose(f);
    return soft;
}

/* 1 when the router has closed conns[i] (EOF or reset) within TIMEOUT_MS. */
static int closed_by_router(int i)
{
    struct pollfd pfd = {.fd = conns[i].fd, .events = POLLIN};
    char scratch[256];

    while (poll(&pfd, 1, TIMEOUT_MS) == 1)
        if (recv(conns[i].fd, scratch, sizeof(scratch), 0) <= 0)
            return 1;
    return 0;
}

/* The lowest descriptor number `pid` has free: as its soft limit, no
 * new descriptor can be opened (they take the lowest free number). */
static rlim_t lowest_free_fd(pid_t pid)
{
    char path[64];
    unsigned char used[4096] = {0};
    struct dirent *e;
    DIR *d;

    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    cr_assert_not_null(d = opendir(path));
    while ((e = readdir(d)) != NULL) {
        long n = strtol(e->d_name, NULL, 10);

        if (e->d_name[0] != '.' && n >= 0 && n < (long)sizeof(used))
            used[n] = 1;
    }
    closedir(d);
    for (size_t n = 0; n < sizeof(used); n++)
        if (!used[n])
            return n;
    cr_assert_fail("no free descriptor numbers");
    return 0;
}

Test(fdlimit, soft_limit_raised_to_what_max_connections_needs)
{
    /* 2 per client + 64 idle upstream connections + 32 */
    start("limits: { max_connections: 1000 }\n", 256, 8192);
    cr_assert_eq(open_file_limit(router.pid), 2 * 1000 + 64 + 32);
    cr_assert_eq(call(0, "POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200);
}

Test(fdlimit, clients_past_what_the_hard_limit_allows_are_refused_and_counted)
{
    /* (200 - 64 idle - 32) / 4 * 3 = 78 clients, though max_connections is 20000 */
    start("", 200, 200);
    for (int i = 0; i < 78; i++)
        cr_assert_eq(support_http_connect(&conns[i], router.port), 0);
    cr_assert_eq(call(77, "POST", "/v1/chat/completions", AUTH, CHAT), 0,
                 "the 78th client was not served");
    cr_assert_eq(resp.status, 200);
    cr_assert_eq(support_http_connect(&conns[78], router.port), 0); /* the kernel's accept */
    cr_assert(closed_by_router(78), "the 79th client was kept");

    support_http_close(&conns[0]);
    support_http_close(&conns[78]);
    /* Room again: the refusal was counted, and a new client is served. */
    for (int tries = 0; tries < 50 && conns[90].fd < 0; tries++) {
        if (call(90, "GET", "/healthz", "", NULL) != 0) {
            support_http_close(&conns[90]); /* refused: conns[0]'s close not seen yet */
            usleep(20000);
        }
    }
    cr_assert_eq(resp.status, 200);
    cr_assert_geq(metric(90, "costrouter_client_connections_refused_total"), 1);
}

Test(fdlimit, out_of_descriptors_is_a_503_of_the_router_not_a_failure_of_the_backend)
{
    struct rlimit full;
    const cJSON *err, *a;

    start("", 0, 0);
    cr_assert_eq(support_http_connect(&conns[0], router.port), 0);
    cr_assert_eq(call(0, "GET", "/healthz", "", NULL), 0); /* accepted and read: its fd is open */
    cr_assert_eq(prlimit(router.pid, RLIMIT_NOFILE, NULL, &full), 0);
    struct rlimit none_left = {lowest_free_fd(router.pid), full.rlim_max};

    /* Not even one: no upstream connection can be opened, and none is
     * pooled (no request went upstream yet). More attempts than the 3
     * failures that open a backend's circuit. */
    cr_assert_eq(prlimit(router.pid, RLIMIT_NOFILE, &none_left, NULL), 0);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(call(0, "POST", "/v1/chat/completions", AUTH, CHAT), 0);
        cr_assert_eq(resp.status, 503, "%.*s", (int)resp.body.len, resp.body.data);
        cr_assert_str_eq(support_http_header(&resp, "retry-after"), "1");
        err = cJSON_GetObjectItem(body_json(), "error");
        cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(err, "code")),
                         "router_overloaded");
        cr_assert_not_null(strstr(cJSON_GetStringValue(cJSON_GetObjectItem(err, "message")),
                                  "open-file limit"));
    }
    cr_assert_eq(prlimit(router.pid, RLIMIT_NOFILE, &full, NULL), 0);

    a = backend_a(0);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(a, "circuit")), "closed");
    cr_assert_eq(cJSON_GetNumberValue(cJSON_GetObjectItem(a, "consecutive_failures")), 0);
    cr_assert_eq(call(0, "POST", "/v1/chat/completions", AUTH, CHAT), 0);
    cr_assert_eq(resp.status, 200, "%.*s", (int)resp.body.len, resp.body.data);
}
