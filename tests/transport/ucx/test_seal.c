// Sealed KV frames (kvlink_seal.c): a frame of any size opens to itself under its key, request
// id and layer; a flip of any byte (magic, nonce, ciphertext, tag), a cut, another key, request
// or layer, or bytes that were never sealed fail with FY_ERR_CORRUPT; the same frame sealed
// twice differs (a fresh nonce each time) and shows none of its bytes.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kvlink.h"

static uint8_t g_key[KVLINK_SEAL_KEY_BYTES];

static uint8_t *sealed_copy(const uint8_t *frame, size_t len, uint64_t id, uint32_t layer)
{
    uint8_t *out = malloc(len + KVLINK_SEAL_OVERHEAD);
    assert_non_null(out);
    assert_int_equal(kvlink_seal(g_key, id, layer, frame, len, out), FY_OK);
    return out;
}

static void test_round_trip(void **state)
{
    static const size_t k_sizes[] = {0, 1, 15, 16, 17, 4096, (size_t)3 << 20};
    for (size_t s = 0; s < sizeof(k_sizes) / sizeof(k_sizes[0]); s++) {
        const size_t n = k_sizes[s];
        uint8_t *frame = malloc(n + 1);
        for (size_t i = 0; i < n; i++)
            frame[i] = (uint8_t)(i * 31 + s);
        uint8_t *a = sealed_copy(frame, n, 77, 5), *b = sealed_copy(frame, n, 77, 5);
        assert_memory_equal(a, "FYSL", 4);
        assert_memory_not_equal(a + 4, b + 4, 12); // fresh nonces
        if (n >= 16)
            assert_memory_not_equal(a + 16, frame, 16); // the bytes do not show
        uint8_t *out = NULL;
        size_t out_len = 99;
        assert_int_equal(kvlink_unseal(g_key, 77, 5, a, n + KVLINK_SEAL_OVERHEAD, &out, &out_len),
                         FY_OK);
        assert_int_equal(out_len, n);
        assert_true(out == a + 16);
        if (n > 0)
            assert_memory_equal(out, frame, n);
        free(a);
        free(b);
        free(frame);
    }
}

static void test_refused(void **state)
{
    uint8_t frame[300];
    for (size_t i = 0; i < sizeof(frame); i++)
        frame[i] = (uint8_t)i;
    const size_t len = sizeof(frame) + KVLINK_SEAL_OVERHEAD;
    uint8_t *good = sealed_copy(frame, sizeof(frame), 9, 2), *t = malloc(len), *out;
    size_t out_len;
    // Any flipped byte.
    for (size_t i = 0; i < len; i++) {
        memcpy(t, good, len);
        t[i] ^= 0x01;
        if (kvlink_unseal(g_key, 9, 2, t, len, &out, &out_len) != FY_ERR_CORRUPT)
            fail_msg("byte %zu flipped: opened", i);
    }
    // Cut short (the tag or the body), or too short to be sealed at all.
    memcpy(t, good, len);
    assert_int_equal(kvlink_unseal(g_key, 9, 2, t, len - 1, &out, &out_len), FY_ERR_CORRUPT);
    memcpy(t, good, len);
    assert_int_equal(kvlink_unseal(g_key, 9, 2, t, KVLINK_SEAL_OVERHEAD - 1, &out, &out_len),
                     FY_ERR_CORRUPT);
    // Another request, layer or key.
    memcpy(t, good, len);
    assert_int_equal(kvlink_unseal(g_key, 10, 2, t, len, &out, &out_len), FY_ERR_CORRUPT);
    memcpy(t, good, len);
    assert_int_equal(kvlink_unseal(g_key, 9, 3, t, len, &out, &out_len), FY_ERR_CORRUPT);
    uint8_t other[KVLINK_SEAL_KEY_BYTES];
    memcpy(other, g_key, sizeof(other));
    other[31] ^= 0x80;
    memcpy(t, good, len);
    assert_int_equal(kvlink_unseal(other, 9, 2, t, len, &out, &out_len), FY_ERR_CORRUPT);
    // A frame in the clear.
    memcpy(t, frame, sizeof(frame));
    assert_int_equal(kvlink_unseal(g_key, 9, 2, t, sizeof(frame), &out, &out_len), FY_ERR_CORRUPT);
    // The untouched one still opens.
    assert_int_equal(kvlink_unseal(g_key, 9, 2, good, len, &out, &out_len), FY_OK);
    assert_memory_equal(out, frame, sizeof(frame));
    assert_int_equal(kvlink_seal(NULL, 9, 2, frame, 1, t), FY_ERR_INVALID_ARG);
    free(good);
    free(t);
}

int main(void)
{
    for (int i = 0; i < KVLINK_SEAL_KEY_BYTES; i++)
        g_key[i] = (uint8_t)(i * 13 + 7);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
