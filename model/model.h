/*
 * model.h: Ferry's model runtime: GGUF reader, tokenizer, Llama-family forward pass over a
 * paged KV cache, and sampler.
 *
 * GGUF (v2 and v3, little-endian) is read over mmap (or a caller's buffer). Layout:
 *   1. header: magic "GGUF" (u32 0x46554747), version u32, n_tensors u64, n_kv u64
 *   2. n_kv metadata entries: key (u64 length + bytes), value type u32, value
 *      (scalars; string = u64 length + bytes; array = elem type u32, count u64, elems)
 *   3. n_tensors infos: name (string), n_dims u32 (1..4), ne[n_dims] u64 (ne0 contiguous),
 *      type u32, offset u64 (relative to the data section, aligned)
 *   4. padding to general.alignment (default 32), then the data section.
 * Every count, length, offset and size is checked against the bytes that remain before it is
 * used; a bad file gets FY_ERR_FORMAT / FY_ERR_TRUNCATED / FY_ERR_UNSUPPORTED and a message
 * naming the field.
 *
 * The forward pass computes in FP32 (weights are dequantized at load). Prefill runs layer by
 * layer over the whole prompt (GEMMs in row chunks), so each layer's K (after RoPE), V and the
 * last W queries can be handed out as soon as the layer is done (mdl_layer_cb). Decode runs a
 * batch of sequences, one token each, over the paged KV cache (mdl_kv_t). A sequence's cache
 * can also be loaded from outside (mdl_kv_seq_load_layer), then decoded from: that is how a
 * decode worker continues a prompt prefilled elsewhere.
 *
 * With MDL_DEVICE_CUDA (model, context and KV pool) the same calls run on one GPU
 * (llama_cuda.c): FP16 weights, cuBLAS GEMMs with FP32 accumulation, FP32 elsewhere, FP16
 * pages in one GPU allocation; inputs, outputs and callbacks stay on the host.
 *
 * Objects: mdl_gguf_t (a parsed file), mdl_model_t (weights + tokenizer; read-only once
 * created, shareable between threads), mdl_ctx_t (scratch and threads for one caller),
 * mdl_kv_t (page pool), mdl_kv_seq_t (one sequence's pages), mdl_sampler_t.
 */
#ifndef FERRY_MODEL_H
#define FERRY_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "kernels.h"
#include "kvcodec.h"
#include "kvcodec_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Size of the error message buffers the loaders fill (optional: pass NULL, 0). */
#define MDL_ERR_LEN 256

/* ------------------------------------------------------------------------------------------ */
/* GGUF reader (gguf.c)                                                                         */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    MDL_GGUF_U8 = 0,
    MDL_GGUF_I8 = 1,
    MDL_GGUF_U16 = 2,
    MDL_GGUF_I16 = 3,
    MDL_GGUF_U32 = 4,
    MDL_GGUF_I32 = 5,
    MDL_GGUF_F32 = 6,
    MDL_GGUF_BOOL = 7,
    MDL_GGUF_STRING = 8,
    MDL_GGUF_ARRAY = 9,
    MDL_GGUF_U64 = 10,
    MDL_GGUF_I64 = 11,
    MDL_GGUF_F64 = 12,
} mdl_gguf_type_t;

/* Tensor element types (ggml numbering) that the reader can dequantize. */
typedef enum {
    MDL_TENSOR_F32 = 0,
    MDL_TENSOR_F16 = 1,
    MDL_TENSOR_Q4_0 = 2,
    MDL_TENSOR_Q4_1 = 3,
    MDL_TENSOR_Q8_0 = 8,
    MDL_TENSOR_BF16 = 30,
} mdl_tensor_type_t;

typedef struct mdl_gguf mdl_gguf_t;

/* One tensor of the file. Pointers are valid until mdl_gguf_close. */
typedef struct {
    const char *name; /* NUL-terminated copy */
    uint32_t type;    /* mdl_tensor_type_t */
    int n_dims;       /* 1..4 */
    uint64_t ne[4];   /* ne[0] is the contiguous dimension; unused dims are 1 */
    uint64_t n_elems;
    uint64_t offset; /* from the start of the file */
    uint64_t n_bytes;
    const void *data; /* into the mapping */
} mdl_gguf_tensor_t;

/* Opens and validates a GGUF file (mmap, read-only). err (optional) receives a message naming
 * the offending field. Thread: any. */
fy_status_t mdl_gguf_open(const char *path, mdl_gguf_t **gguf_p, char *err, size_t err_len);

/* Same over a caller's buffer, which is borrowed until mdl_gguf_close (used by the fuzzer and
 * tests). Thread: any. */
fy_status_t mdl_gguf_open_mem(const void *data, size_t size, mdl_gguf_t **gguf_p, char *err,
                              size_t err_len);

/* Unmaps and frees; accepts NULL. Thread: not while others use the object. */
void mdl_gguf_close(mdl_gguf_t *gguf);

/* Header facts. Thread: any. */
uint32_t mdl_gguf_version(const mdl_gguf_t *gguf);
uint32_t mdl_gguf_alignment(const mdl_gguf_t *gguf);
int64_t mdl_gguf_n_kv(const mdl_gguf_t *gguf);
int64_t mdl_gguf_n_tensors(const mdl_gguf_t *gguf);

