/*
 * router/admin.c: the operator's endpoints.
 *
 *   GET /metrics                      Prometheus text (admin key when one is set)
 *   GET /dashboard                    the self-contained page (its data calls need the key)
 *   GET /admin/tenants                spend vs budget of every tenant (and of its keys
 *                                     with budgets of their own)
 *   GET /admin/tenants/{id}/spend     one tenant's spend (across instances with Redis);
 *                                     the id as it is or percent-encoded
 *   GET /admin/backends               live backend state
 *
 * The admin key is compared as a SHA-256 digest with CRYPTO_memcmp, so
 * neither its content nor its length leaks through timing. Spend comes
 * from the store, so with Redis it covers every instance.
 */
#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"
#include "cache/cache.h"
#include "common/error.h"
#include "common/fmt.h"
#include "common/log.h"
#include "conf/conf.h"
#include "metrics/metrics.h"
#include "router/internal.h"

struct router__admin;

/* One spend_get of an admin request: a tenant's, or one of its keys'
 * with a budget of its own (then right after its tenant's). */
struct spend_slot {
    struct router__admin *admin;   /* the request */
    const struct conf_tenant *t;   /* tenant asked about */
    const struct conf_key *k;      /* its key asked about, or NULL: the tenant */
    struct cache_op *op;           /* in flight, or NULL once answered */
    struct cache_spend s;          /* the answer */
};

/* One admin request waiting for the store: one spend_get per subject. */
struct router__admin {
    struct router__client *client; /* who asked */
    size_t n;                      /* slots */
    size_t pending;                /* spend_get answers still to come */
    int single;                    /* answer one object, not an array */
    const char *error;             /* first store error */
    struct spend_slot slots[];     /* one per subject queried */
};

/* A POST /admin/reload waiting for its reload, which runs off the loop.
 * The hook holds it until its done callback; the client may go first
 * (router__admin_abandon), and then the answer has no one to go to. */
struct router__reload_wait {
    struct router__client *client; /* who asked, or NULL once it left */
};

int router__admin_authorized(struct router__client *c)
{
    const char *key = c->router->conf->admin_key;
    uint8_t want[32], got[32];
    size_t len;
    const char *given = router__bearer(c, &len);

    if (key == NULL || given == NULL || len == 0)
        return 0;
    /* Hashes, compared in constant time: the time taken tells nothing
     * of how much of the key was right. */
    SHA256((const unsigned char *)key, strlen(key), want);
    SHA256((const unsigned char *)given, len, got);
    return CRYPTO_memcmp(want, got, sizeof(want)) == 0;
}

static void send_json(struct router__client *c, int status, cJSON *j)
{
    char *body = cJSON_PrintUnformatted(j);

    if (body == NULL) {
        router__send_error(c, error_no_memory, NULL);
        return;
    }
    router__send_response(c, status, "application/json", "Cache-Control: no-store\r\n", body,
                          strlen(body));
    free(body);
}

/* The numbers of one subject, as both a tenant and a key show them. Its
 * budgets as enforced (router__budget_micro: to the micro-dollar, one
 * under half of it as 1), in micro-USD like the spend beside them. */
static void add_spend(cJSON *o, double daily_usd, double monthly_usd, const struct cache_spend *s)
{
    cJSON_AddNumberToObject(o, "day_usd", (double)s->day_spent / 1e6);
    cJSON_AddNumberToObject(o, "month_usd", (double)s->month_spent / 1e6);
    cJSON_AddNumberToObject(o, "day_budget_usd", (double)router__budget_micro(daily_usd) / 1e6);
    cJSON_AddNumberToObject(o, "month_budget_usd",
                            (double)router__budget_micro(monthly_usd) / 1e6);
    cJSON_AddNumberToObject(o, "reserved_usd", (double)s->reserved / 1e6);
    cJSON_AddBoolToObject(o, "degraded", s->degraded);
}

/* The tenant of `slot` with its keys' own budgets, the slots after it
 * (`*used`: how many slots it took). */
static cJSON *tenant_json(const struct spend_slot *slot, size_t left, size_t *used)
{
    cJSON *o = cJSON_CreateObject(), *keys;
    size_t i = 1;

    cJSON_AddStringToObject(o, "tenant", slot->t->id);
    add_spend(o, slot->t->daily_usd, slot->t->monthly_usd, &slot->s);
    keys = cJSON_AddArrayToObject(o, "keys");
    for (; i < left && slot[i].k != NULL; i++) {
        cJSON *ko = cJSON_CreateObject();

        cJSON_AddStringToObject(ko, "name", slot[i].k->name);
        add_spend(ko, slot[i].k->daily_usd, slot[i].k->monthly_usd, &slot[i].s);
        cJSON_AddItemToArray(keys, ko);
    }
    *used = i;
    return o;
}

