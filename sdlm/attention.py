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

import contextvars
import math
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .context import setting
from .errors import SDLMError
from .gathered import Gathered, gathered_attention
from .masks import SHARED, TokenInfo, additive, allowed

BLOCK_ATTENTION = "sdlm_blocks"
GATHER_ATTENTION = "sdlm_gather"
_current: contextvars.ContextVar["BlockLayout | None"] = contextvars.ContextVar("sdlm_block_layout", default=None)


BLOCK_CHUNK = 64
"""The most blocks per score product of :class:`_BlockAttention` (the default of :attr:`BlockLayout.chunk`)."""


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
    prefix: int = 0
    """The clean part's first ``prefix`` columns, a prefix shared by the row's samples
    (:data:`sdlm.masks.SHARED`), come before columns ``c0:c1`` among this part's clean keys (and
    ``clean_bias`` covers both: (B, 1, b1-b0, prefix + c1-c0))."""
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    """What the layers of a pass share: the mask in the form :class:`_BlockAttention` uses it."""

    @property
    def n_clean(self) -> int:
        """Clean keys of this part: the shared prefix and its own."""
        return self.prefix + self.c1 - self.c0


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
    chunk: int = BLOCK_CHUNK
    """The most blocks per score product (:class:`_BlockAttention`): each product spans only the clean keys its
    blocks see."""

    def to(self, device) -> "BlockLayout":
        parts = [BlockPart(p.c0, p.c1, p.b0, p.b1, p.clean_bias.to(device), p.prefix) for p in self.parts]
        return BlockLayout(parts, self.block_size, self.causal_within_block, self.clean_needs_grad, self.chunk)


@dataclass
class CausalSegments:
    """The clean pass of samples packed one after another in a single row: plain causal attention
    within each ``(start, end)`` column range, nothing across them but a shared prefix
    (:func:`causal_segments`)."""

    bounds: list[tuple[int, int]]
    prefix: int = 0
    """Columns ``0:prefix`` hold a prefix shared by the samples (:data:`sdlm.masks.SHARED`, at positions 0,
    1, ...): causal within itself, and seen by every segment of ``bounds``, whose positions then start at
    ``prefix``."""
    kv_only_layer: int | None = None
    """A pass that is run for its KV cache only (the two-pass step's clean pass with hard labels): the
    attention of the layer with this ``layer_idx`` (the model's last) raises :class:`KVFilled` once
    that layer's keys and values are in the cache, so its attention, output projection and MLP, which
    nothing reads, are skipped. The caller catches it (:func:`fill_cache`)."""
    kernel: str = "auto"
    """How a pass without gradients runs it: ``chunks`` (:func:`causal_segments_attention`), ``sdpa``
    (:func:`causal_segments_sdpa`, PyTorch's fused kernel per segment) or ``auto``
    (:func:`clean_pass_kernel` of the inputs' device and dtype)."""

    def to(self, device) -> "CausalSegments":
        return self

    def segments(self) -> list[tuple[int, int, int]]:
        """``(start, end, shared)`` for the shared prefix (if any: ``shared`` 0) and then every segment
        (``shared``: the prefix's length, the keys it sees before its own)."""
        return [(0, self.prefix, 0)] * bool(self.prefix) + [(a, b, self.prefix) for a, b in self.bounds]


class KVFilled(Exception):
    """Raised out of a KV-only pass (:attr:`CausalSegments.kv_only_layer`) once the cache holds every
    layer's keys and values."""


def last_layer_idx(model) -> int | None:
    """The largest ``layer_idx`` among ``model``'s attention modules (the last layer to fill the KV
    cache), or None if it has none."""
    idx = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    return max(idx) if idx else None


def fill_cache(run, layout, last: int | None) -> None:
    """Run ``run()``, a forward over the clean tokens that fills a KV cache under ``layout``. With a
    :class:`CausalSegments` or :class:`sdlm.gathered.Gathered` layout it stops once the keys and values
    of layer ``last`` are cached (None: the whole forward runs); any other layout (a dense mask, None)
    runs the whole forward."""
    if not isinstance(layout, (CausalSegments, Gathered)):
        run()
        return
    layout.kv_only_layer = last
    try:
        run()
    except KVFilled:
        pass
    finally:
        layout.kv_only_layer = None


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


def _shared_prefix_len(seq: torch.Tensor) -> int:
    """How many leading entries of ``seq`` (T,) are :data:`sdlm.masks.SHARED`."""
    other = torch.nonzero(seq != SHARED).flatten()
    return int(other[0]) if len(other) else seq.numel()


