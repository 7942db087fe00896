// Configuration: defaults < YAML file < flags; typed values with units; clear errors that
// name the file, line and option.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

static const fy_opt_t k_opts[] = {
    {"listen", FY_OPT_STRING, "127.0.0.1:7000", "address to listen on", false},
    {"kv-memory", FY_OPT_SIZE, "1GiB", "KV page pool size", false},
    {"threads", FY_OPT_INT, "0", "worker threads", false},
    {"codec.budget", FY_OPT_DOUBLE, "0.25", "KV wire budget", false},
    {"json-logs", FY_OPT_BOOL, "false", "log JSON lines", false},
    {"lease", FY_OPT_DURATION, "5s", "reservation lease", false},
    {"model", FY_OPT_STRING, NULL, "GGUF model path", true},
};

static char *write_tmp(const char *text)
{
    char *path = strdup("/tmp/ferry-test-config-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

static void test_defaults_file_flags(void **state)
{
    fy_config_t *cfg = NULL;
    assert_int_equal(fy_config_create(k_opts, FY_ARRAY_SIZE(k_opts), &cfg), FY_OK);
    char *path = write_tmp("# decode worker\nkv_memory: 512M\nthreads: 4\n"
                           "codec:\n  budget: 0.125\nmodel: /m.gguf\n");
    char cfg_arg[256];
    snprintf(cfg_arg, sizeof(cfg_arg), "--config=%s", path);
    char *argv[] = {"prog", "--threads", "8", cfg_arg, "--json-logs", "pos1",
                    "--lease=250ms", "--", "--not-a-flag"};
    char err[256] = "";
    assert_int_equal(fy_config_parse_args(cfg, FY_ARRAY_SIZE(argv), argv, err, sizeof(err)),
                     FY_OK);
    assert_int_equal(fy_config_validate(cfg, err, sizeof(err)), FY_OK);
    assert_string_equal(fy_config_str(cfg, "listen"), "127.0.0.1:7000"); // default
    assert_int_equal(fy_config_size(cfg, "kv-memory"), 512ull << 20);   // file
    assert_int_equal(fy_config_int(cfg, "threads"), 8); // flag beats file, whatever the order
    assert_true(fy_config_double(cfg, "codec.budget") == 0.125);        // nested key
    assert_true(fy_config_bool(cfg, "json-logs"));
    assert_int_equal(fy_config_duration_ms(cfg, "lease"), 250);
    assert_string_equal(fy_config_str(cfg, "model"), "/m.gguf");
    assert_true(fy_config_is_set(cfg, "threads"));
    assert_false(fy_config_is_set(cfg, "listen"));
    assert_int_equal(fy_config_n_positional(cfg), 2);
    assert_string_equal(fy_config_positional(cfg, 0), "pos1");
    assert_string_equal(fy_config_positional(cfg, 1), "--not-a-flag");
    assert_false(fy_config_help_requested(cfg));
    unlink(path);
    free(path);
    fy_config_destroy(cfg);
}

static void test_errors_are_clear(void **state)
{
    fy_config_t *cfg = NULL;
    char err[256];
    assert_int_equal(fy_config_create(k_opts, FY_ARRAY_SIZE(k_opts), &cfg), FY_OK);

    char *argv1[] = {"prog", "--threads", "many"};
    assert_int_equal(fy_config_parse_args(cfg, 3, argv1, err, sizeof(err)), FY_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "threads"));
    assert_non_null(strstr(err, "many"));

    char *argv2[] = {"prog", "--colour"};
    assert_int_equal(fy_config_parse_args(cfg, 2, argv2, err, sizeof(err)), FY_ERR_NOT_FOUND);
    assert_non_null(strstr(err, "--colour"));

    char *argv3[] = {"prog", "--listen"};
    assert_int_equal(fy_config_parse_args(cfg, 2, argv3, err, sizeof(err)), FY_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "needs a value"));

    // Required option missing.
    assert_int_equal(fy_config_validate(cfg, err, sizeof(err)), FY_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "model"));

    char *path = write_tmp("threads: 2\nbogus: 1\n");
    assert_int_equal(fy_config_load_file(cfg, path, err, sizeof(err)), FY_ERR_NOT_FOUND);
    assert_non_null(strstr(err, ":2: unknown option 'bogus'"));
    unlink(path);
    free(path);

    path = write_tmp("kv_memory: lots\n");
    assert_int_equal(fy_config_load_file(cfg, path, err, sizeof(err)), FY_ERR_INVALID_ARG);
    assert_non_null(strstr(err, ":1: invalid size"));
    unlink(path);
    free(path);

    path = write_tmp("threads: [1, 2\n");
    assert_int_equal(fy_config_load_file(cfg, path, err, sizeof(err)), FY_ERR_FORMAT);
    unlink(path);
    free(path);

    assert_int_equal(fy_config_load_file(cfg, "/nonexistent/ferry.yaml", err, sizeof(err)),
                     FY_ERR_NOT_FOUND);
    assert_non_null(strstr(err, "/nonexistent/ferry.yaml"));

    char *argv4[] = {"prog", "-h", "--no-json-logs"};
    assert_int_equal(fy_config_parse_args(cfg, 3, argv4, err, sizeof(err)), FY_OK);
    assert_true(fy_config_help_requested(cfg));
    assert_false(fy_config_bool(cfg, "json-logs"));
    fy_config_destroy(cfg);
}

