/*
 * cli_inspect.c: `ferry inspect model.gguf` prints a GGUF file's header, metadata and tensor
 * table (name, type, shape, offset, size), then the model configuration Ferry derives from it
 * when the architecture is one it runs. A malformed file gets the reader's error, naming the
 * field. (KV frames join when kvcodec's frame format lands.)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: ferry inspect [--tensors N] FILE.gguf\n"
                 "  --tensors N   print at most N tensors (default all)\n");
}

int cli_inspect_main(int argc, char **argv)
{
    const char *path = NULL;
    long max_tensors = -1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--tensors") == 0 && i + 1 < argc) {
            char *end;
            max_tensors = strtol(argv[++i], &end, 10);
            if (*end != '\0' || max_tensors < 0) {
                fprintf(stderr, "ferry inspect: --tensors needs a count\n");
                return 2;
            }
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "ferry inspect: unknown option %s\n", argv[i]);
            usage(stderr);
            return 2;
        } else {
            path = argv[i];
        }
    }
    if (path == NULL) {
        usage(stderr);
        return 2;
    }
    mdl_gguf_t *g = NULL;
    char err[MDL_ERR_LEN] = "";
    fy_status_t st = mdl_gguf_open(path, &g, err, sizeof(err));
    if (st != FY_OK) {
        fprintf(stderr, "ferry inspect: %s (%s)\n", err[0] ? err : path, fy_status_str(st));
        return 1;
    }
    printf("file: %s\nformat: GGUF v%u, alignment %u, %lld metadata entries, %lld tensors\n\n",
           path, mdl_gguf_version(g), mdl_gguf_alignment(g), (long long)mdl_gguf_n_kv(g),
           (long long)mdl_gguf_n_tensors(g));
    printf("metadata:\n");
    char val[320];
    for (int64_t i = 0; i < mdl_gguf_n_kv(g); i++) {
        mdl_gguf_kv_format(g, i, val, sizeof(val));
        printf("  %-44s %s\n", mdl_gguf_kv_key(g, i), val);
    }
    printf("\ntensors:\n  %-32s %-5s %-24s %12s %12s\n", "name", "type", "shape", "offset",
           "bytes");
    uint64_t total = 0, params = 0;
    for (int64_t i = 0; i < mdl_gguf_n_tensors(g); i++) {
        const mdl_gguf_tensor_t *t = mdl_gguf_tensor(g, i);
        total += t->n_bytes;
        params += t->n_elems;
        if (max_tensors >= 0 && i >= max_tensors)
            continue;
        char shape[64];
        int w = snprintf(shape, sizeof(shape), "[");
        for (int d = 0; d < t->n_dims; d++)
            w += snprintf(shape + w, sizeof(shape) - (size_t)w, "%s%llu", d ? ", " : "",
                          (unsigned long long)t->ne[d]);
        snprintf(shape + w, sizeof(shape) - (size_t)w, "]");
        printf("  %-32s %-5s %-24s %12llu %12llu\n", t->name, mdl_tensor_type_name(t->type),
               shape, (unsigned long long)t->offset, (unsigned long long)t->n_bytes);
    }
    if (max_tensors >= 0 && mdl_gguf_n_tensors(g) > max_tensors)
        printf("  ... %lld more\n", (long long)(mdl_gguf_n_tensors(g) - max_tensors));
    printf("  total: %.1f M parameters, %.1f MiB\n", params / 1e6, total / 1048576.0);

    mdl_model_t *m = NULL;
    st = mdl_model_create_from_gguf(g, &m, err, sizeof(err));
    if (st == FY_OK) {
        const mdl_config_t *c = mdl_model_config(m);
        const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
        static const char *pre_names[] = {"gpt2", "smollm", "llama3", "qwen2"};
        printf("\nmodel: %s, %d layers, dim %d, %d heads (%d kv, head_dim %d), ffn %d, "
               "vocab %d, context %d\n",
               c->arch == MDL_ARCH_QWEN2 ? "qwen2" : "llama", c->n_layers, c->dim, c->n_heads,
               c->n_kv_heads, c->head_dim, c->ffn_dim, c->n_vocab, c->n_ctx_train);
        printf("       rope %s theta %g (%d dims, scale %g), rms eps %g, %s embeddings%s\n",
               c->rope.mode == KRN_ROPE_NEOX ? "neox" : "norm", c->rope.theta, c->rope.n_rot,
               1.0 / c->rope.freq_scale, c->rms_eps, c->tied_embeddings ? "tied" : "separate",
               c->qkv_bias ? ", qkv bias" : "");
        printf("       tokenizer %s (pre %s), bos %d, eos %d%s\n",
               mdl_tokenizer_kind(tok) == MDL_TOK_BPE ? "byte-level BPE" : "SentencePiece BPE",
               pre_names[mdl_tokenizer_pre(tok)], mdl_tokenizer_bos(tok), mdl_tokenizer_eos(tok),
               mdl_tokenizer_add_bos(tok) ? " (added)" : "");
        mdl_model_destroy(m);
    } else {
        printf("\nmodel: not runnable here: %s\n", err[0] ? err : fy_status_str(st));
    }
    mdl_gguf_close(g);
    return 0;
}
