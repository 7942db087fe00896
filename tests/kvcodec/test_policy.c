// Policies: every built-in validates; a JSON file overrides its base policy key by key;
// unknown keys, bad values and broken JSON fail with a message naming the problem.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "kvcodec.h"

static void test_builtins(void **state)
{
    const char *const *names = kvc_policy_builtin_names();
    int n = 0;
    for (; names[n]; n++) {
        kvc_policy_t p;
        char err[128] = "";
        assert_int_equal(kvc_policy_builtin(names[n], &p), FY_OK);
        assert_string_equal(p.name, names[n]);
        assert_int_equal(kvc_policy_validate(&p, err, sizeof(err)), FY_OK);
    }
    assert_int_equal(n, 9);
    kvc_policy_t p;
    assert_int_equal(kvc_policy_builtin("nope", &p), FY_ERR_NOT_FOUND);
    kvc_policy_builtin("kivi2", &p);
    assert_int_equal(p.options, KVC_OPT_BIT(KVC_OPT_Q2));
    assert_int_equal(p.recent, 128);
    kvc_policy_builtin("spectrum3", &p);
    assert_int_equal(p.options, KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_Q8) |
                                    KVC_OPT_BIT(KVC_OPT_Q4));
    assert_false(p.pins_kept); // the baselines pin their sinks and recent tokens to 16/16
    kvc_policy_builtin("ferry", &p);
    assert_int_equal(p.sinks, 4);
    assert_true(p.pins_kept);
}

static void test_file(void **state)
{
    const char *root = getenv("FERRY_SOURCE_ROOT");
    assert_non_null(root);
    char path[1024];
    snprintf(path, sizeof(path), "%s/tests/kvcodec/data/policy-example.json", root);
    kvc_policy_t p;
    char err[256] = "";
    assert_int_equal(kvc_policy_load_file(path, &p, err, sizeof(err)), FY_OK);
    assert_string_equal(p.name, "ferry-k8");
    assert_int_equal(p.options, KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_Q8) |
                                    KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_DROP));
    assert_int_equal(p.group, 64);
    assert_int_equal(p.sinks, 8);
    assert_false(p.pins_kept);
    assert_int_equal(p.recent, 128);
    assert_int_equal(p.window, 16);
    assert_int_equal(p.pool_kernel, 5);
    assert_int_equal(p.reduce, KVC_REDUCE_MAX);
    assert_false(p.joint_kv);
    assert_false(p.rotate);
    assert_true(fabsf(p.backbone_frac - 0.05f) < 1e-6f);
    assert_int_equal(p.backbone_opt, KVC_OPT_F16);
    assert_true(fabsf(p.hybrid_threshold - 0.8f) < 1e-6f);
    assert_int_equal(p.dist, KVC_DIST_TRIAL);
    assert_true(p.budget == 0.3);
    assert_true(p.rate_flex == 0.1);
    assert_int_equal(kvc_policy_load_file("/nonexistent/policy.json", &p, err, sizeof(err)),
                     FY_ERR_IO);
}

static void expect_fail(const char *json, const char *needle)
{
    kvc_policy_t p;
    memset(&p, 0x5a, sizeof(p));
    kvc_policy_t before = p;
    char err[256] = "";
    assert_int_not_equal(kvc_policy_parse_json(json, strlen(json), &p, err, sizeof(err)), FY_OK);
    assert_non_null(strstr(err, needle));
    assert_memory_equal(&p, &before, sizeof(p)); // untouched on error
}

static void test_errors(void **state)
{
    expect_fail("{\"grup\": 32}", "grup");
    expect_fail("{\"group\": 12}", "group");
    expect_fail("{\"group\": -8}", "group");
    expect_fail("{\"group\": 32.5}", "group");
    expect_fail("{\"options\": [\"3/3\"]}", "options");
    expect_fail("{\"options\": []}", "options");
    expect_fail("{\"pool_kernel\": 4}", "pooling");
    expect_fail("{\"budget\": 2}", "budget");
    expect_fail("{\"reduce\": \"median\"}", "reduce");
    expect_fail("{\"base\": \"nope\"}", "base");
    expect_fail("{\"backbone_option\": \"4/4\"}", "backbone");
    expect_fail("{\"name\": \"\"}", "name");
    expect_fail("{\"protect_channels\": 33}", "protect_channels");
    expect_fail("{\"prior\": -1}", "prior");
    expect_fail("{\"prior\": 65}", "prior");
    expect_fail("{\"drop_spread\": 65}", "drop_spread");
    expect_fail("[1, 2]", "object");
    expect_fail("{\"group\": ", "JSON");
    expect_fail("{\"pins_kept\": 1}", "pins_kept");
}

/* The trial distortion's knobs: prior and drop_spread read from JSON and range-checked,
 * drop_spread on for ferry only (the range in JSON: test_errors). */
static void test_prior_spread(void **state)
{
    const char *js = "{\"prior\": 2.5, \"drop_spread\": 0.5}";
    kvc_policy_t p;
    char err[256] = "";
    assert_int_equal(kvc_policy_parse_json(js, strlen(js), &p, err, sizeof(err)), FY_OK);
    assert_true(p.prior == 2.5f);
    assert_true(p.drop_spread == 0.5f);
    p.prior = -0.5f;
    assert_int_equal(kvc_policy_validate(&p, err, sizeof(err)), FY_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "prior"));
    assert_int_equal(kvc_policy_builtin("ferry", &p), FY_OK);
    assert_true(p.drop_spread == 1.0f);
    p.drop_spread = NAN;
    assert_int_equal(kvc_policy_validate(&p, err, sizeof(err)), FY_ERR_INVALID_ARG);
    assert_int_equal(kvc_policy_builtin("snapkv", &p), FY_OK);
    assert_true(p.drop_spread == 0.0f);
}

static void test_base(void **state)
{
    const char *js = "{\"base\": \"snapkv\", \"budget\": 0.1}";
    kvc_policy_t p;
    assert_int_equal(kvc_policy_parse_json(js, strlen(js), &p, NULL, 0), FY_OK);
    assert_string_equal(p.name, "snapkv");
    assert_int_equal(p.options, KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_DROP));
    assert_true(p.budget == 0.1);
    assert_false(p.pins_kept);
    js = "{\"base\": \"spectrum3\", \"pins_kept\": true}";
    assert_int_equal(kvc_policy_parse_json(js, strlen(js), &p, NULL, 0), FY_OK);
    assert_true(p.pins_kept);
    assert_int_equal(p.sinks, 4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_builtins),     cmocka_unit_test(test_file),
        cmocka_unit_test(test_errors),       cmocka_unit_test(test_base),
        cmocka_unit_test(test_prior_spread),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
