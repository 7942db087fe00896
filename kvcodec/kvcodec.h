/*
 * kvcodec.h: Ferry's KV-cache codec, CPU reference (DESIGN.md §3).
 *
 * Prefill side: score the tokens of one layer from the observation-window queries, choose one
 * option per (kv head, token) under a byte budget, and write one self-describing wire frame
 * per layer (docs/kvcodec-format.md). A kvc_encoder_t per request carries the rate controller
 * across layers, so layer l is coded before layer l+1 exists.
 *
 * Decode side: validate a frame without trusting it, place it (still compressed) into a pool
 * of fixed-size, reference-counted pages, keep per-sequence page lists per (layer, kv head),
 * append FP16 tokens as decoding proceeds, convert older pages to a lower option, and run
 * attention of a query block directly over the compressed pages.
 *
 * Options (K bits / V bits): 16/16, 8/8, 4/4, 4/2, 2/2 and DROP. Keys are quantized per
 * channel over groups of G same-option tokens in original order, values per token; both
 * asymmetric min/max with FP16 scale and zero. The <= 4-bit options may be stored after an
 * orthonormal Hadamard rotation of head_dim (see kvc_attend for what the query side does).
 *
 * Shapes: K and V of one layer are [n_kv_heads][n_tokens][head_dim] (with explicit strides),
 * K after RoPE. Window queries are [n_heads][n_window][head_dim], n_heads a multiple of
 * n_kv_heads (GQA). All multi-byte values on the wire and in pages are little-endian.
 */
#ifndef FERRY_KVCODEC_H
#define FERRY_KVCODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Options                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Ordered from most to fewest bytes; a "lower" option has a larger value. */
typedef enum {
    KVC_OPT_F16 = 0, // 16/16: raw FP16 K and V
    KVC_OPT_Q8 = 1,  // 8/8
    KVC_OPT_Q4 = 2,  // 4/4
    KVC_OPT_Q4V2 = 3, // 4/2
    KVC_OPT_Q2 = 4,  // 2/2
    KVC_OPT_DROP = 5, // K and V evicted together
    KVC_OPT_COUNT = 6,
} kvc_opt_t;

#define KVC_OPT_BIT(o) (1u << (o))
#define KVC_OPT_ALL_MASK 0x3fu

/* "16/16", "8/8", "4/4", "4/2", "2/2", "drop"; "?" out of range. Thread: any. */
const char *kvc_opt_name(kvc_opt_t opt);
/* Parses the names above (also "fp16", "int8", "int4", "int2", "evict"). Thread: any. */
fy_status_t kvc_opt_parse(const char *s, kvc_opt_t *opt_p);
/* Key and value bits of an option (0 for DROP). Thread: any. */
int kvc_opt_kbits(kvc_opt_t opt);
int kvc_opt_vbits(kvc_opt_t opt);

/* ------------------------------------------------------------------------------------------ */
/* Policies                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    KVC_REDUCE_MEAN = 0, // GQA group: mean of the query heads' scores
    KVC_REDUCE_MAX = 1,  // max over the group (protects retrieval heads)
} kvc_reduce_t;

typedef enum {
    /* importance x measured reconstruction error of each option (trial quantization) */
    KVC_DIST_TRIAL = 0,
    /* importance x a fixed per-option penalty: assignment by score rank (SpectrumKV, SnapKV) */
    KVC_DIST_RANK = 1,
    /* like RANK with importance = recency (first `sinks` + last tokens, PDTrim) */
    KVC_DIST_POSITION = 2,
    /* like TRIAL with the error of each option modelled from its step size (step^2 / 12 per
     * element) instead of measured: only min/max passes, several times faster */
    KVC_DIST_MODEL = 3,
} kvc_dist_t;

typedef enum {
    KVC_IMP_MEAN = 0, // a token's importance: its attention averaged over the window queries
    KVC_IMP_RMS = 1,  // the root mean square over the window
    KVC_IMP_MAX = 2,  // the largest over the window
    /* RMS and MAX need q_window: from window_attn every mode is the mean. */
} kvc_importance_t;

/* Limits of a policy's calibration tables. */
#define KVC_POLICY_MAX_LAYERS 256
#define KVC_POLICY_MAX_LAMBDAS 16

