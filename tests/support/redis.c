/*
 * tests/support/redis.c: start and stop a real redis-server for tests (see
 * redis.h). The flags follow /work/shared/STACK.md, except that the server
 * stays in the foreground as our child so we can wait for it by pid.
 */
#include "tests/support/redis.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int test_free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};

    nanosleep(&ts, NULL);
}

static int ping(int port)
{
    struct timeval tv = {0, 200000};
    redisContext *rc = redisConnectWithTimeout("127.0.0.1", port, tv);
    redisReply *reply;
    int ok = 0;

    if (rc == NULL || rc->err) {
        if (rc)
            redisFree(rc);
        return 0;
    }
    redisSetTimeout(rc, tv);
    reply = redisCommand(rc, "PING");
    /* Up, also when it wants a password first. */
    ok = reply && ((reply->type == REDIS_REPLY_STATUS && strcmp(reply->str, "PONG") == 0) ||
                   (reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "NOAUTH", 6) == 0));
    if (reply)
        freeReplyObject(reply);
    redisFree(rc);
    return ok;
}

/* fork+exec redis-server on r->port; wait until it answers. */
static int spawn(struct test_redis *r)
{
    char port[16], pidfile[192], logfile[192];
    pid_t pid;

    snprintf(port, sizeof(port), "%d", r->port);
    snprintf(pidfile, sizeof(pidfile), "%s/redis.pid", r->dir);
    snprintf(logfile, sizeof(logfile), "%s/redis.log", r->dir);
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a crashed test */
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        char *argv[] = {"redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", r->persist ? "yes" : "no", "--appendfsync", "always",
                        "--dir", r->dir, "--pidfile", pidfile, "--logfile", logfile,
                        "--daemonize", "no", r->password[0] ? "--requirepass" : NULL,
                        r->password, NULL};
        execvp("redis-server", argv);
        _exit(127);
    }
    r->pid = pid;
    for (int i = 0; i < 250; i++) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            r->pid = 0;
            return -1; /* exited: port taken? */
        }
        if (ping(r->port))
            return 0;
        sleep_ms(20);
    }
    test_redis_kill(r, SIGKILL);
    return -1;
}

int test_redis_start(struct test_redis *r, int persist)
{
    return test_redis_start_password(r, persist, NULL);
}

int test_redis_start_password(struct test_redis *r, int persist, const char *password)
{
    memset(r, 0, sizeof(*r));
    r->persist = persist;
    if (password)
        snprintf(r->password, sizeof(r->password), "%s", password);
    snprintf(r->dir, sizeof(r->dir), "/tmp/costrouter-redis-XXXXXX");
    if (mkdtemp(r->dir) == NULL)
        return -1;
    for (int attempt = 0; attempt < 5; attempt++) {
        r->port = test_free_port();
        if (r->port > 0 && spawn(r) == 0) {
            snprintf(r->url, sizeof(r->url), "redis://127.0.0.1:%d", r->port);
            return 0;
        }
    }
    return -1;
}

int test_redis_restart(struct test_redis *r)
{
    for (int attempt = 0; attempt < 50; attempt++) {
        if (spawn(r) == 0)
            return 0;
        sleep_ms(50);
    }
    return -1;
}

void test_redis_kill(struct test_redis *r, int sig)
{
    if (r->pid <= 0)
        return;
    kill(r->pid, sig);
    if (sig == SIGSTOP || sig == SIGCONT)
        return;
    if (sig != SIGKILL)
        kill(r->pid, SIGCONT);
    waitpid(r->pid, NULL, 0);
    r->pid = 0;
}

void test_redis_stop(struct test_redis *r)
{
    char cmd[256];

    test_redis_kill(r, SIGKILL);
    if (r->dir[0] != '\0' && strncmp(r->dir, "/tmp/costrouter-redis-", 22) == 0) {
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", r->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", r->dir);
    }
    r->dir[0] = '\0';
}

/* A blocking connection with a 2 s timeout, or NULL. */
static redisContext *connect_sync(const struct test_redis *r)
{
    struct timeval tv = {2, 0};
    redisContext *rc = redisConnectWithTimeout("127.0.0.1", r->port, tv);

    if (rc != NULL && rc->err == 0 && redisSetTimeout(rc, tv) == REDIS_OK) {
        redisReply *reply = r->password[0] ? redisCommand(rc, "AUTH %s", r->password) : NULL;
        int ok = !r->password[0] || (reply && reply->type == REDIS_REPLY_STATUS);

        if (reply)
            freeReplyObject(reply);
        if (ok)
            return rc;
    }
    if (rc)
        redisFree(rc);
    return NULL;
}

long long test_redis_int(struct test_redis *r, const char *fmt, ...)
{
    redisContext *rc = connect_sync(r);
    redisReply *reply;
    long long v = -1;
    va_list ap;

    if (rc == NULL)
        return -1;
    va_start(ap, fmt);
    reply = redisvCommand(rc, fmt, ap);
    va_end(ap);
    if (reply && reply->type == REDIS_REPLY_INTEGER)
        v = reply->integer;
    else if (reply && reply->type == REDIS_REPLY_STRING)
        v = strtoll(reply->str, NULL, 10);
    if (reply)
        freeReplyObject(reply);
    redisFree(rc);
    return v;
}

long long test_redis_day_spend(struct test_redis *r, const char *prefix, const char *tenant)
{
    char day[16];
    time_t now = time(NULL);
    struct tm tm;

    gmtime_r(&now, &tm);
    strftime(day, sizeof(day), "%Y%m%d", &tm);
    return test_redis_int(r, "GET %s{%s}:d:%s", prefix, tenant, day);
}

/* The calls of `command` in an INFO commandstats text: 0 if never. */
static long long calls_in(const char *info, const char *command)
{
    char field[64];
    const char *at;

    snprintf(field, sizeof(field), "cmdstat_%s:calls=", command);
    at = strstr(info, field);
    return at ? strtoll(at + strlen(field), NULL, 10) : 0;
}

long long test_redis_calls_less(struct test_redis *r, const char *command, const char *less)
{
    redisContext *rc = connect_sync(r);
    redisReply *reply;
    long long calls = -1;

    if (rc == NULL)
        return -1;
    reply = redisCommand(rc, "INFO commandstats");
    if (reply && reply->type == REDIS_REPLY_STRING)
        calls = calls_in(reply->str, command) - (less ? calls_in(reply->str, less) : 0);
    if (reply)
        freeReplyObject(reply);
    redisFree(rc);
    return calls;
}

long long test_redis_calls(struct test_redis *r, const char *command)
{
    return test_redis_calls_less(r, command, NULL);
}
