/*
 * kvcodec_cuda.h: the KV codec on the GPU, CUDA twins of kvcodec.h (the CPU code is the
 * reference every function here is tested against).
 *
 * - Scoring (kvc_score_cuda): the same importance, window output, query sensitivity and
 *   HybridKV classes as kvc_score, from device K, V and either the window queries or the
 *   attention kernel's window_attn.
 * - Encoding (kvc_encoder_cuda_t): K and V of a layer in device memory -> a wire frame in
 *   device memory, byte-identical to kvc_encoder_encode_layer for the same input and scores.
 *   Trial/modelled distortion, rotation, the option-choice optimizer and rate controller step,
 *   the frame layout, quantization, packing and the CRC all run on the GPU (the host keeps the
 *   rate controller's running totals).
 * - GPU page pool (kvc_gpu_pool_t) and placement (kvc_place_cuda): one device allocation of
 *   n_pages x page_bytes, page p at base + p x page_bytes holding exactly the bytes a CPU pool's
 *   page holds (docs/kvcodec-format.md §3). Free list, reference counts and per-sequence page
 *   lists stay on the host.
 * - Decode attention over compressed pages (kvc_attend_batch_cuda): the twin of kvc_attend for
 *   a batch of page lists, flash-decoding with the page list split over thread blocks.
 *
 * Streams are passed as void * (a cudaStream_t; NULL = the legacy default stream) so this
 * header stays plain C. Every function returns FY_ERR_NO_DEVICE when the library was built
 * without CUDA, FY_ERR_CUDA when the CUDA runtime failed, FY_ERR_RESOURCE_EXHAUSTED when device
 * memory ran out.
 */
#ifndef FERRY_KVCODEC_CUDA_H
#define FERRY_KVCODEC_CUDA_H

#include "kvcodec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Scoring                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* A kvc_scores_t whose four arrays live in device memory (same shapes as kvc_scores_init).
 * _cleanup accepts a zeroed struct. Thread: any. */
fy_status_t kvc_scores_init_cuda(kvc_scores_t *s, uint32_t n_kv_heads, uint32_t n_tokens,
                                 uint32_t head_dim);
void kvc_scores_cleanup_cuda(kvc_scores_t *s);

/* kvc_score on the GPU. in_dev's k, v, q_window and window_attn are device pointers (same
 * shapes and strides as for kvc_score); out_dev comes from kvc_scores_init_cuda. From
 * window_attn the results are bit-identical to kvc_score; from q_window they agree to fp32
 * rounding (the GPU's expf and the order of the softmax sums differ from the CPU's).
 * Asynchronous on stream; scratch comes from the stream-ordered allocator (on a device
 * without memory pools the call waits for stream to free it).
 * Thread: any (one call per out_dev at a time). */
fy_status_t kvc_score_cuda(const kvc_policy_t *policy, uint32_t n_heads, uint32_t n_kv_heads,
                           uint32_t n_tokens, uint32_t head_dim, const kvc_layer_input_t *in_dev,
                           kvc_scores_t *out_dev, void *stream);

/* kvc_score_cuda on host memory: in's k, v, q_window and window_attn (host pointers, as for
 * kvc_score) go to the device, are scored there and the scores come back into out (from
 * kvc_scores_init). The scores are exactly what a GPU encoder computes for the same layer, for
 * references that must see them. Synchronous. Thread: any. */
fy_status_t kvc_score_cuda_host(const kvc_policy_t *policy, uint32_t n_heads, uint32_t n_kv_heads,
                                uint32_t n_tokens, uint32_t head_dim, const kvc_layer_input_t *in,
                                kvc_scores_t *out);

/* ------------------------------------------------------------------------------------------ */
/* Encoder                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct kvc_encoder_cuda kvc_encoder_cuda_t;

/* Same parameters and rate controller as kvc_encoder_create; allocates the device scratch for
 * one layer of params->n_tokens tokens once. Makes the current device the encoder's device.
 * Thread: any. */
fy_status_t kvc_encoder_cuda_create(const kvc_encoder_params_t *params, kvc_encoder_cuda_t **enc_p);
/* Accepts NULL. */
void kvc_encoder_cuda_destroy(kvc_encoder_cuda_t *enc);

/* Upper bound of one layer's frame (as kvc_encoder_max_frame_bytes). */
size_t kvc_encoder_cuda_max_frame_bytes(const kvc_encoder_cuda_t *enc);

