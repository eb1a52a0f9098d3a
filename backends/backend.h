/*
 * backends/backend.h: live state of each configured backend.
 *
 * Health follows twemproxy's server_failure(): consecutive failures eject
 * a backend for a while; after that one request at a time probes it
 * (half-open) and a success closes the circuit again. The router reports
 * every attempt's outcome here; policy/ reads the state to choose.
 */
#ifndef BACKENDS_BACKEND_H
#define BACKENDS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

struct conf;
struct conf_backend;

struct backend_set;
struct backend;

/* Build live state for every backend of `conf` (borrowed; must outlive
 * the set). Returns NULL on allocation failure. */
struct backend_set *backend_set_create(const struct conf *conf);
void backend_set_destroy(struct backend_set *set);
size_t backend_set_count(const struct backend_set *set);
/* The backend configured at conf.backends[index]. */
struct backend *backend_set_get(struct backend_set *set, size_t index);

const struct conf_backend *backend_conf(const struct backend *b);

/* May a request go to `b` now? True when the circuit is closed, or when
 * it is half-open and no probe is in flight. `now_ms` is loop time. */
int backend_available(const struct backend *b, uint64_t now_ms);

/* Outcome of one attempt. A failure is a connect error, a reset or a 5xx
 * before the response started. */
void backend_attempt_start(struct backend *b, uint64_t now_ms);
void backend_attempt_success(struct backend *b, uint64_t now_ms, uint64_t ttft_ms);
void backend_attempt_failure(struct backend *b, uint64_t now_ms);
/* The attempt ended (success or failure): in-flight count goes down. */
void backend_attempt_end(struct backend *b);

/* Readings for policy/ and metrics/. */
unsigned backend_inflight(const struct backend *b);
/* Smoothed time to first byte, ms; 0 until the first success. */
double backend_ttft_ewma_ms(const struct backend *b);
unsigned backend_consecutive_failures(const struct backend *b);
/* "closed", "open" or "half-open". */
const char *backend_circuit_name(const struct backend *b, uint64_t now_ms);

#endif
