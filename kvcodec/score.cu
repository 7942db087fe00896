/*
 * score.cu: token importance on the GPU, twin of score.c (kvc_score).
 *
 * Kernels, in order:
 * 1. (window queries only) the window's softmax over the tokens, in one of two ways:
 *    - mma (the default for head_dim <= 128): tensor-core logits, each query split into an FP16
 *      high and low part (two MMAs against the FP16 keys, FP32 accumulation: the logits differ
 *      from the CPU's by FP32 rounding, about 1e-6 of the sum of |q_c k_c|). A block per (kv
 *      head, 64 tokens) stages its keys once for the whole GQA group, and reads the window rows
 *      as fragments sc_frag_kernel split once for all blocks. score_stats_mma_kernel
 *      writes each row's max and sum of exp over the block's tokens, stats_combine_kernel
 *      merges them into the row's max and 1 / (W * sum), and score_attn_mma_kernel computes the
 *      logits again and sums each token's probabilities over the rows (and, for the RMS or max
 *      importance, their root mean square or maximum).
 *    - simt (FERRY_SCORE_IMPL=simt, or a wider head): row_stats_kernel, a block per (query
 *      head, window row), and attn_kernel, a thread per (query head, token), with the CPU's
 *      logits (kvc_dot's eight partial sums), each logit computed three times.
 *    Either way expf and the softmax sums are the GPU's, so the scores agree with the CPU to
 *    fp32 rounding, not bit for bit. qsq_kernel: the mean squared query per channel of each
 *    GQA group.
 * 2. group_kernel: a thread per (kv head, token) reduces its GQA group (mean, or max) in head
 *    order, and keeps the group mean pbar for the window output;
 * 3. obar_tile_kernel: a block per (kv head, 32 channels) sums pbar_t v_t over the tokens in
 *    order, one lane per channel, while the block's other warps stage the products;
 * 4. static_kernel: HybridKV's window mass on sinks + recent tokens, per kv head;
 * 5. pool_kernel: 1-D max pooling along tokens.
 * Steps 2-5 and qsq are one function per element (score_dev_int.h); a prompt of up to
 * SCORE_SMALL_ITEMS (kv head, token) items, and no more than kvc_cuda_one_launch_items, runs
 * them all in one block of one launch (score_tail_small_kernel), pbar and acc in its shared
 * memory.
 * From window_attn (the attention kernel's output) steps 2-5 repeat the CPU's arithmetic in
 * its order, so the scores are bit-identical to kvc_score.
 */
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvcodec_cuda.h"
extern "C" {
#include "kvcodec_int.h"
}
#include "kvcodec_cuda_int.h"

/* A float through FP16 (to nearest) and back; two floats as an FP16 pair, x in the low half. */
static __device__ __forceinline__ float sc_half_round(float x)
{
    return __half2float(__float2half_rn(x));
}
static __device__ __forceinline__ uint32_t sc_half_pack(float x, float y)
{
    const __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<const uint32_t *>(&h);
}

#include "score_dev_int.h"

#define ROW_THREADS 256

extern "C" fy_status_t kvc_scores_init_cuda(kvc_scores_t *s, uint32_t n_kv_heads, uint32_t n_tokens,
                                            uint32_t head_dim)
{
    if (s == NULL)
        return FY_ERR_INVALID_ARG;
    memset(s, 0, sizeof(*s));
    if (n_kv_heads == 0 || n_tokens == 0 || head_dim == 0)
        return FY_ERR_INVALID_ARG;
    s->n_kv_heads = n_kv_heads;
    s->n_tokens = n_tokens;
    s->head_dim = head_dim;
    fy_status_t st = FY_OK;
    size_t nt = (size_t)n_kv_heads * n_tokens;
    KVC_CUDA_GOTO(cudaMalloc((void **)&s->importance, nt * sizeof(float)), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&s->obar, (size_t)n_kv_heads * head_dim * sizeof(float)), st,
                  fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&s->qsq, (size_t)n_kv_heads * head_dim * sizeof(float)), st,
                  fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&s->is_static, n_kv_heads), st, fail);
    return FY_OK;
fail:
    kvc_scores_cleanup_cuda(s);
    return st;
}

extern "C" void kvc_scores_cleanup_cuda(kvc_scores_t *s)
{
    if (s == NULL)
        return;
    cudaFree(s->importance);
    cudaFree(s->obar);
    cudaFree(s->qsq);
    cudaFree(s->is_static);
    memset(s, 0, sizeof(*s));
}


/* scale * q . k_t with kvc_dot's eight partial sums (k from FP16). */
static __device__ float logit(const score_args_t &a, const float *q, uint32_t g, uint32_t t)
{
    const uint16_t *kr = a.k + (size_t)g * a.hs + (size_t)t * a.ts;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t c = 0; c < a.d; c += 8)
        for (int l = 0; l < 8; l++)
            acc[l] = kadd(acc[l], kmul(q[c + l], fy_dev_h2f_arith(kr[c + l])));
    return kmul(kvc_dev_sum8(acc), a.scale);
}

