/*
 * kvcodec_int.h: private to kvcodec/. Option geometry, the group quantizers shared by the
 * encoder, the frame reader, the pages and the conversion, and the Hadamard rotation.
 *
 * A group is the unit both the frame and the pages store. For F16 a group is one token:
 *   K[d] fp16, V[d] fp16.
 * For a quantized option with key bits kb and value bits vb, a group of m tokens stored in a
 * slot of capacity cap (cap = m in a frame, cap = G in a page) is:
 *   kscale[d] fp16 | kzero[d] fp16 | vscale[cap] fp16 | vzero[cap] fp16 |
 *   kcodes[cap][d * kb / 8] | vcodes[cap][d * vb / 8]
 * Codes are packed little-endian inside a byte: channel c of a row lives in byte c * b / 8 at
 * bit (c * b) % 8. Key scale/zero are per channel over the group, value scale/zero per token.
 */
#ifndef FERRY_KVCODEC_INT_H
#define FERRY_KVCODEC_INT_H

#include <string.h>

#include "kvcodec.h"

/* Hot loops get an AVX2 clone picked at load time. They are written without reassociation
 * and C11 mode disables FMA contraction, so both clones give bit-identical results. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define KVC_HOT __attribute__((target_clones("avx2", "default")))
#else
#define KVC_HOT
#endif

#define KVC_MAX_HEAD_DIM 512
#define KVC_MAX_KV_HEADS 1024
#define KVC_MAX_GROUP    256 // tokens per key group (kvc_policy_validate)
#define KVC_MAX_TOKENS (1u << 24)
#define KVC_MAX_LAYERS 4096
#define KVC_MAX_QROWS 64

/* Dropping a token that holds attention mass p gives its share to the others: the output moves
 * by p (o - v) / (1 - p), not p (o - v). The trial and model distortions take the token's
 * importance w for p, capped here, and divide the drop term w^2 |v - obar|^2 by (1 - w)^2, so that
 * a sink (p near 1, v near the output it dominates) no longer looks free to drop. */
#define KVC_DROP_MASS_MAX 0.99f

/* What the optimizer pins, attempt by attempt, when a layer's pins do not fit its allowance:
 * every pin as the policy says (sinks and recent window at 16/16 or kept, backbone), then the
 * sinks and the recent window only kept (any option but drop), then nothing. A short prompt at
 * a small budget cannot hold its first and last tokens at 16/16, but it can keep them at some
 * precision, and losing them costs most (bench/results/quality-short-prompts.md). */
enum { KVC_PINS_NONE = 0, KVC_PINS_KEPT = 1, KVC_PINS_ALL = 2 };

#ifdef __CUDACC__
#define KVC_HOST_DEVICE __host__ __device__
#else
#define KVC_HOST_DEVICE
#endif
/* A head's mean value deviation (the drop term's spread, a policy's dev without joint_kv) sums
 * its tokens' deviations in chunks of KVC_DEV_CHUNK, each a double sum in token order, then the
 * chunks' sums in order: the same order on the CPU and the GPU, whose kernel sums the chunks in
 * parallel (a token-by-token chain over 32k tokens took 1.26 ms a layer on an H200). */
#define KVC_DEV_CHUNK 128

/* The sum of dev[c * KVC_DEV_CHUNK ..) over chunk c of n tokens. */
static inline KVC_HOST_DEVICE double kvc_dev_chunk_sum(const float *dev, uint32_t n, uint32_t c)
{
    uint32_t t = c * KVC_DEV_CHUNK;
    const uint32_t end = n - t < KVC_DEV_CHUNK ? n : t + KVC_DEV_CHUNK;
    double s = 0;
    for (; t < end; t++)
        s += (double)dev[t];
    return s;
}

/* The sum of dev[0 .. n) in that order: the chunks' sums, one after the other. */
static inline KVC_HOST_DEVICE double kvc_dev_sum(const float *dev, uint32_t n)
{
    double s = 0;
    for (uint32_t c = 0; c < (n + KVC_DEV_CHUNK - 1) / KVC_DEV_CHUNK; c++)
        s += kvc_dev_chunk_sum(dev, n, c);
    return s;
}

