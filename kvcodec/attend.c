/*
 * attend.c: attention of a query block over a sequence's compressed pages, the CPU reference
 * the CUDA kernel is checked against.
 *
 * Flash-decoding style: one page at a time, logits of every query row for the page's tokens,
 * one online-softmax rescale per page, then the value accumulation. Nothing is materialized in
 * FP16 or fp32 beyond one row of codes. For a quantized key group (per-channel scale s_c and
 * zero z_c) the logit is  sum_c (q_c s_c) code_c + sum_c q_c z_c,  so q is pre-scaled once
 * per group; for a value token (scale s_t, zero z_t) the contribution is
 * (p_t s_t) code + p_t z_t, so the zeros collapse into one scalar per row and page.
 * Rotated pages use H q for the logits and a separate accumulator that is rotated back once.
 */
#include <math.h>
#include <stdlib.h>

#include "kvcodec_int.h"
#include "vexp.h"

typedef struct {
    uint32_t d, n_q, max_tokens;
    float *acc;  // [n_q][d]   plain-space value accumulator
    float *accr; // [n_q][d]   rotated-space value accumulator
    float *qr;   // [n_q][d]   H q
    float *qs;   // [n_q][d]   q * key scale * softmax scale, per group
    float *lg;   // [n_q][max_tokens] logits, then probabilities, of one page
    float *row;  // [d]        one unpacked row
    float *tile; // [32][2 d]  one tile of F16 tokens (K row, V row) converted at once
    float m[KVC_MAX_QROWS], l[KVC_MAX_QROWS];
    bool any_rot;
} attn_t;

static uint32_t max_page_tokens(const kvc_pool_t *pool)
{
    uint32_t mx = 0;
    for (int o = 0; o < KVC_OPT_DROP; o++)
        mx = FY_MAX(mx, kvc_pool_page_tokens(pool, (kvc_opt_t)o));
    return mx;
}

/* Converts nt F16 slots (slot_bytes apart; 4d bytes each when dense) into A->tile. */
static void convert_tile(attn_t *A, const uint8_t *src, uint32_t nt, size_t slot_bytes)
{
    uint32_t d = A->d;
    uint16_t tmp[32 * 2 * KVC_MAX_HEAD_DIM];
    if (slot_bytes == 4 * (size_t)d) {
        memcpy(tmp, src, (size_t)nt * 4 * d);
    } else {
        for (uint32_t j = 0; j < nt; j++)
            memcpy(tmp + (size_t)j * 2 * d, src + j * slot_bytes, 4 * (size_t)d);
    }
    fy_fp16_to_fp32_buf(A->tile, tmp, (size_t)nt * 2 * d);
}

static void axpy(float *y, float a, const float *x, uint32_t d)
{
    for (uint32_t c = 0; c < d; c++)
        y[c] += a * x[c];
}

/* max(init, x[0 .. n)) (8 lanes, then the tail); NaN never wins, as in a scalar
 * x > mx ? x : mx loop. */
static inline __attribute__((always_inline)) float row_max(const float *x, uint32_t n, float init)
{
    float mx = init;
    uint32_t t = 0;
    if (n >= 8) {
        kvc_v8 m = {0}, v;
        m += init; // not x's first 8: a NaN there would hold its lane for the whole row
        for (; t + 8 <= n; t += 8) {
            KVC_V8_LOAD(v, x + t);
            kvc_v8i gt = v > m;
            m = (kvc_v8)((gt & (kvc_v8i)v) | (~gt & (kvc_v8i)m));
        }
        for (int j = 0; j < 8; j++)
            mx = m[j] > mx ? m[j] : mx;
    }
    for (; t < n; t++)
        mx = x[t] > mx ? x[t] : mx;
    return mx;
}

/* x[t] = e^(x[t] - mx) for t < n; returns their sum (8 lanes, then the tail by expf). */
static inline __attribute__((always_inline)) float exp_shift_sum(float *x, uint32_t n, float mx)
{
    kvc_v8 acc = {0}, vmx = acc + mx;
    uint32_t t = 0;
    for (; t + 8 <= n; t += 8) {
        kvc_v8 v;
        KVC_V8_LOAD(v, x + t);
        v -= vmx;
        fy_exp8_nonpos(&v);
        memcpy(x + t, &v, sizeof v);
        acc += v;
    }
    float sum = kvc_v8_sum(&acc);
    for (; t < n; t++) {
        x[t] = expf(x[t] - mx);
        sum += x[t];
    }
    return sum;
}

