/* policy/internal.h: helpers shared between files of policy/ only. */
#ifndef POLICY_INTERNAL_H
#define POLICY_INTERNAL_H

struct buf;
struct policy_tokens;

/*
 * A scratch buffer owned by `t` for building text to count (chat framing
 * lines). Its contents are the caller's until the next call; it keeps its
 * memory, so steady-state requests do not allocate.
 */
struct buf *policy__tokens_line(struct policy_tokens *t);

#endif
