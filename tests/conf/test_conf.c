/*
 * tests/conf/test_conf.c: conf/ against real files.
 *
 * The error cases are a table: each names a file (most in
 * tests/conf/data/), the environment to load it with, every line the
 * report must hold (exactly, in order, nothing else) and secrets that must
 * not appear in it. A line for an included file starts with its name
 * relative to the case file's folder. The other tests load valid files (conf/demo.yaml,
 * conf/example.yaml, generated ones) and check the parsed values and the
 * lookups.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conf/conf.h"

/* `rel` under the source tree (COSTROUTER_SRC, set by tests/run.sh). */
static const char *src_path(const char *rel)
{
    static char path[2048];
    const char *src = getenv("COSTROUTER_SRC");

    snprintf(path, sizeof(path), "%s/%s", src ? src : ".", rel);
    return path;
}

/* Apply "NAME=value" settings; "NAME" alone unsets NAME. */
static void set_env(const char *const *env)
{
    for (; env && *env; env++) {
        const char *eq = strchr(*env, '=');
        char name[128];

        if (eq == NULL) {
            unsetenv(*env);
            continue;
        }
        snprintf(name, sizeof(name), "%.*s", (int)(eq - *env), *env);
        setenv(name, eq + 1, 1);
    }
}

static struct conf *load_ok(const char *rel)
{
    char *errors = (char *)"unset";
    struct conf *c = conf_load(src_path(rel), &errors);

    cr_assert_not_null(c, "%s failed to load:\n%s", rel, errors ? errors : "(no text)");
    cr_assert_null(errors);
    return c;
}

/* ---- the error table ---- */

#define ERROR_LINES_MAX 32 /* report lines a case may expect */

struct error_case {
    const char *file;          /* relative to the source tree */
    const char *env[7];        /* "NAME=value" to set, "NAME" to unset; NULL-ended */
    const char *lines[ERROR_LINES_MAX]; /* expected report lines, after "PATH:" */
    const char *absent[5];     /* must not appear anywhere in the report */
};

#define DATA "tests/conf/data/"
/* experiments[2] of experiments_bad.yaml is for all tenants of its route. */
#define SHADOWED_BY_2                                                                              \
    "never applies: experiments[2] on the same route takes every tenant first (the first "        \
    "experiment that applies wins)"
#define SH "missing: a self_hosted backend needs it unless it says free: true"
#define BLANK_END                                                                                  \
    "has a blank at its start or end, which an HTTP header does not carry: it could never match"
#define API                                                                                \
    "missing: an api backend needs it (or a price entry named by price: or model) unless it "   \
    "says free: true"
#define BADKEY "expected \"sha256:\" and 64 hex digits (the SHA-256 of the key, never the key " \
               "itself)"
#define RANGE64 "out of range 0..1000000000000"
/* The key of control_long.yaml as far as its error's path holds it. */
#define X01_8 "\\x01\\x01\\x01\\x01\\x01\\x01\\x01\\x01"
#define X01_59 X01_8 X01_8 X01_8 X01_8 X01_8 X01_8 X01_8 "\\x01\\x01\\x01"

