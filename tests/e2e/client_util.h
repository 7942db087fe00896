/*
 * client_util.h: helpers for end-to-end tests that talk to a router through the client SDK.
 */
#ifndef FERRY_TESTS_CLIENT_UTIL_H
#define FERRY_TESTS_CLIENT_UTIL_H

#include "daemon_util.h"
#include "ferry_client.h"

typedef struct {
    int code;
    bool done;
    uint32_t n_ids;
} du_stream_t;

static inline void du_stream_msg(ferry_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    (void)call;
    du_stream_t *s = arg;
    s->n_ids += (uint32_t)((const Ferry__V1__GenerateResponse *)msg)->n_token_ids;
}

static inline void du_stream_done(ferry_call_t *call, int code, const char *message, void *arg)
{
    (void)call;
    du_stream_t *s = arg;
    s->code = code;
    s->done = true;
    if (code != 0)
        fprintf(stderr, "stream: %s %s\n", ferry_code_name(code), message);
}

/* Runs n Generate streams at once through the router at router_addr, on a private loop: four
 * short prompts in turn, max_tokens tokens each with EOS ignored. Returns how many ended OK
 * with exactly max_tokens tokens (-1 if they could not be started); failures are printed. */
static inline int du_concurrent_streams(const char *router_addr, int n, uint32_t max_tokens)
{
    static const char *const prompts[] = {"One", "Two birds", "The sky is", "Numbers: 1, 2,"};
    uv_loop_t loop;
    uv_loop_init(&loop);
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = router_addr;
    p.timeout_ms = 300000;
    ferry_client_t *c = NULL;
    du_stream_t *res = calloc((size_t)n, sizeof(*res));
    int started = 0;
    if (res != NULL && ferry_client_create_on_loop(&loop, &p, &c) == 0) {
        for (; started < n; started++) {
            Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
            Ferry__V1__SamplingParams s = FERRY__V1__SAMPLING_PARAMS__INIT;
            req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
            req.prompt = (char *)prompts[started % 4];
            s.max_tokens = max_tokens;
            s.ignore_eos = true;
            req.sampling = &s;
            req.return_token_ids = true;
            if (ferry_call_async(c, "/ferry.v1.Ferry/Generate", &req.base,
                                 &ferry__v1__generate_response__descriptor, NULL, du_stream_msg,
                                 du_stream_done, &res[started], NULL) != 0)
                break;
        }
    }
    for (;;) {
        int done = 0;
        for (int i = 0; i < started; i++)
            done += res[i].done;
        if (done == started)
            break;
        uv_run(&loop, UV_RUN_ONCE);
    }
    ferry_client_destroy(c);
    du_drain_loop(&loop);
    uv_loop_close(&loop);
    int ok = started == n ? 0 : -1;
    for (int i = 0; i < started && ok >= 0; i++)
        ok += res[i].code == 0 && res[i].n_ids == max_tokens;
    free(res);
    return ok;
}

#endif /* FERRY_TESTS_CLIENT_UTIL_H */
