/*
 * policy/tokenize_chat.c: prompt tokens of a chat completion request.
 *
 * The upstream counts more than the message texts: each model family wraps
 * messages in a chat template, and tool definitions and images cost tokens
 * too. The OpenAI rules are the ones the OpenAI cookbook ("How to count
 * tokens with tiktoken", examples/How_to_count_tokens_with_tiktoken.ipynb)
 * checks against the API's usage.prompt_tokens: 129 (gpt-3.5-turbo/gpt-4,
 * cl100k) and 124 (gpt-4o, o200k) for its example messages; 105 and 101
 * for its weather-tool example. Image tiles follow OpenAI's vision guide.
 * Llama 3 follows Meta's chat template. Responses API requests
 * (policy_tokens_responses) are counted by the same framing, message by
 * message: the API documents none of its own.
 */
#include "policy/tokenize.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "common/buf.h"
#include "policy/internal.h"

/* OpenAI framing (cookbook num_tokens_from_messages, gpt-3.5-turbo-0613 on). */
#define OAI_PER_MESSAGE 3 /* <|start|>{role}\n ... <|end|> */
#define OAI_PER_NAME 1
#define OAI_REPLY 3 /* every reply is primed with <|start|>assistant<|message|> */

/* Cookbook num_tokens_for_tools constants; func_init is 10 for cl100k models. */
struct tool_costs {
    int func_init; /* per function */
    int prop_init; /* per function with properties */
    int prop_key;  /* per property */
    int enum_init; /* per property with an enum */
    int enum_item; /* per enum item, plus its text */
    int func_end;  /* once, when any tool is given */
};
static const struct tool_costs costs_o200k = {7, 3, 3, -3, 3, 12};
static const struct tool_costs costs_cl100k = {10, 3, 3, -3, 3, 12};

/* Running sum that remembers the first error. */
struct tally {
    int64_t n; /* tokens so far */
    int err;   /* first negative errno, or 0 */
};

/* Add a fixed framing cost; the cookbook's enum_init is negative. */
static void add_fixed(struct tally *s, int n)
{
    s->n += n;
}

/* Add a count, or record it if it is a negative errno. */
static void add(struct tally *s, int64_t n)
{
    if (n < 0) {
        if (!s->err)
            s->err = (int)n;
        return;
    }
    s->n += n;
}

static int64_t count_str(struct policy_tokens *t, enum conf_tokenizer enc, const char *s)
{
    return policy_tokens_count_cached(t, enc, s, strlen(s));
}

static const char *str_field(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Count the text built in `b` (a policy__tokens_line buffer). */
static int64_t count_buf(struct policy_tokens *t, enum conf_tokenizer enc, struct buf *b, int err)
{
    if (err < 0)
        return err;
    return policy_tokens_count(t, enc, b->data, b->len);
}

/* Append `s` without one trailing '.', as the cookbook trims descriptions. */
static int append_desc(struct buf *b, const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n && s[n - 1] == '.')
        n--;
    return buf_append(b, s ? s : "", n);
}

/* ---- images ---- */

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+' || c == '-')
        return 62;
    if (c == '/' || c == '_')
        return 63;
    return -1;
}

/*
 * Decode bytes [off, off + n) of the base64 text `s` into out, without
 * decoding what comes before. Returns how many bytes it could decode.
 */
static size_t b64_at(const char *s, size_t len, size_t off, uint8_t *out, size_t n)
{
    size_t got = 0, skip = off % 3;
    for (size_t q = off / 3; got < n && q < len / 4; q++) {
        int v[4];
        for (int k = 0; k < 4; k++)
            v[k] = b64_value((unsigned char)s[4 * q + k]);
        if (v[0] < 0 || v[1] < 0)
            break;
        int have = v[2] < 0 ? 1 : v[3] < 0 ? 2 : 3;
        int v2 = v[2] < 0 ? 0 : v[2], v3 = v[3] < 0 ? 0 : v[3];
        uint8_t bytes[3] = {(uint8_t)(v[0] << 2 | v[1] >> 4), (uint8_t)(v[1] << 4 | v2 >> 2),
                            (uint8_t)(v2 << 6 | v3)};
        for (int k = (int)skip; k < have && got < n; k++)
            out[got++] = bytes[k];
        skip = 0;
        if (have < 3)
            break;
    }
    return got;
}