static struct error_case error_cases[] = {
    {.file = DATA "anthropic_bad.yaml", .lines =
     {"4: backends[0].api: unknown value \"antropic\" (expected one of: openai, anthropic)",
      "8: backends[0].cache_write_usd_per_mtok: -1 is out of range 0..1e+06",
      "9: backends[0].web_search_usd_per_1k: -10 is out of range 0..1e+06",
      "17: backends[1].cache_write_usd_per_mtok: only applies to kind: api",
      "18: backends[1].web_search_usd_per_1k: only applies to kind: api",
      "19: backends[1].cost_from_usage: only applies to kind: api",
      "20: backends[1].file_search_usd_per_1k: only applies to kind: api",
      "22: prices.p.cache_write_usd_per_mtok: expected a number, got \"lots\"",
      "23: prices.q.web_search_usd_per_1k: 2e+06 is out of range 0..1e+06",
      "24: prices.q.file_search_usd_per_1k: -1 is out of range 0..1e+06"}},
    {.file = DATA "unknown_keys.yaml", .lines =
     {"3: cost_logg: unknown key (did you mean \"cost_log\"?)",
      "5: store.redsi: unknown key (did you mean \"redis\"?)",
      "10: backends[0].qualty: unknown key (did you mean \"quality\"?)",
      "13: backends[0].colour: unknown key",
      "20: tenants[0].budget.monthy_usd: unknown key (did you mean \"monthly_usd\"?)"}},
    {.file = DATA "read_timeout_bad.yaml", .lines =
     {"4: backends[0].read_timeout_ms: 0 is out of range 1..86400000",
      "6: backends[1].read_timeout_ms: 86400001 is out of range 1..86400000",
      "8: backends[2].read_timeout_ms: expected an integer, got \"soon\""}},
    {.file = DATA "types.yaml", .lines =
     {"2: listen: needs HOST:PORT with a port in 0..65535",
      "4: limits.max_body_bytes: expected an integer, got \"lots\"",
      "5: limits.max_retries: -1 is out of range 0..100",
      "6: store.on_failure: unknown value \"fail_sometimes\" (expected one of: fail_open, "
      "fail_closed)",
      "11: backends[0].tokenizer: unknown value \"gpt2\" (expected one of: estimate, "
      "cl100k_base, o200k_base, llama3)",
      "12: backends[0].quality: -1 is out of range 0..1000000",
      "13: backends[0].context_window: expected an integer, got \"1.5\"",
      "14: backends[0].gpu_hourly_usd: -2 is out of range 0..1e+06",
      "15: backends[0].replicas: 0 is out of range 1..1000000",
      "18: backends[0].tls_verify: expected true or false, got \"maybe\"",
      "20: backends[1].kind: unknown value \"apii\" (expected one of: api, self_hosted)",
      "22: backends[1].input_usd_per_mtok: expected a number, got \"1e400\"",
      "23: backends[1].output_usd_per_mtok: expected a number, got \"nan\"",
      "24: backends[1].connect_timeout_ms: 0 is out of range 1..86400000",
      "25: backends[1].ttft_stale_ms: -1 is out of range 0..86400000",
      "26: backends[2].name: may only hold letters, digits and . _ - : / @ +",
      "30: backends[2].auth_header: is not a valid HTTP header name",
      "31: backends[2].ca_file: cannot read \"/nonexistent/ca.pem\": No such file or directory",
      "34: routes[0].candidates: expected a list, got a scalar",
      "35: tenants: expected a list, got a mapping",
      "36: admin_reload_timeout_ms: 0 is out of range 1..86400000"}},
    {.file = DATA "cross.yaml", .lines =
     {"3: backends[0].replicas: " SH, "3: backends[0].max_concurrency: " SH,
      "3: backends[0].tokens_per_second: " SH,
      "8: backends[0].input_usd_per_mtok: only applies to kind: api",
      "9: backends[1].input_usd_per_mtok: " API,
      "14: backends[1].replicas: only applies to kind: self_hosted",
      "15: backends[2].name: duplicate backend \"gpu-a\" (first at line 3)",
      "22: routes[0].candidates[1]: unknown backend \"gpu-b\"",
      "22: routes[0].candidates[3]: backend \"api-b\" is listed twice",
      "25: routes[2].model: duplicate route \"chat\" (first at line 21)",
      "31: tenants[0].slo.min_quality: 3 is above the quality of every route candidate "
      "(best: 2)",
      "35: tenants[1].api_keys[1]: duplicate key (first at line 30)",
      "36: tenants[2].id: duplicate tenant \"t1\" (first at line 28)"}},
    {.file = DATA "missing.yaml", .lines =
     {"2: (top level): missing required key \"routes\"",
      "3: backends[0]: missing required key \"url\"",
      "7: backends[1]: missing required key \"name\"",
      "11: tenants[0]: missing required key \"api_keys\""}},
    {.file = DATA "env.yaml",
     .env = {"CONF_TEST_HOST", "CONF_TEST_PORT=1", "CONF_TEST_ADMIN", "CONF_TEST_UPSTREAM_KEY",
      "CONF_TEST_QUALITY", "CONF_TEST_TEAM"},
     .lines = {"2: listen: environment variable CONF_TEST_HOST is not set",
      "3: admin_key: environment variable CONF_TEST_ADMIN is not set",
      "4: cost_log: environment variable CONF_TEST_HOST is not set",
      "8: backends[0].url: environment variable CONF_TEST_HOST is not set",
      "9: backends[0].api_key: environment variable CONF_TEST_UPSTREAM_KEY is not set",
      "11: backends[0].quality: environment variable CONF_TEST_QUALITY is not set",
      "20: tenants[0].tags.team: environment variable CONF_TEST_TEAM is not set"}},
    {.file = DATA "env.yaml",
     .env = {"CONF_TEST_HOST=example.com", "CONF_TEST_PORT=99999", "CONF_TEST_ADMIN=a",
      "CONF_TEST_UPSTREAM_KEY=sk-upstream-in-env", "CONF_TEST_QUALITY=sk-put-in-the-wrong-key",
      "CONF_TEST_TEAM=t"},
     .lines = {"2: listen: needs HOST:PORT with a port in 0..65535",
      "8: backends[0].url: has a port outside 1..65535",
      /* as written: the value may be a secret in the wrong key */
      "11: backends[0].quality: expected an integer, got \"${CONF_TEST_QUALITY}\""},
     .absent = {"sk-upstream-in-env", "sk-put-in-the-wrong-key"}},
    {.file = DATA "env_bad.yaml",
     .lines = {"2: listen: has a \"${\" without its closing \"}\"",
               "3: cost_log: has an invalid variable name in \"${...}\"",
               "4: admin_key: has an invalid variable name in \"${...}\"",
               "6: backends[0].name: has an invalid variable name in \"${...}\"",
               "8: routes[0].candidates[0]: unknown backend \"a\""}},
    {.file = DATA "secrets.yaml",
     .env = {"CONF_TEST_SECRET_WITH_NEWLINE=admin-secret-part1\nadmin-secret-part2",
      "CONF_TEST_UNSET_SECRET"},
     .lines = {"2: admin_key: contains control characters",
      "3: store.redis: has a port outside 1..65535",
      "7: backends[0].url: must not hold credentials: use api_key",
      "8: backends[0].api_key: environment variable CONF_TEST_UNSET_SECRET is not set",
      "16: tenants[0].api_keys[0]: expected \"sha256:\" and 64 hex digits (the SHA-256 of the "
      "key, never the key itself)"},
     .absent = {"admin-secret", "hunter2", "sk-in-url-secret", "sk-raw-tenant-secret"}},
    {.file = DATA "secret_blanks.yaml", .env = {"CONF_TEST_BLANK_ADMIN=adm-blank-secret "},
     .lines = {"4: admin_key: " BLANK_END, "9: backends[0].api_key: " BLANK_END},
     .absent = {"adm-blank-secret", "sk-blank-upstream-secret"}},
    {.file = DATA "urls.yaml", .lines =
     {"2: listen: has an invalid port",
      "4: backends[0].url: must start with http:// or https://",
      "5: backends[1].url: has no host",
      "6: backends[2].url: must not have a fragment",
      "7: backends[3].url: has a port outside 1..65535",
      "8: backends[4].url: has an invalid IPv6 address",
      "9: backends[5].url: must not contain spaces or control characters",
      "10: backends[6].url: must not have a fragment",
      "11: backends[7].url: has an empty query after its '?'",
      "12: backends[8].url: has an empty parameter in its query ('&&', or a '&' at an end)",
      "13: backends[9].url: has an empty parameter in its query ('&&', or a '&' at an end)",
      "14: backends[10].url: has an empty parameter in its query ('&&', or a '&' at an end)",
      "15: backends[11].url: has a parameter without a name in its query",
      "16: backends[12].url: has a '%' in its query without two hex digits after it",
      "17: backends[13].url: has a '%' in its query without two hex digits after it",
      "18: backends[14].url: has a character its query may not hold as it is: percent-encode it",
      "19: backends[15].url: has a character its query may not hold as it is: percent-encode it"},
     /* a query may hold a key (?key=): no error quotes it */
     .absent = {"sk-query-secret"}},
    {.file = DATA "syntax.yaml",
     .lines = {"5: (yaml): flow sequence without a closing bracket"}},
    {.file = DATA "candidates_too_many.yaml",
     .lines = {"72: routes[1].candidates: has 65 backends, more than the 64 a route may have"}},
    {.file = DATA "experiments_shadowed.yaml",
     .lines = {"15: experiments[1].tenants[1]: never applies to tenant \"t\": experiments[0] on the "
               "same route takes it first (the first experiment that applies wins)",
               "17: experiments[3].route: never applies: experiments[2] on the same route takes "
               "every tenant first (the first experiment that applies wins)"}},
    {.file = DATA "experiments_shadowed_more.yaml",
     .lines = {"20: experiments[2].route: never applies: experiments[1] on the same route takes "
               "every tenant first (the first experiment that applies wins)",
               "22: experiments[4]: missing required key \"route\"",
               "23: experiments[5].tenants[1]: expected a single value, got a mapping",
               "23: experiments[5].route: never applies: experiments[1] on the same route takes "
               "every tenant first (the first experiment that applies wins)"}},
    {.file = DATA "alias_bomb.yaml",
     .lines = {"7: (yaml): aliases expand to more than 100000 nodes, or nest more than 256 deep"}},
    {.file = DATA "two_documents.yaml",
     .lines = {"7: (yaml): a second document: a config file holds one (no \"---\" after the first)"}},
    {.file = DATA "second_document_broken.yaml",
     .lines = {"7: (yaml): flow sequence without a closing bracket"}},
    {.file = DATA "dupkeys.yaml", .lines =
     {"4: listen: duplicate key (first at line 3)",
      "5: listen: duplicate key (first at line 3)",
      "8: limits.max_retries: duplicate key (first at line 7)",
      "9: cache.ttl_s: duplicate key (first at line 9)",
      "16: backends[2].<<: duplicate key (first at line 16)",
      "19: backends[3].name: duplicate key (first at line 17)",
      "28: tenants[0].budget.daily_usd: duplicate key (first at line 28)",
      "29: tenants[0].tags.team: duplicate key (first at line 29)"}},
    {.file = DATA "dupkeys_alias.yaml",
     .lines = {"4: cost_log: duplicate key (first at line 3)"}},
    {.file = DATA "dupkeys_empty.yaml",
     .lines = {"5: (top level): duplicate key \"\" (first at line 3)"}},
    {.file = DATA "dupkeys_complex.yaml", .lines = {"4: (yaml): duplicate key"}},
    {.file = DATA "dupkeys_include.yaml", .lines =
     {"4: backends[0].price: unknown price \"x\" (no prices are defined: include a price file)",
      "inc/dupkeys.yaml:6: prices.x.input_usd_per_mtok: duplicate key (first at line 4)"}},
    {.file = DATA "empty.yaml", .lines = {"1: (top level): the file is empty"}},
    {.file = DATA "zero_bytes.yaml", .lines = {"1: (top level): the file is empty"}},
    {.file = DATA "no-such-file.yaml", .lines =
     {"1: (file): cannot open: No such file or directory"}},
    {.file = "conf/example.yaml",
     .env = {"COSTROUTER_ADMIN_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"},
     .lines = {"17: admin_key: environment variable COSTROUTER_ADMIN_KEY is not set",
      "120: backends[1].api_key: environment variable OPENAI_API_KEY is not set",
      "174: backends[3].api_key: environment variable ANTHROPIC_API_KEY is not set"}},
    {.file = DATA "prices_bad.yaml", .lines =
     {"5: include[2]: \"inc/prices_bad.yaml\" is already included",
      "8: prices.custom-x: duplicate price \"custom-x\" (first at {DIR}/inc/prices_bad.yaml:3)",
      "9: prices.bad name: may only hold letters, digits and . _ - : / @ +",
      "10: prices.empty-entry: expected a mapping of prices, got nothing",
      "12: backends[0].price: unknown price \"nope\"",
      "13: backends[1].input_usd_per_mtok: " API, "13: backends[1].output_usd_per_mtok: " API,
      "14: backends[2].price: only applies to kind: api",
      "18: backends[4].long_context: missing required key \"above_prompt_tokens\" (no price "
      "entry gives one)",
      "20: backends[5].long_context: missing required key \"input_usd_per_mtok\" (no price "
      "entry gives one)",
      "20: backends[5].long_context: missing required key \"output_usd_per_mtok\" (no price "
      "entry gives one)",
      "22: backends[6].long_context: only applies to kind: api",
      "25: backends[7].flex: missing required key \"output_usd_per_mtok\" (no price entry "
      "gives one)",
      "27: backends[8].priority: only applies to kind: api",
      "inc/prices_bad.yaml:6: prices.half: missing required key \"output_usd_per_mtok\"",
      "inc/prices_bad.yaml:11: prices.typo.cached_inptu_usd_per_mtok: unknown key (did you mean "
      "\"cached_input_usd_per_mtok\"?)",
      "inc/prices_bad.yaml:12: prices.neg.input_usd_per_mtok: -1 is out of range 0..1e+06",
      "inc/prices_bad.yaml:12: prices.neg.output_usd_per_mtok: expected a number, got \"lots\"",
      "inc/prices_bad.yaml:16: prices.long-half.long_context: missing required key "
      "\"output_usd_per_mtok\"",
      "inc/prices_bad.yaml:20: prices.long-zero.long_context.above_prompt_tokens: 0 is out of "
      "range 1..1000000000000",
      "inc/prices_bad.yaml:21: prices.long-zero.long_context.cached_input: unknown key",
      "inc/prices_bad.yaml:25: prices.flex-half.priority: missing required key "
      "\"input_usd_per_mtok\"",
      "inc/prices_bad.yaml:26: prices.flex-half.flex.above_prompt_tokens: unknown key",
      "inc/prices_bad.yaml:27: backends: unknown key",
      "inc/no_such_prices.yaml:1: (file): cannot open: No such file or directory",
      "inc/syntax.yaml:3: (yaml): missing comma in flow mapping"}},
    {.file = DATA "tenants_bad.yaml", .lines =
     {"10: tenants[0].api_keys[1]: missing required key \"hash\"",
      "11: tenants[0].api_keys[2].hash: " BADKEY,
      "12: tenants[0].api_keys[3].rpn: unknown key (did you mean \"rpm\"?)",
      "12: tenants[0].api_keys[3].name: duplicate key name \"k1\" (first at line 9)",
      "13: tenants[0].api_keys[4].tpm: -5 is " RANGE64,
      "14: tenants[0].api_keys[5]: expected a single value, got a list",
      "15: tenants[0].budget.soft_limit_pct: 101 is out of range 0..100",
      "15: tenants[0].budget.on_overrun: unknown value \"stop\" (expected one of: charge, cut)",
      "16: tenants[0].rate_limits.rpm: -1 is " RANGE64,
      "16: tenants[0].rate_limits.tpm: expected an integer, got \"many\"",
      "16: tenants[0].rate_limits.rps: unknown key (did you mean \"rpm\"?)",
      "18: tenants[1].api_keys[0]: duplicate key (first at line 9)",
      "19: tenants[1].budget.soft_limit_pct: needs a budget (daily_usd or monthly_usd, the "
      "tenant's or a key's) to apply to",
      "20: tenants[1].models[4]: expected a single value, got a list",
      "20: tenants[1].models[1]: unknown model \"nope\" (no route has it)",
      "20: tenants[1].models[3]: unknown model \"\" (no route has it)",
      "20: tenants[1].models[2]: model \"chat\" is listed twice",
      "23: tenants[2].models: must not be empty",
      "27: tenants[3].api_keys[0].models[0]: unknown model \"nope\" (no route has it)",
      "27: tenants[3].api_keys[0].models[2]: model \"chat\" is listed twice",
      "30: tenants[4].api_keys[0].budget: needs the key's \"name\" (its spend is counted and "
      "shown under it)",
      "32: tenants[4].api_keys[1].budget.daily_usd: -1 is out of range 0..1e+12",
      "32: tenants[4].api_keys[1].budget.monthly_usd: expected a number, got \"lots\"",
      "32: tenants[4].api_keys[1].budget.on_exhausted: unknown key"},
     .absent = {"sk-raw-secret-in-hash"}},
    {.file = DATA "experiments_bad.yaml", .lines =
     {"13: experiments[0].tenants[1]: unknown tenant \"t9\"",
      "14: experiments[0].user_header: is not a valid HTTP header name",
      "15: experiments[0].arms: the weights sum to 0: at least one arm needs a weight above 0",
      "16: experiments[0].arms[0].backends[1]: backend \"c\" is not a candidate of route "
      "\"chat\"",
      "16: experiments[0].arms[0].backends[2]: unknown backend \"nope\"",
      "16: experiments[0].arms[0].backends[3]: backend \"a\" is listed twice",
      "17: experiments[0].arms[1].name: duplicate arm \"one\" (first at line 16)",
      "18: experiments[0].arms[2].weight: -1 is out of range 0..1000000",
      "19: experiments[1].name: duplicate experiment \"e1\" (first at line 11)",
      "20: experiments[1].route: unknown route \"chatt\"",
      "25: experiments[2].arms: must not be empty",
      "26: experiments[3]: missing required key \"name\"",
      "26: experiments[3].route: " SHADOWED_BY_2,
      "27: experiments[3].arms[0]: missing required key \"name\"",
      "29: experiments[4].route: " SHADOWED_BY_2,
      "30: experiments[4].arms[0].backends: must not be empty",
      "30: experiments[4].arms[0].name: experiment and arm names together must be at most 91 "
      "characters (they make the reason \"ab:EXPERIMENT/ARM\")"}},
    /* A section, an include or an experiment's tenants of the wrong shape:
     * one error each, not also "missing required key"s for the keys of a
     * mapping that is not there, a file named "~", or a later experiment
     * of the route reported shadowed by one whose tenants are unreadable. */
    {.file = DATA "malformed_sections.yaml", .lines =
     {"2: include[0]: expected a file name, got nothing",
      "4: prices.p.long_context: expected a mapping, got a scalar",
      "5: prices.q.flex: expected a mapping, got a list",
      "9: backends[1].long_context: expected a mapping, got a scalar",
      "11: backends[2].flex: expected a mapping, got a scalar",
      "19: experiments[0].tenants: expected a list, got a scalar",
      "21: experiments[2].tenants: expected a list, got a mapping",
      "23: experiments[4].tenants: must not be empty"}},
    {.file = DATA "tls_bad.yaml", .lines =
     {"4: tls.cert_file: cannot read \"/nonexistent/server.crt\": No such file or directory",
      "4: tls.key_file: is required with tls.cert_file",
      "5: tls.key_flie: unknown key (did you mean \"key_file\"?)"}},
    {.file = DATA "tls_key_only.yaml", .lines =
     {"3: tls.cert_file: is required with tls.key_file"}},
    {.file = DATA "store_cache_bad.yaml", .lines =
     {"2: tokenizer_data: cannot read \"/nonexistent/tokens\": No such file or directory",
      "4: store.key_prefix: must not contain '{', '}' or spaces",
      "5: store.connect_timeout_ms: 0 is out of range 1..86400000",
      "6: store.command_timeout_ms: expected an integer, got \"soon\"",
      "7: store.reservation_ttl_ms: 10 is out of range 1000..604800000",
      "9: cache.ttl_s: 0 is out of range 1..31536000",
      "11: cache.local_bytes: 1024 is smaller than cache.max_entry_bytes (2048)",
      "12: cache.shraed: unknown key (did you mean \"shared\"?)",
      "18: cost_log_buffer_max: 1024 is out of range 4096..1073741824",
      "19: cost_log_wait_ms: 0 is out of range 1..86400000"}},
    {.file = DATA "journal_file_no_redis.yaml", .lines =
     {"3: store.journal_file: needs store.redis (the in-process store has no journal; its "
      "spend is kept across a restart by store.spend_file)"}},
    {.file = DATA "spend_file_redis.yaml", .lines =
     {"4: store.spend_file: is for the in-process store (with store.redis, Redis keeps the "
      "spend; store.journal_file keeps what it has not taken yet across a stop)"}},
    {.file = DATA "spend_file_bad.yaml", .lines =
     {"3: store.spend_file: cannot write files in the folder of \"/nonexistent/spend.jsonl\": "
      "No such file or directory"}},
    {.file = DATA "journal_file_bad.yaml", .lines =
     {"4: store.journal_file: cannot write files in the folder of \"/nonexistent/journal.jsonl\": "
      "No such file or directory"}},
    {.file = DATA "names_long.yaml", .lines =
     {"4: store.key_prefix: is longer than 128 characters",
      "9: routes[1].model: is longer than 200 characters",
      "11: tenants[0].id: is longer than 200 characters"}},
    {.file = DATA "names_reserved.yaml", .lines =
     {"5: backends[0].name: \"cache\" is reserved: the router's metrics use it for their own",
      "6: backends[1].name: \"none\" is reserved: the router's metrics use it for their own",
      "10: routes[1].model: \"unknown\" is reserved: the router's metrics use it for their own",
      "13: tenants[0].id: \"unauthenticated\" is reserved: the router's metrics use it for "
      "their own"}},
    {.file = DATA "cache_flags.yaml", .lines =
     {"2: tokenizer_data: \"/dev/null\" is not a folder",
      "3: cache.enabled: expected true or false, got \"perhaps\"",
      "3: cache.max_entry_bytes: 0 is out of range 1..536870912",
      "4: include: must not be empty"}},
    {.file = DATA "control_chars.yaml", .lines =
     {"3: cost\\x0alog: unknown key",
      "4: include: contains control characters",
      "6: backends[0].x\\x09y: unknown key",
      "10: prices.p\\x0dq: may only hold letters, digits and . _ - : / @ +",
      "14: tenants[0].tags.te\\x1bam: needs a value",
      "15: u\\x1fv\\x7fw: unknown key"}},
    /* 59 of its 70 escapes fit the path's 256 bytes. */
    {.file = DATA "control_long.yaml", .lines =
     {"10: tenants[0].tags." X01_59 ": needs a value"}},
    {.file = DATA "utf8_bad.yaml", .lines =
     {"7: (yaml): not UTF-8 text: byte 0xe9 at column 6"}},
    {.file = DATA "nul_byte.yaml", .lines = {"6: (yaml): a NUL byte at column 11"}},
    {.file = DATA "keys_nul.yaml", .lines =
     {"4: backends[0].price: unknown price \"p\" (no prices are defined: include a price "
      "file)",
      "8: prices.p\\x00x: contains a NUL byte",
      "9: prices: price names must not be empty",
      "13: tenants[0].tags.a\\x00b: contains a NUL byte"}},
    {.file = DATA "directive_utf8.yaml", .lines =
     {"2: (yaml): not UTF-8 text: byte 0xff at column 3"}},
    {.file = DATA "cors_bad.yaml", .lines =
     {"3: cors.allow_origins: http://localhost:3000 is listed twice",
      "4: cors.allow_origins: an origin has no path, query or trailing '/' (write "
      "scheme://host[:port])",
      "5: cors.allow_origins: expected scheme://host[:port], such as https://app.example.com",
      "6: cors.allow_origins: \"null\" is sent by sandboxed frames and file: pages, which any "
      "site can make: it cannot be allowed",
      "7: cors.allow_origins: the port is not a number from 1 to 65535",
      "8: cors.allow_origins: the host holds a character no origin has",
      "11: cors.allow_origins: the host is no [IPv6 address]",
      "12: cors.allow_origins: browsers send an origin without its scheme's default port: "
      "leave it out",
      "13: cors.max_age_s: 90000 is out of range 0..86400"}},
    {.file = DATA "cors_star.yaml", .lines =
     {"2: cors.allow_origins: \"*\" allows every origin: list it alone"}},
};

