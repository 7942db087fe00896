/*
 * quant.c: the quantizers every other part of kvcodec shares, so the frame, the pages and the
 * conversion reconstruct identical values.
 *
 * Asymmetric min/max, round to nearest, FP16 scale and zero. The zero is min rounded DOWN to
 * FP16 and the scale (max - zero) / qmax rounded UP, so every input lies in
 * [zero, zero + qmax * scale] and the reconstruction error of an element is at most scale / 2
 * (plus fp32 rounding). All arithmetic is plain fp32 in a fixed order (no FMA contraction in
 * C11 mode, no reassociation), so encoding is bit-exact across runs and machines.
 */
#include <math.h>

#include "kvcodec_int.h"

static const struct {
    const char *name;
    int kbits, vbits;
} k_opts[KVC_OPT_COUNT] = {
    {"16/16", 16, 16}, {"8/8", 8, 8}, {"4/4", 4, 4}, {"4/2", 4, 2}, {"2/2", 2, 2}, {"drop", 0, 0},
};

const char *kvc_opt_name(kvc_opt_t opt)
{
    return (unsigned)opt < KVC_OPT_COUNT ? k_opts[opt].name : "?";
}

int kvc_opt_kbits(kvc_opt_t opt)
{
    return (unsigned)opt < KVC_OPT_COUNT ? k_opts[opt].kbits : 0;
}

int kvc_opt_vbits(kvc_opt_t opt)
{
    return (unsigned)opt < KVC_OPT_COUNT ? k_opts[opt].vbits : 0;
}

fy_status_t kvc_opt_parse(const char *s, kvc_opt_t *opt_p)
{
    static const struct {
        const char *alias;
        kvc_opt_t opt;
    } aliases[] = {{"fp16", KVC_OPT_F16}, {"int8", KVC_OPT_Q8}, {"int4", KVC_OPT_Q4},
                   {"int2", KVC_OPT_Q2},  {"evict", KVC_OPT_DROP}};
    if (s == NULL)
        return FY_ERR_INVALID_ARG;
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        if (strcmp(s, k_opts[o].name) == 0) {
            *opt_p = (kvc_opt_t)o;
            return FY_OK;
        }
    }
    for (size_t i = 0; i < FY_ARRAY_SIZE(aliases); i++) {
        if (strcmp(s, aliases[i].alias) == 0) {
            *opt_p = aliases[i].opt;
            return FY_OK;
        }
    }
    return FY_ERR_INVALID_ARG;
}

/* ---- FP16 directed rounding ---- */

static uint16_t fp16_step_down(uint16_t h)
{
    if (h == 0x0000)
        return 0x8001;
    return (h & 0x8000) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}

static uint16_t fp16_step_up(uint16_t h)
{
    if (h == 0x8000)
        return 0x0001;
    return (h & 0x8000) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}

static uint16_t fp16_clamp_finite(uint16_t h)
{
    if ((h & 0x7fff) >= 0x7c00) // inf or NaN: the largest finite value of that sign
        return (h & 0x8000) ? 0xfbff : 0x7bff;
    return h;
}

/* Largest FP16 <= x (finite). */
static uint16_t fp16_floor(float x)
{
    uint16_t h = fp16_clamp_finite(fy_fp32_to_fp16(x));
    if (fy_fp16_to_fp32(h) > x && h != 0xfbff)
        h = fp16_step_down(h);
    return h;
}

/* Smallest FP16 >= x (finite, clamped to 65504). */
static uint16_t fp16_ceil(float x)
{
    uint16_t h = fp16_clamp_finite(fy_fp32_to_fp16(x));
    if (fy_fp16_to_fp32(h) < x && h != 0x7bff)
        h = fp16_step_up(h);
    return h;
}

/* Buffer versions (F16C through common's buffer conversion, which is bit-identical to the
 * scalar one), with the directed fix-up only where round-to-nearest went the wrong way. */
static void fp16_floor_buf(const float *x, uint32_t n, uint16_t *h, float *hf)
{
    fy_fp32_to_fp16_buf(h, x, n);
    fy_fp16_to_fp32_buf(hf, h, n);
    for (uint32_t i = 0; i < n; i++) {
        if ((h[i] & 0x7fff) >= 0x7c00) {
            h[i] = fp16_floor(x[i]);
            hf[i] = fy_fp16_to_fp32(h[i]);
        } else if (hf[i] > x[i] && h[i] != 0xfbff) { // rounded up: one FP16 step down
            h[i] = fp16_step_down(h[i]);
            hf[i] = fy_fp16_to_fp32(h[i]);
        }
    }
}

