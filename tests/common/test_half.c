// fp16 / bf16: every one of the 65,536 fp16 values round-trips; fp32 -> fp16 rounds to nearest
// even (checked against a long-double reference); the F16C buffer path equals the scalar one.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static bool fp16_is_nan(uint16_t h)
{
    return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
}

static void test_fp16_all_roundtrip(void **state)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = fy_fp16_to_fp32((uint16_t)h);
        uint16_t back = fy_fp32_to_fp16(f);
        if (fp16_is_nan((uint16_t)h)) {
            assert_true(isnan(f));
            assert_true(fp16_is_nan(back));
            assert_int_equal(back, h | 0x200u); // quieted, payload kept
        } else {
            assert_int_equal(back, h);
        }
    }
}

static void test_fp16_known_values(void **state)
{
    assert_true(fy_fp16_to_fp32(0x3c00) == 1.0f);
    assert_true(fy_fp16_to_fp32(0xc000) == -2.0f);
    assert_true(fy_fp16_to_fp32(0x7bff) == 65504.0f);
    assert_true(fy_fp16_to_fp32(0x0001) == ldexpf(1.0f, -24));
    assert_true(fy_fp16_to_fp32(0x0400) == ldexpf(1.0f, -14));
    assert_true(isinf(fy_fp16_to_fp32(0x7c00)));
    assert_int_equal(fy_fp32_to_fp16(65519.0f), 0x7bff);
    assert_int_equal(fy_fp32_to_fp16(65520.0f), 0x7c00); // halfway rounds to even = inf
    assert_int_equal(fy_fp32_to_fp16(1e10f), 0x7c00);
    assert_int_equal(fy_fp32_to_fp16(-1e10f), 0xfc00);
    assert_int_equal(fy_fp32_to_fp16(ldexpf(1.0f, -25)), 0x0000); // tie to even zero
    assert_int_equal(fy_fp32_to_fp16(ldexpf(1.5f, -25)), 0x0001);
    assert_int_equal(fy_fp32_to_fp16(ldexpf(3.0f, -25)), 0x0002); // 1.5 ulp ties to even 2
    assert_int_equal(fy_fp32_to_fp16(-0.0f), 0x8000);
    assert_int_equal(fy_fp32_to_fp16(1.0f + ldexpf(1.0f, -11)), 0x3c00); // tie to even
    assert_int_equal(fy_fp32_to_fp16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02);
}

// Reference rounding: pick the nearer of the two neighbouring halves in long double.
static uint16_t ref_round(float f)
{
    if (isnan(f))
        return 0x7e00;
    uint16_t sign = signbit(f) ? 0x8000 : 0;
    long double a = fabsl((long double)f);
    if (a >= 65520.0L)
        return sign | 0x7c00;
    // Binary search over the monotonic non-negative halves 0x0000..0x7bff.
    uint16_t lo = 0, hi = 0x7bff;
    while (lo < hi) {
        uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
        if ((long double)fy_fp16_to_fp32(mid) <= a)
            lo = mid;
        else
            hi = mid - 1;
    }
    long double below = fy_fp16_to_fp32(lo);
    if (below == a || lo == 0x7bff)
        return sign | lo;
    long double above = fy_fp16_to_fp32((uint16_t)(lo + 1));
    long double dl = a - below, du = above - a;
    if (dl < du || (dl == du && (lo & 1) == 0))
        return sign | lo;
    return sign | (uint16_t)(lo + 1);
}

static void test_fp32_to_fp16_rounding(void **state)
{
    uint64_t rng = 12345;
    for (int i = 0; i < 200000; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Exponents concentrated in and around the fp16 range.
        uint32_t bits = (uint32_t)rng & 0x807fffffu;
        uint32_t exp = 95 + (uint32_t)((rng >> 32) % 60);
        float f = bits_f32(bits | (exp << 23));
        assert_int_equal(fy_fp32_to_fp16(f), ref_round(f));
    }
}

static void test_buffers_match_scalar(void **state)
{
    uint16_t *h = malloc(65536 * sizeof(uint16_t));
    float *f = malloc(65536 * sizeof(float));
    uint16_t *h2 = malloc(65536 * sizeof(uint16_t));
    for (uint32_t i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    fy_fp16_to_fp32_buf(f, h, 65536);
    for (uint32_t i = 0; i < 65536; i++)
        assert_int_equal(f32_bits(f[i]), f32_bits(fy_fp16_to_fp32((uint16_t)i)));

    // fp32 -> fp16 over random bit patterns (all exponents), odd length for the tail path.
    uint64_t rng = 99;
    for (int i = 0; i < 65536; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        f[i] = bits_f32((uint32_t)(rng >> 32));
    }
    fy_fp32_to_fp16_buf(h2, f, 65533);
    for (int i = 0; i < 65533; i++)
        assert_int_equal(h2[i], fy_fp32_to_fp16(f[i]));

    fy_fp32_to_bf16_buf(h2, f, 65536);
    for (int i = 0; i < 65536; i++)
        assert_int_equal(h2[i], fy_fp32_to_bf16(f[i]));
    free(h);
    free(f);
    free(h2);
}

static void test_bf16(void **state)
{
    for (uint32_t b = 0; b < 65536; b++) {
        float f = fy_bf16_to_fp32((uint16_t)b);
        uint16_t back = fy_fp32_to_bf16(f);
        if (isnan(f))
            assert_int_equal(back, b | 0x40u);
        else
            assert_int_equal(back, b);
    }
    assert_int_equal(fy_fp32_to_bf16(1.0f), 0x3f80);
    // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
    assert_int_equal(fy_fp32_to_bf16(1.0f + ldexpf(1.0f, -8)), 0x3f80);
    assert_int_equal(fy_fp32_to_bf16(1.0f + 3 * ldexpf(1.0f, -8)), 0x3f82);
    assert_int_equal(fy_fp32_to_bf16(3.4e38f), 0x7f80); // rounds up to infinity
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_all_roundtrip),  cmocka_unit_test(test_fp16_known_values),
        cmocka_unit_test(test_fp32_to_fp16_rounding), cmocka_unit_test(test_buffers_match_scalar),
        cmocka_unit_test(test_bf16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
