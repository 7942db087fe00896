// GGUF reader: metadata and tensors written by the test writer read back exactly (quantized
// types within their step), v2 files read, and malformed files (every truncation, bad magic,
// version, counts, offsets, shapes) fail with an error naming the field instead of crashing.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <unistd.h>

#include "test_util.h"

static uint8_t *small_file(size_t *len_p)
{
    mdlt_gguf_t *w = mdlt_gguf_new();
    mdlt_gguf_u32(w, "a.u32", 7);
    mdlt_gguf_i32(w, "a.i32", -5);
    mdlt_gguf_f32(w, "a.f32", 1.5f);
    mdlt_gguf_bool(w, "a.bool", true);
    mdlt_gguf_str(w, "a.str", "hello");
    const char *strs[] = {"x", "yy", ""};
    mdlt_gguf_arr_str(w, "a.strs", strs, 3);
    int32_t ints[] = {1, -2, 3};
    mdlt_gguf_arr_i32(w, "a.ints", ints, 3);
    float v[64];
    for (int i = 0; i < 64; i++)
        v[i] = sinf((float)i) * 3.0f;
    uint64_t ne[2] = {32, 2};
    mdlt_gguf_tensor(w, "t.f32", MDL_TENSOR_F32, 2, ne, v);
    mdlt_gguf_tensor(w, "t.q8", MDL_TENSOR_Q8_0, 2, ne, v);
    uint8_t *buf;
    mdlt_gguf_to_mem(w, &buf, len_p);
    mdlt_gguf_free(w);
    return buf;
}

static void test_metadata_roundtrip(void **state)
{
    size_t len;
    uint8_t *buf = small_file(&len);
    mdl_gguf_t *g;
    char err[MDL_ERR_LEN];
    assert_int_equal(mdl_gguf_open_mem(buf, len, &g, err, sizeof(err)), FY_OK);
    assert_int_equal(mdl_gguf_version(g), 3);
    assert_int_equal(mdl_gguf_alignment(g), 32);
    assert_int_equal(mdl_gguf_n_kv(g), 7);
    assert_int_equal(mdl_gguf_n_tensors(g), 2);
    int64_t i;
    assert_int_equal(mdl_gguf_get_i64(g, "a.u32", &i), FY_OK);
    assert_int_equal(i, 7);
    assert_int_equal(mdl_gguf_get_i64(g, "a.i32", &i), FY_OK);
    assert_int_equal(i, -5);
    float f;
    assert_int_equal(mdl_gguf_get_f32(g, "a.f32", &f), FY_OK);
    assert_float_equal(f, 1.5f, 0);
    bool b;
    assert_int_equal(mdl_gguf_get_bool(g, "a.bool", &b), FY_OK);
    assert_true(b);
    const char *s;
    size_t sl;
    assert_int_equal(mdl_gguf_get_str(g, "a.str", &s, &sl), FY_OK);
    assert_int_equal(sl, 5);
    assert_memory_equal(s, "hello", 5);
    // Type mismatches and absent keys are errors, not guesses.
    assert_int_equal(mdl_gguf_get_i64(g, "a.str", &i), FY_ERR_FORMAT);
    assert_int_equal(mdl_gguf_get_f32(g, "a.u32", &f), FY_ERR_FORMAT);
    assert_int_equal(mdl_gguf_get_i64(g, "nope", &i), FY_ERR_NOT_FOUND);
    int64_t k = mdl_gguf_find_key(g, "a.strs");
    assert_int_equal(mdl_gguf_kv_type(g, k), MDL_GGUF_ARRAY);
    assert_int_equal(mdl_gguf_arr_type(g, k), MDL_GGUF_STRING);
    assert_int_equal(mdl_gguf_arr_len(g, k), 3);
    assert_int_equal(mdl_gguf_arr_str(g, k, 1, &s, &sl), FY_OK);
    assert_int_equal(sl, 2);
    assert_memory_equal(s, "yy", 2);
    assert_int_equal(mdl_gguf_arr_str(g, k, 3, &s, &sl), FY_ERR_OUT_OF_RANGE);
    assert_int_equal(mdl_gguf_arr_i64(g, k, 0, &i), FY_ERR_FORMAT);
    k = mdl_gguf_find_key(g, "a.ints");
    assert_int_equal(mdl_gguf_arr_i64(g, k, 1, &i), FY_OK);
    assert_int_equal(i, -2);
    char line[256];
    mdl_gguf_kv_format(g, k, line, sizeof(line));
    assert_non_null(strstr(line, "[i32 x 3] 1, -2, 3"));
    mdl_gguf_kv_format(g, mdl_gguf_find_key(g, "a.str"), line, sizeof(line));
    assert_string_equal(line, "\"hello\"");
    const mdl_gguf_tensor_t *t = mdl_gguf_find_tensor(g, "t.q8");
    assert_non_null(t);
    assert_int_equal(t->type, MDL_TENSOR_Q8_0);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 32);
    assert_int_equal(t->ne[1], 2);
    assert_int_equal(t->n_bytes, 2 * 34);
    assert_null(mdl_gguf_find_tensor(g, "t.none"));
    assert_null(mdl_gguf_tensor(g, 2));
    mdl_gguf_close(g);
    free(buf);
}

