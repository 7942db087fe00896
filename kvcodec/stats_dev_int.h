/* The distortion tables of the GPU encoder (stats_body, the body of encode.cu's stats_kernel):
 * per (kv head, token) |v - obar|^2 and the key and value errors at 8, 4 and 2 bits, trial-
 * quantized or modelled, in the CPU's exact arithmetic order (encode.c's build_items with
 * kvc_key_errors, kvc_value_errors and kvc_model_errors). Device code that two places compile:
 * kvcodec/encode.cu and tests/kvcodec/test_stats_emu.cc, which runs stats_body on host threads
 * against those CPU functions.
 *
 * Not a standalone header. The includer provides quant_rows_dev_int.h and its requirements,
 * and TAB_* (choose_dev_int.h). */
#ifndef FERRY_KVCODEC_STATS_DEV_INT_H
#define FERRY_KVCODEC_STATS_DEV_INT_H

#ifdef __CUDACC__
#define STATS_UNROLL _Pragma("unroll")
#else
#define STATS_UNROLL
#endif

#define STATS_THREADS 64
#define ST_PAD        8 // stats_body's staged rows are d + ST_PAD floats apart

typedef struct {
    kv_src_t src;
    const float *obar, *qsq; // [n_kv][d] device scores
    uint32_t n_kv, n, d, G;
    int model;  // KVC_DIST_MODEL: every width modelled
    int rotate; // widths <= 4 use the rotated rows and the mean sensitivity
    int need8, need4, needv4, need2, needk2;
    float *tab; // [TAB_COUNT][n_kv][n]
    int stage;  // the group's K and V rows of the 4/2-bit source staged in shared memory
    int fused;  // with stage and rotate: the staged rows are rotated here (no rotated copy)
    float rot_scale;
    uint32_t zero; // 0, which the compiler cannot know (ld_hn)
    int generic;   // per-token passes by stats_tok_generic even where stats_tok_staged serves
} stats_args_t;

/* Where the stats and quantizer kernels stage a group's rows in shared memory (host code):
 * where they fit the default 48 KiB beside their own arrays (G 32, d 128: 38 and 32 KiB). When
 * both do (or only the quantizer runs: not measured), a rotating policy rotates the staged rows
 * there and no rotated copy of the layer exists. */
typedef struct {
    size_t st_sm, st_sm_stage, q_stage_bytes; // stats_kernel's shared bytes unstaged, staged
    bool st_stage, q_stage, fused;
} stage_t;

static inline void stage_rule(uint32_t d, uint32_t G, bool rotate, bool measured, stage_t *sg)
{
    sg->st_sm = (size_t)10 * d * sizeof(float);
    sg->st_sm_stage = sg->st_sm + (size_t)2 * G * (d + ST_PAD) * sizeof(float);
    sg->st_stage = sg->st_sm_stage <= 40960;
    sg->q_stage_bytes = (size_t)2 * G * d * sizeof(float);
    sg->q_stage = sg->q_stage_bytes <= 32768;
    sg->fused = rotate && sg->q_stage && (!measured || sg->st_stage);
}

/* Whether the optimizer reads table ti (TAB_*) under these arguments: the ones stats_body
 * writes. */
static __host__ __device__ inline bool stats_wants(const stats_args_t &a, int ti)
{
    switch (ti) {
    case TAB_DEV:
        return true;
    case TAB_EK8:
    case TAB_EV8:
        return a.need8;
    case TAB_EK4:
        return a.need4;
    case TAB_EV4:
        return a.need4 && (a.model || a.needv4);
    case TAB_EK2:
        return a.need2 && (a.model || a.needk2);
    default: // TAB_EV2
        return a.need2;
    }
}

static __device__ __forceinline__ float st_x(const stats_args_t &a, bool val, bool rot, uint32_t h,
                                             uint32_t t, uint32_t c)
{
    return src_x(a.src, val, rot, h, t, c);
}

