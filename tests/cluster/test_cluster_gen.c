/*
 * The generated backends: ssh command lines (shell syntax, targets, the remote daemon command),
 * the Slurm batch script (bash syntax, #SBATCH fields, one srun step per daemon placed on its
 * node) and the Kubernetes manifests (valid YAML; a ConfigMap, a Deployment and a Service per
 * role with replicas, probes, ports and the worker arguments); every daemon reads the cluster's
 * API key from the spec's api_key_file and serves TLS with the spec's tls files, or in
 * Kubernetes from Secrets mounted as those files (the readiness probe speaking TLS too).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <yaml.h>

#include "cluster.h"

static const char k_spec[] = "name: prod\n"
                             "backend: ssh\n"
                             "model: /srv/models/m.gguf\n"
                             "bin_dir: /opt/ferry/bin\n"
                             "log_dir: /var/log/ferry\n"
                             "api_key_file: /srv/ferry/api.key\n"
                             "tls: {cert: /srv/ferry/chain.pem, key: /srv/ferry/key.pem, "
                             "ca: /srv/ferry/ca.pem, any_name: true}\n"
                             "partition: gpu\n"
                             "image: registry.example/ferry:1.0\n"
                             "codec: {policy: ferry, budget: 0.25}\n"
                             "ucx: {tls: 'rc,tcp'}\n"
                             "kv_memory: 8G\n"
                             "hosts:\n"
                             "  - {name: head, address: 10.0.0.1, ssh_user: ops}\n"
                             "  - {name: g1, address: 10.0.0.2, gpus: 4}\n"
                             "  - {name: g2, address: 10.0.0.3, gpus: 4}\n"
                             "roles:\n"
                             "  router: {host: head, port: 8080, http_port: 8000}\n"
                             "  prefill: [{host: g1, gpu: 0, count: 2}]\n"
                             "  decode: [{host: g2, gpu: 1}, {host: g2, gpu: 2}]\n";

static fy_cluster_spec_t *spec(int backend)
{
    fy_cluster_spec_t *s = malloc(sizeof(*s));
    char err[512];
    if (fy_cluster_spec_parse(k_spec, strlen(k_spec), "g.yaml", "/", backend, s, err,
                              sizeof(err)) != FY_OK)
        fail_msg("%s", err);
    return s;
}

static char *gen(fy_cluster_spec_t *s, int what)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    fy_status_t st = what == 0   ? fy_cluster_gen_ssh(s, false, f)
                     : what == 1 ? fy_cluster_gen_ssh(s, true, f)
                     : what == 2 ? fy_cluster_gen_slurm(s, f)
                                 : fy_cluster_gen_k8s(s, f);
    fclose(f);
    assert_int_equal(st, FY_OK);
    return buf;
}

/* `shell -n` on the text: syntax only, nothing runs */
static void expect_syntax(const char *shell, const char *text)
{
    char path[] = "/tmp/ferry-gen-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "%s -n %s", shell, path);
    int rc = system(cmd);
    unlink(path);
    if (rc != 0)
        fail_msg("%s -n rejects:\n%s", shell, text);
}

static int count(const char *text, const char *what)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, what)) != NULL; p += strlen(what))
        n++;
    return n;
}

