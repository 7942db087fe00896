// The GPU encoder's option choice (kvcodec/choose_dev_int.h: choose_body, the body of
// choose_kernel) run on the host: a grid of blocks of warps on host threads, every
// __syncthreads, grid barrier and warp intrinsic emulated, each block with its own shared
// arrays. Over random layers (shapes, policies, pins, budgets, the rate controller's state) it
// must end where the serial optimizer written beside it ends (one multiplier measured at a
// time, as encode.c's kvc_encoder_choose): the same multiplier, flags, frame bytes and target,
// the same choice and cheapest choice of every item, and the same counts for the greedy fill.
// Grids of one to three blocks of one to three warps, layers whose warps span two heads.
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <vector>

extern "C" {
#include <cmocka.h>

#include "../../kvcodec/kvcodec_int.h"
}

#include "cuda_emu.h"

#include "../../kvcodec/choose_dev_int.h"

// ---- The serial optimizer (kvc_encoder_choose's order of decisions), over the same items.

struct ref_result {
    double lambda;
    int budget_met, need_greedy;
    unsigned long long total, target;
    std::vector<uint8_t> choice, tmp;
    std::vector<long long> gcnt;
};

static unsigned long long ref_bytes(const opt_args_t &a, const uint8_t *ch,
                                    std::vector<long long> *cnt_out)
{
    std::vector<long long> cnt((size_t)a.n_kv * 8, 0);
    for (size_t i = 0; i < a.n_items; i++)
        cnt[(i / a.n) * 8 + ch[i]]++;
    unsigned long long total = a.fixed;
    for (size_t j = 0; j < cnt.size(); j++)
        if (j % 8 < KVC_OPT_DROP)
            total += run_bytes(a, (int)(j % 8), (unsigned long long)cnt[j]);
    if (cnt_out != NULL)
        *cnt_out = cnt;
    return total;
}

static void ref_assign(const opt_args_t &a, double lambda, uint8_t *out)
{
    for (size_t i = 0; i < a.n_items; i++)
        out[i] = (uint8_t)assign_d(a, a.dist + i * KVC_OPT_COUNT, a.allowed[i], lambda);
}

static void ref_cheap(const opt_args_t &a, bool allow_drop, uint8_t *out)
{
    for (size_t i = 0; i < a.n_items; i++)
        out[i] = (uint8_t)cheapest_one(a, i, allow_drop);
}

static ref_result ref_choose(const opt_args_t &a)
{
    ref_result r = {};
    r.choice.assign(a.n_items, 0);
    r.tmp.assign(a.n_items, 0);
    std::vector<uint8_t> scratch(a.n_items);
    const unsigned long long spent = a.rc->spent;
    const double lambda_prev = a.rc->lambda_prev;
    const double remain =
        a.no_budget ? 0 : (double)(a.total_budget - min(spent, a.total_budget));
    const double share = a.share_left > 0 ? remain * a.share_w / a.share_left
                         : a.r > 0        ? remain / (double)a.r
                                          : 0;
    for (int pins = KVC_PINS_ALL; pins >= KVC_PINS_NONE; pins--) {
        for (size_t it = 0; it < a.n_items; it++)
            build_item(a, it, pins);
        if (a.no_budget) {
            ref_cheap(a, false, r.choice.data());
            r.budget_met = 1;
            break;
        }
        ref_cheap(a, true, r.tmp.data());
        double floor_l = (double)ref_bytes(a, r.tmp.data(), NULL);
        double cap = remain - (double)(a.r - 1) * floor_l;
        if (a.r > 1) {
            double c2 = share * (1 + a.flex);
            cap = cap < c2 ? cap : c2;
        }
        if (floor_l > cap) {
            if (pins > KVC_PINS_NONE)
                continue;
            r.choice = r.tmp;
            r.budget_met = floor_l <= remain;
            break;
        }
        bool accepted = false;
        if (lambda_prev >= 0 && a.r > 1) {
            ref_assign(a, lambda_prev, r.choice.data());
            double x = (double)ref_bytes(a, r.choice.data(), NULL);
            const double top =
                (double)(a.fixed + a.n_items * (a.gfix[KVC_OPT_F16] + a.gtok[KVC_OPT_F16]));
            if (x <= cap && x >= share * (1 - a.flex) && x >= remain - (double)(a.r - 1) * top) {
                accepted = true;
                r.lambda = lambda_prev;
            }
        }
        if (!accepted) {
            double tgt = a.r > 1 ? (share < cap ? share : cap) : remain;
            unsigned long long target = (unsigned long long)tgt;
            kvc_ms_t ms;
            kvc_ms_init(&ms, lambda_prev);
            double l;
            while (kvc_ms_next(&ms, &l)) {
                ref_assign(a, l, scratch.data());
                kvc_ms_step(&ms, ref_bytes(a, scratch.data(), NULL) <= target);
            }
            if (ms.phase == KVC_MS_ZERO) {
                ref_assign(a, 0, r.choice.data());
                r.lambda = 0;
            } else {
                double hi = kvc_ms_result(&ms);
                ref_assign(a, hi, r.choice.data());
                unsigned long long x = ref_bytes(a, r.choice.data(), NULL);
                if (x > target) {
                    ref_cheap(a, true, r.choice.data());
                    x = ref_bytes(a, r.choice.data(), NULL);
                }
                ref_bytes(a, r.choice.data(), &r.gcnt);
                r.need_greedy = 1;
                r.total = x;
                r.target = target;
                r.lambda = hi;
            }
        }
        r.budget_met = 1;
        break;
    }
    return r;
}

