/*
 * half_nocuda.c: the CUDA entry points of common.h in a build without CUDA. They report that
 * no device exists, so callers can fall back to the CPU path.
 */
#include "common.h"

int fy_cuda_device_count(void)
{
    return 0;
}

fy_status_t fy_cuda_device_uuid(int device, char *buf, size_t cap)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t fy_cuda_fp16_to_fp32(float *dst, const uint16_t *src, size_t n, void *stream)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t fy_cuda_fp32_to_fp16(uint16_t *dst, const float *src, size_t n, void *stream)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t fy_cuda_bf16_to_fp32(float *dst, const uint16_t *src, size_t n, void *stream)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t fy_cuda_fp32_to_bf16(uint16_t *dst, const float *src, size_t n, void *stream)
{
    return FY_ERR_NO_DEVICE;
}
