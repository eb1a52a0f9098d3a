/*
 * router/bigusage.c: the root "usage" of a plain answer too big to hold,
 * and the text it answered, read as its bytes pass to the client.
 *
 * A non-streamed answer over PROXY_HOLD_BODY_MAX goes out as it comes, so
 * router__usage_parse never sees it whole. yajl parses it incrementally;
 * only the value of the root object's first "usage" member is kept,
 * regenerated (yajl_gen) into a small fixed buffer as {"usage":...}, which
 * router__usage_parse then reads: one definition of what usage means. A
 * nested "usage", or those bytes inside a string, are events at another
 * depth, or no event at all, so they are never taken for it.
 *
 * Usage comes last, so whether it comes at all is known only at the end:
 * the texts a held body without usage is charged for (count_completion in
 * proxy.c: choices[].text, choices[].message.content and its tool calls'
 * function.arguments; of a Responses answer, output[].content[].text and
 * output[].arguments) are handed to `on_text` as they pass, for counting.
 * A Responses answer's web and file search calls (output[] items of type
 * web_search_call, file_search_call) are counted as they pass too: OpenAI
 * bills each.
 *
 * Bounded: the answer itself is never kept. yajl keeps a token that is
 * cut between two reads (a long string) until it ends, so a token longer
 * than BIGUSAGE_TOKEN_MAX, nesting deeper than BIGUSAGE_DEPTH_MAX or a
 * usage longer than BIGUSAGE_TEXT_MAX ends the reading with no usage, as
 * does text that is not JSON.
 *
 * yajl hands over names decoded: "us\u0061ge" is the usage here, while
 * sse.c's scan of a held body compares names as written. No backend
 * writes its usage so; the fuzzer (tests/fuzz/fuzz_sse.c) compares the
 * two readings on texts without escapes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_gen.h>
#include <yajl/yajl_parse.h>

#include "router/internal.h"

/* Longest token waited for. A chat answer's content is a few hundred KB
 * at most (128k tokens); with yajl's doubling buffer, a cut token costs
 * up to twice this, no more than a held body. */
#define BIGUSAGE_TOKEN_MAX (4u * 1024 * 1024)
/* Bytes given to yajl at once, so a token is measured every so often. */
#define BIGUSAGE_SLICE (64u * 1024)
/* Deeper than any answer nests (logprobs: 6); yajl's own stack would
 * otherwise grow with every '[' sent. */
#define BIGUSAGE_DEPTH_MAX 64
/* A usage object is a few hundred bytes. */
#define BIGUSAGE_TEXT_MAX 4096

enum bigusage_state {
    BIGUSAGE_READING, /* before the root usage */
    BIGUSAGE_CAPTURE, /* inside its value */
    BIGUSAGE_DONE,    /* its value is whole in text */
    BIGUSAGE_FAILED,  /* no usage will be read */
};

/* What a map or an array, or the value after a key, is in the answer:
 * the way down to the texts an answer without usage is charged for. */
enum bigusage_role {
    BIGUSAGE_OTHER,    /* nothing counted in it */
    BIGUSAGE_ROOT,     /* the root object */
    BIGUSAGE_CHOICES,  /* its "choices" */
    BIGUSAGE_CHOICE,   /* one of them */
    BIGUSAGE_MESSAGE,  /* a choice's "message" */
    BIGUSAGE_CALLS,    /* the message's "tool_calls" */
    BIGUSAGE_CALL,     /* one of them */
    BIGUSAGE_FUNCTION, /* a call's "function" */
    BIGUSAGE_OUTPUT,   /* the root's "output" (a Responses answer) */
    BIGUSAGE_ITEM,     /* one of its items: a message, a function call */
    BIGUSAGE_PARTS,    /* a message item's "content" */
    BIGUSAGE_PART,     /* one of them */
    BIGUSAGE_TEXT,     /* counted: a string, or an array of strings and token ids */
    BIGUSAGE_TYPE,     /* an output item's "type": a web search call is billed */
};

