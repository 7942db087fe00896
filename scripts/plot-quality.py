#!/usr/bin/env python3
"""Plots a `ferry-bench quality --json` result: dPPL vs bytes (one panel per context length)
and NIAH retrieval vs bytes, one line per policy, each point at its measured wire ratio (the
budget b wherever the policy met it); policies without a budget are a single marker.

    plot-quality.py RESULT.json PREFIX    ->  PREFIX-dppl.png, PREFIX-niah.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def by_policy(rows, key_y):
    """Points at the measured wire ratio: where a policy cannot meet b (spectrum3 below 0.3,
    whose 4/4 floor is 0.30 with its scales), it is drawn at the bytes it really sent."""
    lines = {}
    for r in rows:
        lines.setdefault(r["policy"], []).append((r["wire_ratio"], r[key_y]))
    return {p: sorted(v) for p, v in lines.items()}


def draw(ax, lines, ylabel, symlog=False):
    for policy, pts in sorted(lines.items()):
        xs, ys = zip(*pts)
        style = "o-" if len(pts) > 1 else "s"
        ax.plot(xs, ys, style, label=policy, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("wire ratio: all bytes sent / FP16 bytes (= b when met)")
    ax.set_ylabel(ylabel)
    if symlog:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(True, which="both", alpha=0.3)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        res = json.load(f)
    prefix = sys.argv[2]
    contexts = sorted({r["context"] for r in res["results"]})
    if contexts:
        plot_dppl(res, contexts, prefix)
    if res.get("niah"):
        plot_niah(res, prefix)
    return 0


def plot_dppl(res, contexts, prefix):
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        rows = [r for r in res["results"] if r["context"] == c]
        draw(ax, by_policy(rows, "dppl_pct"), "dPPL % vs FP16 cache", symlog=True)
        ax.set_title(f"context {c} tokens")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{res['model']} ({res['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix + "-dppl.png", dpi=110)
    print(prefix + "-dppl.png")


def plot_niah(res, prefix):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    # Older results carry no NIAH wire ratio: take the teacher-forcing row's.
    ratio = {r["label"]: r["wire_ratio"] for r in res["results"]}
    rows = [dict(r, rate_pct=100.0 * r["rate"],
                 wire_ratio=r.get("wire_ratio") or ratio.get(r["label"], 1.0))
            for r in res["niah"]]
    ref = [r for r in rows if r["policy"] == "fp16"]
    draw(ax, by_policy([r for r in rows if r["policy"] != "fp16"], "rate_pct"),
         "NIAH exact-match retrieval %")
    if ref:
        ax.axhline(ref[0]["rate_pct"], color="k", linestyle="--", label="full cache")
    ax.set_ylim(-5, 105)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("needle in a haystack", fontsize=10)
    fig.tight_layout()
    fig.savefig(prefix + "-niah.png", dpi=110)
    print(prefix + "-niah.png")

if __name__ == "__main__":
    sys.exit(main())
