/*
 * common.h: the base every Ferry module stands on.
 *
 * - fy_status_t: one status type for all modules (0 ok, negative errors), generated from a
 *   single X-macro list so codes, names and messages never drift; a mapping to gRPC codes.
 * - logging: levels, timestamps, optional JSON lines, a replaceable sink (the only global).
 * - fp16 / bf16 <-> fp32 conversion, scalar and buffer (F16C when the CPU has it, exact
 *   software fallback otherwise).
 * - CRC32C (Castagnoli; SSE4.2 when available, slicing table fallback).
 * - monotonic clock, a thread pool with a blocking parallel-for, an arena allocator.
 * - configuration (defaults < YAML file < flags) and a metrics registry (Prometheus text).
 * - CUDA twins of the buffer conversions (return FY_ERR_NO_DEVICE in builds without CUDA).
 */
#ifndef FERRY_COMMON_H
#define FERRY_COMMON_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Status codes                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* X(name, value, grpc_code, message). gRPC codes: 0 OK, 1 CANCELLED, 2 UNKNOWN,
 * 3 INVALID_ARGUMENT, 4 DEADLINE_EXCEEDED, 5 NOT_FOUND, 6 ALREADY_EXISTS, 7 PERMISSION_DENIED,
 * 8 RESOURCE_EXHAUSTED, 9 FAILED_PRECONDITION, 10 ABORTED, 11 OUT_OF_RANGE, 12 UNIMPLEMENTED,
 * 13 INTERNAL, 14 UNAVAILABLE, 15 DATA_LOSS, 16 UNAUTHENTICATED. */
#define FY_STATUS_LIST(X)                                                                      \
    X(FY_OK, 0, 0, "ok")                                                                       \
    X(FY_ERR_INVALID_ARG, -1, 3, "invalid argument")                                          \
    X(FY_ERR_NO_MEMORY, -2, 8, "out of memory")                                               \
    X(FY_ERR_IO, -3, 14, "input/output error")                                                \
    X(FY_ERR_FORMAT, -4, 3, "malformed input")                                                \
    X(FY_ERR_TRUNCATED, -5, 15, "input truncated")                                            \
    X(FY_ERR_CORRUPT, -6, 15, "data corrupt (checksum mismatch)")                             \
    X(FY_ERR_UNSUPPORTED, -7, 12, "unsupported")                                              \
    X(FY_ERR_OUT_OF_RANGE, -8, 11, "value out of range")                                      \
    X(FY_ERR_NOT_FOUND, -9, 5, "not found")                                                   \
    X(FY_ERR_EXISTS, -10, 6, "already exists")                                                \
    X(FY_ERR_BUSY, -11, 10, "busy")                                                           \
    X(FY_ERR_AGAIN, -12, 14, "try again")                                                     \
    X(FY_ERR_TIMEOUT, -13, 4, "deadline exceeded")                                            \
    X(FY_ERR_CANCELLED, -14, 1, "cancelled")                                                  \
    X(FY_ERR_UNAVAILABLE, -15, 14, "peer unavailable")                                        \
    X(FY_ERR_RESOURCE_EXHAUSTED, -16, 8, "resource exhausted")                                \
    X(FY_ERR_MISMATCH, -17, 9, "incompatible peer or data")                                   \
    X(FY_ERR_PROTOCOL, -18, 13, "protocol error")                                             \
    X(FY_ERR_TRANSPORT, -19, 14, "transport error")                                           \
    X(FY_ERR_CLOSED, -20, 14, "closed")                                                       \
    X(FY_ERR_PERMISSION, -21, 7, "permission denied")                                         \
    X(FY_ERR_UNAUTHENTICATED, -22, 16, "unauthenticated")                                     \
    X(FY_ERR_NO_DEVICE, -23, 9, "no usable GPU")                                              \
    X(FY_ERR_CUDA, -24, 13, "CUDA error")                                                     \
    X(FY_ERR_STATE, -25, 9, "operation not valid in this state")                              \
    X(FY_ERR_INTERNAL, -26, 13, "internal error")

typedef enum {
#define FY_X_ENUM(name, value, grpc, msg) name = value,
    FY_STATUS_LIST(FY_X_ENUM)
#undef FY_X_ENUM
} fy_status_t;

/* Human-readable message for a status; never NULL ("unknown status" for values not in the
 * list). Thread: any. */
const char *fy_status_str(fy_status_t st);

/* Symbolic name ("FY_ERR_TIMEOUT"); never NULL. Thread: any. */
const char *fy_status_name(fy_status_t st);

