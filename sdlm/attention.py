"""Attention for the training step of the block-gated adapter (SPEC §2): block attention in two
exact pieces, and several samples in one row.

In the block pass of one sample, the queries are the sample's K blocks of D tokens, one after
another, and the keys are its L clean tokens followed by those same K·D block tokens. The block rule
(:mod:`sdlm.masks`) lets block b see the clean keys before its start and its own D tokens, nothing
else. Of the dense (K·D) × (L + K·D) mask, the block part is therefore block-diagonal: a dense kernel
spends most of its work there on scores it throws away.

:func:`block_attention` computes the same attention as two pieces sharing one softmax: every query
against the L clean keys (masked by the rule, through :attr:`BlockPart.clean_bias`), and each
block's D queries against its own D keys. That is (K·D) × (L + D) scores instead of
(K·D) × (L + K·D), in plain matrix products, with the backward pass written out.

The CPU training step puts a micro-batch's samples one after another in a single row, so that every
linear layer runs once over all of them. Attention stays per sample: the clean pass is causal within
each sample (:class:`CausalSegments`), and the block pass has a :class:`BlockPart` per sample, over
that sample's clean keys only.

A model takes these through :func:`use_block_attention`; :meth:`sdlm.model.SDLM.forward` runs them
when it is given a :class:`BlockLayout` or :class:`CausalSegments` instead of a 4D mask. Any other
forward of the same model (decoding, evaluation) runs sdpa as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from .errors import SDLMError
from .masks import TokenInfo, additive, allowed

BLOCK_ATTENTION = "sdlm_blocks"
_current: contextvars.ContextVar["BlockLayout | None"] = contextvars.ContextVar("sdlm_block_layout", default=None)


@dataclass
class BlockPart:
    """One sample's share of a block pass: its queries are columns ``b0:b1`` of the block part, its
    clean keys columns ``c0:c1`` of the clean part; ``clean_bias`` (B, 1, b1-b0, c1-c0) is the additive
    mask of those queries over those keys (0 = attend), from the block rule."""

    c0: int
    c1: int
    b0: int
    b1: int
    clean_bias: torch.Tensor


@dataclass
class BlockLayout:
    """The shape of a block pass: each part's blocks of ``block_size`` queries over its clean keys, then
    over themselves. One part for rows of one sample each; a part per sample for samples packed one
    after another in a single row (:func:`block_layout`)."""

    parts: list[BlockPart]
    block_size: int
    causal_within_block: bool = False
    clean_needs_grad: bool = True
    """False: the clean keys and values need no gradient (they come from a pass without one), so the
    backward pass skips their two products."""

    def to(self, device) -> "BlockLayout":
        parts = [BlockPart(p.c0, p.c1, p.b0, p.b1, p.clean_bias.to(device)) for p in self.parts]
        return BlockLayout(parts, self.block_size, self.causal_within_block, self.clean_needs_grad)


@dataclass
class CausalSegments:
    """The clean pass of samples packed one after another in a single row: plain causal attention
    within each ``(start, end)`` column range, nothing across them (:func:`causal_segments`)."""

    bounds: list[tuple[int, int]]

    def to(self, device) -> "CausalSegments":
        return self


def _runs(seq: torch.Tensor) -> list[tuple[int, int]] | None:
    """The column ranges of equal ``seq`` (T,) values, or None if a value is negative (padding) or
    appears in two separate ranges."""
    if seq.numel() == 0 or bool((seq < 0).any()):
        return None
    cuts = (torch.nonzero(seq[1:] != seq[:-1]).flatten() + 1).tolist()
    edges = [0, *cuts, seq.numel()]
    runs = list(zip(edges[:-1], edges[1:]))
    if len({int(seq[a]) for a, _ in runs}) != len(runs):
        return None
    return runs


def causal_segments(clean: TokenInfo) -> CausalSegments | None:
    """The :class:`CausalSegments` of a clean part (fields (1, L)) that holds whole samples one after
    another, each at positions 0, 1, ..., with no padding; None for any other shape."""
    if clean.pos.shape[0] != 1 or clean.seq is None or bool((clean.block >= 0).any()):
        return None
    runs = _runs(clean.seq[0])
    if runs is None:
        return None
    for a, b in runs:
        if not torch.equal(clean.pos[0, a:b], torch.arange(b - a, device=clean.pos.device)):
            return None
    return CausalSegments(runs)


def _whole_blocks(block: torch.Tensor, block_size: int) -> bool:
    """Block ids (B, T) are 0, 0, .., 1, 1, .., each ``block_size`` long, then padding (negative ids)
    in whole blocks."""
    B, T = block.shape
    if T % block_size:
        return False
    real = block >= 0
    col_block = torch.arange(T, device=block.device) // block_size
    if not bool(((block == col_block) | ~real).all()):
        return False
    whole = real.view(B, -1, block_size)
    return bool((whole.all(-1) | ~whole.any(-1)).all())


def block_layout(q: TokenInfo, clean: TokenInfo, block_size: int, causal_within_block: bool,
                 dtype: torch.dtype) -> BlockLayout | None:
    """The :class:`BlockLayout` of block queries ``q`` (fields (B, K·D)) over clean keys ``clean`` (fields
    (B, L)) followed by the same block tokens, or None where the batch is not of a shape it covers:

    - every row one sample's whole blocks in order (block ids 0, 0, .., 1, 1, .., each ``block_size``
      long), then padding (negative block ids) in whole blocks; ``clean`` all clean tokens or padding;
    - one row of several samples (``seq`` 0, 1, ..), each with its clean tokens in one run of the clean
      part and its whole blocks, in order, in one run of the block part; no padding (as :func:`pack`
      lays out one row without padding).

    Padding queries see no clean key and only their own pseudo-block, which no real query sees: their
    outputs differ from the dense rule's, but nothing reads them."""
    B, T = q.pos.shape
    if clean.pos.shape[0] != B or bool((clean.block >= 0).any()):
        return None
    several = q.seq is not None and clean.seq is not None and B == 1 and bool((q.seq[0] != q.seq[0, 0]).any())
    if not several:
        if not _whole_blocks(q.block, block_size):
            return None
        return BlockLayout([BlockPart(0, clean.pos.shape[1], 0, T, additive(allowed(q, clean), dtype))],
                           block_size, causal_within_block)
    q_runs, c_runs = _runs(q.seq[0]), _runs(clean.seq[0])
    if q_runs is None or c_runs is None:
        return None
    clean_of = {int(clean.seq[0, a]): (a, b) for a, b in c_runs}
    parts = []
    for b0, b1 in q_runs:
        s = int(q.seq[0, b0])
        if s not in clean_of or not _whole_blocks(q.block[:, b0:b1], block_size):
            return None
        c0, c1 = clean_of[s]
        qs = TokenInfo(q.pos[:, b0:b1], q.block[:, b0:b1], q.start[:, b0:b1])
        cs = TokenInfo(clean.pos[:, c0:c1], clean.block[:, c0:c1], clean.start[:, c0:c1])
        parts.append(BlockPart(c0, c1, b0, b1, additive(allowed(qs, cs), dtype)))
    return BlockLayout(parts, block_size, causal_within_block)


