#!/usr/bin/env python3
"""What the KV codec costs on a given text, through the serving path: a local cluster
(tests/e2e/local_cluster.py, real model), then `ferry generate --score CONTINUATION PROMPT`
under each policy, with the KV bytes it crossed the wire in (wire over FP16) and the budget the
router used. The continuation is forced token by token (teacher forcing) and each
token's log-probability comes from the decode worker over the prompt's compressed KV (the
first from the prefill worker), so the rows differ only by the codec.

usage (from the source root, after make build):
  .venv/bin/python bench/score_policies.py [--build DIR] [--policies fp16,int8,ferry:0.25]
                                           PROMPT CONTINUATION
"""
import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "tests/e2e"))
from local_cluster import LocalCluster, model_path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--build", default="build")
ap.add_argument("--policies", default="fp16,int8,int4,ferry:0.5,ferry:0.25",
                help="comma-separated POLICY or POLICY:BUDGET")
ap.add_argument("prompt")
ap.add_argument("continuation")
a = ap.parse_args()
ferry = os.path.join(a.build, "client/ferry")
with LocalCluster(a.build, model_path()) as c:
    for _ in range(600):
        p = subprocess.run([ferry, "health", c.router], capture_output=True, text=True)
        if p.returncode == 0 and "NOT_SERVING" not in p.stdout:
            break
        time.sleep(0.2)
    print("%-12s %7s %10s %9s %10s %8s %7s" % ("policy", "tokens", "sum", "mean", "perplexity",
                                               "wire", "budget"))
    for spec in a.policies.split(","):
        policy, _, budget = spec.partition(":")
        args = [ferry, "generate", c.router, "--policy", policy, "--score", a.continuation,
                "--stats"]
        if budget:
            args += ["--budget", budget]
        p = subprocess.run(args + [a.prompt], capture_output=True, text=True, timeout=600)
        head = p.stderr.split()
        # --stats: "KV R bytes raw -> W bytes wire (W/R), ..., budget B; ..."
        kv = re.search(r"KV \d+ bytes raw -> \d+ bytes wire \(([0-9.]+)\)", p.stderr)
        used = re.search(r"budget ([0-9.]+|\(policy's\));", p.stderr)
        if p.returncode != 0 or len(head) < 9 or head[0] != "logprobs:" or kv is None:
            sys.exit("%s: %s" % (spec, p.stderr.strip()))
        print("%-12s %7s %10s %9s %10s %8s %7s" % (spec, head[1], head[4].rstrip(","), head[6],
                                                  head[8].rstrip(")"), kv.group(1),
                                                  used.group(1) if used else "-"))
