// Tokenizers built from small GGUF vocabularies (no download): byte-level BPE merges in rank
// order with the pre-tokenizer splits; SentencePiece-style BPE merges by score with byte
// fallback; malformed tokenizer metadata is an error.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "test_util.h"

static mdl_tokenizer_t *tok_from(mdlt_gguf_t *w)
{
    uint8_t *buf;
    size_t len;
    mdlt_gguf_to_mem(w, &buf, &len);
    mdl_gguf_t *g;
    mdl_tokenizer_t *t = NULL;
    char err[MDL_ERR_LEN] = "";
    assert_int_equal(mdl_gguf_open_mem(buf, len, &g, NULL, 0), FY_OK);
    if (mdl_tokenizer_create(g, &t, err, sizeof(err)) != FY_OK)
        fprintf(stderr, "tokenizer: %s\n", err);
    mdl_gguf_close(g);
    free(buf);
    return t;
}

static size_t enc(const mdl_tokenizer_t *t, const char *s, int32_t *ids)
{
    size_t n;
    assert_int_equal(mdl_tokenizer_encode(t, s, strlen(s), true, ids, 64, &n), FY_OK);
    return n;
}

static void test_tiny_bpe(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    assert_non_null(m);
    const mdl_tokenizer_t *t = mdl_model_tokenizer(m);
    int32_t ids[64];
    // "Ġthe" is merged (ranks: Ġt, he, Ġt+he); "in" too; the rest are byte tokens.
    size_t n = enc(t, "the then in", ids);
    int32_t gthe = mdl_tokenizer_find(t, "\xc4\xa0the"), he = mdl_tokenizer_find(t, "he");
    int32_t in = mdl_tokenizer_find(t, "in"), gin = mdl_tokenizer_find(t, "\xc4\xa0");
    assert_true(gthe > 258 && he > 258 && in > 258);
    assert_int_equal(n, 6);
    assert_int_equal(ids[0], 3 + 't');
    assert_int_equal(ids[1], he);
    assert_int_equal(ids[2], gthe);
    assert_int_equal(ids[3], 3 + 'n');
    assert_int_equal(ids[4], gin);
    assert_int_equal(ids[5], in);
    // Digits split one by one (smollm); specials are matched; a too-small buffer says so.
    n = enc(t, "a12<|im_end|>", ids);
    assert_int_equal(n, 4);
    assert_int_equal(ids[1], 3 + '1');
    assert_int_equal(ids[2], 3 + '2');
    assert_int_equal(ids[3], 2);
    size_t need;
    assert_int_equal(mdl_tokenizer_encode(t, "abc", 3, false, ids, 2, &need),
                     FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(need, 3);
    // Invalid UTF-8 still encodes (as its bytes) and decodes back.
    const char bad[] = "x\xff\xc3(";
    n = enc(t, bad, ids);
    char back[16];
    size_t w = 0;
    for (size_t i = 0; i < n; i++)
        w += (size_t)mdl_tokenizer_token_bytes(t, ids[i], back + w, sizeof(back) - w);
    assert_int_equal(w, 4);
    assert_memory_equal(back, bad, 4);
    assert_int_equal(mdl_tokenizer_token_bytes(t, -1, back, sizeof(back)), -1);
    // The tiny template has no default system prompt.
    mdl_chat_msg_t msg = {"user", "hi"};
    char *s;
    assert_int_equal(mdl_chat_render(t, &msg, 1, true, &s), FY_OK);
    assert_string_equal(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    free(s);
    mdl_model_destroy(m);
}

/* An SPM ("llama") tokenizer: specials[ns] (the first <unk>, the rest control tokens; BOS 1,
 * EOS 2), the 256 byte tokens, then pieces[np] scored by length (longer pieces win); with a
 * chat template when tmpl is set. */
static mdl_tokenizer_t *spm_tok(const char *const *specials, int ns, const char *const *pieces,
                                int np, const char *tmpl)
{
    const int nv = ns + 256 + np;
    const char **toks = calloc((size_t)nv, sizeof(*toks));
    char(*bytes)[8] = calloc(256, sizeof(*bytes));
    int32_t *types = calloc((size_t)nv, sizeof(*types));
    float *scores = calloc((size_t)nv, sizeof(*scores));
    assert_true(toks && bytes && types && scores);
    for (int i = 0; i < ns; i++) {
        toks[i] = specials[i];
        types[i] = i == 0 ? 2 : 3;
    }
    for (int b = 0; b < 256; b++) {
        snprintf(bytes[b], sizeof(bytes[b]), "<0x%02X>", b);
        toks[ns + b] = bytes[b];
        types[ns + b] = 6;
    }
    for (int i = 0; i < np; i++) {
        toks[ns + 256 + i] = pieces[i];
        types[ns + 256 + i] = 1;
        scores[ns + 256 + i] = (float)strlen(pieces[i]);
    }
    mdlt_gguf_t *w = mdlt_gguf_new();
    mdlt_gguf_str(w, "tokenizer.ggml.model", "llama");
    mdlt_gguf_arr_str(w, "tokenizer.ggml.tokens", toks, (size_t)nv);
    mdlt_gguf_arr_f32(w, "tokenizer.ggml.scores", scores, (size_t)nv);
    mdlt_gguf_arr_i32(w, "tokenizer.ggml.token_type", types, (size_t)nv);
    mdlt_gguf_u32(w, "tokenizer.ggml.bos_token_id", 1);
    mdlt_gguf_u32(w, "tokenizer.ggml.eos_token_id", 2);
    mdlt_gguf_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    if (tmpl != NULL)
        mdlt_gguf_str(w, "tokenizer.chat_template", tmpl);
    mdl_tokenizer_t *t = tok_from(w);
    mdlt_gguf_free(w);
    free(toks);
    free(bytes);
    free(types);
    free(scores);
    assert_non_null(t);
    return t;
}

// SentencePiece-style BPE: the best-scoring merges win, spaces are U+2581 with a leading one,
// and characters outside the vocabulary become byte tokens.
static void test_spm(void **state)
{
    // <unk> <s> </s>, byte tokens, then pieces with scores.
    static const char *const specials[] = {"<unk>", "<s>", "</s>"};
    const char *pieces[] = {"\xe2\x96\x81",
                            "h",
                            "e",
                            "l",
                            "o",
                            "w",
                            "r",
                            "d",
                            "\xe2\x96\x81h",
                            "ll",
                            "\xe2\x96\x81he",
                            "\xe2\x96\x81hell",
                            "\xe2\x96\x81hello",
                            "\xe2\x96\x81w",
                            "or",
                            "\xe2\x96\x81wor",
                            "ld",
                            "\xe2\x96\x81world"};
    mdl_tokenizer_t *t = spm_tok(specials, 3, pieces, sizeof(pieces) / sizeof(pieces[0]), NULL);
    assert_int_equal(mdl_tokenizer_kind(t), MDL_TOK_SPM);
    assert_true(mdl_tokenizer_add_bos(t));
    int32_t ids[64];
    size_t n = enc(t, "hello world", ids);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 259 + 12);
    assert_int_equal(ids[1], 259 + 17);
    // A character outside the vocabulary falls back to its UTF-8 bytes.
    n = enc(t, "h\xc3\xa9", ids); // "hé"
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 259 + 8);
    assert_int_equal(ids[1], 3 + 0xc3);
    assert_int_equal(ids[2], 3 + 0xa9);
    // Detokenizing drops the leading space and reassembles the bytes.
    mdl_detok_t d;
    mdl_detok_init(&d, t, true);
    char out[64] = "", piece[32];
    for (size_t i = 0; i < n; i++) {
        mdl_detok_push(&d, ids[i], piece, sizeof(piece));
        strcat(out, piece);
    }
    assert_string_equal(out, "h\xc3\xa9");
    // No ChatML template: rendering is unsupported.
    mdl_chat_msg_t msg = {"user", "hi"};
    char *s;
    assert_int_equal(mdl_chat_render(t, &msg, 1, true, &s), FY_ERR_UNSUPPORTED);
    mdl_tokenizer_destroy(t);
}

