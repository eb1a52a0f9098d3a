/*
 * bench/mockllm/main.c: the mockllm process: options, listener, signals.
 *
 * mockllm is a simulated OpenAI-compatible LLM server for costrouter's
 * integration tests, the `make run` demo and benchmarks (README.md next to
 * this file lists every option and header). Once bound it prints exactly
 * one line, "listening on HOST:PORT" with the real port, to stdout and
 * flushes it: tests wait for that line. SIGTERM or SIGINT closes every
 * handle and exits 0.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/mockllm/internal.h"
#include "common/log.h"

#define MAX_DELAY_MS 600000

static const char usage_text[] =
    "usage: mockllm [--listen HOST:PORT] [options]\n"
    "  --listen HOST:PORT       address to bind (default 127.0.0.1:0; port 0 = any free)\n"
    "  --model NAME             model name to answer with (default: the requested one)\n"
    "  --ttft-ms N              delay before the first byte/token (default 0)\n"
    "  --token-delay-ms N       delay between streamed tokens (default 0)\n"
    "  --tokens N               completion tokens per answer (default 16)\n"
    "  --error-rate F           fraction of /v1 requests answered 500 (default 0)\n"
    "  --fault KIND             stall | close-midstream | stall-midstream |\n"
    "                           close-before-response | 500 | 429\n"
    "  --retry-after VALUE      Retry-After header of every 429 answer (sent as given)\n"
    "  --require-key KEY        401 unless Authorization: Bearer KEY\n"
          "                           (/v1/messages: x-api-key: KEY)\n"
    "  --tls-cert FILE --tls-key FILE   serve HTTPS\n"
    "  --seed N                 seed for --error-rate (default: from pid and time)\n"
    "  --pad-header N           an x-mock-pad header of N bytes in every JSON or SSE answer\n"
    "Per-request headers: x-mock-ttft-ms, x-mock-head-first: 1 (a stream's headers at once,\n"
    "its first token after the TTFT, as vLLM and TGI send), x-mock-token-delay-ms, x-mock-tokens,\n"
    "x-mock-fault (as --fault, or none), x-mock-status (answer with this 4xx/5xx\n"
    "after the TTFT, or 204/304 with no body), x-mock-usage: omit (no usage object, as some servers answer),\n"
    "x-mock-retry-after and x-mock-retry-after-ms (Retry-After / retry-after-ms of a 429),\n"
    "x-mock-cached-tokens (responses: input_tokens_details.cached_tokens; messages:\n"
          "cache_read_input_tokens), x-mock-cache-write-tokens (messages:\n"
          "cache_creation_input_tokens), x-mock-cache-write-1h-tokens (messages: of those,\n"
          "cache_creation.ephemeral_1h_input_tokens), x-mock-web-searches (messages:\n"
          "server_tool_use.web_search_requests; responses: web_search_call items),\n"
          "x-mock-file-searches (responses: file_search_call items after those),\n"
          "x-mock-cost-micro (usage.cost in micro-USD: chat, completions, responses) and\n"
          "x-mock-cost-shape: object (usage.cost.total_cost).\n";

/* Parse a whole decimal integer in [0, max]. Returns 0 or -EINVAL. */
static int parse_int(const char *s, long max, int *out)
{
    char *end;
    long n;

    errno = 0;
    n = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || n < 0 || n > max)
        return -EINVAL;
    *out = (int)n;
    return 0;
}