/* Queues the encode of the next layer on stream and returns without waiting for the GPU:
 * in_dev->k and in_dev->v (and q_window / window_attn when scores_dev is NULL) are device
 * pointers, read by the queued work (keep them until the stream has passed it); scores_dev
 * (borrowed, may be NULL: the encoder then runs kvc_score_cuda) holds device arrays from
 * kvc_scores_init_cuda. The frame is written to out_dev (device memory, at least
 * kvc_encoder_cuda_max_frame_bytes); its bytes equal what kvc_encoder_encode_layer writes for
 * the same K, V and scores (for finite inputs). Up to two layers may be queued; the rate
 * controller carries each layer's size to the next on the device, so the next layer can be
 * queued at once (with more than 64 kv heads or without cooperative launches the optimizer
 * runs on the host, and the call waits for the layer). FY_ERR_STATE: two layers are queued, or
 * in_dev->layer is not the next. Thread: not thread-safe (one encoder per request). */
fy_status_t kvc_encoder_enqueue_layer_cuda(kvc_encoder_cuda_t *enc, const kvc_layer_input_t *in_dev,
                                           const kvc_scores_t *scores_dev, uint8_t *out_dev,
                                           size_t out_cap, void *stream);
/* Waits for the oldest queued layer and returns its frame size and info (the frame is then
 * complete in its out_dev); the host encoder's totals count it from here. FY_ERR_STATE: none is
 * queued. Thread: as the encoder. */
fy_status_t kvc_encoder_finish_layer_cuda(kvc_encoder_cuda_t *enc, size_t *len_p,
                                          kvc_layer_info_t *info_p);

/* Allocates now the device frame buffers the _host calls below use (max_frame_bytes for each
 * of the two queued layers; otherwise allocated on first use), so that a full GPU shows at
 * the start of a request. FY_ERR_RESOURCE_EXHAUSTED: no memory for them. Thread: as the
 * encoder. */
fy_status_t kvc_encoder_cuda_reserve_host(kvc_encoder_cuda_t *enc);

/* kvc_encoder_enqueue_layer_cuda with the frame built in a device buffer of the encoder's own
 * (see kvc_encoder_cuda_reserve_host), for kvc_encoder_finish_layer_cuda_host to deliver. */
fy_status_t kvc_encoder_enqueue_layer_cuda_host(kvc_encoder_cuda_t *enc,
                                                const kvc_layer_input_t *in_dev,
                                                const kvc_scores_t *scores_dev, void *stream);
/* kvc_encoder_finish_layer_cuda for a layer queued by kvc_encoder_enqueue_layer_cuda_host: its
 * frame is copied into out (out_cap bytes, pageable or pinned) on a stream of the encoder's
 * own, so the later layers' work goes on meanwhile. FY_ERR_INVALID_ARG: the frame does not fit
 * out_cap, or the layer was queued for a device buffer (it stays queued). */
fy_status_t kvc_encoder_finish_layer_cuda_host(kvc_encoder_cuda_t *enc, uint8_t *out,
                                               size_t out_cap, size_t *len_p,
                                               kvc_layer_info_t *info_p);

/* One layer, queued and finished: kvc_encoder_enqueue_layer_cuda, then
 * kvc_encoder_finish_layer_cuda. FY_ERR_STATE while layers are queued. */
fy_status_t kvc_encoder_encode_layer_cuda(kvc_encoder_cuda_t *enc, const kvc_layer_input_t *in_dev,
                                          const kvc_scores_t *scores_dev, uint8_t *out_dev,
                                          size_t out_cap, size_t *len_p, kvc_layer_info_t *info_p,
                                          void *stream);

/* One layer into host memory (out_cap at least max_frame_bytes): the _host enqueue, then the
 * _host finish. */
fy_status_t kvc_encoder_encode_layer_cuda_host(kvc_encoder_cuda_t *enc,
                                               const kvc_layer_input_t *in_dev,
                                               const kvc_scores_t *scores_dev, uint8_t *out,
                                               size_t out_cap, size_t *len_p,
                                               kvc_layer_info_t *info_p, void *stream);

/* Stream time the last finished layer spent in its GPU phases (scoring, rotation,
 * distortion tables and the optimizer; layout, payload and CRC), in ns; the rest of its wall
 * time is the host's launches and the final synchronization. Thread: as the encoder. */
uint64_t kvc_encoder_cuda_last_gpu_ns(const kvc_encoder_cuda_t *enc);

