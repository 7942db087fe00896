/*
 * cli_generate.c: `ferry generate` streams a continuation to stdout as it is produced, either
 *   - through a router: `ferry generate --router HOST:PORT [options] "prompt"` (or the address
 *     as a first positional argument), over the client SDK (ferry_client.h); or
 *   - in this process: `ferry generate --local --model PATH [options] "prompt"`.
 * --stats prints, after the text, the request's figures (remote: the router's RequestStats).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ferry_client.h"
#include "model.h"


/* Re-executes this process with OPENBLAS_CORETYPE set when OpenBLAS chose slower kernels than
 * the CPU supports (see krn_gemm_better_coretype); returns only when nothing was done. */
static void tune_blas(int argc, char **argv, const char *sub)
{
    const char *core = getenv("OPENBLAS_CORETYPE") == NULL ? krn_gemm_better_coretype() : NULL;
    if (core == NULL || argc > 250)
        return;
    char *args[256];
    args[0] = (char *)"ferry";
    args[1] = (char *)sub;
    for (int i = 1; i < argc; i++)
        args[i + 1] = argv[i];
    args[argc + 1] = NULL;
    setenv("OPENBLAS_CORETYPE", core, 1);
    execv("/proc/self/exe", args);
    unsetenv("OPENBLAS_CORETYPE"); // exec failed: go on with what we have
}

static void usage(FILE *out)
{
    fprintf(
        out,
        "usage: ferry generate --router HOST:PORT [options] \"prompt\"\n"
        "       ferry generate HOST:PORT [options] \"prompt\"\n"
        "       ferry generate --local --model PATH [options] \"prompt\"\n"
        "  --router HOST:PORT    generate through this router (ferry-router)\n"
        "  --local               run the model in this process\n"
        "  --model PATH          GGUF model file (with --local)\n"
        "  --chat                wrap the prompt in the model's chat template\n"
        "  --system TEXT         system message (with --chat)\n"
        "  --max-tokens N        tokens to generate (default 256)\n"
        "  --temperature T       0 = greedy (default 0.7)\n"
        "  --top-k K             0 = off (default 40)\n"
        "  --top-p P             1 = off (default 0.95)\n"
        "  --repeat-penalty R    1 = off (default 1.0)\n"
        "  --presence-penalty P  each generated token's logit lowered by P once (-2..2)\n"
        "  --frequency-penalty F ... and by F per occurrence (-2..2; default 0: off)\n"
        "  --seed S              sampling seed (default 0x5eed)\n"
        "  --threads N           worker threads (default: all CPUs; --local)\n"
        "  --device cpu|cuda     where the model runs (default cpu; --local)\n"
        "  --stop TEXT           stop string (repeatable; remote)\n"
        "  --policy NAME         KV codec policy for the transfer (remote; default: the "
        "worker's)\n"
        "  --budget B            KV codec budget in (0, 1] (remote)\n"
        "  --timeout DURATION    deadline of a remote request (default 300s)\n"
        "  --token TOKEN         bearer token for the router (default: $FERRY_TOKEN, else\n"
        "                        $FERRY_API_KEY: the router's --api-key)\n"
        "  --tls-ca FILE         TLS to the router, verified with the PEM certificates in\n"
        "                        FILE (default: $FERRY_TLS_CA; unset = cleartext)\n"
        "  --tls-any-name        accept a certificate FILE verifies whatever host it names\n"
        "  --ids                 print the generated token ids to stderr (remote)\n"
        "  --logprobs N          print each token's log-probability and its N most likely\n"
        "                        alternatives (0-20) to stderr, with the sum (remote)\n"
        "  --score TEXT          the completion is TEXT (tokenized on its own): print its\n"
        "                        tokens' log-probabilities as --logprobs does (remote)\n"
        "  --json                JSON mode: the completion is one JSON object\n"
        "  --json-schema FILE    structured output: the completion is one document of the\n"
        "                        JSON Schema in FILE (the keywords model/model.h lists)\n"
        "  --prompt-logprobs     print each prompt token's log-probability given those\n"
        "                        before it (the prefill worker's, FP16), with the sum (remote)\n"
        "  --stats               print TTFT, speed and KV transfer figures to stderr\n");
}

/* --json-schema's file (at most MDL_SCHEMA_MAX_TEXT bytes), NUL-terminated; NULL with the
 * reason on stderr. */
