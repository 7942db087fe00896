/*
 * encode.c: the prefill side. For one layer: per-(kv head, token) distortion of every allowed
 * option (trial quantization), a Lagrangian multiple-choice knapsack under the layer's byte
 * allowance, and the wire frame. Across layers a rate controller (kvc_encoder_t) starts each
 * layer from the previous multiplier and corrects it so the request's bytes end just under
 * b x FP16 bytes and never above.
 */
#include <math.h>
#include <stdlib.h>

#include "kvcodec_int.h"
#include "mult_search_int.h"

struct kvc_encoder {
    kvc_encoder_params_t p;
    kvc_policy_t policy;
    double budget; // effective b
    uint32_t next_layer;
    uint64_t spent, total_budget;
    double lambda_prev; // < 0: none yet
    size_t n_items;     // n_kv_heads * n_tokens
    float *dist;        // [n_items][KVC_OPT_COUNT] modelled distortion
    uint8_t *allowed;   // [n_items] option mask
    uint8_t *choice;    // [n_items] chosen option
    uint8_t *tmp_choice; // [n_items]
    float *kf, *vf;     // [n_tokens][head_dim] one head, fp32
    float *kr, *vr;     // [n_tokens][head_dim] the same, Hadamard-rotated (when rotating)
    float *errk, *errv; // [9][group] trial errors by bit width
    float *gk, *gv;     // [group][head_dim] one group gathered for the quantizer
    float *cand;        // [n_items] greedy-fill candidate ratios
    uint32_t *cand_idx; // [n_items]
    uint8_t *cand_opt;  // [n_items]
    size_t greedy_window; // candidates sorted at a time by the greedy fill
    size_t greedy_sorted; // candidates the last layer's fill put in order (both passes)
    uint64_t *counts;   // [n_kv_heads][KVC_OPT_COUNT]
    uint8_t *backbone;  // [n_tokens] 1 = HEX backbone token
    kvc_scores_t scores;
    float cost[KVC_OPT_COUNT]; // amortized bytes per token of each option
    float lcost[KVC_OPT_COUNT]; // the same divided by this layer's distortion weight
};

static const float k_rank_pen[KVC_OPT_COUNT] = {0, 1.5e-5f, 4.4e-3f, 5.8e-2f, 1.1e-1f, 1.0f};

void kvc_encoder_params_default(kvc_encoder_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->budget = -1;
}

static size_t frame_fixed_bytes(uint32_t n_kv, uint32_t n)
{
    return KVC_FRAME_HEADER_BYTES + FY_ALIGN_UP((size_t)n_kv * kvc_map_bytes(n), 8) + 4;
}

/* weight_l^ex of a calibrated policy (1 without calibration or with ex 0). A layer that
 * measured no loss at all still weighs a little, so its share and distortion stay positive. */
static double layer_factor(const kvc_policy_t *pol, uint32_t layer, float ex)
{
    if (pol->n_layer_weights == 0 || ex == 0 || layer >= pol->n_layer_weights)
        return 1;
    return pow(fmax((double)pol->layer_weight[layer], 1e-3), (double)ex);
}

/* The calibrated multiplier of layer 0 at budget b, interpolated in log-log between the
 * table's budgets (clamped at its ends); < 0 without a table. */
static double lambda_start(const kvc_policy_t *pol, double b)
{
    uint32_t n = pol->n_lambdas;
    if (n == 0 || !(b > 0))
        return -1;
    const double *x = pol->lambda_budget, *y = pol->lambda_first;
    if (b <= x[0] || n == 1)
        return y[0];
    if (b >= x[n - 1])
        return y[n - 1];
    uint32_t i = 1;
    while (x[i] < b)
        i++;
    if (!(y[i - 1] > 0 && y[i] > 0)) // no log of 0: the nearer end
        return b - x[i - 1] < x[i] - b ? y[i - 1] : y[i];
    double t = log(b / x[i - 1]) / log(x[i] / x[i - 1]);
    return exp(log(y[i - 1]) + t * log(y[i] / y[i - 1]));
}

static bool is_backbone(const kvc_policy_t *pol, uint32_t t, uint32_t n)
{
    // HEX-style backbone: m evenly spaced tokens, t_i = floor((i + 1/2) n / m)
    // (docs/kvcodec-policies.md explains the choice).
    if (pol->backbone_frac <= 0)
        return false;
    uint64_t m = (uint64_t)ceil((double)pol->backbone_frac * n);
    if (m == 0)
        return false;
    // t is a backbone token iff some i has floor((2i + 1) n / 2m) == t.
    uint64_t i = ((uint64_t)2 * t * m) / ((uint64_t)2 * n); // candidate, then neighbours
    for (uint64_t j = i > 0 ? i - 1 : 0; j <= i + 1 && j < m; j++)
        if (((2 * j + 1) * (uint64_t)n) / (2 * m) == t)
            return true;
    return false;
}

void kvc_encoder_destroy(kvc_encoder_t *e)
{
    if (e == NULL)
        return;
    free(e->dist), free(e->allowed), free(e->choice), free(e->tmp_choice);
    free(e->kf), free(e->vf), free(e->kr), free(e->vr), free(e->errk), free(e->errv);
    free(e->gk), free(e->gv), free(e->cand), free(e->cand_idx), free(e->cand_opt);
    free(e->counts), free(e->backbone);
    kvc_scores_cleanup(&e->scores);
    free(e);
}

