/*
 * swiglu.c: the SwiGLU gate of the feed-forward block, silu(gate) * up (CPU reference).
 */
#include <math.h>

#include "kernels.h"

void krn_swiglu_f32(float *out, const float *gate, const float *up, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
