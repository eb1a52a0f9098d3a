/*
 * common/http_status.h: the reason phrase of an HTTP status, for status
 * lines written by hand (the router's responses, mockllm's).
 */
#ifndef COMMON_HTTP_STATUS_H
#define COMMON_HTTP_STATUS_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* "Not Found" for 404; a generic phrase by class for codes not listed. */
const char *http_status_text(int status);

/* 1xx, 204 and 304 responses end with their head, whatever a
 * Content-Length in it says (RFC 9110 6.4.1). */
static inline int http_status_bodyless(int status)
{
    return status < 200 || status == 204 || status == 304;
}

/* The wait a 429 or 503 asks for, in ms, from the value of its
 * Retry-After header (RFC 9110 10.2.3: delay-seconds, or an HTTP-date
 * read against `now`; fractions of a second are taken, as OpenAI's SDKs
 * do) or, with `in_ms`, of retry-after-ms (Azure OpenAI's header, which
 * those SDKs read first). A date in the past is 0. -1 when the value is
 * neither form; waits are capped at HTTP_RETRY_AFTER_MAX_MS. */
#define HTTP_RETRY_AFTER_MAX_MS (INT64_C(1) << 40) /* ~35 years: no overflow past it */
int64_t http_retry_after_ms(const char *value, size_t len, int in_ms, time_t now);

#endif
