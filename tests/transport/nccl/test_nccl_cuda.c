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

/* Sender frames live on GPU 0. */
static void *dev_frame_alloc(const uint8_t *host, size_t len)
{
    void *p = NULL;
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    check_cuda(cudaMalloc(&p, len), "cudaMalloc");
    check_cuda(cudaMemcpy(p, host, len, cudaMemcpyHostToDevice), "cudaMemcpy");
    return p;
}

static void dev_frame_free(void *p)
{
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    check_cuda(cudaFree(p), "cudaFree");
}

/* Received frames live on GPU 1. */
static void dev_read_back(void *host, const void *data, size_t len)
{
    check_cuda(cudaSetDevice(1), "cudaSetDevice");
    check_cuda(cudaMemcpy(host, data, len, cudaMemcpyDeviceToHost), "cudaMemcpy");
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