/* Cumulative frame bytes and the request's byte budget (as kvc_encoder_totals). */
void kvc_encoder_cuda_totals(const kvc_encoder_cuda_t *enc, uint64_t *bytes_p, uint64_t *budget_p);

/* ------------------------------------------------------------------------------------------ */
/* GPU page pool, sequences and placement                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct kvc_gpu_pool kvc_gpu_pool_t;

/* One device allocation of n_pages x page_bytes (same parameters and checks as
 * kvc_pool_create) plus host bookkeeping. Page headers are written on the device by the
 * placement; a host copy of each page's header is kept for bookkeeping. Thread: any. */
fy_status_t kvc_gpu_pool_create(const kvc_pool_params_t *params, kvc_gpu_pool_t **pool_p);
/* Frees the device memory too; accepts NULL. */
void kvc_gpu_pool_destroy(kvc_gpu_pool_t *pool);

/* Device base address: page id p starts at base + p x page_bytes. Valid until destroy. */
uint8_t *kvc_gpu_pool_base(const kvc_gpu_pool_t *pool);
size_t kvc_gpu_pool_page_bytes(const kvc_gpu_pool_t *pool);
uint32_t kvc_gpu_pool_n_pages(const kvc_gpu_pool_t *pool);
uint32_t kvc_gpu_pool_head_dim(const kvc_gpu_pool_t *pool);
uint32_t kvc_gpu_pool_group(const kvc_gpu_pool_t *pool);
uint32_t kvc_gpu_pool_protect(const kvc_gpu_pool_t *pool);
/* Bytes between slot starts of an option's pages (as the CPU pool). 0 for DROP. */
size_t kvc_gpu_pool_slot_bytes(const kvc_gpu_pool_t *pool, kvc_opt_t opt);
/* Free pages now. Thread: any (the pool's lock). */
uint32_t kvc_gpu_pool_free_count(const kvc_gpu_pool_t *pool);
/* Host copy of a page's 16-byte header (docs/kvcodec-format.md §3): option, flags, counts.
 * FY_ERR_INVALID_ARG for an id out of range. Thread: not thread-safe against placement into
 * the same page. */
fy_status_t kvc_gpu_page_header(const kvc_gpu_pool_t *pool, kvc_page_id_t id,
                                uint8_t hdr[KVC_PAGE_HEADER_BYTES]);
/* Reference counting as kvc_page_ref / kvc_page_unref. Thread: any. */
void kvc_gpu_page_ref(kvc_gpu_pool_t *pool, kvc_page_id_t id);
void kvc_gpu_page_unref(kvc_gpu_pool_t *pool, kvc_page_id_t id);
uint32_t kvc_gpu_page_refcount(const kvc_gpu_pool_t *pool, kvc_page_id_t id);

/* A sequence's pages in a GPU pool: per (layer, kv head) a list of page ids, one reference per
 * page (the twin of kvc_seq_t). pool is borrowed and must outlive the sequence. Thread: any. */
typedef struct kvc_gpu_seq kvc_gpu_seq_t;
fy_status_t kvc_gpu_seq_create(kvc_gpu_pool_t *pool, uint32_t n_layers, uint32_t n_kv_heads,
                               uint64_t model_fingerprint, uint64_t seq_id, kvc_gpu_seq_t **seq_p);
/* Drops every page reference; accepts NULL. */
void kvc_gpu_seq_destroy(kvc_gpu_seq_t *seq);
/* Page list of (layer, head) (host memory), valid until the list changes. */
const kvc_page_id_t *kvc_gpu_seq_pages(const kvc_gpu_seq_t *seq, uint32_t layer, uint32_t head,
                                       uint32_t *n_pages_p);
uint32_t kvc_gpu_seq_n_tokens(const kvc_gpu_seq_t *seq, uint32_t layer, uint32_t head);
bool kvc_gpu_seq_layer_placed(const kvc_gpu_seq_t *seq, uint32_t layer);

/* Pages a frame needs in this pool (as kvc_pool_pages_needed). Thread: any. */
fy_status_t kvc_gpu_pool_pages_needed(const kvc_gpu_pool_t *pool, const kvc_frame_t *frame,
                                      uint32_t *n_pages_p);

