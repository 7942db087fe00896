// TLS on the gRPC port: calls (unary, a large payload, a stream) through a CA-signed and a
// pinned self-signed certificate; the refusals a client must see (an unknown certificate, a
// name that does not match, a cleartext server), a cleartext client, garbage and a record that
// fails its authentication refused by the TLS server without harm to it; HTTP/1.1 GET /healthz
// inside TLS; bad configurations. Certificates come from tests/fixtures/tls/make_certs.sh, made
// afresh per run.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "echo_service.h"
#include "rpc_test_util.h"

static char g_dir[64];

static const char *cert(const char *name)
{
    static char paths[8][128];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, sizeof(paths[0]), "%s/%s", g_dir, name);
    return p;
}

static int group_setup(void **state)
{
    snprintf(g_dir, sizeof(g_dir), "/tmp/ferry-tls-XXXXXX");
    if (mkdtemp(g_dir) == NULL)
        return -1;
    const char *root = getenv("FERRY_SOURCE_ROOT");
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "sh %s/tests/fixtures/tls/make_certs.sh %s", root ? root : ".",
             g_dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "make_certs.sh failed (is openssl installed?)\n");
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static rpc_tls_t *server_tls(const char *crt, const char *key)
{
    rpc_tls_params_t p;
    rpc_tls_params_default(&p);
    p.cert_file = cert(crt);
    p.key_file = cert(key);
    rpc_tls_t *t = NULL;
    char err[200];
    if (rpc_tls_create(&p, &t, err, sizeof(err)) != FY_OK)
        fail_msg("server TLS: %s", err);
    assert_true(rpc_tls_is_server(t));
    return t;
}

static rpc_tls_t *client_tls(const char *ca, bool check_name)
{
    rpc_tls_params_t p;
    rpc_tls_params_default(&p);
    p.ca_file = cert(ca);
    p.check_name = check_name;
    rpc_tls_t *t = NULL;
    char err[200];
    if (rpc_tls_create(&p, &t, err, sizeof(err)) != FY_OK)
        fail_msg("client TLS: %s", err);
    assert_false(rpc_tls_is_server(t));
    return t;
}

typedef struct {
    uv_loop_t loop;
    rpc_channel_t *ch;
} client_t;

static void client_open(client_t *c, const char *host, int port, const rpc_tls_t *tls)
{
    uv_loop_init(&c->loop);
    char addr[64];
    snprintf(addr, sizeof(addr), "%s:%d", host, port);
    const char *list[1] = {addr};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = list;
    cp.n_addresses = 1;
    cp.tls = tls;
    cp.connect_timeout_ms = 2000;
    assert_int_equal(rpc_channel_create(&c->loop, &cp, &c->ch), FY_OK);
}

static void client_close(client_t *c)
{
    rpc_channel_destroy(c->ch);
    drain_loop(&c->loop);
    assert_int_equal(uv_loop_close(&c->loop), 0);
}

static void echo(client_t *c, const char *text, size_t payload, result_t *r)
{
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    req.text = (char *)text;
    uint8_t *buf = NULL;
    if (payload > 0) {
        buf = malloc(payload);
        for (size_t i = 0; i < payload; i++)
            buf[i] = (uint8_t)(i * 7);
        req.payload.data = buf;
        req.payload.len = payload;
    }
    rpc_call_opts_t o = {.timeout_ms = 5000};
    result_init(r);
    assert_int_equal(call_sync(&c->loop, c->ch, "/ferry.test.Echo/Unary", &req.base, &o, r), FY_OK);
    free(buf);
}

static void echo_ok(client_t *c, const char *text, size_t payload)
{
    result_t r;
    echo(c, text, payload, &r);
    if (r.code != RPC_CODE_OK)
        fail_msg("%s: %s", rpc_code_name(r.code), r.message);
    assert_string_equal(r.text, text);
    assert_int_equal(r.bytes, payload);
}

static echo_thread_t *serve(const rpc_tls_t *tls)
{
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    p.tls = tls;
    echo_thread_t *t = NULL;
    assert_int_equal(echo_thread_start(&p, &t), FY_OK);
    return t;
}

/* A CA-signed certificate for localhost and 127.0.0.1, checked against the CA by either name;
 * the server's own certificate pinned instead of the CA; one large message and a stream. */
