/*
 * request.c: an OpenAI request body (chat or completion) to a ferry.v1 GenerateRequest.
 *
 * Field by field, as OpenAI documents them and vLLM extends them:
 *   model                      GenerateRequest.model (the router checks the name)
 *   messages (chat)            ChatMessages: role system|developer|user|assistant, content a
 *                              string, null, or an array of {"type":"text","text":...} parts
 *   prompt (completion)        a string or [token ids]; or a batch of up to 64: [string, ...]
 *                              or [[token ids], ...], each prompt with its own n choices
 *   max_tokens, max_completion_tokens, temperature, top_p, seed, stop, ignore_eos,
 *   top_k (-1 or 0 = off), repetition_penalty, stop_token_ids      SamplingParams
 *   stream, stream_options.include_usage           how the answer is sent
 *   kv_policy, kv_budget       CodecParams (Ferry's own)
 *   n (1..16)                  that many Generate calls (seed + i for choice i when seeded)
 *   logprobs, top_logprobs (chat: a boolean and 0..20; completions: logprobs 0..20)
 *                              SamplingParams.logprobs, top_logprobs
 *   presence_penalty, frequency_penalty, logit_bias   SamplingParams (OpenAI's meanings)
 *   response_format            json_object: SamplingParams.json_object (JSON mode);
 *                              json_schema: its "schema" as SamplingParams.json_schema (the
 *                              router refuses what it cannot follow); text
 *   guided_json (vLLM's)       a schema, as with response_format json_schema
 *   echo (completions)         the prompt before the completion, with its log-probabilities
 *                              (SamplingParams.prompt_logprobs) when logprobs is given
 *   tools, tool_choice, parallel_tool_calls (chat)   tools.c: the tools in the system prompt,
 *                              the calls read back from the answer (or guided by a schema)
 * Refused with 400, because Ferry would silently do something else: best_of > 1, echo in chat,
 * suffix, the legacy functions and function_call. Other fields are ignored (as
 * "user" is by every server).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "openai_int.h"

int oai_bad(char *err, size_t err_len, const char *fmt, const char *field)
{
    snprintf(err, err_len, fmt, field);
    return 400;
}

const cJSON *oai_member(const cJSON *obj, const char *name)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(obj, name);
    return m == NULL || cJSON_IsNull(m) ? NULL : m;
}

static bool is_number(const cJSON *v)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble);
}

static bool is_integer(const cJSON *v, double lo, double hi)
{
    return is_number(v) && v->valuedouble == floor(v->valuedouble) && v->valuedouble >= lo &&
           v->valuedouble <= hi;
}

/* An array of token ids (integers in [0, 2^32)) into *ids_p (malloc'd, even when refused). */
static int token_ids(const cJSON *arr, const char *field, uint32_t **ids_p, char *err,
                     size_t err_len)
{
    size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
    uint32_t *ids = *ids_p = malloc(FY_MAX(n, (size_t)1) * sizeof(*ids));
    if (ids == NULL)
        return oai_bad(err, err_len, "out of memory reading '%s'", field);
    const cJSON *t;
    cJSON_ArrayForEach(t, arr)
    {
        if (!is_integer(t, 0, UINT32_MAX))
            return oai_bad(err, err_len, "'%s' token ids must be integers >= 0", field);
        ids[i++] = (uint32_t)t->valuedouble;
    }
    return 0;
}

static int parse_stop(oai_request_t *r, const cJSON *stop, char *err, size_t err_len)
{
    size_t n = 0;
    if (cJSON_IsString(stop)) {
        r->stop[n++] = stop->valuestring;
    } else if (cJSON_IsArray(stop)) {
        const cJSON *s;
        cJSON_ArrayForEach(s, stop)
        {
            if (!cJSON_IsString(s))
                return oai_bad(err, err_len, "'%s' must be a string or an array of strings",
                               "stop");
            if (n == OAI_MAX_STOP) {
                snprintf(err, err_len, "'stop' has more than %d strings", OAI_MAX_STOP);
                return 400;
            }
            r->stop[n++] = s->valuestring;
        }
    } else {
        return oai_bad(err, err_len, "'%s' must be a string or an array of strings", "stop");
    }
    for (size_t i = 0; i < n; i++)
        if (r->stop[i][0] == '\0')
            return oai_bad(err, err_len, "'%s' strings must not be empty", "stop");
    r->sampling.n_stop = n;
    r->sampling.stop = r->stop;
    return 0;
}

