/*
 * encode.cu: the encoder on the GPU, twin of encode.c. For one layer of K, V in device memory:
 *
 * 1. rotate_kernel: when the policy rotates, the Hadamard-rotated fp32 copy of every K and V
 *    row ([n_kv][n][d] each), used by the trial pass and the rotated options;
 * 2. stats_kernel (policies that measure distortion): per (kv head, group of G consecutive
 *    tokens) the tables encode.c's build_items computes on the CPU — |v - obar|^2 and the key
 *    and value errors at 8, 4 and 2 bits, trial-quantized or modelled — in the CPU's exact
 *    arithmetic order;
 * 3. host: the tables go to kvc_encoder_choose (the same optimizer and rate controller the CPU
 *    encoder runs), which gives the option of every (head, token); the header and maps are
 *    written by kvc_encoder_write_head and the payload is cut into groups;
 * 4. f16_kernel (a warp per FP16 token) and quant_kernel (a block per quantized group) write
 *    the payload; crc_kernel computes CRC32C of 4 KiB chunks, combined on the host.
 *
 * The frame equals kvc_encoder_encode_layer's byte for byte for finite inputs (the rules are in
 * kvcodec_cuda_int.h). The optimizer needs every table before it can choose, so the call
 * synchronizes the stream twice (after the tables, after the chunk CRCs).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcodec_cuda.h"
extern "C" {
#include "kvcodec_int.h"
}
#include "kvcodec_cuda_int.h"

#define CRC_CHUNK 4096u
#define STATS_THREADS 64
#define QUANT_THREADS 128
#define ROT_THREADS 256

/* Table slots in the device/host table buffer, each [n_kv][n]. */
enum { TAB_DEV = 0, TAB_EK8, TAB_EV8, TAB_EK4, TAB_EV4, TAB_EK2, TAB_EV2, TAB_COUNT };

/* One unit of payload work: an FP16 token (m = 1, tok = the token index) or a quantized group
 * (its tokens at tok_idx[tok .. tok + m)). */
typedef struct {
    uint64_t out_off; // byte offset in the frame
    uint32_t tok;
    uint16_t head;
    uint8_t opt;
    uint8_t m_minus_1;
} work_t;

struct kvc_encoder_cuda {
    kvc_encoder_t *enc; // host optimizer and rate controller
    kvc_policy_t policy;
    uint32_t n_heads, n_kv, n, d, G, P;
    size_t max_frame;
    size_t n_items;
    size_t max_chunks;
    // device
    float *d_kr, *d_vr;     // [n_kv][n][d] rotated K, V (rotating policies)
    float *d_tab;           // [TAB_COUNT][n_kv][n]
    uint32_t *d_tok;        // [n_items] token indices of the quantized groups
    work_t *d_work;         // [n_items]
    uint32_t *d_crc;        // [max_chunks]
    kvc_scores_t d_scores;  // own scores when the caller passes none
    // host, pinned
    float *h_tab;           // [TAB_COUNT][n_kv][n]
    uint32_t *h_tok;        // [n_items]
    work_t *h_work;         // [n_items]
    uint32_t *h_crc;        // [max_chunks + 1]; the last word stages the frame's CRC
    uint8_t *h_head;        // header + maps
    float *h_imp, *h_qsq, *h_obar; // host copies of the scores
    uint8_t *h_static;
    uint64_t *h_plan;       // [4][n_kv][KVC_OPT_COUNT] payload planning scratch
    // Stream time of the two GPU phases of the last layer: [0, 1] scoring + rotation +
    // tables, [2, 3] payload + CRC.
    cudaEvent_t ev[4];
    uint64_t last_gpu_ns;
};

/* ------------------------------------------------------------------------------------------ */
/* Kernels                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Element (h, t, c) of a strided FP16 tensor. */
static __device__ __forceinline__ float ld_h(const uint16_t *x, size_t hs, size_t ts, uint32_t h,
                                             uint32_t t, uint32_t c)
{
    return kvc_dev_h2f(x[(size_t)h * hs + (size_t)t * ts + c]);
}

/* One warp per row of K or V: fp16 -> fp32, Hadamard butterflies in quant.c's order (stage
 * len pairs i and i + len for every i with bit len clear), then the 1/sqrt(d) scale. */
__global__ void rotate_kernel(const uint16_t *k, const uint16_t *v, size_t hs, size_t ts,
                              uint32_t n_kv, uint32_t n, uint32_t d, float scale, float *kr,
                              float *vr)
{
    extern __shared__ float rot_sm[]; // [warps][d]
    uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *x = rot_sm + (size_t)warp * d;
    size_t rows = (size_t)2 * n_kv * n;
    size_t wpb = blockDim.x / 32;
    for (size_t row = (size_t)blockIdx.x * wpb + warp; row < rows; row += (size_t)gridDim.x * wpb) {
        bool is_v = row >= (size_t)n_kv * n;
        size_t r = is_v ? row - (size_t)n_kv * n : row;
        uint32_t h = (uint32_t)(r / n), t = (uint32_t)(r % n);
        const uint16_t *src = (is_v ? v : k) + (size_t)h * hs + (size_t)t * ts;
        for (uint32_t c = lane; c < d; c += 32)
            x[c] = kvc_dev_h2f(src[c]);
        __syncwarp();
        for (uint32_t len = 1; len < d; len <<= 1) {
            for (uint32_t j = lane; j < d / 2; j += 32) {
                uint32_t i = (j / len) * 2 * len + (j % len);
                float a = x[i], b = x[i + len];
                x[i] = kadd(a, b);
                x[i + len] = ksub(a, b);
            }
            __syncwarp();
        }
        float *dst = (is_v ? vr : kr) + r * d;
        for (uint32_t c = lane; c < d; c += 32)
            dst[c] = kmul(x[c], scale);
        __syncwarp();
    }
}

