/*
 * metrics/metrics.h: Prometheus metrics, the per-request cost log and the
 * dashboard page.
 *
 * Every metric is one line of METRICS_LIST (name, type, help, label names),
 * like twemproxy's nc_stats.h. A series (one metric with one set of label
 * values) is found through a hash table keyed by xxhash over the metric and
 * its label values, so an update is O(1) and allocates only when a series is
 * seen for the first time. metrics_render() writes the text exposition
 * format (version 0.0.4) that GET /metrics answers.
 *
 * Label values are tenant ids, backend names, route models, status codes
 * and the like, never keys or other secrets: every value passed here is
 * published to whoever can read /metrics.
 *
 * Everything here runs on one thread (the loop's); nothing is locked,
 * except inside the cost log, which writes from a thread of its own.
 */
#ifndef METRICS_METRICS_H
#define METRICS_METRICS_H

#include <stddef.h>
#include <stdint.h>

struct buf;
struct conf_tag;
struct uv_loop_s;

enum metrics_type { METRICS_COUNTER, METRICS_GAUGE, METRICS_HISTOGRAM };

/*
 * X(ID, name, type, help, labels): labels is one string of comma-separated
 * label names ("" for none). Counters only go up; histograms share the
 * bucket bounds of METRICS_BUCKETS_SECONDS.
 */
