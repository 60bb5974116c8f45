"""Faster decoding on CPUs: linear layers with their weights prepacked for oneDNN.

A decoding forward multiplies a few tokens (1 for ``ar``, 20 for a speculative step at D = 4) by every
weight matrix of the model. ``F.linear`` hands such thin products to a general matrix routine that
re-lays out the weight at each call; oneDNN can take the weight once in its own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) and run thin products on it directly
(``torch.ops.mkldnn._linear_pointwise``). On a 2-core AMD EPYC (Zen 4), in float32, this made ``ar`` 1.3
to 1.5 times and ``speculative`` (D = 4) 1.5 to 1.6 times as fast on the default model
(``bench/decode_speed.py --also-unpacked``; figures in the README). On an Intel CPU, MKL's float32 products
behind ``F.linear`` are faster than the packed ones, and ``SDLM.load`` packs only bf16 there
(:func:`packing_pays`).

:func:`prepack_linears` routes a model's linear layers through a packed copy of their weights when
the call is an inference one: gradients off (``torch.no_grad`` / ``torch.inference_mode``), no
autocast, a CPU input of the weight's dtype. Every other call (training, autocast, another device)
runs the layer's own forward. The packed copy is made again if the weight changes (an in-place
update, a new tensor of the same dtype, any optimizer step in the process). The original weights stay
where they are, so state dicts, saving and training are unaffected; the packed copies take as much
memory again as the linear weights (``SDLM.load`` packs by default only where they fit in half the
memory still available).

The products are the same up to float rounding (another summation order): in float32 the tests
decode the same tokens as ``transformers`` ``generate`` with and without packing.

A decoding step calls some 200 routed layers, and checking at every call that it is an inference call
costs about as much as the product of one token by a small weight. :func:`plain_inference` lets a
forward vouch once for all its calls (``SDLM.forward`` does, where :func:`plain_inference_here`), and
:func:`packed_call` then runs a routed layer's packed product with only the checks that can change
between calls.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import platform

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .context import setting

logger = logging.getLogger(__name__)

PACK_HINT = 32
"""The token count oneDNN lays the weights out for; measured on decoding's 1 to 72 tokens per call."""

MIN_FEATURES = 64
"""Layers narrower than this (a LoRA layer's rank side) are left alone: too small to gain."""


_off: contextvars.ContextVar[bool] = contextvars.ContextVar("sdlm_prepack_off", default=False)


def packing_off():
    """Inside, routed layers run their own forward (for baselines and comparisons); the packed copies stay."""
    return setting(_off, True)


_plain: contextvars.ContextVar[bool] = contextvars.ContextVar("sdlm_plain_inference", default=False)


def plain_inference(on: bool = True):
    """Inside, the caller vouches that every call is a plain CPU inference call: gradients off, no autocast
    (:meth:`sdlm.model.SDLM.forward` enters it for its forwards that are, :func:`plain_inference_here`).
    Routed layers then run :func:`packed_call` without re-checking that per call. ``on`` False: as outside."""
    return setting(_plain, bool(on))


def in_plain_inference() -> bool:
    """Whether the caller is inside :func:`plain_inference`."""
    return _plain.get()


_checked: contextvars.ContextVar[bool] = contextvars.ContextVar("sdlm_checked_calls", default=False)


def checked_calls():
    """Inside, forwards never enter :func:`plain_inference`: every layer call checks for itself, as before
    it existed (for comparisons: ``bench/decode_speed.py --also-checked``)."""
    return setting(_checked, True)


def plain_inference_here(device: torch.device) -> bool:
    """Whether a forward starting now on ``device`` can run under :func:`plain_inference`."""
    return (device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not _checked.get())


