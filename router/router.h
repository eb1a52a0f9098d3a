/*
 * router/router.h: the HTTP front end and proxy, on one libuv loop.
 */
#ifndef ROUTER_ROUTER_H
#define ROUTER_ROUTER_H

#include <uv.h>

struct conf;
struct router;

/* Create a router for `conf` (borrowed; must outlive the router) on
 * `loop`. Builds TLS contexts and backend state. Returns NULL with a
 * logged reason on failure. */
struct router *router_create(uv_loop_t *loop, const struct conf *conf);

/* Bind and listen. Logs "listening on HOST:PORT" and prints the same line
 * on stdout (tests and scripts read it). Returns 0 or a libuv error. */
int router_start(struct router *r) __attribute__((warn_unused_result));

/* Stop accepting, let requests in flight finish, close idle connections;
 * the loop ends when everything is closed. Safe to call twice. */
void router_stop(struct router *r);

/* Reopen the cost log (after rotation; SIGHUP). */
void router_reopen_logs(struct router *r);

/* After router_stop's loop run has ended: flush and close the cost log.
 * Run the loop once more afterwards to let the last write finish. */
void router_finish(struct router *r);

/* Free the router after the loop has finished. */
void router_destroy(struct router *r);

#endif
