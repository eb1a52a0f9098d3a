/*
 * tests/support/relay.c: see relay.h. One thread polls the listening
 * socket, a wake-up pipe and both ends of every relayed connection; the
 * test thread only flips flags under the mutex and writes to the pipe.
 * Blocking writes are fine here: both peers read all the time.
 */
#define _GNU_SOURCE /* memmem */
#include "tests/support/relay.h"

#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tests/support/http.h"

#define RELAY_MAX 16 /* connections at once */

struct relay_pair {
    int client;             /* accepted from the store, -1: slot free */
    int server;             /* to redis-server */
    unsigned blackhole:1;   /* drop what the server sends */
};

struct test_relay {
    pthread_t thread;                /* the relay loop */
    pthread_mutex_t lock;            /* guards the flags below */
    int listen_fd;                   /* accepting */
    int wake[2];                     /* pipe: flags changed */
    int target;                      /* redis-server port */
    int port;                        /* our port */
    int down;                        /* refuse and close everything */
    int lose;                        /* armed: blackhole the next script call's connection */
    int lost;                        /* connections blackholed so far */
    int stop;                        /* end the thread */
    struct relay_pair pairs[RELAY_MAX]; /* relayed connections (thread only) */
};

static void pair_close(struct relay_pair *p)
{
    if (p->client < 0)
        return;
    close(p->client);
    close(p->server);
    p->client = p->server = -1;
    p->blackhole = 0;
}

static int write_all(int fd, const char *b, ssize_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, b, (size_t)n);
        if (w <= 0)
            return -1;
        b += w;
        n -= w;
    }
    return 0;
}

static int dial(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static void relay_accept(struct test_relay *r)
{
    int fd = accept(r->listen_fd, NULL, NULL), down;

    if (fd < 0)
        return;
    pthread_mutex_lock(&r->lock);
    down = r->down;
    pthread_mutex_unlock(&r->lock);
    for (int i = 0; !down && i < RELAY_MAX; i++) {
        struct relay_pair *p = &r->pairs[i];
        if (p->client >= 0)
            continue;
        p->server = dial(r->target);
        if (p->server < 0)
            break;
        p->client = fd;
        return;
    }
    close(fd);
}

/* Move one read's worth from one end to the other; -1: close the pair. */
static int relay_move(struct test_relay *r, struct relay_pair *p, int from_client)
{
    char buf[65536];
    ssize_t n = read(from_client ? p->client : p->server, buf, sizeof(buf));

    if (n <= 0)
        return -1;
    if (from_client) {
        pthread_mutex_lock(&r->lock);
        if (r->lose && memmem(buf, (size_t)n, "\r\nEVALSHA\r\n", 11) != NULL) {
            r->lose = 0;
            r->lost++;
            p->blackhole = 1;
        }
        pthread_mutex_unlock(&r->lock);
        return write_all(p->server, buf, n);
    }
    return p->blackhole ? 0 : write_all(p->client, buf, n);
}

static void *relay_main(void *arg)
{
    struct test_relay *r = arg;
    struct pollfd fds[2 + 2 * RELAY_MAX];

    for (;;) {
        int n = 2, stop, down;
        pthread_mutex_lock(&r->lock);
        stop = r->stop;
        down = r->down;
        pthread_mutex_unlock(&r->lock);
        if (stop)
            break;
        fds[0] = (struct pollfd){.fd = r->listen_fd, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = r->wake[0], .events = POLLIN};
        for (int i = 0; i < RELAY_MAX; i++) {
            if (down)
                pair_close(&r->pairs[i]);
            fds[n++] = (struct pollfd){.fd = r->pairs[i].client, .events = POLLIN};
            fds[n++] = (struct pollfd){.fd = r->pairs[i].server, .events = POLLIN};
        }
        if (poll(fds, (nfds_t)n, 1000) <= 0)
            continue;
        if (fds[1].revents) {
            char b[64];
            if (read(r->wake[0], b, sizeof(b)) < 0)
                break;
        }
        for (int i = 0; i < RELAY_MAX; i++) {
            struct relay_pair *p = &r->pairs[i];
            if (p->client >= 0 && fds[2 + 2 * i].revents && relay_move(r, p, 1) < 0)
                pair_close(p);
            if (p->client >= 0 && fds[3 + 2 * i].revents && relay_move(r, p, 0) < 0)
                pair_close(p);
        }
        if (fds[0].revents)
            relay_accept(r);
    }
    for (int i = 0; i < RELAY_MAX; i++)
        pair_close(&r->pairs[i]);
    return NULL;
}

struct test_relay *test_relay_start(int port)
{
    struct test_relay *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return NULL;
    r->target = port;
    for (int i = 0; i < RELAY_MAX; i++)
        r->pairs[i].client = r->pairs[i].server = -1;
    pthread_mutex_init(&r->lock, NULL);
    r->listen_fd = support_http_listen(&r->port);
    if (r->listen_fd < 0 || pipe(r->wake) != 0)
        goto fail;
    if (pthread_create(&r->thread, NULL, relay_main, r) != 0)
        goto fail;
    return r;
fail:
    if (r->listen_fd >= 0)
        close(r->listen_fd);
    free(r);
    return NULL;
}

int test_relay_port(const struct test_relay *r)
{
    return r->port;
}

/* Set a flag under the lock and wake the thread. */
static void relay_set(struct test_relay *r, int *flag, int value)
{
    pthread_mutex_lock(&r->lock);
    *flag = value;
    pthread_mutex_unlock(&r->lock);
    if (write(r->wake[1], "x", 1) != 1)
        abort();
}

void test_relay_down(struct test_relay *r, int down)
{
    relay_set(r, &r->down, down);
}

void test_relay_lose_next(struct test_relay *r)
{
    relay_set(r, &r->lose, 1);
}

int test_relay_lost(struct test_relay *r)
{
    int n;

    pthread_mutex_lock(&r->lock);
    n = r->lost;
    pthread_mutex_unlock(&r->lock);
    return n;
}

void test_relay_stop(struct test_relay *r)
{
    relay_set(r, &r->stop, 1);
    pthread_join(r->thread, NULL);
    close(r->listen_fd);
    close(r->wake[0]);
    close(r->wake[1]);
    pthread_mutex_destroy(&r->lock);
    free(r);
}
