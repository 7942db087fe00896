/* The greedy slack fill's walk over sorted candidates, as device code that two places compile:
 * kvcodec/encode.cu (greedy_kernel and greedy_small_kernel run it on warp 0 of a block) and
 * tests/kvcodec/test_greedy_walk.c, which runs it on the host on 32 threads in lockstep (each
 * warp intrinsic a barrier) against the CPU encoder's serial scan, so that its logic is tested
 * on every machine, not only on one with a GPU.
 *
 * Not a standalone header. The includer defines, before including it:
 * - opt_args_t, with at least n and n_kv (uint32_t), cost[KVC_OPT_COUNT] (float), gfix, gtok
 *   and gsz[KVC_OPT_COUNT] (unsigned long long: a group of m tokens of option o is
 *   gfix[o] + m gtok[o] bytes, gsz[o] tokens at most) and choice (uint8_t *, [n_kv][n]);
 * - OPT_MAX_KV and GREEDY_CHUNK; KVC_OPT_COUNT and KVC_OPT_DROP (kvcodec.h);
 * - outside CUDA: __device__, __forceinline__, threadIdx.x, and __syncwarp, __shfl_up_sync,
 *   __shfl_sync (on long long), __ballot_sync, __any_sync, __popc, __ffs and atomicOr. */
#ifndef FERRY_KVCODEC_GREEDY_WALK_INT_H
#define FERRY_KVCODEC_GREEDY_WALK_INT_H

#ifdef __CUDACC__
#define GW_UNROLL _Pragma("unroll")
#else
#define GW_UNROLL
#endif

/* run_bytes(o, c + 1) - run_bytes(o, c): a token's bytes, plus the group's fixed bytes when it
 * opens a group. */
static __device__ __forceinline__ long long add_bytes(const opt_args_t *a, int o, uint32_t c)
{
    if (o == KVC_OPT_DROP)
        return 0;
    uint32_t gs = (uint32_t)a->gsz[o];
    return (long long)a->gtok[o] + (c % gs == 0 ? (long long)a->gfix[o] : 0);
}

/* Whether some one-token upgrade (head h, option cur -> to with cost[to] > cost[cur], as
 * cand_kernel proposes them) still fits the target under the current counts. A candidate's
 * byte change depends only on its (h, cur, to), so when none of these fits, no remaining
 * candidate can be taken before the state changes, and the state changes only by a take: the
 * fill is over (the CPU's scan goes on to the end of the list and takes nothing more). The 32
 * lanes of one warp call it. */
static __device__ bool greedy_any_fits(const opt_args_t *a, const long long *s_cnt, long long total,
                                       long long target)
{
    bool fit = false;
    for (uint32_t t = threadIdx.x % 32; t < a->n_kv * 64 && !fit; t += 32) {
        uint32_t h = t / 64, cur = t / 8 % 8, to = t % 8;
        if (cur >= KVC_OPT_COUNT || to >= KVC_OPT_COUNT || !(a->cost[to] > a->cost[cur]))
            continue;
        long long cc = s_cnt[h * 8 + cur], ct = s_cnt[h * 8 + to];
        if (cc < 1) // no item of the head holds cur
            continue;
        long long delta =
            add_bytes(a, (int)to, (uint32_t)ct) - add_bytes(a, (int)cur, (uint32_t)(cc - 1));
        fit = total + delta <= target;
    }
    return __any_sync(0xffffffffu, fit);
}

/* Shared state of the greedy fill's walk: the counts of the choice per (head, option), the
 * frame bytes, and two bit tables (zero between steps) that tell each lane of a step which
 * earlier lanes move a token into or out of its (head, option) slots. */
typedef struct {
    long long cnt[OPT_MAX_KV * 8];
    unsigned into[OPT_MAX_KV * 8], out_of[OPT_MAX_KV * 8];
    long long total;
    int over;
} greedy_state_t;

/* The greedy fill's walk over one staged window of sorted candidates (s_idx: the item, or none
 * past the last candidate; s_cur, s_to: its option and its upgrade), by one warp. The CPU takes,
 * in order, each candidate whose exact byte change fits the state its earlier takes left. The
 * warp looks at 32 candidates at a time and supposes every one of them is taken: lane k's byte
 * change comes from the counts after lanes 0 .. k-1 moved their tokens (tallied from the bit
 * tables) and the frame bytes after their changes (a prefix sum). Up to the first lane whose
 * supposed change does not fit, the supposition is the truth, so those lanes are taken; that
 * lane was judged under the true state too, so it is passed over, and the next step starts
 * right behind it. When lane 0 itself does not fit, nothing changes until a take: the walk
 * moves to the first lane that fits under the current state. A run of takes costs one step
 * per 32 candidates instead of one per take. The walk ends when no upgrade of any kind fits
 * (greedy_any_fits, asked when a whole step finds nothing after some take) instead of scanning
 * the rest of the list, which then finds nothing: the same choice, without the tail. Returns
 * whether the fill is over (that, or the candidates ended). Only warp 0 calls it. */
