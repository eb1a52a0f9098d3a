/*
 * conf/check.c: phase 3 of conf_load (checks that span several entries),
 * the sorted indexes it builds, and the conf_find_* lookups over them.
 *
 * Duplicates are found by sorting (name, position) and comparing
 * neighbours; the same sorted arrays then serve the O(log n) lookups. The
 * rules here are the ones a single key cannot check: unknown backends in
 * routes, prices that depend on `kind`, `free` and the price entries, SLOs
 * no backend can meet, a tenant key listed twice, experiments whose route,
 * tenants or arm backends do not exist or that an earlier one shadows.
 */
#include "conf/conf.h"
#include "conf/internal.h"

#include <openssl/crypto.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HAS(meta, key) (((meta)->set >> (key)) & 1)

/* Room policy/experiment.h keeps for "ab:<experiment>/<arm>" and its NUL
 * (POLICY_AB_REASON_MAX; conf/ depends on nothing but common/). */
#define AB_REASON_MAX 96

/* Order of NUL-terminated `b` against the `alen` bytes at `a`: memcmp
 * order, a prefix first. Sorting and searching both use it. */
static int cmp_text(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    int r = memcmp(a, b, alen < blen ? alen : blen);

    return r ? r : (alen > blen) - (alen < blen);
}

/* A named entry to sort: its name, its position (ties keep file order). */
struct named {
    const char *name; /* borrowed */
    size_t index;     /* position in its conf array */
    void *entry;      /* the backend, route, tenant, price, key, experiment or arm */
    int line;         /* where the name is written */
};

static int cmp_named(const void *pa, const void *pb)
{
    const struct named *a = pa, *b = pb;
    int r = cmp_text(a->name, strlen(a->name), b->name);

    return r ? r : (a->index > b->index) - (a->index < b->index);
}

/* Sort `v` and report each entry whose name repeats an earlier one, at
 * that entry's line, as "LIST[i].KEYNAME". `what` names the kind of thing
 * in the message. If `index` is not NULL, the sorted entries are stored
 * there. */
static void sort_and_find_duplicates(struct conf__ctx *ctx, struct named *v, size_t n,
                                     const char *list, const char *keyname, const char *what,
                                     void **index)
{
    char path[160], q[CONF__QUOTE_SIZE];

    qsort(v, n, sizeof(*v), cmp_named);
    for (size_t i = 1; i < n; i++) {
        size_t first = i - 1;

        if (strcmp(v[first].name, v[i].name) != 0)
            continue;
        while (first > 0 && strcmp(v[first - 1].name, v[i].name) == 0)
            first--;
        snprintf(path, sizeof(path), "%s[%zu].%s", list, v[i].index, keyname);
        conf__error(ctx, v[i].line, path, "duplicate %s %s (first at line %d)", what,
                    conf__quote(q, v[i].name, strlen(v[i].name)), v[first].line);
    }
    for (size_t i = 0; index && i < n; i++)
        index[i] = v[i].entry;
}

/* Backend keys that only make sense for one kind. */
static const struct {
    int key;           /* conf__backend_key */
    const char *name;  /* as written */
    enum conf_backend_kind kind; /* the kind it belongs to */
    unsigned needed:1; /* required of that kind unless free (or, for api
                          prices, given by a price entry) */
} kind_keys[] = {
    {CONF__B_GPU_HOURLY_USD, "gpu_hourly_usd", CONF_BACKEND_SELF_HOSTED, 1},
    {CONF__B_REPLICAS, "replicas", CONF_BACKEND_SELF_HOSTED, 1},
    {CONF__B_MAX_CONCURRENCY, "max_concurrency", CONF_BACKEND_SELF_HOSTED, 1},
    {CONF__B_TOKENS_PER_SECOND, "tokens_per_second", CONF_BACKEND_SELF_HOSTED, 1},
    {CONF__B_PRICE, "price", CONF_BACKEND_API, 0},
    {CONF__B_INPUT_USD, "input_usd_per_mtok", CONF_BACKEND_API, 1},
    {CONF__B_OUTPUT_USD, "output_usd_per_mtok", CONF_BACKEND_API, 1},
    {CONF__B_CACHED_INPUT_USD, "cached_input_usd_per_mtok", CONF_BACKEND_API, 0},
    {CONF__B_CACHE_WRITE_USD, "cache_write_usd_per_mtok", CONF_BACKEND_API, 0},
    {CONF__B_CACHE_WRITE_1H_USD, "cache_write_1h_usd_per_mtok", CONF_BACKEND_API, 0},
    {CONF__B_WEB_SEARCH_USD, "web_search_usd_per_1k", CONF_BACKEND_API, 0},
    {CONF__B_FILE_SEARCH_USD, "file_search_usd_per_1k", CONF_BACKEND_API, 0},
    {CONF__B_COST_FROM_USAGE, "cost_from_usage", CONF_BACKEND_API, 0},
    {CONF__B_LONG_CONTEXT, "long_context", CONF_BACKEND_API, 0},
    {CONF__B_FLEX, "flex", CONF_BACKEND_API, 0},
    {CONF__B_PRIORITY, "priority", CONF_BACKEND_API, 0},
};

/* A rate a backend leaves to its price entry (cached input, cache
 * writes), beside its input rate `input` (its own when `own_input`):
 * the entry's `*entry` (NULL: no entry) while the input is the entry's
 * too; with an input of its own, the entry's rate in the same ratio to
 * it as to the entry's input (`entry_input`), so a discount the backend
 * states carries to its cached tokens and a lower list rate is not paid
 * above it; with no entry, or an entry whose input is free (no ratio),
 * `factor` x its input, the default without an entry. */
static double derived_rate(const double *entry, double entry_input, double input, int own_input,
                           double factor)
{
    if (entry != NULL && !own_input)
        return *entry;
    if (entry != NULL && entry_input > 0)
        return *entry / entry_input * input;
    return factor * input;
}

/* A rate a backend leaves to one of its entry's tiers (long prompts,
 * flex, priority: `entry`), beside the backend's standard rate of that
 * kind `rate` (its own when `own_rate`) and the entry's `entry_rate`: the
 * entry's, in the entry's tier-to-standard ratio to a standard rate of
 * the backend's own, so a discount it states reaches long prompts and
 * service tiers as it reaches cached tokens (derived_rate); as listed
 * when the entry's standard rate is free (no ratio). Sets *scaled (may
 * be NULL) when it scaled. */
