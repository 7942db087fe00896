/*
 * llama_nocuda.c: the CUDA entry points of the model in a build without CUDA. Asking for
 * MDL_DEVICE_CUDA gets FY_ERR_NO_DEVICE; the CPU path is unaffected.
 */
#include "model_int.h"

fy_status_t mdl_dev_alloc(size_t bytes, void **ptr_p)
{
    return FY_ERR_NO_DEVICE;
}

void mdl_dev_free(void *ptr)
{
}

fy_status_t mdl_dev_copy_d2h(void *dst, const void *src, size_t bytes)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t mdl_dev_store_layer(const mdl_kv_params_t *p, uint16_t *mem, const int32_t *ids,
                                int n_ids, int64_t pos0, int64_t n_tokens, const float *k,
                                const float *v)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t mdl_cuda_model_load(const mdl_gguf_t *g, const mdl_config_t *cfg,
                                mdl_cuda_model_t **w_p, char *err, size_t err_len)
{
    if (err != NULL && err_len > 0)
        snprintf(err, err_len, "model: built without CUDA");
    return FY_ERR_NO_DEVICE;
}

void mdl_cuda_model_destroy(mdl_cuda_model_t *w)
{
}

fy_status_t mdl_cuda_ctx_create(const mdl_cuda_model_t *w, const mdl_ctx_params_t *p,
                                mdl_cuda_ctx_t **ctx_p)
{
    return FY_ERR_NO_DEVICE;
}

void mdl_cuda_ctx_destroy(mdl_cuda_ctx_t *ctx)
{
}

fy_status_t mdl_cuda_prefill(mdl_cuda_ctx_t *ctx, const int32_t *tokens, int n, int w,
                             const mdl_prefill_params_t *params, float *logits)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t mdl_cuda_decode(mdl_cuda_ctx_t *ctx, mdl_kv_seq_t *const *seqs,
                            const int32_t *tokens, int n, float *logits)
{
    return FY_ERR_NO_DEVICE;
}

fy_status_t mdl_cuda_decode_kvc(mdl_cuda_ctx_t *ctx, kvc_gpu_pool_t *pool,
                                kvc_gpu_seq_t *const *seqs, const int32_t *pos,
                                const int32_t *tokens, int n, float *logits)
{
    return FY_ERR_NO_DEVICE;
}