/* Metadata entry i: key (NUL-terminated), type, and for arrays the element type and count.
 * Thread: any. */
const char *mdl_gguf_kv_key(const mdl_gguf_t *gguf, int64_t i);
mdl_gguf_type_t mdl_gguf_kv_type(const mdl_gguf_t *gguf, int64_t i);
mdl_gguf_type_t mdl_gguf_arr_type(const mdl_gguf_t *gguf, int64_t i);
uint64_t mdl_gguf_arr_len(const mdl_gguf_t *gguf, int64_t i);

/* Index of a key, or -1. Thread: any. */
int64_t mdl_gguf_find_key(const mdl_gguf_t *gguf, const char *key);

/* Typed getters by key. Integers of any GGUF integer type convert when the value fits; floats
 * accept F32/F64. FY_ERR_NOT_FOUND when absent, FY_ERR_FORMAT on a type mismatch,
 * FY_ERR_OUT_OF_RANGE when it does not fit. Thread: any. */
fy_status_t mdl_gguf_get_i64(const mdl_gguf_t *gguf, const char *key, int64_t *val_p);
fy_status_t mdl_gguf_get_f32(const mdl_gguf_t *gguf, const char *key, float *val_p);
fy_status_t mdl_gguf_get_bool(const mdl_gguf_t *gguf, const char *key, bool *val_p);
/* String value (not NUL-terminated: use *len_p); points into the file. */
fy_status_t mdl_gguf_get_str(const mdl_gguf_t *gguf, const char *key, const char **str_p,
                             size_t *len_p);

/* Array access for entry i (checked: FY_ERR_OUT_OF_RANGE past the end, FY_ERR_FORMAT when the
 * element type differs). Thread: any. */
fy_status_t mdl_gguf_arr_str(const mdl_gguf_t *gguf, int64_t i, uint64_t j, const char **str_p,
                             size_t *len_p);
fy_status_t mdl_gguf_arr_i64(const mdl_gguf_t *gguf, int64_t i, uint64_t j, int64_t *val_p);
fy_status_t mdl_gguf_arr_f32(const mdl_gguf_t *gguf, int64_t i, uint64_t j, float *val_p);

/* Prints a scalar or short array value (arrays: type, length and the first few elements) into
 * buf for display. Thread: any. */
void mdl_gguf_kv_format(const mdl_gguf_t *gguf, int64_t i, char *buf, size_t len);

/* Tensor i (0 <= i < n_tensors), or NULL. Thread: any. */
const mdl_gguf_tensor_t *mdl_gguf_tensor(const mdl_gguf_t *gguf, int64_t i);
/* Tensor by name, or NULL. Thread: any. */
const mdl_gguf_tensor_t *mdl_gguf_find_tensor(const mdl_gguf_t *gguf, const char *name);

/* Name of a tensor type ("Q4_1"), or "?" Thread: any. */
const char *mdl_tensor_type_name(uint32_t type);

/* Whether the reader can dequantize this type. Thread: any. */
bool mdl_tensor_type_supported(uint32_t type);

/* Dequantizes a whole tensor into dst [n_elems] FP32 (ne0 contiguous). FY_ERR_UNSUPPORTED for
 * other types. Thread: any. */
fy_status_t mdl_gguf_tensor_to_f32(const mdl_gguf_tensor_t *t, float *dst);

/* ------------------------------------------------------------------------------------------ */
/* Tokenizer (tokenizer.c)                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    MDL_TOK_BPE = 1, /* byte-level BPE (tokenizer.ggml.model "gpt2") */
    MDL_TOK_SPM = 2, /* SentencePiece-style BPE over scores ("llama") */
} mdl_tok_kind_t;

/* Pre-tokenizer regex families (tokenizer.ggml.pre). */
typedef enum {
    MDL_PRE_GPT2 = 0,   /* GPT-2: 's|'t|..| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    MDL_PRE_SMOLLM = 1, /* digits one by one, then GPT-2 (smollm, starcoder, refact) */
    MDL_PRE_LLAMA3 = 2, /* Llama 3: case-insensitive contractions, \p{N}{1,3}, ... */
    MDL_PRE_QWEN2 = 3,  /* Qwen2: Llama 3 with single digits */
} mdl_pre_kind_t;

typedef struct mdl_tokenizer mdl_tokenizer_t;

/* Builds the tokenizer from GGUF metadata (tokenizer.ggml.*). Thread: any. */
fy_status_t mdl_tokenizer_create(const mdl_gguf_t *gguf, mdl_tokenizer_t **tok_p, char *err,
                                 size_t err_len);
/* Accepts NULL. */
void mdl_tokenizer_destroy(mdl_tokenizer_t *tok);

mdl_tok_kind_t mdl_tokenizer_kind(const mdl_tokenizer_t *tok);
mdl_pre_kind_t mdl_tokenizer_pre(const mdl_tokenizer_t *tok);
int32_t mdl_tokenizer_n_vocab(const mdl_tokenizer_t *tok);
int32_t mdl_tokenizer_bos(const mdl_tokenizer_t *tok); /* -1 when none */
int32_t mdl_tokenizer_eos(const mdl_tokenizer_t *tok); /* -1 when none */
/* Whether BOS should be added in front of a prompt (tokenizer.ggml.add_bos_token). */
bool mdl_tokenizer_add_bos(const mdl_tokenizer_t *tok);
/* Token id of an exact vocabulary string, or -1. */
int32_t mdl_tokenizer_find(const mdl_tokenizer_t *tok, const char *text);
/* Whether a token is a control/special token (not printed by the detokenizer). */
bool mdl_tokenizer_is_special(const mdl_tokenizer_t *tok, int32_t id);