/* A block per (query head, window row): max logit and 1 / (W * sum exp(s - max)). */
__global__ void row_stats_kernel(score_args_t a, float2 *stats)
{
    __shared__ float red[ROW_THREADS];
    for (size_t row = blockIdx.x; row < (size_t)a.n_heads * a.W; row += gridDim.x) {
        uint32_t h = (uint32_t)(row / a.W), w = (uint32_t)(row % a.W);
        uint32_t g = h / a.grp, pos = a.n - a.W + w;
        const float *q = a.q + ((size_t)h * a.qs + w) * a.d;
        float m = -INFINITY;
        for (uint32_t t = threadIdx.x; t <= pos; t += blockDim.x) {
            float s = logit(a, q, g, t);
            m = s > m ? s : m;
        }
        red[threadIdx.x] = m;
        __syncthreads();
        for (uint32_t off = blockDim.x / 2; off > 0; off >>= 1) {
            if (threadIdx.x < off)
                red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + off]);
            __syncthreads();
        }
        m = red[0];
        __syncthreads();
        float sum = 0;
        for (uint32_t t = threadIdx.x; t <= pos; t += blockDim.x)
            sum += expf(logit(a, q, g, t) - m);
        red[threadIdx.x] = sum;
        __syncthreads();
        for (uint32_t off = blockDim.x / 2; off > 0; off >>= 1) {
            if (threadIdx.x < off)
                red[threadIdx.x] += red[threadIdx.x + off];
            __syncthreads();
        }
        if (threadIdx.x == 0)
            stats[row] = make_float2(m, 1.0f / (red[0] * (float)a.W));
        __syncthreads();
    }
}

/* A thread per (query head, token): sum over the window rows that see the token; with imp
 * KVC_IMP_RMS also the root of the mean p^2 (ah2), with KVC_IMP_MAX the largest p, as score.c. */
__global__ void attn_kernel(score_args_t a, const float2 *stats, int imp, float *ah, float *ah2)
{
    size_t total = (size_t)a.n_heads * a.n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)(i / a.n), t = (uint32_t)(i % a.n);
        uint32_t g = h / a.grp;
        float acc = 0, acc2 = 0;
        for (uint32_t w = 0; w < a.W; w++) {
            if (t > a.n - a.W + w)
                continue; // causal: row w sees tokens up to its position
            float2 st = stats[(size_t)h * a.W + w];
            float s = logit(a, a.q + ((size_t)h * a.qs + w) * a.d, g, t);
            float e = expf(s - st.x);
            acc = kadd(acc, kmul(e, st.y));
            if (imp != KVC_IMP_MEAN) {
                float pr = kmul(kmul(e, st.y), (float)a.W); // e / sum
                if (imp == KVC_IMP_RMS)
                    acc2 = kadd(acc2, kdiv(kmul(pr, pr), (float)a.W));
                else
                    acc2 = pr > acc2 ? pr : acc2;
            }
        }
        ah[i] = acc;
        if (imp != KVC_IMP_MEAN)
            ah2[i] = imp == KVC_IMP_RMS ? sqrtf(acc2) : acc2;
    }
}

/* ---- Tensor-core window softmax (the mma path) ------------------------------------------- */

#define SC_TT         64 // tokens per block (FERRY_SCORE_TT=128: 128, for timing the two)
#define SC_WARPS 8  // warps per block; warp w takes the m-tiles (16 window rows) w, w + 8, ...
#define SC_MIN_BLOCKS 264 // blocks the window softmax kernels aim for (two per SM of an H100)
// (SC_KS, score_dev_int.h: one instance for every head_dim up to 128, narrower heads padded
// with zero channels; the exponentials, not the MMAs, were thought to bound these kernels; it
// keeps the device code that every program linking the kvcodec carries small.)

static __device__ __forceinline__ void sc_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Words (FP16 channel pairs) per staged key row: KS * 16 channels, 4 words of padding, so the
 * 8 tokens x 4 channel pairs of one B fragment load fall in 32 different banks. */
template <int KS> struct sc_tile {
    static constexpr uint32_t RW = KS * 8 + 4;
};

/* Keys of tokens [t0, t0 + TT) of kv head g into ks, channels past d and tokens past n 0, by a
 * block of SC_WARPS warps: a thread's chunks all loaded before the first is stored (one memory
 * latency a block, not one per chunk). */
