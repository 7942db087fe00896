/*
 * kernels.h: the compute ops of the model forward pass.
 *
 * One file per op (kernels/<op>.c for the CPU; a CUDA twin kernels/<op>.cu with the same
 * signature may sit beside it). The CPU versions are the reference: always built, plain C with
 * explicit dimensions and row strides (in elements), no allocation. All tensors are FP32 unless
 * the name says otherwise; FP16 is IEEE binary16 stored as uint16_t.
 *
 * Layout conventions:
 * - A weight matrix is W [n_out][n_in] row-major (the GGUF order: ne0 = n_in is contiguous),
 *   so a linear layer is y = x · Wᵀ.
 * - Activations are [n_tokens][width] with a row stride.
 * - Keys and values of one layer are [n_kv_heads][n_ctx][head_dim] (K after RoPE), the layout
 *   the KV codec consumes.
 */
#ifndef FERRY_KERNELS_H
#define FERRY_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* GEMM (gemm.c): OpenBLAS                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* y[m][n] = x[m][k] · w[n][k]ᵀ (+ y when accumulate). Row strides ldx, ldw, ldy in elements.
 * m == 1 takes the matrix-vector path. Threads: OpenBLAS's own (see krn_gemm_set_threads).
 * Thread: any (buffers owned by the caller must not overlap y). */
void krn_gemm_f32(int m, int n, int k, const float *x, int ldx, const float *w, int ldw, float *y,
                  int ldy, int accumulate);

/* Sets how many threads OpenBLAS uses for the GEMMs (a process-wide OpenBLAS setting, which is
 * why it lives here and nowhere else). n <= 0 keeps the library default. Thread: any. */
void krn_gemm_set_threads(int n);

/* The OPENBLAS_CORETYPE value that would give faster GEMMs on this CPU ("Haswell" when
 * OpenBLAS picked pre-AVX2 kernels on a CPU with AVX2/FMA, as it does on VMs with a generic
 * CPUID model), or NULL. OpenBLAS reads the variable only when it loads, so a program that
 * wants it sets it and re-executes itself. Thread: any. */
const char *krn_gemm_better_coretype(void);

/* Whether this CPU runs the kernels' AVX2 paths (AVX2, FMA and F16C; cached). Thread: any. */
bool krn_cpu_avx2(void);

/* ------------------------------------------------------------------------------------------ */
/* Matmul from stored weight types (matmul_q.c): decode                                        */
/* ------------------------------------------------------------------------------------------ */

/* Weight storage types, numbered as in ggml/GGUF. Block types hold 32 weights per block:
 * Q8_0 = fp16 scale + 32 int8; Q4_0 = fp16 scale + 16 bytes of nibbles (q - 8);
 * Q4_1 = fp16 scale + fp16 min + 16 bytes of nibbles (low nibbles are weights 0..15). */
typedef enum {
    KRN_Q_F32 = 0,
    KRN_Q_F16 = 1,
    KRN_Q_Q4_0 = 2,
    KRN_Q_Q4_1 = 3,
    KRN_Q_Q8_0 = 8,
} krn_qtype_t;

/* A weight matrix [rows][cols] in a storage type; data borrowed, rows row_bytes apart. */
typedef struct {
    krn_qtype_t type;
    int rows;         /* n_out */
    int cols;         /* n_in (a multiple of 32 for block types, <= 16384) */
    size_t row_bytes; /* krn_qtype_row_bytes(type, cols) */
    const void *data;
} krn_qmat_t;

bool krn_qtype_supported(krn_qtype_t type);
/* Bytes of one row of k weights (0 for unsupported types). Thread: any. */
size_t krn_qtype_row_bytes(krn_qtype_t type, int k);

/* y[m][rows] = x[m][cols] · Wᵀ (+ y when accumulate), reading W in its storage type: weight
 * rows are expanded to FP32 and dotted with every x row, except for block types (Q8_0, Q4_0,
 * Q4_1) at m <= KRN_MATMUL_Q8_MAX_ROWS, where each x row is first quantized to blocks of 32
 * (two int8 terms per value, ~15 bits) and the dots are integer (the result is
 * krn_matmul_q8_reference_f32's up to summation order). Meant for small m
 * (decode), where reading the weights is the cost. Output rows spread over pool (NULL =
 * inline); AVX2/FMA/F16C when the CPU has them. FY_ERR_UNSUPPORTED for other types or
 * shapes. Thread: one call at a time per pool. */
fy_status_t krn_matmul_q_f32(fy_pool_t *pool, int m, const float *x, int ldx,
                             const krn_qmat_t *w, float *y, int ldy, int accumulate);

/* Several matrices with the same input width applied to the same x in one parallel pass
 * (Q, K and V; gate and up): w[i] writes y[i] (each with row stride ldy). At most
 * KRN_MATMUL_Q_MAX_MATS matrices. Thread: one call at a time per pool. */
#define KRN_MATMUL_Q_MAX_MATS 4
fy_status_t krn_matmul_q_multi_f32(fy_pool_t *pool, int m, const float *x, int ldx,
                                   const krn_qmat_t *const *w, float *const *y, int ldy,
                                   int n_mats, int accumulate);

/* The portable FP32 path alone, single-threaded (for parity tests): exact dequantized weights
 * times FP32 x. */
void krn_matmul_q_reference_f32(int m, const float *x, int ldx, const krn_qmat_t *w, float *y,
                                int ldy);

/* Up to this many x rows, block-type weights take the integer path when it is on (faster
 * there; more rows are faster through the FP32 expansion). */
