/*
 * render.c: the OpenAI front's JSON answers (see openai_int.h), built with cJSON so that every
 * string, generated text included, is escaped.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "openai_int.h"

static int hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

const char *oai_finish_name(Ferry__V1__FinishReason reason)
{
    return reason == FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH ? "length" : "stop";
}

/* A string of n bytes (not NUL-terminated) as a JSON value. */
static cJSON *string_n(const char *s, size_t n)
{
    char *tmp = malloc(n + 1);
    if (tmp == NULL)
        return NULL;
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    cJSON *v = cJSON_CreateString(tmp);
    free(tmp);
    return v;
}

static char *print_and_free(cJSON *root, bool ok)
{
    char *out = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return out;
}

/* id, object, created, model: the head of every completion object. */
static cJSON *head(const char *id, const char *object, int64_t created, const char *model, bool *ok)
{
    cJSON *root = cJSON_CreateObject();
    *ok = root != NULL && cJSON_AddStringToObject(root, "id", id) &&
          cJSON_AddStringToObject(root, "object", object) &&
          cJSON_AddNumberToObject(root, "created", (double)created) &&
          cJSON_AddStringToObject(root, "model", model ? model : "");
    return root;
}

static bool add_usage(cJSON *root, const Ferry__V1__RequestStats *st)
{
    cJSON *u = cJSON_AddObjectToObject(root, "usage");
    uint32_t p = st ? st->prompt_tokens : 0, c = st ? st->completion_tokens : 0;
    bool ok = u != NULL && cJSON_AddNumberToObject(u, "prompt_tokens", p) &&
              cJSON_AddNumberToObject(u, "completion_tokens", c) &&
              cJSON_AddNumberToObject(u, "total_tokens", (double)p + c);
    if (!ok || st == NULL)
        return ok;
    // Ferry's own figures: what the KV cache cost on the wire and how fast the answer came.
    cJSON *f = cJSON_AddObjectToObject(root, "ferry");
    return f != NULL && cJSON_AddNumberToObject(f, "kv_raw_bytes", (double)st->kv_raw_bytes) &&
           cJSON_AddNumberToObject(f, "kv_wire_bytes", (double)st->kv_wire_bytes) &&
           cJSON_AddStringToObject(f, "kv_policy", st->policy ? st->policy : "") &&
           cJSON_AddNumberToObject(f, "kv_budget", st->budget) &&
           cJSON_AddNumberToObject(f, "ttft_ms", st->ttft_ms) &&
           cJSON_AddNumberToObject(f, "tpot_ms", st->tpot_ms) &&
           cJSON_AddNumberToObject(f, "transfer_ms", st->transfer_ms);
}

static const char *object_name(oai_kind_t kind, bool chunk)
{
    if (kind == OAI_CHAT)
        return chunk ? "chat.completion.chunk" : "chat.completion";
    return "text_completion";
}

/* A token's bytes as a JSON string: a byte that is not part of a valid UTF-8 character (a
 * token may hold part of one) becomes U+FFFD. */
