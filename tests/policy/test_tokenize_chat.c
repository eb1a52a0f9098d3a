/*
 * tests/policy/test_tokenize_chat.c: prompt token accounting for chat
 * requests, against usage.prompt_tokens values OpenAI documents in its
 * cookbook (examples/How_to_count_tokens_with_tiktoken.ipynb):
 * - example_messages: 129 prompt tokens for gpt-3.5-turbo-0613 / gpt-4
 *   (cl100k_base), 124 for gpt-4o / gpt-4o-mini (o200k_base);
 * - the get_current_weather tool example: 105 for gpt-3.5-turbo / gpt-4,
 *   101 for gpt-4o / gpt-4o-mini.
 * Image tiles: OpenAI's vision guide (a 2048x4096 high-detail image costs
 * 1105 tokens; low detail 85).
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <string.h>

#include "tests/policy/tokens_fixture.h"

static const char cookbook_messages[] =
    "[{\"role\":\"system\",\"content\":\"You are a helpful, pattern-following assistant that "
    "translates corporate jargon into plain English.\"},"
    "{\"role\":\"system\",\"name\":\"example_user\",\"content\":\"New synergies will help drive "
    "top-line growth.\"},"
    "{\"role\":\"system\",\"name\":\"example_assistant\",\"content\":\"Things working well "
    "together will increase revenue.\"},"
    "{\"role\":\"system\",\"name\":\"example_user\",\"content\":\"Let's circle back when we have "
    "more bandwidth to touch base on opportunities for increased leverage.\"},"
    "{\"role\":\"system\",\"name\":\"example_assistant\",\"content\":\"Let's talk later when "
    "we're less busy about how to do better.\"},"
    "{\"role\":\"user\",\"content\":\"This late pivot means we don't have time to boil the ocean "
    "for the client deliverable.\"}]";

static const char cookbook_tools[] =
    "{\"messages\":[{\"role\":\"system\",\"content\":\"You are a helpful assistant that can "
    "answer to questions about the weather.\"},{\"role\":\"user\",\"content\":\"What's the "
    "weather like in San Francisco?\"}],"
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_current_weather\","
    "\"description\":\"Get the current weather in a given location\",\"parameters\":{\"type\":"
    "\"object\",\"properties\":{\"location\":{\"type\":\"string\",\"description\":\"The city "
    "and state, e.g. San Francisco, CA\"},\"unit\":{\"type\":\"string\",\"description\":\"The "
    "unit of temperature to return\",\"enum\":[\"celsius\",\"fahrenheit\"]}},\"required\":"
    "[\"location\"]}}}]}";

/* What `count` (policy_tokens_chat, policy_tokens_responses) says of a
 * request body. */
static int64_t count_body(int64_t (*count)(struct policy_tokens *, enum conf_tokenizer,
                                           const cJSON *),
                          struct policy_tokens *t, enum conf_tokenizer enc, const char *json)
{
    cJSON *req = cJSON_Parse(json);
    cr_assert_not_null(req, "bad test JSON: %s", json);
    int64_t n = count(t, enc, req);
    cJSON_Delete(req);
    return n;
}

static int64_t chat(struct policy_tokens *t, enum conf_tokenizer enc, const char *json)
{
    return count_body(policy_tokens_chat, t, enc, json);
}

static int64_t messages_req(struct policy_tokens *t, enum conf_tokenizer enc, const char *msgs)
{
    char json[4096];
    snprintf(json, sizeof(json), "{\"model\":\"m\",\"messages\":%s}", msgs);
    return chat(t, enc, json);
}

Test(tokenize_chat, cookbook_example_messages, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    cr_expect_eq(messages_req(t, CONF_TOK_CL100K, cookbook_messages), 129);
    cr_expect_eq(messages_req(t, CONF_TOK_O200K, cookbook_messages), 124);
    policy_tokens_free(t);
}

