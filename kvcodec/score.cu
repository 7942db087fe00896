/*
 * score.cu: token importance on the GPU, twin of score.c (kvc_score).
 *
 * Kernels, in order:
 * 1. (window queries only) row_stats_kernel: a block per (query head, window row) finds the
 *    row's maximum logit and 1 / (W * sum of exp); attn_kernel: a thread per (query head,
 *    token) sums the softmax probabilities over the window rows in row order (and, for the RMS
 *    or max importance, their root mean square or maximum); qsq_kernel: the
 *    mean squared query per channel of each GQA group. The logits are the CPU's (kvc_dot's eight
 *    partial sums); expf and the softmax sums are the GPU's, so these agree with the CPU to
 *    fp32 rounding, not bit for bit.
 * 2. group_kernel: a thread per (kv head, token) reduces its GQA group (mean, or max) in head
 *    order, and keeps the group mean pbar for the window output;
 * 3. obar_tile_kernel: a block per (kv head, 32 channels) sums pbar_t v_t over the tokens in
 *    order, one lane per channel, while the block's other warps stage the products;
 * 4. static_kernel: HybridKV's window mass on sinks + recent tokens, per kv head;
 * 5. pool_kernel: 1-D max pooling along tokens.
 * From window_attn (the attention kernel's output) steps 2-5 repeat the CPU's arithmetic in
 * its order, so the scores are bit-identical to kvc_score.
 */
#include <math.h>
#include <string.h>

#include "kvcodec_cuda.h"
extern "C" {
#include "kvcodec_int.h"
}
#include "kvcodec_cuda_int.h"

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

typedef struct {
    const uint16_t *k, *v;
    size_t hs, ts;
    const float *q;  // window row w of head h at q + (h * qs + w) * d (the last W of qs rows)
    const float *wa; // [n_heads][n] window_attn, or NULL
    uint32_t n_heads, n_kv, grp, n, d, W, qs;
    float scale;
} score_args_t;

/* scale * q . k_t with kvc_dot's eight partial sums (k from FP16). */
static __device__ float logit(const score_args_t &a, const float *q, uint32_t g, uint32_t t)
{
    const uint16_t *kr = a.k + (size_t)g * a.hs + (size_t)t * a.ts;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t c = 0; c < a.d; c += 8)
        for (int l = 0; l < 8; l++)
            acc[l] = kadd(acc[l], kmul(q[c + l], fy_dev_h2f(kr[c + l])));
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

/* A thread per (kv head, channel): mean squared query, scaled as the logit sensitivity. */
__global__ void qsq_kernel(score_args_t a, float *qsq)
{
    size_t total = (size_t)a.n_kv * a.d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t g = (uint32_t)(i / a.d), c = (uint32_t)(i % a.d);
        float s = 0;
        if (a.q != NULL) {
            for (uint32_t hh = 0; hh < a.grp; hh++) {
                uint32_t h = g * a.grp + hh;
                for (uint32_t w = 0; w < a.W; w++) {
                    float x = a.q[((size_t)h * a.qs + w) * a.d + c];
                    s = kadd(s, kmul(x, x));
                }
            }
            float qn = kdiv(1.0f, kmul((float)a.grp, (float)a.W));
            s = kmul(kmul(kmul(s, qn), a.scale), a.scale);
        } else {
            s = kdiv(1.0f, (float)a.d);
        }
        qsq[i] = s;
    }
}

