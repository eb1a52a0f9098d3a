/*
 * policy/tokenize.h: exact prompt token counts, calibrated estimates and
 * output-token prediction.
 *
 * Exact counts use byte-pair encoding identical to tiktoken (cl100k_base,
 * o200k_base) and to Llama 3's tokenizer, with each encoding's split regex
 * run by PCRE2's JIT. Rank tables are loaded once at start-up from the
 * files mk/tokens.mk builds (data/tokens/NAME.tok); counting does no I/O and,
 * once its scratch buffers have grown to the largest input seen, no
 * allocation. A struct policy_tokens is not thread-safe (it owns scratch
 * buffers): use one per event-loop thread.
 *
 * Special tokens written in the text (e.g. "<|endoftext|>") count as plain
 * text, like js-tiktoken's encode(text, [], []). Input that is not valid
 * UTF-8 is decoded as a WHATWG decoder does (each maximal invalid subpart
 * becomes U+FFFD), so counts match the reference run on the same bytes.
 */
#ifndef POLICY_TOKENIZE_H
#define POLICY_TOKENIZE_H

#include <stddef.h>
#include <stdint.h>

#include "conf/conf.h"

struct cJSON;
struct policy_tokens;

/*
 * Load cl100k_base.tok, o200k_base.tok and llama3.tok from `dir` (NULL:
 * $COSTROUTER_DATA if set, else "./data/tokens"), build their lookup tables
 * and JIT-compile the split patterns. On success stores a new object in
 * *out (free with policy_tokens_free) and returns 0; otherwise returns
 * -ENOENT (a file is missing), -EINVAL (a file is malformed), -ENOMEM or
 * another negative errno from reading, and leaves *out NULL.
 */
int policy_tokens_load(struct policy_tokens **out, const char *dir)
    __attribute__((warn_unused_result));

/* The largest token count taken from outside (a request's max_tokens, an
 * upstream's usage): a bigger number is not a count of anything real, and
 * one like 1e300 would not fit an int64_t. */
#define POLICY_TOKENS_COUNT_MAX 1e12

/* Every encoding, as a `need` mask: bit (1u << e) for enum conf_tokenizer e. */
#define POLICY_TOKENS_ALL                                                                  \
    ((1u << CONF_TOK_CL100K) | (1u << CONF_TOK_O200K) | (1u << CONF_TOK_LLAMA3))

/*
 * policy_tokens_load for only the encodings in `need` (CONF_TOK_ESTIMATE's
 * bit means nothing): each table costs ~10 MB, so a router loads those its
 * config names. Counting with one not loaded returns -ENOENT.
 */
int policy_tokens_load_some(struct policy_tokens **out, const char *dir, unsigned need)
    __attribute__((warn_unused_result));

/*
 * Load the encodings of `need` that `t` lacks, from the folder it was
 * loaded from (a reloaded config naming a new one). Blocks while it reads
 * and compiles, ~40 ms an encoding. Every one is tried: those that load
 * stay, whatever failed (policy_tokens_has tells which). Returns 0, or
 * the first error as policy_tokens_load does.
 */
int policy_tokens_add(struct policy_tokens *t, unsigned need) __attribute__((warn_unused_result));

/* The file name of `enc`'s table ("llama3.tok"), for messages; NULL for
 * CONF_TOK_ESTIMATE. */
const char *policy_tokens_file(enum conf_tokenizer enc);

/* Whether `t` (NULL: none loaded) can count exactly with `enc`;
 * CONF_TOK_ESTIMATE always can. */
int policy_tokens_has(const struct policy_tokens *t, enum conf_tokenizer enc);

/* Free everything policy_tokens_load made. NULL is fine. */
void policy_tokens_free(struct policy_tokens *t);

/*
 * Number of tokens `enc` makes of the `len` bytes at `p` (p may be NULL
 * when len is 0). For CONF_TOK_ESTIMATE this is the raw byte/char estimate
 * (see policy_tokens_estimate), before any calibration. Returns the count,
 * -ENOMEM if a scratch buffer could not grow, or -ENOENT if `enc` was not
 * loaded.
 */
int64_t policy_tokens_count(struct policy_tokens *t, enum conf_tokenizer enc, const char *p,
                            size_t len);

/*
 * policy_tokens_count, remembering the counts of recent strings of 64
 * bytes or more: the same system prompt or earlier turn of a conversation
 * is then counted once, not on every request that carries it. Keyed by a
 * 64-bit hash of the bytes, seeded at random per process (a collision, as
 * unlikely as 2^-64 per pair, would only skew one estimate: spend settles
 * on the backend's reported usage). What the router calls.
 */
