"""The block pass's LoRA layers as one autograd function each (the trainer's fast path).

In the block pass of the block-adapter every token is a block token (the gate is 1 everywhere), and a
LoRA layer computes ``y = x W^T (+ b) + s (x A^T) B^T`` for a frozen ``W``. Through ``peft`` under
autocast that is three linear calls, each casting its input and weight, a scaling multiply, an add and
their backward nodes (casts back, the multiply, the adds), per layer and per call. :class:`_LoRALinear`
does the same arithmetic with the input cast once and the low-rank update accumulated into the base
output by the matrix product itself (``addmm``), and takes its backward pass in five matrix products
with nothing else in between. Every other call (clean tokens, decoding, a per-token gate, dropout)
runs ``peft``'s own forward.
"""

from __future__ import annotations

import torch


class _LoRALinear(torch.autograd.Function):
    """``x W^T (+ b) + s (x A^T) B^T`` in ``dtype`` with gradients for ``x``, ``A`` and ``B`` (``W``, ``b``
    frozen). ``x`` (..., in); returns (..., out) in ``dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype):
        xs = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        h = xs @ a.t()  # (N, r)
        y = torch.mm(xs, weight.t()) if bias is None else torch.addmm(bias, xs, weight.t())
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(xs, h, weight, a, b)
        ctx.scaling, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scaling, x.dtype, lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xs, h, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(xs.dtype)
        dh = (g @ b).mul_(ctx.scaling)  # (N, r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, weight).addmm_(dh, a).view(*grad.shape[:-1], xs.shape[-1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            da = (dh.t() @ xs).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            db = (g.t() @ h).mul_(ctx.scaling).to(ctx.b_dtype)
        return dx, None, None, da, db, None, None


def lora_linear(module, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A ``peft`` LoRA ``Linear`` applied to ``x`` with its update on every token (gate 1), through
    :class:`_LoRALinear`. Under autocast it computes in the autocast dtype, as the layer would;
    ``weight``: the base weight already in that dtype (a kept copy), else it is cast here."""
    base = module.base_layer
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    w = weight if weight is not None and weight.dtype == dtype else base.weight.to(dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    name = module.active_adapters[0]
    with torch.autocast(dev, enabled=False):
        return _LoRALinear.apply(x, w, bias, module.lora_A[name].weight, module.lora_B[name].weight,
                                 float(module.scaling[name]), dtype)


def fuse_lora_linears(sdlm) -> int:
    """Route the gated adapter's LoRA layers through :func:`lora_linear` whenever every token of the
    forward is a block token (``sdlm.gate is True``, the training step's block pass) and gradients are
    on; every other call runs ``peft``'s forward. Layers with dropout, several active adapters or a LoRA
    variant (DoRA) are left alone. Returns the number of layers routed."""
    n = 0
    for mod in sdlm.model.modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and isinstance(mod.base_layer, torch.nn.Linear)):
            continue
        names = list(mod.active_adapters)
        if len(names) != 1 or names[0] in getattr(mod, "lora_variant", {}) or \
                not isinstance(mod.lora_dropout[names[0]], torch.nn.Identity):
            continue

        def forward(x, *args, mod=mod, peft_forward=mod.forward, **kwargs):
            if (sdlm.gate is True and not args and not kwargs and not mod.disable_adapters and not mod.merged
                    and torch.is_grad_enabled()):
                return lora_linear(mod, x, getattr(mod.base_layer, "_sdlm_bf16_weight", None))
            return peft_forward(x, *args, **kwargs)

        mod.forward = forward
        n += 1
    return n
