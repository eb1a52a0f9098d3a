# costrouter build. `make` builds ./costrouter; `make run` and `make test`
# also install what is missing (Debian packages, npm token tables) first.
#
# Layout: every module folder's *.c goes into build/libcostrouter.a; each
# tests/<module>/test_*.c becomes its own Criterion binary linked with it.

BUILD    ?= build
CC       ?= cc
OPT      ?= -O2
SAN      ?=
# The sanitizers of `make asan` (and of the soak and fuzz-http runs).
ASAN_SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
CFLAGS   ?= $(OPT) -g
CFLAGS   += -std=gnu11 -Wall -Wextra -Wno-unused-parameter -I. -I/usr/share/include/llhttp $(SAN) \
            -MMD -MP
LDFLAGS  += $(SAN)
LIBS     := -luv -lssl -lcrypto -lhiredis -lfyaml -lcjson -lyajl -lpcre2-8 -lxxhash -lm -lpthread

MODULES  := common conf router policy backends cache metrics cli
SRCS     := $(foreach m,$(MODULES),$(wildcard $(m)/*.c))
OBJS     := $(SRCS:%.c=$(BUILD)/%.o)
LLHTTP_SRCS := $(wildcard /usr/share/llhttp/*.c)
LLHTTP_OBJS := $(patsubst /usr/share/llhttp/%.c,$(BUILD)/llhttp/%.o,$(LLHTTP_SRCS))
LIB      := $(BUILD)/libcostrouter.a

MOCK_SRCS := $(wildcard bench/mockllm/*.c)
MOCK      := $(BUILD)/mockllm

SUPPORT_SRCS := $(wildcard tests/support/*.c)
SUPPORT_OBJS := $(SUPPORT_SRCS:%.c=$(BUILD)/%.o)
TEST_SRCS := $(wildcard tests/*/test_*.c)
TESTS     := $(TEST_SRCS:%.c=$(BUILD)/%)
# LD_PRELOAD shims that tests put under the router (tests/support/preload).
PRELOAD_SRCS := $(wildcard tests/support/preload/*.c)
PRELOADS     := $(PRELOAD_SRCS:%.c=$(BUILD)/%.so)

BIN      := costrouter
ifneq ($(BUILD),build)
BIN      := $(BUILD)/costrouter
endif

APT_PKGS := build-essential pkg-config libuv1-dev node-llhttp libssl-dev libhiredis-dev \
            libcriterion-dev redis-server libfyaml-dev libcjson-dev libpcre2-dev \
            libxxhash-dev libyajl-dev ca-certificates curl faketime

.PHONY: all deps run test asan all-tests clean bench
.SECONDARY:
.DEFAULT_GOAL := all

# Fragments owned by one feature each (data files to fetch, benchmarks).
# Each may append to DATA_TARGETS and BENCH_TARGETS.
DATA_TARGETS  :=
BENCH_TARGETS :=
include $(sort $(wildcard mk/*.mk))

.PHONY: data
data: $(DATA_TARGETS)

bench: all $(BENCH_TARGETS)

all: $(BIN) $(if $(MOCK_SRCS),$(MOCK))

# Install missing Debian packages (needs root; skipped when all present).
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@command -v npm >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	@$(MAKE) --no-print-directory data

$(BUILD)/llhttp/%.o: /usr/share/llhttp/%.c
	@mkdir -p $(dir $@)
	$(CC) $(OPT) -g $(SAN) -w -I/usr/share/include/llhttp -c $< -o $@

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(LIB): $(OBJS) $(LLHTTP_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(BIN): $(BUILD)/main.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(MOCK): $(MOCK_SRCS:%.c=$(BUILD)/%.o) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(SUPPORT_OBJS) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS) -lcriterion

# Without the sanitizers, which a shim loaded before their runtime could
# not initialize; they pass on to the next definition (ASan's, if any).
$(BUILD)/tests/support/preload/%.so: tests/support/preload/%.c
	@mkdir -p $(dir $@)
	$(CC) $(OPT) -g -std=gnu11 -Wall -Wextra -fPIC -shared -o $@ $< -ldl

$(TESTS): | $(PRELOADS)

# Run every test binary; each prints Criterion's synthesis line. Stops at
# the first failing binary with its name.
test: deps
	@$(MAKE) --no-print-directory all $(TESTS)
	@BUILD=$(BUILD) BIN=$(BIN) tests/run.sh $(TESTS)

# The same suite under AddressSanitizer + UndefinedBehaviorSanitizer, in
# its own build folder. Any sanitizer report fails the run (see run.sh).
asan: deps
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 \
	  SAN="$(ASAN_SAN)" all-tests
	@BUILD=build-asan BIN=build-asan/costrouter SANITIZED=1 tests/run.sh $(TESTS:$(BUILD)/%=build-asan/%)

all-tests: all $(TESTS)

run: deps all
	@BUILD=$(BUILD) conf/demo.sh

clean:
	rm -rf build build-asan build-tsan costrouter

-include $(OBJS:.o=.d) $(BUILD)/main.d $(MOCK_SRCS:%.c=$(BUILD)/%.d) $(TEST_SRCS:%.c=$(BUILD)/%.d) \
         $(SUPPORT_SRCS:%.c=$(BUILD)/%.d) $(wildcard $(BUILD)/bench/*.d)
