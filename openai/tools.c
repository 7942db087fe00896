/*
 * tools.c: OpenAI's tool calling for the chat API, in the Hermes format.
 *
 * The tools of a request become a block of the system prompt (the format Qwen2.5, Hermes and
 * SmolLM2's own tool training use: signatures inside <tools></tools>, calls answered as
 * <tool_call>{"name": ..., "arguments": {...}}</tool_call>); the assistant's earlier calls and
 * the tools' results go back into the conversation in the same tags, so any chat template
 * renders them. With tool_choice "auto" the model decides: its answer is read back into the
 * content before the first <tool_call> and the calls in the tags (or one bare JSON object
 * naming a tool, as Llama-3.1 answers). With "required" or a named function the sampler is
 * guided by a JSON schema of the call itself ({"name": const, "arguments": the function's
 * parameters}, one branch a tool), so the answer is one call whatever the model would say.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "openai_int.h"

static const char k_open[] = "<tool_call>", k_close[] = "</tool_call>";

static bool name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '_' && s[i] != '-' && s[i] != '.')
            return false;
    return true;
}

const char *oai_tool_name(const oai_request_t *r, uint32_t i)
{
    return oai_member(oai_member(r->tools[i], "function"), "name")->valuestring;
}

/* The index of the tool called name, or -1. */
static int tool_index(const oai_request_t *r, const char *name)
{
    for (uint32_t i = 0; i < r->n_tools; i++)
        if (strcmp(oai_tool_name(r, i), name) == 0)
            return (int)i;
    return -1;
}

/* A call's schema: {"name": its const, "arguments": the parameters}, whose $defs and
 * definitions move to the top (defs), where their $refs point. */
static cJSON *call_schema(const cJSON *fn, cJSON *defs[2], char *err, size_t err_len)
{
    static const char *const k_defs[2] = {"$defs", "definitions"};
    const cJSON *params = oai_member(fn, "parameters");
    cJSON *args = params != NULL ? cJSON_Duplicate(params, true)
                                 : cJSON_Parse("{\"type\": \"object\", "
                                               "\"additionalProperties\": false}");
    cJSON *s = cJSON_CreateObject();
    cJSON *props = s != NULL ? cJSON_AddObjectToObject(s, "properties") : NULL;
    cJSON *name = props != NULL ? cJSON_AddObjectToObject(props, "name") : NULL;
    cJSON *req = cJSON_CreateStringArray((const char *const[]){"name", "arguments"}, 2);
    bool ok = args != NULL && name != NULL && req != NULL &&
              cJSON_AddStringToObject(s, "type", "object") &&
              cJSON_AddStringToObject(name, "const", oai_member(fn, "name")->valuestring) &&
              cJSON_AddItemToObject(s, "required", req);
    if (!ok)
        cJSON_Delete(req);
    for (int k = 0; ok && k < 2; k++) {
        cJSON *d = cJSON_DetachItemFromObjectCaseSensitive(args, k_defs[k]);
        for (cJSON *e = cJSON_IsObject(d) ? d->child : NULL; e != NULL; e = e->next) {
            const cJSON *had = cJSON_GetObjectItemCaseSensitive(defs[k], e->string);
            if (had != NULL && !cJSON_Compare(had, e, true)) {
                snprintf(err, err_len, "tools: two functions define %s \"%.64s\" differently",
                         k_defs[k], e->string);
                cJSON_Delete(d);
                cJSON_Delete(args);
                cJSON_Delete(s);
                return NULL;
            }
            if (had == NULL)
                ok = ok && cJSON_AddItemToObject(defs[k], e->string, cJSON_Duplicate(e, true));
        }
        cJSON_Delete(d);
    }
    if (ok && cJSON_AddItemToObject(props, "arguments", args))
        return s;
    if (!ok)
        cJSON_Delete(args);
    cJSON_Delete(s);
    snprintf(err, err_len, "out of memory reading 'tools'");
    return NULL;
}