static double tier_rate(double entry, double entry_rate, double rate, int own_rate, int *scaled)
{
    if (!own_rate || entry_rate <= 0)
        return entry;
    if (scaled != NULL)
        *scaled = 1;
    return entry / entry_rate * rate;
}

/* An api backend's long-prompt tier, key by key like its other prices:
 * its own, else its entry's (complete whenever the entry has a tier, see
 * complete_long_context), scaled to a standard rate of its own
 * (tier_rate). A size with no rate to bill at, its own or its entry's, is
 * an error, and so are rates with no size. */
static void resolve_long_context(struct conf__ctx *ctx, size_t i, const struct conf_price *p)
{
    struct conf_backend *b = &ctx->conf->backends[i];
    const struct conf__meta *m = &ctx->backend_meta[i];
    struct conf_long_context *l = &b->long_context;
    const struct conf_long_context *pl = p && p->long_context.above_prompt_tokens > 0
                                             ? &p->long_context
                                             : NULL;
    static const struct {
        int key;
        const char *name;
    } rates[] = {{CONF__B_LONG_INPUT_USD, "input_usd_per_mtok"},
                 {CONF__B_LONG_OUTPUT_USD, "output_usd_per_mtok"}};
    char path[96];
    double in;
    /* its long input is not the entry's (its own, or scaled): the cached
     * and cache write rates follow it */
    int own = HAS(m, CONF__B_LONG_INPUT_USD);

    if (b->kind != CONF_BACKEND_API || (!HAS(m, CONF__B_LONG_CONTEXT) && pl == NULL))
        return;
    if (!HAS(m, CONF__B_LONG_ABOVE))
        l->above_prompt_tokens = pl ? pl->above_prompt_tokens : 0;
    if (pl && !own)
        l->input_usd_per_mtok = tier_rate(pl->input_usd_per_mtok, p->input_usd_per_mtok,
                                          b->input_usd_per_mtok, HAS(m, CONF__B_INPUT_USD), &own);
    if (pl && !HAS(m, CONF__B_LONG_OUTPUT_USD))
        l->output_usd_per_mtok = tier_rate(pl->output_usd_per_mtok, p->output_usd_per_mtok,
                                           b->output_usd_per_mtok, HAS(m, CONF__B_OUTPUT_USD),
                                           NULL);
    in = pl ? pl->input_usd_per_mtok : 0;
    if (!HAS(m, CONF__B_LONG_CACHED_INPUT_USD))
        l->cached_input_usd_per_mtok = derived_rate(pl ? &pl->cached_input_usd_per_mtok : NULL, in,
                                                    l->input_usd_per_mtok, own, 1);
    if (!HAS(m, CONF__B_LONG_CACHE_WRITE_USD))
        l->cache_write_usd_per_mtok = derived_rate(pl ? &pl->cache_write_usd_per_mtok : NULL, in,
                                                   l->input_usd_per_mtok, own,
                                                   CONF_CACHE_WRITE_FACTOR);
    if (!HAS(m, CONF__B_LONG_CACHE_WRITE_1H_USD))
        l->cache_write_1h_usd_per_mtok =
            derived_rate(pl ? &pl->cache_write_1h_usd_per_mtok : NULL, in, l->input_usd_per_mtok,
                         own, CONF_CACHE_WRITE_1H_FACTOR);
    if (HAS(m, CONF__B_LONG_ABOVE) && l->above_prompt_tokens == 0)
        return; /* the entry's tier turned off */
    if (l->above_prompt_tokens == 0) {
        snprintf(path, sizeof(path), "backends[%zu].long_context", i);
        conf__error(ctx, m->lines[CONF__B_LONG_CONTEXT], path,
                    "missing required key \"above_prompt_tokens\" (no price entry gives one)");
        return;
    }
    for (size_t k = 0; pl == NULL && k < sizeof(rates) / sizeof(rates[0]); k++) {
        if (HAS(m, rates[k].key))
            continue;
        snprintf(path, sizeof(path), "backends[%zu].long_context", i);
        conf__error(ctx, m->lines[CONF__B_LONG_CONTEXT], path,
                    "missing required key \"%s\" (no price entry gives one)", rates[k].name);
    }
}

/* An api backend's service tiers, key by key like its other prices: its
 * own, else its entry's (complete whenever the entry prices the tier, see
 * complete_tiers), scaled to a standard rate of its own (tier_rate), its
 * cached input following the tier's input. A tier of its own needs both
 * rates unless its entry gives them. */
static void resolve_tiers(struct conf__ctx *ctx, size_t i, const struct conf_price *p)
{
    struct conf_backend *b = &ctx->conf->backends[i];
    const struct conf__meta *m = &ctx->backend_meta[i];
    char path[96];

    for (int tier = CONF_TIER_FLEX; tier < CONF_TIER_COUNT && b->kind == CONF_BACKEND_API; tier++) {
        int key = CONF__B_FLEX + (tier - CONF_TIER_FLEX) * CONF__TIER_KEYS;
        struct conf_tier_rates *r = &b->tiers[tier];
        const struct conf_tier_rates *pr = p && p->tiers[tier].priced ? &p->tiers[tier] : NULL;

        /* its tier input is not the entry's (its own, or scaled) */
        int own = HAS(m, key + CONF__TIER_INPUT);

        if (!HAS(m, key) && pr == NULL)
            continue;
        if (pr && !own)
            r->input_usd_per_mtok = tier_rate(pr->input_usd_per_mtok, p->input_usd_per_mtok,
                                              b->input_usd_per_mtok, HAS(m, CONF__B_INPUT_USD),
                                              &own);
        if (pr && !HAS(m, key + CONF__TIER_OUTPUT))
            r->output_usd_per_mtok = tier_rate(pr->output_usd_per_mtok, p->output_usd_per_mtok,
                                               b->output_usd_per_mtok, HAS(m, CONF__B_OUTPUT_USD),
                                               NULL);
        if (!HAS(m, key + CONF__TIER_CACHED))
            r->cached_input_usd_per_mtok =
                derived_rate(pr ? &pr->cached_input_usd_per_mtok : NULL,
                             pr ? pr->input_usd_per_mtok : 0, r->input_usd_per_mtok, own, 1);
        for (int k = CONF__TIER_INPUT; pr == NULL && k <= CONF__TIER_OUTPUT; k++) {
            if (HAS(m, key + k))
                continue;
            snprintf(path, sizeof(path), "backends[%zu].%s", i, conf_tier_name(tier));
            conf__error(ctx, m->lines[key], path,
                        "missing required key \"%s\" (no price entry gives one)",
                        k == CONF__TIER_INPUT ? "input_usd_per_mtok" : "output_usd_per_mtok");
        }
        r->priced = 1;
        b->tiered = 1;
    }
}