static void test_ssh(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = spec(-1);
    char *up = gen(s, 0), *down = gen(s, 1);
    expect_syntax("sh", up);
    expect_syntax("sh", down);
    /* one ssh line per daemon, router first, user@ where the spec names one */
    assert_int_equal(count(up, "\nssh -o BatchMode=yes"), 5);
    const char *r = strstr(up, "ssh -o BatchMode=yes -o ConnectTimeout=10 ops@10.0.0.1 ");
    assert_non_null(r);
    assert_true(r < strstr(up, "10.0.0.2"));
    assert_non_null(strstr(up, "/opt/ferry/bin/ferry-router --model /srv/models/m.gguf "
                               "--listen=10.0.0.1:8080"));
    assert_non_null(strstr(up, "--router=10.0.0.1:8080"));
    assert_non_null(strstr(up, "--http-listen=10.0.0.1:8000"));
    assert_non_null(strstr(up, "mkdir -p /var/log/ferry && { nohup env "));
    assert_non_null(strstr(up, ">/var/log/ferry/decode-1.log 2>&1 </dev/null & echo $! "
                               ">/var/log/ferry/decode-1.pid; }"));
    assert_non_null(strstr(up, "CUDA_VISIBLE_DEVICES=2"));
    /* a daemon with a GPU runs its model there */
    assert_int_equal(count(up, " --device=cuda"), 4);
    /* the two prefill workers on g1 take consecutive ports */
    assert_non_null(strstr(up, "--listen=10.0.0.2:50061"));
    assert_non_null(strstr(up, "--listen=10.0.0.2:50062"));
    assert_int_equal(count(up, " --api-key-file=/srv/ferry/api.key "), 5);
    assert_int_equal(count(up, " --tls-cert=/srv/ferry/chain.pem --tls-key=/srv/ferry/key.pem "
                               "--tls-ca=/srv/ferry/ca.pem --tls-any-name "),
                     5);
    assert_int_equal(count(down, "p=$(cat /var/log/ferry/"), 5);
    assert_int_equal(count(down, " && kill -TERM $p && "), 5);

    /* the argv of one ssh command: the remote part is a single word that sh accepts */
    fy_cluster_cmd_t c;
    assert_int_equal(fy_cluster_ssh_cmd(s, 3, false, &c), FY_OK);
    assert_string_equal(c.argv[0], "ssh");
    assert_string_equal(c.argv[5], "10.0.0.3");
    assert_int_equal(c.argc, 7);
    expect_syntax("sh", c.argv[6]);
    assert_non_null(strstr(c.argv[6], "ferry-decode"));
    assert_non_null(strstr(c.argv[6], "--kv-listen=10.0.0.3:50072"));
    assert_non_null(strstr(c.argv[6], "--kv-memory=8G"));
    assert_non_null(strstr(c.argv[6], "UCX_TLS=rc,tcp"));
    fy_cluster_cmd_free(&c);
    assert_int_equal(fy_cluster_ssh_cmd(s, 9, false, &c), FY_ERR_INVALID_ARG);
    free(up);
    free(down);
    free(s);
}

static void test_slurm(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = spec(FY_CLUSTER_SLURM);
    char *text = gen(s, 2);
    expect_syntax("bash", text);
    assert_true(strncmp(text, "#!/bin/bash\n", 12) == 0);
    assert_non_null(strstr(text, "#SBATCH --job-name=ferry-prod\n"));
    assert_non_null(strstr(text, "#SBATCH --nodes=3\n"));
    assert_non_null(strstr(text, "#SBATCH --ntasks=5\n"));
    assert_non_null(strstr(text, "#SBATCH --partition=gpu\n"));
    assert_non_null(strstr(text, "#SBATCH --gpus-per-node=4\n"));
    /* #SBATCH lines come before the first command */
    assert_true(strstr(text, "#SBATCH --gpus-per-node") < strstr(text, "set -euo"));
    assert_int_equal(count(text, "\nsrun "), 5);
    /* each daemon on the node of its host, addresses from the allocation */
    assert_non_null(strstr(text, "--nodelist=\"${nodes[0]}\" --output=/var/log/ferry/router.log"));
    assert_non_null(strstr(text, "--nodelist=\"${nodes[2]}\" --gpus=1 "
                                 "--output=/var/log/ferry/decode-1.log"));
    assert_non_null(strstr(text, "--listen=${ips[0]}:8080"));
    assert_non_null(strstr(text, "--router=${ips[0]}:8080"));
    assert_non_null(strstr(text, "--kv-listen=${ips[2]}:50072"));
    /* the router is waited for before the workers start */
    assert_non_null(strstr(text, "exec 3<>/dev/tcp/${ips[0]}/8080"));
    assert_true(strstr(text, "exec 3<>/dev/tcp") < strstr(text, "# prefill-0"));
    assert_non_null(strstr(text, "\nwait\n"));
    assert_int_equal(count(text, " --api-key-file=/srv/ferry/api.key "), 5);
    assert_int_equal(count(text, " --tls-cert=/srv/ferry/chain.pem "), 5);
    free(text);
    free(s);
}

/* ---- a small YAML walker over the k8s output ---- */

static yaml_node_t *get(yaml_document_t *d, yaml_node_t *map, const char *key)
{
    if (map == NULL || map->type != YAML_MAPPING_NODE)
        return NULL;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = yaml_document_get_node(d, p->key);
        if (k->type == YAML_SCALAR_NODE && strcmp((char *)k->data.scalar.value, key) == 0)
            return yaml_document_get_node(d, p->value);
    }
    return NULL;
}