size_t oai_utf8_sanitize(const uint8_t *s, size_t n, char *out)
{
    char *o = out;
    for (size_t i = 0; i < n;) {
        const uint8_t b = s[i];
        size_t len = b < 0x80                 ? 1
                     : b >= 0xc2 && b <= 0xdf ? 2
                     : b >= 0xe0 && b <= 0xef ? 3
                     : b >= 0xf0 && b <= 0xf4 ? 4
                                              : 0;
        bool ok = len > 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++)
            ok = (s[i + k] & 0xc0) == 0x80;
        if (ok && len == 3) // no overlong forms, no surrogates
            ok = !(b == 0xe0 && s[i + 1] < 0xa0) && !(b == 0xed && s[i + 1] >= 0xa0);
        if (ok && len == 4) // no overlong forms, nothing past U+10FFFF
            ok = !(b == 0xf0 && s[i + 1] < 0x90) && !(b == 0xf4 && s[i + 1] >= 0x90);
        if (ok && b != 0) {
            memcpy(o, s + i, len);
            o += len;
            i += len;
        } else {
            memcpy(o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    *o = '\0';
    return (size_t)(o - out);
}

static cJSON *token_string(const uint8_t *s, size_t n)
{
    char *out = malloc(3 * n + 1);
    if (out == NULL)
        return NULL;
    oai_utf8_sanitize(s, n, out);
    cJSON *v = cJSON_CreateString(out);
    free(out);
    return v;
}

/* A JSON number for a log-probability; null for one a worker did not send (NAN). */
static cJSON *logprob_value(float lp)
{
    return lp == lp ? cJSON_CreateNumber(lp) : cJSON_CreateNull();
}

/* Chat's form of one token: token, logprob, bytes (and top_logprobs for the chosen ones). */
static cJSON *chat_token(const uint8_t *bytes, size_t n, float lp)
{
    cJSON *t = cJSON_CreateObject(), *b = cJSON_CreateArray(), *s = token_string(bytes, n);
    bool ok = t != NULL && b != NULL && s != NULL && cJSON_AddItemToObject(t, "token", s);
    if (!ok)
        cJSON_Delete(s);
    cJSON *v = ok ? logprob_value(lp) : NULL;
    ok = ok && v != NULL && cJSON_AddItemToObject(t, "logprob", v);
    for (size_t i = 0; ok && i < n; i++) {
        cJSON *x = cJSON_CreateNumber(bytes[i]);
        ok = x != NULL && cJSON_AddItemToArray(b, x);
    }
    if (ok && cJSON_AddItemToObject(t, "bytes", b))
        return t;
    cJSON_Delete(b);
    cJSON_Delete(t);
    return NULL;
}

cJSON *oai_logprobs_new(oai_kind_t kind)
{
    cJSON *lp = cJSON_CreateObject();
    bool ok = lp != NULL;
    if (kind == OAI_CHAT)
        ok = ok && cJSON_AddArrayToObject(lp, "content") && cJSON_AddNullToObject(lp, "refusal");
    else
        ok = ok && cJSON_AddArrayToObject(lp, "tokens") &&
             cJSON_AddArrayToObject(lp, "token_logprobs") &&
             cJSON_AddArrayToObject(lp, "top_logprobs") &&
             cJSON_AddArrayToObject(lp, "text_offset");
    if (ok)
        return lp;
    cJSON_Delete(lp);
    return NULL;
}

bool oai_logprobs_add(cJSON *lp, oai_kind_t kind, Ferry__V1__TokenLogprob *const *e, size_t n,
                      size_t *offset)
{
    for (size_t i = 0; i < n; i++) {
        if (e[i] == NULL)
            continue;
        const uint8_t *bytes = e[i]->token.data ? e[i]->token.data : (const uint8_t *)"";
        if (kind == OAI_CHAT) {
            cJSON *t = chat_token(bytes, e[i]->token.len, e[i]->logprob);
            cJSON *top = t ? cJSON_AddArrayToObject(t, "top_logprobs") : NULL;
            bool ok = top != NULL && cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "content"), t);
            if (!ok) {
                cJSON_Delete(t);
                return false;
            }
            for (size_t k = 0; k < e[i]->n_top; k++) {
                const Ferry__V1__TopLogprob *a = e[i]->top[k];
                cJSON *x = a ? chat_token(a->token.data ? a->token.data : (const uint8_t *)"",
                                          a->token.len, a->logprob)
                             : NULL;
                if (a != NULL && (x == NULL || !cJSON_AddItemToArray(top, x))) {
                    cJSON_Delete(x);
                    return false;
                }
            }
            continue;
        }
        // Completions: parallel arrays, the alternatives as {token: logprob}, byte offsets.
        static const char *const keys[4] = {"tokens", "token_logprobs", "top_logprobs",
                                            "text_offset"};
        // (an echoed prompt's first token has no log-probability: null, null)
        cJSON *items[4] = {token_string(bytes, e[i]->token.len), logprob_value(e[i]->logprob),
                           e[i]->logprob == e[i]->logprob ? cJSON_CreateObject()
                                                          : cJSON_CreateNull(),
                           cJSON_CreateNumber((double)*offset)};
        bool ok = true;
        for (int k = 0; k < 4; k++) {
            if (ok && items[k] != NULL &&
                cJSON_AddItemToArray(cJSON_GetObjectItem(lp, keys[k]), items[k]))
                continue;
            ok = false; // the items not attached are freed here, the rest go with lp
            cJSON_Delete(items[k]);
        }
        if (!ok)
            return false;
        cJSON *top = items[2];
        *offset += e[i]->token.len;
        for (size_t k = 0; k < e[i]->n_top && cJSON_IsObject(top); k++) {
            const Ferry__V1__TopLogprob *a = e[i]->top[k];
            if (a == NULL)
                continue;
            cJSON *key =
                token_string(a->token.data ? a->token.data : (const uint8_t *)"", a->token.len);
            cJSON *x = logprob_value(a->logprob);
            bool added = key && x && cJSON_AddItemToObject(top, key->valuestring, x);
            cJSON_Delete(key);
            if (!added) {
                cJSON_Delete(x);
                return false;
            }
        }
    }
    return true;
}

