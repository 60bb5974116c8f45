"""The block attention rule, defined once (SPEC §2).

Every token in a forward pass is described by three integers:

- ``pos``:   its position id (clean tokens and blocks share the position axis);
- ``block``: ``-1`` for a clean (causal) token, otherwise an id that is unique
  per block within the forward pass;
- ``start``: for a block token, the position ``p`` of the block's slot 0 (the
  copy of the last committed token); ignored for clean tokens.

Optionally ``seq`` separates packed samples: tokens of different samples never
see each other. A row of samples that begin with the same tokens (a chat template's
system prompt) may hold those tokens once, with ``seq = SHARED``: every sample's
tokens see them (under the rules below), and they see only each other.

The rule, for query ``q`` and key ``k``:

- clean -> clean: causal, ``pos[k] <= pos[q]``;
- block -> clean: ``pos[k] < start[q]`` (the token at ``start`` itself is seen
  through the block's own slot 0, never as the clean original);
- block -> same block: all (bidirectional), or ``pos[k] <= pos[q]`` with
  ``causal_within_block``;
- never clean -> block, never block -> another block.

Training (:mod:`sdlm.layout`), every decoding mode (:mod:`sdlm.decode`) and the
tests build their masks from :func:`allowed`, so the views cannot drift apart.

A model whose layers see only part of the past (a sliding window, as in Mistral, Gemma 2 and 3,
Phi-3 or Qwen2 with windows; chunked attention, as in Llama 4) applies its :class:`Window` on top
of the rule, on the same positions, for every kind of token: :func:`layer_masks` gives the mask
each kind of layer takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


SHARED = -2
"""``seq`` of a shared prefix: tokens that every sample of the row (``seq`` >= 0) sees."""


@dataclass
class TokenInfo:
    """Per-token descriptors of a forward pass; every field has shape (..., T)."""

    pos: torch.Tensor
    block: torch.Tensor
    start: torch.Tensor
    seq: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pos.shape[-1]

    @staticmethod
    def clean(positions: torch.Tensor) -> "TokenInfo":
        """Descriptors of plain causal tokens at ``positions``."""
        minus = torch.full_like(positions, -1)
        return TokenInfo(positions, minus, minus.clone())

    @staticmethod
    def cat(parts: list["TokenInfo"]) -> "TokenInfo":
        seqs = [p.seq for p in parts]
        seq = None
        if any(s is not None for s in seqs):
            seq = torch.cat([s if s is not None else torch.zeros_like(p.pos) for s, p in zip(seqs, parts)], -1)
        return TokenInfo(
            torch.cat([p.pos for p in parts], -1),
            torch.cat([p.block for p in parts], -1),
            torch.cat([p.start for p in parts], -1),
            seq,
        )

    def to(self, device: torch.device | str) -> "TokenInfo":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TokenInfo(mv(self.pos), mv(self.block), mv(self.start), mv(self.seq))

    @property
    def is_block(self) -> torch.Tensor:
        return self.block >= 0


def allowed(q: TokenInfo, k: TokenInfo, causal_within_block: bool = False) -> torch.Tensor:
    """Boolean attention matrix, True = ``q`` may attend to ``k``.

    Shapes: ``q`` fields (..., Tq), ``k`` fields (..., Tk) -> (..., Tq, Tk).
    """
    seq = q.seq is not None and k.seq is not None
    return _rule(
        q.pos[..., :, None], q.block[..., :, None], q.start[..., :, None],
        k.pos[..., None, :], k.block[..., None, :], causal_within_block,
        q.seq[..., :, None] if seq else None, k.seq[..., None, :] if seq else None,
    )


def block_mask(q: TokenInfo, k: TokenInfo, causal_within_block: bool = False, block_size: int = 128):
    """The same rule as a flex-attention ``BlockMask`` over batched fields ``q`` (B, Tq), ``k`` (B, Tk).

    Flex attention skips the tiles of ``block_size`` x ``block_size`` that the rule hides entirely
    (most of the block part in training) and never builds the dense (Tq x Tk) mask.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    seq = q.seq is not None and k.seq is not None

    def mask_mod(b, h, qi, ki):
        return _rule(
            q.pos[b, qi], q.block[b, qi], q.start[b, qi], k.pos[b, ki], k.block[b, ki], causal_within_block,
            q.seq[b, qi] if seq else None, k.seq[b, ki] if seq else None,
        )

    B, Tq = q.pos.shape
    return create_block_mask(mask_mod, B, None, Tq, k.pos.shape[-1], device=q.pos.device, BLOCK_SIZE=block_size)


def _rule(q_pos, q_block, q_start, k_pos, k_block, causal_within_block, q_seq=None, k_seq=None):
    """The rule on broadcastable descriptors (the one definition :func:`allowed` and :func:`block_mask` share)."""
    q_clean, k_clean = q_block < 0, k_block < 0
    clean_to_clean = q_clean & k_clean & (k_pos <= q_pos)
    block_to_clean = ~q_clean & k_clean & (k_pos < q_start)
    same_block = ~q_clean & (k_block == q_block)
    if causal_within_block:
        same_block = same_block & (k_pos <= q_pos)
    ok = clean_to_clean | block_to_clean | same_block
    if q_seq is not None:
        ok = ok & ((q_seq == k_seq) | ((k_seq == SHARED) & (q_seq >= 0)))
    return ok