Test(tokenize_chat, cookbook_tools_example, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    cr_expect_eq(chat(t, CONF_TOK_CL100K, cookbook_tools), 105);
    cr_expect_eq(chat(t, CONF_TOK_O200K, cookbook_tools), 101);
    policy_tokens_free(t);
}

/* A tool whose parameter "filter" is an object with two properties
 * (nested = 1), or the same object without them (0); with `items`, the
 * filter is an array of such objects. */
static int64_t hotel_tool(struct policy_tokens *t, enum conf_tokenizer enc, int nested,
                          int items)
{
    char json[2048];
    const char *inner =
        nested ? "\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\","
                 "\"description\":\"The exact name of the city to search in, spelled as the "
                 "user wrote it, without the country or the state\"},\"max_price\":{\"type\":"
                 "\"number\",\"description\":\"Highest nightly price in USD\"}},"
                 "\"required\":[\"city\"]"
               : "\"type\":\"object\"";

    snprintf(json, sizeof(json),
             "{\"messages\":[{\"role\":\"user\",\"content\":\"Find me a hotel\"}],"
             "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"search_hotels\","
             "\"description\":\"Search hotels\",\"parameters\":{\"type\":\"object\","
             "\"properties\":{\"filter\":{%s%s%s}}}}}]}",
             items ? "\"type\":\"array\",\"items\":{" : "", inner, items ? "}" : "");
    return chat(t, enc, json);
}

/* The model reads a function's nested properties too: the
 * openai-chat-tokens package (which renders functions as the TypeScript
 * the model sees and checks its counts against the API) counts this
 * tool's two nested properties as 11 tokens more than the empty object
 * (cl100k; names and types, not nested descriptions). The cookbook rule
 * stops at the top level, and the router counted them as nothing, for
 * schemas of any size. */
Test(tokenize_chat, nested_tool_properties_count, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();

    for (int enc = CONF_TOK_CL100K; enc <= CONF_TOK_O200K; enc++)
        for (int items = 0; items <= 1; items++) {
            int64_t more = hotel_tool(t, enc, 1, items) - hotel_tool(t, enc, 0, items);

            cr_expect(more >= 8 && more <= 16, "enc %d items %d: nested properties add %lld",
                      enc, items, (long long)more);
        }
    /* The cookbook's flat example is unchanged. */
    cr_expect_eq(chat(t, CONF_TOK_CL100K, cookbook_tools), 105);
    policy_tokens_free(t);
}

Test(tokenize_chat, text_parts_count_like_a_string, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    int64_t a = messages_req(t, CONF_TOK_O200K, "[{\"role\":\"user\",\"content\":\"Hello there\"}]");
    int64_t b = messages_req(t, CONF_TOK_O200K,
                             "[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hello there\"}]}]");
    cr_expect_eq(a, b);
    /* 3 per message + "user" + "Hello there" (2) + 3 reply priming */
    cr_expect_eq(a, 3 + 1 + 2 + 3);
    policy_tokens_free(t);
}

/* base64 of a PNG signature + IHDR chunk for 2048x4096. */
static const char png_2048x4096[] = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAACAAAABAACAYAAAA";
/* base64 of a GIF header, 100x50. */
static const char gif_100x50[] = "data:image/gif;base64,R0lGODlhZAAyAIAAAP";

Test(tokenize_chat, images_by_tile_rule, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    int64_t text_only = messages_req(t, CONF_TOK_O200K,
                                     "[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"x\"}]}]");
    char msgs[1024];
    const char *fmt = "[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"x\"},"
                      "{\"type\":\"image_url\",\"image_url\":{\"url\":\"%s\"%s}}]}]";
    /* OpenAI's example: 2048x4096 -> 1024x2048 -> 768x1536: 6 tiles, 85 + 6*170. */
    snprintf(msgs, sizeof(msgs), fmt, png_2048x4096, "");
    cr_expect_eq(messages_req(t, CONF_TOK_O200K, msgs) - text_only, 1105);
    snprintf(msgs, sizeof(msgs), fmt, png_2048x4096, ",\"detail\":\"low\"");
    cr_expect_eq(messages_req(t, CONF_TOK_O200K, msgs) - text_only, 85);
    /* 100x50 fits one tile. */
    snprintf(msgs, sizeof(msgs), fmt, gif_100x50, "");
    cr_expect_eq(messages_req(t, CONF_TOK_O200K, msgs) - text_only, 85 + 170);
    /* A remote URL: size unknown, assumed 1024x1024 -> 768x768: 4 tiles. */
    snprintf(msgs, sizeof(msgs), fmt, "https://example.com/cat.jpg", "");
    cr_expect_eq(messages_req(t, CONF_TOK_O200K, msgs) - text_only, 85 + 4 * 170);
    policy_tokens_free(t);
}

