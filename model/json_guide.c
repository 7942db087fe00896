/*
 * json_guide.c: JSON mode for the sampler (OpenAI's response_format json_object).
 *
 * A byte-level recognizer of RFC 8259 JSON whose top-level value is an object: mdl_json_feed
 * takes a token's bytes and says whether the text so far is still the beginning of such an
 * object; mdl_json_mask sets the logits of every token that would break it to -inf (and, once
 * the object is complete, of every token but the stop tokens). The state is a few bytes and a
 * bit stack of the open containers, so trying each token of the vocabulary on a copy is cheap.
 * White space between tokens is allowed up to MDL_JSON_MAX_WS bytes in a row, so that a model
 * cannot spend its tokens on blank lines; nesting up to MDL_JSON_MAX_DEPTH.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model_int.h"

enum {
    J_START,     // before the top-level object: '{'
    J_VALUE,     // a value
    J_OBJ_FIRST, // after '{': a key or '}'
    J_OBJ_KEY,   // after ',' in an object: a key
    J_COLON,     // after a key
    J_AFTER,     // after a value inside a container: ',' or its close
    J_ARR_FIRST, // after '[': a value or ']'
    J_STR,       // inside a string (key when j->key)
    J_STR_ESC,   // after '\'
    J_STR_U,     // inside \uXXXX (lit: hex digits read)
    J_NUM_MINUS, // after '-'
    J_NUM_ZERO,  // a leading 0
    J_NUM_INT,   // integer digits
    J_NUM_DOT,   // after '.'
    J_NUM_FRAC,  // fraction digits
    J_NUM_E,     // after 'e'
    J_NUM_ESIGN, // after the exponent's sign
    J_NUM_EXP,   // exponent digits
    J_LIT,       // inside true, false or null (lit: bytes read, word: which)
    J_DONE,      // the object is complete
};

static const char *const k_words[3] = {"true", "false", "null"};

void mdl_json_init(mdl_json_t *j)
{
    memset(j, 0, sizeof(*j));
    j->st = J_START;
}

void mdl_json_init_value(mdl_json_t *j)
{
    memset(j, 0, sizeof(*j));
    j->st = J_VALUE;
}

bool mdl_json_number_open(const mdl_json_t *j)
{
    return j->depth == 0 &&
           (j->st == J_NUM_ZERO || j->st == J_NUM_INT || j->st == J_NUM_FRAC || j->st == J_NUM_EXP);
}

bool mdl_json_complete(const mdl_json_t *j)
{
    return j->st == J_DONE;
}

static bool top_is_object(const mdl_json_t *j)
{
    return (j->stack[(j->depth - 1) / 8] >> ((j->depth - 1) % 8)) & 1;
}

static bool push(mdl_json_t *j, bool object)
{
    if (j->depth >= MDL_JSON_MAX_DEPTH)
        return false;
    uint8_t *b = &j->stack[j->depth / 8], bit = (uint8_t)(1u << (j->depth % 8));
    *b = object ? (uint8_t)(*b | bit) : (uint8_t)(*b & ~bit);
    j->depth++;
    j->st = object ? J_OBJ_FIRST : J_ARR_FIRST;
    return true;
}

/* A value ended: the container goes on, or the top-level object is complete. */
static void value_done(mdl_json_t *j)
{
    j->st = j->depth == 0 ? J_DONE : J_AFTER;
}

static bool close_container(mdl_json_t *j, bool object)
{
    if (j->depth == 0 || top_is_object(j) != object)
        return false;
    j->depth--;
    value_done(j);
    return true;
}

static bool is_digit(uint8_t c)
{
    return c >= '0' && c <= '9';
}

