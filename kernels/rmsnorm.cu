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
    for (int r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const float *xr = x + (size_t)r * ldx;
        double ss = 0.0;
#pragma unroll 4
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            ss += (double)xr[i] * xr[i];
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
#pragma unroll 4
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            orow[i] = rms_store<T>(xr[i] * inv * w[i]);
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
