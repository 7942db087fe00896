/*
 * rmsnorm.c: RMSNorm (CPU reference). Sums in double so long rows and large activations keep
 * the precision of the reference implementations.
 */
#include <math.h>

#include "kernels.h"

void krn_rmsnorm_f32(float *out, int ldo, const float *x, int ldx, const float *w, int n_rows,
                     int dim, float eps)
{
    for (int r = 0; r < n_rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *orow = out + (size_t)r * ldo;
        double ss = 0.0;
        for (int i = 0; i < dim; i++)
            ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / dim + eps));
        for (int i = 0; i < dim; i++)
            orow[i] = xr[i] * inv * w[i];
    }
}