/* An api backend's price entry: the one `price:` names, else the one
 * named like its `model`, if any. Each price the backend does not give
 * itself comes from the entry, its cached input and cache write rates
 * scaled to an input rate of its own (derived_rate); without an entry,
 * cached input falls back to the input price. */
static void resolve_price(struct conf__ctx *ctx, size_t i)
{
    struct conf_backend *b = &ctx->conf->backends[i];
    struct conf__meta *m = &ctx->backend_meta[i];
    const char *name = b->price_name ? b->price_name : b->model;
    const struct conf_price *p = name ? conf_find_price(ctx->conf, name) : NULL;
    char path[96], q[CONF__QUOTE_SIZE];
    double in;
    int own;

    if (b->kind == CONF_BACKEND_API && b->price_name && p == NULL) {
        snprintf(path, sizeof(path), "backends[%zu].price", i);
        conf__error(ctx, m->lines[CONF__B_PRICE], path, "unknown price %s%s",
                    conf__quote(q, name, strlen(name)),
                    ctx->conf->nprices ? "" : " (no prices are defined: include a price file)");
    }
    if (b->kind != CONF_BACKEND_API)
        p = NULL;
    b->price = p;
    if (p && !HAS(m, CONF__B_INPUT_USD))
        b->input_usd_per_mtok = p->input_usd_per_mtok;
    if (p && !HAS(m, CONF__B_OUTPUT_USD))
        b->output_usd_per_mtok = p->output_usd_per_mtok;
    own = HAS(m, CONF__B_INPUT_USD);
    in = p ? p->input_usd_per_mtok : 0;
    if (!HAS(m, CONF__B_CACHED_INPUT_USD))
        b->cached_input_usd_per_mtok = derived_rate(p ? &p->cached_input_usd_per_mtok : NULL, in,
                                                    b->input_usd_per_mtok, own, 1);
    if (!HAS(m, CONF__B_CACHE_WRITE_USD))
        b->cache_write_usd_per_mtok = derived_rate(p ? &p->cache_write_usd_per_mtok : NULL, in,
                                                   b->input_usd_per_mtok, own,
                                                   CONF_CACHE_WRITE_FACTOR);
    if (!HAS(m, CONF__B_CACHE_WRITE_1H_USD))
        b->cache_write_1h_usd_per_mtok = derived_rate(p ? &p->cache_write_1h_usd_per_mtok : NULL,
                                                      in, b->input_usd_per_mtok, own,
                                                      CONF_CACHE_WRITE_1H_FACTOR);
    if (!HAS(m, CONF__B_WEB_SEARCH_USD))
        b->web_search_usd_per_1k = p ? p->web_search_usd_per_1k : 0;
    if (!HAS(m, CONF__B_FILE_SEARCH_USD))
        b->file_search_usd_per_1k = p ? p->file_search_usd_per_1k : 0;
    resolve_long_context(ctx, i, p);
    resolve_tiers(ctx, i, p);
}

/* Prices and capacity: a backend must say what it costs unless `free`.
 * Cached input has a default (the input price), so it is not required. */
static void check_backend(struct conf__ctx *ctx, size_t i)
{
    struct conf_backend *b = &ctx->conf->backends[i];
    struct conf__meta *m = &ctx->backend_meta[i];
    char path[96];
    int priced;

    if (!HAS(m, CONF__B_KIND))
        return; /* reported as missing */
    /* Anthropic's API takes its key as x-api-key, not as a Bearer token. */
    if (b->api == CONF_API_ANTHROPIC && !HAS(m, CONF__B_AUTH_HEADER)) {
        free(b->auth_header);
        if ((b->auth_header = strdup("x-api-key")) == NULL)
            ctx->oom = 1;
    }
    /* A backend's first byte may take as long as it thinks before it
     * answers; a stream may think as long again after its first events (a
     * Responses stream sends response.created at once, then nothing while
     * a reasoning model reasons), so the silence allowed between two
     * reads is by default that same time. */
    if (!HAS(m, CONF__B_READ_TIMEOUT))
        b->read_timeout_ms = b->first_byte_timeout_ms;
    resolve_price(ctx, i);
    /* an unknown `price:` is reported already: its prices are not missing */
    priced = b->price != NULL || (b->kind == CONF_BACKEND_API && b->price_name != NULL);
    for (size_t k = 0; k < sizeof(kind_keys) / sizeof(kind_keys[0]); k++) {
        int given = HAS(m, kind_keys[k].key);

        snprintf(path, sizeof(path), "backends[%zu].%s", i, kind_keys[k].name);
        if (given && kind_keys[k].kind != b->kind)
            conf__error(ctx, m->lines[kind_keys[k].key], path, "only applies to kind: %s",
                        b->kind == CONF_BACKEND_API ? "self_hosted" : "api");
        else if (!given && kind_keys[k].kind == b->kind && kind_keys[k].needed &&
                 !b->is_free && !priced)
            conf__error(ctx, m->line, path, "missing: %s unless it says free: true",
                        b->kind == CONF_BACKEND_API
                            ? "an api backend needs it (or a price entry named by price: or "
                              "model)"
                            : "a self_hosted backend needs it");
    }
}

/* The price entries are unique already (node_prices): only sort them. */
static void index_prices(struct conf__ctx *ctx)
{
    struct conf *c = ctx->conf;
    struct named *v = calloc(c->nprices + 1, sizeof(*v));

    c->_prices_by_name = calloc(c->nprices + 1, sizeof(*c->_prices_by_name));
    if (v == NULL || c->_prices_by_name == NULL) {
        ctx->oom = 1;
        goto out;
    }
    for (size_t i = 0; i < c->nprices; i++)
        v[i] = (struct named){c->prices[i].name, i, &c->prices[i], c->prices[i].line};
    sort_and_find_duplicates(ctx, v, c->nprices, "prices", "name", "price",
                             (void **)c->_prices_by_name);
out:
    free(v);
}

