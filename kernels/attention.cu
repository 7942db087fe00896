/*
 * attention.cu: causal grouped-query attention for prefill on the GPU (CUDA twin of
 * attention.c), plus the observation-window scores the KV codec needs.
 *
 * Main kernel: one block per (query head, tile of ATT_BQ queries), four warps of ATT_BQ / 4
 * query rows each. Keys and values go through shared memory ATT_BK at a time; each lane scores
 * one key of the tile, the warp keeps a running max and sum per row (online softmax) and each
 * lane accumulates head_dim / 32 output channels. Everything in FP32.
 *
 * Window kernel: the window rows' final max and sum are saved by the main kernel, so a second
 * pass recomputes each window query's scores for one key per warp and averages the softmax
 * probabilities over the window; no atomics, so the result is deterministic.
 */
#include <math.h>

#include "cuda_int.h"

enum {
    ATT_BQ = 16,      // queries per block
    ATT_BK = 32,      // keys per shared-memory tile (one per lane)
    ATT_WARPS = 4,
    ATT_ROWS = ATT_BQ / ATT_WARPS, // query rows per warp
    ATT_MAX_C = 8,    // head_dim / 32 channels per lane (head_dim <= 256)
    WIN_WARPS = 8,
};

static size_t att_smem_bytes(int head_dim)
{
    // q [ATT_BQ][hd], k [ATT_BK][hd + 1] (padded: lanes read different rows), v [ATT_BK][hd]
    return sizeof(float) * ((size_t)ATT_BQ * head_dim + (size_t)ATT_BK * (head_dim + 1) +
                            (size_t)ATT_BK * head_dim);
}

__global__ void __launch_bounds__(ATT_WARPS * 32)
    attn_prefill_kernel(float *out, int out_stride, const float *q, int q_stride, const float *k,
                        const float *v, int n_ctx, int q_begin, int n_q, int group, int head_dim,
                        float scale, int window, float *stats)
{
    extern __shared__ float smem[];
    const int hd = head_dim, kpad = hd + 1;
    float *qs = smem;                       // [ATT_BQ][hd]
    float *ks = qs + ATT_BQ * hd;           // [ATT_BK][hd + 1]
    float *vs = ks + ATT_BK * kpad;         // [ATT_BK][hd]
    const int h = blockIdx.y, kvh = h / group;
    const int i0 = blockIdx.x * ATT_BQ;     // first query (index into q) of the tile
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float *kh = k + (size_t)kvh * n_ctx * hd;
    const float *vh = v + (size_t)kvh * n_ctx * hd;

    for (int idx = threadIdx.x; idx < ATT_BQ * hd; idx += blockDim.x) {
        int r = idx / hd, d = idx % hd;
        qs[idx] = i0 + r < n_q ? q[(size_t)(i0 + r) * q_stride + (size_t)h * hd + d] * scale
                               : 0.0f;
    }

    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][ATT_MAX_C];
    for (int r = 0; r < ATT_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int c = 0; c < ATT_MAX_C; c++)
            acc[r][c] = 0.0f;
    }
    const int last_i = min(n_q, i0 + ATT_BQ) - 1;
    const int last_pos = q_begin + last_i; // the block's last query sees keys 0..last_pos
    const int n_tiles = last_pos / ATT_BK + 1;
    for (int kt = 0; kt < n_tiles; kt++) {
        const int j0 = kt * ATT_BK;
        __syncthreads(); // the previous tile (and the q load) is done
        for (int idx = threadIdx.x; idx < ATT_BK * hd; idx += blockDim.x) {
            int j = idx / hd, d = idx % hd;
            bool ok = j0 + j <= last_pos;
            ks[j * kpad + d] = ok ? kh[(size_t)(j0 + j) * hd + d] : 0.0f;
            vs[j * hd + d] = ok ? vh[(size_t)(j0 + j) * hd + d] : 0.0f;
        }
        __syncthreads();
        float s[ATT_ROWS];
        for (int r = 0; r < ATT_ROWS; r++)
            s[r] = 0.0f;
        const float *kr = ks + lane * kpad;
        for (int d = 0; d < hd; d++) {
            float kd = kr[d];
            for (int r = 0; r < ATT_ROWS; r++)
                s[r] += qs[(warp * ATT_ROWS + r) * hd + d] * kd;
        }
        const int key = j0 + lane;
        for (int r = 0; r < ATT_ROWS; r++) {
            const int i = i0 + warp * ATT_ROWS + r;
            const int pos = q_begin + i;
            if (i >= n_q || j0 > pos) // warp-uniform: no visible key in this tile
                continue;
            bool vis = key <= pos;
            float sr = vis ? s[r] : -INFINITY;
            float tmax = sr;
            for (int off = 16; off > 0; off >>= 1)
                tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
            float new_m = fmaxf(m[r], tmax); // finite: key j0 <= pos is visible
            float p = vis ? expf(sr - new_m) : 0.0f;
            float corr = expf(m[r] - new_m); // 0 on the first tile (m = -inf)
            float psum = p;
            for (int off = 16; off > 0; off >>= 1)
                psum += __shfl_xor_sync(0xffffffffu, psum, off);
            l[r] = l[r] * corr + psum;
            m[r] = new_m;
            for (int c = 0; c < ATT_MAX_C; c++)
                acc[r][c] *= corr;
            for (int j = 0; j < ATT_BK; j++) {
                float pj = __shfl_sync(0xffffffffu, p, j);
                const float *vr = vs + j * hd;
                for (int c = 0; c < ATT_MAX_C; c++) {
                    int d = lane + 32 * c;
                    if (d < hd)
                        acc[r][c] += pj * vr[d];
                }
            }
        }
    }
    for (int r = 0; r < ATT_ROWS; r++) {
        const int i = i0 + warp * ATT_ROWS + r;
        if (i >= n_q)
            continue;
        float inv = 1.0f / l[r];
        float *orow = out + (size_t)i * out_stride + (size_t)h * hd;
        for (int c = 0; c < ATT_MAX_C; c++) {
            int d = lane + 32 * c;
            if (d < hd)
                orow[d] = acc[r][c] * inv;
        }
        int w = i - (n_q - window);
        if (window > 0 && w >= 0 && lane == 0) {
            stats[((size_t)h * window + w) * 2] = m[r];
            stats[((size_t)h * window + w) * 2 + 1] = l[r];
        }
    }
}