/* "logit_bias": {"TOKEN_ID": BIAS, ...}, ids as decimal strings, biases in [-100, 100], at most
 * OAI_MAX_LOGIT_BIAS of them (the router checks the ids against the vocabulary). */
static int parse_logit_bias(oai_request_t *r, const cJSON *obj, char *err, size_t err_len)
{
    if (!cJSON_IsObject(obj))
        return oai_bad(err, err_len, "'%s' must be an object of token ids and biases",
                       "logit_bias");
    int n = cJSON_GetArraySize(obj);
    if (n == 0)
        return 0;
    if (n > OAI_MAX_LOGIT_BIAS) {
        snprintf(err, err_len, "'logit_bias' has more than %d tokens", OAI_MAX_LOGIT_BIAS);
        return 400;
    }
    r->bias = calloc((size_t)n, sizeof(*r->bias));
    r->bias_p = calloc((size_t)n, sizeof(*r->bias_p));
    if (r->bias == NULL || r->bias_p == NULL)
        return oai_bad(err, err_len, "out of memory reading '%s'", "logit_bias");
    size_t i = 0;
    const cJSON *b;
    cJSON_ArrayForEach(b, obj)
    {
        const char *k = b->string;
        char *end = NULL;
        errno = 0;
        unsigned long id = k != NULL && k[0] >= '0' && k[0] <= '9' ? strtoul(k, &end, 10) : 0;
        if (end == NULL || *end != '\0' || errno != 0 || id > UINT32_MAX)
            return oai_bad(err, err_len, "'%s' keys must be token ids (decimal)", "logit_bias");
        if (!is_number(b) || fabs(b->valuedouble) > 100)
            return oai_bad(err, err_len, "'%s' biases must be numbers in [-100, 100]",
                           "logit_bias");
        ferry__v1__logit_bias__init(&r->bias[i]);
        r->bias[i].token_id = (uint32_t)id;
        r->bias[i].bias = (float)b->valuedouble;
        r->bias_p[i] = &r->bias[i];
        i++;
    }
    r->sampling.logit_bias = r->bias_p;
    r->sampling.n_logit_bias = i;
    return 0;
}

