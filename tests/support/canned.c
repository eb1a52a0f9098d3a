/*
 * tests/support/canned.c: see canned.h. One thread accepts and serves one
 * connection at a time with blocking reads (a 5 s receive timeout); the
 * test thread only reads the heads under the mutex.
 */
#define _GNU_SOURCE /* memmem */
#include "tests/support/canned.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/http.h"

struct support_canned {
    pthread_t thread;     /* the accept loop */
    pthread_mutex_t lock; /* guards heads and copy */
    int listen_fd;        /* accepting */
    int wake[2];          /* pipe: stop */
    int port;             /* our port */
    char *answer;         /* what every request gets */
    size_t answer_len;    /* its bytes */
    struct buf heads;     /* request heads received, back to back */
    int requests;         /* how many */
    struct buf copy;      /* heads as last returned, NUL-terminated */
    char *echo_head;      /* support_canned_echo's head, or NULL: answer is sent */
    char *echo_body;      /* its body template */
    int reset;            /* end connections with a reset (support_canned_reset) */
    int hold;             /* keep connections open after the answer (support_canned_hold) */
    int reuse;            /* keep connections for a second request (support_canned_reuse) */
    char *reuse_answer;   /* what that second request gets */
    size_t reuse_len;     /* its bytes */
};

#define ECHO_MARK "$REQUEST"

/* `p` (n bytes) escaped for the inside of a JSON string, appended. */
static void json_escaped(struct buf *out, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)p[i];
        int rc;

        if (ch == '"' || ch == '\\')
            rc = buf_printf(out, "\\%c", ch);
        else if (ch == '\r')
            rc = buf_append_lit(out, "\\r");
        else if (ch == '\n')
            rc = buf_append_lit(out, "\\n");
        else if (ch < 0x20)
            rc = buf_printf(out, "\\u%04x", ch);
        else
            rc = buf_append(out, p + i, 1);
        if (rc != 0)
            abort();
    }
}

/* `template` with each ECHO_MARK replaced by the request head (len
 * bytes), escaped, appended to out. */
static void fill(struct buf *out, const char *template, const char *head, size_t len)
{
    const char *t = template, *mark;

    while ((mark = strstr(t, ECHO_MARK)) != NULL) {
        if (buf_append(out, t, (size_t)(mark - t)) != 0)
            abort();
        json_escaped(out, head, len);
        t = mark + strlen(ECHO_MARK);
    }
    if (buf_append(out, t, strlen(t)) != 0)
        abort();
}

/* The echo answer to a request whose head is `head` (len bytes). */
static void echo_answer(const struct support_canned *u, const char *head, size_t len,
                        struct buf *out)
{
    struct buf body = {0};

    fill(&body, u->echo_body, head, len);
    fill(out, u->echo_head, head, len);
    if (buf_printf(out, "Content-Length: %zu\r\n\r\n", body.len) != 0 ||
        buf_append(out, body.data, body.len) != 0)
        abort();
    buf_free(&body);
}

/* Content-Length of a request head, 0 without one. */
static size_t head_content_length(const char *head, size_t len)
{
    const char *p = head, *end = head + len;

    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (eol == NULL)
            break;
        if (eol - p > 15 && strncasecmp(p, "content-length:", 15) == 0)
            return (size_t)strtoul(p + 15, NULL, 10);
        p = eol + 2;
    }
    return 0;
}

static void write_all(int fd, const char *p, size_t len)
{
    ssize_t n;

    for (size_t off = 0; off < len; off += (size_t)n)
        if ((n = write(fd, p + off, len - off)) <= 0)
            break;
}

/* Read one request (head and Content-Length body) into `in` (emptied
 * first); record its head. 0, or -1 when the connection ended first. */
static int read_request(struct support_canned *u, int fd, struct buf *in, size_t *head_len)
{
    char chunk[4096];
    const char *end = NULL;
    size_t want = 0;
    ssize_t n;

    buf_reset(in);
    while ((n = read(fd, chunk, sizeof(chunk))) > 0) {
        if (buf_append(in, chunk, (size_t)n) != 0)
            break;
        if (end == NULL && (end = memmem(in->data, in->len, "\r\n\r\n", 4)) != NULL)
            want = (size_t)(end + 4 - in->data) + head_content_length(in->data, in->len);
        if (end != NULL && in->len >= want)
            break;
    }
    if (end == NULL)
        return -1;
    *head_len = (size_t)(end + 4 - in->data);
    pthread_mutex_lock(&u->lock);
    if (buf_append(&u->heads, in->data, *head_len) != 0)
        abort();
    u->requests++;
    pthread_mutex_unlock(&u->lock);
    return 0;
}