/* A name the router writes itself where a backend, tenant or route would
 * be: the metrics' and cost log's backend "cache" (a cache hit) and "none"
 * (no backend chosen), the metrics' tenant "unauthenticated" and route
 * "unknown" (none found). One of the config's so named would be counted
 * together with them. */
static void refuse_reserved(struct conf__ctx *ctx, const char *name, const char *const *reserved,
                            int line, const char *path)
{
    for (; name != NULL && *reserved != NULL; reserved++)
        if (strcmp(name, *reserved) == 0)
            conf__error(ctx, line, path,
                        "\"%s\" is reserved: the router's metrics use it for their own",
                        name);
}

static void check_backends(struct conf__ctx *ctx)
{
    struct conf *c = ctx->conf;
    struct named *v = calloc(c->nbackends + 1, sizeof(*v));
    size_t n = 0;

    c->_backends_by_name = calloc(c->nbackends + 1, sizeof(*c->_backends_by_name));
    if (v == NULL || c->_backends_by_name == NULL) {
        ctx->oom = 1;
        goto out;
    }
    for (size_t i = 0; i < c->nbackends; i++) {
        static const char *const reserved[] = {"cache", "none", NULL};
        char path[48];

        snprintf(path, sizeof(path), "backends[%zu].name", i);
        refuse_reserved(ctx, c->backends[i].name, reserved, ctx->backend_meta[i].lines[CONF__B_NAME],
                        path);
        check_backend(ctx, i);
        if (c->backends[i].name)
            v[n++] = (struct named){c->backends[i].name, i, &c->backends[i],
                                    ctx->backend_meta[i].lines[CONF__B_NAME]};
    }
    sort_and_find_duplicates(ctx, v, n, "backends", "name", "backend",
                             (void **)c->_backends_by_name);
out:
    free(v);
}

/* Resolve each route's candidate names; returns the best quality among
 * all resolved candidates (-1 if none). */
static int check_routes(struct conf__ctx *ctx)
{
    struct conf *c = ctx->conf;
    struct named *v = calloc(c->nroutes + 1, sizeof(*v));
    size_t n = 0;
    int best = -1;
    char path[96], q[CONF__QUOTE_SIZE];

    c->_routes_by_model = calloc(c->nroutes + 1, sizeof(*c->_routes_by_model));
    if (v == NULL || c->_routes_by_model == NULL) {
        ctx->oom = 1;
        goto out;
    }
    for (size_t i = 0; i < c->nroutes; i++) {
        struct conf_route *r = &c->routes[i];
        struct conf__meta *m = &ctx->route_meta[i];
        static const char *const reserved[] = {"unknown", NULL};

        snprintf(path, sizeof(path), "routes[%zu].model", i);
        refuse_reserved(ctx, r->model, reserved, m->lines[CONF__RT_MODEL], path);
        if (r->model)
            v[n++] = (struct named){r->model, i, r, m->lines[CONF__RT_MODEL]};
        if ((r->candidates = calloc(m->nitems + 1, sizeof(*r->candidates))) == NULL) {
            ctx->oom = 1;
            goto out;
        }
        if (m->nitems > CONF_CANDIDATES_MAX) {
            /* The selector would never look past them. */
            snprintf(path, sizeof(path), "routes[%zu].candidates", i);
            conf__error(ctx, m->lines[CONF__RT_CANDIDATES], path,
                        "has %zu backends, more than the %d a route may have", m->nitems,
                        CONF_CANDIDATES_MAX);
        }
        for (size_t j = 0; j < m->nitems; j++) {
            const struct conf_backend *b;

            if (m->items[j] == NULL)
                continue; /* its value was already reported */
            snprintf(path, sizeof(path), "routes[%zu].candidates[%zu]", i, j);
            b = conf_find_backend(c, m->items[j]);
            if (b == NULL) {
                conf__error(ctx, m->item_lines[j], path, "unknown backend %s",
                            conf__quote(q, m->items[j], strlen(m->items[j])));
                continue;
            }
            for (size_t k = 0; k < r->ncandidates; k++)
                if (r->candidates[k] == b)
                    b = NULL;
            if (b == NULL) {
                conf__error(ctx, m->item_lines[j], path, "backend %s is listed twice",
                            conf__quote(q, m->items[j], strlen(m->items[j])));
                continue;
            }
            if (r->ncandidates < CONF_CANDIDATES_MAX) /* the selector's mask has 64 bits */
                r->speaks[b->api] |= UINT64_C(1) << r->ncandidates;
            r->candidates[r->ncandidates++] = (struct conf_backend *)b;
            if (b->quality > best)
                best = b->quality;
        }
    }
    sort_and_find_duplicates(ctx, v, n, "routes", "model", "route",
                             (void **)c->_routes_by_model);
out:
    free(v);
    return best;
}

/* A key hash with where it was written, for the duplicate report. */
struct key_at {
    struct conf__key key; /* hash and tenant */
    size_t tenant;        /* tenant index */
    size_t item;          /* index in its api_keys */
};

static int cmp_key_at(const void *pa, const void *pb)
{
    const struct key_at *a = pa, *b = pb;
    int r = memcmp(a->key.hash, b->key.hash, sizeof(a->key.hash));

    if (r)
        return r;
    if (a->tenant != b->tenant)
        return a->tenant < b->tenant ? -1 : 1;
    return (a->item > b->item) - (a->item < b->item);
}

/* All tenant key hashes in one sorted array; a hash used twice (by one
 * tenant or two) would make the lookup ambiguous, so it is an error. */