/* Where the rows of a layer are: FP16 K, V (strided) and their rotated fp32 copies. */
typedef struct {
    const uint16_t *k, *v;
    size_t hs, ts;
    const float *kr, *vr; // [n_kv][n][d] rotated rows, or NULL
    uint32_t n, d;
} kv_src_t;

/* Element c of token t of head h: K or V (val), rotated (rot) or as given. */
static __device__ __forceinline__ float src_x(const kv_src_t &a, bool val, bool rot, uint32_t h,
                                              uint32_t t, uint32_t c)
{
    if (rot)
        return (val ? a.vr : a.kr)[((size_t)h * a.n + t) * a.d + c];
    return ld_h(val ? a.v : a.k, a.hs, a.ts, h, t, c);
}

/* kvc_row_minmax: eight lanes over c, then lanes 0..7 in order. */
static __device__ void row_minmax(const kv_src_t &a, bool val, bool rot, uint32_t h, uint32_t t,
                                  float *mn_p, float *mx_p)
{
    float mn[8], mx[8];
    for (int l = 0; l < 8; l++)
        mn[l] = mx[l] = src_x(a, val, rot, h, t, l);
    for (uint32_t c = 8; c + 8 <= a.d; c += 8) {
        for (int l = 0; l < 8; l++) {
            float x = src_x(a, val, rot, h, t, c + l);
            mn[l] = x < mn[l] ? x : mn[l];
            mx[l] = x > mx[l] ? x : mx[l];
        }
    }
    float lo = mn[0], hi = mx[0];
    for (int l = 1; l < 8; l++) {
        lo = mn[l] < lo ? mn[l] : lo;
        hi = mx[l] > hi ? mx[l] : hi;
    }
    *mn_p = lo;
    *mx_p = hi;
}

typedef struct {
    kv_src_t src;
    const float *obar, *qsq; // [n_kv][d] device scores
    uint32_t n_kv, n, d, G;
    int model;   // KVC_DIST_MODEL: every width modelled
    int rotate;  // widths <= 4 use the rotated rows and the mean sensitivity
    int need8, need4, needv4, need2, needk2;
    float *tab;  // [TAB_COUNT][n_kv][n]
} stats_args_t;

static __device__ __forceinline__ float st_x(const stats_args_t &a, bool val, bool rot, uint32_t h,
                                             uint32_t t, uint32_t c)
{
    return src_x(a.src, val, rot, h, t, c);
}

