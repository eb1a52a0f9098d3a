/*
 * policy/tokenize.c: loading rank tables and counting tokens by BPE.
 *
 * Counting one text is: make the bytes valid UTF-8 (WHATWG replacement,
 * only when needed), split them with the encoding's regex (PCRE2 JIT), and
 * for each piece either find it whole in the rank table (most pieces) or
 * run tiktoken's byte-pair merge: repeatedly merge the adjacent pair whose
 * concatenation has the lowest rank, the leftmost on ties, until no pair
 * is in the table. The number of parts left is the piece's token count.
 *
 * tiktoken finds the lowest pair by a linear scan, which is quadratic on a
 * long piece (a 1 MB run of one letter is one piece). Short pieces keep
 * that scan, on the stack; long ones use a linked list of parts and a
 * min-heap of (rank, position) entries, discarding stale entries when
 * popped: O(n log n), and the same merges in the same order, because the
 * heap order (rank, then position) is exactly the scan's choice.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#define XXH_INLINE_ALL

#include "policy/tokenize.h"
#include "policy/internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/util.h"

#define NO_RANK UINT32_MAX
/* Pieces up to this many bytes use the quadratic scan (cheaper when short). */
#define SMALL_PIECE 64
/* BPE scratch above this many bytes is freed after use instead of kept. */
#define SCRATCH_KEEP (1u << 20)
#define NENC 3

/* One encoding: its rank table, hash index and split regex. */
struct vocab {
    const char *file_name;     /* e.g. "cl100k_base.tok" */
    uint8_t *file;             /* the whole file, owned; the arrays below point into it */
    uint32_t n;                /* number of tokens */
    const uint32_t *ranks;     /* rank of entry i */
    const uint32_t *offsets;   /* entry i is blob[offsets[i]..offsets[i+1]) */
    const uint8_t *blob;       /* token bytes */
    uint32_t *slots;           /* open-addressing table: entry index + 1, 0 = empty */
    uint32_t mask;             /* slot count - 1 (a power of two) */
    uint32_t max_len;          /* longest token, in bytes */
    uint32_t byte_rank[256];   /* rank of each single byte */
    pcre2_code *re;            /* split pattern, JIT-compiled */
    pcre2_match_data *md;      /* reused for every match */
    pcre2_match_context *mctx; /* carries jit_stack */
    pcre2_jit_stack *jit_stack; /* room for backtracking over long runs */
};

struct policy_tokens {
    struct vocab v[NENC];      /* indexed by conf_tokenizer - 1 */
    uint8_t *text;             /* scratch: input with invalid UTF-8 replaced */
    size_t text_cap;           /* bytes allocated at text */
    uint32_t *next;            /* scratch for long pieces: next part start */
    uint32_t *prev;            /* previous part start, NO_RANK for the first */
    uint32_t *pair;            /* rank of the pair starting at a part, NO_RANK if none/dead */
    uint64_t *heap;            /* (rank << 32 | position) min-heap */
    size_t bpe_cap;            /* piece bytes the arrays above can hold */
    struct buf line;           /* scratch for policy__tokens_line */
};

/* Where encode writes ids: the first cap of them, count counts all. */
struct sink {
    uint32_t *ids; /* output array or NULL */
    size_t cap;    /* its length */
    int64_t count; /* tokens so far */
};

/*
 * Split patterns: tiktoken's, with \s written out as
 * Rust's \s (Unicode White_Space), which tiktoken uses: it includes U+0085
 * and excludes U+FEFF, unlike JavaScript's \s. Llama 3 uses cl100k's
 * pattern (Meta's tokenizer is tiktoken).
 */
#define WS "\\t-\\r \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
#define CONTRACTION "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
static const char pat_cl100k[] =
    CONTRACTION "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*"
    "|[" WS "]*[\\r\\n]+|[" WS "]+(?![^" WS "])|[" WS "]+";
static const char pat_o200k[] =
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+" CONTRACTION "?"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*" CONTRACTION "?"
    "|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n/]*|[" WS "]*[\\r\\n]+|[" WS "]+(?![^" WS "])|[" WS "]+";

static const struct {
    const char *file;    /* file name under the data dir */
    const char *pattern; /* split regex */
} encodings[NENC] = {
    {"cl100k_base.tok", pat_cl100k},
    {"o200k_base.tok", pat_o200k},
    {"llama3.tok", pat_cl100k},
};