/* Sampling and codec fields shared by both kinds. */
static int parse_common(oai_request_t *r, const cJSON *root, char *err, size_t err_len)
{
    const cJSON *v;
    static const char *const k_refused[] = {"functions", "function_call", "suffix"};
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_refused); i++)
        if ((v = oai_member(root, k_refused[i])) != NULL &&
            !(cJSON_IsArray(v) && cJSON_GetArraySize(v) == 0))
            return oai_bad(err, err_len, "'%s' is not supported (chat's 'tools' are)",
                           k_refused[i]);
    if (r->kind == OAI_COMPLETION && (v = oai_member(root, "tools")) != NULL &&
        !(cJSON_IsArray(v) && cJSON_GetArraySize(v) == 0))
        return oai_bad(err, err_len, "'%s' are for chat completions", "tools");

    if ((v = oai_member(root, "model")) != NULL) {
        if (!cJSON_IsString(v))
            return oai_bad(err, err_len, "'%s' must be a string", "model");
        r->model = v->valuestring;
        r->msg.model = v->valuestring;
    }
    uint32_t max_tokens = 0;
    const char *mt_name =
        oai_member(root, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if ((v = oai_member(root, mt_name)) != NULL) {
        if (!is_integer(v, 1, 1 << 20))
            return oai_bad(err, err_len, "'%s' must be an integer in [1, 1048576]", mt_name);
        max_tokens = (uint32_t)v->valuedouble;
    }
    r->sampling.max_tokens = max_tokens;

    // OpenAI's default temperature is 1 (sampling), not Ferry's server default.
    r->sampling.temperature = 1.0f;
    if ((v = oai_member(root, "temperature")) != NULL) {
        if (!is_number(v) || v->valuedouble < 0 || v->valuedouble > 2)
            return oai_bad(err, err_len, "'%s' must be a number in [0, 2]", "temperature");
        r->sampling.temperature = (float)v->valuedouble;
    }
    if ((v = oai_member(root, "top_p")) != NULL) {
        if (!is_number(v) || v->valuedouble <= 0 || v->valuedouble > 1)
            return oai_bad(err, err_len, "'%s' must be a number in (0, 1]", "top_p");
        r->sampling.top_p = (float)v->valuedouble;
    }
    if ((v = oai_member(root, "top_k")) != NULL) {
        if (!is_integer(v, -1, 1 << 20))
            return oai_bad(err, err_len, "'%s' must be an integer >= -1 (-1 or 0: off)", "top_k");
        r->sampling.top_k = v->valuedouble > 0 ? (uint32_t)v->valuedouble : 0;
    }
    if ((v = oai_member(root, "repetition_penalty")) != NULL) {
        if (!is_number(v) || v->valuedouble <= 0 || v->valuedouble > 10)
            return oai_bad(err, err_len, "'%s' must be a number in (0, 10]", "repetition_penalty");
        r->sampling.repetition_penalty = (float)v->valuedouble;
    }
    static const char *const k_penalties[] = {"presence_penalty", "frequency_penalty"};
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_penalties); i++)
        if ((v = oai_member(root, k_penalties[i])) != NULL) {
            if (!is_number(v) || fabs(v->valuedouble) > 2)
                return oai_bad(err, err_len, "'%s' must be a number in [-2, 2]", k_penalties[i]);
            *(i == 0 ? &r->sampling.presence_penalty : &r->sampling.frequency_penalty) =
                (float)v->valuedouble;
        }
    if ((v = oai_member(root, "logit_bias")) != NULL && !cJSON_IsNull(v)) {
        int rc = parse_logit_bias(r, v, err, err_len);
        if (rc)
            return rc;
    }
    if ((v = oai_member(root, "seed")) != NULL) {
        if (!is_integer(v, -9.2e18, 1.8e19))
            return oai_bad(err, err_len, "'%s' must be an integer", "seed");
        r->sampling.seed =
            v->valuedouble < 0 ? (uint64_t)(int64_t)v->valuedouble : (uint64_t)v->valuedouble;
        r->has_seed = true;
    }
    if ((v = oai_member(root, "stop")) != NULL) {
        int rc = parse_stop(r, v, err, err_len);
        if (rc)
            return rc;
    }
    if ((v = oai_member(root, "stop_token_ids")) != NULL) {
        if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > 1024)
            return oai_bad(err, err_len, "'%s' must be an array of at most 1024 token ids",
                           "stop_token_ids");
        int rc = token_ids(v, "stop_token_ids", &r->stop_ids, err, err_len);
        if (rc)
            return rc;
        r->sampling.n_stop_token_ids = (size_t)cJSON_GetArraySize(v);
        r->sampling.stop_token_ids = r->stop_ids;
    }
    if ((v = oai_member(root, "ignore_eos")) != NULL) {
        if (!cJSON_IsBool(v))
            return oai_bad(err, err_len, "'%s' must be true or false", "ignore_eos");
        r->sampling.ignore_eos = cJSON_IsTrue(v);
    }
    if ((v = oai_member(root, "n")) != NULL) {
        if (!is_integer(v, 1, OAI_MAX_N)) {
            snprintf(err, err_len, "'n' must be an integer in [1, %d]", OAI_MAX_N);
            return 400;
        }
        r->n = (uint32_t)v->valuedouble;
    }
    if ((v = oai_member(root, "best_of")) != NULL && !is_integer(v, 1, 1))
        return oai_bad(err, err_len, "'%s' other than 1 is not supported", "best_of");
    // Log-probabilities: chat's "logprobs": true with "top_logprobs" alternatives (0..20);
    // completions' "logprobs": N alternatives (OpenAI allows up to 5, Ferry 20).
    if (r->kind == OAI_CHAT) {
        if ((v = oai_member(root, "logprobs")) != NULL && !cJSON_IsBool(v))
            return oai_bad(err, err_len, "'%s' must be a boolean", "logprobs");
        r->logprobs = v != NULL && cJSON_IsTrue(v);
        if ((v = oai_member(root, "top_logprobs")) != NULL) {
            if (!is_integer(v, 0, OAI_MAX_TOP_LOGPROBS)) {
                snprintf(err, err_len, "'top_logprobs' must be an integer in [0, %d]",
                         OAI_MAX_TOP_LOGPROBS);
                return 400;
            }
            if (!r->logprobs && v->valuedouble > 0)
                return oai_bad(err, err_len, "'%s' needs \"logprobs\": true", "top_logprobs");
            r->sampling.top_logprobs = (uint32_t)v->valuedouble;
        }
    } else if ((v = oai_member(root, "logprobs")) != NULL) {
        if (!is_integer(v, 0, OAI_MAX_TOP_LOGPROBS)) {
            snprintf(err, err_len, "'logprobs' must be an integer in [0, %d]",
                     OAI_MAX_TOP_LOGPROBS);
            return 400;
        }
        r->logprobs = true;
        r->sampling.top_logprobs = (uint32_t)v->valuedouble;
    }
    r->sampling.logprobs = r->logprobs;
    if ((v = oai_member(root, "echo")) != NULL && !cJSON_IsNull(v)) {
        if (!cJSON_IsBool(v))
            return oai_bad(err, err_len, "'%s' must be true or false", "echo");
        r->echo = cJSON_IsTrue(v);
        if (r->echo && r->kind == OAI_CHAT)
            return oai_bad(err, err_len, "'%s' is for completions", "echo");
    }
    const cJSON *schema = NULL;
    if ((v = oai_member(root, "response_format")) != NULL && !cJSON_IsNull(v)) {
        const cJSON *t = cJSON_IsObject(v) ? oai_member(v, "type") : NULL;
        if (!cJSON_IsString(t) ||
            (strcmp(t->valuestring, "text") != 0 && strcmp(t->valuestring, "json_object") != 0 &&
             strcmp(t->valuestring, "json_schema") != 0))
            return oai_bad(err, err_len,
                           "'%s' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., "
                           "\"schema\": {...}}}",
                           "response_format");
        r->sampling.json_object = strcmp(t->valuestring, "json_object") == 0;
        if (strcmp(t->valuestring, "json_schema") == 0) {
            const cJSON *js = oai_member(v, "json_schema");
            if (!cJSON_IsObject(js))
                return oai_bad(err, err_len, "'%s' must be an object with the schema",
                               "response_format.json_schema");
            schema = oai_member(js, "schema");
            if (schema == NULL) // no schema: any JSON object
                r->sampling.json_object = true;
        }
    }
    // vLLM's guided_json: the schema itself, or its text.
    if ((v = oai_member(root, "guided_json")) != NULL) {
        if (schema != NULL || r->sampling.json_object)
            return oai_bad(err, err_len, "'%s': not with a JSON response_format", "guided_json");
        schema = v;
    }
    if (schema != NULL) {
        if (cJSON_IsString(schema)) {
            if ((r->schema_text = strdup(schema->valuestring)) == NULL)
                return oai_bad(err, err_len, "out of memory reading '%s'", "schema");
        } else if (cJSON_IsObject(schema) || cJSON_IsBool(schema)) {
            if ((r->schema_text = cJSON_PrintUnformatted(schema)) == NULL)
                return oai_bad(err, err_len, "out of memory reading '%s'", "schema");
        } else {
            return oai_bad(err, err_len, "'%s' must be a JSON Schema (an object)", "schema");
        }
        r->sampling.json_schema = r->schema_text;
    }

    if ((v = oai_member(root, "stream")) != NULL) {
        if (!cJSON_IsBool(v))
            return oai_bad(err, err_len, "'%s' must be true or false", "stream");
        r->stream = cJSON_IsTrue(v);
    }
    if ((v = oai_member(root, "stream_options")) != NULL) {
        if (!cJSON_IsObject(v))
            return oai_bad(err, err_len, "'%s' must be an object", "stream_options");
        const cJSON *u = oai_member(v, "include_usage");
        if (u != NULL && !cJSON_IsBool(u))
            return oai_bad(err, err_len, "'%s' must be true or false", "include_usage");
        r->include_usage = cJSON_IsTrue(u);
    }

    if ((v = oai_member(root, "kv_policy")) != NULL) {
        if (!cJSON_IsString(v))
            return oai_bad(err, err_len, "'%s' must be a string", "kv_policy");
        r->codec.policy = v->valuestring;
    }
    if ((v = oai_member(root, "kv_budget")) != NULL) {
        if (!is_number(v) || v->valuedouble < 0 || v->valuedouble > 1)
            return oai_bad(err, err_len, "'%s' must be a number in [0, 1]", "kv_budget");
        r->codec.budget = (float)v->valuedouble;
    }
    return 0;
}