/* A choice's "logprobs": a copy of lp, or null. */
static bool add_logprobs(cJSON *choice, const cJSON *lp)
{
    if (lp == NULL)
        return cJSON_AddNullToObject(choice, "logprobs") != NULL;
    cJSON *copy = cJSON_Duplicate(lp, true);
    if (copy != NULL && cJSON_AddItemToObject(choice, "logprobs", copy))
        return true;
    cJSON_Delete(copy);
    return false;
}

/* One choice of a whole completion, appended to choices. */
static bool add_choice(oai_kind_t kind, cJSON *choices, uint32_t index, const oai_choice_out_t *ch)
{
    cJSON *c = cJSON_CreateObject();
    bool ok =
        c != NULL && cJSON_AddItemToArray(choices, c) && cJSON_AddNumberToObject(c, "index", index);
    // With tool calls and no text before them, the content is null.
    cJSON *t = !ok ? NULL
               : ch->tool_calls != NULL && ch->text_len == 0
                   ? cJSON_CreateNull()
                   : string_n(ch->text ? ch->text : "", ch->text_len);
    if (kind == OAI_CHAT) {
        cJSON *m = ok ? cJSON_AddObjectToObject(c, "message") : NULL;
        ok = m != NULL && t != NULL && cJSON_AddStringToObject(m, "role", "assistant") &&
             cJSON_AddItemToObject(m, "content", t);
        cJSON *calls = ok && ch->tool_calls != NULL ? cJSON_Duplicate(ch->tool_calls, true) : NULL;
        if (ok && ch->tool_calls != NULL &&
            !(calls && cJSON_AddItemToObject(m, "tool_calls", calls))) {
            cJSON_Delete(calls);
            return false;
        }
    } else {
        ok = ok && t != NULL && cJSON_AddItemToObject(c, "text", t);
    }
    if (!ok)
        cJSON_Delete(t); // not attached (attached items go with their parent)
    return ok && add_logprobs(c, ch->logprobs) &&
           cJSON_AddStringToObject(c, "finish_reason",
                                   ch->tool_calls != NULL ? "tool_calls"
                                                          : oai_finish_name(ch->finish));
}

