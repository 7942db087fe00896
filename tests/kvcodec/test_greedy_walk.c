// The GPU encoder's greedy slack fill (kvcodec/greedy_walk_int.h) run on the host: its device
// code on 32 threads in lockstep, each warp intrinsic a barrier, over candidate lists of random
// layers, must end in the state of the CPU encoder's serial scan (take each candidate, in order,
// whose exact byte change fits the state the earlier takes left): the same choice, counts and
// frame bytes. Slack from none to all of it, windows of 33 to 4096 candidates.
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <cmocka.h>

#include "../../kvcodec/kvcodec_int.h"
#include "kvtest.h"

// ---- A warp on 32 host threads.

#define WARP 32

typedef struct {
    uint32_t x;
} lane_idx_t;

static _Thread_local lane_idx_t threadIdx;
static pthread_barrier_t g_bar;
static long long g_xs[WARP]; // the lanes' values being exchanged

static void warp_wait(void)
{
    pthread_barrier_wait(&g_bar);
}

// Every lane publishes v; each returns lane src's.
static long long warp_xchg(long long v, uint32_t src)
{
    warp_wait();
    g_xs[threadIdx.x] = v;
    warp_wait();
    long long r = g_xs[src];
    warp_wait();
    return r;
}

static unsigned warp_ballot(bool p)
{
    warp_wait();
    g_xs[threadIdx.x] = p;
    warp_wait();
    unsigned m = 0;
    for (uint32_t l = 0; l < WARP; l++)
        m |= (g_xs[l] ? 1u : 0u) << l;
    warp_wait();
    return m;
}

#define __device__
#define __forceinline__ inline
#define __syncwarp()    warp_wait()
#define __shfl_up_sync(mask, v, o)                                                                 \
    warp_xchg((v), threadIdx.x >= (o) ? threadIdx.x - (o) : threadIdx.x)
#define __shfl_sync(mask, v, src) warp_xchg((v), (uint32_t)(src))
#define __ballot_sync(mask, p)    warp_ballot(p)
#define __any_sync(mask, p)       (warp_ballot(p) != 0)
#define __popc(x)                 __builtin_popcount(x)
#define __ffs(x)                  __builtin_ffs(x)
#define atomicOr(p, v)            __atomic_fetch_or((p), (v), __ATOMIC_SEQ_CST)

#define OPT_MAX_KV 64
static uint32_t g_chunk; // GREEDY_CHUNK: a variable here, to try several windows
#define GREEDY_CHUNK g_chunk

typedef struct {
    uint32_t n_kv, n;
    float cost[KVC_OPT_COUNT];
    unsigned long long gfix[KVC_OPT_COUNT], gtok[KVC_OPT_COUNT], gsz[KVC_OPT_COUNT];
    uint8_t *choice; // [n_kv][n]: the choice being filled (the caller's)
} opt_args_t;

#include "../../kvcodec/greedy_walk_int.h"

// ---- One layer's fill.

typedef struct {
    opt_args_t a;
    size_t n_items, n_cand;
    uint32_t *list;   // [n_cand] the candidates' items in walk order
    uint8_t *to;      // [n_items] each item's upgrade
    uint8_t *choice0; // [n_items] the choice before the fill
    long long *cnt0;  // [n_kv][8] its counts
    long long total0, target;
} fill_t;

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return *s;
}

