"""bench/decode_speed.py: every mode against `ar` in one run, with `transformers` `generate` as the outside baseline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, *extra):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "bench" / "decode_speed.py"), "--model", "random:llama", "--n", "2",
           "--max-new-tokens", "10", "--out", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return res, (json.loads(out.read_text()) if out.exists() else None)


def test_decode_speed_compares_modes_and_the_hf_baseline(tmp_path):
    res, data = _run(tmp_path, "--modes", "hf", "ar", "speculative:4", "speculative:4:2,1")
    assert res.returncode == 0, res.stderr
    r = data["results"]
    assert list(r) == ["hf", "ar", "speculative:4", "speculative:4:2,1"] and data["sampling"] == "greedy"
    # transformers generate on the bare base and every lossless mode write what `ar` writes
    assert all(v["same_output_as_ar"] == "2/2" for v in r.values())
    assert r["ar"]["speed_vs_ar"] == 1.0 and r["hf"]["tokens_per_forward"] == 1.0
    assert all(v["median_tokens_per_second"] > 0 for v in r.values())


def test_decode_speed_interleaved(tmp_path):
    """--interleave: prompt by prompt, every mode in turn; the same outputs and a per-prompt ratio to ar."""
    res, data = _run(tmp_path, "--modes", "ar", "speculative:4", "hf", "--interleave")
    assert res.returncode == 0, res.stderr
    r = data["results"]
    assert data["interleaved"] and list(r) == ["ar", "speculative:4", "hf"]
    assert all(v["same_output_as_ar"] == "2/2" for v in r.values())
    assert r["ar"]["median_prompt_ratio_vs_ar"] == 1.0 and r["speculative:4"]["median_prompt_ratio_vs_ar"] > 0
    assert r["speculative:4"]["draft_threshold"] == 0.1 and "draft_threshold" not in r["ar"]  # the CPU's default
    res, _ = _run(tmp_path, "--modes", "ar", "--interleave", "--batch-size", "2")
    assert res.returncode != 0 and "--interleave" in res.stderr


def test_decode_speed_also_unfused_and_checked(tmp_path):
    """--also-unfused: every mode again on peft's own LoRA forward; --also-checked: again with every layer call
    checking for itself; in the same run, with the ratios, and the same tokens."""
    res, data = _run(tmp_path, "--modes", "ar", "speculative:4", "--also-unfused", "--also-checked")
    assert res.returncode == 0, res.stderr
    r = data["results"]
    assert list(r) == ["ar", "ar unfused", "ar checked", "speculative:4", "speculative:4 unfused",
                       "speculative:4 checked"]
    assert all(v["same_output_as_ar"] == "2/2" for v in r.values())
    assert r["speculative:4 unfused"]["fused_speedup"] > 0 and "fused_speedup" not in r["speculative:4"]
    assert r["speculative:4 checked"]["vouched_speedup"] > 0 and r["ar checked"]["same_output_as_ar"] == "2/2"
    assert "fused x" in res.stdout and "vouched/checked x" in res.stdout


def test_decode_speed_packing_flags(tmp_path):
    """--also-unpacked packs the weights whatever the CPU's default, so both rows exist; the contradictory
    flags are refused."""
    import torch

    from sdlm.cpu import can_prepack

    if can_prepack(torch.float32):
        res, data = _run(tmp_path, "--modes", "ar", "--also-unpacked")
        assert res.returncode == 0, res.stderr
        assert data["prepacked_linears"] and list(data["results"]) == ["ar", "ar unpacked"]
        assert data["results"]["ar unpacked"]["same_output_as_ar"] == "2/2"
    for flags in (["--prepack", "--no-prepack"], ["--also-unpacked", "--no-prepack"]):
        res, _ = _run(tmp_path, "--modes", "ar", *flags)
        assert res.returncode == 2 and "--no-prepack" in res.stderr


def test_decode_speed_sampled(tmp_path):
    res, data = _run(tmp_path, "--modes", "ar", "speculative:4:2,1", "--temperature", "0.9", "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert data["sampling"]["seed"] == 5
    assert data["results"]["speculative:4:2,1"]["same_output_as_ar"] == "2/2"  # a sampled tree draws what ar draws
    res, _ = _run(tmp_path, "--modes", "hf", "--temperature", "0.9")
    assert res.returncode != 0 and "greedy one-prompt baseline" in res.stderr


@pytest.mark.parametrize("modes", [["bogus"]])
def test_decode_speed_bad_mode(tmp_path, modes):
    res, _ = _run(tmp_path, "--modes", *modes)
    assert res.returncode != 0 and "unknown mode" in res.stderr


def test_block_attention_cost_script():
    """bench/block_attention_cost.py: both attentions timed on small shapes, with outputs that agree."""
    import re

    cmd = [sys.executable, str(ROOT / "bench" / "block_attention_cost.py"), "--clean", "12", "--blocks", "3",
           "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--dtype", "float32", "--repeats", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    diff = float(re.search(r"largest output difference ([\d.e+-]+)", res.stdout).group(1))
    assert diff < 1e-5
    assert re.search(r"sdpa, dense mask +forward +[\d.]+ ms", res.stdout)
    assert re.search(r"block attention +forward +[\d.]+ ms", res.stdout)
    assert re.search(r"one product +forward +[\d.]+ ms", res.stdout)
    diffs = [float(x) for x in re.findall(r"largest output difference ([\d.e+-]+)", res.stdout)]
    assert len(diffs) == 2 and diffs[1] < 1e-5  # the clean pass's chunked causal attention agrees with sdpa's
    assert re.search(r"sdpa, causal +forward +[\d.]+ ms", res.stdout)
    assert re.search(r"chunked products +forward +[\d.]+ ms", res.stdout)


def test_gathered_attention_cost_script():
    """bench/gathered_attention_cost.py on the tiny recipe: both attentions timed for both passes, at two
    chunk sizes, and gathered attention's block pass agreeing with sdpa's dense mask over the one row."""
    import re

    cmd = [sys.executable, str(ROOT / "bench" / "gathered_attention_cost.py"), str(ROOT / "recipes" / "tiny.yaml"),
           "--samples", "6", "--dtype", "float32", "--chunks", "8", "64", "--repeats", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert re.search(r"sdpa, dense masks: block pass forward \+ backward [\d.]+ ms, clean pass forward [\d.]+ ms",
                     res.stdout), res.stdout
    lines = re.findall(r"gather, (\d+) queries per chunk: block pass forward \+ backward [\d.]+ ms \((\d+) calls\), "
                       r"clean pass forward [\d.]+ ms \((\d+) calls\); .* largest difference from sdpa ([\d.e+-]+)",
                       res.stdout)
    assert [x[0] for x in lines] == ["8", "64"], res.stdout
    assert all(1 <= int(x[1]) <= 6 and 1 <= int(x[2]) <= 6 and float(x[3]) < 1e-5 for x in lines)


def test_linear_cost_script_dtypes():
    """bench/linear_cost.py: a line per token count in the asked dtype, ratios to one token."""
    cmd = [sys.executable, str(ROOT / "bench" / "linear_cost.py"), "--tokens", "1", "4", "--repeats", "1",
           "--iters", "2", "--dtype", "bfloat16"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "bfloat16" in lines[0] and len([x for x in lines if "T =" in x]) == 2 and "x1.00" in lines[1]
    widths = subprocess.run(cmd + ["--out-features", "50", "64"], capture_output=True, text=True, cwd=ROOT)
    assert widths.returncode == 0, widths.stderr
    heads = [x for x in widths.stdout.splitlines() if x.startswith("linear ")]
    assert [h.split(",")[0] for h in heads] == ["linear 576 -> 50", "linear 576 -> 64"]
    assert len([x for x in widths.stdout.splitlines() if "T =" in x]) == 4


def test_draft_threshold_cost_script(tmp_path):
    """bench/draft_threshold_cost.py: step costs timed for every chain step size, and each threshold's
    replayed tokens per forward and priced speed against ar (a higher threshold never offers more)."""
    out = tmp_path / "cost.json"
    cmd = [sys.executable, str(ROOT / "bench" / "draft_threshold_cost.py"), "--model", "random:llama", "--base",
           "random:llama", "--n", "2", "--max-new-tokens", "6", "--block-sizes", "2", "3", "--thresholds", "0", "0.5",
           "--reps", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    for D in (2, 3):
        r = data["block_sizes"][str(D)]
        assert sorted(map(int, r["step_ms"])) == [1] + [1 + k + (k + 1) * D for k in range(D)]
        assert all(v > 0 for v in r["step_ms"].values())
        for name, row in r["thresholds"]["0.0"].items():
            cut = r["thresholds"]["0.5"][name]
            assert 1.0 <= cut["tokens_per_forward"] <= row["tokens_per_forward"] <= D
            assert row["speed_vs_ar"] > 0 and cut["speed_vs_ar"] > 0
    bad = subprocess.run(cmd[:-2] + ["--thresholds", "1.5"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "--thresholds" in bad.stderr
    # block thresholds: steps timed with every number of candidate blocks; at 1 only steps without drafts
    # carry one, so a step never carries more than one
    fewer = subprocess.run(cmd + ["--block-thresholds", "0", "1"], capture_output=True, text=True, cwd=ROOT)
    assert fewer.returncode == 0, fewer.stderr
    data = json.loads(out.read_text())
    for D in (2, 3):
        r = data["block_sizes"][str(D)]
        assert sorted(map(int, r["step_ms"])) == sorted({1 + k + b * D for k in range(D) for b in range(k + 2)})
        for name, row in r["thresholds"]["0.0"].items():
            one = r["block_thresholds"]["1.0"]["0.0"][name]
            assert abs(row["blocks_per_step"] - row["drafts_per_step"] - 1) < 0.011 and one["blocks_per_step"] <= 1
            assert 1.0 <= one["tokens_per_forward"] <= row["tokens_per_forward"]

    # draft trees: step costs for every number of nodes, and a threshold that offers fewer of them
    tree = subprocess.run(cmd + ["--tree", "2,2"], capture_output=True, text=True, cwd=ROOT)
    assert tree.returncode == 0, tree.stderr
    data = json.loads(out.read_text())
    assert data["tree"] == "2,2"
    for D in (2, 3):
        r = data["block_sizes"][str(D)]
        n = len(r["tree"])
        assert n == (2 if D == 2 else 6)  # D = 2 cuts the tree at depth 1
        assert sorted(map(int, r["step_ms"])) == [1] + [1 + k + (k + 1) * D for k in range(n + 1)]
        for name, row in r["thresholds"]["0.0"].items():
            cut = r["thresholds"]["0.5"][name]
            assert 0 < row["drafts_per_step"] <= n  # every node, but near the length limit
            assert cut["drafts_per_step"] < row["drafts_per_step"]  # a random model's blocks are never that sure
            assert 1.0 <= cut["tokens_per_forward"] <= row["tokens_per_forward"]
    # and a tree's steps with fewer of their candidate blocks
    tree = subprocess.run(cmd + ["--tree", "2,2", "--block-thresholds", "0", "1"], capture_output=True, text=True, cwd=ROOT)
    assert tree.returncode == 0, tree.stderr
    r = json.loads(out.read_text())["block_sizes"]["3"]
    assert sorted(map(int, r["step_ms"])) == sorted({1 + k + b * 3 for k in range(7) for b in range(k + 2)})
    for name, row in r["block_thresholds"]["1.0"]["0.0"].items():
        assert row["blocks_per_step"] <= 1 and row["tokens_per_forward"] >= 1.0


def test_attention_work_counts_the_scores_the_rule_lets_through():
    """bench/attention_work.py: for two samples packed in one row, the dense and the seen scores of both
    passes against the block rule worked out by hand (a block starting at p sees the p clean tokens
    before it and its own D; a clean token at i sees i + 1), and the padding share; the script runs on a
    recipe at two row sizes."""
    import re

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from attention_work import batch_work

    from sdlm.layout import training_layout
    from sdlm.train.loss import pack

    D, lens, starts = 4, [9, 14], [[2, 5], [1, 6, 10]]
    layouts = [training_layout(torch.arange(n), torch.ones(n, dtype=torch.bool), s, D, 99)
               for n, s in zip(lens, starts)]
    b = pack(layouts, row_tokens=1000)
    assert b.input_ids.shape[0] == 1  # one row: 23 clean columns, then 5 blocks of 4
    w = batch_work(b, causal_within_block=False, chunks=[4])
    L, Tb = sum(lens), D * 5
    assert (w["rows"], w["clean"], w["block"]) == (1, L, Tb)
    assert w["block dense"] == Tb * (L + Tb) and w["clean dense"] == L * L
    assert w["block seen"] == sum(D * (p + D) for s in starts for p in s)
    assert w["clean seen"] == sum(n * (n + 1) // 2 for n in lens)
    assert w["linear"] == w["real"] == L + Tb
    # gathered, 4 queries per chunk: each block a chunk over its p clean keys and its own 4 (at most 14), and
    # clean chunks of 4 tokens of one sample (3 and 4 chunks), every width rounded up to 16: one call each
    assert (w["block gather 4"], w["block calls 4"]) == (5 * 4 * 16, 1)
    assert (w["clean gather 4"], w["clean calls 4"]) == (7 * 4 * 16, 1)
    causal = batch_work(b, causal_within_block=True, chunks=[])  # a block's token sees those up to itself: 1 + ... + 4
    assert causal["block seen"] == sum(D * p + 10 for s in starts for p in s)

    cmd = [sys.executable, str(ROOT / "bench" / "attention_work.py"), str(ROOT / "recipes" / "tiny.yaml"),
           "--steps", "1", "--samples", "6", "--row-tokens", "64", "400", "--gather-chunk", "8"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = re.findall(r"row_tokens (\d+): (\d+) rows .* (\d+)% seen; clean pass .* (\d+)% seen; .* (\d+)% real",
                       res.stdout)
    assert [x[0] for x in lines] == ["64", "400"], res.stdout
    (_, rows_small, *_), (_, rows_large, *_) = lines
    assert int(rows_small) > int(rows_large) >= 1  # longer rows hold more samples each
    assert all(0 < int(v) <= 100 for x in lines for v in x[2:])
    assert len(re.findall(r"gather, 8 queries per chunk: block pass .* of dense\), clean pass .*; sdpa calls", res.stdout)) == 2
