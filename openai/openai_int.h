/*
 * openai_int.h: the OpenAI front's pieces that touch no socket, so that tests and fuzzers
 * drive them directly:
 * - oai_reader_t: HTTP/1.1 requests out of a byte stream (http-parser), one at a time, with
 *   limits on the target, the headers and the body;
 * - oai_request_t: a JSON request body turned into a ferry.v1 GenerateRequest, or a 400 with
 *   the reason;
 * - the JSON answers: completions, stream chunks, model lists and errors.
 */
#ifndef FERRY_OPENAI_INT_H
#define FERRY_OPENAI_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>
#include <http_parser.h>

#include "ferry.pb-c.h"
#include "openai.h"

#define OAI_MODULE       "openai"
#define OAI_MAX_TARGET   2048  // longest request target; longer gets 414
#define OAI_MAX_HEAD     32768 // request line plus headers; more gets 431
#define OAI_MAX_MESSAGES 4096  // chat messages in one request
#define OAI_MAX_STOP     16    // stop strings
#define OAI_MAX_ID       64    // response id, "chatcmpl-" and 32 hex digits fit
#define OAI_MAX_AUTH     512   // longest Authorization header value kept
#define OAI_MAX_N        16    // choices a request may ask for ("n")
#define OAI_MAX_PROMPTS      64    // prompts of one completions request (a batch)
#define OAI_MAX_CHOICES      64    // prompts x n
#define OAI_MAX_TOP_LOGPROBS 20    // alternatives a token's log-probability may come with
#define OAI_MAX_LOGIT_BIAS   300   // tokens a logit_bias object may name (as the router takes)
#define OAI_MAX_TOOLS        64    // functions in "tools"

/* ---- HTTP/1.1 requests from a byte stream ------------------------------------------------ */

typedef struct {
    http_parser parser;
    size_t max_body;
    size_t head_bytes;    // request line and header bytes of this request
    bool in_value;        // the last header piece was a value
    bool in_value_expect; // the header value being read belongs to "Expect"
    bool in_value_auth;   // ... to "Authorization"
    char field[16];       // header name so far ("expect", "authorization"), lower case
    size_t field_len;
    bool field_long;
    // The request, valid once complete:
    char method[8]; // "GET", "POST", ...
    char target[OAI_MAX_TARGET + 1];
    size_t target_len;
    char *body; // malloc'd, NUL-terminated; body_len bytes
    size_t body_len, body_cap;
    bool expect_continue; // the client waits for "100 Continue" before its body
    char auth[OAI_MAX_AUTH + 1]; // the Authorization header's value ("" when absent)
    size_t auth_len;
    bool auth_long; // longer than OAI_MAX_AUTH, or sent twice: never a valid key
    bool keep_alive;
    bool complete; // a whole request is here: the reader consumes nothing more
    int error;     // HTTP status to answer before closing (400, 413, 414, 431, 505), or 0
} oai_reader_t;

/* Thread: any (one reader per connection). */
void oai_reader_init(oai_reader_t *r, size_t max_body);
void oai_reader_cleanup(oai_reader_t *r);

/* Feeds bytes; returns how many were consumed. Stops after a whole request (r->complete) or at
 * the first error (r->error); the rest waits for oai_reader_next. Thread: any. */
size_t oai_reader_feed(oai_reader_t *r, const char *data, size_t len);

/* Forgets the complete request and reads the next one of the same connection. */
void oai_reader_next(oai_reader_t *r);

/* The target's path: up to '?' (not NUL-terminated; *len_p bytes). */
const char *oai_reader_path(const oai_reader_t *r, size_t *len_p);

/* ---- JSON request bodies ------------------------------------------------------------------- */

typedef enum { OAI_COMPLETION, OAI_CHAT } oai_kind_t;

/* How the model may call the request's tools ("tool_choice"). */
typedef enum {
    OAI_TOOLS_NONE,     // not at all (the tools stay out of the prompt)
    OAI_TOOLS_AUTO,     // as it decides: calls read back from its answer
    OAI_TOOLS_REQUIRED, // one call of any tool, the sampler guided by their schemas
    OAI_TOOLS_NAMED,    // one call of named_tool, likewise
} oai_tool_choice_t;

