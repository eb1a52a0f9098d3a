/*
 * router/tls.c: OpenSSL contexts (client side for TLS backends, server
 * side for the listener) and the TLS layer of client connections.
 *
 * As with backends, OpenSSL never touches a client's socket: ciphertext
 * read by libuv goes into the session's memory BIO, and what OpenSSL
 * writes to the other memory BIO goes out through the same try-write
 * path as plain responses. So TLS changes nothing in how requests are
 * parsed, answered, paced or closed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/buffer.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "common/log.h"
#include "conf/conf.h"
#include "metrics/metrics.h"
#include "router/internal.h"

/* Largest buffer a TLS session's memory BIO keeps once it is empty. */
#define TLS_BIO_KEEP 16384

/* Plaintext of one client read; a TLS record holds at most 16 KiB. */
static char tls_plain_buf[16384];
/* Small pieces of one response (head and body) are joined here so they
 * go out as one record: one MAC and one record header instead of two. */
static char tls_join_buf[16384];

/* A client context for backend `b`: TLS 1.2+, peer verification on unless
 * the backend turns it off, against the system store or the pinned CA
 * file. Hostname checks are set per connection (tls_start). */
SSL_CTX *router__tls_client_ctx(const struct conf_backend *b)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    static const unsigned char alpn[] = "\x08http/1.1";

    if (ctx == NULL)
        goto fail;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof(alpn) - 1);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (!b->tls_verify) {
        log_warn("backend %s: TLS certificate verification is off", b->name);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        return ctx;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (b->ca_file) {
        if (SSL_CTX_load_verify_locations(ctx, b->ca_file, NULL) != 1) {
            log_error("backend %s: cannot load ca_file %s", b->name, b->ca_file);
            goto fail;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        log_error("backend %s: cannot load the system CA store", b->name);
        goto fail;
    }
    return ctx;
fail:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

/* The first error OpenSSL queued, as text; clears the queue. */
static const char *tls_error_text(char *out, size_t n)
{
    unsigned long e = ERR_get_error();

    out[0] = '\0';
    if (e)
        ERR_error_string_n(e, out, n);
    ERR_clear_error();
    return out[0] ? out : "unknown error";
}

/* A key file protected by a passphrase would make OpenSSL ask for it on
 * the terminal, which a daemon has not got: refuse instead. */
static int no_passphrase(char *buf, int size, int rwflag, void *arg)
{
    return 0;
}

/* ALPN: HTTP/1.1 when the client offers it. A client offering only
 * other protocols (h2 alone) gets no ALPN answer rather than a failed
 * handshake, and may still speak HTTP/1.1. */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned inlen, void *arg)
{
    static const unsigned char ours[] = "\x08http/1.1";

    if (SSL_select_next_proto((unsigned char **)out, outlen, ours, sizeof(ours) - 1, in,
                              inlen) == OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_OK;
    return SSL_TLSEXT_ERR_NOACK;
}

SSL_CTX *router__tls_server_ctx(const struct conf *conf, char *why, size_t size)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    char err[256];

    if (ctx == NULL) {
        snprintf(why, size, "tls: %s", tls_error_text(err, sizeof(err)));
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* Renegotiation is the one way a write could need a read first. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* Idle keep-alive connections give their record buffers back. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    if (SSL_CTX_use_certificate_chain_file(ctx, conf->tls_cert_file) != 1) {
        snprintf(why, size, "tls.cert_file %s: %s", conf->tls_cert_file,
                 tls_error_text(err, sizeof(err)));
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, conf->tls_key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        unsigned long e = ERR_peek_error();

        if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
            ERR_clear_error();
            snprintf(why, size, "tls.key_file %s is not the key of tls.cert_file %s",
                     conf->tls_key_file, conf->tls_cert_file);
        } else {
            snprintf(why, size, "tls.key_file %s: %s (a PEM key without a passphrase is needed)",
                     conf->tls_key_file, tls_error_text(err, sizeof(err)));
        }
        goto fail;
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

int router__tls_client_start(struct router__client *c, SSL_CTX *ctx)
{
    BIO *rbio, *wbio;

    c->ssl = SSL_new(ctx);
    if (c->ssl == NULL)
        return -1;
    rbio = BIO_new(BIO_s_mem());
    wbio = BIO_new(BIO_s_mem());
    if (rbio == NULL || wbio == NULL) {
        BIO_free(rbio);
        BIO_free(wbio);
        return -1;
    }
    SSL_set_bio(c->ssl, rbio, wbio);
    SSL_set_accept_state(c->ssl);
    return 0;
}

/* A memory BIO keeps the capacity of the most it ever held (a large
 * answer, a 64 KB read of a large upload) for the connection's life, and
 * a reset zeroes all of it (12 us once it has held 1 MB, at every later
 * flush). Past TLS_BIO_KEEP a new, empty BIO is cheaper, and an idle
 * connection gives the memory back. */
static BIO *tls_bio_oversized(BIO *bio)
{
    BUF_MEM *mem = NULL;

    BIO_get_mem_ptr(bio, &mem);
    if (mem == NULL || mem->max <= TLS_BIO_KEEP)
        return NULL;
    return BIO_new(BIO_s_mem());
}

void router__tls_wbio_clear(SSL *ssl)
{
    BIO *fresh = tls_bio_oversized(SSL_get_wbio(ssl));

    if (fresh != NULL)
        SSL_set0_wbio(ssl, fresh); /* frees the old one */
    else
        (void)BIO_reset(SSL_get_wbio(ssl));
}

/* Once OpenSSL has taken all the ciphertext read (a record cut short
 * waits in its own buffer, not in the BIO). */
static void tls_rbio_trim(SSL *ssl)
{
    BIO *fresh;

    if (BIO_ctrl_pending(SSL_get_rbio(ssl)) == 0 &&
        (fresh = tls_bio_oversized(SSL_get_rbio(ssl))) != NULL)
        SSL_set0_rbio(ssl, fresh); /* frees the old one */
}

/* Send what OpenSSL wrote for the network, and empty its buffer. */
static void tls_client_flush(struct router__client *c)
{
    char *p;
    long n = BIO_get_mem_data(SSL_get_wbio(c->ssl), &p);

    if (n <= 0)
        return;
    uv_buf_t b = uv_buf_init(p, (unsigned)n);
    router__client_send_raw(c, &b, 1);
    router__tls_wbio_clear(c->ssl);
}

void router__tls_client_read(struct router__client *c, const char *p, size_t len)
{
    struct router *r = c->router;
    char err[256];
    int n = 0;

    if (BIO_write(SSL_get_rbio(c->ssl), p, (int)len) != (int)len) {
        router__client_close(c);
        return;
    }
    /* SSL_read also drives the handshake, until it is done. */
    while (!c->closing && (n = SSL_read(c->ssl, tls_plain_buf, sizeof(tls_plain_buf))) > 0)
        router__client_take(c, tls_plain_buf, (size_t)n);
    if (c->closing)
        return;
    switch (SSL_get_error(c->ssl, n)) {
    case SSL_ERROR_WANT_READ:
        tls_rbio_trim(c->ssl);
        tls_client_flush(c); /* handshake messages, session tickets */
        return;
    case SSL_ERROR_ZERO_RETURN:
        router__client_close(c); /* close_notify: the client's EOF */
        return;
    default:
        if (!SSL_is_init_finished(c->ssl)) {
            metrics_add(r->metrics, METRICS_CLIENT_TLS_HANDSHAKE_FAILURES_TOTAL, NULL, 1);
            log_info("client TLS handshake failed: %s", tls_error_text(err, sizeof(err)));
        } else {
            log_info("client TLS read failed: %s", tls_error_text(err, sizeof(err)));
        }
        tls_client_flush(c); /* the alert, if OpenSSL made one */
        router__client_close(c);
    }
}

/* Copy the pieces into tls_join_buf, which they fit. */
static uv_buf_t tls_join(const uv_buf_t *bufs, unsigned nbufs, size_t total)
{
    size_t off = 0;

    for (unsigned i = 0; i < nbufs; i++) {
        memcpy(tls_join_buf + off, bufs[i].base, bufs[i].len);
        off += bufs[i].len;
    }
    return uv_buf_init(tls_join_buf, (unsigned)total);
}

void router__tls_client_sendv(struct router__client *c, const uv_buf_t *bufs, unsigned nbufs)
{
    uv_buf_t joined;
    size_t total = 0;

    for (unsigned i = 0; i < nbufs; i++)
        total += bufs[i].len;
    if (nbufs > 1 && total <= sizeof(tls_join_buf)) {
        joined = tls_join(bufs, nbufs, total);
        bufs = &joined;
        nbufs = 1;
    }
    /* The write BIO is memory: SSL_write takes every byte or fails. */
    for (unsigned i = 0; i < nbufs; i++) {
        if (bufs[i].len > 0 && SSL_write(c->ssl, bufs[i].base, (int)bufs[i].len) <= 0) {
            ERR_clear_error();
            router__client_close(c);
            return;
        }
    }
    tls_client_flush(c);
}

void router__tls_client_shutdown(struct router__client *c)
{
    if (!SSL_is_init_finished(c->ssl))
        return;
    (void)SSL_shutdown(c->ssl);
    ERR_clear_error();
    tls_client_flush(c);
}

int router_check(const struct conf *conf, char **errors)
{
    char why[1024];
    SSL_CTX *ctx;

    *errors = NULL;
    if (conf->tls_cert_file == NULL)
        return 0;
    ctx = router__tls_server_ctx(conf, why, sizeof(why));
    if (ctx == NULL) {
        *errors = strdup(why);
        return -1;
    }
    SSL_CTX_free(ctx);
    return 0;
}
