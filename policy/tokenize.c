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
 * that scan, on the stack. Long ones keep the parts in a linked list and
 * take pairs in exactly the scan's order, (rank, then position), from a
 * bucket queue: one list of positions per rank, drained lowest rank first
 * in position order. A merge only creates pairs with other ranks (the new
 * pair's bytes strictly contain the old pair's), so a bucket being drained
 * never grows; the rare new pair that ranks at or below the bucket being
 * drained goes to a small "urgent" heap that is merged in by key. Entries
 * made stale by a merge are skipped when met. A binary heap of all pairs
 * would do the same in O(n log n) but misses cache on every level; the
 * buckets are appended and read almost sequentially.
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
#include <sys/random.h>
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
/*
 * A direct-mapped cache of recent lookups of 2..8-byte strings, in front
 * of the vocabulary's table. That table (12 MB for o200k) misses the CPU
 * cache on nearly every probe once the proxy's other work has run, while
 * prompts keep asking for a few thousand common words and byte pairs; the
 * pair lookups of merging mostly find nothing, so misses (NO_RANK) are
 * kept too. For these lengths the key is the bytes themselves, so a hit
 * needs no compare. 64 KB per encoding.
 */
#define HOT_BITS 12
#define HOT_SLOTS (1u << HOT_BITS)
struct hot {
    uint64_t key;  /* token_key of the string */
    uint32_t len;  /* its length; 0: empty slot */
    uint32_t rank; /* its rank, or NO_RANK */
};

/*
 * Counts of recent strings of COUNTED_MIN bytes or more, by a seeded hash
 * of their bytes (policy_tokens_count_cached). Chat traffic sends the same
 * texts again and again: every request of an application carries its
 * system prompt, and every turn of a conversation resends the turns before
 * it, so the router counts mostly what it has counted already. Shorter
 * strings are cheaper to count than to hash and look up.
 */
#define COUNTED_BITS 12
#define COUNTED_SLOTS (1u << COUNTED_BITS)
#define COUNTED_MIN 64
struct counted {
    uint64_t hash;  /* XXH3 of the bytes, seeded with counted_seed */
    uint32_t len;   /* their length; 0: empty slot */
    uint32_t enc;   /* the encoding counted with */
    int64_t count;  /* the count */
};

/*
 * An encoding's split pattern, JIT-compiled twice. `one` finds the next
 * piece, one call a piece, as tiktoken's find_iter does. `run` walks the
 * text in one call: the pattern is wrapped as RUN_OPEN pattern RUN_CLOSE,
 * a possessive loop in which the atomic group takes the piece that a
 * search from that point would find (its first alternative that matches)
 * and the callout hands that piece to BPE. pcre2_jit_match sets up ~250
 * instructions' worth at every call, as much as a short piece costs to
 * match, so this halves the splitting of a prompt (bench/PROFILE.md,
 * sixth pass). The loop never gives a piece back, so each piece reported
 * is final, also when the call stops at PCRE2's match limit (a text of
 * megabytes): the next call goes on from the last piece. Where no
 * alternative matches, `one` searches on, skipping text as find_iter does
 * (none of these patterns leaves a character unmatched).
 */
#define RUN_OPEN "(?:(?>"
#define RUN_CLOSE ")(?C1))*+"
struct splitter {
    pcre2_code *one;
    pcre2_code *run;
};

struct vocab {
    const char *file_name;     /* e.g. "cl100k_base.tok" */
    uint8_t *file;             /* the whole file, owned; the arrays below point into it */
    uint32_t n;                /* number of tokens */
    const uint32_t *ranks;     /* rank of entry i */
    const uint32_t *offsets;   /* entry i is blob[offsets[i]..offsets[i+1]) */
    const uint8_t *blob;       /* token bytes */
    struct slot *slots;        /* open-addressing table, linear probing */
    struct hot *hot;           /* HOT_SLOTS recent short lookups in front of `slots` */
    uint32_t mask;             /* slot count - 1 (a power of two) */
    uint32_t max_len;          /* longest token, in bytes */
    uint32_t max_rank;         /* highest rank */
    uint32_t byte_rank[256];   /* rank of each single byte */
    struct splitter split[2];  /* [0] for any text, [1] for ASCII-only text */
    pcre2_match_data *md;      /* reused for every match */
    pcre2_match_context *mctx; /* carries jit_stack and the piece callout */
    pcre2_jit_stack *jit_stack; /* room for backtracking over long runs */
};

