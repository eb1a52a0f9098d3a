/*
 * tests/policy/test_tokenize.c: exact counts against the reference
 * tokenizers, on the corpus tests/policy/tokens_expected.mjs generates
 * (English, code, JSON, CJK, emoji, RTL, whitespace runs, long pieces,
 * invalid UTF-8). Token ids are compared through an FNV-1a hash, so a
 * match means the same ids in the same order, not just the same count.
 */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/policy/tokens_fixture.h"

static uint32_t fnv_ids(const uint32_t *ids, size_t n)
{
    uint32_t h = 0x811c9dc5u;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) {
            h ^= (ids[i] >> (8 * k)) & 0xff;
            h *= 0x01000193u;
        }
    return h;
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s: %s (run `make data`)", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    cr_assert_eq(fread(p, 1, (size_t)n, f), (size_t)n);
    p[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return p;
}

/* The corpus (length in *len) and its expected.tsv (in *tsv), from make data. */
static char *load_corpus(size_t *len, char **tsv)
{
    char path[4096];
    size_t tsv_len;
    snprintf(path, sizeof(path), "%s/build/tokens-test/expected.tsv", fixture_src());
    *tsv = slurp(path, &tsv_len);
    snprintf(path, sizeof(path), "%s/build/tokens-test/corpus.bin", fixture_src());
    return slurp(path, len);
}