@contextlib.contextmanager
def active(layout: "BlockLayout | CausalSegments"):
    """Run the forwards inside with ``layout`` as the attention pattern of every layer."""
    token = _current.set(layout)
    try:
        yield
    finally:
        _current.reset(token)


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BlockLayout,
                    scaling: float) -> torch.Tensor:
    """Attention of ``query`` (B, H, T, d) over ``key``/``value`` (B, Hkv, L + T, d), L clean keys then
    the T block tokens, under ``layout``: the same result as sdpa with the dense block-rule mask.
    Returns (B, H, T, d). Scores and softmax in float32, the products in the inputs' dtype (as sdpa
    does); the backward pass is written out (:class:`_BlockAttention`)."""
    T, S = query.shape[2], key.shape[2]
    L = S - T
    parts = layout.parts
    if parts[-1].b1 != T or parts[-1].c1 > L or (len(parts) == 1 and parts[0].c1 != L):
        raise SDLMError(f"block attention got {T} queries and {S} keys for a layout of {parts[-1].b1} block "
                        f"queries over {parts[-1].c1} clean keys")
    H, Hkv, D = query.shape[1], key.shape[1], layout.block_size
    if H % Hkv:
        raise SDLMError(f"block attention got {H} query heads for {Hkv} key/value heads: not a multiple")
    for p in parts:
        if (p.b1 - p.b0) % D or p.clean_bias.shape[-2:] != (p.b1 - p.b0, p.c1 - p.c0):
            raise SDLMError(f"block attention got {p.b1 - p.b0} queries and {p.c1 - p.c0} clean keys for blocks "
                            f"of {D} and a clean mask of {tuple(p.clean_bias.shape[-2:])}")
    dev = query.device.type
    if torch.is_autocast_enabled(dev):  # the products in autocast's dtype, as autocast would run them
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _BlockAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), layout, scaling)
    return _BlockAttention.apply(query, key, value.to(query.dtype), layout, scaling)