struct policy_tokens {
    struct vocab v[NENC];      /* indexed by conf_tokenizer - 1 */
    uint8_t *text;             /* scratch: input with invalid UTF-8 replaced */
    size_t text_cap;           /* bytes allocated at text */
    /* Scratch for long pieces (bpe_large), grown to the longest piece seen
     * and freed after use when above SCRATCH_KEEP. */
    struct part *part;         /* by byte position: the part starting there */
    struct bq_entry *pool;     /* bucket list entries; drained ones are reused */
    size_t pool_cap;           /* entries allocated at pool */
    uint32_t *sorted;          /* positions of an unsorted bucket being drained */
    size_t sorted_cap;         /* entries allocated at sorted */
    size_t bpe_cap;            /* piece bytes part can hold */
    uint64_t *urgent;          /* (rank << 32 | position) min-heap, see the top */
    size_t urgent_cap;         /* its allocated length */
    uint32_t *bhead;           /* per rank: first pool entry, NO_RANK if empty */
    uint32_t *btail;           /* per rank: last pool entry */
    uint8_t *bunsorted;        /* per rank: appended out of position order */
    struct counted *counted;   /* COUNTED_SLOTS counts of recent long strings */
    uint64_t counted_seed;     /* random per process: hashes cannot be aimed */
    uint32_t *rank_heap;       /* min-heap of ranks with a non-empty bucket */
    uint32_t nranks;           /* length of the per-rank arrays: max rank + 1 */
    struct buf line;           /* scratch for policy__tokens_line */
    char *dir;                 /* where the .tok files are, for policy_tokens_add */
};

/*
 * One hash table slot. Tokens of up to 8 bytes are keyed by the bytes
 * themselves, so looking them up never touches the blob.
 */
struct slot {
    uint64_t key; /* bytes packed little-endian (len <= 8), else a 64-bit hash */
    uint32_t len; /* token length, 0 = empty slot */
    uint32_t rank; /* the token's rank */
    uint32_t entry; /* its index in the file arrays, to compare long tokens */
};

/* A part of a long piece being merged, indexed by its first byte. */
struct part {
    uint32_t next; /* start of the next part (the piece length for the last) */
    uint32_t prev; /* start of the previous part, NO_RANK for the first */
    uint32_t pair; /* rank of this part + the next, NO_RANK if none or dead */
};