static void serve(struct support_canned *u, int fd)
{
    struct timeval tv = {5, 0};
    struct buf in = {0}, echo = {0}, again = {0};
    size_t head_len;
    int reset, reuse, hold;

    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (read_request(u, fd, &in, &head_len) == 0) {
        pthread_mutex_lock(&u->lock);
        if (u->echo_head)
            echo_answer(u, in.data, head_len, &echo);
        write_all(fd, u->echo_head ? echo.data : u->answer,
                  u->echo_head ? echo.len : u->answer_len);
        reset = u->reset;
        reuse = u->reuse;
        hold = u->hold;
        if (reuse && buf_append(&again, u->reuse_answer, u->reuse_len) != 0)
            abort();
        pthread_mutex_unlock(&u->lock);
        if (reset) {
            struct linger abort_close = {1, 0}; /* close sends RST */

            usleep(200 * 1000); /* the answer is read first */
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_close, sizeof(abort_close));
        } else if (reuse && read_request(u, fd, &in, &head_len) == 0) {
            write_all(fd, again.data, again.len);
        } else if (hold) {
            char sink[4096];
            int waits = 0;
            ssize_t n;

            /* until the peer closes (each read waits 5 s at most), 30 s at most */
            while ((n = read(fd, sink, sizeof(sink))) != 0 && waits < 6)
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                    waits++;
                else if (n < 0 && errno != EINTR)
                    break;
        }
    }
    buf_free(&again);
    buf_free(&echo);
    buf_free(&in);
    close(fd);
}

static void *canned_loop(void *arg)
{
    struct support_canned *u = arg;
    struct pollfd pf[2] = {{u->listen_fd, POLLIN, 0}, {u->wake[0], POLLIN, 0}};

    while (poll(pf, 2, -1) >= 0 && !(pf[1].revents & POLLIN)) {
        int fd = accept(u->listen_fd, NULL, NULL);
        if (fd >= 0)
            serve(u, fd);
    }
    return NULL;
}

struct support_canned *support_canned_start(const char *answer, size_t len)
{
    struct support_canned *u = calloc(1, sizeof(*u));

    if (u == NULL)
        return NULL;
    u->wake[0] = u->wake[1] = u->listen_fd = -1;
    pthread_mutex_init(&u->lock, NULL);
    support_canned_set(u, answer, len);
    u->listen_fd = support_http_listen(&u->port);
    if (u->listen_fd < 0 || pipe(u->wake) != 0)
        goto fail;
    if (pthread_create(&u->thread, NULL, canned_loop, u) != 0)
        goto fail;
    return u;
fail:
    if (u) {
        if (u->listen_fd >= 0)
            close(u->listen_fd);
        if (u->wake[0] >= 0) {
            close(u->wake[0]);
            close(u->wake[1]);
        }
        free(u->answer);
        free(u);
    }
    return NULL;
}

/* A copy of `len` bytes (aborts when out of memory). */
static char *bytes_dup(const char *p, size_t len)
{
    char *copy = malloc(len ? len : 1);

    if (copy == NULL)
        abort();
    memcpy(copy, p, len);
    return copy;
}

void support_canned_set(struct support_canned *u, const char *answer, size_t len)
{
    char *copy = bytes_dup(answer, len);

    pthread_mutex_lock(&u->lock);
    free(u->answer);
    u->answer = copy;
    u->answer_len = len;
    free(u->echo_head);
    free(u->echo_body);
    u->echo_head = u->echo_body = NULL;
    pthread_mutex_unlock(&u->lock);
}

void support_canned_echo(struct support_canned *u, const char *head, const char *body)
{
    char *h = strdup(head), *b = strdup(body);

    if (h == NULL || b == NULL)
        abort();
    pthread_mutex_lock(&u->lock);
    free(u->echo_head);
    free(u->echo_body);
    u->echo_head = h;
    u->echo_body = b;
    pthread_mutex_unlock(&u->lock);
}

void support_canned_reset(struct support_canned *u, int on)
{
    pthread_mutex_lock(&u->lock);
    u->reset = on;
    pthread_mutex_unlock(&u->lock);
}

void support_canned_hold(struct support_canned *u, int on)
{
    pthread_mutex_lock(&u->lock);
    u->hold = on;
    pthread_mutex_unlock(&u->lock);
}

void support_canned_reuse(struct support_canned *u, const char *answer, size_t len)
{
    char *copy = bytes_dup(answer, len);

    pthread_mutex_lock(&u->lock);
    free(u->reuse_answer);
    u->reuse_answer = copy;
    u->reuse_len = len;
    u->reuse = 1;
    pthread_mutex_unlock(&u->lock);
}

int support_canned_requests(struct support_canned *u)
{
    int n;

    pthread_mutex_lock(&u->lock);
    n = u->requests;
    pthread_mutex_unlock(&u->lock);
    return n;
}

int support_canned_port(const struct support_canned *u)
{
    return u->port;
}

const char *support_canned_heads(struct support_canned *u)
{
    pthread_mutex_lock(&u->lock);
    buf_reset(&u->copy);
    if (buf_append(&u->copy, u->heads.data, u->heads.len) != 0 || buf_append(&u->copy, "", 1) != 0)
        abort();
    pthread_mutex_unlock(&u->lock);
    return u->copy.data;
}

void support_canned_stop(struct support_canned *u)
{
    if (u == NULL)
        return;
    if (write(u->wake[1], "x", 1) != 1)
        abort();
    pthread_join(u->thread, NULL);
    close(u->listen_fd);
    close(u->wake[0]);
    close(u->wake[1]);
    pthread_mutex_destroy(&u->lock);
    buf_free(&u->heads);
    buf_free(&u->copy);
    free(u->answer);
    free(u->echo_head);
    free(u->echo_body);
    free(u->reuse_answer);
    free(u);
}