/* One block per (kv head, group of G consecutive tokens): the distortion inputs of build_items. */
__global__ void stats_kernel(stats_args_t a)
{
    // Per channel, sized by head_dim so that small heads leave room for more blocks:
    // range [unrotated, rotated], and per width slot (8, 4, 2 bits) the step and 1 / step.
    extern __shared__ float st_sm[]; // [10][d]
    uint32_t d = a.d;
    float *s_mn[2] = {st_sm, st_sm + d}, *s_mx[2] = {st_sm + 2 * d, st_sm + 3 * d};
    float *s_s[3] = {st_sm + 4 * d, st_sm + 5 * d, st_sm + 6 * d};
    float *s_inv[3] = {st_sm + 7 * d, st_sm + 8 * d, st_sm + 9 * d};
    __shared__ float s_ke[3]; // modelled key error per width slot
    __shared__ float s_kwrot;
    uint32_t chunks = (a.n + a.G - 1) / a.G;
    size_t plane = (size_t)a.n_kv * a.n;
    for (size_t blk = blockIdx.x; blk < (size_t)a.n_kv * chunks; blk += gridDim.x) {
        uint32_t h = (uint32_t)(blk / chunks);
        uint32_t t0 = (uint32_t)(blk % chunks) * a.G;
        uint32_t m = min(a.G, a.n - t0);
        const float *qsq = a.qsq + (size_t)h * d;
        const float *obar = a.obar + (size_t)h * d;
        __syncthreads(); // shared arrays free from the previous block
        if (threadIdx.x == 0) {
            float s = 0;
            for (uint32_t c = 0; c < d; c++)
                s = kadd(s, qsq[c]);
            s_kwrot = kdiv(s, (float)d);
        }
        // Per-channel min/max over the group: [0] unrotated, [1] rotated.
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            for (int r = 0; r < (a.rotate ? 2 : 1); r++) {
                float mn = st_x(a, false, r == 1, h, t0, c), mx = mn;
                for (uint32_t j = 1; j < m; j++) {
                    float x = st_x(a, false, r == 1, h, t0 + j, c);
                    mn = x < mn ? x : mn;
                    mx = x > mx ? x : mx;
                }
                s_mn[r][c] = mn;
                s_mx[r][c] = mx;
            }
        }
        __syncthreads();
        // Per width: step and its inverse per channel; width slot w: 0 -> 8, 1 -> 4, 2 -> 2 bits.
        for (int w = 0; w < 3; w++) {
            int b = w == 0 ? 8 : (w == 1 ? 4 : 2);
            bool rot = a.rotate && b <= 4;
            float qmax = (float)((1 << b) - 1);
            for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
                float s = kdiv(ksub(s_mx[rot][c], s_mn[rot][c]), qmax);
                s_s[w][c] = s;
                s_inv[w][c] = s > 0 ? kdiv(1.0f, s) : 0.0f;
            }
        }
        __syncthreads();
        // Modelled key error (a serial sum over channels, as model_errors).
        if (threadIdx.x < 3) {
            int w = threadIdx.x, b = w == 0 ? 8 : (w == 1 ? 4 : 2);
            bool rot = a.rotate && b <= 4;
            float ke = 0;
            for (uint32_t c = 0; c < d; c++) {
                float kw = rot ? s_kwrot : qsq[c];
                ke = kadd(ke, kmul(kmul(kw, s_s[w][c]), s_s[w][c]));
            }
            s_ke[w] = kdiv(ke, 12.0f);
        }
        __syncthreads();
        // Per token: four passes over its row, each feeding every width that reads the same
        // data (each accumulator keeps the CPU's own chain and final tree).
        bool trial = !a.model;
        bool kerr4 = trial && a.need4, kerr2 = trial && a.need2 && a.needk2;
        bool verr4 = trial && a.need4 && a.needv4, verr2 = trial && a.need2;
        bool want_r = (a.model && (a.need4 || a.need2)) || verr4 || verr2; // V range, 4/2 bits
        bool rot = a.rotate != 0; // the source of the 4- and 2-bit widths
        float rot_kw = s_kwrot;
        for (uint32_t j = threadIdx.x; j < m; j += blockDim.x) {
            uint32_t t = t0 + j;
            size_t it = (size_t)h * a.n + t;
            // Pass 1, unrotated V: |v - obar|^2 (kvc_dot's lanes) and the row range.
            float dacc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, umn[8], umx[8];
            for (uint32_t c = 0; c < d; c += 8) {
                for (int l = 0; l < 8; l++) {
                    float x = st_x(a, true, false, h, t, c + l);
                    float df = ksub(x, obar[c + l]);
                    dacc[l] = kadd(dacc[l], kmul(df, df));
                    if (c == 0) {
                        umn[l] = umx[l] = x;
                    } else {
                        umn[l] = x < umn[l] ? x : umn[l];
                        umx[l] = x > umx[l] ? x : umx[l];
                    }
                }
            }
            a.tab[TAB_DEV * plane + it] = kvc_dev_sum8(dacc);
            float ulo = umn[0], uhi = umx[0];
            for (int l = 1; l < 8; l++) {
                ulo = umn[l] < ulo ? umn[l] : ulo;
                uhi = umx[l] > uhi ? umx[l] : uhi;
            }
            // Pass 2, K of the 4/2-bit source: trial key errors of both widths.
            if (kerr4 || kerr2) {
                float k4[8] = {0, 0, 0, 0, 0, 0, 0, 0}, k2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (uint32_t c = 0; c < d; c += 8) {
                    for (int l = 0; l < 8; l++) {
                        uint32_t cc = c + l;
                        float x = st_x(a, false, rot, h, t, cc);
                        float mn = s_mn[rot][cc];
                        float kw = rot ? rot_kw : qsq[cc];
                        if (kerr4) {
                            float r = kvc_dev_round_clamp(kmul(ksub(x, mn), s_inv[1][cc]), 15.0f);
                            float err = ksub(kadd(kmul(r, s_s[1][cc]), mn), x);
                            k4[l] = kadd(k4[l], kmul(kmul(kw, err), err));
                        }
                        if (kerr2) {
                            float r = kvc_dev_round_clamp(kmul(ksub(x, mn), s_inv[2][cc]), 3.0f);
                            float err = ksub(kadd(kmul(r, s_s[2][cc]), mn), x);
                            k2[l] = kadd(k2[l], kmul(kmul(kw, err), err));
                        }
                    }
                }
                if (kerr4)
                    a.tab[TAB_EK4 * plane + it] = kvc_dev_sum8(k4);
                if (kerr2)
                    a.tab[TAB_EK2 * plane + it] = kvc_dev_sum8(k2);
            }
            // Pass 3, the V range of the 4/2-bit source (the unrotated one is pass 1's).
            float rlo = ulo, rhi = uhi;
            if (want_r && rot)
                row_minmax(a.src, true, true, h, t, &rlo, &rhi);
            float s4 = kdiv(ksub(rhi, rlo), 15.0f), s2 = kdiv(ksub(rhi, rlo), 3.0f);
            if (a.need8) { // 8 bits: always the step^2 / 12 model, unrotated
                float s8 = kdiv(ksub(uhi, ulo), 255.0f);
                a.tab[TAB_EK8 * plane + it] = s_ke[0];
                a.tab[TAB_EV8 * plane + it] = kdiv(kmul(kmul((float)d, s8), s8), 12.0f);
            }
            if (a.model && a.need4) {
                a.tab[TAB_EK4 * plane + it] = s_ke[1];
                a.tab[TAB_EV4 * plane + it] = kdiv(kmul(kmul((float)d, s4), s4), 12.0f);
            }
            if (a.model && a.need2) {
                a.tab[TAB_EK2 * plane + it] = s_ke[2];
                a.tab[TAB_EV2 * plane + it] = kdiv(kmul(kmul((float)d, s2), s2), 12.0f);
            }
            // Pass 4, V of the 4/2-bit source: trial value errors of both widths.
            if (verr4 || verr2) {
                float i4 = s4 > 0 ? kdiv(1.0f, s4) : 0.0f, i2 = s2 > 0 ? kdiv(1.0f, s2) : 0.0f;
                float v4[8] = {0, 0, 0, 0, 0, 0, 0, 0}, v2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (uint32_t c = 0; c < d; c += 8) {
                    for (int l = 0; l < 8; l++) {
                        float x = st_x(a, true, rot, h, t, c + l);
                        if (verr4) {
                            float r = kvc_dev_round_clamp(kmul(ksub(x, rlo), i4), 15.0f);
                            float err = ksub(kadd(kmul(r, s4), rlo), x);
                            v4[l] = kadd(v4[l], kmul(err, err));
                        }
                        if (verr2) {
                            float r = kvc_dev_round_clamp(kmul(ksub(x, rlo), i2), 3.0f);
                            float err = ksub(kadd(kmul(r, s2), rlo), x);
                            v2[l] = kadd(v2[l], kmul(err, err));
                        }
                    }
                }
                if (verr4)
                    a.tab[TAB_EV4 * plane + it] = kvc_dev_sum8(v4);
                if (verr2)
                    a.tab[TAB_EV2 * plane + it] = kvc_dev_sum8(v2);
            }
        }
    }
}