// The CPU encoder's greedy_fill on the choice r made: two passes over the candidates (each
// item's best upgrade per byte), best first, taking each whose exact byte change fits.
static void ref_greedy(const opt_args_t &a0, ref_result *r)
{
    opt_args_t a = a0;
    a.choice = r->choice.data();
    std::vector<long long> cnt;
    long long total = (long long)ref_bytes(a, a.choice, &cnt);
    const long long target = (long long)r->target;
    for (int pass = 0; pass < 2; pass++) {
        std::vector<uint32_t> key(a.n_items), idx;
        std::vector<uint8_t> to(a.n_items);
        for (size_t i = 0; i < a.n_items; i++) {
            key[i] = greedy_cand(a, i, &to[i]);
            if (key[i] != 0)
                idx.push_back((uint32_t)i);
        }
        if (idx.empty())
            break;
        std::sort(idx.begin(), idx.end(), [&](uint32_t x, uint32_t y) {
            return key[x] != key[y] ? key[x] > key[y] : x < y;
        });
        for (uint32_t i : idx) {
            const int cur = a.choice[i], t = to[i];
            long long *c = cnt.data() + (i / a.n) * 8;
            const long long delta = (long long)run_bytes(a, t, (unsigned long long)c[t] + 1) -
                                    (long long)run_bytes(a, t, (unsigned long long)c[t]) +
                                    (long long)run_bytes(a, cur, (unsigned long long)c[cur] - 1) -
                                    (long long)run_bytes(a, cur, (unsigned long long)c[cur]);
            if (total + delta <= target) {
                total += delta;
                c[t]++;
                c[cur]--;
                a.choice[i] = (uint8_t)t;
            }
        }
    }
    r->total = (unsigned long long)total;
    r->gcnt = cnt;
}

// dist_kernel's and dist_final_kernel's sum of the choice's distortions, in their order.
static double ref_dist(const opt_args_t &a, const uint8_t *choice)
{
    const size_t n_parts = std::max<size_t>(std::min<size_t>((a.n_items + 255) / 256, DIST_BLOCKS), 1);
    std::vector<double> parts(DIST_BLOCKS, 0.0);
    for (size_t b = 0; b < n_parts; b++) {
        double part[256];
        for (size_t t = 0; t < 256; t++) {
            double x = 0;
            for (size_t i = b * 256 + t; i < a.n_items; i += n_parts * 256)
                x = x + (double)a.dist[i * KVC_OPT_COUNT + choice[i]];
            part[t] = x;
        }
        for (size_t w = 128; w > 0; w /= 2)
            for (size_t t = 0; t < w; t++)
                part[t] = part[t] + part[t + w];
        parts[b] = part[0];
    }
    for (size_t w = DIST_BLOCKS / 2; w > 0; w /= 2)
        for (size_t t = 0; t < w; t++)
            parts[t] = parts[t] + parts[t + w];
    return parts[0];
}

