#!/usr/bin/env python3
"""Plots a `ferry-bench e2e --json` result: mean TTFT against the link limit, one line per
codec setting (left), and throughput against the link limit (right).

    plot_e2e.py RESULT.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        res = json.load(f)
    rows = res["results"]
    settings = []
    for r in rows:
        if r["setting"] not in settings:
            settings.append(r["setting"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in settings:
        pts = sorted((r["link_bps"] or 1e12, r["ttft_ms_mean"], r["throughput_tok_s"])
                     for r in rows if r["setting"] == s)
        xs = [p[0] / 1e6 for p in pts]
        ax1.plot(xs, [p[1] for p in pts], "o-", label=s)
        ax2.plot(xs, [p[2] for p in pts], "o-", label=s)
    for ax, label in ((ax1, "mean TTFT (ms)"), (ax2, "throughput (completion tok/s)")):
        ax.set_xscale("log")
        ax.set_xlabel("link limit (Mbit/s)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.legend(title="KV codec")
    lens = ",".join(str(x) for x in res["prompt_tokens"])
    fig.suptitle(f"ferry-bench e2e: {res['cluster']} ({res['backend']}), "
                 f"{res['prefill_workers']}P+{res['decode_workers']}D, prompts {lens} tokens, "
                 f"{res['clients']} clients" + (" [quick]" if res.get("quick") else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