Test(tokenize_chat, llama3_template, .timeout = 20)
{
    /* Reference: llama3-tokenizer-js 1.2.0 on the rendered template
     * "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are
     * a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>
     * \n\nWhat's the capital of France?<|eot_id|><|start_header_id|>assistant
     * <|end_header_id|>\n\n" gives 28 tokens. Content is trimmed. */
    struct policy_tokens *t = fixture_tokens();
    cr_expect_eq(messages_req(t, CONF_TOK_LLAMA3,
                              "[{\"role\":\"system\",\"content\":\"You are a helpful assistant.\"},"
                              "{\"role\":\"user\",\"content\":\"  What's the capital of France?\\n\"}]"),
                 28);
    policy_tokens_free(t);
}

/* An assistant message that calls a tool: Meta's Llama 3.1 template
 * writes the call as {"name": NAME, "parameters": ARGUMENTS}. Reference:
 * llama3-tokenizer-js 1.2.0 on "<|begin_of_text|><|start_header_id|>user
 * <|end_header_id|>\n\nWhat is the weather in Paris?<|eot_id|>
 * <|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather",
 * "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>
 * <|start_header_id|>assistant<|end_header_id|>\n\n" gives 45 tokens. The
 * call counted as nothing (its content is null), so a conversation of
 * large tool calls was held for its framing alone. */
Test(tokenize_chat, llama3_tool_calls_count, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();

    cr_expect_eq(messages_req(t, CONF_TOK_LLAMA3,
                              "[{\"role\":\"user\",\"content\":\"What is the weather in Paris?\"},"
                              "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":"
                              "\"c1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
                              "\"arguments\":\"{\\\"city\\\": \\\"Paris\\\", \\\"unit\\\": "
                              "\\\"celsius\\\"}\"}}]}]"),
                 45);
    /* The same turn as Responses API items. */
    cr_expect_eq(count_body(policy_tokens_responses, t, CONF_TOK_LLAMA3,
                            "{\"input\":[{\"role\":\"user\",\"content\":\"What is the weather in "
                            "Paris?\"},{\"type\":\"function_call\",\"call_id\":\"c1\",\"name\":"
                            "\"get_weather\",\"arguments\":\"{\\\"city\\\": \\\"Paris\\\", "
                            "\\\"unit\\\": \\\"celsius\\\"}\"}]}"),
                 45);
    policy_tokens_free(t);
}

Test(tokenize_chat, estimate_and_errors, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    /* 3 + estimate("user")=1 + estimate("abcdefgh")=2 + 3 */
    cr_expect_eq(messages_req(t, CONF_TOK_ESTIMATE, "[{\"role\":\"user\",\"content\":\"abcdefgh\"}]"), 9);
    cr_expect_eq(chat(t, CONF_TOK_O200K, "{\"model\":\"x\"}"), -EINVAL);
    cr_expect_eq(chat(t, CONF_TOK_O200K, "{\"messages\":{}}"), -EINVAL);
    /* Odd shapes are tolerated, not crashed on. */
    cr_expect_geq(chat(t, CONF_TOK_O200K, "{\"messages\":[1,null,{\"content\":[{\"type\":\"image_url\"}]}],"
                                          "\"tools\":[{},{\"function\":{\"parameters\":{\"properties\":{\"a\":{}}}}}]}"),
                  0);
    cr_expect_geq(chat(t, CONF_TOK_LLAMA3, "{\"messages\":[{\"content\":[{\"text\":\" \"}]}],\"tools\":[{\"a\":1}]}"), 0);
    policy_tokens_free(t);
}