// Every type dequantizes to the written values within half a quantization step.
static void test_tensor_types(void **state)
{
    static const struct {
        uint32_t type;
        float tol; // relative to the block's range
    } types[] = {{MDL_TENSOR_F32, 0}, {MDL_TENSOR_F16, 1e-3f}, {MDL_TENSOR_BF16, 8e-3f},
                 {MDL_TENSOR_Q8_0, 1.0f / 254 + 1e-3f}, {MDL_TENSOR_Q4_0, 1.0f / 15 + 1e-3f},
                 {MDL_TENSOR_Q4_1, 1.0f / 30 + 1e-3f}};
    enum { N = 32 * 6 };
    float v[N];
    for (int i = 0; i < N; i++)
        v[i] = sinf(0.37f * i) * (1.0f + (float)(i / 32)) + 0.2f;
    for (size_t ti = 0; ti < FY_ARRAY_SIZE(types); ti++) {
        mdlt_gguf_t *w = mdlt_gguf_new();
        uint64_t ne[2] = {64, 3};
        mdlt_gguf_tensor(w, "x", types[ti].type, 2, ne, v);
        uint8_t *buf;
        size_t len;
        mdlt_gguf_to_mem(w, &buf, &len);
        mdlt_gguf_free(w);
        mdl_gguf_t *g;
        assert_int_equal(mdl_gguf_open_mem(buf, len, &g, NULL, 0), FY_OK);
        const mdl_gguf_tensor_t *t = mdl_gguf_find_tensor(g, "x");
        assert_non_null(t);
        assert_true(mdl_tensor_type_supported(t->type));
        float out[N];
        assert_int_equal(mdl_gguf_tensor_to_f32(t, out), FY_OK);
        for (int b = 0; b < N / 32; b++) {
            float mn = v[b * 32], mx = v[b * 32];
            for (int j = 0; j < 32; j++) {
                mn = fminf(mn, v[b * 32 + j]);
                mx = fmaxf(mx, v[b * 32 + j]);
            }
            float range = fmaxf(fabsf(mn), fabsf(mx)) * 2.0f;
            for (int j = 0; j < 32; j++) {
                float e = fabsf(out[b * 32 + j] - v[b * 32 + j]);
                if (e > types[ti].tol * range + 1e-6f)
                    fail_msg("%s: element %d: %f vs %f", mdl_tensor_type_name(types[ti].type),
                             b * 32 + j, out[b * 32 + j], v[b * 32 + j]);
            }
        }
        mdl_gguf_close(g);
        free(buf);
    }
}

