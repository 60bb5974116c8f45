"""A tiny model trained in seconds so that drafts are really accepted; exact tokens per forward.

Random-weight models accept almost nothing, which leaves the accept path and the
cache crops after long accepts untested. The tiny recipe (a 2-layer Llama on
repeated letter patterns) learns to draft, so here:

- speculative decoding accepts >= 2 tokens per forward at D = 4, and its output
  is still token-identical to ``transformers`` ``generate``, cached and uncached;
- SPEC §3.4's one-forward count equals the real decoder's forward count.
"""


import pytest
import torch

from sdlm.adapter import AdapterConfig, attach
from sdlm.decode import Decoder, GenerationConfig
from sdlm.model import SDLM
from sdlm.tpf import block_drafts, replay, summarize, tokens_per_forward

from conftest import hf_greedy, make_sdlm

PROMPTS = ["qwe qwe qwe", "abcd abcd ab", "zz zz zz zz", "hello hello", "mno"]  # words not in the data


def ids(s: SDLM, text: str) -> list[int]:
    return s.tokenizer(text)["input_ids"]


def test_trained_drafts_are_accepted_and_stay_exact(trained):
    total_tok = total_fw = 0
    for text in PROMPTS:
        prompt = ids(trained, text)
        ref = hf_greedy(trained, prompt, 40)
        for use_cache in (True, False):
            g = Decoder(trained, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=40,
                                                  use_cache=use_cache)).generate(prompt)
            assert g.tokens == ref, (text, use_cache)
        total_tok, total_fw = total_tok + g.new_tokens, total_fw + g.forwards
        assert max(g.accept_histogram) >= 3  # long accepts happen, so long crops are exercised
    assert total_tok / total_fw >= 2.0


def test_confidence_causal_first_token_follows_the_model(trained):
    # first_token="causal" with threshold 1 commits the model's own greedy token each step: exactly AR;
    # lower thresholds still commit several tokens per forward on this trained model
    tok = fw = 0
    for text in PROMPTS:
        prompt = ids(trained, text)
        ref = hf_greedy(trained, prompt, 30)
        for use_cache in (True, False):
            cfg = GenerationConfig(mode="confidence", first_token="causal", threshold=1.0, block_size=4,
                                   max_new_tokens=30, use_cache=use_cache)
            assert Decoder(trained, cfg).generate(prompt).tokens == ref
        g = Decoder(trained, GenerationConfig(mode="confidence", first_token="causal", threshold=0.5, block_size=4,
                                              max_new_tokens=30)).generate(prompt)
        assert g.tokens[0] == ref[0]
        tok, fw = tok + g.new_tokens, fw + g.forwards
    assert tok / fw >= 2.0


@pytest.mark.parametrize("D", [2, 4, 8])
def test_one_forward_count_equals_the_decoder(trained, monkeypatch, D):
    """The count replayed from one forward is the decoder's, offering every draft and carrying every candidate
    block (0, 0), under a CPU's defaults (None, None), under a high draft threshold (0.9) that cuts most drafts,
    and under block thresholds that carry one block where an accept length is likely (0.5) or only on steps
    without drafts (1.0)."""
    sizes: list[tuple[int, int]] = []  # each step's drafts and candidate blocks, from its layout
    real_layout = Decoder._layout

    def layout(self, u, f, d, q=None):
        st = real_layout(self, u, f, d, q)
        sizes.append((len(d), (st.n_logits - len(d) - 1) // self.block_size))
        return st

    monkeypatch.setattr(Decoder, "_layout", layout)
    results, forwards = [], {}
    for thr, bthr in ((0.0, 0.0), (None, None), (0.9, 0.0), (0.0, 0.5), (0.1, 1.0)):
        forwards[thr, bthr] = 0
        for text in PROMPTS:
            prompt = ids(trained, text)
            for limit in (40, 13):
                dec = Decoder(trained, GenerationConfig(mode="speculative", block_size=D, max_new_tokens=limit,
                                                        draft_threshold=thr, block_threshold=bthr))
                sizes.clear()
                g = dec.generate(prompt)
                t = tokens_per_forward(trained, prompt, g.tokens, D, max_new_tokens=limit,
                                       draft_threshold=dec.draft_threshold, block_threshold=dec.block_threshold)
                assert (t.new_tokens, t.forwards) == (g.new_tokens, g.forwards), (text, limit, thr, bthr)
                assert t.accept_histogram == g.accept_histogram
                # and the drafts and blocks each step offered (a step's size: 1 + k + b * D)
                assert list(zip(t.offered, t.blocks)) == sizes[1:]
                if not dec.block_threshold:
                    assert t.blocks == [k + 1 for k in t.offered]
                elif dec.block_threshold == 1.0:
                    assert t.blocks == [int(k == 0) for k in t.offered]
                results.append(t)
                forwards[thr, bthr] += g.forwards
    s = summarize(results)
    assert s["forwards"] == sum(r.forwards for r in results) and s["tokens_per_forward"] > 1.0
    if D > 2:
        assert forwards[0.9, 0.0] > forwards[0.0, 0.0]  # the high threshold cut drafts that would have been accepted
        assert forwards[0.1, 1.0] > forwards[0.0, 0.0]  # steps without a block: the next one has no drafts


def test_count_matches_with_a_gated_adapter_and_eos():
    """Block-adapter model (gate on block tokens), outputs that end at EOS: still exact."""
    s = make_sdlm("qwen2", seed=3)
    ad = attach(s, AdapterConfig(kind="block-adapter", r=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    eos = min(s.eos_token_ids())
    for seed in range(4):
        prompt = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        dec = Decoder(s, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=30))
        out = dec.generate(prompt)
        t = tokens_per_forward(s, prompt, out.tokens, 4, max_new_tokens=30, draft_threshold=dec.draft_threshold,
                               block_threshold=dec.block_threshold)
        assert (t.new_tokens, t.forwards) == (out.new_tokens, out.forwards)
    # a hand-made case: drafts right up to and past an EOS that ends the output
    seq = [1, 2, 3, 10, 11, eos]
    drafts = torch.tensor([[0, 11, eos, 99], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = replay(drafts, seq, n_prompt=3, max_new_tokens=30)
    assert (r.new_tokens, r.forwards) == (3, 2)  # prefill gives 10; then 11, eos accepted


def test_block_drafts_shape_and_mask_never_predicted(trained):
    prompt = ids(trained, "abc abc")
    d = block_drafts(trained, prompt + [5, 6, 7], len(prompt) - 1, 4)
    assert d.shape == (3, 4)  # blocks at the last prompt token and the first two answer tokens
    assert not (d == trained.config.mask_token_id).any()