def packed_call(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``mod(x)`` through the packed copy of a layer routed by :func:`prepack_linears`, without the module
    call, inside :func:`plain_inference` (and not :func:`packing_off`); None where that does not apply
    (not routed, outside, the weight changed since it was packed, another dtype or device, a layer with
    forward hooks): the caller runs the layer itself. The same numbers as the routed layer's own call."""
    state = mod.__dict__.get("_sdlm_packed_state")
    if state is None or not _plain.get() or mod._forward_hooks or mod._forward_pre_hooks or _global_hooks():
        return None  # a layer with hooks runs through its own call, which runs them
    return _packed(mod, state, x, repack=False)


def call_packed(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``: through :func:`packed_call` where it applies, else the layer's own call."""
    y = packed_call(mod, x)
    return mod(x) if y is None else y


def _packed(mod: torch.nn.Module, state: dict, x: torch.Tensor, repack: bool) -> torch.Tensor | None:
    """The packed product of a routed layer for an inference call, or None where the layer must run its own
    forward (:func:`packing_off`, another dtype or device, an inference tensor for a weight). A weight changed
    since it was packed is packed again if ``repack``, else None."""
    params = mod._parameters
    w, bias = params["weight"], params.get("bias")
    if (_off.get() or x.dtype != w.dtype or not x.is_cpu or not w.is_cpu
            or (bias is not None and bias.dtype != w.dtype)):
        return None
    key = _key(w)
    if key != state["key"]:  # the weight changed since it was packed
        if not repack or key is None or not can_prepack(w.dtype, w.device):  # None: now an inference tensor
            return None
        state["packed"], state["key"] = _pack(w), key
    return _packed_linear(x, state["packed"], bias)


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def can_prepack(dtype: torch.dtype, device: str | torch.device = "cpu") -> bool:
    """Whether :func:`prepack_linears` applies to weights of ``dtype`` on ``device`` with this PyTorch build."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
            return False
        if dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
            return False  # without bf16 instructions oneDNN would run a slow reference kernel
    except (AttributeError, RuntimeError):
        return False
    return True


def _packable(mod: torch.nn.Module, min_features: int) -> bool:
    """A linear layer not yet routed, wide enough, with a weight this build can pack."""
    if not isinstance(mod, torch.nn.Linear) or hasattr(mod, "_sdlm_packed_state"):
        return False
    w = mod.weight
    return min(w.shape) >= min_features and can_prepack(w.dtype, w.device)


def _routable(mod: torch.nn.Module, min_features: int) -> bool:
    # an inference tensor (made under torch.inference_mode) keeps no version count, so a packed copy
    # could not tell that the weight changed: such layers run their own forward
    return _packable(mod, min_features) and not mod.weight.is_inference()


def packed_bytes(model: torch.nn.Module, min_features: int = MIN_FEATURES) -> int:
    """The memory the packed copies of :func:`prepack_linears` would take: the routable layers' weights."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if _routable(m, min_features))


def available_memory() -> int | None:
    """Bytes of memory the system can still give (``MemAvailable`` on Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none, as off Linux), read once
    per process: the training step asks for its flags at every clean-pass attention call."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


_NATIVE_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


def native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` with its own instructions: float32 always; bf16 with ``avx512_bf16``
    or ``amx_bf16``; fp16 with ``avx512_fp16`` or ``amx_fp16``. Without them bf16 and fp16 matrix products are
    emulated, several times slower than float32 (7x and 6x on a 2-core AVX2 EPYC)."""
    flags = _NATIVE_FLAGS.get(dtype)
    return flags is None or bool(flags & set(_cpuinfo().get("flags", "").split()))


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``): :func:`native` of bf16."""
    return native(torch.bfloat16)


def has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 products (``amx_bf16``), which oneDNN uses for bf16 matrix
    products and PyTorch's fused CPU attention."""
    return "amx_bf16" in _cpuinfo().get("flags", "").split()


def intel_mkl() -> bool:
    """Whether this is an Intel CPU (``vendor_id`` GenuineIntel) and PyTorch does its float32 matrix products
    through MKL, which is tuned for Intel CPUs."""
    return _cpuinfo().get("vendor_id") == "GenuineIntel" and torch.backends.mkl.is_available()


def packing_pays(dtype: torch.dtype) -> bool:
    """Whether decoding in ``dtype`` runs faster on packed copies than on the stored weights on this CPU (the
    default of ``SDLM.load``), as measured end to end with ``bench/decode_speed.py --also-unpacked``:

    - bf16: yes. ``F.linear`` runs bf16 through oneDNN too, re-laying out the weight at each call; packed,
      ``ar`` was x1.22 on a 2-core Xeon with AMX and x1.23 on a 2-core Zen 4.
    - float32 on an Intel CPU with MKL (:func:`intel_mkl`): no. ``F.linear`` runs MKL's products there, and
      packed copies made decoding slower on a 2-core Xeon with AVX-512 and AMX (``ar`` x0.79, ``speculative``
      D = 4 x0.83 on chat prompts).
    - float32 elsewhere: yes (a 2-core AMD EPYC Zen 4: ``ar`` x1.29 to x1.47, D = 4 x1.49 to x1.57; a Zen 3
      with AVX2: about even, 64 ``ar`` tokens in 4.72 s packed against 4.95 s)."""
    return dtype != torch.float32 or not intel_mkl()


def describe() -> str:
    """This CPU for a benchmark's record: its model name, the vector instructions PyTorch uses on it and
    whether it has native bf16 (and AMX), e.g. ``AMD EPYC (AVX2, no native bf16)``."""
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = "vector instructions unknown"
    amx = ", AMX" if has_amx() else ""
    return f"{name} ({isa}, {'native bf16' if native_bf16() else 'no native bf16'}{amx})"


def describe_host() -> str:
    """:func:`describe`, with the threads PyTorch uses and its version: the machine line of a benchmark's record,
    e.g. ``AMD EPYC (AVX2, no native bf16), 2 threads, torch 2.13.0+cpu``."""
    return f"{describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def room_for(need: int) -> tuple[bool, int | None]:
    """Whether ``need`` bytes of copies fit in half the memory still available (yes where that is unknown),
    and the bytes available."""
    free = available_memory()
    return free is None or need <= free // 2, free


def room_to_prepack(model: torch.nn.Module) -> bool:
    """Whether the packed copies fit in half the memory still available (the default of ``SDLM.load``): a
    large model on a small machine keeps its stored weights only, with a warning."""
    need = packed_bytes(model)
    fits, free = room_for(need)
    if fits:
        return True
    logger.warning("not prepacking the linear layers for oneDNN: the copies would take %.1f GB of the %.1f GB "
                   "available (decoding runs on the stored weights, slower); SDLM.load(..., prepack=True) forces it",
                   need / 2**30, free / 2**30)
    return False


_exact_rows: contextvars.ContextVar[int] = contextvars.ContextVar("sdlm_exact_rows", default=0)


def exact_rows(n: int):
    """Inside, a packed product of one sequence's rows that holds more than :data:`PACK_HINT` of them runs
    its first ``n`` as a call of their own (when ``n`` is at most that many), then the rest. oneDNN gives a row
    the same numbers in any call of up to :data:`PACK_HINT` rows on weights packed for that count (measured
    bitwise on the default model's bf16 weights, 1 to 32 rows; 33 rows and more change them), so a decoding
    step's ``n`` causal rows keep the numbers of one-token steps in a step of any size. ``n`` 0: as outside."""
    return setting(_exact_rows, int(n))


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n = _exact_rows.get()
    if n and x.dim() >= 2 and n <= PACK_HINT < x.shape[-2] and x.numel() == x.shape[-2] * x.shape[-1]:
        return torch.cat([_onednn_linear(x[..., :n, :], packed, bias), _onednn_linear(x[..., n:, :], packed, bias)],
                         -2)
    return _onednn_linear(x, packed, bias)


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT)


