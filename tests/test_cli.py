"""The command line: JSON output, and every bad input -> one clear line and exit code 2."""

import json
import subprocess
import sys

import pytest

from sdlm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_keys(capsys):
    code, out, _ = run(capsys, "generate", "hello", "world", "--model", "random:llama", "--max-new-tokens", "5", "--json")
    assert code == 0
    rows = [json.loads(l) for l in out.splitlines()]
    assert len(rows) == 2
    for r in rows:
        for key in ("text", "new_tokens", "forwards", "tokens_per_forward", "seconds", "tokens_per_second"):
            assert key in r
        assert r["new_tokens"] == 5 and r["forwards"] >= 1


@pytest.mark.parametrize("mode", ["ar", "speculative"])
def test_generate_modes_agree(capsys, mode):
    _, out, _ = run(capsys, "generate", "abc", "--model", "random:qwen2", "--mode", mode, "--max-new-tokens", "12", "--json")
    ref = main(["generate", "abc", "--model", "random:qwen2", "--mode", "ar", "--max-new-tokens", "12", "--json"])
    ref_out = capsys.readouterr().out
    assert ref == 0
    assert json.loads(out)["tokens"] == json.loads(ref_out)["tokens"]


def test_generate_block_threshold_keeps_the_output(capsys):
    args = ["generate", "abc", "--model", "random:qwen2", "--max-new-tokens", "12", "--json"]
    _, ref, _ = run(capsys, *args, "--mode", "ar")
    for bt in ("0", "0.5", "1"):
        code, out, _ = run(capsys, *args, "--mode", "speculative", "--block-threshold", bt)
        assert code == 0 and json.loads(out)["tokens"] == json.loads(ref)["tokens"]


