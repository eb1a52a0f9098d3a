# Store benchmark (bench/store.c): begin+settle requests/s with Redis and
# with the in-process store in one run; results go to bench/RESULTS-store.md.
STORE_BENCH := $(BUILD)/bench/store

$(STORE_BENCH): $(BUILD)/bench/store.o $(BUILD)/tests/support/redis.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

.PHONY: bench-store
bench-store: $(STORE_BENCH)
	$(STORE_BENCH)

BENCH_TARGETS += bench-store
