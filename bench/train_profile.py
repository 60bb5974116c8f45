"""Where a training step's time goes: run a recipe's steps under ``torch.profiler``.

    python bench/train_profile.py recipes/smollm2-block-adapter.yaml --steps 4 --warmup 2
    python bench/train_profile.py recipes/smollm2-block-adapter-gpu-stage3.yaml --set device=cuda --out prof.txt

Nothing is saved to the recipe's ``out_dir`` (the trainer's checkpoints are not written). Prints the
trainer's own per-step figures (trained block tokens/s, sample tokens/s, host time spent laying out and
packing), then the operators that took the most time (device time on a GPU, CPU time otherwise).

``--flops`` also runs one more step under ``torch.utils.flop_counter`` and times one large matrix
product on the same device: the step's matrix-product work at that rate is a floor on its time, so
it gives the most trained block tokens/s the step could reach with everything else free.

``--no-profiler`` times the same steps without the profiler (whose own overhead slows a GPU step that
waits on the host), for speed figures to compare.

``--phases`` (with ``--no-profiler``) also times the parts of each step by the clock, without the
profiler: the forwards without gradients (the clean pass), the forwards with gradients, the LM head with
the loss (``linear_ce``), the backward pass, and the rest (optimizer, layout). With ``attention: blocks``
it also times the attention inside them: the clean pass's (:func:`sdlm.attention.causal_segments_attention`
or :func:`sdlm.attention.causal_segments_sdpa`)
and the block pass's, forward and backward (:class:`sdlm.attention._BlockAttention`). The profiler's own
per-operator times can be far off for the small operators of a CPU step (it put a block-attention
softmax at 7.5 ms that takes 0.7 ms), so these are the figures to weigh the parts by.

    python bench/train_profile.py recipes/smollm2-block-adapter.yaml --no-profiler --phases --steps 3

``--shapes`` (with the profiler) also lists the operators grouped by their inputs' shapes: which matrix
product or kernel call, of which sizes, takes the time (a slow product of small output and long inner
dimension, say, shows up there and not in the plain table).

``--sweep-samples 64 128 256`` (with ``--no-profiler``) times the steps at each of these samples per
step in turn, in one process: a line each.

    python bench/train_profile.py recipes/smollm2-block-adapter-gpu-stage5.yaml --no-profiler --set compile=true --sweep-samples 64 128 256
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlm.cli import parse_overrides  # noqa: E402
from sdlm.cpu import describe as describe_cpu  # noqa: E402
from sdlm.train.trainer import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    ap.add_argument("--steps", type=int, default=4, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first, not profiled")
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    ap.add_argument("--out", help="also write the report here")
    ap.add_argument("--no-profiler", action="store_true", help="time the steps only (no profiler overhead, no operator table)")
    ap.add_argument("--flops", action="store_true", help="also count the step's matrix-product FLOPs and the floor they set")
    ap.add_argument("--phases", action="store_true",
                    help="with --no-profiler: also time the clean pass, the forward with gradients, the LM head + loss "
                         "and the backward pass of each step by the clock")
    ap.add_argument("--shapes", action="store_true",
                    help="with the profiler: also list the operators grouped by their inputs' shapes")
    ap.add_argument("--sweep-samples", type=int, nargs="+", metavar="N",
                    help="with --no-profiler: time the steps at each of these samples per step, a line each")
    args = ap.parse_args()
    if args.sweep_samples and not args.no_profiler:
        ap.error("--sweep-samples needs --no-profiler")
    if args.phases and not args.no_profiler:
        ap.error("--phases needs --no-profiler (the profiler's overhead would be in every phase)")
    if args.shapes and args.no_profiler:
        ap.error("--shapes needs the profiler (leave out --no-profiler)")
    if args.sweep_samples and min(args.sweep_samples) < 1:
        ap.error("--sweep-samples: samples per step must be >= 1")

    cfg = TrainConfig.from_yaml(args.recipe, parse_overrides(args.set))
    tr = Trainer(cfg)
    cuda = tr.sdlm.device.type == "cuda"
    for i, n in enumerate(args.sweep_samples or [tr.cfg.samples_per_step]):  # a sweep warms up at each size
        tr.cfg.samples_per_step = n
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            tr.train_step()
        if i == 0 and args.warmup and tr.cfg.compile:
            print(f"{args.warmup} warm-up steps (compiling included) took {time.perf_counter() - t0:.1f} s", flush=True)
        if args.sweep_samples:
            recs = [tr.train_step() for _ in range(args.steps)]
            print(header(args, tr, cuda) + "\n" + speed_line(recs, profiled=False), flush=True)
    if args.sweep_samples:
        return
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    recs, phases = [], []
    profiler = None if args.no_profiler else torch.profiler.profile(activities=acts, record_shapes=args.shapes)
    with profiler or contextlib.nullcontext() as prof:
        for _ in range(args.steps):
            with timed_phases(tr.sdlm.device) if args.phases else contextlib.nullcontext({}) as spent:
                recs.append(tr.train_step())
            phases.append(spent)
    lines = [header(args, tr, cuda), speed_line(recs, profiled=not args.no_profiler)]
    if args.phases:
        lines += [phase_line(recs, phases)]
    if not args.no_profiler:
        total = "cuda_time_total" if cuda else "cpu_time_total"
        lines += ["", prof.key_averages().table(sort_by=total, row_limit=args.rows)]
        if args.shapes:
            lines += ["", "by input shapes, most self time first:",
                      prof.key_averages(group_by_input_shape=True).table(sort_by=f"self_{total}", row_limit=args.rows,
                                                                         max_name_column_width=40,
                                                                         max_shapes_column_width=90)]
    if args.flops:
        lines += ["", flop_floor(tr)]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


def clean_kernel(tr: Trainer) -> str:
    """The clean pass's attention kernel of ``attention: blocks`` (``auto`` resolved for the step's dtype)."""
    from sdlm.attention import clean_pass_kernel

    kernel = clean_pass_kernel(tr.sdlm.device, torch.bfloat16 if tr.bf16 else torch.float32, tr.cfg.clean_attention)
    return f"auto: {kernel}" if tr.cfg.clean_attention == "auto" else kernel


def header(args, tr: Trainer, cuda: bool) -> str:
    return (
        f"recipe {args.recipe} on {tr.sdlm.device} ({torch.cuda.get_device_name() if cuda else describe_cpu()}, {torch.get_num_threads()} threads), "
        f"bf16 autocast {tr.bf16}, bf16 weight copies {tr.bf16_weights}, bf16 base {tr.bf16_base}, "
        f"compiled {tr.cfg.compile}, prep workers {tr.prep_workers}, "
        f"attention {tr.attention} (sdpa kernel {tr.cfg.sdpa_backend}"
        f"{', clean pass ' + clean_kernel(tr) if tr.attention == 'blocks' else ''}), fused LoRA {tr.fused_lora}, "
        f"{tr.cfg.samples_per_step} samples per step, {args.steps} {'timed' if args.no_profiler else 'profiled'} "
        f"steps after {args.warmup}"
    )


def speed_line(recs: list[dict], profiled: bool) -> str:
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    return (
        f"median step {med('step_seconds'):.3f} s, of which laying out + packing on the host (or waiting for "
        f"a prep worker) {med('prep_seconds'):.3f} s; {med('block_tokens_per_s'):.0f} trained block tokens/s, "
        f"{med('sample_tokens_per_s'):.0f} sample tokens/s" + (" (profiler overhead included)" if profiled else "")
    )


PHASES = {"clean": "forward without gradients (clean pass)", "forward": "forward with gradients",
          "head": "LM head + loss", "backward": "backward"}
ATTENTION = {"attention clean": "clean pass", "attention forward": "block pass forward",
             "attention backward": "block pass backward"}
"""The attention's share of the phases above (``attention: blocks``), timed inside them."""


