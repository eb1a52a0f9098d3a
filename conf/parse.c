/*
 * conf/parse.c: phases 1 and 2 of conf_load (see internal.h).
 *
 * Each kind of mapping (top level, backend, route, tenant, tenant key,
 * experiment, arm, price entry, included file) has a table of directives:
 * key name, the section it sits in (`store`, `cache`, `limits`, `budget`,
 * `rate_limits`, `slo`), value type, field offset, range, default and
 * whether it is required. One generic walker matches keys against a table, so a
 * new key is one line in a table. Unknown keys are errors, with a
 * "did you mean" when a known key is close. Every scalar goes through
 * ${ENV} interpolation before it is converted.
 */
#include "conf/conf.h"
#include "conf/internal.h"

#include <ctype.h>
#include <errno.h>
#include <libfyaml.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fmt.h"
#include "common/util.h"

enum dtype {
    T_STR,     /* char *; non-empty, no control characters */
    T_SECRET,  /* char * like T_STR, but its value is never echoed */
    T_INT,     /* int */
    T_I64,     /* int64_t */
    T_SIZE,    /* size_t */
    T_DOUBLE,  /* double, finite */
    T_BOOL,    /* through set_flag (the fields are bitfields) */
    T_ENUM,    /* an enum field; value names in `names`, index = value */
    T_FN,      /* scalar converted by `fn` alone */
    T_SECTION, /* nested mapping whose keys have this directive as section */
    T_NODE,    /* any node, converted by `node_fn` */
};

struct directive;
/* Validates (T_STR, T_SECRET) or converts and stores (T_FN) one scalar. */
typedef int (*scalar_fn)(struct conf__ctx *ctx, void *obj, const char *text, int line,
                         const char *path);
/* Converts one non-scalar value. `meta` is the enclosing object's. */
typedef void (*node_fn)(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                        struct fy_node *node, int line, const char *path);

struct directive {
    const char *name;         /* key as written */
    const char *section;      /* key of the enclosing section, NULL at the object's top */
    enum dtype type;          /* how the value is read */
    size_t offset;            /* field in the object (not for T_BOOL/T_FN/T_NODE) */
    double min, max;          /* allowed range of numbers */
    const char *def;          /* default as YAML text, applied in phase 2; NULL: none */
    const char *const *names; /* T_ENUM value names, NULL-terminated */
    scalar_fn fn;             /* T_FN converter, or T_STR/T_SECRET validator */
    node_fn node;             /* T_NODE converter */
    void (*set_flag)(void *obj, int on); /* T_BOOL setter */
    unsigned required:1;      /* missing is an error */
};

struct table {
    const struct directive *d; /* indexed by the conf__*_key enums */
    size_t n;                  /* entries in d */
    size_t line_offset;        /* the object's `int line` field, or (size_t)-1 */
};

/* ---- node helpers ---- */

/* 1-based line where `n` starts, or `fallback` if it has none (an empty
 * value or an empty collection). Collections start at their first child. */
static int node_line(struct fy_node *n, int fallback)
{
    struct fy_token *t;
    struct fy_node_pair *p;
    void *it = NULL;

    if (n == NULL)
        return fallback;
    switch (fy_node_get_type(n)) {
    case FYNT_SCALAR:
        t = fy_node_get_scalar_token(n);
        return t ? fy_token_start_mark(t)->line + 1 : fallback;
    case FYNT_SEQUENCE:
        return node_line(fy_node_sequence_iterate(n, &it), fallback);
    case FYNT_MAPPING:
        p = fy_node_mapping_iterate(n, &it);
        return p ? node_line(fy_node_pair_key(p), fallback) : fallback;
    }
    return fallback;
}

/* A plain empty, `~` or `null` scalar (or no node at all): the key is
 * treated as not given. */
static int node_is_null(struct fy_node *n)
{
    const char *s;
    size_t len;

    if (n == NULL)
        return 1;
    if (fy_node_get_type(n) != FYNT_SCALAR || fy_node_get_style(n) != FYNS_PLAIN)
        return 0;
    s = fy_node_get_scalar(n, &len);
    return len == 0 || (len == 1 && s[0] == '~') ||
           (len == 4 && strncasecmp(s, "null", 4) == 0);
}

static const char *node_kind(struct fy_node *n)
{
    switch (fy_node_get_type(n)) {
    case FYNT_SEQUENCE:
        return "a list";
    case FYNT_MAPPING:
        return "a mapping";
    default:
        return "a scalar";
    }
}

/* The interpolated text of scalar `n`, malloc'd; NULL after an error. */
static char *scalar_text(struct conf__ctx *ctx, struct fy_node *n, int line, const char *path)
{
    const char *s;
    size_t len;

    if (fy_node_get_type(n) != FYNT_SCALAR) {
        conf__error(ctx, line, path, "expected a single value, got %s", node_kind(n));
        return NULL;
    }
    s = fy_node_get_scalar(n, &len);
    return conf__interpolate(ctx, s ? s : "", s ? len : 0, line, path);
}

static void join_path(char *out, size_t size, const char *path, const char *key)
{
    snprintf(out, size, "%s%s%s", path, *path ? "." : "", key);
}

/* join_path for a key as libfyaml holds it: `len` bytes, no NUL. Its
 * control bytes (a quoted key may hold any) are written \xNN: a raw
 * newline would cut the report's line in two. */
static void join_key(char *out, size_t size, const char *path, const char *key, size_t len)
{
    int n = snprintf(out, size, "%s%s", path, *path ? "." : "");
    size_t o = n < 0 ? 0 : MIN((size_t)n, size - 1);

    for (size_t i = 0; i < len && o + 5 < size; i++) {
        unsigned char ch = (unsigned char)key[i];

        if (ch < 0x20 || ch == 0x7f)
            o += (size_t)snprintf(out + o, size - o, "\\x%02x", ch);
        else
            out[o++] = (char)ch;
    }
    out[o] = '\0';
}

/* ---- scalar conversion ---- */

/* Does `s` (not empty) start or end with a blank? A key goes in an HTTP
 * header, whose value loses its blanks at both ends (RFC 9110 5.5): the
 * admin key a client sends, the backend key a backend reads, would lack
 * them, and never match (an ${ENV} value copied with a space, say). */
static int blank_ended(const char *s)
{
    size_t n = strlen(s);

    return s[0] == ' ' || s[n - 1] == ' '; /* a tab is a control character, refused apart */
}

static int has_control(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 1;
    return 0;
}

static int parse_bool(const char *s, int *out)
{
    static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no", "off"};

    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (strcasecmp(s, yes[i]) == 0)
            return *out = 1, 0;
        if (strcasecmp(s, no[i]) == 0)
            return *out = 0, 0;
    }
    return -1;
}

/* Convert `text` for directive `d` and store it into `obj`. A value it
 * refuses is quoted as written (`written`, `wlen`: before ${ENV}
 * interpolation), so that a secret put in the wrong key by mistake is not
 * echoed in the error (--check-config, the reload's 400). */
static int convert(struct conf__ctx *ctx, const struct directive *d, void *obj, const char *text,
                   const char *written, size_t wlen, int line, const char *path)
{
    char *field = (char *)obj + d->offset, *end, q[CONF__QUOTE_SIZE];
    long long ll;
    double v;
    int flag;

    switch (d->type) {
    case T_STR:
    case T_SECRET:
        if (*text == '\0')
            return conf__error(ctx, line, path, "must not be empty");
        if (has_control(text))
            return conf__error(ctx, line, path, "contains control characters");
        if (d->type == T_SECRET && blank_ended(text))
            return conf__error(ctx, line, path,
                               "has a blank at its start or end, which an HTTP header does not "
                               "carry: it could never match");
        if (d->fn && d->fn(ctx, obj, text, line, path) != 0)
            return -1;
        free(*(char **)field);
        if ((*(char **)field = strdup(text)) == NULL)
            return ctx->oom = 1, -1;
        return 0;
    case T_INT:
    case T_I64:
    case T_SIZE:
        errno = 0;
        ll = strtoll(text, &end, 10);
        if (errno || end == text || *end != '\0')
            return conf__error(ctx, line, path, "expected an integer, got %s",
                               conf__quote(q, written, wlen));
        if ((double)ll < d->min || (double)ll > d->max)
            return conf__error(ctx, line, path, "%lld is out of range %.0f..%.0f", ll, d->min,
                               d->max);
        if (d->type == T_INT)
            *(int *)field = (int)ll;
        else if (d->type == T_I64)
            *(int64_t *)field = ll;
        else
            *(size_t *)field = (size_t)ll;
        return 0;
    case T_DOUBLE:
        errno = 0;
        v = strtod(text, &end);
        if (errno || end == text || *end != '\0' || !isfinite(v))
            return conf__error(ctx, line, path, "expected a number, got %s",
                               conf__quote(q, written, wlen));
        if (v < d->min || v > d->max)
            return conf__error(ctx, line, path, "%g is out of range %g..%g", v, d->min, d->max);
        *(double *)field = v;
        return 0;
    case T_BOOL:
        if (parse_bool(text, &flag) != 0)
            return conf__error(ctx, line, path, "expected true or false, got %s",
                               conf__quote(q, written, wlen));
        d->set_flag(obj, flag);
        return 0;
    case T_ENUM: {
        struct buf all = {0};
        int rc;

        for (int i = 0; d->names[i]; i++) {
            if (strcmp(text, d->names[i]) == 0) {
                _Static_assert(sizeof(enum conf_tokenizer) == sizeof(int), "enum size");
                *(int *)field = i;
                return 0;
            }
        }
        for (int i = 0; d->names[i]; i++)
            if (buf_printf(&all, "%s%s", i ? ", " : "", d->names[i]) != 0)
                ctx->oom = 1;
        rc = conf__error(ctx, line, path, "unknown value %s (expected one of: %.*s)",
                         conf__quote(q, written, wlen), (int)all.len,
                         all.data ? all.data : "");
        buf_free(&all);
        return rc;
    }
    case T_FN:
        return d->fn(ctx, obj, text, line, path);
    case T_SECTION:
    case T_NODE:
        break;
    }
    return conf__error(ctx, line, path, "internal: no scalar form");
}