/* A parsed request: msg is ready to send; every string it points to lives in root or in the
 * arrays below, until oai_request_clear. */
typedef struct {
    oai_kind_t kind;
    cJSON *root;
    Ferry__V1__GenerateRequest msg;
    Ferry__V1__SamplingParams sampling;
    Ferry__V1__CodecParams codec;
    Ferry__V1__ChatMessages chat;
    Ferry__V1__TokenIds ids[OAI_MAX_PROMPTS]; // completions: the prompts given as token ids
    Ferry__V1__ChatMessage *messages;   // [chat.n_messages]
    Ferry__V1__ChatMessage **message_p; // [chat.n_messages]
    char **joined; // [chat.n_messages] contents joined from parts or with tool calls, or NULL
    uint32_t *id_buf[OAI_MAX_PROMPTS];  // [ids[p].n_ids]
    const char *texts[OAI_MAX_PROMPTS]; // completions: the prompts given as text (in root)
    uint32_t n_prompts;                 // completions: 1..OAI_MAX_PROMPTS (chat: 1)
    uint32_t n_choices;                 // n x n_prompts; choice i is prompt i / n's i % n-th
    uint32_t *stop_ids;                 // [sampling.n_stop_token_ids]
    Ferry__V1__LogitBias *bias;         // [sampling.n_logit_bias]
    Ferry__V1__LogitBias **bias_p;      // [sampling.n_logit_bias]
    char *schema_text;                  // sampling.json_schema (malloc'd), or NULL
    const cJSON *tools[OAI_MAX_TOOLS];  // chat: the "tools" entries (in root)
    uint32_t n_tools;
    oai_tool_choice_t tool_choice;
    uint32_t named_tool; // OAI_TOOLS_NAMED: its index
    char *tool_system;   // the system message with the tools (malloc'd), or NULL
    char *stop[OAI_MAX_STOP];
    bool stream, include_usage;
    bool echo;         // completions: the prompt comes first in the text (and logprobs)
    bool logprobs;     // the answer carries each token's log-probability (sampling.logprobs)
    bool has_seed;     // "seed" given: a prompt's choice k samples with seed + k
    uint32_t n;        // choices per prompt, 1..OAI_MAX_N
    const char *model; // as requested, or NULL
} oai_request_t;

/* Writes the reason (fmt with field) into err and returns 400. Thread: any. */
int oai_bad(char *err, size_t err_len, const char *fmt, const char *field);
/* obj's member name when present and not null, else NULL. Thread: any. */
const cJSON *oai_member(const cJSON *obj, const char *name);

/* Parses body (len bytes, NUL-terminated at body[len]) as kind. Returns 0, or the HTTP status to
 * answer (400) with the reason in err. r is always left clearable. Thread: any. */
int oai_request_parse(oai_request_t *r, oai_kind_t kind, const char *body, size_t len, char *err,
                      size_t err_len);
void oai_request_clear(oai_request_t *r);
/* Points msg at prompt p (< n_prompts) of a completions request. Thread: any. */
void oai_request_select(oai_request_t *r, uint32_t p);

/* ---- Tool calling (tools.c) ---------------------------------------------------------------- */

/* "tools", "tool_choice" and "parallel_tool_calls" of a chat request into r (after the
 * sampling fields: a required or named call sets sampling.json_schema). 0 or 400 with the
 * reason in err. Thread: any. */
int oai_tools_parse(oai_request_t *r, const cJSON *root, char *err, size_t err_len);
/* The tools reach the model (some, and tool_choice not "none"). */
bool oai_tools_active(const oai_request_t *r);
const char *oai_tool_name(const oai_request_t *r, uint32_t i);
/* The system message's content with the tools' block after it (system may be NULL). malloc'd;
 * NULL when out of memory. */
char *oai_tools_system(const oai_request_t *r, const char *system);
/* A "tool" message's content, or an "assistant" message's content with its tool_calls, as the
 * conversation shows them to the model, into *out_p (malloc'd). 0 or 400 with the reason. */
int oai_tools_message(const char *role, const char *content, const cJSON *calls, char **out_p,
                      char *err, size_t err_len);
/* The calls in an answer text[len]: OpenAI's tool_calls array (ids prefix + 0, 1, ...), and
 * in *content_len_p the length of the text before them (the content). NULL, and the whole
 * text content, when the answer holds no call to a tool of the request. */
