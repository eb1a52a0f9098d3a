/*
 * cli/tokens.c: `costrouter tokens`, token counts from the command line.
 *
 *   costrouter tokens --encoding cl100k_base|o200k_base|llama3|estimate
 *                     [--chat|--responses|--messages] [--ids] [--data DIR] [FILE|-]
 *                     (--help: usage)
 *
 * Prints the token count of FILE (default stdin). With --chat the input is
 * a chat completion request JSON and the count is its prompt tokens as the
 * API reports them (policy_tokens_chat); with --responses a Responses API
 * request (policy_tokens_responses, the chat framing standing for the
 * Responses API's, which is not documented); with --messages an Anthropic
 * Messages API request (policy_tokens_messages: an estimate, Claude's
 * tokenizer not being public); --ids prints the token ids too.
 */
#include "cli/tokens.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "policy/tokenize.h"

static const struct {
    const char *name;         /* --encoding value */
    enum conf_tokenizer enc;  /* what it selects */
} names[] = {
    {"cl100k_base", CONF_TOK_CL100K},
    {"o200k_base", CONF_TOK_O200K},
    {"llama3", CONF_TOK_LLAMA3},
    {"estimate", CONF_TOK_ESTIMATE},
};

void cli_tokens_options(FILE *f)
{
    fputs("  --encoding ENC      cl100k_base, o200k_base, llama3, or estimate (from bytes)\n"
          "  --chat              the input is a chat completion request (JSON): count its\n"
          "                      prompt tokens as the API bills them\n"
          "  --responses         the input is a Responses API request (JSON): count its prompt\n"
          "                      as --chat would count the same messages\n"
          "  --messages          the input is an Anthropic Messages API request (JSON): the\n"
          "                      router's estimate of its prompt with ENC\n"
          "  --ids               print the token ids too, on a second line (plain text only)\n"
          "  --data DIR          folder of the token tables (default: $COSTROUTER_DATA, else\n"
          "                      data/tokens)\n"
          "  FILE|-              the input (default: standard input)\n",
          f);
}

/* The usage to `f`; returns the exit status `rc`. */
static int usage(FILE *f, int rc)
{
    fputs("usage: costrouter " CLI_TOKENS_SYNOPSIS "\n", f);
    cli_tokens_options(f);
    return rc;
}

static int read_all(FILE *f, struct buf *b)
{
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        if (buf_append(b, chunk, n) < 0)
            return -ENOMEM;
    return ferror(f) ? -EIO : 0;
}

static int print_ids(struct policy_tokens *t, enum conf_tokenizer enc, const struct buf *in,
                     int64_t count)
{
    uint32_t *ids = malloc(((size_t)count + 1) * sizeof(*ids));
    if (!ids)
        return -ENOMEM;
    policy_tokens_encode(t, enc, in->data, in->len, ids, (size_t)count);
    for (int64_t i = 0; i < count; i++)
        printf("%s%u", i ? " " : "", ids[i]);
    printf("\n");
    free(ids);
    return 0;
}

int cli_tokens_main(int argc, char **argv)
{
    const char *enc_name = NULL, *path = "-", *dir = NULL;
    int want_ids = 0, rc = 1;
    /* The prompt counter of a request (--chat, --responses), or NULL: text. */
    int64_t (*prompt)(struct policy_tokens *, enum conf_tokenizer, const cJSON *) = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--encoding") == 0 && i + 1 < argc)
            enc_name = argv[++i];
        else if (strcmp(argv[i], "--data") == 0 && i + 1 < argc)
            dir = argv[++i];
        else if (strcmp(argv[i], "--chat") == 0)
            prompt = policy_tokens_chat;
        else if (strcmp(argv[i], "--responses") == 0)
            prompt = policy_tokens_responses;
        else if (strcmp(argv[i], "--messages") == 0)
            prompt = policy_tokens_messages;
        else if (strcmp(argv[i], "--ids") == 0)
            want_ids = 1;
        else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return usage(stdout, 0);
        else if (argv[i][0] != '-' || strcmp(argv[i], "-") == 0)
            path = argv[i];
        else
            return usage(stderr, 2);
    }
    int found = -1;
    for (size_t i = 0; enc_name && i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(enc_name, names[i].name) == 0)
            found = (int)i;
    if (found < 0)
        return usage(stderr, 2);
    enum conf_tokenizer enc = names[found].enc;

    struct buf in = {0};
    struct policy_tokens *t = NULL;
    cJSON *req = NULL;
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "costrouter tokens: %s: %s\n", path, strerror(errno));
        goto out;
    }
    int err = read_all(f, &in);
    if (f != stdin)
        fclose(f);
    if (err < 0) {
        fprintf(stderr, "costrouter tokens: %s: %s\n", path, strerror(-err));
        goto out;
    }
    /* The one table asked for (none to estimate): each costs ~0.1 s to load. */
    err = policy_tokens_load_some(&t, dir, 1u << enc);
    if (err < 0) {
        fprintf(stderr, "costrouter tokens: cannot load token tables: %s (run `make data`)\n",
                strerror(-err));
        goto out;
    }
    int64_t count;
    if (prompt) {
        req = cJSON_ParseWithLength(in.data ? in.data : "", in.len);
        if (!req) {
            fprintf(stderr, "costrouter tokens: %s: not valid JSON\n", path);
            goto out;
        }
        count = prompt(t, enc, req);
    } else {
        count = policy_tokens_count(t, enc, in.data, in.len);
    }
    if (count < 0) {
        fprintf(stderr, "costrouter tokens: %s\n",
                count == -EINVAL ? "request has no \"messages\" array" : strerror((int)-count));
        goto out;
    }
    printf("%lld\n", (long long)count);
    if (want_ids && !prompt && enc != CONF_TOK_ESTIMATE && print_ids(t, enc, &in, count) < 0)
        goto out;
    rc = 0;
out:
    cJSON_Delete(req);
    policy_tokens_free(t);
    buf_free(&in);
    return rc;
}