/* ---- Responses API requests (policy_tokens_responses) ---- */

static int64_t responses(struct policy_tokens *t, enum conf_tokenizer enc, const char *json)
{
    return count_body(policy_tokens_responses, t, enc, json);
}

/* The Responses API documents no framing: each message it carries is
 * counted as the same chat message would be, so a request counts what
 * its chat twin does, by every tokenizer, and the cookbook's tool example
 * (tools flat, as the Responses API writes them) what OpenAI bills for
 * it in chat. */
Test(tokenize_chat, responses_count_as_their_chat_twins, .timeout = 20)
{
    static const struct {
        const char *responses; /* a /v1/responses body */
        const char *chat;      /* the same as /v1/chat/completions */
    } twins[] = {
        {"{\"instructions\":\"You are a helpful assistant.\","
         "\"input\":\"  What's the capital of France?\\n\"}",
         "{\"messages\":[{\"role\":\"system\",\"content\":\"You are a helpful assistant.\"},"
         "{\"role\":\"user\",\"content\":\"  What's the capital of France?\\n\"}]}"},
        {"{\"input\":[{\"role\":\"developer\",\"content\":\"Be brief.\"},{\"type\":\"message\","
         "\"role\":\"user\",\"content\":[{\"type\":\"input_text\",\"text\":\"Hello\"},"
         "{\"type\":\"input_text\",\"text\":\"there\"},{\"type\":\"input_file\",\"file_id\":\"f\"}]},"
         "{\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi!\"}]}]}",
         "{\"messages\":[{\"role\":\"developer\",\"content\":\"Be brief.\"},{\"role\":\"user\","
         "\"content\":[{\"type\":\"text\",\"text\":\"Hello\"},{\"type\":\"text\",\"text\":\"there\"}]},"
         "{\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":\"Hi!\"}]}]}"},
        {"{\"input\":[{\"type\":\"function_call_output\",\"call_id\":\"c1\",\"output\":\"22 C\"}]}",
         "{\"messages\":[{\"role\":\"tool\",\"content\":\"22 C\"}]}"},
        {"{\"instructions\":\"You are a helpful assistant that can answer to questions about the "
         "weather.\",\"input\":\"What's the weather like in San Francisco?\","
         "\"tools\":[{\"type\":\"function\",\"name\":\"get_current_weather\","
         "\"description\":\"Get the current weather in a given location\",\"parameters\":{\"type\":"
         "\"object\",\"properties\":{\"location\":{\"type\":\"string\",\"description\":\"The city "
         "and state, e.g. San Francisco, CA\"},\"unit\":{\"type\":\"string\",\"description\":\"The "
         "unit of temperature to return\",\"enum\":[\"celsius\",\"fahrenheit\"]}},\"required\":"
         "[\"location\"]}}]}",
         cookbook_tools},
    };
    static const enum conf_tokenizer encs[] = {CONF_TOK_CL100K, CONF_TOK_O200K, CONF_TOK_LLAMA3};
    struct policy_tokens *t = fixture_tokens();

    /* Llama counts tools as the JSON text written, flat or not: the
     * tools twin is OpenAI's alone. */
    for (size_t i = 0; i < sizeof(twins) / sizeof(twins[0]); i++)
        for (size_t e = 0; e < (i == 3 ? 2 : sizeof(encs) / sizeof(encs[0])); e++)
            cr_expect_eq(responses(t, encs[e], twins[i].responses), chat(t, encs[e], twins[i].chat),
                         "twin %zu, encoding %zu", i, e);
    cr_expect_eq(responses(t, CONF_TOK_O200K, twins[3].responses), 101);
    cr_expect_eq(responses(t, CONF_TOK_CL100K, twins[3].responses), 105);
    policy_tokens_free(t);
}

