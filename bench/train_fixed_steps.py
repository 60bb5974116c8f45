"""Trained block tokens/s of a recipe on the same steps, repeated: for A/B timings of trainer changes.

Runs steps 0, 1, 2 of the recipe (the same samples and block layouts every time) ``--reps`` times after one
warm-up step and prints the block tokens/s of each repetition and their median. Unlike consecutive steps,
every repetition does the same work, so two code versions or settings compare on equal terms; run them
alternately, in separate processes, on a noisy machine.

    python bench/train_fixed_steps.py recipes/smollm2-block-adapter.yaml --reps 3
    python bench/train_fixed_steps.py recipes/smollm2-block-adapter.yaml --set bf16=false

Nothing is written to the recipe's ``out_dir``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlm.cli import parse_overrides  # noqa: E402
from sdlm.train.trainer import TrainConfig, Trainer  # noqa: E402


def rate(tr: Trainer, steps: int) -> float:
    """Trained block tokens/s of the trainer's steps 0 .. ``steps`` - 1 (the same work at every call)."""
    tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        tr.step = step
        tokens += tr.train_step()["block_tokens"]
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the same steps")
    ap.add_argument("--steps", type=int, default=3, help="distinct steps per repetition")
    ap.add_argument("--tag", default="", help="a label for the printed line")
    args = ap.parse_args()
    if args.reps < 1 or args.steps < 1:
        ap.error("--reps and --steps must be >= 1")
    tr = Trainer(TrainConfig.from_yaml(args.recipe, parse_overrides(args.set)))
    tr.step = 0
    tr.train_step()  # warm-up
    rates = [rate(tr, args.steps) for _ in range(args.reps)]
    print(f"{args.tag} {' '.join(args.set)}: bf16 {tr.bf16}, bf16 weight copies {tr.bf16_weights}, bf16 base {tr.bf16_base}, attention "
          f"{tr.attention}; trained block tokens/s per repetition " + " ".join(f"{r:.1f}" for r in rates)
          + f", median {statistics.median(rates):.1f}", flush=True)


if __name__ == "__main__":
    main()
