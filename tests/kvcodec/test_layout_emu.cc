// The GPU encoder's frame layout for short layers (kvcodec/layout_dev_int.h: plan_small_body,
// the body of plan_small_kernel) run on host threads (tests/kvcodec/cuda_emu.h) must write
// what the three-kernel form (maps_kernel, layout_kernel, scatter_kernel, emulated the same way,
// which Round 3-5 checked on the GPU against the CPU's frames) writes: the header and maps, the
// payload's work items and token lists, the per-head counts and run offsets, and the plan.
// Random choices over 1-8 and 48-64 heads and 1 to 2048 items, with every option, one option only,
// and evictions only. And the FP16 payload from such work items (f16_body): each token's K row then
// V row at its offset, nothing else written, aligned or not, head_dim 8 to 256, head-major and
// token-major rows, batches that end early.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <vector>

extern "C" {
#include <cmocka.h>

#include "../../kvcodec/kvcodec_int.h"
}

#include "cuda_emu.h"

#define OPT_MAX_KV 64
#include "../../kvcodec/layout_dev_int.h"

static uint64_t g_rng = 0x5851f42d4c957f2dULL;
static uint32_t rnd_below(uint32_t n)
{
    return (uint32_t)((emu_xorshift(&g_rng) >> 20) % n);
}

// Everything the layout writes, for one run.
struct layout_run {
    std::vector<uint8_t> out;
    std::vector<work_t> work;
    std::vector<uint32_t> tok;
    std::vector<unsigned long long> scnt, hcnt, runs;
    plan_dev_t plan;
    plan_args_t a;
};

static void setup(layout_run *r, const plan_args_t &proto, size_t items)
{
    r->a = proto;
    r->out.assign(KVC_FRAME_HEADER_BYTES + proto.maps_total, 0xee);
    r->work.assign(items, work_t{~0ull, ~0u, 0xffff, 0xff, 0xff});
    r->tok.assign(items, ~0u);
    r->scnt.assign(2 * (size_t)proto.n_kv * proto.n_seg * 8, ~0ull);
    r->hcnt.assign((size_t)proto.n_kv * 8, ~0ull);
    r->runs.assign((size_t)proto.n_kv * 8 * 3, ~0ull);
    memset(&r->plan, 0xee, sizeof r->plan);
    r->a.scnt = r->scnt.data();
    r->a.sbase = r->scnt.data() + (size_t)proto.n_kv * proto.n_seg * 8;
    r->a.hcnt = r->hcnt.data();
    r->a.runs = r->runs.data();
    r->a.work = r->work.data();
    r->a.tok = r->tok.data();
    r->a.plan = &r->plan;
    r->a.out = r->out.data();
}

