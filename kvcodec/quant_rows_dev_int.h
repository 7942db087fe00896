/* The quantizer on the GPU: the row loads and Hadamard rotation that encode.cu's stats and
 * quantizer kernels share, the per-token lane helpers, and the bodies of its two quantizer
 * kernels, quant_body (quant_kernel: a block per group, the group staged in shared memory) and
 * quant_warp_body (quant_warp_kernel: every row in registers). Each writes quant.c's
 * kvc_quant_group bytes for a layer's quantized groups. Device code that two places compile:
 * kvcodec/encode.cu and tests/kvcodec/test_quant_emu.cc, which runs both bodies on host threads
 * against kvc_quant_group (every option, head_dim 32 to 256, rotated and not, protected
 * channels, aligned rows and not, zeros of both signs at the ends of ranges).
 *
 * Not a standalone header. The includer provides quant_dev_int.h's functions, work_t and
 * plan_dev_t (layout_dev_int.h), fy_dev_h2f, fy_dev_h2f_arith, KVC_OPT_*, KVC_MAX_HEAD_DIM,
 * KVC_MAX_PROTECT; and outside CUDA __device__, __forceinline__, threadIdx, blockIdx, blockDim,
 * gridDim, __syncthreads, __syncwarp, __shfl_sync, __shfl_xor_sync, __shfl_down_sync, __ffs,
 * __fsqrt_rn, __fmaf_rn, uint2, uint4, float4, make_float4 and min. */
#ifndef FERRY_KVCODEC_QUANT_ROWS_DEV_INT_H
#define FERRY_KVCODEC_QUANT_ROWS_DEV_INT_H

#ifdef __CUDACC__
#define QUANT_UNROLL _Pragma("unroll")
#else
#define QUANT_UNROLL
#endif

#define QUANT_THREADS 128
#define TOK_LANES     8 // threads per token in the per-token passes (the CPU's 8 lanes)

/* Where the rows of a layer are: FP16 K, V (strided) and their rotated fp32 copies. */
typedef struct {
    const uint16_t *k, *v;
    size_t hs, ts;
    const float *kr, *vr; // [n_kv][n][d] rotated rows, or NULL
    uint32_t n, d;
    int vec; // k, v and their strides are 16-byte aligned: rows load as vectors (ld_pairs)
} kv_src_t;

/* Element (h, t, c) of a strided FP16 tensor. */
static __device__ __forceinline__ float ld_h(const uint16_t *x, size_t hs, size_t ts, uint32_t h,
                                             uint32_t t, uint32_t c)
{
    return fy_dev_h2f(x[(size_t)h * hs + (size_t)t * ts + c]);
}

/* Element c of token t of head h: K or V (val), rotated (rot) or as given. */
static __device__ __forceinline__ float src_x(const kv_src_t &a, bool val, bool rot, uint32_t h,
                                              uint32_t t, uint32_t c)
{
    if (rot)
        return (val ? a.vr : a.kr)[((size_t)h * a.n + t) * a.d + c];
    return ld_h(val ? a.v : a.k, a.hs, a.ts, h, t, c);
}

/* Halves c .. c + E - 1 of row (h, t) of K or V, two to a word (the lower half first; c a
 * multiple of E): one vector load when s.vec (rows 16-byte aligned), else a load per half.
 * Nothing uses them before cvt_pairs, so a warp can have many rows' loads in flight. */
template <int E> constexpr int qw_words()
{
    return E >= 2 ? E / 2 : 1;
}