/* What a policy decides. Policies are data: kvc_policy_parse_json reads the same fields. */
typedef struct {
    char name[32];
    uint32_t options;     // allowed options, KVC_OPT_BIT mask; F16 is always allowed for pins
    uint32_t group;       // G: tokens per key quantization group (8..256, multiple of 8)
    uint32_t sinks;       // first tokens pinned to F16 (or only kept: pins_kept)
    uint32_t recent;      // last tokens pinned to F16 (likewise)
    bool pins_kept;       // sinks and recent tokens may take any option but DROP (the
                          // optimizer picks) instead of F16
    uint32_t window;      // observation window W the prefill side should pass
    uint32_t window_div;  // score from at most max(32, n_tokens / window_div) of the window
                          // queries, the last ones (0 = all W; kvc_score only: the GPU scorer
                          // uses every query it is given)
    uint32_t pool_kernel; // 1-D max pooling along tokens (odd; 1 = none)
    kvc_reduce_t reduce;
    kvc_importance_t importance; // over the window queries: mean or RMS of the attention
    bool joint_kv;        // weight by each value's deviation from the window output (HqeKV)
    bool rotate;          // Hadamard rotation of head_dim before the <= 4-bit options
    float backbone_frac;  // HEX backbone: fraction of tokens pinned (0 = off)
    kvc_opt_t backbone_opt; // the option backbone tokens are pinned to (F16 or Q8)
    float hybrid_threshold; // HybridKV: a head whose window mass on sinks + local tokens is
                            // >= this is static and gives up middle tokens first (0 = off)
    float hybrid_factor;    // importance multiplier for a static head's middle tokens
    uint32_t protect_channels; // MixKVQ: key channels of each <= 4-bit group kept at 8 bits,
                               // the most salient by mean |q| x range (0..32, < head_dim)
    kvc_dist_t dist;
    double budget;        // b: all wire bytes / FP16 K+V bytes; <= 0: no budget, every free
                          // token takes the cheapest allowed option except DROP
    double rate_flex;     // rate controller: a layer may use (1 +- flex) x its share
    float prior;          // trial/model distortion: every token's importance gets prior / n
                          // added, the attention of queries after the window spread evenly
                          // over the prompt (0 = window attention alone)
    float drop_spread;    // trial/model distortion: dropping a token of importance w costs
                          // w^2 x this x the head's mean |v - obar|^2 besides its deviation
                          // from the window output: later queries' outputs are not obar
                          // (0 = the window output alone)
    /* Calibration (`ferry calibrate`, docs/kvcodec-policies.md §4): per-layer sensitivity
     * weights and the rate controller's first multiplier per budget. Nothing here acts while
     * n_layer_weights and n_lambdas are 0 (every built-in policy). */
    uint32_t n_layer_weights; // layers calibrated; must equal the model's layers when > 0
    float layer_weight[KVC_POLICY_MAX_LAYERS]; // sensitivity of each layer (> 0, mean ~1)
    float layer_alloc;  // byte share of layer l proportional to weight_l^layer_alloc (0 = equal)
    float layer_gamma;  // distortion of layer l scaled by weight_l^layer_gamma (0 = unscaled)
    uint32_t n_lambdas; // entries of the multiplier table
    double lambda_budget[KVC_POLICY_MAX_LAMBDAS]; // b of each entry, increasing
    double lambda_first[KVC_POLICY_MAX_LAMBDAS];  // layer 0's multiplier at that b
} kvc_policy_t;

/* The `ferry` defaults (all options, G 32, sinks 4 and recent 16 kept, W 128 with RMS importance,
 * pool 9, prior 2, drop spread 1, no backbone, budget 0.25; layer_alloc 0.2 once a calibration is
 * loaded). Thread: any. */
void kvc_policy_default(kvc_policy_t *policy);

/* Fills one of the built-in named policies: fp16, int8, int4, kivi2, snapkv, h2o, pdtrim,
 * spectrum3, ferry. FY_ERR_NOT_FOUND for another name. Thread: any. */
fy_status_t kvc_policy_builtin(const char *name, kvc_policy_t *policy_p);
/* NULL-terminated list of the built-in names. */
const char *const *kvc_policy_builtin_names(void);

/* Checks ranges and consistency; writes a reason into err. Thread: any. */
fy_status_t kvc_policy_validate(const kvc_policy_t *policy, char *err, size_t err_len);