static yaml_node_t *path(yaml_document_t *d, yaml_node_t *n, const char *dotted)
{
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", dotted);
    for (char *save, *tok = strtok_r(buf, ".", &save); n && tok; tok = strtok_r(NULL, ".", &save)) {
        if (tok[0] >= '0' && tok[0] <= '9') {
            int i = atoi(tok);
            if (n->type != YAML_SEQUENCE_NODE ||
                i >= n->data.sequence.items.top - n->data.sequence.items.start)
                return NULL;
            n = yaml_document_get_node(d, n->data.sequence.items.start[i]);
        } else {
            n = get(d, n, tok);
        }
    }
    return n;
}

static const char *str(yaml_document_t *d, yaml_node_t *n, const char *dotted)
{
    yaml_node_t *x = path(d, n, dotted);
    return x && x->type == YAML_SCALAR_NODE ? (const char *)x->data.scalar.value : NULL;
}

static bool seq_has(yaml_document_t *d, yaml_node_t *seq, const char *prefix)
{
    if (seq == NULL || seq->type != YAML_SEQUENCE_NODE)
        return false;
    for (yaml_node_item_t *it = seq->data.sequence.items.start; it < seq->data.sequence.items.top;
         it++) {
        yaml_node_t *x = yaml_document_get_node(d, *it);
        if (x->type == YAML_SCALAR_NODE &&
            strncmp((char *)x->data.scalar.value, prefix, strlen(prefix)) == 0)
            return true;
    }
    return false;
}