// ---- Random layers.

static uint64_t g_rng = 0x243f6a8885a308d3ULL;
static uint64_t rnd()
{
    return emu_xorshift(&g_rng);
}
static double rnd01()
{
    return (double)(rnd() >> 11) / 9007199254740992.0;
}
static uint32_t rnd_below(uint32_t n)
{
    return (uint32_t)(rnd() % n);
}

struct layer_t {
    opt_args_t a;
    rc_dev_t rc;
    opt_out_t out;
    std::vector<float> imp, tab, dev_mean, dist;
    std::vector<uint8_t> is_static, backbone, opt8;
    std::vector<unsigned long long> cnt;
    std::vector<long long> gcnt;
};

// A layer of n_kv heads x n tokens, head_dim d, group G, under a random policy and budget.
static void make_layer(layer_t *L, uint32_t n_kv, uint32_t n)
{
    const uint32_t d = 64, G = 32, P = 0;
    opt_args_t &a = L->a;
    memset(&a, 0, sizeof a);
    a.n_kv = n_kv;
    a.n = n;
    a.G = G;
    a.n_items = (size_t)n_kv * n;
    a.tree = 1 + (int)rnd_below(OPT_SLOTS); // every width of a pass's search tree: one choice
    const uint32_t pol = rnd_below(4);
    a.dist_kind = pol == 0 ? KVC_DIST_POSITION : pol == 1 ? KVC_DIST_MODEL : KVC_DIST_TRIAL;
    a.measured = a.dist_kind != KVC_DIST_POSITION;
    a.joint_kv = (int)rnd_below(2);
    a.stat_on = (int)rnd_below(2);
    a.hybrid_factor = 0.25f;
    a.sinks = rnd_below(3) == 0 ? 0 : rnd_below(8);
    a.pins_kept = (int)(a.tree % 2); // (no draw: the layers stay as they were)
    a.recent = rnd_below(3) == 0 ? 0 : rnd_below(n / 2 + 1);
    a.pins_ok = 1;
    uint32_t opts = KVC_OPT_BIT(KVC_OPT_F16);
    for (int o = 1; o < KVC_OPT_COUNT; o++)
        if (rnd_below(3) != 0)
            opts |= KVC_OPT_BIT(o);
    if (opts == KVC_OPT_BIT(KVC_OPT_F16))
        opts |= KVC_OPT_BIT(KVC_OPT_Q4);
    a.options = opts;
    a.backbone_opt = rnd_below(2) ? KVC_OPT_Q8 : KVC_OPT_F16;
    a.prior = a.measured ? (float)(0.1 / n) : 0.0f;
    a.drop_spread = a.measured && a.tree > OPT_SLOTS / 2 ? 1.0f : 0.0f; // (no draw, as above)
    a.need8 = (opts & KVC_OPT_BIT(KVC_OPT_Q8)) != 0;
    a.need4 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_Q4V2))) != 0;
    a.needv4 = (opts & KVC_OPT_BIT(KVC_OPT_Q4)) != 0;
    a.need2 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4V2) | KVC_OPT_BIT(KVC_OPT_Q2))) != 0;
    a.needk2 = (opts & KVC_OPT_BIT(KVC_OPT_Q2)) != 0;
    a.flex = rnd_below(2) ? 0.1 : 0.25;
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        uint32_t gs = kvc_group_tokens(o, G);
        a.gsz[o] = gs;
        if (o == KVC_OPT_DROP) {
            a.gfix[o] = a.gtok[o] = 0;
        } else if (o == KVC_OPT_F16) {
            a.gfix[o] = 4ull * d;
            a.gtok[o] = 0;
        } else {
            a.gfix[o] = kvc_group_bytes(o, d, 0, P);
            a.gtok[o] = kvc_group_bytes(o, d, 1, P) - a.gfix[o];
        }
        // Amortized bytes per token, the optimizer's cost; a rank penalty for the unmeasured.
        a.cost[o] = o == KVC_OPT_DROP ? 0.0f : (float)(a.gfix[o] + gs * a.gtok[o]) / (float)gs;
        a.pen[o] = (float)(o * o) * 0.01f;
    }
    a.fixed = KVC_FRAME_HEADER_BYTES + FY_ALIGN_UP((size_t)n_kv * kvc_map_bytes(n), 8) + 4;
    // Budget: this layer's share, from well below the cheapest choice to above FP16.
    const double fp16 = (double)a.fixed + (double)a.n_items * 4.0 * d;
    a.r = 1 + rnd_below(4);
    a.no_budget = rnd_below(12) == 0;
    const double frac = rnd_below(8) == 0 ? 0.01 : 0.05 + 1.2 * rnd01();
    L->rc.spent = rnd_below(3) == 0 ? 0 : (unsigned long long)(fp16 * rnd01());
    a.total_budget = (unsigned long long)(frac * fp16 * a.r) + L->rc.spent;
    a.share_w = 0;
    a.share_left = 0;
    if (rnd_below(3) == 0) { // weighted shares
        a.share_left = (double)a.r;
        a.share_w = 0.5 + rnd01();
    }
    const uint32_t lp = rnd_below(4);
    L->rc.lambda_prev = lp == 0 ? -1.0 : lp == 1 ? 0.0 : pow(10.0, -8.0 + 7.0 * rnd01());
    a.rc = &L->rc;
    // Inputs.
    L->imp.resize(a.n_items);
    for (auto &x : L->imp)
        x = (float)(rnd01() * rnd01());
    L->tab.resize((size_t)TAB_COUNT * a.n_items);
    for (auto &x : L->tab)
        x = (float)(rnd01() * 4.0);
    L->dev_mean.resize(n_kv);
    for (auto &x : L->dev_mean)
        x = (float)(0.5 + rnd01());
    L->is_static.resize(n_kv);
    for (auto &x : L->is_static)
        x = (uint8_t)rnd_below(2);
    L->backbone.resize(n);
    for (auto &x : L->backbone)
        x = rnd_below(16) == 0;
    a.imp = L->imp.data();
    a.tab = L->tab.data();
    a.dev_mean = L->dev_mean.data();
    a.is_static = L->is_static.data();
    a.backbone = L->backbone.data();
    // Work.
    L->dist.assign(a.n_items * KVC_OPT_COUNT, 0.0f);
    L->opt8.assign(4 * a.n_items, 0xee);
    L->cnt.assign(3 * (size_t)OPT_SLOTS * n_kv * 8, 0);
    L->gcnt.assign((size_t)n_kv * 8, -1);
    a.dist = L->dist.data();
    a.allowed = L->opt8.data();
    a.choice = a.allowed + a.n_items;
    a.tmp = a.allowed + 2 * a.n_items;
    a.cand_opt = a.allowed + 3 * a.n_items;
    a.cnt = L->cnt.data();
    a.gcnt = L->gcnt.data();
    memset(&L->out, 0, sizeof L->out);
    a.out = &L->out;
}