KVC_HOT static void attend_page(attn_t *A, const kvc_pool_t *pool, const uint8_t *pg, const float *q,
                        float scale)
{
    kvc_page_hdr_t h;
    kvc_page_hdr_read(pg, &h);
    uint32_t d = A->d, nq = A->n_q, T = A->max_tokens;
    if (h.n_tokens == 0 || h.opt >= KVC_OPT_DROP)
        return;
    size_t sb = kvc_pool_slot_bytes(pool, h.opt);
    bool rot = (h.flags & KVC_PAGE_FLAG_ROTATED) != 0;
    const float *qq = rot ? A->qr : q;
    int kb = kvc_opt_kbits((kvc_opt_t)h.opt), vb = kvc_opt_vbits((kvc_opt_t)h.opt);
    size_t rowk = (size_t)d * kb / 8, rowv = (size_t)d * vb / 8;
    uint32_t cap = h.group;
    uint16_t tmp16[KVC_MAX_HEAD_DIM];

    // 1. Logits of every row for every token of the page.
    uint32_t tok = 0;
    if (h.opt == KVC_OPT_F16) {
        // F16 slots are back to back (K row, V row): convert 32 tokens per call.
        for (uint32_t t0 = 0; t0 < h.n_slots; t0 += 32) {
            uint32_t nt = FY_MIN(32u, (uint32_t)h.n_slots - t0);
            convert_tile(A, pg + KVC_PAGE_HEADER_BYTES + t0 * sb, nt, sb);
            for (uint32_t j = 0; j < nt; j++)
                for (uint32_t r = 0; r < nq; r++)
                    A->lg[(size_t)r * T + t0 + j] =
                        kvc_dot(qq + (size_t)r * d, A->tile + (size_t)j * 2 * d, d) * scale;
        }
        tok = h.n_slots;
    }
    for (uint32_t s = 0; s < h.n_slots && h.opt != KVC_OPT_F16; s++) {
        const uint8_t *slot = pg + KVC_PAGE_HEADER_BYTES + s * sb;
        uint32_t m = s + 1 == h.n_slots ? h.last_tokens : cap;
        float ks[KVC_MAX_HEAD_DIM], kz[KVC_MAX_HEAD_DIM], qz[KVC_MAX_QROWS];
        memcpy(tmp16, slot, 2 * (size_t)d);
        fy_fp16_to_fp32_buf(ks, tmp16, d);
        memcpy(tmp16, slot + 2 * d, 2 * (size_t)d);
        fy_fp16_to_fp32_buf(kz, tmp16, d);
        for (uint32_t r = 0; r < nq; r++) {
            const float *qrow = qq + (size_t)r * d;
            float *qs = A->qs + (size_t)r * d;
            for (uint32_t c = 0; c < d; c++)
                qs[c] = qrow[c] * ks[c] * scale;
            qz[r] = kvc_dot(qrow, kz, d) * scale;
        }
        // MixKVQ: protected channels are coded in an 8-bit block; their main codes are 0.
        uint32_t P = kvc_opt_protectable(h.opt) ? kvc_pool_protect(pool) : 0;
        const uint8_t *pi = slot + kvc_group_bytes(h.opt, d, cap, 0), *pc = pi + 2 * P;
        float qsp[KVC_MAX_QROWS * KVC_MAX_PROTECT];
        for (uint32_t jj = 0; jj < P; jj++) {
            uint32_t c = kvc_rd16(pi + 2 * jj);
            for (uint32_t r = 0; r < nq; r++) {
                qsp[r * P + jj] = c < d ? A->qs[(size_t)r * d + c] : 0.0f;
                if (c < d)
                    A->qs[(size_t)r * d + c] = 0;
            }
        }
        const uint8_t *kc = slot + 4 * d + 4 * (size_t)cap;
        for (uint32_t j = 0; j < m; j++, tok++) {
            kvc_unpack_row(kc + j * rowk, d, kb, A->row);
            for (uint32_t r = 0; r < nq; r++) {
                float lgv = kvc_dot(A->qs + (size_t)r * d, A->row, d) + qz[r];
                for (uint32_t jj = 0; jj < P; jj++)
                    lgv += qsp[r * P + jj] * (float)pc[j * P + jj];
                A->lg[(size_t)r * T + tok] = lgv;
            }
        }

    }
    uint32_t n = tok;

    // 2. Online softmax: one rescale per row per page; lg becomes exp(logit - max).
    float zsum[KVC_MAX_QROWS];
    for (uint32_t r = 0; r < nq; r++) {
        float *lg = A->lg + (size_t)r * T;
        float mx = row_max(lg, n, A->m[r]);
        float alpha = A->m[r] == -INFINITY ? 0.0f : expf(A->m[r] - mx);
        float sum = exp_shift_sum(lg, n, mx);
        A->l[r] = A->l[r] * alpha + sum;
        A->m[r] = mx;
        if (alpha != 1.0f) {
            float *acc = A->acc + (size_t)r * d, *accr = A->accr + (size_t)r * d;
            for (uint32_t c = 0; c < d; c++)
                acc[c] *= alpha;
            if (A->any_rot)
                for (uint32_t c = 0; c < d; c++)
                    accr[c] *= alpha;
        }
        zsum[r] = 0;
    }

    // 3. Values.
    float *accbase = rot ? A->accr : A->acc;
    if (h.opt == KVC_OPT_F16) {
        for (uint32_t t0 = 0; t0 < h.n_slots; t0 += 32) {
            uint32_t nt = FY_MIN(32u, (uint32_t)h.n_slots - t0);
            convert_tile(A, pg + KVC_PAGE_HEADER_BYTES + t0 * sb, nt, sb);
            for (uint32_t j = 0; j < nt; j++)
                for (uint32_t r = 0; r < nq; r++)
                    axpy(accbase + (size_t)r * d, A->lg[(size_t)r * T + t0 + j],
                         A->tile + (size_t)j * 2 * d + d, d);
        }
        return;
    }
    tok = 0;
    for (uint32_t s = 0; s < h.n_slots; s++) {
        const uint8_t *slot = pg + KVC_PAGE_HEADER_BYTES + s * sb;
        uint32_t m = s + 1 == h.n_slots ? h.last_tokens : cap;
        const uint8_t *vs = slot + 4 * d, *vz = vs + 2 * cap;
        const uint8_t *vc = slot + 4 * d + 4 * (size_t)cap + (size_t)cap * rowk;
        for (uint32_t j = 0; j < m; j++, tok++) {
            float sv = fy_fp16_to_fp32(kvc_rd16(vs + 2 * j));
            float zv = fy_fp16_to_fp32(kvc_rd16(vz + 2 * j));
            kvc_unpack_row(vc + j * rowv, d, vb, A->row);
            for (uint32_t r = 0; r < nq; r++) {
                float p = A->lg[(size_t)r * T + tok];
                axpy(accbase + (size_t)r * d, p * sv, A->row, d);
                zsum[r] += p * zv;
            }
        }
    }
    for (uint32_t r = 0; r < nq; r++) {
        float *acc = accbase + (size_t)r * d;
        for (uint32_t c = 0; c < d; c++)
            acc[c] += zsum[r];
    }
}

