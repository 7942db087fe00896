/* The quantizer's row loads and Hadamard rotation on the GPU, and quant_warp_body, the body of
 * encode.cu's quant_warp_kernel: quant.c's kvc_quant_group for a layer's quantized groups, with
 * every row in registers. Device code that two places compile: kvcodec/encode.cu and
 * tests/kvcodec/test_quant_emu.cc, which runs quant_warp_body on host threads against
 * kvc_quant_group (every option, head_dim 32/64/128, rotated and not, aligned rows and not,
 * zeros of both signs at the ends of ranges).
 *
 * Not a standalone header. The includer provides quant_dev_int.h's functions, work_t and
 * plan_dev_t (layout_dev_int.h), fy_dev_h2f, KVC_OPT_*; and outside CUDA __device__,
 * __forceinline__, threadIdx, blockIdx, gridDim, __syncthreads, __shfl_xor_sync,
 * __shfl_down_sync, uint2, uint4 and min. */
#ifndef FERRY_KVCODEC_QUANT_ROWS_DEV_INT_H
#define FERRY_KVCODEC_QUANT_ROWS_DEV_INT_H

#ifdef __CUDACC__
#define QUANT_UNROLL _Pragma("unroll")
#else
#define QUANT_UNROLL
#endif

#define QUANT_THREADS 128

/* Where the rows of a layer are: FP16 K, V (strided) and their rotated fp32 copies. */
typedef struct {
    const uint16_t *k, *v;
    size_t hs, ts;
    const float *kr, *vr; // [n_kv][n][d] rotated rows, or NULL
    uint32_t n, d;
    int vec; // k, v and their strides are 16-byte aligned: rows load as vectors (ld_hE_raw)
} kv_src_t;

/* Halves c .. c + E - 1 of row (h, t) of K or V, as loaded: E / 2 words of two halves when s.vec
 * (rows 16-byte aligned; c a multiple of E: one vector load), else a half per word. Nothing uses
 * them before cvt_hE, so a warp can have several rows' loads in flight. */
template <int E>
static __device__ __forceinline__ void ld_hE_raw(const kv_src_t &s, bool val, uint32_t h,
                                                 uint32_t t, uint32_t c, uint32_t (&w)[E])
{
    const uint16_t *p = (val ? s.v : s.k) + (size_t)h * s.hs + (size_t)t * s.ts + c;
    if constexpr (E >= 2) {
        if (s.vec) {
            if constexpr (E == 8) {
                const uint4 u = *reinterpret_cast<const uint4 *>(p);
                w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
            } else if constexpr (E == 4) {
                const uint2 u = *reinterpret_cast<const uint2 *>(p);
                w[0] = u.x, w[1] = u.y;
            } else {
                w[0] = *reinterpret_cast<const uint32_t *>(p);
            }
            return;
        }
    }
QUANT_UNROLL
    for (int e = 0; e < E; e++)
        w[e] = p[e];
}

/* ld_hE_raw's halves as fp32. */
template <int E>
static __device__ __forceinline__ void cvt_hE(const kv_src_t &s, const uint32_t (&w)[E],
                                              float (&x)[E])
{
    if constexpr (E >= 2) {
        if (s.vec) {
QUANT_UNROLL
            for (int i = 0; i < E / 2; i++) {
                x[2 * i] = fy_dev_h2f((uint16_t)w[i]);
                x[2 * i + 1] = fy_dev_h2f((uint16_t)(w[i] >> 16));
            }
            return;
        }
    }
QUANT_UNROLL
    for (int e = 0; e < E; e++)
        x[e] = fy_dev_h2f((uint16_t)w[e]);
}

/* kvc_hadamard on a row of d = 32 E floats held by a warp, lane L holding elements E L ..
 * E L + E - 1: the same butterflies in the same stages (len < E inside the lane, then between
 * lanes L and L ^ (len / E), the lower keeping a + b and the upper a - b with a the lower's
 * value), then the same scale, so every value equals the rotated copy rotate_kernel writes. */
template <int E> static __device__ __forceinline__ void warp_hadamard(float (&x)[E], float scale)
{
    const uint32_t lane = threadIdx.x % 32;
QUANT_UNROLL
    for (int len = 1; len < E; len <<= 1)
QUANT_UNROLL
        for (int e = 0; e < E; e++)
            if ((e & len) == 0) {
                const float p = x[e], q = x[e + len];
                x[e] = kadd(p, q);
                x[e + len] = ksub(p, q);
            }
QUANT_UNROLL
    for (uint32_t m = 1; m < 32; m <<= 1) {
        const bool upper = (lane & m) != 0;
QUANT_UNROLL
        for (int e = 0; e < E; e++) {
            const float o = __shfl_xor_sync(0xffffffffu, x[e], m);
            x[e] = upper ? ksub(o, x[e]) : kadd(x[e], o);
        }
    }
QUANT_UNROLL
    for (int e = 0; e < E; e++)
        x[e] = kmul(x[e], scale);
}

