// CUDA parity of prefill attention against krn_attention_causal_f32 (one call per query head
// on the CPU), and of the observation-window scores against a double-precision reference of
// their definition (per head, the mean over the last W queries of their softmax rows).
// Shapes: GQA groups 1..8, head_dim 24..256, q_begin > 0, windows 1..n_q, padded strides.
// Tolerance: output |diff| <= 2e-5 + 1e-4 |ref|; window scores |diff| <= 1e-6 + 1e-4 |ref|.
// These run the FP32 kernel (FERRY_PREFILL_ATTN=simt). Then the tensor-core kernel, the default
// for head_dim 64 and 128 without a window, whose FP16 operands give
// |diff| <= 5e-3 + 5e-3 |ref| (about 5e-4 expected: values in [-1, 1]).
#include <stdlib.h>
#include <string.h>

#include "test_util_cuda.h"

typedef struct {
    int n_ctx, q_begin, n_q, n_heads, n_kv, hd, window, pad;
} shape_t;

static int run(uint64_t *rng, shape_t s, float atol, float rtol)
{
    int q_stride = s.n_heads * s.hd + s.pad, out_stride = s.n_heads * s.hd + 2 * s.pad;
    int group = s.n_heads / s.n_kv, n_keys = s.q_begin + s.n_q;
    float scale = 1.0f / sqrtf((float)s.hd);
    size_t nq = (size_t)s.n_q * q_stride, nkv = (size_t)s.n_kv * s.n_ctx * s.hd;
    size_t no = (size_t)s.n_q * out_stride;
    float *q = tcu_rand_f32(rng, nq, -2, 2), *k = tcu_rand_f32(rng, nkv, -2, 2);
    float *v = tcu_rand_f32(rng, nkv, -1, 1);
    float *ref = malloc(no * 4), *got = malloc(no * 4), *scratch = malloc((size_t)s.n_ctx * 4);
    for (size_t i = 0; i < no; i++)
        ref[i] = NAN;
    for (int h = 0; h < s.n_heads; h++) {
        const float *kh = k + (size_t)(h / group) * s.n_ctx * s.hd;
        const float *vh = v + (size_t)(h / group) * s.n_ctx * s.hd;
        krn_attention_causal_f32(ref + (size_t)h * s.hd, out_stride, q + (size_t)h * s.hd,
                                 q_stride, kh, vh, s.q_begin, s.n_q, s.hd, scale, scratch);
    }
    // Window reference in double.
    size_t nw = (size_t)s.n_heads * n_keys;
    float *wref = calloc(nw + 1, 4), *wgot = malloc(nw * 4 + 4);
    double *row = malloc((size_t)n_keys * sizeof(double));
    for (int h = 0; h < s.n_heads && s.window > 0; h++) {
        const float *kh = k + (size_t)(h / group) * s.n_ctx * s.hd;
        for (int w = 0; w < s.window; w++) {
            int i = s.n_q - s.window + w, pos = s.q_begin + i;
            const float *qi = q + (size_t)i * q_stride + (size_t)h * s.hd;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j <= pos; j++) {
                double d = 0;
                for (int c = 0; c < s.hd; c++)
                    d += (double)qi[c] * kh[(size_t)j * s.hd + c];
                row[j] = d * scale;
                mx = row[j] > mx ? row[j] : mx;
            }
            for (int j = 0; j <= pos; j++)
                sum += exp(row[j] - mx);
            for (int j = 0; j <= pos; j++)
                wref[(size_t)h * n_keys + j] += (float)(exp(row[j] - mx) / sum / s.window);
        }
    }
    float *dq = tcu_dev(q, nq * 4), *dk = tcu_dev(k, nkv * 4), *dv = tcu_dev(v, nkv * 4);
    float *dout = tcu_dev(NULL, no * 4), *dwin = tcu_dev(NULL, nw * 4 + 4);
    size_t ns = krn_attention_cuda_scratch(s.n_heads, s.window);
    float *dscr = tcu_dev(NULL, ns * 4 + 4);
    TCU_OK(krn_attention_causal_cuda(dout, out_stride, dq, q_stride, dk, dv, s.n_ctx, s.q_begin,
                                     s.n_q, s.n_heads, s.n_kv, s.hd, scale, s.window, dwin, dscr,
                                     0));
    tcu_get(got, dout, no * 4);
    tcu_get(wgot, dwin, nw * 4);
    char what[160];
    snprintf(what, sizeof(what), "attention ctx=%d begin=%d n_q=%d heads=%d/%d hd=%d",
             s.n_ctx, s.q_begin, s.n_q, s.n_heads, s.n_kv, s.hd);
    int bad = tcu_compare(what, got, ref, s.n_q, s.n_heads * s.hd, out_stride, atol, rtol);
    for (int i = 0; i < s.n_q; i++) { // output padding keeps its poison
        for (int c = s.n_heads * s.hd; c < out_stride; c++)
            bad += !isnan(got[(size_t)i * out_stride + c]);
    }
    if (s.window > 0) {
        snprintf(what, sizeof(what), "  window W=%d", s.window);
        bad += tcu_compare(what, wgot, wref, s.n_heads, n_keys, n_keys, 1e-6f, 1e-4f);
    }
    cudaFree(dq), cudaFree(dk), cudaFree(dv), cudaFree(dout), cudaFree(dwin), cudaFree(dscr);
    free(q), free(k), free(v), free(ref), free(got), free(scratch), free(wref), free(wgot);
    free(row);
    return bad;
}