/* Attention of n_q rows over a page list, not yet normalized: per row the running maximum
 * m[r] of the logits, l[r] = sum exp(logit - m[r]) and o[r] = sum exp(logit - m[r]) v (the
 * rotated pages' share turned back), o: [n_q][d]. Parts over disjoint page lists combine into
 * the attention over their union (combine_parts). */
static fy_status_t attend_part(const kvc_pool_t *pool, const kvc_page_id_t *pages, uint32_t n_pages,
                               const float *q, uint32_t n_q, float scale, float *m, float *l,
                               float *o)
{
    uint32_t d = kvc_pool_head_dim(pool), n_total = kvc_pool_n_pages(pool);
    attn_t A;
    memset(&A, 0, sizeof(A));
    A.d = d;
    A.n_q = n_q;
    A.max_tokens = max_page_tokens(pool);
    size_t nd = (size_t)n_q * d;
    float *mem = malloc((4 * nd + (size_t)n_q * A.max_tokens + d + (size_t)64 * d) *
                        sizeof(float));
    if (mem == NULL)
        return FY_ERR_NO_MEMORY;
    A.acc = mem;
    A.accr = A.acc + nd;
    A.qr = A.accr + nd;
    A.qs = A.qr + nd;
    A.lg = A.qs + nd;
    A.row = A.lg + (size_t)n_q * A.max_tokens;
    A.tile = A.row + d;
    memset(A.acc, 0, 2 * nd * sizeof(float));
    for (uint32_t r = 0; r < n_q; r++) {
        A.m[r] = -INFINITY;
        A.l[r] = 0;
    }
    for (uint32_t i = 0; i < n_pages; i++) {
        if (pages[i] >= n_total) {
            free(mem);
            return FY_ERR_OUT_OF_RANGE;
        }
        const uint8_t *pg = kvc_page_data(pool, pages[i]);
        if ((pg[1] & KVC_PAGE_FLAG_ROTATED) && !A.any_rot) {
            if (d & (d - 1)) {
                free(mem);
                return FY_ERR_FORMAT;
            }
            memcpy(A.qr, q, nd * sizeof(float));
            for (uint32_t r = 0; r < n_q; r++)
                kvc_hadamard(A.qr + (size_t)r * d, d);
            A.any_rot = true;
        }
    }
    for (uint32_t i = 0; i < n_pages; i++)
        attend_page(&A, pool, kvc_page_data(pool, pages[i]), q, scale);
    for (uint32_t r = 0; r < n_q; r++) {
        float *acc = A.acc + (size_t)r * d, *accr = A.accr + (size_t)r * d;
        if (A.any_rot) {
            kvc_hadamard(accr, d); // H is its own inverse
            for (uint32_t c = 0; c < d; c++)
                acc[c] += accr[c];
        }
        memcpy(o + (size_t)r * d, acc, d * sizeof(float));
        m[r] = A.m[r];
        l[r] = A.l[r];
    }
    free(mem);
    return FY_OK;
}