#define BE16(p) ((uint32_t)(p)[0] << 8 | (p)[1])
#define LE16(p) ((uint32_t)(p)[1] << 8 | (p)[0])
#define BE32(p) ((uint32_t)(p)[0] << 24 | (uint32_t)(p)[1] << 16 | (uint32_t)(p)[2] << 8 | (p)[3])
#define LE24(p) ((uint32_t)(p)[2] << 16 | (uint32_t)(p)[1] << 8 | (p)[0])

/* Width and height from a PNG, GIF, WebP or JPEG header in base64. */
static int image_size(const char *b64, size_t len, uint32_t *w, uint32_t *h)
{
    uint8_t p[32];
    size_t got = b64_at(b64, len, 0, p, sizeof(p));
    if (got >= 24 && memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0 && memcmp(p + 12, "IHDR", 4) == 0) {
        *w = BE32(p + 16);
        *h = BE32(p + 20);
    } else if (got >= 10 && memcmp(p, "GIF8", 4) == 0) {
        *w = LE16(p + 6);
        *h = LE16(p + 8);
    } else if (got >= 30 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WEBP", 4) == 0) {
        if (memcmp(p + 12, "VP8 ", 4) == 0) {
            *w = LE16(p + 26) & 0x3fff;
            *h = LE16(p + 28) & 0x3fff;
        } else if (memcmp(p + 12, "VP8L", 4) == 0) {
            uint32_t bits = (uint32_t)p[21] | (uint32_t)p[22] << 8 | (uint32_t)p[23] << 16 |
                            (uint32_t)p[24] << 24;
            *w = (bits & 0x3fff) + 1;
            *h = ((bits >> 14) & 0x3fff) + 1;
        } else if (memcmp(p + 12, "VP8X", 4) == 0) {
            *w = LE24(p + 24) + 1;
            *h = LE24(p + 27) + 1;
        } else {
            return -1;
        }
    } else if (got >= 4 && p[0] == 0xFF && p[1] == 0xD8) {
        /* Walk the segments to the first start-of-frame marker. */
        size_t pos = 2;
        for (int seg = 0; seg < 256; seg++) {
            uint8_t m[9];
            if (b64_at(b64, len, pos, m, sizeof(m)) < sizeof(m) || m[0] != 0xFF)
                return -1;
            uint8_t type = m[1];
            if (type >= 0xC0 && type <= 0xCF && type != 0xC4 && type != 0xC8 && type != 0xCC) {
                *h = BE16(m + 5);
                *w = BE16(m + 7);
                return *w && *h ? 0 : -1;
            }
            pos += 2 + BE16(m + 2);
        }
        return -1;
    } else {
        return -1;
    }
    return *w && *h ? 0 : -1;
}

/* OpenAI's tile rule for one image at `url` (NULL: not given, as with a
 * file id) with `detail` (NULL: auto). */
static int64_t image_tokens_of(const char *url, const char *detail, const char *model)
{
    int mini = model && strstr(model, "4o-mini") != NULL;
    int64_t base = mini ? 2833 : 85, tile = mini ? 5667 : 170;
    if (detail && strcmp(detail, "low") == 0)
        return base;
    uint32_t w = 1024, h = 1024; /* unknown size: assume a typical 1024x1024 */
    const char *comma = url && strncmp(url, "data:", 5) == 0 ? strchr(url, ',') : NULL;
    if (comma && comma - url >= 7 && memcmp(comma - 7, ";base64", 7) == 0) {
        uint32_t iw, ih;
        if (image_size(comma + 1, strlen(comma + 1), &iw, &ih) == 0) {
            w = iw;
            h = ih;
        }
    }
    double dw = w, dh = h;
    if (dw > 2048 || dh > 2048) {
        double s = 2048 / (dw > dh ? dw : dh);
        dw *= s;
        dh *= s;
    }
    if (dw > 768 && dh > 768) {
        double s = 768 / (dw < dh ? dw : dh);
        dw *= s;
        dh *= s;
    }
    return base + tile * (int64_t)ceil(dw / 512) * (int64_t)ceil(dh / 512);
}