template <int KS, int TT>
static __device__ void sc_stage_keys(const score_args_t &a, uint32_t g, uint32_t t0, uint32_t *ks)
{
    constexpr uint32_t RW = sc_tile<KS>::RW, C8 = KS * 2; // 8-channel chunks per row
    constexpr uint32_t N = TT * C8, T = SC_WARPS * 32, PER = (N + T - 1) / T;
    const uint16_t *kh = a.k + (size_t)g * a.hs;
    uint4 v[PER];
#pragma unroll
    for (uint32_t u = 0; u < PER; u++) {
        const uint32_t i = threadIdx.x + u * T, tt = i / C8, c = 8 * (i % C8), t = t0 + tt;
        v[u] = make_uint4(0, 0, 0, 0);
        if (i < N && t < a.n && c < a.d) { // d % 8 == 0: the whole chunk is in the row
            const uint16_t *p = kh + (size_t)t * a.ts + c;
            if (a.vec) {
                v[u] = *reinterpret_cast<const uint4 *>(p);
            } else {
                v[u].x = (uint32_t)p[0] | (uint32_t)p[1] << 16;
                v[u].y = (uint32_t)p[2] | (uint32_t)p[3] << 16;
                v[u].z = (uint32_t)p[4] | (uint32_t)p[5] << 16;
                v[u].w = (uint32_t)p[6] | (uint32_t)p[7] << 16;
            }
        }
    }
#pragma unroll
    for (uint32_t u = 0; u < PER; u++) {
        const uint32_t i = threadIdx.x + u * T, tt = i / C8, c = 8 * (i % C8);
        if (i < N)
            *reinterpret_cast<uint4 *>(ks + tt * RW + c / 2) = v[u];
    }
}

/* sc_frag_make for every (query head, m-tile), a warp each (blocks of 256 threads). */
__global__ void __launch_bounds__(256)
    sc_frag_kernel(score_args_t a, uint32_t tiles, sc_frag_t *frag)
{
    const uint32_t i = blockIdx.x * 8 + threadIdx.x / 32, MT = (a.W + 15) / 16;
    if (i < tiles)
        sc_frag_make(a, i / MT, i % MT, threadIdx.x % 32, frag);
}

/* Lane `lane`'s A fragments of m-tile mt of query head h (sc_frag_make's), two 16-byte loads a
 * k step: a warp reads its tile as whole lines. */
template <int KS>
static __device__ __forceinline__ void sc_load_a(const score_args_t &a, const sc_frag_t *frag,
                                                 uint32_t h, uint32_t mt, uint32_t lane,
                                                 uint32_t (&hi)[KS][4], uint32_t (&lo)[KS][4])
{
#pragma unroll
    for (int s = 0; s < KS; s++) {
        const sc_frag_t *f = frag + sc_frag_at(a.W, h, mt, (uint32_t)s, lane);
        const uint4 x = __ldg(&f->hi), y = __ldg(&f->lo);
        hi[s][0] = x.x, hi[s][1] = x.y, hi[s][2] = x.z, hi[s][3] = x.w;
        lo[s][0] = y.x, lo[s][1] = y.y, lo[s][2] = y.z, lo[s][3] = y.w;
    }
}

/* Logits of one m-tile's 16 rows against the 8 staged tokens of n-tile j: c[0], c[1] row gq,
 * tokens 2 tq, 2 tq + 1; c[2], c[3] row gq + 8. Each k step (16 channels, high and low part)
 * is its own MMA chain from zero and the steps are added in FP32 with round-to-nearest: the
 * tensor core's accumulation (which may truncate) then sees only 16 channels' sums, and the
 * steps are independent of one another. */
template <int KS>
static __device__ __forceinline__ void sc_logits(const uint32_t *ks, uint32_t j, uint32_t gq,
                                                 uint32_t tq, const uint32_t (&hi)[KS][4],
                                                 const uint32_t (&lo)[KS][4], float (&c)[4])
{
    constexpr uint32_t RW = sc_tile<KS>::RW;
    const uint32_t *row = ks + (8 * j + gq) * RW + tq;
    c[0] = c[1] = c[2] = c[3] = 0.0f;
#pragma unroll
    for (int s = 0; s < KS; s++) {
        const uint32_t b0 = row[8 * s], b1 = row[8 * s + 4];
        float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        sc_mma(t, lo[s], b0, b1);
        sc_mma(t, hi[s], b0, b1);
#pragma unroll
        for (int i = 0; i < 4; i++)
            c[i] += t[i];
    }
}

/* (m, z) of a row merged with (m2, z2): the larger max, the sums rescaled to it. */
static __device__ __forceinline__ void sc_merge(float &m, float &z, float m2, float z2)
{
    const float M = fmaxf(m, m2);
    if (M == -INFINITY)
        return;
    z = (m == -INFINITY ? 0.0f : z * __expf(m - M)) +
        (m2 == -INFINITY ? 0.0f : z2 * __expf(m2 - M));
    m = M;
}

