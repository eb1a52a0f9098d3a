/*
 * cache/file.c: what the store's two files share (jfile.c: the Redis
 * journal kept across a stop; sfile.c: the in-process store's spend kept
 * across a restart): replacing a file whole, the lock that keeps each file
 * to one router, and the numbers and days their JSON lines hold.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "cache/internal.h"
#include "common/log.h"

#define FILE_INT_MAX 9007199254740992.0 /* 2^53: integers a double holds exactly */
#define FILE_LINE_MAX 4096                /* longer: not a line the router wrote */

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* fsync the folder holding `path`, so that a rename or unlink in it
 * survives a power cut. */
static int sync_folder(const char *path)
{
    char copy[PATH_MAX];
    int fd, rc;

    snprintf(copy, sizeof(copy), "%s", path);
    fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    rc = fsync(fd);
    close(fd);
    return rc;
}

int cache__file_replace(const char *path, const char *data, size_t len)
{
    char tmp[PATH_MAX];
    int fd, err;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return errno = ENAMETOOLONG, -1;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    if (write_all(fd, data, len) < 0 || fsync(fd) < 0) {
        err = errno;
        close(fd);
        unlink(tmp);
        return errno = err, -1;
    }
    if (close(fd) < 0 || rename(tmp, path) < 0) {
        err = errno;
        unlink(tmp);
        return errno = err, -1;
    }
    return sync_folder(path);
}

int cache__file_lock(const char *path, const char *what)
{
    char lock[PATH_MAX];
    int fd;

    if (snprintf(lock, sizeof(lock), "%s.lock", path) >= (int)sizeof(lock)) {
        log_error("%s %s: path too long", what, path);
        return -1;
    }
    fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        log_error("%s %s: cannot open %s: %s", what, path, lock, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        log_error("%s %s: %s", what, path,
                  errno == EWOULDBLOCK ? "in use by another router (each needs a file of its own)"
                                       : strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

void cache__file_day_text(const struct cache__period *p, char out[16])
{
    time_t t = (time_t)p->day * 86400;
    struct tm tm;

    gmtime_r(&t, &tm);
    strftime(out, 16, "%Y-%m-%d", &tm);
}

int cache__file_parse_day(const char *s, struct cache__period *p)
{
    struct tm tm = {0};
    int y, m, d, n = 0;
    time_t t;

    if (sscanf(s, "%4d-%2d-%2d%n", &y, &m, &d, &n) != 3 || s[n] != '\0' || y < 1970 ||
        m < 1 || m > 12 || d < 1 || d > 31)
        return -1;
    tm.tm_year = y - 1900;
    tm.tm_mon = m - 1;
    tm.tm_mday = d;
    t = timegm(&tm);
    if (t < 0 || tm.tm_mday != d) /* 31 February rolled over */
        return -1;
    p->day = (uint32_t)(t / 86400);
    p->month = (uint32_t)(y * 12 + m - 1);
    return 0;
}

const char *cache__file_each_object(FILE *f, cache__file_object_fn *fn, void *arg,
                                    size_t *lineno)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    const char *why = NULL;

    *lineno = 0;
    while (why == NULL && (len = getline(&line, &cap, f)) >= 0) {
        cJSON *o;
        yajl_val exact;

        ++*lineno;
        if (len > FILE_LINE_MAX || (size_t)len != strlen(line)) {
            why = "line too long or holds a NUL";
            break;
        }
        o = cJSON_Parse(line);
        exact = cJSON_IsObject(o) ? yajl_tree_parse(line, NULL, 0) : NULL;
        why = cJSON_IsObject(o) ? fn(arg, o, exact, *lineno) : "not a JSON object";
        cJSON_Delete(o);
        yajl_tree_free(exact);
    }
    free(line);
    if (why == NULL && ferror(f))
        why = strerror(errno);
    return why;
}

int cache__file_get_int(const cJSON *o, const struct yajl_val_s *exact, const char *name,
                        int64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    const char *path[] = {name, NULL};
    yajl_val x = exact ? yajl_tree_get((yajl_val)exact, path, yajl_t_number) : NULL;

    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble != floor(v->valuedouble))
        return -1;
    /* Written as an integer (as the router writes them): yajl's, exact to
     * INT64_MAX, where cJSON's double rounds past 2^53. */
    if (x != NULL && YAJL_IS_INTEGER(x)) {
        *out = x->u.number.i;
        return 0;
    }
    /* Else (1e+15, as cJSON wrote some before): exact up to 2^53 */
    if (v->valuedouble > FILE_INT_MAX)
        return -1;
    *out = (int64_t)v->valuedouble;
    return 0;
}

int cache__file_add_int(cJSON *o, const char *name, int64_t v)
{
    char text[24];

    snprintf(text, sizeof(text), "%lld", (long long)v);
    return cJSON_AddRawToObject(o, name, text) != NULL ? 0 : -1;
}