class _BlockAttention(torch.autograd.Function):
    """:func:`block_attention`, part by part, with its backward pass written out.

    Per part (a sample's T queries, its L clean keys, its own T block keys in blocks of D), with P the
    softmax over the (T, L + D) scores: ``O = P_clean V_clean + P_own V_own``, and backward
    ``dS = P * (dP - rowsum(dO * O))`` (the softmax's backward through the output, as flash attention
    takes it), then the four products for dQ, dK, dV. Gradients are written straight into full-size
    tensors (no slicing backward nodes), and none are computed for the clean keys and values when the
    layout says they need none (the two-pass step's clean KV comes from a pass without gradients)."""

    @staticmethod
    def forward(ctx, query, key, value, layout, scaling):
        B, H, T, d = query.shape
        Hkv, L = key.shape[1], key.shape[2] - T
        g, D = H // Hkv, layout.block_size
        outs, saved = [], []
        for p in layout.parts:
            n, c, K, q, kc, vc, kb, vb = _part(query, key, value, p, L, D)
            s = torch.empty(B, Hkv, g, n, c + D, dtype=torch.float32, device=query.device)
            torch.add(p.clean_bias.view(-1, 1, 1, n, c), (q.reshape(B, Hkv, g * n, d) @ kc.transpose(-1, -2))
                      .view(B, Hkv, g, n, c), alpha=scaling, out=s[..., :c])
            torch.mul((q.view(B, Hkv, g, K, D, d) @ kb.transpose(-1, -2)).view(B, Hkv, g, n, D), scaling,
                      out=s[..., c:])
            if layout.causal_within_block:
                s[..., c:].masked_fill_(_later_in_block(n, D, query.device), float("-inf"))
            prob = torch.softmax(s, -1)
            del s
            pc, po = prob[..., :c].to(query.dtype), prob[..., c:].to(query.dtype)  # contiguous, for the products
            o = (pc.view(B, Hkv, g * n, c) @ vc).view(B, Hkv, g, n, d)
            outs.append(o.add_((po.view(B, Hkv, g, K, D, D) @ vb).view(B, Hkv, g, n, d)))
            saved.append((prob, pc, po))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 3)
        ctx.layout, ctx.scaling, ctx.saved = layout, scaling, saved
        ctx.save_for_backward(query, key, value, out)
        return out.view(B, H, T, d)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        layout, scaling = ctx.layout, ctx.scaling
        B, H, T, d = query.shape
        Hkv, L = key.shape[1], key.shape[2] - T
        g, D = H // Hkv, layout.block_size
        clean = layout.clean_needs_grad
        dq = torch.empty(B, Hkv, g, T, d, dtype=query.dtype, device=query.device)
        dk, dv = torch.empty_like(key), torch.empty_like(value)  # the parts write every block column
        dk[:, :, :L].zero_()  # clean columns: zero, or the parts' sums below
        dv[:, :, :L].zero_()
        do = grad_out.to(query.dtype).reshape(B, Hkv, g, T, d)
        # rowsum(dO * O) = rowsum(dP * P): the softmax backward's correction, from d columns instead of L + D
        delta = (do.float() * out.float()).sum(-1, keepdim=True)
        for p, (prob, pc, po) in zip(layout.parts, ctx.saved):
            n, c, K, q, kc, vc, kb, vb = _part(query, key, value, p, L, D)
            dop = do[:, :, :, p.b0 : p.b1]
            ds = torch.empty_like(prob)
            torch.sub((dop.reshape(B, Hkv, g * n, d) @ vc.transpose(-1, -2)).view(B, Hkv, g, n, c),
                      delta[:, :, :, p.b0 : p.b1], out=ds[..., :c])
            torch.sub((dop.reshape(B, Hkv, g, K, D, d) @ vb.transpose(-1, -2)).view(B, Hkv, g, n, D),
                      delta[:, :, :, p.b0 : p.b1], out=ds[..., c:])
            ds.mul_(prob)
            dsc, dso = ds[..., :c].to(query.dtype), ds[..., c:].to(query.dtype)
            del ds
            dqp = (dsc.view(B, Hkv, g * n, c) @ kc).view(B, Hkv, g, n, d)
            dqp += (dso.view(B, Hkv, g, K, D, D) @ kb).view(B, Hkv, g, n, d)
            dq[:, :, :, p.b0 : p.b1] = dqp.mul_(scaling)
            dk[:, :, L + p.b0 : L + p.b1] = (dso.view(B, Hkv, g, K, D, D).transpose(-1, -2)
                                            @ q.view(B, Hkv, g, K, D, d)).sum(2).view(B, Hkv, n, d).mul_(scaling)
            dv[:, :, L + p.b0 : L + p.b1] = (po.view(B, Hkv, g, K, D, D).transpose(-1, -2)
                                            @ dop.reshape(B, Hkv, g, K, D, d)).sum(2).view(B, Hkv, n, d)
            if clean:
                dk[:, :, p.c0 : p.c1] += (dsc.view(B, Hkv, g * n, c).transpose(-1, -2)
                                          @ q.reshape(B, Hkv, g * n, d)).mul_(scaling)
                dv[:, :, p.c0 : p.c1] += pc.view(B, Hkv, g * n, c).transpose(-1, -2) @ dop.reshape(B, Hkv, g * n, d)
        ctx.saved = None
        return dq.view(B, H, T, d), dk, dv, None, None


