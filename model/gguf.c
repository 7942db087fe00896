/*
 * gguf.c: a GGUF v2/v3 reader over mmap or a caller's buffer (layout in model.h).
 *
 * The whole header is walked once at open with a bounds-checked cursor: every length, count
 * and offset is checked against the bytes that remain before anything is allocated or read,
 * so a truncated or hostile file fails with a message naming the field. Metadata values stay
 * in the file; the reader keeps their offsets (and, for string arrays, one offset per element,
 * so the tokenizer can index 150k strings in O(1)).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model.h"

#define GGUF_MAGIC 0x46554747u
#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGN 32

typedef struct {
    const char *key; /* NUL-terminated copy */
    uint32_t type;
    uint64_t off;      /* offset of the value in the file */
    uint32_t arr_type; /* arrays */
    uint64_t arr_len;
    uint64_t *str_offs; /* string arrays: offset of each element's length field */
} gguf_kv_t;

struct mdl_gguf {
    const uint8_t *data;
    size_t size;
    bool mapped;
    uint32_t version;
    uint32_t alignment;
    int64_t n_kv;
    int64_t n_tensors;
    gguf_kv_t *kvs;             /* [n_kv] */
    mdl_gguf_tensor_t *tensors; /* [n_tensors] */
};

typedef struct {
    const uint8_t *p;
    size_t size;
    size_t pos;
    char *err;
    size_t err_len;
} cursor_t;

static fy_status_t fail(cursor_t *c, fy_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static fy_status_t fail(cursor_t *c, fy_status_t st, const char *fmt, ...)
{
    if (c->err != NULL && c->err_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->err_len, fmt, ap);
        va_end(ap);
    }
    return st;
}

static bool take(cursor_t *c, size_t n, const uint8_t **p_p)
{
    if (n > c->size - c->pos)
        return false;
    *p_p = c->p + c->pos;
    c->pos += n;
    return true;
}

static bool rd_u32(cursor_t *c, uint32_t *v)
{
    const uint8_t *p;
    if (!take(c, 4, &p))
        return false;
    memcpy(v, p, 4);
    return true;
}

static bool rd_u64(cursor_t *c, uint64_t *v)
{
    const uint8_t *p;
    if (!take(c, 8, &p))
        return false;
    memcpy(v, p, 8);
    return true;
}

static size_t scalar_size(uint32_t type)
{
    switch (type) {
    case MDL_GGUF_U8:
    case MDL_GGUF_I8:
    case MDL_GGUF_BOOL:
        return 1;
    case MDL_GGUF_U16:
    case MDL_GGUF_I16:
        return 2;
    case MDL_GGUF_U32:
    case MDL_GGUF_I32:
    case MDL_GGUF_F32:
        return 4;
    case MDL_GGUF_U64:
    case MDL_GGUF_I64:
    case MDL_GGUF_F64:
        return 8;
    default:
        return 0;
    }
}

/* Reads a string header; leaves the cursor after the bytes. */
static bool rd_str(cursor_t *c, const char **s_p, uint64_t *len_p)
{
    uint64_t len;
    const uint8_t *p;
    if (!rd_u64(c, &len) || len > c->size - c->pos || !take(c, (size_t)len, &p))
        return false;
    *s_p = (const char *)p;
    *len_p = len;
    return true;
}

/* Block geometry of a tensor type: elements per block and bytes per block. */
static bool type_geometry(uint32_t type, uint64_t *blk_p, uint64_t *bytes_p)
{
    switch (type) {
    case MDL_TENSOR_F32:
        *blk_p = 1, *bytes_p = 4;
        return true;
    case MDL_TENSOR_F16:
    case MDL_TENSOR_BF16:
        *blk_p = 1, *bytes_p = 2;
        return true;
    case MDL_TENSOR_Q4_0:
        *blk_p = 32, *bytes_p = 18;
        return true;
    case MDL_TENSOR_Q4_1:
        *blk_p = 32, *bytes_p = 20;
        return true;
    case MDL_TENSOR_Q8_0:
        *blk_p = 32, *bytes_p = 34;
        return true;
    default:
        return false;
    }
}