/* One position in a rank's bucket list. */
struct bq_entry {
    uint32_t pos;  /* part start whose pair has this rank */
    uint32_t next; /* next entry of the same bucket, NO_RANK at the end */
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

/*
 * The same patterns for text that is all ASCII, where each Unicode class
 * is an ASCII range: \p{L} is A-Za-z, \p{Lu} A-Z, \p{Ll} a-z, \p{N} 0-9,
 * Lt, Lm, Lo and M hold no ASCII character, and the white space is \t-\r
 * and the space. Compiled without UTF and UCP, PCRE2 tests a character
 * against a bitmap instead of looking its properties up, which makes
 * splitting several times faster (bench/PROFILE.md, sixth pass). Most
 * prompts are ASCII. tests/policy/test_tokenize.c checks that both
 * patterns split random ASCII text alike.
 */
#define WS_A "\\t-\\r "
#define L_A "A-Za-z"
static const char pat_cl100k_ascii[] =
    CONTRACTION "|[^\\r\\n" L_A "0-9]?[" L_A "]+|[0-9]{1,3}| ?[^" WS_A L_A "0-9]+[\\r\\n]*"
    "|[" WS_A "]*[\\r\\n]+|[" WS_A "]+(?![^" WS_A "])|[" WS_A "]+";
static const char pat_o200k_ascii[] =
    "[^\\r\\n" L_A "0-9]?[A-Z]*[a-z]+" CONTRACTION "?"
    "|[^\\r\\n" L_A "0-9]?[A-Z]+[a-z]*" CONTRACTION "?"
    "|[0-9]{1,3}| ?[^" WS_A L_A "0-9]+[\\r\\n/]*|[" WS_A "]*[\\r\\n]+|[" WS_A "]+(?![^" WS_A "])|[" WS_A "]+";

static const struct {
    const char *file;          /* file name under the data dir */
    const char *pattern;       /* split regex */
    const char *pattern_ascii; /* the same for ASCII-only text */
} encodings[NENC] = {
    {"cl100k_base.tok", pat_cl100k, pat_cl100k_ascii},
    {"o200k_base.tok", pat_o200k, pat_o200k_ascii},
    {"llama3.tok", pat_cl100k, pat_cl100k_ascii},
};

/* The bytes of a 1..8 byte string as an integer (overlapping loads). */
static inline uint64_t pack_short(const uint8_t *p, size_t len)
{
    if (len >= 4) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + len - 4, 4);
        return (uint64_t)lo | (uint64_t)hi << (8 * (len - 4));
    }
    return (uint64_t)p[0] | (uint64_t)p[len / 2] << (8 * (len / 2)) |
           (uint64_t)p[len - 1] << (8 * (len - 1));
}

static inline uint64_t token_key(const uint8_t *p, size_t len)
{
    return len <= 8 ? pack_short(p, len) : XXH3_64bits(p, len);
}

static inline uint32_t slot_of(const struct vocab *v, uint64_t key, size_t len)
{
    uint64_t h = (key ^ len) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32) & v->mask;
}

static inline uint32_t table_rank(const struct vocab *v, const uint8_t *p, size_t len,
                                  uint64_t key)
{
    for (uint32_t i = slot_of(v, key, len);; i = (i + 1) & v->mask) {
        const struct slot *sl = &v->slots[i];
        if (sl->len == 0)
            return NO_RANK;
        if (sl->key == key && sl->len == len &&
            (len <= 8 || memcmp(v->blob + v->offsets[sl->entry], p, len) == 0))
            return sl->rank;
    }
}

static inline uint32_t vocab_rank(const struct vocab *v, const uint8_t *p, size_t len)
{
    if (len > v->max_len)
        return NO_RANK;
    if (len == 1)
        return v->byte_rank[p[0]];
    uint64_t key = token_key(p, len);
    if (len > 8 || !v->hot)
        return table_rank(v, p, len, key);
    struct hot *h = &v->hot[((key ^ len) * 0xC2B2AE3D27D4EB4Full) >> (64 - HOT_BITS)];
    if (h->key == key && h->len == len)
        return h->rank;
    uint32_t rank = table_rank(v, p, len, key);
    *h = (struct hot){key, (uint32_t)len, rank};
    return rank;
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
        uint64_t key = token_key(v->blob + o, len);
        uint32_t i = slot_of(v, key, len);
        while (v->slots[i].len)
            i = (i + 1) & v->mask;
        v->slots[i] = (struct slot){key, len, v->ranks[e], e};
        v->max_len = MAX(v->max_len, len);
        v->max_rank = MAX(v->max_rank, v->ranks[e]);
    }
    /* Byte-level BPE must be able to fall back to single bytes. */
    for (int b = 0; b < 256; b++)
        if (v->byte_rank[b] == NO_RANK)
            return -EINVAL;
    return 0;
}

