/*
 * common/error.h: the error strings that asynchronous failures carry.
 *
 * Each module reports a failure with one of these constants (compare by
 * pointer). router/ maps each constant once to an HTTP status and an
 * OpenAI-style JSON error, so the mapping lives in one place.
 */
#ifndef COMMON_ERROR_H
#define COMMON_ERROR_H

/* Client-side problems. */
extern const char error_bad_json[];          /* 400: body is not valid JSON */
extern const char error_duplicate_key[];     /* 400: an object names a key twice */
extern const char error_missing_model[];     /* 400: no "model" string */
extern const char error_bad_request[];       /* 400: malformed HTTP */
extern const char error_invalid_tags[];      /* 400: x-costrouter-tags malformed */
extern const char error_invalid_type[];      /* 400: a body member of the wrong JSON type */
extern const char error_auth_twice[];        /* 400: two Authorization headers */
extern const char error_xkey_twice[];        /* 400: two x-api-key headers */
extern const char error_auth_conflict[];     /* 400: Authorization and x-api-key differ */
extern const char error_unauthorized[];      /* 401: missing or unknown tenant key */
extern const char error_not_found[];         /* 404: unknown path */
extern const char error_unknown_model[];     /* 404: no route for "model" */
extern const char error_model_not_allowed[]; /* 403: not among the tenant's or key's models */
extern const char error_method[];            /* 405: wrong method for path */
extern const char error_origin_not_allowed[]; /* 403: a CORS preflight from an origin not allowed */
extern const char error_timeout_client[];    /* 408: header/body timeout */
extern const char error_body_too_large[];    /* 413 */
extern const char error_headers_too_large[]; /* 431 */
extern const char error_context_length[];    /* 400: too long for every candidate */
extern const char error_below_quality_floor[]; /* 403: every candidate below the tenant's floor */
extern const char error_budget_exhausted[];  /* 429 */
extern const char error_rate_limited[];      /* 429 */
/* Upstream problems. */
extern const char error_upstream_connect[];     /* 502: connect/TLS failed */
extern const char error_upstream_io[];          /* 502: reset or bad response */
extern const char error_upstream_auth[];        /* 502: the backend refused the router's key (401/403) */
extern const char error_no_backend[];           /* 503: no healthy candidate */
extern const char error_upstream_connect_timeout[]; /* 504 */
extern const char error_upstream_first_byte_timeout[]; /* 504 */
extern const char error_upstream_total_timeout[]; /* 504 */
extern const char error_upstream_read_timeout[]; /* 504: silent past read_timeout_ms mid-answer */
/* Ours. */
extern const char error_store_unavailable[]; /* 503: store down, fail_closed */
extern const char error_no_descriptors[];    /* 503: open-file limit reached */
extern const char error_cost_log_behind[];   /* 503: parked too long while the cost log was behind */
extern const char error_internal[];          /* 500 */
extern const char error_no_memory[];         /* 500 */

#endif