/* An SPM vocabulary (<unk> <s> </s>, the chat families' turn tokens, bytes) with a chat
 * template. */
static mdl_tokenizer_t *chat_tok(const char *tmpl)
{
    static const char *const specials[] = {
        "<unk>",      "<s>",           "</s>",    "<|im_end|>",
        "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|start_header_id|>"};
    return spm_tok(specials, 8, NULL, 0, tmpl);
}

/* Each chat family by its template's markers (abridged templates of the real models): the
 * conversation as that model's own Jinja template renders it (without the BOS the tokenizer
 * adds), and the token that ends the assistant's turn. */
static void test_chat_formats(void **state)
{
    const mdl_chat_msg_t conv[] = {{"system", "Be brief."},
                                   {"user", "Hi"},
                                   {"assistant", "Hello."},
                                   {"user", " What is 2+2? "}};
    static const struct {
        const char *tmpl;
        mdl_chat_kind_t kind;
        const char *want;
        int32_t end; // the turn token's id, -1: EOS ends the turn
    } k_cases[] = {
        {"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}",
         MDL_CHAT_CHATML,
         "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
         "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n What is 2+2? <|im_end|>\n"
         "<|im_start|>assistant\n",
         3},
        {"{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
         "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}",
         MDL_CHAT_LLAMA3,
         "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n",
         4},
        {"{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
         "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + "
         "eos_token }}{% endif %}{% endfor %}",
         MDL_CHAT_MISTRAL, "[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST]  What is 2+2?  [/INST]",
         -1},
        {"{% if messages[0]['role'] == 'system' %}<<SYS>>{% endif %}[INST]", MDL_CHAT_LLAMA2,
         "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] What is 2+2? "
         "[/INST]",
         -1},
        {"{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + role + '\\n' + "
         "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}",
         MDL_CHAT_GEMMA,
         "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello."
         "<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
         "<start_of_turn>model\n",
         5},
        {"{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\\n' + "
         "message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}",
         MDL_CHAT_PHI3,
         "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
         "<|user|>\n What is 2+2? <|end|>\n<|assistant|>\n",
         6},
    };
    for (size_t i = 0; i < sizeof(k_cases) / sizeof(k_cases[0]); i++) {
        mdl_tokenizer_t *t = chat_tok(k_cases[i].tmpl);
        assert_int_equal(mdl_chat_kind(t), k_cases[i].kind);
        char *s = NULL;
        assert_int_equal(mdl_chat_render(t, conv, 4, true, &s), FY_OK);
        if (strcmp(s, k_cases[i].want) != 0)
            fail_msg("%s: rendered\n%s\nwant\n%s", mdl_chat_kind_name(k_cases[i].kind), s,
                     k_cases[i].want);
        free(s);
        assert_int_equal(mdl_chat_end_token(t), k_cases[i].end);
        mdl_tokenizer_destroy(t);
    }
    // No template, or one of another family: unsupported, no turn token.
    static const char *const k_none[] = {NULL, "{{ messages | tojson }}"};
    for (size_t i = 0; i < 2; i++) {
        mdl_tokenizer_t *t = chat_tok(k_none[i]);
        char *s = NULL;
        assert_int_equal(mdl_chat_kind(t), MDL_CHAT_NONE);
        assert_int_equal(mdl_chat_render(t, conv, 4, true, &s), FY_ERR_UNSUPPORTED);
        assert_int_equal(mdl_chat_end_token(t), -1);
        mdl_tokenizer_destroy(t);
    }
}