fy_status_t kvc_attend(const kvc_pool_t *pool, const kvc_page_id_t *pages, uint32_t n_pages,
                       const float *q, uint32_t n_q, float scale, float *out)
{
    if (pool == NULL || q == NULL || out == NULL || n_q == 0 || n_q > KVC_MAX_QROWS ||
        (n_pages > 0 && pages == NULL))
        return FY_ERR_INVALID_ARG;
    float m[KVC_MAX_QROWS], l[KVC_MAX_QROWS];
    fy_status_t st = attend_part(pool, pages, n_pages, q, n_q, scale, m, l, out);
    if (st != FY_OK)
        return st;
    uint32_t d = kvc_pool_head_dim(pool);
    for (uint32_t r = 0; r < n_q; r++) {
        float *o = out + (size_t)r * d;
        float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
        for (uint32_t c = 0; c < d; c++)
            o[c] *= inv;
    }
    return FY_OK;
}

/* A layer's kv heads, each split into n_split parts over its page list: work item
 * g * n_split + p is part p of head g. */
typedef struct {
    const kvc_seq_t *seq;
    uint32_t layer, grp, d, n_split;
    const float *q;
    float scale;
    float *out;
    float *part_ml;  // [n_kv][n_split][2][grp] m, then l, of each part (n_split > 1)
    float *part_o;   // [n_kv][n_split][grp][d] unnormalized output of each part
    fy_status_t *st; // [n_kv * n_split]
} layer_ctx_t;

/* A page's share of the work: its tokens (a 2-bit page holds about 8 times the tokens of an
 * FP16 one, and the time goes with the tokens), plus one so that empty pages count. */
static uint64_t page_cost(const kvc_pool_t *pool, kvc_page_id_t id)
{
    return id < kvc_pool_n_pages(pool) ? (uint64_t)kvc_rd32(kvc_page_data(pool, id) + 12) + 1 : 1;
}

/* The first page at which the pages before it cost at least target. */
static uint32_t cut_at(const kvc_pool_t *pool, const kvc_page_id_t *ids, uint32_t n,
                       uint64_t target)
{
    uint64_t seen = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (seen >= target)
            return i;
        seen += page_cost(pool, ids[i]);
    }
    return n;
}

/* Part p of n_split of a page list: pages [lo, hi), cut at equal shares of the cost. */
static void split_pages(const kvc_pool_t *pool, const kvc_page_id_t *ids, uint32_t n, uint32_t p,
                        uint32_t n_split, uint32_t *lo_p, uint32_t *hi_p)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += page_cost(pool, ids[i]);
    *lo_p = p == 0 ? 0 : cut_at(pool, ids, n, total * p / n_split);
    *hi_p = p + 1 == n_split ? n : cut_at(pool, ids, n, total * (p + 1) / n_split);
}