/* Element c of the group's token j (t0 + j): staged rows (d + ST_PAD floats apart, so that the
 * 4 tokens a warp reads at once sit in different banks) when they hold this source, else where
 * it lives. */
static __device__ __forceinline__ float st_g(const stats_args_t &a, const float *sk,
                                             const float *sv, bool val, bool rot, uint32_t h,
                                             uint32_t t0, uint32_t j, uint32_t c)
{
    if (a.stage && rot == (a.rotate != 0))
        return (val ? sv : sk)[(size_t)j * (a.d + ST_PAD) + c];
    return st_x(a, val, rot, h, t0 + j, c);
}

/* Up to LD_HN halves at p + u stride (those with u < n; the rest 0), loaded together: each
 * loaded half is folded into the first through zero (a 0 the compiler cannot see), so all of
 * them have landed before any is used. (Read one at a time behind a branch, as st_g does, each
 * half waited out a whole memory latency; 16 at once: a 32-token group's unrotated keys in two
 * round trips, a 128-channel row's lane in one.) */
#define LD_HN 16
static __device__ __forceinline__ void ld_hn(const uint16_t *p, size_t stride, uint32_t n,
                                             uint32_t zero, uint32_t (&raw)[LD_HN])
{
    uint32_t fold = 0;
    STATS_UNROLL
    for (int u = 0; u < LD_HN; u++) {
        raw[u] = (uint32_t)u < n ? (uint32_t)p[(size_t)u * stride] : 0u;
        fold ^= raw[u];
    }
    raw[0] ^= fold & zero;
}

/* The error of x after quantizing it from base lo with step s (inverse inv, codes 0 .. qmax):
 * the CPU's trial quantization, operation for operation. */
static __device__ __forceinline__ float trial_err(float x, float lo, float inv, float s, float qmax)
{
    float r = kvc_dev_round_clamp(kmul(ksub(x, lo), inv), qmax);
    return ksub(kadd(kmul(r, s), lo), x);
}

/* A token's modelled tables (step^2 / 12 a channel): 8 bits always (unrotated range
 * [ulo, uhi]); with model, 4 and 2 bits too (steps s4, s2 of the 4/2-bit source). */
static __device__ __forceinline__ void st_modelled(const stats_args_t &a, bool model,
                                                   const float *s_ke, float d, float ulo, float uhi,
                                                   float s4, float s2, size_t plane, size_t it)
{
    if (a.need8) {
        const float s8 = kdiv(ksub(uhi, ulo), 255.0f);
        a.tab[TAB_EK8 * plane + it] = s_ke[0];
        a.tab[TAB_EV8 * plane + it] = kdiv(kmul(kmul(d, s8), s8), 12.0f);
    }
    if (model && a.need4) {
        a.tab[TAB_EK4 * plane + it] = s_ke[1];
        a.tab[TAB_EV4 * plane + it] = kdiv(kmul(kmul(d, s4), s4), 12.0f);
    }
    if (model && a.need2) {
        a.tab[TAB_EK2 * plane + it] = s_ke[2];
        a.tab[TAB_EV2 * plane + it] = kdiv(kmul(kmul(d, s2), s2), 12.0f);
    }
}

/* Two of a token's accumulators summed over its lanes (tl_sum8; every thread takes part) and
 * stored by its first lane into tables t4 and t2 where on4, on2. */
static __device__ __forceinline__ void st_sums(const stats_args_t &a, bool store, int t4, bool on4,
                                               float x4, int t2, bool on2, float x2, size_t plane,
                                               size_t it)
{
    x4 = tl_sum8(x4);
    x2 = tl_sum8(x2);
    if (store && on4)
        a.tab[t4 * plane + it] = x4;
    if (store && on2)
        a.tab[t2 * plane + it] = x2;
}

/* Which per-token passes and tables stats_body's arguments ask for. */
typedef struct {
    bool kerr4, kerr2, verr4, verr2; // trial key and value errors at 4 and 2 bits
    bool want_r;                     // the V range of the 4/2-bit source
    bool rot;                        // the 4- and 2-bit widths read the rotated rows
} stats_flags_t;

