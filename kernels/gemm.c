/*
 * gemm.c: the linear layers, y = x · Wᵀ, through OpenBLAS (CPU reference of the GEMM op).
 * Weights are [n_out][n_in] row-major, so W is passed transposed; one activation row goes
 * through sgemv, which OpenBLAS runs faster than a 1-row sgemm.
 */
#include <cblas.h>
#include <string.h>

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

/* OpenBLAS's own declaration is missing from some cblas.h versions. */
char *openblas_get_corename(void);

const char *krn_gemm_better_coretype(void)
{
    // OpenBLAS (DYNAMIC_ARCH) picks its kernels from the CPUID model; on VMs that report a
    // generic model it falls back to Prescott (SSE3) even when AVX2/FMA are there, which
    // halves GEMM speed. It only reads OPENBLAS_CORETYPE at load time, hence the advice.
    static const char *const older[] = {"Prescott", "Core2", "Nehalem", "Sandybridge"};
    const char *core = openblas_get_corename();
    bool is_older = false;
    for (size_t i = 0; core != NULL && i < FY_ARRAY_SIZE(older); i++)
        is_older |= strcmp(core, older[i]) == 0;
    if (!is_older)
        return NULL;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return "Haswell";
    return NULL;
}

void krn_gemm_set_threads(int n)
{
    if (n > 0)
        openblas_set_num_threads(n);
}
