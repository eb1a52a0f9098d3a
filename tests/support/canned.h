/*
 * tests/support/canned.h: a raw upstream on a thread of its own that
 * answers every request with the same bytes, whatever they are (a
 * misbehaving backend), or with a template filled from the request (one
 * that echoes it), and keeps the request heads it got, so tests see
 * exactly what the router sent, duplicates included.
 */
#ifndef TESTS_SUPPORT_CANNED_H
#define TESTS_SUPPORT_CANNED_H

#include <stddef.h>

struct support_canned;

/* Listen on a free loopback port. Each connection: read one request (head
 * and Content-Length body), write `answer` (len bytes), close. NULL on
 * failure. */
struct support_canned *support_canned_start(const char *answer, size_t len);
/* Answer the following requests with these bytes instead. */
void support_canned_set(struct support_canned *u, const char *answer, size_t len);
/* Answer the following requests with `head` (a status line and header
 * lines, each ending in "\r\n", without Content-Length) and `body`, in
 * both of which each "$REQUEST" becomes the head of the request received,
 * escaped for a JSON string (so on one line): an upstream that quotes
 * back what it was sent (the key in its Authorization too).
 * support_canned_set ends it. */
void support_canned_echo(struct support_canned *u, const char *head, const char *body);
/* `on`: end each connection with a reset (RST) 200 ms after the answer,
 * instead of closing it: a backend that breaks, not one that is done. */
void support_canned_reset(struct support_canned *u, int on);
/* `on`: after the answer, keep each connection open, sending nothing,
 * until the peer closes it (30 s at most): a backend that hangs with its
 * answer unfinished (one that declares more bytes than it sends). */
void support_canned_hold(struct support_canned *u, int on);
/* Keep each connection for a second request (the first answer must then
 * be one a client may reuse its connection after: with Content-Length,
 * without Connection: close), answer it with these bytes and close: a
 * server that closes a keep-alive connection just as the router reuses
 * it, with a 408 (as Node's does) or, len 0, without a word. */
void support_canned_reuse(struct support_canned *u, const char *answer, size_t len);
/* How many requests it read. */
int support_canned_requests(struct support_canned *u);
/* The port it listens on. */
int support_canned_port(const struct support_canned *u);
/* The heads received so far, one after the other, NUL-terminated; valid
 * until the next call or support_canned_stop. */
const char *support_canned_heads(struct support_canned *u);
/* Close everything and join the thread. NULL is fine. */
void support_canned_stop(struct support_canned *u);

#endif