/* A function call is counted as chat counts an earlier tool call, an
 * input_image by the tile rule; other items are not counted, odd shapes
 * are not crashed on. */
/* A call of a custom tool carries free-form "input" where a function
 * call has "arguments" (chat: tool_calls[].custom; Responses: a
 * custom_tool_call item, answered by a custom_tool_call_output). They
 * counted as framing alone (chat, Responses) or nothing at all (their
 * outputs), so code an agent sent through a custom tool was not held. */
Test(tokenize_chat, custom_tool_calls_count_as_function_calls, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    static const char code[] = "import math\\nprint(sum(math.sqrt(i) for i in range(100)))";

    for (int enc = CONF_TOK_CL100K; enc <= CONF_TOK_LLAMA3; enc++) {
        char custom[512], function[512];

        snprintf(custom, sizeof(custom),
                 "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c1\","
                 "\"type\":\"custom\",\"custom\":{\"name\":\"python\",\"input\":\"%s\"}}]}]}",
                 code);
        snprintf(function, sizeof(function),
                 "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c1\","
                 "\"type\":\"function\",\"function\":{\"name\":\"python\",\"arguments\":"
                 "\"%s\"}}]}]}",
                 code);
        cr_expect_eq(chat(t, enc, custom), chat(t, enc, function), "chat, enc %d", enc);
        snprintf(custom, sizeof(custom),
                 "{\"input\":[{\"type\":\"custom_tool_call\",\"call_id\":\"c1\",\"name\":"
                 "\"python\",\"input\":\"%s\"},{\"type\":\"custom_tool_call_output\","
                 "\"call_id\":\"c1\",\"output\":\"661.46\"}]}",
                 code);
        snprintf(function, sizeof(function),
                 "{\"input\":[{\"type\":\"function_call\",\"call_id\":\"c1\",\"name\":"
                 "\"python\",\"arguments\":\"%s\"},{\"type\":\"function_call_output\","
                 "\"call_id\":\"c1\",\"output\":\"661.46\"}]}",
                 code);
        cr_expect_eq(responses(t, enc, custom), responses(t, enc, function), "responses, enc %d",
                     enc);
    }
    /* A custom tool's definition (chat: tools[].custom) by its name and
     * description, as a function's without parameters. */
    for (int enc = CONF_TOK_CL100K; enc <= CONF_TOK_O200K; enc++)
        cr_expect_eq(chat(t, enc, "{\"messages\":[],\"tools\":[{\"type\":\"custom\",\"custom\":"
                                  "{\"name\":\"python\",\"description\":\"Runs Python code "
                                  "and returns what it prints\"}}]}"),
                     chat(t, enc, "{\"messages\":[],\"tools\":[{\"type\":\"function\",\"function\":"
                                  "{\"name\":\"python\",\"description\":\"Runs Python code "
                                  "and returns what it prints\"}}]}"),
                     "custom tool definition, enc %d", enc);
    policy_tokens_free(t);
}

/* A structured output's JSON schema is put in the prompt and billed as
 * input, as tools are; it counted as nothing, so a request whose schema
 * is most of its prompt was held for its messages alone. Counted as its
 * name and compact JSON (the rendering is not published), in chat's
 * response_format and the Responses API's text.format. */