/* Whether window row w sees token t: the row is in the window and the token is in the prompt
 * at or before the row's position n - W + w. */
static __device__ __forceinline__ bool sc_sees(const score_args_t &a, uint32_t w, uint32_t t)
{
    return w < a.W && t < a.n && t <= a.n - a.W + w;
}

/* Pass 1, a block per (TT tokens, kv head, share of the group's query heads: heads z, z +
 * gridDim.z, ...; more than one share only when tiles x kv heads leave SMs idle, and each head's
 * arithmetic is the same whatever its block): for every query head of its share and window row,
 * the max logit over the block's tokens the row sees and the sum of exp(s - max) into
 * part[(h * W + w) * n_tiles + tile] (-inf and 0 when it sees none). */
template <int KS, int TT>
__global__ void __launch_bounds__(SC_WARPS * 32)
    score_stats_mma_kernel(score_args_t a, const sc_frag_t *frag, float2 *part, uint32_t n_tiles)
{
    __shared__ __align__(16) uint32_t ks[TT * sc_tile<KS>::RW];
    const uint32_t tile = blockIdx.x, g = blockIdx.y, t0 = tile * TT;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane >> 2, tq = lane & 3;
    sc_stage_keys<KS, TT>(a, g, t0, ks);
    __syncthreads();
    const uint32_t MT = (a.W + 15) / 16;
    for (uint32_t hh = blockIdx.z; hh < a.grp; hh += gridDim.z) {
        const uint32_t h = g * a.grp + hh;
        for (uint32_t mt = warp; mt < MT; mt += SC_WARPS) {
            uint32_t hi[KS][4], lo[KS][4];
            sc_load_a<KS>(a, frag, h, mt, lane, hi, lo);
            float m[2] = {-INFINITY, -INFINITY}, z[2] = {0.0f, 0.0f};
#pragma unroll 1
            for (uint32_t j = 0; j < TT / 8 && t0 + 8 * j < a.n; j++) { // warp-uniform
                float c[4];
                sc_logits<KS>(ks, j, gq, tq, hi, lo, c);
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const uint32_t w = 16 * mt + gq + 8 * r, t = t0 + 8 * j + 2 * tq;
                    const float v0 = sc_sees(a, w, t) ? c[2 * r] : -INFINITY;
                    const float v1 = sc_sees(a, w, t + 1) ? c[2 * r + 1] : -INFINITY;
                    const float mx = fmaxf(m[r], fmaxf(v0, v1));
                    if (mx == -INFINITY)
                        continue;
                    float zz = m[r] == -INFINITY ? 0.0f : z[r] * __expf(m[r] - mx);
                    zz += (v0 == -INFINITY ? 0.0f : expf(v0 - mx)) +
                          (v1 == -INFINITY ? 0.0f : expf(v1 - mx));
                    m[r] = mx;
                    z[r] = zz;
                }
            }
            // The 4 lanes of a row hold its tokens between them.
#pragma unroll
            for (int r = 0; r < 2; r++) {
#pragma unroll
                for (int off = 1; off < 4; off <<= 1) {
                    const float m2 = __shfl_xor_sync(0xffffffffu, m[r], off);
                    const float z2 = __shfl_xor_sync(0xffffffffu, z[r], off);
                    sc_merge(m[r], z[r], m2, z2);
                }
                const uint32_t w = 16 * mt + gq + 8 * r;
                if (tq == 0 && w < a.W)
                    part[((size_t)h * a.W + w) * n_tiles + tile] = make_float2(m[r], z[r]);
            }
        }
    }
}

/* A warp per window row (rows = n_heads * W): the blocks' partial (max, sum) merged into the
 * row's max and 1 / (W * sum), as row_stats_kernel leaves them. */
__global__ void stats_combine_kernel(const float2 *part, size_t rows, uint32_t n_tiles, uint32_t W,
                                     float2 *stats)
{
    const uint32_t lane = threadIdx.x % 32;
    const size_t warps = (size_t)gridDim.x * (blockDim.x / 32);
    for (size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < rows;
         row += warps) {
        float m = -INFINITY, z = 0.0f;
        for (uint32_t i = lane; i < n_tiles; i += 32) {
            const float2 p = part[row * n_tiles + i];
            sc_merge(m, z, p.x, p.y);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
            const float z2 = __shfl_xor_sync(0xffffffffu, z, off);
            sc_merge(m, z, m2, z2);
        }
        if (lane == 0) // every row sees token 0, so z >= 1
            stats[row] = make_float2(m, 1.0f / (z * (float)W));
    }
}

/* Pass 2, a block per (TT tokens, kv head, share of the heads, as pass 1): the logits again,
 * and for every query head of its share and token the sum over the window rows of p = exp(s - max)
 * / (W * sum) into ah (and, for the RMS or max importance, the root mean square or maximum of W p
 * into ah2), as attn_kernel. */