static bool is_hex(uint8_t c)
{
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* The start of a value at c (J_VALUE or J_ARR_FIRST). */
static bool value_start(mdl_json_t *j, uint8_t c)
{
    switch (c) {
    case '{':
        return push(j, true);
    case '[':
        return push(j, false);
    case '"':
        j->st = J_STR;
        j->key = false;
        return true;
    case '-':
        j->st = J_NUM_MINUS;
        return true;
    case '0':
        j->st = J_NUM_ZERO;
        return true;
    case 't':
    case 'f':
    case 'n':
        j->st = J_LIT;
        j->word = c == 't' ? 0 : c == 'f' ? 1 : 2;
        j->lit = 1;
        return true;
    default:
        if (c >= '1' && c <= '9') {
            j->st = J_NUM_INT;
            return true;
        }
        return false;
    }
}

static bool step(mdl_json_t *j, uint8_t c);

/* A number ended at c, which belongs to what follows it. */
static bool number_end(mdl_json_t *j, uint8_t c)
{
    value_done(j);
    return j->st != J_DONE && step(j, c);
}

static bool step(mdl_json_t *j, uint8_t c)
{
    const bool ws = c == ' ' || c == '\t' || c == '\n' || c == '\r';
    const bool in_token = j->st >= J_STR && j->st <= J_LIT;
    if (ws && !in_token) {
        if (j->st == J_DONE || ++j->ws > MDL_JSON_MAX_WS)
            return false;
        return true;
    }
    if (!in_token || j->st == J_STR)
        j->ws = 0;
    switch (j->st) {
    case J_START:
        return c == '{' && push(j, true);
    case J_VALUE:
        return value_start(j, c);
    case J_ARR_FIRST:
        return c == ']' ? close_container(j, false) : value_start(j, c);
    case J_OBJ_FIRST:
    case J_OBJ_KEY:
        if (c == '}' && j->st == J_OBJ_FIRST)
            return close_container(j, true);
        if (c != '"')
            return false;
        j->st = J_STR;
        j->key = true;
        return true;
    case J_COLON:
        if (c != ':')
            return false;
        j->st = J_VALUE;
        return true;
    case J_AFTER:
        if (c == ',') {
            j->st = top_is_object(j) ? J_OBJ_KEY : J_VALUE;
            return true;
        }
        return (c == '}' || c == ']') && close_container(j, c == '}');
    case J_STR:
        if (c == '"') {
            if (j->key)
                j->st = J_COLON;
            else
                value_done(j);
            return true;
        }
        if (c == '\\')
            j->st = J_STR_ESC;
        return c >= 0x20; // control characters must be escaped
    case J_STR_ESC:
        if (c == 'u') {
            j->st = J_STR_U;
            j->lit = 0;
            return true;
        }
        j->st = J_STR;
        return strchr("\"\\/bfnrt", c) != NULL && c != '\0';
    case J_STR_U:
        if (!is_hex(c))
            return false;
        if (++j->lit == 4)
            j->st = J_STR;
        return true;
    case J_NUM_MINUS:
        if (c == '0')
            j->st = J_NUM_ZERO;
        else if (c >= '1' && c <= '9')
            j->st = J_NUM_INT;
        else
            return false;
        return true;
    case J_NUM_ZERO:
    case J_NUM_INT:
        if (is_digit(c) && j->st == J_NUM_INT)
            return true;
        if (c == '.') {
            j->st = J_NUM_DOT;
            return true;
        }
        if (c == 'e' || c == 'E') {
            j->st = J_NUM_E;
            return true;
        }
        return !is_digit(c) && number_end(j, c);
    case J_NUM_DOT:
        if (!is_digit(c))
            return false;
        j->st = J_NUM_FRAC;
        return true;
    case J_NUM_FRAC:
        if (is_digit(c))
            return true;
        if (c == 'e' || c == 'E') {
            j->st = J_NUM_E;
            return true;
        }
        return number_end(j, c);
    case J_NUM_E:
    case J_NUM_ESIGN:
        if ((c == '+' || c == '-') && j->st == J_NUM_E) {
            j->st = J_NUM_ESIGN;
            return true;
        }
        if (!is_digit(c))
            return false;
        j->st = J_NUM_EXP;
        return true;
    case J_NUM_EXP:
        return is_digit(c) || number_end(j, c);
    case J_LIT: {
        const char *w = k_words[j->word];
        if ((uint8_t)w[j->lit] != c)
            return false;
        if (w[++j->lit] == '\0')
            value_done(j);
        return true;
    }
    default: // J_DONE: nothing follows the object
        return false;
    }
}

bool mdl_json_feed(mdl_json_t *j, const uint8_t *bytes, size_t n)
{
    mdl_json_t t = *j;
    for (size_t i = 0; i < n; i++)
        if (!step(&t, bytes[i]))
            return false;
    *j = t;
    return true;
}

fy_status_t mdl_json_vocab_create(const mdl_tokenizer_t *tok, mdl_json_vocab_t **v_p)
{
    const int n = mdl_tokenizer_n_vocab(tok);
    mdl_json_vocab_t *v = calloc(1, sizeof(*v));
    if (v == NULL)
        return FY_ERR_NO_MEMORY;
    v->n_vocab = n;
    v->off = malloc((size_t)n * sizeof(uint32_t));
    v->len = calloc((size_t)n, sizeof(uint32_t));
    size_t total = 0;
    char buf[256];
    for (int i = 0; i < n && v->off != NULL && v->len != NULL; i++) {
        int l = mdl_tokenizer_is_special(tok, i) ? 0 : mdl_tokenizer_token_bytes(tok, i, buf, 256);
        v->len[i] = l > 0 && l <= 256 ? (uint32_t)l : 0; // longer tokens: never in JSON mode
        total += v->len[i];
    }
    v->text = malloc(total ? total : 1);
    v->plain = calloc((size_t)n, 1);
    v->chars = calloc((size_t)n, sizeof(uint16_t));
    if (v->off == NULL || v->len == NULL || v->text == NULL || v->plain == NULL ||
        v->chars == NULL) {
        mdl_json_vocab_destroy(v);
        return FY_ERR_NO_MEMORY;
    }
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        v->off[i] = (uint32_t)o;
        if (v->len[i] > 0)
            mdl_tokenizer_token_bytes(tok, i, (char *)v->text + o, v->len[i]);
        bool plain = v->len[i] > 0;
        uint16_t chars = 0;
        for (uint32_t k = 0; k < v->len[i]; k++) {
            const uint8_t c = v->text[o + k];
            plain &= c != '"' && c != '\\' && c >= 0x20;
            chars += (c & 0xc0) != 0x80;
        }
        v->plain[i] = plain;
        v->chars[i] = chars;
        o += v->len[i];
    }
    *v_p = v;
    return FY_OK;
}