def causal_segments(clean: TokenInfo, kernel: str = "auto") -> CausalSegments | None:
    """The :class:`CausalSegments` of a clean part (fields (1, L)) that holds whole samples one after
    another, each at positions 0, 1, ..., with no padding; or a shared prefix at positions 0, 1, ...,
    P-1 and then the samples' own tokens, each at positions P, P+1, ...; None for any other shape.
    ``kernel``: how a pass without gradients runs it (:attr:`CausalSegments.kernel`)."""
    if clean.pos.shape[0] != 1 or clean.seq is None or bool((clean.block >= 0).any()):
        return None
    P = _shared_prefix_len(clean.seq[0])
    runs = _runs(clean.seq[0, P:])
    if runs is None:
        return None
    runs = [(a + P, b + P) for a, b in runs]
    for a, b in [(0, P)] * bool(P) + runs:
        first = P if a >= P else 0
        if not torch.equal(clean.pos[0, a:b], torch.arange(first, first + b - a, device=clean.pos.device)):
            return None
    return CausalSegments(runs, P, kernel=kernel)


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
    P = _shared_prefix_len(clean.seq[0])
    q_runs, c_runs = _runs(q.seq[0]), _runs(clean.seq[0, P:])
    if q_runs is None or c_runs is None:
        return None
    clean_of = {int(clean.seq[0, a + P]): (a + P, b + P) for a, b in c_runs}
    parts = []
    for b0, b1 in q_runs:
        s = int(q.seq[0, b0])
        if s not in clean_of or not _whole_blocks(q.block[:, b0:b1], block_size):
            return None
        c0, c1 = clean_of[s]
        qs = TokenInfo(q.pos[:, b0:b1], q.block[:, b0:b1], q.start[:, b0:b1])
        cols = torch.cat([torch.arange(P), torch.arange(c0, c1)]).to(clean.pos.device)
        cs = TokenInfo(clean.pos[:, cols], clean.block[:, cols], clean.start[:, cols])
        parts.append(BlockPart(c0, c1, b0, b1, additive(allowed(qs, cs), dtype), P))
    return BlockLayout(parts, block_size, causal_within_block)


def active(layout: "BlockLayout | CausalSegments"):
    """Run the forwards inside with ``layout`` as the attention pattern of every layer."""
    return setting(_current, layout)


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BlockLayout,
                    scaling: float) -> torch.Tensor:
    """Attention of ``query`` (B, H, T, d) over ``key``/``value`` (B, Hkv, L + T, d), L clean keys then
    the T block tokens, under ``layout``: the same result as sdpa with the dense block-rule mask.
    Returns (B, H, T, d). The products, scores and probabilities in the inputs' dtype (under autocast,
    its dtype), the softmax and its backward computing in float32 inside; the backward pass is written
    out (:class:`_BlockAttention`)."""
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
        if (p.b1 - p.b0) % D or p.clean_bias.shape[-2:] != (p.b1 - p.b0, p.n_clean):
            raise SDLMError(f"block attention got {p.b1 - p.b0} queries and {p.n_clean} clean keys for blocks "
                            f"of {D} and a clean mask of {tuple(p.clean_bias.shape[-2:])}")
    dev = query.device.type
    if torch.is_autocast_enabled(dev):  # the products in autocast's dtype, as autocast would run them
        dtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _BlockAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), layout, scaling)
    return _BlockAttention.apply(query, key, value.to(query.dtype), layout, scaling)


