/*
 * common/http_status.h: the reason phrase of an HTTP status, for status
 * lines written by hand (the router's responses, mockllm's).
 */
#ifndef COMMON_HTTP_STATUS_H
#define COMMON_HTTP_STATUS_H

/* "Not Found" for 404; a generic phrase by class for codes not listed. */
const char *http_status_text(int status);

#endif