/* Fill opts from argv. Returns 0, 1 for --help, or -EINVAL (message printed). */
static int parse_args(int argc, char **argv, struct mockllm_opts *o)
{
    enum { O_LISTEN = 256, O_MODEL, O_TTFT, O_DELAY, O_TOKENS, O_ERROR_RATE, O_FAULT,
           O_CERT, O_KEY, O_REQUIRE_KEY, O_SEED, O_PAD_HEADER, O_RETRY_AFTER, O_HELP };
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, O_LISTEN},
        {"model", required_argument, NULL, O_MODEL},
        {"ttft-ms", required_argument, NULL, O_TTFT},
        {"token-delay-ms", required_argument, NULL, O_DELAY},
        {"tokens", required_argument, NULL, O_TOKENS},
        {"error-rate", required_argument, NULL, O_ERROR_RATE},
        {"fault", required_argument, NULL, O_FAULT},
        {"tls-cert", required_argument, NULL, O_CERT},
        {"tls-key", required_argument, NULL, O_KEY},
        {"require-key", required_argument, NULL, O_REQUIRE_KEY},
        {"seed", required_argument, NULL, O_SEED},
        {"pad-header", required_argument, NULL, O_PAD_HEADER},
        {"retry-after", required_argument, NULL, O_RETRY_AFTER},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    int opt, fault;
    char *end;

    *o = (struct mockllm_opts){
        .listen = "127.0.0.1:0",
        .tokens = 16,
        .seed = ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL),
    };
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_LISTEN: o->listen = optarg; break;
        case O_MODEL: o->model = optarg; break;
        case O_TTFT:
            if (parse_int(optarg, MAX_DELAY_MS, &o->ttft_ms) != 0)
                goto bad;
            break;
        case O_DELAY:
            if (parse_int(optarg, MAX_DELAY_MS, &o->token_delay_ms) != 0)
                goto bad;
            break;
        case O_TOKENS:
            if (parse_int(optarg, 1000000, &o->tokens) != 0)
                goto bad;
            break;
        case O_ERROR_RATE:
            errno = 0;
            o->error_rate = strtod(optarg, &end);
            if (errno != 0 || end == optarg || *end != '\0' || !(o->error_rate >= 0) ||
                o->error_rate > 1)
                goto bad;
            break;
        case O_FAULT:
            if ((fault = mockllm__fault_parse(optarg)) < 0)
                goto bad;
            o->fault = (enum mockllm_fault)fault;
            break;
        case O_CERT: o->tls_cert = optarg; break;
        case O_KEY: o->tls_key = optarg; break;
        case O_REQUIRE_KEY: o->require_key = optarg; break;
        case O_SEED:
            errno = 0;
            o->seed = strtoull(optarg, &end, 10);
            if (errno != 0 || end == optarg || *end != '\0')
                goto bad;
            break;
        case O_PAD_HEADER:
            if (parse_int(optarg, 16 << 20, &o->pad_header_bytes) != 0)
                goto bad;
            break;
        case O_RETRY_AFTER: o->retry_after = optarg; break;
        case O_HELP: fputs(usage_text, stdout); return 1;
        default: fputs(usage_text, stderr); return -EINVAL;
        }
    }
    if (optind != argc || (o->tls_cert == NULL) != (o->tls_key == NULL)) {
        fputs(usage_text, stderr);
        return -EINVAL;
    }
    if (o->seed == 0)
        o->seed = 0x9e3779b97f4a7c15ULL; /* xorshift must not start at 0 */
    return 0;
bad:
    fprintf(stderr, "mockllm: bad value for option: %s\n", optarg);
    return -EINVAL;
}

/* Resolve "HOST:PORT" or "[V6HOST]:PORT" into addr. Returns 0 or a
 * negative errno / libuv code. */
static int parse_listen(const char *spec, struct sockaddr_storage *addr)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    size_t hlen;
    int port;

    if (colon == NULL || parse_int(colon + 1, 65535, &port) != 0)
        return -EINVAL;
    hlen = (size_t)(colon - spec);
    if (hlen >= 2 && spec[0] == '[' && spec[hlen - 1] == ']') {
        spec++;
        hlen -= 2;
    }
    if (hlen == 0 || hlen >= sizeof(host))
        return -EINVAL;
    memcpy(host, spec, hlen);
    host[hlen] = '\0';
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)addr) == 0)
        return 0;
    return uv_ip6_addr(host, port, (struct sockaddr_in6 *)addr);
}

static void on_connection(uv_stream_t *listener, int status)
{
    struct mockllm_server *srv = listener->data;

    if (status < 0) {
        log_warn("accept: %s", uv_strerror(status));
        return;
    }
    mockllm__conn_accept(srv);
}

