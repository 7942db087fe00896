/*
 * vexp.h: e^x on 8 float lanes, for softmax arguments (x <= 0), as a GCC/Clang vector so the
 * same code serves an AVX2 function, a target_clones clone or baseline SSE. x = k ln2 + r
 * with ln2 in two parts (k ln2_hi is exact: ln2_hi has 9 significant bits, |k| <= 124), e^r
 * by Cephes' expf polynomial, 2^k added into the exponent bits. Within a few ulp of expf down
 * to -86; 0 below (e^-86 < 1e-37, nothing next to a softmax row's maximum, whose term is 1),
 * for -inf and for NaN. Header only: the caller's target decides the instructions.
 */
#ifndef FERRY_VEXP_H
#define FERRY_VEXP_H

#include <stdint.h>

typedef float fy_v8f __attribute__((vector_size(32)));
typedef int32_t fy_v8i __attribute__((vector_size(32)));
typedef uint32_t fy_v8u __attribute__((vector_size(32)));

/* Vectors pass by pointer: by value they would change the ABI between clones. */
static inline __attribute__((always_inline)) void fy_exp8_nonpos(fy_v8f *xp)
{
    fy_v8f z = {0}, x = *xp, lo = z - 86.0f, magic = z + 12582912.0f;
    // Outside [-86, 0] only through hostile input: below (and NaN) gives 0, above is taken
    // as 0, so k stays in [-124, 0] and no integer step can overflow.
    fy_v8i keep = x >= lo, pos = x > z;
    x = (fy_v8f)((keep & (fy_v8i)x) | (~keep & (fy_v8i)lo));
    x = (fy_v8f)((pos & (fy_v8i)z) | (~pos & (fy_v8i)x));
    fy_v8f k = (x * 1.44269504088896341f + magic) - magic; // round to nearest
    fy_v8f r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    fy_v8f p = z + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + (r + 1.0f);
    fy_v8u e = (fy_v8u) __builtin_convertvector(k, fy_v8i) << 23; // unsigned: k <= 0
    *xp = (fy_v8f)(((fy_v8u)p + e) & (fy_v8u)keep);
}

#endif /* FERRY_VEXP_H */