/* Encodes len bytes of UTF-8 text. With parse_special, special tokens written in the text
 * ("<|im_start|>") become their ids; otherwise they are plain text. BOS is not added (see
 * mdl_tokenizer_add_bos). Writes up to cap ids and sets *n_p to the number the text needs:
 * FY_ERR_RESOURCE_EXHAUSTED when cap was too small (call again with *n_p). Invalid UTF-8 bytes
 * are encoded as themselves where the vocabulary has a token for the byte; a byte it has none
 * for (SmolLM2's byte-level vocabulary lacks 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1,
 * 0xF1, 0xF2 and 0xF5-0xFF) is encoded as U+FFFD, never as the unknown token (SmolLM2's is
 * <|endoftext|>). Thread: any (the tokenizer is read-only). */
fy_status_t mdl_tokenizer_encode(const mdl_tokenizer_t *tok, const char *text, size_t len,
                                 bool parse_special, int32_t *ids, size_t cap, size_t *n_p);

/* The raw bytes a token stands for (byte-level decoded; special tokens give their text).
 * Writes up to cap bytes, returns the full length, or -1 for an id out of range. */
int mdl_tokenizer_token_bytes(const mdl_tokenizer_t *tok, int32_t id, char *buf, size_t cap);

/* Streaming detokenizer: feeds ids, hands out only complete UTF-8 characters, keeping the
 * bytes of a character that spans tokens until it is complete. Caller-allocated. */
typedef struct {
    const mdl_tokenizer_t *tok; /* borrowed */
    bool skip_special;          /* do not print control tokens */
    bool at_start;              /* SPM: drop the space of the first word */
    uint8_t pending[8];
    int n_pending;
} mdl_detok_t;

void mdl_detok_init(mdl_detok_t *d, const mdl_tokenizer_t *tok, bool skip_special);
/* Appends the printable text for one more token to out (up to cap bytes, NUL-terminated);
 * returns the number of bytes written (< cap), or -1 for an invalid id. Invalid UTF-8, and
 * U+0000 (which would end the text), are replaced by U+FFFD. Only whole characters are
 * written: one that does not fit is dropped (cap >= 3 x the token's bytes + 1 always fits).
 * Thread: not thread-safe (one per stream). */
int mdl_detok_push(mdl_detok_t *d, int32_t id, char *out, size_t cap);
/* Flushes an incomplete trailing character as U+FFFD; returns bytes written. */
int mdl_detok_flush(mdl_detok_t *d, char *out, size_t cap);

/* Whether len bytes are valid UTF-8: no stray or missing continuation bytes, overlong forms,
 * surrogates or code points past U+10FFFF. Thread: any. */
bool mdl_utf8_valid(const char *s, size_t len);
/* Copies len bytes to out (room for 3 len + 1 bytes) as valid UTF-8, each byte that does not
 * belong to a valid character replaced by U+FFFD; returns the length, out NUL-terminated.
 * Thread: any. */
size_t mdl_utf8_sanitize(const char *s, size_t len, char *out);

/* One chat message; strings borrowed for the call. */
typedef struct {
    const char *role; /* "system", "user", "assistant" */
    const char *content;
} mdl_chat_msg_t;

/* The chat formats mdl_chat_render writes, told apart by the GGUF's tokenizer.chat_template
 * (a Jinja template Ferry does not run: each family's markers pick the format). */
typedef enum {
    MDL_CHAT_NONE = 0, /* no template, or one of none of these families */
    MDL_CHAT_CHATML,   /* <|im_start|>role\ncontent<|im_end|>\n (SmolLM2, Qwen) */
    MDL_CHAT_LLAMA3,   /* <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> */
    MDL_CHAT_MISTRAL,  /* [INST] user [/INST]assistant</s> (Mistral, Mixtral; a system message
                          goes before the first user message's text) */
    MDL_CHAT_LLAMA2,   /* [INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant </s><s> */
    MDL_CHAT_GEMMA,    /* <start_of_turn>user\ncontent<end_of_turn>\n, assistant as "model" */
    MDL_CHAT_PHI3,     /* <|user|>\ncontent<|end|>\n */
} mdl_chat_kind_t;

mdl_chat_kind_t mdl_chat_kind(const mdl_tokenizer_t *tok); // Thread: any
const char *mdl_chat_kind_name(mdl_chat_kind_t kind);      // Thread: any

/* Renders messages in the model's chat format (mdl_chat_kind): ChatML adds the template's
 * default system prompt when it writes one literally and the first message is not a system
 * message; formats without a system turn (Mistral, Gemma) put a system message's text before
 * the first user message's; the model's BOS is not written (the tokenizer adds it). With
 * add_assistant, the opening of the assistant's turn follows. Returns a malloc'd string
 * (caller frees), FY_ERR_UNSUPPORTED when the model has no template of these families,
 * FY_ERR_INVALID_ARG for a message without role or content. Thread: any. */