/* Places a frame without dequantizing, as kvc_place: frame is the kvc_frame_parse result of
 * the frame's bytes on the host (header fields and maps are read from it), frame_dev the same
 * frame_bytes in device memory. The page bookkeeping is planned on the host and the copies run
 * in one kernel on stream: the pages are complete once stream reaches this point, and frame_dev
 * must stay valid until then (the call itself may wait for work already queued on stream, as
 * its small upload of the plan is from pageable memory). Same checks as kvc_place;
 * all-or-nothing: on any error the sequence and pool are unchanged. Thread: not thread-safe
 * per sequence. */
fy_status_t kvc_place_cuda(kvc_gpu_seq_t *seq, const kvc_frame_t *frame, const uint8_t *frame_dev,
                           void *stream);

/* Device staging for frames that arrive in host memory (a decode worker's receive buffers):
 * a device buffer that grows to the largest frame, and a stream of its own. Thread: any. */
typedef struct kvc_gpu_stage kvc_gpu_stage_t;
fy_status_t kvc_gpu_stage_create(kvc_gpu_stage_t **stage_p);
/* Waits for the stage's stream and frees it; accepts NULL. */
void kvc_gpu_stage_destroy(kvc_gpu_stage_t *stage);

/* kvc_place_cuda for a frame in host memory: bytes [len] are the frame kvc_frame_parse gave
 * frame for (borrowed for the call; len == frame->frame_bytes). They are uploaded into the
 * stage and placed on its stream, and the call returns once the pages are complete on the
 * device, so work on any stream may read them afterwards. Same checks, and all-or-nothing,
 * as kvc_place_cuda. Thread: one call per stage at a time; not thread-safe per sequence. */
fy_status_t kvc_gpu_stage_place(kvc_gpu_stage_t *stage, kvc_gpu_seq_t *seq,
                                const kvc_frame_t *frame, const uint8_t *bytes, size_t len);

/* Copies len bytes of device memory (a frame received GPU to GPU) into host and returns
 * once they are there, so the frame can be parsed and checked on the host before
 * kvc_gpu_stage_place_dev places it from the device copy. Thread: as kvc_gpu_stage_place. */
fy_status_t kvc_gpu_stage_fetch(kvc_gpu_stage_t *stage, uint8_t *host, const uint8_t *dev,
                                size_t len);
/* kvc_place_cuda on the stage's stream for a frame already in device memory (frame_dev,
 * frame->frame_bytes, complete and visible), returning once the pages are complete. Same
 * checks, and all-or-nothing, as kvc_place_cuda. Thread: as kvc_gpu_stage_place. */
fy_status_t kvc_gpu_stage_place_dev(kvc_gpu_stage_t *stage, kvc_gpu_seq_t *seq,
                                    const kvc_frame_t *frame, const uint8_t *frame_dev);

/* Page-locks host memory the caller owns and keeps (a decode worker's receive pool), so that
 * kvc_gpu_stage_place uploads frames from it by DMA instead of through the driver's pageable
 * staging copies. kvc_cuda_host_unregister undoes it and must come before the memory is freed
 * or unmapped; it accepts NULL. FY_ERR_NO_DEVICE without CUDA or a GPU, FY_ERR_INVALID_ARG for
 * NULL or an empty range, FY_ERR_EXISTS where part of it is already registered; any error
 * (a limit on locked memory, too) leaves the range as it was, and uploads from it still work,
 * only slower. Thread: any. */
fy_status_t kvc_cuda_host_register(void *host, size_t len);
void kvc_cuda_host_unregister(void *host);

/* Device memory for a frame that leaves the encoder for another user of the device (the NCCL
 * link): stream-ordered on a stream of the codec's own where the device has memory pools, so
 * that kvc_cuda_frame_free never waits for the device (a thread that drives an NCCL pair must
 * not). The memory is usable by any stream when alloc returns. kvc_cuda_frame_upload is alloc
 * plus a copy of host[len], complete on return. FY_ERR_NO_DEVICE without CUDA. Free accepts
 * NULL. Thread: any. */
fy_status_t kvc_cuda_frame_alloc(size_t bytes, uint8_t **dev_p);
fy_status_t kvc_cuda_frame_upload(const uint8_t *host, size_t len, uint8_t **dev_p);
void kvc_cuda_frame_free(uint8_t *dev);

