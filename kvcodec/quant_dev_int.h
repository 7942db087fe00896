/* quant.c's scalar quantization on the GPU: FP16 rounding up and down, the asymmetric
 * parameters of a range, rounding and clamping a code, kvc_v8_sum's tree. Device code that
 * kvcodec_cuda_int.h includes for every kernel, and tests/kvcodec/test_quant_emu.cc on host
 * threads (with quant_rows_dev_int.h) against quant.c.
 *
 * Not a standalone header. The includer provides kadd, ksub, kmul, kdiv (float arithmetic
 * rounded once), fy_dev_h2f and fy_dev_f2h (common/half_cuda.h's conversions); and outside
 * CUDA __device__ and __forceinline__. */
#ifndef FERRY_KVCODEC_QUANT_DEV_INT_H
#define FERRY_KVCODEC_QUANT_DEV_INT_H

/* quant.c's directed FP16 rounding (fp16_floor_buf / fp16_ceil_buf, element by element). */
static __device__ __forceinline__ uint16_t kvc_dev_h_clamp_finite(uint16_t h)
{
    if ((h & 0x7fff) >= 0x7c00)
        return (h & 0x8000) ? 0xfbff : 0x7bff;
    return h;
}
static __device__ __forceinline__ uint16_t kvc_dev_h_step_down(uint16_t h)
{
    if (h == 0x0000)
        return 0x8001;
    return (h & 0x8000) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}
static __device__ __forceinline__ uint16_t kvc_dev_h_step_up(uint16_t h)
{
    if (h == 0x8000)
        return 0x0001;
    return (h & 0x8000) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}
/* Largest FP16 <= x (finite). */
static __device__ __forceinline__ uint16_t kvc_dev_h_floor(float x)
{
    uint16_t h = kvc_dev_h_clamp_finite(fy_dev_f2h(x));
    if (fy_dev_h2f(h) > x && h != 0xfbff)
        h = kvc_dev_h_step_down(h);
    return h;
}
/* Smallest FP16 >= x (finite, clamped to 65504). */
static __device__ __forceinline__ uint16_t kvc_dev_h_ceil(float x)
{
    uint16_t h = kvc_dev_h_clamp_finite(fy_dev_f2h(x));
    if (fy_dev_h2f(h) < x && h != 0x7bff)
        h = kvc_dev_h_step_up(h);
    return h;
}

/* Asymmetric parameters of one range at qmax levels (quant.c's asym_params_buf for one
 * element): FP16 bits of scale and zero, their fp32 values and 1/scale. */
static __device__ __forceinline__ void kvc_dev_asym(float mn, float mx, float qmax, uint16_t *s16,
                                                    uint16_t *z16, float *s, float *z, float *inv)
{
    *z16 = kvc_dev_h_floor(mn);
    *z = fy_dev_h2f(*z16);
    float v = kdiv(ksub(mx, *z), qmax);
    v = v > 0 ? v : 0;
    *s16 = kvc_dev_h_ceil(v);
    *s = fy_dev_h2f(*s16);
    *inv = *s > 0 ? kdiv(1.0f, *s) : 0.0f;
}

/* quant.c's round_clamp: clamped to [0, qmax] (NaN to 0), then rounded half to even by the
 * 1.5 * 2^23 trick, which needs no clamp after it (rounding is monotone and 0 and qmax are
 * integers). */
static __device__ __forceinline__ float kvc_dev_clamp_q(float x, float qmax)
{
    x = x > 0 ? x : 0; // NaN and -0 land here as +0
    return x < qmax ? x : qmax;
}

static __device__ __forceinline__ float kvc_dev_round_clamp(float x, float qmax)
{
    return ksub(kadd(kvc_dev_clamp_q(x, qmax), 12582912.0f), 12582912.0f);
}

/* kvc_quant_one's code: kvc_dev_round_clamp's integer, read from the bits of x + 1.5 * 2^23
 * (that float's mantissa is 2^22 plus the integer) instead of subtracting and converting: a
 * float-to-integer conversion runs at a quarter of the rate of an add. */
static __device__ __forceinline__ uint32_t kvc_dev_quant_one(float x, float z, float inv,
                                                             float qmax)
{
    const float r = kadd(kvc_dev_clamp_q(kmul(ksub(x, z), inv), qmax), 12582912.0f);
    return __float_as_uint(r) - 0x4b400000u;
}

/* kvc_v8_sum's tree over eight partial sums. */
static __device__ __forceinline__ float kvc_dev_sum8(const float a[8])
{
    return kadd(kadd(kadd(a[0], a[1]), kadd(a[2], a[3])), kadd(kadd(a[4], a[5]), kadd(a[6], a[7])));
}

#endif
