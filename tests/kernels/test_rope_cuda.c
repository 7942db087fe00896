// CUDA parity of RoPE against krn_rope_f32: both modes, partial rotation (n_rot < head_dim),
// freq_factors, linear freq_scale, positions up to 100k, padded token stride. The angles are
// computed in double on both sides, so only float rounding of the rotation differs:
// |diff| <= 2e-6 + 2e-6 |ref| (inputs in [-1, 1]).
#include "test_util_cuda.h"

static int run(uint64_t *rng, krn_rope_mode_t mode, int n_tokens, int n_heads, int head_dim,
               int n_rot, float freq_scale, bool factors, int pad)
{
    int ld = n_heads * head_dim + pad;
    size_t n = (size_t)n_tokens * ld;
    float *x = tcu_rand_f32(rng, n, -1, 1), *ref = malloc(n * 4), *got = malloc(n * 4);
    int32_t *pos = malloc((size_t)n_tokens * 4);
    for (int t = 0; t < n_tokens; t++)
        pos[t] = t < 3 ? t : (int32_t)(tcu_next(rng) % 100000);
    float *ff = tcu_rand_f32(rng, (size_t)n_rot / 2, 1, 8);
    krn_rope_t rope = {.mode = mode, .n_rot = n_rot, .theta = 500000.0f,
                       .freq_scale = freq_scale, .freq_factors = factors ? ff : NULL};
    memcpy(ref, x, n * 4);
    krn_rope_f32(ref, ld, n_tokens, n_heads, head_dim, pos, &rope);
    float *dx = tcu_dev(x, n * 4), *dff = tcu_dev(ff, (size_t)n_rot / 2 * 4);
    int32_t *dpos = tcu_dev(pos, (size_t)n_tokens * 4);
    rope.freq_factors = factors ? dff : NULL;
    TCU_OK(krn_rope_f32_cuda(dx, ld, n_tokens, n_heads, head_dim, dpos, &rope, 0));
    tcu_get(got, dx, n * 4);
    char what[128];
    snprintf(what, sizeof(what), "rope %s tokens=%d heads=%d hd=%d rot=%d scale=%g ff=%d",
             mode == KRN_ROPE_NEOX ? "neox" : "norm", n_tokens, n_heads, head_dim, n_rot,
             (double)freq_scale, factors);
    // The padding columns must be untouched too: compare the whole row.
    int bad = tcu_compare(what, got, ref, n_tokens, ld, ld, 2e-6f, 2e-6f);
    cudaFree(dx), cudaFree(dff), cudaFree(dpos);
    free(x), free(ref), free(got), free(pos), free(ff);
    return bad;
}

int main(void)
{
    tcu_require_gpu();
    uint64_t rng = tcu_seed();
    int bad = 0;
    for (int mode = 0; mode < 2; mode++) {
        krn_rope_mode_t md = mode ? KRN_ROPE_NEOX : KRN_ROPE_NORM;
        bad += run(&rng, md, 1, 1, 2, 2, 1.0f, false, 0);
        bad += run(&rng, md, 37, 9, 64, 64, 1.0f, false, 3);
        bad += run(&rng, md, 130, 5, 128, 96, 0.25f, true, 0);
        bad += run(&rng, md, 17, 40, 80, 80, 1.0f, true, 1);
        bad += run(&rng, md, 3, 2, 256, 32, 0.5f, false, 0);
    }
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
