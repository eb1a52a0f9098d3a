/*
 * policy/token_stats.c: the statistics estimates learn from: calibration
 * of byte/char estimates against reported usage, and a high quantile of
 * recent completion lengths for output-token prediction.
 *
 * Both structures are owned and stored by the caller (the router keeps one
 * calibration per backend and one predictor per tenant and route); these
 * functions only read and update them, in bounded time, without
 * allocating.
 */
#include "policy/tokenize.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

#include "common/util.h"

#define CALIB_ALPHA 0.2
#define CALIB_MIN 0.05
#define CALIB_MAX 20.0
#define OUTPRED_MIN_SAMPLES 8
/* The largest prediction: far past any window or budget, and a prompt
 * (up to POLICY_TOKENS_COUNT_MAX) added to it stays in 64 bits. */
#define OUTPRED_MAX (INT64_C(1) << 62)

void policy_calib_init(struct policy_calib *c)
{
    c->ratio = 1.0;
    c->alpha = CALIB_ALPHA;
    c->samples = 0;
}

int64_t policy_calib_apply(const struct policy_calib *c, int64_t raw)
{
    if (raw <= 0)
        return 0;
    return (int64_t)llround((double)raw * c->ratio);
}

void policy_calib_observe(struct policy_calib *c, int64_t raw, int64_t reported)
{
    if (raw <= 0 || reported <= 0)
        return;
    double r = (double)reported / (double)raw;
    r = r < CALIB_MIN ? CALIB_MIN : r > CALIB_MAX ? CALIB_MAX : r;
    /* The first sample replaces the prior outright, so one request suffices
     * to get the scale right; later ones smooth. */
    c->ratio = c->samples == 0 ? r : c->ratio + c->alpha * (r - c->ratio);
    c->samples++;
}

void policy_outpred_init(struct policy_outpred *o)
{
    memset(o, 0, sizeof(*o));
}

/* k-th smallest (0-based) of a[0..n), reordering a: Hoare's quickselect. */
static uint32_t select_kth(uint32_t *a, uint32_t n, uint32_t k)
{
    uint32_t lo = 0, hi = n - 1;
    while (lo < hi) {
        uint32_t pivot = a[lo + (hi - lo) / 2], i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot)
                i++;
            while (a[j] > pivot)
                j--;
            if (i <= j) {
                uint32_t x = a[i];
                a[i] = a[j];
                a[j] = x;
                i++;
                if (j == 0)
                    break;
                j--;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            break;
    }
    return a[k];
}

static int64_t positive_int(const cJSON *req, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(req, key);
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > POLICY_TOKENS_COUNT_MAX)
        return 0;
    return (int64_t)v->valuedouble;
}

/* The prompts of a legacy completion request: an array of strings or of
 * token-id arrays is one prompt each; a string, or one array of token
 * ids, is one. */
static int64_t prompts_of(const cJSON *req)
{
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(req, "prompt"), *item;
    int64_t n = 0;

    if (!cJSON_IsArray(prompt))
        return 1;
    cJSON_ArrayForEach(item, prompt)
        if (cJSON_IsString(item) || cJSON_IsArray(item))
            n++;
    return n > 1 ? n : 1;
}

int64_t policy_outpred_choices(const cJSON *req)
{
    int64_t n = positive_int(req, "n"), best_of = positive_int(req, "best_of");
    int64_t per_prompt = MAX(MAX(n, best_of), 1), prompts = prompts_of(req);

    /* Each is at most POLICY_TOKENS_COUNT_MAX (or a body's length): the
     * product may pass 64 bits. */
    if (per_prompt > OUTPRED_MAX / prompts)
        return OUTPRED_MAX;
    return per_prompt * prompts;
}

void policy_outpred_observe(struct policy_outpred *o, int64_t completion_tokens, int64_t n)
{
    if (completion_tokens < 0)
        return;
    if (n > 1)
        completion_tokens /= n;
    o->ring[o->next] = completion_tokens > UINT32_MAX ? UINT32_MAX : (uint32_t)completion_tokens;
    o->next = (o->next + 1) % POLICY_OUTPRED_WINDOW;
    if (o->n < POLICY_OUTPRED_WINDOW)
        o->n++;
    /* The P95 waits for a request without max_tokens to need it: most
     * requests give max_tokens, and a selection per response was 2-3% of
     * the router's instructions. */
    o->stale = 1;
}

/* Nearest-rank P95 of the window. */
static uint32_t outpred_quantile(struct policy_outpred *o)
{
    uint32_t tmp[POLICY_OUTPRED_WINDOW];

    if (o->stale) {
        memcpy(tmp, o->ring, o->n * sizeof(*tmp));
        o->quantile = select_kth(tmp, o->n, (uint32_t)ceil(0.95 * o->n) - 1);
        o->stale = 0;
    }
    return o->quantile;
}


int64_t policy_outpred_cap(const cJSON *req)
{
    int64_t a = positive_int(req, "max_completion_tokens"), b = positive_int(req, "max_tokens");
    int64_t per = a && b ? (a < b ? a : b) : a ? a : b;

    return per ? per : positive_int(req, "max_output_tokens"); /* the Responses API's name */
}

int64_t policy_outpred_predict(struct policy_outpred *o, int64_t n, int64_t per, int64_t fallback)
{
    if (!per)
        per = o && o->n >= OUTPRED_MIN_SAMPLES ? (int64_t)outpred_quantile(o) : fallback;
    /* Each may be up to 1e12: their product can pass 64 bits, and wrapped
     * negative it held the request for its prompt alone. Saturated, it
     * still leaves room to add a prompt to it. */
    if (n > 1 && per > OUTPRED_MAX / n)
        return OUTPRED_MAX;
    return n > 1 ? per * n : per;
}
