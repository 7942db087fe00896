// Writes the seed corpus of fuzz_gguf into the directory given (made if missing): a one-layer
// tiny model (Q8_0 random weights) and a metadata-only file with every value type. The build
// runs it (tests/model/meson.build) so that no model file is kept in the repository; the
// quality and CLI tests use the tiny model too.
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "gguf_writer.h"
#include "model.h"

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: make_fuzz_seeds DIR\n");
        return 2;
    }
    if (mkdir(argv[1], 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "make_fuzz_seeds: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    char path[4096];
    mdlt_tiny_params_t p;
    mdlt_tiny_params_default(&p);
    p.n_layers = 1;
    p.dim = 32;
    p.n_heads = 2;
    p.n_kv_heads = 1;
    p.ffn_dim = 32;
    p.weight_type = MDL_TENSOR_Q8_0;
    snprintf(path, sizeof(path), "%s/tiny-llama-q8.gguf", argv[1]);
    if (mdlt_tiny_model_write(&p, path) != 0)
        return 1;
    mdlt_gguf_t *w = mdlt_gguf_new();
    mdlt_gguf_u32(w, "general.alignment", 64);
    mdlt_gguf_str(w, "general.architecture", "llama");
    mdlt_gguf_i32(w, "x.i32", -3);
    mdlt_gguf_f32(w, "x.f32", 0.25f);
    mdlt_gguf_bool(w, "x.bool", true);
    const char *s[] = {"<|endoftext|>", "a", "b", "ab"};
    mdlt_gguf_str(w, "tokenizer.ggml.model", "gpt2");
    mdlt_gguf_arr_str(w, "tokenizer.ggml.tokens", s, 4);
    const char *merges[] = {"a b"};
    mdlt_gguf_arr_str(w, "tokenizer.ggml.merges", merges, 1);
    float v[32];
    for (int i = 0; i < 32; i++)
        v[i] = (float)i - 16.0f;
    uint64_t ne[1] = {32};
    mdlt_gguf_tensor(w, "q4_0", MDL_TENSOR_Q4_0, 1, ne, v);
    mdlt_gguf_tensor(w, "q4_1", MDL_TENSOR_Q4_1, 1, ne, v);
    mdlt_gguf_tensor(w, "f16", MDL_TENSOR_F16, 1, ne, v);
    mdlt_gguf_tensor(w, "bf16", MDL_TENSOR_BF16, 1, ne, v);
    snprintf(path, sizeof(path), "%s/metadata.gguf", argv[1]);
    int rc = mdlt_gguf_write(w, path);
    mdlt_gguf_free(w);
    return rc == 0 ? 0 : 1;
}
