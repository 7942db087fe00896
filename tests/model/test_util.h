/*
 * test_util.h: helpers shared by the model tests: paths from FERRY_SOURCE_ROOT, the real
 * model (a test that needs it fails, never skips, when it is missing: scripts/setup.sh
 * fetches it), JSON fixtures, and the tiny model loaded from memory.
 */
#ifndef FERRY_TESTS_MODEL_UTIL_H
#define FERRY_TESTS_MODEL_UTIL_H

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_writer.h"
#include "model.h"

static inline const char *tu_source_root(void)
{
    const char *r = getenv("FERRY_SOURCE_ROOT");
    return r != NULL ? r : ".";
}

static inline char *tu_path(const char *rel)
{
    static char buf[4096];
    snprintf(buf, sizeof(buf), "%s/%s", tu_source_root(), rel);
    return buf;
}

#define TU_MODEL_REL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

/* The real model's file: $FERRY_MODEL when set (the GPU check sets it), else TU_MODEL_REL under
 * the source root. Valid until the next call. */
static inline const char *tu_model_path(void)
{
    const char *env = getenv("FERRY_MODEL");
    return env != NULL && env[0] != '\0' ? env : tu_path(TU_MODEL_REL);
}

/* Loads the real model or fails the test with a hint. */
static inline mdl_model_t *tu_real_model(void)
{
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t p;
    mdl_model_params_default(&p);
    p.path = tu_path(TU_MODEL_REL);
    mdl_model_t *m = NULL;
    fy_status_t st = mdl_model_create(&p, &m, err, sizeof(err));
    if (st != FY_OK) {
        fprintf(stderr, "cannot load %s: %s (%s); run scripts/setup.sh to fetch it\n", p.path,
                err, fy_status_str(st));
        return NULL;
    }
    return m;
}

static inline char *tu_read_file(const char *path, size_t *len_p)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = '\0';
    if (len_p != NULL)
        *len_p = (size_t)n;
    return buf;
}

/* Parses tests/fixtures/model/<name>.json and returns its "items" array's parent. */
static inline cJSON *tu_fixture(const char *name)
{
    char rel[256];
    snprintf(rel, sizeof(rel), "tests/fixtures/model/%s.json", name);
    char *text = tu_read_file(tu_path(rel), NULL);
    if (text == NULL)
        return NULL;
    cJSON *j = cJSON_Parse(text);
    free(text);
    return j;
}

/* Reads a JSON array of integers into a malloc'd int32 array. */
static inline int32_t *tu_ids(const cJSON *arr, int *n_p)
{
    int n = cJSON_GetArraySize(arr);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++)
        ids[i] = (int32_t)cJSON_GetArrayItem(arr, i)->valuedouble;
    *n_p = n;
    return ids;
}

/* The tiny random model from memory. */
static inline mdl_model_t *tu_tiny_model(const mdlt_tiny_params_t *p)
{
    uint8_t *buf;
    size_t len;
    mdlt_tiny_model_mem(p, &buf, &len);
    mdl_gguf_t *g = NULL;
    mdl_model_t *m = NULL;
    char err[MDL_ERR_LEN] = "";
    if (mdl_gguf_open_mem(buf, len, &g, err, sizeof(err)) == FY_OK)
        mdl_model_create_from_gguf(g, &m, err, sizeof(err));
    if (m == NULL)
        fprintf(stderr, "tiny model: %s\n", err);
    mdl_gguf_close(g);
    free(buf);
    return m;
}

/* Counts a failed check in the caller's `bad` and says where, without stopping the test (the
 * GPU tests report every difference of a run at once). */
#define TU_CHECK(cond, ...)                                                                    \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                        \
            printf(__VA_ARGS__);                                                               \
            printf("\n");                                                                      \
            bad++;                                                                             \
        }                                                                                      \
    } while (0)

/* One tiny-model shape of the GPU parity tests. */
typedef struct {
    const char *arch;
    uint32_t type; /* weight type */
    bool tied;
    int heads, kv_heads, dim;
} tu_tiny_case_t;

/* Writes case c (3 layers, weights from seed) to a new temporary file (path, cap >= 32); its
 * parameters into *tp. 0 on success; the caller unlinks the file. */
static inline int tu_tiny_case_temp(const tu_tiny_case_t *c, uint64_t seed, char *path,
                                    size_t cap, mdlt_tiny_params_t *tp)
{
    mdlt_tiny_params_default(tp);
    tp->arch = c->arch;
    tp->weight_type = c->type;
    tp->tied = c->tied;
    tp->n_heads = c->heads;
    tp->n_kv_heads = c->kv_heads;
    tp->dim = c->dim;
    tp->n_layers = 3;
    tp->seed = seed;
    return mdlt_tiny_model_temp(tp, path, cap);
}

/* n random tiny-vocabulary tokens (not the 3 special ones) from the LCG state *seed. */
static inline void tu_random_tokens(uint64_t *seed, int32_t *tokens, int n)
{
    for (int t = 0; t < n; t++) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        tokens[t] = 3 + (int32_t)((*seed >> 33) % (uint64_t)(mdlt_tiny_n_vocab() - 3));
    }
}

#endif /* FERRY_TESTS_MODEL_UTIL_H */
