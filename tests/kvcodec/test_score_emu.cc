// The tail of the GPU's token scoring for short prompts (kvcodec/score_dev_int.h:
// score_tail_small, the body of score_tail_small_kernel) run on 256 host threads
// (tests/kvcodec/cuda_emu.h). From the attention kernel's window_attn it must give the CPU's
// kvc_score bit for bit (importance, obar, qsq, head classes), as the per-step kernels do; from
// window queries (the attention sums given) the same values as the per-element functions the
// per-step kernels run. Shapes of 1-4 kv heads, GQA groups of 1-4, 1 to 2048 items, head_dim
// 32-128; mean and max reduction, pooling 1-7, HybridKV on and off. And obar_tile_body, the
// window output of longer prompts, against score.c's sum. And the layout of the window queries'
// tensor-core fragments (sc_frag_make).
#include <math.h>
#include <pthread.h>
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

static inline float fy_dev_h2f(uint16_t h)
{
    return fy_fp16_to_fp32(h); // the device's conversion, bit for bit (common/half_cuda.h)
}
// The device's conversion for values only computed with (a NaN's payload aside, the same).
static inline float fy_dev_h2f_arith(uint16_t h)
{
    return fy_fp16_to_fp32(h);
}

// FP16 rounding to nearest, as __float2half_rn (common.h's conversion).
static inline float sc_half_round(float x)
{
    return fy_fp16_to_fp32(fy_fp32_to_fp16(x));
}
static inline uint32_t sc_half_pack(float x, float y)
{
    return (uint32_t)fy_fp32_to_fp16(x) | (uint32_t)fy_fp32_to_fp16(y) << 16;
}

#include "../../kvcodec/score_dev_int.h"

static uint64_t g_rng = 0x0123456789abcdefULL;
static uint32_t rnd_below(uint32_t n)
{
    return (uint32_t)((emu_xorshift(&g_rng) >> 20) % n);
}
static float rnd01()
{
    return (float)rnd_below(1u << 24) / (float)(1u << 24);
}

struct shape_t {
    uint32_t n_kv, grp, n, d, W;
    kvc_policy_t pol;
};

static shape_t random_shape(int i)
{
    shape_t s;
    memset(&s, 0, sizeof s);
    const uint32_t dims[] = {32, 64, 128};
    s.n_kv = 1 + rnd_below(4);
    s.grp = 1 + rnd_below(4);
    s.d = dims[rnd_below(3)];
    const uint32_t cap = SCORE_SMALL_ITEMS / s.n_kv;
    s.n = i % 5 == 0 ? cap : 1 + rnd_below(i % 2 ? 40 : cap);
    const uint32_t wmax = i % 3 == 0 ? 150 : 40; // past 64: qsq_one's widest batch
    s.W = 1 + rnd_below(s.n < wmax ? s.n : wmax);
    kvc_policy_t &p = s.pol;
    p.reduce = rnd_below(2) ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN;
    p.pool_kernel = 1 + 2 * rnd_below(4);
    p.hybrid_threshold = rnd_below(2) ? 0.3f : 0.0f;
    p.sinks = rnd_below(5);
    p.recent = rnd_below(9);
    p.importance = KVC_IMP_MEAN;
    return s;
}

// The arguments of a contiguous [n_kv][n][d] V (K, queries and attention set by the caller).
static score_args_t tail_args(const shape_t &s, const uint16_t *v)
{
    score_args_t a;
    memset(&a, 0, sizeof a);
    a.v = v;
    a.hs = (size_t)s.n * s.d;
    a.ts = s.d;
    a.n_heads = s.n_kv * s.grp;
    a.n_kv = s.n_kv;
    a.grp = s.grp;
    a.n = s.n;
    a.d = s.d;
    a.scale = 1.0f / sqrtf((float)s.d);
    return a;
}

static score_tail_t tail_of(const shape_t &s, int have_q)
{
    return {have_q,         s.pol.reduce == KVC_REDUCE_MAX, s.pol.hybrid_threshold > 0,
            s.pol.sinks,    s.pol.recent,                   s.pol.pool_kernel,
            s.pol.hybrid_threshold};
}

