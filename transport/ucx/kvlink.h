/*
 * kvlink.h: the KV data plane over UCX (transport/ucx).
 *
 * The header is named after its prefix, kvlink_, rather than after the folder: "ucx.h" would
 * read as the UCX library's own header, and the API is the KV link whatever carries it.
 *
 * A prefill worker pushes encoded KV frames (opaque bytes, one per layer) to a decode worker.
 *
 * Objects:
 * - kvlink_ctx_t: one UCX context (ucp_context), shared by every link of a process.
 * - kvlink_t: one UCX worker driven by one libuv loop (one per I/O thread). It may listen
 *   (decode side) and connect (prefill side); one endpoint per peer address is reused.
 * - kvlink_send_t: one request being pushed (sender side).
 * - kvlink_buf_t: one received frame in registered receive memory, owned by the application
 *   from the frame callback until kvlink_buf_release().
 *
 * Protocol (little-endian active messages, see docs/kvlink.md):
 * 1. HELLO / HELLO_ACK: the connecting side sends its compatibility record (protocol version,
 *    model fingerprint, codec version, page size) and instance id; the listener answers with
 *    its own and a status. A mismatch is refused with FY_ERR_MISMATCH and a reason string.
 * 2. OPEN: the sender opens request R; the receiver must have called kvlink_recv_expect(R)
 *    and answers CREDIT with the request's window in bytes.
 * 3. FRAME: header (request id, layer, length, CRC32C) + payload by rendezvous straight into
 *    receive memory. The sender never has more payload bytes outstanding than granted;
 *    credits come back when the application releases a received buffer.
 * 4. END (sender: n frames, bytes) and STATUS (receiver: completed or failed); ABORT from
 *    either side cancels.
 *
 * Every callback runs on the link's loop thread. Every function is loop-thread only unless
 * it says otherwise.
 */
#ifndef FERRY_KVLINK_H
#define FERRY_KVLINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the kvlink wire protocol spoken by this build. */
#define KVLINK_PROTOCOL_VERSION 1u

typedef struct kvlink_ctx kvlink_ctx_t;
typedef struct kvlink kvlink_t;
typedef struct kvlink_send kvlink_send_t;
typedef struct kvlink_buf kvlink_buf_t;

/* ------------------------------------------------------------------------------------------ */
/* Context                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    /* Peer failure detection when the transport itself does not notice a dead process (UCX
     * keepalive), in milliseconds; 0 keeps UCX's default. UCX_KEEPALIVE_INTERVAL in the
     * environment wins. */
    uint32_t keepalive_ms;
    /* UCX transports and devices, as UCX_TLS and UCX_NET_DEVICES take them ("tcp",
     * "posix,sysv,cma,tcp", "mlx5_0:1"...), for a daemon's config file. NULL leaves UCX's
     * environment and defaults alone; a value here overrides the environment. Borrowed for the
     * call. */
    const char *tls;
    const char *net_devices;
} kvlink_ctx_params_t;

/* Fills the defaults (keepalive 1000 ms, transports and devices from the environment).
 * Thread: any. */
void kvlink_ctx_params_default(kvlink_ctx_params_t *params);

/* Creates the UCX context (active messages, wakeup; UCX_TLS / UCX_NET_DEVICES from the
 * environment are respected). When shared memory may be used it sets
 * UCX_CMA_MEMORY_INVALIDATE=y in the environment unless set, so that UCX 1.13 keeps cma
 * (single copy) for the rendezvous of endpoints with peer failure handling (docs/kvlink.md).
 * params may be NULL for the defaults. Thread: any, but not beside other threads reading the
 * environment. */
fy_status_t kvlink_ctx_create(const kvlink_ctx_params_t *params, kvlink_ctx_t **ctx_p);

/* Frees the context after every link on it is destroyed; accepts NULL. Thread: any. */
void kvlink_ctx_destroy(kvlink_ctx_t *ctx);

/* ------------------------------------------------------------------------------------------ */
/* Link                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* What both ends must agree on; checked at the handshake. */
typedef struct {
    uint32_t protocol_version; /* KVLINK_PROTOCOL_VERSION */
    uint32_t codec_version;    /* kvcodec wire frame version */
    uint32_t page_size;        /* decode page size in bytes (0 on a pure sender: not checked) */
    uint64_t model_fingerprint;
} kvlink_compat_t;

