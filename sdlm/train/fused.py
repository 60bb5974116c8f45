"""The block pass's LoRA layers as one autograd function each (the trainer's fast path).

In the block pass of the block-adapter every token is a block token (the gate is 1 everywhere), and a
LoRA layer computes ``y = x W^T (+ b) + s (x A^T) B^T`` for a frozen ``W``. Through ``peft`` under
autocast that is three linear calls, each casting its input and weight, a scaling multiply, an add and
their backward nodes (casts back, the multiply, the adds), per layer and per call. :class:`_LoRALinear`
does the same arithmetic with the input cast once and the low-rank update accumulated into the base
output by the matrix product itself (``addmm``), and takes its backward pass in five matrix products
with nothing else in between. Every other call (clean tokens, decoding, a per-token gate, dropout)
runs ``peft``'s own forward.

On a CPU, :func:`pack_frozen_linears` gives the frozen linear layers of a bf16 base oneDNN-packed copies
of their weights, for the products of the training step that read them: the clean pass's (no gradients)
and the base products of :class:`_LoRALinear`, forward (``x W^T``) and backward (``g W``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import NamedTuple

import torch

from ..cpu import MIN_FEATURES, _pack, _packed_linear, can_prepack, room_for

logger = logging.getLogger(__name__)


class _LoRALinear(torch.autograd.Function):
    """``x W^T (+ b) + s (x A^T) B^T`` in ``dtype`` with gradients for ``x``, ``A`` and ``B`` (``W``, ``b``
    frozen). ``x`` (..., in); returns (..., out) in ``dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype, packed=None):
        xs = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        h = xs @ a.t()  # (N, r)
        if packed is not None:  # the same product on oneDNN's packed copy of ``weight``
            y = _packed_linear(xs, packed.weight, bias)
        else:
            y = torch.mm(xs, weight.t()) if bias is None else torch.addmm(bias, xs, weight.t())
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(xs, h, weight, a, b)
        ctx.scaling, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scaling, x.dtype, lora_a.dtype, lora_b.dtype
        ctx.packed = packed
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xs, h, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(xs.dtype)
        dh = (g @ b).mul_(ctx.scaling)  # (N, r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            gw = torch.mm(g, weight) if ctx.packed is None else _packed_linear(g, ctx.packed.weight_t, None)
            dx = gw.addmm_(dh, a).view(*grad.shape[:-1], xs.shape[-1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            da = (dh.t() @ xs).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            db = (h.t() @ g).t().mul_(ctx.scaling).to(ctx.b_dtype)  # (h^T g)^T: half the time of g^T h here
        ctx.packed = None
        return dx, None, None, da, db, None, None, None


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
    packed = _packed_of(base, w)
    with torch.autocast(dev, enabled=False):
        return _LoRALinear.apply(x, w, bias, module.lora_A[name].weight, module.lora_B[name].weight,
                                 float(module.scaling[name]), dtype, packed)


class Packed(NamedTuple):
    """oneDNN-packed copies of a frozen weight ``source`` (out, in): ``weight`` for ``x W^T`` and
    ``weight_t`` for ``g W`` (the input gradient's product)."""

    source: torch.Tensor
    weight: torch.Tensor
    weight_t: torch.Tensor


def _packed_of(layer: torch.nn.Module, weight: torch.Tensor) -> Packed | None:
    """``layer``'s packed copies (:func:`pack_frozen_linears`) where they are of ``weight`` as it is now
    (inside :class:`sdlm.train.trainer.FrozenBF16`, whose bf16 copy they were made from), else None."""
    p = getattr(layer, "_sdlm_bf16_packed", None)
    if p is None or weight.data_ptr() != p.source.data_ptr() or weight.dtype != p.source.dtype:
        return None
    return p


def pack_frozen_linears(model: torch.nn.Module, low_of) -> int:
    """Give every frozen CPU ``nn.Linear`` of ``model`` whose weight has a bf16 copy (``low_of(param)``:
    the copy, or None; :meth:`sdlm.train.trainer.FrozenBF16.low_of`) oneDNN-packed copies of that copy
    (:class:`Packed`), made once, and route through them the calls that read the copy without needing a
    gradient for it or the input (the training step's clean pass), and :class:`_LoRALinear`'s base
    products. The products are those of ``F.linear`` up to float rounding (another summation order); a
    layer where a check on a random input finds more than rounding is left alone, as are layers narrower
    than :data:`sdlm.cpu.MIN_FEATURES` and weights shared with another module (a tied LM head). Every
    other call runs the layer's own forward. The copies take twice the bf16 weights' memory; where that
    is more than half the memory still available, nothing is packed (with a warning). Returns the number
    of layers given copies; 0 where this PyTorch build or CPU cannot pack bf16 weights."""
    if not can_prepack(torch.bfloat16, "cpu"):
        return 0
    shared = shared_weights(model)
    todo = []
    for mod in model.modules():
        if type(mod) is not torch.nn.Linear or hasattr(mod, "_sdlm_bf16_packed"):
            continue
        w = mod.weight
        low = low_of(w)
        if (w.requires_grad or low is None or low.device.type != "cpu" or min(w.shape) < MIN_FEATURES
                or w.data_ptr() in shared):
            continue
        bias = None if mod.bias is None else low_of(mod.bias)
        if mod.bias is None or bias is not None:
            todo.append((mod, low, bias))
    need = sum(2 * low.numel() * low.element_size() for _, low, _ in todo)
    fits, free = room_for(need)
    if not fits:
        logger.warning("packed_base: not packing the frozen linear layers, the copies would take %.1f GB of the "
                       "%.1f GB available (the step runs on the bf16 weights as they are)", need / 2**30, free / 2**30)
        return 0
    n = 0
    for mod, low, bias in todo:
        try:
            packed = Packed(low, _pack(low), _pack(low.t().contiguous()))
        except RuntimeError:  # an unusual shape or build: this layer runs as before
            continue
        if not _packed_agrees(low, bias, packed):
            continue
        mod._sdlm_bf16_packed = packed
        own = mod.forward

        def forward(x, *args, mod=mod, own=own, **kwargs):
            p = _packed_of(mod, mod.weight)
            if (p is None or args or kwargs or x.dtype != p.source.dtype or x.device.type != "cpu"
                    or (torch.is_grad_enabled() and x.requires_grad)):
                return own(x, *args, **kwargs)
            return _packed_linear(x, p.weight, mod.bias)

        mod.forward = forward
        n += 1
    return n


def _packed_agrees(low: torch.Tensor, bias: torch.Tensor | None, packed: Packed) -> bool:
    """Whether the packed products equal ``F.linear`` and ``g @ W`` up to rounding, on a seeded random input."""
    x = torch.randn(8, low.shape[1], generator=torch.Generator().manual_seed(0)).to(low.dtype)
    try:
        with torch.no_grad():
            y = _packed_linear(x, packed.weight, bias)
            same = _close(torch.nn.functional.linear(x, low, bias), y, 2**-6)
    except RuntimeError:  # a copy of the wrong shape
        return False
    return same and transpose_agrees(low, packed.weight_t)


def transpose_agrees(low: torch.Tensor, packed_t: torch.Tensor) -> bool:
    """Whether ``packed_t``, a packed copy of ``low``'s transpose, gives ``g @ low`` up to rounding, on a
    seeded random input."""
    g = torch.randn(8, low.shape[0], generator=torch.Generator().manual_seed(1)).to(low.dtype)
    try:
        with torch.no_grad():
            return _close(g @ low, _packed_linear(g, packed_t, None), 2**-6)
    except RuntimeError:  # a copy of the wrong shape
        return False


def fuse_lora_linears(sdlm) -> int:
    """Route the gated adapter's LoRA layers through :func:`lora_linear` whenever every token of the
    forward is a block token (``sdlm.gate is True``, the training step's block pass) and gradients are
    on; every other call runs ``peft``'s forward. Layers with dropout, several active adapters or a LoRA
    variant (DoRA) are left alone. Returns the number of layers routed."""
    from ..adapter import plain_lora_layers

    n = 0
    for mod, _ in plain_lora_layers(sdlm.model):

        def forward(x, *args, mod=mod, peft_forward=mod.forward, **kwargs):
            if (sdlm.gate is True and not args and not kwargs and not mod.disable_adapters and not mod.merged
                    and torch.is_grad_enabled()):
                return lora_linear(mod, x, getattr(mod.base_layer, "_sdlm_bf16_weight", None))
            return peft_forward(x, *args, **kwargs)

        mod.forward = forward
        n += 1
    return n


class _RMSNorm(torch.autograd.Function):
    """``w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with a frozen ``w`` of ``x``'s dtype and the
    statistics in float32: the RMS norm of Llama-style models, in three passes over ``x`` instead of
    six, and a backward pass (for ``x`` only) of five instead of about ten."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()  # (..., 1) float32
        ctx.save_for_backward(x, r, weight)
        # x * r computed in float32 and rounded once into x's dtype (as .to() would), without a float32 copy
        return torch.mul(x, r, out=torch.empty_like(x)).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, r, weight = ctx.saved_tensors
        gw = torch.mul(grad, weight).float()  # the gradient at the normalised x
        xr = torch.mul(x, r)  # the normalised x, float32
        m = torch.linalg.vecdot(gw, xr, dim=-1).unsqueeze(-1).div_(x.shape[-1])
        return torch.mul(gw.sub_(xr.mul_(m)), r, out=torch.empty_like(x)), None, None


def _norm_eps(mod) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(mod, name, None)
        if isinstance(eps, float):
            return eps
    return None


def fuse_rms_norms(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Route the model's frozen RMS norms through :class:`_RMSNorm` for inputs and weights of ``dtype``
    (a base held in bf16, :class:`sdlm.train.trainer.FrozenBF16`); any other call runs the module's own
    forward. A norm is routed only if, on a random input of ``dtype``, its own forward and the fused
    one agree within rounding, outputs and input gradients: a norm of another form (such as
    ``(1 + w) * ...``) is left alone. Returns the number of norms routed."""
    n = 0
    for mod in model.modules():
        w, eps = getattr(mod, "weight", None), _norm_eps(mod)
        if not (isinstance(w, torch.nn.Parameter) and w.dim() == 1 and not w.requires_grad and eps is not None
                and getattr(mod, "bias", None) is None and _same_norm(mod, w, eps, dtype)):
            continue
        own = mod.forward

        def forward(x, *args, mod=mod, own=own, eps=eps, **kwargs):
            if not args and not kwargs and x.dtype == dtype and mod.weight.dtype == dtype:
                return _RMSNorm.apply(x, mod.weight, eps)
            return own(x, *args, **kwargs)

        mod.forward = forward
        n += 1
    return n


def _same_norm(mod, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> bool:
    """Whether ``mod`` computes :class:`_RMSNorm` (checked in ``dtype`` on a seeded random input)."""
    gen = torch.Generator().manual_seed(0)
    H = weight.shape[0]
    x = (torch.randn(8, H, generator=gen) * 3).to(dtype=dtype, device=weight.device)
    g = torch.randn(8, H, generator=gen).to(dtype=dtype, device=weight.device)
    w = weight.detach().to(dtype)
    saved = weight.data
    try:
        weight.data = w
        with torch.enable_grad():
            a = x.clone().requires_grad_(True)
            ya = mod.forward(a)
            ya.backward(g)
            b = x.clone().requires_grad_(True)
            yb = _RMSNorm.apply(b, w, eps)
            yb.backward(g)
    except Exception:  # noqa: BLE001 - a module of another signature: not a norm this can stand in for
        return False
    finally:
        weight.data = saved
    if ya.dtype != yb.dtype or ya.shape != yb.shape:
        return False

    return _close(ya, yb, 2**-6) and _close(a.grad, b.grad, 2**-5)


def _close(u: torch.Tensor, v: torch.Tensor, rel: float) -> bool:
    """Whether ``v`` is ``u`` within ``rel`` of ``u``'s largest value (a few roundings)."""
    u, v = u.detach().float(), v.detach().float()
    return u.shape == v.shape and float((u - v).abs().max()) <= rel * float(u.abs().max())


def shared_weights(model: torch.nn.Module) -> set[int]:
    """The storage addresses (``data_ptr``) of parameters that more than one module of ``model`` holds,
    such as an LM head tied to the input embedding."""
    seen: set[int] = set()
    shared: set[int] = set()
    for mod in model.modules():
        for prm in mod.parameters(recurse=False):
            (shared if prm.data_ptr() in seen else seen).add(prm.data_ptr())
    return shared


class _Rope(torch.autograd.Function):
    """The rotary embedding of queries and keys, ``x cos + rotate_half(x) sin`` (the rotate-half form of
    Llama-style models), in three passes per tensor forward (one product, two fused multiply-adds on the
    halves) and three backward, where the composed form takes five forward (a negation, a
    concatenation, two products, a sum) and about eight backward (slice gradients zero-fill whole tensors).
    ``cos`` and ``sin`` (B, T, d) get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        ctx.save_for_backward(c, s)
        return _rotate(q, c, s), _rotate(k, c, s)

    @staticmethod
    def backward(ctx, gq, gk):
        c, s = ctx.saved_tensors
        return _rotate(gq, c, s, transpose=True), _rotate(gk, c, s, transpose=True), None, None


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x c + rotate_half(x) s``: halves ``x1``, ``x2`` give ``(x1 c1 - x2 s1, x2 c2 + x1 s2)``; with
    ``transpose`` the transposed rotation (the backward pass), ``(x1 c1 + x2 s2, x2 c2 - x1 s1)``."""
    h = x.shape[-1] // 2
    out = x * c
    lo, hi = (s[..., h:], s[..., :h]) if transpose else (s[..., :h], s[..., h:])
    out[..., :h].addcmul_(x[..., h:], lo, value=1 if transpose else -1)
    out[..., h:].addcmul_(x[..., :h], hi, value=-1 if transpose else 1)
    return out


def _fusable(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :class:`_Rope` covers these arguments: (B, T, d) cos and sin without gradients, an even d."""
    return (cos.dim() == sin.dim() == 3 and not (cos.requires_grad or sin.requires_grad)
            and q.shape[-1] % 2 == 0 and cos.shape[-1] == sin.shape[-1] == q.shape[-1])


def rope_fusion(model: torch.nn.Module):
    """A context manager that, while it is active, routes the rotary embedding of ``model``'s attention
    layers through :class:`_Rope`: the ``apply_rotary_pos_emb`` function of the module that defines
    their class is swapped for one that calls :class:`_Rope` for ``(q, k, cos, sin)`` calls it covers and
    the model's own function for any other. Only where, on a seeded random input, the model's own function
    and :class:`_Rope` agree (outputs and input gradients): another form of rotary embedding is left alone.
    None where no layer qualifies. The trainer holds it around its steps only, so decoding and every
    other forward run the model's own code."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    targets = [mod for mod in modules if mod is not None and callable(getattr(mod, "apply_rotary_pos_emb", None))
               and _same_rope(mod.apply_rotary_pos_emb)]
    if not targets:
        return None

    def route(own):
        def apply(q, k, cos, sin, *args, **kwargs):
            if not args and set(kwargs) <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1 \
                    and _fusable(q, cos, sin):
                return _Rope.apply(q, k, cos, sin)
            return own(q, k, cos, sin, *args, **kwargs)
        return apply

    @contextlib.contextmanager
    def active():
        saved = [(mod, mod.apply_rotary_pos_emb) for mod in targets]
        for mod, own in saved:
            mod.apply_rotary_pos_emb = route(own)
        try:
            yield
        finally:
            for mod, own in saved:
                mod.apply_rotary_pos_emb = own

    return active


def _same_rope(own) -> bool:
    """Whether ``own(q, k, cos, sin)`` computes :class:`_Rope` (checked in float32 on a seeded random input,
    with cos and sin of the duplicated-halves form rotary embeddings have)."""
    g = torch.Generator().manual_seed(0)
    q0, k0 = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)
    ang = torch.randn(2, 5, 4, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    w = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)
    outs = []
    try:
        for fn in (own, _Rope.apply):
            q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
            a, b = fn(q, k, cos, sin)
            ((a * w[0]).sum() + (b * w[1]).sum()).backward()
            outs.append((a, b, q.grad, k.grad))
    except Exception:  # noqa: BLE001  (another signature or form: not this one)
        return False
    return all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5) for x, y in zip(*outs))