static char *read_schema(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "ferry generate: --json-schema %s: %s\n", path, strerror(errno));
        return NULL;
    }
    char *text = malloc(MDL_SCHEMA_MAX_TEXT + 2);
    size_t n = text != NULL ? fread(text, 1, MDL_SCHEMA_MAX_TEXT + 1, f) : 0;
    bool bad = ferror(f) || n == 0 || n > MDL_SCHEMA_MAX_TEXT;
    fclose(f);
    if (text == NULL || bad) {
        fprintf(stderr, "ferry generate: --json-schema %s: not 1 to %d bytes\n", path,
                MDL_SCHEMA_MAX_TEXT);
        free(text);
        return NULL;
    }
    text[n] = '\0';
    return text;
}

static bool parse_num(const char *s, double lo, double hi, double *v)
{
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || x < lo || x > hi)
        return false;
    *v = x;
    return true;
}

typedef struct {
    const char *router, *prompt, *system, *policy, *token, *tls_ca;
    bool chat, stats, show_ids, tls_any_name, json, prompt_logprobs;
    double budget;
    uint64_t timeout_ms;
    const char *const *stops;
    size_t n_stops;
    int logprobs; // alternatives per token, -1 = no log-probabilities
    const char *score; // the continuation to force and score, or NULL
    char *schema;      // --json-schema's text, or NULL
} remote_opts_t;

/* Log-probability lines, kept in a memory stream to print after the text, with their sum. */
typedef struct {
    FILE *f; // NULL: not asked for
    char *text;
    size_t len, tokens;
    double sum;
} lp_sink_t;

typedef struct {
    const remote_opts_t *o;
    uint64_t t0, t_first;
    unsigned n_msgs;
    Ferry__V1__RequestStats stats;
    bool have_stats;
    char policy[64], prefill[64], decode[64];
    Ferry__V1__FinishReason finish;
    lp_sink_t lp;  // --logprobs: the completion's tokens
    lp_sink_t plp; // --prompt-logprobs: the prompt's
} remote_state_t;

