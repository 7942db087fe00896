/*
 * paged_attention.cu: decode attention over the FP16 paged KV cache on the GPU (CUDA twin of
 * paged_attention.c), batched over sequences, flash-decoding style:
 *
 * 1. split kernel, one block per (split of PA_SPLIT tokens, kv head, sequence): the group's
 *    query heads (scaled) sit in shared memory; each warp scores whole tokens, PA_R at a time
 *    (the lanes hold head_dim / 32 channels of the keys in registers and reduce one dot product
 *    per query head);
 *    then a max-subtracted softmax per head over the split, and the weighted value sum
 *    (threads over (head, channel), reading value rows of the split in order, coalesced).
 *    It writes the unnormalized output, max and sum of the split.
 * 2. combine kernel, one block per (query head, sequence): rescales the splits to a common max
 *    and divides by the total sum.
 * Page ids are checked against the pool size; a token whose page id is out of range is left
 * out rather than read.
 *
 * Also the store kernel that writes new K and V (FP32 -> FP16) into their page slots.
 */
#include <math.h>

#include "cuda_int.h"

enum {
    PA_THREADS = 128,
    PA_WARPS = PA_THREADS / 32,
    PA_MAX_SPLIT = 256,
    PA_MAX_C = 8, // head_dim / 32 (head_dim <= 256)
    PA_MAX_GROUP = 32,
    PA_MIN_BLOCKS = 264, // two per SM of an H100
    PA_R = 4,            // tokens whose key rows a warp loads together
    PA_V = 8,            // value rows a thread loads together
};

/* Tokens per split: the scores of the split ([group][split] floats) stay within 8 KB; halved
 * (down to 32) while the grid has fewer than PA_MIN_BLOCKS blocks, since a block's work is a
 * chain of dependent loads and a small batch would otherwise leave most SMs idle. */
static int pa_split(int group, int n_seqs, int n_kv_heads, int max_tokens)
{
    int s = (2048 / group) / 32 * 32;
    s = s < 32 ? 32 : (s > PA_MAX_SPLIT ? PA_MAX_SPLIT : s);
    while (s > 32 && (int64_t)n_seqs * n_kv_heads * ((max_tokens + s - 1) / s) < PA_MIN_BLOCKS)
        s /= 2;
    return s;
}

static __device__ __forceinline__ size_t pa_slot(const krn_paged_cuda_t c, int b, int kvh,
                                                 int t, bool *ok)
{
    int pi = t / c.page_tokens, slot = t % c.page_tokens;
    *ok = false;
    if (pi >= c.max_pages)
        return 0;
    int32_t pid = c.page_ids[(size_t)b * c.ids_seq_stride + (size_t)kvh * c.max_pages + pi];
    if (pid < 0 || pid >= c.n_pages)
        return 0;
    *ok = true;
    // The key row; its value row is page_tokens rows further on.
    return (size_t)pid * c.page_elems + (size_t)slot * c.head_dim;
}

