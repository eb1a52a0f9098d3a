/*
 * tests/support/record.h: checks on the cost log's records that several
 * router tests share. Header-only because they assert with Criterion,
 * which the support objects are built without (fuzz_http links them too).
 */
#ifndef SUPPORT_RECORD_H
#define SUPPORT_RECORD_H

#include <cjson/cJSON.h>
#include <criterion/criterion.h>

#include "tests/support/http.h"
#include "tests/support/proc.h"

/* The last record of the cost log at `path`, parsed (caller frees), once
 * `router` has stopped: the log is complete only then. NULL `router`:
 * the caller stopped its routers itself. */
static inline cJSON *record_last(struct support_proc *router, const char *path)
{
    cJSON *rec;

    if (router != NULL)
        support_proc_stop(router);
    rec = support_last_json_line(path);
    cr_assert_not_null(rec, "no record in the cost log %s", path);
    return rec;
}

/* The number `name` of record `rec`; a test fails without one. */
static inline double record_num(const cJSON *rec, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(rec, name);

    cr_assert(cJSON_IsNumber(v), "no number %s", name);
    return v->valuedouble;
}

#endif