/* Copies bytes with the destination at any alignment (the source 2-byte aligned): single
 * bytes up to an aligned destination word, words assembled from the two aligned source words
 * around them (both hold bytes of the range, so they stay inside the allocation), single
 * bytes at the end. Threads `lane` of `width` share the work. */
static __device__ void copy_bytes(uint8_t *dst, const uint8_t *src, uint32_t bytes,
                                  uint32_t lane, uint32_t width)
{
    uint32_t head = (uint32_t)((4 - ((uintptr_t)dst & 3)) & 3);
    if (head > bytes)
        head = bytes;
    for (uint32_t i = lane; i < head; i += width)
        dst[i] = src[i];
    uint32_t words = (bytes - head) / 4;
    uint32_t *dw = (uint32_t *)(dst + head);
    const uint8_t *s = src + head;
    uint32_t sh = (uint32_t)((uintptr_t)s & 3);
    const uint32_t *sw = (const uint32_t *)(s - sh);
    for (uint32_t i = lane; i < words; i += width)
        dw[i] = sh ? __funnelshift_r(sw[i], sw[i + 1], 8 * sh) : sw[i];
    for (uint32_t i = head + 4 * words + lane; i < bytes; i += width)
        dst[i] = src[i];
}

/* A warp per FP16 token: K row then V row, unchanged. */
__global__ void f16_kernel(const work_t *work, size_t n_work, const uint16_t *k, const uint16_t *v,
                           size_t hs, size_t ts, uint32_t d, uint8_t *out)
{
    size_t wpb = blockDim.x / 32;
    uint32_t lane = threadIdx.x % 32;
    for (size_t i = (size_t)blockIdx.x * wpb + threadIdx.x / 32; i < n_work;
         i += (size_t)gridDim.x * wpb) {
        work_t w = work[i];
        size_t row = (size_t)w.head * hs + (size_t)w.tok * ts;
        uint8_t *dst = out + w.out_off;
        copy_bytes(dst, (const uint8_t *)(k + row), 2 * d, lane, 32);
        copy_bytes(dst + 2 * d, (const uint8_t *)(v + row), 2 * d, lane, 32);
    }
}

typedef struct {
    const work_t *work;
    size_t n_work;
    const uint32_t *tok; // token indices of the groups
    kv_src_t src;
    const float *qsq;     // [n_kv][d] device scores (MixKVQ salience of unrotated groups)
    uint32_t n, d, P;
    int rotate;
    uint8_t *out;
} quant_args_t;

static __device__ __forceinline__ float q_x(const quant_args_t &a, bool val, bool rot, uint32_t h,
                                            uint32_t t, uint32_t c)
{
    return src_x(a.src, val, rot, h, t, c);
}

static __device__ __forceinline__ void st16(uint8_t *p, uint16_t x)
{
    p[0] = (uint8_t)x;
    p[1] = (uint8_t)(x >> 8);
}