/* The expected form of report line `want`: "FILE:" + want, where FILE is
 * `path`, or its folder + "/" for a line naming an included file; every
 * "{DIR}" becomes that folder. */
static void expected_line(char *out, size_t size, const char *path, const char *want)
{
    const char *slash = strrchr(path, '/'), *colon = strchr(want, ':'), *dir;
    int dirlen = slash ? (int)(slash - path) : 1;
    size_t o;

    dir = slash ? path : ".";
    if (colon && memchr(want, '.', (size_t)(colon - want)))
        o = (size_t)snprintf(out, size, "%.*s/", dirlen, dir);
    else
        o = (size_t)snprintf(out, size, "%s:", path);
    for (; *want && o + 1 < size; want++) {
        if (strncmp(want, "{DIR}", 5) == 0) {
            o += (size_t)snprintf(out + o, size - o, "%.*s", dirlen, dir);
            want += 4;
        } else {
            out[o++] = *want;
        }
    }
    out[o < size ? o : size - 1] = '\0';
}

#define NCASES (sizeof(error_cases) / sizeof(error_cases[0]))

/* Criterion copies the parameters into each test process, which is a new
 * exec with its own address layout: pointers to static strings would
 * dangle there. So the parameter is an index into error_cases. */
ParameterizedTestParameters(conf, errors)
{
    static size_t index[NCASES];

    for (size_t i = 0; i < NCASES; i++)
        index[i] = i;
    return cr_make_param_array(size_t, index, NCASES);
}

ParameterizedTest(size_t *case_index, conf, errors, .timeout = 10)
{
    const struct error_case *tc = &error_cases[*case_index];
    char *errors = NULL, *line, *save = NULL, want[4096];
    const char *path = src_path(tc->file);
    struct conf *c;
    size_t n = 0;

    set_env(tc->env);
    c = conf_load(path, &errors);
    cr_assert_null(c, "%s loaded but should not have", tc->file);
    cr_assert_not_null(errors);
    for (size_t i = 0; i < 5 && tc->absent[i]; i++)
        cr_expect_null(strstr(errors, tc->absent[i]), "%s: a secret leaked into:\n%s", tc->file,
                       errors);
    for (line = strtok_r(errors, "\n", &save); line; line = strtok_r(NULL, "\n", &save), n++) {
        cr_assert_lt(n, ERROR_LINES_MAX, "%s: more errors than expected: %s", tc->file, line);
        cr_assert_not_null(tc->lines[n], "%s: unexpected extra error: %s", tc->file, line);
        expected_line(want, sizeof(want), path, tc->lines[n]);
        cr_expect_str_eq(line, want, "%s: error %zu", tc->file, n);
    }
    cr_expect(n == ERROR_LINES_MAX || tc->lines[n] == NULL, "%s: missing error: %s", tc->file,
              n < ERROR_LINES_MAX ? tc->lines[n] : "");
    free(errors);
}

/* ---- valid files ---- */

Test(conf, cors_origins_kept_lowercase_and_sorted, .timeout = 10)
{
    struct conf *c = load_ok(DATA "cors_ok.yaml");

    cr_assert_eq(c->ncors_origins, 3);
    cr_expect_str_eq(c->cors_origins[0], "http://localhost:3000");
    cr_expect_str_eq(c->cors_origins[1], "https://[::1]:8443");
    cr_expect_str_eq(c->cors_origins[2], "https://app.example.com");
    cr_expect_eq(c->cors_max_age_s, 0);
    cr_expect_not(conf_cors_any(c));
    for (size_t i = 0; i < 3; i++)
        cr_expect(conf_cors_allows(c, c->cors_origins[i], strlen(c->cors_origins[i])), "%zu", i);
    /* a prefix of one, or one with more after it, is another origin */
    cr_expect_not(conf_cors_allows(c, "http://localhost:30", 19));
    cr_expect_not(conf_cors_allows(c, "http://localhost:30000", 22));
    cr_expect_not(conf_cors_allows(c, "https://app.example.com.evil", 28));
    cr_expect_not(conf_cors_allows(c, "http://a", 8));
    conf_free(c);
}

