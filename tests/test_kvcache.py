"""Decoding's own KV cache (``sdlm.kvcache``) and attention (``sdlm.attention.sdpa_attention``) against
``transformers``' ``DynamicCache`` and sdpa: the same keys, values and attention, the same decoded tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations import sdpa_attention as hf_sdpa

from sdlm.attention import DECODING_ATTENTION, plain_sdpa, sdpa_attention
from sdlm.batched import generate_batch
from sdlm.decode import Decoder, GenerationConfig
from sdlm.kvcache import GrowingLayer, new_cache, plain_cache
from sdlm.model import SDLM

from conftest import make_sdlm, random_prompt


def _kv(seed: int, t: int, batch: int = 2, heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, t, dim, generator=g), torch.randn(batch, heads, t, dim, generator=g)


def _same(own, plain) -> None:
    assert len(own.layers) == len(plain.layers)
    for a, b in zip(own.layers, plain.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_growing_cache_holds_what_a_dynamic_cache_holds():
    own, plain = new_cache("cpu"), DynamicCache()
    seed = 0

    def update(t: int) -> None:
        nonlocal seed
        for layer in range(2):
            seed += 1
            k, v = _kv(seed, t)
            got, want = own.update(k, v, layer), plain.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    update(7)  # a prefill
    assert all(isinstance(layer, GrowingLayer) for layer in own.layers)
    buffers = [layer._kbuf.data_ptr() for layer in own.layers]
    update(5)  # a step
    SDLM.crop(own, 3), SDLM.crop(plain, 3)  # rejected drafts and block KV
    update(4)
    _same(own, plain)
    assert [layer._kbuf.data_ptr() for layer in own.layers] == buffers  # written in place, never copied whole
    SDLM.keep_tail(own, 9, [3, 1]), SDLM.keep_tail(plain, 9, [3, 1])  # a draft tree's accepted nodes
    _same(own, plain)
    assert own.get_seq_length() == 11
    update(2)
    _same(own, plain)
    assert [layer._kbuf.data_ptr() for layer in own.layers] == buffers
    update(400)  # past the spare room: a larger buffer, the cache copied into it once
    _same(own, plain)
    assert all(layer._kbuf.shape[-2] >= 413 for layer in own.layers)
    own.batch_select_indices(torch.tensor([1])), plain.batch_select_indices(torch.tensor([1]))  # a finished row
    for layer in range(2):
        k, v = _kv(99 + layer, 3, batch=1)
        got, want = own.update(k, v, layer), plain.update(k, v, layer)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _same(own, plain)
    SDLM.crop(own, 1), SDLM.crop(plain, 1)
    _same(own, plain)


def test_plain_cache_and_other_devices_get_transformers_cache():
    with plain_cache():
        cache = new_cache("cpu")
    cache.update(*_kv(0, 3), 0)
    assert type(cache.layers[0]) is not GrowingLayer
    meta = new_cache("meta")
    meta.update(*_kv(0, 3), 0)
    assert type(meta.layers[0]) is not GrowingLayer


def _attention_inputs(seed: int, q_len: int, k_len: int, heads: int = 6, kv_heads: int = 2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, q_len, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, k_len, 16, generator=g) for _ in range(2))
    allowed = torch.rand(2, 1, q_len, k_len, generator=g) < 0.6
    allowed[..., k_len - q_len : k_len].diagonal(dim1=-2, dim2=-1).fill_(True)  # every query sees itself
    return q, k, v, allowed


class _Module:
    def __init__(self, heads: int, kv_heads: int):
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True
        self.training = False


@pytest.mark.parametrize("kv_heads", [2, 6])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_sdpa_attention_equals_transformers(kv_heads, kind):
    q, k, v, allowed = _attention_inputs(0, 5, 23, kv_heads=kv_heads)
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    module = _Module(6, kv_heads)
    want, _ = hf_sdpa.sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = sdpa_attention(module, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, 5, 6, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got, _ = sdpa_attention(module, q, k, v, None, scaling=0.25)  # no mask: transformers' own path
    torch.testing.assert_close(got, hf_sdpa.sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0], rtol=0, atol=0)


@pytest.fixture
def repeat_kv_calls(monkeypatch):
    calls = []
    real = hf_sdpa.repeat_kv

    def counted(hidden, n_rep):
        calls.append(n_rep)
        return real(hidden, n_rep)

    monkeypatch.setattr(hf_sdpa, "repeat_kv", counted)
    return calls


def test_a_decoding_step_shares_grouped_keys_instead_of_copying_them(repeat_kv_calls):
    sdlm = make_sdlm("llama")  # 4 query heads over 2 key/value heads
    assert sdlm.model.config._attn_implementation == DECODING_ATTENTION
    cfg = GenerationConfig(mode="speculative", block_size=4, max_new_tokens=6, draft_threshold=0.0)
    own = Decoder(sdlm, cfg).generate(random_prompt(0, 12))
    assert repeat_kv_calls == []
    with plain_sdpa():
        plain = Decoder(sdlm, cfg).generate(random_prompt(0, 12))
    assert repeat_kv_calls  # transformers' own path copies them: the check above has teeth
    assert own.tokens == plain.tokens


def test_eager_models_keep_their_attention():
    sdlm = make_sdlm("llama", attn="eager")
    assert sdlm.model.config._attn_implementation == "eager"


def _plain_and_own(fn):
    with plain_cache(), plain_sdpa():
        plain = fn()
    return fn(), plain


@pytest.mark.parametrize("cfg", [
    dict(mode="ar"),
    dict(mode="speculative", block_size=4, draft_threshold=0.0, block_threshold=0.0),
    dict(mode="speculative", block_size=4, draft_threshold=0.0, block_threshold=0.5),
    dict(mode="speculative", block_size=4, tree="3,2,1", draft_threshold=0.0, block_threshold=0.0),
    dict(mode="confidence", block_size=4, threshold=0.5),
    dict(mode="confidence", block_size=4, threshold=0.9, verify=True),
], ids=["ar", "speculative", "speculative-some-blocks", "tree", "confidence", "verify"])
def test_decoding_with_own_cache_and_attention_equals_transformers_ones(trained, cfg):
    """On the tiny trained model drafts are accepted, rejected and (trees) kept out of order, so the cache
    is cropped and rearranged as real decoding does; every token and forward count is the same."""
    from test_tree import _ids

    config = GenerationConfig(max_new_tokens=30, **cfg)
    for p in _ids(trained):
        own, plain = _plain_and_own(lambda: Decoder(trained, config).generate(p))
        assert own.tokens == plain.tokens and own.forwards == plain.forwards
    if config.mode == "speculative":
        assert own.tokens_per_forward >= (2.0 if not config.block_threshold else 1.5)  # drafts were really accepted
    own, plain = _plain_and_own(lambda: generate_batch(Decoder(trained, config), _ids(trained)))
    assert [g.tokens for g in own] == [g.tokens for g in plain]
