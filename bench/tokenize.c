/*
 * bench/tokenize.c: token counting speed and memory.
 *
 * usage: build/bench/tokenize build/tokens-test/corpus.bin [DATA_DIR]
 * Counts every sample of the test corpus (split as expected.tsv, next to
 * corpus.bin, says) with each encoding, a 1 KB prompt many times, and 1 MB
 * pathological inputs; prints one "name: value unit" per line. Run with
 * bench/tokenize_tiktoken.mjs on the same corpus to compare (make
 * bench-tokenize runs both pinned to one core).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "policy/tokenize.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long rss_kb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    size_t n = strlen(field);
    while (f && fgets(line, sizeof(line), f))
        if (strncmp(line, field, n) == 0)
            kb = strtol(line + n + 1, NULL, 10);
    if (f)
        fclose(f);
    return kb;
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    if (fread(p, 1, (size_t)n, f) != (size_t)n)
        exit(1);
    p[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return p;
}

struct sample {
    size_t off, len; /* bytes in the corpus */
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s corpus.bin [DATA_DIR]\n", argv[0]);
        return 2;
    }
    size_t corpus_len, tsv_len;
    char *corpus = slurp(argv[1], &corpus_len);
    char tsv_path[4096];
    snprintf(tsv_path, sizeof(tsv_path), "%.*s/expected.tsv",
             (int)(strrchr(argv[1], '/') ? strrchr(argv[1], '/') - argv[1] : 1),
             strrchr(argv[1], '/') ? argv[1] : ".");
    char *tsv = slurp(tsv_path, &tsv_len);
    size_t ns = 0, cap = 8192;
    struct sample *s = malloc(cap * sizeof(*s));
    for (char *line = strtok(tsv, "\n"); line; line = strtok(NULL, "\n")) {
        char name[256];
        if (ns == cap)
            s = realloc(s, (cap *= 2) * sizeof(*s));
        if (sscanf(line, "%255s %zu %zu", name, &s[ns].off, &s[ns].len) == 3)
            ns++;
    }

    long rss0 = rss_kb("VmRSS:");
    double t0 = now();
    struct policy_tokens *t = NULL;
    if (policy_tokens_load(&t, argc > 2 ? argv[2] : NULL) < 0)
        return 1;
    printf("load_all_three: %.1f ms\n", (now() - t0) * 1e3);
    printf("rss_before_load: %.1f MB\n", rss0 / 1024.0);
    printf("rss_all_three_loaded: %.1f MB\n", rss_kb("VmRSS:") / 1024.0);

    static const struct {
        const char *name;
        enum conf_tokenizer enc;
    } encs[] = {{"cl100k_base", CONF_TOK_CL100K}, {"o200k_base", CONF_TOK_O200K}, {"llama3", CONF_TOK_LLAMA3}};
    for (size_t e = 0; e < 3; e++) {
        int64_t tokens = 0;
        size_t bytes = 0;
        int rounds = 0;
        t0 = now();
        do {
            for (size_t i = 0; i < ns; i++) {
                tokens += policy_tokens_count(t, encs[e].enc, corpus + s[i].off, s[i].len);
                bytes += s[i].len;
            }
            rounds++;
        } while (now() - t0 < 2.0);
        double dt = now() - t0;
        printf("corpus_%s: %.2f Mtokens/s (%.1f MB/s, %zu samples x %d rounds)\n", encs[e].name,
               tokens / dt / 1e6, bytes / dt / 1e6, ns, rounds);
    }

    /* The 1 KB prompt: the first 1024 bytes of the corpus (English README). */
    for (size_t e = 0; e < 3; e++) {
        enum { N = 20000 };
        static double times[N];
        int64_t n = 0;
        for (int i = 0; i < N; i++) {
            double a = now();
            n = policy_tokens_count(t, encs[e].enc, corpus, 1024);
            times[i] = now() - a;
        }
        qsort(times, N, sizeof(times[0]), cmp_double);
        printf("prompt_1kb_%s: median %.2f us, p99 %.2f us (%lld tokens)\n", encs[e].name,
               times[N / 2] * 1e6, times[N * 99 / 100] * 1e6, (long long)n);
    }

    size_t big = 1 << 20;
    char *p = malloc(big);
    static const struct {
        const char *name;
        char c;
    } runs[] = {{"a", 'a'}, {"space", ' '}, {"newline", '\n'}, {"A", 'A'}, {"digit", '7'}, {"bang", '!'}};
    for (size_t r = 0; r < sizeof(runs) / sizeof(runs[0]); r++) {
        memset(p, runs[r].c, big);
        for (size_t e = 0; e < 3; e++) {
            t0 = now();
            int64_t n = policy_tokens_count(t, encs[e].enc, p, big);
            printf("run_1mb_%s_%s: %.1f ms (%lld tokens)\n", runs[r].name, encs[e].name,
                   (now() - t0) * 1e3, (long long)n);
        }
    }
    /* Random bytes: mostly invalid UTF-8. */
    uint32_t x = 1;
    for (size_t i = 0; i < big; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (char)x;
    }
    for (size_t e = 0; e < 3; e++) {
        t0 = now();
        int64_t n = policy_tokens_count(t, encs[e].enc, p, big);
        printf("random_bytes_1mb_%s: %.1f ms (%lld tokens)\n", encs[e].name, (now() - t0) * 1e3,
               (long long)n);
    }
    printf("rss_peak: %.1f MB\n", rss_kb("VmHWM:") / 1024.0);
    free(p);
    policy_tokens_free(t);
    free(s);
    free(tsv);
    free(corpus);
    return 0;
}
