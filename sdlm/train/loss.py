"""The SDLM training loss (SPEC §2) with per-slot metrics.

Two implementations of the same number:

- :func:`dense_loss`: one forward over the whole training layout with the dense
  mask from :mod:`sdlm.masks` (the reference; also the path for ``lora`` and
  ``full`` retrofits, where the clean tokens change too).
- :func:`two_pass_loss`: for the block-gated adapter. The clean tokens do not
  depend on the adapter (the gate is 0 there), so they run once without
  gradients and only supply KV; the blocks run with gradients and attend to
  that KV. The backward pass touches block tokens only.

The LM head runs only where there are targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout import IGNORE, TrainingLayout
from ..masks import TokenInfo, additive, allowed
from ..model import SDLM


@dataclass
class Packed:
    """A batch of training layouts, one sample per row, padded. Fields (B, T).

    Each row is the sample's clean tokens padded to the longest clean part,
    then its blocks padded to the most blocks, so that the clean part is one
    prefix for the whole batch (the two-pass step runs it alone). Padding
    tokens have ``seq = -1``: they see only each other, and nothing sees them.
    """

    input_ids: torch.Tensor
    info: TokenInfo
    block_labels: torch.Tensor
    slot: torch.Tensor
    ar_labels: torch.Tensor
    n_clean: int

    @property
    def n_block_targets(self) -> int:
        return int((self.block_labels != IGNORE).sum())

    def columns(self, idx: torch.Tensor) -> "Packed":
        i = self.info
        return Packed(
            self.input_ids[:, idx],
            TokenInfo(i.pos[:, idx], i.block[:, idx], i.start[:, idx], i.seq[:, idx]),
            self.block_labels[:, idx],
            self.slot[:, idx],
            self.ar_labels[:, idx],
            int((idx < self.n_clean).sum()),
        )


def pack(layouts: list[TrainingLayout], pad_id: int = 0) -> Packed:
    """Stack layouts into a padded batch: (B, L_max + K_max * D)."""
    L = max(l.n_clean for l in layouts)
    K = max(l.input_ids.shape[0] - l.n_clean for l in layouts)
    B, T = len(layouts), L + K
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    block = torch.full((B, T), -1, dtype=torch.long)
    start = torch.full((B, T), -1, dtype=torch.long)
    seq = torch.full((B, T), -1, dtype=torch.long)
    block_labels = torch.full((B, T), IGNORE, dtype=torch.long)
    slot = torch.full((B, T), -1, dtype=torch.long)
    ar_labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, lay in enumerate(layouts):
        n, m = lay.n_clean, lay.input_ids.shape[0] - lay.n_clean
        for dst, src in ((slice(0, n), slice(0, n)), (slice(L, L + m), slice(n, n + m))):
            ids[b, dst] = lay.input_ids[src]
            pos[b, dst] = lay.info.pos[src]
            block[b, dst] = lay.info.block[src]
            start[b, dst] = lay.info.start[src]
            seq[b, dst] = 0
            block_labels[b, dst] = lay.block_labels[src]
            slot[b, dst] = lay.slot[src]
            ar_labels[b, dst] = lay.ar_labels[src]
    # padding: a block id of its own per pad column keeps pads out of every real block
    pad = seq < 0
    block = torch.where(pad & (torch.arange(T) >= L), -2 - torch.arange(T).expand(B, T), block)
    block = torch.where(pad & (torch.arange(T) < L), torch.full_like(block, -1), block)
    return Packed(ids, TokenInfo(pos, block, start, seq), block_labels, slot, ar_labels, L)


@dataclass
class LossOutput:
    loss: torch.Tensor
    """The optimised scalar: mean block CE (+ ar_loss_weight x mean AR CE)."""
    block_loss: torch.Tensor
    ar_loss: torch.Tensor | None
    slot_loss_sum: torch.Tensor  # (D,) summed CE per slot
    slot_correct: torch.Tensor  # (D,) top-1 hits per slot
    slot_count: torch.Tensor  # (D,) targets per slot
    n_block_targets: int


def _metrics(logits: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor, block_size: int):
    """Block CE and per-slot metrics. logits (N, V), labels (N,), slots (N,)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    correct = (logits.argmax(-1) == labels).float()
    slot_loss = torch.zeros(block_size).index_add_(0, slots, ce.detach().float().cpu())
    slot_correct = torch.zeros(block_size).index_add_(0, slots, correct.cpu())
    slot_count = torch.zeros(block_size).index_add_(0, slots, torch.ones_like(correct).cpu())
    return ce.mean(), slot_loss, slot_correct, slot_count