static void test_calls(void **state)
{
    rpc_tls_t *st = server_tls("chain.crt", "server.key");
    echo_thread_t *t = serve(st);
    const char *cas[] = {"ca.crt", "server.crt"};
    const char *hosts[] = {"127.0.0.1", "localhost"};
    for (size_t i = 0; i < 2; i++) {
        rpc_tls_t *ct = client_tls(cas[i], true);
        client_t c;
        client_open(&c, hosts[i], echo_thread_port(t), ct);
        echo_ok(&c, "over TLS", 0);
        echo_ok(&c, "a second call, same connection", 0);
        echo_ok(&c, "3 MB", 3u << 20);
        Ferry__Test__StreamRequest sr = FERRY__TEST__STREAM_REQUEST__INIT;
        sr.count = 200;
        sr.size = 4096;
        result_t r;
        result_init(&r);
        assert_int_equal(rpc_channel_call(c.ch, "/ferry.test.Echo/Stream", &sr.base,
                                          &ferry__test__echo_response__descriptor, NULL,
                                          test_on_msg, test_on_done, &r, NULL),
                         FY_OK);
        run_until_done(&c.loop, &r);
        assert_int_equal(r.code, RPC_CODE_OK);
        assert_int_equal(r.n_msgs, 200);
        assert_true(r.in_order);
        client_close(&c);
        rpc_tls_destroy(ct);
    }
    echo_thread_stop(t, 1000);
    rpc_tls_destroy(st);
}

/* What a client must refuse, with the reason in the call's status. */
static void test_refusals(void **state)
{
    rpc_tls_t *st = server_tls("chain.crt", "server.key");
    echo_thread_t *t = serve(st);
    int port = echo_thread_port(t);
    rpc_tls_t *ct = client_tls("other.crt", true); // trusts only a certificate it never sees
    client_t c;
    client_open(&c, "127.0.0.1", port, ct);
    result_t r;
    echo(&c, "refused", 0, &r);
    fprintf(stderr, "unknown certificate: %s: %s\n", rpc_code_name(r.code), r.message);
    assert_int_equal(r.code, RPC_CODE_UNAVAILABLE);
    assert_non_null(strstr(r.message, "certificate"));
    client_close(&c);

    // A trusted certificate for another name (example.com, dialled as 127.0.0.1).
    rpc_tls_t *ot = server_tls("other.crt", "other.key");
    echo_thread_t *o = serve(ot);
    client_open(&c, "127.0.0.1", echo_thread_port(o), ct);
    echo(&c, "refused", 0, &r);
    fprintf(stderr, "another name: %s: %s\n", rpc_code_name(r.code), r.message);
    assert_int_equal(r.code, RPC_CODE_UNAVAILABLE);
    assert_non_null(strstr(r.message, "certificate"));
    client_close(&c);
    rpc_tls_destroy(ct);
    // Without the name check the pinned certificate serves any address it answers on.
    ct = client_tls("other.crt", false);
    client_open(&c, "127.0.0.1", echo_thread_port(o), ct);
    echo_ok(&c, "pinned", 0);
    client_close(&c);
    rpc_tls_destroy(ct);
    echo_thread_stop(o, 1000);
    rpc_tls_destroy(ot);

    ct = client_tls("ca.crt", true);
    // A cleartext client gets nothing from the TLS server, which goes on serving.
    client_open(&c, "127.0.0.1", port, NULL);
    echo(&c, "cleartext", 0, &r);
    assert_int_equal(r.code, RPC_CODE_UNAVAILABLE);
    client_close(&c);
    // Garbage where a ClientHello belongs: the server closes the connection.
    int fd = tcp_connect_local(port);
    assert_true(fd >= 0);
    static const char junk[] = "\x16\x03\x01\xff\xffnot a handshake at all";
    assert_true(write(fd, junk, sizeof(junk) - 1) == (ssize_t)sizeof(junk) - 1);
    assert_true(wait_closed(fd, 2000));
    close(fd);
    client_open(&c, "127.0.0.1", port, ct);
    echo_ok(&c, "still serving", 0);
    client_close(&c);
    echo_thread_stop(t, 1000);
    rpc_tls_destroy(st);

    // A TLS client against a cleartext server: the handshake never ends.
    t = serve(NULL);
    client_open(&c, "127.0.0.1", echo_thread_port(t), ct);
    echo(&c, "to cleartext", 0, &r);
    fprintf(stderr, "TLS to cleartext: %s: %s\n", rpc_code_name(r.code), r.message);
    assert_int_equal(r.code, RPC_CODE_UNAVAILABLE);
    assert_non_null(strstr(r.message, "speaking TLS"));
    client_close(&c);
    echo_thread_stop(t, 1000);
    rpc_tls_destroy(ct);
}

