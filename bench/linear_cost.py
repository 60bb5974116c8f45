"""Cost of one linear layer by number of tokens: why a multi-token step costs several 1-token steps.

Times ``F.linear`` for SmolLM2-135M's MLP shape (576 -> 1536) at T tokens, fp32, median of
repeats, and prints microseconds and the ratio to T = 1.

    python bench/linear_cost.py --threads 2
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
    ap.add_argument("--out-features", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    w = torch.randn(args.out_features, args.in_features)
    base = None
    print(f"linear {args.in_features} -> {args.out_features}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for t in args.tokens:
        x = torch.randn(1, t, args.in_features)
        for _ in range(10):
            F.linear(x, w)
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                F.linear(x, w)
            runs.append((time.perf_counter() - t0) / args.iters * 1e6)
        us = statistics.median(runs)
        base = base or us
        print(f"T = {t:3d}: {us:7.1f} us  x{us / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