@contextlib.contextmanager
def timed_phases(device: torch.device):
    """Inside, the clock time of :meth:`SDLM.forward` calls (without and with gradients), of
    :func:`sdlm.train.loss.linear_ce` and of ``Tensor.backward`` is summed into the yielded dict (keys of
    :data:`PHASES`). On a GPU each timed call is synchronized, so the figures are device time too."""
    import sdlm.train.loss as loss_mod
    from sdlm.model import SDLM

    import sdlm.attention as attention_mod

    spent = dict.fromkeys([*PHASES, *ATTENTION], 0.0)

    def timing(fn, key):
        def run(*a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            try:  # a KV-only clean pass ends in an exception (sdlm.attention.KVFilled): its time counts too
                return fn(*a, **k)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                name = key if key != "clean" or not torch.is_grad_enabled() else "forward"
                spent[name] += time.perf_counter() - t
        return run

    block = attention_mod._BlockAttention
    saved = (SDLM.forward, loss_mod.linear_ce, torch.Tensor.backward, attention_mod.causal_segments_attention,
             block.forward, block.backward, attention_mod.causal_segments_sdpa)
    SDLM.forward = timing(saved[0], "clean")
    loss_mod.linear_ce = timing(saved[1], "head")
    torch.Tensor.backward = timing(saved[2], "backward")
    attention_mod.causal_segments_attention = timing(saved[3], "attention clean")
    attention_mod.causal_segments_sdpa = timing(saved[6], "attention clean")
    block.forward, block.backward = staticmethod(timing(saved[4], "attention forward")), \
        staticmethod(timing(saved[5], "attention backward"))
    try:
        yield spent
    finally:
        SDLM.forward, loss_mod.linear_ce, torch.Tensor.backward, attention_mod.causal_segments_attention = saved[:4]
        block.forward, block.backward = staticmethod(saved[4]), staticmethod(saved[5])
        attention_mod.causal_segments_sdpa = saved[6]


def phase_line(recs: list[dict], phases: list[dict]) -> str:
    """Median seconds per step of each phase, and of the rest of the step."""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    parts = [f"{PHASES[k]} {med([p[k] for p in phases]):.3f} s" for k in PHASES]
    rest = med([r["step_seconds"] - sum(p[k] for k in PHASES) for r, p in zip(recs, phases)])
    line = "phases, median per step: " + ", ".join(parts) + f", rest (optimizer, layout) {rest:.3f} s"
    if any(p[k] for p in phases for k in ATTENTION):
        line += "; of these, attention: " + ", ".join(f"{ATTENTION[k]} {med([p[k] for p in phases]):.3f} s"
                                                       for k in ATTENTION)
    return line


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, k: int = 576, m: int = 1536) -> float:
    """FLOP/s of one (n x k) @ (k x m) product on ``device``, best of a few."""
    a, b = torch.randn(n, k, device=device, dtype=dtype), torch.randn(k, m, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n * k * m / best


def _packed_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._linear_pointwise``: ``x`` (..., in) times a packed weight of logical shape (out, in)."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def packed_flop_mapping() -> dict:
    """What :class:`torch.utils.flop_counter.FlopCounterMode` does not count by itself: the products on
    oneDNN-packed weights (``packed_base``; :mod:`sdlm.cpu`), which carry most of a CPU step's matrix work."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    return {} if op is None else {op: _packed_linear_flops}  # FlopCounterMode looks ops up by packet


def flop_floor(tr: Trainer) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=packed_flop_mapping())
    with counter:
        rec = tr.train_step()
    counts = counter.get_flop_counts().get("Global", {})
    # mm, addmm, bmm, linear_pointwise: linear layers (packed or not), LM head, LoRA, block attention
    mm = sum(v for k, v in counts.items() if "mm" in str(k) or "linear_pointwise" in str(k))
    bmm = sum(v for k, v in counts.items() if "bmm" in str(k))  # batched: the block attention's products
    dtype = torch.bfloat16 if tr.bf16 else torch.float32
    rate = matmul_rate(tr.sdlm.device, dtype)
    per_token = mm / max(rec["block_tokens"], 1)
    return (
        f"matrix products: {mm / 1e9:.0f} GFLOP in a step of {rec['block_tokens']} trained block tokens "
        f"({per_token / 1e6:.3g} MFLOP per token, of which {bmm / max(rec['block_tokens'], 1) / 1e6:.3g} in batched "
        f"products such as block attention's; sdpa attention not counted). This device multiplies at "
        f"{rate / 1e9:.0f} GFLOP/s ({dtype}, 2048x576 @ 576x1536, best of 8), so matrix products alone "
        f"bound the step at {rate / per_token:.0f} trained block tokens/s (with everything else free)."
    )


if __name__ == "__main__":
    main()