/* The options token t of n may take at pin level `pins` (allowed: the policy's). */
static inline KVC_HOST_DEVICE uint8_t kvc_pin_mask(uint8_t allowed, int pins, uint32_t t,
                                                   uint32_t n, uint32_t sinks, uint32_t recent,
                                                   bool pins_kept, bool backbone, int backbone_opt)
{
    const uint8_t f16 = KVC_OPT_BIT(KVC_OPT_F16), drop = KVC_OPT_BIT(KVC_OPT_DROP);
    const bool pinned = t < sinks || t + recent >= n;
    const uint8_t kept = allowed != drop ? (uint8_t)(allowed & ~drop) : allowed;
    if (pins == KVC_PINS_ALL && pinned)
        return pins_kept ? kept : f16;
    if (pins == KVC_PINS_ALL && backbone)
        return (uint8_t)KVC_OPT_BIT(backbone_opt);
    if (pins == KVC_PINS_KEPT && pinned)
        return kept;
    return allowed;
}

static inline bool kvc_opt_quantized(int o)
{
    return o >= KVC_OPT_Q8 && o <= KVC_OPT_Q2;
}

/* Whether option o is stored rotated when a frame or page carries the rotated flag. */
static inline bool kvc_opt_rotatable(int o)
{
    return o >= KVC_OPT_Q4 && o <= KVC_OPT_Q2;
}

/* Options whose key groups keep the P most salient channels at 8 bits (MixKVQ). */
static inline bool kvc_opt_protectable(int o)
{
    return o >= KVC_OPT_Q4 && o <= KVC_OPT_Q2;
}

#define KVC_MAX_PROTECT 32

/* Tokens per group: 1 for F16, G otherwise. */
static inline uint32_t kvc_group_tokens(int o, uint32_t group)
{
    return o == KVC_OPT_F16 ? 1u : group;
}

/* Bytes of a group of an option stored with capacity cap, P protected channels (see the
 * layout above; protected options append pidx[P] u16 and pcodes[cap][P] u8). */
static inline size_t kvc_group_bytes(int o, uint32_t d, uint32_t cap, uint32_t P)
{
    if (o == KVC_OPT_F16)
        return (size_t)4 * d;
    if (!kvc_opt_quantized(o))
        return 0;
    size_t rowk = (size_t)d * (size_t)kvc_opt_kbits((kvc_opt_t)o) / 8;
    size_t rowv = (size_t)d * (size_t)kvc_opt_vbits((kvc_opt_t)o) / 8;
    size_t b = (size_t)4 * d + (size_t)4 * cap + (size_t)cap * (rowk + rowv);
    if (P && kvc_opt_protectable(o))
        b += (size_t)2 * P + (size_t)cap * P;
    return b;
}

/* Bytes of count tokens of one option of one head in a frame: full groups plus a partial. */
static inline size_t kvc_run_bytes(int o, uint32_t d, uint32_t group, uint32_t P, uint64_t count)
{
    if (o == KVC_OPT_DROP || count == 0)
        return 0;
    uint32_t gs = kvc_group_tokens(o, group);
    uint64_t full = count / gs, rest = count % gs;
    size_t b = (size_t)full * kvc_group_bytes(o, d, gs, P);
    if (rest)
        b += kvc_group_bytes(o, d, (uint32_t)rest, P);
    return b;
}

static inline size_t kvc_map_bytes(uint32_t n_tokens)
{
    return ((size_t)n_tokens + 1) / 2;
}

static inline uint16_t kvc_rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t kvc_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}
static inline uint64_t kvc_rd64(const uint8_t *p)
{
    return (uint64_t)kvc_rd32(p) | ((uint64_t)kvc_rd32(p + 4) << 32);
}
static inline void kvc_wr16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void kvc_wr32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline void kvc_wr64(uint8_t *p, uint64_t v)
{
    kvc_wr32(p, (uint32_t)v);
    kvc_wr32(p + 4, (uint32_t)(v >> 32));
}

/* Quantizes a group of m tokens (m <= cap) into dst laid out with capacity cap. With P > 0
 * and a protectable option, the P key channels of highest salience (chan_w[c] x range, or the
 * range alone when chan_w is NULL) are coded at 8 bits in the pcodes block and their main
 * codes are 0. k, v: [m][d] fp32 (already rotated when the option is stored rotated). */