template <int KS, int TT>
__global__ void __launch_bounds__(SC_WARPS * 32)
    score_attn_mma_kernel(score_args_t a, const sc_frag_t *frag, const float2 *stats, int imp,
                          float *ah, float *ah2)
{
    __shared__ __align__(16) uint32_t ks[TT * sc_tile<KS>::RW];
    __shared__ float red[2][SC_WARPS][TT]; // per warp: its rows' sums (maxima) per token
    const uint32_t tile = blockIdx.x, g = blockIdx.y, t0 = tile * TT;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane >> 2, tq = lane & 3;
    sc_stage_keys<KS, TT>(a, g, t0, ks);
    __syncthreads();
    const uint32_t MT = (a.W + 15) / 16;
    const float fw = (float)a.W;
    for (uint32_t hh = blockIdx.z; hh < a.grp; hh += gridDim.z) {
        const uint32_t h = g * a.grp + hh;
        for (uint32_t i = lane; i < TT; i += 32)
            red[0][warp][i] = red[1][warp][i] = 0.0f;
        __syncwarp();
        for (uint32_t mt = warp; mt < MT; mt += SC_WARPS) {
            uint32_t hi[KS][4], lo[KS][4];
            sc_load_a<KS>(a, frag, h, mt, lane, hi, lo);
            float2 st[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const uint32_t w = 16 * mt + gq + 8 * r;
                st[r] = w < a.W ? stats[(size_t)h * a.W + w] : make_float2(0.0f, 0.0f);
            }
#pragma unroll 1
            for (uint32_t j = 0; j < TT / 8 && t0 + 8 * j < a.n; j++) { // warp-uniform
                float c[4];
                sc_logits<KS>(ks, j, gq, tq, hi, lo, c);
                float acc[2] = {0.0f, 0.0f}, acc2[2] = {0.0f, 0.0f};
#pragma unroll
                for (int r = 0; r < 2; r++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const uint32_t w = 16 * mt + gq + 8 * r, t = t0 + 8 * j + 2 * tq + e;
                        if (!sc_sees(a, w, t))
                            continue;
                        const float p = kmul(expf(c[2 * r + e] - st[r].x), st[r].y);
                        acc[e] = kadd(acc[e], p);
                        if (imp == KVC_IMP_RMS) {
                            const float pr = kmul(p, fw);
                            acc2[e] = kadd(acc2[e], kdiv(kmul(pr, pr), fw));
                        } else if (imp == KVC_IMP_MAX) {
                            acc2[e] = fmaxf(acc2[e], kmul(p, fw));
                        }
                    }
                }
                // The n-tile's 16 rows: the 8 row lanes of each token, then into the warp's sums.
#pragma unroll
                for (int e = 0; e < 2; e++) {
#pragma unroll
                    for (int off = 4; off < 32; off <<= 1) {
                        acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], off);
                        const float o2 = __shfl_xor_sync(0xffffffffu, acc2[e], off);
                        acc2[e] = imp == KVC_IMP_MAX ? fmaxf(acc2[e], o2) : acc2[e] + o2;
                    }
                    if (gq == 0) {
                        const uint32_t k = 8 * j + 2 * tq + e;
                        red[0][warp][k] += acc[e];
                        red[1][warp][k] = imp == KVC_IMP_MAX ? fmaxf(red[1][warp][k], acc2[e])
                                                             : red[1][warp][k] + acc2[e];
                    }
                }
            }
        }
        __syncthreads();
        const uint32_t t = t0 + threadIdx.x;
        if (threadIdx.x < TT && t < a.n) {
            float s = 0.0f, s2 = 0.0f;
#pragma unroll
            for (int w = 0; w < SC_WARPS; w++) {
                s += red[0][w][threadIdx.x];
                s2 = imp == KVC_IMP_MAX ? fmaxf(s2, red[1][w][threadIdx.x])
                                        : s2 + red[1][w][threadIdx.x];
            }
            ah[(size_t)h * a.n + t] = s;
            if (imp != KVC_IMP_MEAN)
                ah2[(size_t)h * a.n + t] = imp == KVC_IMP_RMS ? sqrtf(s2) : s2;
        }
        __syncthreads(); // red is written again for the next head
    }
}

/* Which window-softmax kernels run: "mma" where the head fits its fragments (head_dim <= 128),
 * unless FERRY_SCORE_IMPL=simt. */
static bool score_use_mma(uint32_t d)
{
    const char *e = getenv("FERRY_SCORE_IMPL");
    return d <= SC_KS * 16 && !(e != NULL && strcmp(e, "simt") == 0);
}

/* qsq_one for every (kv head, channel), a thread each. */
__global__ void qsq_kernel(score_args_t a, float *qsq)
{
    size_t total = (size_t)a.n_kv * a.d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        qsq[i] = qsq_one(a, i);
}