static __device__ __forceinline__ stats_flags_t stats_flags(const stats_args_t &a)
{
    stats_flags_t f;
    const bool trial = !a.model;
    f.kerr4 = trial && a.need4;
    f.kerr2 = trial && a.need2 && a.needk2;
    f.verr4 = trial && a.need4 && a.needv4;
    f.verr2 = trial && a.need2;
    f.want_r = (a.model && (a.need4 || a.need2)) || f.verr4 || f.verr2;
    f.rot = a.rotate != 0;
    return f;
}

/* stats_body's per-token passes for any head_dim and source: four passes over a token's row,
 * each feeding every width that reads the same data (each accumulator keeps the CPU's own chain
 * and final tree). A token's TOK_LANES threads take one accumulator lane each. st_sm as
 * stats_body's; u_global: the unrotated V rows are read where they live (not staged). */
static __device__ void stats_tok_generic(const stats_args_t &a, const float *st_sm,
                                         const float *s_ke, float rot_kw, uint32_t h, uint32_t t0,
                                         uint32_t m, bool u_global)
{
    const uint32_t d = a.d, SS = d + ST_PAD;
    const float *sk = st_sm + 10 * d, *sv = sk + (size_t)a.G * SS;
    auto s_mn = [&](int r) { return st_sm + r * d; };
    auto s_s = [&](int w) { return st_sm + (4 + w) * d; };
    auto s_inv = [&](int w) { return st_sm + (7 + w) * d; };
    const size_t plane = (size_t)a.n_kv * a.n;
    const uint32_t zero = a.zero;
    const float *qsq = a.qsq + (size_t)h * d, *obar = a.obar + (size_t)h * d;
    const stats_flags_t f = stats_flags(a);
    const bool kerr4 = f.kerr4, kerr2 = f.kerr2, verr4 = f.verr4, verr2 = f.verr2;
    const bool want_r = f.want_r, rot = f.rot;
    const float *kmn = s_mn(rot);
    const float *s4k = s_s(1), *i4k = s_inv(1), *s2k = s_s(2), *i2k = s_inv(2);
    const uint32_t l = threadIdx.x % TOK_LANES, per = blockDim.x / TOK_LANES;
    for (uint32_t j0 = 0; j0 < m; j0 += per) {
        // Every thread runs the body (the shuffles take whole warps); a lane group past
        // the group's end repeats its last token and stores nothing.
        const uint32_t jj = j0 + threadIdx.x / TOK_LANES, j = min(jj, m - 1);
        const bool store = jj < m && l == 0;
        uint32_t t = t0 + j;
        size_t it = (size_t)h * a.n + t;
        // Pass 1, unrotated V: |v - obar|^2 (kvc_dot's lanes) and the row range; from
        // global memory (LD_HN channels of the lane at a time) unless staged.
        float dacc = 0, umn = 0, umx = 0;
        auto pass1 = [&](uint32_t c, float x) {
            float df = ksub(x, obar[c]);
            dacc = kadd(dacc, kmul(df, df));
            if (c == l) {
                umn = umx = x;
            } else {
                umn = x < umn ? x : umn;
                umx = x > umx ? x : umx;
            }
        };
        if (u_global) {
            const uint16_t *vp = a.src.v + (size_t)h * a.src.hs + (size_t)t * a.src.ts;
            for (uint32_t c0 = l; c0 < d; c0 += 8 * LD_HN) {
                uint32_t raw[LD_HN];
                ld_hn(vp + c0, 8, (d - c0 + 7) / 8, zero, raw);
                STATS_UNROLL
                for (uint32_t u = 0; u < LD_HN && c0 + 8 * u < d; u++)
                    pass1(c0 + 8 * u, fy_dev_h2f_arith((uint16_t)raw[u]));
            }
        } else {
            for (uint32_t c = l; c < d; c += 8)
                pass1(c, st_g(a, sk, sv, true, false, h, t0, j, c));
        }
        dacc = tl_sum8(dacc);
        if (store)
            a.tab[TAB_DEV * plane + it] = dacc;
        float ulo, uhi;
        tl_merge(umn, umx, &ulo, &uhi);
        // Pass 2, K of the 4/2-bit source: trial key errors of both widths.
        if (kerr4 || kerr2) {
            float k4 = 0, k2 = 0;
            for (uint32_t c = l; c < d; c += 8) {
                float x = st_g(a, sk, sv, false, rot, h, t0, j, c);
                float mn = kmn[c];
                float kw = rot ? rot_kw : qsq[c];
                if (kerr4) {
                    float err = trial_err(x, mn, i4k[c], s4k[c], 15.0f);
                    k4 = kadd(k4, kmul(kmul(kw, err), err));
                }
                if (kerr2) {
                    float err = trial_err(x, mn, i2k[c], s2k[c], 3.0f);
                    k2 = kadd(k2, kmul(kmul(kw, err), err));
                }
            }
            st_sums(a, store, TAB_EK4, kerr4, k4, TAB_EK2, kerr2, k2, plane, it);
        }
        // Pass 3, the V range of the 4/2-bit source (the unrotated one is pass 1's).
        float rlo = ulo, rhi = uhi;
        if (want_r && rot && a.stage) {
            const float *row = sv + (size_t)j * SS;
            tl_minmax([&](uint32_t c) { return row[c]; }, d, l, &rlo, &rhi);
        } else if (want_r && rot) {
            tl_minmax([&](uint32_t c) { return src_x(a.src, true, true, h, t, c); }, d, l, &rlo,
                      &rhi);
        }
        float s4 = kdiv(ksub(rhi, rlo), 15.0f), s2 = kdiv(ksub(rhi, rlo), 3.0f);
        if (store)
            st_modelled(a, a.model != 0, s_ke, (float)d, ulo, uhi, s4, s2, plane, it);
        // Pass 4, V of the 4/2-bit source: trial value errors of both widths.
        if (verr4 || verr2) {
            float i4 = s4 > 0 ? kdiv(1.0f, s4) : 0.0f, i2 = s2 > 0 ? kdiv(1.0f, s2) : 0.0f;
            float v4 = 0, v2 = 0;
            for (uint32_t c = l; c < d; c += 8) {
                float x = st_g(a, sk, sv, true, rot, h, t0, j, c);
                if (verr4) {
                    float err = trial_err(x, rlo, i4, s4, 15.0f);
                    v4 = kadd(v4, kmul(err, err));
                }
                if (verr2) {
                    float err = trial_err(x, rlo, i2, s2, 3.0f);
                    v2 = kadd(v2, kmul(err, err));
                }
            }
            st_sums(a, store, TAB_EV4, verr4, v4, TAB_EV2, verr2, v2, plane, it);
        }
    }
}

