/*
 * rpc_wire.c: the gRPC message layer that sits inside HTTP/2 DATA frames: the 5-byte length
 * prefix, reassembly across frames of any size, grpc-timeout values, grpc-message
 * percent-encoding and the status-code tables. Everything here treats its input as untrusted.
 */
#include <stdlib.h>
#include <string.h>

#include "rpc.h"

static const char *const k_code_names[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *rpc_code_name(int code)
{
    if (code < 0 || code >= (int)FY_ARRAY_SIZE(k_code_names))
        return "UNKNOWN";
    return k_code_names[code];
}

rpc_code_t rpc_code_from_status(fy_status_t st)
{
    return (rpc_code_t)fy_status_grpc_code(st);
}

fy_status_t rpc_code_to_status(int code)
{
    switch (code) {
    case RPC_CODE_OK:
        return FY_OK;
    case RPC_CODE_CANCELLED:
        return FY_ERR_CANCELLED;
    case RPC_CODE_INVALID_ARGUMENT:
        return FY_ERR_INVALID_ARG;
    case RPC_CODE_DEADLINE_EXCEEDED:
        return FY_ERR_TIMEOUT;
    case RPC_CODE_NOT_FOUND:
        return FY_ERR_NOT_FOUND;
    case RPC_CODE_ALREADY_EXISTS:
        return FY_ERR_EXISTS;
    case RPC_CODE_PERMISSION_DENIED:
        return FY_ERR_PERMISSION;
    case RPC_CODE_RESOURCE_EXHAUSTED:
        return FY_ERR_RESOURCE_EXHAUSTED;
    case RPC_CODE_FAILED_PRECONDITION:
        return FY_ERR_STATE;
    case RPC_CODE_ABORTED:
        return FY_ERR_BUSY;
    case RPC_CODE_OUT_OF_RANGE:
        return FY_ERR_OUT_OF_RANGE;
    case RPC_CODE_UNIMPLEMENTED:
        return FY_ERR_UNSUPPORTED;
    case RPC_CODE_UNAVAILABLE:
        return FY_ERR_UNAVAILABLE;
    case RPC_CODE_DATA_LOSS:
        return FY_ERR_CORRUPT;
    case RPC_CODE_UNAUTHENTICATED:
        return FY_ERR_UNAUTHENTICATED;
    default:
        return FY_ERR_INTERNAL;
    }
}

void rpc_reader_init(rpc_reader_t *r, uint32_t max_message)
{
    memset(r, 0, sizeof(*r));
    r->max_message = max_message;
}

void rpc_reader_cleanup(rpc_reader_t *r)
{
    free(r->msg);
    r->msg = NULL;
    r->msg_cap = 0;
}

bool rpc_reader_idle(const rpc_reader_t *r)
{
    return r->hdr_got == 0;
}

fy_status_t rpc_reader_feed(rpc_reader_t *r, const uint8_t *data, size_t len, rpc_reader_msg_cb cb,
                            void *arg)
{
    if (r->failed)
        return FY_ERR_PROTOCOL;
    while (len > 0) {
        if (r->hdr_got < 5) {
            size_t n = FY_MIN(len, (size_t)(5 - r->hdr_got));
            memcpy(r->hdr + r->hdr_got, data, n);
            r->hdr_got += (uint32_t)n;
            data += n;
            len -= n;
            if (r->hdr_got < 5)
                break;
            if (r->hdr[0] > 1) {
                r->failed = true;
                return FY_ERR_PROTOCOL;
            }
            if (r->hdr[0] == 1) {
                // No grpc-encoding is ever negotiated, so a compressed message is an error.
                r->failed = true;
                return FY_ERR_UNSUPPORTED;
            }
            uint32_t mlen = (uint32_t)r->hdr[1] << 24 | (uint32_t)r->hdr[2] << 16 |
                            (uint32_t)r->hdr[3] << 8 | (uint32_t)r->hdr[4];
            if (mlen > r->max_message) {
                r->failed = true;
                return FY_ERR_RESOURCE_EXHAUSTED;
            }
            r->msg_len = mlen;
            r->msg_got = 0;
        }
        size_t n = FY_MIN(len, (size_t)(r->msg_len - r->msg_got));
        if (r->msg == NULL || r->msg_got + n > r->msg_cap) {
            // Grow geometrically, never past the declared length.
            size_t want =
                FY_MAX((size_t)r->msg_got + n, FY_MIN((size_t)r->msg_cap * 2, (size_t)r->msg_len));
            want = FY_MAX(want, FY_MIN((size_t)r->msg_len, (size_t)4096));
            uint8_t *m = realloc(r->msg, want ? want : 1);
            if (m == NULL) {
                r->failed = true;
                return FY_ERR_NO_MEMORY;
            }
            r->msg = m;
            r->msg_cap = (uint32_t)want;
        }
        if (n > 0) {
            memcpy(r->msg + r->msg_got, data, n);
            r->msg_got += (uint32_t)n;
            data += n;
            len -= n;
        }
        if (r->msg_got == r->msg_len) {
            r->hdr_got = 0;
            fy_status_t st = cb ? cb(arg, r->msg, r->msg_len) : FY_OK;
            // Keep a small buffer for the next message; drop a large one.
            if (r->msg_cap > 65536) {
                free(r->msg);
                r->msg = NULL;
                r->msg_cap = 0;
            }
            if (st != FY_OK) {
                r->failed = true;
                return st;
            }
        }
    }
    return FY_OK;
}

fy_status_t rpc_message_pack(const ProtobufCMessage *msg, uint32_t max_message, uint8_t **buf_p,
                             size_t *len_p)
{
    size_t body = protobuf_c_message_get_packed_size(msg);
    if (body > max_message || body > UINT32_MAX)
        return FY_ERR_RESOURCE_EXHAUSTED;
    uint8_t *buf = malloc(body + 5);
    if (buf == NULL)
        return FY_ERR_NO_MEMORY;
    buf[0] = 0;
    buf[1] = (uint8_t)(body >> 24);
    buf[2] = (uint8_t)(body >> 16);
    buf[3] = (uint8_t)(body >> 8);
    buf[4] = (uint8_t)body;
    protobuf_c_message_pack(msg, buf + 5);
    *buf_p = buf;
    *len_p = body + 5;
    return FY_OK;
}

fy_status_t rpc_timeout_parse(const char *s, size_t len, uint64_t *ns_p)
{
    if (s == NULL || len < 2 || len > 9)
        return FY_ERR_FORMAT;
    uint64_t v = 0;
    for (size_t i = 0; i + 1 < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return FY_ERR_FORMAT;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    uint64_t mul;
    switch (s[len - 1]) {
    case 'H':
        mul = 3600ull * 1000000000ull;
        break;
    case 'M':
        mul = 60ull * 1000000000ull;
        break;
    case 'S':
        mul = 1000000000ull;
        break;
    case 'm':
        mul = 1000000ull;
        break;
    case 'u':
        mul = 1000ull;
        break;
    case 'n':
        mul = 1ull;
        break;
    default:
        return FY_ERR_FORMAT;
    }
    uint64_t ns;
    if (__builtin_mul_overflow(v, mul, &ns))
        ns = UINT64_MAX;
    *ns_p = ns;
    return FY_OK;
}

void rpc_timeout_format(uint64_t ms, char *buf, size_t buf_len)
{
    // At most 8 digits: switch to coarser units as the value grows.
    if (ms < 100000000ull)
        snprintf(buf, buf_len, "%llum", (unsigned long long)ms);
    else if (ms / 1000 < 100000000ull)
        snprintf(buf, buf_len, "%lluS", (unsigned long long)(ms / 1000));
    else if (ms / 60000 < 100000000ull)
        snprintf(buf, buf_len, "%lluM", (unsigned long long)(ms / 60000));
    else
        snprintf(buf, buf_len, "%lluH", (unsigned long long)FY_MIN(ms / 3600000, 99999999ull));
}

char *rpc_message_encode(const char *s)
{
    size_t n = strlen(s);
    char *out = malloc(n * 3 + 1);
    if (out == NULL)
        return NULL;
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c <= 0x7e && c != '%') {
            out[o++] = (char)c;
        } else {
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[o] = '\0';
    return out;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

char *rpc_message_decode(const char *s, size_t len)
{
    char *out = malloc(len + 1);
    if (out == NULL)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '%' && i + 2 < len && hexval(s[i + 1]) >= 0 && hexval(s[i + 2]) >= 0) {
            out[o++] = (char)(hexval(s[i + 1]) << 4 | hexval(s[i + 2]));
            i += 2;
        } else {
            out[o++] = s[i];
        }
    }
    out[o] = '\0';
    return out;
}