@dataclass(frozen=True)
class Window:
    """How far back a kind of attention layer sees, on top of the rule (the masks ``transformers`` builds
    for it, on positions instead of cache indices, which are the same for committed tokens).

    ``sliding`` W: a query at position ``q`` sees keys at ``k > q - W`` (itself and the W - 1 before it).
    ``chunk`` C: a query sees keys in its own chunk of C positions, ``k // C == q // C``.
    """

    sliding: int | None = None
    chunk: int | None = None

    def binds(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
        """Whether the window may hide a key the rule shows, for queries at ``q_pos`` over keys at ``k_pos``
        (any shapes). False means the rule's mask alone is this layer's mask."""
        if q_pos.numel() == 0 or k_pos.numel() == 0:
            return False
        top = int(q_pos.max())
        if self.sliding is not None and top - int(k_pos.min()) >= self.sliding:
            return True
        return self.chunk is not None and top >= self.chunk  # positions start at 0: all in chunk 0 otherwise

    def unseen_before(self, q_min):
        """The positions below this one are hidden from every query at ``q_min`` or later (an int, or a
        tensor of them): the keys a cache no longer needs."""
        bounds = []
        if self.sliding is not None:
            bounds.append(q_min - self.sliding + 1)
        if self.chunk is not None:
            bounds.append(q_min // self.chunk * self.chunk)
        if isinstance(q_min, torch.Tensor):
            out = torch.zeros_like(q_min)
            for b in bounds:
                out = torch.maximum(out, b)
            return out
        return max([0, *bounds])

    def keep(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(..., Tq, Tk) boolean: True where the window lets a query at ``q_pos`` (..., Tq) see a key at
        ``k_pos`` (..., Tk)."""
        q, k = q_pos[..., :, None], k_pos[..., None, :]
        ok = torch.ones(torch.broadcast_shapes(q.shape, k.shape), dtype=torch.bool, device=q_pos.device)
        if self.sliding is not None:
            ok &= k > q - self.sliding
        if self.chunk is not None:
            ok &= torch.div(k, self.chunk, rounding_mode="floor") == torch.div(q, self.chunk, rounding_mode="floor")
        return ok


@dataclass(frozen=True)
class LayerWindows:
    """The windows of a model's kinds of attention layers, and how the model takes their masks.

    ``windows`` maps a ``transformers`` layer type (``full_attention``, ``sliding_attention``,
    ``chunked_attention``) to its window (None: the whole past). ``keyed``: the model takes a dict of
    masks by layer type (models whose config lists ``layer_types``); otherwise one mask for every layer,
    under the key ``None``.
    """

    windows: dict
    keyed: bool = False

    @property
    def smallest(self) -> int | None:
        """The shortest reach of any layer in positions (a window's or a chunk's size), None if every
        layer sees the whole past."""
        sizes = [n for w in self.windows.values() if w is not None for n in (w.sliding, w.chunk) if n is not None]
        return min(sizes) if sizes else None

    def binding(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
        """Whether any layer's window may hide a key the rule shows, for these positions."""
        return any(w is not None and w.binds(q_pos, k_pos) for w in self.windows.values())


FULL = LayerWindows({None: None})
"""Every layer sees the whole past (most models): the rule's mask is every layer's mask."""


def layer_masks(ok: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, windows: LayerWindows,
                dtype: torch.dtype, dropped: dict | None = None):
    """The additive masks a model's layers take (see :func:`additive`) for the rule's boolean ``ok``
    (..., Tq, Tk) of queries at ``q_pos`` (..., Tq) over keys at ``k_pos`` (..., Tk): one mask where no
    layer's window hides anything more for these positions (every layer takes it as given, keyed or
    not) or where every layer's is the same, else one per kind of layer (a dict by layer type for a keyed
    model). ``dropped``: keys no longer in the cache of a kind of layer, from the front (by kind, as in
    ``windows``; :func:`sdlm.kvcache.drop_front`): that kind's mask leaves out their columns."""
    dropped = {kind: d for kind, d in (dropped or {}).items() if d}
    binding = {kind: w for kind, w in windows.windows.items()
               if w is not None and (kind in dropped or w.binds(q_pos, k_pos))}
    if not binding:
        return additive(ok, dtype)
    made: dict[tuple[Window | None, int], torch.Tensor] = {}

    def mask(w: Window | None, d: int) -> torch.Tensor:
        if (w, d) not in made:
            m = ok if w is None else ok & w.keep(q_pos, k_pos)
            made[w, d] = additive(m[..., d:], dtype)
        return made[w, d]

    if not windows.keyed:
        return mask(binding[None], dropped.get(None, 0))
    masks = {kind: mask(binding.get(kind), dropped.get(kind, 0)) for kind in windows.windows}
    return masks if len(made) > 1 else next(iter(made.values()))  # one mask for all: a tensor, as every model takes


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Tq, Tk) or (Tq, Tk) boolean -> (B, 1, Tq, Tk) float mask for HF models.

    transformers uses a 4D mask as given. The additive float form (0 = attend,
    dtype-min = blocked) behaves the same under ``eager`` and ``sdpa``; the
    boolean form does not under ``eager``, so this is the one convention.
    """
    if mask.dim() == 2:
        mask = mask[None]
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[:, None]  # (B, 1, Tq, Tk)