fy_status_t mdl_chat_render(const mdl_tokenizer_t *tok, const mdl_chat_msg_t *msgs, size_t n,
                            bool add_assistant, char **text_p);

/* The token that ends an assistant's turn in the model's chat format, when it is not EOS:
 * <|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>; -1 when there is none (Mistral's turns end
 * with EOS) or the vocabulary lacks it. Generation stops there. Thread: any. */
int32_t mdl_chat_end_token(const mdl_tokenizer_t *tok);

/* ------------------------------------------------------------------------------------------ */
/* Model (llama.c)                                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    MDL_ARCH_LLAMA = 0, /* Llama, Mistral, SmolLM */
    MDL_ARCH_QWEN2 = 1, /* QKV bias, NEOX RoPE */
} mdl_arch_t;

/* Hyper-parameters read from the metadata. */
typedef struct {
    mdl_arch_t arch;
    int n_vocab;
    int dim;        /* embedding width */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;   /* dim / n_heads */
    int ffn_dim;
    int n_ctx_train;
    float rms_eps;
    krn_rope_t rope; /* freq_factors point into the model */
    bool tied_embeddings;
    bool qkv_bias;
} mdl_config_t;

typedef struct mdl_model mdl_model_t;

/* Where a model's weights, a context's compute and a KV pool's pages live. MDL_DEVICE_CUDA
 * needs a CUDA build and a GPU (FY_ERR_NO_DEVICE otherwise); the CPU is the default. */
typedef enum {
    MDL_DEVICE_CPU = 0,
    MDL_DEVICE_CUDA = 1,
} mdl_device_t;

/* "cpu" or "cuda" (a --device flag) to *device_p; FY_ERR_INVALID_ARG for anything else.
 * Thread: any. */
fy_status_t mdl_device_parse(const char *name, mdl_device_t *device_p);

typedef struct {
    const char *path;    /* GGUF file; borrowed for the call */
    mdl_device_t device; /* CUDA: weights resident on the GPU in FP16 (dequantized there), no
                            FP32 host copy; such a model runs only in CUDA contexts */
} mdl_model_params_t;

void mdl_model_params_default(mdl_model_params_t *p);

/* Loads weights (dequantized to FP32) and the tokenizer. err names the missing or malformed
 * field. Thread: any. */
fy_status_t mdl_model_create(const mdl_model_params_t *params, mdl_model_t **model_p, char *err,
                             size_t err_len);
/* Same from an already opened file (borrowed for the call). */
fy_status_t mdl_model_create_from_gguf(const mdl_gguf_t *gguf, mdl_model_t **model_p, char *err,
                                       size_t err_len);
/* Accepts NULL. Thread: after every context using it is destroyed. */
void mdl_model_destroy(mdl_model_t *model);

/* Valid as long as the model. Thread: any. */
const mdl_config_t *mdl_model_config(const mdl_model_t *model);
mdl_device_t mdl_model_device(const mdl_model_t *model);
const mdl_tokenizer_t *mdl_model_tokenizer(const mdl_model_t *model);

/* ------------------------------------------------------------------------------------------ */
/* Paged KV cache (kvcache.c)                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* A pool of FP16 pages. A page holds page_tokens tokens of one (layer, kv head):
 * k [page_tokens][head_dim] then v [page_tokens][head_dim]. A sequence owns, per (layer,
 * kv head), a list of pages. This is the FP16-only stand-in for kvcodec's compressed pages,
 * behind the same shape of interface (pages per (layer, head), a per-sequence page list). */
typedef struct mdl_kv mdl_kv_t;
typedef struct mdl_kv_seq mdl_kv_seq_t;

typedef struct {
    int n_layers;
    int n_kv_heads;
    int head_dim;
    int page_tokens; /* tokens per page (default 16) */
    int64_t n_pages; /* pages in the pool */
    mdl_device_t device; /* CUDA: the pages are one GPU allocation of n_pages pages (same page
                            format); bookkeeping stays on the host. Such a pool serves CUDA
                            contexts only; load/read copy through the host. */
} mdl_kv_params_t;

/* Fills page_tokens = 16 and the shape and device of model (may be NULL: CPU), n_pages = 0
 * (set it). */
void mdl_kv_params_default(mdl_kv_params_t *p, const mdl_model_t *model);

/* Pages needed to hold n_tokens for every (layer, kv head) of a sequence. Thread: any. */
int64_t mdl_kv_pages_for(const mdl_kv_params_t *p, int64_t n_tokens);

/* Thread: any. */
fy_status_t mdl_kv_create(const mdl_kv_params_t *params, mdl_kv_t **kv_p);
/* Accepts NULL. Every sequence must be destroyed first. */
void mdl_kv_destroy(mdl_kv_t *kv);
int64_t mdl_kv_free_pages(const mdl_kv_t *kv);

/* A new empty sequence whose pages come from kv. Thread: not thread-safe (per pool). */
fy_status_t mdl_kv_seq_create(mdl_kv_t *kv, mdl_kv_seq_t **seq_p);
/* Returns every page to the pool; accepts NULL. Thread: not thread-safe (per pool). */
void mdl_kv_seq_destroy(mdl_kv_seq_t *seq);

/* Tokens committed to the sequence (the position of the next token). Thread: any. */
int64_t mdl_kv_seq_len(const mdl_kv_seq_t *seq);

