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
 *
 * Tensor-core kernel (head_dim 64 or 128, no window scores; the default there, and
 * FERRY_PREFILL_ATTN=simt selects the FP32 kernel instead): one block per (query head, tile of
 * MMA_BQ queries), four warps of 16 query rows. Each tile of MMA_BK keys is staged in shared memory
 * as FP16; S = Q K^T and O += P V run as m16n8k16 MMAs (FP16 in, FP32 accumulation) with the online
 * softmax in the registers of the S fragments (base 2, the log2(e) factor folded into Q), and
 * P goes straight from the S accumulators into the A fragments of P V (the FlashAttention-2
 * arrangement). Q, K, V and P are rounded to FP16, so outputs agree with the FP32 kernel to
 * about 1e-3 of their scale, not to FP32 rounding.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

/* ------------------------------------------------------------------------------------------ */
/* Tensor-core prefill attention                                                               */
/* ------------------------------------------------------------------------------------------ */

enum {
    MMA_BQ = 64, // queries per block: 16 rows per warp
    MMA_BK = 64, // keys per staged tile: 8 n-tiles of 8
    MMA_WARPS = 4,
    MMA_PAD = 8, // halves of padding per staged row: fragment loads free of bank conflicts
};

static size_t att_mma_smem_bytes(int head_dim)
{
    return sizeof(__half) * 2 * (size_t)MMA_BK * (size_t)(head_dim + MMA_PAD);
}

/* Four 8x8 FP16 matrices from shared memory, transposed: lanes 8 m .. 8 m + 7 give the rows of
 * matrix m, and lane (g, t) receives elements (2t, g) and (2t + 1, g) of each. */
static __device__ __forceinline__ void att_ldsm_x4_t(const __half *row, uint32_t (&r)[4])
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((uint32_t)__cvta_generic_to_shared(row)));
}

static __device__ __forceinline__ uint32_t att_pack_h2(float lo, float hi)
{
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
}

/* Fragment layout of m16n8k16 for lane (g, t) = (lane / 4, lane % 4): A holds rows g and g + 8
 * at columns 2t, 2t + 1 (a0, a1) and 2t + 8, 2t + 9 (a2, a3); B holds column g at rows 2t, 2t + 1
 * (b0) and 2t + 8, 2t + 9 (b1); C holds rows g (c0, c1) and g + 8 (c2, c3) at columns 2t, 2t + 1.
 * Here A of S is Q (rows: queries, columns: channels), B of S is K^T (rows: channels, columns:
 * keys), A of O is P (columns: keys) and B of O is V (rows: keys, columns: channels). scale_l2
 * is the softmax scale times log2(e). k and v rows are 16-byte aligned (the launcher checks). */
