/* common/error.c: the error string constants (see error.h). */
#include "common/error.h"

const char error_bad_json[] = "request body is not valid JSON";
const char error_duplicate_key[] = "request body names a key twice";
const char error_missing_model[] = "request body has no \"model\" string";
const char error_bad_request[] = "malformed HTTP request";
const char error_invalid_tags[] = "invalid x-costrouter-tags";
const char error_invalid_type[] = "invalid type";
const char error_auth_twice[] = "the Authorization header was given more than once";
const char error_xkey_twice[] = "the x-api-key header was given more than once";
const char error_auth_conflict[] = "Authorization and x-api-key name different keys";
const char error_unauthorized[] = "missing or invalid API key";
const char error_not_found[] = "unknown path";
const char error_unknown_model[] = "no route for this model";
const char error_model_not_allowed[] = "this key may not use this model";
const char error_method[] = "method not allowed for this path";
const char error_origin_not_allowed[] = "this Origin is not in the router's cors.allow_origins";
const char error_timeout_client[] = "timed out waiting for the request";
const char error_body_too_large[] = "request body too large";
const char error_headers_too_large[] = "request headers too large";
const char error_context_length[] = "the request does not fit the context window of any backend";
const char error_below_quality_floor[] = "no backend of this model meets the quality floor of this key's tenant";
const char error_budget_exhausted[] = "budget exhausted";
const char error_rate_limited[] = "rate limit exceeded";
const char error_upstream_connect[] = "could not connect to the upstream";
const char error_upstream_io[] = "upstream connection failed";
const char error_upstream_auth[] = "the backend refused the router's credentials for it (a "
                                  "problem of the router's configuration, not of your key)";
const char error_no_backend[] = "no healthy backend for this model";
const char error_upstream_connect_timeout[] = "upstream connect timed out";
const char error_upstream_first_byte_timeout[] = "upstream did not answer in time";
const char error_upstream_total_timeout[] = "upstream response took too long";
const char error_upstream_read_timeout[] = "upstream stopped sending in the middle of its answer";
const char error_store_unavailable[] = "spend store unavailable";
const char error_no_descriptors[] = "the router is at its open-file limit and could not open a "
                                    "connection to the backend; retry shortly";
const char error_cost_log_behind[] = "the cost log is behind the disk; the request was not "
                                     "started and nothing was charged";
const char error_internal[] = "internal error";
const char error_no_memory[] = "out of memory";
