/*
 * tests/support/browser.h: headless Chromium for tests.
 *
 * Chromium comes from Debian (mk/dashboard.mk installs it with make deps).
 * It runs with the flags this machine needs (no sandbox as root, no
 * background networking, a fresh profile folder).
 */
#ifndef TESTS_SUPPORT_BROWSER_H
#define TESTS_SUPPORT_BROWSER_H

/* Load `url` with a 12 s virtual-time budget (the page's fetches and
 * timers run) and return the serialized DOM (malloc'd, NUL-terminated).
 * `profile` is an empty folder for the browser profile. Fails the test
 * (Criterion assert) when Chromium is missing or does not finish in 60 s. */
char *support_dump_dom(const char *url, const char *profile);

#endif