/* The pool a sequence lives in, and its shape. Thread: any. */
kvc_gpu_pool_t *kvc_gpu_seq_pool(const kvc_gpu_seq_t *seq);
uint32_t kvc_gpu_seq_n_layers(const kvc_gpu_seq_t *seq);
uint32_t kvc_gpu_seq_n_kv_heads(const kvc_gpu_seq_t *seq);
/* Tokens one page holds at an option (as kvc_pool_page_tokens). Thread: any. */
uint32_t kvc_gpu_pool_page_tokens(const kvc_gpu_pool_t *pool, kvc_opt_t opt);

/* ------------------------------------------------------------------------------------------ */
/* FP16 tail appends (twin of kvc_seq_append)                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Where one decoded token of one (layer, kv head) goes: its 16/16 slot and the page's header
 * once the token is in. Planned on the host (kvc_gpu_seq_append_slot), written on the device
 * (kvc_gpu_append_cuda). 32 bytes, 8-byte aligned. */
typedef struct {
    uint64_t slot_off; // byte offset of the slot from the pool base
    uint64_t page_off; // byte offset of the page (its header is rewritten)
    uint8_t hdr[KVC_PAGE_HEADER_BYTES];
} kvc_gpu_append_t;

/* Pages one more token in each of the first n_layers x n_kv_heads lists of seq takes from the
 * pool: one per list whose last page is not an unshared 16/16 page with a free slot (the rule
 * of kvc_seq_append). Thread: not against changes of seq. */
uint32_t kvc_gpu_seq_append_pages(const kvc_gpu_seq_t *seq, uint32_t n_layers,
                                  uint32_t n_kv_heads);

/* The host half of kvc_seq_append: takes the token's slot in the FP16 tail of (layer, head)
 * (the last page of the list when it is an unshared 16/16 page with room, else a new page) and
 * updates the bookkeeping (list, token count, the host copy of the header) as if the token
 * were in. *slot_p says where kvc_gpu_append_cuda must write it; until that has run on the
 * device, the pages of (layer, head) must not be read there. FY_ERR_RESOURCE_EXHAUSTED (nothing
 * changed) when a new page is needed and the pool has none. Thread: as kvc_place_cuda. */
fy_status_t kvc_gpu_seq_append_slot(kvc_gpu_seq_t *seq, uint32_t layer, uint32_t head,
                                    kvc_gpu_append_t *slot_p);

/* The device half, twin of kvc_seq_append's copy: for row r < n_rows and kv head h <
 * n_kv_heads, entry slots_dev[r * n_kv_heads + h] receives K (FP16, original space)
 * k[r * k_row_stride + h * head_dim ..] and V (the same with v) and its page's new header; the
 * page bytes then equal what kvc_seq_append writes into a CPU pool. No two entries of one call
 * may name the same page. slots_dev, k, v: device memory, borrowed until stream reaches this
 * work. Asynchronous on stream. Thread: any. */
fy_status_t kvc_gpu_append_cuda(kvc_gpu_pool_t *pool, const kvc_gpu_append_t *slots_dev,
                                uint32_t n_rows, uint32_t n_kv_heads, const uint16_t *k,
                                size_t k_row_stride, const uint16_t *v, size_t v_row_stride,
                                void *stream);

/* ------------------------------------------------------------------------------------------ */
/* Attention over compressed pages (kvcodec/attend.cu, twin of kvc_attend)                     */
/* ------------------------------------------------------------------------------------------ */

/* A GPU page pool as attention reads it: a plain view (kvc_gpu_pool_view fills it from a
 * kvc_gpu_pool_t; a test may fill it for a copy of a CPU pool's bytes). The geometry must equal
 * the pool's params. */
typedef struct {
    const uint8_t *base; // device: [n_pages][page_bytes], 16-byte aligned (cudaMalloc is)
    size_t page_bytes;   // multiple of 64, as the CPU pool
    uint32_t n_pages;
    uint32_t head_dim; // multiple of 8, <= 512
    uint32_t group;    // G of the pool
    uint32_t protect;  // P of the pool (MixKVQ protected key channels)
} kvc_gpu_pages_t;

/* The attention view of a GPU pool (borrowed; valid until the pool is destroyed).
 * Thread: any. */
void kvc_gpu_pool_view(const kvc_gpu_pool_t *pool, kvc_gpu_pages_t *view_p);

/* One decode step's worth of page lists: for sequence b and kv head h, list i = b * n_kv_heads + h
 * is page_ids[list_start[i] .. list_start[i + 1]). Query rows of list i are the GQA group
 * q[b][h * g .. h * g + g - 1] with g = n_heads / n_kv_heads (as kvc_attend_layer maps them). */