static void fp16_ceil_buf(const float *x, uint32_t n, uint16_t *h, float *hf)
{
    fy_fp32_to_fp16_buf(h, x, n);
    fy_fp16_to_fp32_buf(hf, h, n);
    for (uint32_t i = 0; i < n; i++) {
        if ((h[i] & 0x7fff) >= 0x7c00) {
            h[i] = fp16_ceil(x[i]);
            hf[i] = fy_fp16_to_fp32(h[i]);
        } else if (hf[i] < x[i] && h[i] != 0x7bff) { // rounded down: one FP16 step up
            h[i] = fp16_step_up(h[i]);
            hf[i] = fy_fp16_to_fp32(h[i]);
        }
    }
}

/* Scale and zero for n ranges [mn, mx] at qmax levels: FP16 bits and their fp32 values. */
static void asym_params_buf(const float *mn, const float *mx, uint32_t n, float qmax,
                            uint16_t *s16, uint16_t *z16, float *s, float *z, float *inv)
{
    float tmp[KVC_MAX_HEAD_DIM > 256 ? KVC_MAX_HEAD_DIM : 256];
    fp16_floor_buf(mn, n, z16, z);
    for (uint32_t i = 0; i < n; i++) {
        float v = (mx[i] - z[i]) / qmax;
        tmp[i] = v > 0 ? v : 0;
    }
    fp16_ceil_buf(tmp, n, s16, s);
    for (uint32_t i = 0; i < n; i++)
        inv[i] = s[i] > 0 ? 1.0f / s[i] : 0.0f;
}

/* Round to nearest (ties to even) by the 1.5 * 2^23 trick: exact for |x| < 2^22 and free of
 * int conversions, so it vectorizes. No fast-math, so (x + M) - M is not folded away. */
#define KVC_ROUND_MAGIC 12582912.0f

/* clamp(round(x), 0, qmax), NaN to 0, as round(clamp(x, 0, qmax)): rounding is monotonic and
 * the bounds are integers, so clamping first gives the same code for every float (all 2^32
 * inputs checked at 2, 4 and 8 bits), and keeps x + M exact. */
static inline float round_clamp(float x, float qmax)
{
    x = x > 0.0f ? x : 0.0f; // NaN lands here as 0
    x = x < qmax ? x : qmax;
    return (x + KVC_ROUND_MAGIC) - KVC_ROUND_MAGIC;
}

/* The same rounding on 8 lanes (masks instead of branches). */
#define KVC_SEL(m, a, b) ((kvc_v8)(((m) & (kvc_v8i)(a)) | (~(m) & (kvc_v8i)(b))))
#define KVC_ROUND_CLAMP8(r, x, qmax8, magic8, zero8)                                               \
    do {                                                                                           \
        kvc_v8 x_ = (x);                                                                           \
        x_ = KVC_SEL(x_ > (zero8), x_, (zero8));                                                   \
        x_ = KVC_SEL(x_ < (qmax8), x_, (qmax8));                                                   \
        (r) = (x_ + (magic8)) - (magic8);                                                          \
    } while (0)

static inline uint8_t quant_one(float x, float z, float inv, float qmax)
{
    return (uint8_t)round_clamp((x - z) * inv, qmax);
}

static inline __attribute__((always_inline)) void pack_row(const uint8_t *codes, uint32_t d,
                                                           int bits, uint8_t *dst)
{
    if (bits == 8) {
        memcpy(dst, codes, d);
    } else if (bits == 4) {
        for (uint32_t c = 0; c < d / 2; c++)
            dst[c] = (uint8_t)(codes[2 * c] | (codes[2 * c + 1] << 4));
    } else {
        for (uint32_t c = 0; c < d / 4; c++)
            dst[c] = (uint8_t)(codes[4 * c] | (codes[4 * c + 1] << 2) | (codes[4 * c + 2] << 4) |
                               (codes[4 * c + 3] << 6));
    }
}

/* Every byte's four 2-bit codes as floats, low bits first. */
#define KVC_U2(b)                                                                                  \
    {                                                                                              \
        (float)((b)&3), (float)(((b) >> 2) & 3), (float)(((b) >> 4) & 3), (float)((b) >> 6)        \
    }
