"""Cost of one linear layer by number of tokens: why a multi-token step costs several 1-token steps.

Times ``F.linear`` for SmolLM2-135M's MLP shape (576 -> 1536) at T tokens (fp32 or bf16), median
of repeats, and prints microseconds and the ratio to T = 1. ``--prepacked`` also times the same layer
with its weights prepacked for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``), on CPU.

    python bench/linear_cost.py --threads 2
    python bench/linear_cost.py --threads 2 --dtype bfloat16 --prepacked

Several ``--out-features`` are timed one after another. On a GPU (``--device cuda``) this shows what a
layer's width does to its kernel, e.g. an LM head whose vocabulary is not a multiple of 8 (SmolLM2's
49152 with the mask token added) against the same head padded:

    python bench/linear_cost.py --device cuda --dtype bfloat16 --tokens 1024 --out-features 49153 49216
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 20, 36, 72])
    ap.add_argument("--in-features", type=int, default=576)
    ap.add_argument("--out-features", type=int, nargs="+", default=[1536])
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--prepacked", action="store_true", help="also time oneDNN-prepacked weights (CPU)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    if args.prepacked and dev.type != "cpu":
        ap.error("--prepacked is for CPUs (oneDNN)")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for out_features in args.out_features:
        w = torch.randn(out_features, args.in_features, dtype=dtype, device=dev)
        calls = {"F.linear": lambda x, w=w: F.linear(x, w)}
        if args.prepacked:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, max(args.tokens))
            calls["prepacked"] = lambda x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"linear {args.in_features} -> {out_features}, {args.dtype}, {where}, torch {torch.__version__}")
        for name, call in calls.items():
            base = None
            for t in args.tokens:
                x = torch.randn(t, args.in_features, dtype=dtype, device=dev)
                for _ in range(10):
                    call(x)
                runs = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        call(x)
                    sync()
                    runs.append((time.perf_counter() - t0) / args.iters * 1e6)
                us = statistics.median(runs)
                base = base or us
                print(f"{name:9s} T = {t:3d}: {us:7.1f} us  x{us / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