/* Parses a JSON policy (docs/kvcodec-policies.md): an object whose keys override the policy
 * named by "base" (default "ferry"). Unknown keys and bad values fail with a message in err.
 * text need not be NUL-terminated. Thread: any. */
fy_status_t kvc_policy_parse_json(const char *text, size_t len, kvc_policy_t *policy_p,
                                  char *err, size_t err_len);
/* Reads and parses a policy file; a "calibration" path in it is read relative to the
 * file's directory. Thread: any. */
fy_status_t kvc_policy_load_file(const char *path, kvc_policy_t *policy_p, char *err,
                                 size_t err_len);
/* Reads a calibration file (`ferry calibrate`'s .calibration.json: "layer_weights", and
 * "lambda" entries with "budget" and "lambda_first") into the policy's calibration fields;
 * the policy's other fields stay. FY_ERR_IO when it cannot be read, FY_ERR_FORMAT with a
 * message naming the file and the key when it is malformed; *policy_p is unchanged on error.
 * Thread: any. */
fy_status_t kvc_policy_load_calibration(const char *path, kvc_policy_t *policy_p, char *err,
                                        size_t err_len);

/* ------------------------------------------------------------------------------------------ */
/* Scoring                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* One layer of one sequence, as the prefill side holds it. Pointers are borrowed for the call.
 * Element (h, t, c) of K is k[h * head_stride + t * token_stride + c] (strides in elements). */
typedef struct {
    uint32_t layer;
    const uint16_t *k; // FP16, after RoPE   [n_kv_heads][n_tokens][head_dim] (strided)
    const uint16_t *v; // FP16               [n_kv_heads][n_tokens][head_dim] (strided)
    size_t head_stride;
    size_t token_stride;
    /* Observation window, optional: the last n_window queries of the prompt, after RoPE.
     * Query w sits at position n_tokens - n_window + w and sees tokens up to it. */
    const float *q_window; // [n_heads][n_window][head_dim] (contiguous), or NULL
    uint32_t n_window;
    /* Alternative to q_window when the attention kernel already computed it: per query head,
     * the mean over the window of the softmax rows. Used only when q_window is NULL. */
    const float *window_attn; // [n_heads][n_tokens], or NULL
} kvc_layer_input_t;

/* Per-token importance and side statistics of one layer, what the optimizer consumes. */
typedef struct {
    uint32_t n_kv_heads, n_tokens, head_dim;
    float *importance; // [n_kv_heads][n_tokens]  pooled window attention (probability mass)
    float *obar;       // [n_kv_heads][head_dim]  mean window output per kv head
    float *qsq;        // [n_kv_heads][head_dim]  mean q_c^2 / head_dim (logit sensitivity)
    uint8_t *is_static; // [n_kv_heads]            HybridKV head class (1 = static)
} kvc_scores_t;

/* Allocates the arrays of a kvc_scores_t. _cleanup accepts a zeroed struct. Thread: any. */
fy_status_t kvc_scores_init(kvc_scores_t *s, uint32_t n_kv_heads, uint32_t n_tokens,
                            uint32_t head_dim);
void kvc_scores_cleanup(kvc_scores_t *s);

/* Scores one layer: softmax of the window queries over all keys (causal), mean over the
 * window, reduced over each GQA group, max-pooled along tokens, HybridKV head classes.
 * Without q_window or window_attn every token gets importance 1. Thread: any. */
fy_status_t kvc_score(const kvc_policy_t *policy, uint32_t n_heads, uint32_t n_kv_heads,
                      uint32_t n_tokens, uint32_t head_dim, const kvc_layer_input_t *in,
                      kvc_scores_t *out);

/* ------------------------------------------------------------------------------------------ */
/* Encoder (prefill side)                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct kvc_encoder kvc_encoder_t;

typedef struct {
    const kvc_policy_t *policy; // copied at create
    double budget;              // overrides policy->budget when >= 0 (default -1)
    uint32_t n_layers;
    uint32_t n_heads;    // query heads
    uint32_t n_kv_heads; // 1..1024
    uint32_t head_dim;   // multiple of 8, <= 512 (power of two when the policy rotates)
    uint32_t n_tokens;   // prompt length, 1..2^24
    uint64_t model_fingerprint; // written into every frame; the decode side checks it
    uint64_t seq_id;            // written into every frame
} kvc_encoder_params_t;

void kvc_encoder_params_default(kvc_encoder_params_t *params);

/* What happened to one layer. */
typedef struct {
    size_t frame_bytes;
    size_t fp16_bytes;             // FP16 bytes of this layer's K and V
    uint64_t tokens[KVC_OPT_COUNT]; // (head, token) items per option
    double lambda;                 // multiplier used
    double distortion;             // sum of modelled distortion
    bool budget_met;               // false only when the budget is below the frame floor
    uint64_t score_ns, encode_ns;  // time in scoring and in optimize + quantize + write
} kvc_layer_info_t;

