/*
 * tokenizer.c: tokenizers built from GGUF metadata (tokenizer.ggml.*).
 *
 * - Byte-level BPE ("gpt2"): text is split at special tokens, then by the pre-tokenizer regex
 *   of the model family (hand-written matchers over code points, see pre_*), each piece's bytes
 *   are mapped to the GPT-2 byte alphabet and merged pair by pair in merge-rank order.
 * - SentencePiece-style BPE ("llama"): spaces become U+2581 (with a leading one when
 *   add_space_prefix), characters are merged greedily by the best vocabulary score, and pieces
 *   outside the vocabulary fall back to <0xXX> byte tokens.
 * Decoding turns tokens back into bytes; the streaming detokenizer holds back an incomplete
 * UTF-8 character until its last byte arrives.
 */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_int.h"

enum { TOK_TYPE_NORMAL = 1, TOK_TYPE_UNKNOWN = 2, TOK_TYPE_CONTROL = 3, TOK_TYPE_USER = 4,
       TOK_TYPE_UNUSED = 5, TOK_TYPE_BYTE = 6 };

typedef struct {
    uint64_t key;
    int32_t rank; /* merge rank */
    int32_t id;   /* merged token */
} merge_slot_t;

struct mdl_tokenizer {
    mdl_tok_kind_t kind;
    mdl_pre_kind_t pre;
    int32_t n_vocab;
    char *text;       /* all token strings, NUL-separated */
    uint32_t *off;    /* [n_vocab] offset of each token's string in text */
    uint32_t *len;    /* [n_vocab] */
    int32_t *type;    /* [n_vocab] */
    float *score;     /* [n_vocab] (SPM) */
    int32_t *hash;    /* [hash_cap] token ids, -1 empty: string -> id */
    uint32_t hash_cap;
    merge_slot_t *merges; /* [merge_cap] open addressing, key 0 = empty */
    uint32_t merge_cap;
    int32_t *specials; /* [n_specials] control/user tokens, longest first */
    int n_specials;
    int32_t bos, eos, unk;
    bool add_bos;
    bool add_space_prefix;
    int32_t byte_ids[256];  /* token of each byte (BPE: its GPT-2 char; SPM: <0xXX>) */
    uint32_t byte_to_cp[256];
    int16_t cp_to_byte[512]; /* GPT-2 alphabet back to bytes (code points < 512), -1 none */
    char *chat_template;     /* NUL-terminated copy or NULL */
};

static fy_status_t errf(char *err, size_t len, fy_status_t st, const char *msg)
{
    if (err != NULL && len > 0)
        snprintf(err, len, "%s", msg);
    return st;
}

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static int32_t lookup(const mdl_tokenizer_t *t, const char *s, size_t n)
{
    uint32_t mask = t->hash_cap - 1;
    for (uint32_t i = (uint32_t)fnv1a(s, n) & mask;; i = (i + 1) & mask) {
        int32_t id = t->hash[i];
        if (id < 0)
            return -1;
        if (t->len[id] == n && memcmp(t->text + t->off[id], s, n) == 0)
            return id;
    }
}

static const merge_slot_t *merge_find(const mdl_tokenizer_t *t, int32_t a, int32_t b)
{
    if (t->merge_cap == 0)
        return NULL;
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    uint32_t mask = t->merge_cap - 1;
    for (uint32_t i = (uint32_t)mix64(key) & mask;; i = (i + 1) & mask) {
        if (t->merges[i].key == 0)
            return NULL;
        if (t->merges[i].key == key)
            return &t->merges[i];
    }
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the rest to 256+. */
static void init_byte_alphabet(mdl_tokenizer_t *t)
{
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        t->byte_to_cp[b] = keep ? (uint32_t)b : (uint32_t)(256 + n++);
    }
    for (int i = 0; i < 512; i++)
        t->cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++)
        t->cp_to_byte[t->byte_to_cp[b]] = (int16_t)b;
}

static int utf8_put(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | cp >> 12);
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | cp >> 18);
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Decodes one UTF-8 character at s[0..n); returns its length (1 for an invalid byte, with
 * *cp_p = 0xFFFFFFFF) . */
static int utf8_get(const unsigned char *s, size_t n, uint32_t *cp_p)
{
    unsigned char c = s[0];
    int len;
    uint32_t cp, min;
    if (c < 0x80) {
        *cp_p = c;
        return 1;
    } else if ((c & 0xe0) == 0xc0) {
        len = 2, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        len = 4, cp = c & 0x07, min = 0x10000;
    } else {
        *cp_p = UINT32_MAX;
        return 1;
    }
    if ((size_t)len > n) {
        *cp_p = UINT32_MAX;
        return 1;
    }
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            *cp_p = UINT32_MAX;
            return 1;
        }
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
        *cp_p = UINT32_MAX;
        return 1;
    }
    *cp_p = cp;
    return len;
}

bool mdl_utf8_valid(const char *s, size_t len)
{
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        i += (size_t)utf8_get((const unsigned char *)s + i, len - i, &cp);
        if (cp == UINT32_MAX)
            return false;
    }
    return true;
}

size_t mdl_utf8_sanitize(const char *s, size_t len, char *out)
{
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        const int l = utf8_get((const unsigned char *)s + i, len - i, &cp);
        if (cp == UINT32_MAX) {
            memcpy(out + n, "\xef\xbf\xbd", 3);
            n += 3;
        } else {
            memcpy(out + n, s + i, (size_t)l);
            n += (size_t)l;
        }
        i += (size_t)l;
    }
    out[n] = '\0';
    return n;
}