typedef struct {
    const work_t *work;     // every work item: the groups follow the FP16 tokens
    const plan_dev_t *plan; // how many of each
    const uint32_t *tok;    // token indices of the groups
    kv_src_t src;
    const float *qsq; // [n_kv][d] device scores (MixKVQ salience of unrotated groups)
    uint32_t n, d, P;
    int rotate;
    int stage; // the group's K and V rows are staged in dynamic shared memory (2 x G x d fp32)
    int fused; // with stage: rotated groups are rotated in shared memory (no rotated copy)
    float rot_scale;
    uint8_t *out;
} quant_args_t;

static __device__ __forceinline__ void st16(uint8_t *p, uint16_t x)
{
    p[0] = (uint8_t)x;
    p[1] = (uint8_t)(x >> 8);
}

/* Halves c .. c + E - 1 of row (h, t) of K or V, two to a word (the lower half first): one
 * vector load when s.vec, else a load per half. Half of ld_hE_raw's registers where the rows are
 * not aligned, so that a warp can hold many rows' loads. */
template <int E> constexpr int qw_words()
{
    return E >= 2 ? E / 2 : 1;
}

template <int E>
static __device__ __forceinline__ void ld_pairs(const kv_src_t &s, bool val, uint32_t h,
                                                uint32_t t, uint32_t c,
                                                uint32_t (&w)[qw_words<E>()])
{
    const uint16_t *p = (val ? s.v : s.k) + (size_t)h * s.hs + (size_t)t * s.ts + c;
    if constexpr (E == 1) {
        w[0] = p[0];
    } else {
        if (s.vec) {
            uint32_t raw[E];
            ld_hE_raw<E>(s, val, h, t, c, raw);
QUANT_UNROLL
            for (int i = 0; i < E / 2; i++)
                w[i] = raw[i];
            return;
        }
QUANT_UNROLL
        for (int i = 0; i < E / 2; i++)
            w[i] = (uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 16;
    }
}

/* ld_pairs' halves as fp32. */
template <int E>
static __device__ __forceinline__ void cvt_pairs(const uint32_t (&w)[qw_words<E>()], float (&x)[E])
{
QUANT_UNROLL
    for (int e = 0; e < E; e++)
        x[e] = fy_dev_h2f((uint16_t)(w[e / 2] >> (16 * (e % 2))));
}

/* kvc_row_minmax's and key_params' choice among equal values (only +0 and -0 compare equal
 * among finite floats, and the zero point keeps the sign): the first in the scan order wins,
 * so each candidate carries its place in that order (k) and equals go to the lower place. */
static __device__ __forceinline__ void mm_min(float &v, uint32_t &k, float ov, uint32_t ok)
{
    const bool take = ov < v || (ov == v && ok < k);
    v = take ? ov : v;
    k = take ? ok : k;
}

static __device__ __forceinline__ void mm_max(float &v, uint32_t &k, float ov, uint32_t ok)
{
    const bool take = ov > v || (ov == v && ok < k);
    v = take ? ov : v;
    k = take ? ok : k;
}

/* kvc_row_minmax of a row of d = 32 E floats held by a warp (lane L: elements E L .. E L + E -
 * 1), in every lane. The CPU's lane c % 8 scans c = l, l + 8, ... and the lanes merge in order:
 * element c's place in that order is (c % 8) (d / 8) + c / 8. */
template <int E>
static __device__ __forceinline__ void warp_row_minmax(const float (&x)[E], float *lo_p,
                                                       float *hi_p)
{
    constexpr uint32_t D = 32 * E;
    const uint32_t lane = threadIdx.x % 32;
    auto place = [&](int e) {
        const uint32_t c = E * lane + (uint32_t)e;
        return (c % 8) * (D / 8) + c / 8;
    };
    float lo = x[0], hi = x[0];
    uint32_t kl = place(0), kh = kl;
QUANT_UNROLL
    for (int e = 1; e < E; e++) {
        mm_min(lo, kl, x[e], place(e));
        mm_max(hi, kh, x[e], place(e));
    }
QUANT_UNROLL
    for (uint32_t s = 1; s < 32; s <<= 1) {
        const float ol = __shfl_xor_sync(0xffffffffu, lo, s);
        const uint32_t okl = __shfl_xor_sync(0xffffffffu, kl, s);
        const float oh = __shfl_xor_sync(0xffffffffu, hi, s);
        const uint32_t okh = __shfl_xor_sync(0xffffffffu, kh, s);
        mm_min(lo, kl, ol, okl);
        mm_max(hi, kh, oh, okh);
    }
    *lo_p = lo;
    *hi_p = hi;
}

/* pack_row of a row held by a warp, E codes of b bits a lane (lane L: codes E L .. E L + E -
 * 1), at dst (NULL: nothing stored; every lane still takes part): a lane writes its E b / 8
 * bytes, or where those are under a byte the first lane of each byte gathers its neighbours'
 * bits. */
template <int E>
static __device__ __forceinline__ void warp_pack_row(const uint32_t (&code)[E], uint32_t b,
                                                     uint8_t *dst)
{
    const uint32_t lane = threadIdx.x % 32;
    uint32_t bits = 0;
QUANT_UNROLL
    for (int e = 0; e < E; e++)
        bits |= code[e] << ((uint32_t)e * b);
    const uint32_t lb = E * b; // bits a lane: at least 8 for E 4
    uint32_t byte = bits;
    if constexpr (E < 4) { // the neighbours' bits, before any branch (shuffles of all lanes)
        const uint32_t n1 = __shfl_down_sync(0xffffffffu, bits, 1);
        const uint32_t n2 = __shfl_down_sync(0xffffffffu, bits, 2);
        const uint32_t n3 = __shfl_down_sync(0xffffffffu, bits, 3);
        byte |= lb == 2 ? n1 << 2 | n2 << 4 | n3 << 6 : n1 << 4;
    }
    if (dst == NULL)
        return;
    if (lb >= 8) {
        uint8_t *p = dst + lane * (lb / 8);
        for (uint32_t i = 0; i < lb / 8; i++)
            p[i] = (uint8_t)(bits >> (8 * i));
    } else if (lane % (8 / lb) == 0) { // two or four lanes a byte
        dst[lane / (8 / lb)] = (uint8_t)byte;
    }
}

/* quant_kernel for head_dim 32 E (E <= 4), groups of at most QW_ROWS * 4 tokens and no
 * protected channels, with every row in registers: warp w takes the group's tokens [w per,
 * (w + 1) per) (per = ceil(m / 4)), loads its K and V rows at once, rotates them in registers
 * (warp_hadamard), keeps each channel's key range over its tokens in order, and after one
 * barrier merges the four warps' ranges in warp order; each value row is ranged, quantized and
 * packed by its warp alone. Same bytes as quant_kernel (the same float operations on the same
 * values; ranges taken in the CPU's order, mm_min). No staged group: 4 KiB of shared memory a
 * block, and a warp's 16 rows in flight at once instead of 4 at a time between barriers. */
#define QW_ROWS 8 // tokens a warp at most

template <int E>
static __device__ void quant_warp_body(const quant_args_t &a, float (*s_pmn)[32 * E],
                                       float (*s_pmx)[32 * E])
{
    constexpr uint32_t D = 32 * E, NW = QUANT_THREADS / 32;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    size_t n0 = a.plan->n_f16, n_work = a.plan->n_work - n0;
    for (size_t gi = blockIdx.x; gi < n_work; gi += gridDim.x) {
        const work_t w = a.work[n0 + gi];
        const int o = w.opt;
        const uint32_t m = (uint32_t)w.m_minus_1 + 1, h = w.head;
        const uint32_t kb = o == KVC_OPT_Q8 ? 8 : (o == KVC_OPT_Q2 ? 2 : 4);
        const uint32_t vb = o == KVC_OPT_Q8 ? 8 : (o == KVC_OPT_Q4 ? 4 : 2);
        const float kq = (float)((1u << kb) - 1), vq = (float)((1u << vb) - 1);
        const bool rot = a.rotate && o >= KVC_OPT_Q4;
        const uint32_t rowk = D * kb / 8, rowv = D * vb / 8;
        uint8_t *g = a.out + w.out_off;
        uint8_t *ks = g, *kz = g + 2 * D, *vs = g + 4 * D, *vz = vs + 2 * m;
        uint8_t *kc = g + 4 * D + 4 * m, *vc = kc + (size_t)m * rowk;
        const uint32_t per = (m + NW - 1) / NW, j0 = warp * per;
        const uint32_t nj = j0 < m ? min(per, m - j0) : 0; // warp-uniform
        // Every row of the warp in flight before any is used. The rows past the warp's tokens
        // (nj, uniform in the warp, which the compiler cannot know) are zeros that go through
        // the same steps and are never stored: no shuffle sits behind a branch.
        uint32_t rk[QW_ROWS][qw_words<E>()], rv[QW_ROWS][qw_words<E>()];
QUANT_UNROLL
        for (int i = 0; i < QW_ROWS; i++) {
            if ((uint32_t)i < nj) {
                const uint32_t t = a.tok[w.tok + j0 + i];
                ld_pairs<E>(a.src, false, h, t, E * lane, rk[i]);
                ld_pairs<E>(a.src, true, h, t, E * lane, rv[i]);
            } else {
QUANT_UNROLL
                for (int u = 0; u < qw_words<E>(); u++)
                    rk[i][u] = rv[i][u] = 0;
            }
        }
        // Keys: rotated in registers, each channel's range over the warp's tokens in order.
        float kx[QW_ROWS][E], mn[E], mx[E];
QUANT_UNROLL
        for (int i = 0; i < QW_ROWS; i++) {
            cvt_pairs<E>(rk[i], kx[i]);
            if (rot)
                warp_hadamard<E>(kx[i], a.rot_scale);
QUANT_UNROLL
            for (int e = 0; e < E; e++) {
                const float x = kx[i][e];
                if (i == 0) {
                    mn[e] = mx[e] = x;
                } else if ((uint32_t)i < nj) {
                    mn[e] = x < mn[e] ? x : mn[e];
                    mx[e] = x > mx[e] ? x : mx[e];
                }
            }
        }
        __syncthreads(); // the previous group's ranges are read
        if (nj > 0) {
QUANT_UNROLL
            for (int e = 0; e < E; e++) {
                s_pmn[warp][E * lane + e] = mn[e];
                s_pmx[warp][E * lane + e] = mx[e];
            }
        }
        __syncthreads();
        // The group's key parameters for this lane's channels: the warps' ranges merged in
        // token order (warp 0 always has tokens).
        float kzf[E], kinv[E];
QUANT_UNROLL
        for (int e = 0; e < E; e++) {
            const uint32_t c = E * lane + e;
            float lo = s_pmn[0][c], hi = s_pmx[0][c];
            for (uint32_t u = 1; u < NW && u * per < m; u++) {
                const float pl = s_pmn[u][c], ph = s_pmx[u][c];
                lo = pl < lo ? pl : lo;
                hi = ph > hi ? ph : hi;
            }
            uint16_t s16, z16;
            float s;
            kvc_dev_asym(lo, hi, kq, &s16, &z16, &s, &kzf[e], &kinv[e]);
            if (warp == 0) {
                st16(ks + 2 * c, s16);
                st16(kz + 2 * c, z16);
            }
        }
QUANT_UNROLL
        for (int i = 0; i < QW_ROWS; i++) {
            uint32_t code[E];
QUANT_UNROLL
            for (int e = 0; e < E; e++)
                code[e] = kvc_dev_quant_one(kx[i][e], kzf[e], kinv[e], kq);
            warp_pack_row<E>(code, kb, (uint32_t)i < nj ? kc + (size_t)(j0 + i) * rowk : NULL);
        }
        // Values: a row at a time, its range, parameters and codes in this warp.
QUANT_UNROLL
        for (int i = 0; i < QW_ROWS; i++) {
            const uint32_t j = j0 + i;
            const bool store = (uint32_t)i < nj;
            float x[E];
            cvt_pairs<E>(rv[i], x);
            if (rot)
                warp_hadamard<E>(x, a.rot_scale);
            float lo, hi, s, z, inv;
            warp_row_minmax<E>(x, &lo, &hi);
            uint16_t s16, z16;
            kvc_dev_asym(lo, hi, vq, &s16, &z16, &s, &z, &inv);
            if (store && lane == 0) {
                st16(vs + 2 * j, s16);
                st16(vz + 2 * j, z16);
            }
            uint32_t code[E];
QUANT_UNROLL
            for (int e = 0; e < E; e++)
                code[e] = kvc_dev_quant_one(x[e], z, inv, vq);
            warp_pack_row<E>(code, vb, store ? vc + (size_t)j * rowv : NULL);
        }
    }
}

#endif