static pcre2_code *compile_split(const struct vocab *v, const char *pattern, uint32_t options)
{
    int err;
    PCRE2_SIZE erroff;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, options, &err,
                                   &erroff, NULL);
    if (!re) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(err, msg, sizeof(msg));
        log_error("tokenizer pattern for %s: %s at %zu", v->file_name, (char *)msg, erroff);
        return NULL;
    }
    if (pcre2_jit_compile(re, PCRE2_JIT_COMPLETE) != 0) {
        log_error("tokenizer pattern for %s: PCRE2 JIT unavailable", v->file_name);
        pcre2_code_free(re);
        return NULL;
    }
    return re;
}

static int splitter_compile(const struct vocab *v, struct splitter *sp, const char *pattern,
                            uint32_t options)
{
    char run[1024];

    if (snprintf(run, sizeof(run), RUN_OPEN "%s" RUN_CLOSE, pattern) >= (int)sizeof(run))
        return -EINVAL;
    sp->one = compile_split(v, pattern, options);
    sp->run = compile_split(v, run, options);
    return sp->one && sp->run ? 0 : -EINVAL;
}

static void splitter_free(struct splitter *sp)
{
    pcre2_code_free(sp->one);
    pcre2_code_free(sp->run);
}

static int vocab_compile(struct vocab *v, const char *pattern, const char *pattern_ascii)
{
    if (splitter_compile(v, &v->split[0], pattern, PCRE2_UTF | PCRE2_UCP) != 0 ||
        splitter_compile(v, &v->split[1], pattern_ascii, 0) != 0)
        return -EINVAL;
    /* The patterns have no groups: one match data serves them all. */
    v->md = pcre2_match_data_create_from_pattern(v->split[0].one, NULL);
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
    splitter_free(&v->split[0]);
    splitter_free(&v->split[1]);
    free(v->hot);
    free(v->slots);
    free(v->file);
    memset(v, 0, sizeof(*v));
}

/* Read, index and compile encoding `i` into t->v[i]; on failure t->v[i]
 * is left empty. */
static int vocab_load(struct policy_tokens *t, int i)
{
    struct vocab *v = &t->v[i];
    char path[4096];
    size_t file_len = 0;
    int rc;

    v->file_name = encodings[i].file;
    if (snprintf(path, sizeof(path), "%s/%s", t->dir, v->file_name) >= (int)sizeof(path))
        return -ENAMETOOLONG;
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
    /* after indexing, which looks every token up once */
    v->hot = calloc(HOT_SLOTS, sizeof(*v->hot));
    rc = v->hot ? vocab_compile(v, encodings[i].pattern, encodings[i].pattern_ascii) : -ENOMEM;
    if (rc == 0)
        return 0;
fail:
    vocab_free(v);
    return rc;
}

int policy_tokens_load(struct policy_tokens **out, const char *dir)
{
    return policy_tokens_load_some(out, dir, POLICY_TOKENS_ALL);
}

int policy_tokens_load_some(struct policy_tokens **out, const char *dir, unsigned need)
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
    t->dir = strdup(dir);
    t->counted = calloc(COUNTED_SLOTS, sizeof(*t->counted));
    if (!t->dir || !t->counted) {
        rc = -ENOMEM;
        goto fail;
    }
    /* Unpredictable, but a poor seed only weakens that: no failure here. */
    if (getrandom(&t->counted_seed, sizeof(t->counted_seed), GRND_NONBLOCK) != sizeof(t->counted_seed))
        t->counted_seed = XXH3_64bits(&t, sizeof(t)) ^ (uint64_t)getpid();
    rc = policy_tokens_add(t, need);
    if (rc < 0)
        goto fail;
    *out = t;
    return 0;
fail:
    policy_tokens_free(t);
    return rc;
}

int policy_tokens_add(struct policy_tokens *t, unsigned need)
{
    int first = 0;

    /* Each table apart: one missing keeps out its own encoding only. */
    for (int i = 0; i < NENC; i++) {
        if (!(need & (1u << (i + 1))) || t->v[i].file != NULL)
            continue;
        int rc = vocab_load(t, i);
        if (rc < 0 && first == 0)
            first = rc;
    }
    return first;
}