class _BlockAttention(torch.autograd.Function):
    """:func:`block_attention`, part by part, with its backward pass written out.

    Per part (a sample's n = K·D queries, its c clean keys, its own n block keys in K blocks of D) and
    key/value head, the queries of its g query heads are stacked into K·g·D rows, block by block (block k:
    the D queries of each of the g heads). The keys are D zero rows followed by the c clean keys, and each
    block's own (g·D) × D scores, one product for all blocks, go into the D first columns of the score
    buffer; its other columns come from a product of the queries with the clean keys, the scale and the
    clean mask folded in (``baddbmm``). One softmax over the buffer gives P; ``O = P [0; V_clean] + P_own
    V_own``. The backward pass is the softmax's own (``dS = P * (dP - rowsum(dP * P))``, one fused kernel)
    and the products for dQ, dK, dV; with the heads of a block stacked, the products for a block's own
    keys and values sum over the heads themselves.

    The clean mask is a staircase: a block sees the clean keys before its start, and the blocks come in
    order. So the rows are taken at most :data:`BLOCK_CHUNK` blocks at a time (:attr:`BlockLayout.chunk`,
    in chunks of even sizes), each chunk over the clean keys up to the last one any of its rows sees: the
    scores past it, all masked, are never computed. (Over the default CPU recipe's first 20 steps, the
    products compute 84% of the full clean scores; 61% are seen.)
    Scores and probabilities are kept in the inputs' dtype (the products round their outputs to it
    anyway; the softmax and its backward compute in float32 inside). The output and dQ are written in
    (B, T, H, d) memory order, the layout the model's output projection reads, and returned as
    (B, H, T, d) views. No gradient is computed for the clean keys and values when the layout says they
    need none (the two-pass step's clean KV comes from a pass without gradients)."""

    @staticmethod
    def forward(ctx, query, key, value, layout, scaling):
        B, H, T, d = query.shape
        Hkv, L = key.shape[1], key.shape[2] - T
        g, D = H // Hkv, layout.block_size
        BH, gD = B * Hkv, g * D
        out = torch.empty(B, T, H, d, dtype=query.dtype, device=query.device)
        saved = []
        for p in layout.parts:
            n, c, K, q, kc, vc, kb, vb = _part(query, key, value, p, L, D)
            pad = kb.new_zeros(B, Hkv, D, d)
            kx = torch.cat([pad, *kc], 2).view(BH, D + c, d)
            vx = torch.cat([pad, *vc], 2).view(BH, D + c, d)
            ext = _extended_bias(p, B, Hkv, g, D, query.dtype)
            own = torch.bmm(q.view(BH * K, gD, d), kb.transpose(1, 2)).mul_(scaling)  # (BH·K, g·D, D)
            if layout.causal_within_block:
                own.masked_fill_(_later_in_block(g, D, query.device), float("-inf"))
            own = own.view(BH, K * gD, D)
            chunks = _chunks(p, D, layout.chunk)
            outs, probs = [], []
            for k0, k1, cv in chunks:
                r0, r1, w = k0 * gD, k1 * gD, D + cv
                s = torch.baddbmm(ext[:, r0:r1, :w], q[:, r0:r1], kx[:, :w].transpose(1, 2), alpha=scaling)
                s[..., :D] = own[:, r0:r1]
                prob = torch.softmax(s, -1)
                del s
                outs.append(prob @ vx[:, :w])
                probs.append(prob)
            o, prob_own = _joined(outs), _joined([prob[..., :D] for prob in probs])
            o.view(BH * K, gD, d).baddbmm_(prob_own.reshape(BH * K, gD, D), vb)
            out[:, p.b0 : p.b1] = o.view(B, Hkv, K, g, D, d).permute(0, 2, 4, 1, 3, 5).reshape(B, n, H, d)
            saved.append((q, kx, vx, chunks, probs, prob_own))
        ctx.layout, ctx.scaling, ctx.saved = layout, scaling, saved
        ctx.save_for_backward(key, value)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        key, value = ctx.saved_tensors
        layout, scaling = ctx.layout, ctx.scaling
        B, H, T, d = grad_out.shape
        Hkv, L = key.shape[1], key.shape[2] - T
        g, D = H // Hkv, layout.block_size
        BH, gD = B * Hkv, g * D
        clean = layout.clean_needs_grad
        dq = torch.empty(B, T, H, d, dtype=key.dtype, device=key.device)
        dk, dv = torch.empty_like(key), torch.empty_like(value)  # the parts write every block column
        dk[:, :, :L].zero_()  # clean columns: zero, or the parts' sums below
        dv[:, :, :L].zero_()
        for p, (q, kx, vx, chunks, probs, prob_own) in zip(layout.parts, ctx.saved):
            n, c, K = p.b1 - p.b0, p.n_clean, (p.b1 - p.b0) // D
            kb = key[:, :, L + p.b0 : L + p.b1].reshape(BH * K, D, d)
            vb = value[:, :, L + p.b0 : L + p.b1].reshape(BH * K, D, d)
            do = _stacked(grad_out[:, :, p.b0 : p.b1].to(key.dtype), Hkv, D)  # (BH, K·g·D, d)
            dp_own = torch.bmm(do.view(BH * K, gD, d), vb.transpose(1, 2)).view(BH, K * gD, D)
            dqs, ds_owns = [], []
            if clean:
                gk, gv = kx.new_zeros(BH, c, d), vx.new_zeros(BH, c, d)
            for (k0, k1, cv), prob in zip(chunks, probs):
                r0, r1, w = k0 * gD, k1 * gD, D + cv
                do_c = do[:, r0:r1]
                dp = do_c @ vx[:, :w].transpose(1, 2)  # (BH, rows, D + cv): the D first columns are zero here
                dp[..., :D] = dp_own[:, r0:r1]
                ds = torch._softmax_backward_data(dp, prob, -1, prob.dtype)
                del dp
                dqs.append(ds @ kx[:, :w])
                ds_owns.append(ds[..., :D])
                if clean and cv:
                    gk[:, :cv] += ds[..., D:].transpose(1, 2) @ q[:, r0:r1]
                    gv[:, :cv] += prob[..., D:].transpose(1, 2) @ do_c
            dqp, ds_own = _joined(dqs), _joined(ds_owns).reshape(BH * K, gD, D)
            dqp.view(BH * K, gD, d).baddbmm_(ds_own, kb)
            dq[:, p.b0 : p.b1] = dqp.view(B, Hkv, K, g, D, d).permute(0, 2, 4, 1, 3, 5).reshape(B, n, H, d) \
                .mul_(scaling)
            dk[:, :, L + p.b0 : L + p.b1] = torch.bmm(ds_own.transpose(1, 2), q.view(BH * K, gD, d)) \
                .view(B, Hkv, n, d).mul_(scaling)
            dv[:, :, L + p.b0 : L + p.b1] = torch.bmm(prob_own.reshape(BH * K, gD, D).transpose(1, 2),
                                                      do.view(BH * K, gD, d)).view(B, Hkv, n, d)
            if clean:  # the part's clean columns: the shared prefix's (if any), then its own
                gk, gv = gk.view(B, Hkv, c, d).mul_(scaling), gv.view(B, Hkv, c, d)
                at = 0
                for cols in _clean_columns(p):
                    n_cols = cols.stop - cols.start
                    dk[:, :, cols] += gk[:, :, at : at + n_cols]
                    dv[:, :, cols] += gv[:, :, at : at + n_cols]
                    at += n_cols
        ctx.saved = None
        return dq.transpose(1, 2), dk, dv, None, None