static void index_keys(struct conf__ctx *ctx)
{
    struct conf *c = ctx->conf;
    struct key_at *v;
    size_t n = 0;
    char path[96];

    for (size_t i = 0; i < c->ntenants; i++)
        n += c->tenants[i].nkeys;
    v = calloc(n + 1, sizeof(*v));
    c->_keys = calloc(n + 1, sizeof(*c->_keys));
    if (v == NULL || c->_keys == NULL) {
        ctx->oom = 1;
        goto out;
    }
    n = 0;
    for (size_t i = 0; i < c->ntenants; i++) {
        for (size_t j = 0; j < c->tenants[i].nkeys; j++) {
            if (ctx->tenant_meta[i].item_lines[j] == 0)
                continue; /* malformed, reported */
            memcpy(v[n].key.hash, c->tenants[i].keys[j].hash, 32);
            v[n].key.key = &c->tenants[i].keys[j];
            v[n].tenant = i;
            v[n++].item = j;
        }
    }
    qsort(v, n, sizeof(*v), cmp_key_at);
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && memcmp(v[i].key.hash, v[i - 1].key.hash, 32) == 0) {
            size_t first = i - 1;

            while (first > 0 && memcmp(v[first - 1].key.hash, v[i].key.hash, 32) == 0)
                first--;
            snprintf(path, sizeof(path), "tenants[%zu].api_keys[%zu]", v[i].tenant, v[i].item);
            conf__error(ctx, ctx->tenant_meta[v[i].tenant].item_lines[v[i].item], path,
                        "duplicate key (first at line %d)",
                        ctx->tenant_meta[v[first].tenant].item_lines[v[first].item]);
        }
        c->_keys[i] = v[i].key;
    }
    c->_nkeys = n;
out:
    free(v);
}

/* The name the store counts a budgeted key's spend under, made once here
 * so that a request only reads it. */
static void key_subject(struct conf__ctx *ctx, const struct conf_tenant *t, struct conf_key *k)
{
    size_t n;

    if (t->id == NULL || k->name == NULL || (k->daily_usd <= 0 && k->monthly_usd <= 0))
        return;
    n = strlen(t->id) + strlen(k->name) + 2;
    if ((k->subject = malloc(n)) == NULL) {
        ctx->oom = 1;
        return;
    }
    snprintf(k->subject, n, "%s%c%s", t->id, CONF_KEY_SUBJECT_SEP, k->name);
}

/* Key names label metrics and log lines: unique within their tenant. */
static void check_key_names(struct conf__ctx *ctx, size_t i)
{
    struct conf_tenant *t = &ctx->conf->tenants[i];
    struct named *v = calloc(t->nkeys + 1, sizeof(*v));
    char list[64];
    size_t n = 0;

    if (v == NULL) {
        ctx->oom = 1;
        return;
    }
    for (size_t j = 0; j < t->nkeys; j++) {
        key_subject(ctx, t, &t->keys[j]);
        if (t->keys[j].name)
            v[n++] = (struct named){t->keys[j].name, j, &t->keys[j], t->keys[j].line};
    }
    snprintf(list, sizeof(list), "tenants[%zu].api_keys", i);
    sort_and_find_duplicates(ctx, v, n, list, "name", "key name", NULL);
    free(v);
}

static int cmp_route_ptr(const void *a, const void *b)
{
    const struct conf_route *x = *(const struct conf_route *const *)a;
    const struct conf_route *y = *(const struct conf_route *const *)b;

    return (x > y) - (x < y);
}

/* One resolved entry of a `models:` list. */
struct model_ref {
    const struct conf_route *route;
    size_t item; /* its position in the list */
};

static int cmp_model_ref(const void *a, const void *b)
{
    const struct model_ref *x = a, *y = b;
    int c = cmp_route_ptr(&x->route, &y->route);

    return c ? c : (x->item > y->item) - (x->item < y->item);
}

/* A `models:` list (a tenant's or a key's; a NULL name is a value
 * reported already): each the model of a route, each listed once.
 * Resolved into m->routes, sorted by address for the conf_*_allows
 * lookups (sorted once: a long list stays n log n); the names are freed.
 * `path` is the list's, e.g. "tenants[0].models". */
static void resolve_models(struct conf__ctx *ctx, struct conf_models *m, const char *path)
{
    struct conf *c = ctx->conf;
    struct model_ref *v = calloc(m->nnames + 1, sizeof(*v));
    size_t nv = 0;
    char ipath[160], q[CONF__QUOTE_SIZE];

    m->routes = calloc(m->nnames + 1, sizeof(*m->routes));
    if (v == NULL || m->routes == NULL) {
        ctx->oom = 1;
        goto out;
    }
    for (size_t j = 0; j < m->nnames; j++) {
        const struct conf_route *r;

        if (m->names[j] == NULL)
            continue; /* its value was already reported */
        if ((r = conf_find_route(c, m->names[j], strlen(m->names[j]))) != NULL) {
            v[nv++] = (struct model_ref){r, j};
            continue;
        }
        snprintf(ipath, sizeof(ipath), "%s[%zu]", path, j);
        conf__error(ctx, m->lines[j], ipath, "unknown model %s (no route has it)",
                    conf__quote(q, m->names[j], strlen(m->names[j])));
    }
    qsort(v, nv, sizeof(*v), cmp_model_ref);
    for (size_t k = 0; k < nv; k++) {
        if (m->n == 0 || m->routes[m->n - 1] != v[k].route) {
            m->routes[m->n++] = v[k].route;
            continue;
        }
        snprintf(ipath, sizeof(ipath), "%s[%zu]", path, v[k].item);
        conf__error(ctx, m->lines[v[k].item], ipath, "model %s is listed twice",
                    conf__quote(q, v[k].route->model, strlen(v[k].route->model)));
    }
out:
    free(v);
    conf__models_names_free(m);
}

/* The `models:` of tenant `i` and of its keys. */
static void resolve_tenant_models(struct conf__ctx *ctx, size_t i)
{
    struct conf_tenant *t = &ctx->conf->tenants[i];
    char path[96];

    if (t->models.names != NULL) {
        snprintf(path, sizeof(path), "tenants[%zu].models", i);
        resolve_models(ctx, &t->models, path);
    }
    for (size_t j = 0; t->keys && j < t->nkeys; j++) {
        if (t->keys[j].models.names == NULL)
            continue;
        snprintf(path, sizeof(path), "tenants[%zu].api_keys[%zu].models", i, j);
        resolve_models(ctx, &t->keys[j].models, path);
    }
}

/* Has tenant `t`, or one of its keys, a budget for a soft limit to apply
 * to? A key's budget takes its tenant's soft_limit_pct (it has none of
 * its own), also when the tenant has no budget. */
