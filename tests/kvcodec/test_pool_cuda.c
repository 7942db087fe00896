// GPU page pool parity: frames placed with kvc_place_cuda into a GPU pool give the same page
// lists, token counts and page bytes (header plus every used slot at full capacity) as
// kvc_place into a CPU pool, for every option, rotated and not, with and without MixKVQ
// protected channels, odd token counts, several layers and heads, pages that fill up, partial
// groups. The GPU pool is poisoned first so an unwritten byte shows. Then decode tokens are
// appended to every FP16 tail (kvc_seq_append against kvc_gpu_seq_append_slot +
// kvc_gpu_append_cuda) and the pages compared again. Placement is all-or-nothing (exhaustion,
// mismatch, a layer twice). Frames that arrive in device memory place like host ones. Exits 77
// without a GPU.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcodec_cuda.h"
#include "kvtest.h"

#if FY_HAVE_CUDA
#include <cuda_runtime.h>

#include "pool_cases.h"

#define CK(call) assert_int_equal((int)(call), (int)cudaSuccess)

/* Bytes of a page that carry meaning: the header and each used slot at full capacity (the
 * padding between a slot's group bytes and slot_bytes is never written, on either side). */
static size_t page_meaningful(const uint8_t *pg, uint32_t d, uint32_t P, size_t slot_bytes,
                              size_t *ranges, size_t max_ranges)
{
    kvc_opt_t o = (kvc_opt_t)pg[0];
    uint32_t n_slots = (uint32_t)(pg[4] | (pg[5] << 8));
    uint32_t gs = (uint32_t)(pg[8] | (pg[9] << 8));
    size_t gb;
    if (o == KVC_OPT_F16) {
        gb = 4 * (size_t)d;
    } else {
        size_t rk = (size_t)d * kvc_opt_kbits(o) / 8, rv = (size_t)d * kvc_opt_vbits(o) / 8;
        gb = 4 * (size_t)d + 4 * (size_t)gs + gs * (rk + rv);
        if (P && o >= KVC_OPT_Q4 && o <= KVC_OPT_Q2)
            gb += 2 * (size_t)P + (size_t)gs * P;
    }
    size_t n = 0;
    ranges[n++] = 0;
    ranges[n++] = KVC_PAGE_HEADER_BYTES;
    for (uint32_t s = 0; s < n_slots && n + 2 <= max_ranges; s++) {
        ranges[n++] = KVC_PAGE_HEADER_BYTES + s * slot_bytes;
        ranges[n++] = gb;
    }
    return n;
}

/* Page lists, token counts and meaningful page bytes of the CPU and GPU sequences. */
static void compare_pools(const pcase_t *c, kvc_pool_t *cpu, kvc_seq_t *cs, kvc_gpu_pool_t *gpu,
                          kvc_gpu_seq_t *gs, size_t pool_bytes, const char *what)
{
    size_t page_bytes = c->page_bytes;
    assert_int_equal(kvc_gpu_pool_free_count(gpu), kvc_pool_free_count(cpu));
    uint8_t *host = malloc(pool_bytes);
    CK(cudaMemcpy(host, kvc_gpu_pool_base(gpu), pool_bytes, cudaMemcpyDeviceToHost));
    size_t ranges[2 * 4096];
    uint64_t pages_checked = 0;
    for (uint32_t l = 0; l < c->n_layers; l++) {
        for (uint32_t h = 0; h < c->n_kv; h++) {
            uint32_t nc, ng;
            const kvc_page_id_t *ic = kvc_seq_pages(cs, l, h, &nc);
            const kvc_page_id_t *ig = kvc_gpu_seq_pages(gs, l, h, &ng);
            assert_int_equal(nc, ng);
            assert_int_equal(kvc_seq_n_tokens(cs, l, h), kvc_gpu_seq_n_tokens(gs, l, h));
            for (uint32_t i = 0; i < nc; i++) {
                assert_int_equal(ic[i], ig[i]);
                const uint8_t *pc = kvc_page_data(cpu, ic[i]);
                const uint8_t *pg = host + (size_t)ig[i] * page_bytes;
                uint8_t hdr[KVC_PAGE_HEADER_BYTES];
                assert_int_equal(kvc_gpu_page_header(gpu, ig[i], hdr), FY_OK);
                assert_memory_equal(hdr, pc, KVC_PAGE_HEADER_BYTES);
                size_t sb = kvc_gpu_pool_slot_bytes(gpu, (kvc_opt_t)pc[0]);
                size_t nr = page_meaningful(pc, c->d, c->protect, sb, ranges, 2 * 4096);
                for (size_t r = 0; r < nr; r += 2) {
                    if (memcmp(pc + ranges[r], pg + ranges[r], ranges[r + 1]) != 0) {
                        fprintf(stderr,
                                "%s %s rot %d P %u n %u d %u: layer %u head %u page %u "
                                "(opt %u) range %zu+%zu differs\n",
                                what, c->policy, c->rotate, c->protect, c->n, c->d, l, h, ic[i],
                                pc[0], ranges[r], ranges[r + 1]);
                        fail();
                    }
                }
                pages_checked++;
            }
        }
    }
    assert_true(pages_checked > 0);
    free(host);
}

