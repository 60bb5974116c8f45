"""The block-gated adapter (SPEC §2): LoRA that is active on block tokens only.

LoRA layers come from ``peft`` (injected in place, so the model stays a plain
transformers model). The gate is a forward hook on every ``lora_B``: it scales
the low-rank update by the per-token gate that :meth:`sdlm.model.SDLM.forward`
sets for each forward (1 on appended-block tokens, 0 on clean tokens). Clean
tokens therefore get exactly the base model's hidden states and KV, so modes
``ar`` and ``speculative`` reproduce the base model's output. Without a gate
(a plain ``model(...)`` or ``generate`` call) the adapter is off.

The mask token's embedding is a separate trained vector (a hook on the input
embedding swaps it in during training; at load time it is written into the
embedding row). The artifact is a small folder:

- ``sdlm_adapter.json``: base model name, LoRA settings, SDLM settings;
- ``adapter.safetensors``: LoRA weights and ``mask_embedding``.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .context import setting
from .cpu import call_packed, in_plain_inference
from .errors import SDLMError
from .io import atomic_dir
from .model import SDLM, SDLMConfig, layer_list

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "sdlm_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
KINDS = ("block-adapter", "lora")


@dataclass
class AdapterConfig:
    kind: str = "block-adapter"
    """``block-adapter`` (gated: block tokens only, the base output stays exact) or ``lora`` (ungated)."""
    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    layers: list[int] | None = None
    """Decoder layers to adapt (None = all)."""
    base_model: str = ""
    sdlm: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SDLMError(f"unknown adapter kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.r < 1:
            raise SDLMError(f"LoRA rank must be >= 1, got {self.r}")


class Adapter:
    """Handles to the adapter inside an SDLM: LoRA parameters, mask embedding, gate hooks."""

    def __init__(self, sdlm: SDLM, config: AdapterConfig):
        self.sdlm, self.config = sdlm, config
        self.mask_embedding = torch.nn.Parameter(
            sdlm.model.get_input_embeddings().weight[sdlm.config.mask_token_id].detach().clone().float()
        )
        self._handles: list = []
        self._layers = [m for m in sdlm.model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        self._active = True

    def set_active(self, on: bool) -> None:
        """Skip the LoRA branch entirely (not just multiply it by 0) when ``on`` is False.

        Used for forwards without block tokens (prefill, ``ar`` steps, the clean
        training pass): the result is the same as a zero gate, at the base model's cost.
        """
        if on == self._active:
            return
        for m in self._layers:
            if hasattr(m, "_disable_adapters"):
                m._disable_adapters = not on
        self._active = on

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.sdlm.model.named_parameters() if "lora_" in n}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.lora_parameters().values()) + [self.mask_embedding]

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {n: p.detach().float().contiguous().clone() for n, p in self.lora_parameters().items()}
        sd["mask_embedding"] = self.mask_embedding.detach().float().clone()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        params = self.lora_parameters()
        missing = set(params) - set(sd)
        if missing or "mask_embedding" not in sd:
            raise SDLMError(
                f"adapter weights do not match the model ({len(missing)} LoRA tensors missing, e.g. "
                f"{sorted(missing)[:1]}): the adapter was made for another base model or LoRA setting"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(sd[n])
            self.mask_embedding.copy_(sd["mask_embedding"])

    def write_mask_embedding(self) -> None:
        """Copy the trained mask vector into the embedding row (for inference)."""
        with torch.no_grad():
            emb = self.sdlm.model.get_input_embeddings().weight
            emb[self.sdlm.config.mask_token_id] = self.mask_embedding.to(emb.dtype)

    def train_mask_embedding(self) -> None:
        """During training, swap the trainable mask vector into the embedding output."""
        mask_id = self.sdlm.config.mask_token_id
        vec = self.mask_embedding

        def hook(module, args, out):
            ids = args[0]
            return torch.where((ids == mask_id)[..., None], vec.to(out.dtype), out)

        self._handles.append(self.sdlm.model.get_input_embeddings().register_forward_hook(hook))

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write the adapter folder atomically; ``dtype`` (e.g. bfloat16) halves the file for shipping."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_dir(path) as tmp:
            self.config.sdlm = self.sdlm.config.to_dict()
            save_file({k: v.to(dtype) for k, v in self.state_dict().items()}, str(tmp / ADAPTER_WEIGHTS))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return path


def attach(sdlm: SDLM, config: AdapterConfig) -> Adapter:
    """Inject LoRA layers into ``sdlm.model`` in place and install the gate."""
    if sdlm.config is None:
        raise SDLMError("the model has no mask token yet: call retrofit() before attaching an adapter")
    if sdlm.adapter is not None or any(hasattr(m, "lora_A") for m in sdlm.model.modules()):
        raise SDLMError("the model already has an adapter: attach one to a fresh copy of the base model")
    _inject_lora(sdlm.model, target_layers(sdlm.model, config.target_modules, config.layers), config)
    for p in sdlm.model.parameters():
        p.requires_grad_(False)
    adapter = Adapter(sdlm, config)
    for p in adapter.lora_parameters().values():
        p.requires_grad_(True)
    if config.kind == "block-adapter":
        _install_gate(sdlm, adapter)
        fuse_gated_inference(sdlm)
    sdlm.adapter = adapter
    if sdlm.config is not None:
        sdlm.config.retrofit = config.kind
    return adapter


def target_layers(model, targets: list[str] | str = "all-linear", layers: list[int] | None = None) -> list[str]:
    """The full names of the linear layers an adapter goes on: inside a decoder block (``layers``: only
    those blocks, by index), matching ``targets`` (``all-linear``; a list of names, each the layer's own
    name or a dotted tail of its full name, as ``peft`` matches them; or a regular expression over full
    names), never the LM head.

    Only layers that run one row per token are candidates, since the gate switches the adapter per
    token: ``nn.Linear`` (or a subclass whose call returns one tensor, as a linear layer does; a
    mixture's router that returns its routing does not) and GPT-2's ``Conv1D``, but not the experts of a
    mixture held as separate layers (in a list named for experts: each sees only its routed tokens), and
    not a layer that a cached forward calls on other rows than its tokens. A mixture's experts held as
    fused tensors are not linear layers, so they are never adapted: their update could not be switched
    per token."""
    from transformers.pytorch_utils import Conv1D

    found_list = layer_list(model)  # the decoder blocks, whatever they are called (layers, GPT-2's h, ...)
    blocks = [found_list[0]] if found_list is not None else []
    out_emb = model.get_output_embeddings()
    found, names = [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, Conv1D)) or mod is out_emb:
            continue
        where = _in_block(name, blocks)
        if where is None or _in_expert_list(where[1]):
            continue  # outside the decoder blocks, or one of a mixture's experts held as separate layers
        if not _one_row_per_token(mod):
            continue
        names.add(name.rsplit(".", 1)[-1])
        if layers is not None and where[0] not in layers:
            continue
        if targets == "all-linear" or (isinstance(targets, str) and re.fullmatch(targets, name)) or (
                not isinstance(targets, str) and any(name == t or name.endswith(f".{t}") for t in targets)):
            found.append(name)
    found = _per_token(model, found)
    if not found:
        what = "linear layers to adapt" if targets == "all-linear" else f"linear layers matching {targets!r}"
        where = f" in layers {layers}" if layers is not None else ""
        raise SDLMError(f"found no {what}{where} inside the decoder blocks"
                        + (f" (their names: {', '.join(sorted(names))})" if names else "")
                        + ": give target_modules (lora_targets in a recipe) that name linear layers")
    return found


def _in_block(name: str, blocks: list[str]) -> tuple[int, str] | None:
    """``name`` as (block index, path inside the block) if it lies inside one of the block lists ``blocks``
    (without any: a ``layers.<i>`` in its name), else None."""
    for b in blocks:
        if name.startswith(f"{b}."):
            index, _, path = name[len(b) + 1:].partition(".")
            return (int(index), path) if index.isdigit() and path else None
    if not blocks and (m := re.fullmatch(r"(?:.*\.)?layers\.(\d+)\.(.+)", name)):
        return int(m.group(1)), m.group(2)
    return None


def _in_expert_list(path: str) -> bool:
    """Whether ``path`` (inside a decoder block) lies in a list of a mixture's experts held as separate
    layers (``mlp.experts.3.w1``): a list entry under a name that says ``expert``. Other lists within a
    block hold sublayers that run on every token (LongCat-Flash's two attentions and two MLPs per block)."""
    parts = path.split(".")
    return any(part.isdigit() and i > 0 and "expert" in parts[i - 1].lower() for i, part in enumerate(parts))


def _per_token(model, names: list[str]) -> list[str]:
    """Those of the layers ``names`` that a cached forward of 2 tokens calls, on 2 rows at every call. A layer
    that runs on the cached entries as well (DeepSeek's ``kv_b_proj``, which expands the cached latents of
    multi-head latent attention at every forward) is left out: the cached entries' rows are not the forward's
    tokens."""
    from transformers import DynamicCache

    from .model import _cache_kwarg, probe_ids

    if not names:
        return names
    rows: dict[str, set[tuple[int, ...]]] = {}

    def record(name, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        rows.setdefault(name, set()).add(tuple(x.shape[:-1]))

    handles = [model.get_submodule(n).register_forward_pre_hook(functools.partial(record, n), with_kwargs=True)
               for n in names]
    ids = probe_ids(model, 5)
    dev = ids.device
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :3], position_ids=torch.arange(3, device=dev)[None], use_cache=True,
                  **{_cache_kwarg(model): cache})
            rows.clear()
            model(input_ids=ids[:, 3:], position_ids=torch.arange(3, 5, device=dev)[None], use_cache=True,
                  **{_cache_kwarg(model): cache})
    except Exception as e:  # noqa: BLE001 - decoding would fail the same way: say where
        raise SDLMError(f"{type(model).__name__} failed a cached forward of 5 tokens, which attaching an adapter "
                        f"runs to find its per-token layers: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    kept = [n for n in names if rows.get(n) and rows[n] <= {(1, 2), (2,)}]  # every call on the 2 tokens
    if len(kept) < len(names):
        logger.info("not adapted (their rows are not the forward's tokens): %s",
                    ", ".join(n for n in names if n not in kept))
    return kept


def _one_row_per_token(mod) -> bool:
    """Whether a linear layer's call gives one output row per input row, as ``nn.Linear``'s does: a
    subclass with a call of its own (a router that returns its routing as well) is tried on one row."""
    from transformers.pytorch_utils import Conv1D

    if type(mod) in (torch.nn.Linear, Conv1D) or type(mod).forward is torch.nn.Linear.forward:
        return True
    w = mod.weight
    if w.device.type == "meta":
        return False
    try:
        with torch.no_grad():
            y = mod(torch.zeros(1, mod.in_features, dtype=w.dtype, device=w.device))
    except Exception:  # noqa: BLE001 - a layer that cannot take a plain row is no candidate
        return False
    return isinstance(y, torch.Tensor) and tuple(y.shape) == (1, mod.out_features)


def _inject_lora(model, names: list[str], config: AdapterConfig) -> None:
    """Put ``peft`` LoRA layers on exactly the layers ``names``. ``peft`` is handed only those layers, in a
    container of their own: given the model, ``peft`` (0.18+ under transformers 5) would also map the names
    of a mixture's old per-expert layers (``gate_proj``, ``up_proj``, ``down_proj``) onto its fused expert
    tensors and drop them from the linear targets, and an update on those tensors reaches every token."""
    from peft import LoraConfig, inject_adapter_in_model

    held = torch.nn.ModuleDict({f"t{i}": model.get_submodule(n) for i, n in enumerate(names)})
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(held.keys()), bias="none")
    inject_adapter_in_model(lora, held)
    for i, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, held[f"t{i}"])


