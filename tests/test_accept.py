"""Acceptance rules (sdlm/accept.py) and sampling (sdlm/sampling.py), driven by scripted numbers."""

from __future__ import annotations

import math

import pytest
import torch

from sdlm.accept import confident_prefix, cut_at_eos, greedy_accept, speculative_accept
from sdlm.sampling import Sampler, confidence, sample

# ---------------------------------------------------------------- confident_prefix (SPEC §3.1)


def conf(*xs):
    return torch.tensor(xs)


@pytest.mark.parametrize(
    "c,tau,expected",
    [
        (conf(0.95, 0.99, 0.97, 0.91), 0.9, 4),  # all above: the whole block
        (conf(0.10, 0.20, 0.30, 0.40), 0.9, 1),  # none above: still the first slot (never fewer than AR)
        (conf(0.95, 0.99, 0.50, 0.97), 0.9, 2),  # a gap: the prefix stops at the gap, later slots don't count
        (conf(0.95, 0.20, 0.99, 0.99), 0.9, 1),
        (conf(1.0, 1.0, 1.0), 1.0, 1),  # tau = 1: nothing is strictly above -> slot-0 decoding
        (conf(1e-6, 1e-6, 1e-6), 0.0, 3),  # tau = 0: every positive confidence is taken -> D
        (conf(0.9, 0.9, 0.95), 0.9, 1),  # strictly above: equal to tau is not enough
        (conf(0.95, 0.9, 0.95), 0.9, 1),
        (conf(0.3), 0.5, 1),  # D = 1
    ],
)
def test_confident_prefix(c, tau, expected):
    assert confident_prefix(c, tau) == expected


# ---------------------------------------------------------------- greedy_accept (SPEC §3.2)


@pytest.mark.parametrize(
    "drafts,targets,a",
    [
        ([5, 6, 7], [9, 6, 7, 8], 0),  # first draft wrong: only the bonus token t_0
        ([5, 6, 7], [5, 6, 0, 8], 2),  # partial
        ([5, 6, 7], [5, 6, 7, 8], 3),  # all accepted: bonus t_3
        ([5, 6, 7], [5, 0, 7, 8], 1),  # a later match after a miss does not count
        ([], [4], 0),  # first step: no drafts
    ],
)
def test_greedy_accept(drafts, targets, a):
    assert greedy_accept(drafts, targets) == a


def test_greedy_accept_needs_one_target_more():
    with pytest.raises(ValueError):
        greedy_accept([1, 2], [1, 2])
    with pytest.raises(ValueError):
        greedy_accept([1, 2], [1, 2, 3, 4])


# ---------------------------------------------------------------- speculative_accept (SPEC §3.2, sampling)


def dist(*xs):
    t = torch.tensor(xs, dtype=torch.float32)
    return t / t.sum()


def test_draft_more_likely_under_p_is_always_accepted():
    q = torch.stack([dist(0.5, 0.5, 0, 0), dist(0.25, 0.25, 0.25, 0.25)])
    p = torch.stack([dist(0.7, 0.3, 0, 0), dist(0.1, 0.2, 0.3, 0.4), dist(0, 0, 0, 1)])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        # p(d)/q(d) = 1.4 and 1.6 >= 1: accepted; the bonus comes from p_2, one-hot on 3
        assert speculative_accept([0, 3], q, p, g) == (2, 3)


def test_draft_impossible_under_p_is_always_rejected():
    q = dist(0.5, 0.5, 0, 0)[None]
    p = torch.stack([dist(0, 0.5, 0.5, 0), dist(1, 0, 0, 0)])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        # p(0) = 0: rejected; residual max(0, p - q) = (0, 0, 0.5, 0): token 1 (p = q there) never drawn
        assert speculative_accept([0], q, p, g) == (0, 2)


def test_rejection_at_the_second_draft():
    q = torch.stack([dist(1, 0, 0), dist(0, 1, 0)])
    p = torch.stack([dist(1, 0, 0), dist(0, 0, 1), dist(1, 0, 0)])
    assert speculative_accept([0, 1], q, p, torch.Generator().manual_seed(0)) == (1, 2)


def test_no_drafts_samples_from_p0():
    p = dist(0, 0, 1, 0)[None]
    assert speculative_accept([], None, p, torch.Generator().manual_seed(0)) == (0, 2)


