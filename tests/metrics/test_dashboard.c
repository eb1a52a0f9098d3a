/*
 * tests/metrics/test_dashboard.c: the embedded dashboard rendered by a real
 * headless Chromium. A loopback HTTP server in this test serves the page
 * from metrics_dashboard() and canned admin JSON plus a /metrics text made
 * by metrics_render(); the data endpoints demand the Bearer admin key.
 * `chromium --dump-dom` must show the numbers those answers imply.
 * Chromium comes from mk/dashboard.mk (make deps); without it this fails.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "metrics/metrics.h"
#include "tests/support/browser.h"

extern char **environ;

#define ADMIN_KEY "test-admin-key-5c1f"

static const char tenants_json[] =
    "[{\"tenant\":\"acme\",\"day_usd\":12.5,\"month_usd\":250,\"day_budget_usd\":100,\"month_budget_usd\":2000,"
    "\"keys\":[{\"name\":\"ci\",\"day_usd\":4,\"month_usd\":40,\"day_budget_usd\":5,\"month_budget_usd\":0}]},"
    "{\"tenant\":\"globex\",\"day_usd\":7.25,\"month_usd\":99,\"day_budget_usd\":5,\"month_budget_usd\":0}]";
static const char backends_json[] =
    "[{\"backend\":\"gpt-4o\",\"kind\":\"api\",\"state\":\"healthy\",\"inflight\":3},"
    "{\"backend\":\"gpu-a\",\"kind\":\"self_hosted\",\"state\":\"ejected\",\"inflight\":0}]";

struct server {
    int fd;                  /* listening socket */
    uint16_t port;           /* its port */
    pthread_t thread;        /* accept loop */
    atomic_int stop;         /* set to end the accept loop */
    atomic_int authorized;   /* data requests with the right key */
    atomic_int unauthorized; /* data requests without it */
    struct buf metrics;      /* /metrics body */
};

struct conn {
    struct server *srv; /* owner */
    int fd;             /* accepted socket */
};

static void reply(int fd, const char *status, const char *type, const char *body, size_t len)
{
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                     status, type, len);

    if (write(fd, head, (size_t)n) != n || write(fd, body, len) != (ssize_t)len)
        return; /* the browser went away; nothing to assert here */
}

/* One connection: read the head (5 s at most), answer, close. */
static void *serve(void *arg)
{
    struct conn *c = arg;
    struct server *srv = c->srv;
    char req[8192], path[256] = "";
    size_t len = 0;

    while (len < sizeof(req) - 1 && !memmem(req, len, "\r\n\r\n", 4)) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        ssize_t n;
        if (poll(&p, 1, 5000) <= 0 || (n = read(c->fd, req + len, sizeof(req) - 1 - len)) <= 0)
            goto done;
        len += (size_t)n;
    }
    req[len] = '\0';
    if (sscanf(req, "GET %255s ", path) != 1)
        goto done;
    if (strcmp(path, "/dashboard") == 0) {
        size_t n;
        const char *page = metrics_dashboard(&n);
        reply(c->fd, "200 OK", "text/html; charset=utf-8", page, n);
        goto done;
    }
    int ok = strcasestr(req, "\r\nAuthorization: Bearer " ADMIN_KEY "\r\n") != NULL;
    if (strcmp(path, "/admin/tenants") == 0 || strcmp(path, "/admin/backends") == 0 ||
        strcmp(path, "/metrics") == 0) {
        atomic_fetch_add(ok ? &srv->authorized : &srv->unauthorized, 1);
        if (!ok)
            reply(c->fd, "401 Unauthorized", "application/json", "{}", 2);
        else if (strcmp(path, "/admin/tenants") == 0)
            reply(c->fd, "200 OK", "application/json", tenants_json, strlen(tenants_json));
        else if (strcmp(path, "/admin/backends") == 0)
            reply(c->fd, "200 OK", "application/json", backends_json, strlen(backends_json));
        else
            reply(c->fd, "200 OK", metrics_content_type, srv->metrics.data, srv->metrics.len);
        goto done;
    }
    reply(c->fd, "404 Not Found", "text/plain", "", 0);
done:
    close(c->fd);
    free(c);
    return NULL;
}

static void *accept_loop(void *arg)
{
    struct server *srv = arg;

    while (!atomic_load(&srv->stop)) {
        struct pollfd p = {.fd = srv->fd, .events = POLLIN};
        if (poll(&p, 1, 100) <= 0)
            continue;
        int fd = accept(srv->fd, NULL, NULL);
        if (fd < 0)
            continue;
        struct conn *c = malloc(sizeof(*c));
        pthread_t t;
        c->srv = srv;
        c->fd = fd;
        if (pthread_create(&t, NULL, serve, c) != 0) {
            close(fd);
            free(c);
            continue;
        }
        pthread_detach(t);
    }
    return NULL;
}