static inline uint32_t vocab_rank(const struct vocab *v, const uint8_t *p, size_t len)
{
    if (len > v->max_len)
        return NO_RANK;
    if (len == 1)
        return v->byte_rank[p[0]];
    for (uint32_t i = (uint32_t)XXH3_64bits(p, len) & v->mask;; i = (i + 1) & v->mask) {
        uint32_t e = v->slots[i];
        if (e == 0)
            return NO_RANK;
        e--;
        uint32_t o = v->offsets[e];
        if (v->offsets[e + 1] - o == len && memcmp(v->blob + o, p, len) == 0)
            return v->ranks[e];
    }
}

/* ---- loading ---- */

static int read_file(const char *path, uint8_t **out, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = 0;
    uint8_t *data = NULL;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto fail;
    }
    data = malloc(st.st_size ? (size_t)st.st_size : 1);
    if (!data) {
        rc = -ENOMEM;
        goto fail;
    }
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, data + got, (size_t)st.st_size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            rc = r < 0 ? -errno : -EINVAL;
            goto fail;
        }
        got += (size_t)r;
    }
    close(fd);
    *out = data;
    *len = got;
    return 0;
fail:
    free(data);
    close(fd);
    return rc;
}

static int vocab_index(struct vocab *v, size_t file_len)
{
    if (file_len < 16 || memcmp(v->file, "CRTOK1\0\0", 8) != 0)
        return -EINVAL;
    uint32_t n, blob_len;
    memcpy(&n, v->file + 8, 4);
    memcpy(&blob_len, v->file + 12, 4);
    if (n == 0 || n > (1u << 24) || (uint64_t)16 + 8ull * n + 4 + blob_len != file_len)
        return -EINVAL;
    v->n = n;
    v->ranks = (const uint32_t *)(v->file + 16);
    v->offsets = v->ranks + n;
    v->blob = (const uint8_t *)(v->offsets + n + 1);
    if (v->offsets[0] != 0 || v->offsets[n] != blob_len)
        return -EINVAL;
    uint32_t slots = 1;
    while (slots < 2 * n)
        slots <<= 1;
    v->mask = slots - 1;
    v->slots = calloc(slots, sizeof(*v->slots));
    if (!v->slots)
        return -ENOMEM;
    for (int b = 0; b < 256; b++)
        v->byte_rank[b] = NO_RANK;
    v->max_len = 0;
    for (uint32_t e = 0; e < n; e++) {
        uint32_t o = v->offsets[e], len = v->offsets[e + 1] - o;
        if (v->offsets[e + 1] < o || v->offsets[e + 1] > blob_len || len == 0 ||
            v->ranks[e] == NO_RANK)
            return -EINVAL;
        /* A duplicate would make counts depend on table order. */
        if (vocab_rank(v, v->blob + o, len) != NO_RANK)
            return -EINVAL;
        if (len == 1)
            v->byte_rank[v->blob[o]] = v->ranks[e];
        uint32_t i = (uint32_t)XXH3_64bits(v->blob + o, len) & v->mask;
        while (v->slots[i])
            i = (i + 1) & v->mask;
        v->slots[i] = e + 1;
        v->max_len = MAX(v->max_len, len);
    }
    /* Byte-level BPE must be able to fall back to single bytes. */
    for (int b = 0; b < 256; b++)
        if (v->byte_rank[b] == NO_RANK)
            return -EINVAL;
    return 0;
}

static int vocab_compile(struct vocab *v, const char *pattern)
{
    int err;
    PCRE2_SIZE erroff;
    v->re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err,
                          &erroff, NULL);
    if (!v->re) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(err, msg, sizeof(msg));
        log_error("tokenizer pattern for %s: %s at %zu", v->file_name, (char *)msg, erroff);
        return -EINVAL;
    }
    if (pcre2_jit_compile(v->re, PCRE2_JIT_COMPLETE) != 0) {
        log_error("tokenizer pattern for %s: PCRE2 JIT unavailable", v->file_name);
        return -EINVAL;
    }
    v->md = pcre2_match_data_create_from_pattern(v->re, NULL);
    v->mctx = pcre2_match_context_create(NULL);
    /* Reserved, not touched: only backtracking over long runs uses it. */
    v->jit_stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, NULL);
    if (!v->md || !v->mctx || !v->jit_stack)
        return -ENOMEM;
    pcre2_jit_stack_assign(v->mctx, NULL, v->jit_stack);
    return 0;
}

