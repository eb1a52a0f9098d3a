/* metrics/internal.h: helpers shared by the files of metrics/. */
#ifndef METRICS_INTERNAL_H
#define METRICS_INTERNAL_H

#include <stddef.h>

/*
 * Write finite `v` into out (NUL-terminated) in the shortest of %.15g and
 * %.17g that reads back as the same double, so 0.1 stays "0.1" and no
 * precision is lost. Returns the length. Callers handle NaN and infinities.
 */
size_t metrics__dtoa(char out[32], double v);

#endif