int64_t policy_tokens_count_cached(struct policy_tokens *t, enum conf_tokenizer enc,
                                   const char *p, size_t len);

/*
 * Like policy_tokens_count, and also writes the first min(count, cap)
 * token ids to `ids` (CONF_TOK_ESTIMATE writes none). Returns the full
 * count or -ENOMEM. For tests and the CLI; the router only counts.
 */
int64_t policy_tokens_encode(struct policy_tokens *t, enum conf_tokenizer enc, const char *p,
                             size_t len, uint32_t *ids, size_t cap);

/*
 * Raw estimate for models whose vocabulary is unknown: a quarter token per
 * ASCII byte plus 0.4 token per byte of other UTF-8 text, rounded up.
 * Pure; no object needed.
 */
int64_t policy_tokens_estimate(const char *p, size_t len);

/*
 * Prompt tokens of a parsed chat completion request `req` (the JSON object
 * with "messages", optional "tools"/"functions") as the upstream reports
 * them in usage.prompt_tokens:
 * - OpenAI encodings follow the OpenAI cookbook ("How to count tokens with
 *   tiktoken"): 3 tokens per message, +1 per "name", 3 to prime the reply;
 *   tool/function definitions by the cookbook's num_tokens_for_tools rule,
 *   plus properties nested in objects and array items by name and type;
 *   earlier tool calls (function or custom) by name and arguments/input;
 *   a response_format JSON schema by its name and compact JSON;
 *   images by the tile rule (detail "low": 85; otherwise fit in 2048x2048,
 *   shortest side 768, 170 per 512px tile + 85; gpt-4o-mini models: 2833 +
 *   5667 per tile), dimensions read from a data: URL's PNG/GIF/JPEG/WebP
 *   header, else assumed 1024x1024.
 * - CONF_TOK_LLAMA3 follows Llama 3's chat template: <|begin_of_text|>, per
 *   message <|start_header_id|>role<|end_header_id|>"\n\n" trimmed content
 *   <|eot_id|>, then the assistant header; an assistant's tool calls as
 *   {"name": NAME, "parameters": ARGUMENTS}; tools are counted as their
 *   JSON text.
 * - CONF_TOK_ESTIMATE uses the OpenAI framing with estimated text (raw,
 *   uncalibrated: apply policy_calib_apply).
 * Returns the count (>= 0), -EINVAL if req has no "messages" array, or
 * -ENOMEM.
 */
int64_t policy_tokens_chat(struct policy_tokens *t, enum conf_tokenizer enc,
                           const struct cJSON *req);

/* policy_tokens_chat for the upstream `model` (NULL: the request's
 * "model"), whose name picks the image rule: a router's client names a
 * route, not the model it reaches. */
int64_t policy_tokens_chat_for(struct policy_tokens *t, enum conf_tokenizer enc,
                               const struct cJSON *req, const char *model);

/*
 * Prompt tokens of a Responses API request (POST /v1/responses), by the
 * chat framing of `enc`: the API does not document its own, so each
 * message is framed as a chat message is (calibration and the settled
 * usage correct the difference). Counted: "instructions" (a system
 * message); "input" as a string (a user message) or as items: messages
 * {role, content} whose content is a string or parts (input_text and
 * output_text by their "text", input_image as the chat path prices an
 * image; input_file and other parts are not counted), function_call and
 * custom_tool_call items (name and arguments or input, as an earlier tool
 * call in chat) and function_call_output and custom_tool_call_output
 * items ("output", as a tool message); other items
 * (reasoning, item references, built-in tool calls) are not counted; and
 * "tools" as the chat path counts them (the Responses API writes a
 * function's name, description and parameters at the tool's top level,
 * which that count reads), and a text.format JSON schema as chat's
 * response_format. What previous_response_id or conversation
 * bring in is not in the request and not counted. Returns the count
 * (>= 0) or -ENOMEM.
 */
int64_t policy_tokens_responses(struct policy_tokens *t, enum conf_tokenizer enc,
                                const struct cJSON *req);

/* policy_tokens_responses for the upstream `model`, as policy_tokens_chat_for. */
int64_t policy_tokens_responses_for(struct policy_tokens *t, enum conf_tokenizer enc,
                                    const struct cJSON *req, const char *model);