bool mdl_tensor_type_supported(uint32_t type)
{
    uint64_t a, b;
    return type_geometry(type, &a, &b);
}

const char *mdl_tensor_type_name(uint32_t type)
{
    switch (type) {
    case MDL_TENSOR_F32: return "F32";
    case MDL_TENSOR_F16: return "F16";
    case MDL_TENSOR_Q4_0: return "Q4_0";
    case MDL_TENSOR_Q4_1: return "Q4_1";
    case 6: return "Q5_0";
    case 7: return "Q5_1";
    case MDL_TENSOR_Q8_0: return "Q8_0";
    case 10: return "Q2_K";
    case 11: return "Q3_K";
    case 12: return "Q4_K";
    case 13: return "Q5_K";
    case 14: return "Q6_K";
    case 15: return "Q8_K";
    case MDL_TENSOR_BF16: return "BF16";
    default: return "?";
    }
}

void mdl_gguf_close(mdl_gguf_t *g)
{
    if (g == NULL)
        return;
    if (g->kvs != NULL) {
        for (int64_t i = 0; i < g->n_kv; i++) {
            free(g->kvs[i].str_offs);
            free((char *)g->kvs[i].key);
        }
    }
    if (g->tensors != NULL) {
        for (int64_t i = 0; i < g->n_tensors; i++)
            free((char *)g->tensors[i].name);
    }
    free(g->kvs);
    free(g->tensors);
    if (g->mapped && g->data != NULL)
        munmap((void *)g->data, g->size);
    free(g);
}

/* Skips (and checks) one value of `type`; records string-array offsets into kv when given. */
static fy_status_t skip_value(cursor_t *c, uint32_t type, const char *key, gguf_kv_t *kv)
{
    if (type == MDL_GGUF_STRING) {
        const char *s;
        uint64_t len;
        if (!rd_str(c, &s, &len))
            return fail(c, FY_ERR_TRUNCATED, "gguf: metadata '%s': string value truncated", key);
        return FY_OK;
    }
    if (type == MDL_GGUF_ARRAY) {
        uint32_t at;
        uint64_t n;
        if (!rd_u32(c, &at) || !rd_u64(c, &n))
            return fail(c, FY_ERR_TRUNCATED, "gguf: metadata '%s': array header truncated", key);
        if (at == MDL_GGUF_ARRAY)
            return fail(c, FY_ERR_UNSUPPORTED, "gguf: metadata '%s': nested arrays", key);
        if (at == MDL_GGUF_STRING) {
            // Each string needs at least its 8-byte length: bound n before allocating.
            if (n > (c->size - c->pos) / 8)
                return fail(c, FY_ERR_TRUNCATED,
                            "gguf: metadata '%s': array of %llu strings exceeds the file", key,
                            (unsigned long long)n);
            uint64_t *offs = NULL;
            if (kv != NULL && n > 0) {
                offs = malloc((size_t)n * sizeof(*offs));
                if (offs == NULL)
                    return FY_ERR_NO_MEMORY;
            }
            for (uint64_t j = 0; j < n; j++) {
                if (offs != NULL)
                    offs[j] = c->pos;
                const char *s;
                uint64_t len;
                if (!rd_str(c, &s, &len)) {
                    free(offs);
                    return fail(c, FY_ERR_TRUNCATED,
                                "gguf: metadata '%s': string %llu of the array truncated", key,
                                (unsigned long long)j);
                }
            }
            if (kv != NULL) {
                kv->arr_type = at;
                kv->arr_len = n;
                kv->str_offs = offs;
            }
            return FY_OK;
        }
        size_t es = scalar_size(at);
        if (es == 0)
            return fail(c, FY_ERR_FORMAT, "gguf: metadata '%s': unknown array element type %u",
                        key, at);
        if (n > (c->size - c->pos) / es)
            return fail(c, FY_ERR_TRUNCATED,
                        "gguf: metadata '%s': array of %llu elements exceeds the file", key,
                        (unsigned long long)n);
        c->pos += (size_t)n * es;
        if (kv != NULL) {
            kv->arr_type = at;
            kv->arr_len = n;
        }
        return FY_OK;
    }
    size_t sz = scalar_size(type);
    if (sz == 0)
        return fail(c, FY_ERR_FORMAT, "gguf: metadata '%s': unknown value type %u", key, type);
    const uint8_t *p;
    if (!take(c, sz, &p))
        return fail(c, FY_ERR_TRUNCATED, "gguf: metadata '%s': value truncated", key);
    return FY_OK;
}

