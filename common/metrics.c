/*
 * metrics.c: a registry of counters, gauges and histograms rendered in the Prometheus text
 * exposition format (0.0.4). Registration takes a lock and happens at start-up; updates are
 * lock-free atomics so the hot paths (token steps, frame arrivals) can call them freely.
 */
#include "common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

const double fy_metrics_latency_bounds[16] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                              0.05,   0.1,   0.25,   0.5,   1.0,  2.5,
                                              5.0,    10.0,  30.0,   60.0};

struct fy_metric {
    fy_metric_kind_t kind;
    char *name;
    char *labels; // text inside {}, or NULL
    char *help;
    _Atomic uint64_t value_bits; // double: counter/gauge value, histogram sum
    size_t n_bounds;
    double *bounds;              // [n_bounds]
    _Atomic uint64_t *buckets;   // [n_bounds + 1], non-cumulative; last is +Inf
    _Atomic uint64_t count;
};

struct fy_metrics {
    pthread_mutex_t mu;
    fy_metric_t **items;
    size_t n, cap;
};

static double bits_to_double(uint64_t b)
{
    double d;
    memcpy(&d, &b, sizeof(d));
    return d;
}

static uint64_t double_to_bits(double d)
{
    uint64_t b;
    memcpy(&b, &d, sizeof(b));
    return b;
}