/* One block per quantized group: quant.c's kvc_quant_group with cap = m, written in place. */
__global__ void quant_kernel(quant_args_t a)
{
    __shared__ uint32_t s_tok[256];
    __shared__ float s_mn[KVC_MAX_HEAD_DIM], s_mx[KVC_MAX_HEAD_DIM];
    __shared__ float s_kz[KVC_MAX_HEAD_DIM], s_kinv[KVC_MAX_HEAD_DIM];
    __shared__ float s_vz[256], s_vinv[256];
    __shared__ uint8_t s_prot[KVC_MAX_HEAD_DIM];
    __shared__ uint16_t s_pidx[KVC_MAX_PROTECT];
    uint32_t d = a.d;
    for (size_t gi = blockIdx.x; gi < a.n_work; gi += gridDim.x) {
        work_t w = a.work[gi];
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
        // Key range per channel over the group, in token order.
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            float mn = q_x(a, false, rot, h, s_tok[0], c), mx = mn;
            for (uint32_t j = 1; j < m; j++) {
                float x = q_x(a, false, rot, h, s_tok[j], c);
                mn = x < mn ? x : mn;
                mx = x > mx ? x : mx;
            }
            s_mn[c] = mn;
            s_mx[c] = mx;
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
        // Value parameters per token.
        for (uint32_t j = threadIdx.x; j < m; j += blockDim.x) {
            float lo, hi;
            row_minmax(a.src, true, rot, h, s_tok[j], &lo, &hi);
            uint16_t s16, z16;
            float s, z, inv;
            kvc_dev_asym(lo, hi, vq, &s16, &z16, &s, &z, &inv);
            st16(vs + 2 * j, s16);
            st16(vz + 2 * j, z16);
            s_vz[j] = z;
            s_vinv[j] = inv;
        }
        __syncthreads();
        // Key codes, one output byte per thread step (protected channels code 0).
        uint32_t per_k = 8 / kb;
        for (uint32_t i = threadIdx.x; i < m * rowk; i += blockDim.x) {
            uint32_t j = i / rowk, c0 = (i % rowk) * per_k;
            uint32_t byte = 0;
            for (uint32_t q = 0; q < per_k; q++) {
                uint32_t c = c0 + q;
                uint32_t code = s_prot[c] ? 0
                                          : kvc_dev_quant_one(q_x(a, false, rot, h, s_tok[j], c),
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
                uint32_t code = kvc_dev_quant_one(q_x(a, true, rot, h, s_tok[j], c0 + q),
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
                pc[i] = (uint8_t)kvc_dev_quant_one(q_x(a, false, rot, h, s_tok[j], c), s_kz[c],
                                                   s_kinv[c], 255.0f);
            }
        }
    }
}

/* CRC32C (reflected 0x82F63B78) of each CRC_CHUNK-byte chunk of buf[0, len), as fy_crc32c(0,
 * chunk) would give: slicing by 4 with the tables in shared memory, a thread per chunk. */
__global__ void crc_kernel(const uint8_t *buf, size_t len, uint32_t *crcs)
{
    __shared__ uint32_t tab[4][256];
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        tab[0][i] = c;
    }
    __syncthreads();
    // tab[t][i] needs only tab[t - 1][i] (this thread's) and tab[0] (complete).
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x)
        for (int t = 1; t < 4; t++)
            tab[t][i] = (tab[t - 1][i] >> 8) ^ tab[0][tab[t - 1][i] & 0xffu];
    __syncthreads();
    size_t chunks = (len + CRC_CHUNK - 1) / CRC_CHUNK;
    for (size_t ci = (size_t)blockIdx.x * blockDim.x + threadIdx.x; ci < chunks;
         ci += (size_t)gridDim.x * blockDim.x) {
        const uint8_t *p = buf + ci * CRC_CHUNK;
        size_t n = len - ci * CRC_CHUNK;
        if (n > CRC_CHUNK)
            n = CRC_CHUNK;
        uint32_t c = 0xffffffffu;
        size_t i = 0;
        if (n == CRC_CHUNK && ((uintptr_t)p & 15) == 0) { // 16-byte loads where aligned
            const uint4 *q = (const uint4 *)p;
            for (; i < CRC_CHUNK / 16; i++) {
                uint4 w = q[i];
                uint32_t ws[4] = {w.x, w.y, w.z, w.w};
                for (int k = 0; k < 4; k++) {
                    uint32_t x = ws[k] ^ c;
                    c = tab[3][x & 0xffu] ^ tab[2][(x >> 8) & 0xffu] ^ tab[1][(x >> 16) & 0xffu] ^
                        tab[0][x >> 24];
                }
            }
            i = CRC_CHUNK;
        }
        for (; i < n; i++)
            c = (c >> 8) ^ tab[0][(c ^ p[i]) & 0xffu];
        crcs[ci] = ~c;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Host                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* GF(2) arithmetic modulo the reflected CRC32C polynomial (zlib's crc32_combine method). */
static uint32_t gf2_mul(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ 0x82f63b78u : b >> 1;
    }
    return p;
}

/* x^(8 * len) modulo the polynomial. */
static uint32_t gf2_x8n(uint64_t len)
{
    uint32_t sq = 1u << 30; // x^1
    for (int k = 0; k < 3; k++)
        sq = gf2_mul(sq, sq); // x^8
    uint32_t p = 1u << 31;    // x^0
    while (len) {
        if (len & 1)
            p = gf2_mul(sq, p);
        sq = gf2_mul(sq, sq);
        len >>= 1;
    }
    return p;
}

/* CRC32C of the concatenation of chunks (each of CRC_CHUNK bytes but the last) from their own
 * CRCs: crc(A || B) = crc(A) * x^(8|B|) + crc(B). */
static uint32_t crc_combine_chunks(const uint32_t *crcs, size_t n_chunks, size_t len)
{
    uint32_t full = gf2_x8n(CRC_CHUNK);
    uint32_t c = crcs[0];
    for (size_t i = 1; i < n_chunks; i++) {
        size_t l = i + 1 < n_chunks ? CRC_CHUNK : len - i * CRC_CHUNK;
        c = gf2_mul(l == CRC_CHUNK ? full : gf2_x8n(l), c) ^ crcs[i];
    }
    return c;
}

extern "C" void kvc_encoder_cuda_destroy(kvc_encoder_cuda_t *e)
{
    if (e == NULL)
        return;
    kvc_encoder_destroy(e->enc);
    cudaFree(e->d_kr), cudaFree(e->d_vr), cudaFree(e->d_tab), cudaFree(e->d_tok);
    cudaFree(e->d_work), cudaFree(e->d_crc);
    kvc_scores_cleanup_cuda(&e->d_scores);
    cudaFreeHost(e->h_tab), cudaFreeHost(e->h_tok), cudaFreeHost(e->h_work);
    cudaFreeHost(e->h_crc), cudaFreeHost(e->h_head);
    for (int i = 0; i < 4; i++)
        if (e->ev[i])
            cudaEventDestroy(e->ev[i]);
    free(e->h_imp), free(e->h_qsq), free(e->h_obar), free(e->h_static), free(e->h_plan);
    free(e);
}

extern "C" fy_status_t kvc_encoder_cuda_create(const kvc_encoder_params_t *params,
                                               kvc_encoder_cuda_t **enc_p)
{
    if (params == NULL || enc_p == NULL)
        return FY_ERR_INVALID_ARG;
    kvc_encoder_cuda_t *e = (kvc_encoder_cuda_t *)calloc(1, sizeof(*e));
    if (e == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = kvc_encoder_create(params, &e->enc);
    if (st != FY_OK) {
        free(e);
        return st;
    }
    e->policy = *params->policy;
    e->n_heads = params->n_heads;
    e->n_kv = params->n_kv_heads;
    e->n = params->n_tokens;
    e->d = params->head_dim;
    e->G = e->policy.group;
    e->P = e->policy.protect_channels;
    e->n_items = (size_t)e->n_kv * e->n;
    if (e->n_items > UINT32_MAX) { // work items index tokens with 32 bits
        kvc_encoder_destroy(e->enc);
        free(e);
        return FY_ERR_INVALID_ARG;
    }
    e->max_frame = kvc_encoder_max_frame_bytes(e->enc);
    e->max_chunks = (e->max_frame + CRC_CHUNK - 1) / CRC_CHUNK;
    size_t head_max =
        KVC_FRAME_HEADER_BYTES + FY_ALIGN_UP((size_t)e->n_kv * kvc_map_bytes(e->n), 8);
    size_t rows = e->n_items * e->d * sizeof(float);
    size_t tab = (size_t)TAB_COUNT * e->n_items * sizeof(float);
    if (e->policy.rotate) {
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_kr, rows), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_vr, rows), st, fail);
    }
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_tab, tab), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_tok, e->n_items * sizeof(uint32_t)), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_work, e->n_items * sizeof(work_t)), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_crc, e->max_chunks * sizeof(uint32_t)), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_tab, tab), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_tok, e->n_items * sizeof(uint32_t)), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_work, e->n_items * sizeof(work_t)), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_crc, (e->max_chunks + 1) * sizeof(uint32_t)), st,
                  fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_head, head_max), st, fail);
    for (int i = 0; i < 4; i++)
        KVC_CUDA_GOTO(cudaEventCreate(&e->ev[i]), st, fail);
    if ((st = kvc_scores_init_cuda(&e->d_scores, e->n_kv, e->n, e->d)) != FY_OK)
        goto fail;
    e->h_imp = (float *)malloc(e->n_items * sizeof(float));
    e->h_qsq = (float *)malloc((size_t)e->n_kv * e->d * sizeof(float));
    e->h_obar = (float *)malloc((size_t)e->n_kv * e->d * sizeof(float));
    e->h_static = (uint8_t *)malloc(e->n_kv);
    e->h_plan = (uint64_t *)malloc((size_t)4 * e->n_kv * KVC_OPT_COUNT * sizeof(uint64_t));
    if (!e->h_imp || !e->h_qsq || !e->h_obar || !e->h_static || !e->h_plan) {
        st = FY_ERR_NO_MEMORY;
        goto fail;
    }
    *enc_p = e;
    return FY_OK;