static void send_spend(struct router__client *c, struct router__admin *a)
{
    cJSON *out = a->single ? NULL : cJSON_CreateArray();
    size_t used;

    for (size_t i = 0; i < a->n; i += used) {
        cJSON *o = tenant_json(&a->slots[i], a->n - i, &used);

        if (a->single) {
            out = o;
            break;
        }
        cJSON_AddItemToArray(out, o);
    }
    send_json(c, 200, out);
    cJSON_Delete(out);
}

static void on_spend(void *arg, const char *errstr, const struct cache_spend *s)
{
    struct spend_slot *sa = arg;
    struct router__admin *a = sa->admin;
    struct router__client *c = a->client;

    sa->op = NULL;
    if (errstr != NULL && a->error == NULL)
        a->error = errstr;
    if (errstr == NULL)
        sa->s = *s;
    if (--a->pending > 0)
        return;
    c->req.admin = NULL;
    if (a->error)
        router__send_error(c, error_store_unavailable, NULL);
    else
        send_spend(c, a);
    free(a);
}

/* Slots for `n` tenants from `first`: one each, and one per key of
 * theirs with a budget of its own. */
static size_t count_slots(const struct conf_tenant *first, size_t n)
{
    size_t slots = n;

    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < first[i].nkeys; k++)
            slots += first[i].keys[k].subject != NULL;
    return slots;
}

/* Cancel the slots' spend_gets still out and free the request. */
static void cancel_all(struct router__admin *a)
{
    for (size_t i = 0; i < a->n; i++)
        if (a->slots[i].op)
            cache_cancel(a->slots[i].op);
    free(a);
}

/* Ask the store about slot `sa` (its tenant's or key's subject). */
static void ask(struct router__client *c, struct router__admin *a, const struct conf_tenant *t,
                const struct conf_key *k)
{
    struct spend_slot *sa = &a->slots[a->n++];

    *sa = (struct spend_slot){a, t, k, NULL, {0}};
    sa->op = cache_spend_get(c->router->store, k ? k->subject : t->id, on_spend, sa);
    if (sa->op != NULL)
        a->pending++;
}

/* Query the store for `n` tenants starting at `first`. */
static void query_spend(struct router__client *c, const struct conf_tenant *first, size_t n,
                        int single)
{
    size_t slots = count_slots(first, n);
    struct router__admin *a = calloc(1, sizeof(*a) + slots * sizeof(a->slots[0]));

    if (a == NULL) {
        router__send_error(c, error_no_memory, NULL);
        return;
    }
    a->client = c;
    a->single = single;
    if (n == 0) {
        send_spend(c, a);
        free(a);
        return;
    }
    c->req.admin = a;
    for (size_t i = 0; i < n; i++) {
        ask(c, a, &first[i], NULL);
        for (size_t k = 0; k < first[i].nkeys; k++)
            if (first[i].keys[k].subject != NULL)
                ask(c, a, &first[i], &first[i].keys[k]);
    }
    if (a->pending < a->n) {
        /* One could not be asked (no memory): answer nothing. */
        c->req.admin = NULL;
        cancel_all(a);
        router__send_error(c, error_no_memory, NULL);
    }
}

/* Stop waiting for the reload: its outcome, when it comes, goes to no one. */
static void reload_wait_detach(struct router__client *c)
{
    c->req.reload_wait->client = NULL; /* freed by its done callback */
    c->req.reload_wait = NULL;
}

void router__admin_abandon(struct router__client *c)
{
    struct router__admin *a = c->req.admin;

    if (c->req.reload_wait != NULL)
        reload_wait_detach(c);
    if (a == NULL)
        return;
    c->req.admin = NULL;
    cancel_all(a);
}

