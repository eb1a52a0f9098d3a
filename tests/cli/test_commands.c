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

/* The options `costrouter tokens --help` lists ("  --NAME" lines). */
static void tokens_options(char names[][32], int *n)
{
    char *line, *save = NULL;

    cr_assert_eq(run("tokens", "--help", NULL), 0, "tokens --help exits 0");
    *n = 0;
    for (line = strtok_r(out.data, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        if (strncmp(line, "  --", 4) == 0 && *n < 16)
            sscanf(line + 2, "%31s", names[(*n)++]);
}

/* Lines of the README that show `costrouter tokens`, NUL-terminated. */
static void readme_tokens_lines(struct buf *lines)
{
    char path[512], line[1024];
    const char *src = getenv("COSTROUTER_SRC");
    FILE *f;

    snprintf(path, sizeof(path), "%s/README.md", src ? src : ".");
    cr_assert_not_null(f = fopen(path, "r"), "%s", path);
    while (fgets(line, sizeof(line), f))
        if (strstr(line, "costrouter tokens"))
            cr_assert_eq(buf_append(lines, line, strlen(line)), 0);
    fclose(f);
    cr_assert_eq(buf_append(lines, "", 1), 0);
}

/* `costrouter --help` lists the tokens subcommand's options, each of
 * them, and so does `costrouter tokens --help` (which went to stderr with
 * status 2, as a usage error); the README shows every one. Before, the
 * main help named neither --ids nor --data nor the estimate encoding. */
Test(commands, help_lists_the_tokens_options_as_the_readme_does)
{
    char names[16][32];
    struct buf readme = {0};
    int n;

    tokens_options(names, &n);
    cr_assert_geq(n, 4, "tokens --help lists %d options:\n%s", n, out.data);
    cr_assert_eq(run("--help", NULL, NULL), 0);
    readme_tokens_lines(&readme);
    for (int i = 0; i < n; i++) {
        cr_assert_not_null(strstr(out.data, names[i]), "costrouter --help lacks %s:\n%s",
                           names[i], out.data);
        cr_assert_not_null(strstr(readme.data, names[i]), "the README shows no %s", names[i]);
    }
    cr_assert_not_null(strstr(out.data, "estimate"), "%s", out.data);
    cr_assert_not_null(strstr(out.data, "costrouter tokens --help"), "%s", out.data);
    buf_free(&readme);
}

/* What `costrouter tokens --encoding o200k_base MODE` prints for `json`. */
static long prompt_tokens_of(char *mode, const char *json)
{
    char path[] = "/tmp/costrouter-cli-req-XXXXXX";
    int fd = mkstemp(path);
    char *argv[] = {bin(), "tokens", "--encoding", "o200k_base", mode, path, NULL};

    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, json, strlen(json)), (ssize_t)strlen(json));
    close(fd);
    buf_reset(&out);
    cr_assert_eq(support_run(argv, &out, RUN_TIMEOUT_MS), 0, "tokens %s failed", mode);
    unlink(path);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    return strtol(out.data, NULL, 10);
}

/* --responses counts a Responses API request as --chat counts the same
 * messages: the estimate the router holds it for. */
Test(commands, tokens_counts_a_responses_request_as_its_chat_twin)
{
    long chat = prompt_tokens_of("--chat", "{\"messages\":[{\"role\":\"system\",\"content\":"
                                           "\"Be terse.\"},{\"role\":\"user\",\"content\":"
                                           "\"Hello there\"}]}");
    long responses = prompt_tokens_of("--responses", "{\"instructions\":\"Be terse.\","
                                                     "\"input\":\"Hello there\"}");

    cr_assert_gt(chat, 0);
    cr_assert_eq(responses, chat);
}

/* --messages prints the router's estimate of an Anthropic Messages
 * request: its system prompt and message framed as chat's are, but for
 * the system prompt's role name, which the Messages API does not carry
 * ("system" is one o200k token). */
Test(commands, tokens_counts_a_messages_request_as_the_router_estimates_it)
{
    long chat = prompt_tokens_of("--chat", "{\"messages\":[{\"role\":\"system\",\"content\":"
                                           "\"Be terse.\"},{\"role\":\"user\",\"content\":"
                                           "\"Hello there\"}]}");
    long messages = prompt_tokens_of("--messages", "{\"system\":\"Be terse.\",\"max_tokens\":5,"
                                                   "\"messages\":[{\"role\":\"user\",\"content\":"
                                                   "[{\"type\":\"text\",\"text\":\"Hello there\"}]}]}");

    cr_assert_gt(chat, 0);
    cr_assert_eq(messages, chat - 1);
}

/* --encoding estimate counts from bytes (a quarter token per ASCII byte,
 * 0.4 per other byte, rounded up), which needs no token table: it worked
 * only where the tables were, failing "cannot load token tables"
 * elsewhere. */
Test(commands, tokens_estimate_needs_no_token_tables)
{
    char path[] = "/tmp/costrouter-cli-text-XXXXXX";
    int fd = mkstemp(path);
    char *argv[] = {bin(), "tokens", "--encoding", "estimate", "--data", "/nonexistent", path, NULL};
    int rc;

    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, "hello", 5), 5);
    close(fd);
    buf_reset(&out);
    rc = support_run(argv, &out, RUN_TIMEOUT_MS);
    unlink(path);
    cr_assert_eq(buf_append(&out, "", 1), 0);
    cr_assert_eq(rc, 0, "tokens --encoding estimate failed: %s", out.data);
    cr_assert_str_eq(out.data, "2\n");
}
