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

static int64_t chat(struct policy_tokens *t, enum conf_tokenizer enc, const char *json)
{
    cJSON *req = cJSON_Parse(json);
    cr_assert_not_null(req, "bad test JSON: %s", json);
    int64_t n = policy_tokens_chat(t, enc, req);
    cJSON_Delete(req);
    return n;
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