fy_status_t kvc_encoder_create(const kvc_encoder_params_t *p, kvc_encoder_t **enc_p)
{
    if (p == NULL || enc_p == NULL || p->policy == NULL)
        return FY_ERR_INVALID_ARG;
    if (kvc_policy_validate(p->policy, NULL, 0) != FY_OK)
        return FY_ERR_INVALID_ARG;
    uint32_t d = p->head_dim;
    if (p->n_layers == 0 || p->n_layers > KVC_MAX_LAYERS || p->n_kv_heads == 0 ||
        p->n_kv_heads > KVC_MAX_KV_HEADS || p->n_heads == 0 || p->n_heads % p->n_kv_heads ||
        d == 0 || d % 8 || d > KVC_MAX_HEAD_DIM || p->n_tokens == 0 ||
        p->n_tokens > KVC_MAX_TOKENS || p->budget > 1)
        return FY_ERR_INVALID_ARG;
    if (p->policy->rotate && (d & (d - 1)))
        return FY_ERR_INVALID_ARG; // Hadamard needs a power of two
    if (p->policy->protect_channels >= d)
        return FY_ERR_INVALID_ARG;
    // A calibration belongs to one model: its layer count must be this one's.
    if (p->policy->n_layer_weights != 0 && p->policy->n_layer_weights != p->n_layers)
        return FY_ERR_INVALID_ARG;
    kvc_encoder_t *e = calloc(1, sizeof(*e));
    if (e == NULL)
        return FY_ERR_NO_MEMORY;
    e->p = *p;
    e->policy = *p->policy;
    e->p.policy = &e->policy;
    e->budget = p->budget >= 0 ? p->budget : e->policy.budget;
    // With a calibrated multiplier the rate controller tries it on layer 0 before solving;
    // the table was measured with unscaled distortion, hence the factor (cost / gamma_0 at
    // lambda x gamma_0 decides as cost at lambda).
    e->lambda_prev = -1;
    if (e->budget > 0 && lambda_start(&e->policy, e->budget) >= 0)
        e->lambda_prev = lambda_start(&e->policy, e->budget) *
                         layer_factor(&e->policy, 0, e->policy.layer_gamma);
    e->n_items = (size_t)p->n_kv_heads * p->n_tokens;
    uint64_t fp16_layer = 4ull * p->n_kv_heads * p->n_tokens * d;
    e->total_budget = e->budget > 0 ? (uint64_t)floor(e->budget * (double)fp16_layer *
                                                      (double)p->n_layers)
                                    : UINT64_MAX;
    size_t n = p->n_tokens, G = e->policy.group;
    e->dist = malloc(e->n_items * KVC_OPT_COUNT * sizeof(float));
    e->allowed = malloc(e->n_items);
    e->choice = malloc(e->n_items);
    e->tmp_choice = malloc(e->n_items);
    e->kf = malloc(n * d * sizeof(float));
    e->vf = malloc(n * d * sizeof(float));
    if (e->policy.rotate) {
        e->kr = malloc(n * d * sizeof(float));
        e->vr = malloc(n * d * sizeof(float));
    }
    e->errk = malloc(9 * G * sizeof(float));
    e->errv = malloc(9 * G * sizeof(float));
    e->gk = malloc(G * d * sizeof(float));
    e->gv = malloc(G * d * sizeof(float));
    e->cand = malloc(e->n_items * sizeof(float));
    e->cand_idx = malloc(e->n_items * sizeof(uint32_t));
    e->cand_opt = malloc(e->n_items);
    e->counts = malloc((size_t)p->n_kv_heads * KVC_OPT_COUNT * sizeof(uint64_t));
    e->backbone = malloc(n);
    if (!e->dist || !e->allowed || !e->choice || !e->tmp_choice || !e->kf || !e->vf ||
        (e->policy.rotate && (!e->kr || !e->vr)) || !e->errk || !e->errv || !e->gk || !e->gv ||
        !e->cand || !e->cand_idx || !e->cand_opt || !e->counts || !e->backbone ||
        kvc_scores_init(&e->scores, p->n_kv_heads, p->n_tokens, d) != FY_OK) {
        kvc_encoder_destroy(e);
        return FY_ERR_NO_MEMORY;
    }
    for (uint32_t t = 0; t < p->n_tokens; t++)
        e->backbone[t] = is_backbone(&e->policy, t, p->n_tokens);
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        if (o == KVC_OPT_F16)
            e->cost[o] = 4.0f * d;
        else if (o == KVC_OPT_DROP)
            e->cost[o] = 0;
        else
            e->cost[o] = (float)(d * (kvc_opt_kbits(o) + kvc_opt_vbits(o)) / 8 + 4) +
                         4.0f * d / (float)G;
        if (kvc_opt_protectable(o) && e->policy.protect_channels) {
            float P = (float)e->policy.protect_channels;
            e->cost[o] += P + 2.0f * P / (float)G;
        }
    }
    *enc_p = e;
    return FY_OK;
}

size_t kvc_encoder_max_frame_bytes(const kvc_encoder_t *e)
{
    size_t items = e->n_items, d = e->p.head_dim;
    // The largest per-token option is F16 (4d bytes); a quantized token costs less even
    // with its share of scales, but a partial group may cost more, so bound generously.
    size_t worst = 0;
    for (int o = 0; o < KVC_OPT_DROP; o++)
        worst = FY_MAX(worst, kvc_group_bytes(o, (uint32_t)d, 1, e->policy.protect_channels));
    return frame_fixed_bytes(e->p.n_kv_heads, e->p.n_tokens) + items * worst;
}

void kvc_encoder_totals(const kvc_encoder_t *e, uint64_t *bytes_p, uint64_t *budget_p)
{
    if (bytes_p)
        *bytes_p = e->spent;
    if (budget_p)
        *budget_p = e->total_budget;
}