static void vocab_free(struct vocab *v)
{
    pcre2_jit_stack_free(v->jit_stack);
    pcre2_match_context_free(v->mctx);
    pcre2_match_data_free(v->md);
    pcre2_code_free(v->re);
    free(v->slots);
    free(v->file);
    memset(v, 0, sizeof(*v));
}

int policy_tokens_load(struct policy_tokens **out, const char *dir)
{
    *out = NULL;
    if (!dir)
        dir = getenv("COSTROUTER_DATA");
    if (!dir || !*dir)
        dir = "./data/tokens";
    struct policy_tokens *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    int rc = 0;
    for (int i = 0; i < NENC; i++) {
        struct vocab *v = &t->v[i];
        char path[4096];
        size_t file_len = 0;
        v->file_name = encodings[i].file;
        if (snprintf(path, sizeof(path), "%s/%s", dir, v->file_name) >= (int)sizeof(path)) {
            rc = -ENAMETOOLONG;
            goto fail;
        }
        rc = read_file(path, &v->file, &file_len);
        if (rc < 0) {
            log_error("token table %s: %s", path, strerror(-rc));
            goto fail;
        }
        rc = vocab_index(v, file_len);
        if (rc < 0) {
            log_error("token table %s: %s", path, rc == -EINVAL ? "malformed" : strerror(-rc));
            goto fail;
        }
        rc = vocab_compile(v, encodings[i].pattern);
        if (rc < 0)
            goto fail;
    }
    *out = t;
    return 0;
fail:
    policy_tokens_free(t);
    return rc;
}

static void bpe_scratch_free(struct policy_tokens *t)
{
    free(t->next);
    free(t->prev);
    free(t->pair);
    free(t->heap);
    t->next = t->prev = t->pair = NULL;
    t->heap = NULL;
    t->bpe_cap = 0;
}

void policy_tokens_free(struct policy_tokens *t)
{
    if (!t)
        return;
    for (int i = 0; i < NENC; i++)
        vocab_free(&t->v[i]);
    bpe_scratch_free(t);
    free(t->text);
    buf_free(&t->line);
    free(t);
}

struct buf *policy__tokens_line(struct policy_tokens *t)
{
    buf_reset(&t->line);
    return &t->line;
}

/* ---- UTF-8 ---- */

/*
 * WHATWG "UTF-8 decode" over bytes. With out == NULL, returns len if `p`
 * is valid UTF-8 and SIZE_MAX otherwise. With out (room for 3 * len
 * bytes), writes the text with each maximal invalid subpart replaced by
 * U+FFFD (EF BF BD) and returns the bytes written.
 */
static size_t utf8_whatwg(const uint8_t *p, size_t len, uint8_t *out)
{
    size_t o = 0, seq = 0;
    unsigned need = 0, seen = 0;
    uint8_t lo = 0x80, hi = 0xBF;
#define REPLACE()                                                                                  \
    do {                                                                                           \
        if (!out)                                                                                  \
            return SIZE_MAX;                                                                       \
        memcpy(out + o, "\xEF\xBF\xBD", 3);                                                        \
        o += 3;                                                                                    \
    } while (0)
    for (size_t i = 0; i < len; i++) {
        uint8_t b = p[i];
        if (need == 0) {
            /* ASCII fast path, eight bytes at a time. */
            if (b < 0x80) {
                size_t j = i;
                while (j + 8 <= len) {
                    uint64_t w;
                    memcpy(&w, p + j, 8);
                    if (w & 0x8080808080808080ull)
                        break;
                    j += 8;
                }
                while (j < len && p[j] < 0x80)
                    j++;
                if (out)
                    memcpy(out + o, p + i, j - i);
                o += j - i;
                i = j - 1;
                continue;
            }
            seq = i;
            if (b >= 0xC2 && b <= 0xDF) {
                need = 1;
            } else if (b >= 0xE0 && b <= 0xEF) {
                lo = b == 0xE0 ? 0xA0 : 0x80;
                hi = b == 0xED ? 0x9F : 0xBF;
                need = 2;
            } else if (b >= 0xF0 && b <= 0xF4) {
                lo = b == 0xF0 ? 0x90 : 0x80;
                hi = b == 0xF4 ? 0x8F : 0xBF;
                need = 3;
            } else {
                REPLACE();
            }
            continue;
        }
        if (b < lo || b > hi) {
            /* The subpart so far is invalid; b starts afresh. */
            need = seen = 0;
            lo = 0x80;
            hi = 0xBF;
            REPLACE();
            i--;
            continue;
        }
        lo = 0x80;
        hi = 0xBF;
        if (++seen == need) {
            if (out)
                memcpy(out + o, p + seq, i + 1 - seq);
            o += i + 1 - seq;
            need = seen = 0;
        }
    }
    if (need)
        REPLACE();
#undef REPLACE
    return o;
}

