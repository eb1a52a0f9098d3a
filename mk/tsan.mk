# mk/tsan.mk: `make tsan`: ThreadSanitizer over the router's own threads
# (the cost log's writer, the config loader of reloads, libuv's pool).
#
# The router and mockllm are built with -fsanitize=thread into build-tsan/,
# and the whole suite runs against them. The Criterion binaries themselves
# stay as `make test` builds them: Criterion cannot start under
# ThreadSanitizer (see tests/support/tsan/criterion/criterion.h), so the
# in-process tests of the threads (TSAN_INPROC: the cost log's) are built
# again with TSan against a stand-in runner of that API. Any report fails
# the run: TSAN_OPTIONS (tests/run.sh) halts the process at the first one
# and writes it to build-tsan/test-logs/tsan/, which run.sh checks, even
# for routers whose stderr a test sends to a file.

TSAN_SAN    := -fsanitize=thread
TSAN_INPROC := metrics/test_costlog
TSAN_RUNNER := tests/support/tsan/runner.c

# An in-process test against the stand-in (only with BUILD=build-tsan). No
# tests/support/*.o: they are built against the real Criterion. A header
# the test includes changes $(LIB) too, which rebuilds it.
$(BUILD)/tsan/%-tsan: tests/%.c $(TSAN_RUNNER) tests/support/tsan/criterion/criterion.h $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/support/tsan $(LDFLAGS) -o $@ $< $(TSAN_RUNNER) $(LIB) $(LIBS)

tsan: deps
	@$(MAKE) --no-print-directory all $(TESTS)
	@$(MAKE) --no-print-directory BUILD=build-tsan OPT=-O1 SAN="$(TSAN_SAN)" \
	  build-tsan/costrouter build-tsan/mockllm build-tsan/fuzz_http \
	  $(PRELOAD_SRCS:%.c=build-tsan/%.so) $(TSAN_INPROC:%=build-tsan/tsan/%-tsan)
	@BUILD=build-tsan BIN=build-tsan/costrouter TSAN=1 tests/run.sh \
	  $(TSAN_INPROC:%=build-tsan/tsan/%-tsan) $(TESTS)

.PHONY: tsan