static fy_status_t parse(mdl_gguf_t *g, char *err, size_t err_len)
{
    cursor_t c = {.p = g->data, .size = g->size, .err = err, .err_len = err_len};
    uint32_t magic, version;
    uint64_t n_tensors, n_kv;
    if (!rd_u32(&c, &magic))
        return fail(&c, FY_ERR_TRUNCATED, "gguf: file too short for the magic");
    if (magic != GGUF_MAGIC)
        return fail(&c, FY_ERR_FORMAT, "gguf: bad magic 0x%08x (not a GGUF file)", magic);
    if (!rd_u32(&c, &version))
        return fail(&c, FY_ERR_TRUNCATED, "gguf: header truncated at version");
    if (version != 2 && version != 3)
        return fail(&c, FY_ERR_UNSUPPORTED, "gguf: version %u not supported (2 and 3 are)",
                    version);
    if (!rd_u64(&c, &n_tensors) || !rd_u64(&c, &n_kv))
        return fail(&c, FY_ERR_TRUNCATED, "gguf: header truncated at tensor/kv counts");
    // A metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at
    // least 8 + 4 + 8 + 4 + 8. Bound the counts by the file before allocating.
    if (n_kv > (g->size - c.pos) / 13)
        return fail(&c, FY_ERR_FORMAT, "gguf: n_kv %llu exceeds what the file can hold",
                    (unsigned long long)n_kv);
    if (n_tensors > (g->size - c.pos) / 32)
        return fail(&c, FY_ERR_FORMAT, "gguf: n_tensors %llu exceeds what the file can hold",
                    (unsigned long long)n_tensors);
    g->version = version;
    g->n_kv = (int64_t)n_kv;
    g->n_tensors = (int64_t)n_tensors;
    g->kvs = calloc(n_kv ? n_kv : 1, sizeof(*g->kvs));
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(*g->tensors));
    if (g->kvs == NULL || g->tensors == NULL)
        return FY_ERR_NO_MEMORY;
    g->alignment = GGUF_DEFAULT_ALIGN;

    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv_t *kv = &g->kvs[i];
        const char *key;
        uint64_t klen;
        if (!rd_str(&c, &key, &klen))
            return fail(&c, FY_ERR_TRUNCATED, "gguf: metadata key %llu truncated",
                        (unsigned long long)i);
        if (memchr(key, 0, (size_t)klen) != NULL)
            return fail(&c, FY_ERR_FORMAT, "gguf: metadata key %llu contains NUL",
                        (unsigned long long)i);
        char *kcopy = strndup(key, (size_t)klen);
        if (kcopy == NULL)
            return FY_ERR_NO_MEMORY;
        kv->key = kcopy;
        for (uint64_t j = 0; j < i; j++) {
            if (strcmp(g->kvs[j].key, kcopy) == 0)
                return fail(&c, FY_ERR_FORMAT, "gguf: duplicate metadata key '%s'", kcopy);
        }
        if (!rd_u32(&c, &kv->type))
            return fail(&c, FY_ERR_TRUNCATED, "gguf: metadata '%s': type truncated", kcopy);
        kv->off = c.pos;
        fy_status_t st = skip_value(&c, kv->type, kcopy, kv);
        if (st != FY_OK)
            return st;
        if (strcmp(kcopy, "general.alignment") == 0) {
            if (kv->type != MDL_GGUF_U32)
                return fail(&c, FY_ERR_FORMAT, "gguf: general.alignment must be u32");
            uint32_t a;
            memcpy(&a, g->data + kv->off, 4);
            if (a == 0 || (a & (a - 1)) != 0 || a > (1u << 20))
                return fail(&c, FY_ERR_FORMAT,
                            "gguf: general.alignment %u is not a power of two <= 1 MiB", a);
            g->alignment = a;
        }
    }

    for (uint64_t i = 0; i < n_tensors; i++) {
        mdl_gguf_tensor_t *t = &g->tensors[i];
        const char *name;
        uint64_t nlen;
        if (!rd_str(&c, &name, &nlen))
            return fail(&c, FY_ERR_TRUNCATED, "gguf: tensor info %llu: name truncated",
                        (unsigned long long)i);
        if (memchr(name, 0, (size_t)nlen) != NULL || nlen == 0)
            return fail(&c, FY_ERR_FORMAT, "gguf: tensor info %llu: bad name",
                        (unsigned long long)i);
        char *ncopy = strndup(name, (size_t)nlen);
        if (ncopy == NULL)
            return FY_ERR_NO_MEMORY;
        t->name = ncopy;
        uint32_t n_dims;
        if (!rd_u32(&c, &n_dims))
            return fail(&c, FY_ERR_TRUNCATED, "gguf: tensor '%s': n_dims truncated", ncopy);
        if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
            return fail(&c, FY_ERR_FORMAT, "gguf: tensor '%s': n_dims %u not in 1..4", ncopy,
                        n_dims);
        t->n_dims = (int)n_dims;
        uint64_t n_elems = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++)
            t->ne[d] = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            if (!rd_u64(&c, &t->ne[d]))
                return fail(&c, FY_ERR_TRUNCATED, "gguf: tensor '%s': ne[%u] truncated", ncopy,
                            d);
            if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) ||
                __builtin_mul_overflow(n_elems, t->ne[d], &n_elems) || n_elems > (1ull << 40))
                return fail(&c, FY_ERR_FORMAT, "gguf: tensor '%s': ne[%u] = %llu out of range",
                            ncopy, d, (unsigned long long)t->ne[d]);
        }
        t->n_elems = n_elems;
        uint64_t rel;
        if (!rd_u32(&c, &t->type) || !rd_u64(&c, &rel))
            return fail(&c, FY_ERR_TRUNCATED, "gguf: tensor '%s': type/offset truncated", ncopy);
        uint64_t blk, bpb;
        if (type_geometry(t->type, &blk, &bpb)) {
            if (t->ne[0] % blk != 0)
                return fail(&c, FY_ERR_FORMAT,
                            "gguf: tensor '%s': ne[0] = %llu not a multiple of the %s block",
                            ncopy, (unsigned long long)t->ne[0], mdl_tensor_type_name(t->type));
            t->n_bytes = n_elems / blk * bpb;
        } else {
            t->n_bytes = 0; // unknown type: listed (inspect shows it), not loadable
        }
        if (rel % g->alignment != 0)
            return fail(&c, FY_ERR_FORMAT, "gguf: tensor '%s': offset %llu not aligned to %u",
                        ncopy, (unsigned long long)rel, g->alignment);
        t->offset = rel; // made absolute below, once the data section is known
        for (uint64_t j = 0; j < i; j++) {
            if (strcmp(g->tensors[j].name, ncopy) == 0)
                return fail(&c, FY_ERR_FORMAT, "gguf: duplicate tensor name '%s'", ncopy);
        }
    }

    uint64_t data_start = FY_ALIGN_UP((uint64_t)c.pos, (uint64_t)g->alignment);
    if (n_tensors > 0 && data_start > g->size)
        return fail(&c, FY_ERR_TRUNCATED, "gguf: data section starts past the end of the file");
    for (uint64_t i = 0; i < n_tensors; i++) {
        mdl_gguf_tensor_t *t = &g->tensors[i];
        uint64_t abs;
        if (__builtin_add_overflow(data_start, t->offset, &abs) || abs > g->size ||
            t->n_bytes > g->size - abs)
            return fail(&c, FY_ERR_TRUNCATED,
                        "gguf: tensor '%s': data [%llu, +%llu) past the end of the file (%zu)",
                        t->name, (unsigned long long)t->offset, (unsigned long long)t->n_bytes,
                        g->size);
        t->offset = abs;
        t->data = g->data + abs;
    }
    return FY_OK;
}