#define KVC_X16(F, h)                                                                              \
    F(16 * (h) + 0), F(16 * (h) + 1), F(16 * (h) + 2), F(16 * (h) + 3), F(16 * (h) + 4),           \
        F(16 * (h) + 5), F(16 * (h) + 6), F(16 * (h) + 7), F(16 * (h) + 8), F(16 * (h) + 9),       \
        F(16 * (h) + 10), F(16 * (h) + 11), F(16 * (h) + 12), F(16 * (h) + 13), F(16 * (h) + 14),  \
        F(16 * (h) + 15)
#define KVC_X256(F)                                                                                \
    KVC_X16(F, 0), KVC_X16(F, 1), KVC_X16(F, 2), KVC_X16(F, 3), KVC_X16(F, 4), KVC_X16(F, 5),      \
        KVC_X16(F, 6), KVC_X16(F, 7), KVC_X16(F, 8), KVC_X16(F, 9), KVC_X16(F, 10),                \
        KVC_X16(F, 11), KVC_X16(F, 12), KVC_X16(F, 13), KVC_X16(F, 14), KVC_X16(F, 15)
static const float g_unpack2[256][4] = {KVC_X256(KVC_U2)};

KVC_HOT void kvc_unpack_row(const uint8_t *src, uint32_t d, int bits, float *dst)
{
    if (bits == 8) {
        for (uint32_t c = 0; c < d; c++)
            dst[c] = (float)src[c];
        return;
    }
    if (bits == 4) { // the compiler vectorizes this one well
        for (uint32_t c = 0; c < d / 2; c++) {
            dst[2 * c] = (float)(src[c] & 15);
            dst[2 * c + 1] = (float)(src[c] >> 4);
        }
    } else {
        for (uint32_t c = 0; c < d / 4; c++)
            memcpy(dst + 4 * c, g_unpack2[src[c]], sizeof(g_unpack2[0]));
    }
}

/* Minimum and maximum of a row (8 independent lanes, then merged in lane order). */
static inline __attribute__((always_inline)) void kvc_row_minmax(const float *x, uint32_t d,
                                                                 float *mn_p, float *mx_p)
{
    float a = x[0], b = x[0];
    uint32_t c = 0;
    if (d >= 8) {
        kvc_v8 mn, mx, v;
        KVC_V8_LOAD(mn, x);
        mx = mn;
        for (c = 8; c + 8 <= d; c += 8) {
            KVC_V8_LOAD(v, x + c);
            kvc_v8i lt = v < mn, gt = v > mx;
            mn = (kvc_v8)((lt & (kvc_v8i)v) | (~lt & (kvc_v8i)mn));
            mx = (kvc_v8)((gt & (kvc_v8i)v) | (~gt & (kvc_v8i)mx));
        }
        a = mn[0];
        b = mx[0];
        for (int j = 1; j < 8; j++) {
            a = mn[j] < a ? mn[j] : a;
            b = mx[j] > b ? mx[j] : b;
        }
    }
    for (; c < d; c++) {
        a = x[c] < a ? x[c] : a;
        b = x[c] > b ? x[c] : b;
    }
    *mn_p = a;
    *mx_p = b;
}

void kvc_load_rows(const uint16_t *src, size_t stride, uint32_t n, uint32_t d, float *dst)
{
    if (stride == d) { // one run: one call
        fy_fp16_to_fp32_buf(dst, src, (size_t)n * d);
        return;
    }
    for (uint32_t t = 0; t < n; t++)
        fy_fp16_to_fp32_buf(dst + (size_t)t * d, src + (size_t)t * stride, d);
}

/* Per-channel minimum and maximum over m rows of d floats (m >= 1). */
static inline __attribute__((always_inline)) void col_minmax(const float *k, uint32_t d,
                                                             uint32_t m, float *mn, float *mx)
{
    memcpy(mn, k, d * sizeof(float));
    memcpy(mx, k, d * sizeof(float));
    for (uint32_t t = 1; t < m; t++) {
        const float *row = k + (size_t)t * d;
        for (uint32_t c = 0; c < d; c++) {
            mn[c] = row[c] < mn[c] ? row[c] : mn[c];
            mx[c] = row[c] > mx[c] ? row[c] : mx[c];
        }
    }
}

/* Per-group parameters in fp32, decoded from the FP16 values actually stored. */
typedef struct {
    float ks[KVC_MAX_HEAD_DIM], kz[KVC_MAX_HEAD_DIM], kinv[KVC_MAX_HEAD_DIM];
} kparams_t;

