"""Equalities that make SDLM trustworthy, on tiny random Llama / Qwen2 models in float32.

1. For the same block, the training layout (one dense forward) and the cached inference layouts
   (confidence step, speculative step) give the same logits (SPEC §3.5).
2. Modes ``ar`` and ``speculative`` give exactly transformers' greedy ``generate`` (SPEC §3.2).
3. Retrofit and save/load keep the model and its SDLM settings.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import sdlm.model as sdlm_model_module
from conftest import hf_greedy, make_sdlm, random_prompt, use_oracle_drafts
from sdlm.cpu import packing_off
from sdlm.decode import Decoder, GenerationConfig
from sdlm.layout import ar_step, confidence_step, speculative_step, training_layout
from sdlm.masks import additive, allowed
from sdlm.model import MASK_TOKEN, SDLM

ATOL = 1e-4

# ---------------------------------------------------------------- 1. training view == inference view


def training_block_logits(sdlm, x, starts, D):
    """One dense forward over ``x ++ blocks at starts`` (mask from masks.allowed): (K, D, V) block logits."""
    lay = training_layout(torch.tensor(x), torch.ones(len(x), dtype=torch.bool), starts, D, sdlm.config.mask_token_id)
    mask = additive(allowed(lay.info, lay.info, sdlm.config.causal_within_block), sdlm.dtype)
    with torch.no_grad():
        logits = sdlm.forward(lay.input_ids[None], lay.info.pos[None], mask, lay.info.is_block[None], None, 0)[0]
    return logits[len(x) :].view(len(starts), D, -1)


def prefill(sdlm, tokens):
    """A DynamicCache holding the causal KV of ``tokens`` (positions 0..)."""
    cache = DynamicCache()
    if tokens:
        sdlm.step_logits(ar_step(tokens, 0), cache, 0)
    return cache


def causal_logits(sdlm, x):
    with torch.no_grad():
        return sdlm.model(torch.tensor([x])).logits[0]


@pytest.mark.parametrize("causal_within_block", [False, True])
@pytest.mark.parametrize("D", [2, 3, 4])
def test_confidence_step_equals_training_layout(arch, D, causal_within_block):
    sdlm = make_sdlm(arch, block_size=D)
    sdlm.config.causal_within_block = causal_within_block
    x = random_prompt(D, 14)
    starts = [0, 3, 6, 10, 13]
    train = training_block_logits(sdlm, x, starts, D)
    for b, p in enumerate(starts):
        n = p + 1  # committed x_0..x_p: the block [x_p, M, ..] sits at p .. p+D-1
        # the committed tokens split between the cache and the step in different ways
        for n_cached in sorted({0, max(n - 3, 0), n - 1}):
            cache = prefill(sdlm, x[:n_cached])
            step = confidence_step(x[n_cached:n], n_cached, D, sdlm.config.mask_token_id)
            got = sdlm.step_logits(step, cache, n_cached)  # (D, V)
            torch.testing.assert_close(got, train[b], atol=ATOL, rtol=0)
        # and without any cache
        got = sdlm.step_logits(confidence_step(x[:n], 0, D, sdlm.config.mask_token_id))
        torch.testing.assert_close(got, train[b], atol=ATOL, rtol=0)
    # the comparison has teeth: neighbouring blocks really differ
    assert (train[1] - train[2]).abs().max() > 1e-2


def test_equivalence_under_eager_attention():
    # the additive mask convention must give the same views under eager attention too
    sdlm = make_sdlm("llama", attn="eager")
    x = random_prompt(0, 10)
    train = training_block_logits(sdlm, x, [4, 8], 4)
    for b, p in enumerate([4, 8]):
        cache = prefill(sdlm, x[:p])
        got = sdlm.step_logits(confidence_step(x[p : p + 1], p, 4, sdlm.config.mask_token_id), cache, p)
        torch.testing.assert_close(got, train[b], atol=ATOL, rtol=0)


@pytest.mark.parametrize("D", [2, 3, 4])
@pytest.mark.parametrize("k", [0, 1, None])  # None: steady state, k = D - 1 drafts
def test_speculative_step_equals_training_layout_and_causal_forward(arch, D, k):
    sdlm = make_sdlm(arch, block_size=D)
    k = D - 1 if k is None else k
    x = random_prompt(20 + D, 16)
    for n in (5, 9):
        drafts = x[n : n + k]  # proposed tokens for positions n .. n+k-1
        for n_cached in (n - 1, n - 2):
            cache = prefill(sdlm, x[:n_cached])
            step = speculative_step(x[n_cached:n], n_cached, drafts, D, sdlm.config.mask_token_id)
            got = sdlm.step_logits(step, cache, n_cached)  # ((k+1) + (k+1)*D, V)
            # causal logits at x_{n-1}, d_0 .. d_{k-1} == a plain causal forward over the same tokens
            plain = causal_logits(sdlm, x[: n + k])
            torch.testing.assert_close(got[: k + 1], plain[n - 1 : n + k], atol=ATOL, rtol=0)
            # candidate block B_i (start n+i-1) == the training-layout block with the same start
            train = training_block_logits(sdlm, x[: n + k], list(range(n - 1, n + k)), D)
            torch.testing.assert_close(got[k + 1 :].view(k + 1, D, -1), train, atol=ATOL, rtol=0)


def test_clean_tokens_of_the_training_layout_are_the_causal_forward(arch):
    # blocks never leak into the clean sequence: its logits are the plain causal model's
    sdlm = make_sdlm(arch)
    x = random_prompt(3, 12)
    lay = training_layout(torch.tensor(x), torch.ones(12, dtype=torch.bool), [2, 5, 9], 4, sdlm.config.mask_token_id)
    mask = additive(allowed(lay.info, lay.info), sdlm.dtype)
    with torch.no_grad():
        logits = sdlm.forward(lay.input_ids[None], lay.info.pos[None], mask, lay.info.is_block[None])[0]
    torch.testing.assert_close(logits[:12], causal_logits(sdlm, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- 2. ar / speculative == generate

N_NEW = 24
PROMPTS = [(100, 5), (101, 9), (102, 14)]  # (seed, length)


def decode(sdlm, prompt, mode, D=4, n=N_NEW):
    return Decoder(sdlm, GenerationConfig(mode=mode, block_size=D, max_new_tokens=n)).generate(prompt)


def test_ar_equals_generate(arch):
    sdlm = make_sdlm(arch)
    for seed, length in PROMPTS:
        prompt = random_prompt(seed, length)
        assert decode(sdlm, prompt, "ar").tokens == hf_greedy(sdlm, prompt, N_NEW)


@pytest.mark.parametrize("D", [2, 4, 8])
def test_speculative_equals_generate(arch, D):
    sdlm = make_sdlm(arch)
    for seed, length in PROMPTS:
        prompt = random_prompt(seed, length)
        g = decode(sdlm, prompt, "speculative", D)
        assert g.tokens == hf_greedy(sdlm, prompt, N_NEW)
        assert g.forwards <= g.new_tokens  # never more forwards than AR


@pytest.mark.parametrize("D", [2, 4, 8])
def test_speculative_with_accepted_drafts_equals_generate(arch, monkeypatch, D):
    # oracle drafts (right at 2 of 3 positions) are accepted in runs of every length, so the real
    # KV cache is cropped by every amount; the output must still be transformers' greedy output
    sdlm = make_sdlm(arch)
    for seed, length in PROMPTS:
        prompt = random_prompt(seed, length)
        want = hf_greedy(sdlm, prompt, N_NEW)
        with monkeypatch.context() as m:
            use_oracle_drafts(sdlm, m, prompt + want)
            g = decode(sdlm, prompt, "speculative", D)
        assert g.tokens == want
        assert g.forwards < g.new_tokens  # several tokens per forward


def test_equality_with_generate_has_teeth(monkeypatch):
    # if clean tokens could see block tokens (a plausible mask bug), verification breaks and the
    # speculative output no longer equals generate: the equality tests above can fail
    sdlm = make_sdlm("llama")

    def leaky(q, k, causal_within_block=False):
        leak = (q.block[..., :, None] < 0) & (k.block[..., None, :] >= 0) & (k.pos[..., None, :] <= q.pos[..., :, None])
        return allowed(q, k, causal_within_block) | leak

    monkeypatch.setattr(sdlm_model_module, "allowed", leaky)
    differs = [decode(sdlm, random_prompt(s, n), "speculative", 4).tokens != hf_greedy(sdlm, random_prompt(s, n), N_NEW) for s, n in PROMPTS]
    assert any(differs)


@pytest.mark.parametrize("mode,D", [("ar", 1), ("speculative", 2), ("speculative", 4), ("speculative", 8)])
def test_stops_at_eos_like_generate(arch, monkeypatch, mode, D):
    sdlm = make_sdlm(arch)
    for seed, length in PROMPTS[:2]:
        prompt = random_prompt(seed, length)
        y = hf_greedy(sdlm, prompt, N_NEW)
        # make a token that really occurs (first seen at index i >= 3) the end-of-sequence token
        i = next(i for i in range(3, N_NEW) if y[i] not in y[:i])
        for eos in (y[i], [sdlm.tokenizer.eos_token_id, y[i]]):
            monkeypatch.setattr(sdlm.model.generation_config, "eos_token_id", eos)
            want = hf_greedy(sdlm, prompt, N_NEW)
            assert want == y[: i + 1]
            for oracle in (False, True):
                with monkeypatch.context() as m:
                    if oracle:
                        use_oracle_drafts(sdlm, m, prompt + y)
                    g = decode(sdlm, prompt, mode, D)
                assert g.tokens == want and g.finish_reason == "eos"


# ---------------------------------------------------------------- 3. retrofit, save, load


def test_retrofit_adds_a_mean_mask_row(arch):
    sdlm = make_sdlm(arch, retrofit=False)
    n = len(sdlm.tokenizer)
    before = sdlm.model.get_input_embeddings().weight.detach().clone()
    out_before = sdlm.model.get_output_embeddings().weight.detach().clone()
    x = random_prompt(0, 8)
    logits_before = causal_logits(sdlm, x)
    cfg = sdlm.retrofit(block_size=3)
    assert cfg.mask_token_id == n and sdlm.tokenizer.convert_tokens_to_ids(MASK_TOKEN) == n
    emb = sdlm.model.get_input_embeddings().weight
    assert emb.shape[0] == n + 1 and torch.equal(emb[:n], before)
    torch.testing.assert_close(emb[n], before.mean(0))
    torch.testing.assert_close(sdlm.model.get_output_embeddings().weight[n], out_before.mean(0))
    # the old vocabulary's logits are unchanged; the mask's logit is their mean, never the argmax
    after = causal_logits(sdlm, x)
    torch.testing.assert_close(after[:, :n], logits_before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after[:, n], logits_before.mean(-1), atol=1e-5, rtol=0)
    # retrofitting again keeps the mask token and changes only the settings
    again = sdlm.retrofit(block_size=8, causal_within_block=True)
    assert again.mask_token_id == n and again.block_size == 8 and again.causal_within_block
    assert sdlm.model.get_input_embeddings().weight.shape[0] == n + 1


def test_save_load_round_trip(arch, tmp_path):
    sdlm = make_sdlm(arch, block_size=3)
    sdlm.retrofit(block_size=3, causal_within_block=True, ar_loss_weight=0.5)
    folder = sdlm.save(tmp_path / "ckpt")
    sdlm.save(tmp_path / "ckpt")  # saving over an existing folder replaces it
    back = SDLM.load(str(folder))
    assert back.config == sdlm.config and back.is_retrofitted
    assert back.tokenizer.convert_tokens_to_ids(MASK_TOKEN) == sdlm.config.mask_token_id
    assert back.eos_token_ids() == sdlm.eos_token_ids()
    saved, loaded = sdlm.model.state_dict(), back.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = random_prompt(1, 9)
    step = confidence_step(x, 0, 3, sdlm.config.mask_token_id)
    with packing_off():  # the same weights through the same kernels: the same numbers
        assert torch.equal(back.step_logits(step), sdlm.step_logits(step))
        assert torch.equal(causal_logits(back, x), causal_logits(sdlm, x))
    # the loaded model runs its linear layers on packed weights (another summation order): equal up to rounding
    torch.testing.assert_close(back.step_logits(step), sdlm.step_logits(step), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_logits(back, x), causal_logits(sdlm, x), atol=1e-5, rtol=1e-5)
    for mode in ("confidence", "speculative"):
        cfg = GenerationConfig(mode=mode, threshold=0.0, max_new_tokens=12)
        assert Decoder(back, cfg).generate(x).tokens == Decoder(sdlm, cfg).generate(x).tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left behind


def test_load_of_a_plain_model_has_no_settings(tmp_path):
    plain = make_sdlm("llama", retrofit=False)
    plain.save(tmp_path / "plain")
    back = SDLM.load(str(tmp_path / "plain"))
    assert back.config is None and not back.is_retrofitted