def _joined(rows: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' row blocks (B·Hkv, rows, ·) of :class:`_BlockAttention` as one tensor along the rows: the
    only block itself, or their concatenation."""
    return rows[0] if len(rows) == 1 else torch.cat(rows, 1)


def _chunks(p: BlockPart, D: int, chunk: int) -> list[tuple[int, int, int]]:
    """Part ``p``'s blocks in runs of at most ``chunk``, as few runs as that allows, of even lengths:
    ``(k0, k1, cv)`` for blocks ``k0:k1``, of which no query sees a clean key past the first ``cv`` (from
    the clean mask). Made once per layout."""
    k = ("chunks", D, chunk)
    if k not in p.cache:
        B, _, n, c = p.clean_bias.shape
        K = n // D
        seen = (p.clean_bias == 0).view(B, K, D, c).any(2).any(0)  # (K, c): a query of block k sees key j
        last = (seen * torch.arange(1, c + 1, device=seen.device)).amax(-1).tolist() if c else [0] * K
        runs = max(1, math.ceil(K / max(1, chunk)))  # as few as ``chunk`` allows, then of even lengths
        step = max(1, math.ceil(K / runs))
        p.cache[k] = [(a, min(K, a + step), max(last[a : a + step])) for a in range(0, K, step)]
    return p.cache[k]


def _stacked(x: torch.Tensor, Hkv: int, D: int) -> torch.Tensor:
    """(B, H, n, d) queries (or their gradients) of one part as (B·Hkv, K·g·D, d) rows: per key/value head,
    block by block, the D rows of each of its g query heads."""
    B, H, n, d = x.shape
    K, g = n // D, H // Hkv
    return x.reshape(B, Hkv, g, K, D, d).transpose(2, 3).reshape(B * Hkv, K * g * D, d).contiguous()


def _extended_bias(p: BlockPart, B: int, Hkv: int, g: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """Part ``p``'s clean mask for the stacked rows of :class:`_BlockAttention`: (1 or B·Hkv, K·g·D, D + c),
    D zero columns for a query's own block, then its row of the clean mask, repeated for the g query
    heads. Made once per layout (every layer of a pass shares it)."""
    k = (B, Hkv, g, D, dtype)
    if k not in p.cache:
        n, c = p.b1 - p.b0, p.n_clean
        K = n // D
        ext = torch.zeros(B, K, g, D, D + c, dtype=dtype, device=p.clean_bias.device)
        ext[..., D:] = p.clean_bias.view(B, K, 1, D, c)
        ext = ext.view(B, 1, n * g, D + c)
        p.cache[k] = (ext.view(1, n * g, D + c) if B == 1
                      else ext.expand(B, Hkv, n * g, D + c).reshape(B * Hkv, n * g, D + c))
    return p.cache[k]


def _part(query, key, value, p: BlockPart, L: int, D: int):
    """Part ``p``'s sizes (queries n, clean keys c, blocks K) and tensors: its queries stacked as in
    :func:`_stacked` (B·Hkv, K·g·D, d), its clean keys and values as lists of the (B, Hkv, ·, d) pieces
    that make them up (the shared prefix's, if any, then its own), its own block keys and values
    (B·Hkv·K, D, d)."""
    B, Hkv, d = query.shape[0], key.shape[1], query.shape[-1]
    n, c = p.b1 - p.b0, p.n_clean
    K = n // D
    q = _stacked(query[:, :, p.b0 : p.b1], Hkv, D)
    kb = key[:, :, L + p.b0 : L + p.b1].reshape(B * Hkv * K, D, d)
    vb = value[:, :, L + p.b0 : L + p.b1].reshape(B * Hkv * K, D, d)
    cols = _clean_columns(p)
    return n, c, K, q, [key[:, :, i] for i in cols], [value[:, :, i] for i in cols], kb, vb


def _clean_columns(p: BlockPart) -> list[slice]:
    """The clean-part columns of part ``p``'s clean keys, in order: the shared prefix's (if any), its own."""
    return [slice(0, p.prefix)] * bool(p.prefix) + [slice(p.c0, p.c1)]


def _later_in_block(g: int, D: int, device) -> torch.Tensor:
    """(g·D, D) True where key j of a block comes after the query (row i of each of the g heads' D rows)."""
    return torch.ones(D, D, dtype=torch.bool, device=device).triu_(1).repeat(g, 1)


CAUSAL_CHUNK = 128
"""Query rows per product in :func:`causal_segments_attention`."""


def causal_segments_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CausalSegments,
                              scaling: float, chunk: int = CAUSAL_CHUNK) -> torch.Tensor:
    """Causal attention within each segment of ``layout`` (after its shared prefix, if it has one), without
    gradients: ``query`` (1, H, T, d), ``key``/``value`` (1, Hkv, T, d); returns (1, T, H, d), the layout
    the model's output projection reads.

    The clean pass of the CPU training step runs a sample's attention as plain products instead of sdpa's
    CPU flash kernel, which is slower at these lengths (a few hundred tokens, heads of 64): per segment,
    ``chunk`` queries at a time over the keys up to the last of them, the g query heads of a key/value
    head stacked as rows of one product, the scores above the diagonal masked, one softmax, one product
    with the values. The chunks skip most of the masked scores (at 128 queries, a 512-token sample
    computes 62% of its full score matrix). Scores and probabilities are in the inputs' dtype, as the
    products give them, and the softmax computes in float32 inside."""
    _, H, T, d = query.shape
    Hkv = key.shape[1]
    g = H // Hkv
    out = torch.empty(1, T, H, d, dtype=query.dtype, device=query.device)
    with torch.no_grad():
        for a0, b0, P in layout.segments():
            k, v = key[0, :, a0:b0], value[0, :, a0:b0]  # (Hkv, n, d)
            if P:  # the shared prefix's keys first
                k, v = torch.cat([key[0, :, :P], k], 1), torch.cat([value[0, :, :P], v], 1)
            for a in range(0, b0 - a0, chunk):
                b = min(b0 - a0, a + chunk)
                m = b - a
                q = query[0, :, a0 + a : a0 + b].reshape(Hkv, g * m, d)
                # (Hkv, g·m, P + b): the scaled scores of the chunk's queries over the keys up to its last one
                s = torch.baddbmm(query.new_zeros(1, 1, 1), q, k[:, : P + b].transpose(1, 2), beta=0, alpha=scaling)
                s.view(Hkv, g, m, P + b)[..., P + a :].masked_fill_(_above_diagonal(m, query.device), float("-inf"))
                o = torch.softmax(s, -1) @ v[:, : P + b]  # (Hkv, g·m, d)
                out[0, a0 + a : a0 + b] = o.view(Hkv, g, m, d).permute(2, 0, 1, 3).reshape(m, H, d)
    return out


def causal_segments_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CausalSegments,
                         scaling: float) -> torch.Tensor:
    """:func:`causal_segments_attention` through PyTorch's sdpa, one causal call per segment (its fused
    kernel, grouped heads shared, not copied): the same inputs and output layout, the same attention up to
    the rounding of another summation order. A segment after a shared prefix runs with the prefix's
    queries, keys and values in front, so that plain causal attention is its rule and no mask is built;
    the first such call also gives the prefix's own rows. Faster than the chunked products on CPUs with AMX
    and in float32 (:func:`clean_pass_kernel`)."""
    _, H, T, d = query.shape
    P = layout.prefix
    out = torch.empty(1, T, H, d, dtype=query.dtype, device=query.device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        runs = layout.bounds or ([(P, P)] if P else [])
        for i, (a0, b0) in enumerate(runs):
            q, k, v = (torch.cat([t[:, :, :P], t[:, :, a0:b0]], 2) if P else t[:, :, a0:b0]
                       for t in (query, key, value))
            o = sdpa(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)[0].transpose(0, 1)  # (P + m, H, d)
            if P and i == 0:
                out[0, :P] = o[:P]
            out[0, a0:b0] = o[P:]
    return out


def clean_pass_kernel(device: torch.device, dtype: torch.dtype, setting: str = "auto") -> str:
    """The kernel of a training step's clean pass (:class:`CausalSegments`) for ``setting`` (``chunks`` or
    ``sdpa`` as given). ``auto``: the faster one measured for such a device and dtype: ``chunks`` for bf16
    on a CPU whose bf16 products run on AVX-512 alone (1.88 against 2.84 ms per layer for a 370-token
    sample on a Zen 4), ``sdpa`` elsewhere: on CPUs with AMX (1.62 against 2.96 on a Xeon), in float32 (19%
    faster on an AVX2 Zen 3) and on GPUs (one kernel per segment instead of several per chunk). ``python
    bench/block_attention_cost.py`` times both."""
    if setting != "auto":
        return setting
    from .cpu import has_amx

    return "chunks" if device.type == "cpu" and dtype == torch.bfloat16 and not has_amx() else "sdpa"


def _above_diagonal(m: int, device) -> torch.Tensor:
    """(m, m) True where the key comes after the query."""
    return torch.ones(m, m, dtype=torch.bool, device=device).triu_(1)


def not_plain_attention(model) -> str | None:
    """What in ``model``'s attention goes beyond softmax(scores + mask) @ values, the attention that this
    module's functions (and flex attention) compute, or None: soft-capped scores (Gemma 2) or attention
    sinks (gpt-oss). Such a model keeps its own attention, under dense masks."""
    if getattr(model.config.get_text_config(), "attn_logit_softcapping", None):
        return "soft-caps its attention scores (attn_logit_softcapping)"
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()):
        return "has attention sinks"
    return None


def install_attention(model, name: str, fn) -> None:
    """Register ``fn`` as ``transformers`` attention ``name`` (with sdpa's 4D masks) and set ``model`` to run it.
    A model whose attention is more than plain softmax attention (:func:`not_plain_attention`) is refused."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if (why := not_plain_attention(model)) is not None:
        raise SDLMError(f"{type(model).__name__} {why}, which the {name} attention does not compute: train it "
                        "with attention: sdpa (dense masks through the model's own attention)")

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)


def use_block_attention(model) -> None:
    """Let ``model`` run :func:`block_attention` for forwards given a :class:`BlockLayout` (through
    :meth:`sdlm.model.SDLM.forward`); every other forward runs sdpa, as before."""
    install_attention(model, BLOCK_ATTENTION, _pattern_attention)


def use_gathered_attention(model) -> None:
    """Let ``model`` run :func:`sdlm.gathered.gathered_attention` for forwards given a
    :class:`sdlm.gathered.Gathered` layout (through :meth:`sdlm.model.SDLM.forward`); every other forward
    runs sdpa, as before. The training step (``attention: gather``) builds those layouts for both passes."""
    install_attention(model, GATHER_ATTENTION, _pattern_attention)


def _pattern_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention of the models set up by :func:`use_block_attention` and :func:`use_gathered_attention`:
    the training pattern that is active (:func:`active`), else sdpa."""
    layout = _current.get()
    if layout is None:
        return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise SDLMError("block attention runs without attention dropout: set the model's attention_dropout to 0")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(layout, (CausalSegments, Gathered)) and layout.kv_only_layer is not None \
            and getattr(module, "layer_idx", None) == layout.kv_only_layer:
        raise KVFilled  # the cache already holds this layer's keys and values (updated before the call)
    if isinstance(layout, Gathered):
        return gathered_attention(query, key, value, layout, scale), None
    if isinstance(layout, CausalSegments):  # packed clean parts: causal within each sample
        kwargs.pop("is_causal", None)
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if not grads and key.shape[2] == query.shape[2]:  # a pass over the clean tokens alone, as the step runs
            kernel = clean_pass_kernel(query.device, query.dtype, layout.kernel)
            run = causal_segments_attention if kernel == "chunks" else causal_segments_sdpa
            return run(query, key, value, layout, scale), None
        outs = []
        for a, b, P in layout.segments():
            if not P:
                outs.append(sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                                   scaling=scaling, is_causal=True, **kwargs)[0])
                continue
            m = b - a  # after the shared prefix: all of it, then causal within the segment
            seen = torch.ones(m, P + m, dtype=torch.bool, device=query.device)
            seen[:, P:] = ~_above_diagonal(m, query.device)
            k2, v2 = (torch.cat([t[:, :, :P], t[:, :, a:b]], 2) for t in (key, value))
            outs.append(sdpa_attention_forward(module, query[:, :, a:b], k2, v2, seen[None, None],
                                               scaling=scaling, is_causal=False, **kwargs)[0])
        return torch.cat(outs, 1), None
    return block_attention(query, key, value, layout, scale).transpose(1, 2).contiguous(), None


