/*
 * tests/fuzz/fuzz_costlog.c: libFuzzer target for the cost log line
 * (metrics_cost_record_json; `make fuzz-costlog`, clang with ASan and
 * UBSan). The log is the chargeback record, read back by `costrouter
 * report` and by other tools: every line must stay one valid JSON object,
 * whatever its strings (tenant ids, tags, route and backend names from
 * the config) and numbers hold.
 *
 * The input is cut at NUL bytes into the record's strings; the bytes after
 * the last string fill its numbers (8 bytes each, raw, so NaN, infinities,
 * negatives and huge values all come). Then:
 * - the record is one line: it ends in its only newline;
 * - the line is valid UTF-8 (checked here by the RFC 3629 table, not by
 *   common/utf8.c), has no raw control byte, and parses with cJSON as an
 *   object;
 * - a string that was valid UTF-8 reads back as it was, a NULL one as
 *   null; counts below 0 read as null, others as they were; a cost or a
 *   time that is not finite reads as null, a finite one as a number.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "conf/conf.h"
#include "metrics/metrics.h"
#include "tests/support/utf8check.h"

#define NSTRINGS 10

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The next 8 input bytes, or zeros when the input has run out. */
static uint64_t next_bits(const uint8_t **p, const uint8_t *end)
{
    uint64_t v = 0;
    size_t n = (size_t)(end - *p) < sizeof(v) ? (size_t)(end - *p) : sizeof(v);

    memcpy(&v, *p, n);
    *p += n;
    return v;
}

static double next_double(const uint8_t **p, const uint8_t *end)
{
    uint64_t bits = next_bits(p, end);
    double d;

    memcpy(&d, &bits, sizeof(d));
    return d;
}

static void check_string(const cJSON *obj, const char *name, const char *want)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);

    if (want == NULL) {
        if (!cJSON_IsNull(v))
            abort();
        return;
    }
    if (!cJSON_IsString(v))
        abort();
    if (support_utf8_valid((const unsigned char *)want, strlen(want)) &&
        strcmp(v->valuestring, want) != 0)
        abort();
}

static void check_int(const cJSON *obj, const char *name, int64_t want)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);

    if (want < 0 ? !cJSON_IsNull(v) : !cJSON_IsNumber(v))
        abort();
    /* A double holds integers exactly up to 2^53. */
    if (want >= 0 && want < (INT64_C(1) << 53) && v->valuedouble != (double)want)
        abort();
}

static void check_number(const cJSON *obj, const char *name, double want)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);

    if (isfinite(want) ? !cJSON_IsNumber(v) : !cJSON_IsNull(v))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *p = data, *end = data + size;
    char *s[NSTRINGS] = {0};
    struct metrics_cost_record r;
    struct metrics_cost_candidate cand;
    struct conf_tag tag;
    struct buf out = {0};
    const char *nl;
    cJSON *root;

    /* Strings up to each NUL; one that is absent stays NULL (null). */
    for (int i = 0; i < NSTRINGS && p < end; i++) {
        const uint8_t *z = memchr(p, 0, (size_t)(end - p));
        size_t n = z ? (size_t)(z - p) : (size_t)(end - p);

        s[i] = strndup((const char *)p, n);
        if (s[i] == NULL)
            abort();
        p += n + (z != NULL);
    }
    tag = (struct conf_tag){s[6] ? s[6] : "team", s[7] ? s[7] : ""};
    cand = (struct metrics_cost_candidate){s[8], next_double(&p, end), s[9]};
    r = (struct metrics_cost_record){
        .ts_ms = (int64_t)next_bits(&p, end),
        .request_id = s[0],
        .tenant = s[1],
        .tags = &tag,
        .ntags = 1,
        .route = s[2],
        .backend = s[3],
        .arm = s[4],
        .reason = s[5],
        .candidates = &cand,
        .ncandidates = 1,
        .prompt_tokens_est = (int64_t)next_bits(&p, end),
        .prompt_tokens = (int64_t)next_bits(&p, end),
        .completion_tokens_est = (int64_t)next_bits(&p, end),
        .completion_tokens = (int64_t)next_bits(&p, end),
        .cost_usd_est = next_double(&p, end),
        .cost_usd = next_double(&p, end),
        .cache_hit = next_bits(&p, end) & 1,
        .saved_usd = next_double(&p, end),
        .ttft_ms = next_double(&p, end),
        .latency_ms = next_double(&p, end),
        .status = (int)next_bits(&p, end),
        .fallbacks = (int)next_bits(&p, end),
        .billed_prompt_tokens = (int64_t)next_bits(&p, end),
        .billed_completion_tokens = (int64_t)next_bits(&p, end),
    };
    if (metrics_cost_record_json(&r, &out) != 0)
        abort();

    nl = memchr(out.data, '\n', out.len);
    if (out.len == 0 || nl != out.data + out.len - 1)
        abort();
    if (!support_utf8_valid((const unsigned char *)out.data, out.len))
        abort();
    /* JSON has no raw control bytes (cJSON would take them in a string). */
    for (size_t i = 0; i + 1 < out.len; i++)
        if ((unsigned char)out.data[i] < 0x20)
            abort();
    root = cJSON_ParseWithLength(out.data, out.len);
    if (!cJSON_IsObject(root))
        abort();
    check_string(root, "request_id", r.request_id);
    check_string(root, "tenant", r.tenant);
    check_string(root, "route", r.route);
    check_string(root, "backend", r.backend);
    check_string(root, "arm", r.arm);
    check_string(root, "reason", r.reason);
    /* A tag is looked up by its key, as written only when that was valid. */
    if (support_utf8_valid((const unsigned char *)tag.key, strlen(tag.key)))
        check_string(cJSON_GetObjectItemCaseSensitive(root, "tags"), tag.key, tag.value);
    check_string(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(root, "candidates"), 0),
                 "backend", cand.backend);
    check_int(root, "prompt_tokens_est", r.prompt_tokens_est);
    check_int(root, "prompt_tokens", r.prompt_tokens);
    check_int(root, "completion_tokens_est", r.completion_tokens_est);
    check_int(root, "completion_tokens", r.completion_tokens);
    check_int(root, "billed_prompt_tokens", r.billed_prompt_tokens);
    check_int(root, "billed_completion_tokens", r.billed_completion_tokens);
    check_int(root, "status", r.status);
    check_int(root, "fallbacks", r.fallbacks);
    check_number(root, "cost_usd_est", r.cost_usd_est);
    check_number(root, "cost_usd", r.cost_usd);
    check_number(root, "saved_usd", r.saved_usd);
    check_number(root, "ttft_ms", r.ttft_ms);
    check_number(root, "latency_ms", r.latency_ms);

    cJSON_Delete(root);
    buf_free(&out);
    for (int i = 0; i < NSTRINGS; i++)
        free(s[i]);
    return 0;
}