/* Makes sure the sequence has pages for n_more tokens past its length in every (layer, head):
 * FY_ERR_RESOURCE_EXHAUSTED (nothing changed) when the pool is short. Thread: not thread-safe
 * (per pool). */
fy_status_t mdl_kv_seq_reserve(mdl_kv_seq_t *seq, int64_t n_more);

/* Writes the K (after RoPE) and V of n_tokens tokens of one layer at positions
 * [len, len + n_tokens): k, v [n_kv_heads][n_tokens][head_dim] FP32 (borrowed for the call).
 * This is how an external prefill's KV enters the cache: load every layer, then
 * mdl_kv_seq_commit(n_tokens), then decode. Reserves pages as needed. Thread: not thread-safe
 * (per pool). */
fy_status_t mdl_kv_seq_load_layer(mdl_kv_seq_t *seq, int layer, int64_t n_tokens, const float *k,
                                  const float *v);

/* Advances the length by n_tokens after all layers were written. FY_ERR_STATE when the pages
 * cannot hold them. Thread: not thread-safe (per sequence). */
fy_status_t mdl_kv_seq_commit(mdl_kv_seq_t *seq, int64_t n_tokens);

/* Drops every token (pages go back to the pool). */
void mdl_kv_seq_clear(mdl_kv_seq_t *seq);

/* The page list of one (layer, kv head), covering n_tokens tokens (the committed length plus
 * n_extra uncommitted ones written this step). pages is filled into caller storage of
 * cap entries (for a CUDA pool they are device addresses). Thread: any (read-only). */
fy_status_t mdl_kv_seq_pages(const mdl_kv_seq_t *seq, int layer, int head, int64_t n_extra,
                             const uint16_t **pages, int cap, krn_page_list_t *list_p);

/* Copies the FP16 K and V of one (layer, head) out as FP32 k, v [len][head_dim]. For tests
 * and for handing a cache on. Thread: any. */
fy_status_t mdl_kv_seq_read(const mdl_kv_seq_t *seq, int layer, int head, float *k, float *v);

/* ------------------------------------------------------------------------------------------ */
/* Forward: prefill and decode (llama.c)                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct mdl_ctx mdl_ctx_t;

typedef struct {
    int n_threads;      /* workers for attention and elementwise ops, and OpenBLAS (0 = all) */
    int prefill_chunk;  /* rows per GEMM chunk in prefill (default 512) */
    int max_batch;      /* decode batch capacity (default 64) */
    mdl_device_t device; /* must match the model's device (FY_ERR_INVALID_ARG otherwise).
                            CUDA: prefill and decode run on the GPU (cuBLAS FP16 GEMMs with FP32
                            accumulation, FP32 elsewhere), decode over a CUDA KV pool, logits
                            copied back; the layer callback still gets host buffers, copied on
                            a second stream while the next layer computes. */
} mdl_ctx_params_t;

void mdl_ctx_params_default(mdl_ctx_params_t *p);

/* Scratch and a thread pool for running a model; model is borrowed until destroy. GEMMs use
 * OpenBLAS, whose thread count is process-wide: each call sets it to this context's n_threads
 * (prefill attention drops it to 1 while the pool runs heads in parallel), so contexts that
 * run at the same time in one process should use the same n_threads. Thread: any. */
fy_status_t mdl_ctx_create(const mdl_model_t *model, const mdl_ctx_params_t *params,
                           mdl_ctx_t **ctx_p);
void mdl_ctx_destroy(mdl_ctx_t *ctx);

/* What prefill hands out for one finished layer. All buffers are borrowed for the callback.
 * K and V follow the GGUF head layout (for Llama files, channels in RoPE-pair order; Q uses the
 * same order, so attention scores are unchanged). */
typedef struct {
    int layer;
    int n_tokens;
    int n_kv_heads;
    int n_heads;
    int head_dim;
    const float *k;        /* [n_kv_heads][n_tokens][head_dim], after RoPE */
    const float *v;        /* [n_kv_heads][n_tokens][head_dim] */
    int n_window;          /* min(window, n_tokens) */
    const float *q_window; /* [n_heads][n_window][head_dim]: the last queries, after RoPE */
    const float *window_attn; /* [n_heads][n_tokens]: per query head the mean over the window
                                 of the softmax rows (kvc_layer_input_t.window_attn), when the
                                 attention kernel computed it (CUDA contexts asked for it with
                                 mdl_prefill_params_t.window_attn), else NULL */
    /* With mdl_prefill_params_t.device_kv on a CUDA context, the layer stays in device memory
     * instead: k, v, q_window and window_attn are NULL and these hold K and V in FP16 and the
     * window queries and scores in FP32 (same shapes), complete in stream order on stream (a
     * cudaStream_t). Work the callback queues on stream may read them; the model reuses the
     * buffers only after that work. All NULL otherwise. */
    const uint16_t *k16_dev;
    const uint16_t *v16_dev;
    const float *q_window_dev;
    const float *window_attn_dev;
    void *stream;
} mdl_layer_kv_t;

/* A non-OK return aborts the prefill with that status. */
typedef fy_status_t (*mdl_layer_cb)(void *arg, const mdl_layer_kv_t *kv);

