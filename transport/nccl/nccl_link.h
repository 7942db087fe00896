/*
 * nccl_link.h: the KV data plane between a prefill GPU and a decode GPU of one node, over
 * NCCL (transport/nccl). The same requests, credits, deadlines and cancel as the UCX link
 * (transport/ucx/kvlink.h), with frames that stay in GPU memory end to end.
 *
 * Objects:
 * - kvlink_nccl_t: one pair, i.e. one NCCL communicator of two ranks: rank 0 the sender
 *   (prefill GPU), rank 1 the receiver (decode GPU). One side makes the communicator's
 *   unique id (kvlink_nccl_id_create) and hands its bytes to the other over the control plane
 *   (RPC); both then create their end with it.
 * - kvlink_nccl_send_t: one request being pushed (sender side).
 * - kvlink_nccl_buf_t: one received frame in the receiver's device pool, owned by the
 *   application from the frame callback until kvlink_nccl_buf_release().
 *
 * Protocol (docs/gpu.md): the two ends run the same sequence of rounds. A round is one NCCL
 * group on the pair's stream: the frames announced in the previous round (sender: ncclSend
 * from the caller's device memory; receiver: ncclRecv into its pool), then an 8 KiB control
 * block each way. Control blocks carry, like the UCX link's messages: HELLO (compatibility
 * record, first round), OPEN, FRAME (request, layer, length, CRC32C), END and CANCEL from the
 * sender; CREDIT and STATUS from the receiver. The receiver grants a request's window only
 * after kvlink_nccl_recv_expect and returns credits as buffers are released; the sender never
 * announces more payload than granted. A round that does not complete within the peer
 * timeout (a dead or hung peer) or an NCCL asynchronous error aborts the communicator
 * (ncclCommAbort) and fails every request of the pair with FY_ERR_UNAVAILABLE.
 *
 * Frame bytes are device pointers on the pair's GPU. CRC32Cs are carried, not checked (the
 * bytes never reach the host): a consumer that validates frames compares kvlink_nccl_buf_crc.
 *
 * Threading: every function of a pair, and every callback, runs on the pair's owner thread;
 * callbacks run inside kvlink_nccl_progress, cancel and destroy. One thread may own several
 * pairs (on several GPUs): each call sets the pair's device itself.
 */
#ifndef FERRY_NCCL_LINK_H
#define FERRY_NCCL_LINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "kvlink.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the control-block protocol spoken by this build. */
#define KVLINK_NCCL_PROTOCOL_VERSION 1u
/* Size of a communicator's unique id (ncclUniqueId). */
#define KVLINK_NCCL_ID_BYTES 128u

typedef struct kvlink_nccl kvlink_nccl_t;
typedef struct kvlink_nccl_send kvlink_nccl_send_t;
typedef struct kvlink_nccl_buf kvlink_nccl_buf_t;

typedef enum {
    KVLINK_NCCL_SENDER = 0,   /* rank 0: prefill, sends frames */
    KVLINK_NCCL_RECEIVER = 1, /* rank 1: decode, receives frames */
} kvlink_nccl_role_t;

/* Makes a new communicator id (ncclGetUniqueId) into id[KVLINK_NCCL_ID_BYTES], to be carried
 * to the other side. Exists only in builds with NCCL (kvlink_nccl_dep), like
 * kvlink_nccl_create. Thread: any. */
fy_status_t kvlink_nccl_id_create(uint8_t *id);

/* Whether libnccl could be loaded (it is opened at run time, on first use; without it
 * kvlink_nccl_id_create and kvlink_nccl_create answer FY_ERR_UNSUPPORTED). Exists only in
 * builds with NCCL. Thread: any. */
bool kvlink_nccl_available(void);

/* ------------------------------------------------------------------------------------------ */
/* Pair                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* A frame arrived. data ([len] bytes of device memory on the pair's GPU, written and
 * visible: the receive completed) stays valid until kvlink_nccl_buf_release(buf), which must
 * be called exactly once, even after the request ended or failed. Credits come back on
 * release. */
