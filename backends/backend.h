/*
 * backends/backend.h: live state of each configured backend.
 *
 * Health follows twemproxy's server_failure(): consecutive failures eject
 * a backend for a while; after that one request at a time probes it
 * (half-open) and a success closes the circuit again. The router reports
 * every attempt's outcome here; policy/ reads the state to choose.
 * A 429 is not a failure (the backend is up, it is asking for less) but
 * starts a cooldown for as long as its Retry-After says, which policy/
 * uses to pass the backend over while another candidate can serve.
 * Latency works the same way as health: the TTFT average only learns from
 * requests sent to the backend, and one above a tenant's SLO keeps them
 * away, so once the average is older than the backend's ttft_stale_ms one
 * request at a time (a latency probe) is let through as if the TTFT were
 * unknown, and its sample replaces the stale average.
 *
 * Cost models (formulas in docs/cost-model.md):
 * - API tier: list prices per million tokens; cached prompt tokens at the
 *   cached price, tokens written to the provider's cache at the cache write price.
 * - Self-hosted GPU pool: paid per replica-hour whether used or not. The
 *   router reports attempt starts and finishes (with tokens) and this file
 *   keeps the pool's live load (in flight, tokens/s over a sliding window),
 *   an accounting clock that splits the pool's GPU-seconds between the
 *   requests in flight (chargeback) and an idle accumulator, so that
 *   attributed + idle == replicas x elapsed, exactly.
 * Money that is stored or settled is integer micro-USD; doubles are used
 * only inside formulas and for routing comparisons.
 */
#ifndef BACKENDS_BACKEND_H
#define BACKENDS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

struct conf;
struct conf_backend;

/* Length of the tokens/s sliding window, seconds (one slot per second). */
#define BACKEND_WINDOW_S 10

struct backend_set;
struct backend;
struct backend_ticket;

/* The kinds of answer whose time to first token is averaged apart: a
 * plain answer's first byte is its head, which servers send with its last
 * token (the client waits for all of it), a stream's its first event. */
enum backend_answer {
    BACKEND_PLAIN,
    BACKEND_STREAM,
    BACKEND_ANSWER_KINDS
};
/* For backend_probe_due: no kind of answer's latency matters. */
#define BACKEND_LATENCY_NONE (-1)

/* Build live state for every backend of `conf` (borrowed; must outlive
 * the set). Returns NULL on allocation failure. */
struct backend_set *backend_set_create(const struct conf *conf);
/* The same for a reloaded config. A backend that `prev` (the config
 * before, still serving its requests) has with the same name, url and
 * model keeps what was measured of its latency (not its circuit, nor a
 * 429's cooldown). A self-hosted pool that a live set (`prev` or one
 * before it, not yet destroyed) has keeps its accounting clock, shared,
 * so that the replica time of requests in flight across the reload is
 * neither idle for the new config nor counted twice, and the pool's load
 * counts them: the pool of the same name, or one renamed at the same url
 * (backend.c, pool_clock). Its new replicas and price apply from
 * backend_set_start() on, to every config's requests. */
struct backend_set *backend_set_create_after(const struct conf *conf, struct backend_set *prev);
/* Do `a` and `b` (of two configs) keep one pool's accounting? */
int backend_same_clock(const struct backend *a, const struct backend *b);
void backend_set_destroy(struct backend_set *set);
size_t backend_set_count(const struct backend_set *set);
/* The backend configured at conf.backends[index]. */
struct backend *backend_set_get(struct backend_set *set, size_t index);

const struct conf_backend *backend_conf(const struct backend *b);

/* May a request go to `b` now? True when the circuit is closed, or when
 * it is half-open and no probe is in flight. `now_ms` is loop time. A
 * cooldown (backend_cooldown_ms) is not counted here: it is a preference
 * policy/ weighs, not a ban. */