static bool name_valid(const char *s)
{
    if (s == NULL || *s == '\0')
        return false;
    for (size_t i = 0; s[i] != '\0'; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                  (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

fy_status_t fy_metrics_create(fy_metrics_t **m_p)
{
    fy_metrics_t *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return FY_ERR_NO_MEMORY;
    pthread_mutex_init(&m->mu, NULL);
    *m_p = m;
    return FY_OK;
}

static void metric_free(fy_metric_t *x)
{
    if (x == NULL)
        return;
    free(x->name);
    free(x->labels);
    free(x->help);
    free(x->bounds);
    free(x->buckets);
    free(x);
}

void fy_metrics_destroy(fy_metrics_t *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->n; i++)
        metric_free(m->items[i]);
    free(m->items);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static bool str_eq_null(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return strcmp(a, b) == 0;
}

static fy_metric_t *metric_register(fy_metrics_t *m, fy_metric_kind_t kind, const char *name,
                                    const char *labels, const char *help, const double *bounds,
                                    size_t n_bounds)
{
    if (m == NULL || !name_valid(name))
        return NULL;
    if (labels != NULL && (labels[0] == '\0' || strchr(labels, '\n') != NULL))
        labels = labels[0] == '\0' ? NULL : labels;
    if (labels != NULL && strchr(labels, '\n') != NULL)
        return NULL;
    for (size_t i = 1; i < n_bounds; i++)
        if (!(bounds[i] > bounds[i - 1]))
            return NULL;
    pthread_mutex_lock(&m->mu);
    fy_metric_t *found = NULL;
    for (size_t i = 0; i < m->n; i++) {
        fy_metric_t *x = m->items[i];
        if (strcmp(x->name, name) != 0)
            continue;
        if (x->kind != kind) { // one name, one type
            pthread_mutex_unlock(&m->mu);
            return NULL;
        }
        if (str_eq_null(x->labels, labels)) {
            found = x;
            break;
        }
    }
    if (found != NULL) {
        pthread_mutex_unlock(&m->mu);
        return found;
    }
    fy_metric_t *x = calloc(1, sizeof(*x));
    if (x == NULL)
        goto fail;
    x->kind = kind;
    x->name = strdup(name);
    x->labels = labels ? strdup(labels) : NULL;
    x->help = strdup(help ? help : "");
    if (x->name == NULL || (labels && x->labels == NULL) || x->help == NULL)
        goto fail;
    if (kind == FY_METRIC_HISTOGRAM) {
        x->n_bounds = n_bounds;
        x->bounds = malloc((n_bounds ? n_bounds : 1) * sizeof(double));
        x->buckets = calloc(n_bounds + 1, sizeof(_Atomic uint64_t));
        if (x->bounds == NULL || x->buckets == NULL)
            goto fail;
        if (n_bounds)
            memcpy(x->bounds, bounds, n_bounds * sizeof(double));
    }
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 32;
        fy_metric_t **grown = realloc(m->items, cap * sizeof(*grown));
        if (grown == NULL)
            goto fail;
        m->items = grown;
        m->cap = cap;
    }
    m->items[m->n++] = x;
    pthread_mutex_unlock(&m->mu);
    return x;

fail: // undo: the half-built metric
    metric_free(x);
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

fy_metric_t *fy_metrics_counter(fy_metrics_t *m, const char *name, const char *labels,
                                const char *help)
{
    return metric_register(m, FY_METRIC_COUNTER, name, labels, help, NULL, 0);
}

fy_metric_t *fy_metrics_gauge(fy_metrics_t *m, const char *name, const char *labels,
                              const char *help)
{
    return metric_register(m, FY_METRIC_GAUGE, name, labels, help, NULL, 0);
}

fy_metric_t *fy_metrics_histogram(fy_metrics_t *m, const char *name, const char *labels,
                                  const char *help, const double *bounds, size_t n_bounds)
{
    if (bounds == NULL && n_bounds > 0)
        return NULL;
    return metric_register(m, FY_METRIC_HISTOGRAM, name, labels, help, bounds, n_bounds);
}

static void atomic_add_double(_Atomic uint64_t *bits, double v)
{
    uint64_t old = atomic_load_explicit(bits, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(bits, &old,
                                                  double_to_bits(bits_to_double(old) + v),
                                                  memory_order_relaxed, memory_order_relaxed)) {
    }
}

void fy_metric_add(fy_metric_t *c, double v)
{
    if (c == NULL || c->kind == FY_METRIC_HISTOGRAM)
        return;
    if (c->kind == FY_METRIC_COUNTER && !(v >= 0))
        return; // counters only go up
    atomic_add_double(&c->value_bits, v);
}

void fy_metric_inc(fy_metric_t *c)
{
    fy_metric_add(c, 1.0);
}

void fy_metric_set(fy_metric_t *g, double v)
{
    if (g == NULL || g->kind != FY_METRIC_GAUGE)
        return;
    atomic_store_explicit(&g->value_bits, double_to_bits(v), memory_order_relaxed);
}

void fy_metric_observe(fy_metric_t *h, double v)
{
    if (h == NULL || h->kind != FY_METRIC_HISTOGRAM || v != v)
        return;
    size_t b = 0;
    while (b < h->n_bounds && v > h->bounds[b])
        b++;
    atomic_fetch_add_explicit(&h->buckets[b], 1, memory_order_relaxed);
    atomic_add_double(&h->value_bits, v);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
}

double fy_metric_value(const fy_metric_t *c)
{
    if (c == NULL)
        return 0;
    return bits_to_double(atomic_load_explicit(&((fy_metric_t *)c)->value_bits,
                                               memory_order_relaxed));
}

uint64_t fy_metric_count(const fy_metric_t *h)
{
    if (h == NULL)
        return 0;
    return atomic_load_explicit(&((fy_metric_t *)h)->count, memory_order_relaxed);
}

typedef struct {
    char *buf;
    size_t len, cap;
    bool failed;
} strbuf_t;

static void sb_printf(strbuf_t *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(strbuf_t *sb, const char *fmt, ...)
{
    if (sb->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(sb->buf + sb->len, sb->cap - sb->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            sb->failed = true;
            return;
        }
        if ((size_t)n < sb->cap - sb->len) {
            sb->len += (size_t)n;
            return;
        }
        size_t cap = (sb->cap + (size_t)n + 1) * 2;
        char *grown = realloc(sb->buf, cap);
        if (grown == NULL) {
            sb->failed = true;
            return;
        }
        sb->buf = grown;
        sb->cap = cap;
    }
}

// Prometheus floats: integers without a fraction, +Inf spelled as the format wants.
static void sb_number(strbuf_t *sb, double v)
{
    if (v != v)
        sb_printf(sb, "NaN");
    else if (v > 1.7e308)
        sb_printf(sb, "+Inf");
    else if (v < -1.7e308)
        sb_printf(sb, "-Inf");
    else
        sb_printf(sb, "%.17g", v);
}

static void sb_series(strbuf_t *sb, const char *name, const char *suffix, const char *labels,
                      const char *extra)
{
    sb_printf(sb, "%s%s", name, suffix);
    if (labels != NULL || extra != NULL)
        sb_printf(sb, "{%s%s%s}", labels ? labels : "", labels && extra ? "," : "",
                  extra ? extra : "");
    sb_printf(sb, " ");
}

fy_status_t fy_metrics_render(fy_metrics_t *m, char **text_p, size_t *len_p)
{
    strbuf_t sb = {.buf = malloc(4096), .cap = 4096};
    if (sb.buf == NULL)
        return FY_ERR_NO_MEMORY;
    sb.buf[0] = '\0';
    pthread_mutex_lock(&m->mu);
    bool *done = calloc(m->n ? m->n : 1, sizeof(bool));
    if (done == NULL) {
        pthread_mutex_unlock(&m->mu);
        free(sb.buf);
        return FY_ERR_NO_MEMORY;
    }
    static const char *const kind_names[] = {"counter", "gauge", "histogram"};
    for (size_t i = 0; i < m->n; i++) {
        if (done[i])
            continue;
        fy_metric_t *first = m->items[i];
        sb_printf(&sb, "# HELP %s ", first->name);
        for (const char *h = first->help; *h; h++) { // escape \ and newline in HELP
            if (*h == '\\')
                sb_printf(&sb, "\\\\");
            else if (*h == '\n')
                sb_printf(&sb, "\\n");
            else
                sb_printf(&sb, "%c", *h);
        }
        sb_printf(&sb, "\n# TYPE %s %s\n", first->name, kind_names[first->kind]);
        for (size_t j = i; j < m->n; j++) {
            fy_metric_t *x = m->items[j];
            if (done[j] || strcmp(x->name, first->name) != 0)
                continue;
            done[j] = true;
            if (x->kind != FY_METRIC_HISTOGRAM) {
                sb_series(&sb, x->name, "", x->labels, NULL);
                sb_number(&sb, fy_metric_value(x));
                sb_printf(&sb, "\n");
                continue;
            }
            uint64_t cum = 0;
            for (size_t b = 0; b <= x->n_bounds; b++) {
                cum += atomic_load_explicit(&x->buckets[b], memory_order_relaxed);
                char le[64];
                if (b < x->n_bounds)
                    snprintf(le, sizeof(le), "le=\"%.17g\"", x->bounds[b]);
                else
                    snprintf(le, sizeof(le), "le=\"+Inf\"");
                sb_series(&sb, x->name, "_bucket", x->labels, le);
                sb_printf(&sb, "%llu\n", (unsigned long long)cum);
            }
            sb_series(&sb, x->name, "_sum", x->labels, NULL);
            sb_number(&sb, fy_metric_value(x));
            sb_printf(&sb, "\n");
            sb_series(&sb, x->name, "_count", x->labels, NULL);
            // The +Inf bucket and _count must agree; read _count from the cumulative sum.
            sb_printf(&sb, "%llu\n", (unsigned long long)cum);
        }
    }
    pthread_mutex_unlock(&m->mu);
    free(done);
    if (sb.failed) {
        free(sb.buf);
        return FY_ERR_NO_MEMORY;
    }
    *text_p = sb.buf;
    if (len_p != NULL)
        *len_p = sb.len;
    return FY_OK;
}