cJSON *oai_tools_extract(const oai_request_t *r, const char *text, size_t len, const char *prefix,
                         size_t *content_len_p);
/* How much of an answer so far (text[len]) is content for sure: what a stream may send
 * before the answer is whole. */
size_t oai_tools_streamable(const oai_request_t *r, const char *text, size_t len);

/* ---- JSON answers (malloc'd text, NULL when out of memory) --------------------------------- */

/* "stop" or "length" for a finish reason. */
const char *oai_finish_name(Ferry__V1__FinishReason reason);

/* One choice of an answer: its text (text_len bytes), finish reason and logprobs object (NULL:
 * null); with tool_calls (an array, or NULL) the text is the content before them (null when
 * empty) and the finish reason "tool_calls". */
typedef struct {
    const char *text;
    size_t text_len;
    Ferry__V1__FinishReason finish;
    const cJSON *logprobs;
    const cJSON *tool_calls;
} oai_choice_out_t;

/* A choice's "logprobs" object of kind's form, empty: chat {"content": [], "refusal": null};
 * completions {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (empty arrays).
 * NULL when out of memory. */
cJSON *oai_logprobs_new(oai_kind_t kind);

/* s[n] as valid UTF-8 into out (3 n + 1 bytes): what is not (a character cut short, a stray
 * byte, NUL) becomes U+FFFD. Returns the length written (out is NUL-terminated). */
size_t oai_utf8_sanitize(const uint8_t *s, size_t n, char *out);

/* Appends the log-probability entries e[n] (a GenerateResponse's) to lp: chat entries have
 * token, logprob, bytes and top_logprobs; completions' the token, its logprob, {token:
 * logprob} of the alternatives and its byte offset in the text (*offset, advanced by the
 * token's bytes). A token's bytes that are not whole UTF-8 characters show as U+FFFD in its
 * string (chat's bytes keep them); a logprob the worker did not send is null. false when out
 * of memory (lp then holds part of the entries). */
bool oai_logprobs_add(cJSON *lp, oai_kind_t kind, Ferry__V1__TokenLogprob *const *e, size_t n,
                      size_t *offset);

/* A whole completion (kind's object) with n choices and the usage (stats may be NULL). */
char *oai_render_completion(oai_kind_t kind, const char *id, int64_t created, const char *model,
                            const oai_choice_out_t *choices, uint32_t n,
                            const Ferry__V1__RequestStats *stats);

/* One stream chunk of choice `index`: text (may be empty), role (chat's first chunk), the
 * logprobs of its tokens (NULL: null) and finish reason (NULL until the last); with_usage adds
 * "usage": null, as streams that include usage do. */
char *oai_render_chunk(oai_kind_t kind, const char *id, int64_t created, const char *model,
                       uint32_t index, const char *role, const char *text, size_t text_len,
                       const cJSON *logprobs, const char *finish, bool with_usage);

/* A chat stream chunk of choice `index` with its tool calls (OpenAI's tool_calls array; each
 * goes out whole, with its "index"). */
char *oai_render_tool_chunk(const char *id, int64_t created, const char *model, uint32_t index,
                            const cJSON *tool_calls, bool with_usage);

/* The usage chunk that ends a stream with include_usage (no choices). */
char *oai_render_usage_chunk(oai_kind_t kind, const char *id, int64_t created, const char *model,
                             const Ferry__V1__RequestStats *stats);

/* {"object":"list","data":[...]} from a ListModels answer; one model's object. */
char *oai_render_models(const Ferry__V1__ListModelsResponse *models);
char *oai_render_model(const Ferry__V1__ModelInfo *model);

/* Decodes %XX escapes of s[0..n) in place (a '%' not followed by two hex digits stays);
 * NUL-terminates and returns the new length. s must have room for n + 1 bytes. */
size_t oai_percent_decode(char *s, size_t n);

/* {"error":{"message":...,"type":...,"param":null,"code":...}}. */
char *oai_render_error(int http_status, const char *message);

/* The HTTP status for a gRPC code. */
int oai_http_status(int grpc_code);

/* The reason phrase of an HTTP status. */
const char *oai_status_text(int status);

#endif /* FERRY_OPENAI_INT_H */
