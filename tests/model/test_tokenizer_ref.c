// The SmolLM2 tokenizer against the reference: ids of every fixture string equal the
// transformers tokenizer's; decoding gives the text back; the streaming detokenizer never
// emits half a character; the ChatML template renders as the model's Jinja template does.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "test_util.h"

static mdl_gguf_t *g_gguf;
static mdl_tokenizer_t *g_tok;

static int setup(void **state)
{
    char err[MDL_ERR_LEN] = "";
    if (mdl_gguf_open(tu_path(TU_MODEL_REL), &g_gguf, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "cannot open the model: %s; run scripts/setup.sh\n", err);
        return -1;
    }
    return mdl_tokenizer_create(g_gguf, &g_tok, err, sizeof(err)) == FY_OK ? 0 : -1;
}

static int teardown(void **state)
{
    mdl_tokenizer_destroy(g_tok);
    mdl_gguf_close(g_gguf);
    return 0;
}

static void test_metadata(void **state)
{
    assert_int_equal(mdl_tokenizer_kind(g_tok), MDL_TOK_BPE);
    assert_int_equal(mdl_tokenizer_pre(g_tok), MDL_PRE_SMOLLM);
    assert_int_equal(mdl_tokenizer_n_vocab(g_tok), 49152);
    assert_int_equal(mdl_tokenizer_bos(g_tok), 1);
    assert_int_equal(mdl_tokenizer_eos(g_tok), 2);
    assert_false(mdl_tokenizer_add_bos(g_tok));
    assert_int_equal(mdl_tokenizer_find(g_tok, "<|im_end|>"), 2);
    assert_true(mdl_tokenizer_is_special(g_tok, 2));
    assert_false(mdl_tokenizer_is_special(g_tok, 905));
}

static void test_ids_equal_reference(void **state)
{
    cJSON *fx = tu_fixture("tokens");
    assert_non_null(fx);
    const cJSON *it;
    int n_items = 0;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(fx, "items"))
    {
        const char *text = cJSON_GetObjectItem(it, "text")->valuestring;
        int n_want;
        int32_t *want = tu_ids(cJSON_GetObjectItem(it, "ids"), &n_want);
        size_t n = 0;
        // Ask for the size first, then encode.
        fy_status_t st = mdl_tokenizer_encode(g_tok, text, strlen(text), true, NULL, 0, &n);
        assert_true(st == FY_OK || st == FY_ERR_RESOURCE_EXHAUSTED);
        assert_int_equal(n, n_want);
        int32_t *ids = malloc(sizeof(int32_t) * (n + 1));
        assert_int_equal(mdl_tokenizer_encode(g_tok, text, strlen(text), true, ids, n + 1, &n),
                         FY_OK);
        for (int i = 0; i < n_want; i++) {
            if (ids[i] != want[i])
                fail_msg("'%s': id %d is %d, reference %d", text, i, ids[i], want[i]);
        }
        // Decoding all tokens (specials included) gives the text back byte for byte.
        char *back = calloc(1, strlen(text) * 4 + 16);
        size_t w = 0;
        for (size_t i = 0; i < n; i++)
            w += (size_t)mdl_tokenizer_token_bytes(g_tok, ids[i], back + w, 64);
        assert_int_equal(w, strlen(text));
        assert_memory_equal(back, text, w);
        free(back);
        free(ids);
        free(want);
        n_items++;
    }
    assert_true(n_items >= 10);
    cJSON_Delete(fx);
}

// A character split over byte tokens comes out only when complete, and never as mojibake.
static void test_streaming_utf8(void **state)
{
    const char *text = "emoji: 🙂🚀 and 👩‍💻 日本語";
    size_t n;
    int32_t ids[128];
    assert_int_equal(mdl_tokenizer_encode(g_tok, text, strlen(text), false, ids, 128, &n), FY_OK);
    mdl_detok_t d;
    mdl_detok_init(&d, g_tok, true);
    char out[512] = "", piece[256];
    bool split_seen = false;
    for (size_t i = 0; i < n; i++) {
        int w = mdl_detok_push(&d, ids[i], piece, sizeof(piece));
        assert_true(w >= 0);
        if (w == 0)
            split_seen = true; // a token that ended inside a character
        // Every piece handed out is valid UTF-8 on its own: no dangling lead bytes.
        for (int k = 0; k < w;) {
            unsigned char c = (unsigned char)piece[k];
            int len = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
            assert_true(k + len <= w);
            k += len;
        }
        strcat(out, piece);
    }
    assert_int_equal(mdl_detok_flush(&d, piece, sizeof(piece)), 0);
    assert_string_equal(out, text);
    assert_true(split_seen);
    // A dangling lead byte is flushed as U+FFFD; invalid ids are refused.
    mdl_detok_init(&d, g_tok, true);
    int32_t e_lead = -1;
    char probe[8];
    for (int32_t id = 0; id < mdl_tokenizer_n_vocab(g_tok) && e_lead < 0; id++) {
        if (mdl_tokenizer_token_bytes(g_tok, id, probe, sizeof(probe)) == 1 &&
            (unsigned char)probe[0] == 0xf0)
            e_lead = id;
    }
    assert_true(e_lead >= 0);
    assert_int_equal(mdl_detok_push(&d, e_lead, piece, sizeof(piece)), 0);
    assert_int_equal(mdl_detok_flush(&d, piece, sizeof(piece)), 3);
    assert_string_equal(piece, "\xef\xbf\xbd");
    assert_int_equal(mdl_detok_push(&d, 1 << 30, piece, sizeof(piece)), -1);
    // Control tokens are not printed when skipped.
    assert_int_equal(mdl_detok_push(&d, 2, piece, sizeof(piece)), 0);
}

