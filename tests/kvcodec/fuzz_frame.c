// Fuzz target: a frame from the network goes through parse, placement into a small pool,
// attention over the placed pages and the reference dequantizer. Nothing may crash, read out
// of bounds or leak; a rejected frame leaves the pool untouched.
//
// Long runs: see docs/testing.md; the corpus is tests/kvcodec/corpus/frame.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvcodec.h"

static void place_and_attend(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    place_and_attend(data, size);
    // Mutations almost never survive the CRC; also try the input with its CRC recomputed so
    // the field validation behind it is exercised too.
    if (size >= 68 && size <= (1u << 20)) {
        uint8_t *copy = malloc(size);
        memcpy(copy, data, size);
        uint32_t crc = fy_crc32c(0, copy, size - 4);
        for (int i = 0; i < 4; i++)
            copy[size - 4 + i] = (uint8_t)(crc >> (8 * i));
        place_and_attend(copy, size);
        free(copy);
    }
    return 0;
}

static void place_and_attend(const uint8_t *data, size_t size)
{
    kvc_frame_t f;
    if (kvc_frame_parse(data, size, &f) != FY_OK)
        return;
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.head_dim = f.head_dim;
    pp.group = f.group;
    pp.protect = f.protect;
    pp.n_pages = 16;
    pp.page_bytes = 65536;
    kvc_pool_t *pool = NULL;
    if (kvc_pool_create(&pp, &pool) != FY_OK)
        return;
    kvc_seq_t *seq = NULL;
    if (kvc_seq_create(pool, f.n_layers, f.n_kv_heads, f.model_fingerprint, f.seq_id, &seq) ==
        FY_OK) {
        uint32_t before = kvc_pool_free_count(pool);
        fy_status_t st = kvc_place(seq, &f);
        if (st != FY_OK && kvc_pool_free_count(pool) != before)
            abort(); // a failed place must not leak pages
        if (st == FY_OK) {
            float *q = calloc((size_t)4 * f.head_dim, sizeof(float));
            float *o = calloc((size_t)4 * f.head_dim, sizeof(float));
            for (uint32_t c = 0; c < 4 * f.head_dim; c++)
                q[c] = (float)(c % 7) - 3.0f;
            for (uint32_t h = 0; h < f.n_kv_heads && h < 4; h++) {
                uint32_t n;
                const kvc_page_id_t *ids = kvc_seq_pages(seq, f.layer, h, &n);
                kvc_attend(pool, ids, n, q, 4, 0.125f, o);
            }
            free(q), free(o);
        }
        kvc_seq_destroy(seq);
    }
    if (kvc_pool_free_count(pool) != pp.n_pages)
        abort();
    kvc_pool_destroy(pool);
    size_t elems = (size_t)f.n_kv_heads * f.n_tokens * f.head_dim;
    if (elems <= (1u << 20)) {
        float *k = malloc(elems * sizeof(float)), *v = malloc(elems * sizeof(float));
        uint8_t *kept = malloc((size_t)f.n_kv_heads * f.n_tokens);
        if (k && v && kept)
            kvc_frame_dequantize(&f, k, v, kept);
        free(k), free(v), free(kept);
    }
}