Test(tokenize_chat, a_response_formats_schema_counts, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    static const char schema[] = "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":"
                                 "\"string\"},\"population\":{\"type\":\"integer\"}},"
                                 "\"required\":[\"city\",\"population\"]}";
    char with[1024];

    for (int enc = CONF_TOK_CL100K; enc <= CONF_TOK_O200K; enc++) {
        int64_t more = policy_tokens_count(t, enc, "city_facts", 10) +
                       policy_tokens_count(t, enc, schema, strlen(schema));

        snprintf(with, sizeof(with),
                 "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris\"}],"
                 "\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":"
                 "\"city_facts\",\"strict\":true,\"schema\":%s}}}",
                 schema);
        cr_expect_eq(chat(t, enc, with) -
                         chat(t, enc, "{\"messages\":[{\"role\":\"user\",\"content\":\"Paris\"}]}"),
                     more, "chat, enc %d", enc);
        snprintf(with, sizeof(with),
                 "{\"input\":\"Paris\",\"text\":{\"format\":{\"type\":\"json_schema\","
                 "\"name\":\"city_facts\",\"strict\":true,\"schema\":%s}}}",
                 schema);
        cr_expect_eq(responses(t, enc, with) - responses(t, enc, "{\"input\":\"Paris\"}"), more,
                     "responses, enc %d", enc);
    }
    policy_tokens_free(t);
}

Test(tokenize_chat, responses_calls_images_and_odd_shapes, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    int64_t base = responses(t, CONF_TOK_O200K, "{\"input\":[]}");
    char body[1024];

    cr_expect_eq(base, 3); /* the reply priming */
    cr_expect_eq(responses(t, CONF_TOK_O200K,
                           "{\"input\":[{\"type\":\"function_call\",\"call_id\":\"c\","
                           "\"name\":\"get_weather\",\"arguments\":\"{}\"}]}") - base,
                 3 + policy_tokens_count(t, CONF_TOK_O200K, "get_weather", 11) +
                     policy_tokens_count(t, CONF_TOK_O200K, "{}", 2));
    snprintf(body, sizeof(body),
             "{\"input\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_image\","
             "\"image_url\":\"%s\"%s}]}]}", png_2048x4096, "");
    int64_t with_role = responses(t, CONF_TOK_O200K, "{\"input\":[{\"role\":\"user\",\"content\":[]}]}");
    cr_expect_eq(responses(t, CONF_TOK_O200K, body) - with_role, 1105);
    snprintf(body, sizeof(body),
             "{\"input\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_image\","
             "\"image_url\":\"%s\"%s}]}]}", png_2048x4096, ",\"detail\":\"low\"");
    cr_expect_eq(responses(t, CONF_TOK_O200K, body) - with_role, 85);
    cr_expect_eq(responses(t, CONF_TOK_O200K,
                           "{\"input\":[{\"type\":\"reasoning\",\"summary\":[]},"
                           "{\"type\":\"item_reference\",\"id\":\"x\"}]}"),
                 base);
    for (int e = CONF_TOK_CL100K; e <= CONF_TOK_LLAMA3; e++) {
        cr_expect_geq(responses(t, e, "{\"input\":5,\"instructions\":[1]}"), 0);
        cr_expect_geq(responses(t, e, "{\"input\":[1,null,{\"content\":{}},{\"type\":7},"
                                      "{\"type\":\"function_call\"},{\"content\":[{\"type\":"
                                      "\"input_image\"}]}],\"tools\":[{}]}"),
                      0);
    }
    policy_tokens_free(t);
}

/* ---- Anthropic Messages API requests (policy_tokens_messages) ---- */

static int64_t anthropic(struct policy_tokens *t, const char *json)
{
    return count_body(policy_tokens_messages, t, CONF_TOK_O200K, json);
}

static int64_t o200k(struct policy_tokens *t, const char *s)
{
    return policy_tokens_count(t, CONF_TOK_O200K, s, strlen(s));
}

/* PNG headers in base64: 1000x500 and 3000x3000. */
#define PNG_1000x500 "iVBORw0KGgoAAAANSUhEUgAAA+gAAAH0CAYAAAA="
#define PNG_3000x3000 "iVBORw0KGgoAAAANSUhEUgAAC7gAAAu4CAYAAAA="

/* Framing: 3 per message (and per system prompt, per tool), 3 for the
 * reply; the texts by the backend's tokenizer. */