/* group_one for every (kv head, token), a thread each. */
__global__ void group_kernel(score_args_t a, const float *ah, const float *ah2, int have_q,
                             int reduce_max, float *pbar, float *acc_out)
{
    size_t total = (size_t)a.n_kv * a.n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        group_one(a, i, ah, ah2, have_q, reduce_max, &pbar[i], &acc_out[i]);
}

/* obar_tile_body (score_dev_int.h). */
__global__ void __launch_bounds__(OBAR_THREADS)
    obar_tile_kernel(score_args_t a, const float *pbar, float *obar)
{
    __shared__ float tile[2][OBAR_T][33];
    obar_tile_body(a, pbar, obar, tile);
}

/* static_one for every kv head, a thread each. */
__global__ void static_kernel(score_args_t a, const float *pbar, int active, uint32_t sinks,
                              uint32_t recent, float threshold, uint8_t *is_static)
{
    for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < a.n_kv;
         g += gridDim.x * blockDim.x)
        is_static[g] = static_one(a, pbar, active, sinks, recent, threshold, g);
}

/* pool_one for every (kv head, token), a thread each. */
__global__ void pool_kernel(score_args_t a, const float *acc, uint32_t kernel, float *imp)
{
    size_t total = (size_t)a.n_kv * a.n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        imp[i] = pool_one(a, acc, kernel, i);
}

/* score_tail_small as a kernel: one block of 256 threads, 2 n_kv n floats of dynamic shared
 * memory (pbar, then acc). */
__global__ void __launch_bounds__(256)
    score_tail_small_kernel(score_args_t a, const float *ah, const float *ah2, score_tail_t p,
                            float *qsq, float *obar, uint8_t *is_static, float *imp)
{
    extern __shared__ float sc_tail[];
    score_tail_small(a, ah, ah2, p, sc_tail, sc_tail + (size_t)a.n_kv * a.n, qsq, obar, is_static,
                     imp);
}