// A layer of n_kv heads x n tokens with group size G and head_dim d: random choices, an upgrade
// for most items, the list in a random order (the walk does not care how it was sorted), and
// the target `slack` bytes above the choice's.
static void fill_make(fill_t *f, uint64_t seed, uint32_t n_kv, uint32_t n, uint32_t G, uint32_t d,
                      long long slack)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    memset(f, 0, sizeof(*f));
    opt_args_t *a = &f->a;
    a->n_kv = n_kv;
    a->n = n;
    static const float cost[KVC_OPT_COUNT] = {4.0f, 2.0f, 1.0f, 0.75f, 0.5f, 0.0f};
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        a->cost[o] = cost[o];
        if (o == KVC_OPT_DROP) {
            a->gsz[o] = 1;
            continue;
        }
        uint32_t gs = kvc_group_tokens(o, G);
        size_t one = kvc_group_bytes(o, d, 1, 0);
        a->gsz[o] = gs;
        a->gtok[o] = gs > 1 ? kvc_group_bytes(o, d, 2, 0) - one : one;
        a->gfix[o] = one - a->gtok[o];
    }
    f->n_items = (size_t)n_kv * n;
    f->choice0 = malloc(f->n_items);
    f->to = malloc(f->n_items);
    f->list = malloc(f->n_items * sizeof(uint32_t));
    f->cnt0 = calloc((size_t)n_kv * 8, sizeof(long long));
    assert_non_null(f->choice0), assert_non_null(f->to);
    assert_non_null(f->list), assert_non_null(f->cnt0);
    for (size_t i = 0; i < f->n_items; i++) {
        // Mostly the cheap options, as a multiplier leaves them.
        int cur = (int)(1 + rnd(&s) % (KVC_OPT_COUNT - 1));
        if (rnd(&s) % 16 == 0)
            cur = KVC_OPT_F16;
        f->choice0[i] = (uint8_t)cur;
        f->cnt0[(i / n) * 8 + cur]++;
        if (cur == KVC_OPT_F16 || rnd(&s) % 8 == 0)
            continue;                                  // no upgrade
        f->to[i] = (uint8_t)(rnd(&s) % (uint64_t)cur); // cost[to] > cost[cur]
        f->list[f->n_cand++] = (uint32_t)i;
    }
    for (size_t k = f->n_cand; k > 1; k--) {
        size_t j = rnd(&s) % k;
        uint32_t t = f->list[k - 1];
        f->list[k - 1] = f->list[j];
        f->list[j] = t;
    }
    long long total = 1000; // header, maps and CRC: any constant
    for (uint32_t h = 0; h < n_kv; h++)
        for (int o = 0; o < KVC_OPT_DROP; o++)
            total += (long long)kvc_run_bytes(o, d, G, 0, (uint64_t)f->cnt0[h * 8 + o]);
    f->total0 = total;
    f->target = total + slack;
}

static void fill_free(fill_t *f)
{
    free(f->choice0), free(f->to), free(f->list), free(f->cnt0);
}

// The CPU encoder's scan (greedy_fill's inner loop): into choice, cnt; returns the bytes.
static long long scan_serial(const fill_t *f, uint8_t *choice, long long *cnt, size_t *takes_p)
{
    const opt_args_t *a = &f->a;
    long long total = f->total0;
    size_t takes = 0;
    for (size_t k = 0; k < f->n_cand; k++) {
        uint32_t i = f->list[k], h = i / a->n;
        int cur = choice[i], to = f->to[i];
        long long delta = add_bytes(a, to, (uint32_t)cnt[h * 8 + to]) -
                          add_bytes(a, cur, (uint32_t)(cnt[h * 8 + cur] - 1));
        if (total + delta <= f->target) {
            total += delta;
            cnt[h * 8 + to]++;
            cnt[h * 8 + cur]--;
            choice[i] = (uint8_t)to;
            takes++;
        }
    }
    *takes_p = takes;
    return total;
}

// What greedy_kernel does around the walk: windows of GREEDY_CHUNK candidates staged (item, its
// current option, its upgrade; none past the last), the walk on the warp until it says over.
typedef struct {
    const fill_t *f;
    greedy_state_t *st;
    const uint32_t *s_idx;
    const uint8_t *s_cur, *s_to;
    int job; // 0: greedy_any_fits at the start, 1: greedy_walk
    bool result;
} warp_job_t;

typedef struct {
    warp_job_t *job;
    uint32_t lane;
} lane_arg_t;

static void *lane_run(void *arg)
{
    lane_arg_t *la = arg;
    warp_job_t *j = la->job;
    threadIdx.x = la->lane;
    bool r;
    if (j->job == 0)
        r = !greedy_any_fits(&j->f->a, j->st->cnt, j->st->total, j->f->target);
    else
        r = greedy_walk(&j->f->a, j->st, j->f->target, j->s_idx, j->s_cur, j->s_to);
    if (la->lane == 0)
        j->result = r;
    return NULL;
}

static bool run_warp(warp_job_t *j)
{
    pthread_t th[WARP];
    lane_arg_t la[WARP];
    assert_int_equal(pthread_barrier_init(&g_bar, NULL, WARP), 0);
    for (uint32_t l = 0; l < WARP; l++) {
        la[l].job = j;
        la[l].lane = l;
        assert_int_equal(pthread_create(&th[l], NULL, lane_run, &la[l]), 0);
    }
    for (uint32_t l = 0; l < WARP; l++)
        pthread_join(th[l], NULL);
    pthread_barrier_destroy(&g_bar);
    return j->result;
}