/* ---- distortion model ---- */

static void build_items(kvc_encoder_t *e, const kvc_scores_t *sc, const kvc_err_tables_t *tab,
                        uint32_t h, int pins)
{
    const kvc_policy_t *pol = &e->policy;
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, G = pol->group;
    const float *imp = sc->importance + (size_t)h * n;
    const float *obar = sc->obar + (size_t)h * d;
    const float *qsq = sc->qsq + (size_t)h * d;
    float qsq_mean = 0;
    for (uint32_t c = 0; c < d; c++)
        qsq_mean += qsq[c];
    qsq_mean /= (float)d;
    float kw_rot[KVC_MAX_HEAD_DIM]; // rotation mixes channels: use the mean sensitivity
    for (uint32_t c = 0; c < d; c++)
        kw_rot[c] = qsq_mean;
    bool stat = pol->hybrid_threshold > 0 && sc->is_static[h];
    // Kept pins let the optimizer trade their precision for bytes; with no budget there is
    // nothing to trade for and every free token goes to the cheapest option, so they stay 16/16.
    bool kept = pol->pins_kept && e->budget > 0;

    // Value deviation from the window output: what losing the token costs (per token when
    // joint_kv, else the head's mean).
    bool measured = pol->dist == KVC_DIST_TRIAL || pol->dist == KVC_DIST_MODEL;
    // Queries after the window attend too: a uniform share of their mass keeps a token the
    // window ignored from looking free to drop (adds exactly 0 when the prior is off).
    float prior = measured ? pol->prior / (float)n : 0.0f;
    float *dev = e->cand; // scratch [n]
    double dev_mean = 0;
    if (measured) {
        if (tab)
            memcpy(dev, tab->dev + (size_t)h * n, n * sizeof(float));
        else
            kvc_sq_dists(e->vf, n, d, obar, dev);
        dev_mean = kvc_dev_sum(dev, n);
    }
    dev_mean /= n;
    // The spread of later queries' outputs around the window's (float, as the GPU has it).
    float spread = measured && pol->drop_spread > 0 ? pol->drop_spread * (float)dev_mean : 0.0f;

    for (uint32_t t = 0; t < n; t++) {
        size_t it = (size_t)h * n + t;
        float *D = e->dist + it * KVC_OPT_COUNT;
        float w;
        if (pol->dist == KVC_DIST_POSITION)
            w = (float)(t + 1) / (float)n;
        else
            w = imp[t] + prior;
        bool middle = t >= pol->sinks && t + pol->recent < n;
        if (stat && middle)
            w *= pol->hybrid_factor;
        uint8_t mask = (uint8_t)pol->options;
        mask = kvc_pin_mask(mask, pins, t, n, pol->sinks, pol->recent, kept, e->backbone[t],
                            pol->backbone_opt);
        e->allowed[it] = mask;
        float dv = pol->joint_kv ? dev[t] : (float)dev_mean;
        if (measured) {
            float w2 = w * w; // output error ~ p^2 |delta|^2
            D[KVC_OPT_F16] = 0;
            float rest = 1.0f - fminf(w, KVC_DROP_MASS_MAX); // the others' share
            D[KVC_OPT_DROP] = w2 * dv / (rest * rest) + w2 * spread;
            for (int o = KVC_OPT_Q8; o <= KVC_OPT_Q2; o++)
                D[o] = 0; // filled by the trial pass below
        } else {
            for (int o = 0; o < KVC_OPT_COUNT; o++)
                D[o] = w * k_rank_pen[o];
        }
    }
    if (!measured)
        return;
    // Trial quantization over groups of G consecutive tokens, once per bit width: 4/2 reuses
    // the 4-bit key and 2-bit value errors.
    uint32_t opts = pol->options;
    bool need[9] = {false};
    need[8] = opts & KVC_OPT_BIT(KVC_OPT_Q8);
    need[4] = opts & (KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_Q4V2));
    bool needv4 = opts & KVC_OPT_BIT(KVC_OPT_Q4);
    need[2] = opts & (KVC_OPT_BIT(KVC_OPT_Q4V2) | KVC_OPT_BIT(KVC_OPT_Q2));
    bool needk2 = opts & KVC_OPT_BIT(KVC_OPT_Q2);
    // Errors of token t0 + j at bit width b: ek[b][j], ev[b][j] (measured here into
    // errk/errv [9][G], or read from the tables).
    const float *ek[9] = {NULL}, *ev[9] = {NULL};
    for (uint32_t t0 = 0; t0 < n; t0 += G) {
        uint32_t m = FY_MIN(G, n - t0);
        for (int b = 2; b <= 8; b *= 2) {
            if (!need[b])
                continue;
            if (tab) {
                ek[b] = tab->ek[b] ? tab->ek[b] + (size_t)h * n + t0 : NULL;
                ev[b] = tab->ev[b] ? tab->ev[b] + (size_t)h * n + t0 : NULL;
                continue;
            }
            ek[b] = e->errk + (size_t)b * G;
            ev[b] = e->errv + (size_t)b * G;
            bool rot = pol->rotate && b <= 4;
            const float *ks = (rot ? e->kr : e->kf) + (size_t)t0 * d;
            const float *vs = (rot ? e->vr : e->vf) + (size_t)t0 * d;
            // At 8 bits the step^2/12 model is accurate (errors are nearly uniform), so only
            // the 4- and 2-bit errors are measured.
            if (pol->dist == KVC_DIST_MODEL || b == 8) {
                kvc_model_errors(b, d, m, ks, vs, rot ? kw_rot : qsq, e->errk + (size_t)b * G,
                             e->errv + (size_t)b * G);
                continue;
            }
            // The 4- and 2-bit errors share their rows and ranges: measured together, when
            // b = 4 (b = 2 then only measures what the 4-bit pass did not).
            float *k2 = needk2 ? e->errk + 2 * (size_t)G : NULL;
            float *v2 = need[2] ? e->errv + 2 * (size_t)G : NULL;
            if (b == 4) {
                kvc_key_errors2(4, e->errk + 4 * (size_t)G, 2, k2, d, m, ks, rot ? kw_rot : qsq);
                if (needv4)
                    kvc_value_errors2(4, e->errv + 4 * (size_t)G, 2, v2, d, m, vs);
                else if (v2)
                    kvc_value_errors(2, d, m, vs, v2);
            } else if (!need[4]) { // b = 2 alone
                if (k2)
                    kvc_key_errors(2, d, m, ks, rot ? kw_rot : qsq, k2);
                kvc_value_errors(2, d, m, vs, v2);
            }
        }
        for (uint32_t j = 0; j < m; j++) {
            uint32_t t = t0 + j;
            size_t it = (size_t)h * n + t;
            float w = pol->dist == KVC_DIST_POSITION ? (float)(t + 1) / n : imp[t] + prior;
            if (stat && t >= pol->sinks && t + pol->recent < n)
                w *= pol->hybrid_factor;
            float w2 = w * w;
            float dv = pol->joint_kv ? dev[t] : (float)dev_mean;
            // Value error plus the output error a key error causes through the logit:
            // p * delta_s * (v - obar).
            float *D = e->dist + it * KVC_OPT_COUNT;
            if (need[8])
                D[KVC_OPT_Q8] = w2 * (ev[8][j] + dv * ek[8][j]);
            if (needv4)
                D[KVC_OPT_Q4] = w2 * (ev[4][j] + dv * ek[4][j]);
            if (need[2] && need[4])
                D[KVC_OPT_Q4V2] = w2 * (ev[2][j] + dv * ek[4][j]);
            if (needk2)
                D[KVC_OPT_Q2] = w2 * (ev[2][j] + dv * ek[2][j]);
        }
    }
}