enum { N_APPEND = 40 };

/* Appends N_APPEND random tokens to every (layer, kv head): kvc_seq_append on the CPU,
 * kvc_gpu_seq_append_slot + kvc_gpu_append_cuda on the GPU with the same FP16 K and V (one
 * device call per token and layer, the kv heads of a row side by side). */
static void append_tokens(const pcase_t *c, kvc_pool_t *cpu, kvc_seq_t *cs, kvc_gpu_pool_t *gpu,
                          kvc_gpu_seq_t *gs, uint64_t seed)
{
    uint32_t d = c->d, nkv = c->n_kv;
    size_t row = (size_t)nkv * d; // [n_kv][d] K of one token, then V at the same stride
    float *k = malloc(row * sizeof(float)), *v = malloc(row * sizeof(float));
    uint16_t *k16 = malloc(row * 2), *v16 = malloc(row * 2), *dk, *dv;
    kvc_gpu_append_t *slots = malloc(nkv * sizeof(*slots)), *dslots;
    CK(cudaMalloc((void **)&dk, row * 2));
    CK(cudaMalloc((void **)&dv, row * 2));
    CK(cudaMalloc((void **)&dslots, nkv * sizeof(*slots)));
    uint64_t x = seed * 2654435761u + 1;
    for (int t = 0; t < N_APPEND; t++) {
        for (uint32_t l = 0; l < c->n_layers; l++) {
            uint32_t need = kvc_gpu_seq_append_pages(gs, c->n_layers, nkv);
            for (size_t i = 0; i < row; i++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                k[i] = ((float)(x >> 40) / (float)(1 << 24) - 0.5f) * 8.0f;
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                v[i] = ((float)(x >> 40) / (float)(1 << 24) - 0.5f) * 8.0f;
            }
            fy_fp32_to_fp16_buf(k16, k, row);
            fy_fp32_to_fp16_buf(v16, v, row);
            uint32_t before = kvc_gpu_pool_free_count(gpu);
            for (uint32_t h = 0; h < nkv; h++) {
                assert_int_equal(kvc_seq_append(cs, l, h, k16 + (size_t)h * d, v16 + (size_t)h * d),
                                 FY_OK);
                assert_int_equal(kvc_gpu_seq_append_slot(gs, l, h, &slots[h]), FY_OK);
            }
            // This layer's share of the pages the whole sequence's next token would take.
            assert_true(before - kvc_gpu_pool_free_count(gpu) <= need);
            CK(cudaMemcpy(dk, k16, row * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(dv, v16, row * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(dslots, slots, nkv * sizeof(*slots), cudaMemcpyHostToDevice));
            assert_int_equal(kvc_gpu_append_cuda(gpu, dslots, 1, nkv, dk, row, dv, row, NULL),
                             FY_OK);
            CK(cudaDeviceSynchronize());
        }
    }
    CK(cudaFree(dk));
    CK(cudaFree(dv));
    CK(cudaFree(dslots));
    free(k), free(v), free(k16), free(v16), free(slots);
}

static void run_case(const pcase_t *c, uint64_t seed)
{
    kvc_policy_t pol;
    kvc_pool_params_t pp;
    assert_int_equal(kvt_pool_case(c, &pol, &pp), FY_OK);
    pp.n_pages = 4096;
    kvc_pool_t *cpu;
    kvc_gpu_pool_t *gpu;
    assert_int_equal(kvc_pool_create(&pp, &cpu), FY_OK);
    assert_int_equal(kvc_gpu_pool_create(&pp, &gpu), FY_OK);
    size_t pool_bytes = pp.page_bytes * pp.n_pages;
    CK(cudaMemset(kvc_gpu_pool_base(gpu), 0xa5, pool_bytes));
    kvc_seq_t *cs;
    kvc_gpu_seq_t *gs;
    assert_int_equal(kvc_seq_create(cpu, c->n_layers, c->n_kv, 0x1234abcd5678ef00ull, 77, &cs),
                     FY_OK);
    assert_int_equal(kvc_gpu_seq_create(gpu, c->n_layers, c->n_kv, 0x1234abcd5678ef00ull, 77, &gs),
                     FY_OK);

    kvt_layer_t L;
    kvt_layer_make(&L, seed, c->n_heads, c->n_kv, c->n, c->d, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, c->n_layers, c->budget);
    kvc_encoder_t *enc;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(enc);
    uint8_t *frame = malloc(cap);
    uint8_t *dframe;
    CK(cudaMalloc((void **)&dframe, cap));
    for (uint32_t l = 0; l < c->n_layers; l++) {
        kvc_frame_t f;
        assert_int_equal(kvt_pool_case_frame(c, enc, seed, l, frame, cap, &f), FY_OK);
        // Odd layers without the parser's counts: the placement counts the maps (on the host,
        // or on the device from 65536 tokens).
        if (l % 2 == 1)
            f.counted = false;
        CK(cudaMemcpy(dframe, frame, f.frame_bytes, cudaMemcpyHostToDevice));
        assert_int_equal(kvc_place(cs, &f), FY_OK);
        assert_int_equal(kvc_place_cuda(gs, &f, dframe, NULL), FY_OK);
        assert_true(kvc_gpu_seq_layer_placed(gs, l));
        // A second placement of the same layer changes nothing.
        assert_int_equal(kvc_place_cuda(gs, &f, dframe, NULL), FY_ERR_EXISTS);
    }
    CK(cudaDeviceSynchronize());
    assert_int_equal(kvc_gpu_pool_free_count(gpu), kvc_pool_free_count(cpu));

    compare_pools(c, cpu, cs, gpu, gs, pool_bytes, "placed");
    // Decode tokens appended to the FP16 tails: the same page bytes as kvc_seq_append, through
    // placed 16/16 pages with room, full tails and new pages.
    append_tokens(c, cpu, cs, gpu, gs, seed);
    compare_pools(c, cpu, cs, gpu, gs, pool_bytes, "appended");
    kvc_seq_destroy(cs);
    kvc_gpu_seq_destroy(gs);
    assert_int_equal(kvc_gpu_pool_free_count(gpu), pp.n_pages);
    kvc_encoder_destroy(enc);
    kvt_layer_free(&L);
    free(frame);
    CK(cudaFree(dframe));
    kvc_pool_destroy(cpu);
    kvc_gpu_pool_destroy(gpu);
}

static void test_parity(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(kvt_pool_cases) / sizeof(kvt_pool_cases[0]); i++)
        run_case(&kvt_pool_cases[i], 1000 + i);
}

/* Exhaustion leaves pool and sequence unchanged; a mismatched frame is refused. */
static void test_all_or_nothing(void **state)
{
    (void)state;
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("int8", &pol), FY_OK);
    kvt_layer_t L;
    kvt_layer_make(&L, 5, 4, 2, 300, 64, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, 1, -1);
    kvc_encoder_t *enc;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(enc), len;
    uint8_t *frame = malloc(cap), *dframe;
    kvc_layer_input_t in = kvt_input(&L, 0);
    assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, frame, cap, &len, NULL), FY_OK);
    kvc_frame_t f;
    assert_int_equal(kvc_frame_parse(frame, len, &f), FY_OK);
    CK(cudaMalloc((void **)&dframe, len));
    CK(cudaMemcpy(dframe, frame, len, cudaMemcpyHostToDevice));

    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.head_dim = 64;
    pp.page_bytes = 8192;
    pp.n_pages = 4;
    kvc_gpu_pool_t *gpu;
    assert_int_equal(kvc_gpu_pool_create(&pp, &gpu), FY_OK);
    uint32_t need;
    assert_int_equal(kvc_gpu_pool_pages_needed(gpu, &f, &need), FY_OK);
    assert_true(need > 4);
    kvc_gpu_seq_t *s;
    assert_int_equal(kvc_gpu_seq_create(gpu, 1, 2, 0x1234abcd5678ef00ull, 77, &s), FY_OK);
    assert_int_equal(kvc_place_cuda(s, &f, dframe, NULL), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(kvc_gpu_pool_free_count(gpu), 4);
    assert_false(kvc_gpu_seq_layer_placed(s, 0));
    assert_int_equal(kvc_gpu_seq_n_tokens(s, 0, 0), 0);
    kvc_gpu_seq_destroy(s);
    // Another sequence id, another model, another head count: refused.
    assert_int_equal(kvc_gpu_seq_create(gpu, 1, 2, 0x1234abcd5678ef00ull, 78, &s), FY_OK);
    assert_int_equal(kvc_place_cuda(s, &f, dframe, NULL), FY_ERR_MISMATCH);
    kvc_gpu_seq_destroy(s);
    assert_int_equal(kvc_gpu_seq_create(gpu, 1, 3, 0x1234abcd5678ef00ull, 77, &s), FY_OK);
    assert_int_equal(kvc_place_cuda(s, &f, dframe, NULL), FY_ERR_MISMATCH);
    kvc_gpu_seq_destroy(s);
    assert_int_equal(kvc_gpu_pool_free_count(gpu), 4);
    kvc_gpu_pool_destroy(gpu);
    // Bad pool parameters are refused like the CPU pool's.
    pp.page_bytes = 100;
    assert_int_equal(kvc_gpu_pool_create(&pp, &gpu), FY_ERR_INVALID_ARG);
    CK(cudaFree(dframe));
    free(frame);
    kvc_encoder_destroy(enc);
    kvt_layer_free(&L);
}