/* stats_tok_generic for head_dim D with the group staged (a.stage) and either every trial error
 * measured (TRIAL) or every width modelled (!TRIAL, a.model): the same passes on the same values
 * in the same order, bit for bit, with fewer instructions a token. Each channel loop is unrolled
 * over the lane's D / TOK_LANES channels, the passes and the source (ROT: the staged rows are
 * the rotated ones) are fixed at compile time instead of tested at every channel, the
 * per-channel tables are read at fixed offsets from one base, and each row comes into registers
 * once: the unrotated V of pass 1 (from global memory when ROT, all of a lane's loads in flight
 * together), the staged K of pass 2, the staged V of passes 3 and 4. */
template <uint32_t D, bool ROT, bool TRIAL>
static __device__ void stats_tok_staged(const stats_args_t &a, const float *st_sm,
                                        const float *s_ke, float rot_kw, uint32_t h, uint32_t t0,
                                        uint32_t m)
{
    constexpr uint32_t N = D / TOK_LANES, SS = D + ST_PAD;
    const float *sk = st_sm + 10 * D, *sv = sk + (size_t)a.G * SS;
    const size_t plane = (size_t)a.n_kv * a.n;
    const uint32_t l = threadIdx.x % TOK_LANES, per = blockDim.x / TOK_LANES;
    // This lane's channels l + 8 u of the per-channel tables (stats_body's layout) and scores.
    const float *kmn = st_sm + (ROT ? D : 0) + l, *s4k = st_sm + 5 * D + l;
    const float *s2k = st_sm + 6 * D + l, *i4k = st_sm + 8 * D + l, *i2k = st_sm + 9 * D + l;
    const float *obar = a.obar + (size_t)h * D + l, *qsq = a.qsq + (size_t)h * D + l;
    const bool want_r = TRIAL || a.need4 || a.need2; // the V range of the 4/2-bit source
    for (uint32_t j0 = 0; j0 < m; j0 += per) {
        // As stats_tok_generic: a lane group past the group's end repeats its last token.
        const uint32_t jj = j0 + threadIdx.x / TOK_LANES, j = min(jj, m - 1);
        const bool store = jj < m && l == 0;
        const uint32_t t = t0 + j;
        const size_t it = (size_t)h * a.n + t;
        const float *krow = sk + (size_t)j * SS + l, *vrow = sv + (size_t)j * SS + l;
        // Pass 1, unrotated V: |v - obar|^2 and the row range.
        float uv[N];
        if constexpr (ROT) {
            const uint16_t *vp = a.src.v + (size_t)h * a.src.hs + (size_t)t * a.src.ts + l;
            STATS_UNROLL
            for (uint32_t u = 0; u < N; u++)
                uv[u] = fy_dev_h2f_arith(vp[8 * u]);
        } else {
            STATS_UNROLL
            for (uint32_t u = 0; u < N; u++)
                uv[u] = vrow[8 * u];
        }
        float dacc = 0, umn = uv[0], umx = uv[0];
        STATS_UNROLL
        for (uint32_t u = 0; u < N; u++) {
            const float x = uv[u], df = ksub(x, obar[8 * u]);
            dacc = kadd(dacc, kmul(df, df));
            if (u > 0) {
                umn = x < umn ? x : umn;
                umx = x > umx ? x : umx;
            }
        }
        dacc = tl_sum8(dacc);
        if (store)
            a.tab[TAB_DEV * plane + it] = dacc;
        float ulo, uhi;
        tl_merge(umn, umx, &ulo, &uhi);
        // Pass 2, staged K: trial key errors of both widths.
        if constexpr (TRIAL) {
            float k4 = 0, k2 = 0;
            STATS_UNROLL
            for (uint32_t u = 0; u < N; u++) {
                const uint32_t c = 8 * u;
                const float x = krow[c], mn = kmn[c], kw = ROT ? rot_kw : qsq[c];
                const float e4 = trial_err(x, mn, i4k[c], s4k[c], 15.0f);
                k4 = kadd(k4, kmul(kmul(kw, e4), e4));
                const float e2 = trial_err(x, mn, i2k[c], s2k[c], 3.0f);
                k2 = kadd(k2, kmul(kmul(kw, e2), e2));
            }
            st_sums(a, store, TAB_EK4, true, k4, TAB_EK2, true, k2, plane, it);
        }
        // Pass 3, the V range of the staged (rotated) rows; unrotated, pass 1's.
        float xv[N];
        STATS_UNROLL
        for (uint32_t u = 0; u < N; u++)
            xv[u] = ROT ? vrow[8 * u] : uv[u];
        float rlo = ulo, rhi = uhi;
        if (ROT && want_r) {
            float mn = xv[0], mx = xv[0];
            STATS_UNROLL
            for (uint32_t u = 1; u < N; u++) {
                mn = xv[u] < mn ? xv[u] : mn;
                mx = xv[u] > mx ? xv[u] : mx;
            }
            tl_merge(mn, mx, &rlo, &rhi);
        }
        const float s4 = kdiv(ksub(rhi, rlo), 15.0f), s2 = kdiv(ksub(rhi, rlo), 3.0f);
        if (store)
            st_modelled(a, !TRIAL, s_ke, (float)D, ulo, uhi, s4, s2, plane, it);
        // Pass 4, staged V: trial value errors of both widths.
        if constexpr (TRIAL) {
            const float i4 = s4 > 0 ? kdiv(1.0f, s4) : 0.0f, i2 = s2 > 0 ? kdiv(1.0f, s2) : 0.0f;
            float v4 = 0, v2 = 0;
            STATS_UNROLL
            for (uint32_t u = 0; u < N; u++) {
                const float e4 = trial_err(xv[u], rlo, i4, s4, 15.0f);
                v4 = kadd(v4, kmul(e4, e4));
                const float e2 = trial_err(xv[u], rlo, i2, s2, 3.0f);
                v2 = kadd(v2, kmul(e2, e2));
            }
            st_sums(a, store, TAB_EV4, true, v4, TAB_EV2, true, v2, plane, it);
        }
    }
}