/* Choice at multiplier lambda; returns the amortized bytes. */
static double assign(const kvc_encoder_t *e, double lambda, uint8_t *choice)
{
    double total = 0;
    for (size_t i = 0; i < e->n_items; i++) {
        const float *D = e->dist + i * KVC_OPT_COUNT;
        uint8_t mask = e->allowed[i];
        int best = -1;
        double bv = 0;
        for (int o = KVC_OPT_COUNT - 1; o >= 0; o--) { // cheapest first: ties go cheap
            if (!(mask & (1u << o)))
                continue;
            double v = (double)D[o] + lambda * (double)e->lcost[o];
            if (best < 0 || v < bv) {
                best = o;
                bv = v;
            }
        }
        choice[i] = (uint8_t)best;
        total += e->lcost[best];
    }
    return total;
}

static void assign_cheapest(const kvc_encoder_t *e, bool allow_drop, uint8_t *choice)
{
    for (size_t i = 0; i < e->n_items; i++) {
        uint8_t mask = e->allowed[i];
        if (!allow_drop && mask != KVC_OPT_BIT(KVC_OPT_DROP))
            mask &= (uint8_t)~KVC_OPT_BIT(KVC_OPT_DROP);
        int o = KVC_OPT_COUNT - 1;
        while (o > 0 && !(mask & (1u << o)))
            o--;
        choice[i] = (uint8_t)o;
    }
}

/* Exact frame bytes of a choice. */
static size_t exact_bytes(const kvc_encoder_t *e, const uint8_t *choice)
{
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, G = e->policy.group;
    uint32_t P = e->policy.protect_channels;
    size_t total = frame_fixed_bytes(e->p.n_kv_heads, n);
    for (uint32_t h = 0; h < e->p.n_kv_heads; h++) {
        uint64_t cnt[KVC_OPT_COUNT] = {0};
        for (uint32_t t = 0; t < n; t++)
            cnt[choice[(size_t)h * n + t]]++;
        for (int o = 0; o < KVC_OPT_DROP; o++)
            total += kvc_run_bytes(o, d, G, P, cnt[o]);
    }
    return total;
}

/* The fill's order: ratio descending, then index (deterministic on ties). */
static inline bool cand_before(const float *r, uint32_t a, uint32_t b)
{
    return r[a] != r[b] ? r[a] > r[b] : a < b;
}

static int cmp_cand(const void *a, const void *b, void *ctx)
{
    const float *r = ctx;
    uint32_t ia = *(const uint32_t *)a, ib = *(const uint32_t *)b;
    return cand_before(r, ia, ib) ? -1 : cand_before(r, ib, ia);
}

static inline void swap_u32(uint32_t *x, uint32_t *y)
{
    uint32_t t = *x;
    *x = *y;
    *y = t;
}

/* Rearranges idx[0 .. n) so that its first k (0 < k < n) are the k first in cand_before order,
 * in any order among themselves (quickselect on a median of three; past a depth of twice
 * log2 n the range is sorted instead, so a bad input costs n log n, not n^2). */
