/*
 * common/http_status.h: the reason phrase of an HTTP status, for status
 * lines written by hand (the router's responses, mockllm's).
 */
#ifndef COMMON_HTTP_STATUS_H
#define COMMON_HTTP_STATUS_H

/* "Not Found" for 404; a generic phrase by class for codes not listed. */
const char *http_status_text(int status);

/* 1xx, 204 and 304 responses end with their head, whatever a
 * Content-Length in it says (RFC 9110 6.4.1). */
static inline int http_status_bodyless(int status)
{
    return status < 200 || status == 204 || status == 304;
}

#endif
