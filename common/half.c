/*
 * half.c: IEEE binary16 and bfloat16 conversions.
 *
 * The scalar functions are the exact reference: round to nearest even, subnormals kept,
 * overflow to infinity, NaN stays NaN with the quiet bit set (as the F16C instructions do, so
 * the two paths agree bit for bit on all inputs). The buffer functions use F16C when the CPU
 * has it (checked once at run time, so binaries still run on CPUs without it).
 */
#include "common.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define FY_X86 1
#endif

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

float fy_fp16_to_fp32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        if (mant == 0)
            return bits_f32(sign);
        // Subnormal half: normalize into a float exponent.
        int e = 1;
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            e--;
        }
        mant &= 0x3ffu;
        return bits_f32(sign | ((uint32_t)(e + 112) << 23) | (mant << 13));
    }
    if (exp == 31) {
        if (mant == 0)
            return bits_f32(sign | 0x7f800000u);
        return bits_f32(sign | 0x7fc00000u | (mant << 13)); // quiet NaN, payload kept
    }
    return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t fy_fp32_to_fp16(float f)
{
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) {
        if (x == 0x7f800000u)
            return sign | 0x7c00u;
        return (uint16_t)(sign | 0x7e00u | ((x >> 13) & 0x3ffu)); // quiet NaN
    }
    if (x >= 0x477ff000u) // 65520 and above round to infinity
        return sign | 0x7c00u;
    if (x < 0x38800000u) { // below the smallest normal half (2^-14): subnormal or zero
        uint32_t e = x >> 23;
        uint32_t shift = 126u - e;
        if (shift >= 32u)
            return sign;
        uint32_t mant = (x & 0x7fffffu) | (e != 0 ? 0x800000u : 0u);
        uint32_t q = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = ((x >> 23) - 112u) << 10 | ((x & 0x7fffffu) >> 13);
    uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++; // a carry into the exponent is the correct rounding
    return (uint16_t)(sign | h);
}

float fy_bf16_to_fp32(uint16_t b)
{
    return bits_f32((uint32_t)b << 16);
}

uint16_t fy_fp32_to_bf16(float f)
{
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u); // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

#ifdef FY_X86
__attribute__((target("avx,f16c"))) static void fp16_to_fp32_f16c(float *dst,
                                                                  const uint16_t *src,
                                                                  size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++)
        dst[i] = fy_fp16_to_fp32(src[i]);
}

__attribute__((target("avx,f16c"))) static void fp32_to_fp16_f16c(uint16_t *dst,
                                                                  const float *src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_loadu_ps(src + i);
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++)
        dst[i] = fy_fp32_to_fp16(src[i]);
}
#endif

bool fy_half_has_f16c(void)
{
#ifdef FY_X86
    static int cached = -1;
    if (cached < 0) {
        // F16C from CPUID leaf 1 (ECX bit 29): __builtin_cpu_supports has no "f16c" before
        // clang 16. "avx" also says the OS saves the YMM state the conversions use.
        unsigned a = 0, b = 0, c = 0, d = 0;
        __builtin_cpu_init();
        cached = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0 &&
                 __builtin_cpu_supports("avx");
    }
    return cached != 0;
#else
    return false;
#endif
}

void fy_fp16_to_fp32_buf(float *dst, const uint16_t *src, size_t n)
{
#ifdef FY_X86
    if (fy_half_has_f16c()) {
        fp16_to_fp32_f16c(dst, src, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++)
        dst[i] = fy_fp16_to_fp32(src[i]);
}

void fy_fp32_to_fp16_buf(uint16_t *dst, const float *src, size_t n)
{
#ifdef FY_X86
    if (fy_half_has_f16c()) {
        fp32_to_fp16_f16c(dst, src, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++)
        dst[i] = fy_fp32_to_fp16(src[i]);
}

void fy_bf16_to_fp32_buf(float *dst, const uint16_t *src, size_t n)
{
    // A shift per element; compilers vectorize this loop well on their own.
    for (size_t i = 0; i < n; i++)
        dst[i] = fy_bf16_to_fp32(src[i]);
}

void fy_fp32_to_bf16_buf(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = fy_fp32_to_bf16(src[i]);
}