Test(conf, demo_loads_with_its_values_and_defaults, .timeout = 10)
{
    struct conf *c = load_ok("conf/demo.yaml");
    const struct conf_backend *gpu, *api;
    const struct conf_tenant *t;

    cr_expect_str_eq(c->listen_host, "127.0.0.1");
    cr_expect_eq(c->listen_port, 8080);
    cr_expect_str_eq(c->cost_log, "build/demo-cost.jsonl");
    cr_expect_eq(c->cost_log_buffer_max, 16 * 1024 * 1024);
    cr_expect_eq(c->cost_log_wait_ms, 30000);
    cr_expect_null(c->admin_key);
    cr_expect_eq(c->admin_reload_timeout_ms, 30000);
    cr_expect_null(c->redis_url);
    cr_expect_eq(c->store_on_failure, CONF_FAIL_OPEN);
    /* limits: all defaults */
    cr_expect_eq(c->max_header_bytes, 64 * 1024);
    cr_expect_eq(c->max_body_bytes, 8 * 1024 * 1024);
    cr_expect_eq(c->header_timeout_ms, 10000);
    cr_expect_eq(c->body_timeout_ms, 30000);
    cr_expect_eq(c->idle_timeout_ms, 60000);
    cr_expect_eq(c->max_retries, 2);
    cr_expect_eq(c->max_connections, 20000);
    cr_expect_eq(c->ncors_origins, 0, "no cors: no CORS answers");
    cr_expect_eq(c->cors_max_age_s, 600);

    gpu = conf_find_backend(c, "gpu-llama-8b");
    cr_assert_not_null(gpu);
    cr_expect_eq(gpu->kind, CONF_BACKEND_SELF_HOSTED);
    cr_expect_eq(gpu->tokenizer, CONF_TOK_LLAMA3);
    cr_expect_eq(gpu->quality, 2);
    cr_expect_float_eq(gpu->gpu_hourly_usd, 2.50, 1e-9);
    cr_expect_eq(gpu->replicas, 1);
    cr_expect_eq(gpu->max_concurrency, 16);
    cr_expect_float_eq(gpu->tokens_per_second, 1500, 1e-9);
    cr_expect_eq(gpu->tls, 0);
    cr_expect_str_eq(gpu->host, "127.0.0.1");
    cr_expect_eq(gpu->port, 9101);
    cr_expect_str_eq(gpu->base_path, "/v1");
    cr_expect_null(gpu->api_key);
    cr_expect_eq(gpu->connect_timeout_ms, 5000);
    cr_expect_eq(gpu->first_byte_timeout_ms, 60000);
    cr_expect_eq(gpu->total_timeout_ms, 600000);
    cr_expect_eq(gpu->read_timeout_ms, 60000);
    cr_expect_eq(gpu->max_idle_connections, 64);
    cr_expect_eq(gpu->ttft_stale_ms, 30000);
    cr_expect_eq(gpu->tls_verify, 1);
    cr_expect_eq(gpu->is_free, 0);
    cr_expect_str_eq(gpu->auth_header, "Authorization");
    cr_expect_eq(&c->backends[gpu->index], gpu);

    api = conf_find_backend(c, "api-gpt-4o-mini");
    cr_assert_not_null(api);
    cr_expect_eq(api->kind, CONF_BACKEND_API);
    cr_expect_str_eq(api->api_key, "sk-mock-upstream");
    cr_expect_str_eq(api->model, "gpt-4o-mini");
    cr_expect_eq(api->tokenizer, CONF_TOK_O200K);
    cr_expect_eq(api->quality, 3);
    cr_expect_float_eq(api->input_usd_per_mtok, 0.15, 1e-12);
    cr_expect_float_eq(api->output_usd_per_mtok, 0.60, 1e-12);
    cr_expect_float_eq(api->cached_input_usd_per_mtok, 0.075, 1e-12);
    cr_expect_eq(api->port, 9102);
    /* those three come from conf/prices.yaml, included by the demo */
    cr_assert_not_null(api->price);
    cr_expect_str_eq(api->price->name, "gpt-4o-mini");
    cr_expect_null(api->price_name);
    cr_expect_null(gpu->price, "self_hosted backends take no price entry");
    cr_assert_eq(c->nincludes, 1);
    cr_expect_eq(strcmp(c->includes[0] + strlen(c->includes[0]) - 17, "/conf/prices.yaml"), 0,
                 "%s", c->includes[0]);
    cr_expect_eq(api->price->file, c->includes[0]);
    cr_expect_eq(conf_find_price(c, "gpt-4o-mini"), api->price);
    api = conf_find_backend(c, "api-embedding-3-small");
    cr_expect_null(api->price, "no entry of that name: its own prices");
    cr_expect_float_eq(api->input_usd_per_mtok, 0.02, 1e-12);
    cr_expect_float_eq(api->cached_input_usd_per_mtok, 0.02, 1e-12);

    cr_assert_eq(c->ntenants, 1);
    t = &c->tenants[0];
    cr_expect_str_eq(t->id, "demo");
    cr_expect_float_eq(t->daily_usd, 5, 1e-12);
    cr_expect_float_eq(t->monthly_usd, 50, 1e-12);
    cr_expect_eq(t->on_exhausted, CONF_EXHAUSTED_DOWNGRADE);
    cr_expect_eq(t->max_ttft_ms, 800);
    cr_expect_eq(t->min_quality, 1);
    cr_expect_eq(t->soft_limit_pct, 80);
    cr_expect_eq(t->on_overrun, CONF_OVERRUN_CHARGE);
    cr_expect_eq(t->rpm, 600);
    cr_expect_eq(t->tpm, 0);
    cr_assert_eq(t->nkeys, 1);
    cr_expect_null(t->keys[0].name);
    cr_expect_eq(t->keys[0].rpm, 0);
    cr_expect_eq(t->keys[0].tenant, t);
    cr_expect_eq(c->nexperiments, 0);
    /* store and cache: all defaults */
    cr_expect_str_eq(c->store_key_prefix, "costrouter:");
    cr_expect_eq(c->store_connect_timeout_ms, 1000);
    cr_expect_eq(c->store_command_timeout_ms, 500);
    cr_expect_eq(c->store_reservation_ttl_ms, 600000);
    cr_expect_eq(c->cache_enabled, 1);
    cr_expect_eq(c->cache_ttl_s, 3600);
    cr_expect_eq(c->cache_max_entry_bytes, 1048576);
    cr_expect_eq(c->cache_local_bytes, 67108864);
    cr_expect_eq(c->cache_shared, 0);
    cr_expect_eq(c->cache_tools, 0);
    cr_assert_eq(t->ntags, 2);
    cr_expect_str_eq(t->tags[0].key, "team");
    cr_expect_str_eq(t->tags[0].value, "demo");
    cr_expect_str_eq(t->tags[1].key, "cost_center");
    cr_expect_str_eq(t->tags[1].value, "cc-000");
    conf_free(c);
}

Test(conf, demo_routes_and_tenant_key, .timeout = 10)
{
    struct conf *c = load_ok("conf/demo.yaml");
    /* the model string as it sits in a request body: not NUL-terminated */
    static const char body[] = "{\"model\":\"chat\",\"x\":\"text-embedding-3-small\"}";
    const struct conf_route *r;
    uint8_t h[32];

    r = conf_find_route(c, body + 10, 4);
    cr_assert_not_null(r);
    cr_expect_str_eq(r->model, "chat");
    cr_assert_eq(r->ncandidates, 2);
    cr_expect_str_eq(r->candidates[0]->name, "gpu-llama-8b");
    cr_expect_str_eq(r->candidates[1]->name, "api-gpt-4o-mini");
    cr_expect_null(conf_find_route(c, body + 10, 3), "a prefix of a route is no route");
    cr_expect_null(conf_find_route(c, body + 10, 5), "nor is a route plus a byte");
    r = conf_find_route(c, strstr(body, "text-"), strlen("text-embedding-3-small"));
    cr_assert_not_null(r);
    cr_expect_str_eq(r->candidates[0]->model, "text-embedding-3-small");
    r = conf_find_route(c, "gpt-4o-mini", 11);
    cr_assert_not_null(r);
    cr_expect_eq(r->candidates[0], conf_find_backend(c, "api-gpt-4o-mini"));
    cr_expect_null(conf_find_route(c, "", 0));
    cr_expect_null(conf_find_backend(c, "gpu-llama"));

    SHA256((const unsigned char *)"sk-demo-tenant", 14, h);
    cr_expect_eq(conf_find_tenant_by_key(c, h), &c->tenants[0]);
    h[31] ^= 1;
    cr_expect_null(conf_find_tenant_by_key(c, h), "one bit off is another key");
    memset(h, 0, sizeof(h));
    cr_expect_null(conf_find_tenant_by_key(c, h));
    memset(h, 0xff, sizeof(h));
    cr_expect_null(conf_find_tenant_by_key(c, h));
    conf_free(c);
}

