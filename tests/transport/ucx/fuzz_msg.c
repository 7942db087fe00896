// Fuzz target: kvlink message headers as they arrive from the network. The first byte picks
// the active message id, the rest is the header. A header that unpacks must pack back to the
// same bytes (no field is silently dropped or invented).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvlink_int.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint32_t id = data[0] % (KVLINK_AM_COUNT + 2);
    kvlink_msg_t m;
    if (kvlink_msg_unpack(id, data + 1, size - 1, &m) != FY_OK)
        return 0;
    uint8_t out[KVLINK_HDR_MAX];
    size_t n = kvlink_msg_pack(&m, out);
    if (n != size - 1 || memcmp(out, data + 1, n) != 0)
        abort();
    return 0;
}
