// Fuzz target for the gRPC message layer: the input is split into DATA chunks at sizes taken
// from its first bytes and fed to the reader, whose messages are unpacked as an interop
// request; the tail also goes through the grpc-timeout and grpc-message parsers.
#include <stdint.h>
#include <stdlib.h>

#include "interop.pb-c.h"
#include "rpc.h"

static fy_status_t unpack(void *arg, const uint8_t *data, size_t len)
{
    ProtobufCMessage *m =
        protobuf_c_message_unpack(&ferry__test__echo_request__descriptor, NULL, len, data);
    if (m == NULL)
        return FY_ERR_CORRUPT;
    protobuf_c_message_free_unpacked(m, NULL);
    return FY_OK;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t step = (size_t)data[0] % 64 + 1;
    uint32_t max = (uint32_t)data[1] * 64;
    data += 2;
    size -= 2;
    rpc_reader_t r;
    rpc_reader_init(&r, max);
    for (size_t i = 0; i < size; i += step) {
        if (rpc_reader_feed(&r, data + i, FY_MIN(step, size - i), unpack, NULL) != FY_OK)
            break;
    }
    (void)rpc_reader_idle(&r);
    rpc_reader_cleanup(&r);
    uint64_t ns;
    (void)rpc_timeout_parse((const char *)data, FY_MIN(size, 12), &ns);
    char *d = rpc_message_decode((const char *)data, size);
    free(d);
    return 0;
}