/* Frames that arrive in device memory (the NCCL pair's path): kvc_cuda_frame_upload,
 * kvc_gpu_stage_fetch back to the host and kvc_gpu_stage_place_dev give the same pages as
 * kvc_gpu_stage_place from the host copy, which is pageable for the first layer and then
 * page-locked (kvc_cuda_host_register, as a decode worker's receive pool); a layer placed
 * twice is refused; frames freed stream-ordered. The device UUID is 32 hex digits and the same on
 * every call. */
static void test_device_frames(void **state)
{
    (void)state;
    char uuid[33], again[33];
    assert_int_equal(fy_cuda_device_uuid(0, uuid, sizeof(uuid)), FY_OK);
    assert_int_equal(strlen(uuid), 32);
    assert_int_equal(strspn(uuid, "0123456789abcdef"), 32);
    assert_int_equal(fy_cuda_device_uuid(0, again, sizeof(again)), FY_OK);
    assert_string_equal(uuid, again);
    assert_int_equal(fy_cuda_device_uuid(fy_cuda_device_count(), again, sizeof(again)),
                     FY_ERR_NO_DEVICE);
    assert_int_equal(fy_cuda_device_uuid(0, again, 32), FY_ERR_INVALID_ARG);

    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
    const uint32_t n_layers = 3, n_heads = 8, n_kv = 2, n = 517, d = 64;
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.head_dim = d;
    pp.group = pol.group;
    pp.page_bytes = 16384;
    pp.n_pages = 2048;
    kvc_gpu_pool_t *host_pool, *dev_pool;
    assert_int_equal(kvc_gpu_pool_create(&pp, &host_pool), FY_OK);
    assert_int_equal(kvc_gpu_pool_create(&pp, &dev_pool), FY_OK);
    size_t pool_bytes = pp.page_bytes * pp.n_pages;
    CK(cudaMemset(kvc_gpu_pool_base(host_pool), 0x5a, pool_bytes));
    CK(cudaMemset(kvc_gpu_pool_base(dev_pool), 0x5a, pool_bytes));
    kvc_gpu_seq_t *hs, *ds;
    assert_int_equal(kvc_gpu_seq_create(host_pool, n_layers, n_kv, 0x1234abcd5678ef00ull, 77, &hs),
                     FY_OK);
    assert_int_equal(kvc_gpu_seq_create(dev_pool, n_layers, n_kv, 0x1234abcd5678ef00ull, 77, &ds),
                     FY_OK);
    kvc_gpu_stage_t *stage;
    assert_int_equal(kvc_gpu_stage_create(&stage), FY_OK);

    kvt_layer_t L;
    kvt_layer_make(&L, 99, n_heads, n_kv, n, d, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, n_layers, 0.25);
    kvc_encoder_t *enc;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(enc), alen = (cap + 4095) / 4096 * 4096;
    uint8_t *frame = NULL, *fetched = malloc(cap);
    assert_int_equal(posix_memalign((void **)&frame, 4096, alen), 0);
    assert_non_null(fetched);
    assert_int_equal(kvc_cuda_host_register(NULL, alen), FY_ERR_INVALID_ARG);
    assert_int_equal(kvc_cuda_host_register(frame, 0), FY_ERR_INVALID_ARG);
    kvc_cuda_host_unregister(NULL);
    for (uint32_t l = 0; l < n_layers; l++) {
        if (l == 1) {
            assert_int_equal(kvc_cuda_host_register(frame, alen), FY_OK);
            assert_int_equal(kvc_cuda_host_register(frame, alen), FY_ERR_EXISTS);
        }
        kvt_layer_t Ll;
        kvt_layer_make(&Ll, 500 + l, n_heads, n_kv, n, d, 32);
        kvc_layer_input_t in = kvt_input(&Ll, l);
        size_t len;
        assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, frame, cap, &len, NULL), FY_OK);
        kvt_layer_free(&Ll);
        uint8_t *dev = NULL;
        assert_int_equal(kvc_cuda_frame_upload(frame, len, &dev), FY_OK);
        assert_non_null(dev);
        memset(fetched, 0, cap);
        assert_int_equal(kvc_gpu_stage_fetch(stage, fetched, dev, len), FY_OK);
        assert_memory_equal(fetched, frame, len);
        kvc_frame_t f;
        assert_int_equal(kvc_frame_parse(fetched, len, &f), FY_OK);
        assert_int_equal(kvc_gpu_stage_place(stage, hs, &f, frame, len), FY_OK);
        assert_int_equal(kvc_gpu_stage_place_dev(stage, ds, &f, dev), FY_OK);
        assert_int_equal(kvc_gpu_stage_place_dev(stage, ds, &f, dev), FY_ERR_EXISTS);
        kvc_cuda_frame_free(dev);
    }
    kvc_cuda_frame_free(NULL);
    assert_int_equal(kvc_gpu_pool_free_count(host_pool), kvc_gpu_pool_free_count(dev_pool));
    // Both pools filled the same pages in the same order: the whole pools are equal.
    uint8_t *a = malloc(pool_bytes), *b = malloc(pool_bytes);
    assert_non_null(a);
    assert_non_null(b);
    CK(cudaMemcpy(a, kvc_gpu_pool_base(host_pool), pool_bytes, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b, kvc_gpu_pool_base(dev_pool), pool_bytes, cudaMemcpyDeviceToHost));
    assert_memory_equal(a, b, pool_bytes);
    for (uint32_t l = 0; l < n_layers; l++)
        for (uint32_t h = 0; h < n_kv; h++)
            assert_int_equal(kvc_gpu_seq_n_tokens(hs, l, h), kvc_gpu_seq_n_tokens(ds, l, h));
    assert_int_equal(kvc_gpu_stage_fetch(stage, NULL, a, 1), FY_ERR_INVALID_ARG);
    uint8_t *big = NULL;
    assert_int_equal(kvc_cuda_frame_alloc(0, &big), FY_ERR_INVALID_ARG);
    assert_int_equal(kvc_cuda_frame_alloc(1 << 20, &big), FY_OK);
    kvc_cuda_frame_free(big);
    free(a);
    free(b);
    kvc_cuda_host_unregister(frame);
    free(frame);
    free(fetched);
    kvt_layer_free(&L);
    kvc_encoder_destroy(enc);
    kvc_gpu_stage_destroy(stage);
    kvc_gpu_seq_destroy(hs);
    kvc_gpu_seq_destroy(ds);
    kvc_gpu_pool_destroy(host_pool);
    kvc_gpu_pool_destroy(dev_pool);
}
#endif

int main(void)
{
#if !FY_HAVE_CUDA
    printf("SKIP: built without CUDA\n");
    return 77;
#else
    if (fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity),
        cmocka_unit_test(test_all_or_nothing),
        cmocka_unit_test(test_device_frames),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
#endif
}
