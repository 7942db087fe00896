"""A router, a decode and a prefill worker with the real model on free loopback ports, for the
Python end-to-end tests (tests/e2e/*.py).

    with LocalCluster(build_root, model, router_args=[...], daemon_args=[...]) as c:
        c.router          # "127.0.0.1:PORT", the gRPC address
        c.port_file(...)  # a path in the cluster's work folder, for --*-port-file options
        c.wait_port(path) # the port a daemon wrote there

On exit every daemon gets SIGTERM (SIGKILL after 30 s); a daemon that did not exit 0 has its
log printed.
"""
import os
import signal
import socket
import subprocess
import tempfile
import time


def model_path():
    """The real model ($FERRY_MODEL or models/ under $FERRY_SOURCE_ROOT), or None (said why)."""
    src = os.environ.get("FERRY_SOURCE_ROOT", ".")
    model = os.environ.get("FERRY_MODEL") or os.path.join(
        src, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(model):
        print("missing model %s: run scripts/setup.sh" % model)
        return None
    return model


class Checks:
    """A script's checks: one "ok"/"FAIL" line each, and the closing count."""

    def __init__(self):
        self.passed, self.failures = [], []

    def __call__(self, what, ok, detail=""):
        print("%s %s %s" % ("ok  " if ok else "FAIL", what, detail))
        (self.passed if ok else self.failures).append(what)

    def finish(self):
        """Prints the count; the exit status (1 when a check failed or none ran)."""
        print("%d passed, %d failed" % (len(self.passed), len(self.failures)))
        return 1 if self.failures or not self.passed else 0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LocalCluster:
    def __init__(self, build, model, router_args=(), daemon_args=()):
        """router_args go to the router; daemon_args to all three (TLS options, say)."""
        self.build, self.model, self.router_args = build, model, list(router_args)
        self.daemon_args = list(daemon_args)
        self.work = tempfile.mkdtemp(prefix="ferry-e2e-")
        self.procs = []

    def port_file(self, name):
        return os.path.join(self.work, name + ".port")

    def wait_port(self, path, what="daemon"):
        for _ in range(600):
            if os.path.exists(path) and open(path).read().strip():
                return int(open(path).read())
            time.sleep(0.1)
        raise RuntimeError(what + " did not start")

    def start(self, name, args, env=None):
        log = open(os.path.join(self.work, name + ".log"), "w")
        p = subprocess.Popen([os.path.join(self.build, args[0])] + args[1:], stdout=log,
                             stderr=subprocess.STDOUT, env=env)
        self.procs.append((name, p))
        return p

    def log(self, name):
        return open(os.path.join(self.work, name + ".log")).read()

    def __enter__(self):
        try:
            rport_file = self.port_file("router")
            self.start("router", ["router/ferry-router", "--model", self.model,
                                  "--listen", "127.0.0.1:0", "--port-file", rport_file,
                                  "--log-level", "warn"] + self.router_args + self.daemon_args)
            self.router_port = self.wait_port(rport_file, "router")
            self.router = "127.0.0.1:%d" % self.router_port
            self.decode_port = free_port()  # its RPC port (and /metrics)
            self.start("decode", ["decode/ferry-decode", "--model", self.model,
                                  "--listen", "127.0.0.1:%d" % self.decode_port,
                                  "--kv-listen", "127.0.0.1:%d" % free_port(),
                                  "--router", self.router, "--threads", "1",
                                  "--log-level", "warn"] + self.daemon_args)
            self.start("prefill", ["prefill/ferry-prefill", "--model", self.model,
                                   "--listen", "127.0.0.1:0", "--router", self.router,
                                   "--threads", "1", "--log-level", "warn"] + self.daemon_args)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            if rc != 0:
                print("%s exited %s; log:" % (name, rc))
                print(self.log(name))
        return False
