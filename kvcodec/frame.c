/*
 * frame.c: the wire frame reader. Every frame comes from the network, so the parser checks
 * the length before each read, the CRC32C before trusting any field, every field's range and
 * every derived size (with overflow checks) before anyone walks the payload.
 */
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kvcodec_int.h"

/* kvc_map_counts over the two nibbles of each of map[0 .. nbytes): cnt[KVC_OPT_COUNT + 1]. */
static void map_counts_bytes(const uint8_t *map, size_t nbytes, uint64_t *cnt)
{
    uint32_t hist[4][256]; // four byte histograms, so consecutive bytes rarely hit one counter
    memset(hist, 0, sizeof(hist));
    size_t i = 0;
    for (; i + 4 <= nbytes; i += 4) {
        hist[0][map[i]]++;
        hist[1][map[i + 1]]++;
        hist[2][map[i + 2]]++;
        hist[3][map[i + 3]]++;
    }
    for (; i < nbytes; i++)
        hist[0][map[i]]++;
    for (int b = 0; b < 256; b++) {
        uint64_t k = (uint64_t)hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b];
        cnt[FY_MIN(b & 15, KVC_OPT_COUNT)] += k;
        cnt[FY_MIN(b >> 4, KVC_OPT_COUNT)] += k;
    }
}

#if defined(__x86_64__)
/* The same, 32 bytes at a time: per option a byte counter per lane (each byte adds at most 2),
 * summed into cnt every 127 vectors. */
__attribute__((target("avx2"))) static void map_counts_avx2(const uint8_t *map, size_t nbytes,
                                                            uint64_t *cnt)
{
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i code[KVC_OPT_COUNT];
    for (int o = 0; o < KVC_OPT_COUNT; o++)
        code[o] = _mm256_set1_epi8((char)o);
    size_t i = 0;
    uint64_t any = 0;
    while (i + 32 <= nbytes) {
        __m256i acc[KVC_OPT_COUNT];
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            acc[o] = zero;
        const size_t end = i + FY_MIN((nbytes - i) / 32, (size_t)127) * 32;
        for (; i < end; i += 32) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(map + i));
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int o = 0; o < KVC_OPT_COUNT; o++) {
                acc[o] = _mm256_sub_epi8(acc[o], _mm256_cmpeq_epi8(lo, code[o]));
                acc[o] = _mm256_sub_epi8(acc[o], _mm256_cmpeq_epi8(hi, code[o]));
            }
        }
        for (int o = 0; o < KVC_OPT_COUNT; o++) {
            const __m256i s = _mm256_sad_epu8(acc[o], zero);
            const uint64_t k =
                (uint64_t)_mm256_extract_epi64(s, 0) + (uint64_t)_mm256_extract_epi64(s, 1) +
                (uint64_t)_mm256_extract_epi64(s, 2) + (uint64_t)_mm256_extract_epi64(s, 3);
            cnt[o] += k;
            any += k;
        }
    }
    cnt[KVC_OPT_COUNT] += 2 * (uint64_t)i - any; // nibbles of no option
    map_counts_bytes(map + i, nbytes - i, cnt);
}

static bool have_avx2(void)
{
    static int cached = -1;
    if (cached < 0)
        cached = __builtin_cpu_supports("avx2");
    return cached != 0;
}
#endif

void kvc_map_counts(const uint8_t *map, uint32_t n_tokens, uint64_t *cnt)
{
    memset(cnt, 0, (KVC_OPT_COUNT + 1) * sizeof(uint64_t));
    const size_t full = n_tokens / 2;
#if defined(__x86_64__)
    if (have_avx2())
        map_counts_avx2(map, full, cnt);
    else
#endif
        map_counts_bytes(map, full, cnt);
    if (n_tokens & 1)
        cnt[FY_MIN(map[full] & 15, KVC_OPT_COUNT)]++;
}

kvc_opt_t kvc_frame_opt(const kvc_frame_t *f, uint32_t h, uint32_t t)
{
    const uint8_t *mp = f->maps + (size_t)h * kvc_map_bytes(f->n_tokens);
    return (kvc_opt_t)((mp[t / 2] >> (4 * (t & 1))) & 15);
}

