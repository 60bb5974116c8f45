"""One layer's attention of a training step, forward and backward, as the step runs it: sdpa with the
dense block-rule masks over packed rows (``attention: sdpa``, the GPU default) against gathered
attention over one row (``attention: gather``, :mod:`sdlm.gathered`), on a recipe's own samples.

For the recipe's first step (``--samples`` samples, the block layouts the trainer would draw), times
at one layer's shapes (the model's heads; random queries, keys and values in ``--dtype``):

- the block pass: block queries over the clean keys and the blocks, forward and backward (gradients for
  the queries, keys and values, as in the step); sdpa gets its keys and values repeated to every query
  head and the dense mask, as ``transformers`` gives them;
- the clean pass: clean queries over the clean keys, forward only (the step runs it without gradients);
- the gathered layouts' construction (per pass, once per step: every layer shares it).

Prints medians in ms and the outputs' largest difference on the real queries. The step's kernels run
in the same sdpa order of preference as the trainer (``sdpa_backend: auto``). No model is run (the base
model is loaded for its tokenizer and settings).

    python bench/gathered_attention_cost.py recipes/smollm2-block-adapter-gpu-stage5.yaml --device cuda \
        --samples 256 --chunks 32 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlm.cli import parse_overrides  # noqa: E402
from sdlm.gathered import gathered, gathered_attention  # noqa: E402
from sdlm.masks import TokenInfo, additive, allowed  # noqa: E402
from sdlm.train.loss import Packed  # noqa: E402
from sdlm.train.trainer import StepPrep, TrainConfig, Trainer, sdpa_context  # noqa: E402


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median ms of ``fn()`` over ``repeats`` calls after one warm-up, synchronised; and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def _passes(b: Packed, device: torch.device) -> tuple[TokenInfo, TokenInfo, TokenInfo]:
    """The clean part's, the block part's and all columns' token descriptors of a packed batch, on ``device``."""
    L, T = b.n_clean, b.input_ids.shape[1]
    clean, blocks = b.columns(torch.arange(L)).info, b.columns(torch.arange(L, T)).info
    return clean.to(device), blocks.to(device), TokenInfo.cat([clean, blocks]).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    ap.add_argument("--samples", type=int, help="samples in the step (default: the recipe's samples_per_step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--chunks", type=int, nargs="+", default=[64], metavar="N", help="gather_chunk values to time")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if min(args.chunks) < 1 or args.repeats < 1 or (args.samples is not None and args.samples < 1):
        ap.error("--chunks, --repeats and --samples must be >= 1")

    overrides = {"device": "cpu", "bf16": False, **parse_overrides(args.set)}  # layouts only: the model stays here
    tr = Trainer(TrainConfig.from_yaml(args.recipe, overrides))
    cfg, dev, dtype = tr.cfg, torch.device(args.device), getattr(torch, args.dtype)
    n = args.samples or cfg.samples_per_step
    mc = tr.sdlm.model.config
    H, Hkv = mc.num_attention_heads, getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    d = getattr(mc, "head_dim", None) or mc.hidden_size // H
    causal = bool(tr.sdlm.config.causal_within_block)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"recipe {args.recipe}: step 0 of {n} samples; {H} query heads, {Hkv} key/value heads of {d}; {args.dtype}; "
          f"{where}, torch {torch.__version__}", flush=True)
    prep = {name: StepPrep(cfg, tr.train, tr.sdlm.config.mask_token_id, one_row=one, split=False)
            for name, one in (("rows", False), ("one row", True))}
    batch = {name: p.step_work(0, n).micro[0][0][0] for name, p in prep.items()}  # one micro-batch (grad_accum 1)
    g = torch.Generator().manual_seed(0)
    scale = d ** -0.5

    def tensors(B, Tq, Tk, grad):
        q, k, v = (torch.randn(B, h, t, d, generator=g).to(dev, dtype) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
        return [x.requires_grad_(grad) for x in (q, k, v)]

    def fwd_bwd(fn, xs, w):
        for x in xs:
            x.grad = None
        o = fn(*xs)
        (o.float() * w).sum().backward()
        return o

    with sdpa_context("auto", dev.type):
        clean, blocks, both = _passes(batch["rows"], dev)
        B, Tq, Tk, L = blocks.pos.shape[0], blocks.pos.shape[1], both.pos.shape[1], clean.pos.shape[1]
        print(f"packed rows of {cfg.row_tokens}: {B} rows of {L} clean + {Tq} block columns", flush=True)
        dense_b = additive(allowed(blocks, both, causal), dtype)  # (B, 1, Tq, Tk)
        dense_c = additive(allowed(clean, clean), dtype)

        def sdpa(mask):
            def run(q, k, v):
                k, v = (x.repeat_interleave(H // Hkv, 1) for x in (k, v))  # as transformers repeats them
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
            return run

        xs = tensors(B, Tq, Tk, True)
        w = torch.randn(B, Tq, H, d, generator=g).to(dev)
        ms, _ = _timed(lambda: fwd_bwd(sdpa(dense_b), xs, w), dev, args.repeats)
        with torch.no_grad():
            cs = tensors(B, L, L, False)
            mc_, _ = _timed(lambda: sdpa(dense_c)(*cs), dev, args.repeats)
        print(f"  sdpa, dense masks: block pass forward + backward {ms:.2f} ms, clean pass forward {mc_:.2f} ms",
              flush=True)
        del dense_b, dense_c, xs, cs

        clean, blocks, both = _passes(batch["one row"], dev)
        Tq, Tk, L = blocks.pos.shape[1], both.pos.shape[1], clean.pos.shape[1]
        print(f"one row: {L} clean + {Tq} block columns", flush=True)
        xs = tensors(1, Tq, Tk, True)
        w = torch.randn(1, Tq, H, d, generator=g).to(dev) * (blocks.seq != -1)[0, :, None, None]
        with torch.no_grad():
            cs = tensors(1, L, L, False)
        ref_b = fwd_bwd(lambda q, k, v: sdpa(additive(allowed(blocks, both, causal), dtype))(q, k, v), xs, w) \
            if Tq * Tk <= 2 ** 26 else None  # the dense reference only where its mask fits
        for c in args.chunks:
            mb_lay, lay_b = _timed(lambda: gathered(blocks, both, causal, c), dev, args.repeats)
            mc_lay, lay_c = _timed(lambda: gathered(clean, clean, chunk=c), dev, args.repeats)
            ms, o = _timed(lambda: fwd_bwd(lambda q, k, v: gathered_attention(q, k, v, lay_b, scale), xs, w), dev,
                           args.repeats)
            with torch.no_grad():
                mc_, _ = _timed(lambda: gathered_attention(*cs, lay_c, scale), dev, args.repeats)
            diff = "" if ref_b is None else \
                f"; largest difference from sdpa {float(((o - ref_b).detach().float() * (w != 0)).abs().max()):.1e}"
            print(f"  gather, {c} queries per chunk: block pass forward + backward {ms:.2f} ms ({len(lay_b.buckets)} "
                  f"calls), clean pass forward {mc_:.2f} ms ({len(lay_c.buckets)} calls); layouts {mb_lay:.1f} and "
                  f"{mc_lay:.1f} ms per step{diff}", flush=True)


if __name__ == "__main__":
    main()