void mdl_json_vocab_destroy(mdl_json_vocab_t *v)
{
    if (v == NULL)
        return;
    free(v->off);
    free(v->len);
    free(v->text);
    free(v->plain);
    free(v->chars);
    free(v);
}

bool mdl_json_accept(const mdl_json_vocab_t *v, mdl_json_t *j, int32_t token)
{
    if (token < 0 || token >= v->n_vocab || v->len[token] == 0)
        return false;
    return mdl_json_feed(j, v->text + v->off[token], v->len[token]);
}

int mdl_json_mask_stops(const mdl_json_vocab_t *v, const int32_t *stops, int n_stops, float *logits)
{
    int allowed = 0;
    for (int t = 0; t < v->n_vocab; t++) {
        bool stop = false;
        for (int k = 0; k < n_stops; k++)
            stop |= stops[k] == t;
        if (stop)
            allowed++;
        else
            logits[t] = -INFINITY;
    }
    return allowed;
}

int mdl_json_mask(const mdl_json_vocab_t *v, const mdl_json_t *j, const int32_t *stops, int n_stops,
                  float *logits)
{
    if (mdl_json_complete(j)) // the object is whole: only a stop token may follow
        return mdl_json_mask_stops(v, stops, n_stops, logits);
    int allowed = 0;
    // Which first bytes can follow at all: most tokens fail on theirs.
    bool first[256];
    for (int b = 0; b < 256; b++) {
        mdl_json_t t = *j;
        uint8_t c = (uint8_t)b;
        first[b] = mdl_json_feed(&t, &c, 1);
    }
    const bool in_string = j->st == J_STR;
    for (int t = 0; t < v->n_vocab; t++) {
        const uint32_t n = v->len[t];
        mdl_json_t s = *j;
        if ((in_string && v->plain[t]) ||
            (n > 0 && first[v->text[v->off[t]]] && mdl_json_feed(&s, v->text + v->off[t], n)))
            allowed++;
        else
            logits[t] = -INFINITY;
    }
    return allowed;
}
