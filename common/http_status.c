/* common/http_status.c: reason phrases and Retry-After (see http_status.h). */
#define _GNU_SOURCE /* strptime, timegm */
#include "common/http_status.h"

#include <string.h>

const char *http_status_text(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 200   ? "Informational"
                    : status < 300 ? "OK"
                    : status < 400 ? "Redirection"
                    : status < 500 ? "Client Error"
                                   : "Server Error";
    }
}

/* "1", "1.5", "120": a decimal number of `unit` ms, or -1. */
static int64_t parse_delay(const char *p, const char *end, int64_t unit)
{
    int64_t whole = 0, frac = 0, scale = 1;

    if (p == end || *p < '0' || *p > '9')
        return -1;
    for (; p < end && *p >= '0' && *p <= '9'; p++)
        if ((whole = whole * 10 + (*p - '0')) > HTTP_RETRY_AFTER_MAX_MS)
            whole = HTTP_RETRY_AFTER_MAX_MS;
    if (p < end && *p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++)
            if (scale < 1000000) {
                frac = frac * 10 + (*p - '0');
                scale *= 10;
            }
    }
    if (p != end)
        return -1;
    if (whole >= HTTP_RETRY_AFTER_MAX_MS / unit)
        return HTTP_RETRY_AFTER_MAX_MS;
    return whole * unit + (frac * unit + scale - 1) / scale; /* fractions round up */
}

/* "Sun, 06 Nov 1994 08:49:37 GMT" (IMF-fixdate, the form senders must
 * use) as ms after `now`, or -1. */
static int64_t parse_date(const char *p, size_t len, time_t now)
{
    char text[40];
    const char *rest;
    struct tm tm = {0};
    time_t when;

    if (len >= sizeof(text))
        return -1;
    memcpy(text, p, len);
    text[len] = '\0';
    rest = strptime(text, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    if (rest == NULL || *rest != '\0' || (when = timegm(&tm)) == (time_t)-1)
        return -1;
    if (when <= now)
        return 0;
    if ((int64_t)(when - now) >= HTTP_RETRY_AFTER_MAX_MS / 1000)
        return HTTP_RETRY_AFTER_MAX_MS;
    return (int64_t)(when - now) * 1000;
}

int64_t http_retry_after_ms(const char *value, size_t len, int in_ms, time_t now)
{
    const char *p = value, *end = value + len;

    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    if (p < end && *p >= '0' && *p <= '9')
        return parse_delay(p, end, in_ms ? 1 : 1000);
    return in_ms ? -1 : parse_date(p, (size_t)(end - p), now);
}