static int has_a_budget(const struct conf_tenant *t)
{
    if (t->daily_usd > 0 || t->monthly_usd > 0)
        return 1;
    for (size_t k = 0; k < t->nkeys; k++)
        if (t->keys[k].daily_usd > 0 || t->keys[k].monthly_usd > 0)
            return 1;
    return 0;
}

static void check_tenants(struct conf__ctx *ctx, int best_quality)
{
    struct conf *c = ctx->conf;
    struct named *v = calloc(c->ntenants + 1, sizeof(*v));
    size_t n = 0;
    char path[96];

    c->_tenants_by_id = calloc(c->ntenants + 1, sizeof(*c->_tenants_by_id));
    if (v == NULL || c->_tenants_by_id == NULL) {
        ctx->oom = 1;
        goto out;
    }
    for (size_t i = 0; i < c->ntenants; i++) {
        struct conf_tenant *t = &c->tenants[i];
        struct conf__meta *m = &ctx->tenant_meta[i];

        static const char *const reserved[] = {"unauthenticated", NULL};

        snprintf(path, sizeof(path), "tenants[%zu].id", i);
        refuse_reserved(ctx, t->id, reserved, m->lines[CONF__T_ID], path);
        if (t->id)
            v[n++] = (struct named){t->id, i, t, m->lines[CONF__T_ID]};
        if (best_quality >= 0 && t->min_quality > best_quality) {
            snprintf(path, sizeof(path), "tenants[%zu].slo.min_quality", i);
            conf__error(ctx, m->lines[CONF__T_MIN_QUALITY], path,
                        "%d is above the quality of every route candidate (best: %d)",
                        t->min_quality, best_quality);
        }
        if (t->soft_limit_pct > 0 && !has_a_budget(t)) {
            snprintf(path, sizeof(path), "tenants[%zu].budget.soft_limit_pct", i);
            conf__error(ctx, m->lines[CONF__T_SOFT_LIMIT], path,
                        "needs a budget (daily_usd or monthly_usd, the tenant's or a key's) "
                        "to apply to");
        }
        check_key_names(ctx, i);
        resolve_tenant_models(ctx, i);
    }
    sort_and_find_duplicates(ctx, v, n, "tenants", "id", "tenant", (void **)c->_tenants_by_id);
    index_keys(ctx);
out:
    free(v);
}

/* An arm's backends: known, candidates of the experiment's route (when
 * that exists), each listed once. */
static void check_arm_backends(struct conf__ctx *ctx, size_t i, size_t j,
                               const struct conf_route *route)
{
    const struct conf_arm *a = &ctx->conf->experiments[i].arms[j];
    const struct conf__meta *am = &ctx->experiment_meta[i].sub[j];
    char path[128], q[CONF__QUOTE_SIZE], q2[CONF__QUOTE_SIZE];

    for (size_t k = 0; k < a->nbackends; k++) {
        const struct conf_backend *b;
        size_t c;

        if (a->backends[k] == NULL)
            continue; /* its value was already reported */
        snprintf(path, sizeof(path), "experiments[%zu].arms[%zu].backends[%zu]", i, j, k);
        conf__quote(q, a->backends[k], strlen(a->backends[k]));
        if ((b = conf_find_backend(ctx->conf, a->backends[k])) == NULL) {
            conf__error(ctx, am->item_lines[k], path, "unknown backend %s", q);
            continue;
        }
        for (c = 0; route && c < route->ncandidates && route->candidates[c] != b; c++)
            ;
        if (route && c == route->ncandidates)
            conf__error(ctx, am->item_lines[k], path,
                        "backend %s is not a candidate of route %s", q,
                        conf__quote(q2, route->model, strlen(route->model)));
        for (c = 0; c < k; c++)
            if (a->backends[c] && strcmp(a->backends[c], a->backends[k]) == 0)
                break;
        if (c < k)
            conf__error(ctx, am->item_lines[k], path, "backend %s is listed twice", q);
    }
}

/* One experiment: its route and tenants exist, its arms are unique, fit
 * the reason text, name the route's candidates and carry some weight. */
static void check_experiment(struct conf__ctx *ctx, size_t i)
{
    const struct conf_experiment *e = &ctx->conf->experiments[i];
    const struct conf__meta *m = &ctx->experiment_meta[i];
    const struct conf_route *route = NULL;
    struct named *v = calloc(e->narms + 1, sizeof(*v));
    char path[128], q[CONF__QUOTE_SIZE];
    int64_t total = 0;
    size_t n = 0;

    if (v == NULL) {
        ctx->oom = 1;
        return;
    }
    if (e->route && (route = conf_find_route(ctx->conf, e->route, strlen(e->route))) == NULL) {
        snprintf(path, sizeof(path), "experiments[%zu].route", i);
        conf__error(ctx, m->lines[CONF__E_ROUTE], path, "unknown route %s",
                    conf__quote(q, e->route, strlen(e->route)));
    }
    for (size_t j = 0; j < e->ntenants; j++) {
        if (e->tenants[j] == NULL || conf_find_tenant(ctx->conf, e->tenants[j]))
            continue;
        snprintf(path, sizeof(path), "experiments[%zu].tenants[%zu]", i, j);
        conf__error(ctx, m->item_lines[j], path, "unknown tenant %s",
                    conf__quote(q, e->tenants[j], strlen(e->tenants[j])));
    }
    for (size_t j = 0; j < e->narms && j < m->nsub; j++) {
        const struct conf_arm *a = &e->arms[j];

        total += a->weight;
        if (a->name)
            v[n++] = (struct named){a->name, j, (void *)a, m->sub[j].lines[CONF__A_NAME]};
        if (a->name && e->name && 5 + strlen(e->name) + strlen(a->name) > AB_REASON_MAX) {
            snprintf(path, sizeof(path), "experiments[%zu].arms[%zu].name", i, j);
            conf__error(ctx, m->sub[j].lines[CONF__A_NAME], path,
                        "experiment and arm names together must be at most %d characters "
                        "(they make the reason \"ab:EXPERIMENT/ARM\")", AB_REASON_MAX - 5);
        }
        check_arm_backends(ctx, i, j, route);
    }
    if (e->narms > 0 && total == 0) {
        snprintf(path, sizeof(path), "experiments[%zu].arms", i);
        conf__error(ctx, m->lines[CONF__E_ARMS], path,
                    "the weights sum to 0: at least one arm needs a weight above 0");
    }
    snprintf(path, sizeof(path), "experiments[%zu].arms", i);
    sort_and_find_duplicates(ctx, v, n, path, "name", "arm", NULL);
    free(v);
}