/* A frame arrived complete and CRC-checked (unless verify_crc is off or the sender marked it
 * self-checked). buf is now owned by the application: data
 * ([len] bytes, in registered receive memory) stays valid until kvlink_buf_release(buf),
 * which must be called exactly once, on the loop thread, even after the request ended or
 * failed. The request's credits come back on release. */
typedef void (*kvlink_frame_cb)(kvlink_t *link, uint64_t request_id, uint32_t layer,
                                kvlink_buf_t *buf, const void *data, size_t len, void *arg);

/* A receive request ended: FY_OK after END and every frame delivered; otherwise
 * FY_ERR_CANCELLED (either side cancelled), FY_ERR_TIMEOUT (deadline), FY_ERR_UNAVAILABLE
 * (peer died), FY_ERR_CORRUPT (CRC mismatch), FY_ERR_PROTOCOL (peer broke the rules).
 * Called exactly once per kvlink_recv_expect that returned FY_OK. */
typedef void (*kvlink_recv_end_cb)(kvlink_t *link, uint64_t request_id, fy_status_t st,
                                   void *arg);

/* A connection to a peer finished its handshake (FY_OK) or failed (message says why). */
typedef void (*kvlink_peer_cb)(kvlink_t *link, const char *addr, fy_status_t st,
                               const char *message, void *arg);

typedef struct {
    kvlink_compat_t compat;
    /* Registered receive memory for incoming frames, bytes. Credits granted over all open
     * receive requests never exceed it. 0 on a link that only sends. */
    size_t recv_pool_bytes;
    /* Largest frame accepted or sent. */
    size_t max_frame_bytes;
    /* Frames at least this large go by rendezvous (zero-copy into receive memory); smaller
     * ones are copied from the eager buffer. */
    size_t rndv_threshold;
    /* Granularity of deadline checks, ms. */
    uint32_t sweep_ms;
    /* Check each frame's CRC32C before on_frame (default). Turn off only when the consumer
     * checks it itself (kvlink_buf_crc), e.g. a decoder that validates the frame anyway: it
     * saves a pass over every byte on the loop thread. */
    bool verify_crc;
    /* While transfers are in flight, keep polling up to this many microseconds after the
     * last progress before sleeping in epoll (each rendezvous takes several round trips).
     * Default 0 (always sleep): on a 2-core machine shared by sender and receiver, 50 us of
     * polling raised 64 KiB frame latency from ~65 to ~370 us (ferry-bench net --spin-us).
     * Worth trying where cores are not shared. An idle link never spins. */
    uint32_t spin_us;
    /* Receive side callbacks (may be NULL on a link that only sends) and their argument. */
    kvlink_frame_cb on_frame;
    kvlink_recv_end_cb on_recv_end;
    kvlink_peer_cb on_peer;
    void *cb_arg;
} kvlink_params_t;

/* Fills the defaults: compat {KVLINK_PROTOCOL_VERSION, 0, 0, 0}, recv pool 256 MiB, max frame
 * 64 MiB, rendezvous from 8 KiB, sweep 10 ms, CRC verified, no spinning. Thread: any. */
void kvlink_params_default(kvlink_params_t *params);

/* Creates a link: a UCX worker on ctx, polled through its event fd by loop. ctx and loop are
 * borrowed and must outlive the link. Thread: the loop's thread. */
fy_status_t kvlink_create(kvlink_ctx_t *ctx, uv_loop_t *loop, const kvlink_params_t *params,
                          kvlink_t **link_p);

/* Fails every open request (FY_ERR_CLOSED callbacks), closes endpoints, frees the receive pool
 * and the worker. Buffers not yet released are freed too (their pointers die). Runs the loop
 * internally until UCX lets go; accepts NULL. Thread: loop thread, not from a callback. */
void kvlink_destroy(kvlink_t *link);

/* Listens on host:port ("0.0.0.0", "127.0.0.1", "::1"...; port 0 picks one). The bound port is
 * written to *port_p on success (may be NULL). Thread: loop thread. */
fy_status_t kvlink_listen(kvlink_t *link, const char *host, uint16_t port, uint16_t *port_p);

/* Starts connecting to "host:port" (IPv6 as "[addr]:port") unless an endpoint to it already
 * exists; on_peer reports the handshake. Sends may be opened before it completes.
 * Thread: loop thread. */
fy_status_t kvlink_connect(kvlink_t *link, const char *addr);

/* ------------------------------------------------------------------------------------------ */
/* Receive side                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    size_t credit_bytes;  /* window: payload bytes the sender may have outstanding */
    uint64_t deadline_ns; /* absolute fy_clock_ns() deadline; 0 = none */
} kvlink_recv_params_t;