__global__ void __launch_bounds__(PA_THREADS)
    paged_split_kernel(float *po, float *pm, float *pl, const float *q, int ldq, int n_heads,
                       int group, float scale, krn_paged_cuda_t c, const int32_t *n_tokens,
                       int split, int n_splits)
{
    extern __shared__ float smem[];
    __shared__ size_t rowoff[PA_MAX_SPLIT]; // k row offset of each token of the split
    __shared__ bool rowok[PA_MAX_SPLIT];
    const int hd = c.head_dim;
    float *qs = smem;              // [group][hd], scaled
    float *sc = qs + group * hd;   // [group][split] scores, then probabilities
    const int sp = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_tok = n_tokens[b];
    const int t0 = sp * split;
    const int len = min(split, n_tok - t0);
    const size_t part = ((size_t)b * n_heads + (size_t)kvh * group) * n_splits + sp;
    if (len <= 0) {
        // Nothing to attend in this split (a shorter sequence of the batch).
        for (int idx = threadIdx.x; idx < group * hd; idx += blockDim.x) {
            int g = idx / hd, d = idx % hd;
            po[(part + (size_t)g * n_splits) * hd + d] = 0.0f;
        }
        for (int g = threadIdx.x; g < group; g += blockDim.x) {
            pm[part + (size_t)g * n_splits] = -INFINITY;
            pl[part + (size_t)g * n_splits] = 0.0f;
        }
        return;
    }
    // The split's row offsets first, a thread per token: one page-table latency for all of them
    // (a warp used to look up each of its tokens in turn, then wait for its key row).
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        bool ok;
        size_t off = pa_slot(c, b, kvh, t0 + j, &ok);
        rowoff[j] = off;
        rowok[j] = ok;
    }
    for (int idx = threadIdx.x; idx < group * hd; idx += blockDim.x) {
        int g = idx / hd, d = idx % hd;
        qs[idx] = q[(size_t)b * ldq + (size_t)(kvh * group + g) * hd + d] * scale;
    }
    __syncthreads();
    // A 0 the compiler cannot know: every loaded half of a batch is folded into its first
    // through it, so that the whole batch has landed before any of it is used (left to itself,
    // ptxas issues each load just ahead of its use).
    const uint32_t zero = (uint32_t)c.n_pages >> 31;
    // Scores: a warp takes PA_R tokens at a time and loads their key rows before it scores the
    // first (the same products and sums per token as one at a time).
    for (int j0 = warp * PA_R; j0 < len; j0 += PA_WARPS * PA_R) {
        uint32_t kraw[PA_R][PA_MAX_C], fold = 0;
#pragma unroll
        for (int r = 0; r < PA_R; r++) {
            const int j = j0 + r;
            const bool ok = j < len && rowok[j];
            const uint16_t *kr = c.pool + (ok ? rowoff[j] : 0);
#pragma unroll
            for (int cc = 0; cc < PA_MAX_C; cc++) {
                int d = lane + 32 * cc;
                kraw[r][cc] = ok && d < hd ? kr[d] : 0u;
                fold ^= kraw[r][cc];
            }
        }
        kraw[0][0] ^= fold & zero;
#pragma unroll
        for (int r = 0; r < PA_R; r++) {
            const int j = j0 + r;
            if (j >= len) // warp-uniform
                break;
            if (!rowok[j]) { // warp-uniform
                for (int g = lane; g < group; g += 32)
                    sc[g * split + j] = -INFINITY;
                continue;
            }
            float kreg[PA_MAX_C];
#pragma unroll
            for (int cc = 0; cc < PA_MAX_C; cc++) {
                int d = lane + 32 * cc;
                kreg[cc] = d < hd ? krn_h2f((uint16_t)kraw[r][cc]) : 0.0f;
            }
            for (int g = 0; g < group; g++) {
                float s = 0.0f;
                for (int cc = 0; cc < PA_MAX_C; cc++) {
                    int d = lane + 32 * cc;
                    if (d < hd)
                        s += qs[g * hd + d] * kreg[cc];
                }
                for (int o = 16; o > 0; o >>= 1)
                    s += __shfl_xor_sync(0xffffffffu, s, o);
                if (lane == 0)
                    sc[g * split + j] = s;
            }
        }
    }
    __syncthreads();
    // Softmax over the split, one warp per query head.
    for (int g = warp; g < group; g += PA_WARPS) {
        float *sg = sc + g * split;
        float mx = -INFINITY;
        for (int j = lane; j < len; j += 32)
            mx = fmaxf(mx, sg[j]);
        for (int o = 16; o > 0; o >>= 1)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.0f;
        for (int j = lane; j < len; j += 32) {
            float e = mx == -INFINITY ? 0.0f : expf(sg[j] - mx);
            sg[j] = e;
            sum += e;
        }
        for (int o = 16; o > 0; o >>= 1)
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
            pm[part + (size_t)g * n_splits] = mx;
            pl[part + (size_t)g * n_splits] = sum;
        }
    }
    __syncthreads();
    // Weighted value sums: thread per (head, channel), PA_V value rows loaded at a time (the
    // same sum in token order).
    const int vshift = c.page_tokens * hd; // v row = k row + page_tokens rows
    for (int idx = threadIdx.x; idx < group * hd; idx += blockDim.x) {
        int g = idx / hd, d = idx % hd;
        const float *pg = sc + g * split;
        float acc = 0.0f;
        for (int j0 = 0; j0 < len; j0 += PA_V) {
            uint32_t vraw[PA_V], fold = 0;
#pragma unroll
            for (int u = 0; u < PA_V; u++) {
                const int j = j0 + u;
                vraw[u] = j < len && rowok[j] ? c.pool[rowoff[j] + vshift + d] : 0u;
                fold ^= vraw[u];
            }
            vraw[0] ^= fold & zero;
#pragma unroll
            for (int u = 0; u < PA_V; u++) {
                const int j = j0 + u;
                if (j < len && rowok[j])
                    acc += pg[j] * krn_h2f((uint16_t)vraw[u]);
            }
        }
        po[(part + (size_t)g * n_splits) * hd + d] = acc;
    }
}