static void select_first(uint32_t *idx, size_t n, size_t k, const float *r)
{
    size_t lo = 0, hi = n; // the k-th lies in [lo, hi)
    int depth = 0;
    for (size_t m = n; m > 1; m >>= 1)
        depth += 2;
    while (hi - lo > 1) {
        if (depth-- == 0) {
            qsort_r(idx + lo, hi - lo, sizeof(uint32_t), cmp_cand, (void *)r);
            return;
        }
        // Median of the first, middle and last as the pivot, moved to lo.
        size_t mid = lo + (hi - lo) / 2, last = hi - 1;
        if (cand_before(r, idx[mid], idx[lo]))
            swap_u32(&idx[mid], &idx[lo]);
        if (cand_before(r, idx[last], idx[lo]))
            swap_u32(&idx[last], &idx[lo]);
        if (cand_before(r, idx[last], idx[mid]))
            swap_u32(&idx[last], &idx[mid]);
        swap_u32(&idx[lo], &idx[mid]);
        const uint32_t piv = idx[lo];
        // Lomuto: [lo + 1, s) before the pivot, [s, j) after it (the order is strict).
        size_t st = lo + 1;
        for (size_t j = lo + 1; j < hi; j++)
            if (cand_before(r, idx[j], piv))
                swap_u32(&idx[j], &idx[st++]);
        swap_u32(&idx[lo], &idx[st - 1]); // the pivot at its place, st - 1
        const size_t p = st - 1;
        if (p == k) // the k before it are the first k
            return;
        if (p < k)
            lo = p + 1;
        else
            hi = p;
    }
}

/* The exact frame byte change of moving one token of head counts c from option cur to to. */
static int64_t move_delta(const kvc_encoder_t *e, const uint64_t *c, int cur, int to)
{
    uint32_t d = e->p.head_dim, G = e->policy.group, P = e->policy.protect_channels;
    return (int64_t)kvc_run_bytes(to, d, G, P, c[to] + 1) -
           (int64_t)kvc_run_bytes(to, d, G, P, c[to]) +
           (int64_t)kvc_run_bytes(cur, d, G, P, c[cur] - 1) -
           (int64_t)kvc_run_bytes(cur, d, G, P, c[cur]);
}

/* Whether some one-token upgrade (a head's option cur -> to with lcost[to] > lcost[cur], the
 * kind the fill proposes) still fits the target under the counts. A candidate's byte change
 * depends only on its (head, cur, to), so when none fits no candidate can be taken, and the
 * state changes only by a take: the rest of the fill takes nothing. */
static bool any_upgrade_fits(const kvc_encoder_t *e, const uint64_t *cnt, size_t total,
                             size_t target)
{
    for (uint32_t h = 0; h < e->p.n_kv_heads; h++) {
        const uint64_t *c = cnt + (size_t)h * KVC_OPT_COUNT;
        for (int cur = 0; cur < KVC_OPT_COUNT; cur++) {
            if (c[cur] == 0)
                continue;
            for (int to = 0; to < KVC_OPT_COUNT; to++)
                if (e->lcost[to] > e->lcost[cur] &&
                    (int64_t)total + move_delta(e, c, cur, to) <= (int64_t)target)
                    return true;
        }
    }
    return false;
}

/* Upgrades items along their hulls, best distortion saved per byte first, while the exact
 * frame size stays <= target (a token that opens a new group pays the group's scales): each
 * candidate in order is taken if its byte change fits the state the earlier takes left. The
 * candidates are put in order greedy_window at a time (the next best selected, then sorted),
 * since the fill is over long before the end of the list (no upgrade fits any more: usually
 * within the first thousand of a layer's hundreds of thousands). */
static size_t greedy_fill(kvc_encoder_t *e, size_t total, size_t target)
{
    uint32_t n = e->p.n_tokens;
    uint64_t *cnt = e->counts; // [n_kv][KVC_OPT_COUNT]
    memset(cnt, 0, (size_t)e->p.n_kv_heads * KVC_OPT_COUNT * sizeof(uint64_t));
    for (size_t i = 0; i < e->n_items; i++)
        cnt[(i / n) * KVC_OPT_COUNT + e->choice[i]]++;
    const size_t window = e->greedy_window > 0 ? e->greedy_window : KVC_GREEDY_WINDOW;
    e->greedy_sorted = 0;
    for (int pass = 0; pass < 2 && any_upgrade_fits(e, cnt, total, target); pass++) {
        size_t nc = 0;
        for (size_t i = 0; i < e->n_items; i++) {
            const float *D = e->dist + i * KVC_OPT_COUNT;
            int cur = e->choice[i];
            float best = 0;
            int bo = -1;
            for (int o = 0; o < KVC_OPT_COUNT; o++) {
                if (!(e->allowed[i] & (1u << o)) || e->lcost[o] <= e->lcost[cur])
                    continue;
                float r = (D[cur] - D[o]) / (e->lcost[o] - e->lcost[cur]);
                if (r > best) {
                    best = r;
                    bo = o;
                }
            }
            if (bo >= 0) {
                e->cand[i] = best;
                e->cand_opt[i] = (uint8_t)bo;
                e->cand_idx[nc++] = (uint32_t)i;
            }
        }
        for (size_t done = 0; done < nc;) {
            size_t k = FY_MIN(window, nc - done);
            if (k < nc - done)
                select_first(e->cand_idx + done, nc - done, k, e->cand);
            qsort_r(e->cand_idx + done, k, sizeof(uint32_t), cmp_cand, e->cand);
            e->greedy_sorted += k;
            for (size_t j = done; j < done + k; j++) {
                uint32_t i = e->cand_idx[j];
                int cur = e->choice[i], to = e->cand_opt[i];
                uint64_t *c = cnt + (i / n) * KVC_OPT_COUNT;
                int64_t delta = move_delta(e, c, cur, to);
                if ((int64_t)total + delta <= (int64_t)target) {
                    total = (size_t)((int64_t)total + delta);
                    c[to]++;
                    c[cur]--;
                    e->choice[i] = (uint8_t)to;
                }
            }
            done += k;
            if (done < nc && !any_upgrade_fits(e, cnt, total, target))
                break;
        }
    }
    return total;
}

