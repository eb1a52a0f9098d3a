# mk/soak.mk: `make soak` runs bench/soak.sh: two routers built with
# AddressSanitizer and UndefinedBehaviorSanitizer (build-asan, as `make
# asan`) sharing one Redis, under a long mixed load with faulty backends,
# client hang-ups, reloads and a frozen Redis; it fails on a crash, a
# sanitizer report, a stuck request, or a tenant whose spend in Redis
# differs from the cost logs by a micro-dollar.
# SOAK_SECONDS sets the length (default 60). Not part of `make test`: it is
# a load run, and its figures are not benchmarks.
SOAK_SECONDS ?= 60

.PHONY: soak
soak: deps bench-tools
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 SAN="$(ASAN_SAN)" all
	bench/soak.sh $(SOAK_SECONDS)
