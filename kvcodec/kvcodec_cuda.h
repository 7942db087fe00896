/*
 * kvcodec_cuda.h: the CUDA twins of kvcodec's hot paths (DESIGN.md §3, §5). Each function
 * mirrors its CPU reference in kvcodec.h, which stays the source of truth and is what the
 * parity tests in tests/kvcodec/test_*_cuda.c compare against.
 *
 * GPU page pool contract: a GPU page pool is ONE device allocation of n_pages x page_bytes;
 * page id p lives at base + p x page_bytes and holds exactly the bytes of the CPU pool's page p
 * (docs/kvcodec-format.md §3). Page bookkeeping (free list, refcounts, per-sequence page lists)
 * stays on the host.
 *
 * Pointers documented as "device" must be device memory (cudaMalloc); `stream` is a
 * cudaStream_t passed as void * (NULL = the legacy default stream), so C code needs no CUDA
 * header. These functions exist only in CUDA builds (FY_HAVE_CUDA); callers guard on it.
 */
#ifndef FERRY_KVCODEC_CUDA_H
#define FERRY_KVCODEC_CUDA_H

#include "kvcodec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Attention over compressed pages (kvcodec/attend.cu, twin of kvc_attend)                     */
/* ------------------------------------------------------------------------------------------ */

/* A GPU page pool as attention reads it. The geometry must equal the CPU pool's params. */
typedef struct {
    const uint8_t *base; // device: [n_pages][page_bytes], 16-byte aligned (cudaMalloc is)
    size_t page_bytes;   // multiple of 64, as the CPU pool
    uint32_t n_pages;
    uint32_t head_dim; // multiple of 8, <= 512
    uint32_t group;    // G of the pool
    uint32_t protect;  // P of the pool (MixKVQ protected key channels)
} kvc_gpu_pages_t;

/* One decode step's worth of page lists: for sequence b and kv head h, list i = b * n_kv_heads + h
 * is page_ids[list_start[i] .. list_start[i + 1]). Query rows of list i are the GQA group
 * q[b][h * g .. h * g + g - 1] with g = n_heads / n_kv_heads (as kvc_attend_layer maps them). */
typedef struct {
    uint32_t batch;      // sequences, >= 1
    uint32_t n_heads;    // query heads per sequence
    uint32_t n_kv_heads; // page lists per sequence; n_heads / n_kv_heads must be 1..8
    const uint32_t *list_start;    // device: [batch * n_kv_heads + 1], non-decreasing
    const kvc_page_id_t *page_ids; // device: [list_start[batch * n_kv_heads]]
    uint32_t max_list_pages; // the longest list (sizes the split of each list over thread
                             // blocks; longer lists are still attended in full, more slowly)
} kvc_attend_batch_t;

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
 * workspace_bytes >= kvc_attend_batch_cuda_workspace(). All pointers borrowed until the stream
 * reaches the end of the work queued here. Pages whose id or header is invalid are skipped and
 * counted (kvc_attend_batch_cuda_bad_pages). Thread: any; one call per workspace at a time. */
fy_status_t kvc_attend_batch_cuda(const kvc_gpu_pages_t *pool, const kvc_attend_batch_t *batch,
                                  const float *q, float scale, float *out, void *workspace,
                                  size_t workspace_bytes, void *stream);

/* Waits for the stream and reports how many pages the last kvc_attend_batch_cuda on this
 * workspace skipped because the page id was out of range or the header did not match the pool
 * (0 for pages built by kvc_place / copied from the CPU pool). Thread: as above. */
fy_status_t kvc_attend_batch_cuda_bad_pages(const void *workspace, void *stream,
                                            uint32_t *n_bad_p);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_KVCODEC_CUDA_H */