fy_status_t kvc_frame_parse(const uint8_t *buf, size_t len, kvc_frame_t *frame_p)
{
    if (buf == NULL || frame_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (len < KVC_FRAME_HEADER_BYTES + 4)
        return FY_ERR_TRUNCATED;
    if (kvc_rd32(buf) != KVC_FRAME_MAGIC)
        return FY_ERR_FORMAT;
    if (kvc_rd16(buf + 4) != KVC_FRAME_VERSION)
        return FY_ERR_UNSUPPORTED;
    if (kvc_rd16(buf + 6) != KVC_FRAME_HEADER_BYTES)
        return FY_ERR_FORMAT;
    uint64_t frame_bytes = kvc_rd64(buf + 56);
    if (frame_bytes > len)
        return FY_ERR_TRUNCATED;
    if (frame_bytes != len)
        return FY_ERR_FORMAT;
    if (fy_crc32c(0, buf, len - 4) != kvc_rd32(buf + len - 4))
        return FY_ERR_CORRUPT;

    kvc_frame_t f;
    memset(&f, 0, sizeof(f));
    f.model_fingerprint = kvc_rd64(buf + 8);
    f.seq_id = kvc_rd64(buf + 16);
    f.layer = kvc_rd32(buf + 24);
    f.n_layers = kvc_rd32(buf + 28);
    f.n_tokens = kvc_rd32(buf + 32);
    f.n_kv_heads = kvc_rd16(buf + 36);
    f.head_dim = kvc_rd16(buf + 38);
    f.group = kvc_rd16(buf + 40);
    f.flags = kvc_rd16(buf + 42);
    f.opt_mask = buf[44];
    uint64_t payload = kvc_rd64(buf + 48);
    f.protect = buf[45];
    if (kvc_rd16(buf + 46) != 0)
        return FY_ERR_FORMAT;
    if (f.n_layers == 0 || f.n_layers > KVC_MAX_LAYERS || f.layer >= f.n_layers)
        return FY_ERR_FORMAT;
    if (f.n_tokens == 0 || f.n_tokens > KVC_MAX_TOKENS)
        return FY_ERR_FORMAT;
    if (f.n_kv_heads == 0 || f.n_kv_heads > KVC_MAX_KV_HEADS)
        return FY_ERR_FORMAT;
    if (f.head_dim == 0 || f.head_dim % 8 || f.head_dim > KVC_MAX_HEAD_DIM)
        return FY_ERR_FORMAT;
    if (f.group < 8 || f.group > 256 || f.group % 8)
        return FY_ERR_FORMAT;
    if (f.flags & ~KVC_FRAME_FLAG_ROTATED)
        return FY_ERR_UNSUPPORTED;
    if ((f.flags & KVC_FRAME_FLAG_ROTATED) && (f.head_dim & (f.head_dim - 1)))
        return FY_ERR_FORMAT;
    if (f.opt_mask == 0 || (f.opt_mask & ~KVC_OPT_ALL_MASK))
        return FY_ERR_FORMAT;
    if (f.protect > KVC_MAX_PROTECT || f.protect >= f.head_dim)
        return FY_ERR_FORMAT;

    size_t map_bytes = kvc_map_bytes(f.n_tokens), maps_total;
    if (!fy_size_mul(map_bytes, f.n_kv_heads, &maps_total))
        return FY_ERR_FORMAT;
    maps_total = FY_ALIGN_UP(maps_total, 8);
    size_t fixed = KVC_FRAME_HEADER_BYTES + maps_total + 4;
    if (fixed > len)
        return FY_ERR_TRUNCATED;
    const uint8_t *maps = buf + KVC_FRAME_HEADER_BYTES;
    // Walk the maps: option codes in range, padding zero, counts -> exact payload size.
    uint32_t seen = 0;
    size_t need = 0;
    for (uint32_t h = 0; h < f.n_kv_heads; h++) {
        const uint8_t *mp = maps + (size_t)h * map_bytes;
        if ((f.n_tokens & 1) && (mp[map_bytes - 1] >> 4))
            return FY_ERR_FORMAT; // the unused nibble must be zero
        uint64_t cnt[KVC_OPT_COUNT + 1];
        kvc_map_counts(mp, f.n_tokens, cnt);
        if (cnt[KVC_OPT_COUNT])
            return FY_ERR_FORMAT; // a code that is no option
        for (int o = 0; o < KVC_OPT_COUNT; o++) {
            if (h < KVC_FRAME_COUNTED_HEADS)
                f.counts[h][o] = (uint32_t)cnt[o]; // n_tokens < 2^24
            if (cnt[o])
                seen |= 1u << o;
            size_t b = kvc_run_bytes(o, f.head_dim, f.group, f.protect, cnt[o]);
            if (!fy_size_add(need, b, &need))
                return FY_ERR_FORMAT;
        }
    }
    for (size_t i = (size_t)f.n_kv_heads * map_bytes; i < maps_total; i++)
        if (maps[i] != 0)
            return FY_ERR_FORMAT;
    if (seen != f.opt_mask)
        return FY_ERR_FORMAT;
    if (payload != need)
        return FY_ERR_FORMAT;
    size_t total;
    if (!fy_size_add(fixed, need, &total))
        return FY_ERR_FORMAT;
    if (total > len)
        return FY_ERR_TRUNCATED;
    if (total != len)
        return FY_ERR_FORMAT;
    f.maps = maps;
    f.counted = f.n_kv_heads <= KVC_FRAME_COUNTED_HEADS;
    // Protected channel lists: strictly increasing and inside head_dim, in every group.
    if (f.protect > 0) {
        const uint8_t *r = maps + maps_total;
        for (uint32_t h = 0; h < f.n_kv_heads; h++) {
            uint64_t cnt[KVC_OPT_COUNT];
            kvc_frame_head_counts(&f, h, cnt);
            for (int o = 0; o < KVC_OPT_DROP; o++) {
                uint32_t gs = kvc_group_tokens(o, f.group);
                for (uint64_t left = cnt[o]; left > 0;) {
                    uint32_t m = (uint32_t)FY_MIN((uint64_t)gs, left);
                    if (kvc_opt_protectable(o)) {
                        const uint8_t *pi = r + kvc_group_bytes(o, f.head_dim, m, 0);
                        uint32_t prev = 0;
                        for (uint32_t j = 0; j < f.protect; j++) {
                            uint32_t c = kvc_rd16(pi + 2 * j);
                            if (c >= f.head_dim || (j > 0 && c <= prev))
                                return FY_ERR_FORMAT;
                            prev = c;
                        }
                    }
                    r += kvc_group_bytes(o, f.head_dim, m, f.protect);
                    left -= m;
                }
            }
        }
    }
    f.payload = maps + maps_total;
    f.payload_bytes = need;
    f.frame_bytes = len;
    *frame_p = f;
    return FY_OK;
}

fy_status_t kvc_frame_dequantize(const kvc_frame_t *f, float *k, float *v, uint8_t *kept)
{
    if (f == NULL || k == NULL || v == NULL)
        return FY_ERR_INVALID_ARG;
    uint32_t n = f->n_tokens, d = f->head_dim, G = f->group;
    bool rotated = (f->flags & KVC_FRAME_FLAG_ROTATED) != 0;
    float *gk = malloc((size_t)G * d * sizeof(float)); // [G][d]
    float *gv = malloc((size_t)G * d * sizeof(float));
    uint32_t *idx = malloc((size_t)G * sizeof(uint32_t));
    if (!gk || !gv || !idx) {
        free(gk), free(gv), free(idx);
        return FY_ERR_NO_MEMORY;
    }
    memset(k, 0, (size_t)f->n_kv_heads * n * d * sizeof(float));
    memset(v, 0, (size_t)f->n_kv_heads * n * d * sizeof(float));
    if (kept)
        memset(kept, 0, (size_t)f->n_kv_heads * n);
    const uint8_t *r = f->payload;
    for (uint32_t h = 0; h < f->n_kv_heads; h++) {
        float *kh = k + (size_t)h * n * d, *vh = v + (size_t)h * n * d;
        for (int o = 0; o < KVC_OPT_DROP; o++) {
            uint32_t gs = kvc_group_tokens(o, G), m = 0;
            for (uint32_t t = 0; t <= n; t++) {
                if (t < n && kvc_frame_opt(f, h, t) == (kvc_opt_t)o)
                    idx[m++] = t;
                if (m == gs || (t == n && m > 0)) {
                    kvc_dequant_group(o, d, m, m, f->protect, r, gk, gv);
                    r += kvc_group_bytes(o, d, m, f->protect);
                    for (uint32_t j = 0; j < m; j++) {
                        float *kr = gk + (size_t)j * d, *vr = gv + (size_t)j * d;
                        if (rotated && kvc_opt_rotatable(o)) {
                            kvc_hadamard(kr, d);
                            kvc_hadamard(vr, d);
                        }
                        memcpy(kh + (size_t)idx[j] * d, kr, d * sizeof(float));
                        memcpy(vh + (size_t)idx[j] * d, vr, d * sizeof(float));
                        if (kept)
                            kept[(size_t)h * n + idx[j]] = 1;
                    }
                    m = 0;
                }
            }
        }
    }
    free(gk), free(gv), free(idx);
    return FY_OK;
}
