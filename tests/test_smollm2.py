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


@pytest.fixture(scope="module")
def shipped():
    return SDLM.load("smollm2-135m-instruct-sdlm")


@pytest.mark.parametrize("mode,block_size", [("ar", None), ("speculative", 4), ("speculative", 8)])
def test_shipped_adapter_keeps_the_base_output(shipped, reference, mode, block_size):
    """The default model (base + trained block adapter): ar and speculative == the bare base's generate."""
    assert shipped.adapter is not None and shipped.config.retrofit == "block-adapter"
    dec = Decoder(shipped, GenerationConfig(mode=mode, block_size=block_size, max_new_tokens=MAX_NEW))
    tok = fw = 0
    for p, (ids, expected) in reference.items():
        got = dec.generate(ids)
        assert got.tokens == expected, (p, shipped.tokenizer.decode(got.tokens), shipped.tokenizer.decode(expected))
        tok, fw = tok + got.new_tokens, fw + got.forwards
    if mode == "speculative":
        assert tok / fw > 1.3  # trained drafts are accepted (an untrained mask token gives about 1.1)


def test_shipped_adapter_exact_tpf_matches_decoding(shipped, reference):
    from sdlm.tpf import tokens_per_forward

    for thr in (0.0, None):  # every draft offered and every block carried; the CPU's default thresholds
        for p, (ids, expected) in reference.items():
            dec = Decoder(shipped, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=MAX_NEW,
                                                    draft_threshold=thr, block_threshold=thr))
            got = dec.generate(ids)
            t = tokens_per_forward(shipped, ids, expected, 4, max_new_tokens=MAX_NEW, draft_threshold=dec.draft_threshold,
                                   block_threshold=dec.block_threshold)
            assert (t.new_tokens, t.forwards) == (got.new_tokens, got.forwards)


def test_shipped_confidence_causal_first_token(shipped, reference):
    """first_token="causal": at threshold 1 every step commits the model's own next token, so the output
    is the bare base's generate; at 0.9 every step starts with it and still commits more than one."""
    for tau in (1.0, 0.9):
        dec = Decoder(shipped, GenerationConfig(mode="confidence", first_token="causal", threshold=tau,
                                                block_size=4, max_new_tokens=MAX_NEW))
        tok = fw = 0
        for p, (ids, expected) in reference.items():
            got = dec.generate(ids)
            if tau == 1.0:
                assert got.tokens == expected, (p, shipped.tokenizer.decode(got.tokens))
            else:
                assert got.tokens[0] == expected[0]
            tok, fw = tok + got.new_tokens, fw + got.forwards
        assert tok / fw == 1.0 if tau == 1.0 else tok / fw > 1.2


@pytest.mark.parametrize("threshold", [0.0, None])  # every node and block; the CPU's defaults
@pytest.mark.parametrize("block_size", [4, 8])
def test_shipped_draft_tree_keeps_the_base_output(shipped, reference, block_size, threshold):
    """--tree auto (the shipped calibrated trees): the bare base's generate; with every node, in fewer
    forwards than the chain with every draft; the one-forward count of SPEC §3.4 matches the decoder's."""
    from sdlm.tpf import tokens_per_forward

    cfg = dict(block_size=block_size, max_new_tokens=MAX_NEW, draft_threshold=threshold, block_threshold=threshold)
    tree = Decoder(shipped, GenerationConfig(tree="auto", **cfg))
    chain = Decoder(shipped, GenerationConfig(**cfg))
    assert tree.tree is not None and len(tree.tree) >= block_size - 1
    fw_tree = fw_chain = 0
    for p, (ids, expected) in reference.items():
        got = tree.generate(ids)
        assert got.tokens == expected, (p, shipped.tokenizer.decode(got.tokens))
        t = tokens_per_forward(shipped, ids, expected, block_size, max_new_tokens=MAX_NEW, tree=tree.tree,
                               draft_threshold=tree.draft_threshold, block_threshold=tree.block_threshold)
        assert t.forwards == got.forwards
        fw_tree, fw_chain = fw_tree + got.forwards, fw_chain + chain.generate(ids).forwards
    if threshold == 0.0:
        assert fw_tree < fw_chain
