// HTTP/1.1 GET /metrics and /healthz on the gRPC port: the server tells a request line from
// the HTTP/2 preface, answers plain HTTP and closes, and gRPC keeps working on the same port,
// including a connection opened before and used after the HTTP requests.
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <cmocka.h>

#include "echo_service.h"
#include "rpc_test_util.h"

typedef struct {
    uv_loop_t loop;
    echo_thread_t *srv;
    int port;
    rpc_channel_t *ch;
    fy_metrics_t *metrics;
    fy_metric_t *requests;
} fixture_t;

static atomic_bool g_healthy = true;

static bool test_healthy(void *arg)
{
    return atomic_load(&g_healthy);
}

/* Sends raw bytes, reads until the server closes; returns the bytes read (NUL-terminated
 * into out). -1 when the server did not close within 5 s. */
static ssize_t http_exchange(int port, const char *req, size_t req_len, char *out, size_t cap)
{
    int fd = tcp_connect_local(port);
    if (fd < 0)
        return -1;
    size_t off = 0;
    while (off < req_len) {
        ssize_t n = write(fd, req + off, req_len - off);
        if (n <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)n;
    }
    size_t got = 0;
    for (int waited = 0; waited < 5000;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, 50);
        if (r <= 0) {
            waited += 50;
            continue;
        }
        ssize_t n = read(fd, out + got, cap - 1 - got);
        if (n <= 0) {
            close(fd);
            out[got] = '\0';
            return (ssize_t)got;
        }
        got += (size_t)n;
        if (got == cap - 1)
            break;
    }
    close(fd);
    return -1;
}

static ssize_t http_get(int port, const char *target, char *out, size_t cap)
{
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n", target);
    return http_exchange(port, req, (size_t)n, out, cap);
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    uv_loop_init(&f->loop);
    if (fy_metrics_create(&f->metrics) != FY_OK)
        return -1;
    f->requests = fy_metrics_counter(f->metrics, "ferry_test_requests_total", "kind=\"a\"",
                                     "requests in the test");
    fy_metric_add(f->requests, 41);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    p.metrics = f->metrics;
    p.healthy = test_healthy;
    atomic_store(&g_healthy, true);
    if (echo_thread_start(&p, &f->srv) != FY_OK)
        return -1;
    f->port = echo_thread_port(f->srv);
    char addr[32];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", f->port);
    const char *list[1] = {addr};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = list;
    cp.n_addresses = 1;
    if (rpc_channel_create(&f->loop, &cp, &f->ch) != FY_OK)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    rpc_channel_destroy(f->ch);
    drain_loop(&f->loop);
    echo_thread_stop(f->srv, 1000);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    fy_metrics_destroy(f->metrics);
    free(f);
    return 0;
}

static void echo_ok(fixture_t *f, const char *text)
{
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    req.text = (char *)text;
    result_t r;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, "/ferry.test.Echo/Unary", &req.base, NULL, &r),
                     FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_string_equal(r.text, text);
}

static void test_metrics(void **state)
{
    fixture_t *f = *state;
    echo_ok(f, "before"); // an HTTP/2 connection stays open through the HTTP/1.1 requests
    char buf[16384];
    assert_true(http_get(f->port, "/metrics", buf, sizeof(buf)) > 0);
    assert_non_null(strstr(buf, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(buf, "Content-Type: text/plain; version=0.0.4"));
    assert_non_null(strstr(buf, "ferry_test_requests_total{kind=\"a\"} 41"));
    // Content-Length matches the body.
    const char *cl = strstr(buf, "Content-Length: ");
    const char *body = strstr(buf, "\r\n\r\n");
    assert_non_null(cl);
    assert_non_null(body);
    assert_int_equal(strtoul(cl + 16, NULL, 10), strlen(body + 4));
    // Values are rendered at request time.
    fy_metric_inc(f->requests);
    assert_true(http_get(f->port, "/metrics?x=1", buf, sizeof(buf)) > 0);
    assert_non_null(strstr(buf, "ferry_test_requests_total{kind=\"a\"} 42"));
    echo_ok(f, "after");
}

static void test_healthz(void **state)
{
    fixture_t *f = *state;
    char buf[4096];
    assert_true(http_get(f->port, "/healthz", buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_non_null(strstr(buf, "\r\n\r\nok\n"));
    atomic_store(&g_healthy, false);
    assert_true(http_get(f->port, "/healthz", buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 503 ", 13) == 0);
    atomic_store(&g_healthy, true);
    echo_ok(f, "still serving");
}

static void test_errors(void **state)
{
    fixture_t *f = *state;
    char buf[4096];
    assert_true(http_get(f->port, "/nope", buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 404 ", 13) == 0);
    static const char head[] = "HEAD /metrics HTTP/1.1\r\n\r\n";
    assert_true(http_exchange(f->port, head, sizeof(head) - 1, buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 405 ", 13) == 0);
    static const char junk[] = "GET\r\n\r\n";
    assert_true(http_exchange(f->port, junk, sizeof(junk) - 1, buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 400 ", 13) == 0);
    // A request head that never ends is refused at the size limit.
    size_t big_len = 9000;
    char *big = malloc(big_len);
    memcpy(big, "GET /metrics HTTP/1.1\r\n", 23);
    memset(big + 23, 'a', big_len - 23);
    assert_true(http_exchange(f->port, big, big_len, buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 431 ", 13) == 0);
    free(big);
    // A request split over several writes is reassembled.
    int fd = tcp_connect_local(f->port);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "GE", 2), 2);
    usleep(20000);
    assert_int_equal(write(fd, "T /healthz HTTP/1.1\r\n", 21), 21);
    usleep(20000);
    assert_int_equal(write(fd, "\r\n", 2), 2);
    size_t got = 0;
    for (int i = 0; i < 100; i++) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0)
            continue;
        ssize_t n = read(fd, buf + got, sizeof(buf) - 1 - got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    assert_true(strncmp(buf, "HTTP/1.1 200 OK\r\n", 17) == 0);
    // Bytes that are neither HTTP/1.1 nor HTTP/2 still close the connection.
    fd = tcp_connect_local(f->port);
    assert_int_equal(write(fd, "\x01\x02garbage-garbage-garbage", 25), 25);
    assert_true(wait_closed(fd, 3000));
    close(fd);
    echo_ok(f, "unharmed");
}

/* Without a metrics registry /metrics is 404, and /healthz says draining during shutdown. */
static void test_no_metrics_and_drain(void **state)
{
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    echo_thread_t *t = NULL;
    assert_int_equal(echo_thread_start(&p, &t), FY_OK);
    int port = echo_thread_port(t);
    char buf[4096];
    assert_true(http_get(port, "/metrics", buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 404 ", 13) == 0);
    assert_true(http_get(port, "/healthz", buf, sizeof(buf)) > 0);
    assert_true(strncmp(buf, "HTTP/1.1 200 OK\r\n", 17) == 0);
    // An idle connection that never sent a byte does not hold up shutdown.
    int fd = tcp_connect_local(port);
    assert_true(fd >= 0);
    usleep(20000);
    uint64_t t0 = fy_clock_ns();
    echo_thread_stop(t, 5000);
    assert_true(fy_clock_ns() - t0 < 2000000000ull);
    assert_true(wait_closed(fd, 1000));
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_metrics, setup, teardown),
        cmocka_unit_test_setup_teardown(test_healthz, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test(test_no_metrics_and_drain),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