/* A message's content: a string, null (""), or text parts joined. */
static int parse_content(oai_request_t *r, size_t i, const cJSON *content, char *err,
                         size_t err_len)
{
    Ferry__V1__ChatMessage *m = &r->messages[i];
    if (content == NULL) {
        m->content = "";
        return 0;
    }
    if (cJSON_IsString(content)) {
        m->content = content->valuestring;
        return 0;
    }
    if (!cJSON_IsArray(content))
        return oai_bad(err, err_len, "'%s' must be a string or an array of text parts", "content");
    size_t total = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, content)
    {
        const cJSON *type = cJSON_IsObject(part) ? oai_member(part, "type") : NULL;
        const cJSON *text = cJSON_IsObject(part) ? oai_member(part, "text") : NULL;
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0 ||
            !cJSON_IsString(text))
            return oai_bad(err, err_len, "only text parts are supported in '%s'", "content");
        total += strlen(text->valuestring);
    }
    char *joined = malloc(total + 1);
    if (joined == NULL)
        return oai_bad(err, err_len, "out of memory reading '%s'", "content");
    r->joined[i] = joined;
    size_t off = 0;
    cJSON_ArrayForEach(part, content)
    {
        size_t n = strlen(oai_member(part, "text")->valuestring);
        memcpy(joined + off, oai_member(part, "text")->valuestring, n);
        off += n;
    }
    joined[off] = '\0';
    m->content = joined;
    return 0;
}