static __device__ bool greedy_walk(const opt_args_t *a, greedy_state_t *st, long long target,
                                   const uint32_t *s_idx, const uint8_t *s_cur, const uint8_t *s_to)
{
    const uint32_t full = 0xffffffffu, none = 0xffffffffu;
    const uint32_t lane = threadIdx.x % 32, below = (1u << lane) - 1;
    long long total = st->total; // the same in every lane
    bool asked = false, over = false;
    uint32_t p = 0;
    while (p < GREEDY_CHUNK && !over) {
        const uint32_t k = p + lane;
        const bool in_chunk = k < GREEDY_CHUNK;
        const uint32_t i = in_chunk ? s_idx[k] : none;
        const bool valid = i != none; // the invalid lanes are a suffix of the step
        uint32_t h = 0;
        int cur = 0, to = 0;
        if (valid) {
            h = i / a->n;
            cur = s_cur[k];
            to = s_to[k];
        }
        const uint32_t in_slot = h * 8 + (uint32_t)to, out_slot = h * 8 + (uint32_t)cur;
        if (valid) {
            atomicOr(&st->into[in_slot], 1u << lane);
            atomicOr(&st->out_of[out_slot], 1u << lane);
        }
        __syncwarp();
        // The lanes that put a token into / take one out of this lane's two slots.
        const unsigned in_in = st->into[in_slot], in_out = st->out_of[in_slot];
        const unsigned out_in = st->into[out_slot], out_out = st->out_of[out_slot];
        const long long ct = st->cnt[in_slot], cc = st->cnt[out_slot];
        __syncwarp();
        if (valid) {
            st->into[in_slot] = 0;
            st->out_of[out_slot] = 0;
        }
        long long step = 0; // the byte change supposing the earlier lanes taken
        if (valid)
            step =
                add_bytes(a, to, (uint32_t)(ct + __popc(in_in & below) - __popc(in_out & below))) -
                add_bytes(a, cur,
                          (uint32_t)(cc + __popc(out_in & below) - __popc(out_out & below) - 1));
        long long upto = step; // inclusive prefix sum over the lanes
        GW_UNROLL
        for (uint32_t o = 1; o < 32; o <<= 1) {
            const long long y = __shfl_up_sync(full, upto, o);
            if (lane >= o)
                upto += y;
        }
        const unsigned bad = __ballot_sync(full, !valid || total + upto > target);
        const uint32_t m = bad ? (uint32_t)__ffs((int)bad) - 1 : 32;
        const unsigned ended = __ballot_sync(full, in_chunk && !valid);
        if (m > 0) {
            // Each slot the step touches gets its net change from one lane: the first that
            // moves a token into it, else the first that takes one out.
            const unsigned taken = m < 32 ? (1u << m) - 1 : full;
            if (valid && (in_in & -in_in) == 1u << lane)
                st->cnt[in_slot] += __popc(in_in & taken) - __popc(in_out & taken);
            if (valid && out_in == 0 && (out_out & -out_out) == 1u << lane)
                st->cnt[out_slot] -= __popc(out_out & taken);
            if (lane < m)
                a->choice[i] = (uint8_t)to;
            total += __shfl_sync(full, upto, m - 1);
            asked = false;
            over = m < 32 && (ended >> m & 1u); // lane m: past the last candidate
            p += m < 32 ? m + 1 : 32;
        } else {
            // Under the current state (lane 0's supposition is the current state, too).
            const long long now =
                valid ? add_bytes(a, to, (uint32_t)ct) - add_bytes(a, cur, (uint32_t)(cc - 1)) : 0;
            const unsigned fits = __ballot_sync(full, valid && total + now <= target);
            if (fits) {
                p += (uint32_t)__ffs((int)fits) - 1;
            } else {
                over = ended != 0;
                if (!over && !asked) {
                    asked = true;
                    over = !greedy_any_fits(a, st->cnt, total, target);
                }
                p += 32;
            }
        }
        __syncwarp(); // the counts and tables settle before the next step reads them
    }
    if (lane == 0)
        st->total = total;
    __syncwarp();
    return over;
}

#endif
