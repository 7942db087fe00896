/*
 * quality.h: the quality harness behind `ferry-bench quality` and `ferry calibrate`: how much a
 * codec configuration (a policy at a budget) changes what the model predicts, measured on the
 * real model by teacher forcing and by needle-in-a-haystack retrieval.
 *
 * A qual_batch_t holds one decode batch of rows. Row 0 is the reference: the context's KV
 * coded with policy `fp16` (raw FP16 pages, i.e. the FP16 cache); row r >= 1 is configuration
 * r - 1. The context is prefilled once; after each layer its K and V are coded once per row
 * (every row has its own kvc_encoder_t, so each rate controller sees the layers in order); the
 * frames are placed into one kvc sequence per row; then every step decodes one token for all
 * rows together, attending over the compressed pages. Rows are computed independently, so a
 * row whose configuration is `fp16` reproduces row 0 bit for bit.
 *
 * QUAL_DECODE_DEQUANT is a stand-in kept for comparison: each frame is dequantized
 * (kvc_frame_dequantize) into the model's own FP16 paged cache and decoded with mdl_decode.
 * Dropped tokens then become zero vectors that still take part in the softmax, so it
 * overstates what eviction costs; it exists to cross-check the quantizers, not to report.
 *
 * Metrics per row against row 0 over the scored steps: perplexity of the true next tokens
 * (dPPL % = PPL_row / PPL_ref - 1), top-1 agreement of the next-token argmax, mean
 * KL(ref || row) of the next-token distributions (nats), and the wire ratio (all frame bytes /
 * FP16 K+V bytes of the context).
 *
 * Nothing here is thread-safe: one batch per mdl_ctx_t, used by one thread.
 */
#ifndef FERRY_BENCH_QUALITY_H
#define FERRY_BENCH_QUALITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvcodec.h"
#include "model.h"

/* ------------------------------------------------------------------------------------------ */
/* Configurations                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* One row of the batch: a policy at a budget, on every layer or on one layer only (the other
 * layers then stay FP16: that is how layer sensitivity is measured). */
typedef struct {
    char label[48];      // "ferry@0.25", "int4", "L7:2/2"
    kvc_policy_t policy;
    double budget;       // b; < 0: the policy's own (policies without a budget ignore it)
    int only_layer;      // -1: all layers; else the one layer coded with policy
    bool sinks_only;     // budget set per context to exactly the pinned sinks' frames
} qual_config_t;

/* Fills a configuration from a built-in policy name (kvcodec's, plus "sinks": 16/16 and drop,
 * the first 4 tokens kept, everything else dropped, the budget fitted to each context) and a
 * budget (< 0: the policy's default). Policies without a budget get budget -1 and a label
 * without "@b".
 * FY_ERR_NOT_FOUND for an unknown name. */
fy_status_t qual_config_builtin(const char *name, double budget, qual_config_t *cfg_p);

/* A configuration of any policy (a policy file's, say) at a budget (< 0: the policy's own),
 * labelled "name@b", or "name" when the policy has no budget. Thread: any. */
void qual_config_from_policy(const kvc_policy_t *policy, double budget, qual_config_t *cfg_p);

/* Whether a policy takes a budget (snapkv, pdtrim, ferry, ...) or codes every token the same
 * way whatever the budget (fp16, int8, int4, kivi2). */
bool qual_policy_has_budget(const kvc_policy_t *policy);

/* ------------------------------------------------------------------------------------------ */
/* The decode batch                                                                            */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    QUAL_DECODE_KVC = 0,     // attention over the compressed pages (the real decode path)
    QUAL_DECODE_DEQUANT = 1, // dequantized into an FP16 cache (stand-in, see above)
} qual_decode_t;

/* Parses "kvc" / "dequant". */
fy_status_t qual_decode_parse(const char *s, qual_decode_t *mode_p);
const char *qual_decode_name(qual_decode_t mode);

/* What coding the context did to one row. */
typedef struct {
    uint64_t wire_bytes;                // all frame bytes, headers included
    uint64_t fp16_bytes;                // FP16 K+V bytes of the context
    uint64_t tokens[KVC_OPT_COUNT];     // (layer, head, token) items per option
    bool budget_met;                    // every layer met its allowance
    double lambda_first;                // lambda of layer 0 (where the rate controller starts)
    double lambda_mean;                 // mean lambda over the layers coded with the policy
} qual_code_info_t;

typedef struct qual_batch qual_batch_t;

/* A batch of 1 + n_cfg rows over ctx (borrowed; its max_batch must be >= 1 + n_cfg). cfgs are
 * copied. Thread: any. */
fy_status_t qual_batch_create(mdl_ctx_t *ctx, const mdl_model_t *model, qual_decode_t mode,
                              const qual_config_t *cfgs, int n_cfg, qual_batch_t **batch_p);
/* Accepts NULL. */
void qual_batch_destroy(qual_batch_t *b);

int qual_batch_n_rows(const qual_batch_t *b);
const mdl_model_t *qual_batch_model(const qual_batch_t *b);

/* Starts a new context: drops the previous one, prefills tokens[n] once, codes and places its
 * KV for every row, with room for max_new decoded tokens. logits (optional) receives the
 * prefill's next-token logits [n_vocab] (the same for every row: the prefill side samples the
 * first token from the full cache). Thread: not thread-safe. */
fy_status_t qual_batch_start(qual_batch_t *b, const int32_t *tokens, int n, int max_new,
                             float *logits);

/* One decode step: row r consumes tokens[r]; logits [n_rows][n_vocab]. Thread: not
 * thread-safe. */
fy_status_t qual_batch_step(qual_batch_t *b, const int32_t *tokens, float *logits);

