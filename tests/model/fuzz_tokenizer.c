// Fuzz target: any byte string as prompt text for the real model's tokenizer (SmolLM2's
// byte-level BPE), which is what clients send to Complete and Tokenize. Encoding succeeds for
// any bytes, with special tokens parsed or not, and the tokens' bytes put back together are
// the text byte for byte (bytes the vocabulary has no token for as U+FFFD); the streaming
// detokenizer gives valid UTF-8 text back unchanged (NUL as U+FFFD), and any id sequence as
// valid UTF-8 without NUL; the chat template renders the text as a user message. Never a
// crash, a leak or a wrong answer. The model must be there (scripts/setup.sh fetches it):
// without it the target aborts.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "test_util.h"

// A property failed: say which, then abort (the fuzzer keeps the input).
#define FAIL(...) (fprintf(stderr, "fuzz_tokenizer: " __VA_ARGS__), fputc('\n', stderr), abort())

static mdl_gguf_t *g_gguf;
static mdl_tokenizer_t *g_tok;
static bool g_has_byte[256]; // the vocabulary has a token for the byte (else: U+FFFD)

static void load_tokenizer(void)
{
    char err[MDL_ERR_LEN] = "";
    const char *path = tu_model_path();
    if (mdl_gguf_open(path, &g_gguf, err, sizeof(err)) != FY_OK ||
        mdl_tokenizer_create(g_gguf, &g_tok, err, sizeof(err)) != FY_OK) {
        fprintf(stderr,
                "fuzz_tokenizer: cannot load the tokenizer of %s: %s (scripts/setup.sh "
                "fetches the model)\n",
                path, err);
        abort();
    }
    for (int b = 0; b < 256; b++) {
        char c = (char)b, out[8];
        int32_t id = -1;
        size_t n = 0;
        g_has_byte[b] = mdl_tokenizer_encode(g_tok, &c, 1, false, &id, 1, &n) == FY_OK && n == 1 &&
                        mdl_tokenizer_token_bytes(g_tok, id, out, sizeof(out)) == 1 &&
                        (unsigned char)out[0] == b;
    }
}

// What the tokens must spell: the text with each byte the vocabulary has no token for
// replaced by U+FFFD (mdl_tokenizer_encode); with `printed`, what the detokenizer prints, NUL
// bytes replaced too. The caller frees.
static uint8_t *expected_text(const uint8_t *text, size_t len, bool printed, size_t *n_p)
{
    uint8_t *out = malloc(3 * len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (g_has_byte[text[i]] && !(printed && text[i] == 0)) {
            out[n++] = text[i];
        } else {
            memcpy(out + n, "\xef\xbf\xbd", 3);
            n += 3;
        }
    }
    *n_p = n;
    return out;
}

// Encodes text, growing the id buffer once when the first guess is short. The caller frees.
static int32_t *encode(const uint8_t *text, size_t len, bool special, size_t *n_p)
{
    size_t cap = len / 4 + 4, n = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    fy_status_t st = mdl_tokenizer_encode(g_tok, (const char *)text, len, special, ids, cap, &n);
    if (st == FY_ERR_RESOURCE_EXHAUSTED) {
        if (n <= cap)
            FAIL("encode asked for more room with %zu ids of room and %zu needed", cap, n);
        cap = n;
        ids = realloc(ids, cap * sizeof(int32_t));
        st = mdl_tokenizer_encode(g_tok, (const char *)text, len, special, ids, cap, &n);
    }
    if (st != FY_OK || n > cap || (len > 0 && n == 0))
        FAIL("encode: %s, %zu ids for %zu bytes (room for %zu)", fy_status_str(st), n, len, cap);
    *n_p = n;
    return ids;
}

// The tokens' bytes, concatenated, must be the text.
static void check_bytes(const int32_t *ids, size_t n, const uint8_t *text, size_t len)
{
    size_t off = 0;
    char buf[4096];
    for (size_t i = 0; i < n; i++) {
        int b = mdl_tokenizer_token_bytes(g_tok, ids[i], buf, sizeof(buf));
        if (b <= 0 || (size_t)b > sizeof(buf) || off + (size_t)b > len ||
            memcmp(buf, text + off, (size_t)b) != 0)
            FAIL("token %zu (id %d, %d bytes) is not the text at byte %zu", i, ids[i], b, off);
        off += (size_t)b;
    }
    if (off != len)
        FAIL("the tokens hold %zu bytes of a %zu-byte text", off, len);
}