static void pick_protected(const float *mn, const float *mx, const float *chan_w, uint32_t d,
                           uint32_t P, uint16_t *pidx);

/* Per-channel parameters of a key group; the P protected channels (picked into pidx) get
 * 8-bit parameters. */
static void key_params(const float *k, uint32_t d, uint32_t m, float qmax, uint8_t *dst_s,
                       uint8_t *dst_z, kparams_t *p, uint32_t P, const float *chan_w,
                       uint16_t *pidx)
{
    float mn[KVC_MAX_HEAD_DIM], mx[KVC_MAX_HEAD_DIM];
    col_minmax(k, d, m, mn, mx);
    uint16_t s16[KVC_MAX_HEAD_DIM], z16[KVC_MAX_HEAD_DIM];
    asym_params_buf(mn, mx, d, qmax, s16, z16, p->ks, p->kz, p->kinv);
    if (P > 0) {
        pick_protected(mn, mx, chan_w, d, P, pidx);
        float pmn[KVC_MAX_PROTECT], pmx[KVC_MAX_PROTECT], ps[KVC_MAX_PROTECT],
            pz[KVC_MAX_PROTECT], pinv[KVC_MAX_PROTECT];
        uint16_t ps16[KVC_MAX_PROTECT], pz16[KVC_MAX_PROTECT];
        for (uint32_t j = 0; j < P; j++) {
            pmn[j] = mn[pidx[j]];
            pmx[j] = mx[pidx[j]];
        }
        asym_params_buf(pmn, pmx, P, 255.0f, ps16, pz16, ps, pz, pinv);
        for (uint32_t j = 0; j < P; j++) {
            uint32_t c = pidx[j];
            s16[c] = ps16[j];
            z16[c] = pz16[j];
            p->ks[c] = ps[j];
            p->kz[c] = pz[j];
            p->kinv[c] = pinv[j];
        }
    }
    if (dst_s) {
        for (uint32_t c = 0; c < d; c++) {
            kvc_wr16(dst_s + 2 * c, s16[c]);
            kvc_wr16(dst_z + 2 * c, z16[c]);
        }
    }
}

/* The P most salient channels, ascending (ties to the lower index). */
static void pick_protected(const float *mn, const float *mx, const float *chan_w, uint32_t d,
                           uint32_t P, uint16_t *pidx)
{
    uint8_t taken[KVC_MAX_HEAD_DIM] = {0};
    for (uint32_t j = 0; j < P; j++) {
        int best = -1;
        float bs = 0;
        for (uint32_t c = 0; c < d; c++) {
            if (taken[c])
                continue;
            float sal = (mx[c] - mn[c]) * (chan_w ? chan_w[c] : 1.0f);
            if (best < 0 || sal > bs) {
                best = (int)c;
                bs = sal;
            }
        }
        taken[best] = 1;
    }
    uint32_t j = 0;
    for (uint32_t c = 0; c < d && j < P; c++)
        if (taken[c])
            pidx[j++] = (uint16_t)c;
}