const char *policy_tokens_file(enum conf_tokenizer enc)
{
    return enc >= CONF_TOK_CL100K && enc <= CONF_TOK_LLAMA3 ? encodings[enc - 1].file : NULL;
}

int policy_tokens_has(const struct policy_tokens *t, enum conf_tokenizer enc)
{
    return enc == CONF_TOK_ESTIMATE ||
           (t != NULL && enc <= CONF_TOK_LLAMA3 && t->v[enc - 1].file != NULL);
}

static void bpe_scratch_free(struct policy_tokens *t)
{
    free(t->part);
    free(t->pool);
    free(t->sorted);
    free(t->urgent);
    free(t->bhead);
    free(t->btail);
    free(t->bunsorted);
    free(t->rank_heap);
    t->part = NULL;
    t->sorted = t->bhead = t->btail = t->rank_heap = NULL;
    t->pool = NULL;
    t->urgent = NULL;
    t->bunsorted = NULL;
    t->bpe_cap = t->urgent_cap = t->pool_cap = t->sorted_cap = 0;
    t->nranks = 0;
}

void policy_tokens_free(struct policy_tokens *t)
{
    if (!t)
        return;
    for (int i = 0; i < NENC; i++)
        vocab_free(&t->v[i]);
    bpe_scratch_free(t);
    free(t->counted);
    free(t->text);
    free(t->dir);
    buf_free(&t->line);
    free(t);
}

struct buf *policy__tokens_line(struct policy_tokens *t)
{
    buf_reset(&t->line);
    return &t->line;
}

/* ---- UTF-8 ---- */

/* How many bytes from p on are ASCII, eight at a time. */
static size_t ascii_run(const uint8_t *p, size_t len)
{
    size_t j = 0;
    while (j + 8 <= len) {
        uint64_t w;
        memcpy(&w, p + j, 8);
        if (w & 0x8080808080808080ull)
            break;
        j += 8;
    }
    while (j < len && p[j] < 0x80)
        j++;
    return j;
}

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
                size_t j = i + ascii_run(p + i, len - i);
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

static int bpe_reserve(struct policy_tokens *t, size_t n, uint32_t nranks)
{
    if (n <= t->bpe_cap && nranks <= t->nranks)
        return 0;
    bpe_scratch_free(t);
    t->part = malloc(n * sizeof(*t->part));
    t->pool_cap = n + 1024;
    t->pool = malloc(t->pool_cap * sizeof(*t->pool));
    t->sorted_cap = 1024;
    t->sorted = malloc(t->sorted_cap * sizeof(*t->sorted));
    t->urgent_cap = 1024;
    t->urgent = malloc(t->urgent_cap * sizeof(*t->urgent));
    t->bhead = malloc(nranks * sizeof(*t->bhead));
    t->btail = malloc(nranks * sizeof(*t->btail));
    t->bunsorted = calloc(nranks, 1);
    t->rank_heap = malloc(nranks * sizeof(*t->rank_heap));
    if (!t->part || !t->pool || !t->sorted || !t->urgent || !t->bhead ||
        !t->btail || !t->bunsorted || !t->rank_heap) {
        bpe_scratch_free(t);
        return -ENOMEM;
    }
    memset(t->bhead, 0xff, nranks * sizeof(*t->bhead));
    t->bpe_cap = n;
    t->nranks = nranks;
    return 0;
}

/*
 * PREFIX_push and PREFIX_pop: a binary min-heap over an array of TYPE.
 * Two are needed: the urgent (rank << 32 | position) keys, and the ranks
 * whose bucket is not empty.
 */
