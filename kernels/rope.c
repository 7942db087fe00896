/*
 * rope.c: rotary position embedding (CPU reference), in the two layouts GGUF models use:
 * NORM rotates adjacent pairs (Llama GGUF files store Q and K rows permuted for it), NEOX
 * rotates the two halves of the rotated dims (Qwen2, and the layout of Hugging Face models).
 * Frequencies: theta^(-2i/n_rot), divided by freq_factors[i] when given (Llama 3 scaling),
 * and positions scaled linearly by freq_scale.
 */
#include <math.h>

#include "kernels.h"

void krn_rope_f32(float *x, int ldx, int n_tokens, int n_heads, int head_dim, const int32_t *pos,
                  const krn_rope_t *rope)
{
    int half = rope->n_rot / 2;
    for (int t = 0; t < n_tokens; t++) {
        double p = (double)pos[t] * rope->freq_scale;
        float *xt = x + (size_t)t * ldx;
        for (int i = 0; i < half; i++) {
            double freq = pow((double)rope->theta, -2.0 * i / rope->n_rot);
            if (rope->freq_factors != NULL)
                freq /= rope->freq_factors[i];
            double ang = p * freq;
            float c = (float)cos(ang), s = (float)sin(ang);
            for (int h = 0; h < n_heads; h++) {
                float *xh = xt + (size_t)h * head_dim;
                int a = rope->mode == KRN_ROPE_NEOX ? i : 2 * i;
                int b = rope->mode == KRN_ROPE_NEOX ? i + half : 2 * i + 1;
                float x0 = xh[a], x1 = xh[b];
                xh[a] = x0 * c - x1 * s;
                xh[b] = x0 * s + x1 * c;
            }
        }
    }
}