typedef void (*kvlink_nccl_frame_cb)(kvlink_nccl_t *pair, uint64_t request_id, uint32_t layer,
                                     kvlink_nccl_buf_t *buf, void *data, size_t len, void *arg);

/* A receive request ended: FY_OK after END and every frame delivered; otherwise
 * FY_ERR_CANCELLED, FY_ERR_TIMEOUT, FY_ERR_UNAVAILABLE (peer dead or communicator failed),
 * FY_ERR_PROTOCOL (peer broke the rules), FY_ERR_CLOSED (pair destroyed). Called exactly
 * once per kvlink_nccl_recv_expect that returned FY_OK. */
typedef void (*kvlink_nccl_recv_end_cb)(kvlink_nccl_t *pair, uint64_t request_id, fy_status_t st,
                                        void *arg);

/* The pair finished its handshake (FY_OK) or failed (FY_ERR_MISMATCH, FY_ERR_TIMEOUT,
 * FY_ERR_UNAVAILABLE...; message says why). Called once for the handshake, and once more
 * if an established pair fails. */
typedef void (*kvlink_nccl_peer_cb)(kvlink_nccl_t *pair, fy_status_t st, const char *message,
                                    void *arg);

typedef struct {
    kvlink_compat_t compat; /* checked against the peer's in the first round */
    kvlink_nccl_role_t role;
    int device; /* CUDA device of this end */
    /* Receiver: device memory for incoming frames (one allocation); credits over all open
     * requests never exceed it. Ignored on the sender. */
    size_t recv_pool_bytes;
    size_t max_frame_bytes;   /* largest frame sent or accepted */
    uint32_t idle_round_us;   /* pause between rounds while neither side has work */
    uint32_t peer_timeout_ms; /* a round in flight longer than this: the peer is dead */
    uint32_t init_timeout_ms; /* communicator set-up plus handshake */
    /* Receiver callbacks (NULL on a sender) and the peer callback, with their argument. */
    kvlink_nccl_frame_cb on_frame;
    kvlink_nccl_recv_end_cb on_recv_end;
    kvlink_nccl_peer_cb on_peer;
    void *cb_arg;
} kvlink_nccl_params_t;

/* Defaults: compat {KVLINK_PROTOCOL_VERSION, 0, 0, 0}, sender on device 0, pool 256 MiB,
 * max frame 64 MiB, idle rounds every 500 us, peer timeout 5 s, init timeout 30 s.
 * Thread: any. */
void kvlink_nccl_params_default(kvlink_nccl_params_t *params);

/* Creates this end of a pair from the communicator id (id_len must be
 * KVLINK_NCCL_ID_BYTES): a stream, the receive pool and a non-blocking NCCL communicator on
 * params->device. The communicator and the handshake complete in kvlink_nccl_progress
 * (on_peer says how). FY_ERR_NO_DEVICE without a usable device. All device memory of the pair
 * is stream-ordered on its stream, so no call of the link ever waits for the device. params
 * and id are copied. Thread: the owner thread. */
fy_status_t kvlink_nccl_create(const uint8_t *id, size_t id_len, const kvlink_nccl_params_t *params,
                               kvlink_nccl_t **pair_p);

/* Aborts the communicator (the peer sees it as dead), fails every open request
 * (FY_ERR_CLOSED callbacks) and frees everything, unreleased buffers included. Accepts NULL.
 * Thread: the owner thread, not from a callback. */
void kvlink_nccl_destroy(kvlink_nccl_t *pair);

/* Moves the pair along without blocking: completes the round in flight (callbacks run
 * here), checks deadlines and the peer timeout, starts the next round. Call it often while
 * transfers are open (each round needs one call on each side), at least every idle round
 * otherwise. Returns FY_OK, or the pair's failure once it has failed. Thread: owner thread. */