static void layer_range(void *arg, size_t begin, size_t end, int thread)
{
    layer_ctx_t *c = arg;
    for (size_t i = begin; i < end; i++) {
        uint32_t g = (uint32_t)(i / c->n_split), p = (uint32_t)(i % c->n_split), n;
        const kvc_page_id_t *ids = kvc_seq_pages(c->seq, c->layer, g, &n);
        size_t off = (size_t)g * c->grp * c->d;
        if (c->n_split == 1) {
            c->st[i] = kvc_attend(kvc_seq_pool(c->seq), ids, n, c->q + off, c->grp, c->scale,
                                  c->out + off);
            continue;
        }
        uint32_t lo, hi;
        split_pages(kvc_seq_pool(c->seq), ids, n, p, c->n_split, &lo, &hi);
        float *ml = c->part_ml + i * 2 * c->grp;
        c->st[i] = attend_part(kvc_seq_pool(c->seq), ids + lo, hi - lo, c->q + off, c->grp,
                               c->scale, ml, ml + c->grp, c->part_o + i * c->grp * c->d);
    }
}

/* out[r] of head g from its parts: rescaled to the largest maximum, summed, normalized. */
static void combine_parts(const layer_ctx_t *c, uint32_t g)
{
    uint32_t S = c->n_split, grp = c->grp, d = c->d;
    for (uint32_t r = 0; r < grp; r++) {
        float mx = -INFINITY;
        for (uint32_t p = 0; p < S; p++) {
            const float *ml = c->part_ml + ((size_t)g * S + p) * 2 * grp;
            if (ml[grp + r] > 0 && ml[r] > mx)
                mx = ml[r];
        }
        float *o = c->out + ((size_t)g * grp + r) * d, l = 0;
        memset(o, 0, d * sizeof(float));
        for (uint32_t p = 0; p < S; p++) {
            const float *ml = c->part_ml + ((size_t)g * S + p) * 2 * grp;
            if (!(ml[grp + r] > 0))
                continue; // no token in this part (or a row of hostile logits)
            float w = expf(ml[r] - mx);
            l += ml[grp + r] * w;
            const float *po = c->part_o + (((size_t)g * S + p) * grp + r) * d;
            for (uint32_t k = 0; k < d; k++)
                o[k] += po[k] * w;
        }
        float inv = l > 0 ? 1.0f / l : 0.0f;
        for (uint32_t k = 0; k < d; k++)
            o[k] *= inv;
    }
}

fy_status_t kvc_attend_layer(const kvc_seq_t *seq, uint32_t layer, uint32_t n_heads,
                             const float *q, float scale, float *out, fy_pool_t *threads)
{
    if (seq == NULL || q == NULL || out == NULL || layer >= kvc_seq_n_layers(seq))
        return FY_ERR_INVALID_ARG;
    uint32_t n_kv = kvc_seq_n_kv_heads(seq);
    if (n_heads == 0 || n_heads % n_kv || n_heads / n_kv > KVC_MAX_QROWS)
        return FY_ERR_INVALID_ARG;
    uint32_t grp = n_heads / n_kv, d = kvc_pool_head_dim(kvc_seq_pool(seq));
    // Heads that do not divide evenly over the pool (SmolLM2's 3 on 2 threads run 2:1) are
    // split into as many parts as there are threads, so every thread gets the same share of
    // pages; a short context is not worth the parts' set-up and stays one item a head.
    uint32_t nt = threads ? (uint32_t)fy_pool_size(threads) : 1, S = 1, most = 0;
    for (uint32_t g = 0; g < n_kv && nt > 1 && n_kv % nt != 0; g++) {
        uint32_t n;
        kvc_seq_pages(seq, layer, g, &n);
        most = FY_MAX(most, n);
    }
    if (most >= 4 * nt)
        S = nt;
    size_t n_items = (size_t)n_kv * S;
    size_t bytes = sizeof(layer_ctx_t) + n_items * sizeof(fy_status_t);
    if (S > 1)
        bytes += n_items * (2 + (size_t)d) * grp * sizeof(float);
    layer_ctx_t *c = malloc(bytes);
    if (c == NULL)
        return FY_ERR_NO_MEMORY;
    c->seq = seq;
    c->layer = layer;
    c->grp = grp;
    c->d = d;
    c->n_split = S;
    c->q = q;
    c->scale = scale;
    c->out = out;
    c->st = (fy_status_t *)(c + 1);
    c->part_ml = S > 1 ? (float *)(c->st + n_items) : NULL;
    c->part_o = S > 1 ? c->part_ml + n_items * 2 * grp : NULL;
    fy_pool_parallel_for(threads, n_items, 1, layer_range, c);
    fy_status_t st = FY_OK;
    for (size_t i = 0; i < n_items && st == FY_OK; i++)
        st = c->st[i];
    for (uint32_t g = 0; g < n_kv && st == FY_OK && S > 1; g++)
        combine_parts(c, g);
    free(c);
    return st;
}
