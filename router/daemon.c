/*
 * daemon.c: start-up pieces shared by the ferry-* daemons (see daemon.h).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon.h"
#include "ferry.pb-c.h"

fy_status_t daemon_config(const fy_opt_t *opts, size_t n_opts, int argc, char **argv,
                          const char *usage, const char *summary, fy_config_t **cfg_p,
                          int *exit_p)
{
    fy_config_t *cfg = NULL;
    char err[256] = "";
    *exit_p = -1;
    fy_status_t st = fy_config_create(opts, n_opts, &cfg);
    if (st != FY_OK) {
        *exit_p = 1;
        return st;
    }
    st = fy_config_parse_args(cfg, argc, argv, err, sizeof(err));
    if (st == FY_OK && fy_config_help_requested(cfg)) {
        fy_config_print_help(cfg, stdout, usage, summary);
        fy_config_destroy(cfg);
        *exit_p = 0;
        return FY_OK;
    }
    if (st == FY_OK)
        st = fy_config_validate(cfg, err, sizeof(err));
    if (st == FY_OK && fy_config_n_positional(cfg) > 0) {
        snprintf(err, sizeof(err), "unexpected argument \"%s\"", fy_config_positional(cfg, 0));
        st = FY_ERR_INVALID_ARG;
    }
    const char *fmt = st == FY_OK ? fy_config_str(cfg, "log-format") : NULL;
    if (st == FY_OK && fmt != NULL && strcmp(fmt, "text") != 0 && strcmp(fmt, "json") != 0) {
        snprintf(err, sizeof(err), "--log-format must be text or json, not \"%s\"", fmt);
        st = FY_ERR_INVALID_ARG;
    }
    const char *lvl = st == FY_OK ? fy_config_str(cfg, "log-level") : NULL;
    fy_log_level_t level;
    if (st == FY_OK && lvl != NULL && lvl[0] != '\0' && fy_log_level_parse(lvl, &level) != FY_OK) {
        snprintf(err, sizeof(err), "--log-level must be trace|debug|info|warn|error|off");
        st = FY_ERR_INVALID_ARG;
    }
    if (st != FY_OK) {
        fprintf(stderr, "%s: %s\n", argv[0], err[0] ? err : fy_status_str(st));
        fprintf(stderr, "usage: %s (see --help)\n", usage);
        fy_config_destroy(cfg);
        *exit_p = 2;
        return st;
    }
    if (fmt != NULL && strcmp(fmt, "json") == 0)
        fy_log_set_json(true);
    if (lvl != NULL && lvl[0] != '\0')
        fy_log_set_level(level);
    *cfg_p = cfg;
    return FY_OK;
}

fy_status_t daemon_hostport(const char *addr, char *host, size_t cap, int *port_p)
{
    if (addr == NULL)
        return FY_ERR_INVALID_ARG;
    const char *colon = strrchr(addr, ':');
    if (colon == NULL || colon[1] == '\0')
        return FY_ERR_INVALID_ARG;
    const char *h = addr;
    size_t hl = (size_t)(colon - addr);
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl == 0 || hl >= cap)
        return FY_ERR_INVALID_ARG;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port < 0 || port > 65535)
        return FY_ERR_INVALID_ARG;
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port_p = (int)port;
    return FY_OK;
}

/* Reads the key from the first line of path into key (cap bytes): trailing blanks and the line
 * end dropped; 1..256 bytes of visible ASCII, else FY_ERR_INVALID_ARG (logged). */