fy_status_t mdl_gguf_open_mem(const void *data, size_t size, mdl_gguf_t **gguf_p, char *err,
                              size_t err_len)
{
    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (data == NULL && size > 0)
        return FY_ERR_INVALID_ARG;
    mdl_gguf_t *g = calloc(1, sizeof(*g));
    if (g == NULL)
        return FY_ERR_NO_MEMORY;
    g->data = data;
    g->size = size;
    fy_status_t st = parse(g, err, err_len);
    if (st != FY_OK) {
        mdl_gguf_close(g);
        return st;
    }
    *gguf_p = g;
    return FY_OK;
}

fy_status_t mdl_gguf_open(const char *path, mdl_gguf_t **gguf_p, char *err, size_t err_len)
{
    if (err != NULL && err_len > 0)
        err[0] = '\0';
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (err != NULL)
            snprintf(err, err_len, "gguf: cannot open %s: %s", path, strerror(e));
        return fy_status_from_errno(e);
    }
    struct stat st_buf;
    if (fstat(fd, &st_buf) != 0 || !S_ISREG(st_buf.st_mode)) {
        close(fd);
        if (err != NULL)
            snprintf(err, err_len, "gguf: %s is not a regular file", path);
        return FY_ERR_IO;
    }
    size_t size = (size_t)st_buf.st_size;
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            if (err != NULL)
                snprintf(err, err_len, "gguf: cannot map %s: %s", path, strerror(e));
            return fy_status_from_errno(e);
        }
    }
    close(fd);
    mdl_gguf_t *g = NULL;
    fy_status_t st = mdl_gguf_open_mem(map, size, &g, err, err_len);
    if (st != FY_OK) {
        if (map != NULL)
            munmap(map, size);
        return st;
    }
    g->mapped = true;
    *gguf_p = g;
    return FY_OK;
}

