# mk/fuzz.mk: libFuzzer targets, built with clang (ASan, UBSan) in their
# own folder, build-fuzz/. Each runs for FUZZ_SECONDS (30) from a seed
# corpus; a failing input is written to build-fuzz/crash-*. Replay one with
# e.g. build-fuzz/fuzz_sse build-fuzz/crash-...
# fuzz-tokenize (the tokenizer) is in mk/tokens.mk, next to its tables.

FUZZ_CFLAGS := -std=gnu11 -g -O1 -I. -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined

# clang from Debian when missing (libFuzzer comes with it).
fuzz-tools:
	@command -v clang >/dev/null 2>&1 || { echo "installing: clang"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang; }

# What the router reads out of an upstream's answer (router/sse.c, and
# router/bigusage.c for answers too big to hold).
FUZZ_SSE_SRCS := tests/fuzz/fuzz_sse.c router/sse.c router/bigusage.c common/buf.c conf/tier.c
build-fuzz/fuzz_sse: $(FUZZ_SSE_SRCS) router/internal.h conf/conf.h | fuzz-tools
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -I/usr/share/include/llhttp -o $@ $(FUZZ_SSE_SRCS) -lcjson -lyajl

# Seeds: a stream's last events, a whole non-streamed answer, and one with
# "usage" and "choices" nested and in a string. The first byte of an input
# is where it is cut in two reads (tests/fuzz/fuzz_sse.c), hence the 'x'.
fuzz-sse: build-fuzz/fuzz_sse
	@mkdir -p build-fuzz/corpus-sse
	@printf 'xdata: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":16,"prompt_tokens_details":{"cached_tokens":0}}}\n\ndata: [DONE]\n\n' \
	    > build-fuzz/corpus-sse/stream
	@printf 'x{"id":"x","choices":[{"message":{"content":"hi"}}],"usage" : {"prompt_tokens":9,"completion_tokens":16}}' \
	    > build-fuzz/corpus-sse/body
	@printf 'x{"choices":[{"message":{"usage":{"prompt_tokens":1}},"x":"\\"usage\\":{"}],"meta":{"choices":[]},"usage":{"completion_tokens":2}}' \
	    > build-fuzz/corpus-sse/nested
	build-fuzz/fuzz_sse -max_total_time=$(or $(FUZZ_SECONDS),30) -max_len=4096 \
	    -dict=tests/fuzz/sse.dict -artifact_prefix=build-fuzz/ build-fuzz/corpus-sse

# The cost log line (metrics/costlog.c) from any strings and numbers.
FUZZ_COSTLOG_SRCS := tests/fuzz/fuzz_costlog.c tests/support/utf8check.c metrics/costlog.c \
                     metrics/metrics.c common/buf.c \
                     common/utf8.c common/log.c
build-fuzz/fuzz_costlog: $(FUZZ_COSTLOG_SRCS) metrics/metrics.h | fuzz-tools
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -o $@ $(FUZZ_COSTLOG_SRCS) -lcjson -luv -lxxhash -lm

# Seed: a request id, tenant, route, backend, no arm, a reason, a tag, a
# candidate, then numbers (zeros).
fuzz-costlog: build-fuzz/fuzz_costlog
	@mkdir -p build-fuzz/corpus-costlog
	@printf 'cr-1\0acme\0gpt-4o-mini\0mock-api\0\0cheapest-qualifying\0team\0ml\0mock-api\0' \
	    > build-fuzz/corpus-costlog/record
	build-fuzz/fuzz_costlog -max_total_time=$(or $(FUZZ_SECONDS),30) -max_len=1024 \
	    -artifact_prefix=build-fuzz/ build-fuzz/corpus-costlog

# The config loader (conf/): YAML, ${ENV}, included price files,
# validation, addresses. It runs at start, on --check-config and on every
# reload, on a thread of the serving router.
FUZZ_CONF_SRCS := tests/fuzz/fuzz_conf.c conf/conf.c conf/parse.c conf/check.c conf/addr.c conf/tier.c \
                  common/buf.c common/utf8.c