void kvc_quant_group(int o, uint32_t d, uint32_t m, uint32_t cap, uint32_t P,
                     const float *chan_w, const float *k, const float *v, uint8_t *dst);
/* Reconstructs m tokens of a group stored with capacity cap. k, v: [m][d]. pidx must have
 * been validated (strictly increasing, < d). */
void kvc_dequant_group(int o, uint32_t d, uint32_t m, uint32_t cap, uint32_t P,
                       const uint8_t *src, float *k, float *v);
/* Trial quantization of a group of m tokens at a bit width: per-token squared errors,
 * errk[t] = sum_c kw_c (k - k~)^2 (keys per channel over the group), errv[t] = |v - v~|^2
 * (values per token). k, v: [m][d]. */
void kvc_key_errors(int bits, uint32_t d, uint32_t m, const float *k, const float *kw,
                    float *errk);
void kvc_value_errors(int bits, uint32_t d, uint32_t m, const float *v, float *errv);
/* Both at two bit widths in one pass (the group's ranges found once): err1 at b1 and, unless
 * err2 is NULL, err2 at b2, each bit for bit what the one-width call gives. */
void kvc_key_errors2(int b1, float *err1, int b2, float *err2, uint32_t d, uint32_t m,
                     const float *k, const float *kw);
void kvc_value_errors2(int b1, float *err1, int b2, float *err2, uint32_t d, uint32_t m,
                       const float *v);
/* out[t] = |rows[t] - x|^2 for n rows of d floats (kvc_dot of the difference). */
void kvc_sq_dists(const float *rows, uint32_t n, uint32_t d, const float *x, float *out);
/* Modelled errors of a group of m rows at a bit width (a uniform quantizer's step^2 / 12): the
 * key error, the same for every row, weighted by kw per channel; the value error per row. */
void kvc_model_errors(int bits, uint32_t d, uint32_t m, const float *k, const float *v,
                      const float *kw, float *errk, float *errv);

/* In-place orthonormal Walsh-Hadamard transform (H / sqrt(d)); d a power of two. H is
 * symmetric and orthonormal, so it is its own inverse. */
void kvc_hadamard(float *x, uint32_t d);
/* The same transform of src written to dst (dst may equal src; otherwise they must not
 * overlap). */
void kvc_hadamard_to(const float *src, float *dst, uint32_t d);

/* Eight fp32 lanes as a GCC/Clang vector: elementwise semantics, so the result is identical
 * whether the compiler lowers it to AVX2 or to SSE pairs. */
typedef float kvc_v8 __attribute__((vector_size(32)));
typedef int32_t kvc_v8i __attribute__((vector_size(32)));

/* Loads and reductions go through pointers: vectors never cross a function boundary by
 * value, which would change the ABI between the AVX2 and the default clones. */
#define KVC_V8_LOAD(v, p) memcpy(&(v), (p), sizeof(kvc_v8))

static inline float kvc_v8_sum(const kvc_v8 *a)
{
    return (((*a)[0] + (*a)[1]) + ((*a)[2] + (*a)[3])) +
           (((*a)[4] + (*a)[5]) + ((*a)[6] + (*a)[7]));
}

/* Dot product with 8 independent partial sums in a fixed order (d a multiple of 8 is the
 * fast path). */
static inline float kvc_dot(const float *a, const float *b, uint32_t d)
{
    kvc_v8 acc = {0};
    uint32_t c = 0;
    for (; c + 8 <= d; c += 8) {
        kvc_v8 x, y;
        KVC_V8_LOAD(x, a + c);
        KVC_V8_LOAD(y, b + c);
        acc += x * y;
    }
    float s = kvc_v8_sum(&acc);
    for (; c < d; c++)
        s += a[c] * b[c];
    return s;
}

/* n rows of d FP16 values, stride elements apart, to [n][d] fp32. */
void kvc_load_rows(const uint16_t *src, size_t stride, uint32_t n, uint32_t d, float *dst);

/* Unpacks one row of d codes of b bits into floats. */
void kvc_unpack_row(const uint8_t *src, uint32_t d, int bits, float *dst);

/* Page header accessors (layout in docs/kvcodec-format.md §3). */
typedef struct {
    uint8_t opt, flags;
    uint16_t head_dim;
    uint16_t n_slots, last_tokens; // tokens in the last slot
    uint16_t group;                // tokens per slot (1 for F16)
    uint16_t cap_slots;
    uint32_t n_tokens;
} kvc_page_hdr_t;