DECODING_ATTENTION = "sdlm_sdpa"
_plain_sdpa: contextvars.ContextVar[bool] = contextvars.ContextVar("sdlm_plain_sdpa", default=False)


def plain_sdpa():
    """Inside, :func:`sdpa_attention` always runs ``transformers``' own sdpa function (for comparisons)."""
    return setting(_plain_sdpa, True)


_SDPA_KWARGS = {"position_ids", "cache_position", "sliding_window", "is_causal", "output_attentions", "use_cache",
                "past_key_values", "cache"}
"""Keyword arguments the attention layers of ``transformers`` pass that :func:`sdpa_attention` may ignore on
its own path (the mask already carries any sliding window); with any other it hands over to ``transformers``."""


@dataclass
class RowSplit:
    """How a decoding step's attention gives each causal row the numbers a one-token step would give it.

    A CPU's low-precision attention kernel sums a row's keys in an order that depends on how many keys the
    call holds, masked ones included, and on whether it holds one query or several: in bfloat16 the same
    row then differs by a rounding step or more between an ``ar`` step and a speculative step, enough to
    change a greedy choice now and then. With a split, each causal row of the step (not a block token)
    runs alone over exactly the keys an ``ar`` step at its position holds: the cache, then the step's
    tokens it sees, in order (a draft tree's node: its ancestors); the block tokens run together over
    every key, as before. In a step that fills an empty cache (``first``, a prompt's prefill) the causal
    rows run together instead, as one call over the keys up to the last of them, as an ``ar`` decoder's
    prefill does. :meth:`sdlm.model.SDLM.step_hidden` enters one for low-precision models on a CPU
    (:func:`row_split`), where the packed linear layers give each row the same numbers in calls of up to
    :data:`sdlm.cpu.PACK_HINT` rows, and run a larger step's causal rows as a call of their own
    (:func:`sdlm.cpu.exact_rows`).
    ``is_block`` (T,) marks the step's block tokens, ``visible`` (T, T) the step's tokens each one sees
    (None: the block rule alone, under which a causal row sees the step's rows up to itself)."""

    is_block: list[bool]
    visible: torch.Tensor | None = None
    first: bool = False
    _plans: dict = field(default_factory=dict, repr=False)

    def leading_causal(self) -> int:
        """How many causal rows the step starts with (a prompt's, in a step that fills an empty cache)."""
        return next((r for r, b in enumerate(self.is_block) if b), len(self.is_block))

    def part(self, start: int, stop: int) -> "RowSplit":
        """The split of rows ``start:stop`` of the step run as a forward of their own after rows ``:start``
        (in the cache by then)."""
        vis = None if self.visible is None else self.visible[start:stop, start:stop]
        return RowSplit(self.is_block[start:stop], vis, first=self.first and start == 0)

    def plan(self, keys: int, device) -> tuple[list[tuple[slice | torch.Tensor, slice | torch.Tensor]], bool]:
        """(query rows, key columns) of each call, over ``keys`` key columns (a layer's cache, then the
        step's T tokens), slices where the rows or columns run on; and whether the calls' rows follow one
        another in order (their outputs then join as they are)."""
        if keys in self._plans:
            return self._plans[keys]
        T = len(self.is_block)
        cached = keys - T
        causal = [r for r in range(T) if not self.is_block[r]]
        blocks = [r for r in range(T) if self.is_block[r]]
        calls: list[tuple[slice | torch.Tensor, slice | torch.Tensor]] = []
        if self.first and causal and causal == list(range(len(causal))):
            calls.append((slice(0, len(causal)), slice(0, cached + len(causal))))
            causal = []
        for r in causal:
            seen = [j for j in range(r + 1) if self.visible is None or bool(self.visible[r, j])]
            if seen == list(range(r + 1)):
                cols: slice | torch.Tensor = slice(0, cached + r + 1)
            else:
                cols = torch.cat([torch.arange(cached), cached + torch.tensor(seen, dtype=torch.long)]).to(device)
            calls.append((slice(r, r + 1), cols))
        if blocks:
            run = blocks == list(range(blocks[0], T))
            calls.append((slice(blocks[0], T) if run else torch.tensor(blocks, device=device), slice(None)))
        starts = [r.start if isinstance(r, slice) else None for r, _ in calls]
        in_order = starts == [0] + [r.stop if isinstance(r, slice) else -1 for r, _ in calls[:-1]]
        self._plans[keys] = calls, in_order
        return calls, in_order