Test(tokenize_chat, messages_system_text_and_framing, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    int64_t base = anthropic(t, "{\"messages\":[]}");

    cr_expect_eq(base, 3);
    cr_expect_eq(anthropic(t, "{\"system\":\"Be terse.\",\"messages\":[{\"role\":\"user\","
                              "\"content\":\"Hello there\"}]}"),
                 3 + o200k(t, "Be terse.") + 3 + o200k(t, "user") + o200k(t, "Hello there") + 3);
    /* system as text blocks, content as blocks: the same count */
    cr_expect_eq(anthropic(t, "{\"system\":[{\"type\":\"text\",\"text\":\"Be terse.\"}],"
                              "\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
                              "\"text\":\"Hello there\"}]}]}"),
                 anthropic(t, "{\"system\":\"Be terse.\",\"messages\":[{\"role\":\"user\","
                              "\"content\":\"Hello there\"}]}"));
    cr_expect_eq(anthropic(t, "{\"system\":5}"), -EINVAL); /* no messages */
    policy_tokens_free(t);
}

/* Images by Anthropic's rule: w x h / 750, the long edge scaled to 1568,
 * at most 1600; of unknown size, as 1024 x 1024 (1399). */
Test(tokenize_chat, messages_images_by_anthropics_rule, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    static const char fmt[] = "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\","
                              "\"source\":%s}]}]}";
    int64_t empty = anthropic(t, "{\"messages\":[{\"role\":\"user\",\"content\":[]}]}");
    char body[512];

    snprintf(body, sizeof(body), fmt,
             "{\"type\":\"base64\",\"media_type\":\"image/png\",\"data\":\"" PNG_1000x500 "\"}");
    cr_expect_eq(anthropic(t, body) - empty, 667);
    snprintf(body, sizeof(body), fmt,
             "{\"type\":\"base64\",\"media_type\":\"image/png\",\"data\":\"" PNG_3000x3000 "\"}");
    cr_expect_eq(anthropic(t, body) - empty, 1600);
    snprintf(body, sizeof(body), fmt, "{\"type\":\"url\",\"url\":\"https://x/y.png\"}");
    cr_expect_eq(anthropic(t, body) - empty, 1399);
    policy_tokens_free(t);
}

/* tool_use by its name and input as compact JSON; tool_result by its
 * content (string or blocks); tools by name, description and
 * input_schema; PDF documents and thinking blocks not at all. */
Test(tokenize_chat, messages_tools_results_and_what_is_not_counted, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    int64_t empty = anthropic(t, "{\"messages\":[{\"role\":\"user\",\"content\":[]}]}");

    cr_expect_eq(anthropic(t, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
                              "\"tool_use\",\"id\":\"t1\",\"name\":\"get_weather\",\"input\":"
                              "{ \"city\" : \"Paris\" }}]}]}") - empty,
                 o200k(t, "get_weather") + o200k(t, "{\"city\":\"Paris\"}"));
    cr_expect_eq(anthropic(t, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
                              "\"tool_result\",\"tool_use_id\":\"t1\",\"content\":\"sunny\"}]}]}") -
                     empty,
                 o200k(t, "sunny"));
    cr_expect_eq(anthropic(t, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
                              "\"tool_result\",\"tool_use_id\":\"t1\",\"content\":[{\"type\":"
                              "\"text\",\"text\":\"sunny\"}]}]}]}") - empty,
                 o200k(t, "sunny"));
    cr_expect_eq(anthropic(t, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
                              "\"document\",\"source\":{\"type\":\"base64\",\"media_type\":"
                              "\"application/pdf\",\"data\":\"JVBERi0x\"}},{\"type\":"
                              "\"thinking\",\"thinking\":\"hmm\"}]}]}"),
                 empty);
    cr_expect_eq(anthropic(t, "{\"messages\":[],\"tools\":[{\"name\":\"get_weather\","
                              "\"description\":\"Weather now\",\"input_schema\":{\"type\":"
                              "\"object\"}}]}") - 3,
                 346 + 3 + o200k(t, "get_weather") + o200k(t, "Weather now") +
                     o200k(t, "{\"type\":\"object\"}"));
    /* odd shapes are not crashed on */
    cr_expect_geq(anthropic(t, "{\"messages\":[1,null,{\"content\":{}},{\"content\":[5,{}]},"
                               "{\"content\":[{\"type\":\"image\"},{\"type\":\"tool_result\"}]}],"
                               "\"tools\":[{},5],\"system\":[1]}"),
                  0);
    policy_tokens_free(t);
}