/* Smallest multiplier whose exact frame size is <= target (bracket, then bisection in log space:
 * mult_search_int.h), then the greedy fill of the slack. The caller guarantees the all-cheapest
 * assignment fits. */
static double solve(kvc_encoder_t *e, size_t target, double lambda0)
{
    kvc_ms_t ms;
    kvc_ms_init(&ms, lambda0);
    double lam;
    while (kvc_ms_next(&ms, &lam)) {
        // Multiplier 0 is measured only where its fit ends the search: into the choice.
        uint8_t *c = lam == 0 ? e->choice : e->tmp_choice;
        assign(e, lam, c);
        kvc_ms_step(&ms, exact_bytes(e, c) <= target);
    }
    if (ms.phase == KVC_MS_ZERO) // even lambda ~ 0 fits: best quality everywhere
        return 0;
    // A 1 % bracket is enough: the greedy fill below spends what the multiplier leaves.
    double hi = kvc_ms_result(&ms);
    assign(e, hi, e->choice);
    size_t x = exact_bytes(e, e->choice);
    if (x > target) { // not reachable by any multiplier: the cheapest assignment
        assign_cheapest(e, true, e->choice);
        x = exact_bytes(e, e->choice);
    }
    greedy_fill(e, x, target);
    return hi;
}

/* ---- frame writer ---- */

size_t kvc_encoder_write_head(const kvc_encoder_t *e, uint32_t layer, uint8_t *out,
                              uint64_t *counts, size_t *frame_bytes_p)
{
    uint32_t P = e->policy.protect_channels;
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, n_kv = e->p.n_kv_heads;
    uint32_t G = e->policy.group;
    size_t map_bytes = kvc_map_bytes(n);
    size_t maps_total = FY_ALIGN_UP((size_t)n_kv * map_bytes, 8);
    uint8_t *maps = out + KVC_FRAME_HEADER_BYTES;
    memset(maps, 0, maps_total);
    uint32_t opt_mask = 0;
    size_t payload = 0;
    for (uint32_t h = 0; h < n_kv; h++) {
        const uint8_t *ch = e->choice + (size_t)h * n;
        uint8_t *mp = maps + (size_t)h * map_bytes;
        uint64_t cnt[KVC_OPT_COUNT] = {0};
        for (uint32_t t = 0; t < n; t++) {
            mp[t / 2] |= (uint8_t)(ch[t] << (4 * (t & 1)));
            opt_mask |= 1u << ch[t];
            cnt[ch[t]]++;
        }
        for (int o = 0; o < KVC_OPT_COUNT; o++) {
            counts[o] += cnt[o];
            payload += kvc_run_bytes(o, d, G, P, cnt[o]);
        }
    }
    size_t head = KVC_FRAME_HEADER_BYTES + maps_total;
    size_t total = head + payload + 4;
    kvc_encoder_header_fill(e, layer, opt_mask, payload, total, out);
    *frame_bytes_p = total;
    return head;
}

void kvc_encoder_header_fill(const kvc_encoder_t *e, uint32_t layer, uint32_t opt_mask,
                             size_t payload, size_t total, uint8_t *hd)
{
    uint32_t P = e->policy.protect_channels;
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, n_kv = e->p.n_kv_heads;
    uint32_t G = e->policy.group;
    memset(hd, 0, KVC_FRAME_HEADER_BYTES);
    kvc_wr32(hd + 0, KVC_FRAME_MAGIC);
    kvc_wr16(hd + 4, KVC_FRAME_VERSION);
    kvc_wr16(hd + 6, KVC_FRAME_HEADER_BYTES);
    kvc_wr64(hd + 8, e->p.model_fingerprint);
    kvc_wr64(hd + 16, e->p.seq_id);
    kvc_wr32(hd + 24, layer);
    kvc_wr32(hd + 28, e->p.n_layers);
    kvc_wr32(hd + 32, n);
    kvc_wr16(hd + 36, (uint16_t)n_kv);
    kvc_wr16(hd + 38, (uint16_t)d);
    kvc_wr16(hd + 40, (uint16_t)G);
    kvc_wr16(hd + 42, e->policy.rotate ? KVC_FRAME_FLAG_ROTATED : 0);
    hd[44] = (uint8_t)opt_mask;
    hd[45] = (uint8_t)P;
    kvc_wr64(hd + 48, payload);
    kvc_wr64(hd + 56, total);
}