#define KRN_MATMUL_Q8_MAX_ROWS 2

/* Turns the integer path on or off for the whole process (off by default: it changes 1-2-row
 * results by ~1e-5 of each activation block's max, so a prompt's logits depend on whether it
 * ran alone or batched by more than tests/model's 1e-4). Thread: any. */
void krn_matmul_q_set_int8(bool on);

/* The portable integer path krn_matmul_q_f32 takes for block types, single-threaded, for any
 * m: x quantized per block of 32 to x ≈ d·(254·q + r) with d = max|x|/127/254 and q, r int8,
 * integer block dots. Differs from krn_matmul_q_reference_f32 by at most
 * Σ_blocks d/2 · Σ|w| plus FP32 rounding. FY_ERR_UNSUPPORTED for F32/F16 or bad shapes.
 * Thread: any. */
fy_status_t krn_matmul_q8_reference_f32(int m, const float *x, int ldx, const krn_qmat_t *w,
                                        float *y, int ldy);

/* ------------------------------------------------------------------------------------------ */
/* RMSNorm (rmsnorm.c)                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* out[i][:] = x[i][:] / sqrt(mean(x[i][:]²) + eps) * w[:] for n_rows rows of dim elements.
 * out may equal x. Thread: any. */
void krn_rmsnorm_f32(float *out, int ldo, const float *x, int ldx, const float *w, int n_rows,
                     int dim, float eps);

/* ------------------------------------------------------------------------------------------ */
/* RoPE (rope.c)                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    KRN_ROPE_NORM = 0, /* rotate adjacent pairs (x[2i], x[2i+1]): GGUF Llama (permuted Q/K) */
    KRN_ROPE_NEOX = 2, /* rotate halves (x[i], x[i + n_rot/2]): Qwen2, HF layout */
} krn_rope_mode_t;

/* RoPE parameters of a model (from its metadata). */
typedef struct {
    krn_rope_mode_t mode;
    int n_rot;                 /* rotated dims per head (<= head_dim, even) */
    float theta;               /* base frequency */
    float freq_scale;          /* linear scaling: position * freq_scale (1 = none) */
    const float *freq_factors; /* [n_rot / 2] divisors of each frequency (Llama 3), or NULL;
                                  borrowed */
} krn_rope_t;

/* Rotates in place x [n_tokens][n_heads][head_dim] (row stride ldx between tokens, heads
 * contiguous) at positions pos[n_tokens]. Thread: any. */
void krn_rope_f32(float *x, int ldx, int n_tokens, int n_heads, int head_dim, const int32_t *pos,
                  const krn_rope_t *rope);

/* ------------------------------------------------------------------------------------------ */
/* SwiGLU (swiglu.c)                                                                            */
/* ------------------------------------------------------------------------------------------ */

/* out[i] = silu(gate[i]) * up[i] for n elements; out may equal gate or up. Thread: any. */
void krn_swiglu_f32(float *out, const float *gate, const float *up, size_t n);

/* ------------------------------------------------------------------------------------------ */
/* Causal attention (attention.c): prefill                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Causal grouped-query attention of one query head over contiguous keys, for queries at
 * positions q_begin .. q_begin + n_q - 1 of a context of keys 0 .. q_begin + n_q - 1:
 *   q   [n_q][q_stride]    row i holds the query of position q_begin + i (head_dim used)
 *   k,v [n_ctx][head_dim]  this head's KV group (n_ctx >= q_begin + n_q)
 *   out [n_q][out_stride]  head_dim written per row
 *   scratch [n_ctx] floats
 * scale is usually 1/sqrt(head_dim). Thread: any (one call per head can run in parallel). */
void krn_attention_causal_f32(float *out, int out_stride, const float *q, int q_stride,
                              const float *k, const float *v, int q_begin, int n_q,
                              int head_dim, float scale, float *scratch);

/* Same contract, computed with two OpenBLAS GEMMs over the block (S = Q·Kᵀ, masked softmax,
 * O = P·V); scratch is [n_q][q_begin + n_q] floats. Faster for long prompts; matches the
 * scalar reference to float rounding (with AVX2 and FMA the softmax runs on 8 lanes with a
 * polynomial e^x within 2 ulp of expf). Thread: any (OpenBLAS threads inside). */
void krn_attention_causal_blas_f32(float *out, int out_stride, const float *q, int q_stride,
                                   const float *k, const float *v, int q_begin, int n_q,
                                   int head_dim, float scale, float *scratch);

/* ------------------------------------------------------------------------------------------ */
/* Paged attention (paged_attention.c): decode                                                  */
/* ------------------------------------------------------------------------------------------ */

/* One (layer, kv head) of one sequence as a list of FP16 pages. Page i holds tokens
 * [i * page_tokens, (i + 1) * page_tokens) as k [page_tokens][head_dim] followed by
 * v [page_tokens][head_dim]; the last page may be partly filled (n_tokens says how far).
 * Token order does not matter to attention, only that K and V of a token share a slot. */
typedef struct {
    const uint16_t *const *pages; /* [n_pages] borrowed */
    int n_pages;
    int page_tokens;
    int n_tokens;
} krn_page_list_t;

/* Attention of n_q query heads that share one kv head over its paged cache, with an online
 * softmax (never materializes the scores or an FP32 copy of the cache):
 *   q   [n_q][head_dim], out [n_q][head_dim].
 * Thread: any (calls on different outputs can run in parallel). */
void krn_paged_attention_f16(float *out, const float *q, int n_q, int head_dim, float scale,
                             const krn_page_list_t *list);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_KERNELS_H */
