/*
 * kvcodec_nocuda.c: kvcodec_cuda.h in a build without CUDA. Nothing can be created, so every
 * call that would make or use a GPU object answers FY_ERR_NO_DEVICE, and the accessors (which
 * only ever see NULL here) answer 0 / NULL. The CPU codec is unaffected. Programs link the
 * same symbols either way and choose the device at run time.
 */
#include <string.h>

#include "kvcodec_cuda.h"

fy_status_t kvc_scores_init_cuda(kvc_scores_t *s, uint32_t n_kv_heads, uint32_t n_tokens,
                                 uint32_t head_dim)
{
    return FY_ERR_NO_DEVICE;
}
void kvc_scores_cleanup_cuda(kvc_scores_t *s)
{
}
fy_status_t kvc_score_cuda(const kvc_policy_t *policy, uint32_t n_heads, uint32_t n_kv_heads,
                           uint32_t n_tokens, uint32_t head_dim, const kvc_layer_input_t *in_dev,
                           kvc_scores_t *out_dev, void *stream)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_score_cuda_host(const kvc_policy_t *policy, uint32_t n_heads, uint32_t n_kv_heads,
                                uint32_t n_tokens, uint32_t head_dim, const kvc_layer_input_t *in,
                                kvc_scores_t *out)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t kvc_encoder_cuda_create(const kvc_encoder_params_t *params,
                                    kvc_encoder_cuda_t **enc_p)
{
    return FY_ERR_NO_DEVICE;
}
void kvc_encoder_cuda_destroy(kvc_encoder_cuda_t *enc)
{
}
size_t kvc_encoder_cuda_max_frame_bytes(const kvc_encoder_cuda_t *enc)
{
    return 0;
}
fy_status_t kvc_encoder_encode_layer_cuda(kvc_encoder_cuda_t *enc, const kvc_layer_input_t *in_dev,
                                          const kvc_scores_t *scores_dev, uint8_t *out_dev,
                                          size_t out_cap, size_t *len_p,
                                          kvc_layer_info_t *info_p, void *stream)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_encoder_encode_layer_cuda_host(kvc_encoder_cuda_t *enc,
                                               const kvc_layer_input_t *in_dev,
                                               const kvc_scores_t *scores_dev, uint8_t *out,
                                               size_t out_cap, size_t *len_p,
                                               kvc_layer_info_t *info_p, void *stream)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_encoder_enqueue_layer_cuda(kvc_encoder_cuda_t *enc, const kvc_layer_input_t *in_dev,
                                           const kvc_scores_t *scores_dev, uint8_t *out_dev,
                                           size_t out_cap, void *stream)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_encoder_finish_layer_cuda(kvc_encoder_cuda_t *enc, size_t *len_p,
                                          kvc_layer_info_t *info_p)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_encoder_cuda_reserve_host(kvc_encoder_cuda_t *enc)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_encoder_enqueue_layer_cuda_host(kvc_encoder_cuda_t *enc,
                                                const kvc_layer_input_t *in_dev,
                                                const kvc_scores_t *scores_dev, void *stream)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_encoder_finish_layer_cuda_host(kvc_encoder_cuda_t *enc, uint8_t *out,
                                               size_t out_cap, size_t *len_p,
                                               kvc_layer_info_t *info_p)
{
    return FY_ERR_NO_DEVICE;
}
uint64_t kvc_encoder_cuda_last_gpu_ns(const kvc_encoder_cuda_t *enc)
{
    return 0;
}
void kvc_encoder_cuda_totals(const kvc_encoder_cuda_t *enc, uint64_t *bytes_p,
                             uint64_t *budget_p)
{
    if (bytes_p != NULL)
        *bytes_p = 0;
    if (budget_p != NULL)
        *budget_p = 0;
}

fy_status_t kvc_gpu_pool_create(const kvc_pool_params_t *params, kvc_gpu_pool_t **pool_p)
{
    return FY_ERR_NO_DEVICE;
}
void kvc_gpu_pool_destroy(kvc_gpu_pool_t *pool)
{
}
uint8_t *kvc_gpu_pool_base(const kvc_gpu_pool_t *pool)
{
    return NULL;
}
size_t kvc_gpu_pool_page_bytes(const kvc_gpu_pool_t *pool)
{
    return 0;
}
uint32_t kvc_gpu_pool_n_pages(const kvc_gpu_pool_t *pool)
{
    return 0;
}
uint32_t kvc_gpu_pool_head_dim(const kvc_gpu_pool_t *pool)
{
    return 0;
}
uint32_t kvc_gpu_pool_group(const kvc_gpu_pool_t *pool)
{
    return 0;
}
uint32_t kvc_gpu_pool_protect(const kvc_gpu_pool_t *pool)
{
    return 0;
}
size_t kvc_gpu_pool_slot_bytes(const kvc_gpu_pool_t *pool, kvc_opt_t opt)
{
    return 0;
}
uint32_t kvc_gpu_pool_free_count(const kvc_gpu_pool_t *pool)
{
    return 0;
}
uint32_t kvc_gpu_pool_page_tokens(const kvc_gpu_pool_t *pool, kvc_opt_t opt)
{
    return 0;
}
fy_status_t kvc_gpu_page_header(const kvc_gpu_pool_t *pool, kvc_page_id_t id,
                                uint8_t hdr[KVC_PAGE_HEADER_BYTES])
{
    return FY_ERR_NO_DEVICE;
}
void kvc_gpu_page_ref(kvc_gpu_pool_t *pool, kvc_page_id_t id)
{
}
void kvc_gpu_page_unref(kvc_gpu_pool_t *pool, kvc_page_id_t id)
{
}
uint32_t kvc_gpu_page_refcount(const kvc_gpu_pool_t *pool, kvc_page_id_t id)
{
    return 0;
}

