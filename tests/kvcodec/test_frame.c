// Frames: a valid frame parses; every single-byte change and every truncation or extension
// is rejected; frames with a recomputed CRC but hostile fields are rejected with a clear
// status; the reference dequantizer keeps exactly the tokens the map says.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "../../kvcodec/kvcodec_int.h"
#include "kvtest.h"

typedef struct {
    uint8_t *buf;
    size_t len;
    kvt_layer_t L;
} fixture_t;

/* Layer 0 of L encoded under pol as the first of n_layers at budget b: a malloc'd frame. */
static uint8_t *encode_first(const kvc_policy_t *pol, const kvt_layer_t *L, uint32_t n_layers,
                             double b, size_t *len_p)
{
    uint8_t *buf = kvt_encode_first(pol, L, n_layers, b, len_p, NULL);
    assert_non_null(buf);
    return buf;
}

static int setup(void **state)
{
    fixture_t *fx = calloc(1, sizeof(*fx));
    kvc_policy_t pol;
    kvc_policy_builtin("ferry", &pol);
    pol.recent = 8;
    pol.group = 8;
    pol.protect_channels = 2; // exercise the MixKVQ block too
    kvt_layer_make(&fx->L, 21, 4, 2, 61, 16, 8);
    fx->buf = encode_first(&pol, &fx->L, 3, 0.3, &fx->len);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *fx = *state;
    kvt_layer_free(&fx->L);
    free(fx->buf);
    free(fx);
    return 0;
}

static void test_valid(void **state)
{
    fixture_t *fx = *state;
    kvc_frame_t f;
    assert_int_equal(kvc_frame_parse(fx->buf, fx->len, &f), FY_OK);
    assert_int_equal(f.n_tokens, 61);
    assert_int_equal(f.n_kv_heads, 2);
    assert_int_equal(f.head_dim, 16);
    assert_int_equal(f.group, 8);
    assert_int_equal(f.layer, 0);
    assert_int_equal(f.n_layers, 3);
    assert_true(f.flags & KVC_FRAME_FLAG_ROTATED);
    assert_true(f.model_fingerprint == 0x1234abcd5678ef00ull);
    assert_int_equal(f.protect, 2);
    // The budget forces a mix: more than two options present.
    int n_opts = __builtin_popcount(f.opt_mask);
    assert_true(n_opts >= 3);
    size_t ne = (size_t)2 * 61 * 16;
    float *k = malloc(ne * 4), *v = malloc(ne * 4);
    uint8_t kept[122];
    assert_int_equal(kvc_frame_dequantize(&f, k, v, kept), FY_OK);
    for (uint32_t h = 0; h < 2; h++)
        for (uint32_t t = 0; t < 61; t++) {
            kvc_opt_t o = kvc_frame_opt(&f, h, t);
            assert_int_equal(kept[h * 61 + t], o != KVC_OPT_DROP);
            if (o == KVC_OPT_F16) // exact
                for (uint32_t c = 0; c < 16; c++)
                    assert_true(k[(h * 61 + t) * 16 + c] ==
                                fy_fp16_to_fp32(fx->L.k[(h * 61 + t) * 16 + c]));
        }
    // Sinks and recent tokens are kept (ferry lets the optimizer choose their precision).
    for (uint32_t h = 0; h < 2; h++) {
        for (uint32_t t = 0; t < 4; t++)
            assert_int_not_equal(kvc_frame_opt(&f, h, t), KVC_OPT_DROP);
        for (uint32_t t = 61 - 8; t < 61; t++)
            assert_int_not_equal(kvc_frame_opt(&f, h, t), KVC_OPT_DROP);
    }
    free(k), free(v);
}

/* Option counts of head h, a token at a time. */
static void nibble_counts(const kvc_frame_t *f, uint32_t h, uint64_t *cnt)
{
    size_t mb = kvc_map_bytes(f->n_tokens);
    memset(cnt, 0, KVC_OPT_COUNT * sizeof(uint64_t));
    for (uint32_t t = 0; t < f->n_tokens; t++)
        cnt[(f->maps[h * mb + t / 2] >> (4 * (t & 1))) & 15]++;
}

