/*
 * cuda_int.h: what the kernels' .cu files share: FP16 loads and stores with the CPU's
 * rounding (round to nearest even, the same as fy_fp32_to_fp16 for every finite value), grid
 * sizing and the launch check.
 */
#ifndef FERRY_KERNELS_CUDA_INT_H
#define FERRY_KERNELS_CUDA_INT_H

#include <cuda_fp16.h>

#include "kernels_cuda.h"

static __device__ __forceinline__ float krn_h2f(uint16_t h)
{
    return __half2float(__ushort_as_half(h));
}

static __device__ __forceinline__ uint16_t krn_f2h(float f)
{
    return __half_as_ushort(__float2half_rn(f));
}

/* Blocks for a grid-stride loop over n elements (at most 65535 x-blocks keeps any grid valid
 * whatever n is; the loop covers the rest). */
static inline unsigned krn_grid_1d(size_t n, unsigned block)
{
    size_t blocks = (n + block - 1) / block;
    if (blocks == 0)
        blocks = 1;
    return (unsigned)(blocks > 65535 ? 65535 : blocks);
}

/* c += a · b on the tensor cores: one m16n8k16 MMA, FP16 operands, FP32 accumulation (a: row
 * major 16 x 16, b: column major 16 x 8, the PTX fragment layouts). */
static __device__ __forceinline__ void krn_mma16816(float (&c)[4], uint32_t a0, uint32_t a1,
                                                    uint32_t a2, uint32_t a3, uint32_t b0,
                                                    uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Status of the launch just made. */
static inline fy_status_t krn_launch_status(void)
{
    return krn_cuda_status(cudaGetLastError());
}

#endif /* FERRY_KERNELS_CUDA_INT_H */
