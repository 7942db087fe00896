/*
 * nccl_link_nccl.c: the NCCL backend of the NCCL link. Each end owns a non-blocking
 * communicator of two ranks (ncclCommInitRankConfig with blocking = 0, so that neither the
 * set-up nor a round ever blocks the owner thread, and one thread can drive both ends of a
 * pair), a non-blocking stream, device copies of the control blocks, and an event that
 * marks the end of each round.
 *
 * A round on the stream: control block host -> device, then one NCCL group with the frame
 * sends (or receives) in announcement order, the control block send and the peer's control
 * block receive, then the event. With a non-blocking communicator ncclGroupEnd may return
 * ncclInProgress before the kernels are enqueued; the event is recorded only once
 * ncclCommGetAsyncError says ncclSuccess. The peer's block comes back to the host after the
 * event, when the stream is idle.
 *
 * Nothing here may wait on the device: a round can hang on a dead peer until the peer timeout
 * aborts it, and one thread may own several pairs (or both ends of one), so a call that
 * synchronized the device (cudaMalloc, cudaFree, cudaFreeHost) could wait forever. All device
 * memory is therefore stream-ordered on the pair's stream (cudaMallocAsync / cudaFreeAsync),
 * host copies of the control blocks are plain memory copied while the stream is idle, and
 * teardown only enqueues.
 *
 * libnccl is loaded at run time (dlopen, on first use), not linked: NCCL is not in the offline
 * bundle (the node provides it), and a daemon on a node without it must still start and carry
 * its KV over UCX (kvlink_nccl_available says which).
 */
#include "nccl_link_int.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>
// nccl.h declares a few functions with () parameter lists.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <nccl.h>
#pragma GCC diagnostic pop

#define MOD "kvlink-nccl"

/* ---- libnccl, loaded at run time ---------------------------------------------------------- */

static struct {
    __typeof__(ncclGetUniqueId) *GetUniqueId;
    __typeof__(ncclCommInitRankConfig) *CommInitRankConfig;
    __typeof__(ncclCommGetAsyncError) *CommGetAsyncError;
    __typeof__(ncclCommAbort) *CommAbort;
    __typeof__(ncclGetErrorString) *GetErrorString;
    __typeof__(ncclGroupStart) *GroupStart;
    __typeof__(ncclGroupEnd) *GroupEnd;
    __typeof__(ncclSend) *Send;
    __typeof__(ncclRecv) *Recv;
} g_nccl;
static pthread_once_t g_nccl_once = PTHREAD_ONCE_INIT;
static bool g_nccl_ok;

static void nccl_load(void)
{
    void *h = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL)
        h = dlopen("libnccl.so", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        FY_LOG_DEBUG(MOD, "no libnccl: %s", dlerror());
        return;
    }
    // Object to function pointer through memcpy: dlsym's result as ISO C allows it.
#define NCCL_SYM(field, name)                                                                      \
    do {                                                                                           \
        void *p_ = dlsym(h, name);                                                                 \
        if (p_ == NULL) {                                                                          \
            FY_LOG_WARN(MOD, "libnccl without %s: NCCL links unavailable", name);               \
            return;                                                                                \
        }                                                                                          \
        memcpy(&g_nccl.field, &p_, sizeof(p_));                                                    \
    } while (0)
    NCCL_SYM(GetUniqueId, "ncclGetUniqueId");
    NCCL_SYM(CommInitRankConfig, "ncclCommInitRankConfig");
    NCCL_SYM(CommGetAsyncError, "ncclCommGetAsyncError");
    NCCL_SYM(CommAbort, "ncclCommAbort");
    NCCL_SYM(GetErrorString, "ncclGetErrorString");
    NCCL_SYM(GroupStart, "ncclGroupStart");
    NCCL_SYM(GroupEnd, "ncclGroupEnd");
    NCCL_SYM(Send, "ncclSend");
    NCCL_SYM(Recv, "ncclRecv");
#undef NCCL_SYM
    g_nccl_ok = true; // the handle stays open for the life of the process
}

bool kvlink_nccl_available(void)
{
    pthread_once(&g_nccl_once, nccl_load);
    return g_nccl_ok;
}

