// Calibration files (`ferry calibrate`'s .calibration.json) in policies: a policy file names one
// by a path relative to itself; its layer weights move bytes to the sensitive layers (per-layer
// shares, total unchanged, never over budget) and scale each layer's distortion; its multiplier
// table is tried on layer 0 first. A malformed file fails with a message naming the file and
// the key, and leaves the policy unchanged; a calibration for another layer count is refused.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <unistd.h>

#include "kvtest.h"

#define N_LAYERS 4

static char g_dir[256];

static void write_file(const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup(void **state)
{
    snprintf(g_dir, sizeof(g_dir), "/tmp/ferry-test-calib-XXXXXX");
    return mkdtemp(g_dir) == NULL ? -1 : 0;
}

static int teardown(void **state)
{
    const char *names[] = {"m.calibration.json", "m.policy.json", "bad.json", "bad.policy.json"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", g_dir, names[i]);
        unlink(path);
    }
    rmdir(g_dir);
    return 0;
}

/* Encodes N_LAYERS layers of the same synthetic data at budget b; bytes[l] per layer, lambda[l]
 * the multiplier each layer used, the choices of all layers concatenated into choice. */
static uint64_t encode(const kvc_policy_t *pol, double b, size_t *bytes, double *lambda)
{
    kvt_layer_t L;
    kvt_layer_make(&L, 5, 4, 2, 512, 64, 32);
    kvc_encoder_params_t p = kvt_params(pol, &L, N_LAYERS, b);
    kvc_encoder_t *enc = NULL;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(enc);
    uint8_t *buf = malloc(cap);
    uint64_t total = 0, budget = 0, spent = 0;
    for (uint32_t l = 0; l < N_LAYERS; l++) {
        kvc_layer_input_t in = kvt_input(&L, l);
        kvc_layer_info_t info;
        assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, buf, cap, &bytes[l], &info),
                         FY_OK);
        assert_true(info.budget_met);
        lambda[l] = info.lambda;
        total += bytes[l];
        kvc_encoder_totals(enc, &spent, &budget);
        assert_true(spent <= budget); // never over, after every layer
    }
    free(buf);
    kvc_encoder_destroy(enc);
    kvt_layer_free(&L);
    return total;
}

static void test_load(void **state)
{
    write_file("m.calibration.json",
               "{\"probes\": [], \"lambda\": [{\"budget\": 0.5, \"lambda_first\": 1e-4},"
               " {\"budget\": 0.125, \"lambda_first\": 2e-3}],"
               " \"layer_weights\": [4, 0.25, 0.25, 4], \"model\": \"m.gguf\"}");
    write_file("m.policy.json", "{\"base\": \"ferry\", \"name\": \"ferry-calibrated\","
                                " \"calibration\": \"m.calibration.json\", \"layer_alloc\": 1}");
    char path[512], err[512] = "";
    snprintf(path, sizeof(path), "%s/m.policy.json", g_dir);
    kvc_policy_t p;
    assert_int_equal(kvc_policy_load_file(path, &p, err, sizeof(err)), FY_OK);
    assert_string_equal(p.name, "ferry-calibrated");
    assert_int_equal(p.n_layer_weights, 4);
    assert_true(p.layer_weight[0] == 4.0f && p.layer_weight[1] == 0.25f);
    assert_true(p.layer_alloc == 1.0f);
    assert_int_equal(p.n_lambdas, 2);
    assert_true(p.lambda_budget[0] == 0.125 && p.lambda_first[1] == 1e-4);
    // The same file through kvc_policy_load_calibration onto a built-in policy.
    kvc_policy_t q;
    kvc_policy_builtin("ferry", &q);
    snprintf(path, sizeof(path), "%s/m.calibration.json", g_dir);
    assert_int_equal(kvc_policy_load_calibration(path, &q, err, sizeof(err)), FY_OK);
    assert_string_equal(q.name, "ferry");
    assert_int_equal(q.n_layer_weights, 4);
    assert_true(q.layer_weight[3] == 4.0f);
    // Inline weights in a policy, without a file.
    const char *js = "{\"layer_weights\": [1, 2], \"layer_gamma\": 0.5}";
    assert_int_equal(kvc_policy_parse_json(js, strlen(js), &q, err, sizeof(err)), FY_OK);
    assert_int_equal(q.n_layer_weights, 2);
    assert_true(q.layer_gamma == 0.5f);
}