/* A chat image_url part's value: a URL, or {url, detail}. */
static int64_t image_tokens(const cJSON *image_url, const char *model)
{
    const char *url = cJSON_IsString(image_url) ? image_url->valuestring : str_field(image_url, "url");
    const char *detail = cJSON_IsObject(image_url) ? str_field(image_url, "detail") : NULL;

    return image_tokens_of(url, detail, model);
}

/* ---- OpenAI framing ---- */

/* The compact JSON text of `v` (a tool call's input, a tool's
 * input_schema, a response format's schema), counted as the model reads it. */
static int64_t count_json(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *v)
{
    char *text;
    int64_t n;

    if (v == NULL)
        return 0;
    if ((text = cJSON_PrintUnformatted(v)) == NULL)
        return -ENOMEM;
    n = count_str(t, enc, text);
    cJSON_free(text);
    return n;
}


static void openai_content(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *content,
                           const char *model, struct tally *s)
{
    const cJSON *part;
    cJSON_ArrayForEach(part, content)
    {
        const char *type = str_field(part, "type");
        const char *text = str_field(part, "text");
        if (text)
            add(s, count_str(t, enc, text));
        else if (type && strcmp(type, "image_url") == 0)
            add(s, image_tokens(cJSON_GetObjectItemCaseSensitive(part, "image_url"), model));
        else if (type && strcmp(type, "input_image") == 0) /* Responses: URL and detail here */
            add(s, image_tokens_of(str_field(part, "image_url"), str_field(part, "detail"), model));
    }
}

/* The arguments of a call: a function's "arguments", a custom tool's
 * free-form "input". */
static const char *call_args(const cJSON *fn)
{
    const char *args = str_field(fn, "arguments");

    return args ? args : str_field(fn, "input");
}

/* The called tool of one of chat's tool_calls: a function, or a custom tool. */
static const cJSON *call_of(const cJSON *call)
{
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");

    return fn ? fn : cJSON_GetObjectItemCaseSensitive(call, "custom");
}

/* A function call an assistant made earlier: name and arguments (an estimate). */
static void openai_call(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *fn,
                        struct tally *s)
{
    const char *name = str_field(fn, "name");
    const char *args = call_args(fn);
    add_fixed(s, OAI_PER_MESSAGE);
    if (name)
        add(s, count_str(t, enc, name));
    if (args)
        add(s, count_str(t, enc, args));
}

static void openai_message(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *msg,
                           const char *model, struct tally *s)
{
    add_fixed(s, OAI_PER_MESSAGE);
    const cJSON *field;
    cJSON_ArrayForEach(field, msg)
    {
        if (cJSON_IsString(field)) {
            add(s, count_str(t, enc, field->valuestring));
            if (field->string && strcmp(field->string, "name") == 0)
                add_fixed(s, OAI_PER_NAME);
        } else if (field->string && strcmp(field->string, "content") == 0 && cJSON_IsArray(field)) {
            openai_content(t, enc, field, model, s);
        } else if (field->string && strcmp(field->string, "tool_calls") == 0) {
            const cJSON *call;
            cJSON_ArrayForEach(call, field)
                openai_call(t, enc, call_of(call), s);
        } else if (field->string && strcmp(field->string, "function_call") == 0) {
            openai_call(t, enc, field, s);
        }
    }
}

/* Nested properties deeper than this are not counted (a bound on the
 * recursion; cJSON allows 1000 levels). */
#define TOOL_NESTING_MAX 16

static void openai_property(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *prop,
                            const struct tool_costs *c, int depth, struct tally *s);