/* The parser keeps each head's option counts for frames of up to KVC_FRAME_COUNTED_HEADS kv
 * heads, and kvc_frame_head_counts gives the maps' counts either way: from the frame, from the
 * maps past that many heads, and from the maps where the kept counts do not add up to the
 * tokens (a frame not filled in by the parser). */
static void test_kept_counts(void **state)
{
    fixture_t *fx = *state;
    kvc_frame_t f;
    uint64_t want[KVC_OPT_COUNT], got[KVC_OPT_COUNT];
    assert_int_equal(kvc_frame_parse(fx->buf, fx->len, &f), FY_OK);
    assert_true(f.counted);
    for (uint32_t h = 0; h < f.n_kv_heads; h++) {
        nibble_counts(&f, h, want);
        assert_true(kvc_frame_counts_kept(&f, h));
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            assert_int_equal(f.counts[h][o], want[o]);
        kvc_frame_head_counts(&f, h, got);
        assert_memory_equal(got, want, sizeof(want));
    }
    // Kept counts that do not add up are not used.
    kvc_frame_t g = f;
    g.counts[1][KVC_OPT_F16] += 1;
    assert_false(kvc_frame_counts_kept(&g, 1));
    nibble_counts(&f, 1, want);
    kvc_frame_head_counts(&g, 1, got);
    assert_memory_equal(got, want, sizeof(want));
    g.counted = false;
    assert_false(kvc_frame_counts_kept(&g, 0));

    // A frame of more kv heads than the parser keeps counts for.
    for (uint32_t n_kv = KVC_FRAME_COUNTED_HEADS; n_kv <= KVC_FRAME_COUNTED_HEADS + 1; n_kv++) {
        kvc_policy_t pol;
        kvc_policy_builtin("ferry", &pol);
        pol.recent = 4;
        kvt_layer_t L;
        kvt_layer_make(&L, 5, n_kv, n_kv, 45, 16, 8);
        size_t len;
        uint8_t *buf = encode_first(&pol, &L, 1, 0.3, &len);
        assert_int_equal(kvc_frame_parse(buf, len, &f), FY_OK);
        assert_int_equal(f.counted, n_kv <= KVC_FRAME_COUNTED_HEADS);
        bool mixed = false;
        for (uint32_t h = 0; h < n_kv; h++) {
            nibble_counts(&f, h, want);
            kvc_frame_head_counts(&f, h, got);
            assert_memory_equal(got, want, sizeof(want));
            assert_int_equal(kvc_frame_counts_kept(&f, h), n_kv <= KVC_FRAME_COUNTED_HEADS);
            mixed = mixed || want[KVC_OPT_F16] < f.n_tokens;
        }
        assert_true(mixed);
        free(buf);
        kvt_layer_free(&L);
    }
}

static void test_every_byte_flip(void **state)
{
    fixture_t *fx = *state;
    uint8_t *b = malloc(fx->len);
    kvc_frame_t f;
    for (size_t i = 0; i < fx->len; i++) {
        for (int m = 0; m < 3; m++) {
            static const uint8_t masks[] = {0x01, 0x80, 0xff};
            memcpy(b, fx->buf, fx->len);
            b[i] ^= masks[m];
            assert_int_not_equal(kvc_frame_parse(b, fx->len, &f), FY_OK);
        }
    }
    free(b);
}

static void test_every_truncation(void **state)
{
    fixture_t *fx = *state;
    kvc_frame_t f;
    for (size_t n = 0; n < fx->len; n++) {
        uint8_t *b = malloc(n ? n : 1); // exact-size copies so ASan sees any over-read
        memcpy(b, fx->buf, n);
        assert_int_not_equal(kvc_frame_parse(b, n, &f), FY_OK);
        free(b);
    }
    uint8_t *b = malloc(fx->len + 1);
    memcpy(b, fx->buf, fx->len);
    b[fx->len] = 0;
    assert_int_not_equal(kvc_frame_parse(b, fx->len + 1, &f), FY_OK);
    free(b);
}

