/*
 * tests/support/proc.h: child processes for integration tests.
 *
 * Linked into every test binary. Servers under test (mockllm, costrouter)
 * print one line "listening on HOST:PORT" on stdout once bound;
 * support_proc_start() waits for it, so a test can connect right away.
 * Children get PR_SET_PDEATHSIG(SIGTERM), so a test killed by its timeout
 * does not leave servers running. Blocking calls: tests only.
 */
#ifndef TESTS_SUPPORT_PROC_H
#define TESTS_SUPPORT_PROC_H

#include <stddef.h>
#include <sys/types.h>

struct buf;

/* A server child process. Zero it before use. */
struct support_proc {
    pid_t pid;     /* child pid, 0 when not running */
    int port;      /* port from its "listening on HOST:PORT" line */
    char host[64]; /* host from that line */
    int status;    /* wait status after support_proc_stop(), -1 before */
};

/* Fork and exec argv[0] (searched in PATH if it has no '/') with argv. The
 * child's stderr is the test's; its stdout is read until a line
 * "listening on HOST:PORT" (10 s at most), then closed: a child writing to
 * stdout later gets EPIPE. Fills pid, host and port. Returns 0, or a
 * negative errno (-ETIMEDOUT, -ECHILD if it exited first); on failure the
 * child is killed and reaped and p->pid is 0. */
int support_proc_start(struct support_proc *p, char *const argv[])
    __attribute__((warn_unused_result));

/* SIGTERM the child, wait up to 3 s, then SIGKILL; stores the wait status
 * in p->status and clears p->pid. No-op when p->pid is 0. */
void support_proc_stop(struct support_proc *p);

/* True when p->status says the child exited on its own with code 0. */
int support_proc_exited_cleanly(const struct support_proc *p);

/* Resident memory of process `pid` in KB (VmRSS), or -1 when unknown. */
long support_proc_rss_kb(pid_t pid);
/* For a test that bounds a child's RSS, call before starting the child:
 * under AddressSanitizer (make asan) freed memory waits in a quarantine of
 * 256 MB, counted as resident; this makes the children's 4 MB. It does
 * nothing to a child built without sanitizers. */
void support_proc_small_quarantine(void);

/* The mockllm binary: $MOCKLLM_BIN (set by tests/run.sh), else
 * build/mockllm. */
const char *support_mockllm_bin(void);

/* Start mockllm on 127.0.0.1, any free port, with extra arguments given
 * one string each and ended by NULL, e.g.
 * support_mockllm_start(&p, "--tokens", "4", NULL), or (&p, NULL) for none.
 * Returns as support_proc_start(). */
int support_mockllm_start(struct support_proc *p, ... /* const char *, NULL */)
    __attribute__((sentinel, warn_unused_result));

/* The "sha256:" config form of a tenant key, without the prefix: the key's
 * SHA-256 as 64 lowercase hex digits and a NUL. */
void support_key_sha256_hex(const char *key, char hex[65]);

/* Run argv to completion (timeout_ms at most, then SIGKILL), appending its
 * stdout to out when out is not NULL; stderr is the test's. Returns the exit
 * code (0-255), 128+signal if killed, or a negative errno (-ETIMEDOUT). */
int support_run(char *const argv[], struct buf *out, int timeout_ms);

/* Start the router `bin` (NULL: $COSTROUTER_BIN) on the config at
 * `conf_path`, its stderr appended to `log_path` (where its log, and under
 * the sanitizers their reports, can be read). Returns as
 * support_proc_start(). */
int support_router_start(struct support_proc *p, const char *bin, const char *conf_path,
                         const char *log_path) __attribute__((warn_unused_result));

/* Lines of the file at `path` (a child's log) that hold `text`, or -1
 * when it cannot be read. */
int support_log_count(const char *path, const char *text);

/* The whole file at `path` (a child's log, a file it saved), NUL-terminated
 * and malloc'd, or NULL when it cannot be read. */
char *support_file_read(const char *path);

/* Replace the file at `path` with the string `data`; 0 or -errno. */
int support_file_write(const char *path, const char *data);

/* Copy the file at `path` (a child's log) to stderr, each line after
 * "WHO: ": where a failed test is read, and where tests/run.sh looks for
 * sanitizer reports (make asan). Nothing if it cannot be read. */
void support_log_show(const char *path, const char *who);

/* Create a fresh temporary folder and run tests/support/make-test-ca.sh in
 * it (found under $COSTROUTER_SRC, else the current folder): it holds
 * ca.crt, ca.key, server.crt and server.key for 127.0.0.1 and localhost.
 * Writes the folder's path to dir. Returns 0 or a negative errno. */
int support_make_test_ca(char *dir, size_t size) __attribute__((warn_unused_result));

/* Remove a folder made by support_make_test_ca() and what it holds. */
void support_remove_tree(const char *dir);

#endif