int backend_available(const struct backend *b, uint64_t now_ms);
/* Would an attempt begun on `b` now be a probe: of a half-open circuit
 * with none out, or of the TTFT average of `latency` (an enum
 * backend_answer) stale or not yet measured (backend_latency_probe_due)?
 * Such a choice holds only for the first request to begin there. A
 * request without an SLO passes BACKEND_LATENCY_NONE: the prediction
 * means nothing to it. */
int backend_probe_due(const struct backend *b, uint64_t now_ms, int latency);
/* When backend_available() is 0: in how many ms it may say 1 (the open
 * circuit's time left; a second while a half-open probe is out). Else 0. */
uint64_t backend_unavailable_ms(const struct backend *b, uint64_t now_ms);

/* Outcome of one attempt. A failure is a connect error, a reset or a 5xx,
 * or an answer its backend cut before its end (a stream's too); a 429 is
 * neither (backend_rate_limited). */
void backend_attempt_start(struct backend *b, uint64_t now_ms, enum backend_answer kind);
/* A plain answer came whole, its head `ttft_ms` after the attempt began
 * (its TTFT sample, of kind BACKEND_PLAIN). */
void backend_attempt_success(struct backend *b, uint64_t now_ms, uint64_t ttft_ms);
/* A success without a latency sample: the backend answered, with a
 * refusal (a 4xx) that comes as fast as it validates, whatever its TTFT,
 * or with a stream's head, which servers (vLLM's) send before the first
 * token. A latency probe stays out until its sample or its end. */
void backend_attempt_answered(struct backend *b);
/* The first token of an answer of `kind` came `ttft_ms` after its attempt
 * began. */
void backend_ttft_sample(struct backend *b, uint64_t now_ms, enum backend_answer kind,
                         uint64_t ttft_ms);
/* The attempt begun with `t` (backend_attempt_begin; may be NULL) failed.
 * It ends that attempt's own latency probe, if it is one (the next
 * request of its kind may measure), not another kind's, nor a probe
 * another request has out. */
void backend_attempt_failure(struct backend *b, uint64_t now_ms, const struct backend_ticket *t);
/* The attempt ended (success or failure): in-flight count goes down. */
void backend_attempt_end(struct backend *b);
/* A request was chosen for `b` (backend_chosen) and its attempt has not
 * begun yet; backend_unchosen when it begins or is dropped, once. Until
 * then it is load for routing (the predicted TTFT and a pool's marginal
 * cost count it as in flight): a burst chosen at once, before the first
 * of its holds is made, saw an idle pool for every request. */
void backend_chosen(struct backend *b);
void backend_unchosen(struct backend *b);

/* Cooldown after a 429 without a usable Retry-After, and the longest one
 * a Retry-After may ask for (a bogus "86400" must not take a backend out
 * for a day). */
#define BACKEND_COOLDOWN_DEFAULT_MS 5000
#define BACKEND_COOLDOWN_MAX_MS 60000
/* `b` answered 429 at `now_ms`, asking to wait `retry_after_ms` (-1 when
 * it did not say): cool down until then, clamped to
 * BACKEND_COOLDOWN_MAX_MS. A cooldown is never shortened by a later 429. */
void backend_rate_limited(struct backend *b, uint64_t now_ms, int64_t retry_after_ms);
/* Milliseconds of cooldown left at `now_ms`, 0 when none. */
uint64_t backend_cooldown_ms(const struct backend *b, uint64_t now_ms);

