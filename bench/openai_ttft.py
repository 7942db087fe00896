#!/usr/bin/env python3
"""The OpenAI-compatible API's cost in time to first token: a local cluster (tests/e2e/
local_cluster.py, real model, router with --http-listen), then N rounds of one request through
the gRPC API (`ferry generate --stats`, its "client" TTFT) and the same through HTTP (time to the
first content event of a stream), alternating; the answers must be equal.

usage (from the source root, after make build): .venv/bin/python bench/openai_ttft.py [N]
"""
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "tests/e2e"))
from local_cluster import LocalCluster, model_path
build, n = "build", int(sys.argv[1]) if len(sys.argv) > 1 else 20
prompt = "What is the capital of France?"
c = LocalCluster(build, model_path())
hpf = c.port_file("http")
c.router_args = ["--http-listen", "127.0.0.1:0", "--http-port-file", hpf, "--model-name", "m"]
with c:
    hport = c.wait_port(hpf)
    for _ in range(600):
        if subprocess.run([build + "/client/ferry", "health", c.router], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    def grpc_once():
        t0 = time.perf_counter()
        p = subprocess.run([build + "/client/ferry", "generate", c.router, "--chat", "--temperature", "0",
                            "--max-tokens", "16", "--policy", "fp16", "--stats", prompt],
                           capture_output=True, text=True)
        m = re.search(r"client ([0-9.]+) ms", p.stderr)
        return float(m.group(1)), p.stdout
    def http_once():
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": 16, "temperature": 0, "stream": True, "kv_policy": "fp16"})
        conn = http.client.HTTPConnection("127.0.0.1", hport)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        ttft, text = None, ""
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            piece = d["choices"][0]["delta"].get("content") if d["choices"] else None
            if piece and ttft is None:
                ttft = (time.perf_counter() - t0) * 1e3
            text += piece or ""
        conn.close()
        return ttft, text
    grpc_once(); http_once()  # warm-up
    g, h = [], []
    for i in range(n):
        tg, sg = grpc_once()
        th, sh = http_once()
        assert sg.rstrip("\n") == sh, (sg, sh)
        g.append(tg); h.append(th)
    print("n=%d  TTFT median ms: gRPC (ferry CLI) %.1f, HTTP stream %.1f; difference of medians %.1f ms"
          % (n, statistics.median(g), statistics.median(h), statistics.median(h) - statistics.median(g)))
    d = sorted(b - a for a, b in zip(g, h))
    print("paired differences (HTTP - gRPC) ms: median %.1f, p10 %.1f, p90 %.1f" % (
        statistics.median(d), d[len(d) // 10], d[(9 * len(d)) // 10]))