// The device optimizer's result (a.out) and choice equal the serial one's.
static void assert_same_result(const opt_args_t &a, const ref_result &ref)
{
    const opt_out_t &o = *a.out;
    assert_memory_equal(&o.lambda, &ref.lambda, sizeof(double));
    assert_int_equal(o.budget_met, ref.budget_met);
    assert_int_equal(o.need_greedy, ref.need_greedy);
    assert_int_equal(o.total, ref.total);
    assert_int_equal(o.target, ref.target);
    assert_memory_equal(a.choice, ref.choice.data(), a.n_items);
}

struct tally_t {
    int cases, accepted, solved, zero, floor_over, no_budget, retried, multi_block;
};

// The device optimizer on an emulated grid against the serial one; returns its multiplier.
static double check_layer(layer_t *L, unsigned blocks, unsigned threads, tally_t *t)
{
    opt_args_t &a = L->a;
    ref_result ref = ref_choose(a); // (fills a.dist and a.allowed, as the device does again)
    // As opt_enqueue before each launch: the count buffers cleared.
    std::fill(L->cnt.begin(), L->cnt.end(), 0ull);
    // Each block's shared arrays, allocated apart (an overrun is caught under ASan).
    std::vector<std::vector<unsigned>> s_cnt(blocks);
    std::vector<std::vector<unsigned long long>> s_tot(blocks);
    for (unsigned b = 0; b < blocks; b++) {
        s_cnt[b].assign((size_t)OPT_SLOTS * OPT_MAX_KV * 8, 0xdeadbeefu);
        s_tot[b].assign(OPT_SLOTS, 0xdeadbeefdeadbeefull);
    }
    emu_launch(blocks, threads, [&] {
        cg::grid_group grid;
        choose_body(a, &grid, s_cnt[blockIdx.x].data(), s_tot[blockIdx.x].data());
    });
    const opt_out_t &o = L->out;
    if (memcmp(&o.lambda, &ref.lambda, sizeof(double)) != 0)
        print_error("n_kv %u n %u grid %u x %u: lambda %.17g, serial %.17g (previous %.17g, r %u, "
                    "budget_met %d / %d, need_greedy %d / %d)\n",
                    a.n_kv, a.n, blocks, threads, o.lambda, ref.lambda, L->rc.lambda_prev, a.r,
                    o.budget_met, ref.budget_met, o.need_greedy, ref.need_greedy);
    assert_same_result(a, ref);
    if (!a.no_budget)
        assert_memory_equal(a.tmp, ref.tmp.data(), a.n_items);
    if (ref.need_greedy)
        assert_memory_equal(a.gcnt, ref.gcnt.data(), ref.gcnt.size() * sizeof(long long));
    t->cases++;
    t->no_budget += a.no_budget;
    t->accepted += !a.no_budget && !ref.need_greedy && ref.lambda == L->rc.lambda_prev &&
                   L->rc.lambda_prev >= 0 && ref.budget_met && a.r > 1;
    t->solved += ref.need_greedy;
    t->zero += !a.no_budget && !ref.need_greedy && ref.lambda == 0 && ref.budget_met &&
               L->rc.lambda_prev != 0;
    t->floor_over += !a.no_budget && !ref.need_greedy && ref.lambda == 0 && !ref.budget_met;
    t->multi_block += blocks > 1;
    return o.lambda;
}