/* ---- the walker ---- */

/* Edit distance between short strings, capped: enough to suggest a key. */
static size_t distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b), row[33], prev, cur;

    if (la > 32 || lb > 32)
        return 99;
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        prev = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            cur = MIN(MIN(row[j], row[j - 1]) + 1, prev + (a[i - 1] != b[j - 1]));
            prev = row[j];
            row[j] = cur;
        }
    }
    return row[lb];
}

static int same_section(const char *a, const char *b)
{
    return a == b || (a && b && strcmp(a, b) == 0);
}

static void unknown_key(struct conf__ctx *ctx, const struct table *t, const char *section,
                        const char *key, int line, const char *path)
{
    const char *best = NULL;
    size_t bestd = 3;

    for (size_t i = 0; i < t->n; i++) {
        size_t dist;

        if (!same_section(t->d[i].section, section))
            continue;
        dist = distance(key, t->d[i].name);
        if (dist < bestd) {
            bestd = dist;
            best = t->d[i].name;
        }
    }
    if (best)
        conf__error(ctx, line, path, "unknown key (did you mean \"%s\"?)", best);
    else
        conf__error(ctx, line, path, "unknown key");
}

/* Parse mapping `map` (whose key sits on `line`) against the directives
 * of `t` in `section`, into `obj`, recording given keys in `meta`. */
static void parse_mapping(struct conf__ctx *ctx, const struct table *t, const char *section,
                          void *obj, struct conf__meta *meta, struct fy_node *map, int line,
                          const char *path)
{
    struct fy_node_pair *pair;
    void *it = NULL;

    if (fy_node_get_type(map) != FYNT_MAPPING) {
        conf__error(ctx, line, *path ? path : "(top level)", "expected a mapping, got %s",
                    node_kind(map));
        return;
    }
    while ((pair = fy_node_mapping_iterate(map, &it)) != NULL) {
        struct fy_node *key = fy_node_pair_key(pair), *value = fy_node_pair_value(pair);
        int kline = node_line(key, line), vline = node_line(value, kline);
        const struct directive *d = NULL;
        char kpath[256], *text;
        const char *k, *written;
        size_t klen, wlen, i;

        if (key == NULL || fy_node_get_type(key) != FYNT_SCALAR) {
            conf__error(ctx, kline, *path ? path : "(top level)", "keys must be plain names");
            continue;
        }
        k = fy_node_get_scalar(key, &klen);
        join_key(kpath, sizeof(kpath), path, k, klen);
        for (i = 0; i < t->n; i++) {
            if (same_section(t->d[i].section, section) && strlen(t->d[i].name) == klen &&
                memcmp(t->d[i].name, k, klen) == 0) {
                d = &t->d[i];
                break;
            }
        }
        if (d == NULL) {
            unknown_key(ctx, t, section, kpath + (*path ? strlen(path) + 1 : 0), kline, kpath);
            continue;
        }
        if (node_is_null(value))
            continue; /* `key:` or `key: ~` leaves it unset */
        if (d->type == T_SECTION && fy_node_get_type(value) != FYNT_MAPPING) {
            /* Left unset too: its keys are not missing, the mapping is. */
            conf__error(ctx, kline, kpath, "expected a mapping, got %s", node_kind(value));
            continue;
        }
        meta->set |= 1ull << i;
        meta->lines[i] = kline;
        switch (d->type) {
        case T_SECTION:
            parse_mapping(ctx, t, d->name, obj, meta, value, kline, kpath);
            break;
        case T_NODE:
            d->node(ctx, obj, meta, value, kline, kpath);
            break;
        default:
            if ((text = scalar_text(ctx, value, vline, kpath)) == NULL)
                break;
            written = fy_node_get_scalar(value, &wlen);
            convert(ctx, d, obj, text, written ? written : "", written ? wlen : 0, vline, kpath);
            free(text);
        }
    }
}

/* Phase 2 for one object: defaults for unset keys, errors for missing
 * required ones (reported at the object's own line). */
static void apply_defaults(struct conf__ctx *ctx, const struct table *t, void *obj,
                           struct conf__meta *meta, const char *path)
{
    for (size_t i = 0; i < t->n; i++) {
        const struct directive *d = &t->d[i];
        char kpath[256];

        if (meta->set & (1ull << i))
            continue;
        if (d->section)
            snprintf(kpath, sizeof(kpath), "%s%s%s.%s", path, *path ? "." : "", d->section,
                     d->name);
        else
            join_path(kpath, sizeof(kpath), path, d->name);
        if (d->required)
            conf__error(ctx, meta->line, *path ? path : "(top level)",
                        "missing required key \"%s\"", d->name);
        else if (d->def)
            convert(ctx, d, obj, d->def, d->def, strlen(d->def), meta->line, kpath);
    }
}

/* ---- lists of objects ---- */

static const struct table root_table, backend_table, route_table, tenant_table, key_table,
    experiment_table, arm_table, price_table, included_table;
static int check_name(struct conf__ctx *ctx, void *obj, const char *text, int line,
                      const char *path);

/* A list of mappings parsed with table `t` into a calloc'd array. */
static void parse_objects(struct conf__ctx *ctx, struct fy_node *seq, int line, const char *path,
                          const struct table *t, size_t elem_size, void **arr, size_t *n,
                          struct conf__meta **metas)
{
    size_t count;
    struct fy_node *item;
    void *it = NULL;
    char ipath[256];

    if (fy_node_get_type(seq) != FYNT_SEQUENCE) {
        conf__error(ctx, line, path, "expected a list, got %s", node_kind(seq));
        return;
    }
    count = (size_t)fy_node_sequence_item_count(seq);
    if (count == 0) {
        conf__error(ctx, line, path, "must not be empty");
        return;
    }
    *arr = calloc(count, elem_size);
    *metas = calloc(count, sizeof(**metas));
    if (*arr == NULL || *metas == NULL) {
        ctx->oom = 1;
        return;
    }
    *n = count;
    for (size_t i = 0; (item = fy_node_sequence_iterate(seq, &it)) != NULL; i++) {
        char *obj = (char *)*arr + i * elem_size;

        (*metas)[i].line = node_line(item, line);
        *(int *)(obj + t->line_offset) = (*metas)[i].line;
        snprintf(ipath, sizeof(ipath), "%s[%zu]", path, i);
        parse_mapping(ctx, t, NULL, obj, &(*metas)[i], item, (*metas)[i].line, ipath);
    }
}

static void node_backends(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                          struct fy_node *n, int line, const char *path)
{
    struct conf *c = obj;

    parse_objects(ctx, n, line, path, &backend_table, sizeof(*c->backends),
                  (void **)&c->backends, &c->nbackends, &ctx->backend_meta);
    for (size_t i = 0; i < c->nbackends; i++)
        c->backends[i].index = i;
}

static void node_routes(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                        struct fy_node *n, int line, const char *path)
{
    struct conf *c = obj;

    parse_objects(ctx, n, line, path, &route_table, sizeof(*c->routes), (void **)&c->routes,
                  &c->nroutes, &ctx->route_meta);
}

static void node_tenants(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                         struct fy_node *n, int line, const char *path)
{
    struct conf *c = obj;

    parse_objects(ctx, n, line, path, &tenant_table, sizeof(*c->tenants),
                  (void **)&c->tenants, &c->ntenants, &ctx->tenant_meta);
}

static void node_experiments(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                             struct fy_node *n, int line, const char *path)
{
    struct conf *c = obj;

    parse_objects(ctx, n, line, path, &experiment_table, sizeof(*c->experiments),
                  (void **)&c->experiments, &c->nexperiments, &ctx->experiment_meta);
}

/* An experiment's arms keep their metas in the experiment's meta. */
static void node_arms(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                      struct fy_node *n, int line, const char *path)
{
    struct conf_experiment *e = obj;

    parse_objects(ctx, n, line, path, &arm_table, sizeof(*e->arms), (void **)&e->arms,
                  &e->narms, &meta->sub);
    meta->nsub = e->narms;
}

/* Calls `each` on every item of list `seq` with its node, text, index,
 * line and path; returns the item count, or -1 if `seq` is not a non-empty
 * list. The text is that of a scalar item, NULL after an error or, when
 * `maps` allows mappings, for a mapping item (which `each` then reads). */
static long each_item(struct conf__ctx *ctx, struct fy_node *seq, int line, const char *path,
                      void (*each)(struct conf__ctx *, void *, struct fy_node *, char *, size_t,
                                   int, const char *),
                      void *arg, int maps)
{
    struct fy_node *item;
    void *it = NULL;
    char ipath[256], *text;
    size_t i;

    if (fy_node_get_type(seq) != FYNT_SEQUENCE) {
        conf__error(ctx, line, path, "expected a list, got %s", node_kind(seq));
        return -1;
    }
    if (fy_node_sequence_item_count(seq) == 0) {
        conf__error(ctx, line, path, "must not be empty");
        return -1;
    }
    for (i = 0; (item = fy_node_sequence_iterate(seq, &it)) != NULL; i++) {
        int iline = node_line(item, line);

        snprintf(ipath, sizeof(ipath), "%s[%zu]", path, i);
        if (maps && fy_node_get_type(item) == FYNT_MAPPING)
            text = NULL;
        else
            text = scalar_text(ctx, item, iline, ipath);
        each(ctx, arg, item, text, i, iline, ipath);
        free(text);
    }
    return (long)i;
}

/* Where parse_names puts a list's names and their lines. */
struct names_arg {
    char **names; /* one per item, NULL where the item was malformed */
    int *lines;   /* line of each item */
};

static void each_name(struct conf__ctx *ctx, void *arg, struct fy_node *item, char *text,
                      size_t i, int line, const char *path)
{
    struct names_arg *a = arg;

    a->lines[i] = line;
    if (text && (a->names[i] = strdup(text)) == NULL)
        ctx->oom = 1;
}