uint32_t mdl_gguf_version(const mdl_gguf_t *g)
{
    return g->version;
}

uint32_t mdl_gguf_alignment(const mdl_gguf_t *g)
{
    return g->alignment;
}

int64_t mdl_gguf_n_kv(const mdl_gguf_t *g)
{
    return g->n_kv;
}

int64_t mdl_gguf_n_tensors(const mdl_gguf_t *g)
{
    return g->n_tensors;
}

const char *mdl_gguf_kv_key(const mdl_gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? g->kvs[i].key : NULL;
}

mdl_gguf_type_t mdl_gguf_kv_type(const mdl_gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? (mdl_gguf_type_t)g->kvs[i].type : (mdl_gguf_type_t)-1;
}

mdl_gguf_type_t mdl_gguf_arr_type(const mdl_gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? (mdl_gguf_type_t)g->kvs[i].arr_type : (mdl_gguf_type_t)-1;
}

uint64_t mdl_gguf_arr_len(const mdl_gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_kv && g->kvs[i].type == MDL_GGUF_ARRAY ? g->kvs[i].arr_len : 0;
}

int64_t mdl_gguf_find_key(const mdl_gguf_t *g, const char *key)
{
    for (int64_t i = 0; i < g->n_kv; i++) {
        if (strcmp(g->kvs[i].key, key) == 0)
            return i;
    }
    return -1;
}

/* Reads a scalar of `type` at p as int64 / double. */
static bool scalar_int(uint32_t type, const uint8_t *p, int64_t *v)
{
    switch (type) {
    case MDL_GGUF_U8:
    case MDL_GGUF_BOOL: *v = p[0]; return true;
    case MDL_GGUF_I8: *v = (int8_t)p[0]; return true;
    case MDL_GGUF_U16: { uint16_t x; memcpy(&x, p, 2); *v = x; return true; }
    case MDL_GGUF_I16: { int16_t x; memcpy(&x, p, 2); *v = x; return true; }
    case MDL_GGUF_U32: { uint32_t x; memcpy(&x, p, 4); *v = x; return true; }
    case MDL_GGUF_I32: { int32_t x; memcpy(&x, p, 4); *v = x; return true; }
    case MDL_GGUF_I64: { int64_t x; memcpy(&x, p, 8); *v = x; return true; }
    case MDL_GGUF_U64: {
        uint64_t x;
        memcpy(&x, p, 8);
        if (x > INT64_MAX)
            return false;
        *v = (int64_t)x;
        return true;
    }
    default: return false;
    }
}