/* The schema that guides a required or named call: one branch a tool it may call. */
static int guide_schema(oai_request_t *r, char *err, size_t err_len)
{
    cJSON *defs[2] = {cJSON_CreateObject(), cJSON_CreateObject()};
    cJSON *any = cJSON_CreateArray(), *root = NULL;
    bool ok = defs[0] != NULL && defs[1] != NULL && any != NULL;
    for (uint32_t i = 0; ok && i < r->n_tools; i++) {
        if (r->tool_choice == OAI_TOOLS_NAMED && i != r->named_tool)
            continue;
        cJSON *b = call_schema(oai_member(r->tools[i], "function"), defs, err, err_len);
        ok = b != NULL && cJSON_AddItemToArray(any, b);
        if (b == NULL) {
            cJSON_Delete(any);
            cJSON_Delete(defs[0]);
            cJSON_Delete(defs[1]);
            return 400;
        }
    }
    if (ok && cJSON_GetArraySize(any) == 1) {
        root = cJSON_DetachItemFromArray(any, 0);
        cJSON_Delete(any);
    } else if (ok) {
        root = cJSON_CreateObject();
        ok = root != NULL && cJSON_AddItemToObject(root, "anyOf", any);
        if (!ok)
            cJSON_Delete(any);
    } else {
        cJSON_Delete(any);
    }
    static const char *const k_defs[2] = {"$defs", "definitions"};
    for (int k = 0; k < 2; k++) {
        if (ok && defs[k]->child != NULL) {
            ok = cJSON_AddItemToObject(root, k_defs[k], defs[k]);
            if (ok)
                defs[k] = NULL;
        }
        cJSON_Delete(defs[k]);
    }
    if (ok)
        r->schema_text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (r->schema_text == NULL)
        return oai_bad(err, err_len, "out of memory reading '%s'", "tools");
    r->sampling.json_schema = r->schema_text;
    return 0;
}

int oai_tools_parse(oai_request_t *r, const cJSON *root, char *err, size_t err_len)
{
    const cJSON *tools = oai_member(root, "tools");
    const cJSON *choice = oai_member(root, "tool_choice");
    const cJSON *par = oai_member(root, "parallel_tool_calls");
    if (par != NULL && !cJSON_IsBool(par))
        return oai_bad(err, err_len, "'%s' must be true or false", "parallel_tool_calls");
    if (tools != NULL) {
        if (!cJSON_IsArray(tools) || cJSON_GetArraySize(tools) > OAI_MAX_TOOLS)
            return oai_bad(err, err_len, "'%s' must be an array of at most 64 functions", "tools");
        const cJSON *t;
        cJSON_ArrayForEach(t, tools)
        {
            const cJSON *type = cJSON_IsObject(t) ? oai_member(t, "type") : NULL;
            const cJSON *fn = cJSON_IsObject(t) ? oai_member(t, "function") : NULL;
            const cJSON *name = cJSON_IsObject(fn) ? oai_member(fn, "name") : NULL;
            const cJSON *desc = cJSON_IsObject(fn) ? oai_member(fn, "description") : NULL;
            const cJSON *params = cJSON_IsObject(fn) ? oai_member(fn, "parameters") : NULL;
            if (!cJSON_IsString(type) || strcmp(type->valuestring, "function") != 0 ||
                !cJSON_IsString(name))
                return oai_bad(err, err_len,
                               "each of '%s' must be {\"type\": \"function\", \"function\": "
                               "{\"name\": ...}}",
                               "tools");
            if (!name_ok(name->valuestring))
                return oai_bad(err, err_len,
                               "tools: the name \"%.64s\" must be 1 to 64 letters, digits, '_', "
                               "'-' or '.'",
                               name->valuestring);
            if ((desc != NULL && !cJSON_IsString(desc)) ||
                (params != NULL && !cJSON_IsObject(params)))
                return oai_bad(err, err_len,
                               "tools: \"%.64s\" needs a string description and an object of "
                               "parameters",
                               name->valuestring);
            if (tool_index(r, name->valuestring) >= 0)
                return oai_bad(err, err_len, "tools: \"%.64s\" given twice", name->valuestring);
            r->tools[r->n_tools++] = t;
        }
    }
    r->tool_choice = r->n_tools > 0 ? OAI_TOOLS_AUTO : OAI_TOOLS_NONE;
    if (choice != NULL) {
        const cJSON *fn = cJSON_IsObject(choice) ? oai_member(choice, "function") : NULL;
        const cJSON *name = cJSON_IsObject(fn) ? oai_member(fn, "name") : NULL;
        if (cJSON_IsString(choice) && strcmp(choice->valuestring, "none") == 0) {
            r->tool_choice = OAI_TOOLS_NONE;
        } else if (cJSON_IsString(choice) && strcmp(choice->valuestring, "auto") == 0) {
            // as the default
        } else if (cJSON_IsString(choice) && strcmp(choice->valuestring, "required") == 0) {
            r->tool_choice = OAI_TOOLS_REQUIRED;
        } else if (cJSON_IsString(name)) {
            int i = tool_index(r, name->valuestring);
            if (i < 0)
                return oai_bad(err, err_len, "tool_choice: no tool \"%.64s\" in 'tools'",
                               name->valuestring);
            r->tool_choice = OAI_TOOLS_NAMED;
            r->named_tool = (uint32_t)i;
        } else {
            return oai_bad(err, err_len,
                           "'%s' must be \"none\", \"auto\", \"required\" or {\"type\": "
                           "\"function\", \"function\": {\"name\": ...}}",
                           "tool_choice");
        }
        if (r->tool_choice != OAI_TOOLS_NONE && r->n_tools == 0)
            return oai_bad(err, err_len, "'%s' needs 'tools'", "tool_choice");
    }
    if (r->tool_choice != OAI_TOOLS_REQUIRED && r->tool_choice != OAI_TOOLS_NAMED)
        return 0;
    if (r->sampling.json_object || r->schema_text != NULL)
        return oai_bad(err, err_len, "tool_choice \"required\" or a function: not with %s",
                       "response_format or guided_json");
    return guide_schema(r, err, err_len);
}

