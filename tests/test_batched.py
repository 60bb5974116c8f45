"""Batched decoding equals decoding the prompts one at a time, in every mode, cached and uncached.

The tiny trained model accepts long drafts, so rows of one batch commit different numbers of
tokens per step: the ragged steps, the dead cache entries they leave and the rows that finish
early are all exercised. Speculative output is also checked against ``transformers`` ``generate``.
"""

import pytest

from sdlm.batched import generate_batch
from sdlm.decode import Decoder, GenerationConfig

from conftest import hf_greedy, make_sdlm, random_prompt

PROMPTS = ["qwe qwe qwe", "abcd abcd ab", "zz zz zz zz", "hello hello", "mno", "x", "abab abab abab abab"]


def _ids(s, texts):
    return [s.tokenizer(t)["input_ids"] for t in texts]


def _same(batched, alone):
    for b, a in zip(batched, alone):
        assert b.tokens == a.tokens
        assert b.forwards == a.forwards
        assert b.accept_histogram == a.accept_histogram
        assert b.finish_reason == a.finish_reason
        assert b.text == a.text


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mode,D,tau", [("ar", 4, 0.9), ("speculative", 2, 0.9), ("speculative", 4, 0.9),
                                        ("speculative", 8, 0.9), ("confidence", 4, 0.5), ("confidence", 4, 0.9),
                                        ("confidence-causal", 4, 0.5), ("confidence-verify", 4, 0.5),
                                        ("confidence-verify", 8, 0.9)])
def test_batched_equals_one_at_a_time(trained, mode, D, tau, use_cache):
    prompts = _ids(trained, PROMPTS)
    first = "causal" if mode.endswith("-causal") else "block"
    verify = mode.endswith("-verify")
    mode = mode.removesuffix("-causal").removesuffix("-verify")
    cfg = GenerationConfig(mode=mode, block_size=D, threshold=tau, max_new_tokens=30, use_cache=use_cache,
                           first_token=first, verify=verify)
    alone = [Decoder(trained, cfg).generate(p) for p in prompts]
    batched = generate_batch(Decoder(trained, cfg), prompts, batch_size=4)
    _same(batched, alone)
    if mode == "speculative":
        tpf = sum(g.new_tokens for g in batched) / sum(g.forwards for g in batched)
        assert tpf >= (1.5 if D == 2 else 2.0)  # drafts are accepted: rows commit different counts per step
        for p, g in zip(prompts, batched):
            assert g.tokens == hf_greedy(trained, p, 30)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_draft_threshold(trained, temperature):
    # rows offer different numbers of drafts per step
    prompts = _ids(trained, PROMPTS)
    cfg = GenerationConfig(mode="speculative", block_size=4, draft_threshold=0.3, max_new_tokens=30,
                           temperature=temperature, seed=4)
    alone = [Decoder(trained, cfg).generate(p) for p in prompts]
    _same(generate_batch(Decoder(trained, cfg), prompts, batch_size=4), alone)


def _stop_in_some(texts: list[str]) -> str:
    """A three-character string that occurs, past its first two characters, in some of ``texts`` but not in all."""
    for t in texts:
        for k in range(2, len(t) - 2):
            s = t[k : k + 3]
            if 0 < sum(s in u for u in texts) < len(texts):
                return s
    raise AssertionError(f"no string tells these outputs apart: {texts}")


def test_batched_rows_finish_at_eos_stop_and_length(trained):
    prompts = _ids(trained, PROMPTS)
    free = GenerationConfig(mode="speculative", block_size=4, max_new_tokens=25)
    # the stop string is taken from the model's own outputs, which depend on the CPU's rounding in training
    stop = _stop_in_some([Decoder(trained, free).generate(p).text for p in prompts])
    cfg = GenerationConfig(mode="speculative", block_size=4, max_new_tokens=25, stop=(stop,))
    alone = [Decoder(trained, cfg).generate(p) for p in prompts]
    assert {g.finish_reason for g in alone} >= {"stop", "length"}
    _same(generate_batch(Decoder(trained, cfg), prompts, batch_size=7), alone)