static void on_signal(uv_signal_t *sig, int signum)
{
    struct mockllm_server *srv = sig->data;
    struct mockllm_conn *c;

    if (srv->stopping)
        return;
    srv->stopping = 1;
    uv_close((uv_handle_t *)&srv->listener, NULL);
    uv_close((uv_handle_t *)&srv->sigterm, NULL);
    uv_close((uv_handle_t *)&srv->sigint, NULL);
    for (c = srv->conns; c != NULL; c = c->next)
        mockllm__conn_close(c);
}

/* Bind, listen and print the address line. Returns 0 or a libuv code. */
static int start_listening(struct mockllm_server *srv)
{
    struct sockaddr_storage addr;
    int namelen = sizeof(addr), rc, port;
    const char *colon = strrchr(srv->opts.listen, ':');

    if ((rc = parse_listen(srv->opts.listen, &addr)) != 0) {
        log_error("bad --listen %s (want HOST:PORT)", srv->opts.listen);
        return rc;
    }
    uv_tcp_init(srv->loop, &srv->listener);
    srv->listener.data = srv;
    if ((rc = uv_tcp_bind(&srv->listener, (struct sockaddr *)&addr, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection)) != 0 ||
        (rc = uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&addr, &namelen)) != 0) {
        log_error("cannot listen on %s: %s", srv->opts.listen, uv_strerror(rc));
        return rc;
    }
    port = ntohs(addr.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&addr)->sin6_port
                                            : ((struct sockaddr_in *)&addr)->sin_port);
    printf("listening on %.*s:%d\n", (int)(colon - srv->opts.listen), srv->opts.listen, port);
    fflush(stdout);
    return 0;
}

/* The x-mock-pad header line of --pad-header, or "". */
static char *pad_header_line(int bytes)
{
    static const char name[] = "x-mock-pad: ";
    char *line;

    if (bytes == 0)
        return strdup("");
    line = malloc(sizeof(name) - 1 + (size_t)bytes + 3);
    if (line == NULL)
        return NULL;
    memcpy(line, name, sizeof(name) - 1);
    memset(line + sizeof(name) - 1, 'a', (size_t)bytes);
    memcpy(line + sizeof(name) - 1 + bytes, "\r\n", 3);
    return line;
}

int main(int argc, char **argv)
{
    static struct mockllm_server srv;
    int rc;

    rc = parse_args(argc, argv, &srv.opts);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    signal(SIGPIPE, SIG_IGN);
    if ((srv.pad_header = pad_header_line(srv.opts.pad_header_bytes)) == NULL)
        return 1;
    srv.loop = uv_default_loop();
    srv.rng = srv.opts.seed;
    if (srv.opts.tls_cert != NULL &&
        (srv.tls = mockllm__tls_ctx(srv.opts.tls_cert, srv.opts.tls_key)) == NULL)
        return 1;
    if (start_listening(&srv) != 0) {
        uv_close((uv_handle_t *)&srv.listener, NULL);
        uv_run(srv.loop, UV_RUN_DEFAULT);
        rc = 1;
        goto out;
    }
    uv_signal_init(srv.loop, &srv.sigterm);
    uv_signal_init(srv.loop, &srv.sigint);
    srv.sigterm.data = &srv;
    srv.sigint.data = &srv;
    uv_signal_start(&srv.sigterm, on_signal, SIGTERM);
    uv_signal_start(&srv.sigint, on_signal, SIGINT);
    uv_run(srv.loop, UV_RUN_DEFAULT);
    rc = 0;
out:
    if (uv_loop_close(srv.loop) != 0) {
        log_error("handles left open at exit");
        rc = 1;
    }
    buf_free(&srv.last.url);
    buf_free(&srv.last.headers);
    buf_free(&srv.last.body);
    mockllm__api_cleanup();
    mockllm__tls_ctx_free(srv.tls);
    free(srv.pad_header);
    return rc;
}