Test(conf, example_loads_with_its_env, .timeout = 10)
{
    struct conf *c;
    const struct conf_backend *b;
    uint8_t h[32];

    setenv("COSTROUTER_ADMIN_KEY", "admin-secret", 1);
    setenv("OPENAI_API_KEY", "sk-openai-secret", 1);
    setenv("ANTHROPIC_API_KEY", "sk-ant-secret", 1);
    c = load_ok("conf/example.yaml");
    cr_expect_str_eq(c->admin_key, "admin-secret");
    cr_expect_str_eq(c->redis_url, "redis://127.0.0.1:6379/0");
    cr_expect_str_eq(c->redis_host, "127.0.0.1");
    cr_expect_eq(c->redis_port, 6379);
    cr_expect_eq(c->redis_db, 0);
    cr_expect_null(c->redis_password);
    b = conf_find_backend(c, "openai-4o-mini");
    cr_assert_not_null(b);
    cr_expect_str_eq(b->api_key, "sk-openai-secret");
    cr_expect_eq(b->tls, 1);
    cr_expect_str_eq(b->host, "api.openai.com");
    cr_expect_eq(b->port, 443);
    cr_expect_str_eq(b->base_path, "/v1");
    cr_expect_eq(conf_find_backend(c, "gpu-llama-8b")->replicas, 2);
    b = conf_find_backend(c, "claude-sonnet");
    cr_expect_eq(b->api, CONF_API_ANTHROPIC);
    cr_expect_str_eq(b->auth_header, "x-api-key");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 3.75, 1e-12);
    b = conf_find_backend(c, "house-llm-api");
    cr_expect_eq(b->long_context.above_prompt_tokens, 128000, "the house-llm entry's");
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 0.20, 1e-12);
    cr_assert_eq(c->ntenants, 2);
    cr_expect_eq(c->tenants[1].on_exhausted, CONF_EXHAUSTED_REJECT);
    cr_expect_float_eq(c->tenants[1].daily_usd, 0, 1e-12);
    SHA256((const unsigned char *)"sk-ads-team-example", 19, h);
    cr_expect_eq(conf_find_tenant_by_key(c, h), &c->tenants[1]);
    SHA256((const unsigned char *)"sk-search-team-example", 22, h);
    cr_expect_eq(conf_find_tenant_by_key(c, h), &c->tenants[0]);
    SHA256((const unsigned char *)"sk-search-batch-example", 23, h);
    cr_expect_eq(conf_find_tenant_by_key(c, h), &c->tenants[0]);
    cr_assert_not_null(conf_find_key(c, h));
    cr_expect_str_eq(conf_find_key(c, h)->name, "nightly-batch");
    cr_expect_eq(conf_find_key(c, h)->tpm, 200000);
    cr_expect_eq(c->tenants[0].soft_limit_pct, 80);
    cr_expect_eq(c->tenants[0].tpm, 2000000);
    b = conf_find_backend(c, "house-llm-api");
    cr_expect_float_eq(b->output_usd_per_mtok, 1.20, 1e-12);
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 0.10, 1e-12);
    cr_expect_eq(b->price->file, c->path, "an entry of the config itself");
    cr_assert_eq(c->nexperiments, 1);
    cr_expect_str_eq(c->experiments[0].user_header, "x-user-id");
    cr_expect_eq(c->experiments[0].arms[1].weight, 10);
    conf_free(c);
}

/* A backend that sets its own input price but not its cached or cache
 * write prices pays them at its entry's ratio to the input price: a
 * discount it states carries to its cached tokens, and cached tokens never
 * cost more than fresh ones because the entry's list price was higher.
 * So for a long-prompt tier's and a service tier's input; an entry whose
 * input is free gives no ratio (as with no entry: the input price). */
/* and its own input or output rate scales its entry's long-prompt ones */
Test(conf, a_backends_own_input_price_scales_its_entrys_cached_prices, .timeout = 10)
{
    struct conf *c = load_ok(DATA "price_override.yaml");
    const struct conf_backend *b;

    b = conf_find_backend(c, "entry");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 1, 1e-12, "the entry's");
    b = conf_find_backend(c, "own-input");
    cr_expect_float_eq(b->input_usd_per_mtok, 2, 1e-12);
    cr_expect_float_eq(b->output_usd_per_mtok, 8, 1e-12, "the entry's");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 0.5, 1e-12, "1/4 of its input");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 3, 1e-12, "1.5 x its input");
    cr_expect_float_eq(b->cache_write_1h_usd_per_mtok, 5, 1e-12, "2.5 x its input");
    cr_expect_float_eq(b->long_context.input_usd_per_mtok, 4, 1e-12, "the entry's tier, 2 x");
    cr_expect_float_eq(b->long_context.output_usd_per_mtok, 16, 1e-12, "the entry's output");
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 1, 1e-12, "1/4 of 4");
    cr_expect_float_eq(b->long_context.cache_write_usd_per_mtok, 5, 1e-12, "1.25 x 4");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].input_usd_per_mtok, 1, 1e-12,
                       "the entry's tier, 1/2 x its input");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].output_usd_per_mtok, 4, 1e-12, "the entry's");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].cached_input_usd_per_mtok, 0.25, 1e-12,
                       "1/4 of the tier's input");
    b = conf_find_backend(c, "own-both");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 1.5, 1e-12, "its own");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 2, 1e-12, "its own");
    cr_expect_float_eq(b->cache_write_1h_usd_per_mtok, 5, 1e-12, "2.5 x its input");
    b = conf_find_backend(c, "own-long");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 1, 1e-12, "the entry's");
    cr_expect_float_eq(b->long_context.input_usd_per_mtok, 4, 1e-12);
    cr_expect_float_eq(b->long_context.output_usd_per_mtok, 16, 1e-12);
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 1, 1e-12, "1/4 of its input");
    b = conf_find_backend(c, "own-flex");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].input_usd_per_mtok, 1, 1e-12);
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].output_usd_per_mtok, 4, 1e-12);
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].cached_input_usd_per_mtok, 0.25, 1e-12);
    b = conf_find_backend(c, "own-output");
    cr_expect_float_eq(b->long_context.input_usd_per_mtok, 8, 1e-12, "the entry's");
    cr_expect_float_eq(b->long_context.output_usd_per_mtok, 4, 1e-12, "2 x its output");
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 2, 1e-12, "the entry's");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].input_usd_per_mtok, 2, 1e-12, "the entry's");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].output_usd_per_mtok, 1, 1e-12, "1/2 x its output");
    b = conf_find_backend(c, "own-input-and-long");
    cr_expect_float_eq(b->long_context.input_usd_per_mtok, 5, 1e-12, "its own");
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 1.25, 1e-12, "1/4 of 5");
    b = conf_find_backend(c, "own-zero");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 2, 1e-12, "no ratio: the input price");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 2.5, 1e-12, "no ratio: 1.25 x");
    conf_free(c);
}

