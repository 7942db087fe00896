/*
 * rpc_tls.c: TLS over memory buffers (OpenSSL), for the RPC server and channels and the OpenAI
 * front (rpc.h, "TLS").
 *
 * A connection's SSL object reads ciphertext from a memory BIO the socket's bytes are written
 * to and writes ciphertext to another that the owner drains into its socket writes, so the
 * libuv code keeps its own reads and writes and OpenSSL never touches a file descriptor.
 * Plaintext sent before the handshake ends waits in a buffer here and goes once it ends.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "rpc_int.h"

struct rpc_tls {
    SSL_CTX *ctx;
    bool server, http2, check_name;
};

struct rpc_tls_conn {
    SSL *ssl;
    BIO *rbio, *wbio; // ciphertext in (from the socket), out (to the socket)
    bool server, done, failed;
    uint8_t *early; // plaintext sent before the handshake ended: [early_cap], early_len used
    size_t early_len, early_cap;
    char alpn[16];
    char error[160];
};

/* OpenSSL's last error (and the certificate check's, after a failed handshake) into err. */
static void ssl_error(char *err, size_t err_len, const char *what, SSL *ssl)
{
    unsigned long e = ERR_peek_last_error();
    char buf[120] = "";
    if (e != 0)
        ERR_error_string_n(e, buf, sizeof(buf));
    long v = ssl != NULL ? SSL_get_verify_result(ssl) : X509_V_OK;
    bool not_tls =
        ERR_GET_LIB(e) == ERR_LIB_SSL && (ERR_GET_REASON(e) == SSL_R_WRONG_VERSION_NUMBER ||
                                          ERR_GET_REASON(e) == SSL_R_HTTP_REQUEST ||
                                          ERR_GET_REASON(e) == SSL_R_PACKET_LENGTH_TOO_LONG);
    if (v != X509_V_OK)
        snprintf(err, err_len, "%s: certificate: %s", what, X509_verify_cert_error_string(v));
    else
        snprintf(err, err_len, "%s: %s%s", what, buf[0] ? buf : "failed",
                 not_tls ? " (is the peer speaking TLS?)" : "");
    ERR_clear_error();
}

/* Whether path can be read; the reason into err when not. */
static bool readable(const char *path, char *err, size_t err_len)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, err_len, "%s: %s", path, strerror(errno));
        return false;
    }
    fclose(f);
    return true;
}

/* Server side: h2 when the client offers it and the server speaks HTTP/2, else http/1.1. A
 * client that offers neither goes on without ALPN (the protocol sniffing decides). */
static int on_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                   const unsigned char *in, unsigned int inlen, void *arg)
{
    const rpc_tls_t *tls = arg;
    static const char *const k_protos[] = {"h2", "http/1.1"};
    for (size_t p = tls->http2 ? 0 : 1; p < 2; p++) {
        size_t pl = strlen(k_protos[p]);
        for (unsigned i = 0; i < inlen;) {
            unsigned l = in[i];
            if (i + 1 + l > inlen)
                break;
            if (l == pl && memcmp(in + i + 1, k_protos[p], pl) == 0) {
                *out = in + i + 1;
                *outlen = (unsigned char)l;
                return SSL_TLSEXT_ERR_OK;
            }
            i += 1 + l;
        }
    }
    return SSL_TLSEXT_ERR_NOACK;
}

void rpc_tls_params_default(rpc_tls_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->http2 = true;
    p->check_name = true;
}