/* One experiment, or one tenant an experiment lists, by its route, for
 * finding those an earlier experiment shadows. */
struct shadow_key {
    const char *route;  /* the experiment's route (borrowed) */
    const char *tenant; /* a tenant it lists (borrowed), or NULL: the experiment */
    size_t exp;         /* index of the experiment */
    size_t item;        /* index of the tenant in its list */
};

/* By route, then tenant (an experiment's own key, tenant NULL, first). */
static int cmp_route_tenant(const struct shadow_key *a, const struct shadow_key *b)
{
    int r = strcmp(a->route, b->route);

    if (r == 0 && a->tenant != b->tenant)
        r = !a->tenant ? -1 : !b->tenant ? 1 : strcmp(a->tenant, b->tenant);
    return r;
}

static int cmp_shadow_key(const void *pa, const void *pb)
{
    const struct shadow_key *a = pa, *b = pb;
    int r = cmp_route_tenant(a, b);

    if (r == 0)
        r = (a->exp > b->exp) - (a->exp < b->exp);
    return r ? r : (a->item > b->item) - (a->item < b->item);
}

/* Of `v`, sorted, the end of the run that shares v[i]'s route and tenant. */
static size_t shadow_run(const struct shadow_key *v, size_t n, size_t i)
{
    size_t end = i + 1;

    while (end < n && cmp_route_tenant(&v[end], &v[i]) == 0)
        end++;
    return end;
}

/* Fill `v` with one key per experiment that has a route (tenant NULL)
 * and one per tenant it lists; returns how many. */
static size_t shadow_keys(const struct conf__ctx *ctx, struct shadow_key *v)
{
    const struct conf *c = ctx->conf;
    size_t n = 0;

    for (size_t i = 0; i < c->nexperiments; i++) {
        const struct conf_experiment *e = &c->experiments[i];

        /* Tenants given but not a list of names (reported as such) are
         * not "every tenant": it neither shadows nor is shadowed. */
        if (e->route == NULL ||
            (e->ntenants == 0 && HAS(&ctx->experiment_meta[i], CONF__E_TENANTS)))
            continue;
        v[n++] = (struct shadow_key){e->route, NULL, i, 0};
        for (size_t j = 0; j < e->ntenants; j++)
            if (e->tenants[j])
                v[n++] = (struct shadow_key){e->route, e->tenants[j], i, j};
    }
    return n;
}

/* The first experiment of a route that applies to a tenant is its only
 * one, so an experiment that an earlier one of its route shadows (for all
 * tenants, or for one it lists) would load and never split that traffic.
 * Sorted by (route, tenant, position), as duplicates are found: a run of
 * one route and tenant starts at the experiment that takes it first, and
 * a run of one route's experiments tells which take every tenant. An
 * experiment an earlier one for all tenants shadows is reported once, at
 * its route. */
static void check_shadowed(struct conf__ctx *ctx)
{
    const struct conf *c = ctx->conf;
    size_t n = 0, total = c->nexperiments, end;
    struct shadow_key *v;
    unsigned char *whole; /* experiment i is shadowed whole */
    char path[128], q[CONF__QUOTE_SIZE];

    for (size_t i = 0; i < c->nexperiments; i++)
        total += c->experiments[i].ntenants;
    v = calloc(total + 1, sizeof(*v));
    whole = calloc(c->nexperiments + 1, 1);
    if (v == NULL || whole == NULL) {
        ctx->oom = 1;
        goto out;
    }
    n = shadow_keys(ctx, v);
    qsort(v, n, sizeof(*v), cmp_shadow_key);
    for (size_t i = 0; i < n; i = end) { /* the experiments of one route */
        size_t all = SIZE_MAX;

        end = shadow_run(v, n, i);
        for (size_t k = i; k < end && v[i].tenant == NULL; k++) {
            if (all != SIZE_MAX) {
                whole[v[k].exp] = 1;
                snprintf(path, sizeof(path), "experiments[%zu].route", v[k].exp);
                conf__error(ctx, ctx->experiment_meta[v[k].exp].lines[CONF__E_ROUTE], path,
                            "never applies: experiments[%zu] on the same route takes every "
                            "tenant first (the first experiment that applies wins)", all);
            } else if (c->experiments[v[k].exp].ntenants == 0) {
                all = v[k].exp;
            }
        }
    }
    for (size_t i = 0; i < n; i = end) { /* the experiments listing one tenant */
        end = shadow_run(v, n, i);
        for (size_t k = i + 1; k < end && v[i].tenant; k++) {
            if (v[k].exp == v[i].exp || whole[v[k].exp])
                continue;
            snprintf(path, sizeof(path), "experiments[%zu].tenants[%zu]", v[k].exp, v[k].item);
            conf__error(ctx, ctx->experiment_meta[v[k].exp].item_lines[v[k].item], path,
                        "never applies to tenant %s: experiments[%zu] on the same route takes "
                        "it first (the first experiment that applies wins)",
                        conf__quote(q, v[k].tenant, strlen(v[k].tenant)), v[i].exp);
        }
    }
out:
    free(v);
    free(whole);
}

static void check_experiments(struct conf__ctx *ctx)
{
    struct conf *c = ctx->conf;
    struct named *v = calloc(c->nexperiments + 1, sizeof(*v));
    size_t n = 0;

    if (v == NULL) {
        ctx->oom = 1;
        return;
    }
    for (size_t i = 0; i < c->nexperiments; i++) {
        if (c->experiments[i].name)
            v[n++] = (struct named){c->experiments[i].name, i, &c->experiments[i],
                                    ctx->experiment_meta[i].lines[CONF__E_NAME]};
        check_experiment(ctx, i);
    }
    check_shadowed(ctx);
    sort_and_find_duplicates(ctx, v, n, "experiments", "name", "experiment", NULL);
    free(v);
}

