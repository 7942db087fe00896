/*
 * gemm.cu: the linear layers on the GPU, y = x · Wᵀ (CUDA twin of gemm.c). FP16 inputs, FP32
 * accumulation and output, so the residual stream and everything after a GEMM stays in FP32 as
 * on the CPU. Also the CUDA / cuBLAS error mapping every .cu uses.
 *
 * Up to GEMV_MAX_ROWS rows of x (decode steps of small batches) go through gemv_kernel: one warp
 * per output column streams that weight row once with 16-byte loads (several in flight per lane)
 * and dots it with every row of x, read through the L1 cache. Reading the weights is all such a
 * step does, and cuBLAS's tile kernels leave much of the bandwidth unused at these shapes.
 * With FERRY_GEMM=mma, 5 to SKINNY_MAX_ROWS rows go through skinny_kernel instead of cuBLAS: the
 * same weight streaming, on the tensor cores (a block per 16 output columns, its warps splitting
 * k). It is opt-in until it has run on a GPU. Larger batches, and shapes or pointers not aligned
 * to 8 halves, go to cuBLAS (tensor cores); FERRY_GEMM=cublas sends everything there.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_int.h"

enum {
    GEMV_MAX_ROWS = 4,    // rows of x the GEMV kernel takes
    GEMV_WARPS = 8,       // output columns per block (one warp each)
    GEMV_UNROLL = 4,      // 16-byte weight loads in flight per lane
    SKINNY_MAX_ROWS = 16, // rows of x the skinny MMA kernel takes (two n-tiles of 8)
    SKINNY_WARPS = 4,     // warps per block, each a quarter of k's 32-half blocks
    SKINNY_UNROLL = 4,    // k blocks whose weights a lane loads before using them
};

/* Which kernel FERRY_GEMM asks for: 0 the default, 1 cublas, 2 mma (read on every call, so that
 * a test can switch it; a getenv is far below a kernel launch). */
static int gemm_env(void)
{
    const char *e = getenv("FERRY_GEMM");
    if (e == NULL)
        return 0;
    return strcmp(e, "cublas") == 0 ? 1 : strcmp(e, "mma") == 0 ? 2 : 0;
}

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

/* y[r][col] = x[r] · w[col] (+ y), r < M (= m); strides and k in 16-byte chunks of 8 halves. */
template <int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(int m, int n, int k8, const uint4 *__restrict__ x, int ldx8,
                const uint4 *__restrict__ w, int ldw8, float *__restrict__ y, int ldy,
                int accumulate)
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

typedef enum { GEMM_CUBLAS, GEMM_GEMV, GEMM_MMA } gemm_kernel_t;

/* The kernel this call runs (see the file comment). */
static gemm_kernel_t gemm_choose(int m, int k, const uint16_t *x, int ldx, const uint16_t *w,
                                 int ldw)
{
    const int env = gemm_env();
    const bool aligned =
        k % 8 == 0 && ldx % 8 == 0 && ldw % 8 == 0 && (((uintptr_t)x | (uintptr_t)w) & 15) == 0;
    if (env == 1 || !aligned)
        return GEMM_CUBLAS;
    if (m <= GEMV_MAX_ROWS)
        return GEMM_GEMV;
    return env == 2 && m <= SKINNY_MAX_ROWS ? GEMM_MMA : GEMM_CUBLAS;
}

/* y[r][n0 + i] for the block's 16 output columns n0 = 16 blockIdx.x and every row r < m of x
 * (NT n-tiles of 8 rows): A = the 16 weight rows (row major), B = x transposed, one m16n8k16 MMA
 * per 16 halves of k. Lane (g, t) loads 16 bytes, halves [8t, 8t + 8) of a 32-half block of k,
 * of weight rows g and g + 8 and of x row g of each n-tile; a dot product does not depend on the
 * order of k, so the fragments take k in that permuted order, the same in A and B: step 0 of
 * the block uses words 0 (fragment columns 2t, 2t + 1) and 1 (2t + 8, 2t + 9), step 1 words 2
 * and 3. Warp w takes the blocks w, w + SKINNY_WARPS, ...; the warps' sums meet in shared
 * memory and are added in warp order. */