static void send_backends(struct router__client *c)
{
    struct router *r = c->router;
    uint64_t now = router__now(r);
    cJSON *arr = cJSON_CreateArray();

    for (size_t i = 0; i < r->conf->nbackends; i++) {
        const struct backend *b = backend_set_get(r->backends, i);
        const struct conf_backend *cb = backend_conf(b);
        cJSON *o = cJSON_CreateObject();

        cJSON_AddStringToObject(o, "backend", cb->name);
        cJSON_AddStringToObject(o, "kind", cb->kind == CONF_BACKEND_API ? "api" : "self_hosted");
        cJSON_AddStringToObject(o, "circuit", backend_circuit_name(b, now));
        cJSON_AddNumberToObject(o, "inflight", backend_inflight(b));
        cJSON_AddNumberToObject(o, "consecutive_failures", backend_consecutive_failures(b));
        cJSON_AddNumberToObject(o, "rate_limited_ms", (double)backend_cooldown_ms(b, now));
        /* Plain answers', then streams' (their first byte comes with
         * the last token, and with the first). */
        cJSON_AddNumberToObject(o, "ttft_ewma_ms", backend_ttft_ewma_ms(b, BACKEND_PLAIN));
        cJSON_AddNumberToObject(o, "predicted_ttft_ms",
                                backend_predicted_ttft_ms(b, now, BACKEND_PLAIN));
        /* Why predicted_ttft_ms may say less than the average. */
        cJSON_AddBoolToObject(o, "ttft_probe_due",
                              backend_latency_probe_due(b, now, BACKEND_PLAIN));
        cJSON_AddNumberToObject(o, "stream_ttft_ewma_ms", backend_ttft_ewma_ms(b, BACKEND_STREAM));
        cJSON_AddNumberToObject(o, "stream_predicted_ttft_ms",
                                backend_predicted_ttft_ms(b, now, BACKEND_STREAM));
        cJSON_AddBoolToObject(o, "stream_ttft_probe_due",
                              backend_latency_probe_due(b, now, BACKEND_STREAM));
        cJSON_AddNumberToObject(o, "open_connections", r->pools[i].nopen);
        cJSON_AddNumberToObject(o, "idle_connections", r->pools[i].nidle);
        if (cb->kind == CONF_BACKEND_SELF_HOSTED) {
            cJSON_AddNumberToObject(o, "utilization", backend_pool_utilization(b, now));
            cJSON_AddNumberToObject(o, "tokens_per_second", backend_tokens_per_second(b, now));
            cJSON_AddNumberToObject(o, "idle_cost_usd", backend_idle_cost_usd(b, now));
            cJSON_AddNumberToObject(o, "pool_cost_usd", backend_pool_cost_usd(b, now));
        }
        cJSON_AddItemToArray(arr, o);
    }
    send_json(c, 200, arr);
    cJSON_Delete(arr);
}

static void send_metrics(struct router__client *c)
{
    struct buf out = {0};

    /* The current config's gauges, also for a connection a reload left
     * on the old one: its tenants and pools would be set again after
     * router__forget_gauges dropped them, and stay for good. */
    router__refresh_gauges(c->router->shared->current);
    if (metrics_render(c->router->metrics, &out) != 0) {
        buf_free(&out);
        router__send_error(c, error_no_memory, NULL);
        return;
    }
    router__send_response(c, 200, metrics_content_type, NULL, out.data, out.len);
    buf_free(&out);
}

/* {"error":{...}} with `status` for a reload that did not apply. */
static void send_reload_error(struct router__client *c, int status, const char *message,
                              const char *type, const char *code)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *err = cJSON_AddObjectToObject(j, "error");

    cJSON_AddStringToObject(err, "message", message);
    cJSON_AddStringToObject(err, "type", type);
    cJSON_AddNullToObject(err, "param"); /* the shape of every other error */
    cJSON_AddStringToObject(err, "code", code);
    send_json(c, status, j);
    cJSON_Delete(j);
}

static void on_reloaded(void *arg, enum router_reload_result result, const char *why)
{
    struct router__reload_wait *w = arg;
    struct router__client *c = w->client;
    cJSON *j;

    free(w);
    if (c == NULL)
        return;
    c->req.reload_wait = NULL;
    router__deadline_set(&c->timeout, 0); /* before the answer sets the idle one */
    switch (result) {
    case ROUTER_RELOADED:
        j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "status", "reloaded");
        send_json(c, 200, j);
        cJSON_Delete(j);
        break;
    case ROUTER_RELOAD_REFUSED:
        send_reload_error(c, 400, why ? why : "reload failed", "invalid_request_error",
                          "invalid_config");
        break;
    case ROUTER_RELOAD_STOPPED:
        send_reload_error(c, 503, why ? why : "the router is stopping", "server_error",
                          "stopping");
        break;
    }
}

void router__admin_reload_expire(struct router__client *c)
{
    int ms = c->router->conf->admin_reload_timeout_ms;
    char why[256];

    reload_wait_detach(c);
    log_warn("reload: POST /admin/reload answered 504 after %d ms (admin_reload_timeout_ms); "
             "the reload goes on",
             ms);
    snprintf(why, sizeof(why),
             "the reload was not done within %d ms (admin_reload_timeout_ms); it goes on, and "
             "its config is applied if it loads without errors: see the log",
             ms);
    send_reload_error(c, 504, why, "server_error", "reload_timeout");
}

