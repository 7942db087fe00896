/*
 * half_cuda.h: the device side of common/half.c's FP16 conversions, bit for bit (NaN payloads
 * included), rather than __float2half, whose NaN handling differs. Shared by common/half.cu and
 * the kvcodec kernels, whose frames must equal the CPU's byte for byte.
 */
#ifndef FERRY_HALF_CUDA_H
#define FERRY_HALF_CUDA_H

#include <stdint.h>

/* The hardware conversion is exact for every half but a NaN (subnormals become normal floats,
 * nothing is flushed); a NaN takes the host's quieted payload, so one select covers what was a
 * chain of branches per element. */
static __device__ __forceinline__ float fy_dev_h2f(uint16_t h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    const uint32_t nan =
        ((uint32_t)(h & 0x8000u) << 16) | 0x7fc00000u | ((uint32_t)(h & 0x3ffu) << 13);
    return (h & 0x7fffu) > 0x7c00u ? __uint_as_float(nan) : f;
}

/* A half as fp32 by the conversion instruction alone (one instruction; fy_dev_h2f takes about
 * eight): a NaN comes out as the canonical NaN, not with the host's payload. For values that
 * only go into arithmetic, whose NaN results are canonical on the device anyway; never for one
 * stored as it is. */
static __device__ __forceinline__ float fy_dev_h2f_arith(uint16_t h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

static __device__ __forceinline__ uint16_t fy_dev_f2h(float f)
{
    uint32_t x = __float_as_uint(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u)
        return x == 0x7f800000u ? (uint16_t)(sign | 0x7c00u)
                                : (uint16_t)(sign | 0x7e00u | ((x >> 13) & 0x3ffu));
    if (x >= 0x477ff000u)
        return sign | 0x7c00u;
    if (x < 0x38800000u) {
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
    uint32_t h = (((x >> 23) - 112u) << 10) | ((x & 0x7fffffu) >> 13);
    uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

#endif /* FERRY_HALF_CUDA_H */
