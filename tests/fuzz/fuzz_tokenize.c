/*
 * tests/fuzz/fuzz_tokenize.c: libFuzzer target for the tokenizer
 * (`make fuzz-tokenize`, clang with ASan and UBSan).
 *
 * Every input is counted with the three encodings, and the fast ways of
 * splitting text are checked against the plain one (bench/PROFILE.md,
 * sixth pass):
 * - one PCRE2 call walking the text (the `run` pattern) gives the same
 *   token ids as one search per piece (`one`), tiktoken's find_iter;
 * - an all-ASCII text gives the same ids with the ASCII twin of the
 *   pattern as with the Unicode one;
 * - the public count, the cached count and the encode count agree.
 * The input is also parsed as JSON and, when it is an object, counted as a
 * chat request (crashes and sanitizer reports only).
 *
 * It includes policy/tokenize.c to reach the splitters, which are static.
 * Token tables: COSTROUTER_DATA, else ./data/tokens.
 */
#include "policy/tokenize.c"

#include <cjson/cJSON.h>

static struct policy_tokens *tokens;
static uint32_t *ids_a, *ids_b;
static size_t ids_cap;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (policy_tokens_load(&tokens, NULL) != 0) {
        fprintf(stderr, "fuzz_tokenize: cannot load the token tables (COSTROUTER_DATA)\n");
        abort();
    }
    return 0;
}

/* The reference: one search per piece, text between matches skipped. */
static int64_t split_one_by_one(struct vocab *v, const pcre2_code *one, const uint8_t *s,
                                size_t len, uint32_t *ids, size_t cap)
{
    struct sink sink = {ids, cap, 0};
    size_t off = 0;

    while (off < len) {
        int rc = pcre2_jit_match(one, s, len, off, 0, v->md, v->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return -ENOMEM;
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(v->md);
        if (ov[1] <= ov[0]) {
            off = ov[0] + 1;
            continue;
        }
        if (encode_piece(tokens, v, s + ov[0], ov[1] - ov[0], &sink) < 0)
            return -ENOMEM;
        off = ov[1];
    }
    return sink.count;
}

static int64_t split_walk(struct vocab *v, const struct splitter *sp, const uint8_t *s,
                          size_t len, uint32_t *ids, size_t cap)
{
    struct sink sink = {ids, cap, 0};

    return split_encode(tokens, v, sp, s, len, &sink) < 0 ? -ENOMEM : sink.count;
}

static void same_ids(int64_t a, int64_t b, const char *what)
{
    if (a != b || (a > 0 && memcmp(ids_a, ids_b, (size_t)a * sizeof(*ids_a)) != 0)) {
        fprintf(stderr, "fuzz_tokenize: %s differ (%lld vs %lld tokens)\n", what, (long long)a,
                (long long)b);
        abort();
    }
}

static void check_encoding(int e, const uint8_t *data, size_t size)
{
    struct vocab *v = &tokens->v[e];
    enum conf_tokenizer enc = (enum conf_tokenizer)(e + 1);
    size_t len = size;
    const uint8_t *s = valid_text(tokens, data, &len);
    int64_t walked, searched;

    if (s == NULL)
        return;
    walked = split_walk(v, &v->split[0], s, len, ids_a, ids_cap);
    searched = split_one_by_one(v, v->split[0].one, s, len, ids_b, ids_cap);
    same_ids(walked, searched, "one call per text and one call per piece");
    if (ascii_run(s, len) == len) {
        searched = split_walk(v, &v->split[1], s, len, ids_b, ids_cap);
        same_ids(walked, searched, "the ASCII pattern and the Unicode one");
    }
    /* The cached count twice: the second comes from the cache when the
     * text is long enough to be kept. */
    if (policy_tokens_count(tokens, enc, (const char *)data, size) != walked ||
        policy_tokens_count_cached(tokens, enc, (const char *)data, size) != walked ||
        policy_tokens_count_cached(tokens, enc, (const char *)data, size) != walked) {
        fprintf(stderr, "fuzz_tokenize: count, cached count and encode differ\n");
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* Repaired text is at most 3 bytes a byte; a token is at least a byte. */
    if (3 * size + 1 > ids_cap) {
        ids_cap = 3 * size + 1;
        ids_a = realloc(ids_a, ids_cap * sizeof(*ids_a));
        ids_b = realloc(ids_b, ids_cap * sizeof(*ids_b));
        if (!ids_a || !ids_b)
            abort();
    }
    for (int e = 0; e < NENC; e++)
        check_encoding(e, data, size);

    cJSON *req = cJSON_ParseWithLength((const char *)data, size);
    if (cJSON_IsObject(req)) {
        for (int e = 0; e <= NENC; e++) {
            int64_t n = policy_tokens_chat(tokens, (enum conf_tokenizer)e, req);
            if (n < 0 && n != -EINVAL)
                abort();
        }
    }
    cJSON_Delete(req);
    return 0;
}