fy_status_t kvlink_nccl_progress(kvlink_nccl_t *pair);

/* True once the handshake succeeded and the pair has not failed. Thread: owner thread. */
bool kvlink_nccl_ready(const kvlink_nccl_t *pair);

/* Whether frames are moving on the pair (announced, in a round, or queued by the sender), so
 * that its owner moves it at every loop turn rather than on a timer; false once failed.
 * Thread: owner thread. */
bool kvlink_nccl_moving(const kvlink_nccl_t *pair);

/* The same protocol over one TCP connection between two processes, frames in host memory
 * (nccl_link_sock.c): the pairing, the choice of link per request and the failure paths of
 * the daemons run on machines without GPUs with it. Always built. The receiver's side makes
 * the id: kvlink_nccl_sock_id_create listens on host (an address the sender can reach, port
 * chosen by the system) and writes it with a random token into id[KVLINK_NCCL_ID_BYTES];
 * the listener waits, in this process, for kvlink_nccl_sock_create with role RECEIVER and the
 * same id (FY_ERR_NOT_FOUND otherwise). The sender's kvlink_nccl_sock_create connects and
 * presents the token; a connection that presents another is closed. Frame pointers are host
 * memory; params->device is ignored. Thread: as kvlink_nccl_id_create / kvlink_nccl_create. */
fy_status_t kvlink_nccl_sock_id_create(const char *host, uint8_t *id);
fy_status_t kvlink_nccl_sock_create(const uint8_t *id, size_t id_len,
                                    const kvlink_nccl_params_t *params, kvlink_nccl_t **pair_p);

/* ------------------------------------------------------------------------------------------ */
/* Receive side                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    size_t credit_bytes;  /* window: payload bytes the sender may have outstanding */
    uint64_t deadline_ns; /* absolute fy_clock_ns() deadline; 0 = none */
} kvlink_nccl_recv_params_t;

/* Defaults: credits = the pair's max frame, no deadline. Thread: any. */
void kvlink_nccl_recv_params_default(const kvlink_nccl_t *pair, kvlink_nccl_recv_params_t *params);

/* Announces that request_id will arrive; must come before the sender opens it (the control
 * plane orders the two), else the open is refused with FY_ERR_NOT_FOUND. Reserves the window
 * from the pool. FY_ERR_EXISTS if already expected, FY_ERR_RESOURCE_EXHAUSTED if the pool
 * cannot back the window, FY_ERR_INVALID_ARG for a window of 0 or above the pool, FY_ERR_STATE
 * on a sender or a failed pair. Thread: owner thread. */
fy_status_t kvlink_nccl_recv_expect(kvlink_nccl_t *pair, uint64_t request_id,
                                    const kvlink_nccl_recv_params_t *params);

/* Cancels a receive request: tells the sender, discards frames still arriving, calls
 * on_recv_end(FY_ERR_CANCELLED). Delivered buffers stay owned by the application.
 * FY_ERR_NOT_FOUND if no such request is open. Thread: owner thread. */
fy_status_t kvlink_nccl_recv_cancel(kvlink_nccl_t *pair, uint64_t request_id);

/* Gives a delivered frame buffer back (its credits return to the sender). Accepts NULL.
 * Thread: owner thread. */
void kvlink_nccl_buf_release(kvlink_nccl_buf_t *buf);

/* The CRC32C the sender announced for this frame (0 when it supplied none). Thread: owner
 * thread, or any thread that owns buf. */
uint32_t kvlink_nccl_buf_crc(const kvlink_nccl_buf_t *buf);

/* ------------------------------------------------------------------------------------------ */
/* Send side                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* A frame's bytes are no longer used by the pair: received (FY_OK), or abandoned (the
 * request's failure). */
typedef void (*kvlink_nccl_frame_done_cb)(kvlink_nccl_send_t *req, fy_status_t st, void *arg);