/* /metrics as the router would render it. */
static void fill_metrics(struct buf *out)
{
    struct metrics *m = metrics_create(0);

    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, (const char *[]){"acme", "gpt-4o", "chat", "200"}, 80), 0);
    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, (const char *[]){"globex", "gpt-4o", "chat", "200"}, 20), 0);
    cr_assert_eq(metrics_add(m, METRICS_REQUESTS_TOTAL, (const char *[]){"acme", "gpu-a", "chat", "200"}, 50), 0);
    cr_assert_eq(metrics_add(m, METRICS_COST_USD_TOTAL, (const char *[]){"acme", "gpt-4o", "chat"}, 1.0), 0);
    cr_assert_eq(metrics_add(m, METRICS_COST_USD_TOTAL, (const char *[]){"globex", "gpt-4o", "chat"}, 0.25), 0);
    cr_assert_eq(metrics_add(m, METRICS_COST_USD_TOTAL, (const char *[]){"acme", "gpu-a", "chat"}, 0.5), 0);
    cr_assert_eq(metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){"acme"}, 30), 0);
    cr_assert_eq(metrics_add(m, METRICS_CACHE_SAVED_USD_TOTAL, (const char *[]){"acme"}, 3.5), 0);
    cr_assert_eq(metrics_add(m, METRICS_CACHE_HITS_TOTAL, (const char *[]){"glo\"bex"}, 2), 0);
    cr_assert_eq(metrics_add(m, METRICS_CACHE_SAVED_USD_TOTAL, (const char *[]){"glo\"bex"}, 0.25), 0);
    cr_assert_eq(metrics_observe(m, METRICS_TTFT_SECONDS, (const char *[]){"gpu-a"}, 0.2), 0);
    cr_assert_eq(metrics_render(m, out), 0);
    metrics_free(m);
}

static void server_start(struct server *srv)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);

    fill_metrics(&srv->metrics);
    srv->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(srv->fd, 0);
    cr_assert_eq(bind(srv->fd, (struct sockaddr *)&a, sizeof(a)), 0);
    cr_assert_eq(listen(srv->fd, 64), 0);
    cr_assert_eq(getsockname(srv->fd, (struct sockaddr *)&a, &alen), 0);
    srv->port = ntohs(a.sin_port);
    cr_assert_eq(pthread_create(&srv->thread, NULL, accept_loop, srv), 0);
}

static void server_stop(struct server *srv)
{
    atomic_store(&srv->stop, 1);
    pthread_join(srv->thread, NULL);
    close(srv->fd);
    buf_free(&srv->metrics);
}

/* The serialized DOM must contain this exact markup. */
static void expect_text(const char *dom, const char *needle)
{
    cr_assert_not_null(strstr(dom, needle), "DOM lacks %s", needle);
}

Test(dashboard, chromium_renders_the_numbers, .timeout = 90)
{
    struct server srv = {0};
    char url[128], profile[] = "/tmp/dashboard-chromium-XXXXXX", cmd[128];

    cr_assert_not_null(mkdtemp(profile));
    server_start(&srv);
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/dashboard#key=%s", srv.port, ADMIN_KEY);
    char *dom = support_dump_dom(url, profile);
    server_stop(&srv);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", profile);
    (void)system(cmd);

    cr_assert_gt(atomic_load(&srv.authorized), 2, "the page fetched the admin API");
    cr_assert_eq(atomic_load(&srv.unauthorized), 0, "every fetch carried the Bearer key");
    /* spend vs budget per tenant */
    expect_text(dom, "<td>acme</td><td>day</td><td class=\"num\">$12.50</td><td class=\"num\">$100.00</td>");
    expect_text(dom, "<td></td><td>month</td><td class=\"num\">$250.00</td><td class=\"num\">$2000.00</td>");
    expect_text(dom, "<td>globex</td><td>day</td><td class=\"num\">$7.25</td><td class=\"num\">$5.00</td>");
    expect_text(dom, "<td class=\"num\">none</td>"); /* globex has no monthly budget */
    /* a key with a budget of its own, under its tenant */
    expect_text(dom, "<td>\u2514 key ci</td><td>day</td><td class=\"num\">$4.00</td><td class=\"num\">$5.00</td>");
    expect_text(dom, "style=\"width: 12.5%;\""); /* acme day bar */
    expect_text(dom, "class=\"over\""); /* globex is over its daily budget */
    /* cost per request by backend: 1.25 / 100 and 0.5 / 50 */
    expect_text(dom, "<td>gpt-4o</td><td class=\"num\">100</td><td class=\"num\">$1.25</td><td class=\"num\">$0.0125</td>");
    expect_text(dom, "<td>gpu-a</td><td class=\"num\">50</td><td class=\"num\">$0.5000</td><td class=\"num\">$0.0100</td>");
    expect_text(dom, "<polyline"); /* refreshed more than once: a line per backend */
    /* cache savings, including an escaped label value */
    expect_text(dom, "<span id=\"saved-total\" class=\"big\">$3.75</span>");
    expect_text(dom, "<span id=\"hits-total\">32</span>");
    expect_text(dom, "<td>glo\"bex</td><td class=\"num\">2</td><td class=\"num\">$0.2500</td>");
    /* backends table from /admin/backends */
    expect_text(dom, "<td>ejected</td>");
    /* the key left the URL */
    cr_assert_null(strstr(dom, ADMIN_KEY), "the admin key must not be in the DOM");
    free(dom);
}
