// The daemons' API key (daemon_api_key): --api-key, --api-key-file and their environment
// variables, which one wins, and the clear refusals for files that hold no usable key.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon.h"

static const fy_opt_t k_opts[] = {
    {"api-key", FY_OPT_STRING, "", "key", false},
    {"api-key-file", FY_OPT_STRING, "", "key file", false},
};

static char g_dir[] = "/tmp/ferry-key-XXXXXX";

static int setup(void **state)
{
    (void)state;
    unsetenv("FERRY_API_KEY");
    unsetenv("FERRY_API_KEY_FILE");
    return mkdtemp(g_dir) == NULL ? -1 : 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[64];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

// Writes `len` bytes of text to g_dir/name with the given mode; returns the path (static).
static const char *key_file(const char *name, const char *text, size_t len, mode_t mode)
{
    static char path[128];
    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(chmod(path, mode), 0);
    return path;
}

// daemon_api_key over a config with the given options set (NULL: unset).
static fy_status_t key_of(const char *key, const char *file, const char **out)
{
    fy_config_t *cfg = NULL;
    char err[128];
    assert_int_equal(fy_config_create(k_opts, 2, &cfg), FY_OK);
    if (key)
        assert_int_equal(fy_config_set(cfg, "api-key", key, err, sizeof(err)), FY_OK);
    if (file)
        assert_int_equal(fy_config_set(cfg, "api-key-file", file, err, sizeof(err)), FY_OK);
    *out = (const char *)0x1;
    fy_status_t st = daemon_api_key(cfg, out);
    static char copy[300];
    if (st == FY_OK && *out != NULL) { // a key from the config lives only as long as it
        snprintf(copy, sizeof(copy), "%s", *out);
        *out = copy;
    }
    fy_config_destroy(cfg);
    return st;
}

static void test_sources(void **state)
{
    (void)state;
    const char *k;
    assert_int_equal(key_of(NULL, NULL, &k), FY_OK);
    assert_null(k); // no key anywhere: open
    assert_int_equal(key_of("abc", NULL, &k), FY_OK);
    assert_string_equal(k, "abc");

    // The first line, its line end and trailing blanks dropped.
    const char *p = key_file("k1", "s3cr3t-key \r\nsecond line\n", 25, 0600);
    assert_int_equal(key_of(NULL, p, &k), FY_OK);
    assert_string_equal(k, "s3cr3t-key");
    // Without a line end; readable by everyone still works (with a warning).
    p = key_file("k2", "other", 5, 0644);
    assert_int_equal(key_of(NULL, p, &k), FY_OK);
    assert_string_equal(k, "other");
    // Both options: which one was meant is unclear.
    assert_int_equal(key_of("abc", p, &k), FY_ERR_INVALID_ARG);

    // The environment: options first, then FERRY_API_KEY, then FERRY_API_KEY_FILE.
    setenv("FERRY_API_KEY_FILE", p, 1);
    assert_int_equal(key_of(NULL, NULL, &k), FY_OK);
    assert_string_equal(k, "other");
    setenv("FERRY_API_KEY", "env-key", 1);
    assert_int_equal(key_of(NULL, NULL, &k), FY_OK);
    assert_string_equal(k, "env-key");
    assert_int_equal(key_of("opt", NULL, &k), FY_OK);
    assert_string_equal(k, "opt");
    const char *p1 = key_file("k3", "from-file\n", 10, 0600);
    assert_int_equal(key_of(NULL, p1, &k), FY_OK);
    assert_string_equal(k, "from-file");
    unsetenv("FERRY_API_KEY");
    unsetenv("FERRY_API_KEY_FILE");
}

static void test_bad_files(void **state)
{
    (void)state;
    const char *k;
    char missing[128];
    snprintf(missing, sizeof(missing), "%s/none", g_dir);
    assert_int_equal(key_of(NULL, missing, &k), FY_ERR_NOT_FOUND);
    assert_int_equal(key_of(NULL, key_file("empty", "", 0, 0600), &k), FY_ERR_INVALID_ARG);
    assert_int_equal(key_of(NULL, key_file("blank", "  \n", 3, 0600), &k), FY_ERR_INVALID_ARG);
    assert_int_equal(key_of(NULL, key_file("space", "two words\n", 10, 0600), &k),
                     FY_ERR_INVALID_ARG);
    assert_int_equal(key_of(NULL, key_file("nul", "ab\0cd\n", 6, 0600), &k), FY_ERR_INVALID_ARG);
    assert_int_equal(key_of(NULL, key_file("utf8", "cl\xc3\xa9\n", 5, 0600), &k),
                     FY_ERR_INVALID_ARG);
    char big[300];
    memset(big, 'a', sizeof(big));
    assert_int_equal(key_of(NULL, key_file("256", big, 256, 0600), &k), FY_OK);
    assert_int_equal(strlen(k), 256);
    assert_int_equal(key_of(NULL, key_file("257", big, 257, 0600), &k), FY_ERR_INVALID_ARG);
    assert_int_equal(key_of(NULL, key_file("300", big, 300, 0600), &k), FY_ERR_INVALID_ARG);
    if (geteuid() != 0) { // root reads any file
        const char *p = key_file("locked", "abc\n", 4, 0000);
        assert_int_equal(key_of(NULL, p, &k), FY_ERR_IO);
    }
    char over[300];
    memset(over, 'b', 257);
    over[257] = '\0';
    assert_int_equal(key_of(over, NULL, &k), FY_ERR_INVALID_ARG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sources),
        cmocka_unit_test(test_bad_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
