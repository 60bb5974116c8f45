"""sdlm distill: greedy answers of the model itself, batched, resumable, never MBPP test items."""

import json

import pytest

from sdlm.decode import Decoder, GenerationConfig
from sdlm.distill import distill, done_keys, read_prompts
from sdlm.errors import SDLMError
from sdlm.model import SDLM


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts(tmp_path):
    return write(tmp_path / "p.jsonl", [
        {"question": "two plus two"},
        {"prompt": "say hi"},
        {"messages": [{"role": "user", "content": "abc abc"}, {"role": "assistant", "content": "old answer"}]},
        {"text": "write f", "task_id": 700, "test_list": ["assert f() == 1"]},
        {"text": "held out", "task_id": 50, "test_list": ["assert g() == 2"]},
        {"conversations": [{"from": "human", "value": "xyz"}]},
    ])


def test_read_prompts(prompts):
    ps, refused = read_prompts(prompts)
    assert refused == 1 and len(ps) == 5
    assert ps[2].messages == [{"role": "user", "content": "abc abc"}]  # the old answer is dropped
    assert ps[3].messages[0]["content"].endswith("Your code should pass this test: assert f() == 1")
    assert ps[4].messages == [{"role": "user", "content": "xyz"}]


def test_answers_are_the_models_greedy_output_and_a_run_resumes(prompts, tmp_path):
    s = SDLM.load("random:llama")
    ps, _ = read_prompts(prompts)
    out = tmp_path / "out.jsonl"
    first = distill(s, ps[:2], out, max_new_tokens=12, batch_size=1, progress=False)
    assert first["written"] == 2
    # a killed write leaves half a line: it is repaired, and the finished prompts are not redone
    with out.open("a") as f:
        f.write('{"source": "p", "id": "3", "fin')
    assert len(done_keys(out)) == 2
    again = distill(s, ps, out, max_new_tokens=12, batch_size=1, progress=False)
    assert again["already_done"] == 2 and again["written"] == 3
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 5 and len({(r["source"], r["id"]) for r in rows}) == 5
    for r in rows:  # each answer is what the decoder's greedy AR mode says for the same prompt
        p = next(p for p in ps if p.id == r["id"])
        from sdlm.distill import _encode

        g = Decoder(s, GenerationConfig(mode="ar", max_new_tokens=12)).generate(_encode(s.tokenizer, p.messages))
        assert r["messages"][-1] == {"role": "assistant", "content": g.text}
        assert r["finish"] == ("stop" if g.finish_reason == "eos" else "length")
        assert r["answer_ids"] == g.tokens
    assert distill(s, ps, out, max_new_tokens=12, progress=False)["written"] == 0


def test_batched_distill_writes_every_prompt(prompts, tmp_path):
    s = SDLM.load("random:qwen2")
    ps, _ = read_prompts(prompts)
    stats = distill(s, ps, tmp_path / "o.jsonl", max_new_tokens=6, batch_size=3, progress=False)
    assert stats["written"] == 5 and stats["stop"] + stats["length"] == 5


def test_bad_prompt_files(tmp_path):
    with pytest.raises(SDLMError, match="not found"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(SDLMError, match="no prompt found"):
        read_prompts(write(tmp_path / "a.jsonl", [{"foo": 1}]))
    with pytest.raises(SDLMError, match="duplicate"):
        read_prompts(write(tmp_path / "b.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}]))