static void test_bad_metadata(void **state)
{
    mdlt_gguf_t *w = mdlt_gguf_new();
    mdlt_gguf_str(w, "tokenizer.ggml.model", "bert");
    assert_null(tok_from(w));
    mdlt_gguf_free(w);
    w = mdlt_gguf_new();
    const char *toks[] = {"a", "b"};
    mdlt_gguf_str(w, "tokenizer.ggml.model", "gpt2");
    mdlt_gguf_arr_str(w, "tokenizer.ggml.tokens", toks, 2);
    assert_null(tok_from(w)); // no merges
    const char *merges[] = {"a b"};
    mdlt_gguf_arr_str(w, "tokenizer.ggml.merges", merges, 1);
    mdlt_gguf_u32(w, "tokenizer.ggml.eos_token_id", 5); // outside the vocabulary
    assert_null(tok_from(w));
    mdlt_gguf_free(w);
    w = mdlt_gguf_new();
    int32_t types[1] = {1};
    mdlt_gguf_str(w, "tokenizer.ggml.model", "llama");
    mdlt_gguf_arr_str(w, "tokenizer.ggml.tokens", toks, 2);
    mdlt_gguf_arr_i32(w, "tokenizer.ggml.token_type", types, 1); // length mismatch
    assert_null(tok_from(w));
    mdlt_gguf_free(w);
}

// The UTF-8 check and the U+FFFD replacement the router applies to request text and
// Tokenize pieces.
static void test_utf8(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        size_t len;
        bool valid;
        const char *sanitized;
    } cases[] = {
        {"", 0, true, ""},
        {"plain ascii", 11, true, "plain ascii"},
        {"caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x99\x82", 14, true,
         "caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x99\x82"},
        {"a\0b", 3, true, "a\0b"},                                          // NUL is a character
        {"\xc3", 1, false, "\xef\xbf\xbd"},                                 // cut short
        {"\xa9x", 2, false, "\xef\xbf\xbdx"},                               // stray continuation
        {"\xc0\xaf", 2, false, "\xef\xbf\xbd\xef\xbf\xbd"},                 // overlong '/'
        {"\xed\xa0\x80", 3, false, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, // surrogate
        {"\xf4\x90\x80\x80", 4, false,
         "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, // past U+10FFFF
        {"\xe2\x82"
         "a",
         3, false,
         "\xef\xbf\xbd\xef\xbf\xbd"
         "a"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(mdl_utf8_valid(cases[i].s, cases[i].len), cases[i].valid);
        char out[64];
        const size_t want = cases[i].valid ? cases[i].len : strlen(cases[i].sanitized);
        assert_int_equal(mdl_utf8_sanitize(cases[i].s, cases[i].len, out), want);
        assert_memory_equal(out, cases[i].sanitized, want);
        assert_int_equal(out[want], '\0');
        assert_true(mdl_utf8_valid(out, want));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_bpe),     cmocka_unit_test(test_spm),
        cmocka_unit_test(test_chat_formats), cmocka_unit_test(test_bad_metadata),
        cmocka_unit_test(test_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