/* Which key of which object leads where. */
static const struct {
    enum bigusage_role in; /* the object */
    const char *key;       /* its member */
    enum bigusage_role to; /* what the member's value is */
} bigusage_paths[] = {
    {BIGUSAGE_ROOT, "choices", BIGUSAGE_CHOICES},
    {BIGUSAGE_CHOICE, "text", BIGUSAGE_TEXT},
    {BIGUSAGE_CHOICE, "message", BIGUSAGE_MESSAGE},
    {BIGUSAGE_MESSAGE, "content", BIGUSAGE_TEXT},
    {BIGUSAGE_MESSAGE, "tool_calls", BIGUSAGE_CALLS},
    {BIGUSAGE_CALL, "function", BIGUSAGE_FUNCTION},
    {BIGUSAGE_FUNCTION, "arguments", BIGUSAGE_TEXT},
    {BIGUSAGE_ROOT, "output", BIGUSAGE_OUTPUT},
    {BIGUSAGE_ITEM, "content", BIGUSAGE_PARTS},
    {BIGUSAGE_ITEM, "arguments", BIGUSAGE_TEXT},
    {BIGUSAGE_PART, "text", BIGUSAGE_TEXT},
    {BIGUSAGE_ITEM, "type", BIGUSAGE_TYPE},
};

/* A map or an array open at some depth. */
struct bigusage_frame {
    unsigned char role;  /* enum bigusage_role */
    unsigned char array; /* an array, not a map */
};

struct router__bigusage {
    yajl_handle parser;         /* the answer's parser; NULL once done or failed */
    void (*on_text)(void *arg, const char *text, size_t len); /* NULL: no counting */
    void *arg;                  /* on_text's */
    enum bigusage_role key_role; /* the value after the last key of a map */
    struct bigusage_frame frame[BIGUSAGE_DEPTH_MAX + 1]; /* [depth]: the innermost open */
    yajl_gen gen;               /* regenerates the usage value; NULL outside it */
    enum bigusage_state state;  /* where the reading is */
    unsigned depth;             /* open maps and arrays, the root's included */
    unsigned capture_depth;     /* depth when the usage value began */
    struct router__calls calls; /* output items of type web_search_call and
                                   file_search_call read */
    uint64_t fed;               /* bytes given to the parser before this slice */
    uint64_t token_end;         /* offset just past the last token yajl reported */
    size_t len;                 /* bytes in text */
    char text[BIGUSAGE_TEXT_MAX]; /* {"usage":...} */
};

/* yajl_gen's output, into the fixed text; too long fails the capture. */
static void bigusage_print(void *ctx, const char *s, size_t len)
{
    struct router__bigusage *b = ctx;

    if (b->len + len > sizeof(b->text)) {
        b->state = BIGUSAGE_FAILED;
        return;
    }
    memcpy(b->text + b->len, s, len);
    b->len += len;
}

/* Every event: where its token ended, for the token length check. */
static void bigusage_token(struct router__bigusage *b)
{
    b->token_end = b->fed + yajl_get_bytes_consumed(b->parser);
}

/* A value ended at the current depth: the usage value is whole when it
 * was the usage's own. Returns what yajl's callbacks return: 0 stops. */
static int bigusage_value_end(struct router__bigusage *b)
{
    if (b->state == BIGUSAGE_CAPTURE && b->depth == b->capture_depth) {
        if (yajl_gen_map_close(b->gen) != yajl_gen_status_ok)
            b->state = BIGUSAGE_FAILED;
        else if (b->state == BIGUSAGE_CAPTURE)
            b->state = BIGUSAGE_DONE;
    }
    return b->state == BIGUSAGE_READING || b->state == BIGUSAGE_CAPTURE;
}

/* After a value's event: the capture fails if yajl_gen refused its copy
 * (gs), and ends if it was the usage's whole value. */
static int bigusage_event(struct router__bigusage *b, yajl_gen_status gs)
{
    if (b->state == BIGUSAGE_CAPTURE && gs != yajl_gen_status_ok)
        b->state = BIGUSAGE_FAILED;
    return bigusage_value_end(b);
}

/* What the value the parser reports now is. */
static enum bigusage_role bigusage_value_role(const struct router__bigusage *b)
{
    const struct bigusage_frame *f = &b->frame[b->depth];

    if (b->depth == 0)
        return BIGUSAGE_ROOT;
    if (!f->array)
        return b->key_role;
    switch (f->role) {
    case BIGUSAGE_CHOICES:
        return BIGUSAGE_CHOICE;
    case BIGUSAGE_CALLS:
        return BIGUSAGE_CALL;
    case BIGUSAGE_OUTPUT:
        return BIGUSAGE_ITEM;
    case BIGUSAGE_PARTS:
        return BIGUSAGE_PART;
    case BIGUSAGE_TEXT:
        return BIGUSAGE_TEXT;
    default:
        return BIGUSAGE_OTHER;
    }
}

