// Fuzz target: bytes from a socket through the OpenAI front's HTTP reader, each request's body
// through the chat and completion parsers, and what parses back out through the answers.
// The first byte picks the mode: 0 = an HTTP stream (the next byte sets the chunk size), 1 =
// a chat body, 2 = a completion body, 3 = token bytes through both logprobs forms (the answer
// must stay valid UTF-8 whatever bytes the tokens hold), 4 = a model's answer read for tool
// calls.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "openai_int.h"

static void body(oai_kind_t kind, const char *data, size_t len)
{
    oai_request_t r;
    char err[256];
    if (oai_request_parse(&r, kind, data, len, err, sizeof(err)) == 0) {
        const char *text = r.msg.input_case == FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT
                               ? r.msg.prompt
                           : r.msg.input_case == FERRY__V1__GENERATE_REQUEST__INPUT_CHAT
                               ? r.msg.chat->messages[0]->content
                               : "";
        if (r.n < 1 || r.n > OAI_MAX_N || r.n_prompts < 1 || r.n_prompts > OAI_MAX_PROMPTS ||
            r.n_choices != r.n * r.n_prompts || r.n_choices > OAI_MAX_CHOICES)
            abort();
        oai_choice_out_t out[OAI_MAX_N];
        for (uint32_t i = 0; i < r.n; i++)
            out[i] = (oai_choice_out_t){text, strlen(text) / (i + 1),
                                        FERRY__V1__FINISH_REASON__FINISH_REASON_STOP, NULL, NULL};
        char *a = oai_render_completion(kind, "id", 1, r.model ? r.model : "m", out, r.n, NULL);
        char *b = oai_render_chunk(kind, "id", 1, "m", r.n - 1, NULL, text, strlen(text), NULL,
                                   NULL, true);
        if (a == NULL || b == NULL)
            abort(); // rendering may not fail on parsed input
        free(a);
        free(b);
        const Ferry__V1__SamplingParams *sp = r.msg.sampling;
        if (sp->n_logit_bias > OAI_MAX_LOGIT_BIAS || !(fabsf(sp->presence_penalty) <= 2) ||
            !(fabsf(sp->frequency_penalty) <= 2))
            abort(); // the parser's own limits
        for (size_t i = 0; i < sp->n_logit_bias; i++)
            if (!(fabsf(sp->logit_bias[i]->bias) <= 100))
                abort();
        size_t n = protobuf_c_message_get_packed_size(&r.msg.base);
        uint8_t *buf = malloc(n ? n : 1);
        protobuf_c_message_pack(&r.msg.base, buf);
        free(buf);
    } else if (err[0] == '\0') {
        abort(); // every refusal says why
    }
    oai_request_clear(&r);
}

/* Whether s is valid UTF-8 (no overlong forms, surrogates or code points past U+10FFFF). */
static int utf8_ok(const unsigned char *s)
{
    while (*s) {
        unsigned char b = *s;
        int len = b < 0x80                 ? 1
                  : b >= 0xc2 && b <= 0xdf ? 2
                  : b >= 0xe0 && b <= 0xef ? 3
                  : b >= 0xf0 && b <= 0xf4 ? 4
                                           : 0;
        if (len == 0)
            return 0;
        for (int k = 1; k < len; k++)
            if ((s[k] & 0xc0) != 0x80)
                return 0;
        if ((b == 0xe0 && s[1] < 0xa0) || (b == 0xed && s[1] >= 0xa0) ||
            (b == 0xf0 && s[1] < 0x90) || (b == 0xf4 && s[1] >= 0x90))
            return 0;
        s += len;
    }
    return 1;
}

/* Token bytes from data: each token takes 1 + (its first byte % 6) bytes; every token has the
 * next two as alternatives. */
static void logprobs(const uint8_t *data, size_t size)
{
    Ferry__V1__TokenLogprob ent[64], *ep[64];
    Ferry__V1__TopLogprob top[64], *tp[64];
    size_t n = 0;
    for (size_t off = 0; off < size && n < 64;) {
        size_t len = 1 + data[off] % 6;
        len = len < size - off ? len : size - off;
        ferry__v1__token_logprob__init(&ent[n]);
        ent[n].token_id = (uint32_t)n;
        ent[n].logprob = n % 5 == 4 ? __builtin_nanf("") : -(float)n / 3;
        ent[n].token.data = (uint8_t *)data + off;
        ent[n].token.len = len;
        ferry__v1__top_logprob__init(&top[n]);
        top[n].token = ent[n].token;
        top[n].logprob = -1;
        tp[n] = &top[n];
        ep[n] = &ent[n];
        off += len;
        n++;
    }
    for (size_t i = 0; i < n; i++) {
        ent[i].top = &tp[i];
        ent[i].n_top = i + 1 < n ? 2 : 1;
    }
    for (int k = 0; k < 2; k++) {
        oai_kind_t kind = k ? OAI_CHAT : OAI_COMPLETION;
        cJSON *lp = oai_logprobs_new(kind);
        size_t offset = 0;
        if (lp == NULL || !oai_logprobs_add(lp, kind, ep, n, &offset))
            abort();
        char *chunk = oai_render_chunk(kind, "id", 1, "m", 0, NULL, "", 0, lp, NULL, false);
        oai_choice_out_t one = {"", 0, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP, lp, NULL};
        char *whole = oai_render_completion(kind, "id", 1, "m", &one, 1, NULL);
        if (chunk == NULL || whole == NULL || !utf8_ok((unsigned char *)chunk) ||
            !utf8_ok((unsigned char *)whole))
            abort();
        cJSON *back = cJSON_Parse(whole);
        if (back == NULL)
            abort();
        cJSON_Delete(back);
        free(chunk);
        free(whole);
        cJSON_Delete(lp);
    }
}