/* Creates the per-request encoder (rate controller state, scratch). Thread: any. */
fy_status_t kvc_encoder_create(const kvc_encoder_params_t *params, kvc_encoder_t **enc_p);
/* Accepts NULL. */
void kvc_encoder_destroy(kvc_encoder_t *enc);

/* Upper bound of one layer's frame size (everything F16), for sizing staging buffers. */
size_t kvc_encoder_max_frame_bytes(const kvc_encoder_t *enc);

/* Encodes the next layer (layers must come in order 0, 1, ...; FY_ERR_STATE otherwise) into
 * out (caller-owned; out_cap must be at least kvc_encoder_max_frame_bytes). scores (borrowed,
 * may be NULL: the encoder then scores in->q_window itself) lets the prefill side reuse scores
 * its attention kernel produced. On success writes the frame length to *len_p and, if info_p
 * is not NULL, the layer's info. Identical inputs give identical bytes.
 * Thread: not thread-safe (one encoder per request). */
fy_status_t kvc_encoder_encode_layer(kvc_encoder_t *enc, const kvc_layer_input_t *in,
                                     const kvc_scores_t *scores, uint8_t *out, size_t out_cap,
                                     size_t *len_p, kvc_layer_info_t *info_p);

/* Cumulative frame bytes so far and the request's byte budget (b x FP16 bytes of all layers).
 * Thread: not thread-safe. */
void kvc_encoder_totals(const kvc_encoder_t *enc, uint64_t *bytes_p, uint64_t *budget_p);

/* ------------------------------------------------------------------------------------------ */
/* Frames (docs/kvcodec-format.md)                                                             */
/* ------------------------------------------------------------------------------------------ */

#define KVC_FRAME_MAGIC 0x564b5946u // "FYKV"
#define KVC_FRAME_VERSION 1
#define KVC_FRAME_HEADER_BYTES 64
#define KVC_FRAME_FLAG_ROTATED 0x1u // the <= 4-bit options are stored Hadamard-rotated
/* Frames of up to this many kv heads keep their parser's option counts (kvc_frame_t.counts). */
#define KVC_FRAME_COUNTED_HEADS 32

/* A validated frame: views into the caller's buffer, valid while that buffer is. */
typedef struct {
    uint64_t model_fingerprint;
    uint64_t seq_id;
    uint32_t layer, n_layers;
    uint32_t n_kv_heads, head_dim, n_tokens, group;
    uint32_t flags;
    uint32_t protect;    // P: key channels kept at 8 bits in each 4/4, 4/2, 2/2 group
    uint32_t opt_mask;   // options present
    const uint8_t *maps; // [n_kv_heads][ceil(n_tokens / 2)] 4-bit option per token
    const uint8_t *payload;
    size_t payload_bytes;
    size_t frame_bytes;
    /* Tokens of each option per kv head as kvc_frame_parse counted them from the maps, so that
     * sizing and placing the frame need not read the maps again: set (counted) for frames of
     * up to KVC_FRAME_COUNTED_HEADS kv heads, and only by the parser. */
    bool counted;
    uint32_t counts[KVC_FRAME_COUNTED_HEADS][KVC_OPT_COUNT];
} kvc_frame_t;

/* Validates a frame from outside: length, magic, version, CRC32C, every field and every
 * derived size. Nothing is read outside [buf, buf + len). FY_ERR_TRUNCATED, FY_ERR_CORRUPT,
 * FY_ERR_FORMAT or FY_ERR_UNSUPPORTED on bad input. Thread: any. */
fy_status_t kvc_frame_parse(const uint8_t *buf, size_t len, kvc_frame_t *frame_p);

/* Option of token t of head h in a parsed frame. */
kvc_opt_t kvc_frame_opt(const kvc_frame_t *f, uint32_t h, uint32_t t);

