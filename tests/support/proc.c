/* tests/support/proc.c: child processes for integration tests (see proc.h). */
#define _GNU_SOURCE /* pipe2 */
#include "tests/support/proc.h"

#include <errno.h>
#include <openssl/sha.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"

#define START_TIMEOUT_MS 10000
#define STOP_GRACE_MS 3000
#define MAX_ARGS 64

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Fork a child running argv with stdout on a new pipe; *out_fd gets the
 * read end. Returns the pid or a negative errno. */
static pid_t spawn(char *const argv[], int *out_fd)
{
    pid_t parent = getpid(), pid;
    int fds[2];

    if (pipe2(fds, O_CLOEXEC) != 0)
        return -errno;
    fflush(NULL);
    pid = fork();
    if (pid < 0) {
        int err = errno;
        close(fds[0]);
        close(fds[1]);
        return -err;
    }
    if (pid == 0) {
        /* Die with the test process, even if it is killed. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        if (dup2(fds[1], STDOUT_FILENO) < 0)
            _exit(127);
        execvp(argv[0], argv);
        fprintf(stderr, "support: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fds[1]);
    *out_fd = fds[0];
    return pid;
}

/* Wait for pid until deadline_ms (monotonic). Returns 1 with *status set,
 * or 0 if it is still running. */
static int wait_until(pid_t pid, long long deadline_ms, int *status)
{
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid || (r < 0 && errno != EINTR))
            return 1;
        if (now_ms() >= deadline_ms)
            return 0;
        usleep(5000);
    }
}

/* Parse "listening on HOST:PORT" into p. Returns 0 or -EPROTO. */
static int parse_listening(struct support_proc *p, const char *line)
{
    static const char prefix[] = "listening on ";
    const char *hp, *colon;
    size_t hlen;

    if (strncmp(line, prefix, sizeof(prefix) - 1) != 0)
        return -EPROTO;
    hp = line + sizeof(prefix) - 1;
    colon = strrchr(hp, ':');
    if (colon == NULL || (hlen = (size_t)(colon - hp)) >= sizeof(p->host))
        return -EPROTO;
    memcpy(p->host, hp, hlen);
    p->host[hlen] = '\0';
    p->port = atoi(colon + 1);
    return p->port > 0 && p->port < 65536 ? 0 : -EPROTO;
}

int support_proc_start(struct support_proc *p, char *const argv[])
{
    char line[512];
    size_t len = 0;
    long long deadline = now_ms() + START_TIMEOUT_MS;
    int fd = -1, rc = -ETIMEDOUT;
    pid_t pid;

    p->pid = 0;
    p->port = 0;
    p->status = -1;
    pid = spawn(argv, &fd);
    if (pid < 0)
        return (int)pid;
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        long long left = deadline - now_ms();
        char *nl;
        ssize_t n;

        if (left <= 0)
            break;
        if (poll(&pfd, 1, (int)left) <= 0)
            continue;
        n = read(fd, line + len, sizeof(line) - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = -ECHILD;
            break;
        }
        len += (size_t)n;
        line[len] = '\0';
        nl = strchr(line, '\n');
        if (nl != NULL) {
            *nl = '\0';
            rc = parse_listening(p, line);
            break;
        }
        if (len == sizeof(line) - 1) {
            rc = -EPROTO;
            break;
        }
    }
    close(fd);
    if (rc != 0) {
        fprintf(stderr, "support: %s did not report \"listening on HOST:PORT\" (%s)\n", argv[0],
                strerror(-rc));
        kill(pid, SIGKILL);
        waitpid(pid, &p->status, 0);
        return rc;
    }
    p->pid = pid;
    return 0;
}

void support_proc_stop(struct support_proc *p)
{
    if (p->pid <= 0)
        return;
    kill(p->pid, SIGTERM);
    if (!wait_until(p->pid, now_ms() + STOP_GRACE_MS, &p->status)) {
        fprintf(stderr, "support: pid %d ignored SIGTERM for %d ms, killing it\n", (int)p->pid,
                STOP_GRACE_MS);
        kill(p->pid, SIGKILL);
        waitpid(p->pid, &p->status, 0);
    }
    p->pid = 0;
}

int support_proc_exited_cleanly(const struct support_proc *p)
{
    return p->status != -1 && WIFEXITED(p->status) && WEXITSTATUS(p->status) == 0;
}

