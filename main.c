/*
 * main.c: the costrouter command line.
 *
 *   costrouter -c FILE             run the router
 *   costrouter --check-config FILE validate and exit (non-zero on errors)
 *   costrouter tokens ...          count tokens (see `costrouter tokens --help`)
 *   costrouter report ...          summarize cost logs
 */
#include <ctype.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/opensslv.h>
#include <uv.h>

#include "common/log.h"
#include "cli/report.h"
#include "cli/tokens.h"
#include "conf/conf.h"
#include "router/router.h"

#define COSTROUTER_VERSION "0.1.0"

struct reload_load;

/* Who waits for a reload's outcome (a POST /admin/reload). */
struct reload_waiter {
    router_reload_done_cb *done;  /* called once with the outcome */
    void *arg;                    /* passed to done */
    struct reload_waiter *next;   /* list */
};

struct app {
    uv_loop_t *loop;       /* the one event loop */
    const char *path;      /* config file, loaded again on reload */
    struct router *router; /* the proxy */
    uv_signal_t sigterm;   /* graceful stop */
    uv_signal_t sigint;    /* graceful stop */
    uv_signal_t sighup;    /* log reopen / reload */
    uv_work_t pool_start;  /* a no-op that makes libuv's worker threads */
    int stopping;          /* a stop signal was received */
    struct reload_load *load;        /* the reload's load in progress, or NULL */
    int reload_again;                /* a reload was asked for while it ran */
    struct reload_waiter *waiting;   /* answered by the load in progress */
    struct reload_waiter *next_waiting; /* answered by the load after it */
};

/*
 * Reloads read and parse the config off the loop: a big or slow file
 * (libfyaml's duplicate-key check is quadratic in a mapping's size; a
 * FIFO waits for its writer) would hold every client meanwhile. One load
 * runs at a time, on a thread of its own (conf_load touches no state of
 * the loop's: it logs nothing, returns the errors, and reads only the
 * environment, which nothing sets; and one load at a time means libfyaml
 * is never used by two threads at once), and its result is applied on the
 * loop with router_reload. A reload asked for while one
 * runs (SIGHUP or POST /admin/reload; any number of them) makes one more
 * load after it, which reads the file again, so the content last written
 * wins; the admin requests asked meanwhile are answered with that load's
 * outcome.
 *
 * The thread is ours, detached, not libuv's threadpool: a load stuck for
 * good (a FIFO no one writes, a hung NFS mount) must neither take one of
 * the pool's four threads (DNS lookups run there) nor hold the exit, as
 * libuv joins its pool's threads at exit. At stop a load in progress is
 * abandoned: the thread frees what it loads when (if ever) it returns.
 */
struct reload_load {
    uv_async_t done;       /* wakes the loop when the thread is done */
    uv_mutex_t lock;       /* guards the fields marked (lock) */
    char *path;            /* the file, copied for the thread */
    struct app *app;       /* owner on the loop side */
    struct conf *conf;     /* (lock) the result, or NULL */
    char *errors;          /* (lock) why conf is NULL (malloc'd), or NULL */
    int abandoned;         /* (lock) the loop gave up on it: no uv_async_send */
    int refs;              /* (lock) the thread and the async handle */
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: costrouter -c FILE              run the router with this config\n"
            "       costrouter --check-config FILE  validate a config, print every error\n"
            "       costrouter report [--help] LOG...  totals and cost per 1K requests from cost logs\n"
            "       costrouter " CLI_TOKENS_SYNOPSIS "\n"
            "                                       count tokens as a backend does\n"
            "       costrouter --version | --help\n"
            "options:\n"
            "  -c, --config FILE   configuration file (YAML)\n"
            "  -t, --check-config  with -c: validate and exit\n"
            "  -v, --verbose       more logging (repeat for debug)\n"
            "  -q, --quiet         errors only\n"
            "tokens options (also `costrouter tokens --help`):\n");
    cli_tokens_options(out);
}

/* Load and validate; print every error. Returns the config or NULL. */
static struct conf *load_config(const char *path)
{
    char *errors = NULL;
    struct conf *conf = conf_load(path, &errors);

    if (conf == NULL) {
        fprintf(stderr, "%s", errors ? errors : "costrouter: cannot load config\n");
        if (errors && errors[0] && errors[strlen(errors) - 1] != '\n')
            fputc('\n', stderr);
    }
    free(errors);
    return conf;
}