static inline void kvc_page_hdr_read(const uint8_t *p, kvc_page_hdr_t *h)
{
    h->opt = p[0];
    h->flags = p[1];
    h->head_dim = kvc_rd16(p + 2);
    h->n_slots = kvc_rd16(p + 4);
    h->last_tokens = kvc_rd16(p + 6);
    h->group = kvc_rd16(p + 8);
    h->cap_slots = kvc_rd16(p + 10);
    h->n_tokens = kvc_rd32(p + 12);
}
static inline void kvc_page_hdr_write(uint8_t *p, const kvc_page_hdr_t *h)
{
    p[0] = h->opt;
    p[1] = h->flags;
    kvc_wr16(p + 2, h->head_dim);
    kvc_wr16(p + 4, h->n_slots);
    kvc_wr16(p + 6, h->last_tokens);
    kvc_wr16(p + 8, h->group);
    kvc_wr16(p + 10, h->cap_slots);
    kvc_wr32(p + 12, h->n_tokens);
}

/* Internal pool access used by attention. */
size_t kvc_pool_slot_bytes(const kvc_pool_t *pool, int o);
uint32_t kvc_pool_head_dim(const kvc_pool_t *pool);
uint32_t kvc_pool_protect(const kvc_pool_t *pool);
const kvc_pool_t *kvc_seq_pool(const kvc_seq_t *seq);
uint32_t kvc_seq_n_kv_heads(const kvc_seq_t *seq);
uint32_t kvc_seq_n_layers(const kvc_seq_t *seq);

/* ---- Page bookkeeping shared by the CPU pool (pool.c) and the GPU pool (pool.cu) ---- */

/* One (layer, kv head) page list of a sequence. */
typedef struct {
    kvc_page_id_t *ids;
    uint32_t n, cap;
    uint32_t n_tokens;
} kvc_page_list_t;

/* Room for `extra` more ids (FY_ERR_NO_MEMORY, list unchanged, when it cannot grow). */
fy_status_t kvc_page_list_reserve(kvc_page_list_t *l, uint32_t extra);

/* Pages a run of `count` tokens of option o takes, cap_slots[o] groups to a page. */
uint32_t kvc_run_pages(const uint32_t *cap_slots, uint32_t group, int o, uint64_t count);

/* Tokens per option code in one head's map of n_tokens 4-bit codes (two a byte, low nibble
 * first): cnt[o] for each option o < KVC_OPT_COUNT, and cnt[KVC_OPT_COUNT] the tokens whose
 * code is no option. Thread: any. */
void kvc_map_counts(const uint8_t *map, uint32_t n_tokens, uint64_t *cnt);

/* Tokens per option of kv head h of a parsed frame: cnt[KVC_OPT_COUNT], the parser's counts
 * where it kept them (kvc_frame_counts_kept), else from the head's map. */
void kvc_frame_head_counts(const kvc_frame_t *f, uint32_t h, uint64_t *cnt);

/* Whether f carries head h's option counts from kvc_frame_parse (counted, h below
 * KVC_FRAME_COUNTED_HEADS, and they add up to n_tokens). */
bool kvc_frame_counts_kept(const kvc_frame_t *f, uint32_t h);

/* Pages a frame takes in a pool of params p (kvc_pool_pages_needed for either pool):
 * FY_ERR_MISMATCH for another geometry, FY_ERR_OUT_OF_RANGE past 2^32 pages. */
fy_status_t kvc_frame_pages(const kvc_pool_params_t *p, const uint32_t *cap_slots,
                            const kvc_frame_t *f, uint32_t *n_pages_p);

/* ---- Encoder stages, shared by kvc_encoder_encode_layer and the CUDA encoder ---- */

/* Per-(kv head, token) distortion inputs measured elsewhere (the GPU), each [n_kv][n_tokens]:
 * dev = |v_t - obar|^2, ek[b] / ev[b] the key / value errors at bit width b (8, 4, 2) exactly
 * as the CPU's trial or modelled pass computes them; NULL where the policy needs none. */
typedef struct {
    const float *dev;
    const float *ek[9], *ev[9];
} kvc_err_tables_t;

