/*
 * llama_cuda_int.h: the model-specific CUDA kernels of the GPU forward pass
 * (llama_cuda_ops.cu), used by llama_cuda.c. Device pointers throughout; each enqueues on
 * stream and reports launch errors.
 */
#ifndef FERRY_MODEL_LLAMA_CUDA_INT_H
#define FERRY_MODEL_LLAMA_CUDA_INT_H

#include <cuda_runtime.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* dst [n] FP16 from a GGUF tensor's bytes src [src_bytes] of type (F32, F16, BF16, Q8_0, Q4_0,
 * Q4_1; blocks in file order). FY_ERR_FORMAT when src_bytes does not match n and type,
 * FY_ERR_UNSUPPORTED for other types. src must be 4-byte aligned. */
fy_status_t mdl_cuda_dequant_f16(uint16_t *dst, const void *src, uint32_t type, size_t n,
                                 size_t src_bytes, cudaStream_t stream);

/* x[r][c] += bias[c] for rows x cols, row stride ldx. */
fy_status_t mdl_cuda_add_bias(float *x, int ldx, const float *bias, int rows, int cols,
                              cudaStream_t stream);

/* From qkv [n][ld] (q heads, then k heads, then v heads, head_dim each) to
 * k, v [n_kv][n][head_dim] and, when w > 0, q_window [n_heads][w][head_dim] (the last w rows). */
fy_status_t mdl_cuda_split_qkv(float *k, float *v, float *q_window, const float *qkv, int ld,
                               int n, int n_heads, int n_kv_heads, int head_dim, int w,
                               cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_MODEL_LLAMA_CUDA_INT_H */
