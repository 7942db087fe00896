/*
 * log.c: one line per event, as text ("2026-11-22T07:47:11.123Z INFO  kvlink: ...") or as JSON
 * lines. The sink is the only global state in Ferry; it defaults to stderr and a test or a
 * daemon may replace it. Lines are formatted into a stack buffer and written with one call so
 * that lines from different threads never interleave.
 */
#include "common.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static _Atomic int g_level = -1; // -1: not yet read from the environment
static _Atomic int g_json = -1;
static fy_log_sink_cb g_sink;
static void *g_sink_arg;

static const char *const k_level_names[] = {"trace", "debug", "info", "warn", "error", "off"};

fy_status_t fy_log_level_parse(const char *s, fy_log_level_t *level_p)
{
    if (s == NULL)
        return FY_ERR_INVALID_ARG;
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_level_names); i++) {
        if (strcasecmp(s, k_level_names[i]) == 0) {
            *level_p = (fy_log_level_t)i;
            return FY_OK;
        }
    }
    if (strcasecmp(s, "warning") == 0) {
        *level_p = FY_LOG_WARN;
        return FY_OK;
    }
    return FY_ERR_INVALID_ARG;
}

static int log_level_now(void)
{
    int lv = atomic_load_explicit(&g_level, memory_order_relaxed);
    if (lv >= 0)
        return lv;
    fy_log_level_t parsed = FY_LOG_INFO;
    const char *env = getenv("FERRY_LOG");
    if (env != NULL && fy_log_level_parse(env, &parsed) != FY_OK)
        parsed = FY_LOG_INFO;
    int expected = -1;
    atomic_compare_exchange_strong(&g_level, &expected, (int)parsed);
    return atomic_load(&g_level);
}

static bool log_json_now(void)
{
    int js = atomic_load_explicit(&g_json, memory_order_relaxed);
    if (js >= 0)
        return js != 0;
    const char *env = getenv("FERRY_LOG_JSON");
    int v = (env != NULL && env[0] != '\0' && env[0] != '0') ? 1 : 0;
    int expected = -1;
    atomic_compare_exchange_strong(&g_json, &expected, v);
    return atomic_load(&g_json) != 0;
}

void fy_log_set_level(fy_log_level_t level)
{
    atomic_store(&g_level, (int)level);
}

fy_log_level_t fy_log_get_level(void)
{
    return (fy_log_level_t)log_level_now();
}

void fy_log_set_json(bool json)
{
    atomic_store(&g_json, json ? 1 : 0);
}

void fy_log_set_sink(fy_log_sink_cb sink, void *arg)
{
    g_sink = sink;
    g_sink_arg = arg;
}

// Appends s to buf as the body of a JSON string, escaping what JSON requires.
static size_t json_escape(char *buf, size_t cap, size_t pos, const char *s)
{
    for (; *s != '\0' && pos + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[pos++] = '\\';
            buf[pos++] = (char)c;
        } else if (c == '\n') {
            buf[pos++] = '\\';
            buf[pos++] = 'n';
        } else if (c < 0x20) {
            pos += (size_t)snprintf(buf + pos, cap - pos, "\\u%04x", c);
        } else {
            buf[pos++] = (char)c;
        }
    }
    return pos;
}

void fy_logv(fy_log_level_t level, const char *module, const char *fmt, va_list ap)
{
    if ((int)level < log_level_now() || level >= FY_LOG_OFF)
        return;
    char msg[1536];
    vsnprintf(msg, sizeof(msg), fmt, ap);

    uint64_t now = fy_clock_realtime_ns();
    time_t secs = (time_t)(now / 1000000000ull);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char ts[40];
    size_t tl = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + tl, sizeof(ts) - tl, ".%03uZ", (unsigned)((now / 1000000ull) % 1000ull));

    char line[2048];
    size_t pos;
    if (log_json_now()) {
        pos = (size_t)snprintf(line, sizeof(line), "{\"ts\":\"%s\",\"level\":\"%s\",\"module\":\"",
                               ts, k_level_names[level]);
        pos = json_escape(line, sizeof(line), pos, module ? module : "");
        pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "\",\"msg\":\"");
        pos = json_escape(line, sizeof(line), pos, msg);
        pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "\"}");
    } else {
        static const char *const upper[] = {"TRACE", "DEBUG", "INFO ", "WARN ", "ERROR"};
        pos = (size_t)snprintf(line, sizeof(line), "%s %s %s: %s", ts, upper[level],
                               module ? module : "-", msg);
    }
    if (pos >= sizeof(line))
        pos = sizeof(line) - 1;
    line[pos] = '\0';

    fy_log_sink_cb sink = g_sink;
    if (sink != NULL) {
        sink(level, line, g_sink_arg);
        return;
    }
    line[pos] = '\n';
    ssize_t unused = write(STDERR_FILENO, line, pos + 1);
    (void)unused;
}

void fy_log(fy_log_level_t level, const char *module, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fy_logv(level, module, fmt, ap);
    va_end(ap);
}