KVC_HOT void kvc_quant_group(int o, uint32_t d, uint32_t m, uint32_t cap, uint32_t P,
                             const float *chan_w, const float *k, const float *v, uint8_t *dst)
{
    if (o == KVC_OPT_F16) {
        uint16_t tmp[KVC_MAX_HEAD_DIM]; // dst may sit at any byte offset of a frame
        fy_fp32_to_fp16_buf(tmp, k, d);
        memcpy(dst, tmp, 2 * (size_t)d);
        fy_fp32_to_fp16_buf(tmp, v, d);
        memcpy(dst + 2 * d, tmp, 2 * (size_t)d);
        return;
    }
    int kb = kvc_opt_kbits((kvc_opt_t)o), vb = kvc_opt_vbits((kvc_opt_t)o);
    float kq = (float)((1 << kb) - 1), vq = (float)((1 << vb) - 1);
    size_t rowk = (size_t)d * kb / 8, rowv = (size_t)d * vb / 8;
    uint8_t *ks = dst, *kz = dst + 2 * d, *vs = dst + 4 * d, *vz = vs + 2 * cap;
    uint8_t *kc = dst + 4 * d + 4 * (size_t)cap, *vc = kc + (size_t)cap * rowk;
    kparams_t p;
    bool prot = P > 0 && kvc_opt_protectable(o);
    uint16_t pidx[KVC_MAX_PROTECT];
    key_params(k, d, m, kq, ks, kz, &p, prot ? P : 0, chan_w, pidx);
    uint8_t codes[KVC_MAX_HEAD_DIM];
    for (uint32_t t = 0; t < m; t++) {
        const float *row = k + (size_t)t * d;
        for (uint32_t c = 0; c < d; c++)
            codes[c] = quant_one(row[c], p.kz[c], p.kinv[c], kq);
        for (uint32_t j = 0; prot && j < P; j++)
            codes[pidx[j]] = 0; // carried by the 8-bit block
        pack_row(codes, d, kb, kc + t * rowk);
    }
    if (prot) {
        uint8_t *pi = dst + kvc_group_bytes(o, d, cap, 0), *pc = pi + 2 * P;
        for (uint32_t j = 0; j < P; j++)
            kvc_wr16(pi + 2 * j, pidx[j]);
        for (uint32_t t = 0; t < m; t++)
            for (uint32_t j = 0; j < P; j++) {
                uint32_t c = pidx[j];
                pc[t * P + j] = quant_one(k[(size_t)t * d + c], p.kz[c], p.kinv[c], 255.0f);
            }
        if (cap > m)
            memset(pc + (size_t)m * P, 0, (size_t)(cap - m) * P);
    }
    float vmn[256] = {0}, vmx[256] = {0}, sv[256], zv[256], iv[256];
    uint16_t sv16[256], zv16[256];
    for (uint32_t t = 0; t < m; t++)
        kvc_row_minmax(v + (size_t)t * d, d, &vmn[t], &vmx[t]);
    asym_params_buf(vmn, vmx, m, vq, sv16, zv16, sv, zv, iv);
    for (uint32_t t = 0; t < m; t++) {
        const float *row = v + (size_t)t * d;
        kvc_wr16(vs + 2 * t, sv16[t]);
        kvc_wr16(vz + 2 * t, zv16[t]);
        for (uint32_t c = 0; c < d; c++)
            codes[c] = quant_one(row[c], zv[t], iv[t], vq);
        pack_row(codes, d, vb, vc + t * rowv);
    }
    // Unused capacity stays zero so pages and frames never carry stale bytes.
    if (cap > m) {
        memset(vs + 2 * m, 0, 2 * (size_t)(cap - m));
        memset(vz + 2 * m, 0, 2 * (size_t)(cap - m));
        memset(kc + m * rowk, 0, (cap - m) * rowk);
        memset(vc + m * rowv, 0, (cap - m) * rowv);
    }
}

void kvc_dequant_group(int o, uint32_t d, uint32_t m, uint32_t cap, uint32_t P,
                       const uint8_t *src, float *k, float *v)
{
    if (o == KVC_OPT_F16) {
        for (uint32_t c = 0; c < d; c++) {
            k[c] = fy_fp16_to_fp32(kvc_rd16(src + 2 * c));
            v[c] = fy_fp16_to_fp32(kvc_rd16(src + 2 * d + 2 * c));
        }
        return;
    }
    int kb = kvc_opt_kbits((kvc_opt_t)o), vb = kvc_opt_vbits((kvc_opt_t)o);
    size_t rowk = (size_t)d * kb / 8, rowv = (size_t)d * vb / 8;
    const uint8_t *ks = src, *kz = src + 2 * d, *vs = src + 4 * d, *vz = vs + 2 * cap;
    const uint8_t *kc = src + 4 * d + 4 * (size_t)cap, *vc = kc + (size_t)cap * rowk;
    float s[KVC_MAX_HEAD_DIM], z[KVC_MAX_HEAD_DIM], codes[KVC_MAX_HEAD_DIM];
    for (uint32_t c = 0; c < d; c++) {
        s[c] = fy_fp16_to_fp32(kvc_rd16(ks + 2 * c));
        z[c] = fy_fp16_to_fp32(kvc_rd16(kz + 2 * c));
    }
    for (uint32_t t = 0; t < m; t++) {
        kvc_unpack_row(kc + t * rowk, d, kb, codes);
        float *row = k + (size_t)t * d;
        for (uint32_t c = 0; c < d; c++)
            row[c] = codes[c] * s[c] + z[c];
    }
    if (P > 0 && kvc_opt_protectable(o)) {
        const uint8_t *pi = src + kvc_group_bytes(o, d, cap, 0), *pc = pi + 2 * P;
        for (uint32_t j = 0; j < P; j++) {
            uint32_t c = kvc_rd16(pi + 2 * j);
            for (uint32_t t = 0; t < m; t++)
                k[(size_t)t * d + c] = (float)pc[t * P + j] * s[c] + z[c];
        }
    }
    for (uint32_t t = 0; t < m; t++) {
        float sv = fy_fp16_to_fp32(kvc_rd16(vs + 2 * t));
        float zv = fy_fp16_to_fp32(kvc_rd16(vz + 2 * t));
        kvc_unpack_row(vc + t * rowv, d, vb, codes);
        float *row = v + (size_t)t * d;
        for (uint32_t c = 0; c < d; c++)
            row[c] = codes[c] * sv + zv;
    }
}