template <int E>
static __device__ __forceinline__ void ld_pairs(const kv_src_t &s, bool val, uint32_t h, uint32_t t,
                                                uint32_t c, uint32_t (&w)[qw_words<E>()])
{
    const uint16_t *p = (val ? s.v : s.k) + (size_t)h * s.hs + (size_t)t * s.ts + c;
    if constexpr (E == 1) {
        w[0] = p[0];
    } else {
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
        QUANT_UNROLL
        for (int i = 0; i < E / 2; i++)
            w[i] = (uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 16;
    }
}

/* ld_pairs' halves as fp32 (ARITH: by fy_dev_h2f_arith, for rows only computed with). */
template <int E, bool ARITH = false>
static __device__ __forceinline__ void cvt_pairs(const uint32_t (&w)[qw_words<E>()], float (&x)[E])
{
    QUANT_UNROLL
    for (int e = 0; e < E; e++) {
        const uint16_t h = (uint16_t)(w[e / 2] >> (16 * (e % 2)));
        x[e] = ARITH ? fy_dev_h2f_arith(h) : fy_dev_h2f(h);
    }
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
    // Between lanes: the upper's o - x and the lower's x + o are both fma(x, +-1, o), one
    // rounding of the same exact sum (zeros' signs included), one instruction instead of a
    // sum, a difference and a select.
    QUANT_UNROLL
    for (uint32_t m = 1; m < 32; m <<= 1) {
        const float sg = (lane & m) != 0 ? -1.0f : 1.0f;
        QUANT_UNROLL
        for (int e = 0; e < E; e++) {
            const float o = __shfl_xor_sync(0xffffffffu, x[e], m);
            x[e] = __fmaf_rn(x[e], sg, o);
        }
    }
    QUANT_UNROLL
    for (int e = 0; e < E; e++)
        x[e] = kmul(x[e], scale);
}

/* Rows j < m of K and V of head h (token tok(j)) as fp32 into sk and sv, `stride` floats
 * apart, a warp per row, Hadamard-rotated on the way when rot; d = 32 E. A warp loads R rows
 * before it rotates the first: one row at a time, each row waited the whole load latency
 * (a group of 32 tokens is 16 rows per warp), which left the short layers' encode kernels
 * mostly waiting. */
template <int E, bool ARITH, typename F>
static __device__ void stage_rows_warp(const kv_src_t &s, uint32_t h, F tok, uint32_t m, float *sk,
                                       float *sv, uint32_t stride, bool rot, float scale)
{
    constexpr int R = E >= 8 ? 4 : E == 4 ? 8 : 16; // rows in flight per warp
    const uint32_t lane = threadIdx.x % 32, nw = blockDim.x / 32;
    for (uint32_t r0 = threadIdx.x / 32; r0 < 2 * m; r0 += R * nw) {
        uint32_t w[R][qw_words<E>()];
        QUANT_UNROLL
        for (int i = 0; i < R; i++) {
            const uint32_t row = r0 + i * nw; // warp-uniform
            if (row < 2 * m) {
                const bool val = row >= m;
                ld_pairs<E>(s, val, h, tok(val ? row - m : row), E * lane, w[i]);
            } else {
                QUANT_UNROLL
                for (int e = 0; e < qw_words<E>(); e++)
                    w[i][e] = 0; // (nothing of it lives on into the next rows)
            }
        }
        QUANT_UNROLL
        for (int i = 0; i < R; i++) {
            const uint32_t row = r0 + i * nw;
            if (row >= 2 * m)
                break;
            const bool val = row >= m;
            const uint32_t j = val ? row - m : row;
            float x[E];
            cvt_pairs<E, ARITH>(w[i], x);
            if (rot)
                warp_hadamard<E>(x, scale);
            float *dst = (val ? sv : sk) + (size_t)j * stride + E * lane;
            if constexpr (E % 4 == 0) { // stride and the arrays are 16-byte aligned (stage_plan)
                QUANT_UNROLL
                for (int e = 0; e < E; e += 4)
                    *reinterpret_cast<float4 *>(dst + e) =
                        make_float4(x[e], x[e + 1], x[e + 2], x[e + 3]);
            } else {
                QUANT_UNROLL
                for (int e = 0; e < E; e++)
                    dst[e] = x[e];
            }
        }
    }
}

/* stage_rows_warp for the head dims it serves (32 E for E = E0, 2 E0, .. 8); false for the
 * others, which stage element by element and rotate with sm_hadamard_rows. ARITH: the halves
 * converted by fy_dev_h2f_arith (for rows whose values are only computed with). */
template <int E0 = 1, bool ARITH = false, typename F>
static __device__ bool stage_rows(const kv_src_t &s, uint32_t h, F tok, uint32_t m, float *sk,
                                  float *sv, uint32_t stride, bool rot, float scale)
{
    if (s.d == 32 * E0) {
        stage_rows_warp<E0, ARITH>(s, h, tok, m, sk, sv, stride, rot, scale);
        return true;
    }
    if constexpr (E0 < 8)
        return stage_rows<2 * E0, ARITH>(s, h, tok, m, sk, sv, stride, rot, scale);
    return false;
}

/* The per-token passes give each token TOK_LANES consecutive threads of a warp: lane l runs the
 * CPU's accumulator l (channels l, l + 8, ...) and the lanes' results are combined in the CPU's
 * order, so every value equals the serial loop's. */

/* kvc_dev_sum8 of the 8 lanes' x, in every lane: a + b == b + a exactly, so both lanes of a
 * pair hold the same sum at each level of the tree. */
static __device__ __forceinline__ float tl_sum8(float x)
{
    x = kadd(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = kadd(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return kadd(x, __shfl_xor_sync(0xffffffffu, x, 4));
}

/* kvc_row_minmax's merge of the 8 lanes' (mn, mx): lane 0's, then lanes 1 .. 7 in order. */
static __device__ __forceinline__ void tl_merge(float mn, float mx, float *lo_p, float *hi_p)
{
    float lo = __shfl_sync(0xffffffffu, mn, 0, TOK_LANES);
    float hi = __shfl_sync(0xffffffffu, mx, 0, TOK_LANES);
    QUANT_UNROLL
    for (int l = 1; l < TOK_LANES; l++) {
        const float a = __shfl_sync(0xffffffffu, mn, l, TOK_LANES);
        const float b = __shfl_sync(0xffffffffu, mx, l, TOK_LANES);
        lo = a < lo ? a : lo;
        hi = b > hi ? b : hi;
    }
    *lo_p = lo;
    *hi_p = hi;
}

/* kvc_row_minmax over element c = get(c) (lane l: channels l, l + 8, ..., then the merge), this
 * thread being lane l of its token. */
template <typename F>
static __device__ __forceinline__ void tl_minmax(F get, uint32_t d, uint32_t l, float *lo_p,
                                                 float *hi_p)
{
    float mn = get(l), mx = mn;
    for (uint32_t c = 8; c + 8 <= d; c += 8) {
        const float x = get(c + l);
        mn = x < mn ? x : mn;
        mx = x > mx ? x : mx;
    }
    tl_merge(mn, mx, lo_p, hi_p);
}

/* rotate_kernel on rows staged in shared memory (rows x d, `stride` floats apart): the same
 * butterflies in the same stages, then the same scale, so every value equals the rotated copy
 * rotate_kernel writes. The whole block calls it. */
static __device__ void sm_hadamard_rows(float *x, uint32_t rows, uint32_t d, uint32_t stride,
                                        float scale)
{
    // d is a power of two: shifts and masks instead of divisions.
    const uint32_t half = d / 2, lg_half = (uint32_t)__ffs((int)half) - 1;
    for (uint32_t len = 1, lg = 0; len < d; len <<= 1, lg++) {
        for (uint32_t i2 = threadIdx.x; i2 < rows * half; i2 += blockDim.x) {
            uint32_t r = i2 >> lg_half, j = i2 & (half - 1);
            uint32_t i = ((j >> lg) << (lg + 1)) | (j & (len - 1));
            float *row = x + (size_t)r * stride;
            float p = row[i], q = row[i + len];
            row[i] = kadd(p, q);
            row[i + len] = ksub(p, q);
        }
        __syncthreads();
    }
    for (uint32_t i2 = threadIdx.x; i2 < rows * d; i2 += blockDim.x) {
        float *px = x + (size_t)(i2 >> (lg_half + 1)) * stride + (i2 & (d - 1));
        *px = kmul(*px, scale);
    }
    __syncthreads();
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

static __device__ __forceinline__ float q_x(const quant_args_t &a, bool val, bool rot, uint32_t h,
                                            uint32_t t, uint32_t c)
{
    return src_x(a.src, val, rot, h, t, c);
}

/* Element c of the group's j-th token (t): from the staged rows, or read where it lives. */
static __device__ __forceinline__ float g_x(const quant_args_t &a, const float *sk, const float *sv,
                                            bool val, bool rot, uint32_t h, uint32_t j, uint32_t t,
                                            uint32_t c)
{
    if (a.stage)
        return (val ? sv : sk)[(size_t)j * a.d + c];
    return q_x(a, val, rot, h, t, c);
}

/* quant_kernel's shared arrays besides the staged group. */
typedef struct {
    uint32_t tok[256];
    float mn[KVC_MAX_HEAD_DIM], mx[KVC_MAX_HEAD_DIM], kz[KVC_MAX_HEAD_DIM], kinv[KVC_MAX_HEAD_DIM];
    float vz[256], vinv[256];
    uint8_t prot[KVC_MAX_HEAD_DIM];
    uint16_t pidx[KVC_MAX_PROTECT];
} quant_smem_t;

/* The range of x(0) .. x(m - 1) in order (mn = x < mn ? x : mn, from x(0)): in chunks of
 * COL_U with every load of a chunk issued before its first use (folding x(0) in again changes
 * nothing), then the rest one at a time. */
#define COL_U 16
template <typename F>
static __device__ __forceinline__ void col_range(F x, uint32_t m, float *mn_p, float *mx_p)
{
    float mn = x(0), mx = mn;
    uint32_t j0 = 0;
    for (; j0 + COL_U <= m; j0 += COL_U) {
        float v[COL_U];
        QUANT_UNROLL
        for (uint32_t u = 0; u < COL_U; u++)
            v[u] = x(j0 + u);
        QUANT_UNROLL
        for (uint32_t u = 0; u < COL_U; u++) {
            mn = v[u] < mn ? v[u] : mn;
            mx = v[u] > mx ? v[u] : mx;
        }
    }
    for (; j0 < m; j0++) {
        const float v = x(j0);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    *mn_p = mn;
    *mx_p = mx;
}

/* pack_row's bytes of m staged rows of D values (d apart) at B bits, a thread per output byte:
 * element (j, c) coded with zero zp(j, c) and inverse step inv(j, c). D and B fixed at compile
 * time: a byte's row and channel by shifts, its codes unrolled. */
template <uint32_t D, uint32_t B, typename Z, typename I>
static __device__ __forceinline__ void codes_staged(const float *x, uint32_t m, Z zp, I inv,
                                                    uint8_t *dst)
{
    constexpr uint32_t ROW = D * B / 8, PER = 8 / B;
    constexpr float Q = (float)((1u << B) - 1);
    for (uint32_t i = threadIdx.x; i < m * ROW; i += blockDim.x) {
        const uint32_t j = i / ROW, c0 = (i % ROW) * PER;
        uint32_t byte = 0;
        QUANT_UNROLL
        for (uint32_t u = 0; u < PER; u++) {
            const uint32_t c = c0 + u;
            byte |= kvc_dev_quant_one(x[j * D + c], zp(j, c), inv(j, c), Q) << (u * B);
        }
        dst[i] = (uint8_t)byte;
    }
}

template <uint32_t D, typename Z, typename I>
static __device__ __forceinline__ void codes_staged_b(const float *x, uint32_t m, uint32_t b, Z zp,
                                                      I inv, uint8_t *dst)
{
    if (b == 8)
        codes_staged<D, 8>(x, m, zp, inv, dst);
    else if (b == 4)
        codes_staged<D, 4>(x, m, zp, inv, dst);
    else
        codes_staged<D, 2>(x, m, zp, inv, dst);
}

/* quant_body's key and value codes of a staged group without protected channels at head_dim 64
 * or 128 (false for other head dims: the caller's loops write them). The same codes (the same
 * quant_one on the same values), without a division or a branch per element. */
static __device__ bool quant_codes_staged(const float *sk, const float *sv, uint32_t d, uint32_t m,
                                          uint32_t kb, uint32_t vb, const float *s_kz,
                                          const float *s_kinv, const float *s_vz,
                                          const float *s_vinv, uint8_t *kc, uint8_t *vc)
{
    auto kz = [&](uint32_t, uint32_t c) { return s_kz[c]; };
    auto ki = [&](uint32_t, uint32_t c) { return s_kinv[c]; };
    auto vz = [&](uint32_t j, uint32_t) { return s_vz[j]; };
    auto vi = [&](uint32_t j, uint32_t) { return s_vinv[j]; };
    if (d == 128) {
        codes_staged_b<128>(sk, m, kb, kz, ki, kc);
        codes_staged_b<128>(sv, m, vb, vz, vi, vc);
        return true;
    }
    if (d == 64) {
        codes_staged_b<64>(sk, m, kb, kz, ki, kc);
        codes_staged_b<64>(sv, m, vb, vz, vi, vc);
        return true;
    }
    return false;
}

/* The body of quant_kernel, one block per quantized group: quant.c's kvc_quant_group with cap =
 * m, written in place. With a.stage the group's rows are read once, coalesced, into shared
 * memory (q_sm). */
static __device__ void quant_body(const quant_args_t &a, float *q_sm, quant_smem_t &qs)
{
    // q_sm, with a.stage: [G][d] K rows, then [G][d] V rows (a.stage: the staged group size)
    float *sk = q_sm, *sv = q_sm + (size_t)a.stage * a.d;
    uint32_t *s_tok = qs.tok;
    float *s_mn = qs.mn, *s_mx = qs.mx, *s_kz = qs.kz, *s_kinv = qs.kinv;
    float *s_vz = qs.vz, *s_vinv = qs.vinv;
    uint8_t *s_prot = qs.prot;
    uint16_t *s_pidx = qs.pidx;
    uint32_t d = a.d;
    size_t n0 = a.plan->n_f16, n_work = a.plan->n_work - n0;
    for (size_t gi = blockIdx.x; gi < n_work; gi += gridDim.x) {
        work_t w = a.work[n0 + gi];
        int o = w.opt;
        uint32_t m = (uint32_t)w.m_minus_1 + 1, h = w.head;
        int kb = o == KVC_OPT_Q8 ? 8 : 4, vb = o == KVC_OPT_Q8 ? 8 : (o == KVC_OPT_Q4 ? 4 : 2);
        if (o == KVC_OPT_Q2)
            kb = 2;
        float kq = (float)((1 << kb) - 1), vq = (float)((1 << vb) - 1);
        bool rot = a.rotate && o >= KVC_OPT_Q4;
        bool prot = a.P > 0 && o >= KVC_OPT_Q4;
        uint32_t P = prot ? a.P : 0;
        uint32_t rowk = d * kb / 8, rowv = d * vb / 8;
        uint8_t *g = a.out + w.out_off;
        uint8_t *ks = g, *kz = g + 2 * d, *vs = g + 4 * d, *vz = vs + 2 * m;
        uint8_t *kc = g + 4 * d + 4 * m, *vc = kc + (size_t)m * rowk;
        __syncthreads(); // shared arrays free from the previous group
        for (uint32_t j = threadIdx.x; j < m; j += blockDim.x)
            s_tok[j] = a.tok[w.tok + j];
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x)
            s_prot[c] = 0;
        __syncthreads();
        if (a.stage) {
            bool rs = rot && !a.fused; // fused: load as given and rotate here
            auto tok = [&](uint32_t j) { return s_tok[j]; };
            // Rotated rows come out of arithmetic, which keeps no NaN payload anyway: their
            // halves convert by fy_dev_h2f_arith.
            const bool fr = rot && a.fused;
            if (rs || !(fr ? stage_rows<1, true>(a.src, h, tok, m, sk, sv, d, true, a.rot_scale)
                           : stage_rows(a.src, h, tok, m, sk, sv, d, false, a.rot_scale))) {
                for (uint32_t i = threadIdx.x; i < m * d; i += blockDim.x) {
                    uint32_t j = i / d, c = i % d;
                    sk[i] = q_x(a, false, rs, h, s_tok[j], c);
                    sv[i] = q_x(a, true, rs, h, s_tok[j], c);
                }
                __syncthreads();
                if (rot && a.fused) {
                    sm_hadamard_rows(sk, m, d, d, a.rot_scale);
                    sm_hadamard_rows(sv, m, d, d, a.rot_scale);
                }
            }
            __syncthreads();
        }
        // Key range per channel over the group, in token order.
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            if (a.stage) {
                const float *col = sk + c;
                col_range([&](uint32_t j) { return col[(size_t)j * d]; }, m, &s_mn[c], &s_mx[c]);
            } else {
                col_range([&](uint32_t j) { return q_x(a, false, rot, h, s_tok[j], c); }, m,
                          &s_mn[c], &s_mx[c]);
            }
        }
        __syncthreads();
        if (prot && threadIdx.x < 32) {
            // pick_protected: P rounds of "largest salience, lowest index on ties" among the
            // channels not taken (lanes scan their channels in order, then a shuffle tree).
            uint32_t lane = threadIdx.x;
            for (uint32_t j = 0; j < P; j++) {
                float bs = 0;
                int best = -1;
                for (uint32_t c = lane; c < d; c += 32) {
                    if (s_prot[c])
                        continue;
                    float cw = rot ? 1.0f : __fsqrt_rn(a.qsq[(size_t)h * d + c]);
                    float sal = kmul(ksub(s_mx[c], s_mn[c]), cw);
                    if (best < 0 || sal > bs) {
                        best = (int)c;
                        bs = sal;
                    }
                }
                for (int off = 16; off > 0; off >>= 1) {
                    float os = __shfl_xor_sync(0xffffffffu, bs, off);
                    int ob = __shfl_xor_sync(0xffffffffu, best, off);
                    bool take = ob >= 0 && (best < 0 || os > bs || (os == bs && ob < best));
                    if (take) {
                        bs = os;
                        best = ob;
                    }
                }
                if (lane == 0)
                    s_prot[best] = 1;
                __syncwarp();
            }
            if (lane == 0) {
                uint32_t n_p = 0;
                for (uint32_t c = 0; c < d && n_p < P; c++)
                    if (s_prot[c])
                        s_pidx[n_p++] = (uint16_t)c;
            }
        }
        __syncthreads();
        // Key parameters: protected channels at 8 bits.
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            uint16_t s16, z16;
            float s, z, inv;
            kvc_dev_asym(s_mn[c], s_mx[c], s_prot[c] ? 255.0f : kq, &s16, &z16, &s, &z, &inv);
            st16(ks + 2 * c, s16);
            st16(kz + 2 * c, z16);
            s_kz[c] = z;
            s_kinv[c] = inv;
        }
        // Value parameters per token, TOK_LANES threads a token (every thread runs the loop
        // body for the shuffles; a lane group past the end repeats the last token).
        const uint32_t l = threadIdx.x % TOK_LANES, per = blockDim.x / TOK_LANES;
        for (uint32_t j0 = 0; j0 < m; j0 += per) {
            const uint32_t jj = j0 + threadIdx.x / TOK_LANES, j = min(jj, m - 1);
            float lo, hi;
            if (a.stage) {
                const float *row = sv + (size_t)j * d;
                tl_minmax([&](uint32_t c) { return row[c]; }, d, l, &lo, &hi);
            } else {
                const uint32_t t = s_tok[j];
                tl_minmax([&](uint32_t c) { return src_x(a.src, true, rot, h, t, c); }, d, l, &lo,
                          &hi);
            }
            if (jj < m && l == 0) {
                uint16_t s16, z16;
                float s, z, inv;
                kvc_dev_asym(lo, hi, vq, &s16, &z16, &s, &z, &inv);
                st16(vs + 2 * j, s16);
                st16(vz + 2 * j, z16);
                s_vz[j] = z;
                s_vinv[j] = inv;
            }
        }
        __syncthreads();
        // Key codes, one output byte per thread step (protected channels code 0).
        if (a.stage && !prot &&
            quant_codes_staged(sk, sv, d, m, kb, vb, s_kz, s_kinv, s_vz, s_vinv, kc, vc))
            continue;
        uint32_t per_k = 8 / kb;
        for (uint32_t i = threadIdx.x; i < m * rowk; i += blockDim.x) {
            uint32_t j = i / rowk, c0 = (i % rowk) * per_k;
            uint32_t byte = 0;
            for (uint32_t q = 0; q < per_k; q++) {
                uint32_t c = c0 + q;
                uint32_t code =
                    s_prot[c] ? 0
                              : kvc_dev_quant_one(g_x(a, sk, sv, false, rot, h, j, s_tok[j], c),
                                                  s_kz[c], s_kinv[c], kq);
                byte |= code << (q * kb);
            }
            kc[i] = (uint8_t)byte;
        }
        uint32_t per_v = 8 / vb;
        for (uint32_t i = threadIdx.x; i < m * rowv; i += blockDim.x) {
            uint32_t j = i / rowv, c0 = (i % rowv) * per_v;
            uint32_t byte = 0;
            for (uint32_t q = 0; q < per_v; q++) {
                uint32_t code = kvc_dev_quant_one(g_x(a, sk, sv, true, rot, h, j, s_tok[j], c0 + q),
                                                  s_vz[j], s_vinv[j], vq);
                byte |= code << (q * vb);
            }
            vc[i] = (uint8_t)byte;
        }
        if (prot) {
            uint8_t *pi = vc + (size_t)m * rowv, *pc = pi + 2 * P;
            for (uint32_t j = threadIdx.x; j < P; j += blockDim.x)
                st16(pi + 2 * j, s_pidx[j]);
            for (uint32_t i = threadIdx.x; i < m * P; i += blockDim.x) {
                uint32_t j = i / P, c = s_pidx[i % P];
                pc[i] = (uint8_t)kvc_dev_quant_one(g_x(a, sk, sv, false, rot, h, j, s_tok[j], c),
                                                   s_kz[c], s_kinv[c], 255.0f);
            }
        }
    }
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
 * block (quant_body stages up to 32 KiB), two barriers a group instead of six, and a warp's 16
 * rows in flight at once (quant_body's staging: 8 at a time at head_dim 128). */
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