void mdl_tokenizer_destroy(mdl_tokenizer_t *t)
{
    if (t == NULL)
        return;
    free(t->text);
    free(t->off);
    free(t->len);
    free(t->type);
    free(t->score);
    free(t->hash);
    free(t->merges);
    free(t->specials);
    free(t->chat_template);
    free(t);
}

static int cmp_special_len(const void *a, const void *b, void *arg)
{
    const mdl_tokenizer_t *t = arg;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (t->len[x] != t->len[y])
        return t->len[x] > t->len[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static mdl_pre_kind_t pre_from_name(const char *s, size_t n)
{
    static const struct {
        const char *name;
        mdl_pre_kind_t kind;
    } map[] = {
        {"smollm", MDL_PRE_SMOLLM},   {"starcoder", MDL_PRE_SMOLLM}, {"refact", MDL_PRE_SMOLLM},
        {"llama3", MDL_PRE_LLAMA3},   {"llama-bpe", MDL_PRE_LLAMA3}, {"smaug-bpe", MDL_PRE_LLAMA3},
        {"qwen2", MDL_PRE_QWEN2},     {"deepseek-r1-qwen", MDL_PRE_QWEN2},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(map); i++) {
        if (strlen(map[i].name) == n && memcmp(map[i].name, s, n) == 0)
            return map[i].kind;
    }
    return MDL_PRE_GPT2;
}

static fy_status_t build_merges(mdl_tokenizer_t *t, const mdl_gguf_t *g, int64_t mi, char *err,
                                size_t err_len)
{
    uint64_t n = mdl_gguf_arr_len(g, mi);
    if (mdl_gguf_arr_type(g, mi) != MDL_GGUF_STRING || n > (1u << 24))
        return errf(err, err_len, FY_ERR_FORMAT, "tokenizer: tokenizer.ggml.merges malformed");
    uint32_t cap = 16;
    while (cap < n * 2)
        cap <<= 1;
    t->merges = calloc(cap, sizeof(*t->merges));
    if (t->merges == NULL)
        return FY_ERR_NO_MEMORY;
    t->merge_cap = cap;
    char buf[512];
    for (uint64_t r = 0; r < n; r++) {
        const char *s;
        size_t len;
        mdl_gguf_arr_str(g, mi, r, &s, &len);
        const char *sp = memchr(s, ' ', len);
        if (sp == NULL || sp == s || len >= sizeof(buf))
            return errf(err, err_len, FY_ERR_FORMAT, "tokenizer: a merge is not 'left right'");
        size_t ll = (size_t)(sp - s), rl = len - ll - 1;
        int32_t a = lookup(t, s, ll), b = lookup(t, sp + 1, rl);
        memcpy(buf, s, ll);
        memcpy(buf + ll, sp + 1, rl);
        int32_t m = lookup(t, buf, ll + rl);
        if (a < 0 || b < 0 || m < 0)
            continue; // llama.cpp ignores merges whose parts are not tokens; so do we
        uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
        uint32_t mask = cap - 1;
        for (uint32_t i = (uint32_t)mix64(key) & mask;; i = (i + 1) & mask) {
            if (t->merges[i].key == key)
                break; // keep the first (lowest) rank
            if (t->merges[i].key == 0) {
                t->merges[i] = (merge_slot_t){key, (int32_t)r, m};
                break;
            }
        }
    }
    return FY_OK;
}

fy_status_t mdl_tokenizer_create(const mdl_gguf_t *g, mdl_tokenizer_t **tok_p, char *err,
                                 size_t err_len)
{
    const char *model;
    size_t model_len;
    if (mdl_gguf_get_str(g, "tokenizer.ggml.model", &model, &model_len) != FY_OK)
        return errf(err, err_len, FY_ERR_FORMAT, "tokenizer: tokenizer.ggml.model missing");
    mdl_tok_kind_t kind;
    if (model_len == 4 && memcmp(model, "gpt2", 4) == 0)
        kind = MDL_TOK_BPE;
    else if (model_len == 5 && memcmp(model, "llama", 5) == 0)
        kind = MDL_TOK_SPM;
    else
        return errf(err, err_len, FY_ERR_UNSUPPORTED,
                    "tokenizer: tokenizer.ggml.model not supported (gpt2, llama)");
    int64_t ti = mdl_gguf_find_key(g, "tokenizer.ggml.tokens");
    uint64_t n = mdl_gguf_arr_len(g, ti);
    if (ti < 0 || mdl_gguf_arr_type(g, ti) != MDL_GGUF_STRING || n == 0 || n > (1u << 22))
        return errf(err, err_len, FY_ERR_FORMAT, "tokenizer: tokenizer.ggml.tokens malformed");

    mdl_tokenizer_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = FY_ERR_NO_MEMORY;
    t->kind = kind;
    t->n_vocab = (int32_t)n;
    t->off = malloc(n * sizeof(uint32_t));
    t->len = malloc(n * sizeof(uint32_t));
    t->type = malloc(n * sizeof(int32_t));
    t->score = calloc(n, sizeof(float));
    size_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        const char *s;
        size_t len;
        mdl_gguf_arr_str(g, ti, i, &s, &len);
        total += len + 1;
    }
    if (total > UINT32_MAX) {
        st = errf(err, err_len, FY_ERR_FORMAT, "tokenizer: vocabulary strings too large");
        goto fail;
    }
    t->text = malloc(total);
    t->hash_cap = 16;
    while (t->hash_cap < n * 2)
        t->hash_cap <<= 1;
    t->hash = malloc(t->hash_cap * sizeof(int32_t));
    if (t->off == NULL || t->len == NULL || t->type == NULL || t->score == NULL ||
        t->text == NULL || t->hash == NULL)
        goto fail;
    memset(t->hash, 0xff, t->hash_cap * sizeof(int32_t));
    size_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        const char *s;
        size_t len;
        mdl_gguf_arr_str(g, ti, i, &s, &len);
        memcpy(t->text + pos, s, len);
        t->text[pos + len] = '\0';
        t->off[i] = (uint32_t)pos;
        t->len[i] = (uint32_t)len;
        t->type[i] = TOK_TYPE_NORMAL;
        pos += len + 1;
        uint32_t mask = t->hash_cap - 1;
        for (uint32_t h = (uint32_t)fnv1a(s, len) & mask;; h = (h + 1) & mask) {
            int32_t id = t->hash[h];
            if (id < 0) {
                t->hash[h] = (int32_t)i;
                break;
            }
            if (t->len[id] == len && memcmp(t->text + t->off[id], s, len) == 0)
                break; // duplicate string: the first id wins
        }
    }
    int64_t ty = mdl_gguf_find_key(g, "tokenizer.ggml.token_type");
    if (ty >= 0) {
        if (mdl_gguf_arr_len(g, ty) != n) {
            st = errf(err, err_len, FY_ERR_FORMAT,
                      "tokenizer: tokenizer.ggml.token_type length differs from tokens");
            goto fail;
        }
        for (uint64_t i = 0; i < n; i++) {
            int64_t v;
            if (mdl_gguf_arr_i64(g, ty, i, &v) != FY_OK) {
                st = errf(err, err_len, FY_ERR_FORMAT, "tokenizer: token_type not integers");
                goto fail;
            }
            t->type[i] = (int32_t)v;
        }
    }
    int64_t sc = mdl_gguf_find_key(g, "tokenizer.ggml.scores");
    if (sc >= 0 && mdl_gguf_arr_len(g, sc) == n) {
        for (uint64_t i = 0; i < n; i++)
            mdl_gguf_arr_f32(g, sc, i, &t->score[i]);
    }
    // Special ids, each checked against the vocabulary.
    static const char *const id_keys[] = {"tokenizer.ggml.bos_token_id",
                                          "tokenizer.ggml.eos_token_id",
                                          "tokenizer.ggml.unknown_token_id"};
    int32_t *id_dst[] = {&t->bos, &t->eos, &t->unk};
    for (int k = 0; k < 3; k++) {
        int64_t v;
        *id_dst[k] = -1;
        if (mdl_gguf_get_i64(g, id_keys[k], &v) == FY_OK) {
            if (v < 0 || v >= (int64_t)n) {
                st = errf(err, err_len, FY_ERR_OUT_OF_RANGE,
                          "tokenizer: a special token id is outside the vocabulary");
                goto fail;
            }
            *id_dst[k] = (int32_t)v;
        }
    }
    t->add_bos = kind == MDL_TOK_SPM;
    mdl_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos);
    t->add_space_prefix = kind == MDL_TOK_SPM;
    mdl_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix);
    const char *pre;
    size_t pre_len;
    t->pre = mdl_gguf_get_str(g, "tokenizer.ggml.pre", &pre, &pre_len) == FY_OK
                 ? pre_from_name(pre, pre_len)
                 : MDL_PRE_GPT2;
    const char *tmpl;
    size_t tmpl_len;
    if (mdl_gguf_get_str(g, "tokenizer.chat_template", &tmpl, &tmpl_len) == FY_OK) {
        t->chat_template = strndup(tmpl, tmpl_len);
        if (t->chat_template == NULL)
            goto fail;
    }

    // Special tokens matched in text: control and user-defined ones, longest first.
    t->specials = malloc(n * sizeof(int32_t));
    if (t->specials == NULL)
        goto fail;
    for (uint64_t i = 0; i < n; i++) {
        if ((t->type[i] == TOK_TYPE_CONTROL || t->type[i] == TOK_TYPE_USER) && t->len[i] > 0)
            t->specials[t->n_specials++] = (int32_t)i;
    }
    qsort_r(t->specials, (size_t)t->n_specials, sizeof(int32_t), cmp_special_len, t);

    init_byte_alphabet(t);
    for (int b = 0; b < 256; b++) {
        char buf[8];
        int l;
        if (kind == MDL_TOK_BPE)
            l = utf8_put(t->byte_to_cp[b], buf);
        else
            l = snprintf(buf, sizeof(buf), "<0x%02X>", b);
        t->byte_ids[b] = lookup(t, buf, (size_t)l);
    }
    if (kind == MDL_TOK_BPE) {
        int64_t mi = mdl_gguf_find_key(g, "tokenizer.ggml.merges");
        if (mi < 0) {
            st = errf(err, err_len, FY_ERR_FORMAT, "tokenizer: tokenizer.ggml.merges missing");
            goto fail;
        }
        if ((st = build_merges(t, g, mi, err, err_len)) != FY_OK)
            goto fail;
    }
    *tok_p = t;
    return FY_OK;