static int parse_messages(oai_request_t *r, const cJSON *msgs, char *err, size_t err_len)
{
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0)
        return oai_bad(err, err_len, "'%s' must be a non-empty array", "messages");
    size_t n = (size_t)cJSON_GetArraySize(msgs);
    if (n > OAI_MAX_MESSAGES) {
        snprintf(err, err_len, "'messages' has more than %d entries", OAI_MAX_MESSAGES);
        return 400;
    }
    // One more: the system message the tools may need.
    r->messages = calloc(n + 1, sizeof(*r->messages));
    r->message_p = calloc(n + 1, sizeof(*r->message_p));
    r->joined = calloc(n + 1, sizeof(*r->joined));
    if (r->messages == NULL || r->message_p == NULL || r->joined == NULL)
        return oai_bad(err, err_len, "out of memory reading '%s'", "messages");
    r->chat.n_messages = n;
    size_t i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs)
    {
        ferry__v1__chat_message__init(&r->messages[i]);
        r->message_p[i] = &r->messages[i];
        const cJSON *role = cJSON_IsObject(m) ? oai_member(m, "role") : NULL;
        if (!cJSON_IsString(role))
            return oai_bad(err, err_len, "each message needs a string '%s'", "role");
        const char *rs = role->valuestring;
        if (strcmp(rs, "developer") == 0)
            rs = "system"; // OpenAI's newer name for the system role
        else if (strcmp(rs, "system") != 0 && strcmp(rs, "user") != 0 &&
                 strcmp(rs, "assistant") != 0 && strcmp(rs, "tool") != 0)
            return oai_bad(err, err_len,
                           "role '%.32s' is not supported (system, user, assistant, tool)", rs);
        r->messages[i].role = (char *)rs;
        int rc = parse_content(r, i, oai_member(m, "content"), err, err_len);
        if (rc)
            return rc;
        // A tool's result, or the assistant's calls: into the text in the tools' tags (a
        // tool's result comes from the user's side, as Qwen2.5's and Hermes' templates put it).
        const cJSON *calls = strcmp(rs, "assistant") == 0 ? oai_member(m, "tool_calls") : NULL;
        if (strcmp(rs, "tool") == 0 || (calls != NULL && cJSON_GetArraySize(calls) > 0)) {
            char *text = NULL;
            rc = oai_tools_message(rs, r->messages[i].content, calls, &text, err, err_len);
            if (rc)
                return rc;
            free(r->joined[i]);
            r->joined[i] = text;
            r->messages[i].content = text;
            if (strcmp(rs, "tool") == 0)
                r->messages[i].role = "user";
        }
        i++;
    }
    if (oai_tools_active(r)) { // the tools' block ends the system message (one comes first)
        if (strcmp(r->messages[0].role, "system") != 0) {
            memmove(r->message_p + 1, r->message_p, n * sizeof(*r->message_p));
            r->message_p[0] = &r->messages[n];
            ferry__v1__chat_message__init(&r->messages[n]);
            r->messages[n].role = "system";
            r->messages[n].content = "";
            r->chat.n_messages = ++n;
        }
        if ((r->tool_system = oai_tools_system(r, r->message_p[0]->content)) == NULL)
            return oai_bad(err, err_len, "out of memory reading '%s'", "tools");
        r->message_p[0]->content = r->tool_system;
    }
    r->chat.messages = r->message_p;
    r->msg.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_CHAT;
    r->msg.chat = &r->chat;
    return 0;
}

