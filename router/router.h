/*
 * router/router.h: the HTTP front end and proxy, on one libuv loop.
 */
#ifndef ROUTER_ROUTER_H
#define ROUTER_ROUTER_H

#include <uv.h>

struct conf;
struct router;

/* Check what conf/ cannot: that the listener's TLS certificate and key
 * load and belong together. Returns 0, or -1 with *errors set to a
 * malloc'd line saying why (caller frees). */
int router_check(const struct conf *conf, char **errors);

/* Create a router for `conf` (owned from now on, freed with it) on
 * `loop`. Builds TLS contexts and backend state. Returns NULL with a
 * logged reason on failure (conf is then freed too). */
struct router *router_create(uv_loop_t *loop, struct conf *conf);

/* Apply a new, already validated `conf` (owned from now on): a new
 * generation takes over the listener, the store, metrics and cost log;
 * requests in flight finish on the old config, whose connections then
 * close. Returns the new router (use it from now on), or NULL with the
 * old one untouched (conf freed) and, when the reason is the listener's
 * certificate or key, *errors set to it (malloc'd; else left NULL). */
struct router *router_reload(struct router *old, struct conf *conf, char **errors);

/* How a reload asked for through the hook ended. */
enum router_reload_result {
    ROUTER_RELOADED,       /* the new config applies */
    ROUTER_RELOAD_REFUSED, /* it did not load or apply: the running one stays */
    ROUTER_RELOAD_STOPPED, /* the router stopped first: nothing was applied */
};
/* Called on the loop once per reload asked for, with why when it did not
 * apply (valid during the call only; names files, lines and keys, never
 * secrets; lines apart, no newline at its end), else NULL. */
typedef void router_reload_done_cb(void *arg, enum router_reload_result result, const char *why);
/* What POST /admin/reload calls: start a reload (or join the next one)
 * and call done(done_arg, ...) exactly once when it is over, maybe before
 * returning (a reload asked for while stopping). */
typedef void router_reload_hook(void *arg, router_reload_done_cb *done, void *done_arg);

/* Let POST /admin/reload call `reload` with `arg`. */
void router_set_reload_hook(struct router *r, router_reload_hook *reload, void *arg);

/* Bind and listen. Logs "listening on HOST:PORT" and prints the same line
 * on stdout (tests and scripts read it). Returns 0 or a libuv error. */
int router_start(struct router *r) __attribute__((warn_unused_result));

/* Stop accepting, let requests in flight (of every generation) finish,
 * close idle connections, then flush the cost log and close the store;
 * the loop ends when everything is closed. Safe to call twice. */
void router_stop(struct router *r);

/* Reopen the cost log (after rotation; SIGHUP). */
void router_reopen_logs(struct router *r);

/* Free the router (every generation) after the loop has finished. */
void router_destroy(struct router *r);

#endif