/* Token counts of one request (estimated before, real after). */
struct backend_tokens {
    int64_t prompt;     /* prompt tokens, cached ones included */
    int64_t completion; /* completion (generated) tokens */
    int64_t cached;     /* prompt tokens the upstream served from its cache */
    int64_t cache_write; /* prompt tokens the upstream wrote to its cache (Anthropic's
                            cache_creation_input_tokens), priced at the cache write rate */
    int64_t cache_write_1h; /* of those, written to its 1-hour cache, at that rate */
    int tier;           /* enum conf_service_tier whose rates bill them (API backends) */
    int64_t web_searches; /* server-side web searches (Anthropic's server_tool_use.
                             web_search_requests), at web_search_usd_per_1k each 1,000 */
    int64_t file_searches; /* file search calls (Responses), at file_search_usd_per_1k */
    unsigned searches_one_cap:1; /* the two counts are one cap on calls of either kind
                                    (an estimate's): priced as the dearer kind */
    unsigned reported:1;  /* the answer's usage said what it cost: reported_usd */
    unsigned partial:1;   /* cut short (broken, or its client left): its duration says
                             nothing of the backend's, and is no sample */
    double reported_usd;  /* that cost, billed in place of the tokens' price by a
                             backend with cost_from_usage (an estimate has none) */
};

/* A request's cost estimate on one backend. */
struct backend_cost {
    double list_usd;          /* API: price of the tokens; GPU: GPU-time at rated throughput */
    double marginal_usd;      /* what routing one more request here costs (see cost-model.md) */
    int64_t reserve_micro;    /* list_usd in micro-USD rounded up: what to reserve */
};

/* What an attempt started with backend_attempt_begin() remembers. */
struct backend_ticket {
    uint64_t start_ms;    /* loop time the attempt started */
    double share_mark_ms; /* the pool's share clock at start (GPU-ms) */
    double share_mark_usd; /* and its price so far (USD) */
    uint64_t probe;       /* the half-open probe's number if it is one, else 0 */
    uint64_t ttft_probe;  /* the latency probe's number if it is one, else 0 */
    unsigned answer:1;    /* enum backend_answer the attempt asks for */
};

/* A finished attempt's settled cost. */
struct backend_charge {
    uint64_t duration_ms;  /* start to finish */
    double gpu_seconds;    /* GPU-seconds attributed (self-hosted), 0 for API */
    double usd;            /* cost before rounding */
    int64_t micro_usd;     /* cost settled, rounded to the nearest micro-USD */
};

/* Start the accounting clock of every backend of `set` at `now_ms` (the
 * pool's cost period starts here); a clock kept from the config before
 * runs to `now_ms` at its old replicas and price, then at the new ones.
 * Without it a backend's clock starts at its first event. */
void backend_set_start(struct backend_set *set, uint64_t now_ms);

/* backend_attempt_start() that also fills `t` (may be NULL) for
 * backend_attempt_finish(). `kind` is the answer asked for: a stream's
 * or a plain one's (the latency it may probe). */
void backend_attempt_begin(struct backend *b, uint64_t now_ms, enum backend_answer kind,
                           struct backend_ticket *t);
/* The attempt begun with `t` ended at `now_ms` (success or failure; in
 * place of backend_attempt_end). `used` are the tokens it is billed for:
 * NULL for a failure, zeros for an answer nobody bills (an error without
 * usage); its completion tokens count as served now unless already
 * reported with backend_tokens_served(). Returns the cost to settle: API
 * price of `used`, or the GPU-seconds the attempt used on the pool (its
 * duration shared with the others in flight) x hourly price. An attempt
 * that bills no tokens costs nothing on a pool either: its GPU-seconds go
 * to the idle accumulator, so attributed + idle stays exact. */
struct backend_charge backend_attempt_finish(struct backend *b, uint64_t now_ms,
                                             const struct backend_ticket *t,
                                             const struct backend_tokens *used);
/* `tokens` generated tokens were streamed to a client at `now_ms` (for the
 * tokens/s window; call as they arrive, then finish with completion 0). */
void backend_tokens_served(struct backend *b, uint64_t now_ms, int64_t tokens);

/* Cost of a request of `tok` tokens on `b` at `now_ms`. `slo_ms` is the
 * tenant's max time to first token (0 = none): a pool's marginal cost
 * reaches its list cost where its predicted TTFT for an answer of `kind`
 * would break it. A backend marked free costs 0. */
struct backend_cost backend_estimate_cost(const struct backend *b, uint64_t now_ms,
                                          const struct backend_tokens *tok, int slo_ms,
                                          enum backend_answer kind);