#define METRICS_LIST(X)                                                                      \
    X(REQUESTS_TOTAL, "costrouter_requests_total", COUNTER,                                  \
      "Requests answered, by final HTTP status.", "tenant,backend,route,status")             \
    X(TOKENS_TOTAL, "costrouter_tokens_total", COUNTER,                                      \
      "Tokens billed, by kind (prompt or completion).", "tenant,backend,route,kind")         \
    X(COST_USD_TOTAL, "costrouter_cost_usd_total", COUNTER,                                  \
      "Settled cost of requests in US dollars.", "tenant,backend,route")                     \
    X(REQUEST_DURATION_SECONDS, "costrouter_request_duration_seconds", HISTOGRAM,            \
      "Time from request received to last byte sent.", "backend")                            \
    X(TTFT_SECONDS, "costrouter_ttft_seconds", HISTOGRAM,                                    \
      "Time from request received to first token sent.", "backend")                          \
    X(BUDGET_SPENT_USD, "costrouter_budget_spent_usd", GAUGE,                                \
      "Spend in the current budget period (day or month).", "tenant,period")                 \
    X(BUDGET_REMAINING_USD, "costrouter_budget_remaining_usd", GAUGE,                        \
      "Budget left in the current period (day or month).", "tenant,period")                  \
    X(KEY_BUDGET_SPENT_USD, "costrouter_key_budget_spent_usd", GAUGE,                        \
      "Spend in the current period of a key with a budget of its own.", "tenant,key,period") \
    X(KEY_BUDGET_REMAINING_USD, "costrouter_key_budget_remaining_usd", GAUGE,                \
      "Own budget left to a key in the current period.", "tenant,key,period")                \
    X(CACHE_HITS_TOTAL, "costrouter_cache_hits_total", COUNTER,                              \
      "Requests answered from the response cache.", "tenant")                                \
    X(CACHE_SAVED_USD_TOTAL, "costrouter_cache_saved_usd_total", COUNTER,                    \
      "Cost avoided by cache hits in US dollars.", "tenant")                                 \
    X(GPU_POOL_UTILIZATION_RATIO, "costrouter_gpu_pool_utilization_ratio", GAUGE,            \
      "Busy share of a self-hosted pool's capacity (0 to 1).", "backend")                    \
    X(GPU_POOL_IDLE_COST_USD_TOTAL, "costrouter_gpu_pool_idle_cost_usd_total", COUNTER,      \
      "GPU cost of a self-hosted pool billed to no request (idle or failed).", "backend")    \
    X(STORE_UP, "costrouter_store_up", GAUGE,                                                \
      "1 while the spend store answers and takes writes, 0 while it is unavailable or "      \
      "refuses writes.", "store")                                                            \
    X(STORE_INSTANCES, "costrouter_store_instances", GAUGE,                                  \
      "Routers sharing the spend store, this one included, as Redis last listed them "       \
      "(fail_open splits what is left of a budget by it while Redis is away).", "store")     \
    X(STORE_JOURNAL_ENTRIES, "costrouter_store_journal_entries", GAUGE,                      \
      "Charges (and releases) waiting in the journal to be written back to Redis.", "store") \
    X(STORE_JOURNAL_DROPPED_TOTAL, "costrouter_store_journal_dropped_total", COUNTER,        \
      "Journal entries not made, the journal being full (100000 entries): their spend is "   \
      "kept in this router's counters only, lost to Redis's.", "store")                     \
    X(STORE_JOURNAL_DROPPED_USD_TOTAL, "costrouter_store_journal_dropped_usd_total", COUNTER, \
      "US dollars in those entries.", "store")                                               \
    X(STORE_SPEND_FILE_FAILING, "costrouter_store_spend_file_failing", GAUGE,                \
      "1 while the in-process store cannot write store.spend_file (a restart then forgets "  \
      "the spend since its last save), else 0.", "store")                                    \
    X(TOKEN_ESTIMATE_RATIO, "costrouter_token_estimate_ratio", GAUGE,                        \
      "Actual over estimated prompt tokens (calibration, 1 is exact).", "backend")           \
    X(BACKEND_RATE_LIMITED_TOTAL, "costrouter_backend_rate_limited_total", COUNTER,          \
      "429 answers from a backend (each starts or extends its cooldown).", "backend")        \
    X(BACKEND_ABANDONED_TOTAL, "costrouter_backend_abandoned_total", COUNTER,                \
      "Attempts given up without an answer after their whole request went to an API "       \
      "backend (a timeout, a cut answer): it may bill them; no request is charged them.",   \
      "backend")                                                                             \
    X(UPSTREAM_CONNECTIONS, "costrouter_upstream_connections", GAUGE,                        \
      "Open connections to a backend.", "backend")                                           \
    X(CLIENT_CONNECTIONS, "costrouter_client_connections", GAUGE,                            \
      "Open client connections.", "")                                                        \
    X(CLIENT_CONNECTIONS_REFUSED_TOTAL, "costrouter_client_connections_refused_total",       \
      COUNTER, "Client connections closed on accept: limits.max_connections or the open-file limit reached.", "") \
    X(CLIENT_ACCEPT_RETRIES_TOTAL, "costrouter_client_accept_retries_total", COUNTER,        \
      "Accepts of a client connection put off for lack of memory (tried again 50 ms later).", \
      "")                                                                                    \
    X(CLIENT_TLS_HANDSHAKE_FAILURES_TOTAL, "costrouter_client_tls_handshake_failures_total",   \
      COUNTER, "Client connections closed because their TLS handshake failed.", "")           \
    X(INFLIGHT_REQUESTS, "costrouter_inflight_requests", GAUGE,                              \
      "Requests received and not yet answered.", "")                                         \
    X(COST_LOG_DROPPED_TOTAL, "costrouter_cost_log_dropped_total", COUNTER,                  \
      "Cost log records lost: a write failed, or no memory to format them.", "")             \
    X(COST_LOG_BEHIND, "costrouter_cost_log_behind", GAUGE,                                  \
      "1 while cost_log_buffer_max bytes of the cost log wait for the disk (until half are "  \
      "written): new requests wait.", "")                                                    \
    X(COST_LOG_PARKED_TOTAL, "costrouter_cost_log_parked_requests_total", COUNTER,              \
      "Requests parked before they started because the cost log was behind.", "")             \
    X(COST_LOG_SKIPPED_TOTAL, "costrouter_cost_log_skipped_total", COUNTER,                  \
      "Cost log records carrying no cost (refusals of unread requests, and others refused "  \
      "before anything was reserved, charged or saved) skipped while the log was behind.", "") \
    X(COST_LOG_WAITING_BYTES, "costrouter_cost_log_waiting_bytes", GAUGE,                    \
      "Bytes of the cost log waiting for the disk (cost_log_buffer_max of them make it "     \
      "behind).", "")                                                                        \
    X(SERIES_DROPPED_TOTAL, "costrouter_metrics_series_dropped_total", COUNTER,              \
      "Updates lost because they would have made a new series past the cap on series: "      \
      "those series are missing.", "")