typedef struct {
    uint32_t batch;                // sequences, >= 1
    uint32_t n_heads;              // query heads per sequence
    uint32_t n_kv_heads;           // page lists per sequence; n_heads / n_kv_heads must be 1..8
    const uint32_t *list_start;    // device: [batch * n_kv_heads + 1], non-decreasing
    const kvc_page_id_t *page_ids; // device: [list_start[batch * n_kv_heads]]
    uint32_t max_list_pages;       // the longest list (sizes the split of each list over thread
                                   // blocks; longer lists are still attended in full, more slowly)
    uint32_t impl;                 // KVC_ATTEND_IMPL_*: 0 (AUTO) unless a test or benchmark asks
} kvc_attend_batch_t;

/* Kernels of kvc_attend_batch_cuda. AUTO: the environment variable FERRY_ATTEND_IMPL ("simt",
 * "mma", "mma-qtab" or "mma-wide") when set, else MMA. MMA (tensor cores: the query split into FP16
 * hi + lo, FP32 accumulation) takes head_dim 64 and 128 with GQA groups up to 4 rows; quantized
 * keys are dequantized to FP16 in registers (code * scale + zero, rounded once, as an FP16 cache
 * would hold them), except for pages with MixKVQ protected channels. MMA_QTAB keeps the keys as
 * exact integer codes and scales the query per group instead (a shared-memory table per group:
 * closer to kvc_attend, slower). MMA_WIDE is MMA with the softmax in base 2 (the query scaled by
 * log2 e) and, for keys of at most 4 bits, 32 tokens a warp step instead of 16 (one softmax step
 * and one gather of a group's key scales per 32 tokens, four independent MMA chains); it has not
 * been timed against MMA yet, so it is not the default. Other shapes, and MMA or its variants asked
 * of them, run SIMT (FP32 dequantization in registers), which takes every shape. */
enum {
    KVC_ATTEND_IMPL_AUTO = 0,
    KVC_ATTEND_IMPL_SIMT = 1,
    KVC_ATTEND_IMPL_MMA = 2,
    KVC_ATTEND_IMPL_MMA_QTAB = 3,
    KVC_ATTEND_IMPL_MMA_WIDE = 4,
};

/* The kernel (KVC_ATTEND_IMPL_SIMT, _MMA, _MMA_QTAB or _MMA_WIDE) kvc_attend_batch_cuda runs for
 * this pool and batch. Thread: any. */
fy_status_t kvc_attend_batch_cuda_impl(const kvc_gpu_pages_t *pool, const kvc_attend_batch_t *batch,
                                       uint32_t *impl_p);

/* Bytes of device workspace kvc_attend_batch_cuda needs for this pool and batch shape.
 * Thread: any. */
fy_status_t kvc_attend_batch_cuda_workspace(const kvc_gpu_pages_t *pool,
                                            const kvc_attend_batch_t *batch, size_t *bytes_p);

/* Decode attention of a batch over compressed pages, flash-decoding style: every list is split
 * over several thread blocks, each dequantizing its pages in registers by the option in each
 * page's header (read on the device) and keeping a partial online softmax; a second kernel
 * combines the partials. Same result as kvc_attend per list (rotated pages: H q for the logits,
 * the rotated part of the accumulator rotated back once). An empty list gives zeros.
 * q: device [batch][n_heads][head_dim] fp32; out: device, same shape. workspace: device,
 * 256-byte aligned (cudaMalloc is), workspace_bytes >= kvc_attend_batch_cuda_workspace(). All
 * pointers borrowed until the stream reaches the end of the work queued here. Pages whose id or
 * header is invalid are skipped and counted (kvc_attend_batch_cuda_bad_pages). Thread: any; one
 * call per workspace at a time. */
fy_status_t kvc_attend_batch_cuda(const kvc_gpu_pages_t *pool, const kvc_attend_batch_t *batch,
                                  const float *q, float scale, float *out, void *workspace,
                                  size_t workspace_bytes, void *stream);

/* Waits for the stream and reports how many pages the last kvc_attend_batch_cuda on this
 * workspace skipped because the page id was out of range or the header did not match the pool
 * (0 for pages built by kvc_place / copied from the CPU pool). Thread: as above. */
fy_status_t kvc_attend_batch_cuda_bad_pages(const void *workspace, void *stream, uint32_t *n_bad_p);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_KVCODEC_CUDA_H */