static void reload_stop(struct app *app);

static void on_stop_signal(uv_signal_t *s, int signum)
{
    struct app *app = s->data;

    if (app->stopping) {
        log_info("signal %d: already stopping, waiting for requests in flight", signum);
        return;
    }
    app->stopping = 1;
    log_info("signal %d: stopping after requests in flight", signum);
    reload_stop(app);
    router_stop(app->router);
    /* Keep catching signals (a second SIGTERM must not kill requests in
     * flight), but let the loop end once the router has closed. */
    uv_unref((uv_handle_t *)&app->sigterm);
    uv_unref((uv_handle_t *)&app->sigint);
    uv_unref((uv_handle_t *)&app->sighup);
}

static void load_free(struct reload_load *l)
{
    conf_free(l->conf);
    free(l->errors);
    free(l->path);
    uv_mutex_destroy(&l->lock);
    free(l);
}

/* Drop one of the load's two references (the thread's, the handle's). */
static void load_unref(struct reload_load *l)
{
    int last;

    uv_mutex_lock(&l->lock);
    last = --l->refs == 0;
    uv_mutex_unlock(&l->lock);
    if (last)
        load_free(l);
}

static void load_closed(uv_handle_t *h)
{
    load_unref(h->data);
}

static void load_thread(void *arg)
{
    struct reload_load *l = arg;
    char *errors = NULL;
    struct conf *conf = conf_load(l->path, &errors);

    uv_mutex_lock(&l->lock);
    if (!l->abandoned) {
        l->conf = conf;
        l->errors = errors;
        conf = NULL;
        errors = NULL;
        uv_async_send(&l->done);
    }
    uv_mutex_unlock(&l->lock);
    conf_free(conf); /* abandoned: not applied */
    free(errors);
    load_unref(l);
}

static void on_loaded(uv_async_t *h);

/* Start loading app->path on a thread of its own; on_loaded applies it.
 * Returns 0 or a libuv error (nothing started). */
static int load_start(struct app *app)
{
    struct reload_load *l = calloc(1, sizeof(*l));
    uv_thread_t thread;
    sigset_t all, old;
    int rc;

    if (l == NULL || (l->path = strdup(app->path)) == NULL) {
        free(l);
        return UV_ENOMEM;
    }
    if ((rc = uv_async_init(app->loop, &l->done, on_loaded)) != 0) {
        free(l->path);
        free(l);
        return rc;
    }
    uv_mutex_init(&l->lock);
    l->app = app;
    l->refs = 2;
    l->done.data = l;
    /* No signal for it: the stop signals are the loop thread's alone (see
     * start_threads_without_stop_signals). */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = uv_thread_create(&thread, load_thread, l);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        l->refs = 1;
        uv_close((uv_handle_t *)&l->done, load_closed);
        return rc;
    }
    pthread_detach(thread);
    app->load = l;
    return 0;
}

/* Give up on the load in progress (stop): it is not applied. */
static void load_abandon(struct reload_load *l)
{
    uv_mutex_lock(&l->lock);
    l->abandoned = 1;
    uv_mutex_unlock(&l->lock);
    uv_close((uv_handle_t *)&l->done, load_closed);
}

/* Tell each waiter of `list` the outcome, and free the list. */
static void waiters_answer(struct reload_waiter *list, enum router_reload_result result,
                           const char *why)
{
    while (list != NULL) {
        struct reload_waiter *w = list;

        list = w->next;
        w->done(w->arg, result, why);
        free(w);
    }
}

/* Apply a loaded config if it is valid; on errors the running config
 * stays. Returns 0, or -1 with *errors (malloc'd) when it can say why. */
static int reload_apply(struct app *app, struct conf *conf, char **errors)
{
    struct router *next;

    if (conf == NULL) {
        log_warn("reload of %s refused, the running config stays:\n%s", app->path,
                 *errors ? *errors : "");
        return -1;
    }
    next = router_reload(app->router, conf, errors);
    if (next == NULL)
        return -1;
    app->router = next;
    return 0;
}

static void reload_start(struct app *app);

/* Cut the whitespace off the end of `s`: conf_load ends each error with a
 * newline, which would end the admin answer's message and make an empty
 * line in the log. */
static void trim_end(char *s)
{
    size_t n = strlen(s);

    while (n > 0 && isspace((unsigned char)s[n - 1]))
        n--;
    s[n] = '\0';
}