fail: // destroy takes half-built encoders
    kvc_encoder_cuda_destroy(e);
    return st;
}

extern "C" uint64_t kvc_encoder_cuda_last_gpu_ns(const kvc_encoder_cuda_t *e)
{
    return e->last_gpu_ns;
}

extern "C" size_t kvc_encoder_cuda_max_frame_bytes(const kvc_encoder_cuda_t *e)
{
    return e->max_frame;
}

extern "C" void kvc_encoder_cuda_totals(const kvc_encoder_cuda_t *e, uint64_t *bytes_p,
                                        uint64_t *budget_p)
{
    kvc_encoder_totals(e->enc, bytes_p, budget_p);
}

/* Cuts the payload of the current choice into work items: FP16 tokens first (work[0, n_f16)),
 * then the quantized groups, each with its frame offset, in write_frame's order (per head: the
 * options in order, each option's tokens in order, G at a time). Two passes over the choice:
 * counts per (head, option), then every token goes to its place. */
static void plan_payload(kvc_encoder_cuda_t *e, size_t payload_off, size_t *n_f16_p,
                         size_t *n_work_p)
{
    const uint8_t *choice = kvc_encoder_choice(e->enc);
    uint32_t n = e->n, d = e->d, G = e->G, P = e->P;
    uint64_t *cnt = e->h_plan;                         // [n_kv][KVC_OPT_COUNT]
    uint64_t *off = cnt + (size_t)e->n_kv * KVC_OPT_COUNT;   // frame offset of each run
    uint64_t *wrk = off + (size_t)e->n_kv * KVC_OPT_COUNT;   // first work item of each run
    uint64_t *tok = wrk + (size_t)e->n_kv * KVC_OPT_COUNT;   // first token slot of each run
    memset(cnt, 0, (size_t)e->n_kv * KVC_OPT_COUNT * sizeof(uint64_t));
    for (uint32_t h = 0; h < e->n_kv; h++) {
        const uint8_t *ch = choice + (size_t)h * n;
        uint64_t *c = cnt + (size_t)h * KVC_OPT_COUNT;
        for (uint32_t t = 0; t < n; t++)
            c[ch[t]]++;
    }
    size_t n_f16 = 0;
    for (uint32_t h = 0; h < e->n_kv; h++)
        n_f16 += cnt[(size_t)h * KVC_OPT_COUNT + KVC_OPT_F16];
    uint64_t o_off = payload_off, o_f16 = 0, o_q = n_f16, o_tok = 0;
    for (uint32_t h = 0; h < e->n_kv; h++) {
        for (int o = 0; o < KVC_OPT_DROP; o++) {
            size_t r = (size_t)h * KVC_OPT_COUNT + o;
            off[r] = o_off;
            o_off += kvc_run_bytes(o, d, G, P, cnt[r]);
            if (o == KVC_OPT_F16) {
                wrk[r] = o_f16;
                o_f16 += cnt[r];
            } else {
                wrk[r] = o_q;
                o_q += (cnt[r] + G - 1) / G;
                tok[r] = o_tok;
                o_tok += cnt[r];
            }
        }
    }
    for (uint32_t h = 0; h < e->n_kv; h++) {
        const uint8_t *ch = choice + (size_t)h * n;
        uint64_t seen[KVC_OPT_COUNT] = {0};
        for (uint32_t t = 0; t < n; t++) {
            int o = ch[t];
            if (o == KVC_OPT_DROP)
                continue;
            size_t r = (size_t)h * KVC_OPT_COUNT + o;
            uint64_t k = seen[o]++;
            if (o == KVC_OPT_F16) {
                work_t w = {off[r] + 4 * (uint64_t)d * k, t, (uint16_t)h, (uint8_t)o, 0};
                e->h_work[wrk[r] + k] = w;
                continue;
            }
            e->h_tok[tok[r] + k] = t;
            if (k % G == 0) {
                uint64_t g = k / G, m = FY_MIN((uint64_t)G, cnt[r] - k);
                work_t w = {off[r] + g * kvc_group_bytes(o, d, G, P), (uint32_t)(tok[r] + k),
                            (uint16_t)h, (uint8_t)o, (uint8_t)(m - 1)};
                e->h_work[wrk[r] + g] = w;
            }
        }
    }
    FY_ASSERT(o_f16 == n_f16);
    *n_f16_p = n_f16;
    *n_work_p = o_q;
}