Test(tokenize, corpus_matches_reference_ids, .timeout = 120)
{
    size_t corpus_len;
    char *tsv, *corpus = load_corpus(&corpus_len, &tsv);
    struct policy_tokens *t = fixture_tokens();
    static const enum conf_tokenizer encs[3] = {CONF_TOK_CL100K, CONF_TOK_O200K, CONF_TOK_LLAMA3};
    static const char *names[3] = {"cl100k_base", "o200k_base", "llama3"};
    size_t cap = 1 << 20, samples = 0, compared = 0, bad = 0;
    uint32_t *ids = malloc(cap * sizeof(*ids));
    char *save = NULL;
    for (char *line = strtok_r(tsv, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char name[256];
        unsigned long off, len, count[3], hash[3];
        int jsdiv;
        int got = sscanf(line, "%255s %lu %lu %d %lu %lu %lu %lu %lu %lu", name, &off, &len, &jsdiv,
                         &count[0], &hash[0], &count[1], &hash[1], &count[2], &hash[2]);
        cr_assert_eq(got, 10, "expected.tsv: bad line %s", line);
        cr_assert_leq(off + len, corpus_len);
        samples++;
        for (int e = 0; e < 3; e++) {
            /* llama3-tokenizer-js splits with JavaScript's \s (see the .mjs). */
            if (e == 2 && jsdiv)
                continue;
            int64_t n = policy_tokens_encode(t, encs[e], corpus + off, len, ids, cap);
            compared++;
            if (n != (int64_t)count[e] || fnv_ids(ids, (size_t)n) != hash[e]) {
                if (bad++ < 20)
                    cr_log_error("%s on %s: %lld tokens, reference %lu%s", names[e], name,
                                 (long long)n, count[e],
                                 n == (int64_t)count[e] ? " (same count, other ids)" : "");
            }
        }
    }
    cr_expect_eq(bad, 0, "%zu of %zu comparisons differ", bad, compared);
    cr_expect_gt(samples, 4000, "corpus too small: %zu samples", samples);
    free(ids);
    free(tsv);
    free(corpus);
    policy_tokens_free(t);
}

Test(tokenize, special_tokens_are_plain_text, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    uint32_t ids[32];
    int64_t n = policy_tokens_encode(t, CONF_TOK_CL100K, "<|endoftext|>", 13, ids, 32);
    cr_assert_gt(n, 1);
    for (int64_t i = 0; i < n; i++)
        cr_assert_neq(ids[i], 100257, "<|endoftext|> became the special token");
    n = policy_tokens_encode(t, CONF_TOK_O200K, "<|endoftext|>", 13, ids, 32);
    for (int64_t i = 0; i < n; i++)
        cr_assert_neq(ids[i], 199999);
    policy_tokens_free(t);
}

Test(tokenize, invalid_utf8_counts_as_replacement_char, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    static const char bad[] = "caf\xc3 \xff\xfe ok \xed\xa0\x80!";
    static const char fixed[] = "caf\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd ok "
                                "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd!";
    for (int e = CONF_TOK_CL100K; e <= CONF_TOK_LLAMA3; e++) {
        uint32_t a[64], b[64];
        int64_t na = policy_tokens_encode(t, e, bad, sizeof(bad) - 1, a, 64);
        int64_t nb = policy_tokens_encode(t, e, fixed, sizeof(fixed) - 1, b, 64);
        cr_assert_eq(na, nb, "encoding %d: %lld vs %lld", e, (long long)na, (long long)nb);
        cr_assert_arr_eq(a, b, (size_t)na * sizeof(*a));
    }
    policy_tokens_free(t);
}

Test(tokenize, long_runs_use_heap_merge_and_agree, .timeout = 60)
{
    /* The heap merge (pieces > 64 bytes) must give what repeated short
     * merges give: a run of n letters and the same run counted in one go. */
    struct policy_tokens *t = fixture_tokens();
    size_t n = 1 << 20;
    char *s = malloc(n);
    memset(s, 'a', n);
    int64_t all = policy_tokens_count(t, CONF_TOK_CL100K, s, n);
    cr_assert_gt(all, 0);
    cr_assert_lt(all, (int64_t)n / 2, "1 MB of 'a' should merge well below one token per byte");
    memset(s, ' ', n);
    cr_assert_gt(policy_tokens_count(t, CONF_TOK_O200K, s, n), 0);
    memset(s, '\n', n);
    cr_assert_gt(policy_tokens_count(t, CONF_TOK_LLAMA3, s, n), 0);
    free(s);
    policy_tokens_free(t);
}

/* A text of millions of pieces: one PCRE2 call walking it stops at the
 * match limit (10 million steps) and the next goes on from the last piece,
 * so no piece is lost or counted twice. " a" is one token in every
 * encoding; the text starts with "a" (ASCII-only text) or "\xc3\xa9" (any
 * text), so both of an encoding's patterns are walked. */
Test(tokenize, texts_of_millions_of_pieces_count_every_piece_once, .timeout = 60)
{
    struct policy_tokens *t = fixture_tokens();
    size_t pairs = 4u << 20, n = 2 + 2 * pairs;
    char *s = malloc(n);
    static const enum conf_tokenizer encs[] = {CONF_TOK_CL100K, CONF_TOK_O200K, CONF_TOK_LLAMA3};

    for (size_t i = 0; i < pairs; i++)
        memcpy(s + 2 + 2 * i, " a", 2);
    for (size_t e = 0; e < 3; e++) {
        int64_t one = policy_tokens_count(t, encs[e], " a", 2);
        int64_t head = policy_tokens_count(t, encs[e], "\xc3\xa9", 2);
        cr_assert_eq(one, 1);
        memcpy(s, "\xc3\xa9", 2);
        cr_assert_eq(policy_tokens_count(t, encs[e], s, n), head + (int64_t)pairs);
        s[0] = ' ';
        s[1] = 'a';
        cr_assert_eq(policy_tokens_count(t, encs[e], s, n), 1 + (int64_t)pairs);
    }
    free(s);
    policy_tokens_free(t);
}

Test(tokenize, empty_and_estimate, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    cr_assert_eq(policy_tokens_count(t, CONF_TOK_O200K, NULL, 0), 0);
    cr_assert_eq(policy_tokens_count(t, CONF_TOK_ESTIMATE, "abcdefgh", 8), 2);
    /* 2.5 tenths per ASCII byte, 4 per other byte: 3 CJK chars = 9 bytes -> 3.6 -> 4 */
    cr_assert_eq(policy_tokens_estimate("\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", 9), 4);
    cr_assert_eq(policy_tokens_estimate("a", 1), 1);
    policy_tokens_free(t);
}

/* A router loads only the tables its config names, and a reload adds
 * one: counts with it are then the same as with everything loaded. */
Test(tokenize, load_some_then_add, .timeout = 20)
{
    static const char text[] = "Summarise the quarterly GPU spend per team, in euros.";
    struct policy_tokens *all = fixture_tokens(), *t = NULL;
    char dir[4096];

    snprintf(dir, sizeof(dir), "%s/data/tokens", fixture_src());
    cr_assert_eq(policy_tokens_load_some(&t, dir, 1u << CONF_TOK_O200K), 0);
    cr_assert(policy_tokens_has(t, CONF_TOK_O200K));
    cr_assert(policy_tokens_has(t, CONF_TOK_ESTIMATE));
    cr_assert_not(policy_tokens_has(t, CONF_TOK_CL100K));
    cr_assert_not(policy_tokens_has(t, CONF_TOK_LLAMA3));
    cr_assert_not(policy_tokens_has(NULL, CONF_TOK_O200K));
    cr_assert_eq(policy_tokens_count(t, CONF_TOK_O200K, text, strlen(text)),
                 policy_tokens_count(all, CONF_TOK_O200K, text, strlen(text)));
    cr_assert_eq(policy_tokens_count(t, CONF_TOK_CL100K, text, strlen(text)), -ENOENT);
    cr_assert_eq(policy_tokens_count_cached(t, CONF_TOK_LLAMA3, text, strlen(text)), -ENOENT);

    cr_assert_eq(policy_tokens_add(t, (1u << CONF_TOK_CL100K) | (1u << CONF_TOK_O200K)), 0);
    cr_assert(policy_tokens_has(t, CONF_TOK_CL100K));
    cr_assert_not(policy_tokens_has(t, CONF_TOK_LLAMA3));
    cr_assert_gt(policy_tokens_count(t, CONF_TOK_CL100K, text, strlen(text)), 0);
    cr_assert_eq(policy_tokens_count(t, CONF_TOK_CL100K, text, strlen(text)),
                 policy_tokens_count(all, CONF_TOK_CL100K, text, strlen(text)));
    policy_tokens_free(t);
    policy_tokens_free(all);
}

/* A table missing from the folder keeps out only its own encoding: the
 * others asked for with it load (the first error is returned), so a
 * router lacking one counts exactly with the rest. The first missing one
 * stopped the load: cl100k_base.tok absent, o200k was never tried. */
Test(tokenize, add_loads_the_tables_there_past_a_missing_one, .timeout = 20)
{
    struct policy_tokens *t = NULL;
    char dir[] = "/tmp/costrouter-tok-XXXXXX", src[4096], dst[4096];

    cr_assert_not_null(mkdtemp(dir));
    snprintf(src, sizeof(src), "%s/data/tokens/o200k_base.tok", fixture_src());
    snprintf(dst, sizeof(dst), "%s/o200k_base.tok", dir);
    cr_assert_eq(symlink(src, dst), 0);
    cr_assert_eq(policy_tokens_load_some(&t, dir, 0), 0);
    cr_assert_eq(policy_tokens_add(t, (1u << CONF_TOK_CL100K) | (1u << CONF_TOK_O200K) |
                                          (1u << CONF_TOK_LLAMA3)),
                 -ENOENT);
    cr_assert(policy_tokens_has(t, CONF_TOK_O200K), "o200k not loaded past cl100k's absence");
    cr_assert_not(policy_tokens_has(t, CONF_TOK_CL100K));
    cr_assert_not(policy_tokens_has(t, CONF_TOK_LLAMA3));
    cr_assert_gt(policy_tokens_count(t, CONF_TOK_O200K, "hello there", 11), 0);
    policy_tokens_free(t);
    unlink(dst);
    rmdir(dir);
}

Test(tokenize, load_errors, .timeout = 20)
{
    struct policy_tokens *t = (void *)1;
    cr_assert_eq(policy_tokens_load(&t, "/nonexistent/tokens"), -ENOENT);
    cr_assert_null(t);

    char dir[] = "/tmp/costrouter-tok-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char src[4096], dst[4096];
    static const char *files[] = {"cl100k_base.tok", "o200k_base.tok", "llama3.tok"};
    for (int i = 0; i < 3; i++) {
        snprintf(src, sizeof(src), "%s/data/tokens/%s", fixture_src(), files[i]);
        snprintf(dst, sizeof(dst), "%s/%s", dir, files[i]);
        cr_assert_eq(symlink(src, dst), 0);
    }
    /* A truncated table is refused, not half-loaded. */
    snprintf(dst, sizeof(dst), "%s/llama3.tok", dir);
    unlink(dst);
    FILE *f = fopen(dst, "wb");
    fwrite("CRTOK1\0\0\5\0\0\0\1\0\0\0", 1, 16, f);
    fclose(f);
    cr_assert_eq(policy_tokens_load(&t, dir), -EINVAL);
    cr_assert_null(t);
    for (int i = 0; i < 3; i++) {
        snprintf(dst, sizeof(dst), "%s/%s", dir, files[i]);
        unlink(dst);
    }
    rmdir(dir);
}

/* The cached count is the count: on every corpus sample, for each
 * encoding, asked twice (the second answer comes from the cache, which
 * must not mix up encodings or strings of the same length). */
Test(tokenize, cached_counts_equal_counts, .timeout = 120)
{
    size_t corpus_len, checked = 0;
    char *tsv, *corpus = load_corpus(&corpus_len, &tsv);
    struct policy_tokens *t = fixture_tokens();
    static const enum conf_tokenizer encs[3] = {CONF_TOK_CL100K, CONF_TOK_O200K, CONF_TOK_LLAMA3};
    char *save = NULL;
    for (char *line = strtok_r(tsv, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        unsigned long off, len;
        cr_assert_eq(sscanf(line, "%*s %lu %lu", &off, &len), 2);
        for (int round = 0; round < 2; round++)
            for (int e = 0; e < 3; e++) {
                int64_t want = policy_tokens_count(t, encs[e], corpus + off, len);
                int64_t got = policy_tokens_count_cached(t, encs[e], corpus + off, len);
                cr_assert_eq(got, want, "sample at %lu (%lu bytes), encoding %d, round %d: %lld != %lld",
                             off, len, e, round, (long long)got, (long long)want);
                checked++;
            }
    }
    cr_assert_gt(checked, 20000);
    /* Same length, one byte changed: its own count, not the cached one. */
    char a[200], b[200];
    memset(a, 'a', sizeof(a));
    memcpy(b, a, sizeof(b));
    b[100] = ' ';
    int64_t ca = policy_tokens_count_cached(t, CONF_TOK_O200K, a, sizeof(a));
    int64_t cb = policy_tokens_count_cached(t, CONF_TOK_O200K, b, sizeof(b));
    cr_assert_eq(ca, policy_tokens_count(t, CONF_TOK_O200K, a, sizeof(a)));
    cr_assert_eq(cb, policy_tokens_count(t, CONF_TOK_O200K, b, sizeof(b)));
    cr_assert_neq(ca, cb);
    policy_tokens_free(t);
    free(tsv);
    free(corpus);
}