def _install_gate(sdlm: SDLM, adapter: Adapter) -> None:
    def gate_hook(module, args, out):
        gate = sdlm.gate
        if gate is True:
            return out  # all block tokens: multiplying by 1 would only cost time
        if gate is None:
            return out * 0  # no gate set: the adapter is off (plain calls give the base model)
        if gate.shape != out.shape[:-1]:  # a layer that runs its tokens flattened (OPT's MLP): the same order
            if gate.numel() != out[..., 0].numel():
                raise SDLMError(f"the adapter's layer {names.get(module, '?')} does not run one row per token of the "
                                f"forward ({tuple(out.shape[:-1])} rows for {tuple(gate.shape)} tokens), so its "
                                "update cannot be switched per token: leave it out of target_modules (lora_targets)")
            gate = gate.reshape(out.shape[:-1])
        return out * gate[..., None].to(out.dtype)

    names = {}
    for name, mod in sdlm.model.named_modules():
        if name.endswith("lora_B.default") or (name.endswith("lora_B") and isinstance(mod, torch.nn.Linear)):
            names[mod] = name.split(".lora_B")[0]
            adapter._handles.append(mod.register_forward_hook(gate_hook))


def plain_lora_layers(model: torch.nn.Module):
    """The ``peft`` LoRA layers of ``model`` over an ``nn.Linear`` with one active adapter, no dropout and no
    LoRA variant (such as DoRA): the layers a shorter forward can stand in for. Yields (layer, adapter name)."""
    for mod in model.modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and isinstance(mod.base_layer, torch.nn.Linear)):
            continue
        names = list(mod.active_adapters)
        if len(names) != 1 or names[0] in getattr(mod, "lora_variant", {}) or \
                not isinstance(mod.lora_dropout[names[0]], torch.nn.Identity):
            continue
        yield mod, names[0]


