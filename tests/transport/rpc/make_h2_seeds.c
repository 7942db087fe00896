/*
 * make_h2_seeds: writes the seed corpus of fuzz_rpc_server (one client connection's bytes
 * per file) with nghttp2's client session: well-formed unary and streaming calls, a
 * deadline, a cancel, unknown method, bad content type, oversize and truncated messages.
 *
 *   make_h2_seeds OUT_DIR
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nghttp2/nghttp2.h>

typedef struct {
    const uint8_t *body;
    size_t len, off;
} body_t;

static ssize_t rd(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length, uint32_t *flags,
                  nghttp2_data_source *src, void *ud)
{
    body_t *b = src->ptr;
    size_t n = b->len - b->off < length ? b->len - b->off : length;
    if (n)
        memcpy(buf, b->body + b->off, n);
    b->off += n;
    if (b->off == b->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

#define NV(a, b)                                                                                   \
    {                                                                                              \
        (uint8_t *)(a), (uint8_t *)(b), sizeof(a) - 1, strlen(b), 0                                \
    }

static void seed(const char *dir, const char *name, const char *path, const char *ctype,
                 const char *timeout, const uint8_t *body, size_t len, bool cancel)
{
    nghttp2_session_callbacks *cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session *s;
    nghttp2_session_client_new(&s, cbs, NULL);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, NULL, 0);
    nghttp2_nv nv[8] = {NV(":method", "POST"), NV(":scheme", "http"), NV(":path", path),
                        NV(":authority", "x"), NV("te", "trailers"),  NV("content-type", ctype)};
    size_t n = 6;
    if (timeout) {
        nghttp2_nv t = NV("grpc-timeout", timeout);
        nv[n++] = t;
    }
    body_t b = {body, len, 0};
    nghttp2_data_provider dp = {.source.ptr = &b, .read_callback = rd};
    int32_t id = nghttp2_submit_request(s, NULL, nv, n, &dp, NULL);
    char file[1024];
    snprintf(file, sizeof(file), "%s/%s", dir, name);
    FILE *f = fopen(file, "wb");
    const uint8_t *p;
    ssize_t m;
    while ((m = nghttp2_session_mem_send(s, &p)) > 0)
        fwrite(p, 1, (size_t)m, f);
    if (cancel) {
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
        while ((m = nghttp2_session_mem_send(s, &p)) > 0)
            fwrite(p, 1, (size_t)m, f);
    }
    fclose(f);
    nghttp2_session_del(s);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: make_h2_seeds OUT_DIR\n");
        return 2;
    }
    const char *d = argv[1];
    const char *g = "application/grpc";
    static const uint8_t unary[] = {0, 0, 0, 0, 7, 0x12, 5, 'h', 'e', 'l', 'l', 'o'};
    static const uint8_t stream[] = {0, 0, 0, 0, 2, 0x08, 3};
    static const uint8_t fail[] = {0, 0, 0, 0, 5, 0x08, 5, 0x12, 1, 'x'};
    static const uint8_t trunc[] = {0, 0, 0, 0, 9, 1, 2};
    static const uint8_t huge[] = {0, 0, 1, 0, 0, 0};
    static const uint8_t comp[] = {1, 0, 0, 0, 0};
    seed(d, "h2_unary", "/ferry.test.Echo/Unary", g, NULL, unary, sizeof(unary), false);
    seed(d, "h2_stream", "/ferry.test.Echo/Stream", g, NULL, stream, sizeof(stream), false);
    seed(d, "h2_fail", "/ferry.test.Echo/Fail", g, NULL, fail, sizeof(fail), false);
    seed(d, "h2_deadline", "/ferry.test.Echo/Unary", g, "1m", unary, sizeof(unary), false);
    seed(d, "h2_cancel", "/ferry.test.Echo/Stream", g, NULL, stream, sizeof(stream), true);
    seed(d, "h2_unknown", "/ferry.test.Echo/Slow", g, NULL, unary, sizeof(unary), false);
    seed(d, "h2_ctype", "/ferry.test.Echo/Unary", "text/plain", NULL, unary, sizeof(unary), false);
    seed(d, "h2_trunc", "/ferry.test.Echo/Unary", g, NULL, trunc, sizeof(trunc), false);
    seed(d, "h2_huge", "/ferry.test.Echo/Unary", g, NULL, huge, sizeof(huge), false);
    seed(d, "h2_comp", "/ferry.test.Echo/Unary", g, NULL, comp, sizeof(comp), false);
    return 0;
}