/* The properties of an object parameter, or of an array's object items:
 * the model reads them as nested fields of the function's TypeScript
 * type, by name and type, without their descriptions (as the
 * openai-chat-tokens package renders them, which it checks against the
 * API's counts). The cookbook counts top-level properties only, so a
 * nested schema of any size counted as one property. */
static void openai_nested(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *prop,
                          const struct tool_costs *c, int depth, struct tally *s)
{
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(prop, "items");
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(prop, "properties"), *p;

    if (depth >= TOOL_NESTING_MAX)
        return;
    if (cJSON_IsObject(items))
        openai_nested(t, enc, items, c, depth + 1, s);
    if (!cJSON_IsObject(props))
        return;
    cJSON_ArrayForEach(p, props)
    {
        if (p->string)
            openai_property(t, enc, p, c, depth + 1, s);
    }
}

/* One property line "name:type:desc" plus its enum, per the cookbook
 * (depth 0: a top-level property), then its nested properties. */
static void openai_property(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *prop,
                            const struct tool_costs *c, int depth, struct tally *s)
{
    add_fixed(s, c->prop_key);
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(prop, "enum");
    if (cJSON_IsArray(en)) {
        add_fixed(s, c->enum_init);
        const cJSON *item;
        cJSON_ArrayForEach(item, en)
        {
            add_fixed(s, c->enum_item);
            if (cJSON_IsString(item))
                add(s, count_str(t, enc, item->valuestring));
        }
    }
    const char *type = str_field(prop, "type");
    struct buf *b = policy__tokens_line(t);
    int err = buf_append(b, prop->string, strlen(prop->string));
    err = err ? err : buf_append(b, ":", 1);
    err = err ? err : buf_append(b, type ? type : "", type ? strlen(type) : 0);
    err = err ? err : buf_append(b, ":", 1);
    err = err ? err : append_desc(b, depth == 0 ? str_field(prop, "description") : NULL);
    add(s, count_buf(t, enc, b, err));
    openai_nested(t, enc, prop, c, depth, s);
}

static void openai_tools(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *req,
                         struct tally *s)
{
    const struct tool_costs *c = enc == CONF_TOK_CL100K ? &costs_cl100k : &costs_o200k;
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(req, "tools");
    if (!cJSON_IsArray(tools) || cJSON_GetArraySize(tools) == 0)
        tools = cJSON_GetObjectItemCaseSensitive(req, "functions");
    if (!cJSON_IsArray(tools) || cJSON_GetArraySize(tools) == 0)
        return;
    const cJSON *tool;
    cJSON_ArrayForEach(tool, tools)
    {
        const cJSON *fn = call_of(tool); /* a function, or a custom tool */
        if (!fn)
            fn = tool; /* legacy "functions", Responses tools: the definition itself */
        add_fixed(s, c->func_init);
        const char *name = str_field(fn, "name");
        struct buf *b = policy__tokens_line(t);
        int err = buf_append(b, name ? name : "", name ? strlen(name) : 0);
        err = err ? err : buf_append(b, ":", 1);
        err = err ? err : append_desc(b, str_field(fn, "description"));
        add(s, count_buf(t, enc, b, err));
        const cJSON *params = cJSON_GetObjectItemCaseSensitive(fn, "parameters");
        const cJSON *props = cJSON_GetObjectItemCaseSensitive(params, "properties");
        if (cJSON_GetArraySize(props) > 0) {
            add_fixed(s, c->prop_init);
            const cJSON *prop;
            cJSON_ArrayForEach(prop, props)
            {
                if (prop->string)
                    openai_property(t, enc, prop, c, 0, s);
            }
        }
    }
    add_fixed(s, c->func_end);
}

/* A structured output's JSON schema (chat's response_format.json_schema,
 * the Responses API's text.format): the API puts it in the prompt, as it
 * does tools, and bills it as input. Its exact rendering is not
 * published: counted as its name, description and compact JSON schema. */
static void openai_format(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *format,
                          struct tally *s)
{
    const char *name = str_field(format, "name"), *desc = str_field(format, "description");