/* Per-layer byte shares: with weights 4, 1/4, 1/4, 4 the outer layers take more bytes than the
 * inner ones, where the plain controller gives identical layers equal shares; the request's
 * total stays within the same budget. */
static void test_layer_alloc(void **state)
{
    kvc_policy_t plain, cal;
    kvc_policy_builtin("ferry", &plain);
    cal = plain;
    const float w[N_LAYERS] = {4, 0.25f, 0.25f, 4};
    cal.n_layer_weights = N_LAYERS;
    memcpy(cal.layer_weight, w, sizeof(w));
    cal.layer_alloc = 1;
    cal.layer_gamma = 0;
    size_t bp[N_LAYERS], bc[N_LAYERS];
    double lp[N_LAYERS], lc[N_LAYERS];
    double b = 0.125;
    uint64_t tp = encode(&plain, b, bp, lp), tc = encode(&cal, b, bc, lc);
    for (int l = 1; l < N_LAYERS; l++) // identical layers, equal shares
        assert_true(fabs((double)bp[l] - (double)bp[0]) < 0.3 * (double)bp[0]);
    assert_true(bc[0] > 2 * bc[1]);
    assert_true(bc[3] > 2 * bc[2]);
    assert_true(bc[0] > bp[0] && bc[1] < bp[1]);
    double budget = b * 4.0 * 2 * 512 * 64 * N_LAYERS;
    assert_true(tp <= budget && tc <= budget);
    assert_true((double)tc > 0.95 * budget); // the sensitive layers spend what the others save
    // layer_alloc 0 turns the shares off: the same bytes as without a calibration.
    cal.layer_alloc = 0;
    size_t b0[N_LAYERS];
    double l0[N_LAYERS];
    assert_int_equal(encode(&cal, b, b0, l0), tp);
    assert_memory_equal(b0, bp, sizeof(bp));
}

/* Distortion weights: a layer weighted up gets its distortion scaled, so the multiplier the
 * controller carries is in weighted units and the choices change; weights of 1 change
 * nothing. */
static void test_layer_gamma(void **state)
{
    kvc_policy_t plain, cal;
    kvc_policy_builtin("ferry", &plain);
    cal = plain;
    cal.n_layer_weights = N_LAYERS;
    for (int l = 0; l < N_LAYERS; l++)
        cal.layer_weight[l] = 1;
    cal.layer_alloc = 0;
    cal.layer_gamma = 1;
    size_t bp[N_LAYERS], bc[N_LAYERS];
    double lp[N_LAYERS], lc[N_LAYERS];
    encode(&plain, 0.25, bp, lp);
    encode(&cal, 0.25, bc, lc);
    assert_memory_equal(bp, bc, sizeof(bp));
    // Layer 1 at 1/16 of layer 0's weight: at layer 0's multiplier it would fall below the
    // band, so it is re-solved; its multiplier (in weighted units) is far below layer 0's.
    const float w[N_LAYERS] = {1, 1.0f / 16, 1, 1};
    memcpy(cal.layer_weight, w, sizeof(w));
    encode(&cal, 0.25, bc, lc);
    assert_true(lc[1] < lc[0] / 4);
    assert_true(lp[1] == lp[0] || lp[1] > lc[1]);
}

/* The calibrated multiplier is layer 0's first try: kept when its bytes fall in the band
 * around the share, re-solved when they do not. */
static void test_lambda_start(void **state)
{
    kvc_policy_t plain, cal;
    kvc_policy_builtin("ferry", &plain);
    size_t bp[N_LAYERS], bc[N_LAYERS];
    double lp[N_LAYERS], lc[N_LAYERS];
    encode(&plain, 0.25, bp, lp);
    cal = plain;
    cal.n_lambdas = 2;
    cal.lambda_budget[0] = 0.1;
    cal.lambda_budget[1] = 0.5;
    // Log-log interpolation between the entries gives exactly 1.5 x layer 0's own solution.
    double want = lp[0] * 1.5;
    double t = log(0.25 / 0.1) / log(0.5 / 0.1);
    cal.lambda_first[0] = want / pow(2.0, t);
    cal.lambda_first[1] = want * pow(2.0, 1 - t);
    encode(&cal, 0.25, bc, lc);
    assert_true(fabs(lc[0] / want - 1) < 1e-9); // kept
    cal.lambda_first[0] = cal.lambda_first[1] = 1e-25; // everything 16/16: out of the band
    encode(&cal, 0.25, bc, lc);
    assert_true(lc[0] > 1e-20);
    assert_true(bc[0] <= bp[0] * 1.3);
}