/* The request ended: FY_OK once the receiver confirmed every frame; otherwise the failure
 * (FY_ERR_CANCELLED, FY_ERR_TIMEOUT, FY_ERR_UNAVAILABLE, FY_ERR_NOT_FOUND when the receiver
 * did not expect it...). Called exactly once; req must not be used after it returns, although
 * frame_done callbacks of frames already handed to NCCL may follow with the same pointer. */
typedef void (*kvlink_nccl_send_end_cb)(kvlink_nccl_send_t *req, fy_status_t st, void *arg);

typedef struct {
    uint64_t deadline_ns; /* absolute fy_clock_ns() deadline; 0 = none */
    kvlink_nccl_send_end_cb on_end;
    void *arg;
} kvlink_nccl_send_params_t;

/* Defaults: no deadline, no callback. Thread: any. */
void kvlink_nccl_send_params_default(kvlink_nccl_send_params_t *params);

/* Opens a request to the peer. params is copied. FY_ERR_EXISTS if request_id is open,
 * FY_ERR_STATE on a receiver or a failed pair. Thread: owner thread. */
fy_status_t kvlink_nccl_send_open(kvlink_nccl_t *pair, uint64_t request_id,
                                  const kvlink_nccl_send_params_t *params,
                                  kvlink_nccl_send_t **req_p);

/* Queues one frame. data ([len] bytes of device memory on the pair's GPU, 1 <= len <= max
 * frame, fully written before the call: synchronize the stream that produced it) is borrowed
 * until on_done (exactly once). Frames go out in order as credits allow. FY_ERR_STATE after
 * finish or failure, FY_ERR_OUT_OF_RANGE for a frame larger than the receiver's whole window
 * (on_done not called); a frame queued before the window was known and larger than it ends
 * the request with FY_ERR_OUT_OF_RANGE. Thread: owner thread. */
fy_status_t kvlink_nccl_send_frame(kvlink_nccl_send_t *req, uint32_t layer, const void *data,
                                   size_t len, kvlink_nccl_frame_done_cb on_done, void *arg);

/* kvlink_nccl_send_frame with the frame's CRC32C, e.g. computed by the encoder, passed on to
 * the receiver (kvlink_nccl_buf_crc). Thread: owner thread. */
fy_status_t kvlink_nccl_send_frame_crc(kvlink_nccl_send_t *req, uint32_t layer, const void *data,
                                       size_t len, uint32_t crc, kvlink_nccl_frame_done_cb on_done,
                                       void *arg);

/* No more frames: END follows the queued ones; on_end(FY_OK) when the receiver has all.
 * FY_ERR_STATE if already finished or failed. Thread: owner thread. */
fy_status_t kvlink_nccl_send_finish(kvlink_nccl_send_t *req);

/* Cancels: tells the receiver, fails queued frames with FY_ERR_CANCELLED, then on_end
 * (frames already handed to NCCL report done when their round completes). Thread: owner
 * thread. */
void kvlink_nccl_send_cancel(kvlink_nccl_send_t *req);

/* ------------------------------------------------------------------------------------------ */
/* Pair links in the daemons (nccl_link_pair.c, kvlink_pair_dep)                               */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    KVLINK_PAIR_OFF = 0,
    KVLINK_PAIR_NCCL = 1,   /* kvlink_nccl_create: GPU to GPU, frames in device memory */
    KVLINK_PAIR_SOCKET = 2, /* kvlink_nccl_sock_create: TCP, frames in host memory */
} kvlink_pair_kind_t;

/* Parses a daemon's --pair-link: "off", "nccl", "socket", or "auto" (nccl when this build has
 * NCCL and the worker's model is on a GPU, else off). FY_ERR_UNSUPPORTED for "nccl" without
 * NCCL or without cuda, FY_ERR_INVALID_ARG for another word. Thread: any. */
