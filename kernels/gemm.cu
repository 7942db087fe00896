/*
 * gemm.cu: the linear layers on the GPU, y = x · Wᵀ through cuBLAS (CUDA twin of gemm.c).
 * FP16 inputs, FP32 accumulation and output, so the residual stream and everything after a
 * GEMM stays in FP32 as on the CPU. Also the CUDA / cuBLAS error mapping every .cu uses.
 */
#include "kernels_cuda.h"

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
