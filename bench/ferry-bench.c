/*
 * ferry-bench: Ferry's benchmarks, one subcommand per area. Each prints a table and, with
 * --json, writes JSON; recorded runs go to bench/results/ with the command, machine and date.
 * Benchmarks are commands, never timed tests.
 */
#include <stdio.h>
#include <string.h>

#include "common.h"

typedef int (*bench_main_fn)(int argc, char **argv);

#define BENCH_DECL(name) int bench_##name##_main(int argc, char **argv);
BENCH_DECL(codec)
BENCH_DECL(net)
BENCH_DECL(model)
BENCH_DECL(rpc)
BENCH_DECL(quality)
BENCH_DECL(e2e)
BENCH_DECL(attend)

#ifndef FY_BENCH_HAVE_CODEC
#define bench_codec_main NULL
#endif
#ifndef FY_BENCH_HAVE_NET
#define bench_net_main NULL
#endif
#ifndef FY_BENCH_HAVE_MODEL
#define bench_model_main NULL
#endif
#ifndef FY_BENCH_HAVE_RPC
#define bench_rpc_main NULL
#endif
#ifndef FY_BENCH_HAVE_QUALITY
#define bench_quality_main NULL
#endif
#ifndef FY_BENCH_HAVE_E2E
#define bench_e2e_main NULL
#endif
#ifndef FY_BENCH_HAVE_ATTEND
#define bench_attend_main NULL
#endif

static const struct {
    const char *name;
    bench_main_fn fn;
    const char *what;
} k_benches[] = {
    {"codec", bench_codec_main, "KV codec encode/place throughput, wire ratio, error"},
    {"net", bench_net_main, "KV transfer goodput over UCX vs ucx_perftest"},
    {"model", bench_model_main, "prefill and decode tokens/s vs transformers+torch"},
    {"rpc", bench_rpc_main, "gRPC unary calls/s and streamed messages/s vs grpcio"},
    {"quality", bench_quality_main, "dPPL, top-1 agreement, KL and NIAH per policy and budget"},
    {"e2e", bench_e2e_main, "TTFT, TPOT, throughput on a cluster under a link limit"},
    {"attend", bench_attend_main, "GPU decode attention over compressed pages vs FP16, SDPA"},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: ferry-bench <subcommand> [--json] [options]\n\nsubcommands:\n");
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_benches); i++)
        fprintf(out, "  %-8s %s%s\n", k_benches[i].name, k_benches[i].what,
                k_benches[i].fn ? "" : " (not built yet)");
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_benches); i++) {
        if (strcmp(argv[1], k_benches[i].name) != 0)
            continue;
        if (k_benches[i].fn == NULL) {
            fprintf(stderr, "ferry-bench: '%s' is not part of this build yet\n", argv[1]);
            return 2;
        }
        return k_benches[i].fn(argc - 1, argv + 1);
    }
    fprintf(stderr, "ferry-bench: unknown subcommand '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
