// CUDA parity of decode attention over FP16 pages (krn_paged_attention_f16_cuda, a batch of
// sequences of different lengths, pages scattered over the pool in random order) against
// krn_paged_attention_f16 per (sequence, kv head); and of krn_paged_store_f16_cuda, whose
// page bytes must equal the CPU conversion (fy_fp32_to_fp16) exactly.
// Tolerance: attention |diff| <= 2e-5 + 1e-4 |ref|.
#include "test_util_cuda.h"

typedef struct {
    int n_seqs, n_heads, n_kv, hd, page_tokens, max_len, pad;
} shape_t;

static int run(uint64_t *rng, shape_t s)
{
    int group = s.n_heads / s.n_kv, q_dim = s.n_heads * s.hd;
    int ldq = q_dim + s.pad, ldo = q_dim + 2 * s.pad;
    int max_pages = (s.max_len + s.page_tokens - 1) / s.page_tokens;
    int64_t n_pages = (int64_t)s.n_seqs * s.n_kv * max_pages + 3;
    size_t page_elems = 2 * (size_t)s.page_tokens * s.hd;
    size_t pool_n = (size_t)n_pages * page_elems;
    uint16_t *pool = malloc(pool_n * 2);
    for (size_t i = 0; i < pool_n; i++)
        pool[i] = fy_fp32_to_fp16(tcu_uniform(rng, -2, 2));
    // A random permutation of page ids.
    int32_t *perm = malloc((size_t)n_pages * 4);
    for (int64_t i = 0; i < n_pages; i++)
        perm[i] = (int32_t)i;
    for (int64_t i = n_pages - 1; i > 0; i--) {
        int64_t j = (int64_t)(tcu_next(rng) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    size_t ids_n = (size_t)s.n_seqs * s.n_kv * max_pages;
    int32_t *ids = malloc(ids_n * 4), *lens = malloc((size_t)s.n_seqs * 4);
    memcpy(ids, perm, ids_n * 4);
    for (int b = 0; b < s.n_seqs; b++)
        lens[b] = b == 0 ? s.max_len : 1 + (int32_t)(tcu_next(rng) % (uint64_t)s.max_len);
    float *q = tcu_rand_f32(rng, (size_t)s.n_seqs * ldq, -2, 2);
    float *ref = malloc((size_t)s.n_seqs * ldo * 4), *got = malloc((size_t)s.n_seqs * ldo * 4);
    const uint16_t **pages = malloc((size_t)max_pages * sizeof(*pages));
    for (int b = 0; b < s.n_seqs; b++) {
        for (int h = 0; h < s.n_kv; h++) {
            const int32_t *row = ids + ((size_t)b * s.n_kv + h) * max_pages;
            for (int p = 0; p < max_pages; p++)
                pages[p] = pool + (size_t)row[p] * page_elems;
            krn_page_list_t list = {.pages = pages, .n_pages = max_pages,
                                    .page_tokens = s.page_tokens, .n_tokens = lens[b]};
            krn_paged_attention_f16(ref + (size_t)b * ldo + (size_t)h * group * s.hd,
                                    q + (size_t)b * ldq + (size_t)h * group * s.hd, group, s.hd,
                                    1.0f / sqrtf((float)s.hd), &list);
        }
    }
    uint16_t *dpool = tcu_dev(pool, pool_n * 2);
    int32_t *dids = tcu_dev(ids, ids_n * 4), *dlens = tcu_dev(lens, (size_t)s.n_seqs * 4);
    float *dq = tcu_dev(q, (size_t)s.n_seqs * ldq * 4);
    float *dout = tcu_dev(NULL, (size_t)s.n_seqs * ldo * 4);
    size_t ns = krn_paged_attention_cuda_scratch(s.n_seqs, s.n_heads, s.n_kv, s.hd, s.max_len);
    float *dscr = tcu_dev(NULL, ns * 4);
    krn_paged_cuda_t cache = {.pool = dpool, .page_elems = page_elems, .n_pages = n_pages,
                              .page_tokens = s.page_tokens, .head_dim = s.hd, .page_ids = dids,
                              .ids_seq_stride = (size_t)s.n_kv * max_pages,
                              .max_pages = max_pages};
    TCU_OK(krn_paged_attention_f16_cuda(dout, ldo, dq, ldq, s.n_seqs, s.n_heads, s.n_kv,
                                        1.0f / sqrtf((float)s.hd), &cache, dlens, s.max_len,
                                        dscr, ns, 0));
    tcu_get(got, dout, (size_t)s.n_seqs * ldo * 4);
    char what[160];
    snprintf(what, sizeof(what), "paged attention seqs=%d heads=%d/%d hd=%d page=%d len<=%d",
             s.n_seqs, s.n_heads, s.n_kv, s.hd, s.page_tokens, s.max_len);
    int bad = tcu_compare(what, got, ref, s.n_seqs, q_dim, ldo, 2e-5f, 1e-4f);

    // Store: 3 new tokens per sequence at positions lens[b] - 3 (clamped at 0), from a
    // [n_seqs][n_kv][3][hd] buffer; compare the whole pool with the CPU's conversion.
    int nt = 3;
    size_t nkv = (size_t)s.n_seqs * s.n_kv * nt * s.hd;
    float *k = tcu_rand_f32(rng, nkv, -3, 3), *v = tcu_rand_f32(rng, nkv, -3, 3);
    int32_t *pos0 = malloc((size_t)s.n_seqs * 4);
    for (int b = 0; b < s.n_seqs; b++) {
        pos0[b] = lens[b] - nt;
        if (pos0[b] < 0)
            pos0[b] = 0;
        for (int h = 0; h < s.n_kv; h++) {
            for (int t = 0; t < nt; t++) {
                int p = pos0[b] + t;
                if (p / s.page_tokens >= max_pages)
                    continue;
                int32_t id = ids[((size_t)b * s.n_kv + h) * max_pages + p / s.page_tokens];
                uint16_t *kr = pool + (size_t)id * page_elems + (size_t)(p % s.page_tokens) * s.hd;
                uint16_t *vr = kr + (size_t)s.page_tokens * s.hd;
                size_t src = (((size_t)b * s.n_kv + h) * nt + t) * s.hd;
                fy_fp32_to_fp16_buf(kr, k + src, (size_t)s.hd);
                fy_fp32_to_fp16_buf(vr, v + src, (size_t)s.hd);
            }
        }
    }
    float *dk = tcu_dev(k, nkv * 4), *dv = tcu_dev(v, nkv * 4);
    int32_t *dpos = tcu_dev(pos0, (size_t)s.n_seqs * 4);
    TCU_OK(krn_paged_store_f16_cuda(&cache, s.n_seqs, s.n_kv, nt, dpos, dk, dv,
                                    (size_t)s.n_kv * nt * s.hd, (size_t)nt * s.hd, (size_t)s.hd,
                                    0));
    uint16_t *pool_got = malloc(pool_n * 2);
    tcu_get(pool_got, dpool, pool_n * 2);
    size_t diff = 0;
    for (size_t i = 0; i < pool_n; i++)
        diff += pool_got[i] != pool[i];
    printf("%s   paged store: %zu of %zu pool elements differ\n", diff ? "FAIL" : "ok  ", diff,
           pool_n);
    bad += diff != 0;
    cudaFree(dpool), cudaFree(dids), cudaFree(dlens), cudaFree(dq), cudaFree(dout);
    cudaFree(dscr), cudaFree(dk), cudaFree(dv), cudaFree(dpos);
    free(pool), free(perm), free(ids), free(lens), free(q), free(ref), free(got), free(pages);
    free(k), free(v), free(pos0), free(pool_got);
    return bad;
}

int main(void)
{
    tcu_require_gpu();
    uint64_t rng = tcu_seed();
    static const shape_t shapes[] = {
        {1, 1, 1, 32, 16, 1, 0},      {3, 9, 3, 64, 16, 300, 1},
        {4, 32, 8, 128, 16, 1000, 0}, {2, 32, 1, 64, 7, 157, 3},
        {5, 4, 4, 80, 5, 33, 0},      {1, 8, 2, 256, 16, 700, 0},
        {16, 15, 5, 64, 16, 129, 0},  {2, 28, 4, 128, 1, 70, 2},
        {2, 8, 2, 64, 16, 20000, 0}, // long enough that the splits keep their full 256 tokens
    };
    int bad = 0;
    for (size_t i = 0; i < FY_ARRAY_SIZE(shapes); i++)
        bad += run(&rng, shapes[i]);
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