/* Prompt p as token ids (an array of integers). */
static int parse_ids(oai_request_t *r, uint32_t p, const cJSON *arr, char *err, size_t err_len)
{
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) == 0)
        return oai_bad(err, err_len, "'%s' token-id prompts must be non-empty arrays", "prompt");
    int rc = token_ids(arr, "prompt", &r->id_buf[p], err, err_len);
    if (rc)
        return rc;
    ferry__v1__token_ids__init(&r->ids[p]);
    r->ids[p].n_ids = (size_t)cJSON_GetArraySize(arr);
    r->ids[p].ids = r->id_buf[p];
    return 0;
}

void oai_request_select(oai_request_t *r, uint32_t p)
{
    if (r->texts[p] != NULL) {
        r->msg.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
        r->msg.prompt = (char *)r->texts[p];
    } else {
        r->msg.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS;
        r->msg.prompt_token_ids = &r->ids[p];
    }
}

/* "prompt": a string, token ids, or a batch: an array of strings or of token-id arrays (at
 * most OAI_MAX_PROMPTS, each answered with its own n choices). */
static int parse_prompt(oai_request_t *r, const cJSON *p, char *err, size_t err_len)
{
    static const char k_shape[] =
        "'%s' must be a string, [token ids], or an array of strings or of [token ids]";
    r->n_prompts = 1;
    if (cJSON_IsString(p)) {
        r->texts[0] = p->valuestring;
    } else if (!cJSON_IsArray(p) || cJSON_GetArraySize(p) == 0) {
        return oai_bad(err, err_len, k_shape, "prompt");
    } else if (cJSON_IsNumber(p->child)) {
        int rc = parse_ids(r, 0, p, err, err_len);
        if (rc)
            return rc;
    } else {
        int n = cJSON_GetArraySize(p);
        if (n > OAI_MAX_PROMPTS) {
            snprintf(err, err_len, "'prompt' has more than %d prompts", OAI_MAX_PROMPTS);
            return 400;
        }
        const bool text = cJSON_IsString(p->child);
        uint32_t k = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, p)
        {
            if (text ? !cJSON_IsString(e) : !cJSON_IsArray(e))
                return oai_bad(err, err_len, k_shape, "prompt");
            if (text) {
                r->texts[k] = e->valuestring;
            } else {
                int rc = parse_ids(r, k, e, err, err_len);
                if (rc)
                    return rc;
            }
            k++;
        }
        r->n_prompts = k;
    }
    if (r->n_prompts * r->n > OAI_MAX_CHOICES) {
        snprintf(err, err_len, "%u prompts of 'n' %u: more than %d choices", r->n_prompts, r->n,
                 OAI_MAX_CHOICES);
        return 400;
    }
    r->n_choices = r->n_prompts * r->n;
    oai_request_select(r, 0);
    return 0;
}

