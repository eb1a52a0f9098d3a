/*
 * tests/cli/test_commands.c: the costrouter command line as a user runs
 * it: the real binary ($COSTROUTER_BIN), its output and exit status.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "tests/support/proc.h"

#define RUN_TIMEOUT_MS 10000

static char conf_path[64];
static struct buf out;

static void teardown(void)
{
    if (conf_path[0])
        unlink(conf_path);
    buf_free(&out);
}

TestSuite(commands, .fini = teardown, .timeout = 30);

static char *bin(void)
{
    return getenv("COSTROUTER_BIN") ? getenv("COSTROUTER_BIN") : "./costrouter";
}

/* Run costrouter with up to three arguments (NULL after the last): its
 * exit status; what it printed on stdout in `out`, NUL-terminated. */
static int run(char *a, char *b, char *c)
{
    char *argv[] = {bin(), a, b, c, NULL};

    buf_reset(&out);
    int rc = support_run(argv, &out, RUN_TIMEOUT_MS);

    cr_assert_eq(buf_append(&out, "", 1), 0);
    return rc;
}

/* A valid config of `nbackends` free backends, as many routes (one per
 * backend) and `ntenants` tenants. */
static void write_conf(int nbackends, int ntenants)
{
    char hex[65];
    FILE *f;
    int fd;

    strcpy(conf_path, "/tmp/costrouter-cli-XXXXXX");
    cr_assert_geq(fd = mkstemp(conf_path), 0);
    cr_assert_not_null(f = fdopen(fd, "w"));
    fprintf(f, "listen: 127.0.0.1:0\nbackends:\n");
    for (int i = 0; i < nbackends; i++)
        fprintf(f, "  - {name: b%d, kind: api, url: \"http://127.0.0.1:9/v1\", free: true}\n", i);
    fprintf(f, "routes:\n");
    for (int i = 0; i < nbackends; i++)
        fprintf(f, "  - {model: m%d, candidates: [b%d]}\n", i, i);
    if (ntenants > 0)
        fprintf(f, "tenants:\n");
    for (int i = 0; i < ntenants; i++) {
        char key[32];

        snprintf(key, sizeof(key), "sk-cli-tenant-%d", i);
        support_key_sha256_hex(key, hex);
        fprintf(f, "  - {id: t%d, api_keys: [\"sha256:%s\"]}\n", i, hex);
    }
    fclose(f);
}

/* The counts --check-config prints agree with their numbers: "1 tenants"
 * was printed before. */
Test(commands, check_config_counts_in_the_singular_and_the_plural)
{
    char want[160];

    write_conf(1, 1);
    cr_assert_eq(run("--check-config", conf_path, NULL), 0, "%s", out.data);
    snprintf(want, sizeof(want), "%s: configuration OK (1 backend, 1 route, 1 tenant)\n",
             conf_path);
    cr_assert_str_eq(out.data, want);
    unlink(conf_path);

    write_conf(2, 0);
    cr_assert_eq(run("--check-config", conf_path, NULL), 0, "%s", out.data);
    snprintf(want, sizeof(want), "%s: configuration OK (2 backends, 2 routes, 0 tenants)\n",
             conf_path);
    cr_assert_str_eq(out.data, want);
}
