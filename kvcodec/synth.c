/*
 * synth.c: synthetic K/V of one layer for tests and benchmarks, shaped like real post-RoPE
 * caches: a few key channels carry outliers an order of magnitude larger than the rest, keys
 * have per-channel offsets, value magnitudes vary per token, the first token is an attention
 * sink and the window queries attend to a handful of "needle" tokens. Deterministic in seed.
 */
#include <math.h>

#include "kvcodec_int.h"

static uint64_t rng_next(uint64_t *s)
{
    *s += 0x9e3779b97f4a7c15ull;
    uint64_t z = *s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_gauss(uint64_t *s)
{
    double u1 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void kvc_synth_layer(uint64_t seed, uint32_t n_heads, uint32_t n_kv, uint32_t n, uint32_t d,
                     uint32_t n_window, uint16_t *k, uint16_t *v, float *q)
{
    uint64_t s = seed * 0x2545f4914f6cdd1dull + 1;
    float off[KVC_MAX_HEAD_DIM], sc[KVC_MAX_HEAD_DIM];
    for (uint32_t h = 0; h < n_kv; h++) {
        for (uint32_t c = 0; c < d; c++) {
            bool outlier = (rng_next(&s) % 16) == 0; // ~1/16 of key channels
            sc[c] = outlier ? 8.0f : 1.0f;
            off[c] = outlier ? 4.0f * rng_gauss(&s) : 0.5f * rng_gauss(&s);
        }
        for (uint32_t t = 0; t < n; t++) {
            uint16_t *kr = k + ((size_t)h * n + t) * d, *vr = v + ((size_t)h * n + t) * d;
            float vmag = expf(0.5f * rng_gauss(&s));
            for (uint32_t c = 0; c < d; c++) {
                float kk = off[c] + sc[c] * rng_gauss(&s);
                if (t == 0)
                    kk = off[c] + 3.0f * sc[c]; // the sink: large, aligned with the queries
                kr[c] = fy_fp32_to_fp16(kk);
                vr[c] = fy_fp32_to_fp16(vmag * rng_gauss(&s));
            }
        }
    }
    if (q == NULL || n_window == 0)
        return;
    uint32_t grp = n_heads / n_kv;
    for (uint32_t hq = 0; hq < n_heads; hq++) {
        uint32_t h = hq / grp;
        uint32_t needle = (uint32_t)(rng_next(&s) % n);
        for (uint32_t w = 0; w < n_window; w++) {
            float *qr = q + ((size_t)hq * n_window + w) * d;
            uint32_t pos = n - n_window + w;
            uint32_t tgt = needle <= pos ? needle : (uint32_t)(rng_next(&s) % (pos + 1));
            const uint16_t *kt = k + ((size_t)h * n + tgt) * d;
            for (uint32_t c = 0; c < d; c++)
                qr[c] = 0.35f * fy_fp16_to_fp32(kt[c]) + rng_gauss(&s);
        }
    }
}
