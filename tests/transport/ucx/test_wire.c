// kvlink wire headers: every message packs and unpacks to itself; wrong sizes, bad magic,
// reserved bits and foreign status codes are refused. The receive pool allocator: no overlap,
// alignment, coalescing back to one extent, exhaustion reported.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <string.h>

#include "kvlink_int.h"

static kvlink_msg_t sample(uint32_t id)
{
    kvlink_msg_t m;
    memset(&m, 0, sizeof(m));
    m.id = (kvlink_am_id_t)id;
    switch (id) {
    case KVLINK_AM_HELLO:
    case KVLINK_AM_HELLO_ACK:
        m.protocol_version = 1;
        m.codec_version = 7;
        m.page_size = 65536;
        m.model_fingerprint = 0xfeedfacecafebeefull;
        m.instance_id = 0x0102030405060708ull;
        m.max_frame = 1ull << 26;
        m.status = id == KVLINK_AM_HELLO_ACK ? FY_ERR_MISMATCH : 0;
        break;
    case KVLINK_AM_OPEN:
        m.request_id = 0xffffffffffffffffull;
        break;
    case KVLINK_AM_CREDIT:
        m.request_id = 9;
        m.bytes = 1ull << 40;
        m.flags = KVLINK_CREDIT_INITIAL;
        break;
    case KVLINK_AM_FRAME:
        m.request_id = 10;
        m.bytes = 12345;
        m.layer = 31;
        m.crc = 0xdeadbeef;
        break;
    case KVLINK_AM_END:
        m.request_id = 11;
        m.frames = 32;
        m.bytes = 999999;
        break;
    case KVLINK_AM_STATUS:
    case KVLINK_AM_ABORT:
        m.request_id = 12;
        m.status = FY_ERR_TIMEOUT;
        break;
    }
    return m;
}

static void test_roundtrip(void **state)
{
    for (uint32_t id = 1; id < KVLINK_AM_COUNT; id++) {
        kvlink_msg_t m = sample(id), back;
        uint8_t buf[KVLINK_HDR_MAX];
        size_t n = kvlink_msg_pack(&m, buf);
        assert_int_equal(n, kvlink_msg_size(id));
        assert_int_equal(kvlink_msg_unpack(id, buf, n, &back), FY_OK);
        assert_memory_equal(&m, &back, sizeof(m));
        // One byte short or long is refused, and so is the header under another id of a
        // different size.
        assert_int_equal(kvlink_msg_unpack(id, buf, n - 1, &back), FY_ERR_FORMAT);
        assert_int_equal(kvlink_msg_unpack(id, buf, n + 1, &back), FY_ERR_FORMAT);
    }
    uint8_t buf[KVLINK_HDR_MAX] = {0};
    kvlink_msg_t back;
    assert_int_equal(kvlink_msg_unpack(0, buf, 16, &back), FY_ERR_FORMAT);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_COUNT, buf, 16, &back), FY_ERR_FORMAT);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_OPEN, NULL, 16, &back), FY_ERR_FORMAT);
}

