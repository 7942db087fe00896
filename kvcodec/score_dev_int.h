/* The tail of token scoring on the GPU (score.cu's steps after the window softmax): the mean
 * squared query, the GQA reduction, the window output obar, HybridKV's head class and the max
 * pooling, as one function per element that two places compile: kvcodec/score.cu (a kernel
 * per step, a thread per element; and score_tail_small, one block for a short prompt) and
 * tests/kvcodec/test_score_emu.cc, which runs score_tail_small on host threads against the CPU's
 * kvc_score and the per-element functions. Each repeats score.c's arithmetic in its order.
 *
 * The window queries' tensor-core fragments (sc_frag_make) are here too: test_kvc_score_emu
 * checks their layout.
 *
 * Not a standalone header. The includer provides, before including it: kadd, ksub, kmul, kdiv
 * (float arithmetic rounded once), fy_dev_h2f, fy_dev_h2f_arith, sc_half_round, sc_half_pack,
 * KVC_MAX_HEAD_DIM; and outside CUDA __device__, __forceinline__, threadIdx, blockIdx,
 * blockDim, __syncthreads, min, __float_as_uint, __uint_as_float, uint4 and make_uint4. */
#ifndef FERRY_KVCODEC_SCORE_DEV_INT_H
#define FERRY_KVCODEC_SCORE_DEV_INT_H

#ifdef __CUDACC__
#define SCORE_UNROLL _Pragma("unroll")
#else
#define SCORE_UNROLL
#endif

typedef struct {
    const uint16_t *k, *v;
    size_t hs, ts;
    const float *q;  // window row w of head h at q + (h * qs + w) * d (the last W of qs rows)
    const float *wa; // [n_heads][n] window_attn, or NULL
    uint32_t n_heads, n_kv, grp, n, d, W, qs;
    float scale;
    int vec; // k, hs and ts allow 16-byte loads of 8 channels (the mma kernels' staging)
} score_args_t;

#define QSQ_BATCH 64 // window rows whose loads qsq_one issues together at most

/* s plus the squares of x(w) for w in [*w0, W), in order, B rows' loads at a time while B of
 * them remain (advancing *w0). Left to itself, ptxas issues each load a few adds ahead of its
 * use (eight at B = 64); zero, a 0 it cannot see through, folds every loaded value into the
 * first, so all of them are in flight before the first add. */
template <int B, typename F>
static __device__ __forceinline__ float qsq_rows(F x, uint32_t *w0, uint32_t W, float s,
                                                 uint32_t zero)
{
    for (; *w0 + B <= W; *w0 += B) {
        float v[B];
        uint32_t fold = 0;
        SCORE_UNROLL
        for (int u = 0; u < B; u++) {
            v[u] = x(*w0 + u);
            fold ^= u > 0 ? __float_as_uint(v[u]) : 0u;
        }
        v[0] = __uint_as_float(__float_as_uint(v[0]) ^ (fold & zero));
        SCORE_UNROLL
        for (int u = 0; u < B; u++)
            s = kadd(s, kmul(v[u], v[u]));
    }
    return s;
}

/* Element i = (kv head g, channel c) of the mean squared query, scaled as the logit
 * sensitivity. The loads of up to QSQ_BATCH window rows go out before their squares are added
 * (in score.c's order): the grid is only n_kv x d threads, and a load per add left each thread
 * waiting out one memory latency per few rows of its grp x W (at 16 rows a batch, a 32k-token
 * Llama-3 layer still took 31 us on an H200 for 32 round trips a thread). */
