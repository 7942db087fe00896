/*
 * gemm.c: the linear layers, y = x · Wᵀ, through OpenBLAS (CPU reference of the GEMM op).
 * Weights are [n_out][n_in] row-major, so W is passed transposed; one activation row goes
 * through sgemv, which OpenBLAS runs faster than a 1-row sgemm.
 */
#include <cblas.h>

#include "kernels.h"

void krn_gemm_f32(int m, int n, int k, const float *x, int ldx, const float *w, int ldw, float *y,
                  int ldy, int accumulate)
{
    if (m <= 0 || n <= 0)
        return;
    float beta = accumulate ? 1.0f : 0.0f;
    if (m == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w, ldw, x, 1, beta, y, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, w, ldw, beta, y,
                ldy);
}

void krn_gemm_set_threads(int n)
{
    if (n > 0)
        openblas_set_num_threads(n);
}