_unfused: contextvars.ContextVar[bool] = contextvars.ContextVar("sdlm_lora_unfused", default=False)


def unfused_lora():
    """Inside, the gated LoRA layers run ``peft``'s own forward (for comparisons)."""
    return setting(_unfused, True)


_LOW_PRECISION = (torch.bfloat16, torch.float16)

_cpu_lora_in_fp32: contextvars.ContextVar[bool] = contextvars.ContextVar("sdlm_cpu_lora_in_fp32", default=True)


def cpu_lora_in_low_precision():
    """Inside, a bf16 or fp16 model's gated LoRA products on a CPU run in the model's dtype, as ``peft``'s do,
    instead of in float32 (for comparisons; see :func:`fuse_gated_inference`)."""
    return setting(_cpu_lora_in_fp32, False)


def _float32_copy(mod: torch.nn.Module, part: str, w: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a LoRA weight ``w``, kept on ``mod`` and made again when ``w`` changes (another
    tensor, or an in-place update); an inference tensor, which keeps no version count, is copied per call."""
    if w.is_inference():
        return w.float()
    key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
    copies = mod.__dict__.setdefault("_sdlm_fp32_lora", {})
    if part not in copies or copies[part][0] != key:
        copies[part] = (key, w.detach().float())
    return copies[part][1]


def fuse_gated_inference(sdlm: SDLM) -> int:
    """Give each gated LoRA layer of ``sdlm`` a shorter inference path. Through ``peft`` a LoRA layer runs
    its base layer, two more module calls (``lora_A``, ``lora_B``), the gate hook's multiply, the scaling
    multiply and an add; a decoding step does that in every linear layer. Here, for calls without
    gradients: the base layer, ``h = x A^T`` scaled by the gate and the LoRA scaling in one multiply
    (the gate as a column, made once per forward), and ``h B^T`` accumulated into the base output by the
    matrix product itself. Tokens with gate 0 get exactly the base layer's output (their ``h`` is 0); with
    a power-of-two scaling (alpha / r) the block tokens get exactly ``peft``'s numbers too, up to the
    product's summation order. A forward without block tokens (no gate set, or the adapter switched off by
    :meth:`Adapter.set_active`) runs the base layer alone, as ``peft``'s forward would, without its per-call
    work (a median ×1.06 per ``ar`` step on a 2-core AVX2 CPU, timed step by step; within that machine's
    noise end to end). Calls with gradients, autocast, a dtype other than the LoRA weights', several
    adapters, dropout or a LoRA variant run ``peft``'s forward. In a forward that vouches for plain CPU
    inference (:func:`sdlm.cpu.plain_inference`) the gradient and autocast checks are skipped and a base
    layer with packed weights runs its packed product directly (:func:`sdlm.cpu.packed_call`) instead of
    through a second module call. In a bf16 or fp16 model on a CPU the two LoRA products run in float32
    (float32 copies of the LoRA weights, the block rows' ``h`` unrounded, one rounding where the update
    joins the base output): a CPU's bf16 routines take 30 to 65 µs for products this thin, float32 6 to 17
    (rank 16, 4 to 16 rows, a 2-core Xeon), and a decoding step runs two per linear layer.
    Returns the layers routed."""
    import torch.nn.functional as F

    def gate_column(gate, dtype, scaling):
        """``gate`` as a (..., 1) column times ``scaling``, made once per forward: :meth:`SDLM.forward` starts
        every forward with an empty ``gate_columns``."""
        cols, key = sdlm.gate_columns, (dtype, scaling)
        if key not in cols:
            cols[key] = gate[..., None].to(dtype) * scaling
        return cols[key]

    n = 0
    for mod, name in plain_lora_layers(sdlm.model):

        def forward(x, *args, mod=mod, own=mod.forward, name=name, **kwargs):
            if (args or kwargs or _unfused.get() or mod.merged
                    or not in_plain_inference() and (torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type))):
                return own(x, *args, **kwargs)
            base = mod._modules["base_layer"]
            gate = sdlm.gate
            if gate is None or mod.disable_adapters:  # no block token: what peft's forward runs, without its overhead
                return call_packed(base, x)
            a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
            if x.dtype != a.dtype or (gate is not True and tuple(gate.shape) != tuple(x.shape[:-1])):
                return own(x, *args, **kwargs)
            scaling = float(mod.scaling[name])
            y = call_packed(base, x)
            if y.dtype != b.dtype or not y.is_contiguous():
                return own(x, *args, **kwargs)
            low = x.device.type == "cpu" and x.dtype in _LOW_PRECISION and _cpu_lora_in_fp32.get()
            if low:  # a CPU's bf16 routines are slow at products this thin: run these two in float32
                a, b, x = _float32_copy(mod, "lora_A", a), _float32_copy(mod, "lora_B", b), x.float()
            h = F.linear(x, a)
            h.mul_(scaling if gate is True else gate_column(gate, h.dtype, scaling))
            y2, h2 = y.view(-1, y.shape[-1]), h.view(-1, h.shape[-1])
            if low:
                y2.add_(torch.mm(h2, b.t()))  # one rounding into the base output's dtype
            else:
                y2.addmm_(h2, b.t())
            return y

        mod.forward = forward
        n += 1
    return n


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu", base: str | None = None,
                 prepack: bool | None = None) -> SDLM:
    """Load the base model named in the adapter folder (or ``base``), apply the adapter. ``prepack`` as in
    :meth:`SDLM.load`."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
        config = AdapterConfig(**raw)
        weights = load_file(str(path / ADAPTER_WEIGHTS))
    except SDLMError:
        raise
    except Exception as e:  # noqa: BLE001 - any read error becomes one clear line
        raise SDLMError(f"cannot read adapter {path}: {type(e).__name__}: {e}; re-save it or train it again") from None
    sdlm = SDLM.load(base or config.base_model, dtype=dtype, device=device, quiet=True, prepack=False)
    s = SDLMConfig.from_dict(config.sdlm)
    sdlm.retrofit(block_size=s.block_size, ar_loss_weight=s.ar_loss_weight, causal_within_block=s.causal_within_block,
                  draft_trees=s.draft_trees)
    if sdlm.config.mask_token_id != s.mask_token_id:
        raise SDLMError(
            f"adapter {path} expects mask token id {s.mask_token_id}, the base gives {sdlm.config.mask_token_id}: "
            "it was trained on another base model"
        )
    adapter = attach(sdlm, config)
    adapter.load_state_dict(weights)
    adapter.write_mask_embedding()
    sdlm.model.to(device=device, dtype=dtype)
    for p in sdlm.model.parameters():
        p.requires_grad_(False)
    sdlm.name = str(path)
    sdlm._prepack_if(prepack)
    return sdlm