/* `p` as valid UTF-8: itself, or a repaired copy in t->text. NULL: ENOMEM. */
static const uint8_t *valid_text(struct policy_tokens *t, const uint8_t *p, size_t *len)
{
    if (utf8_whatwg(p, *len, NULL) != SIZE_MAX)
        return p;
    if (*len > SIZE_MAX / 3 - 1)
        return NULL;
    size_t need = *len * 3 + 1;
    if (need > t->text_cap) {
        uint8_t *nt = realloc(t->text, need);
        if (!nt)
            return NULL;
        t->text = nt;
        t->text_cap = need;
    }
    *len = utf8_whatwg(p, *len, t->text);
    return t->text;
}

/* ---- BPE ---- */

static inline void sink_put(struct sink *s, uint32_t id)
{
    if (s->ids && (size_t)s->count < s->cap)
        s->ids[s->count] = id;
    s->count++;
}

/* tiktoken's byte_pair_merge for 2 <= n <= SMALL_PIECE. */
static void bpe_small(const struct vocab *v, const uint8_t *p, size_t n, struct sink *s)
{
    uint32_t st[SMALL_PIECE + 1], rk[SMALL_PIECE + 1];
    size_t m = n + 1; /* parts: start offsets, the last one is the end */
    for (size_t i = 0; i < n; i++) {
        st[i] = (uint32_t)i;
        rk[i] = i + 2 <= n ? vocab_rank(v, p + i, 2) : NO_RANK;
    }
    st[n] = (uint32_t)n;
    rk[n] = NO_RANK;
    for (;;) {
        uint32_t best = NO_RANK;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < m; i++)
            if (rk[i] < best) {
                best = rk[i];
                bi = i;
            }
        if (best == NO_RANK)
            break;
        /* Merge part bi+1 into bi, then re-rank the pairs at bi-1 and bi. */
        memmove(st + bi + 1, st + bi + 2, (m - bi - 2) * sizeof(*st));
        memmove(rk + bi + 1, rk + bi + 2, (m - bi - 2) * sizeof(*rk));
        m--;
        rk[bi] = bi + 2 < m ? vocab_rank(v, p + st[bi], st[bi + 2] - st[bi]) : NO_RANK;
        if (bi > 0)
            rk[bi - 1] = vocab_rank(v, p + st[bi - 1], st[bi + 1] - st[bi - 1]);
    }
    if (!s->ids) {
        s->count += (int64_t)(m - 1);
        return;
    }
    for (size_t i = 0; i + 1 < m; i++)
        sink_put(s, vocab_rank(v, p + st[i], st[i + 1] - st[i]));
}

static int bpe_reserve(struct policy_tokens *t, size_t n)
{
    if (n <= t->bpe_cap)
        return 0;
    bpe_scratch_free(t);
    t->next = malloc(n * sizeof(*t->next));
    t->prev = malloc(n * sizeof(*t->prev));
    t->pair = malloc(n * sizeof(*t->pair));
    t->heap = malloc(3 * n * sizeof(*t->heap));
    if (!t->next || !t->prev || !t->pair || !t->heap) {
        bpe_scratch_free(t);
        return -ENOMEM;
    }
    t->bpe_cap = n;
    return 0;
}

static inline void heap_push(uint64_t *h, size_t *len, uint64_t key)
{
    size_t i = (*len)++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (h[up] <= key)
            break;
        h[i] = h[up];
        i = up;
    }
    h[i] = key;
}

static inline void heap_sift_down(uint64_t *h, size_t len, size_t i)
{
    uint64_t key = h[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= len)
            break;
        if (c + 1 < len && h[c + 1] < h[c])
            c++;
        if (key <= h[c])
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = key;
}

/* Rank of the pair starting at part `i` (parts are linked by next[]). */
static inline uint32_t pair_rank(const struct vocab *v, const uint8_t *p, size_t n,
                                 const uint32_t *next, uint32_t i)
{
    uint32_t j = next[i];
    if (j >= n)
        return NO_RANK;
    uint32_t end = next[j];
    return vocab_rank(v, p + i, end - i);
}