/* Defaults: credits = the link's max frame, no deadline. Thread: any. */
void kvlink_recv_params_default(const kvlink_t *link, kvlink_recv_params_t *params);

/* Announces that request_id will arrive (before or after the sender opens it) and reserves
 * its credit window from the receive pool. FY_ERR_EXISTS if already expected,
 * FY_ERR_RESOURCE_EXHAUSTED if the pool cannot back the window, FY_ERR_INVALID_ARG for a
 * window of 0 or above the pool. Thread: loop thread. */
fy_status_t kvlink_recv_expect(kvlink_t *link, uint64_t request_id,
                               const kvlink_recv_params_t *params);

/* Cancels a receive request: tells the sender, frees buffers not yet delivered, and calls
 * on_recv_end(FY_ERR_CANCELLED). Delivered buffers stay owned by the application.
 * FY_ERR_NOT_FOUND if no such request is open. Thread: loop thread. */
fy_status_t kvlink_recv_cancel(kvlink_t *link, uint64_t request_id);

/* Gives a delivered frame buffer back (returning its credits to the sender). Accepts NULL.
 * Thread: loop thread. */
void kvlink_buf_release(kvlink_buf_t *buf);

/* The CRC32C the sender announced for this frame (fy_crc32c(0, data, len) when intact); 0 for
 * a self-checked frame. Thread: loop thread, or any thread that owns buf. */
uint32_t kvlink_buf_crc(const kvlink_buf_t *buf);

/* Whether the sender marked the frame self-checked (kvlink_send_frame_self_checked): the link
 * did not checksum it and its consumer must validate it. Thread: as kvlink_buf_crc. */
bool kvlink_buf_self_checked(const kvlink_buf_t *buf);

/* ------------------------------------------------------------------------------------------ */
/* Send side                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* A frame's bytes are no longer used by the link (sent and received, or abandoned). */
typedef void (*kvlink_frame_done_cb)(kvlink_send_t *req, fy_status_t st, void *arg);

/* The request ended: FY_OK once the receiver confirmed every frame; otherwise the failure
 * (FY_ERR_CANCELLED, FY_ERR_TIMEOUT, FY_ERR_UNAVAILABLE, FY_ERR_MISMATCH, FY_ERR_CORRUPT...).
 * Called exactly once; req is invalid after the callback returns, although frame_done
 * callbacks of frames still in UCX's hands may follow (with the same req pointer, which they
 * must not dereference beyond identity). */
typedef void (*kvlink_send_end_cb)(kvlink_send_t *req, fy_status_t st, void *arg);

typedef struct {
    uint64_t deadline_ns; /* absolute fy_clock_ns() deadline; 0 = none */
    kvlink_send_end_cb on_end;
    void *arg;
} kvlink_send_params_t;

/* Defaults: no deadline, no callback. Thread: any. */
void kvlink_send_params_default(kvlink_send_params_t *params);

/* Opens a request to the peer at addr ("host:port"), connecting if needed. params is copied.
 * FY_ERR_EXISTS if request_id is already open to that peer. Thread: loop thread. */
fy_status_t kvlink_send_open(kvlink_t *link, const char *addr, uint64_t request_id,
                             const kvlink_send_params_t *params, kvlink_send_t **req_p);

/* Queues one frame. data ([len] bytes, 1 <= len <= max frame) is borrowed until on_done is
 * called (exactly once, FY_OK or the failure). The CRC32C is computed here. Frames go out in
 * order as credits allow. FY_ERR_STATE after finish or failure (on_done not called).
 * Thread: loop thread. */
fy_status_t kvlink_send_frame(kvlink_send_t *req, uint32_t layer, const void *data, size_t len,
                              kvlink_frame_done_cb on_done, void *arg);

/* kvlink_send_frame with the frame's CRC32C (fy_crc32c(0, data, len)) supplied by the caller,
 * e.g. computed by the encoder while it wrote the frame, which saves a pass over the bytes. A
 * wrong crc makes the receiver fail the request with FY_ERR_CORRUPT. Thread: loop thread. */
fy_status_t kvlink_send_frame_crc(kvlink_send_t *req, uint32_t layer, const void *data,
                                  size_t len, uint32_t crc, kvlink_frame_done_cb on_done,
                                  void *arg);