    if (!cJSON_IsObject(format))
        return;
    if (name)
        add(s, count_str(t, enc, name));
    if (desc)
        add(s, count_str(t, enc, desc));
    add(s, count_json(t, enc, cJSON_GetObjectItemCaseSensitive(format, "schema")));
}

/* ---- Llama 3 template ---- */

static int is_trim_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* "\n\n" + trimmed text of `content` (string, or text parts joined by "\n"). */
static int llama_body(struct buf *b, const cJSON *content)
{
    int err = buf_append(b, "\n\n", 2);
    size_t start = b->len;
    if (cJSON_IsString(content)) {
        err = err ? err : buf_append(b, content->valuestring, strlen(content->valuestring));
    } else if (cJSON_IsArray(content)) {
        const cJSON *part;
        cJSON_ArrayForEach(part, content)
        {
            const char *text = str_field(part, "text");
            if (!text)
                continue;
            if (b->len > start)
                err = err ? err : buf_append(b, "\n", 1);
            err = err ? err : buf_append(b, text, strlen(text));
        }
    }
    if (err)
        return err;
    /* Jinja's trim: drop leading and trailing whitespace. */
    size_t lo = start;
    while (lo < b->len && is_trim_space((unsigned char)b->data[lo]))
        lo++;
    size_t hi = b->len;
    while (hi > lo && is_trim_space((unsigned char)b->data[hi - 1]))
        hi--;
    memmove(b->data + start, b->data + lo, hi - lo);
    b->len = start + (hi - lo);
    return 0;
}

/* Tool definitions as the JSON text the template embeds (an estimate). */
static void llama_tools(struct policy_tokens *t, const cJSON *req, struct tally *s)
{
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(req, "tools");
    const cJSON *tool;
    if (!cJSON_IsArray(tools))
        return;
    cJSON_ArrayForEach(tool, tools)
    {
        struct buf *b = policy__tokens_line(t);
        int err = 0;
        /* Grow until the text fits; the buffer keeps its size for later. */
        for (size_t want = 1024;; want *= 2) {
            err = buf_reserve(b, want);
            if (err || cJSON_PrintPreallocated((cJSON *)tool, b->data, (int)b->cap, 0))
                break;
            if (want > (1u << 26)) {
                err = -ENOMEM;
                break;
            }
        }
        if (!err)
            b->len = strlen(b->data);
        add(s, count_buf(t, CONF_TOK_LLAMA3, b, err));
    }
}

/* One message of `role` (NULL: none) whose content is `content`. */
static void llama_message(struct policy_tokens *t, const char *role, const cJSON *content,
                          struct tally *s)
{
    add_fixed(s, 3); /* <|start_header_id|> <|end_header_id|> <|eot_id|> */
    if (role)
        add(s, count_str(t, CONF_TOK_LLAMA3, role));
    struct buf *b = policy__tokens_line(t);
    int err = llama_body(b, content);
    add(s, count_buf(t, CONF_TOK_LLAMA3, b, err));
}

/* After the messages: the generation prompt, then the tools. */
static int64_t llama_end(struct policy_tokens *t, const cJSON *req, struct tally *s)
{
    /* <|start_header_id|>assistant<|end_header_id|>"\n\n" */
    add_fixed(s, 2);
    add(s, count_str(t, CONF_TOK_LLAMA3, "assistant"));
    add(s, count_str(t, CONF_TOK_LLAMA3, "\n\n"));
    llama_tools(t, req, s);
    return s->err ? s->err : s->n;
}

/* A tool call ({name, arguments}) as Meta's Llama 3.1 template writes it
 * in an assistant message: {"name": NAME, "parameters": ARGUMENTS}. */
static void llama_call(struct policy_tokens *t, const cJSON *fn, struct tally *s)
{
    const char *name = str_field(fn, "name"), *args = call_args(fn);
    struct buf *b = policy__tokens_line(t);
    int err = buf_append(b, "{\"name\": \"", 10);

    err = err ? err : buf_append(b, name ? name : "", name ? strlen(name) : 0);
    err = err ? err : buf_append(b, "\", \"parameters\": ", 17);
    err = err ? err : buf_append(b, args ? args : "{}", args ? strlen(args) : 2);
    err = err ? err : buf_append(b, "}", 1);
    add(s, count_buf(t, CONF_TOK_LLAMA3, b, err));
}

