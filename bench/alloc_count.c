/*
 * bench/alloc_count.c: counts a process's malloc, calloc and realloc
 * calls, for bench/run.sh's "allocations per request".
 *
 * Preload it (LD_PRELOAD=build/bench/alloc_count.so) into a server: SIGUSR1
 * zeroes the counts (after a warm-up), SIGUSR2 writes
 * "malloc=N calloc=N realloc=N" to the file $ALLOC_COUNT_OUT. The server
 * must not use those two signals itself (costrouter does not). glibc's
 * __libc_* entry points do the real work, so nothing is allocated here.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/fmt.h"

extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);

static atomic_long n_malloc, n_calloc, n_realloc;

void *malloc(size_t n)
{
    atomic_fetch_add_explicit(&n_malloc, 1, memory_order_relaxed);
    return __libc_malloc(n);
}

void *calloc(size_t n, size_t size)
{
    atomic_fetch_add_explicit(&n_calloc, 1, memory_order_relaxed);
    return __libc_calloc(n, size);
}

void *realloc(void *p, size_t n)
{
    atomic_fetch_add_explicit(&n_realloc, 1, memory_order_relaxed);
    return __libc_realloc(p, n);
}

static void on_zero(int sig)
{
    (void)sig;
    n_malloc = n_calloc = n_realloc = 0;
}

/* fmt_u64, not snprintf, which a signal handler may not call. Each
 * write's result is ignored: the reader sees a short line. */
static void put_field(int fd, const char *name, long v)
{
    char digits[FMT_U64_MAX], *p = fmt_u64(digits + sizeof(digits), (uint64_t)v);

    (void)!write(fd, name, strlen(name));
    (void)!write(fd, p, (size_t)(digits + sizeof(digits) - p));
}

static void on_report(int sig)
{
    const char *path = getenv("ALLOC_COUNT_OUT");
    int saved = errno, fd;

    (void)sig;
    if (path != NULL && (fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) >= 0) {
        put_field(fd, "malloc=", n_malloc);
        put_field(fd, " calloc=", n_calloc);
        put_field(fd, " realloc=", n_realloc);
        (void)!write(fd, "\n", 1);
        close(fd);
    }
    errno = saved;
}

__attribute__((constructor)) static void alloc_count_init(void)
{
    signal(SIGUSR1, on_zero);
    signal(SIGUSR2, on_report);
}