/* Everything full_ok.yaml sets, read back. */
Test(conf, prices_keys_experiments_store_cache, .timeout = 10)
{
    struct conf *c;
    const struct conf_backend *b;
    const struct conf_tenant *t;
    const struct conf_experiment *e;
    const struct conf_key *k;
    uint8_t h[32] = {0};

    c = load_ok(DATA "full_ok.yaml");
    cr_expect_str_eq(c->tokenizer_data, src_path("tests/conf/data"));
    cr_assert_eq(c->nincludes, 2);
    cr_expect_str_eq(c->includes[0], src_path(DATA "inc/prices_small.yaml"));
    cr_expect_str_eq(c->includes[1], src_path("conf/prices.yaml"), "absolute: taken as is");
    cr_expect_str_eq(c->redis_url, "redis://:pw@127.0.0.1:6390/2", "the url as written");
    cr_expect_str_eq(c->redis_password, "pw");
    cr_expect_str_eq(c->store_key_prefix, "test:conf:");
    cr_expect_eq(c->store_connect_timeout_ms, 250);
    cr_expect_eq(c->store_command_timeout_ms, 100);
    cr_expect_eq(c->store_reservation_ttl_ms, 30000);
    cr_expect_eq(c->cache_enabled, 0);
    cr_expect_eq(c->cache_ttl_s, 60);
    cr_expect_eq(c->cache_max_entry_bytes, 4096);
    cr_expect_eq(c->cache_local_bytes, 1024);
    cr_expect_eq(c->cache_shared, 1);
    cr_expect_eq(c->cache_tools, 1);

    /* prices: by model, by `price:`, overridden field by field */
    b = conf_find_backend(c, "mini");
    cr_expect_str_eq(b->price->name, "gpt-4o-mini");
    cr_expect_float_eq(b->input_usd_per_mtok, 0.15, 1e-12);
    cr_expect_float_eq(b->output_usd_per_mtok, 0.60, 1e-12);
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 0.075, 1e-12);
    b = conf_find_backend(c, "custom");
    cr_expect_str_eq(b->price_name, "custom-x");
    cr_expect_eq(b->price, conf_find_price(c, "custom-x"));
    cr_expect_eq(b->price->file, c->includes[0]);
    cr_expect_eq(b->price->line, 3);
    cr_expect_float_eq(b->input_usd_per_mtok, 1, 1e-12);
    cr_expect_float_eq(b->output_usd_per_mtok, 9, 1e-12, "the backend's own");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 0.25, 1e-12);
    b = conf_find_backend(c, "house");
    cr_expect_eq(b->price->file, c->path);
    cr_expect_float_eq(b->output_usd_per_mtok, 1.5, 1e-12);
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 0.5, 1e-12, "entry's input price");
    b = conf_find_backend(c, "discounted");
    cr_expect_float_eq(b->input_usd_per_mtok, 2, 1e-12);
    cr_expect_float_eq(b->output_usd_per_mtok, 10, 1e-12, "gpt-4o's");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 0.2, 1e-12);
    b = conf_find_backend(c, "local");
    cr_expect_null(b->price);
    cr_expect_float_eq(b->input_usd_per_mtok + b->output_usd_per_mtok, 0, 1e-12);
    cr_expect_null(conf_find_backend(c, "gpu")->price);
    cr_expect_null(conf_find_price(c, "gpt-4o-min"));
    cr_expect_eq(conf_find_backend(c, "mini")->long_context.above_prompt_tokens, 0, "none");

    /* long-prompt tiers: conf/prices.yaml's gemini-2.5-pro, then key by key */
    b = conf_find_backend(c, "gemini");
    cr_expect_eq(b->long_context.above_prompt_tokens, 200000);
    cr_expect_float_eq(b->long_context.input_usd_per_mtok, 2.5, 1e-12);
    cr_expect_float_eq(b->long_context.output_usd_per_mtok, 15, 1e-12);
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 0.25, 1e-12);
    b = conf_find_backend(c, "gemini-sooner");
    cr_expect_eq(b->long_context.above_prompt_tokens, 100000, "the backend's own");
    cr_expect_float_eq(b->long_context.input_usd_per_mtok, 2.5, 1e-12, "the entry's");
    cr_expect_float_eq(b->long_context.output_usd_per_mtok, 20, 1e-12, "the backend's own");
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 0.25, 1e-12);
    cr_expect_eq(conf_find_backend(c, "gemini-flat")->long_context.above_prompt_tokens, 0);
    b = conf_find_backend(c, "house-long");
    cr_expect_eq(b->long_context.above_prompt_tokens, 1000);
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 1, 1e-12, "tier's input");
    b = conf_find_backend(c, "mini-long");
    cr_expect_eq(b->long_context.above_prompt_tokens, 50000);
    cr_expect_float_eq(b->long_context.output_usd_per_mtok, 1.2, 1e-12);
    cr_expect_float_eq(b->long_context.cached_input_usd_per_mtok, 0.3, 1e-12, "tier's input");
    cr_expect_gt(c->nprices, 20, "conf/prices.yaml has them all");

    /* service tiers: conf/prices.yaml's gpt-5, then key by key */
    b = conf_find_backend(c, "gpt5");
    cr_expect(b->tiered);
    cr_expect(b->tiers[CONF_TIER_FLEX].priced);
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].input_usd_per_mtok, 0.625, 1e-12);
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].output_usd_per_mtok, 5, 1e-12);
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].cached_input_usd_per_mtok, 0.0625, 1e-12);
    cr_expect(b->tiers[CONF_TIER_PRIORITY].priced);
    cr_expect_float_eq(b->tiers[CONF_TIER_PRIORITY].output_usd_per_mtok, 20, 1e-12);
    b = conf_find_backend(c, "gpt5-own");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].input_usd_per_mtok, 0.625, 1e-12, "the entry's");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].output_usd_per_mtok, 4, 1e-12, "its own");
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].cached_input_usd_per_mtok, 0.0625, 1e-12);
    cr_expect(b->tiers[CONF_TIER_PRIORITY].priced, "the entry's");
    b = conf_find_backend(c, "house-flex");
    cr_expect(b->tiered);
    cr_expect_float_eq(b->tiers[CONF_TIER_FLEX].cached_input_usd_per_mtok, 0.5, 1e-12,
                       "tier's input");
    cr_expect_not(b->tiers[CONF_TIER_PRIORITY].priced);
    cr_expect_not(conf_find_backend(c, "house-long")->tiered, "its entry has no tiers");
    cr_expect_not(conf_find_backend(c, "gemini")->tiered);
    cr_expect_not(conf_find_backend(c, "gpu")->tiered, "self-hosted");
    cr_expect(conf_find_price(c, "gpt-4o")->tiers[CONF_TIER_PRIORITY].priced);
    cr_expect_not(conf_find_price(c, "gpt-4o")->tiers[CONF_TIER_FLEX].priced);

    /* tenants, keys and their limits; the models a tenant may use */
    t = conf_find_tenant(c, "t1");
    cr_expect_null(t->models.routes, "every model");
    cr_expect(conf_tenant_allows(t, conf_find_route(c, "chat", 4)));
    cr_expect(conf_tenant_allows(t, conf_find_route(c, "big", 3)));
    cr_assert_eq(conf_find_tenant(c, "t2")->models.n, 1);
    cr_expect(conf_tenant_allows(conf_find_tenant(c, "t2"), conf_find_route(c, "big", 3)));
    cr_expect_not(conf_tenant_allows(conf_find_tenant(c, "t2"), conf_find_route(c, "chat", 4)));
    /* a key's own list, within its tenant's: t1's ci-bot has models: [big] */
    cr_assert_eq(t->keys[1].models.n, 1);
    cr_expect(conf_key_allows(&t->keys[1], conf_find_route(c, "big", 3)));
    cr_expect_not(conf_key_allows(&t->keys[1], conf_find_route(c, "chat", 4)));
    cr_expect(conf_key_allows(&t->keys[0], conf_find_route(c, "chat", 4)), "no list: all");
    cr_expect_not(conf_key_allows(&conf_find_tenant(c, "t2")->keys[0],
                                  conf_find_route(c, "chat", 4)),
                  "the tenant's list binds its keys");
    cr_assert_eq(t, &c->tenants[0]);
    cr_expect_eq(conf_find_tenant(c, "t2"), &c->tenants[1]);
    cr_expect_null(conf_find_tenant(c, "t"));
    cr_expect_eq(t->soft_limit_pct, 80);
    cr_expect_eq(t->on_overrun, CONF_OVERRUN_CUT);
    cr_expect_eq(t->rpm, 600);
    cr_expect_eq(t->tpm, 100000);
    cr_assert_eq(t->nkeys, 3);
    h[31] = 2;
    k = conf_find_key(c, h);
    cr_assert_eq(k, &t->keys[1]);
    cr_expect_str_eq(k->name, "ci-bot");
    cr_expect_eq(k->rpm, 10);
    cr_expect_eq(k->tpm, 5000);
    cr_expect_eq(k->index, 1);
    cr_expect_eq(k->line, 65);
    /* its own budget, counted under a subject no tenant id can be */
    cr_expect_float_eq(k->daily_usd, 5, 1e-12);
    cr_expect_float_eq(k->monthly_usd, 50, 1e-12);
    cr_expect_str_eq(k->subject, "t1#ci-bot");
    cr_expect_eq(conf_find_tenant_by_key(c, h), t);
    cr_expect_eq(memcmp(t->key_hashes[1], h, 32), 0, "key_hashes stays parallel");
    h[31] = 0xf3;
    cr_expect_eq(conf_find_key(c, h), &t->keys[2]);
    cr_expect_null(t->keys[2].name);
    h[31] = 1;
    cr_expect_eq(conf_find_key(c, h), &t->keys[0]);
    cr_expect_eq(t->keys[0].rpm, 0);
    h[31] = 4;
    cr_expect_str_eq(conf_find_key(c, h)->name, "ci-bot", "names are unique per tenant only");
    cr_expect_null(conf_find_key(c, h)->subject, "no budget: nothing to count");
    cr_expect_null(t->keys[0].subject);
    cr_expect_eq(conf_find_key(c, h)->tenant, &c->tenants[1]);
    h[31] = 5;
    cr_expect_null(conf_find_key(c, h));

    /* experiments */
    cr_assert_eq(c->nexperiments, 2);
    e = &c->experiments[0];
    cr_expect_str_eq(e->name, "cheap-vs-house");
    cr_expect_str_eq(e->route, "chat");
    cr_assert_eq(e->ntenants, 1);
    cr_expect_str_eq(e->tenants[0], "t1");
    cr_expect_str_eq(e->user_header, "x-user-id");
    cr_assert_eq(e->narms, 2);
    cr_expect_str_eq(e->arms[0].name, "control");
    cr_expect_eq(e->arms[0].weight, 90);
    cr_expect_null(e->arms[0].backends);
    cr_expect_eq(e->arms[0].nbackends, 0);
    cr_assert_eq(e->arms[1].nbackends, 2);
    cr_expect_str_eq(e->arms[1].backends[0], "house");
    cr_expect_str_eq(e->arms[1].backends[1], "mini");
    e = &c->experiments[1];
    cr_expect_null(e->tenants);
    cr_expect_str_eq(e->user_header, "x-end-user");
    cr_expect_eq(e->arms[0].weight, 1, "default");
    cr_expect_eq(e->arms[1].weight, 0);
    conf_free(c);
}

/* api: anthropic sends the key as x-api-key unless auth_header says
 * otherwise; cache writes cost 1.25x the input price unless an entry or
 * the backend says otherwise, in the long-prompt tier too; web searches
 * cost the backend's price, else the entry's, else nothing; a route knows
 * which of its candidates speak which API. */
/* The silence allowed between two reads of an answer that has begun is,
 * unless given, as long as the backend may take to its first byte: a
 * backend given longer to think before it answers (a reasoning model) may
 * think as long after its first events. */
Test(conf, read_timeout_defaults_to_the_first_byte_timeout, .timeout = 10)
{
    struct conf *c = load_ok(DATA "read_timeout.yaml");

    cr_expect_eq(conf_find_backend(c, "plain")->read_timeout_ms, 60000);
    cr_expect_eq(conf_find_backend(c, "thinker")->read_timeout_ms, 300000);
    cr_expect_eq(conf_find_backend(c, "own")->first_byte_timeout_ms, 300000);
    cr_expect_eq(conf_find_backend(c, "own")->read_timeout_ms, 5000);
    conf_free(c);
}

Test(conf, anthropic_backends_and_cache_write_prices, .timeout = 10)
{
    struct conf *c = load_ok(DATA "anthropic_ok.yaml");
    const struct conf_backend *b = conf_find_backend(c, "sonnet");
    const struct conf_route *r = conf_find_route(c, "mixed", 5);

    cr_expect_eq(b->api, CONF_API_ANTHROPIC);
    cr_expect_str_eq(b->auth_header, "x-api-key");
    cr_expect_float_eq(b->input_usd_per_mtok, 3, 1e-12, "conf/prices.yaml's claude-sonnet-4-5");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 3.75, 1e-12, "the entry's, 1.25x input");
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 0.30, 1e-12);
    cr_expect_eq(b->long_context.above_prompt_tokens, 200000);
    cr_expect_float_eq(b->long_context.cache_write_usd_per_mtok, 7.5, 1e-12, "1.25x the tier's");
    cr_expect_float_eq(b->cache_write_1h_usd_per_mtok, 6, 1e-12, "the entry's, 2x input");
    cr_expect_float_eq(b->long_context.cache_write_1h_usd_per_mtok, 12, 1e-12);
    cr_expect_float_eq(b->web_search_usd_per_1k, 10, 1e-12, "the entry's");
    b = conf_find_backend(c, "sonnet-own");
    cr_expect_float_eq(b->web_search_usd_per_1k, 7.5, 1e-12, "its own, over the entry's");
    cr_expect_str_eq(b->auth_header, "authorization");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 4, 1e-12);
    cr_expect_float_eq(b->long_context.cache_write_usd_per_mtok, 9, 1e-12);
    cr_expect_float_eq(b->cache_write_1h_usd_per_mtok, 5, 1e-12, "its own");
    b = conf_find_backend(c, "plain");
    cr_expect_eq(b->api, CONF_API_OPENAI);
    cr_expect_str_eq(b->auth_header, "Authorization");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 2.5, 1e-12, "1.25x its own input");
    cr_expect_float_eq(b->long_context.cache_write_usd_per_mtok, 5, 1e-12);
    cr_expect_float_eq(b->cache_write_1h_usd_per_mtok, 4, 1e-12, "2x its own input");
    cr_expect_float_eq(b->long_context.cache_write_1h_usd_per_mtok, 8, 1e-12);
    cr_expect_float_eq(b->web_search_usd_per_1k, 0, 1e-12, "no entry: none");
    cr_expect(b->cost_from_usage, "cost_from_usage: true");
    cr_expect_not(conf_find_backend(c, "sonnet")->cost_from_usage, "off by default");
    b = conf_find_backend(c, "housed");
    cr_expect_float_eq(b->web_search_usd_per_1k, 0, 1e-12, "an entry without one: none");
    cr_expect_float_eq(b->cache_write_usd_per_mtok, 2.5, 1e-12, "1.25x the entry's input");
    cr_expect_float_eq(b->long_context.cache_write_usd_per_mtok, 5, 1e-12, "1.25x the tier's");
    cr_expect_float_eq(b->cache_write_1h_usd_per_mtok, 4, 1e-12, "2x the entry's input");
    cr_expect_float_eq(b->long_context.cache_write_1h_usd_per_mtok, 8, 1e-12, "2x the tier's");
    cr_assert_not_null(r);
    cr_expect_eq(r->speaks[CONF_API_OPENAI], 1);
    cr_expect_eq(r->speaks[CONF_API_ANTHROPIC], 6);
    cr_expect_float_eq(conf_find_price(c, "claude-haiku-4-5")->cache_write_usd_per_mtok, 1.25,
                       1e-12);
    cr_expect_float_eq(conf_find_price(c, "claude-haiku-4-5")->web_search_usd_per_1k, 10, 1e-12);
    cr_expect_float_eq(conf_find_price(c, "claude-3-haiku")->web_search_usd_per_1k, 0, 1e-12,
                       "no web search tool");
    cr_expect_float_eq(conf_find_backend(c, "oai")->file_search_usd_per_1k, 2.5, 1e-12,
                       "the entry's");
    cr_expect_float_eq(conf_find_backend(c, "oai-own")->file_search_usd_per_1k, 3, 1e-12,
                       "its own, over the entry's");
    cr_expect_float_eq(conf_find_backend(c, "housed")->file_search_usd_per_1k, 0, 1e-12,
                       "an entry without one: none");
    cr_expect_float_eq(conf_find_backend(c, "sonnet")->file_search_usd_per_1k, 0, 1e-12,
                       "Anthropic's entries have none");
    conf_free(c);
}