// The calls below go through the loaded library.
#define ncclGetUniqueId        (*g_nccl.GetUniqueId)
#define ncclCommInitRankConfig (*g_nccl.CommInitRankConfig)
#define ncclCommGetAsyncError  (*g_nccl.CommGetAsyncError)
#define ncclCommAbort          (*g_nccl.CommAbort)
#define ncclGetErrorString     (*g_nccl.GetErrorString)
#define ncclGroupStart         (*g_nccl.GroupStart)
#define ncclGroupEnd           (*g_nccl.GroupEnd)
#define ncclSend               (*g_nccl.Send)
#define ncclRecv               (*g_nccl.Recv)

typedef enum {
    BE_IDLE,
    BE_ENQUEUING, /* ncclGroupEnd returned ncclInProgress */
    BE_RUNNING,   /* everything enqueued, waiting for the event */
} be_state_t;

typedef struct {
    int device;
    int rank;
    ncclComm_t comm;
    bool comm_live; /* not yet aborted */
    bool pools;     /* the device has stream-ordered memory pools */
    cudaStream_t stream;
    cudaEvent_t done;
    uint8_t *d_out, *d_in;                /* [KVLINK_NCCL_CTL_BYTES] device, stream-ordered */
    uint8_t h_out[KVLINK_NCCL_CTL_BYTES]; /* host staging of the outgoing block */
    be_state_t state;
} nccl_be_t;

static fy_status_t from_cuda(cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return FY_OK;
    FY_LOG_WARN(MOD, "%s: %s", what, cudaGetErrorString(e));
    if (e == cudaErrorMemoryAllocation)
        return FY_ERR_RESOURCE_EXHAUSTED;
    if (e == cudaErrorNoDevice || e == cudaErrorInvalidDevice || e == cudaErrorInsufficientDriver)
        return FY_ERR_NO_DEVICE;
    return FY_ERR_CUDA;
}

static fy_status_t from_nccl(ncclResult_t r, const char *what)
{
    if (r == ncclSuccess)
        return FY_OK;
    if (r == ncclInProgress)
        return FY_ERR_AGAIN;
    FY_LOG_WARN(MOD, "%s: %s", what, ncclGetErrorString(r));
    switch (r) {
    case ncclInvalidArgument:
    case ncclInvalidUsage:
        return FY_ERR_INVALID_ARG;
    case ncclSystemError:
    case ncclRemoteError:
        return FY_ERR_UNAVAILABLE;
    default:
        return FY_ERR_TRANSPORT;
    }
}

fy_status_t kvlink_nccl_id_create(uint8_t *id)
{
    if (id == NULL)
        return FY_ERR_INVALID_ARG;
    if (!kvlink_nccl_available())
        return FY_ERR_UNSUPPORTED;
    ncclUniqueId uid;
    fy_status_t st = from_nccl(ncclGetUniqueId(&uid), "ncclGetUniqueId");
    if (st != FY_OK)
        return st == FY_ERR_AGAIN ? FY_ERR_TRANSPORT : st;
    _Static_assert(sizeof(uid.internal) == KVLINK_NCCL_ID_BYTES, "ncclUniqueId size");
    memcpy(id, uid.internal, KVLINK_NCCL_ID_BYTES);
    return FY_OK;
}

static fy_status_t be_init_test(void *arg)
{
    nccl_be_t *be = arg;
    ncclResult_t async = ncclSuccess;
    fy_status_t st = from_nccl(ncclCommGetAsyncError(be->comm, &async), "ncclCommGetAsyncError");
    if (st != FY_OK)
        return st == FY_ERR_AGAIN ? FY_ERR_TRANSPORT : st;
    return from_nccl(async, "communicator set-up");
}