#define METRICS__ENUM(id, name, type, help, labels) METRICS_##id,
enum metrics_id { METRICS_LIST(METRICS__ENUM) METRICS_NMETRICS };
#undef METRICS__ENUM

/* Most label names any metric has. */
#define METRICS_MAX_LABELS 4

/* Upper bounds (seconds) of every histogram's buckets; +Inf is implied. */
#define METRICS_BUCKETS_SECONDS \
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120

/* Content-Type of metrics_render()'s output. */
extern const char metrics_content_type[];

struct metrics;

/*
 * Make an empty registry; label-less metrics start at 0. max_series caps
 * the number of distinct series (0 = 100000) so that a bug feeding unbounded
 * values cannot eat the memory. An update that would make a series past it
 * is lost: counted in SERIES_DROPPED_TOTAL and logged, once a minute at
 * most. Returns NULL on allocation failure.
 */
struct metrics *metrics_create(size_t max_series);
/* Free the registry and every series. NULL is fine. */
void metrics_free(struct metrics *m);

/*
 * Update the series of metric `id` whose label values are `values`
 * (exactly as many NUL-terminated strings as the metric has label names,
 * in that order; NULL for a label-less metric). Values are copied when a
 * series is created, so the caller keeps ownership.
 * - metrics_add: counters (v >= 0) and gauges (any v).
 * - metrics_set: gauges only.
 * - metrics_observe: histograms only.
 * Return 0, -EINVAL (wrong type, negative counter increment, NaN),
 * -ENOSPC (max_series reached) or -ENOMEM. An update of an existing series
 * never allocates.
 */
int metrics_add(struct metrics *m, enum metrics_id id, const char *const *values, double v);
int metrics_set(struct metrics *m, enum metrics_id id, const char *const *values, double v);
int metrics_observe(struct metrics *m, enum metrics_id id, const char *const *values, double v);

/*
 * Remove every series of the labelled gauge `id`, for values that are set
 * afresh from the current state: one whose tenant or backend is gone
 * would else be shown at its last value forever. Not on the hot path: it
 * refills the whole table. Returns 0, or -EINVAL for a counter, a
 * histogram or a label-less gauge.
 */
int metrics_clear(struct metrics *m, enum metrics_id id);

/*
 * Current value of a counter or gauge series, or NAN if the series does
 * not exist or is a histogram. For the admin API and tests.
 */
double metrics_get(const struct metrics *m, enum metrics_id id, const char *const *values);

/* Number of series (all metrics). */
size_t metrics_series_count(const struct metrics *m);

/*
 * Append the text exposition format of every metric to `out`: HELP and
 * TYPE lines, then one line per series in creation order; histograms as
 * cumulative _bucket{le=...}, _sum and _count. Returns 0 or -ENOMEM (out
 * then holds a partial text; the caller drops it).
 */
int metrics_render(const struct metrics *m, struct buf *out) __attribute__((warn_unused_result));

/*
 * The dashboard page (metrics/dashboard.html, embedded at build time):
 * self-contained HTML that reads /admin/tenants, /admin/backends and
 * /metrics with the admin key the user types in. Static storage; never
 * freed. Serve it as text/html; charset=utf-8.
 */
const char *metrics_dashboard(size_t *len);

/* ---- cost log ------------------------------------------------------- */

/* One candidate the policy considered for a request. */
struct metrics_cost_candidate {
    const char *backend;  /* backend name */
    double est_cost_usd;  /* estimated cost on this backend; NAN = unknown (null) */
    const char *rejected; /* why it was not chosen, or NULL if eligible/chosen */
};