fy_status_t rpc_tls_create(const rpc_tls_params_t *p, rpc_tls_t **tls_p, char *err, size_t err_len)
{
    char dummy[8];
    if (err == NULL)
        err = dummy, err_len = sizeof(dummy);
    if (p == NULL || tls_p == NULL)
        return FY_ERR_INVALID_ARG;
    const bool server = p->cert_file != NULL && p->cert_file[0];
    if (server && (p->key_file == NULL || !p->key_file[0])) {
        snprintf(err, err_len, "a TLS certificate needs its private key");
        return FY_ERR_INVALID_ARG;
    }
    if (!server && (p->ca_file == NULL || !p->ca_file[0])) {
        snprintf(err, err_len, "TLS needs a certificate and key (server) or CA file (client)");
        return FY_ERR_INVALID_ARG;
    }
    rpc_tls_t *tls = calloc(1, sizeof(*tls));
    if (tls == NULL)
        return FY_ERR_NO_MEMORY;
    tls->server = server;
    tls->http2 = p->http2;
    tls->check_name = p->check_name;
    ERR_clear_error();
    tls->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (tls->ctx == NULL) {
        ssl_error(err, err_len, "TLS", NULL);
        free(tls);
        return FY_ERR_NO_MEMORY;
    }
    SSL_CTX_set_min_proto_version(tls->ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(tls->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE);
    fy_status_t st = FY_OK;
    if (server) {
        if (!readable(p->cert_file, err, err_len) || !readable(p->key_file, err, err_len)) {
            st = FY_ERR_INVALID_ARG;
        } else if (SSL_CTX_use_certificate_chain_file(tls->ctx, p->cert_file) != 1) {
            ssl_error(err, err_len, p->cert_file, NULL);
            st = FY_ERR_INVALID_ARG;
        } else if (SSL_CTX_use_PrivateKey_file(tls->ctx, p->key_file, SSL_FILETYPE_PEM) != 1) {
            ssl_error(err, err_len, p->key_file, NULL);
            st = FY_ERR_INVALID_ARG;
        } else if (SSL_CTX_check_private_key(tls->ctx) != 1) {
            snprintf(err, err_len, "%s does not belong to the certificate in %s", p->key_file,
                     p->cert_file);
            ERR_clear_error();
            st = FY_ERR_INVALID_ARG;
        }
        SSL_CTX_set_alpn_select_cb(tls->ctx, on_alpn, tls);
    } else {
        if (!readable(p->ca_file, err, err_len)) {
            st = FY_ERR_INVALID_ARG;
        } else if (SSL_CTX_load_verify_locations(tls->ctx, p->ca_file, NULL) != 1) {
            ssl_error(err, err_len, p->ca_file, NULL);
            st = FY_ERR_INVALID_ARG;
        }
        // A certificate in the file is trusted as it stands: the server's own self-signed one,
        // or an intermediate's, pins the server without its root.
        X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(tls->ctx), X509_V_FLAG_PARTIAL_CHAIN);
        SSL_CTX_set_verify(tls->ctx, SSL_VERIFY_PEER, NULL);
        static const unsigned char k_h2[] = {2, 'h', '2'};
        static const unsigned char k_h1[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
        if (p->http2 ? SSL_CTX_set_alpn_protos(tls->ctx, k_h2, sizeof(k_h2))
                     : SSL_CTX_set_alpn_protos(tls->ctx, k_h1, sizeof(k_h1)))
            st = FY_ERR_NO_MEMORY;
    }
    if (st != FY_OK) {
        rpc_tls_destroy(tls);
        return st;
    }
    *tls_p = tls;
    return FY_OK;
}

void rpc_tls_destroy(rpc_tls_t *tls)
{
    if (tls == NULL)
        return;
    SSL_CTX_free(tls->ctx);
    free(tls);
}

bool rpc_tls_is_server(const rpc_tls_t *tls)
{
    return tls->server;
}

fy_status_t rpc_tls_conn_create(const rpc_tls_t *tls, const char *host, rpc_tls_conn_t **c_p)
{
    rpc_tls_conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return FY_ERR_NO_MEMORY;
    c->server = tls->server;
    c->ssl = SSL_new(tls->ctx);
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    if (c->ssl == NULL || c->rbio == NULL || c->wbio == NULL) {
        BIO_free(c->rbio);
        BIO_free(c->wbio);
        SSL_free(c->ssl);
        free(c);
        ERR_clear_error();
        return FY_ERR_NO_MEMORY;
    }
    BIO_set_mem_eof_return(c->rbio, -1); // empty means "more to come", not end of stream
    SSL_set_bio(c->ssl, c->rbio, c->wbio);
    bool ok = true;
    if (tls->server) {
        SSL_set_accept_state(c->ssl);
    } else {
        SSL_set_connect_state(c->ssl);
        if (host != NULL && host[0] && tls->check_name) {
            unsigned char ip[16];
            bool literal = inet_pton(AF_INET, host, ip) == 1 || inet_pton(AF_INET6, host, ip) == 1;
            if (literal) {
                ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host) == 1;
            } else {
                ok =
                    SSL_set_tlsext_host_name(c->ssl, host) == 1 && SSL_set1_host(c->ssl, host) == 1;
            }
        }
    }
    if (!ok) {
        rpc_tls_conn_destroy(c);
        ERR_clear_error();
        return FY_ERR_NO_MEMORY;
    }
    *c_p = c;
    return FY_OK;
}