/* win[h][j] = mean over the window queries w of exp(s_wj - m_w) / l_w (0 where j > pos_w). */
__global__ void __launch_bounds__(WIN_WARPS * 32)
    attn_window_kernel(float *win, const float *q, int q_stride, const float *k, int n_ctx,
                       int q_begin, int n_q, int group, int head_dim, float scale, int window,
                       const float *stats)
{
    const int h = blockIdx.y, kvh = h / group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_keys = q_begin + n_q;
    const int j = blockIdx.x * WIN_WARPS + warp;
    if (j >= n_keys)
        return;
    const float *kj = k + ((size_t)kvh * n_ctx + j) * head_dim;
    float kreg[ATT_MAX_C];
    for (int c = 0; c < ATT_MAX_C; c++) {
        int d = lane + 32 * c;
        kreg[c] = d < head_dim ? kj[d] : 0.0f;
    }
    float acc = 0.0f;
    for (int w = 0; w < window; w++) {
        const int i = n_q - window + w;
        if (j > q_begin + i) // warp-uniform
            continue;
        const float *qi = q + (size_t)i * q_stride + (size_t)h * head_dim;
        float s = 0.0f;
        for (int c = 0; c < ATT_MAX_C; c++) {
            int d = lane + 32 * c;
            if (d < head_dim)
                s += qi[d] * scale * kreg[c];
        }
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, off);
        float mw = stats[((size_t)h * window + w) * 2];
        float lw = stats[((size_t)h * window + w) * 2 + 1];
        acc += expf(s - mw) / lw;
    }
    if (lane == 0)
        win[(size_t)h * n_keys + j] = acc / (float)window;
}

extern "C" size_t krn_attention_cuda_scratch(int n_heads, int window)
{
    return n_heads > 0 && window > 0 ? (size_t)n_heads * window * 2 : 0;
}

extern "C" fy_status_t krn_attention_causal_cuda(float *out, int out_stride, const float *q,
                                                 int q_stride, const float *k, const float *v,
                                                 int n_ctx, int q_begin, int n_q, int n_heads,
                                                 int n_kv_heads, int head_dim, float scale,
                                                 int window, float *window_attn, float *scratch,
                                                 cudaStream_t stream)
{
    if (n_q < 0 || q_begin < 0 || n_heads <= 0 || n_heads > 65535 || n_kv_heads <= 0 ||
        n_heads % n_kv_heads != 0 || head_dim <= 0 || head_dim > 32 * ATT_MAX_C ||
        (int64_t)q_begin + n_q > n_ctx ||
        (size_t)q_stride < (size_t)n_heads * head_dim ||
        (size_t)out_stride < (size_t)n_heads * head_dim || window < 0 || window > n_q ||
        (window > 0 && (window_attn == NULL || scratch == NULL)))
        return FY_ERR_INVALID_ARG;
    if (n_q == 0)
        return FY_OK;
    const int group = n_heads / n_kv_heads;
    size_t smem = att_smem_bytes(head_dim);
    if (smem > 48 * 1024) {
        fy_status_t st = krn_cuda_status(cudaFuncSetAttribute(
            attn_prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        if (st != FY_OK)
            return st;
    }
    dim3 grid((unsigned)((n_q + ATT_BQ - 1) / ATT_BQ), (unsigned)n_heads);
    attn_prefill_kernel<<<grid, ATT_WARPS * 32, smem, stream>>>(
        out, out_stride, q, q_stride, k, v, n_ctx, q_begin, n_q, group, head_dim, scale, window,
        scratch);
    fy_status_t st = krn_launch_status();
    if (st != FY_OK || window == 0)
        return st;
    int n_keys = q_begin + n_q;
    dim3 wgrid((unsigned)((n_keys + WIN_WARPS - 1) / WIN_WARPS), (unsigned)n_heads);
    attn_window_kernel<<<wgrid, WIN_WARPS * 32, 0, stream>>>(window_attn, q, q_stride, k, n_ctx,
                                                             q_begin, n_q, group, head_dim,
                                                             scale, window, scratch);
    return krn_launch_status();
}
