/*
 * bench/mockllm/tls.c: TLS for mockllm with OpenSSL memory BIOs.
 *
 * The socket stays a plain libuv stream: records read from it are written
 * into the session's read BIO, and whatever OpenSSL puts into the write BIO
 * (handshake messages, sealed data, alerts) is appended to a buffer that
 * conn.c sends like any other output. Memory BIOs never block, so no call
 * here waits on the network.
 */
#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "bench/mockllm/internal.h"
#include "common/log.h"

/* Log and clear OpenSSL's error queue, under one context string. */
static void log_ssl_errors(const char *what)
{
    unsigned long e;
    char text[256];

    while ((e = ERR_get_error()) != 0) {
        ERR_error_string_n(e, text, sizeof(text));
        log_warn("%s: %s", what, text);
    }
}

struct ssl_ctx_st *mockllm__tls_ctx(const char *cert, const char *key)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

    if (ctx == NULL)
        goto fail;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        goto fail;
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
        goto fail;
    if (SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    return ctx;
fail:
    log_ssl_errors("tls setup");
    log_error("cannot load TLS certificate %s and key %s", cert, key);
    SSL_CTX_free(ctx);
    return NULL;
}

struct ssl_st *mockllm__tls_session(struct ssl_ctx_st *ctx)
{
    SSL *ssl = SSL_new(ctx);
    BIO *rbio = BIO_new(BIO_s_mem()), *wbio = BIO_new(BIO_s_mem());

    if (ssl == NULL || rbio == NULL || wbio == NULL) {
        BIO_free(rbio);
        BIO_free(wbio);
        SSL_free(ssl);
        log_ssl_errors("tls session");
        return NULL;
    }
    SSL_set_bio(ssl, rbio, wbio);
    SSL_set_accept_state(ssl);
    return ssl;
}

void mockllm__tls_ctx_free(struct ssl_ctx_st *ctx)
{
    SSL_CTX_free(ctx);
}

void mockllm__tls_free(struct ssl_st *ssl)
{
    SSL_free(ssl);
}

/* Move everything waiting in the write BIO to cipher. */
static int drain(SSL *ssl, struct buf *cipher)
{
    BIO *wbio = SSL_get_wbio(ssl);
    size_t pending;

    while ((pending = BIO_ctrl_pending(wbio)) > 0) {
        int n;
        if (buf_reserve(cipher, pending) != 0)
            return -ENOMEM;
        n = BIO_read(wbio, cipher->data + cipher->len, (int)pending);
        if (n <= 0)
            break;
        cipher->len += (size_t)n;
    }
    return 0;
}

int mockllm__tls_feed(struct ssl_st *ssl, const char *data, size_t len, struct buf *plain,
                      struct buf *cipher)
{
    int rc = 0;

    if (BIO_write(SSL_get_rbio(ssl), data, (int)len) != (int)len)
        return -EPROTO;
    for (;;) {
        int n, err;
        if (buf_reserve(plain, 16384) != 0) {
            rc = -ENOMEM;
            break;
        }
        n = SSL_read(ssl, plain->data + plain->len, (int)(plain->cap - plain->len));
        if (n > 0) {
            plain->len += (size_t)n;
            continue;
        }
        err = SSL_get_error(ssl, n);
        if (err == SSL_ERROR_WANT_READ)
            break;
        if (err == SSL_ERROR_ZERO_RETURN) {
            rc = 1;
            break;
        }
        log_ssl_errors("tls read");
        rc = -EPROTO;
        break;
    }
    /* Send the handshake messages (or an alert) even when reading failed. */
    if (drain(ssl, cipher) != 0)
        return -ENOMEM;
    return rc;
}

int mockllm__tls_seal(struct ssl_st *ssl, const char *data, size_t len, struct buf *cipher)
{
    /* Memory BIOs accept everything, so SSL_write takes the whole buffer. */
    if (len > 0 && SSL_write(ssl, data, (int)len) != (int)len) {
        log_ssl_errors("tls write");
        return -EPROTO;
    }
    return drain(ssl, cipher);
}

void mockllm__tls_close_notify(struct ssl_st *ssl, struct buf *cipher)
{
    if (SSL_is_init_finished(ssl))
        (void)SSL_shutdown(ssl);
    (void)drain(ssl, cipher);
    ERR_clear_error();
}