void rpc_tls_conn_destroy(rpc_tls_conn_t *c)
{
    if (c == NULL)
        return;
    SSL_free(c->ssl); // frees both BIOs
    free(c->early);
    free(c);
}

/* Runs the handshake as far as the bytes allow; on its end sends what waited. */
static fy_status_t handshake(rpc_tls_conn_t *c)
{
    if (c->done)
        return FY_OK;
    ERR_clear_error();
    int rv = SSL_do_handshake(c->ssl);
    if (rv != 1) {
        int e = SSL_get_error(c->ssl, rv);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            return FY_OK;
        c->failed = true;
        ssl_error(c->error, sizeof(c->error), "TLS handshake", c->ssl);
        return FY_ERR_TRANSPORT;
    }
    c->done = true;
    const unsigned char *proto = NULL;
    unsigned int len = 0;
    SSL_get0_alpn_selected(c->ssl, &proto, &len);
    if (proto != NULL && len < sizeof(c->alpn)) {
        memcpy(c->alpn, proto, len);
        c->alpn[len] = '\0';
    }
    if (c->early_len > 0) {
        size_t n = c->early_len;
        c->early_len = 0;
        fy_status_t st = rpc_tls_conn_send(c, c->early, n);
        free(c->early);
        c->early = NULL;
        c->early_cap = 0;
        return st;
    }
    return FY_OK;
}

fy_status_t rpc_tls_conn_start(rpc_tls_conn_t *c)
{
    return c->failed ? FY_ERR_TRANSPORT : handshake(c);
}

fy_status_t rpc_tls_conn_recv(rpc_tls_conn_t *c, const uint8_t *data, size_t len,
                              rpc_tls_plain_cb cb, void *arg)
{
    if (c->failed)
        return FY_ERR_TRANSPORT;
    while (len > 0) {
        int n = BIO_write(c->rbio, data, len > (1u << 30) ? 1 << 30 : (int)len);
        if (n <= 0)
            return FY_ERR_NO_MEMORY;
        data += n;
        len -= (size_t)n;
    }
    fy_status_t st = handshake(c);
    if (st != FY_OK || !c->done)
        return st;
    uint8_t buf[16384];
    for (;;) {
        ERR_clear_error();
        int n = SSL_read(c->ssl, buf, sizeof(buf));
        if (n > 0) {
            if ((st = cb(arg, buf, (size_t)n)) != FY_OK)
                return st;
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            return FY_OK;
        if (e == SSL_ERROR_ZERO_RETURN)
            return FY_ERR_CLOSED; // the peer's close_notify
        c->failed = true;
        ssl_error(c->error, sizeof(c->error), "TLS record", NULL);
        return FY_ERR_TRANSPORT;
    }
}

fy_status_t rpc_tls_conn_send(rpc_tls_conn_t *c, const uint8_t *data, size_t len)
{
    if (c->failed)
        return FY_ERR_TRANSPORT;
    if (!c->done) {
        if (c->early_len + len > c->early_cap) {
            size_t cap = FY_MAX(c->early_cap * 2, c->early_len + len);
            uint8_t *p = realloc(c->early, cap);
            if (p == NULL)
                return FY_ERR_NO_MEMORY;
            c->early = p;
            c->early_cap = cap;
        }
        memcpy(c->early + c->early_len, data, len);
        c->early_len += len;
        return handshake(c);
    }
    while (len > 0) {
        ERR_clear_error();
        int n = SSL_write(c->ssl, data, len > (1u << 30) ? 1 << 30 : (int)len);
        if (n <= 0) {
            c->failed = true;
            ssl_error(c->error, sizeof(c->error), "TLS write", NULL);
            return FY_ERR_TRANSPORT;
        }
        data += n;
        len -= (size_t)n;
    }
    return FY_OK;
}

size_t rpc_tls_conn_pending(const rpc_tls_conn_t *c)
{
    return BIO_ctrl_pending(c->wbio);
}

size_t rpc_tls_conn_take(rpc_tls_conn_t *c, uint8_t *dst, size_t max)
{
    int n = BIO_read(c->wbio, dst, max > (1u << 30) ? 1 << 30 : (int)max);
    return n > 0 ? (size_t)n : 0;
}

bool rpc_tls_conn_ready(const rpc_tls_conn_t *c)
{
    return c->done;
}

const char *rpc_tls_conn_alpn(const rpc_tls_conn_t *c)
{
    return c->alpn;
}

const char *rpc_tls_conn_error(const rpc_tls_conn_t *c)
{
    return c->error;
}