bool oai_tools_active(const oai_request_t *r)
{
    return r->n_tools > 0 && r->tool_choice != OAI_TOOLS_NONE;
}

/* ---- The prompt ------------------------------------------------------------------------------ */

/* A growing string; ok false once out of memory. */
typedef struct {
    char *s;
    size_t len, cap;
    bool ok;
} buf_t;

static void put(buf_t *b, const char *s, size_t n)
{
    if (!b->ok || n == 0)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = FY_MAX(b->cap * 2, b->len + n + 256);
        char *p = realloc(b->s, cap);
        if (p == NULL) {
            b->ok = false;
            return;
        }
        b->s = p;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void puts_(buf_t *b, const char *s)
{
    put(b, s, strlen(s));
}

/* Appends a JSON value, printed on one line. */
static void put_json(buf_t *b, const cJSON *v)
{
    char *t = cJSON_PrintUnformatted(v);
    if (t == NULL)
        b->ok = false;
    else
        puts_(b, t);
    free(t);
}

char *oai_tools_system(const oai_request_t *r, const char *system)
{
    buf_t b = {.ok = true};
    if (system != NULL && system[0] != '\0') {
        puts_(&b, system);
        puts_(&b, "\n\n");
    }
    puts_(&b, "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n"
              "<tools>");
    for (uint32_t i = 0; i < r->n_tools; i++) {
        puts_(&b, "\n");
        put_json(&b, r->tools[i]);
    }
    puts_(&b, "\n</tools>\n\nFor each function call, return a json object with function name and "
              "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
              "<function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
    if (!b.ok)
        free(b.s);
    return b.ok ? b.s : NULL;
}

int oai_tools_message(const char *role, const char *content, const cJSON *calls, char **out_p,
                      char *err, size_t err_len)
{
    buf_t b = {.ok = true};
    *out_p = NULL;
    if (strcmp(role, "tool") == 0) {
        puts_(&b, "<tool_response>\n");
        puts_(&b, content);
        puts_(&b, "\n</tool_response>");
    } else {
        if (!cJSON_IsArray(calls))
            return oai_bad(err, err_len, "'%s' must be an array", "tool_calls");
        puts_(&b, content);
        const cJSON *c;
        cJSON_ArrayForEach(c, calls)
        {
            const cJSON *fn = cJSON_IsObject(c) ? oai_member(c, "function") : NULL;
            const cJSON *name = cJSON_IsObject(fn) ? oai_member(fn, "name") : NULL;
            const cJSON *args = cJSON_IsObject(fn) ? oai_member(fn, "arguments") : NULL;
            if (!cJSON_IsString(name) || (args != NULL && !cJSON_IsString(args))) {
                free(b.s);
                return oai_bad(err, err_len,
                               "each of '%s' must be {\"function\": {\"name\": ..., \"arguments\": "
                               "\"...\"}}",
                               "tool_calls");
            }
            // The arguments as the JSON they hold (a string that is not JSON stays a string).
            cJSON *parsed = args != NULL ? cJSON_Parse(args->valuestring) : cJSON_CreateObject();
            cJSON *call = cJSON_CreateObject();
            bool ok = call != NULL && cJSON_AddStringToObject(call, "name", name->valuestring);
            cJSON *a = parsed != NULL ? parsed : cJSON_CreateString(args->valuestring);
            ok = ok && a != NULL && cJSON_AddItemToObject(call, "arguments", a);
            if (!ok && a != NULL)
                cJSON_Delete(a);
            puts_(&b, b.len > 0 ? "\n<tool_call>\n" : "<tool_call>\n");
            if (ok)
                put_json(&b, call);
            b.ok &= ok;
            puts_(&b, "\n</tool_call>");
            cJSON_Delete(call);
        }
    }
    if (!b.ok) {
        free(b.s);
        return oai_bad(err, err_len, "out of memory reading '%s'", "messages");
    }
    *out_p = b.s != NULL ? b.s : strdup("");
    return *out_p != NULL ? 0 : oai_bad(err, err_len, "out of memory reading '%s'", "messages");
}

/* ---- The answer ------------------------------------------------------------------------------ */

static const char *skip_ws(const char *s, const char *end)
{
    while (s < end && isspace((unsigned char)*s))
        s++;
    return s;
}

static const char *find(const char *s, const char *end, const char *what)
{
    return memmem(s, (size_t)(end - s), what, strlen(what));
}

/* One call j: {"name": a tool's, "arguments" (or Llama's "parameters"): an object, or a
 * string of one}, appended to calls as OpenAI's tool call with id `prefix` + its index. false
 * if j is not such a call. */
static bool add_call(const oai_request_t *r, cJSON *calls, const cJSON *j, const char *prefix)
{
    const cJSON *name = cJSON_IsObject(j) ? oai_member(j, "name") : NULL;
    const cJSON *args = cJSON_IsObject(j) ? oai_member(j, "arguments") : NULL;
    if (args == NULL && cJSON_IsObject(j))
        args = oai_member(j, "parameters");
    cJSON *parsed = cJSON_IsString(args) ? cJSON_Parse(args->valuestring) : NULL;
    if (parsed != NULL)
        args = parsed;
    bool ok = cJSON_IsString(name) && tool_index(r, name->valuestring) >= 0 &&
              (args == NULL || cJSON_IsObject(args));
    char *text = ok ? (args != NULL ? cJSON_PrintUnformatted(args) : strdup("{}")) : NULL;
    char id[OAI_MAX_ID + 16];
    snprintf(id, sizeof(id), "%s%d", prefix, cJSON_GetArraySize(calls));
    cJSON *call = text != NULL ? cJSON_CreateObject() : NULL, *fn = NULL;
    ok = call != NULL && cJSON_AddStringToObject(call, "id", id) &&
         cJSON_AddStringToObject(call, "type", "function") &&
         (fn = cJSON_AddObjectToObject(call, "function")) != NULL &&
         cJSON_AddStringToObject(fn, "name", name->valuestring) &&
         cJSON_AddStringToObject(fn, "arguments", text) && cJSON_AddItemToArray(calls, call);
    if (!ok)
        cJSON_Delete(call);
    free(text);
    cJSON_Delete(parsed);
    return ok;
}

/* The calls in JSON text [s, end): one call, or a list of them (SmolLM2's tool format puts a
 * list in one tag). false if the text is neither. */
static bool add_calls(const oai_request_t *r, cJSON *calls, const char *s, const char *end,
                      const char *prefix)
{
    cJSON *j = cJSON_ParseWithLength(s, (size_t)(end - s));
    bool ok = j != NULL && (!cJSON_IsArray(j) || cJSON_GetArraySize(j) > 0);
    const cJSON *e;
    if (cJSON_IsArray(j)) {
        cJSON_ArrayForEach(e, j) ok = ok && add_call(r, calls, e, prefix);
    } else {
        ok = ok && add_call(r, calls, j, prefix);
    }
    cJSON_Delete(j);
    return ok;
}

cJSON *oai_tools_extract(const oai_request_t *r, const char *text, size_t len, const char *prefix,
                         size_t *content_len_p)
{
    const char *end = text + len, *start = skip_ws(text, end);
    cJSON *calls = cJSON_CreateArray();
    *content_len_p = len;
    if (calls == NULL || !oai_tools_active(r))
        goto none;
    const char *at = r->tool_choice == OAI_TOOLS_AUTO ? find(text, end, k_open) : NULL;
    if (at == NULL) { // the whole answer one JSON call: guided, or a bare one
        if (start < end && *start == '{' && add_calls(r, calls, start, end, prefix)) {
            *content_len_p = 0;
            return calls;
        }
        goto none;
    }
    size_t content = (size_t)(at - text);
    while (content > 0 && isspace((unsigned char)text[content - 1]))
        content--;
    while (at != NULL) {
        const char *body = at + strlen(k_open);
        const char *close = find(body, end, k_close);
        const char *stop = close != NULL ? close : end; // the last may lack its close
        if (!add_calls(r, calls, body, stop, prefix))
            goto none;
        at = close != NULL ? find(close, end, k_open) : NULL;
    }
    *content_len_p = content;
    return calls;
none:
    cJSON_Delete(calls);
    return NULL;
}

size_t oai_tools_streamable(const oai_request_t *r, const char *text, size_t len)
{
    if (!oai_tools_active(r))
        return len;
    const char *end = text + len, *start = skip_ws(text, end);
    if (r->tool_choice != OAI_TOOLS_AUTO || start == end || *start == '{')
        return 0; // a call, or maybe one: nothing shows before the answer is whole
    const char *at = find(text, end, k_open);
    size_t sure = at != NULL ? (size_t)(at - text) : len;
    // Hold back an end that may be the start of the tag, and white space that may come
    // before one (the content ends before it).
    const size_t n = strlen(k_open);
    for (size_t k = FY_MIN(n - 1, sure); at == NULL && k > 0; k--)
        if (memcmp(end - k, k_open, k) == 0) {
            sure = len - k;
            break;
        }
    while (sure > 0 && isspace((unsigned char)text[sure - 1]))
        sure--;
    return sure;
}