Test(conf, anchors_aliases_and_merge_keys_load_as_written_out, .timeout = 10)
{
    struct conf *c = load_ok(DATA "anchors_ok.yaml");

    cr_expect_str_eq(c->backends[1].name, "b");
    cr_expect_eq(c->backends[1].quality, 3, "merged from a");
    cr_expect_float_eq(c->backends[1].input_usd_per_mtok, 1, 1e-12);
    cr_expect_float_eq(c->backends[1].output_usd_per_mtok, 4, 1e-12, "its own value wins");
    cr_expect_float_eq(c->tenants[1].daily_usd, 10, 1e-12);
    cr_expect_eq(c->tenants[1].on_exhausted, CONF_EXHAUSTED_DOWNGRADE);
    conf_free(c);
}

Test(conf, tokenizer_data_defaults, .timeout = 10)
{
    struct conf *c;

    unsetenv("COSTROUTER_DATA");
    c = load_ok("conf/demo.yaml");
    cr_expect_str_eq(c->tokenizer_data, "data/tokens");
    conf_free(c);
    setenv("COSTROUTER_DATA", "/opt/costrouter/tokens", 1);
    c = load_ok("conf/demo.yaml");
    cr_expect_str_eq(c->tokenizer_data, "/opt/costrouter/tokens");
    conf_free(c);
    setenv("COSTROUTER_DATA", "", 1);
    c = load_ok("conf/demo.yaml");
    cr_expect_str_eq(c->tokenizer_data, "data/tokens", "empty counts as unset");
    conf_free(c);
}

Test(conf, env_interpolation_in_every_scalar, .timeout = 10)
{
    struct conf *c;
    const struct conf_backend *b;

    setenv("CONF_TEST_HOST", "example.com", 1);
    setenv("CONF_TEST_PORT", "8443", 1);
    setenv("CONF_TEST_ADMIN", "admin-from-env", 1);
    setenv("CONF_TEST_UPSTREAM_KEY", "sk-upstream", 1);
    setenv("CONF_TEST_QUALITY", "7", 1);
    setenv("CONF_TEST_TEAM", "${CONF_TEST_HOST}", 1); /* values are not expanded again */
    c = load_ok(DATA "env.yaml");
    cr_expect_str_eq(c->listen_host, "example.com");
    cr_expect_eq(c->listen_port, 8443);
    cr_expect_str_eq(c->admin_key, "admin-from-env");
    cr_expect_str_eq(c->cost_log, "/tmp/${not_a_var}-example.com.jsonl");
    b = &c->backends[0];
    cr_expect_str_eq(b->url, "https://example.com:8443/openai/v1/");
    cr_expect_eq(b->tls, 1);
    cr_expect_str_eq(b->host, "example.com");
    cr_expect_eq(b->port, 8443);
    cr_expect_str_eq(b->base_path, "/openai/v1");
    cr_expect_str_eq(b->api_key, "sk-upstream");
    cr_expect_str_eq(b->auth_header, "x-api-key");
    cr_expect_eq(b->quality, 7);
    cr_expect_float_eq(b->cached_input_usd_per_mtok, 1, 1e-12, "defaults to the input price");
    cr_expect_str_eq(c->tenants[0].tags[0].value, "${CONF_TEST_HOST}");
    conf_free(c);
}

Test(conf, url_forms, .timeout = 10)
{
    struct conf *c = load_ok(DATA "urls_ok.yaml");
    const struct conf_backend *b;

    cr_expect_str_eq(c->listen_host, "::1");
    cr_expect_eq(c->listen_port, 0);
    cr_expect_str_eq(c->redis_host, "::1");
    cr_expect_eq(c->redis_port, 6380);
    cr_expect_eq(c->redis_db, 3);
    cr_expect_str_eq(c->redis_password, "pw");
    cr_expect_eq(c->store_on_failure, CONF_FAIL_CLOSED);
    b = conf_find_backend(c, "v6");
    cr_expect_str_eq(b->host, "::1");
    cr_expect_eq(b->host_is_ipv6, 1);
    cr_expect_eq(b->port, 8443);
    cr_expect_str_eq(b->base_path, "/v1");
    b = conf_find_backend(c, "plain");
    cr_expect_eq(b->tls, 0);
    cr_expect_eq(b->port, 80);
    cr_expect_str_eq(b->base_path, "");
    cr_expect_eq(b->host_is_ipv6, 0);
    cr_expect_null(b->query, "no '?': no query");
    b = conf_find_backend(c, "tls");
    cr_expect_eq(b->port, 443);
    cr_expect_eq(b->tls_verify, 0);
    cr_expect_str_eq(b->base_path, "/openai/v1");
    cr_expect_null(b->query);
    /* A query is kept as written, without its '?'; the path before it
     * loses its trailing '/' as any path does. */
    b = conf_find_backend(c, "azure");
    cr_expect_str_eq(b->host, "res.openai.azure.com");
    cr_expect_str_eq(b->base_path, "/openai/deployments/gpt-4o");
    cr_expect_str_eq(b->query, "api-version=2024-10-21");
    b = conf_find_backend(c, "bare");
    cr_expect_str_eq(b->host, "example.com");
    cr_expect_eq(b->port, 80);
    cr_expect_str_eq(b->base_path, "");
    cr_expect_str_eq(b->query, "key=a%2Fb/c?d=:@!$'()*+,;&flag");
    conf_free(c);
}

/* Many entries written in an order unrelated to their sorted order: every
 * lookup must still find its own entry through the sorted indexes. */
Test(conf, lookups_over_many_entries, .timeout = 10)
{
    enum { N = 300 };
    char path[] = "/tmp/conf-test-XXXXXX", name[64], key[64];
    uint8_t h[32];
    struct conf *c;
    char *errors = NULL;
    FILE *f;
    int fd = mkstemp(path);

    cr_assert_geq(fd, 0);
    f = fdopen(fd, "w");
    fprintf(f, "backends:\n");
    for (int i = 0; i < N; i++)
        fprintf(f, "  - {name: b%d, kind: api, url: http://127.0.0.1:%d/v1, free: true}\n",
                (i * 7919) % N, 1000 + i);
    fprintf(f, "routes:\n");
    for (int i = 0; i < N; i++)
        fprintf(f, "  - {model: m%d, candidates: [b%d]}\n", (i * 7919) % N, (i * 7919) % N);
    fprintf(f, "tenants:\n");
    for (int i = 0; i < N; i++) {
        fprintf(f, "  - id: t%d\n    api_keys:\n", i);
        for (int k = 0; k < 2; k++) {
            snprintf(key, sizeof(key), "key-%d-%d", i, k);
            SHA256((const unsigned char *)key, strlen(key), h);
            fprintf(f, k ? "      - { name: k%d, rpm: %d, hash: \"sha256:" : "      - \"sha256:",
                    i, i + 1);
            for (int j = 0; j < 32; j++)
                fprintf(f, "%02x", h[j]);
            fprintf(f, k ? "\" }\n" : "\"\n");
        }
    }
    fclose(f);
    c = conf_load(path, &errors);
    unlink(path);
    cr_assert_not_null(c, "%s", errors ? errors : "");
    for (int i = 0; i < N; i++) {
        const struct conf_route *r;

        snprintf(name, sizeof(name), "b%d", i);
        cr_assert_not_null(conf_find_backend(c, name), "%s", name);
        cr_expect_str_eq(conf_find_backend(c, name)->name, name);
        snprintf(name, sizeof(name), "m%dX", i);
        r = conf_find_route(c, name, strlen(name) - 1);
        cr_assert_not_null(r, "%s", name);
        cr_expect_eq(strncmp(r->model, name, strlen(name) - 1), 0);
        cr_expect_eq(strcmp(r->candidates[0]->name + 1, r->model + 1), 0);
        for (int k = 0; k < 2; k++) {
            snprintf(key, sizeof(key), "key-%d-%d", i, k);
            SHA256((const unsigned char *)key, strlen(key), h);
            cr_expect_eq(conf_find_tenant_by_key(c, h), &c->tenants[i], "%s", key);
            cr_expect_eq(conf_find_key(c, h), &c->tenants[i].keys[k], "%s", key);
        }
        cr_expect_eq(c->tenants[i].keys[1].rpm, i + 1);
        snprintf(name, sizeof(name), "t%d", i);
        cr_expect_eq(conf_find_tenant(c, name), &c->tenants[i]);
    }
    SHA256((const unsigned char *)"key-none", 8, h);
    cr_expect_null(conf_find_tenant_by_key(c, h));
    cr_expect_null(conf_find_backend(c, "b300"));
    conf_free(c);
}

/* Whether an earlier experiment shadows a later one is found by sorting,
 * not by comparing each tenant of each experiment with each of every
 * earlier one's: that held a load (a reload's thread, --check-config) for
 * hours on two experiments of one route listing 200000 tenants each
 * (about 1.6 MB of config). */