/* A non-empty list of names into a calloc'd *names (owned by the caller
 * even on error) and *count, their lines into meta->item_lines. The
 * names are resolved by check.c. */
static void parse_names(struct conf__ctx *ctx, struct fy_node *n, int line, const char *path,
                        char ***names, size_t *count, struct conf__meta *meta)
{
    int cnt = fy_node_get_type(n) == FYNT_SEQUENCE ? fy_node_sequence_item_count(n) : 0;
    struct names_arg a;

    *names = calloc((size_t)cnt + 1, sizeof(**names));
    meta->item_lines = calloc((size_t)cnt + 1, sizeof(*meta->item_lines));
    if (*names == NULL || meta->item_lines == NULL) {
        ctx->oom = 1;
        return;
    }
    a = (struct names_arg){*names, meta->item_lines};
    if (each_item(ctx, n, line, path, each_name, &a, 0) > 0)
        *count = meta->nitems = (size_t)cnt;
}

/* Route candidates stay in the meta until check.c resolves them. */
static void node_candidates(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                            struct fy_node *n, int line, const char *path)
{
    parse_names(ctx, n, line, path, &meta->items, &meta->nitems, meta);
}

static void node_experiment_tenants(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                                    struct fy_node *n, int line, const char *path)
{
    struct conf_experiment *e = obj;

    parse_names(ctx, n, line, path, &e->tenants, &e->ntenants, meta);
}

/* A `models:` list (a tenant's or a key's): its names and their lines,
 * kept on the list until check.c resolves them to routes (a key's meta
 * lasts only while the key is parsed, and a tenant's holds its keys'
 * lines). */
static void parse_models(struct conf__ctx *ctx, struct conf_models *m, struct fy_node *n,
                         int line, const char *path)
{
    struct conf__meta lm = {.line = line};

    if (m->names != NULL)
        return; /* a duplicate key, reported as such */
    parse_names(ctx, n, line, path, &m->names, &m->nnames, &lm);
    m->lines = lm.item_lines;
}

static void node_tenant_models(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                               struct fy_node *n, int line, const char *path)
{
    (void)meta;
    parse_models(ctx, &((struct conf_tenant *)obj)->models, n, line, path);
}

static void node_key_models(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                            struct fy_node *n, int line, const char *path)
{
    (void)meta;
    parse_models(ctx, &((struct conf_key *)obj)->models, n, line, path);
}

static void node_arm_backends(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                              struct fy_node *n, int line, const char *path)
{
    struct conf_arm *a = obj;

    parse_names(ctx, n, line, path, &a->backends, &a->nbackends, meta);
}

/* Why `text` (lowercased in place) is no origin a browser sends in its
 * Origin header, scheme://host[:port] (RFC 6454 6.1), or NULL. */
static const char *origin_problem(char *text)
{
    static const char *const no_path = "an origin has no path, query or trailing '/' "
                                       "(write scheme://host[:port])";
    char *p = text, *host;

    if (strlen(text) > CONF_ORIGIN_MAX)
        return "too long";
    for (char *q = text; *q; q++)
        *q = (char)tolower((unsigned char)*q);
    if (strcmp(text, "null") == 0)
        return "\"null\" is sent by sandboxed frames and file: pages, which any site can "
               "make: it cannot be allowed";
    if (!isalpha((unsigned char)*p))
        return "expected scheme://host[:port], such as https://app.example.com";
    while (isalnum((unsigned char)*p) || *p == '+' || *p == '-' || *p == '.')
        p++;
    if (strncmp(p, "://", 3) != 0)
        return "expected scheme://host[:port], such as https://app.example.com";
    host = p += 3;
    if (*p == '[') { /* an IPv6 literal */
        while (isxdigit((unsigned char)*++p) || *p == ':' || *p == '.')
            ;
        if (*p++ != ']' || p == host + 2)
            return "the host is no [IPv6 address]";
    } else {
        while (isalnum((unsigned char)*p) || *p == '-' || *p == '.' || *p == '_')
            p++;
    }
    if (p == host)
        return "the host is missing";
    if (*p == ':') {
        char *digits = ++p;
        unsigned long port = strtoul(digits, &p, 10);

        if (p == digits || !isdigit((unsigned char)*digits) || port == 0 || port > 65535)
            return "the port is not a number from 1 to 65535";
        /* Browsers leave a scheme's default port out of Origin (RFC 6454
         * 6.2): written here, the entry would never match. */
        if ((port == 80 && strncmp(text, "http://", 7) == 0) ||
            (port == 443 && strncmp(text, "https://", 8) == 0))
            return "browsers send an origin without its scheme's default port: leave it out";
    }
    if (*p == '/' || *p == '?' || *p == '#')
        return no_path;
    return *p == '\0' ? NULL : "the host holds a character no origin has";
}