static size_t write_frame(kvc_encoder_t *e, const kvc_layer_input_t *in,
                          const kvc_scores_t *sc, uint8_t *out, uint64_t *counts)
{
    uint32_t P = e->policy.protect_channels;
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, n_kv = e->p.n_kv_heads;
    uint32_t G = e->policy.group;
    bool rotate = e->policy.rotate;
    size_t total;
    uint8_t *w = out + kvc_encoder_write_head(e, in->layer, out, counts, &total);
    for (uint32_t h = 0; h < n_kv; h++) {
        const uint8_t *ch = e->choice + (size_t)h * n;
        const uint16_t *kh = in->k + (size_t)h * in->head_stride;
        const uint16_t *vh = in->v + (size_t)h * in->head_stride;
        float chan_w[KVC_MAX_HEAD_DIM]; // sqrt of the mean squared query per channel
        for (uint32_t c = 0; c < d; c++)
            chan_w[c] = sqrtf(sc->qsq[(size_t)h * d + c]);
        // The head's rows in fp32 once, when some option quantizes (16/16 copies FP16 bits).
        bool quantized = false;
        for (uint32_t t = 0; t < n && !quantized; t++)
            quantized = ch[t] != KVC_OPT_F16 && ch[t] != KVC_OPT_DROP;
        if (quantized) {
            kvc_load_rows(kh, in->token_stride, n, d, e->kf);
            kvc_load_rows(vh, in->token_stride, n, d, e->vf);
        }
        for (int o = 0; o < KVC_OPT_DROP; o++) {
            if (o == KVC_OPT_F16) {
                for (uint32_t t = 0; t < n; t++) {
                    if (ch[t] != KVC_OPT_F16)
                        continue;
                    memcpy(w, kh + (size_t)t * in->token_stride, 2 * (size_t)d);
                    memcpy(w + 2 * d, vh + (size_t)t * in->token_stride, 2 * (size_t)d);
                    w += 4 * (size_t)d;
                }
                continue;
            }
            bool rot = rotate && kvc_opt_rotatable(o);
            uint32_t m = 0;
            for (uint32_t t = 0; t <= n; t++) {
                if (t < n && ch[t] == o) {
                    float *gk = e->gk + (size_t)m * d, *gv = e->gv + (size_t)m * d;
                    const float *kt = e->kf + (size_t)t * d, *vt = e->vf + (size_t)t * d;
                    if (rot) {
                        kvc_hadamard_to(kt, gk, d);
                        kvc_hadamard_to(vt, gv, d);
                    } else {
                        memcpy(gk, kt, d * sizeof(float));
                        memcpy(gv, vt, d * sizeof(float));
                    }
                    m++;
                }
                if (m == G || (t == n && m > 0)) {
                    // MixKVQ salience: query magnitude per channel (unrotated options only;
                    // rotation mixes channels, so rotated groups use the range alone).
                    kvc_quant_group(o, d, m, m, P, rot ? NULL : chan_w, e->gk, e->gv, w);
                    w += kvc_group_bytes(o, d, m, P);
                    m = 0;
                }
            }
        }
    }
    FY_ASSERT((size_t)(w - out) + 4 == total);
    kvc_wr32(w, fy_crc32c(0, out, (size_t)(w - out)));
    return total;
}

/* ---- the layer ---- */

const uint8_t *kvc_encoder_choice(const kvc_encoder_t *e)
{
    return e->choice;
}

const kvc_encoder_params_t *kvc_encoder_params(const kvc_encoder_t *e)
{
    return &e->p;
}

fy_status_t kvc_encoder_check_layer(const kvc_encoder_t *e, const kvc_layer_input_t *in,
                                    size_t out_cap)
{
    if (e == NULL || in == NULL || !in->k || !in->v)
        return FY_ERR_INVALID_ARG;
    if (in->layer != e->next_layer || e->next_layer >= e->p.n_layers)
        return FY_ERR_STATE;
    if (in->token_stride < e->p.head_dim)
        return FY_ERR_INVALID_ARG;
    if (out_cap < kvc_encoder_max_frame_bytes(e))
        return FY_ERR_INVALID_ARG;
    return FY_OK;
}

void kvc_encoder_opt_inputs(const kvc_encoder_t *e, uint32_t layer, kvc_opt_inputs_t *oi)
{
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        oi->cost[o] = e->cost[o];
        oi->rank_pen[o] = k_rank_pen[o];
    }
    oi->backbone = e->backbone;
    oi->no_budget = !(e->budget > 0);
    oi->r = e->p.n_layers - layer;
    oi->remain = oi->no_budget
                     ? 0
                     : (double)(e->total_budget - FY_MIN(e->spent, e->total_budget));
    oi->lambda_prev = e->lambda_prev;
    // Calibrated distortion weight gamma_l: D x gamma at cost is D at cost / gamma, so the
    // multiplier carried from layer to layer stays one global price of a byte.
    double gamma = layer_factor(&e->policy, layer, e->policy.layer_gamma);
    if (gamma != 1)
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            oi->cost[o] = (float)(e->cost[o] / gamma);
    // Calibrated byte shares: layer l's share of what is left is a_l / sum of a_j over the
    // layers left, a_j = weight_j^layer_alloc (equal shares without a calibration).
    oi->spent = e->spent;
    oi->total_budget = e->total_budget;
    oi->share_w = oi->share_left = 0;
    if (!oi->no_budget && e->policy.n_layer_weights != 0 && e->policy.layer_alloc != 0) {
        double left = 0;
        for (uint32_t l = layer; l < e->p.n_layers; l++)
            left += layer_factor(&e->policy, l, e->policy.layer_alloc);
        oi->share_w = layer_factor(&e->policy, layer, e->policy.layer_alloc);
        oi->share_left = left;
    }
    oi->share = kvc_share(oi->remain, oi->r, oi->share_w, oi->share_left);
}

void kvc_encoder_set_lambda(kvc_encoder_t *e, double lambda)
{
    e->lambda_prev = lambda;
}

void kvc_encoder_set_greedy_window(kvc_encoder_t *e, size_t window)
{
    e->greedy_window = window;
}

size_t kvc_encoder_greedy_sorted(const kvc_encoder_t *e)
{
    return e->greedy_sorted;
}