static fy_status_t read_key_file(const char *path, char *key, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        FY_LOG_ERROR("daemon", "--api-key-file %s: %s", path, strerror(errno));
        return errno == ENOENT ? FY_ERR_NOT_FOUND : FY_ERR_IO;
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && (sb.st_mode & 0004) != 0)
        FY_LOG_WARN("daemon", "--api-key-file %s: every user can read it (chmod 600)", path);
    char line[1024];
    const size_t got = fread(line, 1, sizeof(line), f);
    const bool failed = ferror(f) != 0;
    fclose(f);
    if (failed) {
        FY_LOG_ERROR("daemon", "--api-key-file %s: read error", path);
        return FY_ERR_IO;
    }
    const char *what = got == 0 ? "is empty" : NULL;
    size_t n = 0; // the first line
    while (n < got && line[n] != '\n')
        n++;
    while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
        n--;
    if (what == NULL && n == 0)
        what = "has no key on its first line";
    else if (what == NULL && n > 256)
        what = "holds a key over 256 bytes";
    for (size_t i = 0; what == NULL && i < n; i++)
        if (line[i] < 0x21 || line[i] > 0x7e)
            what = "holds a byte that is not visible ASCII (a key is one word)";
    if (what != NULL || n >= cap) {
        FY_LOG_ERROR("daemon", "--api-key-file %s: the file %s", path, what ? what : "is too long");
        return FY_ERR_INVALID_ARG;
    }
    memcpy(key, line, n);
    key[n] = '\0';
    return FY_OK;
}

fy_status_t daemon_api_key(const fy_config_t *cfg, const char **key_p)
{
    static char from_file[257];
    *key_p = NULL;
    const char *key = fy_config_str(cfg, "api-key");
    const char *file = fy_config_str(cfg, "api-key-file");
    if (key != NULL && key[0] != '\0' && file != NULL && file[0] != '\0') {
        FY_LOG_ERROR("daemon", "--api-key and --api-key-file: give one");
        return FY_ERR_INVALID_ARG;
    }
    if ((key == NULL || key[0] == '\0') && (file == NULL || file[0] == '\0')) {
        key = getenv("FERRY_API_KEY");
        file = getenv("FERRY_API_KEY_FILE");
        if (key != NULL && key[0] != '\0')
            file = NULL; // the key itself wins over a file named beside it
    }
    if (key == NULL || key[0] == '\0') {
        if (file == NULL || file[0] == '\0')
            return FY_OK;
        fy_status_t st = read_key_file(file, from_file, sizeof(from_file));
        if (st != FY_OK)
            return st;
        key = from_file;
    }
    if (strlen(key) > 256) {
        FY_LOG_ERROR("daemon", "--api-key: at most 256 bytes");
        return FY_ERR_INVALID_ARG;
    }
    *key_p = key;
    return FY_OK;
}

fy_status_t daemon_tls(const fy_config_t *cfg, daemon_tls_t *t)
{
    memset(t, 0, sizeof(*t));
    const char *cert = fy_config_str(cfg, "tls-cert"), *key = fy_config_str(cfg, "tls-key");
    const char *ca = fy_config_str(cfg, "tls-ca");
    cert = cert != NULL ? cert : "";
    key = key != NULL ? key : "";
    ca = ca != NULL && ca[0] ? ca : cert;
    if (!cert[0] != !key[0]) {
        FY_LOG_ERROR("daemon", "--tls-cert and --tls-key go together");
        return FY_ERR_INVALID_ARG;
    }
    char err[200];
    rpc_tls_params_t p;
    if (cert[0]) {
        rpc_tls_params_default(&p);
        p.cert_file = cert;
        p.key_file = key;
        if (rpc_tls_create(&p, &t->server, err, sizeof(err)) != FY_OK) {
            FY_LOG_ERROR("daemon", "--tls-cert: %s", err);
            return FY_ERR_INVALID_ARG;
        }
    }
    if (ca[0]) {
        rpc_tls_params_default(&p);
        p.ca_file = ca;
        p.check_name = !fy_config_bool(cfg, "tls-any-name");
        if (rpc_tls_create(&p, &t->client, err, sizeof(err)) != FY_OK) {
            FY_LOG_ERROR("daemon", "--tls-ca: %s", err);
            daemon_tls_free(t);
            return FY_ERR_INVALID_ARG;
        }
    }
    return FY_OK;
}

void daemon_tls_free(daemon_tls_t *t)
{
    rpc_tls_destroy(t->server);
    rpc_tls_destroy(t->client);
    t->server = t->client = NULL;
}