static void test_random_layers(void **state)
{
    (void)state;
    tally_t t = {};
    const uint32_t heads[] = {1, 2, 3, 5, 8};
    const uint32_t toks[] = {1, 7, 29, 32, 45, 64, 100};
    for (int i = 0; i < 32; i++) {
        layer_t L;
        const uint32_t n_kv = heads[rnd_below(5)], n = toks[rnd_below(7)];
        make_layer(&L, n_kv, n);
        const unsigned blocks = 1 + rnd_below(3), threads = 32 * (1 + rnd_below(3));
        double lam = check_layer(&L, blocks, threads, &t);
        // The next layer's rate check at this multiplier, on the same items: often kept.
        if (!L.a.no_budget && lam > 0 && L.a.r > 1) {
            L.rc.lambda_prev = lam;
            check_layer(&L, blocks, threads, &t);
        }
    }
    print_message("%d layers: %d kept the previous multiplier, %d solved, %d without a budget, "
                  "%d on grids of more than one block\n",
                  t.cases, t.accepted, t.solved, t.no_budget, t.multi_block);
    // Every path of the optimizer was taken.
    assert_true(t.solved > 0);
    assert_true(t.accepted > 0);
    assert_true(t.no_budget > 0);
    assert_true(t.multi_block > 0);
    (void)t.zero;
    (void)t.floor_over;
}

// Budgets at the extremes: below the cheapest choice (pins retried, then the cheapest), and
// above FP16 (lambda 0).
static void test_extreme_budgets(void **state)
{
    (void)state;
    tally_t t = {};
    for (int i = 0; i < 12; i++) {
        layer_t L;
        make_layer(&L, 1 + rnd_below(4), 20 + rnd_below(60));
        L.a.no_budget = 0;
        L.a.r = 1;
        L.rc.spent = 0;
        const double fp16 = (double)L.a.fixed + (double)L.a.n_items * 4.0 * 64;
        L.a.total_budget = i % 2 == 0 ? (unsigned long long)(0.02 * fp16)
                                      : (unsigned long long)(2.0 * fp16);
        L.a.sinks = 4;
        L.a.recent = 8;
        if (i % 4 == 0) // nothing to evict: the cheapest choice can exceed the budget
            L.a.options &= ~KVC_OPT_BIT(KVC_OPT_DROP);
        check_layer(&L, 1 + (unsigned)(i % 2), 64, &t);
    }
    print_message("%d layers: %d at multiplier 0, %d at the cheapest choice over budget\n",
                  t.cases, t.zero, t.floor_over);
    assert_true(t.zero > 0);
    assert_true(t.floor_over > 0);
}