struct outputs_t {
    std::vector<float> imp, obar, qsq;
    std::vector<uint8_t> is_static;
};

// score_tail_small on one emulated block of 256 threads.
static outputs_t run_small(const score_args_t &a, const float *ah, const float *ah2,
                           const score_tail_t &p)
{
    outputs_t o;
    const size_t items = (size_t)a.n_kv * a.n, chans = (size_t)a.n_kv * a.d;
    o.imp.assign(items, -1.0f);
    o.obar.assign(chans, -1.0f);
    o.qsq.assign(chans, -1.0f);
    o.is_static.assign(a.n_kv, 0xee);
    std::vector<float> sm(2 * items, NAN); // the kernel's dynamic shared memory
    emu_launch(1, 256, [&] {
        score_tail_small(a, ah, ah2, p, sm.data(), sm.data() + items, o.qsq.data(), o.obar.data(),
                         o.is_static.data(), o.imp.data());
    });
    return o;
}

// From window_attn: the CPU's kvc_score, bit for bit.
static void test_from_window_attn(void **state)
{
    (void)state;
    for (int i = 0; i < 24; i++) {
        shape_t s = random_shape(i);
        const uint32_t n_heads = s.n_kv * s.grp;
        std::vector<uint16_t> k((size_t)s.n_kv * s.n * s.d), v(k.size());
        for (size_t j = 0; j < v.size(); j++) {
            k[j] = fy_fp32_to_fp16(rnd01() - 0.5f);
            v[j] = fy_fp32_to_fp16(4.0f * rnd01() - 2.0f);
        }
        std::vector<float> wa((size_t)n_heads * s.n);
        for (size_t j = 0; j < wa.size(); j++)
            wa[j] = j % 17 == 0 ? 1.5f : rnd01() * rnd01(); // a few out of range: kept sane
        kvc_layer_input_t in;
        memset(&in, 0, sizeof in);
        in.k = k.data();
        in.v = v.data();
        in.head_stride = (size_t)s.n * s.d;
        in.token_stride = s.d;
        in.window_attn = wa.data();
        kvc_scores_t cpu;
        assert_int_equal(kvc_scores_init(&cpu, s.n_kv, s.n, s.d), FY_OK);
        assert_int_equal(kvc_score(&s.pol, n_heads, s.n_kv, s.n, s.d, &in, &cpu), FY_OK);

        score_args_t a = tail_args(s, v.data());
        a.k = k.data();
        a.wa = wa.data();
        const score_tail_t p = tail_of(s, 0);
        outputs_t o = run_small(a, NULL, NULL, p);
        const size_t items = (size_t)s.n_kv * s.n, chans = (size_t)s.n_kv * s.d;
        if (memcmp(o.imp.data(), cpu.importance, items * sizeof(float)) != 0)
            print_error("shape %u x %u x %u, d %u: importance differs\n", s.n_kv, s.grp, s.n, s.d);
        assert_memory_equal(o.imp.data(), cpu.importance, items * sizeof(float));
        assert_memory_equal(o.obar.data(), cpu.obar, chans * sizeof(float));
        assert_memory_equal(o.qsq.data(), cpu.qsq, chans * sizeof(float));
        assert_memory_equal(o.is_static.data(), cpu.is_static, s.n_kv);
        kvc_scores_cleanup(&cpu);
    }
}

