"""Cost of one linear layer by number of tokens: why a multi-token step costs several 1-token steps.

Times ``F.linear`` for SmolLM2-135M's MLP shape (576 -> 1536) at T tokens (fp32 or bf16), median
of repeats, and prints microseconds and the ratio to T = 1. ``--prepacked`` also times the same layer
with its weights prepacked for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``), on CPU.

    python bench/linear_cost.py --threads 2
    python bench/linear_cost.py --threads 2 --dtype bfloat16 --prepacked

``--flush-mb M`` reads M MB of other memory before each timed call and times the calls one by one, so the
weight comes from memory as in a decoding forward (which reads every weight once) rather than from the
cache. The LM head of SmolLM2-135M (576 -> 49153, 113 MB in float32), by rows:

    python bench/linear_cost.py --threads 2 --out-features 49153 --flush-mb 256 --tokens 1 3 5 8 10 16 20

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
    ap.add_argument("--flush-mb", type=int, default=0,
                    help="read this many MB of other memory before each timed call (the weight then comes from memory)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    if args.prepacked and dev.type != "cpu":
        ap.error("--prepacked is for CPUs (oneDNN)")
    if args.flush_mb and dev.type != "cpu":
        ap.error("--flush-mb is for CPUs")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    flush = torch.ones(args.flush_mb * 2**20 // 4) if args.flush_mb else None
    for out_features in args.out_features:
        w = torch.randn(out_features, args.in_features, dtype=dtype, device=dev)
        calls = {"F.linear": lambda x, w=w: F.linear(x, w)}
        if args.prepacked:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, max(args.tokens))
            calls["prepacked"] = lambda x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
        flushed = f", {args.flush_mb} MB read before each call" if flush is not None else ""
        print(f"linear {args.in_features} -> {out_features}, {args.dtype}, {where}, torch {torch.__version__}{flushed}")
        for name, call in calls.items():
            base = None
            for t in args.tokens:
                x = torch.randn(t, args.in_features, dtype=dtype, device=dev)
                for _ in range(10):
                    call(x)
                runs = []
                for _ in range(args.repeats):
                    if flush is not None:  # one call at a time, each after the flush
                        calls_us = []
                        for _ in range(max(args.iters // 20, 1)):
                            flush.sum()
                            t0 = time.perf_counter()
                            call(x)
                            calls_us.append((time.perf_counter() - t0) * 1e6)
                        runs.append(statistics.median(calls_us))
                        continue
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