def test_batched_sampling_draws_like_a_lone_decoder(trained):
    prompts = _ids(trained, PROMPTS[:4])
    for mode, verify in (("speculative", False), ("confidence", False), ("confidence", True), ("ar", False)):
        cfg = GenerationConfig(mode=mode, block_size=4, threshold=0.5, max_new_tokens=20, temperature=0.9, seed=3,
                               verify=verify)
        alone = [Decoder(trained, cfg).generate(p) for p in prompts]
        _same(generate_batch(Decoder(trained, cfg), prompts, batch_size=4), alone)


@pytest.mark.parametrize("mode", ["ar", "speculative", "confidence"])
def test_batched_random_models(arch, mode):
    s = make_sdlm(arch, seed=1)
    prompts = [random_prompt(i, n) for i, n in enumerate([5, 17, 1, 9, 12])]
    cfg = GenerationConfig(mode=mode, block_size=4, threshold=0.0, max_new_tokens=12)
    alone = [Decoder(s, cfg).generate(p) for p in prompts]
    _same(generate_batch(Decoder(s, cfg), prompts, batch_size=3), alone)


def test_batched_keeps_order_and_checks_input(trained):
    prompts = _ids(trained, PROMPTS)
    dec = Decoder(trained, GenerationConfig(mode="ar", max_new_tokens=3))
    out = generate_batch(dec, prompts, batch_size=2)
    assert [g.prompt_tokens for g in out] == [len(p) for p in prompts]
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(dec, prompts, batch_size=0)
    from sdlm.errors import SDLMError

    with pytest.raises(SDLMError, match="empty"):
        generate_batch(dec, [prompts[0], []])


@pytest.mark.parametrize("tree", [None, "3,2,1"])
def test_batched_cache_drops_the_columns_no_row_keeps(trained, tree, monkeypatch):
    """The columns of a step that no row keeps (drafts every row rejected, padding) leave the cache at once:
    it grows by about what the rows commit, not by every draft or tree node offered."""
    prompts = _ids(trained, PROMPTS)
    seen = []
    forward = trained.forward

    def spy(input_ids, position_ids, mask4d, gate, cache=None, *args, **kwargs):
        if cache is not None and cache.layers and cache.layers[0].is_initialized:
            seen.append(cache.layers[0].keys.shape[-2])
        return forward(input_ids, position_ids, mask4d, gate, cache, *args, **kwargs)

    monkeypatch.setattr(trained, "forward", spy)
    cfg = GenerationConfig(mode="speculative", block_size=4, max_new_tokens=30, tree=tree, draft_threshold=0.0,
                           block_threshold=0.0)
    alone = [Decoder(trained, cfg).generate(p) for p in prompts]
    seen.clear()
    _same(generate_batch(Decoder(trained, cfg), prompts, batch_size=4), alone)
    # the longest row's tokens, and columns that only some rows keep; keeping every column offered, the tree's
    # batches reached 148 here
    assert max(seen) <= max(len(p) for p in prompts) + 30 + 20


@pytest.mark.parametrize("mode,tree,temperature", [("speculative", None, 0.0), ("speculative", "3,2,1", 0.0),
                                                   ("speculative", None, 0.9), ("confidence", None, 0.0)])
def test_batched_equals_one_at_a_time_with_the_cache_compacted_at_every_step(trained, mode, tree, temperature,
                                                                            monkeypatch):
    """Compaction (each row's live entries moved to the end of a narrower cache, its dead ones dropped) runs
    when a batch's cache is mostly dead; here at every step, and the rows still decode as they do alone."""
    import sdlm.batched as batched

    calls = []
    compact = batched._compact
    monkeypatch.setattr(batched, "COMPACT_MIN", 1)
    monkeypatch.setattr(batched, "COMPACT_BELOW", 1.01)
    monkeypatch.setattr(batched, "_compact", lambda *a: calls.append(a[2].shape[1]) or compact(*a))
    prompts = _ids(trained, PROMPTS)
    cfg = GenerationConfig(mode=mode, block_size=4, threshold=0.5, max_new_tokens=30, tree=tree,
                           temperature=temperature, seed=4, draft_threshold=0.0 if mode == "speculative" else None)
    alone = [Decoder(trained, cfg).generate(p) for p in prompts]
    _same(generate_batch(Decoder(trained, cfg), prompts, batch_size=4), alone)
    assert len(calls) > 10