fy_status_t kvlink_pair_kind_parse(const char *s, bool cuda, kvlink_pair_kind_t *kind_p);
/* "nccl", "socket", or "" for off: what RegisterRequest.pair_link says. Thread: any. */
const char *kvlink_pair_kind_name(kvlink_pair_kind_t kind);
/* kvlink_nccl_id_create or kvlink_nccl_sock_id_create(host) by kind. Thread: any. */
fy_status_t kvlink_pair_id_create(kvlink_pair_kind_t kind, const char *host, uint8_t *id);
/* kvlink_nccl_create or kvlink_nccl_sock_create by kind. Thread: the owner thread. */
fy_status_t kvlink_pair_create(kvlink_pair_kind_t kind, const uint8_t *id, size_t id_len,
                               const kvlink_nccl_params_t *params, kvlink_nccl_t **pair_p);
/* This machine's identity for pairing, the kernel's boot id (32 hex digits) into buf
 * (cap >= 33): workers pair only when theirs are equal. FY_ERR_IO where the kernel has none.
 * Thread: any. */
fy_status_t kvlink_pair_node_id(char *buf, size_t cap);

/* What a worker registers for pairing (RegisterRequest.pair_link, node_id, pair_device). */
typedef struct {
    kvlink_pair_kind_t kind;
    char node_id[64];     /* "" when kind is OFF */
    char pair_device[64]; /* the GPU's UUID for NCCL, else "" */
} kvlink_pair_identity_t;

/* A worker's pairing from its --pair-link (link) and --node-id (node_id, NULL or "": the boot
 * id): kvlink_pair_kind_parse, then the node and, for NCCL, the UUID of CUDA device `device`.
 * Without a boot id or a GPU UUID pairing turns off (logged). FY_ERR_INVALID_ARG or
 * FY_ERR_UNSUPPORTED as kvlink_pair_kind_parse, or for a node id over 63 bytes; err says why.
 * Thread: any. */
fy_status_t kvlink_pair_identity(const char *link, const char *node_id, bool cuda, int device,
                                 kvlink_pair_identity_t *id_p, char *err, size_t err_len);

/* Daemons' idle rounds (kvlink_nccl_params_t.idle_round_us; both ends use the same). They
 * only tell that the peer is alive, since a receiver that expects requests keeps a round
 * posted; an idle socket pair costs each daemon ~3 % of a core with a 1 ms progress tick. */
#define KVLINK_PAIR_IDLE_ROUND_US 2000u

/* ------------------------------------------------------------------------------------------ */
/* Counters                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    uint64_t rounds;            /* rounds completed */
    uint64_t send_reqs;         /* send requests not yet freed */
    uint64_t recv_reqs;         /* receive requests not yet freed */
    uint64_t frames_queued;     /* sender frames waiting for credits */
    uint64_t frames_in_flight;  /* frames announced or in the round in flight */
    uint64_t bufs_out;          /* delivered buffers not yet released */
    uint64_t pool_used_bytes;   /* receive pool bytes allocated */
    uint64_t credit_reserved;   /* credit windows reserved from the pool */
    uint64_t frames_sent;       /* completed, sender side */
    uint64_t frames_delivered;  /* handed to on_frame */
    uint64_t bytes_delivered;   /* payload bytes handed to on_frame */
    uint64_t frames_discarded;  /* received for a cancelled or failed request */
    uint64_t credit_stalls;     /* times a sender frame waited for credits */
    uint64_t credit_violations; /* frames announced beyond the granted window */
    uint64_t max_outstanding;   /* largest outstanding payload of one request (receiver) */
    uint64_t rejected;          /* malformed or unexpected control entries */
} kvlink_nccl_stats_t;

/* Copies the counters. Thread: owner thread. */
void kvlink_nccl_stats(const kvlink_nccl_t *pair, kvlink_nccl_stats_t *stats_p);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_NCCL_LINK_H */