/* Parses the fixture's frame with n bytes at off replaced and the CRC recomputed, as an
 * attacker could. */
static fy_status_t parse_patched(const fixture_t *fx, size_t off, const uint8_t *bytes, size_t n)
{
    uint8_t *b = malloc(fx->len);
    memcpy(b, fx->buf, fx->len);
    memcpy(b + off, bytes, n);
    kvc_wr32(b + fx->len - 4, fy_crc32c(0, b, fx->len - 4));
    kvc_frame_t f;
    fy_status_t st = kvc_frame_parse(b, fx->len, &f);
    free(b);
    return st;
}

/* Rewrites a header field (1, 2, 4 or 8 bytes, little-endian). */
static fy_status_t parse_forged(const fixture_t *fx, size_t off, int width, uint64_t value)
{
    uint8_t v[8];
    kvc_wr64(v, value);
    return parse_patched(fx, off, v, (size_t)width);
}

static void test_forged_fields(void **state)
{
    fixture_t *fx = *state;
    assert_int_equal(parse_forged(fx, 4, 2, 2), FY_ERR_UNSUPPORTED);       // version
    assert_int_equal(parse_forged(fx, 6, 2, 72), FY_ERR_FORMAT);           // header size
    assert_int_equal(parse_forged(fx, 24, 4, 3), FY_ERR_FORMAT);           // layer >= n_layers
    assert_int_equal(parse_forged(fx, 28, 4, 0), FY_ERR_FORMAT);           // no layers
    assert_int_equal(parse_forged(fx, 32, 4, 0xffffffffu), FY_ERR_FORMAT); // tokens
    assert_int_equal(parse_forged(fx, 32, 4, 62), FY_ERR_FORMAT);          // maps shift
    assert_int_equal(parse_forged(fx, 36, 2, 0), FY_ERR_FORMAT);           // kv heads
    assert_int_equal(parse_forged(fx, 36, 2, 3), FY_ERR_FORMAT);
    assert_int_equal(parse_forged(fx, 38, 2, 12), FY_ERR_FORMAT);          // head_dim % 8
    assert_int_equal(parse_forged(fx, 38, 2, 24), FY_ERR_FORMAT);          // rotated, not 2^k
    assert_int_equal(parse_forged(fx, 40, 2, 7), FY_ERR_FORMAT);           // group
    assert_int_equal(parse_forged(fx, 40, 2, 264), FY_ERR_FORMAT);         // group > 256
    assert_int_equal(parse_forged(fx, 42, 2, 0x4), FY_ERR_UNSUPPORTED);    // unknown flag
    assert_int_equal(parse_forged(fx, 44, 1, 0x3f), FY_ERR_FORMAT);        // options present
    assert_int_equal(parse_forged(fx, 45, 1, 33), FY_ERR_FORMAT);          // protect > 32
    assert_int_equal(parse_forged(fx, 45, 1, 3), FY_ERR_FORMAT);           // sizes change
    assert_int_equal(parse_forged(fx, 46, 2, 1), FY_ERR_FORMAT);           // reserved
    assert_int_equal(parse_forged(fx, 48, 8, 1ull << 62), FY_ERR_FORMAT);  // payload size
    assert_int_equal(parse_forged(fx, 56, 8, 1ull << 62), FY_ERR_TRUNCATED);
    assert_int_equal(parse_forged(fx, 64, 1, 0x77), FY_ERR_FORMAT);        // option code 7
    assert_int_equal(parse_forged(fx, 64, 1, 0x66), FY_ERR_FORMAT);        // option code 6
}

/* Rewrites a channel list's first two entries. */
static fy_status_t parse_with(const fixture_t *fx, size_t off, uint16_t a, uint16_t b)
{
    uint8_t v[4];
    kvc_wr16(v, a);
    kvc_wr16(v + 2, b);
    return parse_patched(fx, off, v, sizeof(v));
}

