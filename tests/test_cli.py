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


def test_console_script_exit_code():
    p = subprocess.run([sys.executable, "-m", "sdlm.cli", "generate", "hi", "--threshold", "7"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("sdlm: error: threshold") and "Traceback" not in p.stderr


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--mode", "fast"])
    assert e.value.code == 2
