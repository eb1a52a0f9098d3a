/* common/log.c: the one place log lines are formatted. */
#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

int log_threshold = LOG_LEVEL_INFO;

static const char *const level_names[] = {"ERROR", "WARN", "INFO", "DEBUG"};

int log_every_due(struct log_every *t, uint64_t now_ms, char note[LOG_EVERY_NOTE_MAX])
{
    if (t->last_ms != 0 && now_ms - t->last_ms < (t->interval_ms ? t->interval_ms : 1000)) {
        t->skipped++;
        return 0;
    }
    note[0] = '\0';
    if (t->skipped > 0)
        snprintf(note, LOG_EVERY_NOTE_MAX, " (and %lu more since the last such line)",
                 t->skipped);
    t->last_ms = now_ms ? now_ms : 1;
    t->skipped = 0;
    return 1;
}

/* Format one line into a stack buffer and write it with a single fwrite so
 * lines from concurrent processes sharing a terminal do not interleave. */
void log_write(int level, const char *file, int line, const char *fmt, ...)
{
    char buf[1024];
    struct timespec ts;
    struct tm tm;
    int n, m;
    va_list ap;

    if (level > log_threshold)
        return;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s:%d ",
                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                 ts.tv_nsec / 1000000, level_names[level], file, line);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return;
    va_start(ap, fmt);
    m = vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    n += m;
    if ((size_t)n > sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    fwrite(buf, 1, (size_t)n, stderr);
}
