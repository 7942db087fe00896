// Fuzz target: bytes from a socket through the OpenAI front's HTTP reader, each request's body
// through the chat and completion parsers, and what parses back out through the answers.
// The first byte picks the mode: 0 = an HTTP stream (the next byte sets the chunk size), 1 =
// a chat body, 2 = a completion body.
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
        if (r.n < 1 || r.n > OAI_MAX_N)
            abort();
        oai_choice_out_t out[OAI_MAX_N];
        for (uint32_t i = 0; i < r.n; i++)
            out[i] = (oai_choice_out_t){text, strlen(text) / (i + 1),
                                        FERRY__V1__FINISH_REASON__FINISH_REASON_STOP};
        char *a = oai_render_completion(kind, "id", 1, r.model ? r.model : "m", out, r.n, NULL);
        char *b =
            oai_render_chunk(kind, "id", 1, "m", r.n - 1, NULL, text, strlen(text), NULL, true);
        if (a == NULL || b == NULL)
            abort(); // rendering may not fail on parsed input
        free(a);
        free(b);
        size_t n = protobuf_c_message_get_packed_size(&r.msg.base);
        uint8_t *buf = malloc(n ? n : 1);
        protobuf_c_message_pack(&r.msg.base, buf);
        free(buf);
    } else if (err[0] == '\0') {
        abort(); // every refusal says why
    }
    oai_request_clear(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    uint8_t mode = data[0] % 3;
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