/* Runs a blocking client connection over fd: writes what c has for the socket, feeds what
 * comes back to c (plaintext to cb), until done(c) or the server closes or 5 s pass. Returns
 * the last rpc_tls_conn_recv status, FY_ERR_CLOSED when the server closed. */
static fy_status_t pump(int fd, rpc_tls_conn_t *c, rpc_tls_plain_cb cb, void *arg,
                        bool (*done)(const rpc_tls_conn_t *c))
{
    uint8_t buf[16384];
    fy_status_t st = FY_OK;
    for (int waited = 0;
         (st == FY_OK || st == FY_ERR_CLOSED) && !(done && done(c)) && waited < 5000;) {
        size_t n;
        while ((n = rpc_tls_conn_take(c, buf, sizeof(buf))) > 0)
            assert_int_equal(write(fd, buf, n), (ssize_t)n);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) {
            waited += 50;
            continue;
        }
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r <= 0)
            return FY_ERR_CLOSED;
        st = rpc_tls_conn_recv(c, buf, (size_t)r, cb, arg);
    }
    return st;
}

typedef struct {
    char *out;
    size_t cap, len;
} sink_t;

static fy_status_t to_sink(void *arg, const uint8_t *data, size_t len)
{
    sink_t *s = arg;
    size_t n = FY_MIN(len, s->cap - 1 - s->len);
    memcpy(s->out + s->len, data, n);
    s->len += n;
    return FY_OK;
}

/* A blocking TLS exchange through rpc_tls_conn_t: sends req, returns the plaintext that came
 * back until the server closed (NUL-terminated into out), or -1. */
static ssize_t tls_exchange(int port, const rpc_tls_t *tls, const char *req, char *out, size_t cap)
{
    int fd = tcp_connect_local(port);
    rpc_tls_conn_t *c = NULL;
    assert_true(fd >= 0);
    assert_int_equal(rpc_tls_conn_create(tls, "127.0.0.1", &c), FY_OK);
    sink_t s = {out, cap, 0};
    fy_status_t st = rpc_tls_conn_start(c);
    if (st == FY_OK)
        st = rpc_tls_conn_send(c, (const uint8_t *)req, strlen(req));
    assert_false(rpc_tls_conn_ready(c));
    // Until the server closes: it answers one GET a connection.
    ssize_t got =
        st == FY_OK && pump(fd, c, to_sink, &s, NULL) == FY_ERR_CLOSED ? (ssize_t)s.len : -1;
    assert_true(rpc_tls_conn_ready(c));
    assert_string_equal(rpc_tls_conn_alpn(c), "http/1.1");
    out[s.len] = '\0';
    rpc_tls_conn_destroy(c);
    close(fd);
    return got;
}

static fy_status_t discard(void *arg, const uint8_t *data, size_t len)
{
    return FY_OK;
}

/* After a handshake, a record that fails its authentication (one flipped byte): the server
 * drops that connection and goes on serving. */
static void test_bad_record(void **state)
{
    rpc_tls_t *st = server_tls("chain.crt", "server.key");
    echo_thread_t *t = serve(st);
    rpc_tls_t *ct = client_tls("ca.crt", true);
    int fd = tcp_connect_local(echo_thread_port(t));
    assert_true(fd >= 0);
    rpc_tls_conn_t *c = NULL;
    assert_int_equal(rpc_tls_conn_create(ct, "127.0.0.1", &c), FY_OK);
    assert_int_equal(rpc_tls_conn_start(c), FY_OK);
    assert_int_equal(pump(fd, c, discard, NULL, rpc_tls_conn_ready), FY_OK);
    assert_true(rpc_tls_conn_ready(c));
    assert_string_equal(rpc_tls_conn_alpn(c), "h2");
    // The client's Finished may still wait; then a record of plaintext, one byte flipped.
    uint8_t buf[16384];
    size_t n;
    while ((n = rpc_tls_conn_take(c, buf, sizeof(buf))) > 0)
        assert_int_equal(write(fd, buf, n), (ssize_t)n);
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert_int_equal(rpc_tls_conn_send(c, (const uint8_t *)preface, sizeof(preface) - 1), FY_OK);
    n = rpc_tls_conn_take(c, buf, sizeof(buf));
    assert_true(n > 20);
    buf[n - 3] ^= 0x40;
    assert_int_equal(write(fd, buf, n), (ssize_t)n);
    assert_true(wait_closed(fd, 2000));
    close(fd);
    rpc_tls_conn_destroy(c);
    client_t cl;
    client_open(&cl, "127.0.0.1", echo_thread_port(t), ct);
    echo_ok(&cl, "still serving", 0);
    client_close(&cl);
    echo_thread_stop(t, 1000);
    rpc_tls_destroy(ct);
    rpc_tls_destroy(st);
}