typedef struct {
    mdl_kv_seq_t *seq;   /* when set (empty), the prompt's KV is stored into it; borrowed */
    mdl_layer_cb on_layer; /* optional */
    void *cb_arg;
    int window;          /* observation window W for q_window (0 = none) */
    bool window_attn;    /* CUDA contexts: the attention kernel also computes window_attn, one
                            more pass over the keys per layer (the codec scores from q_window
                            without it); CPU contexts ignore it */
    bool all_logits;     /* logits for every position, not just the last */
    bool device_kv;      /* CUDA contexts: hand the layer out in device memory (see
                            mdl_layer_kv_t); CPU contexts ignore it */
} mdl_prefill_params_t;

void mdl_prefill_params_default(mdl_prefill_params_t *p);

/* Runs the prompt tokens[n] (n >= 1) from position 0. logits receives [n_vocab] for the last
 * token, or [n][n_vocab] with all_logits. Token ids are checked. Thread: one call at a time
 * per ctx. */
fy_status_t mdl_prefill(mdl_ctx_t *ctx, const int32_t *tokens, int n,
                        const mdl_prefill_params_t *params, float *logits);

/* Runs n_seqs prompts (n_seqs >= 1) together, each from position 0: prompt s is tokens[s]
 * [n_tokens[s]] with params[s] (NULL: defaults for all) and logits[s] as in mdl_prefill. The
 * GEMMs of each layer run over the rows of all prompts at once (in chunks of prefill_chunk
 * rows); RoPE positions and causal attention are per prompt. After each layer every prompt's
 * callback gets that prompt's own K, V and window queries, in prompt order. Results equal
 * running the prompts one by one up to float rounding. A failure (a callback's non-OK return
 * included) aborts the whole batch with that status and clears every prompt's sequence: a
 * caller that wants to drop one prompt only should make its callback skip its work instead.
 * Distinct sequences only. CUDA contexts run the prompts one after another. Thread: one call
 * at a time per ctx. */
fy_status_t mdl_prefill_batch(mdl_ctx_t *ctx, int n_seqs, const int32_t *const *tokens,
                              const int *n_tokens, const mdl_prefill_params_t *params,
                              float *const *logits);

/* One decode step for a batch: token i goes into seqs[i] at position mdl_kv_seq_len(seqs[i]);
 * logits [n][n_vocab]. Pages are reserved first for every sequence, so a full pool fails
 * with FY_ERR_RESOURCE_EXHAUSTED before anything changes. The sequences are committed
 * (length + 1) on success. Distinct sequences only. Thread: one call at a time per ctx. */
fy_status_t mdl_decode(mdl_ctx_t *ctx, mdl_kv_seq_t *const *seqs, const int32_t *tokens, int n,
                       float *logits);

/* ------------------------------------------------------------------------------------------ */
/* Decode over kvcodec pages (decode_kvc.c)                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Identifies the model (shape, embedding, norms) for KV exchange: the value a prefill worker
 * writes into frames and kvlink handshakes and a decode worker checks. Never 0. Reads the
 * embedding (tens of ms on a large model): compute it once. Thread: any. */
uint64_t mdl_model_fingerprint(const mdl_model_t *model);

/* Pages one more decode token of seq (shaped for model) takes from pool: one per (layer,
 * kv head) whose FP16 tail page is full, shared or absent. Thread: not against changes of
 * seq. */
uint32_t mdl_kvc_step_pages(const mdl_model_t *model, const kvc_pool_t *pool,
                            const kvc_seq_t *seq);

/* mdl_decode over kvcodec pages: token i goes into seqs[i] (a prompt placed from frames with
 * kvc_place, still compressed, plus the FP16 tail of earlier steps) at RoPE position pos[i]
 * (the prompt length plus the tokens decoded so far: with evicted tokens the sequence holds
 * fewer tokens than its position). Attention runs over the compressed pages
 * (kvc_attend_layer); the new token's K (after RoPE, in the GGUF head order prefill hands out)
 * and V are appended in FP16 (kvc_seq_append). pool (borrowed) holds every sequence's pages
 * and was created with the model's head_dim; each sequence has the model's layers and kv heads
 * and all of them placed. Pages are checked first: FY_ERR_RESOURCE_EXHAUSTED, nothing changed,
 * when the pool cannot take this step's tail pages. Distinct sequences only; logits
 * [n][n_vocab]. Thread: one call at a time per ctx; the sequences must not change meanwhile. */
fy_status_t mdl_decode_kvc(mdl_ctx_t *ctx, kvc_pool_t *pool, kvc_seq_t *const *seqs,
                           const int32_t *pos, const int32_t *tokens, int n, float *logits);

/* mdl_kvc_step_pages for a sequence of a GPU pool (kvcodec_cuda.h). Thread: not against
 * changes of seq. */
uint32_t mdl_kvc_step_pages_cuda(const mdl_model_t *model, const kvc_gpu_pool_t *pool,
                                 const kvc_gpu_seq_t *seq);

