/*
 * nccl_link_int.h: private to transport/nccl. The protocol core (nccl_link.c) drives a
 * backend through kvlink_nccl_ops_t: the NCCL one (nccl_link_nccl.c) in production, an
 * in-memory one in the tests, so the credits, deadlines, cancel and peer-failure logic run
 * under the sanitizers on machines without GPUs.
 *
 * Control block (KVLINK_NCCL_CTL_BYTES, little-endian), one each way per round:
 *   0  u32 magic "FYNC"      4 u16 protocol version   6 u16 n_entries
 *   8  u64 round number (both sides count rounds from 0; they must agree)
 *  16  u32 flags (bit 0: the hello record is valid)   20 u32 reserved, 0
 *  24  hello: u32 protocol_version, u32 codec_version, u32 page_size, u32 role,
 *             u64 model_fingerprint
 *  48  u8[16] reserved, 0
 *  64  n_entries x 32 bytes: u8 type, u8[3] 0, i32 status, u64 request_id, u32 layer,
 *      u32 crc, u64 bytes
 */
#ifndef FERRY_NCCL_LINK_INT_H
#define FERRY_NCCL_LINK_INT_H

#include "nccl_link.h"

#define KVLINK_NCCL_CTL_BYTES   8192u
#define KVLINK_NCCL_CTL_HDR     64u
#define KVLINK_NCCL_ENTRY_BYTES 32u
#define KVLINK_NCCL_MAX_ENTRIES                                                                    \
    ((KVLINK_NCCL_CTL_BYTES - KVLINK_NCCL_CTL_HDR) / KVLINK_NCCL_ENTRY_BYTES)
/* Frames announced in one round (each is one ncclSend/ncclRecv in the next round's group). */
#define KVLINK_NCCL_MAX_XFERS  64u
#define KVLINK_NCCL_MAGIC      0x434e5946u /* "FYNC" */
#define KVLINK_NCCL_FLAG_HELLO 1u

typedef enum {
    KVLINK_NCCL_E_OPEN = 1,   /* sender: request opened */
    KVLINK_NCCL_E_FRAME = 2,  /* sender: frame (layer, bytes, crc) follows next round */
    KVLINK_NCCL_E_END = 3,    /* sender: no more frames; layer = frame count, bytes = total */
    KVLINK_NCCL_E_CANCEL = 4, /* sender: request abandoned (status says why) */
    KVLINK_NCCL_E_CREDIT = 5, /* receiver: bytes more may be outstanding */
    KVLINK_NCCL_E_STATUS = 6, /* receiver: request ended (status) */
} kvlink_nccl_entry_type_t;

typedef struct {
    uint8_t type;
    int32_t status;
    uint64_t request_id;
    uint32_t layer;
    uint32_t crc;
    uint64_t bytes;
} kvlink_nccl_entry_t;

typedef struct {
    uint64_t round;
    bool has_hello;
    kvlink_compat_t compat;
    uint32_t role;
    size_t n_entries;
    kvlink_nccl_entry_t entries[KVLINK_NCCL_MAX_ENTRIES];
} kvlink_nccl_ctl_t;

/* Writes ctl into out[KVLINK_NCCL_CTL_BYTES] (n_entries <= KVLINK_NCCL_MAX_ENTRIES). */
void kvlink_nccl_ctl_pack(const kvlink_nccl_ctl_t *ctl, uint8_t *out);

/* Decodes a block from the peer: FY_ERR_FORMAT for a bad magic, version, count or reserved
 * bytes. Entry contents are checked by the caller. Writes *ctl_p only on success. */
fy_status_t kvlink_nccl_ctl_unpack(const uint8_t *in, kvlink_nccl_ctl_t *ctl_p);

/* One send or receive of a round. */
typedef struct {
    void *ptr;
    size_t len;
} kvlink_nccl_xfer_t;

typedef struct {
    /* FY_OK once the communicator is usable, FY_ERR_AGAIN while it is being set up, else
     * why it failed. */
    fy_status_t (*init_test)(void *be);
    /* Posts one round, in this order: the n transfers (send from, or receive into, ptr),
     * then ctl_out ([KVLINK_NCCL_CTL_BYTES], copied before return) to the peer while the
     * peer's block is received. */
    fy_status_t (*post_round)(void *be, const kvlink_nccl_xfer_t *xfers, size_t n, bool send,
                              const uint8_t *ctl_out);
    /* FY_OK when the posted round completed (the peer's block written to
     * ctl_in[KVLINK_NCCL_CTL_BYTES], the transfers done), FY_ERR_AGAIN while in flight, else
     * the failure (an asynchronous communicator error). */
    fy_status_t (*test_round)(void *be, uint8_t *ctl_in);
    /* Memory for received frames, on the pair's device. */
    fy_status_t (*mem_alloc)(void *be, size_t bytes, void **ptr_p);
    void (*mem_free)(void *be, void *ptr);
    /* Stops everything in flight now (the peer sees a dead peer); only mem_free and destroy
     * may follow. */
    void (*abort)(void *be);
    /* Frees the backend (after abort). */
    void (*destroy)(void *be);
} kvlink_nccl_ops_t;

/* Creates a pair over a backend. ops is borrowed (static), be is taken: destroyed with the
 * pair, or here on failure. */
fy_status_t kvlink_nccl_create_ops(const kvlink_nccl_ops_t *ops, void *be,
                                   const kvlink_nccl_params_t *params, kvlink_nccl_t **pair_p);

#endif /* FERRY_NCCL_LINK_INT_H */