static bool valid_utf8(const uint8_t *s, size_t len)
{
    for (size_t i = 0; i < len;) {
        const uint8_t c = s[i];
        const size_t k = c < 0x80             ? 0
                         : (c & 0xe0) == 0xc0 ? 1
                         : (c & 0xf0) == 0xe0 ? 2
                         : (c & 0xf8) == 0xf0 ? 3
                                              : 4;
        if (k == 4 || k >= len - i)
            return false; // not a lead byte, or the text ends inside the character
        uint32_t cp = k == 0 ? c : c & (0x3fu >> k);
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + j] & 0x3fu);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false; // overlong, out of range or a surrogate
        i += k + 1;
    }
    return true;
}

// The input read as token ids (what a model may generate: any sequence, in or out of the
// vocabulary): the streaming detokenizer, skipping control tokens or not, hands out only valid
// UTF-8 and refuses ids outside the vocabulary.
static void detok_ids(const uint8_t *data, size_t size)
{
    const int32_t n_vocab = mdl_tokenizer_n_vocab(g_tok);
    for (int skip = 0; skip < 2; skip++) {
        mdl_detok_t d;
        mdl_detok_init(&d, g_tok, skip != 0);
        char piece[4096];
        for (size_t i = 0; i + 2 <= size; i += 2) {
            // 16 bits of id, a few of them past the end of the vocabulary.
            const int32_t id = (int32_t)((uint32_t)data[i] | (uint32_t)data[i + 1] << 8) - 1024;
            const int w = mdl_detok_push(&d, id, piece, sizeof(piece));
            if ((id < 0 || id >= n_vocab) != (w < 0))
                FAIL("detokenizer: id %d of a %d-token vocabulary gave %d", id, n_vocab, w);
            if (w > 0 && (!valid_utf8((const uint8_t *)piece, (size_t)w) ||
                          memchr(piece, '\0', (size_t)w) != NULL))
                FAIL("detokenizer: invalid UTF-8 or a NUL for id %d", id);
        }
        const int w = mdl_detok_flush(&d, piece, sizeof(piece));
        if (w < 0 || (w > 0 && !valid_utf8((const uint8_t *)piece, (size_t)w)))
            FAIL("detokenizer: the flush gave %d bytes of invalid UTF-8", w);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (g_tok == NULL)
        load_tokenizer();
    if (size > 4096)
        return 0; // long prompts only repeat what short ones cover, slower
    detok_ids(data, size);
    size_t elen = 0, plen = 0;
    uint8_t *expect = expected_text(data, size, false, &elen);
    uint8_t *printed = expected_text(data, size, true, &plen);
    for (int special = 0; special < 2; special++) {
        size_t n = 0;
        int32_t *ids = encode(data, size, special != 0, &n);
        check_bytes(ids, n, expect, elen);
        if (special == 1 && valid_utf8(expect, elen)) {
            // Streamed back without skipping control tokens: the same text.
            mdl_detok_t d;
            mdl_detok_init(&d, g_tok, false);
            char *out = malloc(plen + 1);
            size_t len = 0;
            char piece[4096];
            for (size_t i = 0; i < n; i++) {
                int w = mdl_detok_push(&d, ids[i], piece, sizeof(piece));
                if (w < 0 || len + (size_t)w > plen)
                    FAIL("detokenizer: %d bytes for token %zu after %zu of %zu", w, i, len, plen);
                memcpy(out + len, piece, (size_t)w);
                len += (size_t)w;
            }
            int w = mdl_detok_flush(&d, piece, sizeof(piece));
            if (w != 0 || len != plen || memcmp(out, printed, plen) != 0)
                FAIL("detokenizer: %zu bytes (+%d flushed) differ from the %zu-byte text", len, w,
                     plen);
            free(out);
        }
        free(ids);
    }
    free(expect);
    free(printed);
    // The text as a user message (up to its first NUL).
    char *content = malloc(size + 1);
    if (size > 0) // data may be NULL when size is 0
        memcpy(content, data, size);
    content[size] = '\0';
    mdl_chat_msg_t m = {"user", content};
    char *rendered = NULL;
    if (mdl_chat_render(g_tok, &m, 1, true, &rendered) != FY_OK ||
        strstr(rendered, content) == NULL)
        FAIL("chat template: the message is not in the rendered text");
    free(rendered);
    free(content);
    return 0;
}
