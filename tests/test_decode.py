"""The decoder (sdlm/decode.py).

1. Cached decoding == the uncached reference decoder, in every mode, on tiny random Llama/Qwen2
   models (SPEC §3.5), also with drafts that really get accepted (oracle drafts).
2. Scripted logits: a fake forward whose predictions we choose, so tokens per forward and the
   KV-cache bookkeeping (what is cached, what is cropped) are checked exactly.
3. Stopping (eos, stop strings, length), errors, and side effects.
"""

from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, make_sdlm, random_prompt, use_oracle_drafts
from sdlm.decode import Decoder, GenerationConfig, encode_prompt, reference_decode
from sdlm.errors import SDLMError

# ---------------------------------------------------------------- 1. cached == uncached reference

# Thresholds for the untrained random models, whose block confidences are ~0.02-0.07: 0.0 commits
# every slot, the others a mix of 1 and more.
MODES = {
    "ar": dict(mode="ar"),
    "confidence-prob": dict(mode="confidence", confidence="prob", threshold=0.03),
    "confidence-prob-all": dict(mode="confidence", confidence="prob", threshold=0.0),
    "confidence-entropy": dict(mode="confidence", confidence="entropy", threshold=0.06),
    "speculative": dict(mode="speculative"),
    "speculative-sampled": dict(mode="speculative", temperature=1.0, top_k=40, seed=7),
    "confidence-sampled": dict(mode="confidence", temperature=0.8, top_p=0.9, threshold=0.02, seed=3),
    "confidence-causal": dict(mode="confidence", first_token="causal", threshold=0.0),
    "confidence-verify": dict(mode="confidence", verify=True, threshold=0.03),
    "confidence-verify-sampled": dict(mode="confidence", verify=True, threshold=0.02, temperature=0.8, seed=5),
    "speculative-draft-threshold": dict(mode="speculative", draft_threshold=0.03),
    "speculative-draft-threshold-sampled": dict(mode="speculative", draft_threshold=0.02, temperature=1.0, seed=9),
    # candidate blocks only where an accept length is that likely (1.0: only on steps without drafts)
    "speculative-every-block": dict(mode="speculative", block_threshold=0.0),
    "speculative-block-threshold": dict(mode="speculative", block_threshold=0.5, draft_threshold=0.0),
    "speculative-block-threshold-1": dict(mode="speculative", block_threshold=1.0),
    "speculative-block-threshold-sampled": dict(mode="speculative", block_threshold=0.5, temperature=1.0, seed=9),
    "confidence-verify-block-threshold": dict(mode="confidence", verify=True, threshold=0.03, block_threshold=0.5),
}
# cold enough that sampling mostly follows the greedy path the oracle drafts are taken from; at that
# temperature every draft looks certain, so every candidate block is carried (the CPU's default carries one)
COLD = dict(mode="speculative", temperature=0.01, seed=11, block_threshold=0.0)


def assert_same_generation(got, ref):
    assert got.tokens == ref.tokens
    assert got.forwards == ref.forwards
    assert got.accept_histogram == ref.accept_histogram
    assert got.finish_reason == ref.finish_reason