static void check_layer(uint32_t n_kv, uint32_t n, int mode)
{
    const uint32_t d = 64, G = 32, P = 0;
    const size_t items = (size_t)n_kv * n;
    std::vector<uint8_t> choice(items);
    const int only = (int)rnd_below(KVC_OPT_COUNT);
    for (auto &c : choice)
        c = (uint8_t)(mode == 0 ? rnd_below(KVC_OPT_COUNT) : mode == 1 ? only : KVC_OPT_DROP);
    plan_args_t a;
    memset(&a, 0, sizeof a);
    a.n_kv = n_kv;
    a.n = n;
    a.d = d;
    a.G = G;
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        a.gsz[o] = kvc_group_tokens(o, G);
        a.gfix[o] = o == KVC_OPT_DROP ? 0 : kvc_group_bytes(o, d, 0, P);
        a.gtok[o] = o == KVC_OPT_DROP ? 0 : kvc_group_bytes(o, d, 1, P) - a.gfix[o];
        if (o == KVC_OPT_F16) {
            a.gfix[o] = 4ull * d;
            a.gtok[o] = 0;
        }
    }
    a.map_bytes = kvc_map_bytes(n);
    a.maps_total = FY_ALIGN_UP((size_t)n_kv * a.map_bytes, 8);
    for (int i = 0; i < KVC_FRAME_HEADER_BYTES; i++)
        a.hdr[i] = (uint8_t)rnd_below(256);
    a.choice = choice.data();
    a.n_seg = (n + LAYOUT_SEG - 1) / LAYOUT_SEG;
    assert_int_equal(a.n_seg, 1);

    layout_run three, one;
    setup(&three, a, items);
    setup(&one, a, items);
    // The three kernels: a block per head (one segment each), one block, a block per head.
    std::vector<std::vector<unsigned>> s_c(n_kv, std::vector<unsigned>(KVC_OPT_COUNT));
    emu_launch(
        n_kv, 256, [&] { maps_body(three.a, 0, blockIdx.x, s_c[blockIdx.x].data()); }, true);
    layout_smem_t lsm;
    emu_launch(1, LAYOUT_THREADS, [&] { layout_body(three.a, &lsm); });
    std::vector<std::vector<unsigned long long>> s_base(n_kv,
                                                        std::vector<unsigned long long>(8));
    std::vector<std::vector<unsigned>> s_w(n_kv, std::vector<unsigned>(8 * KVC_OPT_COUNT));
    emu_launch(
        n_kv, 256,
        [&] {
            scatter_body(three.a, 0, blockIdx.x,
                         (unsigned(*)[KVC_OPT_COUNT])s_w[blockIdx.x].data(),
                         s_base[blockIdx.x].data());
        },
        true);
    // The one-block form.
    plan_small_smem_t *sm = new plan_small_smem_t;
    emu_launch(1, LAYOUT_THREADS, [&] { plan_small_body(one.a, sm); });
    delete sm;

    assert_memory_equal(one.out.data(), three.out.data(), one.out.size());
    assert_memory_equal(&one.plan, &three.plan, sizeof one.plan);
    assert_memory_equal(one.hcnt.data(), three.hcnt.data(), one.hcnt.size() * 8);
    assert_memory_equal(one.runs.data(), three.runs.data(), one.runs.size() * 8);
    assert_memory_equal(one.scnt.data(), three.scnt.data(), one.scnt.size() * 8);
    assert_true(three.plan.n_work <= items);
    assert_memory_equal(one.work.data(), three.work.data(), three.plan.n_work * sizeof(work_t));
    assert_memory_equal(one.tok.data(), three.tok.data(), items * sizeof(uint32_t));
    // The runs and the plan as plan_payload lays them out, walked serially on the host.
    {
        const unsigned long long n_f16 = three.plan.tokens[KVC_OPT_F16];
        const unsigned long long head = KVC_FRAME_HEADER_BYTES + a.maps_total;
        unsigned long long o_off = head, o_f16 = 0, o_q = n_f16, o_tok = 0;
        for (uint32_t h = 0; h < n_kv; h++) {
            for (int o = 0; o < KVC_OPT_DROP; o++) {
                const unsigned long long cnt = three.hcnt[(size_t)h * 8 + o];
                const unsigned long long *r = &three.runs[((size_t)h * 8 + o) * 3];
                assert_int_equal(r[0], o_off);
                o_off += kvc_run_bytes(o, d, G, P, cnt);
                if (o == KVC_OPT_F16) {
                    assert_int_equal(r[1], o_f16);
                    o_f16 += cnt;
                } else {
                    assert_int_equal(r[1], o_q);
                    assert_int_equal(r[2], o_tok);
                    o_q += (cnt + G - 1) / G;
                    o_tok += cnt;
                }
            }
        }
        assert_int_equal(three.plan.n_f16, n_f16);
        assert_int_equal(three.plan.n_work, o_q);
        assert_int_equal(three.plan.body, o_off);
        assert_int_equal(three.plan.total, o_off + 4);
        unsigned long long payload = 0, total = 0;
        memcpy(&payload, &three.out[48], 8); // little-endian hosts
        memcpy(&total, &three.out[56], 8);
        assert_int_equal(payload, o_off - head);
        assert_int_equal(total, o_off + 4);
    }
    // The layout itself: every FP16 token and every quantized token placed once.
    unsigned long long placed = 0;
    for (int o = 0; o < KVC_OPT_DROP; o++)
        placed += three.plan.tokens[o];
    unsigned long long want = 0;
    for (uint8_t c : choice)
        want += c != KVC_OPT_DROP;
    assert_int_equal(placed, want);
}