fail:
    mdl_tokenizer_destroy(t);
    return st;
}

mdl_tok_kind_t mdl_tokenizer_kind(const mdl_tokenizer_t *t)
{
    return t->kind;
}

mdl_pre_kind_t mdl_tokenizer_pre(const mdl_tokenizer_t *t)
{
    return t->pre;
}

int32_t mdl_tokenizer_n_vocab(const mdl_tokenizer_t *t)
{
    return t->n_vocab;
}

int32_t mdl_tokenizer_bos(const mdl_tokenizer_t *t)
{
    return t->bos;
}

int32_t mdl_tokenizer_eos(const mdl_tokenizer_t *t)
{
    return t->eos;
}

bool mdl_tokenizer_add_bos(const mdl_tokenizer_t *t)
{
    return t->add_bos && t->bos >= 0;
}

int32_t mdl_tokenizer_find(const mdl_tokenizer_t *t, const char *text)
{
    return lookup(t, text, strlen(text));
}

bool mdl_tokenizer_is_special(const mdl_tokenizer_t *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab &&
           (t->type[id] == TOK_TYPE_CONTROL || t->type[id] == TOK_TYPE_UNUSED);
}

/* ------------------------------------------------------------------------------------------ */
/* Encoding                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Output accumulator: counts every id, stores those that fit. */
typedef struct {
    int32_t *ids;
    size_t cap;
    size_t n;
} out_t;