/* The thread is done: apply its result, answer those who waited for it,
 * and start the load asked for meanwhile, if any. */
static void on_loaded(uv_async_t *h)
{
    struct reload_load *l = h->data;
    struct app *app = l->app;
    struct reload_waiter *waiting = app->waiting;
    struct conf *conf;
    char *errors;
    int rc;

    uv_mutex_lock(&l->lock);
    conf = l->conf;
    errors = l->errors;
    l->conf = NULL;
    l->errors = NULL;
    uv_mutex_unlock(&l->lock);
    if (errors != NULL)
        trim_end(errors);
    uv_close((uv_handle_t *)&l->done, load_closed);
    app->load = NULL;
    app->waiting = NULL;
    rc = reload_apply(app, conf, &errors);
    /* The next load starts before the answers go: an answer may let a
     * pipelined POST /admin/reload in at once, which then queues behind
     * it rather than starting a load of its own beside it. */
    if (app->reload_again) {
        app->reload_again = 0;
        app->waiting = app->next_waiting;
        app->next_waiting = NULL;
        reload_start(app);
    }
    waiters_answer(waiting, rc == 0 ? ROUTER_RELOADED : ROUTER_RELOAD_REFUSED,
                   errors ? errors : "could not apply the new config (see the log)");
    free(errors);
}

/* Start a load for app->waiting; answer them at once if it cannot start. */
static void reload_start(struct app *app)
{
    int rc = load_start(app);

    if (rc != 0) {
        struct reload_waiter *waiting = app->waiting;
        char why[128];

        snprintf(why, sizeof(why), "could not start the reload: %s", uv_strerror(rc));
        log_error("reload of %s: %s", app->path, why);
        app->waiting = NULL;
        waiters_answer(waiting, ROUTER_RELOAD_REFUSED, why);
    }
}

/* Reopen the cost log (after a rotation) and reload the config file: at
 * once if no reload runs, else once more after it. `done` (may be NULL:
 * SIGHUP) gets the outcome. SIGHUP and POST /admin/reload both come here,
 * so either finishes a rotation. */
static void reload(void *arg, router_reload_done_cb *done, void *done_arg)
{
    struct app *app = arg;
    struct reload_waiter *w = NULL;

    if (app->stopping) {
        if (done)
            done(done_arg, ROUTER_RELOAD_STOPPED,
                 "the router is stopping; the config was not reloaded");
        return;
    }
    router_reopen_logs(app->router);
    if (done != NULL) {
        struct reload_waiter **list = app->load ? &app->next_waiting : &app->waiting;

        if ((w = malloc(sizeof(*w))) == NULL) {
            done(done_arg, ROUTER_RELOAD_REFUSED, "out of memory");
            return;
        }
        *w = (struct reload_waiter){done, done_arg, *list};
        *list = w;
    }
    if (app->load != NULL) {
        log_info("reload asked for while one runs: the file is loaded again after it");
        app->reload_again = 1;
        return;
    }
    reload_start(app);
}

/* At stop: a load in progress is not applied, and none is started. */
static void reload_stop(struct app *app)
{
    static const char why[] = "the router stopped before the reload was done; the config was "
                              "not reloaded";

    if (app->load != NULL) {
        log_info("stopping: the reload in progress is not applied");
        load_abandon(app->load);
        app->load = NULL;
    }
    app->reload_again = 0;
    waiters_answer(app->waiting, ROUTER_RELOAD_STOPPED, why);
    waiters_answer(app->next_waiting, ROUTER_RELOAD_STOPPED, why);
    app->waiting = app->next_waiting = NULL;
}

/* SIGHUP: reopen the cost log (rotation) and reload the config. */
static void on_hup(uv_signal_t *s, int signum)
{
    struct app *app = s->data;

    reload(app, NULL, NULL);
}

static void no_work(uv_work_t *req)
{
}

static void no_work_done(uv_work_t *req, int status)
{
}

/* Only this thread takes SIGTERM and SIGINT: libuv's worker threads are
 * made now, with both blocked (threads inherit the mask), so that
 * close_stop_signals() can shut out a signal by blocking it here. */