/* Rounding constants of one bit width, broadcast. */
typedef struct {
    kvc_v8 q8, magic8, zero8;
} round8_t;

static inline void round8_init(round8_t *r, float qmax)
{
    kvc_v8 z = {0};
    r->q8 = z + qmax;
    r->magic8 = z + KVC_ROUND_MAGIC;
    r->zero8 = z;
}

/* The squared error of x quantized with zero vmn and step vs (1 / step: vinv). */
#define KVC_TRIAL_ERR8(err, x, vmn, vinv, vs, R)                                                   \
    do {                                                                                           \
        kvc_v8 code_;                                                                              \
        KVC_ROUND_CLAMP8(code_, ((x) - (vmn)) * (vinv), (R).q8, (R).magic8, (R).zero8);            \
        (err) = code_ * (vs) + (vmn) - (x);                                                        \
    } while (0)

/* Modelled errors: a uniform quantizer with step s has mean squared error s^2 / 12. */
KVC_HOT void kvc_model_errors(int bits, uint32_t d, uint32_t m, const float *k, const float *v,
                              const float *kw, float *errk, float *errv)
{
    float qmax = (float)((1 << bits) - 1);
    float mn[KVC_MAX_HEAD_DIM], mx[KVC_MAX_HEAD_DIM];
    col_minmax(k, d, m, mn, mx);
    float ke = 0;
    for (uint32_t c = 0; c < d; c++) {
        float s = (mx[c] - mn[c]) / qmax;
        ke += kw[c] * s * s;
    }
    ke /= 12.0f;
    // Every row's range, then the steps of all rows (the divisions vectorize across rows).
    float vmn[KVC_MAX_GROUP], vmx[KVC_MAX_GROUP];
    for (uint32_t t = 0; t < m; t++)
        kvc_row_minmax(v + (size_t)t * d, d, &vmn[t], &vmx[t]);
    for (uint32_t t = 0; t < m; t++) {
        float s = (vmx[t] - vmn[t]) / qmax;
        errk[t] = ke;
        errv[t] = (float)d * s * s / 12.0f;
    }
}

/* Trial quantization uses the same rounding rule with fp32 scale and zero (the FP16 rounding
 * of the stored parameters changes the error by well under a percent, and skipping it keeps
 * trial quantization cheap). */
KVC_HOT void kvc_key_errors2(int b1, float *err1, int b2, float *err2, uint32_t d, uint32_t m,
                             const float *k, const float *kw)
{
    float mn[KVC_MAX_HEAD_DIM], mx[KVC_MAX_HEAD_DIM];
    float s1[KVC_MAX_HEAD_DIM], inv1[KVC_MAX_HEAD_DIM], s2[KVC_MAX_HEAD_DIM],
        inv2[KVC_MAX_HEAD_DIM];
    col_minmax(k, d, m, mn, mx);
    float q1 = (float)((1 << b1) - 1), q2 = err2 ? (float)((1 << b2) - 1) : 1.0f;
    for (uint32_t c = 0; c < d; c++) {
        s1[c] = (mx[c] - mn[c]) / q1;
        inv1[c] = s1[c] > 0 ? 1.0f / s1[c] : 0.0f;
        s2[c] = (mx[c] - mn[c]) / q2;
        inv2[c] = s2[c] > 0 ? 1.0f / s2[c] : 0.0f;
    }
    round8_t R1, R2;
    round8_init(&R1, q1);
    round8_init(&R2, q2);
    for (uint32_t t = 0; t < m; t++) {
        const float *row = k + (size_t)t * d;
        kvc_v8 acc1 = {0}, acc2 = {0};
        for (uint32_t c = 0; c < d; c += 8) {
            kvc_v8 x, vmn, vinv, vs, w, err;
            KVC_V8_LOAD(x, row + c);
            KVC_V8_LOAD(vmn, mn + c);
            KVC_V8_LOAD(w, kw + c);
            KVC_V8_LOAD(vinv, inv1 + c);
            KVC_V8_LOAD(vs, s1 + c);
            KVC_TRIAL_ERR8(err, x, vmn, vinv, vs, R1);
            acc1 += w * err * err;
            if (err2) {
                KVC_V8_LOAD(vinv, inv2 + c);
                KVC_V8_LOAD(vs, s2 + c);
                KVC_TRIAL_ERR8(err, x, vmn, vinv, vs, R2);
                acc2 += w * err * err;
            }
        }
        err1[t] = kvc_v8_sum(&acc1);
        if (err2)
            err2[t] = kvc_v8_sum(&acc2);
    }
}