/* Reference dequantizer: K and V in the original (unrotated) space, zeros for dropped tokens;
 * kept[h * n + t] = 1 where a token is present (kept may be NULL). Thread: any. */
fy_status_t kvc_frame_dequantize(const kvc_frame_t *f, float *k, float *v, uint8_t *kept);
/* k, v: [n_kv_heads][n_tokens][head_dim]   kept: [n_kv_heads][n_tokens] */

/* ------------------------------------------------------------------------------------------ */
/* Page pool and sequences (decode side)                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Page layout (docs/kvcodec-format.md §3): a 16-byte header, then slots of one option. An F16
 * slot holds one token (K row, V row); a quantized slot holds one key group of up to G
 * tokens, laid out exactly as in the frame so placing is a copy. */
#define KVC_PAGE_HEADER_BYTES 16
#define KVC_PAGE_FLAG_ROTATED 0x1u
#define KVC_PAGE_FLAG_SEALED 0x2u // last slot is a partial group; no more slots

typedef struct kvc_pool kvc_pool_t;
typedef uint32_t kvc_page_id_t;

typedef struct {
    size_t page_bytes; // fixed size of every page (default 32 KiB)
    uint32_t n_pages;
    uint32_t head_dim;
    uint32_t group; // G of the frames this pool accepts
    uint32_t protect; // P (MixKVQ protected channels) of the frames this pool accepts
} kvc_pool_params_t;

void kvc_pool_params_default(kvc_pool_params_t *params);

/* Allocates n_pages x page_bytes (64-byte aligned). FY_ERR_INVALID_ARG when a page cannot hold
 * one slot of every option. Thread: any. */
fy_status_t kvc_pool_create(const kvc_pool_params_t *params, kvc_pool_t **pool_p);
/* Frees the pool; pages still referenced are freed too. Accepts NULL. */
void kvc_pool_destroy(kvc_pool_t *pool);

/* Free pages now. Thread: any (pool operations take the pool's lock). */
uint32_t kvc_pool_free_count(const kvc_pool_t *pool);
uint32_t kvc_pool_n_pages(const kvc_pool_t *pool);
/* Tokens one page holds at an option. */
uint32_t kvc_pool_page_tokens(const kvc_pool_t *pool, kvc_opt_t opt);

/* Takes a free page (refcount 1, empty, for opt). FY_ERR_RESOURCE_EXHAUSTED when none.
 * Thread: any. */
fy_status_t kvc_page_alloc(kvc_pool_t *pool, kvc_opt_t opt, bool rotated, kvc_page_id_t *id_p);
/* Reference counting; the page returns to the free list when the count reaches 0.
 * Thread: any. */
void kvc_page_ref(kvc_pool_t *pool, kvc_page_id_t id);
void kvc_page_unref(kvc_pool_t *pool, kvc_page_id_t id);
uint32_t kvc_page_refcount(const kvc_pool_t *pool, kvc_page_id_t id);
/* Raw page memory (page_bytes), valid while the page is referenced. Thread: any. */
uint8_t *kvc_page_data(const kvc_pool_t *pool, kvc_page_id_t id);
/* Option and token count from a page's header. */
kvc_opt_t kvc_page_opt(const kvc_pool_t *pool, kvc_page_id_t id);
uint32_t kvc_page_n_tokens(const kvc_pool_t *pool, kvc_page_id_t id);

/* Reference dequantizer of one page, original (unrotated) space; writes n tokens.
 * k, v: [page tokens][head_dim]. Thread: any. */
fy_status_t kvc_page_dequantize(const kvc_pool_t *pool, kvc_page_id_t id, float *k, float *v,
                                uint32_t *n_p);

/* A sequence's cache: per (layer, kv head) a list of pages. Holds one reference per page. */
typedef struct kvc_seq kvc_seq_t;

/* pool is borrowed and must outlive the sequence. Thread: any. */
fy_status_t kvc_seq_create(kvc_pool_t *pool, uint32_t n_layers, uint32_t n_kv_heads,
                           uint64_t model_fingerprint, uint64_t seq_id, kvc_seq_t **seq_p);
/* Drops every page reference; accepts NULL. */
void kvc_seq_destroy(kvc_seq_t *seq);

/* Page list of (layer, head); the pointer is valid until the list changes. Thread: not
 * thread-safe against changes of the same sequence. */
