// Fuzz target: any byte string given to the GGUF reader, then to the tokenizer and model
// loaders built on it, fails cleanly or yields objects that work (metadata formatting, tensor
// dequantization, encode/decode, a short forward pass). Never a crash or a leak.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static void exercise_tokenizer(const mdl_tokenizer_t *tok)
{
    static const char *texts[] = {"Hello world 123", "  \t\n<|im_start|>x<|im_end|>",
                                  "\xff\xfe\xc3 caf\xc3\xa9 \xf0\x9f\x99\x82", ""};
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        int32_t ids[128];
        size_t n = 0;
        if (mdl_tokenizer_encode(tok, texts[i], strlen(texts[i]), i % 2 == 1, ids, 128, &n) !=
            FY_OK)
            continue;
        mdl_detok_t d;
        mdl_detok_init(&d, tok, i % 2 == 0);
        char out[256];
        for (size_t j = 0; j < n; j++)
            mdl_detok_push(&d, ids[j], out, sizeof(out));
        mdl_detok_flush(&d, out, sizeof(out));
    }
    mdl_chat_msg_t m = {"user", "hi"};
    char *s = NULL;
    if (mdl_chat_render(tok, &m, 1, true, &s) == FY_OK)
        free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mdl_gguf_t *g = NULL;
    char err[MDL_ERR_LEN];
    if (mdl_gguf_open_mem(data, size, &g, err, sizeof(err)) != FY_OK)
        return 0;
    char line[512];
    for (int64_t i = 0; i < mdl_gguf_n_kv(g); i++)
        mdl_gguf_kv_format(g, i, line, sizeof(line));
    for (int64_t i = 0; i < mdl_gguf_n_tensors(g); i++) {
        const mdl_gguf_tensor_t *t = mdl_gguf_tensor(g, i);
        if (!mdl_tensor_type_supported(t->type) || t->n_elems > (1u << 20))
            continue;
        float *dst = malloc(t->n_elems * sizeof(float));
        if (dst != NULL)
            mdl_gguf_tensor_to_f32(t, dst);
        free(dst);
    }
    mdl_tokenizer_t *tok = NULL;
    if (mdl_tokenizer_create(g, &tok, err, sizeof(err)) == FY_OK) {
        exercise_tokenizer(tok);
        mdl_tokenizer_destroy(tok);
    }
    // Loading a model dequantizes every tensor; keep what a mutated header may claim small.
    int64_t n_layers = 0, dim = 0;
    mdl_gguf_get_i64(g, "llama.block_count", &n_layers);
    mdl_gguf_get_i64(g, "llama.embedding_length", &dim);
    mdl_model_t *m = NULL;
    if (size < (1u << 20) && n_layers <= 4 && dim <= 256 &&
        mdl_model_create_from_gguf(g, &m, err, sizeof(err)) == FY_OK) {
        const mdl_config_t *c = mdl_model_config(m);
        mdl_ctx_params_t cp;
        mdl_ctx_params_default(&cp);
        cp.n_threads = 1;
        mdl_ctx_t *ctx = NULL;
        float *logits = malloc(sizeof(float) * (size_t)c->n_vocab);
        if (logits != NULL && c->ffn_dim <= 4096 && mdl_ctx_create(m, &cp, &ctx) == FY_OK) {
            int32_t toks[3] = {0, 1 % c->n_vocab, 2 % c->n_vocab};
            mdl_prefill(ctx, toks, 3, NULL, logits);
            mdl_ctx_destroy(ctx);
        }
        free(logits);
        mdl_model_destroy(m);
    }
    mdl_gguf_close(g);
    return 0;
}
