"""Acceptance rules: how many proposed tokens a decoding step commits (SPEC §3.1-3.2).

Pure functions of predictions; the decoder supplies them, the tests script them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .sampling import sample


def confident_prefix(conf: torch.Tensor, threshold: float) -> int:
    """Length of the longest prefix with every confidence strictly above ``threshold``, clamped to [1, D].

    The first slot is always taken, so a step never commits fewer tokens than AR;
    with ``threshold >= 1`` exactly one token is taken per step.
    """
    return max(1, min(confident_run(conf, threshold), conf.shape[0]))


def confident_run(conf: torch.Tensor, threshold: float) -> int:
    """Length of the longest prefix with every confidence strictly above ``threshold`` (0 to all of it):
    :func:`confident_prefix` without the clamp, for slots on offer beyond an already committed token."""
    return int((conf > threshold).long().cumprod(0).sum())


def greedy_accept(drafts: Sequence[int], targets: Sequence[int]) -> int:
    """Number ``a`` of leading drafts equal to the model's own greedy choice.

    ``targets[i]`` is the causal greedy token at the position of ``drafts[i]``
    (valid while all earlier drafts were accepted). The step commits
    ``drafts[:a] + [targets[a]]``, so len(targets) must be len(drafts) + 1.
    """
    if len(targets) != len(drafts) + 1:
        raise ValueError("need one target more than drafts (the bonus token)")
    a = 0
    while a < len(drafts) and int(drafts[a]) == int(targets[a]):
        a += 1
    return a


def speculative_accept(
    drafts: Sequence[int],
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling: returns (accepted drafts a, the token committed after them).

    q: (k, V) draft distributions the drafts were drawn from; p: (k+1, V) the
    model's own (warped) AR distributions at the draft positions and one after.
    Draft i is kept with probability min(1, p_i(d)/q_i(d)); on the first
    rejection the next token is drawn from the residual max(0, p_i - q_i)
    (renormalised), otherwise from p_k. The committed tokens are then
    distributed exactly as AR sampling from p.
    """
    k = len(drafts)
    for i in range(k):
        d = int(drafts[i])
        ratio = (p[i, d] / q[i, d].clamp_min(1e-30)).clamp(max=1.0)
        u = torch.rand((), generator=generator)
        if u.item() < ratio.item():
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[i]
        return i, int(sample(residual[None], generator)[0])
    return k, int(sample(p[k][None], generator)[0])


def cut_at_eos(tokens: Sequence[int], eos_ids: Iterable[int], remaining: int) -> tuple[list[int], str | None]:
    """Cut committed tokens after the first end-of-sequence token and at the length limit.

    Returns the tokens kept and the finish reason (``eos``, ``length`` or None).
    The end-of-sequence token itself is kept, as ``generate`` does.
    """
    eos = set(eos_ids)
    out: list[int] = []
    for t in tokens:
        if len(out) == remaining:
            return out, "length"
        out.append(int(t))
        if int(t) in eos:
            return out, "eos"
    return out, ("length" if len(out) >= remaining else None)