char *oai_render_completion(oai_kind_t kind, const char *id, int64_t created, const char *model,
                            const oai_choice_out_t *choices, uint32_t n,
                            const Ferry__V1__RequestStats *stats)
{
    bool ok;
    cJSON *root = head(id, object_name(kind, false), created, model, &ok);
    cJSON *arr = ok ? cJSON_AddArrayToObject(root, "choices") : NULL;
    ok = arr != NULL;
    for (uint32_t i = 0; ok && i < n; i++)
        ok = add_choice(kind, arr, i, &choices[i]);
    ok = ok && add_usage(root, stats);
    return print_and_free(root, ok);
}

/* A stream chunk's object with one choice of that index: the root (NULL without memory), the
 * choice in *c_p (NULL if it could not be added). */
static cJSON *chunk_head(oai_kind_t kind, const char *id, int64_t created, const char *model,
                         uint32_t index, cJSON **c_p)
{
    bool ok;
    cJSON *root = head(id, object_name(kind, true), created, model, &ok);
    cJSON *choices = ok ? cJSON_AddArrayToObject(root, "choices") : NULL;
    cJSON *c = choices ? cJSON_CreateObject() : NULL;
    ok = c != NULL && cJSON_AddItemToArray(choices, c);
    if (c != NULL && !ok)
        cJSON_Delete(c);
    *c_p = ok && cJSON_AddNumberToObject(c, "index", index) ? c : NULL;
    return root;
}

char *oai_render_chunk(oai_kind_t kind, const char *id, int64_t created, const char *model,
                       uint32_t index, const char *role, const char *text, size_t text_len,
                       const cJSON *logprobs, const char *finish, bool with_usage)
{
    cJSON *c;
    cJSON *root = chunk_head(kind, id, created, model, index, &c);
    bool ok = c != NULL;
    cJSON *t =
        ok && (kind != OAI_CHAT || text_len > 0 || role != NULL) ? string_n(text, text_len) : NULL;
    if (kind == OAI_CHAT) {
        cJSON *d = ok ? cJSON_AddObjectToObject(c, "delta") : NULL;
        ok = d != NULL && (role == NULL || cJSON_AddStringToObject(d, "role", role));
        if (ok && t != NULL)
            ok = cJSON_AddItemToObject(d, "content", t);
        else
            cJSON_Delete(t);
    } else {
        ok = ok && t != NULL && cJSON_AddItemToObject(c, "text", t);
        if (!ok)
            cJSON_Delete(t);
    }
    ok = ok && add_logprobs(c, logprobs) &&
         (finish ? cJSON_AddStringToObject(c, "finish_reason", finish) != NULL
                 : cJSON_AddNullToObject(c, "finish_reason") != NULL) &&
         (!with_usage || cJSON_AddNullToObject(root, "usage"));
    return print_and_free(root, ok);
}

char *oai_render_tool_chunk(const char *id, int64_t created, const char *model, uint32_t index,
                            const cJSON *tool_calls, bool with_usage)
{
    cJSON *c;
    cJSON *root = chunk_head(OAI_CHAT, id, created, model, index, &c);
    cJSON *d = c != NULL ? cJSON_AddObjectToObject(c, "delta") : NULL;
    bool ok;
    cJSON *calls = d != NULL ? cJSON_AddArrayToObject(d, "tool_calls") : NULL;
    ok = calls != NULL;
    int k = 0;
    const cJSON *call;
    cJSON_ArrayForEach(call, tool_calls)
    {
        cJSON *e = ok ? cJSON_CreateObject() : NULL; // {"index": k, the call's fields}
        if (e == NULL || !cJSON_AddItemToArray(calls, e)) {
            cJSON_Delete(e);
            ok = false;
            break;
        }
        ok = cJSON_AddNumberToObject(e, "index", k++) != NULL;
        for (const cJSON *f = call->child; f != NULL && ok; f = f->next) {
            cJSON *x = cJSON_Duplicate(f, true);
            ok = x != NULL && cJSON_AddItemToObject(e, f->string, x);
            if (!ok)
                cJSON_Delete(x);
        }
    }
    ok = ok && add_logprobs(c, NULL) && cJSON_AddNullToObject(c, "finish_reason") &&
         (!with_usage || cJSON_AddNullToObject(root, "usage"));
    return print_and_free(root, ok);
}