fy_status_t kvc_gpu_seq_create(kvc_gpu_pool_t *pool, uint32_t n_layers, uint32_t n_kv_heads,
                               uint64_t model_fingerprint, uint64_t seq_id,
                               kvc_gpu_seq_t **seq_p)
{
    return FY_ERR_NO_DEVICE;
}
void kvc_gpu_seq_destroy(kvc_gpu_seq_t *seq)
{
}
const kvc_page_id_t *kvc_gpu_seq_pages(const kvc_gpu_seq_t *seq, uint32_t layer, uint32_t head,
                                       uint32_t *n_pages_p)
{
    if (n_pages_p != NULL)
        *n_pages_p = 0;
    return NULL;
}
uint32_t kvc_gpu_seq_n_tokens(const kvc_gpu_seq_t *seq, uint32_t layer, uint32_t head)
{
    return 0;
}
bool kvc_gpu_seq_layer_placed(const kvc_gpu_seq_t *seq, uint32_t layer)
{
    return false;
}
fy_status_t kvc_gpu_stage_create(kvc_gpu_stage_t **stage_p)
{
    return FY_ERR_NO_DEVICE;
}
void kvc_gpu_stage_destroy(kvc_gpu_stage_t *stage)
{
}
fy_status_t kvc_gpu_stage_place(kvc_gpu_stage_t *stage, kvc_gpu_seq_t *seq,
                                const kvc_frame_t *frame, const uint8_t *bytes, size_t len)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_gpu_stage_fetch(kvc_gpu_stage_t *stage, uint8_t *host, const uint8_t *dev,
                                size_t len)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_gpu_stage_place_dev(kvc_gpu_stage_t *stage, kvc_gpu_seq_t *seq,
                                    const kvc_frame_t *frame, const uint8_t *frame_dev)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_cuda_host_register(void *host, size_t len)
{
    return FY_ERR_NO_DEVICE;
}
void kvc_cuda_host_unregister(void *host) {}
fy_status_t kvc_cuda_frame_alloc(size_t bytes, uint8_t **dev_p)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_cuda_frame_upload(const uint8_t *host, size_t len, uint8_t **dev_p)
{
    return FY_ERR_NO_DEVICE;
}
void kvc_cuda_frame_free(uint8_t *dev)
{
}
kvc_gpu_pool_t *kvc_gpu_seq_pool(const kvc_gpu_seq_t *seq)
{
    return NULL;
}
uint32_t kvc_gpu_seq_n_layers(const kvc_gpu_seq_t *seq)
{
    return 0;
}
uint32_t kvc_gpu_seq_n_kv_heads(const kvc_gpu_seq_t *seq)
{
    return 0;
}
fy_status_t kvc_gpu_pool_pages_needed(const kvc_gpu_pool_t *pool, const kvc_frame_t *frame,
                                      uint32_t *n_pages_p)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_place_cuda(kvc_gpu_seq_t *seq, const kvc_frame_t *frame, const uint8_t *frame_dev,
                           void *stream)
{
    return FY_ERR_NO_DEVICE;
}

uint32_t kvc_gpu_seq_append_pages(const kvc_gpu_seq_t *seq, uint32_t n_layers,
                                  uint32_t n_kv_heads)
{
    return 0;
}
fy_status_t kvc_gpu_seq_append_slot(kvc_gpu_seq_t *seq, uint32_t layer, uint32_t head,
                                    kvc_gpu_append_t *slot_p)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_gpu_append_cuda(kvc_gpu_pool_t *pool, const kvc_gpu_append_t *slots_dev,
                                uint32_t n_rows, uint32_t n_kv_heads, const uint16_t *k,
                                size_t k_row_stride, const uint16_t *v, size_t v_row_stride,
                                void *stream)
{
    return FY_ERR_NO_DEVICE;
}

void kvc_gpu_pool_view(const kvc_gpu_pool_t *pool, kvc_gpu_pages_t *view_p)
{
    memset(view_p, 0, sizeof(*view_p));
}
fy_status_t kvc_attend_batch_cuda_impl(const kvc_gpu_pages_t *pool,
                                       const kvc_attend_batch_t *batch, uint32_t *impl_p)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_attend_batch_cuda_workspace(const kvc_gpu_pages_t *pool,
                                            const kvc_attend_batch_t *batch, size_t *bytes_p)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_attend_batch_cuda(const kvc_gpu_pages_t *pool, const kvc_attend_batch_t *batch,
                                  const float *q, float scale, float *out, void *workspace,
                                  size_t workspace_bytes, void *stream)
{
    return FY_ERR_NO_DEVICE;
}
fy_status_t kvc_attend_batch_cuda_bad_pages(const void *workspace, void *stream,
                                            uint32_t *n_bad_p)
{
    return FY_ERR_NO_DEVICE;
}
