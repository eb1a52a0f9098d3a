/* router/tls.c: OpenSSL client contexts for TLS backends. */
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "common/log.h"
#include "conf/conf.h"
#include "router/internal.h"

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
