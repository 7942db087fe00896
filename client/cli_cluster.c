/*
 * ferry cluster up|down|status|logs|gen SPEC: runs a cluster spec (cluster/cluster.h,
 * docs/cluster.md). local and netns run here; ssh runs its generated command lines; slurm
 * writes (and with sbatch present, submits) a batch script; k8s writes manifests. Health
 * checks go through the client SDK.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster.h"
#include "common.h"
#include "cluster_health.h"
#include "ferry_client.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ferry cluster COMMAND SPEC [options]\n"
            "  up SPEC       start the cluster; returns once every daemon is healthy\n"
            "  down SPEC     drain (SIGTERM) and stop it, remove its network namespaces\n"
            "  status SPEC   each daemon: pid, health, load, UCX transports\n"
            "  logs SPEC     the end of each daemon's log (--daemon NAME, --lines N)\n"
            "  gen SPEC      print what a backend would run: ssh lines, the sbatch script,\n"
            "                the Kubernetes manifests, or the netns ip/tc commands\n"
            "options:\n"
            "  --backend B   local|netns|ssh|slurm|k8s (default: the spec's)\n"
            "  --timeout D   how long `up` waits for health (default 120s)\n"
            "  --drain-timeout D  how long `down` waits before SIGKILL (default 30s)\n"
            "  --dry-run     up/down: print the commands instead of running them (ssh)\n"
            "  -o FILE       gen: write to FILE instead of stdout\n"
            "  --quiet       fewer progress lines\n"
            "See docs/cluster.md for the spec.\n");
}

/* The router's OpenAI-compatible API, when the spec gives it a port. */
static void print_http_api(const fy_cluster_spec_t *spec)
{
    for (int i = 0; i < spec->n_daemons; i++)
        if (spec->daemons[i].role == FY_CLUSTER_ROUTER && spec->daemons[i].http_port > 0)
            printf("OpenAI-compatible API: %s://%s:%d/v1\n", spec->tls_cert[0] ? "https" : "http",
                   fy_cluster_daemon_host_addr(spec, i), spec->daemons[i].http_port);
}
static int wait_router(const fy_cluster_spec_t *spec, uint64_t timeout_ms)
{
    char router[128];
    fy_cluster_router_addr(spec, router, sizeof(router));
    uint64_t deadline = fy_clock_ns() + timeout_ms * 1000000ull;
    while (fy_cluster_sdk_health((void *)spec, router) != 0) {
        if (fy_clock_ns() >= deadline) {
            fprintf(stderr, "ferry cluster: router %s not SERVING after %llu ms\n", router,
                    (unsigned long long)timeout_ms);
            return 1;
        }
        fy_sleep_ns(500 * 1000000ull);
    }
    printf("cluster %s: router %s SERVING\n", spec->name, router);
    print_http_api(spec);
    return 0;
}

static int run_ssh(const fy_cluster_spec_t *spec, bool down, bool dry_run, uint64_t timeout_ms)
{
    if (dry_run)
        return fy_cluster_gen_ssh(spec, down, stdout) == FY_OK ? 0 : 1;
    int rc = 0;
    for (int i = 0; i < spec->n_daemons; i++) {
        fy_cluster_cmd_t c;
        if (fy_cluster_ssh_cmd(spec, i, down, &c) != FY_OK)
            return 1;
        int x = fy_cluster_run_cmd(&c, 2);
        fy_cluster_cmd_free(&c);
        if (x != 0) {
            fprintf(stderr, "ferry cluster: %s %s over ssh failed (exit %d)\n",
                    down ? "stopping" : "starting", spec->daemons[i].name, x);
            if (!down)
                return 1;
            rc = 1;
        }
        if (!down && spec->daemons[i].role == FY_CLUSTER_ROUTER)
            fy_sleep_ns(2000 * 1000000ull);
    }
    return down ? rc : wait_router(spec, timeout_ms);
}

static void make_log_dir(const fy_cluster_spec_t *spec)
{
    fy_cluster_cmd_t mk = {0};
    fy_cluster_cmd_add(&mk, "mkdir");
    fy_cluster_cmd_add(&mk, "-p");
    fy_cluster_cmd_add(&mk, spec->log_dir);
    fy_cluster_run_cmd(&mk, 2);
    fy_cluster_cmd_free(&mk);
}

