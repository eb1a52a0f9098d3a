/*
 * tests/support/preload/failcalloc.c: an LD_PRELOAD shim for the router
 * under test: calloc returns NULL (errno ENOMEM) while the file named by
 * $COSTROUTER_TEST_FAIL_CALLOC exists, so a test can run the process out
 * of memory at a moment of its choosing and give the memory back after.
 *
 * Otherwise it calls the next calloc in the lookup order: glibc's, or in
 * a sanitized router ASan's, which must own every block its free() gets
 * (ASan wants its runtime first in the list of libraries: the test turns
 * that check off with ASAN_OPTIONS=verify_asan_link_order=0). Built as a
 * shared object of its own, not among the support files every test
 * binary links, and without the sanitizers.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static void *(*next_calloc)(size_t nmemb, size_t size);
static __thread int looking_up; /* in dlsym, which might allocate */

void *calloc(size_t nmemb, size_t size)
{
    const char *trigger = getenv("COSTROUTER_TEST_FAIL_CALLOC");

    if (trigger != NULL && access(trigger, F_OK) == 0) {
        errno = ENOMEM;
        return NULL;
    }
    if (next_calloc == NULL) {
        if (looking_up)
            return NULL; /* dlsym copes with no memory */
        looking_up = 1;
        next_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
        looking_up = 0;
        if (next_calloc == NULL)
            abort();
    }
    return next_calloc(nmemb, size);
}
