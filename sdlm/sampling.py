"""Logits -> tokens, probabilities and confidences.

Greedy (temperature 0) picks the argmax; otherwise tokens are drawn from the
temperature / top-k / top-p warped distribution. The mask token (and any other
id in ``suppress``) is never produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    suppress: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.suppress:
            logits = logits.clone()
            logits[..., list(self.suppress)] = -math.inf
        return logits

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> (N, V) probabilities of the distribution tokens are drawn from.

        Greedy decoding reports the plain softmax (temperature 1), which is what
        the ``prob`` and ``entropy`` confidences are measured on.
        """
        logits = self._masked(logits)
        if self.greedy:
            return torch.softmax(logits, -1)
        logits = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            drop_sorted = (cum - torch.softmax(sorted_logits, -1)) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            logits = logits.masked_fill(drop, -math.inf)
        return torch.softmax(logits, -1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) logits -> tokens (N,) and the probabilities (N, V) they were chosen from."""
        p = self.probs(logits)
        if self.greedy:
            return self._masked(logits).argmax(-1), p
        return sample(p, generator), p


    def ranked(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """(N, V) logits -> (N, k) the ``k`` most likely tokens of each row, best first (greedy drafts)."""
        return self._masked(logits).topk(k, -1).indices

    def ranked_with_probs(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`ranked`, and each token's probability under the plain softmax (temperature 1) of its row:
        what a draft tree's threshold reads. (N, k) each."""
        logits = self._masked(logits)
        idx = logits.topk(k, -1).indices  # ranked as :meth:`ranked` ranks them
        return idx, torch.softmax(logits, -1).gather(-1, idx)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of (N, V) probabilities (on the generator's device, the CPU)."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).flatten().to(probs.device)


def confidence(probs: torch.Tensor, tokens: torch.Tensor, kind: str = "prob") -> torch.Tensor:
    """Confidence of each chosen token, (N, V), (N,) -> (N,) in [0, 1].

    ``prob``: the probability of the chosen token; ``entropy``: 1 - H(p) / log V.
    """
    if kind == "prob":
        return probs.gather(-1, tokens[:, None].to(probs.device))[:, 0]
    if kind == "entropy":
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        return 1.0 - ent / math.log(probs.shape[-1])
    raise ValueError(f"unknown confidence {kind!r}: use 'prob' or 'entropy'")