/* Patches helpers: the small file's fields sit at fixed offsets in the header. */
static void expect_fail(const uint8_t *buf, size_t len, fy_status_t want, const char *needle)
{
    mdl_gguf_t *g = NULL;
    char err[MDL_ERR_LEN] = "";
    fy_status_t st = mdl_gguf_open_mem(buf, len, &g, err, sizeof(err));
    if (st == FY_OK)
        mdl_gguf_close(g);
    assert_int_equal(st, want);
    if (needle != NULL && strstr(err, needle) == NULL)
        fail_msg("error '%s' does not mention '%s'", err, needle);
}

static void test_malformed(void **state)
{
    size_t len;
    uint8_t *buf = small_file(&len);
    uint8_t *bad = malloc(len);
    // Every truncation before the end of the last tensor's data fails cleanly (what follows
    // is padding).
    mdl_gguf_t *full;
    assert_int_equal(mdl_gguf_open_mem(buf, len, &full, NULL, 0), FY_OK);
    const mdl_gguf_tensor_t *last = mdl_gguf_tensor(full, 1);
    size_t need = (size_t)(last->offset + last->n_bytes);
    mdl_gguf_close(full);
    for (size_t cut = 0; cut < need; cut++) {
        mdl_gguf_t *g = NULL;
        fy_status_t st = mdl_gguf_open_mem(buf, cut, &g, NULL, 0);
        assert_int_not_equal(st, FY_OK);
    }
    memcpy(bad, buf, len);
    bad[0] = 'X';
    expect_fail(bad, len, FY_ERR_FORMAT, "magic");
    memcpy(bad, buf, len);
    bad[4] = 1;
    expect_fail(bad, len, FY_ERR_UNSUPPORTED, "version");
    bad[4] = 4;
    expect_fail(bad, len, FY_ERR_UNSUPPORTED, "version");
    // Huge counts are refused before anything is allocated.
    memcpy(bad, buf, len);
    uint64_t huge = UINT64_MAX / 2;
    memcpy(bad + 8, &huge, 8);
    expect_fail(bad, len, FY_ERR_FORMAT, "n_tensors");
    memcpy(bad, buf, len);
    memcpy(bad + 16, &huge, 8);
    expect_fail(bad, len, FY_ERR_FORMAT, "n_kv");
    // First key's length runs past the end.
    memcpy(bad, buf, len);
    memcpy(bad + 24, &huge, 8);
    expect_fail(bad, len, FY_ERR_TRUNCATED, "metadata key 0");
    // An unknown value type of the first entry ("a.u32", type at 24 + 8 + 5).
    memcpy(bad, buf, len);
    uint32_t t = 99;
    memcpy(bad + 37, &t, 4);
    expect_fail(bad, len, FY_ERR_FORMAT, "a.u32");
    free(bad);

    // Tensor-level problems, built with the writer and then patched.
    mdlt_gguf_t *w = mdlt_gguf_new();
    float v[64] = {0};
    uint64_t ne[1] = {64};
    mdlt_gguf_tensor(w, "t", MDL_TENSOR_Q4_1, 1, ne, v);
    uint8_t *tb;
    size_t tl;
    mdlt_gguf_to_mem(w, &tb, &tl);
    mdlt_gguf_free(w);
    // Layout: header 24, name (8 + 1), n_dims 4 @33, ne0 8 @37, type 4 @45, offset 8 @49.
    uint8_t *p = malloc(tl);
    memcpy(p, tb, tl);
    uint32_t dims = 5;
    memcpy(p + 33, &dims, 4);
    expect_fail(p, tl, FY_ERR_FORMAT, "n_dims");
    memcpy(p, tb, tl);
    uint64_t ne0 = 48; // not a multiple of the 32-element block
    memcpy(p + 37, &ne0, 8);
    expect_fail(p, tl, FY_ERR_FORMAT, "block");
    memcpy(p, tb, tl);
    ne0 = 0;
    memcpy(p + 37, &ne0, 8);
    expect_fail(p, tl, FY_ERR_FORMAT, "ne[0]");
    memcpy(p, tb, tl);
    uint64_t off = 3;
    memcpy(p + 49, &off, 8);
    expect_fail(p, tl, FY_ERR_FORMAT, "aligned");
    memcpy(p, tb, tl);
    off = 1 << 20;
    memcpy(p + 49, &off, 8);
    expect_fail(p, tl, FY_ERR_TRUNCATED, "past the end");
    memcpy(p, tb, tl);
    ne0 = 1ull << 62;
    memcpy(p + 37, &ne0, 8);
    expect_fail(p, tl, FY_ERR_FORMAT, "out of range");
    // An unsupported type is listed but cannot be dequantized.
    memcpy(p, tb, tl);
    t = 12; // Q4_K
    memcpy(p + 45, &t, 4);
    mdl_gguf_t *g;
    assert_int_equal(mdl_gguf_open_mem(p, tl, &g, NULL, 0), FY_OK);
    assert_false(mdl_tensor_type_supported(mdl_gguf_tensor(g, 0)->type));
    assert_string_equal(mdl_tensor_type_name(12), "Q4_K");
    float out[64];
    assert_int_equal(mdl_gguf_tensor_to_f32(mdl_gguf_tensor(g, 0), out), FY_ERR_UNSUPPORTED);
    mdl_gguf_close(g);
    free(p);
    free(tb);
    free(buf);
}