int main(void)
{
    tcu_require_gpu();
    uint64_t rng = tcu_seed();
    static const shape_t shapes[] = {
        {1, 0, 1, 2, 1, 32, 1, 0},      {37, 0, 37, 4, 2, 64, 5, 3},
        {100, 60, 40, 6, 2, 80, 40, 0}, {300, 0, 300, 8, 1, 128, 32, 1},
        {50, 0, 50, 3, 3, 256, 50, 0},  {77, 10, 67, 32, 8, 24, 0, 2},
        {530, 0, 530, 9, 3, 64, 64, 0}, {45, 5, 33, 15, 5, 96, 16, 0},
        {300, 0, 300, 8, 1, 128, 0, 1},
    };
    int bad = 0;
    setenv("FERRY_PREFILL_ATTN", "simt", 1);
    printf("FERRY_PREFILL_ATTN=simt\n");
    if (strcmp(krn_attention_cuda_kernel(128, 0), "simt") != 0)
        bad++;
    for (size_t i = 0; i < FY_ARRAY_SIZE(shapes); i++)
        bad += run(&rng, shapes[i], 2e-5f, 1e-4f);
    // The tensor-core kernel: partial query and key tiles, q_begin > 0, GQA, padded strides.
    static const shape_t mma_shapes[] = {
        {1, 0, 1, 2, 1, 64, 0, 0},      {37, 0, 37, 4, 2, 64, 0, 3},
        {100, 60, 40, 6, 2, 128, 0, 0}, {300, 0, 300, 8, 1, 128, 0, 1},
        {530, 0, 530, 9, 3, 64, 0, 0},  {700, 13, 650, 32, 8, 128, 0, 0},
    };
    unsetenv("FERRY_PREFILL_ATTN");
    printf("tensor-core kernel\n");
    if (strcmp(krn_attention_cuda_kernel(128, 0), "mma") != 0 ||
        strcmp(krn_attention_cuda_kernel(64, 0), "mma") != 0 ||
        strcmp(krn_attention_cuda_kernel(128, 8), "simt") != 0 ||
        strcmp(krn_attention_cuda_kernel(96, 0), "simt") != 0)
        bad++;
    for (size_t i = 0; i < FY_ARRAY_SIZE(mma_shapes); i++)
        bad += run(&rng, mma_shapes[i], 5e-3f, 5e-3f);
    // A window larger than the queries is refused.
    if (krn_attention_causal_cuda(NULL, 64, NULL, 64, NULL, NULL, 4, 0, 4, 1, 1, 64, 1.0f, 5,
                                  NULL, NULL, 0) != FY_ERR_INVALID_ARG)
        bad++;
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