// The one-block optimizer (opt_small_body, opt_small_kernel: mean deviations, choice, greedy
// fill and distortion in one launch) against the serial optimizer and greedy fill.
static void test_small_layers(void **state)
{
    (void)state;
    tally_t t = {};
    int filled = 0, takes = 0;
    for (int i = 0; i < 16; i++) {
        layer_t L;
        const uint32_t n_kv = 1 + rnd_below(4), n = 8 + rnd_below(i % 4 == 0 ? 500 : 120);
        make_layer(&L, n_kv, n);
        if ((size_t)n_kv * n > OPT_ONE_BLOCK)
            continue;
        opt_args_t &a = L.a;
        // The means opt_small_body computes where the policy reads them, for the reference;
        // then cleared, so that the kernel has to compute them.
        const bool means = opt_need_dev_mean(a);
        if (means)
            for (uint32_t h = 0; h < n_kv; h++)
                L.dev_mean[h] = dev_mean_of(a.tab + (size_t)TAB_DEV * a.n_items + (size_t)h * n, n);
        const std::vector<float> want_mean = L.dev_mean;
        ref_result ref = ref_choose(a);
        const std::vector<uint8_t> before = ref.choice;
        if (ref.need_greedy && !a.no_budget)
            ref_greedy(a, &ref);
        const double want_dist = ref_dist(a, ref.choice.data());
        if (means)
            std::fill(L.dev_mean.begin(), L.dev_mean.end(), -1.0f);
        opt_small_smem_t *sm = new opt_small_smem_t;
        emu_launch(1, OPT_THREADS, [&] {
            opt_small_body(a, L.dev_mean.data(), sm);
        });
        delete sm;
        const opt_out_t &o = L.out;
        assert_same_result(a, ref);
        if (ref.need_greedy)
            assert_memory_equal(a.gcnt, ref.gcnt.data(), ref.gcnt.size() * sizeof(long long));
        assert_memory_equal(&o.dist, &want_dist, sizeof(double));
        assert_memory_equal(L.dev_mean.data(), want_mean.data(), n_kv * sizeof(float));
        t.cases++;
        filled += ref.need_greedy != 0;
        for (size_t k = 0; k < a.n_items; k++)
            takes += ref.need_greedy && before[k] != ref.choice[k];
    }
    print_message("%d one-block layers: %d filled the slack greedily, %d upgrades taken\n",
                  t.cases, filled, takes);
    assert_true(filled > 0);
    assert_true(takes > 0);
}

// A head's mean deviation by a block (dev_mean_block, dev_mean_kernel's) and by one thread
// (dev_mean_of) equal the CPU encoder's chunked sum (encode.c), bit for bit, at lengths around
// the chunk and the block's round of chunks; and they are the mean to within rounding.
static void test_dev_mean(void **state)
{
    (void)state;
    const uint32_t chunks = DEV_MEAN_THREADS * KVC_DEV_CHUNK;
    const uint32_t lens[] = {
        1,          7,      KVC_DEV_CHUNK - 1, KVC_DEV_CHUNK,    KVC_DEV_CHUNK + 1, 4099,
        chunks - 1, chunks, chunks + 1,        2 * chunks + 1000};
    for (uint32_t n : lens) {
        std::vector<float> dev(n);
        double naive = 0;
        for (auto &x : dev) {
            x = (float)(rnd01() * rnd01() * 50.0);
            naive += x;
        }
        double cpu = 0; // encode.c's build_items
        for (uint32_t c = 0; c < (n + KVC_DEV_CHUNK - 1) / KVC_DEV_CHUNK; c++)
            cpu += kvc_dev_chunk_sum(dev.data(), n, c);
        const float want = (float)(cpu / n);
        float got_block = -1.0f, got_one = -1.0f;
        double *part = new double[DEV_MEAN_THREADS];
        emu_launch(1, DEV_MEAN_THREADS, [&] {
            const float m = dev_mean_block(dev.data(), n, part);
            if (threadIdx.x == 0)
                got_block = m;
        });
        delete[] part;
        emu_launch(1, 1, [&] { got_one = dev_mean_of(dev.data(), n); });
        assert_memory_equal(&got_block, &want, sizeof(float));
        assert_memory_equal(&got_one, &want, sizeof(float));
        assert_true(fabs(want - naive / n) <= 1e-6 * (naive / n) + 1e-30);
    }
}