static fy_status_t be_post_round(void *arg, const kvlink_nccl_xfer_t *xfers, size_t n, bool send,
                                 const uint8_t *ctl_out)
{
    nccl_be_t *be = arg;
    if (be->state != BE_IDLE)
        return FY_ERR_STATE;
    int peer = 1 - be->rank;
    fy_status_t st = from_cuda(cudaSetDevice(be->device), "cudaSetDevice");
    if (st != FY_OK)
        return st;
    // The stream is idle (the previous round's event completed): a copy from pageable memory
    // is staged at once.
    memcpy(be->h_out, ctl_out, KVLINK_NCCL_CTL_BYTES);
    st = from_cuda(cudaMemcpyAsync(be->d_out, be->h_out, KVLINK_NCCL_CTL_BYTES,
                                   cudaMemcpyHostToDevice, be->stream),
                   "control block to device");
    if (st != FY_OK)
        return st;
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess)
        return from_nccl(r, "ncclGroupStart");
    for (size_t i = 0; i < n && r == ncclSuccess; i++) {
        if (send)
            r = ncclSend(xfers[i].ptr, xfers[i].len, ncclUint8, peer, be->comm, be->stream);
        else
            r = ncclRecv(xfers[i].ptr, xfers[i].len, ncclUint8, peer, be->comm, be->stream);
    }
    if (r == ncclSuccess)
        r = ncclSend(be->d_out, KVLINK_NCCL_CTL_BYTES, ncclUint8, peer, be->comm, be->stream);
    if (r == ncclSuccess)
        r = ncclRecv(be->d_in, KVLINK_NCCL_CTL_BYTES, ncclUint8, peer, be->comm, be->stream);
    ncclResult_t r_end = ncclGroupEnd(); // always closes the group, even after an error
    if (r != ncclSuccess)
        return from_nccl(r, "posting a round");
    if (r_end != ncclSuccess && r_end != ncclInProgress)
        return from_nccl(r_end, "ncclGroupEnd");
    // Enqueued now or later: be_test_round adds the copy back once the communicator says so.
    be->state = BE_ENQUEUING;
    return FY_OK;
}

/* The group is enqueued: mark its end. */
static fy_status_t be_enqueue_tail(nccl_be_t *be)
{
    fy_status_t st = from_cuda(cudaEventRecord(be->done, be->stream), "cudaEventRecord");
    if (st == FY_OK)
        be->state = BE_RUNNING;
    return st;
}

static fy_status_t be_test_round(void *arg, uint8_t *ctl_in)
{
    nccl_be_t *be = arg;
    fy_status_t st = from_cuda(cudaSetDevice(be->device), "cudaSetDevice");
    if (st != FY_OK)
        return st;
    ncclResult_t async = ncclSuccess;
    st = from_nccl(ncclCommGetAsyncError(be->comm, &async), "ncclCommGetAsyncError");
    if (st != FY_OK)
        return st == FY_ERR_AGAIN ? FY_ERR_TRANSPORT : st;
    if (async == ncclInProgress) // the group is still being enqueued
        return FY_ERR_AGAIN;
    if (async != ncclSuccess)
        return from_nccl(async, "communicator");
    if (be->state == BE_ENQUEUING) {
        st = be_enqueue_tail(be);
        if (st != FY_OK)
            return st;
    }
    if (be->state != BE_RUNNING)
        return FY_ERR_STATE;
    cudaError_t e = cudaEventQuery(be->done);
    if (e == cudaErrorNotReady)
        return FY_ERR_AGAIN;
    if (e != cudaSuccess)
        return from_cuda(e, "round");
    // The stream is idle now, so this copy to pageable memory returns at once.
    st = from_cuda(cudaMemcpyAsync(ctl_in, be->d_in, KVLINK_NCCL_CTL_BYTES, cudaMemcpyDeviceToHost,
                                   be->stream),
                   "control block to host");
    if (st == FY_OK)
        st = from_cuda(cudaStreamSynchronize(be->stream), "cudaStreamSynchronize");
    if (st != FY_OK)
        return st;
    be->state = BE_IDLE;
    return FY_OK;
}

static fy_status_t be_mem_alloc(void *arg, size_t bytes, void **ptr_p)
{
    nccl_be_t *be = arg;
    fy_status_t st = from_cuda(cudaSetDevice(be->device), "cudaSetDevice");
    if (st != FY_OK)
        return st;
    void *p = NULL;
    if (be->pools)
        st = from_cuda(cudaMallocAsync(&p, bytes, be->stream), "cudaMallocAsync");
    else
        st = from_cuda(cudaMalloc(&p, bytes), "cudaMalloc");
    if (st != FY_OK)
        return st;
    *ptr_p = p;
    return FY_OK;
}

static void be_mem_free(void *arg, void *ptr)
{
    nccl_be_t *be = arg;
    if (ptr == NULL)
        return;
    (void)cudaSetDevice(be->device);
    // After whatever the stream still holds that uses it (a round, or aborted kernels).
    if (be->pools)
        (void)cudaFreeAsync(ptr, be->stream);
    else
        (void)cudaFree(ptr);
}

