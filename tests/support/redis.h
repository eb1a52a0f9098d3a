/*
 * tests/support/redis.h: a real redis-server for tests, on a free loopback
 * port in its own temporary folder, started as our child (it dies with the
 * test process) and stopped by pid.
 */
#ifndef TESTS_SUPPORT_REDIS_H
#define TESTS_SUPPORT_REDIS_H

#include <sys/types.h>

struct test_redis {
    pid_t pid;        /* redis-server, 0 when not running */
    int port;         /* loopback port */
    int persist;      /* appendonly with fsync always: survives SIGKILL */
    char dir[128];    /* temp folder: pid file, log, AOF */
    char url[64];     /* redis://127.0.0.1:PORT (without the password) */
    char password[64]; /* requirepass, "" for none */
};

/* Start on a free port (retrying when the port was taken meanwhile) and
 * wait until it answers PING. Returns 0 or -1. */
int test_redis_start(struct test_redis *r, int persist);
/* The same with `requirepass password` (NULL: none); the test_redis_*
 * calls below authenticate with it. */
int test_redis_start_password(struct test_redis *r, int persist, const char *password);
/* Start again on the same port and folder (after test_redis_kill). */
int test_redis_restart(struct test_redis *r);
/* Send `sig` and, unless SIGSTOP/SIGCONT, wait for the process to exit. */
void test_redis_kill(struct test_redis *r, int sig);
/* Kill it and remove the folder. */
void test_redis_stop(struct test_redis *r);
/* Run one command synchronously (tests only: blocks). Integer replies and
 * integer-looking strings are returned; -1 on error or nil. */
long long test_redis_int(struct test_redis *r, const char *fmt, ...);
/* Today's (UTC) spend of `tenant` in micro-USD, as the store keeps it
 * under key prefix `prefix` ("costrouter:" by default): -1 when none. */
long long test_redis_day_spend(struct test_redis *r, const char *prefix, const char *tenant);
/* How many times the server ran `command` (lower case, as INFO
 * commandstats names it): 0 if never, -1 on error. */
long long test_redis_calls(struct test_redis *r, const char *command);
/* Calls of `command` less calls of `less` (NULL: none), read from one
 * INFO reply, so that a call landing between two reads cannot skew it. */
long long test_redis_calls_less(struct test_redis *r, const char *command, const char *less);
/* A free loopback TCP port (bound then released). */
int test_free_port(void);

#endif