extern "C" fy_status_t kvc_score_cuda(const kvc_policy_t *policy, uint32_t n_heads, uint32_t n_kv,
                                      uint32_t n, uint32_t d, const kvc_layer_input_t *in,
                                      kvc_scores_t *out, void *stream)
{
    if (!policy || !in || !out || n_kv == 0 || n_heads == 0 || n_heads % n_kv || n == 0 || d == 0 ||
        d % 8 || d > KVC_MAX_HEAD_DIM || !in->k || !in->v)
        return FY_ERR_INVALID_ARG;
    if (out->n_kv_heads != n_kv || out->n_tokens != n || out->head_dim != d || !out->importance ||
        !out->obar || !out->qsq || !out->is_static)
        return FY_ERR_INVALID_ARG;
    bool have_q = in->q_window != NULL && in->n_window > 0;
    if (have_q && in->n_window > n)
        return FY_ERR_INVALID_ARG;
    cudaStream_t cs = (cudaStream_t)stream;
    score_args_t a;
    memset(&a, 0, sizeof(a));
    a.k = in->k;
    a.v = in->v;
    a.hs = in->head_stride;
    a.ts = in->token_stride;
    a.q = have_q ? in->q_window : NULL;
    a.wa = have_q ? NULL : in->window_attn;
    a.n_heads = n_heads;
    a.n_kv = n_kv;
    a.grp = n_heads / n_kv;
    a.n = n;
    a.d = d;
    a.W = a.qs = have_q ? in->n_window : 0;
    // window_div: a short prompt is scored from its last max(32, n / window_div) queries, as
    // score.c does (the oldest rows are skipped).
    if (have_q && policy->window_div > 0) {
        uint32_t cap = n / policy->window_div > 32u ? n / policy->window_div : 32u;
        if (a.W > cap) {
            a.q += (size_t)(a.W - cap) * d;
            a.W = cap;
        }
    }
    a.scale = 1.0f / sqrtf((float)d);
    a.vec = (uintptr_t)in->k % 16 == 0 && a.hs % 8 == 0 && a.ts % 8 == 0;
    size_t items = (size_t)n_kv * n;
    float *pbar = NULL, *acc = NULL, *ah = NULL, *ah2 = NULL;
    const int imp = have_q ? (int)policy->importance : KVC_IMP_MEAN; // score.c: needs queries
    float2 *stats = NULL, *part = NULL;
    sc_frag_t *frag = NULL;
    fy_status_t st = FY_OK;
    bool pools = kvc_cuda_pools();
    // A short prompt's tail runs in one block, pbar and acc in its shared memory.
    const bool small = items <= SCORE_SMALL_ITEMS && items <= kvc_cuda_one_launch_items();
    const score_tail_t tail = {
        have_q, policy->reduce == KVC_REDUCE_MAX,
        policy->hybrid_threshold > 0 && (have_q || in->window_attn != NULL),
        policy->sinks, policy->recent, policy->pool_kernel, policy->hybrid_threshold};
    if (!small) {
        KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&pbar, items * sizeof(float), cs, pools), st,
                      out);
        KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&acc, items * sizeof(float), cs, pools), st,
                      out);
    }
    if (have_q) {
        KVC_CUDA_GOTO(
            kvc_cuda_scratch_alloc((void **)&ah, (size_t)n_heads * n * sizeof(float), cs, pools),
            st, out);
        KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&stats,
                                             (size_t)n_heads * a.W * sizeof(float2), cs, pools),
                      st, out);
        if (imp != KVC_IMP_MEAN)
            KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&ah2, (size_t)n_heads * n * sizeof(float),
                                                 cs, pools),
                          st, out);
        if (score_use_mma(d)) {
            const uint32_t tt =
                kvc_cuda_knob("FERRY_SCORE_TT", 128, 128, SC_TT) == 128 ? 128 : SC_TT;
            uint32_t n_tiles = (n + tt - 1) / tt;
            size_t rows = (size_t)n_heads * a.W;
            KVC_CUDA_GOTO(
                kvc_cuda_scratch_alloc((void **)&part, rows * n_tiles * sizeof(float2), cs, pools),
                st, out);
            // A short prompt has few (tile, kv head) blocks: the group's heads are shared out
            // over more blocks, up to one each, until the grid covers the GPU.
            uint32_t shares = 1;
            while (shares < a.grp && (size_t)n_tiles * n_kv * shares < SC_MIN_BLOCKS)
                shares *= 2;
            dim3 grid(n_tiles, n_kv, shares < a.grp ? shares : a.grp);
            // The window rows split into FP16 fragments once for both passes and every block.
            const uint32_t frag_tiles = n_heads * ((a.W + 15) / 16);
            KVC_CUDA_GOTO(
                kvc_cuda_scratch_alloc(
                    (void **)&frag, (size_t)frag_tiles * SC_KS * 32 * sizeof(sc_frag_t), cs, pools),
                st, out);
            sc_frag_kernel<<<kvc_grid(frag_tiles, 8), 256, 0, cs>>>(a, frag_tiles, frag);
            KVC_LAUNCH_GOTO(st, out);
            if (tt == 128)
                score_stats_mma_kernel<SC_KS, 128>
                    <<<grid, SC_WARPS * 32, 0, cs>>>(a, frag, part, n_tiles);
            else
                score_stats_mma_kernel<SC_KS, SC_TT>
                    <<<grid, SC_WARPS * 32, 0, cs>>>(a, frag, part, n_tiles);
            KVC_LAUNCH_GOTO(st, out);
            stats_combine_kernel<<<kvc_grid(rows, 8), 256, 0, cs>>>(part, rows, n_tiles, a.W,
                                                                    stats);
            KVC_LAUNCH_GOTO(st, out);
            if (tt == 128)
                score_attn_mma_kernel<SC_KS, 128>
                    <<<grid, SC_WARPS * 32, 0, cs>>>(a, frag, stats, imp, ah, ah2);
            else
                score_attn_mma_kernel<SC_KS, SC_TT>
                    <<<grid, SC_WARPS * 32, 0, cs>>>(a, frag, stats, imp, ah, ah2);
            KVC_LAUNCH_GOTO(st, out);
        } else {
            row_stats_kernel<<<kvc_grid((size_t)n_heads * a.W, 1), ROW_THREADS, 0, cs>>>(a, stats);
            KVC_LAUNCH_GOTO(st, out);
            attn_kernel<<<kvc_grid((size_t)n_heads * n, 256), 256, 0, cs>>>(a, stats, imp, ah, ah2);
            KVC_LAUNCH_GOTO(st, out);
        }
    }
    if (small) {
        score_tail_small_kernel<<<1, 256, 2 * items * sizeof(float), cs>>>(
            a, ah, ah2, tail, out->qsq, out->obar, out->is_static, out->importance);
        KVC_LAUNCH_GOTO(st, out);
        goto out;
    }
    qsq_kernel<<<kvc_grid((size_t)n_kv * d, 128), 128, 0, cs>>>(a, out->qsq);
    KVC_LAUNCH_GOTO(st, out);
    group_kernel<<<kvc_grid(items, 256), 256, 0, cs>>>(a, ah, ah2, have_q, tail.reduce_max, pbar,
                                                       acc);
    KVC_LAUNCH_GOTO(st, out);
    obar_tile_kernel<<<n_kv *((d + 31) / 32), OBAR_THREADS, 0, cs>>>(a, pbar, out->obar);
    KVC_LAUNCH_GOTO(st, out);
    static_kernel<<<kvc_grid(n_kv, 64), 64, 0, cs>>>(a, pbar, tail.static_active, tail.sinks,
                                                     tail.recent, tail.threshold, out->is_static);
    KVC_LAUNCH_GOTO(st, out);
    pool_kernel<<<kvc_grid(items, 256), 256, 0, cs>>>(a, acc, tail.pool_kernel, out->importance);
    KVC_LAUNCH_GOTO(st, out);