static bool scalar_float(uint32_t type, const uint8_t *p, double *v)
{
    if (type == MDL_GGUF_F32) {
        float f;
        memcpy(&f, p, 4);
        *v = f;
        return true;
    }
    if (type == MDL_GGUF_F64) {
        memcpy(v, p, 8);
        return true;
    }
    return false;
}

static bool is_int_type(uint32_t t)
{
    return t <= MDL_GGUF_I32 || t == MDL_GGUF_U64 || t == MDL_GGUF_I64;
}

fy_status_t mdl_gguf_get_i64(const mdl_gguf_t *g, const char *key, int64_t *val_p)
{
    int64_t i = mdl_gguf_find_key(g, key);
    if (i < 0)
        return FY_ERR_NOT_FOUND;
    const gguf_kv_t *kv = &g->kvs[i];
    if (!is_int_type(kv->type))
        return FY_ERR_FORMAT;
    int64_t v;
    if (!scalar_int(kv->type, g->data + kv->off, &v))
        return FY_ERR_OUT_OF_RANGE;
    *val_p = v;
    return FY_OK;
}

fy_status_t mdl_gguf_get_f32(const mdl_gguf_t *g, const char *key, float *val_p)
{
    int64_t i = mdl_gguf_find_key(g, key);
    if (i < 0)
        return FY_ERR_NOT_FOUND;
    double v;
    if (!scalar_float(g->kvs[i].type, g->data + g->kvs[i].off, &v))
        return FY_ERR_FORMAT;
    *val_p = (float)v;
    return FY_OK;
}

fy_status_t mdl_gguf_get_bool(const mdl_gguf_t *g, const char *key, bool *val_p)
{
    int64_t i = mdl_gguf_find_key(g, key);
    if (i < 0)
        return FY_ERR_NOT_FOUND;
    if (g->kvs[i].type != MDL_GGUF_BOOL)
        return FY_ERR_FORMAT;
    *val_p = g->data[g->kvs[i].off] != 0;
    return FY_OK;
}

static void str_at(const mdl_gguf_t *g, uint64_t off, const char **s_p, size_t *len_p)
{
    uint64_t len;
    memcpy(&len, g->data + off, 8); // checked at open
    *s_p = (const char *)g->data + off + 8;
    *len_p = (size_t)len;
}

fy_status_t mdl_gguf_get_str(const mdl_gguf_t *g, const char *key, const char **str_p,
                             size_t *len_p)
{
    int64_t i = mdl_gguf_find_key(g, key);
    if (i < 0)
        return FY_ERR_NOT_FOUND;
    if (g->kvs[i].type != MDL_GGUF_STRING)
        return FY_ERR_FORMAT;
    str_at(g, g->kvs[i].off, str_p, len_p);
    return FY_OK;
}

/* Offset of element j of array entry i with element type `want`. */
static fy_status_t arr_elem(const mdl_gguf_t *g, int64_t i, uint64_t j, uint32_t *type_p,
                            const uint8_t **p_p)
{
    if (i < 0 || i >= g->n_kv || g->kvs[i].type != MDL_GGUF_ARRAY)
        return FY_ERR_FORMAT;
    const gguf_kv_t *kv = &g->kvs[i];
    if (j >= kv->arr_len)
        return FY_ERR_OUT_OF_RANGE;
    *type_p = kv->arr_type;
    if (kv->arr_type == MDL_GGUF_STRING) {
        *p_p = g->data + kv->str_offs[j];
        return FY_OK;
    }
    // Array payload starts after the element type (4) and count (8).
    *p_p = g->data + kv->off + 12 + j * scalar_size(kv->arr_type);
    return FY_OK;
}

