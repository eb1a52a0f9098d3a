/*
 * tests/fuzz/fuzz_conf.c: libFuzzer target for the config loader (conf/;
 * `make fuzz-conf`, clang with ASan and UBSan). It runs at start, on
 * --check-config and on every reload, which runs on a thread of the
 * serving router: a crash, a hang or a leak on some YAML takes the router
 * down, or grows it a little at every SIGHUP.
 *
 * The input is the config's text, loaded through conf__load_text as if it
 * were the file ROOT/config.yaml, ROOT being the folder `make fuzz-conf`
 * fills (FUZZ_CONF_ROOT, default build-fuzz/conf-root): the price files
 * the seeds include are there under the names they use, and
 * COSTROUTER_SRC and the seeds' other variables point into it. What
 * follows a line "#%inc%" is written to ROOT/fuzz-inc.yaml first (empty
 * without one), so that a config can include a price file that is fuzzed
 * too. Then:
 * - a load either returns a config and no error text, or NULL and a
 *   report of lines "FILE:LINE: KEY: message", each ending in its only
 *   newline, none with another control byte;
 * - a config's lookups find each of its own backends, routes, tenants,
 *   keys and prices again, and its route candidates are its backends;
 * - loading the same text again gives the same outcome, the same report
 *   word for word (a load keeps no state: reloads repeat it);
 * - ASan's leak check at exit finds nothing: an invalid config leaves
 *   nothing behind.
 *
 * Inputs holding four quotes in a row are skipped: libfyaml 0.7.12 leaks
 * its chunk array (512 bytes and up) inside fy_node_get_scalar when it
 * reads a single-quoted scalar with runs of escaped quotes, e.g.
 * 'a''''''''''''b' (its issue #233, fixed after 0.7.12). Its stack, unwound
 * fast, names no function a suppression could match without hiding every
 * leak of libfyaml's memory, ours included.
 */
#define _GNU_SOURCE /* memmem */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf/conf.h"
#include "conf/internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char config_path[PATH_MAX];
static char include_path[PATH_MAX];

/* Splits the input into the config and fuzz-inc.yaml. */
#define INCLUDE_MARK "\n#%inc%\n"

/* The seeds' variables (tests/conf/test_conf.c sets the same), with
 * values that pass, plus a name of each kind for the dictionary's
 * ${FUZZ_...}. */
static const char *const env[][2] = {
    {"COSTROUTER_ADMIN_KEY", "admin-secret"},
    {"OPENAI_API_KEY", "sk-openai-secret"},
    {"CONF_TEST_HOST", "example.com"},
    {"CONF_TEST_PORT", "8443"},
    {"CONF_TEST_ADMIN", "admin-from-env"},
    {"CONF_TEST_UPSTREAM_KEY", "sk-upstream"},
    {"CONF_TEST_QUALITY", "7"},
    {"CONF_TEST_TEAM", "${CONF_TEST_HOST}"},
    {"FUZZ_EMPTY", ""},
    {"FUZZ_NUMBER", "1e308"},
    {"FUZZ_YAML", "{a: [1, *x]}\n---\n"},
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *root = getenv("FUZZ_CONF_ROOT");
    char abs[PATH_MAX];

    if (realpath(root ? root : "build-fuzz/conf-root", abs) == NULL) {
        perror("fuzz_conf: FUZZ_CONF_ROOT (run it through `make fuzz-conf`)");
        exit(2);
    }
    snprintf(config_path, sizeof(config_path), "%s/config.yaml", abs);
    snprintf(include_path, sizeof(include_path), "%s/fuzz-inc.yaml", abs);
    setenv("COSTROUTER_SRC", abs, 1);
    unsetenv("COSTROUTER_DATA");
    for (size_t i = 0; i < sizeof(env) / sizeof(env[0]); i++)
        setenv(env[i][0], env[i][1], 1);
    /* `include: /dev/stdin` must not wait for a terminal */
    if (freopen("/dev/null", "r", stdin) == NULL)
        exit(2);
    return 0;
}

/* Each line of a failed load's report: "FILE:LINE: ...\n", no other
 * control byte (an echoed value would break the one-line format). */
static void check_report(const char *errors)
{
    const char *line = errors;

    if (errors == NULL || *errors == '\0')
        abort();
    while (*line) {
        const char *nl = strchr(line, '\n'), *colon;

        if (nl == NULL || nl == line)
            abort();
        for (const char *p = line; p < nl; p++)
            if ((unsigned char)*p < 0x20 && *p != '\t')
                abort();
        /* FILE (a path, possibly with ':'), ':', a number, ':' */
        colon = memchr(line, ':', (size_t)(nl - line));
        if (colon == NULL)
            abort();
        line = nl + 1;
    }
}

/* A loaded config finds each of its own entries again. */
static void check_lookups(const struct conf *c)
{
    char summary[128];

    conf_summary(c, summary, sizeof(summary));
    for (size_t i = 0; i < c->nbackends; i++)
        if (conf_find_backend(c, c->backends[i].name) != &c->backends[i])
            abort();
    for (size_t i = 0; i < c->nroutes; i++) {
        const struct conf_route *r = &c->routes[i];

        if (conf_find_route(c, r->model, strlen(r->model)) != r)
            abort();
        for (size_t j = 0; j < r->ncandidates; j++)
            if (r->candidates[j] != &c->backends[r->candidates[j]->index])
                abort();
    }
    for (size_t i = 0; i < c->ntenants; i++) {
        const struct conf_tenant *t = &c->tenants[i];

        if (conf_find_tenant(c, t->id) != t)
            abort();
        for (size_t j = 0; j < t->nkeys; j++)
            if (conf_find_key(c, t->keys[j].hash) != &t->keys[j] ||
                conf_find_tenant_by_key(c, t->key_hashes[j]) != t)
                abort();
    }
    for (size_t i = 0; i < c->nprices; i++)
        if (conf_find_price(c, c->prices[i].name) != &c->prices[i])
            abort();
}

/* Write the input's part after INCLUDE_MARK (if any) to fuzz-inc.yaml;
 * returns the length of the config's part. */
static size_t write_include(const uint8_t *data, size_t size)
{
    const uint8_t *mark = memmem(data, size, INCLUDE_MARK, strlen(INCLUDE_MARK));
    size_t len = mark ? (size_t)(mark - data) : size;
    size_t skip = mark ? len + strlen(INCLUDE_MARK) : size;
    FILE *f = fopen(include_path, "wb");

    if (f == NULL || fwrite(data + skip, 1, size - skip, f) != size - skip || fclose(f) != 0)
        abort();
    return len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *errors = (char *)"unset", *again = (char *)"unset";
    size_t len;
    struct conf *c, *c2;

    if (memmem(data, size, "''''", 4))
        return 0;
    len = write_include(data, size);
    c = conf__load_text(config_path, (const char *)data, len, &errors);
    c2 = conf__load_text(config_path, (const char *)data, len, &again);

    if ((c == NULL) != (c2 == NULL))
        abort();
    if (c) {
        if (errors != NULL || again != NULL)
            abort();
        check_lookups(c);
    } else {
        check_report(errors);
        if (strcmp(errors, again) != 0)
            abort();
    }
    conf_free(c);
    conf_free(c2);
    free(errors);
    free(again);
    return 0;
}
