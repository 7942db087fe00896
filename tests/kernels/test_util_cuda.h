/*
 * test_util_cuda.h: what the CUDA parity tests of the kernels share: the skip rule (exit 77
 * without a GPU), a seeded generator, device buffers that abort the test on any CUDA error,
 * poisoning (0xff bytes: NaN in FP32 and FP16, so an element the kernel forgot to write
 * fails the comparison) and a tolerance check that reports the worst element.
 */
#ifndef FERRY_TESTS_KERNELS_UTIL_CUDA_H
#define FERRY_TESTS_KERNELS_UTIL_CUDA_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_cuda.h"

#define TCU_CHECK(call)                                                                        \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                      \
                    cudaGetErrorString(e_));                                                   \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

#define TCU_OK(call)                                                                           \
    do {                                                                                       \
        fy_status_t s_ = (call);                                                               \
        if (s_ != FY_OK) {                                                                     \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, fy_status_str(s_));  \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

/* Exits 77 when there is no GPU. */
static inline void tcu_require_gpu(void)
{
    if (fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        exit(77);
    }
}

/* The inputs' seed: fresh each run (from the clock) unless FERRY_TEST_SEED pins it; printed
 * so a failure can be replayed. */
static inline uint64_t tcu_seed(void)
{
    const char *e = getenv("FERRY_TEST_SEED");
    uint64_t s = e != NULL && e[0] != '\0' ? strtoull(e, NULL, 0) : fy_clock_ns();
    s = s != 0 ? s : 1; // xorshift needs a nonzero state
    printf("seed %llu (FERRY_TEST_SEED to replay)\n", (unsigned long long)s);
    return s;
}

static inline uint64_t tcu_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Uniform in [lo, hi). */
static inline float tcu_uniform(uint64_t *s, float lo, float hi)
{
    return lo + (hi - lo) * (float)(tcu_next(s) >> 40) / (float)(1 << 24);
}

static inline float *tcu_rand_f32(uint64_t *s, size_t n, float lo, float hi)
{
    float *p = malloc(n * sizeof(float) + 1);
    if (p == NULL)
        exit(1);
    for (size_t i = 0; i < n; i++)
        p[i] = tcu_uniform(s, lo, hi);
    return p;
}

/* A device copy of n bytes of host data (or poisoned when src is NULL). */
static inline void *tcu_dev(const void *src, size_t bytes)
{
    void *d = NULL;
    TCU_CHECK(cudaMalloc(&d, bytes > 0 ? bytes : 1));
    if (src != NULL)
        TCU_CHECK(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice));
    else
        TCU_CHECK(cudaMemset(d, 0xff, bytes));
    return d;
}

static inline void tcu_get(void *dst, const void *dev, size_t bytes)
{
    TCU_CHECK(cudaDeviceSynchronize());
    TCU_CHECK(cudaMemcpy(dst, dev, bytes, cudaMemcpyDeviceToHost));
}

/* Compares got[n] to ref[n] (row r of `cols` elements at r * ld): |got - ref| <= atol + rtol *
 * |ref|, NaN never passes. Prints the worst element; returns the number of failures. */
static inline int tcu_compare(const char *what, const float *got, const float *ref, int rows,
                              int cols, int ld, float atol, float rtol)
{
    int bad = 0;
    double worst = 0.0;
    int wr = 0, wc = 0;
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) {
            size_t i = (size_t)r * ld + c;
            double diff = fabs((double)got[i] - (double)ref[i]);
            double lim = atol + rtol * fabs((double)ref[i]);
            if (!(diff <= lim))
                bad++;
            double d = isnan(diff) ? INFINITY : diff;
            if (d > worst || (r == 0 && c == 0)) {
                worst = d;
                wr = r;
                wc = c;
            }
        }
    }
    size_t wi = (size_t)wr * ld + wc;
    printf("%s %s: %d of %d outside atol %g rtol %g; worst |diff| %.3g at [%d][%d] (got %.7g, "
           "ref %.7g)\n",
           bad ? "FAIL" : "ok  ", what, bad, rows * cols, atol, rtol, worst, wr, wc,
           (double)got[wi], (double)ref[wi]);
    return bad;
}

#endif /* FERRY_TESTS_KERNELS_UTIL_CUDA_H */