/* API price of `tok` on `b` in USD (0 for self-hosted or free backends):
 * at the rates of its service tier when `b` prices that tier, else at the
 * standard rates (the long-prompt ones past long_context's size). */
double backend_api_price_usd(const struct conf_backend *c, const struct backend_tokens *tok);

/* Predicted time to first token of a request for an answer of `kind`
 * sent now: that kind's TTFT average (0 while a latency probe is due: the
 * average is stale or none, and nobody is measuring it), plus, on a pool
 * whose slots (replicas x max_concurrency) are all busy, the wait for a
 * slot (queue position x average duration / slots). */
double backend_predicted_ttft_ms(const struct backend *b, uint64_t now_ms,
                                 enum backend_answer kind);
/* A pool's utilization: the larger of in-flight / slots and tokens/s over
 * the window / (replicas x tokens_per_second). 0 for API backends; may
 * exceed 1 when requests queue. */
double backend_pool_utilization(const struct backend *b, uint64_t now_ms);
/* Generated tokens per second over the last BACKEND_WINDOW_S seconds. */
double backend_tokens_per_second(const struct backend *b, uint64_t now_ms);
/* Smoothed duration of finished attempts that produced tokens, ms. */
double backend_duration_ewma_ms(const struct backend *b);
/* GPU-seconds of the pool attributed to no request since its clock
 * started (unused, or used by attempts with nothing to bill), and their
 * price; what a pool cost in all over that time. 0 for API backends. */
double backend_idle_gpu_seconds(const struct backend *b, uint64_t now_ms);
double backend_idle_cost_usd(const struct backend *b, uint64_t now_ms);
double backend_pool_cost_usd(const struct backend *b, uint64_t now_ms);

/*
 * USD to integer micro-USD: the one conversion of money, for costs, holds
 * and budgets alike, so that the router's budget checks and the store's
 * limits agree to the micro-dollar. backend_usd_to_micro() rounds to the
 * nearest (halves away from zero); backend_usd_to_micro_ceil() rounds up,
 * for reservations (a hold never falls short of the price), ignoring float
 * noise below a millionth of a micro-USD. Both give 0 for a negative
 * amount, -0 or NaN (no money converted is negative: costs, prices and
 * budgets are not), and BACKEND_MICRO_MAX for an amount at or past it,
 * +inf included: the integer conversion stays defined. Two such amounts
 * already pass INT64_MAX: the store's in-process counters add them with
 * saturation (cache__sat_add), holding at INT64_MAX.
 */
#define BACKEND_MICRO_MAX ((int64_t)1 << 62) /* about $4.6e12 */
int64_t backend_usd_to_micro_ceil(double usd);
int64_t backend_usd_to_micro(double usd);

/* Readings for policy/ and metrics/. */
unsigned backend_inflight(const struct backend *b);
/* Smoothed time to first token of answers of `kind`, ms; 0 until the
 * first sample. */
double backend_ttft_ewma_ms(const struct backend *b, enum backend_answer kind);
/* Has `b` no TTFT sample of answers of `kind` yet (a backend new to this
 * config), or is their average older than its ttft_stale_ms, with no
 * request measuring it? Then the next attempt of that kind begun there is
 * a latency probe, and backend_predicted_ttft_ms() leaves the average out. */
int backend_latency_probe_due(const struct backend *b, uint64_t now_ms, enum backend_answer kind);
/* Is `b` never measured for answers of `kind`, with its latency probe
 * out? Its prediction (0) is then no more than a guess, which the probe is
 * testing: policy/ passes it over for SLO traffic while another candidate
 * meets the SLO. */
int backend_ttft_unknown(const struct backend *b, enum backend_answer kind);
unsigned backend_consecutive_failures(const struct backend *b);
/* "closed", "open" or "half-open". */
const char *backend_circuit_name(const struct backend *b, uint64_t now_ms);

#endif