build-fuzz/fuzz_conf: $(FUZZ_CONF_SRCS) conf/conf.h conf/internal.h | fuzz-tools
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -o $@ $(FUZZ_CONF_SRCS) -lfyaml -lcrypto -lm

# Seeds: the shipped configs and the test suite's (valid and not). The
# harness loads each input as build-fuzz/conf-root/config.yaml, with the
# price files the seeds include under the names they use, and
# COSTROUTER_SRC set to that folder; the part of an input after a line
# "#%inc%" is its fuzz-inc.yaml (seed-include includes it). Inputs stay under 16 KiB: libfyaml's
# duplicate-key check is quadratic in a mapping's keys (20k keys take
# seconds), which would only time the fuzzer out. -rss_limit_mb and
# -timeout catch memory blowups and hangs, -detect_leaks (ASan's default,
# said outright) what an invalid config leaves behind.
fuzz-conf: build-fuzz/fuzz_conf
	@mkdir -p build-fuzz/corpus-conf build-fuzz/conf-root/conf build-fuzz/conf-root/inc \
	    build-fuzz/conf-root/tests/conf/data
	@cp conf/prices.yaml build-fuzz/conf-root/
	@cp conf/prices.yaml build-fuzz/conf-root/conf/
	@cp tests/conf/data/inc/*.yaml build-fuzz/conf-root/inc/
	@for f in conf/*.yaml tests/conf/data/*.yaml tests/conf/data/inc/*.yaml; do \
	    cp $$f build-fuzz/corpus-conf/seed-$$(echo $$f | tr / -); done
	@{ sed 's/^include: prices.yaml/include: [prices.yaml, fuzz-inc.yaml]/' conf/demo.yaml; \
	    echo '#%inc%'; cat tests/conf/data/inc/prices_small.yaml; } > build-fuzz/corpus-conf/seed-include
	build-fuzz/fuzz_conf -max_total_time=$(or $(FUZZ_SECONDS),30) -max_len=16384 \
	    -rss_limit_mb=2048 -timeout=10 -detect_leaks=1 -dict=tests/fuzz/conf.dict \
	    -artifact_prefix=build-fuzz/ build-fuzz/corpus-conf

.PHONY: fuzz-tools fuzz-sse fuzz-costlog fuzz-conf

# The whole request path, black-box (tests/fuzz/fuzz_http.c): a router
# built as `make asan` builds it, in front of two mockllm, sent generated
# requests for FUZZ_SECONDS (30), reloaded every 2 s. FUZZ_SEED=N sends a
# run's requests again; FUZZ_STORE=redis puts the spend in a redis-server
# of its own, frozen now and then; FUZZ_TLS=1 has the router serve TLS
# (a throwaway test CA) and the driver connect over it. The driver is a plain test program
# (build/), not a libFuzzer target.
$(BUILD)/fuzz_http: tests/fuzz/fuzz_http.c $(BUILD)/tests/support/http.o $(BUILD)/tests/support/proc.o \
                   $(BUILD)/tests/support/redis.o $(BUILD)/tests/support/utf8check.o $(LIB)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS)

fuzz-http: deps $(BUILD)/fuzz_http $(MOCK)
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 SAN="$(ASAN_SAN)" build-asan/costrouter
	$(BUILD)/fuzz_http $(if $(filter redis,$(FUZZ_STORE)),--redis) $(if $(FUZZ_TLS),--tls) \
	  build-asan/costrouter $(MOCK) \
	  $(or $(FUZZ_SECONDS),30) $(FUZZ_SEED)

.PHONY: fuzz-http

# `make test` and `make asan` run it briefly (tests/fuzz/test_request_path.c).
$(BUILD)/tests/fuzz/test_request_path: | $(BUILD)/fuzz_http