fy_status_t kvc_encoder_choose(kvc_encoder_t *e, const kvc_layer_input_t *in,
                               const kvc_scores_t *sc, const kvc_err_tables_t *tab,
                               kvc_layer_info_t *info)
{
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, n_kv = e->p.n_kv_heads;
    kvc_opt_inputs_t oi;
    kvc_encoder_opt_inputs(e, in->layer, &oi);
    bool no_budget = oi.no_budget;
    uint32_t r = oi.r;
    double remain = oi.remain;
    memcpy(e->lcost, oi.cost, sizeof(e->lcost));
    bool measured = e->policy.dist == KVC_DIST_TRIAL || e->policy.dist == KVC_DIST_MODEL;
    double lambda = 0;
    for (int pins = KVC_PINS_ALL; pins >= KVC_PINS_NONE; pins--) {
        for (uint32_t h = 0; h < n_kv; h++) {
            if (measured && tab == NULL) {
                const uint16_t *kh = in->k + (size_t)h * in->head_stride;
                const uint16_t *vh = in->v + (size_t)h * in->head_stride;
                kvc_load_rows(kh, in->token_stride, n, d, e->kf);
                kvc_load_rows(vh, in->token_stride, n, d, e->vf);
                if (e->policy.rotate) {
                    for (size_t i = 0; i < (size_t)n * d; i += d) {
                        kvc_hadamard_to(e->kf + i, e->kr + i, d);
                        kvc_hadamard_to(e->vf + i, e->vr + i, d);
                    }
                }
            }
            build_items(e, sc, tab, h, pins);
        }
        if (no_budget) {
            assign_cheapest(e, false, e->choice);
            info->budget_met = true;
            break;
        }
        // The smallest this layer can be, and what later layers need at least.
        assign_cheapest(e, true, e->tmp_choice);
        double floor_l = (double)exact_bytes(e, e->tmp_choice);
        double cap = remain - (double)(r - 1) * floor_l;
        double share = oi.share;
        if (r > 1)
            cap = FY_MIN(cap, share * (1 + e->policy.rate_flex));
        if (floor_l > cap) {
            if (pins > KVC_PINS_NONE)
                continue; // the pins alone do not fit: retry with fewer
            memcpy(e->choice, e->tmp_choice, e->n_items);
            info->budget_met = floor_l <= remain;
            break;
        }
        bool accepted = false;
        if (e->lambda_prev >= 0 && r > 1) {
            // Rate control: keep the previous multiplier while this layer's bytes stay
            // within the flexible band around its share, so budget flows to layers that
            // need it.
            double a = assign(e, e->lambda_prev, e->choice);
            double x = (double)exact_bytes(e, e->choice);
            (void)a;
            // ... and while what it leaves, later layers can still spend (at most all of
            // their tokens at 16/16: near b = 1 a layer under its share loses the rest).
            double top_l = (double)(frame_fixed_bytes(n_kv, n) + (size_t)n_kv * n * 4 * d);
            if (x <= cap && x >= share * (1 - e->policy.rate_flex) &&
                x >= remain - (double)(r - 1) * top_l) {
                accepted = true;
                lambda = e->lambda_prev;
            }
        }
        if (!accepted) {
            double target = r > 1 ? FY_MIN(share, cap) : remain;
            lambda = solve(e, (size_t)target, e->lambda_prev);
        }
        info->budget_met = true;
        break;
    }
    e->lambda_prev = lambda;
    info->lambda = lambda;
    return FY_OK;
}

void kvc_encoder_commit(kvc_encoder_t *e, size_t len, kvc_layer_info_t *info)
{
    double dist = 0;
    for (size_t i = 0; i < e->n_items; i++)
        dist += e->dist[i * KVC_OPT_COUNT + e->choice[i]];
    kvc_encoder_commit_dist(e, len, dist, info);
}

void kvc_encoder_commit_dist(kvc_encoder_t *e, size_t len, double dist, kvc_layer_info_t *info)
{
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, n_kv = e->p.n_kv_heads;
    e->spent += len;
    e->next_layer++;
    info->frame_bytes = len;
    info->fp16_bytes = (size_t)4 * n_kv * n * d;
    info->distortion = dist;
    if (e->budget > 0 && e->spent > e->total_budget)
        info->budget_met = false;
}

fy_status_t kvc_encoder_encode_layer(kvc_encoder_t *e, const kvc_layer_input_t *in,
                                     const kvc_scores_t *scores, uint8_t *out, size_t out_cap,
                                     size_t *len_p, kvc_layer_info_t *info_p)
{
    if (out == NULL || len_p == NULL)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = kvc_encoder_check_layer(e, in, out_cap);
    if (st != FY_OK)
        return st;
    uint32_t n = e->p.n_tokens, d = e->p.head_dim, n_kv = e->p.n_kv_heads;
    kvc_layer_info_t info;
    memset(&info, 0, sizeof(info));
    uint64_t t0 = fy_clock_ns();
    const kvc_scores_t *sc = scores;
    if (sc == NULL) {
        st = kvc_score(&e->policy, e->p.n_heads, n_kv, n, d, in, &e->scores);
        if (st != FY_OK)
            return st;
        sc = &e->scores;
    } else if (sc->n_kv_heads != n_kv || sc->n_tokens != n || sc->head_dim != d) {
        return FY_ERR_INVALID_ARG;
    }
    uint64_t t1 = fy_clock_ns();
    if ((st = kvc_encoder_choose(e, in, sc, NULL, &info)) != FY_OK)
        return st;
    size_t len = write_frame(e, in, sc, out, info.tokens);
    kvc_encoder_commit(e, len, &info);
    uint64_t t2 = fy_clock_ns();
    info.score_ns = scores ? 0 : t1 - t0;
    info.encode_ns = t2 - t1;
    *len_p = len;
    if (info_p)
        *info_p = info;
    return FY_OK;
}
