/*
 * half.cu: CUDA twins of the buffer conversions in half.c. The device code reimplements the
 * same bit-exact rounding (rather than calling __float2half, whose NaN handling differs) so
 * the GPU and CPU agree on every input; tests/common/test_half_cuda.c checks all 65,536 fp16
 * values and a sweep of fp32 values against the CPU reference.
 */
#include "common.h"
#include "half_cuda.h"

#include <cuda_runtime.h>

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
        dst[i] = fy_dev_h2f(src[i]);
}

__global__ void fp32_to_fp16_kernel(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = fy_dev_f2h(src[i]);
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

extern "C" fy_status_t fy_cuda_device_uuid(int device, char *buf, size_t cap)
{
    if (buf == NULL || cap < 33)
        return FY_ERR_INVALID_ARG;
    cudaDeviceProp prop;
    if (device < 0 || device >= fy_cuda_device_count() ||
        cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
        cudaGetLastError();
        return FY_ERR_NO_DEVICE;
    }
    for (int i = 0; i < 16; i++)
        snprintf(buf + 2 * i, 3, "%02x", (unsigned char)prop.uuid.bytes[i]);
    return FY_OK;
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