char *oai_render_usage_chunk(oai_kind_t kind, const char *id, int64_t created, const char *model,
                             const Ferry__V1__RequestStats *stats)
{
    bool ok;
    cJSON *root = head(id, object_name(kind, true), created, model, &ok);
    ok = ok && cJSON_AddArrayToObject(root, "choices") && add_usage(root, stats);
    return print_and_free(root, ok);
}

static bool add_model_fields(cJSON *m, const Ferry__V1__ModelInfo *mi)
{
    return cJSON_AddStringToObject(m, "id", mi->name ? mi->name : "") &&
           cJSON_AddStringToObject(m, "object", "model") &&
           cJSON_AddNumberToObject(m, "created", 0) &&
           cJSON_AddStringToObject(m, "owned_by", "ferry") &&
           cJSON_AddNumberToObject(m, "max_model_len", mi->context_length);
}

char *oai_render_models(const Ferry__V1__ListModelsResponse *models)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *data = root ? cJSON_AddArrayToObject(root, "data") : NULL;
    bool ok = data != NULL && cJSON_AddStringToObject(root, "object", "list");
    for (size_t i = 0; ok && i < models->n_models; i++) {
        cJSON *m = cJSON_CreateObject();
        ok = m != NULL && cJSON_AddItemToArray(data, m) && add_model_fields(m, models->models[i]);
    }
    return print_and_free(root, ok);
}

char *oai_render_model(const Ferry__V1__ModelInfo *model)
{
    cJSON *root = cJSON_CreateObject();
    return print_and_free(root, root != NULL && add_model_fields(root, model));
}

size_t oai_percent_decode(char *s, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int hi, lo;
        if (s[i] == '%' && i + 2 < n && (hi = hex_digit(s[i + 1])) >= 0 &&
            (lo = hex_digit(s[i + 2])) >= 0) {
            s[o++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            s[o++] = s[i];
        }
    }
    s[o] = '\0';
    return o;
}

char *oai_render_error(int http_status, const char *message)
{
    const char *type = http_status == 400 || http_status == 404 || http_status == 405 ||
                               http_status == 413 || http_status == 414 || http_status == 431 ||
                               http_status == 505
                           ? "invalid_request_error"
                       : http_status == 401 ? "authentication_error"
                       : http_status == 429 ? "rate_limit_error"
                       : http_status == 503 ? "service_unavailable"
                                            : "server_error";
    cJSON *root = cJSON_CreateObject();
    cJSON *e = root ? cJSON_AddObjectToObject(root, "error") : NULL;
    bool ok = e != NULL && cJSON_AddStringToObject(e, "message", message ? message : "") &&
              cJSON_AddStringToObject(e, "type", type) && cJSON_AddNullToObject(e, "param") &&
              cJSON_AddNumberToObject(e, "code", http_status);
    return print_and_free(root, ok);
}

int oai_http_status(int grpc_code)
{
    switch (grpc_code) {
    case 0:
        return 200;
    case 1: // CANCELLED
        return 499;
    case 3:  // INVALID_ARGUMENT
    case 9:  // FAILED_PRECONDITION
    case 11: // OUT_OF_RANGE
        return 400;
    case 4: // DEADLINE_EXCEEDED
        return 504;
    case 5: // NOT_FOUND
        return 404;
    case 7: // PERMISSION_DENIED
        return 403;
    case 8: // RESOURCE_EXHAUSTED
        return 429;
    case 12: // UNIMPLEMENTED
        return 501;
    case 14: // UNAVAILABLE
        return 503;
    case 16: // UNAUTHENTICATED
        return 401;
    default:
        return 500;
    }
}

const char *oai_status_text(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 499:
        return "Client Closed Request";
    case 501:
        return "Not Implemented";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Internal Server Error";
    }
}
