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
    """Several training layouts in one row; ``seq`` keeps the samples apart. Fields (T,)."""

    input_ids: torch.Tensor
    info: TokenInfo
    block_labels: torch.Tensor
    slot: torch.Tensor
    ar_labels: torch.Tensor

    @property
    def n_block_targets(self) -> int:
        return int((self.block_labels != IGNORE).sum())

    def select(self, idx: torch.Tensor) -> "Packed":
        i = self.info
        return Packed(
            self.input_ids[idx],
            TokenInfo(i.pos[idx], i.block[idx], i.start[idx], i.seq[idx] if i.seq is not None else None),
            self.block_labels[idx],
            self.slot[idx],
            self.ar_labels[idx],
        )


def pack(layouts: list[TrainingLayout]) -> Packed:
    """Concatenate layouts: clean tokens of every sample first, then every block.

    Block ids are made unique across samples. Putting all clean tokens first lets
    the two-pass step run them as one prefix.
    """
    clean, blocks = [], []
    block_offset = 0
    for s, lay in enumerate(layouts):
        L = lay.n_clean
        seq = torch.full_like(lay.info.pos, s)
        blk = lay.info.block.clone()
        blk[L:] += block_offset
        block_offset += int(lay.info.block[L:].max().item()) + 1 if lay.info.block.shape[0] > L else 0
        info = TokenInfo(lay.info.pos, blk, lay.info.start, seq)
        full = Packed(lay.input_ids, info, lay.block_labels, lay.slot, lay.ar_labels)
        clean.append(full.select(torch.arange(0, L)))
        blocks.append(full.select(torch.arange(L, lay.input_ids.shape[0])))
    parts = clean + blocks
    return Packed(
        torch.cat([p.input_ids for p in parts]),
        TokenInfo.cat([p.info for p in parts]),
        torch.cat([p.block_labels for p in parts]),
        torch.cat([p.slot for p in parts]),
        torch.cat([p.ar_labels for p in parts]),
    )


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


def _metrics(logits: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor, block_size: int, soft=None):
    """Block CE and per-slot metrics. logits (N, V), labels (N,), slots (N,)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    correct = (logits.argmax(-1) == labels).float()
    slot_loss = torch.zeros(block_size).index_add_(0, slots, ce.detach().float().cpu())
    slot_correct = torch.zeros(block_size).index_add_(0, slots, correct.cpu())
    slot_count = torch.zeros(block_size).index_add_(0, slots, torch.ones_like(correct).cpu())
    return ce.mean(), slot_loss, slot_correct, slot_count


def dense_loss(sdlm: SDLM, batch: Packed, block_size: int, ar_loss_weight: float = 0.0) -> LossOutput:
    """Reference: one forward over the packed layout with the dense (T x T) mask."""
    cfg = sdlm.config
    has_block = batch.block_labels != IGNORE
    has_ar = (batch.ar_labels != IGNORE) & (ar_loss_weight > 0)
    keep = torch.nonzero(has_block | has_ar).flatten()  # LM head only where there are targets
    mask = additive(allowed(batch.info, batch.info, cfg.causal_within_block), sdlm.dtype)
    logits = _forward_keep(sdlm, batch.input_ids, batch.info, mask, None, keep)  # (N, V)
    kb, ka = has_block[keep], has_ar[keep]
    block_loss, sl, sc, sn = _metrics(logits[kb], batch.block_labels[keep][kb], batch.slot[keep][kb], block_size)
    loss, ar_loss = block_loss, None
    if ka.any():
        ar_loss = F.cross_entropy(logits[ka].float(), batch.ar_labels[keep][ka])
        loss = loss + ar_loss_weight * ar_loss
    return LossOutput(loss, block_loss.detach(), None if ar_loss is None else ar_loss.detach(), sl, sc, sn, int(kb.sum()))


def two_pass_loss(sdlm: SDLM, batch: Packed, block_size: int) -> LossOutput:
    """Fast path for the gated adapter: clean tokens without gradients, then blocks with them."""
    from transformers import DynamicCache

    cfg = sdlm.config
    is_block = batch.info.is_block
    n_clean = int((~is_block).sum())
    if not bool((~is_block[:n_clean]).all()):
        raise ValueError("two_pass_loss needs all clean tokens before the blocks (use pack())")
    clean, blocks = batch.select(torch.arange(n_clean)), batch.select(torch.arange(n_clean, batch.input_ids.shape[0]))

    cache = DynamicCache()
    with torch.no_grad():  # the clean pass: base model only (gate 0), it just fills the cache
        mask = additive(allowed(clean.info, clean.info), sdlm.dtype)
        _forward_keep(sdlm, clean.input_ids, clean.info, mask, cache, torch.tensor([n_clean - 1]))
    keys = TokenInfo.cat([clean.info, blocks.info])
    mask = additive(allowed(blocks.info, keys, cfg.causal_within_block), sdlm.dtype)
    keep = torch.nonzero(blocks.block_labels != IGNORE).flatten()
    logits = _forward_keep(sdlm, blocks.input_ids, blocks.info, mask, cache, keep)
    block_loss, sl, sc, sn = _metrics(logits, blocks.block_labels[keep], blocks.slot[keep], block_size)
    return LossOutput(block_loss, block_loss.detach(), None, sl, sc, sn, int(keep.numel()))


def _forward_keep(sdlm: SDLM, ids, info: TokenInfo, mask, cache, keep: torch.Tensor) -> torch.Tensor:
    """Forward one packed row; return logits (N, V) at the ``keep`` indices only."""
    if sdlm._takes_logits_to_keep:
        return sdlm.forward(ids[None], info.pos[None], mask, info.is_block[None], cache, keep.to(sdlm.device))[0]
    return sdlm.forward(ids[None], info.pos[None], mask, info.is_block[None], cache)[0, keep]