/* Coding facts of row r for the current context (valid after qual_batch_start). */
const qual_code_info_t *qual_batch_code_info(const qual_batch_t *b, int row);

/* ------------------------------------------------------------------------------------------ */
/* Teacher-forced metrics                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Running sums for one row. */
typedef struct {
    double nll_sum;       // sum of -log p(true next token)
    double kl_sum;        // sum of KL(ref || row), nats
    uint64_t n_pred;      // scored predictions
    uint64_t top1_agree;  // argmax equal to the reference row's argmax
    uint64_t wire_bytes, fp16_bytes;
    uint64_t tokens[KVC_OPT_COUNT];
    uint64_t n_contexts, n_budget_met;
    double lambda_first_sum, lambda_mean_sum;
} qual_acc_t;

/* Scores one step: logits [n_rows][n_vocab], the true next token; row 0 is the reference.
 * Thread: any. */
void qual_acc_add_step(qual_acc_t *acc, int n_rows, const float *logits, int n_vocab,
                       int32_t target);

/* Adds the coding facts of the current context of every row. */
void qual_acc_add_code(qual_acc_t *acc, const qual_batch_t *b);

/* Derived figures of row r against row 0. */
typedef struct {
    double ppl, ppl_ref;
    double dppl_pct;   // 100 * (ppl / ppl_ref - 1)
    double top1_pct;   // 100 * agreement
    double kl_mean;    // nats per prediction
    double wire_ratio; // wire bytes / FP16 bytes
} qual_metrics_t;

void qual_acc_metrics(const qual_acc_t *acc, int row, qual_metrics_t *m_p);

/* Progress callback: done of total units. */
typedef void (*qual_progress_cb)(void *arg, uint64_t done, uint64_t total);

/* Teacher forcing over one text: prefills tokens[0, n_ctx), then feeds tokens[n_ctx + i] for
 * i < n_cont - 1 to every row, scoring the prediction of tokens[n_ctx + i + 1]
 * (n_cont - 1 predictions, all made over the coded context). Needs n_ctx + n_cont tokens.
 * progress (optional) is called after each step with (step, n_cont - 1). Thread: not
 * thread-safe. */
fy_status_t qual_eval_text(qual_batch_t *b, const int32_t *tokens, int n_ctx, int n_cont,
                           qual_acc_t *acc, qual_progress_cb progress, void *arg);

/* ------------------------------------------------------------------------------------------ */
/* Needle in a haystack                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* A needle prompt: the haystack (filler tokens) with the needle sentence after the first
 * sentence end at or past depth x haystack, wrapped in the model's chat template with the
 * question after it (a plain "Question:/Answer:" frame when the model has none). */
typedef struct {
    int32_t *ids;     // [n] (malloc'd; qual_niah_prompt_free)
    int n;
    int needle_pos;   // index in ids of the needle's first token
    char value[16];   // the planted answer (decimal digits)
} qual_niah_prompt_t;

/* filler: tokens of the haystack text (>= haystack tokens), borrowed. value: the planted
 * digits. Thread: any. */
fy_status_t qual_niah_build(const mdl_tokenizer_t *tok, const int32_t *filler, size_t n_filler,
                            int haystack, double depth, const char *value,
                            qual_niah_prompt_t *p);
void qual_niah_prompt_free(qual_niah_prompt_t *p);

/* Exact-match scoring: the first run of digits in answer equals expected. Thread: any. */
bool qual_niah_match(const char *answer, const char *expected);

/* Greedy answers of every row to one prompt (at most max_new tokens, until EOS or <|im_end|>),
 * detokenized into answers[r] (cap bytes each). Thread: not thread-safe. */
fy_status_t qual_niah_answer(qual_batch_t *b, const qual_niah_prompt_t *p, int max_new,
                             char *answers, size_t cap);

/* A planted value for trial i (deterministic, 7 digits, no leading zero). */
void qual_niah_value(uint64_t seed, int i, char *out, size_t cap);

/* ------------------------------------------------------------------------------------------ */
/* Corpus                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Documents, each tokenized. */
typedef struct {
    int n_docs;
    char **names;     // [n_docs] file paths
    int32_t **ids;    // [n_docs][n_ids[d]]
    size_t *n_ids;
} qual_corpus_t;

/* Reads and tokenizes UTF-8 files (a directory path reads its *.txt files, sorted). Files with
 * a NUL byte are rejected (FY_ERR_FORMAT). Thread: any. */
fy_status_t qual_corpus_load(const mdl_tokenizer_t *tok, const char *const *paths, int n_paths,
                             qual_corpus_t *c, char *err, size_t err_len);
void qual_corpus_free(qual_corpus_t *c);

/* Sample s of n_samples: a run of len tokens taken from one document, samples spread over the
 * documents that are long enough, never overlapping within one. Writes a pointer into the
 * corpus. FY_ERR_NOT_FOUND when no document has len tokens, FY_ERR_OUT_OF_RANGE when the
 * corpus cannot give n_samples distinct runs. Thread: any. */
fy_status_t qual_corpus_sample(const qual_corpus_t *c, int len, int n_samples, int s,
                               const int32_t **ids_p, int *doc_p);

/* All documents back to back (the haystack filler of NIAH prompts); malloc'd. Thread: any. */
fy_status_t qual_corpus_concat(const qual_corpus_t *c, int32_t **ids_p, size_t *n_p);

/* Loads the model and tokenizes the corpus with its tokenizer: what every harness program does
 * first. err names what failed. Thread: any. */
fy_status_t qual_load(const char *model_path, const char *const *corpus, int n_corpus,
                      mdl_model_t **model_p, qual_corpus_t *c, char *err, size_t err_len);

#endif /* FERRY_BENCH_QUALITY_H */