extern "C" fy_status_t kvc_encoder_encode_layer_cuda(kvc_encoder_cuda_t *e,
                                                     const kvc_layer_input_t *in,
                                                     const kvc_scores_t *scores,
                                                     uint8_t *out, size_t out_cap, size_t *len_p,
                                                     kvc_layer_info_t *info_p, void *stream)
{
    if (e == NULL || out == NULL || len_p == NULL)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = kvc_encoder_check_layer(e->enc, in, out_cap);
    if (st != FY_OK)
        return st;
    cudaStream_t cs = (cudaStream_t)stream;
    uint32_t n = e->n, d = e->d, n_kv = e->n_kv;
    size_t plane = e->n_items;
    kvc_layer_info_t info;
    memset(&info, 0, sizeof(info));
    uint64_t t0 = fy_clock_ns();
    cudaError_t ce = cudaEventRecord(e->ev[0], cs);
    if (ce != cudaSuccess)
        return kvc_cuda_status(ce);
    const kvc_scores_t *sc = scores;
    if (sc == NULL) {
        if ((st = kvc_score_cuda(&e->policy, e->n_heads, n_kv, n, d, in, &e->d_scores, cs)) !=
            FY_OK)
            return st;
        sc = &e->d_scores;
    } else if (sc->n_kv_heads != n_kv || sc->n_tokens != n || sc->head_dim != d ||
               !sc->importance || !sc->qsq || !sc->obar || !sc->is_static) {
        return FY_ERR_INVALID_ARG;
    }
    uint64_t t1 = fy_clock_ns();
    const kvc_policy_t *pol = &e->policy;
    bool measured = pol->dist == KVC_DIST_TRIAL || pol->dist == KVC_DIST_MODEL;
    uint32_t opts = pol->options;
    KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_imp, sc->importance, plane * sizeof(float),
                                  cudaMemcpyDeviceToHost, cs),
                  st, out);
    KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_qsq, sc->qsq, (size_t)n_kv * d * sizeof(float),
                                  cudaMemcpyDeviceToHost, cs),
                  st, out);
    KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_obar, sc->obar, (size_t)n_kv * d * sizeof(float),
                                  cudaMemcpyDeviceToHost, cs),
                  st, out);
    KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_static, sc->is_static, n_kv, cudaMemcpyDeviceToHost, cs),
                  st, out);
    kv_src_t src;
    src.k = in->k;
    src.v = in->v;
    src.hs = in->head_stride;
    src.ts = in->token_stride;
    src.kr = e->d_kr;
    src.vr = e->d_vr;
    src.n = n;
    src.d = d;
    if (pol->rotate) {
        int wpb = ROT_THREADS / 32;
        size_t rows = (size_t)2 * plane;
        rotate_kernel<<<kvc_grid(rows, wpb), ROT_THREADS, (size_t)wpb * d * sizeof(float), cs>>>(
            in->k, in->v, in->head_stride, in->token_stride, n_kv, n, d,
            1.0f / sqrtf((float)d), e->d_kr, e->d_vr);
        KVC_LAUNCH_GOTO(st, out);
    }
    if (measured) {
        stats_args_t a;
        memset(&a, 0, sizeof(a));
        a.src = src;
        a.obar = sc->obar;
        a.qsq = sc->qsq;
        a.n_kv = n_kv;
        a.n = n;
        a.d = d;
        a.G = e->G;
        a.model = pol->dist == KVC_DIST_MODEL;
        a.rotate = pol->rotate;
        a.need8 = (opts & KVC_OPT_BIT(KVC_OPT_Q8)) != 0;
        a.need4 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_Q4V2))) != 0;
        a.needv4 = (opts & KVC_OPT_BIT(KVC_OPT_Q4)) != 0;
        a.need2 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4V2) | KVC_OPT_BIT(KVC_OPT_Q2))) != 0;
        a.needk2 = (opts & KVC_OPT_BIT(KVC_OPT_Q2)) != 0;
        a.tab = e->d_tab;
        size_t blocks = (size_t)n_kv * ((n + e->G - 1) / e->G);
        stats_kernel<<<kvc_grid(blocks, 1), STATS_THREADS, (size_t)10 * d * sizeof(float), cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
        // Only the tables the optimizer will read come back.
        bool want[TAB_COUNT] = {true,
                                (bool)a.need8,
                                (bool)a.need8,
                                (bool)a.need4,
                                a.need4 && (a.model || a.needv4),
                                a.need2 && (a.model || a.needk2),
                                (bool)a.need2};
        for (int ti = 0; ti < TAB_COUNT; ti++) {
            if (!want[ti])
                continue;
            size_t at = (size_t)ti * plane;
            KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_tab + at, e->d_tab + at, plane * sizeof(float),
                                          cudaMemcpyDeviceToHost, cs),
                          st, out);
        }
    }
    KVC_CUDA_GOTO(cudaEventRecord(e->ev[1], cs), st, out);
    KVC_CUDA_GOTO(cudaStreamSynchronize(cs), st, out);
    {
        // The optimizer, on the host, from the GPU's tables.
        kvc_scores_t hs;
        hs.n_kv_heads = n_kv;
        hs.n_tokens = n;
        hs.head_dim = d;
        hs.importance = e->h_imp;
        hs.obar = e->h_obar;
        hs.qsq = e->h_qsq;
        hs.is_static = e->h_static;
        kvc_err_tables_t tab;
        memset(&tab, 0, sizeof(tab));
        tab.dev = e->h_tab + TAB_DEV * plane;
        tab.ek[8] = e->h_tab + TAB_EK8 * plane;
        tab.ev[8] = e->h_tab + TAB_EV8 * plane;
        tab.ek[4] = e->h_tab + TAB_EK4 * plane;
        tab.ev[4] = e->h_tab + TAB_EV4 * plane;
        tab.ek[2] = e->h_tab + TAB_EK2 * plane;
        tab.ev[2] = e->h_tab + TAB_EV2 * plane;
        if ((st = kvc_encoder_choose(e->enc, in, &hs, measured ? &tab : NULL, &info)) != FY_OK)
            goto out;
    }
    {
        size_t total;
        size_t head = kvc_encoder_write_head(e->enc, in->layer, e->h_head, info.tokens, &total);
        FY_ASSERT(total <= out_cap && total - 4 <= e->max_chunks * CRC_CHUNK);
        size_t n_f16, n_work;
        plan_payload(e, head, &n_f16, &n_work);
        size_t n_tok = 0;
        for (size_t i = n_f16; i < n_work; i++)
            n_tok += (size_t)e->h_work[i].m_minus_1 + 1;
        KVC_CUDA_GOTO(cudaEventRecord(e->ev[2], cs), st, out);
        KVC_CUDA_GOTO(cudaMemcpyAsync(out, e->h_head, head, cudaMemcpyHostToDevice, cs), st, out);
        if (n_work > 0)
            KVC_CUDA_GOTO(cudaMemcpyAsync(e->d_work, e->h_work, n_work * sizeof(work_t),
                                          cudaMemcpyHostToDevice, cs),
                          st, out);
        if (n_tok > 0)
            KVC_CUDA_GOTO(cudaMemcpyAsync(e->d_tok, e->h_tok, n_tok * sizeof(uint32_t),
                                          cudaMemcpyHostToDevice, cs),
                          st, out);
        if (n_f16 > 0) {
            f16_kernel<<<kvc_grid(n_f16, 8), 256, 0, cs>>>(e->d_work, n_f16, in->k, in->v,
                                                           in->head_stride, in->token_stride, d,
                                                           out);
            KVC_LAUNCH_GOTO(st, out);
        }
        if (n_work > n_f16) {
            quant_args_t a;
            memset(&a, 0, sizeof(a));
            a.work = e->d_work + n_f16;
            a.n_work = n_work - n_f16;
            a.tok = e->d_tok;
            a.src = src;
            a.qsq = sc->qsq;
            a.n = n;
            a.d = d;
            a.P = e->P;
            a.rotate = pol->rotate;
            a.out = out;
            quant_kernel<<<kvc_grid(a.n_work, 1), QUANT_THREADS, 0, cs>>>(a);
            KVC_LAUNCH_GOTO(st, out);
        }
        size_t body = total - 4;
        size_t chunks = (body + CRC_CHUNK - 1) / CRC_CHUNK;
        crc_kernel<<<kvc_grid(chunks, 256), 256, 0, cs>>>(out, body, e->d_crc);
        KVC_LAUNCH_GOTO(st, out);
        KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_crc, e->d_crc, chunks * sizeof(uint32_t),
                                      cudaMemcpyDeviceToHost, cs),
                      st, out);
        KVC_CUDA_GOTO(cudaEventRecord(e->ev[3], cs), st, out);
        KVC_CUDA_GOTO(cudaStreamSynchronize(cs), st, out);
        float ms01 = 0, ms23 = 0;
        KVC_CUDA_GOTO(cudaEventElapsedTime(&ms01, e->ev[0], e->ev[1]), st, out);
        KVC_CUDA_GOTO(cudaEventElapsedTime(&ms23, e->ev[2], e->ev[3]), st, out);
        e->last_gpu_ns = (uint64_t)((double)(ms01 + ms23) * 1e6);
        uint32_t crc = crc_combine_chunks(e->h_crc, chunks, body);
        uint8_t *cb = (uint8_t *)&e->h_crc[e->max_chunks];
        kvc_wr32(cb, crc);
        KVC_CUDA_GOTO(cudaMemcpyAsync(out + body, cb, 4, cudaMemcpyHostToDevice, cs), st, out);
        KVC_CUDA_GOTO(cudaStreamSynchronize(cs), st, out);
        kvc_encoder_commit(e->enc, total, &info);
        *len_p = total;
    }
    info.score_ns = scores ? 0 : t1 - t0;
    info.encode_ns = fy_clock_ns() - t1;
    if (info_p)
        *info_p = info;
out:
    return st;
}