/* A local cache smaller than one entry could never hold anything. */
static void check_cache(struct conf__ctx *ctx)
{
    const struct conf *c = ctx->conf;
    const struct conf__meta *m = &ctx->root;

    if (!c->cache_enabled || c->cache_local_bytes >= c->cache_max_entry_bytes)
        return;
    conf__error(ctx,
                HAS(m, CONF__R_LOCAL_BYTES) ? m->lines[CONF__R_LOCAL_BYTES]
                                            : m->lines[CONF__R_MAX_ENTRY_BYTES],
                "cache.local_bytes", "%zu is smaller than cache.max_entry_bytes (%zu)",
                c->cache_local_bytes, c->cache_max_entry_bytes);
}

/* A certificate is no use without its key, nor a key without it. */
static void check_tls(struct conf__ctx *ctx)
{
    const struct conf__meta *m = &ctx->root;
    int cert = HAS(m, CONF__R_TLS_CERT_FILE), key = HAS(m, CONF__R_TLS_KEY_FILE);

    if (cert && !key)
        conf__error(ctx, m->lines[CONF__R_TLS_CERT_FILE], "tls.key_file",
                    "is required with tls.cert_file");
    else if (key && !cert)
        conf__error(ctx, m->lines[CONF__R_TLS_KEY_FILE], "tls.cert_file",
                    "is required with tls.key_file");
    else if (HAS(m, CONF__R_TLS) && !cert)
        conf__error(ctx, m->lines[CONF__R_TLS], "tls", "needs cert_file and key_file");
}

/* The journal exists only with Redis, the spend file only without: a
 * file named with the other store would promise a safety that is not
 * there (with Redis, Redis keeps the spend). */
static void check_store(struct conf__ctx *ctx)
{
    const struct conf__meta *m = &ctx->root;

    if (HAS(m, CONF__R_JOURNAL_FILE) && ctx->conf->redis_url == NULL)
        conf__error(ctx, m->lines[CONF__R_JOURNAL_FILE], "store.journal_file",
                    "needs store.redis (the in-process store has no journal; its spend is kept "
                    "across a restart by store.spend_file)");
    if (HAS(m, CONF__R_SPEND_FILE) && ctx->conf->redis_url != NULL)
        conf__error(ctx, m->lines[CONF__R_SPEND_FILE], "store.spend_file",
                    "is for the in-process store (with store.redis, Redis keeps the spend; "
                    "store.journal_file keeps what it has not taken yet across a stop)");
}

void conf__check(struct conf__ctx *ctx)
{
    int best;

    index_prices(ctx);
    check_backends(ctx);
    best = check_routes(ctx);
    check_tenants(ctx, best);
    check_experiments(ctx);
    check_cache(ctx);
    check_store(ctx);
    check_tls(ctx);
}

/* ---- lookups ---- */

static int listed(const struct conf_models *m, const struct conf_route *r)
{
    return m->routes == NULL ||
           bsearch(&r, m->routes, m->n, sizeof(*m->routes), cmp_route_ptr) != NULL;
}

int conf_tenant_allows(const struct conf_tenant *t, const struct conf_route *r)
{
    return listed(&t->models, r);
}

int conf_key_allows(const struct conf_key *k, const struct conf_route *r)
{
    return conf_tenant_allows(k->tenant, r) && listed(&k->models, r);
}

/* Binary search of `n` entries sorted by the C string found at byte
 * `name_off` of each, for the `len` bytes at `key`. NULL entries only
 * exist in a failed load and sort last. */
static const void *search_by_name(void *const *v, size_t n, size_t name_off, const char *key,
                                  size_t len)
{
    size_t lo = 0, hi = v ? n : 0;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const char *name;
        int r;

        if (v[mid] == NULL) {
            hi = mid;
            continue;
        }
        name = *(const char *const *)((const char *)v[mid] + name_off);
        r = cmp_text(key, len, name);
        if (r == 0)
            return v[mid];
        if (r < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const struct conf_backend *conf_find_backend(const struct conf *conf, const char *name)
{
    return search_by_name((void *const *)conf->_backends_by_name, conf->nbackends,
                          offsetof(struct conf_backend, name), name, strlen(name));
}

const struct conf_route *conf_find_route(const struct conf *conf, const char *model, size_t len)
{
    return search_by_name((void *const *)conf->_routes_by_model, conf->nroutes,
                          offsetof(struct conf_route, model), model, len);
}

const struct conf_tenant *conf_find_tenant(const struct conf *conf, const char *id)
{
    return search_by_name((void *const *)conf->_tenants_by_id, conf->ntenants,
                          offsetof(struct conf_tenant, id), id, strlen(id));
}

const struct conf_price *conf_find_price(const struct conf *conf, const char *name)
{
    return search_by_name((void *const *)conf->_prices_by_name, conf->nprices,
                          offsetof(struct conf_price, name), name, strlen(name));
}

int conf_cors_any(const struct conf *conf)
{
    return conf->ncors_origins == 1 && strcmp(conf->cors_origins[0], "*") == 0;
}

/* The list is sorted by strcmp at load (conf/parse.c, node_cors_origins):
 * `origin` is compared in the same order, as a string of `len` bytes. */
int conf_cors_allows(const struct conf *conf, const char *origin, size_t len)
{
    size_t lo = 0, hi = conf->ncors_origins;

    if (conf_cors_any(conf))
        return 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const char *o = conf->cors_origins[mid];
        int d = strncmp(o, origin, len);

        if (d == 0 && o[len] == '\0')
            return 1;
        if (d < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* The search only narrows down to the one entry that could match (the
 * first hash >= the key); whether it does match is decided by
 * CRYPTO_memcmp, whose time does not depend on where the bytes differ. */
const struct conf_key *conf_find_key(const struct conf *conf, const uint8_t sha256[32])
{
    size_t lo = 0, hi = conf->_keys ? conf->_nkeys : 0;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (memcmp(conf->_keys[mid].hash, sha256, 32) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < conf->_nkeys && CRYPTO_memcmp(conf->_keys[lo].hash, sha256, 32) == 0)
        return conf->_keys[lo].key;
    return NULL;
}

const struct conf_tenant *conf_find_tenant_by_key(const struct conf *conf, const uint8_t sha256[32])
{
    const struct conf_key *key = conf_find_key(conf, sha256);

    return key ? key->tenant : NULL;
}
