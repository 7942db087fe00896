/*
 * embed.cu: token embedding lookup on the GPU: rows of the FP16 table widened to FP32 (the
 * CPU model copies rows of its FP32 table, which is the same values). One block per token.
 */
#include "cuda_int.h"

__global__ void embed_kernel(float *x, int ldx, const uint16_t *table, int n_vocab, int dim,
                             const int32_t *tokens, int n)
{
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        int32_t id = tokens[i];
        float *xr = x + (size_t)i * ldx;
        bool ok = id >= 0 && id < n_vocab;
        const uint16_t *row = table + (size_t)(ok ? id : 0) * dim;
        for (int d = threadIdx.x; d < dim; d += blockDim.x)
            xr[d] = ok ? krn_h2f(row[d]) : 0.0f;
    }
}

extern "C" fy_status_t krn_embed_f16_cuda(float *x, int ldx, const uint16_t *table, int n_vocab,
                                          int dim, const int32_t *tokens, int n,
                                          cudaStream_t stream)
{
    if (n < 0 || dim <= 0 || ldx < dim || n_vocab <= 0)
        return FY_ERR_INVALID_ARG;
    if (n == 0)
        return FY_OK;
    unsigned grid = n > 65535 ? 65535u : (unsigned)n;
    embed_kernel<<<grid, 256, 0, stream>>>(x, ldx, table, n_vocab, dim, tokens, n);
    return krn_launch_status();
}