Test(conf, shadowed_experiments_over_long_tenant_lists, .timeout = 30)
{
    enum { N = 200000 };
    char path[] = "/tmp/conf-test-XXXXXX", *errors = NULL;
    struct conf *c;
    FILE *f;
    int fd = mkstemp(path);

    cr_assert_geq(fd, 0);
    f = fdopen(fd, "w");
    fprintf(f, "backends:\n  - {name: a, kind: api, url: \"http://127.0.0.1:1/v1\", free: true}\n"
               "routes:\n  - {model: chat, candidates: [a]}\ntenants:\n");
    for (int i = 0; i < 2; i++)
        fprintf(f, "  - {id: %c, api_keys: [\"sha256:%064d\"]}\n", "tu"[i], i);
    fprintf(f, "experiments:\n");
    for (int i = 0; i < 2; i++) {
        fprintf(f, "  - {name: e%d, route: chat, arms: [{name: x}], tenants: [", i);
        for (int j = 0; j < N; j++)
            fprintf(f, "%s%c", j ? "," : "", "ut"[i]);
        fprintf(f, "]}\n");
    }
    fclose(f);
    c = conf_load(path, &errors);
    unlink(path);
    cr_assert_not_null(c, "%s", errors ? errors : "");
    cr_expect_eq(c->nexperiments, 2);
    cr_expect_eq(c->experiments[1].ntenants, N);
    conf_free(c);
}

/* Write `n` price entries model-0 .. model-(n-1) to DIR/NAME, then
 * `tail` (more YAML, may be ""). Line of model-i: i + 2. */
static void write_price_file(const char *dir, const char *name, int n, const char *tail)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    cr_assert_not_null(f = fopen(path, "w"));
    fprintf(f, "prices:\n");
    for (int i = 0; i < n; i++)
        fprintf(f, "  model-%d: {input_usd_per_mtok: %d, output_usd_per_mtok: 2}\n", i, i);
    fprintf(f, "%s", tail);
    fclose(f);
}

/* Load DIR/config.yaml including `includes` (a YAML list), with one
 * backend priced by model-19999. */
static struct conf *load_with_prices(const char *dir, const char *includes, char **errors)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/config.yaml", dir);
    cr_assert_not_null(f = fopen(path, "w"));
    fprintf(f, "include: %s\n"
               "backends:\n  - {name: a, kind: api, url: \"http://127.0.0.1:1/v1\", "
               "model: model-19999}\n"
               "routes:\n  - {model: chat, candidates: [a]}\n",
            includes);
    fclose(f);
    *errors = NULL;
    return conf_load(path, errors);
}

/* A price file of 20,000 entries in one mapping loads in well under a
 * second: its duplicate keys are found by sorting each mapping's keys,
 * and its duplicate price names by sorting all entries, where libfyaml's
 * own check and a search per entry compared each with those before it
 * (26 s for this file). */
Test(conf, a_price_mapping_of_20000_entries_and_its_duplicates, .timeout = 20)
{
    enum { N = 20000 };
    char dir[] = "/tmp/conf-test-XXXXXX", want[512], *errors;
    struct conf *c;

    cr_assert_not_null(mkdtemp(dir));
    write_price_file(dir, "big.yaml", N, "");
    c = load_with_prices(dir, "[big.yaml]", &errors);
    cr_assert_not_null(c, "%s", errors ? errors : "");
    cr_expect_eq(c->nprices, N);
    cr_expect_float_eq(conf_find_price(c, "model-12345")->input_usd_per_mtok, 12345, 1e-9);
    cr_expect_float_eq(conf_find_backend(c, "a")->input_usd_per_mtok, 19999, 1e-9);
    conf_free(c);

    /* the same name in another file: named once, at the second */
    write_price_file(dir, "again.yaml", 0, "  x: {input_usd_per_mtok: 1, output_usd_per_mtok: 1}\n"
                                            "  model-19999: {input_usd_per_mtok: 1, "
                                            "output_usd_per_mtok: 1}\n");
    c = load_with_prices(dir, "[big.yaml, again.yaml]", &errors);
    cr_assert_null(c);
    snprintf(want, sizeof(want),
             "%s/again.yaml:3: prices.model-19999: duplicate price \"model-19999\" (first at "
             "%s/big.yaml:20001)\n",
             dir, dir);
    cr_expect_str_eq(errors, want);
    free(errors);

    /* a key twice in the one mapping: a YAML error, with both lines (the
     * file is refused, so the backend has no price either) */
    write_price_file(dir, "big.yaml", N, "  model-7: {input_usd_per_mtok: 1, output_usd_per_mtok: 1}\n");
    c = load_with_prices(dir, "[big.yaml]", &errors);
    cr_assert_null(c);
    snprintf(want, sizeof(want),
             "\n%s/big.yaml:20002: prices.model-7: duplicate key (first at line 9)\n", dir);
    cr_expect_not_null(strstr(errors, want), "%s", errors);
    free(errors);
    for (const char *const *f = (const char *const[]){"big.yaml", "again.yaml", "config.yaml",
                                                       NULL};
         *f; f++) {
        char path[256];

        snprintf(path, sizeof(path), "%s/%s", dir, *f);
        unlink(path);
    }
    rmdir(dir);
}

/* What fifo_writer writes: a price file behind a comment longer than a
 * pipe holds, so that the reader takes it in many reads. */
struct fifo_job {
    char path[256]; /* the FIFO */
    char *text;     /* what to write */
    size_t len;
};

static void *fifo_writer(void *arg)
{
    struct fifo_job *j = arg;
    int fd = open(j->path, O_WRONLY); /* waits for conf_load to open it */

    if (fd >= 0) {
        for (size_t off = 0; off < j->len;) {
            ssize_t n = write(fd, j->text + off, j->len - off);
            if (n <= 0)
                break;
            off += (size_t)n;
        }
        close(fd);
    }
    return NULL;
}

/* A FIFO (a file a process writes as it is read) is read to its end, as
 * an included price file here; a folder, and a device past 4 MiB, are
 * refused with the reason. */
Test(conf, a_fifo_is_read_to_its_end_a_folder_is_not, .timeout = 20)
{
    char dir[] = "/tmp/costrouter-conf-fifo-XXXXXX", conf_file[300], *errors = NULL, cmd[4400];
    struct fifo_job job = {0};
    struct conf *want = load_ok("conf/demo.yaml"), *got;
    FILE *f = fopen(src_path("conf/prices.yaml"), "r");
    size_t pad = 100000, n;
    pthread_t writer;

    signal(SIGPIPE, SIG_IGN); /* a reader that stops early fails the test, not kills it */
    cr_assert_not_null(mkdtemp(dir));
    cr_assert_not_null(f);
    job.text = malloc(pad + (4u << 20));
    memset(job.text, '#', pad);
    job.text[pad - 1] = '\n';
    n = fread(job.text + pad, 1, 4u << 20, f);
    fclose(f);
    job.len = pad + n;
    snprintf(job.path, sizeof(job.path), "%s/prices.yaml", dir);
    snprintf(conf_file, sizeof(conf_file), "%s/demo.yaml", dir);
    snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", src_path("conf/demo.yaml"), conf_file);
    cr_assert_eq(system(cmd), 0);
    cr_assert_eq(mkfifo(job.path, 0600), 0);
    cr_assert_eq(pthread_create(&writer, NULL, fifo_writer, &job), 0);
    got = conf_load(conf_file, &errors);
    pthread_join(writer, NULL);
    cr_assert_not_null(got, "%s", errors ? errors : "");
    cr_assert_eq(got->nbackends, want->nbackends);
    for (size_t i = 0; i < want->nbackends; i++) {
        cr_expect_eq(got->backends[i].input_usd_per_mtok, want->backends[i].input_usd_per_mtok);
        cr_expect_eq(got->backends[i].output_usd_per_mtok, want->backends[i].output_usd_per_mtok);
    }
    conf_free(got);
    conf_free(want);

    cr_assert_null(conf_load(dir, &errors));
    cr_assert_not_null(strstr(errors, "(file): is a folder, not a file"), "%s", errors);
    free(errors);
    cr_assert_null(conf_load("/dev/zero", &errors));
    cr_assert_not_null(strstr(errors, "(file): is larger than 4 MiB"), "%s", errors);
    free(errors);
    unlink(job.path);
    unlink(conf_file);
    rmdir(dir);
    free(job.text);
}

/* A config of `size` bytes: a valid one, padded out with a comment. */
static char *config_of_size(size_t size)
{
    static const char text[] =
        "backends:\n  - {name: a, kind: api, url: \"http://127.0.0.1:9/v1\", free: true}\n"
        "routes:\n  - {model: chat, candidates: [a]}\n#";
    char *s = malloc(size);

    cr_assert_not_null(s);
    memcpy(s, text, sizeof(text) - 1);
    memset(s + sizeof(text) - 1, 'x', size - sizeof(text));
    s[size - 1] = '\n';
    return s;
}

/* A config of 4 MiB, the most a file may hold, loads; one of a byte
 * more is refused: as a regular file, whose size is known before it is
 * read, and from a FIFO, whose is not. */
Test(conf, a_config_of_4_mib_loads_one_byte_more_is_refused, .timeout = 30)
{
    char dir[] = "/tmp/costrouter-conf-size-XXXXXX", file[300], *errors = NULL;
    struct fifo_job job = {0};
    pthread_t writer;

    signal(SIGPIPE, SIG_IGN); /* the router stops reading past 4 MiB */
    cr_assert_not_null(mkdtemp(dir));
    snprintf(file, sizeof(file), "%s/costrouter.yaml", dir);
    snprintf(job.path, sizeof(job.path), "%s/fifo.yaml", dir);
    cr_assert_eq(mkfifo(job.path, 0600), 0);
    for (size_t size = 4u << 20; size <= (4u << 20) + 1; size++) {
        int ok = size == 4u << 20;
        struct conf *c;
        FILE *f = fopen(file, "w");

        job.text = config_of_size(size);
        job.len = size;
        cr_assert_not_null(f);
        cr_assert_eq(fwrite(job.text, 1, size, f), size);
        cr_assert_eq(fclose(f), 0);
        c = conf_load(file, &errors);
        cr_assert_eq(c != NULL, ok, "a file of %zu bytes: %s", size, errors ? errors : "loaded");
        cr_assert(ok || strstr(errors, "(file): is larger than 4 MiB"), "%s", errors);
        conf_free(c);
        free(errors);
        errors = NULL;

        cr_assert_eq(pthread_create(&writer, NULL, fifo_writer, &job), 0);
        c = conf_load(job.path, &errors);
        pthread_join(writer, NULL);
        cr_assert_eq(c != NULL, ok, "a FIFO of %zu bytes: %s", size, errors ? errors : "loaded");
        cr_assert(ok || strstr(errors, "(file): is larger than 4 MiB"), "%s", errors);
        conf_free(c);
        free(errors);
        errors = NULL;
        free(job.text);
    }
    unlink(job.path);
    unlink(file);
    rmdir(dir);
}