/* The argument checks of kvc_encoder_encode_layer (layer order, strides, out_cap). */
fy_status_t kvc_encoder_check_layer(const kvc_encoder_t *e, const kvc_layer_input_t *in,
                                    size_t out_cap);
/* Distortion table and option choice of the next layer (the rate controller's step): with
 * tab NULL the errors are measured from in->k, in->v (host memory); otherwise in's pointers
 * are not read. Sets info->lambda and info->budget_met. sc: host arrays. */
fy_status_t kvc_encoder_choose(kvc_encoder_t *e, const kvc_layer_input_t *in,
                               const kvc_scores_t *sc, const kvc_err_tables_t *tab,
                               kvc_layer_info_t *info);
/* The chosen options, [n_kv_heads][n_tokens], valid until the next choose. */
const uint8_t *kvc_encoder_choice(const kvc_encoder_t *e);
const kvc_encoder_params_t *kvc_encoder_params(const kvc_encoder_t *e);
/* Writes the frame header and maps of the current choice into out; adds the items per option
 * to counts[KVC_OPT_COUNT]; returns the header + maps bytes (where the payload starts) and the
 * whole frame size in *frame_bytes_p. */
size_t kvc_encoder_write_head(const kvc_encoder_t *e, uint32_t layer, uint8_t *out,
                              uint64_t *counts, size_t *frame_bytes_p);
/* The frame header (KVC_FRAME_HEADER_BYTES) of a layer with these options present (bit per
 * option), payload bytes and frame bytes. */
void kvc_encoder_header_fill(const kvc_encoder_t *e, uint32_t layer, uint32_t opt_mask,
                             size_t payload, size_t total, uint8_t *hd);
/* Accounts a written frame of len bytes to the rate controller and fills info's frame_bytes,
 * fp16_bytes and distortion; the next layer may come. */
void kvc_encoder_commit(kvc_encoder_t *e, size_t len, kvc_layer_info_t *info);
/* The same with the layer's distortion computed elsewhere (the GPU's optimizer). */
void kvc_encoder_commit_dist(kvc_encoder_t *e, size_t len, double dist, kvc_layer_info_t *info);

/* What an optimizer outside encode.c (the GPU's) needs to make the same choice as
 * kvc_encoder_choose for the next layer: the option costs and rank penalties, the backbone
 * tokens and the rate controller's state. */
typedef struct {
    float cost[KVC_OPT_COUNT];     // amortized bytes per token of each option
    float rank_pen[KVC_OPT_COUNT]; // distortion weight of each option under rank policies
    const uint8_t *backbone;       // [n_tokens] 1 = HEX backbone token
    bool no_budget;
    uint32_t r;         // layers left, this one included
    double remain;      // bytes of the request budget left
    double lambda_prev; // < 0: none yet
    /* This layer's byte share: kvc_share(remain, r, share_w, share_left), remain / r or under
     * a calibrated policy with layer_alloc the weighted share (both encoders read it from
     * here). */
    double share;
    double share_w, share_left;   // the calibrated weight and the weights left; 0: equal shares
    uint64_t spent, total_budget; // remain = total_budget - min(spent, total_budget)
} kvc_opt_inputs_t;
void kvc_encoder_opt_inputs(const kvc_encoder_t *e, uint32_t layer, kvc_opt_inputs_t *oi);

/* A layer's byte share of remain: the weighted share remain w / left when left > 0, else an
 * equal share of the r layers left. The GPU's rate controller computes the same, operation for
 * operation. */
static inline double kvc_share(double remain, uint32_t r, double w, double left)
{
    if (left > 0)
        return remain * w / left;
    return r > 0 ? remain / r : 0;
}
/* The multiplier an outside optimizer ended at (the next layer starts from it). */
void kvc_encoder_set_lambda(kvc_encoder_t *e, double lambda);

/* Candidates the greedy fill puts in order at a time (0: KVC_GREEDY_WINDOW). Any window gives
 * the same choice; tests set small ones to cover the selection. */
#define KVC_GREEDY_WINDOW 4096
void kvc_encoder_set_greedy_window(kvc_encoder_t *e, size_t window);
/* Candidates the last greedy fill put in order, both passes (0 where none ran). */
size_t kvc_encoder_greedy_sorted(const kvc_encoder_t *e);

#endif /* FERRY_KVCODEC_INT_H */