template <int NT>
__global__ void __launch_bounds__(SKINNY_WARPS * 32)
    skinny_kernel(int m, int n, int k8, const uint4 *__restrict__ x, int ldx8,
                  const uint4 *__restrict__ w, int ldw8, float *__restrict__ y, int ldy,
                  int accumulate)
{
    __shared__ float red[SKINNY_WARPS][NT][4][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 16;
    const bool w0_ok = n0 + g < n, w1_ok = n0 + g + 8 < n;
    const uint4 *w0 = w + (size_t)(w0_ok ? n0 + g : 0) * ldw8;
    const uint4 *w1 = w + (size_t)(w1_ok ? n0 + g + 8 : 0) * ldw8;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float c[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            c[j][e] = 0.0f;
    const int kb_n = (k8 + 3) / 4; // 32-half blocks of k
    for (int kb0 = warp; kb0 < kb_n; kb0 += SKINNY_WARPS * SKINNY_UNROLL) {
        uint4 a0[SKINNY_UNROLL], a1[SKINNY_UNROLL];
#pragma unroll
        for (int u = 0; u < SKINNY_UNROLL; u++) { // weights are read once: stream them past L1
            const int ch = (kb0 + u * SKINNY_WARPS) * 4 + t;
            a0[u] = w0_ok && ch < k8 ? __ldcs(w0 + ch) : zero;
            a1[u] = w1_ok && ch < k8 ? __ldcs(w1 + ch) : zero;
        }
#pragma unroll
        for (int u = 0; u < SKINNY_UNROLL; u++) {
            const int ch = (kb0 + u * SKINNY_WARPS) * 4 + t;
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int r = 8 * j + g;
                const uint4 b = r < m && ch < k8 ? __ldg(x + (size_t)r * ldx8 + ch) : zero;
                krn_mma16816(c[j], a0[u].x, a1[u].x, a0[u].y, a1[u].y, b.x, b.y);
                krn_mma16816(c[j], a0[u].z, a1[u].z, a0[u].w, a1[u].w, b.z, b.w);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            red[warp][j][e][lane] = c[j][e];
    __syncthreads();
    if (warp != 0)
        return;
        // c[j][0], c[j][1]: output column n0 + g, rows 8j + 2t, 8j + 2t + 1; c[j][2], c[j][3]: the
        // same rows of column n0 + g + 8.
#pragma unroll
    for (int j = 0; j < NT; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float v = red[0][j][e][lane];
#pragma unroll
            for (int ww = 1; ww < SKINNY_WARPS; ww++)
                v += red[ww][j][e][lane];
            const int r = 8 * j + 2 * t + (e & 1), col = n0 + g + (e >= 2 ? 8 : 0);
            if (r < m && col < n) {
                float *yp = y + (size_t)r * ldy + col;
                *yp = accumulate ? *yp + v : v;
            }
        }
    }
}

extern "C" const char *krn_gemm_cuda_kernel(int m, int k, const uint16_t *x, int ldx,
                                            const uint16_t *w, int ldw)
{
    static const char *const names[] = {"cublas", "gemv", "mma"};
    return names[gemm_choose(m, k, x, ldx, w, ldw)];
}

typedef void (*gemm_fn_t)(int, int, int, const uint4 *, int, const uint4 *, int, float *, int, int);

/* The GEMV for m <= GEMV_MAX_ROWS rows (gemv_kernel<m>) or the skinny MMA kernel (skinny_kernel
 * with the n-tiles m needs), launched over the columns. */
static fy_status_t weight_stream_launch(gemm_kernel_t kind, int m, int n, int k, const uint16_t *x,
                                        int ldx, const uint16_t *w, int ldw, float *y, int ldy,
                                        int accumulate, cudaStream_t stream)
{
    static const gemm_fn_t gemv[GEMV_MAX_ROWS] = {gemv_kernel<1>, gemv_kernel<2>, gemv_kernel<3>,
                                                  gemv_kernel<4>};
    const bool mma = kind == GEMM_MMA;
    const gemm_fn_t fn = mma ? (m <= 8 ? skinny_kernel<1> : skinny_kernel<2>) : gemv[m - 1];
    const int cols = mma ? 16 : GEMV_WARPS, threads = (mma ? SKINNY_WARPS : GEMV_WARPS) * 32;
    fn<<<(unsigned)((n + cols - 1) / cols), threads, 0, stream>>>(
        m, n, k / 8, reinterpret_cast<const uint4 *>(x), ldx / 8,
        reinterpret_cast<const uint4 *>(w), ldw / 8, y, ldy, accumulate);
    return krn_launch_status();
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
    const gemm_kernel_t kind = gemm_choose(m, k, x, ldx, w, ldw);
    if (kind != GEMM_CUBLAS)
        return weight_stream_launch(kind, m, n, k, x, ldx, w, ldw, y, ldy, accumulate, stream);
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
