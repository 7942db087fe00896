#!/usr/bin/env python3
"""attend_sdpa.py: the baseline of `ferry-bench attend` (bench/bench_attend.c).

One decode step of one Llama-3-8B layer (32 query heads, 8 kv heads, head_dim 128) with
torch.nn.functional.scaled_dot_product_attention over contiguous FP16 K/V on the GPU, at the
same contexts and batches. The 4 query heads of a GQA group are passed as 4 query positions of
their kv head (no mask), so K/V are never repeated: q [B, 8, 4, 128], k/v [B, 8, ctx, 128].
Timing: CUDA events around 8 back-to-back calls, one warm-up interval, median over --reps
intervals; several K/V copies are rotated when one step's K/V would fit in L2.

    python3 bench/attend_sdpa.py [--out FILE] [--contexts 4096,32768,131072] [--batches 1,32]

Prints JSON ({"results": [{"context", "batch", "ms", "bytes"}...]}) to stdout, and to --out.
ferry-bench attend --sdpa-json FILE reads it.
"""
import argparse
import json
import statistics
import sys
import time

N_HEADS, N_KV, HEAD_DIM = 32, 8, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"attend_sdpa: torch is not available: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("attend_sdpa: no CUDA device", file=sys.stderr)
        return 77
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 0) or 50 << 20
    contexts = [int(x) for x in args.contexts.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    grp = N_HEADS // N_KV
    scale = 1.0 / HEAD_DIM ** 0.5
    results = []
    t_start = time.time()
    for ctx in contexts:
        for b in batches:
            kv_bytes = 2 * b * N_KV * ctx * HEAD_DIM * 2
            copies = max(1, min(16, -(-4 * l2 // kv_bytes)))
            gen = torch.Generator(device=dev).manual_seed(ctx + b)
            kv = [(torch.randn(b, N_KV, ctx, HEAD_DIM, device=dev, dtype=torch.float16,
                               generator=gen),
                   torch.randn(b, N_KV, ctx, HEAD_DIM, device=dev, dtype=torch.float16,
                               generator=gen))
                  for _ in range(copies)]
            q = torch.randn(b, N_KV, grp, HEAD_DIM, device=dev, dtype=torch.float16,
                            generator=gen)
            times = []
            steps = 8  # calls per timed interval, as ferry-bench attend does
            for r in range(-1, args.reps):
                e0 = torch.cuda.Event(enable_timing=True)
                e1 = torch.cuda.Event(enable_timing=True)
                e0.record()
                for s in range(steps):
                    k, v = kv[((r + 1) * steps + s) % copies]
                    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
                e1.record()
                e1.synchronize()
                if r >= 0:  # r == -1 is the warm-up
                    times.append(e0.elapsed_time(e1) / steps)
            assert o.shape == (b, N_KV, grp, HEAD_DIM)
            ms = statistics.median(times)
            results.append({"context": ctx, "batch": b, "ms": ms, "bytes": kv_bytes,
                            "gbps": kv_bytes / (ms * 1e-3) / 1e9})
            print(f"sdpa context {ctx:7d} batch {b:3d}: {ms * 1e3:9.1f} us "
                  f"{kv_bytes / (ms * 1e-3) / 1e9:7.0f} GB/s", file=sys.stderr)
            del kv, q, o
            torch.cuda.empty_cache()
    doc = {
        "bench": "attend_sdpa",
        "device": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "shape": {"n_heads": N_HEADS, "n_kv_heads": N_KV, "head_dim": HEAD_DIM,
                  "dtype": "float16", "layout": "contiguous [B, kv, ctx, d]"},
        "reps": args.reps,
        "seconds": round(time.time() - t_start, 1),
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