/* A thread per (kv head, token): the GQA reduction (score.c's loop over the group's heads). */
__global__ void group_kernel(score_args_t a, const float *ah, const float *ah2, int have_q,
                             int reduce_max, float *pbar, float *acc_out)
{
    size_t total = (size_t)a.n_kv * a.n;
    bool have_attn = have_q || a.wa != NULL;
    float fg = (float)a.grp;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t g = (uint32_t)(i / a.n), t = (uint32_t)(i % a.n);
        float pb = 0, acc = 0;
        for (uint32_t hh = 0; hh < a.grp && have_attn; hh++) {
            size_t hi = (size_t)(g * a.grp + hh) * a.n + t;
            float x;
            if (have_q) {
                x = ah[hi];
            } else {
                float w = a.wa[hi];
                x = w > 0 && w <= 1 ? w : 0; // from another module: keep it sane
            }
            pb = kadd(pb, kdiv(x, fg));
            if (ah2 != NULL)
                x = ah2[hi]; // RMS or max importance; pbar stays the mean
            if (reduce_max)
                acc = x > acc ? x : acc;
            else
                acc = kadd(acc, kdiv(x, fg));
        }
        if (!have_attn)
            acc = pb = kdiv(1.0f, (float)a.n);
        pbar[i] = pb;
        acc_out[i] = acc;
    }
}

#define OBAR_T 128 // tokens per tile of obar_tile_kernel

/* obar_c = sum_t pbar_t v_tc, tokens in order, with the memory traffic off the chain: a block per
 * (kv head, 32 channels); warps 1.. load tiles of OBAR_T tokens and form the products pbar_t v_tc
 * into shared memory (double-buffered) while warp 0 adds them, a lane per channel, tokens in order:
 * the same products and the same serial sums as score.c. */
__global__ void __launch_bounds__(256)
    obar_tile_kernel(score_args_t a, const float *pbar, float *obar)
{
    __shared__ float tile[2][OBAR_T][33];
    uint32_t slices = (a.d + 31) / 32;
    uint32_t g = blockIdx.x / slices, c0 = (blockIdx.x % slices) * 32;
    const float *pb = pbar + (size_t)g * a.n;
    const uint16_t *vh = a.v + (size_t)g * a.hs;
    uint32_t tiles = (a.n + OBAR_T - 1) / OBAR_T;
    uint32_t lane = threadIdx.x % 32, loaders = blockDim.x - 32;
    bool chain = threadIdx.x < 32;
    float s = 0;
    for (uint32_t k = 0; k <= tiles; k++) {
        // Loaders fill tile k while the chain adds tile k - 1.
        if (!chain && k < tiles) {
            float(*tl)[33] = tile[k % 2];
            for (uint32_t i = threadIdx.x - 32; i < OBAR_T * 32; i += loaders) {
                uint32_t tt = i / 32, cc = i % 32, t = k * OBAR_T + tt, c = c0 + cc;
                tl[tt][cc] =
                    t < a.n && c < a.d ? kmul(pb[t], fy_dev_h2f(vh[(size_t)t * a.ts + c])) : 0.0f;
            }
        }
        if (chain && k > 0) {
            float(*tl)[33] = tile[(k - 1) % 2];
            uint32_t m = min((uint32_t)OBAR_T, a.n - (k - 1) * OBAR_T);
            for (uint32_t tt = 0; tt < m; tt++)
                s = kadd(s, tl[tt][lane]);
        }
        __syncthreads();
    }
    if (chain && c0 + lane < a.d)
        obar[(size_t)g * a.d + c0 + lane] = s;
}

/* A thread per kv head: HybridKV's class from the window mass on sinks and recent tokens. */
__global__ void static_kernel(score_args_t a, const float *pbar, int active, uint32_t sinks,
                              uint32_t recent, float threshold, uint8_t *is_static)
{
    for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < a.n_kv;
         g += gridDim.x * blockDim.x) {
        if (!active) {
            is_static[g] = 0;
            continue;
        }
        const float *pb = pbar + (size_t)g * a.n;
        float mass = 0;
        for (uint32_t t = 0; t < a.n; t++) {
            if (t >= sinks && (uint64_t)t + recent < a.n) // skip the middle in one step
                t = (uint32_t)((uint64_t)a.n - recent);
            if (t >= a.n)
                break;
            mass = kadd(mass, pb[t]);
        }
        is_static[g] = mass >= threshold;
    }
}

