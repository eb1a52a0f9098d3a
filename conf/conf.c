/*
 * conf/conf.c: conf_load() and conf_free(), the error report, and ${ENV}
 * interpolation.
 *
 * conf_load reads the file, builds the YAML tree with libfyaml (syntax
 * errors come back through its diagnostics, with their lines), then runs
 * the three phases of internal.h; conf__include does the same for each
 * included price file. Errors are kept with their file and line and
 * printed sorted by those, so the report reads top to bottom like a
 * compiler's. Nothing here ever prints a value of a secret key.
 */
#include "conf/conf.h"
#include "conf/internal.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <libfyaml.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "common/utf8.h"

#define MAX_FILE_BYTES (4u << 20)
#define MAX_ERRORS 200 /* reported in full; the rest are counted */

int conf__error(struct conf__ctx *ctx, int line, const char *path, const char *fmt, ...)
{
    size_t off = ctx->text.len;
    va_list ap;
    char msg[512];

    if (ctx->nerrs >= MAX_ERRORS) {
        ctx->nerrs++;
        return -1;
    }
    if (ctx->nerrs == ctx->caperrs) {
        size_t cap = ctx->caperrs ? 2 * ctx->caperrs : 16;
        struct conf__err *e = realloc(ctx->errs, cap * sizeof(*e));

        if (e == NULL)
            return ctx->oom = 1, -1;
        ctx->errs = e;
        ctx->caperrs = cap;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (line < 1)
        line = 1;
    if (buf_printf(&ctx->text, "%s:%d: %s: %s\n", ctx->file, line, path, msg) != 0)
        return ctx->oom = 1, -1;
    ctx->errs[ctx->nerrs++] = (struct conf__err){ctx->file_no, line, off, ctx->text.len - off};
    return -1;
}

const char *conf__quote(char *out, const char *s, size_t len)
{
    size_t o = 0, limit = CONF__QUOTE_SIZE - 8; /* room for an escape, "..." and '"' */

    out[o++] = '"';
    for (size_t i = 0; i < len && o < limit; i++) {
        unsigned char ch = (unsigned char)s[i];

        if (ch == '"' || ch == '\\')
            o += (size_t)snprintf(out + o, CONF__QUOTE_SIZE - o, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7f)
            o += (size_t)snprintf(out + o, CONF__QUOTE_SIZE - o, "\\x%02x", ch);
        else
            out[o++] = (char)ch;
        if (o >= limit && i + 1 < len) {
            memcpy(out + o, "...", 3);
            o += 3;
        }
    }
    out[o++] = '"';
    out[o] = '\0';
    return out;
}

char *conf__interpolate(struct conf__ctx *ctx, const char *text, size_t len, int line,
                        const char *path)
{
    struct buf out = {0};
    char name[128];
    size_t i = 0;

    if (memchr(text, '\0', len)) {
        conf__error(ctx, line, path, "contains a NUL byte");
        return NULL;
    }
    while (i < len) {
        const char *close, *value;
        size_t nlen;

        if (text[i] != '$' || i + 1 >= len || (text[i + 1] != '{' && text[i + 1] != '$')) {
            if (buf_append(&out, &text[i++], 1) != 0)
                goto oom;
            continue;
        }
        if (text[i + 1] == '$') { /* "$${" is a literal "${"; "$$" otherwise stays */
            int esc = i + 2 < len && text[i + 2] == '{';

            if (buf_append(&out, esc ? "${" : "$$", 2) != 0)
                goto oom;
            i += esc ? 3 : 2;
            continue;
        }
        close = memchr(text + i + 2, '}', len - i - 2);
        if (close == NULL) {
            conf__error(ctx, line, path, "has a \"${\" without its closing \"}\"");
            goto fail;
        }
        nlen = (size_t)(close - (text + i + 2));
        if (nlen == 0 || nlen >= sizeof(name) || isdigit((unsigned char)text[i + 2])) {
            conf__error(ctx, line, path, "has an invalid variable name in \"${...}\"");
            goto fail;
        }
        for (size_t k = 0; k < nlen; k++) {
            char ch = text[i + 2 + k];

            if (!isalnum((unsigned char)ch) && ch != '_') {
                conf__error(ctx, line, path, "has an invalid variable name in \"${...}\"");
                goto fail;
            }
        }
        memcpy(name, text + i + 2, nlen);
        name[nlen] = '\0';
        if ((value = getenv(name)) == NULL) {
            conf__error(ctx, line, path, "environment variable %s is not set", name);
            goto fail;
        }
        if (buf_append(&out, value, strlen(value)) != 0)
            goto oom;
        i += nlen + 3;
    }
    if (buf_append(&out, "", 1) != 0)
        goto oom;
    return out.data;
oom:
    ctx->oom = 1;
fail:
    buf_free(&out);
    return NULL;
}

static void free_metas(struct conf__meta *v, size_t n);

static void free_meta(struct conf__meta *m)
{
    for (size_t i = 0; m->items && i < m->nitems; i++)
        free(m->items[i]);
    free(m->items);
    free(m->item_lines);
    free_metas(m->sub, m->nsub);
}

static void free_metas(struct conf__meta *v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        free_meta(&v[i]);
    free(v);
}

static int cmp_err(const void *pa, const void *pb)
{
    const struct conf__err *a = pa, *b = pb;

    if (a->file != b->file)
        return a->file < b->file ? -1 : 1;
    if (a->line != b->line)
        return a->line < b->line ? -1 : 1;
    return (a->off > b->off) - (a->off < b->off);
}

/* The report: every error line sorted by line, then a count of those left
 * out. Returns a malloc'd string (NULL only if memory ran out). */
static char *report(struct conf__ctx *ctx)
{
    struct buf out = {0};
    size_t shown = ctx->nerrs < MAX_ERRORS ? ctx->nerrs : MAX_ERRORS;
    int rc = 0;

    qsort(ctx->errs, shown, sizeof(*ctx->errs), cmp_err);
    for (size_t i = 0; i < shown; i++)
        rc |= buf_append(&out, ctx->text.data + ctx->errs[i].off, ctx->errs[i].len);
    if (ctx->nerrs > shown)
        rc |= buf_printf(&out, "%s: %zu more errors not shown\n", ctx->file, ctx->nerrs - shown);
    if (ctx->oom)
        rc |= buf_printf(&out, "%s: out of memory while loading\n", ctx->file);
    rc |= buf_append(&out, "", 1);
    if (rc != 0) {
        buf_free(&out);
        return strdup("out of memory\n");
    }
    return out.data;
}

/* Read the whole file; NULL after reporting why not. A FIFO or a device
 * is read to its end like a file, within the same bound: a config a
 * process writes as it is read (reloads do it off the loop, so one that
 * waits for its writer holds no request). */
static char *read_file(struct conf__ctx *ctx, size_t *len)
{
    /* read(2), not stdio: a reload may still be reading (a FIFO no one
     * writes) when the router exits, and exit() unbuffers every open FILE
     * under a thread that is using it. A bare descriptor is left alone. */
    int fd = open(ctx->file, O_RDONLY | O_CLOEXEC);
    char *data = NULL, *more;
    struct stat st;
    size_t n = 0, cap;
    ssize_t got = 1;

    if (fd < 0) {
        conf__error(ctx, 0, "(file)", "cannot open: %s", strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0) {
        conf__error(ctx, 0, "(file)", "cannot read: %s", strerror(errno));
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        conf__error(ctx, 0, "(file)", "is a folder, not a file");
        goto out;
    }
    if (S_ISREG(st.st_mode) && st.st_size > MAX_FILE_BYTES)
        goto too_large;
    cap = S_ISREG(st.st_mode) ? (size_t)st.st_size + 1 : 4096;
    if ((data = malloc(cap)) == NULL) {
        ctx->oom = 1;
        goto out;
    }
    while (got != 0) {
        if (n == cap) {
            if (cap > MAX_FILE_BYTES)
                goto too_large;
            cap = cap * 2 > MAX_FILE_BYTES + 1 ? MAX_FILE_BYTES + 1 : cap * 2;
            if ((more = realloc(data, cap)) == NULL) {
                ctx->oom = 1;
                goto fail;
            }
            data = more;
        }
        got = read(fd, data + n, cap - n);
        if (got < 0 && errno != EINTR) {
            conf__error(ctx, 0, "(file)", "cannot read: %s", strerror(errno));
            goto fail;
        }
        n += got > 0 ? (size_t)got : 0;
        got = got < 0 ? 1 : got; /* EINTR: read again */
    }
    *len = n;
    goto out;
too_large:
    conf__error(ctx, 0, "(file)", "is larger than 4 MiB");
fail:
    free(data);
    data = NULL;
out:
    close(fd);
    return data;
}

/* Nodes that aliases may add to a document once expanded. YAML's
 * aliases nest: ten anchors of ten aliases each expand a few hundred
 * bytes to 10^10 nodes (the "billion laughs"), which held --check-config,
 * a start or a reload for minutes and gigabytes. A real config shares a
 * budget or a backend's settings, a few nodes per use. */
#define CONF_ALIAS_NODES_MAX 100000
/* Aliases within aliases deeper than this are refused with the rest:
 * the walk below recurses once per level. */
#define CONF_ALIAS_DEPTH_MAX 256

/* Walk `n` as it will be once its aliases are expanded, taking a node
 * from *left for each one reached through an alias (`aliased`). -1 when
 * they run out or nest too deep, with *line where. */
static int walk_aliases(struct fy_node *n, int aliased, int depth, long *left, int *line)
{
    struct fy_node_pair *pair;
    struct fy_node *item;
    struct fy_token *t;
    void *it = NULL;

    if (n == NULL)
        return 0;
    if ((aliased && --*left < 0) || depth > CONF_ALIAS_DEPTH_MAX)
        return -1;
    if (fy_node_is_alias(n)) {
        if (!aliased && (t = fy_node_get_scalar_token(n)) != NULL)
            *line = fy_token_start_mark(t)->line + 1;
        /* An alias of no anchor is reported when the document resolves. */
        return walk_aliases(fy_node_resolve_alias(n), 1, depth + 1, left, line);
    }
    switch (fy_node_get_type(n)) {
    case FYNT_SEQUENCE:
        while ((item = fy_node_sequence_iterate(n, &it)) != NULL)
            if (walk_aliases(item, aliased, depth + 1, left, line) != 0)
                return -1;
        break;
    case FYNT_MAPPING:
        while ((pair = fy_node_mapping_iterate(n, &it)) != NULL)
            if (walk_aliases(fy_node_pair_key(pair), aliased, depth + 1, left, line) != 0 ||
                walk_aliases(fy_node_pair_value(pair), aliased, depth + 1, left, line) != 0)
                return -1;
        break;
    case FYNT_SCALAR:
        break;
    }
    return 0;
}

/* Report libfyaml's collected errors, which carry their own lines. */
static void report_yaml_errors(struct conf__ctx *ctx, struct fy_diag *diag)
{
    struct fy_diag_error *e;
    void *it = NULL;
    int any = 0;

    while ((e = fy_diag_errors_iterate(diag, &it)) != NULL) {
        if (e->type < FYET_ERROR)
            continue;
        conf__error(ctx, e->line, "(yaml)", "%s", e->msg);
        any = 1;
    }
    if (!any) /* libfyaml builds nothing, silently, from a file of comments */
        conf__error(ctx, 0, "(top level)", "the file is empty");
}

/* Line of the first node of `doc` (1-based), 0 if it has none. */
static int document_line(struct fy_document *doc)
{
    struct fy_document_state *st = fy_document_get_document_state(doc);
    const struct fy_mark *m = st ? fy_document_state_start_mark(st) : NULL;

    return m ? m->line + 1 : 0;
}

/* The file's one document, aliases checked then resolved (unless
 * `resolve` is 0); NULL after an error (reported here, or left in the
 * parser's diagnostics). A second document (after "---") is an error:
 * only the first was read, so what the second said (a garbled line even)
 * went unseen. */
static struct fy_document *load_document(struct conf__ctx *ctx, struct fy_parser *fyp,
                                         int resolve)
{
    struct fy_document *doc = fy_parse_load_document(fyp), *next;
    long left = CONF_ALIAS_NODES_MAX;
    int line = 0;

    if (doc == NULL)
        return NULL;
    if ((next = fy_parse_load_document(fyp)) != NULL) {
        conf__error(ctx, document_line(next), "(yaml)",
                    "a second document: a config file holds one (no \"---\" after the first)");
        fy_parse_document_destroy(fyp, next);
    } else if (fy_parser_get_stream_error(fyp)) {
        /* a broken second document: the caller reports libfyaml's error */
    } else if (walk_aliases(fy_document_root(doc), 0, 0, &left, &line) != 0) {
        conf__error(ctx, line, "(yaml)",
                    "aliases expand to more than %d nodes, or nest more than %d deep",
                    CONF_ALIAS_NODES_MAX, CONF_ALIAS_DEPTH_MAX);
    } else if (!resolve || fy_document_resolve(doc) == 0) {
        return doc;
    }
    fy_parse_document_destroy(fyp, doc);
    return NULL;
}

/* Is there anything in `n` for libfyaml to resolve or to compare itself:
 * an alias, a merge key, a key that is not a plain scalar? A document
 * without any is the same resolved or not, and its keys are compared as
 * conf__duplicate_keys compares them. The recursion is as deep as the
 * document, which libfyaml's parser bounds. */
static int needs_libfyaml(struct fy_node *n)
{
    struct fy_node_pair *pair;
    struct fy_node *item, *key;
    void *it = NULL;
    const char *k;
    size_t klen;

    if (n == NULL)
        return 0;
    if (fy_node_is_alias(n))
        return 1;
    switch (fy_node_get_type(n)) {
    case FYNT_SEQUENCE:
        while ((item = fy_node_sequence_iterate(n, &it)) != NULL)
            if (needs_libfyaml(item))
                return 1;
        break;
    case FYNT_MAPPING:
        while ((pair = fy_node_mapping_iterate(n, &it)) != NULL) {
            key = fy_node_pair_key(pair);
            if (key == NULL || fy_node_is_alias(key) || fy_node_get_type(key) != FYNT_SCALAR)
                return 1;
            k = fy_node_get_scalar(key, &klen);
            if ((k && klen == 2 && memcmp(k, "<<", 2) == 0) ||
                needs_libfyaml(fy_node_pair_value(pair)))
                return 1;
        }
        break;
    case FYNT_SCALAR:
        break;
    }
    return 0;
}

/* A quiet parser of `src` with `flags`, its diagnostics kept (not
 * printed) in *diag; NULL when memory ran out (ctx->oom set). The caller
 * destroys both (either may be NULL). */
static struct fy_parser *open_parser(struct conf__ctx *ctx, unsigned flags, const char *src,
                                     size_t len, struct fy_diag **diag)
{
    struct fy_diag_cfg dcfg;
    struct fy_parse_cfg cfg = {.flags = FYPCF_QUIET | flags};
    struct fy_parser *fyp;

    fy_diag_cfg_default(&dcfg);
    dcfg.fp = NULL;
    if ((*diag = fy_diag_create(&dcfg)) == NULL)
        return ctx->oom = 1, NULL;
    fy_diag_set_collect_errors(*diag, true);
    cfg.diag = *diag;
    if ((fyp = fy_parser_create(&cfg)) == NULL || fy_parser_set_string(fyp, src, len) != 0) {
        fy_parser_destroy(fyp);
        return ctx->oom = 1, NULL;
    }
    return fyp;
}

/* After libfyaml refused the document: read it again with duplicate keys
 * allowed and, unresolved (no alias expanded, merge keys as written),
 * name each duplicate with its path and the line of the first. Only
 * here: allowing them also changes how merge keys resolve (the merged
 * pairs come after, and win over, the keys beside them), so what loads
 * is still what libfyaml alone accepts. Returns how many it reported;
 * 0 leaves libfyaml's own message to report. */
static size_t report_duplicate_keys(struct conf__ctx *ctx, const char *src, size_t len)
{
    struct fy_diag *diag = NULL;
    struct fy_parser *fyp = open_parser(ctx, FYPCF_ALLOW_DUPLICATE_KEYS, src, len, &diag);
    struct fy_document *doc = fyp ? fy_parse_load_document(fyp) : NULL;
    size_t found = 0;

    if (doc) {
        found = conf__duplicate_keys(ctx, fy_document_root(doc));
        fy_parse_document_destroy(fyp, doc);
    }
    fy_parser_destroy(fyp);
    fy_diag_destroy(diag);
    return found;
}

/* Refuse text libfyaml (0.7) would misread: at a NUL byte, or one that
 * is not UTF-8, at the start of a comment or a plain value it stops
 * reading without a word, and what followed loaded as if it were not
 * there (a Latin-1 "caf\xe9" in a comment hid the keys below it); in a
 * directive ("% \xff") it loops forever. A YAML file is Unicode text,
 * and libfyaml reads it only as UTF-8. Returns 0, or -1 after reporting
 * the first such byte. */
static int check_text(struct conf__ctx *ctx, const char *src, size_t len)
{
    const unsigned char *s = (const unsigned char *)src;
    size_t i = 0, line_start = 0, n;
    int line = 1;

    for (; i < len; i += n) {
        if ((n = s[i] ? utf8_seq_len(s + i, len - i) : 0) == 0)
            break;
        if (s[i] == '\n')
            line++, line_start = i + 1;
    }
    if (i == len)
        return 0;
    if (s[i] == 0)
        return conf__error(ctx, line, "(yaml)", "a NUL byte at column %zu", i - line_start + 1);
    return conf__error(ctx, line, "(yaml)", "not UTF-8 text: byte 0x%02x at column %zu", s[i],
                       i - line_start + 1);
}

/* The document as libfyaml alone accepts it: duplicate keys refused
 * (and then named by report_duplicate_keys), aliases and merge keys
 * resolved. Its check of duplicates compares each key with those before
 * it, pair by pair: a price file of 20,000 entries took 26 s. */
static struct fy_document *build_resolved(struct conf__ctx *ctx, const char *src, size_t len)
{
    size_t nerrs = ctx->nerrs; /* before load_document, which may report */
    struct fy_diag *diag = NULL;
    struct fy_parser *fyp = open_parser(ctx, 0, src, len, &diag);
    struct fy_document *doc = fyp ? load_document(ctx, fyp, 1) : NULL;

    if (doc == NULL && !ctx->oom && ctx->nerrs == nerrs &&
        report_duplicate_keys(ctx, src, len) == 0)
        report_yaml_errors(ctx, diag);
    fy_parser_destroy(fyp);
    fy_diag_destroy(diag);
    return doc;
}

/* Build the document; on an error report it and return NULL. Most files
 * have no alias, merge key or complex key: read with duplicates allowed,
 * they are checked for them by sorting each mapping's keys, which a large
 * mapping needs (see build_resolved); the others are read again as
 * libfyaml alone accepts them. */
static struct fy_document *build_document(struct conf__ctx *ctx, const char *src, size_t len)
{
    struct fy_diag *diag = NULL;
    struct fy_parser *fyp;
    struct fy_document *doc = NULL;
    size_t nerrs = ctx->nerrs;
    int again = 0;

    if (check_text(ctx, src, len) != 0)
        return NULL;
    fyp = open_parser(ctx, FYPCF_ALLOW_DUPLICATE_KEYS, src, len, &diag);
    if (fyp)
        doc = load_document(ctx, fyp, 0);
    if (doc && ((again = needs_libfyaml(fy_document_root(doc))) != 0 ||
                conf__duplicate_keys(ctx, fy_document_root(doc)) > 0)) {
        fy_parse_document_destroy(fyp, doc);
        doc = NULL;
    } else if (doc == NULL && !ctx->oom && ctx->nerrs == nerrs) {
        again = 1; /* libfyaml's own message, as it gives it without duplicates allowed */
    }
    fy_parser_destroy(fyp);
    fy_diag_destroy(diag);
    return again ? build_resolved(ctx, src, len) : doc;
}

void conf__include(struct conf__ctx *ctx, const char *rel, int line, const char *path)
{
    struct conf *c = ctx->conf;
    const char *slash = strrchr(c->path, '/'), *saved_file = ctx->file;
    int saved_no = ctx->file_no;
    struct fy_document *doc;
    struct buf full = {0};
    char **v, *src, q[CONF__QUOTE_SIZE];
    size_t len = 0;
    int rc;

    if (rel[0] == '/' || slash == NULL)
        rc = buf_printf(&full, "%s", rel);
    else
        rc = buf_printf(&full, "%.*s/%s", (int)(slash - c->path), c->path, rel);
    if (rc != 0 || (v = realloc(c->includes, (c->nincludes + 1) * sizeof(*v))) == NULL) {
        buf_free(&full);
        ctx->oom = 1;
        return;
    }
    c->includes = v;
    for (size_t i = 0; i < c->nincludes; i++) {
        if (strcmp(c->includes[i], full.data) == 0) {
            conf__error(ctx, line, path, "%s is already included",
                        conf__quote(q, rel, strlen(rel)));
            buf_free(&full);
            return;
        }
    }
    c->includes[c->nincludes++] = full.data; /* owned by conf from here */
    ctx->file = full.data;
    ctx->file_no = (int)c->nincludes;
    if ((src = read_file(ctx, &len)) != NULL &&
        (doc = build_document(ctx, src, len)) != NULL) {
        conf__parse_included(ctx, fy_document_root(doc));
        fy_document_destroy(doc);
    }
    free(src);
    ctx->file = saved_file;
    ctx->file_no = saved_no;
}

/* conf_load, of the text `text` (len bytes) or, when it is NULL, of the
 * file at `path`. */
static struct conf *load(const char *path, const char *text, size_t len, char **errors)
{
    struct conf__ctx ctx = {.file = path};
    struct fy_document *doc = NULL;
    char *src = NULL;

    *errors = NULL;
    if ((ctx.conf = calloc(1, sizeof(*ctx.conf))) == NULL ||
        (ctx.conf->path = strdup(path)) == NULL) {
        ctx.oom = 1;
        goto done;
    }
    if (text == NULL && (text = src = read_file(&ctx, &len)) == NULL)
        goto done;
    if ((doc = build_document(&ctx, text, len)) == NULL)
        goto done;
    if (conf__parse(&ctx, fy_document_root(doc)) != 0)
        goto done;
    conf__defaults(&ctx);
    conf__check(&ctx);
done:
    if (doc)
        fy_document_destroy(doc);
    free(src);
    free_meta(&ctx.root);
    free_metas(ctx.backend_meta, ctx.conf ? ctx.conf->nbackends : 0);
    free_metas(ctx.route_meta, ctx.conf ? ctx.conf->nroutes : 0);
    free_metas(ctx.tenant_meta, ctx.conf ? ctx.conf->ntenants : 0);
    free_metas(ctx.experiment_meta, ctx.conf ? ctx.conf->nexperiments : 0);
    if (ctx.nerrs || ctx.oom) {
        *errors = report(&ctx);
        conf_free(ctx.conf);
        ctx.conf = NULL;
    }
    buf_free(&ctx.text);
    free(ctx.errs);
    return ctx.conf;
}

struct conf *conf_load(const char *path, char **errors)
{
    return load(path, NULL, 0, errors);
}

struct conf *conf__load_text(const char *path, const char *text, size_t len, char **errors)
{
    return load(path, text, len, errors);
}

const char *conf_summary(const struct conf *conf, char *out, size_t size)
{
    snprintf(out, size, "%zu backend%s, %zu route%s, %zu tenant%s", conf->nbackends,
             conf->nbackends == 1 ? "" : "s", conf->nroutes, conf->nroutes == 1 ? "" : "s",
             conf->ntenants, conf->ntenants == 1 ? "" : "s");
    return out;
}

/* Secrets are wiped before their memory goes back to the allocator. */
static void free_secret(char *s)
{
    if (s)
        OPENSSL_cleanse(s, strlen(s));
    free(s);
}

static void free_names(char **v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        free(v[i]);
    free(v);
}

void conf__models_names_free(struct conf_models *m)
{
    free_names(m->names, m->nnames);
    free(m->lines);
    m->names = NULL;
    m->lines = NULL;
    m->nnames = 0;
}

static void free_models(struct conf_models *m)
{
    conf__models_names_free(m);
    free(m->routes);
}

void conf_free(struct conf *conf)
{
    if (conf == NULL)
        return;
    for (size_t i = 0; i < conf->nbackends; i++) {
        struct conf_backend *b = &conf->backends[i];

        free(b->name);
        free_secret(b->url);
        free(b->host);
        free(b->base_path);
        free_secret(b->query);
        free(b->ca_file);
        free(b->model);
        free_secret(b->api_key);
        free(b->auth_header);
        free(b->price_name);
    }
    for (size_t i = 0; i < conf->nroutes; i++) {
        free(conf->routes[i].model);
        free(conf->routes[i].candidates);
    }
    for (size_t i = 0; i < conf->ntenants; i++) {
        struct conf_tenant *t = &conf->tenants[i];

        free(t->id);
        free(t->key_hashes);
        for (size_t j = 0; t->keys && j < t->nkeys; j++) {
            free(t->keys[j].name);
            free(t->keys[j].subject);
            free_models(&t->keys[j].models);
        }
        free(t->keys);
        for (size_t j = 0; j < t->ntags; j++) {
            free(t->tags[j].key);
            free(t->tags[j].value);
        }
        free(t->tags);
        free_models(&t->models);
    }
    for (size_t i = 0; i < conf->nexperiments; i++) {
        struct conf_experiment *e = &conf->experiments[i];

        free(e->name);
        free(e->route);
        free_names(e->tenants, e->ntenants);
        free(e->user_header);
        for (size_t j = 0; j < e->narms; j++) {
            free(e->arms[j].name);
            free_names(e->arms[j].backends, e->arms[j].nbackends);
        }
        free(e->arms);
    }
    for (size_t i = 0; i < conf->nprices; i++)
        free(conf->prices[i].name);
    free_names(conf->includes, conf->nincludes);
    free_names(conf->cors_origins, conf->ncors_origins);
    free(conf->backends);
    free(conf->routes);
    free(conf->tenants);
    free(conf->experiments);
    free(conf->prices);
    free(conf->_backends_by_name);
    free(conf->_routes_by_model);
    free(conf->_tenants_by_id);
    free(conf->_prices_by_name);
    free(conf->_keys);
    free(conf->path);
    free(conf->tokenizer_data);
    free(conf->store_key_prefix);
    free(conf->store_journal_file);
    free(conf->store_spend_file);
    free(conf->listen_host);
    free(conf->tls_cert_file);
    free(conf->tls_key_file);
    free_secret(conf->admin_key);
    free(conf->cost_log);
    free(conf->redis_host);
    free_secret(conf->redis_password);
    free_secret(conf->redis_url);
    free(conf);
}