void kvc_key_errors(int bits, uint32_t d, uint32_t m, const float *k, const float *kw, float *errk)
{
    kvc_key_errors2(bits, errk, 0, NULL, d, m, k, kw);
}

KVC_HOT void kvc_sq_dists(const float *rows, uint32_t n, uint32_t d, const float *x, float *out)
{
    for (uint32_t t = 0; t < n; t++) {
        const float *r = rows + (size_t)t * d;
        float diff[KVC_MAX_HEAD_DIM];
        for (uint32_t c = 0; c < d; c++)
            diff[c] = r[c] - x[c];
        out[t] = kvc_dot(diff, diff, d);
    }
}

KVC_HOT void kvc_value_errors2(int b1, float *err1, int b2, float *err2, uint32_t d, uint32_t m,
                               const float *v)
{
    float q1 = (float)((1 << b1) - 1), q2 = err2 ? (float)((1 << b2) - 1) : 1.0f;
    round8_t R1, R2;
    round8_init(&R1, q1);
    round8_init(&R2, q2);
    // Every row's range, then the steps of all rows (the divisions vectorize across rows).
    float mn[KVC_MAX_GROUP], mx[KVC_MAX_GROUP], s1[KVC_MAX_GROUP], i1[KVC_MAX_GROUP],
        s2[KVC_MAX_GROUP], i2[KVC_MAX_GROUP];
    for (uint32_t t = 0; t < m; t++)
        kvc_row_minmax(v + (size_t)t * d, d, &mn[t], &mx[t]);
    for (uint32_t t = 0; t < m; t++) {
        s1[t] = (mx[t] - mn[t]) / q1;
        i1[t] = s1[t] > 0 ? 1.0f / s1[t] : 0.0f;
        s2[t] = (mx[t] - mn[t]) / q2;
        i2[t] = s2[t] > 0 ? 1.0f / s2[t] : 0.0f;
    }
    for (uint32_t t = 0; t < m; t++) {
        const float *row = v + (size_t)t * d;
        kvc_v8 z = {0}, vmn = z + mn[t], vs1 = z + s1[t], vi1 = z + i1[t], vs2 = z + s2[t],
               vi2 = z + i2[t];
        kvc_v8 acc1 = {0}, acc2 = {0};
        for (uint32_t c = 0; c < d; c += 8) {
            kvc_v8 x, err;
            KVC_V8_LOAD(x, row + c);
            KVC_TRIAL_ERR8(err, x, vmn, vi1, vs1, R1);
            acc1 += err * err;
            if (err2) {
                KVC_TRIAL_ERR8(err, x, vmn, vi2, vs2, R2);
                acc2 += err * err;
            }
        }
        err1[t] = kvc_v8_sum(&acc1);
        if (err2)
            err2[t] = kvc_v8_sum(&acc2);
    }
}

void kvc_value_errors(int bits, uint32_t d, uint32_t m, const float *v, float *errv)
{
    kvc_value_errors2(bits, errv, 0, NULL, d, m, v);
}

/* Butterfly of two lane blocks: a + b into a, a - b into b. */
#define KVC_BFLY(a, b)                                                                             \
    do {                                                                                           \
        kvc_v8 t_ = (a);                                                                           \
        (a) = t_ + (b);                                                                            \
        (b) = t_ - (b);                                                                            \
    } while (0)

/* The first three butterfly stages inside a block of 8 lanes: each stage pairs a lane with
 * its partner (a shuffle) and takes x + partner on the low side, partner - x on the high side
 * as (-x) + partner, which is the same IEEE operation. */
