/*
 * gguf_writer.h: a small GGUF v3 writer for tests, and a tiny random-weight Llama-family model
 * built with it (byte-level BPE vocabulary of 3 special tokens, 256 byte tokens and a few
 * merges), so tests of any module can run a real forward pass without the downloaded model.
 *
 * Tensors are given as FP32 and stored in the requested type (F32, F16, BF16, Q8_0, Q4_0,
 * Q4_1: quantized here with the ggml reference rounding). Test helper: aborts on allocation
 * failure, never used outside tests.
 */
#ifndef FERRY_TESTS_GGUF_WRITER_H
#define FERRY_TESTS_GGUF_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct mdlt_gguf mdlt_gguf_t;

mdlt_gguf_t *mdlt_gguf_new(void);
void mdlt_gguf_free(mdlt_gguf_t *w);

/* Metadata, in the order added. A general.alignment set with mdlt_gguf_u32 is honoured. */
void mdlt_gguf_u32(mdlt_gguf_t *w, const char *key, uint32_t v);
void mdlt_gguf_i32(mdlt_gguf_t *w, const char *key, int32_t v);
void mdlt_gguf_f32(mdlt_gguf_t *w, const char *key, float v);
void mdlt_gguf_bool(mdlt_gguf_t *w, const char *key, bool v);
void mdlt_gguf_str(mdlt_gguf_t *w, const char *key, const char *v);
void mdlt_gguf_arr_str(mdlt_gguf_t *w, const char *key, const char *const *v, size_t n);
void mdlt_gguf_arr_i32(mdlt_gguf_t *w, const char *key, const int32_t *v, size_t n);
void mdlt_gguf_arr_f32(mdlt_gguf_t *w, const char *key, const float *v, size_t n);

/* A tensor of n_dims dims ne[] (ne[0] contiguous) from FP32 data [prod(ne)], stored as type
 * (an mdl_tensor_type_t value). */
void mdlt_gguf_tensor(mdlt_gguf_t *w, const char *name, uint32_t type, int n_dims,
                      const uint64_t *ne, const float *data);

/* The whole file in memory (malloc'd; caller frees). */
void mdlt_gguf_to_mem(const mdlt_gguf_t *w, uint8_t **buf_p, size_t *len_p);
/* Writes the file; 0 on success. */
int mdlt_gguf_write(const mdlt_gguf_t *w, const char *path);

/* The tiny model. */
typedef struct {
    const char *arch;     /* "llama" (default) or "qwen2" (QKV bias, NEOX RoPE) */
    int n_layers;         /* 2 */
    int dim;              /* 64 */
    int n_heads;          /* 4 */
    int n_kv_heads;       /* 2 */
    int ffn_dim;          /* 128 */
    int n_ctx;            /* 512 */
    uint32_t weight_type; /* matrices: MDL_TENSOR_F32 (0, default), F16, Q8_0, Q4_0, Q4_1 */
    bool tied;            /* no output.weight (default true) */
    uint64_t seed;        /* weights (default 1) */
} mdlt_tiny_params_t;

void mdlt_tiny_params_default(mdlt_tiny_params_t *p);

/* Builds the tiny model's GGUF in memory (caller frees *buf_p) or writes it to path. */
void mdlt_tiny_model_mem(const mdlt_tiny_params_t *p, uint8_t **buf_p, size_t *len_p);
int mdlt_tiny_model_write(const mdlt_tiny_params_t *p, const char *path);

/* Writes the tiny model to a new file /tmp/ferry-tiny-model-XXXXXX (its name into path, cap
 * bytes, at least 32); 0 on success. The caller unlinks it. */
int mdlt_tiny_model_temp(const mdlt_tiny_params_t *p, char *path, size_t cap);

/* The tiny vocabulary: ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|>; 3..258 the
 * byte tokens; then the merges' results. */
int mdlt_tiny_n_vocab(void);

#endif /* FERRY_TESTS_GGUF_WRITER_H */