/* An assistant message's tool calls (chat's tool_calls). */
static void llama_calls(struct policy_tokens *t, const cJSON *calls, struct tally *s)
{
    const cJSON *call;

    cJSON_ArrayForEach(call, calls)
        llama_call(t, call_of(call), s);
}

static int64_t llama_chat(struct policy_tokens *t, const cJSON *messages, const cJSON *req)
{
    struct tally s = {1, 0}; /* <|begin_of_text|> */
    const cJSON *msg;
    cJSON_ArrayForEach(msg, messages) {
        llama_message(t, str_field(msg, "role"), cJSON_GetObjectItemCaseSensitive(msg, "content"),
                      &s);
        llama_calls(t, cJSON_GetObjectItemCaseSensitive(msg, "tool_calls"), &s);
    }
    return llama_end(t, req, &s);
}

int64_t policy_tokens_chat(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *req)
{
    return policy_tokens_chat_for(t, enc, req, NULL);
}

int64_t policy_tokens_chat_for(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *req,
                               const char *model)
{
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(req, "messages");
    if (!cJSON_IsArray(messages))
        return -EINVAL;
    if (enc == CONF_TOK_LLAMA3)
        return llama_chat(t, messages, req);
    if (model == NULL)
        model = str_field(req, "model");
    struct tally s = {0, 0};
    const cJSON *msg;
    cJSON_ArrayForEach(msg, messages)
        openai_message(t, enc, msg, model, &s);
    add_fixed(&s, OAI_REPLY);
    openai_tools(t, enc, req, &s);
    openai_format(t, enc, cJSON_GetObjectItemCaseSensitive(
                              cJSON_GetObjectItemCaseSensitive(req, "response_format"), "json_schema"),
                  &s);
    return s.err ? s.err : s.n;
}

/* ---- Responses API ---- */

/* One message, framed as a chat message of `role` (NULL: none). */
static void responses_message(struct policy_tokens *t, enum conf_tokenizer enc, const char *role,
                              const cJSON *content, const char *model, struct tally *s)
{
    if (enc == CONF_TOK_LLAMA3) {
        llama_message(t, role, content, s);
        return;
    }
    add_fixed(s, OAI_PER_MESSAGE);
    if (role)
        add(s, count_str(t, enc, role));
    if (cJSON_IsString(content))
        add(s, count_str(t, enc, content->valuestring));
    else if (cJSON_IsArray(content))
        openai_content(t, enc, content, model, s); /* input_image, input_text, ...; no files */
}

/* One item of "input": a message (typed or not), a function or custom
 * tool call the model made, or its output; other kinds are not counted. */
static void responses_item(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *item,
                           const char *model, struct tally *s)
{
    const char *type = str_field(item, "type");

    if (type == NULL || strcmp(type, "message") == 0) {
        responses_message(t, enc, str_field(item, "role"),
                          cJSON_GetObjectItemCaseSensitive(item, "content"), model, s);
    } else if (strcmp(type, "function_call") == 0 || strcmp(type, "custom_tool_call") == 0) {
        if (enc != CONF_TOK_LLAMA3) {
            openai_call(t, enc, item, s);
        } else {
            llama_message(t, "assistant", NULL, s);
            llama_call(t, item, s);
        }
    } else if (strcmp(type, "function_call_output") == 0 ||
               strcmp(type, "custom_tool_call_output") == 0) {
        responses_message(t, enc, "tool", cJSON_GetObjectItemCaseSensitive(item, "output"), model,
                          s);
    }
}

int64_t policy_tokens_responses(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *req)
{
    return policy_tokens_responses_for(t, enc, req, NULL);
}