static void test_k8s(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = spec(FY_CLUSTER_K8S);
    char *text = gen(s, 3);
    /* how to make the Secret, from the spec's file */
    assert_non_null(strstr(text, "kubectl create secret generic prod-api-key "
                                 "--from-file=api-key=/srv/ferry/api.key\n"));
    assert_non_null(strstr(text, "kubectl create secret generic prod-tls "
                                 "--from-file=tls.crt=/srv/ferry/chain.pem "
                                 "--from-file=tls.key=/srv/ferry/key.pem "
                                 "--from-file=ca.crt=/srv/ferry/ca.pem\n"));
    assert_null(strstr(text, "must name")); // any_name: no warning about pod IPs
    yaml_parser_t p;
    yaml_parser_initialize(&p);
    yaml_parser_set_input_string(&p, (unsigned char *)text, strlen(text));
    int n_cm = 0, n_dep = 0, n_svc = 0;
    for (;;) {
        yaml_document_t d;
        if (!yaml_parser_load(&p, &d))
            fail_msg("manifests are not valid YAML (line %lu: %s):\n%s",
                     (unsigned long)p.problem_mark.line + 1, p.problem, text);
        yaml_node_t *root = yaml_document_get_root_node(&d);
        if (root == NULL) {
            yaml_document_delete(&d);
            break;
        }
        const char *kind = str(&d, root, "kind"), *name = str(&d, root, "metadata.name");
        assert_non_null(kind);
        assert_non_null(name);
        assert_non_null(str(&d, root, "apiVersion"));
        yaml_node_t *labels = path(&d, root, "metadata.labels");
        yaml_node_t *part = get(&d, labels, "app.kubernetes.io/part-of");
        assert_non_null(part);
        assert_string_equal((char *)part->data.scalar.value, "ferry-prod");
        if (strcmp(kind, "ConfigMap") == 0) {
            n_cm++;
            assert_string_equal(name, "prod-policy");
            assert_string_equal(str(&d, root, "data.policy"), "ferry");
            assert_string_equal(str(&d, root, "data.budget"), "0.25");
        } else if (strcmp(kind, "Deployment") == 0) {
            n_dep++;
            yaml_node_t *c = path(&d, root, "spec.template.spec.containers.0");
            assert_non_null(c);
            assert_string_equal(str(&d, c, "image"), "registry.example/ferry:1.0");
            assert_non_null(path(&d, c, "readinessProbe.exec.command"));
            assert_non_null(str(&d, c, "livenessProbe.tcpSocket.port"));
            assert_string_equal(str(&d, c, "readinessProbe.exec.command.1"), "health");
            assert_string_equal(str(&d, root, "spec.selector.matchLabels.app"), name);
            assert_string_equal(str(&d, root, "spec.template.metadata.labels.app"), name);
            yaml_node_t *args = path(&d, c, "args");
            assert_true(seq_has(&d, args, "--model=") || seq_has(&d, args, "/models/m.gguf"));
            /* the key: the Secret as a read-only file */
            assert_true(seq_has(&d, args, "--api-key-file=/etc/ferry/api-key/api-key"));
            assert_string_equal(str(&d, c, "volumeMounts.0.name"), "api-key");
            assert_string_equal(str(&d, c, "volumeMounts.0.mountPath"), "/etc/ferry/api-key");
            assert_string_equal(str(&d, c, "volumeMounts.0.readOnly"), "true");
            assert_string_equal(str(&d, root, "spec.template.spec.volumes.0.name"), "api-key");
            assert_string_equal(str(&d, root, "spec.template.spec.volumes.0.secret.secretName"),
                                "prod-api-key");
            /* TLS: the Secret's files, and a probe that speaks it */
            assert_true(seq_has(&d, args, "--tls-cert=/etc/ferry/tls/tls.crt"));
            assert_true(seq_has(&d, args, "--tls-key=/etc/ferry/tls/tls.key"));
            assert_true(seq_has(&d, args, "--tls-ca=/etc/ferry/tls/ca.crt"));
            assert_true(seq_has(&d, args, "--tls-any-name"));
            assert_string_equal(str(&d, c, "volumeMounts.1.name"), "tls");
            assert_string_equal(str(&d, c, "volumeMounts.1.mountPath"), "/etc/ferry/tls");
            assert_string_equal(str(&d, root, "spec.template.spec.volumes.1.secret.secretName"),
                                "prod-tls");
            assert_string_equal(str(&d, c, "readinessProbe.exec.command.5"), "--tls-ca");
            assert_string_equal(str(&d, c, "readinessProbe.exec.command.6"),
                                "/etc/ferry/tls/ca.crt");
            assert_string_equal(str(&d, c, "readinessProbe.exec.command.7"), "--tls-any-name");
            const char *replicas = str(&d, root, "spec.replicas");
            if (strcmp(name, "prod-router") == 0) {
                assert_string_equal(replicas, "1");
                assert_string_equal(str(&d, c, "ports.0.containerPort"), "8080");
                assert_string_equal(str(&d, c, "ports.1.name"), "http");
                assert_string_equal(str(&d, c, "ports.1.containerPort"), "8000");
                assert_true(seq_has(&d, args, "--listen=0.0.0.0:8080"));
                assert_true(seq_has(&d, args, "--http-listen=0.0.0.0:8000"));
            } else if (strcmp(name, "prod-prefill") == 0) {
                assert_string_equal(replicas, "2");
                assert_true(seq_has(&d, args, "--router=prod-router:8080"));
                assert_true(seq_has(&d, args, "--advertise=$(POD_IP):"));
                assert_true(seq_has(&d, args, "--policy=$(FERRY_POLICY)"));
                assert_string_equal(str(&d, c, "env.0.valueFrom.fieldRef.fieldPath"),
                                    "status.podIP");
                assert_string_equal(str(&d, c, "env.1.valueFrom.configMapKeyRef.name"),
                                    "prod-policy");
                yaml_node_t *lim = path(&d, c, "resources.limits");
                yaml_node_t *gpu = get(&d, lim, "nvidia.com/gpu");
                assert_non_null(gpu);
                assert_string_equal((char *)gpu->data.scalar.value, "1");
            } else {
                assert_string_equal(name, "prod-decode");
                assert_string_equal(replicas, "2");
                assert_true(seq_has(&d, args, "--advertise-host=$(POD_IP)"));
                assert_true(seq_has(&d, args, "--kv-listen=0.0.0.0:"));
                assert_string_equal(str(&d, c, "ports.1.name"), "kv");
            }
        } else if (strcmp(kind, "Service") == 0) {
            n_svc++;
            assert_string_equal(str(&d, root, "spec.selector.app"), name);
            assert_non_null(str(&d, root, "spec.ports.0.port"));
            if (strcmp(name, "prod-router") == 0)
                assert_string_equal(str(&d, root, "spec.ports.1.port"), "8000");
        } else {
            fail_msg("unexpected kind %s", kind);
        }
        yaml_document_delete(&d);
    }
    yaml_parser_delete(&p);
    assert_int_equal(n_cm, 1);
    assert_int_equal(n_dep, 3);
    assert_int_equal(n_svc, 3);
    free(text);
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ssh),
        cmocka_unit_test(test_slurm),
        cmocka_unit_test(test_k8s),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