def dense_loss(sdlm: SDLM, batch: Packed, block_size: int, ar_loss_weight: float = 0.0) -> LossOutput:
    """Reference: one forward over the whole training layout with the dense (T x T) mask."""
    cfg = sdlm.config
    has_block = batch.block_labels != IGNORE  # (B, T)
    has_ar = (batch.ar_labels != IGNORE) & (ar_loss_weight > 0)
    keep = torch.nonzero((has_block | has_ar).any(0)).flatten()  # LM head only where some row has a target
    mask = additive(allowed(batch.info, batch.info, cfg.causal_within_block), sdlm.dtype)  # (B, 1, T, T)
    logits = _forward_keep(sdlm, batch.input_ids, batch.info, mask, None, keep)  # (B, N, V)
    kb, ka = has_block[:, keep], has_ar[:, keep]
    block_loss, sl, sc, sn = _metrics(logits[kb], batch.block_labels[:, keep][kb], batch.slot[:, keep][kb], block_size)
    loss, ar_loss = block_loss, None
    if ka.any():
        ar_loss = F.cross_entropy(logits[ka].float(), batch.ar_labels[:, keep][ka])
        loss = loss + ar_loss_weight * ar_loss
    return LossOutput(loss, block_loss.detach(), None if ar_loss is None else ar_loss.detach(), sl, sc, sn, int(kb.sum()))


def two_pass_loss(sdlm: SDLM, batch: Packed, block_size: int) -> LossOutput:
    """Fast path for the gated adapter: clean tokens without gradients, then blocks with them."""
    from transformers import DynamicCache

    cfg = sdlm.config
    L, T = batch.n_clean, batch.input_ids.shape[1]
    clean, blocks = batch.columns(torch.arange(L)), batch.columns(torch.arange(L, T))

    cache = DynamicCache()
    with torch.no_grad():  # the clean pass: base model only (gate 0), it just fills the cache
        mask = additive(allowed(clean.info, clean.info), sdlm.dtype)
        _forward_keep(sdlm, clean.input_ids, clean.info, mask, cache, torch.tensor([L - 1]))
    keys = TokenInfo.cat([clean.info, blocks.info])
    mask = additive(allowed(blocks.info, keys, cfg.causal_within_block), sdlm.dtype)  # (B, 1, K, L+K)
    has_block = blocks.block_labels != IGNORE
    keep = torch.nonzero(has_block.any(0)).flatten()
    logits = _forward_keep(sdlm, blocks.input_ids, blocks.info, mask, cache, keep)  # (B, N, V)
    kb = has_block[:, keep]
    block_loss, sl, sc, sn = _metrics(logits[kb], blocks.block_labels[:, keep][kb], blocks.slot[:, keep][kb], block_size)
    return LossOutput(block_loss, block_loss.detach(), None, sl, sc, sn, int(kb.sum()))


def _forward_keep(sdlm: SDLM, ids, info: TokenInfo, mask, cache, keep: torch.Tensor) -> torch.Tensor:
    """Forward a (B, T) batch; return logits (B, N, V) at the ``keep`` columns only."""
    if sdlm._takes_logits_to_keep:
        return sdlm.forward(ids, info.pos, mask, info.is_block, cache, keep.to(sdlm.device))
    return sdlm.forward(ids, info.pos, mask, info.is_block, cache)[:, keep]