/* The gRPC status code a client should see for this status. Thread: any. */
int fy_status_grpc_code(fy_status_t st);

/* Maps an errno value to the closest status. Thread: any. */
fy_status_t fy_status_from_errno(int err);

/* Internal invariants only; never for input from outside (files, network, RPC). */
#define FY_ASSERT(cond)                                                                        \
    do {                                                                                       \
        if (!(cond))                                                                           \
            fy_assert_fail(#cond, __FILE__, __LINE__);                                         \
    } while (0)
__attribute__((noreturn)) void fy_assert_fail(const char *expr, const char *file, int line);

#define FY_MIN(a, b) ((a) < (b) ? (a) : (b))
#define FY_MAX(a, b) ((a) > (b) ? (a) : (b))
#define FY_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define FY_ALIGN_UP(x, a) (((x) + ((a) - 1)) / (a) * (a))

/* Overflow-checked size arithmetic for lengths that come from outside. Return false on
 * overflow and leave *out_p untouched. Thread: any. */
static inline bool fy_size_mul(size_t a, size_t b, size_t *out_p)
{
    size_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return false;
    *out_p = r;
    return true;
}
static inline bool fy_size_add(size_t a, size_t b, size_t *out_p)
{
    size_t r;
    if (__builtin_add_overflow(a, b, &r))
        return false;
    *out_p = r;
    return true;
}

/* A request's KV budget b (wire bytes over FP16 bytes of the prompt's K and V) for a prompt of
 * n tokens, raised so that it holds at least FY_KV_FLOOR_TOKENS tokens' FP16 bytes: a prompt
 * that short goes whole (1), one a few times longer at the budget that keeps that many tokens'
 * worth. Below that the bytes saved are too few to matter on any link, and the few compressed
 * tokens are all the model has to go on (bench/results/score-policies.md). b <= 0 (no budget)
 * stays. The router applies it to the budgets it sends, the prefill worker to those it picks. */
#define FY_KV_FLOOR_TOKENS 16
static inline double fy_kv_budget_floor(double b, size_t n_tokens)
{
    if (!(b > 0) || n_tokens == 0)
        return b;
    const double f = (double)FY_KV_FLOOR_TOKENS / (double)n_tokens;
    return f >= 1 ? 1 : b > f ? b : f;
}

/* ------------------------------------------------------------------------------------------ */
/* Logging                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    FY_LOG_TRACE = 0,
    FY_LOG_DEBUG,
    FY_LOG_INFO,
    FY_LOG_WARN,
    FY_LOG_ERROR,
    FY_LOG_OFF,
} fy_log_level_t;

/* A sink receives one finished line (no trailing newline). */
typedef void (*fy_log_sink_cb)(fy_log_level_t level, const char *line, void *arg);

/* Sets the minimum level (default INFO, or FERRY_LOG=trace|debug|info|warn|error|off).
 * Thread: any. */
void fy_log_set_level(fy_log_level_t level);
fy_log_level_t fy_log_get_level(void);

/* Switches between text lines and JSON lines ({"ts":..,"level":..,"module":..,"msg":..}).
 * FERRY_LOG_JSON=1 sets it too. Thread: any. */
void fy_log_set_json(bool json);

/* Replaces the sink (default: stderr). NULL restores the default. arg is borrowed until the
 * sink is replaced. Thread: any, but not while another thread is logging. */
void fy_log_set_sink(fy_log_sink_cb sink, void *arg);

/* Parses "trace".."off"; returns FY_ERR_INVALID_ARG for anything else. Thread: any. */
fy_status_t fy_log_level_parse(const char *s, fy_log_level_t *level_p);

/* Formats and emits one line if level passes the filter. Thread: any. */
void fy_log(fy_log_level_t level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void fy_logv(fy_log_level_t level, const char *module, const char *fmt, va_list ap);

#define FY_LOG_TRACE(mod, ...) fy_log(FY_LOG_TRACE, mod, __VA_ARGS__)
#define FY_LOG_DEBUG(mod, ...) fy_log(FY_LOG_DEBUG, mod, __VA_ARGS__)
#define FY_LOG_INFO(mod, ...) fy_log(FY_LOG_INFO, mod, __VA_ARGS__)
#define FY_LOG_WARN(mod, ...) fy_log(FY_LOG_WARN, mod, __VA_ARGS__)
#define FY_LOG_ERROR(mod, ...) fy_log(FY_LOG_ERROR, mod, __VA_ARGS__)

/* ------------------------------------------------------------------------------------------ */
/* Half precision                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* IEEE binary16 and bfloat16 <-> binary32. Conversions to 16 bits round to nearest even, keep
 * NaN a (quiet) NaN, handle subnormals and overflow to infinity. Thread: any. */
float fy_fp16_to_fp32(uint16_t h);
uint16_t fy_fp32_to_fp16(float f);
float fy_bf16_to_fp32(uint16_t b);
uint16_t fy_fp32_to_bf16(float f);

/* Buffer versions; src and dst must not overlap. Use F16C when the CPU has it; the results
 * are identical to the scalar functions. Thread: any. */
void fy_fp16_to_fp32_buf(float *dst, const uint16_t *src, size_t n);
void fy_fp32_to_fp16_buf(uint16_t *dst, const float *src, size_t n);
void fy_bf16_to_fp32_buf(float *dst, const uint16_t *src, size_t n);
void fy_fp32_to_bf16_buf(uint16_t *dst, const float *src, size_t n);

/* Whether the buffer conversions use the F16C instructions on this CPU. Thread: any. */
bool fy_half_has_f16c(void);

/* ------------------------------------------------------------------------------------------ */
/* CRC32C                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* CRC32C (Castagnoli, as in iSCSI / RFC 3720). Pass crc = 0 to start; feed the result back to
 * continue over more bytes. Thread: any. */
uint32_t fy_crc32c(uint32_t crc, const void *buf, size_t len);

/* The portable table implementation, always available (for tests and benchmarks). */
uint32_t fy_crc32c_sw(uint32_t crc, const void *buf, size_t len);

/* Whether fy_crc32c uses SSE4.2 on this CPU. Thread: any. */
bool fy_crc32c_has_hw(void);

/* ------------------------------------------------------------------------------------------ */
/* Clock                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Monotonic nanoseconds since an arbitrary origin. Thread: any. */
uint64_t fy_clock_ns(void);
/* Wall-clock nanoseconds since the Unix epoch (for logs and deadlines on the wire). */
uint64_t fy_clock_realtime_ns(void);
/* Sleeps at least ns nanoseconds (restarts after signals). Thread: any. */
void fy_sleep_ns(uint64_t ns);

/* ------------------------------------------------------------------------------------------ */
/* Thread pool                                                                                 */
/* ------------------------------------------------------------------------------------------ */

typedef struct fy_pool fy_pool_t;

/* Runs items [begin, end) on worker `thread` (0 <= thread < n_threads). */
typedef void (*fy_pool_range_cb)(void *ctx, size_t begin, size_t end, int thread);
/* One queued task. */
typedef void (*fy_pool_task_cb)(void *arg);

/* Creates a pool of n_threads workers (0 = number of online CPUs). The calling thread joins
 * in parallel-for as worker 0, so n_threads - 1 threads are started. Thread: any. */
fy_status_t fy_pool_create(int n_threads, fy_pool_t **pool_p);

/* Finishes queued tasks, joins the threads and frees the pool; accepts NULL.
 * Thread: not the pool's own workers. */
void fy_pool_destroy(fy_pool_t *pool);

/* Number of workers including the caller of parallel-for. Thread: any. */
int fy_pool_size(const fy_pool_t *pool);

/* Splits [0, n) into contiguous chunks of at least min_chunk items and runs fn on them in
 * parallel; returns when all chunks are done. pool may be NULL (runs inline). ctx is borrowed
 * for the call. Thread: one caller at a time per pool. */
void fy_pool_parallel_for(fy_pool_t *pool, size_t n, size_t min_chunk, fy_pool_range_cb fn,
                          void *ctx);

/* Queues a task for any worker; arg is borrowed until the task runs. Thread: any. */
fy_status_t fy_pool_submit(fy_pool_t *pool, fy_pool_task_cb fn, void *arg);

/* Blocks until every task submitted so far has finished. Thread: any but the workers. */
void fy_pool_wait(fy_pool_t *pool);

/* ------------------------------------------------------------------------------------------ */
/* Arena                                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct fy_arena_block fy_arena_block_t;

/* Bump allocator for per-request scratch. Caller-allocated; _init/_cleanup. */
typedef struct {
    fy_arena_block_t *head; /* current block; older blocks follow */
    size_t block_size;      /* default size of a new block */
    size_t used_total;      /* bytes handed out since the last reset */
    size_t capacity_total;  /* bytes held in blocks */
} fy_arena_t;

/* block_size 0 picks 64 KiB. Thread: not thread-safe (one arena per thread or request). */
void fy_arena_init(fy_arena_t *arena, size_t block_size);
/* Frees every block; the arena may be initialized again. Accepts a zeroed arena. */
void fy_arena_cleanup(fy_arena_t *arena);
/* Returns size bytes aligned to align (a power of two <= 4096), or NULL when out of memory or
 * size overflows. Memory is valid until reset or cleanup. */
void *fy_arena_alloc(fy_arena_t *arena, size_t size, size_t align);
/* Like fy_arena_alloc, zero-filled, count * size checked for overflow. */
void *fy_arena_calloc(fy_arena_t *arena, size_t count, size_t size, size_t align);
/* Releases everything but keeps the largest block for reuse. */
void fy_arena_reset(fy_arena_t *arena);

/* ------------------------------------------------------------------------------------------ */
/* API keys                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Whether an Authorization header value (len bytes, not necessarily NUL-terminated; NULL when
 * absent) is "Bearer <key>" (the scheme in any case), compared in a time that does not depend
 * on where a wrong key differs. Always true when key is NULL or "". Thread: any. */
bool fy_bearer_ok(const char *authorization, size_t len, const char *key);

/* ------------------------------------------------------------------------------------------ */
/* Configuration: defaults < config file (YAML) < command-line flags                           */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    FY_OPT_STRING = 0,
    FY_OPT_INT,    // int64, decimal or 0x hex
    FY_OPT_SIZE,   // bytes; accepts suffixes K, M, G, T (powers of 1024) and KiB/MiB/GiB/TiB, KB/MB/GB
    FY_OPT_DOUBLE,
    FY_OPT_BOOL,   // true/false, yes/no, on/off, 1/0; a bare flag means true
    FY_OPT_DURATION, // milliseconds; accepts suffixes ms, s, m, h (bare numbers are ms)
} fy_opt_type_t;

/* One option of a daemon or command. The flag is --<name>; in a config file the key is the
 * same name, with '-' or '_' (so kv-memory and kv_memory are one key). */
typedef struct {
    const char *name;
    fy_opt_type_t type;
    const char *def;  // default as text; NULL = unset (and required when `required`)
    const char *help;
    bool required;
} fy_opt_t;

typedef struct fy_config fy_config_t;

/* Creates a configuration over the option table; opts is borrowed for the config's lifetime.
 * Thread: any. */
fy_status_t fy_config_create(const fy_opt_t *opts, size_t n_opts, fy_config_t **cfg_p);
/* Frees the config; accepts NULL. */
void fy_config_destroy(fy_config_t *cfg);

/* Loads a YAML file: a mapping of option names to scalars. Nested mappings give dotted keys
 * ("codec: {budget: 0.25}" sets codec.budget). Unknown keys and bad values fail with a
 * message naming the file, line and key in err. Thread: not thread-safe. */
fy_status_t fy_config_load_file(fy_config_t *cfg, const char *path, char *err, size_t err_len);

/* Parses argv: first --config FILE (if given, loaded first), then every --name=value,
 * --name value or --flag (bools). Arguments that are not options are left as positionals
 * (fy_config_positional). "--help"/"-h" sets fy_config_help_requested. A later value
 * overrides an earlier one. Thread: not thread-safe. */
fy_status_t fy_config_parse_args(fy_config_t *cfg, int argc, char **argv, char *err,
                                 size_t err_len);

/* Checks that every required option has a value and every value parses. */
fy_status_t fy_config_validate(const fy_config_t *cfg, char *err, size_t err_len);

/* Sets one option from text, as a flag would. FY_ERR_NOT_FOUND for an unknown name. */
fy_status_t fy_config_set(fy_config_t *cfg, const char *name, const char *value, char *err,
                          size_t err_len);

bool fy_config_help_requested(const fy_config_t *cfg);
size_t fy_config_n_positional(const fy_config_t *cfg);
/* The i-th positional argument; valid until the config is destroyed. */
const char *fy_config_positional(const fy_config_t *cfg, size_t i);

/* Typed getters. They return the parsed value, or the zero value when the option is unset
 * (or unknown: a programming error, logged). Thread: any, once parsing is done. */
const char *fy_config_str(const fy_config_t *cfg, const char *name);
int64_t fy_config_int(const fy_config_t *cfg, const char *name);
uint64_t fy_config_size(const fy_config_t *cfg, const char *name);
double fy_config_double(const fy_config_t *cfg, const char *name);
bool fy_config_bool(const fy_config_t *cfg, const char *name);
uint64_t fy_config_duration_ms(const fy_config_t *cfg, const char *name);
/* Whether the option was given by a file or a flag (not just defaulted). */
bool fy_config_is_set(const fy_config_t *cfg, const char *name);

/* Prints "usage: prog [options] <args>", the summary and one line per option with its
 * default. */
void fy_config_print_help(const fy_config_t *cfg, FILE *out, const char *usage_line,
                          const char *summary);

/* Value parsers shared with other modules; on error *_p is untouched. */
fy_status_t fy_parse_size(const char *s, uint64_t *bytes_p);
fy_status_t fy_parse_duration_ms(const char *s, uint64_t *ms_p);
fy_status_t fy_parse_bool(const char *s, bool *b_p);

/* ------------------------------------------------------------------------------------------ */
/* Metrics: counters, gauges, histograms; Prometheus text exposition format 0.0.4              */
/* ------------------------------------------------------------------------------------------ */

typedef struct fy_metrics fy_metrics_t;
typedef struct fy_metric fy_metric_t;

typedef enum { FY_METRIC_COUNTER, FY_METRIC_GAUGE, FY_METRIC_HISTOGRAM } fy_metric_kind_t;

/* Creates an empty registry. Thread: any. */
fy_status_t fy_metrics_create(fy_metrics_t **m_p);
/* Frees the registry and its metrics; accepts NULL. */
void fy_metrics_destroy(fy_metrics_t *m);

/* Registers (or returns the already registered) series `name{labels}`. labels is the text
 * inside the braces, e.g. `reason="deadline"`, or NULL. Histograms take n_bounds ascending
 * upper bounds (the +Inf bucket is implicit). The returned pointer lives as long as the
 * registry. NULL on bad names, a kind conflict or out of memory. Thread: any (takes a lock);
 * register at start-up, update on the hot path. */
fy_metric_t *fy_metrics_counter(fy_metrics_t *m, const char *name, const char *labels,
                                const char *help);
fy_metric_t *fy_metrics_gauge(fy_metrics_t *m, const char *name, const char *labels,
                              const char *help);
fy_metric_t *fy_metrics_histogram(fy_metrics_t *m, const char *name, const char *labels,
                                  const char *help, const double *bounds, size_t n_bounds);

/* Updates; lock-free. Accept NULL (no-op) so optional metrics need no checks. Thread: any. */
void fy_metric_add(fy_metric_t *c, double v); // counters (v >= 0) and gauges
void fy_metric_inc(fy_metric_t *c);
void fy_metric_set(fy_metric_t *g, double v); // gauges
void fy_metric_observe(fy_metric_t *h, double v); // histograms
double fy_metric_value(const fy_metric_t *c);     // counter or gauge value; histogram sum
uint64_t fy_metric_count(const fy_metric_t *h);   // histogram observation count

/* Renders every series in the Prometheus text format into a malloc'd NUL-terminated string
 * that the caller frees. Thread: any. */
fy_status_t fy_metrics_render(fy_metrics_t *m, char **text_p, size_t *len_p);

/* Bucket bounds in seconds suited to latencies from 0.5 ms to 60 s (n = 16). */
extern const double fy_metrics_latency_bounds[16];

/* ------------------------------------------------------------------------------------------ */
/* CUDA twins (common/half.cu)                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Number of usable CUDA devices; 0 when built without CUDA or none is present. Thread: any. */
int fy_cuda_device_count(void);

/* The UUID of CUDA device `device` as 32 hex digits into buf (cap >= 33), which tells two
 * processes whether they use the same GPU. FY_ERR_NO_DEVICE without it. Thread: any. */
fy_status_t fy_cuda_device_uuid(int device, char *buf, size_t cap);

/* Buffer conversions on the GPU. dst and src are device pointers; stream is a cudaStream_t
 * (NULL = default stream). The call is asynchronous on the stream. Results are bit-identical
 * to the CPU functions. FY_ERR_NO_DEVICE when built without CUDA. Thread: any. */
fy_status_t fy_cuda_fp16_to_fp32(float *dst, const uint16_t *src, size_t n, void *stream);
fy_status_t fy_cuda_fp32_to_fp16(uint16_t *dst, const float *src, size_t n, void *stream);
fy_status_t fy_cuda_bf16_to_fp32(float *dst, const uint16_t *src, size_t n, void *stream);
fy_status_t fy_cuda_fp32_to_bf16(uint16_t *dst, const float *src, size_t n, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_COMMON_H */