static __device__ float qsq_one(const score_args_t &a, size_t i)
{
    uint32_t g = (uint32_t)(i / a.d), c = (uint32_t)(i % a.d);
    const uint32_t zero = a.W >> 31; // windows are far shorter: 0
    float s = 0;
    if (a.q != NULL) {
        for (uint32_t hh = 0; hh < a.grp; hh++) {
            const float *qh = a.q + (size_t)(g * a.grp + hh) * a.qs * a.d + c;
            auto x = [&](uint32_t w) { return qh[(size_t)w * a.d]; };
            uint32_t w0 = 0;
            s = qsq_rows<QSQ_BATCH>(x, &w0, a.W, s, zero);
            s = qsq_rows<16>(x, &w0, a.W, s, zero);
            s = qsq_rows<1>(x, &w0, a.W, s, zero);
        }
        float qn = kdiv(1.0f, kmul((float)a.grp, (float)a.W));
        s = kmul(kmul(kmul(s, qn), a.scale), a.scale);
    } else {
        s = kdiv(1.0f, (float)a.d);
    }
    return s;
}

/* Element i = (kv head g, token t) of the GQA reduction (score.c's loop over the group's
 * heads): the group mean pbar (for the window output) into *pbar_p, and the importance before
 * pooling (mean, or max; of ah2 for the RMS or max importance) into *acc_p. */
static __device__ void group_one(const score_args_t &a, size_t i, const float *ah, const float *ah2,
                                 int have_q, int reduce_max, float *pbar_p, float *acc_p)
{
    bool have_attn = have_q || a.wa != NULL;
    float fg = (float)a.grp;
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
    *pbar_p = pb;
    *acc_p = acc;
}

/* obar of kv head g at channel c: sum_t pbar_t v_tc, tokens in order (score.c's products and
 * serial sum; obar_tile_kernel's too). */
static __device__ float obar_one(const score_args_t &a, const float *pbar, uint32_t g, uint32_t c)
{
    const float *pb = pbar + (size_t)g * a.n;
    const uint16_t *vh = a.v + (size_t)g * a.hs + c;
    float s = 0;
    for (uint32_t t = 0; t < a.n; t++)
        s = kadd(s, kmul(pb[t], fy_dev_h2f_arith(vh[(size_t)t * a.ts])));
    return s;
}

#define OBAR_T       128 // tokens per tile of obar_tile_body
#define OBAR_THREADS 256 // its block: the chain warp and 7 loader warps
#define OBAR_LOADERS (OBAR_THREADS - 32)
#define OBAR_PER     ((OBAR_T * 32 + OBAR_LOADERS - 1) / OBAR_LOADERS) // loads per loader and tile

/* obar_c = sum_t pbar_t v_tc, tokens in order, with the memory traffic off the chain (the body
 * of score.cu's obar_tile_kernel; tile: [2][OBAR_T][33] of the block's shared memory): a block
 * per (kv head, 32 channels); warps 1.. form the products pbar_t v_tc of tiles of OBAR_T tokens
 * into shared memory (double-buffered) while warp 0 adds them, a lane per channel, tokens in
 * order: the same products and the same serial sums as score.c (obar_one's). A loader keeps the
 * next tile's loads in flight in registers while the chain adds and the block waits (loaded
 * and stored in one step, every tile waited out a memory latency, several times the chain's
 * 128 dependent adds: 520 us for a 32k-token Llama-3 layer on an H200 where the adds alone take
 * about 70), and converts the halves with fy_dev_h2f_arith (the products are arithmetic). */
