"""How much of a training step's dense attention is masked out, and how much of its rows is padding,
for each ``row_tokens`` (the packed layout of ``attention: sdpa`` and ``flex``, where a row holds
several samples: their clean tokens, padded to the batch's longest clean part, then their blocks).

For the first ``--steps`` steps of a recipe (the samples and block layouts the trainer would draw),
packed at each ``--row-tokens``, prints per step (means): the rows and their clean and block columns;
the scores a dense kernel computes per head and layer in the block pass (block queries over clean then
block keys) and in the clean pass (clean over clean), and the share of them the block rule lets a query see; and the
tokens the linear layers run on, with the share that are real tokens rather than padding. No model
is run: it costs the layout and the masks alone (the base model is loaded for its tokenizer).

    python bench/attention_work.py recipes/smollm2-block-adapter-gpu-stage5.yaml --samples 256 \
        --row-tokens 512 768 1024 2048

What the counts leave out: kernels work in tiles, so a kernel that skips masked scores (flex
attention) still computes every tile that holds one visible score.

``--gather-chunk N ...`` also counts, for ``attention: gather`` with N queries per chunk
(:mod:`sdlm.gathered`), the scores its sdpa calls compute in each pass (chunks × N × their bucket's
width, spare query slots and padding keys included) as a share of the dense scores, and its calls per
layer (buckets).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlm.cli import parse_overrides  # noqa: E402
from sdlm.gathered import gathered  # noqa: E402
from sdlm.masks import TokenInfo, allowed  # noqa: E402
from sdlm.train.loss import Packed  # noqa: E402
from sdlm.train.trainer import StepPrep, TrainConfig, Trainer  # noqa: E402


def batch_work(b: Packed, causal_within_block: bool, chunks: list[int]) -> dict[str, int]:
    """One packed batch's rows, columns, dense and visible scores of both passes, and linear tokens; for
    each gathered chunk size, the scores and calls of both passes."""
    B, T = b.input_ids.shape
    L = b.n_clean
    clean, blocks = b.columns(torch.arange(L)).info, b.columns(torch.arange(L, T)).info
    out = {"rows": B, "clean": L, "block": T - L,
           "block dense": B * (T - L) * T, "block seen": _seen(blocks, b.info, causal_within_block),
           "clean dense": B * L * L, "clean seen": _seen(clean, clean, False),
           "linear": B * T, "real": b.n_real}
    for c in chunks:
        for name, lay in (("block", gathered(blocks, b.info, causal_within_block, c)), ("clean", gathered(clean, clean,
                                                                                                          chunk=c))):
            out[f"{name} gather {c}"] = lay.scores()
            out[f"{name} calls {c}"] = len(lay.buckets)
    return out


def _seen(q: TokenInfo, k: TokenInfo, causal_within_block: bool, rows: int = 512) -> int:
    """The scores the rule lets through, counted ``rows`` queries at a time (a row of a whole step's samples
    has a dense mask too large to hold)."""
    n = 0
    for a in range(0, q.pos.shape[1], rows):
        part = TokenInfo(*(None if t is None else t[:, a : a + rows] for t in (q.pos, q.block, q.start, q.seq)))
        n += int(allowed(part, k, causal_within_block).sum())
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    ap.add_argument("--samples", type=int, help="samples per step (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=2, help="steps to lay out at each size")
    ap.add_argument("--row-tokens", type=int, nargs="+", default=[512, 768, 1024, 1536, 2048], metavar="N")
    ap.add_argument("--gather-chunk", type=int, nargs="*", default=[], metavar="N",
                    help="also count attention: gather's scores with N queries per chunk")
    args = ap.parse_args()
    if args.steps < 1 or (args.samples is not None and args.samples < 1) or min(args.row_tokens) < 1 \
            or min(args.gather_chunk, default=1) < 1:
        ap.error("--steps, --samples, --row-tokens and --gather-chunk must be >= 1")

    # the block layouts do not depend on the device or the attention kernel: lay them out on the CPU
    overrides = {"device": "cpu", "bf16": False, **parse_overrides(args.set)}
    cfg = TrainConfig.from_yaml(args.recipe, overrides)
    tr = Trainer(cfg)
    n = args.samples or cfg.samples_per_step
    causal = bool(tr.sdlm.config and tr.sdlm.config.causal_within_block)
    print(f"recipe {args.recipe}: {len(tr.train)} training samples, {n} per step, block size {cfg.block_size}, "
          f"block density {cfg.block_density}; means over {args.steps} steps", flush=True)
    for rt in args.row_tokens:
        tr.cfg.row_tokens = rt
        prep = StepPrep(tr.cfg, tr.train, tr.sdlm.config.mask_token_id, one_row=False, split=False)
        per_step = []
        for step in range(args.steps):
            work = [batch_work(b, causal, args.gather_chunk) for batches, _ in prep.step_work(step, n).micro
                    for b in batches]
            per_step.append({k: sum(w[k] for w in work) if k not in ("clean", "block") and " calls " not in k
                             else max(w[k] for w in work) for k in work[0]})
        m = {k: statistics.mean(s[k] for s in per_step) for k in per_step[0]}
        print(f"row_tokens {rt}: {m['rows']:.0f} rows of {m['clean']:.0f} clean + {m['block']:.0f} block columns; "
              f"block pass {m['block dense'] / 1e6:.1f}M dense scores per head and layer, "
              f"{m['block seen'] / m['block dense']:.0%} seen; "
              f"clean pass {m['clean dense'] / 1e6:.1f}M, {m['clean seen'] / m['clean dense']:.0%} seen; "
              f"linear layers on {m['linear'] / 1e3:.1f}k tokens, {m['real'] / m['linear']:.0%} real", flush=True)
        for c in args.gather_chunk:
            print(f"  gather, {c} queries per chunk: block pass {m[f'block gather {c}'] / 1e6:.1f}M scores "
                  f"({m[f'block gather {c}'] / m['block dense']:.0%} of dense), clean pass "
                  f"{m[f'clean gather {c}'] / 1e6:.1f}M ({m[f'clean gather {c}'] / m['clean dense']:.0%}); sdpa calls "
                  f"per layer: {m[f'block calls {c}']:.0f} and {m[f'clean calls {c}']:.0f}", flush=True)


if __name__ == "__main__":
    main()