static void start_threads_without_stop_signals(struct app *app, const sigset_t *stop)
{
    sigset_t old;

    pthread_sigmask(SIG_BLOCK, stop, &old);
    uv_queue_work(app->loop, &app->pool_start, no_work, no_work_done);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Closing the last watcher of a signal makes libuv put its default
 * action back, and a stop signal then would kill the process: a second
 * SIGTERM while exiting turned a clean exit into death by signal. Held
 * off meanwhile, a signal pending then is ignored. */
static void close_stop_signals(struct app *app, const sigset_t *stop)
{
    sigset_t old;

    pthread_sigmask(SIG_BLOCK, stop, &old);
    uv_close((uv_handle_t *)&app->sigterm, NULL);
    uv_close((uv_handle_t *)&app->sigint, NULL);
    uv_close((uv_handle_t *)&app->sighup, NULL);
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static int run(const char *path)
{
    struct app app = {0};
    int rc = 1;
    struct conf *conf;
    sigset_t stop;

    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    signal(SIGPIPE, SIG_IGN);
    conf = load_config(path);
    if (conf == NULL)
        return 1;
    app.path = path;
    app.loop = uv_default_loop();
    start_threads_without_stop_signals(&app, &stop);
    app.router = router_create(app.loop, conf); /* owns conf from here */
    if (app.router == NULL) {
        /* The worker threads' start-up work still refers to `app`, on
         * this stack: returning before it is done crashed, or hung the
         * exit, on a config that failed here (a wrong TLS key). */
        uv_run(app.loop, UV_RUN_DEFAULT);
        uv_loop_close(app.loop);
        return 1;
    }
    router_set_reload_hook(app.router, reload, &app); /* kept by every generation */
    /* Signal handlers before the "listening on" line, so whoever waits
     * for that line can stop us gracefully at once. */
    uv_signal_init(app.loop, &app.sigterm);
    uv_signal_init(app.loop, &app.sigint);
    uv_signal_init(app.loop, &app.sighup);
    app.sigterm.data = app.sigint.data = app.sighup.data = &app;
    uv_signal_start(&app.sigterm, on_stop_signal, SIGTERM);
    uv_signal_start(&app.sigint, on_stop_signal, SIGINT);
    uv_signal_start(&app.sighup, on_hup, SIGHUP);
    if (router_start(app.router) != 0)
        goto out;
    uv_run(app.loop, UV_RUN_DEFAULT);
    rc = 0;
out:
    close_stop_signals(&app, &stop);
    if (rc != 0)
        router_stop(app.router);
    uv_run(app.loop, UV_RUN_DEFAULT);
    router_destroy(app.router);
    if (uv_loop_close(app.loop) != 0)
        log_warn("event loop closed with handles still open");
    log_info("stopped");
    return rc;
}

/* --check-config: load, validate and try what the router would make of
 * it; the exit status. */
static int check_config(const char *path)
{
    struct conf *conf = load_config(path);
    char *errors = NULL, summary[128];

    if (conf == NULL)
        return 1;
    if (router_check(conf, &errors) != 0) {
        fprintf(stderr, "%s: %s\n", path, errors ? errors : "cannot load");
        free(errors);
        conf_free(conf);
        return 1;
    }
    printf("%s: configuration OK (%s)\n", path, conf_summary(conf, summary, sizeof(summary)));
    conf_free(conf);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", optional_argument, NULL, 't'},
        {"verbose", no_argument, NULL, 'v'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config = NULL;
    int check = 0, c;

    if (argc > 1 && strcmp(argv[1], "report") == 0)
        return cli_report_main(argc - 1, argv + 1);
    if (argc > 1 && strcmp(argv[1], "tokens") == 0)
        return cli_tokens_main(argc - 1, argv + 1);

    while ((c = getopt_long(argc, argv, "c:t::vqhV", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config = optarg;
            break;
        case 't':
            check = 1;
            if (optarg)
                config = optarg;
            else if (optind < argc && argv[optind][0] != '-')
                config = argv[optind++];
            break;
        case 'v':
            log_threshold++;
            break;
        case 'q':
            log_threshold = LOG_LEVEL_ERROR;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("costrouter %s (libuv %s, %s)\n", COSTROUTER_VERSION, uv_version_string(),
                   "OpenSSL " OPENSSL_FULL_VERSION_STR);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (config == NULL) {
        usage(stderr);
        return 2;
    }
    if (check)
        return check_config(config);
    tzset(); /* glibc reads the zone file at its first time conversion: not on the loop */
    return run(config);
}