// Bytes SmolLM2's vocabulary has no token for (0x04, 0xC0, 0xFF among others) become U+FFFD,
// never the unknown token, which is <|endoftext|>: a control byte or a stray 0xFF in a prompt
// must not end the text the model sees.
static void test_untokenizable_bytes(void **state)
{
    (void)state;
    const int32_t eot = mdl_tokenizer_find(g_tok, "<|endoftext|>");
    assert_true(eot >= 0);
    int32_t repl[4];
    size_t n_repl = 0;
    assert_int_equal(mdl_tokenizer_encode(g_tok, "\xef\xbf\xbd", 3, false, repl, 4, &n_repl),
                     FY_OK);
    const char text[] = "a\x04" "b\xff c\xc0";
    int32_t ids[32];
    size_t n = 0;
    for (int special = 0; special < 2; special++) {
        assert_int_equal(
            mdl_tokenizer_encode(g_tok, text, sizeof(text) - 1, special != 0, ids, 32, &n), FY_OK);
        char spelled[64] = "";
        size_t len = 0;
        for (size_t i = 0; i < n; i++) {
            assert_int_not_equal(ids[i], eot);
            int b = mdl_tokenizer_token_bytes(g_tok, ids[i], spelled + len, sizeof(spelled) - len);
            assert_true(b > 0 && len + (size_t)b < sizeof(spelled));
            len += (size_t)b;
        }
        const char want[] = "a\xef\xbf\xbd"
                            "b\xef\xbf\xbd c\xef\xbf\xbd";
        assert_int_equal(len, sizeof(want) - 1);
        assert_memory_equal(spelled, want, len);
    }
    // A NUL in the text is a token of its own, printed as U+FFFD: it would end the C strings
    // the router streams.
    size_t n_nul = 0;
    assert_int_equal(mdl_tokenizer_encode(g_tok, "a\0b", 3, false, ids, 32, &n_nul), FY_OK);
    mdl_detok_t d;
    mdl_detok_init(&d, g_tok, false);
    char out[64] = "", piece[64];
    for (size_t i = 0; i < n_nul; i++) {
        assert_true(mdl_detok_push(&d, ids[i], piece, sizeof(piece)) >= 0);
        strcat(out, piece);
    }
    assert_string_equal(out, "a\xef\xbf\xbd"
                             "b");
    // A character that does not fit the caller's buffer is dropped whole, never cut.
    mdl_detok_init(&d, g_tok, false);
    assert_int_equal(mdl_detok_push(&d, ids[1], piece, 3), 0);
    assert_string_equal(piece, "");
    assert_int_equal(mdl_detok_push(&d, ids[1], piece, 4), 3);
    assert_string_equal(piece, "\xef\xbf\xbd");
    // Text the vocabulary covers is untouched: the same ids as before the replacement.
    size_t n_plain = 0;
    assert_int_equal(mdl_tokenizer_encode(g_tok, "a\xef\xbf\xbd", 4, false, ids, 32, &n_plain),
                     FY_OK);
    assert_int_equal(n_plain, 1 + n_repl);
    assert_int_equal(ids[1], repl[0]);
}

static void test_chat_template(void **state)
{
    mdl_chat_msg_t msgs[] = {{"user", "Hi there"}};
    char *s = NULL;
    assert_int_equal(mdl_chat_render(g_tok, msgs, 1, true, &s), FY_OK);
    // What the model's Jinja template renders (transformers apply_chat_template).
    assert_string_equal(s, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                           "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi "
                           "there<|im_end|>\n<|im_start|>assistant\n");
    free(s);
    mdl_chat_msg_t two[] = {{"system", "Be brief."}, {"user", "Hi"}};
    assert_int_equal(mdl_chat_render(g_tok, two, 2, false, &s), FY_OK);
    assert_string_equal(s, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                           "<|im_end|>\n");
    free(s);
    // Special tokens in the rendered text become their ids only when asked.
    size_t n;
    int32_t ids[64];
    const char *t = "<|im_start|>user";
    assert_int_equal(mdl_tokenizer_encode(g_tok, t, strlen(t), true, ids, 64, &n), FY_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 1);
    assert_int_equal(mdl_tokenizer_encode(g_tok, t, strlen(t), false, ids, 64, &n), FY_OK);
    assert_true(n > 2);
    assert_int_not_equal(ids[0], 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metadata),       cmocka_unit_test(test_ids_equal_reference),
        cmocka_unit_test(test_streaming_utf8), cmocka_unit_test(test_untokenizable_bytes),
        cmocka_unit_test(test_chat_template),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