/* A token's bytes in quotes, C-escaped where not printable ASCII. */
static void put_token(FILE *f, const ProtobufCBinaryData *t)
{
    fputc('"', f);
    for (size_t i = 0; i < t->len; i++) {
        uint8_t c = t->data[i];
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c == '\n')
            fputs("\\n", f);
        else if (c < 0x20 || c >= 0x7f)
            fprintf(f, "\\x%02x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

/* One line per token: its log-probability, the token, then the alternatives; the sum and
 * count of those with a log-probability (a prompt's first token has none). */
static void put_logprobs(lp_sink_t *sink, Ferry__V1__TokenLogprob *const *es, size_t n)
{
    FILE *f = sink->f;
    for (size_t i = 0; f != NULL && i < n; i++) {
        const Ferry__V1__TokenLogprob *e = es[i];
        fprintf(f, "%10.4f  ", (double)e->logprob);
        put_token(f, &e->token);
        for (size_t k = 0; k < e->n_top; k++) {
            fputs(k == 0 ? "  | " : ", ", f);
            put_token(f, &e->top[k]->token);
            fprintf(f, " %.4f", (double)e->top[k]->logprob);
        }
        fputc('\n', f);
        if (e->logprob == e->logprob) {
            sink->sum += e->logprob;
            sink->tokens++;
        }
    }
}

/* Closes the sink; when the call succeeded, prints "what: N tokens, sum, mean (perplexity)"
 * and the lines to stderr. */
static void lp_sink_finish(lp_sink_t *k, const char *what, bool print)
{
    if (k->f == NULL)
        return;
    fclose(k->f);
    if (print) {
        size_t n = k->tokens;
        fprintf(stderr, "%s: %zu tokens, sum %.4f, mean %.4f (perplexity %.3f)\n", what, n, k->sum,
                n ? k->sum / (double)n : 0.0, n ? exp(-k->sum / (double)n) : 1.0);
        fwrite(k->text, 1, k->len, stderr);
    }
    free(k->text);
    k->f = NULL;
}

static int on_chunk(void *arg, const Ferry__V1__GenerateResponse *m)
{
    remote_state_t *st = arg;
    if (st->n_msgs++ == 0)
        st->t_first = fy_clock_ns();
    if (m->text != NULL && m->text[0] != '\0') {
        fputs(m->text, stdout);
        fflush(stdout);
    }
    if (st->o->show_ids)
        for (size_t i = 0; i < m->n_token_ids; i++)
            fprintf(stderr, "%s%u", i == 0 && st->n_msgs == 1 ? "ids:" : " ", m->token_ids[i]);
    put_logprobs(&st->lp, m->logprobs, m->n_logprobs);
    put_logprobs(&st->plp, m->prompt_logprobs, m->n_prompt_logprobs);
    if (m->stats != NULL) {
        st->stats = *m->stats;
        snprintf(st->policy, sizeof(st->policy), "%s", m->stats->policy ? m->stats->policy : "");
        snprintf(st->prefill, sizeof(st->prefill), "%s",
                 m->stats->prefill_worker ? m->stats->prefill_worker : "");
        snprintf(st->decode, sizeof(st->decode), "%s",
                 m->stats->decode_worker ? m->stats->decode_worker : "");
        st->have_stats = true;
    }
    if (m->finish_reason != FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED)
        st->finish = m->finish_reason;
    return 0;
}

/* Generation through a router over the SDK, streaming the text as it arrives. */
static int generate_remote(const remote_opts_t *o, const mdl_sampler_params_t *sp)
{
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = o->router;
    p.token = o->token;
    p.timeout_ms = (uint32_t)FY_MIN(o->timeout_ms, (uint64_t)UINT32_MAX);
    p.max_message = 64u << 20;
    p.tls_ca = o->tls_ca;
    p.tls_any_name = o->tls_any_name;
    ferry_client_t *client = NULL;
    if (ferry_client_create(&p, &client) != 0) {
        fprintf(stderr, "ferry generate: bad router address '%s'%s\n", o->router,
                o->tls_ca && o->tls_ca[0] ? " or --tls-ca file" : "");
        return 2;
    }
    Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
    Ferry__V1__SamplingParams s = FERRY__V1__SAMPLING_PARAMS__INIT;
    Ferry__V1__CodecParams codec = FERRY__V1__CODEC_PARAMS__INIT;
    Ferry__V1__ChatMessages chat = FERRY__V1__CHAT_MESSAGES__INIT;
    Ferry__V1__ChatMessage m_sys = FERRY__V1__CHAT_MESSAGE__INIT,
                           m_user = FERRY__V1__CHAT_MESSAGE__INIT;
    Ferry__V1__ChatMessage *msgs[2];
    if (o->chat) {
        size_t n = 0;
        if (o->system != NULL) {
            m_sys.role = "system";
            m_sys.content = (char *)o->system;
            msgs[n++] = &m_sys;
        }
        m_user.role = "user";
        m_user.content = (char *)o->prompt;
        msgs[n++] = &m_user;
        chat.messages = msgs;
        chat.n_messages = n;
        req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_CHAT;
        req.chat = &chat;
    } else {
        req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
        req.prompt = (char *)o->prompt;
    }
    // The same sampling as --local: the CLI's defaults travel explicitly.
    s.temperature = sp->temperature;
    s.top_k = (uint32_t)sp->top_k;
    s.top_p = sp->top_p;
    s.repetition_penalty = sp->repetition_penalty;
    s.presence_penalty = sp->presence_penalty;
    s.frequency_penalty = sp->frequency_penalty;
    s.json_object = o->json;
    if (o->schema != NULL)
        s.json_schema = o->schema;
    s.prompt_logprobs = o->prompt_logprobs;
    s.seed = sp->seed;
    s.max_tokens = (uint32_t)sp->max_tokens;
    s.stop = (char **)o->stops;
    s.n_stop = o->n_stops;
    req.sampling = &s;
    codec.policy = (char *)(o->policy ? o->policy : "");
    codec.budget = (float)o->budget;
    req.codec = &codec;
    req.return_token_ids = o->show_ids;
    s.logprobs = o->logprobs >= 0;
    s.top_logprobs = o->logprobs > 0 ? (uint32_t)o->logprobs : 0;
    Ferry__V1__TokenizeResponse *forced = NULL;
    if (o->score != NULL) { // the router's tokenizer, so the ids are the model's
        Ferry__V1__TokenizeRequest tr = FERRY__V1__TOKENIZE_REQUEST__INIT;
        tr.text = (char *)o->score;
        ferry_error_t terr;
        int tc = ferry_tokenize(client, &tr, &forced, &terr);
        if (tc != 0 || forced->n_ids == 0) {
            fprintf(stderr, "ferry generate: --score: %s\n",
                    tc != 0 ? terr.message : "the text has no tokens");
            ferry_message_free(forced);
            ferry_client_destroy(client);
            return 1;
        }
        s.forced_token_ids = forced->ids;
        s.n_forced_token_ids = forced->n_ids;
        s.max_tokens = 0;
        s.stop = NULL;
        s.n_stop = 0;
    }
    remote_state_t st = {.o = o, .t0 = fy_clock_ns()};
    if ((o->logprobs >= 0 && (st.lp.f = open_memstream(&st.lp.text, &st.lp.len)) == NULL) ||
        (o->prompt_logprobs && (st.plp.f = open_memstream(&st.plp.text, &st.plp.len)) == NULL)) {
        lp_sink_finish(&st.lp, "logprobs", false);
        fprintf(stderr, "ferry generate: out of memory\n");
        ferry_client_destroy(client);
        return 1;
    }
    ferry_error_t err;
    int code = ferry_generate(client, &req, on_chunk, &st, &err);
    uint64_t t_end = fy_clock_ns();
    ferry_message_free(forced);
    if (code == 0 || st.n_msgs > 0) { // ends the streamed text; a refused request printed none
        fputc('\n', stdout);
        fflush(stdout);
        if (o->show_ids)
            fputc('\n', stderr);
    }
    lp_sink_finish(&st.plp, "prompt logprobs", code == 0);
    lp_sink_finish(&st.lp, "logprobs", code == 0);
    ferry_client_destroy(client);
    if (code != 0) {
        fprintf(stderr, "ferry generate: %s: %s\n", ferry_code_name(code), err.message);
        return 1;
    }
    if (o->stats && st.have_stats) {
        const Ferry__V1__RequestStats *r = &st.stats;
        char budget[32];
        if (r->budget > 0)
            snprintf(budget, sizeof(budget), "%.3g", (double)r->budget);
        else
            snprintf(budget, sizeof(budget), "(policy's)");
        double gen_s = (t_end - (st.t_first ? st.t_first : st.t0)) / 1e9;
        fprintf(stderr,
                "prompt %u tokens, completion %u tokens (%s); TTFT %.1f ms (client %.1f ms), "
                "TPOT %.2f ms, %.1f tok/s\n"
                "KV %llu bytes raw -> %llu bytes wire (%.3f), prefill %.1f ms (queued %.1f ms), "
                "transfer %.1f ms (%.0f%% hidden); policy %s, budget %s; prefill %s, decode %s\n",
                r->prompt_tokens, r->completion_tokens,
                st.finish == FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH ? "length" : "stop",
                r->ttft_ms, st.t_first ? (st.t_first - st.t0) / 1e6 : 0.0, r->tpot_ms,
                r->completion_tokens > 1 && gen_s > 0 ? (r->completion_tokens - 1) / gen_s : 0.0,
                (unsigned long long)r->kv_raw_bytes, (unsigned long long)r->kv_wire_bytes,
                r->kv_raw_bytes ? (double)r->kv_wire_bytes / (double)r->kv_raw_bytes : 0.0,
                r->prefill_ms, r->queue_ms, r->transfer_ms, r->hidden_transfer_fraction * 100,
                st.policy[0] ? st.policy : "(worker default)", budget,
                st.prefill, st.decode);
    }
    return 0;
}

int cli_generate_main(int argc, char **argv)
{
    tune_blas(argc, argv, "generate");
    const char *model_path = NULL, *prompt = NULL, *system = NULL, *router = NULL;
    const char *policy = NULL, *token = getenv("FERRY_TOKEN"), *positional[2] = {NULL, NULL};
    const char *score = NULL, *tls_ca = getenv("FERRY_TLS_CA");
    bool tls_any_name = false;
    if (token == NULL || token[0] == '\0')
        token = getenv("FERRY_API_KEY");
    const char *stops[8];
    size_t n_stops = 0, n_positional = 0;
    bool local = false, chat = false, stats = false, show_ids = false, json = false;
    bool prompt_lps = false;
    const char *schema_path = NULL;
    int threads = 0, logprobs = -1;
    double budget = 0;
    uint64_t timeout_ms = 300000;
    mdl_device_t device = MDL_DEVICE_CPU;
    mdl_sampler_params_t sp;
    mdl_sampler_params_default(&sp);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        double x;
#define NUM(flag, lo, hi)                                                                       \
    (strcmp(a, flag) == 0 && (val == NULL || !parse_num(val, lo, hi, &x)                       \
                                  ? (fprintf(stderr, "ferry generate: %s needs a number in "   \
                                                     "[%g, %g]\n", flag, (double)(lo),        \
                                             (double)(hi)),                                    \
                                     exit(2), 0)                                               \
                                  : (i++, 1)))
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--local") == 0) {
            local = true;
        } else if (strcmp(a, "--chat") == 0) {
            chat = true;
        } else if (strcmp(a, "--stats") == 0) {
            stats = true;
        } else if (strcmp(a, "--json") == 0) {
            json = true;
        } else if (strcmp(a, "--json-schema") == 0 && val != NULL) {
            schema_path = val;
            i++;
        } else if (strcmp(a, "--prompt-logprobs") == 0) {
            prompt_lps = true;
        } else if (strcmp(a, "--model") == 0 && val != NULL) {
            model_path = val;
            i++;
        } else if (strcmp(a, "--device") == 0 && val != NULL) {
            if (mdl_device_parse(val, &device) != FY_OK) {
                fprintf(stderr, "ferry generate: --device takes cpu or cuda\n");
                return 2;
            }
            i++;
        } else if (strcmp(a, "--system") == 0 && val != NULL) {
            system = val;
            i++;
        } else if (strcmp(a, "--router") == 0 && val != NULL) {
            router = val;
            i++;
        } else if (strcmp(a, "--policy") == 0 && val != NULL) {
            policy = val;
            i++;
        } else if (strcmp(a, "--score") == 0 && val != NULL) {
            score = val;
            i++;
        } else if (strcmp(a, "--token") == 0 && val != NULL) {
            token = val;
            i++;
        } else if (strcmp(a, "--tls-ca") == 0 && val != NULL) {
            tls_ca = val;
            i++;
        } else if (strcmp(a, "--tls-any-name") == 0) {
            tls_any_name = true;
        } else if (strcmp(a, "--stop") == 0 && val != NULL) {
            if (n_stops == FY_ARRAY_SIZE(stops)) {
                fprintf(stderr, "ferry generate: at most %zu --stop strings\n",
                        FY_ARRAY_SIZE(stops));
                return 2;
            }
            stops[n_stops++] = val;
            i++;
        } else if (strcmp(a, "--timeout") == 0 && val != NULL) {
            if (fy_parse_duration_ms(val, &timeout_ms) != FY_OK) {
                fprintf(stderr, "ferry generate: bad --timeout '%s'\n", val);
                return 2;
            }
            i++;
        } else if (strcmp(a, "--ids") == 0) {
            show_ids = true;
        } else if (NUM("--budget", 1e-6, 1)) {
            budget = x;
        } else if (NUM("--max-tokens", 1, 1 << 20)) {
            sp.max_tokens = (int)x;
        } else if (NUM("--temperature", 0, 100)) {
            sp.temperature = (float)x;
        } else if (NUM("--top-k", 0, 1 << 24)) {
            sp.top_k = (int)x;
        } else if (NUM("--top-p", 1e-6, 1)) {
            sp.top_p = (float)x;
        } else if (NUM("--repeat-penalty", 1e-3, 100)) {
            sp.repetition_penalty = (float)x;
        } else if (NUM("--presence-penalty", -2, 2)) {
            sp.presence_penalty = (float)x;
        } else if (NUM("--frequency-penalty", -2, 2)) {
            sp.frequency_penalty = (float)x;
        } else if (NUM("--seed", 0, 1.8e19)) {
            sp.seed = (uint64_t)x;
        } else if (NUM("--threads", 0, 1024)) {
            threads = (int)x;
        } else if (NUM("--logprobs", 0, MDL_MAX_TOP_LOGPROBS)) {
            logprobs = (int)x;
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "ferry generate: unknown option %s\n", a);
            usage(stderr);
            return 2;
        } else if (n_positional < 2) {
            positional[n_positional++] = a;
        } else {
            fprintf(stderr, "ferry generate: one prompt only (quote it)\n");
            return 2;
        }
#undef NUM
    }
    // "ADDR prompt": the address may come first instead of --router.
    if (n_positional == 2 && !local && router == NULL) {
        router = positional[0];
        prompt = positional[1];
    } else if (n_positional == 1) {
        prompt = positional[0];
    } else if (n_positional == 2) {
        fprintf(stderr, "ferry generate: one prompt only (quote it)\n");
        return 2;
    }
    if (local && router != NULL) {
        fprintf(stderr, "ferry generate: --local and --router exclude each other\n");
        return 2;
    }
    if (local && (logprobs >= 0 || score != NULL || prompt_lps)) {
        fprintf(stderr, "ferry generate: --logprobs, --prompt-logprobs and --score go through a "
                        "router (not --local)\n");
        return 2;
    }
    if (score != NULL && logprobs < 0)
        logprobs = 0; // scoring prints the log-probabilities
    if (schema_path != NULL && json) {
        fprintf(stderr, "ferry generate: --json and --json-schema exclude each other\n");
        return 2;
    }
    char *schema_text = schema_path != NULL ? read_schema(schema_path) : NULL;
    if (schema_path != NULL && schema_text == NULL)
        return 2;
    if (!local) {
        if (router == NULL || prompt == NULL) {
            usage(stderr);
            return 2;
        }
        remote_opts_t ro = {.router = router,
                            .prompt = prompt,
                            .system = system,
                            .chat = chat,
                            .policy = policy,
                            .budget = budget,
                            .token = token,
                            .tls_ca = tls_ca,
                            .tls_any_name = tls_any_name,
                            .timeout_ms = timeout_ms,
                            .stops = stops,
                            .n_stops = n_stops,
                            .stats = stats,
                            .show_ids = show_ids,
                            .logprobs = logprobs,
                            .score = score,
                            .json = json,
                            .schema = schema_text,
                            .prompt_logprobs = prompt_lps};
        int rc = generate_remote(&ro, &sp);
        free(schema_text);
        return rc;
    }
    if (model_path == NULL || prompt == NULL) {
        usage(stderr);
        free(schema_text);
        return 2;
    }
    mdl_schema_t *schema = NULL;
    if (schema_text != NULL) {
        char why[200];
        fy_status_t cs =
            mdl_schema_compile(schema_text, strlen(schema_text), &schema, why, sizeof(why));
        free(schema_text);
        if (cs != FY_OK) {
            fprintf(stderr, "ferry generate: --json-schema %s: %s\n", schema_path, why);
            return 2;
        }
    }

    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = model_path;
    mp.device = device;
    mdl_model_t *model = NULL;
    mdl_ctx_t *ctx = NULL;
    mdl_kv_t *kv = NULL;
    mdl_kv_seq_t *seq = NULL;
    mdl_sampler_t *smp = NULL;
    mdl_json_vocab_t *jv = NULL;
    int32_t *ids = NULL;
    float *logits = NULL;
    char *text = NULL;
    int rc = 1;
    fy_status_t st = mdl_model_create(&mp, &model, err, sizeof(err));
    if (st != FY_OK) {
        fprintf(stderr, "ferry generate: %s (%s)\n", err[0] ? err : "cannot load model",
                fy_status_str(st));
        mdl_schema_destroy(schema);
        return 1;
    }
    const mdl_config_t *cfg = mdl_model_config(model);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(model);

    if (chat) {
        mdl_chat_msg_t msgs[2];
        size_t n_msgs = 0;
        if (system != NULL)
            msgs[n_msgs++] = (mdl_chat_msg_t){"system", system};
        msgs[n_msgs++] = (mdl_chat_msg_t){"user", prompt};
        st = mdl_chat_render(tok, msgs, n_msgs, true, &text);
        if (st != FY_OK) {
            fprintf(stderr, "ferry generate: this model has no ChatML chat template\n");
            goto out;
        }
    } else {
        text = strdup(prompt);
    }
    size_t n_ids = 0, len = strlen(text);
    mdl_tokenizer_encode(tok, text, len, chat, NULL, 0, &n_ids);
    size_t cap = n_ids + 1;
    ids = malloc(cap * sizeof(int32_t));
    size_t off = mdl_tokenizer_add_bos(tok) ? 1 : 0;
    if (ids == NULL ||
        mdl_tokenizer_encode(tok, text, len, chat, ids + off, cap - off, &n_ids) != FY_OK)
        goto out;
    if (off)
        ids[0] = mdl_tokenizer_bos(tok);
    n_ids += off;
    if (n_ids == 0) {
        fprintf(stderr, "ferry generate: empty prompt\n");
        goto out;
    }
    if ((int64_t)n_ids + sp.max_tokens > cfg->n_ctx_train)
        sp.max_tokens = (int)FY_MAX(1, cfg->n_ctx_train - (int64_t)n_ids);
    if ((int64_t)n_ids >= cfg->n_ctx_train) {
        fprintf(stderr, "ferry generate: prompt of %zu tokens exceeds the context (%d)\n", n_ids,
                cfg->n_ctx_train);
        goto out;
    }
    if (mdl_tokenizer_eos(tok) >= 0 && sp.n_stop < MDL_MAX_STOP)
        sp.stop[sp.n_stop++] = mdl_tokenizer_eos(tok);
    int32_t turn_end = mdl_chat_end_token(tok); // <|im_end|>, <|eot_id|>, ...
    if (turn_end >= 0 && sp.n_stop < MDL_MAX_STOP)
        sp.stop[sp.n_stop++] = turn_end;

    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = threads;
    cp.device = device;
    cp.max_batch = 1;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, model);
    kp.n_pages = mdl_kv_pages_for(&kp, (int64_t)n_ids + sp.max_tokens + 1);
    if ((json || schema != NULL) && (st = mdl_json_vocab_create(tok, &jv)) == FY_OK) {
        sp.json = jv;
        sp.schema = schema;
    }
    if (st != FY_OK || (st = mdl_ctx_create(model, &cp, &ctx)) != FY_OK ||
        (st = mdl_kv_create(&kp, &kv)) != FY_OK || (st = mdl_kv_seq_create(kv, &seq)) != FY_OK ||
        (st = mdl_sampler_create(&sp, cfg->n_vocab, &smp)) != FY_OK) {
        fprintf(stderr, "ferry generate: setup failed: %s\n", fy_status_str(st));
        goto out;
    }
    logits = malloc((size_t)cfg->n_vocab * sizeof(float));
    if (logits == NULL)
        goto out;
    for (size_t i = 0; i < n_ids; i++)
        mdl_sampler_accept(smp, ids[i]);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = seq;
    uint64_t t0 = fy_clock_ns();
    if ((st = mdl_prefill(ctx, ids, (int)n_ids, &pp, logits)) != FY_OK) {
        fprintf(stderr, "ferry generate: prefill failed: %s\n", fy_status_str(st));
        goto out;
    }
    uint64_t t1 = fy_clock_ns();
    mdl_detok_t dt;
    mdl_detok_init(&dt, tok, true);
    char buf[1024];
    int n_gen = 0;
    for (;;) {
        int32_t next = mdl_sampler_sample(smp, logits);
        mdl_sampler_accept_output(smp, next);
        n_gen++;
        bool stop = mdl_sampler_done(smp, next);
        bool is_stop = false;
        for (int i = 0; i < sp.n_stop; i++)
            is_stop |= sp.stop[i] == next;
        if (!is_stop && mdl_detok_push(&dt, next, buf, sizeof(buf)) > 0) {
            fputs(buf, stdout);
            fflush(stdout);
        }
        if (stop)
            break;
        if ((st = mdl_decode(ctx, &seq, &next, 1, logits)) != FY_OK) {
            fprintf(stderr, "\nferry generate: decode failed: %s\n", fy_status_str(st));
            goto out;
        }
    }
    if (mdl_detok_flush(&dt, buf, sizeof(buf)) > 0)
        fputs(buf, stdout);
    fputc('\n', stdout);
    uint64_t t2 = fy_clock_ns();
    if (stats)
        fprintf(stderr, "prompt: %zu tokens, %.1f tok/s; generated: %d tokens, %.1f tok/s\n",
                n_ids, n_ids / ((t1 - t0) / 1e9), n_gen, n_gen / ((t2 - t1) / 1e9));
    rc = 0;
out:
    free(logits);
    free(ids);
    free(text);
    mdl_sampler_destroy(smp);
    mdl_schema_destroy(schema);
    mdl_json_vocab_destroy(jv);
    mdl_kv_seq_destroy(seq);
    mdl_kv_destroy(kv);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(model);
    return rc;
}
