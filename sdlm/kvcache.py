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
"""

from __future__ import annotations

import contextvars

import torch
from transformers.cache_utils import DynamicLayer

from .context import setting

SPARE_MIN = 256
"""Tokens of room a new buffer has beyond what it holds, at least (and half as many again as it holds)."""


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values into a buffer with room to spare."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def _length(self) -> int:
        keys = getattr(self, "keys", None)
        return 0 if keys is None or keys.dim() != 4 else keys.shape[-2]

    def _in_buffer(self) -> bool:
        """Whether ``keys``/``values`` are still the views of this layer's buffers (nothing replaced them)."""
        kb, vb = self._kbuf, self._vbuf
        if kb is None:
            return False
        k, v = self.keys, self.values
        return (k.dim() == 4 and k.data_ptr() == kb.data_ptr() and v.data_ptr() == vb.data_ptr()
                and k.stride() == kb.stride() and v.stride() == vb.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self._length(), key_states.shape[-2]
        kb, vb = self._kbuf, self._vbuf
        fits = (kb is not None and (n == 0 or self._in_buffer()) and n + t <= kb.shape[-2]
                and kb.shape[:2] == key_states.shape[:2] and kb.shape[-1] == key_states.shape[-1]
                and vb.shape[-1] == value_states.shape[-1] and kb.dtype == key_states.dtype
                and kb.device == key_states.device)
        if not fits:
            cap = n + t + max(SPARE_MIN, (n + t) // 2)
            b, h = key_states.shape[:2]
            kb = key_states.new_empty(b, h, cap, key_states.shape[-1])
            vb = value_states.new_empty(b, h, cap, value_states.shape[-1])
            if n:
                kb[:, :, :n].copy_(self.keys)
                vb[:, :, :n].copy_(self.values)
            self._kbuf, self._vbuf = kb, vb
        kb[:, :, n : n + t].copy_(key_states)
        vb[:, :, n : n + t].copy_(value_states)
        self.keys, self.values = kb[:, :, : n + t], vb[:, :, : n + t]
        return self.keys, self.values

    def keep(self, start: int, sel: torch.Tensor) -> bool:
        """Keep entries ``0 .. start-1`` and then ``sel`` (indices into the sequence), in the buffer. Returns
        False, changing nothing, where the keys and values are no longer the buffer's views."""
        if not self._in_buffer():
            return False
        n = start + len(sel)
        kb, vb = self._kbuf, self._vbuf
        with torch.inference_mode(kb.is_inference()):  # decoding forwards fill the buffer in inference mode
            kb[:, :, start:n] = kb.index_select(2, sel)  # gathered first: sel may overlap where it lands
            vb[:, :, start:n] = vb.index_select(2, sel)
            self.keys, self.values = kb[:, :, :n], vb[:, :, :n]
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
