"""Where a training step's time goes: run a recipe's steps under ``torch.profiler``.

    python bench/train_profile.py recipes/smollm2-block-adapter.yaml --steps 4 --warmup 2
    python bench/train_profile.py recipes/smollm2-block-adapter-gpu-stage3.yaml --set device=cuda --out prof.txt

Nothing is saved to the recipe's ``out_dir`` (the trainer's checkpoints are not written). Prints the
trainer's own per-step figures (trained block tokens/s, sample tokens/s, host time spent laying out and
packing), then the operators that took the most time (device time on a GPU, CPU time otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlm.cli import parse_overrides  # noqa: E402
from sdlm.train.trainer import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    ap.add_argument("--steps", type=int, default=4, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first, not profiled")
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()

    cfg = TrainConfig.from_yaml(args.recipe, parse_overrides(args.set))
    tr = Trainer(cfg)
    cuda = tr.sdlm.device.type == "cuda"
    for _ in range(args.warmup):
        tr.train_step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    recs = []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            recs.append(tr.train_step())
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    lines = [
        f"recipe {args.recipe} on {tr.sdlm.device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), "
        f"bf16 autocast {tr.bf16}, {args.steps} profiled steps after {args.warmup}",
        f"median step {med('step_seconds'):.3f} s, of which laying out + packing on the host "
        f"{med('prep_seconds'):.3f} s; {med('block_tokens_per_s'):.0f} trained block tokens/s, "
        f"{med('sample_tokens_per_s'):.0f} sample tokens/s (profiler overhead included)",
        "",
        prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=args.rows),
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
