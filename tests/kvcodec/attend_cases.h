// Decode attention test cases shared by the GPU parity test (test_attend_cuda.c) and its
// emulated twin (test_attend_emu.cc): pools of pages built on the CPU by the real encoder and
// kvc_place (plus FP16 tail appends and a conversion) for sequences of different policies and
// lengths, the page lists of a batch, queries, kvc_attend's reference and the comparison.
#ifndef FERRY_TESTS_KVCODEC_ATTEND_CASES_H
#define FERRY_TESTS_KVCODEC_ATTEND_CASES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvcodec.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { KVA_MAX_SEQS = 8 };

typedef struct {
    const char *policy;
    double budget;
    int rotate; // -1: the policy's own setting
    uint32_t n_tokens;
    uint32_t append; // FP16 tokens appended to every head after placing
    bool convert;    // convert the FP16 pages of head 0 to rotated 4/4 afterwards
} kva_seq_t;

typedef struct {
    uint32_t d, n_kv, grp, protect;
    size_t page_bytes;
    uint32_t n_pages;
    uint32_t n_seqs; // sequences; a spec with n_tokens 0 is a sequence with empty lists
    kva_seq_t seqs[KVA_MAX_SEQS];
    uint32_t group; // G of the pool and the policies
} kva_config_t;

typedef struct {
    kvc_pool_t *pool;
    kvc_seq_t *seqs[KVA_MAX_SEQS];
    uint32_t n_seqs, n_kv, n_heads, d, protect, group;
    size_t page_bytes;
    uint32_t opt_pages[KVC_OPT_DROP]; // pages per option over all lists
    uint32_t rot_pages;
} kva_built_t;

extern const kva_config_t kva_configs[];
extern const size_t kva_n_configs;

/* Uniform in [-1, 1), from one sequence for the whole program. */
float kva_frand(void);

/* Builds the pool and places every sequence of C; kva_unbuild frees it. */
void kva_build(kva_built_t *B, const kva_config_t *C);
void kva_unbuild(kva_built_t *B);

/* A batch over every list of B in CSR form: list i * n_kv + h of sequence i, head h, followed
 * by `extra_bad` page ids past the pool when the list is not empty (expect_bad of them in all). */
typedef struct {
    uint32_t *starts, *ids; // [n_items + 1], [n_ids]
    uint32_t n_items, n_ids, max_list, expect_bad;
} kva_lists_t;
void kva_lists(const kva_built_t *B, uint32_t extra_bad, kva_lists_t *L);
void kva_lists_free(kva_lists_t *L);

/* Queries for every head of every sequence ([n_seqs][n_heads][d], uniform in [-2, 2)) and
 * kvc_attend's output for them (ref, the same shape), at scale 1 / sqrt(d). */
void kva_reference(const kva_built_t *B, float **q_p, float **ref_p, float *scale_p);

/* Checks got against ref element by element: |got - ref| <= tol * max|ref row| + 1e-6, tol
 * 1e-3 (both fp32, only the order of the sums differs) or 4e-3 with f16_keys (a kernel that
 * rounds dequantized keys to FP16: each key rounded by up to 2^-11 relative moves a logit by
 * up to about |q| |k| 2^-11). Returns the worst error relative to its row's maximum. */
double kva_check(const kva_built_t *B, const float *got, const float *ref, bool f16_keys);

#ifdef __cplusplus
}
#endif

#endif