/*
 * Everything the cost log says about one request. Strings are borrowed
 * for the duration of metrics_cost_log_write() only; NULL strings become
 * JSON null. Integer fields use -1 and double fields NAN for "unknown"
 * (null in the log), e.g. completion_tokens of a request that failed.
 */
struct metrics_cost_record {
    int64_t ts_ms;                 /* request start, ms since the Unix epoch (UTC) */
    const char *request_id;        /* the id the router gave the request */
    const char *tenant;            /* tenant id (never a key) */
    const char *key;               /* the name of the key it used (never the key), or NULL:
                                    * none, or a key without a name (left out of the line) */
    const struct conf_tag *tags;   /* the tenant's tags: cost_center, team, ... */
    size_t ntags;                  /* entries in tags */
    const struct conf_tag *request_tags; /* the request's own (x-costrouter-tags), written
                                            after the tenant's in the same "tags" */
    size_t nrequest_tags;          /* entries in request_tags */
    const char *route;             /* model the client asked for */
    const char *endpoint;          /* the path it was sent to ("/v1/messages"), or NULL */
    const char *backend;           /* backend that answered (last tried) */
    const char *arm;               /* A/B arm name, or NULL */
    const char *experiment;        /* the experiment of arm (arm names are unique only
                                      within one), or NULL */
    const char *reason;            /* why the policy chose the backend */
    const struct metrics_cost_candidate *candidates; /* in policy order */
    size_t ncandidates;            /* entries in candidates */
    int64_t prompt_tokens_est;     /* estimate before sending */
    int64_t prompt_tokens;         /* from the upstream's usage */
    int64_t completion_tokens_est; /* estimate (e.g. max_tokens or a guess) */
    int64_t completion_tokens;     /* from the upstream's usage */
    /* The tokens the request was charged for (cost_usd prices them; a GPU
     * pool by its time): the usage, else the router's own count; 0 for
     * what was not charged (an error without usage, a refusal, a cache
     * hit). */
    int64_t billed_prompt_tokens;     /* prompt tokens charged */
    int64_t billed_completion_tokens; /* completion tokens charged */
    const char *service_tier;      /* the service tier whose rates priced them ("flex",
                                      "priority"), or NULL for the standard rates */
    int64_t billed_cached_tokens;     /* of the prompt tokens, those read from the
                                         provider's cache (at the cached rate) */
    int64_t billed_cache_write_tokens; /* of the prompt tokens, those written to the
                                          provider's cache (at the cache write rate) */
    int64_t billed_cache_write_1h_tokens; /* of those, the ones written to its 1-hour cache */
    int64_t billed_web_searches;   /* server-side web searches charged (Anthropic's
                                      server_tool_use.web_search_requests), 0 when none */
    int64_t billed_file_searches;  /* file search calls charged (a Responses answer's
                                      file_search_call items), 0 when none */
    double cost_usd_est;           /* estimate at routing time */
    double cost_usd;               /* settled cost */
    double reported_cost_usd;      /* the cost the backend's usage reported (OpenRouter,
                                      Perplexity), NAN when none: cost_usd on a
                                      cost_from_usage backend */
    unsigned cache_hit:1;          /* answered from the response cache */
    double saved_usd;              /* cost avoided by the cache hit, 0 otherwise */
    double ttft_ms;                /* time to first token */
    double latency_ms;             /* time to last byte */
    int status;                    /* HTTP status sent to the client */
    int fallbacks;                 /* backends tried after the first */
    /* The record carries no money: nothing was reserved, charged or saved
     * for the request (a refusal before any of that). The writer decides
     * this, as only it knows what the request held; the log skips such a
     * record while it is behind (metrics_cost_log_write). */
    unsigned costless:1;
};

/*
 * Append `r` as one JSON object and a newline to `out`. Strings are
 * escaped for JSON; invalid UTF-8 bytes become U+FFFD, so every line is
 * valid JSON. Returns 0 or -ENOMEM.
 */
