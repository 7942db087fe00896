/*
 * rmsnorm.cu: RMSNorm on the GPU (CUDA twin of rmsnorm.c). One block per row; the sum of
 * squares is accumulated in double like the reference, so the two agree to float rounding.
 * The FP16-output form feeds the next GEMM directly.
 */
#include "cuda_int.h"

enum {
    RMS_BLOCK = 256,      // threads per row when there are many rows
    RMS_BLOCK_FEW = 1024, // ... and when there are few (a decode step): shorter load chains
    RMS_FEW_ROWS = 64,
    RMS_REG = 8, // elements of x and w a thread holds in registers (dim <= RMS_REG x threads)
};

template <typename T> static __device__ __forceinline__ T rms_store(float v);
template <> __device__ __forceinline__ float rms_store<float>(float v)
{
    return v;
}
template <> __device__ __forceinline__ uint16_t rms_store<uint16_t>(float v)
{
    return krn_f2h(v);
}

template <typename T>
__global__ void __launch_bounds__(RMS_BLOCK_FEW)
    rmsnorm_kernel(T *out, int ldo, const float *x, int ldx, const float *w, int n_rows, int dim,
                   float eps)
{
    __shared__ double partial[RMS_BLOCK_FEW / 32];
    __shared__ float inv_s;
    // A row that fits the registers is loaded once, x and w together, every load issued before
    // the first use (folded through zero, a 0 the compiler cannot know): one memory latency a
    // row instead of one per few elements of each loop. The same sums and products.
    const bool in_regs = dim <= RMS_REG * (int)blockDim.x;
    const uint32_t zero = (uint32_t)dim >> 31;
    for (int r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const float *xr = x + (size_t)r * ldx;
        double ss = 0.0;
        float xv[RMS_REG], wv[RMS_REG];
        if (in_regs) {
            uint32_t fold = 0;
#pragma unroll
            for (int u = 0; u < RMS_REG; u++) {
                const int i = threadIdx.x + u * (int)blockDim.x;
                xv[u] = i < dim ? xr[i] : 0.0f;
                wv[u] = i < dim ? w[i] : 0.0f;
                fold ^= __float_as_uint(xv[u]) ^ __float_as_uint(wv[u]);
            }
            xv[0] = __uint_as_float(__float_as_uint(xv[0]) ^ (fold & zero));
#pragma unroll
            for (int u = 0; u < RMS_REG; u++)
                if (threadIdx.x + u * (int)blockDim.x < dim)
                    ss += (double)xv[u] * xv[u];
        } else {
#pragma unroll 4
            for (int i = threadIdx.x; i < dim; i += blockDim.x)
                ss += (double)xr[i] * xr[i];
        }
        for (int off = 16; off > 0; off >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, off);
        if ((threadIdx.x & 31) == 0)
            partial[threadIdx.x >> 5] = ss;
        __syncthreads();
        if (threadIdx.x == 0) {
            double tot = 0.0;
            for (int i = 0; i < (int)(blockDim.x >> 5); i++)
                tot += partial[i];
            inv_s = (float)(1.0 / sqrt(tot / dim + eps));
        }
        __syncthreads();
        float inv = inv_s;
        T *orow = out + (size_t)r * ldo;
        if (in_regs) {
#pragma unroll
            for (int u = 0; u < RMS_REG; u++) {
                const int i = threadIdx.x + u * (int)blockDim.x;
                if (i < dim)
                    orow[i] = rms_store<T>(xv[u] * inv * wv[u]);
            }
        } else {
#pragma unroll 4
            for (int i = threadIdx.x; i < dim; i += blockDim.x)
                orow[i] = rms_store<T>(xr[i] * inv * w[i]);
        }
        __syncthreads(); // partial and inv_s are reused by the next row
    }
}

template <typename T>
static fy_status_t rmsnorm_launch(T *out, int ldo, const float *x, int ldx, const float *w,
                                  int n_rows, int dim, float eps, cudaStream_t stream)
{
    if (n_rows < 0 || dim <= 0 || ldo < dim || ldx < dim || !(eps >= 0.0f))
        return FY_ERR_INVALID_ARG;
    if (n_rows == 0)
        return FY_OK;
    unsigned grid = n_rows > 65535 ? 65535u : (unsigned)n_rows;
    const unsigned block = n_rows <= RMS_FEW_ROWS ? RMS_BLOCK_FEW : RMS_BLOCK;
    rmsnorm_kernel<T><<<grid, block, 0, stream>>>(out, ldo, x, ldx, w, n_rows, dim, eps);
    return krn_launch_status();
}

extern "C" fy_status_t krn_rmsnorm_f32_cuda(float *out, int ldo, const float *x, int ldx,
                                            const float *w, int n_rows, int dim, float eps,
                                            cudaStream_t stream)
{
    return rmsnorm_launch<float>(out, ldo, x, ldx, w, n_rows, dim, eps, stream);
}

extern "C" fy_status_t krn_rmsnorm_f16_cuda(uint16_t *out, int ldo, const float *x, int ldx,
                                            const float *w, int n_rows, int dim, float eps,
                                            cudaStream_t stream)
{
    return rmsnorm_launch<uint16_t>(out, ldo, x, ldx, w, n_rows, dim, eps, stream);
}