// From window queries (the attention kernels' sums given): the per-element functions, each
// element on its own, as the per-step kernels compute them; and the mean squared query against
// score.c's sum (windows of up to 150 rows: every batch width of qsq_one).
static void test_from_queries(void **state)
{
    (void)state;
    for (int i = 0; i < 16; i++) {
        shape_t s = random_shape(i);
        const uint32_t n_heads = s.n_kv * s.grp;
        std::vector<uint16_t> v((size_t)s.n_kv * s.n * s.d);
        for (auto &x : v)
            x = fy_fp32_to_fp16(4.0f * rnd01() - 2.0f);
        std::vector<float> q((size_t)n_heads * s.W * s.d), ah((size_t)n_heads * s.n),
            ah2(ah.size());
        for (auto &x : q)
            x = 2.0f * rnd01() - 1.0f;
        for (size_t j = 0; j < ah.size(); j++) {
            ah[j] = rnd01() * rnd01();
            ah2[j] = rnd01();
        }
        score_args_t a = tail_args(s, v.data());
        a.q = q.data();
        a.W = a.qs = s.W;
        const score_tail_t p = tail_of(s, 1);
        const float *a2 = i % 2 ? ah2.data() : NULL;
        outputs_t o = run_small(a, ah.data(), a2, p);
        const size_t items = (size_t)s.n_kv * s.n, chans = (size_t)s.n_kv * s.d;
        std::vector<float> pbar(items), acc(items);
        for (size_t j = 0; j < items; j++)
            group_one(a, j, ah.data(), a2, 1, p.reduce_max, &pbar[j], &acc[j]);
        for (size_t j = 0; j < chans; j++) {
            // score.c's mean squared query: heads of the group, then window rows, in order.
            const uint32_t g = (uint32_t)(j / s.d), c = (uint32_t)(j % s.d);
            float cpu_q = 0;
            for (uint32_t hh = 0; hh < s.grp; hh++)
                for (uint32_t w = 0; w < s.W; w++) {
                    const float x = q[((size_t)(g * s.grp + hh) * s.W + w) * s.d + c];
                    cpu_q += x * x;
                }
            cpu_q = cpu_q * (1.0f / ((float)s.grp * (float)s.W)) * a.scale * a.scale;
            const float want_q = qsq_one(a, j);
            assert_memory_equal(&want_q, &cpu_q, sizeof(float));
            const float want_o = obar_one(a, pbar.data(), (uint32_t)(j / s.d), (uint32_t)(j % s.d));
            assert_memory_equal(&o.qsq[j], &want_q, sizeof(float));
            assert_memory_equal(&o.obar[j], &want_o, sizeof(float));
        }
        for (uint32_t g = 0; g < s.n_kv; g++)
            assert_int_equal(o.is_static[g], static_one(a, pbar.data(), p.static_active, p.sinks,
                                                        p.recent, p.threshold, g));
        for (size_t j = 0; j < items; j++) {
            const float want = pool_one(a, acc.data(), p.pool_kernel, j);
            assert_memory_equal(&o.imp[j], &want, sizeof(float));
        }
    }
}

// obar_tile_body (score.cu's obar_tile_kernel for prompts past the small tail) on emulated
// blocks of 256 threads against score.c's serial sum: head_dim not a multiple of 32, partial
// and whole tiles, strided rows, a chain of several tiles with the loads of the next in flight.
static void test_obar_tiles(void **state)
{
    (void)state;
    const uint32_t dims[] = {32, 80, 128}, lens[] = {1, 127, 128, 129, 300, 1000};
    for (uint32_t di = 0; di < 3; di++)
        for (uint32_t li = 0; li < 6; li++) {
            const uint32_t d = dims[di], n = lens[li], n_kv = 1 + (di + li) % 3;
            const size_t ts = d + 8, hs = ts * n + 16;
            std::vector<uint16_t> v(hs * n_kv);
            for (auto &x : v)
                x = fy_fp32_to_fp16(2.0f * rnd01() - 1.0f);
            std::vector<float> pbar((size_t)n_kv * n);
            for (auto &x : pbar)
                x = rnd01() / (float)n;
            score_args_t a;
            memset(&a, 0, sizeof a);
            a.v = v.data();
            a.hs = hs;
            a.ts = ts;
            a.n_kv = n_kv;
            a.n = n;
            a.d = d;
            const uint32_t blocks = n_kv * ((d + 31) / 32);
            std::vector<float> obar((size_t)n_kv * d, NAN), tiles((size_t)blocks * 2 * OBAR_T * 33);
            emu_launch(
                blocks, OBAR_THREADS,
                [&] {
                    float(*tile)[OBAR_T][33] =
                        (float(*)[OBAR_T][33])(tiles.data() + (size_t)blockIdx.x * 2 * OBAR_T * 33);
                    obar_tile_body(a, pbar.data(), obar.data(), tile);
                },
                true);
            for (uint32_t g = 0; g < n_kv; g++)
                for (uint32_t c = 0; c < d; c++) {
                    float want = 0; // score.c: obar[c] += p * vr[c], tokens in order
                    for (uint32_t t = 0; t < n; t++)
                        want += pbar[(size_t)g * n + t] *
                                fy_fp16_to_fp32(v[(size_t)g * hs + (size_t)t * ts + c]);
                    const float got = obar[(size_t)g * d + c], one = obar_one(a, pbar.data(), g, c);
                    if (memcmp(&got, &want, sizeof got) != 0 ||
                        memcmp(&one, &want, sizeof one) != 0)
                        fail_msg("d %u n %u n_kv %u: obar[%u][%u] is %.9g (obar_one %.9g), the "
                                 "CPU's %.9g",
                                 d, n, n_kv, g, c, (double)got, (double)one, (double)want);
                }
        }
}