static void emit(out_t *o, int32_t id)
{
    if (o->n < o->cap)
        o->ids[o->n] = id;
    o->n++;
}

/* A decoded character of the input: code point (UINT32_MAX for an invalid byte) and where its
 * bytes are. */
typedef struct {
    uint32_t cp;
    uint32_t off;
    uint32_t len;
} uchar_t;

enum { CLS_OTHER = 0, CLS_L = 1, CLS_N = 2, CLS_S = 4 };

static int cls(uint32_t cp)
{
    if (cp == UINT32_MAX)
        return CLS_OTHER;
    if (mdl_uni_is_letter(cp))
        return CLS_L;
    if (mdl_uni_is_number(cp))
        return CLS_N;
    if (mdl_uni_is_space(cp))
        return CLS_S;
    return CLS_OTHER;
}

static uint32_t lower_ascii(uint32_t cp)
{
    return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
}

/* Contractions 's 't 're 've 'm 'll 'd at u[i] (u[i] is '\''); returns the length or 0. */
static size_t match_contraction(const uchar_t *u, size_t i, size_t n, bool icase)
{
    if (i + 1 >= n)
        return 0;
    uint32_t a = icase ? lower_ascii(u[i + 1].cp) : u[i + 1].cp;
    if (a == 's' || a == 't' || a == 'm' || a == 'd')
        return 2;
    if (i + 2 >= n)
        return 0;
    uint32_t b = icase ? lower_ascii(u[i + 2].cp) : u[i + 2].cp;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
        return 3;
    return 0;
}

/* \s+(?!\S)|\s+ at i (u[i] is whitespace): the run, minus its last character when a
 * non-space follows and the run is longer than one. */
