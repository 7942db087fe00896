/*
 * half.cu: CUDA twins of the buffer conversions in half.c. The device code reimplements the
 * same bit-exact rounding (rather than calling __float2half, whose NaN handling differs) so
 * the GPU and CPU agree on every input; tests/common/test_half_cuda.c checks all 65,536 fp16
 * values and a sweep of fp32 values against the CPU reference.
 */
#include "common.h"

#include <cuda_runtime.h>

static __device__ __forceinline__ float dev_fp16_to_fp32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {
            int lz = __clz(mant) - 21; // shifts until bit 10 is set
            mant = (mant << lz) & 0x3ffu;
            bits = sign | ((uint32_t)(113 - lz) << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = mant == 0 ? (sign | 0x7f800000u) : (sign | 0x7fc00000u | (mant << 13));
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    return __uint_as_float(bits);
}

static __device__ __forceinline__ uint16_t dev_fp32_to_fp16(float f)
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

static __device__ __forceinline__ uint16_t dev_fp32_to_bf16(float f)
{
    uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

__global__ void fp16_to_fp32_kernel(float *dst, const uint16_t *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = dev_fp16_to_fp32(src[i]);
}

__global__ void fp32_to_fp16_kernel(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = dev_fp32_to_fp16(src[i]);
}

__global__ void bf16_to_fp32_kernel(float *dst, const uint16_t *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

__global__ void fp32_to_bf16_kernel(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = dev_fp32_to_bf16(src[i]);
}

static unsigned grid_for(size_t n)
{
    size_t blocks = (n + 255) / 256;
    return (unsigned)(blocks > 65535 ? 65535 : (blocks == 0 ? 1 : blocks));
}

static fy_status_t launch_status(void)
{
    return cudaGetLastError() == cudaSuccess ? FY_OK : FY_ERR_CUDA;
}

extern "C" int fy_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); // clear the sticky "no device" error
        return 0;
    }
    return n;
}

extern "C" fy_status_t fy_cuda_fp16_to_fp32(float *dst, const uint16_t *src, size_t n, void *stream)
{
    if (n == 0)
        return FY_OK;
    fp16_to_fp32_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(dst, src, n);
    return launch_status();
}

extern "C" fy_status_t fy_cuda_fp32_to_fp16(uint16_t *dst, const float *src, size_t n, void *stream)
{
    if (n == 0)
        return FY_OK;
    fp32_to_fp16_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(dst, src, n);
    return launch_status();
}

extern "C" fy_status_t fy_cuda_bf16_to_fp32(float *dst, const uint16_t *src, size_t n, void *stream)
{
    if (n == 0)
        return FY_OK;
    bf16_to_fp32_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(dst, src, n);
    return launch_status();
}

extern "C" fy_status_t fy_cuda_fp32_to_bf16(uint16_t *dst, const float *src, size_t n, void *stream)
{
    if (n == 0)
        return FY_OK;
    fp32_to_bf16_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(dst, src, n);
    return launch_status();
}