// Sets a's choice to the cheapest (drops where allowed) and the fill's bytes, counts and target
// to `room` bytes above it: a start far below the target, whatever the layer's budget was.
static void start_from_cheapest(layer_t *L, unsigned long long room)
{
    opt_args_t &a = L->a;
    ref_cheap(a, true, a.choice);
    std::vector<long long> cnt;
    const unsigned long long total = ref_bytes(a, a.choice, &cnt);
    memcpy(a.gcnt, cnt.data(), cnt.size() * sizeof(long long));
    L->out.total = total;
    L->out.target = total + room;
    L->out.need_greedy = 1;
}

// encode.cu's fill of a layer past GREEDY_CHUNK items, both passes, from a's choice, counts and
// bytes (a.gcnt, a.out): cand_body on a grid, the stable radix sort (a stable sort by key,
// descending, here), greedy_pass_body in one block of GREEDY_THREADS; the second pass's
// candidates and sort only where the first pass's seg_end says an upgrade still fits (an empty
// segment leaves the sorted arrays as they were). Returns seg_end; *far: the first pass took a
// candidate past 3 * GREEDY_THREADS in its list.
static int emu_two_pass_fill(opt_args_t &a, bool *far)
{
    const size_t items = a.n_items;
    const std::vector<uint8_t> before_fill(a.choice, a.choice + items);
    std::vector<uint32_t> keys(2 * items, 0xdeadbeefu), idx(2 * items, 0xdeadbeefu);
    std::vector<uint32_t> s_idx(GREEDY_CHUNK);
    std::vector<uint8_t> s_cur(GREEDY_CHUNK), s_to(GREEDY_CHUNK);
    greedy_state_t *st = new greedy_state_t;
    int seg[2] = {0, -7};
    *far = false;
    for (int pass = 0; pass < 2; pass++) {
        const std::vector<uint32_t> before(keys.begin(), keys.begin() + items);
        emu_launch(2, 64,
                   [&] { cand_body(a, keys.data(), idx.data(), pass == 0 ? NULL : &seg[1]); });
        if (pass == 1 && seg[1] == 0) // no candidate written: nothing reads them
            assert_memory_equal(keys.data(), before.data(), items * sizeof(uint32_t));
        const int end = pass == 0 ? (int)items : seg[1];
        if (end > 0) {
            assert_int_equal(end, (int)items);
            std::vector<uint32_t> order(idx.begin(), idx.begin() + items);
            std::stable_sort(order.begin(), order.end(),
                             [&](uint32_t x, uint32_t y) { return keys[x] > keys[y]; });
            for (size_t k = 0; k < items; k++) {
                idx[items + k] = order[k];
                keys[items + k] = keys[order[k]];
            }
        }
        emu_launch(1, GREEDY_THREADS, [&] {
            greedy_pass_body(a, st, keys.data() + items, idx.data() + items,
                             pass == 0 ? &seg[1] : NULL, s_idx.data(), s_cur.data(), s_to.data());
        });
        if (pass == 0) {
            assert_true(seg[1] == 0 || seg[1] == (int)items);
            // Whether the first pass took a candidate past 3 * GREEDY_THREADS in its list.
            for (size_t k = 3 * GREEDY_THREADS; k < items; k++) {
                const uint32_t it = idx[items + k];
                if (keys[items + k] != 0 && before_fill[it] != a.choice[it]) {
                    *far = true;
                    break;
                }
            }
        }
    }
    delete st;
    return seg[1];
}