long support_proc_rss_kb(pid_t pid)
{
    char path[64], line[256];
    long kb = -1;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

void support_proc_small_quarantine(void)
{
    const char *was = getenv("ASAN_OPTIONS");
    char opts[512];

    snprintf(opts, sizeof(opts), "%s%squarantine_size_mb=4", was ? was : "", was ? ":" : "");
    setenv("ASAN_OPTIONS", opts, 1);
}

const char *support_mockllm_bin(void)
{
    const char *bin = getenv("MOCKLLM_BIN");
    return bin != NULL && *bin != '\0' ? bin : "build/mockllm";
}

int support_mockllm_start(struct support_proc *p, ...)
{
    char *argv[MAX_ARGS];
    size_t n = 0;
    va_list ap;

    argv[n++] = (char *)support_mockllm_bin();
    argv[n++] = "--listen";
    argv[n++] = "127.0.0.1:0";
    va_start(ap, p);
    for (const char *a = va_arg(ap, const char *); a != NULL; a = va_arg(ap, const char *)) {
        if (n == MAX_ARGS - 1) {
            va_end(ap);
            return -E2BIG;
        }
        argv[n++] = (char *)a;
    }
    va_end(ap);
    argv[n] = NULL;
    return support_proc_start(p, argv);
}

int support_run(char *const argv[], struct buf *out, int timeout_ms)
{
    long long deadline = now_ms() + timeout_ms;
    char chunk[4096];
    int fd, status, rc = 0;
    pid_t pid = spawn(argv, &fd);

    if (pid < 0)
        return (int)pid;
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        long long left = deadline - now_ms();
        ssize_t n;

        if (left <= 0) {
            rc = -ETIMEDOUT;
            break;
        }
        if (poll(&pfd, 1, (int)left) <= 0)
            continue;
        n = read(fd, chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (out != NULL && buf_append(out, chunk, (size_t)n) != 0) {
            rc = -ENOMEM;
            break;
        }
    }
    close(fd);
    if (rc != 0 || !wait_until(pid, deadline, &status)) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        return rc != 0 ? rc : -ETIMEDOUT;
    }
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return WEXITSTATUS(status);
}

int support_log_count(const char *path, const char *text)
{
    FILE *f = fopen(path, "r");
    char line[2048];
    int n = 0;

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f))
        n += strstr(line, text) != NULL;
    fclose(f);
    return n;
}

int support_router_start(struct support_proc *p, const char *bin, const char *conf_path,
                         const char *log_path)
{
    char cmd[1024], *argv[] = {"/bin/sh", "-c", cmd, NULL};

    if (bin == NULL)
        bin = getenv("COSTROUTER_BIN");
    if (bin == NULL ||
        snprintf(cmd, sizeof(cmd), "exec '%s' -c '%s' 2>>'%s'", bin, conf_path, log_path) >=
            (int)sizeof(cmd))
        return -EINVAL;
    return support_proc_start(p, argv);
}

char *support_file_read(const char *path)
{
    FILE *f = fopen(path, "r");
    struct buf b = {0};
    char chunk[4096];
    size_t n;

    if (f == NULL)
        return NULL;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        if (buf_append(&b, chunk, n) < 0)
            break;
    if (ferror(f) || !feof(f) || buf_append(&b, "", 1) < 0) {
        buf_free(&b);
        fclose(f);
        return NULL;
    }
    fclose(f);
    return b.data;
}

int support_file_write(const char *path, const char *data)
{
    FILE *f = fopen(path, "w");
    int rc;

    if (f == NULL)
        return -errno;
    rc = fputs(data, f) < 0 ? -EIO : 0;
    if (fclose(f) != 0 && rc == 0)
        rc = -errno;
    return rc;
}

void support_log_show(const char *path, const char *who)
{
    FILE *f = fopen(path, "r");
    char line[2048];

    if (f == NULL)
        return;
    while (fgets(line, sizeof(line), f))
        fprintf(stderr, "%s: %s", who, line);
    fclose(f);
}

int support_make_test_ca(char *dir, size_t size)
{
    const char *src = getenv("COSTROUTER_SRC");
    char script[4096];
    char *argv[3];
    int rc;

    if (snprintf(dir, size, "/tmp/costrouter-ca-XXXXXX") >= (int)size)
        return -ENAMETOOLONG;
    if (mkdtemp(dir) == NULL)
        return -errno;
    snprintf(script, sizeof(script), "%s/tests/support/make-test-ca.sh",
             src != NULL && *src != '\0' ? src : ".");
    argv[0] = script;
    argv[1] = dir;
    argv[2] = NULL;
    rc = support_run(argv, NULL, 20000);
    if (rc != 0) {
        support_remove_tree(dir);
        return rc < 0 ? rc : -EIO;
    }
    return 0;
}

void support_remove_tree(const char *dir)
{
    char *argv[] = {"rm", "-rf", "--", (char *)dir, NULL};

    if (dir == NULL || strncmp(dir, "/tmp/", 5) != 0)
        return; /* only what support_make_test_ca() made */
    (void)support_run(argv, NULL, 10000);
}

void support_key_sha256_hex(const char *key, char hex[65])
{
    unsigned char d[SHA256_DIGEST_LENGTH];

    SHA256((const unsigned char *)key, strlen(key), d);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        sprintf(hex + 2 * i, "%02x", d[i]);
}