/* POST /admin/reload: like SIGHUP, answered when the reload is over, or
 * 504 after admin_reload_timeout_ms (router__admin_reload_expire): a
 * file that takes for ever to read (a FIFO no one writes, a hung mount)
 * must not hold the request for ever. The new config is validated first;
 * on errors the running one stays and the errors are returned (they name
 * files, lines and keys, never secrets). */
static void admin_reload(struct router__client *c)
{
    struct router__shared *sh = c->router->shared;
    struct router__reload_wait *w;

    if (llhttp_get_method(&c->parser) != HTTP_POST) {
        router__send_error(c, error_method, "use POST");
        return;
    }
    if (sh->reload == NULL) {
        router__send_error(c, error_not_found, "reload is not available");
        return;
    }
    if ((w = malloc(sizeof(*w))) == NULL) {
        router__send_error(c, error_no_memory, NULL);
        return;
    }
    w->client = c;
    c->req.reload_wait = w;
    /* Before the hook, which may answer at once (and clear it). */
    router__deadline_set(&c->timeout, c->router->conf->admin_reload_timeout_ms);
    sh->reload(sh->reload_arg, on_reloaded, w);
}

/* The path segment `in` with %XX decoded (HTTP clients encode what is not
 * a URL character: "a%2Fb" for the id "a/b") into out[size], NUL-ended;
 * -1 if it does not fit, a %XX is malformed, or it decodes to a NUL. */
static int percent_decode(struct slice in, char *out, size_t size)
{
    size_t o = 0;

    for (size_t i = 0; i < in.len; i++, o++) {
        char ch = in.p[i];

        if (ch == '%') {
            int hi = i + 2 < in.len ? fmt_hex_value((unsigned char)in.p[i + 1]) : -1;
            int lo = hi >= 0 ? fmt_hex_value((unsigned char)in.p[i + 2]) : -1;
            if (lo < 0 || (hi | lo) == 0)
                return -1;
            ch = (char)(hi << 4 | lo);
            i += 2;
        }
        if (o + 1 >= size)
            return -1;
        out[o] = ch;
    }
    out[o] = '\0';
    return 0;
}

/* GET /admin/tenants/{id}/spend, the id given raw or percent-encoded. */
static void tenant_spend(struct router__client *c, struct slice id)
{
    const struct conf_tenant *t;
    char name[CONF_NAME_MAX + 1];

    if (percent_decode(id, name, sizeof(name)) < 0 ||
        (t = conf_find_tenant(c->router->conf, name)) == NULL) {
        router__send_error(c, error_not_found, "unknown tenant");
        return;
    }
    query_spend(c, t, 1, 1);
}

void router__admin_handle(struct router__client *c, struct slice path)
{
    const struct conf *conf = c->router->conf;
    static const char tenants[] = "/admin/tenants";

    if (slice_eq(path, "/dashboard")) {
        size_t len;
        const char *page = metrics_dashboard(&len);

        if (conf->admin_key == NULL) {
            router__send_error(c, error_not_found, "the admin API is off (no admin_key)");
            return;
        }
        router__send_response(c, 200, "text/html; charset=utf-8", "Cache-Control: no-store\r\n",
                              page, len);
        return;
    }
    if (slice_eq(path, "/metrics") && conf->admin_key == NULL) {
        send_metrics(c);
        return;
    }
    if (!router__admin_authorized(c)) {
        router__send_error(c, conf->admin_key ? error_unauthorized : error_not_found,
                           conf->admin_key ? "admin key required" : "the admin API is off");
        return;
    }
    if (slice_eq(path, "/admin/reload")) {
        admin_reload(c);
    } else if (llhttp_get_method(&c->parser) != HTTP_GET &&
               llhttp_get_method(&c->parser) != HTTP_HEAD) {
        /* HEAD as everywhere: the head alone (router__send_response). */
        router__send_error(c, error_method, NULL);
    } else if (slice_eq(path, "/metrics")) {
        send_metrics(c);
    } else if (slice_eq(path, "/admin/backends")) {
        send_backends(c);
    } else if (slice_eq(path, tenants)) {
        query_spend(c, conf->tenants, conf->ntenants, 0);
    } else if (path.len > sizeof(tenants) + 6 && memcmp(path.p, tenants, sizeof(tenants) - 1) == 0 &&
               path.p[sizeof(tenants) - 1] == '/' &&
               memcmp(path.p + path.len - 6, "/spend", 6) == 0) {
        /* "/admin/tenants/" ID "/spend", the ID not empty */
        tenant_spend(c, (struct slice){path.p + sizeof(tenants), path.len - sizeof(tenants) - 6});
    } else {
        router__send_error(c, error_not_found, NULL);
    }
}