/* kvlink_send_frame for a frame that carries its own integrity check, which its consumer
 * validates anyway (a kvcodec frame: kvc_frame_parse checks the frame's CRC32C): neither side
 * of the link checksums it, whatever the receiver's verify_crc says; the receiver sees
 * kvlink_buf_self_checked() true. Saves the link's pass over every byte. Thread: loop thread. */
fy_status_t kvlink_send_frame_self_checked(kvlink_send_t *req, uint32_t layer, const void *data,
                                           size_t len, kvlink_frame_done_cb on_done,
                                           void *arg);

/* No more frames: END follows the queued ones; on_end(FY_OK) comes when the receiver has all.
 * Thread: loop thread. */
fy_status_t kvlink_send_finish(kvlink_send_t *req);

/* Cancels: tells the receiver, fails queued frames with FY_ERR_CANCELLED, on_end follows
 * (frames already in flight report done when UCX lets go of them). Thread: loop thread. */
void kvlink_send_cancel(kvlink_send_t *req);

/* ------------------------------------------------------------------------------------------ */
/* Counters                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    uint64_t peers;             /* endpoints alive */
    uint64_t send_reqs;         /* send requests not yet freed */
    uint64_t recv_reqs;         /* receive requests not yet freed */
    uint64_t frames_in_flight;  /* sender frames handed to UCX, not completed */
    uint64_t frames_queued;     /* sender frames waiting for credits or the handshake */
    uint64_t recv_pending;      /* frames being received into receive memory */
    uint64_t bufs_out;          /* delivered buffers not yet released */
    uint64_t pool_used_bytes;   /* receive pool bytes allocated */
    uint64_t credit_reserved;   /* credit windows reserved from the pool */
    uint64_t frames_sent;       /* completed OK, sender side */
    uint64_t frames_delivered;  /* handed to on_frame */
    uint64_t bytes_delivered;   /* payload bytes handed to on_frame */
    uint64_t credit_stalls;     /* times a sender frame waited for credits */
    uint64_t credit_violations; /* frames that arrived beyond the granted window */
    uint64_t max_outstanding;   /* largest outstanding payload of one request seen (receiver) */
    uint64_t rejected;          /* malformed or unexpected messages dropped */
    uint64_t crc_errors;        /* frames whose CRC32C did not match */
    uint64_t pool_fallbacks;    /* frames received outside the pool (fragmentation) */
} kvlink_stats_t;

/* Copies the counters. Thread: loop thread. */
void kvlink_stats(const kvlink_t *link, kvlink_stats_t *stats_p);

/* The receive pool's memory, where frames within it are received and delivered to on_frame
 * (NULL and 0 where recv_pool_bytes was 0). It lives until kvlink_destroy, so that the
 * application may register it with another user of the memory (page-locking it for GPU
 * uploads) and undo that before destroying the link; frames outside the pool (fragmentation,
 * stats.pool_fallbacks) come in memory of their own. Thread: any. */
void kvlink_recv_pool(const kvlink_t *link, void **mem_p, size_t *len_p);

/* Runs the link's progress once without blocking (for callers that drive the loop with
 * UV_RUN_NOWAIT). Thread: loop thread. */
void kvlink_progress(kvlink_t *link);

#ifdef __cplusplus
}
#endif

/* ---- Sealed frames (kvlink_seal.c) ---------------------------------------------------------- */

/* AES-256-GCM under a key of one request (KVLINK_SEAL_KEY_BYTES, from the router): a sealed
 * frame is KVLINK_SEAL_OVERHEAD bytes longer than the frame ("FYSL", a random nonce, the
 * ciphertext, the tag), bound to its request id and layer. */
#define KVLINK_SEAL_KEY_BYTES 32
#define KVLINK_SEAL_OVERHEAD  32

/* Seals frame[len] into out[len + KVLINK_SEAL_OVERHEAD]. Thread: any. */
fy_status_t kvlink_seal(const uint8_t key[KVLINK_SEAL_KEY_BYTES], uint64_t request_id,
                        uint32_t layer, const void *frame, size_t len, uint8_t *out);
/* Opens sealed[len] in place: *frame_p (inside sealed) and *frame_len_p are the frame.
 * FY_ERR_CORRUPT when it is not a sealed frame, or was sealed under another key, for another
 * request or layer, or changed since (sealed then holds garbage). Thread: any. */
fy_status_t kvlink_unseal(const uint8_t key[KVLINK_SEAL_KEY_BYTES], uint64_t request_id,
                          uint32_t layer, uint8_t *sealed, size_t len, uint8_t **frame_p,
                          size_t *frame_len_p);

#endif /* FERRY_KVLINK_H */