template <int D>
__global__ void __launch_bounds__(MMA_WARPS * 32)
    attn_prefill_mma_kernel(float *out, int out_stride, const float *q, int q_stride,
                            const float *k, const float *v, int n_ctx, int q_begin, int n_q,
                            int group, float scale_l2)
{
    constexpr int KS = D / 16;     // k steps of S over the channels
    constexpr int NT = MMA_BK / 8; // key n-tiles of S per staged tile
    constexpr int DT = D / 8;      // channel n-tiles of O
    constexpr int LD = D + MMA_PAD;
    extern __shared__ __align__(16) __half att_mma_sm[];
    __half *ks = att_mma_sm;       // [MMA_BK][LD] keys
    __half *vs = ks + MMA_BK * LD; // [MMA_BK][LD] values
    const int h = blockIdx.y, kvh = h / group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int i0 = blockIdx.x * MMA_BQ;
    const int last_pos = q_begin + min(n_q, i0 + MMA_BQ) - 1; // the block's last query
    // This lane's rows; rows past the end repeat the last query (finite work, nothing stored).
    const int r0 = i0 + warp * 16 + g, r1 = r0 + 8;
    const int c0 = min(r0, n_q - 1), c1 = min(r1, n_q - 1);
    const int pos0 = q_begin + c0, pos1 = q_begin + c1;

    uint32_t qa[KS][4];
    {
        const float *q0 = q + (size_t)c0 * q_stride + (size_t)h * D;
        const float *q1 = q + (size_t)c1 * q_stride + (size_t)h * D;
#pragma unroll
        for (int s = 0; s < KS; s++) {
            const int x = 16 * s + 2 * t;
            qa[s][0] = att_pack_h2(q0[x] * scale_l2, q0[x + 1] * scale_l2);
            qa[s][1] = att_pack_h2(q1[x] * scale_l2, q1[x + 1] * scale_l2);
            qa[s][2] = att_pack_h2(q0[x + 8] * scale_l2, q0[x + 9] * scale_l2);
            qa[s][3] = att_pack_h2(q1[x + 8] * scale_l2, q1[x + 9] * scale_l2);
        }
    }
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; // rows g, g + 8 (log2 domain)
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++)
        o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    const float *kh = k + (size_t)kvh * n_ctx * D, *vh = v + (size_t)kvh * n_ctx * D;
    const int n_tiles = last_pos / MMA_BK + 1;
    for (int kt = 0; kt < n_tiles; kt++) {
        const int j0 = kt * MMA_BK;
        __syncthreads(); // every warp is done with the previous tile
        for (int idx = threadIdx.x; idx < MMA_BK * D / 4; idx += blockDim.x) {
            const int j = idx / (D / 4), c = (idx % (D / 4)) * 4;
            float4 kx = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vx = kx;
            if (j0 + j <= last_pos) {
                kx = *reinterpret_cast<const float4 *>(kh + (size_t)(j0 + j) * D + c);
                vx = *reinterpret_cast<const float4 *>(vh + (size_t)(j0 + j) * D + c);
            }
            *reinterpret_cast<uint2 *>(ks + j * LD + c) =
                make_uint2(att_pack_h2(kx.x, kx.y), att_pack_h2(kx.z, kx.w));
            *reinterpret_cast<uint2 *>(vs + j * LD + c) =
                make_uint2(att_pack_h2(vx.x, vx.y), att_pack_h2(vx.z, vx.w));
        }
        __syncthreads();
        // S = Q K^T for the warp's 16 rows and the tile's 64 keys.
        float sc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
        for (int s = 0; s < KS; s++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const __half *kr = ks + (nt * 8 + g) * LD + 16 * s + 2 * t;
                krn_mma16816(sc[nt], qa[s][0], qa[s][1], qa[s][2], qa[s][3],
                             *reinterpret_cast<const uint32_t *>(kr),
                             *reinterpret_cast<const uint32_t *>(kr + 8));
            }
        // Causal mask, then the online softmax of rows g and g + 8 (the 4 lanes t of a row
        // hold its 64 keys between them).
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = j0 + nt * 8 + 2 * t + e;
                if (key > pos0)
                    sc[nt][e] = -INFINITY;
                if (key > pos1)
                    sc[nt][2 + e] = -INFINITY;
                mx0 = fmaxf(mx0, sc[nt][e]);
                mx1 = fmaxf(mx1, sc[nt][2 + e]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // Key 0 is in tile 0 and visible to every row, so the running max is finite from the
        // first tile on; a row with no visible key in a later tile keeps its max.
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float corr0 = exp2f(m0 - mn0), corr1 = exp2f(m1 - mn1); // 0 on the first tile
        m0 = mn0;
        m1 = mn1;
        uint32_t pa[NT / 2][4]; // P as the A fragments of O += P V, 16 keys per k step
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const float p00 = exp2f(sc[nt][0] - mn0), p01 = exp2f(sc[nt][1] - mn0);
            const float p10 = exp2f(sc[nt][2] - mn1), p11 = exp2f(sc[nt][3] - mn1);
            ps0 += p00 + p01;
            ps1 += p10 + p11;
            pa[nt / 2][(nt % 2) * 2] = att_pack_h2(p00, p01);
            pa[nt / 2][(nt % 2) * 2 + 1] = att_pack_h2(p10, p11);
        }
        l0 = l0 * corr0 + ps0; // this lane's keys; the 4 lanes of a row are summed at the end
        l1 = l1 * corr1 + ps1;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
            o[dt][0] *= corr0;
            o[dt][1] *= corr0;
            o[dt][2] *= corr1;
            o[dt][3] *= corr1;
        }
        // O += P V: V's B fragments by transposed 8x8 loads, two channel n-tiles at a time.
        const int mrow = (lane & 7) + ((lane >> 3) & 1) * 8, mcol = (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < NT / 2; kk++)
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                uint32_t b[4];
                att_ldsm_x4_t(vs + (16 * kk + mrow) * LD + 8 * dt + mcol, b);
                krn_mma16816(o[dt], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b[0], b[1]);
                krn_mma16816(o[dt + 1], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b[2], b[3]);
            }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv[2] = {1.0f / l0, 1.0f / l1};
    const int rows[2] = {r0, r1};
#pragma unroll
    for (int x = 0; x < 2; x++) { // row g (c0, c1), then row g + 8 (c2, c3)
        if (rows[x] >= n_q)
            continue;
        float *orow = out + (size_t)rows[x] * out_stride + (size_t)h * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
            orow[8 * dt] = o[dt][2 * x] * inv[x];
            orow[8 * dt + 1] = o[dt][2 * x + 1] * inv[x];
        }
    }
}

/* Whether the tensor-core kernel may run: unless FERRY_PREFILL_ATTN=simt. */
static bool att_mma_wanted(void)
{
    const char *e = getenv("FERRY_PREFILL_ATTN");
    return e == NULL || strcmp(e, "simt") != 0;
}

extern "C" const char *krn_attention_cuda_kernel(int head_dim, int window)
{
    return window == 0 && (head_dim == 64 || head_dim == 128) && att_mma_wanted() ? "mma" : "simt";
}

/* The tensor-core kernel where it applies (see the header); *done_p false where it does not. */
static fy_status_t att_mma_launch(float *out, int out_stride, const float *q, int q_stride,
                                  const float *k, const float *v, int n_ctx, int q_begin, int n_q,
                                  int n_heads, int group, int head_dim, float scale, int window,
                                  cudaStream_t stream, bool *done_p)
{
    *done_p = false;
    if (strcmp(krn_attention_cuda_kernel(head_dim, window), "mma") != 0 ||
        (((uintptr_t)k | (uintptr_t)v) & 15) != 0)
        return FY_OK;
    const float scale_l2 = scale * 1.4426950408889634f;
    const dim3 grid((unsigned)((n_q + MMA_BQ - 1) / MMA_BQ), (unsigned)n_heads);
    const size_t smem = att_mma_smem_bytes(head_dim); // <= 34 KiB: no attribute needed
    if (head_dim == 64)
        attn_prefill_mma_kernel<64><<<grid, MMA_WARPS * 32, smem, stream>>>(
            out, out_stride, q, q_stride, k, v, n_ctx, q_begin, n_q, group, scale_l2);
    else
        attn_prefill_mma_kernel<128><<<grid, MMA_WARPS * 32, smem, stream>>>(
            out, out_stride, q, q_stride, k, v, n_ctx, q_begin, n_q, group, scale_l2);
    *done_p = true;
    return krn_launch_status();
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
    bool done = false;
    fy_status_t mst = att_mma_launch(out, out_stride, q, q_stride, k, v, n_ctx, q_begin, n_q,
                                     n_heads, group, head_dim, scale, window, stream, &done);
    if (mst != FY_OK || done)
        return mst;
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