// The greedy fill of layers past GREEDY_CHUNK items, as encode.cu runs it: cand_body on a grid,
// the stable radix sort (here a stable sort by key, descending), greedy_pass_body in one block
// of GREEDY_THREADS; then the second pass, whose candidates are written and sorted only where
// the first pass's seg_end says an upgrade still fits (an empty segment leaves the sorted
// arrays as they were). It must end where the CPU's two passes end: the same choice, counts
// and bytes. Both outcomes of the first pass occur.
static void test_two_pass_fill(void **state)
{
    (void)state;
    tally_t t = {};
    int fills = 0, second = 0, skipped = 0, big = 0, far = 0;
    for (int i = 0; i < 40; i++) {
        layer_t L;
        if (i % 4 == 3) // past GREEDY_CHUNK items: the walk goes over stages
            make_layer(&L, 2, GREEDY_CHUNK / 2 + 1 + rnd_below(600));
        else
            make_layer(&L, 1 + rnd_below(4), 20 + rnd_below(i % 2 ? 600 : 60));
        opt_args_t &a = L.a;
        check_layer(&L, 1 + rnd_below(2), 64, &t); // the choice the fill starts from
        if (a.no_budget)
            continue;
        if (i % 8 == 7) // room for a few hundred to a few thousand upgrades: walks go far
            start_from_cheapest(&L, (unsigned long long)((double)a.n_items * 64 * (0.2 + rnd01())));
        else if (!L.out.need_greedy)
            continue;
        ref_result ref;
        ref.choice.assign(a.choice, a.choice + a.n_items);
        ref.target = L.out.target;
        ref_greedy(a, &ref);
        bool went_far = false;
        const int seg_end = emu_two_pass_fill(a, &went_far);
        far += went_far;
        const size_t items = a.n_items;
        assert_memory_equal(a.choice, ref.choice.data(), items);
        assert_memory_equal(a.gcnt, ref.gcnt.data(), ref.gcnt.size() * sizeof(long long));
        assert_int_equal(L.out.total, ref.total);
        fills++;
        big += items > GREEDY_CHUNK;
        second += seg_end != 0;
        skipped += seg_end == 0;
    }
    print_message("%d fills: %d with a second pass, %d without; %d past %d items, %d walked "
                  "past its first %d candidates\n",
                  fills, second, skipped, big, GREEDY_CHUNK, far, 3 * GREEDY_THREADS);
    assert_true(second > 0);
    assert_true(skipped > 0);
    assert_true(big > 0);
    assert_true(far > 0);
}

// The same fill with room for every upgrade: both passes take every candidate, so the walk
// stages and takes all of a list longer than GREEDY_CHUNK.
static void test_fill_everything(void **state)
{
    (void)state;
    tally_t t = {};
    int filled = 0;
    for (int i = 0; i < 3; i++) {
        layer_t L;
        make_layer(&L, 2, GREEDY_CHUNK / 2 + 200 + rnd_below(400));
        opt_args_t &a = L.a;
        check_layer(&L, 2, 64, &t); // distortions and options
        // From the cheapest choice with room for all of it at FP16.
        start_from_cheapest(&L, (unsigned long long)a.n_items * 4 * 64);
        ref_result ref;
        ref.choice.assign(a.choice, a.choice + a.n_items);
        ref.target = L.out.target;
        ref_greedy(a, &ref);
        size_t taken = 0;
        for (size_t k = 0; k < a.n_items; k++)
            taken += ref.choice[k] != a.choice[k];
        bool went_far = false;
        emu_two_pass_fill(a, &went_far);
        assert_memory_equal(a.choice, ref.choice.data(), a.n_items);
        assert_memory_equal(a.gcnt, ref.gcnt.data(), ref.gcnt.size() * sizeof(long long));
        assert_int_equal(L.out.total, ref.total);
        assert_true(went_far);
        filled += taken > GREEDY_CHUNK;
    }
    print_message("%d of 3 layers changed more than %d items\n", filled, GREEDY_CHUNK);
    assert_true(filled > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_layers),   cmocka_unit_test(test_extreme_budgets),
        cmocka_unit_test(test_small_layers),    cmocka_unit_test(test_two_pass_fill),
        cmocka_unit_test(test_fill_everything), cmocka_unit_test(test_dev_mean),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