static void test_value_parsers(void **state)
{
    uint64_t v = 0;
    assert_int_equal(fy_parse_size("4K", &v), FY_OK);
    assert_int_equal(v, 4096);
    assert_int_equal(fy_parse_size("1.5 GiB", &v), FY_OK);
    assert_int_equal(v, 1610612736ull);
    assert_int_equal(fy_parse_size("10MB", &v), FY_OK);
    assert_int_equal(v, 10000000ull);
    assert_int_equal(fy_parse_size("-1", &v), FY_ERR_INVALID_ARG);
    assert_int_equal(fy_parse_size("12parsecs", &v), FY_ERR_INVALID_ARG);
    assert_int_equal(fy_parse_size("99999999T", &v), FY_ERR_OUT_OF_RANGE);
    assert_int_equal(fy_parse_duration_ms("2m", &v), FY_OK);
    assert_int_equal(v, 120000);
    assert_int_equal(fy_parse_duration_ms("1.5s", &v), FY_OK);
    assert_int_equal(v, 1500);
    assert_int_equal(fy_parse_duration_ms("soon", &v), FY_ERR_INVALID_ARG);
    bool b = false;
    assert_int_equal(fy_parse_bool("Yes", &b), FY_OK);
    assert_true(b);
    assert_int_equal(fy_parse_bool("maybe", &b), FY_ERR_INVALID_ARG);
}

static void test_help_lists_options(void **state)
{
    fy_config_t *cfg = NULL;
    assert_int_equal(fy_config_create(k_opts, FY_ARRAY_SIZE(k_opts), &cfg), FY_OK);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    fy_config_print_help(cfg, f, "ferry-decode [options]", "Decode worker.");
    fclose(f);
    assert_non_null(strstr(text, "usage: ferry-decode [options]"));
    assert_non_null(strstr(text, "--kv-memory size"));
    assert_non_null(strstr(text, "[default: 1GiB]"));
    assert_non_null(strstr(text, "(required)"));
    free(text);
    fy_config_destroy(cfg);
}

/* API keys: the scheme in any case, the key exactly (no prefix, no extension), none = open. */
static void test_bearer(void **state)
{
    static const struct {
        const char *auth, *key;
        bool ok;
    } k_cases[] = {
        {"Bearer k3y", "k3y", true}, {"bearer k3y", "k3y", true},   {"BEARER k3y", "k3y", true},
        {"Bearer k3", "k3y", false}, {"Bearer k3yy", "k3y", false}, {"Bearer K3Y", "k3y", false},
        {"Basic k3y", "k3y", false}, {"Bearer", "k3y", false},      {"", "k3y", false},
        {NULL, "k3y", false},        {"Bearer  k3y", "k3y", false}, {NULL, NULL, true},
        {"anything", "", true},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cases); i++) {
        const char *a = k_cases[i].auth;
        if (fy_bearer_ok(a, a ? strlen(a) : 0, k_cases[i].key) != k_cases[i].ok)
            fail_msg("case %zu: \"%s\" against \"%s\"", i, a ? a : "(none)",
                     k_cases[i].key ? k_cases[i].key : "(none)");
    }
    // Only len bytes count: a longer buffer holding the key is not the key.
    assert_false(fy_bearer_ok("Bearer k3yXYZ", 10, "k3yX"));
    assert_true(fy_bearer_ok("Bearer k3yXYZ", 10, "k3y"));
}

/* The KV budget floor: at least FY_KV_FLOOR_TOKENS FP16 tokens' bytes, never above 1; no budget
 * stays none. */
static void test_kv_budget_floor(void **state)
{
    (void)state;
    assert_true(fy_kv_budget_floor(0.25, 5) == 1.0);
    assert_true(fy_kv_budget_floor(0.25, FY_KV_FLOOR_TOKENS) == 1.0);
    assert_true(fy_kv_budget_floor(0.125, 2 * FY_KV_FLOOR_TOKENS) == 0.5);
    assert_true(fy_kv_budget_floor(0.75, 2 * FY_KV_FLOOR_TOKENS) == 0.75);
    assert_true(fy_kv_budget_floor(0.25, 4 * FY_KV_FLOOR_TOKENS) == 0.25);
    assert_true(fy_kv_budget_floor(0.25, 1000) == 0.25);
    assert_true(fy_kv_budget_floor(0, 5) == 0);
    assert_true(fy_kv_budget_floor(-1, 5) == -1);
    assert_true(fy_kv_budget_floor(0.25, 0) == 0.25);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_file_flags),
        cmocka_unit_test(test_errors_are_clear),
        cmocka_unit_test(test_value_parsers),
        cmocka_unit_test(test_help_lists_options),
        cmocka_unit_test(test_bearer),
        cmocka_unit_test(test_kv_budget_floor),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
