# mk/bench.mk: `make bench-proxy` (part of `make bench`) runs bench/run.sh,
# costrouter against mockllm direct, nginx as a plain reverse proxy and the
# Portkey AI gateway on loopback, and writes bench/RESULTS.md (issue 7).
#
# Installs what it needs when missing: wrk and nginx (Debian; nginx's
# service is kept from starting), node/npm, and the Portkey gateway pinned
# into build/npm-portkey.
#
# Portkey 1.15.2 declares @hono/node-server ^1.3.3; from 1.14 on that
# package hands a fetch() Response's immutable headers through and every
# streamed answer fails with "TypeError: immutable" (Portkey-AI/gateway
# issue 1389). The override pins the last release before that change.
PORTKEY_NPM_VERSION := 1.15.2
PORTKEY_HONO_NODE_SERVER := 1.13.8
PORTKEY_DIR := build/npm-portkey
PORTKEY_NPM := $(PORTKEY_DIR)/node_modules/@portkey-ai/gateway/package.json
BENCH_PROBE := $(BUILD)/bench/probe
ALLOC_COUNT := $(BUILD)/bench/alloc_count.so

BENCH_TARGETS += bench-proxy
.PHONY: bench-proxy bench-tools

# From a clean clone, `make bench` needs the build's Debian packages and
# data before it compiles: fragments' prerequisites of `bench` come first.
bench: deps

$(BENCH_PROBE): $(BUILD)/bench/probe.o
	$(CC) $(LDFLAGS) -o $@ $^ -lssl -lcrypto

# A malloc counter preloaded into a costrouter (bench/alloc_count.c).
$(ALLOC_COUNT): bench/alloc_count.c common/fmt.h
	@mkdir -p $(dir $@)
	$(CC) -std=gnu11 -O2 -Wall -Wextra -I. -shared -fPIC -o $@ $<

# wrk, nginx and npm from Debian when missing. A temporary policy-rc.d
# keeps the nginx package from starting its system service on port 80.
bench-tools:
	@command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } \
	  && command -v npm >/dev/null 2>&1 || { \
	  echo "installing: wrk nginx-light nodejs npm (what is missing)"; \
	  rcd=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && rcd=1; fi; \
	  pkgs="wrk"; { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || pkgs="$$pkgs nginx-light"; \
	  command -v npm >/dev/null 2>&1 || pkgs="$$pkgs nodejs npm"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs; st=$$?; \
	  [ -z "$$rcd" ] || rm -f /usr/sbin/policy-rc.d; exit $$st; }

$(PORTKEY_NPM): mk/bench.mk | bench-tools
	@mkdir -p $(PORTKEY_DIR)
	printf '{"private":true,"dependencies":{"@portkey-ai/gateway":"%s"},"overrides":{"@hono/node-server":"%s"}}\n' \
	  $(PORTKEY_NPM_VERSION) $(PORTKEY_HONO_NODE_SERVER) > $(PORTKEY_DIR)/package.json
	cd $(PORTKEY_DIR) && npm install --no-audit --no-fund --loglevel=error
	@touch $@

# The tokenizer's and the store's benchmarks (mk/tokens.mk, mk/store.mk)
# run inside bench/run.sh too, so RESULTS.md carries their figures.
bench-proxy: bench-tools $(PORTKEY_NPM) $(BENCH_PROBE) $(ALLOC_COUNT) $(BIN) $(MOCK) \
             $(BUILD)/bench/tokenize $(BUILD)/bench/store build/tokens-test/expected.tsv
	BUILD=$(BUILD) BIN=$(BIN) bench/run.sh

# What serving clients over TLS costs: costrouter and nginx, each plain and
# TLS, side by side (bench/tls.sh, ~5 minutes); writes bench/RESULTS-tls.md.
# Not part of `make bench`.
.PHONY: bench-tls
bench-tls: deps bench-tools $(BENCH_PROBE) $(BIN) $(MOCK)
	BUILD=$(BUILD) BIN=$(BIN) bench/tls.sh