static inline __attribute__((always_inline)) void hadamard8(kvc_v8 *xp)
{
    kvc_v8 x = *xp;
    const kvc_v8 s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1};
    const kvc_v8 s3 = {1, 1, 1, 1, -1, -1, -1, -1};
    x = x * s1 + __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
    x = x * s2 + __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
    *xp = x * s3 + __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
}

KVC_HOT void kvc_hadamard_to(const float *src, float *dst, uint32_t d)
{
    float s = 1.0f / sqrtf((float)d);
    if (d < 8 || d % 8 != 0) {
        if (dst != src)
            memcpy(dst, src, d * sizeof(float));
        for (uint32_t len = 1; len < d; len <<= 1)
            for (uint32_t i = 0; i < d; i += 2 * len)
                for (uint32_t j = i; j < i + len; j++) {
                    float a = dst[j], b = dst[j + len];
                    dst[j] = a + b;
                    dst[j + len] = a - b;
                }
        for (uint32_t c = 0; c < d; c++)
            dst[c] *= s;
        return;
    }
    kvc_v8 sv = {0};
    sv += s;
    uint32_t len = 8;
    if (d >= 64) {
        // Each block of 64 through all six of its stages in registers.
        for (uint32_t i = 0; i < d; i += 64) {
            kvc_v8 x0, x1, x2, x3, x4, x5, x6, x7;
            KVC_V8_LOAD(x0, src + i);
            KVC_V8_LOAD(x1, src + i + 8);
            KVC_V8_LOAD(x2, src + i + 16);
            KVC_V8_LOAD(x3, src + i + 24);
            KVC_V8_LOAD(x4, src + i + 32);
            KVC_V8_LOAD(x5, src + i + 40);
            KVC_V8_LOAD(x6, src + i + 48);
            KVC_V8_LOAD(x7, src + i + 56);
            hadamard8(&x0);
            hadamard8(&x1);
            hadamard8(&x2);
            hadamard8(&x3);
            hadamard8(&x4);
            hadamard8(&x5);
            hadamard8(&x6);
            hadamard8(&x7);
            KVC_BFLY(x0, x1);
            KVC_BFLY(x2, x3);
            KVC_BFLY(x4, x5);
            KVC_BFLY(x6, x7);
            KVC_BFLY(x0, x2);
            KVC_BFLY(x1, x3);
            KVC_BFLY(x4, x6);
            KVC_BFLY(x5, x7);
            KVC_BFLY(x0, x4);
            KVC_BFLY(x1, x5);
            KVC_BFLY(x2, x6);
            KVC_BFLY(x3, x7);
            if (d == 64) {
                x0 *= sv, x1 *= sv, x2 *= sv, x3 *= sv;
                x4 *= sv, x5 *= sv, x6 *= sv, x7 *= sv;
            }
            memcpy(dst + i, &x0, sizeof x0);
            memcpy(dst + i + 8, &x1, sizeof x1);
            memcpy(dst + i + 16, &x2, sizeof x2);
            memcpy(dst + i + 24, &x3, sizeof x3);
            memcpy(dst + i + 32, &x4, sizeof x4);
            memcpy(dst + i + 40, &x5, sizeof x5);
            memcpy(dst + i + 48, &x6, sizeof x6);
            memcpy(dst + i + 56, &x7, sizeof x7);
        }
        len = 64;
    } else {
        for (uint32_t i = 0; i < d; i += 8) {
            kvc_v8 x;
            KVC_V8_LOAD(x, src + i);
            hadamard8(&x);
            if (d == 8)
                x *= sv;
            memcpy(dst + i, &x, sizeof x);
        }
    }
    // The later stages pair whole blocks in memory; the last one also scales.
    for (; len < d; len <<= 1) {
        bool last = 2 * len == d;
        for (uint32_t i = 0; i < d; i += 2 * len)
            for (uint32_t j = i; j < i + len; j += 8) {
                kvc_v8 lo, hi;
                KVC_V8_LOAD(lo, dst + j);
                KVC_V8_LOAD(hi, dst + j + len);
                KVC_BFLY(lo, hi);
                if (last) {
                    lo *= sv;
                    hi *= sv;
                }
                memcpy(dst + j, &lo, sizeof lo);
                memcpy(dst + j + len, &hi, sizeof hi);
            }
    }
}

void kvc_hadamard(float *x, uint32_t d)
{
    kvc_hadamard_to(x, x, d);
}
