/*
 * kernels_cuda.h: the CUDA twins of the ops in kernels.h (kernels/<op>.cu beside <op>.c).
 *
 * Same shapes and conventions as the CPU reference (kernels.h): weights W [n_out][n_in]
 * row-major, activations [n_tokens][width] with a row stride in elements, K and V of one layer
 * [n_kv_heads][n_ctx][head_dim]. Differences, all for the device:
 * - every tensor pointer is device memory unless the comment says "host";
 * - GEMM inputs (activations and weights) are FP16, accumulation and output FP32;
 * - each call is enqueued on a stream and returns once it is launched (launch errors are
 *   reported; errors of the kernel itself surface at the next synchronizing call);
 * - calls return fy_status_t: FY_ERR_INVALID_ARG for bad shapes (checked on the host before
 *   anything is launched), FY_ERR_RESOURCE_EXHAUSTED when CUDA is out of memory, FY_ERR_CUDA
 *   for any other CUDA or cuBLAS error.
 * Only built when the project is configured with CUDA (FY_HAVE_CUDA).
 */
#ifndef FERRY_KERNELS_CUDA_H
#define FERRY_KERNELS_CUDA_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Maps a CUDA / cuBLAS error to a status (out of memory: FY_ERR_RESOURCE_EXHAUSTED, else
 * FY_ERR_CUDA). cudaSuccess maps to FY_OK. Thread: any. */
fy_status_t krn_cuda_status(cudaError_t err);
fy_status_t krn_cublas_status(cublasStatus_t err);

/* ------------------------------------------------------------------------------------------ */
/* GEMM (gemm.cu): cuBLAS                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* y[m][n] = x[m][k] · w[n][k]ᵀ (+ y when accumulate): x and w FP16, y FP32, FP32
 * accumulation. Row strides ldx >= k, ldw >= k, ldy >= n in elements. Up to 4 rows with k,
 * ldx, ldw multiples of 8 and x, w 16-byte aligned run a weight-streaming GEMV kernel, the rest
 * cuBLAS on tensor cores; the handle is then bound to stream for the call. FERRY_GEMM (read at
 * each call) overrides: "cublas" sends everything to cuBLAS, "mma" sends 5 to 16 aligned rows to
 * a weight-streaming kernel on tensor cores. Thread: one call at a time per handle. */
fy_status_t krn_gemm_f16_cuda(cublasHandle_t handle, int m, int n, int k, const uint16_t *x,
                              int ldx, const uint16_t *w, int ldw, float *y, int ldy,
                              int accumulate, cudaStream_t stream);
/* Which kernel krn_gemm_f16_cuda runs for these arguments: "gemv", "mma" or "cublas". Thread:
 * any. */
const char *krn_gemm_cuda_kernel(int m, int k, const uint16_t *x, int ldx, const uint16_t *w,
                                 int ldw);

/* ------------------------------------------------------------------------------------------ */
/* RMSNorm (rmsnorm.cu)                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* out[i][:] = x[i][:] / sqrt(mean(x[i][:]²) + eps) * w[:], FP32 out (may equal x). Thread: any. */
fy_status_t krn_rmsnorm_f32_cuda(float *out, int ldo, const float *x, int ldx, const float *w,
                                 int n_rows, int dim, float eps, cudaStream_t stream);