/* The same merges as bpe_small, in O(n log n), for long pieces. */
static int bpe_large(struct policy_tokens *t, const struct vocab *v, const uint8_t *p, size_t n,
                     struct sink *s)
{
    if (n >= NO_RANK || bpe_reserve(t, n) < 0)
        return -ENOMEM;
    uint32_t *next = t->next, *prev = t->prev, *pair = t->pair;
    uint64_t *heap = t->heap;
    size_t hlen = 0, parts = n;
    for (uint32_t i = 0; i < n; i++) {
        next[i] = i + 1;
        prev[i] = i ? i - 1 : NO_RANK;
    }
    for (uint32_t i = 0; i < n; i++) {
        pair[i] = pair_rank(v, p, n, next, i);
        if (pair[i] != NO_RANK)
            heap[hlen++] = (uint64_t)pair[i] << 32 | i;
    }
    for (size_t i = hlen / 2; i-- > 0;)
        heap_sift_down(heap, hlen, i);
    while (hlen > 0) {
        uint64_t top = heap[0];
        heap[0] = heap[--hlen];
        heap_sift_down(heap, hlen, 0);
        uint32_t i = (uint32_t)top, r = (uint32_t)(top >> 32);
        if (pair[i] != r)
            continue; /* stale: the part died or its pair changed */
        uint32_t j = next[i];
        next[i] = next[j];
        if (next[j] < n)
            prev[next[j]] = i;
        pair[j] = NO_RANK;
        parts--;
        pair[i] = pair_rank(v, p, n, next, i);
        if (pair[i] != NO_RANK)
            heap_push(heap, &hlen, (uint64_t)pair[i] << 32 | i);
        uint32_t h = prev[i];
        if (h != NO_RANK) {
            pair[h] = pair_rank(v, p, n, next, h);
            if (pair[h] != NO_RANK)
                heap_push(heap, &hlen, (uint64_t)pair[h] << 32 | h);
        }
    }
    if (s->ids) {
        for (uint32_t i = 0; i < n; i = next[i])
            sink_put(s, vocab_rank(v, p + i, next[i] - i));
    } else {
        s->count += (int64_t)parts;
    }
    if (t->bpe_cap > SCRATCH_KEEP)
        bpe_scratch_free(t);
    return 0;
}

static int encode_piece(struct policy_tokens *t, const struct vocab *v, const uint8_t *p, size_t n,
                        struct sink *s)
{
    uint32_t r = vocab_rank(v, p, n);
    if (r != NO_RANK) {
        sink_put(s, r);
        return 0;
    }
    if (n <= SMALL_PIECE) {
        bpe_small(v, p, n, s);
        return 0;
    }
    return bpe_large(t, v, p, n, s);
}

int64_t policy_tokens_estimate(const char *p, size_t len)
{
    size_t ascii = 0;
    for (size_t i = 0; i < len; i++)
        ascii += (uint8_t)p[i] < 0x80;
    /* tenths of a token: 2.5 per ASCII byte, 4 per other byte */
    uint64_t tenths = (uint64_t)ascii * 25 / 10 + (uint64_t)(len - ascii) * 4;
    return (int64_t)((tenths + 9) / 10);
}

int64_t policy_tokens_encode(struct policy_tokens *t, enum conf_tokenizer enc, const char *p,
                             size_t len, uint32_t *ids, size_t cap)
{
    if (enc == CONF_TOK_ESTIMATE || enc > CONF_TOK_LLAMA3)
        return policy_tokens_estimate(p, len);
    if (len == 0)
        return 0;
    struct vocab *v = &t->v[enc - 1];
    const uint8_t *s = valid_text(t, (const uint8_t *)p, &len);
    if (!s)
        return -ENOMEM;
    struct sink sink = {ids, cap, 0};
    size_t off = 0;
    while (off < len) {
        int rc = pcre2_jit_match(v->re, s, len, off, 0, v->md, v->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return -ENOMEM; /* JIT stack exhausted: nothing else can fail here */
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(v->md);
        if (ov[1] <= ov[0]) { /* cannot happen with these patterns; never loop */
            off = ov[0] + 1;
            continue;
        }
        /* Like tiktoken's find_iter, text between matches is skipped. */
        if (encode_piece(t, v, s + ov[0], ov[1] - ov[0], &sink) < 0)
            return -ENOMEM;
        off = ov[1];
    }
    return sink.count;
}

int64_t policy_tokens_count(struct policy_tokens *t, enum conf_tokenizer enc, const char *p,
                            size_t len)
{
    return policy_tokens_encode(t, enc, p, len, NULL, 0);
}