/*
 * Prompt tokens of an Anthropic Messages API request (POST /v1/messages),
 * counted with `enc`, the backend's tokenizer: Claude's own is not public,
 * so this is an estimate that the calibration and the settled usage
 * correct. Each message, the system prompt and each tool is framed as an
 * OpenAI chat message is (3 tokens), plus 3 for the reply. Counted:
 * "system" (a string or text blocks); "messages" whose content is a
 * string or blocks: text, image (about width x height / 750, the long
 * edge scaled to 1568 px, at most 1600; an image of unknown size as
 * 1024 x 1024), tool_use (name and input as compact JSON), tool_result
 * (its content, a string or blocks, the same way), document (title,
 * context, a text source's data or a content source's blocks) and
 * search_result (source, title, content); "tools" (name, description and
 * input_schema as compact JSON, and once Anthropic's tool-use system
 * prompt: 346 tokens, 313 with tool_choice any or tool). Not counted: PDF
 * documents, thinking blocks, server tool blocks and other types. Returns
 * the count (>= 0), -EINVAL when "messages" is not an array, or -ENOMEM.
 */
int64_t policy_tokens_messages(struct policy_tokens *t, enum conf_tokenizer enc,
                               const struct cJSON *req);

/*
 * Online calibration of estimates for one backend: an exponentially
 * weighted moving average of reported / estimated prompt tokens. Owned by
 * the caller (one per backend), zero-initialised by policy_calib_init.
 */
struct policy_calib {
    double ratio;     /* current reported/estimated factor, 1.0 before samples */
    double alpha;     /* EWMA weight of each new sample, default 0.2 */
    uint64_t samples; /* observations taken so far (for metrics) */
};

/* Reset `c` to ratio 1.0, no samples, default weight. */
void policy_calib_init(struct policy_calib *c);

/* `raw` scaled by the current ratio, rounded to nearest, at least 0. */
int64_t policy_calib_apply(const struct policy_calib *c, int64_t raw);

/*
 * Feed one observation: `raw` is the uncalibrated estimate made for a
 * request, `reported` the upstream's usage.prompt_tokens. Ignored unless
 * both are > 0. Each sample's ratio is clamped to [0.05, 20] so one bad
 * report cannot swing the estimate by more than that.
 */
void policy_calib_observe(struct policy_calib *c, int64_t raw, int64_t reported);

/*
 * Output-token prediction for one (tenant, route): a ring of the most
 * recent observed completion lengths and their cached high quantile.
 * Owned by the caller (the router keeps one per tenant and route).
 */
#define POLICY_OUTPRED_WINDOW 128
struct policy_outpred {
    uint32_t ring[POLICY_OUTPRED_WINDOW]; /* recent completion_tokens values */
    uint32_t n;                           /* valid entries in ring, <= WINDOW */
    uint32_t next;                        /* ring slot the next sample goes to */
    uint32_t quantile;                    /* P95 of ring as of the last predict that needed it */
    unsigned stale:1;                     /* observed since quantile was computed */
};

/* Empty predictor. */
void policy_outpred_init(struct policy_outpred *o);

/* The completions `req` (may be NULL) asks for, each up to its cap: "n"
 * (chat, legacy completions), or "best_of" when larger (completions
 * generated and billed, n of them returned), times the prompts of a
 * legacy completion's "prompt" array (each is answered on its own). At
 * least 1; saturates far past any budget. */
int64_t policy_outpred_choices(const struct cJSON *req);

/* Record the usage.completion_tokens (negative ignored) of an answer of
 * `choices` completions (policy_outpred_choices of its request), per
 * choice: divided by `choices`, since policy_outpred_predict multiplies by
 * it. O(1). */
void policy_outpred_observe(struct policy_outpred *o, int64_t completion_tokens,
                            int64_t choices);

/* The completion tokens `req` caps each choice at: its
 * "max_completion_tokens" or "max_tokens" (the smaller if both), else a
 * Responses request's "max_output_tokens", each counted only when a
 * number of at least 1 (-1, 0 or 0.5 cap nothing: LM Studio and llama.cpp
 * read -1 as no limit); 0 when none does. `req` may be NULL. */
int64_t policy_outpred_cap(const struct cJSON *req);

/*
 * Completion tokens to reserve for a request of `choices` completions
 * (policy_outpred_choices) capped at `cap` each (policy_outpred_cap): the
 * cap when > 0; else the P95 of recent completions once at least 8 were
 * observed; else `fallback`; times `choices`. The caller reads the two
 * from the request once, as it needs them elsewhere too. `o` may be NULL.
 * O(WINDOW) when the P95 is needed and new samples came since it was last
 * computed, else O(1).
 */
int64_t policy_outpred_predict(struct policy_outpred *o, int64_t choices, int64_t cap,
                               int64_t fallback);

#endif
