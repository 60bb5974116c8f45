"""A KV cache for decoding that writes each step's keys and values in place.

``transformers``' ``DynamicCache`` grows every layer by concatenation: each forward copies the whole
cache of every layer to append a few tokens, so a step's copying grows with the context (60 copies of
the cache per forward for a 30-layer model). :class:`GrowingLayer` keeps each layer's keys and values in
a buffer with room to spare and copies only the new tokens into it; ``keys``/``values`` are views of
the filled part, so everything that reads a ``DynamicLayer`` (attention, ``crop``, the mask sizes)
reads these the same way. A crop only shortens the views (the next step writes over what was
cut); what replaces the views with other tensors (``batch_select_indices``, a draft tree's kept
nodes) makes the next update start a new buffer. The keys and values are the same numbers either
way; only where they are stored differs.

:func:`new_cache` gives a ``DynamicCache`` whose layers are :class:`GrowingLayer` on a CPU, a plain
one elsewhere.

:func:`drop_front` drops the oldest entries of a model's windowed layers (sliding windows, chunks) once no
query can see them (``SDLM.trim`` decides how many), on either kind of layer; the cache records how many
per kind of layer (:class:`Trimmed`), which the masks (``sdlm.masks.layer_masks``) and a draft tree's
kept nodes (``sdlm.model._keep_tail``) read.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from .context import setting

SPARE_MIN = 256
"""Tokens of room a new buffer has beyond what it holds, at least (and half as many again as it holds)."""


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values into a buffer with room to spare. The entries run
    from buffer index ``_start`` on: :func:`drop_front` moves it past entries no query can see any more."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _start: int = 0

    def _length(self) -> int:
        keys = getattr(self, "keys", None)
        return 0 if keys is None or keys.dim() != 4 else keys.shape[-2]

    def _in_buffer(self) -> bool:
        """Whether ``keys``/``values`` are still the views of this layer's buffers (nothing replaced them)."""
        kb, vb = self._kbuf, self._vbuf
        if kb is None:
            return False
        k, v, s = self.keys, self.values, self._start
        return (k.dim() == 4 and s < kb.shape[-2] and k.data_ptr() == kb[:, :, s:].data_ptr()
                and v.data_ptr() == vb[:, :, s:].data_ptr() and k.stride() == kb.stride() and v.stride() == vb.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self._length(), key_states.shape[-2]
        kb, vb = self._kbuf, self._vbuf
        in_buffer = kb is not None and (n == 0 or self._in_buffer())
        fits = (in_buffer and self._start + n + t <= kb.shape[-2]
                and kb.shape[:2] == key_states.shape[:2] and kb.shape[-1] == key_states.shape[-1]
                and vb.shape[-1] == value_states.shape[-1] and kb.dtype == key_states.dtype
                and kb.device == key_states.device)
        if not fits:  # a new buffer, with the entries still held at its start
            cap = n + t + max(SPARE_MIN, (n + t) // 2)
            b, h = key_states.shape[:2]
            kb = key_states.new_empty(b, h, cap, key_states.shape[-1])
            vb = value_states.new_empty(b, h, cap, value_states.shape[-1])
            if n:
                kb[:, :, :n].copy_(self.keys)
                vb[:, :, :n].copy_(self.values)
            self._kbuf, self._vbuf, self._start = kb, vb, 0
        s = self._start
        kb[:, :, s + n : s + n + t].copy_(key_states)
        vb[:, :, s + n : s + n + t].copy_(value_states)
        self.keys, self.values = kb[:, :, s : s + n + t], vb[:, :, s : s + n + t]
        return self.keys, self.values

    def keep(self, start: int, sel: torch.Tensor) -> bool:
        """Keep entries ``0 .. start-1`` and then ``sel`` (indices into the entries), in the buffer. Returns
        False, changing nothing, where the keys and values are no longer the buffer's views."""
        if not self._in_buffer():
            return False
        n, s = start + len(sel), self._start
        kb, vb = self._kbuf, self._vbuf
        with torch.inference_mode(kb.is_inference()):  # decoding forwards fill the buffer in inference mode
            kb[:, :, s + start : s + n] = kb.index_select(2, sel + s)  # gathered first: sel may overlap where it lands
            vb[:, :, s + start : s + n] = vb.index_select(2, sel + s)
            self.keys, self.values = kb[:, :, s : s + n], vb[:, :, s : s + n]
        return True

    def drop_front(self, n: int) -> None:
        """Drop the first ``n`` entries (a view: the buffer's next renewal leaves them behind)."""
        if self._in_buffer():
            self._start += n
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]


@dataclass
class Trimmed:
    """What a decoding cache has dropped from the front of its windowed layers: ``kinds`` gives each cache
    layer's kind of attention (a key of ``LayerWindows.windows``), ``dropped`` the entries dropped so far
    from every layer of a kind. A layer's entry ``i`` is then the sequence's entry ``dropped[kind] + i``."""

    kinds: list
    dropped: dict = field(default_factory=dict)


def trimmed(cache) -> Trimmed | None:
    """The cache's :class:`Trimmed` record, None if nothing was ever dropped from it."""
    return getattr(cache, "sdlm_trimmed", None)


def layer_offset(cache, i: int) -> int:
    """How many of the sequence's first entries cache layer ``i`` no longer holds (its entry ``j`` is the
    sequence's entry ``layer_offset + j``)."""
    t = trimmed(cache)
    return t.dropped.get(t.kinds[i], 0) if t is not None else 0


def dropped_of(cache) -> dict:
    """Entries dropped from the front of each kind of layer (empty: none)."""
    t = trimmed(cache)
    return {k: d for k, d in t.dropped.items() if d} if t is not None else {}


def drop_front(cache, kinds: list, kind, n: int) -> bool:
    """Drop the first ``n`` entries of every layer of ``kind`` (``kinds``: each cache layer's kind), for
    entries no query of this or a later forward can see (past a sliding window, before a chunk). Returns
    False, changing nothing, where the cache's layers do not match ``kinds`` one to one (layers that share
    another's keys, more than one cache layer per decoder layer)."""
    if n <= 0:
        return True
    if len(cache.layers) != len(kinds) or any(not getattr(layer, "is_initialized", False) for layer in cache.layers):
        return False
    t = trimmed(cache)
    if t is None:
        t = cache.sdlm_trimmed = Trimmed(list(kinds))
    for layer, k in zip(cache.layers, kinds):
        if k == kind:
            if isinstance(layer, GrowingLayer):
                layer.drop_front(n)
            else:
                layer.keys, layer.values = layer.keys[..., n:, :], layer.values[..., n:, :]
    t.dropped[kind] = t.dropped.get(kind, 0) + n
    return True


_plain: contextvars.ContextVar[bool] = contextvars.ContextVar("sdlm_plain_cache", default=False)


def plain_cache():
    """Inside, :func:`new_cache` gives ``transformers``' own ``DynamicCache`` (for comparisons)."""
    return setting(_plain, True)


def new_cache(device: torch.device | str = "cpu"):
    """An empty cache for decoding on ``device``: its layers are :class:`GrowingLayer` on a CPU (plain
    ``DynamicLayer`` elsewhere, inside :func:`plain_cache`, and where ``transformers`` does not build its
    cache from a layer class)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    replicated = getattr(cache, "layer_class_to_replicate", None)
    if not _plain.get() and torch.device(device).type == "cpu" and replicated is DynamicLayer and not cache.layers:
        cache.layer_class_to_replicate = GrowingLayer
    return cache