static void test_refusals(void **state)
{
    uint8_t buf[KVLINK_HDR_MAX];
    kvlink_msg_t m, back;
    // HELLO: bad magic, reserved word, a status on a HELLO.
    m = sample(KVLINK_AM_HELLO);
    size_t n = kvlink_msg_pack(&m, buf);
    buf[0] ^= 1;
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_HELLO, buf, n, &back), FY_ERR_FORMAT);
    kvlink_msg_pack(&m, buf);
    buf[44] = 1;
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_HELLO, buf, n, &back), FY_ERR_FORMAT);
    m.status = FY_ERR_MISMATCH;
    kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_HELLO, buf, n, &back), FY_ERR_FORMAT);
    // STATUS with a code that is not a Ferry status; ABORT with OK.
    m = sample(KVLINK_AM_STATUS);
    m.status = -4242;
    n = kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_STATUS, buf, n, &back), FY_ERR_FORMAT);
    m.status = 5;
    kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_STATUS, buf, n, &back), FY_ERR_FORMAT);
    m = sample(KVLINK_AM_ABORT);
    m.status = 0;
    kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_ABORT, buf, n, &back), FY_ERR_FORMAT);
    // FRAME: zero length, unknown flags.
    m = sample(KVLINK_AM_FRAME);
    m.bytes = 0;
    n = kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_FRAME, buf, n, &back), FY_ERR_FORMAT);
    m = sample(KVLINK_AM_FRAME);
    m.flags = 2;
    kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_FRAME, buf, n, &back), FY_ERR_FORMAT);
    // A self-checked frame carries no CRC: a nonzero one is malformed; crc 0 is accepted.
    m = sample(KVLINK_AM_FRAME);
    m.flags = KVLINK_FRAME_SELF_CHECKED;
    m.crc = 5;
    kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_FRAME, buf, n, &back), FY_ERR_FORMAT);
    m.crc = 0;
    kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_FRAME, buf, n, &back), FY_OK);
    assert_int_equal(back.flags, KVLINK_FRAME_SELF_CHECKED);
    // CREDIT: zero bytes, unknown flag.
    m = sample(KVLINK_AM_CREDIT);
    m.bytes = 0;
    n = kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_CREDIT, buf, n, &back), FY_ERR_FORMAT);
    m = sample(KVLINK_AM_CREDIT);
    m.flags = 4;
    kvlink_msg_pack(&m, buf);
    assert_int_equal(kvlink_msg_unpack(KVLINK_AM_CREDIT, buf, n, &back), FY_ERR_FORMAT);
    assert_int_equal(kvlink_status_from_wire(FY_ERR_TIMEOUT), FY_ERR_TIMEOUT);
    assert_int_equal(kvlink_status_from_wire(1), FY_ERR_PROTOCOL);
    assert_int_equal(kvlink_status_from_wire(-1000), FY_ERR_PROTOCOL);
}

static void test_pool(void **state)
{
    kvlink_pool_t pool;
    assert_int_equal(kvlink_pool_init(&pool, 1u << 20), FY_OK);
    size_t off[64], alen[64];
    // Fill with mixed sizes until exhausted; extents never overlap and stay aligned.
    int n = 0;
    for (; n < 64; n++) {
        size_t len = 1 + (size_t)(n * 7919 % 40000);
        if (kvlink_pool_alloc(&pool, len, &off[n], &alen[n]) != FY_OK)
            break;
        assert_int_equal(off[n] % KVLINK_POOL_ALIGN, 0);
        assert_true(alen[n] >= len);
        for (int k = 0; k < n; k++)
            assert_true(off[n] + alen[n] <= off[k] || off[k] + alen[k] <= off[n]);
    }
    assert_true(n > 20);
    size_t o, a;
    assert_int_equal(kvlink_pool_alloc(&pool, 0, &o, &a), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(kvlink_pool_alloc(&pool, 2u << 20, &o, &a), FY_ERR_RESOURCE_EXHAUSTED);
    // Free every other one, then the rest: everything merges back into one extent.
    for (int i = 0; i < n; i += 2)
        kvlink_pool_free(&pool, off[i], alen[i]);
    for (int i = 1; i < n; i += 2)
        kvlink_pool_free(&pool, off[i], alen[i]);
    assert_int_equal(pool.used, 0);
    assert_int_equal(pool.n_free, 1);
    assert_int_equal(pool.free[0].len, pool.size);
    assert_int_equal(kvlink_pool_alloc(&pool, pool.size, &o, &a), FY_OK);
    kvlink_pool_free(&pool, o, a);
    kvlink_pool_cleanup(&pool);
    // An empty pool refuses everything.
    assert_int_equal(kvlink_pool_init(&pool, 0), FY_OK);
    assert_int_equal(kvlink_pool_alloc(&pool, 1, &o, &a), FY_ERR_RESOURCE_EXHAUSTED);
    kvlink_pool_cleanup(&pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
