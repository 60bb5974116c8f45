"""Attention for the block pass of one training sample, in two exact pieces (SPEC §2).

In the block pass of one sample (the CPU training step), the queries are the sample's K blocks of D
tokens, one after another, and the keys are its L clean tokens followed by those same K·D block
tokens. The block rule (:mod:`sdlm.masks`) lets block b see the clean keys before its start and its
own D tokens, nothing else. Of the dense (K·D) × (L + K·D) mask, the block part is therefore
block-diagonal: a dense kernel spends most of its work there on scores it throws away.

:func:`block_attention` computes the same attention as two pieces sharing one softmax: every query
against the L clean keys (masked by the rule, through :attr:`BlockLayout.clean_bias`), and each
block's D queries against its own D keys. That is (K·D) × (L + D) scores instead of
(K·D) × (L + K·D), in plain matrix products, whose backward pass is cheap; the dense kernel's
backward pass is what costs most on a CPU.

A model takes it through :func:`use_block_attention`; :meth:`sdlm.model.SDLM.forward` runs it when
it is given a :class:`BlockLayout` instead of a 4D mask. Any other forward of the same model (the
clean pass, decoding) runs sdpa as before.
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
class BlockLayout:
    """The shape of a block pass: K blocks of ``block_size`` queries over L clean keys, then themselves."""

    clean_bias: torch.Tensor
    """(1, 1, K·D, L) additive mask of the queries over the clean keys (0 = attend), from the block rule."""
    block_size: int
    causal_within_block: bool = False

    def to(self, device) -> "BlockLayout":
        return BlockLayout(self.clean_bias.to(device), self.block_size, self.causal_within_block)


def block_layout(q: TokenInfo, clean: TokenInfo, block_size: int, causal_within_block: bool,
                 dtype: torch.dtype) -> BlockLayout | None:
    """The :class:`BlockLayout` of block queries ``q`` (fields (B, K·D)) over clean keys ``clean`` (fields
    (B, L)) followed by the same block tokens, or None where the batch is not of that shape: every row
    one sample's whole blocks in order (block ids 0, 0, .., 1, 1, .., each ``block_size`` long),
    then padding (negative block ids) in whole blocks; ``clean`` all clean tokens or padding.

    Padding queries see no clean key and only their own pseudo-block, which no real query sees: their
    outputs differ from the dense rule's, but nothing reads them."""
    B, T = q.pos.shape
    if T % block_size or clean.pos.shape[0] != B or bool((clean.block >= 0).any()):
        return None
    real = q.block >= 0
    col_block = torch.arange(T, device=q.block.device) // block_size
    if not bool(((q.block == col_block) | ~real).all()):
        return None
    whole = real.view(B, -1, block_size)
    if not bool((whole.all(-1) | ~whole.any(-1)).all()):  # a block part of real tokens, then whole pad blocks
        return None
    return BlockLayout(additive(allowed(q, clean), dtype), block_size, causal_within_block)


@contextlib.contextmanager
def active(layout: BlockLayout):
    """Run the forwards inside with ``layout`` as the attention pattern of every layer."""
    token = _current.set(layout)
    try:
        yield
    finally:
        _current.reset(token)


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BlockLayout,
                    scaling: float) -> torch.Tensor:
    """Attention of ``query`` (B, H, K·D, d) over ``key``/``value`` (B, Hkv, L + K·D, d) under ``layout``:
    the same result as sdpa with the dense block-rule mask. Returns (B, H, K·D, d).

    Scores and softmax in float32; the products in the inputs' dtype (as sdpa does)."""
    B, H, T, d = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    D = layout.block_size
    L, K, g = S - T, T // D, H // Hkv
    if T % D or H % Hkv or L != layout.clean_bias.shape[-1]:
        raise SDLMError(f"block attention got {T} queries and {S} keys for a layout of blocks of {D} over "
                        f"{layout.clean_bias.shape[-1]} clean keys")
    q = query.reshape(B, Hkv, g, T, d)  # query head h reads key head h // g
    kc, vc, kb, vb = key[:, :, :L], value[:, :, :L], key[:, :, L:], value[:, :, L:]
    s_clean = (q.reshape(B, Hkv, g * T, d) @ kc.transpose(-1, -2)).float().view(B, Hkv, g, T, L)
    s_clean = s_clean * scaling + layout.clean_bias.view(-1, 1, 1, T, L)
    qb, kbb, vbb = q.view(B, Hkv, g, K, D, d), kb.reshape(B, Hkv, 1, K, D, d), vb.reshape(B, Hkv, 1, K, D, d)
    s_own = (qb @ kbb.transpose(-1, -2)).float() * scaling  # (B, Hkv, g, K, D, D)
    if layout.causal_within_block:
        hide = torch.ones(D, D, dtype=torch.bool, device=query.device).triu(1)
        s_own = s_own.masked_fill(hide, float("-inf"))
    p = torch.softmax(torch.cat([s_clean, s_own.reshape(B, Hkv, g, T, D)], -1), -1).to(value.dtype)
    out = (p[..., :L].reshape(B, Hkv, g * T, L) @ vc).view(B, Hkv, g, T, d)
    out = out + (p[..., L:].reshape(B, Hkv, g, K, D, D) @ vbb).view(B, Hkv, g, T, d)
    return out.view(B, H, T, d)


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
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return block_attention(query, key, value, layout, scale).transpose(1, 2).contiguous(), None

    AttentionInterface.register(BLOCK_ATTENTION, attention)
    AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)
    model.set_attn_implementation(BLOCK_ATTENTION)
