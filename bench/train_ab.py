"""Two settings of a recipe timed in one process, their repetitions interleaved: A/B timings on a noisy machine.

Builds one trainer per setting (the recipe with ``--a`` overrides, and with ``--b`` overrides), then runs
the same steps 0..``--steps``-1 on A, then on B, and so on ``--reps`` times, after one warm-up step each.
Interleaving spreads the machine's slow spells over both settings, which separate processes run minutes
apart do not. Prints each repetition's trained block tokens/s, the medians, and the median of the
per-repetition ratios B/A.

    python bench/train_ab.py recipes/smollm2-block-adapter.yaml --a bf16_base=false --b bf16_base=true

Both trainers share the process (and its global settings, such as the attention functions a trainer
registers), so settings that change those globally cannot be compared this way. Nothing is written to
the recipe's ``out_dir``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from sdlm.cli import parse_overrides  # noqa: E402
from sdlm.cpu import describe as describe_cpu  # noqa: E402
from sdlm.train.trainer import TrainConfig, Trainer  # noqa: E402
from train_fixed_steps import rate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="an override of setting A")
    ap.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="an override of setting B")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the same steps, per setting")
    ap.add_argument("--steps", type=int, default=3, help="distinct steps per repetition")
    args = ap.parse_args()
    if args.reps < 1 or args.steps < 1:
        ap.error("--reps and --steps must be >= 1")
    trainers = {}
    for name, sets in (("A", args.a), ("B", args.b)):
        tr = trainers[name] = Trainer(TrainConfig.from_yaml(args.recipe, parse_overrides(sets)))
        tr.step = 0
        tr.train_step()  # warm-up
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(args.reps):
        for name, tr in trainers.items():
            rates[name].append(rate(tr, args.steps))
    for name, sets in (("A", args.a), ("B", args.b)):
        r = rates[name]
        print(f"{name} {' '.join(sets) or '(recipe)'}: trained block tokens/s " + " ".join(f"{x:.1f}" for x in r)
              + f", median {statistics.median(r):.1f}")
    dev = trainers["A"].sdlm.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{describe_cpu()}, {torch.get_num_threads()} threads"
    print(f"machine: {where}, torch {torch.__version__}")
    ratios = [b / a for a, b in zip(rates["A"], rates["B"])]
    print("B/A per repetition " + " ".join(f"{x:.3f}" for x in ratios) + f", median {statistics.median(ratios):.3f}",
          flush=True)


if __name__ == "__main__":
    main()
