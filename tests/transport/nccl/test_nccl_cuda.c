// The NCCL link between two GPUs of this machine: sender (prefill) on GPU 0, receiver
// (decode) on GPU 1, both driven from this thread through non-blocking communicators. Runs
// the shared scenarios (scenarios.h) with frames in device memory: bytes checked after the
// trip, credits, cancel from either side, deadlines, a refused open, a compatibility
// mismatch, and a peer whose communicator is aborted mid-transfer. Exits 77 (skipped) with
// fewer than two GPUs.
#include "scenarios.h"

#include <stdio.h>

#include <cuda_runtime.h>

static void check_cuda(cudaError_t e, const char *what)
{
    if (e != cudaSuccess)
        fail_msg("%s: %s", what, cudaGetErrorString(e));
}

static fy_status_t nccl_make_pair(const kvlink_nccl_params_t *ps, const kvlink_nccl_params_t *pr,
                                  kvlink_nccl_t **s_p, kvlink_nccl_t **r_p)
{
    // The id goes from one side to the other as bytes, as it would over RPC.
    uint8_t id[KVLINK_NCCL_ID_BYTES];
    fy_status_t st = kvlink_nccl_id_create(id);
    if (st != FY_OK)
        return st;
    uint8_t carried[KVLINK_NCCL_ID_BYTES];
    memcpy(carried, id, sizeof(id));
    st = kvlink_nccl_create(id, sizeof(id), ps, s_p);
    if (st != FY_OK)
        return st;
    st = kvlink_nccl_create(carried, sizeof(carried), pr, r_p);
    if (st != FY_OK) {
        kvlink_nccl_destroy(*s_p);
        *s_p = NULL;
    }
    return st;
}

/* One helper stream per GPU. Both ends run on this thread, so the harness must never wait on
 * a whole device (cudaMalloc, cudaFree, cudaMemcpy can): a round of one end in flight waits
 * for the other end's next call. Frames are stream-ordered allocations on the helper stream,
 * which only ever waits for its own copies. */
static cudaStream_t g_helper[2];

/* Sender frames live on GPU 0. */
static void *dev_frame_alloc(const uint8_t *host, size_t len)
{
    void *p = NULL;
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    check_cuda(cudaMallocAsync(&p, len, g_helper[0]), "cudaMallocAsync");
    check_cuda(cudaMemcpyAsync(p, host, len, cudaMemcpyHostToDevice, g_helper[0]),
               "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(g_helper[0]), "cudaStreamSynchronize");
    return p;
}

static void dev_frame_free(void *p)
{
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    check_cuda(cudaFreeAsync(p, g_helper[0]), "cudaFreeAsync");
}

/* Received frames live on GPU 1. */
static void dev_read_back(void *host, const void *data, size_t len)
{
    check_cuda(cudaSetDevice(1), "cudaSetDevice");
    check_cuda(cudaMemcpyAsync(host, data, len, cudaMemcpyDeviceToHost, g_helper[1]),
               "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(g_helper[1]), "cudaStreamSynchronize");
}

static void test_bad_args(void **state)
{
    (void)state;
    uint8_t id[KVLINK_NCCL_ID_BYTES] = {0};
    kvlink_nccl_params_t p;
    kvlink_nccl_params_default(&p);
    kvlink_nccl_t *pair = NULL;
    assert_int_equal(kvlink_nccl_create(id, sizeof(id) - 1, &p, &pair), FY_ERR_INVALID_ARG);
    p.device = 1 << 20;
    assert_int_equal(kvlink_nccl_create(id, sizeof(id), &p, &pair), FY_ERR_INVALID_ARG);
    assert_null(pair);
    assert_int_equal(kvlink_nccl_id_create(NULL), FY_ERR_INVALID_ARG);
}

int main(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) {
        printf("SKIP: the NCCL link test needs two GPUs (found %d)\n", n);
        return 77;
    }
    // Both ranks share this process, where NCCL would otherwise read and write user buffers
    // of the other GPU directly (P2P direct); the link's buffers are stream-ordered
    // allocations that other GPUs may not map, and between two processes, as deployed, NCCL
    // never touches them from the peer. Make this process behave like two.
    setenv("NCCL_P2P_DIRECT_DISABLE", "1", 0);
    for (int d = 0; d < 2; d++) {
        if (cudaSetDevice(d) != cudaSuccess ||
            cudaStreamCreateWithFlags(&g_helper[d], cudaStreamNonBlocking) != cudaSuccess) {
            fprintf(stderr, "cannot set up GPU %d\n", d);
            return 1;
        }
    }
    g_h = (harness_t){.make_pair = nccl_make_pair,
                      .frame_alloc = dev_frame_alloc,
                      .frame_free = dev_frame_free,
                      .read_back = dev_read_back,
                      .peer_timeout_ms = 2000};
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_args),
        NCCL_SCENARIO_TESTS,
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