fy_status_t mdl_gguf_arr_str(const mdl_gguf_t *g, int64_t i, uint64_t j, const char **str_p,
                             size_t *len_p)
{
    uint32_t t;
    const uint8_t *p;
    fy_status_t st = arr_elem(g, i, j, &t, &p);
    if (st != FY_OK)
        return st;
    if (t != MDL_GGUF_STRING)
        return FY_ERR_FORMAT;
    str_at(g, (uint64_t)(p - g->data), str_p, len_p);
    return FY_OK;
}

fy_status_t mdl_gguf_arr_i64(const mdl_gguf_t *g, int64_t i, uint64_t j, int64_t *val_p)
{
    uint32_t t;
    const uint8_t *p;
    fy_status_t st = arr_elem(g, i, j, &t, &p);
    if (st != FY_OK)
        return st;
    if (!is_int_type(t))
        return FY_ERR_FORMAT;
    return scalar_int(t, p, val_p) ? FY_OK : FY_ERR_OUT_OF_RANGE;
}

fy_status_t mdl_gguf_arr_f32(const mdl_gguf_t *g, int64_t i, uint64_t j, float *val_p)
{
    uint32_t t;
    const uint8_t *p;
    fy_status_t st = arr_elem(g, i, j, &t, &p);
    if (st != FY_OK)
        return st;
    double v;
    if (!scalar_float(t, p, &v))
        return FY_ERR_FORMAT;
    *val_p = (float)v;
    return FY_OK;
}

static const char *type_name(uint32_t t)
{
    static const char *names[] = {"u8",     "i8",    "u16",  "i16", "u32", "i32", "f32",
                                  "bool",   "str",   "arr",  "u64", "i64", "f64"};
    return t < FY_ARRAY_SIZE(names) ? names[t] : "?";
}

/* Writes a printable, escaped, shortened, quoted string; returns bytes written. */
static size_t fmt_str(char *buf, size_t cap, const char *s, size_t len)
{
    size_t w = 0;
    if (cap < 8)
        return 0;
    buf[w++] = '"';
    for (size_t k = 0; k < len && w + 8 < cap; k++) {
        unsigned char ch = (unsigned char)s[k];
        if (k >= 60) {
            w += (size_t)snprintf(buf + w, cap - w, "...");
            break;
        }
        if (ch == '\n')
            w += (size_t)snprintf(buf + w, cap - w, "\\n");
        else if (ch < 0x20)
            w += (size_t)snprintf(buf + w, cap - w, "\\x%02x", ch);
        else
            buf[w++] = (char)ch;
    }
    buf[w++] = '"';
    buf[w] = '\0';
    return w;
}

static size_t fmt_scalar(const mdl_gguf_t *g, uint32_t t, const uint8_t *p, char *buf, size_t cap)
{
    int64_t iv;
    double fv;
    if (t == MDL_GGUF_BOOL)
        return (size_t)snprintf(buf, cap, "%s", p[0] ? "true" : "false");
    if (t == MDL_GGUF_U64) {
        uint64_t u;
        memcpy(&u, p, 8);
        return (size_t)snprintf(buf, cap, "%llu", (unsigned long long)u);
    }
    if (scalar_int(t, p, &iv))
        return (size_t)snprintf(buf, cap, "%lld", (long long)iv);
    if (scalar_float(t, p, &fv))
        return (size_t)snprintf(buf, cap, "%g", fv);
    if (t == MDL_GGUF_STRING) {
        const char *s;
        size_t len;
        str_at(g, (uint64_t)(p - g->data), &s, &len);
        return fmt_str(buf, cap, s, len);
    }
    return (size_t)snprintf(buf, cap, "?");
}

