/*
 * The open-file limit against limits.max_connections.
 *
 * Every client connection is a descriptor, and so is the upstream
 * connection of each request in flight and each idle pooled one. Many
 * machines start daemons with a soft limit of 1024, far under the
 * default max_connections, and past it the kernel refuses descriptors:
 * libuv then resets new clients without telling us (its EMFILE trick),
 * and connections to backends fail for reasons no backend caused. So at
 * start and at each reload the soft limit is raised to what the config
 * needs, as far as the hard limit allows, and when it cannot be, fewer
 * clients are let in, leaving room for upstream connections.
 */

#include <sys/resource.h>

#include "internal.h"

/* Descriptors that are not connections: stdio, the listener, the loop's
 * epoll, signal and async fds, the cost log, Redis, libuv's spare for
 * EMFILE, threads' resolver sockets. A running router uses about 12. */
#define FD_RESERVE 32

/* Descriptors `clients` client connections need, each with one upstream
 * connection, plus the idle pools and the reserve. */
static rlim_t fds_needed(const struct conf *conf, size_t clients)
{
    rlim_t idle = 0;

    for (size_t i = 0; i < conf->nbackends; i++)
        idle += (rlim_t)MAX(conf->backends[i].max_idle_connections, 0);
    return 2 * (rlim_t)clients + idle + FD_RESERVE;
}

/* Client connections to take under a limit of `fds` too short for
 * max_connections (at least 1). Clients get three quarters of what the
 * reserve and the idle pools leave, requests in flight the last quarter
 * for their upstream connections: not one each, since most keep-alive
 * clients are idle at any moment (10,000 idle clients under a hard limit
 * of 20,000 must fit), and a request that finds none left gets a 503 of
 * the router's own (upstream.c) rather than a reset. */
static size_t clients_allowed(const struct conf *conf, rlim_t fds)
{
    rlim_t fixed = fds_needed(conf, 0);

    return fds > fixed + 4 ? (size_t)((fds - fixed) / 4 * 3) : 1;
}

size_t router__fd_budget(const struct conf *conf)
{
    struct rlimit rl;
    rlim_t want = fds_needed(conf, conf->max_connections);
    size_t allowed;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return conf->max_connections;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
        rlim_t before = rl.rlim_cur;

        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ? want : MIN(want, rl.rlim_max);
        if (rl.rlim_cur > before && setrlimit(RLIMIT_NOFILE, &rl) == 0)
            log_info("open-file limit raised from %llu to %llu for limits.max_connections %zu",
                     (unsigned long long)before, (unsigned long long)rl.rlim_cur,
                     conf->max_connections);
        else
            rl.rlim_cur = before;
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= want)
        return conf->max_connections;
    allowed = MIN(clients_allowed(conf, rl.rlim_cur), conf->max_connections);
    log_warn("open-file limit %llu (hard %llu) leaves room for %zu client connections, not "
             "limits.max_connections %zu (two descriptors each, with an upstream "
             "connection): serving at most %zu; raise the limit (ulimit -n, systemd's "
             "LimitNOFILE=) or lower limits.max_connections",
             (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max, allowed,
             conf->max_connections, allowed);
    return allowed;
}
