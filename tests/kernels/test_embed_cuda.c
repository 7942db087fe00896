// CUDA parity of the embedding lookup: rows of an FP16 table widened to FP32 must equal the
// CPU conversion exactly (tolerance 0); an id out of range gives a zero row; the row padding
// keeps its poison.
#include "test_util_cuda.h"

static int run(uint64_t *rng, int n_vocab, int dim, int n, int pad)
{
    size_t nt = (size_t)n_vocab * dim;
    uint16_t *table = malloc(nt * 2);
    for (size_t i = 0; i < nt; i++)
        table[i] = fy_fp32_to_fp16(tcu_uniform(rng, -4, 4));
    int32_t *tok = malloc((size_t)n * 4);
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)(tcu_next(rng) % (uint64_t)n_vocab);
    tok[0] = n_vocab - 1;
    if (n > 2) {
        tok[1] = -1;      // invalid: zero row
        tok[2] = n_vocab; // invalid: zero row
    }
    int ld = dim + pad;
    uint16_t *dt = tcu_dev(table, nt * 2);
    int32_t *dtok = tcu_dev(tok, (size_t)n * 4);
    float *dx = tcu_dev(NULL, (size_t)n * ld * 4), *got = malloc((size_t)n * ld * 4);
    TCU_OK(krn_embed_f16_cuda(dx, ld, dt, n_vocab, dim, dtok, n, 0));
    tcu_get(got, dx, (size_t)n * ld * 4);
    int bad = 0;
    for (int i = 0; i < n; i++) {
        bool ok = tok[i] >= 0 && tok[i] < n_vocab;
        for (int d = 0; d < ld; d++) {
            float g = got[(size_t)i * ld + d];
            if (d >= dim) {
                bad += !isnan(g); // padding untouched
                continue;
            }
            float ref = ok ? fy_fp16_to_fp32(table[(size_t)tok[i] * dim + d]) : 0.0f;
            bad += memcmp(&g, &ref, 4) != 0;
        }
    }
    printf("%s embed vocab=%d dim=%d n=%d: %d bad\n", bad ? "FAIL" : "ok  ", n_vocab, dim, n,
           bad);
    cudaFree(dt), cudaFree(dtok), cudaFree(dx);
    free(table), free(tok), free(got);
    return bad;
}

int main(void)
{
    tcu_require_gpu();
    uint64_t rng = tcu_seed();
    int bad = run(&rng, 1, 1, 1, 0) + run(&rng, 49152, 576, 37, 3) + run(&rng, 300, 4096, 5, 0);
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