@pytest.mark.parametrize("D", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", MODES)
def test_cached_equals_reference(sdlm_model, mode, D):
    cfg = GenerationConfig(block_size=D, max_new_tokens=20, **MODES[mode])
    prompt = random_prompt(D, 7)
    got = Decoder(sdlm_model, cfg).generate(prompt)
    assert_same_generation(got, reference_decode(sdlm_model, prompt, cfg))
    assert got.new_tokens == 20 or got.finish_reason == "eos"
    if MODES[mode].get("threshold") == 0.0 and "first_token" not in MODES[mode]:
        # every confidence is > 0: each step commits the whole block (the last one what is left)
        assert set(got.accept_histogram) <= {D, 20 % D or D}


@pytest.mark.parametrize("D", [2, 4, 8])
@pytest.mark.parametrize("mode", ["speculative", "speculative-cold", "confidence-prob", "confidence-verify",
                                  "speculative-draft-threshold", "speculative-every-block", "speculative-block-threshold",
                                  "speculative-block-threshold-1", "confidence-verify-block-threshold"])
def test_cached_equals_reference_with_accepted_drafts(arch, monkeypatch, mode, D):
    # block predictions come true at 2 of every 3 positions: steps accept runs of different lengths,
    # so the cache is cropped by every possible amount
    sdlm = make_sdlm(arch)
    prompt = random_prompt(10 + D, 6)
    use_oracle_drafts(sdlm, monkeypatch, prompt + hf_greedy(sdlm, prompt, 30))
    cfg = GenerationConfig(block_size=D, max_new_tokens=30, **(COLD if mode == "speculative-cold" else MODES[mode]))
    got = Decoder(sdlm, cfg).generate(prompt)
    assert_same_generation(got, reference_decode(sdlm, prompt, cfg))
    assert max(got.accept_histogram) > 1  # drafts were really accepted


def test_sampling_is_reproducible_and_seed_dependent(sdlm_model):
    prompt = random_prompt(0, 6)
    cfg = GenerationConfig(mode="speculative", temperature=1.0, max_new_tokens=16, block_size=4)
    a = Decoder(sdlm_model, GenerationConfig(**{**cfg.__dict__, "seed": 1})).generate(prompt).tokens
    b = Decoder(sdlm_model, GenerationConfig(**{**cfg.__dict__, "seed": 1})).generate(prompt).tokens
    c = Decoder(sdlm_model, GenerationConfig(**{**cfg.__dict__, "seed": 2})).generate(prompt).tokens
    assert a == b and a != c


def test_greedy_decoding_leaves_the_global_rng_alone(sdlm_model):
    # A greedy decode draws no random numbers, so it must not reseed torch's global generator:
    # a program that seeds torch before decoding must stay reproducible.
    cfg = GenerationConfig(mode="ar", max_new_tokens=3)
    prompt = random_prompt(0, 4)
    draws = []
    for _ in range(2):
        torch.manual_seed(123)
        Decoder(sdlm_model, cfg).generate(prompt)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


# ---------------------------------------------------------------- 2. scripted logits

V_BYTES = 256


class FakeCache:
    """Stands in for the KV cache: only its length matters to the decoder's bookkeeping."""

    def __init__(self):
        self.length = 0

    def crop(self, n):
        assert n < 0 and -n <= self.length, f"bad crop({n}) of a cache of {self.length}"
        self.length += n


class ScriptedModel:
    """Replaces SDLM.step_logits. The AR truth is ``y`` (prompt + continuation): the causal logit
    at position t is a one-hot on y[t+1]. Block slots at position t predict position t+1:
    ``drafts="right"`` -> y[t+1]; ``"wrong"`` -> a different byte; ``"confident:c"`` -> y[t+1],
    with a peaked distribution for slots < c and a flat one (confidence 1/V) after; ``"coinflip"``
    -> y[t+1] with probability ~0.52 and one other byte with the rest (prob confidence ~0.52,
    entropy confidence ~0.88).

    It also checks what the decoder feeds it: cached_len equals the cache's real length, the new
    clean tokens continue right after the cache, committed tokens are y (when drafts are right),
    and every block's slot 0 is a copy of the token at its start position.
    """

    def __init__(self, sdlm, y, drafts):
        self.sdlm, self.y, self.drafts = sdlm, y, drafts
        self.calls = 0
        self.cache = None
        self.max_clean_pos = -1  # the furthest position a committed token or a draft took

    def new_cache(self, decoder=None):
        self.cache = FakeCache()
        return self.cache

    def step_logits(self, step, cache=None, cached_len=0):
        self.calls += 1
        info, ids = step.info, step.input_ids.tolist()
        if cache is None:
            assert cached_len == 0
        else:
            assert cache is self.cache and cached_len == cache.length
            cache.length += len(ids)  # a real forward appends every new token's KV
        clean = [(int(p), t) for p, t, b in zip(info.pos, ids, info.is_block) if not b]
        assert clean and clean[0][0] == cached_len  # new clean tokens continue right after the cache
        assert [p for p, _ in clean] == list(range(cached_len, cached_len + len(clean)))
        self.max_clean_pos = max(self.max_clean_pos, clean[-1][0])
        if self.drafts != "wrong":
            assert all(t == self.y[p] for p, t in clean)  # committed (and drafted) tokens are the truth
        for i, b in enumerate(info.is_block.tolist()):
            if b and int(info.pos[i]) == int(info.start[i]):
                assert ids[i] == self.y[int(info.start[i])] or self.drafts == "wrong"
        V = self.sdlm.model.get_output_embeddings().weight.shape[0]
        n = step.n_logits
        out = torch.zeros(n, V)
        for r in range(len(ids) - n, len(ids)):
            t = int(info.pos[r])
            row = out[r - (len(ids) - n)]
            target = self.y[t + 1]
            if not info.is_block[r]:
                row[target] = 20.0
            elif self.drafts == "right":
                row[target] = 20.0
            elif self.drafts == "wrong":
                row[(target + 1) % V_BYTES] = 20.0
            elif self.drafts == "coinflip":
                row[target], row[(target + 1) % V_BYTES] = 20.0, 19.9
            else:
                c = int(self.drafts.split(":")[1])
                slot = t - int(info.start[r])
                row[target] = 20.0 if slot < c else 1e-3  # flat: confidence ~1/V
        return out


def scripted(monkeypatch, sdlm, y, drafts):
    fake = ScriptedModel(sdlm, y, drafts)
    monkeypatch.setattr(sdlm, "step_logits", fake.step_logits)
    monkeypatch.setattr(Decoder, "_new_cache", fake.new_cache)
    return fake


def step_sizes(monkeypatch, sdlm, fake) -> list[int]:
    """The tokens of every forward the scripted model ``fake`` runs from now on (filled as it runs)."""
    sizes = []
    monkeypatch.setattr(sdlm, "step_logits", lambda step, *a: sizes.append(len(step.input_ids)) or fake.step_logits(step, *a))
    return sizes


@pytest.fixture(scope="module")
def llama():
    return make_sdlm("llama")


def truth(n):
    return [int(t) for t in torch.randint(0, V_BYTES, (n,), generator=torch.Generator().manual_seed(5))]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("D,N", [(2, 9), (4, 13), (4, 15), (8, 17), (8, 5), (3, 1)])
def test_scripted_right_drafts_commit_d_tokens_per_forward(llama, monkeypatch, D, N, use_cache):
    y = truth(64)
    prompt = y[:6]
    fake = scripted(monkeypatch, llama, y, "right")
    g = Decoder(llama, GenerationConfig(mode="speculative", block_size=D, max_new_tokens=N, use_cache=use_cache)).generate(prompt)
    assert g.tokens == y[6 : 6 + N]
    # first step: no drafts, 1 token; then D-1 drafts + 1 bonus token per forward
    assert g.forwards == fake.calls == 1 + -(-(N - 1) // D)
    counts = [1] + [D] * ((N - 1) // D) + ([(N - 1) % D] if (N - 1) % D else [])
    assert sum(g.accept_histogram.values()) == g.forwards
    assert sorted(k for k, v in g.accept_histogram.items() for _ in range(v)) == sorted(counts)
    assert g.finish_reason == "length"
    # near the length limit at most remaining-1 drafts are verified: no token past the last new one
    assert fake.max_clean_pos == 6 + N - 2


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("D", [2, 4, 8])
def test_scripted_wrong_drafts_commit_one_token_per_forward(llama, monkeypatch, D, use_cache):
    y = truth(64)
    prompt = y[:6]
    fake = scripted(monkeypatch, llama, y, "wrong")
    g = Decoder(llama, GenerationConfig(mode="speculative", block_size=D, max_new_tokens=12, use_cache=use_cache)).generate(prompt)
    assert g.tokens == y[6:18]  # still the AR truth: the verifier rejects every draft
    assert g.forwards == fake.calls == 12 and g.accept_histogram == {1: 12}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("D,c", [(4, 1), (4, 2), (4, 4), (8, 3), (1, 1)])
def test_scripted_confidence_commits_the_confident_prefix(llama, monkeypatch, D, c, use_cache):
    y = truth(64)
    prompt = y[:6]
    fake = scripted(monkeypatch, llama, y, f"confident:{c}")
    cfg = GenerationConfig(mode="confidence", block_size=D, threshold=0.5, max_new_tokens=12, use_cache=use_cache)
    g = Decoder(llama, cfg).generate(prompt)
    assert g.tokens == y[6:18]
    assert g.forwards == fake.calls == -(-12 // c)
    assert g.accept_histogram == ({c: 12 // c, 12 % c: 1} if 12 % c else {c: 12 // c})


class _Disagree:
    """Wraps ScriptedModel: the causal logit of every step's last committed token points elsewhere
    at the listed positions (the model's own next token differs from the block's slot 0 there)."""

    def __init__(self, fake, where):
        self.fake, self.where = fake, set(where)

    def step_logits(self, step, cache=None, cached_len=0):
        out = self.fake.step_logits(step, cache, cached_len)
        r = len(step.input_ids) - step.n_logits  # the first logit read: the causal one at x_{n-1}
        t = int(step.info.pos[r])
        if not bool(step.info.is_block[r]) and t in self.where:
            out[0] = 0.0
            out[0, (self.fake.y[t + 1] + 1) % V_BYTES] = 20.0
        return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_scripted_confidence_causal_first_token(llama, monkeypatch, use_cache):
    # first_token="causal": every step's first token is the causal prediction; the block's slots
    # 1.. follow only where its slot 0 agrees with it
    y = truth(64)
    fake = scripted(monkeypatch, llama, y, "confident:4")
    cfg = GenerationConfig(mode="confidence", first_token="causal", block_size=4, threshold=0.5, max_new_tokens=12,
                           use_cache=use_cache)
    g = Decoder(llama, cfg).generate(y[:6])
    assert g.tokens == y[6:18] and g.accept_histogram == {4: 3}  # agreement everywhere: as first_token="block"
    # step 2 reads the causal logit at position 9 (the last token step 1 committed); there it
    # predicts another token than the block's slot 0, so step 2 commits that causal token alone
    monkeypatch.setattr(llama, "step_logits", _Disagree(fake, {9}).step_logits)
    cfg.max_new_tokens = 5
    g = Decoder(llama, cfg).generate(y[:6])
    assert g.tokens == y[6:10] + [(y[10] + 1) % V_BYTES]
    assert g.accept_histogram == {4: 1, 1: 1}
    # the same script with first_token="block": the block's slot 0 picks the token, y[10]
    cfg.first_token = "block"
    assert Decoder(llama, cfg).generate(y[:6]).tokens == y[6:11]


class _Slot0:
    """Wraps ScriptedModel: every block's slot 0 row becomes one logit ``value`` on the token ``shift`` after the
    truth (the model's own next token) in the byte vocabulary, zero elsewhere; its slots 1.. stay as scripted.
    ``_Slot0(fake, 0, 0.5)``: slot 0 still ranks the truth first, at a probability far below any threshold.
    ``_Slot0(fake, 1, 20.0)``: slot 0 confidently predicts another token than the truth."""

    def __init__(self, fake, shift: int, value: float):
        self.fake, self.shift, self.value = fake, shift, value

    def step_logits(self, step, cache=None, cached_len=0):
        out = self.fake.step_logits(step, cache, cached_len)
        n = step.n_logits
        for r in range(len(step.input_ids) - n, len(step.input_ids)):
            if bool(step.info.is_block[r]) and int(step.info.pos[r]) == int(step.info.start[r]):
                row = out[r - (len(step.input_ids) - n)]
                row.zero_()
                row[(self.fake.y[int(step.info.pos[r]) + 1] + self.shift) % V_BYTES] = self.value
        return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_scripted_confidence_causal_keeps_slot0_in_the_prefix(llama, monkeypatch, use_cache):
    # first_token="causal" commits the model's own token at x_n, then the block's slots up to the first one
    # below the threshold, slot 0 included: an unsure slot 0 holds back the confident slots 1.. (dropping it
    # from the prefix measured the same trade-off as a lower threshold, README), as with first_token="block"
    y = truth(64)
    fake = scripted(monkeypatch, llama, y, "confident:4")
    monkeypatch.setattr(llama, "step_logits", _Slot0(fake, 0, 0.5).step_logits)
    for first in ("causal", "block"):
        cfg = GenerationConfig(mode="confidence", first_token=first, block_size=4, threshold=0.5, max_new_tokens=12,
                               use_cache=use_cache)
        g = Decoder(llama, cfg).generate(y[:6])
        assert g.tokens == y[6:18] and g.accept_histogram == {1: 12}
    monkeypatch.setattr(llama, "step_logits", fake.step_logits)  # a sure slot 0: the whole block follows
    cfg.first_token = "causal"
    assert Decoder(llama, cfg).generate(y[:6]).accept_histogram == {4: 3}


@pytest.mark.parametrize("use_cache", [True, False])
def test_scripted_confidence_verify(llama, monkeypatch, use_cache):
    # verify: each step verifies the previous drafts and commits the accepted ones, the model's own next
    # token, then the new block's confident slots; the unconfident slots after them are the next drafts
    y = truth(64)
    cfg = GenerationConfig(mode="confidence", verify=True, block_size=4, threshold=0.5, max_new_tokens=12,
                           use_cache=use_cache, draft_threshold=0.0)  # every draft offered, however unlikely
    fake = scripted(monkeypatch, llama, y, "confident:2")
    steps = list(Decoder(llama, cfg).stream(y[:6]))
    # step 1: y6 (own) + y7 (slot 1, confident); y8, y9 drafted. Steps 2, 3: the 2 drafts, y (own), one
    # confident slot. Step 4: one draft left room (the length limit), y17 (own); the confident y18 is cut.
    assert [t for s in steps for t in s.tokens] == y[6:18]
    assert [s.count for s in steps] == [2, 4, 4, 2] and fake.calls == 4
    assert [s.proposed for s in steps] == [3, 5, 5, 4]  # drafts verified + the new block's slots 1..3
    # every slot confident: the whole block every step, nothing left to verify
    fake = scripted(monkeypatch, llama, y, "confident:4")
    assert [s.count for s in Decoder(llama, cfg).stream(y[:6])] == [4, 4, 4] and fake.calls == 3
    # threshold 1: nothing is confident enough, so it is speculative decoding, step for step
    for drafts in ("confident:4", "right", "wrong"):
        fake = scripted(monkeypatch, llama, y, drafts)
        ref = Decoder(llama, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=12,
                                              draft_threshold=0.0)).generate(y[:6])
        got = Decoder(llama, GenerationConfig(**{**cfg.__dict__, "threshold": 1.0})).generate(y[:6])
        assert got.tokens == ref.tokens == y[6:18]
        assert got.accept_histogram == ref.accept_histogram and got.forwards == ref.forwards


@pytest.mark.parametrize("use_cache", [True, False])
def test_scripted_confidence_verify_needs_slot0_to_agree(llama, monkeypatch, use_cache):
    # the block's slots 1.. are confident but its slot 0 is not the model's own token: they assumed
    # another token before them, so none is committed unverified; they are drafts and the next step
    # verifies them (here they are right: speculative decoding's counts, 1 then 4 per forward)
    y = truth(64)
    fake = scripted(monkeypatch, llama, y, "confident:4")
    monkeypatch.setattr(llama, "step_logits", _Slot0(fake, 1, 20.0).step_logits)
    cfg = GenerationConfig(mode="confidence", verify=True, block_size=4, threshold=0.5, max_new_tokens=9,
                           use_cache=use_cache)
    g = Decoder(llama, cfg).generate(y[:6])
    assert g.tokens == y[6:15] and g.accept_histogram == {1: 1, 4: 2}


@pytest.mark.parametrize("D", [2, 4, 8])
def test_confidence_verify_on_the_trained_model(trained, D):
    # at threshold 1 it is speculative decoding (the model's own output); below it, confident slots are
    # committed at once: more tokens per forward, cached == uncached
    prompts = [trained.tokenizer(t)["input_ids"] for t in ("abcd abcd ab", "qwe qwe qwe", "hello hello")]
    for p in prompts:
        exact = GenerationConfig(mode="confidence", verify=True, block_size=D, threshold=1.0, max_new_tokens=30)
        got = Decoder(trained, exact).generate(p)
        spec = Decoder(trained, GenerationConfig(mode="speculative", block_size=D, max_new_tokens=30,
                                                 draft_threshold=0.0, block_threshold=0.0)).generate(p)  # every draft and block, as verify offers
        assert got.tokens == spec.tokens == hf_greedy(trained, p, 30)
        assert got.accept_histogram == spec.accept_histogram
    loose = GenerationConfig(mode="confidence", verify=True, block_size=D, threshold=0.5, max_new_tokens=30)
    gens = [Decoder(trained, loose).generate(p) for p in prompts]
    for p, g in zip(prompts, gens):
        assert_same_generation(g, reference_decode(trained, p, loose))
    specs = [Decoder(trained, GenerationConfig(mode="speculative", block_size=D, max_new_tokens=30,
                                               draft_threshold=0.0)).generate(p) for p in prompts]
    assert sum(g.forwards for g in gens) < sum(g.forwards for g in specs)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("drafts,threshold", [("confident:2", 0.5), ("coinflip", 0.3)])
def test_scripted_draft_threshold_offers_only_likely_drafts(llama, monkeypatch, drafts, threshold, use_cache):
    # confident:2: slot 1 of every block is confident, slots 2.. are flat (probability ~1/V), so only slot
    # 1's draft is verified. coinflip: every slot's draft is right with probability ~0.52; each alone is
    # above 0.3, but two together (~0.27) are not, so again one draft is offered per step (the threshold
    # is on the drafts' joint probability: one on each slot alone would offer all 3). Each step is then
    # 1 + 1 + 2 * 4 tokens instead of 1 + 3 + 4 * 4
    y = truth(64)
    sizes = step_sizes(monkeypatch, llama, scripted(monkeypatch, llama, y, drafts))
    cfg = GenerationConfig(mode="speculative", block_size=4, draft_threshold=threshold, max_new_tokens=12,
                           use_cache=use_cache, block_threshold=0.0)
    steps = list(Decoder(llama, cfg).stream(y[:6]))
    assert [t for s in steps for t in s.tokens] == y[6:18]
    assert [s.count for s in steps] == [1] + [2] * 5 + [1] and [s.proposed for s in steps] == [0] + [1] * 5 + [0]
    if use_cache:
        # the prompt and a block; then the bonus token, one draft and two candidate blocks; the last step
        # has room for no draft
        assert sizes == [6 + 4, *[1 + 1 + 2 * 4] * 5, 1 + 4]
    # without the threshold all three drafts are offered (and, being right, accepted)
    cfg.draft_threshold = 0.0
    assert [s.count for s in Decoder(llama, cfg).stream(y[:6])] == [1, 4, 4, 3]


@pytest.mark.parametrize("use_cache", [True, False])
def test_scripted_block_threshold_carries_only_likely_blocks(llama, monkeypatch, use_cache):
    # coinflip: every draft is right, with top probability ~0.525. Three drafts give the accept lengths
    # 0..3 chances of ~0.48, 0.25, 0.13 and 0.15: at 0.5 no block is carried, all three drafts are accepted,
    # and the next step, with no drafts, carries its one block: 4 then 1 token per forward. With one draft
    # (draft threshold 0.3) only the length 1 (~0.525) gets its block, which is the one the step needs.
    y = truth(64)
    fake = scripted(monkeypatch, llama, y, "coinflip")
    sizes = step_sizes(monkeypatch, llama, fake)
    cfg = GenerationConfig(mode="speculative", block_size=4, draft_threshold=0.0, block_threshold=0.5,
                           max_new_tokens=16, use_cache=use_cache)
    steps = list(Decoder(llama, cfg).stream(y[:6]))
    assert [t for s in steps for t in s.tokens] == y[6:22]
    assert [s.count for s in steps] == [1, 4, 1, 4, 1, 4, 1] and [s.proposed for s in steps] == [0, 3, 0, 3, 0, 3, 0]
    if use_cache:
        # the prompt and a block; then the bonus token and three drafts without a block; then one block
        assert sizes == [6 + 4, 1 + 3, 1 + 4, 1 + 3, 1 + 4, 1 + 3, 1 + 4]
    sizes.clear()
    cfg.draft_threshold = 0.3
    steps = list(Decoder(llama, cfg).stream(y[:6]))
    assert [s.count for s in steps[:4]] == [1, 2, 2, 2] and [t for s in steps for t in s.tokens] == y[6:22]
    if use_cache:
        assert sizes[1:4] == [1 + 1 + 4] * 3  # one draft and one candidate block (not 1 + 1 + 2 * 4)
    sizes.clear()
    cfg.block_threshold = 0.4  # both lengths (~0.48 and ~0.53) are that likely: both blocks
    list(Decoder(llama, cfg).stream(y[:6]))
    if use_cache:
        assert sizes[1:4] == [1 + 1 + 2 * 4] * 3


def test_block_threshold_defaults_and_rule(llama):
    """None: 0.8 for speculative on a CPU (chain and trees); 0 (every block) on other devices and for the
    other modes; a value given is kept. The chances of the accept lengths come from the drafts' top probabilities."""
    from sdlm.decode import CPU_BLOCK_THRESHOLD, block_threshold_for, likely_accept_lengths

    spec = GenerationConfig(mode="speculative", block_size=4)
    assert block_threshold_for(spec, "cpu") == Decoder(llama, spec).block_threshold == CPU_BLOCK_THRESHOLD == 0.8
    assert block_threshold_for(spec, "cuda") == 0.0
    assert block_threshold_for(GenerationConfig(mode="speculative", tree="2,1"), "cpu") == CPU_BLOCK_THRESHOLD
    assert block_threshold_for(GenerationConfig(mode="speculative", tree="2,1"), "cuda") == 0.0
    assert block_threshold_for(GenerationConfig(mode="confidence", verify=True), "cpu") == 0.0
    assert block_threshold_for(GenerationConfig(mode="confidence", verify=True, block_threshold=0.6), "cpu") == 0.6
    assert block_threshold_for(GenerationConfig(mode="speculative", block_threshold=0.3), "cuda") == 0.3
    assert block_threshold_for(GenerationConfig(mode="ar"), "cpu") == 0.0
    assert block_threshold_for(GenerationConfig(mode="speculative", tree="2,1", block_threshold=0.5), "cpu") == 0.5
    # drafts 0.9, 0.5: accept 0 with 0.1, 1 with 0.45, 2 with 0.45
    assert likely_accept_lengths([0.9, 0.5], 0.0) == [0, 1, 2]
    assert likely_accept_lengths([0.9, 0.5], 0.4) == [1, 2] and likely_accept_lengths([0.9, 0.5], 0.5) == []
    assert likely_accept_lengths([0.99, 0.99, 0.99], 0.8) == [3] and likely_accept_lengths([0.1], 0.8) == [0]
    assert likely_accept_lengths([], 1.0) == [0]
    for bad in (-0.1, 1.5):
        with pytest.raises(SDLMError, match="block threshold must be in"):
            GenerationConfig(mode="speculative", block_threshold=bad).validate()
    with pytest.raises(SDLMError, match="modes with drafts"):
        GenerationConfig(mode="ar", block_threshold=0.5).validate()


def test_draft_threshold_defaults_by_device(llama):
    """None: 0.1 for speculative's chain of drafts on a CPU, where a forward costs more the more tokens it
    holds, and 0.2 for its draft trees; 0 on other devices, for modes without drafts and for confidence
    --verify (whose output would change with the drafts offered); a value given is kept."""
    from sdlm.decode import CPU_DRAFT_THRESHOLD, CPU_TREE_DRAFT_THRESHOLD, draft_threshold_for, likely_drafts

    spec = GenerationConfig(mode="speculative", block_size=4)
    assert (CPU_DRAFT_THRESHOLD, CPU_TREE_DRAFT_THRESHOLD) == (0.1, 0.2)
    assert draft_threshold_for(spec, "cpu") == Decoder(llama, spec).draft_threshold == CPU_DRAFT_THRESHOLD
    assert draft_threshold_for(GenerationConfig(mode="confidence", verify=True), "cpu") == 0.0
    assert draft_threshold_for(GenerationConfig(mode="confidence", verify=True, draft_threshold=0.2), "cpu") == 0.2
    assert draft_threshold_for(spec, "cuda") == draft_threshold_for(spec, torch.device("cuda", 0)) == 0.0
    tree = GenerationConfig(mode="speculative", block_size=4, tree="2,1")
    assert draft_threshold_for(tree, "cpu") == Decoder(llama, tree).draft_threshold == CPU_TREE_DRAFT_THRESHOLD
    assert draft_threshold_for(tree, "cuda") == 0.0
    assert draft_threshold_for(GenerationConfig(mode="speculative", tree="2,1", draft_threshold=0.0), "cpu") == 0.0
    assert draft_threshold_for(GenerationConfig(mode="ar"), "cpu") == 0.0
    assert draft_threshold_for(GenerationConfig(mode="confidence"), "cpu") == 0.0
    assert draft_threshold_for(GenerationConfig(mode="speculative", draft_threshold=0.0), "cpu") == 0.0
    assert draft_threshold_for(GenerationConfig(mode="speculative", draft_threshold=0.3), "cuda") == 0.3
    # the longest prefix whose product of top probabilities stays strictly above the threshold
    q = torch.tensor([0.9, 0.5, 0.5])
    assert [likely_drafts(q, t) for t in (0.0, 0.3, 0.45, 0.5, 0.9)] == [3, 2, 1, 1, 0]
    assert likely_drafts(torch.tensor([0.9, 0.0, 1.0]), 0.0) == 1 and likely_drafts(torch.tensor([]), 0.1) == 0


@pytest.mark.parametrize("D", [4, 8])
def test_draft_threshold_on_the_trained_model(trained, D):
    # lossless: the model's own output, with fewer drafts per forward than the full chain (the tiny model
    # is confident on these patterns: 0.7 cuts about a third of its drafts, where 0.3 may cut none)
    prompts = [trained.tokenizer(t)["input_ids"] for t in ("abcd abcd ab", "qwe qwe qwe", "hello hello")]
    offered = {}
    for thr in (0.0, 0.7):
        cfg = GenerationConfig(mode="speculative", block_size=D, draft_threshold=thr, max_new_tokens=30)
        offered[thr] = 0
        for p in prompts:
            steps = list(Decoder(trained, cfg).stream(p))
            assert [t for s in steps for t in s.tokens] == hf_greedy(trained, p, 30)
            offered[thr] += sum(s.proposed for s in steps)
            assert_same_generation(Decoder(trained, cfg).generate(p), reference_decode(trained, p, cfg))
    assert offered[0.7] < offered[0.0]


def test_verify_is_for_mode_confidence():
    for mode in ("speculative", "ar"):
        with pytest.raises(SDLMError, match="verify is for mode confidence"):
            GenerationConfig(mode=mode, verify=True).validate()


@pytest.mark.parametrize("kind,per_forward", [("prob", 1), ("entropy", 4)])
def test_scripted_confidence_kind_is_used(llama, monkeypatch, kind, per_forward):
    # two near-equal candidates per slot: the chosen token's probability is ~0.52 (< 0.7) but the
    # entropy confidence 1 - ln2/ln V is ~0.88 (> 0.7), so the two kinds commit different amounts
    y = truth(64)
    scripted(monkeypatch, llama, y, "coinflip")
    cfg = GenerationConfig(mode="confidence", confidence=kind, block_size=4, threshold=0.7, max_new_tokens=12)
    g = Decoder(llama, cfg).generate(y[:6])
    assert g.tokens == y[6:18]
    assert g.accept_histogram == {per_forward: 12 // per_forward}


@pytest.mark.parametrize("mode", ["speculative", "confidence", "ar"])
def test_scripted_eos_inside_accepted_drafts(llama, monkeypatch, mode):
    # eos at the 7th new token: decoding stops right after it even though a step commits more
    y = truth(64)
    eos = next(iter(llama.eos_token_ids()))
    y[6 + 6] = eos
    scripted(monkeypatch, llama, y, "right" if mode != "confidence" else "confident:4")
    g = Decoder(llama, GenerationConfig(mode=mode, block_size=4, threshold=0.5, max_new_tokens=30)).generate(y[:6])
    assert g.tokens == y[6:13] and g.tokens[-1] == eos
    assert g.finish_reason == "eos"


@pytest.mark.parametrize("mode,D,proposed", [("ar", 4, [0, 0, 0]), ("confidence", 4, [4, 4, 4]), ("speculative", 4, [0, 3, 3, 0])])
def test_scripted_stream_steps(llama, monkeypatch, mode, D, proposed):
    # one Step per forward: what it committed, how many block predictions were on offer,
    # and a finish reason on the last step only
    y = truth(64)
    scripted(monkeypatch, llama, y, "right" if mode == "speculative" else "confident:1")
    n = len(proposed) if mode != "speculative" else 10  # 1 + 4 + 4, then 1 left: no room for drafts
    steps = list(Decoder(llama, GenerationConfig(mode=mode, block_size=D, threshold=0.5, max_new_tokens=n)).stream(y[:6]))
    assert [s.proposed for s in steps] == proposed
    assert [t for s in steps for t in s.tokens] == y[6 : 6 + n]
    assert [s.finish_reason for s in steps] == [None] * (len(steps) - 1) + ["length"]


def test_generation_statistics(llama, monkeypatch):
    y = truth(64)
    scripted(monkeypatch, llama, y, "right")
    g = Decoder(llama, GenerationConfig(mode="speculative", block_size=4, max_new_tokens=9)).generate(y[:6])
    assert (g.new_tokens, g.forwards, g.prompt_tokens) == (9, 3, 6)
    assert g.tokens_per_forward == 3.0
    d = g.to_dict()
    assert d["tokens"] == y[6:15] and d["forwards"] == 3 and d["accept_histogram"] == {"1": 1, "4": 2}


def test_scripted_stop_string(llama, monkeypatch):
    # the text is cut before the stop string; tokens stop at the one that completes it
    y = list(b"prompt: hello world. more text here")
    scripted(monkeypatch, llama, y, "right")
    cfg = GenerationConfig(mode="speculative", block_size=4, max_new_tokens=25, stop=("ld.",))
    g = Decoder(llama, cfg).generate(y[:8])
    assert bytes(g.tokens) == b"hello world."
    assert g.text == "hello wor" and g.finish_reason == "stop"


@pytest.mark.parametrize("block_threshold", [0.0, 0.4])
def test_speculative_sampling_decoder_matches_ar_sampling(llama, monkeypatch, block_threshold):
    # Context-free scripted model: the AR distribution for position t is P[t] whatever came before,
    # and block slot j proposes from Q[j] (far from P). Speculative sampling must commit tokens
    # distributed exactly as AR sampling, i.e. position t ~ P[t], with drafts taken from the right
    # block slot and verified against the right position; also where steps carry only some candidate
    # blocks (0.4: one or none, so some steps verify no drafts).
    V = llama.model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    P = torch.full((8, V), -30.0)
    P[:, :3] = torch.randn(8, 3, generator=g) * 1.5
    Q = torch.full((4, V), -30.0)
    Q[:, :3] = torch.randn(4, 3, generator=g) * 1.5

    def step_logits(step, cache=None, cached_len=0):
        n = step.n_logits
        pos, start, blk = step.info.pos[-n:], step.info.start[-n:], step.info.is_block[-n:]
        return torch.stack([Q[int(pos[r] - start[r])] if blk[r] else P[int(pos[r]) + 1] for r in range(n)])

    monkeypatch.setattr(llama, "step_logits", step_logits)
    dec = Decoder(llama, GenerationConfig(mode="speculative", block_size=3, temperature=1.0, max_new_tokens=4, use_cache=False,
                                          draft_threshold=0.0, block_threshold=block_threshold))
    trials = 2000
    counts = torch.zeros(4, 3)
    for seed in range(trials):
        dec.config.seed = seed
        for i, t in enumerate(dec.generate([0, 1]).tokens):  # positions 2..5
            counts[i, t] += 1
    want = torch.softmax(P[2:6, :3], -1)
    assert (counts / trials - want).abs().max() < 0.04


# ---------------------------------------------------------------- 3. modes, limits and errors


def test_every_step_commits_at_least_one_token(sdlm_model):
    for mode in ("ar", "confidence", "speculative"):
        cfg = GenerationConfig(mode=mode, block_size=4, threshold=1.0, max_new_tokens=10)
        steps = list(Decoder(sdlm_model, cfg).stream(random_prompt(1, 5)))
        assert all(s.count >= 1 for s in steps)
        if mode != "speculative":
            assert all(s.count == 1 for s in steps)  # tau = 1: slot-0 decoding, one token per forward


def test_confidence_d1_is_ar(sdlm_model):
    # D = 1: the block [x_{n-1}] at n-1 sees exactly the causal context: next-token prediction
    prompt = random_prompt(4, 9)
    ar = Decoder(sdlm_model, GenerationConfig(mode="ar", max_new_tokens=24)).generate(prompt)
    conf = Decoder(sdlm_model, GenerationConfig(mode="confidence", block_size=1, threshold=0.0, max_new_tokens=24)).generate(prompt)
    assert conf.tokens == ar.tokens


def test_mask_token_is_never_produced(arch):
    # make the mask row the most likely output everywhere: decoders must still never emit it
    sdlm = make_sdlm(arch)
    mask = sdlm.config.mask_token_id
    head = sdlm.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[mask] = 1e4
    head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    for kw in (dict(mode="ar"), dict(mode="confidence", threshold=0.0), dict(mode="speculative"),
               dict(mode="speculative", temperature=1.0, seed=0)):
        g = Decoder(sdlm, GenerationConfig(block_size=4, max_new_tokens=8, **kw)).generate(random_prompt(0, 4))
        assert mask not in g.tokens and len(g.tokens) == 8


def test_untrained_model_modes():
    plain = make_sdlm("qwen2", retrofit=False)
    with pytest.raises(SDLMError, match="retrofit"):
        Decoder(plain, GenerationConfig(mode="confidence"))
    prompt = random_prompt(2, 6)
    ar = Decoder(plain, GenerationConfig(mode="ar", max_new_tokens=12)).generate(prompt).tokens
    spec = Decoder(plain, GenerationConfig(mode="speculative", max_new_tokens=12)).generate(prompt).tokens
    assert plain.is_retrofitted  # speculative added an untrained mask token on the fly
    assert spec == ar


@pytest.mark.parametrize(
    "kw",
    [dict(mode="fast"), dict(confidence="logit"), dict(block_size=0), dict(threshold=1.5), dict(max_new_tokens=0),
     dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(first_token="slot0"),
     dict(mode="speculative", first_token="causal")],
)
def test_bad_settings_are_user_errors(llama, kw):
    with pytest.raises(SDLMError):
        Decoder(llama, GenerationConfig(**kw))


def test_empty_and_too_long_prompts(llama):
    dec = Decoder(llama, GenerationConfig(max_new_tokens=4))
    with pytest.raises(SDLMError, match="empty"):
        dec.generate([])
    with pytest.raises(SDLMError, match="context"):
        dec.generate([1] * 510)  # + block of 4 > 512 positions


def test_encode_prompt(llama):
    assert encode_prompt(llama, "hi!") == list(b"hi!")  # the byte tokenizer has no chat template
    with pytest.raises(SDLMError, match="empty"):
        encode_prompt(llama, "  ")
    with pytest.raises(SDLMError, match="chat template"):
        encode_prompt(llama, "hi", chat=True)


def test_length_limit_is_cut_by_the_context(llama):
    # 500 prompt tokens + D = 4 leave room for 8 new tokens in a 512-position model
    g = Decoder(llama, GenerationConfig(mode="speculative", max_new_tokens=100)).generate(random_prompt(0, 500))
    assert g.new_tokens <= 8 and g.finish_reason in ("length", "eos")


@pytest.mark.parametrize("D, tree", [(4, None), (8, None), (4, "3,2,1")])
def test_speculative_runs_the_lm_head_only_on_rows_it_reads(trained, monkeypatch, D, tree):
    """A speculative step reads the causal rows, then the slots of one candidate block: the LM head runs
    on those rows only, and the tokens, forwards and accept lengths are those of the full logits."""
    prompt = random_prompt(3, 9)
    cfg = GenerationConfig(mode="speculative", block_size=D, max_new_tokens=32, tree=tree, block_threshold=0.0)
    dense = Decoder(trained, cfg)
    dense._plain_head = False  # every row's logits, as step_logits gives them
    want = dense.generate(prompt)
    rows = []
    real = trained.head_logits
    monkeypatch.setattr(trained, "head_logits", lambda h: rows.append(h.shape[0]) or real(h))
    got = Decoder(trained, cfg).generate(prompt)
    assert (got.tokens, got.forwards, got.accept_histogram) == (want.tokens, want.forwards, want.accept_histogram)
    assert want.forwards < want.new_tokens  # drafts were accepted: blocks other than B_0 were read
    nodes = len(dense.tree.parents) if tree else D - 1  # drafts verified per step at most
    assert len(rows) == 2 * got.forwards  # causal rows, then one block's, per step
    assert max(rows) <= nodes + 1 and sum(rows) < got.forwards * (nodes + 1 + (nodes + 1) * D) / 2
    if tree is None:  # a step that carries no block (the block threshold) runs the head once
        rows.clear()
        few = Decoder(trained, GenerationConfig(mode="speculative", block_size=D, max_new_tokens=32, block_threshold=1.0))
        got = few.generate(prompt)
        assert got.tokens == want.tokens and got.forwards < len(rows) < 2 * got.forwards
