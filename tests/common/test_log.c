// Logging: level filter, text and JSON line formats, escaping, a replaceable sink.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "common.h"

typedef struct {
    int count;
    fy_log_level_t last_level;
    char last[2048];
} capture_t;

static void capture_sink(fy_log_level_t level, const char *line, void *arg)
{
    capture_t *c = arg;
    c->count++;
    c->last_level = level;
    snprintf(c->last, sizeof(c->last), "%s", line);
}

static void test_filter_and_text(void **state)
{
    capture_t cap = {0};
    fy_log_set_sink(capture_sink, &cap);
    fy_log_set_json(false);
    fy_log_set_level(FY_LOG_WARN);
    FY_LOG_INFO("test", "hidden %d", 1);
    assert_int_equal(cap.count, 0);
    FY_LOG_ERROR("kvlink", "peer %s died after %d frames", "10.0.0.2:9000", 17);
    assert_int_equal(cap.count, 1);
    assert_int_equal(cap.last_level, FY_LOG_ERROR);
    assert_non_null(strstr(cap.last, "ERROR kvlink: peer 10.0.0.2:9000 died after 17 frames"));
    // ISO-8601 UTC timestamp with milliseconds at the start: 2026-11-22T07:47:11.123Z
    assert_int_equal(cap.last[4], '-');
    assert_int_equal(cap.last[10], 'T');
    assert_int_equal(cap.last[19], '.');
    assert_int_equal(cap.last[23], 'Z');
    fy_log_set_level(FY_LOG_OFF);
    FY_LOG_ERROR("test", "off");
    assert_int_equal(cap.count, 1);
    fy_log_set_sink(NULL, NULL);
}

static void test_json_escaping(void **state)
{
    capture_t cap = {0};
    fy_log_set_sink(capture_sink, &cap);
    fy_log_set_level(FY_LOG_TRACE);
    fy_log_set_json(true);
    FY_LOG_WARN("rpc", "bad \"header\"\n\tvalue\\");
    assert_int_equal(cap.count, 1);
    assert_true(strncmp(cap.last, "{\"ts\":\"", 7) == 0);
    assert_non_null(strstr(cap.last, "\"level\":\"warn\""));
    assert_non_null(strstr(cap.last, "\"module\":\"rpc\""));
    assert_non_null(strstr(cap.last, "\"msg\":\"bad \\\"header\\\"\\n\\u0009value\\\\\"}"));
    fy_log_set_json(false);
    fy_log_set_sink(NULL, NULL);
}

static void test_level_parse(void **state)
{
    fy_log_level_t lv = FY_LOG_INFO;
    assert_int_equal(fy_log_level_parse("debug", &lv), FY_OK);
    assert_int_equal(lv, FY_LOG_DEBUG);
    assert_int_equal(fy_log_level_parse("WARNING", &lv), FY_OK);
    assert_int_equal(lv, FY_LOG_WARN);
    assert_int_equal(fy_log_level_parse("loud", &lv), FY_ERR_INVALID_ARG);
    assert_int_equal(lv, FY_LOG_WARN);
}

static void test_long_message_truncated(void **state)
{
    capture_t cap = {0};
    fy_log_set_sink(capture_sink, &cap);
    fy_log_set_level(FY_LOG_INFO);
    char big[5000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    FY_LOG_INFO("test", "%s", big);
    assert_int_equal(cap.count, 1);
    assert_true(strlen(cap.last) < 2048);
    fy_log_set_sink(NULL, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_filter_and_text),
        cmocka_unit_test(test_json_escaping),
        cmocka_unit_test(test_level_parse),
        cmocka_unit_test(test_long_message_truncated),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