static void test_version2_and_files(void **state)
{
    size_t len;
    uint8_t *buf = small_file(&len);
    uint32_t v2 = 2;
    memcpy(buf + 4, &v2, 4);
    mdl_gguf_t *g;
    assert_int_equal(mdl_gguf_open_mem(buf, len, &g, NULL, 0), FY_OK);
    assert_int_equal(mdl_gguf_version(g), 2);
    mdl_gguf_close(g);
    // Through a file (mmap), and a missing file.
    char path[] = "/tmp/ferry-test-gguf-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, len), (ssize_t)len);
    close(fd);
    char err[MDL_ERR_LEN];
    assert_int_equal(mdl_gguf_open(path, &g, err, sizeof(err)), FY_OK);
    assert_int_equal(mdl_gguf_n_tensors(g), 2);
    mdl_gguf_close(g);
    unlink(path);
    assert_int_not_equal(mdl_gguf_open(path, &g, err, sizeof(err)), FY_OK);
    assert_non_null(strstr(err, "cannot open"));
    free(buf);
}

// A model file missing a tensor or with a wrong shape names it.
static void test_model_errors(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    uint8_t *buf;
    size_t len;
    mdlt_tiny_model_mem(&tp, &buf, &len);
    // Rename blk.1.ffn_up.weight in place so it goes missing.
    uint8_t *hit = memmem(buf, len, "blk.1.ffn_up.weight", 19);
    assert_non_null(hit);
    hit[6] = 'X';
    mdl_gguf_t *g;
    assert_int_equal(mdl_gguf_open_mem(buf, len, &g, NULL, 0), FY_OK);
    mdl_model_t *m = NULL;
    char err[MDL_ERR_LEN];
    assert_int_equal(mdl_model_create_from_gguf(g, &m, err, sizeof(err)), FY_ERR_NOT_FOUND);
    assert_non_null(strstr(err, "blk.1.ffn_up.weight"));
    mdl_gguf_close(g);
    free(buf);
    // Unknown architecture.
    mdlt_gguf_t *w = mdlt_gguf_new();
    mdlt_gguf_str(w, "general.architecture", "mamba");
    mdlt_gguf_to_mem(w, &buf, &len);
    mdlt_gguf_free(w);
    assert_int_equal(mdl_gguf_open_mem(buf, len, &g, NULL, 0), FY_OK);
    assert_int_equal(mdl_model_create_from_gguf(g, &m, err, sizeof(err)), FY_ERR_UNSUPPORTED);
    assert_non_null(strstr(err, "mamba"));
    mdl_gguf_close(g);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metadata_roundtrip), cmocka_unit_test(test_tensor_types),
        cmocka_unit_test(test_malformed),          cmocka_unit_test(test_version2_and_files),
        cmocka_unit_test(test_model_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