/* The same with FP16 output (the input of the next GEMM). Thread: any. */
fy_status_t krn_rmsnorm_f16_cuda(uint16_t *out, int ldo, const float *x, int ldx, const float *w,
                                 int n_rows, int dim, float eps, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------ */
/* RoPE (rope.cu)                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* Rotates in place x [n_tokens][n_heads][head_dim] (row stride ldx) at positions pos[n_tokens]
 * (device). rope is a host struct; its freq_factors, when set, point to DEVICE memory
 * [n_rot / 2]. Angles are computed in double, as the CPU reference does. Thread: any. */
fy_status_t krn_rope_f32_cuda(float *x, int ldx, int n_tokens, int n_heads, int head_dim,
                              const int32_t *pos, const krn_rope_t *rope, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------ */
/* SwiGLU (swiglu.cu)                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* out[i] = silu(gate[i]) * up[i] for n elements; out may equal gate or up. Thread: any. */
fy_status_t krn_swiglu_f32_cuda(float *out, const float *gate, const float *up, size_t n,
                                cudaStream_t stream);
/* Row form with FP16 output (the input of the down projection): out[r][c] =
 * silu(gate[r][c]) * up[r][c] for rows x cols, input row stride ldi, output ldo. Thread: any. */
fy_status_t krn_swiglu_rows_f16_cuda(uint16_t *out, int ldo, const float *gate, const float *up,
                                     int ldi, int rows, int cols, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------ */
/* Embedding lookup (embed.cu)                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* x[i][:] = table[tokens[i]][:] as FP32, table FP16 [n_vocab][dim], tokens (device) [n]. An id
 * outside [0, n_vocab) gives a zero row (callers validate ids on the host first; the kernel
 * never reads out of bounds). Thread: any. */
fy_status_t krn_embed_f16_cuda(float *x, int ldx, const uint16_t *table, int n_vocab, int dim,
                               const int32_t *tokens, int n, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------ */
/* Causal attention (attention.cu): prefill                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Causal grouped-query attention of all n_heads query heads, tiled with an online softmax,
 * for queries at positions q_begin .. q_begin + n_q - 1:
 *   q   [n_q][q_stride]   head h at columns h * head_dim (FP32, after RoPE)
 *   k,v [n_kv_heads][n_ctx][head_dim] (n_ctx >= q_begin + n_q); query head h reads kv head
 *       h / (n_heads / n_kv_heads)
 *   out [n_q][out_stride] head h at columns h * head_dim
 * With window > 0 (window <= n_q) it also writes the observation-window scores
 *   window_attn [n_heads][q_begin + n_q]: per query head, the mean over the last `window`
 *   queries of their softmax rows (0 past each query's position), what
 *   kvc_layer_input_t.window_attn means;
 * scratch then holds krn_attention_cuda_scratch(n_heads, window) floats (may be NULL when
 * window is 0). head_dim <= 256. Everything is FP32, except that with head_dim 64 or 128,
 * window 0 and k, v 16-byte aligned a tensor-core kernel runs (FP16 operands, FP32
 * accumulation: about 1e-3 of the output scale); FERRY_PREFILL_ATTN=simt in the environment
 * keeps the FP32 kernel there too. Thread: any. */
fy_status_t krn_attention_causal_cuda(float *out, int out_stride, const float *q, int q_stride,
                                      const float *k, const float *v, int n_ctx, int q_begin,
                                      int n_q, int n_heads, int n_kv_heads, int head_dim,
                                      float scale, int window, float *window_attn,
                                      float *scratch, cudaStream_t stream);
size_t krn_attention_cuda_scratch(int n_heads, int window);

/* Which kernel krn_attention_causal_cuda runs for head_dim and window under this process's
 * environment: "mma" (the tensor-core kernel, given 16-byte aligned k and v) or "simt". Thread:
 * any. */
const char *krn_attention_cuda_kernel(int head_dim, int window);

/* ------------------------------------------------------------------------------------------ */
/* Paged attention (paged_attention.cu): decode over FP16 pages                                 */
/* ------------------------------------------------------------------------------------------ */

/* A GPU page pool with the CPU pool's page format: page id p lives at pool + p * page_elems
 * and holds k [page_tokens][head_dim] then v [page_tokens][head_dim] (FP16). Page ids of
 * sequence b, kv head h, i-th page: page_ids[b * ids_seq_stride + h * max_pages + i]
 * (device int32). */
typedef struct {
    uint16_t *pool;
    size_t page_elems;       /* 2 * page_tokens * head_dim */
    int64_t n_pages;         /* pages in the pool (ids are checked against it) */
    int page_tokens;
    int head_dim;            /* <= 256 */
    const int32_t *page_ids; /* device */
    size_t ids_seq_stride;
    int max_pages;           /* pages listed per (sequence, kv head) */
} krn_paged_cuda_t;

/* Decode attention for a batch of n_seqs sequences, one query token each: query head h of
 * sequence b (q[b * ldq + h * head_dim ..]) attends over the first n_tokens[b] (device) tokens
 * of kv head h / (n_heads / n_kv_heads) of that sequence; out[b * ldo + h * head_dim ..].
 * The page list is split over thread blocks (flash-decoding) and the partial softmax results
 * combined. max_tokens (host) bounds every n_tokens[b] (<= max_pages * page_tokens); scratch
 * holds krn_paged_attention_cuda_scratch(...) floats. n_heads / n_kv_heads <= 32.
 * Thread: any. */
fy_status_t krn_paged_attention_f16_cuda(float *out, int ldo, const float *q, int ldq,
                                         int n_seqs, int n_heads, int n_kv_heads, float scale,
                                         const krn_paged_cuda_t *cache, const int32_t *n_tokens,
                                         int max_tokens, float *scratch, size_t scratch_floats,
                                         cudaStream_t stream);
size_t krn_paged_attention_cuda_scratch(int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                                        int max_tokens);

/* Writes n_tokens tokens of K and V (FP32, converted to FP16) of each of n_seqs sequences into
 * their pages at positions pos0[b] (device) .. pos0[b] + n_tokens - 1. Element (b, h, t, d) of
 * k is k[b * seq_stride + h * head_stride + t * tok_stride + d]; v likewise. Slots whose page
 * index is past max_pages are skipped (the host reserves pages first). Thread: any. */
fy_status_t krn_paged_store_f16_cuda(const krn_paged_cuda_t *cache, int n_seqs, int n_kv_heads,
                                     int n_tokens, const int32_t *pos0, const float *k,
                                     const float *v, size_t seq_stride, size_t head_stride,
                                     size_t tok_stride, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_KERNELS_CUDA_H */