int64_t policy_tokens_responses_for(struct policy_tokens *t, enum conf_tokenizer enc,
                                    const cJSON *req, const char *model)
{
    const cJSON *input = cJSON_GetObjectItemCaseSensitive(req, "input");
    const cJSON *instructions = cJSON_GetObjectItemCaseSensitive(req, "instructions");
    struct tally s = {enc == CONF_TOK_LLAMA3 ? 1 : 0, 0}; /* Llama: <|begin_of_text|> */
    const cJSON *item, *format;

    if (model == NULL)
        model = str_field(req, "model");

    if (cJSON_IsString(instructions))
        responses_message(t, enc, "system", instructions, model, &s);
    if (cJSON_IsString(input))
        responses_message(t, enc, "user", input, model, &s);
    else
        cJSON_ArrayForEach(item, input)
            responses_item(t, enc, item, model, &s);
    if (enc == CONF_TOK_LLAMA3)
        return llama_end(t, req, &s);
    add_fixed(&s, OAI_REPLY);
    openai_tools(t, enc, req, &s);
    format = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(req, "text"), "format");
    if (str_field(format, "type") && strcmp(str_field(format, "type"), "json_schema") == 0)
        openai_format(t, enc, format, &s);
    return s.err ? s.err : s.n;
}

/* ---- Anthropic Messages API ---- */

/* Anthropic's image rule (vision guide): about width x height / 750
 * tokens, after an image whose long edge passes 1568 px is scaled down to
 * it, and at most about 1600 (the API scales larger ones down too). An
 * image whose size the request does not show (a URL, a file id) is
 * taken at the chat rule's unknown size, 1024 x 1024. */
static int64_t anthropic_image_tokens(const cJSON *block)
{
    const cJSON *source = cJSON_GetObjectItemCaseSensitive(block, "source");
    const char *data = str_field(source, "type") && strcmp(str_field(source, "type"), "base64") == 0
                           ? str_field(source, "data")
                           : NULL;
    uint32_t w = 1024, h = 1024, iw, ih;
    double dw, dh, n;

    if (data && image_size(data, strlen(data), &iw, &ih) == 0) {
        w = iw;
        h = ih;
    }
    dw = w;
    dh = h;
    if (dw > 1568 || dh > 1568) {
        double s = 1568 / (dw > dh ? dw : dh);
        dw *= s;
        dh *= s;
    }
    n = ceil(dw * dh / 750);
    return n > 1600 ? 1600 : (int64_t)n;
}


static void anthropic_content(struct policy_tokens *t, enum conf_tokenizer enc,
                              const cJSON *content, int depth, struct tally *s);

/* A document or search result block: its title and context, and the text
 * it carries: a plain-text source's data, a content source's blocks, a
 * search result's content. A PDF (base64, URL or file) is billed as its
 * pages' text and images, which the request does not show: not counted. */
static void anthropic_document(struct policy_tokens *t, enum conf_tokenizer enc,
                               const cJSON *block, int depth, struct tally *s)
{
    const cJSON *source = cJSON_GetObjectItemCaseSensitive(block, "source");
    const char *kind = str_field(source, "type"), *text;

    if ((text = str_field(block, "title")) != NULL)
        add(s, count_str(t, enc, text));
    if ((text = str_field(block, "context")) != NULL)
        add(s, count_str(t, enc, text));
    if (kind && strcmp(kind, "text") == 0 && (text = str_field(source, "data")) != NULL)
        add(s, count_str(t, enc, text));
    else if (kind && strcmp(kind, "content") == 0)
        anthropic_content(t, enc, cJSON_GetObjectItemCaseSensitive(source, "content"), depth + 1, s);
    if (cJSON_IsString(source)) /* a search result's source: its URL or name */
        add(s, count_str(t, enc, source->valuestring));
    anthropic_content(t, enc, cJSON_GetObjectItemCaseSensitive(block, "content"), depth + 1, s);
}

/* A message's (or a system prompt's, or a tool result's) content: a
 * string, or blocks. Counted: text, image (anthropic_image_tokens),
 * tool_use (name and input), tool_result (its content, the same way),
 * document and search_result (anthropic_document). Not counted: a PDF
 * document's pages, thinking, redacted_thinking, server tool blocks and
 * any other type. `depth` bounds the nesting of blocks in blocks. */