void mdl_gguf_kv_format(const mdl_gguf_t *g, int64_t i, char *buf, size_t cap)
{
    if (cap == 0)
        return;
    buf[0] = '\0';
    if (i < 0 || i >= g->n_kv)
        return;
    const gguf_kv_t *kv = &g->kvs[i];
    if (kv->type != MDL_GGUF_ARRAY) {
        fmt_scalar(g, kv->type, g->data + kv->off, buf, cap);
        return;
    }
    size_t w = (size_t)snprintf(buf, cap, "[%s x %llu] ", type_name(kv->arr_type),
                                (unsigned long long)kv->arr_len);
    for (uint64_t j = 0; j < kv->arr_len && j < 5 && w + 8 < cap; j++) {
        uint32_t t;
        const uint8_t *p;
        if (arr_elem(g, i, j, &t, &p) != FY_OK)
            break;
        if (j > 0)
            w += (size_t)snprintf(buf + w, cap - w, ", ");
        w += fmt_scalar(g, t, p, buf + w, cap - w);
    }
    if (kv->arr_len > 5 && w + 6 < cap)
        snprintf(buf + w, cap - w, ", ...");
}

const mdl_gguf_tensor_t *mdl_gguf_tensor(const mdl_gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const mdl_gguf_tensor_t *mdl_gguf_find_tensor(const mdl_gguf_t *g, const char *name)
{
    for (int64_t i = 0; i < g->n_tensors; i++) {
        if (strcmp(g->tensors[i].name, name) == 0)
            return &g->tensors[i];
    }
    return NULL;
}

fy_status_t mdl_gguf_tensor_to_f32(const mdl_gguf_tensor_t *t, float *dst)
{
    const uint8_t *p = t->data;
    uint64_t n = t->n_elems;
    switch (t->type) {
    case MDL_TENSOR_F32:
        memcpy(dst, p, (size_t)n * 4);
        return FY_OK;
    case MDL_TENSOR_F16:
    case MDL_TENSOR_BF16:
        // The alignment may be as small as 1 (and buffers from outside anything): read the
        // halves with memcpy unless they are 2-byte aligned.
        if (((uintptr_t)p & 1) == 0) {
            if (t->type == MDL_TENSOR_F16)
                fy_fp16_to_fp32_buf(dst, (const uint16_t *)(const void *)p, (size_t)n);
            else
                fy_bf16_to_fp32_buf(dst, (const uint16_t *)(const void *)p, (size_t)n);
            return FY_OK;
        }
        for (uint64_t j = 0; j < n; j++) {
            uint16_t h;
            memcpy(&h, p + 2 * j, 2);
            dst[j] = t->type == MDL_TENSOR_F16 ? fy_fp16_to_fp32(h) : fy_bf16_to_fp32(h);
        }
        return FY_OK;
    case MDL_TENSOR_Q8_0:
        for (uint64_t b = 0; b < n / 32; b++, p += 34) {
            uint16_t dh;
            memcpy(&dh, p, 2);
            float d = fy_fp16_to_fp32(dh);
            const int8_t *q = (const int8_t *)(p + 2);
            for (int j = 0; j < 32; j++)
                dst[b * 32 + j] = d * q[j];
        }
        return FY_OK;
    case MDL_TENSOR_Q4_0:
        for (uint64_t b = 0; b < n / 32; b++, p += 18) {
            uint16_t dh;
            memcpy(&dh, p, 2);
            float d = fy_fp16_to_fp32(dh);
            const uint8_t *q = p + 2;
            for (int j = 0; j < 16; j++) {
                dst[b * 32 + j] = d * ((int)(q[j] & 0x0f) - 8);
                dst[b * 32 + j + 16] = d * ((int)(q[j] >> 4) - 8);
            }
        }
        return FY_OK;
    case MDL_TENSOR_Q4_1:
        for (uint64_t b = 0; b < n / 32; b++, p += 20) {
            uint16_t dh, mh;
            memcpy(&dh, p, 2);
            memcpy(&mh, p + 2, 2);
            float d = fy_fp16_to_fp32(dh), m = fy_fp16_to_fp32(mh);
            const uint8_t *q = p + 4;
            for (int j = 0; j < 16; j++) {
                dst[b * 32 + j] = d * (q[j] & 0x0f) + m;
                dst[b * 32 + j + 16] = d * (q[j] >> 4) + m;
            }
        }
        return FY_OK;
    default:
        return FY_ERR_UNSUPPORTED;
    }
}