static long long walk_emulated(const fill_t *f, uint8_t *choice, long long *cnt)
{
    static greedy_state_t st; // (shared memory on the GPU)
    memset(&st, 0, sizeof(st));
    memcpy(st.cnt, cnt, (size_t)f->a.n_kv * 8 * sizeof(long long));
    st.total = f->total0;
    fill_t fa = *f; // the walk writes into choice
    fa.a.choice = choice;
    uint32_t *s_idx = malloc(g_chunk * sizeof(uint32_t));
    uint8_t *s_cur = calloc(g_chunk, 1), *s_to = calloc(g_chunk, 1);
    assert_non_null(s_idx), assert_non_null(s_cur), assert_non_null(s_to);
    warp_job_t j = {&fa, &st, s_idx, s_cur, s_to, 0, false};
    bool over = run_warp(&j);
    for (size_t base = 0; base < f->n_items && !over; base += g_chunk) {
        for (uint32_t k = 0; k < g_chunk; k++) {
            size_t pos = base + k;
            uint32_t i = 0xffffffffu;
            if (pos < f->n_cand) {
                i = f->list[pos];
                s_cur[k] = choice[i];
                s_to[k] = f->to[i];
            }
            s_idx[k] = i;
        }
        j.job = 1;
        over = run_warp(&j);
    }
    memcpy(cnt, st.cnt, (size_t)f->a.n_kv * 8 * sizeof(long long));
    free(s_idx), free(s_cur), free(s_to);
    return st.total;
}

static void check_fill(uint64_t seed, uint32_t n_kv, uint32_t n, uint32_t G, uint32_t d,
                       long long slack, uint32_t chunk)
{
    fill_t f;
    fill_make(&f, seed, n_kv, n, G, d, slack);
    g_chunk = chunk;
    uint8_t *c_ref = malloc(f.n_items), *c_warp = malloc(f.n_items);
    long long cnt_ref[OPT_MAX_KV * 8], cnt_warp[OPT_MAX_KV * 8];
    memcpy(c_ref, f.choice0, f.n_items);
    memcpy(c_warp, f.choice0, f.n_items);
    memcpy(cnt_ref, f.cnt0, (size_t)n_kv * 8 * sizeof(long long));
    memcpy(cnt_warp, f.cnt0, (size_t)n_kv * 8 * sizeof(long long));
    size_t takes;
    long long t_ref = scan_serial(&f, c_ref, cnt_ref, &takes);
    long long t_warp = walk_emulated(&f, c_warp, cnt_warp);
    if (t_ref != t_warp || memcmp(c_ref, c_warp, f.n_items) != 0 ||
        memcmp(cnt_ref, cnt_warp, (size_t)n_kv * 8 * sizeof(long long)) != 0)
        fail_msg("seed %llu: %u kv x %u tokens, G %u, slack %lld, window %u: %zu of %zu taken, "
                 "bytes %lld on the CPU, %lld by the warp",
                 (unsigned long long)seed, n_kv, n, G, slack, chunk, takes, f.n_cand, t_ref,
                 t_warp);
    assert_true(t_ref <= f.target);
    if (slack >= 1LL << 40) // every upgrade fits: runs of 32 all the way
        assert_int_equal(takes, f.n_cand);
    free(c_ref), free(c_warp);
    fill_free(&f);
}

/* The slack decides how far the walk goes: none (nothing fits), less than a token, a few
 * tokens and group openings (a long tail of passed-over candidates), most of the list, and
 * more than every upgrade needs (every candidate taken, 32 a step). */
static void test_walk_matches_scan(void **state)
{
    (void)state;
    static const long long slacks[] = {0, 40, 3000, 60000, 1000000, 1LL << 40};
    static const uint32_t chunks[] = {4096, 33, 64};
    uint64_t seed = 1;
    for (size_t si = 0; si < sizeof(slacks) / sizeof(slacks[0]); si++)
        for (size_t ci = 0; ci < sizeof(chunks) / sizeof(chunks[0]); ci++, seed++) {
            uint32_t n_kv = 1 + (uint32_t)(seed % 4), n = 97 + (uint32_t)(seed * 37 % 300);
            uint32_t G = seed % 2 ? 32 : 16;
            check_fill(seed, n_kv, n, G, 64, slacks[si], chunks[ci]);
        }
}

/* The largest head count the device optimizer takes, so that every count slot is in use. */
static void test_walk_many_heads(void **state)
{
    (void)state;
    check_fill(99, OPT_MAX_KV, 20, 32, 128, 20000, 4096);
    check_fill(100, OPT_MAX_KV, 20, 32, 128, 1LL << 40, 64);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_walk_matches_scan),
        cmocka_unit_test(test_walk_many_heads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