def test_speculative_sampling_preserves_the_distribution(seed=0):
    # Drafts drawn from q, accepted/resampled against p: the committed tokens follow p exactly.
    V, trials = 6, 20_000
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    p = torch.softmax(torch.randn(3, V, generator=g) * 1.5, -1)
    drafts = torch.multinomial(q, trials, replacement=True, generator=g).T  # (trials, 2)
    first = torch.zeros(V)
    second, n_second = torch.zeros(V), 0
    accepted = 0
    for d in drafts.tolist():
        a, nxt = speculative_accept(d, q, p, g)
        committed = d[:a] + [nxt]
        first[committed[0]] += 1
        if len(committed) > 1:  # the first draft was kept; the second token must then follow p_1
            second[committed[1]] += 1
            n_second += 1
        accepted += a
    assert (first / trials - p[0]).abs().max() < 0.02
    assert n_second > 2000 and (second / n_second - p[1]).abs().max() < 0.03
    # the acceptance rate of the first draft is sum_x min(p, q), as theory says
    assert abs(n_second / trials - torch.minimum(p[0], q[0]).sum().item()) < 0.02
    assert accepted > 0


# ---------------------------------------------------------------- cut_at_eos


@pytest.mark.parametrize(
    "tokens,remaining,expected",
    [
        ([1, 2, 9, 3], 10, ([1, 2, 9], "eos")),  # eos in the middle: kept, the rest dropped
        ([1, 2, 9], 10, ([1, 2, 9], "eos")),  # eos at the end
        ([1, 2, 3, 4], 2, ([1, 2], "length")),  # length limit inside the step
        ([1, 2], 2, ([1, 2], "length")),  # exactly the limit
        ([1, 2], 5, ([1, 2], None)),  # nothing to stop
        ([1, 9, 2], 1, ([1], "length")),  # the limit comes before the eos
        ([1, 9, 2], 2, ([1, 9], "eos")),  # eos on the last allowed token
        ([8, 2], 5, ([8], "eos")),  # any of several eos ids
    ],
)
def test_cut_at_eos(tokens, remaining, expected):
    assert cut_at_eos(tokens, {9, 8}, remaining) == expected


# ---------------------------------------------------------------- sampling


def test_greedy_choice_and_probs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    toks, p = Sampler().choose(logits)
    assert toks.tolist() == [1, 0]
    assert torch.allclose(p, torch.softmax(logits, -1))  # confidences use the plain softmax


def test_temperature_scales_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert torch.allclose(Sampler(temperature=0.5).probs(logits), torch.softmax(logits / 0.5, -1))


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    p = Sampler(temperature=1.0, top_k=2).probs(logits)
    assert (p[0] > 0).nonzero().flatten().tolist() == [1, 4]
    assert torch.allclose(p.sum(-1), torch.ones(1))
    assert (Sampler(temperature=1.0, top_k=100).probs(logits) > 0).all()  # k > V: nothing dropped


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    kept = lambda top_p: (Sampler(temperature=1.0, top_p=top_p).probs(logits)[0] > 0).nonzero().flatten().tolist()
    assert kept(0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(0.7) == [1, 3]  # 0.5 + 0.3 >= 0.7
    assert kept(0.8) == [1, 3]
    assert kept(0.81) == [0, 1, 3]
    assert kept(0.01) == [1]  # the most likely token always stays
    assert kept(1.0) == [0, 1, 2, 3]
    p = Sampler(temperature=1.0, top_p=0.7).probs(logits)[0]
    assert torch.allclose(p[[1, 3]], torch.tensor([0.5, 0.3]) / 0.8)


def test_suppressed_token_is_never_produced():
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0]] * 4)  # id 2 (the mask) would win everywhere
    for s in (Sampler(suppress=(2,)), Sampler(temperature=1.0, suppress=(2,)), Sampler(temperature=2.0, top_k=3, suppress=(2,))):
        p = s.probs(logits)
        assert (p[:, 2] == 0).all()
        for seed in range(50):
            toks, _ = s.choose(logits, torch.Generator().manual_seed(seed))
            assert 2 not in toks.tolist()


def test_sample_is_reproducible_with_a_generator():
    p = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), -1)
    a = sample(p, torch.Generator().manual_seed(4))
    b = sample(p, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_confidences():
    V = 8
    onehot = torch.zeros(1, V)
    onehot[0, 3] = 1
    uniform = torch.full((1, V), 1 / V)
    mixed = torch.softmax(torch.randn(20, V, generator=torch.Generator().manual_seed(0)) * 3, -1)
    toks = mixed.argmax(-1)
    assert confidence(onehot, torch.tensor([3]), "entropy").item() == pytest.approx(1.0)
    assert confidence(uniform, torch.tensor([0]), "entropy").item() == pytest.approx(0.0, abs=1e-6)
    ent = confidence(mixed, toks, "entropy")
    assert ((ent >= 0) & (ent <= 1)).all()
    h = -(mixed * mixed.log()).sum(-1)
    assert torch.allclose(ent, 1 - h / math.log(V), atol=1e-6)
    assert torch.equal(confidence(mixed, toks, "prob"), mixed.max(-1).values)
    assert confidence(onehot, torch.tensor([3]), "prob").item() == 1.0
    with pytest.raises(ValueError):
        confidence(mixed, toks, "margin")