/* The protected channel lists of every 4/4, 4/2 and 2/2 group (found here from the maps, a
 * token at a time): another increasing pair inside head_dim parses; a channel at head_dim, or
 * one not above the one before it, is refused. */
static void test_forged_channels(void **state)
{
    fixture_t *fx = *state;
    kvc_frame_t f;
    assert_int_equal(kvc_frame_parse(fx->buf, fx->len, &f), FY_OK);
    assert_int_equal(f.protect, 2);
    size_t off = (size_t)(f.payload - fx->buf);
    int lists = 0;
    for (uint32_t h = 0; h < f.n_kv_heads; h++) {
        uint64_t cnt[KVC_OPT_COUNT];
        nibble_counts(&f, h, cnt);
        for (int o = 0; o < KVC_OPT_DROP; o++) {
            uint32_t gs = kvc_group_tokens(o, f.group);
            for (uint64_t left = cnt[o]; left > 0;) {
                uint32_t m = (uint32_t)(left < gs ? left : gs);
                if (kvc_opt_protectable(o)) {
                    size_t at = off + kvc_group_bytes(o, f.head_dim, m, 0);
                    assert_int_equal(parse_with(fx, at, 0, 15), FY_OK);
                    assert_int_equal(parse_with(fx, at, 3, 16), FY_ERR_FORMAT);
                    assert_int_equal(parse_with(fx, at, 16, 17), FY_ERR_FORMAT);
                    assert_int_equal(parse_with(fx, at, 5, 5), FY_ERR_FORMAT);
                    assert_int_equal(parse_with(fx, at, 6, 2), FY_ERR_FORMAT);
                    lists++;
                }
                off += kvc_group_bytes(o, f.head_dim, m, f.protect);
                left -= m;
            }
        }
    }
    assert_int_equal(off + 4, fx->len);
    assert_true(lists >= 2);
}

/* kvc_map_counts against one nibble at a time: lengths around its 32-byte vectors and its
 * 127-vector flushes, odd token counts (the last byte's high nibble is not a token), maps
 * starting at every alignment, codes from options only, from every nibble value, and runs of
 * one code (a lane counter at its limit). */
static void test_map_counts(void **state)
{
    (void)state;
    static const uint32_t lens[] = {0,    1,    2,     3,     31,    63,    64,
                                    65,   127,  128,   129,   8127,  8128,  8129,
                                    8191, 8192, 16257, 16258, 16259, 65537, 100001};
    uint8_t *buf = malloc(100001 / 2 + 1 + 64);
    assert_non_null(buf);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
        const uint32_t n = lens[li];
        const size_t nb = kvc_map_bytes(n);
        for (int kind = 0; kind < 4; kind++) {
            const uint32_t off = (uint32_t)(li * 7 + (uint32_t)kind * 13) % 32;
            uint8_t *mp = buf + off;
            for (size_t i = 0; i < nb; i++) {
                rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                uint8_t b = (uint8_t)(rng >> 33);
                if (kind == 0) // options only
                    b = (uint8_t)((b & 15) % KVC_OPT_COUNT | (((b >> 4) % KVC_OPT_COUNT) << 4));
                else if (kind == 2) // one code everywhere
                    b = 0x33;
                else if (kind == 3) // mostly one option, now and then a stray code
                    b = (rng >> 40) % 97 == 0 ? (uint8_t)(0x0f & (rng >> 50)) : 0x55;
                mp[i] = b;
            }
            uint64_t want[KVC_OPT_COUNT + 1] = {0}, got[KVC_OPT_COUNT + 1];
            for (uint32_t t = 0; t < n; t++) {
                uint32_t c = (mp[t / 2] >> (4 * (t & 1))) & 15;
                want[c < KVC_OPT_COUNT ? c : KVC_OPT_COUNT]++;
            }
            kvc_map_counts(mp, n, got);
            assert_memory_equal(got, want, sizeof(want));
        }
    }
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_map_counts),      cmocka_unit_test(test_valid),
        cmocka_unit_test(test_every_byte_flip), cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_forged_fields),   cmocka_unit_test(test_forged_channels),
        cmocka_unit_test(test_kept_counts),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