/* ferry_rpc_tls_failures_total counts the connections TLS refused: a cleartext client's and one
 * of garbage; a good TLS client's is not counted. */
static void test_failure_metric(void **state)
{
    fy_metrics_t *m = NULL;
    assert_int_equal(fy_metrics_create(&m), FY_OK);
    rpc_tls_t *st = server_tls("chain.crt", "server.key");
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    p.tls = st;
    p.metrics = m;
    echo_thread_t *t = NULL;
    assert_int_equal(echo_thread_start(&p, &t), FY_OK);
    rpc_tls_t *ct = client_tls("ca.crt", true);
    client_t c;
    client_open(&c, "127.0.0.1", echo_thread_port(t), ct);
    echo_ok(&c, "counted not", 0);
    client_close(&c);
    int fd = tcp_connect_local(echo_thread_port(t));
    static const char junk[] = "\x16\x03\x01\xff\xffnot a handshake";
    assert_int_equal(write(fd, junk, sizeof(junk) - 1), (ssize_t)sizeof(junk) - 1);
    assert_true(wait_closed(fd, 2000));
    close(fd);
    fd = tcp_connect_local(echo_thread_port(t));
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert_int_equal(write(fd, preface, sizeof(preface) - 1), (ssize_t)sizeof(preface) - 1);
    assert_true(wait_closed(fd, 2000));
    close(fd);
    fy_metric_t *f = fy_metrics_counter(m, "ferry_rpc_tls_failures_total", NULL, "");
    for (int i = 0; i < 200 && fy_metric_value(f) < 2; i++)
        usleep(10000); // the server counts when the connection's handles have closed
    assert_true(fy_metric_value(f) == 2);
    echo_thread_stop(t, 1000);
    rpc_tls_destroy(ct);
    rpc_tls_destroy(st);
    fy_metrics_destroy(m);
}

/* GET /healthz inside TLS on the gRPC port (a client that asks for http/1.1 by ALPN). */
static void test_http_get(void **state)
{
    rpc_tls_t *st = server_tls("chain.crt", "server.key");
    echo_thread_t *t = serve(st);
    rpc_tls_params_t p;
    rpc_tls_params_default(&p);
    p.ca_file = cert("ca.crt");
    p.http2 = false;
    rpc_tls_t *ct = NULL;
    assert_int_equal(rpc_tls_create(&p, &ct, NULL, 0), FY_OK);
    char out[2048];
    ssize_t n = tls_exchange(echo_thread_port(t), ct,
                             "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", out, sizeof(out));
    assert_true(n > 0);
    assert_non_null(strstr(out, "HTTP/1.1 200"));
    assert_non_null(strstr(out, "\r\n\r\nok\n"));
    echo_thread_stop(t, 1000);
    rpc_tls_destroy(ct);
    rpc_tls_destroy(st);
}

/* Configurations refused with the reason. */
static void test_bad_config(void **state)
{
    static const struct {
        const char *crt, *key, *ca, *why;
    } k_cases[] = {
        {"server.crt", "other.key", NULL, "mismatch"},
        {"missing.crt", "server.key", NULL, "missing.crt: No such file"},
        {"server.crt", "missing.key", NULL, "missing.key: No such file"},
        {"server.crt", NULL, NULL, "private key"},
        {NULL, NULL, "missing.crt", "missing.crt: No such file"},
        {NULL, NULL, "server.key", "server.key"}, // no certificate in it
        {NULL, NULL, NULL, "CA file"},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cases); i++) {
        rpc_tls_params_t p;
        rpc_tls_params_default(&p);
        p.cert_file = k_cases[i].crt ? cert(k_cases[i].crt) : NULL;
        p.key_file = k_cases[i].key ? cert(k_cases[i].key) : NULL;
        p.ca_file = k_cases[i].ca ? cert(k_cases[i].ca) : NULL;
        rpc_tls_t *t = NULL;
        char err[200] = "";
        assert_int_equal(rpc_tls_create(&p, &t, err, sizeof(err)), FY_ERR_INVALID_ARG);
        fprintf(stderr, "case %zu: %s\n", i, err);
        assert_null(t);
        assert_non_null(strstr(err, k_cases[i].why));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_calls),      cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_bad_record), cmocka_unit_test(test_failure_metric),
        cmocka_unit_test(test_http_get),   cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
