#!/usr/bin/env python3
"""Plots a `ferry-bench e2e --json` result: mean TTFT against the link limit, one line per
codec setting (left), throughput against the link limit (middle) and, where the workers report
prefill compute time, the median TTFT / max(prefill compute, transfer) against the goal of 1.1
(right).

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
    bound = any(r.get("ttft_over_bound_p50") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if bound else 2, figsize=(16 if bound else 11, 4.2))
    ax1, ax2 = axes[0], axes[1]
    for s in settings:
        pts = sorted((r["link_bps"] or 1e12, r["ttft_ms_mean"], r["throughput_tok_s"])
                     for r in rows if r["setting"] == s)
        xs = [p[0] / 1e6 for p in pts]
        ax1.plot(xs, [p[1] for p in pts], "o-", label=s)
        ax2.plot(xs, [p[2] for p in pts], "o-", label=s)
        if bound:
            pb = sorted((r["link_bps"] or 1e12, r.get("ttft_over_bound_p50")) for r in rows
                        if r["setting"] == s and r.get("ttft_over_bound_p50") is not None)
            axes[2].plot([p[0] / 1e6 for p in pb], [p[1] for p in pb], "o-", label=s)
    panels = [(ax1, "mean TTFT (ms)"), (ax2, "throughput (completion tok/s)")]
    if bound:
        goal = res.get("ttft_over_bound_goal", 1.1)
        axes[2].axhline(goal, color="k", ls="--", lw=1, label=f"goal {goal}")
        axes[2].axhline(1.0, color="gray", ls=":", lw=1)
        axes[2].legend(fontsize=8)
        panels.append((axes[2], "median TTFT / max(prefill, transfer)"))
    for ax, label in panels:
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