template <uint32_t D>
static __device__ void stats_tok_d(const stats_args_t &a, bool rot, bool trial, const float *st_sm,
                                   const float *s_ke, float rot_kw, uint32_t h, uint32_t t0,
                                   uint32_t m)
{
    if (rot && trial)
        stats_tok_staged<D, true, true>(a, st_sm, s_ke, rot_kw, h, t0, m);
    else if (rot)
        stats_tok_staged<D, true, false>(a, st_sm, s_ke, rot_kw, h, t0, m);
    else if (trial)
        stats_tok_staged<D, false, true>(a, st_sm, s_ke, rot_kw, h, t0, m);
    else
        stats_tok_staged<D, false, false>(a, st_sm, s_ke, rot_kw, h, t0, m);
}

/* stats_body's per-token passes: stats_tok_staged where it serves (head_dim 64 and 128, the
 * group staged, every trial error or none; not a.generic), else stats_tok_generic. */
static __device__ void stats_tokens(const stats_args_t &a, const float *st_sm, const float *s_ke,
                                    float rot_kw, uint32_t h, uint32_t t0, uint32_t m,
                                    bool u_global)
{
    const stats_flags_t f = stats_flags(a);
    const bool trial = f.kerr4 && f.kerr2 && f.verr4 && f.verr2;
    if (a.stage && !a.generic && (trial || a.model)) {
        if (a.d == 128) {
            stats_tok_d<128>(a, f.rot, trial, st_sm, s_ke, rot_kw, h, t0, m);
            return;
        }
        if (a.d == 64) {
            stats_tok_d<64>(a, f.rot, trial, st_sm, s_ke, rot_kw, h, t0, m);
            return;
        }
    }
    stats_tok_generic(a, st_sm, s_ke, rot_kw, h, t0, m, u_global);
}