int metrics_cost_record_json(const struct metrics_cost_record *r, struct buf *out)
    __attribute__((warn_unused_result));

struct metrics_cost_log;

/*
 * Open the cost log at `path` (appending, created 0640) or stdout for "-"
 * and attach it to `loop`. Records are buffered and written by a thread
 * of the log's own every flush_ms (0 = 200) or as soon as 64 KiB are
 * buffered, so the loop never waits for the disk. When buffer_max bytes
 * (0 = 16 MiB) wait for it, the log is behind (metrics_cost_log_behind)
 * until half of them are written. wait_ms (0 = 30000) bounds how long
 * metrics_cost_log_close waits for one write. `m` (may be NULL) gets
 * COST_LOG_DROPPED_TOTAL, COST_LOG_SKIPPED_TOTAL and COST_LOG_BEHIND. The open itself is
 * synchronous (call at start-up). Returns NULL and sets *err (negative
 * errno) on failure.
 */
struct metrics_cost_log *metrics_cost_log_open(struct uv_loop_s *loop, const char *path,
                                               unsigned flush_ms, size_t buffer_max,
                                               unsigned wait_ms, struct metrics *m, int *err);

/*
 * Serialize `r` into the buffer now (the record's memory can go right
 * after). Never waits for the disk and never drops a record with money
 * for want of room: past buffer_max the log is behind, and it is for the
 * caller to stop making records (metrics_cost_log_behind). A `costless`
 * record is not written while the log is behind: it is counted in
 * COST_LOG_SKIPPED_TOTAL and logged (a warning, once a minute at most),
 * so that refusals, which callers cannot stop (a client sending
 * malformed requests), do not grow the buffer while the disk is away.
 * Returns 0 (written, or skipped), or -ENOMEM (the record is dropped,
 * counted and logged); -ENOBUFS (also counted) if called after
 * metrics_cost_log_close.
 */
int metrics_cost_log_write(struct metrics_cost_log *log, const struct metrics_cost_record *r);

/*
 * Whether buffer_max bytes wait for the disk (since then, not yet back
 * under half of it): start no new request that will write a record.
 */
int metrics_cost_log_behind(const struct metrics_cost_log *log);

/*
 * Have cb(arg) called on the loop each time the log is back under half of
 * buffer_max after being behind (not after metrics_cost_log_close). cb
 * may write records (which may make the log behind again). NULL: none.
 */
void metrics_cost_log_on_caught_up(struct metrics_cost_log *log, void (*cb)(void *arg), void *arg);

/*
 * Reopen the path (log rotation; the router calls it on SIGHUP). Records
 * already buffered are written first (to the old file, unless a write is
 * in flight: then they may land in the new one); later records go to a
 * file created at the path. No record is lost or split across files.
 * Asynchronous; on failure the old file stays in use and an error is
 * logged. No-op for stdout.
 */
void metrics_cost_log_reopen(struct metrics_cost_log *log);

/*
 * Flush everything and close (at shutdown). The records still buffered
 * are written as before, off the loop, which this call makes wait for
 * them: the caller must let the loop run (uv_run until it returns) before
 * uv_loop_close. A write that does not return for wait_ms (the disk or
 * the FIFO's reader stopped answering) is given up: the records not
 * written are counted as dropped and logged, and the loop can end; the
 * stuck write stays with the log's thread, which the process's exit ends.
 * `log` must not be used after this call.
 */
void metrics_cost_log_close(struct metrics_cost_log *log);

/* Records written to the buffer, records dropped and costless records
 * skipped while behind, since open. */
uint64_t metrics_cost_log_records(const struct metrics_cost_log *log);
uint64_t metrics_cost_log_dropped(const struct metrics_cost_log *log);
uint64_t metrics_cost_log_skipped(const struct metrics_cost_log *log);

/* Bytes waiting for the disk now (formatted, not yet written); the
 * router shows them as COST_LOG_WAITING_BYTES when /metrics is read. */
size_t metrics_cost_log_waiting(const struct metrics_cost_log *log);

#endif
