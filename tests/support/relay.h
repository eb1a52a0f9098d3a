/*
 * tests/support/relay.h: a TCP relay between the store and a real
 * redis-server, on a thread of its own, that can act out the faults a
 * stopped or killed server cannot: refusing connections while Redis still
 * runs, and losing the reply to a script call that Redis did run.
 */
#ifndef TESTS_SUPPORT_RELAY_H
#define TESTS_SUPPORT_RELAY_H

struct test_relay;

/* Listen on a free loopback port and relay each connection to
 * 127.0.0.1:`port`. NULL on failure. */
struct test_relay *test_relay_start(int port);
/* The port it listens on. */
int test_relay_port(const struct test_relay *r);
/* down: close every relayed connection and every new one at once. */
void test_relay_down(struct test_relay *r, int down);
/* The next script call (EVALSHA) sent through the relay still reaches
 * Redis, but nothing Redis sends on that connection comes back any more:
 * the reply is lost after Redis applied the call. One shot. */
void test_relay_lose_next(struct test_relay *r);
/* How many connections lost their replies so far. */
int test_relay_lost(struct test_relay *r);
/* Close everything and join the thread. */
void test_relay_stop(struct test_relay *r);

#endif
