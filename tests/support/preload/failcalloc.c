/*
 * tests/support/preload/failcalloc.c: an LD_PRELOAD shim for the router
 * under test: calloc returns NULL (errno ENOMEM) while the file named by
 * $COSTROUTER_TEST_FAIL_CALLOC exists, so a test can run the process out
 * of memory at a moment of its choosing and give the memory back after.
 *
 * Built as a shared object of its own (not among the support
 * files every test binary links), without the sanitizers: ASan's allocator
 * must own every block, so a sanitized router cannot take the shim.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

/* glibc's own calloc: dlsym(RTLD_NEXT) would itself call calloc. */
extern void *__libc_calloc(size_t nmemb, size_t size);

void *calloc(size_t nmemb, size_t size)
{
    const char *trigger = getenv("COSTROUTER_TEST_FAIL_CALLOC");

    if (trigger != NULL && access(trigger, F_OK) == 0) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_calloc(nmemb, size);
}