int oai_request_parse(oai_request_t *r, oai_kind_t kind, const char *body, size_t len, char *err,
                      size_t err_len)
{
    memset(r, 0, sizeof(*r));
    r->kind = kind;
    r->n = 1;
    r->n_prompts = 1;
    r->n_choices = 1;
    ferry__v1__generate_request__init(&r->msg);
    ferry__v1__sampling_params__init(&r->sampling);
    ferry__v1__codec_params__init(&r->codec);
    ferry__v1__chat_messages__init(&r->chat);
    r->msg.sampling = &r->sampling;
    r->msg.codec = &r->codec;
    if (body == NULL || body[len] != '\0' || memchr(body, '\0', len) != NULL)
        return oai_bad(err, err_len, "the body is not valid JSON (%s)", "a NUL byte");
    // len + 1: cJSON then requires the NUL right after the value and whitespace.
    const char *end = NULL;
    r->root = cJSON_ParseWithLengthOpts(body, len + 1, &end, true);
    if (r->root == NULL) {
        snprintf(err, err_len, "the body is not valid JSON (at byte %zu)",
                 end != NULL && end >= body ? (size_t)(end - body) : (size_t)0);
        return 400;
    }
    if (!cJSON_IsObject(r->root))
        return oai_bad(err, err_len, "the body must be a JSON %s", "object");
    int rc = parse_common(r, r->root, err, err_len);
    if (rc)
        return rc;
    if (kind == OAI_CHAT) {
        const cJSON *msgs = oai_member(r->root, "messages");
        if (msgs == NULL)
            return oai_bad(err, err_len, "'%s' is required", "messages");
        if ((rc = oai_tools_parse(r, r->root, err, err_len)) != 0)
            return rc;
        rc = parse_messages(r, msgs, err, err_len);
        r->n_choices = r->n; // one conversation
        return rc;
    }
    const cJSON *p = oai_member(r->root, "prompt");
    if (p == NULL)
        return oai_bad(err, err_len, "'%s' is required", "prompt");
    rc = parse_prompt(r, p, err, err_len);
    // echo: the prompt's log-probabilities come with logprobs; a prompt of token ids needs its
    // tokens' bytes (they come with them) for the text.
    r->sampling.prompt_logprobs =
        rc == 0 && r->echo &&
        (r->logprobs || r->msg.input_case == FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS);
    return rc;
}

void oai_request_clear(oai_request_t *r)
{
    if (r == NULL)
        return;
    if (r->joined != NULL)
        for (size_t i = 0; i < r->chat.n_messages; i++)
            free(r->joined[i]);
    free(r->joined);
    free(r->messages);
    free(r->message_p);
    for (uint32_t p = 0; p < OAI_MAX_PROMPTS; p++)
        free(r->id_buf[p]);
    free(r->stop_ids);
    free(r->bias);
    free(r->bias_p);
    free(r->schema_text);
    free(r->tool_system);
    cJSON_Delete(r->root);
    memset(r, 0, sizeof(*r));
}
