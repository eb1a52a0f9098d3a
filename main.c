/*
 * main.c: the costrouter command line.
 *
 *   costrouter -c FILE             run the router
 *   costrouter --check-config FILE validate and exit (non-zero on errors)
 *   costrouter tokens ...          count tokens (see `costrouter tokens --help`)
 *   costrouter report ...          summarize cost logs
 */
#include <getopt.h>
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

struct app {
    uv_loop_t *loop;       /* the one event loop */
    const char *path;      /* config file, loaded again on reload */
    struct router *router; /* the proxy */
    uv_signal_t sigterm;   /* graceful stop */
    uv_signal_t sigint;    /* graceful stop */
    uv_signal_t sighup;    /* log reopen / reload */
    uv_work_t pool_start;  /* a no-op that makes libuv's worker threads */
    int stopping;          /* a stop signal was received */
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: costrouter -c FILE              run the router with this config\n"
            "       costrouter --check-config FILE  validate a config, print every error\n"
            "       costrouter report [--help] LOG...  totals and cost per 1K requests from cost logs\n"
            "       costrouter tokens --encoding cl100k_base|o200k_base|llama3 [--chat] [FILE|-]\n"
            "       costrouter --version | --help\n"
            "options:\n"
            "  -c, --config FILE   configuration file (YAML)\n"
            "  -t, --check-config  with -c: validate and exit\n"
            "  -v, --verbose       more logging (repeat for debug)\n"
            "  -q, --quiet         errors only\n");
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

static void on_stop_signal(uv_signal_t *s, int signum)
{
    struct app *app = s->data;

    if (app->stopping) {
        log_info("signal %d: already stopping, waiting for requests in flight", signum);
        return;
    }
    app->stopping = 1;
    log_info("signal %d: stopping after requests in flight", signum);
    router_stop(app->router);
    /* Keep catching signals (a second SIGTERM must not kill requests in
     * flight), but let the loop end once the router has closed. */
    uv_unref((uv_handle_t *)&app->sigterm);
    uv_unref((uv_handle_t *)&app->sigint);
    uv_unref((uv_handle_t *)&app->sighup);
}

/* Load the config file again and apply it if it is valid; on errors the
 * running config stays. Returns 0, or -1 with *errors (malloc'd). */
static int reload(void *arg, char **errors)
{
    struct app *app = arg;
    struct conf *conf = conf_load(app->path, errors);
    struct router *next;

    if (conf == NULL) {
        log_warn("reload of %s refused, the running config stays:\n%s", app->path,
                 *errors ? *errors : "");
        return -1;
    }
    next = router_reload(app->router, conf, errors);
    if (next == NULL) {
        if (*errors == NULL)
            *errors = strdup("could not apply the new config (see the log)");
        return -1;
    }
    app->router = next;
    router_set_reload_hook(next, reload, app);
    return 0;
}

/* SIGHUP: reopen the cost log (rotation) and reload the config. */
static void on_hup(uv_signal_t *s, int signum)
{
    struct app *app = s->data;
    char *errors = NULL;

    router_reopen_logs(app->router);
    reload(app, &errors);
    free(errors);
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
    router_set_reload_hook(app.router, reload, &app);
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
    if (check) {
        struct conf *conf = load_config(config);
        char *errors = NULL;

        if (conf == NULL)
            return 1;
        if (router_check(conf, &errors) != 0) {
            fprintf(stderr, "%s: %s\n", config, errors ? errors : "cannot load");
            free(errors);
            conf_free(conf);
            return 1;
        }
        printf("%s: configuration OK (%zu backends, %zu routes, %zu tenants)\n", config,
               conf->nbackends, conf->nroutes, conf->ntenants);
        conf_free(conf);
        return 0;
    }
    tzset(); /* glibc reads the zone file at its first time conversion: not on the loop */
    return run(config);
}