/* mdl_decode_kvc on the GPU, for a CUDA context: the sequences live in a GPU page pool
 * (kvc_gpu_pool_t, pages placed with kvc_place_cuda, still compressed). Per layer the new
 * token's K (after RoPE, GGUF head order) and V go in FP16 to each sequence's tail pages on
 * the device (kvc_gpu_seq_append_slot + kvc_gpu_append_cuda: the same page bytes
 * kvc_seq_append writes), then attention over every page of the step's sequences runs as one
 * batch (kvc_attend_batch_cuda). Same arguments, positions, checks and failures as
 * mdl_decode_kvc: FY_ERR_RESOURCE_EXHAUSTED, nothing changed, when the pool cannot take the
 * step's tail pages; FY_ERR_INVALID_ARG for a CPU context or a sequence of another pool;
 * FY_ERR_NO_DEVICE in a build without CUDA. The placements must be complete on the device
 * (their stream synchronized) before the step; the step runs on the context's own stream and
 * returns when the logits are on the host. Thread: one call at a time per ctx; the sequences
 * must not change meanwhile. */
fy_status_t mdl_decode_kvc_cuda(mdl_ctx_t *ctx, kvc_gpu_pool_t *pool, kvc_gpu_seq_t *const *seqs,
                                const int32_t *pos, const int32_t *tokens, int n, float *logits);

/* ------------------------------------------------------------------------------------------ */
/* Sampler (sampler.c)                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* JSON mode (json_guide.c): the output is one JSON object (RFC 8259), OpenAI's
 * response_format json_object. mdl_json_t is where the text so far stands in it; a token that
 * would make the text anything but the start of an object is masked out, and once the object
 * is complete only a stop token may follow. The recognizer functions are pure (Thread: any,
 * one mdl_json_t per thread); a vocabulary is read-only once created (Thread: any). */
#define MDL_JSON_MAX_DEPTH 64 /* nesting of objects and arrays */
#define MDL_JSON_MAX_WS    64 /* white-space bytes in a row between tokens */

typedef struct {
    uint8_t st, lit, word, ws; /* recognizer state, literal / \u progress, white space run */
    bool key;                  /* the string being read is an object key */
    uint16_t depth;
    uint8_t stack[MDL_JSON_MAX_DEPTH / 8]; /* open containers: bit set = object */
} mdl_json_t;

void mdl_json_init(mdl_json_t *j);
/* Feeds bytes: true (and *j advanced) when the text so far is still the start of a JSON
 * object, false (and *j unchanged) otherwise. */
bool mdl_json_feed(mdl_json_t *j, const uint8_t *bytes, size_t n);
bool mdl_json_complete(const mdl_json_t *j);

/* Every token's bytes, once per model; special tokens have none (never allowed in JSON). */
typedef struct mdl_json_vocab mdl_json_vocab_t;
fy_status_t mdl_json_vocab_create(const mdl_tokenizer_t *tok, mdl_json_vocab_t **v_p);
void mdl_json_vocab_destroy(mdl_json_vocab_t *v); /* accepts NULL */
/* Feeds token's bytes (mdl_json_feed); false for a special token. */
bool mdl_json_accept(const mdl_json_vocab_t *v, mdl_json_t *j, int32_t token);
/* Sets logits[n_vocab] of the tokens that may not follow to -inf: those that break the
 * object, or, once it is complete, all but stops[n_stops]. Returns how many remain. */
int mdl_json_mask(const mdl_json_vocab_t *v, const mdl_json_t *j, const int32_t *stops, int n_stops,
                  float *logits);

/* JSON schema (json_schema.c): structured output, OpenAI's response_format json_schema. A
 * schema (JSON Schema text, at most MDL_SCHEMA_MAX_TEXT bytes) compiles to an automaton over
 * the output's bytes; a token that would take the text off every document the schema allows
 * is masked out, and once the document is whole only a stop token may follow. The top level
 * must be an object or an array. Supported: type (one or a list), properties, required,
 * additionalProperties (false, or a schema for objects without properties), items, minItems,
 * maxItems, minLength, maxLength, minimum, maximum, exclusiveMinimum and exclusiveMaximum of
 * integers (within +-1e15), enum, const, anyOf and oneOf whose branches start with
 * different bytes (types) or are objects told apart by a first required const property,
 * allOf of one schema, and local $ref (#/$defs/..., #/definitions/...); annotations (title,
 * description, default, examples, format, ...) are ignored. Any other keyword (pattern,
 * multipleOf, ...) or bounds of non-integer numbers fail the compile, naming them, rather than
 * produce output that breaks them.
 * Objects' properties come in the schema's order, optional ones may be left out; the
 * document starts at once, and between tokens come one space, or a line break and up to 20
 * spaces or tabs of indent; a number has at most 16 digits before and after its point and 3
 * in its exponent (inside a value the schema leaves free, white space and numbers as in JSON
 * mode). A compiled schema is read-only (Thread: any); a state is one thread's. */
#define MDL_SCHEMA_MAX_TEXT  (64 * 1024)
#define MDL_SCHEMA_MAX_DEPTH 32 /* nesting of objects and arrays the schema describes */

typedef struct mdl_schema mdl_schema_t;

typedef struct {
    uint16_t node;  /* the schema node this value follows */
    uint8_t phase;  /* where in the value the text stands */
    uint8_t prop;   /* object: properties of the schema's order already passed */
    uint32_t count; /* array: items so far */
} mdl_schema_frame_t;