static void test_layouts(void **state)
{
    (void)state;
    for (int i = 0; i < 21; i++) {
        // The last: OPT_MAX_KV heads of a few tokens, more runs than the layout block's threads.
        const uint32_t n_kv = i == 20 ? OPT_MAX_KV : 1 + rnd_below(8);
        const uint32_t cap = 2048 / n_kv;
        const uint32_t n = i == 20 ? 5 : i % 6 == 0 ? cap : 1 + rnd_below(i % 2 ? 70 : cap);
        check_layer(n_kv, n, i % 10 == 3 ? 1 : i % 10 == 7 ? 2 : 0);
    }
}

// f16_body over n_work random FP16 items of n_kv heads x n tokens at head_dim d, packed from a
// payload offset `base` (8-byte aligned in frames; otherwise the any-alignment path), with rows
// head-major (token_major false: hs = n d, ts = d) or token-major (hs = d, ts = n_kv d), on
// `blocks` blocks of 64 threads.
static void check_f16(uint32_t n_kv, uint32_t n, uint32_t d, size_t n_work, size_t base,
                      bool token_major, unsigned blocks)
{
    std::vector<uint16_t> k((size_t)n_kv * n * d + 8), v(k.size());
    for (size_t i = 0; i < k.size(); i++) {
        k[i] = (uint16_t)rnd_below(65536);
        v[i] = (uint16_t)rnd_below(65536);
    }
    const size_t hs = token_major ? d : (size_t)n * d, ts = token_major ? (size_t)n_kv * d : d;
    std::vector<work_t> work(n_work + 1, work_t{~0ull, ~0u, 0xffff, 0xff, 0xff});
    for (size_t i = 0; i < n_work; i++)
        work[i] = work_t{base + i * 4 * d, rnd_below(n), (uint16_t)rnd_below(n_kv), KVC_OPT_F16, 0};
    std::vector<uint64_t> out_v((base + n_work * 4 * d + 64) / 8 + 1);
    uint8_t *out = (uint8_t *)out_v.data();
    const size_t out_bytes = out_v.size() * 8;
    memset(out, 0xee, out_bytes);
    emu_launch(blocks, 64, [&] {
        f16_body(work.data(), n_work, k.data(), v.data(), hs, ts, d, out,
                 (size_t)blockIdx.x * 2 + threadIdx.x / 32, (size_t)gridDim.x * 2);
    });
    for (size_t i = 0; i < n_work; i++) {
        const size_t row = (size_t)work[i].head * hs + (size_t)work[i].tok * ts;
        assert_memory_equal(out + work[i].out_off, &k[row], 2 * (size_t)d);
        assert_memory_equal(out + work[i].out_off + 2 * d, &v[row], 2 * (size_t)d);
    }
    for (size_t b = 0; b < out_bytes; b++)
        if (b < base || b >= base + n_work * 4 * d)
            assert_int_equal(out[b], 0xee);
}

static void test_f16_payload(void **state)
{
    (void)state;
    const uint32_t dims[] = {8, 32, 64, 96, 128, 136, 256};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        const uint32_t d = dims[i];
        check_f16(3, 50, d, 1 + rnd_below(150), 8 * rnd_below(40), i % 2 == 0, 1 + rnd_below(3));
        check_f16(2, 40, d, 37, 2 + 2 * rnd_below(8) + (i % 2) * 1, i % 2 == 1, 2);
    }
    check_f16(1, 9, 128, 4, 0, false, 1);  // one whole batch
    check_f16(1, 9, 128, 3, 16, false, 1); // one batch that ends early
    check_f16(4, 300, 128, 1200, 40, true, 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layouts),
        cmocka_unit_test(test_f16_payload),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