#define MIN_HEAP(prefix, type)                                                                 \
    static inline void prefix##_push(type *h, size_t *len, type key)                           \
    {                                                                                          \
        size_t i = (*len)++;                                                                   \
        while (i > 0 && h[(i - 1) / 2] > key) {                                                \
            h[i] = h[(i - 1) / 2];                                                             \
            i = (i - 1) / 2;                                                                   \
        }                                                                                      \
        h[i] = key;                                                                            \
    }                                                                                          \
                                                                                               \
    static inline type prefix##_pop(type *h, size_t *len)                                     \
    {                                                                                          \
        type top = h[0], key = h[--*len];                                                      \
        size_t i = 0, n = *len;                                                                \
        for (;;) {                                                                             \
            size_t c = 2 * i + 1;                                                              \
            if (c >= n)                                                                        \
                break;                                                                         \
            if (c + 1 < n && h[c + 1] < h[c])                                                  \
                c++;                                                                           \
            if (key <= h[c])                                                                   \
                break;                                                                         \
            h[i] = h[c];                                                                       \
            i = c;                                                                             \
        }                                                                                      \
        if (n)                                                                                 \
            h[i] = key;                                                                        \
        return top;                                                                            \
    }

MIN_HEAP(heap, uint64_t)
MIN_HEAP(rank, uint32_t)

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Rank of the pair starting at part `i`. */
static inline uint32_t pair_rank(const struct vocab *v, const uint8_t *p, size_t n,
                                 const struct part *pt, uint32_t i)
{
    uint32_t j = pt[i].next;
    if (j >= n)
        return NO_RANK;
    return vocab_rank(v, p + i, pt[j].next - i);
}

/* Make room for `want` elements of `size` bytes at *arr (doubling). */
static int grow(void *arr, size_t *cap, size_t want, size_t size)
{
    if (want <= *cap)
        return 0;
    size_t ncap = *cap * 2 > want ? *cap * 2 : want;
    void *na = realloc(*(void **)arr, ncap * size);
    if (!na)
        return -ENOMEM;
    *(void **)arr = na;
    *cap = ncap;
    return 0;
}

/* State of one bpe_large run. */
struct bq {
    struct policy_tokens *t; /* owner of the arrays */
    size_t pool_len;         /* pool entries ever used */
    uint32_t free_head;      /* first reusable entry, NO_RANK if none */
    size_t nrank_heap;       /* ranks in rank_heap */
    size_t nurgent;          /* entries in urgent */
    uint32_t cur;            /* rank of the bucket being drained, NO_RANK before the first */
    uint32_t cur_head;       /* its list, handed to the free list when done */
    uint32_t cur_tail;       /* last entry of that list */
};

/* File the pair (rank r, part pos) where it will be taken in order. */
static int bq_add(struct bq *q, uint32_t r, uint32_t pos)
{
    struct policy_tokens *t = q->t;
    if (q->cur != NO_RANK && r <= q->cur) {
        if (grow(&t->urgent, &t->urgent_cap, q->nurgent + 1, sizeof(*t->urgent)) < 0)
            return -ENOMEM;
        heap_push(t->urgent, &q->nurgent, (uint64_t)r << 32 | pos);
        return 0;
    }
    uint32_t e = q->free_head;
    if (e != NO_RANK) {
        q->free_head = t->pool[e].next;
    } else {
        if (grow(&t->pool, &t->pool_cap, q->pool_len + 1, sizeof(*t->pool)) < 0)
            return -ENOMEM;
        e = (uint32_t)q->pool_len++;
    }
    t->pool[e].pos = pos;
    t->pool[e].next = NO_RANK;
    if (t->bhead[r] == NO_RANK) {
        t->bhead[r] = e;
        rank_push(t->rank_heap, &q->nrank_heap, r);
    } else {
        if (t->pool[t->btail[r]].pos > pos)
            t->bunsorted[r] = 1;
        t->pool[t->btail[r]].next = e;
    }
    t->btail[r] = e;
    return 0;
}

