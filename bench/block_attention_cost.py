"""Cost of the training block pass's attention, forward and backward: sdpa with the dense block-rule
mask against :func:`sdlm.attention.block_attention`, at one layer's shapes.

The defaults are SmolLM2-135M's heads (9 query heads, 3 key/value heads of 64) and a sample of 370
clean tokens with 68 blocks of 4 (272 block tokens). Prints the median forward and backward times
of each, and the largest difference between their outputs; block attention is timed as the step runs
it (``BLOCK_CHUNK`` blocks per score product, each over the clean keys its blocks see) and with all
the blocks in one product over all the clean keys. Then the clean pass of the same sample
(causal attention over its clean tokens, no gradients): sdpa's causal kernel against
:func:`sdlm.attention.causal_segments_attention`, the chunked products the CPU step runs.

    python bench/block_attention_cost.py --threads 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clean", type=int, default=370, help="clean tokens (keys before the blocks)")
    ap.add_argument("--blocks", type=int, default=68)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from sdlm.attention import BLOCK_CHUNK, CausalSegments, block_attention, block_layout, causal_segments_attention
    from sdlm.masks import TokenInfo, additive, allowed

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, D, K, L = getattr(torch, args.dtype), args.block_size, args.blocks, args.clean
    T, H, Hkv, d = K * D, args.heads, args.kv_heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    starts = torch.sort(torch.randperm(L, generator=g)[:K]).values
    q_info = TokenInfo((starts[:, None] + torch.arange(D)).reshape(1, T), torch.arange(K).repeat_interleave(D)[None],
                       starts.repeat_interleave(D)[None])
    clean = TokenInfo.clean(torch.arange(L)[None])
    layout = block_layout(q_info, clean, D, False, dtype)
    whole = block_layout(q_info, clean, D, False, dtype)
    whole.chunk = K  # every block in one score product, over all the clean keys any block sees
    dense = additive(allowed(q_info, TokenInfo.cat([clean, q_info])), dtype)
    scale = d ** -0.5
    calls = {
        "sdpa, dense mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale,
                                                                           enable_gqa=True),
        "block attention": lambda q, k, v: block_attention(q, k, v, layout, scale),
        "one product": lambda q, k, v: block_attention(q, k, v, whole, scale),
    }

    def inputs():
        return [torch.randn(1, h, n, d, dtype=dtype, generator=g).requires_grad_(True)
                for h, n in ((H, T), (Hkv, L + T), (Hkv, L + T))]

    q, k, v = inputs()
    outs = [fn(q, k, v).float() for fn in calls.values()]
    print(f"{T} block queries over {L} clean keys + their own blocks of {D}, {H}/{Hkv} heads of {d}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {BLOCK_CHUNK} blocks per product; largest output difference "
          f"{max((outs[0] - o).abs().max() for o in outs[1:]):.2e}")
    times = {name: ([], []) for name in calls}
    for _ in range(args.repeats):  # interleaved, so that the machine's slow spells hit every version alike
        for name, fn in calls.items():
            q, k, v = inputs()
            t0 = time.perf_counter()
            out = fn(q, k, v)
            t1 = time.perf_counter()
            out.backward(torch.ones_like(out))
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter() - t1)
    for name, (fwd, bwd) in times.items():
        f, b = statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3
        print(f"{name:17s} forward {f:6.2f} ms  backward {b:6.2f} ms  total {f + b:6.2f} ms")

    # the clean pass: causal attention over the L clean tokens, without gradients
    segments = CausalSegments([(0, L)])
    causal = {
        "sdpa, causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                       enable_gqa=True).transpose(1, 2),
        "chunked products": lambda q, k, v: causal_segments_attention(q, k, v, segments, scale),
    }
    q = torch.randn(1, L, H, d, dtype=dtype, generator=g).transpose(1, 2)  # the model's query layout
    k, v = (torch.randn(1, Hkv, L, d, dtype=dtype, generator=g) for _ in range(2))
    with torch.no_grad():
        outs = [fn(q, k, v).float() for fn in causal.values()]
        print(f"clean pass: causal attention over {L} clean tokens, no gradients; largest output difference "
              f"{(outs[0] - outs[1]).abs().max():.2e}")
        for name, fn in causal.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(q, k, v)
                times.append(time.perf_counter() - t0)
            print(f"{name:17s} forward {statistics.median(times) * 1e3:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