fy_status_t daemon_auth(void *arg, const char *path, const char *authorization)
{
    if (strcmp(path, "/ferry.v1.Ferry/Health") == 0)
        return FY_OK;
    return fy_bearer_ok(authorization, authorization ? strlen(authorization) : 0, arg)
               ? FY_OK
               : FY_ERR_UNAUTHENTICATED;
}

fy_status_t daemon_port_file(const char *path, int port)
{
    if (path == NULL || path[0] == '\0')
        return FY_OK;
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= sizeof(tmp))
        return FY_ERR_INVALID_ARG;
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return FY_ERR_IO;
    bool ok = fprintf(f, "%d\n", port) > 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return FY_ERR_IO;
    }
    return FY_OK;
}

typedef struct {
    const char *role;
    const bool *draining;
} health_arg_t;

void daemon_health_answer(rpc_call_t *call, const char *role, bool draining)
{
    Ferry__V1__HealthResponse resp = FERRY__V1__HEALTH_RESPONSE__INIT;
    resp.status = draining ? FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__DRAINING
                           : FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
    resp.version = (char *)FY_VERSION_STRING;
    resp.role = (char *)role;
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void on_health(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    health_arg_t *h = arg;
    daemon_health_answer(call, h->role, *h->draining);
}

fy_status_t daemon_health_serve(rpc_server_t *srv, const char *role, const bool *draining)
{
    static rpc_handler_cb handlers[8];
    static health_arg_t arg;
    const ProtobufCServiceDescriptor *d = &ferry__v1__ferry__descriptor;
    if (d->n_methods > FY_ARRAY_SIZE(handlers))
        return FY_ERR_INTERNAL;
    for (unsigned i = 0; i < d->n_methods; i++)
        handlers[i] = strcmp(d->methods[i].name, "Health") == 0 ? on_health : NULL;
    arg.role = role;
    arg.draining = draining;
    return rpc_server_add_service(srv, d, handlers, NULL, &arg);
}

static void on_signal(uv_signal_t *h, int signum)
{
    daemon_signals_t *s = h->data;
    s->count++;
    if (s->count == 1) {
        FY_LOG_INFO("daemon", "%s: draining (send it again to stop at once)",
                    signum == SIGTERM ? "SIGTERM" : "SIGINT");
        s->drain(s->arg);
    } else {
        FY_LOG_WARN("daemon", "second signal: stopping now");
        s->stop(s->arg);
    }
}

fy_status_t daemon_signals_start(daemon_signals_t *s, uv_loop_t *loop, daemon_signal_cb drain,
                                 daemon_signal_cb stop, void *arg)
{
    memset(s, 0, sizeof(*s));
    s->drain = drain;
    s->stop = stop;
    s->arg = arg;
    signal(SIGPIPE, SIG_IGN);
    if (uv_signal_init(loop, &s->term) != 0 || uv_signal_init(loop, &s->intr) != 0)
        return FY_ERR_INTERNAL;
    s->term.data = s->intr.data = s;
    if (uv_signal_start(&s->term, on_signal, SIGTERM) != 0 ||
        uv_signal_start(&s->intr, on_signal, SIGINT) != 0)
        return FY_ERR_INTERNAL;
    return FY_OK;
}

void daemon_loop_close(uv_loop_t *loop, const char *module)
{
    while (uv_run(loop, UV_RUN_NOWAIT) != 0)
        uv_run(loop, UV_RUN_ONCE);
    if (uv_loop_close(loop) != 0)
        FY_LOG_WARN(module, "libuv handles left open at exit");
}

void daemon_signals_close(daemon_signals_t *s)
{
    if (s->term.data == NULL)
        return; // never started
    if (!uv_is_closing((uv_handle_t *)&s->term))
        uv_close((uv_handle_t *)&s->term, NULL);
    if (!uv_is_closing((uv_handle_t *)&s->intr))
        uv_close((uv_handle_t *)&s->intr, NULL);
}
