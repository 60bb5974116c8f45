"""The real default base model: lossless modes reproduce transformers' greedy generate."""

import pytest
import torch

pytest.importorskip("gguf")
try:
    from sdlm.zoo import smollm2_folder

    smollm2_folder()
except Exception as e:  # noqa: BLE001 - the package is an optional download
    pytest.skip(f"SmolLM2 not available: {e}", allow_module_level=True)

from sdlm.decode import Decoder, GenerationConfig, encode_prompt
from sdlm.model import SDLM
from sdlm.zoo import load_base

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a list.", "Tom has 3 apples and buys 5 more. How many?"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def reference():
    """Greedy continuations from transformers' own generate on the untouched base model."""
    model, tok = load_base("smollm2-135m-instruct")
    sdlm = SDLM(model, tok, None)
    out = {}
    for p in PROMPTS:
        ids = encode_prompt(sdlm, p)
        gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        out[p] = (ids, gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def sdlm():
    return SDLM.load("smollm2-135m-instruct", quiet=True)


@pytest.mark.parametrize("mode,block_size", [("ar", None), ("speculative", 2), ("speculative", 4), ("speculative", 8)])
def test_lossless_modes_equal_generate(sdlm, reference, mode, block_size):
    dec = Decoder(sdlm, GenerationConfig(mode=mode, block_size=block_size, max_new_tokens=MAX_NEW))
    for p, (ids, expected) in reference.items():
        got = dec.generate(ids)
        assert got.tokens == expected, (p, sdlm.tokenizer.decode(got.tokens), sdlm.tokenizer.decode(expected))
        assert got.forwards <= len(expected)


def test_answer_is_sensible(sdlm, reference):
    ids, _ = reference[PROMPTS[0]]
    text = Decoder(sdlm, GenerationConfig(max_new_tokens=16)).generate(ids).text
    assert "Paris" in text