def _part(query, key, value, p: BlockPart, L: int, D: int):
    """Part ``p``'s sizes (queries n, clean keys c, blocks K) and views: its queries (B, Hkv, g, n, d),
    its clean keys and values (B, Hkv, c, d), its own block keys and values (B, Hkv, 1, K, D, d)."""
    B, H, _, d = query.shape
    Hkv = key.shape[1]
    n, c = p.b1 - p.b0, p.c1 - p.c0
    K = n // D
    q = query[:, :, p.b0 : p.b1].reshape(B, Hkv, H // Hkv, n, d)
    kb = key[:, :, L + p.b0 : L + p.b1].reshape(B, Hkv, 1, K, D, d)
    vb = value[:, :, L + p.b0 : L + p.b1].reshape(B, Hkv, 1, K, D, d)
    return n, c, K, q, key[:, :, p.c0 : p.c1], value[:, :, p.c0 : p.c1], kb, vb


def _later_in_block(n: int, D: int, device) -> torch.Tensor:
    """(n, D) True where key j of a query's own block comes after the query (causal within a block)."""
    return torch.arange(D, device=device)[None, :] > (torch.arange(n, device=device) % D)[:, None]


def use_block_attention(model) -> None:
    """Let ``model`` run :func:`block_attention` for forwards given a :class:`BlockLayout` (through
    :meth:`sdlm.model.SDLM.forward`); every other forward runs sdpa, as before."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layout = _current.get()
        if layout is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        if dropout:
            raise SDLMError("block attention runs without attention dropout: set the model's attention_dropout to 0")
        if isinstance(layout, CausalSegments):  # packed clean parts: causal within each sample
            kwargs.pop("is_causal", None)
            outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                           scaling=scaling, is_causal=True, **kwargs)[0] for a, b in layout.bounds]
            return torch.cat(outs, 1), None
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return block_attention(query, key, value, layout, scale).transpose(1, 2).contiguous(), None

    AttentionInterface.register(BLOCK_ATTENTION, attention)
    AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)
    model.set_attn_implementation(BLOCK_ATTENTION)