/* The body of stats_kernel, one block per (kv head, group of G consecutive tokens): the
 * distortion inputs of build_items. Shared memory: st_sm (per channel, sized by head_dim so
 * that small heads leave room for more blocks: range [unrotated, rotated], and per width slot
 * (8, 4, 2 bits) the step and 1 / step, [10][d]; then with a.stage the K and V rows, [G][d +
 * ST_PAD] each), s_ke[3] (the modelled key error per width slot) and *s_kwrot_p. */
static __device__ void stats_body(const stats_args_t &a, float *st_sm, float *s_ke,
                                  float *s_kwrot_p)
{
    const uint32_t d = a.d, SS = d + ST_PAD;
    float *sk = st_sm + 10 * d, *sv = sk + (size_t)a.G * SS;
    // (Offsets, not arrays of pointers: a runtime index into those puts them in local memory.)
    auto s_mn = [&](int r) { return st_sm + r * d; };
    auto s_mx = [&](int r) { return st_sm + (2 + r) * d; };
    auto s_s = [&](int w) { return st_sm + (4 + w) * d; };
    auto s_inv = [&](int w) { return st_sm + (7 + w) * d; };
    float &s_kwrot = *s_kwrot_p;
    uint32_t chunks = (a.n + a.G - 1) / a.G;
    for (size_t blk = blockIdx.x; blk < (size_t)a.n_kv * chunks; blk += gridDim.x) {
        uint32_t h = (uint32_t)(blk / chunks);
        uint32_t t0 = (uint32_t)(blk % chunks) * a.G;
        uint32_t m = min(a.G, a.n - t0);
        const float *qsq = a.qsq + (size_t)h * d;
        __syncthreads(); // shared arrays free from the previous block
        if (a.stage) {
            bool rs = a.rotate != 0 && !a.fused; // fused: load as given and rotate here
            auto tok = [&](uint32_t j) { return t0 + j; };
            if (rs ||
                !stage_rows<1, true>(a.src, h, tok, m, sk, sv, SS, a.fused != 0, a.rot_scale)) {
                for (uint32_t i = threadIdx.x; i < m * d; i += blockDim.x) {
                    uint32_t j = i / d, c = i % d;
                    sk[(size_t)j * SS + c] = st_x(a, false, rs, h, t0 + j, c);
                    sv[(size_t)j * SS + c] = st_x(a, true, rs, h, t0 + j, c);
                }
                __syncthreads();
                if (a.fused) {
                    sm_hadamard_rows(sk, m, d, SS, a.rot_scale);
                    sm_hadamard_rows(sv, m, d, SS, a.rot_scale);
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            float s = 0;
            for (uint32_t c = 0; c < d; c++)
                s = kadd(s, qsq[c]);
            s_kwrot = kdiv(s, (float)d);
        }
        // Per-channel min/max over the group: [0] unrotated, [1] rotated. The unrotated keys
        // are not staged under a rotating policy: read from global memory, 16 tokens in flight.
        const bool u_global = a.rotate || !a.stage;
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            for (int r = 0; r < (a.rotate ? 2 : 1); r++) {
                float mn = 0, mx = 0;
                if (r == 0 && u_global) {
                    const uint16_t *kp = a.src.k + (size_t)h * a.src.hs + (size_t)t0 * a.src.ts + c;
                    col_range(
                        [&](uint32_t j) { return fy_dev_h2f_arith(kp[(size_t)j * a.src.ts]); }, m,
                        &mn, &mx);
                } else if (a.stage) { // the staged rows hold this source
                    const float *col = sk + c;
                    col_range([&](uint32_t j) { return col[(size_t)j * SS]; }, m, &mn, &mx);
                } else {
                    col_range([&](uint32_t j) { return st_x(a, false, r == 1, h, t0 + j, c); }, m,
                              &mn, &mx);
                }
                s_mn(r)[c] = mn;
                s_mx(r)[c] = mx;
            }
        }
        __syncthreads();
        // Per width: step and its inverse per channel; width slot w: 0 -> 8, 1 -> 4, 2 -> 2 bits.
        for (int w = 0; w < 3; w++) {
            int b = w == 0 ? 8 : (w == 1 ? 4 : 2);
            bool rot = a.rotate && b <= 4;
            float qmax = (float)((1 << b) - 1);
            for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
                float s = kdiv(ksub(s_mx(rot)[c], s_mn(rot)[c]), qmax);
                s_s(w)[c] = s;
                s_inv(w)[c] = s > 0 ? kdiv(1.0f, s) : 0.0f;
            }
        }
        __syncthreads();
        // Modelled key error (a serial sum over channels, as kvc_model_errors).
        if (threadIdx.x < 3) {
            int w = threadIdx.x, b = w == 0 ? 8 : (w == 1 ? 4 : 2);
            bool rot = a.rotate && b <= 4;
            float ke = 0;
            for (uint32_t c = 0; c < d; c++) {
                float kw = rot ? s_kwrot : qsq[c];
                ke = kadd(ke, kmul(kmul(kw, s_s(w)[c]), s_s(w)[c]));
            }
            s_ke[w] = kdiv(ke, 12.0f);
        }
        __syncthreads();
        stats_tokens(a, st_sm, s_ke, s_kwrot, h, t0, m, u_global);
    }
}

#endif