static void be_abort(void *arg)
{
    nccl_be_t *be = arg;
    if (!be->comm_live)
        return;
    (void)cudaSetDevice(be->device);
    // Aborts the kernels still waiting for the peer, so the stream drains; for a
    // non-blocking communicator it may return ncclInProgress while it finishes.
    ncclResult_t r = ncclCommAbort(be->comm);
    if (r != ncclSuccess && r != ncclInProgress)
        FY_LOG_WARN(MOD, "ncclCommAbort: %s", ncclGetErrorString(r));
    be->comm_live = false;
    be->state = BE_IDLE;
}

static void be_destroy(void *arg)
{
    nccl_be_t *be = arg;
    if (be == NULL)
        return;
    be_abort(be); // the aborted kernels leave the stream
    (void)cudaSetDevice(be->device);
    // Only enqueued: the frees run, and the stream's resources go, once the stream drains.
    if (be->stream != NULL) {
        be_mem_free(be, be->d_out);
        be_mem_free(be, be->d_in);
    }
    if (be->done != NULL)
        (void)cudaEventDestroy(be->done);
    if (be->stream != NULL)
        (void)cudaStreamDestroy(be->stream);
    free(be);
}

static const kvlink_nccl_ops_t k_nccl_ops = {
    .init_test = be_init_test,
    .post_round = be_post_round,
    .test_round = be_test_round,
    .mem_alloc = be_mem_alloc,
    .mem_free = be_mem_free,
    .abort = be_abort,
    .destroy = be_destroy,
};

fy_status_t kvlink_nccl_create(const uint8_t *id, size_t id_len, const kvlink_nccl_params_t *params,
                               kvlink_nccl_t **pair_p)
{
    if (id == NULL || id_len != KVLINK_NCCL_ID_BYTES || params == NULL || pair_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (params->role != KVLINK_NCCL_SENDER && params->role != KVLINK_NCCL_RECEIVER)
        return FY_ERR_INVALID_ARG;
    if (!kvlink_nccl_available())
        return FY_ERR_UNSUPPORTED;
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev <= 0)
        return FY_ERR_NO_DEVICE;
    if (params->device < 0 || params->device >= n_dev)
        return FY_ERR_INVALID_ARG;

    nccl_be_t *be = calloc(1, sizeof(*be));
    if (be == NULL)
        return FY_ERR_NO_MEMORY;
    be->device = params->device;
    be->rank = params->role == KVLINK_NCCL_SENDER ? 0 : 1;
    fy_status_t st = from_cuda(cudaSetDevice(be->device), "cudaSetDevice");
    if (st == FY_OK)
        st = from_cuda(cudaStreamCreateWithFlags(&be->stream, cudaStreamNonBlocking),
                       "cudaStreamCreate");
    if (st == FY_OK)
        st = from_cuda(cudaEventCreateWithFlags(&be->done, cudaEventDisableTiming),
                       "cudaEventCreate");
    if (st == FY_OK) {
        // Without memory pools (some virtualized GPUs) allocations fall back to cudaMalloc and
        // cudaFree, which may wait on the device: a dead peer then stalls frees until the
        // peer timeout aborts it, and one thread should own only one end of a pair.
        int pools = 0;
        if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, be->device) ==
                cudaSuccess &&
            pools != 0)
            be->pools = true;
        else
            FY_LOG_WARN(MOD, "device %d has no memory pools: synchronous allocations", be->device);
    }
    if (st == FY_OK)
        st = be_mem_alloc(be, KVLINK_NCCL_CTL_BYTES, (void **)&be->d_out);
    if (st == FY_OK)
        st = be_mem_alloc(be, KVLINK_NCCL_CTL_BYTES, (void **)&be->d_in);
    if (st == FY_OK) {
        ncclUniqueId uid;
        memcpy(uid.internal, id, KVLINK_NCCL_ID_BYTES);
        ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
        cfg.blocking = 0;
        ncclResult_t r = ncclCommInitRankConfig(&be->comm, 2, uid, be->rank, &cfg);
        if (r == ncclSuccess || r == ncclInProgress) {
            be->comm_live = true;
        } else {
            st = from_nccl(r, "ncclCommInitRankConfig");
        }
    }
    if (st != FY_OK) {
        be_destroy(be);
        return st;
    }
    return kvlink_nccl_create_ops(&k_nccl_ops, be, params, pair_p);
}