static __device__ void obar_tile_body(const score_args_t &a, const float *pbar, float *obar,
                                      float (*tile)[OBAR_T][33])
{
    const uint32_t slices = (a.d + 31) / 32;
    const uint32_t g = blockIdx.x / slices, c0 = (blockIdx.x % slices) * 32;
    const float *pb = pbar + (size_t)g * a.n;
    const uint16_t *vh = a.v + (size_t)g * a.hs;
    const uint32_t tiles = (a.n + OBAR_T - 1) / OBAR_T;
    const uint32_t lane = threadIdx.x % 32;
    const bool chain = threadIdx.x < 32;
    float pv[OBAR_PER];
    uint16_t vv[OBAR_PER];
    auto load = [&](uint32_t k) { // tile k's factors into registers (0 outside the data)
        SCORE_UNROLL
        for (int u = 0; u < OBAR_PER; u++) {
            const uint32_t i = threadIdx.x - 32 + u * OBAR_LOADERS;
            const uint32_t tt = i / 32, cc = i % 32, t = k * OBAR_T + tt, c = c0 + cc;
            const bool in = i < OBAR_T * 32 && t < a.n && c < a.d;
            pv[u] = in ? pb[t] : 0.0f;
            vv[u] = in ? vh[(size_t)t * a.ts + c] : (uint16_t)0;
        }
    };
    if (!chain && tiles > 0)
        load(0);
    float s = 0;
    for (uint32_t k = 0; k <= tiles; k++) {
        // Loaders store tile k and load tile k + 1 while the chain adds tile k - 1.
        if (!chain && k < tiles) {
            float(*tl)[33] = tile[k % 2];
            SCORE_UNROLL
            for (int u = 0; u < OBAR_PER; u++) {
                const uint32_t i = threadIdx.x - 32 + u * OBAR_LOADERS;
                if (i < OBAR_T * 32)
                    tl[i / 32][i % 32] = kmul(pv[u], fy_dev_h2f_arith(vv[u]));
            }
            if (k + 1 < tiles)
                load(k + 1);
        }
        if (chain && k > 0) {
            const float(*tl)[33] = tile[(k - 1) % 2];
            const uint32_t m = min((uint32_t)OBAR_T, a.n - (k - 1) * OBAR_T);
#ifdef __CUDACC__
#pragma unroll 16
#endif
            for (uint32_t tt = 0; tt < m; tt++)
                s = kadd(s, tl[tt][lane]);
        }
        __syncthreads();
    }
    if (chain && c0 + lane < a.d)
        obar[(size_t)g * a.d + c0 + lane] = s;
}

/* HybridKV's class of kv head g from the window mass on sinks and recent tokens. */
static __device__ uint8_t static_one(const score_args_t &a, const float *pbar, int active,
                                     uint32_t sinks, uint32_t recent, float threshold, uint32_t g)
{
    if (!active)
        return 0;
    const float *pb = pbar + (size_t)g * a.n;
    float mass = 0;
    for (uint32_t t = 0; t < a.n; t++) {
        if (t >= sinks && (uint64_t)t + recent < a.n) // skip the middle in one step
            t = (uint32_t)((uint64_t)a.n - recent);
        if (t >= a.n)
            break;
        mass = kadd(mass, pb[t]);
    }
    return mass >= threshold;
}

/* Element i = (kv head g, token t) of the importance: the max over [t - r, t + r] (score.c's
 * max_pool). */
static __device__ float pool_one(const score_args_t &a, const float *acc, uint32_t kernel, size_t i)
{
    uint32_t r = kernel / 2;
    uint32_t g = (uint32_t)(i / a.n), t = (uint32_t)(i % a.n);
    const float *in = acc + (size_t)g * a.n;
    if (kernel <= 1)
        return in[t];
    uint32_t lo = t > r ? t - r : 0, hi = min(a.n - 1, t + r);
    float m = in[lo];
    for (uint32_t u = lo + 1; u <= hi; u++)
        m = in[u] > m ? in[u] : m;
    return m;
}

/* What the tail's steps take besides the arguments and the window attention. */
typedef struct {
    int have_q, reduce_max;
    int static_active;
    uint32_t sinks, recent, pool_kernel;
    float threshold;
} score_tail_t;

#define SCORE_SMALL_ITEMS 2048 // (kv head, token) items up to which score_tail_small runs

/* Every step of the tail for a short prompt in one block (in place of five launches): qsq,
 * then the GQA reduction into pbar and acc (n_kv n floats each of the block's shared memory,
 * at most SCORE_SMALL_ITEMS), then obar, the head classes and the pooled importance from
 * them; the same values as the per-step kernels. The whole block calls it. */
