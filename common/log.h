/*
 * common/log.h: leveled logging to stderr with file:line.
 *
 * log_debug compiles to nothing unless COMMON_LOG_DEBUG is defined, so the
 * hot path pays nothing for it. Never pass secrets (API keys, tenant keys)
 * to these macros: logs are read by people who must not see them.
 *
 * Threads: log_write may be called from any thread (a stack buffer,
 * gmtime_r and one fwrite, which stdio locks); log_threshold is set only
 * while the options are read, before any thread starts. A struct log_every
 * belongs to one thread (the loop's, so far): log_every_due is not locked.
 */
#ifndef COMMON_LOG_H
#define COMMON_LOG_H

#include <stdint.h>

enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

/* Messages above this level are dropped; set from -v / config. */
extern int log_threshold;

void log_write(int level, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define log_error(...) log_write(LOG_LEVEL_ERROR, __FILE__, __LINE__, __VA_ARGS__)
#define log_warn(...) log_write(LOG_LEVEL_WARN, __FILE__, __LINE__, __VA_ARGS__)
#define log_info(...) log_write(LOG_LEVEL_INFO, __FILE__, __LINE__, __VA_ARGS__)
/* A line that may come thousands of times a second (what every request
 * meets during an outage): one goes through a second (or every
 * interval_ms), the rest are counted, and the next line says how many.
 * Zero it before use. */
struct log_every {
    uint64_t last_ms;      /* when one last went through, 0: never */
    unsigned long skipped; /* held back since */
    unsigned interval_ms;  /* between two lines; 0: 1000 */
};

#define LOG_EVERY_NOTE_MAX 64

/* 1 when a line is due at `now_ms` (ms of a monotonic clock): `note` then
 * gets " (and N more since the last such line)" or "" to end it with.
 * Else 0, and the line is counted. */
int log_every_due(struct log_every *t, uint64_t now_ms, char note[LOG_EVERY_NOTE_MAX]);

#ifdef COMMON_LOG_DEBUG
#define log_debug(...) log_write(LOG_LEVEL_DEBUG, __FILE__, __LINE__, __VA_ARGS__)
#else
#define log_debug(...) ((void)0)
#endif

#endif
