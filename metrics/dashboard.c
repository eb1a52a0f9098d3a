/*
 * metrics/dashboard.c: the dashboard page, embedded at build time.
 *
 * The assembler's .incbin copies metrics/dashboard.html into .rodata, so
 * no generated file or xxd is needed. mk/dashboard.mk passes the absolute
 * path (METRICS_DASHBOARD_HTML) and makes this object depend on the page.
 * A NUL byte follows the page so it can also be used as a C string.
 */
#include "metrics/metrics.h"

#ifndef METRICS_DASHBOARD_HTML
#define METRICS_DASHBOARD_HTML "metrics/dashboard.html"
#endif

__asm__(".pushsection .rodata\n"
        ".globl metrics__dashboard_start\n"
        ".hidden metrics__dashboard_start\n"
        ".globl metrics__dashboard_end\n"
        ".hidden metrics__dashboard_end\n"
        "metrics__dashboard_start:\n"
        ".incbin \"" METRICS_DASHBOARD_HTML "\"\n"
        "metrics__dashboard_end:\n"
        ".byte 0\n"
        ".popsection\n");

extern const char metrics__dashboard_start[];
extern const char metrics__dashboard_end[];

const char *metrics_dashboard(size_t *len)
{
    *len = (size_t)(metrics__dashboard_end - metrics__dashboard_start);
    return metrics__dashboard_start;
}