static size_t match_spaces(const uchar_t *u, const int *c, size_t i, size_t n)
{
    size_t k = i;
    while (k < n && c[k] == CLS_S)
        k++;
    if (k < n && k - i >= 2)
        return k - i - 1;
    return k - i;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t pre_gpt2(const uchar_t *u, const int *c, size_t i, size_t n)
{
    if (u[i].cp == '\'') {
        size_t m = match_contraction(u, i, n, false);
        if (m > 0)
            return m;
    }
    size_t j = i + (u[i].cp == ' ' && i + 1 < n ? 1 : 0);
    int cj = c[j];
    if (j > i || cj != CLS_S) {
        if (cj == CLS_L || cj == CLS_N) {
            size_t k = j;
            while (k < n && c[k] == cj)
                k++;
            return k - i;
        }
        if (cj == CLS_OTHER) {
            size_t k = j;
            while (k < n && c[k] == CLS_OTHER)
                k++;
            return k - i;
        }
    }
    return match_spaces(u, c, i, n);
}

/* Llama 3 / Qwen2: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 * ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+   (Qwen2: \p{N} one at a time) */
static size_t pre_llama3(const uchar_t *u, const int *c, size_t i, size_t n, int max_digits)
{
    if (u[i].cp == '\'') {
        size_t m = match_contraction(u, i, n, true);
        if (m > 0)
            return m;
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    {
        size_t j = i;
        if (c[i] != CLS_L && c[i] != CLS_N && u[i].cp != '\r' && u[i].cp != '\n')
            j++;
        if (j < n && c[j] == CLS_L) {
            size_t k = j;
            while (k < n && c[k] == CLS_L)
                k++;
            return k - i;
        }
    }
    if (c[i] == CLS_N) {
        size_t k = i;
        while (k < n && c[k] == CLS_N && (int)(k - i) < max_digits)
            k++;
        return k - i;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    {
        size_t j = i + (u[i].cp == ' ' && i + 1 < n ? 1 : 0);
        if (c[j] == CLS_OTHER) {
            size_t k = j;
            while (k < n && c[k] == CLS_OTHER)
                k++;
            while (k < n && (u[k].cp == '\r' || u[k].cp == '\n'))
                k++;
            return k - i;
        }
    }
    // \s*[\r\n]+ : up to and including the last newline of the whitespace run.
    size_t k = i;
    size_t last_nl = SIZE_MAX;
    while (k < n && c[k] == CLS_S) {
        if (u[k].cp == '\r' || u[k].cp == '\n')
            last_nl = k;
        k++;
    }
    if (last_nl != SIZE_MAX)
        return last_nl + 1 - i;
    if (k > i)
        return match_spaces(u, c, i, n);
    return 1;
}

/* BPE over the bytes of one piece. sym holds token ids; merges lowest rank first. */
static fy_status_t bpe_piece(const mdl_tokenizer_t *t, const unsigned char *s, size_t len,
                             out_t *o)
{
    int32_t stack[64];
    int32_t *sym = len <= 64 ? stack : malloc(len * sizeof(int32_t));
    if (sym == NULL)
        return FY_ERR_NO_MEMORY;
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t id = t->byte_ids[s[i]];
        sym[n++] = id >= 0 ? id : t->unk;
    }
    for (;;) {
        int32_t best_rank = INT32_MAX;
        size_t best = 0;
        int32_t best_id = -1;
        for (size_t i = 0; i + 1 < n; i++) {
            if (sym[i] < 0 || sym[i + 1] < 0)
                continue;
            const merge_slot_t *m = merge_find(t, sym[i], sym[i + 1]);
            if (m != NULL && m->rank < best_rank) {
                best_rank = m->rank;
                best = i;
                best_id = m->id;
            }
        }
        if (best_id < 0)
            break;
        sym[best] = best_id;
        memmove(sym + best + 1, sym + best + 2, (n - best - 2) * sizeof(int32_t));
        n--;
    }
    for (size_t i = 0; i < n; i++) {
        if (sym[i] >= 0)
            emit(o, sym[i]);
    }
    if (sym != stack)
        free(sym);
    return FY_OK;
}

/* BPE: a byte the vocabulary has no token for (SmolLM2 has none for six ASCII control bytes,
 * 0xC0, 0xC1, 0xF1, 0xF2 and 0xF5-0xFF) is encoded as U+FFFD, the way the detokenizer prints
 * invalid UTF-8, instead of as the unknown token (SmolLM2's is <|endoftext|>, which would end
 * the text in the middle of a prompt). Returns text when every byte has a token (or U+FFFD has
 * none), else a malloc'd copy with those bytes replaced and its length in *len_p; NULL when out of
 * memory. */
static const char *bpe_tokenizable(const mdl_tokenizer_t *t, const char *text, size_t *len_p)
{
    static const unsigned char repl[3] = {0xef, 0xbf, 0xbd};
    const size_t len = *len_p;
    size_t missing = 0;
    for (size_t i = 0; i < len; i++)
        missing += t->byte_ids[(unsigned char)text[i]] < 0;
    if (missing == 0 || t->byte_ids[repl[0]] < 0 || t->byte_ids[repl[1]] < 0 ||
        t->byte_ids[repl[2]] < 0)
        return text;
    char *out = malloc(len + 2 * missing);
    if (out == NULL)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (t->byte_ids[(unsigned char)text[i]] >= 0) {
            out[n++] = text[i];
        } else {
            memcpy(out + n, repl, sizeof(repl));
            n += sizeof(repl);
        }
    }
    *len_p = n;
    return out;
}

/* Pre-tokenizes text (every byte has a token) and runs BPE over each piece. */
static fy_status_t encode_bpe_pieces(const mdl_tokenizer_t *t, const char *text, size_t len,
                                     out_t *o)
{
    uchar_t *u = malloc(len * sizeof(uchar_t));
    int *c = malloc((len + 1) * sizeof(int));
    if (u == NULL || c == NULL) {
        free(u);
        free(c);
        return FY_ERR_NO_MEMORY;
    }
    size_t n = 0;
    for (size_t p = 0; p < len;) {
        uint32_t cp;
        int l = utf8_get((const unsigned char *)text + p, len - p, &cp);
        u[n] = (uchar_t){cp, (uint32_t)p, (uint32_t)l};
        c[n] = cls(cp);
        n++;
        p += (size_t)l;
    }
    c[n] = CLS_OTHER; // sentinel: the optional-space lookahead may read one past
    fy_status_t st = FY_OK;
    for (size_t i = 0; i < n && st == FY_OK;) {
        size_t m;
        switch (t->pre) {
        case MDL_PRE_SMOLLM:
            // Digits split one by one before the GPT-2 regex sees the text.
            if (c[i] == CLS_N) {
                m = 1;
            } else {
                size_t end = i;
                while (end < n && c[end] != CLS_N)
                    end++;
                m = pre_gpt2(u, c, i, end);
                // pre_gpt2 must not see past a digit: a run of letters cannot contain one,
                // but " ?" before a digit must stay alone.
                if (i + m > end)
                    m = end - i;
            }
            break;
        case MDL_PRE_LLAMA3: m = pre_llama3(u, c, i, n, 3); break;
        case MDL_PRE_QWEN2: m = pre_llama3(u, c, i, n, 1); break;
        default: m = pre_gpt2(u, c, i, n); break;
        }
        if (m == 0)
            m = 1;
        size_t b0 = u[i].off, b1 = u[i + m - 1].off + u[i + m - 1].len;
        st = bpe_piece(t, (const unsigned char *)text + b0, b1 - b0, o);
        i += m;
    }
    free(u);
    free(c);
    return st;
}

static fy_status_t encode_bpe_text(const mdl_tokenizer_t *t, const char *text, size_t len, out_t *o)
{
    if (len == 0)
        return FY_OK;
    const char *src = bpe_tokenizable(t, text, &len);
    if (src == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = encode_bpe_pieces(t, src, len, o);
    if (src != text)
        free((char *)src);
    return st;
}

typedef struct {
    int prev, next;
    uint32_t off, len;
} spm_sym_t;

/* SentencePiece-style BPE: merge the adjacent pair with the best score until none is a
 * token; leftovers fall back to byte tokens. */
static fy_status_t encode_spm_text(const mdl_tokenizer_t *t, const char *text, size_t len,
                                   bool prefix, out_t *o)
{
    // Escape: ' ' -> U+2581 (3 bytes), with a leading one when asked.
    size_t cap = (len + 1) * 3;
    char *s = malloc(cap);
    spm_sym_t *sym = malloc((len + 2) * sizeof(spm_sym_t));
    if (s == NULL || sym == NULL) {
        free(s);
        free(sym);
        return FY_ERR_NO_MEMORY;
    }
    size_t sl = 0;
    if (prefix)
        sl += (size_t)utf8_put(0x2581, s + sl);
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ')
            sl += (size_t)utf8_put(0x2581, s + sl);
        else
            s[sl++] = text[i];
    }
    int n = 0;
    for (size_t p = 0; p < sl;) {
        uint32_t cp;
        int l = utf8_get((const unsigned char *)s + p, sl - p, &cp);
        sym[n] = (spm_sym_t){n - 1, n + 1, (uint32_t)p, (uint32_t)l};
        n++;
        p += (size_t)l;
    }
    if (n > 0)
        sym[n - 1].next = -1;
    for (;;) {
        float best_score = -INFINITY;
        int best = -1;
        for (int i = 0; i != -1 && i < n; i = sym[i].next) {
            int j = sym[i].next;
            if (j < 0)
                break;
            int32_t id = lookup(t, s + sym[i].off, sym[i].len + sym[j].len);
            if (id >= 0 && t->score[id] > best_score) {
                best_score = t->score[id];
                best = i;
            }
        }
        if (best < 0)
            break;
        int j = sym[best].next;
        sym[best].len += sym[j].len;
        sym[best].next = sym[j].next;
        if (sym[j].next >= 0)
            sym[sym[j].next].prev = best;
    }
    for (int i = 0; i != -1 && n > 0; i = sym[i].next) {
        int32_t id = lookup(t, s + sym[i].off, sym[i].len);
        if (id >= 0) {
            emit(o, id);
            continue;
        }
        for (uint32_t b = 0; b < sym[i].len; b++) {
            int32_t bid = t->byte_ids[(unsigned char)s[sym[i].off + b]];
            emit(o, bid >= 0 ? bid : t->unk);
        }
    }
    free(s);
    free(sym);
    return FY_OK;
}

fy_status_t mdl_tokenizer_encode(const mdl_tokenizer_t *t, const char *text, size_t len,
                                 bool parse_special, int32_t *ids, size_t cap, size_t *n_p)
{
    if (text == NULL && len > 0)
        return FY_ERR_INVALID_ARG;
    out_t o = {.ids = ids, .cap = ids != NULL ? cap : 0};
    size_t seg = 0; // start of the pending plain-text segment
    bool first = true;
    fy_status_t st = FY_OK;
    for (size_t p = 0; p <= len && st == FY_OK;) {
        int32_t sid = -1;
        if (parse_special && p < len) {
            for (int k = 0; k < t->n_specials; k++) {
                int32_t id = t->specials[k];
                if (t->len[id] <= len - p && memcmp(text + p, t->text + t->off[id], t->len[id]) == 0) {
                    sid = id;
                    break;
                }
            }
        }
        if (sid < 0 && p < len) {
            p++;
            continue;
        }
        if (p > seg) {
            if (t->kind == MDL_TOK_BPE)
                st = encode_bpe_text(t, text + seg, p - seg, &o);
            else
                st = encode_spm_text(t, text + seg, p - seg, first && t->add_space_prefix, &o);
        }
        first = false;
        if (sid < 0)
            break;
        emit(&o, sid);
        p += t->len[sid];
        seg = p;
    }
    if (st != FY_OK)
        return st;
    *n_p = o.n;
    return o.n <= o.cap ? FY_OK : FY_ERR_RESOURCE_EXHAUSTED;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoding                                                                                     */
/* ------------------------------------------------------------------------------------------ */

int mdl_tokenizer_token_bytes(const mdl_tokenizer_t *t, int32_t id, char *buf, size_t cap)
{
    if (id < 0 || id >= t->n_vocab)
        return -1;
    const char *s = t->text + t->off[id];
    size_t len = t->len[id];
    size_t w = 0;
#define PUT(ch)                                                                                 \
    do {                                                                                        \
        if (w < cap)                                                                            \
            buf[w] = (char)(ch);                                                                \
        w++;                                                                                    \
    } while (0)
    if (t->type[id] == TOK_TYPE_CONTROL || t->type[id] == TOK_TYPE_USER) {
        for (size_t i = 0; i < len; i++)
            PUT(s[i]);
        return (int)w;
    }
    if (t->kind == MDL_TOK_SPM) {
        unsigned int byte;
        if (t->type[id] == TOK_TYPE_BYTE && len == 6 && sscanf(s, "<0x%02X>", &byte) == 1) {
            PUT(byte);
            return (int)w;
        }
        for (size_t i = 0; i < len;) {
            if (i + 3 <= len && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
                PUT(' ');
                i += 3;
            } else {
                PUT(s[i]);
                i++;
            }
        }
        return (int)w;
    }
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        int l = utf8_get((const unsigned char *)s + i, len - i, &cp);
        if (cp < 512 && t->cp_to_byte[cp] >= 0) {
            PUT(t->cp_to_byte[cp]);
        } else {
            for (int k = 0; k < l; k++)
                PUT(s[i + (size_t)k]);
        }
        i += (size_t)l;
    }
#undef PUT
    return (int)w;
}

void mdl_detok_init(mdl_detok_t *d, const mdl_tokenizer_t *tok, bool skip_special)
{
    memset(d, 0, sizeof(*d));
    d->tok = tok;
    d->skip_special = skip_special;
    d->at_start = tok->kind == MDL_TOK_SPM && tok->add_space_prefix;
}

/* Expected length of a UTF-8 sequence from its lead byte (0 = invalid lead). */
static int utf8_need(unsigned char c)
{
    if (c < 0x80)
        return 1;
    if ((c & 0xe0) == 0xc0)
        return c >= 0xc2 ? 2 : 0;
    if ((c & 0xf0) == 0xe0)
        return 3;
    if ((c & 0xf8) == 0xf0)
        return c <= 0xf4 ? 4 : 0;
    return 0;
}

/* Appends one whole character (n bytes) when it fits with the terminating NUL: a character
 * cut at the end of a short buffer would be invalid UTF-8. */
static void out_put(char *out, size_t cap, size_t *w, const char *s, size_t n)
{
    if (*w + n < cap) {
        memcpy(out + *w, s, n);
        *w += n;
    }
}

static const char k_replacement[] = "\xef\xbf\xbd";

/* Moves complete characters from pending to out. */
static void drain(mdl_detok_t *d, char *out, size_t cap, size_t *w)
{
    while (d->n_pending > 0) {
        int need = utf8_need(d->pending[0]);
        if (need == 0) {
            out_put(out, cap, w, k_replacement, 3);
            memmove(d->pending, d->pending + 1, (size_t)--d->n_pending);
            continue;
        }
        if (d->n_pending < need) {
            // Wait for more bytes unless a non-continuation byte already breaks it.
            for (int i = 1; i < d->n_pending; i++) {
                if ((d->pending[i] & 0xc0) != 0x80) {
                    need = -i;
                    break;
                }
            }
            if (need > 0)
                return;
            out_put(out, cap, w, k_replacement, 3);
            memmove(d->pending, d->pending + 1, (size_t)--d->n_pending);
            continue;
        }
        uint32_t cp;
        int l = utf8_get(d->pending, (size_t)d->n_pending, &cp);
        // U+0000 would end the NUL-terminated text (and every C string made of it, such as a
        // protobuf-c string field): it is printed as U+FFFD, like invalid bytes.
        if (cp == UINT32_MAX || cp == 0)
            out_put(out, cap, w, k_replacement, 3);
        else
            out_put(out, cap, w, (const char *)d->pending, (size_t)l);
        d->n_pending -= l;
        memmove(d->pending, d->pending + l, (size_t)d->n_pending);
    }
}

int mdl_detok_push(mdl_detok_t *d, int32_t id, char *out, size_t cap)
{
    if (cap == 0)
        return -1;
    size_t w = 0;
    out[0] = '\0';
    if (id < 0 || id >= d->tok->n_vocab)
        return -1;
    if (d->skip_special && mdl_tokenizer_is_special(d->tok, id))
        return 0;
    // Tokens are short (SmolLM2's longest is 81 bytes); a longer one takes the heap rather
    // than being cut.
    char stack[256], *buf = stack;
    int n = mdl_tokenizer_token_bytes(d->tok, id, stack, sizeof(stack));
    if (n > (int)sizeof(stack)) {
        buf = malloc((size_t)n);
        if (buf == NULL)
            return -1;
        mdl_tokenizer_token_bytes(d->tok, id, buf, (size_t)n);
    }
    int i = 0;
    if (d->at_start) {
        d->at_start = false;
        if (n > 0 && buf[0] == ' ')
            i = 1;
    }
    for (; i < n; i++) {
        d->pending[d->n_pending++] = (uint8_t)buf[i];
        if (d->n_pending == (int)sizeof(d->pending) || utf8_need(d->pending[0]) <= d->n_pending)
            drain(d, out, cap, &w);
    }
    if (buf != stack)
        free(buf);
    drain(d, out, cap, &w);
    out[w] = '\0';
    return (int)w;
}

int mdl_detok_flush(mdl_detok_t *d, char *out, size_t cap)
{
    if (cap == 0)
        return 0;
    size_t w = 0;
    if (d->n_pending > 0)
        out_put(out, cap, &w, k_replacement, 3);
    d->n_pending = 0;
    out[w] = '\0';
    return (int)w;
}

/* ------------------------------------------------------------------------------------------ */
/* Chat template                                                                                */
/* ------------------------------------------------------------------------------------------ */

mdl_chat_kind_t mdl_chat_kind(const mdl_tokenizer_t *t)
{
    const char *tmpl = t->chat_template;
    if (tmpl == NULL)
        return MDL_CHAT_NONE;
    if (strstr(tmpl, "<|im_start|>") != NULL)
        return MDL_CHAT_CHATML;
    if (strstr(tmpl, "<|start_header_id|>") != NULL)
        return MDL_CHAT_LLAMA3;
    if (strstr(tmpl, "<start_of_turn>") != NULL)
        return MDL_CHAT_GEMMA;
    if (strstr(tmpl, "<|user|>") != NULL && strstr(tmpl, "<|end|>") != NULL)
        return MDL_CHAT_PHI3;
    if (strstr(tmpl, "[INST]") != NULL)
        return strstr(tmpl, "<<SYS>>") != NULL ? MDL_CHAT_LLAMA2 : MDL_CHAT_MISTRAL;
    return MDL_CHAT_NONE;
}

const char *mdl_chat_kind_name(mdl_chat_kind_t kind)
{
    static const char *const k_names[] = {"none",   "chatml", "llama3", "mistral",
                                          "llama2", "gemma",  "phi3"};
    return (unsigned)kind < sizeof(k_names) / sizeof(k_names[0]) ? k_names[kind] : "none";
}

int32_t mdl_chat_end_token(const mdl_tokenizer_t *t)
{
    static const char *const k_end[] = {
        [MDL_CHAT_CHATML] = "<|im_end|>",
        [MDL_CHAT_LLAMA3] = "<|eot_id|>",
        [MDL_CHAT_GEMMA] = "<end_of_turn>",
        [MDL_CHAT_PHI3] = "<|end|>",
    };
    mdl_chat_kind_t k = mdl_chat_kind(t);
    if ((unsigned)k >= sizeof(k_end) / sizeof(k_end[0]) || k_end[k] == NULL)
        return -1;
    int32_t id = mdl_tokenizer_find(t, k_end[k]);
    return id == mdl_tokenizer_eos(t) ? -1 : id;
}

/* ChatML's default system prompt, when the template writes one literally (no Jinja inside):
 * *len_p bytes at the returned pointer, or NULL. */
static const char *chatml_default_system(const char *tmpl, size_t *len_p)
{
    const char *sys = strstr(tmpl, "<|im_start|>system\n");
    if (sys == NULL)
        return NULL;
    const char *def = sys + strlen("<|im_start|>system\n");
    const char *end = strstr(def, "<|im_end|>");
    if (end == NULL || memchr(def, '{', (size_t)(end - def)) != NULL ||
        memchr(def, '\'', (size_t)(end - def)) != NULL)
        return NULL;
    *len_p = (size_t)(end - def);
    return def;
}

/* Text without leading and trailing white space (Llama-3's template trims each message). */
static size_t trimmed(const char *s, const char **start_p)
{
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)*s))
        s++, n--;
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        n--;
    *start_p = s;
    return n;
}