static __device__ void score_tail_small(const score_args_t &a, const float *ah, const float *ah2,
                                        const score_tail_t &p, float *pbar, float *acc,
                                        float *qsq, float *obar, uint8_t *is_static, float *imp)
{
    const size_t items = (size_t)a.n_kv * a.n, chans = (size_t)a.n_kv * a.d;
    for (size_t i = threadIdx.x; i < chans; i += blockDim.x)
        qsq[i] = qsq_one(a, i);
    for (size_t i = threadIdx.x; i < items; i += blockDim.x)
        group_one(a, i, ah, ah2, p.have_q, p.reduce_max, &pbar[i], &acc[i]);
    __syncthreads();
    for (size_t i = threadIdx.x; i < chans; i += blockDim.x)
        obar[i] = obar_one(a, pbar, (uint32_t)(i / a.d), (uint32_t)(i % a.d));
    for (uint32_t g = threadIdx.x; g < a.n_kv; g += blockDim.x)
        is_static[g] =
            static_one(a, pbar, p.static_active, p.sinks, p.recent, p.threshold, g);
    for (size_t i = threadIdx.x; i < items; i += blockDim.x)
        imp[i] = pool_one(a, acc, p.pool_kernel, i);
}

/* ---- The window queries as tensor-core A fragments (score.cu's mma path) ---------------- */

#define SC_KS 8 // k steps of 16 channels: every head_dim up to 128 (narrower heads: zero channels)

/* One lane's A fragments of one m-tile (16 window rows) and k step: FP16 channel pairs of the
 * query times the logit scale, the high parts (hi) and what they leave (lo: x = hi + lo to about
 * 2^-22 of x). */
typedef struct {
    uint4 hi, lo;
} sc_frag_t;

/* Where lane `lane`'s fragment of k step s of m-tile mt of query head h is kept: m-tiles of
 * MT = ceil(W / 16) a head, SC_KS steps a tile, 32 lanes a step (a warp's loads of a step are
 * two 512-byte lines). */
static __device__ __forceinline__ size_t sc_frag_at(uint32_t W, uint32_t h, uint32_t mt, uint32_t s,
                                                    uint32_t lane)
{
    const size_t MT = (W + 15) / 16;
    return (((size_t)h * MT + mt) * SC_KS + s) * 32 + lane;
}

/* The fragments of m-tile mt of head h for lane (gq, tq) = (lane / 4, lane % 4), as
 * mma.m16n8k16's A layout wants them: register f of step s holds rows 16 mt + gq + 8 (f & 1),
 * channels 16 s + 2 tq + 8 (f >> 1) and the next one; rows past W and channels past d are 0.
 * Each window row is split once here (sc_frag_kernel), not again by every block of tokens that
 * uses it. The includer provides sc_half_round (a float through FP16, to nearest) and
 * sc_half_pack (two floats as an FP16 pair, the first in the low half). */
static __device__ void sc_frag_make(const score_args_t &a, uint32_t h, uint32_t mt, uint32_t lane,
                                    sc_frag_t *out)
{
    const uint32_t gq = lane >> 2, tq = lane & 3;
    for (uint32_t s = 0; s < SC_KS; s++) {
        uint32_t hi[4], lo[4];
        SCORE_UNROLL
        for (int f = 0; f < 4; f++) {
            const uint32_t w = 16 * mt + gq + 8 * (f & 1), c = 16 * s + 2 * tq + 8 * (f >> 1);
            float x0 = 0.0f, x1 = 0.0f;
            if (w < a.W && c < a.d) {
                const float *q = a.q + ((size_t)h * a.qs + w) * a.d + c;
                x0 = kmul(q[0], a.scale);
                x1 = kmul(q[1], a.scale);
            }
            const float h0 = sc_half_round(x0), h1 = sc_half_round(x1);
            hi[f] = sc_half_pack(h0, h1);
            lo[f] = sc_half_pack(ksub(x0, h0), ksub(x1, h1));
        }
        out[sc_frag_at(a.W, h, mt, s, lane)].hi = make_uint4(hi[0], hi[1], hi[2], hi[3]);
        out[sc_frag_at(a.W, h, mt, s, lane)].lo = make_uint4(lo[0], lo[1], lo[2], lo[3]);
    }
}

#endif