_row_split: contextvars.ContextVar["RowSplit | None"] = contextvars.ContextVar("sdlm_row_split", default=None)


def row_split(split: "RowSplit | None"):
    """Inside, :func:`sdpa_attention` runs a forward of ``split``'s step row by row (:class:`RowSplit`);
    None: as outside."""
    return setting(_row_split, split)


def _split_attention(query, key, value, mask, split: RowSplit, dropout, scaling, gqa: bool) -> torch.Tensor:
    """:class:`RowSplit`'s calls, their outputs put back in row order: (B, T, H, d)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls, in_order = split.plan(key.shape[2], query.device)
    outs = [sdpa(query[:, :, r], key[:, :, c], value[:, :, c], attn_mask=mask[:, :, r, c], dropout_p=dropout,
                 scale=scaling, enable_gqa=gqa) for r, c in calls]
    if in_order:
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    else:
        out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
        for (r, _), o in zip(calls, outs):
            out[:, :, r] = o
    return out.transpose(1, 2).contiguous()


def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``transformers``' sdpa attention, except for two cases on a CPU with a 4D mask. With grouped-query
    heads, ``transformers`` copies the keys and values once per query head of a group (it lets sdpa
    share them only without a mask, where its GPU kernels need that); a decoding forward with the block
    rule's mask does this in every layer, over the whole cache. Here sdpa shares them instead
    (``enable_gqa``): the same attention (the same numbers, on the PyTorch builds tested), without the
    copies. And inside :func:`row_split`, one sequence's step runs as :class:`RowSplit` says. Everything
    else runs ``transformers``' function."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (not _plain_sdpa.get() and query.device.type == "cpu" and isinstance(attention_mask, torch.Tensor)
             and attention_mask.dim() == 4 and query.shape[1] == key.shape[1] * groups
             and key.shape[-1] == value.shape[-1] and not kwargs.get("output_attentions")
             and all(k in _SDPA_KWARGS for k, v in kwargs.items() if v is not None))
    split = _row_split.get() if plain else None
    if split is not None and query.shape[0] == 1 and query.shape[2] == len(split.is_block) == attention_mask.shape[2] \
            and attention_mask.shape[3] == key.shape[2]:
        return _split_attention(query, key, value, attention_mask, split, dropout, scaling, groups > 1), None
    if not (plain and groups > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_decoding_attention(model) -> bool:
    """Run ``model``'s attention through :func:`sdpa_attention` if it runs ``transformers``' sdpa (the default
    of most models) and plain softmax attention (:func:`not_plain_attention`). Returns whether it does now."""
    if getattr(model.config, "_attn_implementation", None) == DECODING_ATTENTION:
        return True
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not_plain_attention(model) is not None:
        return False  # its own (transformers 5.17 runs Gemma 2, soft-capping and all, under sdpa)
    install_attention(model, DECODING_ATTENTION, sdpa_attention)
    return True