static void anthropic_content(struct policy_tokens *t, enum conf_tokenizer enc,
                              const cJSON *content, int depth, struct tally *s)
{
    const cJSON *block;

    if (cJSON_IsString(content)) {
        add(s, count_str(t, enc, content->valuestring));
        return;
    }
    if (!cJSON_IsArray(content))
        return;
    cJSON_ArrayForEach(block, content) {
        const char *type = str_field(block, "type"), *text = str_field(block, "text");

        if (type == NULL)
            continue;
        if (strcmp(type, "text") == 0 && text)
            add(s, count_str(t, enc, text));
        else if (strcmp(type, "image") == 0)
            add(s, anthropic_image_tokens(block));
        else if (strcmp(type, "tool_use") == 0) {
            const char *name = str_field(block, "name");

            if (name)
                add(s, count_str(t, enc, name));
            add(s, count_json(t, enc, cJSON_GetObjectItemCaseSensitive(block, "input")));
        } else if (strcmp(type, "tool_result") == 0 && depth == 0)
            anthropic_content(t, enc, cJSON_GetObjectItemCaseSensitive(block, "content"), 1, s);
        else if ((strcmp(type, "document") == 0 || strcmp(type, "search_result") == 0) &&
                 depth < 2)
            anthropic_document(t, enc, block, depth, s);
    }
}

/* The system prompt Anthropic adds to a request with tools ("tool use
 * system prompt token count", its pricing page for tool use): 346 tokens
 * with tool_choice auto or none, 313 with any or tool, for the Claude 4
 * and 3.7 models (older ones differ by up to 200). */
#define ANTHROPIC_TOOL_PROMPT 346
#define ANTHROPIC_TOOL_PROMPT_FORCED 313

static int anthropic_tool_prompt(const cJSON *tool_choice)
{
    const char *type = str_field(tool_choice, "type");

    return type && (strcmp(type, "any") == 0 || strcmp(type, "tool") == 0)
               ? ANTHROPIC_TOOL_PROMPT_FORCED
               : ANTHROPIC_TOOL_PROMPT;
}

int64_t policy_tokens_messages(struct policy_tokens *t, enum conf_tokenizer enc, const cJSON *req)
{
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(req, "messages");
    const cJSON *msg, *tool, *tools;
    struct tally s = {0, 0};

    if (!cJSON_IsArray(messages))
        return -EINVAL;
    if (cJSON_GetObjectItemCaseSensitive(req, "system") != NULL) {
        add_fixed(&s, OAI_PER_MESSAGE);
        anthropic_content(t, enc, cJSON_GetObjectItemCaseSensitive(req, "system"), 0, &s);
    }
    cJSON_ArrayForEach(msg, messages) {
        const char *role = str_field(msg, "role");

        add_fixed(&s, OAI_PER_MESSAGE);
        if (role)
            add(&s, count_str(t, enc, role));
        anthropic_content(t, enc, cJSON_GetObjectItemCaseSensitive(msg, "content"), 0, &s);
    }
    add_fixed(&s, OAI_REPLY);
    tools = cJSON_GetObjectItemCaseSensitive(req, "tools");
    if (cJSON_GetArraySize(tools) > 0 && cJSON_IsArray(tools))
        add_fixed(&s, anthropic_tool_prompt(cJSON_GetObjectItemCaseSensitive(req, "tool_choice")));
    cJSON_ArrayForEach(tool, tools) {
        const char *name = str_field(tool, "name"), *desc = str_field(tool, "description");

        add_fixed(&s, OAI_PER_MESSAGE);
        if (name)
            add(&s, count_str(t, enc, name));
        if (desc)
            add(&s, count_str(t, enc, desc));
        add(&s, count_json(t, enc, cJSON_GetObjectItemCaseSensitive(tool, "input_schema")));
    }
    return s.err ? s.err : s.n;
}