typedef struct {
    uint8_t depth, done, ws; /* open values, the document is whole, white space run */
    uint8_t str, num, neg;   /* the top value's string escape / number state, its sign */
    uint16_t lit_pos;        /* bytes of a key or literal matched */
    uint16_t lit_done;       /* the literal a completed literal value matched */
    uint32_t chars;          /* string: characters so far; number: digits of this part */
    int64_t mag;             /* integer with bounds: the digits so far as a number */
    uint64_t cand;           /* key or literal candidates still matching */
    mdl_json_t any;          /* a value the schema leaves free */
    mdl_schema_frame_t frame[MDL_SCHEMA_MAX_DEPTH]; /* [depth] */
} mdl_schema_state_t;

/* Compiles text[len]; on failure the reason in err. */
fy_status_t mdl_schema_compile(const char *text, size_t len, mdl_schema_t **s_p, char *err,
                               size_t err_len);
void mdl_schema_destroy(mdl_schema_t *s); /* accepts NULL */
void mdl_schema_start(const mdl_schema_t *s, mdl_schema_state_t *st);
/* Feeds bytes: true (and *st advanced) when the text so far still begins a document the schema
 * allows, false (and *st unchanged) otherwise. */
bool mdl_schema_feed(const mdl_schema_t *s, mdl_schema_state_t *st, const uint8_t *bytes, size_t n);
bool mdl_schema_complete(const mdl_schema_state_t *st);
/* Token by token over a vocabulary, as mdl_json_accept and mdl_json_mask. */
bool mdl_schema_accept(const mdl_schema_t *s, const mdl_json_vocab_t *v, mdl_schema_state_t *st,
                       int32_t token);
int mdl_schema_mask(const mdl_schema_t *s, const mdl_json_vocab_t *v, const mdl_schema_state_t *st,
                    const int32_t *stops, int n_stops, float *logits);

#define MDL_MAX_STOP       8
#define MDL_MAX_LOGIT_BIAS 300
#define MDL_MAX_PENALTY    2.0f   /* |presence_penalty|, |frequency_penalty| (OpenAI's range) */
#define MDL_MAX_BIAS       100.0f /* |logit bias| */

typedef struct {
    float temperature;        /* <= 0: greedy (default 0.7) */
    int top_k;                /* 0 = off (default 40) */
    float top_p;              /* 1 = off (default 0.95) */
    float repetition_penalty; /* 1 = off (default 1.0); over the last penalty_last_n tokens */
    int penalty_last_n;       /* default 64 */
    /* OpenAI's penalties over the tokens generated so far (mdl_sampler_accept_output): each
     * such token's logit loses presence_penalty once and frequency_penalty per occurrence;
     * within +-MDL_MAX_PENALTY, 0 = off (default). */
    float presence_penalty, frequency_penalty;
    /* Added to these tokens' logits before anything else (within +-MDL_MAX_BIAS; a token may
     * appear once). */
    int n_logit_bias;
    int32_t bias_token[MDL_MAX_LOGIT_BIAS];
    float bias[MDL_MAX_LOGIT_BIAS];
    /* JSON mode: the generated tokens (mdl_sampler_accept_output) form one JSON object, then
     * a stop token; NULL = off. Borrowed for the sampler's life. */
    const mdl_json_vocab_t *json;
    /* With json: the output is one document of this schema instead of any object (borrowed
     * for the sampler's life). */
    const mdl_schema_t *schema;
    uint64_t seed;            /* default 0x5eed */
    int max_tokens;           /* default 256 */
    int n_stop;
    int32_t stop[MDL_MAX_STOP]; /* stop tokens (the model's EOS is added by the CLI) */
} mdl_sampler_params_t;

void mdl_sampler_params_default(mdl_sampler_params_t *p);

typedef struct mdl_sampler mdl_sampler_t;

/* FY_ERR_INVALID_ARG for parameters mdl_sampler_create refuses (a value out of range, a bias
 * on a token outside [0, n_vocab) or on one token twice). Thread: any. */
fy_status_t mdl_sampler_params_check(const mdl_sampler_params_t *params, int n_vocab);

fy_status_t mdl_sampler_create(const mdl_sampler_params_t *params, int n_vocab,
                               mdl_sampler_t **s_p);
void mdl_sampler_destroy(mdl_sampler_t *s);

/* Remembers tokens for the repetition penalty (the prompt, then each sampled token). */
void mdl_sampler_accept(mdl_sampler_t *s, int32_t token);
/* The same for a generated token, which the presence and frequency penalties count too. */
void mdl_sampler_accept_output(mdl_sampler_t *s, int32_t token);

/* Picks the next token from logits [n_vocab] (modified in place). Thread: not thread-safe. */
int32_t mdl_sampler_sample(mdl_sampler_t *s, float *logits);

/* Whether generation should stop after this token: a stop token, or max_tokens sampled. */
bool mdl_sampler_done(const mdl_sampler_t *s, int32_t token);

/* Log-probabilities under the model's own distribution, softmax(logits), before any sampling
 * setting (temperature, penalties, top-k, top-p): returns chosen's, and writes the n_top most
 * likely tokens (descending; ties by lower id) to top_ids and their log-probabilities to
 * top_lps (n_top 0: neither is touched). NAN for bad arguments or logits with no finite
 * maximum. Thread: any (reads logits only). */
#define MDL_MAX_TOP_LOGPROBS 20
float mdl_logprobs(const float *logits, int n_vocab, int32_t chosen, int n_top, int32_t *top_ids,
                   float *top_lps);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_MODEL_H */
