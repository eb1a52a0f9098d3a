/*
 * common/utf8.h: UTF-8 checks for text that goes out as JSON (the cost
 * log, error messages that quote what a client sent). JSON must be valid
 * UTF-8, and clients' bytes need not be.
 */
#ifndef COMMON_UTF8_H
#define COMMON_UTF8_H

#include <stddef.h>

#define UTF8_REPLACEMENT "\xef\xbf\xbd" /* U+FFFD, what an invalid byte becomes */

/* Length of the valid UTF-8 sequence at s (n > 0 bytes left), or 0 if s
 * does not start one (overlong forms and surrogates are invalid). */
size_t utf8_seq_len(const unsigned char *s, size_t n);

/* Copy the NUL-terminated `src` to `dst` (size > 0 bytes) with each
 * invalid byte replaced by U+FFFD, cut at a character boundary when dst
 * is full. Returns the length written, without the NUL. */
size_t utf8_copy_valid(char *dst, size_t size, const char *src);

#endif