out: // scratch goes back to the stream's pool once the kernels are done
    void *scratch[7] = {pbar, acc, ah, ah2, stats, part, frag};
    for (int i = 0; i < 7; i++) {
        if (scratch[i] == NULL)
            continue;
        cudaError_t e = kvc_cuda_scratch_free(scratch[i], cs, pools);
        if (e != cudaSuccess && st == FY_OK)
            st = kvc_cuda_status(e);
    }
    return st;
}

/* Bytes of a strided [n_kv][n][d] FP16 tensor, from its first element to past its last. */
static size_t span_bytes(uint32_t n_kv, uint32_t n, uint32_t d, size_t hs, size_t ts)
{
    return ((size_t)(n_kv - 1) * hs + (size_t)(n - 1) * ts + d) * sizeof(uint16_t);
}

extern "C" fy_status_t kvc_score_cuda_host(const kvc_policy_t *policy, uint32_t n_heads,
                                           uint32_t n_kv, uint32_t n, uint32_t d,
                                           const kvc_layer_input_t *in, kvc_scores_t *out)
{
    if (!policy || !in || !out || n_kv == 0 || n_heads == 0 || n == 0 || d == 0 || !in->k ||
        !in->v || out->n_kv_heads != n_kv || out->n_tokens != n || out->head_dim != d)
        return FY_ERR_INVALID_ARG;
    bool have_q = in->q_window != NULL && in->n_window > 0;
    size_t kv_bytes = span_bytes(n_kv, n, d, in->head_stride, in->token_stride);
    size_t q_bytes = have_q ? (size_t)n_heads * in->n_window * d * sizeof(float) : 0;
    size_t wa_bytes = !have_q && in->window_attn ? (size_t)n_heads * n * sizeof(float) : 0;
    size_t nt = (size_t)n_kv * n, nd = (size_t)n_kv * d;
    uint16_t *dk = NULL, *dv = NULL;
    float *dq = NULL, *dwa = NULL;
    kvc_scores_t dsc;
    memset(&dsc, 0, sizeof(dsc));
    fy_status_t st = FY_OK;
    KVC_CUDA_GOTO(cudaMalloc((void **)&dk, kv_bytes), st, out);
    KVC_CUDA_GOTO(cudaMalloc((void **)&dv, kv_bytes), st, out);
    KVC_CUDA_GOTO(cudaMemcpy(dk, in->k, kv_bytes, cudaMemcpyHostToDevice), st, out);
    KVC_CUDA_GOTO(cudaMemcpy(dv, in->v, kv_bytes, cudaMemcpyHostToDevice), st, out);
    if (q_bytes > 0) {
        KVC_CUDA_GOTO(cudaMalloc((void **)&dq, q_bytes), st, out);
        KVC_CUDA_GOTO(cudaMemcpy(dq, in->q_window, q_bytes, cudaMemcpyHostToDevice), st, out);
    }
    if (wa_bytes > 0) {
        KVC_CUDA_GOTO(cudaMalloc((void **)&dwa, wa_bytes), st, out);
        KVC_CUDA_GOTO(cudaMemcpy(dwa, in->window_attn, wa_bytes, cudaMemcpyHostToDevice), st, out);
    }
    if ((st = kvc_scores_init_cuda(&dsc, n_kv, n, d)) != FY_OK)
        goto out;
    {
        kvc_layer_input_t din = *in;
        din.k = dk;
        din.v = dv;
        din.q_window = dq;
        din.window_attn = dwa;
        if ((st = kvc_score_cuda(policy, n_heads, n_kv, n, d, &din, &dsc, NULL)) != FY_OK)
            goto out;
    }
    KVC_CUDA_GOTO(
        cudaMemcpy(out->importance, dsc.importance, nt * sizeof(float), cudaMemcpyDeviceToHost), st,
        out);
    KVC_CUDA_GOTO(cudaMemcpy(out->obar, dsc.obar, nd * sizeof(float), cudaMemcpyDeviceToHost), st,
                  out);
    KVC_CUDA_GOTO(cudaMemcpy(out->qsq, dsc.qsq, nd * sizeof(float), cudaMemcpyDeviceToHost), st,
                  out);
    KVC_CUDA_GOTO(cudaMemcpy(out->is_static, dsc.is_static, n_kv, cudaMemcpyDeviceToHost), st, out);
out:
    kvc_scores_cleanup_cuda(&dsc);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dq);
    cudaFree(dwa);
    return st;
}
