"""Training with 2 processes (gloo, launched by torchrun as users do) matches one process.

Two processes with ``grad_accum: 1`` run the same micro-batches as one process
with ``grad_accum: 2`` (process r takes micro-batches r, r+2, ...), so the
trained weights must agree up to float summation order.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def train(out: Path, processes: int, grad_accum: int, retrofit: str, *extra: str, steps: int = 6) -> str:
    """Train the tiny recipe; returns what the run printed."""
    launcher = [sys.executable, "-m", "sdlm"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "sdlm"]
    args = ["train", str(RECIPE), "--no-progress", "--set", f"out_dir={out}", "--set", f"retrofit={retrofit}",
            "--set", f"steps={steps}", "--set", "samples_per_step=8", "--set", f"grad_accum={grad_accum}",
            "--set", "save_every=3", "--set", "heldout=8", "--set", "eval_every=3", "--set", "threads=1"]
    for kv in extra:
        args += ["--set", kv]
    r = subprocess.run(launcher + args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def weights(final: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(final.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("retrofit", ["block-adapter", "full"])
def test_two_gloo_processes_match_one(tmp_path, retrofit):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, 1, 2, retrofit)
    train(two, 2, 1, retrofit)
    same_run(one, two)


def same_run(one: Path, two: Path) -> None:
    """One process and two trained the same weights, with the same per-step losses."""
    a, b = weights(one / "final"), weights(two / "final")
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst  # stated tolerance: float summation order only
    rows_a = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    rows_b = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(rows_a) == len(rows_b) == 6
    assert [r["block_tokens"] for r in rows_a] == [r["block_tokens"] for r in rows_b]
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(rows_a, rows_b))
    assert all(abs(x["grad_norm"] / y["grad_norm"] - 1) < 1e-4 for x, y in zip(rows_a, rows_b))
    assert rows_b[-1]["processes"] == 2 and rows_a[-1]["processes"] == 1
    assert (two / "checkpoint" / "trainer_state.json").is_file()


def test_fsdp_shards_matches_one_process_and_resumes(tmp_path):
    """``fsdp: true`` (retrofit: full) with 2 processes: each holds half of the weights, the steps are one
    process's, and a run stopped at its checkpoint resumes to the same end. The schedule is constant, so
    a run of 3 steps is the first half of a run of 6."""
    from sdlm.errors import SDLMError
    from sdlm.train.trainer import Trainer, TrainConfig

    one, two = tmp_path / "one", tmp_path / "two"
    train(one, 1, 2, "full", "schedule=constant", "tpf_every=3")
    printed = train(two, 2, 1, "full", "schedule=constant", "tpf_every=3", "fsdp=true", steps=3)
    assert "sharded over 2 processes" in printed and "holds 50.0% of its weights" in printed
    assert json.loads((two / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    train(two, 2, 1, "full", "schedule=constant", "tpf_every=3", "fsdp=true")  # resumes at step 3
    same_run(one, two)
    # held-out tokens per forward, run by both processes of the sharded model between steps
    tpf = [[json.loads(l)["tpf"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"tpf"' in l] for d in (one, two)]
    assert len(tpf[0]) == 2 and tpf[0] == tpf[1]
    # a sharded run's checkpoint resumed by one process: a clear error, nothing overwritten
    cfg = TrainConfig.from_yaml(RECIPE, {"out_dir": str(two), "retrofit": "full", "steps": 9, "fsdp": True})
    with pytest.raises(SDLMError, match="resume it the same way"):
        Trainer(cfg).run(progress=False)
    assert json.loads((two / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