def test_generate_batched_equals_one_at_a_time(capsys, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text('a longer prompt here\n\n{"prompt": "zz"}\n')
    args = ["--model", "random:llama", "--mode", "speculative", "--max-new-tokens", "9", "--json", "--no-chat"]
    code, out, err = run(capsys, "generate", "abc", "--prompts-file", str(f), "--batch-size", "3", *args)
    assert code == 0 and "3 prompts" in err
    batched = [json.loads(l) for l in out.splitlines()]
    assert [r["prompt"] for r in batched] == ["abc", "a longer prompt here", "zz"]
    _, out, _ = run(capsys, "generate", "abc", "a longer prompt here", "zz", *args)
    assert [r["tokens"] for r in batched] == [json.loads(l)["tokens"] for l in out.splitlines()]


def test_retrofit_then_confidence(capsys, tmp_path):
    code, out, _ = run(capsys, "retrofit", "--model", "random:llama", "--block-size", "3", "--out", str(tmp_path / "m"))
    assert code == 0 and json.loads(out)["block_size"] == 3
    code, out, _ = run(capsys, "generate", "hi", "--model", str(tmp_path / "m"), "--mode", "confidence", "--json", "--max-new-tokens", "6")
    assert code == 0 and json.loads(out)["block_size"] == 3
    # --verify at threshold 1: every token verified, the model's own output (as speculative)
    args = ["generate", "hi", "--model", str(tmp_path / "m"), "--json", "--max-new-tokens", "6"]
    code, out, _ = run(capsys, *args, "--mode", "confidence", "--verify", "--threshold", "1")
    _, ref, _ = run(capsys, *args, "--mode", "ar")
    assert code == 0 and json.loads(out)["tokens"] == json.loads(ref)["tokens"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "hi", "--model", "no-such-model"], "unknown model"),
        (["generate", "hi", "--model", "random:llama", "--mode", "confidence"], "needs a retrofitted model"),
        (["generate", "hi", "--model", "random:llama", "--block-size", "0"], "block size must be >= 1"),
        (["generate", "hi", "--model", "random:llama", "--threshold", "1.5"], "threshold must be in [0, 1]"),
        (["generate", "hi", "--model", "random:llama", "--threshold", "-0.1"], "threshold must be in [0, 1]"),
        (["generate", "", "--model", "random:llama"], "empty"),
        (["generate", "   ", "--model", "random:llama"], "empty"),
        (["generate", "x" * 600, "--model", "random:llama", "--no-chat"], "more than the model's context"),
        (["generate", "hi", "--model", "random:nosucharch"], "random:"),
        (["generate", "--model", "random:llama"], "no prompt given"),
        (["generate", "hi", "--model", "random:llama", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["generate", "--prompts-file", "/no/such/file", "--model", "random:llama"], "not found"),
        (["generate", "hi", "--model", "random:llama", "--mode", "ar", "--tree", "2,2"], "mode speculative"),
        (["generate", "hi", "--model", "random:llama", "--verify"], "verify is for mode confidence"),
        (["generate", "hi", "--model", "random:llama", "--draft-threshold", "1.5"], "draft threshold must be in"),
        (["generate", "hi", "--model", "random:llama", "--mode", "ar", "--draft-threshold", "0.1"],
         "modes with drafts"),
        (["generate", "hi", "--model", "random:llama", "--block-threshold", "1.5"], "block threshold must be in"),
        (["generate", "hi", "--model", "random:llama", "--mode", "ar", "--block-threshold", "0.5"], "modes with drafts"),
        (["generate", "hi", "--model", "random:llama", "--tree", "2,2", "--mode", "ar"], "mode speculative"),
        (["generate", "hi", "--model", "random:llama", "--tree", "auto"], "no calibrated draft tree"),
        (["generate", "hi", "--model", "random:llama", "--tree", "wide"], "neither"),
        (["calibrate-tree", "/no/such.jsonl", "--model", "random:llama", "--save"], "writes into a model folder"),
        (["calibrate-tree", "/no/such.jsonl", "--model", "random:llama", "--block-size", "1"], "--block-size >= 2"),
    ],
)
def test_bad_input(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    lines = [l for l in err.splitlines() if l.startswith("sdlm: error:")]
    assert len(lines) == 1 and "Traceback" not in err


def test_unreadable_checkpoint(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(capsys, "generate", "hi", "--model", str(tmp_path))
    assert code == 2 and "cannot read" in err and "Traceback" not in err


def test_a_model_sdlm_cannot_run_exactly_is_refused_in_one_line(capsys, tmp_path):
    from sdlm.zoo import random_model

    model, tok = random_model("lfm2", attn="eager", layer_types=["conv", "full_attention"])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    code, _, err = run(capsys, "generate", "hi", "--model", str(tmp_path), "--no-chat")
    assert code == 2 and "recurrent state (conv layers)" in err and "Traceback" not in err
    assert "retrofit" not in err  # refused before any advice on retrofitting it


def test_console_script_exit_code():
    p = subprocess.run([sys.executable, "-m", "sdlm.cli", "generate", "hi", "--threshold", "7"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("sdlm: error: threshold") and "Traceback" not in p.stderr


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--mode", "fast"])
    assert e.value.code == 2


def test_calibrate_tree_then_generate_with_it(capsys, tmp_path, trained):
    from conftest import hf_greedy

    folder = tmp_path / "m"
    trained.save(folder)
    tok = trained.tokenizer
    texts = ["qwe qwe qwe", "abcd abcd ab", "zz zz zz zz", "abab abab abab abab"]
    data = tmp_path / "distilled.jsonl"
    with open(data, "w") as f:
        for t in texts:
            ids = tok(t)["input_ids"]
            f.write(json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "?"}],
                                "answer_ids": hf_greedy(trained, ids, 30)}) + "\n")
    code, out, err = run(capsys, "calibrate-tree", str(data), "--model", str(folder), "--block-size", "4", "8",
                         "--nodes", "5", "7", "--save", "--out", str(tmp_path / "trees.json"), "--no-progress")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["samples"] == 4 and set(rep["trees"]) == {"4", "8"}
    t4 = rep["trees"]["4"]
    assert t4["nodes"] == 5 and rep["trees"]["8"]["nodes"] == 7
    assert t4["drafts_accepted_per_step_tree"] >= t4["drafts_accepted_per_step_chain"] > 0
    saved = json.loads((folder / "config.json").read_text())["sdlm"]["draft_trees"]
    assert saved == json.loads((tmp_path / "trees.json").read_text()) == {"4": t4["paths"], "8": rep["trees"]["8"]["paths"]}
    args = ["--model", str(folder), "--max-new-tokens", "20", "--json", "--no-chat"]
    _, tree_out, _ = run(capsys, "generate", "hello hello", "--tree", "auto", *args)
    _, ar_out, _ = run(capsys, "generate", "hello hello", "--mode", "ar", *args)
    assert json.loads(tree_out)["tokens"] == json.loads(ar_out)["tokens"]


@pytest.mark.parametrize("flag, packed", [("--prepack", True), ("--no-prepack", False)])
def test_generate_packs_as_told_and_writes_the_same_tokens(capsys, monkeypatch, flag, packed):
    import torch

    import sdlm.cpu as cpu
    from sdlm.model import SDLM

    if packed and not cpu.can_prepack(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN linear")
    loaded = []
    real = SDLM._prepack_if
    monkeypatch.setattr(SDLM, "_prepack_if", lambda self, p: loaded.append(self) or real(self, p))
    args = ["generate", "abc", "--model", "random:llama", "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)["tokens"]
    assert main(args + [flag]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want
    assert bool(cpu.packed_layers(loaded[-1].model)) is packed


def test_no_row_exact_turns_the_row_split_off(capsys, monkeypatch):
    from sdlm.model import SDLM

    loaded = []
    real = SDLM._prepack_if
    monkeypatch.setattr(SDLM, "_prepack_if", lambda self, p: loaded.append(self) or real(self, p))
    args = ["generate", "abc", "--model", "random:llama", "--dtype", "bfloat16", "--max-new-tokens", "4", "--json"]
    for extra, exact in (([], True), (["--no-row-exact"], False)):
        assert main(args + extra) == 0
        assert json.loads(capsys.readouterr().out)["new_tokens"] == 4
        assert loaded[-1].row_exact is exact


def test_prepack_and_no_prepack_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--prepack", "--no-prepack"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