fy_status_t mdl_chat_render(const mdl_tokenizer_t *t, const mdl_chat_msg_t *msgs, size_t n,
                            bool add_assistant, char **text_p)
{
    const mdl_chat_kind_t kind = mdl_chat_kind(t);
    if (kind == MDL_CHAT_NONE)
        return FY_ERR_UNSUPPORTED;
    size_t def_len = 0;
    const char *def =
        kind == MDL_CHAT_CHATML ? chatml_default_system(t->chat_template, &def_len) : NULL;
    size_t total = 96 + def_len;
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].role == NULL || msgs[i].content == NULL)
            return FY_ERR_INVALID_ARG;
        total += strlen(msgs[i].role) + strlen(msgs[i].content) + 64;
    }
    char *s = malloc(total);
    if (s == NULL)
        return FY_ERR_NO_MEMORY;
    size_t w = 0;
    // Formats without a system turn: its text opens the first user message.
    const char *sys = NULL;
    size_t first = 0;
    const bool no_system_turn =
        kind == MDL_CHAT_MISTRAL || kind == MDL_CHAT_GEMMA || kind == MDL_CHAT_LLAMA2;
    if (no_system_turn && n > 0 && strcmp(msgs[0].role, "system") == 0) {
        sys = msgs[0].content;
        first = 1;
    }
    if (def != NULL && (n == 0 || strcmp(msgs[0].role, "system") != 0))
        w += (size_t)sprintf(s + w, "<|im_start|>system\n%.*s<|im_end|>\n", (int)def_len, def);
    bool sys_done = sys == NULL;
    for (size_t i = first; i < n; i++) {
        const char *role = msgs[i].role, *c = msgs[i].content;
        const bool user = strcmp(role, "user") == 0, assistant = strcmp(role, "assistant") == 0;
        const char *tc;
        size_t tn;
        switch (kind) {
        case MDL_CHAT_CHATML:
            w += (size_t)sprintf(s + w, "<|im_start|>%s\n%s<|im_end|>\n", role, c);
            break;
        case MDL_CHAT_LLAMA3:
            tn = trimmed(c, &tc);
            w += (size_t)sprintf(s + w, "<|start_header_id|>%s<|end_header_id|>\n\n%.*s<|eot_id|>",
                                 role, (int)tn, tc);
            break;
        case MDL_CHAT_GEMMA: // trimmed, as Gemma's template does
            w += (size_t)sprintf(s + w, "<start_of_turn>%s\n", assistant ? "model" : role);
            if (!sys_done && user) {
                tn = trimmed(sys, &tc);
                w += (size_t)sprintf(s + w, "%.*s\n\n", (int)tn, tc);
                sys_done = true;
            }
            tn = trimmed(c, &tc);
            w += (size_t)sprintf(s + w, "%.*s<end_of_turn>\n", (int)tn, tc);
            break;
        case MDL_CHAT_PHI3:
            w += (size_t)sprintf(s + w, "<|%s|>\n%s<|end|>\n", role, c);
            break;
        case MDL_CHAT_LLAMA2: // stripped, each turn after the first opening with BOS
            tn = trimmed(c, &tc);
            if (assistant) {
                w += (size_t)sprintf(s + w, " %.*s </s>", (int)tn, tc);
                break;
            }
            w += (size_t)sprintf(s + w, "%s[INST] ", w > 0 ? "<s>" : "");
            if (!sys_done) {
                const char *ts;
                size_t sn = trimmed(sys, &ts);
                w += (size_t)sprintf(s + w, "<<SYS>>\n%.*s\n<</SYS>>\n\n", (int)sn, ts);
                sys_done = true;
            }
            w += (size_t)sprintf(s + w, "%.*s [/INST]", (int)tn, tc);
            break;
        case MDL_CHAT_MISTRAL:
            if (assistant) {
                w += (size_t)sprintf(s + w, "%s</s>", c);
                break;
            }
            w += (size_t)sprintf(s + w, "[INST] ");
            if (!sys_done) {
                w += (size_t)sprintf(s + w, "%s\n\n", sys);
                sys_done = true;
            }
            w += (size_t)sprintf(s + w, "%s [/INST]", c);
            break;
        default:
            break;
        }
    }
    if (add_assistant) {
        static const char *const k_open[] = {
            [MDL_CHAT_CHATML] = "<|im_start|>assistant\n",
            [MDL_CHAT_LLAMA3] = "<|start_header_id|>assistant<|end_header_id|>\n\n",
            [MDL_CHAT_GEMMA] = "<start_of_turn>model\n",
            [MDL_CHAT_PHI3] = "<|assistant|>\n",
            [MDL_CHAT_MISTRAL] = "",
            [MDL_CHAT_LLAMA2] = "",
        };
        w += (size_t)sprintf(s + w, "%s", k_open[kind]);
    }
    s[w] = '\0';
    *text_p = s;
    return FY_OK;
}