/* A map or array opening as `role`: kept when it is one of that kind. */
static enum bigusage_role bigusage_container_role(enum bigusage_role role, int array)
{
    switch (role) {
    case BIGUSAGE_CHOICES:
    case BIGUSAGE_CALLS:
    case BIGUSAGE_OUTPUT:
    case BIGUSAGE_PARTS:
    case BIGUSAGE_TEXT:
        return array ? role : BIGUSAGE_OTHER;
    case BIGUSAGE_OTHER:
        return BIGUSAGE_OTHER;
    default:
        return array ? BIGUSAGE_OTHER : role;
    }
}

/* A string, or with text NULL a token id in an array of them, that the
 * answer's text is counted from. */
static void bigusage_text(struct router__bigusage *b, const char *text, size_t len)
{
    if (b->on_text != NULL && bigusage_value_role(b) == BIGUSAGE_TEXT &&
        (text != NULL || b->frame[b->depth].array))
        b->on_text(b->arg, text, len);
}

#define BIGUSAGE_GEN(b, call) ((b)->state == BIGUSAGE_CAPTURE ? (call) : yajl_gen_status_ok)

static int bigusage_null(void *ctx)
{
    struct router__bigusage *b = ctx;

    bigusage_token(b);
    return bigusage_event(b, BIGUSAGE_GEN(b, yajl_gen_null(b->gen)));
}

static int bigusage_boolean(void *ctx, int v)
{
    struct router__bigusage *b = ctx;

    bigusage_token(b);
    return bigusage_event(b, BIGUSAGE_GEN(b, yajl_gen_bool(b->gen, v)));
}

static int bigusage_number(void *ctx, const char *s, size_t len)
{
    struct router__bigusage *b = ctx;

    bigusage_token(b);
    bigusage_text(b, NULL, 0);
    return bigusage_event(b, BIGUSAGE_GEN(b, yajl_gen_number(b->gen, s, len)));
}

static int bigusage_string(void *ctx, const unsigned char *s, size_t len)
{
    struct router__bigusage *b = ctx;

    bigusage_token(b);
    bigusage_text(b, (const char *)s, len);
    if (bigusage_value_role(b) == BIGUSAGE_TYPE) {
        b->calls.web += len == 15 && memcmp(s, "web_search_call", 15) == 0;
        b->calls.file += len == 16 && memcmp(s, "file_search_call", 16) == 0;
    }
    return bigusage_event(b, BIGUSAGE_GEN(b, yajl_gen_string(b->gen, s, len)));
}

/* The root object's "usage": its value is what follows, copied into
 * {"usage":...} by a generator of its own. */
static int bigusage_begin(struct router__bigusage *b)
{
    b->gen = yajl_gen_alloc(NULL);
    if (b->gen == NULL || !yajl_gen_config(b->gen, yajl_gen_print_callback, bigusage_print, b) ||
        yajl_gen_map_open(b->gen) != yajl_gen_status_ok ||
        yajl_gen_string(b->gen, (const unsigned char *)"usage", 5) != yajl_gen_status_ok) {
        b->state = BIGUSAGE_FAILED;
        return 0;
    }
    b->state = BIGUSAGE_CAPTURE;
    b->capture_depth = b->depth;
    return 1;
}

static int bigusage_map_key(void *ctx, const unsigned char *key, size_t len)
{
    struct router__bigusage *b = ctx;

    bigusage_token(b);
    if (b->state == BIGUSAGE_CAPTURE)
        return bigusage_event(b, yajl_gen_string(b->gen, key, len));
    b->key_role = BIGUSAGE_OTHER;
    for (size_t i = 0; i < sizeof(bigusage_paths) / sizeof(bigusage_paths[0]); i++)
        if (bigusage_paths[i].in == b->frame[b->depth].role &&
            strlen(bigusage_paths[i].key) == len && memcmp(bigusage_paths[i].key, key, len) == 0)
            b->key_role = bigusage_paths[i].to;
    if (b->state == BIGUSAGE_READING && b->depth == 1 && len == 5 && memcmp(key, "usage", 5) == 0)
        return bigusage_begin(b);
    return 1;
}