/* The same merges as bpe_small, in about O(n log n), for long pieces. */
static int bpe_large(struct policy_tokens *t, const struct vocab *v, const uint8_t *p, size_t n,
                     struct sink *s)
{
    if (n >= NO_RANK / 4 || bpe_reserve(t, n, v->max_rank + 1) < 0)
        return -ENOMEM;
    struct part *pt = t->part;
    struct bq q = {.t = t, .free_head = NO_RANK, .cur = NO_RANK, .cur_head = NO_RANK};
    /* The bucket being drained: a sorted array, or its list read in place. */
    const uint32_t *sorted = NULL;
    uint32_t walk = NO_RANK;
    size_t parts = n, nsorted = 0, k = 0;
    int rc = 0;
    for (uint32_t i = 0; i < n; i++) {
        pt[i].next = i + 1;
        pt[i].prev = i ? i - 1 : NO_RANK;
    }
    for (uint32_t i = 0; i < n; i++) {
        pt[i].pair = pair_rank(v, p, n, pt, i);
        if (pt[i].pair != NO_RANK && (rc = bq_add(&q, pt[i].pair, i)) < 0)
            goto out;
    }
    for (;;) {
        uint32_t i, r, have = 0, pos = 0;
        if (sorted && k < nsorted) {
            have = 1;
            pos = sorted[k];
        } else if (walk != NO_RANK) {
            have = 1;
            pos = t->pool[walk].pos;
        }
        if (have && (q.nurgent == 0 || ((uint64_t)q.cur << 32 | pos) < t->urgent[0])) {
            r = q.cur;
            i = pos;
            if (sorted)
                k++;
            else
                walk = t->pool[walk].next;
        } else if (q.nurgent > 0) {
            uint64_t top = heap_pop(t->urgent, &q.nurgent);
            r = (uint32_t)(top >> 32);
            i = (uint32_t)top;
        } else if (q.nrank_heap > 0) {
            /* The previous bucket's entries can be reused now. */
            if (q.cur != NO_RANK && q.cur_head != NO_RANK) {
                t->pool[q.cur_tail].next = q.free_head;
                q.free_head = q.cur_head;
            }
            /* Next bucket: taken in position order, sorting if needed. */
            q.cur = rank_pop(t->rank_heap, &q.nrank_heap);
            q.cur_head = t->bhead[q.cur];
            q.cur_tail = t->btail[q.cur];
            sorted = NULL;
            walk = q.cur_head;
            if (t->bunsorted[q.cur]) {
                nsorted = k = 0;
                for (uint32_t e = q.cur_head; e != NO_RANK; e = t->pool[e].next) {
                    if ((rc = grow(&t->sorted, &t->sorted_cap, nsorted + 1, sizeof(*t->sorted))) < 0)
                        goto out;
                    t->sorted[nsorted++] = t->pool[e].pos;
                }
                qsort(t->sorted, nsorted, sizeof(*t->sorted), cmp_u32);
                sorted = t->sorted;
                walk = NO_RANK;
            }
            t->bhead[q.cur] = NO_RANK;
            t->bunsorted[q.cur] = 0;
            continue;
        } else {
            break;
        }
        if (pt[i].pair != r)
            continue; /* stale: the part died or its pair changed */
        uint32_t j = pt[i].next;
        pt[i].next = pt[j].next;
        if (pt[j].next < n)
            pt[pt[j].next].prev = i;
        pt[j].pair = NO_RANK;
        parts--;
        pt[i].pair = pair_rank(v, p, n, pt, i);
        if (pt[i].pair != NO_RANK && (rc = bq_add(&q, pt[i].pair, i)) < 0)
            goto out;
        uint32_t h = pt[i].prev;
        if (h != NO_RANK) {
            pt[h].pair = pair_rank(v, p, n, pt, h);
            if (pt[h].pair != NO_RANK && (rc = bq_add(&q, pt[h].pair, h)) < 0)
                goto out;
        }
    }
out:
    if (rc < 0) {
        /* Leave the buckets empty for the next run. */
        bpe_scratch_free(t);
        return rc;
    }
    if (s->ids) {
        for (uint32_t i = 0; i < n; i = pt[i].next)
            sink_put(s, vocab_rank(v, p + i, pt[i].next - i));
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

/* Where the run pattern's callout is: the text, and the end of the last
 * piece reported. */
struct walk {
    struct policy_tokens *t;
    const struct vocab *v;
    const uint8_t *s;
    size_t at;
    struct sink *sink;
};

static int on_piece(pcre2_callout_block *b, void *arg)
{
    struct walk *w = arg;
    size_t end = b->current_position;

    if (encode_piece(w->t, w->v, w->s + w->at, end - w->at, w->sink) < 0)
        return PCRE2_ERROR_NOMEMORY; /* abandons the match with this code */
    w->at = end;
    return 0;
}

/* Split s[0..len) with `sp` (one of v's) into pieces and encode each
 * into `sink`; see struct splitter. -ENOMEM: no memory for BPE or no JIT
 * stack left. */
static int split_encode(struct policy_tokens *t, struct vocab *v, const struct splitter *sp,
                        const uint8_t *s, size_t len, struct sink *sink)
{
    struct walk w = {t, v, s, 0, sink};

    pcre2_set_callout(v->mctx, on_piece, &w);
    while (w.at < len) {
        size_t from = w.at;
        int rc = pcre2_jit_match(sp->run, s, len, from, 0, v->md, v->mctx);
        if (rc == PCRE2_ERROR_NOMEMORY)
            return -ENOMEM;
        if (w.at > from)
            continue; /* done, or stopped at the match limit: go on from the last piece */
        /* Nothing matched at `from`: search on for the next piece. */
        rc = pcre2_jit_match(sp->one, s, len, from, 0, v->md, v->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return -ENOMEM; /* JIT stack exhausted: nothing else can fail here */
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(v->md);
        if (ov[1] <= ov[0]) { /* cannot happen with these patterns; never loop */
            w.at = ov[0] + 1;
            continue;
        }
        if (encode_piece(t, v, s + ov[0], ov[1] - ov[0], sink) < 0)
            return -ENOMEM;
        w.at = ov[1];
    }
    return 0;
}

int64_t policy_tokens_encode(struct policy_tokens *t, enum conf_tokenizer enc, const char *p,
                             size_t len, uint32_t *ids, size_t cap)
{
    if (enc == CONF_TOK_ESTIMATE || enc > CONF_TOK_LLAMA3)
        return policy_tokens_estimate(p, len);
    if (len == 0)
        return 0;
    struct vocab *v = &t->v[enc - 1];
    if (v->file == NULL)
        return -ENOENT; /* not loaded: see policy_tokens_has */
    const uint8_t *s = valid_text(t, (const uint8_t *)p, &len);
    if (!s)
        return -ENOMEM;
    struct sink sink = {ids, cap, 0};
    if (split_encode(t, v, &v->split[ascii_run(s, len) == len], s, len, &sink) < 0)
        return -ENOMEM;
    return sink.count;
}

int64_t policy_tokens_count(struct policy_tokens *t, enum conf_tokenizer enc, const char *p,
                            size_t len)
{
    return policy_tokens_encode(t, enc, p, len, NULL, 0);
}

int64_t policy_tokens_count_cached(struct policy_tokens *t, enum conf_tokenizer enc,
                                   const char *p, size_t len)
{
    if (len < COUNTED_MIN || len > UINT32_MAX || enc == CONF_TOK_ESTIMATE)
        return policy_tokens_count(t, enc, p, len);
    uint64_t h = XXH3_64bits_withSeed(p, len, t->counted_seed);
    struct counted *c = &t->counted[h >> (64 - COUNTED_BITS)];
    if (c->hash == h && c->len == len && c->enc == (uint32_t)enc)
        return c->count;
    int64_t n = policy_tokens_count(t, enc, p, len);
    if (n >= 0)
        *c = (struct counted){h, (uint32_t)len, (uint32_t)enc, n};
    return n;
}