/* A thread per (kv head, token): max over [t - r, t + r] (score.c's max_pool). */
__global__ void pool_kernel(score_args_t a, const float *acc, uint32_t kernel, float *imp)
{
    size_t total = (size_t)a.n_kv * a.n;
    uint32_t r = kernel / 2;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t g = (uint32_t)(i / a.n), t = (uint32_t)(i % a.n);
        const float *in = acc + (size_t)g * a.n;
        if (kernel <= 1) {
            imp[i] = in[t];
            continue;
        }
        uint32_t lo = t > r ? t - r : 0, hi = min(a.n - 1, t + r);
        float m = in[lo];
        for (uint32_t u = lo + 1; u <= hi; u++)
            m = in[u] > m ? in[u] : m;
        imp[i] = m;
    }
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
    size_t items = (size_t)n_kv * n;
    float *pbar = NULL, *acc = NULL, *ah = NULL, *ah2 = NULL;
    const int imp = have_q ? (int)policy->importance : KVC_IMP_MEAN; // score.c: needs queries
    float2 *stats = NULL;
    fy_status_t st = FY_OK;
    bool pools = kvc_cuda_pools();
    KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&pbar, items * sizeof(float), cs, pools), st,
                  out);
    KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&acc, items * sizeof(float), cs, pools), st, out);
    if (have_q) {
        KVC_CUDA_GOTO(
            kvc_cuda_scratch_alloc((void **)&ah, (size_t)n_heads * n * sizeof(float), cs, pools),
            st, out);
        KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&stats,
                                             (size_t)n_heads * a.W * sizeof(float2), cs, pools),
                      st, out);
        row_stats_kernel<<<kvc_grid((size_t)n_heads * a.W, 1), ROW_THREADS, 0, cs>>>(a, stats);
        KVC_LAUNCH_GOTO(st, out);
        if (imp != KVC_IMP_MEAN)
            KVC_CUDA_GOTO(kvc_cuda_scratch_alloc((void **)&ah2, (size_t)n_heads * n * sizeof(float),
                                                 cs, pools),
                          st, out);
        attn_kernel<<<kvc_grid((size_t)n_heads * n, 256), 256, 0, cs>>>(a, stats, imp, ah, ah2);
        KVC_LAUNCH_GOTO(st, out);
    }
    qsq_kernel<<<kvc_grid((size_t)n_kv * d, 128), 128, 0, cs>>>(a, out->qsq);
    KVC_LAUNCH_GOTO(st, out);
    group_kernel<<<kvc_grid(items, 256), 256, 0, cs>>>(a, ah, ah2, have_q,
                                                       policy->reduce == KVC_REDUCE_MAX, pbar, acc);
    KVC_LAUNCH_GOTO(st, out);
    obar_tile_kernel<<<n_kv *((d + 31) / 32), 256, 0, cs>>>(a, pbar, out->obar);
    KVC_LAUNCH_GOTO(st, out);
    static_kernel<<<kvc_grid(n_kv, 64), 64, 0, cs>>>(
        a, pbar, policy->hybrid_threshold > 0 && (have_q || in->window_attn != NULL), policy->sinks,
        policy->recent, policy->hybrid_threshold, out->is_static);
    KVC_LAUNCH_GOTO(st, out);
    pool_kernel<<<kvc_grid(items, 256), 256, 0, cs>>>(a, acc, policy->pool_kernel, out->importance);
    KVC_LAUNCH_GOTO(st, out);
out: // scratch goes back to the stream's pool once the kernels are done
    void *scratch[5] = {pbar, acc, ah, ah2, stats};
    for (int i = 0; i < 5; i++) {
        if (scratch[i] == NULL)
            continue;
        cudaError_t e = kvc_cuda_scratch_free(scratch[i], cs, pools);
        if (e != cudaSuccess && st == FY_OK)
            st = kvc_cuda_status(e);
    }
    return st;
}