static int run_slurm(const fy_cluster_spec_t *spec, bool submit)
{
    char path[FY_CLUSTER_PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/ferry-%s.sbatch", spec->log_dir, spec->name);
    make_log_dir(spec);
    FILE *f = fopen(path, "w");
    if (f == NULL || fy_cluster_gen_slurm(spec, f) != FY_OK) {
        fprintf(stderr, "ferry cluster: cannot write %s\n", path);
        if (f)
            fclose(f);
        return 1;
    }
    fclose(f);
    printf("wrote %s\n", path);
    if (!submit)
        return 0;
    fy_cluster_cmd_t c = {0};
    fy_cluster_cmd_add(&c, "sbatch");
    fy_cluster_cmd_add(&c, path);
    int x = fy_cluster_run_cmd(&c, 1);
    fy_cluster_cmd_free(&c);
    if (x == 127) {
        fprintf(stderr, "ferry cluster: sbatch not found; submit %s on the cluster\n", path);
        return 1;
    }
    return x == 0 ? 0 : 1;
}

int cli_cluster_main(int argc, char **argv)
{
    const char *cmd = NULL, *spec_path = NULL, *backend = NULL, *out_path = NULL,
               *daemon = NULL;
    uint64_t timeout_ms = 120000, drain_ms = 30000;
    int lines = 40;
    bool dry_run = false, quiet = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--backend") == 0 && i + 1 < argc) {
            backend = argv[++i];
        } else if ((strcmp(a, "--timeout") == 0 || strcmp(a, "--drain-timeout") == 0) &&
                   i + 1 < argc) {
            uint64_t *dst = a[2] == 't' ? &timeout_ms : &drain_ms;
            if (fy_parse_duration_ms(argv[++i], dst) != FY_OK || *dst == 0) {
                fprintf(stderr, "ferry cluster: bad %s '%s'\n", a, argv[i]);
                return 2;
            }
        } else if (strcmp(a, "--lines") == 0 && i + 1 < argc) {
            lines = atoi(argv[++i]);
            if (lines <= 0 || lines > 100000) {
                fprintf(stderr, "ferry cluster: bad --lines '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(a, "--daemon") == 0 && i + 1 < argc) {
            daemon = argv[++i];
        } else if (strcmp(a, "-o") == 0 && i + 1 < argc) {
            out_path = argv[++i];
        } else if (strcmp(a, "--dry-run") == 0) {
            dry_run = true;
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = true;
        } else if (a[0] == '-') {
            fprintf(stderr, "ferry cluster: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        } else if (cmd == NULL) {
            cmd = a;
        } else if (spec_path == NULL) {
            spec_path = a;
        } else {
            fprintf(stderr, "ferry cluster: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (cmd == NULL || spec_path == NULL) {
        usage(stderr);
        return 2;
    }
    fy_cluster_spec_t *spec = malloc(sizeof(*spec));
    if (spec == NULL)
        return 1;
    char err[4096];
    fy_cluster_backend_t be = FY_CLUSTER_LOCAL;
    if (backend != NULL && fy_cluster_backend_parse(backend, &be) != FY_OK) {
        fprintf(stderr, "ferry cluster: unknown backend '%s' (local, netns, ssh, slurm, k8s)\n",
                backend);
        free(spec);
        return 2;
    }
    if (fy_cluster_spec_load(spec_path, backend ? (int)be : -1, spec, err, sizeof(err)) !=
        FY_OK) {
        fprintf(stderr, "ferry cluster: %s\n", err);
        free(spec);
        return 2;
    }
    fy_cluster_run_opts_t o;
    fy_cluster_run_opts_default(&o);
    o.health = fy_cluster_sdk_health;
    o.health_arg = spec;
    o.timeout_ms = timeout_ms;
    o.drain_timeout_ms = drain_ms;
    o.quiet = quiet;
    bool here = spec->backend == FY_CLUSTER_LOCAL || spec->backend == FY_CLUSTER_NETNS;
    int rc = 0;
    if (strcmp(cmd, "up") == 0) {
        if (here) {
            fy_status_t st = fy_cluster_up(spec, &o, err, sizeof(err));
            if (st != FY_OK) {
                fprintf(stderr, "ferry cluster up: %s\n", err);
                rc = 1;
            } else {
                char router[128];
                fy_cluster_router_addr(spec, router, sizeof(router));
                printf("cluster %s is up (%s): router %s, logs in %s\n", spec->name,
                       fy_cluster_backend_name(spec->backend), router, spec->log_dir);
                print_http_api(spec);
            }
        } else if (spec->backend == FY_CLUSTER_SSH) {
            rc = run_ssh(spec, false, dry_run, timeout_ms);
        } else if (spec->backend == FY_CLUSTER_SLURM) {
            rc = run_slurm(spec, !dry_run);
        } else {
            char path[FY_CLUSTER_PATH_MAX + 64];
            snprintf(path, sizeof(path), "%s/ferry-%s.k8s.yaml", spec->log_dir, spec->name);
            make_log_dir(spec);
            FILE *f = fopen(path, "w");
            if (f == NULL || fy_cluster_gen_k8s(spec, f) != FY_OK) {
                fprintf(stderr, "ferry cluster: cannot write %s\n", path);
                rc = 1;
            } else {
                printf("wrote %s; apply it with: kubectl apply -f %s\n", path, path);
            }
            if (f)
                fclose(f);
        }
    } else if (strcmp(cmd, "down") == 0) {
        if (here) {
            fy_status_t st = fy_cluster_down(spec, &o, err, sizeof(err));
            if (st != FY_OK) {
                fprintf(stderr, "ferry cluster down: %s\n", err);
                rc = 1;
            } else {
                printf("cluster %s is down\n", spec->name);
            }
        } else if (spec->backend == FY_CLUSTER_SSH) {
            rc = run_ssh(spec, true, dry_run, timeout_ms);
        } else if (spec->backend == FY_CLUSTER_SLURM) {
            printf("scancel --name ferry-%s\n", spec->name);
            if (!dry_run) {
                fy_cluster_cmd_t c = {0};
                char name[64];
                snprintf(name, sizeof(name), "--name=ferry-%s", spec->name);
                fy_cluster_cmd_add(&c, "scancel");
                fy_cluster_cmd_add(&c, name);
                rc = fy_cluster_run_cmd(&c, 2) == 0 ? 0 : 1;
                fy_cluster_cmd_free(&c);
            }
        } else {
            printf("kubectl delete -l app.kubernetes.io/part-of=ferry-%s "
                   "deployment,service,configmap\n", spec->name);
        }
    } else if (strcmp(cmd, "status") == 0) {
        if (here)
            rc = fy_cluster_status(spec, &o, stdout) == FY_OK ? 0 : 1;
        else
            rc = wait_router(spec, 1);
    } else if (strcmp(cmd, "logs") == 0) {
        if (fy_cluster_logs(spec, daemon, lines, stdout) != FY_OK) {
            fprintf(stderr, "ferry cluster logs: no daemon '%s'\n", daemon ? daemon : "");
            rc = 1;
        }
    } else if (strcmp(cmd, "gen") == 0) {
        FILE *out = out_path ? fopen(out_path, "w") : stdout;
        if (out == NULL) {
            fprintf(stderr, "ferry cluster gen: cannot write %s\n", out_path);
            free(spec);
            return 1;
        }
        fy_status_t st = FY_OK;
        if (spec->backend == FY_CLUSTER_SSH) {
            st = fy_cluster_gen_ssh(spec, false, out);
        } else if (spec->backend == FY_CLUSTER_SLURM) {
            st = fy_cluster_gen_slurm(spec, out);
        } else if (spec->backend == FY_CLUSTER_K8S) {
            st = fy_cluster_gen_k8s(spec, out);
        } else {
            int max = 16 + spec->n_hosts * 16, n = 0;
            fy_cluster_cmd_t *cmds = calloc((size_t)max, sizeof(*cmds));
            st = cmds ? FY_OK : FY_ERR_NO_MEMORY;
            if (st == FY_OK && spec->backend == FY_CLUSTER_NETNS)
                st = fy_cluster_netns_plan(spec, cmds, max, &n);
            char line[8192];
            for (int i = 0; st == FY_OK && i < n; i++) {
                fy_cluster_cmd_shell(&cmds[i], line, sizeof(line));
                fprintf(out, "%s\n", line);
                fy_cluster_cmd_free(&cmds[i]);
            }
            for (int i = 0; st == FY_OK && i < spec->n_daemons; i++) {
                fy_cluster_cmd_t c;
                st = fy_cluster_daemon_cmd(spec, i, NULL, &c);
                if (st == FY_OK && fy_cluster_cmd_shell(&c, line, sizeof(line)) == FY_OK)
                    fprintf(out, "%s\n", line);
                if (st == FY_OK)
                    fy_cluster_cmd_free(&c);
            }
            free(cmds);
        }
        if (out != stdout)
            fclose(out);
        if (st != FY_OK) {
            fprintf(stderr, "ferry cluster gen: %s\n", fy_status_str(st));
            rc = 1;
        }
    } else {
        fprintf(stderr, "ferry cluster: unknown command '%s'\n", cmd);
        usage(stderr);
        rc = 2;
    }
    free(spec);
    return rc;
}
