// The gRPC message layer: length-prefix reassembly over any chunking, the size limit, the
// compressed flag, grpc-timeout values and grpc-message percent-encoding.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "interop.pb-c.h"
#include "rpc.h"

typedef struct {
    size_t n;
    size_t lens[16];
    uint8_t first[16];
} got_t;

static fy_status_t collect(void *arg, const uint8_t *data, size_t len)
{
    got_t *g = arg;
    if (g->n < 16) {
        g->lens[g->n] = len;
        g->first[g->n] = len ? data[0] : 0;
    }
    g->n++;
    return FY_OK;
}

static void test_reassembly_any_chunking(void **state)
{
    // Three messages of 0, 1 and 300 bytes, fed 1..N bytes at a time.
    uint8_t buf[5 + 6 + 305];
    size_t o = 0;
    memcpy(buf + o, (uint8_t[]){0, 0, 0, 0, 0}, 5), o += 5;
    memcpy(buf + o, (uint8_t[]){0, 0, 0, 0, 1, 0xaa}, 6), o += 6;
    memcpy(buf + o, (uint8_t[]){0, 0, 0, 1, 44}, 5), o += 5;
    memset(buf + o, 0xbb, 300), o += 300;
    for (size_t step = 1; step <= sizeof(buf); step += 7) {
        rpc_reader_t r;
        rpc_reader_init(&r, 1000);
        got_t g = {0};
        for (size_t i = 0; i < sizeof(buf); i += step)
            assert_int_equal(
                rpc_reader_feed(&r, buf + i, FY_MIN(step, sizeof(buf) - i), collect, &g), FY_OK);
        assert_int_equal(g.n, 3);
        assert_int_equal(g.lens[0], 0);
        assert_int_equal(g.lens[1], 1);
        assert_int_equal(g.first[1], 0xaa);
        assert_int_equal(g.lens[2], 300);
        assert_int_equal(g.first[2], 0xbb);
        assert_true(rpc_reader_idle(&r));
        rpc_reader_cleanup(&r);
    }
}

static void test_reader_errors(void **state)
{
    rpc_reader_t r;
    got_t g = {0};
    rpc_reader_init(&r, 10);
    assert_int_equal(rpc_reader_feed(&r, (uint8_t[]){0, 0, 0, 0, 11}, 5, collect, &g),
                     FY_ERR_RESOURCE_EXHAUSTED);
    // Once failed, the stream stays failed.
    assert_int_equal(rpc_reader_feed(&r, (uint8_t[]){0, 0, 0, 0, 0}, 5, collect, &g),
                     FY_ERR_PROTOCOL);
    rpc_reader_cleanup(&r);

    rpc_reader_init(&r, 10);
    assert_int_equal(rpc_reader_feed(&r, (uint8_t[]){1, 0, 0, 0, 0}, 5, collect, &g),
                     FY_ERR_UNSUPPORTED);
    rpc_reader_cleanup(&r);
    rpc_reader_init(&r, 10);
    assert_int_equal(rpc_reader_feed(&r, (uint8_t[]){2, 0, 0, 0, 0}, 5, collect, &g),
                     FY_ERR_PROTOCOL);
    rpc_reader_cleanup(&r);

    // A 4 GiB-1 prefix under a 4 GiB limit allocates only for the bytes that arrived.
    rpc_reader_init(&r, UINT32_MAX);
    assert_int_equal(
        rpc_reader_feed(&r, (uint8_t[]){0, 0xff, 0xff, 0xff, 0xff, 1, 2}, 7, collect, &g), FY_OK);
    assert_true(r.msg_cap <= 4096);
    rpc_reader_cleanup(&r);

    // A partial message is not idle (END_STREAM there means truncation).
    rpc_reader_init(&r, 10);
    assert_int_equal(rpc_reader_feed(&r, (uint8_t[]){0, 0, 0, 0, 4, 1}, 6, collect, &g), FY_OK);
    assert_false(rpc_reader_idle(&r));
    rpc_reader_cleanup(&r);
    assert_int_equal(g.n, 0);
}

static void test_pack_roundtrip(void **state)
{
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    req.text = "abc";
    uint8_t *buf;
    size_t len;
    assert_int_equal(rpc_message_pack(&req.base, 100, &buf, &len), FY_OK);
    assert_int_equal(len, 5 + 5);
    assert_int_equal(buf[0], 0);
    assert_int_equal(buf[4], 5);
    free(buf);
    assert_int_equal(rpc_message_pack(&req.base, 4, &buf, &len), FY_ERR_RESOURCE_EXHAUSTED);
}

static void test_timeout(void **state)
{
    uint64_t ns = 0;
    assert_int_equal(rpc_timeout_parse("100m", 4, &ns), FY_OK);
    assert_int_equal(ns, 100000000ull);
    assert_int_equal(rpc_timeout_parse("2S", 2, &ns), FY_OK);
    assert_int_equal(ns, 2000000000ull);
    assert_int_equal(rpc_timeout_parse("1H", 2, &ns), FY_OK);
    assert_int_equal(ns, 3600000000000ull);
    assert_int_equal(rpc_timeout_parse("5n", 2, &ns), FY_OK);
    assert_int_equal(ns, 5);
    assert_int_equal(rpc_timeout_parse("99999999H", 9, &ns), FY_OK); // saturates
    assert_int_equal(rpc_timeout_parse("123456789m", 10, &ns), FY_ERR_FORMAT);
    assert_int_equal(rpc_timeout_parse("m", 1, &ns), FY_ERR_FORMAT);
    assert_int_equal(rpc_timeout_parse("1x", 2, &ns), FY_ERR_FORMAT);
    assert_int_equal(rpc_timeout_parse("-1S", 3, &ns), FY_ERR_FORMAT);
    char buf[24];
    rpc_timeout_format(1500, buf, sizeof(buf));
    assert_string_equal(buf, "1500m");
    rpc_timeout_format(100000000ull * 10, buf, sizeof(buf));
    assert_string_equal(buf, "1000000S");
}

static void test_message_encoding(void **state)
{
    const char *s = "bad: 100% \xc3\xbc\n";
    char *e = rpc_message_encode(s);
    assert_string_equal(e, "bad: 100%25 %C3%BC%0A");
    char *d = rpc_message_decode(e, strlen(e));
    assert_string_equal(d, s);
    free(e);
    free(d);
    // Malformed escapes pass through.
    d = rpc_message_decode("50%zz%4", 7);
    assert_string_equal(d, "50%zz%4");
    free(d);
}

static void test_codes(void **state)
{
    assert_string_equal(rpc_code_name(RPC_CODE_DEADLINE_EXCEEDED), "DEADLINE_EXCEEDED");
    assert_string_equal(rpc_code_name(99), "UNKNOWN");
    assert_int_equal(rpc_code_from_status(FY_ERR_TIMEOUT), RPC_CODE_DEADLINE_EXCEEDED);
    assert_int_equal(rpc_code_to_status(RPC_CODE_UNAVAILABLE), FY_ERR_UNAVAILABLE);
    for (int c = 0; c <= 16; c++)
        if (c != RPC_CODE_UNKNOWN && c != RPC_CODE_INTERNAL)
            assert_int_equal(rpc_code_from_status(rpc_code_to_status(c)), c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reassembly_any_chunking), cmocka_unit_test(test_reader_errors),
        cmocka_unit_test(test_pack_roundtrip),          cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_message_encoding),        cmocka_unit_test(test_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
