// CRC32C: RFC 3720 (iSCSI) test vectors, incremental use, hardware path equals the table path.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "common.h"

static void check_both(const void *buf, size_t len, uint32_t expect)
{
    assert_int_equal(fy_crc32c(0, buf, len), expect);
    assert_int_equal(fy_crc32c_sw(0, buf, len), expect);
}

static void test_rfc3720_vectors(void **state)
{
    uint8_t buf[48];
    memset(buf, 0, 32);
    check_both(buf, 32, 0x8a9136aau);
    memset(buf, 0xff, 32);
    check_both(buf, 32, 0x62a8ab43u);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)i;
    check_both(buf, 32, 0x46dd794eu);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)(31 - i);
    check_both(buf, 32, 0x113fdb5cu);
    // iSCSI SCSI Read (10) command PDU from RFC 3720 B.4.
    static const uint8_t pdu[48] = {
        0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00,
        0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
    check_both(pdu, 48, 0xd9963a56u);
    check_both("123456789", 9, 0xe3069283u);
    check_both("", 0, 0);
}

static void test_incremental_and_unaligned(void **state)
{
    size_t n = 100003;
    uint8_t *buf = malloc(n + 8);
    uint64_t rng = 7;
    for (size_t i = 0; i < n + 8; i++) {
        rng = rng * 6364136223846793005ull + 1;
        buf[i] = (uint8_t)(rng >> 56);
    }
    for (size_t off = 0; off < 8; off++) {
        uint32_t whole = fy_crc32c(0, buf + off, n);
        assert_int_equal(whole, fy_crc32c_sw(0, buf + off, n));
        uint32_t part = 0;
        size_t pos = 0, step = 1;
        while (pos < n) {
            size_t len = FY_MIN(step, n - pos);
            part = fy_crc32c(part, buf + off + pos, len);
            pos += len;
            step = step * 3 + 1;
        }
        assert_int_equal(part, whole);
    }
    // One flipped bit anywhere changes the checksum.
    uint32_t ref = fy_crc32c(0, buf, n);
    for (size_t i = 0; i < n; i += 997) {
        buf[i] ^= 0x10;
        assert_int_not_equal(fy_crc32c(0, buf, n), ref);
        buf[i] ^= 0x10;
    }
    free(buf);
}

/* Every length around the block sizes of the interleaved hardware path (3 x 256 and
 * 3 x 8192 bytes) and their multiples, against the table implementation. */
static void test_lengths_across_blocks(void **state)
{
    size_t n = 3 * 3 * 8192 + 3 * 256 + 64;
    uint8_t *buf = malloc(n);
    uint64_t rng = 11;
    for (size_t i = 0; i < n; i++) {
        rng = rng * 6364136223846793005ull + 1;
        buf[i] = (uint8_t)(rng >> 56);
    }
    for (size_t len = 0; len < 2 * 3 * 256 + 16; len++)
        assert_int_equal(fy_crc32c(0x1234u, buf + 1, len), fy_crc32c_sw(0x1234u, buf + 1, len));
    const size_t anchors[] = {3 * 8192, 2 * 3 * 8192, 3 * 8192 + 3 * 256, n - 16};
    for (size_t a = 0; a < FY_ARRAY_SIZE(anchors); a++)
        for (size_t len = anchors[a] - 9; len <= anchors[a] + 9 && len <= n - 3; len++)
            assert_int_equal(fy_crc32c(0, buf + 3, len), fy_crc32c_sw(0, buf + 3, len));
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc3720_vectors),
        cmocka_unit_test(test_incremental_and_unaligned),
        cmocka_unit_test(test_lengths_across_blocks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
