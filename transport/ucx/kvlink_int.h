/*
 * kvlink_int.h: private to transport/ucx. The wire messages of the kvlink protocol (pack and
 * validated unpack, no UCX needed, so the fuzz target reaches them) and the receive pool
 * allocator.
 *
 * Every message is one UCX active message whose id says its type and whose user header has
 * exactly the size below (little-endian, no padding ambiguity: packed by hand):
 *
 *   id  name       header bytes                                              data
 *   1   HELLO      magic u32, proto u32, codec u32, page u32, fingerprint u64,
 *                  instance u64, max_frame u64, status i32, reserved u32  (48)  -
 *   2   HELLO_ACK  same as HELLO, status = 0 or the refusal                (48)  reason text
 *   3   OPEN       request u64, flags u32, reserved u32                     (16)  -
 *   4   CREDIT     request u64, bytes u64, flags u32 (1 = initial), res u32 (24)  -
 *   5   FRAME      request u64, length u64, layer u32, crc32c u32,
 *                  flags u32 (1 = self-checked, crc 0), reserved u32        (32)  payload
 *   6   END        request u64, frames u32, reserved u32, bytes u64         (24)  -
 *   7   STATUS     request u64, status i32, reserved u32                    (16)  -   (to sender)
 *   8   ABORT      request u64, status i32, reserved u32                    (16)  -   (to receiver)
 */
#ifndef FERRY_KVLINK_INT_H
#define FERRY_KVLINK_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define KVLINK_MAGIC 0x4c4b5946u /* "FYKL" */

typedef enum {
    KVLINK_AM_HELLO = 1,
    KVLINK_AM_HELLO_ACK = 2,
    KVLINK_AM_OPEN = 3,
    KVLINK_AM_CREDIT = 4,
    KVLINK_AM_FRAME = 5,
    KVLINK_AM_END = 6,
    KVLINK_AM_STATUS = 7,
    KVLINK_AM_ABORT = 8,
    KVLINK_AM_COUNT = 9, /* ids are 1 .. KVLINK_AM_COUNT - 1 */
} kvlink_am_id_t;

#define KVLINK_HDR_MAX 48
#define KVLINK_REASON_MAX 200
#define KVLINK_CREDIT_INITIAL 1u
/* FRAME flag: the payload carries its own integrity check, validated by its consumer (a
 * kvcodec frame's CRC32C, checked by kvc_frame_parse); the crc32c field is 0 and the link
 * does not checksum the frame on either side. */
#define KVLINK_FRAME_SELF_CHECKED 1u

/* One decoded message header; which fields are meaningful depends on the id. */
typedef struct {
    kvlink_am_id_t id;
    // HELLO / HELLO_ACK
    uint32_t protocol_version, codec_version, page_size;
    uint64_t model_fingerprint, instance_id, max_frame;
    int32_t status; // HELLO_ACK, STATUS, ABORT
    // everything else
    uint64_t request_id;
    uint64_t bytes; // CREDIT: granted; FRAME: payload length; END: total payload
    uint32_t layer, crc, flags, frames;
} kvlink_msg_t;

/* Exact header size of message id; 0 for an unknown id. */
size_t kvlink_msg_size(uint32_t id);

/* Packs msg into out (at least KVLINK_HDR_MAX bytes); returns the header size. */
size_t kvlink_msg_pack(const kvlink_msg_t *msg, uint8_t *out);

/* Decodes and validates a header received as active message `id` with `len` bytes.
 * FY_ERR_FORMAT for an unknown id, a wrong size, a bad magic, reserved bits set or a status
 * that is not a Ferry status. Writes *msg_p only on success. */
fy_status_t kvlink_msg_unpack(uint32_t id, const void *hdr, size_t len, kvlink_msg_t *msg_p);

/* Checks a status value that came from the wire: one of fy_status_t, else FY_ERR_PROTOCOL. */
fy_status_t kvlink_status_from_wire(int32_t v);

/* ---- receive pool: first-fit extents over one registered region ---- */

typedef struct {
    size_t off, len;
} kvlink_extent_t;

typedef struct {
    size_t size;             /* bytes managed */
    size_t used;             /* bytes allocated (rounded) */
    kvlink_extent_t *free;   /* [n_free] sorted by offset, never adjacent */
    size_t n_free, cap_free;
} kvlink_pool_t;

#define KVLINK_POOL_ALIGN 256

fy_status_t kvlink_pool_init(kvlink_pool_t *pool, size_t size);
void kvlink_pool_cleanup(kvlink_pool_t *pool);
/* Allocates len bytes (rounded up to KVLINK_POOL_ALIGN); FY_ERR_RESOURCE_EXHAUSTED when no
 * extent fits. Writes the offset and rounded length. */
fy_status_t kvlink_pool_alloc(kvlink_pool_t *pool, size_t len, size_t *off_p, size_t *alen_p);
/* Returns an extent obtained from kvlink_pool_alloc. */
void kvlink_pool_free(kvlink_pool_t *pool, size_t off, size_t alen);

#endif /* FERRY_KVLINK_INT_H */