__global__ void paged_combine_kernel(float *out, int ldo, const float *po, const float *pm,
                                     const float *pl, int n_heads, int head_dim, int n_splits)
{
    const int h = blockIdx.x, b = blockIdx.y;
    const size_t base = ((size_t)b * n_heads + h) * n_splits;
    float mx = -INFINITY;
    for (int s = 0; s < n_splits; s++) {
        if (pl[base + s] > 0.0f)
            mx = fmaxf(mx, pm[base + s]);
    }
    float total = 0.0f;
    for (int s = 0; s < n_splits; s++) {
        if (pl[base + s] > 0.0f)
            total += pl[base + s] * expf(pm[base + s] - mx);
    }
    float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < n_splits; s++) {
            if (pl[base + s] > 0.0f)
                acc += po[(base + s) * head_dim + d] * expf(pm[base + s] - mx);
        }
        out[(size_t)b * ldo + (size_t)h * head_dim + d] = acc * inv;
    }
}

static bool cache_ok(const krn_paged_cuda_t *c)
{
    return c != NULL && c->pool != NULL && c->page_ids != NULL && c->page_tokens > 0 &&
           c->head_dim > 0 && c->head_dim <= 32 * PA_MAX_C && c->max_pages > 0 &&
           c->n_pages > 0 && c->n_pages <= INT32_MAX &&
           c->page_elems == 2 * (size_t)c->page_tokens * c->head_dim;
}

extern "C" size_t krn_paged_attention_cuda_scratch(int n_seqs, int n_heads, int n_kv_heads,
                                                   int head_dim, int max_tokens)
{
    if (n_seqs <= 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 ||
        head_dim <= 0 || max_tokens <= 0)
        return 0;
    int split = pa_split(n_heads / n_kv_heads, n_seqs, n_kv_heads, max_tokens);
    size_t n_splits = ((size_t)max_tokens + split - 1) / split;
    return (size_t)n_seqs * n_heads * n_splits * ((size_t)head_dim + 2);
}

