/*
 * gemm.cu: the linear layers on the GPU, y = x · Wᵀ (CUDA twin of gemm.c). FP16 inputs, FP32
 * accumulation and output, so the residual stream and everything after a GEMM stays in FP32 as
 * on the CPU. Also the CUDA / cuBLAS error mapping every .cu uses.
 *
 * Up to GEMV_MAX_ROWS rows of x (decode steps of small batches) go through gemv_kernel: one warp
 * per output column streams that weight row once with 16-byte loads (several in flight per lane)
 * and dots it with every row of x, read through the L1 cache. Reading the weights is all such a
 * step does, and cuBLAS's tile kernels leave much of the bandwidth unused at these shapes. Larger
 * batches, and shapes or pointers not aligned to 8 halves, go to cuBLAS (tensor cores);
 * FERRY_GEMM=cublas sends everything there.
 */
#include <cuda_fp16.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_cuda.h"

enum {
    GEMV_MAX_ROWS = 4, // rows of x the GEMV kernel takes
    GEMV_WARPS = 8,    // output columns per block (one warp each)
    GEMV_UNROLL = 4,   // 16-byte weight loads in flight per lane
};

/* x (8 halves) · w (8 halves) in FP32. */
__device__ __forceinline__ float dot8(uint4 xv, const float2 wf[4])
{
    const __half2 *xh = reinterpret_cast<const __half2 *>(&xv);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 xf = __half22float2(xh[i]);
        s = fmaf(xf.x, wf[i].x, s);
        s = fmaf(xf.y, wf[i].y, s);
    }
    return s;
}

/* y[r][col] = x[r] · w[col] (+ y), r < M; strides and k in 16-byte chunks of 8 halves. */
template <int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(int n, int k8, const uint4 *__restrict__ x, int ldx8, const uint4 *__restrict__ w,
                int ldw8, float *__restrict__ y, int ldy, int accumulate)
{
    const int lane = threadIdx.x % 32;
    const int col = blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
    if (col >= n)
        return;
    const uint4 *wr = w + (size_t)col * ldw8;
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++)
        acc[r] = 0.0f;
    for (int c0 = lane; c0 < k8; c0 += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) // weights are read once: stream them past L1
            wv[u] = c0 + 32 * u < k8 ? __ldcs(wr + c0 + 32 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c >= k8)
                break;
            float2 wf[4];
            const __half2 *wh = reinterpret_cast<const __half2 *>(&wv[u]);
#pragma unroll
            for (int i = 0; i < 4; i++)
                wf[i] = __half22float2(wh[i]);
#pragma unroll
            for (int r = 0; r < M; r++)
                acc[r] += dot8(__ldg(x + (size_t)r * ldx8 + c), wf);
        }
    }
#pragma unroll
    for (int r = 0; r < M; r++) {
        float v = acc[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == r) {
            float *yp = y + (size_t)r * ldy + col;
            *yp = accumulate ? *yp + v : v;
        }
    }
}

/* Whether the GEMV kernel takes this call (see the file comment). */
static bool gemv_applies(int m, int k, const uint16_t *x, int ldx, const uint16_t *w, int ldw)
{
    static int forced = -1; // FERRY_GEMM=cublas, read once
    if (forced < 0) {
        const char *e = getenv("FERRY_GEMM");
        forced = e != NULL && strcmp(e, "cublas") == 0;
    }
    return !forced && m <= GEMV_MAX_ROWS && k % 8 == 0 && ldx % 8 == 0 && ldw % 8 == 0 &&
           (((uintptr_t)x | (uintptr_t)w) & 15) == 0;
}

extern "C" const char *krn_gemm_cuda_kernel(int m, int k, const uint16_t *x, int ldx,
                                            const uint16_t *w, int ldw)
{
    return gemv_applies(m, k, x, ldx, w, ldw) ? "gemv" : "cublas";
}

static fy_status_t gemv_launch(int m, int n, int k, const uint16_t *x, int ldx, const uint16_t *w,
                               int ldw, float *y, int ldy, int accumulate, cudaStream_t stream)
{
    const dim3 grid((unsigned)((n + GEMV_WARPS - 1) / GEMV_WARPS));
    const uint4 *x4 = reinterpret_cast<const uint4 *>(x), *w4 = reinterpret_cast<const uint4 *>(w);
    switch (m) {
    case 1:
        gemv_kernel<1><<<grid, GEMV_WARPS * 32, 0, stream>>>(n, k / 8, x4, ldx / 8, w4, ldw / 8, y,
                                                             ldy, accumulate);
        break;
    case 2:
        gemv_kernel<2><<<grid, GEMV_WARPS * 32, 0, stream>>>(n, k / 8, x4, ldx / 8, w4, ldw / 8, y,
                                                             ldy, accumulate);
        break;
    case 3:
        gemv_kernel<3><<<grid, GEMV_WARPS * 32, 0, stream>>>(n, k / 8, x4, ldx / 8, w4, ldw / 8, y,
                                                             ldy, accumulate);
        break;
    default:
        gemv_kernel<4><<<grid, GEMV_WARPS * 32, 0, stream>>>(n, k / 8, x4, ldx / 8, w4, ldw / 8, y,
                                                             ldy, accumulate);
        break;
    }
    return krn_cuda_status(cudaGetLastError());
}

extern "C" fy_status_t krn_cuda_status(cudaError_t err)
{
    if (err == cudaSuccess)
        return FY_OK;
    if (err == cudaErrorMemoryAllocation)
        return FY_ERR_RESOURCE_EXHAUSTED;
    return FY_ERR_CUDA;
}

extern "C" fy_status_t krn_cublas_status(cublasStatus_t err)
{
    if (err == CUBLAS_STATUS_SUCCESS)
        return FY_OK;
    if (err == CUBLAS_STATUS_ALLOC_FAILED)
        return FY_ERR_RESOURCE_EXHAUSTED;
    return FY_ERR_CUDA;
}

extern "C" fy_status_t krn_gemm_f16_cuda(cublasHandle_t handle, int m, int n, int k,
                                         const uint16_t *x, int ldx, const uint16_t *w, int ldw,
                                         float *y, int ldy, int accumulate, cudaStream_t stream)
{
    if (m < 0 || n < 0 || k <= 0 || ldx < k || ldw < k || ldy < n || handle == NULL)
        return FY_ERR_INVALID_ARG;
    if (m == 0 || n == 0)
        return FY_OK;
    if (gemv_applies(m, k, x, ldx, w, ldw))
        return gemv_launch(m, n, k, x, ldx, w, ldw, y, ldy, accumulate, stream);
    fy_status_t st = krn_cublas_status(cublasSetStream(handle, stream));
    if (st != FY_OK)
        return st;
    // cuBLAS is column-major: the row-major y [m][n] is the column-major yᵀ [n][m], and
    // yᵀ = W · xᵀ where the row-major W [n][k] is read as the transpose of a column-major
    // [k][n] matrix and the row-major x [m][k] is the column-major xᵀ [k][m].
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    return krn_cublas_status(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w,
                                          CUDA_R_16F, ldw, x, CUDA_R_16F, ldx, &beta, y,
                                          CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
}