/* A map or an array opens (map: 1). */
static int bigusage_open(struct router__bigusage *b, int map)
{
    enum bigusage_role role = bigusage_value_role(b);

    bigusage_token(b);
    if (b->depth == BIGUSAGE_DEPTH_MAX) {
        b->state = BIGUSAGE_FAILED;
        return 0;
    }
    b->depth++;
    b->frame[b->depth].role = (unsigned char)bigusage_container_role(role, !map);
    b->frame[b->depth].array = !map;
    if (b->state != BIGUSAGE_CAPTURE)
        return 1;
    if ((map ? yajl_gen_map_open(b->gen) : yajl_gen_array_open(b->gen)) != yajl_gen_status_ok)
        b->state = BIGUSAGE_FAILED;
    return b->state == BIGUSAGE_CAPTURE;
}

/* A map or an array closes (map: 1): a value ends at the depth outside. */
static int bigusage_close(struct router__bigusage *b, int map)
{
    yajl_gen_status gs = yajl_gen_status_ok;

    bigusage_token(b);
    if (b->state == BIGUSAGE_CAPTURE)
        gs = map ? yajl_gen_map_close(b->gen) : yajl_gen_array_close(b->gen);
    b->depth--;
    return bigusage_event(b, gs);
}

static int bigusage_start_map(void *ctx)
{
    return bigusage_open(ctx, 1);
}

static int bigusage_end_map(void *ctx)
{
    return bigusage_close(ctx, 1);
}

static int bigusage_start_array(void *ctx)
{
    return bigusage_open(ctx, 0);
}

static int bigusage_end_array(void *ctx)
{
    return bigusage_close(ctx, 0);
}

static const yajl_callbacks bigusage_callbacks = {
    .yajl_null = bigusage_null,
    .yajl_boolean = bigusage_boolean,
    .yajl_number = bigusage_number, /* as written: no integer or double callbacks */
    .yajl_string = bigusage_string,
    .yajl_start_map = bigusage_start_map,
    .yajl_map_key = bigusage_map_key,
    .yajl_end_map = bigusage_end_map,
    .yajl_start_array = bigusage_start_array,
    .yajl_end_array = bigusage_end_array,
};

struct router__bigusage *router__bigusage_new(void (*on_text)(void *arg, const char *text,
                                                                size_t len),
                                               void *arg)
{
    struct router__bigusage *b = calloc(1, sizeof(*b));

    if (b == NULL)
        return NULL;
    b->on_text = on_text;
    b->arg = arg;
    b->parser = yajl_alloc(&bigusage_callbacks, NULL, b);
    if (b->parser == NULL) {
        free(b);
        return NULL;
    }
    /* The usage's numbers are what matters; a string of the answer that
     * is not UTF-8 is the client's affair, not a reason to lose them. */
    yajl_config(b->parser, yajl_dont_validate_strings, 1);
    return b;
}

/* Done or failed: the parser and generator are not needed any more. */
static void bigusage_stop(struct router__bigusage *b)
{
    if (b->parser != NULL)
        yajl_free(b->parser);
    b->parser = NULL;
    if (b->gen != NULL)
        yajl_gen_free(b->gen);
    b->gen = NULL;
}

int router__bigusage_feed(struct router__bigusage *b, const char *p, size_t len)
{
    while (len > 0 && b->parser != NULL) {
        size_t n = len < BIGUSAGE_SLICE ? len : BIGUSAGE_SLICE;
        yajl_status st = yajl_parse(b->parser, (const unsigned char *)p, n);

        b->fed += n;
        p += n;
        len -= n;
        if (st != yajl_status_ok || b->fed - b->token_end > BIGUSAGE_TOKEN_MAX) {
            if (b->state != BIGUSAGE_DONE)
                b->state = BIGUSAGE_FAILED;
            bigusage_stop(b);
        }
    }
    return b->state == BIGUSAGE_DONE ? 1 : b->state == BIGUSAGE_FAILED ? -1 : 0;
}

const char *router__bigusage_text(const struct router__bigusage *b, size_t *len)
{
    *len = b->len;
    return b->text;
}

struct router__calls router__bigusage_calls(const struct router__bigusage *b)
{
    return b->calls;
}

void router__bigusage_free(struct router__bigusage *b)
{
    if (b == NULL)
        return;
    bigusage_stop(b);
    free(b);
}