extern "C" fy_status_t krn_paged_attention_f16_cuda(float *out, int ldo, const float *q, int ldq,
                                                    int n_seqs, int n_heads, int n_kv_heads,
                                                    float scale, const krn_paged_cuda_t *cache,
                                                    const int32_t *n_tokens, int max_tokens,
                                                    float *scratch, size_t scratch_floats,
                                                    cudaStream_t stream)
{
    if (!cache_ok(cache) || n_seqs <= 0 || n_seqs > 65535 || n_heads <= 0 ||
        n_kv_heads <= 0 || n_kv_heads > 65535 || n_heads % n_kv_heads != 0 ||
        n_heads / n_kv_heads > PA_MAX_GROUP || max_tokens <= 0 ||
        (int64_t)max_tokens > (int64_t)cache->max_pages * cache->page_tokens ||
        (size_t)ldq < (size_t)n_heads * cache->head_dim ||
        (size_t)ldo < (size_t)n_heads * cache->head_dim || scratch == NULL)
        return FY_ERR_INVALID_ARG;
    const int hd = cache->head_dim, group = n_heads / n_kv_heads;
    const int split = pa_split(group, n_seqs, n_kv_heads, max_tokens);
    size_t need = krn_paged_attention_cuda_scratch(n_seqs, n_heads, n_kv_heads, hd, max_tokens);
    if (scratch_floats < need)
        return FY_ERR_INVALID_ARG;
    const int64_t n_splits = ((int64_t)max_tokens + split - 1) / split;
    if (n_splits > INT32_MAX)
        return FY_ERR_INVALID_ARG;
    size_t parts = (size_t)n_seqs * n_heads * (size_t)n_splits;
    float *po = scratch, *pm = po + parts * hd, *pl = pm + parts;
    // Dynamic shared: q [group][hd] + scores [group][split] <= 32 KB + 8 KB, under the 48 KB
    // every device allows without opting in.
    size_t smem = sizeof(float) * ((size_t)group * hd + (size_t)group * split);
    dim3 grid((unsigned)n_splits, (unsigned)n_kv_heads, (unsigned)n_seqs);
    paged_split_kernel<<<grid, PA_THREADS, smem, stream>>>(po, pm, pl, q, ldq, n_heads, group,
                                                           scale, *cache, n_tokens, split,
                                                           (int)n_splits);
    fy_status_t st = krn_launch_status();
    if (st != FY_OK)
        return st;
    unsigned threads = (unsigned)((hd + 31) / 32 * 32);
    paged_combine_kernel<<<dim3((unsigned)n_heads, (unsigned)n_seqs), threads, 0, stream>>>(
        out, ldo, po, pm, pl, n_heads, hd, (int)n_splits);
    return krn_launch_status();
}

__global__ void paged_store_kernel(krn_paged_cuda_t c, int n_seqs, int n_kv_heads, int n_tokens,
                                   const int32_t *pos0, const float *k, const float *v,
                                   size_t seq_stride, size_t head_stride, size_t tok_stride)
{
    const int hd = c.head_dim;
    size_t total = (size_t)n_seqs * n_kv_heads * n_tokens * hd;
    for (size_t it = blockIdx.x * (size_t)blockDim.x + threadIdx.x; it < total;
         it += (size_t)gridDim.x * blockDim.x) {
        int d = (int)(it % hd);
        size_t rest = it / hd;
        int t = (int)(rest % n_tokens);
        rest /= n_tokens;
        int h = (int)(rest % n_kv_heads);
        int b = (int)(rest / n_kv_heads);
        int pos = pos0[b] + t;
        if (pos < 0)
            continue;
        bool ok;
        size_t off = pa_slot(c, b, h, pos, &ok);
        if (!ok)
            continue;
        size_t src = (size_t)b * seq_stride + (size_t)h * head_stride + (size_t)t * tok_stride + d;
        c.pool[off + d] = krn_f2h(k[src]);
        c.pool[off + (size_t)c.page_tokens * hd + d] = krn_f2h(v[src]);
    }
}

extern "C" fy_status_t krn_paged_store_f16_cuda(const krn_paged_cuda_t *cache, int n_seqs,
                                                int n_kv_heads, int n_tokens, const int32_t *pos0,
                                                const float *k, const float *v, size_t seq_stride,
                                                size_t head_stride, size_t tok_stride,
                                                cudaStream_t stream)
{
    if (!cache_ok(cache) || n_seqs < 0 || n_kv_heads <= 0 || n_tokens < 0 || pos0 == NULL)
        return FY_ERR_INVALID_ARG;
    size_t total = (size_t)n_seqs * n_kv_heads * n_tokens * cache->head_dim;
    if (total == 0)
        return FY_OK;
    paged_store_kernel<<<krn_grid_1d(total, 256), 256, 0, stream>>>(
        *cache, n_seqs, n_kv_heads, n_tokens, pos0, k, v, seq_stride, head_stride, tok_stride);
    return krn_launch_status();
}
