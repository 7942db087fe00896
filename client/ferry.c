/*
 * ferry: the command-line tool. One subcommand per file (cli_<name>.c); this file only
 * dispatches and prints help.
 */
#include <stdio.h>
#include <string.h>

#include "common.h"

typedef int (*cli_main_fn)(int argc, char **argv);

#define CLI_DECL(name) int cli_##name##_main(int argc, char **argv);
CLI_DECL(generate)
CLI_DECL(inspect)
CLI_DECL(health)
CLI_DECL(cluster)
CLI_DECL(calibrate)

#ifndef FY_CLI_HAVE_GENERATE
#define cli_generate_main NULL
#endif
#ifndef FY_CLI_HAVE_INSPECT
#define cli_inspect_main NULL
#endif
#ifndef FY_CLI_HAVE_HEALTH
#define cli_health_main NULL
#endif
#ifndef FY_CLI_HAVE_CLUSTER
#define cli_cluster_main NULL
#endif
#ifndef FY_CLI_HAVE_CALIBRATE
#define cli_calibrate_main NULL
#endif

static const struct {
    const char *name;
    cli_main_fn fn;
    const char *what;
} k_cmds[] = {
    {"generate", cli_generate_main, "generate text (--local: in-process; or through a router)"},
    {"inspect", cli_inspect_main, "print a GGUF model's metadata and tensors, or a KV frame"},
    {"health", cli_health_main, "check a server's Health over gRPC"},
    {"cluster", cli_cluster_main, "up|down|status|logs a cluster from a spec"},
    {"calibrate", cli_calibrate_main, "probe a model and write its codec policy file"},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: ferry <command> [options]   (ferry <command> --help for more)\n\n"
                 "commands:\n");
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cmds); i++)
        fprintf(out, "  %-10s %s%s\n", k_cmds[i].name, k_cmds[i].what,
                k_cmds[i].fn ? "" : " (not built yet)");
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("ferry %s\n", FY_VERSION_STRING);
        return 0;
    }
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cmds); i++) {
        if (strcmp(argv[1], k_cmds[i].name) != 0)
            continue;
        if (k_cmds[i].fn == NULL) {
            fprintf(stderr, "ferry: '%s' is not part of this build yet\n", argv[1]);
            return 2;
        }
        return k_cmds[i].fn(argc - 1, argv + 1);
    }
    fprintf(stderr, "ferry: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