/* An answer text[len] to a chat with two tools: the calls read from it name those tools and
 * carry arguments that are JSON objects, the content before them is a prefix of the text, and
 * a stream never sends past it; the answer renders. */
static void tool_answer(const char *text, size_t len)
{
    static const char k_req[] =
        "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":"
        "\"function\",\"function\":{\"name\":\"f\"}},{\"type\":\"function\",\"function\":"
        "{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\"}}}]}";
    oai_request_t r;
    char err[256];
    if (oai_request_parse(&r, OAI_CHAT, k_req, sizeof(k_req) - 1, err, sizeof(err)) != 0)
        abort();
    size_t content = 0;
    cJSON *calls = oai_tools_extract(&r, text, len, "call_", &content);
    const size_t sure = oai_tools_streamable(&r, text, len);
    const char *tag = strstr(text, "<tool_call>"); // a stream stops before any call
    if (content > len || sure > len ||
        (calls != NULL && sure > (tag != NULL ? (size_t)(tag - text) : 0)))
        abort();
    const cJSON *c;
    cJSON_ArrayForEach(c, calls)
    {
        const cJSON *name = cJSON_GetObjectItem(cJSON_GetObjectItem(c, "function"), "name");
        const cJSON *args = cJSON_GetObjectItem(cJSON_GetObjectItem(c, "function"), "arguments");
        cJSON *parsed = cJSON_IsString(args) ? cJSON_Parse(args->valuestring) : NULL;
        if (!cJSON_IsString(name) ||
            (strcmp(name->valuestring, "f") != 0 &&
             strcmp(name->valuestring, "get_weather") != 0) ||
            !cJSON_IsObject(parsed))
            abort();
        cJSON_Delete(parsed);
    }
    oai_choice_out_t out = {text, content, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP, NULL,
                            calls};
    char *a = oai_render_completion(OAI_CHAT, "id", 1, "m", &out, 1, NULL);
    char *b = calls != NULL ? oai_render_tool_chunk("id", 1, "m", 0, calls, true) : strdup("");
    if (a == NULL || b == NULL)
        abort();
    free(a);
    free(b);
    cJSON_Delete(calls);
    oai_request_clear(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    uint8_t mode = data[0] % 5;
    if (mode == 3) {
        logprobs(data + 1, size - 1);
        return 0;
    }
    if (mode == 4) {
        char *copy = malloc(size);
        memcpy(copy, data + 1, size - 1);
        copy[size - 1] = '\0';
        tool_answer(copy, strlen(copy));
        free(copy);
        return 0;
    }
    if (mode != 0) {
        char *copy = malloc(size);
        memcpy(copy, data + 1, size - 1);
        copy[size - 1] = '\0';
        body(mode == 1 ? OAI_CHAT : OAI_COMPLETION, copy, size - 1);
        free(copy);
        return 0;
    }
    size_t step = (size_t)data[1] + 1, off = 2;
    oai_reader_t r;
    oai_reader_init(&r, 1 << 16);
    while (off < size && !r.error) {
        size_t used = oai_reader_feed(&r, (const char *)data + off, FY_MIN(step, size - off));
        off += used;
        if (r.complete) {
            if (r.body_len > r.max_body || r.body[r.body_len] != '\0')
                abort();
            size_t n;
            const char *p = oai_reader_path(&r, &n);
            char id[OAI_MAX_TARGET + 1];
            memcpy(id, p, n);
            if (oai_percent_decode(id, n) > n)
                abort();
            body(n > 8 && memcmp(p, "/v1/chat", 8) == 0 ? OAI_CHAT : OAI_COMPLETION, r.body,
                 r.body_len);
            oai_reader_next(&r);
        } else if (used == 0) {
            break;
        }
    }
    oai_reader_cleanup(&r);
    return 0;
}