/* A plain-text document shows its text, and is billed for it (with its
 * title and context); so are a document of content blocks and a search
 * result, in a message or a tool result. They counted as nothing: a
 * request carrying a whole book as a text document was held for its
 * framing alone. */
Test(tokenize_chat, messages_text_documents_and_search_results_count, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    static const char text[] = "Call me Ishmael. Some years ago, never mind how long precisely, "
                               "having little or no money in my purse, I thought I would sail.";
    int64_t empty = anthropic(t, "{\"messages\":[{\"role\":\"user\",\"content\":[]}]}");
    char body[1024];

    snprintf(body, sizeof(body),
             "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"document\","
             "\"title\":\"Moby Dick\",\"context\":\"chapter 1\",\"source\":{\"type\":"
             "\"text\",\"media_type\":\"text/plain\",\"data\":\"%s\"}}]}]}",
             text);
    cr_expect_eq(anthropic(t, body) - empty,
                 o200k(t, text) + o200k(t, "Moby Dick") + o200k(t, "chapter 1"));
    snprintf(body, sizeof(body),
             "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"document\","
             "\"source\":{\"type\":\"content\",\"content\":[{\"type\":\"text\","
             "\"text\":\"%s\"}]}}]}]}",
             text);
    cr_expect_eq(anthropic(t, body) - empty, o200k(t, text));
    snprintf(body, sizeof(body),
             "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\","
             "\"tool_use_id\":\"t1\",\"content\":[{\"type\":\"search_result\",\"source\":"
             "\"https://x/moby\",\"title\":\"Moby Dick\",\"content\":[{\"type\":\"text\","
             "\"text\":\"%s\"}]}]}]}]}",
             text);
    cr_expect_eq(anthropic(t, body) - empty,
                 o200k(t, text) + o200k(t, "Moby Dick") + o200k(t, "https://x/moby"));
    policy_tokens_free(t);
}

/* Anthropic adds a system prompt of its own to a request with tools: 346
 * tokens (tool_choice auto or none), 313 (any or tool) for the current
 * models, by its pricing page for tool use. It was not held. */
Test(tokenize_chat, messages_tools_add_anthropics_tool_prompt, .timeout = 20)
{
    struct policy_tokens *t = fixture_tokens();
    static const char tool[] = "\"tools\":[{\"name\":\"f\",\"input_schema\":{}}]";
    char body[256];
    int64_t one_tool, plain = anthropic(t, "{\"messages\":[]}");

    snprintf(body, sizeof(body), "{\"messages\":[],%s}", tool);
    one_tool = 3 + o200k(t, "f") + o200k(t, "{}");
    cr_expect_eq(anthropic(t, body) - plain, 346 + one_tool);
    snprintf(body, sizeof(body), "{\"messages\":[],%s,\"tool_choice\":{\"type\":\"none\"}}", tool);
    cr_expect_eq(anthropic(t, body) - plain, 346 + one_tool);
    snprintf(body, sizeof(body), "{\"messages\":[],%s,\"tool_choice\":{\"type\":\"any\"}}", tool);
    cr_expect_eq(anthropic(t, body) - plain, 313 + one_tool);
    snprintf(body, sizeof(body),
             "{\"messages\":[],%s,\"tool_choice\":{\"type\":\"tool\",\"name\":\"f\"}}", tool);
    cr_expect_eq(anthropic(t, body) - plain, 313 + one_tool);
    cr_expect_eq(anthropic(t, "{\"messages\":[],\"tools\":[]}"), plain, "no tools, no prompt");
    policy_tokens_free(t);
}
