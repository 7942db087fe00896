#!/usr/bin/env python3
"""ferry-decode as a process: --help, a bad flag, a --config file with a flag that overrides
it, --port-file, /healthz and /metrics on the RPC port, and SIGTERM draining to a clean exit.

usage: daemon_test.py FERRY_DECODE MODEL_PATH
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def main():
    exe, model = sys.argv[1], sys.argv[2]
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or "--kv-memory" not in out.stdout:
        fail(f"--help: rc {out.returncode}")
    out = subprocess.run([exe, "--no-such-flag"], capture_output=True, text=True, timeout=30)
    if out.returncode == 0:
        fail("an unknown flag was accepted")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "decode.yaml")
        with open(cfg, "w") as f:
            f.write(f"model: {model}\nlisten: 127.0.0.1:0\nkv-listen: 127.0.0.1:0\n"
                    "kv_memory: 64M\nthreads: 2\nmax-batch: 4\n")
        # The flag overrides the file: 32 MiB of 16 KiB pages.
        port_file = os.path.join(tmp, "port")
        proc = subprocess.Popen([exe, "--config", cfg, "--kv-memory", "32M", "--log-level", "info",
                                 "--port-file", port_file],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            if "rpc=" not in line:
                fail(f"no listening line: {line!r} {proc.stderr.read()}")
            port = int(line.split("rpc=")[1].split()[0].rsplit(":", 1)[1])
            with open(port_file) as f:
                if int(f.read()) != port:
                    fail("--port-file disagrees with the listening line")
            status, body = get(port, "/healthz")
            if status != 200 or body.strip() != "ok":
                fail(f"/healthz: {status} {body!r}")
            status, body = get(port, "/metrics")
            if status != 200 or "ferry_decode_total_pages 2048" not in body:
                fail(f"/metrics: {status}: {body[:400]!r}")
            for name in ("ferry_decode_free_pages", "ferry_decode_running_sequences",
                         "ferry_decode_tokens_generated_total", "ferry_decode_step_seconds",
                         "ferry_decode_placed_wire_bytes_total", "ferry_decode_failures_total"):
                if name not in body:
                    fail(f"/metrics lacks {name}")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            err = proc.stderr.read()
            if rc != 0:
                fail(f"exit status {rc} after SIGTERM: {err}")
            if "draining" not in err or "stopped" not in err:
                fail(f"no drain in the log: {err}")
            print(f"SIGTERM: drained and exited in {time.monotonic() - t0:.2f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print("ok")


if __name__ == "__main__":
    main()
