/*
 * tests/support/browser.c: headless Chromium for tests (see browser.h).
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/browser.h"

extern char **environ;

/* Run chromium --dump-dom on url; returns the DOM text (malloc'd). */
char *support_dump_dom(const char *url, const char *profile)
{
    char data_dir[300];
    char *argv[] = {"chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    data_dir, "--virtual-time-budget=12000", "--dump-dom", (char *)url, NULL};
    posix_spawn_file_actions_t fa;
    struct buf out = {0};
    int pipefd[2], status = 0, exited = 0;
    pid_t pid;
    time_t deadline = time(NULL) + 60;

    snprintf(data_dir, sizeof(data_dir), "--user-data-dir=%s", profile);
    cr_assert_eq(pipe2(pipefd, O_CLOEXEC), 0);
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    int rc = posix_spawnp(&pid, "chromium", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(pipefd[1]);
    cr_assert_eq(rc, 0, "chromium not found: run make deps (mk/dashboard.mk installs it)");
    /* helpers may keep the pipe open after the browser exits: stop at its exit */
    while (time(NULL) < deadline) {
        struct pollfd p = {.fd = pipefd[0], .events = POLLIN};
        char chunk[65536];
        ssize_t n = 0;

        if (poll(&p, 1, 200) > 0 && (n = read(pipefd[0], chunk, sizeof(chunk))) > 0) {
            cr_assert_eq(buf_append(&out, chunk, (size_t)n), 0);
            continue;
        }
        if (n == 0 && p.revents)
            break; /* EOF */
        if (!exited && waitpid(pid, &status, WNOHANG) == pid)
            exited = 1;
        else if (exited)
            break; /* exited and nothing more to read */
    }
    /* EOF can come a moment before the exit: wait for it, to the deadline. */
    while (!exited && time(NULL) < deadline) {
        if (waitpid(pid, &status, WNOHANG) == pid)
            exited = 1;
        else
            usleep(20000);
    }
    if (!exited) {
        if (waitpid(pid, &status, WNOHANG) != pid) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            cr_assert_fail("chromium did not finish within 60 s");
        }
    }
    close(pipefd[0]);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    return out.data;
}