static void expect_bad(const char *text, const char *needle)
{
    write_file("bad.json", text);
    char path[512], err[512] = "";
    snprintf(path, sizeof(path), "%s/bad.json", g_dir);
    kvc_policy_t p, before;
    kvc_policy_builtin("ferry", &p);
    before = p;
    assert_int_equal(kvc_policy_load_calibration(path, &p, err, sizeof(err)), FY_ERR_FORMAT);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, needle));
    assert_memory_equal(&p, &before, sizeof(p));
}

static void test_malformed(void **state)
{
    expect_bad("{\"layer_weights\": [1, 2,", "not valid JSON");
    expect_bad("[1, 2]", "expected an object");
    expect_bad("{\"lambda\": []}", "no \"layer_weights\"");
    expect_bad("{\"layer_weights\": []}", "\"layer_weights\"");
    expect_bad("{\"layer_weights\": [1, \"x\"]}", "\"layer_weights\"");
    expect_bad("{\"layer_weights\": [1, -0.5]}", "\"layer_weights\"");
    expect_bad("{\"layer_weights\": [1], \"lambda\": [{\"budget\": 0.5, \"lambda_first\": 1},"
               " {\"budget\": 0.5, \"lambda_first\": 2}]}",
               "\"lambda\"");
    expect_bad("{\"layer_weights\": [1], \"lambda\": [{\"budget\": 1.5, \"lambda_first\": 1}]}",
               "\"lambda\"");
    expect_bad("{\"layer_weights\": [1], \"lambda\": [{\"budget\": 0.5}]}", "\"lambda\"");
    char err[512] = "";
    kvc_policy_t p;
    kvc_policy_builtin("ferry", &p);
    assert_int_equal(kvc_policy_load_calibration("/nonexistent/x.calibration.json", &p, err,
                                                 sizeof(err)),
                     FY_ERR_IO);
    assert_non_null(strstr(err, "cannot open"));
    // Through a policy file: the message names the key and the calibration's problem.
    write_file("bad.json", "{\"layer_weights\": {}}");
    write_file("bad.policy.json", "{\"calibration\": \"bad.json\"}");
    char path[512];
    snprintf(path, sizeof(path), "%s/bad.policy.json", g_dir);
    assert_int_not_equal(kvc_policy_load_file(path, &p, err, sizeof(err)), FY_OK);
    assert_non_null(strstr(err, "\"calibration\""));
    assert_non_null(strstr(err, "\"layer_weights\""));
    const char *js = "{\"layer_alloc\": 9}";
    assert_int_not_equal(kvc_policy_parse_json(js, strlen(js), &p, err, sizeof(err)), FY_OK);
    assert_non_null(strstr(err, "layer_alloc"));
    // A calibration of another model (3 layers) is refused by a 4-layer encoder.
    kvc_policy_builtin("ferry", &p);
    p.n_layer_weights = 3;
    p.layer_weight[0] = p.layer_weight[1] = p.layer_weight[2] = 1;
    kvt_layer_t L;
    kvt_layer_make(&L, 1, 4, 2, 40, 64, 8);
    kvc_encoder_params_t ep = kvt_params(&p, &L, N_LAYERS, 0.25);
    kvc_encoder_t *enc = NULL;
    assert_int_equal(kvc_encoder_create(&ep, &enc), FY_ERR_INVALID_ARG);
    kvt_layer_free(&L);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load),         cmocka_unit_test(test_layer_alloc),
        cmocka_unit_test(test_layer_gamma),  cmocka_unit_test(test_lambda_start),
        cmocka_unit_test(test_malformed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