const kvc_page_id_t *kvc_seq_pages(const kvc_seq_t *seq, uint32_t layer, uint32_t head,
                                   uint32_t *n_pages_p);
/* Tokens held for (layer, head) and whether the layer has been placed. */
uint32_t kvc_seq_n_tokens(const kvc_seq_t *seq, uint32_t layer, uint32_t head);
bool kvc_seq_layer_placed(const kvc_seq_t *seq, uint32_t layer);

/* Pages a frame needs (for admission and reservations). Thread: any. */
fy_status_t kvc_pool_pages_needed(const kvc_pool_t *pool, const kvc_frame_t *frame,
                                  uint32_t *n_pages_p);

/* Places a validated frame without dequantizing. Checks the fingerprint, sequence id, layer
 * range, shape and group against the sequence and pool, and that the layer was not placed
 * yet. All-or-nothing: on any error (FY_ERR_RESOURCE_EXHAUSTED included) the sequence and
 * pool are unchanged. Thread: not thread-safe per sequence; any across sequences. */
fy_status_t kvc_place(kvc_seq_t *seq, const kvc_frame_t *frame);

/* Appends one decoded token's K and V (FP16, original space) to the FP16 tail of
 * (layer, head). k, v: [head_dim]. Thread: as kvc_place. */
fy_status_t kvc_seq_append(kvc_seq_t *seq, uint32_t layer, uint32_t head, const uint16_t *k,
                           const uint16_t *v);

/* HqeKV conversion: re-codes the oldest pages of option `from` of (layer, head), up to
 * max_tokens tokens (0 = all), to the lower option `to` with the same quantizers (rotated when
 * `rotate` and to is <= 4 bits). Pages shared with another sequence are copied, not changed.
 * Writes the number of tokens converted. Thread: as kvc_place. */
fy_status_t kvc_seq_convert(kvc_seq_t *seq, uint32_t layer, uint32_t head, kvc_opt_t from,
                            kvc_opt_t to, bool rotate, uint32_t max_tokens,
                            uint32_t *n_converted_p);

/* ------------------------------------------------------------------------------------------ */
/* Attention over compressed pages                                                             */
/* ------------------------------------------------------------------------------------------ */

/* Attention of n_q query rows (the query heads of one GQA group, or several positions) over a
 * page list: out[r] = softmax(scale * q[r] . K^T) V, online softmax, dequantizing each page
 * in registers; no causal mask (every cached token is visible). Rotated pages are handled by
 * rotating q once (<Hq, Hk> = <q, k>) and un-rotating the rotated part of the output
 * accumulator at the end (H is its own inverse). An empty list gives zeros.
 * q, out: [n_q][head_dim] fp32, n_q <= 64. Thread: any (reads pages only). */
fy_status_t kvc_attend(const kvc_pool_t *pool, const kvc_page_id_t *pages, uint32_t n_pages,
                       const float *q, uint32_t n_q, float scale, float *out);

/* One decode step of one layer of a sequence: q [n_heads][head_dim] -> out [n_heads][head_dim],
 * GQA groups mapped to kv heads, kv heads spread over the thread pool (NULL = this thread).
 * When the kv heads do not divide evenly over the pool's threads and the context is long, each
 * head's page list is split into one part per thread and the parts' partial softmax results
 * combined (equal to kvc_attend up to rounding; the same bytes for the same pool size).
 * Thread: one caller per fy_pool_t at a time. */
fy_status_t kvc_attend_layer(const kvc_seq_t *seq, uint32_t layer, uint32_t n_heads,
                             const float *q, float scale, float *out, fy_pool_t *threads);

/* ------------------------------------------------------------------------------------------ */
/* Synthetic data (tests, benchmarks)                                                          */
/* ------------------------------------------------------------------------------------------ */

/* One layer of synthetic KV shaped like a real post-RoPE cache: ~1/16 of the key channels are
 * outliers (8x scale, offset), value magnitudes vary per token, token 0 is an attention sink,
 * and each query head's window attends to a "needle" token. Deterministic in seed.
 * k, v: [n_kv][n][d] fp16 (contiguous); q: [n_heads][n_window][d] fp32 or NULL. Thread: any. */
void kvc_synth_layer(uint64_t seed, uint32_t n_heads, uint32_t n_kv, uint32_t n, uint32_t d,
                     uint32_t n_window, uint16_t *k, uint16_t *v, float *q);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_KVCODEC_H */