_optimizer_steps = 0


def _count_optimizer_step(*_args) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# A fused optimizer can update a weight in place without bumping its ``_version`` (AdamW's fused kernel does
# not), so a packed copy is also made again after any optimizer step taken in this process.
register_optimizer_step_post_hook(_count_optimizer_step)


def prepack_linears(model: torch.nn.Module, min_features: int = MIN_FEATURES) -> int:
    """Route every CPU ``nn.Linear`` of ``model`` (float32 or bf16, both sides at least ``min_features``)
    through a oneDNN-packed copy of its weight for inference calls (see the module's docstring).
    Layers already routed are skipped. Returns the number of layers routed."""
    n, warned = 0, False
    for mod in model.modules():
        if not _routable(mod, min_features):
            if not warned and _packable(mod, min_features):  # not routable: an inference tensor
                logger.warning("not prepacking linear layers whose weights were made under torch.inference_mode "
                               "(their changes cannot be tracked); load the model outside inference_mode for "
                               "faster decoding on a CPU")
                warned = True
            continue
        w = mod.weight
        try:
            packed = _pack(w)
        except RuntimeError as e:  # an unusual shape or build: this layer runs as before
            logger.debug("not prepacking %s: %s", tuple(w.shape), e)
            continue
        state = {"key": _key(w), "packed": packed}
        own = mod.forward

        def forward(x, *args, mod=mod, own=own, state=state, **kwargs):
            if args or kwargs or not _plain.get() and (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
                return own(x, *args, **kwargs)
            y = _packed(mod, state, x, repack=True)
            return own(x) if y is None else y

        mod._sdlm_own_forward = own if "forward" in mod.__dict__ else None  # None: the class's own
        mod._sdlm_packed_state = state
        mod.forward = forward
        n += 1
    return n


def unpack_linears(model: torch.nn.Module) -> int:
    """Undo :func:`prepack_linears`: every routed layer runs its own forward again and the packed
    copies are freed. Returns the number of layers restored."""
    n = 0
    for mod in model.modules():
        if not hasattr(mod, "_sdlm_packed_state"):
            continue
        own = mod._sdlm_own_forward
        if own is None:
            del mod.forward
        else:
            mod.forward = own
        del mod._sdlm_own_forward, mod._sdlm_packed_state
        n += 1
    return n


def packed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of ``model`` routed by :func:`prepack_linears`."""
    return [m for m in model.modules() if hasattr(m, "_sdlm_packed_state")]


def _key(w: torch.Tensor) -> tuple | None:
    """What identifies a weight's values for its packed copy; None for an inference tensor, which keeps no
    version count (its layer then runs its own forward)."""
    if w.is_inference():
        return None
    return (w.data_ptr(), w._version, w.dtype, tuple(w.shape), _optimizer_steps)