static int cmp_origin(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* `cors.allow_origins`: the origins whose pages may call the router, as
 * browsers send them, or "*" alone. Sorted: a request's Origin is found
 * by a binary search. */
static void node_cors_origins(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                              struct fy_node *n, int line, const char *path)
{
    struct conf *c = obj;
    struct conf__meta lm = {.line = line};
    const char *why;
    size_t i;

    (void)meta;
    if (c->cors_origins != NULL)
        return; /* a duplicate key, reported as such */
    parse_names(ctx, n, line, path, &c->cors_origins, &c->ncors_origins, &lm);
    for (i = 0; i < c->ncors_origins; i++) {
        char *o = c->cors_origins[i];

        if (o == NULL || strcmp(o, "*") == 0)
            continue;
        if ((why = origin_problem(o)) != NULL)
            conf__error(ctx, lm.item_lines[i], path, "%s", why);
    }
    for (i = 0; i < c->ncors_origins; i++)
        if (c->cors_origins[i] == NULL) {
            free(lm.item_lines);
            return; /* reported by parse_names */
        }
    qsort(c->cors_origins, c->ncors_origins, sizeof(*c->cors_origins), cmp_origin);
    for (i = 0; i < c->ncors_origins; i++) {
        if (strcmp(c->cors_origins[i], "*") == 0 && c->ncors_origins > 1)
            conf__error(ctx, line, path, "\"*\" allows every origin: list it alone");
        else if (i > 0 && strcmp(c->cors_origins[i], c->cors_origins[i - 1]) == 0)
            conf__error(ctx, line, path, "%s is listed twice", c->cors_origins[i]);
    }
    free(lm.item_lines);
}

/* Tenant keys are written "sha256:<64 hex>", as a plain string or as the
 * `hash` of a key mapping; stored into the struct conf_key `obj`. The
 * text is never echoed: a malformed entry may well be a raw key pasted by
 * mistake. */
static int fn_key_hash(struct conf__ctx *ctx, void *obj, const char *text, int line,
                       const char *path)
{
    uint8_t *h = ((struct conf_key *)obj)->hash;

    if (strncmp(text, "sha256:", 7) != 0 || strlen(text) != 7 + 64)
        goto bad;
    for (size_t j = 0; j < 32; j++) {
        int hi = fmt_hex_value((unsigned char)text[7 + 2 * j]);
        int lo = fmt_hex_value((unsigned char)text[8 + 2 * j]);

        if (hi < 0 || lo < 0)
            goto bad;
        h[j] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
bad:
    return conf__error(ctx, line, path,
                       "expected \"sha256:\" and 64 hex digits (the SHA-256 of the key, never "
                       "the key itself)");
}

struct key_arg {
    struct conf_tenant *t;    /* owner of the keys */
    struct conf__meta *meta;  /* the tenant's meta, for item_lines */
};

/* A key's budget is counted under its name (conf_key.subject): a key
 * without one has nothing to count it under. */
static void need_key_name(struct conf__ctx *ctx, const struct conf_key *k,
                          const struct conf__meta *m, const char *path)
{
    char bpath[300];

    if (!(m->set & (1ull << CONF__K_BUDGET)) || k->name != NULL)
        return;
    join_path(bpath, sizeof(bpath), path, "budget");
    conf__error(ctx, m->lines[CONF__K_BUDGET], bpath,
                "needs the key's \"name\" (its spend is counted and shown under it)");
}

/* A key is a string (the hash) or a mapping {hash, name, rpm, tpm}, whose
 * few defaults are applied right away: nothing else depends on them. A
 * key reported malformed gets item line 0, which keeps it out of the key
 * index (and out of duplicate reports over a hash it never had). */
static void each_key(struct conf__ctx *ctx, void *arg, struct fy_node *item, char *text,
                     size_t i, int line, const char *path)
{
    struct key_arg *ka = arg;
    struct conf_key *k = &ka->t->keys[i];
    size_t nerrs = ctx->nerrs;

    k->line = line;
    if (text == NULL && fy_node_get_type(item) == FYNT_MAPPING) {
        struct conf__meta m = {.line = line};

        parse_mapping(ctx, &key_table, NULL, k, &m, item, line, path);
        apply_defaults(ctx, &key_table, k, &m, path);
        need_key_name(ctx, k, &m, path);
    } else if (text) {
        fn_key_hash(ctx, k, text, line, path);
    }
    if (text == NULL && fy_node_get_type(item) != FYNT_MAPPING)
        nerrs = (size_t)-1; /* its value was reported before this call */
    ka->meta->item_lines[i] = ctx->nerrs == nerrs ? line : 0;
}

static void node_api_keys(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                          struct fy_node *n, int line, const char *path)
{
    struct conf_tenant *t = obj;
    int count = fy_node_get_type(n) == FYNT_SEQUENCE ? fy_node_sequence_item_count(n) : 0;
    struct key_arg ka = {t, meta};

    t->key_hashes = calloc((size_t)count + 1, sizeof(*t->key_hashes));
    t->keys = calloc((size_t)count + 1, sizeof(*t->keys));
    meta->item_lines = calloc((size_t)count + 1, sizeof(*meta->item_lines));
    if (t->key_hashes == NULL || t->keys == NULL || meta->item_lines == NULL) {
        ctx->oom = 1;
        return;
    }
    if (each_item(ctx, n, line, path, each_key, &ka, 1) <= 0)
        return;
    t->nkeys = meta->nitems = (size_t)count;
    for (size_t i = 0; i < t->nkeys; i++) {
        memcpy(t->key_hashes[i], t->keys[i].hash, sizeof(t->key_hashes[i]));
        t->keys[i].index = i;
        t->keys[i].tenant = t;
    }
}

/* A price entry's `long_context:`, when given, needs its size and both
 * rates, so that an entry's tier is complete whenever it has one (a
 * backend relies on that, check.c); its cached rate defaults to its input
 * rate. Key lines are the entry's own (`m`). */
static void complete_long_context(struct conf__ctx *ctx, struct conf_price *p,
                                  const struct conf__meta *m, const char *path)
{
    static const int needed[] = {CONF__P_LONG_ABOVE, CONF__P_LONG_INPUT_USD,
                                 CONF__P_LONG_OUTPUT_USD};
    char lpath[300];

    if (!(m->set & (1ull << CONF__P_LONG_CONTEXT)))
        return;
    join_path(lpath, sizeof(lpath), path, "long_context");
    for (size_t i = 0; i < sizeof(needed) / sizeof(needed[0]); i++)
        if (!(m->set & (1ull << needed[i])))
            conf__error(ctx, m->lines[CONF__P_LONG_CONTEXT], lpath,
                        "missing required key \"%s\"", price_table.d[needed[i]].name);
    if (!(m->set & (1ull << CONF__P_LONG_CACHED_INPUT_USD)))
        p->long_context.cached_input_usd_per_mtok = p->long_context.input_usd_per_mtok;
    if (!(m->set & (1ull << CONF__P_LONG_CACHE_WRITE_USD)))
        p->long_context.cache_write_usd_per_mtok =
            CONF_CACHE_WRITE_FACTOR * p->long_context.input_usd_per_mtok;
    if (!(m->set & (1ull << CONF__P_LONG_CACHE_WRITE_1H_USD)))
        p->long_context.cache_write_1h_usd_per_mtok =
            CONF_CACHE_WRITE_1H_FACTOR * p->long_context.input_usd_per_mtok;
}

/* A price entry's `flex:` and `priority:` need both rates; their cached
 * rate defaults to the tier's input rate. */
static void complete_tiers(struct conf__ctx *ctx, struct conf_price *p,
                           const struct conf__meta *m, const char *path)
{
    for (int tier = CONF_TIER_FLEX; tier < CONF_TIER_COUNT; tier++) {
        int key = CONF__P_FLEX + (tier - CONF_TIER_FLEX) * CONF__TIER_KEYS;
        struct conf_tier_rates *r = &p->tiers[tier];
        char tpath[300];

        if (!(m->set & (1ull << key)))
            continue;
        join_path(tpath, sizeof(tpath), path, conf_tier_name(tier));
        for (int k = CONF__TIER_INPUT; k <= CONF__TIER_OUTPUT; k++)
            if (!(m->set & (1ull << (key + k))))
                conf__error(ctx, m->lines[key], tpath, "missing required key \"%s\"",
                            price_table.d[key + k].name);
        if (!(m->set & (1ull << (key + CONF__TIER_CACHED))))
            r->cached_input_usd_per_mtok = r->input_usd_per_mtok;
        r->priced = 1;
    }
}

/* `prices: {NAME: {input_usd_per_mtok, ...}, ...}`, in the config or an
 * included file: appended to conf.prices. A name defined twice (in any of
 * the files) is found once all are read (drop_duplicate_prices). */
static void node_prices(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                        struct fy_node *n, int line, const char *path)
{
    struct conf *c = ctx->conf;
    struct fy_node_pair *pair;
    struct conf_price *v;
    void *it = NULL;
    int count;

    if (fy_node_get_type(n) != FYNT_MAPPING) {
        conf__error(ctx, line, path, "expected a mapping of price names to prices, got %s",
                    node_kind(n));
        return;
    }
    count = fy_node_mapping_item_count(n);
    if ((v = realloc(c->prices, (c->nprices + (size_t)count + 1) * sizeof(*v))) == NULL) {
        ctx->oom = 1;
        return;
    }
    c->prices = v;
    while ((pair = fy_node_mapping_iterate(n, &it)) != NULL) {
        struct fy_node *key = fy_node_pair_key(pair), *value = fy_node_pair_value(pair);
        int kline = node_line(key, line);
        struct conf_price *p = &c->prices[c->nprices];
        const char *file = ctx->file_no ? c->includes[ctx->file_no - 1] : c->path;
        struct conf__meta m = {.line = kline};
        char ppath[256];
        const char *k;
        size_t klen;

        if (key == NULL || fy_node_get_type(key) != FYNT_SCALAR) {
            conf__error(ctx, kline, path, "price names must be plain names");
            continue;
        }
        k = fy_node_get_scalar(key, &klen);
        join_key(ppath, sizeof(ppath), path, k, klen);
        if (klen == 0) {
            conf__error(ctx, kline, path, "price names must not be empty");
            continue;
        }
        if (memchr(k, '\0', klen)) { /* a "\0" escape: strndup would cut the name there */
            conf__error(ctx, kline, ppath, "contains a NUL byte");
            continue;
        }
        memset(p, 0, sizeof(*p));
        if ((p->name = strndup(k, klen)) == NULL) {
            ctx->oom = 1;
            return;
        }
        if (check_name(ctx, p, p->name, kline, ppath) != 0)
            goto skip;
        if (node_is_null(value) || fy_node_get_type(value) != FYNT_MAPPING) {
            conf__error(ctx, kline, ppath, "expected a mapping of prices, got %s",
                        node_is_null(value) ? "nothing" : node_kind(value));
            goto skip;
        }
        p->file = file;
        p->line = kline;
        parse_mapping(ctx, &price_table, NULL, p, &m, value, kline, ppath);
        apply_defaults(ctx, &price_table, p, &m, ppath);
        if (!(m.set & (1ull << CONF__P_CACHED_INPUT_USD)))
            p->cached_input_usd_per_mtok = p->input_usd_per_mtok;
        if (!(m.set & (1ull << CONF__P_CACHE_WRITE_USD)))
            p->cache_write_usd_per_mtok = CONF_CACHE_WRITE_FACTOR * p->input_usd_per_mtok;
        if (!(m.set & (1ull << CONF__P_CACHE_WRITE_1H_USD)))
            p->cache_write_1h_usd_per_mtok = CONF_CACHE_WRITE_1H_FACTOR * p->input_usd_per_mtok;
        complete_long_context(ctx, p, &m, ppath);
        complete_tiers(ctx, p, &m, ppath);
        c->nprices++;
        continue;
    skip:
        free(p->name);
        p->name = NULL;
    }
}

/* A price entry to sort by name; ties keep the order of loading. */
struct price_ref {
    const char *name;
    size_t index; /* in conf.prices */
};

static int cmp_price_ref(const void *pa, const void *pb)
{
    const struct price_ref *a = pa, *b = pb;
    int r = strcmp(a->name, b->name);

    return r ? r : (a->index > b->index) - (a->index < b->index);
}

/* The report's number of the file an entry was read from: 0 the config,
 * i its includes[i - 1] (conf__err.file). */
static int price_file_no(const struct conf *c, const char *file)
{
    for (size_t i = 0; i < c->nincludes; i++)
        if (c->includes[i] == file)
            return (int)i + 1;
    return 0;
}

/* Report each price entry whose name an entry read before it already
 * has, in its own file and line, and drop it. Found by sorting once
 * every file is read: a search of the entries before each took seconds
 * for a price file of 20,000. */
static void drop_duplicate_prices(struct conf__ctx *ctx)
{
    struct conf *c = ctx->conf;
    struct price_ref *v = calloc(c->nprices + 1, sizeof(*v));
    const char *saved_file = ctx->file;
    int saved_no = ctx->file_no;
    char ppath[256], q[CONF__QUOTE_SIZE];
    size_t kept = 0;

    if (v == NULL) {
        ctx->oom = 1;
        return;
    }
    for (size_t i = 0; i < c->nprices; i++)
        v[i] = (struct price_ref){c->prices[i].name, i};
    qsort(v, c->nprices, sizeof(*v), cmp_price_ref);
    for (size_t i = 1, first = 0; i < c->nprices; i++) {
        struct conf_price *p = &c->prices[v[i].index];
        const struct conf_price *o = &c->prices[v[first].index];

        if (strcmp(p->name, o->name) != 0) {
            first = i;
            continue;
        }
        ctx->file = p->file;
        ctx->file_no = price_file_no(c, p->file);
        join_key(ppath, sizeof(ppath), "prices", p->name, strlen(p->name));
        if (o->file == p->file)
            conf__error(ctx, p->line, ppath, "duplicate price %s (first at line %d)",
                        conf__quote(q, p->name, strlen(p->name)), o->line);
        else
            conf__error(ctx, p->line, ppath, "duplicate price %s (first at %s:%d)",
                        conf__quote(q, p->name, strlen(p->name)), o->file, o->line);
        /* dropped below; the next entries are compared with o, never p */
        free(p->name);
        p->name = NULL;
    }
    ctx->file = saved_file;
    ctx->file_no = saved_no;
    for (size_t i = 0; i < c->nprices; i++)
        if (c->prices[i].name != NULL)
            c->prices[kept++] = c->prices[i];
    c->nprices = kept;
    free(v);
}

static void include_one(struct conf__ctx *ctx, void *arg, struct fy_node *item, char *text,
                        size_t i, int line, const char *path)
{
    if (text == NULL)
        return;
    if (node_is_null(item)) { /* `include: [~]`: not a file named "~" */
        conf__error(ctx, line, path, "expected a file name, got nothing");
        return;
    }
    if (*text == '\0') {
        conf__error(ctx, line, path, "must not be empty");
        return;
    }
    if (has_control(text)) { /* its name starts the lines of its errors */
        conf__error(ctx, line, path, "contains control characters");
        return;
    }
    conf__include(ctx, text, line, path);
}

/* `include: FILE` or `include: [FILE, ...]`. */
static void node_include(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                         struct fy_node *n, int line, const char *path)
{
    char *text;

    if (fy_node_get_type(n) == FYNT_SEQUENCE) {
        each_item(ctx, n, line, path, include_one, NULL, 0);
        return;
    }
    if ((text = scalar_text(ctx, n, node_line(n, line), path)) == NULL)
        return;
    include_one(ctx, NULL, n, text, 0, node_line(n, line), path);
    free(text);
}

static void node_tags(struct conf__ctx *ctx, void *obj, struct conf__meta *meta,
                      struct fy_node *n, int line, const char *path)
{
    struct conf_tenant *t = obj;
    struct fy_node_pair *pair;
    void *it = NULL;

    if (fy_node_get_type(n) != FYNT_MAPPING) {
        conf__error(ctx, line, path, "expected a mapping of names to values, got %s",
                    node_kind(n));
        return;
    }
    t->tags = calloc((size_t)fy_node_mapping_item_count(n) + 1, sizeof(*t->tags));
    if (t->tags == NULL) {
        ctx->oom = 1;
        return;
    }
    while ((pair = fy_node_mapping_iterate(n, &it)) != NULL) {
        struct fy_node *key = fy_node_pair_key(pair), *value = fy_node_pair_value(pair);
        int kline = node_line(key, line);
        struct conf_tag *tag = &t->tags[t->ntags];
        char tpath[256], *text;
        const char *k;
        size_t klen;

        if (key == NULL || fy_node_get_type(key) != FYNT_SCALAR) {
            conf__error(ctx, kline, path, "tag names must be plain names");
            continue;
        }
        k = fy_node_get_scalar(key, &klen);
        join_key(tpath, sizeof(tpath), path, k, klen);
        if (memchr(k, '\0', klen)) { /* a "\0" escape: strndup would cut the name there */
            conf__error(ctx, kline, tpath, "contains a NUL byte");
            continue;
        }
        if (node_is_null(value)) {
            conf__error(ctx, kline, tpath, "needs a value");
            continue;
        }
        if ((text = scalar_text(ctx, value, node_line(value, kline), tpath)) == NULL)
            continue;
        if (has_control(text)) {
            conf__error(ctx, kline, tpath, "contains control characters");
            free(text);
            continue;
        }
        tag->key = strndup(k, klen);
        tag->value = text;
        t->ntags++;
        if (tag->key == NULL)
            ctx->oom = 1;
    }
}

/* ---- validators and setters ---- */

/* Names show up in logs, metrics labels and the cost log. */
/* Reports a `text` over `max` bytes. */
static int too_long(struct conf__ctx *ctx, const char *text, size_t max, int line,
                    const char *path)
{
    if (strlen(text) <= max)
        return 0;
    conf__error(ctx, line, path, "is longer than %zu characters", max);
    return 1;
}

static int check_name(struct conf__ctx *ctx, void *obj, const char *text, int line,
                      const char *path)
{
    if (too_long(ctx, text, CONF_NAME_MAX, line, path))
        return -1;
    for (const char *p = text; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("._-:/@+", *p))
            return conf__error(ctx, line, path,
                               "may only hold letters, digits and . _ - : / @ +");
    return 0;
}

/* Clients send it in JSON "model"; spaces would only be a typo. */
static int check_model(struct conf__ctx *ctx, void *obj, const char *text, int line,
                       const char *path)
{
    if (too_long(ctx, text, CONF_NAME_MAX, line, path))
        return -1;
    if (strchr(text, ' '))
        return conf__error(ctx, line, path, "must not contain spaces");
    return 0;
}

/* An HTTP header name (RFC 9110 token). */
static int check_header(struct conf__ctx *ctx, void *obj, const char *text, int line,
                        const char *path)
{
    for (const char *p = text; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("!#$%&'*+-.^_`|~", *p))
            return conf__error(ctx, line, path, "is not a valid HTTP header name");
    return 0;
}

static int check_readable(struct conf__ctx *ctx, void *obj, const char *text, int line,
                          const char *path)
{
    char q[CONF__QUOTE_SIZE];

    if (access(text, R_OK) != 0)
        return conf__error(ctx, line, path, "cannot read %s: %s",
                           conf__quote(q, text, strlen(text)), strerror(errno));
    return 0;
}

/* A folder read at start-up (given explicitly, so checked now). */
static int check_folder(struct conf__ctx *ctx, void *obj, const char *text, int line,
                        const char *path)
{
    char q[CONF__QUOTE_SIZE];
    struct stat st;

    conf__quote(q, text, strlen(text));
    if (stat(text, &st) != 0)
        return conf__error(ctx, line, path, "cannot read %s: %s", q, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return conf__error(ctx, line, path, "%s is not a folder", q);
    if (access(text, R_OK | X_OK) != 0)
        return conf__error(ctx, line, path, "cannot read %s: %s", q, strerror(errno));
    return 0;
}

/* A file the router replaces at stop (FILE.tmp renamed over it) and locks
 * (FILE.lock): its folder must exist and take new files, and the name
 * must not be a folder. */
static int check_store_file(struct conf__ctx *ctx, void *obj, const char *text, int line,
                              const char *path)
{
    char q[CONF__QUOTE_SIZE], folder[PATH_MAX];
    struct stat st;

    conf__quote(q, text, strlen(text));
    if (text[0] == '\0' || snprintf(folder, sizeof(folder), "%s", text) >= (int)sizeof(folder))
        return conf__error(ctx, line, path, "%s is not a file name", q);
    if (stat(text, &st) == 0 && !S_ISREG(st.st_mode))
        return conf__error(ctx, line, path, "%s is not a regular file", q);
    if (access(dirname(folder), W_OK | X_OK) != 0)
        return conf__error(ctx, line, path, "cannot write files in the folder of %s: %s", q,
                           strerror(errno));
    return 0;
}

/* The store puts keys in hash tags of its own: a '{' would break them. */
static int check_key_prefix(struct conf__ctx *ctx, void *obj, const char *text, int line,
                            const char *path)
{
    if (strpbrk(text, "{} "))
        return conf__error(ctx, line, path, "must not contain '{', '}' or spaces");
    if (too_long(ctx, text, CONF_KEY_PREFIX_MAX, line, path))
        return -1;
    return 0;
}

static int fn_url(struct conf__ctx *ctx, void *obj, const char *text, int line, const char *path)
{
    struct conf_backend *b = obj;

    if (conf__parse_url(ctx, b, text, line, path) != 0)
        return -1;
    free(b->url);
    if ((b->url = strdup(text)) == NULL)
        return ctx->oom = 1, -1;
    return 0;
}

static int fn_listen(struct conf__ctx *ctx, void *obj, const char *text, int line,
                     const char *path)
{
    return conf__parse_listen(ctx, text, line, path);
}

static int fn_redis(struct conf__ctx *ctx, void *obj, const char *text, int line,
                    const char *path)
{
    return conf__parse_redis(ctx, text, line, path);
}

static void set_tls_verify(void *obj, int on) { ((struct conf_backend *)obj)->tls_verify = on; }
static void set_stream_usage(void *obj, int on) { ((struct conf_backend *)obj)->stream_usage = on; }
static void set_cost_from_usage(void *obj, int on)
{
    ((struct conf_backend *)obj)->cost_from_usage = on;
}
static void set_free(void *obj, int on) { ((struct conf_backend *)obj)->is_free = on; }
static void set_cache_enabled(void *obj, int on) { ((struct conf *)obj)->cache_enabled = on; }
static void set_cache_shared(void *obj, int on) { ((struct conf *)obj)->cache_shared = on; }
static void set_cache_tools(void *obj, int on) { ((struct conf *)obj)->cache_tools = on; }

/* ---- the tables ---- */

static const char *const kind_names[] = {"api", "self_hosted", NULL};
static const char *const api_names[] = {"openai", "anthropic", NULL};
static const char *const tokenizer_names[] = {"estimate", "cl100k_base", "o200k_base", "llama3",
                                              NULL};
static const char *const on_failure_names[] = {"fail_open", "fail_closed", NULL};
static const char *const on_exhausted_names[] = {"reject", "downgrade", NULL};
static const char *const on_overrun_names[] = {"charge", "cut", NULL};

#define DAY_MS 86400000.0
#define BIG 1e12
#define PRICE_MAX 1e6 /* USD per million tokens */
#define SEARCH_PRICE_MAX 1e6 /* USD per 1,000 web or file searches */

#define R(field) .offset = offsetof(struct conf, field)
static const struct directive root_directives[CONF__R_COUNT] = {
    [CONF__R_LISTEN] = {"listen", NULL, T_FN, .fn = fn_listen, .def = "127.0.0.1:8080"},
    [CONF__R_TLS] = {"tls", NULL, T_SECTION},
    [CONF__R_TLS_CERT_FILE] = {"cert_file", "tls", T_STR, R(tls_cert_file), .fn = check_readable},
    [CONF__R_TLS_KEY_FILE] = {"key_file", "tls", T_STR, R(tls_key_file), .fn = check_readable},
    [CONF__R_ADMIN_KEY] = {"admin_key", NULL, T_SECRET, R(admin_key)},
    [CONF__R_ADMIN_RELOAD_TIMEOUT] = {"admin_reload_timeout_ms", NULL, T_INT,
                                      R(admin_reload_timeout_ms), 1, DAY_MS, "30000"},
    [CONF__R_COST_LOG] = {"cost_log", NULL, T_STR, R(cost_log)},
    [CONF__R_COST_LOG_BUFFER_MAX] = {"cost_log_buffer_max", NULL, T_SIZE, R(cost_log_buffer_max),
                                     4096, 1 << 30, "16777216"},
    [CONF__R_COST_LOG_WAIT] = {"cost_log_wait_ms", NULL, T_INT, R(cost_log_wait_ms), 1, DAY_MS,
                               "30000"},
    [CONF__R_INCLUDE] = {"include", NULL, T_NODE, .node = node_include},
    [CONF__R_PRICES] = {"prices", NULL, T_NODE, .node = node_prices},
    /* default (COSTROUTER_DATA or data/tokens) set in conf__defaults */
    [CONF__R_TOKENIZER_DATA] = {"tokenizer_data", NULL, T_STR, R(tokenizer_data),
                                .fn = check_folder},
    [CONF__R_STORE] = {"store", NULL, T_SECTION},
    [CONF__R_REDIS] = {"redis", "store", T_FN, .fn = fn_redis},
    [CONF__R_ON_FAILURE] = {"on_failure", "store", T_ENUM, R(store_on_failure),
                            .names = on_failure_names, .def = "fail_open"},
    [CONF__R_KEY_PREFIX] = {"key_prefix", "store", T_STR, R(store_key_prefix),
                            .fn = check_key_prefix, .def = "costrouter:"},
    [CONF__R_STORE_CONNECT_TIMEOUT] = {"connect_timeout_ms", "store", T_INT,
                                       R(store_connect_timeout_ms), 1, DAY_MS, "1000"},
    [CONF__R_COMMAND_TIMEOUT] = {"command_timeout_ms", "store", T_INT,
                                 R(store_command_timeout_ms), 1, DAY_MS, "500"},
    [CONF__R_RESERVATION_TTL] = {"reservation_ttl_ms", "store", T_INT,
                                 R(store_reservation_ttl_ms), 1000, 7 * DAY_MS, "600000"},
    [CONF__R_JOURNAL_FILE] = {"journal_file", "store", T_STR, R(store_journal_file),
                              .fn = check_store_file},
    [CONF__R_SPEND_FILE] = {"spend_file", "store", T_STR, R(store_spend_file),
                            .fn = check_store_file},
    [CONF__R_CACHE] = {"cache", NULL, T_SECTION},
    [CONF__R_CACHE_ENABLED] = {"enabled", "cache", T_BOOL, .set_flag = set_cache_enabled,
                               .def = "true"},
    [CONF__R_CACHE_TTL] = {"ttl_s", "cache", T_INT, R(cache_ttl_s), 1, 365 * 86400.0, "3600"},
    [CONF__R_MAX_ENTRY_BYTES] = {"max_entry_bytes", "cache", T_SIZE, R(cache_max_entry_bytes),
                                 1, 512 << 20, "1048576"},
    [CONF__R_LOCAL_BYTES] = {"local_bytes", "cache", T_SIZE, R(cache_local_bytes), 1,
                             1099511627776.0, "67108864"},
    [CONF__R_CACHE_SHARED] = {"shared", "cache", T_BOOL, .set_flag = set_cache_shared,
                              .def = "false"},
    [CONF__R_CACHE_TOOLS] = {"cache_tools", "cache", T_BOOL, .set_flag = set_cache_tools,
                             .def = "false"},
    [CONF__R_LIMITS] = {"limits", NULL, T_SECTION},
    [CONF__R_MAX_HEADER_BYTES] = {"max_header_bytes", "limits", T_SIZE, R(max_header_bytes),
                                  1024, 16 << 20, "65536"},
    [CONF__R_MAX_BODY_BYTES] = {"max_body_bytes", "limits", T_SIZE, R(max_body_bytes), 1,
                                1 << 30, "8388608"},
    [CONF__R_HEADER_TIMEOUT] = {"header_timeout_ms", "limits", T_INT, R(header_timeout_ms), 1,
                                DAY_MS, "10000"},
    [CONF__R_BODY_TIMEOUT] = {"body_timeout_ms", "limits", T_INT, R(body_timeout_ms), 1,
                              DAY_MS, "30000"},
    [CONF__R_IDLE_TIMEOUT] = {"idle_timeout_ms", "limits", T_INT, R(idle_timeout_ms), 1,
                              DAY_MS, "60000"},
    [CONF__R_MAX_RETRIES] = {"max_retries", "limits", T_INT, R(max_retries), 0, 100, "2"},
    [CONF__R_MAX_CONNECTIONS] = {"max_connections", "limits", T_SIZE, R(max_connections), 1,
                                 10000000, "20000"},
    [CONF__R_CORS] = {"cors", NULL, T_SECTION},
    [CONF__R_CORS_ORIGINS] = {"allow_origins", "cors", T_NODE, .node = node_cors_origins},
    [CONF__R_CORS_MAX_AGE] = {"max_age_s", "cors", T_INT, R(cors_max_age_s), 0, 86400, "600"},
    [CONF__R_BACKENDS] = {"backends", NULL, T_NODE, .node = node_backends, .required = 1},
    [CONF__R_ROUTES] = {"routes", NULL, T_NODE, .node = node_routes, .required = 1},
    [CONF__R_TENANTS] = {"tenants", NULL, T_NODE, .node = node_tenants},
    [CONF__R_EXPERIMENTS] = {"experiments", NULL, T_NODE, .node = node_experiments},
};
#undef R

/* A service tier's section and rates (the order of CONF__TIER_KEYS), in
 * the table whose offset macro is OFF. */
#define TIER_DIRECTIVES(OFF, key, name, tier)                                                    \
    [key] = {name, NULL, T_SECTION},                                                             \
    [key + CONF__TIER_INPUT] = {"input_usd_per_mtok", name, T_DOUBLE,                             \
                                OFF(tiers[tier].input_usd_per_mtok), 0, PRICE_MAX},              \
    [key + CONF__TIER_OUTPUT] = {"output_usd_per_mtok", name, T_DOUBLE,                           \
                                 OFF(tiers[tier].output_usd_per_mtok), 0, PRICE_MAX},            \
    [key + CONF__TIER_CACHED] = {"cached_input_usd_per_mtok", name, T_DOUBLE,                     \
                                 OFF(tiers[tier].cached_input_usd_per_mtok), 0, PRICE_MAX}

#define B(field) .offset = offsetof(struct conf_backend, field)
static const struct directive backend_directives[CONF__B_COUNT] = {
    [CONF__B_NAME] = {"name", NULL, T_STR, B(name), .fn = check_name, .required = 1},
    [CONF__B_KIND] = {"kind", NULL, T_ENUM, B(kind), .names = kind_names, .required = 1},
    [CONF__B_URL] = {"url", NULL, T_FN, .fn = fn_url, .required = 1},
    [CONF__B_MODEL] = {"model", NULL, T_STR, B(model), .fn = check_model},
    [CONF__B_TOKENIZER] = {"tokenizer", NULL, T_ENUM, B(tokenizer), .names = tokenizer_names,
                           .def = "estimate"},
    [CONF__B_QUALITY] = {"quality", NULL, T_INT, B(quality), 0, 1000000, "0"},
    [CONF__B_CONTEXT_WINDOW] = {"context_window", NULL, T_I64, B(context_window), 0, BIG, "0"},
    [CONF__B_FREE] = {"free", NULL, T_BOOL, .set_flag = set_free, .def = "false"},
    [CONF__B_GPU_HOURLY_USD] = {"gpu_hourly_usd", NULL, T_DOUBLE, B(gpu_hourly_usd), 0, 1e6,
                                "0"},
    [CONF__B_REPLICAS] = {"replicas", NULL, T_INT, B(replicas), 1, 1000000, "1"},
    [CONF__B_MAX_CONCURRENCY] = {"max_concurrency", NULL, T_INT, B(max_concurrency), 1, 1000000},
    [CONF__B_TOKENS_PER_SECOND] = {"tokens_per_second", NULL, T_DOUBLE, B(tokens_per_second), 1,
                                   1e9},
    [CONF__B_API_KEY] = {"api_key", NULL, T_SECRET, B(api_key)},
    [CONF__B_AUTH_HEADER] = {"auth_header", NULL, T_STR, B(auth_header), .fn = check_header,
                             .def = "Authorization"},
    [CONF__B_PRICE] = {"price", NULL, T_STR, B(price_name), .fn = check_name},
    [CONF__B_INPUT_USD] = {"input_usd_per_mtok", NULL, T_DOUBLE, B(input_usd_per_mtok), 0,
                           PRICE_MAX},
    [CONF__B_OUTPUT_USD] = {"output_usd_per_mtok", NULL, T_DOUBLE, B(output_usd_per_mtok), 0,
                            PRICE_MAX},
    [CONF__B_CACHED_INPUT_USD] = {"cached_input_usd_per_mtok", NULL, T_DOUBLE,
                                  B(cached_input_usd_per_mtok), 0, PRICE_MAX},
    [CONF__B_CONNECT_TIMEOUT] = {"connect_timeout_ms", NULL, T_INT, B(connect_timeout_ms), 1,
                                 DAY_MS, "5000"},
    [CONF__B_FIRST_BYTE_TIMEOUT] = {"first_byte_timeout_ms", NULL, T_INT,
                                    B(first_byte_timeout_ms), 1, DAY_MS, "60000"},
    [CONF__B_TOTAL_TIMEOUT] = {"total_timeout_ms", NULL, T_INT, B(total_timeout_ms), 1, DAY_MS,
                               "600000"},
    /* default (the backend's first_byte_timeout_ms) set by check.c */
    [CONF__B_READ_TIMEOUT] = {"read_timeout_ms", NULL, T_INT, B(read_timeout_ms), 1, DAY_MS},
    [CONF__B_MAX_IDLE] = {"max_idle_connections", NULL, T_INT, B(max_idle_connections), 0,
                          1000000, "64"},
    [CONF__B_TTFT_STALE] = {"ttft_stale_ms", NULL, T_INT, B(ttft_stale_ms), 0, DAY_MS,
                            "30000"},
    [CONF__B_CA_FILE] = {"ca_file", NULL, T_STR, B(ca_file), .fn = check_readable},
    [CONF__B_TLS_VERIFY] = {"tls_verify", NULL, T_BOOL, .set_flag = set_tls_verify,
                            .def = "true"},
    [CONF__B_STREAM_USAGE] = {"stream_usage", NULL, T_BOOL, .set_flag = set_stream_usage,
                              .def = "true"},
    /* completed from the price entry by check.c; 0 turns the entry's tier off */
    [CONF__B_LONG_CONTEXT] = {"long_context", NULL, T_SECTION},
    [CONF__B_LONG_ABOVE] = {"above_prompt_tokens", "long_context", T_I64,
                            B(long_context.above_prompt_tokens), 0, BIG},
    [CONF__B_LONG_INPUT_USD] = {"input_usd_per_mtok", "long_context", T_DOUBLE,
                                B(long_context.input_usd_per_mtok), 0, PRICE_MAX},
    [CONF__B_LONG_OUTPUT_USD] = {"output_usd_per_mtok", "long_context", T_DOUBLE,
                                 B(long_context.output_usd_per_mtok), 0, PRICE_MAX},
    [CONF__B_LONG_CACHED_INPUT_USD] = {"cached_input_usd_per_mtok", "long_context", T_DOUBLE,
                                       B(long_context.cached_input_usd_per_mtok), 0, PRICE_MAX},
    /* completed from the price entry by check.c */
    TIER_DIRECTIVES(B, CONF__B_FLEX, "flex", CONF_TIER_FLEX),
    TIER_DIRECTIVES(B, CONF__B_PRIORITY, "priority", CONF_TIER_PRIORITY),
    [CONF__B_API] = {"api", NULL, T_ENUM, B(api), .names = api_names, .def = "openai"},
    /* defaults (1.25 x input) set by check.c, as cached input's are */
    [CONF__B_CACHE_WRITE_USD] = {"cache_write_usd_per_mtok", NULL, T_DOUBLE,
                                 B(cache_write_usd_per_mtok), 0, PRICE_MAX},
    [CONF__B_LONG_CACHE_WRITE_USD] = {"cache_write_usd_per_mtok", "long_context", T_DOUBLE,
                                      B(long_context.cache_write_usd_per_mtok), 0, PRICE_MAX},
    [CONF__B_CACHE_WRITE_1H_USD] = {"cache_write_1h_usd_per_mtok", NULL, T_DOUBLE,
                                    B(cache_write_1h_usd_per_mtok), 0, PRICE_MAX},
    [CONF__B_LONG_CACHE_WRITE_1H_USD] = {"cache_write_1h_usd_per_mtok", "long_context", T_DOUBLE,
                                         B(long_context.cache_write_1h_usd_per_mtok), 0,
                                         PRICE_MAX},
    /* default (the entry's, else 0) set by check.c */
    [CONF__B_WEB_SEARCH_USD] = {"web_search_usd_per_1k", NULL, T_DOUBLE, B(web_search_usd_per_1k),
                                0, SEARCH_PRICE_MAX},
    [CONF__B_COST_FROM_USAGE] = {"cost_from_usage", NULL, T_BOOL, .set_flag = set_cost_from_usage,
                                 .def = "false"},
    /* default (the entry's, else 0) set by check.c */
    [CONF__B_FILE_SEARCH_USD] = {"file_search_usd_per_1k", NULL, T_DOUBLE,
                                 B(file_search_usd_per_1k), 0, SEARCH_PRICE_MAX},
};
#undef B

static const struct directive route_directives[CONF__RT_COUNT] = {
    [CONF__RT_MODEL] = {"model", NULL, T_STR, offsetof(struct conf_route, model),
                        .fn = check_model, .required = 1},
    [CONF__RT_CANDIDATES] = {"candidates", NULL, T_NODE, .node = node_candidates,
                             .required = 1},
};

#define TN(field) .offset = offsetof(struct conf_tenant, field)
static const struct directive tenant_directives[CONF__T_COUNT] = {
    [CONF__T_ID] = {"id", NULL, T_STR, TN(id), .fn = check_name, .required = 1},
    [CONF__T_API_KEYS] = {"api_keys", NULL, T_NODE, .node = node_api_keys, .required = 1},
    [CONF__T_BUDGET] = {"budget", NULL, T_SECTION},
    [CONF__T_DAILY_USD] = {"daily_usd", "budget", T_DOUBLE, TN(daily_usd), 0, BIG, "0"},
    [CONF__T_MONTHLY_USD] = {"monthly_usd", "budget", T_DOUBLE, TN(monthly_usd), 0, BIG, "0"},
    [CONF__T_ON_EXHAUSTED] = {"on_exhausted", "budget", T_ENUM, TN(on_exhausted),
                              .names = on_exhausted_names, .def = "reject"},
    [CONF__T_SOFT_LIMIT] = {"soft_limit_pct", "budget", T_INT, TN(soft_limit_pct), 0, 100,
                            "0"},
    [CONF__T_ON_OVERRUN] = {"on_overrun", "budget", T_ENUM, TN(on_overrun),
                            .names = on_overrun_names, .def = "charge"},
    [CONF__T_RATE_LIMITS] = {"rate_limits", NULL, T_SECTION},
    [CONF__T_RPM] = {"rpm", "rate_limits", T_I64, TN(rpm), 0, BIG, "0"},
    [CONF__T_TPM] = {"tpm", "rate_limits", T_I64, TN(tpm), 0, BIG, "0"},
    [CONF__T_SLO] = {"slo", NULL, T_SECTION},
    [CONF__T_MAX_TTFT_MS] = {"max_ttft_ms", "slo", T_INT, TN(max_ttft_ms), 0, DAY_MS, "0"},
    [CONF__T_MIN_QUALITY] = {"min_quality", "slo", T_INT, TN(min_quality), 0, 1000000, "0"},
    [CONF__T_TAGS] = {"tags", NULL, T_NODE, .node = node_tags},
    [CONF__T_MODELS] = {"models", NULL, T_NODE, .node = node_tenant_models},
};
#undef TN

#define K(field) .offset = offsetof(struct conf_key, field)
static const struct directive key_directives[CONF__K_COUNT] = {
    [CONF__K_HASH] = {"hash", NULL, T_FN, .fn = fn_key_hash, .required = 1},
    [CONF__K_NAME] = {"name", NULL, T_STR, K(name), .fn = check_name},
    [CONF__K_RPM] = {"rpm", NULL, T_I64, K(rpm), 0, BIG, "0"},
    [CONF__K_TPM] = {"tpm", NULL, T_I64, K(tpm), 0, BIG, "0"},
    [CONF__K_MODELS] = {"models", NULL, T_NODE, .node = node_key_models},
    /* The tenant's rules: same range and rounding as its daily_usd and
     * monthly_usd; its on_exhausted, soft_limit_pct and on_overrun apply. */
    [CONF__K_BUDGET] = {"budget", NULL, T_SECTION},
    [CONF__K_DAILY_USD] = {"daily_usd", "budget", T_DOUBLE, K(daily_usd), 0, BIG, "0"},
    [CONF__K_MONTHLY_USD] = {"monthly_usd", "budget", T_DOUBLE, K(monthly_usd), 0, BIG, "0"},
};
#undef K

#define E(field) .offset = offsetof(struct conf_experiment, field)
static const struct directive experiment_directives[CONF__E_COUNT] = {
    [CONF__E_NAME] = {"name", NULL, T_STR, E(name), .fn = check_name, .required = 1},
    [CONF__E_ROUTE] = {"route", NULL, T_STR, E(route), .fn = check_model, .required = 1},
    [CONF__E_TENANTS] = {"tenants", NULL, T_NODE, .node = node_experiment_tenants},
    [CONF__E_USER_HEADER] = {"user_header", NULL, T_STR, E(user_header), .fn = check_header,
                             .def = "x-user-id"},
    [CONF__E_ARMS] = {"arms", NULL, T_NODE, .node = node_arms, .required = 1},
};
#undef E

#define A(field) .offset = offsetof(struct conf_arm, field)
static const struct directive arm_directives[CONF__A_COUNT] = {
    [CONF__A_NAME] = {"name", NULL, T_STR, A(name), .fn = check_name, .required = 1},
    [CONF__A_WEIGHT] = {"weight", NULL, T_INT, A(weight), 0, 1000000, "1"},
    [CONF__A_BACKENDS] = {"backends", NULL, T_NODE, .node = node_arm_backends},
};
#undef A

#define P(field) .offset = offsetof(struct conf_price, field)
static const struct directive price_directives[CONF__P_COUNT] = {
    [CONF__P_INPUT_USD] = {"input_usd_per_mtok", NULL, T_DOUBLE, P(input_usd_per_mtok), 0,
                           PRICE_MAX, .required = 1},
    [CONF__P_OUTPUT_USD] = {"output_usd_per_mtok", NULL, T_DOUBLE, P(output_usd_per_mtok), 0,
                            PRICE_MAX, .required = 1},
    /* default (the input price) set by node_prices */
    [CONF__P_CACHED_INPUT_USD] = {"cached_input_usd_per_mtok", NULL, T_DOUBLE,
                                  P(cached_input_usd_per_mtok), 0, PRICE_MAX},
    /* checked and completed by complete_long_context */
    [CONF__P_LONG_CONTEXT] = {"long_context", NULL, T_SECTION},
    [CONF__P_LONG_ABOVE] = {"above_prompt_tokens", "long_context", T_I64,
                            P(long_context.above_prompt_tokens), 1, BIG},
    [CONF__P_LONG_INPUT_USD] = {"input_usd_per_mtok", "long_context", T_DOUBLE,
                                P(long_context.input_usd_per_mtok), 0, PRICE_MAX},
    [CONF__P_LONG_OUTPUT_USD] = {"output_usd_per_mtok", "long_context", T_DOUBLE,
                                 P(long_context.output_usd_per_mtok), 0, PRICE_MAX},
    [CONF__P_LONG_CACHED_INPUT_USD] = {"cached_input_usd_per_mtok", "long_context", T_DOUBLE,
                                       P(long_context.cached_input_usd_per_mtok), 0, PRICE_MAX},
    /* checked and completed by complete_tiers */
    TIER_DIRECTIVES(P, CONF__P_FLEX, "flex", CONF_TIER_FLEX),
    TIER_DIRECTIVES(P, CONF__P_PRIORITY, "priority", CONF_TIER_PRIORITY),
    /* default (1.25 x the input price) set by node_prices and complete_long_context */
    [CONF__P_CACHE_WRITE_USD] = {"cache_write_usd_per_mtok", NULL, T_DOUBLE,
                                 P(cache_write_usd_per_mtok), 0, PRICE_MAX},
    [CONF__P_LONG_CACHE_WRITE_USD] = {"cache_write_usd_per_mtok", "long_context", T_DOUBLE,
                                      P(long_context.cache_write_usd_per_mtok), 0, PRICE_MAX},
    [CONF__P_CACHE_WRITE_1H_USD] = {"cache_write_1h_usd_per_mtok", NULL, T_DOUBLE,
                                    P(cache_write_1h_usd_per_mtok), 0, PRICE_MAX},
    [CONF__P_LONG_CACHE_WRITE_1H_USD] = {"cache_write_1h_usd_per_mtok", "long_context", T_DOUBLE,
                                         P(long_context.cache_write_1h_usd_per_mtok), 0,
                                         PRICE_MAX},
    /* a fee per search, whatever the prompt's size: no long_context rate */
    [CONF__P_WEB_SEARCH_USD] = {"web_search_usd_per_1k", NULL, T_DOUBLE, P(web_search_usd_per_1k),
                                0, SEARCH_PRICE_MAX, "0"},
    [CONF__P_FILE_SEARCH_USD] = {"file_search_usd_per_1k", NULL, T_DOUBLE,
                                 P(file_search_usd_per_1k), 0, SEARCH_PRICE_MAX, "0"},
};
#undef P

static const struct directive included_directives[CONF__I_COUNT] = {
    [CONF__I_PRICES] = {"prices", NULL, T_NODE, .node = node_prices},
};

static const struct table root_table = {root_directives, CONF__R_COUNT, (size_t)-1};
static const struct table backend_table = {backend_directives, CONF__B_COUNT,
                                           offsetof(struct conf_backend, line)};
static const struct table route_table = {route_directives, CONF__RT_COUNT,
                                         offsetof(struct conf_route, line)};
static const struct table tenant_table = {tenant_directives, CONF__T_COUNT,
                                          offsetof(struct conf_tenant, line)};
static const struct table key_table = {key_directives, CONF__K_COUNT,
                                       offsetof(struct conf_key, line)};
static const struct table experiment_table = {experiment_directives, CONF__E_COUNT,
                                              offsetof(struct conf_experiment, line)};
static const struct table arm_table = {arm_directives, CONF__A_COUNT,
                                       offsetof(struct conf_arm, line)};
static const struct table price_table = {price_directives, CONF__P_COUNT,
                                         offsetof(struct conf_price, line)};
static const struct table included_table = {included_directives, CONF__I_COUNT, (size_t)-1};
_Static_assert(CONF__B_COUNT <= 64 && CONF__R_COUNT <= 64 && CONF__T_COUNT <= 64,
               "conf__meta.set holds 64 bits");

/* ---- duplicate keys ---- */

/* One key of a mapping, for finding those given twice. */
struct map_key {
    const char *text; /* the key's scalar text (an alias's: its anchor's) */
    size_t len;       /* bytes in text */
    int line;         /* where the key is written */
    size_t order;     /* its place in the mapping, so the first comes first */
};

static int cmp_map_key(const void *pa, const void *pb)
{
    const struct map_key *a = pa, *b = pb;
    int c = memcmp(a->text, b->text, MIN(a->len, b->len));

    if (c != 0)
        return c;
    if (a->len != b->len)
        return a->len < b->len ? -1 : 1;
    return (a->order > b->order) - (a->order < b->order);
}

/* The text of `key`, through an alias to a scalar as libfyaml compares it
 * once it resolves; -1 for a key of no text (a list or mapping, an alias
 * of nothing), which is left to libfyaml's own message. */
static int key_text(struct fy_node *key, const char **text, size_t *len)
{
    struct fy_node *k = key && fy_node_is_alias(key) ? fy_node_resolve_alias(key) : key;

    if (k == NULL || fy_node_get_type(k) != FYNT_SCALAR || fy_node_is_alias(k))
        return -1;
    *text = fy_node_get_scalar(k, len);
    *len = *text ? *len : 0;
    *text = *text ? *text : "";
    return 0;
}

/* Report each key of mapping `map` (at `path`) that an earlier key of it
 * already gave, as its text compares: `a`, "a" and 'a' are one key.
 * Sorted, as check.c finds duplicate names: a long mapping costs no more
 * than its sort. Returns the number reported. */
static size_t mapping_duplicates(struct conf__ctx *ctx, struct fy_node *map, const char *path)
{
    int count = fy_node_mapping_item_count(map);
    struct map_key *v = calloc((size_t)(count > 0 ? count : 1), sizeof(*v));
    struct fy_node_pair *pair;
    void *it = NULL;
    size_t n = 0, found = 0;

    if (v == NULL)
        return ctx->oom = 1, 0;
    while ((pair = fy_node_mapping_iterate(map, &it)) != NULL && n < (size_t)count) {
        struct fy_node *key = fy_node_pair_key(pair);

        if (key_text(key, &v[n].text, &v[n].len) == 0) {
            /* an empty key has no token: its value is the nearest line */
            v[n].line = node_line(key, node_line(fy_node_pair_value(pair), 1));
            v[n].order = n;
            n++;
        }
    }
    qsort(v, n, sizeof(*v), cmp_map_key);
    for (size_t i = 1, first = 0; i < n; i++) {
        char kpath[256];

        if (v[i].len != v[first].len || memcmp(v[i].text, v[first].text, v[i].len) != 0) {
            first = i;
            continue;
        }
        join_key(kpath, sizeof(kpath), path, v[i].text, v[i].len);
        conf__error(ctx, v[i].line, *kpath ? kpath : "(top level)",
                    "duplicate key%s (first at line %d)", v[i].len ? "" : " \"\"",
                    v[first].line);
        found++;
    }
    free(v);
    return found;
}

/* Every mapping under `n` (at `path`), its own keys then its values'.
 * Aliases are not followed: a mapping is reported where it is written,
 * once however often it is used. The recursion is as deep as the
 * document, which libfyaml's parser bounds. */
static size_t walk_duplicates(struct conf__ctx *ctx, struct fy_node *n, const char *path)
{
    struct fy_node_pair *pair;
    struct fy_node *item;
    void *it = NULL;
    char sub[256];
    size_t found = 0, i = 0;
    const char *k;
    size_t klen;

    switch (n ? fy_node_get_type(n) : FYNT_SCALAR) {
    case FYNT_SEQUENCE:
        while ((item = fy_node_sequence_iterate(n, &it)) != NULL) {
            snprintf(sub, sizeof(sub), "%s[%zu]", path, i++);
            found += walk_duplicates(ctx, item, sub);
        }
        break;
    case FYNT_MAPPING:
        found += mapping_duplicates(ctx, n, path);
        while ((pair = fy_node_mapping_iterate(n, &it)) != NULL) {
            if (key_text(fy_node_pair_key(pair), &k, &klen) == 0)
                join_key(sub, sizeof(sub), path, k, klen);
            else
                snprintf(sub, sizeof(sub), "%s", path);
            found += walk_duplicates(ctx, fy_node_pair_value(pair), sub);
        }
        break;
    case FYNT_SCALAR:
        break;
    }
    return found;
}

size_t conf__duplicate_keys(struct conf__ctx *ctx, struct fy_node *root)
{
    return walk_duplicates(ctx, root, "");
}

/* ---- phases ---- */

int conf__parse(struct conf__ctx *ctx, struct fy_node *root)
{
    ctx->root.line = node_line(root, 1);
    if (root == NULL)
        return conf__error(ctx, 1, "(top level)", "the file is empty");
    if (fy_node_get_type(root) != FYNT_MAPPING)
        return conf__error(ctx, ctx->root.line, "(top level)", "expected a mapping, got %s",
                           node_kind(root));
    parse_mapping(ctx, &root_table, NULL, ctx->conf, &ctx->root, root, 1, "");
    drop_duplicate_prices(ctx);
    return 0;
}

void conf__parse_included(struct conf__ctx *ctx, struct fy_node *root)
{
    struct conf__meta m = {.line = node_line(root, 1)};

    if (root == NULL) {
        conf__error(ctx, 1, "(top level)", "the file is empty");
        return;
    }
    parse_mapping(ctx, &included_table, NULL, ctx->conf, &m, root, m.line, "");
}

void conf__defaults(struct conf__ctx *ctx)
{
    struct conf *c = ctx->conf;
    char path[64];

    apply_defaults(ctx, &root_table, c, &ctx->root, "");
    if (!(ctx->root.set & (1ull << CONF__R_TOKENIZER_DATA))) {
        const char *env = getenv("COSTROUTER_DATA");

        if ((c->tokenizer_data = strdup(env && *env ? env : "data/tokens")) == NULL)
            ctx->oom = 1;
    }
    /* backend prices are completed by check.c, from the price entries */
    for (size_t i = 0; i < c->nbackends; i++) {
        snprintf(path, sizeof(path), "backends[%zu]", i);
        apply_defaults(ctx, &backend_table, &c->backends[i], &ctx->backend_meta[i], path);
    }
    for (size_t i = 0; i < c->nroutes; i++) {
        snprintf(path, sizeof(path), "routes[%zu]", i);
        apply_defaults(ctx, &route_table, &c->routes[i], &ctx->route_meta[i], path);
    }
    for (size_t i = 0; i < c->ntenants; i++) {
        snprintf(path, sizeof(path), "tenants[%zu]", i);
        apply_defaults(ctx, &tenant_table, &c->tenants[i], &ctx->tenant_meta[i], path);
    }
    for (size_t i = 0; i < c->nexperiments; i++) {
        struct conf_experiment *e = &c->experiments[i];
        struct conf__meta *m = &ctx->experiment_meta[i];

        snprintf(path, sizeof(path), "experiments[%zu]", i);
        apply_defaults(ctx, &experiment_table, e, m, path);
        for (size_t j = 0; j < e->narms && j < m->nsub; j++) {
            snprintf(path, sizeof(path), "experiments[%zu].arms[%zu]", i, j);
            apply_defaults(ctx, &arm_table, &e->arms[j], &m->sub[j], path);
        }
    }
}