// The window queries' tensor-core fragments (sc_frag_make, the body of sc_frag_kernel): for
// every query head, m-tile, k step and lane, at sc_frag_at, the FP16 high part of scale x q and
// the FP16 of what it leaves, for the rows and channels mma.m16n8k16's A layout gives that lane
// and register, zeros past the window and the head; and every entry written once.
static void test_window_fragments(void **state)
{
    (void)state;
    const uint32_t shapes[][3] = {{2, 128, 128}, {3, 37, 64}, {1, 16, 72}, {4, 9, 32}};
    for (const auto &sh : shapes) {
        const uint32_t n_heads = sh[0], W = sh[1], d = sh[2], MT = (W + 15) / 16;
        std::vector<float> q((size_t)n_heads * W * d);
        for (auto &x : q)
            x = 8.0f * rnd01() - 4.0f;
        score_args_t a;
        memset(&a, 0, sizeof a);
        a.q = q.data();
        a.n_heads = n_heads;
        a.W = a.qs = W;
        a.d = d;
        a.scale = 1.0f / sqrtf((float)d);
        const size_t n = (size_t)n_heads * MT * SC_KS * 32;
        std::vector<sc_frag_t> frag(n);
        memset(frag.data(), 0xee, n * sizeof(sc_frag_t));
        emu_launch(n_heads * MT, 32, [&] {
            sc_frag_make(a, blockIdx.x / MT, blockIdx.x % MT, threadIdx.x, frag.data());
        });
        for (uint32_t h = 0; h < n_heads; h++)
            for (uint32_t mt = 0; mt < MT; mt++)
                for (uint32_t s = 0; s < SC_KS; s++)
                    for (uint32_t lane = 0; lane < 32; lane++) {
                        const sc_frag_t &f = frag[sc_frag_at(W, h, mt, s, lane)];
                        const uint32_t got_hi[4] = {f.hi.x, f.hi.y, f.hi.z, f.hi.w};
                        const uint32_t got_lo[4] = {f.lo.x, f.lo.y, f.lo.z, f.lo.w};
                        for (int r = 0; r < 4; r++) {
                            const uint32_t w = 16 * mt + lane / 4 + 8 * (r & 1);
                            const uint32_t c = 16 * s + 2 * (lane % 4) + 8 * (r >> 1);
                            uint32_t want_hi = 0, want_lo = 0;
                            for (int e = 0; e < 2; e++) {
                                float x = 0.0f;
                                if (w < W && c + e < d)
                                    x = q[((size_t)h * W + w) * d + c + e] * a.scale;
                                const uint16_t hi = fy_fp32_to_fp16(x);
                                want_hi |= (uint32_t)hi << (16 * e);
                                want_lo |= (uint32_t)fy_fp32_to_fp16(x - fy_fp16_to_fp32(hi))
                                           << (16 * e);
                            }
                            assert_int_equal(got_hi[r], want_hi);
                            assert_int_equal(got_lo[r], want_lo);
                        }
                    }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_from_window_attn),
        cmocka_unit_test(test_from_queries),
        cmocka_unit_test(test_obar_tiles),
        cmocka_unit_test(test_window_fragments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
